//! 100 MB each way and a slow reader through a sidecar pair (curl, Python's HTTP server), with
//! the proxies' memory watched: both run in this process (this file holds one test, so nothing
//! else runs beside it), curl and the application in their own.

mod common;
mod conformance_support;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use conformance_support::*;
use trellis_proxy::config::Protocol;

/// This process's resident set: (now, peak), in bytes.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
            * 1024
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

const MB100: u64 = 100 * 1024 * 1024;
/// What the two proxies may add to the process while 100 MB go through: the HTTP/2 windows
/// (2 MiB per stream, 5 MiB per connection), send buffers and hyper's read buffers on each of
/// the four sockets, with room for the allocator. Buffering the body would take 100 MB.
const GROWTH_BOUND: u64 = 48 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabytes_each_way_and_a_slow_reader_in_bounded_memory() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP hundred_megabytes_each_way_and_a_slow_reader_in_bounded_memory: {why}");
        return;
    }
    let p = pair_with(Protocol::Auto).await;
    // Warm up the path (connections, TLS, pools) before the baseline.
    let r = p.curl("/echo").run().await;
    assert_eq!(r.status(), 200);
    let (base, _) = rss();

    // Download.
    let started = Instant::now();
    let r = p
        .curl(&format!("/big?n={MB100}"))
        .args(["-o", "/dev/null", "-w", "%{size_download}"])
        .run()
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(String::from_utf8_lossy(&r.body), MB100.to_string());
    let down = started.elapsed();

    // Upload, chunked from a pipe (curl -T -).
    let started = Instant::now();
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {MB100} /dev/zero | curl -sS --max-time 120 -T - --connect-to {AUTHORITY}:{} http://{AUTHORITY}/upload",
            p.out()
        ))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let echo: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(echo["bodyLen"], MB100);
    let up = started.elapsed();

    // A slow reader: 8 MiB read 64 KiB every 25 ms (about 2.5 MiB/s, 3 s; curl 7.88's
    // `--limit-rate` let the transfer burst through). The proxies hold back the application
    // (flow control) instead of reading the rest into memory.
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(p.out()).await.unwrap();
    let n = 8 * 1024 * 1024;
    s.write_all(
        format!("GET /big?n={n} HTTP/1.1\r\nHost: {AUTHORITY}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let k = s.read(&mut buf).await.unwrap();
        if k == 0 {
            break;
        }
        got += k;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let slow = started.elapsed();
    assert!(got > n && got < n + 1024, "{got} bytes (head and body)");
    let (now, peak) = rss();
    eprintln!(
        "download {down:?}, upload {up:?}, slow reader {slow:?}; RSS before {} MiB, peak {} MiB, after {} MiB",
        base >> 20,
        peak >> 20,
        now >> 20
    );
    assert!(
        peak.saturating_sub(base) < GROWTH_BOUND,
        "the proxies grew by {} MiB moving 100 MB",
        (peak - base) >> 20
    );
}
