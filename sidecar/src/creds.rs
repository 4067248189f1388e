//! Workload credentials as the data path consumes them.
//!
//! Whoever provides credentials (PEM files on disk, or the identity client talking to the
//! operator) publishes them on a `tokio::sync::watch` channel. Listeners build their TLS
//! configs from the current value for each new connection, so a renewed certificate or a new
//! trust bundle is used without a restart and without touching established connections.

use std::sync::Arc;
use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

/// The proxy's identity and the roots it trusts.
#[derive(Debug)]
pub struct Credentials {
    /// The SPIFFE ID in the leaf certificate's URI SAN.
    pub spiffe_id: String,
    /// Leaf first, then intermediates.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key (ECDSA P-256). Held in memory only.
    pub key: PrivateKeyDer<'static>,
    /// The trust bundle: every root a peer's chain may end in (several during a root rotation).
    pub roots: Vec<CertificateDer<'static>>,
    /// When the leaf expires.
    pub not_after: SystemTime,
}

/// Current credentials; `None` until the first certificate is held (the proxy is not ready then).
pub type CredentialsRx = watch::Receiver<Option<Arc<Credentials>>>;
pub type CredentialsTx = watch::Sender<Option<Arc<Credentials>>>;

/// A channel with no credentials yet.
pub fn channel() -> (CredentialsTx, CredentialsRx) {
    watch::channel(None)
}
