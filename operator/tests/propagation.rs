//! Propagation counting: the pure tracker over real compiler outputs, and a real proxy (the
//! sidecar's own discovery client and config reload) reporting what it runs to the real
//! discovery server over mTLS.

#[path = "../../sidecar/tests/common/mod.rs"]
mod common;
mod compiler_fixtures;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use compiler_fixtures::*;
use jiff::Timestamp;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use trellis_operator::api::peer_authentication::MtlsMode as ApiMode;
use trellis_operator::compiler::{self, Output};
use trellis_operator::discovery::{Hub, serve};
use trellis_operator::propagation::{ObjectCount, ObjectRef, Stale, StreamState, Tracker};
use trellis_proxy::config::ProxyConfig;

const OPERATOR_ID: &str = "spiffe://cluster.local/ns/trellis-system/sa/trellis-operator";

fn t(second: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + second).unwrap()
}

/// `shop` and `pay` meshed, a Service in each, a PeerAuthentication in each, a TrafficPolicy on
/// shop/web, the Mesh.
fn world(shop_mode: ApiMode, tp_generation: i64, mesh_generation: i64) -> World {
    let mut w = World::new()
        .with(namespace("shop").meshed())
        .with(namespace("pay").meshed())
        .with(namespace("trellis-system"))
        .with(service("shop", "web").ip("10.96.0.10").port(80, "http"))
        .with(service("pay", "ledger").ip("10.96.0.20").port(80, "http"))
        .with(peer_auth("shop", "mtls", shop_mode).created(1))
        .with(peer_auth("pay", "mtls", ApiMode::Strict).created(1))
        .with(traffic_policy("shop", "web", "web").created(1).spec(|s| {
            s.timeouts = Some(serde_json::from_value(serde_json::json!({"request": "2s"})).unwrap())
        }))
        .with(mesh());
    let mut snap = w.snap.clone();
    snap.settings.identity_endpoint = None;
    // Generations as the API server would have bumped them.
    for tp in &mut snap.traffic_policies {
        Arc::make_mut(tp).metadata.generation = Some(tp_generation);
    }
    for pa in &mut snap.peer_authentications {
        if pa.metadata.namespace.as_deref() == Some("shop") && shop_mode != ApiMode::Permissive {
            Arc::make_mut(pa).metadata.generation = Some(2);
        }
    }
    if let Some(m) = &mut snap.mesh {
        Arc::make_mut(m).metadata.generation = Some(mesh_generation);
    }
    w.snap = snap;
    w
}

fn count(counts: &[ObjectCount], kind: &str, ns: &str, name: &str) -> (u64, u64) {
    let c = counts
        .iter()
        .find(|c| c.object == ObjectRef::new(kind, ns, name))
        .unwrap_or_else(|| panic!("{kind} {ns}/{name} not counted: {counts:?}"));
    (c.updated, c.total)
}

fn stream(ns: &str, acked: u64, settings: Option<&str>, subs: &[&str]) -> StreamState {
    StreamState {
        namespace: ns.into(),
        identity: format!("spiffe://cluster.local/ns/{ns}/sa/app"),
        addr: Some("10.0.0.9".parse().unwrap()),
        connected: Some(t(0)),
        acked,
        settings: settings.map(Into::into),
        policies: None,
        subscriptions: subs.iter().map(|s| s.to_string()).collect(),
    }
}

/// A proxy in `ns` that serves from `cm` (its ConfigMap) and reports what it loaded, as the
/// sidecar does; subscribed to nothing.
fn loaded(ns: &str, acked: u64, cm: &ProxyConfig) -> StreamState {
    StreamState {
        policies: Some(cm.policies_digest()),
        ..stream(ns, acked, Some(&cm.settings_digest()), &[])
    }
}

/// `world` with shop/web's TrafficPolicy edited: generation 2, another request timeout.
fn world_with_policy_edit(request_timeout: &str) -> World {
    let mut w = world(ApiMode::Permissive, 2, 3);
    for tp in &mut w.snap.traffic_policies {
        Arc::make_mut(tp).spec.timeouts = Some(
            serde_json::from_value(serde_json::json!({ "request": request_timeout })).unwrap(),
        );
    }
    w
}

/// Issue 19: with the default `Full` ConfigMap a proxy holds every visible Service, policy
/// included, from its ConfigMap and never subscribes; it must still be counted, by the
/// policies its ConfigMap carried when it loaded it.
#[test]
fn a_traffic_policy_counts_full_configmap_proxies_by_the_policies_they_loaded() {
    let mut tracker = Tracker::default();
    let w1 = world(ApiMode::Permissive, 1, 3);
    let out1 = compiler::compile(&w1.snap);
    tracker.observe(1, t(10), &w1.snap, &out1);
    let cm1 = ProxyConfig::from_json(out1.config("pay").unwrap().as_bytes()).unwrap();
    assert!(cm1.service("web.shop").unwrap().policy.is_some());
    // What the proxy computes from its ConfigMap is what every replica computes.
    assert_eq!(cm1.policies_digest(), out1.policies["pay"].digest);
    assert_eq!(
        compiler::compile_discovery(&w1.snap, None).policies,
        out1.policies
    );
    let streams = vec![loaded("pay", 1, &cm1), loaded("pay", 1, &cm1)];
    let c = tracker.count(&streams);
    assert_eq!(count(&c, "TrafficPolicy", "shop", "web"), (2, 2));

    // The policy is edited. Both proxies acknowledge the new view (nothing they subscribed to
    // changed), but their ConfigMap still carries the old policy: not applied.
    let w2 = world_with_policy_edit("5s");
    let out2 = compiler::compile_discovery(&w2.snap, Some(&out1));
    tracker.observe(2, t(20), &w2.snap, &out2);
    assert_ne!(out2.policies["pay"].digest, out1.policies["pay"].digest);
    let streams = vec![loaded("pay", 2, &cm1), loaded("pay", 2, &cm1)];
    assert_eq!(
        count(&tracker.count(&streams), "TrafficPolicy", "shop", "web"),
        (0, 2)
    );
    // The kubelet delivers the new ConfigMap to one of them.
    let cm2 = ProxyConfig::from_json(
        compiler::compile(&w2.snap)
            .config("pay")
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    let streams = vec![loaded("pay", 2, &cm2), loaded("pay", 2, &cm1)];
    assert_eq!(
        count(&tracker.count(&streams), "TrafficPolicy", "shop", "web"),
        (1, 2)
    );
    // A proxy that does not report its policies (older than the field) is counted, not
    // updated: lag is over-reported, never hidden.
    let streams = vec![stream("pay", 2, Some(&cm2.settings_digest()), &[])];
    assert_eq!(
        count(&tracker.count(&streams), "TrafficPolicy", "shop", "web"),
        (0, 1)
    );

    // With `Bootstrap` ConfigMaps pay's lists only pay's own Services: a pay proxy holds
    // web.shop only if it subscribed, and is counted only then.
    let mut w3 = w2.clone();
    let mesh = w3.snap.mesh.as_mut().unwrap();
    Arc::make_mut(mesh).spec.discovery.config_map =
        trellis_operator::api::mesh::ConfigMapContent::Bootstrap;
    let out3 = compiler::compile(&w3.snap);
    tracker.observe(3, t(30), &w3.snap, &out3);
    let cm3 = ProxyConfig::from_json(out3.config("pay").unwrap().as_bytes()).unwrap();
    assert!(cm3.service("web.shop").is_none());
    let streams = vec![
        loaded("pay", 3, &cm3),
        StreamState {
            subscriptions: vec!["web.shop".into()],
            ..loaded("pay", 3, &cm3)
        },
    ];
    assert_eq!(
        count(&tracker.count(&streams), "TrafficPolicy", "shop", "web"),
        (1, 1)
    );

    // Under `Auto` (the default) each namespace counts by its own mode. pay sees 400 more
    // Services, so its full table passes 64 KiB and its ConfigMap carries the bootstrap set: a
    // pay proxy holds web.shop only if it subscribed. shop imports only itself, keeps its
    // full table, and its proxies hold the policy from their ConfigMap.
    let mut w4 = w2.clone();
    let mesh = w4.snap.mesh.as_mut().unwrap();
    Arc::make_mut(mesh).spec.discovery.config_map = Default::default();
    for ns in &mut w4.snap.namespaces {
        if ns.metadata.name.as_deref() == Some("shop") {
            Arc::make_mut(ns)
                .metadata
                .annotations
                .get_or_insert_default()
                .insert(
                    trellis_operator::compiler::visibility::IMPORT_FROM_ANNOTATION.into(),
                    "shop".into(),
                );
        }
    }
    w4.add(namespace("lib"));
    for i in 0..400 {
        w4.add(
            service("lib", &format!("s{i}"))
                .ip(&format!("10.97.{}.{}", i / 250, i % 250 + 1))
                .port(8080, "http"),
        );
    }
    let out4 = compiler::compile(&w4.snap);
    assert_eq!(
        out4.bootstrapped.iter().collect::<Vec<_>>(),
        ["pay"],
        "{:?}",
        out4.mesh
    );
    tracker.observe(4, t(40), &w4.snap, &out4);
    let pay4 = ProxyConfig::from_json(out4.config("pay").unwrap().as_bytes()).unwrap();
    let shop4 = ProxyConfig::from_json(out4.config("shop").unwrap().as_bytes()).unwrap();
    assert!(pay4.service("web.shop").is_none());
    assert!(shop4.service("web.shop").is_some());
    let streams = vec![
        loaded("pay", 4, &pay4),
        StreamState {
            subscriptions: vec!["web.shop".into()],
            ..loaded("pay", 4, &pay4)
        },
        loaded("shop", 4, &shop4),
    ];
    assert_eq!(
        count(&tracker.count(&streams), "TrafficPolicy", "shop", "web"),
        (2, 2)
    );
}

#[test]
fn the_digest_a_proxy_computes_from_its_configmap_is_the_one_every_replica_computes() {
    let w = world(ApiMode::Permissive, 1, 3);
    let full = compiler::compile(&w.snap);
    let table_only = compiler::compile_discovery(&w.snap, None);
    for ns in ["shop", "pay"] {
        let cm = ProxyConfig::from_json(full.config(ns).unwrap().as_bytes()).unwrap();
        assert_eq!(cm.settings_digest(), full.settings[ns], "{ns}");
        assert_eq!(table_only.settings[ns], full.settings[ns], "{ns}");
    }
    assert_ne!(full.settings["shop"], full.settings["pay"]);
}

#[test]
fn a_peer_authentication_edit_counts_the_proxies_of_its_namespace_that_run_it() {
    let mut tracker = Tracker::default();
    let w1 = world(ApiMode::Permissive, 1, 3);
    let out1 = compiler::compile_discovery(&w1.snap, None);
    tracker.observe(1, t(10), &w1.snap, &out1);
    let old = out1.settings["shop"].clone();
    let pay = out1.settings["pay"].clone();
    // Each proxy's ConfigMap carries its namespace's current TrafficPolicies throughout.
    let stream = |ns: &str, acked, settings: Option<&str>, subs: &[&str]| StreamState {
        policies: Some(out1.policies[ns].digest.clone()),
        ..stream(ns, acked, settings, subs)
    };
    let streams = vec![
        stream("shop", 1, Some(&old), &[]),
        stream("shop", 1, Some(&old), &[]),
        stream("pay", 1, Some(&pay), &[]),
    ];
    let c = tracker.count(&streams);
    assert_eq!(count(&c, "PeerAuthentication", "shop", "mtls"), (2, 2));
    assert_eq!(count(&c, "PeerAuthentication", "pay", "mtls"), (1, 1));
    assert_eq!(count(&c, "Mesh", "", "default"), (3, 3));

    // shop's policy goes Strict (generation 2): shop's proxies still run the old settings.
    let w2 = world(ApiMode::Strict, 1, 3);
    let out2 = compiler::compile_discovery(&w2.snap, Some(&out1));
    tracker.observe(2, t(20), &w2.snap, &out2);
    let new = out2.settings["shop"].clone();
    assert_ne!(new, old);
    let c = tracker.count(&streams);
    assert_eq!(count(&c, "PeerAuthentication", "shop", "mtls"), (0, 2));
    assert_eq!(
        count(&c, "PeerAuthentication", "pay", "mtls"),
        (1, 1),
        "another namespace's policy is not affected"
    );
    // The Mesh did not change: settings that were current after its generation have it.
    assert_eq!(count(&c, "Mesh", "", "default"), (3, 3));
    let (lagging, n) = tracker.lagging(&streams, |_| Some("web-0".into()), 10);
    assert_eq!(n, 3, "two on settings, and every stream has not acked 2");

    // One proxy's kubelet delivered the new ConfigMap.
    let streams = vec![
        stream("shop", 2, Some(&new), &[]),
        stream("shop", 2, Some(&old), &[]),
        stream("pay", 2, Some(&pay), &[]),
    ];
    let c = tracker.count(&streams);
    assert_eq!(count(&c, "PeerAuthentication", "shop", "mtls"), (1, 2));
    let (lagging2, n) = tracker.lagging(&streams, |_| Some("web-1".into()), 10);
    assert_eq!(n, 1);
    assert_eq!(lagging2[0].pod, "web-1");
    assert!(lagging2[0].stale.settings.is_some());
    assert_eq!(lagging2[0].stale.generation, None, "it acked view 2");
    assert_eq!(
        lagging2[0].behind_since,
        t(20),
        "behind since the compile that changed its settings"
    );
    drop(lagging);
}

#[test]
fn a_mesh_edit_that_changes_no_setting_is_applied_by_proxies_with_current_settings() {
    let mut tracker = Tracker::default();
    let w1 = world(ApiMode::Permissive, 1, 3);
    let out1 = compiler::compile_discovery(&w1.snap, None);
    tracker.observe(1, t(10), &w1.snap, &out1);
    // Generation 4 (say, a new proxy image): no proxy setting changes.
    let w2 = world(ApiMode::Permissive, 1, 4);
    let out2 = compiler::compile_discovery(&w2.snap, Some(&out1));
    tracker.observe(2, t(20), &w2.snap, &out2);
    let streams = vec![
        stream("shop", 2, Some(&out1.settings["shop"]), &[]),
        stream("pay", 2, Some("0000"), &[]),
        stream("pay", 2, None, &[]),
    ];
    let c = tracker.count(&streams);
    let mesh = c
        .iter()
        .find(|c| c.object.kind == "Mesh")
        .expect("the Mesh is counted");
    assert_eq!(mesh.generation, 4);
    // Unknown and unreported settings are not counted as applied: lag is over-reported,
    // never hidden.
    assert_eq!((mesh.updated, mesh.total), (1, 3));
}

#[test]
fn a_traffic_policy_counts_the_streams_subscribed_to_its_service_by_their_acks() {
    let mut tracker = Tracker::default();
    let w1 = world(ApiMode::Permissive, 1, 3);
    let out1 = compiler::compile_discovery(&w1.snap, None);
    tracker.observe(1, t(10), &w1.snap, &out1);
    // Other edits publish views 2 and 3; the policy's generation is still 1 (since view 1).
    tracker.observe(2, t(11), &w1.snap, &out1);
    tracker.observe(3, t(12), &w1.snap, &out1);
    // Then the policy is edited: generation 2, first published as view 4.
    let w2 = world(ApiMode::Permissive, 2, 3);
    let out2 = compiler::compile_discovery(&w2.snap, Some(&out1));
    tracker.observe(4, t(20), &w2.snap, &out2);
    let pay = Some(out2.settings["pay"].as_str());
    let streams = vec![
        stream("pay", 4, pay, &["web.shop"]),
        stream("pay", 3, pay, &["web.shop", "ledger.pay"]),
        stream("pay", 1, pay, &["ledger.pay"]),
    ];
    let c = tracker.count(&streams);
    // The third holds web.shop from its (`Full`) ConfigMap and reports no policies digest:
    // counted, not updated (see the test above for proxies that report it).
    assert_eq!(count(&c, "TrafficPolicy", "shop", "web"), (1, 3));
    let tp = c.iter().find(|c| c.object.kind == "TrafficPolicy").unwrap();
    assert_eq!(tp.generation, 2);
    let (lagging, n) = tracker.lagging(&streams, |_| None, 10);
    assert_eq!(
        n, 2,
        "the one that acked view 4 is not behind: it holds web.shop, pay's only policy-bearing \
         Service, from the stream, so its ConfigMap's policies do not matter"
    );
    // The one that acked only view 1 is behind on the view since view 2 (t 11), and on its
    // ConfigMap's policies, which it does not report, since before anything this replica
    // knows (its first compile, t 10): the longest.
    assert_eq!(lagging[0].acked, 1);
    assert_eq!(
        lagging[0].stale,
        Stale {
            generation: Some(t(11)),
            settings: None,
            policies: Some(t(10)),
        }
    );
    assert_eq!(lagging[0].behind_since, t(10));
    assert_eq!(lagging[0].latest, 4);
    assert_eq!(lagging[1].acked, 3);
    assert_eq!(lagging[1].stale.aspects().len(), 1, "{:?}", lagging[1]);
}

// ---- A real proxy reporting on the real server ----

fn creds(pki: &common::Pki, id: &str) -> trellis_proxy::creds::Credentials {
    let (c, k) = pki.leaf(id);
    trellis_proxy::tls::credentials_from_pem(
        &std::fs::read(c).unwrap(),
        &std::fs::read(k).unwrap(),
        pki.ca_pem.as_bytes(),
    )
    .unwrap()
}

async fn operator(pki: &common::Pki) -> (SocketAddr, Arc<Hub>, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = trellis_proxy::tls::server_config(&creds(pki, OPERATOR_ID), &[b"h2"]).unwrap();
    let hub = Hub::new();
    let stop = CancellationToken::new();
    let tls = tokio::sync::watch::channel(Some(tls)).1;
    tokio::spawn(serve(listener, tls, hub.clone(), stop.clone()));
    (addr, hub, stop)
}

fn configmap(out: &Output) -> ProxyConfig {
    ProxyConfig::from_json(out.config("shop").unwrap().as_bytes()).unwrap()
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_proxy_reports_the_configmap_it_runs_and_counts_once_the_kubelet_delivers_the_edit() {
    let pki = common::Pki::new("mesh");
    let (addr, hub, stop) = operator(&pki).await;
    let mut tracker = Tracker::default();
    let w1 = world(ApiMode::Permissive, 1, 3);
    let out1 = compiler::compile(&w1.snap);
    let seq = hub.publish(&out1).unwrap();
    tracker.observe(seq, Timestamp::now(), &w1.snap, &out1);

    let mut proxy =
        common::TestProxy::start_with(&pki, &common::id("client"), &configmap(&out1), None, |o| {
            o.discovery = Some(trellis_proxy::discovery::resolver::Settings {
                addrs: vec![addr.to_string()],
                operator_id: OPERATOR_ID.into(),
            })
        })
        .await;
    let pa = |hub: &Hub, tracker: &Tracker| {
        count(
            &tracker.count(&hub.stream_states()),
            "PeerAuthentication",
            "shop",
            "mtls",
        )
    };
    until("the proxy's report of its ConfigMap", || {
        pa(&hub, &tracker) == (1, 1)
    })
    .await;
    let s = &hub.stream_states()[0];
    assert_eq!(s.identity, common::id("client"), "from its certificate");
    assert_eq!(s.addr, Some(IpAddr::from([127, 0, 0, 1])));

    // The PeerAuthentication goes Strict: the operator publishes at once, the kubelet has not
    // delivered the new ConfigMap yet.
    let w2 = world(ApiMode::Strict, 1, 3);
    let out2 = compiler::compile_incremental(&w2.snap, Some(&out1));
    let seq = hub.publish(&out2).unwrap();
    tracker.observe(seq, Timestamp::now(), &w2.snap, &out2);
    until("the proxy acknowledges the new view", || {
        hub.stream_states()[0].acked == seq
    })
    .await;
    assert_eq!(pa(&hub, &tracker), (0, 1), "acking the view is not enough");
    let (lagging, _) = tracker.lagging(&hub.stream_states(), |_| Some("client-0".into()), 10);
    assert_eq!(lagging.len(), 1);
    assert_eq!(
        lagging[0]
            .stale
            .aspects()
            .iter()
            .map(|a| a.0)
            .collect::<Vec<_>>(),
        ["settings"],
        "acked the view; the ConfigMap is the stale part"
    );

    // The kubelet swaps the file: the proxy reloads and says so.
    proxy.apply(&configmap(&out2)).await;
    until("the reloaded ConfigMap is reported", || {
        pa(&hub, &tracker) == (1, 1)
    })
    .await;
    assert!(
        tracker
            .lagging(&hub.stream_states(), |_| None, 10)
            .0
            .is_empty()
    );
    stop.cancel();
}

/// Issue 19 end to end: a real proxy serving from a `Full` ConfigMap acknowledges the view
/// after a TrafficPolicy edit but keeps the old policy until the kubelet delivers the new
/// ConfigMap: it is listed as behind on its policies alone until it reloads. Once it
/// disconnects it leaves the totals and the lagging list together, at once (both read the same
/// live streams): no ghost proxy lags on.
#[tokio::test]
async fn a_real_proxy_behind_on_its_configmap_policies_is_listed_until_it_reloads_or_leaves() {
    let pki = common::Pki::new("mesh");
    let (addr, hub, stop) = operator(&pki).await;
    let mut tracker = Tracker::default();
    let w1 = world(ApiMode::Permissive, 1, 3);
    let out1 = compiler::compile(&w1.snap);
    let seq = hub.publish(&out1).unwrap();
    tracker.observe(seq, Timestamp::now(), &w1.snap, &out1);
    let mut proxy =
        common::TestProxy::start_with(&pki, &common::id("client"), &configmap(&out1), None, |o| {
            o.discovery = Some(trellis_proxy::discovery::resolver::Settings {
                addrs: vec![addr.to_string()],
                operator_id: OPERATOR_ID.into(),
            })
        })
        .await;
    let tp = |tracker: &Tracker| {
        count(
            &tracker.count(&hub.stream_states()),
            "TrafficPolicy",
            "shop",
            "web",
        )
    };
    until("the proxy's report of its ConfigMap", || {
        tp(&tracker) == (1, 1)
    })
    .await;
    assert_eq!(tracker.lagging(&hub.stream_states(), |_| None, 10).1, 0);

    // shop/web's policy is edited; the operator publishes at once.
    let w2 = world_with_policy_edit("5s");
    let out2 = compiler::compile_incremental(&w2.snap, Some(&out1));
    let seq = hub.publish(&out2).unwrap();
    let edited = Timestamp::now();
    tracker.observe(seq, edited, &w2.snap, &out2);
    until("the proxy acknowledges the new view", || {
        hub.stream_states()[0].acked == seq
    })
    .await;
    let (lagging, n) = tracker.lagging(&hub.stream_states(), |_| Some("client-0".into()), 10);
    assert_eq!(n, 1);
    let since = lagging[0].stale.policies.expect("behind on its policies");
    assert_eq!(
        lagging[0].stale,
        Stale {
            policies: Some(since),
            ..Stale::default()
        },
        "acked the view, current settings: behind on the ConfigMap's policies alone"
    );
    // Since the edit, to the tracker's resolution of a second.
    assert!(
        since <= edited && edited.duration_since(since) < jiff::SignedDuration::from_secs(1),
        "{since} vs {edited}"
    );
    assert_eq!(tp(&tracker), (0, 1));

    // The kubelet swaps the file: the proxy reloads, reports, and is in step.
    proxy.apply(&configmap(&out2)).await;
    until("the reloaded policies are reported", || {
        tracker.lagging(&hub.stream_states(), |_| None, 10).1 == 0
    })
    .await;
    assert_eq!(tp(&tracker), (1, 1));

    // Another edit it will never load: it lags, then its pod goes away.
    let w3 = world_with_policy_edit("9s");
    let out3 = compiler::compile_incremental(&w3.snap, Some(&out2));
    let seq = hub.publish(&out3).unwrap();
    tracker.observe(seq, Timestamp::now(), &w3.snap, &out3);
    until("the proxy lags on its policies again", || {
        tracker.lagging(&hub.stream_states(), |_| None, 10).1 == 1
    })
    .await;
    proxy.running.shutdown.trigger();
    until("the stream is closed", || hub.stream_states().is_empty()).await;
    assert_eq!(tp(&tracker), (0, 0), "out of the totals");
    assert_eq!(
        tracker.lagging(&hub.stream_states(), |_| None, 10),
        (vec![], 0),
        "and out of the lagging list"
    );
    stop.cancel();
}

/// Under constant churn (a compile every 100 ms, as endpoint changes in a large cluster give) a
/// proxy stuck for five minutes must show as behind for five minutes, not for as long as the
/// replica happens to remember compile times: else it would never pass `--lag-threshold`.
#[test]
fn a_proxy_stuck_under_constant_churn_is_behind_for_as_long_as_it_has_been_stuck() {
    let mut tracker = Tracker::default();
    let w = world(ApiMode::Permissive, 1, 3);
    let out = compiler::compile_discovery(&w.snap, None);
    let start = t(0);
    let at = |seq: u64| start + jiff::SignedDuration::from_millis(100 * seq as i64);
    // 5 minutes of compiles.
    for seq in 1..=3000 {
        tracker.observe(seq, at(seq), &w.snap, &out);
    }
    let stuck = StreamState {
        policies: Some(out.policies["pay"].digest.clone()),
        ..stream("pay", 1, Some(&out.settings["pay"]), &[])
    };
    let (lagging, n) = tracker.lagging(&[stuck], |_| None, 10);
    assert_eq!(n, 1);
    let behind = at(3000).duration_since(lagging[0].behind_since);
    assert!(
        behind >= jiff::SignedDuration::from_secs(299),
        "behind for {behind:?}, stuck at view 1 of 3000 for 5 minutes"
    );
    // And dated no earlier than the view it missed (within the second it was recorded at).
    assert!(lagging[0].behind_since >= at(2) - jiff::SignedDuration::from_secs(1));
}

/// The report Lease stays small whatever lags: 1 000 streams behind on all three aspects, with
/// the longest names Kubernetes allows, list [`MAX_LISTED`] proxies, longest behind first,
/// and count the rest; the listed part stays far below an annotation's 256 KiB.
#[test]
fn the_lagging_list_is_bounded_whatever_lags() {
    use trellis_operator::propagation::report::MAX_LISTED;
    let mut tracker = Tracker::default();
    let w1 = world(ApiMode::Permissive, 1, 3);
    let out1 = compiler::compile_discovery(&w1.snap, None);
    tracker.observe(1, t(10), &w1.snap, &out1);
    let w2 = world_with_policy_edit("5s");
    let out2 = compiler::compile_discovery(&w2.snap, Some(&out1));
    tracker.observe(2, t(20), &w2.snap, &out2);
    let streams: Vec<StreamState> = (0..1000)
        .map(|i| StreamState {
            namespace: "pay".into(),
            identity: format!("spiffe://cluster.local/ns/pay/sa/{}", "s".repeat(253)),
            addr: Some(IpAddr::from([10, 1, (i / 256) as u8, (i % 256) as u8])),
            connected: Some(t(i % 7)),
            acked: 1,
            settings: Some("stale".into()),
            policies: Some(out1.policies["pay"].digest.clone()),
            subscriptions: vec![],
        })
        .collect();
    let (lagging, n) = tracker.lagging(
        &streams,
        |ip| Some(format!("{ip}-{}", "p".repeat(240))),
        MAX_LISTED,
    );
    assert_eq!(n, 1000);
    assert_eq!(lagging.len(), MAX_LISTED);
    assert!(
        lagging.iter().all(|p| p.stale.aspects().len() == 3),
        "{:?}",
        lagging[0]
    );
    assert!(
        lagging
            .windows(2)
            .all(|w| w[0].behind_since <= w[1].behind_since)
    );
    let bytes = serde_json::to_string(&lagging).unwrap().len();
    println!("{MAX_LISTED} listed lagging proxies: {bytes} bytes");
    assert!(bytes < 100 * 1024, "{bytes} bytes");
}

/// What a replica's report costs at the scale (1 000 namespaces, 1 000 TrafficPolicies
/// and PeerAuthentications, 1 000 streams each subscribed to 20 Services), every 5 s. A
/// measurement, not a check: `cargo test --release --test propagation -- --ignored --nocapture`.
#[test]
#[ignore]
fn report_cost_at_cluster_scale() {
    let mut w = World::new();
    for i in 0..1000 {
        let ns = format!("ns-{i}");
        w.add(traffic_policy(&ns, "tp", &format!("svc-{i}")));
        w.add(peer_auth(&ns, "mtls", ApiMode::Strict));
    }
    w.add(mesh());
    let mut out = Output::default();
    out.settings = (0..1000)
        .map(|i| (format!("ns-{i}"), format!("{i:032x}")))
        .collect();
    let mut tracker = Tracker::default();
    tracker.observe(1, t(0), &w.snap, &out);
    let streams: Vec<StreamState> = (0..1000)
        .map(|i| StreamState {
            namespace: format!("ns-{}", i % 1000),
            identity: format!("spiffe://cluster.local/ns/ns-{i}/sa/app"),
            addr: Some(IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8])),
            connected: Some(t(0)),
            acked: 1,
            settings: Some(format!("{:032x}", i % 1000)),
            policies: None,
            subscriptions: (0..20)
                .map(|k| format!("svc-{}.ns-{}", (i + k) % 1000, (i + k) % 1000))
                .collect(),
        })
        .collect();
    let start = Instant::now();
    let rounds = 20;
    let mut objects = 0;
    for _ in 0..rounds {
        objects = tracker.count(&streams).len();
        let _ = tracker.lagging(&streams, |_| None, 100);
    }
    let per = start.elapsed() / rounds;
    let c = tracker.count(&streams);
    assert_eq!(objects, 2001);
    assert_eq!(count(&c, "TrafficPolicy", "ns-7", "tp"), (20, 20));
    let (lagging, lagging_total) = tracker.lagging(&streams, |_| None, 100);
    let report = trellis_operator::propagation::ReplicaReport {
        replica: "trellis-operator-5d9c7b6f4-x2x9q".into(),
        latest: 1,
        streams: streams.len() as u64,
        objects: c,
        lagging,
        lagging_total: lagging_total as u64,
        ..Default::default()
    };
    let bytes = serde_json::to_string(&report).unwrap().len();
    println!(
        "report over 1000 streams x 20 subscriptions, {objects} objects: {per:?} per round, {bytes} bytes of JSON (an annotation holds 256 KiB)"
    );
}

/// What the report's layout costs per object, and per build, at 2 500 and 25 000 policy
/// objects (the bar), with names of two shapes: short and regular (`tp-17` in `ns-3`),
/// and long and varied (a 16-hex-digit hash in each, as generated names have). A measurement:
/// `cargo test --test propagation -- --ignored --nocapture report_layout_cost`; the README
/// quotes it.
#[test]
#[ignore]
fn report_layout_cost_at_2_500_and_25_000_objects() {
    use trellis_operator::propagation::encode::{MAX_SHARDS, encode_gzip, layout};
    use trellis_operator::propagation::report::MAX_REPORT_BYTES;
    let short = |i: usize| {
        ObjectRef::new(
            "TrafficPolicy",
            &format!("ns-{}", i / 10),
            &format!("tp-{i}"),
        )
    };
    let long = |i: usize| {
        let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ObjectRef::new(
            "TrafficPolicy",
            &format!("team-{:03}-payments-production", i % 400),
            &format!("checkout-{h:016x}-retries"),
        )
    };
    let names: [(&str, &dyn Fn(usize) -> ObjectRef); 2] = [("short", &short), ("long", &long)];
    for (shape, name) in names {
        for n in [2_500usize, 25_000] {
            let report = trellis_operator::propagation::ReplicaReport {
                replica: "trellis-operator-5d9c7b6f4-x2x9q".into(),
                latest: 41,
                streams: 1000,
                objects: (0..n)
                    .map(|i| ObjectCount {
                        object: name(i),
                        generation: 1 + (i % 7) as i64,
                        updated: 17 + (i % 3) as u64,
                        total: 20,
                    })
                    .collect(),
                ..Default::default()
            };
            let json = serde_json::to_string(&report).unwrap().len();
            let gz = encode_gzip(&report).len();
            let rounds = 5;
            let start = Instant::now();
            let mut l = layout(&report, MAX_REPORT_BYTES, MAX_SHARDS);
            for _ in 1..rounds {
                l = layout(&report, MAX_REPORT_BYTES, MAX_SHARDS);
            }
            let per = start.elapsed() / rounds;
            let total: usize = l.annotations.iter().map(String::len).sum();
            println!(
                "{shape} names, {n} objects: JSON {:.1} B/object ({json} B), gzip+base64 {:.1} B/object ({gz} B); layout: {} Lease(s), {total} B, {:?} per build, omitted {}",
                json as f64 / n as f64,
                gz as f64 / n as f64,
                l.annotations.len(),
                per,
                l.omitted
            );
            assert_eq!(l.omitted, 0);
        }
    }
}

/// Issue 19: a proxy that acknowledged every view and runs its namespace's current settings,
/// but whose ConfigMap still carries the old TrafficPolicy, is behind and `trellis check
/// --proxy` must list it.
#[test]
fn a_proxy_running_a_stale_traffic_policy_from_its_configmap_is_listed_as_lagging() {
    let mut tracker = Tracker::default();
    let w1 = world(ApiMode::Permissive, 1, 3);
    let out1 = compiler::compile(&w1.snap);
    tracker.observe(1, t(10), &w1.snap, &out1);
    let cm1 = ProxyConfig::from_json(out1.config("pay").unwrap().as_bytes()).unwrap();
    let w2 = world_with_policy_edit("5s");
    let out2 = compiler::compile(&w2.snap);
    tracker.observe(2, t(20), &w2.snap, &out2);
    let cm2 = ProxyConfig::from_json(out2.config("pay").unwrap().as_bytes()).unwrap();
    assert_eq!(cm1.settings_digest(), cm2.settings_digest());
    let streams = vec![loaded("pay", 2, &cm1), loaded("pay", 2, &cm2)];
    let (lagging, n) = tracker.lagging(&streams, |_| Some("ledger-0".into()), 10);
    assert_eq!(n, 1, "the proxy with the old policy lags: {lagging:?}");
    assert_eq!(lagging.len(), 1);
    assert_eq!(
        lagging[0].stale,
        Stale {
            policies: Some(t(20)),
            ..Stale::default()
        },
        "behind on its ConfigMap's policies alone, since the compile that changed the policy"
    );
    assert_eq!(lagging[0].behind_since, t(20));
    assert_eq!(lagging[0].pod, "ledger-0");
    // The same proxy is the one the TrafficPolicy's count has not updated.
    assert_eq!(
        count(&tracker.count(&streams), "TrafficPolicy", "shop", "web"),
        (1, 2)
    );

    // The policy is deleted: a proxy whose ConfigMap still carries it runs a policy that no
    // longer exists, and lags although no TrafficPolicy is left to count it.
    let mut w3 = w2.clone();
    w3.snap.traffic_policies.clear();
    let out3 = compiler::compile(&w3.snap);
    tracker.observe(3, t(30), &w3.snap, &out3);
    let cm3 = ProxyConfig::from_json(out3.config("pay").unwrap().as_bytes()).unwrap();
    let streams = vec![loaded("pay", 3, &cm2), loaded("pay", 3, &cm3)];
    let (lagging, n) = tracker.lagging(&streams, |_| None, 10);
    assert_eq!(n, 1, "{lagging:?}");
    assert_eq!(lagging[0].stale.policies, Some(t(30)));
    // A proxy older than the policies digest reports none: with no policy left to carry it
    // has nothing to miss.
    let streams = vec![stream("pay", 3, Some(&cm3.settings_digest()), &[])];
    assert_eq!(tracker.lagging(&streams, |_| None, 10).1, 0);
}
