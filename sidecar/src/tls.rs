//! Mesh mTLS: rustls configs that authenticate peers by SPIFFE ID, and PEM credentials.
//!
//! Both directions require TLS 1.3 and a certificate chaining to one of the trust-bundle roots
//! in [`Credentials::roots`] (several during a root rotation). Names are SPIFFE IDs in a URI
//! SAN, never DNS names, so:
//! - the server side wraps rustls' `WebPkiClientVerifier` (chain, validity, clientAuth EKU) and
//!   then requires exactly one URI SAN, a `spiffe://` ID in our own trust domain;
//! - the client side cannot use the stock server verifier (it wants a DNS name matching the
//!   `ServerName`), so it checks the chain with `verify_server_cert_signed_by_trust_anchor` and
//!   then requires the peer's SPIFFE ID to be one the config expects. The `ServerName` passed to
//!   `connect` is therefore a fixed placeholder ([`mesh_server_name`]) and is not checked.
//!
//! Signatures are verified with the ring provider, the one provider of the workspace.
//!
//! Configs are built from one `Credentials` snapshot; callers build a fresh config (or cache
//! one per snapshot) for new connections, so a renewed certificate or a rotated bundle applies
//! to new connections only and established ones are never torn down.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::creds::{Credentials, CredentialsTx};

/// Everything that can go wrong building TLS configs or loading credentials.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: invalid PEM: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("{0}: no PEM block found")]
    Empty(&'static str),
    #[error("certificate is not valid X.509: {0}")]
    Certificate(String),
    #[error("certificate has no single spiffe:// URI SAN: {0}")]
    NoSpiffeId(String),
    #[error("private key does not match the certificate: {0}")]
    KeyMismatch(String),
    #[error("trust bundle root refused: {0}")]
    BadRoot(String),
    #[error("TLS config: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The ring provider, shared: one crypto provider for the whole workspace.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The `ServerName` to pass to `TlsConnector::connect` for mesh connections. Our verifier
/// authenticates by SPIFFE ID, so this is never matched against the certificate; it only ends
/// up in SNI, and `.invalid` guarantees it never resolves or means anything elsewhere.
pub fn mesh_server_name() -> ServerName<'static> {
    ServerName::try_from("mesh.trellis.invalid").expect("static DNS name")
}

/// The trust domain of a SPIFFE ID (`spiffe://<td>/...` -> `<td>`).
pub fn trust_domain(spiffe_id: &str) -> Option<&str> {
    let rest = spiffe_id.strip_prefix("spiffe://")?;
    let td = rest.split('/').next()?;
    (!td.is_empty()).then_some(td)
}

fn root_store(roots: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, TlsError> {
    if roots.is_empty() {
        return Err(TlsError::Empty("trust bundle"));
    }
    let mut store = RootCertStore::empty();
    for root in roots {
        store
            .add(root.clone())
            .map_err(|e| TlsError::BadRoot(e.to_string()))?;
    }
    Ok(Arc::new(store))
}

fn our_trust_domain(creds: &Credentials) -> Result<String, TlsError> {
    trust_domain(&creds.spiffe_id)
        .map(str::to_string)
        .ok_or_else(|| TlsError::NoSpiffeId(creds.spiffe_id.clone()))
}

/// The inbound (server) config: TLS 1.3 only, a client certificate is mandatory, must chain to
/// `creds.roots` and carry exactly one `spiffe://` URI SAN in our trust domain. Which workloads
/// may call which is authorization, decided later from [`peer_spiffe_id`].
pub fn server_config(creds: &Credentials, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let inner =
        WebPkiClientVerifier::builder_with_provider(root_store(&creds.roots)?, provider.clone())
            .build()?;
    let verifier = Arc::new(SpiffeClientVerifier {
        inner,
        trust_domain: our_trust_domain(creds)?,
    });
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.cert_chain.clone(), creds.key.clone_key())?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// The outbound (client) config: presents our chain and accepts a server whose certificate
/// chains to `creds.roots` and whose SPIFFE ID is one of `expected`.
///
/// An empty `expected` means "any workload of our trust domain": the destination's identities
/// are unknown (for example a Service the operator has not described yet), but the peer must
/// still hold a certificate from the mesh CA. Pass the real list whenever the config has one.
pub fn client_config(
    creds: &Credentials,
    expected: &[String],
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: root_store(&creds.roots)?,
        expected: expected.to_vec(),
        trust_domain: our_trust_domain(creds)?,
        algs: provider.signature_verification_algorithms,
    });
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(creds.cert_chain.clone(), creds.key.clone_key())?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// Whether a server chain seen earlier (leaf first) would still be accepted now by
/// [`client_config`] built from `creds` with `expected`: valid at this moment and chaining to a
/// root still in the bundle. The connection pool asks this when the credentials change, so a
/// connection whose peer's root left the bundle takes no more requests.
pub fn verify_server_chain(
    creds: &Credentials,
    chain: &[CertificateDer<'_>],
    expected: &[String],
) -> Result<(), TlsError> {
    let (end_entity, intermediates) = chain
        .split_first()
        .ok_or_else(|| TlsError::Certificate("empty chain".into()))?;
    let verifier = SpiffeServerVerifier {
        roots: root_store(&creds.roots)?,
        expected: expected.to_vec(),
        trust_domain: our_trust_domain(creds)?,
        algs: provider().signature_verification_algorithms,
    };
    verifier.verify_server_cert(
        end_entity,
        intermediates,
        &mesh_server_name(),
        &[],
        UnixTime::now(),
    )?;
    Ok(())
}

/// Whether a client chain seen earlier (leaf first) would still be accepted now by
/// [`server_config`] built from `creds`: valid at this moment, chaining to a root still in the
/// bundle, with a SPIFFE ID of our trust domain. Inbound connections ask this when the
/// credentials change, so a caller whose root left the bundle is cut off.
pub fn verify_client_chain(
    creds: &Credentials,
    chain: &[CertificateDer<'_>],
) -> Result<(), TlsError> {
    let (end_entity, intermediates) = chain
        .split_first()
        .ok_or_else(|| TlsError::Certificate("empty chain".into()))?;
    let inner = WebPkiClientVerifier::builder_with_provider(root_store(&creds.roots)?, provider())
        .build()?;
    let verifier = SpiffeClientVerifier {
        inner,
        trust_domain: our_trust_domain(creds)?,
    };
    verifier.verify_client_cert(end_entity, intermediates, UnixTime::now())?;
    Ok(())
}

/// The peer's SPIFFE ID (from its leaf's single URI SAN), once the handshake is done.
pub fn peer_spiffe_id(conn: &CommonState) -> Option<String> {
    spiffe_id_of(conn.peer_certificates()?.first()?).ok()
}

/// The SPIFFE ID of a certificate: exactly one URI SAN, and it starts with `spiffe://`.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    let (_, x509) =
        X509Certificate::from_der(cert).map_err(|e| TlsError::Certificate(e.to_string()))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| TlsError::Certificate(e.to_string()))?
        .ok_or_else(|| TlsError::NoSpiffeId("no subjectAltName".into()))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] if trust_domain(one).is_some() => Ok((*one).to_string()),
        [one] => Err(TlsError::NoSpiffeId(format!("URI SAN {one:?}"))),
        many => Err(TlsError::NoSpiffeId(format!("{} URI SANs", many.len()))),
    }
}

/// The leaf's notAfter.
pub fn not_after_of(cert: &CertificateDer<'_>) -> Result<SystemTime, TlsError> {
    let (_, x509) =
        X509Certificate::from_der(cert).map_err(|e| TlsError::Certificate(e.to_string()))?;
    let secs = x509.validity().not_after.timestamp();
    let secs =
        u64::try_from(secs).map_err(|_| TlsError::Certificate("notAfter before 1970".into()))?;
    Ok(UNIX_EPOCH + Duration::from_secs(secs))
}

fn rustls_err(e: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

fn check_trust_domain(id: &str, ours: &str) -> Result<(), rustls::Error> {
    if trust_domain(id) == Some(ours) {
        Ok(())
    } else {
        Err(rustls_err(TlsError::NoSpiffeId(format!(
            "{id} is not in trust domain {ours}"
        ))))
    }
}

/// `WebPkiClientVerifier` plus the SPIFFE ID check.
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = spiffe_id_of(end_entity).map_err(rustls_err)?;
        check_trust_domain(&id, &self.trust_domain)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Chain check against the trust bundle plus "the SPIFFE ID is one we expect".
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<String>,
    trust_domain: String,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let id = spiffe_id_of(end_entity).map_err(rustls_err)?;
        // With no expected list, the peer must at least be in our trust domain; an explicit
        // list is an exact match (and may name another, federated, trust domain).
        if self.expected.is_empty() {
            check_trust_domain(&id, &self.trust_domain)?;
        } else if !self.expected.contains(&id) {
            return Err(rustls_err(TlsError::NoSpiffeId(format!(
                "peer is {id}, expected one of {:?}",
                self.expected
            ))));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Parses PEM credentials (chain: leaf first; one PKCS#8/SEC1 key; bundle: one or more roots)
/// and checks they belong together: the key matches the leaf and the leaf names a SPIFFE ID.
/// The chain is not verified against the bundle here; peers do that, and during a root
/// rotation our own leaf may legitimately chain to a root the bundle only just gained.
pub fn credentials_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    bundle_pem: &[u8],
) -> Result<Credentials, TlsError> {
    let certs =
        |what: &'static str, pem: &[u8]| -> Result<Vec<CertificateDer<'static>>, TlsError> {
            let v = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TlsError::Pem {
                    what,
                    detail: e.to_string(),
                })?;
            if v.is_empty() {
                return Err(TlsError::Empty(what));
            }
            Ok(v)
        };
    let cert_chain = certs("certificate chain", cert_pem)?;
    let roots = certs("trust bundle", bundle_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
        what: "private key",
        detail: e.to_string(),
    })?;
    credentials_from_parts(cert_chain, key, roots)
}

/// Assembles credentials from DER parts with the same checks as [`credentials_from_pem`]:
/// non-empty chain and bundle, the key matches the leaf, the leaf names one SPIFFE ID.
pub fn credentials_from_parts(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Vec<CertificateDer<'static>>,
) -> Result<Credentials, TlsError> {
    if cert_chain.is_empty() {
        return Err(TlsError::Empty("certificate chain"));
    }
    let signing_key = provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::KeyMismatch(e.to_string()))?;
    CertifiedKey::new(cert_chain.clone(), signing_key)
        .keys_match()
        .map_err(|e| TlsError::KeyMismatch(e.to_string()))?;
    // Refuse a bundle rustls would refuse later, so a bad bundle never replaces a good one.
    root_store(&roots)?;
    let spiffe_id = spiffe_id_of(&cert_chain[0])?;
    let not_after = not_after_of(&cert_chain[0])?;
    Ok(Credentials {
        spiffe_id,
        cert_chain,
        key,
        roots,
        not_after,
    })
}

/// Parses every certificate in a PEM bundle (may be empty).
pub fn parse_pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what: "certificates",
            detail: e.to_string(),
        })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads `--cert-file`, `--key-file` and the trust bundle from disk.
pub fn load_pem_credentials(
    cert_path: &Path,
    key_path: &Path,
    bundle_path: &Path,
) -> Result<Credentials, TlsError> {
    credentials_from_pem(&read(cert_path)?, &read(key_path)?, &read(bundle_path)?)
}

/// How often the PEM files are checked when their directories cannot be watched (see
/// [`crate::fswatch`]); watched, they are checked when something in them changes. Once a
/// second: certificates are renewed hours before they expire, so a faster poll only costs an
/// idle proxy wake-ups and reads.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Publishes the credentials in the three files on `tx` whenever their content changes, until
/// every receiver is gone. A change is only published when the files parse and the key matches
/// the certificate, so a half-written or mismatched pair (cert updated, key not yet) is never
/// published: the previous credentials stay until the next change makes the set consistent.
/// The files' directories are watched with their own inotify instance: this is the
/// `--cert-file` mode (local meshes, tests), one per proxy.
pub async fn watch_pem_files(cert: PathBuf, key: PathBuf, bundle: PathBuf, tx: CredentialsTx) {
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop_watch = stop.clone().drop_guard();
    let dirs = [&cert, &key, &bundle]
        .iter()
        .map(|p| match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        })
        .collect();
    let mut changes = crate::fswatch::spawn(dirs, stop);
    // Content of the last set we acted on (published or reported), so errors are logged once.
    let mut last: Option<[Vec<u8>; 3]> = None;
    loop {
        if tx.is_closed() {
            return;
        }
        let current = (|| Ok::<_, TlsError>([read(&cert)?, read(&key)?, read(&bundle)?]))();
        match current {
            Ok(contents) if last.as_ref() != Some(&contents) => {
                match credentials_from_pem(&contents[0], &contents[1], &contents[2]) {
                    Ok(creds) => {
                        tracing::info!(
                            spiffe_id = %creds.spiffe_id,
                            roots = creds.roots.len(),
                            "loaded credentials from files"
                        );
                        tx.send_replace(Some(Arc::new(creds)));
                    }
                    Err(error) => {
                        tracing::warn!(%error, "credential files are not usable yet; keeping the current ones")
                    }
                }
                last = Some(contents);
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, "credential files not readable yet"),
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = changes.changed(POLL_INTERVAL) => {}
        }
    }
}

/// Test fixtures shared by this module's tests and the identity tests: a CA and leaves.
#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    use time::OffsetDateTime;

    pub struct TestCa {
        pub issuer: Issuer<'static, KeyPair>,
        pub der: CertificateDer<'static>,
    }

    impl TestCa {
        pub fn new(name: &str) -> Self {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::default();
            p.distinguished_name.push(DnType::CommonName, name);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let der = p.self_signed(&key).unwrap().der().clone();
            TestCa {
                issuer: Issuer::new(p, key),
                der,
            }
        }

        /// A leaf for `id`, valid for `validity` around now (negative start = in the past).
        pub fn leaf_between(
            &self,
            id: &str,
            not_before: OffsetDateTime,
            not_after: OffsetDateTime,
        ) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::default();
            p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            p.not_before = not_before;
            p.not_after = not_after;
            let cert = p.signed_by(&key, &self.issuer).unwrap();
            (
                cert.der().clone(),
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
        }

        pub fn creds(&self, id: &str, roots: &[&TestCa]) -> Credentials {
            let now = OffsetDateTime::now_utc();
            self.creds_between(
                id,
                roots,
                now - time::Duration::minutes(1),
                now + time::Duration::hours(1),
            )
        }

        pub fn creds_between(
            &self,
            id: &str,
            roots: &[&TestCa],
            not_before: OffsetDateTime,
            not_after: OffsetDateTime,
        ) -> Credentials {
            let (cert, key) = self.leaf_between(id, not_before, not_after);
            Credentials {
                spiffe_id: id.to_string(),
                not_after: not_after_of(&cert).unwrap(),
                cert_chain: vec![cert],
                key,
                roots: roots.iter().map(|r| r.der.clone()).collect(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::TestCa;
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    const A: &str = "spiffe://cluster.local/ns/shop/sa/a";
    const B: &str = "spiffe://cluster.local/ns/shop/sa/b";

    /// Runs a real TLS 1.3 handshake over an in-memory pipe and one request/response byte
    /// exchange. Returns (server result with the peer ID it saw, client result).
    async fn exchange(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> (
        Result<Option<String>, String>,
        Result<Option<String>, String>,
    ) {
        let (c, s) = tokio::io::duplex(16 * 1024);
        let srv = async move {
            let mut tls = TlsAcceptor::from(server)
                .accept(s)
                .await
                .map_err(|e| e.to_string())?;
            let peer = peer_spiffe_id(tls.get_ref().1);
            let mut b = [0u8; 4];
            tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            Ok(peer)
        };
        let cli = async move {
            let mut tls = TlsConnector::from(client)
                .connect(mesh_server_name(), c)
                .await
                .map_err(|e| e.to_string())?;
            let peer = peer_spiffe_id(tls.get_ref().1);
            tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
            let mut b = [0u8; 4];
            tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            assert_eq!(&b, b"pong");
            Ok(peer)
        };
        tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(srv, cli) })
            .await
            .expect("handshake hung")
    }

    #[tokio::test]
    async fn right_id_is_accepted_both_ways() {
        let ca = TestCa::new("root");
        let a = ca.creds(A, &[&ca]);
        let b = ca.creds(B, &[&ca]);
        let (s, c) = exchange(
            server_config(&b, &[b"h2"]).unwrap(),
            client_config(&a, &[B.to_string()], &[b"h2"]).unwrap(),
        )
        .await;
        assert_eq!(s.unwrap().as_deref(), Some(A));
        assert_eq!(c.unwrap().as_deref(), Some(B));
    }

    #[tokio::test]
    async fn wrong_spiffe_id_is_refused_by_client() {
        let ca = TestCa::new("root");
        let a = ca.creds(A, &[&ca]);
        let b = ca.creds(B, &[&ca]);
        let (_, c) = exchange(
            server_config(&b, &[]).unwrap(),
            client_config(&a, &["spiffe://cluster.local/ns/shop/sa/other".into()], &[]).unwrap(),
        )
        .await;
        let err = c.unwrap_err();
        assert!(err.contains("expected one of"), "{err}");
    }

    #[tokio::test]
    async fn other_trust_domain_is_refused_by_server() {
        let ca = TestCa::new("root");
        let server = ca.creds(B, &[&ca]);
        let foreign = ca.creds("spiffe://evil.example/ns/shop/sa/a", &[&ca]);
        let (s, _) = exchange(
            server_config(&server, &[]).unwrap(),
            client_config(&foreign, &[B.into()], &[]).unwrap(),
        )
        .await;
        let err = s.unwrap_err();
        assert!(err.contains("not in trust domain"), "{err}");
    }

    #[tokio::test]
    async fn unknown_ca_is_refused_both_ways() {
        let ca = TestCa::new("root");
        let rogue = TestCa::new("rogue");
        let good = ca.creds(B, &[&ca]);
        // A client whose leaf comes from a CA the server does not trust.
        let bad_client = rogue.creds(A, &[&ca]);
        let (s, _) = exchange(
            server_config(&good, &[]).unwrap(),
            client_config(&bad_client, &[B.into()], &[]).unwrap(),
        )
        .await;
        assert!(s.unwrap_err().contains("UnknownIssuer"));
        // A server whose leaf comes from an untrusted CA.
        let bad_server = rogue.creds(B, &[&ca]);
        let client = ca.creds(A, &[&ca]);
        let (_, c) = exchange(
            server_config(&bad_server, &[]).unwrap(),
            client_config(&client, &[B.into()], &[]).unwrap(),
        )
        .await;
        assert!(c.unwrap_err().contains("UnknownIssuer"));
    }

    #[tokio::test]
    async fn missing_client_cert_is_refused() {
        let ca = TestCa::new("root");
        let server = ca.creds(B, &[&ca]);
        // Same server verification as a mesh client, but no certificate to present.
        let anonymous = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots: root_store(&server.roots).unwrap(),
                expected: vec![B.into()],
                trust_domain: "cluster.local".into(),
                algs: provider().signature_verification_algorithms,
            }))
            .with_no_client_auth();
        let (s, _) = exchange(server_config(&server, &[]).unwrap(), Arc::new(anonymous)).await;
        let err = s.unwrap_err();
        assert!(err.contains("peer sent no certificates"), "{err}");
    }

    #[tokio::test]
    async fn two_roots_in_bundle_both_accepted() {
        let old = TestCa::new("old");
        let new = TestCa::new("new");
        let server_old = old.creds(B, &[&old, &new]);
        let server_new = new.creds(B, &[&old, &new]);
        let client_old = old.creds(A, &[&old, &new]);
        let client_new = new.creds(A, &[&old, &new]);
        for (srv, cli) in [
            (&server_old, &client_new),
            (&server_new, &client_old),
            (&server_new, &client_new),
            (&server_old, &client_old),
        ] {
            let (s, c) = exchange(
                server_config(srv, &[]).unwrap(),
                client_config(cli, &[B.into()], &[]).unwrap(),
            )
            .await;
            assert_eq!(s.unwrap().as_deref(), Some(A));
            assert_eq!(c.unwrap().as_deref(), Some(B));
        }
        // Once the old root leaves the bundle, its leaves are refused.
        let server_new_only = new.creds(B, &[&new]);
        let (s, _) = exchange(
            server_config(&server_new_only, &[]).unwrap(),
            client_config(&client_old, &[B.into()], &[]).unwrap(),
        )
        .await;
        assert!(s.is_err());
    }

    #[tokio::test]
    async fn expired_leaf_is_refused_both_ways() {
        let ca = TestCa::new("root");
        let now = time::OffsetDateTime::now_utc();
        let expired = |id| {
            ca.creds_between(
                id,
                &[&ca],
                now - time::Duration::hours(2),
                now - time::Duration::hours(1),
            )
        };
        let (s, _) = exchange(
            server_config(&ca.creds(B, &[&ca]), &[]).unwrap(),
            client_config(&expired(A), &[B.into()], &[]).unwrap(),
        )
        .await;
        let err = s.unwrap_err();
        assert!(err.contains("certificate expired"), "{err}");
        let (_, c) = exchange(
            server_config(&expired(B), &[]).unwrap(),
            client_config(&ca.creds(A, &[&ca]), &[B.into()], &[]).unwrap(),
        )
        .await;
        let err = c.unwrap_err();
        assert!(err.contains("certificate expired"), "{err}");
    }

    #[tokio::test]
    async fn alpn_is_negotiated() {
        let ca = TestCa::new("root");
        let (srv_cfg, cli_cfg) = (
            server_config(&ca.creds(B, &[&ca]), &[b"h2", b"http/1.1"]).unwrap(),
            client_config(&ca.creds(A, &[&ca]), &[B.into()], &[b"h2"]).unwrap(),
        );
        let (c, s) = tokio::io::duplex(16 * 1024);
        let (srv, cli) = tokio::join!(
            TlsAcceptor::from(srv_cfg).accept(s),
            TlsConnector::from(cli_cfg).connect(mesh_server_name(), c)
        );
        assert_eq!(srv.unwrap().get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(cli.unwrap().get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    }

    fn pem(tag: &str, der: &[u8]) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut out = format!("-----BEGIN {tag}-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).unwrap());
            out.push('\n');
        }
        out.push_str(&format!("-----END {tag}-----\n"));
        out
    }

    fn write_set(dir: &Path, ca: &TestCa, id: &str) -> (String, String) {
        let now = time::OffsetDateTime::now_utc();
        let (cert, key) = ca.leaf_between(
            id,
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        );
        let (c, k) = (
            pem("CERTIFICATE", &cert),
            pem("PRIVATE KEY", key.secret_der()),
        );
        std::fs::write(dir.join("ca.pem"), pem("CERTIFICATE", &ca.der)).unwrap();
        std::fs::write(dir.join("tls.crt"), &c).unwrap();
        std::fs::write(dir.join("tls.key"), &k).unwrap();
        (c, k)
    }

    #[test]
    fn loads_pem_and_refuses_mismatched_key_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("root");
        write_set(dir.path(), &ca, A);
        let p = |n| dir.path().join(n);
        let creds = load_pem_credentials(&p("tls.crt"), &p("tls.key"), &p("ca.pem")).unwrap();
        assert_eq!(creds.spiffe_id, A);
        assert_eq!(creds.roots.len(), 1);
        assert!(creds.not_after > SystemTime::now());

        let (_, other_key) = write_set(tempfile::tempdir().unwrap().path(), &ca, B);
        std::fs::write(p("tls.key"), other_key).unwrap();
        let err = load_pem_credentials(&p("tls.crt"), &p("tls.key"), &p("ca.pem")).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch(_)), "{err}");

        std::fs::write(p("ca.pem"), "not pem").unwrap();
        assert!(load_pem_credentials(&p("tls.crt"), &p("tls.key"), &p("ca.pem")).is_err());
        assert!(matches!(
            load_pem_credentials(&p("missing"), &p("tls.key"), &p("ca.pem")),
            Err(TlsError::Io { .. })
        ));
    }

    /// Mirrors kubelet's projected-volume layout: files are symlinks into `..data`, which is
    /// itself a symlink swapped atomically to a new timestamped directory.
    #[tokio::test]
    async fn watcher_follows_kubelet_symlink_swaps_and_skips_mismatched_pairs() {
        use std::os::unix::fs::symlink;
        let root = tempfile::tempdir().unwrap();
        let ca = TestCa::new("root");
        let v1 = root.path().join("..v1");
        std::fs::create_dir(&v1).unwrap();
        write_set(&v1, &ca, A);
        symlink("..v1", root.path().join("..data")).unwrap();
        for f in ["tls.crt", "tls.key", "ca.pem"] {
            symlink(format!("..data/{f}"), root.path().join(f)).unwrap();
        }
        let (tx, mut rx) = crate::creds::channel();
        let p = |n: &str| root.path().join(n);
        let task = tokio::spawn(watch_pem_files(p("tls.crt"), p("tls.key"), p("ca.pem"), tx));
        let wait_for = |rx: &mut crate::creds::CredentialsRx, id: &'static str| {
            let mut rx = rx.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(5), async {
                    loop {
                        if let Some(c) = rx.borrow_and_update().clone()
                            && c.spiffe_id == id
                        {
                            return c;
                        }
                        rx.changed().await.unwrap();
                    }
                })
                .await
                .expect("credentials not published")
            }
        };
        wait_for(&mut rx, A).await;

        // A mismatched pair (new cert, old key) in a new version is never published.
        let v2 = root.path().join("..v2");
        std::fs::create_dir(&v2).unwrap();
        let key_a = std::fs::read_to_string(v1.join("tls.key")).unwrap();
        write_set(&v2, &ca, B);
        std::fs::write(v2.join("tls.key"), key_a).unwrap();
        symlink("..v2", root.path().join("..data.tmp")).unwrap();
        std::fs::rename(root.path().join("..data.tmp"), root.path().join("..data")).unwrap();
        tokio::time::sleep(POLL_INTERVAL * 3).await;
        assert_eq!(
            rx.borrow().as_ref().unwrap().spiffe_id,
            A,
            "mismatched pair published"
        );

        // The next version has the right key: the consistent set is published. (As kubelet
        // does it, in a new directory: a write inside the directory `..data` points to is no
        // event in the watched one and is only seen by the safety poll.)
        let v3 = root.path().join("..v3");
        std::fs::create_dir(&v3).unwrap();
        write_set(&v3, &ca, B);
        symlink("..v3", root.path().join("..data.tmp")).unwrap();
        std::fs::rename(root.path().join("..data.tmp"), root.path().join("..data")).unwrap();
        wait_for(&mut rx, B).await;

        drop(rx);
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("watcher did not stop when receivers were gone")
            .unwrap();
    }
}
