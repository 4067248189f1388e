//! The [`Dispatcher`]: per-destination state and the per-request pipeline
//! (rate limit → split → circuit breaker → pick → attempt → classify → retry/eject).
//!
//! State lives in an immutable table swapped on every reload ([`Dispatcher::update`]). A
//! request takes a reference to its route once, so a reload never changes a request midway;
//! endpoint states, circuit-breaker counters, retry budgets and rate-limit buckets are carried
//! over into the new table when their key (and, for buckets, their parameters) stay the same.

use std::collections::HashMap;

use crate::lookup::FastMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, Method, Request, Response, StatusCode};
use rand::Rng;

use super::balance::{EndpointSet, Pick, hash_bytes, hash_ip};
use super::body::{Guarded, Replay};
use super::discover::{Discover, InlineEndpoints};
use super::endpoint::{EndpointState, InflightGuard, now_ms_at};
use super::limit::{RetryBudget, TokenBucket, rate_limited_response};
use super::metrics::{DestMetrics, TrafficMetrics};
use super::{
    AttemptEvent, AttemptEventKind, Body, ConnectionParams, Outcome, Reply, RequestCtx,
    RetryReason, Target, Upstream, UpstreamError, error_response, error_response_with,
};
use crate::config::{
    CircuitBreaker, HashKey, LbAlgorithm, OutboundService, OutlierDetection, Protocol, ProxyConfig,
    RetryOn, ServicePort, TrafficPolicy,
};

/// Applies the traffic policy of each destination to outbound requests.
pub struct Dispatcher {
    upstream: Arc<dyn Upstream>,
    discover: Arc<dyn Discover>,
    metrics: TrafficMetrics,
    table: RwLock<Arc<Table>>,
    /// The last config applied, so [`Dispatcher::refresh_endpoints`] can rebuild from it.
    config: Mutex<Option<Arc<ProxyConfig>>>,
}

/// A snapshot of one endpoint's state.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointStats {
    pub addr: std::net::SocketAddr,
    pub inflight: u32,
    /// Peak-EWMA latency estimate as the balancer sees it now; zero before the first answer.
    pub rtt_estimate: Duration,
    pub ejected: bool,
    /// Ejections so far (decayed by healthy time); the next lasts `base * 2^ejections`.
    pub ejections: u32,
}

/// Routes by namespace, then name, then port: looked up with `&str`s, no key is built.
#[derive(Default)]
struct Table {
    routes: FastMap<String, FastMap<String, PortRoutes>>,
}

/// The routes of one Service, by port (few ports: a linear scan beats hashing).
type PortRoutes = Vec<(u16, Arc<Route>)>;

impl Table {
    fn get(&self, namespace: &str, name: &str, port: u16) -> Option<&Arc<Route>> {
        self.routes
            .get(namespace)?
            .get(name)?
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, r)| r)
    }

    fn insert(&mut self, namespace: &str, name: &str, port: u16, route: Arc<Route>) {
        let ports = self
            .routes
            .entry(namespace.to_string())
            .or_default()
            .entry(name.to_string())
            .or_default();
        ports.retain(|(p, _)| *p != port);
        ports.push((port, route));
    }

    fn destinations(&self) -> impl Iterator<Item = &Arc<Destination>> {
        self.routes
            .values()
            .flat_map(|m| m.values())
            .flat_map(|v| v.iter().map(|(_, r)| &r.dest))
    }
}

/// What the requested Service's policy decides per request: timeouts, retries, rate limit and
/// the split. (The backend's own policy decides balancing, circuit breaking and ejection.)
struct Route {
    dest: Arc<Destination>,
    /// `(cumulative weight, backend)`; empty = no split.
    split: Vec<(u32, Arc<Destination>)>,
    split_total: u32,
    request_timeout: Option<Duration>,
    retries: Option<RetryPolicy>,
    rate_limit: Option<Arc<TokenBucket>>,
}

struct RetryPolicy {
    attempts: u32,
    per_try_timeout: Option<Duration>,
    on_connect_failure: bool,
    on_reset: bool,
    on_server_error: bool,
    on_gateway_error: bool,
    on_status: bool,
    on_grpc: bool,
    status_codes: Vec<u16>,
    /// Bit `n` set: gRPC status `n` is retried.
    grpc_codes: u32,
    backoff_base: Duration,
    backoff_max: Duration,
    non_idempotent: bool,
    budget: Arc<RetryBudget>,
}

/// One backend Service port: its endpoints and the state that balancing, circuit breaking and
/// outlier detection keep.
struct Destination {
    key: Arc<str>,
    protocol: Protocol,
    identities: Arc<[String]>,
    endpoints: EndpointSet,
    lb: LbAlgorithm,
    hash_key: Option<HashKey>,
    limits: CircuitBreaker,
    outlier: Option<OutlierDetection>,
    connect_timeout: Option<Duration>,
    conn_params: Option<ConnectionParams>,
    counters: Arc<Counters>,
    rr: AtomicUsize,
    metrics: DestMetrics,
}

/// Circuit-breaker counters, shared across reloads.
#[derive(Default)]
struct Counters {
    /// Requests admitted and not finished (response body still streaming counts).
    active: AtomicU32,
    /// Attempts waiting for response headers.
    pending: AtomicU32,
    /// Serializes ejection decisions so the max-ejection percentage holds under concurrency.
    eject: Mutex<()>,
}

/// Why a request was shed by a circuit breaker.
#[derive(Clone, Copy)]
enum Overflow {
    Requests,
    Pending,
    Connections,
}

struct ActiveGuard(Arc<Counters>);
impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}
struct PendingGuard(Arc<Counters>);
impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Guards a response body carries until it ends.
#[allow(dead_code)] // Held for their Drop.
struct ResponseGuards(Option<InflightGuard>, ActiveGuard);

/// Kind of a failed or unsuccessful attempt, for retry and ejection decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Success,
    Status(u16),
    Grpc(u32),
    Connect,
    Reset,
    Timeout,
    /// The pool had no stream for it (never sent): retried like a connect failure, but not a
    /// failure of the endpoint for ejection.
    Overflow,
    /// The peer refused the stream unprocessed (HTTP/2 `REFUSED_STREAM`): an endpoint at its
    /// stream limit, not a broken one, so not a failure for ejection either.
    Refused,
}

impl Class {
    /// What a retry of an attempt of this class is recorded with; `None` for a success.
    fn retry_reason(self) -> Option<RetryReason> {
        Some(match self {
            Class::Success => return None,
            Class::Status(s) => RetryReason::Status(s),
            Class::Grpc(c) => RetryReason::Grpc(c),
            Class::Connect => RetryReason::ConnectFailure,
            Class::Reset => RetryReason::Reset,
            Class::Timeout => RetryReason::PerTryTimeout,
            Class::Overflow => RetryReason::Overflow,
            Class::Refused => RetryReason::Refused,
        })
    }
}

impl Dispatcher {
    pub fn new(upstream: Arc<dyn Upstream>) -> Self {
        Self::with_parts(upstream, Arc::new(InlineEndpoints), TrafficMetrics::new())
    }

    /// A dispatcher counting into `metrics` (register them with [`TrafficMetrics::register`]).
    pub fn new_with_metrics(upstream: Arc<dyn Upstream>, metrics: TrafficMetrics) -> Self {
        Self::with_parts(upstream, Arc::new(InlineEndpoints), metrics)
    }

    pub fn with_parts(
        upstream: Arc<dyn Upstream>,
        discover: Arc<dyn Discover>,
        metrics: TrafficMetrics,
    ) -> Self {
        Self {
            upstream,
            discover,
            metrics,
            table: RwLock::new(Arc::new(Table::default())),
            config: Mutex::new(None),
        }
    }

    pub fn metrics(&self) -> &TrafficMetrics {
        &self.metrics
    }

    /// The endpoints currently balanced over for `namespace/name:port`, with their balancer
    /// and outlier state (for the admin `/config` view and tests).
    pub fn endpoint_stats(&self, namespace: &str, name: &str, port: u16) -> Vec<EndpointStats> {
        let table = self.table.read().expect("table lock").clone();
        let Some(r) = table.get(namespace, name, port) else {
            return Vec::new();
        };
        r.dest
            .endpoints
            .eps
            .iter()
            .map(|e| EndpointStats {
                addr: e.addr(),
                inflight: e.inflight(),
                rtt_estimate: e.rtt_estimate(),
                ejected: e.is_ejected(),
                ejections: e.ejections(),
            })
            .collect()
    }

    /// Applies a new config (call on every reload). Requests in flight keep the state they
    /// started with; kept endpoints keep their statistics; removed endpoints drain.
    pub fn update(&self, cfg: &ProxyConfig) {
        // Held across the rebuild so concurrent updates apply one after the other, each
        // carrying over the state of the previous table.
        let mut last = self.config.lock().expect("config lock");
        let cfg = Arc::new(cfg.clone());
        self.rebuild(&cfg);
        *last = Some(cfg);
    }

    /// Rebuilds endpoint sets from the last config, for a discovery source whose view changed.
    pub fn refresh_endpoints(&self) {
        let last = self.config.lock().expect("config lock");
        if let Some(cfg) = last.as_ref() {
            self.rebuild(cfg);
        }
    }

    fn rebuild(&self, cfg: &ProxyConfig) {
        let old = self.table.read().expect("table lock").clone();
        let mut dests: HashMap<(&str, &str, u16), Arc<Destination>> = HashMap::new();
        for svc in &cfg.outbound {
            for sp in &svc.ports {
                let prev = old.get(&svc.namespace, &svc.name, sp.port).map(|r| &r.dest);
                let d = self.build_destination(svc, sp, prev);
                dests.insert((&svc.namespace, &svc.name, sp.port), Arc::new(d));
            }
        }
        // Split backends by key, once: `cfg.service()` scans, and every Service may split.
        let by_key: HashMap<String, &OutboundService> =
            cfg.outbound.iter().map(|s| (s.key(), s)).collect();
        let mut table = Table::default();
        for svc in &cfg.outbound {
            for sp in &svc.ports {
                let dest = dests[&(svc.namespace.as_str(), svc.name.as_str(), sp.port)].clone();
                let prev = old.get(&svc.namespace, &svc.name, sp.port);
                let policy = policy_for_port(svc, sp.port);
                let mut split = Vec::new();
                let mut total = 0u32;
                for b in policy.map(|p| p.split.as_slice()).unwrap_or(&[]) {
                    let Some(bsvc) = by_key.get(&b.service) else {
                        continue; // validate() refuses unknown backends; skip defensively.
                    };
                    let bport = bsvc
                        .port(sp.port)
                        .or_else(|| bsvc.ports.first())
                        .map(|p| p.port);
                    let Some(bdest) =
                        bport.and_then(|p| dests.get(&(&bsvc.namespace, &bsvc.name, p)))
                    else {
                        continue;
                    };
                    // validate() bounds the sum; a weight that would overflow it is skipped
                    // rather than wrapped.
                    if let Some(t) = total.checked_add(b.weight)
                        && b.weight > 0
                    {
                        total = t;
                        split.push((total, bdest.clone()));
                    }
                }
                let route = build_route(dest, policy, split, total, prev.map(|r| &**r));
                table.insert(&svc.namespace, &svc.name, sp.port, Arc::new(route));
            }
        }
        // Endpoints removed while ejected no longer count in the gauge.
        for d in old.destinations() {
            for ep in &d.endpoints.eps {
                if ep.is_ejected()
                    && !table
                        .destinations()
                        .any(|n| n.endpoints.eps.iter().any(|e| Arc::ptr_eq(e, ep)))
                {
                    d.metrics.ejected.dec();
                }
            }
        }
        *self.table.write().expect("table lock") = Arc::new(table);
    }

    fn build_destination(
        &self,
        svc: &OutboundService,
        sp: &ServicePort,
        prev: Option<&Arc<Destination>>,
    ) -> Destination {
        let policy = policy_for_port(svc, sp.port);
        let identities: Arc<[String]> = svc.identities.clone().into();
        let lb = policy.map(|p| p.load_balancer.clone()).unwrap_or_default();
        let eps: Vec<Arc<EndpointState>> = self
            .discover
            .endpoints(svc, sp)
            .into_iter()
            .map(|e| {
                let ids: Arc<[String]> = match &e.identity {
                    Some(id) => Arc::from(vec![id.clone()]),
                    None => identities.clone(),
                };
                prev.and_then(|d| {
                    d.endpoints
                        .eps
                        .iter()
                        .find(|o| o.addr == e.address && o.identities == ids)
                        .cloned()
                })
                .unwrap_or_else(|| Arc::new(EndpointState::new(e.address, ids)))
            })
            .collect();
        let timeouts = policy.map(|p| p.timeouts.clone()).unwrap_or_default();
        let limits = policy
            .and_then(|p| p.circuit_breaker.clone())
            .unwrap_or_default();
        let conn_params =
            (timeouts.idle_ms.is_some() || limits.max_connections.is_some()).then(|| {
                ConnectionParams {
                    idle_timeout: timeouts.idle_ms.map(Duration::from_millis),
                    max_connections: limits.max_connections,
                }
            });
        let key: Arc<str> = Arc::from(svc.key());
        Destination {
            metrics: self.metrics.for_backend(&key),
            key,
            protocol: sp.protocol,
            identities,
            endpoints: EndpointSet::new(eps, lb.algorithm == LbAlgorithm::ConsistentHash),
            lb: lb.algorithm,
            hash_key: lb.hash_key,
            limits,
            outlier: policy.and_then(|p| p.outlier_detection.clone()),
            connect_timeout: timeouts.connect_ms.map(Duration::from_millis),
            conn_params,
            counters: prev.map(|d| d.counters.clone()).unwrap_or_default(),
            rr: AtomicUsize::new(0),
        }
    }

    fn route(&self, service: &OutboundService, port: u16) -> Arc<Route> {
        if let Some(r) =
            self.table
                .read()
                .expect("table lock")
                .get(&service.namespace, &service.name, port)
        {
            return r.clone();
        }
        // Not in the last applied config (the core dispatched before calling `update`, or the
        // service is synthesized): build its state once and keep it until the next reload.
        let mut guard = self.table.write().expect("table lock");
        if let Some(r) = guard.get(&service.namespace, &service.name, port) {
            return r.clone();
        }
        let fallback;
        let sp = match service.port(port) {
            Some(sp) => sp,
            None => {
                fallback = ServicePort {
                    port,
                    name: None,
                    protocol: Protocol::Auto,
                    endpoints: Vec::new(),
                };
                &fallback
            }
        };
        let dest = Arc::new(self.build_destination(service, sp, None));
        let policy = policy_for_port(service, port);
        let route = Arc::new(build_route(dest, policy, Vec::new(), 0, None));
        let mut table = Table {
            routes: guard.routes.clone(),
        };
        table.insert(&service.namespace, &service.name, port, route.clone());
        *guard = Arc::new(table);
        route
    }

    /// Sends a request for `service:port`, applying its policy; always returns a response (errors
    /// become 429/502/503/504), with the [`Outcome`] beside it.
    pub async fn dispatch(
        &self,
        service: &OutboundService,
        port: u16,
        req: Request<Body>,
        ctx: &RequestCtx,
    ) -> (Response<Body>, Outcome) {
        let route = self.route(service, port);
        let mut outcome = Outcome::default();
        let resp = match route.request_timeout {
            Some(t) => {
                match tokio::time::timeout(t, self.run(&route, req, ctx, &mut outcome)).await {
                    Ok(r) => r,
                    Err(_) => {
                        outcome.events.push(AttemptEvent {
                            at: SystemTime::now(),
                            attempt: outcome.attempts,
                            kind: AttemptEventKind::RequestTimeout { after: t },
                        });
                        outcome.flags.push("UT");
                        route.dest.metrics.timeouts.inc();
                        error_response_with(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
                    }
                }
            }
            None => self.run(&route, req, ctx, &mut outcome).await,
        };
        (resp, outcome)
    }

    async fn run(
        &self,
        route: &Route,
        req: Request<Body>,
        ctx: &RequestCtx,
        outcome: &mut Outcome,
    ) -> Response<Body> {
        if let Some(rl) = &route.rate_limit
            && let Err(wait) = rl.try_acquire()
        {
            outcome.backend = route.dest.key.clone();
            outcome.flags.push("RL");
            route.dest.metrics.rate_limited.inc();
            return rate_limited_response(wait);
        }
        let dest = route.pick_backend();
        outcome.backend = dest.key.clone();
        dest.metrics.requests.inc();
        let active = match dest.admit() {
            Ok(g) => g,
            Err(o) => return dest.overflow(o, outcome),
        };

        let (parts, body) = req.into_parts();
        let retry = route.retries.as_ref().filter(|r| r.attempts > 1).map(|r| {
            (
                r,
                is_idempotent(&parts.method) || r.non_idempotent,
                is_grpc(&parts.headers),
            )
        });
        let max_attempts = retry.map_or(1, |(r, ..)| r.attempts);
        let (replay, mut body) = match retry {
            Some(_) => (Some(Replay::new(body)), None),
            None => (None, Some(body)),
        };
        if let Some((r, ..)) = retry {
            r.budget.deposit();
        }
        let hash = dest.request_hash(&parts.headers, ctx);
        let mut tried = [0usize; 10];
        let mut ntried = 0usize;
        let mut parts = Some(parts);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            outcome.attempts = attempt;
            let (target, idx) = dest.pick(&tried[..ntried], hash, ctx);
            outcome.endpoint = Some(target.addr);
            let pending = match dest.start_pending() {
                Ok(g) => g,
                Err(o) => return dest.overflow(o, outcome),
            };
            let last = attempt >= max_attempts;
            let req_parts = if last {
                parts.take().expect("parts until the last attempt")
            } else {
                parts.clone().expect("parts until the last attempt")
            };
            let attempt_body = match &replay {
                Some(r) => r.attempt(),
                None => body.take().expect("one attempt without replay"),
            };
            let mut req = Request::from_parts(req_parts, attempt_body);
            if let Some(p) = dest.conn_params {
                req.extensions_mut().insert(p);
            }
            let ep = idx.map(|i| &dest.endpoints.eps[i]);
            let inflight = ep.map(|e| e.start());
            let sent = Instant::now();
            let send = self.upstream.send(target, req);
            let per_try = retry.and_then(|(r, ..)| r.per_try_timeout);
            let res = match per_try {
                // Only the timer firing makes an attempt a timeout: a connect failure or a
                // reset inside the window keeps its own class (its retry rules, its flag).
                Some(t) => match tokio::time::timeout(t, send).await {
                    Ok(r) => r.map_err(|e| (e, false)),
                    Err(_) => {
                        outcome.events.push(AttemptEvent {
                            at: SystemTime::now(),
                            attempt,
                            kind: AttemptEventKind::PerTryTimeout { after: t },
                        });
                        Err((
                            UpstreamError::Other {
                                addr: outcome.endpoint.expect("set above"),
                                source: "per-try timeout".into(),
                            },
                            true,
                        ))
                    }
                },
                None => send.await.map_err(|e| (e, false)),
            };
            drop(pending);
            let class = classify(&res);
            if let (Some(ep), Some(i)) = (ep, idx) {
                if res.is_ok() {
                    let done = Instant::now();
                    ep.observe_rtt(done.saturating_duration_since(sent), done);
                }
                dest.record(i, class);
            }
            if let Some((policy, safe, grpc)) = retry {
                let wants = policy.retriable(class, safe, grpc);
                if wants {
                    if !last && replay.as_ref().is_some_and(|r| r.can_replay()) {
                        if policy.budget.withdraw() {
                            if let Some(i) = idx
                                && ntried < tried.len()
                            {
                                tried[ntried] = i;
                                ntried += 1;
                            }
                            drop(res);
                            drop(inflight);
                            dest.metrics.retries.inc();
                            if let Some(reason) = class.retry_reason() {
                                outcome.events.push(AttemptEvent {
                                    at: SystemTime::now(),
                                    attempt,
                                    kind: AttemptEventKind::Retry { reason },
                                });
                            }
                            tokio::time::sleep(policy.backoff(attempt)).await;
                            continue;
                        }
                        dest.metrics.budget_exhausted.inc();
                    } else if last {
                        outcome.flags.push("URX");
                    }
                }
            }
            return match res {
                Ok(reply) => {
                    outcome.peer = reply.peer;
                    let (p, inner) = reply.resp.into_parts();
                    let guarded = Guarded {
                        inner,
                        guard: Some(ResponseGuards(inflight, active)),
                    };
                    Response::from_parts(p, http_body_util::BodyExt::boxed(guarded))
                }
                Err((e, per_try_timeout)) => {
                    tracing::debug!(error = %e, backend = %dest.key, "upstream attempt failed");
                    let (status, flag) = match (class, per_try_timeout) {
                        (_, true) => (StatusCode::GATEWAY_TIMEOUT, "UT"),
                        (Class::Overflow | Class::Refused, _) => {
                            (StatusCode::SERVICE_UNAVAILABLE, "UO")
                        }
                        (Class::Connect, _) => (StatusCode::SERVICE_UNAVAILABLE, "UF"),
                        _ => (StatusCode::BAD_GATEWAY, "UC"),
                    };
                    outcome.flags.push(flag);
                    if per_try_timeout {
                        error_response_with(status, "upstream request timeout (per try)")
                    } else {
                        error_response_with(status, &e.user_message())
                    }
                }
            };
        }
    }
}

/// Why an opaque TCP connection was refused before connecting.
#[derive(Debug, thiserror::Error)]
pub enum TcpRefused {
    #[error("local rate limit reached; retry in {0:?}")]
    RateLimited(Duration),
    #[error("circuit breaker: too many connections to {backend}")]
    Overflow { backend: String },
}

/// The endpoint chosen for one opaque TCP connection. Holding it counts the connection (for
/// least-request/P2C load and `maxConnections`); drop it when the connection closes.
pub struct TcpTarget {
    pub target: Target,
    /// `name.namespace` of the backend Service (after a split).
    pub backend: String,
    dest: Arc<Destination>,
    idx: Option<usize>,
    _inflight: Option<InflightGuard>,
    _active: ActiveGuard,
}

impl TcpTarget {
    /// Reports how connecting went: a failure counts toward ejection; the connect time feeds
    /// the latency estimate.
    pub fn connected(&self, result: Result<Duration, ()>) {
        let Some(i) = self.idx else {
            return;
        };
        match result {
            Ok(took) => {
                self.dest.endpoints.eps[i].observe_rtt(took, Instant::now());
                self.dest.record(i, Class::Success);
            }
            Err(()) => self.dest.record(i, Class::Connect),
        }
    }
}

impl Dispatcher {
    /// Picks the endpoint for an opaque TCP connection to `service:port`, applying the policy
    /// that makes sense per connection: rate limit (one token per connection), split,
    /// `maxConnections`, balancing and ejection. The core connects to `target` and reports with
    /// [`TcpTarget::connected`]; on failure it may pick again.
    pub fn pick_tcp(
        &self,
        service: &OutboundService,
        port: u16,
        ctx: &RequestCtx,
    ) -> Result<TcpTarget, TcpRefused> {
        let route = self.route(service, port);
        if let Some(rl) = &route.rate_limit
            && let Err(wait) = rl.try_acquire()
        {
            route.dest.metrics.rate_limited.inc();
            return Err(TcpRefused::RateLimited(wait));
        }
        let dest = route.pick_backend().clone();
        dest.metrics.requests.inc();
        let active = dest.admit().map_err(|o| {
            let mut outcome = Outcome::default();
            dest.overflow(o, &mut outcome);
            TcpRefused::Overflow {
                backend: dest.key.to_string(),
            }
        })?;
        let hash = match (&dest.lb, &dest.hash_key) {
            (LbAlgorithm::ConsistentHash, Some(HashKey::SourceIp)) => Some(hash_ip(ctx.source_ip)),
            _ => None,
        };
        let (target, idx) = dest.pick(&[], hash, ctx);
        let inflight = idx.map(|i| dest.endpoints.eps[i].start());
        Ok(TcpTarget {
            target,
            backend: dest.key.to_string(),
            idx,
            _inflight: inflight,
            _active: active,
            dest,
        })
    }
}

fn classify(res: &Result<Reply, (UpstreamError, bool)>) -> Class {
    match res {
        Ok(Reply { resp: r, .. }) => {
            let s = r.status().as_u16();
            if s >= 500 {
                return Class::Status(s);
            }
            // Trailers-only gRPC responses carry the status in the headers.
            if let Some(code) = r
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok())
                && code != 0
            {
                return Class::Grpc(code);
            }
            if s >= 400 {
                Class::Status(s)
            } else {
                Class::Success
            }
        }
        Err((_, true)) => Class::Timeout,
        Err((UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout { .. }, _)) => {
            Class::Connect
        }
        Err((UpstreamError::Tls { .. }, _)) => Class::Connect,
        Err((UpstreamError::Overflow { .. }, _)) => Class::Overflow,
        Err((UpstreamError::Refused { .. }, _)) => Class::Refused,
        Err((UpstreamError::Reset { .. } | UpstreamError::Other { .. }, _)) => Class::Reset,
    }
}

impl RetryPolicy {
    /// Whether `class` may be retried. A connect failure never reached the server, so it is
    /// safe for any method. Other failures need an idempotent method (or the policy's opt-in),
    /// except gRPC status codes the policy lists: gRPC's own retry design leaves the safety
    /// judgement to the listed codes, and every gRPC call is a POST.
    fn retriable(&self, class: Class, safe: bool, grpc: bool) -> bool {
        match class {
            Class::Success => false,
            Class::Connect | Class::Overflow => self.on_connect_failure,
            // Nothing was processed, so the method does not matter; a policy that retries
            // either connect failures or resets covers a refusal (it is a bit of both).
            Class::Refused => self.on_connect_failure || self.on_reset,
            Class::Reset => safe && self.on_reset,
            Class::Timeout => safe && (self.on_server_error || self.on_gateway_error),
            Class::Status(s) => {
                safe && ((self.on_server_error && s >= 500)
                    || (self.on_gateway_error && (502..=504).contains(&s))
                    || (self.on_status && self.status_codes.contains(&s)))
            }
            Class::Grpc(code) => {
                (safe || grpc) && self.on_grpc && code < 32 && self.grpc_codes & (1 << code) != 0
            }
        }
    }

    /// Exponential backoff with full jitter: uniform in `[0, min(max, base * 2^(n-1))]`.
    fn backoff(&self, retry: u32) -> Duration {
        let cap = self
            .backoff_base
            .saturating_mul(1u32 << (retry - 1).min(16))
            .min(self.backoff_max);
        if cap.is_zero() {
            return cap;
        }
        Duration::from_nanos(rand::rng().random_range(0..=cap.as_nanos() as u64))
    }
}

impl Route {
    fn pick_backend(&self) -> &Arc<Destination> {
        if self.split.is_empty() {
            return &self.dest;
        }
        let r = rand::rng().random_range(0..self.split_total);
        let i = self.split.partition_point(|(cum, _)| *cum <= r);
        &self.split[i].1
    }
}

impl Destination {
    fn admit(&self) -> Result<ActiveGuard, Overflow> {
        let n = self.counters.active.fetch_add(1, Ordering::Relaxed) + 1;
        let g = ActiveGuard(self.counters.clone());
        if self.limits.max_requests.is_some_and(|m| n > m) {
            return Err(Overflow::Requests);
        }
        // Each HTTP/1 request in flight holds one connection, so capping concurrent requests
        // caps connections. HTTP/2 multiplexes on one connection per endpoint; the limit is also
        // passed to the core in `ConnectionParams`.
        if matches!(
            self.protocol,
            Protocol::Http1 | Protocol::Auto | Protocol::Tcp
        ) && self.limits.max_connections.is_some_and(|m| n > m)
        {
            return Err(Overflow::Connections);
        }
        Ok(g)
    }

    fn start_pending(&self) -> Result<PendingGuard, Overflow> {
        let n = self.counters.pending.fetch_add(1, Ordering::Relaxed) + 1;
        let g = PendingGuard(self.counters.clone());
        if self.limits.max_pending_requests.is_some_and(|m| n > m) {
            return Err(Overflow::Pending);
        }
        Ok(g)
    }

    fn overflow(&self, o: Overflow, outcome: &mut Outcome) -> Response<Body> {
        match o {
            Overflow::Requests => self.metrics.overflow_requests.inc(),
            Overflow::Pending => self.metrics.overflow_pending.inc(),
            Overflow::Connections => self.metrics.overflow_connections.inc(),
        };
        outcome.flags.push("UO");
        error_response(StatusCode::SERVICE_UNAVAILABLE)
    }

    fn request_hash(&self, headers: &HeaderMap, ctx: &RequestCtx) -> Option<u64> {
        if self.lb != LbAlgorithm::ConsistentHash {
            return None;
        }
        match self.hash_key.as_ref()? {
            HashKey::Header(name) => headers.get(name.as_str()).map(|v| hash_bytes(v.as_bytes())),
            HashKey::Cookie(name) => headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|kv| kv.trim().split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| hash_bytes(v.as_bytes())),
            HashKey::SourceIp => Some(hash_ip(ctx.source_ip)),
        }
    }

    /// The target of the next attempt and the index of its endpoint (`None`: original
    /// destination, when discovery has no endpoints).
    fn pick(
        &self,
        tried: &[usize],
        hash: Option<u64>,
        ctx: &RequestCtx,
    ) -> (Target, Option<usize>) {
        let now = Instant::now();
        let pick = Pick {
            set: &self.endpoints,
            tried,
            now_ms: now_ms_at(now),
            now,
            expired: Default::default(),
        };
        let idx = pick.choose(self.lb, &self.rr, hash);
        let expired = pick.expired.get();
        if expired > 0 {
            self.metrics.ejected.dec_by(i64::from(expired));
        }
        let (addr, identities) = match idx {
            Some(i) => {
                let e = &self.endpoints.eps[i];
                (e.addr, e.identities.clone())
            }
            None => (ctx.original_dst, self.identities.clone()),
        };
        (
            Target {
                addr,
                identities,
                protocol: self.protocol,
                connect_timeout: self.connect_timeout,
            },
            idx,
        )
    }

    /// Outlier detection: 5xx, connect failures, resets and timeouts are failures.
    fn record(&self, i: usize, class: Class) {
        if matches!(class, Class::Overflow | Class::Refused) {
            // Never reached the endpoint's app, or the endpoint only said it is busy: says
            // nothing of its health.
            return;
        }
        let ep = &self.endpoints.eps[i];
        let failed = match class {
            Class::Success | Class::Grpc(_) | Class::Overflow | Class::Refused => false,
            Class::Status(s) => s >= 500,
            Class::Connect | Class::Reset | Class::Timeout => true,
        };
        let Some(cfg) = &self.outlier else {
            return;
        };
        if !failed {
            ep.record_success();
            return;
        }
        let Some(d) = ep.record_failure(cfg) else {
            return;
        };
        let _lock = self.counters.eject.lock().expect("eject lock");
        let n = self.endpoints.len();
        let ejected = self.endpoints.eps.iter().filter(|e| e.is_ejected()).count();
        if (ejected + 1) * 100 > cfg.max_ejection_percent as usize * n {
            return;
        }
        if ep.eject(d, cfg) {
            self.metrics.ejections.inc();
            self.metrics.ejected.inc();
            tracing::info!(backend = %self.key, endpoint = %ep.addr, ejection_ms = d.as_millis() as u64, "endpoint ejected");
        }
    }
}

fn build_route(
    dest: Arc<Destination>,
    policy: Option<&TrafficPolicy>,
    split: Vec<(u32, Arc<Destination>)>,
    split_total: u32,
    prev: Option<&Route>,
) -> Route {
    let retries = policy.and_then(|p| p.retries.as_ref()).map(|r| {
        let budget = prev
            .and_then(|p| p.retries.as_ref())
            .map(|p| p.budget.clone())
            .filter(|b| b.same_config(r.budget_percent, r.min_retries_per_second))
            .unwrap_or_else(|| {
                Arc::new(RetryBudget::new(r.budget_percent, r.min_retries_per_second))
            });
        let on = |c| r.retry_on.contains(&c);
        RetryPolicy {
            attempts: r.attempts.clamp(1, 10),
            per_try_timeout: r.per_try_timeout_ms.map(Duration::from_millis),
            on_connect_failure: on(RetryOn::ConnectFailure),
            on_reset: on(RetryOn::Reset),
            on_server_error: on(RetryOn::ServerError),
            on_gateway_error: on(RetryOn::GatewayError),
            on_status: on(RetryOn::RetriableStatusCodes),
            on_grpc: on(RetryOn::GrpcStatus),
            status_codes: r.status_codes.clone(),
            grpc_codes: r
                .grpc_codes
                .iter()
                .filter(|c| **c < 32)
                .fold(0, |m, c| m | (1 << c)),
            backoff_base: Duration::from_millis(r.backoff_base_ms),
            backoff_max: Duration::from_millis(r.backoff_max_ms),
            non_idempotent: r.retry_non_idempotent,
            budget,
        }
    });
    let rate_limit = policy.and_then(|p| p.rate_limit.as_ref()).map(|rl| {
        prev.and_then(|p| p.rate_limit.clone())
            .filter(|b| b.same_config(rl))
            .unwrap_or_else(|| Arc::new(TokenBucket::from_config(rl)))
    });
    Route {
        dest,
        split,
        split_total,
        request_timeout: policy
            .and_then(|p| p.timeouts.request_ms)
            .map(Duration::from_millis),
        retries,
        rate_limit,
    }
}

/// The policy that applies to one port (a policy may be restricted to a port).
fn policy_for_port(svc: &OutboundService, port: u16) -> Option<&TrafficPolicy> {
    svc.policy
        .as_ref()
        .filter(|p| p.port.is_none_or(|p| p == port))
}

/// RFC 9110 idempotent methods.
fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(on: &[RetryOn]) -> RetryPolicy {
        let r = crate::config::Retries {
            attempts: 3,
            per_try_timeout_ms: None,
            retry_on: on.to_vec(),
            status_codes: vec![409],
            grpc_codes: vec![14],
            backoff_base_ms: 10,
            backoff_max_ms: 40,
            budget_percent: 20.0,
            min_retries_per_second: 10,
            retry_non_idempotent: false,
        };
        let svc = OutboundService {
            name: "a".into(),
            namespace: "b".into(),
            addresses: vec![],
            ports: vec![],
            identities: vec![],
            policy: Some(TrafficPolicy {
                retries: Some(r),
                ..Default::default()
            }),
        };
        let metrics = TrafficMetrics::new();
        let dest = Arc::new(Destination {
            key: Arc::from("b.a"),
            protocol: Protocol::Http1,
            identities: Arc::from(Vec::new()),
            endpoints: EndpointSet::new(Vec::new(), false),
            lb: LbAlgorithm::RoundRobin,
            hash_key: None,
            limits: CircuitBreaker::default(),
            outlier: None,
            connect_timeout: None,
            conn_params: None,
            counters: Default::default(),
            rr: AtomicUsize::new(0),
            metrics: metrics.for_backend("b.a"),
        });
        build_route(dest, svc.policy.as_ref(), Vec::new(), 0, None)
            .retries
            .unwrap()
    }

    #[test]
    fn retry_conditions_by_class_and_method_safety() {
        use RetryOn::*;
        let gw = policy(&[GatewayError]);
        assert!(gw.retriable(Class::Status(503), true, false));
        assert!(!gw.retriable(Class::Status(500), true, false));
        assert!(!gw.retriable(Class::Status(503), false, false), "POST");
        assert!(gw.retriable(Class::Timeout, true, false));
        assert!(!gw.retriable(Class::Connect, true, false));
        let all = policy(&[
            ConnectFailure,
            Reset,
            ServerError,
            RetriableStatusCodes,
            GrpcStatus,
        ]);
        assert!(
            all.retriable(Class::Connect, false, false),
            "never sent: safe"
        );
        assert!(all.retriable(Class::Status(500), true, false));
        assert!(all.retriable(Class::Status(409), true, false));
        assert!(!all.retriable(Class::Status(404), true, false));
        assert!(!all.retriable(Class::Reset, false, false));
        assert!(
            all.retriable(Class::Refused, false, false),
            "unprocessed: safe"
        );
        assert!(policy(&[Reset]).retriable(Class::Refused, false, false));
        assert!(!gw.retriable(Class::Refused, true, false));
        assert!(
            all.retriable(Class::Grpc(14), false, true),
            "listed gRPC code on a POST"
        );
        assert!(!all.retriable(Class::Grpc(3), false, true));
        assert!(!all.retriable(Class::Success, true, false));
    }

    #[test]
    fn backoff_is_full_jitter_under_an_exponential_cap() {
        let p = policy(&[]);
        for retry in 1..6u32 {
            let cap = Duration::from_millis((10u64 << (retry - 1)).min(40));
            let max = (0..200).map(|_| p.backoff(retry)).max().unwrap();
            assert!(max <= cap, "retry {retry}: {max:?} > {cap:?}");
            assert!(max > cap / 2, "jitter spans the range: {max:?} of {cap:?}");
        }
    }
}
