//! The HTTPS listener of the identity endpoint (port 15012): TLS with the in-memory serving
//! certificate, HTTP/1.1 and HTTP/2, bounded handshake and header times, connections capped in
//! all and per source address and ended at an age ([`super::IdentityConfig::connections`]),
//! graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use trellis_proxy::conn_limit::{self, Ended};

use super::IdentityService;

/// The identity endpoint's port.
pub const IDENTITY_PORT: u16 = 15012;

/// A slow or silent client must not hold a connection slot forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `service` on `listener` with `tls` until `shutdown`, then drains.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    service: Arc<IdentityService>,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    let limits = service.connection_limits();
    let gate = limits.gate();
    let connections = tokio_util::task::TaskTracker::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "identity endpoint accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(slot) = gate.admit(peer.ip()) else {
            tracing::debug!(%peer, "identity endpoint connection refused: too many open");
            continue;
        };
        let acceptor = acceptor.clone();
        let service = service.clone();
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
            let handshake = tokio::select! {
                r = handshake => r,
                // The total is full (of a flood, likely): the oldest make room.
                _ = slot.evicted() => return,
            };
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%error, %peer, "identity endpoint TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "identity endpoint TLS handshake timed out");
                    return;
                }
            };
            let svc = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                let service = service.clone();
                req.extensions_mut().insert(super::PeerAddr(peer));
                async move { Ok::<_, std::convert::Infallible>(service.handle(req).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(tls), svc);
            match conn_limit::drive(conn, |c| c.graceful_shutdown(), &limits, &shutdown, &slot)
                .await
            {
                Ended::Closed(Ok(())) => {}
                Ended::Closed(Err(error)) => {
                    tracing::debug!(%error, %peer, "identity endpoint connection ended with an error");
                }
                Ended::Dropped => {
                    tracing::debug!(%peer, "identity endpoint connection dropped: still open after the drain");
                }
            }
        });
    }
    // Each connection drains by itself after the shutdown (`ConnLimits::drain`).
    connections.close();
    connections.wait().await;
}

/// Binds `addr` and serves; returns the bound address and the serving task.
pub async fn bind_and_serve(
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    service: Arc<IdentityService>,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(serve(listener, tls, service, shutdown));
    Ok((local, task))
}
