//! A sampled request's span in two steps: [`Record::new`] on the request path copies what the
//! span needs into plain data, and [`Record::into_span_data`] turns it into the SDK's
//! [`SpanData`] on the export thread ([`super::export`]).
//!
//! Why two steps: building `SpanData` on the request thread (a `Vec` of attribute `KeyValue`s,
//! the joined response flags, the event list, the scope) cost about 3 000 instructions per
//! sampled request under callgrind, all of it on the thread that serves requests. The record
//! costs one allocation (path and host share one buffer) plus a clone of the retry/timeout
//! events when there are any; everything else is copied by value or by reference count.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Method, Version};
use opentelemetry::trace::{
    Event, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents};

use super::Finished;
use super::context::SpanIds;
use crate::traffic::{AttemptEvent, AttemptEventKind};

/// What one finished span carries from the request thread to the export thread.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    ids: SpanIds,
    kind: SpanKind,
    /// The span name and `http.request.method` ([`method_name`]).
    name: &'static str,
    method: &'static str,
    version: &'static str,
    status: u16,
    /// `url.path` followed by `server.address` (when the authority has a host): one allocation
    /// for both, split apart on the export thread.
    text: String,
    path_len: usize,
    has_host: bool,
    port: Option<u16>,
    peer_identity: Arc<str>,
    dst_service: Arc<str>,
    attempts: u32,
    /// Empty (and unallocated) unless the traffic layer flagged the response.
    flags: Vec<&'static str>,
    events: Vec<AttemptEvent>,
    start: SystemTime,
    end: SystemTime,
}

impl Record {
    /// Copies what the span needs out of the request's borrowed state.
    pub fn new(ids: SpanIds, start: SystemTime, f: &Finished<'_>) -> Self {
        let (name, method) = method_name(f.method);
        // Only the path: a query can carry secrets.
        let path = f.path.split('?').next().unwrap_or("");
        let authority = split_authority(f.authority);
        let host = authority.map_or("", |(h, _)| h);
        let mut text = String::with_capacity(path.len() + host.len());
        text.push_str(path);
        text.push_str(host);
        Self {
            ids,
            kind: f.kind.clone(),
            name,
            method,
            version: match f.version {
                Version::HTTP_10 => "1.0",
                Version::HTTP_2 => "2",
                _ => "1.1",
            },
            status: f.status,
            text,
            path_len: path.len(),
            has_host: authority.is_some(),
            port: authority.and_then(|(_, p)| p),
            peer_identity: f.peer_identity.clone(),
            dst_service: f.dst_service.clone(),
            attempts: f.attempts,
            flags: f.flags.to_vec(),
            events: f.events.to_vec(),
            start,
            end: start + f.elapsed,
        }
    }

    /// The span as the OTLP exporter takes it, with OpenTelemetry's HTTP semantic-convention
    /// attributes. Runs on the export thread.
    pub fn into_span_data(self, scope: &InstrumentationScope) -> SpanData {
        let Record {
            ids,
            kind,
            name,
            method,
            version,
            status,
            mut text,
            path_len,
            has_host,
            port,
            peer_identity,
            dst_service,
            attempts,
            flags,
            events,
            start,
            end,
        } = self;
        let host = text.split_off(path_len);
        let mut attributes = Vec::with_capacity(11);
        attributes.push(KeyValue::new("http.request.method", method));
        attributes.push(KeyValue::new("url.path", text));
        attributes.push(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if has_host {
            attributes.push(KeyValue::new("server.address", host));
            if let Some(p) = port {
                attributes.push(KeyValue::new("server.port", i64::from(p)));
            }
        }
        attributes.push(KeyValue::new("network.protocol.version", version));
        if !peer_identity.is_empty() {
            attributes.push(KeyValue::new("trellis.peer.identity", peer_identity));
        }
        attributes.push(KeyValue::new("trellis.destination.service", dst_service));
        if attempts > 1 {
            attributes.push(KeyValue::new("trellis.attempts", i64::from(attempts)));
            // Semantic conventions: the ordinal of the last resend.
            attributes.push(KeyValue::new(
                "http.request.resend_count",
                i64::from(attempts - 1),
            ));
        }
        if !flags.is_empty() {
            attributes.push(KeyValue::new("trellis.response_flags", flags.join(",")));
        }
        // Semantic conventions: a client span fails on 4xx and 5xx, a server span on 5xx only
        // (a 404 is the server doing its job).
        let failed = match kind {
            SpanKind::Client => status >= 400,
            _ => status >= 500,
        };
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(ids.trace_id),
                SpanId::from_bytes(ids.span_id),
                TraceFlags::new(ids.flags),
                false,
                TraceState::NONE,
            ),
            parent_span_id: ids
                .parent_id
                .map(SpanId::from_bytes)
                .unwrap_or(SpanId::INVALID),
            parent_span_is_remote: ids.parent_id.is_some(),
            span_kind: kind,
            name: Cow::Borrowed(name),
            start_time: start,
            end_time: end,
            attributes,
            dropped_attributes_count: 0,
            events: span_events(&events),
            links: Default::default(),
            status: if failed {
                Status::error("")
            } else {
                Status::Unset
            },
            instrumentation_scope: scope.clone(),
        }
    }
}

#[cfg(test)]
impl Record {
    /// A plain server span, for tests of the queue.
    pub fn sample() -> Self {
        let ids = SpanIds {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_id: None,
            flags: 1,
        };
        let none: Arc<str> = "".into();
        Record::new(
            ids,
            SystemTime::now(),
            &Finished {
                kind: SpanKind::Server,
                method: &Method::GET,
                authority: "web.shop",
                path: "/",
                version: Version::HTTP_11,
                status: 200,
                peer_identity: &none,
                dst_service: &none,
                attempts: 1,
                flags: &[],
                events: &[],
                elapsed: Duration::ZERO,
            },
        )
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
    use crate::traffic::RetryReason;
    use opentelemetry::Value;
    use std::collections::HashMap;

    #[test]
    fn authorities_split() {
        assert_eq!(split_authority("a.b:80"), Some(("a.b", Some(80))));
        assert_eq!(split_authority("a.b"), Some(("a.b", None)));
        assert_eq!(split_authority("[::1]:8080"), Some(("::1", Some(8080))));
        assert_eq!(split_authority(""), None);
    }

    fn attrs(s: &SpanData) -> HashMap<&str, Value> {
        s.attributes
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.clone()))
            .collect()
    }

    /// The record carries everything across the thread: the span built from it is the one the
    /// request described (ids, times, attributes, events, status), with the query cut off.
    #[test]
    fn the_span_built_on_the_export_thread_is_the_request_described() {
        let ids = SpanIds {
            trace_id: [0x11; 16],
            span_id: [0x22; 8],
            parent_id: Some([0x33; 8]),
            flags: 1,
        };
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let peer: Arc<str> = "spiffe://cluster.local/ns/shop/sa/web".into();
        let dst: Arc<str> = "catalog.shop".into();
        let events = [AttemptEvent {
            at: start,
            attempt: 1,
            kind: AttemptEventKind::Retry {
                reason: RetryReason::ConnectFailure,
            },
        }];
        let f = Finished {
            kind: SpanKind::Client,
            method: &Method::GET,
            authority: "catalog.shop:8080",
            path: "/items?token=secret",
            version: Version::HTTP_2,
            status: 503,
            peer_identity: &peer,
            dst_service: &dst,
            attempts: 2,
            flags: &["UF", "URX"],
            events: &events,
            elapsed: Duration::from_millis(7),
        };
        let scope = InstrumentationScope::builder("trellis-proxy").build();
        let s = Record::new(ids, start, &f).into_span_data(&scope);
        assert_eq!(s.span_context.trace_id(), TraceId::from_bytes([0x11; 16]));
        assert_eq!(s.span_context.span_id(), SpanId::from_bytes([0x22; 8]));
        assert_eq!(s.parent_span_id, SpanId::from_bytes([0x33; 8]));
        assert!(s.parent_span_is_remote);
        assert_eq!(s.name, "GET");
        assert_eq!(s.span_kind, SpanKind::Client);
        assert_eq!(s.end_time.duration_since(s.start_time).unwrap(), f.elapsed);
        assert_eq!(s.status, Status::error(""));
        assert_eq!(s.instrumentation_scope, scope);
        let a = attrs(&s);
        let want: [(&str, Value); 11] = [
            ("http.request.method", "GET".into()),
            ("url.path", "/items".into()),
            ("http.response.status_code", 503i64.into()),
            ("server.address", "catalog.shop".into()),
            ("server.port", 8080i64.into()),
            ("network.protocol.version", "2".into()),
            ("trellis.peer.identity", peer.to_string().into()),
            ("trellis.destination.service", "catalog.shop".into()),
            ("trellis.attempts", 2i64.into()),
            ("http.request.resend_count", 1i64.into()),
            ("trellis.response_flags", "UF,URX".into()),
        ];
        assert_eq!(a.len(), want.len(), "{a:?}");
        for (k, v) in want {
            assert_eq!(a.get(k).map(Value::as_str), Some(v.as_str()), "{k}");
        }
        assert_eq!(s.events.events.len(), 1);
        assert_eq!(s.events.events[0].name, "retry");
    }

    /// A server span without an authority, a port or a peer: those attributes are left out,
    /// and a 404 is not a failed server span.
    #[test]
    fn absent_parts_are_left_out() {
        let ids = SpanIds {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_id: None,
            flags: 1,
        };
        let empty: Arc<str> = "".into();
        let dst: Arc<str> = "web.shop".into();
        let f = Finished {
            kind: SpanKind::Server,
            method: &Method::from_bytes(b"PURGE").unwrap(),
            authority: "",
            path: "/",
            version: Version::HTTP_11,
            status: 404,
            peer_identity: &empty,
            dst_service: &dst,
            attempts: 1,
            flags: &[],
            events: &[],
            elapsed: Duration::ZERO,
        };
        let s = Record::new(ids, SystemTime::now(), &f)
            .into_span_data(&InstrumentationScope::default());
        let a = attrs(&s);
        for absent in [
            "server.address",
            "server.port",
            "trellis.peer.identity",
            "trellis.attempts",
            "trellis.response_flags",
        ] {
            assert!(!a.contains_key(absent), "{absent}: {a:?}");
        }
        assert_eq!(s.name, "HTTP");
        assert_eq!(
            a.get("http.request.method").map(Value::as_str),
            Some("_OTHER".into())
        );
        assert_eq!(s.parent_span_id, SpanId::INVALID);
        assert_eq!(s.status, Status::Unset);
        // A host without a port gives the address alone.
        let f = Finished {
            authority: "web.shop",
            ..f
        };
        let a = Record::new(ids, SystemTime::now(), &f)
            .into_span_data(&InstrumentationScope::default());
        let a = attrs(&a);
        assert_eq!(
            a.get("server.address").map(Value::as_str),
            Some("web.shop".into())
        );
        assert!(!a.contains_key("server.port"));
    }
}
