//! The MutatingWebhookConfiguration the operator owns: the desired object (golden) and the
//! server-side-apply applier against a recorded API exchange (`tower_test::mock::pair`).
use std::path::PathBuf;
use std::time::Duration;

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use trellis_operator::api::Mesh;
use trellis_operator::api::MeshSpec;
use trellis_operator::api::mesh::FailurePolicy;
use trellis_operator::inject::{default_mesh, webhook_config};

/// The Mesh as the API server returns it: with a uid, so the configuration can be owned.
fn owned(spec: MeshSpec) -> Mesh {
    let mut m = Mesh::new("default", spec);
    m.metadata.uid = Some("5f0c2a4e-0000-4000-8000-00000000mesh".into());
    m
}

const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n";

fn golden(name: &str, actual: &Value) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/inject")
        .join(name);
    let text = serde_json::to_string_pretty(actual).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    assert_eq!(text, expected, "golden file {} differs", path.display());
}

#[test]
fn desired_configuration() {
    let mut mesh = default_mesh();
    mesh.injection.excluded_namespaces = vec!["legacy".into()];
    let cfg = webhook_config::desired(&owned(mesh), CA, "trellis-system");
    let v = serde_json::to_value(&cfg).unwrap();
    golden("webhook-config.json", &v);

    let hook = &v["webhooks"][0];
    assert_eq!(v["metadata"]["name"], "trellis-sidecar-injector");
    assert_eq!(
        hook["clientConfig"]["service"],
        json!({"name": "trellis-operator", "namespace": "trellis-system", "path": "/inject", "port": 443})
    );
    // caBundle is the PEM, base64-encoded by the ByteString serializer.
    use base64::Engine as _;
    assert_eq!(
        hook["clientConfig"]["caBundle"],
        base64::engine::general_purpose::STANDARD.encode(CA)
    );
    assert_eq!(hook["failurePolicy"], "Fail");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["admissionReviewVersions"], json!(["v1"]));
    assert_eq!(hook["timeoutSeconds"], 10);
    assert_eq!(hook["matchPolicy"], "Equivalent");
    assert_eq!(hook["reinvocationPolicy"], "Never");
    assert_eq!(
        hook["namespaceSelector"]["matchLabels"],
        json!({"trellis.dev/inject": "enabled"})
    );
    assert_eq!(
        hook["namespaceSelector"]["matchExpressions"][0]["values"],
        json!([
            "kube-node-lease",
            "kube-public",
            "kube-system",
            "legacy",
            "trellis-system"
        ])
    );
}

#[test]
fn failure_policy_is_copied_from_the_mesh() {
    let mut mesh = default_mesh();
    mesh.injection.failure_policy = FailurePolicy::Ignore;
    let cfg = webhook_config::desired(&owned(mesh), CA, "trellis-system");
    for hook in cfg.webhooks.unwrap() {
        assert_eq!(hook.failure_policy.as_deref(), Some("Ignore"));
    }
}

#[tokio::test]
async fn applier_sends_one_server_side_apply() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let desired = webhook_config::desired(&owned(default_mesh()), CA, "trellis-system");
    let expected_body = serde_json::to_value(&desired).unwrap();

    let verifier = tokio::spawn(async move {
        let (request, send) = handle.next_request().await.expect("applier made no call");
        assert_eq!(request.method(), Method::PATCH);
        assert_eq!(
            request.uri().to_string(),
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/trellis-sidecar-injector?&force=true&fieldManager=trellis-operator"
        );
        assert_eq!(
            request.headers()["content-type"],
            "application/apply-patch+yaml"
        );
        let body = request.into_body().collect_bytes().await.unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body, expected_body);
        assert_eq!(body["apiVersion"], "admissionregistration.k8s.io/v1");
        assert_eq!(body["kind"], "MutatingWebhookConfiguration");
        // The API server answers with the stored object.
        let mut stored = body.clone();
        stored["metadata"]["uid"] = json!("9d3c0b5e-0000-4000-8000-000000000001");
        stored["metadata"]["resourceVersion"] = json!("42");
        send.send_response(
            Response::builder()
                .status(200)
                .body(Body::from(serde_json::to_vec(&stored).unwrap()))
                .unwrap(),
        );
        // No further calls: the stream ends when the applier drops the client.
        let next = tokio::time::timeout(Duration::from_secs(1), handle.next_request())
            .await
            .expect("client still alive after apply returned");
        assert!(next.is_none(), "unexpected second API call");
    });
    let applied = tokio::time::timeout(
        Duration::from_secs(1),
        webhook_config::apply(client, &desired),
    )
    .await
    .expect("applier hung")
    .unwrap();
    assert_eq!(applied.metadata.resource_version.as_deref(), Some("42"));
    tokio::time::timeout(Duration::from_secs(1), verifier)
        .await
        .expect("verifier hung")
        .unwrap();
}

/// Deleting the Mesh, or the CRDs (`kubectl delete -k config/default`), must take the
/// configuration with it through garbage collection, even with no operator left to do it.
#[test]
fn the_configuration_is_owned_by_the_mesh() {
    let cfg = webhook_config::desired(&owned(default_mesh()), CA, "trellis-system");
    let v = serde_json::to_value(&cfg).unwrap();
    assert_eq!(
        v["metadata"]["ownerReferences"],
        json!([{"apiVersion": "trellis.dev/v1alpha1", "kind": "Mesh", "name": "default",
                "uid": "5f0c2a4e-0000-4000-8000-00000000mesh", "controller": true}])
    );
}
