//! The identity client: obtains and renews this proxy's workload certificate from the
//! operator's identity endpoint and publishes it on the credentials channel.
//!
//! - The private key is an ECDSA P-256 key generated in memory; it is never written anywhere.
//!   A fresh key is generated for every certificate, so a renewal also rotates the key.
//! - The request carries the projected ServiceAccount token from `<dir>/token`, re-read for
//!   every request because kubelet rotates it.
//! - The endpoint's serving certificate is verified against the trust bundle `<dir>/ca.pem`
//!   (plus the roots the endpoint last returned) with the endpoint's host as the name.
//! - Renewal happens at 70 % of the certificate's lifetime with a little jitter (so a fleet
//!   started together does not renew together); failures back off exponentially, and the
//!   current certificate stays in use until it expires. New connections use new credentials;
//!   existing ones are untouched.
//! - `<dir>/ca.pem` is polled between renewals: a root rotation reaches the TLS configs
//!   without waiting for the next certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::creds::{Credentials, CredentialsRx, CredentialsTx};
use crate::fswatch::Changes;
use crate::tls::{self, TlsError};

/// Why one certificate request failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityClientError {
    #[error("invalid identity endpoint {0:?}: must be https://host[:port]")]
    Endpoint(String),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("connecting to the identity endpoint: {0}")]
    Connect(std::io::Error),
    #[error("HTTP exchange with the identity endpoint: {0}")]
    Http(String),
    #[error("identity endpoint refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("identity endpoint answered something unusable: {0}")]
    BadResponse(String),
    #[error("generating the key or CSR: {0}")]
    Csr(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("identity request timed out")]
    Timeout,
}

/// Tunables; the defaults are what production uses, tests shorten them.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Fraction of the lifetime after which to renew.
    pub renew_at: f64,
    /// Random spread around the renewal point, as a fraction of the lifetime (±).
    pub jitter: f64,
    /// First retry delay after a failure; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Deadline of one request (connect + TLS + HTTP).
    pub request_timeout: Duration,
    /// How often `<dir>/ca.pem` is checked between renewals when the directory is not under
    /// watch (see [`crate::fswatch`]); watched, it is checked when it changes.
    pub bundle_poll: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            renew_at: 0.7,
            jitter: 0.05,
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            bundle_poll: Duration::from_secs(1),
        }
    }
}

#[derive(Serialize)]
struct CertificateRequest<'a> {
    csr: &'a str,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CertificateResponse {
    certificate_chain: String,
    trust_bundle: String,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
}

/// A parsed `https://host:port` endpoint.
#[derive(Debug, Clone)]
struct Endpoint {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

fn parse_endpoint(url: &str) -> Result<Endpoint, IdentityClientError> {
    let bad = || IdentityClientError::Endpoint(url.to_string());
    let uri: http::Uri = url.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("https") {
        return Err(bad());
    }
    let host = uri.host().ok_or_else(bad)?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let server_name = ServerName::try_from(host.clone()).map_err(|_| bad())?;
    Ok(Endpoint {
        port: uri.port_u16().unwrap_or(443),
        host,
        server_name,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityClientError> {
    std::fs::read(path).map_err(|source| IdentityClientError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The largest answer we read: a chain and a bundle of a few certificates.
const MAX_RESPONSE: usize = 256 * 1024;

/// One certificate request. Returns the new credentials.
async fn request_certificate(
    endpoint: &Endpoint,
    dir: &Path,
    extra_roots: &[CertificateDer<'static>],
) -> Result<Credentials, IdentityClientError> {
    let token = String::from_utf8(read(&dir.join("token"))?)
        .map_err(|_| IdentityClientError::BadResponse("token file is not UTF-8".into()))?;
    let token = token.trim();
    let bundle = tls::parse_pem_certs(&read(&dir.join("ca.pem"))?)?;

    let mut roots = rustls::RootCertStore::empty();
    for c in bundle.iter().chain(extra_roots) {
        // A root rustls cannot use is skipped; at least one must remain.
        let _ = roots.add(c.clone());
    }
    if roots.is_empty() {
        return Err(TlsError::Empty("trust bundle").into());
    }
    let cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::from)?
        .with_root_certificates(roots)
        .with_no_client_auth();

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| IdentityClientError::Csr(e.to_string()))?;
    // No names: the operator decides the identity from the token.
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| IdentityClientError::Csr(e.to_string()))?;
    let body = serde_json::to_vec(&CertificateRequest { csr: &csr })
        .map_err(|e| IdentityClientError::Csr(e.to_string()))?;

    let tcp = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(IdentityClientError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(endpoint.server_name.clone(), tcp)
        .await
        .map_err(IdentityClientError::Connect)?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| IdentityClientError::Http(e.to_string()))?;
    let conn = tokio::spawn(conn);
    let req = http::Request::post("/v1/certificate")
        .header(http::header::HOST, &endpoint.host)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| IdentityClientError::Http(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| IdentityClientError::Http(e.to_string()))?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| IdentityClientError::Http(e.to_string()))?
        .to_bytes();
    conn.abort();
    if !status.is_success() {
        let message = serde_json::from_slice::<ErrorResponse>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(200).collect());
        return Err(IdentityClientError::Refused {
            status: status.as_u16(),
            message,
        });
    }
    let answer: CertificateResponse = serde_json::from_slice(&bytes)
        .map_err(|e| IdentityClientError::BadResponse(e.to_string()))?;
    let chain = tls::parse_pem_certs(answer.certificate_chain.as_bytes())?;
    // Trust what kubelet projected and what the endpoint says now: during a root rotation the
    // endpoint's view is the fresher one.
    let mut all_roots = bundle;
    for r in tls::parse_pem_certs(answer.trust_bundle.as_bytes())? {
        if !all_roots.contains(&r) {
            all_roots.push(r);
        }
    }
    let key = PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| IdentityClientError::Csr(e.to_string()))?;
    Ok(tls::credentials_from_parts(chain, key, all_roots)?)
}

/// Seconds since the epoch of the credentials' expiry (for `/metrics`).
pub fn cert_expiry_unix(creds: &Credentials) -> i64 {
    creds
        .not_after
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Registers `identity_cert_expiry_timestamp_seconds` (0 while no certificate is held), read
/// from the credentials channel on every scrape.
pub fn register_expiry_metric(registry: &mut Registry, rx: CredentialsRx) {
    registry.register_collector(Box::new(ExpiryCollector(rx)));
}

#[derive(Debug)]
struct ExpiryCollector(CredentialsRx);

impl Collector for ExpiryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let value = self
            .0
            .borrow()
            .as_deref()
            .map(cert_expiry_unix)
            .unwrap_or(0);
        let gauge = ConstGauge::new(value);
        let metric = encoder.encode_descriptor(
            "identity_cert_expiry_timestamp_seconds",
            "When the workload certificate expires (Unix time); 0 without a certificate",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

/// Time until renewal, measured from `now` (when the certificate arrived) rather than from
/// notBefore: the CA backdates notBefore for clock skew, which is not usable lifetime.
fn renewal_delay(creds: &Credentials, now: SystemTime, opts: &ClientOptions) -> Duration {
    let left = creds
        .not_after
        .duration_since(now)
        .unwrap_or_default()
        .as_secs_f64();
    let jitter = (rand::random::<f64>() * 2.0 - 1.0) * opts.jitter;
    Duration::from_secs_f64(left * (opts.renew_at + jitter).clamp(0.1, 0.95))
}

/// Runs the identity client with default options until `shutdown`.
pub async fn run_identity_client(
    endpoint: String,
    dir: PathBuf,
    changes: Changes,
    tx: CredentialsTx,
    shutdown: CancellationToken,
) -> Result<(), IdentityClientError> {
    run_identity_client_with(
        endpoint,
        dir,
        changes,
        tx,
        shutdown,
        ClientOptions::default(),
    )
    .await
}

/// Runs the identity client until `shutdown` or until every credentials receiver is gone.
/// Returns an error only for an unusable endpoint URL; request failures are retried.
/// `changes` wakes it when `dir` (where `ca.pem` is) may have changed.
pub async fn run_identity_client_with(
    endpoint: String,
    dir: PathBuf,
    mut changes: Changes,
    tx: CredentialsTx,
    shutdown: CancellationToken,
    opts: ClientOptions,
) -> Result<(), IdentityClientError> {
    let endpoint = parse_endpoint(&endpoint)?;
    let mut backoff = opts.backoff_min;
    let mut current: Option<Arc<Credentials>> = None;
    loop {
        if tx.is_closed() {
            return Ok(());
        }
        let extra_roots = current
            .as_ref()
            .map(|c| c.roots.clone())
            .unwrap_or_default();
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = tokio::time::timeout(opts.request_timeout, request_certificate(&endpoint, &dir, &extra_roots)) => {
                r.unwrap_or(Err(IdentityClientError::Timeout))
            }
        };
        let wait = match attempt {
            Ok(creds) => {
                let creds = Arc::new(creds);
                tracing::info!(
                    spiffe_id = %creds.spiffe_id,
                    not_after = cert_expiry_unix(&creds),
                    roots = creds.roots.len(),
                    "obtained workload certificate"
                );
                tx.send_replace(Some(creds.clone()));
                backoff = opts.backoff_min;
                let wait = renewal_delay(&creds, SystemTime::now(), &opts);
                current = Some(creds);
                wait
            }
            Err(error) => {
                let wait = backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5);
                backoff = (backoff * 2).min(opts.backoff_max);
                tracing::warn!(%error, retry_in_ms = wait.as_millis() as u64, "certificate request failed; keeping the current certificate");
                wait
            }
        };
        // Wait for the renewal point, expiring and re-rooting the current credentials meanwhile:
        // woken by a change to the bundle's directory, at the renewal point, or when the
        // current certificate expires (renewal failing), whichever comes first.
        let deadline = tokio::time::Instant::now() + wait;
        let mut last_bundle = std::fs::read(dir.join("ca.pem")).ok();
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            let expiry = current.as_ref().map(|c| {
                now + c
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
            });
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tx.closed() => return Ok(()),
                _ = changes.changed(opts.bundle_poll) => {}
                _ = tokio::time::sleep_until(expiry.map_or(deadline, |e| e.min(deadline))) => {}
            }
            if let Some(c) = &current
                && c.not_after <= SystemTime::now()
            {
                tracing::error!(spiffe_id = %c.spiffe_id, "workload certificate expired without renewal; not ready");
                tx.send_replace(None);
                current = None;
            }
            let bundle = std::fs::read(dir.join("ca.pem")).ok();
            if bundle != last_bundle {
                if let (Some(c), Some(pem)) = (&current, &bundle)
                    && let Ok(roots) = tls::parse_pem_certs(pem)
                    && !roots.is_empty()
                {
                    match tls::credentials_from_parts(
                        c.cert_chain.clone(),
                        c.key.clone_key(),
                        roots,
                    ) {
                        Ok(updated) => {
                            tracing::info!(roots = updated.roots.len(), "trust bundle changed");
                            let updated = Arc::new(updated);
                            tx.send_replace(Some(updated.clone()));
                            current = Some(updated);
                        }
                        Err(error) => tracing::warn!(%error, "ignoring unusable trust bundle"),
                    }
                }
                last_bundle = bundle;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls() {
        let e = parse_endpoint("https://trellis-operator.trellis-system.svc:15012").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port),
            ("trellis-operator.trellis-system.svc", 15012)
        );
        let e = parse_endpoint("https://127.0.0.1:8443").unwrap();
        assert!(matches!(e.server_name, ServerName::IpAddress(_)));
        assert_eq!(parse_endpoint("https://example.com").unwrap().port, 443);
        for bad in ["http://x:1", "x:1", "", "https://"] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn renews_at_seventy_percent_with_bounded_jitter() {
        let ca = crate::tls::testutil::TestCa::new("r");
        let now = time::OffsetDateTime::now_utc();
        let creds = ca.creds_between(
            "spiffe://td/ns/a/sa/b",
            &[&ca],
            now,
            now + time::Duration::seconds(1000),
        );
        let t0 = SystemTime::from(now);
        for _ in 0..100 {
            let d = renewal_delay(&creds, t0, &ClientOptions::default()).as_secs_f64();
            assert!((649.0..=751.0).contains(&d), "{d}");
        }
        // Already expired: renew now.
        let late = t0 + Duration::from_secs(1001);
        assert_eq!(
            renewal_delay(&creds, late, &ClientOptions::default()),
            Duration::ZERO
        );
    }

    #[test]
    fn expiry_metric_reads_the_channel() {
        let (tx, rx) = crate::creds::channel();
        let mut registry = Registry::with_prefix("trellis");
        register_expiry_metric(&mut registry, rx);
        let text = || {
            let mut s = String::new();
            prometheus_client::encoding::text::encode(&mut s, &registry).unwrap();
            s
        };
        assert!(text().contains("trellis_identity_cert_expiry_timestamp_seconds 0"));
        let ca = crate::tls::testutil::TestCa::new("r");
        let creds = ca.creds("spiffe://td/ns/a/sa/b", &[&ca]);
        let want = cert_expiry_unix(&creds);
        tx.send_replace(Some(Arc::new(creds)));
        assert!(text().contains(&format!(
            "trellis_identity_cert_expiry_timestamp_seconds {want}"
        )));
    }
}
