//! Rendering a namespace's `config.json` from shared, pre-serialized pieces.
//!
//! Every namespace lists the same Services, so each Service is serialized once (in two variants:
//! with its inline endpoints, and without) and each namespace's text is the concatenation of its
//! header and those fragments. The bytes are exactly `ProxyConfig::to_json_pretty()` (a test
//! checks), and the revision is a hash over the header and the fragments' digests, so it can be
//! computed without rendering: that is what lets an incremental compile skip namespaces whose
//! revision did not change.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use trellis_proxy::config::{OutboundService, ProxyConfig, TrafficPolicy};

use super::outbound::Table;
use super::{InlineEndpoints, ObjectKey};

/// One Service, serialized at the indentation of an element of the top-level `outbound` array.
struct Fragment {
    text: String,
    digest: [u8; 32],
}

struct Entry {
    namespace: String,
    full: Fragment,
    /// Without inline endpoints; `None` when the Service has none (then `full` is used).
    remote: Option<Fragment>,
}

pub(crate) struct Fragments {
    entries: Vec<Entry>,
}

/// The fragments one namespace's config is made of, in order.
pub(crate) struct Plan<'a> {
    parts: Vec<&'a Fragment>,
}

fn fragment(svc: &OutboundService) -> Fragment {
    let raw = serde_json::to_string_pretty(svc).expect("outbound service serializes");
    // Elements of the top-level `outbound` array sit at depth 2 (four spaces). JSON strings
    // cannot hold a raw newline, so every '\n' in the text is structural.
    let mut text = String::with_capacity(raw.len() + raw.len() / 8);
    text.push_str("    ");
    for (i, line) in raw.split('\n').enumerate() {
        if i > 0 {
            text.push_str("\n    ");
        }
        text.push_str(line);
    }
    let digest = Sha256::digest(text.as_bytes()).into();
    Fragment { text, digest }
}

impl Fragments {
    pub fn build(table: &Table, policies: &BTreeMap<ObjectKey, TrafficPolicy>) -> Self {
        let mut entries = Vec::with_capacity(table.services.len());
        for (key, svc) in &table.services {
            let mut svc = svc.clone();
            svc.policy = policies.get(key).cloned();
            let has_endpoints = svc.ports.iter().any(|p| !p.endpoints.is_empty());
            let full = fragment(&svc);
            let remote = has_endpoints.then(|| {
                for p in &mut svc.ports {
                    p.endpoints.clear();
                }
                fragment(&svc)
            });
            entries.push(Entry {
                namespace: key.namespace.clone(),
                full,
                remote,
            });
        }
        Self { entries }
    }

    pub fn plan(&self, namespace: &str, inline: InlineEndpoints) -> Plan<'_> {
        let parts = self
            .entries
            .iter()
            .map(|e| {
                let full = match inline {
                    InlineEndpoints::All => true,
                    InlineEndpoints::SameNamespace => e.namespace == namespace,
                    InlineEndpoints::None => false,
                };
                match (&e.remote, full) {
                    (Some(remote), false) => remote,
                    _ => &e.full,
                }
            })
            .collect();
        Plan { parts }
    }
}

/// The revision of a config: a hash of its content with an empty revision field.
pub(crate) fn revision(header: &ProxyConfig, plan: &Plan<'_>) -> String {
    debug_assert!(header.revision.is_empty() && header.outbound.is_empty());
    let mut h = Sha256::new();
    h.update(header.to_json_pretty().as_bytes());
    for part in &plan.parts {
        h.update(part.digest);
    }
    hex::encode(&h.finalize()[..8])
}

/// The full `config.json` text: `header` (whose `outbound` is empty) with the plan's services
/// spliced into the `outbound` array.
pub(crate) fn render(header: &ProxyConfig, plan: &Plan<'_>) -> String {
    debug_assert!(header.outbound.is_empty());
    let head = header.to_json_pretty();
    if plan.parts.is_empty() {
        return head;
    }
    const EMPTY_TAIL: &str = "[]\n}";
    let stem = head
        .strip_suffix(EMPTY_TAIL)
        .expect("outbound is the last field of ProxyConfig");
    let size = stem.len()
        + plan.parts.iter().map(|p| p.text.len() + 2).sum::<usize>()
        + "[\n\n  ]\n}".len();
    let mut out = String::with_capacity(size);
    out.push_str(stem);
    out.push_str("[\n");
    for (i, part) in plan.parts.iter().enumerate() {
        if i > 0 {
            out.push_str(",\n");
        }
        out.push_str(&part.text);
    }
    out.push_str("\n  ]\n}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proxy::config::{MeshSettings, ServicePort, Telemetry};

    #[test]
    fn spliced_text_equals_the_contract_serialization() {
        let svc = |name: &str| OutboundService {
            name: name.into(),
            namespace: "ns".into(),
            addresses: vec!["10.0.0.1".parse().unwrap()],
            ports: vec![ServicePort {
                port: 80,
                name: Some("http".into()),
                protocol: Default::default(),
                endpoints: vec![],
            }],
            identities: vec![],
            policy: None,
        };
        let services = vec![svc("a"), svc("b")];
        let mut header = ProxyConfig {
            version: 1,
            revision: "abc".into(),
            namespace: "ns".into(),
            mesh: MeshSettings {
                trust_domain: "cluster.local".into(),
                identity_endpoint: None,
                telemetry: Telemetry::default(),
                skip_detection_ports: vec![],
                detect_timeout_ms: 100,
            },
            inbound: vec![],
            outbound: vec![],
        };
        let frags: Vec<Fragment> = services.iter().map(fragment).collect();
        let plan = Plan {
            parts: frags.iter().collect(),
        };
        let text = render(&header, &plan);
        header.outbound = services;
        assert_eq!(text, header.to_json_pretty());
    }
}
