//! `trellis check` against recorded API exchanges: a healthy cluster, then one failure of each
//! check, each showing the line a user would read. The data-plane check also runs against real
//! in-process proxies (`trellis_proxy::run::start`) whose `/metrics` the recorded API server
//! relays as its pod proxy would, and the `trellis` binary's exit code is checked against a
//! real HTTP API server stand-in.

mod recorded;

use base64::Engine as _;
use http::Method;
use kube::Client;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use recorded::{Exchange, api_status, exchange, text_reply};
use serde_json::{Value, json};
use trellis_operator::check::observe::{Scope, run};
use trellis_operator::check::{Outcome, Report};

/// A fixed "now" (2030-03-17), so expiry arithmetic in the recorded tests is exact.
const NOW: i64 = 1_900_000_000;
const NS: &str = "trellis-system";
const IMAGE: &str = "ghcr.io/trellis-mesh/trellis-proxy:0.1.0";

/// A self-signed root valid until `not_after` (Unix seconds): (PEM, SHA-256 fingerprint).
fn root(not_after: i64) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "trellis root");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    p.not_before = time::OffsetDateTime::from_unix_timestamp(not_after - 400 * 86_400).unwrap();
    p.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).unwrap();
    let cert = p.self_signed(&key).unwrap();
    let fp = trellis_operator::ca::authority::fingerprint(cert.der());
    (cert.pem(), fp)
}

fn ts(secs: i64) -> String {
    jiff::Timestamp::from_second(secs).unwrap().to_string()
}

fn get(path: &str, reply: Value) -> Exchange {
    exchange(Method::GET, path, |_| {}, reply)
}

/// A reply with a status: `(status, body)`.
#[derive(Clone)]
struct Reply(u16, Value);

fn ok(v: Value) -> Reply {
    Reply(200, v)
}

fn missing() -> Reply {
    Reply(404, api_status(404, "NotFound", "not found"))
}

fn ex(path: &str, r: &Reply) -> Exchange {
    let mut e = get(path, r.1.clone());
    e.status = r.0;
    e
}

/// A pod of the meshed namespace `shop`.
#[derive(Clone)]
struct PodSpec {
    name: String,
    proxy: bool,
    version: String,
    metrics: Reply,
}

/// Every answer of a recorded cluster, healthy by default; each test breaks one.
#[derive(Clone)]
struct Cluster {
    version: Reply,
    crds: Vec<(String, Reply)>,
    deployment: Reply,
    lease: Reply,
    mesh: Reply,
    webhook: Reply,
    webhook_answer: Reply,
    identity_answer: Reply,
    namespaces: Reply,
    configmap: Reply,
    pods: Vec<PodSpec>,
    /// The operator replicas' propagation report Leases.
    reports: Reply,
}

const REPORTS: &str = "/apis/coordination.k8s.io/v1/namespaces/trellis-system/leases?&labelSelector=trellis.dev%2Fcomponent%3Dpropagation-report";

/// One replica's report Lease, renewed `age` seconds before `now`.
fn report_lease(now: i64, age: i64, report: Value) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "trellis-propagation-op-a", "namespace": NS,
                     "labels": {"trellis.dev/component": "propagation-report"},
                     "annotations": {"trellis.dev/propagation": report.to_string()}},
        "spec": {"holderIdentity": "op-a", "renewTime": jiff::Timestamp::from_second(now - age).unwrap().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()}})
}

fn reports(items: Vec<Value>) -> Reply {
    ok(
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList", "metadata": {}, "items": items}),
    )
}

fn version(minor: &str) -> Reply {
    ok(
        json!({"major": "1", "minor": minor, "gitVersion": format!("v1.{minor}.2"),
        "gitCommit": "abc", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"}),
    )
}

fn webhook_config(bundle_pem: &str) -> Reply {
    let b64 = base64::engine::general_purpose::STANDARD.encode(bundle_pem);
    let hook = |name: &str| {
        json!({"name": name, "admissionReviewVersions": ["v1"], "sideEffects": "None",
               "clientConfig": {"caBundle": b64,
                   "service": {"name": "trellis-operator", "namespace": NS, "path": "/inject", "port": 443}}})
    };
    ok(
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "trellis-sidecar-injector"},
        "webhooks": [hook("namespace.inject.trellis.dev"), hook("pod.inject.trellis.dev")]}),
    )
}

fn mesh(
    generation: i64,
    observed: i64,
    ready: &str,
    fingerprint: &str,
    extra: Vec<Value>,
) -> Reply {
    mesh_at(NOW, generation, observed, ready, fingerprint, extra)
}

fn mesh_at(
    now: i64,
    generation: i64,
    observed: i64,
    ready: &str,
    fingerprint: &str,
    extra: Vec<Value>,
) -> Reply {
    let mut conditions = vec![
        json!({"type": "Ready", "status": ready, "reason": if ready == "True" {"Ready"} else {"NotReady"},
        "message": "", "lastTransitionTime": ts(now - 60), "observedGeneration": observed}),
    ];
    conditions.extend(extra);
    ok(json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "Mesh",
        "metadata": {"name": "default", "generation": generation},
        "spec": {},
        "status": {"conditions": conditions, "observedGeneration": observed,
                   "ca": {"fingerprint": fingerprint, "notAfter": ts(now + 400 * 86_400)}}}))
}

fn proxy_metrics(revision: &str, cert_not_after: i64) -> Reply {
    let m = trellis_proxy::metrics::Metrics::new();
    m.set_config_revision(revision);
    m.cert_expiry.set(cert_not_after);
    ok(text_reply(&m.encode()))
}

fn configmap(revision: &str) -> Reply {
    ok(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "trellis-proxy", "namespace": "shop"},
        "data": {"config.json": json!({"version": 1, "revision": revision}).to_string()}}))
}

fn pod_json(p: &PodSpec) -> Value {
    let mut init = vec![];
    if p.proxy {
        init.push(json!({"name": "trellis-proxy", "image": p.version, "restartPolicy": "Always"}));
    }
    let mut annotations = json!({});
    if p.proxy {
        annotations = json!({"trellis.dev/proxy-version": p.version});
    }
    json!({"metadata": {"name": p.name, "namespace": "shop", "annotations": annotations},
           "spec": {"initContainers": init, "containers": [{"name": "app", "image": "shop/web"}]},
           "status": {"phase": "Running"}})
}

impl Cluster {
    fn healthy() -> (Self, String) {
        Self::healthy_at(NOW)
    }

    /// Healthy as seen at `now` (Unix seconds).
    fn healthy_at(now: i64) -> (Self, String) {
        let (pem, fp) = root(now + 400 * 86_400);
        let crds = trellis_operator::api::crds()
            .into_iter()
            .map(|c| {
                (
                    c.metadata.name.clone().unwrap(),
                    ok(serde_json::to_value(&c).unwrap()),
                )
            })
            .collect();
        let pod = |name: &str| PodSpec {
            name: name.into(),
            proxy: true,
            version: IMAGE.into(),
            metrics: proxy_metrics("rev-1", now + 12 * 3600),
        };
        let c = Cluster {
            version: version("31"),
            crds,
            deployment: ok(json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "trellis-operator", "namespace": NS},
                "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "x"}}, "template": {"metadata": {}}},
                "status": {"availableReplicas": 2, "conditions": [{"type": "Available", "status": "True",
                    "message": "Deployment has minimum availability."}]}})),
            lease: ok(
                json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "trellis-operator", "namespace": NS},
                "spec": {"holderIdentity": "trellis-operator-7d9f-abcde", "renewTime": ts(now - 3),
                         "leaseDurationSeconds": 15}}),
            ),
            mesh: mesh_at(now, 3, 3, "True", &fp, vec![]),
            webhook: webhook_config(&pem),
            webhook_answer: Reply(405, text_reply("use POST /inject")),
            identity_answer: Reply(404, json!({"error": "not found: use POST /v1/certificate"})),
            namespaces: ok(
                json!({"apiVersion": "v1", "kind": "NamespaceList", "metadata": {},
                "items": [{"metadata": {"name": "shop", "labels": {"trellis.dev/inject": "enabled"}}}]}),
            ),
            configmap: configmap("rev-1"),
            pods: vec![pod("web-1"), pod("web-2")],
            reports: reports(vec![report_lease(
                now,
                2,
                json!({"replica": "op-a", "latest": 7, "streams": 2, "objects": [],
                       "lagging": [], "laggingTotal": 0}),
            )]),
        };
        (c, fp)
    }

    fn installed_exchanges(&self, proxy: bool) -> Vec<Exchange> {
        let mut v = vec![ex("/version", &self.version)];
        v.extend(self.crd_exchanges());
        v.push(ex(
            &format!("/apis/apps/v1/namespaces/{NS}/deployments/trellis-operator"),
            &self.deployment,
        ));
        v.push(ex(
            &format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/trellis-operator"),
            &self.lease,
        ));
        v.push(ex("/apis/trellis.dev/v1alpha1/meshes/default", &self.mesh));
        v.push(ex(
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/trellis-sidecar-injector",
            &self.webhook,
        ));
        v.push(ex(
            &format!("/api/v1/namespaces/{NS}/services/https:trellis-operator:443/proxy/inject"),
            &self.webhook_answer,
        ));
        v.push(ex(
            &format!(
                "/api/v1/namespaces/{NS}/services/https:trellis-operator:15012/proxy/v1/certificate"
            ),
            &self.identity_answer,
        ));
        if proxy {
            v.push(ex(
                "/api/v1/namespaces?&labelSelector=trellis.dev%2Finject%3Denabled",
                &self.namespaces,
            ));
            v.push(ex(
                "/api/v1/namespaces/shop/configmaps/trellis-proxy",
                &self.configmap,
            ));
            let items: Vec<Value> = self.pods.iter().map(pod_json).collect();
            v.push(ex(
                "/api/v1/namespaces/shop/pods?",
                &ok(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})),
            ));
            for p in self.pods.iter().filter(|p| p.proxy) {
                v.push(ex(
                    &format!(
                        "/api/v1/namespaces/shop/pods/{}:15020/proxy/metrics",
                        p.name
                    ),
                    &p.metrics,
                ));
            }
            v.push(ex(REPORTS, &self.reports));
        }
        v
    }

    fn crd_exchanges(&self) -> Vec<Exchange> {
        self.crds
            .iter()
            .map(|(name, r)| {
                ex(
                    &format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"),
                    r,
                )
            })
            .collect()
    }
}

async fn check(exchanges: Vec<Exchange>, pre: bool, proxy: bool) -> Report {
    let (client, handle) = recorded::mock();
    let verifier = recorded::user_verifier(handle, exchanges);
    let scope = Scope {
        namespace: NS.into(),
        pre,
        proxy,
        lag_threshold_secs: 180,
    };
    let report = run(&client, &scope, NOW).await;
    drop(client);
    verifier.await.unwrap();
    report
}

async fn installed(c: &Cluster, proxy: bool) -> Report {
    check(c.installed_exchanges(proxy), false, proxy).await
}

/// The failed lines as the user reads them, `name: detail`.
fn failed(r: &Report) -> Vec<String> {
    r.all()
        .filter(|c| c.outcome == Outcome::Fail)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect()
}

/// Exactly one check failed, its line reads `line`, the output shows a hint for it, and the
/// report counts as failed (what makes `trellis check` exit non-zero).
fn assert_only_failure(r: &Report, line: &str) {
    assert_eq!(failed(r), vec![line.to_string()], "{}", r.render());
    let text = r.render();
    let at = text
        .find(&format!("[FAIL] {line}"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        text[at..]
            .lines()
            .nth(1)
            .unwrap()
            .trim_start()
            .starts_with("hint: "),
        "{text}"
    );
    assert!(text.contains("1 of "), "{text}");
    assert_eq!(r.failures(), 1);
}

#[tokio::test]
async fn a_healthy_cluster_passes_every_check() {
    let (c, _) = Cluster::healthy();
    let r = installed(&c, true).await;
    let text = r.render();
    assert_eq!(r.failures(), 0, "{text}");
    assert!(!text.contains("[warn]"), "{text}");
    for line in [
        "[ok]   Kubernetes API server: reachable, version v1.31.2",
        "[ok]   CRD meshes.trellis.dev at v1alpha1: installed, schema matches this build",
        "[ok]   operator Deployment available: 2/2 replicas available",
        "[ok]   controllers' leader elected: trellis-operator-7d9f-abcde (renewed 3 s ago)",
        "[ok]   Mesh default Ready: Ready at generation 3",
        "[ok]   injection webhook reachable: answered (HTTP 405)",
        "[ok]   trust anchors valid: 1 root(s), the first expires in 400 days",
        "[ok]   identity endpoint answering: answered (HTTP 404)",
        "Data plane: namespace shop",
        "[ok]   pods have sidecars: 2/2 pods",
        "[ok]   proxy versions: 2 proxies run ghcr.io/trellis-mesh/trellis-proxy:0.1.0",
        "[ok]   proxy web-1 certificate: expires in 12 h",
        "[ok]   proxy web-2 config: revision rev-1, as the ConfigMap",
        "Propagation",
        "[ok]   propagation reports: 1 operator replica(s), 2 proxy stream(s)",
        "[ok]   proxies in step: all 2 proxies applied the latest",
        "Status check results are ok",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

#[tokio::test]
async fn missing_crd() {
    let (mut c, _) = Cluster::healthy();
    c.crds[1].1 = missing();
    let r = installed(&c, false).await;
    assert_only_failure(
        &r,
        "CRD trafficpolicies.trellis.dev at v1alpha1: not installed",
    );
}

#[tokio::test]
async fn crd_from_another_version() {
    let (mut c, _) = Cluster::healthy();
    c.crds[0].1 .1["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        .as_object_mut()
        .unwrap()
        .remove("outbound");
    let r = installed(&c, false).await;
    assert_only_failure(
        &r,
        "CRD meshes.trellis.dev at v1alpha1: its schema differs from this trellis build's (another Trellis version)",
    );
}

#[tokio::test]
async fn operator_not_available() {
    let (mut c, _) = Cluster::healthy();
    c.deployment.1["status"] = json!({"availableReplicas": 0, "conditions": [{"type": "Available",
        "status": "False", "message": "Deployment does not have minimum availability."}]});
    let r = installed(&c, false).await;
    assert_only_failure(
        &r,
        "operator Deployment available: 0/2 replicas available: Deployment does not have minimum availability.",
    );
}

#[tokio::test]
async fn operator_not_installed() {
    let (mut c, _) = Cluster::healthy();
    c.deployment = missing();
    let r = installed(&c, false).await;
    assert_only_failure(
        &r,
        "operator Deployment available: no Deployment trellis-system/trellis-operator",
    );
}

#[tokio::test]
async fn leader_stopped_renewing() {
    let (mut c, _) = Cluster::healthy();
    c.lease.1["spec"]["renewTime"] = json!(ts(NOW - 75));
    let r = installed(&c, false).await;
    assert_only_failure(
        &r,
        "controllers' leader elected: trellis-operator-7d9f-abcde holds the Lease but stopped renewing it 60 s ago",
    );
}

#[tokio::test]
async fn lease_not_readable() {
    let (mut c, _) = Cluster::healthy();
    c.lease = Reply(
        403,
        api_status(
            403,
            "Forbidden",
            "leases.coordination.k8s.io \"trellis-operator\" is forbidden: User \"dev\" cannot get resource \"leases\"",
        ),
    );
    let r = installed(&c, false).await;
    assert_only_failure(
        &r,
        "controllers' leader elected: cannot read the Lease: leases.coordination.k8s.io \"trellis-operator\" is forbidden: User \"dev\" cannot get resource \"leases\" (Forbidden)",
    );
}

#[tokio::test]
async fn mesh_ready_for_an_older_generation() {
    let (mut c, fp) = Cluster::healthy();
    c.mesh = mesh(4, 3, "True", &fp, vec![]);
    let r = installed(&c, false).await;
    assert_only_failure(
        &r,
        "Mesh default Ready: Ready is for generation 3, the Mesh is at generation 4",
    );
}

#[tokio::test]
async fn mesh_not_ready_names_the_failing_condition() {
    let (mut c, fp) = Cluster::healthy();
    c.mesh = mesh(
        3,
        3,
        "False",
        &fp,
        vec![
            json!({"type": "CAReady", "status": "False", "reason": "SecretInvalid",
        "message": "Secret trellis-system/my-ca has no tls.key", "lastTransitionTime": ts(NOW), "observedGeneration": 3}),
        ],
    );
    let r = installed(&c, false).await;
    assert_only_failure(
        &r,
        "Mesh default Ready: Ready is False; CAReady (SecretInvalid: Secret trellis-system/my-ca has no tls.key)",
    );
}

#[tokio::test]
async fn no_mesh() {
    let (mut c, _) = Cluster::healthy();
    c.mesh = missing();
    let r = installed(&c, false).await;
    assert_eq!(
        failed(&r),
        [
            "Mesh default Ready: no Mesh named default",
            "injection webhook configured with the current CA: the Mesh reports no active root CA"
        ],
        "{}",
        r.render()
    );
}

#[tokio::test]
async fn webhook_configuration_missing() {
    let (mut c, _) = Cluster::healthy();
    c.webhook = missing();
    let r = installed(&c, false).await;
    assert_only_failure(
        &r,
        "injection webhook configured with the current CA: no MutatingWebhookConfiguration trellis-sidecar-injector",
    );
}

#[tokio::test]
async fn webhook_trusts_an_old_ca() {
    let (mut c, _) = Cluster::healthy();
    let (other, _) = root(NOW + 400 * 86_400);
    c.webhook = webhook_config(&other);
    let r = installed(&c, false).await;
    let f = failed(&r);
    assert_eq!(f.len(), 1, "{}", r.render());
    assert!(
        f[0].starts_with("injection webhook configured with the current CA: 2 of 2 webhooks' caBundle lacks the active root "),
        "{f:?}"
    );
}

#[tokio::test]
async fn webhook_unreachable() {
    let (mut c, _) = Cluster::healthy();
    c.webhook_answer = Reply(
        503,
        api_status(
            503,
            "ServiceUnavailable",
            "no endpoints available for service \"trellis-operator\"",
        ),
    );
    let r = installed(&c, false).await;
    assert_only_failure(
        &r,
        "injection webhook reachable: the API server could not reach it: no endpoints available for service \"trellis-operator\"",
    );
}

#[tokio::test]
async fn identity_endpoint_unreachable() {
    let (mut c, _) = Cluster::healthy();
    c.identity_answer = Reply(
        503,
        api_status(
            503,
            "ServiceUnavailable",
            "error trying to reach service: dial tcp 10.96.0.12:15012: connect: connection refused",
        ),
    );
    let r = installed(&c, false).await;
    assert_only_failure(
        &r,
        "identity endpoint answering: the API server could not reach it: error trying to reach service: dial tcp 10.96.0.12:15012: connect: connection refused",
    );
}

#[tokio::test]
async fn trust_anchor_expired() {
    let (pem, fp) = root(NOW - 3 * 86_400);
    let (mut c, _) = Cluster::healthy();
    c.webhook = webhook_config(&pem);
    c.mesh = mesh(3, 3, "True", &fp, vec![]);
    let r = installed(&c, false).await;
    assert_only_failure(&r, "trust anchors valid: 1 root(s), one expired 3 days ago");
}

#[tokio::test]
async fn trust_anchor_near_expiry_warns_without_failing() {
    let (pem, fp) = root(NOW + 10 * 86_400);
    let (mut c, _) = Cluster::healthy();
    c.webhook = webhook_config(&pem);
    c.mesh = mesh(3, 3, "True", &fp, vec![]);
    let r = installed(&c, false).await;
    assert_eq!(r.failures(), 0, "{}", r.render());
    assert!(
        r.render()
            .contains("[warn] trust anchors valid: 1 root(s), the first expires in 10 days"),
        "{}",
        r.render()
    );
}

#[tokio::test]
async fn pod_without_sidecar() {
    let (mut c, _) = Cluster::healthy();
    c.pods[1].proxy = false;
    let r = installed(&c, true).await;
    assert_only_failure(&r, "pods have sidecars: 1/2 pods; without: web-2");
}

#[tokio::test]
async fn proxy_at_an_old_version() {
    let (mut c, _) = Cluster::healthy();
    c.pods[0].version = "ghcr.io/trellis-mesh/trellis-proxy:0.0.9".into();
    let r = installed(&c, true).await;
    assert_only_failure(
        &r,
        "proxy versions: 1 of 2 not at ghcr.io/trellis-mesh/trellis-proxy:0.1.0: web-1 (ghcr.io/trellis-mesh/trellis-proxy:0.0.9)",
    );
}

#[tokio::test]
async fn proxy_serving_an_old_config() {
    let (mut c, _) = Cluster::healthy();
    c.pods[1].metrics = proxy_metrics("rev-0", NOW + 12 * 3600);
    let r = installed(&c, true).await;
    assert_only_failure(
        &r,
        "proxy web-2 config: serves revision rev-0, the ConfigMap has rev-1",
    );
}

#[tokio::test]
async fn proxy_certificate_expired() {
    let (mut c, _) = Cluster::healthy();
    c.pods[0].metrics = proxy_metrics("rev-1", NOW - 2 * 3600);
    let r = installed(&c, true).await;
    assert_only_failure(&r, "proxy web-1 certificate: expired 2 h ago");
}

#[tokio::test]
async fn proxy_admin_port_unreachable() {
    let (mut c, _) = Cluster::healthy();
    c.pods[0].metrics = Reply(
        500,
        api_status(
            500,
            "InternalError",
            "error trying to reach service: dial tcp 10.244.1.7:15020: connect: connection refused",
        ),
    );
    let r = installed(&c, true).await;
    assert_only_failure(
        &r,
        "proxy web-1: its admin port :15020/metrics did not answer: error trying to reach service: dial tcp 10.244.1.7:15020: connect: connection refused",
    );
}

/// `trellis check --proxy` names the proxies behind the operator, what each has not applied
/// and for how long, and fails (exit code 1) once one has been behind for longer than
/// `--lag-threshold`; one only briefly behind is a warning.
#[tokio::test]
async fn proxies_behind_the_operator_past_the_threshold() {
    let (mut c, _) = Cluster::healthy();
    // `stale`: what the proxy misses, each with how many seconds it has been missing it.
    let lagging = |pod: &str, stale: &[(&str, i64)]| {
        let behind = stale.iter().map(|(_, s)| *s).max().unwrap();
        let stale: serde_json::Map<String, Value> = stale
            .iter()
            .map(|(what, secs)| (what.to_string(), json!(ts(NOW - secs))))
            .collect();
        json!({"namespace": "shop", "pod": pod,
               "identity": format!("spiffe://cluster.local/ns/shop/sa/{pod}"),
               "acked": 6, "latest": 7, "stale": stale,
               "connectedSince": ts(NOW - 7200), "behindSince": ts(NOW - behind)})
    };
    // web-1 runs an old TrafficPolicy from its ConfigMap (and the old settings); web-3 runs an
    // old TrafficPolicy alone: it acknowledged every view and its settings are current
    // (issue 19). web-2 has only just missed a pushed view.
    c.reports = reports(vec![report_lease(
        NOW,
        2,
        json!({"replica": "op-a", "latest": 7, "streams": 9, "objects": [],
               "lagging": [lagging("web-2", &[("generation", 40)]),
                           lagging("web-3", &[("policies", 200)]),
                           lagging("web-1", &[("settings", 250), ("policies", 250)])],
               "laggingTotal": 3}),
    )]);
    let r = installed(&c, true).await;
    let text = r.render();
    assert_eq!(r.failures(), 1, "{text}");
    let cells = |l: &str| -> Vec<String> {
        l.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(String::from)
            .collect()
    };
    let at = text
        .find("[FAIL] proxies in step: 2 of 9 behind for more than 3m00s\n")
        .unwrap_or_else(|| panic!("{text}"));
    let table: Vec<Vec<String>> = text[at..].lines().skip(1).take(3).map(cells).collect();
    assert_eq!(
        table[0],
        ["NAMESPACE", "POD", "STALE", "CONNECTED", "IDENTITY"]
    );
    assert_eq!(
        table[1],
        [
            "shop",
            "web-1",
            "settings 4m10s, policies 4m10s",
            "2h00m ago",
            "spiffe://cluster.local/ns/shop/sa/web-1"
        ],
        "longest behind first"
    );
    assert_eq!(table[2][1..3], ["web-3", "policies 3m20s"]);
    assert!(text[at..].contains("hint: STALE says what"), "{text}");
    // The one only briefly behind: listed, as a warning.
    let at = text
        .find("[warn] proxies catching up: 1 of 9 behind for less than 3m00s\n")
        .unwrap_or_else(|| panic!("{text}"));
    let row = cells(text[at..].lines().nth(2).unwrap());
    assert_eq!(row[1..3], ["web-2", "generation 6/7 40s"]);

    // All within the threshold: shown, not failed.
    c.reports = reports(vec![report_lease(
        NOW,
        2,
        json!({"replica": "op-a", "latest": 7, "streams": 9, "objects": [],
               "lagging": [lagging("web-3", &[("policies", 100)])], "laggingTotal": 1}),
    )]);
    let r = installed(&c, true).await;
    assert_eq!(r.failures(), 0, "{}", r.render());
    assert!(
        r.render()
            .contains("[warn] proxies in step: 1 of 9 catching up, none for more than 3m00s"),
        "{}",
        r.render()
    );
    assert!(r.render().contains("policies 1m40s"), "{}", r.render());

    // A user who may not list the reports is told what is missing.
    c.reports = Reply(403, api_status(403, "Forbidden", "leases is forbidden"));
    let r = installed(&c, true).await;
    assert_only_failure(
        &r,
        "propagation reports: cannot list them: leases is forbidden (Forbidden)",
    );
}

#[tokio::test]
async fn namespace_without_configmap() {
    let (mut c, _) = Cluster::healthy();
    c.configmap = missing();
    let r = installed(&c, true).await;
    assert_only_failure(&r, "config revision: no ConfigMap shop/trellis-proxy");
}

// ---- pre-install ----

const SSAR: &str = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews?";

fn preinstall_exchanges(
    version_minor: &str,
    denied: &[&str],
    crds: Vec<Reply>,
    webhooks: Value,
) -> Vec<Exchange> {
    let mut v = vec![ex("/version", &version(version_minor))];
    for p in trellis_operator::check::preinstall::install_permissions(NS) {
        let allowed = !denied.contains(&p.resource);
        let resource = p.resource;
        let namespace = p.namespace.clone();
        v.push(exchange(
            Method::POST,
            SSAR,
            move |body| {
                let attrs = &body["spec"]["resourceAttributes"];
                assert_eq!(attrs["verb"], "create");
                assert_eq!(attrs["resource"], resource);
                assert_eq!(attrs["namespace"].as_str(), namespace.as_deref());
            },
            json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                   "spec": {}, "status": {"allowed": allowed}}),
        ));
    }
    let names = [
        "meshes.trellis.dev",
        "trafficpolicies.trellis.dev",
        "peerauthentications.trellis.dev",
    ];
    for (name, r) in names.iter().zip(crds) {
        v.push(ex(
            &format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"),
            &r,
        ));
    }
    v.push(get(
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations?",
        webhooks,
    ));
    v
}

fn webhook_list(configs: &[(&str, &str)]) -> Value {
    let items: Vec<Value> = configs
        .iter()
        .map(|(name, hook)| {
            json!({"metadata": {"name": name}, "webhooks": [{"name": hook,
            "admissionReviewVersions": ["v1"], "sideEffects": "None", "clientConfig": {}}]})
        })
        .collect();
    json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfigurationList",
           "metadata": {}, "items": items})
}

fn free() -> Vec<Reply> {
    vec![missing(), missing(), missing()]
}

#[tokio::test]
async fn preinstall_on_a_ready_cluster_passes() {
    let ex = preinstall_exchanges(
        "30",
        &[],
        free(),
        webhook_list(&[("cert-manager-webhook", "webhook.cert-manager.io")]),
    );
    let r = check(ex, true, false).await;
    assert_eq!(r.failures(), 0, "{}", r.render());
    let text = r.render();
    assert!(
        text.contains("[ok]   RBAC to install: allowed to 10 kinds of object"),
        "{text}"
    );
    assert!(
        text.contains("[ok]   CRD name meshes.trellis.dev free or Trellis's: free"),
        "{text}"
    );
    assert!(
        text.contains("[ok]   no other mesh's sidecar injector: none found"),
        "{text}"
    );
}

#[tokio::test]
async fn preinstall_old_kubernetes_stops_there() {
    let r = check(vec![ex("/version", &version("29"))], true, false).await;
    assert_only_failure(
        &r,
        "Kubernetes API server: version v1.29.2 is older than 1.30",
    );
}

#[tokio::test]
async fn preinstall_without_rbac() {
    let ex = preinstall_exchanges(
        "31",
        &["clusterroles", "deployments"],
        free(),
        webhook_list(&[]),
    );
    let r = check(ex, true, false).await;
    assert_only_failure(
        &r,
        "RBAC to install: not allowed to create clusterroles.rbac.authorization.k8s.io, create deployments.apps in trellis-system",
    );
}

#[tokio::test]
async fn preinstall_crd_name_taken() {
    let mut crds = free();
    crds[2] = ok(
        json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "peerauthentications.trellis.dev"},
        "spec": {"group": "trellis.dev", "scope": "Namespaced",
                 "names": {"kind": "PeerAuth", "plural": "peerauthentications"},
                 "versions": [{"name": "v1", "served": true, "storage": true}]}}),
    );
    let ex = preinstall_exchanges("31", &[], crds, webhook_list(&[]));
    let r = check(ex, true, false).await;
    assert_only_failure(
        &r,
        "CRD name peerauthentications.trellis.dev free or Trellis's: taken by kind PeerAuth of group trellis.dev",
    );
}

#[tokio::test]
async fn preinstall_other_mesh_injector() {
    let ex = preinstall_exchanges(
        "31",
        &[],
        free(),
        webhook_list(&[(
            "istio-sidecar-injector",
            "rev.namespace.sidecar-injector.istio.io",
        )]),
    );
    let r = check(ex, true, false).await;
    assert_only_failure(
        &r,
        "no other mesh's sidecar injector: found Istio (istio-sidecar-injector)",
    );
}

#[tokio::test]
async fn preinstall_api_server_unreachable() {
    // Nothing listens on a port that was just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
    let client = Client::try_from(config).unwrap();
    let scope = Scope {
        namespace: NS.into(),
        pre: true,
        proxy: false,
        lag_threshold_secs: 180,
    };
    let r = run(&client, &scope, NOW).await;
    let f = failed(&r);
    assert_eq!(f.len(), 1, "{}", r.render());
    assert!(
        f[0].starts_with("Kubernetes API server: not reachable: "),
        "{f:?}"
    );
}

// ---- real in-process proxies behind the recorded API server's pod proxy ----

mod live {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::time::Duration;

    use rcgen::{ExtendedKeyUsagePurpose, Issuer, SanType};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use trellis_proxy::config::{CONFIG_VERSION, MeshSettings, ProxyConfig, Telemetry};
    use trellis_proxy::run::Options;

    use super::*;

    /// Writes the files the way kubelet projects a ConfigMap: a new directory, then an atomic
    /// swap of `..data`.
    fn kubelet_write(dir: &Path, generation: u32, config: &str) {
        let ts = dir.join(format!("..gen_{generation}"));
        std::fs::create_dir(&ts).unwrap();
        std::fs::write(ts.join("config.json"), config).unwrap();
        std::fs::write(ts.join("labels"), "app=\"web\"\n").unwrap();
        let tmp = dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(ts.file_name().unwrap(), &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
        for f in ["config.json", "labels"] {
            let link = dir.join(f);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(Path::new("..data").join(f), &link).unwrap();
            }
        }
    }

    fn config(revision: &str) -> String {
        ProxyConfig {
            version: CONFIG_VERSION,
            revision: revision.into(),
            namespace: "shop".into(),
            mesh: MeshSettings {
                trust_domain: "cluster.local".into(),
                identity_endpoint: None,
                telemetry: Telemetry::default(),
                skip_detection_ports: vec![],
                detect_timeout_ms: 100,
            },
            inbound: vec![],
            outbound: vec![],
        }
        .to_json_pretty()
    }

    struct Proxy {
        admin: SocketAddr,
        dir: tempfile::TempDir,
        generation: u32,
        _running: trellis_proxy::run::Running,
    }

    /// A proxy holding a certificate for `spiffe://cluster.local/ns/shop/sa/web` that expires at
    /// `not_after` (Unix seconds).
    async fn proxy(issuer: &Issuer<'static, KeyPair>, ca_pem: &str, not_after: i64) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(
            "spiffe://cluster.local/ns/shop/sa/web".try_into().unwrap(),
        )];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).unwrap();
        let cert = p.signed_by(&key, issuer).unwrap();
        let (cp, kp, ca) = (
            dir.path().join("tls.crt"),
            dir.path().join("tls.key"),
            dir.path().join("ca.pem"),
        );
        std::fs::write(&cp, cert.pem()).unwrap();
        std::fs::write(&kp, key.serialize_pem()).unwrap();
        std::fs::write(&ca, ca_pem).unwrap();
        kubelet_write(dir.path(), 1, &config("rev-1"));
        let (tx, rx) = trellis_proxy::creds::channel();
        tokio::spawn(trellis_proxy::tls::watch_pem_files(cp, kp, ca, tx));
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let running = trellis_proxy::run::start(
            Options {
                dir: dir.path().to_path_buf(),
                outbound_addrs: vec![any],
                inbound_addrs: vec![any],
                admin_addrs: vec![any],
                local_mode: true,
                inbound_to_localhost: false,
                admin_limits: trellis_proxy::admin::Limits::default(),
                inbound_target: None,
                opaque_ports: vec![],
                tcp_flush_interval: Duration::from_secs(15),
                inbound_limits: Default::default(),
                app_probes: Default::default(),
                pod_ip: None,
                pod: Default::default(),
                discovery: None,
            },
            rx,
        )
        .await
        .unwrap();
        let p = Proxy {
            admin: running.admin_addr,
            dir,
            generation: 1,
            _running: running,
        };
        for _ in 0..250 {
            if admin_get(p.admin, "/ready").await.0 == 200 {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("proxy not ready");
    }

    impl Proxy {
        /// Projects a new config and waits until `/metrics` names its revision.
        async fn apply(&mut self, revision: &str) {
            self.generation += 1;
            kubelet_write(self.dir.path(), self.generation, &config(revision));
            let want = format!("trellis_proxy_config_info{{revision=\"{revision}\"}} 1");
            for _ in 0..250 {
                if admin_get(self.admin, "/metrics").await.1.contains(&want) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("{revision} not applied");
        }
    }

    /// One HTTP/1.1 GET to an admin port: (status, body).
    async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, body.to_string())
    }

    /// The recorded exchanges in order, except that the pod proxy's `/metrics` requests are
    /// relayed to the real proxies' admin ports when they arrive.
    async fn serve(
        handle: recorded::Handle,
        expected: Vec<(String, Reply)>,
        admins: BTreeMap<String, SocketAddr>,
    ) {
        let mut handle = handle;
        for (path, reply) in expected {
            let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
                .await
                .unwrap_or_else(|_| panic!("no GET {path}"))
                .expect("client dropped early");
            assert_eq!(req.uri().path_and_query().unwrap().as_str(), path);
            let live = admins.iter().find(|(pod, _)| {
                path == format!("/api/v1/namespaces/shop/pods/{pod}:15020/proxy/metrics")
            });
            let (status, body) = match live {
                Some((_, addr)) => {
                    let (status, body) = admin_get(*addr, "/metrics").await;
                    (status, body.into_bytes())
                }
                None => (reply.0, serde_json::to_vec(&reply.1).unwrap()),
            };
            send.send_response(
                http::Response::builder()
                    .status(status)
                    .body(kube::client::Body::from(body))
                    .unwrap(),
            );
        }
        let next = tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await;
        assert!(
            matches!(next, Ok(None)),
            "an extra request or the client was not dropped"
        );
    }

    fn paths(c: &Cluster) -> Vec<(String, Reply)> {
        // The same order as the recorded tests; the metrics replies are replaced live.
        let mut out = vec![("/version".to_string(), c.version.clone())];
        for (name, r) in &c.crds {
            out.push((
                format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"),
                r.clone(),
            ));
        }
        out.push((
            format!("/apis/apps/v1/namespaces/{NS}/deployments/trellis-operator"),
            c.deployment.clone(),
        ));
        out.push((
            format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/trellis-operator"),
            c.lease.clone(),
        ));
        out.push((
            "/apis/trellis.dev/v1alpha1/meshes/default".into(),
            c.mesh.clone(),
        ));
        out.push((
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/trellis-sidecar-injector".into(),
            c.webhook.clone(),
        ));
        out.push((
            format!("/api/v1/namespaces/{NS}/services/https:trellis-operator:443/proxy/inject"),
            c.webhook_answer.clone(),
        ));
        out.push((
            format!(
                "/api/v1/namespaces/{NS}/services/https:trellis-operator:15012/proxy/v1/certificate"
            ),
            c.identity_answer.clone(),
        ));
        out.push((
            "/api/v1/namespaces?&labelSelector=trellis.dev%2Finject%3Denabled".into(),
            c.namespaces.clone(),
        ));
        out.push((
            "/api/v1/namespaces/shop/configmaps/trellis-proxy".into(),
            c.configmap.clone(),
        ));
        let items: Vec<Value> = c.pods.iter().map(pod_json).collect();
        out.push((
            "/api/v1/namespaces/shop/pods?".into(),
            ok(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})),
        ));
        for p in &c.pods {
            out.push((
                format!(
                    "/api/v1/namespaces/shop/pods/{}:15020/proxy/metrics",
                    p.name
                ),
                ok(json!(null)),
            ));
        }
        out.push((REPORTS.into(), c.reports.clone()));
        out
    }

    async fn check_live(c: &Cluster, admins: &BTreeMap<String, SocketAddr>, now: i64) -> Report {
        let (client, handle) = recorded::mock();
        let server = tokio::spawn(serve(handle, paths(c), admins.clone()));
        let scope = Scope {
            namespace: NS.into(),
            pre: false,
            proxy: true,
            lag_threshold_secs: 180,
        };
        let r = run(&client, &scope, now).await;
        drop(client);
        server.await.unwrap();
        r
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn proxies_are_read_through_the_pod_proxy() {
        let now = jiff::Timestamp::now().as_second();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "mesh root");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ca_pem = p.self_signed(&key).unwrap().pem();
        let issuer = Issuer::new(p, key);
        let mut web1 = proxy(&issuer, &ca_pem, now + 6 * 3600 + 600).await;
        let web2 = proxy(&issuer, &ca_pem, now - 120).await;
        let admins: BTreeMap<String, SocketAddr> = [
            ("web-1".to_string(), web1.admin),
            ("web-2".to_string(), web2.admin),
        ]
        .into();

        let (mut c, _) = Cluster::healthy_at(now);
        let r = check_live(&c, &admins, now).await;
        let text = r.render();
        assert!(
            text.contains("[ok]   proxy web-1 certificate: expires in 6 h"),
            "{text}"
        );
        assert!(
            text.contains("[ok]   proxy web-1 config: revision rev-1, as the ConfigMap"),
            "{text}"
        );
        assert!(
            text.contains("[ok]   proxy web-2 config: revision rev-1, as the ConfigMap"),
            "{text}"
        );
        assert_eq!(
            failed(&r),
            ["proxy web-2 certificate: expired 2 min ago"],
            "{text}"
        );

        // The operator compiled a new config; only web-1's kubelet has projected it.
        c.configmap = configmap("rev-2");
        web1.apply("rev-2").await;
        let r = check_live(&c, &admins, now).await;
        assert_eq!(
            failed(&r),
            [
                "proxy web-2 certificate: expired 2 min ago",
                "proxy web-2 config: serves revision rev-1, the ConfigMap has rev-2",
            ],
            "{}",
            r.render()
        );
        assert!(
            r.render()
                .contains("[ok]   proxy web-1 config: revision rev-2, as the ConfigMap")
        );
    }
}

// ---- the binary: output and exit code against an HTTP API server stand-in ----

mod binary {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::process::Command;

    use super::*;

    /// Serves `GET`/`POST` by path from `replies` (a missing path is a 404 Status) on a
    /// thread, one request per connection, until the process ends.
    fn api_server(replies: Vec<(String, Value)>) -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let mut s = s.unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut len = 0;
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if h == "\r\n" || h.is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                let (status, reply) = match replies.iter().find(|(p, _)| *p == path) {
                    Some((_, v)) => (200, v.clone()),
                    None => (404, api_status(404, "NotFound", "not found")),
                };
                let bytes = serde_json::to_vec(&reply).unwrap();
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    bytes.len()
                );
                let _ = s.write_all(&bytes);
            }
        });
        port
    }

    fn trellis_check(port: u16) -> (i32, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("config");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:{port}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n"
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
            .args(["check", "--pre"])
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[test]
    fn exits_non_zero_when_a_check_fails() {
        let port = api_server(vec![("/version".into(), version("29").1)]);
        let (code, stdout, stderr) = trellis_check(port);
        assert_eq!(code, 1, "{stdout}{stderr}");
        assert!(
            stdout.contains("[FAIL] Kubernetes API server: version v1.29.2 is older than 1.30"),
            "{stdout}"
        );
        assert!(
            stdout.contains("hint: Trellis needs Kubernetes 1.30 or newer"),
            "{stdout}"
        );
        assert!(stderr.contains("1 check(s) failed"), "{stderr}");
    }

    #[test]
    fn exits_zero_when_every_check_passes() {
        let port = api_server(vec![
            ("/version".into(), version("31").1),
            (
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews?".into(),
                json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                       "spec": {}, "status": {"allowed": true}}),
            ),
            (
                "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations?".into(),
                webhook_list(&[]),
            ),
        ]);
        let (code, stdout, stderr) = trellis_check(port);
        assert_eq!(code, 0, "{stdout}{stderr}");
        assert!(stdout.contains("Status check results are ok"), "{stdout}");
    }
}
