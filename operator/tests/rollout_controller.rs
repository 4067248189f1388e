//! The rollout controller's loop ([`drive`]) with real reflector stores filled by hand, a
//! change stream the test drives, and the API server as recorded exchanges (the pattern of
//! `compile_controller.rs`). The health gate reads metrics through the API server's pod proxy,
//! so its scrapes are recorded exchanges too, answered with sidecar metrics text.
//!
//! Time is paused: the gate's windows, the debounce and the deadline pass in virtual time, and
//! the planner's clock follows it (`Edge::with_epoch`).

mod recorded;

use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc::{UnboundedSender, unbounded};
use http::Method;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Namespace;
use kube::Resource;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher::Event;
use recorded::{ApiServer, Exchange};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use trellis_operator::api::Mesh;
use trellis_operator::compiler::SlimPod;
use trellis_operator::pods::{self, PodWriter};
use trellis_operator::rollout::controller::{DEBOUNCE, Edge, Error, Stores, TICK, drive};
use trellis_operator::rollout::gate::PodProxy;
use trellis_operator::status::StatusWriter;

const T0: &str = "2026-11-29T12:00:00Z";
const OLD: &str = "proxy:v1";
const NEW: &str = "proxy:v2";
const SSA: &str = "?&force=true&fieldManager=trellis-operator%2Frollout";
const WINDOW: Duration = Duration::from_secs(10);

fn mesh(generation: i64) -> Mesh {
    mesh_with(generation, "Pause")
}

fn mesh_with(generation: i64, failure_policy: &str) -> Mesh {
    serde_json::from_value(json!({
        "apiVersion": "trellis.dev/v1alpha1", "kind": "Mesh",
        "metadata": {"name": "default", "generation": generation},
        "spec": {
            "proxy": {"image": NEW},
            "rollout": {"batchSize": 1, "progressDeadline": "1m", "failurePolicy": failure_policy,
                        "healthGate": {"window": "10s"}}
        }
    }))
    .unwrap()
}

/// A Deployment with `replicas` pods, all updated and ready at `generation`.
fn deployment(name: &str, generation: i64) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "shop", "generation": generation},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}}}},
        "status": {"observedGeneration": generation, "replicas": 1, "updatedReplicas": 1,
                   "readyReplicas": 1}
    }))
    .unwrap()
}

/// The same Deployment after the restart, not yet rolled out.
fn rolling(name: &str) -> Deployment {
    let mut d = deployment(name, 2);
    d.status.as_mut().unwrap().observed_generation = Some(1);
    d
}

fn pod(deploy: &str, hash: &str, version: &str) -> SlimPod {
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("{deploy}-{hash}-x"), "namespace": "shop",
            "labels": {"pod-template-hash": hash},
            "annotations": {"trellis.dev/proxy-version": version},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("{deploy}-{hash}"), "uid": "u", "controller": true}]
        },
        "status": {"podIP": "10.1.0.7"}
    }))
    .unwrap()
}

/// A sidecar's inbound metrics after `ok` 2xx and `failed` 5xx responses, all under 5 ms.
fn metrics(ok: u64, failed: u64) -> String {
    let all = ok + failed;
    format!(
        "# TYPE trellis_proxy_requests counter
trellis_proxy_requests_total{{direction=\"inbound\",peer_identity=\"spiffe://cluster.local/ns/shop/sa/frontend\",dst_service=\"local\",status_code=\"200\",status_class=\"2xx\",tls=\"true\"}} {ok}
trellis_proxy_requests_total{{direction=\"inbound\",peer_identity=\"spiffe://cluster.local/ns/shop/sa/frontend\",dst_service=\"local\",status_code=\"503\",status_class=\"5xx\",tls=\"true\"}} {failed}
trellis_proxy_response_latency_seconds_bucket{{direction=\"inbound\",dst_service=\"local\",status_class=\"2xx\",le=\"0.004\"}} {all}
trellis_proxy_response_latency_seconds_bucket{{direction=\"inbound\",dst_service=\"local\",status_class=\"2xx\",le=\"+Inf\"}} {all}
# EOF
"
    )
}

struct Watches {
    meshes: Writer<Mesh>,
    namespaces: Writer<Namespace>,
    deployments: Writer<Deployment>,
    stateful_sets: Writer<StatefulSet>,
    daemon_sets: Writer<DaemonSet>,
    pods: PodWriter,
    changes: UnboundedSender<()>,
}

fn list<K>(writer: &mut Writer<K>, objects: impl IntoIterator<Item = K>)
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    writer.apply_watcher_event(&Event::Init);
    for o in objects {
        writer.apply_watcher_event(&Event::InitApply(o));
    }
    writer.apply_watcher_event(&Event::InitDone);
}

impl Watches {
    fn notify(&self) {
        self.changes.unbounded_send(()).unwrap();
    }
}

struct Harness {
    /// The Mesh the stores hold (its status follows the controller's writes).
    mesh: Mesh,
    w: Watches,
    api: ApiServer,
    shutdown: CancellationToken,
    controller: JoinHandle<Result<(), Error>>,
}

impl Harness {
    /// Starts the loop over stores listing `deployments` and `pods`.
    fn start(deployments: Vec<Deployment>, pods: Vec<SlimPod>) -> Self {
        Self::start_with(mesh(1), false, deployments, pods)
    }

    /// As [`start`](Self::start), with `mesh`, and Events recorded when `events`.
    fn start_with(
        mesh: Mesh,
        events: bool,
        deployments: Vec<Deployment>,
        pods: Vec<SlimPod>,
    ) -> Self {
        let (meshes, w_mesh) = reflector::store();
        let (namespaces, w_ns) = reflector::store();
        let (deps, w_dep) = reflector::store();
        let (sts, w_sts) = reflector::store();
        let (ds, w_ds) = reflector::store();
        let (pod_store, w_pod) = pods::store();
        let stores = Stores {
            meshes,
            namespaces,
            deployments: deps,
            stateful_sets: sts,
            daemon_sets: ds,
            pods: pod_store,
        };
        let (changes, stream) = unbounded();
        let (client, handle) = recorded::mock();
        let status = StatusWriter::with_clock(client.clone(), Arc::new(|| T0.to_string()));
        let recorder = events.then(|| {
            Recorder::new(
                client.clone(),
                Reporter {
                    controller: "trellis-operator/rollout".into(),
                    instance: None,
                },
            )
        });
        let edge = Edge::with_epoch(
            client.clone(),
            status,
            recorder,
            Arc::new(PodProxy(client)),
            T0.parse().unwrap(),
        );
        let shutdown = CancellationToken::new();
        let controller = tokio::spawn(drive(stores, stream, edge, shutdown.clone()));
        let mut w = Watches {
            meshes: w_mesh,
            namespaces: w_ns,
            deployments: w_dep,
            stateful_sets: w_sts,
            daemon_sets: w_ds,
            pods: w_pod,
            changes,
        };
        list(&mut w.meshes, [mesh.clone()]);
        list(&mut w.namespaces, []);
        list(&mut w.deployments, deployments);
        list(&mut w.stateful_sets, []);
        list(&mut w.daemon_sets, []);
        w.pods.apply_watcher_event(&Event::Init);
        for p in pods {
            w.pods.apply_watcher_event(&Event::InitApply(p));
        }
        w.pods.apply_watcher_event(&Event::InitDone);
        w.notify();
        Harness {
            mesh,
            w,
            api: ApiServer(handle),
            shutdown,
            controller,
        }
    }

    /// Answers one scrape of `pod`'s sidecar through the pod proxy with `text`.
    async fn scrape(&mut self, within: Duration, pod: &str, text: String) {
        let (req, send) = tokio::time::timeout(within, self.api.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("no scrape of {pod} within {within:?}"))
            .expect("client gone");
        assert_eq!(req.method(), Method::GET);
        assert_eq!(
            req.uri().path(),
            format!("/api/v1/namespaces/shop/pods/{pod}:15020/proxy/metrics")
        );
        send.send_response(http::Response::new(kube::client::Body::from(
            text.into_bytes(),
        )));
    }

    /// Answers a gate window over `pod`: a scrape showing `before`, one `WINDOW` later showing
    /// `after`.
    async fn window(&mut self, within: Duration, pod: &str, before: String, after: String) {
        self.scrape(within, pod, before).await;
        let first = Instant::now();
        self.scrape(WINDOW * 2, pod, after).await;
        assert_eq!(first.elapsed(), WINDOW, "the window of {pod}");
    }

    /// The controller writes a status; the watch then shows it in the Mesh store.
    async fn status_write(
        &mut self,
        within: Duration,
        check: impl FnOnce(&Value) + Send + 'static,
    ) -> Value {
        let (tx, rx) = std::sync::mpsc::channel();
        self.api
            .expect(
                within,
                Exchange {
                    method: Method::PATCH,
                    path_and_query: format!(
                        "/apis/trellis.dev/v1alpha1/meshes/default/status{SSA}"
                    ),
                    check: Box::new(move |b| {
                        assert_eq!(b["apiVersion"], "trellis.dev/v1alpha1");
                        assert_eq!(b["kind"], "Mesh");
                        check(b);
                        tx.send(b.clone()).unwrap();
                    }),
                    reply: serde_json::to_value(mesh(1)).unwrap(),
                    status: 200,
                },
            )
            .await;
        let body = rx.recv().unwrap();
        self.mesh.status = Some(serde_json::from_value(body["status"].clone()).unwrap());
        self.w
            .meshes
            .apply_watcher_event(&Event::Apply(self.mesh.clone()));
        self.w.notify();
        body
    }

    async fn shut_down(self) {
        self.shutdown.cancel();
        let r = tokio::time::timeout(DEBOUNCE, self.controller)
            .await
            .expect("the controller did not stop")
            .unwrap();
        assert!(r.is_ok(), "{r:?}");
        self.api.expect_no_more().await;
    }
}

/// The exact server-side apply that restarts `name`.
fn restart(name: &str, stamp: &'static str) -> Exchange {
    let n = name.to_string();
    Exchange {
        method: Method::PATCH,
        path_and_query: format!("/apis/apps/v1/namespaces/shop/deployments/{name}{SSA}"),
        check: Box::new(move |b| {
            assert_eq!(
                *b,
                json!({
                    "apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": n, "namespace": "shop"},
                    "spec": {"template": {"metadata": {"annotations": {
                        "kubectl.kubernetes.io/restartedAt": stamp}}}}
                })
            );
        }),
        reply: serde_json::to_value(rolling(name)).unwrap(),
        status: 200,
    }
}

fn rollout(b: &Value) -> &Value {
    &b["status"]["rollout"]
}

fn condition(b: &Value) -> (String, String) {
    let c = b["status"]["conditions"].as_array().unwrap();
    assert_eq!(c.len(), 1, "only its own condition: {c:?}");
    assert_eq!(c[0]["type"], "RolloutProgressing");
    (
        c[0]["status"].as_str().unwrap().into(),
        c[0]["reason"].as_str().unwrap().into(),
    )
}

/// Restart, then the workload's pods move to the new version in a burst of watch events.
async fn restarted(h: &mut Harness) {
    h.window(
        Duration::from_secs(1),
        "catalog-old-x",
        metrics(100, 0),
        metrics(200, 0),
    )
    .await;
    h.api
        .expect(Duration::from_secs(1), restart("catalog", T0))
        .await;
    let b = h
        .status_write(Duration::from_secs(1), |b| {
            let r = rollout(b);
            assert_eq!(r["state"], "Progressing");
            assert_eq!(r["desiredVersion"], NEW);
            assert_eq!(
                (r["currentBatch"].as_u64(), r["totalBatches"].as_u64()),
                (Some(1), Some(1))
            );
            assert_eq!(r["pods"], json!({OLD: 1}));
            assert_eq!(r["inFlight"][0]["name"], "catalog");
            assert_eq!(r["inFlight"][0]["previousVersion"], OLD);
            // The baseline: 100 requests in the window, all successful.
            assert_eq!(r["inFlight"][0]["baseline"]["requests"], 100);
            assert_eq!(r["inFlight"][0]["baseline"]["successRate"], 1.0);
            assert_eq!(condition(b), ("True".into(), "BatchInProgress".into()));
        })
        .await;
    assert_eq!(
        b["status"]["conditions"][0]["lastTransitionTime"], T0,
        "written with the status writer's clock"
    );
}

/// The pods of the restart arrive one watch event at a time.
fn roll_pods(h: &mut Harness, new_metrics_pod: bool) {
    h.w.deployments
        .apply_watcher_event(&Event::Apply(rolling("catalog")));
    h.w.notify();
    let mut old = pod("catalog", "old", OLD);
    old.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        T0.parse().unwrap(),
    ));
    h.w.pods.apply_watcher_event(&Event::Apply(old.clone()));
    h.w.notify();
    if new_metrics_pod {
        h.w.pods
            .apply_watcher_event(&Event::Apply(pod("catalog", "new", NEW)));
        h.w.notify();
    }
    h.w.pods.apply_watcher_event(&Event::Delete(old));
    h.w.notify();
    h.w.deployments
        .apply_watcher_event(&Event::Apply(deployment("catalog", 2)));
    h.w.notify();
}

#[tokio::test(start_paused = true)]
async fn a_healthy_restart_passes_the_gate_with_one_status_write() {
    let mut h = Harness::start(
        vec![deployment("catalog", 1)],
        vec![pod("catalog", "old", OLD)],
    );
    restarted(&mut h).await;

    // A burst of pod and workload events: one pass, one gate, one status write.
    roll_pods(&mut h, true);
    let started = Instant::now();
    h.window(
        2 * DEBOUNCE,
        "catalog-new-x",
        metrics(0, 0),
        metrics(150, 0),
    )
    .await;
    h.status_write(Duration::from_secs(1), |b| {
        let r = rollout(b);
        assert_eq!(r["state"], "Complete", "{r}");
        assert_eq!(r["pods"], json!({NEW: 1}));
        assert_eq!(r["inFlight"], json!([]));
        assert_eq!(condition(b), ("False".into(), "Complete".into()));
    })
    .await;
    assert!(started.elapsed() < WINDOW + 2 * DEBOUNCE);
    // Converged: passes keep running (every TICK) and write nothing.
    h.api.expect_none_for(TICK * 6).await;
    h.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn new_pods_answering_5xx_fail_the_gate_and_pause_the_rollout() {
    let mut h = Harness::start(
        vec![deployment("catalog", 1)],
        vec![pod("catalog", "old", OLD)],
    );
    restarted(&mut h).await;
    roll_pods(&mut h, true);
    h.window(
        2 * DEBOUNCE,
        "catalog-new-x",
        metrics(0, 0),
        metrics(60, 40),
    )
    .await;
    h.status_write(Duration::from_secs(1), |b| {
        let r = rollout(b);
        assert_eq!(r["state"], "Paused", "{r}");
        assert_eq!(r["reason"], "HealthGateFailed");
        let msg = r["message"].as_str().unwrap();
        assert!(msg.contains("Deployment shop/catalog"), "{msg}");
        assert!(msg.contains("success rate 60.0 %"), "{msg}");
        assert_eq!(r["failures"][0]["reason"], "HealthGateFailed");
        assert_eq!(r["failures"][0]["version"], NEW);
        assert_eq!(r["heldAtGeneration"], 1);
        assert_eq!(condition(b), ("False".into(), "HealthGateFailed".into()));
    })
    .await;
    // Held: nothing restarts, nothing is written.
    h.api.expect_none_for(TICK * 6).await;
    h.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn a_workload_that_never_becomes_ready_pauses_the_rollout_at_the_deadline() {
    let mut h = Harness::start(
        vec![deployment("catalog", 1)],
        vec![pod("catalog", "old", OLD)],
    );
    let t0 = Instant::now();
    restarted(&mut h).await;
    // The Deployment controller saw the restart but no new pod ever gets ready.
    h.w.deployments
        .apply_watcher_event(&Event::Apply(rolling("catalog")));
    h.w.notify();
    h.status_write(Duration::from_secs(120), |b| {
        let r = rollout(b);
        assert_eq!(r["state"], "Paused", "{r}");
        assert_eq!(r["reason"], "DeadlineExceeded");
        let msg = r["message"].as_str().unwrap();
        assert!(
            msg.contains("0/1 replicas updated") || msg.contains("1/1 replicas updated"),
            "{msg}"
        );
        assert!(msg.contains("progressDeadline (1m)"), "{msg}");
    })
    .await;
    let at = t0.elapsed();
    // The restart was planned at t0 (before the baseline window); the deadline is 1 m later
    // and a pass runs at least every TICK.
    assert!(at >= Duration::from_secs(60), "paused after {at:?}");
    assert!(
        at <= Duration::from_secs(60) + TICK + DEBOUNCE,
        "paused after {at:?}"
    );
    // Held: the passes that follow write nothing (a status that changed from pass to pass
    // would be rewritten every TICK).
    h.api.expect_none_for(TICK * 3).await;
    h.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn deleting_a_workload_mid_batch_moves_on_to_the_next() {
    let mut h = Harness::start(
        vec![deployment("catalog", 1), deployment("reviews", 1)],
        vec![pod("catalog", "old", OLD), pod("reviews", "old", OLD)],
    );
    restarted_first_of_two(&mut h).await;
    // catalog is deleted with its pods while in flight.
    h.w.deployments
        .apply_watcher_event(&Event::Delete(rolling("catalog")));
    h.w.pods
        .apply_watcher_event(&Event::Delete(pod("catalog", "old", OLD)));
    h.w.notify();
    let stamp = "2026-11-29T12:00:11Z";
    h.window(2 * DEBOUNCE, "reviews-old-x", metrics(5, 0), metrics(9, 0))
        .await;
    h.api
        .expect(Duration::from_secs(1), restart("reviews", stamp))
        .await;
    h.status_write(Duration::from_secs(1), |b| {
        let r = rollout(b);
        assert_eq!(r["state"], "Progressing", "{r}");
        assert_eq!(r["currentBatch"], 2);
        assert_eq!(r["inFlight"].as_array().unwrap().len(), 1);
        assert_eq!(r["inFlight"][0]["name"], "reviews");
        assert_eq!(r["failures"], json!([]));
    })
    .await;
    h.shut_down().await;
}

async fn restarted_first_of_two(h: &mut Harness) {
    h.window(
        Duration::from_secs(1),
        "catalog-old-x",
        metrics(1, 0),
        metrics(2, 0),
    )
    .await;
    h.api
        .expect(Duration::from_secs(1), restart("catalog", T0))
        .await;
    h.status_write(Duration::from_secs(1), |b| {
        let r = rollout(b);
        assert_eq!(
            (r["currentBatch"].as_u64(), r["totalBatches"].as_u64()),
            (Some(1), Some(2))
        );
    })
    .await;
}

/// An Event recorded on the Mesh with `reason`, its note containing `note`.
fn event(reason: &'static str, note: &'static str) -> Exchange {
    Exchange {
        method: Method::POST,
        path_and_query: "/apis/events.k8s.io/v1/namespaces/default/events?".into(),
        check: Box::new(move |b| {
            assert_eq!(b["reason"], reason, "{b}");
            assert_eq!(b["regarding"]["kind"], "Mesh");
            assert_eq!(b["regarding"]["name"], "default");
            assert_eq!(b["reportingController"], "trellis-operator/rollout");
            let n = b["note"].as_str().unwrap();
            assert!(n.contains(note), "{n}");
        }),
        reply: Value::Null,
        status: 201,
    }
}

/// Under `failurePolicy: Rollback` a gate failure restarts the workload on its old image,
/// pinned by the exact pod-template annotations the injector honours; Events say so.
#[tokio::test(start_paused = true)]
async fn a_gate_failure_under_rollback_pins_the_workload_with_events() {
    let mut h = Harness::start_with(
        mesh_with(1, "Rollback"),
        true,
        vec![deployment("catalog", 1)],
        vec![pod("catalog", "old", OLD)],
    );
    h.window(
        Duration::from_secs(1),
        "catalog-old-x",
        metrics(100, 0),
        metrics(200, 0),
    )
    .await;
    h.api
        .expect(Duration::from_secs(1), restart("catalog", T0))
        .await;
    h.api
        .expect(
            Duration::from_secs(1),
            event(
                "BatchStarted",
                "batch 1 of 1 restarting onto proxy:v2: Deployment shop/catalog",
            ),
        )
        .await;
    h.status_write(Duration::from_secs(1), |b| {
        assert_eq!(rollout(b)["state"], "Progressing");
    })
    .await;

    roll_pods(&mut h, true);
    h.window(
        2 * DEBOUNCE,
        "catalog-new-x",
        metrics(0, 0),
        metrics(10, 90),
    )
    .await;
    let stamp = "2026-11-29T12:00:21Z";
    h.api
        .expect(
            Duration::from_secs(1),
            Exchange {
                method: Method::PATCH,
                path_and_query: format!("/apis/apps/v1/namespaces/shop/deployments/catalog{SSA}"),
                check: Box::new(move |b| {
                    assert_eq!(
                        *b,
                        json!({
                            "apiVersion": "apps/v1", "kind": "Deployment",
                            "metadata": {"name": "catalog", "namespace": "shop"},
                            "spec": {"template": {"metadata": {"annotations": {
                                "kubectl.kubernetes.io/restartedAt": stamp,
                                "trellis.dev/proxy-image": OLD,
                                "trellis.dev/rollout-failed-version": NEW}}}}
                        })
                    );
                }),
                reply: serde_json::to_value(rolling("catalog")).unwrap(),
                status: 200,
            },
        )
        .await;
    h.api
        .expect(
            Duration::from_secs(1),
            event("WorkloadFailed", "success rate 10.0 %"),
        )
        .await;
    h.api
        .expect(
            Duration::from_secs(1),
            event("RolledBack", "Deployment shop/catalog pinned to proxy:v1"),
        )
        .await;
    h.status_write(Duration::from_secs(1), |b| {
        let r = rollout(b);
        assert_eq!(r["state"], "Failed", "{r}");
        assert_eq!(r["reason"], "RolledBack");
        assert_eq!(r["failures"][0]["reason"], "HealthGateFailed");
        assert_eq!(condition(b), ("False".into(), "RolledBack".into()));
    })
    .await;
    h.shut_down().await;
}

/// `status.rollout` is replaced whole by server-side apply: the controller's status omits
/// fields that no longer apply (a held generation, a version no pod runs), and with per-field
/// ownership the Mesh controller, which carries the status over under its own field manager,
/// would keep them alive.
#[test]
fn the_rollout_status_is_atomic_for_server_side_apply() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(Mesh::crd()).unwrap();
    let rollout = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        ["properties"]["rollout"];
    assert_eq!(rollout["x-kubernetes-map-type"], "atomic", "{rollout}");
}
