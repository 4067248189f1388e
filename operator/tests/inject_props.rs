//! Properties of injection over generated pods: the patch applies to the raw JSON, gives a pod
//! equal to the one returned, injection is never applied twice, every network probe goes to
//! the admin port with its timing kept, and uninject restores the pod (probes included).
use proptest::prelude::*;
use serde_json::{Value, json};
use trellis_operator::inject::{
    Decision, InjectContext, NamespaceInfo, default_mesh, inject, uninject_pod_json,
};

/// One probe of any kind the kubelet knows: network probes on a numeric port, the container's
/// named port or a name it does not declare, with or without `host:`, headers, scheme and timing
/// fields; or `exec`.
fn probe() -> impl Strategy<Value = Value> {
    let port = prop_oneof![
        (1u16..=65535).prop_map(|p| json!(p)),
        Just(json!("http")),
        Just(json!("missing")),
    ];
    let action = prop_oneof![
        (
            port.clone(),
            prop::option::of("/[a-z]{0,6}(\\?[a-z]=[0-9])?"),
            prop::option::of(prop_oneof![Just("HTTP"), Just("HTTPS")]),
            prop::option::of(Just("10.0.0.9")),
            prop::collection::vec(("X-[A-Z][a-z]{1,5}", "[a-z0-9]{0,6}"), 0..3),
        )
            .prop_map(|(port, path, scheme, host, headers)| {
                let mut h = json!({"port": port});
                if let Some(p) = path {
                    h["path"] = json!(p);
                }
                if let Some(s) = scheme {
                    h["scheme"] = json!(s);
                }
                if let Some(host) = host {
                    h["host"] = json!(host);
                }
                if !headers.is_empty() {
                    h["httpHeaders"] = headers
                        .into_iter()
                        .map(|(name, value)| json!({"name": name, "value": value}))
                        .collect();
                }
                json!({"httpGet": h})
            }),
        (port, prop::option::of(Just("10.0.0.9"))).prop_map(|(port, host)| {
            let mut t = json!({"port": port});
            if let Some(host) = host {
                t["host"] = json!(host);
            }
            json!({"tcpSocket": t})
        }),
        (1i32..=65535, prop::option::of("[a-z]{0,6}")).prop_map(|(port, service)| {
            let mut g = json!({"port": port});
            if let Some(s) = service {
                g["service"] = json!(s);
            }
            json!({"grpc": g})
        }),
        Just(json!({"exec": {"command": ["true"]}})),
    ];
    let timing = prop::collection::btree_map(
        prop_oneof![
            Just("initialDelaySeconds"),
            Just("periodSeconds"),
            Just("timeoutSeconds"),
            Just("successThreshold"),
            Just("failureThreshold"),
            Just("terminationGracePeriodSeconds"),
        ],
        1i64..=60,
        0..4,
    );
    (action, timing).prop_map(|(mut p, timing)| {
        for (k, v) in timing {
            p[k] = json!(v);
        }
        p
    })
}

/// A container with an optional named port `http` and any of the three probes.
fn container() -> impl Strategy<Value = Value> {
    (
        any::<Option<u16>>().prop_map(|p| p.map(|p| p.max(1))),
        prop::option::of(probe()),
        prop::option::of(probe()),
        prop::option::of(probe()),
    )
        .prop_map(|(port, liveness, readiness, startup)| {
            let mut c = json!({"image": "app:1"});
            if let Some(p) = port {
                c["ports"] = json!([{"name": "http", "containerPort": p}]);
            }
            for (field, p) in [
                ("livenessProbe", liveness),
                ("readinessProbe", readiness),
                ("startupProbe", startup),
            ] {
                if let Some(p) = p {
                    c[field] = p;
                }
            }
            c
        })
}

prop_compose! {
    fn pod()(
        containers in prop::collection::vec(container(), 1..4),
        // Init containers; `Some` ones are native sidecars (restartPolicy Always) with probes.
        init in prop::option::of(prop::collection::vec(prop::option::of(container()), 0..3)),
        volumes in prop::option::of(prop::collection::vec("[a-z]{1,8}", 0..3)),
        annotations in prop::option::of(prop::collection::btree_map("[a-z]{1,6}(\\.[a-z]{1,4}/[a-z~]{1,6})?", "[ -~]{0,10}", 0..3)),
        labels in prop::option::of(prop::collection::btree_map("[a-z]{1,6}", "[a-z]{0,6}", 0..3)),
    ) -> Value {
        let containers: Vec<Value> = containers
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| {
                c["name"] = json!(format!("c{i}"));
                c
            })
            .collect();
        let mut pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {"containers": containers},
        });
        if let Some(init) = init {
            pod["spec"]["initContainers"] = init
                .into_iter()
                .enumerate()
                .map(|(i, sidecar)| match sidecar {
                    Some(mut c) => {
                        c["name"] = json!(format!("s{i}"));
                        c["restartPolicy"] = json!("Always");
                        c
                    }
                    None => json!({"name": format!("i{i}"), "image": "i"}),
                })
                .collect();
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
        let Decision::Patch { patch, pod, warnings } = decision else {
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
        // Every network probe without host: on a resolvable port now goes to the admin port;
        // the others are unchanged, and only the unresolvable ones warn.
        let mut expected_warnings = 0;
        let injected: Vec<(&Value, &Value)> = raw["spec"]["containers"].as_array().unwrap().iter()
            .zip(input["spec"]["containers"].as_array().unwrap())
            .chain(raw["spec"]["initContainers"].as_array().unwrap()[2..].iter()
                .zip(input["spec"]["initContainers"].as_array().into_iter().flatten()))
            .collect();
        for (after, before) in injected {
            for field in ["livenessProbe", "readinessProbe", "startupProbe"] {
                let (a, b) = (&after[field], &before[field]);
                if b.is_null() { continue; }
                let action = ["httpGet", "tcpSocket", "grpc"].into_iter().find(|k| !b[k].is_null());
                let Some(action) = action else { prop_assert_eq!(a, b); continue };
                let hostless = b[action]["host"].is_null();
                let port = &b[action]["port"];
                let declared = before["ports"][0]["containerPort"].clone();
                let resolvable = port.is_number() || (port == "http" && !declared.is_null());
                if hostless && resolvable {
                    prop_assert_eq!(&a["httpGet"]["port"], &json!(15020));
                    let timing: Vec<_> = b.as_object().unwrap().iter().filter(|(k, _)| k.as_str() != action).collect();
                    for (k, v) in timing {
                        prop_assert_eq!(&a[k], v);
                    }
                } else {
                    prop_assert_eq!(a, b);
                    if hostless { expected_warnings += 1; }
                }
            }
        }
        prop_assert_eq!(warnings.len(), expected_warnings, "{:?}", warnings);
        prop_assert!(uninject_pod_json(&mut raw));
        prop_assert_eq!(raw, normalized(input));
    }
}
