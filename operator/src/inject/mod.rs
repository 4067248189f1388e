//! Sidecar injection: the pure decision and patch shared by the admission webhook
//! (`crate::webhook`) and `trellis inject` (`crate::cli::inject`).
//!
//! [`inject`] takes a pod, what is known of its namespace, the Mesh spec and the operator's
//! context, and returns a [`Decision`]: skip (out of scope, with the reason), deny (bad
//! annotations, with the reason), or a JSON Patch plus the patched pod. No I/O, no clock: the
//! same inputs give the same bytes, which the golden tests pin down.
//!
//! # Kubelet probes under `Strict` mTLS
//!
//! The kubelet probes from the node, in plaintext, with no workload certificate, so under
//! `Strict` mTLS the inbound proxy would refuse its probes. Like Istio, the injector rewrites the
//! app containers' (and native sidecars') `httpGet`, `tcpSocket` and `grpc` probes to the proxy's
//! admin port 15020 at `/app-health/<container>/<livez|readyz|startupz>`, keeping every timing
//! field, and hands the original probes to the proxy (`TRELLIS_APP_PROBES`, with the pod IP in
//! `TRELLIS_POD_IP`), which performs them against the app and answers with the result. No port is
//! excluded from the mesh because it is probed. `exec` probes and probes with `host:` are left
//! alone. The originals are kept in the `trellis.dev/original-probes` annotation, from which
//! [`uninject_pod_json`] restores them exactly. Details and the reasons in [`probes`]. The proxy's
//! own probes use its admin port 15020, which the rules never redirect.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, Container, ContainerPort, DownwardAPIProjection,
    DownwardAPIVolumeFile, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector,
    Pod, PodSpec, Probe, ProjectedVolumeSource, ResourceFieldSelector, ResourceRequirements,
    SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use crate::api::MeshSpec;
use crate::api::mesh::{LogLevel, PullPolicy};

pub mod probes;
pub mod scope;
pub mod webhook_config;

pub use probes::ANNOTATION_ORIGINAL_PROBES;
pub use scope::Scope;

/// `trellis.dev/inject: enabled|disabled` on a namespace (label) or pod (annotation or label).
pub const ANNOTATION_INJECT: &str = "trellis.dev/inject";
/// The injected proxy image, written on every injected pod (rollouts compare it with the Mesh).
pub const ANNOTATION_PROXY_VERSION: &str = "trellis.dev/proxy-version";
/// The proxy image for this pod instead of the Mesh's `spec.proxy.image`. The rollout
/// controller sets it on a workload's pod template to pin a workload that failed a new version
/// to the one it ran before (`failurePolicy: Rollback`).
pub const ANNOTATION_PROXY_IMAGE: &str = "trellis.dev/proxy-image";
/// Inbound ports never redirected to the proxy.
pub const ANNOTATION_EXCLUDE_INBOUND_PORTS: &str = "trellis.dev/exclude-inbound-ports";
/// Outbound destination ports never redirected to the proxy.
pub const ANNOTATION_EXCLUDE_OUTBOUND_PORTS: &str = "trellis.dev/exclude-outbound-ports";
/// Outbound destination CIDRs never redirected to the proxy.
pub const ANNOTATION_EXCLUDE_OUTBOUND_CIDRS: &str = "trellis.dev/exclude-outbound-cidrs";
/// Ports the proxy carries without protocol detection (mTLS kept).
pub const ANNOTATION_OPAQUE_PORTS: &str = "trellis.dev/opaque-ports";
/// `"true"`: the proxy forwards inbound traffic to `127.0.0.1`/`[::1]` instead of the pod IP,
/// for applications that bind only to localhost. Off by default because it exposes to the mesh
/// every service the application binds to loopback (debug and admin servers included), in
/// plaintext under `Permissive`/`Disable`.
pub const ANNOTATION_INBOUND_TO_LOCALHOST: &str = "trellis.dev/inbound-to-localhost";
pub const ANNOTATION_CPU_REQUEST: &str = "trellis.dev/proxy-cpu-request";
pub const ANNOTATION_CPU_LIMIT: &str = "trellis.dev/proxy-cpu-limit";
pub const ANNOTATION_MEMORY_REQUEST: &str = "trellis.dev/proxy-memory-request";
pub const ANNOTATION_MEMORY_LIMIT: &str = "trellis.dev/proxy-memory-limit";

/// Name of the injected proxy container (a native sidecar in `initContainers`).
pub const PROXY_CONTAINER: &str = "trellis-proxy";
/// The conventional annotation-based scrape annotations (see `scrape_annotations`).
pub const ANNOTATION_PROMETHEUS_SCRAPE: &str = "prometheus.io/scrape";
pub const ANNOTATION_PROMETHEUS_PORT: &str = "prometheus.io/port";
pub const ANNOTATION_PROMETHEUS_PATH: &str = "prometheus.io/path";
/// Name of the injected init container that writes the iptables rules.
pub const INIT_CONTAINER: &str = "trellis-init";
/// Name of the one projected volume.
pub const VOLUME: &str = "trellis";
/// Where the projected volume is mounted in the proxy.
pub const MOUNT_PATH: &str = "/var/run/trellis";
/// The proxy's UID; its traffic is never redirected.
pub const PROXY_UID: i64 = 2137;
pub const INBOUND_PORT: u16 = 15006;
pub const OUTBOUND_PORT: u16 = 15001;
pub const ADMIN_PORT: u16 = 15020;
/// Env var carrying the opaque ports to the proxy (comma-separated).
pub const ENV_OPAQUE_PORTS: &str = "TRELLIS_OPAQUE_PORTS";
/// Env var carrying [`ANNOTATION_INBOUND_TO_LOCALHOST`] to the proxy.
pub const ENV_INBOUND_TO_LOCALHOST: &str = "TRELLIS_INBOUND_TO_LOCALHOST";

/// Namespaces never injected, whatever their labels say.
pub const ALWAYS_EXCLUDED_NAMESPACES: [&str; 3] = scope::SYSTEM_NAMESPACES;

/// What the injector knows of the operator's deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectContext {
    /// The operator's own namespace, never injected.
    pub operator_namespace: String,
}

impl Default for InjectContext {
    fn default() -> Self {
        Self {
            operator_namespace: "trellis-system".into(),
        }
    }
}

/// The pod's namespace as the injector sees it.
#[derive(Clone, Copy, Debug)]
pub struct NamespaceInfo<'a> {
    pub name: &'a str,
    /// The namespace's labels; `None` when they are not known (the webhook's namespace cache has
    /// not seen it yet, or `trellis inject` working on files). Unknown labels count as selected:
    /// the API server only sends pods of selected namespaces (see [`webhook_config`]), and the
    /// CLI user asked for injection.
    pub labels: Option<&'a BTreeMap<String, String>>,
}

/// Why a pod was left alone. [`SkipReason::as_str`] is the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipReason {
    HostNetwork,
    AlreadyInjected,
    ExcludedNamespace,
    PodDisabled,
    NamespaceNotSelected,
    /// Another mesh's sidecar is there or its injector was asked for: two sets of iptables
    /// rules would fight over the pod's traffic.
    OtherMesh(OtherMesh),
}

/// A mesh whose sidecar Trellis will not stack on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OtherMesh {
    Istio,
    Linkerd,
}

impl OtherMesh {
    fn name(self) -> &'static str {
        match self {
            OtherMesh::Istio => "Istio",
            OtherMesh::Linkerd => "Linkerd",
        }
    }
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::HostNetwork => "host_network",
            SkipReason::AlreadyInjected => "already_injected",
            SkipReason::ExcludedNamespace => "excluded_namespace",
            SkipReason::PodDisabled => "pod_disabled",
            SkipReason::NamespaceNotSelected => "namespace_not_selected",
            SkipReason::OtherMesh(OtherMesh::Istio) => "istio",
            SkipReason::OtherMesh(OtherMesh::Linkerd) => "linkerd",
        }
    }

    /// What the user must be told about the skip (an admission warning, a note from
    /// `trellis inject`); `None` for the skips that are what they asked for.
    pub fn warning(self) -> Option<String> {
        match self {
            SkipReason::OtherMesh(m) => Some(format!(
                "trellis: sidecar not injected: the pod belongs to {} ({}); remove it from one \
                 mesh, or set trellis.dev/inject: disabled to silence this",
                m.name(),
                match m {
                    OtherMesh::Istio => "istio-proxy container or Istio injection requested",
                    OtherMesh::Linkerd => "linkerd-proxy container or Linkerd injection requested",
                }
            )),
            _ => None,
        }
    }
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SkipReason::HostNetwork => "pod uses the host network",
            SkipReason::AlreadyInjected => "pod already has a trellis proxy",
            SkipReason::ExcludedNamespace => "namespace is excluded from injection",
            SkipReason::PodDisabled => "pod opts out with trellis.dev/inject: disabled",
            SkipReason::NamespaceNotSelected => "namespace is not selected for injection",
            SkipReason::OtherMesh(m) => return write!(f, "pod is meshed by {}", m.name()),
        })
    }
}

/// Why a pod in scope cannot be injected.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("annotation {key}={value:?} is invalid: {why}")]
    BadAnnotation {
        key: String,
        value: String,
        why: String,
    },
    #[error("pod has no spec")]
    NoSpec,
    #[error("internal error building the patch: {0}")]
    Internal(String),
}

impl InjectError {
    /// Metric label of the denial.
    pub fn as_str(&self) -> &'static str {
        match self {
            InjectError::BadAnnotation { .. } => "bad_annotation",
            InjectError::NoSpec => "no_spec",
            InjectError::Internal(_) => "internal",
        }
    }
}

/// The injector's answer.
#[derive(Debug)]
pub enum Decision {
    /// Leave the pod unchanged.
    Skip { reason: SkipReason },
    /// Refuse the pod (its annotations ask for something invalid).
    Deny { reason: InjectError },
    /// Apply `patch`; `pod` is the result of applying it.
    Patch {
        patch: json_patch::Patch,
        pod: Box<Pod>,
        /// Things the user should know (shown by kubectl as admission warnings).
        warnings: Vec<String>,
    },
}

/// The Mesh spec with every field at its default (what an empty `spec: {}` means), for
/// `trellis inject` without `--mesh` and for tests.
pub fn default_mesh() -> MeshSpec {
    // Every MeshSpec field has a serde default, so an empty object always deserializes.
    serde_json::from_value(json!({})).unwrap_or_else(|e| unreachable!("MeshSpec defaults: {e}"))
}

/// Escapes one JSON Pointer reference token (RFC 6901): `~` as `~0`, `/` as `~1`.
pub fn escape_pointer_token(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// Parses an `enabled|disabled` style value (also `true|false`).
fn parse_switch(key: &str, value: &str) -> Result<bool, InjectError> {
    match value.trim() {
        "enabled" | "true" => Ok(true),
        "disabled" | "false" => Ok(false),
        _ => Err(InjectError::BadAnnotation {
            key: key.into(),
            value: value.into(),
            why: "expected enabled or disabled".into(),
        }),
    }
}

/// Whether a container with the proxy's name or the version annotation is already there.
pub fn is_injected(pod: &Pod) -> bool {
    let annotated = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(ANNOTATION_PROXY_VERSION));
    let has_container = pod.spec.as_ref().is_some_and(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .any(|c| c.name == PROXY_CONTAINER)
    });
    annotated || has_container
}

/// Decides whether `pod` gets a sidecar and builds the patch.
pub fn inject(pod: &Pod, ns: &NamespaceInfo<'_>, mesh: &MeshSpec, ctx: &InjectContext) -> Decision {
    let Some(spec) = pod.spec.as_ref() else {
        return Decision::Deny {
            reason: InjectError::NoSpec,
        };
    };
    if spec.host_network == Some(true) {
        return Decision::Skip {
            reason: SkipReason::HostNetwork,
        };
    }
    if is_injected(pod) {
        return Decision::Skip {
            reason: SkipReason::AlreadyInjected,
        };
    }
    let scope = Scope::new(mesh, &ctx.operator_namespace);
    if scope.namespace_excluded(ns.name) {
        return Decision::Skip {
            reason: SkipReason::ExcludedNamespace,
        };
    }
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    // The pod's annotation wins over its label, which wins over the namespace.
    let pod_choice = match annotations
        .get(ANNOTATION_INJECT)
        .or_else(|| labels.get(ANNOTATION_INJECT))
    {
        Some(v) => match parse_switch(ANNOTATION_INJECT, v) {
            Ok(b) => Some(b),
            Err(reason) => return Decision::Deny { reason },
        },
        None => None,
    };
    match pod_choice {
        Some(false) => {
            return Decision::Skip {
                reason: SkipReason::PodDisabled,
            };
        }
        Some(true) => {}
        None => {
            if ns
                .labels
                .is_some_and(|l| !scope.namespace_selected(ns.name, l))
            {
                return Decision::Skip {
                    reason: SkipReason::NamespaceNotSelected,
                };
            }
        }
    }
    // Only a pod that would be injected is checked, so opting out silences the warning.
    if let Some(m) = other_mesh(pod, ns) {
        return Decision::Skip {
            reason: SkipReason::OtherMesh(m),
        };
    }
    match build(pod, spec, annotations, mesh, ctx) {
        Ok((patch, pod, warnings)) => Decision::Patch {
            patch,
            pod: Box::new(pod),
            warnings,
        },
        Err(reason) => Decision::Deny { reason },
    }
}

/// Which other mesh, if any, owns the pod or was asked to: its proxy container is there
/// (`istio-proxy`, `linkerd-proxy`), its injector marked the pod (`sidecar.istio.io/status`,
/// `linkerd.io/proxy-version`), or the pod or its namespace asks for its injection
/// (`sidecar.istio.io/inject`, `linkerd.io/inject`, the namespace labels `istio-injection`
/// and `istio.io/rev`). The other injector may run after ours, so the request counts as much as
/// the container.
pub fn other_mesh(pod: &Pod, ns: &NamespaceInfo<'_>) -> Option<OtherMesh> {
    let empty = BTreeMap::new();
    let ann = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let ns_labels = ns.labels.unwrap_or(&empty);
    let pod_says = |key: &str| ann.get(key).or_else(|| labels.get(key)).map(String::as_str);
    let has_container = |name: &str| {
        pod.spec.as_ref().is_some_and(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .any(|c| c.name == name)
        })
    };
    let istio_pod = pod_says("sidecar.istio.io/inject");
    let istio_ns = ns_labels.get("istio-injection").map(String::as_str) == Some("enabled")
        || ns_labels.contains_key("istio.io/rev");
    let istio = has_container("istio-proxy")
        || ann.contains_key("sidecar.istio.io/status")
        || matches!(istio_pod, Some("true" | "enabled"))
        || (istio_ns && !matches!(istio_pod, Some("false" | "disabled")));
    if istio {
        return Some(OtherMesh::Istio);
    }
    let linkerd = has_container("linkerd-proxy")
        || ann.contains_key("linkerd.io/proxy-version")
        || matches!(pod_says("linkerd.io/inject"), Some("enabled" | "ingress"));
    linkerd.then_some(OtherMesh::Linkerd)
}

/// Validated per-pod settings read from annotations.
struct PodOptions {
    /// The proxy image: the pod's pin, else the Mesh's.
    image: String,
    exclude_inbound_ports: Vec<u16>,
    exclude_outbound_ports: Vec<u16>,
    exclude_outbound_cidrs: Vec<String>,
    opaque_ports: Vec<u16>,
    inbound_to_localhost: bool,
    resources: ResourceRequirements,
}

fn bad(key: &str, value: &str, why: impl ToString) -> InjectError {
    InjectError::BadAnnotation {
        key: key.into(),
        value: value.into(),
        why: why.to_string(),
    }
}

fn ports_annotation(ann: &BTreeMap<String, String>, key: &str) -> Result<Vec<u16>, InjectError> {
    match ann.get(key) {
        Some(v) => trellis_proxy::init::rules::parse_ports(v).map_err(|e| bad(key, v, e)),
        None => Ok(Vec::new()),
    }
}

/// A Kubernetes quantity (`100m`, `1.5`, `64Mi`, `1e3`), checked by shape so a typo is refused
/// at admission instead of failing pod creation later with a less helpful message.
fn valid_quantity(s: &str) -> bool {
    let s = s.trim_start_matches('+');
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let number_ok = !number.is_empty()
        && number.matches('.').count() <= 1
        && number.chars().any(|c| c.is_ascii_digit());
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || (suffix.len() > 1
        && (suffix.starts_with('e') || suffix.starts_with('E'))
        && suffix[1..]
            .trim_start_matches(['+', '-'])
            .parse::<u32>()
            .is_ok());
    number_ok && suffix_ok
}

fn options(ann: &BTreeMap<String, String>, mesh: &MeshSpec) -> Result<PodOptions, InjectError> {
    let exclude_outbound_cidrs = match ann.get(ANNOTATION_EXCLUDE_OUTBOUND_CIDRS) {
        Some(v) => trellis_proxy::init::rules::parse_cidrs(v)
            .map_err(|e| bad(ANNOTATION_EXCLUDE_OUTBOUND_CIDRS, v, e))?
            .iter()
            .map(ToString::to_string)
            .collect(),
        None => Vec::new(),
    };
    let r = &mesh.proxy.resources;
    let quantity = |key: &str, default: Option<&String>| -> Result<Option<Quantity>, InjectError> {
        match ann.get(key) {
            Some(v) if valid_quantity(v) => Ok(Some(Quantity(v.clone()))),
            Some(v) => Err(bad(key, v, "expected a quantity such as 100m or 64Mi")),
            None => Ok(default.map(|d| Quantity(d.clone()))),
        }
    };
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if let Some(q) = quantity(ANNOTATION_CPU_REQUEST, Some(&r.cpu_request))? {
        requests.insert("cpu".to_string(), q);
    }
    if let Some(q) = quantity(ANNOTATION_MEMORY_REQUEST, Some(&r.memory_request))? {
        requests.insert("memory".to_string(), q);
    }
    if let Some(q) = quantity(ANNOTATION_CPU_LIMIT, r.cpu_limit.as_ref())? {
        limits.insert("cpu".to_string(), q);
    }
    if let Some(q) = quantity(ANNOTATION_MEMORY_LIMIT, Some(&r.memory_limit))? {
        limits.insert("memory".to_string(), q);
    }
    let image = match ann.get(ANNOTATION_PROXY_IMAGE) {
        Some(v) if !v.is_empty() && v.len() <= 512 && !v.contains(char::is_whitespace) => v.clone(),
        Some(v) => {
            return Err(bad(
                ANNOTATION_PROXY_IMAGE,
                v,
                "expected an image reference",
            ));
        }
        None => mesh.proxy.effective_image().to_owned(),
    };
    Ok(PodOptions {
        image,
        exclude_inbound_ports: ports_annotation(ann, ANNOTATION_EXCLUDE_INBOUND_PORTS)?,
        exclude_outbound_ports: ports_annotation(ann, ANNOTATION_EXCLUDE_OUTBOUND_PORTS)?,
        exclude_outbound_cidrs,
        opaque_ports: ports_annotation(ann, ANNOTATION_OPAQUE_PORTS)?,
        inbound_to_localhost: match ann.get(ANNOTATION_INBOUND_TO_LOCALHOST).map(String::as_str) {
            None | Some("false") => false,
            Some("true") => true,
            Some(v) => {
                return Err(bad(
                    ANNOTATION_INBOUND_TO_LOCALHOST,
                    v,
                    "expected \"true\" or \"false\"",
                ));
            }
        },
        resources: ResourceRequirements {
            requests: (!requests.is_empty()).then_some(requests),
            limits: (!limits.is_empty()).then_some(limits),
            ..Default::default()
        },
    })
}

fn join<T: ToString>(v: &[T]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn pull_policy(p: PullPolicy) -> String {
    match p {
        PullPolicy::Always => "Always",
        PullPolicy::IfNotPresent => "IfNotPresent",
        PullPolicy::Never => "Never",
    }
    .into()
}

fn log_level(l: LogLevel) -> String {
    match l {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    }
    .into()
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The proxy's CPU allowance in millicores, for its runtime sizing (`trellis_proxy::workers`):
/// the container's CPU limit, else its request. Never the limit when none is set: the downward
/// API then reports the node's allocatable CPU, which would size a sidecar like the node.
fn cpu_allowance_env(resources: &ResourceRequirements) -> Option<EnvVar> {
    let has_cpu =
        |m: &Option<BTreeMap<String, Quantity>>| m.as_ref().is_some_and(|m| m.contains_key("cpu"));
    let resource = if has_cpu(&resources.limits) {
        "limits.cpu"
    } else if has_cpu(&resources.requests) {
        "requests.cpu"
    } else {
        return None;
    };
    Some(EnvVar {
        name: trellis_proxy::workers::ENV_CPU_MILLIS.into(),
        value_from: Some(EnvVarSource {
            resource_field_ref: Some(ResourceFieldSelector {
                resource: resource.into(),
                divisor: Some(Quantity("1m".into())),
                container_name: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn value_env(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value),
        ..Default::default()
    }
}

fn admin_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(ADMIN_PORT)),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(3),
        ..Default::default()
    }
}

/// The proxy as a native sidecar: an init container with `restartPolicy: Always` starts before
/// the app containers (after its startup probe passes, i.e. once it holds a certificate) and is
/// stopped after them, so Jobs complete.
fn proxy_container(
    mesh: &MeshSpec,
    o: &PodOptions,
    app_probes: &str,
    ctx: &InjectContext,
) -> Container {
    let mut env = vec![
        field_env("TRELLIS_POD_NAMESPACE", "metadata.namespace"),
        field_env("TRELLIS_POD_NAME", "metadata.name"),
        field_env("TRELLIS_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        value_env("TRELLIS_LOG_LEVEL", log_level(mesh.proxy.log_level)),
        value_env("TRELLIS_DIR", MOUNT_PATH.into()),
        // The version the proxy reports (`trellis_proxy_build_info{version}`): the image it
        // was injected with, the same string as the pod's `trellis.dev/proxy-version`, so the
        // old-proxy alert compares what the rollout compares (see `webhook::DesiredProxy`).
        value_env("TRELLIS_PROXY_VERSION", o.image.clone()),
        // The operator's discovery stream (every replica serves it behind the Service) and the
        // identity it must present: destinations the ConfigMap does not list resolve there.
        value_env(
            "TRELLIS_DISCOVERY_ADDR",
            format!(
                "{}:{}",
                crate::ca::serving::operator_service_dns(&ctx.operator_namespace),
                crate::discovery::DEFAULT_PORT
            ),
        ),
        value_env(
            "TRELLIS_DISCOVERY_ID",
            crate::discovery::replica::operator_id(&mesh.trust_domain, &ctx.operator_namespace),
        ),
    ];
    env.extend(cpu_allowance_env(&o.resources));
    if !o.opaque_ports.is_empty() {
        env.push(value_env(ENV_OPAQUE_PORTS, join(&o.opaque_ports)));
    }
    if o.inbound_to_localhost {
        env.push(value_env(ENV_INBOUND_TO_LOCALHOST, "true".into()));
    }
    if !app_probes.is_empty() {
        // The pod IP is where the kubelet would have probed; the proxy probes there too.
        env.push(field_env("TRELLIS_POD_IP", "status.podIP"));
        env.push(value_env(probes::ENV_APP_PROBES, app_probes.into()));
    }
    Container {
        name: PROXY_CONTAINER.into(),
        image: Some(o.image.clone()),
        image_pull_policy: Some(pull_policy(mesh.proxy.image_pull_policy)),
        restart_policy: Some("Always".into()),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("trellis-admin".into()),
            container_port: i32::from(ADMIN_PORT),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        // Startup gates the app containers: up to 5 minutes to obtain the first certificate.
        startup_probe: Some(admin_probe("/ready", 1, 300)),
        readiness_probe: Some(admin_probe("/ready", 2, 3)),
        liveness_probe: Some(admin_probe("/live", 10, 3)),
        resources: Some(o.resources.clone()),
        security_context: Some(SecurityContext {
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: VOLUME.into(),
            mount_path: MOUNT_PATH.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// The iptables init container: root with `NET_ADMIN` and `NET_RAW` only (iptables needs both),
/// everything else dropped.
fn init_container(mesh: &MeshSpec, o: &PodOptions) -> Container {
    let mut args: Vec<String> = [
        "init",
        "--proxy-uid",
        &PROXY_UID.to_string(),
        "--inbound-port",
        &INBOUND_PORT.to_string(),
        "--outbound-port",
        &OUTBOUND_PORT.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (flag, value) in [
        ("--exclude-inbound-ports", join(&o.exclude_inbound_ports)),
        ("--exclude-outbound-ports", join(&o.exclude_outbound_ports)),
        (
            "--exclude-outbound-cidrs",
            o.exclude_outbound_cidrs.join(","),
        ),
    ] {
        if !value.is_empty() {
            args.push(flag.into());
            args.push(value);
        }
    }
    Container {
        name: INIT_CONTAINER.into(),
        image: Some(o.image.clone()),
        image_pull_policy: Some(pull_policy(mesh.proxy.image_pull_policy)),
        args: Some(args),
        resources: Some(o.resources.clone()),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn projected_volume() -> Volume {
    let config_map = |name: &str, key: &str| VolumeProjection {
        config_map: Some(ConfigMapProjection {
            name: name.into(),
            items: Some(vec![KeyToPath {
                key: key.into(),
                path: key.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    Volume {
        name: VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![
                config_map("trellis-proxy", "config.json"),
                config_map("trellis-trust-bundle", "ca.pem"),
                VolumeProjection {
                    downward_api: Some(DownwardAPIProjection {
                        items: Some(vec![DownwardAPIVolumeFile {
                            path: "labels".into(),
                            field_ref: Some(ObjectFieldSelector {
                                field_path: "metadata.labels".into(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }]),
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some("trellis".into()),
                        expiration_seconds: Some(3600),
                        path: "token".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(crate) fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, InjectError> {
    serde_json::to_value(v).map_err(|e| InjectError::Internal(e.to_string()))
}

type Built = (json_patch::Patch, Pod, Vec<String>);

/// The conventional `prometheus.io/*` annotations pointing an annotation-based Prometheus
/// scrape at the proxy's admin port, when `observability.metrics` is on.
///
/// They are one target per pod, so a pod can advertise only one: when the app already sets any
/// `prometheus.io/*` annotation, the app's are kept untouched and the proxy is not advertised
/// there (its metrics are still scraped by the installed Prometheus or the PodMonitor, which
/// find it by its `trellis-admin` port, not by annotation). Istio instead merges the app's
/// metrics into the proxy's endpoint; Trellis does not proxy the app's metrics (README,
/// "Metrics of apps with their own prometheus.io annotations").
fn scrape_annotations(
    annotations: &BTreeMap<String, String>,
    mesh: &MeshSpec,
) -> Vec<(&'static str, String)> {
    let apps_own = annotations.keys().any(|k| k.starts_with("prometheus.io/"));
    if !mesh.observability.metrics.enabled || apps_own {
        return Vec::new();
    }
    vec![
        (ANNOTATION_PROMETHEUS_SCRAPE, "true".into()),
        (ANNOTATION_PROMETHEUS_PORT, ADMIN_PORT.to_string()),
        (ANNOTATION_PROMETHEUS_PATH, "/metrics".into()),
    ]
}

fn build(
    pod: &Pod,
    spec: &PodSpec,
    annotations: &BTreeMap<String, String>,
    mesh: &MeshSpec,
    ctx: &InjectContext,
) -> Result<Built, InjectError> {
    let o = options(annotations, mesh)?;
    let rewrite = probes::rewrite(spec)?;
    let app_probes = if rewrite.is_empty() {
        String::new()
    } else {
        serde_json::to_string(&rewrite.app_probes)
            .map_err(|e| InjectError::Internal(e.to_string()))?
    };
    let init = to_value(&init_container(mesh, &o))?;
    let proxy = to_value(&proxy_container(mesh, &o, &app_probes, ctx))?;
    let volume = to_value(&projected_volume())?;

    let mut ops = Vec::new();
    if pod.metadata.annotations.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {}}));
    }
    ops.push(json!({
        "op": "add",
        "path": format!("/metadata/annotations/{}", escape_pointer_token(ANNOTATION_PROXY_VERSION)),
        "value": o.image,
    }));
    for (key, value) in scrape_annotations(annotations, mesh) {
        ops.push(json!({
            "op": "add",
            "path": format!("/metadata/annotations/{}", escape_pointer_token(key)),
            "value": value,
        }));
    }
    if !rewrite.is_empty() {
        let originals = serde_json::to_string(&rewrite.originals)
            .map_err(|e| InjectError::Internal(e.to_string()))?;
        ops.push(json!({
            "op": "add",
            "path": format!("/metadata/annotations/{}", escape_pointer_token(ANNOTATION_ORIGINAL_PROBES)),
            "value": originals,
        }));
    }
    // Probe rewrites address containers by their index in the pod as it came in, so they go
    // before our init containers shift `initContainers`.
    ops.extend(rewrite.ops);
    if spec.init_containers.is_none() {
        ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": []}));
    }
    // The iptables init container first, then the proxy, then the pod's own init containers
    // (whose traffic is then already meshed).
    ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": init}));
    ops.push(json!({"op": "add", "path": "/spec/initContainers/1", "value": proxy}));
    if spec.volumes.is_none() {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": []}));
    }
    ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume}));

    let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops))
        .map_err(|e| InjectError::Internal(e.to_string()))?;
    let mut doc = to_value(pod)?;
    json_patch::patch(&mut doc, &patch).map_err(|e| InjectError::Internal(e.to_string()))?;
    let patched: Pod =
        serde_json::from_value(doc).map_err(|e| InjectError::Internal(e.to_string()))?;
    Ok((patch, patched, rewrite.warnings))
}

/// Removes exactly what [`inject`] adds from a pod (or pod template) given as JSON: the two
/// init containers, the projected volume and the version annotation, puts the original kubelet
/// probes back (see [`probes::restore`]), and removes the array/object that
/// held them when it is left empty (inject creates them when missing). An input that had an
/// empty `annotations: {}` or `volumes: []` comes back without it, which Kubernetes treats the
/// same. Returns whether the pod was injected.
pub fn uninject_pod_json(pod: &mut Value) -> bool {
    let mut changed = probes::restore(pod);
    if let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) {
        changed |= remove_named(spec, "initContainers", &[INIT_CONTAINER, PROXY_CONTAINER]);
        changed |= remove_named(spec, "volumes", &[VOLUME]);
    }
    if let Some(meta) = pod.get_mut("metadata").and_then(Value::as_object_mut)
        && let Some(ann) = meta.get_mut("annotations").and_then(Value::as_object_mut)
        && ann.remove(ANNOTATION_PROXY_VERSION).is_some()
    {
        changed = true;
        // The scrape annotations the injector added: port 15020 is the proxy's, never an app's.
        if ann.get(ANNOTATION_PROMETHEUS_PORT).and_then(Value::as_str)
            == Some(ADMIN_PORT.to_string().as_str())
        {
            for key in [
                ANNOTATION_PROMETHEUS_SCRAPE,
                ANNOTATION_PROMETHEUS_PORT,
                ANNOTATION_PROMETHEUS_PATH,
            ] {
                ann.remove(key);
            }
        }
        if ann.is_empty() {
            meta.remove("annotations");
        }
    }
    changed
}

fn remove_named(obj: &mut serde_json::Map<String, Value>, key: &str, names: &[&str]) -> bool {
    let Some(list) = obj.get_mut(key).and_then(Value::as_array_mut) else {
        return false;
    };
    let before = list.len();
    list.retain(|item| {
        !item
            .get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| names.contains(&n))
    });
    let changed = list.len() != before;
    if changed && list.is_empty() {
        obj.remove(key);
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-container pod in `shop` with the given annotations, as the webhook sees it.
    fn annotated_pod(ann: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "a", "namespace": "shop", "annotations": ann},
            "spec": {"containers": [{"name": "app", "image": "app"}]}
        }))
        .unwrap()
    }

    const SHOP: NamespaceInfo<'static> = NamespaceInfo {
        name: "shop",
        labels: None,
    };

    #[test]
    fn pointer_tokens_escape_tilde_then_slash() {
        assert_eq!(
            escape_pointer_token("trellis.dev/proxy-version"),
            "trellis.dev~1proxy-version"
        );
        assert_eq!(escape_pointer_token("a~/b"), "a~0~1b");
    }

    /// Issue 15: with `observability.metrics` on, an injected pod advertises the proxy's
    /// metrics to annotation-based scrapes; an app's own `prometheus.io/*` annotations are kept
    /// as they are (one target per pod); uninjecting removes only what the injector added.
    #[test]
    fn metrics_on_adds_scrape_annotations_unless_the_app_has_its_own() {
        let pod = annotated_pod;
        let ns = SHOP;
        let ctx = InjectContext::default();
        let mut mesh = default_mesh();
        let annotations_after = |p: &Pod, mesh: &MeshSpec| {
            let Decision::Patch { pod: out, .. } = inject(p, &ns, mesh, &ctx) else {
                panic!("not injected");
            };
            out.metadata.annotations.unwrap()
        };
        // Off (the default): nothing added.
        let ann = annotations_after(&pod(json!({})), &mesh);
        assert!(!ann.contains_key(ANNOTATION_PROMETHEUS_SCRAPE), "{ann:?}");
        mesh.observability.metrics.enabled = true;
        let ann = annotations_after(&pod(json!({})), &mesh);
        assert_eq!(ann[ANNOTATION_PROMETHEUS_SCRAPE], "true");
        assert_eq!(ann[ANNOTATION_PROMETHEUS_PORT], "15020");
        assert_eq!(ann[ANNOTATION_PROMETHEUS_PATH], "/metrics");
        // The app's own: kept, none of ours added.
        let app = pod(json!({"prometheus.io/scrape": "true", "prometheus.io/port": "8080"}));
        let ann = annotations_after(&app, &mesh);
        assert_eq!(ann[ANNOTATION_PROMETHEUS_PORT], "8080");
        assert!(!ann.contains_key(ANNOTATION_PROMETHEUS_PATH), "{ann:?}");
        // Uninject takes ours away and leaves the app's.
        let Decision::Patch { pod: out, .. } = inject(&pod(json!({})), &ns, &mesh, &ctx) else {
            panic!("not injected");
        };
        let mut v = serde_json::to_value(&out).unwrap();
        assert!(uninject_pod_json(&mut v));
        assert!(v["metadata"].get("annotations").is_none(), "{v}");
        let Decision::Patch { pod: out, .. } = inject(&app, &ns, &mesh, &ctx) else {
            panic!("not injected");
        };
        let mut v = serde_json::to_value(&out).unwrap();
        assert!(uninject_pod_json(&mut v));
        assert_eq!(v["metadata"]["annotations"]["prometheus.io/port"], "8080");
    }

    /// The rollout's rollback pin: the pod's `trellis.dev/proxy-image` wins over the Mesh's
    /// image for both containers and the version annotation; a malformed one is refused.
    #[test]
    fn a_pinned_pod_gets_its_pinned_image() {
        let pod = annotated_pod;
        let ns = SHOP;
        let mesh = default_mesh();
        let ctx = InjectContext::default();
        let pinned = pod(json!({ANNOTATION_PROXY_IMAGE: "proxy:old"}));
        let Decision::Patch { pod: out, .. } = inject(&pinned, &ns, &mesh, &ctx) else {
            panic!("not injected");
        };
        let ann = out.metadata.annotations.unwrap();
        assert_eq!(ann[ANNOTATION_PROXY_VERSION], "proxy:old");
        let inits = out.spec.unwrap().init_containers.unwrap();
        assert_eq!(inits.len(), 2);
        for c in &inits {
            assert_eq!(c.image.as_deref(), Some("proxy:old"), "{}", c.name);
        }
        // The proxy reports the same version as `trellis_proxy_build_info{version}`, which
        // the old-proxy alert compares with the operator's desired one.
        let proxy = inits.iter().find(|c| c.name == PROXY_CONTAINER).unwrap();
        let reported = proxy
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "TRELLIS_PROXY_VERSION")
            .and_then(|e| e.value.as_deref());
        assert_eq!(reported, Some("proxy:old"));
        let Decision::Patch { pod: out, .. } = inject(&pod(json!({})), &ns, &mesh, &ctx) else {
            panic!("not injected");
        };
        assert_eq!(
            out.metadata.annotations.unwrap()[ANNOTATION_PROXY_VERSION],
            mesh.proxy.effective_image()
        );
        let bad = pod(json!({ANNOTATION_PROXY_IMAGE: "two words"}));
        assert!(matches!(
            inject(&bad, &ns, &mesh, &ctx),
            Decision::Deny {
                reason: InjectError::BadAnnotation { .. }
            }
        ));
    }

    /// The proxy's runtime follows its CPU allowance: the limit when the pod or Mesh sets one,
    /// else the request, as millicores from the downward API.
    #[test]
    fn the_proxy_gets_its_cpu_limit_else_its_request_as_millicores() {
        let pod = annotated_pod;
        let ns = SHOP;
        let ctx = InjectContext::default();
        let allowance = |mesh: &MeshSpec, ann: serde_json::Value| -> Option<(String, String)> {
            let Decision::Patch { pod: out, .. } = inject(&pod(ann), &ns, mesh, &ctx) else {
                panic!("not injected");
            };
            let inits = out.spec.unwrap().init_containers.unwrap();
            let proxy = inits.iter().find(|c| c.name == PROXY_CONTAINER).unwrap();
            let env = proxy.env.as_ref().unwrap();
            let e = env
                .iter()
                .find(|e| e.name == trellis_proxy::workers::ENV_CPU_MILLIS)?;
            let r = e.value_from.as_ref()?.resource_field_ref.as_ref()?;
            assert_eq!(r.divisor, Some(Quantity("1m".into())));
            assert_eq!(r.container_name, None, "its own container");
            Some((
                r.resource.clone(),
                proxy
                    .resources
                    .clone()
                    .unwrap()
                    .limits
                    .map_or(String::new(), |l| {
                        l.get("cpu").map_or(String::new(), |q| q.0.clone())
                    }),
            ))
        };
        let mut mesh = default_mesh();
        assert!(mesh.proxy.resources.cpu_limit.is_none());
        assert_eq!(
            allowance(&mesh, json!({})),
            Some(("requests.cpu".into(), String::new()))
        );
        assert_eq!(
            allowance(&mesh, json!({ANNOTATION_CPU_LIMIT: "2"})),
            Some(("limits.cpu".into(), "2".into()))
        );
        mesh.proxy.resources.cpu_limit = Some("1500m".into());
        assert_eq!(
            allowance(&mesh, json!({})),
            Some(("limits.cpu".into(), "1500m".into()))
        );
    }

    #[test]
    fn quantities() {
        for ok in ["10m", "1", "0.5", "64Mi", "1Gi", "1e3", "+2", "100k"] {
            assert!(valid_quantity(ok), "{ok}");
        }
        for bad in ["", "ten", "10mb", "1..2", "Mi", "-1", "1e"] {
            assert!(!valid_quantity(bad), "{bad}");
        }
    }
}
