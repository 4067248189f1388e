//! Traffic management for outbound HTTP: endpoint choice, timeouts, retries, circuit breaking,
//! rate limits and splits, per request.
//!
//! The seam with the proxy core is deliberately small. The core owns sockets, pools and TLS
//! and implements [`Upstream`] (send one request to one address). This module owns every
//! decision about *which* address and *whether/when* to send, through [`Dispatcher`]. Keeping
//! the two apart lets the policy logic be tested against real upstream servers without the
//! listeners, and lets the core change its pooling without touching policy.
//!
//! What the core does with it:
//! - builds one [`Dispatcher`] (`Dispatcher::new_with_metrics` with a [`TrafficMetrics`]
//!   registered in its registry) and calls [`Dispatcher::update`] with every config it applies;
//! - calls [`Dispatcher::dispatch`] for every outbound HTTP request and reads the [`Outcome`]
//!   from the response extensions for access logs and metrics;
//! - honours [`ConnectionParams`] (idle timeout, max connections per endpoint) found in the
//!   extensions of each request its [`Upstream`] receives, and [`Target::connect_timeout`];
//! - for opaque TCP, asks [`Dispatcher::pick_tcp`] for each connection's endpoint, reports the
//!   connect with [`TcpTarget::connected`] and holds the [`TcpTarget`] while the connection
//!   lives;
//! - inbound, keeps an [`InboundRateLimiter`] per `InboundPolicy.rate_limit` and answers
//!   [`rate_limited_response`] when [`InboundRateLimiter::check`] refuses a source identity.
//!
//! Pipeline per request: local rate limit (429 `RL`) → weighted split (picks the backend
//! Service, [`Outcome::backend`]) → circuit breaker (503 `UO`, never a queue) → endpoint pick
//! (balancer, skipping ejected endpoints and those a retry already tried) → attempt under the
//! per-try timeout → classify (status, trailers-only `grpc-status`, error kind) → outlier
//! detection → retry (conditions, idempotency, replayable body, budget, jittered backoff) or
//! answer. The whole pipeline runs under the request timeout (504 `UT`). Decisions are made on
//! response headers only, so nothing is retried once the response has started to stream.
//!
//! Policy split: the requested Service's policy decides timeouts, retries, the rate limit and
//! the split; the backend Service's own policy decides balancing, circuit breaking and outlier
//! detection (a Service's endpoints behave the same whoever routes to them). Splits are one level
//! deep.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;

use crate::config::Protocol;

mod balance;
mod body;
mod discover;
mod dispatch;
mod endpoint;
mod limit;
mod metrics;
mod plain;

pub use balance::{Ring, VNODES, hash_bytes};
pub use body::MAX_REPLAY_BYTES;
pub use discover::{Discover, InlineEndpoints};
pub use dispatch::{Dispatcher, EndpointStats, TcpRefused, TcpTarget};
pub use endpoint::{EWMA_DECAY, EWMA_IDLE_DECAY, EWMA_RISE};
pub use limit::{BUDGET_TTL, InboundRateLimiter, RetryBudget, TokenBucket, rate_limited_response};
pub use metrics::{BackendLabels, OverflowLabels, TrafficMetrics};
pub use plain::PlainUpstream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type on both sides of the traffic layer.
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// A body with these bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Why one attempt to one endpoint failed. Retry conditions and outlier detection depend on the
/// kind, so failures are classified by type, never by message.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to {addr} timed out")]
    ConnectTimeout { addr: SocketAddr },
    #[error("TLS with {addr} failed: {reason}")]
    Tls { addr: SocketAddr, reason: String },
    #[error("{addr} reset the connection before responding: {source}")]
    Reset { addr: SocketAddr, source: BoxError },
    /// The peer refused the HTTP/2 stream (`REFUSED_STREAM`), which RFC 9113 §8.7 says
    /// guarantees it did no processing: as safe to retry, for any method, as a failed connect.
    #[error("{addr} refused the stream (REFUSED_STREAM); nothing was processed")]
    Refused { addr: SocketAddr },
    #[error("upstream {addr}: {source}")]
    Other { addr: SocketAddr, source: BoxError },
    /// The pool has no stream for the request: every connection to `addr` is at the peer's
    /// stream limit, no more may be opened, and the bounded queue is full. Nothing was sent.
    #[error("no HTTP/2 stream free to {addr} and the wait queue is full")]
    Overflow { addr: SocketAddr },
}

/// Where one attempt goes and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub addr: SocketAddr,
    /// SPIFFE IDs the peer may present; empty means the destination is not meshed (plaintext).
    pub identities: Arc<[String]>,
    pub protocol: Protocol,
    pub connect_timeout: Option<Duration>,
}

/// What an upstream answered: the response, and the verified SPIFFE ID of the sidecar that
/// sent it (meshed targets). The identity travels beside the response, not in its extensions:
/// a response's first extension costs three allocations (the map, its table, the boxed
/// value) on every request.
pub struct Reply {
    pub resp: Response<Body>,
    pub peer: Option<std::sync::Arc<str>>,
}

impl Reply {
    /// A reply from a peer that presented no identity (plaintext).
    pub fn plain(resp: Response<Body>) -> Self {
        Reply { resp, peer: None }
    }
}

/// The proxy core's connection pool: sends one request to one target, reusing connections.
pub trait Upstream: Send + Sync + 'static {
    fn send(
        &self,
        target: Target,
        req: Request<Body>,
    ) -> BoxFuture<'static, Result<Reply, UpstreamError>>;
}

/// Facts about the request the traffic layer needs besides the request itself.
#[derive(Clone, Debug)]
pub struct RequestCtx {
    /// Where the client meant to connect (`SO_ORIGINAL_DST`), used when there are no inline
    /// endpoints.
    pub original_dst: SocketAddr,
    pub source_ip: IpAddr,
}

/// What happened to a request, for metrics and access logs. Returned beside the response by
/// [`Dispatcher::dispatch`] (not in its extensions, for the reason [`Reply`] gives).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// `name.namespace` of the Service that served the request (differs from the requested one
    /// under a split). Shared with the destination's state: set on every request.
    pub backend: std::sync::Arc<str>,
    /// The endpoint of the last attempt, if one was made.
    pub endpoint: Option<SocketAddr>,
    /// The verified SPIFFE ID of the sidecar that answered the last attempt (meshed targets).
    pub peer: Option<std::sync::Arc<str>>,
    /// Attempts made (1 without retries).
    pub attempts: u32,
    /// Envoy-style response flags: `UF` connect failure, `UC` upstream reset, `UT` timeout
    /// (request or per-try), `UO` overflow (circuit breaker, or the peer refused the stream at
    /// its limit), `RL` rate limited, `URX` retries
    /// exhausted (the last allowed attempt still failed retriably).
    pub flags: Vec<&'static str>,
    /// Retries and timeouts in the order they happened, for the request's span. Stays empty
    /// (no allocation) for a request that was neither retried nor timed out.
    pub events: Vec<AttemptEvent>,
}

/// A retry or a timeout during one request: what a trace shows of the traffic policy at work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptEvent {
    /// Wall-clock time, as span events carry it.
    pub at: std::time::SystemTime,
    /// The attempt it concerns (1 is the first).
    pub attempt: u32,
    pub kind: AttemptEventKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptEventKind {
    /// The attempt failed retriably and another one is sent after the backoff.
    Retry {
        /// Why the attempt failed (`connect-failure`, `reset`, `per-try-timeout`,
        /// `status-503`, `grpc-14`, `overflow`).
        reason: RetryReason,
    },
    /// `retries.perTryTimeoutMs` cut the attempt short.
    PerTryTimeout { after: Duration },
    /// `timeouts.requestMs` ended the request (answered 504) during the attempt.
    RequestTimeout { after: Duration },
}

/// Why an attempt was retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    ConnectFailure,
    Reset,
    PerTryTimeout,
    Overflow,
    Refused,
    Status(u16),
    Grpc(u32),
}

impl std::fmt::Display for RetryReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ConnectFailure => f.write_str("connect-failure"),
            Self::Reset => f.write_str("reset"),
            Self::PerTryTimeout => f.write_str("per-try-timeout"),
            Self::Overflow => f.write_str("overflow"),
            Self::Refused => f.write_str("refused-stream"),
            Self::Status(s) => write!(f, "status-{s}"),
            Self::Grpc(c) => write!(f, "grpc-{c}"),
        }
    }
}

/// Connection-level parameters of a destination that the core's pool enforces, attached to
/// each attempt's request extensions when the policy sets any (additive to [`Target`], so the
/// core reads them with `req.extensions().get::<ConnectionParams>()`).
///
/// The traffic layer also enforces `max_connections` itself for HTTP/1 destinations, as a cap
/// on concurrent requests (each holds one connection); for HTTP/2 the pool caps its
/// connections per endpoint with it (more open only at the peer's stream limit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionParams {
    /// `timeouts.idleMs`: close pooled connections idle this long.
    pub idle_timeout: Option<Duration>,
    /// `circuitBreaker.maxConnections`: connections per endpoint the pool may open.
    pub max_connections: Option<u32>,
}

/// A response the proxy generates itself.
pub fn error_response(status: StatusCode) -> Response<Body> {
    error_response_with(status, status.canonical_reason().unwrap_or("error"))
}

/// A response the proxy generates itself, whose body says what went wrong (one line of text,
/// no addresses: the caller sees the cause, not the pod's network layout).
pub fn error_response_with(status: StatusCode, why: &str) -> Response<Body> {
    let mut r = Response::new(full(format!("{why}\n")));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("server", http::HeaderValue::from_static("trellis-proxy"));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

impl UpstreamError {
    /// What the user is told when this ends the request: the kind of failure, as Envoy's
    /// `upstream connect error ... reset reason: connection failure`, without the address.
    pub fn user_message(&self) -> String {
        match self {
            UpstreamError::Connect { source, .. } => match source.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    "upstream connect error: connection refused".into()
                }
                _ => format!("upstream connect error: {}", source.kind()),
            },
            UpstreamError::ConnectTimeout { .. } => "upstream connect error: timed out".into(),
            UpstreamError::Tls { .. } => "upstream connect error: mTLS handshake failed".into(),
            UpstreamError::Reset { .. } => "upstream reset the connection before responding".into(),
            UpstreamError::Refused { .. } => "upstream refused the stream".into(),
            UpstreamError::Other { .. } => "upstream request failed".into(),
            UpstreamError::Overflow { .. } => {
                "upstream overflow: no connection free and the queue is full".into()
            }
        }
    }
}
