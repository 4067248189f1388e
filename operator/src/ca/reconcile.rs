//! The Mesh CA reconcile: a pure function from what was observed (the Mesh, the CA Secret, the
//! user's CA Secret, meshed namespaces, existing trust bundles, the time) to the objects that
//! should exist and the CA part of the Mesh status. [`apply`] is the thin applier.
//!
//! ## State
//! The CA Secret `trellis-ca` in the operator's namespace holds everything, so a restarted (or newly
//! elected) operator continues where the last one stopped:
//! - `tls.crt`/`tls.key`: the signing CA; `next.crt`/`next.key`: the root being introduced;
//!   `previous.crt`: the root being retired (public only); `ca.crt`: the bundle.
//! - annotations `trellis.dev/ca-source`, `trellis.dev/rotation-stage`,
//!   `trellis.dev/rotation-since`, `trellis.dev/rotation-reason`, `trellis.dev/rotation-trigger`.
//!
//! A user-supplied CA (Mesh `ca.secretRef`, e.g. kept by cert-manager) is copied into this
//! Secret: the identity endpoint needs the key, and keeping the old key here is what lets the
//! mesh keep signing with the old CA while the new root propagates, even after cert-manager has
//! already replaced the user's Secret. The CA Secret has no owner reference on purpose:
//! deleting and re-creating the Mesh must not silently replace the root of every workload.
//!
//! ## Root rotation
//! `Idle` → `AddedNewRoot` (bundle = old + new; signing with old) → once every meshed
//! namespace's bundle ConfigMap holds both roots, and [`PROPAGATION`] has passed since the last
//! of them was written (kubelet syncs ConfigMaps into pods in about a minute; a bundle written
//! late, say for a namespace that joined mid-rotation or after a failed write, restarts the
//! wait) → `IssuingFromNew` (bundle = old + new; signing with new) → after the longest
//! lifetime of any workload certificate the old root signed (recorded with the root as
//! `trellis.dev/max-workload-ttl`, so lowering `workloadCertTtl` mid-rotation cannot strand
//! older certificates) → `RemovedOldRoot` (bundle = new) → after [`PROPAGATION`] → `Idle`.
//! Triggers: the user's Secret holds a different CA, the CA source changed, the self-signed root
//! has less than 20 % of its lifetime left, or the Mesh annotation `trellis.dev/rotate-root`
//! was set to a new value. At most one transition happens per reconcile.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};

use super::authority::{CLOCK_SKEW_BACKDATE, CaError, CertificateAuthority, parse_certs};
use super::{IssuerState, authority};
use crate::api::conditions::{Condition, ConditionStatus};
use crate::api::mesh::CaStatus;
use crate::api::{FIELD_MANAGER, Mesh};

/// The operator's namespace in the default install (`config/default`). The controllers use the
/// namespace they run in (`POD_NAMESPACE`, [`Observed::namespace`]): OLM installs elsewhere.
pub const OPERATOR_NAMESPACE: &str = "trellis-system";
/// The CA Secret in the operator's namespace.
pub const CA_SECRET: &str = "trellis-ca";
/// The trust bundle ConfigMap in every meshed namespace.
pub const TRUST_BUNDLE: &str = "trellis-trust-bundle";
/// Its key.
pub const TRUST_BUNDLE_KEY: &str = "ca.pem";
/// How long a changed bundle is given to reach every pod before the next stage.
pub const PROPAGATION: Duration = Duration::from_secs(120);
/// Rotate a self-signed root when less than this fraction of its lifetime is left.
pub const ROTATE_AT_REMAINING: f64 = 0.2;
/// Set this Mesh annotation to a new value to rotate the self-signed root now.
pub const ROTATE_ANNOTATION: &str = "trellis.dev/rotate-root";
/// The condition this reconcile owns.
pub const CA_READY: &str = "CAReady";

const A_SOURCE: &str = "trellis.dev/ca-source";
const A_STAGE: &str = "trellis.dev/rotation-stage";
const A_SINCE: &str = "trellis.dev/rotation-since";
const A_REASON: &str = "trellis.dev/rotation-reason";
const A_TRIGGER: &str = "trellis.dev/rotation-trigger";
/// The longest workload TTL the signing root has issued with (seconds).
const A_MAX_TTL: &str = "trellis.dev/max-workload-ttl";
/// The same for the root being retired, recorded when signing switched away from it.
const A_RETIRING_MAX_TTL: &str = "trellis.dev/retiring-max-workload-ttl";
/// When every meshed namespace's bundle was first seen holding the current stage's roots.
const A_BUNDLES_SYNCED: &str = "trellis.dev/bundles-synced-at";
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "trellis-operator");
const COMPONENT: (&str, &str) = ("trellis.dev/component", "trust-bundle");

/// Why the reconcile could not produce a CA.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("CA Secret {CA_SECRET} in the operator's namespace is unusable: {0}")]
    InvalidCaSecret(String),
    #[error("CA Secret {0} referenced by the Mesh does not exist")]
    UserSecretMissing(String),
    #[error("CA Secret {0} referenced by the Mesh is unusable: {1}")]
    UserSecretInvalid(String, String),
    #[error("{0}")]
    Duration(#[from] crate::api::mesh::InvalidDuration),
    #[error("generating a root CA: {0}")]
    Generate(CaError),
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    /// Writing one of the CA's objects failed; `object` names it (`Secret trellis-system/...`).
    #[error("applying {object} failed: {source}")]
    Write { object: String, source: kube::Error },
}

impl ReconcileError {
    fn reason(&self) -> &'static str {
        match self {
            ReconcileError::InvalidCaSecret(_) => "InvalidCASecret",
            ReconcileError::UserSecretMissing(_) => "CASecretNotFound",
            ReconcileError::UserSecretInvalid(..) => "InvalidCASecretRef",
            ReconcileError::Duration(_) => "InvalidDuration",
            ReconcileError::Generate(_) => "GenerateFailed",
            ReconcileError::Api(_) => "ApiError",
            ReconcileError::Write { .. } => "ApplyFailed",
        }
    }

    /// Low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        self.reason()
    }
}

/// Stage of a root rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Idle,
    AddedNewRoot,
    IssuingFromNew,
    RemovedOldRoot,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Idle => "Idle",
            Stage::AddedNewRoot => "AddedNewRoot",
            Stage::IssuingFromNew => "IssuingFromNew",
            Stage::RemovedOldRoot => "RemovedOldRoot",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        [
            Stage::Idle,
            Stage::AddedNewRoot,
            Stage::IssuingFromNew,
            Stage::RemovedOldRoot,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

/// The CA state persisted in the CA Secret.
#[derive(Debug, Clone)]
pub struct CaState {
    pub active: Arc<CertificateAuthority>,
    pub next: Option<Arc<CertificateAuthority>>,
    /// Retiring root(s), PEM.
    pub previous_pem: Option<String>,
    pub stage: Stage,
    pub since: SystemTime,
    pub source: String,
    pub reason: String,
    pub trigger: String,
    /// Longest workload TTL used with `active` (grows when `workloadCertTtl` does, never
    /// shrinks while the root signs).
    pub max_ttl: Duration,
    /// Longest workload TTL used with the root being retired (`IssuingFromNew`): how long its
    /// last certificates can live.
    pub retiring_max_ttl: Option<Duration>,
    /// When every meshed namespace's bundle was first observed holding this stage's roots
    /// (`AddedNewRoot`); reset whenever one is not.
    pub bundles_synced: Option<SystemTime>,
}

fn data_str<'a>(data: &'a BTreeMap<String, ByteString>, key: &str) -> Option<&'a str> {
    data.get(key).and_then(|b| std::str::from_utf8(&b.0).ok())
}

fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn secs(s: Option<&String>) -> Option<Duration> {
    s?.parse().ok().map(Duration::from_secs)
}

fn parse_time(s: &str) -> Option<SystemTime> {
    s.parse::<jiff::Timestamp>().ok().map(SystemTime::from)
}

/// Concatenates PEM bundles, dropping duplicate certificates, in order.
fn join_bundles(parts: &[&str]) -> String {
    let mut seen = BTreeSet::new();
    let mut out = String::new();
    for part in parts {
        for c in parse_certs(part).unwrap_or_default() {
            if seen.insert(c.as_ref().to_vec()) {
                out.push_str(&authority::cert_pem(&c));
            }
        }
    }
    out
}

impl CaState {
    /// Reads the state from the CA Secret.
    pub fn from_secret(secret: &Secret) -> Result<Self, ReconcileError> {
        let bad = |m: String| ReconcileError::InvalidCaSecret(m);
        let empty = BTreeMap::new();
        let data = secret.data.as_ref().unwrap_or(&empty);
        let ann = secret.annotations();
        let load =
            |crt: &str, key: &str| -> Result<Option<Arc<CertificateAuthority>>, ReconcileError> {
                match (data_str(data, crt), data_str(data, key)) {
                    (Some(c), Some(k)) => CertificateAuthority::from_pem(c, k, None)
                        .map(|ca| Some(Arc::new(ca)))
                        .map_err(|e| bad(format!("{crt}: {e}"))),
                    (None, None) => Ok(None),
                    _ => Err(bad(format!("{crt} and {key} must be set together"))),
                }
            };
        let active = load("tls.crt", "tls.key")?.ok_or_else(|| bad("no tls.crt/tls.key".into()))?;
        let next = load("next.crt", "next.key")?;
        let previous_pem = data_str(data, "previous.crt").map(str::to_string);
        if let Some(p) = &previous_pem {
            parse_certs(p).map_err(|e| bad(format!("previous.crt: {e}")))?;
        }
        let stage = match ann.get(A_STAGE) {
            None => Stage::Idle,
            Some(s) => {
                Stage::parse(s).ok_or_else(|| bad(format!("unknown rotation stage {s:?}")))?
            }
        };
        // The data must match the stage, or a transition would act on missing material.
        match stage {
            Stage::AddedNewRoot if next.is_none() => {
                return Err(bad("AddedNewRoot without next.crt".into()));
            }
            Stage::IssuingFromNew if previous_pem.is_none() => {
                return Err(bad("IssuingFromNew without previous.crt".into()));
            }
            _ => {}
        }
        Ok(Self {
            active,
            next,
            previous_pem,
            stage,
            since: ann
                .get(A_SINCE)
                .and_then(|s| parse_time(s))
                .unwrap_or(SystemTime::UNIX_EPOCH),
            source: ann.get(A_SOURCE).cloned().unwrap_or_default(),
            reason: ann.get(A_REASON).cloned().unwrap_or_default(),
            trigger: ann.get(A_TRIGGER).cloned().unwrap_or_default(),
            max_ttl: secs(ann.get(A_MAX_TTL)).unwrap_or_default(),
            retiring_max_ttl: secs(ann.get(A_RETIRING_MAX_TTL)),
            bundles_synced: ann.get(A_BUNDLES_SYNCED).and_then(|s| parse_time(s)),
        })
    }

    /// The roots every workload must trust in this state.
    pub fn bundle_pem(&self) -> String {
        match self.stage {
            Stage::Idle | Stage::RemovedOldRoot => join_bundles(&[self.active.roots_pem()]),
            Stage::AddedNewRoot => join_bundles(&[
                self.active.roots_pem(),
                self.next
                    .as_ref()
                    .map(|n| n.roots_pem())
                    .unwrap_or_default(),
            ]),
            Stage::IssuingFromNew => join_bundles(&[
                self.previous_pem.as_deref().unwrap_or_default(),
                self.active.roots_pem(),
            ]),
        }
    }

    /// The CA Secret for this state, in the operator's `namespace`.
    pub fn to_secret(&self, namespace: &str) -> Secret {
        let mut data = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
        };
        put("tls.crt", self.active.cert_pem());
        put("tls.key", self.active.key_pem());
        put("ca.crt", &self.bundle_pem());
        if let Some(n) = &self.next {
            put("next.crt", n.cert_pem());
            put("next.key", n.key_pem());
        }
        if let Some(p) = &self.previous_pem {
            put("previous.crt", p);
        }
        let annotations = [
            (A_SOURCE, Some(self.source.clone())),
            (A_STAGE, Some(self.stage.as_str().to_string())),
            (A_SINCE, Some(rfc3339(self.since))),
            (A_REASON, Some(self.reason.clone())),
            (A_TRIGGER, Some(self.trigger.clone())),
            (A_MAX_TTL, Some(self.max_ttl.as_secs().to_string())),
            (
                A_RETIRING_MAX_TTL,
                self.retiring_max_ttl.map(|d| d.as_secs().to_string()),
            ),
            (A_BUNDLES_SYNCED, self.bundles_synced.map(rfc3339)),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_string(), v?)))
        .collect();
        Secret {
            metadata: ObjectMeta {
                name: Some(CA_SECRET.into()),
                namespace: Some(namespace.into()),
                labels: Some([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())].into()),
                annotations: Some(annotations),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(data),
            ..Default::default()
        }
    }
}

/// Everything the reconcile looks at.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub mesh: &'a Mesh,
    /// The operator's namespace (`POD_NAMESPACE`): where the CA Secret lives, and the default
    /// namespace of `spec.ca.secretRef`.
    pub namespace: &'a str,
    /// `<namespace>/trellis-ca`, if it exists.
    pub ca_secret: Option<&'a Secret>,
    /// The Secret `mesh.spec.ca.secretRef` names, if any and if it exists.
    pub user_secret: Option<&'a Secret>,
    /// Namespaces in the mesh.
    pub meshed_namespaces: &'a [String],
    /// Existing `trellis-trust-bundle` ConfigMaps, in any namespace.
    pub bundles: &'a [ConfigMap],
    pub now: SystemTime,
}

/// What should be.
#[derive(Debug, Clone)]
pub struct Desired {
    /// The CA Secret to apply, when it differs from what exists.
    pub ca_secret: Option<Secret>,
    /// Bundle ConfigMaps to apply (only those whose content differs).
    pub bundles: Vec<ConfigMap>,
    /// Namespaces whose bundle ConfigMap must go (they left the mesh).
    pub delete_bundles: Vec<String>,
    /// What the identity endpoint signs with; `None` when there is no usable CA.
    pub issuer: Option<IssuerState>,
    /// The `CAReady` condition (without transition time; the status writer merges).
    pub condition: Condition,
    pub ca_status: Option<CaStatus>,
    /// When to look again even if nothing changes (a stage timer or the expiry threshold).
    pub requeue_after: Option<Duration>,
}

impl Desired {
    /// Change nothing; report `condition`.
    fn unchanged(condition: Condition) -> Self {
        Self {
            ca_secret: None,
            bundles: Vec::new(),
            delete_bundles: Vec::new(),
            issuer: None,
            condition,
            ca_status: None,
            requeue_after: Some(Duration::from_secs(60)),
        }
    }
}

fn desired_source(mesh: &Mesh, namespace: &str) -> String {
    match &mesh.spec.ca.secret_ref {
        Some(r) => format!(
            "secret/{}/{}",
            r.namespace.as_deref().unwrap_or(namespace),
            r.name
        ),
        None => "self-signed".into(),
    }
}

fn user_ca(o: &Observed<'_>) -> Option<Result<CertificateAuthority, ReconcileError>> {
    o.mesh.spec.ca.secret_ref.as_ref()?;
    let name = desired_source(o.mesh, o.namespace)
        .trim_start_matches("secret/")
        .to_string();
    let Some(secret) = o.user_secret else {
        return Some(Err(ReconcileError::UserSecretMissing(name)));
    };
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    let (Some(crt), Some(key)) = (data_str(data, "tls.crt"), data_str(data, "tls.key")) else {
        return Some(Err(ReconcileError::UserSecretInvalid(
            name,
            "tls.crt and tls.key are required".into(),
        )));
    };
    Some(
        CertificateAuthority::from_pem(crt, key, data_str(data, "ca.crt"))
            .map_err(|e| ReconcileError::UserSecretInvalid(name, e.to_string())),
    )
}

fn root_validity(mesh: &Mesh) -> Result<Duration, ReconcileError> {
    Ok(mesh.spec.root_validity()?)
}

fn since(now: SystemTime, t: SystemTime) -> Duration {
    now.duration_since(t).unwrap_or_default()
}

/// Whether every meshed namespace's observed bundle is exactly `bundle`.
fn propagated(o: &Observed<'_>, bundle: &str) -> bool {
    o.meshed_namespaces.iter().all(|ns| {
        o.bundles.iter().any(|cm| {
            cm.namespace().as_deref() == Some(ns.as_str())
                && cm
                    .data
                    .as_ref()
                    .and_then(|d| d.get(TRUST_BUNDLE_KEY))
                    .is_some_and(|b| b == bundle)
        })
    })
}

/// One step of the state machine. Returns the (possibly) new state and, when waiting, how
/// long until the next step is due.
pub fn advance(
    st: CaState,
    o: &Observed<'_>,
    user: Option<&Arc<CertificateAuthority>>,
    workload_ttl: Duration,
) -> Result<(CaState, Option<Duration>), ReconcileError> {
    let now = o.now;
    let source = desired_source(o.mesh, o.namespace);
    let trigger = o
        .mesh
        .annotations()
        .get(ROTATE_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    let start = |st: CaState, next: Arc<CertificateAuthority>, reason: &str, trigger: String| {
        tracing::info!(reason, from = %st.active.fingerprint(), to = %next.fingerprint(), "starting root rotation");
        CaState {
            next: Some(next),
            stage: Stage::AddedNewRoot,
            since: now,
            reason: reason.to_string(),
            source: source.clone(),
            trigger,
            ..st
        }
    };
    let generate = || -> Result<Arc<CertificateAuthority>, ReconcileError> {
        CertificateAuthority::generate(&o.mesh.spec.trust_domain, root_validity(o.mesh)?, now)
            .map(Arc::new)
            .map_err(ReconcileError::Generate)
    };
    match st.stage {
        Stage::Idle => {
            if let Some(user) = user {
                if user.fingerprint() != st.active.fingerprint() {
                    let reason = if st.source == source {
                        "CASecretChanged"
                    } else {
                        "SourceChanged"
                    };
                    return Ok((start(st, user.clone(), reason, trigger), Some(PROPAGATION)));
                }
                if st.source != source {
                    // Same CA, now referenced by the Mesh: adopt without rotating.
                    return Ok((CaState { source, ..st }, None));
                }
                return Ok((st, None));
            }
            if source == "self-signed" {
                if st.source != source {
                    return Ok((
                        start(st, generate()?, "SourceChanged", trigger),
                        Some(PROPAGATION),
                    ));
                }
                let life = since(st.active.not_after(), st.active.not_before());
                let left = st
                    .active
                    .not_after()
                    .duration_since(now)
                    .unwrap_or_default();
                if left.as_secs_f64() < life.as_secs_f64() * ROTATE_AT_REMAINING {
                    return Ok((
                        start(st, generate()?, "RootNearExpiry", trigger),
                        Some(PROPAGATION),
                    ));
                }
                if !trigger.is_empty() && trigger != st.trigger {
                    return Ok((
                        start(st, generate()?, "Requested", trigger),
                        Some(PROPAGATION),
                    ));
                }
                let threshold = life.mul_f64(ROTATE_AT_REMAINING);
                return Ok((st, Some(left.saturating_sub(threshold))));
            }
            Ok((st, None))
        }
        Stage::AddedNewRoot => {
            let next = st.next.clone().expect("checked by from_secret");
            // The user's CA changed again before we switched: introduce the newest instead.
            if let Some(user) = user
                && user.fingerprint() != next.fingerprint()
                && user.fingerprint() != st.active.fingerprint()
            {
                return Ok((
                    start(st, user.clone(), "CASecretChanged", trigger),
                    Some(PROPAGATION),
                ));
            }
            // Kubelets need PROPAGATION after the last bundle write, not after the stage
            // began: until every bundle holds both roots, the clock does not run.
            if !propagated(o, &st.bundle_pem()) {
                let st = CaState {
                    bundles_synced: None,
                    ..st
                };
                return Ok((st, Some(Duration::from_secs(5))));
            }
            let synced = st.bundles_synced.unwrap_or(now);
            let waited = since(now, synced);
            if waited >= PROPAGATION {
                let previous = st.active.roots_pem().to_string();
                let retiring = st.max_ttl.max(workload_ttl);
                let st = CaState {
                    active: next,
                    next: None,
                    previous_pem: Some(previous),
                    stage: Stage::IssuingFromNew,
                    since: now,
                    max_ttl: workload_ttl,
                    retiring_max_ttl: Some(retiring),
                    bundles_synced: None,
                    ..st
                };
                return Ok((st, Some(retiring + CLOCK_SKEW_BACKDATE)));
            }
            let st = CaState {
                bundles_synced: Some(synced),
                ..st
            };
            Ok((
                st,
                Some(
                    PROPAGATION
                        .saturating_sub(waited)
                        .max(Duration::from_secs(5)),
                ),
            ))
        }
        Stage::IssuingFromNew => {
            // The retiring root's longest recorded TTL, not the current one: a TTL lowered
            // mid-rotation does not shorten certificates the old root already signed.
            let wait = st.retiring_max_ttl.unwrap_or(workload_ttl) + CLOCK_SKEW_BACKDATE;
            let waited = since(now, st.since);
            if waited >= wait {
                let st = CaState {
                    previous_pem: None,
                    stage: Stage::RemovedOldRoot,
                    since: now,
                    retiring_max_ttl: None,
                    ..st
                };
                return Ok((st, Some(PROPAGATION)));
            }
            Ok((st, Some(wait - waited)))
        }
        Stage::RemovedOldRoot => {
            let waited = since(now, st.since);
            if waited >= PROPAGATION && propagated(o, &st.bundle_pem()) {
                let st = CaState {
                    stage: Stage::Idle,
                    since: now,
                    ..st
                };
                return Ok((st, None));
            }
            Ok((
                st,
                Some(
                    PROPAGATION
                        .saturating_sub(waited)
                        .max(Duration::from_secs(5)),
                ),
            ))
        }
    }
}

fn not_ready(reason: &str, message: String, generation: Option<i64>) -> Condition {
    Condition::new(
        CA_READY,
        ConditionStatus::False,
        reason,
        message,
        generation,
    )
}

/// The trust bundle ConfigMap for `namespace`.
pub fn bundle_configmap(namespace: &str, bundle_pem: &str, mesh: &Mesh) -> ConfigMap {
    let owner = mesh.controller_owner_ref(&()).map(|mut r: OwnerReference| {
        r.controller = Some(true);
        r
    });
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(TRUST_BUNDLE.into()),
            namespace: Some(namespace.into()),
            labels: Some(
                [MANAGED_BY, COMPONENT]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        data: Some([(TRUST_BUNDLE_KEY.to_string(), bundle_pem.to_string())].into()),
        ..Default::default()
    }
}

/// The reconcile.
pub fn reconcile(o: &Observed<'_>) -> Desired {
    let generation = o.mesh.meta().generation;
    // Both durations are checked before anything is generated or signed: out of range they
    // are refused here with the field and range (the CRD's CEL rules say the same).
    let workload_ttl = match o.mesh.spec.workload_cert_ttl() {
        Ok(t) => t,
        Err(e) => {
            return Desired::unchanged(not_ready("InvalidDuration", e.to_string(), generation));
        }
    };
    if o.mesh.spec.ca.secret_ref.is_none()
        && let Err(e) = o.mesh.spec.root_validity()
    {
        return Desired::unchanged(not_ready("InvalidDuration", e.to_string(), generation));
    }
    let user = match user_ca(o) {
        None => Ok(None),
        Some(Ok(ca)) => Ok(Some(Arc::new(ca))),
        Some(Err(e)) => Err(e),
    };
    let user_ok = user.as_ref().ok().cloned().flatten();

    // Current state: from the Secret, or a first CA.
    let fresh = |active: Arc<CertificateAuthority>, source: String| CaState {
        active,
        next: None,
        previous_pem: None,
        stage: Stage::Idle,
        since: o.now,
        source,
        reason: "Created".into(),
        trigger: o
            .mesh
            .annotations()
            .get(ROTATE_ANNOTATION)
            .cloned()
            .unwrap_or_default(),
        max_ttl: workload_ttl,
        retiring_max_ttl: None,
        bundles_synced: None,
    };
    let state = match (o.ca_secret, &user) {
        (Some(secret), _) => CaState::from_secret(secret),
        (None, Ok(Some(u))) => Ok(fresh(u.clone(), desired_source(o.mesh, o.namespace))),
        (None, Err(e)) => Err(ReconcileError::UserSecretInvalid(
            desired_source(o.mesh, o.namespace),
            e.to_string(),
        )),
        (None, Ok(None)) => root_validity(o.mesh).and_then(|v| {
            CertificateAuthority::generate(&o.mesh.spec.trust_domain, v, o.now)
                .map_err(ReconcileError::Generate)
                .map(|ca| fresh(Arc::new(ca), "self-signed".into()))
        }),
    };
    let state = match state {
        Ok(s) => s,
        Err(e) => {
            // Nothing usable: change nothing (never overwrite a Secret we cannot read).
            let (reason, message) = match (&user, o.ca_secret) {
                (Err(u), None) => (u.reason(), u.to_string()),
                _ => (e.reason(), e.to_string()),
            };
            return Desired::unchanged(not_ready(reason, message, generation));
        }
    };

    // The signing root is used with the current TTL from now on: remember the longest.
    let state = CaState {
        max_ttl: state.max_ttl.max(workload_ttl),
        ..state
    };
    let (state, requeue) = match advance(state.clone(), o, user_ok.as_ref(), workload_ttl) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "root rotation step failed; keeping the current state");
            (state, Some(Duration::from_secs(60)))
        }
    };

    let bundle = state.bundle_pem();
    let secret = state.to_secret(o.namespace);
    let secret_changed = o
        .ca_secret
        .is_none_or(|old| old.data != secret.data || !annotations_match(old, &secret));
    let mut bundles = Vec::new();
    for ns in o.meshed_namespaces {
        let cm = bundle_configmap(ns, &bundle, o.mesh);
        let current = o
            .bundles
            .iter()
            .find(|b| b.namespace().as_deref() == Some(ns.as_str()));
        if current.is_none_or(|c| c.data != cm.data || c.labels() != cm.labels()) {
            bundles.push(cm);
        }
    }
    let meshed: BTreeSet<&str> = o.meshed_namespaces.iter().map(String::as_str).collect();
    let delete_bundles = o
        .bundles
        .iter()
        .filter(|b| b.labels().get(MANAGED_BY.0).map(String::as_str) == Some(MANAGED_BY.1))
        .filter_map(|b| b.namespace())
        .filter(|ns| !meshed.contains(ns.as_str()))
        .collect();

    let condition = match &user {
        Err(e) => Condition::new(
            CA_READY,
            ConditionStatus::False,
            e.reason(),
            format!(
                "{e}; still signing with root {}",
                state.active.fingerprint()
            ),
            generation,
        ),
        Ok(_) => Condition::new(
            CA_READY,
            ConditionStatus::True,
            if state.stage == Stage::Idle {
                "Ready"
            } else {
                "Rotating"
            },
            match state.stage {
                Stage::Idle => format!("signing with root {}", state.active.fingerprint()),
                s => format!(
                    "root rotation ({}): stage {}, signing with {}",
                    state.reason,
                    s.as_str(),
                    state.active.fingerprint()
                ),
            },
            generation,
        ),
    };
    Desired {
        ca_secret: secret_changed.then_some(secret),
        bundles,
        delete_bundles,
        issuer: Some(IssuerState {
            ca: state.active.clone(),
            trust_bundle_pem: bundle,
            trust_domain: o.mesh.spec.trust_domain.clone(),
            workload_ttl,
        }),
        condition,
        ca_status: Some(CaStatus {
            fingerprint: state.active.fingerprint().to_string(),
            not_after: rfc3339(state.active.not_after()),
            rotation: (state.stage != Stage::Idle).then(|| state.stage.as_str().to_string()),
        }),
        requeue_after: requeue.map(|d| d.min(Duration::from_secs(3600))),
    }
}

fn annotations_match(old: &Secret, new: &Secret) -> bool {
    new.annotations()
        .iter()
        .all(|(k, v)| old.annotations().get(k) == Some(v))
}

/// Applies a [`Desired`] with server-side apply (field manager `trellis-operator`) and deletes
/// bundles of namespaces that left the mesh. The status is written by the status writer.
pub async fn apply(client: &kube::Client, desired: &Desired) -> Result<(), ReconcileError> {
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let write = |object: String| move |source| ReconcileError::Write { object, source };
    if let Some(secret) = &desired.ca_secret {
        let ns = secret.metadata.namespace.as_deref().unwrap_or_default();
        Api::<Secret>::namespaced(client.clone(), ns)
            .patch(CA_SECRET, &pp, &Patch::Apply(with_type_meta(secret)))
            .await
            .map_err(write(format!("Secret {ns}/{CA_SECRET}")))?;
    }
    for cm in &desired.bundles {
        let ns = cm.metadata.namespace.as_deref().unwrap_or_default();
        Api::<ConfigMap>::namespaced(client.clone(), ns)
            .patch(TRUST_BUNDLE, &pp, &Patch::Apply(with_type_meta(cm)))
            .await
            .map_err(write(format!("ConfigMap {ns}/{TRUST_BUNDLE}")))?;
    }
    for ns in &desired.delete_bundles {
        match Api::<ConfigMap>::namespaced(client.clone(), ns)
            .delete(TRUST_BUNDLE, &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(write(format!("deleting ConfigMap {ns}/{TRUST_BUNDLE}"))(e)),
        }
    }
    Ok(())
}

/// Server-side apply needs `apiVersion` and `kind` in the body.
fn with_type_meta<K>(obj: &K) -> serde_json::Value
where
    K: Resource<DynamicType = ()> + serde::Serialize,
{
    let mut v = serde_json::to_value(obj).unwrap_or_default();
    v["apiVersion"] = K::api_version(&()).into();
    v["kind"] = K::kind(&()).into();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MeshSpec;

    const HOUR: Duration = Duration::from_secs(3600);

    fn mesh(spec: serde_json::Value) -> Mesh {
        let spec: MeshSpec = serde_json::from_value(spec).unwrap();
        let mut m = Mesh::new("default", spec);
        m.metadata.generation = Some(3);
        m.metadata.uid = Some("0b7c-mesh-uid".into());
        m
    }

    fn user_secret(ca: &CertificateAuthority) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("my-ca".into()),
                namespace: Some("cert-manager".into()),
                ..Default::default()
            },
            data: Some(
                [
                    ("tls.crt", ca.cert_pem()),
                    ("tls.key", ca.key_pem()),
                    ("ca.crt", ca.roots_pem()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
            ),
            ..Default::default()
        }
    }

    /// A tiny stand-in for the API server's storage: applies each Desired like the applier.
    struct World {
        mesh: Mesh,
        ca_secret: Option<Secret>,
        user_secret: Option<Secret>,
        namespaces: Vec<String>,
        bundles: Vec<ConfigMap>,
        now: SystemTime,
        /// Namespaces whose bundle update is not applied yet (a slow apply).
        lagging: Vec<String>,
    }

    impl World {
        fn new(mesh: Mesh) -> Self {
            Self {
                mesh,
                ca_secret: None,
                user_secret: None,
                namespaces: vec!["shop".into(), "web".into()],
                bundles: Vec::new(),
                now: SystemTime::now(),
                lagging: Vec::new(),
            }
        }

        fn step(&mut self) -> Desired {
            let d = reconcile(&Observed {
                mesh: &self.mesh,
                namespace: OPERATOR_NAMESPACE,
                ca_secret: self.ca_secret.as_ref(),
                user_secret: self.user_secret.as_ref(),
                meshed_namespaces: &self.namespaces,
                bundles: &self.bundles,
                now: self.now,
            });
            if let Some(s) = &d.ca_secret {
                self.ca_secret = Some(s.clone());
            }
            for cm in &d.bundles {
                let ns = cm.namespace().unwrap();
                if self.lagging.contains(&ns) {
                    continue;
                }
                self.bundles.retain(|b| b.namespace() != Some(ns.clone()));
                self.bundles.push(cm.clone());
            }
            self.bundles
                .retain(|b| !d.delete_bundles.contains(&b.namespace().unwrap()));
            d
        }

        fn advance(&mut self, by: Duration) -> Desired {
            self.now += by;
            self.step()
        }

        fn stage(&self) -> Stage {
            CaState::from_secret(self.ca_secret.as_ref().unwrap())
                .unwrap()
                .stage
        }

        fn bundle_roots(&self, ns: &str) -> usize {
            let cm = self
                .bundles
                .iter()
                .find(|b| b.namespace().as_deref() == Some(ns))
                .unwrap();
            parse_certs(&cm.data.as_ref().unwrap()[TRUST_BUNDLE_KEY])
                .unwrap()
                .len()
        }
    }

    fn fp(d: &Desired) -> String {
        d.issuer.as_ref().unwrap().ca.fingerprint().to_string()
    }

    #[test]
    fn creates_a_self_signed_root_and_bundles_then_is_idempotent() {
        let mut w = World::new(mesh(
            // A 100 h root needs TTLs of at most 20 h: its last fifth must hold a rotation.
            serde_json::json!({"workloadCertTtl": "20h", "ca": {"selfSigned": {"rootValidity": "100h"}}}),
        ));
        let d = w.step();
        let secret = d.ca_secret.as_ref().expect("CA Secret created");
        assert_eq!(
            secret.metadata.namespace.as_deref(),
            Some(OPERATOR_NAMESPACE)
        );
        assert!(secret.metadata.owner_references.is_none());
        assert_eq!(d.bundles.len(), 2);
        let cm = &d.bundles[0];
        assert_eq!(cm.metadata.name.as_deref(), Some(TRUST_BUNDLE));
        let pem = &cm.data.as_ref().unwrap()[TRUST_BUNDLE_KEY];
        assert!(
            !pem.contains("PRIVATE KEY"),
            "bundles hold public roots only"
        );
        assert_eq!(
            cm.metadata.owner_references.as_ref().unwrap()[0].kind,
            "Mesh"
        );
        assert_eq!(d.condition.status, ConditionStatus::True);
        assert_eq!(d.condition.reason, "Ready");
        assert_eq!(d.condition.observed_generation, Some(3));
        let status = d.ca_status.as_ref().unwrap();
        assert_eq!(status.fingerprint, fp(&d));
        assert!(status.rotation.is_none());
        let na: jiff::Timestamp = status.not_after.parse().unwrap();
        let want = jiff::Timestamp::try_from(w.now + 100 * HOUR).unwrap();
        assert!((na.as_second() - want.as_second()).abs() <= 1);
        assert_eq!(d.issuer.as_ref().unwrap().workload_ttl, 20 * HOUR);
        // Requeue when 20 % of the lifetime is left (80 h from now).
        let rq = d.requeue_after.unwrap();
        assert_eq!(rq, HOUR, "capped at an hour");

        let again = w.advance(Duration::from_secs(30));
        assert!(again.ca_secret.is_none(), "no change, no apply");
        assert!(again.bundles.is_empty());
        assert_eq!(fp(&again), fp(&d));
    }

    #[test]
    fn bundles_follow_meshed_namespaces() {
        let mut w = World::new(mesh(serde_json::json!({})));
        w.step();
        // An unmanaged ConfigMap with our name (a user's) is never deleted.
        let mut foreign = bundle_configmap("other", "x", &w.mesh);
        foreign.metadata.labels = None;
        w.bundles.push(foreign);
        w.namespaces = vec!["shop".into(), "api".into()];
        let d = w.advance(Duration::from_secs(1));
        assert_eq!(d.bundles.len(), 1);
        assert_eq!(d.bundles[0].namespace().as_deref(), Some("api"));
        assert_eq!(d.delete_bundles, vec!["web".to_string()]);
    }

    #[test]
    fn rotation_walks_every_stage_and_survives_restarts() {
        let mut w = World::new(mesh(serde_json::json!({"workloadCertTtl": "30m"})));
        let first = w.step();
        let old = fp(&first);
        assert_eq!(w.stage(), Stage::Idle);

        // Trigger: the Mesh annotation.
        w.mesh
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(ROTATE_ANNOTATION.into(), "2026-11-25".into());
        w.lagging = vec!["web".into()];
        let d = w.advance(Duration::from_secs(1));
        assert_eq!(w.stage(), Stage::AddedNewRoot);
        assert_eq!(fp(&d), old, "still signing with the old root");
        assert_eq!(
            d.ca_status.as_ref().unwrap().rotation.as_deref(),
            Some("AddedNewRoot")
        );
        assert_eq!(d.condition.reason, "Rotating");
        assert!(d.condition.message.contains("Requested"));
        assert_eq!(w.bundle_roots("shop"), 2);
        assert_eq!(
            parse_certs(&d.issuer.as_ref().unwrap().trust_bundle_pem)
                .unwrap()
                .len(),
            2
        );
        assert_eq!(d.requeue_after, Some(PROPAGATION));

        // Not before the propagation time...
        w.lagging.clear();
        w.advance(Duration::from_secs(60));
        assert_eq!(w.stage(), Stage::AddedNewRoot);
        // ...and not while a namespace's bundle lacks the new root.
        w.lagging = vec!["web".into()];
        w.bundles
            .retain(|b| b.namespace().as_deref() != Some("web"));
        w.advance(Duration::from_secs(120));
        assert_eq!(
            w.stage(),
            Stage::AddedNewRoot,
            "web never got the new bundle"
        );
        w.lagging.clear();
        w.advance(Duration::from_secs(1)); // applies web's bundle
        assert_eq!(w.bundle_roots("web"), 2);
        // Issue 13 item 9: the stage began long ago, but web's bundle was written just now:
        // kubelets there need the propagation time from this write.
        w.advance(Duration::from_secs(1));
        assert_eq!(
            w.stage(),
            Stage::AddedNewRoot,
            "web's bundle was written 1 s ago"
        );
        w.advance(PROPAGATION - Duration::from_secs(1));
        assert_eq!(w.stage(), Stage::AddedNewRoot);
        let d = w.advance(Duration::from_secs(1));
        assert_eq!(w.stage(), Stage::IssuingFromNew);
        let new = fp(&d);
        assert_ne!(new, old, "signing switched to the new root");
        assert_eq!(w.bundle_roots("shop"), 2, "old root still trusted");
        assert_eq!(d.requeue_after, Some(HOUR / 2 + CLOCK_SKEW_BACKDATE));

        // A restart mid-rotation: only the Secret survives.
        let restored = CaState::from_secret(w.ca_secret.as_ref().unwrap()).unwrap();
        assert_eq!(restored.stage, Stage::IssuingFromNew);
        assert_eq!(restored.active.fingerprint(), new);
        assert_eq!(parse_certs(&restored.bundle_pem()).unwrap().len(), 2);

        // Old-root leaves may live for the workload lifetime (+ backdate).
        w.advance(HOUR / 2);
        assert_eq!(w.stage(), Stage::IssuingFromNew);
        let d = w.advance(CLOCK_SKEW_BACKDATE);
        assert_eq!(w.stage(), Stage::RemovedOldRoot);
        assert_eq!(w.bundle_roots("shop"), 1);
        assert_eq!(w.bundle_roots("web"), 1);
        assert_eq!(fp(&d), new);
        assert!(
            !w.ca_secret
                .as_ref()
                .unwrap()
                .data
                .as_ref()
                .unwrap()
                .contains_key("previous.crt")
        );

        w.advance(Duration::from_secs(119));
        assert_eq!(w.stage(), Stage::RemovedOldRoot);
        let d = w.advance(Duration::from_secs(1));
        assert_eq!(w.stage(), Stage::Idle);
        assert!(d.ca_status.as_ref().unwrap().rotation.is_none());
        assert_eq!(d.condition.reason, "Ready");
        // The handled trigger does not rotate again.
        w.advance(Duration::from_secs(600));
        assert_eq!(w.stage(), Stage::Idle);
    }

    /// Issue 13 item 9: lowering workloadCertTtl while the new root issues does not shorten
    /// how long the old root stays trusted: its certificates were signed with the old TTL.
    #[test]
    fn the_old_root_is_kept_for_the_longest_ttl_it_signed_with() {
        let mut w = World::new(mesh(serde_json::json!({"workloadCertTtl": "24h"})));
        w.step();
        w.mesh
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(ROTATE_ANNOTATION.into(), "now".into());
        w.advance(Duration::from_secs(1));
        assert_eq!(w.stage(), Stage::AddedNewRoot);
        w.advance(Duration::from_secs(1));
        let d = w.advance(PROPAGATION);
        assert_eq!(w.stage(), Stage::IssuingFromNew);
        assert!(d.issuer.is_some());
        let ann = w.ca_secret.as_ref().unwrap().annotations().clone();
        assert_eq!(ann[A_RETIRING_MAX_TTL], "86400");
        // The TTL is lowered right after the switch.
        w.mesh.spec.workload_cert_ttl = "1h".into();
        w.advance(HOUR + CLOCK_SKEW_BACKDATE);
        assert_eq!(
            w.stage(),
            Stage::IssuingFromNew,
            "old-root certificates issued for 24 h are still alive"
        );
        assert_eq!(w.bundle_roots("shop"), 2);
        w.advance(23 * HOUR);
        assert_eq!(w.stage(), Stage::RemovedOldRoot);
        // The new root began signing while the TTL was still 24 h: it records that too.
        let ann = w.ca_secret.as_ref().unwrap().annotations().clone();
        assert_eq!(ann[A_MAX_TTL], "86400");
        assert!(!ann.contains_key(A_RETIRING_MAX_TTL));
    }

    /// Raising the TTL while the old root still signs raises what it records.
    #[test]
    fn the_signing_roots_longest_ttl_is_recorded() {
        let mut w = World::new(mesh(serde_json::json!({"workloadCertTtl": "1h"})));
        w.step();
        w.mesh.spec.workload_cert_ttl = "48h".into();
        w.advance(Duration::from_secs(1));
        w.mesh.spec.workload_cert_ttl = "2h".into();
        w.advance(Duration::from_secs(1));
        let ann = w.ca_secret.as_ref().unwrap().annotations().clone();
        assert_eq!(ann[A_MAX_TTL], (48 * 3600).to_string());
        let st = CaState::from_secret(w.ca_secret.as_ref().unwrap()).unwrap();
        assert_eq!(st.max_ttl, 48 * HOUR);
    }

    #[test]
    fn root_near_expiry_starts_a_rotation() {
        let mut w = World::new(mesh(
            // A 100 h root needs TTLs of at most 20 h: its last fifth must hold a rotation.
            serde_json::json!({"workloadCertTtl": "20h", "ca": {"selfSigned": {"rootValidity": "100h"}}}),
        ));
        w.step();
        w.advance(79 * HOUR);
        assert_eq!(w.stage(), Stage::Idle);
        let d = w.advance(2 * HOUR);
        assert_eq!(w.stage(), Stage::AddedNewRoot);
        assert!(
            d.condition.message.contains("RootNearExpiry"),
            "{}",
            d.condition.message
        );
    }

    /// Issue 13 item 6: a huge rootValidity or a 0s TTL is reported in CAReady with the field
    /// and the range; nothing is created, and the leader does not panic.
    #[test]
    fn out_of_range_durations_are_reported_not_acted_on() {
        for (spec, field) in [
            (
                serde_json::json!({"ca": {"selfSigned": {"rootValidity": "99999999999h"}}}),
                "spec.ca.selfSigned.rootValidity \"99999999999h\" is out of range",
            ),
            (
                serde_json::json!({"workloadCertTtl": "0s"}),
                "spec.workloadCertTtl \"0s\" is out of range: it must be between 10m and 2160h",
            ),
        ] {
            let mut w = World::new(mesh(spec));
            let d = w.step();
            assert_eq!(d.condition.status, ConditionStatus::False);
            assert_eq!(d.condition.reason, "InvalidDuration");
            assert!(
                d.condition.message.contains(field),
                "{}",
                d.condition.message
            );
            assert!(d.ca_secret.is_none() && d.bundles.is_empty() && d.issuer.is_none());
        }
    }

    #[test]
    fn user_supplied_ca_is_adopted_then_rotated_when_its_secret_changes() {
        let now = SystemTime::now();
        let ca1 = CertificateAuthority::generate("cluster.local", 1000 * HOUR, now).unwrap();
        let ca2 = CertificateAuthority::generate("cluster.local", 1000 * HOUR, now).unwrap();
        let mut w = World::new(mesh(serde_json::json!({
            "workloadCertTtl": "10m",
            "ca": {"secretRef": {"name": "my-ca", "namespace": "cert-manager"}}
        })));
        w.user_secret = Some(user_secret(&ca1));
        let d = w.step();
        assert_eq!(fp(&d), ca1.fingerprint());
        assert_eq!(w.stage(), Stage::Idle);
        let ann = w.ca_secret.as_ref().unwrap().annotations().clone();
        assert_eq!(ann[A_SOURCE], "secret/cert-manager/my-ca");

        // cert-manager renews the CA: rotation without downtime, with the old key kept.
        w.user_secret = Some(user_secret(&ca2));
        let d = w.advance(Duration::from_secs(1));
        assert_eq!(w.stage(), Stage::AddedNewRoot);
        assert_eq!(
            fp(&d),
            ca1.fingerprint(),
            "old CA keeps signing from our copy"
        );
        assert!(d.condition.message.contains("CASecretChanged"));
        // The pass the bundle writes trigger (their watch) sees them everywhere: the
        // propagation wait runs from there.
        w.advance(Duration::from_secs(1));
        let d = w.advance(PROPAGATION);
        assert_eq!(w.stage(), Stage::IssuingFromNew);
        assert_eq!(fp(&d), ca2.fingerprint());
        w.advance(Duration::from_secs(600) + CLOCK_SKEW_BACKDATE);
        assert_eq!(w.stage(), Stage::RemovedOldRoot);
        w.advance(PROPAGATION);
        assert_eq!(w.stage(), Stage::Idle);
        assert_eq!(w.bundle_roots("shop"), 1);
    }

    #[test]
    fn switching_from_self_signed_to_a_user_ca_rotates() {
        let mut w = World::new(mesh(serde_json::json!({})));
        let d = w.step();
        let self_signed = fp(&d);
        let user = CertificateAuthority::generate("cluster.local", 1000 * HOUR, w.now).unwrap();
        w.mesh.spec.ca.secret_ref = Some(crate::api::mesh::CaSecretRef {
            name: "my-ca".into(),
            namespace: Some("cert-manager".into()),
        });
        w.user_secret = Some(user_secret(&user));
        let d = w.advance(Duration::from_secs(1));
        assert_eq!(w.stage(), Stage::AddedNewRoot);
        assert_eq!(fp(&d), self_signed);
        assert!(d.condition.message.contains("SourceChanged"));
    }

    #[test]
    fn missing_or_invalid_secrets_change_nothing() {
        // Referenced Secret missing at install: nothing created, CAReady False.
        let mut w = World::new(mesh(
            serde_json::json!({"ca": {"secretRef": {"name": "my-ca"}}}),
        ));
        let d = w.step();
        assert!(d.ca_secret.is_none() && d.bundles.is_empty() && d.issuer.is_none());
        assert_eq!(d.condition.status, ConditionStatus::False);
        assert_eq!(d.condition.reason, "CASecretNotFound");
        assert!(
            d.condition.message.contains("trellis-system/my-ca"),
            "{}",
            d.condition.message
        );

        // Present but without a key.
        let mut s = user_secret(&CertificateAuthority::generate("td", HOUR, w.now).unwrap());
        s.data.as_mut().unwrap().remove("tls.key");
        w.user_secret = Some(s);
        let d = w.step();
        assert_eq!(d.condition.reason, "InvalidCASecretRef");
        assert!(d.ca_secret.is_none());

        // A CA exists and the user's Secret breaks: keep signing, report it.
        let good = CertificateAuthority::generate("td", 100 * HOUR, w.now).unwrap();
        w.user_secret = Some(user_secret(&good));
        let d = w.step();
        assert_eq!(d.condition.status, ConditionStatus::True);
        w.user_secret
            .as_mut()
            .unwrap()
            .data
            .as_mut()
            .unwrap()
            .insert("tls.crt".into(), ByteString(b"junk".to_vec()));
        let d = w.advance(Duration::from_secs(1));
        assert_eq!(d.condition.status, ConditionStatus::False);
        assert_eq!(d.condition.reason, "InvalidCASecretRef");
        assert_eq!(fp(&d), good.fingerprint());
        assert_eq!(w.stage(), Stage::Idle);

        // Our own Secret corrupted: never overwritten.
        let mut w = World::new(mesh(serde_json::json!({})));
        w.step();
        w.ca_secret
            .as_mut()
            .unwrap()
            .data
            .as_mut()
            .unwrap()
            .insert("tls.key".into(), ByteString(b"junk".to_vec()));
        let d = w.advance(Duration::from_secs(1));
        assert!(d.ca_secret.is_none() && d.issuer.is_none() && d.bundles.is_empty());
        assert_eq!(d.condition.reason, "InvalidCASecret");
        let mut w2 = World::new(mesh(serde_json::json!({})));
        w2.step();
        w2.ca_secret
            .as_mut()
            .unwrap()
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(A_STAGE.into(), "Sideways".into());
        assert_eq!(w2.step().condition.reason, "InvalidCASecret");
    }
}
