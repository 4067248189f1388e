//! Fixed-rate HTTP/1.1 load generator with coordinated-omission correction (the wrk2 model),
//! for hack/bench-proxy.py. Not run by CI (only compiled, as an example of the sidecar crate).
//!
//! Each of `--conns` keep-alive connections sends at `rate / conns` requests per second on its
//! own schedule: request i is due at `start + i * interval`. A request sent late (because the
//! previous one was slow) still has its latency measured from when it was due, so a stall shows
//! up in the percentiles instead of silently lowering the load. `--rate 0` runs closed-loop
//! (as fast as responses come back) for a saturation figure.
//!
//! Usage: bench-load --url http://127.0.0.1:8080/ [--host H] [--rate 1000] [--conns 16]
//!        [--duration 20]   (seconds)  -> one JSON object on stdout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Default)]
struct Stats {
    latencies_us: Vec<u64>,
    errors: u64,
    non2xx: u64,
}

struct Args {
    addr: SocketAddr,
    path: String,
    host: String,
    rate: f64,
    conns: usize,
    duration: Duration,
}

fn args() -> Args {
    let mut a = Args {
        addr: "127.0.0.1:80".parse().unwrap(),
        path: "/".into(),
        host: String::new(),
        rate: 1000.0,
        conns: 16,
        duration: Duration::from_secs(20),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => {
                let rest = v.strip_prefix("http://").expect("http:// URL");
                let (hostport, path) = rest.split_once('/').unwrap_or((rest, ""));
                a.addr = hostport.parse().expect("URL host must be ip:port");
                a.path = format!("/{path}");
                if a.host.is_empty() {
                    a.host = hostport.to_string();
                }
            }
            "--host" => a.host = v,
            "--rate" => a.rate = v.parse().expect("--rate"),
            "--conns" => a.conns = v.parse().expect("--conns"),
            "--duration" => a.duration = Duration::from_secs_f64(v.parse().expect("--duration")),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

async fn connect(
    addr: SocketAddr,
) -> Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    let _ = tcp.set_nodelay(true);
    let (sr, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(sr)
}

async fn worker(a: std::sync::Arc<Args>, start: Instant, end: Instant, offset: Duration) -> Stats {
    let mut stats = Stats::default();
    let interval = (a.rate > 0.0).then(|| Duration::from_secs_f64(a.conns as f64 / a.rate));
    let mut sr = connect(a.addr).await;
    let mut i: u32 = 0;
    loop {
        let due = match interval {
            Some(iv) => start + offset + iv * i,
            None => Instant::now(),
        };
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        i += 1;
        let Some(s) = sr.as_mut() else {
            eprintln!("no connection");
            stats.errors += 1;
            sr = connect(a.addr).await;
            continue;
        };
        let req = Request::builder()
            .uri(a.path.as_str())
            .header("host", a.host.as_str())
            .body(Empty::<Bytes>::new())
            .unwrap();
        let ok = match s.send_request(req).await {
            Ok(resp) => {
                let status = resp.status();
                match resp.into_body().collect().await {
                    Ok(_) => Some(status.is_success()),
                    Err(e) => {
                        eprintln!("body error: {e}");
                        None
                    }
                }
            }
            Err(e) => {
                eprintln!("request error: {e}");
                None
            }
        };
        // Latency from when the request was due, not when it could be sent.
        let lat = Instant::now().saturating_duration_since(due);
        match ok {
            Some(true) => stats.latencies_us.push(lat.as_micros() as u64),
            Some(false) => {
                stats.non2xx += 1;
                stats.latencies_us.push(lat.as_micros() as u64);
            }
            None => {
                stats.errors += 1;
                sr = connect(a.addr).await;
            }
        }
    }
    stats
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = std::sync::Arc::new(args());
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + a.duration;
    let stagger = if a.rate > 0.0 {
        Duration::from_secs_f64(1.0 / a.rate)
    } else {
        Duration::ZERO
    };
    let tasks: Vec<_> = (0..a.conns)
        .map(|c| tokio::spawn(worker(a.clone(), start, end, stagger * c as u32)))
        .collect();
    let mut all = Stats::default();
    for t in tasks {
        let s = t.await.unwrap();
        all.latencies_us.extend(s.latencies_us);
        all.errors += s.errors;
        all.non2xx += s.non2xx;
    }
    let elapsed = Instant::now()
        .saturating_duration_since(start)
        .as_secs_f64();
    all.latencies_us.sort_unstable();
    let l = &all.latencies_us;
    let out = serde_json::json!({
        "requests": l.len() as u64 + all.errors,
        "errors": all.errors,
        "non2xx": all.non2xx,
        "duration_s": elapsed,
        "rps": l.len() as f64 / elapsed,
        "p50_ms": pct(l, 50.0),
        "p90_ms": pct(l, 90.0),
        "p99_ms": pct(l, 99.0),
        "p999_ms": pct(l, 99.9),
        "max_ms": l.last().copied().unwrap_or(0) as f64 / 1000.0,
    });
    println!("{out}");
}
