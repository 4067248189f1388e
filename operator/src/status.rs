//! The one status writer: every controller reports status through [`StatusWriter::apply`].
//!
//! It takes the status a reconcile computed (a pure function of what it observed), keeps
//! `lastTransitionTime` of conditions whose status did not change
//! ([`merge_conditions`]), and skips the request when
//! the result equals what the object already reports: a level-triggered controller re-reconciles
//! often, and a patch that changes nothing would still bump `resourceVersion`, wake every watcher
//! and re-trigger the controller itself.
//!
//! Writes are server-side apply on the `/status` subresource, one field manager per controller
//! (`trellis-operator/<controller>`, [`StatusWriter::for_controller`]) and `force=true`: the
//! operator is the only author of these status fields, so it takes ownership back from anyone
//! who edited them by hand instead of failing forever.
//!
//! Several controllers report on one object (the Mesh: `mesh` writes `Accepted`/`Ready`, `ca`
//! writes `CAReady`/`WebhookReady`, `compile` writes `Programmed`/`Degraded`/`ProxiesUpToDate`
//! and the proxy counts, `rollout` writes `RolloutProgressing` and `status.rollout`, `addons` writes
//! `ObservabilityReady`). Each sends only its own part: `conditions` is a map list keyed by
//! `type` (`x-kubernetes-list-type: map` in the CRD), so the API server merges the parts, and a
//! controller working from a stale snapshot can no longer overwrite another's conditions. The
//! no-op check compares only the part a controller sends ([`owns_unchanged`]).

use std::fmt::Debug;
use std::sync::Arc;

use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::conditions::{Condition, merge_conditions};
use crate::api::{
    FIELD_MANAGER, Mesh, MeshStatus, PeerAuthentication, PeerAuthenticationStatus, TrafficPolicy,
    TrafficPolicyStatus,
};

/// What the API server's 404 says when the resource type itself is unknown (the CRD is not
/// installed), as opposed to `<plural>.<group> "<name>" not found` for a deleted object.
const UNKNOWN_RESOURCE: &str = "the server could not find the requested resource";

/// Why a status could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CRD for this kind is not installed (or was removed while the operator ran).
    #[error(
        "cannot write {kind} status: the {kind} CRD is not installed ({UNKNOWN_RESOURCE}); install the CRDs with `kubectl apply -k config/default`"
    )]
    CrdMissing { kind: String },
    /// The object was deleted between the reconcile reading it and the status write.
    #[error("cannot write status of {kind} {name}: the object no longer exists")]
    Gone { kind: String, name: String },
    /// The API server refused the apply with 409 Conflict.
    #[error("conflict writing status of {kind} {name}: {message}")]
    Conflict {
        kind: String,
        name: String,
        message: String,
    },
    /// Any other API error (network, authorization, validation).
    #[error("writing status of {kind} {name}: {source}")]
    Api {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    /// The status did not serialize (a bug in the status type).
    #[error("serializing status of {kind} {name}: {source}")]
    Serialize {
        kind: String,
        name: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// Low-cardinality label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::CrdMissing { .. } => "crd_missing",
            Error::Gone { .. } => "gone",
            Error::Conflict { .. } => "conflict",
            Error::Api { .. } => "api",
            Error::Serialize { .. } => "serialize",
        }
    }
}

/// A kind whose status the operator writes.
pub trait HasStatus:
    Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Serialize + Send + Sync + 'static
{
    type Status: Clone + Debug + Default + PartialEq + Serialize + Send + Sync;

    /// The status the object currently reports.
    fn current_status(&self) -> Option<&Self::Status>;
    /// The conditions inside a status.
    fn conditions(status: &Self::Status) -> &[Condition];
    /// Replaces the conditions inside a status.
    fn set_conditions(status: &mut Self::Status, conditions: Vec<Condition>);
    /// An API handle addressing this object (namespaced or cluster-scoped).
    fn api_for(client: Client, obj: &Self) -> Api<Self>;
}

impl HasStatus for Mesh {
    type Status = MeshStatus;
    fn current_status(&self) -> Option<&MeshStatus> {
        self.status.as_ref()
    }
    fn conditions(s: &MeshStatus) -> &[Condition] {
        &s.conditions
    }
    fn set_conditions(s: &mut MeshStatus, c: Vec<Condition>) {
        s.conditions = c;
    }
    fn api_for(client: Client, _obj: &Self) -> Api<Self> {
        Api::all(client)
    }
}

impl HasStatus for TrafficPolicy {
    type Status = TrafficPolicyStatus;
    fn current_status(&self) -> Option<&TrafficPolicyStatus> {
        self.status.as_ref()
    }
    fn conditions(s: &TrafficPolicyStatus) -> &[Condition] {
        &s.conditions
    }
    fn set_conditions(s: &mut TrafficPolicyStatus, c: Vec<Condition>) {
        s.conditions = c;
    }
    fn api_for(client: Client, obj: &Self) -> Api<Self> {
        Api::namespaced(client, &obj.namespace().unwrap_or_default())
    }
}

impl HasStatus for PeerAuthentication {
    type Status = PeerAuthenticationStatus;
    fn current_status(&self) -> Option<&PeerAuthenticationStatus> {
        self.status.as_ref()
    }
    fn conditions(s: &PeerAuthenticationStatus) -> &[Condition] {
        &s.conditions
    }
    fn set_conditions(s: &mut PeerAuthenticationStatus, c: Vec<Condition>) {
        s.conditions = c;
    }
    fn api_for(client: Client, obj: &Self) -> Api<Self> {
        Api::namespaced(client, &obj.namespace().unwrap_or_default())
    }
}

/// What [`StatusWriter::apply`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The status was written.
    Patched,
    /// The object already reported exactly this status; no request was made.
    Unchanged,
}

/// Source of `lastTransitionTime` values (RFC 3339); swappable so tests are deterministic.
pub type Clock = Arc<dyn Fn() -> String + Send + Sync>;

/// The status writer shared by every controller.
#[derive(Clone)]
pub struct StatusWriter {
    client: Client,
    clock: Clock,
    manager: String,
}

impl StatusWriter {
    pub fn new(client: Client) -> Self {
        Self::with_clock(
            client,
            Arc::new(|| {
                jiff::Timestamp::now()
                    .round(jiff::Unit::Second)
                    .map_or_else(|_| jiff::Timestamp::now().to_string(), |t| t.to_string())
            }),
        )
    }

    pub fn with_clock(client: Client, clock: Clock) -> Self {
        Self {
            client,
            clock,
            manager: FIELD_MANAGER.to_string(),
        }
    }

    /// The same writer, applying as `trellis-operator/<controller>`: the field manager that
    /// owns exactly the conditions and fields that controller reports.
    pub fn for_controller(&self, controller: &str) -> Self {
        Self {
            manager: format!("{FIELD_MANAGER}/{controller}"),
            ..self.clone()
        }
    }

    /// The field manager this writer applies as.
    pub fn manager(&self) -> &str {
        &self.manager
    }

    /// The status `obj` should report, with transition times carried over from what it reports
    /// now. Pure; [`apply`](Self::apply) writes it.
    pub fn merged<K: HasStatus>(&self, obj: &K, mut desired: K::Status) -> K::Status {
        let existing = obj.current_status().map(K::conditions).unwrap_or_default();
        let conditions = K::conditions(&desired).to_vec();
        K::set_conditions(
            &mut desired,
            merge_conditions(existing, conditions, &(self.clock)()),
        );
        desired
    }

    /// Writes `desired`, this controller's part of the status of `obj` (its own conditions
    /// and fields; `None` fields are left to others), unless `obj` already reports it.
    pub async fn apply<K: HasStatus>(&self, obj: &K, desired: K::Status) -> Result<Outcome, Error> {
        let kind = K::kind(&()).to_string();
        let name = obj.name_any();
        let desired = self.merged(obj, desired);
        let serialize = |s: &K::Status| {
            serde_json::to_value(s).map_err(|source| Error::Serialize {
                kind: kind.clone(),
                name: name.clone(),
                source,
            })
        };
        let status = serialize(&desired)?;
        let current = obj.current_status().map(&serialize).transpose()?;
        if current.is_some_and(|c| owns_unchanged(&status, &c)) {
            tracing::debug!(%kind, %name, manager = %self.manager, "status unchanged; not patching");
            return Ok(Outcome::Unchanged);
        }
        let body = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": kind,
            "status": status,
        });
        let params = PatchParams::apply(&self.manager).force();
        K::api_for(self.client.clone(), obj)
            .patch_status(&name, &params, &Patch::Apply(&body))
            .await
            .map_err(|e| classify(e, &kind, &name))?;
        tracing::info!(%kind, %name, manager = %self.manager, "status written");
        Ok(Outcome::Patched)
    }
}

/// Whether the object already reports every field of `part` (a serialized status part):
/// each top-level field equal, and each condition in `part` equal to the object's condition of
/// the same `type`. Conditions and fields `part` does not name belong to other controllers and
/// are not compared.
pub fn owns_unchanged(part: &serde_json::Value, current: &serde_json::Value) -> bool {
    let Some(fields) = part.as_object() else {
        return part == current;
    };
    fields.iter().all(|(key, want)| {
        let have = current.get(key);
        if key != "conditions" {
            return have == Some(want);
        }
        let have = have
            .and_then(|h| h.as_array())
            .map_or(&[][..], Vec::as_slice);
        want.as_array().is_some_and(|want| {
            want.iter().all(|w| {
                have.iter()
                    .find(|h| h.get("type") == w.get("type"))
                    .is_some_and(|h| h == w)
            })
        })
    })
}

/// Turns an API error into the typed error callers branch on.
fn classify(e: kube::Error, kind: &str, name: &str) -> Error {
    match &e {
        kube::Error::Api(s) if s.code == 404 && s.message == UNKNOWN_RESOURCE => {
            Error::CrdMissing {
                kind: kind.to_string(),
            }
        }
        kube::Error::Api(s) if s.code == 404 => Error::Gone {
            kind: kind.to_string(),
            name: name.to_string(),
        },
        kube::Error::Api(s) if s.code == 409 => Error::Conflict {
            kind: kind.to_string(),
            name: name.to_string(),
            message: s.message.clone(),
        },
        _ => Error::Api {
            kind: kind.to_string(),
            name: name.to_string(),
            source: e,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};

    use super::*;
    use crate::api::conditions::ConditionStatus;
    use crate::api::traffic_policy::TargetRef;
    use crate::api::{MeshSpec, TrafficPolicySpec};

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn writer() -> (StatusWriter, Handle) {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "default");
        let writer = StatusWriter::with_clock(client, Arc::new(|| "2026-11-25T12:00:00Z".into()));
        (writer, handle)
    }

    /// One expected request and the canned answer, checked in order (the controller-rs
    /// `ApiServerVerifier` pattern).
    struct Exchange {
        method: Method,
        path: &'static str,
        query: &'static [(&'static str, &'static str)],
        body: Option<Value>,
        status: StatusCode,
        reply: Value,
    }

    /// Answers `exchanges` in order, asserting each request, then asserts that no further
    /// request arrives. The timeout turns a missing request into a test failure, not a hang.
    async fn verify(mut handle: Handle, exchanges: Vec<Exchange>) {
        for ex in exchanges {
            let (req, send) = tokio::time::timeout(Duration::from_secs(1), handle.next_request())
                .await
                .expect("timed out waiting for a request")
                .expect("client dropped before sending a request");
            assert_eq!(req.method(), ex.method);
            assert_eq!(req.uri().path(), ex.path);
            let query: Vec<(String, String)> = req
                .uri()
                .query()
                .unwrap_or_default()
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (k.to_string(), v.to_string())
                })
                .collect();
            for (k, v) in ex.query {
                assert!(
                    query.iter().any(|(qk, qv)| qk == k && qv == v),
                    "query {query:?} lacks {k}={v}"
                );
            }
            assert_eq!(
                req.headers().get("content-type").unwrap(),
                "application/apply-patch+yaml"
            );
            let body = req.into_body().collect_bytes().await.unwrap();
            if let Some(want) = ex.body {
                let got: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(got, want);
            }
            send.send_response(
                Response::builder()
                    .status(ex.status)
                    .body(Body::from(serde_json::to_vec(&ex.reply).unwrap()))
                    .unwrap(),
            );
        }
        let extra = tokio::time::timeout(Duration::from_millis(100), handle.next_request()).await;
        assert!(
            !matches!(extra, Ok(Some(_))),
            "unexpected extra request to the API server"
        );
    }

    fn policy(status: Option<TrafficPolicyStatus>) -> TrafficPolicy {
        let mut p = TrafficPolicy::new(
            "reviews",
            TrafficPolicySpec {
                target_ref: TargetRef {
                    kind: "Service".into(),
                    name: "reviews".into(),
                    port: None,
                },
                load_balancer: None,
                timeouts: None,
                retries: None,
                circuit_breaker: None,
                outlier_detection: None,
                rate_limit: None,
                split: vec![],
            },
        );
        p.metadata.namespace = Some("shop".into());
        p.metadata.generation = Some(3);
        p.status = status;
        p
    }

    fn accepted() -> TrafficPolicyStatus {
        TrafficPolicyStatus {
            conditions: vec![Condition::new(
                "Accepted",
                ConditionStatus::True,
                "Accepted",
                "",
                Some(3),
            )],
            observed_generation: Some(3),
            propagation: None,
        }
    }

    fn status_error(code: u16, reason: &str, message: &str) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "code": code, "reason": reason, "message": message})
    }

    const TP_PATH: &str =
        "/apis/trellis.dev/v1alpha1/namespaces/shop/trafficpolicies/reviews/status";

    #[tokio::test]
    async fn writes_status_with_server_side_apply() {
        let (writer, handle) = writer();
        let expected_body = json!({
            "apiVersion": "trellis.dev/v1alpha1",
            "kind": "TrafficPolicy",
            "status": {
                "conditions": [{
                    "type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                    "lastTransitionTime": "2026-11-25T12:00:00Z", "observedGeneration": 3
                }],
                "observedGeneration": 3
            }
        });
        let mut reply = serde_json::to_value(policy(None)).unwrap();
        reply["status"] = expected_body["status"].clone();
        let server = tokio::spawn(verify(
            handle,
            vec![Exchange {
                method: Method::PATCH,
                path: TP_PATH,
                query: &[("fieldManager", "trellis-operator"), ("force", "true")],
                body: Some(expected_body),
                status: StatusCode::OK,
                reply,
            }],
        ));
        let out = writer.apply(&policy(None), accepted()).await.unwrap();
        assert_eq!(out, Outcome::Patched);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn skips_the_patch_when_nothing_changed() {
        let (writer, handle) = writer();
        // The object already reports Accepted=True since an earlier time: same status, so the
        // earlier transition time is kept and the merged status equals the observed one.
        let mut observed = accepted();
        observed.conditions[0].last_transition_time = "2026-01-01T00:00:00Z".into();
        let server = tokio::spawn(verify(handle, vec![]));
        let out = writer
            .apply(&policy(Some(observed)), accepted())
            .await
            .unwrap();
        assert_eq!(out, Outcome::Unchanged);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_changed_condition_is_patched_with_a_new_transition_time() {
        let (writer, handle) = writer();
        let mut observed = accepted();
        observed.conditions[0].last_transition_time = "2026-01-01T00:00:00Z".into();
        let mut desired = accepted();
        desired.conditions[0].status = ConditionStatus::False;
        desired.conditions[0].reason = "TargetNotFound".into();
        let server = tokio::spawn(async move {
            let (req, send) = handle_one(handle).await;
            let body: Value =
                serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
            assert_eq!(
                body["status"]["conditions"][0]["lastTransitionTime"],
                "2026-11-25T12:00:00Z"
            );
            assert_eq!(body["status"]["conditions"][0]["reason"], "TargetNotFound");
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&policy(None)).unwrap()))
                    .unwrap(),
            );
        });
        let out = writer
            .apply(&policy(Some(observed)), desired)
            .await
            .unwrap();
        assert_eq!(out, Outcome::Patched);
        server.await.unwrap();
    }

    async fn handle_one(
        mut handle: Handle,
    ) -> (
        Request<Body>,
        tower_test::mock::SendResponse<Response<Body>>,
    ) {
        tokio::time::timeout(Duration::from_secs(1), handle.next_request())
            .await
            .expect("timed out waiting for a request")
            .expect("no request")
    }

    #[tokio::test]
    async fn a_conflict_is_a_typed_error() {
        let (writer, handle) = writer();
        let server = tokio::spawn(verify(
            handle,
            vec![Exchange {
                method: Method::PATCH,
                path: TP_PATH,
                query: &[("fieldManager", "trellis-operator"), ("force", "true")],
                body: None,
                status: StatusCode::CONFLICT,
                reply: status_error(
                    409,
                    "Conflict",
                    "Operation cannot be fulfilled on trafficpolicies.trellis.dev \"reviews\": the object has been modified; please apply your changes to the latest version and try again",
                ),
            }],
        ));
        let err = writer.apply(&policy(None), accepted()).await.unwrap_err();
        assert!(
            matches!(&err, Error::Conflict { kind, name, message }
                if kind == "TrafficPolicy" && name == "reviews" && message.contains("has been modified")),
            "{err:?}"
        );
        assert_eq!(err.metric_label(), "conflict");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_missing_crd_is_a_typed_error_that_says_how_to_install() {
        let (writer, handle) = writer();
        let mut mesh = Mesh::new("default", MeshSpec::default());
        mesh.metadata.generation = Some(1);
        let server = tokio::spawn(verify(
            handle,
            vec![Exchange {
                method: Method::PATCH,
                path: "/apis/trellis.dev/v1alpha1/meshes/default/status",
                query: &[("fieldManager", "trellis-operator"), ("force", "true")],
                body: None,
                status: StatusCode::NOT_FOUND,
                reply: status_error(404, "NotFound", UNKNOWN_RESOURCE),
            }],
        ));
        let desired = MeshStatus {
            observed_generation: Some(1),
            ..Default::default()
        };
        let err = writer.apply(&mesh, desired).await.unwrap_err();
        assert!(
            matches!(&err, Error::CrdMissing { kind } if kind == "Mesh"),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("kubectl apply -k config/default"), "{msg}");
        assert!(msg.contains(UNKNOWN_RESOURCE), "{msg}");
        server.await.unwrap();
    }

    fn mesh_with(conditions: Vec<Condition>) -> Mesh {
        let mut mesh = Mesh::new("default", MeshSpec::default());
        mesh.metadata.generation = Some(2);
        mesh.status = Some(MeshStatus {
            conditions,
            observed_generation: Some(2),
            ..Default::default()
        });
        mesh
    }

    fn at(type_: &str, status: ConditionStatus, time: &str) -> Condition {
        Condition {
            last_transition_time: time.into(),
            ..Condition::new(type_, status, "R", "", Some(2))
        }
    }

    /// Issue 13 item 4: a controller applies only its own conditions under its own field
    /// manager, so another controller's conditions are neither sent nor overwritten.
    #[tokio::test]
    async fn a_controller_applies_only_its_own_part_under_its_own_manager() {
        let (writer, handle) = writer();
        let ca = writer.for_controller("ca");
        assert_eq!(ca.manager(), "trellis-operator/ca");
        // The object reports the compiler's Programmed and an old CAReady.
        let mesh = mesh_with(vec![
            at("Programmed", ConditionStatus::True, "2026-01-01T00:00:00Z"),
            at("CAReady", ConditionStatus::False, "2026-01-01T00:00:00Z"),
        ]);
        let part = MeshStatus {
            conditions: vec![Condition::new(
                "CAReady",
                ConditionStatus::True,
                "R",
                "",
                Some(2),
            )],
            ..Default::default()
        };
        let server = tokio::spawn(verify(
            handle,
            vec![Exchange {
                method: Method::PATCH,
                path: "/apis/trellis.dev/v1alpha1/meshes/default/status",
                query: &[("fieldManager", "trellis-operator%2Fca"), ("force", "true")],
                body: Some(json!({
                    "apiVersion": "trellis.dev/v1alpha1",
                    "kind": "Mesh",
                    "status": {"conditions": [{
                        "type": "CAReady", "status": "True", "reason": "R", "message": "",
                        "lastTransitionTime": "2026-11-25T12:00:00Z", "observedGeneration": 2
                    }]}
                })),
                status: StatusCode::OK,
                reply: serde_json::to_value(&mesh).unwrap(),
            }],
        ));
        assert_eq!(ca.apply(&mesh, part).await.unwrap(), Outcome::Patched);
        server.await.unwrap();
    }

    /// The no-op check compares only the writer's part: others' conditions (in any order)
    /// and fields do not make an unchanged part look changed.
    #[tokio::test]
    async fn an_unchanged_part_is_not_patched_whatever_the_others_report() {
        let (writer, handle) = writer();
        let mesh = mesh_with(vec![
            at("Programmed", ConditionStatus::False, "2026-01-01T00:00:00Z"),
            at("CAReady", ConditionStatus::True, "2026-01-02T00:00:00Z"),
            at("Ready", ConditionStatus::False, "2026-01-01T00:00:00Z"),
        ]);
        let part = MeshStatus {
            conditions: vec![Condition::new(
                "CAReady",
                ConditionStatus::True,
                "R",
                "",
                Some(2),
            )],
            ..Default::default()
        };
        let server = tokio::spawn(verify(handle, vec![]));
        let out = writer
            .for_controller("ca")
            .apply(&mesh, part)
            .await
            .unwrap();
        assert_eq!(out, Outcome::Unchanged);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_deleted_object_is_not_mistaken_for_a_missing_crd() {
        let (writer, handle) = writer();
        let server = tokio::spawn(verify(
            handle,
            vec![Exchange {
                method: Method::PATCH,
                path: TP_PATH,
                query: &[("fieldManager", "trellis-operator")],
                body: None,
                status: StatusCode::NOT_FOUND,
                reply: status_error(
                    404,
                    "NotFound",
                    "trafficpolicies.trellis.dev \"reviews\" not found",
                ),
            }],
        ));
        let err = writer.apply(&policy(None), accepted()).await.unwrap_err();
        assert!(matches!(err, Error::Gone { .. }), "{err:?}");
        server.await.unwrap();
    }
}
