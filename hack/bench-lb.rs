//! Load-balancing benchmark: P2C over peak EWMA versus round robin, with one slow endpoint.
//!
//! Three real HTTP/1.1 upstreams on 127.0.0.1 (two answer after `--fast-ms`, one after
//! `--slow-ms`, 10x slower by default), driven through the real `Dispatcher` and the plaintext
//! hyper `Upstream` at a fixed request rate (open loop: latency is measured from the scheduled
//! send time, so a stalled generator cannot hide queueing). Modes, in the same run:
//!
//! - `baseline`: only the two fast endpoints (round robin): what the fast endpoints deliver.
//! - `round-robin` and `least-request` and `p2c-ewma`: all three endpoints.
//!
//! Run: `hack/bench-lb.sh` (release build; not part of CI). Goal: p2c-ewma p99 within 1.5x of
//! the baseline p99.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use trellis_proxy::config::*;
use trellis_proxy::traffic::{Dispatcher, Outcome, PlainUpstream, RequestCtx, full};

struct Args {
    rate: u64,
    secs: u64,
    warmup_secs: u64,
    fast_ms: u64,
    slow_ms: u64,
    rounds: u32,
}

fn parse_args() -> Args {
    let mut a = Args {
        rate: 1000,
        secs: 10,
        warmup_secs: 2,
        fast_ms: 1,
        slow_ms: 10,
        rounds: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v: u64 = it
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{flag} needs a number"));
        match flag.as_str() {
            "--rate" => a.rate = v,
            "--secs" => a.secs = v,
            "--warmup-secs" => a.warmup_secs = v,
            "--fast-ms" => a.fast_ms = v,
            "--slow-ms" => a.slow_ms = v,
            "--rounds" => a.rounds = v as u32,
            other => panic!(
                "unknown flag {other} (--rate --secs --warmup-secs --fast-ms --slow-ms --rounds)"
            ),
        }
    }
    a
}

/// An upstream that answers after `delay`, on its own runtime thread so server work does not
/// share the generator's scheduler.
fn start_server(rt: &tokio::runtime::Runtime, delay: Duration) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    rt.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let _ = stream.set_nodelay(true);
            let h = h.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    h.fetch_add(1, Ordering::Relaxed);
                    async move {
                        tokio::time::sleep(delay).await;
                        Ok::<_, std::io::Error>(Response::new(full(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

fn service(addrs: &[SocketAddr], algorithm: LbAlgorithm) -> OutboundService {
    OutboundService {
        name: "bench".into(),
        namespace: "default".into(),
        addresses: vec![],
        ports: vec![ServicePort {
            port: 80,
            name: None,
            protocol: Protocol::Http1,
            endpoints: addrs
                .iter()
                .map(|a| Endpoint {
                    address: *a,
                    identity: None,
                    zone: None,
                })
                .collect(),
        }],
        identities: vec![],
        policy: Some(TrafficPolicy {
            load_balancer: LoadBalancer {
                algorithm,
                hash_key: None,
            },
            ..Default::default()
        }),
    }
}

fn config(svc: &OutboundService) -> ProxyConfig {
    let cfg = ProxyConfig {
        version: CONFIG_VERSION,
        revision: "bench".into(),
        namespace: "default".into(),
        mesh: MeshSettings {
            trust_domain: "cluster.local".into(),
            identity_endpoint: None,
            telemetry: Telemetry::default(),
            skip_detection_ports: vec![],
            detect_timeout_ms: 100,
        },
        inbound: vec![],
        outbound: vec![svc.clone()],
    };
    cfg.validate().expect("valid bench config");
    cfg
}

struct Result_ {
    name: &'static str,
    lat_us: Vec<u64>,
    slow_share: f64,
    errors: u64,
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

async fn run_mode(
    name: &'static str,
    addrs: &[SocketAddr],
    slow: SocketAddr,
    algorithm: LbAlgorithm,
    a: &Args,
) -> Result_ {
    let d = Arc::new(Dispatcher::new(Arc::new(PlainUpstream::default())));
    let svc = Arc::new(service(addrs, algorithm));
    d.update(&config(&svc));
    let ctx = Arc::new(RequestCtx {
        original_dst: addrs[0],
        source_ip: "127.0.0.1".parse().unwrap(),
    });
    let total = a.rate * (a.warmup_secs + a.secs);
    let warm = a.rate * a.warmup_secs;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u64, bool, bool)>();
    let start = Instant::now();
    let period = Duration::from_nanos(1_000_000_000 / a.rate);
    for i in 0..total {
        let scheduled = start + period * i as u32;
        tokio::time::sleep_until(scheduled.into()).await;
        let (d, svc, ctx, tx) = (d.clone(), svc.clone(), ctx.clone(), tx.clone());
        tokio::spawn(async move {
            let req = Request::builder()
                .uri("/")
                .header("host", "bench.default")
                .body(full(Bytes::new()))
                .unwrap();
            let resp = d.dispatch(&svc, 80, req, &ctx).await;
            let ok = resp.status() == 200;
            let to_slow = resp.extensions().get::<Outcome>().and_then(|o| o.endpoint) == Some(slow);
            let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            let us = scheduled.elapsed().as_micros() as u64;
            let _ = tx.send((i, us, ok, to_slow));
        });
    }
    drop(tx);
    let mut lat = Vec::with_capacity((total - warm) as usize);
    let (mut slow_n, mut errors) = (0u64, 0u64);
    while let Some((i, us, ok, to_slow)) = rx.recv().await {
        if i < warm {
            continue;
        }
        lat.push(us);
        slow_n += u64::from(to_slow);
        errors += u64::from(!ok);
    }
    lat.sort_unstable();
    Result_ {
        name,
        slow_share: slow_n as f64 / lat.len().max(1) as f64,
        lat_us: lat,
        errors,
    }
}

/// An in-memory upstream that answers 200 at once: isolates the Dispatcher's own cost.
struct Immediate;

impl trellis_proxy::traffic::Upstream for Immediate {
    fn send(
        &self,
        _target: trellis_proxy::traffic::Target,
        _req: Request<trellis_proxy::traffic::Body>,
    ) -> futures::future::BoxFuture<
        'static,
        Result<Response<trellis_proxy::traffic::Body>, trellis_proxy::traffic::UpstreamError>,
    > {
        Box::pin(async { Ok(Response::new(full(Bytes::new()))) })
    }
}

/// Nanoseconds per `dispatch` (request in, response body drained) with an in-memory upstream.
async fn overhead(svc: &OutboundService, n: u32) -> f64 {
    let d = Dispatcher::new(Arc::new(Immediate));
    d.update(&config(svc));
    let ctx = RequestCtx {
        original_dst: "127.0.0.1:9".parse().unwrap(),
        source_ip: "127.0.0.1".parse().unwrap(),
    };
    let start = Instant::now();
    for _ in 0..n {
        let req = Request::builder()
            .uri("/")
            .body(full(Bytes::new()))
            .unwrap();
        let resp = d.dispatch(svc, 80, req, &ctx).await;
        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
    }
    start.elapsed().as_nanos() as f64 / f64::from(n)
}

fn main() {
    let a = parse_args();
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let eps: Vec<SocketAddr> = (1..=3)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 8080)))
            .collect();
        let plain = service(&eps, LbAlgorithm::P2cEwma);
        let mut full_policy = service(&eps, LbAlgorithm::P2cEwma);
        if let Some(p) = full_policy.policy.as_mut() {
            p.retries = Some(Retries {
                attempts: 3,
                per_try_timeout_ms: Some(1000),
                retry_on: vec![RetryOn::GatewayError, RetryOn::ConnectFailure],
                status_codes: vec![],
                grpc_codes: vec![],
                backoff_base_ms: 25,
                backoff_max_ms: 250,
                budget_percent: 20.0,
                min_retries_per_second: 10,
                retry_non_idempotent: false,
            });
            p.timeouts.request_ms = Some(5000);
            p.circuit_breaker = Some(CircuitBreaker {
                max_requests: Some(10_000),
                ..Default::default()
            });
            p.outlier_detection = Some(OutlierDetection {
                consecutive_failures: 5,
                base_ejection_ms: 30_000,
                max_ejection_percent: 50,
            });
        }
        let n = 200_000;
        let (t_plain, t_full) = rt.block_on(async {
            overhead(&plain, n / 10).await; // warm-up
            (overhead(&plain, n).await, overhead(&full_policy, n).await)
        });
        println!(
            "dispatch overhead (in-memory upstream, {n} requests): P2C-EWMA no policy {:.0} ns/req; \
             with retries+budget+timeouts+circuit breaker+outlier detection {:.0} ns/req",
            t_plain, t_full
        );
    }
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("upstreams")
        .enable_all()
        .build()
        .unwrap();
    let fast1 = start_server(&servers, Duration::from_millis(a.fast_ms));
    let fast2 = start_server(&servers, Duration::from_millis(a.fast_ms));
    let slow = start_server(&servers, Duration::from_millis(a.slow_ms));
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("dispatcher")
        .enable_all()
        .build()
        .unwrap();
    let all = [fast1.0, fast2.0, slow.0];
    println!(
        "bench-lb: {} req/s open loop, {} s measured after {} s warm-up, fast {} ms x2, slow {} ms x1, {} round(s)",
        a.rate, a.secs, a.warmup_secs, a.fast_ms, a.slow_ms, a.rounds
    );
    let mut results: Vec<Result_> = Vec::new();
    for _ in 0..a.rounds {
        results.push(client.block_on(run_mode(
            "baseline (fast only)",
            &all[..2],
            slow.0,
            LbAlgorithm::RoundRobin,
            &a,
        )));
        results.push(client.block_on(run_mode(
            "round-robin",
            &all,
            slow.0,
            LbAlgorithm::RoundRobin,
            &a,
        )));
        results.push(client.block_on(run_mode(
            "least-request",
            &all,
            slow.0,
            LbAlgorithm::LeastRequest,
            &a,
        )));
        results.push(client.block_on(run_mode("p2c-ewma", &all, slow.0, LbAlgorithm::P2cEwma, &a)));
    }
    // Rounds interleave the modes so load from elsewhere on the machine hits all of them alike;
    // samples of one mode are pooled across rounds.
    let mut pooled: Vec<Result_> = Vec::new();
    for r in results {
        match pooled.iter_mut().find(|p| p.name == r.name) {
            Some(p) => {
                let n_old = p.lat_us.len() as f64;
                let n_new = r.lat_us.len() as f64;
                p.slow_share = (p.slow_share * n_old + r.slow_share * n_new) / (n_old + n_new);
                p.errors += r.errors;
                p.lat_us.extend(r.lat_us);
            }
            None => pooled.push(r),
        }
    }
    for p in &mut pooled {
        p.lat_us.sort_unstable();
    }
    let results = pooled;
    let base_p99 = results
        .iter()
        .filter(|r| r.name.starts_with("baseline"))
        .map(|r| pct(&r.lat_us, 0.99))
        .fold(f64::NAN, f64::min);
    println!();
    println!(
        "| mode | requests | errors | to slow | p50 ms | p99 ms | p99.9 ms | p99 / baseline p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &results {
        let p99 = pct(&r.lat_us, 0.99);
        println!(
            "| {} | {} | {} | {:.1} % | {:.2} | {:.2} | {:.2} | {:.2}x |",
            r.name,
            r.lat_us.len(),
            r.errors,
            r.slow_share * 100.0,
            pct(&r.lat_us, 0.50),
            p99,
            pct(&r.lat_us, 0.999),
            p99 / base_p99
        );
    }
    let p2c_p99 = results
        .iter()
        .filter(|r| r.name == "p2c-ewma")
        .map(|r| pct(&r.lat_us, 0.99))
        .fold(f64::NAN, f64::max);
    let ratio = p2c_p99 / base_p99;
    println!();
    println!(
        "goal: p2c-ewma p99 within 1.5x of the fast endpoints' p99: {ratio:.2}x -> {}",
        if ratio <= 1.5 { "met" } else { "NOT met" }
    );
}
