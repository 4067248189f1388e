//! `PeerAuthentication`: which traffic a workload accepts (mTLS mode).

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::conditions::Condition;
use super::mesh::LabelSelector;

/// Inbound mTLS mode for workloads. Precedence: a policy with a `selector` beats the namespace's
/// policy without one, which beats the mesh-wide policy (one in the operator's root namespace);
/// `portLevelMtls` beats the workload mode; `Unset` inherits from the next level.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.portLevelMtls) || size(self.portLevelMtls) == 0 || has(self.selector)")
    .message("portLevelMtls needs a selector: port numbers only mean something for specific workloads"))]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    doc = "Which inbound traffic meshed workloads accept: the mTLS mode for a namespace, for workloads selected by label, or (in the mesh root namespace) for the whole mesh.",
    plural = "peerauthentications",
    shortname = "pa",
    namespaced,
    status = "PeerAuthenticationStatus",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mtls.mode"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Workloads (by pod labels) the policy applies to; omit for the whole namespace (or the whole
    /// mesh, in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// mTLS mode of the selected workloads.
    #[serde(default)]
    pub mtls: MtlsSpec,
    /// Per container-port mode overrides, keyed by container port number (`"8080"`), at most 16.
    /// Only allowed with a `selector`.
    #[serde(default)]
    #[schemars(extend("maxProperties" = 16))]
    #[x_kube(validation = Rule::new("self.all(k, k.size() <= 5 && k.matches('^[0-9]+$') && int(k) >= 1 && int(k) <= 65535)")
        .message("portLevelMtls keys must be port numbers 1 to 65535"))]
    pub port_level_mtls: BTreeMap<String, MtlsSpec>,
}

/// mTLS mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MtlsMode {
    /// Inherit from the enclosing scope (mesh-wide default: `Strict`).
    #[default]
    Unset,
    /// Accept only mTLS from meshed workloads.
    Strict,
    /// Accept mTLS and plaintext (for migrating workloads into the mesh).
    Permissive,
    /// Accept plaintext only.
    Disable,
}

/// mTLS settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MtlsSpec {
    /// `Strict`, `Permissive`, `Disable` or `Unset`.
    #[serde(default)]
    pub mode: MtlsMode,
}

/// Observed state of a PeerAuthentication.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationStatus {
    /// `Accepted`, `Programmed`, `Ready`.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The generation the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Propagation of the current generation to the connected proxies (written by the
    /// propagation writer, with the `Propagated` condition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub propagation: Option<super::propagation::PropagationStatus>,
}
