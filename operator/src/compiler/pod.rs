//! The part of a Pod the compiler reads.
//!
//! A `k8s_openapi` `Pod` is about 2.5 KB before any of its strings (its spec and status are
//! inline structs of dozens of fields), so a cache of 10 000 pods costs tens of MiB whatever is
//! stripped. The controller therefore watches pods as [`SlimPod`], which deserializes the pod
//! JSON into just the fields below (serde skips the rest) and is a `kube::Resource` for the
//! same `v1/pods` endpoint.

use k8s_openapi::api::core::v1::{Pod, PodIP};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

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
