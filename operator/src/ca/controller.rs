//! Runs the CA reconcile against the cluster (leader only), and keeps every replica's issuer
//! in step with the CA Secret.
//!
//! Both loops are level-triggered: each pass reads the few objects involved and acts on the
//! difference. The leader's pass runs when anything it reads or writes changes ([`triggers`]:
//! metadata-only watches, debounced by [`DEBOUNCE`]), so a namespace labelled for the mesh has
//! its trust bundle before its first pods need to mount it, and a deleted bundle or webhook
//! configuration is back at once; [`RESYNC`] repairs anything a watch missed, and rotation
//! stages ask for their own requeue. The replicas' issuer follower polls the CA Secret every
//! [`PERIOD`]: a new root reaches them in well under its overlap window.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::ListParams;
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::reconcile::{self, CA_READY, CA_SECRET, CaState, Observed, ReconcileError};
use super::{IssuerState, IssuerTx};
use crate::api::{MESH_NAME, Mesh, MeshStatus};
use crate::compiler::MeshedRx;
use crate::status::StatusWriter;

/// How often the issuer follower reads the CA Secret.
pub const PERIOD: Duration = Duration::from_secs(10);
/// How long the leader's loop gathers changes before a pass: a namespace created with its
/// labels, or a rollout touching many bundles, is one pass.
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// How often the leader's loop passes without any change.
pub const RESYNC: Duration = Duration::from_secs(300);
/// Wait after a failed pass before trying again.
pub const RETRY: Duration = Duration::from_secs(10);

/// The issuer a replica serves with, from the CA Secret the leader maintains.
pub fn issuer_from(mesh: Option<&Mesh>, secret: &Secret) -> Result<IssuerState, ReconcileError> {
    let state = CaState::from_secret(secret)?;
    let spec = mesh.map(|m| m.spec.clone()).unwrap_or_default();
    let workload_ttl = spec.workload_cert_ttl()?;
    Ok(IssuerState {
        trust_bundle_pem: state.bundle_pem(),
        ca: state.active,
        trust_domain: spec.trust_domain,
        workload_ttl,
    })
}

/// Every replica: publishes the issuer from the CA Secret in the operator's `namespace` on `tx`
/// until `shutdown`.
pub async fn follow_issuer(
    client: Client,
    namespace: String,
    tx: IssuerTx,
    shutdown: CancellationToken,
) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let meshes: Api<Mesh> = Api::all(client);
    let mut last_seen: Option<(Option<String>, Option<String>)> = None;
    loop {
        match (
            secrets.get_opt(CA_SECRET).await,
            meshes.get_opt(MESH_NAME).await,
        ) {
            (Ok(Some(secret)), Ok(mesh)) => {
                let seen = (
                    secret.metadata.resource_version.clone(),
                    mesh.as_ref()
                        .and_then(|m| m.metadata.resource_version.clone()),
                );
                if last_seen.as_ref() != Some(&seen) {
                    match issuer_from(mesh.as_ref(), &secret) {
                        Ok(issuer) => {
                            tracing::info!(root = %issuer.ca.fingerprint(), "identity issuer updated");
                            tx.send_replace(Some(Arc::new(issuer)));
                            last_seen = Some(seen);
                        }
                        Err(error) => {
                            tracing::warn!(%error, "CA Secret unusable; keeping the current issuer")
                        }
                    }
                }
            }
            (Ok(None), _) => tracing::debug!("no CA Secret yet"),
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!(%error, "reading the CA Secret or Mesh failed")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PERIOD) => {}
        }
    }
}

/// Why one pass of the CA controller failed.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error(transparent)]
    Reconcile(#[from] ReconcileError),
    #[error(transparent)]
    Status(#[from] crate::status::Error),
}

/// One pass: observe, reconcile, apply, report. Returns when to look again. `namespace` is the
/// operator's own (`POD_NAMESPACE`): the CA Secret's and the webhook Service's. Trust bundles
/// go to the namespaces selected by their labels ([`reconcile_with`] without a meshed set).
pub async fn reconcile_once(
    client: &Client,
    status: &StatusWriter,
    namespace: &str,
) -> Result<Duration, ControllerError> {
    reconcile_with(client, status, namespace, None).await
}

/// [`reconcile_once`], with the compiler's meshed namespaces when it has published them
/// (namespaces selected for injection and namespaces holding opted-in pods, see
/// [`crate::inject::scope`]): trust bundles go exactly there, and a managed bundle elsewhere is
/// deleted. Without them (before the first compile) the pass lists namespaces and applies the
/// rule to their labels alone; a namespace kept in the mesh only by its pods is not in that
/// set, so no bundle outside it is touched.
pub async fn reconcile_with(
    client: &Client,
    status: &StatusWriter,
    namespace: &str,
    meshed: Option<&BTreeSet<String>>,
) -> Result<Duration, ControllerError> {
    let Some(mesh) = Api::<Mesh>::all(client.clone()).get_opt(MESH_NAME).await? else {
        // Without the Mesh nothing is configured, and no webhook may point at it: the garbage
        // collector removes the owned configuration, this covers one created before owner
        // references (or orphaned by `kubectl delete --cascade=orphan`).
        if crate::inject::webhook_config::delete(client.clone()).await? {
            tracing::info!(
                name = crate::inject::webhook_config::NAME,
                "no Mesh: deleted the webhook configuration"
            );
        }
        return Ok(RESYNC);
    };
    let ca_secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(CA_SECRET)
        .await?;
    let mut forbidden = None;
    let user_secret = match &mesh.spec.ca.secret_ref {
        Some(r) => {
            let ns = r.namespace.as_deref().unwrap_or(namespace);
            match Api::<Secret>::namespaced(client.clone(), ns)
                .get_opt(&r.name)
                .await
            {
                Ok(s) => s,
                // Another namespace's Secret needs a Role there: say which, and keep the CA
                // that exists signing rather than stopping the whole pass.
                Err(kube::Error::Api(e)) if e.code == 403 => {
                    forbidden = Some(forbidden_message(ns, &r.name, namespace));
                    None
                }
                Err(e) => return Err(e.into()),
            }
        }
        None => None,
    };
    let (meshed, bundles) = meshed_and_bundles(client, &mesh, namespace, meshed).await?;
    let desired = reconcile::reconcile(&Observed {
        mesh: &mesh,
        namespace,
        ca_secret: ca_secret.as_ref(),
        user_secret: user_secret.as_ref(),
        meshed_namespaces: &meshed,
        bundles: &bundles,
        now: SystemTime::now(),
    });
    let mut desired = desired;
    if let Some(message) = forbidden {
        let signing = desired
            .issuer
            .as_ref()
            .map(|i| format!("; still signing with root {}", i.ca.fingerprint()))
            .unwrap_or_default();
        desired.condition = crate::api::Condition::new(
            CA_READY,
            crate::api::ConditionStatus::False,
            "CASecretForbidden",
            format!("{message}{signing}"),
            mesh.metadata.generation,
        );
    }
    let current = mesh.status.clone().unwrap_or_default();
    if let Err(e) = reconcile::apply(client, &desired).await {
        // The Secret or a trust bundle could not be written: say so in CAReady (a stale True
        // there would hide it), leave the webhook configuration and WebhookReady alone (a CA
        // that was not persisted must not be published), and fail the pass so it is logged.
        let failed = crate::api::Condition::new(
            CA_READY,
            crate::api::ConditionStatus::False,
            "ApplyFailed",
            write_failed_message(&e),
            mesh.metadata.generation,
        );
        // This controller's part only (see `crate::status`): the failed CAReady, and
        // WebhookReady and the CA fields as they are (omitting them would drop them, since
        // this field manager owns them).
        let mut conditions = vec![failed];
        conditions
            .extend(crate::api::conditions::find(&current.conditions, WEBHOOK_READY).cloned());
        let new_status = MeshStatus {
            conditions,
            ca: current.ca.clone(),
            ..Default::default()
        };
        status.apply(&mesh, new_status).await?;
        return Err(e.into());
    }
    let webhook = apply_webhook_config(client, &mesh, namespace, desired.issuer.as_ref()).await;
    // This controller's part of the status: CAReady, WebhookReady and the CA fields. The
    // other controllers' conditions are theirs (see `crate::status`).
    let new_status = MeshStatus {
        conditions: vec![desired.condition.clone(), webhook],
        ca: desired.ca_status.clone().or(current.ca.clone()),
        ..Default::default()
    };
    status.apply(&mesh, new_status).await?;
    Ok(desired.requeue_after.unwrap_or(RESYNC).min(RESYNC))
}

/// The `CAReady` message when the Mesh's `ca.secretRef` names a Secret the operator may not
/// read: what to create, in the words of `kubectl create role`.
fn forbidden_message(secret_namespace: &str, name: &str, operator_namespace: &str) -> String {
    format!(
        "the operator may not read Secret {secret_namespace}/{name} (403 Forbidden): grant it \
         with `kubectl -n {secret_namespace} create role trellis-ca-reader --verb=get \
         --resource=secrets --resource-name={name}` and `kubectl -n {secret_namespace} create \
         rolebinding trellis-ca-reader --role=trellis-ca-reader \
         --serviceaccount={operator_namespace}:trellis-operator` (README: \"A CA from another \
         namespace\")"
    )
}

/// The namespaces that get a trust bundle, and the observed bundles the pass may act on (see
/// [`reconcile_with`]).
async fn meshed_and_bundles(
    client: &Client,
    mesh: &Mesh,
    namespace: &str,
    published: Option<&BTreeSet<String>>,
) -> Result<(Vec<String>, Vec<ConfigMap>), kube::Error> {
    let (meshed, complete) = match published {
        Some(meshed) => (meshed.clone(), true),
        None => {
            let namespaces = Api::<Namespace>::all(client.clone())
                .list(&ListParams::default())
                .await?;
            let snapshot = crate::compiler::Snapshot {
                mesh: Some(Arc::new(mesh.clone())),
                namespaces: namespaces.items.into_iter().map(Arc::new).collect(),
                settings: crate::controller::compile_settings(namespace),
                ..Default::default()
            };
            (crate::compiler::meshed_namespaces(&snapshot), false)
        }
    };
    let bundles = Api::<ConfigMap>::all(client.clone())
        .list(&ListParams::default().labels("trellis.dev/component=trust-bundle"))
        .await?
        .items
        .into_iter()
        .filter(|b| {
            complete
                || b.metadata
                    .namespace
                    .as_ref()
                    .is_some_and(|ns| meshed.contains(ns))
        })
        .collect();
    Ok((meshed.into_iter().collect(), bundles))
}

/// The `CAReady` message when the CA's own objects could not be written: the object, the API
/// server's explanation once, and for a refusal where the RBAC lives.
fn write_failed_message(e: &ReconcileError) -> String {
    match e {
        ReconcileError::Write {
            object,
            source: kube::Error::Api(s),
        } => {
            let hint = if s.code == 403 {
                "; the operator's ClusterRole must allow it (config/rbac/cluster_role.yaml)"
            } else {
                ""
            };
            format!(
                "applying {object} failed: {} ({} {}){hint}",
                s.message, s.code, s.reason
            )
        }
        e => e.to_string(),
    }
}

/// The condition the Mesh reports for the injection webhook's configuration.
pub const WEBHOOK_READY: &str = "WebhookReady";

/// Converges the MutatingWebhookConfiguration (the Mesh reconciler owns it, with the CA bundle
/// the webhook's serving certificate chains to) and reports `WebhookReady`. Without a usable CA
/// there is no bundle to publish, so the configuration is left alone and the condition says why.
async fn apply_webhook_config(
    client: &Client,
    mesh: &Mesh,
    namespace: &str,
    issuer: Option<&super::IssuerState>,
) -> crate::api::Condition {
    let generation = mesh.metadata.generation;
    let condition = |ok: bool, reason: &str, message: String| {
        crate::api::Condition::new(
            WEBHOOK_READY,
            crate::api::ConditionStatus::from_bool(ok),
            reason,
            message,
            generation,
        )
    };
    let Some(issuer) = issuer else {
        return condition(
            false,
            "CANotReady",
            "the webhook configuration needs the CA bundle; see CAReady".into(),
        );
    };
    let desired = crate::inject::webhook_config::desired(mesh, &issuer.trust_bundle_pem, namespace);
    match crate::inject::webhook_config::apply(client.clone(), &desired).await {
        Ok(_) => condition(
            true,
            "Configured",
            format!(
                "{} points at the operator with the current CA bundle",
                crate::inject::webhook_config::NAME
            ),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "cannot apply the webhook configuration");
            condition(false, "ApplyFailed", apply_failed_message(&e))
        }
    }
}

/// The `WebhookReady` message for a failed apply. It is read in `kubectl describe mesh` and
/// quoted by `Ready`, so it carries the API server's own explanation once, not kube's `Display`
/// (which appends the whole `Status` in Rust debug form), and says where the usual fix for a
/// refusal lives.
fn apply_failed_message(e: &kube::Error) -> String {
    let name = crate::inject::webhook_config::NAME;
    match e {
        kube::Error::Api(s) if s.code == 403 => format!(
            "applying MutatingWebhookConfiguration {name} failed: {} ({} {}); the operator's \
             ClusterRole must allow patch on mutatingwebhookconfigurations/{name} \
             (config/rbac/cluster_role.yaml)",
            s.message, s.code, s.reason
        ),
        kube::Error::Api(s) => format!(
            "applying MutatingWebhookConfiguration {name} failed: {} ({} {})",
            s.message, s.code, s.reason
        ),
        e => format!("applying MutatingWebhookConfiguration {name} failed: {e}"),
    }
}

/// The leader's CA controller in the operator's `namespace`: [`triggers`] (plus every new
/// meshed set the compile controller publishes on `meshed`) and [`drive_with`] until
/// `shutdown`.
pub async fn run(
    client: Client,
    status: StatusWriter,
    namespace: String,
    meshed: MeshedRx,
    shutdown: CancellationToken,
) {
    let changes = futures::stream::select(
        triggers(&client, &namespace),
        meshed_changes(meshed.clone()),
    );
    drive_with(&client, &status, &namespace, &meshed, changes, shutdown).await;
}

/// One item per new value of the compiler's meshed set; ends when the compiler's sender goes.
fn meshed_changes(rx: MeshedRx) -> BoxStream<'static, ()> {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
    .boxed()
}

/// One notification per change of anything a pass reads or writes: the Mesh, the CA Secret,
/// namespaces (joining or leaving the mesh), trust-bundle ConfigMaps and the webhook
/// configuration. Metadata-only watches: a pass reads the objects itself, so nothing is cached.
pub fn triggers(client: &Client, namespace: &str) -> impl Stream<Item = ()> + Send + 'static {
    use kube::core::PartialObjectMeta;
    use kube::runtime::WatchStreamExt;
    use kube::runtime::watcher::{self, watcher};
    fn watch<K>(api: Api<PartialObjectMeta<K>>, config: watcher::Config) -> BoxStream<'static, ()>
    where
        K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
    {
        let kind = K::kind(&()).to_string();
        watcher(api, config)
            .default_backoff()
            .filter_map(move |ev| {
                let ok = match ev {
                    Ok(_) => true,
                    Err(error) => {
                        tracing::warn!(kind, %error, "CA watch failed; retrying with backoff");
                        false
                    }
                };
                async move { ok.then_some(()) }
            })
            .boxed()
    }
    let by_name = |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
    futures::stream::select_all([
        watch(
            Api::<PartialObjectMeta<Mesh>>::all(client.clone()),
            by_name(MESH_NAME),
        ),
        watch(
            Api::<PartialObjectMeta<Secret>>::namespaced(client.clone(), namespace),
            by_name(CA_SECRET),
        ),
        watch(
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            Default::default(),
        ),
        watch(
            Api::<PartialObjectMeta<ConfigMap>>::all(client.clone()),
            watcher::Config::default().labels("trellis.dev/component=trust-bundle"),
        ),
        watch(
            Api::<PartialObjectMeta<MutatingWebhookConfiguration>>::all(client.clone()),
            by_name(crate::inject::webhook_config::NAME),
        ),
    ])
}

/// The leader's loop: a pass now, then one after each burst of `changes` (gathered for
/// [`DEBOUNCE`]), or when the pass asked (rotation stages), or after [`RESYNC`] ([`RETRY`]
/// after a failed pass), until `shutdown`. If the change stream ends, the loop goes on with
/// timed passes only: the CA must not stop converging because a watch did.
pub async fn drive(
    client: &Client,
    status: &StatusWriter,
    namespace: &str,
    changes: impl Stream<Item = ()> + Send,
    shutdown: CancellationToken,
) {
    let none = tokio::sync::watch::channel(None).1;
    drive_with(client, status, namespace, &none, changes, shutdown).await;
}

/// [`drive`], each pass with the compiler's latest meshed set ([`reconcile_with`]).
pub async fn drive_with(
    client: &Client,
    status: &StatusWriter,
    namespace: &str,
    meshed: &MeshedRx,
    changes: impl Stream<Item = ()> + Send,
    shutdown: CancellationToken,
) {
    let mut changes = std::pin::pin!(changes.fuse());
    loop {
        let published = meshed.borrow().clone();
        let wait = match reconcile_with(client, status, namespace, published.as_deref()).await {
            Ok(wait) => wait,
            Err(error) => {
                tracing::warn!(%error, "CA reconcile failed; retrying");
                RETRY
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait.max(Duration::from_secs(1))) => continue,
            Some(()) = changes.next() => {}
        }
        // Gather the rest of the burst; what arrives during the pass starts the next one.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MeshSpec;
    use crate::ca::reconcile::OPERATOR_NAMESPACE;

    #[test]
    fn replicas_build_their_issuer_from_the_secret() {
        let mut mesh = Mesh::new("default", MeshSpec::default());
        mesh.spec.workload_cert_ttl = "2h".into();
        mesh.spec.trust_domain = "prod.example".into();
        let d = reconcile::reconcile(&Observed {
            mesh: &mesh,
            namespace: OPERATOR_NAMESPACE,
            ca_secret: None,
            user_secret: None,
            meshed_namespaces: &[],
            bundles: &[],
            now: SystemTime::now(),
        });
        let secret = d.ca_secret.unwrap();
        let issuer = issuer_from(Some(&mesh), &secret).unwrap();
        assert_eq!(
            issuer.ca.fingerprint(),
            d.issuer.as_ref().unwrap().ca.fingerprint()
        );
        assert_eq!(issuer.trust_domain, "prod.example");
        assert_eq!(issuer.workload_ttl, Duration::from_secs(7200));
        assert_eq!(issuer.trust_bundle_pem, d.issuer.unwrap().trust_bundle_pem);
        let mut broken = secret.clone();
        broken.data.as_mut().unwrap().remove("tls.key");
        assert!(issuer_from(Some(&mesh), &broken).is_err());
    }
}
