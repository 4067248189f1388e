//! Every validation rule in the CRDs, exercised offline with inputs that must pass and inputs
//! that must fail. Objects go through the same path the API server takes on create: schema
//! defaults, OpenAPI checks, then the CEL rules (kube's `cel` feature evaluates them).
//!
//! A failing case also names the message it expects, so a case cannot pass because some
//! *other* rule happened to reject it.

mod support;

use serde_json::{Value, json};

fn mesh(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "Mesh", "metadata": {"name": name}, "spec": spec})
}

fn tp(spec: Value) -> Value {
    json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "TrafficPolicy",
           "metadata": {"name": "p", "namespace": "shop"}, "spec": spec})
}

fn pa(spec: Value) -> Value {
    json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "PeerAuthentication",
           "metadata": {"name": "p", "namespace": "shop"}, "spec": spec})
}

fn kind_of(obj: &Value) -> &str {
    obj["kind"].as_str().unwrap()
}

#[track_caller]
fn pass(obj: Value) {
    if let Err(e) = support::admit(kind_of(&obj), &obj) {
        panic!("expected {obj} to be admitted, got: {e:#?}");
    }
}

#[track_caller]
fn fail(obj: Value, expected: &str) {
    match support::admit(kind_of(&obj), &obj) {
        Ok(()) => panic!("expected {obj} to be refused with {expected:?}, but it was admitted"),
        Err(e) => assert!(
            e.iter().any(|m| m.contains(expected)),
            "expected {obj} to be refused with {expected:?}, got: {e:#?}"
        ),
    }
}

const DURATION_MSG: &str = "must be a duration such as 500ms";

#[test]
fn mesh_must_be_named_default() {
    pass(mesh("default", json!({})));
    fail(mesh("prod", json!({})), "rename this object to default");
}

#[test]
fn mesh_default_export_to_takes_the_annotation_values() {
    for good in [
        json!(["*"]),
        json!(["."]),
        json!(["~"]),
        json!([".", "ops-1"]),
    ] {
        pass(mesh(
            "default",
            json!({"outbound": {"defaultExportTo": good}}),
        ));
    }
    for bad in [
        json!(["Ops"]),
        json!(["a_b"]),
        json!(["-a"]),
        json!(["shop/x"]),
    ] {
        fail(
            mesh("default", json!({"outbound": {"defaultExportTo": bad}})),
            "defaultExportTo entries are *, ., ~ or namespace names",
        );
    }
    fail(
        mesh(
            "default",
            json!({"outbound": {"defaultExportTo": ["~", "."]}}),
        ),
        "cannot be combined",
    );
    fail(
        mesh("default", json!({"outbound": {"defaultExportTo": []}})),
        "defaultExportTo",
    );
}

#[test]
fn mesh_ca_is_self_signed_or_secret_not_both() {
    pass(mesh(
        "default",
        json!({"ca": {"selfSigned": {"rootValidity": "8760h"}}}),
    ));
    pass(mesh(
        "default",
        json!({"ca": {"secretRef": {"name": "my-ca"}}}),
    ));
    pass(mesh("default", json!({"ca": {}})));
    fail(
        mesh(
            "default",
            json!({"ca": {"selfSigned": {}, "secretRef": {"name": "my-ca"}}}),
        ),
        "either selfSigned or secretRef, not both",
    );
}

#[test]
fn mesh_durations_follow_the_duration_grammar() {
    for good in ["24h", "90m", "1h30m", "10m", "1h0m0s"] {
        pass(mesh("default", json!({"workloadCertTtl": good})));
    }
    for bad in ["1d", "24", "1 h", "", "h", "24H", "-1h", "1.5h"] {
        fail(
            mesh("default", json!({"workloadCertTtl": bad})),
            DURATION_MSG,
        );
    }
    fail(
        mesh(
            "default",
            json!({"ca": {"selfSigned": {"rootValidity": "10y"}}}),
        ),
        DURATION_MSG,
    );
    fail(
        mesh("default", json!({"rollout": {"progressDeadline": "soon"}})),
        DURATION_MSG,
    );
    // maxLength keeps the regex cheap for the API server's CEL cost estimate.
    fail(
        mesh("default", json!({"workloadCertTtl": "1".repeat(40) + "s"})),
        "longer than 32",
    );
}

/// Issue 13 item 6: a 0s TTL (certificates expire on issue) and a root validity that would
/// overflow certificate dates are refused at `kubectl apply`, naming the range.
#[test]
fn mesh_ca_durations_are_in_range() {
    for bad in ["0s", "500ms", "9m59s", "2161h"] {
        fail(
            mesh("default", json!({"workloadCertTtl": bad})),
            "must be between 10m and 2160h",
        );
    }
    pass(mesh("default", json!({"workloadCertTtl": "2160h"})));
    for bad in ["23h", "876001h", "99999999h"] {
        fail(
            mesh(
                "default",
                json!({"ca": {"selfSigned": {"rootValidity": bad}}}),
            ),
            "must be between 24h and 876000h",
        );
    }
    for good in ["24h", "876000h", "8760h"] {
        pass(mesh(
            "default",
            json!({"ca": {"selfSigned": {"rootValidity": good}}}),
        ));
    }
}

#[test]
fn mesh_numbers_are_in_range() {
    pass(mesh(
        "default",
        json!({"observability": {"tracing": {"samplingPercent": 100.0}}}),
    ));
    pass(mesh(
        "default",
        json!({"observability": {"tracing": {"samplingPercent": 0.5}}}),
    ));
    fail(
        mesh(
            "default",
            json!({"observability": {"tracing": {"samplingPercent": 100.5}}}),
        ),
        "samplingPercent must be between 0 and 100",
    );
    fail(
        mesh("default", json!({"rollout": {"batchSize": 0}})),
        "batchSize must be at least 1",
    );
}

#[test]
fn mesh_rollout_health_gate_thresholds() {
    pass(mesh(
        "default",
        json!({"rollout": {"failurePolicy": "Rollback", "healthGate": {
            "window": "1m", "maxSuccessRateDropPercent": 0.5, "maxP99Factor": 1.5}}}),
    ));
    fail(
        mesh(
            "default",
            json!({"rollout": {"healthGate": {"window": "soon"}}}),
        ),
        DURATION_MSG,
    );
    fail(
        mesh(
            "default",
            json!({"rollout": {"healthGate": {"maxSuccessRateDropPercent": 101.0}}}),
        ),
        "maxSuccessRateDropPercent must be between 0 and 100",
    );
    fail(
        mesh(
            "default",
            json!({"rollout": {"healthGate": {"maxP99Factor": 0.5}}}),
        ),
        "maxP99Factor must be at least 1",
    );
    fail(
        mesh("default", json!({"rollout": {"failurePolicy": "Retry"}})),
        "is not one of",
    );
}

#[test]
fn mesh_enums_reject_unknown_values() {
    fail(
        mesh("default", json!({"injection": {"failurePolicy": "Maybe"}})),
        "is not one of",
    );
}

#[test]
fn traffic_policy_targets_a_service() {
    pass(tp(json!({"targetRef": {"name": "web"}})));
    pass(tp(
        json!({"targetRef": {"kind": "Service", "name": "web", "port": 8080}}),
    ));
    fail(
        tp(json!({"targetRef": {"kind": "Deployment", "name": "web"}})),
        "targetRef.kind must be Service",
    );
    fail(
        tp(json!({"targetRef": {"name": "web", "port": 0}})),
        "targetRef.port must be 1 to 65535",
    );
    fail(tp(json!({})), "required field \"targetRef\"");
}

#[test]
fn consistent_hash_needs_exactly_one_key() {
    let lb = |lb: Value| tp(json!({"targetRef": {"name": "web"}, "loadBalancer": lb}));
    pass(lb(
        json!({"algorithm": "ConsistentHash", "hash": {"header": "x-user"}}),
    ));
    pass(lb(
        json!({"algorithm": "ConsistentHash", "hash": {"cookie": "session"}}),
    ));
    pass(lb(
        json!({"algorithm": "ConsistentHash", "hash": {"sourceIp": true}}),
    ));
    pass(lb(json!({"algorithm": "RoundRobin"})));
    pass(lb(json!({})));
    fail(
        lb(json!({"algorithm": "ConsistentHash"})),
        "algorithm ConsistentHash needs hash",
    );
    fail(
        lb(json!({"algorithm": "ConsistentHash", "hash": {}})),
        "exactly one of header, cookie or sourceIp",
    );
    fail(
        lb(json!({"algorithm": "ConsistentHash", "hash": {"header": "a", "cookie": "b"}})),
        "exactly one of header, cookie or sourceIp",
    );
    fail(
        lb(json!({"algorithm": "RoundRobin", "hash": {"header": "x-user"}})),
        "only used with algorithm ConsistentHash",
    );
    // The default algorithm (P2CEWMA) is filled in before the rule runs.
    fail(
        lb(json!({"hash": {"header": "x-user"}})),
        "only used with algorithm ConsistentHash",
    );
}

#[test]
fn retries_are_bounded() {
    let r = |r: Value| tp(json!({"targetRef": {"name": "web"}, "retries": r}));
    pass(r(json!({"attempts": 1})));
    pass(r(
        json!({"attempts": 10, "budgetPercent": 100, "perTryTimeout": "200ms", "backoff": "25ms",
                  "retryOn": ["ConnectFailure", "RetriableStatusCodes"], "statusCodes": [503, 429]}),
    ));
    fail(r(json!({"attempts": 0})), "attempts must be 1 to 10");
    fail(r(json!({"attempts": 11})), "attempts must be 1 to 10");
    fail(
        r(json!({"attempts": 2, "budgetPercent": 101})),
        "budgetPercent must be 0 to 100",
    );
    fail(
        r(json!({"attempts": 2, "perTryTimeout": "2 s"})),
        DURATION_MSG,
    );
    fail(r(json!({"attempts": 2, "backoff": "fast"})), DURATION_MSG);
    fail(
        r(json!({"attempts": 2, "statusCodes": [700]})),
        "statusCodes must be HTTP status codes",
    );
    fail(
        r(json!({"attempts": 2, "retryOn": ["Always"]})),
        "is not one of",
    );
    fail(r(json!({})), "required field \"attempts\"");
}

#[test]
fn timeouts_are_durations() {
    let t = |t: Value| tp(json!({"targetRef": {"name": "web"}, "timeouts": t}));
    pass(t(
        json!({"request": "5s", "idle": "1h", "connect": "500ms"}),
    ));
    fail(t(json!({"request": "5 seconds"})), DURATION_MSG);
    fail(t(json!({"idle": "1d"})), DURATION_MSG);
    fail(t(json!({"connect": "0.5s"})), DURATION_MSG);
}

#[test]
fn split_weights_are_bounded_and_not_all_zero() {
    let s = |s: Value| tp(json!({"targetRef": {"name": "web"}, "split": s}));
    pass(s(json!([])));
    pass(s(
        json!([{"name": "web", "weight": 0}, {"name": "web-canary", "weight": 1}]),
    ));
    pass(s(json!([{"name": "web", "weight": 10000}])));
    fail(
        s(json!([{"name": "web", "weight": 0}, {"name": "web-canary", "weight": 0}])),
        "split weights are all zero",
    );
    fail(
        s(json!([{"name": "web", "weight": 10001}])),
        "weight must be 0 to 10000",
    );
}

#[test]
fn outlier_detection_and_rate_limit_are_bounded() {
    let o = |o: Value| tp(json!({"targetRef": {"name": "web"}, "outlierDetection": o}));
    pass(o(json!({"maxEjectionPercent": 100})));
    pass(o(json!({})));
    fail(
        o(json!({"maxEjectionPercent": 101})),
        "maxEjectionPercent must be 0 to 100",
    );
    fail(o(json!({"baseEjectionTime": "30"})), DURATION_MSG);
    fail(
        o(json!({"consecutiveFailures": 0})),
        "consecutiveFailures must be at least 1",
    );
    let rl = |r: Value| tp(json!({"targetRef": {"name": "web"}, "rateLimit": r}));
    pass(rl(json!({"requestsPerSecond": 100, "burst": 200})));
    fail(
        rl(json!({"requestsPerSecond": 0})),
        "requestsPerSecond must be 1 to 1000000000",
    );
    fail(
        rl(json!({"requestsPerSecond": 4_000_000_000u64})),
        "requestsPerSecond must be 1 to 1000000000",
    );
}

#[test]
fn port_level_mtls_needs_a_selector_and_numeric_ports() {
    let sel = json!({"matchLabels": {"app": "web"}});
    pass(pa(json!({"mtls": {"mode": "Strict"}})));
    pass(pa(
        json!({"selector": sel, "portLevelMtls": {"8080": {"mode": "Permissive"}}}),
    ));
    pass(pa(
        json!({"selector": sel, "portLevelMtls": {"1": {"mode": "Disable"}, "65535": {}}}),
    ));
    fail(
        pa(json!({"portLevelMtls": {"8080": {"mode": "Permissive"}}})),
        "portLevelMtls needs a selector",
    );
    for bad in ["http", "0", "65536", "123456", "80a", "-1", ""] {
        fail(
            pa(json!({"selector": sel, "portLevelMtls": {bad: {"mode": "Disable"}}})),
            "keys must be port numbers 1 to 65535",
        );
    }
    fail(pa(json!({"mtls": {"mode": "Optional"}})), "is not one of");
    // Bounded so the API server's CEL cost estimate for the key rule stays within budget.
    let many: serde_json::Map<String, Value> = (1..=17)
        .map(|p| (p.to_string(), json!({"mode": "Disable"})))
        .collect();
    fail(
        pa(json!({"selector": sel, "portLevelMtls": many})),
        "more than 16 entries",
    );
}

/// The duration rule embeds `trellis_operator::duration::PATTERN`; the parser must accept
/// exactly what the pattern accepts, or the API server would admit values the compiler refuses.
#[test]
fn duration_rule_agrees_with_the_parser() {
    let inputs = [
        "1s",
        "500ms",
        "1m30s",
        "24h",
        "0s",
        "1h1m1s1ms",
        "",
        "1",
        "s",
        "1d",
        "1.5s",
        " 1s",
        "1s ",
        "1S",
        "1ms2",
        "99999999999999999999999h",
    ];
    for input in inputs {
        // A duration field without a range rule: only the grammar decides.
        let admitted = support::admit(
            "Mesh",
            &mesh("default", json!({"rollout": {"progressDeadline": input}})),
        );
        let parsed = trellis_operator::duration::parse(input);
        // The parser may still refuse numbers too large for a u64 of milliseconds; everything
        // else must agree.
        if parsed.as_ref().is_err_and(|e| e.why.contains("too large")) {
            continue;
        }
        assert_eq!(
            admitted.is_ok(),
            parsed.is_ok(),
            "{input:?}: schema says {admitted:?}, parser says {parsed:?}"
        );
    }
    // With a range (workloadCertTtl), the CEL rules and the run-time check agree too.
    for input in inputs
        .iter()
        .chain(&["10m", "9m59s", "2160h", "2160h1ms", "600s"])
    {
        let admitted = support::admit("Mesh", &mesh("default", json!({"workloadCertTtl": input})));
        let checked = trellis_operator::api::mesh::WORKLOAD_CERT_TTL.check(input);
        if checked
            .as_ref()
            .is_err_and(|e| e.to_string().contains("too large"))
        {
            continue;
        }
        assert_eq!(
            admitted.is_ok(),
            checked.is_ok(),
            "{input:?}: schema says {admitted:?}, run-time check says {checked:?}"
        );
    }
}

/// A collector the sidecars would refuse makes every namespace's compiled config invalid, so it
/// is refused when the Mesh is applied instead.
#[test]
fn mesh_tracing_collector_is_an_address_the_sidecars_accept() {
    let with = |c: &str| {
        mesh(
            "default",
            json!({"observability": {"tracing": {"enabled": true, "collector": c}}}),
        )
    };
    for good in [
        "jaeger.tracing:4317",
        "http://otel.observability.svc:4317",
        "10.0.0.1:4317",
    ] {
        pass(with(good));
    }
    for bad in [
        "https://otel:4317",
        "otel",
        "otel:port",
        "http://otel:4317/v1",
        "a b:4317",
    ] {
        fail(with(bad), "collector must be host:port or http://host:port");
    }
}

/// Issue 15: the observability API refuses combinations nothing would act on.
#[test]
fn mesh_observability_fields_apply_only_where_they_act() {
    let obs = |o: Value| mesh("default", json!({"observability": o}));
    pass(obs(json!({})));
    pass(obs(
        json!({"mode": "Install", "metrics": {"enabled": true, "image": "prom:1"},
                    "dashboards": {"enabled": true}, "tracing": {"enabled": true}}),
    ));
    pass(obs(
        json!({"mode": "Integrate", "metrics": {"enabled": true},
                    "dashboards": {"enabled": true, "namespace": "monitoring"},
                    "tracing": {"enabled": true, "collector": "otel.monitoring:4317"}}),
    ));
    fail(
        obs(json!({"mode": "Integrate", "metrics": {"enabled": true, "image": "prom:1"}})),
        "Integrate installs nothing",
    );
    fail(
        obs(
            json!({"dashboards": {"enabled": true, "namespace": "monitoring"}, "metrics": {"enabled": true}}),
        ),
        "dashboards.namespace is where mode Integrate",
    );
    fail(
        obs(json!({"dashboards": {"enabled": true}})),
        "dashboards.enabled needs metrics.enabled",
    );
    fail(
        obs(json!({"mode": "Integrate", "tracing": {"enabled": true}})),
        "tracing.enabled needs tracing.collector",
    );
    fail(
        obs(json!({"tracing": {"enabled": true, "collector": "c:4317", "image": "j:1"}})),
        "tracing.image is the Jaeger installed",
    );
    fail(
        obs(json!({"mode": "Integrate", "dashboards": {"enabled": true, "namespace": "Bad_NS"}})),
        "dashboards.namespace must be a namespace name",
    );
    fail(obs(json!({"mode": "Auto"})), "is not one of");
}
