//! The CA controller's pass against recorded API exchanges, for what an install and an
//! uninstall depend on: the webhook configuration is owned by the Mesh and goes with it, every
//! object follows the operator's namespace, a `secretRef` the operator may not read says what
//! Role to create instead of stopping the pass, and trust bundles follow the compiler's meshed
//! namespaces (which include namespaces holding opted-in pods).

mod recorded;

use std::collections::BTreeSet;
use std::sync::Arc;

use http::Method;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use serde_json::{Value, json};
use trellis_operator::api::{Mesh, MeshSpec};
use trellis_operator::ca::controller::reconcile_with;
use trellis_operator::ca::reconcile::bundle_configmap;
use trellis_operator::status::StatusWriter;

use recorded::{Exchange, api_status, mock, verifier};

const NOW: &str = "2026-11-25T17:00:00Z";
const MESH: &str = "/apis/trellis.dev/v1alpha1/meshes/default";
const MESH_STATUS: &str = "/apis/trellis.dev/v1alpha1/meshes/default/status";
const NAMESPACES: &str = "/api/v1/namespaces?";
const BUNDLES: &str = "/api/v1/configmaps?&labelSelector=trellis.dev%2Fcomponent%3Dtrust-bundle";
const WEBHOOK: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/trellis-sidecar-injector";
const MESH_UID: &str = "9a1d6a52-0000-4000-8000-0000000000aa";

fn ssa(path: &str) -> String {
    format!("{path}?&force=true&fieldManager=trellis-operator")
}

fn secret_path(namespace: &str, name: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/secrets/{name}")
}

fn bundle_path(namespace: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/configmaps/trellis-trust-bundle")
}

fn get(path: &str, reply: Value) -> Exchange {
    Exchange {
        method: Method::GET,
        path_and_query: path.into(),
        check: Box::new(|_| {}),
        status: 200,
        reply,
    }
}

fn refused(method: Method, path: &str, code: u16, reason: &str) -> Exchange {
    Exchange {
        method,
        path_and_query: path.into(),
        check: Box::new(|_| {}),
        status: code,
        reply: api_status(code, reason, "refused"),
    }
}

fn apply(path: &str, check: impl FnOnce(&Value) + Send + 'static) -> Exchange {
    Exchange {
        method: Method::PATCH,
        path_and_query: ssa(path),
        check: Box::new(check),
        status: 200,
        reply: Value::Null,
    }
}

fn delete(path: &str) -> Exchange {
    Exchange {
        method: Method::DELETE,
        path_and_query: format!("{path}?"),
        check: Box::new(|_| {}),
        status: 200,
        reply: json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
    }
}

/// One pass of an operator in `namespace`, with the compiler's meshed set if given.
async fn run_pass(
    (namespace, meshed): (&str, Option<BTreeSet<String>>),
    expected: Vec<Exchange>,
) -> Result<(), String> {
    let (client, handle) = mock();
    let v = verifier(handle, expected);
    let status = StatusWriter::with_clock(client.clone(), Arc::new(|| NOW.to_string()));
    let out = reconcile_with(&client, &status, namespace, meshed.as_ref())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    drop((client, status));
    v.await.unwrap();
    out
}

fn mesh(spec: Value) -> Mesh {
    let spec: MeshSpec = serde_json::from_value(spec).unwrap();
    let mut m = Mesh::new("default", spec);
    m.metadata.uid = Some(MESH_UID.into());
    m.metadata.generation = Some(1);
    m.metadata.resource_version = Some("7".into());
    m
}

fn namespace_list(items: &[(&str, &[(&str, &str)])]) -> Value {
    let items: Vec<Value> = items
        .iter()
        .map(|(name, labels)| {
            let mut n = Namespace::default();
            n.metadata.name = Some(name.to_string());
            n.metadata.labels = Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .chain([("kubernetes.io/metadata.name".into(), name.to_string())])
                    .collect(),
            );
            serde_json::to_value(n).unwrap()
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "NamespaceList", "metadata": {"resourceVersion": "9"},
           "items": items})
}

fn configmap_list(items: &[ConfigMap]) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMapList", "metadata": {"resourceVersion": "9"},
           "items": items})
}

fn condition<'a>(status_body: &'a Value, type_: &str) -> &'a Value {
    status_body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} in {status_body}"))
}

/// Uninstall in either order: `kubectl delete mesh default` first leaves the operator running
/// without a Mesh, and a webhook configuration left then (one created before owner
/// references, or orphaned) would block pod creation with `failurePolicy: Fail`.
#[tokio::test]
async fn without_a_mesh_the_webhook_configuration_is_deleted() {
    let out = run_pass(
        ("trellis-system", None),
        vec![refused(Method::GET, MESH, 404, "NotFound"), delete(WEBHOOK)],
    )
    .await;
    assert_eq!(out, Ok(()));
    // Already gone: not an error.
    let out = run_pass(
        ("trellis-system", None),
        vec![
            refused(Method::GET, MESH, 404, "NotFound"),
            refused(Method::DELETE, &format!("{WEBHOOK}?"), 404, "NotFound"),
        ],
    )
    .await;
    assert_eq!(out, Ok(()));
}

/// A first pass for an operator installed into `mesh-ops` (a kustomize `namespace:` overlay,
/// an OLM install): the CA Secret, the webhook's Service and the webhook's exclusions follow
/// it, nothing names `trellis-system`, and the configuration is owned by the Mesh so that
/// deleting the Mesh (or the CRDs) garbage-collects it.
#[tokio::test]
async fn an_operator_in_another_namespace_uses_it_everywhere_and_the_mesh_owns_the_webhook() {
    let m = mesh(json!({}));
    let out = run_pass(
        ("mesh-ops", None),
        vec![
            get(MESH, serde_json::to_value(&m).unwrap()),
            refused(
                Method::GET,
                &secret_path("mesh-ops", "trellis-ca"),
                404,
                "NotFound",
            ),
            get(
                NAMESPACES,
                namespace_list(&[
                    // The operator's own namespace is never meshed, whatever its labels.
                    ("mesh-ops", &[("trellis.dev/inject", "enabled")]),
                    ("shop", &[("trellis.dev/inject", "enabled")]),
                ]),
            ),
            get(BUNDLES, configmap_list(&[])),
            apply(&secret_path("mesh-ops", "trellis-ca"), |b| {
                assert_eq!(b["metadata"]["namespace"], "mesh-ops");
            }),
            apply(&bundle_path("shop"), |_| {}),
            apply(WEBHOOK, |b| {
                assert_eq!(
                    b["metadata"]["ownerReferences"],
                    json!([{"apiVersion": "trellis.dev/v1alpha1", "kind": "Mesh",
                            "name": "default", "uid": MESH_UID, "controller": true}]),
                );
                assert!(!b.to_string().contains("trellis-system"), "{b}");
                for w in b["webhooks"].as_array().unwrap() {
                    assert_eq!(w["clientConfig"]["service"]["namespace"], "mesh-ops");
                    let excluded = &w["namespaceSelector"]["matchExpressions"][0];
                    assert_eq!(excluded["key"], "kubernetes.io/metadata.name");
                    assert!(
                        excluded["values"]
                            .as_array()
                            .unwrap()
                            .contains(&json!("mesh-ops")),
                        "{excluded}"
                    );
                }
            }),
            Exchange {
                reply: serde_json::to_value(&m).unwrap(),
                ..apply(MESH_STATUS, |b| {
                    assert_eq!(condition(b, "CAReady")["status"], "True");
                    assert_eq!(condition(b, "WebhookReady")["status"], "True");
                })
            },
        ],
    )
    .await;
    assert_eq!(out, Ok(()));
}

/// `ca.secretRef` in a namespace where the operator has no Role: the pass goes on (the status
/// is written, nothing else breaks) and `CAReady` says exactly which Role to create.
#[tokio::test]
async fn a_forbidden_ca_secret_says_which_role_to_create_and_the_pass_goes_on() {
    let m = mesh(json!({"ca": {"secretRef": {"name": "my-ca", "namespace": "cert-manager"}}}));
    let out = run_pass(
        ("trellis-system", None),
        vec![
            get(MESH, serde_json::to_value(&m).unwrap()),
            refused(
                Method::GET,
                &secret_path("trellis-system", "trellis-ca"),
                404,
                "NotFound",
            ),
            refused(
                Method::GET,
                &secret_path("cert-manager", "my-ca"),
                403,
                "Forbidden",
            ),
            get(
                NAMESPACES,
                namespace_list(&[("shop", &[("trellis.dev/inject", "enabled")])]),
            ),
            get(BUNDLES, configmap_list(&[])),
            Exchange {
                reply: serde_json::to_value(&m).unwrap(),
                ..apply(MESH_STATUS, |b| {
                    let ca = condition(b, "CAReady");
                    assert_eq!(ca["status"], "False");
                    assert_eq!(ca["reason"], "CASecretForbidden");
                    let msg = ca["message"].as_str().unwrap();
                    for part in [
                        "cert-manager/my-ca",
                        "kubectl -n cert-manager create role trellis-ca-reader --verb=get \
                             --resource=secrets --resource-name=my-ca",
                        "--serviceaccount=trellis-system:trellis-operator",
                    ] {
                        assert!(msg.contains(part), "{part:?} not in {msg}");
                    }
                    assert_eq!(condition(b, "WebhookReady")["reason"], "CANotReady");
                })
            },
        ],
    )
    .await;
    assert_eq!(out, Ok(()));
}

/// The trust bundles follow the compiler's meshed set: `batch` is not selected but holds a pod
/// labelled `trellis.dev/inject: enabled` (the compiler saw it), so it gets its bundle, and a
/// managed bundle in a namespace that left the mesh goes. No namespace list is needed.
#[tokio::test]
async fn trust_bundles_follow_the_compilers_meshed_namespaces() {
    let m = mesh(json!({}));
    let meshed = BTreeSet::from(["batch".to_string(), "shop".to_string()]);
    let left = bundle_configmap("left", "pem", &m);
    let out = run_pass(
        ("trellis-system", Some(meshed)),
        vec![
            get(MESH, serde_json::to_value(&m).unwrap()),
            refused(
                Method::GET,
                &secret_path("trellis-system", "trellis-ca"),
                404,
                "NotFound",
            ),
            get(BUNDLES, configmap_list(&[left])),
            apply(&secret_path("trellis-system", "trellis-ca"), |_| {}),
            apply(&bundle_path("batch"), |b| {
                assert!(
                    b["data"]["ca.pem"]
                        .as_str()
                        .unwrap()
                        .starts_with("-----BEGIN CERTIFICATE-----")
                );
            }),
            apply(&bundle_path("shop"), |_| {}),
            delete(&bundle_path("left")),
            apply(WEBHOOK, |_| {}),
            Exchange {
                reply: serde_json::to_value(&m).unwrap(),
                ..apply(MESH_STATUS, |_| {})
            },
        ],
    )
    .await;
    assert_eq!(out, Ok(()));
}

/// Before the compiler has spoken, the pass sees namespaces only: a bundle in a namespace that
/// only its pods keep in the mesh must survive (its pods mount it), so none is deleted.
#[tokio::test]
async fn before_the_first_compile_no_bundle_is_deleted() {
    let m = mesh(json!({}));
    let batch = bundle_configmap("batch", "pem", &m);
    let out = run_pass(
        ("trellis-system", None),
        vec![
            get(MESH, serde_json::to_value(&m).unwrap()),
            refused(
                Method::GET,
                &secret_path("trellis-system", "trellis-ca"),
                404,
                "NotFound",
            ),
            get(
                NAMESPACES,
                namespace_list(&[
                    ("batch", &[]),
                    ("shop", &[("trellis.dev/inject", "enabled")]),
                ]),
            ),
            get(BUNDLES, configmap_list(&[batch])),
            apply(&secret_path("trellis-system", "trellis-ca"), |_| {}),
            apply(&bundle_path("shop"), |_| {}),
            apply(WEBHOOK, |_| {}),
            Exchange {
                reply: serde_json::to_value(&m).unwrap(),
                ..apply(MESH_STATUS, |_| {})
            },
        ],
    )
    .await;
    assert_eq!(out, Ok(()));
}
