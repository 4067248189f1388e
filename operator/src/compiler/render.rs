//! Rendering a namespace's `config.json` from shared, pre-serialized pieces.
//!
//! Every namespace lists the same Services, so each Service is serialized once, in two variants
//! (with its inline endpoints, and without), and a namespace's text is its header followed by
//! one variant of every Service. The bytes are exactly `ProxyConfig::to_json_pretty()` (tests
//! check). A namespace is described by a [`Plan`]: a base variant for all Services plus the few
//! Services that use the other one (its own, by default). The revision and the length follow
//! from the plan without rendering, so a compile never materializes 200 copies of the table:
//! text is produced only for the ConfigMaps the applier actually writes.

use std::collections::BTreeMap;
use std::sync::Arc;

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
    full: Fragment,
    /// Without inline endpoints; `None` when the Service has none (then `full` is used).
    remote: Option<Fragment>,
}

impl Entry {
    fn variant(&self, full: bool) -> &Fragment {
        match (&self.remote, full) {
            (Some(remote), false) => remote,
            _ => &self.full,
        }
    }
}

/// Every Service's fragments, shared by all namespaces of one compile.
pub(crate) struct Fragments {
    entries: Vec<Entry>,
    /// Indices of each namespace's own Services.
    by_namespace: BTreeMap<String, Vec<u32>>,
    /// Digest and total text length of the all-remote and the all-full tables.
    remote: ([u8; 32], usize),
    full: ([u8; 32], usize),
    /// Problems the sidecar's validation finds in the table (same in every namespace).
    pub table_errors: Option<String>,
}

/// Which fragments one namespace's config is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    base_full: bool,
    /// Services that use the other variant than the base.
    overrides: Vec<u32>,
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
    /// Serializes every Service with its attached policy and validates the whole table once
    /// with the sidecar's own validator (`header` supplies valid mesh settings).
    pub fn build(
        table: &Table,
        policies: &BTreeMap<ObjectKey, TrafficPolicy>,
        header: &ProxyConfig,
    ) -> Self {
        let mut entries = Vec::with_capacity(table.services.len());
        let mut by_namespace: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        let mut all = Vec::with_capacity(table.services.len());
        for (key, svc) in &table.services {
            let mut svc = svc.clone();
            svc.policy = policies.get(key).cloned();
            let has_endpoints = svc.ports.iter().any(|p| !p.endpoints.is_empty());
            let full = fragment(&svc);
            let remote = has_endpoints.then(|| {
                let mut bare = svc.clone();
                for p in &mut bare.ports {
                    p.endpoints.clear();
                }
                fragment(&bare)
            });
            by_namespace
                .entry(key.namespace.clone())
                .or_default()
                .push(entries.len() as u32);
            entries.push(Entry { full, remote });
            all.push(svc);
        }
        let mut validate = header.clone();
        validate.outbound = all;
        let table_errors = validate.validate().err().map(|errs| {
            errs.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        });
        let sum = |full: bool| {
            let mut h = Sha256::new();
            let mut len = 0;
            for e in &entries {
                let f = e.variant(full);
                h.update(f.digest);
                len += f.text.len();
            }
            (h.finalize().into(), len)
        };
        let remote = sum(false);
        let full = sum(true);
        Self {
            entries,
            by_namespace,
            remote,
            full,
            table_errors,
        }
    }

    pub fn plan(&self, namespace: &str, inline: InlineEndpoints) -> Plan {
        match inline {
            InlineEndpoints::All => Plan {
                base_full: true,
                overrides: Vec::new(),
            },
            InlineEndpoints::None => Plan {
                base_full: false,
                overrides: Vec::new(),
            },
            InlineEndpoints::SameNamespace => Plan {
                base_full: false,
                overrides: self
                    .by_namespace
                    .get(namespace)
                    .map(|v| {
                        v.iter()
                            .copied()
                            .filter(|i| self.entries[*i as usize].remote.is_some())
                            .collect()
                    })
                    .unwrap_or_default(),
            },
        }
    }

    /// The revision of a config: a hash over its header (with an empty revision) and the
    /// fragments' digests. The base table's digest stands for all of its fragments, and each
    /// override adds its position and digest, so equal revisions mean equal text.
    pub fn revision(&self, header: &ProxyConfig, plan: &Plan) -> String {
        debug_assert!(header.revision.is_empty() && header.outbound.is_empty());
        let mut h = Sha256::new();
        h.update(header.to_json_pretty().as_bytes());
        h.update(if plan.base_full {
            self.full.0
        } else {
            self.remote.0
        });
        for i in &plan.overrides {
            h.update(i.to_le_bytes());
            h.update(self.entries[*i as usize].variant(!plan.base_full).digest);
        }
        hex::encode(&h.finalize()[..8])
    }

    fn text_len(&self, plan: &Plan) -> usize {
        let mut len = if plan.base_full {
            self.full.1
        } else {
            self.remote.1
        };
        for i in &plan.overrides {
            let e = &self.entries[*i as usize];
            len =
                len - e.variant(plan.base_full).text.len() + e.variant(!plan.base_full).text.len();
        }
        len
    }

    /// Length of the rendered text, without rendering it.
    pub fn rendered_len(&self, header: &ProxyConfig, plan: &Plan) -> usize {
        let head = header.to_json_pretty().len();
        if self.entries.is_empty() {
            return head;
        }
        head - EMPTY_TAIL.len()
            + "[\n".len()
            + self.text_len(plan)
            + 2 * (self.entries.len() - 1)
            + CLOSE.len()
    }

    /// The full `config.json` text: `header` (whose `outbound` is empty) with the plan's
    /// Services spliced into the `outbound` array.
    pub fn render(&self, header: &ProxyConfig, plan: &Plan) -> String {
        debug_assert!(header.outbound.is_empty());
        let head = header.to_json_pretty();
        if self.entries.is_empty() {
            return head;
        }
        let stem = head
            .strip_suffix(EMPTY_TAIL)
            .expect("outbound is the last field of ProxyConfig");
        let mut out = String::with_capacity(self.rendered_len(header, plan));
        out.push_str(stem);
        out.push_str("[\n");
        let mut overrides = plan.overrides.iter().peekable();
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push_str(",\n");
            }
            let flip = overrides.next_if(|o| **o as usize == i).is_some();
            out.push_str(&e.variant(plan.base_full != flip).text);
        }
        out.push_str(CLOSE);
        out
    }
}

const EMPTY_TAIL: &str = "[]\n}";
const CLOSE: &str = "\n  ]\n}";

/// What a namespace's config is, short of its text.
#[derive(Clone)]
pub struct NamespaceConfig {
    pub(crate) header: ProxyConfig,
    pub(crate) plan: Plan,
    pub(crate) fragments: Arc<Fragments>,
}

impl std::fmt::Debug for NamespaceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamespaceConfig")
            .field("revision", &self.header.revision)
            .field("plan", &self.plan)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proxy::config::{Endpoint, MeshSettings, ServicePort, Telemetry};

    fn svc(name: &str, ns: &str, endpoints: bool) -> OutboundService {
        OutboundService {
            name: name.into(),
            namespace: ns.into(),
            addresses: vec!["10.0.0.1".parse().unwrap()],
            ports: vec![ServicePort {
                port: 80,
                name: Some("http".into()),
                protocol: Default::default(),
                endpoints: if endpoints {
                    vec![Endpoint {
                        address: "10.1.0.1:80".parse().unwrap(),
                        identity: None,
                        zone: None,
                    }]
                } else {
                    vec![]
                },
            }],
            identities: vec![],
            policy: None,
        }
    }

    fn header(ns: &str) -> ProxyConfig {
        ProxyConfig {
            version: 1,
            revision: String::new(),
            namespace: ns.into(),
            mesh: MeshSettings {
                trust_domain: "cluster.local".into(),
                identity_endpoint: None,
                telemetry: Telemetry::default(),
                skip_detection_ports: vec![],
                detect_timeout_ms: 100,
            },
            inbound: vec![],
            outbound: vec![],
        }
    }

    #[test]
    fn spliced_text_equals_the_contract_serialization() {
        let services = [
            svc("a", "x", true),
            svc("b", "x", false),
            svc("c", "y", true),
            svc("d", "y", true),
        ];
        let table = Table {
            services: services
                .iter()
                .map(|s| {
                    (
                        ObjectKey::new(s.namespace.clone(), s.name.clone()),
                        s.clone(),
                    )
                })
                .collect(),
        };
        let frags = Fragments::build(&table, &BTreeMap::new(), &header("x"));
        assert!(frags.table_errors.is_none(), "{:?}", frags.table_errors);
        for inline in [
            InlineEndpoints::All,
            InlineEndpoints::None,
            InlineEndpoints::SameNamespace,
        ] {
            for ns in ["x", "y", "z"] {
                let plan = frags.plan(ns, inline);
                let mut h = header(ns);
                h.revision = "r".into();
                let text = frags.render(&h, &plan);
                assert_eq!(text.len(), frags.rendered_len(&h, &plan));
                let mut want = h.clone();
                want.outbound = services
                    .iter()
                    .map(|s| {
                        let mut s = s.clone();
                        let keep = match inline {
                            InlineEndpoints::All => true,
                            InlineEndpoints::None => false,
                            InlineEndpoints::SameNamespace => s.namespace == ns,
                        };
                        if !keep {
                            s.ports[0].endpoints.clear();
                        }
                        s
                    })
                    .collect();
                assert_eq!(text, want.to_json_pretty(), "{inline:?} {ns}");
            }
        }
        // Different plans, different revisions; same plan, same revision.
        let (x, y) = (
            frags.plan("x", InlineEndpoints::SameNamespace),
            frags.plan("y", InlineEndpoints::SameNamespace),
        );
        let h = header("x");
        assert_ne!(frags.revision(&h, &x), frags.revision(&h, &y));
        assert_eq!(frags.revision(&h, &x), frags.revision(&h, &x.clone()));
    }

    #[test]
    fn empty_table_renders_the_header() {
        let frags = Fragments::build(
            &Table {
                services: BTreeMap::new(),
            },
            &BTreeMap::new(),
            &header("x"),
        );
        let plan = frags.plan("x", InlineEndpoints::SameNamespace);
        let h = header("x");
        assert_eq!(frags.render(&h, &plan), h.to_json_pretty());
        assert_eq!(frags.rendered_len(&h, &plan), h.to_json_pretty().len());
    }
}
