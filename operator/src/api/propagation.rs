//! `status.propagation`: how many connected proxies run an object's current generation.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How far the object's current `metadata.generation` has reached the proxies, summed over
/// every operator replica's discovery streams. Counts only, never a list of proxies
/// (`trellis check --proxy` lists the ones that lag). Written at most every few seconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PropagationStatus {
    /// The `metadata.generation` counted.
    pub generation: i64,
    /// Proxies that applied that generation.
    pub updated: i64,
    /// Connected proxies the object affects: every proxy for the Mesh; the proxies of the
    /// namespace for a PeerAuthentication (every proxy for the mesh-wide one); the proxies
    /// subscribed to the target Service over the discovery stream for a TrafficPolicy.
    pub total: i64,
}
