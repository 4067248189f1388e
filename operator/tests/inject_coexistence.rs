//! Pods of another mesh are left alone, with a warning: a pod already injected by Istio or
//! Linkerd, or asking for their injection (their injector may run after ours), would
//! otherwise get a second proxy and a second set of iptables rules fighting over its traffic.
//! Checked in the injector, in the webhook's admission response (kubectl prints its
//! warnings) and in `trellis inject`.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::watch;
use trellis_operator::cli::inject::inject_value;
use trellis_operator::inject::{
    Decision, InjectContext, NamespaceInfo, OtherMesh, SkipReason, default_mesh, inject,
};
use trellis_operator::webhook::Injector;

fn pod(v: Value) -> Pod {
    serde_json::from_value(v).unwrap()
}

fn base(metadata: Value, extra_containers: Value) -> Value {
    let mut containers = vec![json!({"name": "app", "image": "app:1"})];
    containers.extend(extra_containers.as_array().cloned().unwrap_or_default());
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
           "spec": {"containers": containers}})
}

fn decide(p: &Pod, ns_labels: &[(&str, &str)]) -> Decision {
    let labels: BTreeMap<String, String> = ns_labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain([("trellis.dev/inject".to_string(), "enabled".to_string())])
        .collect();
    inject(
        p,
        &NamespaceInfo {
            name: "shop",
            labels: Some(&labels),
        },
        &default_mesh(),
        &InjectContext::default(),
    )
}

fn skipped_for(d: &Decision) -> Option<OtherMesh> {
    match d {
        Decision::Skip {
            reason: SkipReason::OtherMesh(m),
        } => Some(*m),
        _ => None,
    }
}

#[test]
fn pods_of_istio_or_linkerd_are_skipped() {
    /// What, the pod, its namespace's labels, and which mesh it belongs to.
    type Case = (
        &'static str,
        Value,
        &'static [(&'static str, &'static str)],
        Option<OtherMesh>,
    );
    let cases: Vec<Case> = vec![
        (
            "istio-proxy container",
            base(
                json!({"name": "a"}),
                json!([{"name": "istio-proxy", "image": "istio/proxyv2"}]),
            ),
            &[],
            Some(OtherMesh::Istio),
        ),
        (
            "linkerd-proxy container",
            base(
                json!({"name": "a"}),
                json!([{"name": "linkerd-proxy", "image": "cr.l5d.io/proxy"}]),
            ),
            &[],
            Some(OtherMesh::Linkerd),
        ),
        (
            "Istio injection requested by label",
            base(
                json!({"name": "a", "labels": {"sidecar.istio.io/inject": "true"}}),
                json!([]),
            ),
            &[],
            Some(OtherMesh::Istio),
        ),
        (
            "Istio injection status annotation",
            base(
                json!({"name": "a", "annotations": {"sidecar.istio.io/status": "{}"}}),
                json!([]),
            ),
            &[],
            Some(OtherMesh::Istio),
        ),
        (
            "Linkerd injection annotation",
            base(
                json!({"name": "a", "annotations": {"linkerd.io/inject": "enabled"}}),
                json!([]),
            ),
            &[],
            Some(OtherMesh::Linkerd),
        ),
        (
            "namespace with Istio injection",
            base(json!({"name": "a"}), json!([])),
            &[("istio-injection", "enabled")],
            Some(OtherMesh::Istio),
        ),
        (
            "namespace with an Istio revision",
            base(json!({"name": "a"}), json!([])),
            &[("istio.io/rev", "canary")],
            Some(OtherMesh::Istio),
        ),
        (
            "pod opting out of Istio in an Istio namespace",
            base(
                json!({"name": "a", "labels": {"sidecar.istio.io/inject": "false"}}),
                json!([]),
            ),
            &[("istio-injection", "enabled")],
            None,
        ),
        (
            "Linkerd injection disabled",
            base(
                json!({"name": "a", "annotations": {"linkerd.io/inject": "disabled"}}),
                json!([]),
            ),
            &[],
            None,
        ),
    ];
    for (what, p, ns, want) in cases {
        let d = decide(&pod(p), ns);
        assert_eq!(skipped_for(&d), want, "{what}: {d:?}");
        if want.is_none() {
            assert!(matches!(d, Decision::Patch { .. }), "{what}: {d:?}");
        }
    }
    // Opting out of Trellis wins, and then there is nothing to warn about.
    let p = pod(base(
        json!({"name": "a", "annotations": {"trellis.dev/inject": "disabled"}}),
        json!([{"name": "istio-proxy", "image": "istio/proxyv2"}]),
    ));
    assert!(matches!(
        decide(&p, &[]),
        Decision::Skip {
            reason: SkipReason::PodDisabled
        }
    ));
}

#[test]
fn the_webhook_allows_the_pod_unchanged_with_a_warning() {
    let namespaces = BTreeMap::from([(
        "shop".to_string(),
        BTreeMap::from([("trellis.dev/inject".to_string(), "enabled".to_string())]),
    )]);
    let (_mesh_tx, mesh_rx) = watch::channel(default_mesh());
    let (_ns_tx, ns_rx) = watch::channel(Arc::new(namespaces));
    let mut registry = Registry::default();
    let injector = Injector::new(mesh_rx, ns_rx, InjectContext::default(), &mut registry);
    let object = base(
        json!({"name": "a", "namespace": "shop"}),
        json!([{"name": "istio-proxy", "image": "istio/proxyv2"}]),
    );
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop", "operation": "CREATE",
            "userInfo": {"username": "alice"}, "object": object, "oldObject": null,
            "dryRun": false
        }
    });
    let answer = injector.review(&serde_json::to_vec(&review).unwrap());
    let response = &answer.body["response"];
    assert_eq!(response["allowed"], true, "{response}");
    assert!(response.get("patch").is_none(), "{response}");
    let warnings = response["warnings"].as_array().expect("a warning");
    assert_eq!(warnings.len(), 1);
    let w = warnings[0].as_str().unwrap();
    assert!(w.contains("Istio") && w.contains("not injected"), "{w}");
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(text.contains(r#"skips_total{reason="istio"} 1"#), "{text}");
}

#[test]
fn trellis_inject_leaves_a_linkerd_workload_alone_and_says_why() {
    let mut doc = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"template": {
            "metadata": {"annotations": {"linkerd.io/inject": "enabled"}},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}
        }}
    });
    let before = doc.clone();
    let mut notes = Vec::new();
    inject_value(
        &mut doc,
        &default_mesh(),
        &InjectContext::default(),
        &mut notes,
    )
    .unwrap();
    assert_eq!(doc, before, "unchanged");
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains("Linkerd") && notes[0].contains("not injected"),
        "{notes:?}"
    );
}
