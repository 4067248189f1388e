//! The discovery stream's listener: mTLS, HTTP/2 only, one long-lived `POST` per proxy.
//!
//! Audience: sidecars of this mesh. The TLS config ([`trellis_proxy::tls::server_config`])
//! requires a client certificate chaining to the mesh's trust bundle with a `spiffe://` ID in
//! the mesh's trust domain; a connection without one never gets past the handshake, and a
//! certificate whose ID is not a workload ID (`/ns/<ns>/sa/<sa>`) gets `403`. The operator
//! presents its own SPIFFE ID, which sidecars check.
//!
//! Bounds: connections are capped in all ([`MAX_CONNECTIONS`]) and per address
//! ([`MAX_CONNECTIONS_PER_PEER`]; over either, a new connection is closed at once), handshakes
//! time out, frames are limited ([`trellis_proxy::discovery::MAX_FRAME`]), and per-stream
//! state is bounded by the [`Registry`]. Responses go through an HTTP/2 stream whose flow control
//! pushes back on the writer task of that stream alone; while it waits, changes pile up in the
//! bounded pending set, never in a queue.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use trellis_proxy::conn_limit::Gate;
use trellis_proxy::discovery::{ClientMessage, Decoder, PATH, encode, workload_namespace};

use super::{DEBOUNCE, Registry, StreamId};
use crate::compiler::Output;

/// Concurrent connections (one per proxy): enough for a large cluster per replica, and a
/// ceiling on the memory a flood of handshakes can take.
pub const MAX_CONNECTIONS: usize = 20_000;
/// Concurrent connections from one address. A proxy needs one (a reconnect replaces it);
/// host-network pods share their node's address. Without it one compromised workload (it
/// holds a valid mesh certificate) could take every connection of [`MAX_CONNECTIONS`] and
/// keep every proxy that (re)connects after it off the stream: a connection that never opens
/// a stream is legal HTTP/2 and costs nothing to hold.
pub const MAX_CONNECTIONS_PER_PEER: usize = 32;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 keepalive: a proxy that vanished without a FIN is noticed and its stream dropped.
const KEEPALIVE: Duration = Duration::from_secs(30);

type Body = BoxBody<Bytes, Infallible>;

/// The registry and the wakers of the streams this replica serves.
#[derive(Default)]
pub struct Hub {
    registry: Mutex<Registry>,
    wakers: Mutex<HashMap<StreamId, Arc<Notify>>>,
    generation: Mutex<u64>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

impl Hub {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes a compile's output to the streams it concerns; returns the view generation it
    /// was published as (what the streams acknowledge), `None` when the output has no table.
    pub fn publish(&self, out: &Output) -> Option<u64> {
        out.fragments()?;
        let generation = {
            let mut g = self.generation.lock().unwrap_or_else(|p| p.into_inner());
            *g += 1;
            *g
        };
        // Incremental: the view follows the compile in place and only the streams subscribed
        // to what changed are woken (see `Registry::update`).
        let wake = self.registry().update(out, generation);
        let wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        for id in wake {
            if let Some(n) = wakers.get(&id) {
                n.notify_one();
            }
        }
        Some(generation)
    }

    /// What every stream of this replica reported (see [`Registry::stream_states`]).
    pub fn stream_states(&self) -> Vec<crate::propagation::StreamState> {
        self.registry().stream_states()
    }

    /// Follows the compile outputs published on `rx` until it closes.
    pub async fn follow(self: Arc<Self>, mut rx: watch::Receiver<Option<Arc<Output>>>) {
        loop {
            let out = rx.borrow_and_update().clone();
            if let Some(out) = out {
                self.publish(&out);
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// How many connected proxies applied the latest view.
    pub fn propagation(&self) -> super::Propagation {
        self.registry().propagation()
    }

    fn open(
        &self,
        namespace: &str,
        peer: Option<super::registry::Peer>,
    ) -> (StreamId, Arc<Notify>) {
        let id = {
            let mut registry = self.registry();
            let id = registry.open(namespace);
            if let Some(peer) = peer {
                registry.set_peer(id, peer);
            }
            id
        };
        let notify = Arc::new(Notify::new());
        self.wakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, notify.clone());
        (id, notify)
    }

    fn close(&self, id: StreamId) {
        self.registry().close(id);
        self.wakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
}

/// The TLS config new connections get; `None` until the operator holds its certificate (then
/// connections are closed before the handshake, and proxies retry elsewhere).
pub type TlsRx = watch::Receiver<Option<Arc<rustls::ServerConfig>>>;

/// Serves the stream on `listener` until `shutdown`. `tls` must require client certificates
/// of the mesh ([`trellis_proxy::tls::server_config`] with the operator's own credentials) and
/// offer `h2`; a renewed certificate or rotated bundle applies to new connections.
pub async fn serve(listener: TcpListener, tls: TlsRx, hub: Arc<Hub>, shutdown: CancellationToken) {
    let gate = Gate::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER);
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "discovery accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(permit) = gate.admit(peer.ip()) else {
            tracing::debug!(%peer, "discovery connection refused: too many open");
            continue;
        };
        let Some(config) = tls.borrow().clone() else {
            drop(tcp);
            continue;
        };
        let acceptor = TlsAcceptor::from(config);
        let hub = hub.clone();
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%error, %peer, "discovery TLS handshake refused");
                    return;
                }
                Err(_) => return,
            };
            let peer_id = trellis_proxy::tls::peer_spiffe_id(tls.get_ref().1);
            let svc = service_fn(move |req: Request<Incoming>| {
                let hub = hub.clone();
                let peer_id = peer_id.clone();
                async move { Ok::<_, Infallible>(handle(req, hub, peer_id.as_deref(), peer)) }
            });
            let conn = builder.serve_connection(TokioIo::new(tls), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(error) = r {
                    tracing::debug!(%error, %peer, "discovery connection ended");
                },
                _ = shutdown.cancelled() => {
                    // Proxies reconnect to another replica; their caches carry them meanwhile.
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                }
            }
        });
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())).boxed());
    *r.status_mut() = status;
    r
}

fn handle(
    req: Request<Incoming>,
    hub: Arc<Hub>,
    peer_id: Option<&str>,
    addr: std::net::SocketAddr,
) -> Response<Body> {
    if req.uri().path() != PATH {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "POST only\n");
    }
    let Some(namespace) = peer_id.and_then(workload_namespace) else {
        return plain(
            StatusCode::FORBIDDEN,
            "a workload certificate (spiffe://<td>/ns/<ns>/sa/<sa>) is required\n",
        );
    };
    let peer = peer_id.map(|identity| super::registry::Peer {
        identity: identity.to_string(),
        addr: addr.ip().to_canonical(),
        connected: jiff::Timestamp::now(),
    });
    let (id, notify) = hub.open(namespace, peer);
    // One frame in flight: the HTTP/2 stream's own window is the buffer, the registry's
    // pending set holds the rest (latest-wins).
    let (tx, mut rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    let done = CancellationToken::new();
    tokio::spawn(read_loop(
        req.into_body(),
        hub.clone(),
        id,
        notify.clone(),
        done.clone(),
    ));
    tokio::spawn(write_loop(hub, id, notify, tx, done));
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-trellis-discovery"),
    );
    r
}

/// Proxy messages -> registry. Ends the stream on a malformed frame or when the proxy closes.
async fn read_loop(
    mut body: Incoming,
    hub: Arc<Hub>,
    id: StreamId,
    notify: Arc<Notify>,
    done: CancellationToken,
) {
    let _end = done.clone().drop_guard();
    let mut decoder = Decoder::default();
    loop {
        let frame = tokio::select! {
            _ = done.cancelled() => return,
            f = body.frame() => f,
        };
        let Some(Ok(frame)) = frame else { return };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        decoder.push(&data);
        loop {
            match decoder.next_message::<ClientMessage>() {
                Ok(Some(ClientMessage::Subscribe { targets })) => {
                    if hub.registry().subscribe(id, targets) {
                        notify.notify_one();
                    }
                }
                Ok(Some(ClientMessage::Ack { generation })) => hub.registry().ack(id, generation),
                Ok(Some(ClientMessage::Loaded { settings, policies })) => {
                    hub.registry().loaded(id, settings, policies)
                }
                Ok(None) => break,
                Err(error) => {
                    tracing::debug!(%error, "discovery stream closed: bad frame");
                    return;
                }
            }
        }
    }
}

/// Registry -> proxy, debounced: wait for work, let it gather for [`DEBOUNCE`], send the
/// latest state.
async fn write_loop(
    hub: Arc<Hub>,
    id: StreamId,
    notify: Arc<Notify>,
    tx: mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
    done: CancellationToken,
) {
    let _end = done.clone().drop_guard();
    'stream: loop {
        tokio::select! {
            _ = done.cancelled() => break,
            _ = tx.closed() => break,
            _ = notify.notified() => {}
        }
        tokio::select! {
            _ = done.cancelled() => break,
            _ = tokio::time::sleep(DEBOUNCE) => {}
        }
        let messages = hub.registry().take(id);
        for m in messages {
            tokio::select! {
                _ = done.cancelled() => break 'stream,
                sent = tx.send(Ok(Frame::data(encode(&m)))) => if sent.is_err() { break 'stream },
            }
        }
    }
    hub.close(id);
}
