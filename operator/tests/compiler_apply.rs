//! The compile applier against recorded API exchanges (`tower_test::mock::pair`, the
//! `ApiServerVerifier` pattern of kube-rs controller-rs): every request is checked for method,
//! path and body, in order, and a scenario that expects no request proves it by seeing the
//! client dropped with nothing sent.

mod compiler_fixtures;
mod recorded;

use std::sync::Arc;

use compiler_fixtures::*;
use http::Method;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Client, ResourceExt};
use recorded::{exchange, mock, verifier};
use serde_json::{Value, json};
use trellis_operator::api::conditions::{Condition, ConditionStatus, merge_conditions};
use trellis_operator::api::{Mesh, MeshStatus, TrafficPolicy, TrafficPolicyStatus};
use trellis_operator::compiler::{Output, compile};
use trellis_operator::controller::compile_apply::{
    Applier, ConfigMapAction, StatusTarget, configmap_body, observed_digest, plan_configmaps,
    plan_status, strip_configmap,
};
use trellis_operator::status::StatusWriter;

const NOW: &str = "2026-11-25T17:00:00Z";

/// The shared status writer, with a fixed clock, as the compile controller uses it.
fn writer(client: Client) -> StatusWriter {
    StatusWriter::with_clock(client, Arc::new(|| NOW.to_string())).for_controller("compile")
}

fn world_with_policy() -> World {
    shop()
        .with(traffic_policy("shop", "reviews", "reviews").created(10))
        .with(mesh())
}

/// The ConfigMap the API server holds after our apply (as the reflector would cache it).
fn applied_configmap(out: &Output, ns: &str, mesh: Option<&Mesh>) -> Arc<ConfigMap> {
    let c = &out.configs[ns];
    let body = configmap_body(ns, c.revision(), &c.render(), mesh);
    let mut cm: ConfigMap = serde_json::from_value(body).unwrap();
    strip_configmap(&mut cm);
    Arc::new(cm)
}

fn with_status(tp: &TrafficPolicy, conds: Vec<Condition>) -> Arc<TrafficPolicy> {
    let mut tp = tp.clone();
    tp.status = Some(TrafficPolicyStatus {
        conditions: conds,
        observed_generation: tp.metadata.generation,
        propagation: None,
    });
    Arc::new(tp)
}

/// The propagation writer's `Propagated` on the same object is not the compiler's to compare:
/// with the compiler's own conditions current, no status write is planned (one was planned on
/// every compile, and an event recorded, while another writer's condition was present).
#[test]
fn another_writers_condition_plans_no_compiler_status_write() {
    let w = world_with_policy();
    let out = compile(&w.snap);
    let tp = &w.snap.traffic_policies[0];
    let key = trellis_operator::compiler::ObjectKey::new("shop", "reviews");
    let mut conds = merge_conditions(&[], out.traffic_policies[&key].clone(), NOW);
    let current = with_status(tp, conds.clone());
    assert!(plan_status(&out, &[current], &[], None, &Default::default(), NOW).is_empty());
    let mut propagated = Condition::new(
        "Propagated",
        ConditionStatus::False,
        "Propagating",
        "1 of 2 proxies subscribed to its Service over the discovery stream have not applied generation 1 yet",
        Some(1),
    );
    propagated.last_transition_time = NOW.into();
    conds.push(propagated);
    let current = with_status(tp, conds);
    let plan = plan_status(&out, &[current], &[], None, &Default::default(), NOW);
    assert!(plan.is_empty(), "{} writes planned", plan.len());
}

#[tokio::test]
async fn new_policy_applies_the_namespace_config_and_its_status() {
    let w = world_with_policy();
    let mesh = w.snap.mesh.clone();
    let out = compile(&w.snap);
    let cms = plan_configmaps(&out, &[], mesh.as_deref());
    assert_eq!(cms.len(), 1, "one meshed namespace: {cms:?}");
    let status = plan_status(
        &out,
        &w.snap.traffic_policies,
        &[],
        mesh.as_ref(),
        &w.snap.pods,
        NOW,
    );
    // The TrafficPolicy and the Mesh.
    assert_eq!(status.len(), 2);

    let want_json = out.config("shop").unwrap();
    let revision = out.configs["shop"].revision().to_string();
    let want_digest = trellis_operator::compiler::digest(&want_json);
    let (client, handle) = mock();
    let check_cm = move |b: &Value| {
        assert_eq!(b["apiVersion"], "v1");
        assert_eq!(b["kind"], "ConfigMap");
        assert_eq!(b["metadata"]["name"], "trellis-proxy");
        assert_eq!(b["metadata"]["namespace"], "shop");
        assert_eq!(
            b["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "trellis-operator"
        );
        assert_eq!(
            b["metadata"]["annotations"]["trellis.dev/revision"],
            revision.as_str()
        );
        assert_eq!(
            b["metadata"]["annotations"]["trellis.dev/config-digest"],
            want_digest.as_str()
        );
        assert_eq!(
            b["metadata"]["ownerReferences"],
            json!([{"apiVersion": "trellis.dev/v1alpha1", "kind": "Mesh", "name": "default", "uid": "mesh-uid"}])
        );
        assert_eq!(b["data"]["config.json"], want_json.as_str());
        assert_eq!(b["data"].as_object().unwrap().len(), 1);
    };
    let check_tp = |b: &Value| {
        assert_eq!(b["apiVersion"], "trellis.dev/v1alpha1");
        assert_eq!(b["kind"], "TrafficPolicy");
        let conds = &b["status"]["conditions"];
        assert_eq!(b["status"]["observedGeneration"], 1);
        let types: Vec<_> = conds
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["type"].as_str().unwrap(), c["status"].as_str().unwrap()))
            .collect();
        assert_eq!(
            types,
            [
                ("Accepted", "True"),
                ("Programmed", "True"),
                ("Ready", "True")
            ]
        );
        assert!(
            conds
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["lastTransitionTime"] == NOW)
        );
    };
    let check_mesh = |b: &Value| {
        assert_eq!(b["apiVersion"], "trellis.dev/v1alpha1");
        assert_eq!(b["kind"], "Mesh");
        let conds = b["status"]["conditions"].as_array().unwrap();
        let types: Vec<_> = conds.iter().map(|c| c["type"].as_str().unwrap()).collect();
        // Only the compiler's own part: the API server merges it with the CAReady another
        // controller applied (conditions are a map list keyed by type).
        assert_eq!(types, ["Programmed", "Degraded", "ProxiesUpToDate"]);
        // The fixture's two injected pods carry proxy-version `0.1.0`, not the Mesh's image.
        assert_eq!(b["status"]["proxies"], json!({"total": 2, "upToDate": 0}));
        assert_eq!(conds[2]["status"], "False");
        assert_eq!(conds[2]["reason"], "OutOfDate");
        assert!(b["status"].get("observedGeneration").is_none(), "{b}");
    };
    let v = verifier(
        handle,
        vec![
            exchange(
                Method::PATCH,
                "/api/v1/namespaces/shop/configmaps/trellis-proxy?&force=true&fieldManager=trellis-operator",
                check_cm,
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "trellis-proxy", "namespace": "shop"}}),
            ),
            exchange(
                Method::PATCH,
                "/apis/trellis.dev/v1alpha1/namespaces/shop/trafficpolicies/reviews/status?&force=true&fieldManager=trellis-operator%2Fcompile",
                check_tp,
                serde_json::to_value(w.snap.traffic_policies[0].as_ref()).unwrap(),
            ),
            exchange(
                Method::PATCH,
                "/apis/trellis.dev/v1alpha1/meshes/default/status?&force=true&fieldManager=trellis-operator%2Fcompile",
                check_mesh,
                serde_json::to_value(mesh.as_deref().unwrap()).unwrap(),
            ),
        ],
    );
    // The Mesh already carries a condition another reconciler owns.
    let mut m = (*mesh.unwrap()).clone();
    m.metadata.resource_version = Some("7".into());
    m.status = Some(MeshStatus {
        conditions: vec![Condition {
            last_transition_time: "2026-01-01T00:00:00Z".into(),
            ..Condition::new("CAReady", ConditionStatus::True, "Issued", "", Some(3))
        }],
        ..Default::default()
    });
    let m = Arc::new(m);
    let status = plan_status(
        &out,
        &w.snap.traffic_policies,
        &[],
        Some(&m),
        &w.snap.pods,
        NOW,
    );
    let applier = Applier::new(client.clone(), writer(client), None);
    let (stats, errors) = applier.apply(&cms, &status, Some(&m)).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!((stats.applied, stats.status_patches), (1, 2));
    drop(applier);
    v.await.unwrap();
}

#[tokio::test]
async fn unchanged_config_and_status_issue_no_request() {
    let w = world_with_policy();
    let mesh = w.snap.mesh.clone();
    let out = compile(&w.snap);
    let observed = vec![applied_configmap(&out, "shop", mesh.as_deref())];
    // Status as written by the previous pass, an hour ago: same statuses keep their times.
    let key = trellis_operator::compiler::ObjectKey::new("shop", "reviews");
    let earlier = merge_conditions(
        &[],
        out.traffic_policies[&key].clone(),
        "2026-11-25T16:00:00Z",
    );
    let tps = vec![with_status(&w.snap.traffic_policies[0], earlier)];
    let mut m = (*mesh.clone().unwrap()).clone();
    let (counts, proxies) = trellis_operator::controller::proxies::report(&Default::default(), &m);
    let mut mine = out.mesh.clone();
    mine.push(proxies);
    m.status = Some(MeshStatus {
        conditions: merge_conditions(&[], mine, "2026-11-25T16:00:00Z"),
        proxies: Some(counts),
        ..Default::default()
    });

    // A recompile of the same snapshot: same bytes, nothing to do.
    let again = compile(&w.snap);
    let cms = plan_configmaps(&again, &observed, Some(&m));
    let m = Arc::new(m);
    let status = plan_status(&again, &tps, &[], Some(&m), &Default::default(), NOW);
    assert!(cms.is_empty(), "{cms:?}");
    assert!(status.is_empty(), "{status:?}");

    let (client, handle) = mock();
    let v = verifier(handle, vec![]);
    let applier = Applier::new(
        client.clone(),
        writer(client.clone()),
        Some(Recorder::new(client, Reporter::from("trellis-operator"))),
    );
    let (stats, errors) = applier.apply(&cms, &status, Some(&m)).await;
    assert!(errors.is_empty());
    assert_eq!(stats, Default::default());
    drop(applier);
    v.await.unwrap();

    // But data edited behind our back is repaired.
    let mut edited = (*observed[0]).clone();
    edited
        .data
        .as_mut()
        .unwrap()
        .insert("config.json.sha256".into(), "0".repeat(64));
    let cms = plan_configmaps(&again, &[Arc::new(edited)], Some(&m));
    assert!(matches!(&cms[..], [ConfigMapAction::Apply { namespace, .. }] if namespace == "shop"));
}

#[tokio::test]
async fn conflict_patches_status_and_emits_a_warning_event() {
    let w = world_with_policy().with(traffic_policy("shop", "late", "reviews").created(20));
    let out = compile(&w.snap);
    let late = w
        .snap
        .traffic_policies
        .iter()
        .find(|t| t.name_any() == "late")
        .unwrap()
        .clone();
    let status = plan_status(
        &out,
        std::slice::from_ref(&late),
        &[],
        None,
        &Default::default(),
        NOW,
    );
    assert_eq!(status.len(), 1);
    assert!(matches!(status[0].target, StatusTarget::TrafficPolicy(..)));

    let (client, handle) = mock();
    let v = verifier(
        handle,
        vec![
            exchange(
                Method::PATCH,
                "/apis/trellis.dev/v1alpha1/namespaces/shop/trafficpolicies/late/status?&force=true&fieldManager=trellis-operator%2Fcompile",
                |b| {
                    let c = &b["status"]["conditions"][0];
                    assert_eq!(c["type"], "Accepted");
                    assert_eq!(c["status"], "False");
                    assert_eq!(c["reason"], "Conflicted");
                    assert!(
                        c["message"]
                            .as_str()
                            .unwrap()
                            .contains("TrafficPolicy reviews"),
                        "{c}"
                    );
                    assert_eq!(b["status"]["conditions"][1]["reason"], "NotAccepted");
                    assert_eq!(b["status"]["conditions"][2]["status"], "False");
                },
                serde_json::to_value(late.as_ref()).unwrap(),
            ),
            // Accepted: False (Conflicted) and Programmed: False (NotAccepted) are transitions.
            exchange(
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/shop/events?",
                |b| {
                    assert_eq!(b["type"], "Warning");
                    assert_eq!(b["reason"], "Conflicted");
                    assert_eq!(b["regarding"]["kind"], "TrafficPolicy");
                    assert_eq!(b["regarding"]["name"], "late");
                    assert_eq!(b["reportingController"], "trellis-operator");
                },
                json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e1"}, "eventTime": null}),
            ),
            exchange(
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/shop/events?",
                |b| assert_eq!(b["reason"], "NotAccepted"),
                json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e2"}, "eventTime": null}),
            ),
        ],
    );
    let applier = Applier::new(
        client.clone(),
        writer(client.clone()),
        Some(Recorder::new(client, Reporter::from("trellis-operator"))),
    );
    let (stats, errors) = applier.apply(&[], &status, None).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!((stats.status_patches, stats.events), (1, 2));
    drop(applier);
    v.await.unwrap();
}

#[tokio::test]
async fn namespace_that_left_the_mesh_gets_its_configmap_deleted() {
    let before = compile(&shop().with(namespace("b").meshed()).snap);
    let observed = vec![
        applied_configmap(&before, "shop", None),
        applied_configmap(&before, "b", None),
    ];
    let after = compile(&shop().with(namespace("b")).snap);
    let cms = plan_configmaps(&after, &observed, None);
    assert!(matches!(&cms[..], [ConfigMapAction::Delete { namespace }] if namespace == "b"));

    let (client, handle) = mock();
    let v = verifier(
        handle,
        vec![exchange(
            Method::DELETE,
            "/api/v1/namespaces/b/configmaps/trellis-proxy?",
            |_| {},
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
        )],
    );
    let applier = Applier::new(client.clone(), writer(client), None);
    let (stats, errors) = applier.apply(&cms, &[], None).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(stats.deleted, 1);
    drop(applier);
    v.await.unwrap();
}

#[tokio::test]
async fn failures_are_reported_and_do_not_stop_the_other_namespaces() {
    let w = shop().with(namespace("b").meshed());
    let out = compile(&w.snap);
    let cms = plan_configmaps(&out, &[], None);
    assert_eq!(cms.len(), 2);
    let (client, handle) = mock();
    let mut forbidden = exchange(
        Method::PATCH,
        "/api/v1/namespaces/b/configmaps/trellis-proxy?&force=true&fieldManager=trellis-operator",
        |_| {},
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "forbidden", "reason": "Forbidden", "code": 403, "metadata": {}}),
    );
    forbidden.status = 403;
    let v = verifier(
        handle,
        vec![
            forbidden,
            exchange(
                Method::PATCH,
                "/api/v1/namespaces/shop/configmaps/trellis-proxy?&force=true&fieldManager=trellis-operator",
                |_| {},
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "trellis-proxy"}}),
            ),
        ],
    );
    let applier = Applier::new(client.clone(), writer(client), None);
    let (stats, errors) = applier.apply(&cms, &[], None).await;
    assert_eq!(stats.applied, 1);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].metric_label(), "apply");
    assert!(
        errors[0].to_string().contains("b/trellis-proxy"),
        "{}",
        errors[0]
    );
    drop(applier);
    v.await.unwrap();
}

#[test]
fn refused_config_keeps_the_old_configmap() {
    let mut w = shop().with(namespace("b").meshed());
    let before = compile(&w.snap);
    let observed = vec![
        applied_configmap(&before, "shop", None),
        applied_configmap(&before, "b", None),
    ];
    w.add(peer_auth(
        "shop",
        "p",
        trellis_operator::api::peer_authentication::MtlsMode::Disable,
    ));
    w.snap.settings.max_config_bytes = before.configs["b"].len() + 10;
    let out = compile(&w.snap);
    assert!(out.too_large.contains_key("shop"));
    assert!(
        plan_configmaps(&out, &observed, None).is_empty(),
        "no write, no delete"
    );
}

#[test]
fn stripped_cache_compares_like_the_full_object() {
    let out = compile(&shop().snap);
    let c = &out.configs["shop"];
    let json = c.render();
    let body = configmap_body("shop", c.revision(), &json, None);
    let full: ConfigMap = serde_json::from_value(body).unwrap();
    let mut stripped = full.clone();
    strip_configmap(&mut stripped);
    assert!(!stripped.data.as_ref().unwrap().contains_key("config.json"));
    assert_eq!(observed_digest(&full), observed_digest(&stripped));
    assert_eq!(
        observed_digest(&full).unwrap(),
        trellis_operator::compiler::digest(&json)
    );
    // Unmanaged ConfigMaps of the same name are never deleted, and are taken over on apply.
    let mut foreign = full;
    foreign.metadata.labels = None;
    let gone = compile(&World::new().with(namespace("shop")).snap);
    assert!(plan_configmaps(&gone, &[Arc::new(foreign.clone())], None).is_empty());
    let cms = plan_configmaps(&out, &[Arc::new(foreign)], None);
    assert_eq!(cms.len(), 1);
}
