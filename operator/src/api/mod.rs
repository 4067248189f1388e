//! The Trellis API, `trellis.dev/v1alpha1`: what users write.
//!
//! Every field carries a `///` comment because kube's derive turns it into the OpenAPI
//! description that `kubectl explain` prints. The CRD YAML in `crds/` is generated from these
//! types (`trellis crds`) and a test fails when it drifts.

pub mod conditions;
pub mod mesh;
pub mod peer_authentication;
pub mod propagation;
pub mod traffic_policy;

pub use conditions::{Condition, ConditionStatus};
pub use mesh::{Mesh, MeshSpec, MeshStatus};
pub use peer_authentication::{
    PeerAuthentication, PeerAuthenticationSpec, PeerAuthenticationStatus,
};
pub use propagation::PropagationStatus;
pub use traffic_policy::{TrafficPolicy, TrafficPolicySpec, TrafficPolicyStatus};

/// API group of every Trellis kind.
pub const GROUP: &str = "trellis.dev";
/// API version of every Trellis kind.
pub const VERSION: &str = "v1alpha1";
/// The only Mesh name the operator acts on.
pub const MESH_NAME: &str = "default";
/// Field manager for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "trellis-operator";

/// The CEL rule every duration field carries: the string must match
/// [`crate::duration::PATTERN`], the grammar [`crate::duration::parse`] accepts.
pub(crate) fn duration_rule() -> kube::core::Rule {
    kube::core::Rule::new(format!("self.matches('{}')", crate::duration::PATTERN))
        .message("must be a duration such as 500ms, 2s, 1m30s or 24h")
}

/// Every CRD, in the order `trellis crds` prints them.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    vec![Mesh::crd(), TrafficPolicy::crd(), PeerAuthentication::crd()]
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_crd_generates() {
        let crds = super::crds();
        assert_eq!(crds.len(), 3);
        for crd in crds {
            assert_eq!(crd.spec.group, super::GROUP);
        }
    }
}
