//! The sidecar rollout in the local mesh: the cluster's planner ([`crate::rollout::plan`]) and
//! health gate ([`crate::rollout::gate`]) driving local proxies instead of Deployments.
//!
//! Only the edges differ from the cluster controller. What the controller learns from
//! Deployments and Pods, `trellis dev` knows itself: which version it started each local proxy
//! as, whether that proxy answers `/ready`, whether a workload's pods are being replaced. That
//! becomes the planner's [`plan::Workload`]s here ([`observe`]); the gate reads the local
//! proxies' admin ports directly ([`gate::Direct`]). A planned restart is carried out by the run
//! loop, one replica at a time with one surge replica (a new proxy and app on the pod's spare
//! ports, ready first, then traffic moved, then the old pair drained), like a Deployment with
//! `maxUnavailable: 0, maxSurge: 1`.
//!
//! The Mesh's `metadata.generation` that the planner uses to hold a failed rollout until the
//! Mesh is edited is, locally, the number of edits of the Mesh in `mesh.yaml` since start.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use jiff::Timestamp;

use crate::api::mesh::{CanarySelector, RolloutSpec, RolloutStatus};
use crate::rollout::gate::{self, Direct};
use crate::rollout::observe::{PodTarget, is_canary};
use crate::rollout::plan::{self, Action, Input, Pin, Plan, Workload, WorkloadKey, WorkloadKind};

/// One local pod, as the run loop sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    pub name: String,
    /// The proxy version it was started as (`--proxy-version`).
    pub version: String,
    /// Its proxy answers `/ready`.
    pub ready: bool,
    pub admin: SocketAddr,
}

/// One local workload (a `services.yaml` service or meshed client): a Deployment in a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalWorkload {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub pods: Vec<LocalPod>,
    /// A restart is queued or under way: its rollout has not finished, whatever its pods say.
    pub restarting: bool,
    /// A rollback pin (failure policy `Rollback`).
    pub pin: Option<Pin>,
}

impl LocalWorkload {
    pub fn key(&self) -> WorkloadKey {
        WorkloadKey::new(WorkloadKind::Deployment, &self.namespace, &self.name)
    }
}

/// What the planner and the gate see: the workloads and each one's pods.
pub fn observe(
    local: &[LocalWorkload],
    canary: &CanarySelector,
    namespace_labels: &BTreeMap<String, String>,
) -> (Vec<Workload>, BTreeMap<WorkloadKey, Vec<PodTarget>>) {
    let mut workloads = Vec::new();
    let mut pods = BTreeMap::new();
    for w in local {
        let key = w.key();
        let total = w.pods.len();
        let ready = w.pods.iter().filter(|p| p.ready).count();
        let mut by_version: BTreeMap<String, u32> = BTreeMap::new();
        for p in &w.pods {
            *by_version.entry(p.version.clone()).or_default() += 1;
        }
        let updating = if w.restarting { "restarting, " } else { "" };
        workloads.push(Workload {
            key: key.clone(),
            manual: false,
            canary: is_canary(canary, Some(namespace_labels), Some(&w.labels)),
            pin: w.pin.clone(),
            rolled_out: !w.restarting && ready == total,
            progress: format!("{updating}{ready}/{total} ready"),
            pods: by_version,
        });
        pods.insert(
            key,
            w.pods
                .iter()
                .map(|p| PodTarget {
                    namespace: w.namespace.clone(),
                    name: p.name.clone(),
                    ip: None,
                    version: p.version.clone(),
                })
                .collect(),
        );
    }
    (workloads, pods)
}

/// Everything one pass reads; owned, so a pass runs as its own task while the run loop keeps
/// serving the table.
pub struct PassInput {
    pub now: Timestamp,
    /// Edits of the Mesh since start.
    pub generation: i64,
    pub desired: String,
    pub spec: RolloutSpec,
    pub workloads: Vec<Workload>,
    pub pods: BTreeMap<WorkloadKey, Vec<PodTarget>>,
    /// Each pod's admin address, by (namespace, name).
    pub admin: BTreeMap<(String, String), SocketAddr>,
    pub previous: Option<RolloutStatus>,
}

/// One pass, as the cluster controller makes it: gate the in-flight workloads that finished
/// restarting, plan, and measure the baseline of each workload about to restart. The caller
/// carries out the plan's actions.
pub async fn pass(input: PassInput) -> Plan {
    let admin = input.admin;
    let scraper = Direct::new(move |p: &PodTarget| {
        admin.get(&(p.namespace.clone(), p.name.clone())).copied()
    });
    let spec = &input.spec;
    let desired = input.desired.as_str();
    let awaiting = plan::awaiting_gate(
        spec,
        input.generation,
        desired,
        &input.workloads,
        input.previous.as_ref(),
    );
    let verdicts = gate::verdicts(&scraper, spec, desired, &awaiting, &input.pods).await;
    let unmanaged = BTreeMap::new();
    let mut out = plan::plan(&Input {
        now: input.now,
        generation: input.generation,
        desired,
        spec,
        workloads: &input.workloads,
        unmanaged: &unmanaged,
        verdicts: &verdicts,
        previous: input.previous.as_ref(),
    });
    let restarts: Vec<WorkloadKey> = out
        .actions
        .iter()
        .filter(|a| matches!(a, Action::Restart { .. }))
        .map(|a| a.key().clone())
        .collect();
    if !restarts.is_empty() {
        let window = crate::duration::parse(&spec.health_gate.window).ok();
        let baselines = gate::baselines(&scraper, window, &restarts, &input.pods).await;
        for f in &mut out.status.in_flight {
            let key = WorkloadKey::new(WorkloadKind::Deployment, &f.namespace, &f.name);
            if let Some(b) = baselines.get(&key) {
                f.baseline = b.clone();
            }
        }
    }
    out
}

/// The version a restart of `w` puts its pods on: its pin while the pin holds, else `desired`.
pub fn restart_version(pin: Option<&Pin>, desired: &str) -> String {
    match pin {
        Some(p) if p.failed_version == desired => p.version.clone(),
        _ => desired.to_string(),
    }
}

/// The rollout's lines in the table: state, batch, pods per version, why, the last failures.
pub fn describe(st: &RolloutStatus, failures: usize) -> Vec<String> {
    let pods: Vec<String> = st.pods.iter().map(|(v, n)| format!("{v}={n}")).collect();
    let mut out = vec![format!(
        "ROLLOUT {:?}  batch {} of {}  desired {}  pods by version: {}",
        st.state,
        st.current_batch,
        st.total_batches,
        st.desired_version,
        pods.join(" ")
    )];
    out.push(format!("  {}: {}", st.reason, st.message));
    for f in st.failures.iter().rev().take(failures) {
        out.push(format!(
            "  failed {} {}/{} on {} at {}: {}: {}",
            f.kind, f.namespace, f.name, f.version, f.time, f.reason, f.message
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::mesh::{RolloutFailure, RolloutState};

    fn pod(name: &str, version: &str, ready: bool) -> LocalPod {
        LocalPod {
            name: name.into(),
            version: version.into(),
            ready,
            admin: "127.0.0.1:1".parse().unwrap(),
        }
    }

    fn workload(name: &str, pods: Vec<LocalPod>, restarting: bool) -> LocalWorkload {
        LocalWorkload {
            namespace: "shop".into(),
            name: name.into(),
            labels: [("app".to_string(), name.to_string())].into(),
            pods,
            restarting,
            pin: None,
        }
    }

    #[test]
    fn a_workload_is_rolled_out_only_when_no_restart_is_under_way_and_every_pod_is_ready() {
        let local = vec![
            workload(
                "a",
                vec![pod("a-0", "v1", true), pod("a-1", "v2", true)],
                true,
            ),
            workload(
                "b",
                vec![pod("b-0", "v2", true), pod("b-1", "v2", false)],
                false,
            ),
            workload("c", vec![pod("c-0", "v2", true)], false),
        ];
        let (ws, pods) = observe(&local, &CanarySelector::default(), &BTreeMap::new());
        assert_eq!(
            ws.iter().map(|w| w.rolled_out).collect::<Vec<_>>(),
            [false, false, true]
        );
        assert_eq!(ws[0].pods, [("v1".into(), 1), ("v2".into(), 1)].into());
        assert_eq!(ws[0].progress, "restarting, 2/2 ready");
        assert_eq!(ws[1].progress, "1/2 ready");
        let a = &pods[&local[0].key()];
        assert_eq!(
            a.iter()
                .map(|p| (p.name.as_str(), p.version.as_str()))
                .collect::<Vec<_>>(),
            [("a-0", "v1"), ("a-1", "v2")]
        );
    }

    #[test]
    fn canaries_follow_the_selector_on_workload_labels() {
        let local = vec![workload("a", vec![pod("a-0", "v1", true)], false)];
        let canary: CanarySelector = serde_json::from_value(serde_json::json!({
            "workloadSelector": {"matchLabels": {"app": "a"}}
        }))
        .unwrap();
        let (ws, _) = observe(&local, &canary, &BTreeMap::new());
        assert!(ws[0].canary);
        let (ws, _) = observe(&local, &CanarySelector::default(), &BTreeMap::new());
        assert!(!ws[0].canary);
    }

    #[test]
    fn a_pin_holds_only_while_its_failed_version_is_desired() {
        let pin = Pin {
            version: "v1".into(),
            failed_version: "v2".into(),
        };
        assert_eq!(restart_version(Some(&pin), "v2"), "v1");
        assert_eq!(restart_version(Some(&pin), "v3"), "v3");
        assert_eq!(restart_version(None, "v2"), "v2");
    }

    #[test]
    fn the_description_names_state_batch_versions_and_the_latest_failure_first() {
        let st = RolloutStatus {
            state: RolloutState::Paused,
            reason: "HealthGateFailed".into(),
            message: "batch 1 of 3 failed".into(),
            desired_version: "v3".into(),
            current_batch: 1,
            total_batches: 3,
            pods: [("v1".to_string(), 6), ("v3".to_string(), 3)].into(),
            failures: vec![
                RolloutFailure {
                    kind: "Deployment".into(),
                    namespace: "shop".into(),
                    name: "old".into(),
                    version: "v2".into(),
                    reason: "DeadlineExceeded".into(),
                    message: "slow".into(),
                    time: "t0".into(),
                },
                RolloutFailure {
                    kind: "Deployment".into(),
                    namespace: "shop".into(),
                    name: "catalog".into(),
                    version: "v3".into(),
                    reason: "HealthGateFailed".into(),
                    message: "success rate 0.0 %".into(),
                    time: "t1".into(),
                },
            ],
            ..RolloutStatus::default()
        };
        let lines = describe(&st, 1);
        assert_eq!(
            lines[0],
            "ROLLOUT Paused  batch 1 of 3  desired v3  pods by version: v1=6 v3=3"
        );
        assert_eq!(lines[1], "  HealthGateFailed: batch 1 of 3 failed");
        assert_eq!(lines.len(), 3);
        assert!(lines[2].contains("shop/catalog on v3") && lines[2].contains("0.0 %"));
    }
}
