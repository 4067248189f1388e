//! The compiler, exhaustively: precedence, conflicts, references, protocols, the outbound table,
//! deletion, determinism, the size limit, incremental compiles, and the round trip through the
//! sidecar's own config parser.

mod compiler_fixtures;

use std::collections::BTreeMap;

use compiler_fixtures::*;
use trellis_operator::api::Condition;
use trellis_operator::api::peer_authentication::MtlsMode as M;
use trellis_operator::api::traffic_policy::{
    GrpcCode, HashSpec, LbAlgorithm, LoadBalancerSpec, RateLimitSpec, RetriesSpec, RetryOn,
    SplitBackend, TimeoutsSpec,
};
use trellis_operator::compiler::visibility::{EXPORT_TO_ANNOTATION, IMPORT_FROM_ANNOTATION};
use trellis_operator::compiler::{
    InlineEndpoints, ObjectKey, Output, Snapshot, compile, compile_incremental, infer_protocol,
};
use trellis_proxy::config::{self as cfg, MtlsMode, Protocol, ProxyConfig};

fn config(out: &Output, ns: &str) -> ProxyConfig {
    let json = out
        .config(ns)
        .unwrap_or_else(|| panic!("no config for {ns}: {out:#?}"));
    ProxyConfig::from_json(json.as_bytes()).expect("the sidecar accepts the compiled config")
}

fn cond<'a>(
    conds: &'a BTreeMap<ObjectKey, Vec<Condition>>,
    ns: &str,
    name: &str,
    t: &str,
) -> &'a Condition {
    conds
        .get(&ObjectKey::new(ns, name))
        .and_then(|c| c.iter().find(|c| c.type_ == t))
        .unwrap_or_else(|| panic!("no {t} condition on {ns}/{name}: {conds:#?}"))
}

fn tp_cond<'a>(out: &'a Output, ns: &str, name: &str, t: &str) -> &'a Condition {
    cond(&out.traffic_policies, ns, name, t)
}

fn pa_cond<'a>(out: &'a Output, ns: &str, name: &str, t: &str) -> &'a Condition {
    cond(&out.peer_authentications, ns, name, t)
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Every compiled config passes the sidecar's `from_json` and re-serializes to the same bytes.
fn assert_round_trips(out: &Output) {
    for (ns, c) in &out.configs {
        let json = c.render();
        assert_eq!(
            json.len(),
            c.len(),
            "{ns}: length computed without rendering"
        );
        let parsed = ProxyConfig::from_json(json.as_bytes())
            .unwrap_or_else(|e| panic!("{ns}: sidecar refused the config: {e}"));
        assert_eq!(parsed.to_json_pretty(), json, "{ns}: not canonical");
        assert_eq!(parsed.revision, c.revision());
        assert_eq!(parsed.namespace, *ns);
    }
}

// ---------------------------------------------------------------- PeerAuthentication precedence

#[test]
fn no_policy_means_strict_everywhere() {
    let out = compile(&shop().snap);
    let c = config(&out, "shop");
    assert_eq!(c.inbound.len(), 1);
    assert_eq!(c.inbound[0].source, "mesh-default");
    assert_eq!(c.inbound[0].mtls, MtlsMode::Strict);
    assert!(c.inbound[0].selector.is_empty());
}

#[test]
fn precedence_workload_over_namespace_over_mesh_with_unset_inheritance() {
    let world = shop()
        .with(namespace("other").meshed())
        .with(peer_auth("trellis-system", "mesh", M::Permissive).created(1))
        .with(peer_auth("shop", "ns", M::Disable).created(2))
        // Unset at workload level inherits the namespace's Disable; its port 8443 is Strict;
        // its port 9000 override is Unset and inherits the workload's mode.
        .with(
            peer_auth("shop", "db", M::Unset)
                .selector("app", "db")
                .port("8443", M::Strict)
                .port("9000", M::Unset)
                .created(3),
        )
        .with(
            peer_auth("shop", "api", M::Strict)
                .selector("app", "api")
                .port("8080", M::Permissive)
                .created(4),
        );
    let out = compile(&world.snap);
    assert_round_trips(&out);

    let shop = config(&out, "shop");
    let sources: Vec<_> = shop.inbound.iter().map(|p| p.source.as_str()).collect();
    assert_eq!(sources, ["shop/db", "shop/api", "shop/ns"]);
    let db = shop.inbound_for(&labels(&[("app", "db")])).unwrap();
    assert_eq!(
        db.mtls,
        MtlsMode::Disable,
        "Unset inherits the namespace mode"
    );
    assert_eq!(
        db.mode_for_port(8443),
        MtlsMode::Strict,
        "port beats workload"
    );
    assert_eq!(
        db.mode_for_port(9000),
        MtlsMode::Disable,
        "Unset port inherits"
    );
    assert!(!db.port_mtls.contains_key(&9000));
    let api = shop.inbound_for(&labels(&[("app", "api")])).unwrap();
    assert_eq!(api.mtls, MtlsMode::Strict);
    assert_eq!(api.mode_for_port(8080), MtlsMode::Permissive);
    let web = shop.inbound_for(&labels(&[("app", "web")])).unwrap();
    assert_eq!(web.mtls, MtlsMode::Disable, "namespace beats mesh-wide");

    // A namespace without its own policy gets the mesh-wide mode.
    let other = config(&out, "other");
    assert_eq!(other.inbound.len(), 1);
    assert_eq!(other.inbound[0].mtls, MtlsMode::Permissive);
    assert_eq!(other.inbound[0].source, "trellis-system/mesh");

    for name in ["ns", "db", "api"] {
        assert!(pa_cond(&out, "shop", name, "Accepted").is_true(), "{name}");
        assert!(
            pa_cond(&out, "shop", name, "Programmed").is_true(),
            "{name}"
        );
        assert!(pa_cond(&out, "shop", name, "Ready").is_true(), "{name}");
    }
    assert!(pa_cond(&out, "trellis-system", "mesh", "Programmed").is_true());
}

#[test]
fn unset_all_the_way_down_is_strict() {
    let world = shop()
        .with(peer_auth("trellis-system", "mesh", M::Unset))
        .with(peer_auth("shop", "ns", M::Unset))
        .with(
            peer_auth("shop", "w", M::Unset)
                .selector("app", "x")
                .port("1", M::Unset),
        );
    let c = config(&compile(&world.snap), "shop");
    assert!(c.inbound.iter().all(|p| p.mtls == MtlsMode::Strict));
    assert!(c.inbound[0].port_mtls.is_empty());
}

#[test]
fn namespace_unset_inherits_mesh_wide() {
    let world = shop()
        .with(peer_auth("trellis-system", "mesh", M::Disable))
        .with(peer_auth("shop", "ns", M::Unset))
        .with(
            peer_auth("shop", "w", M::Unset)
                .selector("app", "x")
                .port("81", M::Permissive),
        );
    let c = config(&compile(&world.snap), "shop");
    assert_eq!(c.inbound[0].mtls, MtlsMode::Disable);
    assert_eq!(c.inbound[0].mode_for_port(81), MtlsMode::Permissive);
    assert_eq!(c.inbound[1].mtls, MtlsMode::Disable);
    assert_eq!(c.inbound[1].source, "shop/ns");
}

#[test]
fn workload_policies_are_ordered_oldest_first_then_by_name() {
    let world = shop()
        .with(
            peer_auth("shop", "zeta", M::Disable)
                .selector("app", "db")
                .created(10),
        )
        .with(
            peer_auth("shop", "beta", M::Permissive)
                .selector("app", "db")
                .created(20),
        )
        .with(
            peer_auth("shop", "alpha", M::Permissive)
                .selector("tier", "db")
                .created(20),
        );
    let c = config(&compile(&world.snap), "shop");
    let sources: Vec<_> = c.inbound.iter().map(|p| p.source.as_str()).collect();
    assert_eq!(
        sources,
        ["shop/zeta", "shop/alpha", "shop/beta", "mesh-default"]
    );
    // The oldest wins for a pod both select.
    let both = labels(&[("app", "db"), ("tier", "db")]);
    assert_eq!(c.inbound_for(&both).unwrap().source, "shop/zeta");
}

#[test]
fn second_namespace_or_mesh_wide_policy_is_conflicted() {
    let world = shop()
        .with(peer_auth("shop", "new", M::Disable).created(20))
        .with(peer_auth("shop", "old", M::Permissive).created(10))
        .with(peer_auth("trellis-system", "m2", M::Disable).created(5))
        .with(peer_auth("trellis-system", "m1", M::Permissive).created(1));
    let out = compile(&world.snap);
    let c = config(&out, "shop");
    assert_eq!(c.inbound.last().unwrap().source, "shop/old");
    assert_eq!(c.inbound.last().unwrap().mtls, MtlsMode::Permissive);
    let new = pa_cond(&out, "shop", "new", "Accepted");
    assert!(!new.is_true());
    assert_eq!(new.reason, "Conflicted");
    assert!(new.message.contains("old"), "{}", new.message);
    assert_eq!(
        pa_cond(&out, "trellis-system", "m2", "Accepted").reason,
        "Conflicted"
    );
    assert!(pa_cond(&out, "trellis-system", "m1", "Accepted").is_true());
    assert_eq!(pa_cond(&out, "shop", "new", "Ready").reason, "Conflicted");
}

#[test]
fn invalid_port_level_policies_are_refused_and_change_nothing() {
    let world = shop()
        .with(peer_auth("shop", "noselector", M::Disable).port("8080", M::Strict))
        .with(
            peer_auth("shop", "badport", M::Disable)
                .selector("app", "x")
                .port("http", M::Strict),
        )
        .with(
            peer_auth("shop", "zero", M::Disable)
                .selector("app", "x")
                .port("0", M::Strict),
        );
    let out = compile(&world.snap);
    for name in ["noselector", "badport", "zero"] {
        let a = pa_cond(&out, "shop", name, "Accepted");
        assert_eq!(a.reason, "Invalid", "{name}");
        assert!(!a.message.is_empty());
    }
    let c = config(&out, "shop");
    assert_eq!(c.inbound.len(), 1);
    assert_eq!(c.inbound[0].mtls, MtlsMode::Strict);
}

#[test]
fn selector_policy_in_root_namespace_is_not_mesh_wide() {
    let world = shop().with(peer_auth("trellis-system", "sel", M::Disable).selector("app", "db"));
    let out = compile(&world.snap);
    assert!(pa_cond(&out, "trellis-system", "sel", "Accepted").is_true());
    let p = pa_cond(&out, "trellis-system", "sel", "Programmed");
    assert_eq!(p.reason, "NamespaceNotMeshed");
    assert!(p.message.contains("remove the selector"), "{}", p.message);
    let c = config(&out, "shop");
    assert_eq!(c.inbound.len(), 1);
    assert_eq!(c.inbound[0].mtls, MtlsMode::Strict);
}

#[test]
fn policy_in_unmeshed_namespace_is_accepted_but_not_programmed() {
    let out = compile(&shop().with(peer_auth("legacy", "p", M::Permissive)).snap);
    assert!(pa_cond(&out, "legacy", "p", "Accepted").is_true());
    assert_eq!(
        pa_cond(&out, "legacy", "p", "Programmed").reason,
        "NamespaceNotMeshed"
    );
}

// ---------------------------------------------------------------- TrafficPolicy

#[test]
fn traffic_policy_compiles_durations_codes_and_defaults() {
    let world = shop().with(
        traffic_policy("shop", "reviews", "reviews")
            .port(9080)
            .spec(|s| {
                s.timeouts = Some(TimeoutsSpec {
                    request: Some("1m30s".into()),
                    idle: None,
                    connect: Some("250ms".into()),
                });
                s.retries = Some(RetriesSpec {
                    attempts: 3,
                    per_try_timeout: Some("2s".into()),
                    retry_on: vec![RetryOn::GrpcStatus, RetryOn::Reset],
                    status_codes: vec![],
                    grpc_codes: vec![GrpcCode::Unavailable, GrpcCode::Cancelled],
                    backoff: None,
                    budget_percent: None,
                    min_retries_per_second: None,
                    retry_non_idempotent: false,
                });
                s.load_balancer = Some(LoadBalancerSpec {
                    algorithm: LbAlgorithm::ConsistentHash,
                    hash: Some(HashSpec {
                        header: Some("x-user".into()),
                        cookie: None,
                        source_ip: None,
                    }),
                });
                s.split = vec![
                    SplitBackend {
                        name: "reviews".into(),
                        weight: 90,
                    },
                    SplitBackend {
                        name: "reviews-v2".into(),
                        weight: 10,
                    },
                ];
            }),
    );
    let out = compile(&world.snap);
    assert_round_trips(&out);
    let c = config(&out, "shop");
    let p = c.service("reviews.shop").unwrap().policy.clone().unwrap();
    assert_eq!(p.source, "shop/reviews");
    assert_eq!(p.port, Some(9080));
    assert_eq!(p.timeouts.request_ms, Some(90_000));
    assert_eq!(p.timeouts.connect_ms, Some(250));
    assert_eq!(p.timeouts.idle_ms, None);
    let r = p.retries.unwrap();
    assert_eq!(r.grpc_codes, [1, 14]);
    assert_eq!(r.retry_on, [cfg::RetryOn::GrpcStatus, cfg::RetryOn::Reset]);
    assert_eq!(r.per_try_timeout_ms, Some(2000));
    assert_eq!((r.backoff_base_ms, r.backoff_max_ms), (25, 250));
    assert_eq!((r.budget_percent, r.min_retries_per_second), (20.0, 10));
    assert_eq!(
        p.load_balancer.hash_key,
        Some(cfg::HashKey::Header("x-user".into()))
    );
    assert_eq!(p.split[1].service, "reviews-v2.shop");
    // Every meshed namespace's table carries the policy: here also a second one.
    for t in ["Accepted", "Programmed", "Ready"] {
        assert!(tp_cond(&out, "shop", "reviews", t).is_true(), "{t}");
    }
}

#[test]
fn default_retry_on_and_backoff_cap() {
    let world = shop().with(traffic_policy("shop", "r", "reviews").spec(|s| {
        s.retries = Some(RetriesSpec {
            attempts: 2,
            per_try_timeout: None,
            retry_on: vec![],
            status_codes: vec![],
            grpc_codes: vec![],
            backoff: Some("100ms".into()),
            budget_percent: Some(50),
            min_retries_per_second: Some(3),
            retry_non_idempotent: true,
        });
    }));
    let c = config(&compile(&world.snap), "shop");
    let r = c
        .service("reviews.shop")
        .unwrap()
        .policy
        .clone()
        .unwrap()
        .retries
        .unwrap();
    assert_eq!(
        r.retry_on,
        [
            cfg::RetryOn::ConnectFailure,
            cfg::RetryOn::Reset,
            cfg::RetryOn::GatewayError
        ]
    );
    assert_eq!((r.backoff_base_ms, r.backoff_max_ms), (100, 800));
    assert_eq!((r.budget_percent, r.min_retries_per_second), (50.0, 3));
    assert!(r.retry_non_idempotent);
}

#[test]
fn oldest_traffic_policy_wins_and_the_others_are_conflicted() {
    let world = shop()
        .with(traffic_policy("shop", "newer", "reviews").created(20))
        .with(
            traffic_policy("shop", "older", "reviews")
                .port(9080)
                .created(10),
        )
        .with(traffic_policy("shop", "same-age-b", "reviews-v2").created(5))
        .with(traffic_policy("shop", "same-age-a", "reviews-v2").created(5));
    let out = compile(&world.snap);
    let c = config(&out, "shop");
    assert_eq!(
        c.service("reviews.shop")
            .unwrap()
            .policy
            .as_ref()
            .unwrap()
            .source,
        "shop/older"
    );
    assert_eq!(
        c.service("reviews-v2.shop")
            .unwrap()
            .policy
            .as_ref()
            .unwrap()
            .source,
        "shop/same-age-a"
    );
    let a = tp_cond(&out, "shop", "newer", "Accepted");
    assert_eq!(a.reason, "Conflicted");
    assert!(a.message.contains("older"), "{}", a.message);
    assert_eq!(
        tp_cond(&out, "shop", "newer", "Programmed").reason,
        "NotAccepted"
    );
    assert_eq!(
        tp_cond(&out, "shop", "same-age-b", "Accepted").reason,
        "Conflicted"
    );
    assert!(tp_cond(&out, "shop", "same-age-a", "Accepted").is_true());
}

#[test]
fn invalid_policy_does_not_block_a_newer_valid_one() {
    let world = shop()
        .with(
            traffic_policy("shop", "broken", "reviews")
                .created(1)
                .spec(|s| {
                    s.timeouts = Some(TimeoutsSpec {
                        request: Some("1.5s".into()),
                        ..Default::default()
                    });
                }),
        )
        .with(traffic_policy("shop", "good", "reviews").created(2));
    let out = compile(&world.snap);
    let a = tp_cond(&out, "shop", "broken", "Accepted");
    assert_eq!(a.reason, "Invalid");
    assert!(a.message.contains("timeouts.request"), "{}", a.message);
    assert!(
        a.message.contains("invalid duration \"1.5s\""),
        "{}",
        a.message
    );
    assert!(tp_cond(&out, "shop", "good", "Accepted").is_true());
}

#[test]
fn missing_target_and_missing_port_are_target_not_found() {
    let world = shop()
        .with(traffic_policy("shop", "ghost", "nope"))
        .with(traffic_policy("shop", "badport", "reviews").port(1234))
        // A Service in another namespace does not count: targetRef is namespace-local.
        .with(traffic_policy("legacy", "cross", "reviews"));
    let out = compile(&world.snap);
    for (ns, name, needle) in [
        ("shop", "ghost", "Service nope not found"),
        ("shop", "badport", "no TCP port 1234"),
        ("legacy", "cross", "Service reviews not found"),
    ] {
        let a = tp_cond(&out, ns, name, "Accepted");
        assert_eq!(a.reason, "TargetNotFound", "{name}");
        assert!(a.message.contains(needle), "{name}: {}", a.message);
        assert_eq!(tp_cond(&out, ns, name, "Ready").reason, "TargetNotFound");
    }
    assert!(
        config(&out, "shop")
            .service("reviews.shop")
            .unwrap()
            .policy
            .is_none()
    );
}

#[test]
fn nonsense_is_invalid_with_a_message() {
    type Mutate = Box<dyn Fn(&mut trellis_operator::api::TrafficPolicySpec)>;
    let cases: Vec<(&str, Mutate, &str)> = vec![
        (
            "split-missing",
            Box::new(|s| {
                s.split = vec![SplitBackend {
                    name: "reviews-v3".into(),
                    weight: 1,
                }]
            }),
            "Service reviews-v3 not found",
        ),
        (
            "split-zero",
            Box::new(|s| {
                s.split = vec![SplitBackend {
                    name: "reviews".into(),
                    weight: 0,
                }]
            }),
            "at least one weight",
        ),
        (
            "hash-missing",
            Box::new(|s| {
                s.load_balancer = Some(LoadBalancerSpec {
                    algorithm: LbAlgorithm::ConsistentHash,
                    hash: None,
                })
            }),
            "hash is required",
        ),
        (
            "zero-timeout",
            Box::new(|s| {
                s.timeouts = Some(TimeoutsSpec {
                    idle: Some("0s".into()),
                    ..Default::default()
                })
            }),
            "greater than 0",
        ),
        (
            "attempts",
            Box::new(|s| {
                s.retries = Some(RetriesSpec {
                    attempts: 11,
                    per_try_timeout: None,
                    retry_on: vec![],
                    status_codes: vec![],
                    grpc_codes: vec![],
                    backoff: None,
                    budget_percent: None,
                    min_retries_per_second: None,
                    retry_non_idempotent: false,
                })
            }),
            "between 1 and 10",
        ),
        (
            "kind",
            Box::new(|s| s.target_ref.kind = "Deployment".into()),
            "only Service",
        ),
        // Values the sidecar cannot represent are the policy's fault, reported on the policy
        // (not a namespace-wide InvalidConfig the sidecars would refuse).
        (
            "huge-timeout",
            Box::new(|s| {
                s.timeouts = Some(TimeoutsSpec {
                    request: Some("100000h".into()),
                    ..Default::default()
                })
            }),
            "at most 720h",
        ),
        (
            "huge-rate",
            Box::new(|s| {
                s.rate_limit = Some(RateLimitSpec {
                    requests_per_second: u32::MAX,
                    burst: None,
                })
            }),
            "rateLimit.requestsPerSecond",
        ),
    ];
    let mut world = shop();
    let names: Vec<&str> = cases.iter().map(|c| c.0).collect();
    for (name, f, _) in cases.iter() {
        world.add(traffic_policy("shop", name, "reviews").spec(|s| f(s)));
    }
    let out = compile(&world.snap);
    for (name, _, needle) in &cases {
        let a = tp_cond(&out, "shop", name, "Accepted");
        assert_eq!(a.reason, "Invalid", "{name}");
        assert!(a.message.contains(needle), "{name}: {}", a.message);
    }
    assert_eq!(names.len(), 8);
    assert!(
        config(&out, "shop")
            .service("reviews.shop")
            .unwrap()
            .policy
            .is_none()
    );
}

#[test]
fn policy_without_meshed_namespaces_is_not_programmed() {
    let world = World::new()
        .with(namespace("shop"))
        .with(service("shop", "reviews").ip("10.96.0.1").port(80, "http"))
        .with(traffic_policy("shop", "p", "reviews"));
    let out = compile(&world.snap);
    assert!(out.configs.is_empty());
    assert!(tp_cond(&out, "shop", "p", "Accepted").is_true());
    let p = tp_cond(&out, "shop", "p", "Programmed");
    assert_eq!(p.reason, "NoMeshedNamespaces");
    assert!(!p.is_true());
}

// ---------------------------------------------------------------- outbound table

#[test]
fn protocol_inference_table() {
    let cases = [
        (Some("kubernetes.io/h2c"), None, Protocol::Http2),
        (Some("grpc"), Some("tcp-x"), Protocol::Grpc),
        (Some("http"), None, Protocol::Http1),
        (Some("tcp"), Some("http"), Protocol::Tcp),
        (Some("HTTP"), None, Protocol::Http1),
        (Some("example.com/custom"), Some("grpc-api"), Protocol::Grpc),
        (None, Some("http"), Protocol::Http1),
        (None, Some("http-web"), Protocol::Http1),
        (None, Some("http2-web"), Protocol::Http2),
        (None, Some("grpc-api"), Protocol::Grpc),
        (None, Some("tcp-postgres"), Protocol::Tcp),
        (None, Some("https"), Protocol::Auto),
        (None, Some("httpx"), Protocol::Auto),
        (None, Some("web"), Protocol::Auto),
        (None, None, Protocol::Auto),
    ];
    for (ap, name, want) in cases {
        assert_eq!(infer_protocol(ap, name), want, "{ap:?} {name:?}");
    }
    // And through a Service.
    let world = shop().with(
        service("shop", "multi")
            .ip("10.96.0.50")
            .port_full(50051, Some("api"), Some("kubernetes.io/h2c"), None)
            .port_full(53, Some("dns"), None, Some("UDP"))
            .port_full(8080, Some("grpc-web"), None, Some("TCP")),
    );
    let c = config(&compile(&world.snap), "shop");
    let s = c.service("multi.shop").unwrap();
    let ports: Vec<_> = s.ports.iter().map(|p| (p.port, p.protocol)).collect();
    assert_eq!(
        ports,
        [(8080, Protocol::Grpc), (50051, Protocol::Http2)],
        "UDP is dropped"
    );
}

#[test]
fn outbound_table_lists_every_service_with_endpoints_and_identities() {
    let out = compile(&shop().snap);
    assert_round_trips(&out);
    let c = config(&out, "shop");
    let keys: Vec<_> = c.outbound.iter().map(|s| s.key()).collect();
    assert_eq!(keys, ["db.legacy", "reviews.shop", "reviews-v2.shop"]);

    let reviews = c.service("reviews.shop").unwrap();
    assert_eq!(
        reviews.addresses,
        ["10.96.0.10".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        reviews.identities,
        ["spiffe://cluster.local/ns/shop/sa/reviews"]
    );
    let eps: Vec<_> = reviews.ports[0]
        .endpoints
        .iter()
        .map(|e| e.address.to_string())
        .collect();
    assert_eq!(eps, ["10.0.0.5:9080", "10.0.0.6:9080"]);
    assert!(
        reviews.ports[0]
            .endpoints
            .iter()
            .all(|e| e.identity.as_deref() == Some("spiffe://cluster.local/ns/shop/sa/reviews"))
    );
    assert_eq!(reviews.ports[0].protocol, Protocol::Http1);

    // The legacy Service has no sidecar behind it: plaintext, and (another namespace) no inline
    // endpoints by default.
    let db = c.service("db.legacy").unwrap();
    assert!(db.identities.is_empty());
    assert!(db.ports[0].endpoints.is_empty());
    assert_eq!(db.ports[0].protocol, Protocol::Tcp);
}

#[test]
fn inline_endpoint_modes() {
    let mut world = shop();
    world.snap.settings.inline_endpoints = InlineEndpoints::All;
    let c = config(&compile(&world.snap), "shop");
    let db = c.service("db.legacy").unwrap();
    assert_eq!(db.ports[0].endpoints.len(), 1);
    assert_eq!(db.ports[0].endpoints[0].identity, None);
    world.snap.settings.inline_endpoints = InlineEndpoints::None;
    let c = config(&compile(&world.snap), "shop");
    assert!(
        c.outbound
            .iter()
            .all(|s| s.ports.iter().all(|p| p.endpoints.is_empty()))
    );
}

#[test]
fn trust_domain_comes_from_the_mesh() {
    let world = shop().with(mesh().spec(|s| s.trust_domain = "example.org".into()));
    let out = compile(&world.snap);
    let c = config(&out, "shop");
    assert_eq!(c.mesh.trust_domain, "example.org");
    assert_eq!(
        c.service("reviews.shop").unwrap().identities,
        ["spiffe://example.org/ns/shop/sa/reviews"]
    );
    assert_eq!(
        c.mesh.identity_endpoint.as_deref(),
        Some("https://trellis-operator.trellis-system.svc:15012")
    );
    let p = out.mesh.iter().find(|c| c.type_ == "Programmed").unwrap();
    assert!(p.is_true());
    assert!(!p.message.contains("No Mesh"), "{}", p.message);
    assert_eq!(p.observed_generation, Some(3));
}

/// Issue 15: tracing on without a collector, in mode Install, sends the sidecars to the Jaeger
/// the addon controller installs in the operator's namespace; a collector of the user's wins;
/// mode Integrate installs nothing, so nothing is exported.
#[test]
fn tracing_without_a_collector_exports_to_the_installed_jaeger() {
    use trellis_operator::api::mesh::ObservabilityMode;
    let tracing = |mode: ObservabilityMode, collector: Option<&str>| {
        let collector = collector.map(str::to_string);
        let world = shop().with(mesh().spec(move |s| {
            s.observability.mode = mode;
            s.observability.tracing.enabled = true;
            s.observability.tracing.sampling_percent = 5.0;
            s.observability.tracing.collector = collector;
        }));
        config(&compile(&world.snap), "shop").mesh.telemetry.tracing
    };
    let t = tracing(ObservabilityMode::Install, None).expect("tracing configured");
    assert_eq!(t.collector, "http://trellis-jaeger.trellis-system.svc:4317");
    assert_eq!(t.sampling_percent, 5.0);
    let t = tracing(ObservabilityMode::Install, Some("otel.obs:4317")).unwrap();
    assert_eq!(t.collector, "otel.obs:4317");
    assert!(tracing(ObservabilityMode::Integrate, None).is_none());
    assert_eq!(
        tracing(ObservabilityMode::Integrate, Some("otel.obs:4317"))
            .unwrap()
            .collector,
        "otel.obs:4317"
    );
}

#[test]
fn absent_mesh_uses_defaults_and_says_so() {
    let out = compile(&shop().snap);
    let p = out.mesh.iter().find(|c| c.type_ == "Programmed").unwrap();
    assert!(p.is_true());
    assert!(
        p.message.contains("No Mesh named `default`"),
        "{}",
        p.message
    );
    assert_eq!(config(&out, "shop").mesh.trust_domain, "cluster.local");
}

#[test]
fn endpoints_ready_ports_and_selector_fallback() {
    let world = World::new()
        .with(namespace("a").meshed())
        .with(
            service("a", "web")
                .ip("10.96.0.1")
                .port(80, "http")
                .port(81, "admin")
                .selector("app", "web"),
        )
        .with(
            slice("a", "web", "web-1")
                .port(Some("http"), 8080)
                .endpoint_full("10.1.0.1", Some("web-0"), Some(true))
                .endpoint_full("10.1.0.2", Some("web-1"), Some(false))
                // No targetRef: the pod is found by IP among the pods the selector picks.
                .endpoint_full("10.1.0.3", None, None),
        )
        .with(
            pod("a", "web-0")
                .sa("web")
                .ip("10.1.0.1")
                .label("app", "web")
                .sidecar(),
        )
        .with(
            pod("a", "web-1")
                .sa("web-canary")
                .ip("10.1.0.2")
                .label("app", "web")
                .sidecar(),
        )
        .with(
            pod("a", "web-2")
                .ip("10.1.0.3")
                .label("app", "web")
                .sidecar(),
        )
        // Selected but not yet an endpoint: still an identity, so identities do not flap.
        .with(
            pod("a", "web-3")
                .sa("starting")
                .label("app", "web")
                .sidecar(),
        );
    let c = config(&compile(&world.snap), "a");
    let web = c.service("web.a").unwrap();
    assert_eq!(
        web.identities,
        [
            "spiffe://cluster.local/ns/a/sa/default",
            "spiffe://cluster.local/ns/a/sa/starting",
            "spiffe://cluster.local/ns/a/sa/web",
            "spiffe://cluster.local/ns/a/sa/web-canary",
        ]
    );
    let http = web.port(80).unwrap();
    let eps: Vec<_> = http
        .endpoints
        .iter()
        .map(|e| (e.address.to_string(), e.identity.clone().unwrap()))
        .collect();
    assert_eq!(
        eps,
        [
            (
                "10.1.0.1:8080".to_string(),
                "spiffe://cluster.local/ns/a/sa/web".to_string()
            ),
            (
                "10.1.0.3:8080".to_string(),
                "spiffe://cluster.local/ns/a/sa/default".to_string()
            ),
        ],
        "not-ready endpoints are skipped; the slice's port is used"
    );
    assert!(
        web.port(81).unwrap().endpoints.is_empty(),
        "the slice has no port named admin"
    );
}

#[test]
fn malformed_objects_are_skipped_and_reported() {
    let world = shop()
        .with(service("shop", "noports").ip("10.96.0.99"))
        .with(service("shop", "badip").ip("10.96.0.300").port(80, "http"))
        .with(
            service("shop", "dup")
                .ip("10.96.0.98")
                .port(80, "http")
                .port(80, "web"),
        )
        .with(
            service("shop", "range")
                .ip("10.96.0.97")
                .port(70000, "http"),
        )
        .with(
            service("shop", "ext")
                .type_("ExternalName")
                .port(80, "http"),
        )
        .with(service("shop", "headless").ip("None").port(80, "http"))
        .with(
            service("shop", "dns")
                .ip("10.96.0.96")
                .port_full(53, Some("dns"), None, Some("UDP")),
        )
        .with(
            slice("shop", "headless", "h")
                .port(Some("http"), 80)
                .endpoint("not-an-ip", None)
                .endpoint("10.2.0.1", None),
        );
    let out = compile(&world.snap);
    assert_round_trips(&out);
    let c = config(&out, "shop");
    for gone in ["noports", "badip", "dup", "range", "ext", "dns"] {
        assert!(c.service(&format!("{gone}.shop")).is_none(), "{gone}");
    }
    let headless = c.service("headless.shop").unwrap();
    assert!(headless.addresses.is_empty());
    assert_eq!(headless.ports[0].endpoints.len(), 1);
    let reported: Vec<String> = out.problems.iter().map(|p| p.object.name.clone()).collect();
    for name in ["noports", "badip", "dup", "range", "headless"] {
        assert!(
            reported.contains(&name.to_string()),
            "{name} not reported: {reported:?}"
        );
    }
    let d = out.mesh.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert!(d.is_true());
    assert_eq!(d.reason, "MalformedObjects");
}

// ---------------------------------------------------------------- namespaces

#[test]
fn namespace_selection() {
    let world = World::new()
        .with(mesh().spec(|s| {
            s.injection.namespace_selector = Some(trellis_operator::api::mesh::LabelSelector {
                match_labels: [("team".to_string(), "pay".to_string())].into(),
            });
            s.injection.excluded_namespaces = vec!["pay-sandbox".into()];
        }))
        .with(namespace("labelled").meshed())
        .with(namespace("pay").label("team", "pay"))
        .with(namespace("pay-sandbox").label("team", "pay"))
        .with(
            namespace("pay-off")
                .label("team", "pay")
                .label("trellis.dev/inject", "disabled"),
        )
        .with(namespace("kube-system").meshed())
        .with(namespace("trellis-system").meshed())
        .with(namespace("plain"));
    let out = compile(&world.snap);
    let meshed: Vec<_> = out.meshed.iter().map(String::as_str).collect();
    // A custom selector is the whole rule, as in the webhook configuration: `labelled` carries
    // only the default label, so its pods are never injected and it gets no config.
    assert_eq!(meshed, ["pay"]);
    assert_eq!(out.configs.keys().cloned().collect::<Vec<_>>(), ["pay"]);
}

#[test]
fn namespace_leaving_the_mesh_is_no_longer_desired() {
    let before = compile(&shop().with(namespace("b").meshed()).snap);
    assert!(before.config("b").is_some());
    let after = compile(&shop().with(namespace("b")).snap);
    assert!(after.config("b").is_none());
    assert!(!after.meshed.contains("b"));
    assert!(after.changed_since(&before).contains("b"));
}

// ---------------------------------------------------------------- determinism, size, incremental

fn busy_world() -> World {
    shop()
        .with(namespace("b").meshed())
        .with(peer_auth("trellis-system", "mesh", M::Permissive).created(1))
        .with(
            peer_auth("shop", "w", M::Strict)
                .selector("app", "reviews")
                .port("9080", M::Disable)
                .created(2),
        )
        .with(
            peer_auth("b", "w2", M::Disable)
                .selector("app", "x")
                .created(2),
        )
        .with(traffic_policy("shop", "t1", "reviews").created(3))
        .with(traffic_policy("shop", "t2", "reviews").created(4))
}

fn shuffled(snap: &Snapshot, seed: u64) -> Snapshot {
    fn shuffle<T>(v: &mut [T], seed: &mut u64) {
        for i in (1..v.len()).rev() {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            v.swap(i, (*seed >> 33) as usize % (i + 1));
        }
    }
    let mut s = snap.clone();
    let mut seed = seed;
    shuffle(&mut s.namespaces, &mut seed);
    shuffle(&mut s.services, &mut seed);
    shuffle(&mut s.endpoint_slices, &mut seed);
    // Pods: the cache keeps them sorted, so their order cannot vary.
    shuffle(&mut s.traffic_policies, &mut seed);
    shuffle(&mut s.peer_authentications, &mut seed);
    s
}

#[test]
fn compiling_twice_or_shuffled_gives_the_same_bytes() {
    let snap = busy_world().snap;
    let a = compile(&snap);
    let b = compile(&snap);
    assert_eq!(a.render_all(), b.render_all());
    for seed in 1..20 {
        let c = compile(&shuffled(&snap, seed));
        assert_eq!(a.render_all(), c.render_all(), "seed {seed}");
        assert_eq!(a.traffic_policies, c.traffic_policies, "seed {seed}");
        assert_eq!(
            a.peer_authentications, c.peer_authentications,
            "seed {seed}"
        );
        assert_eq!(a.mesh, c.mesh, "seed {seed}");
    }
    // The revision is a hash of the content.
    assert_ne!(a.configs["shop"].revision(), a.configs["b"].revision());
    assert_eq!(a.configs["shop"].revision().len(), 16);
}

#[test]
fn oversized_config_is_not_emitted_and_mesh_says_so() {
    let mut world = busy_world().with(mesh());
    let small = compile(&world.snap);
    let shop_len = small.configs["shop"].len();
    let b_len = small.configs["b"].len();
    assert!(shop_len > b_len, "shop inlines its endpoints");
    world.snap.settings.max_config_bytes = (shop_len + b_len) / 2;
    let out = compile(&world.snap);
    assert!(out.config("shop").is_none());
    assert!(out.config("b").is_some());
    assert_eq!(out.too_large["shop"].bytes, shop_len);
    assert!(
        out.meshed.contains("shop"),
        "still meshed: the old ConfigMap must stay"
    );
    assert!(
        !out.changed_since(&small).contains("shop"),
        "a refused config is not a deletion"
    );
    let d = out.mesh.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert!(d.is_true());
    assert_eq!(d.reason, "ConfigTooLarge");
    assert!(d.message.contains("shop"), "{}", d.message);
    let p = out.mesh.iter().find(|c| c.type_ == "Programmed").unwrap();
    assert!(!p.is_true());
    let t = tp_cond(&out, "shop", "t1", "Programmed");
    assert_eq!(t.reason, "PartiallyProgrammed");
    assert_eq!(
        pa_cond(&out, "shop", "w", "Programmed").reason,
        "ConfigNotWritten"
    );
}

#[test]
fn a_change_touches_only_the_namespaces_it_affects() {
    let world = busy_world()
        .with(namespace("c").meshed())
        .with(service("c", "api").ip("10.96.5.1").port(80, "http"))
        .with(
            slice("c", "api", "api-1")
                .port(Some("http"), 80)
                .endpoint("10.5.0.1", None),
        );
    let first = compile(&world.snap);
    let changed = |w: &World| {
        compile(&w.snap)
            .changed_since(&first)
            .into_iter()
            .collect::<Vec<_>>()
    };

    // Nothing changed: nothing to write.
    assert!(changed(&world).is_empty());

    // A workload policy in b: only b.
    let w = world
        .clone()
        .with(peer_auth("b", "new", M::Permissive).selector("app", "y"));
    assert_eq!(changed(&w), ["b"]);

    // An endpoint in c: only c (other namespaces do not inline c's endpoints).
    let w = world.clone().with(
        slice("c", "api", "api-2")
            .port(Some("http"), 80)
            .endpoint("10.5.0.2", None),
    );
    assert_eq!(changed(&w), ["c"]);

    // A TrafficPolicy: every namespace lists the Service, so every namespace.
    let w = world.clone().with(traffic_policy("c", "api", "api"));
    assert_eq!(changed(&w), ["b", "c", "shop"]);
    // ... unless the Service is exported to fewer namespaces: then only those.
    let mut scoped = world.clone();
    scoped
        .snap
        .services
        .retain(|s| s.metadata.name.as_deref() != Some("api"));
    let scoped = scoped.with(
        service("c", "api")
            .ip("10.96.5.1")
            .port(80, "http")
            .annotate(EXPORT_TO_ANNOTATION, ".,b"),
    );
    let base = compile(&scoped.snap);
    let w = scoped.clone().with(traffic_policy("c", "api", "api"));
    let out = compile_incremental(&w.snap, Some(&base));
    assert_eq!(
        out.changed_since(&base).into_iter().collect::<Vec<_>>(),
        ["b", "c"]
    );
    assert_eq!(out.stats.serialized, 1, "one Service re-serialized");

    // A conflicted policy changes no config, only its own status.
    let w = world.with(traffic_policy("shop", "t3", "reviews").created(9));
    assert!(changed(&w).is_empty());
    let out = compile(&w.snap);
    assert_eq!(tp_cond(&out, "shop", "t3", "Accepted").reason, "Conflicted");
}

#[test]
fn an_invalid_mesh_setting_is_refused_by_the_sidecar_validation() {
    let world = shop().with(mesh().spec(|s| s.trust_domain = "bad domain!".into()));
    let out = compile(&world.snap);
    assert!(out.configs.is_empty());
    assert!(out.invalid.contains_key("shop"));
    let d = out.mesh.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!(d.reason, "InvalidConfig");
    assert!(d.message.contains("trustDomain"), "{}", d.message);
}

// ---------------------------------------------------------------- visibility

/// Three meshed namespaces: `shop` (reviews, reviews-v2), `shared` (auth, exported everywhere)
/// and `batch` (jobs, exported to its own namespace only); `legacy` is not meshed.
fn scoped_world() -> World {
    shop()
        .with(mesh())
        .with(namespace("shared").meshed())
        .with(namespace("batch").meshed())
        .with(service("shared", "auth").ip("10.96.2.1").port(80, "http"))
        .with(
            service("batch", "jobs")
                .ip("10.96.3.1")
                .port(80, "http")
                .annotate(EXPORT_TO_ANNOTATION, "."),
        )
}

fn listed(out: &Output, ns: &str) -> Vec<String> {
    config(out, ns)
        .outbound
        .iter()
        .map(|s| format!("{}/{}", s.namespace, s.name))
        .collect()
}

#[test]
fn export_to_hides_a_service_from_other_namespaces() {
    let out = compile(&scoped_world().snap);
    assert_round_trips(&out);
    assert!(listed(&out, "batch").contains(&"batch/jobs".to_string()));
    for ns in ["shop", "shared"] {
        assert!(
            !listed(&out, ns).contains(&"batch/jobs".to_string()),
            "{ns}: {:?}",
            listed(&out, ns)
        );
        assert!(listed(&out, ns).contains(&"shared/auth".to_string()));
    }
    // `~`: nobody, not even its own namespace.
    let w = scoped_world().with(
        service("shared", "hidden")
            .ip("10.96.2.2")
            .port(80, "http")
            .annotate(EXPORT_TO_ANNOTATION, "~"),
    );
    let out = compile(&w.snap);
    for ns in ["shop", "shared", "batch"] {
        assert!(!listed(&out, ns).contains(&"shared/hidden".to_string()));
    }
}

#[test]
fn import_from_limits_a_namespace_to_its_own_and_the_named_ones() {
    let mut w = scoped_world();
    w.snap
        .namespaces
        .retain(|n| n.metadata.name.as_deref() != Some("shop"));
    let w = w.with(
        namespace("shop")
            .meshed()
            .annotate(IMPORT_FROM_ANNOTATION, "shared"),
    );
    let out = compile(&w.snap);
    assert_round_trips(&out);
    assert_eq!(
        listed(&out, "shop"),
        ["shared/auth", "shop/reviews", "shop/reviews-v2"],
        "legacy/db is in neither imported namespace"
    );
    // Other namespaces are unaffected.
    assert!(listed(&out, "shared").contains(&"legacy/db".to_string()));
}

#[test]
fn a_policy_reaches_only_the_namespaces_that_see_its_service() {
    let base = scoped_world();
    let before = compile(&base.snap);
    // Policy on batch/jobs (exported to batch only): only batch is rewritten.
    let w = base
        .clone()
        .with(traffic_policy("batch", "jobs-policy", "jobs"));
    let out = compile_incremental(&w.snap, Some(&before));
    assert_eq!(
        out.changed_since(&before).into_iter().collect::<Vec<_>>(),
        ["batch"]
    );
    assert_eq!(out.stats.serialized, 1);
    let p = tp_cond(&out, "batch", "jobs-policy", "Programmed");
    assert!(p.is_true(), "{p:?}");
    assert!(
        p.message
            .contains("every meshed namespace that sees Service jobs"),
        "{}",
        p.message
    );
    // The same compile from scratch agrees.
    assert_eq!(out.render_all(), compile(&w.snap).render_all());

    // Policy on shared/auth (exported everywhere): every meshed namespace.
    let w = base.with(traffic_policy("shared", "auth-policy", "auth"));
    let out = compile_incremental(&w.snap, Some(&before));
    assert_eq!(
        out.changed_since(&before).into_iter().collect::<Vec<_>>(),
        ["batch", "shared", "shop"]
    );
}

#[test]
fn a_policy_on_a_service_nobody_sees_is_not_programmed() {
    // Exported only to `legacy`, which is not meshed.
    let w = shop()
        .with(
            service("shop", "internal")
                .ip("10.96.0.20")
                .port(80, "http")
                .annotate(EXPORT_TO_ANNOTATION, "legacy"),
        )
        .with(traffic_policy("shop", "p", "internal"));
    let out = compile(&w.snap);
    assert!(tp_cond(&out, "shop", "p", "Accepted").is_true());
    let p = tp_cond(&out, "shop", "p", "Programmed");
    assert!(!p.is_true());
    assert_eq!(p.reason, "NotVisible");
    assert!(p.message.contains(EXPORT_TO_ANNOTATION), "{}", p.message);
    assert_eq!(tp_cond(&out, "shop", "p", "Ready").reason, "NotVisible");
}

#[test]
fn split_backends_are_listed_wherever_the_split_service_is() {
    // reviews-v2 is hidden from everyone but shop; reviews (visible everywhere) splits to it.
    let mut w = scoped_world();
    w.snap
        .services
        .retain(|s| s.metadata.name.as_deref() != Some("reviews-v2"));
    let w = w
        .with(
            service("shop", "reviews-v2")
                .ip("10.96.0.11")
                .port(9080, "http")
                .annotate(EXPORT_TO_ANNOTATION, "."),
        )
        .with(traffic_policy("shop", "canary", "reviews").spec(|s| {
            s.split = vec![
                SplitBackend {
                    name: "reviews".into(),
                    weight: 90,
                },
                SplitBackend {
                    name: "reviews-v2".into(),
                    weight: 10,
                },
            ]
        }));
    let out = compile(&w.snap);
    assert_round_trips(&out);
    for ns in ["shop", "shared", "batch"] {
        assert!(
            listed(&out, ns).contains(&"shop/reviews-v2".to_string()),
            "{ns}: {:?}",
            listed(&out, ns)
        );
    }
}

#[test]
fn the_mesh_default_makes_services_private_unless_annotated() {
    // Services without the annotation follow `defaultExportTo: ["."]`: only their own namespace.
    let mut w = scoped_world();
    w.snap.mesh = None;
    let w = w
        .with(mesh().spec(|s| s.outbound.default_export_to = vec![".".into()]))
        .with(
            service("shared", "auth-public")
                .ip("10.96.2.9")
                .port(80, "http")
                .annotate(EXPORT_TO_ANNOTATION, "*"),
        );
    let before = compile(&w.snap);
    assert_round_trips(&before);
    assert_eq!(
        listed(&before, "shop"),
        ["shared/auth-public", "shop/reviews", "shop/reviews-v2"]
    );
    assert_eq!(
        listed(&before, "shared"),
        ["shared/auth", "shared/auth-public"]
    );
    // A policy on a private Service rewrites only its namespace.
    let after = w.clone().with(traffic_policy("shop", "r", "reviews"));
    let out = compile_incremental(&after.snap, Some(&before));
    assert_eq!(
        out.changed_since(&before).into_iter().collect::<Vec<_>>(),
        ["shop"]
    );
    // Back to the default: every Service everywhere, every namespace indexed again.
    let mut open = w.clone();
    open.snap.mesh = None;
    let open = open.with(mesh());
    let out = compile_incremental(&open.snap, Some(&before));
    assert!(listed(&out, "shop").contains(&"legacy/db".to_string()));
    assert_eq!(out.render_all(), compile(&open.snap).render_all());
}

#[test]
fn a_malformed_visibility_annotation_is_reported_and_means_everyone() {
    let mut w = scoped_world();
    w.snap
        .namespaces
        .retain(|n| n.metadata.name.as_deref() != Some("shop"));
    let w = w
        .with(
            namespace("shop")
                .meshed()
                .annotate(IMPORT_FROM_ANNOTATION, "Shared"),
        )
        .with(
            service("shared", "typo")
                .ip("10.96.2.3")
                .port(80, "http")
                .annotate(EXPORT_TO_ANNOTATION, "batch;shop"),
        );
    let out = compile(&w.snap);
    assert_round_trips(&out);
    // Both fall back to `*`.
    assert!(listed(&out, "shop").contains(&"legacy/db".to_string()));
    assert!(listed(&out, "batch").contains(&"shared/typo".to_string()));
    let d = out.mesh.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!(d.reason, "MalformedObjects");
    assert!(d.message.contains("Namespace shop"), "{}", d.message);
    assert!(d.message.contains("Service shared/typo"), "{}", d.message);
    assert!(d.message.contains("treated as *"), "{}", d.message);
}

// ---------------------------------------------------------------- incremental

/// The changes a cluster sees most, each compiled incrementally against the previous output:
/// the result equals a compile from scratch, and only the changed namespace is indexed again.
#[test]
fn incremental_compiles_redo_only_the_changed_namespace() {
    let base = busy_world().with(
        service("b", "api")
            .ip("10.96.5.1")
            .port(80, "http")
            .selector("app", "api"),
    );
    let first = compile(&base.snap);
    assert_eq!(first.stats.namespaces_indexed, 3, "shop, legacy, b");
    let check = |w: &World, indexed: usize, what: &str| {
        let inc = compile_incremental(&w.snap, Some(&first));
        let full = compile(&w.snap);
        assert_eq!(inc.render_all(), full.render_all(), "{what}");
        assert_eq!(inc.traffic_policies, full.traffic_policies, "{what}");
        assert_eq!(inc.mesh, full.mesh, "{what}");
        assert_eq!(inc.stats.namespaces_indexed, indexed, "{what}");
        inc
    };
    // Nothing changed.
    check(&base, 0, "nothing");
    // A meshed pod starts behind b/api: its identity appears in every table.
    let w = base.clone().with(
        pod("b", "api-0")
            .sa("api")
            .ip("10.5.0.9")
            .label("app", "api")
            .sidecar(),
    );
    let out = check(&w, 1, "new pod");
    let api = config(&out, "shop")
        .outbound
        .into_iter()
        .find(|s| s.name == "api")
        .unwrap();
    assert_eq!(api.identities, ["spiffe://cluster.local/ns/b/sa/api"]);
    // A pod changes (restarted without sidecar): b again.
    let mut w2 = w.clone();
    let first_w = compile(&w.snap);
    let mut p = slim_of(w2.snap.pods.iter().find(|p| p.name() == "api-0").unwrap());
    p.metadata.annotations = None;
    w2.snap
        .pods
        .insert(trellis_operator::pods::PodRecord::of(&p).unwrap());
    let inc = compile_incremental(&w2.snap, Some(&first_w));
    assert_eq!(inc.stats.namespaces_indexed, 1);
    assert_eq!(inc.render_all(), compile(&w2.snap).render_all());
    // A TrafficPolicy: no namespace indexed again, one Service serialized.
    let w = base.clone().with(traffic_policy("b", "api", "api"));
    let out = check(&w, 0, "policy");
    assert_eq!(out.stats.serialized, 1);
    // A new trust domain: everything again.
    let w = base.with(mesh().spec(|s| s.trust_domain = "example.org".into()));
    check(&w, 3, "trust domain");
}
