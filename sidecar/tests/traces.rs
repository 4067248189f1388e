//! Spans exported by real proxies to a real OTLP/gRPC receiver (the generated collector service
//! from `opentelemetry-proto`, served by tonic on loopback) and to a real OTLP/HTTP receiver (a
//! hyper server decoding the protobuf `ExportTraceServiceRequest` POSTed to it): client app →
//! proxy A (client span) → mTLS → proxy B (server span) → server app, with the ids checked
//! across every hop.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use http::{Request, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio::sync::mpsc;
use trellis_proxy::config::{
    MtlsMode, OutboundService, Protocol, ProxyConfig, Retries, RetryOn, Timeouts, TracingSettings,
    TrafficPolicy,
};
use trellis_proxy::spans::Pod;

const PORT: u16 = 8080;
const APP_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const APP_SPAN: &str = "00f067aa0ba902b7";

/// A span as received, flattened with its resource.
#[derive(Clone, Debug)]
struct Got {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    kind: i32,
    name: String,
    attrs: HashMap<String, String>,
    /// `(name, attributes)` of each span event, in order.
    events: Vec<(String, HashMap<String, String>)>,
    resource: HashMap<String, String>,
}

struct Receiver(mpsc::UnboundedSender<ExportTraceServiceRequest>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.0.send(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts an OTLP/gRPC receiver on loopback; returns its `host:port` and what it receives.
async fn collector() -> (String, mpsc::UnboundedReceiver<ExportTraceServiceRequest>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    (addr.to_string(), rx)
}

/// Starts an OTLP/HTTP receiver on loopback that takes protobuf bodies on `/v1/traces` (and
/// answers 404 elsewhere, so a wrong path shows as missing spans); returns its
/// `http://host:port/v1/traces` URL and what it receives.
async fn http_collector() -> (String, mpsc::UnboundedReceiver<ExportTraceServiceRequest>) {
    use http_body_util::BodyExt;
    use prost::Message;
    let (tx, rx) = mpsc::unbounded_channel();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let tx = tx.clone();
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let ok = req.method() == http::Method::POST
                            && req.uri().path() == "/v1/traces"
                            && req.headers()["content-type"] == "application/x-protobuf";
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let status = match ExportTraceServiceRequest::decode(body) {
                            Ok(decoded) if ok => {
                                let _ = tx.send(decoded);
                                StatusCode::OK
                            }
                            _ => StatusCode::NOT_FOUND,
                        };
                        let resp = ExportTraceServiceResponse {
                            partial_success: None,
                        };
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .header("content-type", "application/x-protobuf")
                                .body(http_body_util::Full::new(bytes::Bytes::from(
                                    resp.encode_to_vec(),
                                )))
                                .unwrap(),
                        )
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc),
            );
        }
    });
    (format!("http://{addr}/v1/traces"), rx)
}

fn flatten(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn spans_of(req: ExportTraceServiceRequest) -> Vec<Got> {
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let resource = flatten(&rs.resource.map(|r| r.attributes).unwrap_or_default());
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(Got {
                    trace_id: hex::encode(&s.trace_id),
                    span_id: hex::encode(&s.span_id),
                    parent_span_id: hex::encode(&s.parent_span_id),
                    kind: s.kind,
                    name: s.name.clone(),
                    attrs: flatten(&s.attributes),
                    events: s
                        .events
                        .iter()
                        .map(|e| (e.name.clone(), flatten(&e.attributes)))
                        .collect(),
                    resource: resource.clone(),
                });
            }
        }
    }
    out
}

/// Collects spans until `want` of them belong to `trace_id` (10 s at most).
async fn spans_for(
    rx: &mut mpsc::UnboundedReceiver<ExportTraceServiceRequest>,
    trace_id: &str,
    want: usize,
) -> Vec<Got> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < want {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(req)) => {
                got.extend(spans_of(req).into_iter().filter(|s| s.trace_id == trace_id))
            }
            _ => panic!(
                "only {} of {want} spans of {trace_id} arrived: {got:#?}",
                got.len()
            ),
        }
    }
    got
}

fn tracing_config(revision: &str, cfg: ProxyConfig, collector: &str, percent: f64) -> ProxyConfig {
    let mut cfg = cfg;
    cfg.revision = revision.into();
    cfg.mesh.telemetry.tracing = Some(TracingSettings {
        sampling_percent: percent,
        collector: collector.into(),
    });
    cfg
}

/// Client proxy A ("web") and server proxy B ("backend") in front of an echo app, both
/// exporting to `collector` at `percent`.
async fn pair(pki: &Pki, collector: &str, percent: f64) -> (TestProxy, TestProxy) {
    let up = upstream(Speaks::Http1Only).await;
    pair_with(pki, collector, percent, up, |b| {
        vec![service(
            "backend",
            PORT,
            Protocol::Http1,
            b,
            vec![id("backend")],
        )]
    })
    .await
}

/// [`pair`] with B in front of `app`, and A's outbound Services built around B's inbound
/// address.
async fn pair_with(
    pki: &Pki,
    collector: &str,
    percent: f64,
    app: SocketAddr,
    services: impl FnOnce(SocketAddr) -> Vec<OutboundService>,
) -> (TestProxy, TestProxy) {
    let pod = |name: &str| Pod {
        name: Some(name.into()),
        namespace: None,
        service_account: None,
    };
    let b = TestProxy::start_with(
        pki,
        &id("backend"),
        &tracing_config(
            "b1",
            config("b1", inbound(MtlsMode::Strict), vec![]),
            collector,
            percent,
        ),
        Some(app),
        |o| o.pod = pod("backend-1"),
    )
    .await;
    let a = TestProxy::start_with(
        pki,
        &id("web"),
        &tracing_config(
            "a1",
            config(
                "a1",
                inbound(MtlsMode::Strict),
                services(b.running.inbound_addr),
            ),
            collector,
            percent,
        ),
        None,
        |o| o.pod = pod("web-1"),
    )
    .await;
    (a, b)
}

fn request(traceparent: Option<&str>) -> Request<http_body_util::Full<bytes::Bytes>> {
    let mut b = Request::builder()
        .uri("/echo?token=secret")
        .header("host", format!("backend.shop:{PORT}"))
        .header("tracestate", "app=1");
    if let Some(tp) = traceparent {
        b = b.header("traceparent", tp);
    }
    b.body(Default::default()).unwrap()
}

/// The `traceparent` the server app received.
async fn send(a: &TestProxy, traceparent: Option<&str>) -> Option<String> {
    let (status, _, body) = h1_send(a.running.outbound_addr, request(traceparent))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body:?}");
    echo_json(&body)["headers"]["traceparent"]
        .as_str()
        .map(str::to_owned)
}

fn one(spans: &[Got], kind: SpanKind) -> &Got {
    let of: Vec<_> = spans.iter().filter(|s| s.kind == kind as i32).collect();
    assert_eq!(of.len(), 1, "one {kind:?} span: {spans:#?}");
    of[0]
}

#[tokio::test]
async fn one_trace_from_client_app_to_server_app_through_the_mtls_hop() {
    let pki = Pki::new("mesh");
    let (collector, mut rx) = collector().await;
    let (a, _b) = pair(&pki, &collector, 100.0).await;

    // The app's sampled trace is continued.
    let seen = send(&a, Some(&format!("00-{APP_TRACE}-{APP_SPAN}-01")))
        .await
        .unwrap();
    let spans = spans_for(&mut rx, APP_TRACE, 2).await;
    let client = one(&spans, SpanKind::Client);
    let server = one(&spans, SpanKind::Server);
    assert_eq!(
        client.parent_span_id, APP_SPAN,
        "the app's span is the client span's parent"
    );
    assert_eq!(
        server.parent_span_id, client.span_id,
        "server span is the client span's child"
    );
    assert_ne!(server.span_id, client.span_id);
    assert_eq!(
        seen,
        format!("00-{APP_TRACE}-{}-01", server.span_id),
        "the server app's parent is the server span"
    );

    // Semantic-convention attributes, with each side's verified peer.
    for s in [client, server] {
        assert_eq!(s.name, "GET");
        assert_eq!(s.attrs["http.request.method"], "GET");
        assert_eq!(s.attrs["url.path"], "/echo", "no query string in spans");
        assert_eq!(s.attrs["http.response.status_code"], "200");
        assert_eq!(s.attrs["server.address"], "backend.shop");
        assert_eq!(s.attrs["server.port"], PORT.to_string());
        assert_eq!(
            s.resource["service.name"], "test",
            "the workload's app label"
        );
        assert_eq!(s.resource["k8s.namespace.name"], "shop");
    }
    assert_eq!(client.attrs["trellis.peer.identity"], id("backend"));
    assert_eq!(server.attrs["trellis.peer.identity"], id("web"));
    assert_eq!(client.resource["k8s.pod.name"], "web-1");
    assert_eq!(server.resource["k8s.pod.name"], "backend-1");

    // Without a traceparent the client proxy starts a trace (100 %); the server proxy joins it.
    let seen = send(&a, None)
        .await
        .expect("a started trace reaches the app");
    let trace = seen[3..35].to_owned();
    assert_ne!(trace, APP_TRACE);
    let spans = spans_for(&mut rx, &trace, 2).await;
    let client = one(&spans, SpanKind::Client);
    let server = one(&spans, SpanKind::Server);
    assert_eq!(
        client.parent_span_id, "",
        "a started trace's first span is its root"
    );
    assert_eq!(server.parent_span_id, client.span_id);
    assert_eq!(seen, format!("00-{trace}-{}-01", server.span_id));
}

/// The same trace over OTLP/HTTP protobuf: the address's path selects the protocol (port 4318
/// does too, see `config::parse_collector`; a test cannot bind that port reliably).
#[tokio::test]
async fn otlp_http_receives_the_trace_with_its_parent_child_ids() {
    let pki = Pki::new("mesh");
    let (collector, mut rx) = http_collector().await;
    let (a, _b) = pair(&pki, &collector, 100.0).await;
    let seen = send(&a, Some(&format!("00-{APP_TRACE}-{APP_SPAN}-01")))
        .await
        .unwrap();
    let spans = spans_for(&mut rx, APP_TRACE, 2).await;
    let client = one(&spans, SpanKind::Client);
    let server = one(&spans, SpanKind::Server);
    assert_eq!(client.parent_span_id, APP_SPAN);
    assert_eq!(server.parent_span_id, client.span_id);
    assert_eq!(seen, format!("00-{APP_TRACE}-{}-01", server.span_id));
    assert_eq!(client.attrs["trellis.peer.identity"], id("backend"));
    assert_eq!(server.resource["k8s.pod.name"], "backend-1");
    assert_eq!(client.resource["service.name"], "test");
}

#[tokio::test]
async fn sampling_zero_exports_nothing_and_leaves_traceparent_alone() {
    let pki = Pki::new("mesh");
    let (collector, mut rx) = collector().await;
    let (a, _b) = pair(&pki, &collector, 0.0).await;

    assert_eq!(send(&a, None).await, None, "no trace started at 0 %");
    let unsampled = format!("00-{APP_TRACE}-{APP_SPAN}-00");
    assert_eq!(
        send(&a, Some(&unsampled)).await.as_deref(),
        Some(unsampled.as_str()),
        "an unsampled traceparent passes untouched"
    );
    // Past the batch delay: a span would have gone out by now.
    tokio::time::sleep(trellis_proxy::spans::export::BATCH_DELAY + Duration::from_secs(1)).await;
    if let Ok(req) = rx.try_recv() {
        panic!("exported at 0 %: {:#?}", spans_of(req));
    }

    // The receiver works: an app's sampled trace is honoured whatever the percentage.
    let other = "0af7651916cd43dd8448eb211c80319c";
    send(&a, Some(&format!("00-{other}-{APP_SPAN}-01"))).await;
    assert_eq!(spans_for(&mut rx, other, 2).await.len(), 2);
}

#[tokio::test]
async fn a_dead_collector_fails_no_request_and_counts_drops() {
    let pki = Pki::new("mesh");
    // A port nobody listens on: every export is refused.
    let dead: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (a, b) = pair(&pki, &dead.to_string(), 100.0).await;
    for _ in 0..20 {
        assert!(send(&a, None).await.is_some());
    }
    let dropped = |text: &str| metric_value(text, &[], "trellis_proxy_spans_dropped_total");
    // Generous: the loop ends as soon as both counts are in; on a loaded CI machine a batch
    // (2 s delay) and its refused export have taken longer than 20 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (ma, mb) = (a.metrics().await, b.metrics().await);
        if dropped(&ma) == Some(20.0) && dropped(&mb) == Some(20.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "drops not counted: {:?} {:?}",
            dropped(&ma),
            dropped(&mb)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_stopping_proxy_sends_its_last_spans_before_it_returns() {
    let pki = Pki::new("mesh");
    let (collector, mut rx) = collector().await;
    let (a, b) = pair(&pki, &collector, 100.0).await;
    let seen = send(&a, None).await.unwrap();
    let trace = seen[3..35].to_owned();
    // Stop both at once, well within the export batch delay: the spans are still queued.
    for p in [&a, &b] {
        p.running.shutdown.trigger();
    }
    tokio::join!(
        a.running.wait(Duration::from_secs(2)),
        b.running.wait(Duration::from_secs(2))
    );
    // Once `wait` returned (the process would exit now), both spans are at the collector.
    let mut got = Vec::new();
    while let Ok(req) = rx.try_recv() {
        got.extend(spans_of(req).into_iter().filter(|s| s.trace_id == trace));
    }
    assert_eq!(got.len(), 2, "spans lost at exit: {got:#?}");
}

/// An app that fails on purpose, each path once: `/flaky` answers its first request 503 and
/// `/hang` its first after 3 s; later requests get 200 at once. `/stuck` always takes 3 s.
async fn flaky_app() -> SocketAddr {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let flaky = Arc::new(AtomicU32::new(0));
    let hang = Arc::new(AtomicU32::new(0));
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let (flaky, hang) = (flaky.clone(), hang.clone());
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (flaky, hang) = (flaky.clone(), hang.clone());
                    async move {
                        let status = match req.uri().path() {
                            "/flaky" if flaky.fetch_add(1, Ordering::SeqCst) == 0 => {
                                StatusCode::SERVICE_UNAVAILABLE
                            }
                            "/hang" if hang.fetch_add(1, Ordering::SeqCst) == 0 => {
                                tokio::time::sleep(Duration::from_secs(3)).await;
                                StatusCode::OK
                            }
                            "/stuck" => {
                                tokio::time::sleep(Duration::from_secs(3)).await;
                                StatusCode::OK
                            }
                            _ => StatusCode::OK,
                        };
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(http_body_util::Full::new(bytes::Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc),
            );
        }
    });
    addr
}

/// Waits (10 s at most) for the client span of `trace_id`.
async fn client_span(
    rx: &mut mpsc::UnboundedReceiver<ExportTraceServiceRequest>,
    trace_id: &str,
) -> (Got, Vec<Got>) {
    let mut got: Vec<Got> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(c) = got.iter().find(|s| s.kind == SpanKind::Client as i32) {
            return (c.clone(), got);
        }
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(req)) => {
                got.extend(spans_of(req).into_iter().filter(|s| s.trace_id == trace_id))
            }
            _ => panic!("no client span of {trace_id}: {got:#?}"),
        }
    }
}

async fn status_of(a: &TestProxy, host: &str, path: &str, trace: &str) -> StatusCode {
    let req = Request::builder()
        .uri(path)
        .header("host", format!("{host}:{PORT}"))
        .header("traceparent", format!("00-{trace}-{APP_SPAN}-01"))
        .body(Default::default())
        .unwrap();
    h1_send(a.running.outbound_addr, req).await.unwrap().0
}

fn ev(e: &(String, HashMap<String, String>)) -> (&str, Vec<(&str, &str)>) {
    let mut attrs: Vec<_> = e.1.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    attrs.sort();
    (e.0.as_str(), attrs)
}

/// Through real proxies and a real app that fails once: a retried 503, a per-try timeout that
/// is retried, and a request timeout each show on the client span as events, with the attempt
/// and the reason.
#[tokio::test]
async fn retries_and_timeouts_show_as_events_on_the_client_span() {
    let pki = Pki::new("mesh");
    let (collector, mut rx) = collector().await;
    let app = flaky_app().await;
    let with_policy = |name: &str, b: SocketAddr, policy: TrafficPolicy| OutboundService {
        policy: Some(policy),
        ..service(name, PORT, Protocol::Http1, b, vec![id("backend")])
    };
    let (a, _b) = pair_with(&pki, &collector, 100.0, app, |b| {
        vec![
            with_policy(
                "backend",
                b,
                TrafficPolicy {
                    source: "shop/retry".into(),
                    retries: Some(Retries {
                        attempts: 3,
                        per_try_timeout_ms: Some(300),
                        retry_on: vec![RetryOn::GatewayError],
                        status_codes: vec![],
                        grpc_codes: vec![],
                        backoff_base_ms: 1,
                        backoff_max_ms: 5,
                        budget_percent: 100.0,
                        min_retries_per_second: 1000,
                        retry_non_idempotent: false,
                    }),
                    ..Default::default()
                },
            ),
            with_policy(
                "deadline",
                b,
                TrafficPolicy {
                    source: "shop/deadline".into(),
                    timeouts: Timeouts {
                        request_ms: Some(300),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            ),
        ]
    })
    .await;

    // A 503, retried: one retry event on the client span; both attempts reached B, whose
    // server spans are both children of the client span.
    let t1 = "11111111111111111111111111111111";
    assert_eq!(
        status_of(&a, "backend.shop", "/flaky", t1).await,
        StatusCode::OK
    );
    let spans = spans_for(&mut rx, t1, 3).await;
    let client = one(&spans, SpanKind::Client);
    assert_eq!(
        client.events.iter().map(ev).collect::<Vec<_>>(),
        vec![(
            "retry",
            vec![
                ("trellis.attempt", "1"),
                ("trellis.retry.reason", "status-503")
            ]
        )]
    );
    assert_eq!(client.attrs["trellis.attempts"], "2");
    assert_eq!(client.attrs["http.request.resend_count"], "1");
    let mut server_statuses: Vec<_> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32)
        .inspect(|s| assert_eq!(s.parent_span_id, client.span_id))
        .map(|s| s.attrs["http.response.status_code"].clone())
        .collect();
    server_statuses.sort();
    assert_eq!(server_statuses, ["200", "503"]);

    // The first attempt hangs past the per-try timeout: a timeout event, then the retry.
    let t2 = "22222222222222222222222222222222";
    assert_eq!(
        status_of(&a, "backend.shop", "/hang", t2).await,
        StatusCode::OK
    );
    let (client, _) = client_span(&mut rx, t2).await;
    assert_eq!(
        client.events.iter().map(ev).collect::<Vec<_>>(),
        vec![
            (
                "timeout",
                vec![
                    ("trellis.attempt", "1"),
                    ("trellis.timeout.kind", "per-try"),
                    ("trellis.timeout.ms", "300")
                ]
            ),
            (
                "retry",
                vec![
                    ("trellis.attempt", "1"),
                    ("trellis.retry.reason", "per-try-timeout")
                ]
            ),
        ]
    );
    assert_eq!(client.attrs["http.response.status_code"], "200");

    // The request timeout ends the request: 504 and a timeout event.
    let t3 = "33333333333333333333333333333333";
    assert_eq!(
        status_of(&a, "deadline.shop", "/stuck", t3).await,
        StatusCode::GATEWAY_TIMEOUT
    );
    let (client, _) = client_span(&mut rx, t3).await;
    assert_eq!(
        client.events.iter().map(ev).collect::<Vec<_>>(),
        vec![(
            "timeout",
            vec![
                ("trellis.attempt", "1"),
                ("trellis.timeout.kind", "request"),
                ("trellis.timeout.ms", "300")
            ]
        )]
    );
    assert_eq!(client.attrs["trellis.response_flags"], "UT");
    assert!(!client.attrs.contains_key("trellis.attempts"));
}
