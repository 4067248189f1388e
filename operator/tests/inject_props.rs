//! Properties of injection over generated pods: the patch applies to the raw JSON, gives a pod
//! equal to the one returned, injection is never applied twice, and uninject restores the pod.
use proptest::prelude::*;
use serde_json::{Value, json};
use trellis_operator::inject::{
    Decision, InjectContext, NamespaceInfo, default_mesh, inject, uninject_pod_json,
};

fn container(name: String, port: Option<u16>, probe: Option<u16>) -> Value {
    let mut c = json!({"name": name, "image": "app:1"});
    if let Some(p) = port {
        c["ports"] = json!([{"name": "http", "containerPort": p}]);
    }
    if let Some(p) = probe {
        c["readinessProbe"] = json!({"httpGet": {"path": "/", "port": p}});
    }
    c
}

prop_compose! {
    fn pod()(
        containers in prop::collection::vec(
            (any::<Option<u16>>().prop_map(|p| p.map(|p| p.max(1))), any::<Option<u16>>().prop_map(|p| p.map(|p| p.max(1)))),
            1..4),
        init in prop::option::of(prop::collection::vec("[a-z]{1,8}", 0..3)),
        volumes in prop::option::of(prop::collection::vec("[a-z]{1,8}", 0..3)),
        annotations in prop::option::of(prop::collection::btree_map("[a-z]{1,6}(\\.[a-z]{1,4}/[a-z~]{1,6})?", "[ -~]{0,10}", 0..3)),
        labels in prop::option::of(prop::collection::btree_map("[a-z]{1,6}", "[a-z]{0,6}", 0..3)),
    ) -> Value {
        let containers: Vec<Value> = containers
            .into_iter()
            .enumerate()
            .map(|(i, (port, probe))| container(format!("c{i}"), port, probe))
            .collect();
        let mut pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {"containers": containers},
        });
        if let Some(init) = init {
            pod["spec"]["initContainers"] = init.iter().map(|n| json!({"name": format!("i-{n}"), "image": "i"})).collect();
        }
        if let Some(volumes) = volumes {
            pod["spec"]["volumes"] = volumes.iter().map(|n| json!({"name": format!("v-{n}"), "emptyDir": {}})).collect();
        }
        if let Some(a) = annotations {
            pod["metadata"]["annotations"] = json!(a);
        }
        if let Some(l) = labels {
            pod["metadata"]["labels"] = json!(l);
        }
        pod
    }
}

/// Empty holders come back absent (same meaning to Kubernetes; see `uninject_pod_json`).
fn normalized(mut pod: Value) -> Value {
    for (parent, key) in [
        ("metadata", "annotations"),
        ("spec", "initContainers"),
        ("spec", "volumes"),
    ] {
        let obj = pod[parent].as_object_mut().unwrap();
        if obj.get(key).is_some_and(|v| {
            v.as_object().is_some_and(|m| m.is_empty())
                || v.as_array().is_some_and(|a| a.is_empty())
        }) {
            obj.remove(key);
        }
    }
    pod
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
    #[test]
    fn inject_applies_and_reverses(input in pod()) {
        let typed = serde_json::from_value(input.clone()).unwrap();
        let ns = NamespaceInfo { name: "shop", labels: None };
        let decision = inject(&typed, &ns, &default_mesh(), &InjectContext::default());
        let Decision::Patch { patch, pod, .. } = decision else {
            return Err(TestCaseError::fail(format!("not injected: {decision:?}")));
        };
        let mut raw = input.clone();
        json_patch::patch(&mut raw, &patch).unwrap();
        let reparsed: k8s_openapi::api::core::v1::Pod = serde_json::from_value(raw.clone()).unwrap();
        prop_assert_eq!(&reparsed, pod.as_ref());
        // Never twice.
        let again = inject(&reparsed, &ns, &default_mesh(), &InjectContext::default());
        let skipped = matches!(again, Decision::Skip { .. });
        prop_assert!(skipped);
        // Our containers come first, in order.
        let names: Vec<&str> = raw["spec"]["initContainers"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        prop_assert_eq!(&names[..2], &["trellis-init", "trellis-proxy"]);
        prop_assert!(uninject_pod_json(&mut raw));
        prop_assert_eq!(raw, normalized(input));
    }
}
