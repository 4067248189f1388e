//! The mesh CA: the authority that signs workload and serving certificates
//! ([`authority`]), and the Mesh reconcile that keeps its Secret, the trust bundles and the
//! root rotation state ([`reconcile`]).

pub mod authority;

pub use authority::{CaError, CertificateAuthority, Issued};
