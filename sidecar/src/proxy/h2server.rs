//! The server side of the sidecar-to-sidecar HTTP/2 hop (inbound mTLS with ALPN `h2`), on the
//! `h2` crate directly: every stream of a connection is handled inside the connection's own
//! task.
//!
//! Why not hyper's HTTP/2 server (still used for everything else the proxies serve): it spawns
//! a task per stream, so each request costs a spawn, and every frame a stream sends or receives
//! is a wakeup across tasks (the stream task queues the frame and wakes the connection task to
//! write it; the connection task reads a frame and wakes the stream task). Here a connection's
//! streams are futures in a [`FuturesUnordered`] polled by the same task that polls the
//! connection ([`serve`]), and `Wakes` gives each part (the connection, the streams, the
//! shutdown signal) its own waker, so one wakeup of the task polls just the parts that were
//! woken, and a wake one part causes another (a stream queues its response, which wakes the
//! connection to write it) is handled in the same wakeup instead of scheduling the task again.
//!
//! Measured (`hack/bench-ab.py` with `IR=1`, callgrind, 200 req/s, 2026-11-29): the server
//! sidecar's instructions per request went from 66.2k to 60.5k (0.91x). Streams in the
//! connection's task without `Wakes`, polling the connection after every stream, cost
//! *more* than hyper (69.1k, 1.05x): it polled the connection 6.5 times per request against
//! hyper's 2.8; with `Wakes` it is 2.9.
//!
//! What hyper did for us and this module now does:
//! - the settings hyper's server sent ([`builder`]): at most [`MAX_CONCURRENT_STREAMS`] streams
//!   (a stream beyond it is refused with `REFUSED_STREAM`), header lists up to
//!   [`MAX_HEADER_LIST_SIZE`], hyper's send buffer and reset-stream limits (rapid reset and
//!   streams this side has to reset);
//! - request bodies release flow-control capacity as they are read, and report their
//!   `content-length` as an exact size hint ([`super::h2client::RecvBody`]);
//! - response bodies are piped within the client's window, trailers included
//!   ([`super::h2client::Pipe`]); `content-length` is set from a body of known length;
//! - a stream the client resets (`RST_STREAM`) while its response is being made drops the
//!   handler's future, which cancels the request to the application;
//! - graceful shutdown: `GOAWAY`, streams in flight finish, then the connection closes.
//!
//! And two things hyper did not: a client that finishes TLS but does not complete the HTTP/2
//! handshake within a bound is dropped, and a connection without streams (idle, or stuck in a
//! header block that never ends) is closed after [`IDLE_TIMEOUT`], instead of either holding
//! a connection forever.
//!
//! What it does not do, because the hop never needs it: upgrades and `CONNECT` tunnels (an
//! `Upgrade` request rides its own HTTP/1.1 connection between the sidecars, see
//! [`super::upstream`], and hyper's server had extended CONNECT off), `Date` headers (the
//! client sidecar's server adds one for the application), keep-alive pings (hyper's server
//! sent none either; the client sidecar pings while it has requests in flight).
//!
//! Departure from DESIGN.md's "hyper 1" for HTTP: this hop's server, like the pooled HTTP/2
//! client ([`super::h2client`]), uses `h2` (the crate under hyper's own HTTP/2, same version).
//!
//! Flow control: `h2` has no adaptive (BDP) windows (hyper's server had them on, starting at
//! 64 KiB and growing to 16 MiB at most), so the windows are fixed at the client's
//! ([`super::h2client::STREAM_WINDOW`], [`super::h2client::CONNECTION_WINDOW`]): large enough
//! for bulk transfers between sidecars, and memory is only held while the application reads
//! slower than the peer sends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::task::AtomicWaker;
use http::header::{self, HeaderValue};
use http::{Request, Response};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite};

use super::h2client::{CONNECTION_WINDOW, Pipe, RecvBody, STREAM_WINDOW, content_length};
use super::idle::{Idle, Idleness};
use crate::traffic::Body;

/// Streams a client may have open at once: hyper's server default, which the client sidecar's
/// pool follows (it opens another connection at the limit).
pub const MAX_CONCURRENT_STREAMS: u32 = 200;
/// The largest request header list accepted (RFC 9113 size: names, values and 32 bytes per
/// field). Not hyper's server default of 16 KiB: the client sidecar's HTTP/1.1 listener takes
/// heads of up to hyper's ~400 KiB buffer, so a request with a 20 KiB cookie or token (well
/// within Envoy's 60 KiB default, nginx's 32 KiB) was accepted there and then answered `431`
/// by this hop. 64 KiB covers Envoy's limit; beyond it the client still gets a `431`.
pub const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// Response data buffered per stream before the pipe waits for the client's window: hyper's.
const MAX_SEND_BUF: usize = 400 * 1024;
/// Streams this side may reset for protocol errors before the connection is closed: hyper's
/// server default (a peer that keeps making us reset streams is misbehaving).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// Streams the client may reset before this side has accepted them, before the connection is
/// closed with `GOAWAY(ENHANCE_YOUR_CALM)`: the HTTP/2 rapid-reset defence (CVE-2023-44487),
/// h2's and hyper's default, set here so it does not depend on a default. A flood of
/// `HEADERS` + `RST_STREAM` is cut off within a few dozen streams, before the application sees
/// more than a handful of them (`tests/h2_attack.rs`).
const MAX_PENDING_ACCEPT_RESETS: usize = 20;

/// The server builder with the settings above.
pub fn builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUF)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS);
    b
}

/// Why a connection ended other than by a clean close.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("HTTP/2 handshake not completed within {0:?}")]
    HandshakeTimeout(Duration),
    #[error(transparent)]
    H2(#[from] h2::Error),
}

/// Serves one HTTP/2 connection (the client preface is next on `io`) until it closes: each
/// request goes to `handler`, whose response is sent back on the request's stream. When
/// `closing` resolves the connection is shut down gracefully: `GOAWAY`, the streams in flight
/// finish, no new ones are accepted. A client that has not completed the HTTP/2 handshake
/// within `handshake_timeout` is dropped.
pub async fn serve<T, H, F>(
    io: T,
    handler: H,
    closing: impl Future<Output = ()>,
    handshake_timeout: Duration,
) -> Result<(), ServeError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Request<Body>) -> F,
    F: Future<Output = Response<Body>>,
{
    serve_with(io, handler, closing, handshake_timeout, IDLE_TIMEOUT).await
}

/// How long a connection may go without a stream before it is closed: it is told to go away
/// (`GOAWAY`) after between one and two of these without a stream open or accepted, and
/// dropped one more later if it is still there (a peer that does not answer the `GOAWAY`'s
/// `PING`). Without it, a mesh peer could hold connections open for ever, idle or in the
/// middle of a header block that never ends (slow loris: no stream is accepted until the
/// block is complete, and `h2` has no timeout of its own). Longer than the client pool's idle
/// timeout ([`super::upstream::PoolSettings`], 60 s), so that a client sidecar normally retires
/// a connection before this closes it. A stream that is open (a slow response, a long
/// download, a gRPC stream) is not idleness, however long it stays quiet.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// [`serve`] with the idle bound as a parameter (tests shorten it).
pub async fn serve_with<T, H, F>(
    io: T,
    mut handler: H,
    closing: impl Future<Output = ()>,
    handshake_timeout: Duration,
    idle_timeout: Duration,
) -> Result<(), ServeError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Request<Body>) -> F,
    F: Future<Output = Response<Body>>,
{
    let mut closing = std::pin::pin!(closing);
    let handshake = tokio::time::timeout(handshake_timeout, builder().handshake::<_, Bytes>(io));
    let conn = tokio::select! {
        r = handshake => match r {
            Ok(conn) => conn?,
            Err(_) => return Err(ServeError::HandshakeTimeout(handshake_timeout)),
        },
        // Shutting down before the client spoke: nothing is in flight.
        _ = closing.as_mut() => return Ok(()),
    };
    let mut conn = conn;
    let mut streams = FuturesUnordered::new();
    let mut draining = false;
    let mut idle = IdleCheck::new(idle_timeout);
    let wakes = Wakes::new();
    let (conn_waker, streams_waker, closing_waker) = (
        wakes.waker(Wakes::CONN),
        wakes.waker(Wakes::STREAMS),
        wakes.waker(Wakes::CLOSING),
    );
    std::future::poll_fn(|cx| {
        wakes.enter(cx.waker());
        for _ in 0..MAX_TURNS {
            let Some(woken) = wakes.take() else {
                return Poll::Pending;
            };
            if woken & Wakes::CLOSING != 0 {
                // The shutdown signal and the idle check share a waker: both are rare.
                let mut cx = Context::from_waker(&closing_waker);
                if !draining && closing.as_mut().poll(&mut cx).is_ready() {
                    draining = true;
                    conn.graceful_shutdown();
                    wakes.wake(Wakes::CONN);
                }
                match idle.poll(&mut cx, streams.is_empty()) {
                    Idle::Open => {}
                    Idle::GoAway if !draining => {
                        tracing::debug!("http/2 connection idle: going away");
                        draining = true;
                        conn.graceful_shutdown();
                        wakes.wake(Wakes::CONN);
                    }
                    Idle::GoAway => {}
                    // Nothing is in flight to lose.
                    Idle::Close => return Poll::Ready(Ok(())),
                }
            }
            if woken & Wakes::CONN != 0 {
                // Reads and writes the socket, and hands over the streams the client opened.
                let mut cx = Context::from_waker(&conn_waker);
                loop {
                    match conn.poll_accept(&mut cx) {
                        Poll::Ready(Some(Ok((req, respond)))) => {
                            let len = content_length(req.headers());
                            let req = req.map(|recv| RecvBody::new(recv, len).boxed());
                            idle.busy = true;
                            streams.push(Stream::new(handler(req), respond));
                            wakes.wake(Wakes::STREAMS);
                        }
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                        // The connection is over: a stream still held (a response the client
                        // no longer reads) can go nowhere, and dropping it cancels its request.
                        Poll::Ready(None) => return Poll::Ready(Ok(())),
                        Poll::Pending => break,
                    }
                }
            }
            if woken & Wakes::STREAMS != 0 {
                // What the streams queue (a response, window for a request body) wakes the
                // connection, which the next turn writes out.
                let mut cx = Context::from_waker(&streams_waker);
                while let Poll::Ready(Some(())) = streams.poll_next_unpin(&mut cx) {}
            }
        }
        // Still busy after many turns: let the other tasks of this thread run first.
        wakes.leave();
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
    .map_err(ServeError::from)
}

/// Turns of [`serve`]'s loop in one poll of its task before it yields to the other tasks.
const MAX_TURNS: usize = 32;

/// The idle bound ([`IDLE_TIMEOUT`]) checked once a period rather than with a timer reset per
/// stream, so a request costs only setting [`IdleCheck::busy`].
struct IdleCheck {
    tick: tokio::time::Interval,
    /// A stream was accepted since the last tick.
    busy: bool,
    /// The verdicts so far.
    idleness: Idleness,
}

impl IdleCheck {
    fn new(period: Duration) -> Self {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        IdleCheck {
            tick,
            busy: false,
            idleness: Idleness::default(),
        }
    }

    /// Called when `cx`'s waker is woken (and once at the start, to register it);
    /// `no_streams`: whether no stream is open now.
    fn poll(&mut self, cx: &mut Context<'_>, no_streams: bool) -> Idle {
        let mut verdict = Idle::Open;
        while self.tick.poll_tick(cx).is_ready() {
            let idle = no_streams && !self.busy;
            self.busy = false;
            match self.idleness.tick(idle) {
                Idle::Open => {}
                Idle::GoAway => verdict = Idle::GoAway,
                Idle::Close => return Idle::Close,
            }
        }
        verdict
    }
}

/// Which parts of a connection (the connection itself, its streams, the shutdown signal) were
/// woken, so that one poll of the task runs exactly those, and a wake that one part causes
/// another (a stream queueing its response wakes the connection to write it) is handled in
/// the same poll instead of by scheduling the task again.
///
/// Each part gets its own waker ([`Wakes::waker`]). A wake sets the part's bit; it wakes the
/// task too, unless the task is inside its poll loop ([`Wakes::enter`]), which then finds the
/// bit on its next turn ([`Wakes::take`]).
struct Wakes {
    inner: Arc<WakesInner>,
}

struct WakesInner {
    /// Bits of the parts woken since they were last polled.
    woken: AtomicU8,
    /// Whether the task is in its poll loop.
    polling: AtomicBool,
    task: AtomicWaker,
}

/// The waker of one part.
struct Part {
    inner: Arc<WakesInner>,
    bit: u8,
}

impl std::task::Wake for Part {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // SeqCst pairs with `take`: either it sees this bit, or this sees `polling` cleared
        // and wakes the task.
        self.inner.woken.fetch_or(self.bit, Ordering::SeqCst);
        if !self.inner.polling.load(Ordering::SeqCst) {
            self.inner.task.wake();
        }
    }
}

impl Wakes {
    const CONN: u8 = 1;
    const STREAMS: u8 = 2;
    const CLOSING: u8 = 4;

    /// Every part starts woken: each has to be polled once to register its waker.
    fn new() -> Self {
        Wakes {
            inner: Arc::new(WakesInner {
                woken: AtomicU8::new(Self::CONN | Self::STREAMS | Self::CLOSING),
                polling: AtomicBool::new(false),
                task: AtomicWaker::new(),
            }),
        }
    }

    fn waker(&self, bit: u8) -> Waker {
        Waker::from(Arc::new(Part {
            inner: self.inner.clone(),
            bit,
        }))
    }

    /// The task's poll starts: `task` is woken by later wakes, once the poll is over.
    fn enter(&self, task: &Waker) {
        self.inner.task.register(task);
        self.inner.polling.store(true, Ordering::SeqCst);
    }

    /// The task's poll ends with work left: wakes wake the task again.
    fn leave(&self) {
        self.inner.polling.store(false, Ordering::SeqCst);
    }

    /// Marks a part to be polled on the next turn.
    fn wake(&self, bit: u8) {
        self.inner.woken.fetch_or(bit, Ordering::SeqCst);
    }

    /// The parts woken since the last turn; `None` when there are none, and then the poll is
    /// over (later wakes wake the task).
    fn take(&self) -> Option<u8> {
        loop {
            let woken = self.inner.woken.swap(0, Ordering::SeqCst);
            if woken != 0 {
                return Some(woken);
            }
            self.inner.polling.store(false, Ordering::SeqCst);
            // A wake between the swap and the store saw `polling` set and left it to us.
            if self.inner.woken.load(Ordering::SeqCst) == 0 {
                return None;
            }
            self.inner.polling.store(true, Ordering::SeqCst);
        }
    }
}

pin_project_lite::pin_project! {
    /// One stream: its handler's future until the response head is sent, then the response
    /// body.
    struct Stream<F> {
        respond: h2::server::SendResponse<Bytes>,
        #[pin]
        state: StreamState<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StreamStateProj]
    enum StreamState<F> {
        Handling { #[pin] fut: F },
        Sending { pipe: Pipe },
    }
}

impl<F> Stream<F> {
    fn new(fut: F, respond: h2::server::SendResponse<Bytes>) -> Self {
        Stream {
            respond,
            state: StreamState::Handling { fut },
        }
    }
}

impl<F: Future<Output = Response<Body>>> Future for Stream<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StreamStateProj::Handling { fut } => {
                    let resp = match fut.poll(cx) {
                        Poll::Ready(r) => r,
                        Poll::Pending => {
                            // The client gave up on the request: dropping the handler's future
                            // (with this stream) cancels the request to the application.
                            if let Poll::Ready(r) = this.respond.poll_reset(cx) {
                                tracing::debug!(reason = ?r.ok(), "client reset the stream");
                                return Poll::Ready(());
                            }
                            return Poll::Pending;
                        }
                    };
                    let (mut head, body) = resp.into_parts();
                    let eos = body.is_end_stream();
                    if !eos {
                        set_content_length(&mut head.headers, &body);
                    }
                    match this
                        .respond
                        .send_response(Response::from_parts(head, ()), eos)
                    {
                        Ok(_) if eos => return Poll::Ready(()),
                        Ok(tx) => this.state.set(StreamState::Sending {
                            pipe: Pipe::new(body, tx),
                        }),
                        Err(e) => {
                            // A head h2 refuses (a connection-specific header the handler left
                            // in) or a stream already gone.
                            tracing::debug!(error = %e, "sending the response head failed");
                            this.respond.send_reset(h2::Reason::INTERNAL_ERROR);
                            return Poll::Ready(());
                        }
                    }
                }
                StreamStateProj::Sending { pipe } => return Pin::new(pipe).poll(cx),
            }
        }
    }
}

/// `content-length` from a body of known length, when the handler set none (as hyper does).
fn set_content_length(headers: &mut http::HeaderMap, body: &Body) {
    if let Some(len) = body.size_hint().exact()
        && !headers.contains_key(header::CONTENT_LENGTH)
    {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::h2client::{self, ConnState, Keepalive};
    use crate::traffic::BoxError;
    use http_body::Frame;
    use http_body_util::{Full, StreamBody};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A test server's address, its shutdown sender and the task's result (how `serve` ended).
    type Served = (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), ServeError>>,
    );

    /// A listener serving one connection with `handler`; the task's result says how `serve`
    /// ended. Dropping (or sending on) the returned sender shuts the connection down.
    async fn server<H, F>(handler: H, handshake_timeout: Duration) -> Served
    where
        H: FnMut(Request<Body>) -> F + Send + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        server_idle(handler, handshake_timeout, IDLE_TIMEOUT).await
    }

    /// [`server`] with an idle bound.
    async fn server_idle<H, F>(
        handler: H,
        handshake_timeout: Duration,
        idle_timeout: Duration,
    ) -> Served
    where
        H: FnMut(Request<Body>) -> F + Send + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let closing = async move {
                let _ = rx.await;
            };
            serve_with(s, handler, closing, handshake_timeout, idle_timeout).await
        });
        (addr, tx, task)
    }

    async fn client(
        addr: std::net::SocketAddr,
    ) -> (h2::client::SendRequest<Bytes>, Arc<ConnState>) {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (sr, conn) = h2client::builder(100)
            .handshake::<_, Bytes>(tcp)
            .await
            .unwrap();
        let state = Arc::new(ConnState::new(100));
        tokio::spawn(h2client::drive(conn, state.clone(), Keepalive::default()));
        (sr, state)
    }

    fn empty() -> Body {
        Full::new(Bytes::new()).map_err(|e| match e {}).boxed()
    }

    fn get() -> Request<Body> {
        Request::get("http://server/").body(empty()).unwrap()
    }

    const SECS5: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn bodies_larger_than_the_windows_and_trailers_go_both_ways() {
        // The response body is the request body itself, streamed back as it arrives: neither
        // side can buffer it all, so both must give window back as they read.
        let (addr, _close, _task) = server(
            |req: Request<Body>| async move { Response::new(req.into_body()) },
            SECS5,
        )
        .await;
        let (sr, state) = client(addr).await;
        let payload: Bytes = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = payload
            .chunks(64 * 1024)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .chain([Ok(Frame::trailers(trailers))])
            .collect();
        let body = BodyExt::boxed(StreamBody::new(futures::stream::iter(frames)));
        let req = Request::post("http://server/echo").body(body).unwrap();
        let resp = tokio::time::timeout(SECS5, h2client::send(&sr, &state, req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200);
        let got = tokio::time::timeout(SECS5, resp.into_body().collect())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.trailers().unwrap()["grpc-status"], "0");
        let got = got.to_bytes();
        assert!(got == payload, "echoed body differs ({} bytes)", got.len());
    }

    #[tokio::test]
    async fn a_known_length_response_carries_content_length() {
        let (addr, _close, _task) = server(
            |_req| async {
                let body = Full::new(Bytes::from_static(b"hello"))
                    .map_err(|e| match e {})
                    .boxed();
                Response::new(body)
            },
            SECS5,
        )
        .await;
        let (sr, state) = client(addr).await;
        let resp = h2client::send(&sr, &state, get()).await.unwrap();
        assert_eq!(resp.headers()[header::CONTENT_LENGTH], "5");
        assert_eq!(
            resp.into_body().collect().await.unwrap().to_bytes(),
            "hello"
        );
    }

    #[tokio::test]
    async fn a_stream_the_client_resets_cancels_its_handler() {
        // The first request's handler holds a sender until it is dropped and never answers;
        // later ones answer at once.
        let (seen_tx, mut seen) =
            tokio::sync::mpsc::channel::<tokio::sync::oneshot::Receiver<()>>(1);
        let mut first = true;
        let (addr, _close, _task) = server(
            move |_req| {
                let (guard, dropped) = tokio::sync::oneshot::channel::<()>();
                let hold = std::mem::take(&mut first);
                if hold {
                    let _ = seen_tx.try_send(dropped);
                }
                async move {
                    let _guard = guard;
                    if hold {
                        std::future::pending::<()>().await;
                    }
                    Response::new(empty())
                }
            },
            SECS5,
        )
        .await;
        let (sr, state) = client(addr).await;
        let (sr2, state2) = (sr.clone(), state.clone());
        let pending = tokio::spawn(async move { h2client::send(&sr2, &state2, get()).await });
        let dropped = tokio::time::timeout(SECS5, seen.recv())
            .await
            .unwrap()
            .unwrap();
        // Dropping the request's future resets its stream (RST_STREAM CANCEL); the connection
        // stays open (`sr` is still held).
        pending.abort();
        let r = tokio::time::timeout(SECS5, dropped).await;
        assert!(
            matches!(r, Ok(Err(_))),
            "the handler's future was not dropped after the client reset the stream"
        );
        let resp = h2client::send(&sr, &state, get()).await.unwrap();
        assert_eq!(resp.status(), 200, "the connection still serves");
    }

    #[tokio::test]
    async fn a_response_body_still_awaited_is_dropped_when_the_client_resets() {
        // The head goes out, the body never produces a byte: the pipe waits on it, and must
        // still notice the client's RST_STREAM (and drop the body, which would cancel the
        // application's response) rather than wait for a chunk that never comes.
        let (seen_tx, mut seen) =
            tokio::sync::mpsc::channel::<tokio::sync::oneshot::Receiver<()>>(1);
        let (addr, _close, _task) = server(
            move |_req| {
                let (guard, dropped) = tokio::sync::oneshot::channel::<()>();
                let _ = seen_tx.try_send(dropped);
                async move {
                    let stream = futures::stream::unfold(guard, |g| async move {
                        std::future::pending::<()>().await;
                        Some((Ok::<_, BoxError>(Frame::data(Bytes::new())), g))
                    });
                    Response::new(BodyExt::boxed(StreamBody::new(stream)))
                }
            },
            SECS5,
        )
        .await;
        let (sr, state) = client(addr).await;
        let resp = tokio::time::timeout(SECS5, h2client::send(&sr, &state, get()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200);
        let dropped = seen.recv().await.unwrap();
        // Dropping the response body resets the stream (RST_STREAM CANCEL).
        drop(resp);
        let r = tokio::time::timeout(SECS5, dropped).await;
        assert!(
            matches!(r, Ok(Err(_))),
            "the response body was not dropped after the client reset the stream"
        );
    }

    #[tokio::test]
    async fn graceful_shutdown_finishes_streams_in_flight_and_refuses_new_ones() {
        let (release_tx, release) = tokio::sync::watch::channel(false);
        let (addr, close, task) = server(
            move |_req| {
                let mut release = release.clone();
                async move {
                    let _ = release.wait_for(|r| *r).await;
                    Response::new(
                        Full::new(Bytes::from_static(b"done"))
                            .map_err(|e| match e {})
                            .boxed(),
                    )
                }
            },
            SECS5,
        )
        .await;
        let (sr, state) = client(addr).await;
        let (sr2, state2) = (sr.clone(), state.clone());
        let in_flight = tokio::spawn(async move { h2client::send(&sr2, &state2, get()).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        close.send(()).unwrap();
        // The GOAWAY reaches the client: a new request is not served.
        let mut refused = false;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let r = tokio::time::timeout(
                Duration::from_millis(200),
                h2client::send(&sr, &state, get()),
            )
            .await;
            if matches!(r, Ok(Err(_))) {
                refused = true;
                break;
            }
        }
        assert!(refused, "requests after GOAWAY were still accepted");
        assert!(!task.is_finished(), "closed with a stream in flight");
        release_tx.send(true).unwrap();
        let resp = tokio::time::timeout(SECS5, in_flight)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "done");
        let ended = tokio::time::timeout(SECS5, task).await.unwrap().unwrap();
        assert!(ended.is_ok(), "{ended:?}");
    }

    #[tokio::test]
    async fn a_client_that_never_completes_the_handshake_is_dropped() {
        let (addr, _close, task) = server(
            |_req| async { Response::new(empty()) },
            Duration::from_millis(100),
        )
        .await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        // Half a preface, then silence.
        tcp.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        let ended = tokio::time::timeout(SECS5, task).await.unwrap().unwrap();
        assert!(
            matches!(ended, Err(ServeError::HandshakeTimeout(_))),
            "{ended:?}"
        );
        // And the socket is closed.
        let mut buf = vec![0; 1024];
        let closed = tokio::time::timeout(SECS5, async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok());
    }

    /// Counts the wakes of the task itself.
    struct Count(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn wakes_inside_the_poll_are_turns_and_wakes_after_it_wake_the_task() {
        let count = Arc::new(Count(Default::default()));
        let task = Waker::from(count.clone());
        let wakes = Wakes::new();
        let (conn, streams) = (wakes.waker(Wakes::CONN), wakes.waker(Wakes::STREAMS));
        wakes.enter(&task);
        // The first turn polls every part.
        assert_eq!(
            wakes.take(),
            Some(Wakes::CONN | Wakes::STREAMS | Wakes::CLOSING)
        );
        // A stream queues its response: the connection runs on the next turn; no task wake.
        conn.wake_by_ref();
        assert_eq!(wakes.take(), Some(Wakes::CONN));
        assert_eq!(wakes.take(), None, "nothing woken: the poll ends");
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        // After the poll, a wake (the application answered) wakes the task once, and the
        // next poll runs only what was woken.
        streams.wake_by_ref();
        streams.wake_by_ref();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        wakes.enter(&task);
        assert_eq!(wakes.take(), Some(Wakes::STREAMS));
        assert_eq!(wakes.take(), None);
    }

    /// A frame header: length, type, flags, stream id.
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Whether the server closes `tcp` within `within`: reads (and drops) whatever it sends.
    async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
        let mut buf = vec![0; 4096];
        tokio::time::timeout(within, async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    /// A raw client past the handshake: preface, SETTINGS, and the ACK of the server's.
    async fn raw_client(addr: std::net::SocketAddr) -> TcpStream {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(4, 0, 0, &[]));
        out.extend(frame(4, 1, 0, &[]));
        tcp.write_all(&out).await.unwrap();
        tcp
    }

    const IDLE: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn a_connection_without_streams_is_closed_after_the_idle_bound() {
        // Handshake done, then nothing: without a bound, held open for ever. This peer does
        // not answer the GOAWAY's PING either, so a graceful close alone would not end it.
        let (addr, _close, task) =
            server_idle(|_req| async { Response::new(empty()) }, SECS5, IDLE).await;
        let mut tcp = raw_client(addr).await;
        assert!(
            closed_within(&mut tcp, 10 * IDLE).await,
            "an idle connection stayed open"
        );
        let ended = tokio::time::timeout(SECS5, task).await.unwrap().unwrap();
        assert!(ended.is_ok(), "{ended:?}");
    }

    #[tokio::test]
    async fn a_header_block_that_never_ends_is_closed_after_the_idle_bound() {
        // Slow loris on the headers: HEADERS without END_HEADERS, then silence. h2 holds the
        // partial block and no stream is ever accepted.
        let (addr, _close, _task) =
            server_idle(|_req| async { Response::new(empty()) }, SECS5, IDLE).await;
        let mut tcp = raw_client(addr).await;
        tcp.write_all(&frame(1, 0x1, 1, &[0x82, 0x86]))
            .await
            .unwrap();
        assert!(
            closed_within(&mut tcp, 10 * IDLE).await,
            "a connection with an unfinished header block stayed open"
        );
    }

    #[tokio::test]
    async fn a_stream_in_flight_longer_than_the_idle_bound_is_not_cut() {
        // The bound is for connections without streams: a slow response is not idleness.
        let (addr, _close, _task) = server_idle(
            |_req| async {
                tokio::time::sleep(4 * IDLE).await;
                Response::new(
                    Full::new(Bytes::from_static(b"slow"))
                        .map_err(|e| match e {})
                        .boxed(),
                )
            },
            SECS5,
            IDLE,
        )
        .await;
        let (sr, state) = client(addr).await;
        let resp = tokio::time::timeout(SECS5, h2client::send(&sr, &state, get()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "slow");
        // And a request right after still goes through on the same connection.
        let resp = h2client::send(&sr, &state, get()).await.unwrap();
        assert_eq!(resp.status(), 200);
    }

    #[tokio::test]
    async fn streams_beyond_the_limit_are_refused() {
        // Every request is held open, so none of the streams closes.
        let (addr, _close, _task) =
            server(|_req| std::future::pending::<Response<Body>>(), SECS5).await;
        // A client that ignores the server's limit, which the h2 crate's own client cannot be
        // made to do: raw frames.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(4, 0, 0, &[])); // our SETTINGS
        out.extend(frame(4, 1, 0, &[])); // ACK of the server's, which it sent first
        // GET http://a/, HPACK from the static table (:authority a literal, not indexed).
        let block = [0x82, 0x86, 0x84, 0x01, 0x01, b'a'];
        let over = MAX_CONCURRENT_STREAMS + 1;
        for i in 0..over {
            // END_STREAM | END_HEADERS
            out.extend(frame(1, 0x5, 2 * i + 1, &block));
        }
        tcp.write_all(&out).await.unwrap();
        let last = 2 * (over - 1) + 1;
        let refused = tokio::time::timeout(SECS5, async {
            let mut resets = Vec::new();
            loop {
                let mut head = [0u8; 9];
                tcp.read_exact(&mut head).await.unwrap();
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                let mut payload = vec![0; len];
                tcp.read_exact(&mut payload).await.unwrap();
                if head[3] == 3 {
                    let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    resets.push((stream, code));
                    if stream == last {
                        return resets;
                    }
                }
                assert_ne!(head[3], 7, "GOAWAY instead of refusing the stream");
            }
        })
        .await
        .expect("no RST_STREAM for the stream beyond the limit");
        // REFUSED_STREAM (7) for that stream only: the others stay open.
        assert_eq!(refused, vec![(last, 7)]);
    }
}
