//! Kubelet app probes through the proxy's admin port, against real applications: an in-process
//! proxy started with `TRELLIS_APP_PROBES`, real HTTP, HTTPS, TCP and gRPC health servers, and a
//! kubelet-style plain HTTP GET of the rewritten path.

mod common;
mod probe_support;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use probe_support::*;
use serde_json::json;
use trellis_proxy::config::MtlsMode;

async fn proxy_with_probes(probes: serde_json::Value) -> TestProxy {
    let pki = Pki::new("probes");
    let cfg = config("p1", inbound(MtlsMode::Strict), vec![]);
    TestProxy::start_with(&pki, &id("web"), &cfg, None, |o| {
        o.app_probes = probes.to_string().parse().unwrap();
    })
    .await
}

#[tokio::test]
async fn http_probes_report_the_apps_real_status() {
    let app = http_app().await.port();
    let tls_app = https_app().await.port();
    let down = closed_port().await;
    let proxy = proxy_with_probes(json!({
        "/app-health/web/readyz": {"httpGet": {"path": "/healthz?full=1", "port": app,
            "httpHeaders": [{"name": PROBE_HEADER.0, "value": PROBE_HEADER.1}]}},
        "/app-health/web/livez": {"httpGet": {"path": "/fail", "port": app}},
        "/app-health/web/startupz": {"httpGet": {"path": "/moved", "port": app}},
        "/app-health/nohdr/readyz": {"httpGet": {"path": "/healthz?full=1", "port": app}},
        "/app-health/source/readyz": {"httpGet": {"path": "/probe-source", "port": app}},
        "/app-health/tls/readyz": {"httpGet": {"path": "/healthz?full=1", "port": tls_app,
            "scheme": "HTTPS", "httpHeaders": [{"name": PROBE_HEADER.0, "value": PROBE_HEADER.1}]}},
        "/app-health/tls/livez": {"httpGet": {"path": "/fail", "port": tls_app, "scheme": "HTTPS"}},
        "/app-health/down/livez": {"httpGet": {"path": "/", "port": down}},
    }))
    .await;
    // Path, query and header reach the app: 200.
    let (s, body) = proxy.admin("GET", "/app-health/web/readyz").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(body.contains("app answered 200"), "{body}");
    // The app's failure is the kubelet's failure, with the app's own status.
    let (s, body) = proxy.admin("GET", "/app-health/web/livez").await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    // 3xx is success for the kubelet.
    assert_eq!(
        proxy.admin("GET", "/app-health/web/startupz").await.0,
        StatusCode::OK
    );
    // Without the probe's header the same path fails: the header really is sent.
    assert_eq!(
        proxy.admin("GET", "/app-health/nohdr/readyz").await.0,
        StatusCode::BAD_REQUEST
    );
    // Probes come from 127.0.0.6, the source the init rules exempt.
    let (s, body) = proxy.admin("GET", "/app-health/source/readyz").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    // HTTPS with a certificate for another name: not verified, as by the kubelet.
    let (s, body) = proxy.admin("GET", "/app-health/tls/readyz").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        proxy.admin("GET", "/app-health/tls/livez").await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    // App down: failure.
    let (s, body) = proxy.admin("GET", "/app-health/down/livez").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("connect"), "{body}");
}

#[tokio::test]
async fn tcp_and_grpc_probes() {
    let app = http_app().await.port();
    let grpc = grpc_health().await.port();
    let down = closed_port().await;
    let proxy = proxy_with_probes(json!({
        "/app-health/web/startupz": {"tcpSocket": {"port": app}},
        "/app-health/web/livez": {"tcpSocket": {"port": down}},
        "/app-health/grpc/readyz": {"grpc": {"port": grpc}},
        "/app-health/grpc/startupz": {"grpc": {"port": grpc, "service": "ready"}},
        "/app-health/grpc/livez": {"grpc": {"port": grpc, "service": "down"}},
        "/app-health/other/livez": {"grpc": {"port": grpc, "service": "unknown"}},
        "/app-health/h1/livez": {"grpc": {"port": app}},
        "/app-health/gone/livez": {"grpc": {"port": down}},
    }))
    .await;
    assert_eq!(
        proxy.admin("GET", "/app-health/web/startupz").await.0,
        StatusCode::OK
    );
    assert_eq!(
        proxy.admin("GET", "/app-health/web/livez").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    for (path, want, text) in [
        ("/app-health/grpc/readyz", StatusCode::OK, "SERVING"),
        ("/app-health/grpc/startupz", StatusCode::OK, "SERVING"),
        (
            "/app-health/grpc/livez",
            StatusCode::SERVICE_UNAVAILABLE,
            "NOT_SERVING",
        ),
        (
            "/app-health/other/livez",
            StatusCode::SERVICE_UNAVAILABLE,
            "grpc-status 5",
        ),
        // An HTTP/1-only server and a closed port are failures, not hangs.
        (
            "/app-health/h1/livez",
            StatusCode::SERVICE_UNAVAILABLE,
            "grpc",
        ),
        (
            "/app-health/gone/livez",
            StatusCode::SERVICE_UNAVAILABLE,
            "connect",
        ),
    ] {
        let (s, body) = proxy.admin("GET", path).await;
        assert_eq!(s, want, "{path}: {body}");
        assert!(body.contains(text), "{path}: {body}");
    }
}

#[tokio::test]
async fn a_probe_that_hangs_fails_within_its_timeout() {
    let hang = hanging_app().await.port();
    let proxy = proxy_with_probes(json!({
        "/app-health/web/livez": {"httpGet": {"path": "/", "port": hang}, "timeoutSeconds": 1},
        "/app-health/grpc/livez": {"grpc": {"port": hang}, "timeoutSeconds": 2},
    }))
    .await;
    for (path, timeout) in [
        ("/app-health/web/livez", Duration::from_secs(1)),
        ("/app-health/grpc/livez", Duration::from_secs(2)),
    ] {
        let started = Instant::now();
        let (s, body) = proxy.admin("GET", path).await;
        let took = started.elapsed();
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{path}: {body}");
        assert!(body.contains("no answer within"), "{path}: {body}");
        // Answered before the kubelet's own timeout, but not before the app had most of it.
        assert!(took < timeout, "{path}: took {took:?}");
        assert!(took >= timeout * 7 / 10, "{path}: gave up early, {took:?}");
    }
}

#[tokio::test]
async fn only_configured_probes_run() {
    let app = http_app().await.port();
    let proxy = proxy_with_probes(json!({
        "/app-health/web/readyz": {"tcpSocket": {"port": app}},
    }))
    .await;
    for path in [
        "/app-health/web/livez",
        "/app-health/other/readyz",
        "/app-health/",
        "/app-health/web/readyz/../livez",
    ] {
        let (s, _) = proxy.admin("GET", path).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
    }
    assert_eq!(
        proxy.admin("POST", "/app-health/web/readyz").await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    // The existing routes are unchanged.
    assert_eq!(proxy.admin("GET", "/live").await.0, StatusCode::OK);
}

#[test]
fn a_bad_probe_set_stops_the_proxy_with_every_problem() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trellis-proxy"))
        .env(
            "TRELLIS_APP_PROBES",
            r#"{"/app-health/web/readyz": {"tcpSocket": {"port": 0}},
                "/app-health/web/nope": {"tcpSocket": {"port": 80}}}"#,
        )
        .args(["--dir", "/nonexistent"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("TRELLIS_APP_PROBES") && err.contains("port 0") && err.contains("\"nope\""),
        "{err}"
    );
}
