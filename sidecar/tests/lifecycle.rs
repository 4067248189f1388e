//! Config reloads under traffic, refused configs, readiness and graceful shutdown, with two
//! in-process proxies over mTLS in front of a real upstream.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use trellis_proxy::config::{MtlsMode, Protocol, ProxyConfig};
use trellis_proxy::run::Options;

const PORT: u16 = 8080;

fn a_config(rev: &str, b_inbound: std::net::SocketAddr, extra: usize) -> ProxyConfig {
    let mut outbound = vec![service(
        "backend",
        PORT,
        Protocol::Http1,
        b_inbound,
        vec![id("backend")],
    )];
    // Unrelated Services that come and go with each reload.
    for i in 0..extra {
        outbound.push(service(
            &format!("other{i}"),
            9000,
            Protocol::Auto,
            "127.0.0.1:9".parse().unwrap(),
            vec![],
        ));
    }
    config(rev, inbound(MtlsMode::Strict), outbound)
}

async fn pair(pki: &Pki) -> (TestProxy, TestProxy) {
    let up = upstream(Speaks::Both).await;
    let b = TestProxy::start(
        pki,
        &id("backend"),
        &config("b1", inbound(MtlsMode::Strict), vec![]),
        Some(up),
    )
    .await;
    let a = TestProxy::start(
        pki,
        &id("web"),
        &a_config("a1", b.running.inbound_addr, 0),
        None,
    )
    .await;
    (a, b)
}

/// Keep-alive HTTP/1.1 client loop: sends requests until `stop`, counting outcomes.
async fn client_loop(
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sr, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    while !stop.load(Ordering::Relaxed) {
        let req = Request::builder()
            .uri("/echo")
            .header("host", "backend.shop:8080")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let good = match sr.send_request(req).await {
            Ok(resp) => {
                let status = resp.status();
                resp.into_body().collect().await.is_ok() && status == StatusCode::OK
            }
            Err(_) => false,
        };
        if good {
            ok.fetch_add(1, Ordering::Relaxed);
        } else {
            failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_traffic_fail_no_request() {
    let pki = Pki::new("mesh");
    let (mut a, mut b) = pair(&pki).await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(client_loop(
                a.running.outbound_addr,
                stop.clone(),
                ok.clone(),
                failed.clone(),
            ))
        })
        .collect();
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let before = ok.load(Ordering::Relaxed);
        let t = Instant::now();
        a.apply(&a_config(&format!("a-r{i}"), b.running.inbound_addr, i % 3))
            .await;
        worst = worst.max(t.elapsed());
        b.apply(&config(
            &format!("b-r{i}"),
            inbound(MtlsMode::Strict),
            vec![],
        ))
        .await;
        // Traffic keeps flowing between reloads.
        for _ in 0..100 {
            if ok.load(Ordering::Relaxed) > before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("reload under load: {ok} requests ok, {failed} failed, slowest reload seen {worst:?}");
    assert_eq!(failed, 0);
    assert!(ok > 20, "traffic flowed during the reloads: {ok}");
    let m = a.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            &["result=\"applied\""],
            "trellis_proxy_config_reloads_total"
        ),
        Some(21.0),
        "{m}"
    );
}

#[tokio::test]
async fn corrupt_or_invalid_config_is_refused_and_last_good_stays() {
    let pki = Pki::new("mesh");
    let (mut a, b) = pair(&pki).await;
    let send = |a: &TestProxy| {
        let addr = a.running.outbound_addr;
        async move { h1_send(addr, get("backend.shop", "/echo")).await.unwrap().0 }
    };
    assert_eq!(send(&a).await, StatusCode::OK);

    a.write_raw_config("{ \"version\": 1, truncated");
    let mut seen = false;
    for _ in 0..200 {
        if a.config_json().await["lastError"].is_string() {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen, "refusal not visible on /config");
    let cfg = a.config_json().await;
    assert_eq!(cfg["revision"], "a1", "last good config stays: {cfg}");
    assert_eq!(send(&a).await, StatusCode::OK, "traffic still flows");
    let m = a.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            &["result=\"rejected\""],
            "trellis_proxy_config_reloads_total"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, &[], "trellis_proxy_config_stale"),
        Some(1.0),
        "{m}"
    );

    // Parses, but fails validation (unknown version and an empty trust domain): refused whole.
    let mut bad = a_config("a-bad", b.running.inbound_addr, 0);
    bad.version = 99;
    bad.mesh.trust_domain = String::new();
    bad.outbound.clear();
    a.write_raw_config(&serde_json::to_string(&bad).unwrap());
    let mut msg = String::new();
    for _ in 0..200 {
        let m = a.metrics().await;
        if metric_value(
            &m,
            &["result=\"rejected\""],
            "trellis_proxy_config_reloads_total",
        ) == Some(2.0)
        {
            msg = a.config_json().await["lastError"]
                .as_str()
                .unwrap_or("")
                .to_string();
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        msg.contains("version") && msg.contains("trustDomain"),
        "every problem reported: {msg}"
    );
    assert_eq!(a.revision().await.as_deref(), Some("a1"));
    assert_eq!(send(&a).await, StatusCode::OK);

    a.apply(&a_config("a2", b.running.inbound_addr, 1)).await;
    let cfg = a.config_json().await;
    assert!(cfg["lastError"].is_null(), "{cfg}");
    let m = a.metrics().await;
    assert_eq!(
        metric_value(&m, &[], "trellis_proxy_config_stale"),
        Some(0.0)
    );
}

#[tokio::test]
async fn admin_endpoints_and_graceful_shutdown_drain_in_flight_requests() {
    let pki = Pki::new("mesh");
    let (a, b) = pair(&pki).await;
    assert_eq!(a.admin("GET", "/live").await.0, StatusCode::OK);
    assert_eq!(a.admin("GET", "/ready").await.0, StatusCode::OK);
    assert_eq!(
        a.admin("GET", "/shutdown").await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(a.admin("GET", "/nope").await.0, StatusCode::NOT_FOUND);
    let cfg = a.config_json().await;
    assert_eq!(cfg["identity"], id("web"));
    assert_eq!(cfg["inboundPolicy"], "mesh-default");
    assert_eq!(cfg["config"]["outbound"][0]["name"], "backend");
    // The metrics content type is OpenMetrics, and the cert expiry is exported.
    let req = get("admin", "/metrics");
    let (status, headers, body) = h1_send(a.running.admin_addr, req).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = String::from_utf8_lossy(&body);
    let expiry = metric_value(&text, &[], "trellis_proxy_cert_expiry_timestamp_seconds").unwrap();
    assert!(expiry > 1.7e9, "{text}");

    // A slow request is in flight through both proxies when B is told to shut down.
    let a_out = a.running.outbound_addr;
    let slow = tokio::spawn(async move { h1_send(a_out, get("backend.shop", "/slow")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    assert_eq!(b.admin("POST", "/shutdown").await.0, StatusCode::OK);
    assert_eq!(
        b.admin("GET", "/ready").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let drained = tokio::time::timeout(
        Duration::from_secs(5),
        b.running.wait(Duration::from_secs(3)),
    )
    .await
    .expect("drain finished");
    assert!(drained, "in-flight work finished before the deadline");
    let (status, _, body) = slow.await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"slow");
    assert!(t.elapsed() < Duration::from_secs(3));
    // B no longer accepts.
    assert!(TcpStream::connect(b.running.inbound_addr).await.is_err());
}

#[tokio::test]
async fn not_ready_without_credentials() {
    let dir = tempfile::tempdir().unwrap();
    kubelet_write(
        dir.path(),
        1,
        &config("c1", inbound(MtlsMode::Strict), vec![]).to_json_pretty(),
        "",
    );
    let (_tx, rx) = trellis_proxy::creds::channel();
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let running = trellis_proxy::run::start(
        Options {
            dir: dir.path().to_path_buf(),
            outbound_addrs: vec![any],
            inbound_addrs: vec![any],
            admin_addrs: vec![any],
            local_mode: true,
            inbound_target: None,
            inbound_to_localhost: false,
            admin_limits: trellis_proxy::admin::Limits::default(),
            opaque_ports: Vec::new(),
            tcp_flush_interval: trellis_proxy::proxy::tcp::FLUSH_INTERVAL,
            inbound_limits: Default::default(),
            app_probes: Default::default(),
            pod_ip: None,
            pod: Default::default(),
            discovery: None,
        },
        rx,
    )
    .await
    .unwrap();
    let (status, _, _) = h1_send(running.admin_addr, get("admin", "/ready"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (_, _, body) = h1_send(running.admin_addr, get("admin", "/config"))
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["ready"], false);
    assert_eq!(v["revision"], "c1");
    running.shutdown.trigger();
}

/// An app that, while answering an inbound request, calls another Service through its own
/// sidecar: the shape of every frontend. On `/call` it waits `delay` (the test stops the
/// sidecar meanwhile), then opens a new connection to the sidecar's outbound listener and
/// answers with the status it got there (502 if it could not connect).
async fn calling_app(
    outbound: Arc<std::sync::OnceLock<std::net::SocketAddr>>,
    delay: Duration,
) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let outbound = outbound.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                        let outbound = outbound.clone();
                        async move {
                            tokio::time::sleep(delay).await;
                            let to = *outbound.get().expect("outbound address set");
                            let status = match h1_send(to, get("other.shop", "/echo")).await {
                                Ok((status, _, _)) => status,
                                Err(_) => StatusCode::BAD_GATEWAY,
                            };
                            let mut resp = http::Response::new(Full::new(Bytes::new()));
                            *resp.status_mut() = status;
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// Issue #16 (seen in the local rollout): a request that reaches a pod as its sidecar starts
/// to stop is still answered, even when the app needs a *new* outbound connection through
/// that sidecar to answer it. The sidecar closes outbound only after inbound has drained.
#[tokio::test]
async fn a_stopping_sidecar_keeps_outbound_open_until_inbound_is_drained() {
    let pki = Pki::new("mesh");
    let up = upstream(Speaks::Both).await;
    let other = TestProxy::start(
        &pki,
        &id("other"),
        &config("o1", inbound(MtlsMode::Strict), vec![]),
        Some(up),
    )
    .await;
    let b_outbound = Arc::new(std::sync::OnceLock::new());
    let app = calling_app(b_outbound.clone(), Duration::from_millis(400)).await;
    let b_cfg = config(
        "b1",
        inbound(MtlsMode::Strict),
        vec![service(
            "other",
            PORT,
            Protocol::Http1,
            other.running.inbound_addr,
            vec![id("other")],
        )],
    );
    let b = TestProxy::start(&pki, &id("backend"), &b_cfg, Some(app)).await;
    b_outbound.set(b.running.outbound_addr).unwrap();
    let a = TestProxy::start(
        &pki,
        &id("web"),
        &a_config("a1", b.running.inbound_addr, 0),
        None,
    )
    .await;

    let a_out = a.running.outbound_addr;
    let call = tokio::spawn(async move { h1_send(a_out, get("backend.shop", "/call")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(b.admin("POST", "/shutdown").await.0, StatusCode::OK);
    let drained = tokio::time::timeout(
        Duration::from_secs(5),
        b.running.wait(Duration::from_secs(3)),
    )
    .await
    .expect("drain finished");
    let (status, _, _) = call.await.unwrap().unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "the app's outbound call made during the drain was refused"
    );
    assert!(drained, "the drain finished before its deadline");
    // Both sides are closed once drained.
    assert!(TcpStream::connect(b.running.inbound_addr).await.is_err());
    assert!(TcpStream::connect(b.running.outbound_addr).await.is_err());
}
