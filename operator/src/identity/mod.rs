//! The identity endpoint: `POST /v1/certificate` on port 15012, served by every replica.
//!
//! A sidecar sends its projected ServiceAccount token (`Authorization: Bearer ...`) and a CSR
//! (`{"csr": "<PEM>"}`). The token is checked with a TokenReview ([`review`]); the namespace
//! and service account come from the review only. The CSR must ask for nothing or for exactly
//! the caller's own SPIFFE ID (anything else is refused, so a confused or malicious client
//! learns why); in every case the CA sets the certificate's only name itself, from the review.
//!
//! Abuse limits, in the order a request meets them, all before any TokenReview except the
//! last: each source address has a token bucket (429 when empty); at most
//! [`IdentityConfig::max_in_flight`] requests are processed at once (503 past it); tokens over
//! [`MAX_TOKEN_BYTES`] are refused; bodies over [`IdentityConfig::max_body`] get 413; a token
//! reviewed recently is answered from a bounded cache keyed by its SHA-256 ([`guard`]); requests
//! taking longer than [`IdentityConfig::request_timeout`] are cut off; and after the review each
//! identity has a token bucket (429 when empty). Every issuance is logged on the `trellis::audit` target (SPIFFE ID, pod,
//! serial, notAfter; never the token) and counted in the metrics.

pub mod guard;
pub mod replica;
pub mod review;
pub mod server;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use trellis_proxy::conn_limit::ConnLimits;

use crate::ca::{CaError, IssuerRx};
pub use guard::RateLimiter;
use guard::{CacheTtl, ReviewCache};
pub use review::{Caller, ReviewError};

/// Longest bearer token accepted. A projected ServiceAccount token is about 1 KiB; anything
/// far larger is not one, and is not worth a TokenReview.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The TCP peer of a request, put in its extensions by the server: the key of the per-source
/// limit. Requests without it (handled in-process) share one bucket.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// The path of the one operation.
pub const CERTIFICATE_PATH: &str = "/v1/certificate";

/// Limits of the endpoint.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// Largest accepted request body. A P-256 CSR in PEM is about 600 bytes.
    pub max_body: usize,
    /// Whole-request deadline (TokenReview included).
    pub request_timeout: Duration,
    /// Token bucket per identity: burst size. A Deployment's replicas share one identity and
    /// may all start at once, so the burst is generous.
    pub rate_burst: f64,
    /// Token bucket per identity: refill per second.
    pub rate_per_sec: f64,
    /// Token bucket per source address (pod IP), applied before the TokenReview: burst size.
    /// A sidecar asks once at start and again at 70 % of its certificate's lifetime.
    pub source_burst: f64,
    /// Token bucket per source address: refill per second.
    pub source_per_sec: f64,
    /// Requests processed at once (TokenReview included); more get 503 at once rather than
    /// queueing without bound. Sidecars retry with backoff.
    pub max_in_flight: usize,
    /// Review results kept (see [`guard::ReviewCache`]); 0 disables the cache.
    pub review_cache_entries: usize,
    /// Longest time an accepted token's review is reused (capped by the token's expiry).
    pub review_cache_max_ttl: Duration,
    /// How long a refused token's review is reused.
    pub review_cache_negative_ttl: Duration,
    /// Connections the listener holds ([`server`]): every pod can connect before it proves
    /// anything, so the count is capped in all and per source address, and every connection
    /// ends at an age (hyper's HTTP/2 server has no idle timeout). A sidecar asks over one
    /// short connection at start and at renewal, and retries with backoff when refused.
    pub connections: ConnLimits,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            max_body: 16 * 1024,
            request_timeout: Duration::from_secs(10),
            rate_burst: 100.0,
            rate_per_sec: 10.0,
            source_burst: 20.0,
            source_per_sec: 2.0,
            max_in_flight: 64,
            review_cache_entries: 10_000,
            review_cache_max_ttl: Duration::from_secs(300),
            review_cache_negative_ttl: Duration::from_secs(60),
            connections: ConnLimits {
                // A rollout of a thousand pods asks at about the same time, each from its
                // own address; host-network pods share the node's.
                max_connections: 1024,
                max_connections_per_peer: 16,
                // A request takes at most `request_timeout`; an exchange needs one or two.
                max_age: Duration::from_secs(60),
                // What the endpoint gave requests in flight at shutdown before.
                drain: Duration::from_secs(5),
            },
        }
    }
}

/// `{"csr": "<PEM>"}`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateRequest {
    pub csr: String,
}

/// The 200 answer.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CertificateResponse {
    /// Leaf, then intermediates, PEM.
    pub certificate_chain: String,
    /// Every root to trust, PEM.
    pub trust_bundle: String,
    /// RFC 3339.
    pub not_after: String,
}

/// `{"error": "..."}`
#[derive(Debug, Deserialize, Serialize)]
pub struct ErrorResponse {
    pub error: String,
}

/// Why a request was refused; each maps to one status code and one metric label.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("not found: use POST {CERTIFICATE_PATH}")]
    NotFound,
    #[error("missing or malformed Authorization: Bearer header")]
    MissingToken,
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    #[error("invalid request body: {0}")]
    BadBody(String),
    #[error(transparent)]
    Review(#[from] ReviewError),
    #[error("CSR asks for {asked:?}, but the caller is {allowed}")]
    ForeignIdentity { asked: Vec<String>, allowed: String },
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("too many requests for {0}; retry later")]
    RateLimited(String),
    #[error("too many requests from {0}; retry later")]
    SourceRateLimited(IpAddr),
    #[error("too many certificate requests in flight; retry later")]
    Overloaded,
    #[error("bearer token longer than {MAX_TOKEN_BYTES} bytes")]
    TokenTooLarge,
    #[error("the mesh CA is not ready yet")]
    NotReady,
    #[error("request timed out")]
    Timeout,
}

impl IdentityError {
    pub fn status(&self) -> StatusCode {
        match self {
            IdentityError::NotFound => StatusCode::NOT_FOUND,
            IdentityError::MissingToken => StatusCode::UNAUTHORIZED,
            IdentityError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            IdentityError::BadBody(_) => StatusCode::BAD_REQUEST,
            IdentityError::Review(ReviewError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            IdentityError::Review(ReviewError::Unauthenticated(_) | ReviewError::WrongAudience) => {
                StatusCode::UNAUTHORIZED
            }
            IdentityError::Review(ReviewError::NotServiceAccount(_) | ReviewError::NotBound) => {
                StatusCode::FORBIDDEN
            }
            IdentityError::ForeignIdentity { .. } => StatusCode::FORBIDDEN,
            IdentityError::Ca(
                CaError::MalformedCsr(_)
                | CaError::CsrSignature
                | CaError::WeakKey(_)
                | CaError::InvalidIdentity(_),
            ) => StatusCode::BAD_REQUEST,
            IdentityError::Ca(_) => StatusCode::INTERNAL_SERVER_ERROR,
            IdentityError::RateLimited(_) | IdentityError::SourceRateLimited(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            IdentityError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            IdentityError::TokenTooLarge => StatusCode::UNAUTHORIZED,
            IdentityError::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            IdentityError::Timeout => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn metric_label(&self) -> &'static str {
        match self {
            IdentityError::NotFound => "not_found",
            IdentityError::MissingToken => "missing_token",
            IdentityError::TooLarge(_) => "too_large",
            IdentityError::BadBody(_) => "bad_body",
            IdentityError::Review(r) => r.metric_label(),
            IdentityError::ForeignIdentity { .. } => "foreign_identity",
            IdentityError::Ca(c) => c.metric_label(),
            IdentityError::RateLimited(_) => "rate_limited",
            IdentityError::SourceRateLimited(_) => "source_rate_limited",
            IdentityError::Overloaded => "overloaded",
            IdentityError::TokenTooLarge => "token_too_large",
            IdentityError::NotReady => "not_ready",
            IdentityError::Timeout => "timeout",
        }
    }
}

/// Every [`IdentityError::metric_label`] (the TokenReview's and the CA's included), created at
/// 0 when the metrics are registered; a test keeps it in step with the errors.
pub const REJECTION_REASONS: &[&str] = &[
    "not_found",
    "missing_token",
    "too_large",
    "bad_body",
    "unauthenticated",
    "wrong_audience",
    "not_service_account",
    "not_bound",
    "token_review_unavailable",
    "foreign_identity",
    "malformed_csr",
    "csr_signature",
    "weak_key",
    "invalid_identity",
    "ca_error",
    "rate_limited",
    "source_rate_limited",
    "overloaded",
    "token_too_large",
    "not_ready",
    "timeout",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// The endpoint's metrics, registered under `identity_` in the registry the runtime serves.
#[derive(Clone)]
pub struct IdentityMetrics {
    issuances: Counter,
    rejections: Family<ReasonLabel, Counter>,
    latency: Histogram,
    token_reviews: Counter,
    review_cache_hits: Counter,
}

impl std::fmt::Debug for IdentityMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityMetrics").finish_non_exhaustive()
    }
}

impl IdentityMetrics {
    /// Registers `identity_issuances`, `identity_rejections{reason}` and
    /// `identity_request_duration_seconds` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let rejections = Family::<ReasonLabel, Counter>::default();
        // Created at 0 (Prometheus's advice for known label values): a rejection rate or
        // alert reads 0, not "no data", until the first rejection.
        for reason in REJECTION_REASONS {
            let _ = rejections.get_or_create(&ReasonLabel {
                reason: (*reason).to_string(),
            });
        }
        let m = Self {
            issuances: Counter::default(),
            rejections,
            // 0.5 ms .. ~4 s
            latency: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            token_reviews: Counter::default(),
            review_cache_hits: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("identity");
        r.register(
            "issuances",
            "Workload certificates issued",
            m.issuances.clone(),
        );
        r.register(
            "rejections",
            "Certificate requests refused, by reason",
            m.rejections.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time to answer a certificate request, TokenReview included",
            m.latency.clone(),
        );
        r.register(
            "token_reviews",
            "TokenReviews sent to the API server",
            m.token_reviews.clone(),
        );
        r.register(
            "review_cache_hits",
            "Certificate requests answered from the review cache, without a TokenReview",
            m.review_cache_hits.clone(),
        );
        m
    }

    /// TokenReviews sent so far.
    pub fn token_reviews(&self) -> u64 {
        self.token_reviews.get()
    }

    /// Issuances so far (for tests and the bench).
    pub fn issued(&self) -> u64 {
        self.issuances.get()
    }

    /// Rejections so far for `reason`.
    pub fn rejected(&self, reason: &str) -> u64 {
        self.rejections
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .get()
    }
}

/// The endpoint's logic, independent of sockets and TLS.
pub struct IdentityService {
    client: kube::Client,
    issuer: IssuerRx,
    config: IdentityConfig,
    limiter: RateLimiter,
    sources: RateLimiter<IpAddr>,
    in_flight: tokio::sync::Semaphore,
    reviews: ReviewCache,
    metrics: IdentityMetrics,
}

impl std::fmt::Debug for IdentityService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityService")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .expect("static response parts")
}

impl IdentityService {
    /// The listener's connection bounds.
    pub fn connection_limits(&self) -> ConnLimits {
        self.config.connections
    }

    pub fn new(
        client: kube::Client,
        issuer: IssuerRx,
        config: IdentityConfig,
        metrics: IdentityMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            issuer,
            limiter: RateLimiter::new(config.rate_burst, config.rate_per_sec),
            sources: RateLimiter::new(config.source_burst, config.source_per_sec),
            in_flight: tokio::sync::Semaphore::new(config.max_in_flight),
            reviews: ReviewCache::new(
                config.review_cache_entries,
                CacheTtl {
                    max: config.review_cache_max_ttl,
                    negative: config.review_cache_negative_ttl,
                },
            ),
            config,
            metrics,
        })
    }

    pub fn metrics(&self) -> &IdentityMetrics {
        &self.metrics
    }

    /// Answers one HTTP request (never fails: errors become JSON error responses).
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: http_body::Body,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let started = Instant::now();
        let result =
            match tokio::time::timeout(self.config.request_timeout, self.process(req)).await {
                Ok(r) => r,
                Err(_) => Err(IdentityError::Timeout),
            };
        self.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(answer) => json_response(StatusCode::OK, &answer),
            Err(error) => {
                self.metrics
                    .rejections
                    .get_or_create(&ReasonLabel {
                        reason: error.metric_label().to_string(),
                    })
                    .inc();
                tracing::info!(reason = error.metric_label(), %error, "certificate request refused");
                json_response(
                    error.status(),
                    &ErrorResponse {
                        error: error.to_string(),
                    },
                )
            }
        }
    }

    async fn process<B>(&self, req: Request<B>) -> Result<CertificateResponse, IdentityError>
    where
        B: http_body::Body,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        if req.method() != Method::POST || req.uri().path() != CERTIFICATE_PATH {
            return Err(IdentityError::NotFound);
        }
        // Cheap limits first: nothing below (body, TokenReview) happens for a source over its
        // budget or while the endpoint is at capacity.
        let source = req
            .extensions()
            .get::<PeerAddr>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.0.ip());
        if !self.sources.try_acquire(&source, Instant::now()) {
            return Err(IdentityError::SourceRateLimited(source));
        }
        let _permit = self
            .in_flight
            .try_acquire()
            .map_err(|_| IdentityError::Overloaded)?;
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(IdentityError::MissingToken)?
            .to_string();
        if token.len() > MAX_TOKEN_BYTES {
            return Err(IdentityError::TokenTooLarge);
        }
        if let Some(len) = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            && len > self.config.max_body
        {
            return Err(IdentityError::TooLarge(self.config.max_body));
        }
        let body = Limited::new(req.into_body(), self.config.max_body)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<LengthLimitError>().is_some() {
                    IdentityError::TooLarge(self.config.max_body)
                } else {
                    IdentityError::BadBody(e.to_string())
                }
            })?
            .to_bytes();
        let request: CertificateRequest =
            serde_json::from_slice(&body).map_err(|e| IdentityError::BadBody(e.to_string()))?;
        if self.issuer.borrow().is_none() {
            return Err(IdentityError::NotReady);
        }
        let caller = self.review(&token).await?;
        let key = format!("{}/{}", caller.namespace, caller.service_account);
        if !self.limiter.try_acquire(&key, Instant::now()) {
            return Err(IdentityError::RateLimited(key));
        }
        self.issue_for(&caller, &request.csr, SystemTime::now())
    }

    /// Who `token` belongs to: from the review cache, or from a TokenReview whose result is
    /// then cached (see [`guard::valid_for`]).
    async fn review(&self, token: &str) -> Result<Caller, ReviewError> {
        let key = guard::token_hash(token);
        if let Some(cached) = self.reviews.get(&key, Instant::now()) {
            self.metrics.review_cache_hits.inc();
            return cached;
        }
        self.metrics.token_reviews.inc();
        let result = review::review_token(&self.client, token).await;
        self.reviews
            .put(key, token, &result, Instant::now(), SystemTime::now());
        result
    }

    /// Signs `csr_pem` for an already-reviewed caller: everything after the TokenReview.
    pub fn issue_for(
        &self,
        caller: &Caller,
        csr_pem: &str,
        now: SystemTime,
    ) -> Result<CertificateResponse, IdentityError> {
        let state = self
            .issuer
            .borrow()
            .clone()
            .ok_or(IdentityError::NotReady)?;
        let spiffe_id = trellis_proxy::config::spiffe_id(
            &state.trust_domain,
            &caller.namespace,
            &caller.service_account,
        );
        let asked = crate::ca::authority::csr_requested_names(csr_pem)?;
        let own = format!("uri:{spiffe_id}");
        if asked.iter().any(|n| *n != own) {
            return Err(IdentityError::ForeignIdentity {
                asked,
                allowed: spiffe_id,
            });
        }
        let issued = state
            .ca
            .sign_workload_csr(csr_pem, &spiffe_id, state.workload_ttl, now)?;
        let not_after = jiff::Timestamp::try_from(issued.not_after)
            .map(|t| t.to_string())
            .unwrap_or_default();
        self.metrics.issuances.inc();
        tracing::info!(
            target: "trellis::audit",
            spiffe_id = %spiffe_id,
            pod = %caller.pod,
            serial = %issued.serial_hex,
            not_after = %not_after,
            issuer = %state.ca.fingerprint(),
            "issued workload certificate"
        );
        Ok(CertificateResponse {
            certificate_chain: format!("{}{}", issued.cert_pem, state.ca.intermediates_pem()),
            trust_bundle: state.trust_bundle_pem.clone(),
            not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every error's label is pre-created at 0 (so the rejection panels and alerts have series
    /// before a rejection), and the list names nothing else.
    #[test]
    fn rejection_reasons_are_exactly_the_error_labels() {
        let s = || String::from("x");
        let errors: Vec<IdentityError> = vec![
            IdentityError::NotFound,
            IdentityError::MissingToken,
            IdentityError::TooLarge(1),
            IdentityError::BadBody(s()),
            ReviewError::Unauthenticated(None).into(),
            ReviewError::WrongAudience.into(),
            ReviewError::NotServiceAccount(s()).into(),
            ReviewError::NotBound.into(),
            ReviewError::Unavailable(s()).into(),
            IdentityError::ForeignIdentity {
                asked: vec![],
                allowed: s(),
            },
            CaError::CaCertificate(s()).into(),
            CaError::CaKey(s()).into(),
            CaError::CaKeyMismatch.into(),
            CaError::NotACa.into(),
            CaError::MalformedCsr(s()).into(),
            CaError::CsrSignature.into(),
            CaError::WeakKey(s()).into(),
            CaError::InvalidIdentity(s()).into(),
            CaError::Signing(s()).into(),
            IdentityError::RateLimited(s()),
            IdentityError::SourceRateLimited(Ipv4Addr::LOCALHOST.into()),
            IdentityError::Overloaded,
            IdentityError::TokenTooLarge,
            IdentityError::NotReady,
            IdentityError::Timeout,
        ];
        let labels: std::collections::BTreeSet<&str> =
            errors.iter().map(IdentityError::metric_label).collect();
        let listed: std::collections::BTreeSet<&str> = REJECTION_REASONS.iter().copied().collect();
        assert_eq!(labels, listed);
        let mut r = Registry::default();
        IdentityMetrics::register(&mut r);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        for reason in REJECTION_REASONS {
            let series = format!("rejections_total{{reason=\"{reason}\"}} 0");
            assert!(text.contains(&series), "{series} in {text}");
        }
    }

    #[test]
    fn every_error_has_a_status_in_the_protocol() {
        let cases = [
            (IdentityError::MissingToken, 401),
            (IdentityError::TooLarge(1), 413),
            (IdentityError::BadBody("x".into()), 400),
            (ReviewError::WrongAudience.into(), 401),
            (ReviewError::NotBound.into(), 403),
            (CaError::WeakKey("x".into()).into(), 400),
            (IdentityError::RateLimited("a/b".into()), 429),
            (
                IdentityError::SourceRateLimited(Ipv4Addr::LOCALHOST.into()),
                429,
            ),
            (IdentityError::Overloaded, 503),
            (IdentityError::TokenTooLarge, 401),
        ];
        for (e, code) in cases {
            assert_eq!(e.status().as_u16(), code, "{e}");
        }
    }
}
