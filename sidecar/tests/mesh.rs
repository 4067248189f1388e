//! Two in-process proxies talking mTLS on loopback, in local mode: the client sends to proxy
//! A's outbound listener with the Service's name in `Host`; A routes to the Service's endpoint,
//! which is proxy B's inbound listener; B terminates mTLS and forwards to a real upstream.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_proxy::config::{MtlsMode, Protocol};

const PORT: u16 = 8080;

/// Client proxy A ("web") and server proxy B ("backend") in front of `upstream`.
async fn pair(
    pki: &Pki,
    upstream: std::net::SocketAddr,
    protocol: Protocol,
    expect: &str,
) -> (TestProxy, TestProxy) {
    let b = TestProxy::start(
        pki,
        &id("backend"),
        &config("b1", inbound(MtlsMode::Strict), vec![]),
        Some(upstream),
    )
    .await;
    let a = client_sidecar(pki, protocol, b.running.inbound_addr, expect).await;
    (a, b)
}

/// The client sidecar takes up to 100 header lines from its application (hyper's and Envoy's
/// default); what it adds on the way (request id, trace context) must not make the far
/// sidecar refuse the request it accepted: all 100 reach the application. One more is `431`
/// at the client sidecar, and nothing reaches the application.
#[tokio::test]
async fn a_request_with_100_header_lines_reaches_the_app_whole() {
    let pki = Pki::new("mesh");
    let up = upstream(Speaks::Http1Only).await;
    let (a, _b) = pair(&pki, up, Protocol::Http1, &id("backend")).await;
    let req = |lines: usize| {
        let mut r = Request::builder()
            .uri("/echo")
            .header("host", "backend.shop:8080");
        for i in 1..lines {
            r = r.header(format!("x-line-{i}"), "v");
        }
        r.body(Full::new(Bytes::new())).unwrap()
    };
    let (status, _, body) = h1_send(a.running.outbound_addr, req(100)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let echo = echo_json(&body);
    let seen = echo["headers"].as_object().unwrap();
    for i in 1..100 {
        assert!(
            seen.contains_key(&format!("x-line-{i}")),
            "x-line-{i} reached the app"
        );
    }
    let (status, _, _) = h1_send(a.running.outbound_addr, req(101)).await.unwrap();
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
}

/// The application's idle keep-alive connection to its sidecar stays open past hyper's 30 s
/// header read timeout, which used to close it: closing it races the application's pool
/// reusing it (a request written as the sidecar closes fails, and is not retried when it is
/// not idempotent). The application's pool decides when its connections are idle.
#[tokio::test]
async fn an_idle_application_connection_is_not_closed_by_the_sidecar() {
    let pki = Pki::new("mesh");
    let up = upstream(Speaks::Http1Only).await;
    let (a, _b) = pair(&pki, up, Protocol::Http1, &id("backend")).await;
    let tcp = TcpStream::connect(a.running.outbound_addr).await.unwrap();
    let (mut sr, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let resp = sr
        .send_request(get("backend.shop:8080", "/echo"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert!(!conn.is_finished(), "the sidecar closed an idle connection");
    let resp = sr
        .send_request(get("backend.shop:8080", "/echo"))
        .await
        .expect("the idle connection still carries a request");
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn http1_through_two_proxies_over_mtls() {
    let pki = Pki::new("mesh");
    let up = upstream(Speaks::Http1Only).await;
    let (a, b) = pair(&pki, up, Protocol::Http1, &id("backend")).await;

    let req = Request::builder()
        .method("POST")
        .uri("/echo?x=1")
        .header("host", "backend.shop:8080")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("tracestate", "vendor=1")
        .header("connection", "x-hop")
        .header("x-hop", "secret")
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let (status, _, body) = h1_send(a.running.outbound_addr, req).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let echo = echo_json(&body);
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/echo");
    assert_eq!(echo["bodyLen"], 5);
    assert_eq!(echo["version"], "HTTP/1.1", "the app gets HTTP/1.1 back");
    let h = &echo["headers"];
    assert_eq!(h["host"], "backend.shop:8080");
    assert_eq!(
        h["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert_eq!(h["tracestate"], "vendor=1");
    assert_eq!(h["x-request-id"].as_str().unwrap().len(), 36);
    assert!(
        h.get("x-hop").is_none(),
        "Connection-named header forwarded"
    );
    assert!(h.get("trellis-orig-proto").is_none());

    // Both sides saw the other's verified identity.
    let ma = a.metrics().await;
    assert_eq!(
        metric_value(
            &ma,
            &[
                "direction=\"outbound\"",
                &format!("peer_identity=\"{}\"", id("backend")),
                "dst_service=\"backend.shop\"",
                "status_code=\"200\"",
                "tls=\"true\""
            ],
            "trellis_proxy_requests_total"
        ),
        Some(1.0),
        "{ma}"
    );
    let mb = b.metrics().await;
    assert_eq!(
        metric_value(
            &mb,
            &[
                "direction=\"inbound\"",
                &format!("peer_identity=\"{}\"", id("web")),
                "tls=\"true\""
            ],
            "trellis_proxy_requests_total"
        ),
        Some(1.0),
        "{mb}"
    );

    // An existing x-request-id passes through unchanged.
    let mut req = get("backend.shop", "/echo");
    req.headers_mut()
        .insert("x-request-id", "my-id".parse().unwrap());
    let (_, _, body) = h1_send(a.running.outbound_addr, req).await.unwrap();
    assert_eq!(echo_json(&body)["headers"]["x-request-id"], "my-id");

    // Unknown authority in local mode: no route.
    let (status, _, _) = h1_send(a.running.outbound_addr, get("nope.shop", "/"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn grpc_streaming_with_trailers_over_h2() {
    let pki = Pki::new("mesh");
    let up = upstream(Speaks::Http2Only).await;
    let (a, _b) = pair(&pki, up, Protocol::Grpc, &id("backend")).await;

    let tcp = TcpStream::connect(a.running.outbound_addr).await.unwrap();
    let (mut sr, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
    let req = Request::builder()
        .method("POST")
        .uri("http://backend.shop:8080/grpc")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(tokio_stream_from(rx)))
        .unwrap();
    let resp_fut = tokio::spawn(async move { sr.send_request(req).await });
    // Stream: send one message, read its echo, then the next (proves streaming, not buffering).
    tx.send(Ok(Frame::data(Bytes::from_static(b"one"))))
        .await
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), resp_fut)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let f = body.frame().await.unwrap().unwrap();
    assert_eq!(f.into_data().unwrap(), Bytes::from_static(b"one"));
    tx.send(Ok(Frame::data(Bytes::from_static(b"two"))))
        .await
        .unwrap();
    let f = body.frame().await.unwrap().unwrap();
    assert_eq!(f.into_data().unwrap(), Bytes::from_static(b"two"));
    drop(tx);
    let mut trailers = None;
    while let Some(f) = body.frame().await {
        let f = f.unwrap();
        if f.is_trailers() {
            trailers = Some(f.into_trailers().unwrap());
        }
    }
    let t = trailers.expect("trailers crossed both proxies");
    assert_eq!(t["grpc-status"], "0");
    assert_eq!(t["grpc-message"], "ok");
}

#[tokio::test]
async fn h2_prior_knowledge_reaches_h2_app() {
    let pki = Pki::new("mesh");
    let up = upstream(Speaks::Both).await;
    let (a, _b) = pair(&pki, up, Protocol::Auto, &id("backend")).await;
    let tcp = TcpStream::connect(a.running.outbound_addr).await.unwrap();
    let (mut sr, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("http://backend.shop:8080/echo")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sr.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let echo = echo_json(&body);
    assert_eq!(echo["version"], "HTTP/2.0");
    assert_eq!(echo["authority"], "backend.shop:8080");
}

#[tokio::test]
async fn websocket_style_upgrade_is_tunnelled() {
    let pki = Pki::new("mesh");
    let up = upstream(Speaks::Http1Only).await;
    let (a, _b) = pair(&pki, up, Protocol::Http1, &id("backend")).await;
    let mut s = TcpStream::connect(a.running.outbound_addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: backend.shop:8080\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "closed during the 101");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: echo"),
        "{head}"
    );
    for msg in [&b"ping"[..], b"second message"] {
        s.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(buf, msg);
    }
}

#[tokio::test]
async fn wrong_spiffe_id_is_refused() {
    let pki = Pki::new("mesh");
    let up = upstream(Speaks::Both).await;
    // A expects "payments", B presents "backend".
    let (a, b) = pair(&pki, up, Protocol::Http1, &id("payments")).await;
    let (status, _, _) = h1_send(a.running.outbound_addr, get("backend.shop", "/echo"))
        .await
        .unwrap();
    // The traffic layer turns a failed connect into 502 or 503 (no endpoint left).
    assert!(
        status == StatusCode::BAD_GATEWAY || status == StatusCode::SERVICE_UNAVAILABLE,
        "{status}"
    );
    let mb = b.metrics().await;
    assert_eq!(
        metric_value(
            &mb,
            &["direction=\"inbound\""],
            "trellis_proxy_requests_total"
        ),
        None,
        "nothing reached B's application side: {mb}"
    );
}

#[tokio::test]
async fn peer_from_another_ca_is_refused() {
    let pki = Pki::new("mesh");
    let rogue = Pki::new("rogue");
    let up = upstream(Speaks::Both).await;
    let b = TestProxy::start(
        &pki,
        &id("backend"),
        &config("b1", inbound(MtlsMode::Strict), vec![]),
        Some(up),
    )
    .await;
    // A holds a certificate with the right trust domain, signed by another CA.
    let a = client_sidecar(
        &rogue,
        Protocol::Http1,
        b.running.inbound_addr,
        &id("backend"),
    )
    .await;
    let (status, _, _) = h1_send(a.running.outbound_addr, get("backend.shop", "/echo"))
        .await
        .unwrap();
    // The traffic layer turns a failed connect into 502 or 503 (no endpoint left).
    assert!(
        status == StatusCode::BAD_GATEWAY || status == StatusCode::SERVICE_UNAVAILABLE,
        "{status}"
    );
    let mb = b.metrics().await;
    assert_eq!(
        metric_value(
            &mb,
            &["reason=\"handshake\""],
            "trellis_proxy_inbound_refused_total"
        ),
        Some(1.0),
        "{mb}"
    );
}

#[tokio::test]
async fn plaintext_refused_under_strict_and_accepted_when_permissive() {
    let pki = Pki::new("mesh");
    let up = upstream(Speaks::Both).await;
    let (_a, mut b) = pair(&pki, up, Protocol::Http1, &id("backend")).await;
    let err = h1_send(b.running.inbound_addr, get("backend", "/echo")).await;
    assert!(
        err.is_err(),
        "plaintext got an answer under Strict: {err:?}"
    );
    let mb = b.metrics().await;
    assert_eq!(
        metric_value(
            &mb,
            &["reason=\"plaintext\""],
            "trellis_proxy_inbound_refused_total"
        ),
        Some(1.0),
        "{mb}"
    );

    b.apply(&config("b2", inbound(MtlsMode::Permissive), vec![]))
        .await;
    let (status, _, body) = h1_send(b.running.inbound_addr, get("backend", "/echo"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echo_json(&body)["path"], "/echo");
    let mb = b.metrics().await;
    assert_eq!(
        metric_value(
            &mb,
            &["direction=\"inbound\"", "tls=\"false\""],
            "trellis_proxy_requests_total"
        ),
        Some(1.0),
        "{mb}"
    );
}

/// A plaintext keep-alive connection accepted under Permissive must not keep working once the
/// port becomes Strict: the mode is re-checked per request, not only at accept time.
#[tokio::test]
async fn switching_to_strict_refuses_open_plaintext_connections() {
    let pki = Pki::new("mesh");
    let up = upstream(Speaks::Both).await;
    let (_a, mut b) = pair(&pki, up, Protocol::Http1, &id("backend")).await;
    b.apply(&config("b2", inbound(MtlsMode::Permissive), vec![]))
        .await;
    let tcp = TcpStream::connect(b.running.inbound_addr).await.unwrap();
    let (mut sr, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let resp = sr.send_request(get("backend", "/echo")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();

    b.apply(&config("b3", inbound(MtlsMode::Strict), vec![]))
        .await;
    sr.ready()
        .await
        .expect("the keep-alive connection is still open");
    let resp = sr.send_request(get("backend", "/echo")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    resp.into_body().collect().await.unwrap();
    // The proxy closes the connection after refusing.
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("connection closed by the proxy")
        .unwrap()
        .unwrap();
    let mb = b.metrics().await;
    assert_eq!(
        metric_value(
            &mb,
            &["reason=\"plaintext\""],
            "trellis_proxy_inbound_refused_total"
        ),
        Some(1.0),
        "{mb}"
    );
    // Only the first request reached the upstream in plaintext.
    assert_eq!(
        metric_value(
            &mb,
            &["direction=\"inbound\"", "tls=\"false\""],
            "trellis_proxy_requests_total"
        ),
        Some(1.0),
        "{mb}"
    );
}

#[tokio::test]
async fn opaque_tcp_through_both_proxies_over_mtls() {
    opaque_tcp_case(false).await;
}

/// The pod annotation `trellis.dev/opaque-ports` reaches the proxy as `--opaque-ports`
/// (`TRELLIS_OPAQUE_PORTS`); a server-first port listed only there must not wait either.
#[tokio::test]
async fn opaque_ports_flag_skips_detection_like_the_config() {
    opaque_tcp_case(true).await;
}

async fn opaque_tcp_case(via_flag: bool) {
    let pki = Pki::new("mesh");
    // A server-first TCP upstream: greets, then echoes.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                s.write_all(b"220 hello\r\n").await.unwrap();
                let mut buf = [0u8; 256];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let mut b_cfg = config("b1", inbound(MtlsMode::Strict), vec![]);
    let opaque = if via_flag {
        vec![up.port()]
    } else {
        b_cfg.mesh.skip_detection_ports = vec![up.port()];
        Vec::new()
    };
    let b = TestProxy::start_with_opaque(&pki, &id("db"), &b_cfg, Some(up), opaque).await;
    let mut a = TestProxy::start(
        &pki,
        &id("web"),
        &config("a1", inbound(MtlsMode::Strict), vec![]),
        None,
    )
    .await;
    // Local mode has no SO_ORIGINAL_DST: declare a TCP Service whose address is A's outbound
    // listener itself, so a plain connect() to it is routed like a redirected one.
    let out = a.running.outbound_addr;
    let mut svc = service(
        "db",
        out.port(),
        Protocol::Tcp,
        b.running.inbound_addr,
        vec![id("db")],
    );
    svc.addresses = vec![out.ip()];
    a.apply(&config("a2", inbound(MtlsMode::Strict), vec![svc]))
        .await;

    let mut s = TcpStream::connect(out).await.unwrap();
    let mut greet = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut greet))
        .await
        .expect("server-first greeting must not wait for detection")
        .unwrap();
    assert_eq!(&greet, b"220 hello\r\n");
    s.write_all(b"PING\r\n").await.unwrap();
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"PING\r\n");
    drop(s);
    // All bytes are published by the time the connection has closed.
    let mut ok = false;
    for _ in 0..100 {
        let mb = b.metrics().await;
        if metric_value(
            &mb,
            &[
                "direction=\"inbound\"",
                "tls=\"true\"",
                "flow=\"from_client\"",
            ],
            "trellis_proxy_tcp_transfer_bytes_total",
        ) == Some(6.0)
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "{}", b.metrics().await);
}

#[tokio::test]
async fn inbound_rate_limit_applies_per_source_identity() {
    let pki = Pki::new("mesh");
    let up = upstream(Speaks::Both).await;
    let (a, mut b) = pair(&pki, up, Protocol::Http1, &id("backend")).await;
    let mut pol = inbound(MtlsMode::Strict);
    pol[0].rate_limit = Some(trellis_proxy::config::RateLimit {
        requests_per_second: 0.01,
        burst: 2,
    });
    b.apply(&config("b2", pol, vec![])).await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let (s, h, _) = h1_send(a.running.outbound_addr, get("backend.shop", "/echo"))
            .await
            .unwrap();
        if s == StatusCode::TOO_MANY_REQUESTS {
            assert!(h.contains_key("retry-after"));
        }
        statuses.push(s.as_u16());
    }
    assert_eq!(statuses, vec![200, 200, 429]);
    let mb = b.metrics().await;
    assert_eq!(
        metric_value(&mb, &[], "trellis_proxy_traffic_inbound_rate_limited_total"),
        Some(1.0),
        "{mb}"
    );
}

#[tokio::test]
async fn local_mode_waits_for_a_client_that_speaks_late() {
    let pki = Pki::new("mesh");
    let up = upstream(Speaks::Both).await;
    let (a, _b) = pair(&pki, up, Protocol::Http1, &id("backend")).await;
    // Pre-connected pools speak long after connect (here 3x the 100 ms detection timeout).
    let tcp = TcpStream::connect(a.running.outbound_addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut sr, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sr.send_request(get("backend.shop", "/echo")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

/// A long-lived opaque TCP connection shows its bytes while it is open (on both proxies, both
/// flows), and its totals are exact after it closes: the bytes flushed while open are not
/// counted again at close.
#[tokio::test]
async fn open_tcp_connections_report_bytes_before_they_close() {
    const N: usize = 10_000;
    const M: usize = 3_000;
    let pki = Pki::new("mesh");
    let up = echo_upstream().await;
    let fast = |o: &mut trellis_proxy::run::Options| {
        o.tcp_flush_interval = Duration::from_millis(50);
    };
    let b = TestProxy::start_with(
        &pki,
        &id("db"),
        &config("b1", inbound(MtlsMode::Strict), vec![]),
        Some(up),
        fast,
    )
    .await;
    let mut a = TestProxy::start_with(
        &pki,
        &id("web"),
        &config("a1", inbound(MtlsMode::Strict), vec![]),
        None,
        fast,
    )
    .await;
    // As in `opaque_tcp_case`: a TCP Service at A's own outbound address stands in for a
    // redirected connection.
    let out = a.running.outbound_addr;
    let mut svc = service(
        "db",
        out.port(),
        Protocol::Tcp,
        b.running.inbound_addr,
        vec![id("db")],
    );
    svc.addresses = vec![out.ip()];
    a.apply(&config("a2", inbound(MtlsMode::Strict), vec![svc]))
        .await;

    let mut s = TcpStream::connect(out).await.unwrap();
    echo_round(&mut s, N).await;
    // Both proxies, both flows, while the connection stays open.
    let series = [
        (&a, "direction=\"outbound\""),
        (&b, "direction=\"inbound\""),
    ];
    for (p, direction) in series {
        for flow in ["flow=\"from_client\"", "flow=\"to_client\""] {
            tcp_bytes_reach(p, &[direction, flow], N).await;
        }
    }
    assert_eq!(tcp_open(&a, "direction=\"outbound\"").await, 1.0);

    // More traffic, then a clean close: half-close reaches the upstream through both proxies
    // and its close comes back.
    echo_round(&mut s, M).await;
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("half-close propagated to the upstream and back")
        .unwrap();
    assert!(rest.is_empty());
    drop(s);
    for (p, direction) in series {
        for _ in 0..250 {
            if tcp_open(p, direction).await == 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The proxy publishes the last bytes before it drops the open gauge.
        let m = p.metrics().await;
        assert_eq!(tcp_open(p, direction).await, 0.0, "{m}");
        for flow in ["flow=\"from_client\"", "flow=\"to_client\""] {
            assert_eq!(
                metric_value(
                    &m,
                    &[direction, flow, "tls=\"true\""],
                    "trellis_proxy_tcp_transfer_bytes_total"
                ),
                Some((N + M) as f64),
                "{direction} {flow}: exact, not doubled\n{m}"
            );
        }
    }
}

/// An upstream that echoes every byte until the client closes its side, then closes.
async fn echo_upstream() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Writes `n` bytes and reads the `n` echoed back.
async fn echo_round(s: &mut TcpStream, n: usize) {
    let sent: Vec<u8> = (0..n).map(|i| i as u8).collect();
    let (mut r, mut w) = s.split();
    let mut got = vec![0u8; n];
    let (wrote, read) = tokio::join!(w.write_all(&sent), r.read_exact(&mut got));
    wrote.unwrap();
    read.unwrap();
    assert!(got == sent, "echo mismatch");
}

/// Waits until the series shows exactly `n` bytes (with a short flush interval this takes
/// milliseconds; the old code only published at close, so it never got there).
async fn tcp_bytes_reach(p: &TestProxy, series: &[&str], n: usize) {
    let mut last = None;
    for _ in 0..250 {
        last = metric_value(
            &p.metrics().await,
            series,
            "trellis_proxy_tcp_transfer_bytes_total",
        );
        if last == Some(n as f64) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{series:?}: {last:?} bytes while open, want {n}\n{}",
        p.metrics().await
    );
}

async fn tcp_open(p: &TestProxy, direction: &str) -> f64 {
    metric_value(
        &p.metrics().await,
        &[direction],
        "trellis_proxy_tcp_connections_open",
    )
    .unwrap_or(0.0)
}

/// Outside local mode, the outbound listener is no relay: a connection that was not
/// redirected by iptables (here: a client calling the port directly with the Service in
/// `Host`) is closed without a request leaving, and the inbound side refuses a direct
/// connection the same way (it has no original destination).
#[tokio::test]
async fn without_local_mode_direct_connections_are_closed() {
    let pki = Pki::new("mesh");
    let up = upstream(Speaks::Http1Only).await;
    let b = TestProxy::start(
        &pki,
        &id("backend"),
        &config("b1", inbound(MtlsMode::Permissive), vec![]),
        Some(up),
    )
    .await;
    let cfg = config(
        "a1",
        inbound(MtlsMode::Permissive),
        vec![service(
            "backend",
            PORT,
            Protocol::Http1,
            b.running.inbound_addr,
            vec![id("backend")],
        )],
    );
    let a = TestProxy::start_with(&pki, &id("web"), &cfg, None, |o| o.local_mode = false).await;
    for target in [a.running.outbound_addr, a.running.inbound_addr] {
        let mut s = TcpStream::connect(target).await.unwrap();
        s.write_all(b"GET /echo HTTP/1.1\r\nhost: backend.shop:8080\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut got))
            .await
            .expect("closed in time");
        assert!(
            n.is_err() || got.is_empty(),
            "{target} answered: {}",
            String::from_utf8_lossy(&got)
        );
    }
    let m = b.admin("GET", "/metrics").await.1;
    assert!(
        !m.contains("direction=\"inbound\""),
        "a request reached the server proxy: {m}"
    );
}

/// A client that gives up on a request cancels it all the way to the application: the client
/// proxy resets the HTTP/2 stream, and the server proxy drops the request it made, closing the
/// application's connection.
#[tokio::test]
async fn a_request_the_client_abandons_is_cancelled_at_the_application() {
    let pki = Pki::new("mesh");
    // An application that reads a request, never answers, and reports when its client hangs up.
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = app.local_addr().unwrap();
    let (events, mut seen) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = app.accept().await.unwrap();
            let events = events.clone();
            tokio::spawn(async move {
                let mut buf = vec![0; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            let _ = events.send("closed");
                            return;
                        }
                        Ok(_) => {
                            let _ = events.send("request");
                        }
                    }
                }
            });
        }
    });
    let (a, _b) = pair(&pki, up, Protocol::Http1, &id("backend")).await;
    let mut client = TcpStream::connect(a.running.outbound_addr).await.unwrap();
    client
        .write_all(b"GET /hang HTTP/1.1\r\nhost: backend.shop:8080\r\n\r\n")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await;
    assert_eq!(got.unwrap(), Some("request"));
    drop(client);
    let got = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await;
    assert_eq!(
        got.expect("the application's request was not cancelled"),
        Some("closed")
    );
}

/// Bodies far larger than every window and buffer on the way, both ways at once: the
/// application echoes the request body as it reads it, so the whole path (client proxy, the
/// HTTP/2 hop, server proxy, application) has to stream under flow control rather than buffer.
#[tokio::test]
async fn large_bodies_stream_both_ways_through_both_proxies() {
    let pki = Pki::new("mesh");
    let up = upstream(Speaks::Http1Only).await;
    let (a, _b) = pair(&pki, up, Protocol::Http1, &id("backend")).await;
    let payload: Bytes = (0..12 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let req = Request::builder()
        .method("POST")
        .uri("/grpc")
        .header("host", "backend.shop:8080")
        .body(Full::new(payload.clone()))
        .unwrap();
    let (status, _, body) = tokio::time::timeout(
        Duration::from_secs(30),
        h1_send(a.running.outbound_addr, req),
    )
    .await
    .expect("the echo did not finish")
    .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        body == payload,
        "echoed body differs ({} bytes)",
        body.len()
    );
}
