//! Propagation status: how many connected proxies run each Mesh, TrafficPolicy and
//! PeerAuthentication at its current `metadata.generation`, as `status.propagation` and a
//! `Propagated` condition, and which proxies lag (`trellis check --proxy`).
//!
//! # Shape
//! - [`track`] (pure): per replica, what each object's current generation needs a proxy to
//!   have applied, and how many of this replica's streams have (the per-kind meaning of
//!   "applied" is documented there).
//! - [`lag`] (pure): which proxies lag, on what (view generation, ConfigMap settings, ConfigMap
//!   TrafficPolicies) and since when.
//! - [`report`] (pure): a replica's report, the sum over replicas, the condition.
//! - [`encode`] (pure): how a report is laid out in Lease annotations (plain JSON, gzip, or
//!   shards over up to [`encode::MAX_SHARDS`] Leases past 256 KiB) and read back.
//! - [`publish`] (edge, every replica): every [`INTERVAL`] this replica's report goes into
//!   its own Lease, `trellis-propagation-<pod>`, in the operator's namespace (and its shards,
//!   `trellis-propagation-<pod>.<i>`, when it does not fit one).
//! - [`writer`] (edge, the leader): every [`INTERVAL`] the leader lists the report Leases,
//!   sums the fresh ones and writes the statuses that changed.
//!
//! # Why reports in Leases (a departure from "aggregated in memory" alone)
//! Every replica serves discovery streams (the design), so no replica alone knows the count:
//! a status written by each would be overwritten by the others with partial numbers. Each
//! replica therefore publishes its own counts and the Lease holder sums them. A Lease is the
//! object Kubernetes has for "a process says it is alive": its `renewTime` tells a live report
//! from a dead replica's (ignored after [`STALE`]; its proxies reconnect elsewhere and are
//! counted there), and the operator's Role already covers Leases in its namespace. The report
//! carries counts per object and the [`report::MAX_LISTED`] proxies longest behind, never a
//! full list (fewer only past [`encode::MAX_SHARDS`] Leases, [`report::fit`]); the status carries counts
//! only (Istio and Cilium removed per-proxy status for its cost).
//!
//! # Cost
//! One Lease patch per replica per [`INTERVAL`] at most (one per shard Lease whose bytes
//! changed when the report is sharded, so at most [`encode::MAX_SHARDS`]), and only when its
//! numbers changed (else a heartbeat every [`HEARTBEAT`]); one LIST per [`INTERVAL`] by the leader; at most one
//! status patch per object per [`INTERVAL`], latest numbers win, none when they did not change.

pub mod encode;
pub mod lag;
pub mod publish;
pub mod report;
pub mod track;
pub mod writer;

use std::time::Duration;

pub use lag::{LaggingProxy, Stale};
pub use report::{PROPAGATED, ReplicaReport, aggregate, condition};
pub use track::{ObjectCount, ObjectRef, StreamState, Tracker};

/// How often reports are published and statuses written: the "few seconds" a status may lag
/// the proxies, and the rate limit per object.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// A replica rewrites an unchanged report this often, so the leader can tell it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(30);
/// A report not renewed for this long is a dead replica's.
pub const STALE: Duration = Duration::from_secs(90);
/// Label of the report Leases (what the leader and `trellis check --proxy` list).
pub const REPORT_LABEL: &str = "trellis.dev/component";
/// Its value.
pub const REPORT_LABEL_VALUE: &str = "propagation-report";
/// Annotation holding the report (JSON, or gzip + base64: [`encode`]).
pub const REPORT_ANNOTATION: &str = "trellis.dev/propagation";
/// Field manager of both edges.
pub const FIELD_MANAGER: &str = "trellis-operator/propagation";

/// The report Lease of a replica.
pub fn lease_name(replica: &str) -> String {
    format!("trellis-propagation-{replica}")
}
