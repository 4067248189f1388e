//! Inbound: connections to this workload, redirected to 15006.
//!
//! The mTLS mode for the original port comes from the first inbound policy whose selector
//! matches our labels (`Strict` when none does: a workload without policy is not opened up):
//! - `Strict`: only a TLS ClientHello is accepted; plaintext is refused and counted.
//! - `Permissive`: a ClientHello is terminated as mesh mTLS, anything else is served in
//!   plaintext. (Known limit: an application doing its own TLS on a Permissive port sees its
//!   handshake terminated by the proxy; use `Disable` for such ports.)
//! - `Disable`: plaintext only; TLS passes through to the application untouched.
//!
//! After mTLS, ALPN says what the stream carries (see [`super::mtls`]): `h2` from a client
//! sidecar is served by [`super::h2server`] (each request handled in the connection's task),
//! `http/1.1` (the application's HTTP/1.x, and upgrades) and plaintext HTTP by hyper, taking
//! the header lines a client sidecar may forward ([`super::HOP_MAX_HEADERS`]). Traffic goes where
//! [`Forward`] says: the original destination (the pod IP) by default, so a service the
//! application binds to loopback only stays private, as in Istio since 1.10.

use std::convert::Infallible;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::coalesce;
use super::detect::{Detected, detect};
use super::http::{
    ORIG_PROTO, authority, clean_response, ensure_request_id, http10_keep_alive, is_upgrade,
    keep_http10_alive, request_id, strip_hop_by_hop, trace_id,
};
use super::io::{Prefixed, original_dst};
use super::mtls::Alpn;
use super::peer_trust::{self, PeerTrust};
use super::upstream::Io;
use super::{Completed, Shared, h2server, idle, record, serve_http_inbound, spawn_tunnel, tcp};
use crate::config::{MtlsMode, Protocol};
use crate::conn_limit::Slot;
use crate::metrics::{Direction, ReasonLabels, SeriesCache, TcpLabels};
use crate::traffic::{
    BoxError, Outcome, Target, Upstream, UpstreamError, error_response_with, rate_limited_response,
};

/// A peer that opens TCP but never finishes the handshake is dropped after this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds on what clients can hold of the inbound listener, which anyone who reaches the pod IP
/// can connect to.
///
/// Connections that have not authenticated yet (protocol detection or the mTLS handshake in
/// progress) are capped per peer address, and a new one beyond that is closed at once
/// (counted as `trellis_proxy_inbound_refused_total{reason="too_many_pending"}`): each may sit
/// for up to `HANDSHAKE_TIMEOUT`, and without a cap one host could hold every file
/// descriptor of the proxy that way and lock out the mesh. They are capped in all too, but
/// there the oldest is closed to make room for the new one (`reason="pending_evicted"`, see
/// [`crate::conn_limit::Gate::evicting`]): refusing instead would let a few hosts, each within
/// its per-address share, fill the total with stalled handshakes and turn every mesh peer away. Authenticated mesh connections are not capped:
/// many legitimate clients share one address (every pod of a node behind its IP, with SNAT),
/// their number is bounded by the mesh's peers (each client sidecar pools its connections),
/// and a cap would only give whoever fills it a way to lock out the rest. Plaintext
/// connections (`Permissive` or `Disable` ports) leave the cap once detected, like mTLS ones
/// after the handshake; they are bounded in time instead, by [`Limits::idle_timeout`] and
/// [`Limits::header_read_timeout`]. The process's file descriptor limit is raised to its hard
/// limit at start ([`crate::run::raise_fd_limit`]) so the caps fit well inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections not yet authenticated from one peer address (`--inbound-max-pending-per-peer`).
    pub max_pending_per_peer: usize,
    /// Connections not yet authenticated, all peers together (`--inbound-max-pending`); a new
    /// one beyond it evicts the oldest.
    pub max_pending: usize,
    /// An inbound connection served by hyper (plaintext HTTP/1.1 and h2c, mTLS HTTP/1.1) is
    /// told to go away after one to two of these without a request in flight, and dropped one
    /// more later if still there (see [`super::idle`]); the same bound as the mTLS hop's
    /// ([`h2server::IDLE_TIMEOUT`]). Not a flag: tests shorten it.
    pub idle_timeout: Duration,
    /// An HTTP/1.1 request head must arrive within this, and an idle keep-alive connection is
    /// closed after it (see [`super::inbound_http_builder`]). Not a flag: tests shorten it.
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // A client sidecar opens a handful of connections to one pod at once, and a node's
            // pods behind one address together a few dozen at most, each for the length of a
            // handshake (milliseconds).
            max_pending_per_peer: 64,
            // Well inside the file descriptor limit of a pod (at least 1024 even before it is
            // raised to the hard limit); a legitimate burst of new connections from a whole
            // mesh after a rollout stays far below it.
            max_pending: 1024,
            idle_timeout: h2server::IDLE_TIMEOUT,
            // hyper's default, stated: clients send a request head at once.
            header_read_timeout: Duration::from_secs(30),
        }
    }
}

struct ConnInfo {
    target: SocketAddr,
    client_ip: String,
    peer: Arc<str>,
    tls: bool,
    dst_service: Arc<str>,
    series: SeriesCache,
    /// The application is not meshed: every request's [`Target`] has no identities. One empty
    /// list per connection, not an allocation per request.
    no_identities: Arc<[String]>,
    /// The mTLS client's chain: the connection and its upgraded tunnels close when it expires
    /// or its root leaves the bundle. `None` for plaintext.
    trust: Option<PeerTrust>,
}

/// Where inbound traffic goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forward {
    /// The original destination, i.e. the pod IP and the port the client asked for (the
    /// default). The connection comes from the inbound pool's exempt loopback source
    /// ([`super::upstream::SourceAddr`]), so it does not loop through the redirect rules.
    OriginalDst,
    /// `127.0.0.1` (or `[::1]`) with the original port: the old behaviour, for applications
    /// that bind only to localhost, opted into per pod with the
    /// `trellis.dev/inbound-to-localhost: "true"` annotation (`--inbound-to-localhost`).
    /// Risk: every service the application binds to loopback, including debug and admin
    /// servers it meant to keep private, becomes reachable from the mesh (and in plaintext
    /// under `Permissive` or `Disable`).
    Localhost,
    /// Local mode (`--local-mode --inbound-target`): everything goes to this address.
    Fixed(SocketAddr),
}

impl Forward {
    /// The address a connection that arrived for `orig_dst` goes to. `None`: a connection that
    /// was not redirected (outside local mode), or one whose original port is one of the
    /// proxy's own (`own_ports`, at most a handful): forwarding there would hand a remote peer
    /// the proxy's loopback-only admin routes. The init rules never redirect those ports;
    /// this holds even if someone else's rules did.
    pub fn target(
        self,
        orig_dst: SocketAddr,
        redirected: bool,
        own_ports: &[u16],
    ) -> Option<SocketAddr> {
        if let Forward::Fixed(t) = self {
            return Some(t);
        }
        if !redirected || own_ports.contains(&orig_dst.port()) {
            return None;
        }
        Some(match (self, orig_dst) {
            (Forward::Localhost, SocketAddr::V4(a)) => (Ipv4Addr::LOCALHOST, a.port()).into(),
            (Forward::Localhost, SocketAddr::V6(a)) => (Ipv6Addr::LOCALHOST, a.port()).into(),
            _ => orig_dst,
        })
    }
}

fn refuse(shared: &Shared, reason: &'static str) {
    shared
        .metrics
        .refused
        .get_or_create(&ReasonLabels { reason })
        .inc();
}

/// The mTLS mode the current config gives a container port (`Strict` when no policy matches);
/// `None` before any config is loaded.
fn current_mode(shared: &Shared, port: u16) -> Option<MtlsMode> {
    let snap = shared.config.borrow();
    let s = snap.as_ref()?;
    Some(
        s.config
            .inbound_for(&s.labels)
            .map(|p| p.mode_for_port(port))
            .unwrap_or(MtlsMode::Strict),
    )
}

/// Whether plaintext accepted earlier on `port` is still allowed. The mode is checked when a
/// connection is accepted, but a keep-alive or long-lived TCP connection outlives that check:
/// without this, switching a port from `Permissive` to `Strict` would leave every open
/// plaintext connection working until the client closed it.
fn plaintext_still_allowed(shared: &Shared, port: u16) -> bool {
    !matches!(current_mode(shared, port), Some(MtlsMode::Strict) | None)
}

pub async fn serve(shared: Arc<Shared>, mut stream: TcpStream, client: SocketAddr) {
    // Released once the client has authenticated (mTLS) or been detected as plaintext.
    let Some(pending) = shared.inbound_pending.admit(client.ip()) else {
        refuse(&shared, "too_many_pending");
        return;
    };
    let (orig_dst, local) = match (original_dst(&stream), stream.local_addr()) {
        (Ok(o), Ok(l)) => (o, l),
        _ => return,
    };
    let Some(target) = shared
        .inbound
        .target(orig_dst, orig_dst != local, &shared.own_ports)
    else {
        tracing::debug!(%client, %orig_dst, "inbound connection was not redirected (or targets a proxy port); closing");
        refuse(&shared, "not_redirected");
        return;
    };
    let port = target.port();
    let Some(mode) = current_mode(&shared, port) else {
        // Not ready: no config means no policy to enforce.
        refuse(&shared, "not_ready");
        return;
    };
    let dst_service: Arc<str> = format!("local:{port}").into();
    let opaque_port = shared.skips_detection(port);
    let (detected, prefix) = if mode == MtlsMode::Disable && opaque_port {
        (Detected::Opaque, bytes::Bytes::new())
    } else {
        tokio::select! {
            r = detect(&mut stream, shared.detect_timeout()) => match r {
                Ok(d) => d,
                Err(_) => return,
            },
            _ = pending.evicted() => {
                refuse(&shared, "pending_evicted");
                return;
            }
        }
    };
    let io = Prefixed::new(prefix, stream);
    match (mode, detected) {
        (MtlsMode::Strict | MtlsMode::Permissive, Detected::Tls) => {
            accept_mtls(&shared, io, client, target, dst_service, pending).await
        }
        (MtlsMode::Strict, _) => {
            tracing::debug!(%client, port, "plaintext refused: port is Strict");
            refuse(&shared, "plaintext");
        }
        (_, d) if d.is_http() => {
            drop(pending);
            plain_http(&shared, io, client, target, dst_service, None).await
        }
        (_, _) => {
            drop(pending);
            plain_tcp(&shared, io, target, dst_service, None, false).await
        }
    }
}

async fn accept_mtls(
    shared: &Arc<Shared>,
    io: Prefixed<TcpStream>,
    client: SocketAddr,
    target: SocketAddr,
    dst_service: Arc<str>,
    pending: Slot,
) {
    let cfg = match shared.tls.server() {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "cannot terminate mTLS");
            refuse(shared, "no_credentials");
            return;
        }
    };
    let accepted = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(cfg).accept(io)) => r,
        _ = pending.evicted() => {
            refuse(shared, "pending_evicted");
            return;
        }
    };
    drop(pending);
    let tls = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "inbound TLS handshake failed");
            refuse(shared, "handshake");
            return;
        }
        Err(_) => {
            refuse(shared, "handshake_timeout");
            return;
        }
    };
    let (_, conn) = tls.get_ref();
    let peer: Arc<str> = crate::tls::peer_spiffe_id(conn).unwrap_or_default().into();
    let trust = PeerTrust::of_client(conn);
    match Alpn::from_id(conn.alpn_protocol()) {
        Some(Alpn::H2) => {
            let mtls = MtlsPeer { id: peer, trust };
            mesh_h2(shared, tls, client, target, dst_service, mtls).await
        }
        Some(Alpn::Http1) => {
            let mtls = MtlsPeer { id: peer, trust };
            plain_http(shared, tls, client, target, dst_service, Some(mtls)).await
        }
        Some(Alpn::Tcp) => plain_tcp(shared, tls, target, dst_service, trust, true).await,
        None => refuse(shared, "alpn"),
    }
}

async fn plain_tcp<I: Io>(
    shared: &Shared,
    io: I,
    target: SocketAddr,
    dst_service: Arc<str>,
    trust: Option<PeerTrust>,
    tls: bool,
) {
    let labels = TcpLabels {
        direction: Direction::Inbound.as_str(),
        dst_service,
        tls,
    };
    let upstream = match shared
        .inbound_pool
        .connect(target, &Arc::from(Vec::new()), Alpn::Tcp, None)
        .await
    {
        Ok((upstream, _)) => upstream,
        Err(e) => {
            tracing::debug!(error = %e, "inbound tcp connect failed");
            return;
        }
    };
    if tls {
        // Closes when the client's certificate expires or its root leaves the bundle.
        let revoked = peer_trust::revoked(trust, shared.tls.subscribe());
        return tcp::splice_until(shared, io, upstream, labels, revoked).await;
    }
    // Plaintext: cut the connection as soon as a reload makes its port Strict.
    let mut config = shared.config.clone();
    let port = target.port();
    let revoked = async {
        loop {
            if config.changed().await.is_err() {
                return std::future::pending().await;
            }
            if !plaintext_still_allowed(shared, port) {
                return;
            }
        }
    };
    tokio::select! {
        _ = tcp::splice(shared, io, upstream, labels) => {}
        _ = revoked => {
            tracing::debug!(port, "plaintext TCP connection closed: port is now Strict");
            refuse(shared, "plaintext");
        }
    }
}

/// The verified client of an mTLS connection.
struct MtlsPeer {
    id: Arc<str>,
    trust: Option<PeerTrust>,
}

/// Serves the HTTP/2 hop from a client sidecar (mTLS, ALPN `h2`) with [`h2server`]: its
/// requests are handled inside this connection's task. Shuts down gracefully like
/// [`plain_http`]: at the shutdown signal, or when the client's certificate expires or its
/// root leaves the bundle.
async fn mesh_h2<I: Io>(
    shared: &Arc<Shared>,
    io: I,
    client: SocketAddr,
    target: SocketAddr,
    dst_service: Arc<str>,
    mtls: MtlsPeer,
) {
    let revoked = peer_trust::revoked(mtls.trust.clone(), shared.tls.subscribe());
    let info = ConnInfo {
        target,
        client_ip: client.ip().to_string(),
        peer: mtls.id,
        tls: true,
        dst_service,
        series: SeriesCache::default(),
        no_identities: Arc::from(Vec::new()),
        trust: mtls.trust,
    };
    let token = shared.shutdown.token();
    let closing = async {
        tokio::select! {
            _ = token.cancelled() => {}
            _ = revoked => tracing::debug!(
                "http/2 connection closed: the peer's certificate expired or is no longer trusted"
            ),
        }
    };
    let handler = |req| handle(shared, &info, req);
    if let Err(e) = h2server::serve(io, handler, closing, HANDSHAKE_TIMEOUT).await {
        tracing::debug!(error = %e, "inbound http/2 connection ended with an error");
    }
}

/// Serves HTTP from a plaintext client (`mtls: None`) or an mTLS one that asked for HTTP/1.1
/// (an upgrade), on hyper.
async fn plain_http<I: Io>(
    shared: &Arc<Shared>,
    io: I,
    client: SocketAddr,
    target: SocketAddr,
    dst_service: Arc<str>,
    mtls: Option<MtlsPeer>,
) {
    let tls = mtls.is_some();
    let (peer, trust) = match mtls {
        Some(m) => (m.id, m.trust),
        None => (Arc::default(), None),
    };
    let revoked = peer_trust::revoked(trust.clone(), shared.tls.subscribe());
    let info = Arc::new(ConnInfo {
        target,
        client_ip: client.ip().to_string(),
        peer,
        tls,
        dst_service,
        series: SeriesCache::default(),
        no_identities: Arc::from(Vec::new()),
        trust,
    });
    let sh = shared.clone();
    let activity = idle::Activity::default();
    let requests = activity.clone();
    serve_http_inbound(
        shared,
        io,
        move |req: Request<Incoming>| {
            let (sh, info) = (sh.clone(), info.clone());
            let in_flight = requests.begin();
            async move {
                let req = req.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed());
                let resp = handle(&sh, &info, req).await;
                // In flight until the body has been sent: a long download is not idleness.
                Ok::<_, Infallible>(resp.map(|b| idle::Tracked::new(b, in_flight).boxed()))
            }
        },
        activity,
        revoked,
    )
    .await;
}

/// One request from the mesh (or a plaintext client) to the application.
async fn handle(
    shared: &Shared,
    info: &ConnInfo,
    mut req: Request<crate::traffic::Body>,
) -> Response<crate::traffic::Body> {
    if !info.tls && !plaintext_still_allowed(shared, info.target.port()) {
        // A plaintext keep-alive connection accepted under Permissive/Disable; the port has
        // become Strict since. Refuse and close it.
        tracing::debug!(
            port = info.target.port(),
            "plaintext request refused: port is now Strict"
        );
        refuse(shared, "plaintext");
        let mut resp = crate::traffic::error_response(http::StatusCode::FORBIDDEN);
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        return resp;
    }
    let start = Instant::now();
    ensure_request_id(req.headers_mut());
    let upgrade = is_upgrade(&req);
    let keep_alive_10 = http10_keep_alive(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    strip_hop_by_hop(req.headers_mut(), upgrade);
    // HTTP/1.1 from the far application rode our HTTP/2: give the application HTTP/1.1 back.
    let orig_h1 = req.headers_mut().remove(ORIG_PROTO).is_some();
    let protocol = if orig_h1 || req.version() != Version::HTTP_2 {
        Protocol::Http1
    } else {
        Protocol::Http2
    };
    let method = req.method().clone();
    let version = if orig_h1 {
        Version::HTTP_11
    } else {
        req.version()
    };
    // Joins or starts the trace before the headers go on, so the application's span is this
    // span's child.
    let span = shared.tracing.begin(req.headers_mut());
    // Copied out of the request only when a span or an access log line will be written.
    let (auth, path, trace, request_id) = if span.is_some() || shared.access_log().is_some() {
        (
            authority(&req).unwrap_or("").to_owned(),
            req.uri()
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
            trace_id(req.headers()).map(str::to_owned),
            request_id(req.headers()).to_owned(),
        )
    } else {
        (String::new(), String::new(), None, String::new())
    };

    // Metrics and the access log line, the same for a rate-limited and a forwarded request.
    let record_inbound = |resp: &Response<crate::traffic::Body>, outcome: Option<&Outcome>| {
        record(
            shared,
            &Completed {
                direction: Direction::Inbound,
                start,
                method: &method,
                authority: &auth,
                path: &path,
                version,
                request_id: &request_id,
                trace_id: trace.as_deref(),
                peer_identity: &info.peer,
                dst_service: &info.dst_service,
                tls: info.tls,
                series: &info.series,
                span: span.as_ref(),
                outcome,
            },
            resp,
        )
    };
    let limiter = shared.inbound_limiter.lock().expect("limiter lock").clone();
    // Rate limited per source identity (per source address for plaintext clients).
    let limited = limiter.and_then(|l| {
        let source = if info.peer.is_empty() {
            info.client_ip.as_str()
        } else {
            &info.peer
        };
        l.check(source).err()
    });
    if let Some(wait) = limited {
        let resp = rate_limited_response(wait);
        let outcome = Outcome {
            flags: vec!["RL"],
            ..Default::default()
        };
        record_inbound(&resp, Some(&outcome));
        return resp;
    }
    let target = Target {
        addr: info.target,
        identities: info.no_identities.clone(),
        protocol,
        connect_timeout: None,
    };
    let mut failed = None;
    let mut resp = match shared.inbound_pool.send(target, req).await {
        // Head and first chunk go to the peer sidecar as one write.
        Ok(r) => coalesce::prefetch(r.resp, coalesce::PREFETCH_WAIT).await,
        Err(e) => {
            tracing::debug!(error = %e, "local application did not answer");
            // Nothing listening (or accepting) is the Service being unavailable, as the client
            // sidecar answers for an endpoint it cannot connect to: 503, not 502.
            let status = match e {
                UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout { .. } => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                _ => StatusCode::BAD_GATEWAY,
            };
            failed = Some(Outcome {
                endpoint: Some(info.target),
                attempts: 1,
                flags: vec!["UF"],
                ..Default::default()
            });
            error_response_with(status, &e.user_message())
        }
    };
    if let Some(cu) = client_upgrade
        && resp.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        spawn_tunnel(shared, cu, &mut resp, info.trust.clone());
    }
    clean_response(&mut resp);
    if keep_alive_10 {
        keep_http10_alive(&mut resp);
    }
    record_inbound(&resp, failed.as_ref());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: &[u16] = &[15001, 15006, 15020];

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_forwards_to_the_original_destination_on_both_families() {
        let f = Forward::OriginalDst;
        assert_eq!(
            f.target(a("10.0.0.5:8080"), true, OWN),
            Some(a("10.0.0.5:8080"))
        );
        assert_eq!(
            f.target(a("[fd00::5]:8080"), true, OWN),
            Some(a("[fd00::5]:8080"))
        );
    }

    #[test]
    fn localhost_opt_in_keeps_the_family() {
        let f = Forward::Localhost;
        assert_eq!(
            f.target(a("10.0.0.5:8080"), true, OWN),
            Some(a("127.0.0.1:8080"))
        );
        assert_eq!(
            f.target(a("[fd00::5]:8080"), true, OWN),
            Some(a("[::1]:8080"))
        );
    }

    #[test]
    fn unredirected_and_proxy_ports_go_nowhere_outside_local_mode() {
        for f in [Forward::OriginalDst, Forward::Localhost] {
            assert_eq!(f.target(a("10.0.0.5:15006"), false, OWN), None);
            assert_eq!(f.target(a("10.0.0.5:8080"), false, OWN), None);
            assert_eq!(f.target(a("10.0.0.5:15020"), true, OWN), None);
        }
        let fixed = Forward::Fixed(a("127.0.0.1:9000"));
        assert_eq!(
            fixed.target(a("127.0.0.1:15006"), false, OWN),
            Some(a("127.0.0.1:9000"))
        );
    }
}
