//! Which pods are meshed: the one predicate the webhook configuration, the injector and the
//! compiler share.
//!
//! Three places must agree on it, and used to disagree: the API server calls the webhook only
//! for pods the `MutatingWebhookConfiguration` selects ([`super::webhook_config`]), the injector
//! decides per pod ([`super::inject`]), and the compiler and the CA write the `trellis-proxy`
//! and `trellis-trust-bundle` ConfigMaps the injected pod mounts (`crate::compiler`). A pod
//! injected in a namespace without those ConfigMaps never starts; a namespace with ConfigMaps
//! whose pods the webhook never sees is meshed on paper only.
//!
//! The rule, in one place:
//! - a namespace is **excluded** when it is a system namespace ([`SYSTEM_NAMESPACES`]), the
//!   operator's own, or in the Mesh's `excludedNamespaces`: nothing there is ever injected;
//! - a namespace is **selected** when it is not excluded, its labels match the Mesh's
//!   `namespaceSelector` (default `trellis.dev/inject: enabled`), and it is not labelled
//!   `trellis.dev/inject: disabled`. With a custom selector, the `trellis.dev/inject: enabled`
//!   label alone does not select a namespace: the selector is the whole rule;
//! - a pod of a selected namespace is injected unless it opts out (`trellis.dev/inject:
//!   disabled`, annotation or label); a pod of any other non-excluded namespace is injected
//!   when it carries the label `trellis.dev/inject: enabled` (the API server can only select
//!   by labels), or the annotation in `trellis inject`;
//! - a namespace needs the ConfigMaps when it is selected or holds a pod that is injected or
//!   labelled to be ([`namespace_needs_config`]).
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

use crate::api::MeshSpec;

/// `trellis.dev/inject: enabled|disabled` on a namespace (label) or pod (annotation or label).
pub const INJECT: &str = "trellis.dev/inject";
/// The annotation the injector writes on every pod it injected.
pub const PROXY_VERSION: &str = "trellis.dev/proxy-version";
/// Namespaces never meshed, whatever their labels say.
pub const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];
/// The label the API server sets on every namespace to its name; the webhook configuration
/// excludes namespaces by it.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The predicate for one Mesh spec and operator namespace.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    pub mesh: &'a MeshSpec,
    pub operator_namespace: &'a str,
}

impl<'a> Scope<'a> {
    pub fn new(mesh: &'a MeshSpec, operator_namespace: &'a str) -> Self {
        Self {
            mesh,
            operator_namespace,
        }
    }

    /// Nothing in this namespace is ever injected or configured.
    pub fn namespace_excluded(&self, name: &str) -> bool {
        SYSTEM_NAMESPACES.contains(&name)
            || name == self.operator_namespace
            || self
                .mesh
                .injection
                .excluded_namespaces
                .iter()
                .any(|n| n == name)
    }

    /// Every excluded namespace, sorted (the webhook configuration lists them).
    pub fn excluded_namespaces(&self) -> Vec<String> {
        let mut v: Vec<String> = SYSTEM_NAMESPACES
            .iter()
            .map(|s| s.to_string())
            .chain([self.operator_namespace.to_string()])
            .chain(self.mesh.injection.excluded_namespaces.iter().cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The labels a selected namespace must carry (the Mesh's `namespaceSelector`, default
    /// `trellis.dev/inject: enabled`).
    pub fn namespace_match_labels(&self) -> BTreeMap<String, String> {
        match &self.mesh.injection.namespace_selector {
            Some(sel) => sel.match_labels.clone(),
            None => BTreeMap::from([(INJECT.to_string(), "enabled".to_string())]),
        }
    }

    /// The label requirements that complete [`namespace_match_labels`](Self::namespace_match_labels)
    /// in the webhook configuration: not excluded by name, not labelled `disabled`.
    pub fn namespace_match_expressions(&self) -> Vec<LabelSelectorRequirement> {
        vec![
            LabelSelectorRequirement {
                key: NAMESPACE_NAME_LABEL.into(),
                operator: "NotIn".into(),
                values: Some(self.excluded_namespaces()),
            },
            LabelSelectorRequirement {
                key: INJECT.into(),
                operator: "NotIn".into(),
                values: Some(vec!["disabled".into()]),
            },
        ]
    }

    /// Whether the namespace's pods are injected by default.
    pub fn namespace_selected(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        !self.namespace_excluded(name)
            && labels.get(INJECT).map(String::as_str) != Some("disabled")
            && self
                .namespace_match_labels()
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// Whether a pod carries the injector's mark or the label that opts it in anywhere: its
/// namespace then needs the ConfigMaps the sidecar mounts, selected or not.
pub fn pod_wants_proxy(
    labels: Option<&BTreeMap<String, String>>,
    annotations: Option<&BTreeMap<String, String>>,
) -> bool {
    annotations.is_some_and(|a| a.contains_key(PROXY_VERSION))
        || labels.is_some_and(|l| l.get(INJECT).map(String::as_str) == Some("enabled"))
}

/// Whether a namespace gets the `trellis-proxy` and `trellis-trust-bundle` ConfigMaps: it is
/// selected, or (not excluded and) holds a pod for which [`pod_wants_proxy`] holds.
pub fn namespace_needs_config(
    scope: &Scope<'_>,
    name: &str,
    labels: &BTreeMap<String, String>,
    holds_opted_in_pod: bool,
) -> bool {
    scope.namespace_selected(name, labels)
        || (holds_opted_in_pod && !scope.namespace_excluded(name))
}
