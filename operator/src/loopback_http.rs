//! The edge the local-only HTTP servers share (the dashboard, `trellis dev`'s operator
//! metrics). Audience: the user and their tools on this machine, nothing else: the listener is
//! bound to 127.0.0.1, and a request is answered only when its `Host` names that address and
//! port, so a web page on another origin cannot read it through DNS rebinding. Each server's
//! `handle` stays a pure function from a request to a response.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Binds 127.0.0.1 (`port` 0 picks a free one).
pub async fn bind(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await
}

/// Whether the request is addressed to this loopback listener (`127.0.0.1:port` or
/// `localhost:port`), the DNS-rebinding guard.
pub fn host_is_loopback<B>(req: &Request<B>, port: u16) -> bool {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| h == format!("127.0.0.1:{port}") || h == format!("localhost:{port}"))
}

/// Serves HTTP/1.1 and HTTP/2 on `listener` until `stop` is cancelled, answering each request
/// with `handle(request, listener port)`. `what` names the server in logs.
pub async fn serve<H>(listener: TcpListener, what: &'static str, handle: H, stop: CancellationToken)
where
    H: Fn(&Request<hyper::body::Incoming>, u16) -> Response<Full<Bytes>>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, server = what, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handle = handle.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let r = handle(&req, port);
                async move { Ok::<_, Infallible>(r) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// This host's address on its default route, if it has one: what a test connects to, to show
/// a loopback server does not answer there.
#[cfg(test)]
pub(crate) fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}
