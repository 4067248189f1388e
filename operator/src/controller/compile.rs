//! The compile controller: reflectors over everything the compiler reads, a debounced
//! recompile on any change, and the [`Applier`].
//!
//! It is one level-triggered loop rather than a `kube::runtime::Controller` per kind because
//! the compile is global (one TrafficPolicy changes every namespace's table): every change,
//! whatever its kind, leads to the same incremental recompile, and the applier writes only what
//! differs. Only the Lease holder runs it; dropping the future (Lease lost, shutdown) stops the
//! loop. The watches are the process's [`SharedStores`], which the discovery replica reads on
//! every replica, so they outlive a lost Lease and are never run twice in one process.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::{Stream, StreamExt, stream::BoxStream};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::{WatchStreamExt, reflector::store::Writer};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::compile_apply::{
    Applier, MANAGED_BY, MANAGED_BY_LABEL, plan_configmaps, plan_status, strip_configmap,
};
use crate::api::{MESH_NAME, Mesh, PeerAuthentication, TrafficPolicy};
use crate::compiler::{self, CONFIGMAP_NAME, Output, Settings, SlimPod, Snapshot};
use crate::pods::{self, PodStore};
use crate::status::StatusWriter;

/// How long changes are gathered before a recompile: a rollout touches hundreds of pods and
/// slices within a second, and one compile for all of them is the point.
pub const DEBOUNCE: Duration = Duration::from_millis(500);
/// Recompile and re-check everything this often even without changes (level-triggered repair
/// of anything edited behind our back).
pub const RESYNC: Duration = Duration::from_secs(300);
/// Wait after a failed apply before trying again.
pub const RETRY: Duration = Duration::from_secs(5);

/// Errors that stop the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The stores no longer follow the cluster: the change stream ended, or a watch ended
    /// before its store synced.
    #[error("the watch streams ended")]
    StreamsEnded,
}

/// The caches of every kind the compiler reads: reflector stores, and the pod cache of
/// Trellis's own ([`crate::pods`]).
#[derive(Clone)]
pub struct Stores {
    pub meshes: Store<Mesh>,
    pub traffic_policies: Store<TrafficPolicy>,
    pub peer_authentications: Store<PeerAuthentication>,
    pub namespaces: Store<Namespace>,
    pub services: Store<Service>,
    pub endpoint_slices: Store<EndpointSlice>,
    pub pods: PodStore,
    pub configmaps: Store<ConfigMap>,
}

impl Stores {
    /// The compiler's input, from the current store contents.
    pub fn snapshot(&self, settings: &Settings) -> Snapshot {
        Snapshot {
            mesh: self
                .meshes
                .state()
                .into_iter()
                .find(|m| m.metadata.name.as_deref() == Some(MESH_NAME)),
            traffic_policies: self.traffic_policies.state(),
            peer_authentications: self.peer_authentications.state(),
            namespaces: self.namespaces.state(),
            services: self.services.state(),
            endpoint_slices: self.endpoint_slices.state(),
            pods: self.pods.state(),
            settings: settings.clone(),
        }
    }

    /// Fails when a writer is dropped first: its watch ended, so that store will never be
    /// complete, and a compile over it would publish configs missing what it lacks (or delete
    /// the ConfigMaps of namespaces it never listed).
    async fn wait_until_ready(&self) -> Result<(), Error> {
        let ended = |_| Error::StreamsEnded;
        self.meshes.wait_until_ready().await.map_err(ended)?;
        self.traffic_policies
            .wait_until_ready()
            .await
            .map_err(ended)?;
        self.peer_authentications
            .wait_until_ready()
            .await
            .map_err(ended)?;
        self.namespaces.wait_until_ready().await.map_err(ended)?;
        self.services.wait_until_ready().await.map_err(ended)?;
        self.endpoint_slices
            .wait_until_ready()
            .await
            .map_err(ended)?;
        self.pods
            .wait_until_ready()
            .await
            .map_err(|_| Error::StreamsEnded)?;
        self.configmaps.wait_until_ready().await.map_err(ended)
    }
}

fn strip_meta<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

pub(crate) fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    modify: impl FnMut(&mut K) + Send + 'static,
) -> BoxStream<'static, ()>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let kind = K::kind(&()).to_string();
    watcher(api, config)
        .default_backoff()
        .modify(modify)
        .reflect(writer)
        .filter_map(move |ev| {
            let kind = kind.clone();
            async move {
                match ev {
                    Ok(_) => Some(()),
                    Err(e) => {
                        tracing::warn!(kind, error = %e, "watch failed; retrying with backoff");
                        None
                    }
                }
            }
        })
        .boxed()
}

/// Starts the watches; returns the stores and the merged change stream (which must be polled
/// for the stores to fill).
pub fn watch_all(client: &Client) -> (Stores, impl Stream<Item = ()> + Send + 'static) {
    let (meshes, w_mesh) = reflector::store();
    let (tps, w_tp) = reflector::store();
    let (pas, w_pa) = reflector::store();
    let (nss, w_ns) = reflector::store();
    let (svcs, w_svc) = reflector::store();
    let (slices, w_slice) = reflector::store();
    let (pods, w_pod) = pods::store();
    let (cms, w_cm) = reflector::store();
    let cfg = watcher::Config::default;
    let streams = vec![
        watch(
            Api::<Mesh>::all(client.clone()),
            cfg().fields(&format!("metadata.name={MESH_NAME}")),
            w_mesh,
            strip_meta,
        ),
        watch(
            Api::<TrafficPolicy>::all(client.clone()),
            cfg(),
            w_tp,
            strip_meta,
        ),
        watch(
            Api::<PeerAuthentication>::all(client.clone()),
            cfg(),
            w_pa,
            strip_meta,
        ),
        watch(
            Api::<Namespace>::all(client.clone()),
            cfg(),
            w_ns,
            strip_meta,
        ),
        watch(
            Api::<Service>::all(client.clone()),
            cfg(),
            w_svc,
            strip_meta,
        ),
        watch(
            Api::<EndpointSlice>::all(client.clone()),
            cfg(),
            w_slice,
            strip_meta,
        ),
        pods::watch(Api::<SlimPod>::all(client.clone()), cfg(), w_pod),
        watch(
            Api::<ConfigMap>::all(client.clone()),
            cfg()
                .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"))
                .fields(&format!("metadata.name={CONFIGMAP_NAME}")),
            w_cm,
            strip_configmap,
        ),
    ];
    let stores = Stores {
        meshes,
        traffic_policies: tps,
        peer_authentications: pas,
        namespaces: nss,
        services: svcs,
        endpoint_slices: slices,
        pods,
        configmaps: cms,
    };
    (stores, futures::stream::select_all(streams))
}

/// One set of the compiler's watches per process, shared by everything that reads them:
/// every replica's discovery loop ([`crate::discovery::replica`]) and, on the Lease holder,
/// the compile controller. Each used to run its own watches, so the leader held every
/// Service, EndpointSlice and pod twice (issue 19). The watches start on the first
/// [`SharedStores::subscribe`] and run until `shutdown`; a replica that gains or loses the
/// Lease keeps them (its discovery loop reads them either way).
#[derive(Clone)]
pub struct SharedStores {
    client: Client,
    shutdown: CancellationToken,
    started: Arc<OnceLock<(Stores, watch::Receiver<u64>)>>,
}

impl SharedStores {
    pub fn new(client: Client, shutdown: CancellationToken) -> Self {
        Self {
            client,
            shutdown,
            started: Arc::default(),
        }
    }

    /// The stores, and a stream that yields after they took a change (changes between two
    /// polls yield once, which is all a debounced loop needs) and ends when the watches do.
    /// Must be called inside the runtime: the first call spawns the task that drives the
    /// watches.
    pub fn subscribe(&self) -> (Stores, impl Stream<Item = ()> + Send + 'static) {
        let (stores, rx) = self.started.get_or_init(|| {
            let (stores, changes) = watch_all(&self.client);
            let (tx, rx) = watch::channel(0u64);
            let shutdown = self.shutdown.clone();
            tokio::spawn(async move {
                let mut changes = std::pin::pin!(changes);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        c = changes.next() => match c {
                            Some(()) => tx.send_modify(|n| *n = n.wrapping_add(1)),
                            None => return,
                        },
                    }
                }
            });
            (stores, rx)
        });
        let changes = futures::stream::unfold(rx.clone(), |mut rx| async move {
            rx.changed().await.ok()?;
            Some(((), rx))
        });
        (stores.clone(), changes)
    }
}

/// One compile and apply over the current stores. Returns the output (the next incremental
/// compile's `previous`) and whether everything was applied.
pub async fn reconcile_once(
    stores: &Stores,
    settings: &Settings,
    applier: &Applier,
    previous: Option<&Output>,
) -> (Output, bool) {
    let snapshot = stores.snapshot(settings);
    let started = std::time::Instant::now();
    // Reuses what the previous compile serialized: a policy edit re-serializes one Service.
    let out = compiler::compile_incremental(&snapshot, previous);
    for p in &out.problems {
        tracing::warn!(problem = %p, "skipped a malformed object");
    }
    // Before writing anything: the trust bundles a new namespace needs come from the CA.
    applier.publish_meshed(&out.meshed);
    let mesh = snapshot.mesh.as_deref();
    let cms = plan_configmaps(&out, &stores.configmaps.state(), mesh);
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = plan_status(
        &out,
        &snapshot.traffic_policies,
        &snapshot.peer_authentications,
        snapshot.mesh.as_ref(),
        &snapshot.pods,
        &now,
    );
    let (stats, errors) = applier.apply(&cms, &status, mesh).await;
    let changed = previous.map(|p| out.changed_since(p).len());
    tracing::info!(
        changed_namespaces = changed,
        configs = out.configs.len(),
        services = out.stats.services,
        serialized = out.stats.serialized,
        applied = stats.applied,
        deleted = stats.deleted,
        status_patches = stats.status_patches,
        events = stats.events,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "compiled"
    );
    for e in &errors {
        tracing::warn!(error = %e, kind = e.metric_label(), "apply failed; will retry");
    }
    applier.count_reconcile(errors.first().map_or("ok", |e| e.metric_label()));
    (out, errors.is_empty())
}

/// Runs the compile controller until `shutdown` fires (Lease lost, process stopping) or the
/// watches end, over the process's [`SharedStores`]. Status goes through the shared [`StatusWriter`]; every compile's meshed
/// namespaces go to `meshed` (the CA controller's trust bundles follow them).
pub async fn run(
    client: Client,
    shared: &SharedStores,
    settings: Settings,
    status: StatusWriter,
    reconciles: super::Reconciles,
    meshed: crate::compiler::MeshedTx,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let (stores, changes) = shared.subscribe();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGED_BY.into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    let applier = Applier::new(client, status, Some(recorder))
        .with_meshed_publisher(meshed)
        .with_reconciles(reconciles);
    drive(stores, changes, applier, settings, shutdown).await
}

/// The loop of [`run`], apart from the watches so that tests can fill the stores and signal
/// changes by hand. `changes` must yield after the stores took a change (as
/// [`watch_all`]'s stream does) and end when the watches do; it is polled on its own task so
/// the stores keep filling while a compile runs.
pub async fn drive(
    stores: Stores,
    changes: impl Stream<Item = ()> + Send + 'static,
    applier: Applier,
    settings: Settings,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    // Any number of changes while a compile runs mean one more compile: a one-slot channel
    // that drops extra notifications is exactly that.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut driver = AbortOnDropHandle::new(tokio::spawn(async move {
        let mut changes = std::pin::pin!(changes);
        while changes.next().await.is_some() {
            let _ = tx.try_send(());
        }
    }));
    // Stores that will never sync must stop the loop, not keep it waiting.
    tokio::select! {
        ready = stores.wait_until_ready() => ready?,
        _ = &mut driver => return Err(Error::StreamsEnded),
        _ = shutdown.cancelled() => return Ok(()),
    }
    let mut previous: Option<Output> = None;
    loop {
        let (out, ok) = reconcile_once(&stores, &settings, &applier, previous.as_ref()).await;
        previous = Some(out);
        let wait = if ok { RESYNC } else { RETRY };
        tokio::select! {
            got = rx.recv() => if got.is_none() { break },
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        tokio::select! {
            _ = tokio::time::sleep(DEBOUNCE) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        // Changes during the debounce are covered by the compile that follows.
        while rx.try_recv().is_ok() {}
        if driver.is_finished() {
            break;
        }
    }
    Err(Error::StreamsEnded)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::json;

    use super::*;

    /// Issue 19: the Lease holder's compile controller and its discovery replica read one set
    /// of watches: each kind is listed and watched once, and both see the same cached objects.
    #[tokio::test]
    async fn readers_of_the_shared_stores_share_one_watch_per_kind() {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let shutdown = CancellationToken::new();
        let shared = SharedStores::new(Client::new(svc, "default"), shutdown.clone());
        let (compile, compile_changes) = shared.subscribe();
        let (discovery, discovery_changes) = shared.subscribe();
        let mut lists: BTreeMap<String, usize> = BTreeMap::new();
        let mut watches: BTreeMap<String, usize> = BTreeMap::new();
        let mut open = Vec::new();
        let serve = async {
            loop {
                let (req, send) = handle.next_request().await.expect("client gone");
                let path = req.uri().path().to_string();
                if req.uri().query().unwrap_or_default().contains("watch=true") {
                    *watches.entry(path).or_default() += 1;
                    open.push(send); // left open and silent
                    continue;
                }
                let items = if path == "/api/v1/pods" {
                    vec![json!({"metadata": {"name": "web-0", "namespace": "shop",
                        "annotations": {"trellis.dev/proxy-version": "p:1"}},
                        "status": {"podIP": "10.0.0.5"}})]
                } else {
                    vec![]
                };
                *lists.entry(path).or_default() += 1;
                let list = json!({"apiVersion": "v1", "kind": "List",
                    "metadata": {"resourceVersion": "1"}, "items": items});
                send.send_response(
                    Response::builder()
                        .body(Body::from(serde_json::to_vec(&list).unwrap()))
                        .unwrap(),
                );
            }
        };
        let ready = async {
            compile.wait_until_ready().await.unwrap();
            discovery.wait_until_ready().await.unwrap();
            // Give a second set of watches, were there one, the time to list.
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            tokio::select! {
                _ = serve => unreachable!(),
                _ = ready => {}
            }
        })
        .await
        .expect("the stores sync");
        assert_eq!(lists.len(), 8, "every kind the compiler reads: {lists:?}");
        assert!(lists.values().all(|n| *n == 1), "listed once: {lists:?}");
        assert!(
            watches.values().all(|n| *n == 1),
            "watched once: {watches:?}"
        );
        let (a, b) = (compile.pods.state(), discovery.pods.state());
        assert_eq!(a.len(), 1);
        assert!(
            Arc::ptr_eq(a.namespace("shop").unwrap(), b.namespace("shop").unwrap()),
            "one cached pod, not two copies"
        );
        assert_eq!(a.get("shop", "web-0").unwrap().proxy_version(), Some("p:1"));
        // Both readers hear of the changes.
        for changes in [compile_changes.boxed(), discovery_changes.boxed()] {
            let mut changes = changes;
            let heard = tokio::time::timeout(Duration::from_secs(1), changes.next()).await;
            assert_eq!(heard.expect("a change is signalled"), Some(()));
        }
        shutdown.cancel();
    }
}
