//! `trellis dashboard`: a live service graph in the browser, served by the CLI on 127.0.0.1.
//!
//! One data model ([`Graph`]) behind every source: `trellis dev` builds it from its local
//! sidecars' scrapes ([`from_dev`]), and `trellis dashboard --prometheus URL` from PromQL
//! ([`crate::stat::Stat::to_graph`]). The page (`assets/`, plain HTML/CSS/JS with a hand-drawn SVG graph, no
//! third-party code and no build step) is embedded in the binary and polls `/api/graph`; it
//! keeps the last minutes of each edge's numbers itself for the small charts.

pub mod server;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::dev::stats::EdgeView;

/// A workload: a node of the graph.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    /// `name.namespace`, as edges name it.
    pub id: String,
    pub name: String,
    pub namespace: String,
    /// It has sidecars (a plaintext client has none).
    pub meshed: bool,
    /// SPIFFE identity of its sidecars.
    pub identity: Option<String>,
    /// The `mtls.mode` of the PeerAuthentication that applies to it.
    pub peer_authentication: Option<String>,
    /// The spec of the TrafficPolicy that targets it, as its YAML reads (splits, retries,
    /// timeouts).
    pub traffic_policy: Option<serde_json::Value>,
    /// Inbound connections its sidecars refused per second (plaintext under `Strict`).
    pub refused_rps: f64,
}

/// How the hop looks on the wire; the page draws each differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Mtls,
    /// Plaintext and answered (a `Permissive` destination).
    Plaintext,
    /// Plaintext and failing: the destination refuses it (`Strict`).
    Refused,
}

/// One backend of a traffic split, with the share it really got.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SplitShare {
    pub backend: String,
    pub weight: u32,
    /// Fraction of the split's requests in the last window, when there were any.
    pub observed: Option<f64>,
}

/// A caller -> callee edge with its golden metrics over the last window.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Edge {
    pub source: String,
    pub destination: String,
    pub transport: Transport,
    pub rps: f64,
    /// Fraction of requests below 500 (`None` without requests in the window).
    pub success: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub total_requests: f64,
    /// The destination's TrafficPolicy split, if any.
    pub split: Vec<SplitShare>,
}

/// The whole view at one instant.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Graph {
    /// Where the numbers come from (`trellis dev`, a Prometheus URL).
    pub source: String,
    /// Unix milliseconds.
    pub at_ms: i64,
    /// Length of the window rates are computed over, seconds.
    pub window_secs: f64,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    /// Why the numbers may be missing (a failed Prometheus query).
    pub error: Option<String>,
}

/// A plaintext edge is "refused" once most of its requests fail: what a `Strict` destination
/// does to it.
pub fn transport(mtls: bool, success: Option<f64>) -> Transport {
    match (mtls, success) {
        (true, _) => Transport::Mtls,
        (false, Some(s)) if s < 0.5 => Transport::Refused,
        (false, _) => Transport::Plaintext,
    }
}

/// Observed shares of a split, from requests per second per backend.
pub fn split_shares(
    weights: &[(String, u32)],
    backend_rps: &BTreeMap<String, f64>,
) -> Vec<SplitShare> {
    let total: f64 = weights
        .iter()
        .map(|(b, _)| backend_rps.get(b).copied().unwrap_or(0.0))
        .sum();
    weights
        .iter()
        .map(|(b, w)| SplitShare {
            backend: b.clone(),
            weight: *w,
            observed: (total > 0.0).then(|| backend_rps.get(b).copied().unwrap_or(0.0) / total),
        })
        .collect()
}

/// Edges from `trellis dev`'s windows: `views` per edge, `backends` per (caller, backend)
/// after splits; `splits` maps a destination to its split weights.
pub fn from_dev(
    views: &[EdgeView],
    backends: &[EdgeView],
    splits: &BTreeMap<String, Vec<(String, u32)>>,
) -> Vec<Edge> {
    views
        .iter()
        .map(|v| {
            let split = match splits.get(&v.key.destination) {
                Some(w) => {
                    let rps: BTreeMap<String, f64> = backends
                        .iter()
                        .filter(|b| b.key.source == v.key.source)
                        .map(|b| (b.key.destination.clone(), b.rps))
                        .collect();
                    split_shares(w, &rps)
                }
                None => Vec::new(),
            };
            Edge {
                source: v.key.source.clone(),
                destination: v.key.destination.clone(),
                transport: transport(v.key.mtls, v.success),
                rps: v.rps,
                success: v.success,
                p50_ms: v.p50.map(|s| s * 1000.0),
                p99_ms: v.p99.map(|s| s * 1000.0),
                total_requests: v.total_requests,
                split,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::stats::EdgeKey;

    fn view(src: &str, dst: &str, mtls: bool, rps: f64, success: Option<f64>) -> EdgeView {
        EdgeView {
            key: EdgeKey {
                source: src.into(),
                destination: dst.into(),
                mtls,
            },
            rps,
            success,
            p50: Some(0.002),
            p99: None,
            total_requests: 10.0,
            total_successes: 10.0,
        }
    }

    #[test]
    fn plaintext_edges_turn_refused_when_they_fail() {
        assert_eq!(transport(true, Some(0.0)), Transport::Mtls);
        assert_eq!(transport(false, Some(1.0)), Transport::Plaintext);
        assert_eq!(transport(false, None), Transport::Plaintext);
        assert_eq!(transport(false, Some(0.1)), Transport::Refused);
    }

    #[test]
    fn splits_show_weights_and_observed_shares() {
        let splits = BTreeMap::from([(
            "reviews.shop".to_string(),
            vec![
                ("reviews.shop".to_string(), 90),
                ("reviews-v2.shop".to_string(), 10),
            ],
        )]);
        let edges = from_dev(
            &[view("frontend.shop", "reviews.shop", true, 10.0, Some(1.0))],
            &[
                view("frontend.shop", "reviews.shop", true, 8.0, None),
                view("frontend.shop", "reviews-v2.shop", true, 2.0, None),
                view("other.shop", "reviews-v2.shop", true, 50.0, None),
            ],
            &splits,
        );
        assert_eq!(edges[0].p50_ms, Some(2.0));
        assert_eq!(
            edges[0].split,
            vec![
                SplitShare {
                    backend: "reviews.shop".into(),
                    weight: 90,
                    observed: Some(0.8)
                },
                SplitShare {
                    backend: "reviews-v2.shop".into(),
                    weight: 10,
                    observed: Some(0.2)
                },
            ]
        );
    }
}
