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
//! Spans are built by hand into the SDK's [`SpanData`](opentelemetry_sdk::trace::SpanData)
//! rather than through the SDK's tracer: the proxy needs to pick its own span id before
//! forwarding, to leave an unsampled request untouched at zero cost, and to count what the
//! queue drops ([`export`]). The request path only copies a finished span into a plain
//! [`Record`]; the `SpanData`, the protobuf encoding and the round trip to the collector happen
//! on the export thread ([`export`] says why a thread).
//!
//! Cost (issue #15: at most +5 % CPU per request at 1 % sampling). Tracing off pays one
//! uncontended read lock per request; an unsampled request parses its `traceparent` in place
//! or rolls one number from a thread-local generator ([`context::roll`]) and allocates nothing
//! (`tests/spans_cost.rs`); a sampled request copies its record (one allocation) and queues
//! it. The export thread sleeps while its queue is empty (no timer: an idle traced proxy uses
//! no more CPU than an untraced one) and keeps one connection to the collector across
//! batches. The README's "Tracing cost" has the measurements and how to repeat them.

pub mod context;
pub mod export;
pub mod record;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Version};
use opentelemetry::trace::SpanKind;
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SpanExporter;
use prometheus_client::metrics::counter::Counter;

use crate::config::{CollectorProtocol, TracingSettings, parse_collector};
use crate::traffic::AttemptEvent;
use context::{Sampler, SpanIds};
use export::Queue;
use record::Record;

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

    /// Follows a new config: starts, replaces or stops the exporter (each tracer has its own
    /// export thread). The old tracer's queue drains once the requests holding it finish.
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
}

impl Tracer {
    fn start(key: Key, pod_name: Option<&str>, dropped: Counter) -> Result<Self, String> {
        let collector = parse_collector(&key.settings.collector).map_err(str::to_owned)?;
        let mut attrs = vec![
            KeyValue::new("service.name", key.service_name.clone()),
            KeyValue::new("k8s.namespace.name", key.namespace.clone()),
        ];
        if let Some(p) = pod_name {
            attrs.push(KeyValue::new("k8s.pod.name", p.to_owned()));
        }
        let resource = Resource::builder_empty().with_attributes(attrs).build();
        // Built on the export thread, inside its runtime: tonic's channel and hyper's pool
        // spawn their connection tasks onto the runtime current at build time.
        let build = move || {
            let builder = opentelemetry_otlp::SpanExporter::builder();
            let mut exporter = match collector.protocol {
                CollectorProtocol::Grpc => builder
                    .with_tonic()
                    .with_endpoint(collector.url)
                    .with_timeout(export::EXPORT_TIMEOUT)
                    .build(),
                // hyper-util's client (the `hyper-client` feature), plaintext only: no second
                // TLS stack, no blocking reqwest thread.
                CollectorProtocol::HttpProtobuf => builder
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(collector.url)
                    .with_timeout(export::EXPORT_TIMEOUT)
                    .build(),
            }
            .map_err(|e| e.to_string())?;
            exporter.set_resource(&resource);
            Ok(exporter)
        };
        let scope = InstrumentationScope::builder("trellis-proxy")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let queue = Queue::start(build, scope, dropped)?;
        Ok(Self {
            sampler: Sampler::new(key.settings.sampling_percent),
            key,
            queue,
        })
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

    /// Queues the span's record; a full queue drops it (counted). The span itself is built
    /// on the export thread ([`record`]).
    pub fn finish(&self, f: &Finished<'_>) {
        self.tracer.queue.push(Record::new(self.ids, self.start, f));
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
}
