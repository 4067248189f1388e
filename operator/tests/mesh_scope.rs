//! One predicate decides which pods are meshed: the webhook configuration (which pods the API
//! server sends to the operator), the injector (which of those get a sidecar) and the compiler
//! (which namespaces get the `trellis-proxy` and `trellis-trust-bundle` ConfigMaps the sidecar
//! mounts) must agree, or pods hang in ContainerCreating (injected, no ConfigMaps) or
//! namespaces are meshed on paper only (ConfigMaps, no sidecars).
//!
//! The test plays the API server: it evaluates the generated `MutatingWebhookConfiguration`'s
//! selectors the way the API server does, runs the injector on what would reach it, and then
//! compiles a snapshot holding the pods as created. Every namespace and pod shape is crossed
//! with the default and a custom Mesh namespace selector.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde_json::json;
use trellis_operator::api::{Mesh, MeshSpec};
use trellis_operator::compiler::{self, SlimPod, Snapshot};
use trellis_operator::inject::{Decision, InjectContext, NamespaceInfo, inject, webhook_config};
use trellis_operator::pods::PodSet;

const OPERATOR_NS: &str = "mesh-ops";

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `metav1.LabelSelector` semantics, as the API server applies them.
fn selects(sel: Option<&LabelSelector>, l: &BTreeMap<String, String>) -> bool {
    let Some(sel) = sel else { return true };
    let by_labels = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| l.get(k) == Some(v));
    let by_expressions = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => l.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => l.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => l.contains_key(&e.key),
            "DoesNotExist" => !l.contains_key(&e.key),
            op => panic!("unknown operator {op}"),
        }
    });
    by_labels && by_expressions
}

/// Whether the API server sends a pod with `pod_labels` in a namespace with `ns_labels`.
fn webhook_called(
    cfg: &MutatingWebhookConfiguration,
    ns_labels: &BTreeMap<String, String>,
    pod_labels: &BTreeMap<String, String>,
) -> bool {
    cfg.webhooks.iter().flatten().any(|w| {
        selects(w.namespace_selector.as_ref(), ns_labels)
            && selects(w.object_selector.as_ref(), pod_labels)
    })
}

fn pod(namespace: &str, labels: BTreeMap<String, String>) -> Pod {
    let mut p = Pod::default();
    p.metadata.name = Some("p".into());
    p.metadata.namespace = Some(namespace.into());
    p.metadata.labels = Some(labels);
    p.spec = Some(PodSpec {
        containers: vec![Container {
            name: "app".into(),
            image: Some("app:1".into()),
            ..Default::default()
        }],
        ..Default::default()
    });
    p
}

fn meshes() -> Vec<(&'static str, MeshSpec)> {
    let spec = |v| serde_json::from_value::<MeshSpec>(v).unwrap();
    vec![
        ("default selector", spec(json!({}))),
        (
            "custom selector",
            spec(
                json!({"injection": {"namespaceSelector": {"matchLabels": {"team": "a"}},
                                      "excludedNamespaces": ["legacy"]}}),
            ),
        ),
    ]
}

/// Namespace shapes: name and labels (the API server adds `kubernetes.io/metadata.name`).
fn namespaces() -> Vec<(&'static str, BTreeMap<String, String>)> {
    [
        ("plain", labels(&[])),
        ("labelled", labels(&[("trellis.dev/inject", "enabled")])),
        ("team-a", labels(&[("team", "a")])),
        (
            "team-a-disabled",
            labels(&[("team", "a"), ("trellis.dev/inject", "disabled")]),
        ),
        (
            "both",
            labels(&[("team", "a"), ("trellis.dev/inject", "enabled")]),
        ),
        ("disabled", labels(&[("trellis.dev/inject", "disabled")])),
        ("legacy", labels(&[("trellis.dev/inject", "enabled")])),
        ("kube-system", labels(&[("trellis.dev/inject", "enabled")])),
        (OPERATOR_NS, labels(&[("trellis.dev/inject", "enabled")])),
    ]
    .into_iter()
    .map(|(n, mut l)| {
        l.insert("kubernetes.io/metadata.name".into(), n.to_string());
        (n, l)
    })
    .collect()
}

fn pod_shapes() -> Vec<BTreeMap<String, String>> {
    vec![
        labels(&[]),
        labels(&[("trellis.dev/inject", "enabled")]),
        labels(&[("trellis.dev/inject", "disabled")]),
    ]
}

#[test]
fn webhook_configuration_injector_and_compiler_agree() {
    for (mesh_name, spec) in meshes() {
        let mut mesh = Mesh::new("default", spec.clone());
        mesh.metadata.uid = Some("uid".into());
        let cfg = webhook_config::desired(&mesh, "pem", OPERATOR_NS);
        let ctx = InjectContext {
            operator_namespace: OPERATOR_NS.into(),
        };
        for (ns, ns_labels) in namespaces() {
            let info = NamespaceInfo {
                name: ns,
                labels: Some(&ns_labels),
            };
            // Which pods end up with a sidecar: the API server must call the webhook, and the
            // injector must patch. The injector never wants a pod the webhook cannot see.
            let mut created = Vec::new();
            let mut default_pod_injected = false;
            for pod_labels in pod_shapes() {
                let p = pod(ns, pod_labels.clone());
                let wants = matches!(inject(&p, &info, &spec, &ctx), Decision::Patch { .. });
                let called = webhook_called(&cfg, &ns_labels, &pod_labels);
                assert!(
                    called || !wants,
                    "{mesh_name}: the injector wants pod {pod_labels:?} in {ns} {ns_labels:?}, \
                     but the webhook configuration never sends it"
                );
                let injected = called && wants;
                if pod_labels.is_empty() {
                    default_pod_injected = injected;
                }
                let mut slim = SlimPod::from(&p);
                // Distinct names: the pod cache keys pods by namespace and name.
                slim.metadata.name = Some(format!("p-{}", created.len()));
                if injected {
                    slim.metadata.annotations = Some(labels(&[(
                        "trellis.dev/proxy-version",
                        "ghcr.io/trellis-mesh/trellis-proxy:0.1.0",
                    )]));
                }
                created.push((injected, slim));
            }

            // The namespace's ConfigMaps: with no pod yet, exactly when a pod without an
            // opinion would be injected; with the pods created, whenever any was injected.
            let mut namespace = Namespace::default();
            namespace.metadata.name = Some(ns.into());
            namespace.metadata.labels = Some(ns_labels.clone());
            let snapshot = |pods: Vec<SlimPod>| Snapshot {
                mesh: Some(Arc::new(mesh.clone())),
                namespaces: vec![Arc::new(namespace.clone())],
                pods: PodSet::from_pods(&pods),
                settings: trellis_operator::controller::compile_settings(OPERATOR_NS),
                ..Default::default()
            };
            let empty = compiler::meshed_namespaces(&snapshot(Vec::new())).contains(ns);
            assert_eq!(
                empty, default_pod_injected,
                "{mesh_name}: namespace {ns} {ns_labels:?}: compiler says meshed={empty}, \
                 a new pod is injected={default_pod_injected}"
            );
            let any_injected = created.iter().any(|(i, _)| *i);
            let pods = created.into_iter().map(|(_, p)| p).collect();
            let out = compiler::compile(&snapshot(pods));
            assert_eq!(
                out.meshed.contains(ns),
                empty || any_injected,
                "{mesh_name}: namespace {ns}: a namespace with an injected pod gets its config"
            );
            if any_injected {
                assert!(
                    out.configs.contains_key(ns),
                    "{mesh_name}: no trellis-proxy config for {ns}, whose injected pod mounts it"
                );
            }
        }
    }
}

/// The two cases, spelled out: a pod that opts in by label in an unselected namespace
/// gets its ConfigMaps; a namespace with only the default label under a custom selector is
/// neither injected nor configured.
#[test]
fn opted_in_pods_get_configs_and_a_custom_selector_is_the_whole_rule() {
    let mut batch = Namespace::default();
    batch.metadata.name = Some("batch".into());
    let mut p = SlimPod::from(&pod("batch", labels(&[("trellis.dev/inject", "enabled")])));
    p.metadata.annotations = None;
    let out = compiler::compile(&Snapshot {
        namespaces: vec![Arc::new(batch.clone())],
        pods: PodSet::from_pods([&p]),
        ..Default::default()
    });
    assert!(out.configs.contains_key("batch"), "{:?}", out.meshed);

    let spec: MeshSpec = serde_json::from_value(
        json!({"injection": {"namespaceSelector": {"matchLabels": {"team": "a"}}}}),
    )
    .unwrap();
    let mut labelled = Namespace::default();
    labelled.metadata.name = Some("shop".into());
    labelled.metadata.labels = Some(labels(&[("trellis.dev/inject", "enabled")]));
    let out = compiler::compile(&Snapshot {
        mesh: Some(Arc::new(Mesh::new("default", spec))),
        namespaces: vec![Arc::new(labelled)],
        ..Default::default()
    });
    assert!(out.meshed.is_empty(), "{:?}", out.meshed);
}
