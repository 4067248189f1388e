//! The connection pool behind [`Upstream`]: one request to one address, reusing connections.
//!
//! - Meshed targets (identities known) get mTLS, and the hop speaks what the application spoke:
//!   - HTTP/1.x rides pooled keep-alive HTTP/1.1 (ALPN `http/1.1`), one connection per request
//!     in flight, while fewer than [`PoolSettings::max_h1_hop_inflight`] (32) requests to that
//!     peer are in flight; from there on, further requests ride HTTP/2 (marked with
//!     `trellis-orig-proto` so the far proxy speaks HTTP/1.1 to its application again) until
//!     the peer is quieter;
//!   - HTTP/2 rides multiplexed HTTP/2 (ALPN `h2`) per (address, identity set), as does
//!     HTTP/1.1 to a port declared `http2` or `grpc` (the far proxy converts).
//!
//!   Why, measured (2026-11-30, `hack/bench-ab.py` and `hack/bench-proxy.sh`, against the
//!   release that sent all HTTP/1.1 over HTTP/2): requests an application sends at a steady
//!   rate are nearly never concurrent (at 1000 req/s over 16 connections fewer than one is in
//!   flight on average), and for them HTTP/1.1 is the cheaper hop on both sides: no framing,
//!   HPACK or flow control. Instructions per request 0.78x (client sidecar) and 0.75x (server
//!   sidecar); CPU time per request under oha 0.86x and 0.85x, added p50 0.89x (5 interleaved
//!   rounds, CPU lower in every one). A busy peer is the opposite case: one HTTP/2 connection
//!   carries many requests per TLS record and syscall, where HTTP/1.1 needs a connection per
//!   request in flight (a handshake, buffers on both sides, a certificate to retire) and a
//!   read and a write for each. With each HTTP/1.1 connection served by a task of its own,
//!   that decided it: up to 8 HTTP/1.1 connections busy before spilling took saturation over
//!   32 connections to 0.925x (lower in 5 of 5 rounds), so the limit was 4. Since the
//!   connections are driven by their requests (see `H1Conn`), HTTP/1.1 is the cheaper hop
//!   under load too: with a limit of 32 against 4 (2026-11-30, `hack/bench-proxy.sh --pairs
//!   trellis,nginx --proxy-bin`), saturation over 32 connections 1.09x (9 rounds, 4 s at the
//!   fixed rate; 1.09x in a 5-round run with 12 s). At 1000 req/s, CPU 0.90x / 0.89x and
//!   added p50 0.85x in the 9-round run, 1.03x / 1.02x and 1.01x in the 5-round one: even
//!   that load has bursts of 4 in flight (a proxy descheduled for a millisecond), which
//!   spilled to HTTP/2, and their share varies. HTTP/1.1 connections busy at once stay
//!   below the limit, so connections per peer pair stay bounded (32 HTTP/1.1 plus at most 8
//!   HTTP/2). (Istio's default,
//!   `DO_NOT_UPGRADE`, keeps HTTP/1.1 with a connection per request in flight; Linkerd always
//!   upgrades to HTTP/2.)
//!   Adaptive flow control on the HTTP/2 client (BDP pings) made no measurable difference at
//!   1000 req/s; `h2` has none, so the windows are fixed and large.
//! - Plaintext targets get HTTP/2 when the port says so (or the client spoke HTTP/2), otherwise
//!   pooled HTTP/1.1 keep-alive connections.
//! - `Upgrade` requests (WebSocket) take a dedicated HTTP/1.1 connection (mTLS with ALPN
//!   `http/1.1` when meshed), never pooled, that becomes the tunnel after `101 Switching
//!   Protocols`.
//!
//! Hygiene ([`PoolSettings`]):
//! - HTTP/2 respects the peer's `SETTINGS_MAX_CONCURRENT_STREAMS`: a request goes to the least
//!   loaded connection with a free stream; when none has one, another connection is opened (up
//!   to `max_h2_conns` per key); beyond that, at most `max_h2_queued` requests per key wait for
//!   a stream and the rest fail at once with [`UpstreamError::Overflow`] (503 `UO`), instead of
//!   queueing without bound inside the HTTP/2 client. The limit is read from the peer's first
//!   SETTINGS frame (a new connection waits for it, one round trip) and followed afterwards.
//! - A meshed connection (HTTP/2, or idle HTTP/1.1) takes no request once its peer's
//!   certificate has expired, or once the trust bundle changed and its peer's chain no longer
//!   verifies (the root left the bundle); the reaper then drops it, which closes it gracefully
//!   after the requests in flight finish.
//! - Connections, and with them their keys, unused for `idle_timeout` are dropped, so endpoint
//!   churn does not grow the pool.
//! - Connections that leave the pool (opaque TCP from [`Pool::connect_trusted`], upgraded
//!   tunnels) carry the peer's [`PeerTrust`] to their owner, which closes them by the same rule
//!   (see [`super::peer_trust`]).

use crate::lookup::FastMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::task::AtomicWaker;
use http::{HeaderValue, Request, Response, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls_pki_types::CertificateDer;
use sync_wrapper::SyncWrapper;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::h2client::{self, ConnState};
use super::http::{ORIG_PROTO, is_upgrade, to_http1, to_http2};
use super::mtls::{Alpn, TlsCache};
use super::peer_trust::PeerTrust;
use crate::config::Protocol;
use crate::creds::Credentials;
use crate::tls::mesh_server_name;
use crate::traffic::{Body, BoxError, ConnectionParams, Reply, Target, Upstream, UpstreamError};

/// Connect timeout when the traffic policy sets none.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle HTTP/1.1 connections kept per target; more concurrent ones are closed after use.
const MAX_IDLE_H1: usize = 64;
/// Streams the HTTP/2 client allows itself before the peer's SETTINGS say otherwise (and when
/// they do not name a limit): hyper's default, named here because the pool counts with it.
const H2_INITIAL_MAX_STREAMS: usize = 100;

/// Bounds of the pool. The defaults suit a sidecar; tests shorten the times.
#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    /// A connection unused this long is closed, and a key left without connections forgotten.
    pub idle_timeout: Duration,
    /// How often the reaper looks for idle, closed, expired and untrusted connections (it also
    /// looks at every credentials change).
    pub sweep_interval: Duration,
    /// HTTP/2 connections per (address, identities); another is opened only when every one is
    /// at the peer's stream limit.
    pub max_h2_conns: usize,
    /// Requests per key that may wait for an HTTP/2 stream once `max_h2_conns` connections are
    /// all at their limit; beyond it requests fail at once ([`UpstreamError::Overflow`]).
    pub max_h2_queued: usize,
    /// Requests to one mesh peer (address and identities) in flight, over either protocol,
    /// below which an HTTP/1.1 request rides HTTP/1.1; at and above it, multiplexed HTTP/2
    /// (see the module docs). Also bounds the HTTP/1.1 connections busy at once.
    pub max_h1_hop_inflight: usize,
    /// How long an idle HTTP/1.1 connection to a mesh peer is kept (at most; the policy's
    /// `timeouts.idleMs` may shorten it). Below the far sidecar's HTTP/1.1 header read timeout
    /// (30 s, `inbound::Limits`), which closes a keep-alive connection that long without a
    /// request: a connection kept past it would be picked just as the far side closes it.
    pub h1_hop_idle_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            idle_timeout: Duration::from_secs(60),
            sweep_interval: Duration::from_secs(5),
            max_h2_conns: 8,
            max_h2_queued: 1024,
            max_h1_hop_inflight: 32,
            h1_hop_idle_timeout: Duration::from_secs(20),
        }
    }
}

pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}
pub type BoxIo = Box<dyn Io>;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Key {
    addr: SocketAddr,
    /// Empty for plaintext.
    identities: Arc<[String]>,
}

/// Hashes the address (and how many identities) only. Keys are looked up once per request, and
/// hashing the SPIFFE IDs cost about as much as the rest of the pick (callgrind: 600 of the
/// pool's 1000 instructions per request); an address nearly always comes with one identity set,
/// and equality still compares them. All of it goes to the hasher as one word: `SocketAddr`'s
/// own `Hash` feeds SipHash five pieces (variant, length, octets, port, and the count here), each
/// a round of its buffering, twice per request on the HTTP/1.1 hop (pick and return).
impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let ip = match self.addr {
            SocketAddr::V4(a) => u128::from(u32::from(*a.ip())),
            // Marks the family, so an IPv4 address and its IPv4-mapped IPv6 form differ.
            SocketAddr::V6(a) => u128::from(*a.ip()) ^ (1 << 127),
        };
        let folded = (ip as u64) ^ ((ip >> 64) as u64);
        let port = u64::from(self.addr.port()) << 32;
        let ids = (self.identities.len() as u64).rotate_right(16);
        state.write_u64(folded ^ port ^ ids);
    }
}

/// What retires a meshed connection: its peer's chain (verified again when the trust bundle
/// changes) and when the peer's leaf expires.
struct PeerCert {
    chain: Arc<[CertificateDer<'static>]>,
    expires: SystemTime,
    /// The credentials the chain was last verified with; compared by pointer, so the check
    /// costs nothing until the credentials change.
    verified: Arc<Credentials>,
}

impl PeerCert {
    /// Whether new requests may still use the connection.
    fn usable(
        &mut self,
        current: Option<&Arc<Credentials>>,
        now: SystemTime,
        ids: &[String],
    ) -> bool {
        if now >= self.expires {
            return false;
        }
        let Some(current) = current else {
            return true;
        };
        if Arc::ptr_eq(current, &self.verified) {
            return true;
        }
        if crate::tls::verify_server_chain(current, &self.chain, ids).is_err() {
            return false;
        }
        self.verified = current.clone();
        true
    }
}

/// Streams of one HTTP/2 connection: ours in flight, the peer's limit, and whether the
/// connection ended.
type Streams = ConnState;

/// Counts one more stream on `streams` until the guard drops.
fn reserve(streams: &Arc<Streams>) -> StreamGuard {
    streams.inflight.fetch_add(1, Ordering::Relaxed);
    StreamGuard(streams.clone())
}

/// One stream counted on its connection until the response body is dropped (or the request
/// failed).
struct StreamGuard(Arc<Streams>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

struct H2Conn {
    sr: h2::client::SendRequest<Bytes>,
    peer: Option<Arc<str>>,
    cert: Option<PeerCert>,
    streams: Arc<Streams>,
    last_used: Instant,
}

#[derive(Default)]
struct H2Slot {
    conns: Vec<H2Conn>,
    /// One connect per key at a time: concurrent requests wait for it and share it.
    connecting: Arc<tokio::sync::Mutex<()>>,
}

impl H2Slot {
    /// Drops connections that are closed or may no longer be used (dropping the last
    /// `SendRequest` lets hyper close the connection once its streams are done).
    fn prune(&mut self, creds: Option<&Arc<Credentials>>, ids: &[String], idle: Option<Duration>) {
        let now = SystemTime::now();
        self.conns.retain_mut(|c| {
            !c.streams.closed.load(Ordering::Relaxed)
                && c.cert.as_mut().is_none_or(|p| p.usable(creds, now, ids))
                && idle.is_none_or(|t| c.streams.inflight() > 0 || c.last_used.elapsed() < t)
        });
    }
}

/// An HTTP/1.1 connection and, when meshed, who answered on it.
///
/// The connection's I/O (`io`, hyper's connection future) is driven by the request that holds
/// the connection, inside that request's own task, not by a task of its own. hyper's usual
/// shape, a spawned task per connection fed through a channel, costs every request two more
/// task polls (the connection task woken for the request and again for the response) and a
/// cross-task wake-up of the request's task, which is the application's connection running
/// hyper's whole server loop. A Trellis hop carries one request at a time per HTTP/1.1
/// connection, so nothing else needs it driven in between: an idle connection is looked at
/// only when a request takes it (hyper then notices a close that came while it was idle
/// before writing, and hands the request back for another connection) and by the reaper.
///
/// The connection is polled only when something it waits on has happened ([`Drive`]): the
/// server loop polls the request's future several times per wake-up, and each poll of
/// hyper's connection costs a few thousand instructions.
struct H1Conn {
    sr: http1::SendRequest<Body>,
    /// `None` once the connection has ended. (A response body must be `Sync`; only the one
    /// task that holds the connection ever touches it.)
    io: Option<SyncWrapper<Pin<Box<H1Io>>>>,
    drive: Arc<Drive>,
    /// `drive` as the waker the connection is polled with.
    waker: std::task::Waker,
    peer: Option<Arc<str>>,
    cert: Option<PeerCert>,
}

/// hyper's side of a pooled HTTP/1.1 connection: the future that reads and writes it.
type H1Io = http1::Connection<TokioIo<BoxIo>, Body>;

/// What a connection driven by its requests waits on: whether anything it registered for
/// (its socket, the request body, hyper's request channel) has fired since it was last
/// polled, and the task to wake when that happens.
struct Drive {
    woken: AtomicBool,
    /// The task holding the connection; empty while it is idle in the pool, so that events
    /// on an idle connection (the far side closing it) wake no one, and while a request is
    /// handed over or a response chunk taken, so that hyper's channels do not wake the very
    /// task that is using them.
    task: AtomicWaker,
}

impl std::task::Wake for Drive {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl H1Conn {
    fn new(
        sr: http1::SendRequest<Body>,
        io: H1Io,
        peer: Option<Arc<str>>,
        cert: Option<PeerCert>,
    ) -> Self {
        let drive = Arc::new(Drive {
            // Never polled yet.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Self {
            sr,
            io: Some(SyncWrapper::new(Box::pin(io))),
            waker: std::task::Waker::from(drive.clone()),
            drive,
            peer,
            cert,
        }
    }

    /// Lets the connection read and write what it can, if anything it waits on happened,
    /// and has `cx` woken when something does.
    fn drive(&mut self, cx: &mut Context<'_>) {
        // Registered first, so an event while the connection is polled is not lost.
        self.drive.task.register(cx.waker());
        self.poll_if_woken();
    }

    /// [`H1Conn::poll_io`] if anything the connection waits on happened since its last poll.
    fn poll_if_woken(&mut self) {
        if self.drive.woken.swap(false, Ordering::AcqRel) {
            self.poll_io();
        }
    }

    /// Polls the connection once, with nothing but [`Drive`] to wake. An ended connection
    /// is dropped at once: hyper then hands back, through its sender, any request it had not
    /// written.
    fn poll_io(&mut self) {
        let Some(io) = self.io.as_mut() else {
            return;
        };
        let mut cx = Context::from_waker(&self.waker);
        if let Poll::Ready(r) = io.get_mut().as_mut().poll(&mut cx) {
            if let Err(e) = r {
                tracing::debug!(error = %e, "upstream h1 connection ended");
            }
            self.io = None;
        }
    }

    /// Whether the connection can take another request: it has not ended and hyper has
    /// finished the last exchange on it.
    fn reusable(&self) -> bool {
        self.io.is_some() && self.sr.is_ready()
    }

    /// Sends `req` and drives the connection until the response head arrives.
    ///
    /// The response (and its body, see [`Returning`]) can only arrive while this task drives
    /// the connection, so hyper's response channel is polled with a no-op waker: only the
    /// connection's own events wake this task. Were it polled with the task's waker, every
    /// response would wake the task once more, for a whole pass of the application
    /// connection's server loop.
    async fn send(
        &mut self,
        req: Request<Body>,
    ) -> Result<Response<hyper::body::Incoming>, hyper::client::conn::TrySendError<Request<Body>>>
    {
        // Handing the request over wakes the connection's side of hyper's channel: a wake-up
        // the poll below makes needless.
        self.drive.task.take();
        let mut sent = std::pin::pin!(self.sr.try_send_request(req));
        self.drive.woken.store(true, Ordering::Release);
        std::future::poll_fn(|cx| {
            let mut quiet = Context::from_waker(std::task::Waker::noop());
            if let Poll::Ready(r) = sent.as_mut().poll(&mut quiet) {
                return Poll::Ready(r);
            }
            self.drive(cx);
            sent.as_mut().poll(&mut quiet)
        })
        .await
    }
}

struct IdleH1 {
    conn: H1Conn,
    since: Instant,
}

/// HTTP/1.1 connections of one key: the idle ones, and how many carry a request now.
#[derive(Default)]
struct H1Slot {
    idle: Vec<IdleH1>,
    busy: usize,
}

#[derive(Default)]
struct Conns {
    h2: FastMap<Key, H2Slot>,
    h1: FastMap<Key, H1Slot>,
}

struct Inner {
    tls: Arc<TlsCache>,
    settings: PoolSettings,
    conns: Mutex<Conns>,
    /// The local address connections are made from (see [`SourceAddr`]).
    source: SourceAddr,
}

/// The local address a pool's connections come from.
///
/// The inbound side forwards to the pod's own IP as UID 2137, over `lo`. The init rules send
/// UID 2137's connections to its own pod IP to the inbound port (so an outbound request whose
/// endpoint is this very pod gets inbound policy); inbound forwarding would then loop. So, as
/// in Istio, the inbound pool connects from a loopback source the rules exempt: `127.0.0.6`
/// for IPv4 and `::1` for IPv6 (Linux has no other IPv6 loopback address without `ip addr`,
/// which the proxy's capabilities do not allow). The application sees that address as the
/// client, as it saw `127.0.0.1` before.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SourceAddr {
    /// The kernel picks (outbound: the pod IP).
    #[default]
    Any,
    /// The exempt loopback source for non-loopback destinations.
    InboundLoopback,
}

/// The IPv4 source of inbound forwarding; `trellis-proxy init` exempts it from redirection
/// (the app probes' source: one exemption for every direct connection to the app).
pub const INBOUND_SOURCE_V4: std::net::Ipv4Addr = crate::probe::PROBE_SOURCE_V4;
/// The IPv6 source of inbound forwarding; see [`INBOUND_SOURCE_V4`].
pub const INBOUND_SOURCE_V6: std::net::Ipv6Addr = crate::probe::PROBE_SOURCE_V6;

impl SourceAddr {
    /// The address to bind before connecting to `dst`, if any.
    pub fn for_dst(self, dst: SocketAddr) -> Option<std::net::IpAddr> {
        match self {
            SourceAddr::Any => None,
            // Loopback destinations (`inbound-to-localhost`) need no exemption: the rules
            // never redirect connections to loopback.
            SourceAddr::InboundLoopback if dst.ip().is_loopback() => None,
            SourceAddr::InboundLoopback => Some(match dst {
                SocketAddr::V4(_) => INBOUND_SOURCE_V4.into(),
                SocketAddr::V6(_) => INBOUND_SOURCE_V6.into(),
            }),
        }
    }
}

/// Pooled HTTP/1.1 and HTTP/2 client with mesh mTLS. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// What the pool holds, for `/config`-style views and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Pool entries: HTTP/2 keys (address, identities) plus HTTP/1.1 keys, each with at least
    /// one connection or a connect under way.
    pub keys: usize,
    pub h2_conns: usize,
    pub idle_h1_conns: usize,
}

/// Where an HTTP/2 request goes.
enum H2Pick {
    Use(
        h2::client::SendRequest<Bytes>,
        Option<Arc<str>>,
        StreamGuard,
    ),
    Connect(Arc<tokio::sync::Mutex<()>>),
    Full,
}

enum Mode {
    H1,
    H2,
    Upgrade,
}

/// Where an HTTP/1.1 request goes; the first two hold a [`H1Lease`] on the key.
enum H1Pick {
    Idle(H1Conn, H1Lease),
    Open(H1Lease),
    /// As many mesh connections as allowed are busy: ride HTTP/2.
    Spill,
}

impl Pool {
    pub fn new(tls: Arc<TlsCache>) -> Self {
        Self::with_settings(tls, PoolSettings::default())
    }

    /// A pool whose connections come from `source` (the inbound side's pool).
    pub fn with_source(tls: Arc<TlsCache>, source: SourceAddr) -> Self {
        Self::with_parts(tls, PoolSettings::default(), source)
    }

    /// A pool with these bounds.
    pub fn with_settings(tls: Arc<TlsCache>, settings: PoolSettings) -> Self {
        Self::with_parts(tls, settings, SourceAddr::Any)
    }

    /// Inside a Tokio runtime this starts the pool's reaper, which ends when the last clone of
    /// the pool is dropped.
    pub fn with_parts(tls: Arc<TlsCache>, settings: PoolSettings, source: SourceAddr) -> Self {
        let inner = Arc::new(Inner {
            tls,
            settings,
            conns: Mutex::default(),
            source,
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(reap(
                Arc::downgrade(&inner),
                inner.tls.subscribe(),
                settings,
            ));
        }
        Self { inner }
    }

    /// What the pool holds now.
    pub fn stats(&self) -> PoolStats {
        let c = self.inner.conns.lock().expect("pool lock");
        PoolStats {
            keys: c.h2.len() + c.h1.len(),
            h2_conns: c.h2.values().map(|s| s.conns.len()).sum(),
            idle_h1_conns: c.h1.values().map(|s| s.idle.len()).sum(),
        }
    }

    /// Opens a connection to `addr`, with mTLS carrying `alpn` when `identities` is non-empty.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        identities: &Arc<[String]>,
        alpn: Alpn,
        timeout: Option<Duration>,
    ) -> Result<(BoxIo, Option<String>), UpstreamError> {
        let source = self.inner.source.for_dst(addr);
        let (io, peer) =
            connect_peer(&self.inner.tls, source, addr, identities, alpn, timeout).await?;
        Ok((io, peer.map(|p| p.id)))
    }

    /// [`Pool::connect`] that also returns the peer's [`PeerTrust`] (meshed targets), for a
    /// connection that lives outside the pool and must close when its peer is no longer trusted.
    pub async fn connect_trusted(
        &self,
        addr: SocketAddr,
        identities: &Arc<[String]>,
        alpn: Alpn,
        timeout: Option<Duration>,
    ) -> Result<(BoxIo, Option<PeerTrust>), UpstreamError> {
        let source = self.inner.source.for_dst(addr);
        let (io, peer) =
            connect_peer(&self.inner.tls, source, addr, identities, alpn, timeout).await?;
        Ok((io, peer.and_then(|p| p.trust)))
    }

    async fn send_inner(
        self,
        target: Target,
        mut req: Request<Body>,
    ) -> Result<Reply, UpstreamError> {
        let meshed = !target.identities.is_empty();
        let mode = if is_upgrade(&req) {
            Mode::Upgrade
        } else if meshed {
            // What the application speaks rides between the sidecars: HTTP/1.x on pooled
            // HTTP/1.1 (ALPN `http/1.1`), HTTP/2 on HTTP/2, and HTTP/2 when the far
            // application is declared to speak it (the far sidecar converts).
            if req.version() != Version::HTTP_2
                && !matches!(target.protocol, Protocol::Http2 | Protocol::Grpc)
            {
                Mode::H1
            } else {
                Mode::H2
            }
        } else {
            match target.protocol {
                Protocol::Http2 | Protocol::Grpc => Mode::H2,
                Protocol::Http1 => Mode::H1,
                Protocol::Auto | Protocol::Tcp => {
                    if req.version() == Version::HTTP_2 {
                        Mode::H2
                    } else {
                        Mode::H1
                    }
                }
            }
        };
        let key = Key {
            addr: target.addr,
            identities: target.identities.clone(),
        };
        let addr = target.addr;
        let (resp, peer) = match mode {
            Mode::H2 => return self.send_h2(key, &target, req).await,
            Mode::H1 => {
                to_http1(&mut req);
                return match self.send_h1(key, req, target.connect_timeout).await? {
                    Ok(resp) => Ok(resp),
                    Err((key, req)) => self.send_h2(key, &target, req).await,
                };
            }
            Mode::Upgrade => {
                to_http1(&mut req);
                let (io, peer) = self.connect_h1(&key, target.connect_timeout).await?;
                let (mut sr, conn) = http1::Builder::new()
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(|e| classify(addr, e))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        tracing::debug!(error = %e, "upgrade connection ended");
                    }
                });
                let mut resp = sr.send_request(req).await.map_err(|e| classify(addr, e))?;
                let peer = peer.map(|p| {
                    // The tunnel, once upgraded, outlives this call: it closes when the
                    // server's certificate does (see `spawn_tunnel`).
                    if let Some(t) = p.trust {
                        resp.extensions_mut().insert(t);
                    }
                    Arc::<str>::from(p.id)
                });
                (resp, peer)
            }
        };
        Ok(Reply {
            resp: resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed()),
            peer,
        })
    }

    /// A new connection to `key` for HTTP/1.1 (mTLS with ALPN `http/1.1` when meshed).
    async fn connect_h1(
        &self,
        key: &Key,
        timeout: Option<Duration>,
    ) -> Result<(BoxIo, Option<Peer>), UpstreamError> {
        let source = self.inner.source.for_dst(key.addr);
        connect_peer(
            &self.inner.tls,
            source,
            key.addr,
            &key.identities,
            Alpn::Http1,
            timeout,
        )
        .await
    }

    /// One request over HTTP/2 to `key`.
    async fn send_h2(
        &self,
        key: Key,
        target: &Target,
        mut req: Request<Body>,
    ) -> Result<Reply, UpstreamError> {
        let addr = key.addr;
        let meshed = !key.identities.is_empty();
        // The far proxy speaks HTTP/1.1 to its application when this one's did, or when the
        // port is declared HTTP/1.1 (`protocol: http1`): an h2c client must not make the far
        // proxy try HTTP/2 on an application that only speaks 1.1.
        if meshed && (req.version() != Version::HTTP_2 || target.protocol == Protocol::Http1) {
            req.headers_mut()
                .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
        }
        to_http2(&mut req);
        // The policy's `circuitBreaker.maxConnections` caps connections per endpoint.
        let cap = req
            .extensions()
            .get::<ConnectionParams>()
            .and_then(|p| p.max_connections)
            .map_or(self.inner.settings.max_h2_conns, |m| {
                (m as usize).min(self.inner.settings.max_h2_conns)
            });
        let (sr, peer, guard) = self.h2_sender(&key, cap, target.connect_timeout).await?;
        let resp = h2client::send(&sr, &guard.0, req)
            .await
            .map_err(|e| classify_h2(addr, e))?;
        // The stream counts against the connection until the body is done with.
        Ok(Reply {
            resp: resp.map(|b| {
                Counted {
                    inner: b,
                    _guard: guard,
                }
                .boxed()
            }),
            peer,
        })
    }

    /// A connection with a free stream for `key`, opening one when all are at their limit.
    async fn h2_sender(
        &self,
        key: &Key,
        cap: usize,
        timeout: Option<Duration>,
    ) -> Result<
        (
            h2::client::SendRequest<Bytes>,
            Option<Arc<str>>,
            StreamGuard,
        ),
        UpstreamError,
    > {
        let gate = match self.pick_h2(key, cap) {
            H2Pick::Use(sr, peer, g) => return Ok((sr, peer, g)),
            H2Pick::Full => return Err(UpstreamError::Overflow { addr: key.addr }),
            H2Pick::Connect(gate) => gate,
        };
        let _g = gate.lock().await;
        match self.pick_h2(key, cap) {
            H2Pick::Use(sr, peer, g) => return Ok((sr, peer, g)),
            H2Pick::Full => return Err(UpstreamError::Overflow { addr: key.addr }),
            H2Pick::Connect(_) => {}
        }
        let conn = self.open_h2(key, timeout).await?;
        let picked = (conn.sr.clone(), conn.peer.clone(), reserve(&conn.streams));
        self.inner
            .conns
            .lock()
            .expect("pool lock")
            .h2
            .entry(key.clone())
            .or_default()
            .conns
            .push(conn);
        Ok(picked)
    }

    /// The least loaded usable connection with a free stream; else whether to connect (fewer
    /// than `cap` connections), queue (bounded) or refuse.
    fn pick_h2(&self, key: &Key, cap: usize) -> H2Pick {
        let creds = if key.identities.is_empty() {
            None
        } else {
            self.inner.tls.credentials()
        };
        let settings = &self.inner.settings;
        let mut c = self.inner.conns.lock().expect("pool lock");
        let slot = match c.h2.get_mut(key) {
            Some(s) => s,
            None => c.h2.entry(key.clone()).or_default(),
        };
        slot.prune(creds.as_ref(), &key.identities, None);
        let least = |conns: &[H2Conn], room: bool| {
            conns
                .iter()
                .enumerate()
                .filter(|(_, c)| !room || c.streams.has_room())
                .min_by_key(|(_, c)| c.streams.inflight())
                .map(|(i, _)| i)
        };
        let chosen = match least(&slot.conns, true) {
            Some(i) => i,
            None if slot.conns.len() < cap.max(1) => {
                return H2Pick::Connect(slot.connecting.clone());
            }
            None => {
                let queued: usize = slot
                    .conns
                    .iter()
                    .map(|c| {
                        c.streams
                            .inflight()
                            .saturating_sub(c.streams.max.load(Ordering::Relaxed))
                    })
                    .sum();
                if queued >= settings.max_h2_queued {
                    return H2Pick::Full;
                }
                match least(&slot.conns, false) {
                    Some(i) => i,
                    None => return H2Pick::Connect(slot.connecting.clone()),
                }
            }
        };
        let c = &mut slot.conns[chosen];
        c.last_used = Instant::now();
        H2Pick::Use(c.sr.clone(), c.peer.clone(), reserve(&c.streams))
    }

    /// Connects and handshakes HTTP/2, then waits (bounded) for the peer's first SETTINGS so
    /// the stream limit is known before requests are spread over the connection.
    async fn open_h2(&self, key: &Key, timeout: Option<Duration>) -> Result<H2Conn, UpstreamError> {
        let (io, peer) = connect_peer(
            &self.inner.tls,
            self.inner.source.for_dst(key.addr),
            key.addr,
            &key.identities,
            Alpn::H2,
            timeout,
        )
        .await?;
        let streams = Arc::new(ConnState::new(H2_INITIAL_MAX_STREAMS));
        let (settled_tx, settled_rx) = tokio::sync::oneshot::channel();
        let io = SettingsSniffer::new(io, streams.clone(), settled_tx);
        let (sr, conn) = h2client::builder(H2_INITIAL_MAX_STREAMS)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| classify_h2(key.addr, e))?;
        tokio::spawn(h2client::drive(
            conn,
            streams.clone(),
            h2client::Keepalive::default(),
        ));
        let wait = timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let _ = tokio::time::timeout(wait, settled_rx).await;
        let (peer, cert) = match peer {
            Some(p) => (Some(Arc::<str>::from(p.id)), p.cert),
            None => (None, None),
        };
        Ok(H2Conn {
            sr,
            peer,
            cert,
            streams,
            last_used: Instant::now(),
        })
    }

    /// [`H1Pick::Spill`] when meshed and `max_h1_hop_inflight` requests to the peer are in
    /// flight already (over either protocol); else an idle connection for `key`, else leave to
    /// open one.
    ///
    /// The idle one is the most recently used that is ready for a request, was idle for less
    /// than `idle_timeout` (the policy's `timeouts.idleMs`, else the pool's) and, when meshed,
    /// whose peer is still trusted; older ones are dropped ([`take_idle`]). Only connections
    /// hyper had finished the last exchange on are pooled (see [`finish`]); one the far side
    /// closed while idle is noticed by the reaper, or by the request that takes it, which then
    /// goes out on another connection.
    fn pick_h1(&self, key: &Key, idle_timeout: Option<Duration>) -> H1Pick {
        let meshed = !key.identities.is_empty();
        let creds = if meshed {
            self.inner.tls.credentials()
        } else {
            None
        };
        let settings = &self.inner.settings;
        let mut t = idle_timeout.unwrap_or(settings.idle_timeout);
        if meshed {
            t = t.min(settings.h1_hop_idle_timeout);
        }
        let now = Instant::now();
        let mut c = self.inner.conns.lock().expect("pool lock");
        let h2_inflight = if meshed {
            c.h2.get(key).map_or(0, |s| {
                s.conns.iter().map(|c| c.streams.inflight()).sum::<usize>()
            })
        } else {
            0
        };
        let slot = match c.h1.get_mut(key) {
            Some(s) => s,
            None => c.h1.entry(key.clone()).or_default(),
        };
        if meshed && slot.busy + h2_inflight >= settings.max_h1_hop_inflight {
            return H1Pick::Spill;
        }
        let mut wall = None;
        let idle = loop {
            let Some(mut e) = take_idle(&mut slot.idle, now, t, |e| e.since, |e| e.conn.reusable())
            else {
                break None;
            };
            let Some(cert) = e.conn.cert.as_mut() else {
                break Some(e.conn);
            };
            let wall = *wall.get_or_insert_with(SystemTime::now);
            if cert.usable(creds.as_ref(), wall, &key.identities) {
                break Some(e.conn);
            }
        };
        slot.busy += 1;
        let lease = H1Lease {
            pool: self.inner.clone(),
            key: key.clone(),
            conn: None,
        };
        match idle {
            Some(conn) => H1Pick::Idle(conn, lease),
            None => H1Pick::Open(lease),
        }
    }

    /// One request over pooled HTTP/1.1 to `key` (mTLS with ALPN `http/1.1` when meshed).
    /// `Ok(Err(..))` hands the request back untouched when it should ride HTTP/2 instead
    /// ([`H1Pick::Spill`]).
    async fn send_h1(
        &self,
        key: Key,
        mut req: Request<Body>,
        timeout: Option<Duration>,
    ) -> Result<Result<Reply, (Key, Request<Body>)>, UpstreamError> {
        let addr = key.addr;
        let idle_timeout = req
            .extensions()
            .get::<ConnectionParams>()
            .and_then(|p| p.idle_timeout);
        // A pooled connection may have been closed by the server just now; hyper hands the
        // request back when it was not written, and it is sent once more on a new connection.
        for _ in 0..2 {
            let (mut conn, lease, pooled) = match self.pick_h1(&key, idle_timeout) {
                H1Pick::Spill => return Ok(Err((key, req))),
                H1Pick::Idle(conn, lease) => (conn, lease, true),
                H1Pick::Open(lease) => {
                    let (io, peer) = self.connect_h1(&key, timeout).await?;
                    let mut b = http1::Builder::new();
                    if peer.is_some() {
                        // The far sidecar's `Date` may come on top of the application's 100.
                        b.max_headers(super::HOP_MAX_HEADERS);
                    }
                    let (sr, io) = b
                        .handshake(TokioIo::new(io))
                        .await
                        .map_err(|e| classify(addr, e))?;
                    let (peer, cert) = match peer {
                        Some(p) => (Some(Arc::<str>::from(p.id)), p.cert),
                        None => (None, None),
                    };
                    (H1Conn::new(sr, io, peer, cert), lease, false)
                }
            };
            match conn.send(req).await {
                Ok(resp) => {
                    let peer = conn.peer.clone();
                    let (parts, inner) = resp.into_parts();
                    let mut body = Returning {
                        inner,
                        conn: Some(conn),
                        lease: Some(lease),
                        gave_data: false,
                        held: None,
                    };
                    if body.inner.is_end_stream() {
                        finish(&mut body.conn, &mut body.lease);
                    }
                    return Ok(Ok(Reply {
                        resp: Response::from_parts(parts, body.boxed()),
                        peer,
                    }));
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if pooled => req = r,
                    _ => return Err(classify(addr, e.into_error())),
                },
            }
        }
        Err(UpstreamError::Reset {
            addr,
            source: "pooled connections kept closing".into(),
        })
    }
}

/// Takes from `idle` the last entry that is `ready`, after dropping the entries whose `since`
/// is `t` or longer before `now`.
///
/// Entries are pushed in the order they became idle, so the expired ones are a prefix, found
/// by binary search, and the most recent ones are at the end, where the search for a ready one
/// starts and nearly always ends. This runs once per request to the application: it used to
/// look at every idle connection (a clock read and two checks each), which with the 16 idle
/// connections of a 16-connection load was 2 % of the server sidecar's instructions
/// (callgrind: 15.6 `Instant::elapsed` calls per request).
fn take_idle<T>(
    idle: &mut Vec<T>,
    now: Instant,
    t: Duration,
    since: impl Fn(&T) -> Instant,
    ready: impl Fn(&T) -> bool,
) -> Option<T> {
    let expired = |e: &T| now.saturating_duration_since(since(e)) >= t;
    // The oldest is nearly always fresh: one clock comparison instead of a binary search.
    if idle.first().is_some_and(expired) {
        let n = idle.partition_point(expired);
        idle.drain(..n);
    }
    let i = idle.iter().rposition(ready)?;
    Some(idle.remove(i))
}

/// Every `sweep_interval`, and whenever the credentials change: drops HTTP/2 connections that
/// are closed, idle past `idle_timeout` (no stream open), expired or no longer trusted, idle
/// HTTP/1.1 connections past `idle_timeout`, and keys left empty. Ends with the pool.
async fn reap(pool: Weak<Inner>, mut creds: crate::creds::CredentialsRx, settings: PoolSettings) {
    let mut tick = tokio::time::interval(settings.sweep_interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut creds_open = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = creds.changed(), if creds_open => creds_open = r.is_ok(),
        }
        let Some(inner) = pool.upgrade() else { return };
        let current = inner.tls.credentials();
        let mut c = inner.conns.lock().expect("pool lock");
        c.h2.retain(|key, slot| {
            let creds = if key.identities.is_empty() {
                None
            } else {
                current.as_ref()
            };
            slot.prune(creds, &key.identities, Some(settings.idle_timeout));
            // A slot whose gate is held (or waited on) is connecting: keep it.
            !slot.conns.is_empty() || Arc::strong_count(&slot.connecting) > 1
        });
        let now = SystemTime::now();
        c.h1.retain(|key, slot| {
            let (creds, idle_timeout) = if key.identities.is_empty() {
                (None, settings.idle_timeout)
            } else {
                (
                    current.as_ref(),
                    settings.idle_timeout.min(settings.h1_hop_idle_timeout),
                )
            };
            slot.idle.retain_mut(|e| {
                // Nothing drives an idle connection (see `H1Conn`): a look now notices a close
                // from the far side, so its socket does not linger until the idle timeout.
                e.conn.poll_if_woken();
                e.since.elapsed() < idle_timeout
                    && e.conn.reusable()
                    && e.conn
                        .cert
                        .as_mut()
                        .is_none_or(|p| p.usable(creds, now, &key.identities))
            });
            !slot.idle.is_empty() || slot.busy > 0
        });
    }
}

/// Reads the peer's first HTTP/2 frame (its SETTINGS, the server preface) as it passes, to
/// learn `SETTINGS_MAX_CONCURRENT_STREAMS` the moment it arrives; then steps aside (one branch
/// per read).
struct SettingsSniffer {
    io: BoxIo,
    /// Frame header, then payload, of the first frame; `None` once done.
    state: Option<(Vec<u8>, Arc<Streams>, tokio::sync::oneshot::Sender<()>)>,
}

impl SettingsSniffer {
    fn new(io: BoxIo, streams: Arc<Streams>, settled: tokio::sync::oneshot::Sender<()>) -> Self {
        Self {
            io,
            state: Some((Vec::with_capacity(64), streams, settled)),
        }
    }

    fn observe(&mut self, bytes: &[u8]) {
        let Some((buf, _, _)) = self.state.as_mut() else {
            return;
        };
        buf.extend_from_slice(bytes);
        if buf.len() < 9 {
            return;
        }
        let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
        let kind = buf[3];
        // A first frame that is not SETTINGS, or an absurd one, is not ours to read.
        if kind != 0x4 || len > 16_384 {
            self.state = None;
            return;
        }
        if buf.len() < 9 + len {
            return;
        }
        let mut max = None;
        for entry in buf[9..9 + len].chunks_exact(6) {
            let id = u16::from_be_bytes([entry[0], entry[1]]);
            let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
            if id == 0x3 {
                max = Some(value as usize);
            }
        }
        if let Some((_, streams, settled)) = self.state.take() {
            // Without a named limit hyper keeps its initial one.
            streams
                .max
                .store(max.unwrap_or(H2_INITIAL_MAX_STREAMS), Ordering::Relaxed);
            let _ = settled.send(());
        }
    }
}

impl AsyncRead for SettingsSniffer {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if this.state.is_some() && matches!(r, Poll::Ready(Ok(()))) {
            let new = buf.filled()[before..].to_vec();
            this.observe(&new);
        }
        r
    }
}

impl AsyncWrite for SettingsSniffer {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds its HTTP/2 stream's place in the pool's count.
    struct Counted<B> {
        #[pin]
        inner: B,
        _guard: StreamGuard,
    }
}

impl<B: HttpBody> HttpBody for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An `h2` failure: a stream the peer refused (`REFUSED_STREAM`, so unprocessed); the
/// connection went away (I/O error, GOAWAY) or the stream was reset before the response: the
/// peer reset it. Anything else (a request `h2` would not
/// send, a malformed response) is some other failure.
fn classify_h2(addr: SocketAddr, e: h2::Error) -> UpstreamError {
    if e.is_reset() && e.is_remote() && e.reason() == Some(h2::Reason::REFUSED_STREAM) {
        return UpstreamError::Refused { addr };
    }
    let reset = e.is_io() || e.is_go_away() || e.is_reset();
    reset_or_other(addr, reset, Box::new(e))
}

/// The peer reset the exchange (retriable under `retryOn: Reset`), or some other failure.
fn reset_or_other(addr: SocketAddr, reset: bool, source: BoxError) -> UpstreamError {
    if reset {
        UpstreamError::Reset { addr, source }
    } else {
        UpstreamError::Other { addr, source }
    }
}

/// One request's hold on an HTTP/1.1 connection of `key`, counted in its slot's `busy` until
/// dropped. `conn`, set once the response is read in full, goes back to the idle list then; a
/// request that failed or whose body was dropped early leaves it `None` (hyper could not reuse
/// that connection anyway).
struct H1Lease {
    pool: Arc<Inner>,
    key: Key,
    conn: Option<H1Conn>,
}

impl Drop for H1Lease {
    fn drop(&mut self) {
        let conn = self.conn.take();
        let mut c = self.pool.conns.lock().expect("pool lock");
        // The slot outlives every lease: the reaper keeps a slot with busy connections.
        let Some(slot) = c.h1.get_mut(&self.key) else {
            return;
        };
        slot.busy = slot.busy.saturating_sub(1);
        if let Some(conn) = conn
            && slot.idle.len() < MAX_IDLE_H1
        {
            slot.idle.push(IdleH1 {
                conn,
                since: Instant::now(),
            });
        }
    }
}

pin_project_lite::pin_project! {
    /// An HTTP/1.1 response body that drives its connection (see [`H1Conn`]) and returns it
    /// to the pool when it ends.
    ///
    /// The end of the body is the moment the connection can take another request: returning
    /// it from a task of its own, as this once did, ran after the next request had already
    /// looked for an idle connection, so back-to-back requests opened a second connection
    /// (see `http1_connections_are_reused_once_their_response_is_read` in tests/pool.rs). A
    /// body dropped before its end, or ended by an error, closes the connection, which hyper
    /// could not reuse anyway.
    struct Returning {
        #[pin]
        inner: hyper::body::Incoming,
        conn: Option<H1Conn>,
        lease: Option<H1Lease>,
        // Data went out on this poll's wake-up, with no wait since (see `held`).
        gave_data: bool,
        // The body's error, held back for one poll when it came right after data.
        //
        // The server that forwards this body writes a chunk into its buffer and polls for
        // the next at once; an error then ends its connection (or stream) before it flushed
        // what it had, and the client gets a bare reset (a 502 from its sidecar) where the
        // application had sent a head and part of a body. When this task also drove the
        // connection that read the error, the error is there on that very next poll: waiting
        // once lets the server flush, so the client sees its response end early (a short
        // read), as it does when the error comes later.
        held: Option<hyper::Error>,
    }
}

/// The exchange on `conn` is over: back to the pool through `lease` if it can take another
/// request, otherwise closed. The lease leaves the key's busy count either way.
fn finish(conn: &mut Option<H1Conn>, lease: &mut Option<H1Lease>) {
    let Some(mut lease) = lease.take() else {
        return;
    };
    let mut conn = conn.take();
    if let Some(c) = conn.as_mut() {
        if !c.reusable() {
            // hyper takes note of the exchange's end when next polled; usually it already has.
            c.poll_io();
        }
        c.drive.task.take();
    }
    lease.conn = conn.filter(H1Conn::reusable);
}

impl HttpBody for Returning {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Some(e) = this.held.take() {
            return Poll::Ready(Some(Err(Box::new(e))));
        }
        // As in `H1Conn::send`: the body's data arrives only while this poll drives the
        // connection, so the body's own waker is a no-op and the connection's is `cx`.
        let mut quiet = Context::from_waker(std::task::Waker::noop());
        let r = match this.conn.as_mut() {
            None => this.inner.as_mut().poll_frame(cx),
            Some(conn) => {
                // Taking a chunk from hyper's body channel wakes the connection's side of it
                // (there is room for the next): with no task registered that only marks the
                // connection for its next poll, instead of waking this very task once more
                // per response. `drive` registers the task again whenever this waits.
                conn.drive.task.take();
                match this.inner.as_mut().poll_frame(&mut quiet) {
                    Poll::Pending => {
                        conn.drive(cx);
                        this.inner.as_mut().poll_frame(&mut quiet)
                    }
                    r => r,
                }
            }
        };
        match r {
            Poll::Ready(None) => finish(this.conn, this.lease),
            Poll::Ready(Some(Ok(_))) => {
                *this.gave_data = true;
                if this.inner.is_end_stream() {
                    finish(this.conn, this.lease);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                *this.conn = None;
                *this.lease = None;
                if std::mem::take(this.gave_data) {
                    *this.held = Some(e);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                return Poll::Ready(Some(Err(Box::new(e))));
            }
            Poll::Pending => *this.gave_data = false,
        }
        r.map_err(|e| Box::new(e) as BoxError)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn classify(addr: SocketAddr, e: hyper::Error) -> UpstreamError {
    let reset = e.is_closed() || e.is_incomplete_message() || e.is_canceled();
    reset_or_other(addr, reset, Box::new(e))
}

/// The verified peer of a mesh connection.
struct Peer {
    id: String,
    /// `None` only when the chain or our credentials could not be read; such a connection is
    /// then retired by nothing but idleness (rustls always exposes the chain it verified).
    cert: Option<PeerCert>,
    /// The same chain for connections that leave the pool (opaque TCP, upgraded tunnels).
    trust: Option<PeerTrust>,
}

/// TCP connect (with `TCP_NODELAY`), then mTLS when the target is meshed. Returns the stream
/// and the peer's verified SPIFFE ID.
pub async fn connect(
    tls: &TlsCache,
    addr: SocketAddr,
    identities: &Arc<[String]>,
    alpn: Alpn,
    timeout: Option<Duration>,
) -> Result<(BoxIo, Option<String>), UpstreamError> {
    connect_from(tls, None, addr, identities, alpn, timeout).await
}

/// TCP connect from `source` (any port), or from wherever the kernel picks.
async fn tcp_connect(
    source: Option<std::net::IpAddr>,
    addr: SocketAddr,
) -> std::io::Result<TcpStream> {
    let Some(ip) = source else {
        return TcpStream::connect(addr).await;
    };
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    sock.bind(SocketAddr::new(ip, 0))?;
    sock.connect(addr).await
}

/// [`connect`] from a chosen local address.
pub async fn connect_from(
    tls: &TlsCache,
    source: Option<std::net::IpAddr>,
    addr: SocketAddr,
    identities: &Arc<[String]>,
    alpn: Alpn,
    timeout: Option<Duration>,
) -> Result<(BoxIo, Option<String>), UpstreamError> {
    let (io, peer) = connect_peer(tls, source, addr, identities, alpn, timeout).await?;
    Ok((io, peer.map(|p| p.id)))
}

async fn connect_peer(
    tls: &TlsCache,
    source: Option<std::net::IpAddr>,
    addr: SocketAddr,
    identities: &Arc<[String]>,
    alpn: Alpn,
    timeout: Option<Duration>,
) -> Result<(BoxIo, Option<Peer>), UpstreamError> {
    let timeout = timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let tcp = match tokio::time::timeout(timeout, tcp_connect(source, addr)).await {
        Err(_) => return Err(UpstreamError::ConnectTimeout { addr }),
        Ok(Err(source)) => return Err(UpstreamError::Connect { addr, source }),
        Ok(Ok(s)) => s,
    };
    let _ = tcp.set_nodelay(true);
    if identities.is_empty() {
        return Ok((Box::new(tcp), None));
    }
    // The credentials the handshake verifies with: taken before, so a change during the
    // handshake is caught by the next check.
    let creds = tls.credentials();
    let cfg = tls
        .client(identities, alpn)
        .map_err(|e| UpstreamError::Tls {
            addr,
            reason: e.to_string(),
        })?;
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let stream =
        match tokio::time::timeout(timeout, connector.connect(mesh_server_name(), tcp)).await {
            Err(_) => return Err(UpstreamError::ConnectTimeout { addr }),
            Ok(Err(e)) => {
                return Err(UpstreamError::Tls {
                    addr,
                    reason: e.to_string(),
                });
            }
            Ok(Ok(s)) => s,
        };
    let (_, conn) = stream.get_ref();
    if conn.alpn_protocol() != Some(alpn.id()) {
        return Err(UpstreamError::Tls {
            addr,
            reason: "peer did not agree on the mesh ALPN protocol".into(),
        });
    }
    let trust = PeerTrust::of_server(conn, identities);
    let peer = crate::tls::peer_spiffe_id(conn).map(|id| {
        let chain: Option<Arc<[CertificateDer<'static>]>> = conn
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect());
        let cert = match (chain, creds) {
            (Some(chain), Some(verified)) => chain
                .first()
                .and_then(|leaf| crate::tls::not_after_of(leaf).ok())
                .map(|expires| PeerCert {
                    chain: chain.clone(),
                    expires,
                    verified,
                }),
            _ => None,
        };
        Peer { id, cert, trust }
    });
    Ok((Box::new(stream), peer))
}

impl Upstream for Pool {
    fn send(
        &self,
        target: Target,
        req: Request<Body>,
    ) -> BoxFuture<'static, Result<Reply, UpstreamError>> {
        Box::pin(self.clone().send_inner(target, req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Idle entries as the pool holds them: (became idle at, ready).
    fn entries(base: Instant, ages_ms: &[(u64, bool)]) -> Vec<(Instant, bool)> {
        ages_ms
            .iter()
            .map(|&(at, ready)| (base + Duration::from_millis(at), ready))
            .collect()
    }

    #[test]
    fn take_idle_drops_the_expired_and_takes_the_most_recent_ready() {
        let base = Instant::now();
        let now = base + Duration::from_millis(1000);
        let t = Duration::from_millis(500);
        // Idle since 0, 400 (expired: 1000 and 600 ms ago), 600, 700, 900 (not ready yet).
        let mut idle = entries(
            base,
            &[
                (0, true),
                (400, true),
                (600, true),
                (700, true),
                (900, false),
            ],
        );
        let got = take_idle(&mut idle, now, t, |e| e.0, |e| e.1);
        assert_eq!(got, Some((base + Duration::from_millis(700), true)));
        // The expired are gone; the one not ready yet stays for a later request.
        assert_eq!(idle, entries(base, &[(600, true), (900, false)]));
        // Idle exactly `t` counts as expired, as `elapsed() < t` did.
        let mut idle = entries(base, &[(500, true)]);
        assert_eq!(take_idle(&mut idle, now, t, |e| e.0, |e| e.1), None);
        assert!(idle.is_empty());
        // None ready: nothing taken, nothing fresh dropped.
        let mut idle = entries(base, &[(800, false), (900, false)]);
        assert_eq!(take_idle(&mut idle, now, t, |e| e.0, |e| e.1), None);
        assert_eq!(idle.len(), 2);
        assert_eq!(
            take_idle(&mut Vec::new(), now, t, |e: &(Instant, bool)| e.0, |e| e.1),
            None
        );
    }

    /// The per-request cost does not grow with the idle list: with 64 fresh, ready
    /// connections a pick reads one timestamp and checks readiness once.
    #[test]
    fn take_idle_looks_at_few_entries() {
        let base = Instant::now();
        let now = base + Duration::from_millis(100);
        let mut idle: Vec<(Instant, bool)> = (0..64)
            .map(|i| (base + Duration::from_micros(i), true))
            .collect();
        let (ages, checks) = (Cell::new(0), Cell::new(0));
        let got = take_idle(
            &mut idle,
            now,
            Duration::from_secs(60),
            |e| {
                ages.set(ages.get() + 1);
                e.0
            },
            |e| {
                checks.set(checks.get() + 1);
                e.1
            },
        );
        assert_eq!(got, Some((base + Duration::from_micros(63), true)));
        // Nothing expired: the oldest entry's age is the only one read.
        assert_eq!(ages.get(), 1, "{} timestamps read", ages.get());
        assert_eq!(checks.get(), 1);
    }

    #[test]
    fn inbound_connections_to_the_pod_ip_come_from_the_exempt_source() {
        let s = SourceAddr::InboundLoopback;
        let v4: SocketAddr = "10.0.0.5:8080".parse().unwrap();
        let v6: SocketAddr = "[fd00::5]:8080".parse().unwrap();
        assert_eq!(s.for_dst(v4), Some(INBOUND_SOURCE_V4.into()));
        assert_eq!(s.for_dst(v6), Some(INBOUND_SOURCE_V6.into()));
        // inbound-to-localhost: loopback needs no exemption.
        assert_eq!(s.for_dst("127.0.0.1:8080".parse().unwrap()), None);
        assert_eq!(SourceAddr::Any.for_dst(v4), None);
    }
}
