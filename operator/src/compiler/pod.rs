//! The part of a Pod the operator reads, and the compaction that keeps a cluster's pods small
//! in the caches.
//!
//! A `k8s_openapi` `Pod` is about 2.5 KB before any of its strings (its spec and status are
//! inline structs of dozens of fields), so a cache of 10 000 pods costs tens of MiB whatever is
//! stripped. The controller therefore watches pods as [`SlimPod`], which deserializes the pod
//! JSON into just the fields below (serde skips the rest) and is a `kube::Resource` for the
//! same `v1/pods` endpoint.
//!
//! # Compaction (issue 19: operator memory with the cluster's pods)
//! At 100 000 pods even a `SlimPod` held about 1.3 KB: most of it two `BTreeMap`s (labels and
//! annotations; a map with one entry allocates a whole B-tree leaf, about 550 bytes) and
//! metadata nobody reads. [`PodCompactor::compact`], the watch's `modify` step, leaves what
//! the operator's readers use, and nothing else:
//! - the compiler: namespace, name, labels (Service selectors, `trellis.dev/inject`), the
//!   service account, the IPs, and whether the pod was injected (`trellis.dev/proxy-version`);
//! - the discovery replica's propagation report: name and IPs;
//! - the Mesh's proxy counts: the proxy version and the deletion timestamp;
//! - the rollout: the controller owner reference, the `pod-template-hash` label, the proxy
//!   version, the IP and the deletion timestamp.
//!
//! Labels move out of the metadata into one `Arc` shared by every pod with the same labels
//! (the pods of one ReplicaSet have equal ones), the proxy version into an interned string,
//! the controller owner reference into one `Arc` per owner, and `status.podIPs` is dropped
//! when it only repeats `status.podIP`. Readers go through [`SlimPod::labels`],
//! [`SlimPod::proxy_version`], [`SlimPod::controller`] and [`SlimPod::ips`], which read a
//! compacted pod and one built from a full `Pod` alike (tests build both; a test checks they
//! compile to the same output).

use std::collections::{BTreeMap, HashSet};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, PodIP};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde::{Deserialize, Serialize};

use super::PROXY_VERSION_ANNOTATION;

/// A pod: metadata, service account and IPs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SlimPod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: SlimPodSpec,
    #[serde(default)]
    pub status: SlimPodStatus,
    /// The labels, once [`PodCompactor::compact`] moved them out of `metadata` (shared).
    #[serde(skip)]
    shared_labels: Option<Arc<BTreeMap<String, String>>>,
    /// `trellis.dev/proxy-version`, once [`PodCompactor::compact`] moved it out of
    /// `metadata.annotations` (interned).
    #[serde(skip)]
    shared_proxy_version: Option<Arc<str>>,
    /// The controller owner reference, once [`PodCompactor::compact`] moved it out of
    /// `metadata.ownerReferences` (shared by the pods of one ReplicaSet).
    #[serde(skip)]
    shared_controller: Option<Arc<OwnerReference>>,
}

/// `spec.serviceAccountName` (and the deprecated `serviceAccount`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimPodSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

/// `status.podIP` and `status.podIPs`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimPodStatus {
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs", skip_serializing_if = "Vec::is_empty")]
    pub pod_ips: Vec<PodIP>,
}

impl SlimPod {
    /// The pod's labels (compacted or not).
    pub fn labels(&self) -> Option<&BTreeMap<String, String>> {
        self.shared_labels
            .as_deref()
            .or(self.metadata.labels.as_ref())
    }

    /// The injector's `trellis.dev/proxy-version`: set on every pod that received a sidecar.
    pub fn proxy_version(&self) -> Option<&str> {
        self.shared_proxy_version.as_deref().or_else(|| {
            self.metadata
                .annotations
                .as_ref()?
                .get(PROXY_VERSION_ANNOTATION)
                .map(String::as_str)
        })
    }

    /// The owner reference marked `controller` (the ReplicaSet, StatefulSet or DaemonSet that
    /// manages the pod): what the rollout restarts.
    pub fn controller(&self) -> Option<&OwnerReference> {
        self.shared_controller.as_deref().or_else(|| {
            self.metadata
                .owner_references
                .as_ref()?
                .iter()
                .find(|o| o.controller == Some(true))
        })
    }

    /// Whether the pod has or wants a sidecar ([`crate::inject::scope::pod_wants_proxy`]).
    pub fn wants_proxy(&self) -> bool {
        self.proxy_version().is_some() || crate::inject::scope::pod_wants_proxy(self.labels(), None)
    }

    /// `status.podIPs` and `status.podIP`, parsed, each once (unparsable ones skipped).
    pub fn ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = Vec::with_capacity(1);
        let listed = self.status.pod_ips.iter().map(|i| i.ip.as_str());
        for ip in listed.chain(self.status.pod_ip.as_deref()) {
            if let Ok(ip) = ip.parse()
                && !ips.contains(&ip)
            {
                ips.push(ip);
            }
        }
        ips
    }

    /// The service account, defaulting to `default` as the API server does.
    pub fn service_account(&self) -> &str {
        self.spec
            .service_account_name
            .as_deref()
            .or(self.spec.service_account.as_deref())
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
    }
}

impl From<&Pod> for SlimPod {
    fn from(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut metadata = pod.metadata.clone();
        metadata.managed_fields = None;
        Self {
            metadata,
            spec: SlimPodSpec {
                service_account_name: spec.and_then(|s| s.service_account_name.clone()),
                service_account: spec.and_then(|s| s.service_account.clone()),
            },
            status: SlimPodStatus {
                pod_ip: status.and_then(|s| s.pod_ip.clone()),
                pod_ips: status.and_then(|s| s.pod_ips.clone()).unwrap_or_default(),
            },
            shared_labels: None,
            shared_proxy_version: None,
            shared_controller: None,
        }
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

/// The watch's `modify` step for pods: drops what no reader uses and shares what many pods
/// repeat (see the module docs). One per watch; it holds the shared values.
#[derive(Debug, Default)]
pub struct PodCompactor {
    labels: Interner<BTreeMap<String, String>>,
    strings: Interner<str>,
    /// By owner uid (an `OwnerReference` is not `Hash`); swept like the interners.
    owners: std::collections::HashMap<String, Arc<OwnerReference>>,
    owners_swept_at: usize,
}

impl PodCompactor {
    fn share_owner(&mut self, owner: OwnerReference) -> Arc<OwnerReference> {
        if let Some(held) = self.owners.get(&owner.uid)
            && **held == owner
        {
            return held.clone();
        }
        if self.owners.len() >= 2 * self.owners_swept_at.max(512) {
            self.owners.retain(|_, o| Arc::strong_count(o) > 1);
            self.owners_swept_at = self.owners.len();
        }
        let shared = Arc::new(owner);
        self.owners.insert(shared.uid.clone(), shared.clone());
        shared
    }

    pub fn compact(&mut self, pod: &mut SlimPod) {
        let meta = &mut pod.metadata;
        // Read by nobody: the watcher keeps its own resource version, and the reflector's
        // key is namespace and name.
        meta.managed_fields = None;
        if let Some(owner) = meta
            .owner_references
            .take()
            .and_then(|o| o.into_iter().find(|o| o.controller == Some(true)))
        {
            pod.shared_controller = Some(self.share_owner(owner));
        }
        let meta = &mut pod.metadata;
        meta.finalizers = None;
        meta.generate_name = None;
        meta.uid = None;
        meta.resource_version = None;
        meta.creation_timestamp = None;
        meta.deletion_grace_period_seconds = None;
        meta.generation = None;
        meta.self_link = None;
        if let Some(labels) = meta.labels.take().filter(|l| !l.is_empty()) {
            let shared = self.labels.intern(&labels, || Arc::new(labels.clone()));
            pod.shared_labels = Some(shared);
        }
        if let Some(version) = meta
            .annotations
            .take()
            .and_then(|mut a| a.remove(PROXY_VERSION_ANNOTATION))
        {
            pod.shared_proxy_version = Some(
                self.strings
                    .intern(version.as_str(), || version.as_str().into()),
            );
        }
        let status = &mut pod.status;
        if status.pod_ips.len() == 1 && status.pod_ip.as_deref() == Some(&status.pod_ips[0].ip) {
            status.pod_ips = Vec::new();
        }
        let spec = &mut pod.spec;
        if spec.service_account == spec.service_account_name {
            spec.service_account = None;
        }
    }
}

impl k8s_openapi::Resource for SlimPod {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for SlimPod {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_only_what_it_needs_from_pod_json() {
        let json = r#"{"apiVersion":"v1","kind":"Pod",
            "metadata":{"name":"a","namespace":"n","labels":{"app":"x"}},
            "spec":{"serviceAccountName":"sa","containers":[{"name":"c","image":"i"}]},
            "status":{"phase":"Running","podIP":"10.0.0.1","podIPs":[{"ip":"10.0.0.1"},{"ip":"fd00::1"}]}}"#;
        let slim: SlimPod = serde_json::from_str(json).unwrap();
        assert_eq!(slim.service_account(), "sa");
        assert_eq!(slim.status.pod_ips.len(), 2);
        let full: Pod = serde_json::from_str(json).unwrap();
        assert_eq!(SlimPod::from(&full), slim);
        use kube::Resource;
        assert_eq!(
            SlimPod::url_path(&(), Some("n")),
            "/api/v1/namespaces/n/pods"
        );
        let bare: SlimPod = serde_json::from_str(r#"{"metadata":{"name":"b"}}"#).unwrap();
        assert_eq!(bare.service_account(), "default");
    }
}
