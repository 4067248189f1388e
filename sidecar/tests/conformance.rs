//! Third-party clients and servers through a sidecar pair, the way an outside reviewer runs
//! them: `curl` (and raw sockets where curl cannot say it) calls through client proxy A, which
//! carries the request over mTLS (HTTP/2 between the sidecars) to server proxy B, which hands it
//! to an application written with Python's standard-library HTTP server
//! (`conformance_support/app.py`). Each test asserts what the user sees at the end of the path.
//!
//! Skips with a message when `curl` or `python3` is missing (CI installs both: see
//! `hack/install-deps.sh`).

mod common;
mod conformance_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use conformance_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_proxy::config::{MtlsMode, Protocol};

macro_rules! skip_unless_tools {
    ($name:literal) => {
        if let Some(why) = skip_reason() {
            eprintln!("SKIP {}: {why}", $name);
            return;
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_204_304_and_duplicate_headers_reach_curl_as_the_app_sent_them() {
    skip_unless_tools!("head_204_304_and_duplicate_headers_reach_curl_as_the_app_sent_them");
    let p = pair().await;
    // HEAD, then GET on the same connection: the HEAD answer has the GET's length and no
    // body (a stray body would be read as the next response).
    let r = p
        .curl("/head")
        .args([
            "-I",
            "--next",
            "--connect-to",
            &format!("{AUTHORITY}:{}", p.out()),
            &format!("http://{AUTHORITY}/head"),
            "-v",
        ])
        .run()
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("Re-using existing connection"),
        "{}",
        r.stderr
    );
    // -I prints the HEAD's head on stdout, then comes the GET's body: exactly 1234 bytes.
    let stdout = String::from_utf8_lossy(&r.body).into_owned();
    let (head, rest) = stdout.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("content-length: 1234"),
        "{head}"
    );
    assert_eq!(rest, "h".repeat(1234));
    assert_eq!(r.header("content-length"), ["1234"]);
    // 204 and 304: no body, and curl does not wait for one.
    for code in [204u16, 304] {
        let started = Instant::now();
        let r = p.curl(&format!("/status/{code}")).run().await;
        assert_eq!(r.code, 0, "{code}: {}", r.stderr);
        assert_eq!(r.status(), code);
        assert!(r.body.is_empty());
        assert_eq!(r.header("etag"), ["\"v1\""]);
        assert!(started.elapsed() < Duration::from_secs(5), "{code} hung");
    }
    // A 304 may carry the Content-Length of what it stands for (RFC 9110 section 8.6), with
    // no body; and so may a 304 to an h2c client.
    // (h2c needs the port declared HTTP/1.1: the Python application speaks nothing else.)
    let h1_port = pair_with(Protocol::Http1).await;
    for (p, v) in [(&p, "--http1.1"), (&h1_port, "--http2-prior-knowledge")] {
        let started = Instant::now();
        let r = p.curl("/status/304?cl").args([v]).run().await;
        assert_eq!(r.code, 0, "{v}: {}", r.stderr);
        assert_eq!(r.status(), 304, "{v}: {}", r.head);
        assert!(r.body.is_empty());
        assert!(started.elapsed() < Duration::from_secs(5), "{v}: 304 hung");
    }
    // Three Set-Cookie stay three, in order.
    let r = p.curl("/cookies").run().await;
    assert_eq!(
        r.header("set-cookie"),
        ["a=1", "b=2; Path=/", "c=3; HttpOnly"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_with_expect_continue_and_chunked_bodies_arrive_whole() {
    skip_unless_tools!("uploads_with_expect_continue_and_chunked_bodies_arrive_whole");
    let p = pair().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("up.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let crc = crc32(&data);
    let at_file = format!("@{}", file.display());
    // curl sends `Expect: 100-continue` for a body this size and waits for the 100.
    let r = p
        .curl("/upload")
        .args(["--data-binary", &at_file, "--expect100-timeout", "30"])
        .run()
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["bodyLen"], data.len());
    assert_eq!(r.json()["crc"], crc);
    // The same body chunked (no length known in advance).
    let r = p
        .curl("/upload")
        .args([
            "--data-binary",
            &at_file,
            "-H",
            "Transfer-Encoding: chunked",
        ])
        .run()
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["bodyLen"], data.len());
    assert_eq!(r.json()["crc"], crc);
    // Response trailers reach a client that asked for them (`TE: trailers`).
    let r = p
        .curl("/trailers")
        .args(["--raw", "-H", "TE: trailers"])
        .run()
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let raw_body = String::from_utf8_lossy(&r.body).to_ascii_lowercase();
    assert!(raw_body.contains("body"), "{raw_body}");
    assert!(
        raw_body.contains("x-checksum: 42"),
        "trailer lost: {raw_body:?}"
    );
    // A chunked response keeps its pieces' bytes in order.
    let r = p.curl("/chunked").run().await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        String::from_utf8_lossy(&r.body),
        "part-0;part-1;part-2;part-3;part-4;"
    );
}

/// CRC-32 (IEEE), as Python's `zlib.crc32` computes it.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_response_reaches_curl_chunk_by_chunk() {
    skip_unless_tools!("a_trickled_response_reaches_curl_chunk_by_chunk");
    let p = pair().await;
    // Five events 300 ms apart: the first must be out long before the last is written.
    let r = p
        .curl("/trickle")
        .args(["-N", "-w", "\n%{time_starttransfer} %{time_total}"])
        .run()
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let text = String::from_utf8_lossy(&r.body).into_owned();
    let (events, times) = text.rsplit_once('\n').unwrap();
    assert_eq!(events.matches("data: ").count(), 5, "{events}");
    let mut t = times.split(' ').map(|s| s.parse::<f64>().unwrap());
    let (first_byte, total) = (t.next().unwrap(), t.next().unwrap());
    assert!(total >= 1.2, "{total}");
    assert!(
        first_byte < total - 0.8,
        "first byte at {first_byte}s of {total}s: the stream was held back"
    );
}

/// `curl --http2-prior-knowledge` (h2c) from the application: an HTTP/2 application gets
/// HTTP/2; behind a port declared HTTP/1.1 (`protocol: http1`) the application gets HTTP/1.1,
/// as it would from a plain HTTP/1.1 client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_from_curl_reaches_the_app_in_its_protocol() {
    skip_unless_tools!("http2_prior_knowledge_from_curl_reaches_the_app_in_its_protocol");
    // An application that speaks both (hyper): HTTP/2 end to end.
    let h2_app = upstream(Speaks::Both).await;
    let p = pair_to(h2_app, Protocol::Auto).await;
    let r = p
        .curl("/echo?q=1")
        .args(["--http2-prior-knowledge", "-d", "hello"])
        .run()
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.head.starts_with("HTTP/2 200"), "{}", r.head);
    let echo = r.json();
    assert_eq!(echo["version"], "HTTP/2.0");
    assert_eq!(echo["authority"], AUTHORITY);
    assert_eq!(echo["bodyLen"], 5);

    // `curl --http2` on http:// asks to upgrade (`Upgrade: h2c`); an application that does
    // not upgrade answers in HTTP/1.1, as it would without the mesh.
    let p = pair_with(Protocol::Auto).await;
    let r = p
        .curl("/echo?up=1")
        .args(["--http2", "-d", "hello"])
        .run()
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.head.starts_with("HTTP/1.1 200"), "{}", r.head);
    assert_eq!(r.json()["bodyLen"], 5);

    // The Python application speaks HTTP/1.1 only, on a port declared so.
    let p = pair_with(Protocol::Http1).await;
    let r = p
        .curl("/echo?q=1")
        .args(["--http2-prior-knowledge", "-d", "hello"])
        .run()
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.head.starts_with("HTTP/2 200"), "{}", r.head);
    let echo = r.json();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/echo?q=1");
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["bodyLen"], 5);
    assert_eq!(app_header(&echo, "host"), [AUTHORITY]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_edge_cases_reach_the_app_intact() {
    skip_unless_tools!("header_edge_cases_reach_the_app_intact");
    let p = pair().await;
    // A 20 KiB value (a large JWT or cookie; Envoy's default limit is 60 KiB for the whole
    // head), 90 headers, a duplicate, odd case.
    let long = "x".repeat(20 * 1024);
    let mut args: Vec<String> = vec!["-H".into(), format!("X-Long: {long}")];
    // Up to hyper's (and Envoy's) default of 100 header lines, counting curl's own three.
    for i in 0..90 {
        args.push("-H".into());
        args.push(format!("X-Many-{i}: v{i}"));
    }
    args.extend(["-H".into(), "X-Dup: one".into()]);
    args.extend(["-H".into(), "X-Dup: two".into()]);
    args.extend(["-H".into(), "X-MiXeD-CaSe: Value".into()]);
    let r = p
        .curl("/echo")
        .args(args.iter().map(String::as_str))
        .run()
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.status(),
        200,
        "{}{}",
        r.head,
        String::from_utf8_lossy(&r.body)
    );
    let echo = r.json();
    assert_eq!(app_header(&echo, "x-long"), [long.as_str()]);
    for i in [0, 50, 89] {
        assert_eq!(app_header(&echo, &format!("x-many-{i}")), [format!("v{i}")]);
    }
    assert_eq!(app_header(&echo, "x-dup"), ["one", "two"]);
    assert_eq!(app_header(&echo, "x-mixed-case"), ["Value"]);

    // The same 20 KiB value from an h2c client (to a port declared HTTP/1.1).
    let h1_port = pair_with(Protocol::Http1).await;
    let r = h1_port
        .curl("/echo")
        .args(["--http2-prior-knowledge", "-H", &format!("X-Long: {long}")])
        .run()
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.status(), 200, "{}", r.head);
    assert_eq!(app_header(&r.json(), "x-long"), [long.as_str()]);

    // Past the limits, a clear 431 and nothing reaches the application: 101 header lines, or
    // a head larger than the 64 KiB the hop between the sidecars takes.
    let mut args: Vec<String> = Vec::new();
    for i in 0..101 {
        args.push("-H".into());
        args.push(format!("X-Many-{i}: v{i}"));
    }
    let r = p
        .curl("/echo")
        .args(args.iter().map(String::as_str))
        .run()
        .await;
    assert_eq!(r.status(), 431, "{}", r.head);
    let huge = format!("X-Huge: {}", "y".repeat(70 * 1024));
    let r = p.curl("/echo").args(["-H", &huge]).run().await;
    assert_eq!(r.status(), 431, "{}", r.head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_forms_absolute_uri_and_non_utf8_values_reach_the_app() {
    skip_unless_tools!("host_forms_absolute_uri_and_non_utf8_values_reach_the_app");
    let p = pair().await;
    let out = p.out();
    let read_echo = |resp: String| {
        let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        assert!(head.starts_with("HTTP/1.1 200"), "{resp}");
        serde_json::from_str::<serde_json::Value>(body).unwrap_or_else(|e| panic!("{e}: {resp}"))
    };
    // Host without the port.
    let resp = raw(
        out,
        b"GET /echo HTTP/1.1\r\nHost: backend.shop\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(app_header(&read_echo(resp), "host"), ["backend.shop"]);
    // Absolute-form target: the app gets origin form and the Host.
    let resp = raw(
        out,
        b"GET http://backend.shop:8080/echo?a=b HTTP/1.1\r\nHost: backend.shop:8080\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let echo = read_echo(resp);
    assert_eq!(echo["path"], "/echo?a=b");
    assert_eq!(app_header(&echo, "host"), [AUTHORITY]);
    // obs-text (bytes 0x80-0xFF) in a value passes byte for byte.
    let req = b"GET /echo HTTP/1.1\r\nHost: backend.shop:8080\r\nConnection: close\r\nX-Latin: caf\xe9 \xff\r\n\r\n";
    let resp = raw(out, req, Duration::from_secs(5)).await;
    let got = app_header(&read_echo(resp), "x-latin");
    let bytes: Vec<u8> = got[0].chars().map(|c| c as u32 as u8).collect();
    assert_eq!(bytes, b"caf\xe9 \xff");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_and_http10_requests_are_answered_in_order() {
    skip_unless_tools!("pipelined_and_http10_requests_are_answered_in_order");
    let p = pair().await;
    // Three requests in one write on one connection: three answers, in order.
    let resp = raw(
        p.out(),
        b"GET /echo?n=1 HTTP/1.1\r\nHost: backend.shop:8080\r\n\r\n\
          GET /echo?n=2 HTTP/1.1\r\nHost: backend.shop:8080\r\n\r\n\
          GET /echo?n=3 HTTP/1.1\r\nHost: backend.shop:8080\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let order: Vec<usize> = ["n=1", "n=2", "n=3"]
        .iter()
        .map(|n| {
            resp.find(n)
                .unwrap_or_else(|| panic!("{n} missing: {resp}"))
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{resp}");
    assert_eq!(resp.matches("HTTP/1.1 200").count(), 3, "{resp}");
    // 100 requests, 32 at a time on as many connections (curl -Z): every one answered 200.
    let urls: Vec<String> = (0..100)
        .map(|i| format!("http://{AUTHORITY}/echo?par={i}"))
        .collect();
    let r = p
        .curl("/echo?par=first")
        .args([
            "-Z",
            "--parallel-max",
            "32",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
        ])
        .args(urls.iter().flat_map(|u| ["-o", "/dev/null", u.as_str()]))
        .run()
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let codes = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(codes.lines().count(), 101, "{codes}");
    assert!(codes.lines().all(|c| c == "200"), "{codes}");
    // HTTP/1.0 with Host: answered, and closed after (no keep-alive asked).
    let started = Instant::now();
    let resp = raw(
        p.out(),
        b"GET /echo HTTP/1.0\r\nHost: backend.shop:8080\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(resp.starts_with("HTTP/1"), "{resp}");
    assert!(resp.contains(" 200 "), "{resp}");
    assert!(resp.contains("\"path\": \"/echo\""), "{resp}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the HTTP/1.0 connection was kept open"
    );
    // A chunked response to an HTTP/1.0 client: close-delimited, whole.
    let r = p.curl("/chunked").args(["--http1.0"]).run().await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.head.starts_with("HTTP/1.0 200"), "{}", r.head);
    assert_eq!(
        String::from_utf8_lossy(&r.body),
        "part-0;part-1;part-2;part-3;part-4;"
    );
    // curl's HTTP/1.0 with keep-alive: two requests on one connection.
    let r = p
        .curl("/echo")
        .args([
            "--http1.0",
            "-H",
            "Connection: keep-alive",
            "--next",
            "--http1.0",
            "--connect-to",
            &format!("{AUTHORITY}:{}", p.out()),
            "-H",
            "Connection: keep-alive",
            &format!("http://{AUTHORITY}/echo?second"),
            "-v",
        ])
        .run()
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("Re-using existing connection"),
        "keep-alive not honoured: {}",
        r.stderr
    );
}

/// Request smuggling: a body framed both by `Transfer-Encoding` and `Content-Length`. RFC 9112
/// section 6.3 lets a server either refuse it or take the chunked framing, drop the length
/// and close the connection after answering; the proxy's HTTP/1 server (hyper) does the
/// latter. What must never happen is the shape CL.TE smuggling exploits: a hop that trusts
/// `Content-Length` reading the chunked body's tail as a second request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_transfer_encoding_and_content_length_cannot_smuggle() {
    skip_unless_tools!("conflicting_transfer_encoding_and_content_length_cannot_smuggle");
    let p = pair().await;
    // Chunked: one 40-byte chunk that looks like a request. Content-Length: 4 would end the
    // body after `28\r\n` and leave `GET /echo?smuggled` as the next request.
    let inner = b"GET /echo?smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_eq!(inner.len(), 0x28);
    for order in [
        "Content-Length: 4\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked\r\nContent-Length: 4",
    ] {
        let mut req = format!("POST /echo HTTP/1.1\r\nHost: {AUTHORITY}\r\n{order}\r\n\r\n28\r\n")
            .into_bytes();
        req.extend_from_slice(inner);
        req.extend_from_slice(b"\r\n0\r\n\r\n");
        let started = Instant::now();
        let resp = raw(p.out(), &req, Duration::from_secs(5)).await;
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "the connection stayed open after an ambiguous request: {resp}"
        );
        assert_eq!(resp.matches("HTTP/1.1 ").count(), 1, "{resp}");
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        let (_, body) = resp.split_once("\r\n\r\n").unwrap();
        let echo: serde_json::Value = serde_json::from_str(body).unwrap();
        // The application got one request whose body is the whole chunk, and no length.
        assert_eq!(echo["path"], "/echo", "{order}");
        assert_eq!(echo["bodyLen"], 0x28, "{order}");
        assert!(
            app_header(&echo, "content-length")
                .iter()
                .all(|v| v == "40"),
            "{echo}"
        );
        assert!(!body.contains("smuggled\""), "{resp}");
    }
    // A Transfer-Encoding that does not end in chunked cannot be framed at all: 400.
    let resp = raw(
        p.out(),
        format!("POST /echo HTTP/1.1\r\nHost: {AUTHORITY}\r\nTransfer-Encoding: identity\r\nContent-Length: 3\r\n\r\nabc").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_paths_show_the_user_a_clear_answer() {
    skip_unless_tools!("error_paths_show_the_user_a_clear_answer");
    let p = pair().await;
    // The application closes mid-response: curl reports a short read, it does not hang.
    let started = Instant::now();
    let r = p.curl("/truncate").run().await;
    assert_ne!(r.code, 0, "a truncated response looked complete");
    assert!(r.body.len() < 100_000);
    assert!(started.elapsed() < Duration::from_secs(10), "hung");

    // The same without a length: the client must not see a complete (chunked) response.
    // (h2c needs the port declared HTTP/1.1: the Python application speaks nothing else.)
    let h1_port = pair_with(Protocol::Http1).await;
    for (p, v) in [
        (&p, "--http1.1"),
        (&p, "--http1.0"),
        (&h1_port, "--http2-prior-knowledge"),
    ] {
        // HTTP/1.0 several times: whether the chunk reaches the client before the failure
        // does is a race, and only the run where it does could pass for complete.
        let runs = if v == "--http1.0" { 6 } else { 1 };
        for _ in 0..runs {
            let started = Instant::now();
            let r = p.curl("/truncate-chunked").args([v]).run().await;
            // curl: 18 (short read); for HTTP/1.0, whose body ends where the connection does,
            // 56 (reset) or 52 (nothing).
            assert_ne!(
                r.code, 0,
                "{v}: a truncated response looked complete: {}",
                r.head
            );
            assert!(started.elapsed() < Duration::from_secs(10), "{v}: hung");
        }
    }
    // A response framed both ways: the chunked framing wins and the body arrives whole, with
    // no stale Content-Length for the client to trust.
    let r = p.curl("/te-and-cl").run().await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(String::from_utf8_lossy(&r.body), "hello world");
    assert!(
        r.header("content-length").iter().all(|v| v == "11"),
        "{}",
        r.head
    );

    // Nothing listens behind the server proxy: 503 with a body that says why.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let b2 = TestProxy::start(
        &p.pki,
        &id("backend"),
        &config("b2", inbound(MtlsMode::Strict), vec![]),
        Some(dead),
    )
    .await;
    let mut a2 = TestProxy::start(
        &p.pki,
        &id("web"),
        &config(
            "a2",
            inbound(MtlsMode::Strict),
            vec![service(
                "backend",
                PORT,
                Protocol::Auto,
                b2.running.inbound_addr,
                vec![id("backend")],
            )],
        ),
        None,
    )
    .await;
    let a2_out = a2.running.outbound_addr;
    let curl_a2 = |path: &str| {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["-sS", "--max-time", "60", "--connect-to"])
            .arg(format!("{AUTHORITY}:{a2_out}"))
            .arg(format!("http://{AUTHORITY}{path}"))
            .kill_on_drop(true);
        Curl(cmd)
    };
    let r = curl_a2("/echo").run().await;
    assert_eq!(r.status(), 503, "{}", r.head);
    let body = String::from_utf8_lossy(&r.body).to_lowercase();
    assert!(
        body.contains("connect") && body.contains("refused"),
        "the body does not say what failed: {body}"
    );

    // The request timeout of the Service's policy: 504 once it passes.
    let mut svc = service(
        "backend",
        PORT,
        Protocol::Auto,
        p.b.running.inbound_addr,
        vec![id("backend")],
    );
    svc.policy = Some(trellis_proxy::config::TrafficPolicy {
        timeouts: trellis_proxy::config::Timeouts {
            request_ms: Some(300),
            ..Default::default()
        },
        ..Default::default()
    });
    a2.apply(&config("a3", inbound(MtlsMode::Strict), vec![svc]))
        .await;
    let started = Instant::now();
    let r = curl_a2("/sleep?ms=3000").run().await;
    assert_eq!(r.status(), 504, "{}", r.head);
    assert!(started.elapsed() < Duration::from_secs(2));
    let body = String::from_utf8_lossy(&r.body).to_lowercase();
    assert!(
        body.contains("timeout") || body.contains("timed out"),
        "{body}"
    );
}

/// A gRPC message, encoded by prost as any generated type would be.
#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(string, tag = "1")]
    text: String,
}

/// A gRPC application on hyper's HTTP/2 server: gRPC framing is five bytes and a protobuf, so
/// the methods are written out by hand, and the client under test is tonic's.
/// - `/t.Echo/Unary`, `/t.Echo/Bidi`: every message echoed as it arrives, then `grpc-status: 0`
///   and `grpc-message: done` in trailers;
/// - `/t.Echo/Ticks`: three messages 300 ms apart (server streaming);
/// - `/t.Echo/Missing`: a trailers-only answer, `grpc-status: 5` (NOT_FOUND).
async fn grpc_app() -> SocketAddr {
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::Frame;
    type B = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;
    fn frame(m: &Msg) -> bytes::Bytes {
        let payload = prost::Message::encode_to_vec(m);
        let mut f = vec![0u8];
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(&payload);
        f.into()
    }
    async fn handle(
        req: http::Request<hyper::body::Incoming>,
    ) -> Result<http::Response<B>, std::convert::Infallible> {
        assert_eq!(
            req.headers()["te"],
            "trailers",
            "TE: trailers reached the app"
        );
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<Frame<bytes::Bytes>, std::convert::Infallible>>(8);
        let ok = |m: &str| {
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", "0".parse().unwrap());
            t.insert("grpc-message", m.parse().unwrap());
            t
        };
        match req.uri().path() {
            "/t.Echo/Unary" | "/t.Echo/Bidi" => {
                let mut body = req.into_body();
                tokio::spawn(async move {
                    while let Some(Ok(f)) = body.frame().await {
                        if let Ok(d) = f.into_data()
                            && tx.send(Ok(Frame::data(d))).await.is_err()
                        {
                            return;
                        }
                    }
                    let _ = tx.send(Ok(Frame::trailers(ok("done")))).await;
                });
            }
            "/t.Echo/Ticks" => {
                tokio::spawn(async move {
                    for i in 0..3 {
                        let m = Msg {
                            text: format!("tick {i}"),
                        };
                        if tx.send(Ok(Frame::data(frame(&m)))).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let _ = tx.send(Ok(Frame::trailers(ok("ticked")))).await;
                });
            }
            _ => {
                return Ok(http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "5")
                    .header("grpc-message", "no such thing")
                    .body(Full::new(bytes::Bytes::new()).boxed())
                    .unwrap());
            }
        }
        Ok(http::Response::builder()
            .header("content-type", "application/grpc")
            .body(StreamBody::new(tokio_stream_from(rx)).boxed())
            .unwrap())
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(s),
                        hyper::service::service_fn(handle),
                    ),
            );
        }
    });
    addr
}

/// gRPC with tonic's client through the pair: unary, bidirectional streaming (each reply read
/// before the next request is sent), server streaming delivered message by message, trailers
/// (`grpc-status`, `grpc-message`) and an error status passing through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_from_tonic_keep_streams_trailers_and_statuses() {
    use http::uri::PathAndQuery;
    let app = grpc_app().await;
    let p = pair_to(app, Protocol::Grpc).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", p.out()))
        .unwrap()
        .origin(format!("http://{AUTHORITY}").parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    let codec = || tonic_prost::ProstCodec::<Msg, Msg>::default();

    // Unary.
    grpc.ready().await.unwrap();
    let resp = grpc
        .unary(
            tonic::Request::new(Msg { text: "hi".into() }),
            PathAndQuery::from_static("/t.Echo/Unary"),
            codec(),
        )
        .await
        .unwrap();
    assert_eq!(resp.into_inner().text, "hi");

    // Bidirectional: the second message goes out only after the first one's echo came back.
    let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(1);
    grpc.ready().await.unwrap();
    tx.send(Msg { text: "one".into() }).await.unwrap();
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        grpc.streaming(
            tonic::Request::new(tokio_stream_from(rx)),
            PathAndQuery::from_static("/t.Echo/Bidi"),
            codec(),
        ),
    )
    .await
    .expect("the response head came while the request stream is open")
    .unwrap();
    let mut replies = resp.into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), replies.message()).await;
    assert_eq!(first.unwrap().unwrap().unwrap().text, "one");
    tx.send(Msg { text: "two".into() }).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), replies.message()).await;
    assert_eq!(second.unwrap().unwrap().unwrap().text, "two");
    drop(tx);
    assert!(
        replies.message().await.unwrap().is_none(),
        "status OK ends it"
    );
    let trailers = replies.trailers().await.unwrap().unwrap();
    assert_eq!(trailers.get("grpc-message").unwrap(), "done");

    // Server streaming: the first tick arrives well before the last is sent (600 ms later).
    grpc.ready().await.unwrap();
    let started = Instant::now();
    let mut ticks = grpc
        .server_streaming(
            tonic::Request::new(Msg::default()),
            PathAndQuery::from_static("/t.Echo/Ticks"),
            codec(),
        )
        .await
        .unwrap()
        .into_inner();
    let mut at = Vec::new();
    while let Some(m) = ticks.message().await.unwrap() {
        at.push((m.text, started.elapsed()));
    }
    let texts: Vec<&str> = at.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(texts, ["tick 0", "tick 1", "tick 2"]);
    assert!(
        at[0].1 + Duration::from_millis(400) < at[2].1,
        "messages were held back: {at:?}"
    );

    // An error status from the application reaches the client as that status.
    grpc.ready().await.unwrap();
    let err = grpc
        .unary(
            tonic::Request::new(Msg::default()),
            PathAndQuery::from_static("/t.Echo/Missing"),
            codec(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(err.message(), "no such thing");
}

/// A masked client frame (RFC 6455 section 5.2).
fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// One server frame: (opcode, payload).
async fn ws_read(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
    let n = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await.unwrap();
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).await.unwrap();
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; n as usize];
    s.read_exact(&mut payload).await.unwrap();
    (h[0] & 0x0f, payload)
}

/// A WebSocket session through the pair: the handshake (the RFC's sample key, so the accept
/// value is known), messages both ways (the server speaks first), a ping, a 100 KiB binary
/// message, and the close handshake ending with the connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_both_ways_and_close_handshake() {
    skip_unless_tools!("websocket_echo_both_ways_and_close_handshake");
    let p = pair_with(Protocol::Http1).await;
    let mut s = TcpStream::connect(p.out()).await.unwrap();
    s.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nHost: {AUTHORITY}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).await.unwrap(),
            1,
            "closed during the handshake"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    let step = Duration::from_secs(5);
    // The server's first message, unprompted.
    let (op, msg) = tokio::time::timeout(step, ws_read(&mut s)).await.unwrap();
    assert_eq!((op, msg.as_slice()), (1, &b"hello"[..]));
    for (op, payload) in [
        (1u8, b"ping pong".to_vec()),
        (9, b"are you there".to_vec()),
        (2, (0..100 * 1024).map(|i| (i % 251) as u8).collect()),
    ] {
        s.write_all(&ws_frame(op, &payload)).await.unwrap();
        let (got_op, got) = tokio::time::timeout(step, ws_read(&mut s)).await.unwrap();
        assert_eq!(got_op, if op == 9 { 10 } else { op });
        assert!(got == payload, "opcode {op}: {} bytes back", got.len());
    }
    // Close 1000: the server answers with a close frame and the connection ends.
    s.write_all(&ws_frame(8, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    let (op, code) = tokio::time::timeout(step, ws_read(&mut s)).await.unwrap();
    assert_eq!((op, code.as_slice()), (8, &1000u16.to_be_bytes()[..]));
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(step, s.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the connection stayed open after the close handshake"
    );
    assert!(rest.is_empty());
}
