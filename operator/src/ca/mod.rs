//! The mesh CA: the authority that signs workload and serving certificates
//! ([`authority`]), in-memory serving certificates renewed before expiry ([`serving`]), and
//! the Mesh reconcile that keeps the CA Secret, the trust bundles and the root rotation state
//! ([`reconcile`]).

pub mod authority;
pub mod reconcile;

pub mod serving;

use std::sync::Arc;
use std::time::Duration;

pub use authority::{CaError, CertificateAuthority, Issued};

/// What the identity endpoint and the serving certificates sign with right now. The Mesh
/// reconcile publishes a new value on a `watch` channel when the signing root changes (root
/// rotation) or the bundle gains/loses a root; `None` until the CA is ready.
#[derive(Debug, Clone)]
pub struct IssuerState {
    /// The CA that signs new certificates.
    pub ca: Arc<CertificateAuthority>,
    /// Every root peers must trust right now, PEM (both roots during a rotation).
    pub trust_bundle_pem: String,
    /// The mesh trust domain (`spiffe://<td>/...`).
    pub trust_domain: String,
    /// Lifetime of workload certificates (Mesh `workloadCertTtl`).
    pub workload_ttl: Duration,
}

/// The issuer channel's receiving end.
pub type IssuerRx = tokio::sync::watch::Receiver<Option<Arc<IssuerState>>>;
/// The issuer channel's sending end.
pub type IssuerTx = tokio::sync::watch::Sender<Option<Arc<IssuerState>>>;
