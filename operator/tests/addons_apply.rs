//! The addon controller's pass (`trellis_operator::addons::controller`) against recorded API
//! exchanges: what reaches the API server when the observability addons are switched on,
//! changed, deleted behind the operator's back, switched off, or asked to integrate with a
//! Prometheus Operator that is not there. Each request is checked for method, path and body, in
//! order, and against the operator's RBAC; "no further request" is proven by seeing every
//! client handle dropped.

mod recorded;

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use trellis_operator::addons::controller::{PROGRESS, RESYNC, drive, reconcile_once};
use trellis_operator::addons::desired::{self, Inputs, Kind, Object};
use trellis_operator::api::conditions::{Condition, ConditionStatus};
use trellis_operator::api::{Mesh, MeshSpec, MeshStatus};
use trellis_operator::status::StatusWriter;

use recorded::{ApiServer, Exchange, api_status, mock, verifier};

const NS: &str = "trellis-system";
const NOW: &str = "2026-11-29T16:00:00Z";
const MESH: &str = "/apis/trellis.dev/v1alpha1/meshes/default";
const DISCOVERY: &str = "/apis/monitoring.coreos.com/v1";
const STATUS: &str = "/apis/trellis.dev/v1alpha1/meshes/default/status?&force=true&fieldManager=trellis-operator%2Faddons";
const LABEL: &str = "labelSelector=trellis.dev%2Faddon";

fn mesh(observability: Value) -> Mesh {
    let spec: MeshSpec = serde_json::from_value(json!({ "observability": observability })).unwrap();
    let mut m = Mesh::new("default", spec);
    m.metadata.uid = Some("mesh-uid".into());
    m.metadata.generation = Some(4);
    m.metadata.resource_version = Some("40".into());
    m
}

fn all_on() -> Mesh {
    mesh(
        json!({"metrics": {"enabled": true}, "dashboards": {"enabled": true},
                "tracing": {"enabled": true}}),
    )
}

fn desired_of(m: &Mesh, served: bool) -> Vec<Object> {
    desired::desired(&Inputs {
        mesh: m,
        namespace: NS,
        prometheus_operator: served,
    })
    .unwrap()
}

/// The collection path of `kind` (ConfigMaps across namespaces, the rest in `NS`).
fn collection(kind: Kind) -> String {
    let (group, version, _, plural, namespaced) = kind.gvk();
    let base = if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    if namespaced && kind != Kind::ConfigMap {
        format!("{base}/namespaces/{NS}/{plural}")
    } else {
        format!("{base}/{plural}")
    }
}

fn object_path(o: &Object) -> String {
    let (group, version, _, plural, _) = o.key.kind.gvk();
    let base = if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    match &o.key.namespace {
        Some(ns) => format!("{base}/namespaces/{ns}/{plural}/{}", o.key.name),
        None => format!("{base}/{plural}/{}", o.key.name),
    }
}

fn get(path: &str, reply: Value) -> Exchange {
    recorded::exchange(Method::GET, path, |_| {}, reply)
}

fn discovery(served: bool) -> Exchange {
    if served {
        get(
            DISCOVERY,
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "monitoring.coreos.com/v1",
                   "resources": [{"name": "podmonitors", "namespaced": true, "kind": "PodMonitor", "verbs": ["list"]}]}),
        )
    } else {
        Exchange {
            status: 404,
            ..get(
                DISCOVERY,
                api_status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            )
        }
    }
}

/// What the cluster holds: the objects as the API server would return them (Deployments
/// with a ready status when `ready`).
fn in_cluster(objs: &[Object], ready: bool) -> Vec<(Kind, Value)> {
    objs.iter()
        .map(|o| {
            let mut v = o.body.clone();
            v["metadata"]["uid"] = json!(format!("uid-{}", o.key.name));
            v["metadata"]["resourceVersion"] = json!("7");
            if o.key.kind == Kind::Deployment {
                v["metadata"]["generation"] = json!(2);
                v["status"] = json!({"observedGeneration": 2, "replicas": 1,
                    "updatedReplicas": 1, "readyReplicas": i32::from(ready)});
            }
            (o.key.kind, v)
        })
        .collect()
}

/// The lists a pass makes, answered with `existing`.
fn lists(served: bool, existing: &[(Kind, Value)]) -> Vec<Exchange> {
    Kind::ALL
        .into_iter()
        .filter(|k| served || !k.is_prometheus_operator())
        .map(|kind| {
            let items: Vec<Value> = existing
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, v)| v.clone())
                .collect();
            get(
                &format!("{}?&{LABEL}", collection(kind)),
                json!({"apiVersion": kind.api_version(), "kind": format!("{}List", kind.gvk().2),
                       "metadata": {"resourceVersion": "9"}, "items": items}),
            )
        })
        .collect()
}

/// A server-side apply of `o` by the addon controller, checked against its desired body.
fn apply(o: &Object, extra: impl FnOnce(&Value) + Send + 'static) -> Exchange {
    let want = o.body.clone();
    recorded::exchange(
        Method::PATCH,
        &format!(
            "{}?&force=true&fieldManager=trellis-operator%2Faddons",
            object_path(o)
        ),
        move |body| {
            assert_eq!(body, &want);
            let owner = &body["metadata"]["ownerReferences"][0];
            assert_eq!(
                (&owner["kind"], &owner["uid"]),
                (&json!("Mesh"), &json!("mesh-uid"))
            );
            extra(body);
        },
        Value::Null,
    )
}

fn delete(o: &Object) -> Exchange {
    recorded::exchange(
        Method::DELETE,
        &format!("{}?", object_path(o)),
        |body| assert_eq!(body["propagationPolicy"], "Background"),
        json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
    )
}

/// The status apply, checked to carry exactly `ObservabilityReady` with `status`, `reason`
/// and `message`.
fn status(s: &'static str, reason: &'static str, message: String) -> Exchange {
    recorded::exchange(
        Method::PATCH,
        STATUS,
        move |body| {
            let conditions = body["status"]["conditions"].as_array().unwrap();
            assert_eq!(conditions.len(), 1, "{body}");
            let c = &conditions[0];
            assert_eq!(
                (&c["type"], &c["status"], &c["reason"], &c["message"]),
                (
                    &json!("ObservabilityReady"),
                    &json!(s),
                    &json!(reason),
                    &json!(message)
                ),
            );
            assert_eq!(c["observedGeneration"], 4);
            assert!(body["status"].get("rollout").is_none());
        },
        status_reply(),
    )
}

/// What the API server returns for the status apply: the Mesh.
fn status_reply() -> Value {
    serde_json::to_value(Mesh::new("default", MeshSpec::default())).unwrap()
}

fn writer(client: &kube::Client) -> StatusWriter {
    StatusWriter::with_clock(client.clone(), Arc::new(|| NOW.to_string())).for_controller("addons")
}

async fn run_pass(expected: Vec<Exchange>) -> Result<Duration, String> {
    let (client, handle) = mock();
    let v = verifier(handle, expected);
    let status = writer(&client);
    let out = reconcile_once(&client, &status, NS)
        .await
        .map_err(|e| e.to_string());
    drop((client, status));
    v.await.unwrap();
    out
}

/// A Mesh that already reports `condition` (so an equal one is not written again).
fn reporting(mut m: Mesh, status: ConditionStatus, reason: &str, message: &str) -> Mesh {
    let mut c = Condition::new("ObservabilityReady", status, reason, message, Some(4));
    c.last_transition_time = "2026-11-29T15:00:00Z".into();
    m.status = Some(MeshStatus {
        conditions: vec![c],
        ..Default::default()
    });
    m
}

const ALL_AVAILABLE: &str = "prometheus: Available (1/1 ready); grafana: Available (1/1 ready); jaeger: Available (1/1 ready)";

#[tokio::test]
async fn switching_the_addons_on_applies_every_object_owned_by_the_mesh() {
    let m = all_on();
    let objs = desired_of(&m, false);
    let mut ex = vec![
        get(MESH, serde_json::to_value(&m).unwrap()),
        discovery(false),
    ];
    ex.extend(lists(false, &[]));
    ex.extend(objs.iter().map(|o| apply(o, |_| {})));
    ex.push(status(
        "False",
        "Progressing",
        "prometheus: Progressing (Deployment being created); grafana: Progressing (Deployment \
         being created); jaeger: Progressing (Deployment being created)"
            .into(),
    ));
    assert_eq!(objs.len(), 15);
    assert_eq!(run_pass(ex).await, Ok(PROGRESS));
}

#[tokio::test]
async fn a_converged_cluster_gets_no_write() {
    let m = reporting(all_on(), ConditionStatus::True, "Available", ALL_AVAILABLE);
    let objs = desired_of(&m, false);
    let mut ex = vec![
        get(MESH, serde_json::to_value(&m).unwrap()),
        discovery(false),
    ];
    ex.extend(lists(false, &in_cluster(&objs, true)));
    assert_eq!(run_pass(ex).await, Ok(RESYNC));
}

#[tokio::test]
async fn a_changed_image_rolls_the_deployment() {
    let old = all_on();
    let before = desired_of(&old, false);
    let mut m = reporting(all_on(), ConditionStatus::True, "Available", ALL_AVAILABLE);
    m.spec.observability.dashboards.image = Some("registry.local/grafana:12.2.1".into());
    m.metadata.generation = Some(4);
    let after = desired_of(&m, false);
    let new_grafana = after
        .iter()
        .find(|o| o.key.kind == Kind::Deployment && o.key.name == desired::GRAFANA)
        .unwrap();
    let mut ex = vec![
        get(MESH, serde_json::to_value(&m).unwrap()),
        discovery(false),
    ];
    ex.extend(lists(false, &in_cluster(&before, true)));
    ex.push(apply(new_grafana, |body| {
        assert_eq!(
            body["spec"]["template"]["spec"]["containers"][0]["image"],
            "registry.local/grafana:12.2.1"
        );
    }));
    ex.push(status(
        "False",
        "Progressing",
        "prometheus: Available (1/1 ready); grafana: Progressing (Deployment being updated); \
         jaeger: Available (1/1 ready)"
            .into(),
    ));
    assert_eq!(run_pass(ex).await, Ok(PROGRESS));
}

/// The loop: a converged pass, then a watch event (the Deployment was deleted) starts a pass
/// that applies it again.
#[tokio::test]
async fn a_deleted_deployment_is_restored_on_the_next_change() {
    let m = reporting(all_on(), ConditionStatus::True, "Available", ALL_AVAILABLE);
    let objs = desired_of(&m, false);
    let jaeger = objs
        .iter()
        .find(|o| o.key.kind == Kind::Deployment && o.key.name == desired::JAEGER)
        .unwrap()
        .clone();
    let without_jaeger: Vec<(Kind, Value)> = in_cluster(&objs, true)
        .into_iter()
        .filter(|(k, v)| !(*k == Kind::Deployment && v["metadata"]["name"] == desired::JAEGER))
        .collect();
    let (client, handle) = mock();
    let status_writer = writer(&client);
    let (tx, rx) = futures::channel::mpsc::unbounded::<()>();
    let shutdown = CancellationToken::new();
    let task = {
        let (client, shutdown) = (client.clone(), shutdown.clone());
        tokio::spawn(async move { drive(&client, &status_writer, NS, rx, shutdown).await })
    };
    drop(client);
    let mut server = ApiServer(handle);
    let within = Duration::from_secs(5);
    let pass = |existing: &[(Kind, Value)]| {
        let mut ex = vec![
            get(MESH, serde_json::to_value(&m).unwrap()),
            discovery(false),
        ];
        ex.extend(lists(false, existing));
        ex
    };
    for ex in pass(&in_cluster(&objs, true)) {
        server.expect(within, ex).await;
    }
    server.expect_none_for(Duration::from_millis(200)).await;
    tx.unbounded_send(()).unwrap();
    let mut second = pass(&without_jaeger);
    second.push(apply(&jaeger, |_| {}));
    second.push(status(
        "False",
        "Progressing",
        "prometheus: Available (1/1 ready); grafana: Available (1/1 ready); jaeger: Progressing \
         (Deployment being created)"
            .into(),
    ));
    for ex in second {
        server.expect(within, ex).await;
    }
    shutdown.cancel();
    task.await.unwrap();
    server.expect_no_more().await;
}

/// `enabled: false` deletes what was installed, by name, each object found by the addon
/// label and owned by the Mesh.
#[tokio::test]
async fn switching_the_addons_off_deletes_what_was_installed() {
    let installed = desired_of(&all_on(), false);
    let m = mesh(json!({}));
    let mut ex = vec![
        get(MESH, serde_json::to_value(&m).unwrap()),
        discovery(false),
    ];
    ex.extend(lists(false, &in_cluster(&installed, true)));
    ex.extend(installed.iter().map(delete));
    ex.push(status(
        "True",
        "Disabled",
        "prometheus: disabled; grafana: disabled; jaeger: disabled".into(),
    ));
    assert_eq!(run_pass(ex).await, Ok(RESYNC));
}

/// Integrate mode on a cluster without `monitoring.coreos.com/v1`: the dashboards ConfigMap is
/// kept, nothing of the missing API is called, and the condition says what is missing and where
/// the metrics are instead; the next pass writes nothing and does not hurry (no error loop).
#[tokio::test]
async fn integrate_without_the_prometheus_operator_is_a_condition_not_an_error() {
    let m = mesh(json!({"mode": "Integrate", "metrics": {"enabled": true},
                        "dashboards": {"enabled": true, "namespace": "monitoring"}}));
    let objs = desired_of(&m, false);
    assert_eq!(objs.len(), 1);
    let message = "metrics: the Prometheus Operator API (monitoring.coreos.com/v1) is not served, \
                   so no PodMonitor, ServiceMonitor or PrometheusRule is kept; injected pods carry \
                   prometheus.io/scrape|port|path annotations for an annotation-based scrape; \
                   dashboards: ConfigMap monitoring/trellis-dashboards labelled grafana_dashboard=1; \
                   tracing: disabled";
    let mut ex = vec![
        get(MESH, serde_json::to_value(&m).unwrap()),
        discovery(false),
    ];
    ex.extend(lists(false, &[]));
    ex.push(apply(&objs[0], |body| {
        assert_eq!(body["metadata"]["namespace"], "monitoring");
        assert_eq!(body["metadata"]["labels"]["grafana_dashboard"], "1");
    }));
    ex.push(status("False", "PrometheusOperatorMissing", message.into()));
    assert_eq!(run_pass(ex).await, Ok(RESYNC));

    let m = reporting(
        m,
        ConditionStatus::False,
        "PrometheusOperatorMissing",
        message,
    );
    let mut ex = vec![
        get(MESH, serde_json::to_value(&m).unwrap()),
        discovery(false),
    ];
    ex.extend(lists(false, &in_cluster(&objs, true)));
    assert_eq!(run_pass(ex).await, Ok(RESYNC));
}

#[tokio::test]
async fn integrate_with_the_prometheus_operator_keeps_its_objects() {
    let m = mesh(json!({"mode": "Integrate", "metrics": {"enabled": true}}));
    let objs = desired_of(&m, true);
    let mut ex = vec![
        get(MESH, serde_json::to_value(&m).unwrap()),
        discovery(true),
    ];
    ex.extend(lists(true, &[]));
    ex.extend(objs.iter().map(|o| apply(o, |_| {})));
    ex.push(status(
        "True",
        "Available",
        "metrics: PodMonitor trellis-system/trellis-proxies, ServiceMonitor \
         trellis-system/trellis-operator, PrometheusRule trellis-system/trellis; dashboards: \
         disabled; tracing: disabled"
            .into(),
    ));
    assert_eq!(
        objs.iter().map(|o| o.key.kind).collect::<Vec<_>>(),
        [Kind::PodMonitor, Kind::ServiceMonitor, Kind::PrometheusRule]
    );
    assert_eq!(run_pass(ex).await, Ok(RESYNC));
}

/// A refused write is reported in the condition with the API server's reason and where the
/// grant lives; the other objects are still applied.
#[tokio::test]
async fn a_refused_apply_is_reported_with_its_reason() {
    let m = mesh(json!({"metrics": {"enabled": true}}));
    let objs = desired_of(&m, false);
    let mut ex = vec![
        get(MESH, serde_json::to_value(&m).unwrap()),
        discovery(false),
    ];
    ex.extend(lists(false, &[]));
    for o in &objs {
        let mut e = apply(o, |_| {});
        if o.key.kind == Kind::ClusterRole {
            e.status = 403;
            e.reply = api_status(
                403,
                "Forbidden",
                "clusterroles.rbac.authorization.k8s.io \"trellis-prometheus\" is forbidden: user \"system:serviceaccount:trellis-system:trellis-operator\" is attempting to grant RBAC permissions not currently held",
            );
        }
        ex.push(e);
    }
    ex.push(recorded::exchange(
        Method::PATCH,
        STATUS,
        |body| {
            let c = &body["status"]["conditions"][0];
            assert_eq!(c["reason"], "ApplyFailed");
            assert_eq!(c["status"], "False");
            let msg = c["message"].as_str().unwrap();
            assert!(
                msg.starts_with("applying ClusterRole trellis-prometheus failed: "),
                "{msg}"
            );
            assert!(
                msg.contains(
                    "attempting to grant RBAC permissions not currently held (403 Forbidden)"
                ),
                "{msg}"
            );
            assert!(msg.contains("config/rbac"), "{msg}");
        },
        status_reply(),
    ));
    assert_eq!(run_pass(ex).await, Ok(PROGRESS));
}

#[tokio::test]
async fn without_a_mesh_nothing_is_done() {
    let ex = vec![Exchange {
        status: 404,
        ..get(
            MESH,
            api_status(404, "NotFound", "meshes.trellis.dev \"default\" not found"),
        )
    }];
    assert_eq!(run_pass(ex).await, Ok(RESYNC));
}
