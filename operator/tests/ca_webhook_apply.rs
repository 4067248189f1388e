//! The CA controller's pass ([`reconcile_once`]) against recorded API exchanges: what reaches
//! the API server for the injection webhook's configuration, and what the Mesh then reports as
//! `WebhookReady`. The webhook is what makes pods get a sidecar, and its `caBundle` is what lets
//! the API server trust the operator's serving certificate, so a stale bundle after a rotation or
//! a silent apply failure means pods stop being created (failurePolicy Fail) or stop being meshed
//! (Ignore). Each request is checked for method, path and body, in order; "no further request"
//! is proven by seeing every client handle dropped.

mod recorded;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use http::Method;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use serde_json::{Value, json};
use trellis_operator::api::conditions::{Condition, ConditionStatus};
use trellis_operator::api::{Mesh, MeshSpec, MeshStatus};
use trellis_operator::ca::controller::{
    DEBOUNCE, RESYNC, RETRY, WEBHOOK_READY, drive, reconcile_once,
};
use trellis_operator::ca::reconcile::{self, Observed};
use trellis_operator::status::StatusWriter;

use recorded::{ApiServer, Exchange, api_status, mock, verifier};

const NOW: &str = "2026-11-25T17:00:00Z";
const EARLIER: &str = "2026-11-25T16:00:00Z";

const MESH: &str = "/apis/trellis.dev/v1alpha1/meshes/default";
const MESH_STATUS: &str = "/apis/trellis.dev/v1alpha1/meshes/default/status?&force=true&fieldManager=trellis-operator%2Fca";
const CA_SECRET: &str = "/api/v1/namespaces/trellis-system/secrets/trellis-ca";
const CA_SECRET_APPLY: &str = "/api/v1/namespaces/trellis-system/secrets/trellis-ca?&force=true&fieldManager=trellis-operator";
const NAMESPACES: &str = "/api/v1/namespaces?";
const BUNDLES: &str = "/api/v1/configmaps?&labelSelector=trellis.dev%2Fcomponent%3Dtrust-bundle";
const SHOP_BUNDLE_APPLY: &str = "/api/v1/namespaces/shop/configmaps/trellis-trust-bundle?&force=true&fieldManager=trellis-operator";
const WEBHOOK_APPLY: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/trellis-sidecar-injector?&force=true&fieldManager=trellis-operator";

fn get(path: &str, reply: Value) -> Exchange {
    Exchange {
        method: Method::GET,
        path_and_query: path.into(),
        check: Box::new(|_| {}),
        status: 200,
        reply,
    }
}

fn not_found(path: &str) -> Exchange {
    Exchange {
        status: 404,
        ..get(
            path,
            api_status(404, "NotFound", "secrets \"trellis-ca\" not found"),
        )
    }
}

/// A server-side apply; the reply echoes the body, as the API server would.
fn apply(path: &str, check: impl FnOnce(&Value) + Send + 'static) -> Exchange {
    Exchange {
        method: Method::PATCH,
        path_and_query: path.into(),
        check: Box::new(check),
        status: 200,
        reply: Value::Null,
    }
}

/// Runs one pass of an operator in `trellis-system` against `expected`; returns what the pass
/// returned.
async fn run_pass(expected: Vec<Exchange>) -> Result<Duration, String> {
    run_pass_in("trellis-system", expected).await
}

/// Runs one pass of an operator in `namespace` against `expected`.
async fn run_pass_in(namespace: &str, expected: Vec<Exchange>) -> Result<Duration, String> {
    let (client, handle) = mock();
    let v = verifier(handle, expected);
    let status =
        StatusWriter::with_clock(client.clone(), Arc::new(|| NOW.to_string())).for_controller("ca");
    let out = reconcile_once(&client, &status, namespace)
        .await
        .map_err(|e| e.to_string());
    drop((client, status));
    v.await.unwrap();
    out
}

/// The Mesh: `failurePolicy: Ignore` and an extra excluded namespace, so the webhook body can
/// only be right if it follows the Mesh rather than the defaults.
fn mesh() -> Mesh {
    let spec: MeshSpec = serde_json::from_value(json!({
        "injection": {"failurePolicy": "Ignore", "excludedNamespaces": ["legacy"]}
    }))
    .unwrap();
    let mut m = Mesh::new("default", spec);
    m.metadata.uid = Some("mesh-uid".into());
    m.metadata.generation = Some(2);
    m.metadata.resource_version = Some("41".into());
    m
}

fn namespaces() -> Value {
    let ns = |name: &str, labels: &[(&str, &str)]| {
        let mut n = Namespace::default();
        n.metadata.name = Some(name.into());
        n.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .chain([("kubernetes.io/metadata.name".to_string(), name.to_string())])
                .collect(),
        );
        serde_json::to_value(n).unwrap()
    };
    json!({
        "apiVersion": "v1", "kind": "NamespaceList", "metadata": {"resourceVersion": "9"},
        "items": [
            ns("kube-system", &[]),
            ns("trellis-system", &[]),
            ns("shop", &[("trellis.dev/inject", "enabled")]),
        ]
    })
}

fn configmap_list(items: &[ConfigMap]) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMapList", "metadata": {"resourceVersion": "9"},
           "items": items})
}

/// The state a previous pass left behind: the CA Secret, the shop bundle, and the Mesh status
/// reporting both conditions since [`EARLIER`].
struct Converged {
    mesh: Mesh,
    secret: Secret,
    bundle: ConfigMap,
    bundle_pem: String,
}

fn converged() -> Converged {
    let mut m = mesh();
    let first = reconcile::reconcile(&Observed {
        mesh: &m,
        namespace: "trellis-system",
        ca_secret: None,
        user_secret: None,
        meshed_namespaces: &["shop".to_string()],
        bundles: &[],
        now: SystemTime::now(),
    });
    let mut secret = first.ca_secret.clone().unwrap();
    secret.metadata.resource_version = Some("12".into());
    let bundle = first.bundles[0].clone();
    let bundle_pem = first.issuer.as_ref().unwrap().trust_bundle_pem.clone();
    let at_earlier = |c: Condition| Condition {
        last_transition_time: EARLIER.into(),
        ..c
    };
    m.status = Some(MeshStatus {
        conditions: vec![
            at_earlier(first.condition.clone()),
            at_earlier(Condition::new(
                WEBHOOK_READY,
                ConditionStatus::True,
                "Configured",
                "trellis-sidecar-injector points at the operator with the current CA bundle",
                Some(2),
            )),
        ],
        observed_generation: Some(2),
        ca: first.ca_status.clone(),
        proxies: None,
        rollout: None,
        propagation: None,
    });
    Converged {
        mesh: m,
        secret,
        bundle,
        bundle_pem,
    }
}

/// The PEM a `caBundle` (base64 in JSON) carries.
fn ca_bundle_pem(webhook: &Value) -> String {
    let b64 = webhook["clientConfig"]["caBundle"]
        .as_str()
        .unwrap_or_else(|| panic!("no caBundle in {webhook}"));
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

/// The Secret's `ca.crt` (base64 in JSON) as PEM.
fn secret_bundle_pem(secret: &Value) -> String {
    let b64 = secret["data"]["ca.crt"].as_str().unwrap();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

/// Checks the fields of the applied configuration a user depends on, for the trust bundle
/// `bundle`: both webhooks call the operator with that bundle, with the Mesh's failure policy,
/// and never for the system namespaces, the operator's own or the Mesh's excluded ones.
fn assert_webhook_configuration(body: &Value, bundle: &str) {
    assert_eq!(body["apiVersion"], "admissionregistration.k8s.io/v1");
    assert_eq!(body["kind"], "MutatingWebhookConfiguration");
    assert_eq!(body["metadata"]["name"], "trellis-sidecar-injector");
    assert_eq!(
        body["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "trellis-operator"
    );
    let webhooks = body["webhooks"].as_array().unwrap();
    let names: Vec<_> = webhooks
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["namespace.inject.trellis.dev", "pod.inject.trellis.dev"]
    );
    for w in webhooks {
        assert_eq!(ca_bundle_pem(w), bundle, "{}", w["name"]);
        assert!(w["clientConfig"].get("url").is_none(), "{w}");
        assert_eq!(
            w["clientConfig"]["service"],
            json!({"name": "trellis-operator", "namespace": "trellis-system",
                   "path": "/inject", "port": 443})
        );
        assert_eq!(w["failurePolicy"], "Ignore");
        assert_eq!(w["sideEffects"], "None");
        assert_eq!(
            w["rules"],
            json!([{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                    "resources": ["pods"], "scope": "Namespaced"}])
        );
        let exprs = w["namespaceSelector"]["matchExpressions"]
            .as_array()
            .unwrap();
        assert!(
            exprs.contains(&json!({
                "key": "kubernetes.io/metadata.name",
                "operator": "NotIn",
                "values": ["kube-node-lease", "kube-public", "kube-system", "legacy", "trellis-system"]
            })),
            "{}: {exprs:?}",
            w["name"]
        );
    }
    assert_eq!(
        webhooks[0]["namespaceSelector"]["matchLabels"],
        json!({"trellis.dev/inject": "enabled"})
    );
    assert_eq!(
        webhooks[1]["objectSelector"]["matchLabels"],
        json!({"trellis.dev/inject": "enabled"})
    );
}

fn condition<'a>(status_body: &'a Value, type_: &str) -> &'a Value {
    status_body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} in {status_body}"))
}

/// Installed by OLM into `operators`, the operator keeps its CA Secret there (its Role is
/// there, and nowhere else), and the webhook calls the `trellis-operator` Service there and
/// never injects that namespace's pods.
#[tokio::test]
async fn an_operator_in_another_namespace_keeps_its_ca_and_webhook_there() {
    let m = mesh();
    let list = json!({
        "apiVersion": "v1", "kind": "NamespaceList", "metadata": {"resourceVersion": "9"},
        "items": [
            {"metadata": {"name": "operators", "labels": {"kubernetes.io/metadata.name": "operators"}}},
            {"metadata": {"name": "shop", "labels": {"kubernetes.io/metadata.name": "shop",
                                                     "trellis.dev/inject": "enabled"}}},
        ]
    });
    let out = run_pass_in(
        "operators",
        vec![
            get(MESH, serde_json::to_value(&m).unwrap()),
            not_found("/api/v1/namespaces/operators/secrets/trellis-ca"),
            get(NAMESPACES, list),
            get(BUNDLES, configmap_list(&[])),
            apply(
                "/api/v1/namespaces/operators/secrets/trellis-ca?&force=true&fieldManager=trellis-operator",
                |b| assert_eq!(b["metadata"]["namespace"], "operators"),
            ),
            apply(SHOP_BUNDLE_APPLY, |_| {}),
            apply(WEBHOOK_APPLY, |b| {
                for w in b["webhooks"].as_array().unwrap() {
                    assert_eq!(
                        w["clientConfig"]["service"],
                        json!({"name": "trellis-operator", "namespace": "operators",
                               "path": "/inject", "port": 443})
                    );
                    let exprs = w["namespaceSelector"]["matchExpressions"].to_string();
                    assert!(exprs.contains("\"operators\""), "{exprs}");
                    assert!(!exprs.contains("trellis-system"), "{exprs}");
                }
            }),
            Exchange {
                reply: serde_json::to_value(&m).unwrap(),
                ..apply(MESH_STATUS, |b| {
                    let wh = condition(b, "WebhookReady");
                    assert_eq!(wh["status"], "True", "{wh}");
                    assert_eq!(condition(b, "CAReady")["status"], "True");
                })
            },
        ],
    )
    .await;
    assert!(out.is_ok(), "{out:?}");
}

/// A value filled in by one exchange's check and read by a later one.
type Captured = Arc<Mutex<Option<String>>>;

#[tokio::test]
async fn first_pass_configures_the_webhook_with_the_new_bundle_and_reports_it_ready() {
    let mut m = mesh();
    // A condition the compiler owns, which this pass must keep.
    m.status = Some(MeshStatus {
        conditions: vec![Condition {
            last_transition_time: EARLIER.into(),
            ..Condition::new(
                "Programmed",
                ConditionStatus::True,
                "Programmed",
                "",
                Some(2),
            )
        }],
        ..Default::default()
    });
    let bundle: Captured = Arc::default();
    let (b1, b2, b3) = (bundle.clone(), bundle.clone(), bundle.clone());
    let out = run_pass(vec![
        get(MESH, serde_json::to_value(&m).unwrap()),
        not_found(CA_SECRET),
        get(NAMESPACES, namespaces()),
        get(BUNDLES, configmap_list(&[])),
        apply(CA_SECRET_APPLY, move |b| {
            *b1.lock().unwrap() = Some(secret_bundle_pem(b));
        }),
        apply(SHOP_BUNDLE_APPLY, move |b| {
            let pem = b2.lock().unwrap().clone().unwrap();
            assert_eq!(b["data"]["ca.pem"], pem.as_str());
        }),
        apply(WEBHOOK_APPLY, move |b| {
            let pem = b3.lock().unwrap().clone().unwrap();
            assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
            assert_webhook_configuration(b, &pem);
        }),
        Exchange {
            reply: serde_json::to_value(&m).unwrap(),
            ..apply(MESH_STATUS, |b| {
                assert_eq!(b["apiVersion"], "trellis.dev/v1alpha1");
                assert_eq!(b["kind"], "Mesh");
                let types: Vec<_> = b["status"]["conditions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["type"].as_str().unwrap())
                    .collect();
                // Only the CA controller's own conditions: the compiler's Programmed is not
                // sent, so a stale copy of it can never be written back.
                assert_eq!(types, ["CAReady", "WebhookReady"]);
                let ca = condition(b, "CAReady");
                assert_eq!(
                    (&ca["status"], &ca["reason"]),
                    (&json!("True"), &json!("Ready"))
                );
                let wh = condition(b, "WebhookReady");
                assert_eq!(
                    (&wh["status"], &wh["reason"]),
                    (&json!("True"), &json!("Configured"))
                );
                assert_eq!(wh["lastTransitionTime"], NOW);
                assert_eq!(wh["observedGeneration"], 2);
                assert!(
                    wh["message"]
                        .as_str()
                        .unwrap()
                        .contains("trellis-sidecar-injector"),
                    "{wh}"
                );
                assert!(b["status"]["ca"]["fingerprint"].is_string(), "{b}");
            })
        },
    ])
    .await;
    out.unwrap();
    assert!(bundle.lock().unwrap().is_some());
}

/// A refused apply: the bundles are still distributed (they come first), `CAReady` stays true,
/// and `WebhookReady` says what failed and the API server's reason, so `kubectl describe mesh`
/// points at the fix (RBAC for 403, the API server for 500).
async fn refused_webhook_apply(code: u16, reason: &'static str, api_message: &'static str) {
    let c = converged();
    // A namespace joined the mesh since the last pass: its bundle must still be written.
    let m = c.mesh.clone();
    let pem = c.bundle_pem.clone();
    let out = run_pass(vec![
        get(MESH, serde_json::to_value(&m).unwrap()),
        get(CA_SECRET, serde_json::to_value(&c.secret).unwrap()),
        get(NAMESPACES, namespaces()),
        get(BUNDLES, configmap_list(&[])),
        apply(SHOP_BUNDLE_APPLY, move |b| {
            assert_eq!(b["data"]["ca.pem"], pem.as_str());
        }),
        Exchange {
            status: code,
            reply: api_status(code, reason, api_message),
            ..apply(WEBHOOK_APPLY, |_| {})
        },
        Exchange {
            reply: serde_json::to_value(&m).unwrap(),
            ..apply(MESH_STATUS, move |b| {
                let ca = condition(b, "CAReady");
                assert_eq!(
                    (&ca["status"], &ca["reason"]),
                    (&json!("True"), &json!("Ready"))
                );
                assert_eq!(ca["lastTransitionTime"], EARLIER, "CAReady did not change");
                let wh = condition(b, "WebhookReady");
                assert_eq!(
                    (&wh["status"], &wh["reason"]),
                    (&json!("False"), &json!("ApplyFailed"))
                );
                assert_eq!(wh["lastTransitionTime"], NOW, "a transition");
                let msg = wh["message"].as_str().unwrap();
                assert!(msg.contains("trellis-sidecar-injector"), "{msg}");
                assert_eq!(msg.matches(api_message).count(), 1, "{msg}");
                assert!(msg.contains(&format!("({code} {reason})")), "{msg}");
                assert!(!msg.contains("Status {"), "no Rust debug output: {msg}");
                assert_eq!(
                    msg.contains("config/rbac/cluster_role.yaml"),
                    code == 403,
                    "the RBAC hint only for a refusal: {msg}"
                );
            })
        },
    ])
    .await;
    // The failure is reported in the status, not as a failed pass: the loop keeps its period.
    assert!(out.is_ok(), "{out:?}");
}

#[tokio::test]
async fn a_forbidden_webhook_apply_reports_webhook_not_ready_and_still_distributes_bundles() {
    refused_webhook_apply(
        403,
        "Forbidden",
        "mutatingwebhookconfigurations.admissionregistration.k8s.io \"trellis-sidecar-injector\" is forbidden: User \"system:serviceaccount:trellis-system:trellis-operator\" cannot patch resource \"mutatingwebhookconfigurations\" in API group \"admissionregistration.k8s.io\" at the cluster scope",
    )
    .await;
}

#[tokio::test]
async fn a_server_error_on_the_webhook_apply_reports_webhook_not_ready() {
    refused_webhook_apply(
        500,
        "InternalError",
        "Internal error occurred: etcdserver: request timed out",
    )
    .await;
}

#[tokio::test]
async fn a_converged_mesh_reapplies_only_the_webhook_configuration() {
    // The controller does not read the configuration back: it applies it on every pass, and
    // server-side apply of identical fields is a no-op on the server (no new resourceVersion,
    // no watch event). Everything else is compared first and left alone.
    let c = converged();
    let pem = c.bundle_pem.clone();
    run_pass(vec![
        get(MESH, serde_json::to_value(&c.mesh).unwrap()),
        get(CA_SECRET, serde_json::to_value(&c.secret).unwrap()),
        get(NAMESPACES, namespaces()),
        get(BUNDLES, configmap_list(std::slice::from_ref(&c.bundle))),
        apply(WEBHOOK_APPLY, move |b| {
            assert_webhook_configuration(b, &pem)
        }),
    ])
    .await
    .unwrap();
}

#[tokio::test]
async fn a_root_rotation_reapplies_the_webhook_configuration_with_both_roots() {
    let c = converged();
    let mut m = c.mesh.clone();
    m.metadata.annotations = Some(BTreeMap::from([(
        reconcile::ROTATE_ANNOTATION.to_string(),
        "rotate-1".to_string(),
    )]));
    let old = c.bundle_pem.clone();
    let new: Captured = Arc::default();
    let (n1, n2, n3) = (new.clone(), new.clone(), new.clone());
    let old2 = old.clone();
    run_pass(vec![
        get(MESH, serde_json::to_value(&m).unwrap()),
        get(CA_SECRET, serde_json::to_value(&c.secret).unwrap()),
        get(NAMESPACES, namespaces()),
        get(BUNDLES, configmap_list(std::slice::from_ref(&c.bundle))),
        apply(CA_SECRET_APPLY, move |b| {
            assert_eq!(
                b["metadata"]["annotations"]["trellis.dev/rotation-stage"],
                "AddedNewRoot"
            );
            *n1.lock().unwrap() = Some(secret_bundle_pem(b));
        }),
        apply(SHOP_BUNDLE_APPLY, move |b| {
            let pem = n2.lock().unwrap().clone().unwrap();
            assert_eq!(b["data"]["ca.pem"], pem.as_str());
        }),
        apply(WEBHOOK_APPLY, move |b| {
            let pem = n3.lock().unwrap().clone().unwrap();
            // Old and new root: the API server keeps trusting the serving certificate the
            // operator still presents (old root) and the one it will present (new root).
            assert_ne!(pem, old2);
            assert!(pem.starts_with(&old2), "the old root stays trusted");
            assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2, "{pem}");
            assert_webhook_configuration(b, &pem);
        }),
        Exchange {
            reply: serde_json::to_value(&m).unwrap(),
            ..apply(MESH_STATUS, |b| {
                let ca = condition(b, "CAReady");
                assert_eq!(
                    (&ca["status"], &ca["reason"]),
                    (&json!("True"), &json!("Rotating"))
                );
                let wh = condition(b, "WebhookReady");
                assert_eq!(wh["status"], "True");
                assert_eq!(wh["lastTransitionTime"], EARLIER, "no transition");
                assert_eq!(b["status"]["ca"]["rotation"], "AddedNewRoot");
            })
        },
    ])
    .await
    .unwrap();
    assert_ne!(new.lock().unwrap().as_deref(), Some(old.as_str()));
}

#[tokio::test]
async fn an_unusable_ca_leaves_the_webhook_configuration_alone() {
    // A corrupted CA Secret: nothing is applied (publishing no bundle, or a wrong one, would
    // break admission for every meshed pod), and both conditions say why.
    let c = converged();
    let mut broken = c.secret.clone();
    broken.data.as_mut().unwrap().remove("tls.key");
    run_pass(vec![
        get(MESH, serde_json::to_value(&c.mesh).unwrap()),
        get(CA_SECRET, serde_json::to_value(&broken).unwrap()),
        get(NAMESPACES, namespaces()),
        get(BUNDLES, configmap_list(std::slice::from_ref(&c.bundle))),
        Exchange {
            reply: serde_json::to_value(&c.mesh).unwrap(),
            ..apply(MESH_STATUS, |b| {
                let ca = condition(b, "CAReady");
                assert_eq!(
                    (&ca["status"], &ca["reason"]),
                    (&json!("False"), &json!("InvalidCASecret"))
                );
                let wh = condition(b, "WebhookReady");
                assert_eq!(
                    (&wh["status"], &wh["reason"]),
                    (&json!("False"), &json!("CANotReady"))
                );
                assert!(wh["message"].as_str().unwrap().contains("CAReady"), "{wh}");
            })
        },
    ])
    .await
    .unwrap();
}

/// A trust bundle that cannot be written (RBAC removed, say) must not leave `CAReady=True`: it
/// turns False and names the ConfigMap, the webhook configuration is not touched (nothing is
/// published from a pass that did not finish), `WebhookReady` keeps its state, and the pass
/// fails so the controller logs it.
#[tokio::test]
async fn a_refused_trust_bundle_write_reports_ca_not_ready_and_skips_the_webhook() {
    let c = converged();
    let m = c.mesh.clone();
    let message = "configmaps \"trellis-trust-bundle\" is forbidden: User \"system:serviceaccount:trellis-system:trellis-operator\" cannot patch resource \"configmaps\" in the namespace \"shop\"";
    let out = run_pass(vec![
        get(MESH, serde_json::to_value(&m).unwrap()),
        get(CA_SECRET, serde_json::to_value(&c.secret).unwrap()),
        get(NAMESPACES, namespaces()),
        get(BUNDLES, configmap_list(&[])),
        Exchange {
            status: 403,
            reply: api_status(403, "Forbidden", message),
            ..apply(SHOP_BUNDLE_APPLY, |_| {})
        },
        Exchange {
            reply: serde_json::to_value(&m).unwrap(),
            ..apply(MESH_STATUS, move |b| {
                let ca = condition(b, "CAReady");
                assert_eq!(
                    (&ca["status"], &ca["reason"]),
                    (&json!("False"), &json!("ApplyFailed"))
                );
                assert_eq!(ca["lastTransitionTime"], NOW, "a transition");
                let msg = ca["message"].as_str().unwrap();
                assert!(
                    msg.contains("ConfigMap shop/trellis-trust-bundle"),
                    "names the object: {msg}"
                );
                assert_eq!(msg.matches(message).count(), 1, "{msg}");
                assert!(msg.contains("(403 Forbidden)"), "{msg}");
                assert!(msg.contains("config/rbac/cluster_role.yaml"), "{msg}");
                assert!(!msg.contains("Status {"), "no Rust debug output: {msg}");
                let wh = condition(b, "WebhookReady");
                assert_eq!(wh["status"], "True");
                assert_eq!(wh["lastTransitionTime"], EARLIER, "WebhookReady untouched");
            })
        },
    ])
    .await;
    let e = out.expect_err("the pass fails so it is logged");
    assert!(e.contains("ConfigMap shop/trellis-trust-bundle"), "{e}");
}

// ---------------------------------------------------------------- the leader's loop

/// The requests of one pass over a converged mesh (reads, then the webhook apply).
fn converged_pass(c: &Converged) -> Vec<Exchange> {
    let pem = c.bundle_pem.clone();
    vec![
        get(MESH, serde_json::to_value(&c.mesh).unwrap()),
        get(CA_SECRET, serde_json::to_value(&c.secret).unwrap()),
        get(NAMESPACES, namespaces()),
        get(BUNDLES, configmap_list(std::slice::from_ref(&c.bundle))),
        apply(WEBHOOK_APPLY, move |b| {
            assert_webhook_configuration(b, &pem)
        }),
    ]
}

struct Loop {
    api: ApiServer,
    changes: futures::channel::mpsc::UnboundedSender<()>,
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Loop {
    fn start() -> Self {
        let (client, handle) = mock();
        let status = StatusWriter::with_clock(client.clone(), Arc::new(|| NOW.to_string()))
            .for_controller("ca");
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let token = shutdown.clone();
        let task =
            tokio::spawn(async move { drive(&client, &status, "trellis-system", rx, token).await });
        Loop {
            api: ApiServer(handle),
            changes: tx,
            shutdown,
            task,
        }
    }

    /// One whole pass, its first request within `within`.
    async fn pass(&mut self, c: &Converged, within: Duration) {
        let mut first = true;
        for ex in converged_pass(c) {
            let wait = if first {
                within
            } else {
                Duration::from_secs(1)
            };
            first = false;
            self.api.expect(wait, ex).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), self.task)
            .await
            .expect("the loop stops on shutdown")
            .unwrap();
        self.api.expect_no_more().await;
    }
}

/// A change (say a namespace labelled for the mesh) starts a pass after the debounce, not at
/// the next resync: its pods need the trust bundle to start. Without changes, nothing runs
/// until the resync.
#[tokio::test(start_paused = true)]
async fn a_change_starts_a_pass_at_once_and_quiet_waits_for_the_resync() {
    let c = converged();
    let mut l = Loop::start();
    l.pass(&c, Duration::from_secs(1)).await;
    l.api.expect_none_for(Duration::from_secs(60)).await;
    let at = tokio::time::Instant::now();
    l.changes.unbounded_send(()).unwrap();
    l.pass(&c, DEBOUNCE + Duration::from_millis(50)).await;
    assert!(at.elapsed() >= DEBOUNCE, "debounced: {:?}", at.elapsed());
    // Quiet again: the next pass is the resync.
    l.api.expect_none_for(RESYNC - Duration::from_secs(1)).await;
    l.pass(&c, Duration::from_secs(2)).await;
    l.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_changes_is_one_pass() {
    let c = converged();
    let mut l = Loop::start();
    l.pass(&c, Duration::from_secs(1)).await;
    for _ in 0..20 {
        l.changes.unbounded_send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    l.pass(&c, DEBOUNCE + Duration::from_millis(200)).await;
    l.api.expect_none_for(Duration::from_secs(60)).await;
    l.stop().await;
}

/// The watches ending must not stop the CA from converging: passes go on at the resync.
#[tokio::test(start_paused = true)]
async fn without_watches_the_loop_keeps_resyncing() {
    let c = converged();
    let mut l = Loop::start();
    l.pass(&c, Duration::from_secs(1)).await;
    l.changes.close_channel();
    l.api.expect_none_for(RESYNC - Duration::from_secs(1)).await;
    l.pass(&c, Duration::from_secs(2)).await;
    l.stop().await;
}

/// A failed pass (the API server down) is retried after RETRY, without waiting for a change.
#[tokio::test(start_paused = true)]
async fn a_failed_pass_is_retried() {
    let c = converged();
    let mut l = Loop::start();
    l.api
        .expect(
            Duration::from_secs(1),
            Exchange {
                status: 503,
                reply: api_status(503, "ServiceUnavailable", "etcd is down"),
                ..get(MESH, Value::Null)
            },
        )
        .await;
    l.api.expect_none_for(RETRY - Duration::from_secs(1)).await;
    l.pass(&c, Duration::from_secs(2)).await;
    l.stop().await;
}
