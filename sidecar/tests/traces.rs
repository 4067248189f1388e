//! Spans exported by real proxies to a real OTLP/gRPC receiver (the generated collector service
//! from `opentelemetry-proto`, served by tonic on loopback): client app → proxy A (client span)
//! → mTLS → proxy B (server span) → server app, with the ids checked across every hop.

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
use trellis_proxy::config::{MtlsMode, Protocol, ProxyConfig, TracingSettings};
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
        Some(up),
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
                vec![service(
                    "backend",
                    PORT,
                    Protocol::Http1,
                    b.running.inbound_addr,
                    vec![id("backend")],
                )],
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
    tokio::time::sleep(trellis_proxy::spans::export::BATCH_DELAY * 3).await;
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
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
