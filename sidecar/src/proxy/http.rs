//! HTTP message handling shared by both directions: hop-by-hop headers (RFC 9110 section 7.6.1),
//! request ids, upgrades, and the request form each upstream protocol wants.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{self, Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};

/// Carried between proxies when an HTTP/1.1 request rides the proxies' HTTP/2 connection, so the
/// inbound proxy speaks HTTP/1.1 to the application again.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("trellis-orig-proto");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Connection-scoped headers a proxy must not forward (RFC 9110 section 7.6.1), besides those the
/// `Connection` header itself names.
static HOP_BY_HOP: [HeaderName; HOP_BY_HOP_LEN] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];
const HOP_BY_HOP_LEN: usize = 6;
const CONNECTION_INDEX: usize = 0;
const KEEP_ALIVE_INDEX: usize = 1;
const PROXY_CONNECTION_INDEX: usize = 2;
const TE_INDEX: usize = 3;
const TRANSFER_ENCODING_INDEX: usize = 4;
const UPGRADE_INDEX: usize = 5;

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

/// Whether an HTTP/1.0 client asked to keep its connection open (`Connection: keep-alive`).
/// hyper keeps an HTTP/1.0 connection open only when the response says `Connection:
/// keep-alive` too, and the proxy strips the application's `Connection` header (hop-by-hop):
/// without [`keep_http10_alive`], every HTTP/1.0 keep-alive client (ApacheBench `-k`, old
/// load balancers' health checks) got a new connection per request.
pub fn http10_keep_alive<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_10 && connection_has(req.headers(), "keep-alive")
}

/// Tells an HTTP/1.0 client that asked for it ([`http10_keep_alive`]) that its connection stays
/// open, unless the response closes it.
pub fn keep_http10_alive<B>(resp: &mut Response<B>) {
    if !resp.headers().contains_key(header::CONNECTION) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    }
}

/// Removes hop-by-hop headers. `TE: trailers` survives (gRPC needs it end to end); an upgrade
/// keeps `Connection: upgrade` and `Upgrade`.
///
/// Runs twice per request in each sidecar. It looks at the names present once and removes only
/// those it found: a hashed `remove` for each of the six names cost more than the rest of the
/// function together (callgrind: 3.3k of the server sidecar's 66k instructions per request),
/// and most messages carry none of them or only `Connection`. The usual `Connection` values
/// (`keep-alive`, `close`), which name no other header, are recognised as a whole, without
/// splitting them into tokens: nginx and most HTTP/1.1 servers answer with `Connection:
/// keep-alive`, and parsing that as a list cost the server sidecar 500 of the 1.5k instructions
/// this function took per request (callgrind, `hack/bench-ab.py` with `IR=1`).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let mut present = [false; HOP_BY_HOP_LEN];
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        if upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        return;
    }
    let keep_te = present[TE_INDEX]
        && headers
            .get(header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    // Headers named by `Connection` are hop-by-hop too.
    if present[CONNECTION_INDEX] {
        let values = headers.get_all(header::CONNECTION);
        // Nearly always `keep-alive` or `close`: nothing to split, nothing to collect.
        let named: Vec<HeaderName> = if values.iter().all(|v| names_no_header(v.as_bytes())) {
            Vec::new()
        } else {
            values
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                // `close` names no header, and the listed ones go below anyway.
                .filter(|t| !names_no_header(t.as_bytes()))
                .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
                .filter(|n| !(upgrade && n == header::UPGRADE))
                .collect()
        };
        for n in named {
            headers.remove(n);
        }
    }
    // A message framed by `Transfer-Encoding` had its body decoded by it; a `Content-Length`
    // beside it is stale and goes too (RFC 9112 section 6.3: a proxy forwarding such a
    // message MUST remove it). hyper already drops it from requests but leaves it on
    // responses: an application answering `Content-Length: 5` with an 11-byte chunked body
    // sent the next hop a length its body did not have, and the client got nothing.
    if present[TRANSFER_ENCODING_INDEX] {
        headers.remove(header::CONTENT_LENGTH);
    }
    for (h, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
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

/// Where `name` is in [`HOP_BY_HOP`], if it is. Sorted out by length first, then one
/// comparison: comparing every header with all six names cost 80 instructions a header
/// (callgrind, client sidecar, 790 per request for the request's and the response's headers),
/// and most names (`host`, `accept`, `content-type`, `content-length`, `date`, `server`) have
/// none of the six lengths.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    let i = match name.as_str().len() {
        2 => TE_INDEX,
        7 => UPGRADE_INDEX,
        10 if name == header::CONNECTION => CONNECTION_INDEX,
        10 => KEEP_ALIVE_INDEX,
        16 => PROXY_CONNECTION_INDEX,
        17 => TRANSFER_ENCODING_INDEX,
        _ => return None,
    };
    (HOP_BY_HOP[i] == name).then_some(i)
}

/// Whether a `Connection` value (or one token of it) names no header that is not already
/// removed anyway: `close`, or one of [`HOP_BY_HOP`] (`keep-alive` above all). Compared as bytes:
/// going through [`HeaderName::as_str`] for each of [`HOP_BY_HOP`] cost 250 instructions a call.
fn names_no_header(v: &[u8]) -> bool {
    const NOTHING: [&[u8]; HOP_BY_HOP_LEN + 1] = [
        b"keep-alive",
        b"close",
        b"connection",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
    ];
    NOTHING.iter().any(|n| v.eq_ignore_ascii_case(n))
}

/// Adds an `x-request-id` when the client sent none. Returns nothing: a copy of the id
/// (a second allocation, since the header's bytes are not yet shared) is only needed for a
/// span or an access log line, and [`request_id`] reads it then.
///
/// Runs for every request the client sidecar forwards, and nginx, the baseline of issue 14,
/// adds no id at all: it cost 860 instructions of the client sidecar's 42.6k per request
/// (callgrind, `hack/bench-ir.py`), more than half of them looking the name up twice in the
/// map (`contains_key`, then `insert`) and 260 formatting the digits a nibble at a time. One
/// lookup through the map's entry, and the digits made 16 at a time (`hex16`).
pub fn ensure_request_id(headers: &mut HeaderMap) {
    if let header::Entry::Vacant(slot) = headers.entry(X_REQUEST_ID) {
        slot.insert(new_request_id());
    }
}

/// A random id, 8-4-4-4-12 hex digits: UUID-shaped so log tooling recognises it. Written in
/// place: `format!` would allocate.
fn new_request_id() -> HeaderValue {
    let id = rand::random::<u128>();
    let hi = hex16((id >> 64) as u64);
    let lo = hex16(id as u64);
    let mut buf = [b'-'; 36];
    buf[0..8].copy_from_slice(&hi[0..8]);
    buf[9..13].copy_from_slice(&hi[8..12]);
    buf[14..18].copy_from_slice(&hi[12..16]);
    buf[19..23].copy_from_slice(&lo[0..4]);
    buf[24..36].copy_from_slice(&lo[4..16]);
    HeaderValue::from_bytes(&buf).expect("hex and dashes are valid header bytes")
}

/// The 16 lowercase hex digits of `x`, most significant first, computed on all the nibbles of
/// each 32-bit half at once: each nibble spread into a byte of its own, then turned into its
/// digit by adding `'0'`, and `'a' - '0' - 10` more where the nibble is 10 or above.
fn hex16(x: u64) -> [u8; 16] {
    fn hex8(x: u32) -> [u8; 8] {
        let mut v = u64::from(x);
        // Byte i of v (from the least significant) gets nibble i of x: the 16-bit halves
        // apart, then the bytes, then the nibbles; big-endian bytes then read most
        // significant first.
        v = ((v & 0xffff_0000) << 16) | (v & 0xffff);
        v = ((v & 0x0000_ff00_0000_ff00) << 8) | (v & 0x0000_00ff_0000_00ff);
        v = ((v & 0x00f0_00f0_00f0_00f0) << 4) | (v & 0x000f_000f_000f_000f);
        // Each byte now holds one nibble (0..=15); 1 in each byte whose nibble is 10 or more.
        let letters = ((v + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
        let digits = v + 0x3030_3030_3030_3030 + letters * u64::from(b'a' - b'0' - 10);
        digits.to_be_bytes()
    }
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&hex8((x >> 32) as u32));
    out[8..].copy_from_slice(&hex8(x as u32));
    out
}

/// The request's `x-request-id` ([`ensure_request_id`] makes sure there is one).
pub fn request_id(headers: &HeaderMap) -> &str {
    headers
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
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
/// `Host` header. Runs once per request forwarded over HTTP/1.1; it reuses the URI's parts
/// rather than formatting and parsing them again.
pub fn to_http1<B>(req: &mut Request<B>) {
    if let Some(a) = req.uri().authority()
        && !req.headers().contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    if req.uri().scheme().is_some() {
        let mut parts = uri::Parts::default();
        parts.path_and_query = Some(path_or_root(req.uri()));
        if let Ok(u) = Uri::from_parts(parts) {
            *req.uri_mut() = u;
        }
    }
    *req.version_mut() = Version::HTTP_11;
}

/// The URI's path and query (a reference-counted copy), `/` when it has none.
fn path_or_root(u: &Uri) -> PathAndQuery {
    u.path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"))
}

/// Rewrites a request into the form an HTTP/2 upstream expects: absolute URI (`:scheme`,
/// `:authority`) and no `Host` header. Runs once per request forwarded over HTTP/2; the
/// authority is parsed from the header's bytes and the path kept as it is.
pub fn to_http2<B>(req: &mut Request<B>) {
    let host = req.headers_mut().remove(header::HOST);
    if req.uri().scheme().is_none()
        && let Some(a) = host
            .as_ref()
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
    {
        let mut parts = uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(a);
        parts.path_and_query = Some(path_or_root(req.uri()));
        if let Ok(u) = Uri::from_parts(parts) {
            *req.uri_mut() = u;
        }
    }
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
    fn a_length_beside_transfer_encoding_is_dropped_with_it() {
        let mut h = HeaderMap::new();
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
        // Without Transfer-Encoding the length is the message's own and stays.
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        h.insert(header::CONNECTION, "close".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h[header::CONTENT_LENGTH], "5");
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
        ensure_request_id(&mut h);
        let id = request_id(&h).to_owned();
        assert_eq!(id.len(), 36);
        ensure_request_id(&mut h);
        assert_eq!(request_id(&h), id);
        let s = id.as_str();
        let dashes: Vec<usize> = s.match_indices('-').map(|(i, _)| i).collect();
        assert_eq!(dashes, [8, 13, 18, 23]);
        assert!(s.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()));
    }

    #[test]
    fn hop_by_hop_names_are_found_by_index_and_no_others() {
        for (i, h) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(h), Some(i), "{h}");
            let upper = HeaderName::from_bytes(h.as_str().to_uppercase().as_bytes()).unwrap();
            assert_eq!(hop_by_hop_index(&upper), Some(i), "{upper}");
        }
        // Names of the same lengths that are not hop-by-hop.
        for n in [
            "tx",
            "trailer",
            "user-agent",
            "keep-alivf",
            "proxy-connectioX",
            "x-request-idxxxxx",
        ] {
            let n = HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()).unwrap();
            assert_eq!(hop_by_hop_index(&n), None, "{n}");
        }
        for h in [
            header::HOST,
            header::CONTENT_LENGTH,
            header::DATE,
            header::TRAILER,
        ] {
            assert_eq!(hop_by_hop_index(&h), None, "{h}");
        }
    }

    #[test]
    fn hex_digits_are_those_of_format() {
        let mut x: u64 = 0x0123_4567_89ab_cdef;
        for _ in 0..10_000 {
            let got = hex16(x);
            assert_eq!(std::str::from_utf8(&got).unwrap(), format!("{x:016x}"));
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
        }
        for x in [0, u64::MAX, 0xa, 0x9, 0xf0f0_f0f0_0f0f_0f0f] {
            assert_eq!(std::str::from_utf8(&hex16(x)).unwrap(), format!("{x:016x}"));
        }
    }

    #[test]
    fn request_ids_differ_and_a_client_id_is_kept() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let mut h = HeaderMap::new();
            ensure_request_id(&mut h);
            assert!(seen.insert(request_id(&h).to_owned()), "a repeated id");
        }
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("from-the-client"));
        ensure_request_id(&mut h);
        assert_eq!(h.get_all(&X_REQUEST_ID).iter().count(), 1);
        assert_eq!(request_id(&h), "from-the-client");
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
    fn connection_values_naming_nothing_are_the_hop_by_hop_names_and_close() {
        for h in &HOP_BY_HOP {
            assert!(names_no_header(h.as_str().as_bytes()), "{h}");
            assert!(names_no_header(h.as_str().to_uppercase().as_bytes()), "{h}");
        }
        assert!(names_no_header(b"Close"));
        assert!(!names_no_header(b"x-secret"));
        assert!(!names_no_header(b"keep-alive, x-secret"));
        // A value naming a header among others that name nothing: that header still goes.
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, "Keep-Alive".parse().unwrap());
        h.append(header::CONNECTION, "x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn strips_only_what_is_there_and_keeps_the_rest() {
        // Only `Connection` present (nginx's keep-alive responses).
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive".parse().unwrap());
        h.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert_eq!(h[header::CONTENT_LENGTH], "5");
        // None present: nothing changes.
        let mut h = HeaderMap::new();
        h.insert("x-a", "1".parse().unwrap());
        h.append("x-a", "2".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.get_all("x-a").iter().count(), 2);
        // A `TE` other than trailers goes.
        let mut h = HeaderMap::new();
        h.insert(header::TE, "gzip".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty());
        // An upgrade without `Connection` still gets `Connection: upgrade`.
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }

    #[test]
    fn request_forms_keep_what_they_cannot_convert() {
        // No Host and a relative URI: nothing to make absolute.
        let mut r = Request::builder().uri("/a").body(()).unwrap();
        to_http2(&mut r);
        assert_eq!(r.uri().to_string(), "/a");
        // A Host that is no authority is dropped, the URI kept.
        let mut r = Request::builder()
            .uri("/a")
            .header(header::HOST, "bad host")
            .body(())
            .unwrap();
        to_http2(&mut r);
        assert_eq!(r.uri().to_string(), "/a");
        assert!(r.headers().get(header::HOST).is_none());
        // An absolute URI keeps its Host when the request has one.
        let mut r = Request::builder()
            .uri("http://svc:80/x?y")
            .header(header::HOST, "other")
            .body(())
            .unwrap();
        to_http1(&mut r);
        assert_eq!(r.uri().to_string(), "/x?y");
        assert_eq!(r.headers()[header::HOST], "other");
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
