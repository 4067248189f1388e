//! From cached Kubernetes objects to the planner's [`Workload`]s (pure).
//!
//! Pods are matched to their workload through their controller owner reference. A Deployment's
//! pods are owned by a ReplicaSet named `<deployment>-<pod-template-hash>`, and the pod carries
//! that hash as a label, so the Deployment is found without watching ReplicaSets. Injected pods
//! that no Deployment, StatefulSet or DaemonSet owns (bare pods, Jobs) are counted as
//! unmanaged: reported, never restarted. Pods being deleted are left out, so counts show where
//! the workload is heading, not the pods on their way out.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::plan::{Pin, Workload, WorkloadKey, WorkloadKind};
use super::{FAILED_VERSION_ANNOTATION, PROXY_IMAGE_ANNOTATION, ROLLOUT_ANNOTATION};
use crate::api::mesh::{CanarySelector, LabelSelector};
use crate::pods::{PodRecord, PodSet};

/// A pod whose sidecar the health gate reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodTarget {
    pub namespace: String,
    pub name: String,
    pub ip: Option<String>,
    /// Its `trellis.dev/proxy-version`.
    pub version: String,
}

/// Everything the rollout observed.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub workloads: Vec<Workload>,
    /// Injected pods without a workload, by version.
    pub unmanaged: BTreeMap<String, u32>,
    /// Each workload's injected pods.
    pub pods: BTreeMap<WorkloadKey, Vec<PodTarget>>,
}

/// The cached objects [`observe`] reads.
pub struct Objects<'a> {
    pub namespaces: &'a [Arc<Namespace>],
    pub deployments: &'a [Arc<Deployment>],
    pub stateful_sets: &'a [Arc<StatefulSet>],
    pub daemon_sets: &'a [Arc<DaemonSet>],
    pub pods: &'a PodSet,
}

/// Builds the planner's view. Objects without a namespace or name are skipped.
pub fn observe(objects: &Objects<'_>, canary: &CanarySelector) -> Observed {
    let ns_labels: BTreeMap<&str, &BTreeMap<String, String>> = objects
        .namespaces
        .iter()
        .filter_map(|n| Some((n.metadata.name.as_deref()?, n.metadata.labels.as_ref()?)))
        .collect();
    let mut workloads: BTreeMap<WorkloadKey, Workload> = BTreeMap::new();
    let mut add = |kind, meta: &ObjectMeta, template: Option<&ObjectMeta>, rolled, progress| {
        let (Some(ns), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref()) else {
            return;
        };
        let key = WorkloadKey::new(kind, ns, name);
        let w = Workload {
            key: key.clone(),
            manual: annotation(Some(meta), ROLLOUT_ANNOTATION) == Some("manual"),
            canary: is_canary(canary, ns_labels.get(ns).copied(), meta.labels.as_ref()),
            pin: pin(template),
            rolled_out: rolled,
            progress,
            pods: BTreeMap::new(),
        };
        workloads.insert(key, w);
    };
    for d in objects.deployments {
        let (rolled, progress) = deployment_progress(d);
        let template = d.spec.template.metadata.as_ref();
        add(
            WorkloadKind::Deployment,
            &d.metadata,
            template,
            rolled,
            progress,
        );
    }
    for s in objects.stateful_sets {
        let (rolled, progress) = stateful_set_progress(s);
        let template = s.spec.template.metadata.as_ref();
        add(
            WorkloadKind::StatefulSet,
            &s.metadata,
            template,
            rolled,
            progress,
        );
    }
    for d in objects.daemon_sets {
        let (rolled, progress) = daemon_set_progress(d);
        let template = d.spec.template.metadata.as_ref();
        add(
            WorkloadKind::DaemonSet,
            &d.metadata,
            template,
            rolled,
            progress,
        );
    }

    let mut out = Observed::default();
    for pod in objects.pods.iter() {
        if pod.is_deleting() {
            continue;
        }
        let Some(version) = pod.proxy_version() else {
            continue;
        };
        let (ns, name) = (pod.namespace(), pod.name());
        match owner(pod).filter(|k| workloads.contains_key(k)) {
            Some(key) => {
                if let Some(w) = workloads.get_mut(&key) {
                    *w.pods.entry(version.to_string()).or_default() += 1;
                }
                out.pods.entry(key).or_default().push(PodTarget {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                    ip: pod.ip().map(|ip| ip.to_string()),
                    version: version.to_string(),
                });
            }
            None => *out.unmanaged.entry(version.to_string()).or_default() += 1,
        }
    }
    out.workloads = workloads.into_values().collect();
    out
}

/// The workload that controls `pod`, if it is a Deployment, StatefulSet or DaemonSet.
pub fn owner(pod: &PodRecord) -> Option<WorkloadKey> {
    let ns = pod.namespace();
    let owner = pod.controller()?;
    match owner.kind.as_str() {
        "ReplicaSet" => {
            let hash = pod.labels()?.get("pod-template-hash")?;
            let deployment = owner.name.strip_suffix(&format!("-{hash}"))?;
            Some(WorkloadKey::new(WorkloadKind::Deployment, ns, deployment))
        }
        "StatefulSet" => Some(WorkloadKey::new(WorkloadKind::StatefulSet, ns, &owner.name)),
        "DaemonSet" => Some(WorkloadKey::new(WorkloadKind::DaemonSet, ns, &owner.name)),
        _ => None,
    }
}

/// Drops the pod template's spec and the managed fields from a cached workload: the rollout
/// reads only metadata, the template's annotations and the status.
pub fn strip_deployment(d: &mut Deployment) {
    d.metadata.managed_fields = None;
    d.spec.template.spec = None;
}

/// As [`strip_deployment`].
pub fn strip_stateful_set(s: &mut StatefulSet) {
    s.metadata.managed_fields = None;
    s.spec.template.spec = None;
    s.spec.volume_claim_templates = None;
}

/// As [`strip_deployment`].
pub fn strip_daemon_set(d: &mut DaemonSet) {
    d.metadata.managed_fields = None;
    d.spec.template.spec = None;
}

fn annotation<'a>(meta: Option<&'a ObjectMeta>, key: &str) -> Option<&'a str> {
    meta?.annotations.as_ref()?.get(key).map(String::as_str)
}

fn pin(template: Option<&ObjectMeta>) -> Option<Pin> {
    Some(Pin {
        version: annotation(template, PROXY_IMAGE_ANNOTATION)?.to_string(),
        failed_version: annotation(template, FAILED_VERSION_ANNOTATION)?.to_string(),
    })
}

/// A non-empty selector whose labels are all present.
fn matches(selector: Option<&LabelSelector>, labels: Option<&BTreeMap<String, String>>) -> bool {
    let Some(sel) = selector.filter(|s| !s.match_labels.is_empty()) else {
        return false;
    };
    let Some(labels) = labels else {
        return false;
    };
    sel.match_labels
        .iter()
        .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
}

/// Whether a workload is a canary: its namespace or its own labels match the selector.
pub fn is_canary(
    canary: &CanarySelector,
    namespace_labels: Option<&BTreeMap<String, String>>,
    workload_labels: Option<&BTreeMap<String, String>>,
) -> bool {
    matches(canary.namespace_selector.as_ref(), namespace_labels)
        || matches(canary.workload_selector.as_ref(), workload_labels)
}

fn generation_seen(meta: &ObjectMeta, observed: Option<i64>) -> bool {
    observed.unwrap_or(0) >= meta.generation.unwrap_or(0)
}

/// Rolled out: the Deployment controller saw the latest template and every replica is updated
/// and ready, with no old replica left.
pub fn deployment_progress(d: &Deployment) -> (bool, String) {
    let want = d.spec.replicas.unwrap_or(1);
    let st = d.status.clone().unwrap_or_default();
    let updated = st.updated_replicas.unwrap_or(0);
    let ready = st.ready_replicas.unwrap_or(0);
    let total = st.replicas.unwrap_or(0);
    let rolled = generation_seen(&d.metadata, st.observed_generation)
        && updated >= want
        && ready >= want
        && total <= updated;
    (
        rolled,
        format!("{updated}/{want} replicas updated, {ready}/{want} ready, {total} in total"),
    )
}

/// Rolled out: the StatefulSet controller saw the latest template and every replica above the
/// partition is updated, and all are ready.
pub fn stateful_set_progress(s: &StatefulSet) -> (bool, String) {
    let want = s.spec.replicas.unwrap_or(1);
    let partition = s
        .spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.partition)
        .unwrap_or(0)
        .clamp(0, want);
    let st = s.status.clone().unwrap_or_default();
    let updated = st.updated_replicas.unwrap_or(0);
    let ready = st.ready_replicas.unwrap_or(0);
    let rolled = generation_seen(&s.metadata, st.observed_generation)
        && updated >= want - partition
        && ready >= want;
    (
        rolled,
        format!(
            "{updated}/{} replicas updated, {ready}/{want} ready",
            want - partition
        ),
    )
}

/// Rolled out: the DaemonSet controller saw the latest template and every node's pod is
/// updated and ready.
pub fn daemon_set_progress(d: &DaemonSet) -> (bool, String) {
    let st = d.status.clone().unwrap_or_default();
    let want = st.desired_number_scheduled;
    let updated = st.updated_number_scheduled.unwrap_or(0);
    let ready = st.number_ready;
    let rolled =
        generation_seen(&d.metadata, st.observed_generation) && updated >= want && ready >= want;
    (
        rolled,
        format!("{updated}/{want} pods updated, {ready}/{want} ready"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compiler::PROXY_VERSION_ANNOTATION;
    use serde_json::json;

    fn pod(
        name: &str,
        owner_kind: &str,
        owner: &str,
        hash: Option<&str>,
        version: &str,
    ) -> PodRecord {
        let mut labels = serde_json::Map::new();
        if let Some(h) = hash {
            labels.insert("pod-template-hash".into(), json!(h));
        }
        serde_json::from_value(json!({
            "metadata": {
                "name": name, "namespace": "shop", "labels": labels,
                "annotations": {PROXY_VERSION_ANNOTATION: version},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": owner_kind, "name": owner,
                                     "uid": "u", "controller": true}]
            },
            "status": {"podIP": "10.0.0.1"}
        }))
        .ok()
        .and_then(|p: crate::compiler::SlimPod| PodRecord::of(&p))
        .unwrap()
    }

    fn deployment(
        name: &str,
        labels: serde_json::Value,
        annotations: serde_json::Value,
    ) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "generation": 2,
                         "labels": labels, "annotations": annotations},
            "spec": {"replicas": 2, "selector": {}, "template": {"metadata": {
                "annotations": {PROXY_IMAGE_ANNOTATION: "p:1", FAILED_VERSION_ANNOTATION: "p:2"}}}},
            "status": {"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2}
        }))
        .unwrap()
    }

    #[test]
    fn pods_are_counted_under_their_workload_and_the_rest_is_unmanaged() {
        let d = Arc::new(deployment(
            "catalog",
            json!({"tier": "canary"}),
            json!({ROLLOUT_ANNOTATION: "manual"}),
        ));
        let pods: PodSet = [
            pod("a", "ReplicaSet", "catalog-abc", Some("abc"), "p:1"),
            pod("b", "ReplicaSet", "catalog-abc", Some("abc"), "p:2"),
            // A ReplicaSet whose name does not end in the pod's hash: no Deployment.
            pod("c", "ReplicaSet", "other-xyz", Some("abc"), "p:1"),
            pod("d", "Job", "batch", None, "p:1"),
        ]
        .into_iter()
        .collect();
        let canary = CanarySelector {
            namespace_selector: None,
            workload_selector: Some(LabelSelector {
                match_labels: [("tier".to_string(), "canary".to_string())].into(),
            }),
        };
        let o = observe(
            &Objects {
                namespaces: &[],
                deployments: &[d],
                stateful_sets: &[],
                daemon_sets: &[],
                pods: &pods,
            },
            &canary,
        );
        assert_eq!(o.workloads.len(), 1);
        let w = &o.workloads[0];
        assert!(w.manual && w.canary && w.rolled_out);
        assert_eq!(
            w.pin,
            Some(Pin {
                version: "p:1".into(),
                failed_version: "p:2".into()
            })
        );
        assert_eq!(w.pods, [("p:1".into(), 1), ("p:2".into(), 1)].into());
        assert_eq!(o.unmanaged, [("p:1".into(), 2)].into());
        assert_eq!(o.pods[&w.key].len(), 2);
    }

    #[test]
    fn a_deployment_with_old_replicas_left_is_not_rolled_out() {
        let mut d = deployment("catalog", json!({}), json!({}));
        d.status.as_mut().unwrap().replicas = Some(3);
        assert!(!deployment_progress(&d).0);
        d.status.as_mut().unwrap().replicas = Some(2);
        d.metadata.generation = Some(3);
        assert!(!deployment_progress(&d).0, "generation not observed yet");
    }

    #[test]
    fn a_stateful_set_partition_counts_only_the_replicas_above_it() {
        let sts = |updated: i32| -> StatefulSet {
            serde_json::from_value(json!({
                "metadata": {"name": "db", "namespace": "shop", "generation": 3},
                "spec": {"replicas": 3, "selector": {}, "serviceName": "db", "template": {},
                         "updateStrategy": {"rollingUpdate": {"partition": 2}}},
                "status": {"observedGeneration": 3, "replicas": 3, "updatedReplicas": updated,
                           "readyReplicas": 3}
            }))
            .unwrap()
        };
        assert!(!stateful_set_progress(&sts(0)).0);
        // Only ordinal 2 is above the partition: the workload's own strategy decides.
        assert!(stateful_set_progress(&sts(1)).0);
    }

    #[test]
    fn a_daemon_set_is_rolled_out_when_every_node_runs_an_updated_ready_pod() {
        let ds = |updated: i32, ready: i32| -> DaemonSet {
            serde_json::from_value(json!({
                "metadata": {"name": "agent", "namespace": "shop", "generation": 2},
                "spec": {"selector": {}, "template": {}},
                "status": {"observedGeneration": 2, "desiredNumberScheduled": 4,
                           "currentNumberScheduled": 4, "numberMisscheduled": 0,
                           "updatedNumberScheduled": updated, "numberReady": ready}
            }))
            .unwrap()
        };
        assert!(!daemon_set_progress(&ds(3, 4)).0);
        assert!(!daemon_set_progress(&ds(4, 3)).0);
        assert!(daemon_set_progress(&ds(4, 4)).0);
        assert_eq!(
            daemon_set_progress(&ds(3, 4)).1,
            "3/4 pods updated, 4/4 ready"
        );
    }

    #[test]
    fn stateful_set_and_daemon_set_pods_belong_to_their_owner() {
        let p = pod("db-0", "StatefulSet", "db", None, "p:1");
        assert_eq!(
            owner(&p),
            Some(WorkloadKey::new(WorkloadKind::StatefulSet, "shop", "db"))
        );
        let p = pod("agent-x", "DaemonSet", "agent", None, "p:1");
        assert_eq!(
            owner(&p),
            Some(WorkloadKey::new(WorkloadKind::DaemonSet, "shop", "agent"))
        );
    }

    #[test]
    fn empty_selectors_match_nothing() {
        let labels: BTreeMap<String, String> = [("a".to_string(), "b".to_string())].into();
        let empty = CanarySelector {
            namespace_selector: Some(LabelSelector::default()),
            workload_selector: None,
        };
        assert!(!is_canary(&empty, Some(&labels), Some(&labels)));
    }
}
