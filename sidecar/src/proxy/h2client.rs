//! The pool's HTTP/2 client, on the `h2` crate directly: the request's own task opens its
//! stream, sends its body and awaits its response; one task per connection does the I/O.
//!
//! Why not hyper's HTTP/2 client: it puts two more tasks between a request and its stream.
//! `SendRequest::send_request` goes through a channel to hyper's dispatch task, which opens the
//! stream and spawns one more task per request to await the response and hand it back over a
//! oneshot (and one to pipe a request body). A request there costs a task spawn and four
//! task wakeups besides the connection's I/O; here it costs the two the connection I/O needs
//! (the connection task writes the request, and wakes the request's task when the response
//! arrives). `perf` of a Trellis pair put hyper's dispatch among the largest costs of the
//! client sidecar (see the issue 14 note in README.md); `hack/bench-ab.py` numbers are in the
//! commit that made this change.
//!
//! What hyper did for us and this module now does:
//! - connection-specific headers (RFC 9113 section 8.2.2) are dropped and `content-length` is
//!   set from a body of known length ([`prepare`]);
//! - a request body is piped with flow control ([`Pipe`]); when the response comes before the
//!   request body is done (gRPC bidirectional streams, uploads answered early), the rest of it
//!   is piped from a task of its own, so only those requests pay for one;
//! - the response body releases flow-control capacity as it is read and reports its
//!   `content-length` as an exact size hint ([`RecvBody`]), which [`super::coalesce`] relies on;
//! - response header lists are limited to [`MAX_HEADER_LIST_SIZE`], hyper's client default
//!   (`h2`'s own is 16 MiB);
//! - keep-alive: while streams are open, a PING every [`KEEPALIVE_INTERVAL`]; no PONG within
//!   [`KEEPALIVE_TIMEOUT`] closes the connection ([`drive`]).
//!
//! Dropping a request's future or its response body resets the stream (`h2` sends
//! `RST_STREAM(CANCEL)` when the last handle to an open stream goes), and dropping the last
//! [`h2::client::SendRequest`] lets the connection close once its streams are done, which the
//! pool relies on to retire connections.
//!
//! Departure from DESIGN.md's "hyper 1" for HTTP: the pooled HTTP/2 client alone uses `h2` (the
//! crate under hyper's own HTTP/2, same version); servers and HTTP/1.1 stay on hyper.
//!
//! Flow control: `h2` has no adaptive (BDP) windows, so the windows are fixed at hyper's
//! non-adaptive defaults ([`STREAM_WINDOW`], [`CONNECTION_WINDOW`]): large enough for bulk
//! transfers between sidecars, and memory is only held while a reader lags.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{HeaderValue, Method, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite};

use super::http::{TRACEPARENT, X_REQUEST_ID};
use crate::traffic::{Body, BoxError};

/// A stream's receive window: hyper's default when adaptive windows are off.
pub const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// The connection's receive window: hyper's default when adaptive windows are off.
pub const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// Data buffered per stream before the sender waits for the peer's window: hyper's default.
const MAX_SEND_BUF: usize = 400 * 1024;
/// The largest response header list accepted (hyper's client default, which this client
/// replaced). `h2` alone advertises and accepts 16 MiB, so a hostile mesh server (a
/// compromised workload holds a valid certificate) could make this sidecar buffer megabytes of
/// headers per stream and hand them on to the application; past this the request fails.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// How often a connection with open streams is pinged (what the hyper client was set to).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// A PING not answered within this closes the connection (hyper's default).
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// When [`drive`] pings, and how long it waits for the answer. A peer that stops answering
/// (a host gone without a FIN or RST) would otherwise hold the requests on it until TCP gives
/// up, many minutes later.
#[derive(Clone, Copy, Debug)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            interval: KEEPALIVE_INTERVAL,
            timeout: KEEPALIVE_TIMEOUT,
        }
    }
}

/// What the pool shares with a connection's task: the streams in flight (the pool counts
/// them), the peer's stream limit (the task follows it) and whether the connection ended.
#[derive(Debug)]
pub struct ConnState {
    pub inflight: AtomicUsize,
    pub max: AtomicUsize,
    pub closed: AtomicBool,
    /// Whether a request went out with its unique headers indexed (see [`prepare`]).
    pub names_indexed: AtomicBool,
}

impl ConnState {
    pub fn new(max: usize) -> Self {
        Self {
            inflight: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            closed: AtomicBool::new(false),
            names_indexed: AtomicBool::new(false),
        }
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Whether another stream fits under the peer's limit.
    pub fn has_room(&self) -> bool {
        self.inflight() < self.max.load(Ordering::Relaxed)
    }
}

/// The client builder with the settings above; `max_streams` is assumed of the peer until its
/// SETTINGS arrive.
pub fn builder(max_streams: usize) -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(MAX_SEND_BUF)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .initial_max_send_streams(max_streams)
        .enable_push(false);
    b
}

/// Polls the connection until it ends: follows the peer's stream limit into `state`, pings
/// while streams are open, and marks `state` closed at the end.
pub async fn drive<T>(
    mut conn: h2::client::Connection<T, Bytes>,
    state: Arc<ConnState>,
    keepalive: Keepalive,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut pings = conn.ping_pong();
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + keepalive.interval,
        keepalive.interval,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(deadline);
    let mut awaiting_pong = false;
    let mut last = state.max.load(Ordering::Relaxed);
    let mut io = std::future::poll_fn(|cx| {
        let r = Pin::new(&mut conn).poll(cx);
        let now = conn.max_concurrent_send_streams();
        if now != last {
            last = now;
            state.max.store(now, Ordering::Relaxed);
        }
        r
    });
    let mut io = Pin::new(&mut io);
    let res = loop {
        tokio::select! {
            r = io.as_mut() => break r.map_err(|e| e.to_string()),
            _ = tick.tick(), if !awaiting_pong => {
                let busy = state.inflight() > 0;
                if busy
                    && let Some(p) = pings.as_mut()
                    && p.send_ping(h2::Ping::opaque()).is_ok()
                {
                    awaiting_pong = true;
                    deadline
                        .as_mut()
                        .reset(tokio::time::Instant::now() + keepalive.timeout);
                }
            }
            r = poll_pong(pings.as_mut()), if awaiting_pong => {
                awaiting_pong = false;
                if let Err(e) = r {
                    break Err(e.to_string());
                }
            }
            _ = deadline.as_mut(), if awaiting_pong => {
                break Err("keep-alive ping timed out".to_string());
            }
        }
    };
    state.closed.store(true, Ordering::Relaxed);
    if let Err(e) = res {
        tracing::debug!(error = %e, "upstream h2 connection ended");
    }
}

async fn poll_pong(p: Option<&mut h2::PingPong>) -> Result<(), h2::Error> {
    match p {
        Some(p) => std::future::poll_fn(|cx| p.poll_pong(cx)).await.map(drop),
        None => std::future::pending().await,
    }
}

/// Headers HTTP/2 forbids (RFC 9113 section 8.2.2) besides `Connection` and `TE`; `h2` refuses
/// a request carrying any.
static CONNECTION_HEADERS: [HeaderName; 4] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The request head as HTTP/2 sends it: connection-specific headers dropped (with those the
/// `Connection` header names), `TE` only as `trailers`, and `content-length` from a body of
/// known length (as hyper does: also when zero for methods whose payload means something).
/// Looks at the names present once: the proxy already stripped these, so nearly always there is
/// nothing to remove, and a hashed `remove` per name would be most of the cost.
///
/// Per-request unique values (`x-request-id`, `traceparent`) are marked never to be indexed
/// by HPACK, except on the connection's first request (`first`). Indexed, each one went into
/// the connection's dynamic table, where the next request's lookup walked every earlier id of
/// that name comparing values before inserting its own and evicting an old one: about 3k of
/// the client sidecar's 60k instructions per request (callgrind), for entries no later request
/// could ever match. The first request's values are indexed so that the names are in the
/// table: later values then name them by index, and the peer's decoder does not parse and
/// allocate the name again for every request (never indexing from the start cost the server
/// sidecar 1 % more than it saved it).
pub fn prepare(headers: &mut HeaderMap, method: &Method, body: &Body, first: bool) {
    let (mut connection, mut te, mut other) = (false, false, false);
    for (name, value) in headers.iter_mut() {
        if name == X_REQUEST_ID || name == TRACEPARENT {
            value.set_sensitive(!first);
        } else if name == header::CONNECTION {
            connection = true;
        } else if name == header::TE {
            te = true;
        } else if CONNECTION_HEADERS.contains(name) {
            other = true;
        }
    }
    if connection
        && let Some(named) = headers.remove(header::CONNECTION)
        && let Ok(s) = named.to_str()
    {
        for n in s.split(',') {
            headers.remove(n.trim());
        }
    }
    if other {
        for h in &CONNECTION_HEADERS {
            headers.remove(h);
        }
    }
    if te
        && headers
            .get(header::TE)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
    if let Some(len) = body.size_hint().exact()
        && (len != 0 || !matches!(*method, Method::GET | Method::HEAD | Method::CONNECT))
        && !headers.contains_key(header::CONTENT_LENGTH)
    {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
}

/// Sends `req` on a stream of `sr` and returns the response once its head arrives. The request
/// body is piped from this task while it waits; what is left of it once the response is in is
/// piped by a task of its own.
pub async fn send(
    sr: &h2::client::SendRequest<Bytes>,
    state: &ConnState,
    req: Request<Body>,
) -> Result<Response<Body>, h2::Error> {
    let mut sr = sr.clone().ready().await?;
    let (mut parts, body) = req.into_parts();
    let first = !state.names_indexed.swap(true, Ordering::Relaxed);
    prepare(&mut parts.headers, &parts.method, &body, first);
    let eos = body.is_end_stream();
    let (resp, tx) = sr.send_request(Request::from_parts(parts, ()), eos)?;
    let mut pipe = (!eos).then(|| Pipe::new(body, tx));
    let mut resp = std::pin::pin!(resp);
    let head = std::future::poll_fn(|cx| {
        if let Some(p) = pipe.as_mut()
            && Pin::new(p).poll(cx).is_ready()
        {
            pipe = None;
        }
        resp.as_mut().poll(cx)
    })
    .await?;
    if let Some(p) = pipe {
        tokio::spawn(p);
    }
    let len = content_length(head.headers());
    Ok(head.map(|recv| RecvBody { recv, left: len }.boxed()))
}

/// The message's length from its `content-length` header(s), when they agree.
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let first: u64 = values.next()?.to_str().ok()?.trim().parse().ok()?;
    // Differing values make the length unknown (h2 refuses such a response anyway).
    values
        .all(|v| v.to_str().ok().and_then(|s| s.trim().parse().ok()) == Some(first))
        .then_some(first)
}

/// A body being sent on its stream, within the peer's flow-control window: a request body
/// here, a response body in [`super::h2server`].
///
/// The first chunk is read before any window is asked for: a stream starts with the peer's
/// whole initial window (2 MiB between sidecars), and most bodies are one chunk that is already
/// there ([`super::coalesce`] reads a small response's ahead). That chunk goes out at once,
/// without the three calls into `h2` (reserve, read the capacity, register for a reset), each
/// taking the connection's stream lock, that a later chunk waits on. Only when the first chunk
/// is not there yet does the pipe register for window and reset, as for every later one. The
/// price: when the connection's window is used up, a stream's first chunk waits for it in
/// `h2`'s buffer instead of in the body's source. That is one chunk per stream, which the pipe
/// already lets into the buffer for every later chunk as soon as any window opens.
pub struct Pipe {
    body: Body,
    tx: h2::SendStream<Bytes>,
    /// Nothing read yet: read before asking for window.
    fresh: bool,
}

impl Pipe {
    pub fn new(body: Body, tx: h2::SendStream<Bytes>) -> Self {
        Pipe {
            body,
            tx,
            fresh: true,
        }
    }
}

impl Future for Pipe {
    /// Done: the body ended (or failed, and the stream was reset), or the peer reset the stream.
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            // Wait for window before reading a chunk, so a slow peer slows the body's source
            // instead of filling our buffers (but not for the first one: see above).
            let fresh = std::mem::take(&mut this.fresh);
            if !fresh {
                this.tx.reserve_capacity(1);
                if this.tx.capacity() == 0 {
                    loop {
                        match ready!(this.tx.poll_capacity(cx)) {
                            Some(Ok(0)) => {}
                            Some(Ok(_)) => break,
                            Some(Err(_)) | None => return Poll::Ready(()),
                        }
                    }
                } else if let Poll::Ready(r) = this.tx.poll_reset(cx) {
                    tracing::debug!(reason = ?r.ok(), "upstream reset the request stream");
                    return Poll::Ready(());
                }
            }
            let frame = match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(f) => f,
                // Not there yet: ask for window and watch for a reset, then wait.
                Poll::Pending if fresh => continue,
                Poll::Pending => return Poll::Pending,
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let eos = this.body.is_end_stream();
                        if this.tx.send_data(data, eos).is_err() || eos {
                            return Poll::Ready(());
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            this.tx.reserve_capacity(0);
                            let _ = this.tx.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "request body failed; resetting the stream");
                    this.tx.send_reset(h2::Reason::INTERNAL_ERROR);
                    return Poll::Ready(());
                }
                None => {
                    this.tx.reserve_capacity(0);
                    let _ = this.tx.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// A body read from its stream, giving the window back as data is read: a response body here,
/// a request body in [`super::h2server`].
pub struct RecvBody {
    recv: h2::RecvStream,
    /// What `content-length` says is left, when the peer sent one.
    left: Option<u64>,
}

impl RecvBody {
    /// `len`: the message's `content-length` (`content_length`), reported as the exact size.
    pub fn new(recv: h2::RecvStream, len: Option<u64>) -> Self {
        RecvBody { recv, left: len }
    }
}

impl HttpBody for RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match ready!(this.recv.poll_data(cx)) {
            Some(Ok(data)) => {
                let _ = this.recv.flow_control().release_capacity(data.len());
                if let Some(left) = this.left.as_mut() {
                    *left = left.saturating_sub(data.len() as u64);
                }
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            Some(Err(e)) => return Poll::Ready(Some(Err(Box::new(e)))),
            None => {}
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(Box::new(e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Some(n) if !self.recv.is_end_stream() => SizeHint::with_exact(n),
            Some(_) => SizeHint::with_exact(0),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    fn body(b: &'static [u8]) -> Body {
        Full::new(Bytes::from_static(b))
            .map_err(|e| match e {})
            .boxed()
    }

    /// A client connection to `addr`, driven with `keepalive`.
    async fn connect(
        addr: std::net::SocketAddr,
        keepalive: Keepalive,
    ) -> (h2::client::SendRequest<Bytes>, Arc<ConnState>) {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sr, conn) = builder(100).handshake::<_, Bytes>(tcp).await.unwrap();
        let state = Arc::new(ConnState::new(100));
        tokio::spawn(drive(conn, state.clone(), keepalive));
        (sr, state)
    }

    /// A hyper HTTP/2 server that answers every request with its own body, echoed.
    async fn echo_server() -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async {
                    let body = req.into_body().collect().await?.to_bytes();
                    Ok::<_, hyper::Error>(Response::new(Full::new(body)))
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc),
                );
            }
        });
        addr
    }

    #[tokio::test]
    async fn bodies_larger_than_the_windows_go_both_ways() {
        let addr = echo_server().await;
        let (sr, state) = connect(addr, Keepalive::default()).await;
        // Larger than the peer's default 64 KiB window and our send buffer: the pipe must wait
        // for window updates, and the response must give window back as it is read.
        let payload: Bytes = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let req = Request::post("http://echo/")
            .body(Full::new(payload.clone()).map_err(|e| match e {}).boxed())
            .unwrap();
        let resp = send(&sr, &state, req).await.unwrap();
        assert_eq!(
            resp.body().size_hint().exact(),
            Some(payload.len() as u64),
            "content-length is the exact size hint"
        );
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(got == payload, "echoed body differs ({} bytes)", got.len());
    }

    #[tokio::test]
    async fn a_peer_that_stops_answering_pings_is_dropped() {
        // Completes the HTTP/2 preface, then reads and never writes again.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
            let mut buf = vec![0; 4096];
            while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        });
        let keepalive = Keepalive {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(100),
        };
        let (_sr, state) = connect(addr, keepalive).await;
        // A request in flight (the pool's count) is what makes the connection ping.
        state.inflight.store(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        while !state.closed.load(Ordering::Relaxed) {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "connection to a silent peer still open"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_peer_that_answers_pings_is_kept() {
        let addr = echo_server().await;
        let keepalive = Keepalive {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(100),
        };
        let (sr, state) = connect(addr, keepalive).await;
        state.inflight.store(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!state.closed.load(Ordering::Relaxed));
        let req = Request::get("http://echo/").body(body(b"")).unwrap();
        assert_eq!(send(&sr, &state, req).await.unwrap().status(), 200);
    }

    #[test]
    fn connection_specific_headers_do_not_reach_http2() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "x-hop, keep-alive".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::TE, "gzip".parse().unwrap());
        h.insert("x-app", "kept".parse().unwrap());
        prepare(&mut h, &Method::POST, &body(b"hello"), false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["x-app"], "kept");
        assert_eq!(h[header::CONTENT_LENGTH], "5");

        let mut h = HeaderMap::new();
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert(
            X_REQUEST_ID,
            "4bf92f35-77b3-4da6-a3ce-929d0e0e4736".parse().unwrap(),
        );
        h.insert(
            TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        h.insert(header::ACCEPT, "*/*".parse().unwrap());
        prepare(&mut h, &Method::GET, &body(b""), true);
        // The connection's first request puts the names in the HPACK table...
        assert!(!h[X_REQUEST_ID].is_sensitive());
        prepare(&mut h, &Method::GET, &body(b""), false);
        // ...later values, unique per request, are never indexed. Anything else may be.
        assert!(h[X_REQUEST_ID].is_sensitive());
        assert!(h[TRACEPARENT].is_sensitive());
        assert!(!h[header::ACCEPT].is_sensitive());
        assert_eq!(h[header::TE], "trailers");
        assert!(!h.contains_key(header::CONTENT_LENGTH), "GET without body");
        prepare(&mut h, &Method::PUT, &body(b""), false);
        assert_eq!(h[header::CONTENT_LENGTH], "0");
    }

    #[test]
    fn content_length_is_known_only_when_consistent() {
        let mut h = HeaderMap::new();
        assert_eq!(content_length(&h), None);
        h.append(header::CONTENT_LENGTH, "12".parse().unwrap());
        assert_eq!(content_length(&h), Some(12));
        h.append(header::CONTENT_LENGTH, "12".parse().unwrap());
        assert_eq!(content_length(&h), Some(12));
        h.append(header::CONTENT_LENGTH, "13".parse().unwrap());
        assert_eq!(content_length(&h), None);
    }
}
