//! The pinned upstream images of the evaluation addons. They are listed once, here, because
//! three places must agree on them: the addon Deployments, the OLM bundle's `relatedImages`
//! (disconnected installs mirror exactly these), and the docs.

/// Prometheus, scraping the sidecars' admin ports (the LTS line).
pub const PROMETHEUS: &str = "quay.io/prometheus/prometheus:v3.5.0";
/// Grafana, provisioned with the Trellis dashboards and Prometheus as its data source.
pub const GRAFANA: &str = "docker.io/grafana/grafana:12.2.0";
/// Jaeger v2 all-in-one, receiving OTLP from the sidecars.
pub const JAEGER: &str = "docker.io/jaegertracing/jaeger:2.11.0";

/// Every addon image with the name the OLM bundle lists it under.
pub const ALL: [(&str, &str); 3] = [
    ("prometheus", PROMETHEUS),
    ("grafana", GRAFANA),
    ("jaeger", JAEGER),
];
