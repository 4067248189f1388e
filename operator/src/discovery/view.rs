//! What the discovery stream serves from: one compile's table, indexed for the questions a
//! proxy asks (a Service by name, a Service by address) and for the visibility check.
//!
//! It is built from the compiler's [`Output`], the same entries the ConfigMaps are rendered
//! from, so a Service pushed on the stream and a Service in a ConfigMap are the same value
//! (policy included), and the visibility rule is the compiler's own
//! ([`crate::compiler::visibility`]): what a proxy may learn is what its namespace's table
//! would list.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use trellis_proxy::config::OutboundService;
use trellis_proxy::discovery::Target;

use crate::compiler::visibility::Scope;
use crate::compiler::{Fragments, Output};

/// One compile's table, indexed. Immutable; a new compile makes a new view.
pub struct View {
    generation: u64,
    fragments: Arc<Fragments>,
    imports: HashMap<String, Scope>,
    /// Cluster IPs and endpoint IPs -> entries (several Services may select the same pod;
    /// sorted, so the answer is deterministic).
    by_addr: HashMap<IpAddr, Vec<u32>>,
    /// Entries that split traffic to each entry (the reverse of `split_backends`).
    split_from: Vec<Vec<u32>>,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("generation", &self.generation)
            .field("services", &self.fragments.len())
            .finish_non_exhaustive()
    }
}

impl View {
    /// Indexes a compile's output; `generation` numbers the views a server publishes.
    pub fn new(out: &Output, generation: u64) -> Option<Self> {
        let fragments = out.fragments()?.clone();
        let n = fragments.len() as u32;
        let mut by_addr: HashMap<IpAddr, Vec<u32>> = HashMap::new();
        let mut split_from = vec![Vec::new(); n as usize];
        for i in 0..n {
            for ip in fragments.ips_at(i) {
                let list = by_addr.entry(ip).or_default();
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
            for &b in fragments.split_backends(i) {
                split_from[b as usize].push(i);
            }
        }
        let imports = out
            .meshed
            .iter()
            .filter(|ns| !out.import_scope(ns).is_all())
            .map(|ns| (ns.clone(), out.import_scope(ns).clone()))
            .collect();
        Some(Self {
            generation,
            fragments,
            imports,
            by_addr,
            split_from,
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn import(&self, namespace: &str) -> &Scope {
        static ALL: Scope = Scope::All;
        self.imports.get(namespace).unwrap_or(&ALL)
    }

    /// The entry of a `name.namespace` key.
    fn index_of_key(&self, key: &str) -> Option<u32> {
        let (name, namespace) = key.split_once('.')?;
        self.fragments
            .index_of(&crate::compiler::ObjectKey::new(namespace, name))
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
            for &k in &self.split_from[j as usize] {
                if !seen.contains(&k) {
                    seen.push(k);
                    stack.push(k);
                }
            }
        }
        false
    }

    /// The `name.namespace` key a target resolves to for a proxy of `namespace`, if it names a
    /// Service that namespace may see.
    pub fn resolve(&self, target: &Target, namespace: &str) -> Option<String> {
        let i = match target {
            Target::Service(key) => self
                .index_of_key(key)
                .filter(|i| self.visible(*i, namespace))?,
            Target::Address(ip) => *self
                .by_addr
                .get(ip)?
                .iter()
                .find(|i| self.visible(**i, namespace))?,
        };
        Some(self.key_of(i))
    }

    fn key_of(&self, i: u32) -> String {
        let (namespace, name) = self.fragments.key_at(i);
        format!("{name}.{namespace}")
    }

    /// The Service behind `key` as a proxy of `namespace` may see it (`None`: gone, or not
    /// visible to that namespace).
    pub fn service(&self, key: &str, namespace: &str) -> Option<OutboundService> {
        let i = self.index_of_key(key)?;
        self.visible(i, namespace)
            .then(|| self.fragments.service_at(i))
    }

    /// Whether what `namespace` learns about `key` differs between `previous` and this view.
    pub fn changed(&self, previous: &View, key: &str, namespace: &str) -> bool {
        let now = self
            .index_of_key(key)
            .filter(|i| self.visible(*i, namespace));
        let before = previous
            .index_of_key(key)
            .filter(|i| previous.visible(*i, namespace));
        match (now, before) {
            (None, None) => false,
            (Some(i), Some(j)) => !self.fragments.same_entry(i, &previous.fragments, j),
            _ => true,
        }
    }

    /// Number of Services.
    pub fn len(&self) -> usize {
        self.fragments.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fragments.len() == 0
    }
}
