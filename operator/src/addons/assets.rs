//! The Trellis Grafana dashboards and Prometheus alert rules, as files embedded in the binary:
//! what the addons install (Grafana provisioning, `grafana_dashboard` ConfigMaps, the
//! PrometheusRule) and what users import into a Grafana or Prometheus they already run
//! (`operator/src/addons/assets/`, see docs/observability.md).
//!
//! Every query names only metrics and labels the sidecar and the operator really export, plus
//! the scrape labels `namespace`, `pod` and `app` (the workload) that `trellis stat` also relies
//! on. Three checks keep it so: the unit tests in `check` compare every dashboard query and
//! alert expression with the real registries' exposition; `promtool test rules` runs
//! `alerts_test.yaml`; and `hack/dev-e2e.sh` evaluates every query against a real Prometheus
//! scraping a `trellis dev` mesh (`check`'s ignored `live` test).

#[cfg(test)]
mod check;

/// One Grafana dashboard (JSON model, schemaVersion 41, for Grafana 12). Queries use the
/// `datasource` template variable, so the dashboard works with whichever Prometheus data source
/// the user picks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dashboard {
    /// Stable across releases: Grafana links and bookmarks point at it.
    pub uid: &'static str,
    /// The file's name, also the key in a `grafana_dashboard` ConfigMap.
    pub file_name: &'static str,
    pub title: &'static str,
    pub json: &'static str,
}

static DASHBOARDS: [Dashboard; 4] = [
    Dashboard {
        uid: "trellis-mesh",
        file_name: "trellis-mesh.json",
        title: "Trellis / Mesh",
        json: include_str!("assets/trellis-mesh.json"),
    },
    Dashboard {
        uid: "trellis-service",
        file_name: "trellis-service.json",
        title: "Trellis / Service",
        json: include_str!("assets/trellis-service.json"),
    },
    Dashboard {
        uid: "trellis-workload",
        file_name: "trellis-workload.json",
        title: "Trellis / Workload",
        json: include_str!("assets/trellis-workload.json"),
    },
    Dashboard {
        uid: "trellis-control-plane",
        file_name: "trellis-control-plane.json",
        title: "Trellis / Control plane",
        json: include_str!("assets/trellis-control-plane.json"),
    },
];

/// The Trellis dashboards: mesh overview, one Service, one workload, the control plane.
pub fn dashboards() -> &'static [Dashboard] {
    &DASHBOARDS
}

/// A Prometheus rule file (`groups:` YAML), the same text a PrometheusRule's spec carries.
pub const ALERT_RULES: &str = include_str!("assets/alerts.yaml");
