//! The CA applier against an ApiServerVerifier (tower-test): the exact server-side apply
//! requests, in order, and nothing else.

use std::time::{Duration, SystemTime};

use http::{Request, Response};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::client::Body;
use trellis_operator::api::{Mesh, MeshSpec};
use trellis_operator::ca::reconcile::{self, Observed};

async fn next(
    handle: &mut tower_test::mock::Handle<Request<Body>, Response<Body>>,
) -> (
    Request<Body>,
    tower_test::mock::SendResponse<Response<Body>>,
) {
    tokio::time::timeout(Duration::from_secs(1), handle.next_request())
        .await
        .expect("expected another API call")
        .expect("client gone")
}

#[tokio::test]
async fn applies_secret_and_bundles_with_ssa_and_deletes_departed_namespaces() {
    let mut mesh = Mesh::new("default", MeshSpec::default());
    mesh.metadata.uid = Some("5e1f-uid".into());
    mesh.metadata.generation = Some(1);
    let mut stale = ConfigMap::default();
    stale.metadata.name = Some(reconcile::TRUST_BUNDLE.into());
    stale.metadata.namespace = Some("web".into());
    stale.metadata.labels = Some(
        [(
            "app.kubernetes.io/managed-by".to_string(),
            "trellis-operator".to_string(),
        )]
        .into(),
    );
    let bundles = [stale];
    let namespaces = ["shop".to_string()];
    let desired = reconcile::reconcile(&Observed {
        mesh: &mesh,
        namespace: "trellis-system",
        ca_secret: None,
        user_secret: None,
        meshed_namespaces: &namespaces,
        bundles: &bundles,
        now: SystemTime::now(),
    });
    let bundle_pem = desired.issuer.as_ref().unwrap().trust_bundle_pem.clone();

    let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(mock, "default");
    let applier = tokio::spawn(async move { reconcile::apply(&client, &desired).await });

    // 1. The CA Secret.
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.method(), http::Method::PATCH);
    assert_eq!(
        req.uri().to_string(),
        "/api/v1/namespaces/trellis-system/secrets/trellis-ca?&force=true&fieldManager=trellis-operator"
    );
    assert_eq!(
        req.headers()["content-type"],
        "application/apply-patch+yaml"
    );
    let body: serde_json::Value =
        serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
    assert_eq!(body["apiVersion"], "v1");
    assert_eq!(body["kind"], "Secret");
    assert_eq!(body["type"], "Opaque");
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        assert!(body["data"][key].is_string(), "{key}");
    }
    assert_eq!(
        body["metadata"]["annotations"]["trellis.dev/rotation-stage"],
        "Idle"
    );
    send.send_response(
        Response::builder()
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );

    // 2. The trust bundle ConfigMap: the exact request.
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.method(), http::Method::PATCH);
    assert_eq!(
        req.uri().to_string(),
        "/api/v1/namespaces/shop/configmaps/trellis-trust-bundle?&force=true&fieldManager=trellis-operator"
    );
    assert_eq!(
        req.headers()["content-type"],
        "application/apply-patch+yaml"
    );
    let body: serde_json::Value =
        serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "trellis-trust-bundle",
                "namespace": "shop",
                "labels": {
                    "app.kubernetes.io/managed-by": "trellis-operator",
                    "trellis.dev/component": "trust-bundle"
                },
                "ownerReferences": [{
                    "apiVersion": "trellis.dev/v1alpha1",
                    "kind": "Mesh",
                    "name": "default",
                    "uid": "5e1f-uid",
                    "controller": true
                }]
            },
            "data": {"ca.pem": bundle_pem}
        })
    );
    send.send_response(
        Response::builder()
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );

    // 3. The namespace that left the mesh; already gone is fine.
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.method(), http::Method::DELETE);
    assert_eq!(
        req.uri().path(),
        "/api/v1/namespaces/web/configmaps/trellis-trust-bundle"
    );
    send.send_response(
        Response::builder()
            .status(404)
            .body(Body::from(
                br#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"configmaps \"trellis-trust-bundle\" not found","reason":"NotFound","code":404}"#.to_vec(),
            ))
            .unwrap(),
    );

    tokio::time::timeout(Duration::from_secs(1), applier)
        .await
        .expect("applier hung")
        .unwrap()
        .unwrap();
    // The applier is done and dropped its client: no further request may be pending.
    let extra = tokio::time::timeout(Duration::from_millis(100), handle.next_request()).await;
    assert!(!matches!(extra, Ok(Some(_))), "unexpected extra API call");
}
