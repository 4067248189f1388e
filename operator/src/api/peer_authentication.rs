//! `PeerAuthentication`: which traffic a workload accepts (mTLS mode).

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::conditions::Condition;
use super::mesh::LabelSelector;

/// Inbound mTLS mode for workloads. Precedence: a policy with a `selector` beats the namespace's
/// policy without one, which beats the mesh-wide policy (one in the operator's root namespace);
/// `portLevelMtls` beats the workload mode; `Unset` inherits from the next level.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    kind = "PeerAuthentication",
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
    /// Per container-port mode overrides. Only allowed with a `selector`.
    #[serde(default)]
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
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationStatus {
    /// `Accepted`, `Programmed`, `Ready`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The generation the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
