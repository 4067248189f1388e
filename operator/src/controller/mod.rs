//! Controller registration: [`all`] lists every controller the leader runs.
//!
//! The controllers, all writing status through the one [`StatusWriter`]:
//! - `mesh`: a `kube::runtime::Controller` whose reconcile is a pure function of the Mesh
//!   ([`mesh_status`]: accepted or not, and `Ready` summarising the parts);
//! - `ca` ([`crate::ca::controller`]): the CA Secret, trust bundles, the webhook configuration,
//!   and the Mesh's `CAReady` / `WebhookReady`;
//! - `compile` ([`compile`]): the sidecar configs, TrafficPolicy and PeerAuthentication status,
//!   and the Mesh's `Programmed` / `Degraded` / `ProxiesUpToDate` and proxy counts
//!   ([`proxies`]);
//! - `rollout` ([`crate::rollout::controller`]): restarts out-of-date workloads in health-gated
//!   batches, and writes the Mesh's `status.rollout` and `RolloutProgressing`;
//! - `addons` ([`crate::addons::controller`]): the observability addons of
//!   `spec.observability`, and the Mesh's `ObservabilityReady`.
//!
//! Each writes its own part of a status under its own field manager
//! (`trellis-operator/<controller>`); see [`crate::status`].

pub mod compile;
pub mod compile_apply;
pub mod proxies;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::api::conditions::{Condition, ConditionStatus};
use crate::api::{MESH_NAME, Mesh, MeshStatus};
use crate::status::{self, HasStatus, StatusWriter};

/// What every reconcile gets.
pub struct Context {
    pub client: Client,
    pub status: StatusWriter,
    /// The operator's namespace (the mesh root namespace).
    pub namespace: String,
    pub metrics: Arc<Metrics>,
    /// The process's one set of the compiler's watches (the discovery replica and the rollout
    /// read it too).
    pub stores: compile::SharedStores,
}

/// Labels of the reconcile counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub controller: String,
    /// `ok` or the error's `metric_label()`.
    pub result: String,
}

/// `trellis_operator_reconciles_total`, shared by the status controllers run by `run`, the
/// compile loop (which is not a kube-rs `Controller`) and `trellis dev`'s compile.
#[derive(Clone, Debug, Default)]
pub struct Reconciles(Family<ReconcileLabels, Counter>);

impl Reconciles {
    pub fn register(registry: &mut Registry) -> Self {
        let r = Self::default();
        registry.register(
            "reconciles",
            "Reconciles by controller and result",
            r.0.clone(),
        );
        r
    }

    pub fn count(&self, controller: &str, result: &str) {
        self.counter(controller, result).inc();
    }

    /// Creates `controller`'s series for each of `results` at 0, as Prometheus advises for
    /// known label values: a failure rate then reads 0, not "no data", until one happens.
    pub fn init(&self, controller: &str, results: &[&str]) {
        for r in results {
            self.counter(controller, r);
        }
    }

    fn counter(&self, controller: &str, result: &str) -> Counter {
        self.0
            .get_or_create(&ReconcileLabels {
                controller: controller.into(),
                result: result.into(),
            })
            .clone()
    }
}

/// Controller metrics (registered under the `trellis_operator` prefix).
pub struct Metrics {
    pub reconciles: Reconciles,
    /// 1 while this replica holds the Lease.
    pub leader: Gauge,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            reconciles: Reconciles::register(registry),
            leader: Gauge::default(),
        };
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease and runs the controllers",
            m.leader.clone(),
        );
        m
    }

    fn count(&self, controller: &str, result: &str) {
        self.reconciles.count(controller, result);
    }
}

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Status(#[from] status::Error),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Status(e) => e.metric_label(),
        }
    }
}

/// A named controller future; it returns when `shutdown` fires.
pub type Named = (&'static str, BoxFuture<'static, ()>);

/// Every controller the leader runs. Add yours here.
pub fn all(ctx: Arc<Context>, shutdown: CancellationToken) -> Vec<Named> {
    // The compiler's meshed namespaces, for the CA's trust bundles: one predicate, computed
    // once from the compiler's caches (namespaces and pods).
    let (meshed_tx, meshed_rx) = tokio::sync::watch::channel(None);
    vec![
        (
            "mesh",
            run::<Mesh, _>(
                Api::all(ctx.client.clone()),
                ctx.clone(),
                shutdown.clone(),
                mesh_status,
            ),
        ),
        (
            "ca",
            Box::pin(crate::ca::controller::run(
                ctx.client.clone(),
                ctx.status.for_controller("ca"),
                ctx.namespace.clone(),
                meshed_rx,
                shutdown.clone(),
            )),
        ),
        // The compiler owns TrafficPolicy and PeerAuthentication status (Accepted, Programmed,
        // Ready) and the Mesh's Programmed/Degraded conditions.
        ("compile", {
            let settings = compile_settings(&ctx.namespace);
            let (client, status) = (ctx.client.clone(), ctx.status.for_controller("compile"));
            let shutdown = shutdown.clone();
            let stores = ctx.stores.clone();
            let reconciles = ctx.metrics.reconciles.clone();
            Box::pin(async move {
                let run = compile::run(
                    client, &stores, settings, status, reconciles, meshed_tx, shutdown,
                );
                if let Err(e) = run.await {
                    tracing::error!(error = %e, "compile controller stopped");
                }
            })
        }),
        // Sums every replica's propagation report into `status.propagation` and
        // `Propagated` (see `crate::propagation`).
        (
            "propagation",
            Box::pin(crate::propagation::writer::run(
                ctx.client.clone(),
                ctx.namespace.clone(),
                shutdown.clone(),
            )),
        ),
        // The observability addons and the Mesh's ObservabilityReady.
        (
            "addons",
            Box::pin(crate::addons::controller::run(
                ctx.client.clone(),
                ctx.status.for_controller("addons"),
                ctx.namespace.clone(),
                shutdown.clone(),
            )),
        ),
        ("rollout", {
            let (client, status) = (ctx.client.clone(), ctx.status.for_controller("rollout"));
            let stores = ctx.stores.clone();
            Box::pin(async move {
                let run = crate::rollout::controller::run(client, &stores, status, shutdown);
                if let Err(e) = run.await {
                    tracing::error!(error = %e, "rollout controller stopped");
                }
            })
        }),
    ]
}

/// The compiler's settings for an operator in `namespace` (`POD_NAMESPACE`): the mesh root
/// namespace is the operator's, and sidecars reach the identity endpoint through the operator
/// Service there (OLM installs into a namespace of the user's choosing).
pub fn compile_settings(namespace: &str) -> crate::compiler::Settings {
    crate::compiler::Settings {
        root_namespace: namespace.to_string(),
        identity_endpoint: Some(format!(
            "https://{}:15012",
            crate::ca::serving::operator_service_dns(namespace)
        )),
        ..Default::default()
    }
}

/// A status-only controller: `compute` maps an object to the status part it should report,
/// written under the field manager `trellis-operator/<kind in lower case>`.
fn run<K, F>(
    api: Api<K>,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
    compute: F,
) -> BoxFuture<'static, ()>
where
    K: HasStatus + kube::Resource<DynamicType = ()>,
    F: Fn(&K) -> K::Status + Send + Sync + Copy + 'static,
{
    let kind = K::kind(&()).to_string();
    Box::pin(async move {
        Controller::new(api, watcher::Config::default().any_semantic())
            .graceful_shutdown_on(async move { shutdown.cancelled_owned().await })
            .run(
                move |obj: Arc<K>, ctx: Arc<Context>| async move {
                    let kind = K::kind(&()).to_string();
                    let res = ctx
                        .status
                        .for_controller(&kind.to_lowercase())
                        .apply(obj.as_ref(), compute(&obj))
                        .await;
                    match res {
                        Ok(_) => {
                            ctx.metrics.count(&kind, "ok");
                            Ok(Action::requeue(Duration::from_secs(300)))
                        }
                        // Deleted between the watch event and the write: nothing to report.
                        Err(status::Error::Gone { .. }) => {
                            ctx.metrics.count(&kind, "gone");
                            Ok(Action::await_change())
                        }
                        Err(e) => {
                            let e = Error::from(e);
                            ctx.metrics.count(&kind, e.metric_label());
                            Err(e)
                        }
                    }
                },
                |obj: Arc<K>, err: &Error, _ctx: Arc<Context>| {
                    tracing::warn!(
                        kind = %K::kind(&()),
                        name = %obj.name_any(),
                        namespace = obj.namespace().unwrap_or_default(),
                        error = %err,
                        "reconcile failed; retrying in 30s"
                    );
                    Action::requeue(Duration::from_secs(30))
                },
                ctx,
            )
            .for_each(|_| futures::future::ready(()))
            .await;
        tracing::info!(%kind, "controller finished");
    })
}

fn cond(type_: &str, ok: bool, reason: &str, message: &str, generation: Option<i64>) -> Condition {
    Condition::new(
        type_,
        ConditionStatus::from_bool(ok),
        reason,
        message,
        generation,
    )
}

/// The parts whose conditions make the Mesh `Ready`; other controllers report them.
/// `ProxiesUpToDate` is not one: with `rollout.mode: Manual` (or a paused rollout) old proxies
/// are expected for as long as the user wants, and the mesh works meanwhile; it is reported
/// beside `Ready`, not inside it.
pub const MESH_PARTS: [&str; 3] = ["CAReady", "WebhookReady", "Programmed"];

/// The Mesh status part the `mesh` controller owns: `Accepted`, `Ready` and
/// `observedGeneration`. Pure.
///
/// `Ready` summarises the parts other controllers report ([`MESH_PARTS`] True, `Degraded` not
/// True), and only at the current generation: a part whose `observedGeneration` is not the
/// Mesh's `metadata.generation` was computed from an older spec, so `kubectl wait --for
/// condition=Ready` and GitOps health checks must not pass on it. Conditions and fields other
/// controllers own are not included: each controller applies its own part under its own field
/// manager and the API server merges them (see [`crate::status`]).
pub fn mesh_status(mesh: &Mesh) -> MeshStatus {
    let generation = mesh.metadata.generation;
    let current = mesh.status.clone().unwrap_or_default();
    let conditions = if mesh.name_any() == MESH_NAME {
        let ready = mesh_ready(&current.conditions, generation);
        vec![cond("Accepted", true, "Accepted", "", generation), ready]
    } else {
        let msg = format!(
            "only the Mesh named {MESH_NAME:?} configures the mesh; this one is ignored: rename it to {MESH_NAME}"
        );
        vec![
            cond("Accepted", false, "NotDefault", &msg, generation),
            cond("Ready", false, "NotDefault", &msg, generation),
        ]
    };
    MeshStatus {
        conditions,
        observed_generation: generation,
        ca: None,
        proxies: None,
        // Owned by the rollout controller (`trellis-operator/rollout`); `None` is not
        // serialized, so this manager never co-owns `status.rollout`.
        rollout: None,
        // Owned by the propagation writer (`trellis-operator/propagation`).
        propagation: None,
    }
}

/// The `Ready` condition of the default Mesh from the parts' conditions.
fn mesh_ready(parts: &[Condition], generation: Option<i64>) -> Condition {
    use crate::api::conditions::find;
    let mut waiting = Vec::new();
    let mut stale = Vec::new();
    let mut failing = Vec::new();
    let at_generation = |c: &Condition| c.observed_generation == generation;
    for part in MESH_PARTS {
        match find(parts, part) {
            None => waiting.push(part.to_string()),
            Some(c) if !c.is_true() && at_generation(c) => {
                failing.push(format!("{part}: {}", c.message))
            }
            Some(c) if !at_generation(c) => stale.push(format!(
                "{part} (observed generation {}, current {})",
                c.observed_generation.unwrap_or_default(),
                generation.unwrap_or_default()
            )),
            Some(_) => {}
        }
    }
    if let Some(d) = find(parts, "Degraded") {
        if !at_generation(d) {
            stale.push(format!(
                "Degraded (observed generation {}, current {})",
                d.observed_generation.unwrap_or_default(),
                generation.unwrap_or_default()
            ));
        } else if d.is_true() {
            failing.push(format!("Degraded: {}", d.message));
        }
    }
    if !failing.is_empty() {
        cond(
            "Ready",
            false,
            "PartNotReady",
            &failing.join("; "),
            generation,
        )
    } else if !stale.is_empty() {
        let msg = format!("the current spec is not acted on yet: {}", stale.join(", "));
        cond("Ready", false, "Reconciling", &msg, generation)
    } else if !waiting.is_empty() {
        let msg = format!("waiting for {}", waiting.join(", "));
        cond("Ready", false, "Pending", &msg, generation)
    } else {
        cond("Ready", true, "Ready", "", generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MeshSpec;
    use crate::api::conditions::find;

    /// Installed by OLM into `operators`, sidecars must call the identity endpoint there and the
    /// mesh-wide PeerAuthentication lives there; the default install keeps the defaults.
    #[test]
    fn compiler_settings_follow_the_operators_namespace() {
        let s = compile_settings("operators");
        assert_eq!(s.root_namespace, "operators");
        assert_eq!(
            s.identity_endpoint.as_deref(),
            Some("https://trellis-operator.operators.svc:15012")
        );
        let d = compile_settings(crate::compiler::DEFAULT_ROOT_NAMESPACE);
        let defaults = crate::compiler::Settings::default();
        assert_eq!(d.identity_endpoint, defaults.identity_endpoint);
        assert_eq!(d.root_namespace, defaults.root_namespace);
    }

    fn mesh(name: &str) -> Mesh {
        let mut m = Mesh::new(name, MeshSpec::default());
        m.metadata.generation = Some(4);
        m
    }

    /// The `mesh` controller applies only `Accepted`, `Ready` and `observedGeneration`: were it
    /// to send `status.rollout` (or `RolloutProgressing`) it would co-own them with
    /// `trellis-operator/rollout` and carry a stale copy back on every reconcile.
    #[test]
    fn the_mesh_controller_leaves_the_rollout_part_alone() {
        let mut m = mesh("default");
        m.status = Some(MeshStatus {
            conditions: vec![cond("RolloutProgressing", true, "Progressing", "", Some(4))],
            rollout: Some(Box::default()),
            ..Default::default()
        });
        let part = serde_json::to_value(mesh_status(&m)).unwrap();
        assert!(part.get("rollout").is_none(), "{part}");
        let types: Vec<&str> = part["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["Accepted", "Ready"]);
    }

    fn with_parts(mut m: Mesh, parts: Vec<Condition>) -> Mesh {
        m.status = Some(MeshStatus {
            conditions: parts,
            ..Default::default()
        });
        m
    }

    #[test]
    fn the_default_mesh_is_ready_once_its_parts_are() {
        let s = mesh_status(&mesh("default"));
        assert_eq!(s.observed_generation, Some(4));
        let accepted = find(&s.conditions, "Accepted").unwrap();
        assert!(accepted.is_true());
        assert_eq!(accepted.observed_generation, Some(4));
        let ready = find(&s.conditions, "Ready").unwrap();
        assert!(!ready.is_true(), "nothing reported yet");
        assert_eq!(ready.reason, "Pending");
        assert!(ready.message.contains("CAReady"), "{}", ready.message);

        let m = with_parts(mesh("default"), all_parts_at(Some(4)));
        assert!(
            find(&mesh_status(&m).conditions, "Ready")
                .unwrap()
                .is_true()
        );
    }

    fn all_parts_at(generation: Option<i64>) -> Vec<Condition> {
        vec![
            cond("CAReady", true, "Ready", "", generation),
            cond("WebhookReady", true, "Configured", "", generation),
            cond("Programmed", true, "Programmed", "", generation),
            cond("Degraded", false, "AsExpected", "", generation),
        ]
    }

    /// Issue 13 item 4: parts reported for an older spec must not make the Mesh Ready.
    #[test]
    fn parts_from_an_older_generation_do_not_make_the_mesh_ready() {
        // Spec edited (generation 5); the parts still describe generation 4.
        let mut m = with_parts(mesh("default"), all_parts_at(Some(4)));
        m.metadata.generation = Some(5);
        let ready = find(&mesh_status(&m).conditions, "Ready").unwrap().clone();
        assert!(!ready.is_true(), "{ready:?}");
        assert_eq!(ready.reason, "Reconciling");
        assert!(
            ready
                .message
                .contains("CAReady (observed generation 4, current 5)"),
            "{}",
            ready.message
        );
        assert_eq!(ready.observed_generation, Some(5));
        // One part caught up, the others not: still not Ready.
        let mut parts = all_parts_at(Some(4));
        parts[0].observed_generation = Some(5);
        let mut m = with_parts(mesh("default"), parts);
        m.metadata.generation = Some(5);
        assert!(
            !find(&mesh_status(&m).conditions, "Ready")
                .unwrap()
                .is_true()
        );
        // Every part at generation 5: Ready.
        let mut m = with_parts(mesh("default"), all_parts_at(Some(5)));
        m.metadata.generation = Some(5);
        assert!(
            find(&mesh_status(&m).conditions, "Ready")
                .unwrap()
                .is_true()
        );
    }

    #[test]
    fn the_compiler_not_having_programmed_the_mesh_keeps_it_not_ready() {
        let mut parts = all_parts_at(Some(4));
        parts.retain(|c| c.type_ != "Programmed");
        let ready = find(
            &mesh_status(&with_parts(mesh("default"), parts)).conditions,
            "Ready",
        )
        .unwrap()
        .clone();
        assert_eq!(ready.reason, "Pending");
        assert!(ready.message.contains("Programmed"), "{}", ready.message);
    }

    #[test]
    fn a_failing_part_or_degradation_makes_the_mesh_not_ready() {
        let m = with_parts(
            mesh("default"),
            vec![
                cond(
                    "CAReady",
                    false,
                    "SecretInvalid",
                    "tls.key is missing",
                    Some(4),
                ),
                cond("WebhookReady", true, "Configured", "", Some(4)),
                cond("Programmed", true, "Programmed", "", Some(4)),
            ],
        );
        let ready = mesh_status(&m).conditions[1].clone();
        assert_eq!(ready.type_, "Ready");
        assert_eq!(ready.reason, "PartNotReady");
        assert!(
            ready.message.contains("tls.key is missing"),
            "{}",
            ready.message
        );

        let m = with_parts(
            mesh("default"),
            vec![
                cond("CAReady", true, "Ready", "", Some(4)),
                cond("WebhookReady", true, "Configured", "", Some(4)),
                cond("Programmed", true, "Programmed", "", Some(4)),
                cond("Degraded", true, "ConfigTooLarge", "namespace big", Some(4)),
            ],
        );
        assert!(
            !find(&mesh_status(&m).conditions, "Ready")
                .unwrap()
                .is_true()
        );
    }

    #[test]
    fn another_mesh_is_not_accepted() {
        let s = mesh_status(&mesh("prod"));
        let accepted = find(&s.conditions, "Accepted").unwrap();
        assert_eq!(accepted.status, ConditionStatus::False);
        assert_eq!(accepted.reason, "NotDefault");
        assert!(accepted.message.contains("rename it to default"));
        assert!(!find(&s.conditions, "Ready").unwrap().is_true());
    }

    /// Issue 13 item 4: this controller's part carries only what it owns, so applying it
    /// under its own field manager cannot overwrite (or, from a stale snapshot, revert) what
    /// the CA and compile controllers report.
    #[test]
    fn the_mesh_part_carries_only_its_own_conditions_and_fields() {
        let mut m = mesh("default");
        m.status = Some(MeshStatus {
            proxies: Some(crate::api::mesh::ProxyCounts {
                total: 3,
                up_to_date: 2,
            }),
            conditions: vec![cond("CAReady", true, "Ready", "", Some(4))],
            ..Default::default()
        });
        let part = mesh_status(&m);
        assert_eq!(part.proxies, None);
        assert_eq!(part.ca, None);
        let types: Vec<&str> = part.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Accepted", "Ready"]);
    }
}

/// The controllers' wiring against recorded API exchanges: a list answers with objects, the
/// watch stays open, and the reconcile must write the expected status through the status
/// writer.
#[cfg(test)]
mod wiring_tests {
    use std::time::Duration;

    use http::{Method, Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};

    use super::*;
    use crate::api::{TrafficPolicy, TrafficPolicyStatus};

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn context() -> (Arc<Context>, Handle, Registry) {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "default");
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::register(&mut registry));
        let ctx = Arc::new(Context {
            client: client.clone(),
            status: StatusWriter::with_clock(
                client.clone(),
                Arc::new(|| "2026-11-25T12:00:00Z".into()),
            ),
            namespace: "trellis-system".into(),
            metrics,
            stores: compile::SharedStores::new(client, CancellationToken::new()),
        });
        (ctx, handle, registry)
    }

    /// Serves list and watch requests for `list_path` and returns the first status patch body.
    async fn first_status_patch(
        mut handle: Handle,
        list_path: &str,
        list: Value,
    ) -> (String, Value) {
        let mut open_watches = Vec::new();
        loop {
            let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
                .await
                .expect("no status patch within 5s")
                .expect("client gone");
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or_default().to_string();
            match *req.method() {
                Method::GET if path == list_path && query.contains("watch=true") => {
                    // Keep the watch open and silent.
                    open_watches.push(send);
                }
                Method::GET if path == list_path => send.send_response(
                    Response::builder()
                        .body(Body::from(serde_json::to_vec(&list).unwrap()))
                        .unwrap(),
                ),
                Method::PATCH if path.ends_with("/status") => {
                    assert!(
                        query.contains("fieldManager=trellis-operator%2F"),
                        "{query}"
                    );
                    let body: Value =
                        serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap())
                            .unwrap();
                    // Answer like the API server: the whole object with the new status.
                    let mut object = list["items"][0].clone();
                    object["status"] = body["status"].clone();
                    send.send_response(
                        Response::builder()
                            .body(Body::from(serde_json::to_vec(&object).unwrap()))
                            .unwrap(),
                    );
                    return (path, body);
                }
                ref m => panic!("unexpected request {m} {path}?{query}"),
            }
        }
    }

    #[tokio::test]
    async fn a_mesh_not_named_default_is_reported_not_default() {
        let (ctx, handle, registry) = context();
        let shutdown = CancellationToken::new();
        let mesh = json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "Mesh",
            "metadata": {"name": "prod", "generation": 2, "resourceVersion": "7", "uid": "u1"},
            "spec": {}});
        let list = json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "MeshList",
            "metadata": {"resourceVersion": "7"}, "items": [mesh]});
        let controller = tokio::spawn(run::<Mesh, _>(
            Api::all(ctx.client.clone()),
            ctx.clone(),
            shutdown.clone(),
            mesh_status,
        ));
        let (path, body) =
            first_status_patch(handle, "/apis/trellis.dev/v1alpha1/meshes", list).await;
        assert_eq!(path, "/apis/trellis.dev/v1alpha1/meshes/prod/status");
        assert_eq!(body["status"]["observedGeneration"], 2);
        let accepted = &body["status"]["conditions"][0];
        assert_eq!(accepted["type"], "Accepted");
        assert_eq!(accepted["status"], "False");
        assert_eq!(accepted["reason"], "NotDefault");

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), controller)
            .await
            .expect("controller stops on shutdown")
            .unwrap();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"reconciles_total{controller="Mesh",result="ok"} 1"#),
            "{text}"
        );
    }

    /// A status computed from a namespaced object, for [`run`]'s namespaced path.
    fn accepted(tp: &TrafficPolicy) -> TrafficPolicyStatus {
        let generation = tp.metadata.generation;
        TrafficPolicyStatus {
            conditions: vec![cond("Accepted", true, "Accepted", "", generation)],
            observed_generation: generation,
            propagation: None,
        }
    }

    #[tokio::test]
    async fn a_namespaced_object_gets_its_status_at_its_namespaced_path() {
        let (ctx, handle, _registry) = context();
        let shutdown = CancellationToken::new();
        let tp = json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": "web", "namespace": "shop", "generation": 1, "resourceVersion": "3", "uid": "u2"},
            "spec": {"targetRef": {"kind": "Service", "name": "web"}}});
        let list = json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "TrafficPolicyList",
            "metadata": {"resourceVersion": "3"}, "items": [tp]});
        let controller = tokio::spawn(run::<TrafficPolicy, _>(
            Api::all(ctx.client.clone()),
            ctx,
            shutdown.clone(),
            accepted,
        ));
        let (path, body) =
            first_status_patch(handle, "/apis/trellis.dev/v1alpha1/trafficpolicies", list).await;
        assert_eq!(
            path,
            "/apis/trellis.dev/v1alpha1/namespaces/shop/trafficpolicies/web/status"
        );
        assert_eq!(body["status"]["conditions"][0]["status"], "True");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), controller)
            .await
            .expect("controller stops on shutdown")
            .unwrap();
    }
}
