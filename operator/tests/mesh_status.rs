//! The Mesh status as `kubectl get mesh` shows it, built by the three controllers that report
//! on the Mesh, each through the one status writer under its own field manager, against
//! recorded API exchanges. The recorded API server merges each apply the way server-side apply
//! merges a map list keyed by `type` (what the CRD declares for `status.conditions`), so the
//! test sees what a user would: the printer columns of the generated CRD evaluated on the
//! merged object.

mod compiler_fixtures;
mod recorded;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use compiler_fixtures::*;
use http::Method;
use kube::CustomResourceExt;
use recorded::{ApiServer, Exchange, mock};
use serde_json::{Value, json};
use trellis_operator::api::conditions::{Condition, ConditionStatus};
use trellis_operator::api::mesh::{RolloutState, RolloutStatus};
use trellis_operator::api::{Mesh, MeshStatus};
use trellis_operator::compiler::{PROXY_VERSION_ANNOTATION, SlimPod, compile};
use trellis_operator::controller::compile_apply::{Applier, plan_status};
use trellis_operator::controller::mesh_status;
use trellis_operator::pods::PodRecord;
use trellis_operator::status::StatusWriter;

const NOW: &str = "2026-11-25T17:00:00Z";
const STATUS_PATH: &str = "/apis/trellis.dev/v1alpha1/meshes/default/status";

/// What the API server does with a server-side apply of a status part: top-level fields the
/// part sets replace the stored ones, and conditions merge by `type` (list-type map).
fn merge_applied(stored: &mut Value, part: &Value) {
    let status = stored
        .as_object_mut()
        .unwrap()
        .entry("status")
        .or_insert_with(|| json!({}));
    for (key, value) in part.as_object().unwrap() {
        if key != "conditions" {
            status[key] = value.clone();
            continue;
        }
        let list = status
            .as_object_mut()
            .unwrap()
            .entry("conditions")
            .or_insert_with(|| json!([]))
            .as_array_mut()
            .unwrap();
        for c in value.as_array().unwrap() {
            match list.iter_mut().find(|e| e["type"] == c["type"]) {
                Some(e) => *e = c.clone(),
                None => list.push(c.clone()),
            }
        }
    }
}

/// Expects one status apply by `manager` and merges it into `stored`. (The reply is the
/// object as stored before the apply: the status writer does not read it.)
async fn expect_apply(server: &mut ApiServer, stored: &Arc<Mutex<Value>>, manager: &str) {
    let reply = stored.lock().unwrap().clone();
    let stored = stored.clone();
    server
        .expect(
            Duration::from_secs(5),
            Exchange {
                method: Method::PATCH,
                path_and_query: format!(
                    "{STATUS_PATH}?&force=true&fieldManager=trellis-operator%2F{manager}"
                ),
                check: Box::new(move |b: &Value| {
                    merge_applied(&mut stored.lock().unwrap(), &b["status"]);
                }),
                reply,
                status: 200,
            },
        )
        .await;
}

/// Evaluates the printer column paths the CRD uses: `.a.b` and `.a[?(@.k=="v")].f`.
fn json_path<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = v;
    let mut rest = path.strip_prefix('.')?;
    while !rest.is_empty() {
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let (field, tail) = rest.split_at(end);
        cur = cur.get(field)?;
        rest = tail;
        if let Some(filter) = rest.strip_prefix("[?(@.") {
            let close = filter.find(")]")?;
            let (key, want) = filter[..close].split_once("==")?;
            let want: Value = serde_json::from_str(want).ok()?;
            cur = cur.as_array()?.iter().find(|e| e.get(key) == Some(&want))?;
            rest = &filter[close + 2..];
        }
        rest = rest.strip_prefix('.').unwrap_or(rest);
    }
    Some(cur)
}

/// `kubectl get mesh`'s columns (name, value) for `object`, from the generated CRD.
fn columns(object: &Value) -> Vec<(String, String)> {
    let crd = Mesh::crd();
    crd.spec.versions[0]
        .additional_printer_columns
        .clone()
        .unwrap()
        .into_iter()
        .filter(|c| c.name != "Age")
        .map(|c| {
            let value = json_path(object, &c.json_path)
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .unwrap_or_else(|| "<none>".into());
            (c.name, value)
        })
        .collect()
}

fn injected(ns: &str, name: &str, version: &str) -> PodRecord {
    let mut p = SlimPod::default();
    p.metadata.namespace = Some(ns.into());
    p.metadata.name = Some(name.into());
    p.metadata.annotations = Some([(PROXY_VERSION_ANNOTATION.into(), version.into())].into());
    PodRecord::of(&p).unwrap()
}

fn part_of(stored: &Arc<Mutex<Value>>) -> Arc<Mesh> {
    Arc::new(serde_json::from_value(stored.lock().unwrap().clone()).unwrap())
}

/// Issue 13 item 4: `kubectl get mesh` shows Ready, the trust domain, and real proxy counts,
/// and the three controllers' conditions survive each other's writes.
#[tokio::test]
async fn kubectl_get_mesh_shows_ready_trust_domain_and_proxy_counts() {
    let mut w = shop().with(mesh().spec(|s| {
        s.trust_domain = "prod.example".into();
        // The fixture's injected pods carry proxy-version 0.1.0.
        s.proxy.image = Some("0.1.0".into());
    }));
    w.snap.pods.insert(injected("shop", "old-0", "0.0.9"));
    let mesh = w.snap.mesh.clone().unwrap();
    let stored = Arc::new(Mutex::new(serde_json::to_value(mesh.as_ref()).unwrap()));
    let before = columns(&stored.lock().unwrap());
    assert_eq!(
        before,
        [
            ("Ready".to_string(), "<none>".to_string()),
            ("Trust Domain".into(), "prod.example".into()),
            ("Proxies".into(), "<none>".into()),
            ("Up To Date".into(), "<none>".into()),
            ("Rollout".into(), "<none>".into()),
        ]
    );

    let (client, handle) = mock();
    let writer = StatusWriter::with_clock(client.clone(), Arc::new(|| NOW.to_string()));
    let mut server = ApiServer(handle);

    // 1. The CA controller reports its part.
    let ca = writer.for_controller("ca");
    let generation = mesh.metadata.generation;
    let ca_part = MeshStatus {
        conditions: vec![
            Condition::new("CAReady", ConditionStatus::True, "Ready", "", generation),
            Condition::new(
                "WebhookReady",
                ConditionStatus::True,
                "Configured",
                "",
                generation,
            ),
        ],
        ..Default::default()
    };
    let m = part_of(&stored);
    let (out, ()) = tokio::join!(
        ca.apply(m.as_ref(), ca_part),
        expect_apply(&mut server, &stored, "ca")
    );
    out.unwrap();

    // 2. The compile controller: Programmed, Degraded, ProxiesUpToDate and the counts, from
    // a Mesh object that does not yet show the CA's conditions (a stale snapshot).
    let out = compile(&w.snap);
    let stale = mesh.clone();
    let plan = plan_status(&out, &[], &[], Some(&stale), &w.snap.pods, NOW);
    assert_eq!(plan.len(), 1);
    let applier = Applier::new(client.clone(), writer.for_controller("compile"), None);
    let ((stats, errors), ()) = tokio::join!(
        applier.apply(&[], &plan, Some(&stale)),
        expect_apply(&mut server, &stored, "compile")
    );
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(stats.status_patches, 1);

    // 2b. The rollout controller: RolloutProgressing and `status.rollout`, under its own
    // manager, from the same stale snapshot.
    let rollout = writer.for_controller("rollout");
    let rollout_part = MeshStatus {
        conditions: vec![Condition::new(
            "RolloutProgressing",
            ConditionStatus::True,
            "BatchInFlight",
            "batch 1 of 1",
            generation,
        )],
        rollout: Some(Box::new(RolloutStatus {
            state: RolloutState::Progressing,
            desired_version: "0.1.0".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let (out, ()) = tokio::join!(
        rollout.apply(stale.as_ref(), rollout_part),
        expect_apply(&mut server, &stored, "rollout")
    );
    out.unwrap();

    // 2c. The addon controller: ObservabilityReady (here an addon still starting), under its
    // own manager; it is reported beside Ready, not inside it.
    let addons = writer.for_controller("addons");
    let addons_part = MeshStatus {
        conditions: vec![Condition::new(
            "ObservabilityReady",
            ConditionStatus::False,
            "Progressing",
            "prometheus: Available (1/1 ready); grafana: Progressing (0/1 ready); jaeger: disabled",
            generation,
        )],
        ..Default::default()
    };
    let (out, ()) = tokio::join!(
        addons.apply(stale.as_ref(), addons_part),
        expect_apply(&mut server, &stored, "addons")
    );
    out.unwrap();

    // 3. The mesh controller summarises the parts into Ready.
    let m = part_of(&stored);
    let mesh_writer = writer.for_controller("mesh");
    let (out, ()) = tokio::join!(
        mesh_writer.apply(m.as_ref(), mesh_status(&m)),
        expect_apply(&mut server, &stored, "mesh")
    );
    out.unwrap();

    let object = stored.lock().unwrap().clone();
    let types: Vec<&str> = object["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "CAReady",
            "WebhookReady",
            "Programmed",
            "Degraded",
            "ProxiesUpToDate",
            "RolloutProgressing",
            "ObservabilityReady",
            "Accepted",
            "Ready"
        ],
        "every controller's conditions survive the others' writes"
    );
    assert_eq!(
        columns(&object),
        [
            ("Ready".to_string(), "True".to_string()),
            ("Trust Domain".into(), "prod.example".into()),
            ("Proxies".into(), "3".into()),
            ("Up To Date".into(), "2".into()),
            ("Rollout".into(), "Progressing".into()),
        ]
    );
    let proxies = json_path(
        &object,
        ".status.conditions[?(@.type==\"ProxiesUpToDate\")].message",
    )
    .unwrap();
    assert_eq!(
        proxies,
        "2 of 3 proxies run 0.1.0; workloads pick the new proxy up when their pods are re-created"
    );

    // A spec edit (generation 4) that no part has acted on yet: Ready turns False at once.
    let mut edited: Mesh = serde_json::from_value(object).unwrap();
    edited.metadata.generation = Some(4);
    let ready = mesh_status(&edited).conditions[1].clone();
    assert_eq!(
        (ready.status, ready.reason.as_str()),
        (ConditionStatus::False, "Reconciling")
    );
    drop((applier, writer, ca, rollout, addons, mesh_writer, client));
    server.expect_no_more().await;
}
