//! Traffic management for outbound HTTP: endpoint choice, timeouts, retries, circuit breaking,
//! rate limits and splits, per request.
//!
//! The seam with the proxy core is deliberately small. The core owns sockets, pools and TLS
//! and implements [`Upstream`] (send one request to one address). This module owns every
//! decision about *which* address and *whether/when* to send, through [`Dispatcher`]. Keeping
//! the two apart lets the policy logic be tested against real upstream servers without the
//! listeners, and lets the core change its pooling without touching policy.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;

use crate::config::{OutboundService, Protocol};

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
    #[error("upstream {addr}: {source}")]
    Other { addr: SocketAddr, source: BoxError },
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

/// The proxy core's connection pool: sends one request to one target, reusing connections.
pub trait Upstream: Send + Sync + 'static {
    fn send(
        &self,
        target: Target,
        req: Request<Body>,
    ) -> BoxFuture<'static, Result<Response<Body>, UpstreamError>>;
}

/// Facts about the request the traffic layer needs besides the request itself.
#[derive(Clone, Debug)]
pub struct RequestCtx {
    /// Where the client meant to connect (`SO_ORIGINAL_DST`), used when there are no inline
    /// endpoints.
    pub original_dst: SocketAddr,
    pub source_ip: IpAddr,
}

/// What happened to a request, for metrics and access logs. Stored in the response's
/// extensions by [`Dispatcher::dispatch`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// `name.namespace` of the Service that served the request (differs from the requested one
    /// under a split).
    pub backend: String,
    /// The endpoint of the last attempt, if one was made.
    pub endpoint: Option<SocketAddr>,
    /// Attempts made (1 without retries).
    pub attempts: u32,
    /// Envoy-style response flags: `UF` connect failure, `UT` timeout, `NR` no route,
    /// `UO` overflow, `RL` rate limited, `URX` retries exhausted.
    pub flags: Vec<&'static str>,
}

/// Applies the traffic policy of each destination to outbound requests.
pub struct Dispatcher {
    upstream: Arc<dyn Upstream>,
    next: AtomicUsize,
}

impl Dispatcher {
    pub fn new(upstream: Arc<dyn Upstream>) -> Self {
        Self {
            upstream,
            next: AtomicUsize::new(0),
        }
    }

    /// Sends a request for `service:port`, applying its policy; always returns a response (errors
    /// become 502/503/504 with an [`Outcome`] in the extensions).
    pub async fn dispatch(
        &self,
        service: &OutboundService,
        port: u16,
        req: Request<Body>,
        ctx: &RequestCtx,
    ) -> Response<Body> {
        let sp = service.port(port);
        let protocol = sp.map(|p| p.protocol).unwrap_or_default();
        let addr = match sp.map(|p| p.endpoints.as_slice()).unwrap_or(&[]) {
            [] => ctx.original_dst,
            eps => eps[self.next.fetch_add(1, Ordering::Relaxed) % eps.len()].address,
        };
        let target = Target {
            addr,
            identities: service.identities.clone().into(),
            protocol,
            connect_timeout: None,
        };
        let mut outcome = Outcome {
            backend: service.key(),
            endpoint: Some(addr),
            attempts: 1,
            flags: Vec::new(),
        };
        let mut resp = match self.upstream.send(target, req).await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::debug!(error = %e, "upstream request failed");
                outcome.flags.push("UF");
                error_response(StatusCode::BAD_GATEWAY)
            }
        };
        resp.extensions_mut().insert(outcome);
        resp
    }
}

/// A response the proxy generates itself.
pub fn error_response(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(full(
        status.canonical_reason().unwrap_or("error").to_string(),
    ));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("server", http::HeaderValue::from_static("trellis-proxy"));
    r
}
