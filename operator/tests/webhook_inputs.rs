//! The webhook's Mesh and namespace watches against recorded API exchanges
//! (`tower_test::mock::pair`): list, then watch events, published on the watch channels.
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use trellis_operator::webhook::{InputsSynced, spawn_inputs_tracked};

fn ok(body: &Value) -> Response<Body> {
    Response::builder()
        .status(200)
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

fn ns_meta(name: &str, rv: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": {"name": name, "resourceVersion": rv, "labels": labels}
    })
}

#[tokio::test]
async fn watches_publish_the_mesh_and_namespace_labels() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let shutdown = CancellationToken::new();
    let synced = std::sync::Arc::new(InputsSynced::default());
    let (mut mesh_rx, mut ns_rx) = spawn_inputs_tracked(client, shutdown.clone(), synced.clone());
    // Issue 13 item 5: nothing listed yet, so the replica must not report ready.
    assert!(!synced.is_synced());
    // Before anything is observed: defaults, and no namespace known.
    assert_eq!(
        mesh_rx.borrow().proxy.image,
        trellis_operator::inject::default_mesh().proxy.image
    );
    assert!(ns_rx.borrow().is_empty());

    let verifier = tokio::spawn(async move {
        let mut held = Vec::new();
        let mut seen = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let uri = req.uri().to_string();
            seen.push(uri.clone());
            let watch = uri.contains("watch=true");
            if uri.starts_with("/apis/trellis.dev/v1alpha1/meshes?") {
                assert!(
                    uri.contains("fieldSelector=metadata.name%3Ddefault"),
                    "{uri}"
                );
                if watch {
                    held.push(send); // no further Mesh events
                } else {
                    send.send_response(ok(&json!({
                        "apiVersion": "trellis.dev/v1alpha1",
                        "kind": "MeshList",
                        "metadata": {"resourceVersion": "5"},
                        "items": [{
                            "apiVersion": "trellis.dev/v1alpha1",
                            "kind": "Mesh",
                            "metadata": {"name": "default", "resourceVersion": "5"},
                            "spec": {"proxy": {"image": "registry.example/trellis-proxy:2.0.0"}}
                        }]
                    })));
                }
            } else if uri.starts_with("/api/v1/namespaces?") {
                // Metadata-only requests: the API server returns PartialObjectMetadata.
                let accept = req.headers()["accept"].to_str().unwrap().to_string();
                assert!(accept.contains("as=PartialObjectMetadata"), "{accept}");
                if !watch {
                    send.send_response(ok(&json!({
                        "apiVersion": "meta.k8s.io/v1",
                        "kind": "PartialObjectMetadataList",
                        "metadata": {"resourceVersion": "6"},
                        "items": [
                            ns_meta("shop", "6", json!({"trellis.dev/inject": "enabled"})),
                            ns_meta("kube-system", "2", json!({"kubernetes.io/metadata.name": "kube-system"}))
                        ]
                    })));
                } else if seen
                    .iter()
                    .filter(|u| u.starts_with("/api/v1/namespaces?") && u.contains("watch=true"))
                    .count()
                    == 1
                {
                    // First namespace watch: two events, then the stream ends.
                    let events = [
                        json!({"type": "MODIFIED", "object": ns_meta("shop", "7", json!({}))}),
                        json!({"type": "ADDED", "object": ns_meta("new", "8", json!({"team": "a"}))}),
                    ];
                    let body: Vec<u8> = events
                        .iter()
                        .flat_map(|e| {
                            let mut line = serde_json::to_vec(e).unwrap();
                            line.push(b'\n');
                            line
                        })
                        .collect();
                    send.send_response(
                        Response::builder()
                            .status(200)
                            .body(Body::from(body))
                            .unwrap(),
                    );
                } else {
                    held.push(send);
                }
            } else {
                panic!("unexpected request {uri}");
            }
        }
        seen
    });

    let wait = async {
        while mesh_rx.borrow_and_update().proxy.effective_image()
            != "registry.example/trellis-proxy:2.0.0"
        {
            mesh_rx.changed().await.unwrap();
        }
        loop {
            {
                let m = ns_rx.borrow_and_update();
                if m.get("new").is_some_and(|l| l["team"] == "a")
                    && m.get("shop").is_some_and(|l| l.is_empty())
                {
                    assert!(m.contains_key("kube-system"));
                    break;
                }
            }
            ns_rx.changed().await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .expect("watches did not publish the observed state");
    // Both first lists are complete: the webhook's inputs are synced.
    tokio::time::timeout(Duration::from_secs(5), async {
        while !synced.is_synced() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("inputs never reported synced after both lists");
    shutdown.cancel();
    // The watch tasks end with shutdown and drop the client, which ends the verifier.
    let seen = tokio::time::timeout(Duration::from_secs(5), verifier)
        .await
        .expect("watch tasks did not stop on shutdown")
        .unwrap();
    assert!(
        seen.iter()
            .any(|u| u.starts_with("/api/v1/namespaces?") && !u.contains("watch=true"))
    );
}
