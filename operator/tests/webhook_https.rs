//! The injection webhook served over real HTTPS on 127.0.0.1, called with real AdmissionReview
//! v1 documents, including every kind of bad input.
mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::{Value, json};
use support::net::closed_within;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use trellis_operator::inject::{InjectContext, default_mesh};
use trellis_operator::webhook::{
    Injector, NamespaceLabels, ServeOptions, WebhookMetrics, serve_on,
};

const SAN: &str = "trellis-operator.trellis-system.svc";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA and a serving certificate for the operator Service name, signed by it.
struct Pki {
    ca_der: CertificateDer<'static>,
    server: Arc<rustls::ServerConfig>,
}

fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "trellis test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![SAN.to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    Pki {
        ca_der: ca.der().clone(),
        server: Arc::new(server),
    }
}

struct Harness {
    addr: SocketAddr,
    pki: Pki,
    tls_tx: watch::Sender<Arc<rustls::ServerConfig>>,
    registry: Registry,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn start() -> Harness {
        Self::start_with(|_| {}).await
    }

    async fn start_with(tune: impl FnOnce(&mut ServeOptions)) -> Harness {
        let pki = pki();
        let (tls_tx, tls_rx) = watch::channel(pki.server.clone());
        // The operator's own registry, so the names asserted are the names Prometheus scrapes.
        let mut registry = trellis_operator::runtime::new_registry();
        let metrics = WebhookMetrics::register(&mut registry);
        let namespaces: NamespaceLabels = BTreeMap::from([
            (
                "shop".to_string(),
                BTreeMap::from([("trellis.dev/inject".to_string(), "enabled".to_string())]),
            ),
            ("plain".to_string(), BTreeMap::new()),
        ]);
        let (_mesh_tx, mesh_rx) = watch::channel(default_mesh());
        let (_ns_tx, ns_rx) = watch::channel(Arc::new(namespaces));
        let injector = Injector {
            mesh: mesh_rx,
            namespaces: ns_rx,
            ctx: InjectContext::default(),
            metrics,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let opts = ServeOptions {
            body_timeout: Duration::from_millis(300),
            header_timeout: Duration::from_millis(500),
            handshake_timeout: Duration::from_millis(500),
            drain_timeout: Duration::from_secs(1),
            ..ServeOptions::default()
        };
        let mut opts = opts;
        tune(&mut opts);
        let server = tokio::spawn(serve_on(listener, tls_rx, injector, opts, shutdown.clone()));
        Harness {
            addr,
            pki,
            tls_tx,
            registry,
            shutdown,
            server,
        }
    }

    async fn tls(
        &self,
        ca: &CertificateDer<'static>,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, std::io::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(SAN).unwrap(), tcp)
            .await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: BoxBody<Bytes, Infallible>,
    ) -> (StatusCode, String) {
        let tls = self.tls(&self.pki.ca_der).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", SAN)
            .header("content-type", "application/json")
            .body(body)
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
            .await
            .expect("webhook hung")
            .unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    async fn post(&self, body: impl Into<Bytes>) -> (StatusCode, String) {
        self.send(Method::POST, "/inject", Full::new(body.into()).boxed())
            .await
    }

    async fn post_review(&self, review: &Value) -> Value {
        let (status, body) = self.post(serde_json::to_vec(review).unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(3), self.server)
            .await
            .expect("server did not stop")
            .unwrap();
    }
}

const UID: &str = "705ab4f5-6393-11e8-b7cc-42010a800002";

/// An AdmissionReview as the API server sends it for a pod CREATE.
fn review(api_version: &str, kind: &str, namespace: &str, object: Value) -> Value {
    let resource = format!("{}s", kind.to_lowercase());
    json!({
        "apiVersion": api_version,
        "kind": "AdmissionReview",
        "request": {
            "uid": UID,
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": resource},
            "requestKind": {"group": "", "version": "v1", "kind": kind},
            "requestResource": {"group": "", "version": "v1", "resource": resource},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "groups": ["system:serviceaccounts", "system:authenticated"]
            },
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    })
}

fn plain_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-5d8f7", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {
            "serviceAccountName": "web",
            "containers": [{"name": "web", "image": "nginx:1.27", "ports": [{"containerPort": 8080}]}]
        }
    })
}

fn allowed_unchanged(uid: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": uid, "allowed": true}
    })
}

#[tokio::test]
async fn injects_with_a_base64_json_patch() {
    let h = Harness::start().await;
    let (status, body) = h
        .post(
            serde_json::to_vec(&review("admission.k8s.io/v1", "Pod", "shop", plain_pod())).unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // The golden patch of the same pod, compact, base64: exactly what the API server wants.
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/inject/plain.patch.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let b64 =
        base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&golden).unwrap());
    let expected = format!(
        r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{{"allowed":true,"patch":"{b64}","patchType":"JSONPatch","uid":"{UID}"}}}}"#
    );
    assert_eq!(body, expected);
    // And the patch decodes to a JSON Patch array (not kube's array of numbers).
    let v: Value = serde_json::from_str(&body).unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(v["response"]["patch"].as_str().unwrap())
        .unwrap();
    let patch: Value = serde_json::from_slice(&decoded).unwrap();
    assert_eq!(patch[0]["op"], "add");
    assert!(
        h.metrics()
            .contains("trellis_operator_injector_injections_total 1"),
        "{}",
        h.metrics()
    );
    h.stop().await;
}

/// A probe on the serving port is rewritten to the proxy without a word (nothing leaves the
/// mesh); a probe the injector cannot rewrite comes back as an admission warning.
#[tokio::test]
async fn probe_warnings_are_returned() {
    let h = Harness::start().await;
    let mut pod = plain_pod();
    pod["spec"]["containers"][0]["readinessProbe"] =
        json!({"httpGet": {"path": "/", "port": 8080}});
    let v = h
        .post_review(&review("admission.k8s.io/v1", "Pod", "shop", pod.clone()))
        .await;
    assert_eq!(v["response"]["allowed"], true);
    assert!(v["response"].get("warnings").is_none(), "{v}");
    pod["spec"]["containers"][0]["livenessProbe"] = json!({"tcpSocket": {"port": "no-such-port"}});
    let v = h
        .post_review(&review("admission.k8s.io/v1", "Pod", "shop", pod))
        .await;
    assert_eq!(v["response"]["allowed"], true);
    let warning = v["response"]["warnings"][0].as_str().unwrap();
    assert!(
        warning.contains("livenessProbe") && warning.contains("no-such-port"),
        "{warning}"
    );
    h.stop().await;
}

#[tokio::test]
async fn malformed_json_is_http_400() {
    let h = Harness::start().await;
    let (status, body) = h
        .post(r#"{"apiVersion": "admission.k8s.io/v1", "kind": "Admiss"#)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("request body is not JSON"), "{body}");
    // Truncated JSON with a readable uid: a denial the API server can show.
    let (status, body) = h
        .post(format!(r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"{UID}","kind":{{"#))
        .await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["response"]["uid"], UID);
    assert_eq!(v["response"]["allowed"], false);
    assert!(
        v["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("not JSON")
    );
    // JSON, but no uid to answer to.
    let (status, body) = h
        .post(r#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}"#)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("request.uid is missing"), "{body}");
    assert!(
        h.metrics()
            .contains(r#"trellis_operator_injector_denials_total{reason="malformed"} 3"#),
        "{}",
        h.metrics()
    );
    h.stop().await;
}

#[tokio::test]
async fn malformed_pod_is_denied_with_its_uid() {
    let h = Harness::start().await;
    let mut pod = plain_pod();
    pod["spec"]["containers"] = json!("not a list");
    let v = h
        .post_review(&review("admission.k8s.io/v1", "Pod", "shop", pod))
        .await;
    assert_eq!(v["response"]["uid"], UID);
    assert_eq!(v["response"]["allowed"], false);
    assert_eq!(v["response"]["status"]["code"], 400);
    let msg = v["response"]["status"]["message"].as_str().unwrap();
    assert!(msg.contains("not a valid Pod"), "{msg}");
    // A request that is not a well-formed AdmissionRequest at all (operation unknown).
    let mut r = review("admission.k8s.io/v1", "Pod", "shop", plain_pod());
    r["request"]["operation"] = json!("EXPLODE");
    let v = h.post_review(&r).await;
    assert_eq!(v["response"]["allowed"], false);
    assert!(
        v["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("malformed AdmissionReview")
    );
    h.stop().await;
}

#[tokio::test]
async fn non_pods_and_out_of_scope_pods_are_allowed_unchanged() {
    let h = Harness::start().await;
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"ports": [{"port": 80}]}
    });
    assert_eq!(
        h.post_review(&review("admission.k8s.io/v1", "Service", "shop", service))
            .await,
        allowed_unchanged(UID)
    );
    // Namespace not selected.
    let mut pod = plain_pod();
    pod["metadata"]["namespace"] = json!("plain");
    assert_eq!(
        h.post_review(&review("admission.k8s.io/v1", "Pod", "plain", pod))
            .await,
        allowed_unchanged(UID)
    );
    // Operator's namespace.
    assert_eq!(
        h.post_review(&review(
            "admission.k8s.io/v1",
            "Pod",
            "trellis-system",
            plain_pod()
        ))
        .await,
        allowed_unchanged(UID)
    );
    let m = h.metrics();
    assert!(
        m.contains(r#"trellis_operator_injector_skips_total{reason="not_a_pod"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"trellis_operator_injector_skips_total{reason="namespace_not_selected"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"trellis_operator_injector_skips_total{reason="excluded_namespace"} 1"#),
        "{m}"
    );
    h.stop().await;
}

#[tokio::test]
async fn already_injected_pod_is_allowed_unchanged() {
    let h = Harness::start().await;
    // Inject once through the webhook, apply the patch, send the result again.
    let first = h
        .post_review(&review("admission.k8s.io/v1", "Pod", "shop", plain_pod()))
        .await;
    let patch: json_patch::Patch = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(first["response"]["patch"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let mut injected = plain_pod();
    json_patch::patch(&mut injected, &patch).unwrap();
    assert_eq!(
        h.post_review(&review("admission.k8s.io/v1", "Pod", "shop", injected))
            .await,
        allowed_unchanged(UID)
    );
    assert!(
        h.metrics()
            .contains(r#"trellis_operator_injector_skips_total{reason="already_injected"} 1"#)
    );
    h.stop().await;
}

#[tokio::test]
async fn unknown_review_versions_are_denied_clearly() {
    let h = Harness::start().await;
    for version in ["admission.k8s.io/v1beta1", "admission.k8s.io/v2"] {
        let v = h
            .post_review(&review(version, "Pod", "shop", plain_pod()))
            .await;
        assert_eq!(v["apiVersion"], version, "answer in the caller's version");
        assert_eq!(v["response"]["uid"], UID);
        assert_eq!(v["response"]["allowed"], false);
        let msg = v["response"]["status"]["message"].as_str().unwrap();
        assert!(
            msg.contains("unsupported AdmissionReview version") && msg.contains(version),
            "{msg}"
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn bad_annotations_are_denied_with_the_reason() {
    let h = Harness::start().await;
    let mut pod = plain_pod();
    pod["metadata"]["annotations"] = json!({"trellis.dev/exclude-outbound-ports": "http"});
    let v = h
        .post_review(&review("admission.k8s.io/v1", "Pod", "shop", pod))
        .await;
    assert_eq!(v["response"]["allowed"], false);
    let msg = v["response"]["status"]["message"].as_str().unwrap();
    assert!(
        msg.contains("trellis.dev/exclude-outbound-ports") && msg.contains("http"),
        "{msg}"
    );
    assert!(
        h.metrics()
            .contains(r#"trellis_operator_injector_denials_total{reason="bad_annotation"} 1"#)
    );
    h.stop().await;
}

#[tokio::test]
async fn huge_bodies_are_refused_without_buffering() {
    let h = Harness::start().await;
    // Declared length over the limit: refused from the headers.
    let (status, body) = h.post(vec![b' '; 4 * 1024 * 1024]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    // No length declared (chunked): refused once the limit is crossed.
    let chunks =
        (0..64).map(|_| Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b' '; 64 * 1024]))));
    let stream = StreamBody::new(futures::stream::iter(chunks));
    let (status, _) = h
        .send(Method::POST, "/inject", BodyExt::boxed(stream))
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        h.metrics()
            .contains(r#"trellis_operator_injector_denials_total{reason="too_large"} 2"#)
    );
    h.stop().await;
}

#[tokio::test]
async fn wrong_path_and_method() {
    let h = Harness::start().await;
    assert_eq!(h.post_to("/mutate").await, StatusCode::NOT_FOUND);
    let (status, _) = h
        .send(Method::GET, "/inject", Full::new(Bytes::new()).boxed())
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    h.stop().await;
}

impl Harness {
    async fn post_to(&self, path: &str) -> StatusCode {
        self.send(
            Method::POST,
            path,
            Full::new(Bytes::from_static(b"{}")).boxed(),
        )
        .await
        .0
    }
}

/// A client that sends headers promising a body and then stalls gets 408, not a hung task.
#[tokio::test]
async fn stalled_body_times_out() {
    let h = Harness::start().await;
    let mut tls = h.tls(&h.pki.ca_der).await.unwrap();
    tls.write_all(
        format!("POST /inject HTTP/1.1\r\nhost: {SAN}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .expect("server never answered a stalled body")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    h.stop().await;
}

/// A new serving certificate (another CA here) is used for new connections without restarting.
#[tokio::test]
async fn rotated_certificate_is_served_without_restart() {
    let h = Harness::start().await;
    // Served with the first certificate (an empty object is a 400, but it was answered).
    assert_eq!(h.post_to("/inject").await, StatusCode::BAD_REQUEST);
    let rotated = pki();
    h.tls_tx.send(rotated.server.clone()).unwrap();
    // The old CA no longer verifies the server; the new one does.
    assert!(h.tls(&h.pki.ca_der).await.is_err());
    let mut tls = h
        .tls(&rotated.ca_der)
        .await
        .expect("rotated certificate not served");
    tls.write_all(
        format!("POST /nowhere HTTP/1.1\r\nhost: {SAN}\r\ncontent-length: 0\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 404"));
    h.stop().await;
}

/// A client that connects and never starts TLS is dropped after the handshake timeout.
#[tokio::test]
async fn silent_connection_is_closed() {
    let h = Harness::start().await;
    let mut tcp = TcpStream::connect(h.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("server kept a silent connection open")
        .unwrap_or(0);
    assert_eq!(n, 0, "expected the server to close the connection");
    h.stop().await;
}

/// A TLS connection to the webhook from `source` (an address on loopback: 127.0.0.0/8 all
/// reaches the listener).
async fn tls_from(
    h: &Harness,
    source: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(h.pki.ca_der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    let tcp = socket.connect(h.addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(SAN).unwrap(), tcp)
        .await
}

/// [`tls_from`], speaking HTTP/2 (the preface and an empty SETTINGS), then idle.
async fn idle_h2(
    h: &Harness,
    source: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut tls = tls_from(h, source).await?;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await?;
    Ok(tls)
}

/// HTTP/2 has no header timeout between requests, and hyper's server no idle timeout: an idle
/// HTTP/2 connection must still end, at its age (gracefully, GOAWAY) or after the drain.
#[tokio::test]
async fn an_idle_http2_connection_ends_at_its_age() {
    let h = Harness::start_with(|o| o.max_connection_age = Duration::from_millis(500)).await;
    let mut idle = idle_h2(&h, "127.0.0.1").await.unwrap();
    assert!(
        closed_within(&mut idle, Duration::from_secs(4)).await,
        "an idle HTTP/2 connection stayed open past its age and the drain"
    );
    h.stop().await;
}

/// One client cannot hold more than its share of connections, and others are still served
/// while it holds them.
#[tokio::test]
async fn connections_past_the_per_peer_cap_are_closed_and_other_peers_are_served() {
    let h = Harness::start_with(|o| o.max_connections_per_peer = 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(idle_h2(&h, "127.0.0.1").await.unwrap());
    }
    // The fourth from the same address is closed at once (during or right after TLS).
    match idle_h2(&h, "127.0.0.1").await {
        Err(_) => {}
        Ok(mut extra) => assert!(
            closed_within(&mut extra, Duration::from_secs(2)).await,
            "a connection past the per-peer cap was kept"
        ),
    }
    // The held ones are still open.
    for c in &mut held {
        assert!(!closed_within(c, Duration::from_millis(100)).await);
    }
    // Another address is answered.
    let mut other = tls_from(&h, "127.0.0.2").await.unwrap();
    let req = format!(
        "POST /inject HTTP/1.1\r\nhost: {SAN}\r\ncontent-type: application/json\r\n\
         content-length: 2\r\nconnection: close\r\n\r\n{{}}"
    );
    other.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), other.read_to_end(&mut resp)).await;
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 "), "no answer: {resp:?}");
    assert!(!resp.starts_with("HTTP/1.1 503"), "{resp}");
    drop(held);
    h.stop().await;
}

/// A few addresses, each within its share, hold the whole total: the API server's next
/// connection is still served, in place of the oldest held connection, which is ended.
#[tokio::test]
async fn a_full_total_ends_the_oldest_connection_to_serve_a_new_one() {
    let h = Harness::start_with(|o| {
        o.max_connections = 4;
        o.max_connections_per_peer = 2;
    })
    .await;
    let mut held = Vec::new();
    for from in ["127.0.0.2", "127.0.0.3"] {
        for _ in 0..2 {
            held.push(idle_h2(&h, from).await.unwrap());
            // Admitted in the order they came, so the first is the oldest.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for c in &mut held {
        assert!(!closed_within(c, Duration::from_millis(50)).await);
    }
    let (status, body) = h
        .post(
            serde_json::to_vec(&review("admission.k8s.io/v1", "Pod", "shop", plain_pod())).unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        closed_within(&mut held[0], Duration::from_secs(3)).await,
        "the oldest connection was not ended to make room"
    );
    for c in &mut held[1..] {
        assert!(
            !closed_within(c, Duration::from_millis(50)).await,
            "a newer connection was ended"
        );
    }
    h.stop().await;
}

/// Issue 13 item 6: reviews are read and decided at most `max_concurrent` at a time; one that
/// cannot get a slot within `queue_timeout` gets 503 without its body being buffered, and the
/// webhook answers again as soon as a slot frees.
#[tokio::test]
async fn reviews_past_the_concurrency_limit_wait_then_get_503() {
    let h = Harness::start_with(|o| {
        o.max_concurrent = 1;
        o.queue_timeout = Duration::from_millis(200);
        o.body_timeout = Duration::from_secs(3);
    })
    .await;
    // A request whose body stalls holds the only slot.
    let mut stalled = h.tls(&h.pki.ca_der).await.unwrap();
    stalled
        .write_all(
            format!("POST /inject HTTP/1.1\r\nhost: {SAN}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{")
                .as_bytes(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let (status, body) = h
        .post(
            serde_json::to_vec(&review("admission.k8s.io/v1", "Pod", "shop", plain_pod())).unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("in flight"), "{body}");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "it waited for a slot first"
    );
    // The stalled client goes away: its slot frees, and reviews are answered again.
    drop(stalled);
    let v = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let (status, body) = h
                .post(
                    serde_json::to_vec(&review("admission.k8s.io/v1", "Pod", "shop", plain_pod()))
                        .unwrap(),
                )
                .await;
            if status == StatusCode::OK {
                break serde_json::from_str::<Value>(&body).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the slot was never released");
    assert_eq!(v["response"]["allowed"], true);
    assert!(
        h.metrics()
            .contains(r#"trellis_operator_injector_denials_total{reason="overloaded"}"#),
        "{}",
        h.metrics()
    );
    h.stop().await;
}

/// A review that parses but lacks what a decision needs is denied with its uid and the reason.
#[tokio::test]
async fn incomplete_reviews_are_denied_with_the_reason() {
    let h = Harness::start().await;
    let mut r = review("admission.k8s.io/v1", "Pod", "shop", plain_pod());
    r["request"].as_object_mut().unwrap().remove("operation");
    let v = h.post_review(&r).await;
    assert_eq!(v["response"]["uid"], UID);
    assert_eq!(v["response"]["allowed"], false);
    let msg = v["response"]["status"]["message"].as_str().unwrap();
    assert!(msg.contains("request.operation is missing"), "{msg}");
    let mut r = review("admission.k8s.io/v1", "Pod", "shop", plain_pod());
    r["request"]["object"] = Value::Null;
    let v = h.post_review(&r).await;
    assert_eq!(v["response"]["allowed"], false);
    let msg = v["response"]["status"]["message"].as_str().unwrap();
    assert!(msg.contains("without an object"), "{msg}");
    // A field of the wrong type deep in the review: a denial, not an HTTP error.
    let mut r = review("admission.k8s.io/v1", "Pod", "shop", plain_pod());
    r["request"]["namespace"] = json!(42);
    let v = h.post_review(&r).await;
    assert_eq!(v["response"]["allowed"], false);
    let msg = v["response"]["status"]["message"].as_str().unwrap();
    assert!(msg.contains("malformed AdmissionReview"), "{msg}");
    h.stop().await;
}
