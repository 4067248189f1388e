//! Shared by the identity tests: a running identity endpoint (real TCP on 127.0.0.1, real TLS
//! with a CA-issued serving certificate) whose TokenReviews are answered by an
//! `ApiServerVerifier` on `tower_test::mock::pair`, from recorded API server answers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use kube::client::Body;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use trellis_operator::ca::serving::ServingCert;
use trellis_operator::ca::{CertificateAuthority, IssuerState, IssuerTx};
use trellis_operator::identity::{IdentityConfig, IdentityMetrics, IdentityService, server};

pub type ApiHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Answers the API calls the code under test makes, in order, checking each one.
pub struct ApiServerVerifier(pub ApiHandle);

/// A TokenReview answer as the API server returns it for a projected (bound) token.
pub fn review_allowed(ns: &str, sa: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": {"token": "REDACTED", "audiences": ["trellis"]},
        "status": {
            "authenticated": true,
            "user": {
                "username": format!("system:serviceaccount:{ns}:{sa}"),
                "uid": "4b1a3c8e-6f0e-4a43-9d55-0d6f3a0e8d21",
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                "extra": {
                    "authentication.kubernetes.io/credential-id": ["JTI=2f4ec2a6-1b6a-4c9e-8e0f-3c1f0b7d9a11"],
                    "authentication.kubernetes.io/node-name": ["kind-worker"],
                    "authentication.kubernetes.io/node-uid": ["0c7c9f0e-0e4b-4c5c-9a55-6a4a2c1e9b77"],
                    "authentication.kubernetes.io/pod-name": [format!("{sa}-7d9f8c6b5-x2x9q")],
                    "authentication.kubernetes.io/pod-uid": ["e3b0c442-98fc-1c14-9afb-f4c8996fb924"]
                }
            },
            "audiences": ["trellis"]
        }
    })
}

/// The API server's answer for a token it cannot validate (bad signature, expired, revoked,
/// or minted for another audience: the apiserver's authenticator refuses those itself).
pub fn review_denied(error: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": {"token": "REDACTED", "audiences": ["trellis"]},
        "status": {"user": {}, "error": error}
    })
}

/// An authenticator that ignores the requested audiences (some webhook authenticators do):
/// authenticated, but the token's audience is the API server's.
pub fn review_other_audience(ns: &str, sa: &str) -> serde_json::Value {
    let mut v = review_allowed(ns, sa);
    v["status"]["audiences"] = serde_json::json!(["https://kubernetes.default.svc.cluster.local"]);
    v
}

/// A legacy Secret-based ServiceAccount token: authenticated, but not bound to a pod.
pub fn review_legacy_token(ns: &str, sa: &str) -> serde_json::Value {
    let mut v = review_allowed(ns, sa);
    v["status"]["user"]["extra"] = serde_json::json!({
        "authentication.kubernetes.io/credential-id": ["JTI=legacy"]
    });
    v
}

impl ApiServerVerifier {
    /// Expects one TokenReview create for `token` with audience `trellis`; answers `answer`.
    pub async fn token_review(&mut self, token: &str, answer: serde_json::Value) {
        let (request, send) = tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
            .await
            .expect("no TokenReview arrived")
            .expect("service dropped");
        assert_eq!(request.method(), http::Method::POST);
        assert_eq!(
            request.uri().path(),
            "/apis/authentication.k8s.io/v1/tokenreviews"
        );
        let body = request.into_body().collect_bytes().await.unwrap();
        let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(sent["kind"], "TokenReview");
        assert_eq!(sent["spec"]["token"], token);
        assert_eq!(sent["spec"]["audiences"], serde_json::json!(["trellis"]));
        send.send_response(
            Response::builder()
                .status(201)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap(),
        );
    }

    /// Asserts nothing else called the API.
    pub async fn no_more_calls(&mut self) {
        let next = tokio::time::timeout(Duration::from_millis(200), self.0.next_request()).await;
        assert!(next.is_err(), "unexpected extra API call");
    }
}

/// A running identity endpoint.
pub struct Endpoint {
    pub addr: SocketAddr,
    pub url: String,
    pub ca: Arc<CertificateAuthority>,
    pub issuer: IssuerTx,
    pub service: Arc<IdentityService>,
    pub registry: Registry,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    /// The trust bundle the endpoint and the sidecars use, PEM.
    pub fn bundle_pem(&self) -> String {
        self.issuer
            .borrow()
            .as_ref()
            .unwrap()
            .trust_bundle_pem
            .clone()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("endpoint did not stop")
            .unwrap();
    }
}

/// Starts an endpoint on 127.0.0.1:0 with a fresh CA, workload certificates `ttl` long.
pub async fn start(ttl: Duration, config: IdentityConfig) -> (Endpoint, ApiServerVerifier) {
    let ca = Arc::new(
        CertificateAuthority::generate(
            "cluster.local",
            Duration::from_secs(86400),
            SystemTime::now(),
        )
        .unwrap(),
    );
    start_with(ca, ttl, config).await
}

pub async fn start_with(
    ca: Arc<CertificateAuthority>,
    ttl: Duration,
    config: IdentityConfig,
) -> (Endpoint, ApiServerVerifier) {
    let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(mock, "default");
    let (issuer, issuer_rx) = tokio::sync::watch::channel(Some(Arc::new(IssuerState {
        ca: ca.clone(),
        trust_bundle_pem: ca.roots_pem().to_string(),
        trust_domain: "cluster.local".into(),
        workload_ttl: ttl,
    })));
    let mut registry = Registry::with_prefix("trellis");
    let metrics = IdentityMetrics::register(&mut registry);
    let service = IdentityService::new(client, issuer_rx, config, metrics);
    // The serving certificate names the address the tests dial (an IP SAN).
    let serving = ServingCert::new(vec!["127.0.0.1".into()], Duration::from_secs(3600));
    serving.refresh(&ca, SystemTime::now()).unwrap();
    let tls = serving.server_config(&[b"h2", b"http/1.1"]);
    let shutdown = CancellationToken::new();
    let (addr, task) = server::bind_and_serve(
        "127.0.0.1:0".parse().unwrap(),
        tls,
        service.clone(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    (
        Endpoint {
            addr,
            url: format!("https://127.0.0.1:{}", addr.port()),
            ca,
            issuer,
            service,
            registry,
            shutdown,
            task,
        },
        ApiServerVerifier(handle),
    )
}

/// POSTs `body` to the endpoint over real TLS, verifying its certificate against `bundle`.
pub async fn post(
    addr: SocketAddr,
    bundle_pem: &str,
    path: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    post_from(
        std::net::Ipv4Addr::LOCALHOST.into(),
        addr,
        bundle_pem,
        path,
        token,
        body,
    )
    .await
}

/// [`post`] from the source address `source` (any of 127.0.0.0/8 works on loopback): the
/// endpoint's per-source limit sees another pod.
pub async fn post_from(
    source: std::net::IpAddr,
    addr: SocketAddr,
    bundle_pem: &str,
    path: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    try_post_from(source, addr, bundle_pem, path, token, body)
        .await
        .expect("TLS to the identity endpoint")
}

/// [`post_from`], or `None` when the endpoint closes the connection before TLS completes (a
/// source over its connection cap).
pub async fn try_post_from(
    source: std::net::IpAddr,
    addr: SocketAddr,
    bundle_pem: &str,
    path: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Option<(u16, serde_json::Value)> {
    let tls = tls_from(source, addr, bundle_pem).await.ok()?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = Request::post(path)
        .header("host", "trellis-operator.trellis-system.svc")
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "application/json"
    );
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Some((status, serde_json::from_slice(&bytes).unwrap()))
}

/// A TLS connection to the endpoint from `source`, verifying its certificate against `bundle`.
pub async fn tls_from(
    source: std::net::IpAddr,
    addr: SocketAddr,
    bundle_pem: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = socket.connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(),
            tcp,
        )
        .await
}

/// A fresh P-256 key and a CSR for it asking for `sans` (URIs and DNS names).
pub fn csr(sans: &[&str]) -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = sans
        .iter()
        .map(|s| {
            if s.starts_with("spiffe://") {
                rcgen::SanType::URI((*s).try_into().unwrap())
            } else {
                rcgen::SanType::DnsName((*s).try_into().unwrap())
            }
        })
        .collect();
    let pem = p.serialize_request(&key).unwrap().pem().unwrap();
    (key, pem)
}

/// A JWT-shaped token whose payload says it expires `in_secs` from now (the signature is not
/// real: the recorded TokenReview answers decide whether it is valid).
pub fn jwt_expiring_in(in_secs: u64, nonce: &str) -> String {
    use base64::Engine as _;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let exp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + in_secs;
    format!(
        "{}.{}.c2lnbmF0dXJl",
        b64(serde_json::json!({"alg": "RS256", "kid": nonce})),
        b64(
            serde_json::json!({"aud": ["trellis"], "exp": exp, "sub": "system:serviceaccount:shop:reviews"})
        )
    )
}

pub fn body(csr: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "csr": csr })).unwrap()
}
