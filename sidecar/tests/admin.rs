//! The admin port is public (the kubelet and Prometheus reach it), so one client must not be
//! able to hold it: slow request heads and idle keep-alive connections are cut off, requests
//! per connection are bounded, and open connections are capped per peer and in total. Real
//! proxies in-process, real sockets; peers are told apart by binding clients to different
//! loopback addresses (127.0.0.2, 127.0.0.3, ...).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use trellis_proxy::admin::Limits;
use trellis_proxy::config::MtlsMode;

async fn proxy(limits: Limits) -> TestProxy {
    let pki = Pki::new("mesh");
    let cfg = config("r1", inbound(MtlsMode::Permissive), vec![]);
    TestProxy::start_with(&pki, &id("web"), &cfg, None, |o| o.admin_limits = limits).await
}

/// A connection to `admin` from the local address `from`.
async fn connect_from(from: &str, admin: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    sock.connect(admin).await.unwrap()
}

/// Reads until EOF (or `limit`); returns what was read and whether EOF came in time.
async fn read_to_close(s: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into(), false),
        }
    }
}

/// One `GET path` on an open keep-alive connection; returns the response head and body.
async fn get_on(s: &mut TcpStream, path: &str) -> String {
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: admin\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // The admin routes used here answer with small bodies and a content-length.
    loop {
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .expect("response in time")
            .unwrap();
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text.into_owned();
            }
        }
        if n == 0 {
            return text.into_owned();
        }
    }
}

fn limits() -> Limits {
    Limits {
        header_read_timeout: Duration::from_millis(300),
        max_connection_age: Duration::from_secs(30),
        max_requests_per_connection: 100,
        max_connections: 64,
        max_connections_per_peer: 16,
    }
}

#[tokio::test]
async fn a_slow_request_head_is_cut_off() {
    let p = proxy(limits()).await;
    let mut s = connect_from("127.0.0.1", p.running.admin_addr).await;
    // Slowloris: the head starts but never ends.
    s.write_all(b"GET /live HTTP/1.1\r\nhost: admin\r\n")
        .await
        .unwrap();
    let (got, closed) = read_to_close(&mut s, Duration::from_secs(3)).await;
    assert!(closed, "a partial head held the connection open");
    assert!(!got.contains("200"), "{got}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let p = proxy(limits()).await;
    let mut s = connect_from("127.0.0.1", p.running.admin_addr).await;
    assert!(get_on(&mut s, "/live").await.starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    let (_, closed) = read_to_close(&mut s, Duration::from_secs(3)).await;
    assert!(closed, "idle keep-alive connection kept open");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn requests_per_connection_are_bounded() {
    let p = proxy(Limits {
        max_requests_per_connection: 3,
        header_read_timeout: Duration::from_secs(5),
        ..limits()
    })
    .await;
    let mut s = connect_from("127.0.0.1", p.running.admin_addr).await;
    for _ in 0..2 {
        let r = get_on(&mut s, "/live").await;
        assert!(!r.to_ascii_lowercase().contains("connection: close"), "{r}");
    }
    let r = get_on(&mut s, "/live").await;
    assert!(r.to_ascii_lowercase().contains("connection: close"), "{r}");
    let (_, closed) = read_to_close(&mut s, Duration::from_secs(1)).await;
    assert!(closed, "connection stayed open past its request budget");
}

#[tokio::test]
async fn open_connections_are_capped_per_peer_the_oldest_make_room_and_are_freed_on_close() {
    let p = proxy(Limits {
        header_read_timeout: Duration::from_secs(10),
        max_connections: 6,
        max_connections_per_peer: 4,
        ..limits()
    })
    .await;
    let admin = p.running.admin_addr;
    // One greedy peer holds four idle connections: its fifth is closed at once...
    let mut greedy = Vec::new();
    for _ in 0..4 {
        greedy.push(connect_from("127.0.0.2", admin).await);
    }
    // (the accept loop admits them in order: give it a moment to count them)
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fifth = connect_from("127.0.0.2", admin).await;
    let (_, closed) = read_to_close(&mut fifth, Duration::from_secs(1)).await;
    assert!(closed, "a fifth connection from one peer was kept");
    // ...while another peer (the kubelet) is still served.
    let mut kubelet = connect_from("127.0.0.3", admin).await;
    assert!(
        get_on(&mut kubelet, "/ready")
            .await
            .starts_with("HTTP/1.1 200")
    );
    // The total cap: 4 + 1 (kubelet) + 1 = 6 open. A seventh from a new peer (the kubelet's
    // next probe, with a few addresses holding the rest) is served, in place of the oldest
    // open connection, which is closed; the others stay.
    let _sixth = connect_from("127.0.0.4", admin).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut seventh = connect_from("127.0.0.5", admin).await;
    assert!(
        get_on(&mut seventh, "/ready")
            .await
            .starts_with("HTTP/1.1 200")
    );
    let (_, closed) = read_to_close(&mut greedy[0], Duration::from_secs(1)).await;
    assert!(closed, "the oldest connection was not closed to make room");
    for g in greedy[1..].iter_mut() {
        let (_, closed) = read_to_close(g, Duration::from_millis(100)).await;
        assert!(!closed, "a newer connection was closed");
    }
    assert!(
        get_on(&mut kubelet, "/live")
            .await
            .starts_with("HTTP/1.1 200")
    );
    // Closing the greedy peer's connections frees its slots.
    drop(greedy);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = connect_from("127.0.0.2", admin).await;
    assert!(
        get_on(&mut again, "/live")
            .await
            .starts_with("HTTP/1.1 200")
    );
}
