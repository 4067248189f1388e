//! The data path, as named stages: [`io`] (original destination, replay), [`detect`]
//! (protocol), [`outbound`] and [`inbound`] (per-direction routing and mTLS policy), [`http`]
//! (L7 forwarding rules), [`tcp`] (L4), [`upstream`] (the pooled client behind
//! [`crate::traffic::Upstream`]), [`mtls`] (TLS configs per credentials snapshot),
//! [`peer_trust`] (closing long-lived connections whose mTLS peer is no longer trusted) and
//! [`coalesce`] (a small response's head and body written together), [`abort`] (an HTTP/1.0
//! response that fails mid-way is reset, not closed), [`idle`] (inbound connections without a
//! request in flight end). [`h2client`] and
//! [`h2server`] speak HTTP/2 between the sidecars; hyper serves everything else.

pub mod abort;
pub mod coalesce;
pub mod detect;
pub mod h2client;
pub mod h2server;
pub mod http;
pub mod idle;
pub mod inbound;
pub mod io;
pub mod mtls;
pub mod outbound;
pub mod peer_trust;
pub mod tcp;
pub mod upstream;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::access_log;
use crate::config::AccessLogFormat;
use crate::metrics::{Direction, Metrics, SeriesCache};
use crate::reload::ConfigRx;
use crate::shutdown::Shutdown;
use crate::traffic::{Body, Dispatcher, Outcome};
use mtls::TlsCache;
use upstream::{Io, Pool};

/// Everything a connection task needs, shared by all of them.
pub struct Shared {
    pub config: ConfigRx,
    pub tls: Arc<TlsCache>,
    /// The outbound pool (upstreams the application calls).
    pub pool: Pool,
    /// The inbound pool (this pod's application), connecting from the exempt loopback source.
    pub inbound_pool: Pool,
    pub dispatcher: Arc<Dispatcher>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    /// Local mode (`--local-mode`): the outbound listener also serves connections that were
    /// not redirected, routing HTTP by `Host`. Off in pods: there such a connection is someone
    /// using the proxy as a relay with the pod's identity, and is closed.
    pub local_mode: bool,
    /// Where inbound traffic goes.
    pub inbound: inbound::Forward,
    /// The ports of the proxy's own listeners, never forwarded to by inbound.
    pub own_ports: Vec<u16>,
    /// Ports of this pod that skip detection whatever the config says (pod annotation).
    pub opaque_ports: Vec<u16>,
    /// The inbound rate limit of our policy, per source identity; replaced on reload when the
    /// limit changes.
    pub inbound_limiter: Arc<std::sync::Mutex<Option<Arc<crate::traffic::InboundRateLimiter>>>>,
    /// How often open TCP connections publish their byte counts ([`tcp::FLUSH_INTERVAL`] in
    /// production; tests shorten it instead of waiting). Never zero.
    pub tcp_flush_interval: Duration,
    /// The HTTP server of the app's own connections (outbound): [`outbound_http_builder`].
    pub http: auto::Builder<TokioExecutor>,
    /// The HTTP server of inbound connections served by hyper (plaintext, and mTLS HTTP/1.1):
    /// [`http_builder`] with the inbound header read timeout ([`inbound::Limits`]).
    pub inbound_http: auto::Builder<TokioExecutor>,
    /// Bounds of the inbound listener.
    pub inbound_limits: inbound::Limits,
    /// Inbound connections not yet authenticated, per peer address and in all (see
    /// [`inbound::Limits`]).
    pub inbound_pending: Arc<crate::conn_limit::Gate>,
    /// The span exporter in force, if the config turns tracing on.
    pub tracing: Arc<crate::spans::Tracing>,
    /// Resolves destinations the config does not know from the operator (when configured).
    pub discovery: Option<Arc<crate::discovery::resolver::Resolver>>,
}

impl Shared {
    /// The detection timeout of the current config.
    pub fn detect_timeout(&self) -> Duration {
        let ms = self
            .config
            .borrow()
            .as_ref()
            .map(|s| s.config.mesh.detect_timeout_ms)
            .unwrap_or(100);
        Duration::from_millis(ms)
    }

    pub fn skips_detection(&self, port: u16) -> bool {
        self.opaque_ports.contains(&port)
            || self
                .config
                .borrow()
                .as_ref()
                .is_some_and(|s| s.config.mesh.skip_detection_ports.contains(&port))
    }

    /// The access log format, when access logs are on.
    pub fn access_log(&self) -> Option<AccessLogFormat> {
        let cfg = self.config.borrow();
        let al = &cfg.as_ref()?.config.mesh.telemetry.access_log;
        al.enabled.then_some(al.format)
    }
}

/// The server-side HTTP builder: HTTP/1.1 and HTTP/2 on the same socket (hyper-util picks by
/// the preface), upgrades allowed. HTTP/2 clients may send as large a header list as the hop
/// between the sidecars takes ([`h2server::MAX_HEADER_LIST_SIZE`]), not hyper's 16 KiB: an
/// h2c client's 20 KiB token was answered 431 where an HTTP/1.1 client's went through.
pub fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1().timer(hyper_util::rt::TokioTimer::new());
    b.http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .adaptive_window(true)
        .max_header_list_size(h2server::MAX_HEADER_LIST_SIZE);
    b
}

/// [`http_builder`] for the application's own connections (outbound): without hyper's HTTP/1.1
/// header read timeout, which would otherwise run from the end of every response to the next
/// request head.
///
/// Two reasons. The timer costs an allocation and a timer-wheel insertion and removal on every
/// keep-alive request (a sixth of the client sidecar's avoidable allocations, by callgrind).
/// And it closed the application's idle keep-alive connections after 30 s, which races the
/// application's own reuse of them: its connection pool (Go's 90 s, OkHttp's 5 min, Java's
/// without limit) sends a request on a connection the sidecar is closing, and a
/// non-idempotent request then fails without being retried. Only the pod's own processes
/// reach this listener (see [`outbound`]), so the application's pool decides how long its
/// connections live, as for HTTP/2, which never had an idle bound here; a connection it
/// abandons costs the sidecar what it costs the application, a socket. The inbound side,
/// which anyone reaching the pod may connect to, keeps the timeout
/// ([`inbound_http_builder`]).
pub fn outbound_http_builder() -> auto::Builder<TokioExecutor> {
    let mut b = http_builder();
    b.http1().header_read_timeout(None);
    b
}

/// Header lines an inbound HTTP/1.1 request (and a response on the HTTP/1.1 hop between the
/// sidecars) may have: the application's 100 (hyper's and Envoy's default, what the client
/// sidecar takes from its application), plus what the client sidecar adds (request id, trace
/// context, `Host` for HTTP/1.0) and the far hyper's `Date`, with room. At 100 a request the
/// client sidecar accepted was refused `431` one hop later.
pub const HOP_MAX_HEADERS: usize = 128;

/// [`http_builder`] for inbound connections, taking what a client sidecar forwards
/// ([`HOP_MAX_HEADERS`]), with the HTTP/1.1 header read timeout stated
/// rather than left to hyper's default (30 s in the hyper we use): it is what ends a request
/// head trickled byte by byte and, since hyper starts it whenever the connection waits for a
/// head, an idle keep-alive connection. Never zero (hyper would time out every head).
pub fn inbound_http_builder(header_read_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut b = http_builder();
    b.http1()
        .header_read_timeout(header_read_timeout.max(Duration::from_millis(1)))
        .max_headers(HOP_MAX_HEADERS);
    b
}

/// Accepts until shutdown; each connection runs in a tracked task.
pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, direction: Direction) {
    // Inbound stops accepting at the signal; outbound once inbound is drained (see
    // crate::shutdown for why).
    let stop = match direction {
        Direction::Inbound => shared.shutdown.token(),
        Direction::Outbound => shared.shutdown.outbound_token(),
    };
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, client)) => {
                let _ = stream.set_nodelay(true);
                let sh = shared.clone();
                match direction {
                    Direction::Outbound => {
                        shared
                            .shutdown
                            .tracker()
                            .spawn(outbound::serve(sh, stream, client));
                    }
                    Direction::Inbound => {
                        let task = shared
                            .shutdown
                            .inbound_tracker()
                            .track_future(inbound::serve(sh, stream, client));
                        shared.shutdown.tracker().spawn(task);
                    }
                }
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, direction = direction.as_str(), "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::debug!(direction = direction.as_str(), "listener closed");
}

/// Serves one outbound HTTP connection until it closes. Once the inbound side is drained (see
/// crate::shutdown), finishes in-flight requests (HTTP/1.1 closes after the current response,
/// HTTP/2 sends GOAWAY). No idle bound ([`outbound_http_builder`] says why): only the pod's
/// own application reaches the outbound listener, and its connection pools decide when their
/// connections are idle.
pub async fn serve_http<I, F, Fut>(shared: &Shared, io: I, handler: F)
where
    I: Io,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let svc = hyper::service::service_fn(handler);
    let conn = shared
        .http
        .serve_connection_with_upgrades(TokioIo::new(io), svc);
    serve_http_on(
        conn,
        |c| c.graceful_shutdown(),
        shared.shutdown.outbound_token(),
        std::future::pending(),
        None,
    )
    .await
}

/// Serves one inbound HTTP connection (a plaintext client, or an mTLS one that asked for
/// HTTP/1.1) with the inbound server ([`Shared::inbound_http`]). Shuts it down gracefully
/// (requests in flight finish, no new ones are read) at the shutdown signal, when `until`
/// resolves (an mTLS client whose certificate expired or whose root left the bundle, see
/// [`peer_trust`]), or when it has been idle ([`idle`]) for [`inbound::Limits::idle_timeout`];
/// `handler` marks its requests in flight on `activity`.
pub async fn serve_http_inbound<I, F, Fut>(
    shared: &Shared,
    io: I,
    handler: F,
    activity: idle::Activity,
    until: impl std::future::Future<Output = ()>,
) where
    I: Io,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let svc = hyper::service::service_fn(handler);
    let conn = shared
        .inbound_http
        .serve_connection_with_upgrades(TokioIo::new(io), svc);
    let watch = idle::Watch::new(activity, shared.inbound_limits.idle_timeout);
    serve_http_on(
        conn,
        |c| c.graceful_shutdown(),
        shared.shutdown.token(),
        until,
        Some(watch),
    )
    .await
}

/// Why a connection is being shut down.
enum Closing {
    Shutdown,
    Untrusted,
    Idle,
}

/// Runs one hyper connection, shutting it down gracefully (`graceful`) when `closing` is cancelled (the
/// shutdown token inbound, the later outbound token outbound), `until` resolves, or `idle`
/// says it went idle; with `idle`, one that is still idle a period after that (a client that
/// ignores the `GOAWAY`) is dropped.
async fn serve_http_on<C, E>(
    conn: C,
    graceful: impl FnOnce(std::pin::Pin<&mut C>),
    closing: tokio_util::sync::CancellationToken,
    until: impl std::future::Future<Output = ()>,
    mut idle: Option<idle::Watch>,
) where
    C: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let why = tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
            return;
        }
        _ = closing.cancelled() => Closing::Shutdown,
        _ = until => Closing::Untrusted,
        _ = went_idle(&mut idle) => Closing::Idle,
    };
    match why {
        Closing::Shutdown => {}
        Closing::Untrusted => tracing::debug!(
            "http connection closed: the peer's certificate expired or is no longer trusted"
        ),
        Closing::Idle => tracing::debug!("http connection idle: going away"),
    }
    graceful(conn.as_mut());
    let res = tokio::select! {
        r = conn.as_mut() => r,
        _ = still_idle(&mut idle) => {
            tracing::debug!("http connection still idle after going away: dropped");
            Ok(())
        }
    };
    if let Err(e) = res {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
}

/// Resolves when `idle` says the connection went idle; never without a watch.
async fn went_idle(idle: &mut Option<idle::Watch>) {
    match idle {
        Some(w) => {
            w.next().await;
        }
        None => std::future::pending().await,
    }
}

/// Resolves when `idle` says a connection that was told to go away is still idle; never
/// without a watch.
async fn still_idle(idle: &mut Option<idle::Watch>) {
    match idle {
        Some(w) => while w.next().await != idle::Idle::Close {},
        None => std::future::pending().await,
    }
}

pub struct Completed<'a> {
    pub direction: Direction,
    pub start: Instant,
    pub method: &'a ::http::Method,
    pub authority: &'a str,
    pub path: &'a str,
    pub version: ::http::Version,
    pub request_id: &'a str,
    pub trace_id: Option<&'a str>,
    pub peer_identity: &'a Arc<str>,
    pub dst_service: &'a Arc<str>,
    pub tls: bool,
    /// The connection's series cache.
    pub series: &'a SeriesCache,
    /// The request's span, when it is sampled.
    pub span: Option<&'a crate::spans::Active>,
    /// What the traffic layer did, when it handled the request or refused it.
    pub outcome: Option<&'a Outcome>,
}

/// Metrics and (when enabled) the access log line for one request.
pub fn record(shared: &Shared, c: &Completed<'_>, resp: &Response<Body>) {
    let elapsed = c.start.elapsed();
    let status = resp.status().as_u16();
    shared.metrics.record_request_cached(
        c.series,
        c.direction,
        c.peer_identity,
        c.dst_service,
        status,
        c.tls,
        elapsed,
    );
    let outcome = c.outcome;
    if let Some(span) = c.span {
        span.finish(&crate::spans::Finished {
            kind: match c.direction {
                Direction::Inbound => opentelemetry::trace::SpanKind::Server,
                Direction::Outbound => opentelemetry::trace::SpanKind::Client,
            },
            method: c.method,
            authority: c.authority,
            path: c.path,
            version: c.version,
            status,
            peer_identity: c.peer_identity,
            dst_service: c.dst_service,
            attempts: outcome.map(|o| o.attempts).unwrap_or(1),
            flags: outcome.map(|o| o.flags.as_slice()).unwrap_or(&[]),
            events: outcome.map(|o| o.events.as_slice()).unwrap_or(&[]),
            elapsed,
        });
    }
    if let Some(fmt) = shared.access_log() {
        let entry = access_log::Entry {
            timestamp: access_log::now(),
            direction: c.direction.as_str(),
            method: c.method.as_str(),
            authority: c.authority,
            path: c.path,
            protocol: version_str(c.version),
            status,
            duration_ms: elapsed.as_secs_f64() * 1000.0,
            request_id: c.request_id,
            trace_id: c.trace_id,
            peer_identity: c.peer_identity,
            dst_service: c.dst_service,
            upstream: outcome.and_then(|o| o.endpoint).map(|e| e.to_string()),
            flags: outcome.map(|o| o.flags.as_slice()).unwrap_or(&[]),
        };
        access_log::write(&entry, fmt);
    }
}

fn version_str(v: ::http::Version) -> &'static str {
    match v {
        ::http::Version::HTTP_10 => "HTTP/1.0",
        ::http::Version::HTTP_11 => "HTTP/1.1",
        ::http::Version::HTTP_2 => "HTTP/2",
        _ => "HTTP",
    }
}

/// After a `101 Switching Protocols`, splices the client's and the upstream's upgraded
/// connections together.
/// Splices an upgraded (`101 Switching Protocols`) connection with the upstream's. `trust` is
/// the mTLS peer of the hop the tunnel rides (the server proxy outbound, the client proxy
/// inbound): the tunnel closes cleanly when that peer's certificate expires or its root leaves
/// the bundle, like an opaque TCP connection.
pub fn spawn_tunnel(
    shared: &Shared,
    client: hyper::upgrade::OnUpgrade,
    resp: &mut Response<Body>,
    trust: Option<peer_trust::PeerTrust>,
) {
    let upstream = hyper::upgrade::on(resp);
    let creds = shared.tls.subscribe();
    shared.shutdown.tracker().spawn(async move {
        match tokio::try_join!(client, upstream) {
            Ok((c, u)) => {
                let mut c = TokioIo::new(c);
                let mut u = TokioIo::new(u);
                let revoked = tokio::select! {
                    r = tokio::io::copy_bidirectional(&mut c, &mut u) => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "upgraded tunnel ended");
                        }
                        false
                    }
                    _ = peer_trust::revoked(trust, creds) => true,
                };
                if revoked {
                    tracing::debug!(
                        "upgraded tunnel closed: the peer's certificate expired or is no longer trusted"
                    );
                    use tokio::io::AsyncWriteExt;
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        let _ = tokio::join!(c.shutdown(), u.shutdown());
                    })
                    .await;
                }
            }
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
}
