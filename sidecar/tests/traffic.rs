//! The traffic layer against real upstream servers that fail on command, through the real
//! `Dispatcher` and a real hyper client (`PlainUpstream`).

mod traffic_support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use traffic_support::*;
use trellis_proxy::config::*;
use trellis_proxy::traffic::{AttemptEventKind, Dispatcher, PlainUpstream, TrafficMetrics, full};

fn dispatcher() -> Dispatcher {
    Dispatcher::new(Arc::new(PlainUpstream::default()))
}

fn policy() -> TrafficPolicy {
    TrafficPolicy {
        source: "shop/test".into(),
        ..Default::default()
    }
}

/// A local port with nothing listening (its listener is dropped at once): connects are refused.
fn dead_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn post_hello() -> Request<trellis_proxy::traffic::Body> {
    Request::builder()
        .method("POST")
        .uri("/")
        .body(full("hello"))
        .unwrap()
}

fn with_lb(algorithm: LbAlgorithm) -> TrafficPolicy {
    TrafficPolicy {
        load_balancer: LoadBalancer {
            algorithm,
            hash_key: None,
        },
        ..policy()
    }
}

#[tokio::test]
async fn retries_go_to_another_endpoint_and_recover() {
    let bad = serve(|_| Reply::Status(503)).await;
    let good = serve(|_| Reply::Ok).await;
    let pol = TrafficPolicy {
        retries: Some(retries(2, &[RetryOn::GatewayError])),
        ..with_lb(LbAlgorithm::Random)
    };
    let svc = service(
        "reviews",
        &[bad.addr, good.addr],
        Protocol::Http1,
        Some(pol),
    );
    let d = dispatcher();
    d.update(&config(vec![svc.clone()]));
    let mut retried = 0;
    for _ in 0..200 {
        let a = send(&d, &svc, get()).await;
        assert_eq!(a.status, 200, "{:?}", a.outcome);
        assert_eq!(a.port(), good.addr.port());
        if a.outcome.attempts == 2 {
            retried += 1;
        }
    }
    // Random picks the bad endpoint first about half the time; its retry must avoid it.
    assert!((50..150).contains(&retried), "{retried}");
    assert_eq!(bad.hits(), retried);
}

#[tokio::test]
async fn flaky_endpoint_recovers_with_retries_and_metrics_count_them() {
    // Fails two requests out of three.
    let flaky = serve(|n| {
        if n % 3 == 2 {
            Reply::Ok
        } else {
            Reply::Status(502)
        }
    })
    .await;
    let pol = TrafficPolicy {
        retries: Some(retries(3, &[RetryOn::GatewayError])),
        ..policy()
    };
    let svc = service("flaky", &[flaky.addr], Protocol::Http1, Some(pol));
    let metrics = TrafficMetrics::new();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let d = Dispatcher::new_with_metrics(Arc::new(PlainUpstream::default()), metrics);
    d.update(&config(vec![svc.clone()]));
    for _ in 0..20 {
        let a = send(&d, &svc, get()).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.outcome.attempts, 3);
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("traffic_retries_total{backend=\"flaky.shop\"} 40"),
        "{text}"
    );
    assert!(text.contains("traffic_requests_total{backend=\"flaky.shop\"} 20"));
}

#[tokio::test]
async fn retry_budget_bounds_amplification_when_everything_fails() {
    let servers = [
        serve(|_| Reply::Status(503)).await,
        serve(|_| Reply::Status(503)).await,
        serve(|_| Reply::Status(503)).await,
    ];
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let r = Retries {
        budget_percent: 20.0,
        min_retries_per_second: 5,
        ..retries(5, &[RetryOn::ServerError])
    };
    let pol = TrafficPolicy {
        retries: Some(r),
        ..policy()
    };
    let svc = service("down", &addrs, Protocol::Http1, Some(pol));
    let d = dispatcher();
    d.update(&config(vec![svc.clone()]));
    let start = Instant::now();
    let n = 600u64;
    for _ in 0..n {
        let a = send(&d, &svc, get()).await;
        assert_eq!(a.status, 503);
    }
    let secs = start.elapsed().as_secs_f64();
    let hits: u64 = servers.iter().map(|s| s.hits()).sum();
    let amplification = hits as f64 / n as f64;
    // Without a budget, 5 attempts would give 5x. The bound: 1 + 20 % + 5/s over the run, plus
    // the one second of reserve the bucket starts with.
    let bound = 1.0 + 0.2 + 5.0 * (secs + 1.0) / n as f64;
    assert!(
        amplification <= bound,
        "amplification {amplification:.3} > bound {bound:.3} ({hits} hits, {secs:.2}s)"
    );
    assert!(amplification > 1.15, "retries happened: {amplification}");
}

#[tokio::test]
async fn failing_endpoint_is_ejected_and_comes_back() {
    let broken = Arc::new(AtomicBool::new(true));
    let b = broken.clone();
    let flaky = serve(move |_| {
        if b.load(Ordering::SeqCst) {
            Reply::Status(500)
        } else {
            Reply::Ok
        }
    })
    .await;
    let good1 = serve(|_| Reply::Ok).await;
    let good2 = serve(|_| Reply::Ok).await;
    let pol = TrafficPolicy {
        outlier_detection: Some(OutlierDetection {
            consecutive_failures: 3,
            base_ejection_ms: 1000,
            max_ejection_percent: 50,
        }),
        ..with_lb(LbAlgorithm::RoundRobin)
    };
    let svc = service(
        "outlier",
        &[flaky.addr, good1.addr, good2.addr],
        Protocol::Http1,
        Some(pol),
    );
    let d = dispatcher();
    d.update(&config(vec![svc.clone()]));
    // Round robin: the flaky endpoint gets every third request; after 3 failures it is out.
    for _ in 0..9 {
        send(&d, &svc, get()).await;
    }
    assert_eq!(flaky.hits(), 3);
    let stats = d.endpoint_stats("shop", "outlier", 80);
    assert!(stats.iter().find(|s| s.addr == flaky.addr).unwrap().ejected);
    for _ in 0..30 {
        let a = send(&d, &svc, get()).await;
        assert_eq!(a.status, 200);
    }
    assert_eq!(flaky.hits(), 3, "no traffic while ejected");
    // Heal it; after the ejection runs out a probe brings it back.
    broken.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1050)).await;
    for _ in 0..30 {
        assert_eq!(send(&d, &svc, get()).await.status, 200);
    }
    assert!(flaky.hits() >= 10, "back in rotation: {}", flaky.hits());
    let stats = d.endpoint_stats("shop", "outlier", 80);
    assert!(stats.iter().all(|s| !s.ejected));
}

#[tokio::test]
async fn ejection_doubles_and_a_failed_probe_re_ejects() {
    let bad = serve(|_| Reply::Status(503)).await;
    let good = serve(|_| Reply::Ok).await;
    let pol = TrafficPolicy {
        outlier_detection: Some(OutlierDetection {
            consecutive_failures: 2,
            base_ejection_ms: 400,
            max_ejection_percent: 50,
        }),
        ..with_lb(LbAlgorithm::RoundRobin)
    };
    let svc = service("double", &[bad.addr, good.addr], Protocol::Http1, Some(pol));
    let d = dispatcher();
    d.update(&config(vec![svc.clone()]));
    for _ in 0..4 {
        send(&d, &svc, get()).await;
    }
    assert_eq!(bad.hits(), 2);
    // First ejection: 400 ms. After it, one failed probe re-ejects for 800 ms.
    tokio::time::sleep(Duration::from_millis(450)).await;
    for _ in 0..10 {
        send(&d, &svc, get()).await;
    }
    assert_eq!(bad.hits(), 3, "exactly one probe");
    let st = d.endpoint_stats("shop", "double", 80);
    let b = st.iter().find(|s| s.addr == bad.addr).unwrap();
    assert!(b.ejected);
    assert_eq!(b.ejections, 2);
    tokio::time::sleep(Duration::from_millis(450)).await;
    for _ in 0..10 {
        send(&d, &svc, get()).await;
    }
    assert_eq!(bad.hits(), 3, "second ejection lasts twice as long");
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..10 {
        send(&d, &svc, get()).await;
    }
    assert_eq!(bad.hits(), 4, "probed again after 800 ms");
}

#[tokio::test]
async fn max_ejection_percent_holds() {
    let mut servers = Vec::new();
    for _ in 0..4 {
        servers.push(serve(|_| Reply::Status(500)).await);
    }
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let pol = TrafficPolicy {
        outlier_detection: Some(OutlierDetection {
            consecutive_failures: 1,
            base_ejection_ms: 10_000,
            max_ejection_percent: 50,
        }),
        ..policy()
    };
    let svc = service("allbad", &addrs, Protocol::Http1, Some(pol));
    let d = dispatcher();
    d.update(&config(vec![svc.clone()]));
    for _ in 0..100 {
        send(&d, &svc, get()).await;
    }
    let ejected = d
        .endpoint_stats("shop", "allbad", 80)
        .iter()
        .filter(|s| s.ejected)
        .count();
    assert_eq!(ejected, 2, "50% of 4");
}

#[tokio::test]
async fn circuit_breaker_sheds_with_503_without_queueing() {
    let slow = serve(|_| Reply::Delay(Duration::from_millis(600))).await;
    let pol = TrafficPolicy {
        circuit_breaker: Some(CircuitBreaker {
            max_connections: None,
            max_pending_requests: None,
            max_requests: Some(3),
        }),
        ..policy()
    };
    let svc = service("limited", &[slow.addr], Protocol::Http1, Some(pol));
    let d = Arc::new(dispatcher());
    d.update(&config(vec![svc.clone()]));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (d, svc) = (d.clone(), svc.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let a = send(&d, &svc, get()).await;
            (a, t.elapsed())
        }));
    }
    let mut ok = 0;
    let mut shed = 0;
    for t in tasks {
        let (a, took) = t.await.unwrap();
        match a.status.as_u16() {
            200 => ok += 1,
            503 => {
                assert_eq!(a.outcome.flags, vec!["UO"]);
                assert!(took < Duration::from_millis(300), "shed fast: {took:?}");
                shed += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!((ok, shed), (3, 7));
    assert_eq!(slow.hits(), 3);
    // Slots are released when responses finish.
    assert_eq!(send(&d, &svc, get()).await.status, 200);
}

#[tokio::test]
async fn rate_limit_answers_429_at_the_configured_rate() {
    let s = serve(|_| Reply::Ok).await;
    let pol = TrafficPolicy {
        rate_limit: Some(RateLimit {
            requests_per_second: 100.0,
            // A burst above 1 keeps a scheduling gap of a few ms (2 shared cores) from wasting
            // tokens; it is part of the expected count below.
            burst: 10,
        }),
        ..policy()
    };
    let svc = service("rl", &[s.addr], Protocol::Http1, Some(pol));
    let d = Arc::new(dispatcher());
    d.update(&config(vec![svc.clone()]));
    let run = Duration::from_millis(1500);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (d, svc) = (d.clone(), svc.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut limited) = (0u64, 0u64);
            while start.elapsed() < run {
                let a = send(&d, &svc, get()).await;
                if a.status == 429 {
                    assert_eq!(a.outcome.flags, vec!["RL"]);
                    assert_eq!(a.headers["retry-after"], "1");
                    limited += 1;
                } else {
                    assert_eq!(a.status, 200);
                    ok += 1;
                }
            }
            (ok, limited)
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        let (o, l) = t.await.unwrap();
        ok += o;
        limited += l;
    }
    let secs = start.elapsed().as_secs_f64();
    let expected = 10.0 + 100.0 * secs;
    let ratio = ok as f64 / expected;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "{ok} admitted in {secs:.2}s, expected {expected:.0} (burst 10 + 100/s)"
    );
    assert!(limited > ok, "load exceeded the limit: {limited}");
    assert_eq!(s.hits(), ok);
}

#[tokio::test]
async fn split_90_10_over_10000_requests() {
    let v1 = serve(|_| Reply::Ok).await;
    let v2 = serve(|_| Reply::Ok).await;
    let pol = TrafficPolicy {
        split: vec![
            WeightedBackend {
                service: "reviews.shop".into(),
                weight: 90,
            },
            WeightedBackend {
                service: "reviews-v2.shop".into(),
                weight: 10,
            },
        ],
        ..policy()
    };
    let main = service("reviews", &[v1.addr], Protocol::Http1, Some(pol));
    let canary = service("reviews-v2", &[v2.addr], Protocol::Http1, None);
    let d = Arc::new(dispatcher());
    d.update(&config(vec![main.clone(), canary]));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (d, main) = (d.clone(), main.clone());
        tasks.push(tokio::spawn(async move {
            let mut by_backend: HashMap<String, u64> = HashMap::new();
            for _ in 0..1250 {
                let a = send(&d, &main, get()).await;
                assert_eq!(a.status, 200);
                *by_backend.entry(a.outcome.backend.to_string()).or_default() += 1;
            }
            by_backend
        }));
    }
    let mut total: HashMap<String, u64> = HashMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *total.entry(k).or_default() += v;
        }
    }
    let canary_share = v2.hits() as f64 / 10_000.0;
    assert!(
        (0.07..=0.13).contains(&canary_share),
        "canary share {canary_share}"
    );
    assert_eq!(total["reviews-v2.shop"], v2.hits());
    assert_eq!(total["reviews.shop"], v1.hits());
    assert_eq!(v1.hits() + v2.hits(), 10_000);
}

#[tokio::test]
async fn consistent_hash_keeps_keys_and_moves_about_one_nth() {
    let mut servers = Vec::new();
    for _ in 0..6 {
        servers.push(serve(|_| Reply::Ok).await);
    }
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let pol = TrafficPolicy {
        load_balancer: LoadBalancer {
            algorithm: LbAlgorithm::ConsistentHash,
            hash_key: Some(HashKey::Header("x-user".into())),
        },
        ..policy()
    };
    let five = service("hash", &addrs[..5], Protocol::Http1, Some(pol.clone()));
    let six = service("hash", &addrs, Protocol::Http1, Some(pol));
    let d = dispatcher();
    d.update(&config(vec![five.clone()]));
    let req = |k: u32| {
        Request::builder()
            .uri("/")
            .header("x-user", format!("user-{k}"))
            .body(full(Bytes::new()))
            .unwrap()
    };
    let keys = 600u32;
    let mut before = HashMap::new();
    for k in 0..keys {
        let p = send(&d, &five, req(k)).await.port();
        assert_eq!(send(&d, &five, req(k)).await.port(), p, "key {k} is stable");
        before.insert(k, p);
    }
    d.update(&config(vec![six.clone()]));
    let new_port = addrs[5].port();
    let mut moved = 0;
    for k in 0..keys {
        let p = send(&d, &six, req(k)).await.port();
        if p != before[&k] {
            assert_eq!(p, new_port, "keys only move to the added endpoint");
            moved += 1;
        }
    }
    let frac = moved as f64 / keys as f64;
    assert!((0.08..=0.28).contains(&frac), "moved {frac} (ideal 1/6)");
    // Source IP keys: the same client always lands on the same endpoint.
    let pol_ip = TrafficPolicy {
        load_balancer: LoadBalancer {
            algorithm: LbAlgorithm::ConsistentHash,
            hash_key: Some(HashKey::SourceIp),
        },
        ..policy()
    };
    let by_ip = service("byip", &addrs, Protocol::Http1, Some(pol_ip));
    d.update(&config(vec![by_ip.clone()]));
    let mut seen = HashSet::new();
    let mut ctx = ctx();
    for _ in 0..20 {
        seen.insert(send_ctx(&d, &by_ip, get(), &ctx).await.port());
    }
    assert_eq!(seen.len(), 1);
    let mut spread = HashSet::new();
    for i in 0..60u8 {
        ctx.source_ip = std::net::IpAddr::from([10, 1, 2, i]);
        spread.insert(send_ctx(&d, &by_ip, get(), &ctx).await.port());
    }
    assert!(spread.len() >= 4, "different clients spread: {spread:?}");
}

#[tokio::test]
async fn consistent_hash_cookie_falls_over_to_next_endpoint_when_ejected() {
    let broken = Arc::new(AtomicBool::new(false));
    let b = broken.clone();
    let servers = [serve(move |_| {
        if b.load(Ordering::SeqCst) {
            Reply::Status(500)
        } else {
            Reply::Ok
        }
    })
    .await];
    let healthy = [
        serve(|_| Reply::Ok).await,
        serve(|_| Reply::Ok).await,
        serve(|_| Reply::Ok).await,
    ];
    let addrs = vec![
        servers[0].addr,
        healthy[0].addr,
        healthy[1].addr,
        healthy[2].addr,
    ];
    let pol = TrafficPolicy {
        load_balancer: LoadBalancer {
            algorithm: LbAlgorithm::ConsistentHash,
            hash_key: Some(HashKey::Cookie("session".into())),
        },
        outlier_detection: Some(OutlierDetection {
            consecutive_failures: 1,
            base_ejection_ms: 10_000,
            max_ejection_percent: 50,
        }),
        ..policy()
    };
    let svc = service("sticky", &addrs, Protocol::Http1, Some(pol));
    let d = dispatcher();
    d.update(&config(vec![svc.clone()]));
    let req = |k: u32| {
        Request::builder()
            .uri("/")
            .header("cookie", format!("theme=dark; session=s{k}"))
            .body(full(Bytes::new()))
            .unwrap()
    };
    // Find a key that lands on the soon-to-fail endpoint.
    let mut key = None;
    for k in 0..200 {
        if send(&d, &svc, req(k)).await.port() == servers[0].addr.port() {
            key = Some(k);
            break;
        }
    }
    let key = key.expect("some key maps to endpoint 0");
    broken.store(true, Ordering::SeqCst);
    assert_eq!(send(&d, &svc, req(key)).await.status, 500);
    // Ejected now: the key falls over to one fixed next endpoint.
    let next = send(&d, &svc, req(key)).await.port();
    assert_ne!(next, servers[0].addr.port());
    for _ in 0..10 {
        assert_eq!(send(&d, &svc, req(key)).await.port(), next);
    }
}

#[tokio::test]
async fn grpc_retries_unavailable_but_not_invalid_argument() {
    let unavailable_once = serve(|n| {
        if n == 0 {
            Reply::Grpc(14)
        } else {
            Reply::Grpc(0)
        }
    })
    .await;
    let invalid = serve(|_| Reply::Grpc(3)).await;
    let r = Retries {
        grpc_codes: vec![14],
        ..retries(3, &[RetryOn::GrpcStatus])
    };
    let pol = TrafficPolicy {
        retries: Some(r),
        ..policy()
    };
    let grpc_req = || {
        Request::builder()
            .method("POST")
            .uri("/pkg.Svc/Method")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(full(Bytes::from_static(b"\0\0\0\0\x02hi")))
            .unwrap()
    };
    let d = dispatcher();
    let a_svc = service(
        "grpc-a",
        &[unavailable_once.addr],
        Protocol::Grpc,
        Some(pol.clone()),
    );
    let b_svc = service("grpc-b", &[invalid.addr], Protocol::Grpc, Some(pol));
    d.update(&config(vec![a_svc.clone(), b_svc.clone()]));
    let a = send(&d, &a_svc, grpc_req()).await;
    assert_eq!(a.headers["grpc-status"], "0");
    assert_eq!(a.outcome.attempts, 2);
    assert_eq!(unavailable_once.hits(), 2);
    let b = send(&d, &b_svc, grpc_req()).await;
    assert_eq!(b.headers["grpc-status"], "3");
    assert_eq!(b.outcome.attempts, 1);
    assert_eq!(invalid.hits(), 1);
}

#[tokio::test]
async fn streaming_response_is_not_retried_after_the_first_byte() {
    let s = serve(|_| Reply::StreamThenAbort).await;
    let pol = TrafficPolicy {
        retries: Some(retries(3, &[RetryOn::Reset, RetryOn::ServerError])),
        ..policy()
    };
    for protocol in [Protocol::Http1, Protocol::Grpc] {
        let svc = service("stream", &[s.addr], protocol, Some(pol.clone()));
        let d = dispatcher();
        d.update(&config(vec![svc.clone()]));
        let before = s.hits();
        let a = send(&d, &svc, get()).await;
        assert_eq!(a.status, 200);
        assert!(a.body.is_err(), "the client sees the stream fail");
        assert_eq!(a.outcome.attempts, 1);
        assert_eq!(s.hits() - before, 1, "{protocol:?}: not retried");
    }
}

#[tokio::test]
async fn request_timeout_answers_504_ut_and_per_try_timeout_retries_elsewhere() {
    let slow = serve(|_| Reply::Delay(Duration::from_millis(600))).await;
    let fast = serve(|_| Reply::Ok).await;
    let pol = TrafficPolicy {
        timeouts: Timeouts {
            request_ms: Some(150),
            ..Default::default()
        },
        ..policy()
    };
    let svc = service("slow", &[slow.addr], Protocol::Http1, Some(pol));
    let d = dispatcher();
    d.update(&config(vec![svc.clone()]));
    let t = Instant::now();
    let a = send(&d, &svc, get()).await;
    assert_eq!(a.status, 504);
    assert_eq!(a.outcome.flags, vec!["UT"]);
    assert!(
        t.elapsed() < Duration::from_millis(450),
        "{:?}",
        t.elapsed()
    );

    let r = Retries {
        per_try_timeout_ms: Some(100),
        ..retries(2, &[RetryOn::GatewayError])
    };
    let pol = TrafficPolicy {
        retries: Some(r),
        ..with_lb(LbAlgorithm::RoundRobin)
    };
    let svc = service("mixed", &[slow.addr, fast.addr], Protocol::Http1, Some(pol));
    d.update(&config(vec![svc.clone()]));
    for _ in 0..4 {
        let t = Instant::now();
        let a = send(&d, &svc, get()).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.port(), fast.addr.port());
        assert!(t.elapsed() < Duration::from_millis(400));
    }
}

#[tokio::test]
async fn with_a_per_try_timeout_a_failed_connect_is_still_a_connect_failure() {
    let dead = dead_port();
    let echo = serve(|_| Reply::Ok).await;
    let r = Retries {
        per_try_timeout_ms: Some(2_000),
        ..retries(2, &[RetryOn::ConnectFailure])
    };
    let pol = TrafficPolicy {
        retries: Some(r),
        ..with_lb(LbAlgorithm::RoundRobin)
    };
    let svc = service("cf", &[dead, echo.addr], Protocol::Http1, Some(pol.clone()));
    let only_dead = service("dead", &[dead], Protocol::Http1, Some(pol));
    let d = dispatcher();
    d.update(&config(vec![svc.clone(), only_dead.clone()]));
    for _ in 0..4 {
        let a = send(&d, &svc, post_hello()).await;
        assert_eq!(a.status, 200, "{:?}", a.outcome);
        assert!(
            !a.outcome
                .events
                .iter()
                .any(|e| matches!(e.kind, AttemptEventKind::PerTryTimeout { .. })),
            "no timeout: {:?}",
            a.outcome
        );
    }
    let a = send(&d, &only_dead, get()).await;
    assert_eq!(a.status, 503, "{:?}", a.outcome);
    assert_eq!(a.outcome.flags, vec!["URX", "UF"]);
}

#[tokio::test]
async fn connect_failures_retry_even_for_post_but_5xx_does_not() {
    let dead = dead_port();
    let echo = serve(|_| Reply::Ok).await;
    let failing = serve(|_| Reply::Status(503)).await;
    let pol = TrafficPolicy {
        retries: Some(retries(
            2,
            &[RetryOn::ConnectFailure, RetryOn::GatewayError],
        )),
        ..with_lb(LbAlgorithm::RoundRobin)
    };
    let d = dispatcher();
    let svc = service("cf", &[dead, echo.addr], Protocol::Http1, Some(pol.clone()));
    let only_dead = service("dead", &[dead], Protocol::Http1, None);
    let no_retry_post = service("fail", &[failing.addr], Protocol::Http1, Some(pol.clone()));
    d.update(&config(vec![
        svc.clone(),
        only_dead.clone(),
        no_retry_post.clone(),
    ]));
    for _ in 0..4 {
        let a = send(&d, &svc, post_hello()).await;
        assert_eq!(a.status, 200);
        assert_eq!(
            a.body.as_ref().unwrap(),
            &format!("{}:5", echo.addr.port()),
            "the body is replayed in full"
        );
    }
    let a = send(&d, &only_dead, get()).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.outcome.flags, vec!["UF"]);
    let a = send(&d, &no_retry_post, post_hello()).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.outcome.attempts, 1, "POST is not retried on 503");
    assert_eq!(failing.hits(), 1);
}

#[tokio::test]
async fn large_bodies_are_streamed_and_not_retried() {
    let s = serve(|_| Reply::Status(503)).await;
    let pol = TrafficPolicy {
        retries: Some(Retries {
            retry_non_idempotent: true,
            ..retries(3, &[RetryOn::GatewayError])
        }),
        ..policy()
    };
    let svc = service("big", &[s.addr], Protocol::Http1, Some(pol));
    let d = dispatcher();
    d.update(&config(vec![svc.clone()]));
    let small = Request::post("/").body(full(vec![b'x'; 1000])).unwrap();
    assert_eq!(send(&d, &svc, small).await.outcome.attempts, 3);
    let big = Request::post("/")
        .body(full(vec![b'x'; 100 * 1024]))
        .unwrap();
    let a = send(&d, &svc, big).await;
    assert_eq!(a.outcome.attempts, 1);
    assert_eq!(a.body.unwrap(), format!("{}:{}", s.addr.port(), 100 * 1024));
}

#[tokio::test]
async fn reload_keeps_in_flight_requests_and_endpoint_state() {
    let old = serve(|_| Reply::Delay(Duration::from_millis(300))).await;
    let kept = serve(|_| Reply::Ok).await;
    let added = serve(|_| Reply::Ok).await;
    let d = Arc::new(dispatcher());
    let v1 = service(
        "rolling",
        &[old.addr, kept.addr],
        Protocol::Http1,
        Some(with_lb(LbAlgorithm::RoundRobin)),
    );
    d.update(&config(vec![v1.clone()]));
    // Warm the kept endpoint's EWMA.
    for _ in 0..4 {
        send(&d, &v1, get()).await;
    }
    let kept_rtt = d
        .endpoint_stats("shop", "rolling", 80)
        .iter()
        .find(|s| s.addr == kept.addr)
        .unwrap()
        .rtt_estimate;
    // A request in flight to the endpoint about to be removed.
    let inflight = {
        let (d, v1) = (d.clone(), v1.clone());
        tokio::spawn(async move {
            loop {
                let a = send(&d, &v1, get()).await;
                if a.port() == old.addr.port() {
                    return a;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let v2 = service(
        "rolling",
        &[kept.addr, added.addr],
        Protocol::Http1,
        Some(with_lb(LbAlgorithm::RoundRobin)),
    );
    d.update(&config(vec![v2.clone()]));
    let a = inflight.await.unwrap();
    assert_eq!(
        a.status, 200,
        "the in-flight request on a removed endpoint drains"
    );
    let stats = d.endpoint_stats("shop", "rolling", 80);
    assert_eq!(stats.len(), 2);
    let k = stats.iter().find(|s| s.addr == kept.addr).unwrap();
    assert!(
        kept_rtt > Duration::ZERO && k.rtt_estimate > Duration::ZERO,
        "kept endpoint keeps its EWMA ({:?}, was {kept_rtt:?}); a fresh state is unmeasured",
        k.rtt_estimate
    );
    let a = stats.iter().find(|s| s.addr == added.addr).unwrap();
    assert_eq!(
        a.rtt_estimate,
        Duration::ZERO,
        "the added endpoint starts unmeasured"
    );
    let before_old = old.hits.load(Ordering::SeqCst);
    let mut ports = HashSet::new();
    for _ in 0..10 {
        ports.insert(send(&d, &v2, get()).await.port());
    }
    assert_eq!(ports, HashSet::from([kept.addr.port(), added.addr.port()]));
    assert_eq!(old.hits.load(Ordering::SeqCst), before_old);
}

#[tokio::test]
async fn no_endpoints_means_original_destination() {
    let s = serve(|_| Reply::Ok).await;
    let svc = service("clusterip", &[], Protocol::Http1, None);
    let d = dispatcher();
    d.update(&config(vec![svc.clone()]));
    let mut c = ctx();
    c.original_dst = s.addr;
    let a = send_ctx(&d, &svc, get(), &c).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.outcome.endpoint, Some(s.addr));
    assert_eq!(&*a.outcome.backend, "clusterip.shop");
}

#[tokio::test]
async fn p2c_ewma_prefers_the_fast_endpoint_and_least_request_balances_load() {
    let slow = serve(|_| Reply::Delay(Duration::from_millis(50))).await;
    let fast1 = serve(|_| Reply::Ok).await;
    let fast2 = serve(|_| Reply::Ok).await;
    let addrs = [slow.addr, fast1.addr, fast2.addr];
    let svc = service("p2c", &addrs, Protocol::Http1, None);
    let d = dispatcher();
    d.update(&config(vec![svc.clone()]));
    for _ in 0..300 {
        assert_eq!(send(&d, &svc, get()).await.status, 200);
    }
    // Round robin would give the slow one 100; peak EWMA learns it is slow.
    assert!(slow.hits() < 30, "slow endpoint got {}", slow.hits());

    let lr = service(
        "lr",
        &addrs[1..],
        Protocol::Http1,
        Some(with_lb(LbAlgorithm::LeastRequest)),
    );
    d.update(&config(vec![lr.clone()]));
    let (b1, b2) = (fast1.hits(), fast2.hits());
    for _ in 0..200 {
        send(&d, &lr, get()).await;
    }
    let (n1, n2) = (fast1.hits() - b1, fast2.hits() - b2);
    assert_eq!(n1 + n2, 200);
    assert!(n1 > 40 && n2 > 40, "both used: {n1} {n2}");
}

#[tokio::test]
async fn pending_and_connection_limits_shed_and_are_counted_by_limit() {
    let slow = serve(|_| Reply::Delay(Duration::from_millis(300))).await;
    let cb = |pending, conns| TrafficPolicy {
        circuit_breaker: Some(CircuitBreaker {
            max_connections: conns,
            max_pending_requests: pending,
            max_requests: None,
        }),
        ..policy()
    };
    let by_pending = service(
        "pend",
        &[slow.addr],
        Protocol::Http1,
        Some(cb(Some(2), None)),
    );
    let by_conns = service(
        "conns",
        &[slow.addr],
        Protocol::Http1,
        Some(cb(None, Some(4))),
    );
    let metrics = TrafficMetrics::new();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let d = Arc::new(Dispatcher::new_with_metrics(
        Arc::new(PlainUpstream::default()),
        metrics,
    ));
    d.update(&config(vec![by_pending.clone(), by_conns.clone()]));
    for (svc, admitted) in [(&by_pending, 2), (&by_conns, 4)] {
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (d, svc) = (d.clone(), svc.clone());
            tasks.push(tokio::spawn(async move { send(&d, &svc, get()).await }));
        }
        let mut ok = 0;
        for t in tasks {
            let a = t.await.unwrap();
            if a.status == 200 {
                ok += 1;
            } else {
                assert_eq!((a.status.as_u16(), a.outcome.flags), (503, vec!["UO"]));
            }
        }
        assert_eq!(ok, admitted, "{}", svc.name);
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("traffic_overflow_total{backend=\"pend.shop\",limit=\"pending\"} 8"),
        "{text}"
    );
    assert!(
        text.contains("traffic_overflow_total{backend=\"conns.shop\",limit=\"connections\"} 6")
    );
}

#[tokio::test]
async fn exhausted_retries_are_flagged_urx() {
    let s = serve(|_| Reply::Status(503)).await;
    let pol = TrafficPolicy {
        retries: Some(retries(3, &[RetryOn::RetriableStatusCodes])),
        ..policy()
    };
    let mut with_codes = pol.clone();
    with_codes.retries.as_mut().unwrap().status_codes = vec![503];
    let svc = service("urx", &[s.addr], Protocol::Http1, Some(with_codes));
    let d = dispatcher();
    d.update(&config(vec![svc.clone()]));
    let a = send(&d, &svc, get()).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.outcome.attempts, 3);
    assert_eq!(a.outcome.flags, vec!["URX"]);
    assert_eq!(s.hits(), 3);
}

/// A push-style discovery source: its view changes without a config reload.
struct Pushed(std::sync::Mutex<Vec<std::net::SocketAddr>>);

impl trellis_proxy::traffic::Discover for Pushed {
    fn endpoints(&self, _svc: &OutboundService, _port: &ServicePort) -> Vec<Endpoint> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .copied()
            .map(endpoint)
            .collect()
    }
}

#[tokio::test]
async fn discovery_source_changes_apply_without_a_reload() {
    let first = serve(|_| Reply::Ok).await;
    let second = serve(|_| Reply::Ok).await;
    let source = Arc::new(Pushed(std::sync::Mutex::new(vec![first.addr])));
    let d = Dispatcher::with_parts(
        Arc::new(PlainUpstream::default()),
        source.clone(),
        TrafficMetrics::new(),
    );
    // The config lists no endpoints; discovery supplies them.
    let svc = service("pushed", &[], Protocol::Http1, None);
    d.update(&config(vec![svc.clone()]));
    assert_eq!(send(&d, &svc, get()).await.port(), first.addr.port());
    *source.0.lock().unwrap() = vec![second.addr];
    d.refresh_endpoints();
    for _ in 0..5 {
        assert_eq!(send(&d, &svc, get()).await.port(), second.addr.port());
    }
    assert_eq!(first.hits(), 1);
}
