//! The pure core of the pod cache: the pod watcher's events applied to a [`PodSet`], with the
//! semantics of kube's reflector store (`kube::runtime::reflector::store::Writer`):
//! - `Apply` inserts or replaces, `Delete` removes, both in the live set at once;
//! - `Init` starts a relist into a buffer, `InitApply` fills the buffer, and `InitDone`
//!   replaces the live set with the buffer in one step, so a reader never sees a half-listed
//!   cluster (pods missing from a relist are gone after it, pods deleted while the watch was
//!   down included);
//! - the first `InitDone` marks the cache synced (what the controllers wait for).

use kube::runtime::watcher::Event;

use super::record::{Interners, PodRecord};
use super::set::PodSet;
use crate::compiler::SlimPod;

/// The pod cache's state: the live set, the relist in progress, the shared values.
#[derive(Debug, Default)]
pub struct PodIndex {
    live: PodSet,
    relist: PodSet,
    interners: Interners,
    synced: bool,
}

impl PodIndex {
    /// Applies one watcher event. Returns whether the live set changed.
    pub fn apply(&mut self, event: &Event<SlimPod>) -> bool {
        match event {
            Event::Apply(pod) => match PodRecord::read(pod, &mut self.interners) {
                Some(record) => self.live.insert(record),
                None => false,
            },
            Event::Delete(pod) => match (&pod.metadata.namespace, &pod.metadata.name) {
                (Some(ns), Some(name)) => self.live.remove(ns, name),
                _ => false,
            },
            Event::Init => {
                self.relist = PodSet::default();
                false
            }
            Event::InitApply(pod) => {
                if let Some(record) = PodRecord::read(pod, &mut self.interners) {
                    self.relist.insert(record);
                }
                false
            }
            Event::InitDone => {
                let mut fresh = std::mem::take(&mut self.relist);
                fresh.keep_unchanged(&self.live);
                let changed = fresh != self.live;
                self.live = fresh;
                self.synced = true;
                changed
            }
        }
    }

    /// The live set (clone it for a snapshot: one `Arc` clone).
    pub fn pods(&self) -> &PodSet {
        &self.live
    }

    /// Whether a first list completed: before that the set is not the cluster's.
    pub fn synced(&self) -> bool {
        self.synced
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn pod(ns: &str, name: &str, ip: &str) -> SlimPod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns},
            "status": {"podIP": ip}
        }))
        .unwrap()
    }

    fn names(index: &PodIndex) -> Vec<String> {
        index
            .pods()
            .iter()
            .map(|p| format!("{}/{}", p.namespace(), p.name()))
            .collect()
    }

    #[test]
    fn applies_and_deletes_in_the_live_set() {
        let mut index = PodIndex::default();
        assert!(index.apply(&Event::Apply(pod("a", "x", "10.0.0.1"))));
        assert!(index.apply(&Event::Apply(pod("a", "y", "10.0.0.2"))));
        assert!(
            !index.apply(&Event::Apply(pod("a", "y", "10.0.0.2"))),
            "no change"
        );
        assert!(
            index.apply(&Event::Apply(pod("a", "y", "10.0.0.3"))),
            "a new IP"
        );
        assert_eq!(
            index.pods().get("a", "y").unwrap().ip(),
            Some("10.0.0.3".parse().unwrap())
        );
        assert!(index.apply(&Event::Delete(pod("a", "x", "10.0.0.1"))));
        assert!(!index.apply(&Event::Delete(pod("a", "x", "10.0.0.1"))));
        assert_eq!(names(&index), ["a/y"]);
        assert!(!index.synced(), "no list completed yet");
        // Bad input changes nothing.
        let mut nameless = pod("a", "", "10.0.0.9");
        assert!(!index.apply(&Event::Apply(nameless.clone())));
        nameless.metadata.name = None;
        assert!(!index.apply(&Event::Delete(nameless)));
        assert_eq!(names(&index), ["a/y"]);
    }

    #[test]
    fn a_relist_replaces_the_set_at_init_done_and_drops_what_it_did_not_list() {
        let mut index = PodIndex::default();
        index.apply(&Event::Init);
        index.apply(&Event::InitApply(pod("a", "x", "10.0.0.1")));
        index.apply(&Event::InitApply(pod("b", "y", "10.0.0.2")));
        assert!(index.pods().is_empty(), "nothing visible before InitDone");
        assert!(!index.synced());
        assert!(index.apply(&Event::InitDone));
        assert!(index.synced());
        assert_eq!(names(&index), ["a/x", "b/y"]);

        // The watch broke and relists: `a/x` was deleted meanwhile, `c/z` created, `b/y`
        // unchanged.
        let before = index.pods().clone();
        index.apply(&Event::Init);
        index.apply(&Event::InitApply(pod("b", "y", "10.0.0.2")));
        index.apply(&Event::InitApply(pod("c", "z", "10.0.0.3")));
        assert_eq!(names(&index), ["a/x", "b/y"], "the old set until InitDone");
        assert!(index.apply(&Event::InitDone));
        assert_eq!(names(&index), ["b/y", "c/z"]);
        assert!(index.synced());
        // The unchanged namespace is the very set the compile saw before: its rows are reused.
        assert!(Arc::ptr_eq(
            before.namespace("b").unwrap(),
            index.pods().namespace("b").unwrap()
        ));

        // A relist that lists exactly what is held changes nothing at all.
        index.apply(&Event::Init);
        index.apply(&Event::InitApply(pod("b", "y", "10.0.0.2")));
        index.apply(&Event::InitApply(pod("c", "z", "10.0.0.3")));
        assert!(!index.apply(&Event::InitDone));

        // A relist that lists nothing empties the set (every pod was deleted).
        index.apply(&Event::Init);
        assert!(index.apply(&Event::InitDone));
        assert!(index.pods().is_empty());
        assert!(
            index.synced(),
            "synced stays: the set is the cluster's, empty"
        );
    }

    #[test]
    fn a_relist_started_again_discards_the_half_listed_buffer() {
        let mut index = PodIndex::default();
        index.apply(&Event::Init);
        index.apply(&Event::InitApply(pod("a", "x", "10.0.0.1")));
        // The list failed half way; the watcher starts over.
        index.apply(&Event::Init);
        index.apply(&Event::InitApply(pod("b", "y", "10.0.0.2")));
        index.apply(&Event::InitDone);
        assert_eq!(names(&index), ["b/y"]);
    }
}
