//! The part of a Pod the operator reads, as the pod watch deserializes it.
//!
//! A `k8s_openapi` `Pod` is about 2.5 KB before any of its strings (its spec and status are
//! inline structs of dozens of fields). The watch therefore reads pods as [`SlimPod`], which
//! deserializes the pod JSON into just the fields below (serde skips the rest) and is a
//! `kube::Resource` for the same `v1/pods` endpoint. A `SlimPod` lives only until the pod
//! cache built its record from it ([`crate::pods::PodRecord`]): the cache holds no
//! `ObjectMeta` (issue 19).

use std::collections::BTreeMap;
use std::net::IpAddr;

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
    /// The pod's labels.
    pub fn labels(&self) -> Option<&BTreeMap<String, String>> {
        self.metadata.labels.as_ref()
    }

    /// The injector's `trellis.dev/proxy-version`: set on every pod that received a sidecar.
    pub fn proxy_version(&self) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()?
            .get(PROXY_VERSION_ANNOTATION)
            .map(String::as_str)
    }

    /// The owner reference marked `controller` (the ReplicaSet, StatefulSet or DaemonSet that
    /// manages the pod): what the rollout restarts.
    pub fn controller(&self) -> Option<&OwnerReference> {
        self.metadata
            .owner_references
            .as_ref()?
            .iter()
            .find(|o| o.controller == Some(true))
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
