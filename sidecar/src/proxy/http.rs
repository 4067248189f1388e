//! HTTP message handling shared by both directions: hop-by-hop headers (RFC 9110 section 7.6.1),
//! request ids, upgrades, and the request form each upstream protocol wants.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};

/// Carried between proxies when an HTTP/1.1 request rides the proxies' HTTP/2 connection, so the
/// inbound proxy speaks HTTP/1.1 to the application again.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("trellis-orig-proto");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Connection-scoped headers a proxy must not forward (RFC 9110 section 7.6.1), besides those the
/// `Connection` header itself names.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether a request asks to switch protocols (WebSocket and friends). Such requests keep their
/// `Connection: upgrade` and `Upgrade` headers and get a dedicated HTTP/1.1 connection.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers. `TE: trailers` survives (gRPC needs it end to end); an upgrade
/// keeps `Connection: upgrade` and `Upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let keep_te = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    // Headers named by `Connection` are hop-by-hop too.
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(upgrade && n == header::UPGRADE))
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for h in &HOP_BY_HOP {
        if upgrade && (h == header::CONNECTION || h == header::UPGRADE) {
            continue;
        }
        headers.remove(h);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if keep_te {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Adds an `x-request-id` when the client sent none. Returns the id.
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        return v.clone();
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let id: u128 = rand::random();
    let mut buf = [0u8; 36];
    // 8-4-4-4-12, UUID-shaped so log tooling recognises it. Written in place: this runs for
    // most requests and `format!` would allocate.
    let mut j = 0;
    for i in 0..32 {
        if matches!(i, 8 | 12 | 16 | 20) {
            buf[j] = b'-';
            j += 1;
        }
        buf[j] = HEX[((id >> (124 - 4 * i)) & 0xf) as usize];
        j += 1;
    }
    let v = HeaderValue::from_bytes(&buf).expect("hex and dashes are valid header bytes");
    headers.insert(X_REQUEST_ID, v.clone());
    v
}

/// The trace id (32 hex digits) of a W3C `traceparent`, if well formed.
pub fn trace_id(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(&TRACEPARENT)?.to_str().ok()?;
    let mut parts = v.split('-');
    let _version = parts.next()?;
    let id = parts.next()?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// The request's authority: the URI's (HTTP/2, absolute form) or the `Host` header.
pub fn authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

/// Rewrites a request into the form an HTTP/1.1 upstream expects: origin-form target and a
/// `Host` header.
pub fn to_http1<B>(req: &mut Request<B>) {
    if let Some(a) = req.uri().authority().cloned()
        && !req.headers().contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    if req.uri().scheme().is_some() {
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        if let Ok(u) = Uri::try_from(pq) {
            *req.uri_mut() = u;
        }
    }
    *req.version_mut() = Version::HTTP_11;
}

/// Rewrites a request into the form an HTTP/2 upstream expects: absolute URI (`:scheme`,
/// `:authority`) and no `Host` header.
pub fn to_http2<B>(req: &mut Request<B>) {
    if req.uri().scheme().is_none() {
        let authority = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned);
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        if let Some(a) = authority
            && let Ok(u) = Uri::builder()
                .scheme("http")
                .authority(a.as_str())
                .path_and_query(pq)
                .build()
        {
            *req.uri_mut() = u;
        }
    }
    req.headers_mut().remove(header::HOST);
    *req.version_mut() = Version::HTTP_2;
}

/// Cleans a response before it goes back to the client.
pub fn clean_response<B>(resp: &mut Response<B>) {
    let upgrade = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(resp.headers_mut(), upgrade);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert("traceparent", "00-abc-def-01".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("x-secret").is_none());
        assert!(h.get(header::TRANSFER_ENCODING).is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert!(h.get("traceparent").is_some());
    }

    #[test]
    fn upgrade_keeps_upgrade_headers() {
        let req = Request::builder()
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .body(())
            .unwrap();
        assert!(is_upgrade(&req));
        let (mut parts, _) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, true);
        assert_eq!(parts.headers[header::UPGRADE], "websocket");
        assert_eq!(parts.headers[header::CONNECTION], "upgrade");
    }

    #[test]
    fn request_id_is_generated_once() {
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 36);
        assert_eq!(ensure_request_id(&mut h), id);
        let s = id.to_str().unwrap();
        let dashes: Vec<usize> = s.match_indices('-').map(|(i, _)| i).collect();
        assert_eq!(dashes, [8, 13, 18, 23]);
        assert!(s.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()));
    }

    #[test]
    fn trace_id_from_traceparent() {
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        assert_eq!(trace_id(&h), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    }

    #[test]
    fn converts_between_request_forms() {
        let mut r = Request::builder()
            .uri("/a?b=1")
            .header(header::HOST, "svc:8080")
            .body(())
            .unwrap();
        to_http2(&mut r);
        assert_eq!(r.uri().to_string(), "http://svc:8080/a?b=1");
        assert!(r.headers().get(header::HOST).is_none());
        to_http1(&mut r);
        assert_eq!(r.uri().to_string(), "/a?b=1");
        assert_eq!(r.headers()[header::HOST], "svc:8080");
    }
}
