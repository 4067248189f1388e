//! Access logs: one line per HTTP request on stdout, when `mesh.telemetry.accessLog.enabled`.
//! JSON by default (one object per line); `Text` gives a compact human line.

use std::io::Write;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::config::AccessLogFormat;

/// One request. Paths appear here (logs), never in metric labels.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry<'a> {
    /// RFC 3339-ish UTC seconds since the epoch, with milliseconds.
    pub timestamp: f64,
    pub direction: &'a str,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub protocol: &'a str,
    pub status: u16,
    pub duration_ms: f64,
    pub request_id: &'a str,
    /// From `traceparent`, when the request carried one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<&'a str>,
    pub peer_identity: &'a str,
    pub dst_service: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Envoy-style response flags from the traffic layer (`UF`, `UT`, `NR`, ...).
    pub flags: &'a [&'static str],
}

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

/// Formats one entry as a line (with the trailing newline).
pub fn format(entry: &Entry<'_>, format: AccessLogFormat) -> Vec<u8> {
    match format {
        AccessLogFormat::Json => {
            let mut line = serde_json::to_vec(entry).expect("entry serializes");
            line.push(b'\n');
            line
        }
        AccessLogFormat::Text => format!(
            "{:.3} {} {} {}{} {} {} {:.3}ms id={} trace={} peer={} dst={} flags={}\n",
            entry.timestamp,
            entry.direction,
            entry.method,
            entry.authority,
            entry.path,
            entry.protocol,
            entry.status,
            entry.duration_ms,
            entry.request_id,
            entry.trace_id.unwrap_or("-"),
            if entry.peer_identity.is_empty() {
                "-"
            } else {
                entry.peer_identity
            },
            entry.dst_service,
            if entry.flags.is_empty() {
                "-".to_string()
            } else {
                entry.flags.join(",")
            },
        )
        .into_bytes(),
    }
}

/// Writes one entry to stdout. A full or closed stdout loses the line, never the request.
pub fn write(entry: &Entry<'_>, fmt: AccessLogFormat) {
    let line = format(entry, fmt);
    let _ = std::io::stdout().lock().write_all(&line);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_has_trace_id_and_flags() {
        let e = Entry {
            timestamp: 1.5,
            direction: "outbound",
            method: "GET",
            authority: "reviews:9080",
            path: "/r/1",
            protocol: "HTTP/1.1",
            status: 502,
            duration_ms: 1.25,
            request_id: "abc",
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            peer_identity: "",
            dst_service: "reviews.shop",
            upstream: Some("10.0.0.5:9080".into()),
            flags: &["UF"],
        };
        let line = format(&e, AccessLogFormat::Json);
        assert_eq!(*line.last().unwrap(), b'\n');
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["flags"][0], "UF");
        assert_eq!(v["status"], 502);
    }
}
