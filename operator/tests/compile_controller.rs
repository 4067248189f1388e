//! The compile controller's loop ([`drive`]) with real reflector stores filled by hand through
//! their writers (as the watches would), a change stream the test drives, and the API server as
//! recorded exchanges on `tower_test::mock::pair` (the pattern of `compiler_apply.rs`).
//!
//! Time is paused: whenever every task waits, tokio jumps to the next timer, so DEBOUNCE, RETRY
//! and RESYNC pass in virtual time, and `Instant` differences tell when a request was made.
//!
//! The ConfigMap and TrafficPolicy stores only learn about the controller's own writes when a
//! test says so (`observe_applied`): left alone, any further compile repeats its writes, so
//! counting requests counts compiles.

mod compiler_fixtures;
mod recorded;

use std::sync::Arc;
use std::time::Duration;

use compiler_fixtures::*;
use futures::channel::mpsc::{UnboundedSender, unbounded};
use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::client::Body;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher::Event;
use kube::{Client, Resource, ResourceExt};
use recorded::{ApiServer, Exchange};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use trellis_operator::api::{Mesh, PeerAuthentication, TrafficPolicy};
use trellis_operator::compiler::{Output, SlimPod, compile, digest};
use trellis_operator::controller::Reconciles;
use trellis_operator::controller::compile::{DEBOUNCE, Error, RESYNC, RETRY, Stores, drive};
use trellis_operator::controller::compile_apply::{Applier, configmap_body, strip_configmap};
use trellis_operator::pods::{self, PodWriter};
use trellis_operator::status::StatusWriter;

const NOW: &str = "2026-11-25T17:00:00Z";
const SSA: &str = "?&force=true&fieldManager=trellis-operator";

/// The server-side apply of `namespace`'s ConfigMap holding `out`'s config for it.
fn apply_configmap(out: &Output, namespace: &str) -> Exchange {
    let config = &out.configs[namespace];
    let json = config.render();
    let revision = config.revision().to_string();
    let ns = namespace.to_string();
    let reply = configmap_body(namespace, &revision, &json, None);
    Exchange {
        method: Method::PATCH,
        path_and_query: format!("/api/v1/namespaces/{namespace}/configmaps/trellis-proxy{SSA}"),
        check: Box::new(move |b| {
            assert_eq!(b["apiVersion"], "v1");
            assert_eq!(b["kind"], "ConfigMap");
            assert_eq!(b["metadata"]["name"], "trellis-proxy");
            assert_eq!(b["metadata"]["namespace"], ns.as_str());
            assert_eq!(
                b["metadata"]["labels"]["app.kubernetes.io/managed-by"],
                "trellis-operator"
            );
            assert_eq!(
                b["metadata"]["annotations"]["trellis.dev/revision"],
                revision.as_str()
            );
            assert_eq!(
                b["metadata"]["annotations"]["trellis.dev/config-digest"],
                digest(&json).as_str()
            );
            assert_eq!(b["data"]["config.json"], json.as_str(), "config of {ns}");
            assert_eq!(b["data"].as_object().unwrap().len(), 1);
        }),
        reply,
        status: 200,
    }
}

/// The DELETE of `namespace`'s ConfigMap.
fn delete_configmap(namespace: &str) -> Exchange {
    Exchange {
        method: Method::DELETE,
        path_and_query: format!("/api/v1/namespaces/{namespace}/configmaps/trellis-proxy?"),
        check: Box::new(|_| {}),
        reply: json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
        status: 200,
    }
}

/// The status write reporting `tp` accepted, programmed and ready.
fn traffic_policy_ready(tp: &TrafficPolicy) -> Exchange {
    let (ns, name) = (
        tp.metadata.namespace.clone().unwrap(),
        tp.metadata.name.clone().unwrap(),
    );
    Exchange {
        method: Method::PATCH,
        path_and_query: format!(
            "/apis/trellis.dev/v1alpha1/namespaces/{ns}/trafficpolicies/{name}/status{SSA}"
        ),
        check: Box::new(|b| {
            assert_eq!(b["kind"], "TrafficPolicy");
            assert_eq!(b["status"]["observedGeneration"], 1);
            let conditions: Vec<_> = b["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| (c["type"].as_str().unwrap(), c["status"].as_str().unwrap()))
                .collect();
            assert_eq!(
                conditions,
                [
                    ("Accepted", "True"),
                    ("Programmed", "True"),
                    ("Ready", "True")
                ]
            );
        }),
        reply: serde_json::to_value(tp).unwrap(),
        status: 200,
    }
}

/// `ex`, answered with a 500 as an overloaded API server would.
fn failing(mut ex: Exchange) -> Exchange {
    ex.status = 500;
    ex.reply = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500,
        "metadata": {}});
    ex
}

/// The writing side of every store and the change stream: what the watches hold.
struct Watches {
    meshes: Writer<Mesh>,
    traffic_policies: Writer<TrafficPolicy>,
    peer_authentications: Writer<PeerAuthentication>,
    namespaces: Writer<Namespace>,
    services: Writer<Service>,
    endpoint_slices: Writer<EndpointSlice>,
    pods: PodWriter,
    configmaps: Writer<ConfigMap>,
    changes: UnboundedSender<()>,
}

/// A watch's first list: the store holds `objects` and is ready.
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

fn owned<K: Clone>(objects: &[Arc<K>]) -> Vec<K> {
    objects.iter().map(|o| (**o).clone()).collect()
}

/// The pods of `w` as the watch delivers them.
fn pods_of(w: &World) -> Vec<SlimPod> {
    w.snap.pods.iter().map(slim_of).collect()
}

impl Watches {
    /// What the change stream yields after a store took a change.
    fn notify(&self) {
        self.changes
            .unbounded_send(())
            .expect("the controller dropped the change stream");
    }

    /// Every kind but pods listed from `w`; `configmaps` is what the cluster holds.
    fn list_all_but_pods(&mut self, w: &World, configmaps: Vec<ConfigMap>) {
        list(&mut self.meshes, w.snap.mesh.iter().map(|m| (**m).clone()));
        list(&mut self.traffic_policies, owned(&w.snap.traffic_policies));
        list(
            &mut self.peer_authentications,
            owned(&w.snap.peer_authentications),
        );
        list(&mut self.namespaces, owned(&w.snap.namespaces));
        list(&mut self.services, owned(&w.snap.services));
        list(&mut self.endpoint_slices, owned(&w.snap.endpoint_slices));
        list(&mut self.configmaps, configmaps);
        self.notify();
    }

    fn list_all(&mut self, w: &World, configmaps: Vec<ConfigMap>) {
        self.list_all_but_pods(w, configmaps);
        self.pods.apply_watcher_event(&Event::Init);
        for p in pods_of(w) {
            self.pods.apply_watcher_event(&Event::InitApply(p));
        }
        self.pods.apply_watcher_event(&Event::InitDone);
        self.notify();
    }

    /// The watch delivers the ConfigMap the controller applied for `namespace`.
    fn observe_applied(&mut self, out: &Output, namespace: &str) {
        self.configmaps
            .apply_watcher_event(&Event::Apply(applied(out, namespace)));
        self.notify();
    }
}

/// `namespace`'s ConfigMap after the controller applied `out`, as the reflector caches it.
fn applied(out: &Output, namespace: &str) -> ConfigMap {
    let c = &out.configs[namespace];
    let body = configmap_body(namespace, c.revision(), &c.render(), None);
    let mut cm: ConfigMap = serde_json::from_value(body).unwrap();
    strip_configmap(&mut cm);
    cm
}

/// A running loop and the handles a test drives it with.
struct Harness {
    watches: Watches,
    api: ApiServer,
    shutdown: CancellationToken,
    controller: JoinHandle<Result<(), Error>>,
    /// Where the loop counts its reconciles.
    registry: prometheus_client::registry::Registry,
}

impl Harness {
    /// Starts the loop over empty, unsynced stores, with `w`'s settings.
    fn start(w: &World) -> Self {
        let (meshes, w_mesh) = reflector::store();
        let (traffic_policies, w_tp) = reflector::store();
        let (peer_authentications, w_pa) = reflector::store();
        let (namespaces, w_ns) = reflector::store();
        let (services, w_svc) = reflector::store();
        let (endpoint_slices, w_slice) = reflector::store();
        let (pods, w_pod) = pods::store();
        let (configmaps, w_cm) = reflector::store();
        let stores = Stores {
            meshes,
            traffic_policies,
            peer_authentications,
            namespaces,
            services,
            endpoint_slices,
            pods,
            configmaps,
        };
        let (changes, stream) = unbounded();
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "default");
        let status = StatusWriter::with_clock(client.clone(), Arc::new(|| NOW.to_string()));
        let mut registry = prometheus_client::registry::Registry::default();
        let reconciles = Reconciles::register(&mut registry);
        let applier = Applier::new(client, status, None).with_reconciles(reconciles);
        let shutdown = CancellationToken::new();
        let controller = tokio::spawn(drive(
            stores,
            stream,
            applier,
            w.snap.settings.clone(),
            shutdown.clone(),
        ));
        Harness {
            watches: Watches {
                meshes: w_mesh,
                traffic_policies: w_tp,
                peer_authentications: w_pa,
                namespaces: w_ns,
                services: w_svc,
                endpoint_slices: w_slice,
                pods: w_pod,
                configmaps: w_cm,
                changes,
            },
            api: ApiServer(handle),
            shutdown,
            controller,
            registry,
        }
    }

    /// `trellis_operator_reconciles_total{controller="compile",result}` so far.
    fn reconciles(&self, result: &str) -> u64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        let series = format!("reconciles_total{{controller=\"compile\",result=\"{result}\"}} ");
        let line = text.lines().find_map(|l| l.strip_prefix(series.as_str()));
        line.unwrap_or_else(|| panic!("no {series} in {text}"))
            .parse()
            .unwrap()
    }

    /// Starts the loop over stores synced with `w`, whose ConfigMaps already hold `w`'s
    /// configs, and lets the first compiles pass: the mesh is converged and nothing is written.
    async fn converged(w: &World) -> Self {
        let out = compile(&w.snap);
        let mut h = Self::start(w);
        let cms = out.configs.keys().map(|ns| applied(&out, ns)).collect();
        h.watches.list_all(w, cms);
        h.api.expect_none_for(RETRY).await;
        h
    }

    /// Cancels the token; the loop must return `Ok` without waiting on any timer, and leave no
    /// request behind.
    async fn shut_down(self) {
        self.shutdown.cancel();
        let started = Instant::now();
        let result = tokio::time::timeout(DEBOUNCE, self.controller)
            .await
            .expect("the controller did not stop on shutdown")
            .unwrap();
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "shutdown waited on a timer"
        );
        self.api.expect_no_more().await;
    }

    /// The loop must return `StreamsEnded` within the debounce, having written nothing more.
    async fn expect_streams_ended(self) {
        let Harness {
            watches,
            api,
            controller,
            ..
        } = self;
        let result = tokio::time::timeout(DEBOUNCE, controller)
            .await
            .expect("the controller did not notice the end of its watches")
            .unwrap();
        assert!(matches!(result, Err(Error::StreamsEnded)), "{result:?}");
        api.expect_no_more().await;
        // The writers outlived the stream: the end of the stream alone stopped the loop.
        drop(watches);
    }
}

/// The shop world with the `reviews` TrafficPolicy.
fn with_policy(w: World) -> World {
    w.with(traffic_policy("shop", "reviews", "reviews").created(10))
}

#[tokio::test(start_paused = true)]
async fn nothing_is_written_until_every_store_has_synced() {
    let w = shop();
    let mut h = Harness::start(&w);
    h.watches.list_all_but_pods(&w, vec![]);
    // The pod list is still arriving: a compile now would publish configs without the pods.
    h.watches.pods.apply_watcher_event(&Event::Init);
    for p in pods_of(&w) {
        h.watches.pods.apply_watcher_event(&Event::InitApply(p));
        h.watches.notify();
    }
    h.api.expect_none_for(2 * RESYNC).await;

    h.watches.pods.apply_watcher_event(&Event::InitDone);
    h.watches.notify();
    let out = compile(&w.snap);
    let synced = Instant::now();
    h.api
        .expect(Duration::from_secs(1), apply_configmap(&out, "shop"))
        .await;
    assert_eq!(
        synced.elapsed(),
        Duration::ZERO,
        "the first compile waits for nothing once the stores synced"
    );

    // Once the watch shows the write, the loop settles.
    h.watches.observe_applied(&out, "shop");
    h.api.expect_none_for(RESYNC / 2).await;
    h.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_changes_is_compiled_and_applied_once() {
    let before = shop();
    let mut h = Harness::converged(&before).await;

    // A policy appears during a rollout: 20 notifications within the debounce window.
    let after = with_policy(before);
    let tp = owned(&after.snap.traffic_policies).remove(0);
    h.watches
        .traffic_policies
        .apply_watcher_event(&Event::Apply(tp.clone()));
    let first = Instant::now();
    let changes = h.watches.changes.clone();
    let burst = tokio::spawn(async move {
        for _ in 0..20 {
            changes.unbounded_send(()).unwrap();
            tokio::time::sleep(DEBOUNCE / 25).await;
        }
    });
    let out = compile(&after.snap);
    h.api
        .expect(2 * DEBOUNCE, apply_configmap(&out, "shop"))
        .await;
    let compiled = first.elapsed();
    assert!(
        compiled >= DEBOUNCE,
        "compiled {compiled:?} after the first change, inside the debounce window"
    );
    burst.await.unwrap();
    h.api
        .expect(Duration::from_secs(1), traffic_policy_ready(&tp))
        .await;
    // One compile: a second would repeat both writes (the stores have not seen them yet).
    h.api.expect_none_for(Duration::from_secs(60)).await;
    h.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn a_change_that_leaves_the_desired_state_identical_writes_nothing() {
    let before = shop();
    let mut h = Harness::converged(&before).await;

    // A label no compiler input depends on.
    let mut after = before.clone();
    let shop_ns = Arc::make_mut(&mut after.snap.namespaces[0]);
    assert_eq!(shop_ns.name_any(), "shop");
    shop_ns
        .labels_mut()
        .insert("team".into(), "checkout".into());
    let shop_ns = shop_ns.clone();
    let (b, a) = (compile(&before.snap), compile(&after.snap));
    assert_eq!(b.configs["shop"].revision(), a.configs["shop"].revision());

    h.watches
        .namespaces
        .apply_watcher_event(&Event::Apply(shop_ns));
    h.watches.notify();
    h.api.expect_none_for(2 * RESYNC).await;
    h.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_apply_is_retried_until_it_succeeds() {
    let before = shop();
    let mut h = Harness::converged(&before).await;

    let after = before.with(namespace("b").meshed());
    let out = compile(&after.snap);
    let b = owned(&after.snap.namespaces).pop().unwrap();
    h.watches.namespaces.apply_watcher_event(&Event::Apply(b));
    h.watches.notify();
    h.api
        .expect(2 * DEBOUNCE, failing(apply_configmap(&out, "b")))
        .await;
    let failed = Instant::now();

    // No change arrives; the loop tries again by itself.
    h.api
        .expect(RETRY + 2 * DEBOUNCE, apply_configmap(&out, "b"))
        .await;
    assert!(
        failed.elapsed() >= RETRY,
        "retried {:?} after the failure",
        failed.elapsed()
    );

    // Succeeded: no more retries (each would repeat the apply: the store has not seen it).
    h.api.expect_none_for(Duration::from_secs(60)).await;
    // Counted: the failed apply by its kind, and every compile that succeeded as ok.
    assert_eq!(h.reconciles("apply"), 1);
    assert!(h.reconciles("ok") >= 2, "the first compile and the retry");
    assert_eq!(h.reconciles("status"), 0, "created at 0, not absent");
    h.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn a_deleted_configmap_is_recreated_and_rechecked_every_resync() {
    let w = shop();
    let out = compile(&w.snap);
    let mut h = Harness::converged(&w).await;

    // Someone deletes the namespace's ConfigMap.
    h.watches
        .configmaps
        .apply_watcher_event(&Event::Delete(applied(&out, "shop")));
    h.watches.notify();
    h.api
        .expect(2 * DEBOUNCE, apply_configmap(&out, "shop"))
        .await;
    let repaired = Instant::now();

    // The watch never shows the new one (a stuck watch): with no change, the next check is the
    // resync, which writes it again.
    h.api.expect_none_for(RESYNC - DEBOUNCE).await;
    h.api
        .expect(4 * DEBOUNCE, apply_configmap(&out, "shop"))
        .await;
    assert!(
        repaired.elapsed() >= RESYNC,
        "rechecked {:?} after the last compile",
        repaired.elapsed()
    );
    h.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn a_namespace_leaving_the_mesh_gets_its_configmap_deleted() {
    let before = shop().with(namespace("b").meshed());
    let mut h = Harness::converged(&before).await;

    let after = shop().with(namespace("b"));
    let (was, now) = (compile(&before.snap), compile(&after.snap));
    assert_eq!(
        was.configs["shop"].revision(),
        now.configs["shop"].revision(),
        "shop's config does not depend on b"
    );
    let b = owned(&after.snap.namespaces).pop().unwrap();
    h.watches.namespaces.apply_watcher_event(&Event::Apply(b));
    h.watches.notify();
    h.api.expect(2 * DEBOUNCE, delete_configmap("b")).await;
    h.api.expect_none_for(Duration::from_secs(60)).await;
    h.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_mid_debounce_returns_at_once_without_compiling() {
    let before = shop();
    let mut h = Harness::converged(&before).await;

    // A change the loop would write 500 ms later.
    let tp = owned(&with_policy(before).snap.traffic_policies).remove(0);
    h.watches
        .traffic_policies
        .apply_watcher_event(&Event::Apply(tp));
    h.watches.notify();
    tokio::time::sleep(DEBOUNCE / 5).await;
    // Returns `Ok` at once, and the pending compile never writes.
    h.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_before_the_stores_sync_returns_ok() {
    let w = shop();
    let mut h = Harness::start(&w);
    h.watches.list_all_but_pods(&w, vec![]);
    h.api.expect_none_for(Duration::from_secs(1)).await;
    h.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn the_change_stream_ending_stops_the_loop_with_an_error() {
    let h = Harness::converged(&shop()).await;
    h.watches.changes.close_channel();
    h.expect_streams_ended().await;
}

#[tokio::test(start_paused = true)]
async fn the_change_stream_ending_mid_debounce_stops_the_loop_without_writing() {
    let before = shop();
    let mut h = Harness::converged(&before).await;
    let tp = owned(&with_policy(before).snap.traffic_policies).remove(0);
    h.watches
        .traffic_policies
        .apply_watcher_event(&Event::Apply(tp));
    h.watches.notify();
    tokio::time::sleep(DEBOUNCE / 5).await;
    // The stores no longer follow the cluster: the pending change is not written from them.
    h.watches.changes.close_channel();
    h.expect_streams_ended().await;
}

#[tokio::test(start_paused = true)]
async fn the_change_stream_ending_before_the_stores_sync_stops_the_loop_with_an_error() {
    let w = shop();
    let mut h = Harness::start(&w);
    h.watches.list_all_but_pods(&w, vec![]);
    h.watches.changes.close_channel();
    h.expect_streams_ended().await;
}

#[tokio::test(start_paused = true)]
async fn a_watch_ending_before_its_store_synced_stops_the_loop_without_writing() {
    let w = shop();
    let mut h = Harness::start(&w);
    h.watches.list_all_but_pods(&w, vec![]);
    // The pod watch ends before its first list completed: its reflector drops the writer. The
    // pod store stays empty for good, and a config compiled from it would drop every endpoint's
    // identity.
    h.watches.pods.apply_watcher_event(&Event::Init);
    drop(std::mem::replace(&mut h.watches.pods, pods::store().1));
    h.watches.notify();
    h.expect_streams_ended().await;
}
