//! TrafficPolicy: validation, attachment to its Service, conflicts, and the compiled
//! `config::TrafficPolicy`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use trellis_proxy::config as cfg;

use super::outbound::Table;
use super::visibility::{EXPORT_TO_ANNOTATION, IMPORT_FROM_ANNOTATION};
use super::{ObjectKey, PolicyReach, age_key};
use crate::api::conditions::{Condition, ConditionStatus};
use crate::api::traffic_policy as api;
use crate::duration;

/// Why a policy is not attached.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Rejection {
    Invalid(String),
    TargetNotFound(String),
    Conflicted(String),
}

pub(crate) struct Compiled {
    /// Winning policy per target Service.
    pub attached: BTreeMap<ObjectKey, cfg::TrafficPolicy>,
    /// Every policy: its target and generation, and why it is not attached (if it is not).
    verdicts: BTreeMap<ObjectKey, (ObjectKey, Option<i64>, Option<Rejection>)>,
}

pub(crate) fn compile(policies: &[Arc<api::TrafficPolicy>], table: &Table) -> Compiled {
    let mut sorted: Vec<&api::TrafficPolicy> = policies.iter().map(Arc::as_ref).collect();
    sorted.sort_by_key(|p| age_key(&p.metadata));

    let mut attached: BTreeMap<ObjectKey, cfg::TrafficPolicy> = BTreeMap::new();
    let mut winners: BTreeMap<ObjectKey, ObjectKey> = BTreeMap::new();
    let mut verdicts = BTreeMap::new();
    for tp in sorted {
        let key = ObjectKey::of(&tp.metadata);
        let target = ObjectKey::new(key.namespace.clone(), tp.spec.target_ref.name.clone());
        let generation = tp.metadata.generation;
        let verdict = match build(tp, &key, &target, table) {
            Err(r) => Some(r),
            Ok(compiled) => match winners.get(&target) {
                Some(winner) => Some(Rejection::Conflicted(format!(
                    "Service {} already has the older TrafficPolicy {}; only one policy per \
                     Service applies. Merge the two or delete one.",
                    target.name, winner.name
                ))),
                None => {
                    winners.insert(target.clone(), key.clone());
                    attached.insert(target.clone(), compiled);
                    None
                }
            },
        };
        verdicts.insert(key, (target, generation, verdict));
    }
    Compiled { attached, verdicts }
}

impl Compiled {
    /// `Accepted`, `Programmed` and `Ready` of every policy. `reach` says, for a Service in the
    /// table, how many meshed namespaces list it (see [`visibility`](super::visibility)) and
    /// into how many of those the config was written. Messages carry counts only when something
    /// is wrong, so adding a namespace does not rewrite every policy's status.
    pub fn conditions(
        &self,
        meshed: &BTreeSet<String>,
        reach: impl Fn(&ObjectKey) -> Option<PolicyReach>,
    ) -> BTreeMap<ObjectKey, Vec<Condition>> {
        let mut out = BTreeMap::new();
        for (key, (target, generation, verdict)) in &self.verdicts {
            let g = *generation;
            let accepted = match verdict {
                None => Condition::new(
                    "Accepted",
                    ConditionStatus::True,
                    "Accepted",
                    format!("Attached to Service {}", target.name),
                    g,
                ),
                Some(Rejection::Invalid(m)) => {
                    Condition::new("Accepted", ConditionStatus::False, "Invalid", m.clone(), g)
                }
                Some(Rejection::TargetNotFound(m)) => Condition::new(
                    "Accepted",
                    ConditionStatus::False,
                    "TargetNotFound",
                    m.clone(),
                    g,
                ),
                Some(Rejection::Conflicted(m)) => Condition::new(
                    "Accepted",
                    ConditionStatus::False,
                    "Conflicted",
                    m.clone(),
                    g,
                ),
            };
            let programmed = match (verdict, reach(target)) {
                (Some(_), _) => Condition::new(
                    "Programmed",
                    ConditionStatus::False,
                    "NotAccepted",
                    "The policy is not accepted; see the Accepted condition.",
                    g,
                ),
                (None, None) => Condition::new(
                    "Programmed",
                    ConditionStatus::False,
                    "TargetNotFound",
                    "The target Service is not in the outbound table.",
                    g,
                ),
                (None, Some(_)) if meshed.is_empty() => Condition::new(
                    "Programmed",
                    ConditionStatus::False,
                    "NoMeshedNamespaces",
                    "No namespace is meshed, so no sidecar calls this Service. Label a namespace \
                     trellis.dev/inject=enabled.",
                    g,
                ),
                (None, Some(r)) if r.namespaces == 0 => Condition::new(
                    "Programmed",
                    ConditionStatus::False,
                    "NotVisible",
                    format!(
                        "No meshed namespace sees Service {}, so no sidecar applies this policy. \
                         Check the Service's {EXPORT_TO_ANNOTATION} annotation and the calling \
                         namespaces' {IMPORT_FROM_ANNOTATION} annotation.",
                        target.name
                    ),
                    g,
                ),
                (None, Some(r)) if r.written == 0 => Condition::new(
                    "Programmed",
                    ConditionStatus::False,
                    "ConfigNotWritten",
                    "No sidecar configuration that lists this Service could be written; see the \
                     Mesh's Degraded condition.",
                    g,
                ),
                (None, Some(r)) if r.written < r.namespaces => Condition::new(
                    "Programmed",
                    ConditionStatus::True,
                    "PartiallyProgrammed",
                    format!(
                        "Written into {} of the {} meshed namespaces that see Service {}; see the \
                         Mesh's Degraded condition for the others.",
                        r.written, r.namespaces, target.name
                    ),
                    g,
                ),
                (None, Some(_)) => Condition::new(
                    "Programmed",
                    ConditionStatus::True,
                    "Programmed",
                    format!(
                        "Written into the sidecar configuration of every meshed namespace that \
                         sees Service {}.",
                        target.name
                    ),
                    g,
                ),
            };
            let ready = Condition::new(
                "Ready",
                ConditionStatus::from_bool(accepted.is_true() && programmed.is_true()),
                if accepted.is_true() && programmed.is_true() {
                    "Ready".to_string()
                } else if !accepted.is_true() {
                    accepted.reason.clone()
                } else {
                    programmed.reason.clone()
                },
                "",
                g,
            );
            out.insert(key.clone(), vec![accepted, programmed, ready]);
        }
        out
    }
}

fn invalid(m: impl Into<String>) -> Rejection {
    Rejection::Invalid(m.into())
}

/// A duration field in milliseconds, within the bounds the sidecar's validator accepts
/// (`cfg::MAX_DURATION_MS`), so an absurd value is this policy's `Invalid` rather than a
/// namespace config every sidecar refuses.
fn ms(field: &str, v: &str) -> Result<u64, Rejection> {
    let ms = duration::parse_ms(v).map_err(|e| invalid(format!("{field}: {e}")))?;
    if ms == 0 {
        return Err(invalid(format!("{field}: must be greater than 0")));
    }
    if ms > cfg::MAX_DURATION_MS {
        return Err(invalid(format!(
            "{field}: must be at most {}h (30 days)",
            cfg::MAX_DURATION_MS / 3_600_000
        )));
    }
    Ok(ms)
}

fn opt_ms(field: &str, v: &Option<String>) -> Result<Option<u64>, Rejection> {
    v.as_deref().map(|v| ms(field, v)).transpose()
}

fn build(
    tp: &api::TrafficPolicy,
    key: &ObjectKey,
    target: &ObjectKey,
    table: &Table,
) -> Result<cfg::TrafficPolicy, Rejection> {
    let spec = &tp.spec;
    if spec.target_ref.kind != "Service" {
        return Err(invalid(format!(
            "targetRef.kind {:?} is not supported; only Service",
            spec.target_ref.kind
        )));
    }
    let lb = match &spec.load_balancer {
        None => cfg::LoadBalancer::default(),
        Some(lb) => {
            let algorithm = match lb.algorithm {
                api::LbAlgorithm::P2CEWMA => cfg::LbAlgorithm::P2cEwma,
                api::LbAlgorithm::LeastRequest => cfg::LbAlgorithm::LeastRequest,
                api::LbAlgorithm::RoundRobin => cfg::LbAlgorithm::RoundRobin,
                api::LbAlgorithm::Random => cfg::LbAlgorithm::Random,
                api::LbAlgorithm::ConsistentHash => cfg::LbAlgorithm::ConsistentHash,
            };
            let hash_key = match (&lb.hash, algorithm) {
                (None, cfg::LbAlgorithm::ConsistentHash) => {
                    return Err(invalid("loadBalancer.hash is required with ConsistentHash"));
                }
                (None, _) => None,
                (Some(_), a) if a != cfg::LbAlgorithm::ConsistentHash => {
                    return Err(invalid(
                        "loadBalancer.hash only applies to the ConsistentHash algorithm",
                    ));
                }
                (Some(h), _) => match (&h.header, &h.cookie, h.source_ip) {
                    (Some(n), None, None | Some(false)) if !n.is_empty() => {
                        Some(cfg::HashKey::Header(n.clone()))
                    }
                    (None, Some(n), None | Some(false)) if !n.is_empty() => {
                        Some(cfg::HashKey::Cookie(n.clone()))
                    }
                    (None, None, Some(true)) => Some(cfg::HashKey::SourceIp),
                    _ => {
                        return Err(invalid(
                            "loadBalancer.hash: set exactly one of header, cookie or sourceIp",
                        ));
                    }
                },
            };
            cfg::LoadBalancer {
                algorithm,
                hash_key,
            }
        }
    };
    let timeouts = match &spec.timeouts {
        None => cfg::Timeouts::default(),
        Some(t) => cfg::Timeouts {
            request_ms: opt_ms("timeouts.request", &t.request)?,
            idle_ms: opt_ms("timeouts.idle", &t.idle)?,
            connect_ms: opt_ms("timeouts.connect", &t.connect)?,
        },
    };
    let retries = spec.retries.as_ref().map(retries).transpose()?;
    let circuit_breaker = match &spec.circuit_breaker {
        None => None,
        Some(c) => {
            for (f, v) in [
                ("maxConnections", c.max_connections),
                ("maxPendingRequests", c.max_pending_requests),
                ("maxRequests", c.max_requests),
            ] {
                if v == Some(0) {
                    return Err(invalid(format!(
                        "circuitBreaker.{f}: must be at least 1 (0 would refuse every request)"
                    )));
                }
            }
            Some(cfg::CircuitBreaker {
                max_connections: c.max_connections,
                max_pending_requests: c.max_pending_requests,
                max_requests: c.max_requests,
            })
        }
    };
    let outlier_detection = match &spec.outlier_detection {
        None => None,
        Some(o) => {
            if o.consecutive_failures == 0 {
                return Err(invalid(
                    "outlierDetection.consecutiveFailures: must be at least 1",
                ));
            }
            if o.max_ejection_percent > 100 {
                return Err(invalid(
                    "outlierDetection.maxEjectionPercent: must be between 0 and 100",
                ));
            }
            Some(cfg::OutlierDetection {
                consecutive_failures: o.consecutive_failures,
                base_ejection_ms: ms("outlierDetection.baseEjectionTime", &o.base_ejection_time)?,
                max_ejection_percent: o.max_ejection_percent,
            })
        }
    };
    let rate_limit = match &spec.rate_limit {
        None => None,
        Some(r) => {
            let burst = r.burst.unwrap_or(r.requests_per_second);
            if r.requests_per_second == 0 {
                return Err(invalid("rateLimit.requestsPerSecond: must be at least 1"));
            }
            if f64::from(r.requests_per_second) > cfg::MAX_RATE_PER_SECOND {
                return Err(invalid(format!(
                    "rateLimit.requestsPerSecond: must be at most {}",
                    cfg::MAX_RATE_PER_SECOND
                )));
            }
            if burst == 0 {
                return Err(invalid("rateLimit.burst: must be at least 1"));
            }
            Some(cfg::RateLimit {
                requests_per_second: f64::from(r.requests_per_second),
                burst,
            })
        }
    };
    let mut split = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, b) in spec.split.iter().enumerate() {
        if b.weight > 10_000 {
            return Err(invalid(format!(
                "split[{i}].weight: must be between 0 and 10000"
            )));
        }
        if !seen.insert(b.name.as_str()) {
            return Err(invalid(format!(
                "split[{i}]: Service {} is listed twice",
                b.name
            )));
        }
        let backend = ObjectKey::new(key.namespace.clone(), b.name.clone());
        if table.get(&backend).is_none() {
            return Err(invalid(format!(
                "split[{i}]: Service {} not found in namespace {}",
                b.name, key.namespace
            )));
        }
        split.push(cfg::WeightedBackend {
            service: format!("{}.{}", b.name, key.namespace),
            weight: b.weight,
        });
    }
    if !split.is_empty() && split.iter().all(|b| b.weight == 0) {
        return Err(invalid("split: at least one weight must be positive"));
    }

    // Target checks come after validation so a user fixing an invalid policy sees every
    // problem of the spec before the one of the cluster.
    let Some(svc) = table.get(target) else {
        return Err(Rejection::TargetNotFound(format!(
            "Service {} not found in namespace {} (or it has no TCP port)",
            target.name, target.namespace
        )));
    };
    if let Some(port) = spec.target_ref.port
        && svc.port(port).is_none()
    {
        return Err(Rejection::TargetNotFound(format!(
            "Service {} has no TCP port {port}",
            target.name
        )));
    }

    Ok(cfg::TrafficPolicy {
        source: key.to_string(),
        port: spec.target_ref.port,
        load_balancer: lb,
        timeouts,
        retries,
        circuit_breaker,
        outlier_detection,
        rate_limit,
        split,
    })
}

fn retries(r: &api::RetriesSpec) -> Result<cfg::Retries, Rejection> {
    if !(1..=10).contains(&r.attempts) {
        return Err(invalid("retries.attempts: must be between 1 and 10"));
    }
    let mut retry_on: Vec<cfg::RetryOn> = if r.retry_on.is_empty() {
        vec![
            cfg::RetryOn::ConnectFailure,
            cfg::RetryOn::Reset,
            cfg::RetryOn::GatewayError,
        ]
    } else {
        r.retry_on
            .iter()
            .map(|o| match o {
                api::RetryOn::ConnectFailure => cfg::RetryOn::ConnectFailure,
                api::RetryOn::Reset => cfg::RetryOn::Reset,
                api::RetryOn::ServerError => cfg::RetryOn::ServerError,
                api::RetryOn::GatewayError => cfg::RetryOn::GatewayError,
                api::RetryOn::RetriableStatusCodes => cfg::RetryOn::RetriableStatusCodes,
                api::RetryOn::GrpcStatus => cfg::RetryOn::GrpcStatus,
            })
            .collect()
    };
    let mut dedup = Vec::new();
    retry_on.retain(|o| {
        let fresh = !dedup.contains(o);
        dedup.push(*o);
        fresh
    });
    if let Some(c) = r.status_codes.iter().find(|c| !(100..=599).contains(*c)) {
        return Err(invalid(format!(
            "retries.statusCodes: {c} is not an HTTP status code (100-599)"
        )));
    }
    if retry_on.contains(&cfg::RetryOn::RetriableStatusCodes) && r.status_codes.is_empty() {
        return Err(invalid(
            "retries.retryOn RetriableStatusCodes needs retries.statusCodes",
        ));
    }
    if retry_on.contains(&cfg::RetryOn::GrpcStatus) && r.grpc_codes.is_empty() {
        return Err(invalid(
            "retries.retryOn GrpcStatus needs retries.grpcCodes",
        ));
    }
    let budget = r.budget_percent.unwrap_or(20);
    if budget > 100 {
        return Err(invalid("retries.budgetPercent: must be between 0 and 100"));
    }
    let backoff_base_ms = match &r.backoff {
        Some(b) => ms("retries.backoff", b)?,
        None => 25,
    };
    let mut status_codes = r.status_codes.clone();
    status_codes.sort_unstable();
    status_codes.dedup();
    let mut grpc_codes: Vec<u32> = r.grpc_codes.iter().map(|c| c.code()).collect();
    grpc_codes.sort_unstable();
    grpc_codes.dedup();
    Ok(cfg::Retries {
        attempts: r.attempts,
        per_try_timeout_ms: opt_ms("retries.perTryTimeout", &r.per_try_timeout)?,
        retry_on,
        status_codes,
        grpc_codes,
        backoff_base_ms,
        // The backoff doubles from the base; cap it at eight times the base (three doublings)
        // and never below the sidecar's default cap.
        backoff_max_ms: backoff_base_ms.saturating_mul(8).max(250),
        budget_percent: f64::from(budget),
        min_retries_per_second: r.min_retries_per_second.unwrap_or(10),
        retry_non_idempotent: r.retry_non_idempotent,
    })
}
