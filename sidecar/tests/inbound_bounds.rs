//! What a client that reaches the pod IP can hold of the inbound listener (15006): connections
//! that never finish authenticating are capped per address, and when a few addresses fill the
//! total the oldest make room, while mesh peers keep being served,
//! and plaintext HTTP connections (h2c and HTTP/1.1 on a `Permissive` port) end when idle or
//! when a request head never ends, but not while a response is still streaming.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use trellis_proxy::config::{MtlsMode, Protocol};

/// The first bytes of a TLS ClientHello (record header and handshake type), announcing 512
/// more that never come: the proxy detects TLS and waits in the handshake.
const CLIENT_HELLO_START: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01];

/// A connection from `from` (another loopback address: another host, as far as the proxy can
/// tell) that starts a TLS handshake and never finishes it.
async fn stranger(from: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut tcp = s.connect(to).await.unwrap();
    // The proxy may already have closed it (over the cap): that is for the caller to see.
    let _ = tcp.write_all(CLIENT_HELLO_START).await;
    tcp
}

/// A `Strict` backend proxy B (in front of a real app) with these bounds on unauthenticated
/// connections, and a client sidecar A that reaches it over real mTLS: (A, B).
async fn backend_and_client(per_peer: usize, total: usize) -> (TestProxy, TestProxy) {
    let pki = Pki::new("mesh");
    let app = upstream(Speaks::Both).await;
    let b = TestProxy::start_with(
        &pki,
        &id("backend"),
        &config("b1", inbound(MtlsMode::Strict), vec![]),
        Some(app),
        |o| {
            o.inbound_limits.max_pending_per_peer = per_peer;
            o.inbound_limits.max_pending = total;
        },
    )
    .await;
    let a = client_sidecar(
        &pki,
        Protocol::Http1,
        b.running.inbound_addr,
        &id("backend"),
    )
    .await;
    (a, b)
}

/// `n` requests from A's application through both sidecars; each must be the app's answer.
async fn served_through_the_mesh(a: &TestProxy, n: usize) {
    for i in 0..n {
        let req = Request::builder()
            .uri(format!("/echo?i={i}"))
            .header("host", "backend.shop:8080")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (status, _, body) = h1_send(a.running.outbound_addr, req).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body:?}");
        assert_eq!(echo_json(&body)["path"], "/echo");
    }
}

#[tokio::test]
async fn unauthenticated_connections_are_capped_per_address_while_mesh_peers_are_served() {
    const PER_PEER: usize = 8;
    // The total at its default (1024): only the per-address cap is in play.
    let (a, b) = backend_and_client(PER_PEER, 1024).await;
    let inbound = b.running.inbound_addr;

    // The flood: as many stalled handshakes from one address as it may hold.
    let mut flood = Vec::new();
    for _ in 0..PER_PEER {
        flood.push(stranger("127.0.0.2", inbound).await);
    }
    for _ in 0..3 {
        let mut extra = stranger("127.0.0.2", inbound).await;
        assert!(
            closed_within(&mut extra, Duration::from_secs(2)).await,
            "a connection over the per-address cap was not closed at once"
        );
    }
    // The flood's connections are still held (not closed with the extra ones).
    assert!(!closed_within(&mut flood[0], Duration::from_millis(200)).await);

    // A mesh peer (another address) opens its first connection during the flood: real mTLS,
    // served.
    served_through_the_mesh(&a, 3).await;
    let mb = b.metrics().await;
    assert!(
        metric_value(
            &mb,
            &["reason=\"too_many_pending\""],
            "trellis_proxy_inbound_refused_total"
        )
        .is_some_and(|n| n >= 3.0),
        "{mb}"
    );
    assert!(
        metric_value(
            &mb,
            &[
                &format!("peer_identity=\"{}\"", id("web")),
                "status_code=\"200\""
            ],
            "trellis_proxy_requests_total"
        ) == Some(3.0),
        "{mb}"
    );

    // The flood ends: its places come back, and the same address may connect again.
    drop(flood);
    let mut admitted = false;
    for _ in 0..50 {
        let mut again = stranger("127.0.0.2", inbound).await;
        if !closed_within(&mut again, Duration::from_millis(300)).await {
            admitted = true;
            break;
        }
    }
    assert!(
        admitted,
        "the address stayed locked out after its connections closed"
    );
}

/// Several hosts, each within its per-address cap, fill the total of unauthenticated
/// connections with handshakes they never finish. A refusing total would turn every mesh peer
/// away until their handshakes time out (10 s, again and again); instead the oldest stalled
/// connection is closed to make room, and the mesh peer's handshake, done in milliseconds,
/// gets through.
#[tokio::test]
async fn stalled_handshakes_from_several_addresses_cannot_lock_the_mesh_out() {
    const PER_PEER: usize = 4;
    const TOTAL: usize = 8;
    let (a, b) = backend_and_client(PER_PEER, TOTAL).await;
    let inbound = b.running.inbound_addr;

    // Two hosts, each at its cap: the total is full.
    let mut flood = Vec::new();
    for from in ["127.0.0.2", "127.0.0.3"] {
        for _ in 0..PER_PEER {
            flood.push(stranger(from, inbound).await);
            // Admitted in the order they came, so the first is the oldest.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for c in flood.iter_mut() {
        assert!(
            !closed_within(c, Duration::from_millis(50)).await,
            "a connection within the caps was closed"
        );
    }

    // The mesh peer's first connection arrives on a full total and is served.
    served_through_the_mesh(&a, 3).await;
    // It took the place of the oldest stalled handshake, and of no other.
    assert!(
        closed_within(&mut flood[0], Duration::from_secs(2)).await,
        "the oldest stalled handshake was not closed to make room"
    );
    for c in flood[1..].iter_mut() {
        assert!(!closed_within(c, Duration::from_millis(50)).await);
    }
    // The mesh peer's place came back when its handshake ended: a third host's stalled
    // handshake fills it and evicts no one; a fourth's evicts the oldest left.
    let mut third = stranger("127.0.0.4", inbound).await;
    assert!(!closed_within(&mut third, Duration::from_millis(300)).await);
    assert!(!closed_within(&mut flood[1], Duration::from_millis(50)).await);
    let mut fourth = stranger("127.0.0.5", inbound).await;
    assert!(!closed_within(&mut fourth, Duration::from_millis(300)).await);
    assert!(closed_within(&mut flood[1], Duration::from_secs(2)).await);
    assert!(!closed_within(&mut third, Duration::from_millis(50)).await);
    let mb = b.metrics().await;
    assert_eq!(
        metric_value(
            &mb,
            &["reason=\"pending_evicted\""],
            "trellis_proxy_inbound_refused_total"
        ),
        Some(2.0),
        "{mb}"
    );
    assert!(
        metric_value(
            &mb,
            &["reason=\"too_many_pending\""],
            "trellis_proxy_inbound_refused_total"
        )
        .is_none(),
        "no one was over their address's cap: {mb}"
    );
}

/// The idle bound the plaintext tests give the proxy (production: 90 s, and hyper's 30 s
/// header read timeout).
const IDLE: Duration = Duration::from_millis(300);
/// Well past what the bound allows (going away after one to two periods, dropped one later).
const CLOSED: Duration = Duration::from_secs(3);

/// Proxy B, `Permissive`, in front of a real app, with the shortened bounds.
async fn permissive(pki: &Pki) -> TestProxy {
    let app = upstream(Speaks::Both).await;
    TestProxy::start_with(
        pki,
        &id("backend"),
        &config("b1", inbound(MtlsMode::Permissive), vec![]),
        Some(app),
        |o| {
            o.inbound_limits.idle_timeout = IDLE;
            o.inbound_limits.header_read_timeout = IDLE;
        },
    )
    .await
}

/// Reads one HTTP/1.1 response with a `content-length` and returns its text.
async fn read_h1_response(tcp: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .expect("content-length");
            if buf.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

#[tokio::test]
async fn an_idle_plaintext_http1_keep_alive_connection_is_closed() {
    let pki = Pki::new("mesh");
    let b = permissive(&pki).await;
    let mut tcp = TcpStream::connect(b.running.inbound_addr).await.unwrap();
    tcp.write_all(b"GET /echo HTTP/1.1\r\nhost: backend\r\n\r\n")
        .await
        .unwrap();
    let resp = read_h1_response(&mut tcp).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        closed_within(&mut tcp, CLOSED).await,
        "an idle keep-alive connection stayed open"
    );
}

#[tokio::test]
async fn a_trickled_http1_request_head_is_cut_off() {
    let pki = Pki::new("mesh");
    let b = permissive(&pki).await;
    let tcp = TcpStream::connect(b.running.inbound_addr).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    wr.write_all(b"GET /echo HTTP/1.1\r\nhost: backend\r\n")
        .await
        .unwrap();
    // One header byte every 50 ms, for ever: the head never ends.
    let trickle = tokio::spawn(async move {
        for b in b"x-slow: 1\r\n".iter().cycle() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
        }
    });
    assert!(
        closed_within(&mut rd, CLOSED).await,
        "a request head trickled byte by byte held the connection"
    );
    trickle.abort();
}

/// Frame types and flags of RFC 9113 section 6, for a client written out by hand (a library
/// client would hide what the server sent).
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const HEADERS: u8 = 0x1;
const ACK: u8 = 0x1;

/// One frame's type, flags and payload; `None` once the connection is closed.
async fn read_frame(tcp: &mut TcpStream) -> Option<(u8, u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    tcp.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], payload))
}

/// Opens an h2c connection with prior knowledge and completes the SETTINGS exchange.
async fn h2c(addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    tcp.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    loop {
        let (kind, flags, _) = read_frame(&mut tcp).await.expect("server SETTINGS");
        if kind == SETTINGS && flags & ACK == 0 {
            tcp.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
            return tcp;
        }
    }
}

/// Reads frames until the server closes the connection or `within` passes, answering PINGs
/// when `polite` (a live client; a stalled one says nothing). Returns (a GOAWAY was received,
/// the connection closed).
async fn h2c_until_closed(tcp: &mut TcpStream, within: Duration, polite: bool) -> (bool, bool) {
    let mut goaway = false;
    let closed = tokio::time::timeout(within, async {
        while let Some((kind, flags, payload)) = read_frame(tcp).await {
            goaway |= kind == GOAWAY;
            if polite
                && kind == PING
                && flags & ACK == 0
                && tcp.write_all(&frame(PING, ACK, 0, &payload)).await.is_err()
            {
                return;
            }
        }
    })
    .await
    .is_ok();
    (goaway, closed)
}

#[tokio::test]
async fn an_idle_h2c_connection_gets_goaway_and_is_closed() {
    let pki = Pki::new("mesh");
    let b = permissive(&pki).await;
    let mut tcp = h2c(b.running.inbound_addr).await;
    let (goaway, closed) = h2c_until_closed(&mut tcp, CLOSED, true).await;
    assert!(goaway && closed, "goaway: {goaway}, closed: {closed}");
}

#[tokio::test]
async fn an_h2c_header_block_that_never_ends_is_closed() {
    let pki = Pki::new("mesh");
    let b = permissive(&pki).await;
    let mut tcp = h2c(b.running.inbound_addr).await;
    // HEADERS without END_HEADERS (`:method: GET`, indexed), and no CONTINUATION ever: no
    // request exists until the block is complete.
    tcp.write_all(&frame(HEADERS, 0x1, 1, &[0x82, 0x86]))
        .await
        .unwrap();
    let (_, closed) = h2c_until_closed(&mut tcp, CLOSED, false).await;
    assert!(closed, "a header block that never ends held the connection");
}

/// A streamed response whose chunks come further apart than the idle bound, over `version`;
/// returns the body.
async fn drip(addr: SocketAddr, h2: bool) -> String {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let req = Request::builder()
        .uri("/drip?n=5&ms=700")
        .header("host", "backend")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = if h2 {
        let (mut sr, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        sr.send_request(req).await.unwrap()
    } else {
        let (mut sr, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        sr.send_request(req).await.unwrap()
    };
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("the stream was cut");
    String::from_utf8(body.to_bytes().to_vec()).unwrap()
}

#[tokio::test]
async fn a_response_streaming_longer_than_the_idle_bound_is_not_cut() {
    let pki = Pki::new("mesh");
    let b = permissive(&pki).await;
    let whole: String = (0..5).map(|i| format!("chunk {i}\n")).collect();
    let (h1, h2) = tokio::join!(
        drip(b.running.inbound_addr, false),
        drip(b.running.inbound_addr, true)
    );
    assert_eq!(h1, whole, "HTTP/1.1");
    assert_eq!(h2, whole, "h2c");
}
