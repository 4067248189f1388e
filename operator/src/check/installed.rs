//! Control-plane checks: the CRDs, the operator, its Lease, the Mesh, the injection webhook,
//! the trust anchors and the identity endpoint.

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::preinstall::{CrdView, ExpectedCrd};
use super::{Check, human_remaining};
use crate::api::Mesh;
use crate::api::conditions::{Condition, ConditionStatus};

/// Trust anchors closer than this to expiry are a warning: time to rotate the root.
pub const ANCHOR_WARN_SECS: i64 = 30 * 86_400;

/// The operator Deployment's replica counts and `Available` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeploymentView {
    pub desired: i32,
    pub available: i32,
    /// `(status, message)` of the `Available` condition.
    pub available_condition: Option<(String, String)>,
}

/// The leader-election Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseView {
    pub holder: Option<String>,
    /// Last renewal, Unix seconds.
    pub renewed_at: Option<i64>,
    pub duration_secs: Option<i32>,
}

/// An answer read through the API server's service or pod proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    /// The API server's own error (a `Status` object: no endpoints, connection refused), as
    /// opposed to any answer of the backend itself.
    pub fn api_server_error(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        (v["kind"] == "Status" && v["status"] == "Failure").then(|| {
            v["message"]
                .as_str()
                .unwrap_or("the API server could not reach it")
                .to_string()
        })
    }
}

/// What the control-plane checks read.
#[derive(Clone, Debug)]
pub struct Observed {
    pub operator_namespace: String,
    pub crds: Vec<(ExpectedCrd, Result<Option<CrdView>, String>)>,
    pub deployment: Result<Option<DeploymentView>, String>,
    pub lease: Result<Option<LeaseView>, String>,
    pub mesh: Result<Option<Mesh>, String>,
    /// The `caBundle` (PEM) of each webhook of `trellis-sidecar-injector`; `None` when it does
    /// not exist.
    pub webhook_bundles: Result<Option<Vec<String>>, String>,
    /// `GET /inject` on the webhook Service, through the API server's service proxy.
    pub webhook_answer: Result<Answer, String>,
    /// `GET /v1/certificate` on the identity Service, through the service proxy.
    pub identity_answer: Result<Answer, String>,
}

fn cannot_read(name: &str, what: &str, e: &str, rbac: &str) -> Check {
    Check::fail(
        name,
        format!("cannot read {what}: {e}"),
        format!("you need {rbac}"),
    )
}

fn check_crd(want: &ExpectedCrd, got: &Result<Option<CrdView>, String>) -> Check {
    let name = format!("CRD {} at {}", want.name, want.version);
    let apply = "apply this version's CRDs: `trellis crds | kubectl apply --server-side -f -`";
    match got {
        Err(e) => cannot_read(
            &name,
            "it",
            e,
            "get on customresourcedefinitions.apiextensions.k8s.io",
        ),
        Ok(None) => Check::fail(name, "not installed", apply),
        Ok(Some(c)) => {
            let v = c.versions.iter().find(|(n, _, _)| *n == want.version);
            match v {
                None => Check::fail(
                    name,
                    format!(
                        "the CRD has no version {} (it has {})",
                        want.version,
                        c.versions
                            .iter()
                            .map(|(n, _, _)| n.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    apply,
                ),
                Some((_, served, storage)) if !served || !storage => Check::fail(
                    name,
                    format!("{} is not served and stored", want.version),
                    apply,
                ),
                Some(_) if c.schema.as_ref() != Some(&want.schema) => Check::fail(
                    name,
                    "its schema differs from this trellis build's (another Trellis version)",
                    format!("{apply}, or use the trellis CLI of the installed version"),
                ),
                Some(_) => Check::pass(name, "installed, schema matches this build"),
            }
        }
    }
}

fn check_deployment(ns: &str, d: &Result<Option<DeploymentView>, String>) -> Check {
    let name = "operator Deployment available";
    let describe =
        format!("see `kubectl -n {ns} describe deploy/trellis-operator` and its pods' logs");
    match d {
        Err(e) => cannot_read(name, "it", e, &format!("get on deployments.apps in {ns}")),
        Ok(None) => Check::fail(
            name,
            format!("no Deployment {ns}/trellis-operator"),
            "install the operator: `kubectl apply -k config/default`",
        ),
        Ok(Some(d)) => {
            let cond_true = d
                .available_condition
                .as_ref()
                .is_some_and(|(s, _)| s == "True");
            let detail = format!("{}/{} replicas available", d.available, d.desired);
            if d.available < 1 || !cond_true {
                let why = d
                    .available_condition
                    .as_ref()
                    .map(|(_, m)| format!(": {m}"))
                    .unwrap_or_default();
                Check::fail(name, format!("{detail}{why}"), describe)
            } else if d.available < d.desired {
                Check::warn(
                    name,
                    detail,
                    format!(
                        "the webhook and identity endpoint run on fewer replicas than asked; {describe}"
                    ),
                )
            } else {
                Check::pass(name, detail)
            }
        }
    }
}

fn check_lease(ns: &str, l: &Result<Option<LeaseView>, String>, now: i64) -> Check {
    let name = "controllers' leader elected";
    let logs = format!("see `kubectl -n {ns} logs deploy/trellis-operator`");
    match l {
        Err(e) => cannot_read(
            name,
            "the Lease",
            e,
            &format!("get on leases.coordination.k8s.io in {ns}"),
        ),
        Ok(None) => Check::fail(
            name,
            format!("no Lease {ns}/trellis-operator: no replica has ever led"),
            logs,
        ),
        Ok(Some(l)) => match (&l.holder, l.renewed_at, l.duration_secs) {
            (Some(h), Some(at), Some(d)) if !h.is_empty() => {
                let stale = now - (at + i64::from(d));
                if stale > 0 {
                    Check::fail(
                        name,
                        format!("{h} holds the Lease but stopped renewing it {stale} s ago"),
                        format!("the controllers are not running; {logs}"),
                    )
                } else {
                    Check::pass(name, format!("{h} (renewed {} s ago)", (now - at).max(0)))
                }
            }
            _ => Check::fail(name, "the Lease has no holder", logs),
        },
    }
}

fn check_mesh(m: &Result<Option<Mesh>, String>) -> Check {
    let name = "Mesh default Ready";
    match m {
        Err(e) => cannot_read(name, "it", e, "get on meshes.trellis.dev"),
        Ok(None) => Check::fail(
            name,
            "no Mesh named default",
            "create it: `kubectl apply -f config/samples/trellis_v1alpha1_mesh.yaml`",
        ),
        Ok(Some(mesh)) => {
            let generation = mesh.metadata.generation;
            let conditions: &[Condition] = mesh
                .status
                .as_ref()
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default();
            let ready = conditions.iter().find(|c| c.type_ == "Ready");
            let explain = "see `kubectl get mesh default -o yaml` (status.conditions)";
            match ready {
                None => Check::fail(
                    name,
                    "no Ready condition yet: the operator has not processed the Mesh",
                    format!("check that the operator runs and leads; {explain}"),
                ),
                Some(r) if r.observed_generation != generation => Check::fail(
                    name,
                    format!(
                        "Ready is for generation {}, the Mesh is at generation {}",
                        r.observed_generation.map_or("?".into(), |g| g.to_string()),
                        generation.map_or("?".into(), |g| g.to_string())
                    ),
                    format!("the operator has not caught up with the last edit; {explain}"),
                ),
                Some(r) if r.status != ConditionStatus::True => {
                    let others: Vec<String> = conditions
                        .iter()
                        .filter(|c| c.type_ != "Ready" && c.status == ConditionStatus::False)
                        .map(|c| format!("{} ({}: {})", c.type_, c.reason, c.message))
                        .collect();
                    let detail = if others.is_empty() {
                        format!("Ready is {:?}: {}: {}", r.status, r.reason, r.message)
                    } else {
                        format!("Ready is {:?}; {}", r.status, others.join("; "))
                    };
                    Check::fail(name, detail, explain)
                }
                Some(_) => Check::pass(
                    name,
                    format!(
                        "Ready at generation {}",
                        generation.map_or("?".into(), |g| g.to_string())
                    ),
                ),
            }
        }
    }
}

/// `(SHA-256 fingerprint, notAfter in Unix seconds)` of every certificate in a PEM bundle.
pub fn bundle_certs(pem: &str) -> Result<Vec<(String, i64)>, String> {
    let mut out = Vec::new();
    for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let der = der.map_err(|e| format!("unreadable PEM: {e:?}"))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| format!("unreadable certificate: {e}"))?;
        out.push((
            crate::ca::authority::fingerprint(&der),
            cert.validity().not_after.timestamp(),
        ));
    }
    Ok(out)
}

fn check_webhook_bundle(
    bundles: &Result<Option<Vec<String>>, String>,
    mesh: &Result<Option<Mesh>, String>,
) -> Check {
    let name = "injection webhook configured with the current CA";
    let active = mesh
        .as_ref()
        .ok()
        .and_then(Option::as_ref)
        .and_then(|m| m.status.as_ref())
        .and_then(|s| s.ca.as_ref())
        .map(|c| c.fingerprint.clone());
    let wait = "the operator writes it once the CA is ready: see the Mesh's CAReady and WebhookReady conditions";
    match bundles {
        Err(e) => cannot_read(
            name,
            "it",
            e,
            "get on mutatingwebhookconfigurations.admissionregistration.k8s.io",
        ),
        Ok(None) => Check::fail(
            name,
            "no MutatingWebhookConfiguration trellis-sidecar-injector",
            wait,
        ),
        Ok(Some(b)) => {
            let Some(active) = active else {
                return Check::fail(name, "the Mesh reports no active root CA", wait);
            };
            let missing = b.iter().filter(|pem| {
                bundle_certs(pem).map_or(true, |certs| !certs.iter().any(|(f, _)| *f == active))
            });
            match missing.count() {
                0 => Check::pass(
                    name,
                    format!(
                        "{} webhooks trust root {}",
                        b.len(),
                        &active[..active.len().min(16)]
                    ),
                ),
                n => Check::fail(
                    name,
                    format!(
                        "{n} of {} webhooks' caBundle lacks the active root {}",
                        b.len(),
                        &active[..active.len().min(16)]
                    ),
                    "the API server cannot verify the webhook: the operator rewrites it within seconds; if it stays, see the Mesh's WebhookReady condition",
                ),
            }
        }
    }
}

fn check_anchors(bundles: &Result<Option<Vec<String>>, String>, now: i64) -> Option<Check> {
    let name = "trust anchors valid";
    let pem = bundles.as_ref().ok()?.as_ref()?.first()?;
    Some(match bundle_certs(pem) {
        Err(e) => Check::fail(
            name,
            e,
            "the trust bundle is corrupt: see the Mesh's CAReady condition",
        ),
        Ok(certs) if certs.is_empty() => Check::fail(
            name,
            "the trust bundle is empty",
            "see the Mesh's CAReady condition",
        ),
        Ok(certs) => {
            let soonest = certs.iter().map(|(_, t)| *t).min().unwrap_or(0);
            let left = soonest - now;
            let detail = format!(
                "{} root(s), the first expires in {}",
                certs.len(),
                human_remaining(left)
            );
            if left <= 0 {
                Check::fail(
                    name,
                    format!(
                        "{} root(s), one expired {} ago",
                        certs.len(),
                        human_remaining(-left)
                    ),
                    "workloads cannot verify each other: rotate the root (annotate the Mesh with trellis.dev/rotate-root) or replace the CA Secret",
                )
            } else if left < ANCHOR_WARN_SECS {
                Check::warn(
                    name,
                    detail,
                    "rotate the root before it expires (annotate the Mesh with trellis.dev/rotate-root)",
                )
            } else {
                Check::pass(name, detail)
            }
        }
    })
}

fn check_answer(name: &str, svc: &str, a: &Result<Answer, String>) -> Check {
    match a {
        Err(e) => Check::fail(
            name,
            format!("no answer through the API server: {e}"),
            format!("you need get on services/proxy; check the Service {svc}"),
        ),
        Ok(a) => match a.api_server_error() {
            Some(m) => Check::fail(
                name,
                format!("the API server could not reach it: {m}"),
                format!("check the Service {svc} and that operator pods are ready"),
            ),
            None => Check::pass(name, format!("answered (HTTP {})", a.status)),
        },
    }
}

/// The control-plane checks, in the order they are shown. `now` is Unix seconds.
pub fn checks(o: &Observed, now: i64) -> Vec<Check> {
    let ns = &o.operator_namespace;
    let svc = format!("{ns}/trellis-operator");
    let mut out: Vec<Check> = o.crds.iter().map(|(w, g)| check_crd(w, g)).collect();
    out.push(check_deployment(ns, &o.deployment));
    out.push(check_lease(ns, &o.lease, now));
    out.push(check_mesh(&o.mesh));
    out.push(check_webhook_bundle(&o.webhook_bundles, &o.mesh));
    out.push(check_answer(
        "injection webhook reachable",
        &svc,
        &o.webhook_answer,
    ));
    out.extend(check_anchors(&o.webhook_bundles, now));
    out.push(check_answer(
        "identity endpoint answering",
        &svc,
        &o.identity_answer,
    ));
    out
}
