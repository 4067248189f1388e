//! The observability addons `Mesh.spec.observability` asks for: what the operator integrates with
//! (Prometheus Operator objects, `prometheus.io` annotations, Grafana dashboard ConfigMaps) and
//! what it installs for evaluation (Prometheus, Grafana, Jaeger).
//!
//! - [`desired`]: the objects, pure functions of the Mesh and the operator's namespace.
//! - [`plan`]: desired plus observed objects give what to apply, what to delete and the
//!   `ObservabilityReady` condition (pure).
//! - [`controller`]: the thin edge (discovery, lists, server-side apply, deletes, status).
//! - [`assets`]: the dashboards and alert rules; [`images`]: the pinned images.
pub mod assets;
pub mod controller;
pub mod desired;
pub mod images;
pub mod plan;

/// Field manager of every write the addon controller makes (objects and its status part).
pub const FIELD_MANAGER: &str = "trellis-operator/addons";
/// The condition the addon controller owns on the Mesh.
pub const CONDITION: &str = "ObservabilityReady";
