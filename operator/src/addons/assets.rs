//! PLACEHOLDER until wt/dash lands: the dashboards and alert rules, with exactly the API the
//! dashboards branch exposes (`dashboards()`, `Dashboard`, `ALERT_RULES`), one tiny dashboard
//! and one alert, so the addon reconcile compiles and can be tested. The merge takes theirs.

/// One Grafana dashboard, as JSON with a stable UID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dashboard {
    /// Grafana's dashboard UID (stable: links and bookmarks use it).
    pub uid: &'static str,
    /// The file (and ConfigMap key) the dashboard is provisioned from.
    pub file_name: &'static str,
    pub title: &'static str,
    pub json: &'static str,
}

const OVERVIEW: Dashboard = Dashboard {
    uid: "trellis-mesh-overview",
    file_name: "trellis-mesh-overview.json",
    title: "Trellis / Mesh overview",
    json: r#"{"uid":"trellis-mesh-overview","title":"Trellis / Mesh overview","schemaVersion":39,"panels":[{"type":"timeseries","title":"Requests per second","targets":[{"expr":"sum(rate(trellis_proxy_requests_total[1m]))"}]}]}"#,
};

/// Every Trellis dashboard.
pub fn dashboards() -> &'static [Dashboard] {
    &[OVERVIEW]
}

/// The Trellis alerts, a Prometheus rule file (`groups:`).
pub const ALERT_RULES: &str = r#"groups:
  - name: trellis
    rules:
      - alert: TrellisProxyDown
        expr: up{job="trellis-proxies"} == 0
        for: 5m
        labels:
          severity: warning
        annotations:
          summary: A Trellis sidecar's metrics cannot be scraped
"#;
