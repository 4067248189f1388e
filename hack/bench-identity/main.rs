//! Identity issuance benchmark (not run by CI). Build and run with `hack/bench-identity.sh`,
//! which pins the process to one core with `taskset`.
//!
//! Reports, against a baseline measured in the same run (one raw ECDSA P-256 signature over
//! a certificate-sized message, which is the floor of any issuance):
//! 1. issuance latency excluding the TokenReview (`IdentityService::issue_for`: CSR parse +
//!    signature check + policy + signing + PEM), p50/p99;
//! 2. 10 000 distinct workloads certified through the real HTTPS endpoint on loopback (TLS
//!    handshake, HTTP, JSON, TokenReview answered in-process without delay, issuance), with
//!    client and server sharing the one core.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use kube::client::Body;
use prometheus_client::registry::Registry;
use rcgen::SigningKey;
use tokio_util::sync::CancellationToken;
use trellis_operator::ca::serving::ServingCert;
use trellis_operator::ca::{CertificateAuthority, IssuerState};
use trellis_operator::identity::{
    Caller, IdentityConfig, IdentityMetrics, IdentityService, server,
};

const WORKLOADS: usize = 10_000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn report(name: &str, mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let (p50, p99) = (percentile(&samples, 0.50), percentile(&samples, 0.99));
    println!(
        "{name:<44} n={:<6} p50={:>9.1?} p99={:>9.1?} max={:>9.1?}",
        samples.len(),
        p50,
        p99,
        samples[samples.len() - 1]
    );
    (p50, p99)
}

/// A kube client whose only API is TokenReview: every token `tok-<n>` is the bound token of
/// `bench/sa-<n>`. Answers immediately, so the numbers exclude the API server round trip.
fn instant_token_reviews() -> kube::Client {
    let svc = tower::service_fn(|req: http::Request<Body>| async move {
        let body = req.into_body().collect_bytes().await.unwrap();
        let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let sa = sent["spec"]["token"]
            .as_str()
            .unwrap()
            .replace("tok-", "sa-");
        let answer = serde_json::json!({
            "kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {},
            "spec": {},
            "status": {"authenticated": true, "audiences": ["trellis"], "user": {
                "username": format!("system:serviceaccount:bench:{sa}"),
                "extra": {"authentication.kubernetes.io/pod-name": [format!("{sa}-pod")]}}}
        });
        Ok::<_, Infallible>(
            http::Response::builder()
                .status(201)
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap(),
        )
    });
    kube::Client::new(svc, "default")
}

fn csrs(n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let key = rcgen::KeyPair::generate().unwrap();
            rcgen::CertificateParams::default()
                .serialize_request(&key)
                .unwrap()
                .pem()
                .unwrap()
        })
        .collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    println!(
        "bench-identity: {} (release={})",
        jiff::Timestamp::now(),
        !cfg!(debug_assertions)
    );
    let ca = Arc::new(
        CertificateAuthority::generate(
            "cluster.local",
            Duration::from_secs(86400 * 365),
            SystemTime::now(),
        )
        .unwrap(),
    );
    let (_tx, issuer) = tokio::sync::watch::channel(Some(Arc::new(IssuerState {
        ca: ca.clone(),
        trust_bundle_pem: ca.roots_pem().to_string(),
        trust_domain: "cluster.local".into(),
        workload_ttl: Duration::from_secs(86400),
    })));
    let mut registry = Registry::default();
    let config = IdentityConfig {
        rate_burst: 1e9,
        rate_per_sec: 1e9,
        ..IdentityConfig::default()
    };
    let service = IdentityService::new(
        instant_token_reviews(),
        issuer,
        config,
        IdentityMetrics::register(&mut registry),
    );
    println!("generating {WORKLOADS} CSRs (client side, not timed)...");
    let requests = csrs(WORKLOADS);

    // Baseline: one ECDSA P-256 signature over a leaf-sized TBS.
    let key = rcgen::KeyPair::generate().unwrap();
    let msg = vec![0x5a_u8; 420];
    let mut base = Vec::with_capacity(WORKLOADS);
    for _ in 0..WORKLOADS {
        let t = Instant::now();
        std::hint::black_box(key.sign(&msg).unwrap());
        base.push(t.elapsed());
    }
    let (base_p50, base_p99) = report("baseline: raw ECDSA P-256 sign", base);

    // 1. Issuance excluding the TokenReview.
    let mut lat = Vec::with_capacity(WORKLOADS);
    let started = Instant::now();
    for (i, csr) in requests.iter().enumerate() {
        let caller = Caller {
            namespace: "bench".into(),
            service_account: format!("sa-{i}"),
            pod: format!("sa-{i}-pod"),
        };
        let t = Instant::now();
        let answer = service.issue_for(&caller, csr, SystemTime::now()).unwrap();
        lat.push(t.elapsed());
        std::hint::black_box(answer);
    }
    let issue_total = started.elapsed();
    let (p50, p99) = report("issue_for (no TokenReview)", lat);
    println!(
        "  -> p99 {:.2} ms (target < 5 ms); {:.1}x the raw-sign p99; p50 {:.1}x raw-sign p50; {WORKLOADS} in {:.2?} ({:.0}/s)",
        p99.as_secs_f64() * 1e3,
        p99.as_secs_f64() / base_p99.as_secs_f64(),
        p50.as_secs_f64() / base_p50.as_secs_f64(),
        issue_total,
        WORKLOADS as f64 / issue_total.as_secs_f64()
    );

    // 2. 10 000 workloads through the HTTPS endpoint, client and server on this one thread.
    let serving = ServingCert::new(vec!["127.0.0.1".into()], Duration::from_secs(3600));
    serving.refresh(&ca, SystemTime::now()).unwrap();
    let shutdown = CancellationToken::new();
    let (addr, task) = server::bind_and_serve(
        "127.0.0.1:0".parse().unwrap(),
        serving.server_config(&[b"http/1.1"]),
        service.clone(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let client_cfg = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let before = service.metrics().issued();
    let requests = Arc::new(requests);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (cfg, requests, next) = (client_cfg.clone(), requests.clone(), next.clone());
        workers.spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests.len() {
                    return lat;
                }
                let t = Instant::now();
                // A fresh connection per workload, as a starting sidecar does.
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(
                        rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(),
                        tcp,
                    )
                    .await
                    .unwrap();
                let (mut send, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                let body = serde_json::to_vec(&serde_json::json!({"csr": requests[i]})).unwrap();
                let resp = send
                    .send_request(
                        http::Request::post("/v1/certificate")
                            .header("host", "trellis-operator.trellis-system.svc")
                            .header("authorization", format!("Bearer tok-{i}"))
                            .body(Full::new(Bytes::from(body)))
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
                resp.into_body().collect().await.unwrap();
                lat.push(t.elapsed());
            }
        });
    }
    let mut all = Vec::new();
    while let Some(r) = workers.join_next().await {
        all.extend(r.unwrap());
    }
    let total = started.elapsed();
    let issued = service.metrics().issued() - before;
    assert_eq!(issued as usize, WORKLOADS);
    report("HTTPS request (new TLS conn, 32 in flight)", all);
    println!(
        "  -> {WORKLOADS} workloads certified over HTTPS in {:.2?} ({:.0}/s) on one core, client included (target < 10 s)",
        total,
        WORKLOADS as f64 / total.as_secs_f64()
    );
    shutdown.cancel();
    task.await.unwrap();
}
