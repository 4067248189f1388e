//! `trellis stat` and the dashboard's Prometheus source: the golden metrics per workload and
//! per edge, computed by Prometheus from the sidecars' counters (PromQL `rate` and
//! `histogram_quantile` over a window), as `linkerd viz stat` does.
//!
//! The queries ([`queries`]) group by the scrape labels `namespace` and `app` (the workload):
//! the labels `trellis dev`'s generated `prometheus.yml` sets, and the ones a cluster's scrape
//! configuration must set for these views. An edge is read on the caller's sidecar (outbound
//! requests by `dst_service` and `tls`); callers without a sidecar appear as the plaintext
//! requests the destination's sidecar received, from `(no sidecar)`. An opaque TCP edge
//! counts the caller's outbound connections as its requests, each a success (the sidecar
//! counts one once the connection to the destination is made, mTLS handshake included), with
//! no latency: the same reading as `trellis dev`'s graph (`dev::stats::edges_from_scrape`).
//!
//! Pure here: PromQL text, and query results -> [`Stat`]; the HTTP edge is [`prometheus`].

pub mod prometheus;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::dashboard::{Edge, Graph, Node, transport};

/// The caller of plaintext requests seen only by the destination's sidecar.
pub const NO_SIDECAR: &str = "(no sidecar)";

/// One sample of an instant vector: its labels and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    fn label(&self, k: &str) -> &str {
        self.labels.get(k).map(String::as_str).unwrap_or("")
    }

    /// `app.namespace`, the id edges use.
    fn workload(&self) -> String {
        format!("{}.{}", self.label("app"), self.label("namespace"))
    }
}

/// Which query an answer belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Query {
    EdgeRps,
    EdgeOk,
    EdgeP50,
    EdgeP99,
    /// Opaque TCP connections opened per second, by caller and destination.
    EdgeTcp,
    PlainRps,
    PlainOk,
    WorkloadRps,
    WorkloadOk,
    WorkloadP50,
    WorkloadP99,
    /// Opaque TCP connections served per second, by workload.
    WorkloadTcp,
    Refused,
}

/// Every query, with its PromQL over `window` (a Prometheus duration such as `1m`).
pub fn queries(window: &str) -> Vec<(Query, String)> {
    let req = "trellis_proxy_requests_total";
    let lat = "trellis_proxy_response_latency_seconds_bucket";
    let edge = "namespace, app, dst_service, tls";
    let q = |quantile: f64, dir: &str, by: &str| {
        format!(
            "histogram_quantile({quantile}, sum by ({by}, le) (rate({lat}{{direction=\"{dir}\"}}[{window}])))"
        )
    };
    vec![
        (
            Query::EdgeRps,
            format!("sum by ({edge}) (rate({req}{{direction=\"outbound\"}}[{window}]))"),
        ),
        (
            Query::EdgeOk,
            format!(
                "sum by ({edge}) (rate({req}{{direction=\"outbound\",status_code!~\"5..\"}}[{window}]))"
            ),
        ),
        (
            Query::EdgeP50,
            q(0.5, "outbound", "namespace, app, dst_service"),
        ),
        (
            Query::EdgeP99,
            q(0.99, "outbound", "namespace, app, dst_service"),
        ),
        (
            Query::EdgeTcp,
            format!(
                "sum by ({edge}) (rate(trellis_proxy_tcp_connections_total{{direction=\"outbound\"}}[{window}]))"
            ),
        ),
        (
            Query::PlainRps,
            format!(
                "sum by (namespace, app) (rate({req}{{direction=\"inbound\",tls=\"false\"}}[{window}]))"
            ),
        ),
        (
            Query::PlainOk,
            format!(
                "sum by (namespace, app) (rate({req}{{direction=\"inbound\",tls=\"false\",status_code!~\"5..\"}}[{window}]))"
            ),
        ),
        (
            Query::WorkloadRps,
            format!("sum by (namespace, app) (rate({req}{{direction=\"inbound\"}}[{window}]))"),
        ),
        (
            Query::WorkloadOk,
            format!(
                "sum by (namespace, app) (rate({req}{{direction=\"inbound\",status_code!~\"5..\"}}[{window}]))"
            ),
        ),
        (Query::WorkloadP50, q(0.5, "inbound", "namespace, app")),
        (Query::WorkloadP99, q(0.99, "inbound", "namespace, app")),
        (
            Query::WorkloadTcp,
            format!(
                "sum by (namespace, app) (rate(trellis_proxy_tcp_connections_total{{direction=\"inbound\"}}[{window}]))"
            ),
        ),
        (
            Query::Refused,
            format!(
                "sum by (namespace, app) (rate(trellis_proxy_inbound_refused_total[{window}]))"
            ),
        ),
    ]
}

/// Golden metrics of one workload (what its sidecars served).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadStat {
    pub workload: String,
    pub namespace: String,
    pub rps: f64,
    pub success: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Inbound connections refused per second (plaintext under `Strict`).
    pub refused_rps: f64,
}

/// Golden metrics of one edge.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EdgeStat {
    pub source: String,
    pub destination: String,
    pub mtls: bool,
    pub rps: f64,
    pub success: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// What `trellis stat` shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stat {
    pub window: String,
    pub workloads: Vec<WorkloadStat>,
    pub edges: Vec<EdgeStat>,
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// Builds the view from each query's samples.
pub fn build(window: &str, results: &BTreeMap<Query, Vec<Sample>>) -> Stat {
    let get = |q| results.get(&q).map(Vec::as_slice).unwrap_or_default();
    let ratio = |ok: Option<f64>, all: f64| (all > 0.0).then(|| ok.unwrap_or(0.0) / all);
    // Edges keyed by (source, destination, mtls).
    let key = |s: &Sample| {
        (
            s.workload(),
            s.label("dst_service").to_string(),
            s.label("tls") == "true",
        )
    };
    let mut edges: BTreeMap<(String, String, bool), EdgeStat> = BTreeMap::new();
    let ok: BTreeMap<_, f64> = get(Query::EdgeOk)
        .iter()
        .map(|s| (key(s), s.value))
        .collect();
    for s in get(Query::EdgeRps) {
        let k = key(s);
        edges.insert(
            k.clone(),
            EdgeStat {
                source: k.0.clone(),
                destination: k.1.clone(),
                mtls: k.2,
                rps: s.value,
                success: ratio(ok.get(&k).copied(), s.value),
                ..Default::default()
            },
        );
    }
    // Opaque TCP: connections are the edge's requests, each a success, added to any HTTP
    // requests to the same destination (a Service with both kinds of port).
    for s in get(Query::EdgeTcp) {
        let k = key(s);
        let e = edges.entry(k.clone()).or_insert_with(|| EdgeStat {
            source: k.0.clone(),
            destination: k.1.clone(),
            mtls: k.2,
            ..Default::default()
        });
        let ok = e.success.map_or(0.0, |r| r * e.rps) + s.value;
        e.rps += s.value;
        e.success = ratio(Some(ok), e.rps);
    }
    // Latency has no `tls` label: it goes to the mTLS edge when there is one.
    for (q, p99) in [(Query::EdgeP50, false), (Query::EdgeP99, true)] {
        for s in get(q) {
            let (src, dst) = (s.workload(), s.label("dst_service").to_string());
            let k = if edges.contains_key(&(src.clone(), dst.clone(), true)) {
                (src, dst, true)
            } else {
                (src, dst, false)
            };
            if let Some(e) = edges.get_mut(&k) {
                let v = finite(s.value).map(|v| v * 1000.0);
                if p99 { e.p99_ms = v } else { e.p50_ms = v }
            }
        }
    }
    let plain_ok: BTreeMap<String, f64> = get(Query::PlainOk)
        .iter()
        .map(|s| (s.workload(), s.value))
        .collect();
    for s in get(Query::PlainRps) {
        let dst = s.workload();
        edges.insert(
            (NO_SIDECAR.into(), dst.clone(), false),
            EdgeStat {
                source: NO_SIDECAR.into(),
                success: ratio(plain_ok.get(&dst).copied(), s.value),
                destination: dst,
                mtls: false,
                rps: s.value,
                ..Default::default()
            },
        );
    }
    let mut workloads: BTreeMap<String, WorkloadStat> = BTreeMap::new();
    let wl_ok: BTreeMap<String, f64> = get(Query::WorkloadOk)
        .iter()
        .map(|s| (s.workload(), s.value))
        .collect();
    // After `WorkloadRps`, which sets the HTTP rate that `WorkloadTcp` adds to.
    for q in [
        Query::WorkloadRps,
        Query::WorkloadTcp,
        Query::WorkloadP50,
        Query::WorkloadP99,
        Query::Refused,
    ] {
        for s in get(q) {
            let w = workloads
                .entry(s.workload())
                .or_insert_with(|| WorkloadStat {
                    workload: s.label("app").to_string(),
                    namespace: s.label("namespace").to_string(),
                    ..Default::default()
                });
            match q {
                Query::WorkloadRps => {
                    w.rps = s.value;
                    w.success = ratio(wl_ok.get(&s.workload()).copied(), s.value);
                }
                Query::WorkloadTcp => {
                    let ok = w.success.map_or(0.0, |r| r * w.rps) + s.value;
                    w.rps += s.value;
                    w.success = ratio(Some(ok), w.rps);
                }
                Query::WorkloadP50 => w.p50_ms = finite(s.value).map(|v| v * 1000.0),
                Query::WorkloadP99 => w.p99_ms = finite(s.value).map(|v| v * 1000.0),
                _ => w.refused_rps = s.value,
            }
        }
    }
    Stat {
        window: window.to_string(),
        workloads: workloads.into_values().collect(),
        edges: edges.into_values().collect(),
    }
}

/// What `trellis stat` was asked for: `deploy/NAME`, `ns/NAME`, or everything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    All,
    Workload(String),
    Namespace(String),
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some(("deploy" | "deployment" | "deployments", n)) if !n.is_empty() => {
                Ok(Target::Workload(n.into()))
            }
            Some(("ns" | "namespace" | "namespaces", n)) if !n.is_empty() => {
                Ok(Target::Namespace(n.into()))
            }
            _ => Err(format!("{s:?}: use deploy/NAME or ns/NAME")),
        }
    }
}

impl Stat {
    /// Keeps the workloads `target` names and the edges from or to them.
    pub fn filter(mut self, target: &Target, namespace: Option<&str>) -> Stat {
        let ns_ok = |ns: &str| namespace.is_none_or(|n| n == ns);
        let wl = |id: &str| -> bool {
            let (name, ns) = id.split_once('.').unwrap_or((id, ""));
            match target {
                Target::All => ns_ok(ns),
                Target::Workload(w) => w == name && ns_ok(ns),
                Target::Namespace(n) => n == ns,
            }
        };
        self.workloads
            .retain(|w| wl(&format!("{}.{}", w.workload, w.namespace)));
        self.edges.retain(|e| wl(&e.source) || wl(&e.destination));
        self
    }

    /// The table `trellis stat` prints.
    pub fn render(&self) -> String {
        let pct = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{:.2}%", v * 100.0));
        let ms = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}ms"));
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<32} {:>8} {:>8} {:>9} {:>9} {:>10}   (served, last {})",
            "WORKLOAD", "RPS", "SUCCESS", "P50", "P99", "REFUSED/S", self.window
        );
        for w in &self.workloads {
            let _ = writeln!(
                out,
                "{:<32} {:>8.2} {:>8} {:>9} {:>9} {:>10.2}",
                format!("{}.{}", w.workload, w.namespace),
                w.rps,
                pct(w.success),
                ms(w.p50_ms),
                ms(w.p99_ms),
                w.refused_rps
            );
        }
        let _ = writeln!(
            out,
            "\n{:<48} {:>8} {:>8} {:>9} {:>9}  MTLS",
            "EDGE", "RPS", "SUCCESS", "P50", "P99"
        );
        for e in &self.edges {
            let _ = writeln!(
                out,
                "{:<48} {:>8.2} {:>8} {:>9} {:>9}  {}",
                format!("{} -> {}", e.source, e.destination),
                e.rps,
                pct(e.success),
                ms(e.p50_ms),
                ms(e.p99_ms),
                if e.mtls { "yes" } else { "no" }
            );
        }
        out
    }

    /// The dashboard's model of the same numbers.
    pub fn to_graph(&self, source: &str, at_ms: i64, window_secs: f64) -> Graph {
        let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
        for w in &self.workloads {
            let id = format!("{}.{}", w.workload, w.namespace);
            nodes.insert(
                id.clone(),
                Node {
                    id,
                    name: w.workload.clone(),
                    namespace: w.namespace.clone(),
                    meshed: true,
                    identity: None,
                    peer_authentication: None,
                    traffic_policy: None,
                    refused_rps: w.refused_rps,
                },
            );
        }
        // Callers that only send (clients) have no served metrics: their outbound metrics
        // prove a sidecar. The `(no sidecar)` caller has none. A destination that served
        // nothing in the window still ends its edges; reached over mTLS it has a sidecar.
        for e in &self.edges {
            let (name, namespace) = e
                .destination
                .split_once('.')
                .unwrap_or((&e.destination, ""));
            let node = nodes.entry(e.destination.clone()).or_insert_with(|| Node {
                id: e.destination.clone(),
                name: name.to_string(),
                namespace: namespace.to_string(),
                meshed: false,
                identity: None,
                peer_authentication: None,
                traffic_policy: None,
                refused_rps: 0.0,
            });
            node.meshed |= e.mtls;
        }
        for e in &self.edges {
            let (name, namespace) = e.source.split_once('.').unwrap_or((&e.source, ""));
            nodes.entry(e.source.clone()).or_insert_with(|| Node {
                id: e.source.clone(),
                name: name.to_string(),
                namespace: namespace.to_string(),
                meshed: e.source != NO_SIDECAR,
                identity: None,
                peer_authentication: None,
                traffic_policy: None,
                refused_rps: 0.0,
            });
        }
        Graph {
            source: source.to_string(),
            at_ms,
            window_secs,
            nodes: nodes.into_values().collect(),
            edges: self
                .edges
                .iter()
                .map(|e| Edge {
                    source: e.source.clone(),
                    destination: e.destination.clone(),
                    transport: transport(e.mtls, e.success),
                    rps: e.rps,
                    success: e.success,
                    p50_ms: e.p50_ms,
                    p99_ms: e.p99_ms,
                    total_requests: 0.0,
                    split: Vec::new(),
                })
                .collect(),
            error: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        }
    }

    fn results() -> BTreeMap<Query, Vec<Sample>> {
        let fe = [
            ("app", "frontend"),
            ("namespace", "shop"),
            ("dst_service", "catalog.shop"),
        ];
        let with_tls = |tls| {
            let mut l = fe.to_vec();
            l.push(("tls", tls));
            l
        };
        let front = [("app", "frontend"), ("namespace", "shop")];
        BTreeMap::from([
            (Query::EdgeRps, vec![s(&with_tls("true"), 20.0)]),
            (Query::EdgeOk, vec![s(&with_tls("true"), 15.0)]),
            (Query::EdgeP50, vec![s(&fe, 0.004)]),
            (Query::EdgeP99, vec![s(&fe, f64::NAN)]),
            (Query::PlainRps, vec![s(&front, 2.0)]),
            (Query::PlainOk, vec![]),
            (Query::WorkloadRps, vec![s(&front, 22.0)]),
            (Query::WorkloadOk, vec![s(&front, 22.0)]),
            (Query::Refused, vec![s(&front, 2.0)]),
        ])
    }

    #[test]
    fn edges_and_workloads_from_query_results() {
        let st = build("30s", &results());
        assert_eq!(
            st.edges,
            vec![
                EdgeStat {
                    source: NO_SIDECAR.into(),
                    destination: "frontend.shop".into(),
                    mtls: false,
                    rps: 2.0,
                    success: Some(0.0),
                    p50_ms: None,
                    p99_ms: None
                },
                EdgeStat {
                    source: "frontend.shop".into(),
                    destination: "catalog.shop".into(),
                    mtls: true,
                    rps: 20.0,
                    success: Some(0.75),
                    p50_ms: Some(4.0),
                    p99_ms: None
                },
            ]
        );
        assert_eq!(st.workloads[0].success, Some(1.0));
        assert_eq!(st.workloads[0].refused_rps, 2.0);
        let g = st.to_graph("test", 0, 30.0);
        let meshed: BTreeMap<&str, bool> =
            g.nodes.iter().map(|n| (n.id.as_str(), n.meshed)).collect();
        assert_eq!(
            meshed,
            BTreeMap::from([
                (NO_SIDECAR, false),
                ("catalog.shop", true),
                ("frontend.shop", true)
            ]),
            "a caller's outbound metrics prove its sidecar, an mTLS edge its destination's"
        );
        assert_eq!(g.edges[0].transport, crate::dashboard::Transport::Refused);
        assert_eq!(g.edges[1].transport, crate::dashboard::Transport::Mtls);
    }

    /// Opaque TCP, read as `trellis dev`'s graph reads it: the caller's outbound connections
    /// are the edge's requests, each a success, with no latency; the server's inbound ones
    /// are what its workload served. A destination serving only TCP is a node of the graph.
    #[test]
    fn opaque_tcp_edges_count_connections() {
        let warmer = [
            ("app", "warmer"),
            ("namespace", "shop"),
            ("dst_service", "cache.shop"),
            ("tls", "true"),
        ];
        let mut r = results();
        r.insert(Query::EdgeTcp, vec![s(&warmer, 4.0)]);
        r.insert(
            Query::WorkloadTcp,
            vec![
                s(&[("app", "cache"), ("namespace", "shop")], 4.0),
                s(&[("app", "frontend"), ("namespace", "shop")], 3.0),
            ],
        );
        let st = build("30s", &r);
        let tcp = st
            .edges
            .iter()
            .find(|e| e.source == "warmer.shop")
            .expect("the TCP edge");
        assert_eq!(
            (tcp.destination.as_str(), tcp.mtls, tcp.rps, tcp.success),
            ("cache.shop", true, 4.0, Some(1.0))
        );
        assert_eq!((tcp.p50_ms, tcp.p99_ms), (None, None));
        let wl: BTreeMap<&str, (f64, Option<f64>)> = st
            .workloads
            .iter()
            .map(|w| (w.workload.as_str(), (w.rps, w.success)))
            .collect();
        assert_eq!(wl["cache"], (4.0, Some(1.0)));
        // frontend: 22 HTTP requests/s, all served, plus 3 TCP connections/s.
        assert_eq!(wl["frontend"], (25.0, Some(1.0)));
        let g = st.to_graph("test", 0, 30.0);
        assert!(
            g.nodes.iter().any(|n| n.id == "cache.shop" && n.meshed),
            "{:?}",
            g.nodes
        );
        let e = g.edges.iter().find(|e| e.source == "warmer.shop").unwrap();
        assert_eq!(e.transport, crate::dashboard::Transport::Mtls);
    }

    #[test]
    fn a_client_that_only_sends_is_a_meshed_node() {
        let load = [
            ("app", "load"),
            ("namespace", "shop"),
            ("dst_service", "frontend.shop"),
            ("tls", "true"),
        ];
        let st = build(
            "30s",
            &BTreeMap::from([(Query::EdgeRps, vec![s(&load, 5.0)])]),
        );
        assert!(st.workloads.is_empty());
        let g = st.to_graph("test", 0, 30.0);
        let meshed: BTreeMap<&str, bool> =
            g.nodes.iter().map(|n| (n.id.as_str(), n.meshed)).collect();
        assert_eq!(
            meshed,
            BTreeMap::from([("frontend.shop", true), ("load.shop", true)])
        );
    }

    #[test]
    fn targets_filter_workloads_and_their_edges() {
        assert_eq!(
            "deploy/frontend".parse(),
            Ok(Target::Workload("frontend".into()))
        );
        assert_eq!("ns/shop".parse(), Ok(Target::Namespace("shop".into())));
        assert!("pod/x".parse::<Target>().is_err());
        let st = build("30s", &results());
        let only = st.clone().filter(&Target::Workload("catalog".into()), None);
        assert!(only.workloads.is_empty());
        assert_eq!(only.edges.len(), 1);
        assert_eq!(
            st.clone()
                .filter(&Target::Namespace("other".into()), None)
                .edges
                .len(),
            0
        );
        assert!(st.render().contains("frontend.shop -> catalog.shop"));
    }
}
