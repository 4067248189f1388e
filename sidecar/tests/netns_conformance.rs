//! Root-only: curl through a sidecar pair behind the real iptables redirect. The client pod's
//! curl connects to a Service cluster IP; its `OUTPUT` rules send the connection to the client
//! sidecar, which carries it over mTLS to the server pod, whose `PREROUTING` rules hand it to
//! the server sidecar, which gives it to the application (Python's standard-library server,
//! `conformance_support/app.py`) on the pod IP. Real `trellis-proxy` binaries as UID 2137, the
//! `netns_pods` fixture. `conformance.rs` covers the same behaviour in local mode (no
//! redirect); this covers what only the redirect path does: routing by original destination,
//! with no `Host` to go by, and upgrades on their own mTLS connection.
//!
//! Skips with a message when not root or when `ip` / `iptables` / `setpriv` / `curl` /
//! `python3` are missing.

mod common;
mod netns_pods;
mod netns_support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Instant;

use common::*;
use netns_pods::*;
use trellis_proxy::config::{Endpoint, MtlsMode, OutboundService, Protocol, ServicePort};

const APP_PORT: u16 = 8080;
/// A port of the server pod nothing listens on (the Service's port 81).
const DEAD_PORT: u16 = 8081;

fn skip() -> Option<String> {
    netns_support::skip_reason(&[
        "ip",
        "iptables-save",
        "iptables-restore",
        "setpriv",
        "curl",
        "python3",
    ])
}

/// `backend.shop`: port 80 declared HTTP/1.1, its endpoint the server pod's application; port
/// 81 the same pod's [`DEAD_PORT`].
fn backend() -> OutboundService {
    OutboundService {
        name: "backend".into(),
        namespace: "shop".into(),
        addresses: vec![CLUSTER_IP.parse().unwrap()],
        ports: [(80, APP_PORT), (81, DEAD_PORT)]
            .into_iter()
            .map(|(port, target)| ServicePort {
                port,
                name: Some("http".into()),
                protocol: Protocol::Http1,
                endpoints: vec![Endpoint {
                    address: SocketAddr::new(SERVER_IP.parse().unwrap(), target),
                    identity: Some(id("backend")),
                    zone: None,
                }],
            })
            .collect(),
        identities: vec![id("backend")],
        policy: None,
    }
}

/// The Python application in `ns` on every address; stopped on drop.
fn python_app(ns: &str) -> Proc {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/conformance_support/app.py"
    );
    let (proc, mut lines) = Proc::spawn_reporting(
        Command::new("ip")
            .args(["netns", "exec", ns, "python3", script, "0.0.0.0"])
            .arg(APP_PORT.to_string()),
    );
    match lines.next() {
        Some(Ok(l)) if l.starts_with("READY") => proc,
        other => panic!("app in {ns} did not start: {other:?}"),
    }
}

/// curl from the client pod (as root, so the redirect applies) with `args`; (exit code,
/// stdout, stderr).
fn curl(ns: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-sS", "--max-time", "20"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A WebSocket client on Python's standard library: handshake with the RFC's sample key,
/// the server's greeting, a masked text message echoed back, then the close handshake and
/// the end of the connection. Prints `WS-OK`.
const WS_CLIENT: &str = r#"
import socket, struct, sys
s = socket.create_connection((sys.argv[1], 80), timeout=5)
s.sendall(b"GET /ws HTTP/1.1\r\nHost: backend.shop\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
f = s.makefile("rb")
head = b""
while not head.endswith(b"\r\n\r\n"):
    head += f.read(1)
assert head.startswith(b"HTTP/1.1 101"), head
assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head, head
def recv():
    b0, b1 = f.read(2)
    return b0 & 15, f.read(b1 & 127)
def send(op, data):
    mask = b"\x01\x02\x03\x04"
    s.sendall(bytes([0x80 | op, 0x80 | len(data)]) + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(data)))
assert recv() == (1, b"hello")
send(1, b"through the redirect")
assert recv() == (1, b"through the redirect")
send(8, struct.pack("!H", 1000))
assert recv() == (8, struct.pack("!H", 1000))
assert f.read() == b""
print("WS-OK")
"#;

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn curl_through_the_redirect_reaches_the_app_as_it_would_without_the_mesh() {
    if let Some(why) = skip() {
        eprintln!(
            "SKIP curl_through_the_redirect_reaches_the_app_as_it_would_without_the_mesh: {why}"
        );
        return;
    }
    let net = Net::new("cf", &[]);
    let _app = python_app(&net.server);
    let logs = tempfile::tempdir().unwrap();
    let pki = Pki::new("mesh");
    let server = PodProxy::start(
        &net.server,
        &pki,
        &id("backend"),
        &config("server-1", inbound(MtlsMode::Strict), vec![]),
        logs.path(),
        &[],
    );
    let client = PodProxy::start(
        &net.client,
        &pki,
        &id("web"),
        &config("client-1", inbound(MtlsMode::Strict), vec![backend()]),
        logs.path(),
        &[],
    );
    let url = |path: &str| format!("http://{CLUSTER_IP}{path}");
    let fail = |what: &str, err: &str| {
        panic!(
            "{what}: {err}\nclient sidecar: {}\nserver sidecar: {}",
            client.log_text(),
            server.log_text()
        )
    };

    // A plain GET: the app sees the Host curl sent.
    let (code, out, err) = curl(&net.client, &[&url("/echo?x=1")]);
    if code != 0 {
        fail("GET", &err);
    }
    let echo = json(&out);
    assert_eq!(echo["path"], "/echo?x=1");
    assert_eq!(echo["version"], "HTTP/1.1");

    // HTTP/1.0 without a Host header (curl -H 'Host:' removes its own): nothing to route by
    // but the original destination, which is what the redirect path uses.
    let (code, out, err) = curl(
        &net.client,
        &["--http1.0", "-H", "Host:", "-i", &url("/echo")],
    );
    if code != 0 {
        fail("HTTP/1.0 without Host", &err);
    }
    assert!(out.starts_with("HTTP/1.0 200"), "{out}");
    let body = out.split_once("\r\n\r\n").unwrap().1;
    let echo = json(body);
    assert_eq!(echo["path"], "/echo");
    // The application speaks HTTP/1.1 behind the server sidecar, which needs a Host: the
    // address the client connected to.
    let hosts: Vec<&str> = echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|kv| kv[0].as_str().unwrap().eq_ignore_ascii_case("host"))
        .map(|kv| kv[1].as_str().unwrap())
        .collect();
    assert_eq!(hosts, [format!("{CLUSTER_IP}:80")]);

    // An upload large enough for curl's `Expect: 100-continue`.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("up.bin");
    std::fs::write(&file, vec![7u8; 300_000]).unwrap();
    let at = format!("@{}", file.display());
    let (code, out, err) = curl(&net.client, &["--data-binary", &at, &url("/upload")]);
    if code != 0 {
        fail("upload", &err);
    }
    assert_eq!(json(&out)["bodyLen"], 300_000);

    // h2c prior knowledge to a port declared HTTP/1.1: HTTP/2 to curl, HTTP/1.1 to the app.
    let (code, out, err) = curl(
        &net.client,
        &["--http2-prior-knowledge", "-i", &url("/echo")],
    );
    if code != 0 {
        fail("h2c", &err);
    }
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    let body = out.split_once("\r\n\r\n").unwrap().1;
    assert_eq!(json(body)["version"], "HTTP/1.1");

    // Nothing listening behind the server sidecar: 503 and why.
    let (code, out, err) = curl(
        &net.client,
        &["-i", &format!("http://{CLUSTER_IP}:81/echo")],
    );
    if code != 0 {
        fail("dead port", &err);
    }
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(out.contains("connection refused"), "{out}");

    // A WebSocket session from a Python client (standard library sockets) in the client pod.
    let ws = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.client,
            "python3",
            "-c",
            WS_CLIENT,
            CLUSTER_IP,
        ])
        .output()
        .unwrap();
    let ws_out = String::from_utf8_lossy(&ws.stdout);
    assert!(
        ws.status.success() && ws_out.contains("WS-OK"),
        "{ws_out} {}",
        String::from_utf8_lossy(&ws.stderr)
    );

    // Server-sent events: the first event long before the last (five, 300 ms apart).
    let started = Instant::now();
    let (code, out, err) = curl(
        &net.client,
        &[
            "-N",
            "-w",
            "\n%{time_starttransfer} %{time_total}",
            &url("/trickle"),
        ],
    );
    if code != 0 {
        fail("trickle", &err);
    }
    let (events, times) = out.rsplit_once('\n').unwrap();
    assert_eq!(events.matches("data: ").count(), 5, "{out}");
    let t: Vec<f64> = times.split(' ').map(|s| s.parse().unwrap()).collect();
    assert!(t[0] < t[1] - 0.8, "first byte at {}s of {}s", t[0], t[1]);
    assert!(started.elapsed().as_secs_f64() >= 1.2);
}

/// Entry point of the fixture's helper processes (readiness checks); does nothing unless
/// started by the fixture.
#[test]
#[ignore = "helper process for the netns_pods fixture"]
fn netns_helper() {
    netns_pods::helper_main();
}
