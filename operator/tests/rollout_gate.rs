//! The health gate against real sidecars: in-process `trellis-proxy`s (the sidecar's own
//! `run::start`, with the sidecar tests' PKI and config helpers) in front of real HTTP apps,
//! carrying real requests, and the gate reading their real admin `/metrics` over a window.
//! The old pod's window is the baseline; a new pod whose app answers 5xx must fail the gate,
//! a healthy one must pass.

#[path = "../../sidecar/tests/common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{Pki, TestProxy, config, get, h1_send, id, inbound};
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use trellis_operator::api::mesh::HealthGateSpec;
use trellis_operator::rollout::gate::{Direct, GateError, judge, measure};
use trellis_operator::rollout::observe::PodTarget;
use trellis_operator::rollout::plan::Verdict;
use trellis_proxy::config::MtlsMode;

const WINDOW: Duration = Duration::from_millis(1500);

/// An app on 127.0.0.1:0 answering every request with `status`.
async fn app(status: StatusCode) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from_static(b"app")))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A pod: a sidecar (plaintext allowed inbound, as for callers outside the mesh) in front of
/// an app answering `status`.
async fn pod(pki: &Pki, status: StatusCode) -> TestProxy {
    let app = app(status).await;
    TestProxy::start(
        pki,
        &id("catalog"),
        &config("r1", inbound(MtlsMode::Permissive), vec![]),
        Some(app),
    )
    .await
}

/// Callers sending requests to `pods`' inbound listeners until `stop`.
fn load(pods: Vec<SocketAddr>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u32> {
    tokio::spawn(async move {
        let mut sent = 0;
        while !stop.load(Ordering::Relaxed) {
            for p in &pods {
                h1_send(*p, get("catalog", "/")).await.unwrap();
                sent += 1;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sent
    })
}

fn target(name: &str, version: &str) -> PodTarget {
    PodTarget {
        namespace: "shop".into(),
        name: name.into(),
        ip: None,
        version: version.into(),
    }
}

struct Cluster {
    scraper: Direct,
    old: Vec<PodTarget>,
    new: Vec<PodTarget>,
    inbound: Vec<SocketAddr>,
    _proxies: Vec<TestProxy>,
}

/// Two old pods (healthy), and two new ones whose apps answer `new_status`.
async fn cluster(new_status: StatusCode) -> Cluster {
    let pki = Pki::new("gate-test");
    let mut proxies = Vec::new();
    let mut admins = std::collections::BTreeMap::new();
    let mut old = Vec::new();
    let mut new = Vec::new();
    for (i, status) in [StatusCode::OK, StatusCode::OK, new_status, new_status]
        .into_iter()
        .enumerate()
    {
        let p = pod(&pki, status).await;
        let name = format!("catalog-{i}");
        admins.insert(name.clone(), p.running.admin_addr);
        if i < 2 {
            old.push(target(&name, "proxy:v1"));
        } else {
            new.push(target(&name, "proxy:v2"));
        }
        proxies.push(p);
    }
    let inbound = proxies.iter().map(|p| p.running.inbound_addr).collect();
    let scraper = Direct::new(move |p: &PodTarget| admins.get(&p.name).copied());
    Cluster {
        scraper,
        old,
        new,
        inbound,
        _proxies: proxies,
    }
}

/// Baseline over the old pods, then the window over the new ones, under load throughout.
async fn gate(new_status: StatusCode) -> Verdict {
    let c = cluster(new_status).await;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(c.inbound.clone(), stop.clone());
    let baseline = measure(&c.scraper, &c.old, WINDOW).await.unwrap();
    let after = measure(&c.scraper, &c.new, WINDOW).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    assert!(traffic.await.unwrap() > 0);
    assert!(baseline.requests >= 20, "{baseline:?}");
    assert_eq!(baseline.success_rate, 1.0, "{baseline:?}");
    assert!(baseline.p99_seconds.is_some());
    assert!(after.requests >= 20, "{after:?}");
    judge(
        Some(&baseline),
        &after,
        &HealthGateSpec::default(),
        "1500ms",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_new_version_passes_the_gate() {
    assert_eq!(gate(StatusCode::OK).await, Verdict::Pass);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_answering_5xx_fails_the_gate() {
    let Verdict::Fail(why) = gate(StatusCode::SERVICE_UNAVAILABLE).await else {
        panic!("503s passed the gate");
    };
    assert!(why.contains("success rate 0.0 %"), "{why}");
    assert!(why.contains("baseline 100.0 %"), "{why}");
}

/// A new pod whose sidecar cannot be read cannot pass: the measurement fails and names it.
#[tokio::test]
async fn an_unreadable_sidecar_is_an_error_naming_the_pod() {
    let scraper = Direct::new(|_| Some("127.0.0.1:9".parse().unwrap()));
    let err = measure(&scraper, &[target("catalog-9", "proxy:v2")], WINDOW)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, GateError::Scrape { pod, .. } if pod == "shop/catalog-9"),
        "{err}"
    );
}
