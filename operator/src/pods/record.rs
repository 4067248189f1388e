//! One cached pod: exactly what the operator's readers use, with repeated values shared.
//!
//! What each reader takes from a pod:
//! - the compiler: namespace, name, labels (Service selectors, `trellis.dev/inject`), the
//!   service account, the IPs, and whether the pod was injected (`trellis.dev/proxy-version`);
//! - the discovery replica's propagation report: name and IPs;
//! - the Mesh's proxy counts: the proxy version and whether the pod is being deleted;
//! - the rollout: the controller owner reference, the `pod-template-hash` label, the proxy
//!   version, the primary IP and whether the pod is being deleted.
//!
//! Nothing else is kept. Values many pods repeat are shared through [`Interners`]: the
//! namespace, service account and proxy version as one `Arc<str>` each, the labels as one
//! `Arc` map per distinct set (the pods of one ReplicaSet have equal ones), the controller
//! owner reference as one `Arc` per owner. A record is about 140 bytes plus its name, against
//! about 1.2 KB for a compacted `SlimPod` in a reflector store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use crate::compiler::SlimPod;

/// A pod as the operator caches it. Built by [`PodRecord::read`]; equal records are the same
/// pod as far as every reader can tell, which is what lets the store ignore updates that change
/// nothing it keeps.
#[derive(Clone, Debug, PartialEq)]
pub struct PodRecord {
    namespace: Arc<str>,
    name: Arc<str>,
    service_account: Arc<str>,
    labels: Option<Arc<BTreeMap<String, String>>>,
    proxy_version: Option<Arc<str>>,
    controller: Option<Arc<OwnerReference>>,
    /// `status.podIP`, parsed.
    ip: Option<IpAddr>,
    /// The other addresses of `status.podIPs` (dual stack), parsed; empty (no allocation) for
    /// the usual single-address pod.
    more_ips: Box<[IpAddr]>,
    deleting: bool,
}

impl PodRecord {
    /// The record of `pod`, sharing repeated values through `interners`; `None` for a pod
    /// without a name or namespace (the API server never sends one; such an object cannot be
    /// keyed, so it is skipped rather than cached under an empty key).
    pub fn read(pod: &SlimPod, interners: &mut Interners) -> Option<Self> {
        let meta = &pod.metadata;
        let name = meta.name.as_deref().filter(|n| !n.is_empty())?;
        let namespace = meta.namespace.as_deref().filter(|n| !n.is_empty())?;
        let ips = pod.ips();
        let ip = pod
            .status
            .pod_ip
            .as_deref()
            .and_then(|ip| ip.parse::<IpAddr>().ok());
        let more_ips: Box<[IpAddr]> = ips.into_iter().filter(|i| Some(*i) != ip).collect();
        Some(Self {
            namespace: interners.string(namespace),
            name: name.into(),
            service_account: interners.string(pod.service_account()),
            labels: pod
                .labels()
                .filter(|l| !l.is_empty())
                .map(|l| interners.labels(l)),
            proxy_version: pod.proxy_version().map(|v| interners.string(v)),
            controller: pod.controller().map(|o| interners.owner(o)),
            ip,
            more_ips,
            deleting: meta.deletion_timestamp.is_some(),
        })
    }

    /// [`PodRecord::read`] without sharing (tests and one-off conversions).
    pub fn of(pod: &SlimPod) -> Option<Self> {
        Self::read(pod, &mut Interners::default())
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The namespace as the shared string the set is keyed by.
    pub(crate) fn namespace_arc(&self) -> &Arc<str> {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn name_arc(&self) -> &Arc<str> {
        &self.name
    }

    /// The service account, `default` when the pod names none (as the API server defaults it).
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    pub fn labels(&self) -> Option<&BTreeMap<String, String>> {
        self.labels.as_deref()
    }

    /// The injector's `trellis.dev/proxy-version`: set on every pod that received a sidecar.
    pub fn proxy_version(&self) -> Option<&str> {
        self.proxy_version.as_deref()
    }

    /// The owner reference marked `controller` (the ReplicaSet, StatefulSet or DaemonSet that
    /// manages the pod): what the rollout restarts.
    pub fn controller(&self) -> Option<&OwnerReference> {
        self.controller.as_deref()
    }

    /// `status.podIP`: the address the rollout's health gate scrapes.
    pub fn ip(&self) -> Option<IpAddr> {
        self.ip
    }

    /// Every address of the pod (`status.podIP` first, then the rest of `status.podIPs`).
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ip.into_iter().chain(self.more_ips.iter().copied())
    }

    /// Whether the pod has a deletion timestamp: on its way out, so not counted.
    pub fn is_deleting(&self) -> bool {
        self.deleting
    }

    /// Whether the pod has or wants a sidecar ([`crate::inject::scope::pod_wants_proxy`]).
    pub fn wants_proxy(&self) -> bool {
        self.proxy_version.is_some() || crate::inject::scope::pod_wants_proxy(self.labels(), None)
    }
}

/// Equal values share one allocation. Entries nobody else holds any more are dropped once the
/// set has doubled since the last sweep, so churn (every rollout brings a new
/// `pod-template-hash`) does not make it grow without bound.
#[derive(Debug)]
struct Interner<T: ?Sized> {
    set: HashSet<Arc<T>>,
    swept_at: usize,
}

impl<T: ?Sized> Default for Interner<T> {
    fn default() -> Self {
        Self {
            set: HashSet::new(),
            swept_at: 0,
        }
    }
}

impl<T: ?Sized + Hash + Eq> Interner<T> {
    fn intern(&mut self, value: &T, make: impl FnOnce() -> Arc<T>) -> Arc<T> {
        if let Some(held) = self.set.get(value) {
            return held.clone();
        }
        if self.set.len() >= 2 * self.swept_at.max(512) {
            self.set.retain(|v| Arc::strong_count(v) > 1);
            self.swept_at = self.set.len();
        }
        let new = make();
        self.set.insert(new.clone());
        new
    }
}

/// The shared values of one pod cache (one per [`super::PodIndex`]).
#[derive(Debug, Default)]
pub struct Interners {
    strings: Interner<str>,
    labels: Interner<BTreeMap<String, String>>,
    /// By owner uid (an `OwnerReference` is not `Hash`); swept like the interners.
    owners: HashMap<String, Arc<OwnerReference>>,
    owners_swept_at: usize,
}

impl Interners {
    fn string(&mut self, s: &str) -> Arc<str> {
        self.strings.intern(s, || s.into())
    }

    fn labels(&mut self, labels: &BTreeMap<String, String>) -> Arc<BTreeMap<String, String>> {
        self.labels.intern(labels, || Arc::new(labels.clone()))
    }

    fn owner(&mut self, owner: &OwnerReference) -> Arc<OwnerReference> {
        if let Some(held) = self.owners.get(&owner.uid)
            && **held == *owner
        {
            return held.clone();
        }
        if self.owners.len() >= 2 * self.owners_swept_at.max(512) {
            self.owners.retain(|_, o| Arc::strong_count(o) > 1);
            self.owners_swept_at = self.owners.len();
        }
        let shared = Arc::new(owner.clone());
        self.owners.insert(shared.uid.clone(), shared.clone());
        shared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slim(json: serde_json::Value) -> SlimPod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn keeps_what_the_readers_read_and_shares_repeated_values() {
        let pod = |name: &str, ip: &str| {
            slim(serde_json::json!({
                "metadata": {"name": name, "namespace": "shop",
                    "labels": {"app": "web", "pod-template-hash": "abc"},
                    "annotations": {"trellis.dev/proxy-version": "p:1", "other": "x"},
                    "ownerReferences": [
                        {"apiVersion": "v1", "kind": "Node", "name": "n", "uid": "n1"},
                        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-abc",
                         "uid": "rs1", "controller": true}]},
                "spec": {"serviceAccountName": "web"},
                "status": {"podIP": ip, "podIPs": [{"ip": ip}, {"ip": "fd00::5"}]}
            }))
        };
        let mut interners = Interners::default();
        let a = PodRecord::read(&pod("web-1", "10.0.0.1"), &mut interners).unwrap();
        let b = PodRecord::read(&pod("web-2", "10.0.0.2"), &mut interners).unwrap();
        assert_eq!((a.namespace(), a.name()), ("shop", "web-1"));
        assert_eq!(a.service_account(), "web");
        assert_eq!(a.proxy_version(), Some("p:1"));
        assert_eq!(
            a.controller().unwrap().name,
            "web-abc",
            "the controller, not the first"
        );
        assert_eq!(a.ip(), Some("10.0.0.1".parse().unwrap()));
        let ips: Vec<IpAddr> = a.ips().collect();
        assert_eq!(
            ips,
            [
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert!(a.wants_proxy() && !a.is_deleting());
        // One allocation each for what both pods repeat.
        assert!(std::ptr::eq(a.labels().unwrap(), b.labels().unwrap()));
        assert!(std::ptr::eq(
            a.controller().unwrap(),
            b.controller().unwrap()
        ));
        assert!(Arc::ptr_eq(&a.namespace, &b.namespace));
        assert!(Arc::ptr_eq(
            a.proxy_version.as_ref().unwrap(),
            b.proxy_version.as_ref().unwrap()
        ));
    }

    #[test]
    fn a_pod_without_name_or_namespace_is_not_cached() {
        let no_ns = slim(serde_json::json!({"metadata": {"name": "a"}}));
        let no_name = slim(serde_json::json!({"metadata": {"namespace": "n", "name": ""}}));
        assert_eq!(PodRecord::of(&no_ns), None);
        assert_eq!(PodRecord::of(&no_name), None);
        let bare = PodRecord::of(&slim(serde_json::json!({
            "metadata": {"name": "b", "namespace": "n", "deletionTimestamp": "2026-11-29T10:00:00Z"},
            "status": {"podIP": "not an ip"}
        })))
        .unwrap();
        assert_eq!(bare.service_account(), "default");
        assert_eq!(bare.ips().count(), 0, "an unparsable address is skipped");
        assert!(bare.is_deleting() && !bare.wants_proxy());
    }
}
