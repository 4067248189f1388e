//! End to end: sidecar identity clients obtain certificates from a running identity endpoint
//! (TokenReviews answered by tower-test from recorded answers) and use them for mTLS through
//! the sidecar's own TLS configs, over real loopback sockets. Covers root rotation (overlap
//! and removal) and renewal of short-lived certificates under continuous traffic.

mod identity_support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use identity_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use trellis_operator::ca::{CertificateAuthority, IssuerState};
use trellis_operator::identity::IdentityConfig;
use trellis_proxy::creds::{self, CredentialsRx};
use trellis_proxy::identity::{ClientOptions, run_identity_client_with};
use trellis_proxy::tls;

const REVIEWS: &str = "spiffe://cluster.local/ns/shop/sa/reviews";
const RATINGS: &str = "spiffe://cluster.local/ns/shop/sa/ratings";

/// Answers every TokenReview until dropped: token `tok-<sa>` is the bound token of `shop/<sa>`;
/// anything else is denied.
fn answer_reviews(mut api: ApiServerVerifier) -> (tokio::task::JoinHandle<()>, Arc<AtomicU64>) {
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let task = tokio::spawn(async move {
        while let Some((request, send)) = api.0.next_request().await {
            assert_eq!(
                request.uri().path(),
                "/apis/authentication.k8s.io/v1/tokenreviews"
            );
            let body = request.into_body().collect_bytes().await.unwrap();
            let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(sent["spec"]["audiences"], serde_json::json!(["trellis"]));
            let answer = match sent["spec"]["token"].as_str().unwrap().strip_prefix("tok-") {
                Some(sa) => review_allowed("shop", sa),
                None => review_denied("[invalid bearer token]"),
            };
            c.fetch_add(1, Ordering::SeqCst);
            send.send_response(
                http::Response::builder()
                    .status(201)
                    .body(kube::client::Body::from(
                        serde_json::to_vec(&answer).unwrap(),
                    ))
                    .unwrap(),
            );
        }
    });
    (task, count)
}

/// A sidecar's projected volume: `token` and `ca.pem`.
fn pod_dir(sa: &str, bundle_pem: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), format!("tok-{sa}\n")).unwrap();
    std::fs::write(dir.path().join("ca.pem"), bundle_pem).unwrap();
    dir
}

fn fast() -> ClientOptions {
    ClientOptions {
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        // Never by polling: a bundle change must reach the client through its directory
        // watch (`sidecar()` gives it one), within the 5 s the tests wait, under the 10 s
        // safety poll.
        bundle_poll: Duration::from_secs(3600),
        ..ClientOptions::default()
    }
}

/// Starts an identity client for `dir` and waits for its first certificate.
async fn sidecar(url: &str, dir: &Path, shutdown: &CancellationToken) -> CredentialsRx {
    let (tx, mut rx) = creds::channel();
    tokio::spawn(run_identity_client_with(
        url.to_string(),
        dir.to_path_buf(),
        trellis_proxy::fswatch::spawn(vec![dir.to_path_buf()], shutdown.clone()),
        tx,
        shutdown.clone(),
        fast(),
    ));
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some))
        .await
        .expect("sidecar got no certificate")
        .unwrap();
    rx
}

/// An mTLS echo server that builds its config from the current credentials per connection.
async fn mtls_server(rx: CredentialsRx, shutdown: CancellationToken) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => a.unwrap(),
            };
            let Some(creds) = rx.borrow().clone() else {
                continue;
            };
            let cfg = tls::server_config(&creds, &[]).unwrap();
            tokio::spawn(async move {
                let Ok(mut s) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await else {
                    return;
                };
                let peer = tls::peer_spiffe_id(s.get_ref().1).unwrap_or_default();
                let mut b = [0u8; 4];
                if s.read_exact(&mut b).await.is_ok() {
                    let _ = s.write_all(format!("{peer}\n").as_bytes()).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    addr
}

/// One mTLS request from `client` to `server` expecting `server_id`; returns the ID the
/// server saw for us.
async fn mtls_call(
    client: &CredentialsRx,
    addr: std::net::SocketAddr,
    server_id: &str,
) -> Result<String, String> {
    let creds = client.borrow().clone().ok_or("no credentials")?;
    let cfg =
        tls::client_config(&creds, &[server_id.to_string()], &[]).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut s = tokio_rustls::TlsConnector::from(cfg)
        .connect(tls::mesh_server_name(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    if tls::peer_spiffe_id(s.get_ref().1).as_deref() != Some(server_id) {
        return Err("wrong server identity".into());
    }
    s.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .await
        .map_err(|e| e.to_string())?;
    if out.is_empty() {
        return Err("server closed without answering (refused our certificate)".into());
    }
    Ok(out.trim().to_string())
}

#[tokio::test]
async fn sidecars_get_certificates_and_complete_mtls() {
    let (ep, api) = start(Duration::from_secs(3600), IdentityConfig::default()).await;
    let (reviews_task, reviews) = answer_reviews(api);
    let shutdown = CancellationToken::new();
    let bundle = ep.bundle_pem();
    let (d1, d2) = (pod_dir("reviews", &bundle), pod_dir("ratings", &bundle));
    let a = sidecar(&ep.url, d1.path(), &shutdown).await;
    let b = sidecar(&ep.url, d2.path(), &shutdown).await;
    assert_eq!(a.borrow().as_ref().unwrap().spiffe_id, REVIEWS);
    assert_eq!(b.borrow().as_ref().unwrap().spiffe_id, RATINGS);
    let b_addr = mtls_server(b.clone(), shutdown.clone()).await;
    let a_addr = mtls_server(a.clone(), shutdown.clone()).await;
    assert_eq!(mtls_call(&a, b_addr, RATINGS).await.unwrap(), REVIEWS);
    assert_eq!(mtls_call(&b, a_addr, REVIEWS).await.unwrap(), RATINGS);
    // A client expecting another identity refuses the server.
    let err = mtls_call(&a, b_addr, "spiffe://cluster.local/ns/shop/sa/payments")
        .await
        .unwrap_err();
    assert!(err.contains("expected one of"), "{err}");
    assert_eq!(reviews.load(Ordering::SeqCst), 2);

    // A sidecar with a token the API server denies gets nothing and stays not ready.
    let d3 = pod_dir("x", &bundle);
    std::fs::write(d3.path().join("token"), "stolen").unwrap();
    let (tx, rx) = creds::channel();
    tokio::spawn(run_identity_client_with(
        ep.url.clone(),
        d3.path().to_path_buf(),
        trellis_proxy::fswatch::Changes::polling(),
        tx,
        shutdown.clone(),
        fast(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.borrow().is_none());
    assert!(reviews.load(Ordering::SeqCst) >= 3, "the client retried");
    assert_eq!(ep.service.metrics().issued(), 2);

    shutdown.cancel();
    ep.stop().await;
    reviews_task.abort();
}

#[tokio::test]
async fn root_rotation_overlap_then_removal() {
    let now = SystemTime::now();
    let old = Arc::new(
        CertificateAuthority::generate("cluster.local", Duration::from_secs(86400), now).unwrap(),
    );
    let new = Arc::new(
        CertificateAuthority::generate("cluster.local", Duration::from_secs(86400), now).unwrap(),
    );
    let (ep, api) = start_with(
        old.clone(),
        Duration::from_secs(3600),
        IdentityConfig::default(),
    )
    .await;
    let (reviews_task, _) = answer_reviews(api);
    let shutdown = CancellationToken::new();

    // Stage AddedNewRoot: the bundle has both roots, issuance still from the old one.
    let both = format!("{}{}", old.roots_pem(), new.roots_pem());
    ep.issuer.send_replace(Some(Arc::new(IssuerState {
        ca: old.clone(),
        trust_bundle_pem: both.clone(),
        trust_domain: "cluster.local".into(),
        workload_ttl: Duration::from_secs(3600),
    })));
    let d_old = pod_dir("reviews", &both);
    let a = sidecar(&ep.url, d_old.path(), &shutdown).await;
    // Stage IssuingFromNew: the new root signs.
    ep.issuer.send_replace(Some(Arc::new(IssuerState {
        ca: new.clone(),
        trust_bundle_pem: both.clone(),
        trust_domain: "cluster.local".into(),
        workload_ttl: Duration::from_secs(3600),
    })));
    let d_new = pod_dir("ratings", &both);
    let b = sidecar(&ep.url, d_new.path(), &shutdown).await;
    let issuer_of = |rx: &CredentialsRx| {
        let c = rx.borrow().clone().unwrap();
        let (_, x) =
            <x509_parser::prelude::X509Certificate as x509_parser::prelude::FromDer<_>>::from_der(
                &c.cert_chain[0],
            )
            .unwrap();
        x.issuer().to_string()
    };
    assert_ne!(issuer_of(&a), issuer_of(&b), "leaves from different roots");
    assert_eq!(a.borrow().as_ref().unwrap().roots.len(), 2);

    let a_addr = mtls_server(a.clone(), shutdown.clone()).await;
    let b_addr = mtls_server(b.clone(), shutdown.clone()).await;
    assert_eq!(
        mtls_call(&a, b_addr, RATINGS).await.unwrap(),
        REVIEWS,
        "old leaf -> new leaf"
    );
    assert_eq!(
        mtls_call(&b, a_addr, REVIEWS).await.unwrap(),
        RATINGS,
        "new leaf -> old leaf"
    );

    // Stage RemovedOldRoot: kubelet projects the new bundle; B's credentials follow ca.pem.
    std::fs::write(d_new.path().join("ca.pem"), new.roots_pem()).unwrap();
    let mut b_watch = b.clone();
    tokio::time::timeout(
        Duration::from_secs(5),
        b_watch.wait_for(|c| c.as_ref().is_some_and(|c| c.roots.len() == 1)),
    )
    .await
    .expect("bundle change not picked up")
    .unwrap();
    let err = mtls_call(&a, b_addr, RATINGS).await.unwrap_err();
    assert!(
        err.contains("UnknownCA") || err.contains("refused our certificate"),
        "old-root client refused by the new-only server: {err}"
    );
    let err = mtls_call(&b, a_addr, REVIEWS).await.unwrap_err();
    assert!(
        err.contains("UnknownIssuer"),
        "old-root server refused by the new-only client: {err}"
    );

    shutdown.cancel();
    ep.stop().await;
    reviews_task.abort();
}

#[tokio::test]
async fn short_lived_certificates_renew_without_failed_requests() {
    // 3 s certificates: renewal at ~2.1 s; 8 s of traffic spans three renewals.
    let (ep, api) = start(Duration::from_secs(3), IdentityConfig::default()).await;
    let (reviews_task, reviews) = answer_reviews(api);
    let shutdown = CancellationToken::new();
    let bundle = ep.bundle_pem();
    let (d1, d2) = (pod_dir("reviews", &bundle), pod_dir("ratings", &bundle));
    let a = sidecar(&ep.url, d1.path(), &shutdown).await;
    let b = sidecar(&ep.url, d2.path(), &shutdown).await;
    let b_addr = mtls_server(b.clone(), shutdown.clone()).await;

    let mut serials = std::collections::HashSet::new();
    let (mut ok, mut failed) = (0u32, Vec::new());
    let until = tokio::time::Instant::now() + Duration::from_secs(8);
    while tokio::time::Instant::now() < until {
        match mtls_call(&a, b_addr, RATINGS).await {
            Ok(id) if id == REVIEWS => ok += 1,
            Ok(other) => failed.push(other),
            Err(e) => failed.push(e),
        }
        serials.insert(a.borrow().as_ref().unwrap().cert_chain[0].clone());
        serials.insert(b.borrow().as_ref().unwrap().cert_chain[0].clone());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok > 100, "only {ok} requests");
    // Each sidecar renewed at least twice (initial + >= 2 renewals each).
    assert!(
        serials.len() >= 6,
        "only {} distinct certificates seen",
        serials.len()
    );
    assert!(reviews.load(Ordering::SeqCst) >= 6);

    shutdown.cancel();
    ep.stop().await;
    reviews_task.abort();
}
