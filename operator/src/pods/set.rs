//! The cached pods, indexed by namespace, copy-on-write per namespace.
//!
//! A [`PodSet`] is both the store's live state and the snapshot readers take: cloning it is one
//! `Arc` clone. A change goes through `Arc::make_mut`, so it copies the outer map (one entry per
//! namespace) and the one namespace it touches only when a snapshot still holds them, and then
//! only once until the next snapshot. The compile keeps the [`NamespacePods`] it compiled a
//! namespace from; the same `Arc` on the next compile means the namespace's pods did not change
//! (it is held, so its address cannot be reused by another set), which is how the compile
//! reuses that namespace's rows without looking at its pods.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::record::PodRecord;
use crate::compiler::SlimPod;

/// The pods of one namespace, by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NamespacePods {
    pods: BTreeMap<Arc<str>, Arc<PodRecord>>,
    /// How many of them have or want a sidecar: what makes a namespace meshed, read per compile
    /// without walking its pods.
    wanting_proxy: usize,
}

impl NamespacePods {
    pub fn get(&self, name: &str) -> Option<&PodRecord> {
        self.pods.get(name).map(|p| &**p)
    }

    /// The pods, by name.
    pub fn iter(&self) -> impl Iterator<Item = &PodRecord> {
        self.pods.values().map(|p| &**p)
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Whether some pod here has or wants a sidecar ([`PodRecord::wants_proxy`]).
    pub fn any_wants_proxy(&self) -> bool {
        self.wanting_proxy > 0
    }
}

/// Every cached pod, by namespace (sorted) then name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodSet {
    namespaces: Arc<BTreeMap<Arc<str>, Arc<NamespacePods>>>,
    len: usize,
}

impl PodSet {
    /// Builds a set from pods as the watch reads them, sharing repeated values as the store
    /// does (tests, `trellis dev`, benchmarks); pods without a name or namespace are skipped.
    pub fn from_pods<'a>(pods: impl IntoIterator<Item = &'a SlimPod>) -> Self {
        let mut interners = super::Interners::default();
        let mut set = Self::default();
        for pod in pods {
            if let Some(record) = PodRecord::read(pod, &mut interners) {
                set.insert(record);
            }
        }
        set
    }

    /// Inserts or replaces the pod of the record's namespace and name. Returns false, and
    /// touches nothing, when an equal record is already held: an update of something no reader
    /// reads (conditions, container statuses) then neither copies the namespace nor makes the
    /// next compile rebuild it.
    pub fn insert(&mut self, pod: PodRecord) -> bool {
        let held = self
            .namespace(pod.namespace())
            .and_then(|ns| ns.pods.get(pod.name()));
        if held.is_some_and(|held| **held == pod) {
            return false;
        }
        let namespaces = Arc::make_mut(&mut self.namespaces);
        let ns = Arc::make_mut(namespaces.entry(pod.namespace_arc().clone()).or_default());
        let wants = pod.wants_proxy();
        let previous = ns.pods.insert(pod.name_arc().clone(), Arc::new(pod));
        match previous {
            Some(p) => ns.wanting_proxy -= usize::from(p.wants_proxy()),
            None => self.len += 1,
        }
        ns.wanting_proxy += usize::from(wants);
        true
    }

    /// Removes a pod; returns whether it was held.
    pub fn remove(&mut self, namespace: &str, name: &str) -> bool {
        if self
            .namespace(namespace)
            .is_none_or(|ns| !ns.pods.contains_key(name))
        {
            return false;
        }
        let namespaces = Arc::make_mut(&mut self.namespaces);
        let Some(entry) = namespaces.get_mut(namespace) else {
            return false;
        };
        let ns = Arc::make_mut(entry);
        if let Some(p) = ns.pods.remove(name) {
            ns.wanting_proxy -= usize::from(p.wants_proxy());
            self.len -= 1;
        }
        if ns.pods.is_empty() {
            namespaces.remove(namespace);
        }
        true
    }

    /// The pods of one namespace (`None`: it has none).
    pub fn namespace(&self, namespace: &str) -> Option<&Arc<NamespacePods>> {
        self.namespaces.get(namespace)
    }

    /// The namespaces holding pods, sorted, with their pods.
    pub fn namespaces(&self) -> impl Iterator<Item = (&str, &Arc<NamespacePods>)> {
        self.namespaces.iter().map(|(k, v)| (&**k, v))
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&PodRecord> {
        self.namespace(namespace)?.get(name)
    }

    /// Every pod, by namespace then name.
    pub fn iter(&self) -> impl Iterator<Item = &PodRecord> {
        self.namespaces.values().flat_map(|ns| ns.iter())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Takes `previous`'s pod set of every namespace whose pods are equal (what a relist does,
    /// so that one that changed nothing leaves the compile's reuse intact and frees the copies).
    pub fn keep_unchanged(&mut self, previous: &PodSet) {
        let namespaces = Arc::make_mut(&mut self.namespaces);
        for (name, pods) in namespaces.iter_mut() {
            if let Some(held) = previous.namespace(name)
                && held == pods
            {
                *pods = held.clone();
            }
        }
    }
}

impl FromIterator<PodRecord> for PodSet {
    fn from_iter<I: IntoIterator<Item = PodRecord>>(iter: I) -> Self {
        let mut set = Self::default();
        for pod in iter {
            set.insert(pod);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ns: &str, name: &str, injected: bool) -> PodRecord {
        let mut pod: SlimPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns}, "status": {"podIP": "10.0.0.1"}
        }))
        .unwrap();
        if injected {
            pod.metadata.annotations = Some(
                [(
                    crate::compiler::PROXY_VERSION_ANNOTATION.into(),
                    "p:1".into(),
                )]
                .into(),
            );
        }
        PodRecord::of(&pod).unwrap()
    }

    #[test]
    fn indexed_by_namespace_and_copied_only_where_a_snapshot_holds_what_changes() {
        let mut live: PodSet = [
            record("a", "x", false),
            record("a", "y", true),
            record("b", "z", false),
        ]
        .into_iter()
        .collect();
        assert_eq!(live.len(), 3);
        let names: Vec<_> = live
            .namespace("a")
            .unwrap()
            .iter()
            .map(|p| p.name())
            .collect();
        assert_eq!(names, ["x", "y"]);
        assert!(live.namespace("a").unwrap().any_wants_proxy());
        assert!(!live.namespace("b").unwrap().any_wants_proxy());

        let snapshot = live.clone();
        assert!(live.insert(record("b", "w", true)));
        // The snapshot did not move; namespace `a` is still the same allocation in both.
        assert_eq!(snapshot.len(), 3);
        assert!(snapshot.get("b", "w").is_none());
        assert!(Arc::ptr_eq(
            snapshot.namespace("a").unwrap(),
            live.namespace("a").unwrap()
        ));
        assert!(!Arc::ptr_eq(
            snapshot.namespace("b").unwrap(),
            live.namespace("b").unwrap()
        ));
        assert!(live.namespace("b").unwrap().any_wants_proxy());

        // An equal record changes nothing, not even the namespace's allocation.
        let before = live.clone();
        assert!(!live.insert(record("b", "w", true)));
        assert!(Arc::ptr_eq(
            before.namespace("b").unwrap(),
            live.namespace("b").unwrap()
        ));
        // Replacing a pod keeps the count and follows its sidecar.
        assert!(live.insert(record("b", "w", false)));
        assert_eq!(live.len(), 4);
        assert!(!live.namespace("b").unwrap().any_wants_proxy());

        assert!(live.remove("a", "y"));
        assert!(!live.remove("a", "y"), "already gone");
        assert!(!live.remove("nowhere", "y"));
        assert!(!live.namespace("a").unwrap().any_wants_proxy());
        assert!(live.remove("a", "x"));
        assert!(
            live.namespace("a").is_none(),
            "an empty namespace is dropped"
        );
        assert_eq!(live.len(), 2);
        assert_eq!(live.iter().count(), 2);
        assert_eq!(snapshot.len(), 3, "snapshots never see later changes");
    }
}
