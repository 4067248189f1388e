//! The HTTPS listener of the identity endpoint (port 15012): TLS with the in-memory serving
//! certificate, HTTP/1.1 and HTTP/2, bounded handshake and header times, graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::IdentityService;

/// The identity endpoint's port.
pub const IDENTITY_PORT: u16 = 15012;

/// A slow or silent client must not hold a connection slot forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests may finish after shutdown is requested.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `service` on `listener` with `tls` until `shutdown`, then drains.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    service: Arc<IdentityService>,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
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
        let acceptor = acceptor.clone();
        let service = service.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
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
            let conn = builder
                .serve_connection(TokioIo::new(tls), svc)
                .into_owned();
            if let Err(error) = watcher.watch(conn).await {
                tracing::debug!(%error, %peer, "identity endpoint connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("identity endpoint: connections still open after the drain timeout");
    }
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
