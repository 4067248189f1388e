//! The connection pool behind [`Upstream`]: one request to one address, reusing connections.
//!
//! - Meshed targets (identities known) get mTLS with ALPN `h2`: one multiplexed HTTP/2
//!   connection per (address, identity set), shared by every request, whatever HTTP version the
//!   application spoke (an HTTP/1.1 request is marked with `trellis-orig-proto` so the far proxy
//!   speaks HTTP/1.1 to its application again). One handshake, then no per-request connection
//!   cost between proxies.
//! - Plaintext targets get HTTP/2 when the port says so (or the client spoke HTTP/2), otherwise
//!   pooled HTTP/1.1 keep-alive connections.
//! - `Upgrade` requests (WebSocket) take a dedicated HTTP/1.1 connection (mTLS with ALPN
//!   `http/1.1` when meshed) that becomes the tunnel after `101 Switching Protocols`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use http::{HeaderValue, Request, Response, Version};
use http_body_util::BodyExt;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::http::{ORIG_PROTO, is_upgrade, to_http1, to_http2};
use super::mtls::{Alpn, TlsCache};
use crate::config::Protocol;
use crate::tls::mesh_server_name;
use crate::traffic::{Body, BoxError, ConnectionParams, Target, Upstream, UpstreamError};

/// Connect timeout when the traffic policy sets none.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle HTTP/1.1 connections kept per target; more concurrent ones are closed after use.
const MAX_IDLE_H1: usize = 64;

pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}
pub type BoxIo = Box<dyn Io>;

/// The verified SPIFFE ID of the proxy that answered, in the response's extensions.
#[derive(Clone, Debug)]
pub struct PeerIdentity(pub Arc<str>);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    addr: SocketAddr,
    /// Empty for plaintext.
    identities: Arc<[String]>,
}

#[derive(Default)]
struct Conns {
    h2: HashMap<Key, (http2::SendRequest<Body>, Option<Arc<str>>)>,
    h2_connecting: HashMap<Key, Arc<tokio::sync::Mutex<()>>>,
    /// Idle HTTP/1.1 connections with the time they became idle.
    h1: HashMap<Key, Vec<(http1::SendRequest<Body>, Instant)>>,
}

struct Inner {
    tls: Arc<TlsCache>,
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

enum Mode {
    H1,
    H2,
    Upgrade,
}

impl Pool {
    pub fn new(tls: Arc<TlsCache>) -> Self {
        Self::with_source(tls, SourceAddr::Any)
    }

    /// A pool whose connections come from `source` (the inbound side's pool).
    pub fn with_source(tls: Arc<TlsCache>, source: SourceAddr) -> Self {
        Self {
            inner: Arc::new(Inner {
                tls,
                conns: Mutex::default(),
                source,
            }),
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
        connect_from(&self.inner.tls, source, addr, identities, alpn, timeout).await
    }

    async fn send_inner(
        self,
        target: Target,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        let meshed = !target.identities.is_empty();
        let mode = if is_upgrade(&req) {
            Mode::Upgrade
        } else if meshed {
            Mode::H2
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
        let resp = match mode {
            Mode::H2 => {
                if meshed && req.version() != Version::HTTP_2 {
                    req.headers_mut()
                        .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
                }
                to_http2(&mut req);
                let (mut sr, peer) = self.h2_sender(&key, target.connect_timeout).await?;
                let mut resp = sr.send_request(req).await.map_err(|e| classify(addr, e))?;
                if let Some(p) = peer {
                    resp.extensions_mut().insert(PeerIdentity(p));
                }
                resp
            }
            Mode::H1 => {
                to_http1(&mut req);
                self.send_h1(key, req, target.connect_timeout).await?
            }
            Mode::Upgrade => {
                to_http1(&mut req);
                let (io, peer) = self
                    .connect(addr, &key.identities, Alpn::Http1, target.connect_timeout)
                    .await?;
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
                if let Some(p) = peer {
                    resp.extensions_mut().insert(PeerIdentity(p.into()));
                }
                resp
            }
        };
        Ok(resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed()))
    }

    async fn h2_sender(
        &self,
        key: &Key,
        timeout: Option<Duration>,
    ) -> Result<(http2::SendRequest<Body>, Option<Arc<str>>), UpstreamError> {
        if let Some(sr) = self.ready_h2(key) {
            return Ok(sr);
        }
        // One connect per key at a time: concurrent first requests wait for it and share it.
        let gate = {
            let mut c = self.inner.conns.lock().expect("pool lock");
            c.h2_connecting.entry(key.clone()).or_default().clone()
        };
        let _g = gate.lock().await;
        if let Some(sr) = self.ready_h2(key) {
            return Ok(sr);
        }
        let (io, peer) = self
            .connect(key.addr, &key.identities, Alpn::H2, timeout)
            .await?;
        let peer: Option<Arc<str>> = peer.map(Into::into);
        let (sr, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .adaptive_window(true)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| classify(key.addr, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream h2 connection ended");
            }
        });
        self.inner
            .conns
            .lock()
            .expect("pool lock")
            .h2
            .insert(key.clone(), (sr.clone(), peer.clone()));
        Ok((sr, peer))
    }

    fn ready_h2(&self, key: &Key) -> Option<(http2::SendRequest<Body>, Option<Arc<str>>)> {
        let mut c = self.inner.conns.lock().expect("pool lock");
        match c.h2.get(key) {
            Some((sr, peer)) if !sr.is_closed() => Some((sr.clone(), peer.clone())),
            Some(_) => {
                c.h2.remove(key);
                None
            }
            None => None,
        }
    }

    /// The most recently used idle connection that is still open and was idle for less than
    /// `idle_timeout` (the policy's `timeouts.idleMs`); older ones are closed.
    fn idle_h1(
        &self,
        key: &Key,
        idle_timeout: Option<Duration>,
    ) -> Option<http1::SendRequest<Body>> {
        let mut c = self.inner.conns.lock().expect("pool lock");
        let idle = c.h1.get_mut(key)?;
        if let Some(t) = idle_timeout {
            idle.retain(|(_, since)| since.elapsed() < t);
        }
        while let Some((sr, _)) = idle.pop() {
            if sr.is_ready() {
                return Some(sr);
            }
        }
        None
    }

    async fn send_h1(
        &self,
        key: Key,
        mut req: Request<Body>,
        timeout: Option<Duration>,
    ) -> Result<Response<hyper::body::Incoming>, UpstreamError> {
        let addr = key.addr;
        let idle_timeout = req
            .extensions()
            .get::<ConnectionParams>()
            .and_then(|p| p.idle_timeout);
        // A pooled connection may have been closed by the server just now; hyper hands the
        // request back when it was not written, and it is sent once more on a new connection.
        for _ in 0..2 {
            let (mut sr, pooled) = match self.idle_h1(&key, idle_timeout) {
                Some(sr) => (sr, true),
                None => {
                    let (io, _) = self
                        .connect(addr, &key.identities, Alpn::Http1, timeout)
                        .await?;
                    let (sr, conn) = http1::Builder::new()
                        .handshake(TokioIo::new(io))
                        .await
                        .map_err(|e| classify(addr, e))?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "upstream h1 connection ended");
                        }
                    });
                    (sr, false)
                }
            };
            match sr.try_send_request(req).await {
                Ok(resp) => {
                    let pool = self.inner.clone();
                    // Back to the pool once the response body is done and the connection can
                    // take another request; a closed connection just drops.
                    tokio::spawn(async move {
                        if sr.ready().await.is_ok() {
                            let mut c = pool.conns.lock().expect("pool lock");
                            let idle = c.h1.entry(key).or_default();
                            if idle.len() < MAX_IDLE_H1 {
                                idle.push((sr, Instant::now()));
                            }
                        }
                    });
                    return Ok(resp);
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

fn classify(addr: SocketAddr, e: hyper::Error) -> UpstreamError {
    if e.is_closed() || e.is_incomplete_message() || e.is_canceled() {
        UpstreamError::Reset {
            addr,
            source: Box::new(e),
        }
    } else {
        UpstreamError::Other {
            addr,
            source: Box::new(e),
        }
    }
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
    let peer = crate::tls::peer_spiffe_id(conn);
    Ok((Box::new(stream), peer))
}

impl Upstream for Pool {
    fn send(
        &self,
        target: Target,
        req: Request<Body>,
    ) -> BoxFuture<'static, Result<Response<Body>, UpstreamError>> {
        Box::pin(self.clone().send_inner(target, req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
