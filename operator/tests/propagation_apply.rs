//! The propagation edges against recorded API exchanges: a replica's report Lease (written at
//! most once per interval, latest wins, a heartbeat when unchanged, deleted on stop) and the
//! leader's status writer (one LIST per interval, one patch per object whose numbers changed,
//! none otherwise; stale reports ignored, long-dead ones deleted). Time is virtual.

mod recorded;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use jiff::Timestamp;
use recorded::{ApiServer, exchange, mock};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use trellis_operator::propagation::{
    self, LaggingProxy, ObjectCount, ObjectRef, ReplicaReport, encode, publish, writer,
};

const NS: &str = "trellis-system";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/trellis-system/leases";
const NOW: &str = "2026-11-29T12:00:00Z";

fn now() -> Timestamp {
    NOW.parse().unwrap()
}

fn count(
    kind: &str,
    ns: &str,
    name: &str,
    generation: i64,
    updated: u64,
    total: u64,
) -> ObjectCount {
    ObjectCount {
        object: ObjectRef::new(kind, ns, name),
        generation,
        updated,
        total,
    }
}

fn report(replica: &str, objects: Vec<ObjectCount>) -> ReplicaReport {
    ReplicaReport {
        replica: replica.into(),
        latest: 7,
        streams: 5,
        objects,
        lagging: vec![],
        lagging_total: 0,
        ..Default::default()
    }
}

/// A report Lease as the API server returns it, renewed `age_s` seconds before [`NOW`].
fn lease(r: &ReplicaReport, age_s: i64) -> Value {
    let renewed = now() - jiff::SignedDuration::from_secs(age_s);
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": propagation::lease_name(&r.replica),
            "namespace": NS,
            "labels": {"trellis.dev/component": "propagation-report"},
            "annotations": {"trellis.dev/propagation": serde_json::to_string(r).unwrap()},
        },
        "spec": {"holderIdentity": r.replica, "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()},
    })
}

fn list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList", "metadata": {}, "items": items})
}

const LIST: &str = "/apis/coordination.k8s.io/v1/namespaces/trellis-system/leases?&labelSelector=trellis.dev%2Fcomponent%3Dpropagation-report";
const TP_STATUS: &str = "/apis/trellis.dev/v1alpha1/namespaces/shop/trafficpolicies/web/status?&force=true&fieldManager=trellis-operator%2Fpropagation";
const MESH_STATUS: &str = "/apis/trellis.dev/v1alpha1/meshes/default/status?&force=true&fieldManager=trellis-operator%2Fpropagation";

/// What the API server answers a status apply with: the whole object.
fn mesh_reply() -> Value {
    json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "Mesh",
           "metadata": {"name": "default", "generation": 3}, "spec": {}})
}

fn tp_reply() -> Value {
    json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "TrafficPolicy",
           "metadata": {"name": "web", "namespace": "shop", "generation": 2},
           "spec": {"targetRef": {"kind": "Service", "name": "web"}}})
}

fn status_check(
    kind: &'static str,
    want: Value,
    cond: (&'static str, &'static str),
    message_starts: &'static str,
) -> impl FnOnce(&Value) + Send + 'static {
    move |b: &Value| {
        assert_eq!(b["apiVersion"], "trellis.dev/v1alpha1");
        assert_eq!(b["kind"], kind);
        let status = b["status"].as_object().unwrap();
        assert_eq!(
            status.keys().collect::<Vec<_>>(),
            ["conditions", "propagation"],
            "only this writer's part: {b}"
        );
        assert_eq!(b["status"]["propagation"], want);
        let conds = b["status"]["conditions"].as_array().unwrap();
        assert_eq!(conds.len(), 1, "only Propagated: {b}");
        let c = &conds[0];
        assert_eq!(c["type"], "Propagated");
        assert_eq!(
            (c["status"].as_str().unwrap(), c["reason"].as_str().unwrap()),
            cond
        );
        assert!(
            c["message"].as_str().unwrap().starts_with(message_starts),
            "{}",
            c["message"]
        );
        assert_eq!(c["observedGeneration"], want["generation"]);
        assert_eq!(c["lastTransitionTime"], NOW);
    }
}

/// The TrafficPolicy's status patch from this writer, checked by [`status_check`].
fn tp_patch(
    want: Value,
    cond: (&'static str, &'static str),
    message_starts: &'static str,
) -> recorded::Exchange {
    let check = status_check("TrafficPolicy", want, cond, message_starts);
    exchange(Method::PATCH, TP_STATUS, check, tp_reply())
}

/// The Mesh's status patch from this writer, checked by [`status_check`].
fn mesh_patch(
    want: Value,
    cond: (&'static str, &'static str),
    message_starts: &'static str,
) -> recorded::Exchange {
    let check = status_check("Mesh", want, cond, message_starts);
    exchange(Method::PATCH, MESH_STATUS, check, mesh_reply())
}

#[tokio::test(start_paused = true)]
async fn the_leader_sums_fresh_reports_writes_once_per_interval_and_only_what_changed() {
    let (client, handle) = mock();
    let stop = CancellationToken::new();
    let task = tokio::spawn(writer::run_with_clock(client, NS.into(), stop.clone(), now));
    let mut api = ApiServer(handle);
    let within = Duration::from_secs(1);
    let a = report(
        "op-a",
        vec![
            count("Mesh", "", "default", 3, 2, 2),
            count("TrafficPolicy", "shop", "web", 2, 1, 3),
        ],
    );
    let b = report("op-b", vec![count("TrafficPolicy", "shop", "web", 2, 2, 2)]);
    // A replica that stopped renewing 2 minutes ago (its proxies moved to the others), and one
    // gone for 20 minutes.
    let stale = report(
        "op-old",
        vec![count("TrafficPolicy", "shop", "web", 2, 0, 9)],
    );
    let dead = report("op-dead", vec![count("Mesh", "", "default", 3, 0, 9)]);
    let first = list(vec![
        lease(&a, 3),
        lease(&b, 20),
        lease(&stale, 120),
        lease(&dead, 1200),
    ]);
    api.expect(within, exchange(Method::GET, LIST, |_| {}, first))
        .await;
    api.expect(
        within,
        mesh_patch(
            json!({"generation": 3, "updated": 2, "total": 2}),
            ("True", "Propagated"),
            "all 2 connected proxies",
        ),
    )
    .await;
    api.expect(
        within,
        tp_patch(
            json!({"generation": 2, "updated": 3, "total": 5}),
            ("False", "Propagating"),
            "2 of 5 proxies subscribed",
        ),
    )
    .await;
    api.expect(
        within,
        exchange(
            Method::DELETE,
            &format!("{LEASES}/trellis-propagation-op-dead?"),
            |_| {},
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
        ),
    )
    .await;

    // Nothing before the next interval, however the proxies move meanwhile.
    api.expect_none_for(Duration::from_millis(4900)).await;
    // Same numbers (the dead one deleted): read, and nothing written.
    let second = list(vec![lease(&a, 8), lease(&b, 25), lease(&stale, 125)]);
    api.expect(within, exchange(Method::GET, LIST, |_| {}, second))
        .await;
    api.expect_none_for(Duration::from_millis(4900)).await;

    // The lagging proxies caught up (in two steps within one interval: the writer sees only
    // the latest): one patch, for the TrafficPolicy alone.
    let b2 = report("op-b", vec![count("TrafficPolicy", "shop", "web", 2, 2, 2)]);
    let a2 = report(
        "op-a",
        vec![
            count("Mesh", "", "default", 3, 2, 2),
            count("TrafficPolicy", "shop", "web", 2, 3, 3),
        ],
    );
    api.expect(
        within,
        exchange(
            Method::GET,
            LIST,
            |_| {},
            list(vec![lease(&a2, 1), lease(&b2, 4)]),
        ),
    )
    .await;
    api.expect(
        within,
        tp_patch(
            json!({"generation": 2, "updated": 5, "total": 5}),
            ("True", "Propagated"),
            "all 5 proxies subscribed",
        ),
    )
    .await;
    api.expect_none_for(Duration::from_millis(4900)).await;
    stop.cancel();
    task.await.unwrap();
    api.expect_no_more().await;
}

#[tokio::test(start_paused = true)]
async fn an_object_deleted_meanwhile_is_skipped_and_an_unreadable_report_changes_nothing() {
    let (client, handle) = mock();
    let stop = CancellationToken::new();
    let task = tokio::spawn(writer::run_with_clock(client, NS.into(), stop.clone(), now));
    let mut api = ApiServer(handle);
    let within = Duration::from_secs(1);
    let a = report("op-a", vec![count("TrafficPolicy", "shop", "web", 2, 1, 1)]);
    let mut garbled = lease(&report("op-b", vec![]), 1);
    garbled["metadata"]["annotations"]["trellis.dev/propagation"] = json!("{not json");
    let items = list(vec![lease(&a, 1), garbled]);
    api.expect(within, exchange(Method::GET, LIST, |_| {}, items.clone()))
        .await;
    let mut gone = exchange(
        Method::PATCH,
        TP_STATUS,
        |_| {},
        recorded::api_status(
            404,
            "NotFound",
            "trafficpolicies.trellis.dev \"web\" not found",
        ),
    );
    gone.status = 404;
    api.expect(within, gone).await;
    api.expect_none_for(Duration::from_millis(4900)).await;
    api.expect(within, exchange(Method::GET, LIST, |_| {}, items))
        .await;
    // Not remembered as written: the next round tries again (it may have been recreated).
    api.expect(
        within,
        exchange(Method::PATCH, TP_STATUS, |_| {}, tp_reply()),
    )
    .await;
    stop.cancel();
    task.await.unwrap();
    api.expect_no_more().await;
}

fn report_in(b: &Value) -> ReplicaReport {
    encode::decode(
        b["metadata"]["annotations"]["trellis.dev/propagation"]
            .as_str()
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_replica_writes_its_report_once_per_interval_latest_wins_with_a_heartbeat() {
    let (client, handle) = mock();
    let stop = CancellationToken::new();
    let current = Arc::new(Mutex::new(report(
        "op-a",
        vec![count("Mesh", "", "default", 3, 0, 1)],
    )));
    let source = {
        let current = current.clone();
        move || current.lock().unwrap().clone()
    };
    let task = tokio::spawn(publish::run(
        client,
        NS.into(),
        "op-a".into(),
        source,
        publish::Metrics::default(),
        stop.clone(),
    ));
    let mut api = ApiServer(handle);
    let within = Duration::from_secs(1);
    const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/trellis-system/leases/trellis-propagation-op-a?&force=true&fieldManager=trellis-operator%2Fpropagation";
    api.expect(
        within,
        exchange(
            Method::PATCH,
            LEASE,
            |b| {
                assert_eq!(b["kind"], "Lease");
                assert_eq!(b["metadata"]["name"], "trellis-propagation-op-a");
                assert_eq!(
                    b["metadata"]["labels"]["trellis.dev/component"],
                    "propagation-report"
                );
                assert_eq!(b["spec"]["holderIdentity"], "op-a");
                assert!(b["spec"]["renewTime"].is_string());
                assert_eq!(report_in(b).objects[0].updated, 0);
            },
            Value::Null,
        ),
    )
    .await;
    // Two changes within the interval: one write, with the latest.
    tokio::time::sleep(Duration::from_secs(1)).await;
    current.lock().unwrap().objects[0].updated = 1;
    current.lock().unwrap().lagging = vec![LaggingProxy {
        namespace: "shop".into(),
        pod: "web-0".into(),
        identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
        acked: 6,
        latest: 7,
        stale: propagation::Stale {
            policies: Some(now()),
            ..Default::default()
        },
        connected_since: None,
        behind_since: now(),
    }];
    api.expect_none_for(Duration::from_secs(2)).await;
    current.lock().unwrap().objects[0].updated = 2;
    current.lock().unwrap().lagging.clear();
    api.expect(
        Duration::from_secs(3),
        exchange(
            Method::PATCH,
            LEASE,
            |b| {
                let r = report_in(b);
                assert_eq!(r.objects[0].updated, 2);
                assert!(r.lagging.is_empty());
            },
            Value::Null,
        ),
    )
    .await;
    // Unchanged: only the heartbeat, 30 s after the last write.
    api.expect_none_for(Duration::from_secs(29)).await;
    api.expect(
        Duration::from_secs(6),
        exchange(
            Method::PATCH,
            LEASE,
            |b| assert_eq!(report_in(b).objects[0].updated, 2),
            Value::Null,
        ),
    )
    .await;
    // Stopping removes the report: the leader stops counting this replica at once.
    stop.cancel();
    api.expect(
        within,
        exchange(
            Method::DELETE,
            &format!("{LEASES}/trellis-propagation-op-a?"),
            |_| {},
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
        ),
    )
    .await;
    task.await.unwrap();
    api.expect_no_more().await;
}

/// A proxy behind `behind` seconds on everything, with the longest names Kubernetes allows.
fn long_lagging(i: usize, behind: i64) -> LaggingProxy {
    let at = now() - jiff::SignedDuration::from_secs(behind);
    LaggingProxy {
        namespace: format!("ns-{i:03}-{}", "n".repeat(56)),
        pod: format!("pod-{i:03}-{}", "p".repeat(245)),
        identity: format!(
            "spiffe://cluster.local/ns/ns-{i:03}-{}/sa/{}",
            "n".repeat(56),
            "s".repeat(253)
        ),
        acked: 6,
        latest: 7,
        stale: propagation::Stale {
            generation: Some(at),
            settings: Some(at),
            policies: Some(at),
        },
        connected_since: Some(at),
        behind_since: at,
    }
}

/// The report must fit the Lease: the API server refuses annotations over 256 KiB, and a
/// replica whose report is refused drops out of every count after 90 s. At the scale
/// (2 001 objects counted) with 100 long-named lagging proxies the plain JSON is over 256 KiB
/// (the first format shed most of the list here); gzipped, the whole report fits one Lease:
/// every count and every listed proxy.
#[tokio::test(start_paused = true)]
async fn a_report_too_large_as_json_is_gzipped_whole_into_its_lease() {
    let (client, handle) = mock();
    let stop = CancellationToken::new();
    let mut objects: Vec<ObjectCount> = (0..1000)
        .flat_map(|i| {
            let ns = format!("ns-{i}");
            [
                count("TrafficPolicy", &ns, "tp", 1, 20, 20),
                count("PeerAuthentication", &ns, "mtls", 1, 1, 1),
            ]
        })
        .collect();
    objects.push(count("Mesh", "", "default", 3, 1000, 1000));
    let big = ReplicaReport {
        lagging: (0..100).map(|i| long_lagging(i, 1000 - i as i64)).collect(),
        lagging_total: 250,
        ..report("op-a", objects)
    };
    let source = {
        let big = big.clone();
        move || big.clone()
    };
    let task = tokio::spawn(publish::run(
        client,
        NS.into(),
        "op-a".into(),
        source,
        publish::Metrics::default(),
        stop.clone(),
    ));
    let mut api = ApiServer(handle);
    const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/trellis-system/leases/trellis-propagation-op-a?&force=true&fieldManager=trellis-operator%2Fpropagation";
    let want = big.clone();
    api.expect(
        Duration::from_secs(1),
        exchange(
            Method::PATCH,
            LEASE,
            move |b| {
                let annotation = b["metadata"]["annotations"]["trellis.dev/propagation"]
                    .as_str()
                    .unwrap();
                assert!(
                    annotation.len() <= 256 * 1024,
                    "{} bytes in the annotation",
                    annotation.len()
                );
                assert!(serde_json::to_string(&want).unwrap().len() > 256 * 1024);
                assert!(annotation.starts_with(encode::GZIP_PREFIX));
                assert_eq!(report_in(b), want, "every count and every listed proxy");
            },
            Value::Null,
        ),
    )
    .await;
    stop.cancel();
    api.expect(
        Duration::from_secs(1),
        exchange(
            Method::DELETE,
            &format!("{LEASES}/trellis-propagation-op-a?"),
            |_| {},
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
        ),
    )
    .await;
    task.await.unwrap();
    api.expect_no_more().await;
}

/// `n` policy objects with names as long and as varied as real ones (a hash in each, so they
/// do not compress away).
fn many_objects(n: usize) -> Vec<ObjectCount> {
    (0..n)
        .map(|i| {
            let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let ns = format!("team-{:03}-payments-production", i % 400);
            if i % 2 == 0 {
                count(
                    "TrafficPolicy",
                    &ns,
                    &format!("checkout-{h:016x}-retries"),
                    4,
                    19,
                    20,
                )
            } else {
                count(
                    "PeerAuthentication",
                    &ns,
                    &format!("workload-{h:016x}"),
                    2,
                    20,
                    20,
                )
            }
        })
        .collect()
}

fn lease_path(name: &str) -> String {
    format!("{LEASES}/{name}?&force=true&fieldManager=trellis-operator%2Fpropagation")
}

fn deleted() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}})
}

/// Issue 19: 25 000 policy objects do not fit one Lease even gzipped. The replica spreads its
/// report over shard Leases, writes them before its own Lease (which announces the count), each
/// under 256 KiB; everything reads back whole. When the report shrinks, the shards it no longer
/// needs are deleted after the head, and stopping deletes every Lease it wrote.
#[tokio::test(start_paused = true)]
async fn a_report_of_25_000_policies_is_sharded_over_leases_and_shrinks_back() {
    let (client, handle) = mock();
    let stop = CancellationToken::new();
    let big = report("op-a", many_objects(25_000));
    let n = encode::layout(
        &big,
        propagation::report::MAX_REPORT_BYTES,
        encode::MAX_SHARDS,
    )
    .annotations
    .len();
    assert!(n > 1, "the test needs a sharded report");
    let current = Arc::new(Mutex::new(big.clone()));
    let source = {
        let current = current.clone();
        move || current.lock().unwrap().clone()
    };
    let metrics = publish::Metrics::default();
    let task = tokio::spawn(publish::run(
        client,
        NS.into(),
        "op-a".into(),
        source,
        metrics.clone(),
        stop.clone(),
    ));
    let mut api = ApiServer(handle);
    let within = Duration::from_secs(1);
    let seen = Arc::new(Mutex::new(Vec::new()));
    for i in (1..n).chain([0]) {
        let name = if i == 0 {
            "trellis-propagation-op-a".to_string()
        } else {
            format!("trellis-propagation-op-a.{i}")
        };
        let seen = seen.clone();
        let lease_name = name.clone();
        api.expect(
            within,
            exchange(
                Method::PATCH,
                &lease_path(&name),
                move |b| {
                    assert_eq!(b["metadata"]["name"], lease_name);
                    assert_eq!(
                        b["metadata"]["labels"]["trellis.dev/component"],
                        "propagation-report"
                    );
                    let a = b["metadata"]["annotations"]["trellis.dev/propagation"]
                        .as_str()
                        .unwrap();
                    assert!(a.len() <= 256 * 1024, "{} bytes", a.len());
                    seen.lock().unwrap().push((0, lease_name, report_in(b)));
                },
                Value::Null,
            ),
        )
        .await;
    }
    let back = encode::merge(seen.lock().unwrap().clone());
    assert_eq!(back.len(), 1);
    let mut got = back[0].2.objects.clone();
    let mut want = big.objects.clone();
    got.sort_by(|a, b| a.object.cmp(&b.object));
    want.sort_by(|a, b| a.object.cmp(&b.object));
    assert_eq!(got.len(), 25_000);
    assert!(got == want, "every count reads back");
    assert_eq!(back[0].2.omitted, 0);
    assert_eq!(
        (metrics.leases.get(), metrics.omitted.get()),
        (n as i64, 0),
        "the metrics say how many Leases it takes"
    );

    // The mesh shrinks: one plain Lease again, then the shards no longer used go.
    *current.lock().unwrap() = report("op-a", many_objects(10));
    api.expect(
        Duration::from_secs(6),
        exchange(
            Method::PATCH,
            &lease_path("trellis-propagation-op-a"),
            |b| {
                let a = b["metadata"]["annotations"]["trellis.dev/propagation"]
                    .as_str()
                    .unwrap();
                assert!(a.starts_with('{'), "plain JSON for older readers");
                let r = report_in(b);
                assert_eq!((r.objects.len(), r.shards), (10, 0));
            },
            Value::Null,
        ),
    )
    .await;
    for i in 1..n {
        api.expect(
            within,
            exchange(
                Method::DELETE,
                &format!("{LEASES}/trellis-propagation-op-a.{i}?"),
                |_| {},
                deleted(),
            ),
        )
        .await;
    }
    api.expect_none_for(Duration::from_millis(4900)).await;
    assert_eq!(metrics.leases.get(), 1);
    stop.cancel();
    api.expect(
        within,
        exchange(
            Method::DELETE,
            &format!("{LEASES}/trellis-propagation-op-a?"),
            |_| {},
            deleted(),
        ),
    )
    .await;
    task.await.unwrap();
    api.expect_no_more().await;
}

/// The leader reads every format at once, as during an upgrade: a sharded gzip report, a
/// plain JSON report from a replica of the previous release, and a corrupt one (skipped, no
/// effect); the sums are as if all were plain. A long-dead replica's shard Lease is deleted.
#[tokio::test(start_paused = true)]
async fn the_leader_sums_sharded_gzipped_and_old_plain_reports_alike() {
    let (client, handle) = mock();
    let stop = CancellationToken::new();
    let task = tokio::spawn(writer::run_with_clock(client, NS.into(), stop.clone(), now));
    let mut api = ApiServer(handle);
    let within = Duration::from_secs(1);
    let mut objects = many_objects(2_000);
    objects.push(count("TrafficPolicy", "shop", "web", 2, 1, 3));
    let a = report("op-a", objects);
    // Shards as a replica writes them, at a smaller budget so that 2 001 objects need several
    // (the reader does not depend on the budget).
    let layout = encode::layout(&a, 16 * 1024, encode::MAX_SHARDS);
    assert!(layout.annotations.len() > 2, "{}", layout.annotations.len());
    let mut items: Vec<Value> = layout
        .annotations
        .iter()
        .enumerate()
        .map(|(i, annotation)| {
            let mut l = lease(&report("op-a", vec![]), 2);
            if i > 0 {
                l["metadata"]["name"] = json!(format!("trellis-propagation-op-a.{i}"));
            }
            l["metadata"]["annotations"]["trellis.dev/propagation"] = json!(annotation);
            l
        })
        .collect();
    // The previous release's replica: plain JSON without shard fields.
    let old = json!({"replica": "op-old", "latest": 3, "streams": 2, "laggingTotal": 0,
        "objects": [{"kind": "TrafficPolicy", "namespace": "shop", "name": "web",
                     "generation": 2, "updated": 2, "total": 2}]});
    let mut old_lease = lease(&report("op-old", vec![]), 2);
    old_lease["metadata"]["annotations"]["trellis.dev/propagation"] = json!(old.to_string());
    items.push(old_lease);
    // A long-dead replica's shard: deleted like its first Lease would be.
    let mut dead_shard = lease(&report("op-dead", vec![]), 1200);
    dead_shard["metadata"]["name"] = json!("trellis-propagation-op-dead.3");
    dead_shard["metadata"]["annotations"]["trellis.dev/propagation"] = json!(layout.annotations[1]);
    items.push(dead_shard);
    let mut corrupt = lease(&report("op-bad", vec![]), 2);
    let truncated = &layout.annotations[0][..layout.annotations[0].len() / 2];
    corrupt["metadata"]["annotations"]["trellis.dev/propagation"] = json!(truncated);
    items.push(corrupt);
    api.expect(within, exchange(Method::GET, LIST, |_| {}, list(items)))
        .await;
    // 2 001 objects changed: the writer patches each once; the TrafficPolicy both replicas
    // count is checked against the sum, every other object against op-a's count alone.
    let mut checked = false;
    for _ in 0..2_001 {
        let (request, send) = api.0.next_request().await.expect("a status patch");
        let path = request.uri().path().to_string();
        assert_eq!(request.method(), Method::PATCH);
        let body = http_body_util::BodyExt::collect(request.into_body())
            .await
            .unwrap()
            .to_bytes();
        let b: Value = serde_json::from_slice(&body).unwrap();
        if path == "/apis/trellis.dev/v1alpha1/namespaces/shop/trafficpolicies/web/status" {
            assert_eq!(
                b["status"]["propagation"],
                json!({"generation": 2, "updated": 3, "total": 5})
            );
            checked = true;
        } else {
            assert_eq!(
                b["status"]["propagation"]["total"], 20,
                "{path}: only op-a counts it"
            );
        }
        send.send_response(
            http::Response::builder()
                .body(kube::client::Body::from(body.to_vec()))
                .unwrap(),
        );
    }
    assert!(checked);
    api.expect(
        within,
        exchange(
            Method::DELETE,
            &format!("{LEASES}/trellis-propagation-op-dead.3?"),
            |_| {},
            deleted(),
        ),
    )
    .await;
    api.expect_none_for(Duration::from_millis(4000)).await;
    stop.cancel();
    task.await.unwrap();
}
