//! Distributed tracing: one span per HTTP request through the proxy, exported over OTLP (gRPC,
//! or HTTP with protobuf bodies; [`crate::config::parse_collector`] says which address means
//! which) to the collector named in `mesh.telemetry.tracing`.
//!
//! Each request gets at most one span: a server span on the inbound side, a client span on the
//! outbound side, with OpenTelemetry's HTTP semantic-convention attributes. The proxy joins the
//! trace it is handed (W3C `traceparent`): the caller's span becomes the parent, and the
//! `traceparent` forwarded carries this proxy's span id, so the next hop's span is this one's
//! child. Without a `traceparent` a trace is started with the configured probability.
//!
//! Spans are built by hand into the SDK's [`SpanData`] rather than through the SDK's tracer:
//! the proxy needs to pick its own span id before forwarding, to leave an unsampled request
//! untouched at zero cost, and to count what the queue drops ([`export`]).
//!
//! Cost (issue #15: at most +5 % CPU per request at 1 % sampling). A request costs each
//! sidecar about 60 µs of CPU; per request, measured by `hack/bench-spans.rs` (release, one
//! thread): tracing off pays one uncontended read lock (~11 ns); an unsampled request parses
//! its `traceparent` in place (~80 ns) or rolls one number from a thread-local generator
//! ([`context::roll`], ~20 ns), and allocates nothing; a sampled request builds its span and
//! queues it (~0.6 µs). Off the request path, the export task sleeps while its queue is empty
//! (no timer: an idle traced proxy uses no more CPU than an untraced one), and the exporter
//! keeps one connection to the collector across batches. `perf` profiles under load
//! (`hack/bench-ab.py`, `B_TRACING=1 PERF=client`, read with `hack/perf-share.py`) put
//! everything reached from this module, the exporter and its HTTP client included, at about
//! 1 % of a sidecar's CPU or less at 1 % sampling, ~5 % at 100 %. Whole-process CPU A/B ratios
//! on the shared 2-core machine spread too widely per round to resolve a few percent; see the
//! README's "Tracing cost".

pub mod context;
pub mod export;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Version};
use opentelemetry::trace::{
    Event, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter};
use prometheus_client::metrics::counter::Counter;

use crate::config::{CollectorProtocol, TracingSettings, parse_collector};
use crate::traffic::{AttemptEvent, AttemptEventKind};
use context::{Sampler, SpanIds};
use export::Queue;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Who this proxy is, for the spans' resource attributes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    /// `k8s.pod.name`.
    pub name: Option<String>,
    /// `k8s.namespace.name`; the config's namespace when unset.
    pub namespace: Option<String>,
    /// The last resort for `service.name`, after the workload's labels.
    pub service_account: Option<String>,
}

/// `service.name`: the workload, as Kubernetes' recommended label names it, else the `app`
/// label (what most charts set), else the service account.
pub fn service_name(labels: &BTreeMap<String, String>, pod: &Pod) -> String {
    labels
        .get("app.kubernetes.io/name")
        .or_else(|| labels.get("app"))
        .or(pod.service_account.as_ref())
        .cloned()
        .unwrap_or_else(|| "unknown_service".into())
}

/// The tracer in force, replaced when the config's tracing settings or the workload change.
pub struct Tracing {
    current: RwLock<Option<Arc<Tracer>>>,
    pod: Pod,
    dropped: Counter,
}

impl Tracing {
    pub fn new(pod: Pod, dropped: Counter) -> Self {
        Self {
            current: RwLock::new(None),
            pod,
            dropped,
        }
    }

    /// Starts the span of a request, if tracing is on and the request is sampled (see
    /// [`Tracer::begin`]). Call it before the request is forwarded.
    pub fn begin(&self, headers: &mut HeaderMap) -> Option<Active> {
        self.current
            .read()
            .expect("tracer lock")
            .as_ref()?
            .begin(headers)
    }

    /// Stops tracing and waits, at most `deadline`, for the spans already queued to be
    /// exported: called once requests are drained, so a stopping proxy does not lose its last
    /// batch. Returns whether everything queued went out (or was counted as dropped).
    pub async fn flush(&self, deadline: Duration) -> bool {
        let Some(tracer) = self.current.write().expect("tracer lock").take() else {
            return true;
        };
        let finished = tracer.queue.finished();
        // The queue closes when the last request holding this tracer is done.
        drop(tracer);
        tokio::time::timeout(deadline, finished.cancelled())
            .await
            .is_ok()
    }

    /// Follows a new config: starts, replaces or stops the exporter. Must run inside the tokio
    /// runtime (the exporter's channel and task live there). The old tracer's queue drains
    /// once the requests holding it finish.
    pub fn apply(
        &self,
        settings: Option<&TracingSettings>,
        labels: &BTreeMap<String, String>,
        config_namespace: &str,
    ) {
        let wanted = settings.map(|s| Key {
            settings: s.clone(),
            service_name: service_name(labels, &self.pod),
            namespace: self
                .pod
                .namespace
                .clone()
                .unwrap_or_else(|| config_namespace.to_owned()),
        });
        let mut slot = self.current.write().expect("tracer lock");
        if slot.as_ref().map(|t| &t.key) == wanted.as_ref() {
            return;
        }
        *slot = match wanted {
            None => None,
            Some(key) => match Tracer::start(key, self.pod.name.as_deref(), self.dropped.clone()) {
                Ok(t) => Some(Arc::new(t)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the span exporter; tracing is off");
                    None
                }
            },
        };
    }
}

/// What a tracer was built from, to tell whether a new config needs a new one.
#[derive(Clone, Debug, PartialEq)]
struct Key {
    settings: TracingSettings,
    service_name: String,
    namespace: String,
}

/// Decides which requests get spans and queues the finished ones for export.
pub struct Tracer {
    key: Key,
    /// `key.settings.sampling_percent`, as the per-request decision uses it.
    sampler: Sampler,
    queue: Queue,
    scope: InstrumentationScope,
}

impl Tracer {
    fn start(key: Key, pod_name: Option<&str>, dropped: Counter) -> Result<Self, String> {
        let collector = parse_collector(&key.settings.collector).map_err(str::to_owned)?;
        let builder = opentelemetry_otlp::SpanExporter::builder();
        let mut exporter = match collector.protocol {
            CollectorProtocol::Grpc => builder
                .with_tonic()
                .with_endpoint(collector.url)
                .with_timeout(export::EXPORT_TIMEOUT)
                .build(),
            // hyper-util's client (the `hyper-client` feature), plaintext only: no second TLS
            // stack, no blocking reqwest thread.
            CollectorProtocol::HttpProtobuf => builder
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(collector.url)
                .with_timeout(export::EXPORT_TIMEOUT)
                .build(),
        }
        .map_err(|e| e.to_string())?;
        let mut attrs = vec![
            KeyValue::new("service.name", key.service_name.clone()),
            KeyValue::new("k8s.namespace.name", key.namespace.clone()),
        ];
        if let Some(p) = pod_name {
            attrs.push(KeyValue::new("k8s.pod.name", p.to_owned()));
        }
        exporter.set_resource(&Resource::builder_empty().with_attributes(attrs).build());
        Ok(Self::with_queue(key, Queue::start(exporter, dropped)))
    }

    fn with_queue(key: Key, queue: Queue) -> Self {
        Self {
            sampler: Sampler::new(key.settings.sampling_percent),
            key,
            queue,
            scope: InstrumentationScope::builder("trellis-proxy")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        }
    }

    /// Decides whether this request gets a span. When it does, the `traceparent` the request
    /// carries on is rewritten to name this proxy's span as the parent (a started trace also
    /// loses a `tracestate` that belonged to no valid trace). When it does not, the headers are
    /// left exactly as they came.
    pub fn begin(self: &Arc<Self>, headers: &mut HeaderMap) -> Option<Active> {
        let incoming = headers.get(&TRACEPARENT).map(HeaderValue::as_bytes);
        let ids = context::decide(incoming, self.sampler, context::roll, context::random_ids)?;
        let tp = ids.traceparent();
        headers.insert(
            TRACEPARENT,
            HeaderValue::from_bytes(&tp).expect("hex and dashes are valid header bytes"),
        );
        if ids.parent_id.is_none() {
            headers.remove(&TRACESTATE);
        }
        Some(Active {
            tracer: self.clone(),
            ids,
            start: SystemTime::now(),
        })
    }
}

/// A sampled request's span, open until the response headers are sent.
pub struct Active {
    tracer: Arc<Tracer>,
    ids: SpanIds,
    start: SystemTime,
}

/// What the proxy knows of a request once it answered.
pub struct Finished<'a> {
    pub kind: SpanKind,
    pub method: &'a Method,
    pub authority: &'a str,
    /// Path and query as received; only the path is recorded (queries can carry secrets).
    pub path: &'a str,
    pub version: Version,
    pub status: u16,
    /// Shared, not copied: a sampled request's span takes a reference count, not a string.
    pub peer_identity: &'a Arc<str>,
    pub dst_service: &'a Arc<str>,
    /// Endpoints tried (retries show as `trellis.attempts` > 1).
    pub attempts: u32,
    /// Response flags of the traffic layer (`UF`, `UT`, `RL`, ...).
    pub flags: &'a [&'static str],
    /// Retries and timeouts, recorded as span events.
    pub events: &'a [AttemptEvent],
    pub elapsed: Duration,
}

impl Active {
    pub fn trace_id(&self) -> [u8; 16] {
        self.ids.trace_id
    }

    /// Builds the span and queues it; a full queue drops it (counted).
    pub fn finish(&self, f: &Finished<'_>) {
        let span = self.span_data(f);
        self.tracer.queue.push(span);
    }

    fn span_data(&self, f: &Finished<'_>) -> SpanData {
        let (name, method) = method_name(f.method);
        let mut attributes = Vec::with_capacity(10);
        attributes.push(KeyValue::new("http.request.method", method));
        let path = f.path.split('?').next().unwrap_or("");
        attributes.push(KeyValue::new("url.path", path.to_owned()));
        attributes.push(KeyValue::new(
            "http.response.status_code",
            i64::from(f.status),
        ));
        if let Some((host, port)) = split_authority(f.authority) {
            attributes.push(KeyValue::new("server.address", host.to_owned()));
            if let Some(p) = port {
                attributes.push(KeyValue::new("server.port", i64::from(p)));
            }
        }
        attributes.push(KeyValue::new(
            "network.protocol.version",
            match f.version {
                Version::HTTP_10 => "1.0",
                Version::HTTP_2 => "2",
                _ => "1.1",
            },
        ));
        if !f.peer_identity.is_empty() {
            attributes.push(KeyValue::new(
                "trellis.peer.identity",
                f.peer_identity.clone(),
            ));
        }
        attributes.push(KeyValue::new(
            "trellis.destination.service",
            f.dst_service.clone(),
        ));
        if f.attempts > 1 {
            attributes.push(KeyValue::new("trellis.attempts", i64::from(f.attempts)));
            // Semantic conventions: the ordinal of the last resend.
            attributes.push(KeyValue::new(
                "http.request.resend_count",
                i64::from(f.attempts - 1),
            ));
        }
        if !f.flags.is_empty() {
            attributes.push(KeyValue::new("trellis.response_flags", f.flags.join(",")));
        }
        // Semantic conventions: a client span fails on 4xx and 5xx, a server span on 5xx only
        // (a 404 is the server doing its job).
        let failed = match f.kind {
            SpanKind::Client => f.status >= 400,
            _ => f.status >= 500,
        };
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(self.ids.trace_id),
                SpanId::from_bytes(self.ids.span_id),
                TraceFlags::new(self.ids.flags),
                false,
                TraceState::NONE,
            ),
            parent_span_id: self
                .ids
                .parent_id
                .map(SpanId::from_bytes)
                .unwrap_or(SpanId::INVALID),
            parent_span_is_remote: self.ids.parent_id.is_some(),
            span_kind: f.kind.clone(),
            name: Cow::Borrowed(name),
            start_time: self.start,
            end_time: self.start + f.elapsed,
            attributes,
            dropped_attributes_count: 0,
            events: span_events(f.events),
            links: Default::default(),
            status: if failed {
                Status::error("")
            } else {
                Status::Unset
            },
            instrumentation_scope: self.tracer.scope.clone(),
        }
    }
}

/// `SpanEvents` is non-exhaustive: fill a default one.
fn span_events(events: &[AttemptEvent]) -> SpanEvents {
    let mut out = SpanEvents::default();
    out.events = events.iter().map(span_event).collect();
    out
}

/// A retry or timeout as a span event. Names and attributes (under `trellis.`) are ours; the
/// semantic conventions define none for either.
fn span_event(e: &AttemptEvent) -> Event {
    let attempt = KeyValue::new("trellis.attempt", i64::from(e.attempt));
    let ms = |d: &Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let (name, attributes) = match &e.kind {
        AttemptEventKind::Retry { reason } => (
            "retry",
            vec![
                attempt,
                KeyValue::new("trellis.retry.reason", reason.to_string()),
            ],
        ),
        AttemptEventKind::PerTryTimeout { after } => (
            "timeout",
            vec![
                attempt,
                KeyValue::new("trellis.timeout.kind", "per-try"),
                KeyValue::new("trellis.timeout.ms", ms(after)),
            ],
        ),
        AttemptEventKind::RequestTimeout { after } => (
            "timeout",
            vec![
                attempt,
                KeyValue::new("trellis.timeout.kind", "request"),
                KeyValue::new("trellis.timeout.ms", ms(after)),
            ],
        ),
    };
    Event::new(name, e.at, attributes, 0)
}

/// The span name and `http.request.method`: the method when it is a standard one, else `HTTP`
/// and `_OTHER` (semantic conventions; also keeps span names low-cardinality).
fn method_name(m: &Method) -> (&'static str, &'static str) {
    let known = match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => return ("HTTP", "_OTHER"),
    };
    (known, known)
}

/// `host[:port]` (IPv6 in brackets) into host and port.
fn split_authority(a: &str) -> Option<(&str, Option<u16>)> {
    if a.is_empty() {
        return None;
    }
    if let Some(rest) = a.strip_prefix('[') {
        let (host, tail) = rest.split_once(']')?;
        let port = tail.strip_prefix(':').and_then(|p| p.parse().ok());
        return Some((host, port));
    }
    match a.rsplit_once(':') {
        Some((h, p)) => Some((h, p.parse().ok())),
        None => Some((a, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_name_prefers_the_workload_label() {
        let pod = Pod {
            service_account: Some("sa".into()),
            ..Default::default()
        };
        let mut l = BTreeMap::new();
        assert_eq!(service_name(&l, &pod), "sa");
        assert_eq!(service_name(&l, &Pod::default()), "unknown_service");
        l.insert("app".into(), "web".into());
        assert_eq!(service_name(&l, &pod), "web");
        l.insert("app.kubernetes.io/name".into(), "shop-web".into());
        assert_eq!(service_name(&l, &pod), "shop-web");
    }

    #[test]
    fn authorities_split() {
        assert_eq!(split_authority("a.b:80"), Some(("a.b", Some(80))));
        assert_eq!(split_authority("a.b"), Some(("a.b", None)));
        assert_eq!(split_authority("[::1]:8080"), Some(("::1", Some(8080))));
        assert_eq!(split_authority(""), None);
    }
}
