//! `trellis dev`'s view as the dashboard's [`Graph`]: the workloads of the plan with their
//! identity and policies, and the edges of the last scrape window.

use std::collections::{BTreeMap, BTreeSet};

use super::plan::Pod;
use super::spec::Objects;
use crate::dashboard::{self, Graph, Node};
use crate::dev::stats::EdgeView;

/// The `mtls.mode` that applies to a pod: a selector-matching policy of its namespace, else the
/// namespace-wide one, else the mesh-wide one in the root namespace.
pub fn peer_authentication_mode(objects: &Objects, pod: &Pod) -> Option<String> {
    let mode = |pa: &crate::api::PeerAuthentication| {
        serde_json::to_value(pa.spec.mtls.mode)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
    };
    fn in_ns<'a>(
        objects: &'a Objects,
        ns: &'a str,
    ) -> impl Iterator<Item = &'a crate::api::PeerAuthentication> + 'a {
        objects
            .peer_authentications
            .iter()
            .filter(move |pa| pa.metadata.namespace.as_deref() == Some(ns))
    }
    let selected = in_ns(objects, &pod.namespace).find(|pa| {
        pa.spec.selector.as_ref().is_some_and(|s| {
            s.match_labels
                .iter()
                .all(|(k, v)| pod.labels.get(k) == Some(v))
        })
    });
    selected
        .or_else(|| in_ns(objects, &pod.namespace).find(|pa| pa.spec.selector.is_none()))
        .or_else(|| in_ns(objects, super::ROOT_NAMESPACE).find(|pa| pa.spec.selector.is_none()))
        .and_then(mode)
}

/// Split weights per destination (`name.namespace`), from the TrafficPolicies.
pub fn splits(objects: &Objects) -> BTreeMap<String, Vec<(String, u32)>> {
    objects
        .traffic_policies
        .iter()
        .filter(|tp| !tp.spec.split.is_empty())
        .map(|tp| {
            let ns = tp.metadata.namespace.clone().unwrap_or_default();
            (
                format!("{}.{ns}", tp.spec.target_ref.name),
                tp.spec
                    .split
                    .iter()
                    .map(|b| (format!("{}.{ns}", b.name), b.weight))
                    .collect(),
            )
        })
        .collect()
}

/// What one scrape window measured.
pub struct Window<'a> {
    /// Per edge.
    pub views: &'a [EdgeView],
    /// Per (caller, backend) after splits.
    pub backends: &'a [EdgeView],
    /// Refused inbound connections per second, per workload key.
    pub refused_rps: &'a BTreeMap<String, f64>,
    /// Unix milliseconds at its end.
    pub at_ms: i64,
    pub secs: f64,
}

/// The graph of one window.
pub fn graph(pods: &[Pod], objects: &Objects, trust_domain: &str, w: &Window<'_>) -> Graph {
    let mut seen = BTreeSet::new();
    let nodes = pods
        .iter()
        .filter(|p| seen.insert(p.workload_key()))
        .map(|p| {
            let id = p.workload_key();
            Node {
                name: p.workload.clone(),
                namespace: p.namespace.clone(),
                meshed: p.proxy.is_some(),
                identity: super::control::identity_of(p, trust_domain),
                peer_authentication: p
                    .proxy
                    .is_some()
                    .then(|| peer_authentication_mode(objects, p))
                    .flatten(),
                traffic_policy: objects
                    .traffic_policies
                    .iter()
                    .find(|tp| {
                        tp.spec.target_ref.name == p.workload
                            && tp.metadata.namespace.as_deref() == Some(p.namespace.as_str())
                    })
                    .and_then(|tp| serde_json::to_value(&tp.spec).ok()),
                refused_rps: w.refused_rps.get(&id).copied().unwrap_or(0.0),
                id,
            }
        })
        .collect();
    Graph {
        source: "trellis dev (local sidecars)".into(),
        at_ms: w.at_ms,
        window_secs: w.secs,
        nodes,
        edges: dashboard::from_dev(w.views, w.backends, &splits(objects)),
        error: None,
    }
}
