//! The operator's `/metrics` in `trellis dev`: the control plane's series from the operator code
//! the local mesh really runs, for the same Prometheus that scrapes the sidecars.
//!
//! What is counted, and by which code:
//! - `trellis_operator_build_info`: the operator's registry ([`crate::runtime::new_registry`]);
//! - `trellis_operator_identity_*`: the identity endpoint (`--credentials endpoint`, the
//!   default) signing every sidecar's certificate, its TokenReviews answered by the local
//!   stand-in ([`super::tokenreview`]);
//! - `trellis_operator_injector_*`: the admission webhook's decision ([`Injector::review`]),
//!   given every synthesized pod at start as the API server would send it (an AdmissionReview
//!   CREATE); the run refuses to start if the injector would mesh a different set of pods than
//!   `services.yaml` declares ([`admit`]);
//! - `trellis_operator_reconciles_total{controller="compile"}`: each compile of the directory
//!   by the operator's compiler, at start and after every edit (`ok`, or `invalid`).
//!
//! What is not, because `trellis dev` does not run that code: leader election (one process, no
//! Lease: `trellis_operator_leader` is absent rather than a made-up 1), the status controllers
//! (their `reconciles_total` series), the webhook's HTTPS edge (its `too_large`, `overloaded`
//! and `timeout` denials) and the discovery stream.
//!
//! Audience: Prometheus and the user on this machine. The server listens on 127.0.0.1 only and
//! answers only `GET /metrics` whose `Host` is that address, so a web page elsewhere cannot read
//! it through DNS rebinding (as the dashboard, [`crate::dashboard::server`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use k8s_openapi::api::core::v1::Pod;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::MeshSpec;
use crate::identity::IdentityMetrics;
use crate::inject::InjectContext;
use crate::webhook::{Injector, NamespaceLabels};

/// The operator's registry in `trellis dev`. Cloning shares it.
#[derive(Clone)]
pub struct OperatorMetrics {
    registry: Arc<Mutex<Registry>>,
    /// The Mesh the injector reads, as the operator's Mesh watch feeds it: [`Self::set_mesh`]
    /// after each edit, so `trellis_operator_desired_proxy_info` follows a rollout's new image.
    mesh: Arc<tokio::sync::watch::Sender<MeshSpec>>,
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self {
            registry: Arc::new(Mutex::new(crate::runtime::new_registry())),
            mesh: Arc::new(tokio::sync::watch::Sender::new(MeshSpec::default())),
        }
    }
}

impl OperatorMetrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The identity endpoint's metrics, registered here (call once: a second registration
    /// would repeat the family in the exposition).
    pub fn identity(&self) -> IdentityMetrics {
        IdentityMetrics::register(&mut self.lock())
    }

    /// The reconcile counter, registered here (call once). `trellis dev` counts each compile
    /// of its directory as the compile controller's reconcile: `ok`, or `invalid` when the
    /// directory did not compile (what the operator reports in the objects' status instead).
    pub fn reconciles(&self) -> crate::controller::Reconciles {
        let r = crate::controller::Reconciles::register(&mut self.lock());
        r.init(
            crate::controller::compile_apply::COMPILE_CONTROLLER,
            &["ok", "invalid"],
        );
        r
    }

    /// The admission webhook's decision, with its metrics registered here (call once).
    pub fn injector(&self, mesh: MeshSpec, namespaces: NamespaceLabels) -> Injector {
        self.set_mesh(mesh);
        let (_, namespaces) = tokio::sync::watch::channel(Arc::new(namespaces));
        Injector::new(
            self.mesh.subscribe(),
            namespaces,
            InjectContext {
                operator_namespace: super::ROOT_NAMESPACE.to_string(),
            },
            &mut self.lock(),
        )
    }

    /// The Mesh as last compiled from the directory: what the injector (and its
    /// `desired_proxy` series) reads from then on, as the operator's Mesh watch would see it.
    pub fn set_mesh(&self, mesh: MeshSpec) {
        self.mesh.send_replace(mesh);
    }

    /// The OpenMetrics text the operator's `/metrics` serves.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.lock())?;
        Ok(out)
    }
}

/// Why the injector and `services.yaml` disagree.
#[derive(Debug, thiserror::Error)]
#[error(
    "the operator's injector would not mesh the pods services.yaml declares: {}",
    .0.join("; ")
)]
pub struct AdmitError(pub Vec<String>);

/// Sends every pod through the webhook's decision as an AdmissionReview CREATE and checks that
/// exactly the pods in `meshed` (by `namespace/name`) get the sidecar. Returns how many did.
pub fn admit(
    injector: &Injector,
    pods: &[Pod],
    meshed: &std::collections::BTreeSet<String>,
) -> Result<usize, AdmitError> {
    let mut problems = Vec::new();
    let mut injected = 0;
    for (i, pod) in pods.iter().enumerate() {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let key = format!("{ns}/{name}");
        let review = json!({
            "apiVersion": crate::webhook::REVIEW_API_VERSION,
            "kind": "AdmissionReview",
            "request": {
                "uid": format!("trellis-dev-{i}"),
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": "CREATE",
                "namespace": ns,
                "object": pod,
            },
        });
        let body = serde_json::to_vec(&review).unwrap_or_default();
        let answer = injector.review(&body);
        let response = &answer.body["response"];
        let patched = response["allowed"] == json!(true) && response.get("patch").is_some();
        if response["allowed"] != json!(true) {
            problems.push(format!(
                "{key}: denied: {}",
                response["status"]["message"]
                    .as_str()
                    .unwrap_or("no reason")
            ));
        } else if patched != meshed.contains(&key) {
            problems.push(format!(
                "{key}: {}",
                if patched {
                    "injected, but declared without a sidecar"
                } else {
                    "not injected, but declared with a sidecar"
                }
            ));
        }
        injected += usize::from(patched);
    }
    if problems.is_empty() {
        Ok(injected)
    } else {
        Err(AdmitError(problems))
    }
}

/// Binds the operator's metrics on 127.0.0.1 (`port` 0 picks a free one).
pub use crate::loopback_http::bind;

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Answers one request: `GET /metrics` addressed to this loopback port, nothing else.
pub fn handle<B>(req: &Request<B>, port: u16, metrics: &OperatorMetrics) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if !crate::loopback_http::host_is_loopback(req, port) {
        return respond(
            StatusCode::FORBIDDEN,
            TEXT,
            "only requests to 127.0.0.1 are answered\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "use GET\n".into());
    }
    if req.uri().path() != "/metrics" {
        return respond(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found; GET /metrics\n".into(),
        );
    }
    match metrics.encode() {
        Ok(text) => respond(StatusCode::OK, crate::runtime::OPENMETRICS, text),
        Err(e) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            TEXT,
            format!("encoding metrics: {e}\n"),
        ),
    }
}

/// Serves until `stop` is cancelled.
pub async fn serve(listener: TcpListener, metrics: OperatorMetrics, stop: CancellationToken) {
    let handle = move |req: &Request<_>, port| handle(req, port, &metrics);
    crate::loopback_http::serve(listener, "operator metrics", handle, stop).await;
}

/// The labels the scrape config gives the operator's target, like a ServiceMonitor would
/// (`namespace`, `pod`, and `app` as the workload).
pub fn scrape_labels() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        ("namespace", super::ROOT_NAMESPACE),
        ("pod", "trellis-dev"),
        ("app", "trellis-operator"),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::plan::Plan;
    use crate::dev::spec::parse_services;
    use crate::dev::synth::synthesize;

    const TOPO: &str = r#"
services:
  - {name: web, namespace: a, port: 80, replicas: 2}
clients:
  - {name: load, namespace: a, meshed: true, target: web, rate: 5}
  - {name: legacy, namespace: a, meshed: false, target: web, rate: 1}
"#;

    fn cluster() -> (
        crate::dev::synth::Cluster,
        std::collections::BTreeSet<String>,
    ) {
        let t = parse_services(std::path::Path::new("s.yaml"), TOPO).unwrap();
        let plan = Plan::new(&t, 20000, std::path::Path::new("/st")).unwrap();
        let meshed = plan
            .pods
            .iter()
            .filter(|p| p.proxy.is_some())
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        (synthesize(&t, &plan), meshed)
    }

    fn injector(m: &OperatorMetrics, c: &crate::dev::synth::Cluster) -> Injector {
        m.injector(
            MeshSpec::default(),
            crate::webhook::namespace_labels(&c.namespaces),
        )
    }

    /// The real webhook decides: meshed pods are injected, the plaintext client is skipped,
    /// and the operator's exposition counts both under the names the dashboards query.
    #[test]
    fn the_injector_meshes_the_declared_pods_and_counts_them() {
        let (c, meshed) = cluster();
        let m = OperatorMetrics::default();
        let inj = injector(&m, &c);
        assert_eq!(admit(&inj, &c.pods, &meshed).unwrap(), 3);
        let text = m.encode().unwrap();
        assert!(
            text.contains("trellis_operator_injector_injections_total 3"),
            "{text}"
        );
        assert!(
            text.contains("trellis_operator_injector_skips_total{reason=\"pod_disabled\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("trellis_operator_build_info{version="),
            "{text}"
        );
        let desired = MeshSpec::default().proxy.effective_image().to_owned();
        assert!(
            text.contains(&format!(
                "trellis_operator_desired_proxy_info{{version=\"{desired}\"}} 1"
            )),
            "{text}"
        );
        // An edit of the Mesh's image reaches the series at the next scrape, as it reaches
        // the injector: the old-proxy alert then flags the proxies still on the old one.
        let mut edited = MeshSpec::default();
        edited.proxy.image = Some("trellis-proxy:next".into());
        m.set_mesh(edited);
        let text = m.encode().unwrap();
        assert!(
            text.contains("trellis_operator_desired_proxy_info{version=\"trellis-proxy:next\"} 1"),
            "{text}"
        );
        assert!(!text.contains(&desired), "{text}");
        // No leader election runs here: the gauge is absent, not a made-up value.
        assert!(!text.contains("trellis_operator_leader"), "{text}");
    }

    #[test]
    fn a_disagreement_with_services_yaml_is_an_error_naming_the_pod() {
        let (c, mut meshed) = cluster();
        meshed.remove("a/web-1");
        meshed.insert("a/legacy-0".into());
        let m = OperatorMetrics::default();
        let e = admit(&injector(&m, &c), &c.pods, &meshed)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a/web-1: injected, but declared without a sidecar"),
            "{e}"
        );
        assert!(
            e.contains("a/legacy-0: not injected, but declared with a sidecar"),
            "{e}"
        );
    }

    fn get(path: &str, host: &str) -> Request<()> {
        Request::get(path)
            .header(header::HOST, host)
            .body(())
            .unwrap()
    }

    #[test]
    fn answers_only_get_metrics_addressed_to_loopback() {
        let m = OperatorMetrics::default();
        let ok = handle(&get("/metrics", "127.0.0.1:9"), 9, &m);
        assert_eq!(ok.status(), StatusCode::OK);
        assert!(
            ok.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        assert_eq!(
            handle(&get("/metrics", "localhost:9"), 9, &m).status(),
            StatusCode::OK
        );
        for host in ["evil.example:9", "127.0.0.1:10", "10.0.0.1:9"] {
            assert_eq!(
                handle(&get("/metrics", host), 9, &m).status(),
                StatusCode::FORBIDDEN,
                "{host}"
            );
        }
        assert_eq!(
            handle(&get("/config", "127.0.0.1:9"), 9, &m).status(),
            StatusCode::NOT_FOUND
        );
        let post = Request::post("/metrics")
            .header(header::HOST, "127.0.0.1:9")
            .body(())
            .unwrap();
        assert_eq!(
            handle(&post, 9, &m).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    /// Over a real socket: served on 127.0.0.1, and nothing answers on the host's other address.
    #[tokio::test]
    async fn serves_on_loopback_only() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = bind(0).await.unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(addr.ip().is_loopback(), "{addr}");
        let port = addr.port();
        let m = OperatorMetrics::default();
        let _identity = m.identity();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, m, stop.clone()));
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut page = String::new();
        c.read_to_string(&mut page).await.unwrap();
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(
            page.contains("trellis_operator_identity_issuances_total 0"),
            "{page}"
        );
        match crate::loopback_http::non_loopback_ip() {
            Some(ip) => assert!(
                tokio::net::TcpStream::connect((ip, port)).await.is_err(),
                "the operator's metrics answered on {ip}"
            ),
            None => eprintln!("no non-loopback address: only the bind address was checked"),
        }
        stop.cancel();
    }
}
