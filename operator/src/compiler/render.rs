//! Rendering a namespace's `config.json` from shared, pre-serialized pieces.
//!
//! Every namespace lists (a subset of) the same Services, so each Service is serialized once,
//! in two variants (with its inline endpoints, and without), and a namespace's text is its
//! header followed by one variant of each Service it sees. The bytes are exactly
//! `ProxyConfig::to_json_pretty()` (tests check). A namespace is described by a [`Plan`]: which
//! Services it sees (all, or a list when `export-to`/`import-from` narrow it, see
//! [`visibility`](super::visibility)), a base variant, and the few Services that use the other
//! one (its own, by default). The revision and the length follow from the plan without
//! rendering, so a compile never materializes 200 copies of the table: text is produced only for
//! the ConfigMaps the applier actually writes.
//!
//! Fragments are also what makes a recompile incremental: an entry whose compiled Service
//! (policy included) equals the previous compile's is reused as is, text, digest and validation
//! verdict, so a TrafficPolicy edit serializes and validates one Service, not the table.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use trellis_proxy::config::{OutboundService, ProxyConfig, ServicePort, TrafficPolicy};

use super::outbound::Table;
use super::visibility::Scope;
use super::{InlineEndpoints, ObjectKey};

/// One Service, serialized at the indentation of an element of the top-level `outbound` array.
struct Fragment {
    text: String,
    digest: [u8; 32],
}

/// One Service of the table, immutable once built and shared by consecutive compiles.
struct Entry {
    /// The compiled Service (without policy) and its policy: what the next compile compares
    /// against. The Service is shared with the outbound table's row cache.
    service: Arc<OutboundService>,
    policy: Option<TrafficPolicy>,
    full: Fragment,
    /// Without inline endpoints; `None` when the Service has none (then `full` is used).
    remote: Option<Fragment>,
    /// The sidecar validator's verdict on this Service; `None` when valid.
    errors: Option<String>,
}

impl Entry {
    fn variant(&self, full: bool) -> &Fragment {
        match (&self.remote, full) {
            (Some(remote), false) => remote,
            _ => &self.full,
        }
    }

    fn key(&self) -> (&str, &str) {
        (&self.service.namespace, &self.service.name)
    }
}

/// Every Service's fragments, shared by all namespaces of one compile.
pub(crate) struct Fragments {
    entries: Vec<Arc<Entry>>,
    /// Who may see each entry (parallel to `entries`).
    export: Vec<Scope>,
    /// Entries each entry splits traffic to (parallel to `entries`).
    backends: Vec<Vec<u32>>,
    /// Whether any entry is hidden from some namespace (else every namespace that imports
    /// everything sees the whole table, the fast path).
    restricted: bool,
    /// Entries that carry a TrafficPolicy (sorted): what a namespace's policies digest is
    /// computed over, without a walk of the whole table per namespace.
    with_policy: Vec<u32>,
    /// Indices of each namespace's own Services.
    by_namespace: BTreeMap<String, Vec<u32>>,
    /// Digest and total text length of the all-remote and the all-full tables.
    remote: ([u8; 32], usize),
    full: ([u8; 32], usize),
    /// Problems the sidecar's validation finds in the table (same in every namespace).
    pub table_errors: Option<String>,
    /// Entries serialized by this compile; the others were reused from the previous one.
    pub serialized: usize,
    /// Unique per build, so a consumer can tell whether [`Self::delta`] is relative to the
    /// table it holds (a watch channel may skip compiles).
    id: u64,
    /// What differs from the previous compile's table; `None` for a table built from scratch.
    delta: Option<Delta>,
}

/// Which entries of a table differ from those of the table it was built from, so the
/// discovery view and its subscribers can follow a compile at the cost of what changed
/// instead of the size of the table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Delta {
    /// [`Fragments::id`] of the table this one was built from.
    pub base: u64,
    /// Entries (indices in the new table) that are new, or whose compiled value or export
    /// scope changed.
    pub changed: Vec<u32>,
    /// Keys of the previous table that are gone.
    pub removed: Vec<ObjectKey>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl std::fmt::Debug for Fragments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fragments")
            .field("services", &self.entries.len())
            .field("serialized", &self.serialized)
            .finish_non_exhaustive()
    }
}

/// Which fragments one namespace's config is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    base_full: bool,
    /// The Services the namespace sees (sorted indices); `None` is all of them.
    include: Option<Vec<u32>>,
    /// Services that use the other variant than the base (sorted, all included).
    overrides: Vec<u32>,
}

impl Plan {
    /// Included indices, or `None` for all of them.
    pub fn included(&self) -> Option<&[u32]> {
        self.include.as_deref()
    }
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

/// Runs the sidecar's own validator on one Service. Split backends are checked by the policy
/// compiler (a split to a Service outside the table is `Invalid`) and kept visible by
/// [`Fragments::plan`]; here they are stood in for by minimal valid entries so the validator's
/// cross-Service check passes and everything else about the Service is checked for real.
fn validate(svc: &OutboundService, header: &ProxyConfig) -> Option<String> {
    let mut cfg = header.clone();
    cfg.outbound.push(svc.clone());
    for b in svc.policy.iter().flat_map(|p| &p.split) {
        if let Some((name, namespace)) = b.service.split_once('.')
            && b.service != svc.key()
        {
            cfg.outbound.push(OutboundService {
                name: name.into(),
                namespace: namespace.into(),
                addresses: Vec::new(),
                ports: vec![ServicePort {
                    port: 1,
                    name: None,
                    protocol: Default::default(),
                    endpoints: Vec::new(),
                }],
                identities: Vec::new(),
                policy: None,
            });
        }
    }
    cfg.validate().err().map(|errs| {
        errs.iter()
            .map(|e| format!("Service {}/{}: {e}", svc.namespace, svc.name))
            .collect::<Vec<_>>()
            .join("; ")
    })
}

fn build_entry(
    service: Arc<OutboundService>,
    policy: Option<TrafficPolicy>,
    header: &ProxyConfig,
) -> Entry {
    let mut value = (*service).clone();
    value.policy = policy.clone();
    let full = fragment(&value);
    let remote = value
        .ports
        .iter()
        .any(|p| !p.endpoints.is_empty())
        .then(|| {
            let mut bare = value.clone();
            for p in &mut bare.ports {
                p.endpoints.clear();
            }
            fragment(&bare)
        });
    let errors = validate(&value, header);
    Entry {
        service,
        policy,
        full,
        remote,
        errors,
    }
}

impl Fragments {
    /// Serializes every Service with its attached policy, reusing the entries of `previous`
    /// whose compiled value is unchanged, and validates what is new with the sidecar's own
    /// validator (`header` supplies valid mesh settings; a Service's text and verdict do not
    /// depend on them, which is what makes reuse across Mesh edits sound).
    pub fn build(
        table: Table,
        policies: &BTreeMap<ObjectKey, TrafficPolicy>,
        header: &ProxyConfig,
        previous: Option<&Fragments>,
    ) -> Self {
        let n = table.services.len();
        let mut entries: Vec<Arc<Entry>> = Vec::with_capacity(n);
        let mut export = Vec::with_capacity(n);
        let mut by_namespace: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        let mut serialized = 0;
        let mut exports = table.exports;
        // Both tables are sorted by (namespace, name): one cursor walks the previous one.
        let prev = previous.map(|p| p.entries.as_slice()).unwrap_or_default();
        let mut cursor = 0;
        for (key, svc) in table.services {
            let policy = policies.get(&key);
            while cursor < prev.len()
                && prev[cursor].key() < (key.namespace.as_str(), key.name.as_str())
            {
                cursor += 1;
            }
            let entry = match prev.get(cursor) {
                Some(p)
                    if p.policy.as_ref() == policy
                        && (Arc::ptr_eq(&p.service, &svc) || p.service == svc) =>
                {
                    p.clone()
                }
                _ => {
                    serialized += 1;
                    Arc::new(build_entry(svc, policy.cloned(), header))
                }
            };
            by_namespace
                .entry(key.namespace.clone())
                .or_default()
                .push(entries.len() as u32);
            export.push(exports.remove(&key).unwrap_or_default());
            entries.push(entry);
        }
        let index = |service: &str| {
            let (name, namespace) = service.split_once('.')?;
            entries
                .binary_search_by(|e| e.key().cmp(&(namespace, name)))
                .ok()
                .map(|i| i as u32)
        };
        let backends: Vec<Vec<u32>> = entries
            .iter()
            .map(|e| {
                e.policy
                    .iter()
                    .flat_map(|p| &p.split)
                    .filter_map(|b| index(&b.service))
                    .collect()
            })
            .collect();
        let mut errors: Vec<&str> = entries.iter().filter_map(|e| e.errors.as_deref()).collect();
        // A split backend missing from the table would be refused by the sidecar; the policy
        // compiler rejects such splits, so this only fires on a compiler bug.
        for e in &entries {
            for b in e.policy.iter().flat_map(|p| &p.split) {
                if index(&b.service).is_none() {
                    errors.push("a split backend is missing from the outbound table");
                }
            }
        }
        let table_errors = (!errors.is_empty()).then(|| errors.join("; "));
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
        let restricted = export.iter().any(|s| !s.is_all());
        let with_policy = (0..entries.len() as u32)
            .filter(|i| entries[*i as usize].policy.is_some())
            .collect();
        let delta = previous.map(|p| p.delta_to(&entries, &export));
        Self {
            entries,
            export,
            backends,
            restricted,
            with_policy,
            by_namespace,
            remote,
            full,
            table_errors,
            serialized,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            delta,
        }
    }

    /// One merge walk over two sorted tables: unchanged entries are the very `Arc`s reused
    /// by [`Self::build`], so an entry counts as changed exactly when it was rebuilt (or its
    /// export scope moved), and a pointer comparison decides.
    fn delta_to(&self, entries: &[Arc<Entry>], export: &[Scope]) -> Delta {
        let mut delta = Delta {
            base: self.id,
            ..Delta::default()
        };
        let (mut i, mut j) = (0, 0);
        while i < entries.len() || j < self.entries.len() {
            let order = match (entries.get(i), self.entries.get(j)) {
                (Some(new), Some(old)) => new.key().cmp(&old.key()),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, _) => std::cmp::Ordering::Greater,
            };
            match order {
                std::cmp::Ordering::Less => {
                    delta.changed.push(i as u32);
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    let (namespace, name) = self.entries[j].key();
                    delta.removed.push(ObjectKey::new(namespace, name));
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    if !Arc::ptr_eq(&entries[i], &self.entries[j]) || export[i] != self.export[j] {
                        delta.changed.push(i as u32);
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
        delta
    }

    /// This table's identity (see [`Delta::base`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// What changed since the table this one was built from (`None`: built from scratch).
    pub fn delta(&self) -> Option<&Delta> {
        self.delta.as_ref()
    }

    /// Number of Services in the table.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// `(namespace, name)` of entry `i`.
    pub fn key_at(&self, i: u32) -> (&str, &str) {
        self.entries[i as usize].key()
    }

    /// The compiled Service `i` as a sidecar receives it: policy attached, every endpoint
    /// inline (the discovery stream's payload).
    pub fn service_at(&self, i: u32) -> OutboundService {
        let e = &self.entries[i as usize];
        let mut svc = (*e.service).clone();
        svc.policy = e.policy.clone();
        svc
    }

    /// Cluster IPs and endpoint IPs of entry `i`, without copying the Service.
    pub fn ips_at(&self, i: u32) -> impl Iterator<Item = std::net::IpAddr> + '_ {
        let s = &self.entries[i as usize].service;
        s.addresses.iter().copied().chain(
            s.ports
                .iter()
                .flat_map(|p| p.endpoints.iter().map(|e| e.address.ip())),
        )
    }

    /// Whether entry `i` of `self` and entry `j` of `other` are the same compiled value.
    /// Unchanged entries are shared between consecutive compiles, so this is a pointer
    /// comparison in the common case.
    pub fn same_entry(&self, i: u32, other: &Fragments, j: u32) -> bool {
        let (a, b) = (&self.entries[i as usize], &other.entries[j as usize]);
        Arc::ptr_eq(a, b) || (a.policy == b.policy && a.service == b.service)
    }

    /// Whether `namespace`, importing `import`, sees entry `i` directly (its export scope
    /// admits the namespace and the namespace imports the Service's). Split backends of a
    /// visible Service are visible too: callers follow [`Self::split_targets`] for that, the
    /// same closure [`Self::plan`] takes.
    pub fn directly_visible(&self, i: u32, namespace: &str, import: &Scope) -> bool {
        let e = &self.entries[i as usize];
        self.export[i as usize].contains(namespace) && import.contains(&e.service.namespace)
    }

    /// The `namespace/name` of every Service entry `i`'s policy splits to, whether it is in
    /// the table or not: an index kept across compiles must not lose an edge because its
    /// backend was missing when the edge was recorded.
    pub fn split_targets(&self, i: u32) -> impl Iterator<Item = ObjectKey> + '_ {
        self.entries[i as usize]
            .policy
            .iter()
            .flat_map(|p| &p.split)
            .filter_map(|b| {
                let (name, namespace) = b.service.split_once('.')?;
                Some(ObjectKey::new(namespace, name))
            })
    }

    /// The entries with a TrafficPolicy that a namespace importing `import` lists (sorted):
    /// the policy-bearing subset of [`Self::plan`]'s, computed over the policy-bearing entries
    /// alone. Only a policy splits, so a Service with a policy is visible either directly or
    /// as a split backend of another visible one with a policy: the closure stays among them.
    pub fn listed_policies(&self, namespace: &str, import: &Scope) -> Vec<u32> {
        if import.is_all() && !self.restricted {
            return self.with_policy.clone();
        }
        let mut seen: BTreeMap<u32, ()> = BTreeMap::new();
        let mut stack: Vec<u32> = self
            .with_policy
            .iter()
            .copied()
            .filter(|i| self.directly_visible(*i, namespace, import))
            .collect();
        while let Some(i) = stack.pop() {
            if seen.insert(i, ()).is_none() {
                stack.extend(
                    self.backends[i as usize]
                        .iter()
                        .filter(|b| self.entries[**b as usize].policy.is_some()),
                );
            }
        }
        seen.into_keys().collect()
    }

    /// [`trellis_proxy::config::policies_digest`] of the given entries (sorted indices), as
    /// the proxy computes it over a config listing them.
    pub fn policies_digest(&self, listed: &[u32]) -> String {
        trellis_proxy::config::policies_digest(listed.iter().filter_map(|i| {
            let e = &self.entries[*i as usize];
            Some((
                e.service.namespace.as_str(),
                e.service.name.as_str(),
                e.policy.as_ref()?,
            ))
        }))
    }

    /// Index of a Service, if it is in the table.
    pub fn index_of(&self, key: &ObjectKey) -> Option<u32> {
        self.find(&key.namespace, &key.name)
    }

    /// Index of the Service `namespace/name`, if it is in the table (a binary search).
    pub fn find(&self, namespace: &str, name: &str) -> Option<u32> {
        self.entries
            .binary_search_by(|e| e.key().cmp(&(namespace, name)))
            .ok()
            .map(|i| i as u32)
    }

    /// What `namespace`, importing from `import`, sees and in which variant.
    pub fn plan(&self, namespace: &str, inline: InlineEndpoints, import: &Scope) -> Plan {
        let include = if import.is_all() && !self.restricted {
            None
        } else {
            let mut seen = vec![false; self.entries.len()];
            let mut stack = Vec::new();
            let admit = |i: u32, seen: &mut Vec<bool>, stack: &mut Vec<u32>| {
                if !seen[i as usize] {
                    seen[i as usize] = true;
                    stack.push(i);
                }
            };
            let candidates: Box<dyn Iterator<Item = u32>> = match import {
                Scope::All => Box::new(0..self.entries.len() as u32),
                Scope::Only(set) => Box::new(
                    set.iter()
                        .filter_map(|ns| self.by_namespace.get(ns))
                        .flatten()
                        .copied(),
                ),
            };
            for i in candidates {
                if self.export[i as usize].contains(namespace) {
                    admit(i, &mut seen, &mut stack);
                }
            }
            // Split backends of what is visible, transitively.
            while let Some(i) = stack.pop() {
                for &b in &self.backends[i as usize] {
                    admit(b, &mut seen, &mut stack);
                }
            }
            Some(
                seen.iter()
                    .enumerate()
                    .filter(|(_, s)| **s)
                    .map(|(i, _)| i as u32)
                    .collect::<Vec<u32>>(),
            )
        };
        let (base_full, overrides) = match inline {
            InlineEndpoints::All => (true, Vec::new()),
            InlineEndpoints::None => (false, Vec::new()),
            InlineEndpoints::SameNamespace => (
                false,
                self.by_namespace
                    .get(namespace)
                    .map(|v| {
                        v.iter()
                            .copied()
                            .filter(|i| self.entries[*i as usize].remote.is_some())
                            .filter(|i| {
                                include
                                    .as_ref()
                                    .is_none_or(|list| list.binary_search(i).is_ok())
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
        };
        Plan {
            base_full,
            include,
            overrides,
        }
    }

    /// The included entries of a plan with the variant each uses, in table order.
    fn chosen<'a>(&'a self, plan: &'a Plan) -> impl Iterator<Item = &'a Fragment> + 'a {
        let all = 0..self.entries.len() as u32;
        let list: Box<dyn Iterator<Item = u32> + 'a> = match &plan.include {
            None => Box::new(all),
            Some(list) => Box::new(list.iter().copied()),
        };
        let mut overrides = plan.overrides.iter().peekable();
        list.map(move |i| {
            let flip = overrides.next_if(|o| **o == i).is_some();
            self.entries[i as usize].variant(plan.base_full != flip)
        })
    }

    /// The revision of a config: a hash over its header (with an empty revision) and the
    /// fragments' digests, so equal revisions mean equal text. For a namespace that sees the
    /// whole table, the base table's digest stands for all of its fragments and each override
    /// adds its position and digest: 200 namespaces cost 200 short hashes, not 200 tables.
    pub fn revision(&self, header: &ProxyConfig, plan: &Plan) -> String {
        debug_assert!(header.revision.is_empty() && header.outbound.is_empty());
        let mut h = Sha256::new();
        h.update(header.to_json_pretty().as_bytes());
        match &plan.include {
            None => {
                h.update(if plan.base_full {
                    self.full.0
                } else {
                    self.remote.0
                });
                for i in &plan.overrides {
                    h.update(i.to_le_bytes());
                    h.update(self.entries[*i as usize].variant(!plan.base_full).digest);
                }
            }
            Some(_) => {
                h.update(b"subset");
                for f in self.chosen(plan) {
                    h.update(f.digest);
                }
            }
        }
        hex::encode(&h.finalize()[..REVISION_LEN / 2])
    }

    fn text_len(&self, plan: &Plan) -> usize {
        if plan.include.is_some() {
            return self.chosen(plan).map(|f| f.text.len()).sum();
        }
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

    fn count(&self, plan: &Plan) -> usize {
        plan.include.as_ref().map_or(self.entries.len(), Vec::len)
    }

    /// Length of the rendered text, without rendering it.
    pub fn rendered_len(&self, header: &ProxyConfig, plan: &Plan) -> usize {
        let head = header.to_json_pretty().len();
        let count = self.count(plan);
        if count == 0 {
            return head;
        }
        head - EMPTY_TAIL.len() + "[\n".len() + self.text_len(plan) + 2 * (count - 1) + CLOSE.len()
    }

    /// The full `config.json` text: `header` (whose `outbound` is empty) with the plan's
    /// Services spliced into the `outbound` array.
    pub fn render(&self, header: &ProxyConfig, plan: &Plan) -> String {
        debug_assert!(header.outbound.is_empty());
        let head = header.to_json_pretty();
        if self.count(plan) == 0 {
            return head;
        }
        let stem = head
            .strip_suffix(EMPTY_TAIL)
            .expect("outbound is the last field of ProxyConfig");
        let mut out = String::with_capacity(self.rendered_len(header, plan));
        out.push_str(stem);
        out.push_str("[\n");
        for (i, f) in self.chosen(plan).enumerate() {
            if i > 0 {
                out.push_str(",\n");
            }
            out.push_str(&f.text);
        }
        out.push_str(CLOSE);
        out
    }
}

/// Length of [`Fragments::revision`]'s text (hex of 8 bytes), known before it is computed.
pub(crate) const REVISION_LEN: usize = 16;

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

    fn table(services: &[OutboundService], exports: &[(&str, &str, Scope)]) -> Table {
        Table {
            services: services
                .iter()
                .map(|s| {
                    (
                        ObjectKey::new(s.namespace.clone(), s.name.clone()),
                        Arc::new(s.clone()),
                    )
                })
                .collect(),
            exports: exports
                .iter()
                .map(|(ns, n, s)| (ObjectKey::new(*ns, *n), s.clone()))
                .collect(),
        }
    }

    fn only(names: &[&str]) -> Scope {
        Scope::Only(names.iter().map(|s| s.to_string()).collect())
    }

    fn services() -> Vec<OutboundService> {
        vec![
            svc("a", "x", true),
            svc("b", "x", false),
            svc("c", "y", true),
            svc("d", "y", true),
        ]
    }

    /// Text, length and revision of every plan against the contract's own serialization of the
    /// Services the namespace should see.
    fn check(
        frags: &Fragments,
        services: &[OutboundService],
        visible: impl Fn(&str, &OutboundService) -> bool,
        import: impl Fn(&str) -> Scope,
    ) {
        for inline in [
            InlineEndpoints::All,
            InlineEndpoints::None,
            InlineEndpoints::SameNamespace,
        ] {
            for ns in ["x", "y", "z"] {
                let plan = frags.plan(ns, inline, &import(ns));
                let mut h = header(ns);
                h.revision = "r".into();
                let text = frags.render(&h, &plan);
                assert_eq!(text.len(), frags.rendered_len(&h, &plan), "{inline:?} {ns}");
                let mut want = h.clone();
                want.outbound = services
                    .iter()
                    .filter(|s| visible(ns, s))
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
                assert!(
                    ProxyConfig::from_json(text.as_bytes()).is_ok(),
                    "{inline:?} {ns}"
                );
            }
        }
    }

    #[test]
    fn spliced_text_equals_the_contract_serialization() {
        let services = services();
        let frags = Fragments::build(table(&services, &[]), &BTreeMap::new(), &header("x"), None);
        assert!(frags.table_errors.is_none(), "{:?}", frags.table_errors);
        check(&frags, &services, |_, _| true, |_| Scope::All);
        // Different plans, different revisions; same plan, same revision.
        let (x, y) = (
            frags.plan("x", InlineEndpoints::SameNamespace, &Scope::All),
            frags.plan("y", InlineEndpoints::SameNamespace, &Scope::All),
        );
        let h = header("x");
        assert_ne!(frags.revision(&h, &x), frags.revision(&h, &y));
        assert_eq!(frags.revision(&h, &x), frags.revision(&h, &x.clone()));
    }

    #[test]
    fn export_and_import_narrow_what_a_namespace_sees() {
        let services = services();
        // a: only its own namespace; c: only z; d: nobody. Namespace z imports only from x.
        let exports = [
            ("x", "a", only(&["x"])),
            ("y", "c", only(&["z"])),
            ("y", "d", only(&[])),
        ];
        let frags = Fragments::build(
            table(&services, &exports),
            &BTreeMap::new(),
            &header("x"),
            None,
        );
        let import = |ns: &str| {
            if ns == "z" {
                only(&["x", "z"])
            } else {
                Scope::All
            }
        };
        let visible = |ns: &str, s: &OutboundService| match (s.namespace.as_str(), s.name.as_str())
        {
            ("x", "a") => ns == "x",
            ("x", "b") => true,
            ("y", "c") => false, // exported to z, but z does not import from y
            ("y", "d") => false,
            _ => unreachable!(),
        };
        check(&frags, &services, visible, import);
        // A namespace that sees nothing renders an empty table.
        let none = frags.plan("q", InlineEndpoints::SameNamespace, &only(&["q"]));
        assert_eq!(none.included(), Some(&[][..]));
        let h = header("q");
        assert_eq!(frags.render(&h, &none), h.to_json_pretty());
        assert_eq!(frags.rendered_len(&h, &none), h.to_json_pretty().len());
    }

    #[test]
    fn split_backends_follow_the_service_that_splits() {
        let mut services = services();
        // c (exported everywhere) splits to d (exported nowhere): whoever sees c sees d.
        let policy = TrafficPolicy {
            source: "y/canary".into(),
            split: vec![
                trellis_proxy::config::WeightedBackend {
                    service: "c.y".into(),
                    weight: 90,
                },
                trellis_proxy::config::WeightedBackend {
                    service: "d.y".into(),
                    weight: 10,
                },
            ],
            ..Default::default()
        };
        let policies = BTreeMap::from([(ObjectKey::new("y", "c"), policy.clone())]);
        let frags = Fragments::build(
            table(&services, &[("y", "d", only(&[]))]),
            &policies,
            &header("x"),
            None,
        );
        assert!(frags.table_errors.is_none(), "{:?}", frags.table_errors);
        services[2].policy = Some(policy);
        check(&frags, &services, |_, _| true, |_| Scope::All);
    }

    #[test]
    fn unchanged_services_are_reused_and_changed_ones_rebuilt() {
        let services = services();
        let first = Fragments::build(table(&services, &[]), &BTreeMap::new(), &header("x"), None);
        assert_eq!(first.serialized, 4);
        let again = Fragments::build(
            table(&services, &[]),
            &BTreeMap::new(),
            &header("x"),
            Some(&first),
        );
        assert_eq!(again.serialized, 0);
        let h = header("x");
        let plan = again.plan("x", InlineEndpoints::SameNamespace, &Scope::All);
        assert_eq!(again.revision(&h, &plan), first.revision(&h, &plan));

        // A policy on c, a new Service e, and b gone: two new entries, the rest reused, and the
        // result equal to a compile from scratch.
        let mut next = services.clone();
        next.remove(1);
        next.push(svc("e", "z", true));
        let policies = BTreeMap::from([(
            ObjectKey::new("y", "c"),
            TrafficPolicy {
                source: "y/p".into(),
                ..Default::default()
            },
        )]);
        let inc = Fragments::build(table(&next, &[]), &policies, &header("x"), Some(&first));
        let scratch = Fragments::build(table(&next, &[]), &policies, &header("x"), None);
        assert_eq!(inc.serialized, 2);
        for ns in ["x", "y", "z"] {
            let p = inc.plan(ns, InlineEndpoints::SameNamespace, &Scope::All);
            let q = scratch.plan(ns, InlineEndpoints::SameNamespace, &Scope::All);
            let h = header(ns);
            assert_eq!(inc.render(&h, &p), scratch.render(&h, &q));
            assert_eq!(inc.revision(&h, &p), scratch.revision(&h, &q));
        }
    }

    #[test]
    fn an_invalid_service_is_reported_by_name() {
        let mut bad = svc("a", "x", true);
        bad.identities = vec!["not-spiffe".into()];
        let frags = Fragments::build(table(&[bad], &[]), &BTreeMap::new(), &header("x"), None);
        let e = frags.table_errors.expect("refused");
        assert!(e.contains("Service x/a") && e.contains("spiffe://"), "{e}");
    }

    #[test]
    fn empty_table_renders_the_header() {
        let frags = Fragments::build(table(&[], &[]), &BTreeMap::new(), &header("x"), None);
        let plan = frags.plan("x", InlineEndpoints::SameNamespace, &Scope::All);
        let h = header("x");
        assert_eq!(frags.render(&h, &plan), h.to_json_pretty());
        assert_eq!(frags.rendered_len(&h, &plan), h.to_json_pretty().len());
    }
}
