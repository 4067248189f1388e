//! The observability addons `Mesh.spec.observability` asks for: what the operator integrates with
//! (Prometheus Operator objects, `prometheus.io` annotations, Grafana dashboard ConfigMaps) and
//! what it installs for evaluation (Prometheus, Grafana, Jaeger). Desired objects are built by
//! pure code from the Mesh; one applier converges them.
pub mod assets;
pub mod images;
