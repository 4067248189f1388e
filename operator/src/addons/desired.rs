//! The objects `Mesh.spec.observability` asks for, built by pure functions of the Mesh, the
//! operator's namespace and whether the Prometheus Operator's API is served. No I/O: the
//! applier ([`super::controller`]) converges the cluster to this list.
//!
//! Every object is labelled `trellis.dev/addon: <addon>` (how the applier finds what it made,
//! to delete what is no longer wanted) and owned by the Mesh (deleting the Mesh deletes them),
//! and carries the hash of its own body in `trellis.dev/addon-hash`, so a pass applies only
//! what is missing or differs from what it last applied instead of patching a dozen objects
//! every time anything changes.
//!
//! Install mode lives in the operator's own namespace only, departing from "a namespace the
//! Mesh names" (issue 15): creating Deployments, Services and ServiceAccounts anywhere would
//! need a cluster-wide grant to create workloads, while a Role in its own namespace keeps the
//! operator at least privilege (operator/src/rbac.rs).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{assets, images};
use crate::api::Mesh;
use crate::api::mesh::ObservabilityMode;

/// Label naming the addon an object belongs to; its presence marks objects this module made.
pub const ADDON_LABEL: &str = "trellis.dev/addon";
/// `evaluation` on everything install mode makes: not for production.
pub const GRADE_LABEL: &str = "trellis.dev/grade";
/// The hash of an object's desired body (see the module docs).
pub const HASH_ANNOTATION: &str = "trellis.dev/addon-hash";
/// On a pod template: the hash of the configuration the pods mount, so a changed configuration
/// restarts them (Prometheus and Grafana read their provisioning only at start).
pub const CONFIG_HASH_ANNOTATION: &str = "trellis.dev/config-hash";
/// The label the Grafana chart's dashboard sidecar watches for.
pub const GRAFANA_DASHBOARD_LABEL: &str = "grafana_dashboard";

pub const PROMETHEUS: &str = "trellis-prometheus";
pub const GRAFANA: &str = "trellis-grafana";
pub const JAEGER: &str = "trellis-jaeger";
/// The ConfigMap with the dashboards (both modes).
pub const DASHBOARDS: &str = "trellis-dashboards";
/// The PodMonitor scraping every sidecar.
pub const POD_MONITOR: &str = "trellis-proxies";
/// The ServiceMonitor scraping the operator (`config/manager/metrics_service.yaml`).
pub const SERVICE_MONITOR: &str = "trellis-operator";
/// The PrometheusRule with the Trellis alerts.
pub const PROMETHEUS_RULE: &str = "trellis";

/// Every name this module gives an object: the applier deletes only objects with one of these
/// names (and the addon label and the Mesh as owner), and the RBAC limits patch/delete to them.
pub const NAMES: [&str; 7] = [
    PROMETHEUS,
    GRAFANA,
    JAEGER,
    DASHBOARDS,
    POD_MONITOR,
    SERVICE_MONITOR,
    PROMETHEUS_RULE,
];

pub const PROMETHEUS_PORT: u16 = 9090;
pub const GRAFANA_PORT: u16 = 3000;
pub const JAEGER_UI_PORT: u16 = 16686;
pub const OTLP_GRPC_PORT: u16 = 4317;
pub const OTLP_HTTP_PORT: u16 = 4318;

/// The scrape job (and `job` label) of the sidecars, in both modes.
pub const PROXY_JOB: &str = "trellis-proxies";
/// The scrape job of the operator's replicas (mode Install).
pub const OPERATOR_JOB: &str = "trellis-operator";

/// The kinds the addons are made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    ServiceAccount,
    ClusterRole,
    ClusterRoleBinding,
    ConfigMap,
    Service,
    Deployment,
    NetworkPolicy,
    PodMonitor,
    ServiceMonitor,
    PrometheusRule,
}

impl Kind {
    /// Every kind, in the order objects are applied (what others refer to first).
    pub const ALL: [Kind; 10] = [
        Kind::ServiceAccount,
        Kind::ClusterRole,
        Kind::ClusterRoleBinding,
        Kind::ConfigMap,
        Kind::Service,
        Kind::NetworkPolicy,
        Kind::Deployment,
        Kind::PodMonitor,
        Kind::ServiceMonitor,
        Kind::PrometheusRule,
    ];

    /// `(group, version, kind, plural, namespaced)`.
    pub const fn gvk(self) -> (&'static str, &'static str, &'static str, &'static str, bool) {
        match self {
            Kind::ServiceAccount => ("", "v1", "ServiceAccount", "serviceaccounts", true),
            Kind::ClusterRole => (
                "rbac.authorization.k8s.io",
                "v1",
                "ClusterRole",
                "clusterroles",
                false,
            ),
            Kind::ClusterRoleBinding => (
                "rbac.authorization.k8s.io",
                "v1",
                "ClusterRoleBinding",
                "clusterrolebindings",
                false,
            ),
            Kind::ConfigMap => ("", "v1", "ConfigMap", "configmaps", true),
            Kind::Service => ("", "v1", "Service", "services", true),
            Kind::Deployment => ("apps", "v1", "Deployment", "deployments", true),
            Kind::NetworkPolicy => (
                "networking.k8s.io",
                "v1",
                "NetworkPolicy",
                "networkpolicies",
                true,
            ),
            Kind::PodMonitor => (
                "monitoring.coreos.com",
                "v1",
                "PodMonitor",
                "podmonitors",
                true,
            ),
            Kind::ServiceMonitor => (
                "monitoring.coreos.com",
                "v1",
                "ServiceMonitor",
                "servicemonitors",
                true,
            ),
            Kind::PrometheusRule => (
                "monitoring.coreos.com",
                "v1",
                "PrometheusRule",
                "prometheusrules",
                true,
            ),
        }
    }

    /// Kinds of the Prometheus Operator's API: listed and applied only when it is served.
    pub const fn is_prometheus_operator(self) -> bool {
        matches!(
            self,
            Kind::PodMonitor | Kind::ServiceMonitor | Kind::PrometheusRule
        )
    }

    pub fn api_version(self) -> String {
        let (group, version, ..) = self.gvk();
        if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        }
    }
}

/// Which addon an object serves; the value of [`ADDON_LABEL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Addon {
    Prometheus,
    Grafana,
    Jaeger,
    /// Integrate mode: the Prometheus Operator objects.
    Monitoring,
    /// Integrate mode: the dashboard ConfigMap.
    Dashboards,
}

impl Addon {
    pub fn as_str(self) -> &'static str {
        match self {
            Addon::Prometheus => "prometheus",
            Addon::Grafana => "grafana",
            Addon::Jaeger => "jaeger",
            Addon::Monitoring => "monitoring",
            Addon::Dashboards => "dashboards",
        }
    }
}

/// Identifies an object: what the applier compares desired and observed objects by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: Kind,
    /// `None` for cluster-scoped kinds.
    pub namespace: Option<String>,
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (.., kind, _, _) = self.kind.gvk();
        match &self.namespace {
            Some(ns) => write!(f, "{kind} {ns}/{}", self.name),
            None => write!(f, "{kind} {}", self.name),
        }
    }
}

/// One object to keep, with its full server-side apply body (hash annotation included).
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    pub key: ObjectKey,
    pub addon: Addon,
    pub body: Value,
}

impl Object {
    /// The value of [`HASH_ANNOTATION`] in the body.
    pub fn hash(&self) -> &str {
        self.body["metadata"]["annotations"][HASH_ANNOTATION]
            .as_str()
            .unwrap_or_default()
    }
}

/// What the desired objects are built from.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    pub mesh: &'a Mesh,
    /// The operator's namespace (`POD_NAMESPACE`): where install mode puts everything.
    pub namespace: &'a str,
    /// Whether `monitoring.coreos.com/v1` is served (discovery).
    pub prometheus_operator: bool,
}

/// The OTLP/gRPC endpoint of the Jaeger install mode runs in `namespace`, which the compiler
/// gives the sidecars when tracing has no `collector`.
pub fn jaeger_collector(namespace: &str) -> String {
    format!("http://{JAEGER}.{namespace}.svc:{OTLP_GRPC_PORT}")
}

/// Whether install mode runs Jaeger for this Mesh: tracing on, no collector of the user's.
pub fn installs_jaeger(mesh: &Mesh) -> bool {
    let o = &mesh.spec.observability;
    o.mode == ObservabilityMode::Install
        && o.tracing.enabled
        && o.tracing.collector.as_deref().is_none_or(str::is_empty)
}

/// The namespace of the dashboard ConfigMap.
pub fn dashboards_namespace<'a>(mesh: &'a Mesh, namespace: &'a str) -> &'a str {
    match mesh.spec.observability.mode {
        ObservabilityMode::Integrate => mesh
            .spec
            .observability
            .dashboards
            .namespace
            .as_deref()
            .unwrap_or(namespace),
        ObservabilityMode::Install => namespace,
    }
}

/// Every object the Mesh asks for, in apply order ([`Kind::ALL`]). Integrate-mode objects of
/// the Prometheus Operator's API are left out when it is not served (the status says so).
pub fn desired(i: &Inputs<'_>) -> Result<Vec<Object>, DesiredError> {
    let o = &i.mesh.spec.observability;
    let mut out = Vec::new();
    match o.mode {
        ObservabilityMode::Install => {
            if o.metrics.enabled {
                out.extend(prometheus(i));
            }
            if o.dashboards.enabled {
                out.extend(grafana(i));
            }
            if installs_jaeger(i.mesh) {
                out.extend(jaeger(i));
            }
        }
        ObservabilityMode::Integrate => {
            if o.metrics.enabled && i.prometheus_operator {
                out.extend(monitoring(i)?);
            }
            if o.dashboards.enabled {
                out.push(dashboards_configmap(i, Addon::Dashboards));
            }
        }
    }
    out.sort_by_key(|o| Kind::ALL.iter().position(|k| *k == o.key.kind));
    Ok(out)
}

/// A desired object that cannot be built (a bug in the shipped assets, never user input).
#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    #[error("the shipped alert rules (addons/assets.rs) are not a valid rule file: {0}")]
    AlertRules(String),
}

fn hash_hex(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}

fn owner(mesh: &Mesh) -> Option<OwnerReference> {
    mesh.controller_owner_ref(&())
}

/// Builds an object: metadata (labels, owner, hash) around `rest` (its other top-level fields).
fn object(
    i: &Inputs<'_>,
    kind: Kind,
    namespace: Option<&str>,
    name: &str,
    addon: Addon,
    extra_labels: &[(&str, &str)],
    rest: Value,
) -> Object {
    let mut labels: BTreeMap<String, String> = [
        ("app.kubernetes.io/name", name),
        ("app.kubernetes.io/part-of", "trellis"),
        ("app.kubernetes.io/managed-by", "trellis-operator"),
        (ADDON_LABEL, addon.as_str()),
    ]
    .into_iter()
    .chain(extra_labels.iter().copied())
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if i.mesh.spec.observability.mode == ObservabilityMode::Install {
        labels.insert(GRADE_LABEL.into(), "evaluation".into());
    }
    let mut metadata = json!({
        "name": name,
        "labels": labels,
    });
    if let Some(ns) = namespace {
        metadata["namespace"] = json!(ns);
    }
    if let Some(o) = owner(i.mesh) {
        metadata["ownerReferences"] = json!([o]);
    }
    let mut body = json!({
        "apiVersion": kind.api_version(),
        "kind": kind.gvk().2,
        "metadata": metadata,
    });
    if let (Value::Object(b), Value::Object(r)) = (&mut body, rest) {
        b.extend(r);
    }
    let hash = hash_hex(body.to_string().as_bytes());
    body["metadata"]["annotations"] = json!({ HASH_ANNOTATION: hash });
    Object {
        key: ObjectKey {
            kind,
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
        },
        addon,
        body,
    }
}

/// The container security every addon runs with: non-root, no privilege, nothing written
/// outside its emptyDir volumes.
fn container_security() -> Value {
    json!({
        "runAsNonRoot": true,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

/// A one-replica Deployment of `container` (name, labels and the pod's security set here).
#[allow(clippy::too_many_arguments)]
fn deployment(
    i: &Inputs<'_>,
    name: &str,
    addon: Addon,
    uid: i64,
    config_hash: Option<String>,
    service_account: Option<&str>,
    container: Value,
    volumes: Value,
) -> Object {
    let selector = json!({"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "trellis"});
    let mut template_meta = json!({"labels": selector});
    if let Some(h) = config_hash {
        template_meta["annotations"] = json!({ CONFIG_HASH_ANNOTATION: h });
    }
    let mut pod = json!({
        "automountServiceAccountToken": service_account.is_some(),
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": uid,
            "runAsGroup": uid,
            "fsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    });
    if let Some(sa) = service_account {
        pod["serviceAccountName"] = json!(sa);
    }
    object(
        i,
        Kind::Deployment,
        Some(i.namespace),
        name,
        addon,
        &[],
        json!({
            "spec": {
                "replicas": 1,
                // One replica with emptyDir storage: replace, never run two side by side.
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": selector},
                "template": {
                    "metadata": template_meta,
                    // No sidecar: the addons are not part of the mesh they observe (the
                    // operator's namespace is never injected anyway).
                    "spec": pod,
                },
            },
        }),
    )
}

fn service(i: &Inputs<'_>, name: &str, addon: Addon, ports: &[(&str, u16)]) -> Object {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "port": p, "targetPort": n, "protocol": "TCP"}))
        .collect();
    object(
        i,
        Kind::Service,
        Some(i.namespace),
        name,
        addon,
        &[],
        json!({"spec": {
            "type": "ClusterIP",
            "selector": {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "trellis"},
            "ports": ports,
        }}),
    )
}

/// Who may connect to an addon's pods: `from` is a list of NetworkPolicy peers per port; a port
/// not listed accepts nothing over the network (`kubectl port-forward` still works: it enters
/// the pod's network namespace, which NetworkPolicies do not filter).
fn network_policy(i: &Inputs<'_>, name: &str, addon: Addon, ingress: Value) -> Object {
    object(
        i,
        Kind::NetworkPolicy,
        Some(i.namespace),
        name,
        addon,
        &[],
        json!({"spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "trellis"}},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        }}),
    )
}

fn resources(cpu_req: &str, mem_req: &str, cpu_lim: &str, mem_lim: &str) -> Value {
    json!({
        "requests": {"cpu": cpu_req, "memory": mem_req},
        "limits": {"cpu": cpu_lim, "memory": mem_lim},
    })
}

fn image<'a>(over: &'a Option<String>, pinned: &'a str) -> &'a str {
    over.as_deref().filter(|s| !s.is_empty()).unwrap_or(pinned)
}

/// Prometheus's scrape configuration: every sidecar's admin port, found by the proxy
/// container's `trellis-admin` port (as injected), in every namespace; and the operator's
/// replicas (port `admin`, 8080) in `namespace`. Targets carry the `namespace`, `pod` and `app`
/// labels the dashboards and `trellis stat` group by (docs/observability.md).
pub fn prometheus_config(namespace: &str) -> String {
    format!(
        r#"# Written by the Trellis operator (Mesh.spec.observability, mode Install). Evaluation grade.
global:
  scrape_interval: 15s
  evaluation_interval: 15s
rule_files:
  - /etc/prometheus/trellis-rules.yaml
scrape_configs:
  - job_name: {PROXY_JOB}
    metrics_path: /metrics
    kubernetes_sd_configs:
      - role: pod
    relabel_configs:
      # Only the injected proxy's admin port ({admin}), not the app's containers.
      - source_labels: [__meta_kubernetes_pod_container_name, __meta_kubernetes_pod_container_port_name]
        regex: {proxy};trellis-admin
        action: keep
      - source_labels: [__meta_kubernetes_pod_phase]
        regex: Running
        action: keep
      - source_labels: [__meta_kubernetes_namespace]
        target_label: namespace
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
      - source_labels: [__meta_kubernetes_pod_label_app]
        target_label: app
  - job_name: {OPERATOR_JOB}
    metrics_path: /metrics
    kubernetes_sd_configs:
      - role: pod
        namespaces:
          names: [{namespace}]
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_name, __meta_kubernetes_pod_container_port_name]
        regex: trellis-operator;admin
        action: keep
      - source_labels: [__meta_kubernetes_namespace]
        target_label: namespace
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
"#,
        admin = crate::inject::ADMIN_PORT,
        proxy = crate::inject::PROXY_CONTAINER,
    )
}

fn prometheus(i: &Inputs<'_>) -> Vec<Object> {
    let ns = i.namespace;
    let config = prometheus_config(ns);
    let data = json!({"prometheus.yml": config, "trellis-rules.yaml": assets::ALERT_RULES});
    let config_hash = hash_hex(data.to_string().as_bytes());
    let container = json!({
        "name": "prometheus",
        "image": image(&i.mesh.spec.observability.metrics.image, images::PROMETHEUS),
        "args": [
            "--config.file=/etc/prometheus/prometheus.yml",
            "--storage.tsdb.path=/prometheus",
            // Evaluation: a day of data in an emptyDir, bounded in size too.
            "--storage.tsdb.retention.time=24h",
            "--storage.tsdb.retention.size=1GB",
        ],
        "ports": [{"name": "http", "containerPort": PROMETHEUS_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/-/ready", "port": "http"}, "periodSeconds": 10},
        "livenessProbe": {"httpGet": {"path": "/-/healthy", "port": "http"}, "periodSeconds": 20},
        "resources": resources("100m", "256Mi", "1", "1536Mi"),
        "securityContext": container_security(),
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/prometheus", "readOnly": true},
            {"name": "data", "mountPath": "/prometheus"},
        ],
    });
    let volumes = json!([
        {"name": "config", "configMap": {"name": PROMETHEUS}},
        {"name": "data", "emptyDir": {"sizeLimit": "2Gi"}},
    ]);
    vec![
        object(
            i,
            Kind::ServiceAccount,
            Some(ns),
            PROMETHEUS,
            Addon::Prometheus,
            &[],
            json!({"automountServiceAccountToken": true}),
        ),
        // Pod discovery (kubernetes_sd role pod) needs nothing else: not endpoints, services
        // or nodes. The operator holds these verbs itself, as RBAC requires of a role's creator.
        object(
            i,
            Kind::ClusterRole,
            None,
            PROMETHEUS,
            Addon::Prometheus,
            &[],
            json!({
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
            }),
        ),
        object(
            i,
            Kind::ClusterRoleBinding,
            None,
            PROMETHEUS,
            Addon::Prometheus,
            &[],
            json!({
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": PROMETHEUS},
                "subjects": [{"kind": "ServiceAccount", "name": PROMETHEUS, "namespace": ns}],
            }),
        ),
        object(
            i,
            Kind::ConfigMap,
            Some(ns),
            PROMETHEUS,
            Addon::Prometheus,
            &[],
            json!({"data": data}),
        ),
        service(
            i,
            PROMETHEUS,
            Addon::Prometheus,
            &[("http", PROMETHEUS_PORT)],
        ),
        // Audience: the installed Grafana (and `kubectl port-forward`); nobody else.
        network_policy(
            i,
            PROMETHEUS,
            Addon::Prometheus,
            json!([{
                "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": GRAFANA, "app.kubernetes.io/part-of": "trellis"}}}],
                "ports": [{"port": PROMETHEUS_PORT, "protocol": "TCP"}],
            }]),
        ),
        deployment(
            i,
            PROMETHEUS,
            Addon::Prometheus,
            65534,
            Some(config_hash),
            Some(PROMETHEUS),
            container,
            volumes,
        ),
    ]
}

/// Grafana's provisioning: the installed Prometheus as the default data source, and the
/// dashboards from the `trellis-dashboards` ConfigMap.
pub fn grafana_provisioning(namespace: &str) -> (String, String) {
    let datasources = format!(
        r#"apiVersion: 1
datasources:
  - name: Prometheus
    uid: prometheus
    type: prometheus
    access: proxy
    url: http://{PROMETHEUS}.{namespace}.svc:{PROMETHEUS_PORT}
    isDefault: true
    editable: false
"#
    );
    let providers = r#"apiVersion: 1
providers:
  - name: trellis
    folder: Trellis
    type: file
    disableDeletion: true
    allowUiUpdates: false
    options:
      path: /etc/grafana/dashboards/trellis
"#
    .to_string();
    (datasources, providers)
}

fn dashboards_configmap(i: &Inputs<'_>, addon: Addon) -> Object {
    let data: BTreeMap<&str, &str> = assets::dashboards()
        .iter()
        .map(|d| (d.file_name, d.json))
        .collect();
    let ns = dashboards_namespace(i.mesh, i.namespace);
    object(
        i,
        Kind::ConfigMap,
        Some(ns),
        DASHBOARDS,
        addon,
        &[(GRAFANA_DASHBOARD_LABEL, "1")],
        json!({"data": data}),
    )
}

fn grafana(i: &Inputs<'_>) -> Vec<Object> {
    let ns = i.namespace;
    let (datasources, providers) = grafana_provisioning(ns);
    let provisioning = json!({"datasources.yaml": datasources, "dashboards.yaml": providers});
    let dashboards = dashboards_configmap(i, Addon::Grafana);
    let config_hash = hash_hex(format!("{provisioning}{}", dashboards.body["data"]).as_bytes());
    let env = |k: &str, v: &str| json!({"name": k, "value": v});
    let container = json!({
        "name": "grafana",
        "image": image(&i.mesh.spec.observability.dashboards.image, images::GRAFANA),
        "env": [
            env("GF_PATHS_PROVISIONING", "/etc/grafana/provisioning"),
            env("GF_PATHS_DATA", "/var/lib/grafana"),
            env("GF_PATHS_LOGS", "/var/log/grafana"),
            // No default admin password to leak: anonymous read-only viewers (with Explore),
            // and no login form. Reached through `kubectl port-forward` only.
            env("GF_AUTH_ANONYMOUS_ENABLED", "true"),
            env("GF_AUTH_ANONYMOUS_ORG_ROLE", "Viewer"),
            env("GF_AUTH_DISABLE_LOGIN_FORM", "true"),
            env("GF_USERS_VIEWERS_CAN_EDIT", "true"),
            env("GF_ANALYTICS_REPORTING_ENABLED", "false"),
            env("GF_ANALYTICS_CHECK_FOR_UPDATES", "false"),
            env("GF_ANALYTICS_CHECK_FOR_PLUGIN_UPDATES", "false"),
        ],
        "ports": [{"name": "http", "containerPort": GRAFANA_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/api/health", "port": "http"}, "periodSeconds": 10},
        "resources": resources("50m", "128Mi", "500m", "512Mi"),
        "securityContext": container_security(),
        "volumeMounts": [
            {"name": "provisioning", "mountPath": "/etc/grafana/provisioning/datasources/datasources.yaml", "subPath": "datasources.yaml", "readOnly": true},
            {"name": "provisioning", "mountPath": "/etc/grafana/provisioning/dashboards/dashboards.yaml", "subPath": "dashboards.yaml", "readOnly": true},
            {"name": "dashboards", "mountPath": "/etc/grafana/dashboards/trellis", "readOnly": true},
            {"name": "data", "mountPath": "/var/lib/grafana"},
            {"name": "logs", "mountPath": "/var/log/grafana"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    });
    let volumes = json!([
        {"name": "provisioning", "configMap": {"name": GRAFANA}},
        {"name": "dashboards", "configMap": {"name": DASHBOARDS}},
        {"name": "data", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "logs", "emptyDir": {"sizeLimit": "256Mi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
    ]);
    vec![
        object(
            i,
            Kind::ConfigMap,
            Some(ns),
            GRAFANA,
            Addon::Grafana,
            &[],
            json!({"data": provisioning}),
        ),
        dashboards,
        service(i, GRAFANA, Addon::Grafana, &[("http", GRAFANA_PORT)]),
        // Audience: `kubectl port-forward` only.
        network_policy(i, GRAFANA, Addon::Grafana, json!([])),
        deployment(
            i,
            GRAFANA,
            Addon::Grafana,
            472,
            Some(config_hash),
            None,
            container,
            volumes,
        ),
    ]
}

fn jaeger(i: &Inputs<'_>) -> Vec<Object> {
    let container = json!({
        "name": "jaeger",
        "image": image(&i.mesh.spec.observability.tracing.image, images::JAEGER),
        "ports": [
            {"name": "otlp-grpc", "containerPort": OTLP_GRPC_PORT, "protocol": "TCP"},
            {"name": "otlp-http", "containerPort": OTLP_HTTP_PORT, "protocol": "TCP"},
            {"name": "ui", "containerPort": JAEGER_UI_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {"tcpSocket": {"port": "otlp-grpc"}, "periodSeconds": 10},
        // Traces are kept in memory (the all-in-one default): the limit bounds them.
        "resources": resources("50m", "128Mi", "500m", "512Mi"),
        "securityContext": container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    });
    let volumes = json!([{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}]);
    vec![
        service(
            i,
            JAEGER,
            Addon::Jaeger,
            &[
                ("otlp-grpc", OTLP_GRPC_PORT),
                ("otlp-http", OTLP_HTTP_PORT),
                ("ui", JAEGER_UI_PORT),
            ],
        ),
        // Audience: OTLP from the sidecars in any namespace; the UI by port-forward only.
        network_policy(
            i,
            JAEGER,
            Addon::Jaeger,
            json!([{
                "from": [{"namespaceSelector": {}}],
                "ports": [{"port": OTLP_GRPC_PORT, "protocol": "TCP"}, {"port": OTLP_HTTP_PORT, "protocol": "TCP"}],
            }]),
        ),
        deployment(
            i,
            JAEGER,
            Addon::Jaeger,
            10001,
            None,
            None,
            container,
            volumes,
        ),
    ]
}

/// Integrate mode: the Prometheus Operator objects.
fn monitoring(i: &Inputs<'_>) -> Result<Vec<Object>, DesiredError> {
    let ns = i.namespace;
    let rules: Value = serde_saphyr::from_str(assets::ALERT_RULES)
        .map_err(|e| DesiredError::AlertRules(e.to_string()))?;
    if !rules["groups"].is_array() {
        return Err(DesiredError::AlertRules("no `groups:` list".into()));
    }
    Ok(vec![
        // Every pod in every namespace whose proxy container exposes `trellis-admin` (only
        // injected pods do): Prometheus Operator keeps targets by port name.
        object(
            i,
            Kind::PodMonitor,
            Some(ns),
            POD_MONITOR,
            Addon::Monitoring,
            &[],
            json!({"spec": {
                "jobLabel": "app.kubernetes.io/name",
                "namespaceSelector": {"any": true},
                "selector": {},
                // The workload label the dashboards group by (docs/observability.md).
            "podTargetLabels": ["app"],
            "podMetricsEndpoints": [{
                    "port": "trellis-admin",
                    "path": "/metrics",
                    "relabelings": [{"targetLabel": "job", "replacement": PROXY_JOB, "action": "replace"}],
                }],
            }}),
        ),
        object(
            i,
            Kind::ServiceMonitor,
            Some(ns),
            SERVICE_MONITOR,
            Addon::Monitoring,
            &[],
            json!({"spec": {
                "namespaceSelector": {"matchNames": [ns]},
                "selector": {"matchLabels": {
                    "app.kubernetes.io/name": "trellis-operator",
                    "app.kubernetes.io/component": "metrics",
                }},
                "endpoints": [{"port": "http-metrics", "path": "/metrics"}],
            }}),
        ),
        object(
            i,
            Kind::PrometheusRule,
            Some(ns),
            PROMETHEUS_RULE,
            Addon::Monitoring,
            &[],
            json!({"spec": {
                "groups": rules["groups"],
            }}),
        ),
    ])
}
