//! Load-balancing benchmark: P2C over a peak-sensitive EWMA versus round robin and least
//! request, with one slow endpoint.
//!
//! Three real HTTP/1.1 upstreams on 127.0.0.1 (two answer after the fast delay, one after the
//! slow one, 10x slower), driven through the real `Dispatcher` and the plaintext hyper
//! `Upstream` at a fixed request rate (open loop: latency is measured from the scheduled send
//! time, so a stalled generator cannot hide queueing). Scenarios: 1 ms / 10 ms and 5 ms / 50 ms
//! (or the one `--fast-ms`/`--slow-ms` name). Modes, interleaved in every round, each with a
//! fresh balancer (as after a proxy start):
//!
//! - `baseline`: only the two fast endpoints (round robin): what the fast endpoints deliver.
//! - `round-robin` and `least-request` and `p2c-ewma`: all three endpoints.
//!
//! Run: `hack/bench-lb.sh` (release build; not part of CI; `--trace` shows what the balancer saw
//! at each pick of the slow endpoint). Goal: in every round, p2c-ewma p99 within 1.5x of that
//! round's baseline p99, and the share sent to the slow endpoint reported.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use trellis_proxy::config::*;
use trellis_proxy::traffic::{Dispatcher, PlainUpstream, RequestCtx, full};

struct Args {
    rate: u64,
    secs: u64,
    warmup_secs: u64,
    /// (fast ms, slow ms) pairs to run.
    scenarios: Vec<(u64, u64)>,
    rounds: u32,
    /// Print, for every measured P2C-EWMA request sent to the slow endpoint, what the balancer
    /// saw just before it picked: each endpoint's latency estimate and requests in flight.
    trace: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        rate: 1000,
        secs: 10,
        warmup_secs: 2,
        scenarios: vec![(1, 10), (5, 50)],
        rounds: 3,
        trace: false,
    };
    let (mut fast, mut slow) = (None, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--trace" {
            a.trace = true;
            continue;
        }
        let v: u64 = it
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{flag} needs a number"));
        match flag.as_str() {
            "--rate" => a.rate = v,
            "--secs" => a.secs = v,
            "--warmup-secs" => a.warmup_secs = v,
            "--fast-ms" => fast = Some(v),
            "--slow-ms" => slow = Some(v),
            "--rounds" => a.rounds = v as u32,
            other => panic!(
                "unknown flag {other} \
                 (--rate --secs --warmup-secs --fast-ms --slow-ms --rounds --trace)"
            ),
        }
    }
    match (fast, slow) {
        (None, None) => {}
        (f, s) => {
            let f = f.unwrap_or(1);
            a.scenarios = vec![(f, s.unwrap_or(f * 10))];
        }
    }
    a
}

/// An upstream that answers after `delay` (slept on a blocking thread, so it is `delay` to the
/// tens of microseconds), on its own runtime thread so server work does not share the
/// generator's scheduler.
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
                        // A thread's sleep, not tokio's: tokio's timer wheel has 1 ms ticks,
                        // which made the "1 ms" endpoint answer in 1-2 ms and shrank the
                        // 10x difference the bench is about.
                        let _ =
                            tokio::task::spawn_blocking(move || std::thread::sleep(delay)).await;
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
    let trace = a.trace && algorithm == LbAlgorithm::P2cEwma;
    let rate = a.rate;
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
            let seen = (trace && i >= warm).then(|| d.endpoint_stats("default", "bench", 80));
            let (resp, outcome) = d.dispatch(&svc, 80, req, &ctx).await;
            let ok = resp.status() == 200;
            let to_slow = outcome.endpoint == Some(slow);
            if let (true, Some(seen)) = (to_slow, seen) {
                let view: Vec<String> = seen
                    .iter()
                    .map(|e| {
                        let ms = e.rtt_estimate.as_secs_f64() * 1e3;
                        format!(
                            "{}{ms:.2} ms/{}",
                            if e.addr == slow { "slow " } else { "" },
                            e.inflight
                        )
                    })
                    .collect();
                eprintln!(
                    "  to slow at {:.3} s; estimate/in flight: {}",
                    i as f64 / rate as f64,
                    view.join(", ")
                );
            }
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
        Result<trellis_proxy::traffic::Reply, trellis_proxy::traffic::UpstreamError>,
    > {
        Box::pin(async {
            Ok(trellis_proxy::traffic::Reply::plain(Response::new(full(
                Bytes::new(),
            ))))
        })
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
        let (resp, _) = d.dispatch(svc, 80, req, &ctx).await;
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
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("dispatcher")
        .enable_all()
        .build()
        .unwrap();
    println!(
        "bench-lb: {} req/s open loop, {} s measured after {} s warm-up, {} round(s) per scenario",
        a.rate, a.secs, a.warmup_secs, a.rounds
    );
    let mut all_met = true;
    for &(fast_ms, slow_ms) in &a.scenarios {
        all_met &= scenario(&servers, &client, &a, fast_ms, slow_ms);
    }
    println!();
    println!(
        "goal (p2c-ewma p99 <= 1.5x the fast endpoints' p99 in every round of every scenario): {}",
        if all_met { "met" } else { "NOT met" }
    );
}

/// One scenario: per round, the four modes interleaved (load from elsewhere on the machine hits
/// them alike); prints one table row per round and mode, then the per-round verdict. Returns
/// whether every round met the goal.
fn scenario(
    servers: &tokio::runtime::Runtime,
    client: &tokio::runtime::Runtime,
    a: &Args,
    fast_ms: u64,
    slow_ms: u64,
) -> bool {
    let fast1 = start_server(servers, Duration::from_millis(fast_ms));
    let fast2 = start_server(servers, Duration::from_millis(fast_ms));
    let slow = start_server(servers, Duration::from_millis(slow_ms));
    let all = [fast1.0, fast2.0, slow.0];
    println!();
    println!("### fast {fast_ms} ms x2, slow {slow_ms} ms x1");
    println!();
    println!(
        "| round | mode | requests | errors | to slow | p50 ms | p99 ms | p99.9 ms | p99 / fast p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let modes = [
        ("baseline (fast only)", LbAlgorithm::RoundRobin),
        ("round-robin", LbAlgorithm::RoundRobin),
        ("least-request", LbAlgorithm::LeastRequest),
        ("p2c-ewma", LbAlgorithm::P2cEwma),
    ];
    let mut verdicts = Vec::new();
    for round in 1..=a.rounds {
        let mut base_p99 = f64::NAN;
        let mut p2c = (f64::NAN, f64::NAN);
        for (name, algo) in modes {
            let eps = if name.starts_with("baseline") {
                &all[..2]
            } else {
                &all[..]
            };
            let r = client.block_on(run_mode(name, eps, slow.0, algo, a));
            let p99 = pct(&r.lat_us, 0.99);
            if name.starts_with("baseline") {
                base_p99 = p99;
            }
            println!(
                "| {round} | {} | {} | {} | {:.2} % | {:.2} | {:.2} | {:.2} | {:.2}x |",
                r.name,
                r.lat_us.len(),
                r.errors,
                r.slow_share * 100.0,
                pct(&r.lat_us, 0.50),
                p99,
                pct(&r.lat_us, 0.999),
                p99 / base_p99
            );
            if algo == LbAlgorithm::P2cEwma {
                p2c = (p99 / base_p99, r.slow_share);
            }
        }
        verdicts.push(p2c);
    }
    println!();
    let mut met = true;
    for (i, (ratio, share)) in verdicts.iter().enumerate() {
        let ok = *ratio <= 1.5;
        met &= ok;
        println!(
            "round {}: p2c-ewma p99 / fast p99 = {ratio:.2}x ({}), {:.2} % to the slow endpoint",
            i + 1,
            if ok { "met" } else { "NOT met" },
            share * 100.0
        );
    }
    met
}
