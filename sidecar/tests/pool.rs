//! Connection hygiene of the upstream pool, against real HTTP/2 servers over real TCP and real
//! mTLS: the peer's stream limit opens more connections (bounded), idle connections and keys
//! are dropped, and a connection whose peer certificate expired or whose root left the trust
//! bundle takes no more requests while requests in flight finish. And the pooled HTTP/1.1
//! client to plaintext servers (the server sidecar's hop to its application): reuse, bodies
//! streamed both ways, `Connection: close`, early responses, keep-alive expiry.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use trellis_proxy::config::Protocol;
use trellis_proxy::creds::{self, Credentials};
use trellis_proxy::proxy::mtls::TlsCache;
use trellis_proxy::proxy::upstream::{Pool, PoolSettings};

const HOUR: Duration = Duration::from_secs(3600);
use trellis_proxy::traffic::{ConnectionParams, Target, Upstream, UpstreamError, full};

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/server";

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let der = p.self_signed(&key).unwrap().der().clone();
        Ca {
            issuer: Issuer::new(p, key),
            der,
        }
    }

    /// Credentials for `id`, valid from a minute ago for `life`, trusting `roots`.
    fn creds(&self, id: &str, life: Duration, roots: &[&Ca]) -> Credentials {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now + time::Duration::try_from(life).unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        trellis_proxy::tls::credentials_from_parts(
            vec![cert.der().clone()],
            PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            roots.iter().map(|r| r.der.clone()).collect(),
        )
        .unwrap()
    }
}

/// What a test server saw.
#[derive(Default)]
struct Seen {
    accepted: AtomicUsize,
    closed: AtomicUsize,
}

impl Seen {
    fn open(&self) -> usize {
        self.accepted.load(Ordering::SeqCst) - self.closed.load(Ordering::SeqCst)
    }
}

/// An HTTP/2 server (prior knowledge, or mTLS with ALPN h2 when `tls` is given, using the
/// credentials current at each accept) advertising `max_streams`; `/slow` answers after
/// `delay`, everything else at once.
async fn h2_server(
    max_streams: u32,
    delay: Duration,
    tls: Option<watch::Receiver<Option<Arc<Credentials>>>>,
) -> (SocketAddr, Arc<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            s.accepted.fetch_add(1, Ordering::SeqCst);
            let s = s.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    if req.uri().path() == "/slow" {
                        tokio::time::sleep(delay).await;
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                b.timer(TokioTimer::new())
                    .max_concurrent_streams(max_streams);
                match tls {
                    None => {
                        let _ = b.serve_connection(TokioIo::new(tcp), svc).await;
                    }
                    Some(rx) => {
                        let creds = rx.borrow().clone().unwrap();
                        let cfg = trellis_proxy::tls::server_config(&creds, &[b"h2"]).unwrap();
                        if let Ok(stream) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
                            let _ = b.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                }
                s.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, seen)
}

fn plain_pool() -> Pool {
    let (_tx, rx) = creds::channel();
    Pool::new(Arc::new(TlsCache::new(rx)))
}

fn target(addr: SocketAddr, identities: &[&str]) -> Target {
    Target {
        addr,
        identities: identities.iter().map(|s| s.to_string()).collect(),
        protocol: Protocol::Http2,
        connect_timeout: Some(Duration::from_secs(2)),
    }
}

async fn get(pool: &Pool, t: Target, path: &str) -> Result<StatusCode, UpstreamError> {
    let req = Request::builder()
        .uri(format!("http://svc{path}"))
        .body(full(Bytes::new()))
        .unwrap();
    let resp = pool.send(t, req).await?.resp;
    let status = resp.status();
    // Read the body: the stream stays counted until it is done.
    let _ = resp.into_body().collect().await;
    Ok(status)
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not within 4 s: {what}");
}

/// A peer that allows one stream per connection: four concurrent requests open four
/// connections and finish in about one request's time, instead of waiting in line on one.
#[tokio::test]
async fn h2_opens_another_connection_at_the_peers_stream_limit() {
    let delay = Duration::from_millis(400);
    let (addr, seen) = h2_server(1, delay, None).await;
    let pool = plain_pool();
    let started = Instant::now();
    let reqs = (0..4).map(|_| get(&pool, target(addr, &[]), "/slow"));
    for r in futures::future::join_all(reqs).await {
        assert_eq!(r.unwrap(), StatusCode::OK);
    }
    let took = started.elapsed();
    assert_eq!(
        seen.accepted.load(Ordering::SeqCst),
        4,
        "one connection per stream"
    );
    assert!(took < delay * 2, "requests ran side by side, took {took:?}");
}

/// At the connection cap, a bounded number of requests wait for a stream; the rest are
/// refused at once (nothing queues without bound).
#[tokio::test]
async fn beyond_the_connection_cap_requests_wait_bounded_then_overflow() {
    let delay = Duration::from_millis(300);
    let (addr, seen) = h2_server(1, delay, None).await;
    let (_tx, rx) = creds::channel();
    let pool = Pool::with_settings(
        Arc::new(TlsCache::new(rx)),
        PoolSettings {
            max_h2_conns: 2,
            max_h2_queued: 1,
            ..PoolSettings::default()
        },
    );
    // Open the two connections first, so the test does not depend on connect timing.
    let warm = (0..2).map(|_| get(&pool, target(addr, &[]), "/slow"));
    futures::future::join_all(warm).await;
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
    let started = Instant::now();
    let reqs = (0..6).map(|_| get(&pool, target(addr, &[]), "/slow"));
    let results = futures::future::join_all(reqs).await;
    let ok = results
        .iter()
        .filter(|r| matches!(r, Ok(StatusCode::OK)))
        .count();
    let overflow = results
        .iter()
        .filter(|r| matches!(r, Err(UpstreamError::Overflow { .. })))
        .count();
    assert_eq!((ok, overflow), (3, 3), "{results:?}");
    assert_eq!(
        seen.accepted.load(Ordering::SeqCst),
        2,
        "no third connection"
    );
    assert!(
        started.elapsed() >= delay * 2,
        "the queued one waited for a stream"
    );
}

/// `circuitBreaker.maxConnections` reaches the pool: one connection, the rest wait for its
/// stream (bounded) instead of opening more.
#[tokio::test]
async fn the_policys_max_connections_caps_http2_connections() {
    let delay = Duration::from_millis(200);
    let (addr, seen) = h2_server(1, delay, None).await;
    let pool = plain_pool();
    let reqs = (0..3).map(|_| {
        let mut req = Request::builder()
            .uri("http://svc/slow")
            .body(full(Bytes::new()))
            .unwrap();
        req.extensions_mut().insert(ConnectionParams {
            idle_timeout: None,
            max_connections: Some(1),
        });
        let pool = pool.clone();
        async move {
            let resp = pool.send(target(addr, &[]), req).await?.resp;
            let status = resp.status();
            let _ = resp.into_body().collect().await;
            Ok::<_, UpstreamError>(status)
        }
    });
    let started = Instant::now();
    for r in futures::future::join_all(reqs).await {
        assert_eq!(r.unwrap(), StatusCode::OK);
    }
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
    assert!(started.elapsed() >= delay * 3, "one stream at a time");
}

/// Endpoint churn: connections to endpoints no longer used are closed and their keys
/// forgotten after the idle time.
#[tokio::test]
async fn idle_connections_and_keys_are_dropped() {
    let (_tx, rx) = creds::channel();
    let pool = Pool::with_settings(
        Arc::new(TlsCache::new(rx)),
        PoolSettings {
            idle_timeout: Duration::from_millis(300),
            sweep_interval: Duration::from_millis(50),
            ..PoolSettings::default()
        },
    );
    let mut servers = Vec::new();
    for _ in 0..10 {
        let (addr, seen) = h2_server(100, Duration::ZERO, None).await;
        assert_eq!(
            get(&pool, target(addr, &[]), "/").await.unwrap(),
            StatusCode::OK
        );
        servers.push(seen);
    }
    assert_eq!(pool.stats().keys, 10);
    assert!(servers.iter().all(|s| s.open() == 1));
    // A connection with a stream open is not idle, however long the stream takes.
    let (busy, busy_seen) = h2_server(100, Duration::from_millis(800), None).await;
    let slow = {
        let pool = pool.clone();
        tokio::spawn(async move { get(&pool, target(busy, &[]), "/slow").await })
    };
    eventually("idle keys dropped", || pool.stats().keys == 1).await;
    eventually("idle connections closed", || {
        servers.iter().all(|s| s.open() == 0)
    })
    .await;
    assert_eq!(busy_seen.open(), 1);
    assert_eq!(slow.await.unwrap().unwrap(), StatusCode::OK);
    eventually("the busy key goes once idle", || pool.stats().keys == 0).await;
}

/// A peer certificate expires: the pooled connection takes no new request (the next one
/// opens a new connection, to the renewed certificate) and is closed.
#[tokio::test]
async fn a_connection_whose_peer_certificate_expired_is_not_reused() {
    let ca = Ca::new("mesh");
    let (_ctx, crx) = watch::channel(Some(Arc::new(ca.creds(
        CLIENT,
        Duration::from_secs(3600),
        &[&ca],
    ))));
    // The server's first certificate lives 2 s (x509 validity has whole seconds).
    let (stx, srx) = watch::channel(Some(Arc::new(ca.creds(
        SERVER,
        Duration::from_secs(2),
        &[&ca],
    ))));
    let (addr, seen) = h2_server(100, Duration::ZERO, Some(srx)).await;
    let pool = Pool::new(Arc::new(TlsCache::new(crx)));
    assert_eq!(
        get(&pool, target(addr, &[SERVER]), "/").await.unwrap(),
        StatusCode::OK
    );
    assert_eq!(
        get(&pool, target(addr, &[SERVER]), "/").await.unwrap(),
        StatusCode::OK
    );
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 1, "pooled");
    // The server renews; its old certificate expires.
    stx.send_replace(Some(Arc::new(ca.creds(
        SERVER,
        Duration::from_secs(3600),
        &[&ca],
    ))));
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(
        get(&pool, target(addr, &[SERVER]), "/").await.unwrap(),
        StatusCode::OK
    );
    assert_eq!(
        seen.accepted.load(Ordering::SeqCst),
        2,
        "the request after expiry used a new connection"
    );
    eventually("the expired connection is closed", || {
        seen.closed.load(Ordering::SeqCst) == 1
    })
    .await;
}

/// Credentials in the middle of a root rotation: the client holds a leaf of the new root and
/// trusts both; the server's leaf is from the old root. Returns the client's credentials (send
/// on it to finish the rotation), the server's, and the new root.
#[allow(clippy::type_complexity)]
fn mid_rotation() -> (
    watch::Sender<Option<Arc<Credentials>>>,
    watch::Receiver<Option<Arc<Credentials>>>,
    (
        watch::Sender<Option<Arc<Credentials>>>,
        watch::Receiver<Option<Arc<Credentials>>>,
    ),
    Ca,
) {
    let old_root = Ca::new("old root");
    let new_root = Ca::new("new root");
    let (ctx, crx) = watch::channel(Some(Arc::new(new_root.creds(
        CLIENT,
        HOUR,
        &[&new_root, &old_root],
    ))));
    let server = watch::channel(Some(Arc::new(old_root.creds(
        SERVER,
        HOUR,
        &[&new_root, &old_root],
    ))));
    (ctx, crx, server, new_root)
}

/// A root leaves the trust bundle: the connection to a peer that chains to it takes no new
/// request (the next one fails the handshake against the new bundle), the request in flight
/// on it finishes, and the connection is closed.
#[tokio::test]
async fn a_connection_whose_root_left_the_bundle_is_retired_after_in_flight_requests() {
    let (ctx, crx, (_stx, srx), new_root) = mid_rotation();
    let delay = Duration::from_millis(800);
    let (addr, seen) = h2_server(100, delay, Some(srx)).await;
    let pool = Pool::new(Arc::new(TlsCache::new(crx)));
    assert_eq!(
        get(&pool, target(addr, &[SERVER]), "/").await.unwrap(),
        StatusCode::OK
    );
    let in_flight = {
        let pool = pool.clone();
        tokio::spawn(async move { get(&pool, target(addr, &[SERVER]), "/slow").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Rotation done: the old root leaves the bundle.
    ctx.send_replace(Some(Arc::new(new_root.creds(CLIENT, HOUR, &[&new_root]))));
    let after = get(&pool, target(addr, &[SERVER]), "/").await;
    assert!(
        matches!(after, Err(UpstreamError::Tls { .. })),
        "a peer under the removed root is not trusted any more: {after:?}"
    );
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        StatusCode::OK,
        "the request in flight finished"
    );
    eventually("the untrusted connection is closed", || {
        seen.closed.load(Ordering::SeqCst) >= 1 && seen.open() == 0
    })
    .await;
}

/// A plaintext HTTP/1.1 server counting connections. `/big` answers with 1 MiB; `/close` with
/// `Connection: close`; `/trickle` with a body of unknown length in three pieces 30 ms apart;
/// `/echo` with the length of the request body, once read in full; `/early` with 413 before
/// reading the request body; everything else with "ok".
async fn h1_server() -> (SocketAddr, Arc<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            s.accepted.fetch_add(1, Ordering::SeqCst);
            let s = s.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let body = match req.uri().path() {
                        "/big" => full(Bytes::from(vec![b'x'; 1 << 20])),
                        "/close" => {
                            let mut resp = Response::new(full(Bytes::from_static(b"ok")));
                            resp.headers_mut()
                                .insert(http::header::CONNECTION, "close".parse().unwrap());
                            return Ok::<_, Infallible>(resp);
                        }
                        "/trickle" => {
                            let pieces = futures::stream::unfold(0, |i| async move {
                                if i == 3 {
                                    return None;
                                }
                                tokio::time::sleep(Duration::from_millis(30)).await;
                                let frame = http_body::Frame::data(Bytes::from(format!("{i}")));
                                Some((Ok::<_, trellis_proxy::traffic::BoxError>(frame), i + 1))
                            });
                            http_body_util::StreamBody::new(pieces).boxed()
                        }
                        "/echo" => {
                            let n = req.into_body().collect().await.unwrap().to_bytes().len();
                            full(Bytes::from(n.to_string()))
                        }
                        "/early" => {
                            let mut resp = Response::new(full(Bytes::from_static(b"too big")));
                            *resp.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
                            return Ok(resp);
                        }
                        _ => full(Bytes::from_static(b"ok")),
                    };
                    Ok(Response::new(body))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
                s.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, seen)
}

/// Plaintext HTTP/1.1 connections go back to the pool when their response has been read, and
/// one whose response was abandoned half-way is not handed to the next request.
#[tokio::test]
async fn http1_connections_are_reused_once_their_response_is_read() {
    let (addr, seen) = h1_server().await;
    let pool = plain_pool();
    let t = Target {
        protocol: Protocol::Http1,
        ..target(addr, &[])
    };
    for _ in 0..5 {
        assert_eq!(get(&pool, t.clone(), "/").await.unwrap(), StatusCode::OK);
    }
    assert_eq!(
        seen.accepted.load(Ordering::SeqCst),
        1,
        "one connection reused"
    );
    assert_eq!(pool.stats().idle_h1_conns, 1);

    // A large response dropped after its head: that connection cannot take another request.
    let req = Request::builder()
        .uri("http://svc/big")
        .body(full(Bytes::new()))
        .unwrap();
    let resp = pool.send(t.clone(), req).await.unwrap();
    assert_eq!(
        pool.stats().idle_h1_conns,
        0,
        "in use while its response is read"
    );
    drop(resp);
    assert_eq!(get(&pool, t.clone(), "/").await.unwrap(), StatusCode::OK);
    assert_eq!(
        seen.accepted.load(Ordering::SeqCst),
        2,
        "a new connection for the next"
    );
    eventually("the abandoned connection closes", || {
        seen.closed.load(Ordering::SeqCst) == 1
    })
    .await;
    // And the new one is reused in turn.
    assert_eq!(get(&pool, t, "/").await.unwrap(), StatusCode::OK);
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
}

fn h1_target(addr: SocketAddr) -> Target {
    Target {
        protocol: Protocol::Http1,
        ..target(addr, &[])
    }
}

/// A request to `path` and the response's status and whole body.
async fn fetch(
    pool: &Pool,
    t: Target,
    path: &str,
    body: trellis_proxy::traffic::Body,
) -> (StatusCode, Bytes) {
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://svc{path}"))
        .body(body)
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), pool.send(t, req))
        .await
        .expect("response head within 5 s")
        .unwrap()
        .resp;
    let status = resp.status();
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .expect("response body within 5 s")
        .unwrap()
        .to_bytes();
    (status, body)
}

/// A request body sent in `n` pieces of `size` bytes, `gap` apart, of unknown length.
fn trickled(n: usize, size: usize, gap: Duration) -> trellis_proxy::traffic::Body {
    let pieces = futures::stream::unfold(0, move |i| async move {
        if i == n {
            return None;
        }
        tokio::time::sleep(gap).await;
        let frame = http_body::Frame::data(Bytes::from(vec![b'y'; size]));
        Some((Ok::<_, trellis_proxy::traffic::BoxError>(frame), i + 1))
    });
    http_body_util::StreamBody::new(pieces).boxed()
}

/// Bodies of every shape go both ways over the pooled connection, which is reused after each:
/// a response body trickling in after its head and one of 1 MiB are read in full (the reader
/// of the body is what drives the connection, nothing else does), a request body streamed in
/// pieces reaches the server whole.
#[tokio::test]
async fn http1_streams_bodies_both_ways_and_reuses_the_connection() {
    let (addr, seen) = h1_server().await;
    let pool = plain_pool();
    let t = h1_target(addr);
    let (status, body) = fetch(&pool, t.clone(), "/trickle", full(Bytes::new())).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"012"[..]));
    let (status, body) = fetch(&pool, t.clone(), "/big", full(Bytes::new())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), 1 << 20);
    let upload = trickled(4, 100_000, Duration::from_millis(20));
    let (status, body) = fetch(&pool, t.clone(), "/echo", upload).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"400000"[..]));
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 1, "one connection");
    assert_eq!(pool.stats().idle_h1_conns, 1);
}

/// The task that reads a response body drives its connection (nothing else does): a body
/// handed to another task, on another worker thread, still arrives in full as it trickles in,
/// and its connection then serves the next request sent from a third task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_body_read_by_another_task_arrives_and_frees_the_connection() {
    let (addr, seen) = h1_server().await;
    let pool = Arc::new(plain_pool());
    let t = h1_target(addr);
    let req = Request::builder()
        .uri("http://svc/trickle")
        .body(full(Bytes::new()))
        .unwrap();
    let resp = pool.send(t.clone(), req).await.unwrap().resp;
    let body = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
            .await
            .expect("body within 5 s")
            .unwrap()
            .to_bytes()
    })
    .await
    .unwrap();
    assert_eq!(&body[..], b"012");
    let p = pool.clone();
    let next = tokio::spawn(async move { fetch(&p, t, "/", full(Bytes::new())).await })
        .await
        .unwrap();
    assert_eq!((next.0, &next.1[..]), (StatusCode::OK, &b"ok"[..]));
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 1, "one connection");
}

/// The application sends a head and part of a chunked body, then closes. A server forwarding
/// the pooled response (as a sidecar does) writes what came before the failure, so its client
/// sees the response end early, not a connection closed with nothing on it (which its own
/// sidecar would answer with a 502, a complete response).
#[tokio::test]
async fn an_upstream_failing_mid_body_reaches_the_client_as_a_short_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = app.accept().await.unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.ends_with(b"\r\n\r\n") {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "request cut short");
            req.extend_from_slice(&buf[..n]);
        }
        // Head, one chunk and the close in one write: the pool reads them in one go.
        let resp = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n";
        tcp.write_all(resp.as_bytes()).await.unwrap();
    });
    let pool = Arc::new(plain_pool());
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = front.accept().await.unwrap();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let pool = pool.clone();
            async move {
                let req = req.map(|b| b.map_err(Into::into).boxed());
                let reply = pool.send(h1_target(app_addr), req).await.unwrap();
                Ok::<_, Infallible>(reply.resp)
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(tcp), svc)
            .await;
    });
    let mut client = tokio::net::TcpStream::connect(front_addr).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got))
        .await
        .expect("the connection ends within 5 s");
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200 OK"), "{got:?}");
    assert!(got.contains("hello"), "{got:?}");
    assert!(!got.contains("0\r\n\r\n"), "looked complete: {got:?}");
}

/// `Connection: close` from the server: that connection is not pooled, and the next request
/// goes out on a new one without an error.
#[tokio::test]
async fn http1_connection_close_is_honoured() {
    let (addr, seen) = h1_server().await;
    let pool = plain_pool();
    let t = h1_target(addr);
    let (status, _) = fetch(&pool, t.clone(), "/close", full(Bytes::new())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        pool.stats().idle_h1_conns,
        0,
        "a closing connection is not pooled"
    );
    eventually("the server sees the close", || {
        seen.closed.load(Ordering::SeqCst) == 1
    })
    .await;
    let (status, _) = fetch(&pool, t, "/", full(Bytes::new())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
}

/// The server answers before it read the request body: the response arrives, the rest of the
/// body is still sent (the client does not stall), and the next request does not land on that
/// connection mid-upload.
#[tokio::test]
async fn http1_early_response_during_an_upload() {
    let (addr, seen) = h1_server().await;
    let pool = plain_pool();
    let t = h1_target(addr);
    let upload = trickled(5, 10_000, Duration::from_millis(20));
    let (status, body) = fetch(&pool, t.clone(), "/early", upload).await;
    assert_eq!(
        (status, &body[..]),
        (StatusCode::PAYLOAD_TOO_LARGE, &b"too big"[..])
    );
    let (status, body) = fetch(&pool, t, "/", full(Bytes::new())).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
}

/// A raw HTTP/1.1 server that answers each request on a connection with "ok" and closes the
/// connection once it has been idle for `keep_alive` (a server's keep-alive timeout).
async fn expiring_h1_server(keep_alive: Duration) -> (SocketAddr, Arc<Seen>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = l.accept().await else {
                return;
            };
            s.accepted.fetch_add(1, Ordering::SeqCst);
            let s = s.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = match tokio::time::timeout(keep_alive, tcp.read(&mut chunk)).await {
                        Ok(Ok(n)) if n > 0 => n,
                        _ => break,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    // Requests without a body: one per blank line.
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if tcp.write_all(resp).await.is_err() {
                            break;
                        }
                    }
                }
                drop(tcp);
                s.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, seen)
}

/// A pooled connection the server closed while it was idle is let go: the pool's sweep drops
/// it, and a request in the meantime goes out on a new connection and succeeds.
#[tokio::test]
async fn http1_idle_connection_closed_by_the_server_is_let_go() {
    let (addr, seen) = expiring_h1_server(Duration::from_millis(100)).await;
    let (_tx, rx) = creds::channel();
    let pool = Pool::with_settings(
        Arc::new(TlsCache::new(rx)),
        PoolSettings {
            sweep_interval: Duration::from_millis(50),
            ..PoolSettings::default()
        },
    );
    let t = h1_target(addr);
    assert_eq!(get(&pool, t.clone(), "/").await.unwrap(), StatusCode::OK);
    assert_eq!(pool.stats().idle_h1_conns, 1);
    eventually("the server closes the idle connection", || {
        seen.closed.load(Ordering::SeqCst) == 1
    })
    .await;
    eventually("the sweep drops it", || pool.stats().idle_h1_conns == 0).await;

    // Closed again while idle, and picked before any sweep: the pick notices.
    let pool = plain_pool();
    assert_eq!(get(&pool, t.clone(), "/").await.unwrap(), StatusCode::OK);
    eventually("the server closes the idle connection", || {
        seen.closed.load(Ordering::SeqCst) == 2
    })
    .await;
    assert_eq!(get(&pool, t, "/").await.unwrap(), StatusCode::OK);
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 3);
}

/// Connections a [`mesh_server`] accepted, by the protocol ALPN chose.
#[derive(Default)]
struct SeenByAlpn {
    h1: Seen,
    h2: Seen,
}

/// A mesh peer as a server sidecar is one: mTLS offering ALPN `h2` and `http/1.1` (with the
/// credentials current at each accept), `/slow` answered after `delay`, and the body of every
/// answer the HTTP version the request arrived in.
async fn mesh_server(
    delay: Duration,
    tls: watch::Receiver<Option<Arc<Credentials>>>,
) -> (SocketAddr, Arc<SeenByAlpn>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(SeenByAlpn::default());
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let s = s.clone();
            let creds = tls.borrow().clone().unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    if req.uri().path() == "/slow" {
                        tokio::time::sleep(delay).await;
                    }
                    let v = format!("{:?}", req.version());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(v))))
                });
                let cfg = trellis_proxy::tls::server_config(&creds, &[b"h2", b"http/1.1"]).unwrap();
                let Ok(stream) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await else {
                    return;
                };
                let h2 = stream.get_ref().1.alpn_protocol() == Some(&b"h2"[..]);
                let seen = if h2 { &s.h2 } else { &s.h1 };
                seen.accepted.fetch_add(1, Ordering::SeqCst);
                let io = TokioIo::new(stream);
                if h2 {
                    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    b.timer(TokioTimer::new());
                    let _ = b.serve_connection(io, svc).await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
                seen.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, seen)
}

/// A meshed target on a port of `protocol`.
fn mesh_target(addr: SocketAddr, protocol: Protocol) -> Target {
    Target {
        protocol,
        ..target(addr, &[SERVER])
    }
}

/// A request of `version` to `path`: its status, the HTTP version the peer saw, and who
/// answered (the peer identity the pool verified).
async fn exchange(
    pool: &Pool,
    t: Target,
    version: http::Version,
    path: &str,
) -> Result<(StatusCode, String, Option<String>), UpstreamError> {
    let req = Request::builder()
        .version(version)
        .uri(format!("http://svc{path}"))
        .body(full(Bytes::new()))
        .unwrap();
    let reply = pool.send(t, req).await?;
    let peer = reply.peer.map(|p| p.to_string());
    let resp = reply.resp;
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned(), peer))
}

/// Credentials senders that must outlive the test's tasks.
type Keep = (
    watch::Sender<Option<Arc<Credentials>>>,
    watch::Sender<Option<Arc<Credentials>>>,
);

/// A pool with `settings` for the client, and the credentials a [`mesh_server`] serves with
/// (the server's leaf living `server_life`), both under one CA (returned, for renewals).
fn mesh_pki(
    server_life: Duration,
    settings: trellis_proxy::proxy::upstream::PoolSettings,
) -> (Pool, watch::Receiver<Option<Arc<Credentials>>>, Keep, Ca) {
    let ca = Ca::new("mesh");
    let (ctx, crx) = watch::channel(Some(Arc::new(ca.creds(
        CLIENT,
        Duration::from_secs(3600),
        &[&ca],
    ))));
    let (stx, srx) = watch::channel(Some(Arc::new(ca.creds(SERVER, server_life, &[&ca]))));
    let pool = Pool::with_settings(Arc::new(TlsCache::new(crx)), settings);
    (pool, srx, (ctx, stx), ca)
}

/// What the application speaks rides between the sidecars: HTTP/1.1 on pooled HTTP/1.1 over
/// mTLS (one connection, reused), HTTP/2 on HTTP/2, and HTTP/2 to a port declared HTTP/2 or
/// gRPC whatever the client spoke. Each answer names the peer the handshake verified.
#[tokio::test]
async fn meshed_requests_ride_the_protocol_the_application_spoke() {
    let (pool, srx, _keep, _) = mesh_pki(HOUR, PoolSettings::default());
    let (addr, seen) = mesh_server(Duration::ZERO, srx).await;
    for _ in 0..3 {
        let (status, version, peer) = exchange(
            &pool,
            mesh_target(addr, Protocol::Auto),
            http::Version::HTTP_11,
            "/",
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(version, "HTTP/1.1");
        assert_eq!(peer.as_deref(), Some(SERVER));
    }
    assert_eq!(
        seen.h1.accepted.load(Ordering::SeqCst),
        1,
        "one HTTP/1.1 connection, reused"
    );
    assert_eq!(seen.h2.accepted.load(Ordering::SeqCst), 0);
    assert_eq!(pool.stats().idle_h1_conns, 1);

    let (_, version, peer) = exchange(
        &pool,
        mesh_target(addr, Protocol::Auto),
        http::Version::HTTP_2,
        "/",
    )
    .await
    .unwrap();
    assert_eq!(
        (version.as_str(), peer.as_deref()),
        ("HTTP/2.0", Some(SERVER))
    );
    for p in [Protocol::Http2, Protocol::Grpc] {
        let (_, version, _) = exchange(&pool, mesh_target(addr, p), http::Version::HTTP_11, "/")
            .await
            .unwrap();
        assert_eq!(version, "HTTP/2.0", "{p:?}");
    }
    assert_eq!(seen.h2.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(seen.h1.accepted.load(Ordering::SeqCst), 1);
}

/// HTTP/1.1 holds a connection per request in flight; from `max_h1_hop_inflight` requests in
/// flight to a peer on, further requests ride one multiplexed HTTP/2 connection instead of
/// opening more, and all are answered. Afterwards HTTP/1.1 serves again.
#[tokio::test]
async fn past_the_http1_connection_limit_requests_ride_http2() {
    let (pool, srx, _keep, _) = mesh_pki(
        HOUR,
        PoolSettings {
            max_h1_hop_inflight: 2,
            ..PoolSettings::default()
        },
    );
    let delay = Duration::from_millis(300);
    let (addr, seen) = mesh_server(delay, srx).await;
    let reqs = (0..6).map(|_| {
        exchange(
            &pool,
            mesh_target(addr, Protocol::Http1),
            http::Version::HTTP_11,
            "/slow",
        )
    });
    let started = Instant::now();
    let mut versions = Vec::new();
    for r in futures::future::join_all(reqs).await {
        let (status, version, peer) = r.unwrap();
        assert_eq!((status, peer.as_deref()), (StatusCode::OK, Some(SERVER)));
        versions.push(version);
    }
    assert!(started.elapsed() < delay * 2, "none waited for another");
    versions.sort();
    assert_eq!(
        versions,
        [
            "HTTP/1.1", "HTTP/1.1", "HTTP/2.0", "HTTP/2.0", "HTTP/2.0", "HTTP/2.0"
        ]
    );
    assert_eq!(seen.h1.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(seen.h2.accepted.load(Ordering::SeqCst), 1);
    let (_, version, _) = exchange(
        &pool,
        mesh_target(addr, Protocol::Http1),
        http::Version::HTTP_11,
        "/",
    )
    .await
    .unwrap();
    assert_eq!(version, "HTTP/1.1");
    assert_eq!(
        seen.h1.accepted.load(Ordering::SeqCst),
        2,
        "an idle one was reused"
    );
}

/// An idle HTTP/1.1 hop connection whose peer certificate expired takes no new request: the
/// next one opens a new connection (to the renewed certificate), and the reaper closes the
/// old one.
#[tokio::test]
async fn an_http1_hop_connection_whose_peer_certificate_expired_is_not_reused() {
    let (pool, srx, (_ctx, stx), ca) = mesh_pki(
        Duration::from_secs(2),
        PoolSettings {
            sweep_interval: Duration::from_millis(200),
            ..PoolSettings::default()
        },
    );
    let (addr, seen) = mesh_server(Duration::ZERO, srx).await;
    let t = || mesh_target(addr, Protocol::Http1);
    for _ in 0..2 {
        exchange(&pool, t(), http::Version::HTTP_11, "/")
            .await
            .unwrap();
    }
    assert_eq!(seen.h1.accepted.load(Ordering::SeqCst), 1, "pooled");
    stx.send_replace(Some(Arc::new(ca.creds(
        SERVER,
        Duration::from_secs(3600),
        &[&ca],
    ))));
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let (status, _, _) = exchange(&pool, t(), http::Version::HTTP_11, "/")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        seen.h1.accepted.load(Ordering::SeqCst),
        2,
        "the request after expiry used a new connection"
    );
    eventually("the expired connection is closed", || {
        seen.h1.closed.load(Ordering::SeqCst) == 1
    })
    .await;
}

/// A root leaves the trust bundle: the idle HTTP/1.1 hop connection to a peer under it takes
/// no new request (the next one fails the handshake against the new bundle), the request in
/// flight on another finishes, and both are closed.
#[tokio::test]
async fn an_http1_hop_connection_whose_root_left_the_bundle_is_retired() {
    let (ctx, crx, (_stx, srx), new_root) = mid_rotation();
    let delay = Duration::from_millis(800);
    let (addr, seen) = mesh_server(delay, srx).await;
    let pool = Pool::new(Arc::new(TlsCache::new(crx)));
    let t = move || mesh_target(addr, Protocol::Http1);
    exchange(&pool, t(), http::Version::HTTP_11, "/")
        .await
        .unwrap();
    assert_eq!(pool.stats().idle_h1_conns, 1);
    let in_flight = {
        let pool = pool.clone();
        tokio::spawn(async move { exchange(&pool, t(), http::Version::HTTP_11, "/slow").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The in-flight request took the idle connection; make another idle one.
    exchange(&pool, t(), http::Version::HTTP_11, "/")
        .await
        .unwrap();
    assert_eq!(seen.h1.accepted.load(Ordering::SeqCst), 2);
    // Rotation done: the old root leaves the bundle.
    ctx.send_replace(Some(Arc::new(new_root.creds(CLIENT, HOUR, &[&new_root]))));
    let after = exchange(&pool, t(), http::Version::HTTP_11, "/").await;
    assert!(
        matches!(after, Err(UpstreamError::Tls { .. })),
        "a peer under the removed root is not trusted any more: {after:?}"
    );
    let (status, _, _) = in_flight.await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK, "the request in flight finished");
    eventually("the untrusted connections are closed", || {
        seen.h1.open() == 0
    })
    .await;
}

/// An idle HTTP/1.1 connection to a mesh peer is let go before the far sidecar's 30 s header
/// read timeout would close it under a request (`h1_hop_idle_timeout`, shortened here): the
/// next request opens a new one, and the reaper closes the old one.
#[tokio::test]
async fn an_idle_http1_hop_connection_is_let_go_before_the_far_side_closes_it() {
    let (pool, srx, _keep, _) = mesh_pki(
        HOUR,
        PoolSettings {
            h1_hop_idle_timeout: Duration::from_millis(300),
            sweep_interval: Duration::from_millis(50),
            ..PoolSettings::default()
        },
    );
    let (addr, seen) = mesh_server(Duration::ZERO, srx).await;
    let t = || mesh_target(addr, Protocol::Http1);
    exchange(&pool, t(), http::Version::HTTP_11, "/")
        .await
        .unwrap();
    exchange(&pool, t(), http::Version::HTTP_11, "/")
        .await
        .unwrap();
    assert_eq!(
        seen.h1.accepted.load(Ordering::SeqCst),
        1,
        "reused while fresh"
    );
    eventually("the idle connection is closed", || seen.h1.open() == 0).await;
    exchange(&pool, t(), http::Version::HTTP_11, "/")
        .await
        .unwrap();
    assert_eq!(seen.h1.accepted.load(Ordering::SeqCst), 2);
}

/// A busy peer is a multiplexed one: while requests to it are in flight on HTTP/2 (here, the
/// application's own HTTP/2 requests), an HTTP/1.1 request rides HTTP/2 too, though an idle
/// HTTP/1.1 connection is there, so a saturated peer gets HTTP/2's batching.
#[tokio::test]
async fn while_a_peer_is_busy_http1_requests_ride_http2() {
    let (pool, srx, _keep, _) = mesh_pki(
        HOUR,
        PoolSettings {
            max_h1_hop_inflight: 2,
            ..PoolSettings::default()
        },
    );
    let (addr, seen) = mesh_server(Duration::from_millis(500), srx).await;
    let t = move || mesh_target(addr, Protocol::Auto);
    let (_, version, _) = exchange(&pool, t(), http::Version::HTTP_11, "/")
        .await
        .unwrap();
    assert_eq!(version, "HTTP/1.1");
    assert_eq!(pool.stats().idle_h1_conns, 1);
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { exchange(&pool, t(), http::Version::HTTP_2, "/slow").await })
        })
        .collect();
    eventually("two HTTP/2 requests in flight", || {
        seen.h2.accepted.load(Ordering::SeqCst) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, version, _) = exchange(&pool, t(), http::Version::HTTP_11, "/")
        .await
        .unwrap();
    assert_eq!(
        version, "HTTP/2.0",
        "rode the busy peer's HTTP/2 connection"
    );
    for b in busy {
        b.await.unwrap().unwrap();
    }
    let (_, version, _) = exchange(&pool, t(), http::Version::HTTP_11, "/")
        .await
        .unwrap();
    assert_eq!(
        version, "HTTP/1.1",
        "quiet again: the idle HTTP/1.1 connection"
    );
    assert_eq!(seen.h1.accepted.load(Ordering::SeqCst), 1);
}
