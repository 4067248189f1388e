//! PeerAuthentication precedence: workload selector > namespace > mesh-wide (root namespace, no
//! selector) > `Strict`; port level > workload level; `Unset` inherits from the next level.
//!
//! The result per namespace is a list of `InboundPolicy`s, most specific first: the workload
//! policies ordered by age (the oldest wins when two select the same pod, because the proxy takes
//! the first match), then the namespace default with an empty selector.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use trellis_proxy::config::{InboundPolicy, MtlsMode};

use super::{ObjectKey, age_key};
use crate::api::conditions::{Condition, ConditionStatus};
use crate::api::peer_authentication::{MtlsMode as ApiMode, PeerAuthentication};

#[derive(Clone, Debug)]
enum Verdict {
    Accepted,
    Invalid(String),
    Conflicted(String),
}

struct Parsed {
    key: ObjectKey,
    selector: BTreeMap<String, String>,
    mode: ApiMode,
    ports: BTreeMap<u16, ApiMode>,
}

pub(crate) struct Resolved {
    root: String,
    mesh_wide: Option<Parsed>,
    namespace: BTreeMap<String, Parsed>,
    workload: BTreeMap<String, Vec<Parsed>>,
    verdicts: BTreeMap<ObjectKey, (Option<i64>, Verdict)>,
}

fn parse(pa: &PeerAuthentication) -> Result<Parsed, String> {
    let key = ObjectKey::of(&pa.metadata);
    let selector = pa
        .spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .unwrap_or_default();
    let mut ports = BTreeMap::new();
    for (k, v) in &pa.spec.port_level_mtls {
        let port: u16 = k
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("portLevelMtls key {k:?} is not a port number (1-65535)"))?;
        ports.insert(port, v.mode);
    }
    if !ports.is_empty() && selector.is_empty() {
        return Err(
            "portLevelMtls needs a selector: port numbers are container ports of specific \
             workloads. Add spec.selector or move the overrides to a workload policy."
                .into(),
        );
    }
    Ok(Parsed {
        key,
        selector,
        mode: pa.spec.mtls.mode,
        ports,
    })
}

fn resolve_mode(mode: ApiMode, inherited: MtlsMode) -> MtlsMode {
    match mode {
        ApiMode::Unset => inherited,
        ApiMode::Strict => MtlsMode::Strict,
        ApiMode::Permissive => MtlsMode::Permissive,
        ApiMode::Disable => MtlsMode::Disable,
    }
}

pub(crate) fn resolve(pas: &[Arc<PeerAuthentication>], root: &str) -> Resolved {
    let mut sorted: Vec<&PeerAuthentication> = pas.iter().map(Arc::as_ref).collect();
    sorted.sort_by_key(|p| age_key(&p.metadata));
    let mut r = Resolved {
        root: root.to_string(),
        mesh_wide: None,
        namespace: BTreeMap::new(),
        workload: BTreeMap::new(),
        verdicts: BTreeMap::new(),
    };
    for pa in sorted {
        let key = ObjectKey::of(&pa.metadata);
        let generation = pa.metadata.generation;
        let parsed = match parse(pa) {
            Ok(p) => p,
            Err(m) => {
                r.verdicts.insert(key, (generation, Verdict::Invalid(m)));
                continue;
            }
        };
        let verdict = if !parsed.selector.is_empty() {
            r.workload
                .entry(key.namespace.clone())
                .or_default()
                .push(parsed);
            Verdict::Accepted
        } else {
            let slot = if key.namespace == root {
                &mut r.mesh_wide
            } else {
                match r.namespace.entry(key.namespace.clone()) {
                    std::collections::btree_map::Entry::Occupied(e) => {
                        let winner = e.get().key.name.clone();
                        r.verdicts.insert(
                            key,
                            (
                                generation,
                                Verdict::Conflicted(format!(
                                    "the older PeerAuthentication {winner} already sets the \
                                     namespace-wide mode; only one policy without a selector \
                                     applies per namespace"
                                )),
                            ),
                        );
                        continue;
                    }
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(parsed);
                        r.verdicts.insert(key, (generation, Verdict::Accepted));
                        continue;
                    }
                }
            };
            match slot {
                Some(winner) => Verdict::Conflicted(format!(
                    "the older PeerAuthentication {} already sets the mesh-wide mode; only one \
                     policy without a selector applies in the root namespace",
                    winner.key.name
                )),
                None => {
                    *slot = Some(parsed);
                    Verdict::Accepted
                }
            }
        };
        r.verdicts.insert(key, (generation, verdict));
    }
    r
}

impl Resolved {
    fn mesh_mode(&self) -> MtlsMode {
        self.mesh_wide
            .as_ref()
            .map_or(MtlsMode::Strict, |p| resolve_mode(p.mode, MtlsMode::Strict))
    }

    /// The inbound policies of a namespace, most specific first, ending with the default.
    pub fn policies_for(&self, ns: &str) -> Vec<InboundPolicy> {
        let mesh = self.mesh_mode();
        let ns_policy = self.namespace.get(ns);
        let ns_mode = ns_policy.map_or(mesh, |p| resolve_mode(p.mode, mesh));
        let mut out = Vec::new();
        for w in self.workload.get(ns).map(Vec::as_slice).unwrap_or_default() {
            let mtls = resolve_mode(w.mode, ns_mode);
            out.push(InboundPolicy {
                source: w.key.to_string(),
                selector: w.selector.clone(),
                mtls,
                port_mtls: w
                    .ports
                    .iter()
                    .filter(|(_, m)| **m != ApiMode::Unset)
                    .map(|(p, m)| (*p, resolve_mode(*m, mtls)))
                    .collect(),
                rate_limit: None,
            });
        }
        let source = match (ns_policy, &self.mesh_wide) {
            (Some(p), _) => p.key.to_string(),
            (None, Some(p)) => p.key.to_string(),
            (None, None) => "mesh-default".to_string(),
        };
        out.push(InboundPolicy {
            source,
            selector: BTreeMap::new(),
            mtls: ns_mode,
            port_mtls: BTreeMap::new(),
            rate_limit: None,
        });
        out
    }

    pub fn conditions(
        &self,
        emitted: &BTreeSet<&str>,
        meshed: &BTreeSet<String>,
        root: &str,
    ) -> BTreeMap<ObjectKey, Vec<Condition>> {
        debug_assert_eq!(root, self.root);
        let mut out = BTreeMap::new();
        for (key, (g, verdict)) in &self.verdicts {
            let g = *g;
            let accepted = match verdict {
                Verdict::Accepted => {
                    Condition::new("Accepted", ConditionStatus::True, "Accepted", "", g)
                }
                Verdict::Invalid(m) => {
                    Condition::new("Accepted", ConditionStatus::False, "Invalid", m.clone(), g)
                }
                Verdict::Conflicted(m) => Condition::new(
                    "Accepted",
                    ConditionStatus::False,
                    "Conflicted",
                    m.clone(),
                    g,
                ),
            };
            let mesh_wide =
                key.namespace == root && self.mesh_wide.as_ref().is_some_and(|p| &p.key == key);
            let programmed = if !accepted.is_true() {
                Condition::new(
                    "Programmed",
                    ConditionStatus::False,
                    "NotAccepted",
                    "The policy is not accepted; see the Accepted condition.",
                    g,
                )
            } else if mesh_wide {
                if emitted.is_empty() {
                    Condition::new(
                        "Programmed",
                        ConditionStatus::False,
                        "NoMeshedNamespaces",
                        "No meshed namespace's configuration was written.",
                        g,
                    )
                } else {
                    Condition::new(
                        "Programmed",
                        ConditionStatus::True,
                        "Programmed",
                        "Applies mesh-wide where no namespace or workload policy overrides it.",
                        g,
                    )
                }
            } else if key.namespace == root {
                Condition::new(
                    "Programmed",
                    ConditionStatus::False,
                    "NamespaceNotMeshed",
                    format!(
                        "A policy with a selector in the root namespace {root} applies to \
                         workloads of {root} only, which are never meshed. For a mesh-wide mode \
                         remove the selector; for workloads elsewhere create the policy in \
                         their namespace."
                    ),
                    g,
                )
            } else if !meshed.contains(&key.namespace) {
                Condition::new(
                    "Programmed",
                    ConditionStatus::False,
                    "NamespaceNotMeshed",
                    format!(
                        "Namespace {} is not meshed; label it trellis.dev/inject=enabled.",
                        key.namespace
                    ),
                    g,
                )
            } else if !emitted.contains(key.namespace.as_str()) {
                Condition::new(
                    "Programmed",
                    ConditionStatus::False,
                    "ConfigNotWritten",
                    format!(
                        "The configuration of namespace {} could not be written; see the Mesh's \
                         Degraded condition.",
                        key.namespace
                    ),
                    g,
                )
            } else {
                Condition::new("Programmed", ConditionStatus::True, "Programmed", "", g)
            };
            let both = accepted.is_true() && programmed.is_true();
            let ready = Condition::new(
                "Ready",
                ConditionStatus::from_bool(both),
                if both {
                    "Ready".to_string()
                } else if !accepted.is_true() {
                    accepted.reason.clone()
                } else {
                    programmed.reason.clone()
                },
                "",
                g,
            );
            out.insert(key.clone(), vec![accepted, programmed, ready]);
        }
        out
    }
}
