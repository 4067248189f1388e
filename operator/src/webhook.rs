//! The sidecar injection admission webhook: HTTPS, `POST /inject`, AdmissionReview v1.
//!
//! Served by every operator replica on 9443 (Service port 443). The decision is
//! [`crate::inject::inject`]; this module only speaks the protocol and guards the edges:
//!
//! - The serving certificate comes through a `watch` of rustls `ServerConfig`: each new TLS
//!   connection uses the latest value, so a rotated certificate is served without a restart.
//! - The response is built as JSON here, not with kube's `AdmissionResponse`: kube serializes
//!   `response.patch` as an array of numbers (kube issue 1781) where the API server wants a
//!   base64 string.
//! - Bad input never panics or hangs: header and body reads have deadlines, bodies over
//!   [`MAX_BODY_BYTES`] are refused with 413 without being buffered, JSON that cannot be read at
//!   all gets HTTP 400, and a readable review with a bad request gets a denial carrying its
//!   `uid` and the reason. Non-pod objects and out-of-scope pods are allowed unchanged.
//! - Memory is bounded: at most [`ServeOptions::max_concurrent`] reviews are read and decided
//!   at once (others wait up to [`ServeOptions::queue_timeout`] before their body is read, then
//!   get 503), and a review is parsed once, straight into typed structs ([`RawReview`], the pod
//!   into `Pod`): no `serde_json::Value` tree of a 3 MiB body, no re-serialization.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::Operation;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use trellis_proxy::conn_limit::{self, ConnLimits, Ended};

use crate::api::MeshSpec;
use crate::inject::{Decision, InjectContext, NamespaceInfo, inject};

/// Largest AdmissionReview accepted. The API server refuses objects over about 3 MiB anyway
/// (its request limit; etcd's default is 1.5 MiB), so anything larger is not a real review.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// The only AdmissionReview version we register for and answer.
pub const REVIEW_API_VERSION: &str = "admission.k8s.io/v1";

/// Errors of the webhook server itself (per-request problems are answers, not errors).
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Injection metrics, registered under the `injector` prefix: in the operator's registry
/// (prefix `trellis_operator`) they are `trellis_operator_injector_*`, like every other
/// component's (`trellis_operator_identity_*`).
#[derive(Debug, Default)]
pub struct WebhookMetrics {
    /// Pods patched.
    pub injections: Counter,
    /// Pods left unchanged, by reason (`host_network`, `not_a_pod`, ...).
    pub skips: Family<Vec<(String, String)>, Counter>,
    /// Requests denied or refused, by reason (`bad_annotation`, `malformed`, ...).
    pub denials: Family<Vec<(String, String)>, Counter>,
}

impl WebhookMetrics {
    /// Every reason a request can be denied for (the injector's own decisions and the edge's
    /// refusals), created at 0 when registered: Prometheus's advice for known label values, so
    /// a denial rate or alert reads 0 rather than "no data" until the first one.
    pub const DENIAL_REASONS: &[&str] = &[
        "malformed",
        "unsupported_version",
        "internal",
        "overloaded",
        "too_large",
        "timeout",
        "bad_annotation",
        "no_spec",
    ];

    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Arc::new(Self::default());
        for reason in Self::DENIAL_REASONS {
            let _ = m
                .denials
                .get_or_create(&vec![("reason".into(), (*reason).into())]);
        }
        let sub = registry.sub_registry_with_prefix("injector");
        sub.register(
            "injections",
            "Pods injected with the proxy",
            m.injections.clone(),
        );
        sub.register(
            "skips",
            "Pods admitted without injection, by reason",
            m.skips.clone(),
        );
        sub.register(
            "denials",
            "Admission requests denied, by reason",
            m.denials.clone(),
        );
        m
    }

    fn skip(&self, reason: &str) {
        self.skips
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }

    fn deny(&self, reason: &str) {
        self.denials
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }
}

/// Namespace name to labels, as last seen by the operator's namespace watch. A namespace
/// missing from the map counts as selected (see [`NamespaceInfo::labels`]).
pub type NamespaceLabels = BTreeMap<String, BTreeMap<String, String>>;

/// Builds the [`NamespaceLabels`] map from observed namespaces (for the runtime's namespace
/// watch to publish on the `watch` channel the [`Injector`] reads).
pub fn namespace_labels<'a>(
    namespaces: impl IntoIterator<Item = &'a k8s_openapi::api::core::v1::Namespace>,
) -> NamespaceLabels {
    namespaces
        .into_iter()
        .filter_map(|ns| {
            let name = ns.metadata.name.clone()?;
            Some((name, ns.metadata.labels.clone().unwrap_or_default()))
        })
        .collect()
}

/// Limits of the server; the defaults suit production, tests shorten the timeouts.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for the request headers.
    pub header_timeout: Duration,
    /// Time allowed for the whole request body. The API server gives up after the webhook's
    /// `timeoutSeconds` (10 s) anyway.
    pub body_timeout: Duration,
    /// How long in-flight requests may finish after shutdown.
    pub drain_timeout: Duration,
    /// Reviews read and decided at once. Each may buffer a [`MAX_BODY_BYTES`] body and the pod
    /// parsed from it, so this bounds the webhook's memory (the operator's limit is 256 Mi,
    /// shared with the identity endpoint); a review takes milliseconds, so a few suffice.
    pub max_concurrent: usize,
    /// How long a review waits for a slot before it is answered 503 (well inside the API
    /// server's 10 s webhook timeout).
    pub queue_timeout: Duration,
    /// Open connections, all peers together; a new one beyond it ends the oldest
    /// ([`trellis_proxy::conn_limit::Gate::evicting`]). Anything in the cluster can connect,
    /// and each connection costs a descriptor and TLS state.
    pub max_connections: usize,
    /// Open connections from one address; more are closed at once, so one client cannot fill
    /// [`ServeOptions::max_connections`] and lock the API server out.
    pub max_connections_per_peer: usize,
    /// A connection this old is shut down gracefully (the API server reconnects): hyper's
    /// HTTP/2 server has no idle timeout, so without this a client could hold one for ever.
    /// Requests in flight get [`ServeOptions::drain_timeout`] to finish.
    pub max_connection_age: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            max_concurrent: 8,
            queue_timeout: Duration::from_secs(5),
            // The API servers (a handful in HA) need a few connections each.
            max_connections: 256,
            max_connections_per_peer: 32,
            max_connection_age: Duration::from_secs(300),
        }
    }
}

/// Everything a request needs: the current Mesh, namespace labels, context and metrics.
#[derive(Clone)]
pub struct Injector {
    /// The `default` Mesh's spec, as last observed.
    pub mesh: watch::Receiver<MeshSpec>,
    /// Namespace labels, as last observed (see [`namespace_labels`]).
    pub namespaces: watch::Receiver<Arc<NamespaceLabels>>,
    pub ctx: InjectContext,
    pub metrics: Arc<WebhookMetrics>,
}

impl Injector {
    /// An injector whose metrics are registered in `registry`, with
    /// `trellis_operator_desired_proxy_info` (see [`DesiredProxy`]) read from `mesh`.
    pub fn new(
        mesh: watch::Receiver<MeshSpec>,
        namespaces: watch::Receiver<Arc<NamespaceLabels>>,
        ctx: InjectContext,
        registry: &mut Registry,
    ) -> Self {
        registry.register_collector(Box::new(DesiredProxy(mesh.clone())));
        Self {
            mesh,
            namespaces,
            ctx,
            metrics: WebhookMetrics::register(registry),
        }
    }
}

/// `trellis_operator_desired_proxy_info{version}`: the proxy version new pods are injected
/// with (the Mesh's `spec.proxy.image`, else the operator's default), read from the Mesh watch
/// at each scrape, so it follows an edit without a hook in the controllers. A sidecar reports
/// the same string as its `trellis_proxy_build_info{version}` (the injector passes it as
/// `TRELLIS_PROXY_VERSION`), and the pod carries it as `trellis.dev/proxy-version`, which the
/// rollout and `status.proxies` compare: so `TrellisProxyVersionOld` and the dashboards'
/// "not on the desired version" are `trellis_proxy_build_info unless on (version)` this series,
/// the same judgement as the Mesh's `ProxiesUpToDate`. Comparing with the operator's own
/// build version instead would flag every proxy of a Mesh that pins another proxy image.
/// Every replica serves it (each runs the injector), so it does not wait for a leader.
#[derive(Debug)]
pub struct DesiredProxy(pub watch::Receiver<MeshSpec>);

impl prometheus_client::collector::Collector for DesiredProxy {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        let version = self.0.borrow().proxy.effective_image().to_owned();
        let info = prometheus_client::metrics::info::Info::new(vec![("version", version)]);
        let metric = encoder.encode_descriptor(
            "desired_proxy",
            "The proxy version (image) new pods are injected with: what a sidecar's build_info \
             version should be",
            None,
            info.metric_type(),
        )?;
        info.encode(metric)
    }
}

/// An HTTP answer: status and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
}

impl Answer {
    fn http_error(status: StatusCode, message: impl Into<String>) -> Self {
        Answer {
            status,
            body: json!({"error": message.into()}),
        }
    }

    fn review(api_version: &str, response: Value) -> Self {
        Answer {
            status: StatusCode::OK,
            body: json!({
                "apiVersion": api_version,
                "kind": "AdmissionReview",
                "response": response,
            }),
        }
    }
}

/// Finds `request.uid` in a body that is not valid JSON (truncated, say): the first `"uid"`
/// key after the first `"request"` key, if its value is a plain JSON string.
fn recover_uid(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let after_request = &text[text.find("\"request\"")? + 9..];
    let after_key = &after_request[after_request.find("\"uid\"")? + 5..];
    let value = after_key.trim_start().strip_prefix(':')?.trim_start();
    let value = value.strip_prefix('"')?;
    let end = value.find('"')?;
    let uid = &value[..end];
    let plain = !uid.is_empty()
        && uid.len() <= 128
        && uid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    plain.then(|| uid.to_string())
}

fn allowed(uid: &str) -> Value {
    json!({"uid": uid, "allowed": true})
}

fn denied(uid: &str, message: &str) -> Value {
    json!({
        "uid": uid,
        "allowed": false,
        "status": {"status": "Failure", "code": 400, "reason": "BadRequest", "message": message},
    })
}

/// An AdmissionReview as read from the wire: only what the webhook looks at, with the object
/// left as raw JSON until the request is known to be a pod CREATE. Every field is optional so
/// that a review missing one is answered with a denial naming it, not a parse error.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawReview<'a> {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default, borrow)]
    pub request: Option<RawRequest<'a>>,
}

/// The `request` of a [`RawReview`].
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawRequest<'a> {
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default)]
    pub kind: RawKind,
    #[serde(default)]
    pub sub_resource: Option<String>,
    #[serde(default)]
    pub operation: Option<Operation>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default, borrow)]
    pub object: Option<&'a serde_json::value::RawValue>,
}

/// `request.kind`.
#[derive(serde::Deserialize, Default)]
pub struct RawKind {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
}

impl Injector {
    /// Answers one AdmissionReview body. Pure apart from metrics; the HTTP layer only moves
    /// bytes. The body is parsed once, into [`RawReview`].
    pub fn review(&self, body: &[u8]) -> Answer {
        let m = &self.metrics;
        let review: RawReview<'_> = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => {
                m.deny("malformed");
                let message = if e.is_data() {
                    format!("malformed AdmissionReview: {e}")
                } else {
                    format!("request body is not JSON: {e}")
                };
                // With the uid the API server shows our reason to the user; without it all we
                // can do is fail the HTTP request.
                return match recover_uid(body) {
                    Some(uid) => Answer::review(REVIEW_API_VERSION, denied(&uid, &message)),
                    None => Answer::http_error(StatusCode::BAD_REQUEST, message),
                };
            }
        };
        let api_version = review.api_version.clone().unwrap_or_default();
        let Some((uid, request)) = review
            .request
            .and_then(|r| r.uid.clone().map(|uid| (uid, r)))
        else {
            m.deny("malformed");
            return Answer::http_error(
                StatusCode::BAD_REQUEST,
                "not an AdmissionReview: request.uid is missing",
            );
        };
        if review.kind.as_deref() != Some("AdmissionReview") {
            m.deny("malformed");
            return Answer::review(
                REVIEW_API_VERSION,
                denied(
                    &uid,
                    "not an AdmissionReview (kind must be AdmissionReview)",
                ),
            );
        }
        if api_version != REVIEW_API_VERSION {
            m.deny("unsupported_version");
            // Answer in the caller's version so it can read the reason.
            let version = if api_version.is_empty() {
                REVIEW_API_VERSION
            } else {
                &api_version
            };
            return Answer::review(
                version,
                denied(
                    &uid,
                    &format!(
                        "unsupported AdmissionReview version {api_version:?}: this webhook speaks {REVIEW_API_VERSION} only"
                    ),
                ),
            );
        }
        Answer::review(REVIEW_API_VERSION, self.review_request(&uid, &request))
    }

    fn review_request(&self, uid: &str, req: &RawRequest<'_>) -> Value {
        let m = &self.metrics;
        let Some(operation) = &req.operation else {
            m.deny("malformed");
            return denied(
                uid,
                "malformed AdmissionReview: request.operation is missing",
            );
        };
        let is_pod = req.kind.group.is_empty() && req.kind.kind == "Pod";
        if !is_pod || req.sub_resource.is_some() {
            m.skip("not_a_pod");
            return allowed(uid);
        }
        if !matches!(operation, Operation::Create) {
            m.skip("not_create");
            return allowed(uid);
        }
        let Some(object) = req.object.filter(|o| o.get() != "null") else {
            m.deny("malformed");
            return denied(uid, "CREATE request without an object");
        };
        let pod: Pod = match serde_json::from_str(object.get()) {
            Ok(p) => p,
            Err(e) => {
                m.deny("malformed");
                return denied(uid, &format!("object is not a valid Pod: {e}"));
            }
        };
        let Some(namespace) = req.namespace.clone().or(pod.metadata.namespace.clone()) else {
            m.deny("malformed");
            return denied(uid, "pod has no namespace");
        };
        let decision = {
            let namespaces = self.namespaces.borrow();
            let mesh = self.mesh.borrow();
            let ns = NamespaceInfo {
                name: &namespace,
                labels: namespaces.get(&namespace),
            };
            inject(&pod, &ns, &mesh, &self.ctx)
        };
        let pod_name = pod
            .metadata
            .name
            .clone()
            .or(pod.metadata.generate_name.clone())
            .unwrap_or_default();
        match decision {
            Decision::Skip { reason } => {
                m.skip(reason.as_str());
                match reason.warning() {
                    // The user asked for something we will not do: kubectl prints it.
                    Some(warning) => {
                        tracing::warn!(%namespace, pod = %pod_name, reason = reason.as_str(), "not injected: {warning}");
                        let mut response = allowed(uid);
                        response["warnings"] = json!([warning]);
                        response
                    }
                    None => {
                        tracing::debug!(%namespace, pod = %pod_name, reason = reason.as_str(), "not injected");
                        allowed(uid)
                    }
                }
            }
            Decision::Deny { reason } => {
                tracing::info!(%namespace, pod = %pod_name, %reason, "injection denied");
                m.deny(reason.as_str());
                denied(uid, &reason.to_string())
            }
            Decision::Patch {
                patch, warnings, ..
            } => match serde_json::to_vec(&patch) {
                Ok(bytes) => {
                    tracing::info!(%namespace, pod = %pod_name, "injected");
                    m.injections.inc();
                    let mut response = json!({
                        "uid": uid,
                        "allowed": true,
                        "patchType": "JSONPatch",
                        "patch": base64::engine::general_purpose::STANDARD.encode(bytes),
                    });
                    if !warnings.is_empty() {
                        response["warnings"] = json!(warnings);
                    }
                    response
                }
                Err(e) => {
                    m.deny("internal");
                    denied(uid, &format!("internal error serializing the patch: {e}"))
                }
            },
        }
    }

    async fn handle(
        self,
        opts: Arc<ServeOptions>,
        slots: Arc<tokio::sync::Semaphore>,
        req: Request<Incoming>,
    ) -> Answer {
        if req.uri().path() != "/inject" {
            return Answer::http_error(StatusCode::NOT_FOUND, "not found; POST /inject");
        }
        if req.method() != Method::POST {
            return Answer::http_error(StatusCode::METHOD_NOT_ALLOWED, "use POST /inject");
        }
        // A slot before the body is read: at most `max_concurrent` bodies are buffered.
        let _slot = match tokio::time::timeout(opts.queue_timeout, slots.acquire_owned()).await {
            Ok(Ok(slot)) => slot,
            _ => {
                self.metrics.deny("overloaded");
                return Answer::http_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many admission reviews in flight; retry",
                );
            }
        };
        let too_large = || {
            self.metrics.deny("too_large");
            Answer::http_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("AdmissionReview larger than {MAX_BODY_BYTES} bytes"),
            )
        };
        let declared = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            return too_large();
        }
        // Limited stops reading (and buffering) at the limit, whatever Content-Length said.
        let body = Limited::new(req.into_body(), MAX_BODY_BYTES);
        let bytes = match tokio::time::timeout(opts.body_timeout, body.collect()).await {
            Err(_) => {
                self.metrics.deny("timeout");
                return Answer::http_error(
                    StatusCode::REQUEST_TIMEOUT,
                    "request body not received in time",
                );
            }
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
            Ok(Err(e)) => {
                self.metrics.deny("malformed");
                return Answer::http_error(
                    StatusCode::BAD_REQUEST,
                    format!("could not read the body: {e}"),
                );
            }
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        self.review(&bytes)
    }
}

fn to_response(answer: Answer) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&answer.body).unwrap_or_default();
    Response::builder()
        .status(answer.status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// Binds `addr` (9443 in the operator) and serves until `shutdown` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
    injector: Injector,
    opts: ServeOptions,
    shutdown: CancellationToken,
) -> Result<(), WebhookError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| WebhookError::Bind { addr, source })?;
    serve_on(listener, tls, injector, opts, shutdown).await;
    Ok(())
}

/// Serves on an already bound listener (tests bind 127.0.0.1:0).
pub async fn serve_on(
    listener: TcpListener,
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
    injector: Injector,
    opts: ServeOptions,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(opts.max_concurrent));
    let limits = ConnLimits {
        max_connections: opts.max_connections,
        max_connections_per_peer: opts.max_connections_per_peer,
        max_age: opts.max_connection_age,
        drain: opts.drain_timeout,
    };
    let gate = limits.gate();
    let opts = Arc::new(opts);
    let connections = tokio_util::task::TaskTracker::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_timeout);
    let builder = Arc::new(builder);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(slot) = gate.admit(peer.ip()) else {
            tracing::debug!(%peer, "webhook connection refused: too many open");
            continue;
        };
        // The latest certificate for every new connection: rotation needs no restart.
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.borrow().clone());
        let injector = injector.clone();
        let opts = opts.clone();
        let slots = slots.clone();
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let handshake = tokio::time::timeout(opts.handshake_timeout, acceptor.accept(tcp));
            let handshake = tokio::select! {
                r = handshake => r,
                // The total is full (of a flood, likely): the oldest make room.
                _ = slot.evicted() => return,
            };
            let stream =
                match handshake {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "webhook TLS handshake timed out");
                        return;
                    }
                };
            let service = hyper::service::service_fn(move |req| {
                let injector = injector.clone();
                let opts = opts.clone();
                let slots = slots.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(to_response(
                        injector.handle(opts, slots, req).await,
                    ))
                }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            match conn_limit::drive(conn, |c| c.graceful_shutdown(), &limits, &shutdown, &slot)
                .await
            {
                Ended::Closed(Ok(())) => {}
                Ended::Closed(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "webhook connection ended with an error");
                }
                Ended::Dropped => {
                    tracing::debug!(%peer, "webhook connection dropped: still open after the drain");
                }
            }
        });
    }
    drop(listener);
    // Each connection drains within `drain_timeout` of the shutdown by itself ([`drive`]).
    connections.close();
    connections.wait().await;
}

/// The namespace labels the webhook decides with, kept from a namespace watch. Events of a
/// re-list are buffered until the list is complete, so a restart never publishes a partial map
/// (which would make known namespaces look unknown).
#[derive(Debug, Default)]
pub struct NamespaceIndex {
    current: NamespaceLabels,
    building: Option<NamespaceLabels>,
}

impl NamespaceIndex {
    /// Applies one watch event (namespace metadata); returns whether the published map changed.
    pub fn apply(
        &mut self,
        event: kube::runtime::watcher::Event<
            k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        >,
    ) -> bool {
        use kube::runtime::watcher::Event;
        let entry = |m: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            m.name.map(|n| (n, m.labels.unwrap_or_default()))
        };
        match event {
            Event::Init => {
                self.building = Some(NamespaceLabels::new());
                false
            }
            Event::InitApply(m) => {
                if let (Some(b), Some((n, l))) = (self.building.as_mut(), entry(m)) {
                    b.insert(n, l);
                }
                false
            }
            Event::InitDone => match self.building.take() {
                Some(b) if b != self.current => {
                    self.current = b;
                    true
                }
                _ => false,
            },
            Event::Apply(m) => match entry(m) {
                Some((n, l)) if self.current.get(&n) != Some(&l) => {
                    self.current.insert(n, l);
                    true
                }
                _ => false,
            },
            Event::Delete(m) => entry(m).is_some_and(|(n, _)| self.current.remove(&n).is_some()),
        }
    }

    pub fn labels(&self) -> &NamespaceLabels {
        &self.current
    }
}

/// The Mesh spec to inject with after a watch event on Meshes: the `default` Mesh's spec, or
/// the defaults when it is deleted. `None` when the event changes nothing.
pub fn mesh_from_event(event: kube::runtime::watcher::Event<crate::api::Mesh>) -> Option<MeshSpec> {
    use kube::runtime::watcher::Event;
    let is_default =
        |m: &crate::api::Mesh| m.metadata.name.as_deref() == Some(crate::api::MESH_NAME);
    match event {
        Event::Apply(m) | Event::InitApply(m) if is_default(&m) => Some(m.spec),
        Event::Delete(m) if is_default(&m) => Some(crate::inject::default_mesh()),
        _ => None,
    }
}

/// Whether each watch the webhook reads has completed its first list. Until both have, the
/// webhook would inject with the Mesh defaults and guess namespaces, so the replica reports
/// not-ready (the runtime's `webhook-inputs` readiness check).
#[derive(Debug, Default)]
pub struct InputsSynced {
    mesh: std::sync::atomic::AtomicBool,
    namespaces: std::sync::atomic::AtomicBool,
}

impl InputsSynced {
    pub fn is_synced(&self) -> bool {
        use std::sync::atomic::Ordering::Acquire;
        self.mesh.load(Acquire) && self.namespaces.load(Acquire)
    }
}

/// Starts the two watches the webhook reads (the `default` Mesh and namespace metadata) and
/// returns their channels; the tasks end with `shutdown`. Until the first events arrive the
/// webhook injects with the Mesh defaults and treats namespaces as selected by the API server.
pub fn spawn_inputs(
    client: kube::Client,
    shutdown: CancellationToken,
) -> (
    watch::Receiver<MeshSpec>,
    watch::Receiver<Arc<NamespaceLabels>>,
) {
    spawn_inputs_tracked(client, shutdown, Arc::default())
}

/// [`spawn_inputs`], recording in `synced` when each watch has completed its first list.
pub fn spawn_inputs_tracked(
    client: kube::Client,
    shutdown: CancellationToken,
    synced: Arc<InputsSynced>,
) -> (
    watch::Receiver<MeshSpec>,
    watch::Receiver<Arc<NamespaceLabels>>,
) {
    use futures::StreamExt as _;
    use k8s_openapi::api::core::v1::Namespace;
    use kube::core::PartialObjectMeta;
    use kube::runtime::{WatchStreamExt as _, watcher};
    use std::sync::atomic::Ordering::Release;

    let (mesh_tx, mesh_rx) = watch::channel(crate::inject::default_mesh());
    let (ns_tx, ns_rx) = watch::channel(Arc::new(NamespaceLabels::new()));

    let meshes: kube::Api<crate::api::Mesh> = kube::Api::all(client.clone());
    let selector = format!("metadata.name={}", crate::api::MESH_NAME);
    let token = shutdown.clone();
    let mesh_synced = synced.clone();
    tokio::spawn(async move {
        let mut events = watcher(meshes, watcher::Config::default().fields(&selector))
            .default_backoff()
            .boxed();
        loop {
            let next = tokio::select! {
                _ = token.cancelled() => return,
                next = events.next() => next,
            };
            match next {
                None => return,
                Some(Err(e)) => tracing::warn!(error = %e, "webhook: Mesh watch failed; retrying"),
                Some(Ok(event)) => {
                    let listed = matches!(event, kube::runtime::watcher::Event::InitDone);
                    if let Some(spec) = mesh_from_event(event) {
                        mesh_tx.send_replace(spec);
                    }
                    if listed {
                        mesh_synced.mesh.store(true, Release);
                    }
                }
            }
        }
    });

    // Metadata only: labels are all the webhook needs.
    let namespaces: kube::Api<PartialObjectMeta<Namespace>> = kube::Api::all(client);
    tokio::spawn(async move {
        let mut index = NamespaceIndex::default();
        let mut events = watcher(namespaces, watcher::Config::default())
            .default_backoff()
            .boxed();
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = events.next() => next,
            };
            match next {
                None => return,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "webhook: namespace watch failed; retrying")
                }
                Some(Ok(event)) => {
                    use kube::runtime::watcher::Event;
                    let event = match event {
                        Event::Apply(m) => Event::Apply(m.metadata),
                        Event::Delete(m) => Event::Delete(m.metadata),
                        Event::InitApply(m) => Event::InitApply(m.metadata),
                        Event::Init => Event::Init,
                        Event::InitDone => Event::InitDone,
                    };
                    let listed = matches!(event, Event::InitDone);
                    if index.apply(event) {
                        ns_tx.send_replace(Arc::new(index.labels().clone()));
                    }
                    if listed {
                        synced.namespaces.store(true, Release);
                    }
                }
            }
        }
    });
    (mesh_rx, ns_rx)
}

/// The webhook as one of the runtime's replica servers: starts the watches, registers the
/// metrics, and serves on `--webhook-addr` (9443) with `tls` (for example
/// `watch::channel(serving_cert.server_config(&[b"h2", b"http/1.1"])).1`; a resolver-backed
/// config rotates by itself, a new value on the channel rotates too).
pub fn replica_server(
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
) -> crate::runtime::ExtraServer {
    (
        "webhook",
        Box::new(move |s: crate::runtime::Services| {
            let synced = Arc::new(InputsSynced::default());
            let check = synced.clone();
            s.readiness
                .check("webhook-inputs", Arc::new(move || check.is_synced()));
            Box::pin(async move {
                let (mesh, namespaces) =
                    spawn_inputs_tracked(s.client.clone(), s.shutdown.clone(), synced);
                let injector = {
                    let mut registry = s.registry.lock().unwrap_or_else(|e| e.into_inner());
                    Injector::new(
                        mesh,
                        namespaces,
                        InjectContext {
                            operator_namespace: s.config.namespace.clone(),
                        },
                        &mut registry,
                    )
                };
                serve(
                    s.config.webhook_addr,
                    tls,
                    injector,
                    ServeOptions::default(),
                    s.shutdown,
                )
                .await?;
                Ok(())
            })
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_recovery_from_broken_json() {
        assert_eq!(
            recover_uid(br#"{"kind":"AdmissionReview","request": { "uid" : "ab-12", "object": {"#)
                .as_deref(),
            Some("ab-12")
        );
        // No request key, no uid, odd characters: nothing recovered.
        assert_eq!(recover_uid(br#"{"uid":"ab"#), None);
        assert_eq!(recover_uid(br#"{"request":{"kind":"#), None);
        assert_eq!(recover_uid(br#"{"request":{"uid":"a\"b"}"#), None);
        assert_eq!(recover_uid(br#"{"request":{"uid":12}"#), None);
    }
    use k8s_openapi::api::core::v1::Namespace;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn meta(name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn namespace_index_publishes_complete_lists_and_changes_only() {
        use kube::runtime::watcher::Event;
        let mut idx = NamespaceIndex::default();
        assert!(!idx.apply(Event::Init));
        assert!(!idx.apply(Event::InitApply(meta(
            "shop",
            &[("trellis.dev/inject", "enabled")]
        ))));
        assert!(
            idx.labels().is_empty(),
            "partial list must not be published"
        );
        assert!(idx.apply(Event::InitDone));
        assert_eq!(idx.labels()["shop"]["trellis.dev/inject"], "enabled");
        // Same labels again: nothing to publish.
        assert!(!idx.apply(Event::Apply(meta(
            "shop",
            &[("trellis.dev/inject", "enabled")]
        ))));
        assert!(idx.apply(Event::Apply(meta("shop", &[]))));
        assert!(idx.labels()["shop"].is_empty());
        assert!(idx.apply(Event::Delete(meta("shop", &[]))));
        assert!(!idx.apply(Event::Delete(meta("shop", &[]))));
        // A re-list replaces the map as a whole.
        idx.apply(Event::Apply(meta("old", &[])));
        idx.apply(Event::Init);
        idx.apply(Event::InitApply(meta("new", &[])));
        assert!(idx.apply(Event::InitDone));
        assert!(idx.labels().contains_key("new") && !idx.labels().contains_key("old"));
    }

    #[test]
    fn mesh_events() {
        use kube::runtime::watcher::Event;
        let mut spec = crate::inject::default_mesh();
        spec.proxy.image = Some("custom:1".into());
        let mesh = |name: &str| {
            let mut m = crate::api::Mesh::new(name, spec.clone());
            m.metadata.name = Some(name.into());
            m
        };
        assert_eq!(
            mesh_from_event(Event::Apply(mesh("default")))
                .unwrap()
                .proxy
                .effective_image(),
            "custom:1"
        );
        assert_eq!(
            mesh_from_event(Event::InitApply(mesh("default")))
                .unwrap()
                .proxy
                .effective_image(),
            "custom:1"
        );
        assert!(mesh_from_event(Event::Apply(mesh("other"))).is_none());
        assert_eq!(
            mesh_from_event(Event::Delete(mesh("default"))).unwrap(),
            crate::inject::default_mesh()
        );
        assert!(mesh_from_event(Event::InitDone).is_none());
    }

    #[test]
    fn namespace_labels_from_observed_namespaces() {
        let ns = |name: &str, labels: Option<&[(&str, &str)]>| Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: labels.map(|l| {
                    l.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let list = [
            ns("shop", Some(&[("trellis.dev/inject", "enabled")])),
            ns("bare", None),
        ];
        let map = namespace_labels(&list);
        assert_eq!(map["shop"]["trellis.dev/inject"], "enabled");
        // A namespace with no labels is known (and not selected), unlike a missing one.
        assert!(map["bare"].is_empty());
        assert!(!map.contains_key("other"));
    }
}
