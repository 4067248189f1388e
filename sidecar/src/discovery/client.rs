//! One discovery stream to one operator replica: mTLS with the workload certificate, the
//! operator's SPIFFE ID checked, HTTP/2, one `POST` whose request body carries our messages and
//! whose response body carries the operator's.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

use super::proto::{ClientMessage, Decoder, FrameError, PATH, ServerMessage, encode};

/// How long connecting (TCP, TLS, HTTP/2, response headers) may take before the replica is
/// given up on for another.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one attempt has before the next address is dialled beside it (as in Happy
/// Eyeballs, RFC 8305): a hung replica's address holds its attempt for [`CONNECT_TIMEOUT`],
/// and the proxy must not wait that long per dead address before it tries a live one. Long
/// enough that a healthy replica (a TLS handshake on the node network: milliseconds) usually
/// wins alone, so a proxy rarely opens two streams to throw one away.
pub const ATTEMPT_STAGGER: Duration = Duration::from_millis(250);
/// HTTP/2 PING interval on the stream. A replica that hangs, or whose node vanished without a
/// FIN, leaves the socket open and silent: without pings the proxy would stay subscribed to
/// nobody forever, miss every change, and make each new destination wait [`RESOLVE_WAIT`] for
/// nothing. With this interval and [`KEEPALIVE_TIMEOUT`] such a replica is left for another
/// within 10 s; a PING is 17 bytes every 5 s per proxy, which the operator answers without
/// touching the registry.
///
/// [`RESOLVE_WAIT`]: super::resolver::RESOLVE_WAIT
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a PING may go unanswered before the stream is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a stream could not be opened or ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("TLS with the operator at {0}: {1}")]
    Tls(SocketAddr, std::io::Error),
    #[error("HTTP/2 with the operator: {0}")]
    Http(#[from] hyper::Error),
    #[error("the operator answered {0}")]
    Status(http::StatusCode),
    #[error("timed out after {CONNECT_TIMEOUT:?}")]
    Timeout,
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("no operator address to dial")]
    NoAddress,
}

/// An open stream.
pub struct Stream {
    tx: mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
    body: Incoming,
    decoder: Decoder,
    _conn: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").finish_non_exhaustive()
    }
}

impl Stream {
    /// Opens a stream to `addr`. `tls` must present our workload certificate and accept only
    /// the operator's SPIFFE ID ([`crate::tls::client_config`] with that ID as the expected
    /// one, ALPN `h2`).
    pub async fn open(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Self, StreamError> {
        tokio::time::timeout(CONNECT_TIMEOUT, Self::open_inner(addr, tls))
            .await
            .map_err(|_| StreamError::Timeout)?
    }

    /// Opens a stream to the first of `addrs` that answers. Attempts start in order, each
    /// [`ATTEMPT_STAGGER`] after the previous one or as soon as it failed, and run side by
    /// side; the first stream up wins and the other attempts are dropped. Every address is
    /// dialled, so addresses that refuse or hang cost at most a stagger each, not a
    /// [`CONNECT_TIMEOUT`]. On failure, the last attempt's error.
    pub async fn open_first(
        addrs: &[SocketAddr],
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<(SocketAddr, Self), StreamError> {
        use futures::StreamExt;
        let mut queue = addrs.iter().copied();
        let mut running = futures::stream::FuturesUnordered::new();
        let mut last = StreamError::NoAddress;
        let dial = |addr: SocketAddr| {
            let tls = tls.clone();
            async move { (addr, Self::open(addr, tls).await) }
        };
        loop {
            if running.is_empty() {
                match queue.next() {
                    Some(addr) => running.push(dial(addr)),
                    None => return Err(last),
                }
            }
            let more = queue.len() > 0;
            tokio::select! {
                Some((addr, opened)) = running.next() => match opened {
                    Ok(stream) => return Ok((addr, stream)),
                    Err(e) => {
                        tracing::debug!(%addr, error = %e, "discovery replica not reachable");
                        last = e;
                        if let Some(next) = queue.next() {
                            running.push(dial(next));
                        }
                    }
                },
                _ = tokio::time::sleep(ATTEMPT_STAGGER), if more => {
                    if let Some(next) = queue.next() {
                        running.push(dial(next));
                    }
                }
            }
        }
    }

    async fn open_inner(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Self, StreamError> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| StreamError::Connect(addr, e))?;
        let _ = tcp.set_nodelay(true);
        let tls = TlsConnector::from(tls)
            .connect(crate::tls::mesh_server_name(), tcp)
            .await
            .map_err(|e| StreamError::Tls(addr, e))?;
        let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await?;
        let conn = tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%error, "discovery connection ended");
            }
        });
        // Our messages are few and small (subscriptions, acks); a short queue is plenty and
        // `send` waits when it is full.
        let (tx, mut rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
        let body = StreamBody::new(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
        let req = http::Request::post(format!("https://trellis-operator{PATH}"))
            .body(body)
            .expect("static request");
        let resp = send.send_request(req).await?;
        if resp.status() != http::StatusCode::OK {
            return Err(StreamError::Status(resp.status()));
        }
        Ok(Self {
            tx,
            body: resp.into_body(),
            decoder: Decoder::default(),
            _conn: conn,
        })
    }

    /// Sends one message; `false` when the stream is gone.
    pub async fn send(&self, msg: &ClientMessage) -> bool {
        self.tx.send(Ok(Frame::data(encode(msg)))).await.is_ok()
    }

    /// The next message; `Ok(None)` when the operator closed the stream.
    pub async fn recv(&mut self) -> Result<Option<ServerMessage>, StreamError> {
        loop {
            if let Some(m) = self.decoder.next_message()? {
                return Ok(Some(m));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.decoder.push(&data);
                    }
                }
            }
        }
    }
}
