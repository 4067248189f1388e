//! The thin edge of the addon reconcile (leader only): reads the Mesh, asks discovery whether
//! the Prometheus Operator's API is served, lists what carries the addon label, lets
//! [`plan`] decide, applies and deletes, and writes `ObservabilityReady`.
//!
//! Level-triggered like the CA controller: a pass runs when the Mesh or any object the addons
//! are made of changes (metadata-only watches, label-selected, so a deleted Deployment or a
//! Deployment becoming ready starts a pass at once), and every [`RESYNC`] otherwise. The
//! Prometheus Operator's kinds are not watched (their CRDs may not exist); the resync puts
//! them back, and notices the API appearing or going away.

use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::desired::{ADDON_LABEL, HASH_ANNOTATION, Inputs, Kind, ObjectKey};
use super::plan::{self, DeploymentState, Observed};
use super::{CONDITION, FIELD_MANAGER};
use crate::api::conditions::{Condition, ConditionStatus};
use crate::api::{MESH_NAME, Mesh, MeshStatus};
use crate::status::StatusWriter;

/// How long changes are gathered before a pass: applying a dozen objects fires a dozen watch
/// events, which should make one pass, not twelve.
pub const DEBOUNCE: Duration = Duration::from_millis(500);
/// A pass runs at least this often.
pub const RESYNC: Duration = Duration::from_secs(300);
/// While an addon is still starting: look again this soon even if no watch event arrives.
pub const PROGRESS: Duration = Duration::from_secs(15);
/// After a failed pass.
pub const RETRY: Duration = Duration::from_secs(10);

/// The group and version whose presence selects the integrate path.
pub const PROMETHEUS_OPERATOR_API: &str = "monitoring.coreos.com/v1";

/// Why a pass failed (it is retried after [`RETRY`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the cluster: {0}")]
    Api(#[from] kube::Error),
    #[error(transparent)]
    Desired(#[from] super::desired::DesiredError),
    #[error(transparent)]
    Status(#[from] crate::status::Error),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Api(_) => "api",
            Error::Desired(_) => "desired",
            Error::Status(e) => e.metric_label(),
        }
    }
}

fn api_resource(kind: Kind) -> ApiResource {
    let (group, version, kind_name, plural, _) = kind.gvk();
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind_name), plural)
}

/// The handle for `kind` in `namespace` (ignored for cluster-scoped kinds); `None` lists
/// across all namespaces.
fn api(client: &Client, kind: Kind, namespace: Option<&str>) -> Api<DynamicObject> {
    let ar = api_resource(kind);
    match (kind.gvk().4, namespace) {
        (true, Some(ns)) => Api::namespaced_with(client.clone(), ns, &ar),
        _ => Api::all_with(client.clone(), &ar),
    }
}

/// Whether the API server serves `monitoring.coreos.com/v1` (a 404 says it does not).
async fn prometheus_operator_served(client: &Client) -> Result<bool, kube::Error> {
    match client
        .list_api_group_resources(PROMETHEUS_OPERATOR_API)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

fn observed_of(kind: Kind, o: &DynamicObject) -> Observed {
    let deployment = (kind == Kind::Deployment).then(|| {
        let int =
            |v: &serde_json::Value| v.as_i64().and_then(|n| i32::try_from(n).ok()).unwrap_or(0);
        let status = &o.data["status"];
        DeploymentState {
            replicas: o.data["spec"]["replicas"]
                .as_i64()
                .map_or(1, |n| i32::try_from(n).unwrap_or(1)),
            ready: int(&status["readyReplicas"]),
            updated: int(&status["updatedReplicas"]),
            current: status["observedGeneration"].as_i64().is_some()
                && status["observedGeneration"].as_i64() == o.metadata.generation,
        }
    });
    Observed {
        key: ObjectKey {
            kind,
            namespace: o.metadata.namespace.clone(),
            name: o.metadata.name.clone().unwrap_or_default(),
        },
        hash: o
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(HASH_ANNOTATION).cloned()),
        owners: o
            .metadata
            .owner_references
            .iter()
            .flatten()
            .map(|r| r.uid.clone())
            .collect(),
        deployment,
    }
}

/// Every object of the addon kinds carrying [`ADDON_LABEL`]: in the operator's namespace, and
/// ConfigMaps in every namespace (the dashboards may live in the one the Mesh names).
async fn observe(
    client: &Client,
    namespace: &str,
    served: bool,
) -> Result<Vec<Observed>, kube::Error> {
    let lp = ListParams::default().labels(ADDON_LABEL);
    let mut out = Vec::new();
    for kind in Kind::ALL {
        if kind.is_prometheus_operator() && !served {
            continue;
        }
        let ns = (kind != Kind::ConfigMap).then_some(namespace);
        let list = api(client, kind, ns).list(&lp).await?;
        out.extend(list.items.iter().map(|o| observed_of(kind, o)));
    }
    Ok(out)
}

/// The `ObservabilityReady` message for a refused write: the object, the API server's own
/// explanation, and for a 403 where the grant lives.
fn write_failed(key: &ObjectKey, verb: &str, e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => {
            let hint = if s.code == 403 {
                "; the operator's RBAC must allow it (config/rbac)"
            } else {
                ""
            };
            format!(
                "{verb} {key} failed: {} ({} {}){hint}",
                s.message, s.code, s.reason
            )
        }
        e => format!("{verb} {key} failed: {e}"),
    }
}

/// One pass in the operator's `namespace`. Returns when to look again.
pub async fn reconcile_once(
    client: &Client,
    status: &StatusWriter,
    namespace: &str,
) -> Result<Duration, Error> {
    let Some(mesh) = Api::<Mesh>::all(client.clone()).get_opt(MESH_NAME).await? else {
        // Without the Mesh there is nothing to keep, and what it owned is garbage collected.
        return Ok(RESYNC);
    };
    let served = prometheus_operator_served(client).await?;
    let observed = observe(client, namespace, served).await?;
    let inputs = Inputs {
        mesh: &mesh,
        namespace,
        prometheus_operator: served,
    };
    let plan = plan::plan(&inputs, &observed)?;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut failures = Vec::new();
    for o in &plan.apply {
        let res = api(client, o.key.kind, o.key.namespace.as_deref())
            .patch(&o.key.name, &params, &Patch::Apply(&o.body))
            .await;
        match res {
            Ok(_) => {
                tracing::info!(object = %o.key, addon = o.addon.as_str(), "addon object applied")
            }
            Err(e) => {
                tracing::warn!(object = %o.key, error = %e, "applying an addon object failed");
                failures.push(write_failed(&o.key, "applying", &e));
            }
        }
    }
    for key in &plan.delete {
        let res = api(client, key.kind, key.namespace.as_deref())
            .delete(&key.name, &DeleteParams::background())
            .await;
        match res {
            Ok(_) => tracing::info!(object = %key, "addon object deleted"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => failures.push(write_failed(key, "deleting", &e)),
        }
    }
    let condition = if failures.is_empty() {
        plan.condition
    } else {
        Condition::new(
            CONDITION,
            ConditionStatus::False,
            "ApplyFailed",
            failures.join("; "),
            mesh.metadata.generation,
        )
    };
    // An addon still starting, or a write that failed (usually transient), is worth an early
    // look; a missing Prometheus Operator waits for the resync, not a poll loop.
    let progressing = matches!(condition.reason.as_str(), "Progressing" | "ApplyFailed");
    // This controller's part of the Mesh status: `ObservabilityReady` only.
    status
        .apply(
            &mesh,
            MeshStatus {
                conditions: vec![condition],
                ..Default::default()
            },
        )
        .await?;
    Ok(if progressing { PROGRESS } else { RESYNC })
}

/// One notification per change of the Mesh or of any object carrying the addon label
/// (metadata-only watches; a pass reads what it needs itself).
pub fn triggers(client: &Client, namespace: &str) -> impl Stream<Item = ()> + Send + 'static {
    use kube::core::PartialObjectMeta;
    use kube::runtime::WatchStreamExt;
    use kube::runtime::watcher::{self, watcher};
    fn watch<K>(
        api: Api<PartialObjectMeta<K>>,
        config: watcher::Config,
        kind: &'static str,
    ) -> BoxStream<'static, ()>
    where
        K: kube::Resource + Clone + std::fmt::Debug + Send + Sync + 'static,
        K::DynamicType: Clone,
        PartialObjectMeta<K>: kube::Resource + serde::de::DeserializeOwned,
    {
        watcher(api, config)
            .default_backoff()
            .filter_map(move |ev| {
                let ok = match ev {
                    Ok(_) => true,
                    Err(error) => {
                        tracing::warn!(kind, %error, "addon watch failed; retrying with backoff");
                        false
                    }
                };
                async move { ok.then_some(()) }
            })
            .boxed()
    }
    let labelled = || watcher::Config::default().labels(ADDON_LABEL);
    let mut streams = vec![watch(
        Api::<PartialObjectMeta<Mesh>>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={MESH_NAME}")),
        "Mesh",
    )];
    for kind in Kind::ALL
        .into_iter()
        .filter(|k| !k.is_prometheus_operator())
    {
        let ns = (kind != Kind::ConfigMap && kind.gvk().4).then_some(namespace);
        let ar = api_resource(kind);
        let api = match ns {
            Some(ns) => {
                Api::<PartialObjectMeta<DynamicObject>>::namespaced_with(client.clone(), ns, &ar)
            }
            None => Api::<PartialObjectMeta<DynamicObject>>::all_with(client.clone(), &ar),
        };
        streams.push(watch(api, labelled(), kind.gvk().2));
    }
    futures::stream::select_all(streams)
}

/// The leader's addon controller: a pass now, then after each burst of [`triggers`] (gathered
/// for [`DEBOUNCE`]) or when the pass asked, until `shutdown`.
pub async fn run(
    client: Client,
    status: StatusWriter,
    namespace: String,
    shutdown: CancellationToken,
) {
    let changes = triggers(&client, &namespace);
    drive(&client, &status, &namespace, changes, shutdown).await;
}

/// The loop of [`run`], with the change stream given (tests drive it).
pub async fn drive(
    client: &Client,
    status: &StatusWriter,
    namespace: &str,
    changes: impl Stream<Item = ()> + Send,
    shutdown: CancellationToken,
) {
    let mut changes = std::pin::pin!(changes.fuse());
    loop {
        let wait = match reconcile_once(client, status, namespace).await {
            Ok(wait) => wait,
            Err(error) => {
                tracing::warn!(%error, kind = error.metric_label(), "addon reconcile failed; retrying");
                RETRY
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => continue,
            Some(()) = changes.next() => {}
        }
        let debounce = tokio::time::sleep(DEBOUNCE);
        tokio::pin!(debounce);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = &mut debounce => break,
                Some(()) = changes.next() => {}
            }
        }
    }
}
