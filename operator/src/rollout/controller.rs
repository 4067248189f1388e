//! The rollout controller: the thin edge around [`plan`].
//!
//! One level-triggered loop, like the compile controller: any change of the Mesh, a namespace,
//! a workload or a pod, gathered for [`DEBOUNCE`], leads to one pass, and a pass also runs every
//! [`TICK`] without changes so deadlines are noticed. A pass
//! 1. observes the stores ([`observe`]);
//! 2. measures the new pods of every in-flight workload that finished restarting and judges them
//!    against their baseline ([`gate`]);
//! 3. plans;
//! 4. measures the baseline of each workload it is about to restart, then restarts it: a
//!    server-side apply of the `kubectl.kubernetes.io/restartedAt` pod-template annotation under
//!    the field manager [`FIELD_MANAGER`] (with the pin annotations for a rollback);
//! 5. records the plan's Events on the Mesh and writes `status.rollout` and the
//!    `RolloutProgressing` condition, once, and only when they changed.
//!
//! The planner's memory is `status.rollout`. The loop keeps the status it last computed and
//! plans from it, not from the cached Mesh, which may not show its own last write yet: planning
//! from a stale status would start the same batch twice. A new leader starts from the Mesh's
//! status, which is where the previous leader left off.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::gate::{self, Scrape};
use super::observe::{self, Objects, Observed};
use super::plan::{self, Action, Input, Plan, WorkloadKey, WorkloadKind};
use super::{
    CONDITION, FAILED_VERSION_ANNOTATION, FIELD_MANAGER, PROXY_IMAGE_ANNOTATION, RESTARTED_AT,
};
use crate::api::conditions::{Condition, ConditionStatus};
use crate::api::mesh::{RolloutState, RolloutStatus};
use crate::api::{MESH_NAME, Mesh, MeshStatus};
use crate::controller::compile::{SharedStores, watch};
use crate::status::StatusWriter;

/// How long changes are gathered before a pass: a restart changes every pod of a workload
/// within seconds, and one pass (one status write) for all of them is the point.
pub const DEBOUNCE: Duration = Duration::from_secs(1);
/// A pass runs at least this often, so a deadline passes on time without any change.
pub const TICK: Duration = Duration::from_secs(10);

/// Errors that stop the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The stores no longer follow the cluster.
    #[error("the watch streams ended")]
    StreamsEnded,
}

/// The caches the rollout reads: reflector stores, and the pod cache ([`crate::pods`]).
#[derive(Clone)]
pub struct Stores {
    pub meshes: Store<Mesh>,
    pub namespaces: Store<Namespace>,
    pub deployments: Store<Deployment>,
    pub stateful_sets: Store<StatefulSet>,
    pub daemon_sets: Store<DaemonSet>,
    pub pods: crate::pods::PodStore,
}

impl Stores {
    async fn wait_until_ready(&self) -> Result<(), Error> {
        let ended = |_| Error::StreamsEnded;
        self.meshes.wait_until_ready().await.map_err(ended)?;
        self.namespaces.wait_until_ready().await.map_err(ended)?;
        self.deployments.wait_until_ready().await.map_err(ended)?;
        self.stateful_sets.wait_until_ready().await.map_err(ended)?;
        self.daemon_sets.wait_until_ready().await.map_err(ended)?;
        self.pods
            .wait_until_ready()
            .await
            .map_err(|_| Error::StreamsEnded)
    }

    fn mesh(&self) -> Option<Arc<Mesh>> {
        self.meshes
            .state()
            .into_iter()
            .find(|m| m.metadata.name.as_deref() == Some(MESH_NAME))
    }

    fn observe(&self, mesh: &Mesh) -> Observed {
        observe::observe(
            &Objects {
                namespaces: &self.namespaces.state(),
                deployments: &self.deployments.state(),
                stateful_sets: &self.stateful_sets.state(),
                daemon_sets: &self.daemon_sets.state(),
                pods: &self.pods.state(),
            },
            &mesh.spec.rollout.canary,
        )
    }
}

/// Where the controller's writes and reads go.
pub struct Edge {
    pub client: Client,
    pub status: StatusWriter,
    /// Publishes the plan's Events on the Mesh; `None` disables them.
    pub recorder: Option<Recorder>,
    pub scraper: Arc<dyn Scrape>,
    /// Wall time at `started`; "now" is this plus tokio's elapsed time, so tests with paused
    /// time control the planner's clock too.
    pub epoch: Timestamp,
    pub started: tokio::time::Instant,
}

impl Edge {
    pub fn new(
        client: Client,
        status: StatusWriter,
        recorder: Option<Recorder>,
        scraper: Arc<dyn Scrape>,
    ) -> Self {
        Self::with_epoch(client, status, recorder, scraper, Timestamp::now())
    }

    pub fn with_epoch(
        client: Client,
        status: StatusWriter,
        recorder: Option<Recorder>,
        scraper: Arc<dyn Scrape>,
        epoch: Timestamp,
    ) -> Self {
        Self {
            client,
            // Whatever writer it is given, the rollout writes as `trellis-operator/rollout`
            // ([`FIELD_MANAGER`]): its own part of the Mesh status, never another's.
            status: status.for_controller("rollout"),
            recorder,
            scraper,
            epoch,
            started: tokio::time::Instant::now(),
        }
    }

    fn now(&self) -> Timestamp {
        let elapsed = self.started.elapsed();
        self.epoch
            .checked_add(elapsed)
            .unwrap_or(self.epoch)
            .round(jiff::Unit::Second)
            .unwrap_or(self.epoch)
    }
}

/// The server-side apply body that restarts (or, for a rollback, restarts and pins) a
/// workload: only the pod-template annotations this controller owns.
pub fn restart_body(action: &Action) -> Value {
    let key = action.key();
    let annotations = match action {
        Action::Restart { stamp, .. } => json!({ RESTARTED_AT: stamp }),
        Action::Rollback {
            version,
            failed_version,
            stamp,
            ..
        } => json!({
            RESTARTED_AT: stamp,
            PROXY_IMAGE_ANNOTATION: version,
            FAILED_VERSION_ANNOTATION: failed_version,
        }),
    };
    json!({
        "apiVersion": "apps/v1",
        "kind": key.kind.as_str(),
        "metadata": {"name": key.name, "namespace": key.namespace},
        "spec": {"template": {"metadata": {"annotations": annotations}}},
    })
}

async fn apply_restart(client: &Client, action: &Action) -> Result<(), kube::Error> {
    let key = action.key();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let body = restart_body(action);
    let patch = Patch::Apply(&body);
    match key.kind {
        WorkloadKind::Deployment => {
            Api::<Deployment>::namespaced(client.clone(), &key.namespace)
                .patch(&key.name, &params, &patch)
                .await?;
        }
        WorkloadKind::StatefulSet => {
            Api::<StatefulSet>::namespaced(client.clone(), &key.namespace)
                .patch(&key.name, &params, &patch)
                .await?;
        }
        WorkloadKind::DaemonSet => {
            Api::<DaemonSet>::namespaced(client.clone(), &key.namespace)
                .patch(&key.name, &params, &patch)
                .await?;
        }
    }
    Ok(())
}

/// The `RolloutProgressing` condition for a rollout status.
pub fn condition(st: &RolloutStatus, generation: Option<i64>) -> Condition {
    Condition::new(
        CONDITION,
        ConditionStatus::from_bool(st.state == RolloutState::Progressing),
        st.reason.clone(),
        st.message.clone(),
        generation,
    )
}

/// One pass; returns the status it computed (the next pass's memory) and whether every write
/// succeeded.
pub async fn pass(
    edge: &Edge,
    stores: &Stores,
    memory: Option<RolloutStatus>,
) -> (Option<RolloutStatus>, bool) {
    let Some(mesh) = stores.mesh() else {
        return (memory, true);
    };
    let spec = &mesh.spec.rollout;
    let desired = mesh.spec.proxy.effective_image();
    let generation = mesh.metadata.generation.unwrap_or(0);
    let observed = stores.observe(&mesh);
    let previous = memory.or_else(|| {
        mesh.status
            .as_ref()
            .and_then(|s| s.rollout.as_deref().cloned())
    });
    let window = crate::duration::parse(&spec.health_gate.window);

    // The gate, for the in-flight workloads that finished restarting.
    let awaiting = plan::awaiting_gate(
        spec,
        generation,
        desired,
        &observed.workloads,
        previous.as_ref(),
    );
    let verdicts = gate::verdicts(
        edge.scraper.as_ref(),
        spec,
        desired,
        &awaiting,
        &observed.pods,
    )
    .await;

    let empty = BTreeMap::new();
    let mut plan = plan::plan(&Input {
        now: edge.now(),
        generation,
        desired,
        spec,
        workloads: &observed.workloads,
        unmanaged: &observed.unmanaged,
        verdicts: if verdicts.is_empty() {
            &empty
        } else {
            &verdicts
        },
        previous: previous.as_ref(),
    });
    let ok = execute(edge, &observed, &mut plan, window.ok()).await;
    publish(edge, &mesh, &plan).await;

    // Only this controller's part: `status.rollout` and `RolloutProgressing`. Every other
    // field is `None` (not serialized), so the apply under `trellis-operator/rollout` neither
    // takes nor drops what the other controllers own.
    let part = MeshStatus {
        conditions: vec![condition(&plan.status, mesh.metadata.generation)],
        rollout: Some(Box::new(plan.status.clone())),
        ..MeshStatus::default()
    };
    let written = match edge.status.apply(mesh.as_ref(), part).await {
        Ok(_) | Err(crate::status::Error::Gone { .. }) => true,
        Err(e) => {
            tracing::warn!(error = %e, kind = e.metric_label(), "rollout status not written; will retry");
            false
        }
    };
    (Some(plan.status), ok && written)
}

/// Measures the baselines of the workloads about to restart, then makes the plan's writes. A
/// restart that fails leaves the batch (the workload stays a candidate for a later one).
async fn execute(
    edge: &Edge,
    observed: &Observed,
    plan: &mut Plan,
    window: Option<Duration>,
) -> bool {
    let restarts: Vec<&WorkloadKey> = plan
        .actions
        .iter()
        .filter(|a| matches!(a, Action::Restart { .. }))
        .map(Action::key)
        .collect();
    let baselines = gate::baselines(
        edge.scraper.as_ref(),
        window.filter(|_| !restarts.is_empty()),
        &restarts.into_iter().cloned().collect::<Vec<_>>(),
        &observed.pods,
    )
    .await;
    for f in &mut plan.status.in_flight {
        if let Some(key) = key_of(f.kind.as_str(), &f.namespace, &f.name)
            && let Some(b) = baselines.get(&key)
        {
            f.baseline = b.clone();
        }
    }

    let mut ok = true;
    let mut failed = Vec::new();
    for action in &plan.actions {
        match apply_restart(&edge.client, action).await {
            Ok(()) => tracing::info!(workload = %action.key(), "restarted"),
            Err(e) => {
                tracing::warn!(workload = %action.key(), error = %e, "restart failed");
                ok = false;
                failed.push((action.key().clone(), e.to_string()));
            }
        }
    }
    for (key, why) in failed {
        plan.status
            .in_flight
            .retain(|f| key_of(&f.kind, &f.namespace, &f.name).as_ref() != Some(&key));
        plan.events.push(plan::PlanEvent {
            reason: "RestartFailed",
            message: format!("{key}: {why}"),
            warning: true,
        });
    }
    ok
}

fn key_of(kind: &str, namespace: &str, name: &str) -> Option<WorkloadKey> {
    Some(WorkloadKey::new(
        WorkloadKind::parse(kind)?,
        namespace,
        name,
    ))
}

async fn publish(edge: &Edge, mesh: &Mesh, plan: &Plan) {
    let Some(recorder) = &edge.recorder else {
        return;
    };
    let reference = mesh.object_ref(&());
    for e in &plan.events {
        let ev = Event {
            type_: if e.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: e.reason.into(),
            note: Some(e.message.chars().take(1000).collect()),
            action: "Rollout".into(),
            secondary: None,
        };
        // An Event is best effort: losing one must not fail the pass.
        if let Err(e) = recorder.publish(&ev, &reference).await {
            tracing::warn!(error = %e, "event not published");
        }
    }
}

/// Starts the workload watches and joins them to the process's [`SharedStores`] (the Mesh,
/// namespaces and pods, which the compiler reads too: the leader caches every pod once, as a
/// record whose controller reference, labels and proxy version are what [`observe`] reads);
/// returns the stores and the merged change stream.
pub fn watch_all(
    client: &Client,
    shared: &SharedStores,
) -> (Stores, impl Stream<Item = ()> + Send + 'static) {
    let (common, common_changes) = shared.subscribe();
    let (deployments, w_dep) = reflector::store();
    let (stateful_sets, w_sts) = reflector::store();
    let (daemon_sets, w_ds) = reflector::store();
    let cfg = watcher::Config::default;
    let streams = vec![
        watch(
            Api::<Deployment>::all(client.clone()),
            cfg(),
            w_dep,
            observe::strip_deployment,
        ),
        watch(
            Api::<StatefulSet>::all(client.clone()),
            cfg(),
            w_sts,
            observe::strip_stateful_set,
        ),
        watch(
            Api::<DaemonSet>::all(client.clone()),
            cfg(),
            w_ds,
            observe::strip_daemon_set,
        ),
        common_changes.boxed(),
    ];
    let stores = Stores {
        meshes: common.meshes,
        namespaces: common.namespaces,
        deployments,
        stateful_sets,
        daemon_sets,
        pods: common.pods,
    };
    (stores, futures::stream::select_all(streams))
}

/// Runs the rollout controller until `shutdown` fires or the watches end. New pods' metrics
/// are read through the API server's pod proxy.
pub async fn run(
    client: Client,
    shared: &SharedStores,
    status: StatusWriter,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let (stores, changes) = watch_all(&client, shared);
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    let scraper = Arc::new(gate::PodProxy(client.clone()));
    let edge = Edge::new(client, status, Some(recorder), scraper);
    drive(stores, changes, edge, shutdown).await
}

/// The loop of [`run`], apart from the watches so tests can fill the stores by hand.
/// `changes` must yield after the stores took a change and end when the watches do.
pub async fn drive(
    stores: Stores,
    changes: impl Stream<Item = ()> + Send + 'static,
    edge: Edge,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    // Any number of changes during a pass mean one more pass: a one-slot channel.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut driver = AbortOnDropHandle::new(tokio::spawn(async move {
        let mut changes = std::pin::pin!(changes);
        while changes.next().await.is_some() {
            let _ = tx.try_send(());
        }
    }));
    tokio::select! {
        ready = stores.wait_until_ready() => ready?,
        _ = &mut driver => return Err(Error::StreamsEnded),
        _ = shutdown.cancelled() => return Ok(()),
    }
    let mut memory: Option<RolloutStatus> = None;
    loop {
        // A pass may wait on the gate's windows; shutdown must not.
        let (next, _ok) = tokio::select! {
            r = pass(&edge, &stores, memory.take()) => r,
            _ = shutdown.cancelled() => return Ok(()),
        };
        memory = next;
        tokio::select! {
            got = rx.recv() => if got.is_none() { break },
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        tokio::select! {
            _ = tokio::time::sleep(DEBOUNCE) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        while rx.try_recv().is_ok() {}
        if driver.is_finished() {
            break;
        }
    }
    Err(Error::StreamsEnded)
}
