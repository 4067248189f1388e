//! Config bounds: values that cannot be represented are refused by validation with a message
//! naming the field, and no config value (valid or not) makes the traffic layer panic.
//!
//! The traffic layer is exercised with extreme values on purpose even when validation refuses
//! them: validation is the first line, the constructors must still not panic (a bug in one
//! must not turn into a crash while a lock is held).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use trellis_proxy::config::{
    CONFIG_VERSION, CircuitBreaker, Endpoint, LbAlgorithm, LoadBalancer, MeshSettings,
    OutboundService, OutlierDetection, Protocol, ProxyConfig, RateLimit, Retries, RetryOn,
    ServicePort, Telemetry, Timeouts, TrafficPolicy, WeightedBackend,
};
use trellis_proxy::traffic::{
    Dispatcher, InboundRateLimiter, PlainUpstream, RequestCtx, RetryBudget, TokenBucket,
};

fn config(policy: TrafficPolicy) -> ProxyConfig {
    let svc = |name: &str, policy: Option<TrafficPolicy>| OutboundService {
        name: name.into(),
        namespace: "shop".into(),
        addresses: vec!["10.96.0.10".parse().unwrap()],
        ports: vec![ServicePort {
            port: 80,
            name: None,
            protocol: Protocol::Tcp,
            endpoints: vec![
                Endpoint {
                    address: "127.0.0.1:1".parse().unwrap(),
                    identity: None,
                    zone: None,
                },
                Endpoint {
                    address: "127.0.0.1:2".parse().unwrap(),
                    identity: None,
                    zone: None,
                },
            ],
        }],
        identities: vec![],
        policy,
    };
    ProxyConfig {
        version: CONFIG_VERSION,
        revision: "r".into(),
        namespace: "shop".into(),
        mesh: MeshSettings {
            trust_domain: "cluster.local".into(),
            identity_endpoint: None,
            telemetry: Telemetry::default(),
            skip_detection_ports: vec![],
            detect_timeout_ms: 100,
        },
        inbound: vec![],
        outbound: vec![svc("a", Some(policy)), svc("b", None)],
    }
}

fn error_paths(cfg: &ProxyConfig) -> Vec<String> {
    match cfg.validate() {
        Ok(()) => vec![],
        Err(errs) => errs.into_iter().map(|e| format!("{e}")).collect(),
    }
}

#[test]
fn absurd_rates_and_durations_are_refused_with_the_field_named() {
    let cases: Vec<(TrafficPolicy, &str)> = vec![
        (
            TrafficPolicy {
                rate_limit: Some(RateLimit {
                    requests_per_second: 1e-300,
                    burst: 1,
                }),
                ..Default::default()
            },
            "policy.rateLimit.requestsPerSecond",
        ),
        (
            TrafficPolicy {
                rate_limit: Some(RateLimit {
                    requests_per_second: 1e300,
                    burst: 1,
                }),
                ..Default::default()
            },
            "policy.rateLimit.requestsPerSecond",
        ),
        (
            TrafficPolicy {
                timeouts: Timeouts {
                    request_ms: Some(u64::MAX),
                    ..Default::default()
                },
                ..Default::default()
            },
            "policy.timeouts.requestMs",
        ),
        (
            TrafficPolicy {
                outlier_detection: Some(OutlierDetection {
                    consecutive_failures: 1,
                    base_ejection_ms: u64::MAX,
                    max_ejection_percent: 100,
                }),
                ..Default::default()
            },
            "policy.outlierDetection.baseEjectionMs",
        ),
        (
            TrafficPolicy {
                split: vec![
                    WeightedBackend {
                        service: "a.shop".into(),
                        weight: u32::MAX,
                    },
                    WeightedBackend {
                        service: "b.shop".into(),
                        weight: u32::MAX,
                    },
                ],
                ..Default::default()
            },
            "policy.split",
        ),
        (
            TrafficPolicy {
                retries: Some(Retries {
                    attempts: 2,
                    per_try_timeout_ms: Some(u64::MAX),
                    retry_on: vec![RetryOn::ConnectFailure],
                    status_codes: vec![],
                    grpc_codes: vec![],
                    backoff_base_ms: 25,
                    backoff_max_ms: u64::MAX,
                    budget_percent: 20.0,
                    min_retries_per_second: 10,
                    retry_non_idempotent: false,
                }),
                ..Default::default()
            },
            "policy.retries.perTryTimeoutMs",
        ),
    ];
    for (policy, field) in cases {
        let errs = error_paths(&config(policy.clone()));
        assert!(
            errs.iter().any(|e| e.contains(field)),
            "{policy:?} must be refused at {field}; got {errs:?}"
        );
    }
    // The message says what would be accepted.
    let errs = error_paths(&config(TrafficPolicy {
        rate_limit: Some(RateLimit {
            requests_per_second: 1e-300,
            burst: 1,
        }),
        ..Default::default()
    }));
    assert!(errs[0].contains("between"), "{errs:?}");
    // And the edges of the accepted range stay accepted.
    let ok = config(TrafficPolicy {
        rate_limit: Some(RateLimit {
            requests_per_second: trellis_proxy::config::MIN_RATE_PER_SECOND,
            burst: u32::MAX,
        }),
        timeouts: Timeouts {
            request_ms: Some(trellis_proxy::config::MAX_DURATION_MS),
            idle_ms: Some(1),
            connect_ms: Some(1),
        },
        ..Default::default()
    });
    assert_eq!(error_paths(&ok), Vec::<String>::new());
}

/// The panic the issue found: a bucket with a tiny rate computed the wait for its next token
/// as an unrepresentable `Duration` while holding its lock (poisoning it for every later
/// request).
#[test]
fn a_tiny_rate_does_not_panic_while_the_bucket_is_locked() {
    for rate in [
        1e-300,
        0.0,
        -1.0,
        f64::NAN,
        f64::INFINITY,
        f64::MIN_POSITIVE,
    ] {
        let b = TokenBucket::new(rate, 1);
        let _ = b.try_acquire();
        let wait = b.try_acquire();
        if let Err(w) = wait {
            assert!(w <= Duration::from_secs(86_400 * 365), "{rate}: {w:?}");
        }
        // The lock is not poisoned: the bucket still answers.
        let _ = b.try_acquire();
    }
    let l = InboundRateLimiter::new(&RateLimit {
        requests_per_second: 1e-300,
        burst: 1,
    });
    assert!(l.check("spiffe://td/ns/a/sa/x").is_ok());
    assert!(l.check("spiffe://td/ns/a/sa/x").is_err());
    assert!(l.check("spiffe://td/ns/a/sa/x").is_err());
}

fn extreme_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX / 2),
        Just(i64::MAX as u64),
        Just(u64::from(u32::MAX) + 1),
        any::<u64>(),
    ]
}

fn extreme_u32() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), Just(1), Just(u32::MAX), any::<u32>()]
}

fn extreme_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(1e-300),
        Just(f64::MIN_POSITIVE),
        Just(0.0),
        Just(-0.0),
        Just(-1.0),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(f64::MAX),
        Just(1e300),
        any::<f64>(),
    ]
}

prop_compose! {
    fn retries()(
        attempts in extreme_u32(),
        per_try in proptest::option::of(extreme_u64()),
        backoff_base in extreme_u64(),
        backoff_max in extreme_u64(),
        budget in extreme_f64(),
        min_rps in extreme_u32(),
    ) -> Retries {
        Retries {
            attempts,
            per_try_timeout_ms: per_try,
            retry_on: vec![RetryOn::ConnectFailure, RetryOn::ServerError],
            status_codes: vec![],
            grpc_codes: vec![],
            backoff_base_ms: backoff_base,
            backoff_max_ms: backoff_max,
            budget_percent: budget,
            min_retries_per_second: min_rps,
            retry_non_idempotent: false,
        }
    }
}

prop_compose! {
    fn limits()(
        rps in extreme_f64(),
        burst in extreme_u32(),
        failures in extreme_u32(),
        base_ejection in extreme_u64(),
        max_pct in extreme_u32(),
        max_conns in proptest::option::of(extreme_u32()),
    ) -> (RateLimit, OutlierDetection, CircuitBreaker) {
        (
            RateLimit { requests_per_second: rps, burst },
            OutlierDetection {
                consecutive_failures: failures,
                base_ejection_ms: base_ejection,
                max_ejection_percent: max_pct,
            },
            CircuitBreaker {
                max_connections: max_conns,
                max_pending_requests: None,
                max_requests: None,
            },
        )
    }
}

prop_compose! {
    fn policy()(
        request_ms in proptest::option::of(extreme_u64()),
        idle_ms in proptest::option::of(extreme_u64()),
        connect_ms in proptest::option::of(extreme_u64()),
        retries in retries(),
        (rate_limit, outlier, breaker) in limits(),
        w1 in extreme_u32(),
        w2 in extreme_u32(),
        lb in 0..4u8,
    ) -> TrafficPolicy {
        TrafficPolicy {
            source: "shop/a".into(),
            port: None,
            load_balancer: LoadBalancer {
                algorithm: [
                    LbAlgorithm::P2cEwma,
                    LbAlgorithm::LeastRequest,
                    LbAlgorithm::RoundRobin,
                    LbAlgorithm::Random,
                ][lb as usize],
                hash_key: None,
            },
            timeouts: Timeouts { request_ms, idle_ms, connect_ms },
            retries: Some(retries),
            circuit_breaker: Some(breaker),
            outlier_detection: Some(outlier),
            rate_limit: Some(rate_limit),
            split: vec![
                WeightedBackend { service: "a.shop".into(), weight: w1 },
                WeightedBackend { service: "b.shop".into(), weight: w2 },
            ],
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever the values: validation answers (no panic), a config that passes survives a
    /// JSON round trip, and the traffic layer builds from it and serves connections without
    /// panicking, also when the values are out of bounds (defence in depth).
    #[test]
    fn no_config_value_panics(pol in policy()) {
        let cfg = config(pol.clone());
        let valid = cfg.validate().is_ok();
        if valid {
            let json = cfg.to_json_pretty();
            prop_assert!(ProxyConfig::from_json(json.as_bytes()).is_ok());
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let d = Dispatcher::new(Arc::new(PlainUpstream::default()));
            d.update(&cfg);
            let ctx = RequestCtx {
                original_dst: "10.96.0.10:80".parse::<SocketAddr>().unwrap(),
                source_ip: "10.0.0.1".parse().unwrap(),
            };
            for _ in 0..4 {
                if let Ok(t) = d.pick_tcp(&cfg.outbound[0], 80, &ctx) {
                    // A failed connect feeds outlier detection (ejection arithmetic).
                    t.connected(Err(()));
                }
            }
            // A reload with the same values keeps state; with the other service's none.
            d.update(&cfg);
            let _ = d.endpoint_stats("shop", "a", 80);
        });
        let rl = pol.rate_limit.as_ref().unwrap();
        let l = InboundRateLimiter::new(rl);
        for _ in 0..3 {
            let _ = l.check("spiffe://cluster.local/ns/a/sa/b");
        }
        let r = pol.retries.as_ref().unwrap();
        let budget = RetryBudget::new(r.budget_percent, r.min_retries_per_second);
        for _ in 0..3 {
            budget.deposit();
            let _ = budget.withdraw();
        }
    }
}
