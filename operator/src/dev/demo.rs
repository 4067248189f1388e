//! `trellis demo-service`: the small program every local service runs, and the load generator.
//!
//! `serve` answers HTTP/1.1 and HTTP/2 (gRPC framing for `grpc` services), spends `latency`
//! per request, fails a configurable fraction with 500 (gRPC `UNAVAILABLE`), and calls its
//! downstream services the way an app in a meshed pod does: a plain HTTP request whose Host is
//! `name.namespace:port`, sent to its own sidecar's outbound listener (in a cluster iptables
//! would redirect the connection there; locally the app is told the address).
//!
//! A `tcp` service (`serve --tcp`) speaks a line protocol instead, like a small cache: each
//! request line is answered with one line, `OK <replica>: <request>` or, failing on purpose,
//! `ERR <replica>: ...`. The sidecars carry it as opaque TCP over mTLS; a `load` client of it
//! opens one connection per request (so connections, not just bytes, show in the sidecars'
//! `trellis_proxy_tcp_*` metrics).
//!
//! `load` sends requests at a steady rate, either through its sidecar (a meshed client) or
//! straight at the target's pods in plaintext (a client outside the mesh), and counts what
//! happened on its own `/metrics`, so a refused plaintext request is visible from the client's
//! side too.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// `trellis demo-service`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(subcommand)]
    pub mode: Mode,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum Mode {
    /// Serve requests and call downstream services through the sidecar.
    Serve(ServeArgs),
    /// Generate steady traffic to one service.
    Load(LoadArgs),
}

/// A downstream service: `name.namespace:port[:grpc|:tcp]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub authority: String,
    pub grpc: bool,
    /// The line protocol over opaque TCP (see the module's doc).
    pub tcp: bool,
}

impl std::str::FromStr for Call {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (authority, grpc, tcp) = if let Some(a) = s.strip_suffix(":grpc") {
            (a, true, false)
        } else if let Some(a) = s.strip_suffix(":tcp") {
            (a, false, true)
        } else {
            (s.strip_suffix(":http").unwrap_or(s), false, false)
        };
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?}: expected name.namespace:port[:grpc|:tcp]"))?;
        port.parse::<u16>()
            .map_err(|_| format!("{s:?}: bad port {port:?}"))?;
        if !host.contains('.') {
            return Err(format!("{s:?}: expected name.namespace"));
        }
        Ok(Call {
            authority: authority.to_string(),
            grpc,
            tcp,
        })
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Replica name shown in responses (`catalog-0`).
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub listen: SocketAddr,
    /// Answer with gRPC framing and `grpc-status` trailers.
    #[arg(long)]
    pub grpc: bool,
    /// Answer the line protocol over plain TCP instead of HTTP (see the module's doc).
    #[arg(long, conflicts_with_all = ["grpc", "calls"])]
    pub tcp: bool,
    /// Fraction of requests answered with an error (0..=1).
    #[arg(long, default_value_t = 0.0)]
    pub failure_rate: f64,
    /// Time spent per request before answering.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Downstream services called per request (repeatable).
    #[arg(long = "call")]
    pub calls: Vec<Call>,
    /// The sidecar's outbound listener, where downstream calls go.
    #[arg(long)]
    pub outbound: Option<SocketAddr>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Client name, for logs.
    #[arg(long)]
    pub name: String,
    /// The service called (`name.namespace:port[:grpc|:tcp]`).
    #[arg(long)]
    pub target: Call,
    /// Requests per second.
    #[arg(long)]
    pub rate: f64,
    /// Send through this sidecar outbound listener (meshed client).
    #[arg(long, conflicts_with = "direct")]
    pub via: Option<SocketAddr>,
    /// Send in plaintext straight to these pod addresses, round robin (client outside the mesh).
    #[arg(long, value_delimiter = ',')]
    pub direct: Vec<SocketAddr>,
    /// With `--direct`: the addresses that are live endpoints now (comma-separated, rewritten
    /// by `trellis dev` as a rollout moves replicas), re-read when it changes. The client sends
    /// only to these, as a Service's virtual IP only picks endpoints; `--direct` is used until
    /// the file holds a valid list.
    #[arg(long, requires = "direct")]
    pub live_endpoints: Option<std::path::PathBuf>,
    /// Serve this client's own counters on `/metrics` here.
    #[arg(long)]
    pub metrics: SocketAddr,
    /// On SIGTERM: stop sending, let the requests in flight finish, write the final counters
    /// here (the `/metrics` text) and exit. `trellis dev` adds them to the whole run's count
    /// when a rollout replaces this client, so no request goes uncounted.
    #[arg(long)]
    pub final_counts: Option<std::path::PathBuf>,
}

/// Entry point of the hidden `trellis demo-service` subcommand.
pub fn main(args: Args) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo-service: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        tokio::spawn(exit_when_orphaned());
        match args.mode {
            Mode::Serve(a) => serve(a).await,
            Mode::Load(a) => load(a).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo-service: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `trellis dev` stops its children itself; this covers the case where it cannot (it was
/// SIGKILLed): a demo program whose parent is gone exits instead of running on unattended.
async fn exit_when_orphaned() {
    let parent = std::os::unix::process::parent_id();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if std::os::unix::process::parent_id() != parent {
            eprintln!("demo-service: parent {parent} is gone; exiting");
            std::process::exit(0);
        }
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// A gRPC length-prefixed message.
fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

/// A gRPC response: one message and `grpc-status` in the trailers.
fn grpc_response(code: u32, msg: &str) -> Response<Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(code));
    if code != 0
        && let Ok(v) = HeaderValue::from_str(msg)
    {
        trailers.insert("grpc-message", v);
    }
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = if code == 0 {
        vec![
            Ok(Frame::data(grpc_frame(msg.as_bytes()))),
            Ok(Frame::trailers(trailers)),
        ]
    } else {
        vec![Ok(Frame::trailers(trailers))]
    };
    let mut resp = Response::new(StreamBody::new(futures::stream::iter(frames)).boxed());
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    resp
}

type HttpClient = Client<HttpConnector, Body>;

/// Connects every request to one address, whatever its URI says. HTTP/2 carries the
/// authority in the URI (`:authority`), not in a Host header, so a gRPC call to
/// `reviews.shop:9081` through the sidecar needs that URI and this connector.
#[derive(Clone)]
struct FixedConnector(SocketAddr);

impl tower::Service<http::Uri> for FixedConnector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let addr = self.0;
        Box::pin(async move {
            let s =
                tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            s.set_nodelay(true)?;
            Ok(TokioIo::new(s))
        })
    }
}

struct Downstream {
    h1: HttpClient,
    /// One HTTP/2 client (and connection pool) per address called.
    h2: std::sync::Mutex<std::collections::HashMap<SocketAddr, Client<FixedConnector, Body>>>,
}

impl Downstream {
    fn new() -> Self {
        Self::with_pooling(true)
    }

    /// Without pooling every HTTP/1.1 request opens a new connection. The plaintext client
    /// uses that: a sidecar applies the mTLS mode when it accepts a connection, so a keep-alive
    /// connection accepted under `Permissive` would hide a switch to `Strict` until it closes.
    fn with_pooling(pool: bool) -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(Duration::from_secs(2)));
        let mut h1 = Client::builder(TokioExecutor::new());
        if !pool {
            h1.pool_max_idle_per_host(0);
        }
        Downstream {
            h1: h1.build(conn),
            h2: Default::default(),
        }
    }

    fn h2_client(&self, to: SocketAddr) -> Client<FixedConnector, Body> {
        self.h2
            .lock()
            .expect("client map poisoned")
            .entry(to)
            .or_insert_with(|| {
                Client::builder(TokioExecutor::new())
                    .http2_only(true)
                    .build(FixedConnector(to))
            })
            .clone()
    }

    /// Sends one request to `to` with the call's Host and returns the outcome.
    async fn call(&self, to: SocketAddr, call: &Call) -> Outcome {
        self.call_with(to, call, &http::HeaderMap::new()).await
    }

    /// [`Downstream::call`], carrying the W3C trace context of the request being served, as an
    /// instrumented app does: the sidecars' spans of both hops then join into one trace.
    async fn call_with(&self, to: SocketAddr, call: &Call, served: &http::HeaderMap) -> Outcome {
        let req = if call.grpc {
            Request::builder()
                .method(Method::POST)
                .uri(format!("http://{}/trellis.demo.Demo/Call", call.authority))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(full(grpc_frame(b"ping")))
        } else {
            Request::builder()
                .uri(format!("http://{to}/"))
                .header("host", &call.authority)
                .body(full(Bytes::new()))
        };
        let Ok(mut req) = req else {
            return Outcome::Error;
        };
        for h in TRACE_CONTEXT {
            if let Some(v) = served.get(h) {
                req.headers_mut().insert(h, v.clone());
            }
        }
        let fut = async {
            let resp = if call.grpc {
                self.h2_client(to).request(req).await?
            } else {
                self.h1.request(req).await?
            };
            let status = resp.status();
            let collected = resp.into_body().collect().await?;
            let grpc_status = collected
                .trailers()
                .and_then(|t| t.get("grpc-status"))
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok());
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, grpc_status))
        };
        match tokio::time::timeout(Duration::from_secs(5), fut).await {
            Err(_) => Outcome::Timeout,
            Ok(Err(e)) => classify_error(&*e),
            Ok(Ok((status, grpc))) => {
                if status.is_server_error() || grpc.is_some_and(|c| c != 0) {
                    Outcome::Error
                } else if status.is_success() && (!call.grpc || grpc == Some(0)) {
                    Outcome::Ok
                } else {
                    Outcome::Error
                }
            }
        }
    }
}

/// What one request came to, from the caller's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// An error status (5xx, gRPC non-OK).
    Error,
    /// The TCP connection could not be made.
    Connect,
    /// The peer closed or reset the connection without answering (what a `Strict` sidecar
    /// does to a plaintext client).
    Closed,
    Timeout,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::Error,
        Outcome::Connect,
        Outcome::Closed,
        Outcome::Timeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Connect => "connect",
            Outcome::Closed => "closed",
            Outcome::Timeout => "timeout",
        }
    }
}

fn classify_error(e: &(dyn std::error::Error + 'static)) -> Outcome {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(le) = err.downcast_ref::<hyper_util::client::legacy::Error>()
            && le.is_connect()
        {
            return Outcome::Connect;
        }
        cur = err.source();
    }
    Outcome::Closed
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&a.failure_rate) {
        anyhow::bail!("--failure-rate must be between 0 and 1");
    }
    if !a.calls.is_empty() && a.outbound.is_none() {
        anyhow::bail!("--call needs --outbound (the sidecar's outbound listener)");
    }
    let listener = TcpListener::bind(a.listen)
        .await
        .map_err(|e| anyhow::anyhow!("bind {}: {e}", a.listen))?;
    if a.tcp {
        return serve_lines(listener, Arc::new(a)).await;
    }
    let state = Arc::new((a, Downstream::new()));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state.0, &state.1, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Longest request or answer line of the line protocol; a longer one closes the connection.
const MAX_LINE: u64 = 1024;

/// Reads one line (without its `\n`) of at most [`MAX_LINE`] bytes; `None` at the end of the
/// stream, an error for a line too long.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<String>> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut buf = Vec::new();
    let n = r.take(MAX_LINE + 1).read_until(b'\n', &mut buf).await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "line too long or unterminated",
        ));
    }
    buf.pop();
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// Serves the line protocol: every request line gets one answer line, after `latency`.
async fn serve_lines(listener: TcpListener, a: Arc<ServeArgs>) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let a = a.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut r = tokio::io::BufReader::new(r);
            while let Ok(Some(line)) = read_line(&mut r).await {
                if a.latency_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(a.latency_ms)).await;
                }
                let flaky = a.failure_rate > 0.0 && rand::random::<f64>() < a.failure_rate;
                let answer = if flaky {
                    format!("ERR {}: failing on purpose\n", a.name)
                } else {
                    format!("OK {}: {line}\n", a.name)
                };
                if w.write_all(answer.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// One request of the line protocol on a connection of its own to `to`.
async fn tcp_call(to: SocketAddr, request: &str) -> Outcome {
    use tokio::io::AsyncWriteExt;
    let connect = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(to));
    let stream = match connect.await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return Outcome::Connect,
        Err(_) => return Outcome::Timeout,
    };
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let exchange = async {
        w.write_all(format!("{request}\n").as_bytes()).await?;
        read_line(&mut tokio::io::BufReader::new(r)).await
    };
    match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Err(_) => Outcome::Timeout,
        Ok(Err(_)) | Ok(Ok(None)) => Outcome::Closed,
        Ok(Ok(Some(line))) if line.starts_with("OK ") => Outcome::Ok,
        Ok(Ok(Some(_))) => Outcome::Error,
    }
}

/// The W3C Trace Context headers a served request hands on to the calls it causes.
const TRACE_CONTEXT: [&str; 2] = ["traceparent", "tracestate"];

async fn handle(a: &ServeArgs, down: &Downstream, req: Request<Incoming>) -> Response<Body> {
    let grpc = a.grpc
        && req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
    let served = req.headers().clone();
    // Read the request fully, as an app would, before answering.
    let _ = req.into_body().collect().await;
    if a.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(a.latency_ms)).await;
    }
    let mut failed = Vec::new();
    if let Some(out) = a.outbound {
        let results =
            futures::future::join_all(a.calls.iter().map(|c| down.call_with(out, c, &served)))
                .await;
        for (c, r) in a.calls.iter().zip(results) {
            if r != Outcome::Ok {
                failed.push(format!("{}={}", c.authority, r.label()));
            }
        }
    }
    let flaky = a.failure_rate > 0.0 && rand::random::<f64>() < a.failure_rate;
    let (ok, msg) = if flaky {
        (false, format!("{}: failing on purpose", a.name))
    } else if !failed.is_empty() {
        (
            false,
            format!("{}: downstream failed: {}", a.name, failed.join(", ")),
        )
    } else {
        (true, format!("{}: ok", a.name))
    };
    match (grpc, ok) {
        (true, true) => grpc_response(0, &msg),
        (true, false) => grpc_response(14, &msg),
        (false, ok) => {
            let mut r = Response::new(full(msg + "\n"));
            if !ok {
                *r.status_mut() = if flaky {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::BAD_GATEWAY
                };
            }
            r
        }
    }
}

/// The load generator's counters, by outcome.
#[derive(Default)]
struct LoadCounters {
    by_outcome: [AtomicU64; 5],
    /// Ticks skipped because too many requests were already in flight.
    skipped: AtomicU64,
}

/// Name of the load generator's request counter.
pub const LOAD_REQUESTS: &str = "trellis_demo_requests_total";
/// Name of the load generator's skipped-tick counter.
pub const LOAD_SKIPPED: &str = "trellis_demo_skipped_total";

/// Bound on requests in flight: at most this many; a tick beyond it is skipped and counted, so
/// a stalled target makes the generator slow down instead of piling up tasks.
const MAX_IN_FLIGHT: usize = 64;

async fn load(a: LoadArgs) -> anyhow::Result<()> {
    if !(a.rate.is_finite() && a.rate > 0.0 && a.rate <= 10_000.0) {
        anyhow::bail!("--rate must be above 0 and at most 10000");
    }
    let targets: Vec<SocketAddr> = match (a.via, a.direct.is_empty()) {
        (Some(v), true) => vec![v],
        (None, false) => a.direct.clone(),
        _ => anyhow::bail!("give exactly one of --via or --direct"),
    };
    let counters = Arc::new(LoadCounters::default());
    let metrics = TcpListener::bind(a.metrics)
        .await
        .map_err(|e| anyhow::anyhow!("bind {}: {e}", a.metrics))?;
    let mc = counters.clone();
    let target_label = a.target.authority.clone();
    let mode = if a.via.is_some() { "sidecar" } else { "direct" };
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = metrics.accept().await else {
                continue;
            };
            let mc = mc.clone();
            let target = target_label.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let text = render_load_metrics(&mc, &target, mode);
                    async move {
                        let mut r = Response::new(full(text));
                        r.headers_mut().insert(
                            "content-type",
                            HeaderValue::from_static(
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            ),
                        );
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let down = Arc::new(Downstream::with_pooling(a.via.is_some()));
    let sem = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / a.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: usize = 0;
    let mut targets = Arc::new(targets);
    let mut live = a.live_endpoints.clone().map(LiveEndpoints::new);
    let direct = a.via.is_none();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = term.recv() => break,
        }
        let Ok(permit) = sem.clone().try_acquire_owned() else {
            counters.skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        if let Some(now) = live.as_mut().and_then(LiveEndpoints::changed) {
            targets = now;
        }
        let first = n;
        n = n.wrapping_add(1);
        let (down, counters, call) = (down.clone(), counters.clone(), a.target.clone());
        let targets = targets.clone();
        tokio::spawn(async move {
            let mut outcome = Outcome::Connect;
            // Straight at pods, a refused connection moves on to the next address, as a
            // Service's virtual IP would only ever pick a live endpoint: `trellis dev` lists
            // every port a replica may be on, and during a rollout some are not listening.
            let tries = if direct { targets.len() } else { 1 };
            for k in 0..tries {
                let to = targets[(first + k) % targets.len()];
                outcome = if call.tcp {
                    tcp_call(to, &format!("GET item-{}", first % 100)).await
                } else {
                    down.call(to, &call).await
                };
                if outcome != Outcome::Connect {
                    break;
                }
            }
            let i = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(1);
            counters.by_outcome[i].fetch_add(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    // Stopping: the requests in flight finish (bounded), then the final counts are written.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        sem.acquire_many(MAX_IN_FLIGHT as u32),
    )
    .await;
    if let Some(path) = &a.final_counts {
        let text = render_load_metrics(&counters, &a.target.authority, mode);
        std::fs::write(path, text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// The `--live-endpoints` file, re-read when its modification time changes.
struct LiveEndpoints {
    path: std::path::PathBuf,
    seen: Option<std::time::SystemTime>,
}

impl LiveEndpoints {
    fn new(path: std::path::PathBuf) -> Self {
        Self { path, seen: None }
    }

    /// The new list when the file changed and holds a valid, non-empty one.
    fn changed(&mut self) -> Option<Arc<Vec<SocketAddr>>> {
        let modified = std::fs::metadata(&self.path).ok()?.modified().ok()?;
        if self.seen == Some(modified) {
            return None;
        }
        let text = std::fs::read_to_string(&self.path).ok()?;
        let list = parse_endpoints(&text)?;
        self.seen = Some(modified);
        Some(Arc::new(list))
    }
}

fn parse_endpoints(text: &str) -> Option<Vec<SocketAddr>> {
    let list: Vec<SocketAddr> = text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    (!list.is_empty()).then_some(list)
}

fn render_load_metrics(c: &LoadCounters, target: &str, mode: &str) -> String {
    let mut s = String::from(
        "# TYPE trellis_demo_requests counter\n# HELP trellis_demo_requests Requests sent by this \
         load generator, by outcome.\n",
    );
    for (i, o) in Outcome::ALL.iter().enumerate() {
        s.push_str(&format!(
            "{LOAD_REQUESTS}{{target=\"{target}\",mode=\"{mode}\",outcome=\"{}\"}} {}\n",
            o.label(),
            c.by_outcome[i].load(Ordering::Relaxed)
        ));
    }
    s.push_str(&format!(
        "# TYPE trellis_demo_skipped counter\n{LOAD_SKIPPED} {}\n# EOF\n",
        c.skipped.load(Ordering::Relaxed)
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A half-written or empty endpoints file never replaces the list in use.
    #[test]
    fn live_endpoints_take_only_a_whole_list() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("frontend.txt");
        let mut live = LiveEndpoints::new(path.clone());
        assert!(live.changed().is_none(), "no file yet");
        std::fs::write(&path, "127.0.0.1:1,127.0.0.1:2\n").unwrap();
        let list = live.changed().unwrap();
        assert_eq!(list.len(), 2);
        assert!(live.changed().is_none(), "unchanged file, no new list");
        assert!(parse_endpoints("127.0.0.1:1,127.0.0.").is_none());
        assert!(parse_endpoints(" \n").is_none());
    }

    /// The line protocol over real sockets: answers, failures on purpose, and a line too long
    /// closing the connection instead of growing a buffer.
    #[tokio::test]
    async fn the_line_protocol_answers_fails_and_bounds_lines() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let start = |name: &str, failure_rate: f64| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.set_nonblocking(true).unwrap();
            let addr = l.local_addr().unwrap();
            let a = ServeArgs {
                name: name.into(),
                listen: addr,
                grpc: false,
                tcp: true,
                failure_rate,
                latency_ms: 0,
                calls: vec![],
                outbound: None,
            };
            tokio::spawn(serve_lines(TcpListener::from_std(l).unwrap(), Arc::new(a)));
            addr
        };
        let (good, bad) = (start("cache-0", 0.0), start("cache-1", 1.0));
        assert_eq!(tcp_call(good, "GET a").await, Outcome::Ok);
        assert_eq!(tcp_call(bad, "GET a").await, Outcome::Error);
        let mut c = tokio::net::TcpStream::connect(good).await.unwrap();
        c.write_all(b"GET b\nGET c\n").await.unwrap();
        let mut r = tokio::io::BufReader::new(&mut c);
        assert_eq!(
            read_line(&mut r).await.unwrap().unwrap(),
            "OK cache-0: GET b"
        );
        assert_eq!(
            read_line(&mut r).await.unwrap().unwrap(),
            "OK cache-0: GET c"
        );
        let mut c = tokio::net::TcpStream::connect(good).await.unwrap();
        c.write_all(&[b'x'; 2 * MAX_LINE as usize]).await.unwrap();
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
            .await
            .expect("the server closes an overlong line's connection")
            .unwrap_or(0);
        assert_eq!(n, 0, "no answer to an overlong line: {rest:?}");
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert_eq!(tcp_call(closed, "GET a").await, Outcome::Connect);
    }

    #[test]
    fn calls_parse() {
        let c: Call = "catalog.shop:9080".parse().unwrap();
        assert_eq!(c.authority, "catalog.shop:9080");
        assert!(!c.grpc);
        let g: Call = "reviews.shop:9081:grpc".parse().unwrap();
        assert!(g.grpc);
        assert_eq!(g.authority, "reviews.shop:9081");
        let t: Call = "cache.shop:6379:tcp".parse().unwrap();
        assert!(t.tcp && !t.grpc);
        assert_eq!(t.authority, "cache.shop:6379");
        assert!("catalog:9080".parse::<Call>().is_err());
        assert!("catalog.shop".parse::<Call>().is_err());
    }

    /// A real server and a real downstream, over loopback: the caller's response reflects the
    /// downstream's failure, and gRPC answers carry trailers.
    #[tokio::test]
    async fn serve_calls_downstream_and_reports_failures() {
        async fn spawn(args: ServeArgs) {
            tokio::spawn(serve(args));
        }
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let (bad, good, front) = (free(), free(), free());
        spawn(ServeArgs {
            name: "bad-0".into(),
            listen: bad,
            grpc: true,
            tcp: false,
            failure_rate: 1.0,
            latency_ms: 0,
            calls: vec![],
            outbound: None,
        })
        .await;
        spawn(ServeArgs {
            name: "good-0".into(),
            listen: good,
            grpc: true,
            tcp: false,
            failure_rate: 0.0,
            latency_ms: 1,
            calls: vec![],
            outbound: None,
        })
        .await;
        // No sidecar here: the "outbound" is the downstream itself, which ignores the Host.
        spawn(ServeArgs {
            name: "front-0".into(),
            listen: front,
            grpc: false,
            tcp: false,
            failure_rate: 0.0,
            latency_ms: 0,
            calls: vec!["bad.ns:1:grpc".parse().unwrap()],
            outbound: Some(bad),
        })
        .await;
        let d = Downstream::new();
        let call = |g: bool| Call {
            authority: "x.ns:1".into(),
            grpc: g,
            tcp: false,
        };
        let mut outcome = Outcome::Connect;
        for _ in 0..50 {
            outcome = d.call(good, &call(true)).await;
            if outcome != Outcome::Connect {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(outcome, Outcome::Ok);
        assert_eq!(d.call(bad, &call(true)).await, Outcome::Error);
        assert_eq!(d.call(front, &call(false)).await, Outcome::Error);
        let closed = free();
        assert_eq!(d.call(closed, &call(false)).await, Outcome::Connect);
    }
}
