//! Serving certificates for the operator's own HTTPS endpoints (identity 15012, webhook 9443),
//! signed by the mesh CA and held in memory only.
//!
//! Every replica serves both endpoints, and every replica can read the CA, so each one issues
//! its own serving certificate at start instead of sharing one through a Secret: nothing to
//! keep in sync, and a private key never leaves the process. [`ServingCert::refresh`] reissues
//! when a third of the lifetime is left or when the signing root changed (root rotation), and
//! rustls picks the new certificate up for the next handshake through the resolver.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use tokio_util::sync::CancellationToken;

use super::{CaError, CertificateAuthority, IssuerRx};

/// DNS name of the operator Service in the default install (`trellis-system`), which `trellis
/// dev` also uses. In a cluster the name follows the operator's namespace:
/// [`operator_service_dns`].
pub const OPERATOR_SERVICE_DNS: &str = "trellis-operator.trellis-system.svc";

/// DNS name of the `trellis-operator` Service in the operator's `namespace` (`POD_NAMESPACE`):
/// OLM installs into a namespace of the user's choosing, and the webhook and sidecars reach the
/// operator by this name.
pub fn operator_service_dns(namespace: &str) -> String {
    format!("trellis-operator.{namespace}.svc")
}

/// Default lifetime of serving certificates; renewed with a third left.
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

struct Current {
    key: Arc<CertifiedKey>,
    issuer_fingerprint: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

/// An in-memory serving certificate that renews itself; also rustls' certificate resolver.
pub struct ServingCert {
    names: Vec<String>,
    ttl: Duration,
    current: RwLock<Option<Current>>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl ServingCert {
    /// A serving certificate for `names` (DNS names or IP addresses), `ttl` long. Holds
    /// nothing until the first [`refresh`](Self::refresh).
    pub fn new(names: Vec<String>, ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            names,
            ttl,
            current: RwLock::new(None),
        })
    }

    /// Issues a new certificate if there is none, the issuer changed, or less than a third of
    /// the lifetime is left. Returns whether it issued one.
    pub fn refresh(&self, ca: &CertificateAuthority, now: SystemTime) -> Result<bool, CaError> {
        let due = match &*self.current.read().unwrap_or_else(|e| e.into_inner()) {
            None => true,
            Some(c) => {
                let life = c.not_after.duration_since(c.not_before).unwrap_or_default();
                let left = c.not_after.duration_since(now).unwrap_or_default();
                c.issuer_fingerprint != ca.fingerprint() || left < life / 3
            }
        };
        if !due {
            return Ok(false);
        }
        let (issued, key_pem) = ca.issue_serving_cert(&self.names, self.ttl, now)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let mut chain = vec![issued.cert_der.clone()];
        chain.extend(
            rustls_pki_types::CertificateDer::pem_slice_iter(ca.intermediates_pem().as_bytes())
                .filter_map(Result::ok),
        );
        let provider = rustls::crypto::ring::default_provider();
        let certified = CertifiedKey::from_der(chain, key, &provider)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Current {
            key: Arc::new(certified),
            issuer_fingerprint: ca.fingerprint().to_string(),
            not_before: now - super::authority::CLOCK_SKEW_BACKDATE,
            not_after: issued.not_after,
        });
        tracing::info!(names = ?self.names, not_after = ?issued.not_after, serial = %issued.serial_hex, "issued serving certificate");
        Ok(true)
    }

    /// Expiry of the current certificate, if any.
    pub fn not_after(&self) -> Option<SystemTime> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.not_after)
    }

    /// Whether a certificate is held and valid at `now`: what the replica's readiness waits
    /// for, since a TLS listener without one fails every handshake.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_after().is_some_and(|t| t > now)
    }

    /// A TLS 1.2/1.3 server config that always presents the current certificate.
    pub fn server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_no_client_auth()
        .with_cert_resolver(self.clone());
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }

    /// Keeps the certificate fresh: refreshes when the issuer changes and every `check` period,
    /// until `shutdown`. Failures are logged and retried at the next check.
    pub async fn run_renewal(
        self: Arc<Self>,
        mut issuer: IssuerRx,
        check: Duration,
        shutdown: CancellationToken,
    ) {
        loop {
            let state = issuer.borrow_and_update().clone();
            if let Some(state) = state
                && let Err(error) = self.refresh(&state.ca, SystemTime::now())
            {
                tracing::warn!(%error, "serving certificate renewal failed");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = issuer.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(check) => {}
            }
        }
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_with_a_third_left_and_on_issuer_change() {
        let t0 = SystemTime::now();
        let ca = CertificateAuthority::generate("td", Duration::from_secs(86400), t0).unwrap();
        let sc = ServingCert::new(vec![OPERATOR_SERVICE_DNS.into()], Duration::from_secs(3000));
        assert!(sc.not_after().is_none());
        assert!(!sc.is_valid_at(t0));
        assert!(sc.refresh(&ca, t0).unwrap());
        assert!(sc.is_valid_at(t0));
        let first = sc.not_after().unwrap();
        // Lifetime is 3000 s + 60 s backdate; a third is 1020 s.
        assert!(!sc.refresh(&ca, t0 + Duration::from_secs(1900)).unwrap());
        assert!(sc.refresh(&ca, t0 + Duration::from_secs(2100)).unwrap());
        assert!(sc.not_after().unwrap() > first);
        let other = CertificateAuthority::generate("td", Duration::from_secs(86400), t0).unwrap();
        assert!(sc.refresh(&other, t0 + Duration::from_secs(2101)).unwrap());
    }
}
