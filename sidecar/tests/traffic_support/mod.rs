//! Real upstream HTTP servers (hyper, HTTP/1.1 and HTTP/2 on 127.0.0.1:0) that fail on command,
//! and config builders, for the traffic tests and their Dispatcher.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use trellis_proxy::config::*;
use trellis_proxy::traffic::{Body, BoxError, Dispatcher, Outcome, RequestCtx, full};

/// What a server does with one request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 with body `<port>:<request body length>`.
    Ok,
    Status(u16),
    /// Drops the connection without a response.
    Reset,
    /// Waits, then answers 200.
    Delay(Duration),
    /// HTTP 200, trailers-only gRPC response with this status.
    Grpc(u32),
    /// 200, one chunk of body, then the stream fails.
    StreamThenAbort,
}

pub struct Server {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
}

impl Server {
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Starts a server; `behave(n)` decides the reply to its n-th request (0-based). The server
/// lives as long as the test's runtime.
pub async fn serve(behave: impl Fn(u64) -> Reply + Send + Sync + 'static) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let behave = Arc::new(behave);
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let _ = stream.set_nodelay(true);
            let (h, behave) = (h.clone(), behave.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let n = h.fetch_add(1, Ordering::SeqCst);
                    let reply = behave(n);
                    async move { respond(addr, reply, req).await }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Server { addr, hits }
}

async fn respond(
    addr: SocketAddr,
    reply: Reply,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let len = req
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes()
        .len();
    let ok = || Response::new(full(format!("{}:{len}", addr.port())));
    Ok(match reply {
        Reply::Ok => ok(),
        Reply::Status(s) => {
            let mut r = ok();
            *r.status_mut() = StatusCode::from_u16(s).unwrap();
            r
        }
        Reply::Reset => return Err(std::io::Error::other("reset on command")),
        Reply::Delay(d) => {
            tokio::time::sleep(d).await;
            ok()
        }
        Reply::Grpc(code) => {
            let mut r = Response::new(full(Bytes::new()));
            r.headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
            r.headers_mut()
                .insert("grpc-status", code.to_string().parse().unwrap());
            r
        }
        Reply::StreamThenAbort => {
            let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, BoxError>>();
            tokio::spawn(async move {
                let _ = tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"first chunk"))));
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = tx.unbounded_send(Err(BoxError::from("aborted mid-stream on command")));
            });
            Response::new(BodyExt::boxed(StreamBody::new(rx)))
        }
    })
}

pub fn endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint {
        address: addr,
        identity: None,
        zone: None,
    }
}

pub fn service(
    name: &str,
    addrs: &[SocketAddr],
    protocol: Protocol,
    policy: Option<TrafficPolicy>,
) -> OutboundService {
    OutboundService {
        name: name.into(),
        namespace: "shop".into(),
        addresses: vec![],
        ports: vec![ServicePort {
            port: 80,
            name: None,
            protocol,
            endpoints: addrs.iter().copied().map(endpoint).collect(),
        }],
        identities: vec![],
        policy,
    }
}

pub fn config(outbound: Vec<OutboundService>) -> ProxyConfig {
    let cfg = ProxyConfig {
        version: CONFIG_VERSION,
        revision: "test".into(),
        namespace: "shop".into(),
        mesh: MeshSettings {
            trust_domain: "cluster.local".into(),
            identity_endpoint: None,
            telemetry: Telemetry::default(),
            skip_detection_ports: vec![],
            detect_timeout_ms: 100,
        },
        inbound: vec![],
        outbound,
    };
    cfg.validate().expect("test config is valid");
    cfg
}

pub fn retries(attempts: u32, on: &[RetryOn]) -> Retries {
    Retries {
        attempts,
        per_try_timeout_ms: None,
        retry_on: on.to_vec(),
        status_codes: vec![],
        grpc_codes: vec![],
        backoff_base_ms: 1,
        backoff_max_ms: 5,
        budget_percent: 100.0,
        min_retries_per_second: 1000,
        retry_non_idempotent: false,
    }
}

pub fn ctx() -> RequestCtx {
    RequestCtx {
        original_dst: "127.0.0.1:9".parse().unwrap(),
        source_ip: "127.0.0.1".parse().unwrap(),
    }
}

pub struct Answer {
    pub status: StatusCode,
    pub outcome: Outcome,
    pub body: Result<Bytes, BoxError>,
    pub headers: http::HeaderMap,
}

impl Answer {
    /// The port of the server that answered (from its body).
    pub fn port(&self) -> u16 {
        let b = self.body.as_ref().expect("body");
        std::str::from_utf8(b)
            .unwrap()
            .split(':')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }
}

pub async fn send(d: &Dispatcher, svc: &OutboundService, req: Request<Body>) -> Answer {
    send_ctx(d, svc, req, &ctx()).await
}

pub async fn send_ctx(
    d: &Dispatcher,
    svc: &OutboundService,
    req: Request<Body>,
    ctx: &RequestCtx,
) -> Answer {
    let (resp, outcome) = d.dispatch(svc, 80, req, ctx).await;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.map(|c| c.to_bytes());
    Answer {
        status,
        outcome,
        body,
        headers,
    }
}

pub fn get() -> Request<Body> {
    Request::builder()
        .uri("/")
        .header("host", "svc.shop")
        .body(full(Bytes::new()))
        .unwrap()
}
