//! What the discovery stream serves from: one compile's table, indexed for the questions a
//! proxy asks (a Service by name, a Service by address) and for the visibility check.
//!
//! It is built from the compiler's [`Output`], the same entries the ConfigMaps are rendered
//! from, so a Service pushed on the stream and a Service in a ConfigMap are the same value
//! (policy included), and the visibility rule is the compiler's own
//! ([`crate::compiler::visibility`]): what a proxy may learn is what its namespace's table
//! would list.
//!
//! # Following compiles at the cost of what changed
//! At 10 000 Services and 100 000 endpoints, re-indexing every address on each compile cost
//! more than the compile itself, and an endpoint change touches one Service. So a view
//! [`follows`](View::follow) the next compile in place: the compiler says which entries it
//! rebuilt (`Fragments::delta`), only those entries' addresses and split edges are replaced,
//! and the [`Changes`] it returns (those Services, the Services their splits reach, the
//! namespaces whose import scope moved) are what the registry re-checks. A compile that was not
//! built from the view's own (a skipped output) rebuilds the view from scratch; a property test
//! (`operator/tests/discovery_props.rs`) holds the two equal.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use trellis_proxy::config::OutboundService;
use trellis_proxy::discovery::Target;

use crate::compiler::visibility::Scope;
use crate::compiler::{Fragments, ObjectKey, Output};

/// What decides what a namespace may see of a Service. Every part is shared, so keeping the
/// state from before an update (to tell which subscribers an update changed) costs three
/// reference counts, not a copy of the table.
#[derive(Clone)]
struct Visibility {
    fragments: Arc<Fragments>,
    imports: Arc<BTreeMap<String, Scope>>,
    /// Services whose policy splits traffic to each Service (the reverse of the split
    /// backends), by name: a backend is visible to whoever sees a Service splitting to it.
    split_from: Arc<HashMap<ObjectKey, Vec<ObjectKey>>>,
}

impl Visibility {
    fn import(&self, namespace: &str) -> &Scope {
        static ALL: Scope = Scope::All;
        self.imports.get(namespace).unwrap_or(&ALL)
    }

    /// Whether `namespace` may see entry `i`: directly, or as a split backend of a Service it
    /// may see (as [`Fragments::plan`] decides for the ConfigMap). Split chains are short
    /// (a policy splits to a handful of backends); the walk is bounded by the table anyway.
    fn visible(&self, i: u32, namespace: &str) -> bool {
        let import = self.import(namespace);
        let mut seen = vec![i];
        let mut stack = vec![i];
        while let Some(j) = stack.pop() {
            if self.fragments.directly_visible(j, namespace, import) {
                return true;
            }
            let (ns, name) = self.fragments.key_at(j);
            let sources = self.split_from.get(&ObjectKey::new(ns, name));
            for source in sources.into_iter().flatten() {
                if let Some(k) = self.fragments.index_of(source)
                    && !seen.contains(&k)
                {
                    seen.push(k);
                    stack.push(k);
                }
            }
        }
        false
    }

    /// The entry of a `name.namespace` key, if `namespace` may see it.
    fn lookup(&self, key: &str, namespace: &str) -> Option<u32> {
        let (name, ns) = key.split_once('.')?;
        self.fragments
            .find(ns, name)
            .filter(|i| self.visible(*i, namespace))
    }

    /// Whether what `namespace` learns about `key` differs between `before` and `self`.
    fn differs(&self, before: &Visibility, key: &str, namespace: &str) -> bool {
        match (self.lookup(key, namespace), before.lookup(key, namespace)) {
            (None, None) => false,
            (Some(i), Some(j)) => !self.fragments.same_entry(i, &before.fragments, j),
            _ => true,
        }
    }
}

/// What a [`View::follow`] changed: what the registry re-checks for the streams subscribed to
/// it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// `name.namespace` keys of the Services whose entry, export scope or visibility through a
    /// split changed (added and removed ones included).
    pub services: BTreeSet<String>,
    /// Namespaces whose import scope changed: everything their proxies hold may have.
    pub namespaces: BTreeSet<String>,
}

/// One compile's table, indexed.
#[derive(Clone)]
pub struct View {
    generation: u64,
    vis: Visibility,
    /// Cluster IPs and endpoint IPs -> Services (several Services may select the same pod;
    /// sorted by namespace and name, so the answer is deterministic). One key `Arc` per
    /// Service, shared by all its addresses.
    by_addr: HashMap<IpAddr, Vec<Arc<ObjectKey>>>,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("generation", &self.generation)
            .field("services", &self.vis.fragments.len())
            .finish_non_exhaustive()
    }
}

fn key_of(fragments: &Fragments, i: u32) -> ObjectKey {
    let (namespace, name) = fragments.key_at(i);
    ObjectKey::new(namespace, name)
}

/// `name.namespace`, the key proxies subscribe with.
fn wire_key(key: &ObjectKey) -> String {
    format!("{}.{}", key.name, key.namespace)
}

fn add_addresses(by_addr: &mut HashMap<IpAddr, Vec<Arc<ObjectKey>>>, f: &Fragments, i: u32) {
    let key = Arc::new(key_of(f, i));
    for ip in f.ips_at(i) {
        let list = by_addr.entry(ip).or_default();
        if let Err(at) = list.binary_search_by(|k| (**k).cmp(&key)) {
            list.insert(at, key.clone());
        }
    }
}

fn remove_addresses(by_addr: &mut HashMap<IpAddr, Vec<Arc<ObjectKey>>>, f: &Fragments, i: u32) {
    let key = key_of(f, i);
    for ip in f.ips_at(i) {
        if let Some(list) = by_addr.get_mut(&ip) {
            list.retain(|k| **k != key);
            if list.is_empty() {
                by_addr.remove(&ip);
            }
        }
    }
}

fn add_splits(split_from: &mut HashMap<ObjectKey, Vec<ObjectKey>>, f: &Fragments, i: u32) {
    let source = key_of(f, i);
    for target in f.split_targets(i) {
        let list = split_from.entry(target).or_default();
        if !list.contains(&source) {
            list.push(source.clone());
        }
    }
}

fn remove_splits(split_from: &mut HashMap<ObjectKey, Vec<ObjectKey>>, f: &Fragments, i: u32) {
    let source = key_of(f, i);
    for target in f.split_targets(i) {
        if let Some(list) = split_from.get_mut(&target) {
            list.retain(|k| *k != source);
            if list.is_empty() {
                split_from.remove(&target);
            }
        }
    }
}

impl View {
    /// Indexes a compile's output from scratch; `generation` numbers the views a server
    /// publishes.
    pub fn new(out: &Output, generation: u64) -> Option<Self> {
        let fragments = out.fragments()?.clone();
        let mut by_addr = HashMap::new();
        let mut split_from = HashMap::new();
        for i in 0..fragments.len() as u32 {
            add_addresses(&mut by_addr, &fragments, i);
            add_splits(&mut split_from, &fragments, i);
        }
        Some(Self {
            generation,
            vis: Visibility {
                fragments,
                imports: out.imports().clone(),
                split_from: Arc::new(split_from),
            },
            by_addr,
        })
    }

    /// Moves this view to the compile `out` in place, re-indexing only the Services the
    /// compiler rebuilt, and says what changed. `None` when `out` was not compiled from this
    /// view's compile (then [`View::new`] is the way) or carries no table; the view is then
    /// left as it was.
    pub fn follow(&mut self, out: &Output, generation: u64) -> Option<Changes> {
        let next = out.fragments()?;
        let delta = next.delta().filter(|d| d.base == self.vis.fragments.id())?;
        let prev = std::mem::replace(&mut self.vis.fragments, next.clone());
        let mut changes = Changes::default();
        // Services whose visibility may have moved: the rebuilt and removed ones, and what
        // their splits reach, before and after (a backend is seen through its sources).
        let mut stack: Vec<ObjectKey> = delta
            .removed
            .iter()
            .cloned()
            .chain(delta.changed.iter().map(|i| key_of(next, *i)))
            .collect();
        let mut affected: BTreeSet<ObjectKey> = BTreeSet::new();
        while let Some(key) = stack.pop() {
            if !affected.insert(key.clone()) {
                continue;
            }
            for f in [&prev, next] {
                if let Some(i) = f.index_of(&key) {
                    stack.extend(f.split_targets(i).filter(|t| !affected.contains(t)));
                }
            }
        }
        let split_from = Arc::make_mut(&mut self.vis.split_from);
        for key in delta
            .removed
            .iter()
            .cloned()
            .chain(delta.changed.iter().map(|i| key_of(next, *i)))
        {
            if let Some(j) = prev.index_of(&key) {
                remove_addresses(&mut self.by_addr, &prev, j);
                remove_splits(split_from, &prev, j);
            }
        }
        for &i in &delta.changed {
            add_addresses(&mut self.by_addr, next, i);
            add_splits(split_from, next, i);
        }
        changes.services = affected.iter().map(wire_key).collect();
        let imports = out.imports();
        if !Arc::ptr_eq(imports, &self.vis.imports) {
            let (old, new) = (&*self.vis.imports, &**imports);
            changes.namespaces = old
                .keys()
                .chain(new.keys())
                .filter(|ns| old.get(*ns) != new.get(*ns))
                .cloned()
                .collect();
            self.vis.imports = imports.clone();
        }
        self.generation = generation;
        Some(changes)
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The `name.namespace` key a target resolves to for a proxy of `namespace`, if it names a
    /// Service that namespace may see.
    pub fn resolve(&self, target: &Target, namespace: &str) -> Option<String> {
        match target {
            Target::Service(key) => self.vis.lookup(key, namespace).map(|_| key.clone()),
            Target::Address(ip) => self.by_addr.get(ip)?.iter().find_map(|key| {
                let i = self.vis.fragments.index_of(key)?;
                self.vis.visible(i, namespace).then(|| wire_key(key))
            }),
        }
    }

    /// The Service behind `key` as a proxy of `namespace` may see it (`None`: gone, or not
    /// visible to that namespace).
    pub fn service(&self, key: &str, namespace: &str) -> Option<OutboundService> {
        let i = self.vis.lookup(key, namespace)?;
        Some(self.vis.fragments.service_at(i))
    }

    /// Whether what `namespace` learns about `key` differs between `previous` and this view.
    pub fn changed(&self, previous: &View, key: &str, namespace: &str) -> bool {
        self.vis.differs(&previous.vis, key, namespace)
    }

    /// Every address with the Services behind it, in order (tests compare a followed view
    /// with one built from scratch).
    pub fn addresses(&self) -> BTreeMap<IpAddr, Vec<String>> {
        self.by_addr
            .iter()
            .map(|(ip, keys)| (*ip, keys.iter().map(|k| wire_key(k)).collect()))
            .collect()
    }

    /// Number of Services.
    pub fn len(&self) -> usize {
        self.vis.fragments.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vis.fragments.len() == 0
    }
}

/// A view's state before an update, kept by the registry to tell which subscribers an update
/// changed (shared parts only).
#[derive(Clone)]
pub(crate) struct Before(Visibility);

impl View {
    pub(crate) fn before(&self) -> Before {
        Before(self.vis.clone())
    }

    /// Whether what `namespace` learns about `key` differs between `before` and now.
    pub(crate) fn changed_since(&self, before: &Before, key: &str, namespace: &str) -> bool {
        self.vis.differs(&before.0, key, namespace)
    }
}
