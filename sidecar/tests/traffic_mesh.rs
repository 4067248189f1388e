//! The traffic layer inside the whole proxy: client -> proxy A (outbound, Dispatcher over the
//! core's mTLS pool) -> proxy B (inbound) -> a real upstream. One of the Service's endpoints
//! refuses connections: A retries elsewhere, ejects it, and counts both in its /metrics.

mod common;

use common::*;
use http::StatusCode;
use trellis_proxy::config::{
    Endpoint, MtlsMode, OutlierDetection, Protocol, Retries, RetryOn, TrafficPolicy,
};

#[tokio::test]
async fn retries_and_ejection_through_the_core_mtls_pool() {
    let pki = Pki::new("traffic-mesh");
    let up = upstream(Speaks::Http1Only).await;
    let b = TestProxy::start(
        &pki,
        &id("backend"),
        &config("b1", inbound(MtlsMode::Strict), vec![]),
        Some(up),
    )
    .await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut svc = service(
        "backend",
        8080,
        Protocol::Http1,
        b.running.inbound_addr,
        vec![id("backend")],
    );
    svc.ports[0].endpoints.push(Endpoint {
        address: dead,
        identity: None,
        zone: None,
    });
    svc.policy = Some(TrafficPolicy {
        source: "shop/backend".into(),
        retries: Some(Retries {
            attempts: 2,
            per_try_timeout_ms: None,
            retry_on: vec![RetryOn::ConnectFailure],
            status_codes: vec![],
            grpc_codes: vec![],
            backoff_base_ms: 1,
            backoff_max_ms: 5,
            budget_percent: 20.0,
            min_retries_per_second: 10,
            retry_non_idempotent: false,
        }),
        outlier_detection: Some(OutlierDetection {
            consecutive_failures: 1,
            base_ejection_ms: 30_000,
            max_ejection_percent: 50,
        }),
        ..Default::default()
    });
    let a = TestProxy::start(
        &pki,
        &id("web"),
        &config("a1", inbound(MtlsMode::Strict), vec![svc]),
        None,
    )
    .await;
    for _ in 0..20 {
        let (status, _, body) = h1_send(a.running.outbound_addr, get("backend.shop", "/echo"))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "{body:?}");
        assert_eq!(echo_json(&body)["path"], "/echo");
    }
    let m = a.metrics().await;
    let series = ["backend=\"backend.shop\""];
    let retries = metric_value(&m, &series, "trellis_proxy_traffic_retries_total").unwrap();
    assert!(
        (0.0..=1.0).contains(&retries),
        "at most one retry: the dead endpoint is ejected on its first refused connect ({m})"
    );
    assert_eq!(
        metric_value(&m, &series, "trellis_proxy_traffic_ejections_total"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, &series, "trellis_proxy_traffic_ejected_endpoints"),
        Some(1.0)
    );
}
