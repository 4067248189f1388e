//! The discovery stream: the pure registry over real compiler outputs, and the mTLS server with
//! real proxies' client (`trellis_proxy::discovery::client`) over real sockets and real TLS.

#[path = "../../sidecar/tests/common/mod.rs"]
mod common;
mod compiler_fixtures;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use compiler_fixtures::*;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use trellis_operator::compiler::{self, Output};
use trellis_operator::discovery::server::MAX_CONNECTIONS_PER_PEER;
use trellis_operator::discovery::{Hub, Registry, View, registry::MAX_PENDING, serve};
use trellis_proxy::config::{OutboundService, ProxyConfig};
use trellis_proxy::creds::Credentials;
use trellis_proxy::discovery::client::{Stream, StreamError};
use trellis_proxy::discovery::{ClientMessage, ServerMessage, Target};

const OPERATOR_ID: &str = "spiffe://cluster.local/ns/trellis-system/sa/trellis-operator";

/// shop/web (visible to all), pay/ledger (exported to its own namespace only), ops imports
/// only its own namespace.
fn world(web_endpoint: &str) -> World {
    World::new()
        .with(namespace("shop").meshed())
        .with(namespace("pay").meshed())
        .with(
            namespace("ops")
                .meshed()
                .annotate("trellis.dev/import-from", "."),
        )
        .with(service("shop", "web").ip("10.96.0.10").port(80, "http"))
        .with(
            slice("shop", "web", "web-1")
                .port(Some("http"), 8080)
                .endpoint(web_endpoint, Some("web-0")),
        )
        .with(pod("shop", "web-0").sa("web").ip(web_endpoint).sidecar())
        .with(
            service("pay", "ledger")
                .ip("10.96.0.20")
                .port(80, "http")
                .annotate("trellis.dev/export-to", "."),
        )
        .with(
            slice("pay", "ledger", "ledger-1")
                .port(Some("http"), 8080)
                .endpoint("10.1.0.9", Some("ledger-0")),
        )
        .with(pod("pay", "ledger-0").sa("ledger").ip("10.1.0.9").sidecar())
}

fn compile(w: &World, previous: Option<&Output>) -> Output {
    compiler::compile_incremental(&w.snap, previous)
}

fn view(out: &Output, generation: u64) -> Arc<View> {
    Arc::new(View::new(out, generation).unwrap())
}

fn services(msgs: &[ServerMessage]) -> Vec<(String, Option<OutboundService>)> {
    msgs.iter()
        .filter_map(|m| match m {
            ServerMessage::Service { key, service } => {
                Some((key.clone(), service.clone().map(|s| *s)))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_subscription_gets_the_service_the_configmap_would_list() {
    let out = compile(&world("10.1.0.5"), None);
    let mut reg = Registry::default();
    reg.publish(view(&out, 1));
    let s = reg.open("shop");
    assert!(reg.subscribe(
        s,
        vec![
            Target::Service("web.shop".into()),
            Target::Address("10.1.0.5".parse().unwrap())
        ]
    ));
    let msgs = reg.take(s);
    let got = services(&msgs);
    assert_eq!(got.len(), 1, "two targets, one Service: {msgs:?}");
    // The namespace's own ConfigMap inlines its own Services' endpoints: the stream's answer
    // is that very value (identities, endpoints, policy).
    let cm = ProxyConfig::from_json(out.config("shop").unwrap().as_bytes()).unwrap();
    assert_eq!(got[0].1.as_ref(), cm.service("web.shop"));
    assert_eq!(
        got[0].1.as_ref().unwrap().identities,
        vec!["spiffe://cluster.local/ns/shop/sa/web".to_string()]
    );
    assert_eq!(msgs.last(), Some(&ServerMessage::Synced { generation: 1 }));
}

#[test]
fn a_namespace_cannot_subscribe_to_what_it_may_not_see() {
    let out = compile(&world("10.1.0.5"), None);
    let mut reg = Registry::default();
    reg.publish(view(&out, 1));
    // pay/ledger is exported to pay only; ops imports only itself.
    for (ns, target) in [
        ("shop", Target::Service("ledger.pay".into())),
        ("shop", Target::Address("10.96.0.20".parse().unwrap())),
        ("shop", Target::Address("10.1.0.9".parse().unwrap())),
        ("ops", Target::Service("web.shop".into())),
        ("shop", Target::Service("nothing.shop".into())),
    ] {
        let s = reg.open(ns);
        reg.subscribe(s, vec![target.clone()]);
        let msgs = reg.take(s);
        assert_eq!(
            msgs,
            vec![
                ServerMessage::Unknown { target },
                ServerMessage::Synced { generation: 1 }
            ],
            "{ns}"
        );
        assert!(reg.subscriptions(s).is_empty());
    }
    let s = reg.open("pay");
    reg.subscribe(s, vec![Target::Service("ledger.pay".into())]);
    assert!(
        services(&reg.take(s))[0].1.is_some(),
        "its own namespace sees it"
    );
}

#[test]
fn changes_are_pushed_latest_wins_and_only_to_subscribers_of_what_changed() {
    let w = world("10.1.0.5");
    let out1 = compile(&w, None);
    let mut reg = Registry::default();
    reg.update(&out1, 1);
    let web = reg.open("shop");
    reg.subscribe(web, vec![Target::Service("web.shop".into())]);
    let ledger = reg.open("pay");
    reg.subscribe(ledger, vec![Target::Service("ledger.pay".into())]);
    let idle = reg.open("shop");
    assert_eq!(reg.subscribers("web.shop"), vec![web]);
    reg.take(web);
    reg.take(ledger);

    // Two endpoint changes before the stream is flushed: one message, the last state. Only
    // the subscriber of what changed is woken.
    let out2 = compile(&world("10.1.0.6"), Some(&out1));
    assert_eq!(reg.update(&out2, 2), vec![web]);
    let out3 = compile(&world("10.1.0.7"), Some(&out2));
    assert_eq!(reg.update(&out3, 3), vec![web]);
    let msgs = reg.take(web);
    let got = services(&msgs);
    assert_eq!(got.len(), 1, "{msgs:?}");
    let ep = &got[0].1.as_ref().unwrap().ports[0].endpoints[0];
    assert_eq!(ep.address.ip().to_string(), "10.1.0.7");
    assert_eq!(msgs.last(), Some(&ServerMessage::Synced { generation: 3 }));
    // The ledger did not change, and a stream with no subscriptions holds nothing to change:
    // neither hears anything.
    assert!(reg.take(ledger).is_empty());
    assert!(reg.take(idle).is_empty());

    // Acks feed propagation: a stream is up to date once it acknowledged the last change it
    // was sent.
    assert_eq!(reg.propagation().updated, 1, "only the idle stream");
    reg.ack(web, 2);
    assert_eq!(
        reg.propagation().updated,
        1,
        "web has not applied generation 3"
    );
    reg.ack(web, 3);
    reg.ack(ledger, 99); // cannot ack the future
    let p = reg.propagation();
    assert_eq!((p.generation, p.updated, p.total), (3, 3, 3));
    // A new change to web only: the ledger stays up to date without a word.
    let out4 = compile(&world("10.1.0.8"), Some(&out3));
    assert_eq!(reg.update(&out4, 4), vec![web]);
    let p = reg.propagation();
    assert_eq!((p.generation, p.updated, p.total), (4, 2, 3));
}

#[test]
fn a_proxy_an_update_did_not_concern_is_reported_as_holding_the_latest_view() {
    let out1 = compile(&world("10.1.0.5"), None);
    let mut reg = Registry::default();
    reg.update(&out1, 1);
    let web = reg.open("shop");
    reg.subscribe(web, vec![Target::Service("web.shop".into())]);
    let ledger = reg.open("pay");
    reg.subscribe(ledger, vec![Target::Service("ledger.pay".into())]);
    for id in [web, ledger] {
        reg.take(id);
        reg.ack(id, 1);
    }
    let out2 = compile(&world("10.1.0.6"), Some(&out1));
    reg.update(&out2, 2);
    // What propagation reports and `trellis check --proxy` lists: the ledger's proxy was
    // sent nothing and acknowledged nothing new, yet it is not behind; web's is, until it
    // acknowledges generation 2.
    let acked = |reg: &Registry, ns: &str| {
        reg.stream_states()
            .into_iter()
            .find(|s| s.namespace == ns)
            .unwrap()
            .acked
    };
    assert_eq!((acked(&reg, "shop"), acked(&reg, "pay")), (1, 2));
    reg.take(web);
    reg.ack(web, 2);
    assert_eq!((acked(&reg, "shop"), acked(&reg, "pay")), (2, 2));
}

/// web.shop splits to canary.shop, which is exported to its own namespace only: `pay` sees the
/// canary through the split alone.
fn split_world(split: bool) -> World {
    let mut w = World::new()
        .with(namespace("shop").meshed())
        .with(namespace("pay").meshed())
        .with(service("shop", "web").ip("10.96.0.10").port(80, "http"))
        .with(
            service("shop", "canary")
                .ip("10.96.0.11")
                .port(80, "http")
                .annotate("trellis.dev/export-to", "."),
        );
    if split {
        w.add(traffic_policy("shop", "web", "web").spec(|s| {
            s.split = ["web", "canary"]
                .into_iter()
                .map(|name| trellis_operator::api::traffic_policy::SplitBackend {
                    name: name.into(),
                    weight: 50,
                })
                .collect()
        }));
    }
    w
}

#[test]
fn a_backend_seen_only_through_a_split_is_withdrawn_when_the_split_goes() {
    let out1 = compile(&split_world(true), None);
    let mut reg = Registry::default();
    reg.update(&out1, 1);
    let s = reg.open("pay");
    reg.subscribe(s, vec![Target::Service("canary.shop".into())]);
    assert!(
        services(&reg.take(s))[0].1.is_some(),
        "visible through the split"
    );
    // Only web's entry changes (its policy); the canary's own entry is the same value, yet
    // what `pay` may see of it is not.
    let out2 = compile(&split_world(false), Some(&out1));
    assert_eq!(reg.update(&out2, 2), vec![s]);
    assert_eq!(
        services(&reg.take(s)),
        vec![("canary.shop".to_string(), None)]
    );
    assert!(reg.subscriptions(s).is_empty());
    assert!(reg.subscribers("canary.shop").is_empty());
}

#[test]
fn a_namespace_that_narrows_its_imports_loses_what_it_no_longer_imports() {
    let w = world("10.1.0.5");
    let out1 = compile(&w, None);
    let mut reg = Registry::default();
    reg.update(&out1, 1);
    let pay = reg.open("pay");
    reg.subscribe(pay, vec![Target::Service("web.shop".into())]);
    assert!(services(&reg.take(pay))[0].1.is_some());
    let shop = reg.open("shop");
    reg.subscribe(shop, vec![Target::Service("web.shop".into())]);
    reg.take(shop);
    // `pay` now imports only itself: no Service changed, a namespace's scope did.
    let mut snap = w.snap.clone();
    for ns in &mut snap.namespaces {
        if ns.metadata.name.as_deref() == Some("pay") {
            let mut n = (**ns).clone();
            n.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert("trellis.dev/import-from".into(), ".".into());
            *ns = Arc::new(n);
        }
    }
    let out2 = compiler::compile_incremental(&snap, Some(&out1));
    assert_eq!(reg.update(&out2, 2), vec![pay]);
    assert_eq!(
        services(&reg.take(pay)),
        vec![("web.shop".to_string(), None)]
    );
    assert!(reg.take(shop).is_empty());
}

#[test]
fn an_output_that_does_not_follow_the_view_is_published_from_scratch() {
    // Two compiles from scratch share no lineage: the registry cannot follow the second from
    // the first, so it compares every subscription and tells every stream the generation.
    let out1 = compile(&world("10.1.0.5"), None);
    let out2 = compile(&world("10.1.0.6"), None);
    let mut reg = Registry::default();
    reg.update(&out1, 1);
    let web = reg.open("shop");
    reg.subscribe(web, vec![Target::Service("web.shop".into())]);
    let ledger = reg.open("pay");
    reg.subscribe(ledger, vec![Target::Service("ledger.pay".into())]);
    reg.take(web);
    reg.take(ledger);
    assert_eq!(reg.update(&out2, 2), vec![web, ledger]);
    assert_eq!(services(&reg.take(web)).len(), 1);
    assert_eq!(
        reg.take(ledger),
        vec![ServerMessage::Synced { generation: 2 }]
    );
}

#[test]
fn a_service_that_becomes_hidden_is_withdrawn() {
    let w = world("10.1.0.5");
    let out1 = compile(&w, None);
    let mut reg = Registry::default();
    reg.publish(view(&out1, 1));
    let s = reg.open("shop");
    reg.subscribe(s, vec![Target::Service("web.shop".into())]);
    reg.take(s);
    // web.shop is re-exported to `pay` only.
    let mut snap = w.snap.clone();
    let mut web = (*snap.services[0]).clone();
    web.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("trellis.dev/export-to".into(), "pay".into());
    snap.services[0] = Arc::new(web);
    let out2 = compiler::compile_incremental(&snap, Some(&out1));
    reg.publish(view(&out2, 2));
    assert_eq!(services(&reg.take(s)), vec![("web.shop".to_string(), None)]);
    assert!(reg.subscriptions(s).is_empty());
}

#[test]
fn a_slow_stream_holds_at_most_a_bounded_pending_set_then_gets_a_fresh_snapshot() {
    let n = MAX_PENDING + 44;
    let build = |port: i32| {
        let mut w = World::new().with(namespace("shop").meshed());
        for i in 0..n {
            w.add(
                service("shop", &format!("s{i}"))
                    .ip(&format!("10.96.{}.{}", i / 200, i % 200 + 1))
                    .port(port, "http"),
            );
        }
        w
    };
    let out1 = compile(&build(80), None);
    let mut reg = Registry::default();
    reg.publish(view(&out1, 1));
    let s = reg.open("shop");
    reg.subscribe(
        s,
        (0..n)
            .map(|i| Target::Service(format!("s{i}.shop")))
            .collect(),
    );
    assert!(reg.pending_len(s) <= MAX_PENDING);
    // Every Service changes, repeatedly, and the stream is never flushed.
    let mut prev = out1;
    for port in [81, 82, 83] {
        let out = compile(&build(port), Some(&prev));
        reg.publish(view(&out, port as u64));
        assert!(reg.pending_len(s) <= MAX_PENDING);
        prev = out;
    }
    let got = services(&reg.take(s));
    assert_eq!(got.len(), n, "a fresh snapshot of every subscription");
    assert!(
        got.iter()
            .all(|(_, s)| s.as_ref().unwrap().ports[0].port == 83)
    );
}

#[test]
fn subscriptions_before_the_first_compile_are_answered_when_it_arrives() {
    let mut reg = Registry::default();
    let s = reg.open("shop");
    assert!(!reg.subscribe(s, vec![Target::Service("web.shop".into())]));
    assert!(reg.take(s).is_empty());
    let out = compile(&world("10.1.0.5"), None);
    assert_eq!(reg.publish(view(&out, 1)), vec![s]);
    assert_eq!(services(&reg.take(s)).len(), 1);
}

// ---- The server, over real sockets and real mTLS ----

fn creds(pki: &common::Pki, id: &str, roots: &[&common::Pki]) -> Credentials {
    let (c, k) = pki.leaf(id);
    let bundle: String = roots.iter().map(|p| p.ca_pem.clone()).collect();
    trellis_proxy::tls::credentials_from_pem(
        &std::fs::read(c).unwrap(),
        &std::fs::read(k).unwrap(),
        bundle.as_bytes(),
    )
    .unwrap()
}

struct Operator {
    addr: SocketAddr,
    hub: Arc<Hub>,
    stop: CancellationToken,
}

async fn operator(pki: &common::Pki) -> Operator {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls =
        trellis_proxy::tls::server_config(&creds(pki, OPERATOR_ID, &[pki]), &[b"h2"]).unwrap();
    let hub = Hub::new();
    let stop = CancellationToken::new();
    // The last value stays readable after the sender is gone.
    let tls = tokio::sync::watch::channel(Some(tls)).1;
    tokio::spawn(serve(listener, tls, hub.clone(), stop.clone()));
    Operator { addr, hub, stop }
}

fn client_tls(c: &Credentials) -> Arc<rustls::ClientConfig> {
    trellis_proxy::tls::client_config(c, &[OPERATOR_ID.to_string()], &[b"h2"]).unwrap()
}

async fn next(stream: &mut Stream) -> ServerMessage {
    tokio::time::timeout(Duration::from_secs(5), stream.recv())
        .await
        .expect("a message within 5 s")
        .unwrap()
        .expect("stream open")
}

/// Messages up to and including the next `Synced`.
async fn batch(stream: &mut Stream) -> Vec<ServerMessage> {
    let mut out = Vec::new();
    loop {
        let m = next(stream).await;
        let done = matches!(m, ServerMessage::Synced { .. });
        out.push(m);
        if done {
            return out;
        }
    }
}

#[tokio::test]
async fn a_proxy_subscribes_over_mtls_and_an_endpoint_change_is_pushed() {
    let pki = common::Pki::new("mesh");
    let op = operator(&pki).await;
    let out1 = compile(&world("10.1.0.5"), None);
    op.hub.publish(&out1);

    let client = creds(&pki, "spiffe://cluster.local/ns/shop/sa/client", &[&pki]);
    let mut stream = Stream::open(op.addr, client_tls(&client)).await.unwrap();
    assert!(
        stream
            .send(&ClientMessage::Subscribe {
                targets: vec![
                    Target::Address("10.96.0.10".parse().unwrap()),
                    Target::Service("ledger.pay".into()),
                ]
            })
            .await
    );
    let msgs = batch(&mut stream).await;
    let got = services(&msgs);
    assert_eq!(got.len(), 1, "{msgs:?}");
    assert_eq!(got[0].0, "web.shop");
    assert!(msgs.contains(&ServerMessage::Unknown {
        target: Target::Service("ledger.pay".into())
    }));

    // The EndpointSlice changes; the push arrives well within the design's budget.
    let t = Instant::now();
    let out2 = compile(&world("10.1.0.6"), Some(&out1));
    op.hub.publish(&out2);
    let msgs = batch(&mut stream).await;
    let elapsed = t.elapsed();
    let got = services(&msgs);
    assert_eq!(
        got[0].1.as_ref().unwrap().ports[0].endpoints[0]
            .address
            .ip()
            .to_string(),
        "10.1.0.6"
    );
    assert!(elapsed < Duration::from_millis(500), "{elapsed:?}");
    let ServerMessage::Synced { generation } = msgs.last().unwrap() else {
        unreachable!()
    };
    stream
        .send(&ClientMessage::Ack {
            generation: *generation,
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while op.hub.propagation().updated != 1 {
        assert!(Instant::now() < deadline, "ack not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(op.hub.propagation().total, 1);

    // The proxy goes away: its stream is dropped from the registry.
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    while op.hub.propagation().total != 0 {
        assert!(Instant::now() < deadline, "closed stream still registered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    op.stop.cancel();
}

#[tokio::test]
async fn a_proxy_whose_services_did_not_change_hears_nothing_and_stays_up_to_date() {
    let pki = common::Pki::new("mesh");
    let op = operator(&pki).await;
    let out1 = compile(&world("10.1.0.5"), None);
    op.hub.publish(&out1);

    let mut streams = Vec::new();
    for (ns, key) in [("shop", "web.shop"), ("pay", "ledger.pay")] {
        let c = creds(
            &pki,
            &format!("spiffe://cluster.local/ns/{ns}/sa/client"),
            &[&pki],
        );
        let mut stream = Stream::open(op.addr, client_tls(&c)).await.unwrap();
        stream
            .send(&ClientMessage::Subscribe {
                targets: vec![Target::Service(key.into())],
            })
            .await;
        let msgs = batch(&mut stream).await;
        assert_eq!(services(&msgs).len(), 1, "{msgs:?}");
        let Some(ServerMessage::Synced { generation }) = msgs.last() else {
            unreachable!()
        };
        stream
            .send(&ClientMessage::Ack {
                generation: *generation,
            })
            .await;
        streams.push(stream);
    }
    let (mut shop, mut pay) = (streams.remove(0), streams.remove(0));

    // web.shop's endpoint changes: its subscriber gets it...
    op.hub.publish(&compile(&world("10.1.0.6"), Some(&out1)));
    let msgs = batch(&mut shop).await;
    assert_eq!(services(&msgs)[0].0, "web.shop");
    let Some(ServerMessage::Synced { generation }) = msgs.last() else {
        unreachable!()
    };
    shop.send(&ClientMessage::Ack {
        generation: *generation,
    })
    .await;
    // ...and the ledger's subscriber is neither woken nor sent anything (several debounce
    // periods pass), yet counts as holding the current view.
    let quiet = tokio::time::timeout(Duration::from_millis(400), pay.recv()).await;
    assert!(quiet.is_err(), "the ledger's proxy heard {quiet:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let p = op.hub.propagation();
        if (p.generation, p.updated, p.total) == (2, 2, 2) {
            break;
        }
        assert!(Instant::now() < deadline, "{p:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    op.stop.cancel();
}

/// One mesh workload (a compromised pod holds a valid certificate) holding idle connections
/// from its address: past its share they are closed, and proxies elsewhere still subscribe.
#[tokio::test]
async fn one_workload_cannot_hold_more_than_its_share_of_connections() {
    use tokio::io::AsyncReadExt;
    let pki = common::Pki::new("mesh");
    let op = operator(&pki).await;
    op.hub.publish(&compile(&world("10.1.0.5"), None));
    let hostile = client_tls(&creds(
        &pki,
        "spiffe://cluster.local/ns/shop/sa/mallory",
        &[&pki],
    ));
    let connect = || async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let tcp = socket.connect(op.addr).await?;
        tokio_rustls::TlsConnector::from(hostile.clone())
            .connect(trellis_proxy::tls::mesh_server_name(), tcp)
            .await
    };
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS_PER_PEER {
        held.push(connect().await.unwrap());
    }
    let closed = match connect().await {
        Err(_) => true,
        Ok(mut extra) => {
            let mut buf = [0u8; 256];
            tokio::time::timeout(Duration::from_secs(2), async {
                loop {
                    match extra.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await
            .is_ok()
        }
    };
    assert!(closed, "a connection past the per-address cap was kept");
    // A proxy at another address subscribes and is answered.
    let c = creds(&pki, "spiffe://cluster.local/ns/shop/sa/client", &[&pki]);
    let mut stream = Stream::open(op.addr, client_tls(&c)).await.unwrap();
    assert!(
        stream
            .send(&ClientMessage::Subscribe {
                targets: vec![Target::Service("web.shop".into())]
            })
            .await
    );
    assert_eq!(services(&batch(&mut stream).await).len(), 1);
    drop(held);
    op.stop.cancel();
}

#[tokio::test]
async fn only_workloads_of_the_mesh_may_connect() {
    let pki = common::Pki::new("mesh");
    let op = operator(&pki).await;
    op.hub.publish(&compile(&world("10.1.0.5"), None));

    // Another CA (another mesh): refused in the handshake.
    let other = common::Pki::new("other");
    let foreign = creds(&other, "spiffe://cluster.local/ns/shop/sa/client", &[&pki]);
    let err = Stream::open(op.addr, client_tls(&foreign))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StreamError::Tls(..) | StreamError::Http(_)),
        "{err}"
    );

    // Same CA, another trust domain: refused.
    let td = creds(&pki, "spiffe://other.example/ns/shop/sa/client", &[&pki]);
    let err = Stream::open(op.addr, client_tls(&td)).await.unwrap_err();
    assert!(
        matches!(err, StreamError::Tls(..) | StreamError::Http(_)),
        "{err}"
    );

    // A mesh certificate that is not a workload's: 403.
    let odd = creds(&pki, "spiffe://cluster.local/something/else", &[&pki]);
    let err = Stream::open(op.addr, client_tls(&odd)).await.unwrap_err();
    assert!(
        matches!(err, StreamError::Status(s) if s == http::StatusCode::FORBIDDEN),
        "{err}"
    );

    // No client certificate at all.
    let mut anon = rustls::ClientConfig::builder_with_provider(trellis_proxy::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_no_client_auth();
    anon.alpn_protocols = vec![b"h2".to_vec()];
    let err = Stream::open(op.addr, Arc::new(anon)).await.unwrap_err();
    assert!(
        matches!(err, StreamError::Tls(..) | StreamError::Http(_)),
        "{err}"
    );

    // The proxy checks the operator's identity: a workload posing as the operator is refused.
    let client = creds(&pki, "spiffe://cluster.local/ns/shop/sa/client", &[&pki]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_addr = listener.local_addr().unwrap();
    let fake_tls = trellis_proxy::tls::server_config(
        &creds(&pki, "spiffe://cluster.local/ns/shop/sa/mallory", &[&pki]),
        &[b"h2"],
    )
    .unwrap();
    let stop = CancellationToken::new();
    let fake_tls = tokio::sync::watch::channel(Some(fake_tls)).1;
    tokio::spawn(serve(listener, fake_tls, Hub::new(), stop.clone()));
    let err = Stream::open(fake_addr, client_tls(&client))
        .await
        .unwrap_err();
    assert!(matches!(err, StreamError::Tls(..)), "{err}");

    // And the real one still serves the real client.
    let mut ok = Stream::open(op.addr, client_tls(&client)).await.unwrap();
    ok.send(&ClientMessage::Subscribe {
        targets: vec![Target::Service("web.shop".into())],
    })
    .await;
    assert_eq!(services(&batch(&mut ok).await).len(), 1);
    stop.cancel();
    op.stop.cancel();
}

/// A client-side verifier that accepts any server, so the test reaches the server's own
/// client-certificate check.
#[derive(Debug)]
struct AcceptAny;

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        trellis_proxy::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// ---- Real proxies resolving through the stream ----

/// An HTTP app on 127.0.0.1:0 answering every request with `body`.
async fn app(body: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(body.as_bytes())),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// shop/web, whose one endpoint is a sidecar's inbound listener on `endpoint` (identity
/// `sa/web`); the client's namespace `shop` has nothing in its ConfigMap.
fn local_world(endpoint: SocketAddr) -> World {
    World::new()
        .with(namespace("shop").meshed())
        .with(service("shop", "web").ip("10.96.0.10").port(80, "http"))
        .with(
            slice("shop", "web", "web-1")
                .port(Some("http"), i32::from(endpoint.port()))
                .endpoint(&endpoint.ip().to_string(), Some("web-0")),
        )
        .with(
            pod("shop", "web-0")
                .sa("web")
                .ip(&endpoint.ip().to_string())
                .sidecar(),
        )
}

async fn get_body(proxy: &common::TestProxy, authority: &str) -> Option<String> {
    let r = common::h1_send(proxy.running.outbound_addr, common::get(authority, "/"))
        .await
        .ok()?;
    (r.0 == http::StatusCode::OK).then(|| String::from_utf8_lossy(&r.2).into_owned())
}

#[tokio::test]
async fn a_proxy_learns_a_meshed_service_from_the_stream_follows_its_endpoints_and_survives_the_operator()
 {
    use trellis_proxy::config::MtlsMode;
    let pki = common::Pki::new("mesh");
    // Two pods of web.shop; their sidecars accept mTLS only, so a 200 proves mTLS.
    let b = common::TestProxy::start(
        &pki,
        &common::id("web"),
        &common::config("r1", common::inbound(MtlsMode::Strict), vec![]),
        Some(app("b").await),
    )
    .await;
    let c = common::TestProxy::start(
        &pki,
        &common::id("web"),
        &common::config("r1", common::inbound(MtlsMode::Strict), vec![]),
        Some(app("c").await),
    )
    .await;
    let op = operator(&pki).await;
    let out1 = compile(&local_world(b.running.inbound_addr), None);
    op.hub.publish(&out1);

    // The caller's ConfigMap lists nothing: web.shop is learned on the first request.
    let client = common::TestProxy::start_with(
        &pki,
        &common::id("client"),
        &common::config("r1", common::inbound(MtlsMode::Permissive), vec![]),
        None,
        |o| {
            o.discovery = Some(trellis_proxy::discovery::resolver::Settings {
                addrs: vec![op.addr.to_string()],
                operator_id: OPERATOR_ID.into(),
            })
        },
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut first = None;
    while first.is_none() {
        assert!(Instant::now() < deadline, "web.shop never resolved");
        first = get_body(&client, "web.shop").await;
        if first.is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(first.as_deref(), Some("b"));
    assert!(
        client.config_json().await["config"]["outbound"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "web"),
        "the learned Service is in the config the data path uses"
    );

    // The endpoint moves to the other pod: the next requests go there, well within a second.
    let t = Instant::now();
    let out2 = compile(&local_world(c.running.inbound_addr), Some(&out1));
    op.hub.publish(&out2);
    loop {
        if get_body(&client, "web.shop").await.as_deref() == Some("c") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "endpoint change not applied"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The proxy acknowledged what it applied.
    let deadline = Instant::now() + Duration::from_secs(5);
    while op.hub.propagation().updated != 1 {
        assert!(
            Instant::now() < deadline,
            "no ack for {:?}",
            op.hub.propagation()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The operator goes away: traffic keeps flowing from the cache, without a failure.
    op.stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..20 {
        assert_eq!(get_body(&client, "web.shop").await.as_deref(), Some("c"));
    }
    // A destination nobody knows still gets the old behaviour, without waiting for the
    // operator that is gone.
    let t = Instant::now();
    let _ = get_body(&client, "nothing.shop").await;
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn the_table_only_compile_serves_exactly_what_the_full_compile_serves() {
    let w1 = world("10.1.0.5");
    let full = compile(&w1, None);
    let table = compiler::compile_discovery(&w1.snap, None);
    assert!(table.configs.is_empty(), "no namespace config is built");
    // Incremental from a table-only compile, as the replica's loop runs it.
    let table2 = compiler::compile_discovery(&world("10.1.0.6").snap, Some(&table));
    let full2 = compile(&world("10.1.0.6"), Some(&full));
    for (a, b) in [(&full, &table), (&full2, &table2)] {
        for ns in ["shop", "pay", "ops"] {
            let (mut ra, mut rb) = (Registry::default(), Registry::default());
            ra.publish(view(a, 1));
            rb.publish(view(b, 1));
            let targets = vec![
                Target::Service("web.shop".into()),
                Target::Service("ledger.pay".into()),
                Target::Address("10.1.0.9".parse().unwrap()),
                Target::Address("10.96.0.10".parse().unwrap()),
            ];
            let (sa, sb) = (ra.open(ns), rb.open(ns));
            ra.subscribe(sa, targets.clone());
            rb.subscribe(sb, targets);
            assert_eq!(ra.take(sa), rb.take(sb), "{ns}");
        }
    }
}
