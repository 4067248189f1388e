//! The thin applier behind the compiler: turns an [`Output`] and what the reflectors observed
//! into the few API calls that make the cluster match, and makes no call when nothing differs.
//!
//! - ConfigMaps: server-side apply (field manager `trellis-operator`, forced: the operator owns
//!   these objects) of `trellis-proxy` in every namespace whose observed `config.json` differs
//!   from the desired one; DELETE of operator-managed `trellis-proxy` ConfigMaps in namespaces
//!   that left the mesh. A namespace whose config was refused (too large) is left alone.
//! - Status: through the one [`StatusWriter`] (server-side apply of `/status`), for every
//!   TrafficPolicy/PeerAuthentication whose conditions changed (equal conditions keep
//!   `lastTransitionTime`, so a recompile with the same result writes nothing), and for the
//!   Mesh's part: `Programmed`/`Degraded`/`ProxiesUpToDate` and `status.proxies` (the status
//!   writer applies it under the compile controller's field manager; the other reconcilers'
//!   conditions are theirs and are not sent).
//! - Events on condition transitions.
//!
//! Every decision is a pure `plan_*` function; [`Applier::apply`] only executes the plan, so the
//! plans are tested with plain tests and the HTTP exchanges with `tower_test`.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::api::conditions::{Condition, ConditionStatus, merge_conditions};
use crate::api::{
    FIELD_MANAGER, Mesh, MeshStatus, PeerAuthentication, PeerAuthenticationStatus, TrafficPolicy,
    TrafficPolicyStatus,
};
use crate::compiler::{CONFIG_KEY, CONFIGMAP_NAME, NamespaceConfig, ObjectKey, Output, digest};
use crate::status::{self, Outcome, StatusWriter};

/// Label on every object the operator owns.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Its value.
pub const MANAGED_BY: &str = "trellis-operator";
/// Annotation with the config's revision (a content hash): equal revisions mean equal desired
/// text, so the applier compares revisions instead of rendering every namespace.
pub const REVISION_ANNOTATION: &str = "trellis.dev/revision";
/// Annotation with the SHA-256 of the `config.json` written: data edited behind the operator's
/// back no longer matches it and is rewritten.
pub const DIGEST_ANNOTATION: &str = "trellis.dev/config-digest";
/// Key the controller's ConfigMap cache keeps instead of `config.json` (see
/// [`strip_configmap`]).
pub const DIGEST_KEY: &str = "config.json.sha256";
/// Condition types the compiler owns on the Mesh; the others belong to other reconcilers.
pub const MESH_CONDITION_TYPES: [&str; 3] = ["Programmed", "Degraded", "ProxiesUpToDate"];

/// Errors of the applier.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("applying ConfigMap {namespace}/{CONFIGMAP_NAME}: {source}")]
    Apply {
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting ConfigMap {namespace}/{CONFIGMAP_NAME}: {source}")]
    Delete {
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Status(#[from] status::Error),
}

impl Error {
    /// Short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Apply { .. } => "apply",
            Error::Delete { .. } => "delete",
            Error::Status(_) => "status",
        }
    }
}

/// Replaces a cached ConfigMap's `config.json` by its digest (and drops managed fields): the
/// cache then costs a few hundred bytes per namespace instead of the whole config, and
/// [`observed_digest`] still tells whether the data differs.
pub fn strip_configmap(cm: &mut ConfigMap) {
    cm.metadata.managed_fields = None;
    if let Some(data) = cm.data.as_mut()
        && let Some(json) = data.remove(CONFIG_KEY)
    {
        data.insert(DIGEST_KEY.into(), digest(&json));
    }
}

/// SHA-256 of an observed ConfigMap's `config.json` (from a stripped or a full object).
pub fn observed_digest(cm: &ConfigMap) -> Option<String> {
    let data = cm.data.as_ref()?;
    data.get(DIGEST_KEY)
        .cloned()
        .or_else(|| data.get(CONFIG_KEY).map(|j| digest(j)))
}

/// One ConfigMap call.
#[derive(Clone, Debug)]
pub enum ConfigMapAction {
    Apply {
        namespace: String,
        config: Arc<NamespaceConfig>,
    },
    Delete {
        namespace: String,
    },
}

fn is_managed(cm: &ConfigMap) -> bool {
    cm.metadata.name.as_deref() == Some(CONFIGMAP_NAME)
        && cm.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
}

fn owner_uid(cm: &ConfigMap) -> Option<&str> {
    cm.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.kind == "Mesh")
        .map(|o| o.uid.as_str())
}

/// The ConfigMap calls that make the cluster match `out`.
pub fn plan_configmaps(
    out: &Output,
    observed: &[Arc<ConfigMap>],
    mesh: Option<&Mesh>,
) -> Vec<ConfigMapAction> {
    let by_ns: BTreeMap<&str, &ConfigMap> = observed
        .iter()
        .filter(|cm| cm.metadata.name.as_deref() == Some(CONFIGMAP_NAME))
        .filter_map(|cm| Some((cm.metadata.namespace.as_deref()?, cm.as_ref())))
        .collect();
    let mesh_uid = mesh.and_then(|m| m.metadata.uid.as_deref());
    let mut actions = Vec::new();
    for (ns, config) in &out.configs {
        let current = by_ns.get(ns.as_str()).is_some_and(|cm| {
            let annotations = cm.annotations();
            is_managed(cm)
                && annotations.get(REVISION_ANNOTATION).map(String::as_str)
                    == Some(config.revision())
                && observed_digest(cm).as_ref() == annotations.get(DIGEST_ANNOTATION)
                && owner_uid(cm) == mesh_uid
        });
        if !current {
            actions.push(ConfigMapAction::Apply {
                namespace: ns.clone(),
                config: config.clone(),
            });
        }
    }
    for (ns, cm) in &by_ns {
        if is_managed(cm) && !out.meshed.contains(*ns) {
            actions.push(ConfigMapAction::Delete {
                namespace: ns.to_string(),
            });
        }
    }
    actions
}

/// The server-side apply body of a namespace's `trellis-proxy` ConfigMap holding `config_json`.
pub fn configmap_body(
    namespace: &str,
    revision: &str,
    config_json: &str,
    mesh: Option<&Mesh>,
) -> serde_json::Value {
    let mut metadata = json!({
        "name": CONFIGMAP_NAME,
        "namespace": namespace,
        "labels": {
            MANAGED_BY_LABEL: MANAGED_BY,
            "app.kubernetes.io/part-of": "trellis",
        },
        "annotations": {
            REVISION_ANNOTATION: revision,
            DIGEST_ANNOTATION: digest(config_json),
        },
    });
    if let Some(uid) = mesh.and_then(|m| m.metadata.uid.as_deref()) {
        // Deleting the Mesh garbage-collects every config it produced.
        metadata["ownerReferences"] = json!([{
            "apiVersion": Mesh::api_version(&()),
            "kind": Mesh::kind(&()),
            "name": mesh.map(|m| m.name_any()).unwrap_or_default(),
            "uid": uid,
        }]);
    }
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": { CONFIG_KEY: config_json },
    })
}

/// A status to write, with what the API server is told.
#[derive(Clone, Debug)]
pub enum StatusTarget {
    TrafficPolicy(Arc<TrafficPolicy>, TrafficPolicyStatus),
    PeerAuthentication(Arc<PeerAuthentication>, PeerAuthenticationStatus),
    Mesh(Arc<Mesh>, MeshStatus),
}

/// One status write, with the transitions it makes (for Events).
#[derive(Clone, Debug)]
pub struct StatusUpdate {
    pub target: StatusTarget,
    /// `namespace/name` (namespace empty for the Mesh).
    pub key: ObjectKey,
    pub transitions: Vec<Condition>,
    pub reference: ObjectReference,
}

/// Conditions whose status changed (or appeared not `True`): worth an Event.
fn transitions(existing: &[Condition], merged: &[Condition]) -> Vec<Condition> {
    merged
        .iter()
        .filter(|c| c.type_ != "Ready")
        .filter(|c| match existing.iter().find(|e| e.type_ == c.type_) {
            Some(e) => e.status != c.status,
            None => c.status != ConditionStatus::True,
        })
        .cloned()
        .collect()
}

/// Whether writing `desired` conditions (merged as the status writer merges them) and
/// generation would change what the object reports.
fn differs(
    existing: &[Condition],
    observed_generation: Option<i64>,
    desired: &[Condition],
    generation: Option<i64>,
    now: &str,
) -> bool {
    // Only the compiler's own conditions: others (`Propagated`) belong to other writers, and
    // counting them as a difference would plan a write on every compile.
    !merge_conditions(existing, desired.to_vec(), now)
        .iter()
        .all(|c| crate::api::conditions::find(existing, &c.type_) == Some(c))
        || observed_generation != generation
}

/// The status write for one namespaced policy, when the compiler has conditions for it and
/// writing them would change what it reports. `target` wraps the new conditions and generation
/// in the kind's own status type.
fn policy_update<K>(
    obj: &K,
    desired_by_key: &std::collections::BTreeMap<ObjectKey, Vec<Condition>>,
    existing: &[Condition],
    observed_generation: Option<i64>,
    now: &str,
    target: impl FnOnce(Vec<Condition>, Option<i64>) -> StatusTarget,
) -> Option<StatusUpdate>
where
    K: kube::Resource<DynamicType = ()>,
{
    let key = ObjectKey::new(obj.namespace().unwrap_or_default(), obj.name_any());
    let desired = desired_by_key.get(&key)?;
    let generation = obj.meta().generation;
    if !differs(existing, observed_generation, desired, generation, now) {
        return None;
    }
    Some(StatusUpdate {
        transitions: transitions(existing, desired),
        reference: obj.object_ref(&()),
        key,
        target: target(desired.clone(), generation),
    })
}

/// The status writes that bring every CR's conditions to `out`'s, skipping those that would
/// change nothing (the [`StatusWriter`] skips them too; planning them away keeps the plan an
/// honest list of requests).
pub fn plan_status(
    out: &Output,
    traffic_policies: &[Arc<TrafficPolicy>],
    peer_authentications: &[Arc<PeerAuthentication>],
    mesh: Option<&Arc<Mesh>>,
    pods: &crate::pods::PodSet,
    now: &str,
) -> Vec<StatusUpdate> {
    let mut updates = Vec::new();
    for tp in traffic_policies {
        let current = tp.status.clone().unwrap_or_default();
        updates.extend(policy_update(
            tp.as_ref(),
            &out.traffic_policies,
            &current.conditions,
            current.observed_generation,
            now,
            |conditions, observed_generation| {
                StatusTarget::TrafficPolicy(
                    tp.clone(),
                    TrafficPolicyStatus {
                        conditions,
                        observed_generation,
                        propagation: None,
                    },
                )
            },
        ));
    }
    for pa in peer_authentications {
        let current = pa.status.clone().unwrap_or_default();
        updates.extend(policy_update(
            pa.as_ref(),
            &out.peer_authentications,
            &current.conditions,
            current.observed_generation,
            now,
            |conditions, observed_generation| {
                StatusTarget::PeerAuthentication(
                    pa.clone(),
                    PeerAuthenticationStatus {
                        conditions,
                        observed_generation,
                        propagation: None,
                    },
                )
            },
        ));
    }
    if let Some(mesh) = mesh {
        let current = mesh.status.clone().unwrap_or_default();
        let existing = &current.conditions;
        let mine: Vec<Condition> = existing
            .iter()
            .filter(|c| MESH_CONDITION_TYPES.contains(&c.type_.as_str()))
            .cloned()
            .collect();
        // Only the compiler's part: the status writer applies it under this controller's
        // field manager, and the API server keeps the other controllers' conditions.
        let (counts, proxies) = super::proxies::report(pods, mesh);
        let mut conditions = out.mesh.clone();
        conditions.push(proxies);
        let merged = merge_conditions(existing, conditions.clone(), now);
        let unchanged = merged
            .iter()
            .all(|c| crate::api::conditions::find(existing, &c.type_) == Some(c))
            && current.proxies.as_ref() == Some(&counts);
        if !unchanged {
            updates.push(StatusUpdate {
                transitions: transitions(&mine, &conditions),
                reference: mesh.object_ref(&()),
                key: ObjectKey::new("", mesh.name_any()),
                target: StatusTarget::Mesh(
                    mesh.clone(),
                    MeshStatus {
                        conditions,
                        proxies: Some(counts),
                        ..Default::default()
                    },
                ),
            });
        }
    }
    updates
}

/// What one [`Applier::apply`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub applied: usize,
    pub deleted: usize,
    pub status_patches: usize,
    pub events: usize,
}

/// The `controller` label of the compile loop's reconciles (`trellis dev` uses it too).
pub const COMPILE_CONTROLLER: &str = "compile";

/// Executes plans against the API server.
pub struct Applier {
    client: Client,
    status: StatusWriter,
    recorder: Option<Recorder>,
    /// Where the meshed namespaces of each compile go (the CA writes their trust bundles).
    meshed: Option<crate::compiler::MeshedTx>,
    /// Counts each compile and apply as a `compile` reconcile, by its first error's kind.
    reconciles: Option<super::Reconciles>,
}

impl Applier {
    /// `recorder` publishes Events on condition transitions; `None` disables them.
    pub fn new(client: Client, status: StatusWriter, recorder: Option<Recorder>) -> Self {
        Self {
            client,
            status,
            recorder,
            meshed: None,
            reconciles: None,
        }
    }

    /// Publishes every compile's meshed namespaces on `tx`, so the trust bundles follow the
    /// same set as the `trellis-proxy` ConfigMaps.
    pub fn with_meshed_publisher(self, tx: crate::compiler::MeshedTx) -> Self {
        Self {
            meshed: Some(tx),
            ..self
        }
    }

    /// Counts every compile and apply in `reconciles` (controller `compile`), its results
    /// created at 0 up front.
    pub fn with_reconciles(self, reconciles: super::Reconciles) -> Self {
        reconciles.init(COMPILE_CONTROLLER, &["ok", "apply", "delete", "status"]);
        Self {
            reconciles: Some(reconciles),
            ..self
        }
    }

    /// Counts one compile and apply; `result` is `ok` or an [`Error::metric_label`].
    pub fn count_reconcile(&self, result: &str) {
        if let Some(r) = &self.reconciles {
            r.count(COMPILE_CONTROLLER, result);
        }
    }

    /// Sends `meshed` to the publisher, if any, when it differs from the last value.
    pub fn publish_meshed(&self, meshed: &std::collections::BTreeSet<String>) {
        if let Some(tx) = &self.meshed {
            tx.send_if_modified(|current| {
                if current.as_deref() == Some(meshed) {
                    return false;
                }
                *current = Some(std::sync::Arc::new(meshed.clone()));
                true
            });
        }
    }

    /// Executes the ConfigMap plan, then the status plan. Every call is attempted even when one
    /// fails (one broken namespace must not starve the others); the errors are returned.
    pub async fn apply(
        &self,
        configmaps: &[ConfigMapAction],
        status: &[StatusUpdate],
        mesh: Option<&Mesh>,
    ) -> (Stats, Vec<Error>) {
        let mut stats = Stats::default();
        let mut errors = Vec::new();
        let ssa = PatchParams::apply(FIELD_MANAGER).force();
        for action in configmaps {
            match action {
                ConfigMapAction::Apply { namespace, config } => {
                    let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
                    // Rendered only now, and only for the namespaces being written.
                    let json = config.render();
                    let body = configmap_body(namespace, config.revision(), &json, mesh);
                    match api.patch(CONFIGMAP_NAME, &ssa, &Patch::Apply(&body)).await {
                        Ok(_) => stats.applied += 1,
                        Err(source) => errors.push(Error::Apply {
                            namespace: namespace.clone(),
                            source,
                        }),
                    }
                }
                ConfigMapAction::Delete { namespace } => {
                    let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
                    match api.delete(CONFIGMAP_NAME, &DeleteParams::default()).await {
                        Ok(_) => stats.deleted += 1,
                        // Already gone is what we wanted.
                        Err(kube::Error::Api(s)) if s.code == 404 => stats.deleted += 1,
                        Err(source) => errors.push(Error::Delete {
                            namespace: namespace.clone(),
                            source,
                        }),
                    }
                }
            }
        }
        for u in status {
            let result = match &u.target {
                StatusTarget::TrafficPolicy(obj, s) => {
                    self.status.apply(obj.as_ref(), s.clone()).await
                }
                StatusTarget::PeerAuthentication(obj, s) => {
                    self.status.apply(obj.as_ref(), s.clone()).await
                }
                StatusTarget::Mesh(obj, s) => self.status.apply(obj.as_ref(), s.clone()).await,
            };
            match result {
                Ok(Outcome::Patched) => stats.status_patches += 1,
                Ok(Outcome::Unchanged) => continue,
                // Deleted since the snapshot: nothing to report on.
                Err(status::Error::Gone { .. }) => continue,
                Err(e) => {
                    errors.push(Error::Status(e));
                    continue;
                }
            }
            if let Some(recorder) = &self.recorder {
                for t in &u.transitions {
                    let ev = Event {
                        type_: if t.is_true() {
                            EventType::Normal
                        } else {
                            EventType::Warning
                        },
                        reason: t.reason.clone(),
                        note: Some(truncate(&format!("{}: {}", t.type_, t.message), 1000)),
                        action: format!("Compile{}", t.type_),
                        secondary: None,
                    };
                    match recorder.publish(&ev, &u.reference).await {
                        Ok(()) => stats.events += 1,
                        // An Event is best effort: losing one must not fail the reconcile.
                        Err(e) => {
                            tracing::warn!(error = %e, object = %u.key, "event not published")
                        }
                    }
                }
            }
        }
        (stats, errors)
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}
