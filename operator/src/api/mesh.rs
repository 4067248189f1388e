//! `Mesh`: the one cluster-scoped object (named `default`) that configures the whole mesh.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::conditions::Condition;

/// Mesh-wide configuration. Only the Mesh named `default` is acted on.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    kind = "Mesh",
    doc = "Mesh-wide configuration of the Trellis service mesh: identity (trust domain and CA), sidecar injection and rollout, proxy settings and observability addons. Only the Mesh named `default` is acted on.",
    plural = "meshes",
    shortname = "mesh",
    status = "MeshStatus",
    validation = Rule::new("self.metadata.name == 'default'")
        .message("the mesh is the Mesh named `default`: rename this object to default")
        .reason(Reason::FieldValueInvalid),
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Trust Domain","type":"string","jsonPath":".spec.trustDomain"}"#,
    printcolumn = r#"{"name":"Proxies","type":"integer","jsonPath":".status.proxies.total"}"#,
    printcolumn = r#"{"name":"Up To Date","type":"integer","jsonPath":".status.proxies.upToDate"}"#,
    printcolumn = r#"{"name":"Rollout","type":"string","jsonPath":".status.rollout.state"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeshSpec {
    /// SPIFFE trust domain of every workload identity (`spiffe://<trustDomain>/ns/<ns>/sa/<sa>`).
    /// Changing it re-issues every certificate. Defaults to `cluster.local`.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// The certificate authority that signs workload certificates.
    #[serde(default)]
    pub ca: CaSpec,
    /// Lifetime of workload certificates, as a duration such as `24h` or `90m`, from `10m` to
    /// `2160h` (90 days). Sidecars renew at 70 % of it. Shorter is safer.
    #[serde(default = "default_workload_cert_ttl")]
    #[schemars(length(max = 32))]
    #[x_kube(
        validation = super::duration_rule(),
        validation = WORKLOAD_CERT_TTL.rule()
    )]
    pub workload_cert_ttl: String,
    /// Which pods get a sidecar.
    #[serde(default)]
    pub injection: InjectionSpec,
    /// Settings of the injected sidecar proxy.
    #[serde(default)]
    pub proxy: ProxySpec,
    /// How new sidecar versions reach running workloads.
    #[serde(default)]
    pub rollout: RolloutSpec,
    /// Metrics, dashboards and tracing addons.
    #[serde(default)]
    pub observability: ObservabilitySpec,
    /// What each namespace's sidecars are told about the mesh's Services.
    #[serde(default)]
    pub outbound: OutboundSpec,
    /// How sidecars learn about destinations: what the `trellis-proxy` ConfigMaps carry, given
    /// the discovery stream.
    #[serde(default)]
    pub discovery: DiscoverySpec,
}

/// What the sidecars get from the ConfigMap and what from the operator's discovery stream.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiscoverySpec {
    /// What each namespace's `trellis-proxy` ConfigMap lists. `Auto` (the default): per
    /// namespace, the full table while its `config.json` stays within 64 KiB, else the
    /// bootstrap set, so small meshes keep the resilience of a full table and no ConfigMap
    /// grows with the cluster (the Mesh's `Programmed` condition names the namespaces that
    /// carry the bootstrap set). `Full`: every Service the namespace may see, always, so a
    /// sidecar can call all of them with no operator reachable, at a size that grows with the
    /// cluster (past about 1 500 Services a ConfigMap exceeds 1 MiB and stops updating,
    /// `ConfigTooLarge`). `Bootstrap`: always only the mesh settings, inbound policy, the
    /// namespace's own Services and the backends their TrafficPolicies split to; everything
    /// else is resolved on demand from the discovery stream (port 15010). The size then does
    /// not grow with the cluster, but a sidecar that cannot reach the operator can call only
    /// what its ConfigMap and its cache hold: a new destination leaves as plain TCP until the
    /// stream is back. `trellis dev` runs no discovery stream: it treats `Auto` as `Full` and
    /// refuses `Bootstrap`.
    #[serde(default)]
    pub config_map: ConfigMapContent,
}

/// See [`DiscoverySpec::config_map`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConfigMapContent {
    /// Per namespace, `Full` while the full table fits 64 KiB, else `Bootstrap`.
    #[default]
    Auto,
    /// Every Service the namespace may see, whatever the size.
    Full,
    /// The namespace's own Services and their split backends; the rest comes from the stream.
    Bootstrap,
}

/// Defaults of the outbound table compiled for every meshed namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboundSpec {
    /// Which namespaces see a Service that has no `trellis.dev/export-to` annotation, with the
    /// annotation's values (as Istio's `defaultServiceExportTo`): `*` every namespace (the
    /// default), `.` the Service's own namespace, `~` none, or namespace names. `["."]` keeps each
    /// namespace's config to its own Services plus those annotated for it, which keeps configs
    /// small in large meshes and makes a TrafficPolicy edit rewrite only the namespaces that see
    /// its Service.
    #[serde(default = "default_export_to")]
    #[schemars(length(min = 1, max = 32), inner(length(max = 63)))]
    #[x_kube(
        validation = Rule::new("self.all(x, x == '*' || x == '.' || x == '~' || x.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'))")
            .message("defaultExportTo entries are *, ., ~ or namespace names"),
        validation = Rule::new("!self.exists(x, x == '~') || self.size() == 1")
            .message("~ (no namespace) cannot be combined with other entries")
    )]
    pub default_export_to: Vec<String>,
}

impl Default for OutboundSpec {
    fn default() -> Self {
        Self {
            default_export_to: default_export_to(),
        }
    }
}

fn default_export_to() -> Vec<String> {
    vec!["*".into()]
}

/// The spec an empty `spec: {}` deserializes to.
impl Default for MeshSpec {
    fn default() -> Self {
        Self {
            trust_domain: default_trust_domain(),
            ca: CaSpec::default(),
            workload_cert_ttl: default_workload_cert_ttl(),
            injection: InjectionSpec::default(),
            proxy: ProxySpec::default(),
            rollout: RolloutSpec::default(),
            observability: ObservabilitySpec::default(),
            outbound: OutboundSpec::default(),
            discovery: DiscoverySpec::default(),
        }
    }
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}
fn default_workload_cert_ttl() -> String {
    "24h".into()
}

/// Certificate authority settings. Exactly one of `selfSigned` or `secretRef` applies; with
/// neither, a self-signed root with default validity is created.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("!(has(self.selfSigned) && has(self.secretRef))")
    .message("set either selfSigned or secretRef, not both"))]
#[serde(rename_all = "camelCase")]
pub struct CaSpec {
    /// Let the operator create and keep a self-signed root CA (stored in a Secret in the
    /// operator's namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_signed: Option<SelfSignedCa>,
    /// Use a CA you supply (for example one cert-manager keeps) instead of a self-signed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<CaSecretRef>,
}

/// A self-signed root CA managed by the operator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SelfSignedCa {
    /// Validity of the root certificate, as a duration such as `8760h` (one year), from `24h`
    /// to `876000h` (100 years), and at least 5 times `workloadCertTtl`. The operator rotates
    /// the root, without downtime, when it nears expiry.
    #[serde(default = "default_root_validity")]
    #[schemars(length(max = 32))]
    #[x_kube(
        validation = super::duration_rule(),
        validation = ROOT_VALIDITY.rule()
    )]
    pub root_validity: String,
}

impl Default for SelfSignedCa {
    fn default() -> Self {
        Self {
            root_validity: default_root_validity(),
        }
    }
}

fn default_root_validity() -> String {
    "87600h".into()
}

/// The allowed range of a duration field, checked twice with the same bounds: by a CEL rule in
/// the CRD (so `kubectl apply` refuses it with the message) and at run time (a Mesh admitted
/// before the rule existed, or edited where the rule is not enforced, must not reach the CA).
#[derive(Debug, Clone, Copy)]
pub struct DurationRange {
    /// The field's path under `spec`, for messages.
    pub field: &'static str,
    pub min: &'static str,
    pub max: &'static str,
}

/// `workloadCertTtl`: below 10 minutes every sidecar renews all the time (at `0s` certificates
/// expire on issue); above 90 days a stolen key stays useful for too long.
pub const WORKLOAD_CERT_TTL: DurationRange = DurationRange {
    field: "workloadCertTtl",
    min: "10m",
    max: "2160h",
};

/// `ca.selfSigned.rootValidity`: a root must outlive a rotation (its last 20 % must hold the
/// longest workload certificate plus propagation), and a validity past the 100-year mark would
/// overflow certificate dates.
pub const ROOT_VALIDITY: DurationRange = DurationRange {
    field: "ca.selfSigned.rootValidity",
    min: "24h",
    max: "876000h",
};

/// How many workload certificate lifetimes a root must last at least: rotation starts with
/// 20 % (one fifth) of the root's life left and must finish within it.
pub const ROOT_VALIDITY_PER_TTL: u32 = 5;

/// Why a Mesh duration is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDuration {
    #[error("spec.{field}: {source}")]
    Syntax {
        field: &'static str,
        source: crate::duration::DurationError,
    },
    #[error("spec.{field} {value:?} is out of range: it must be between {min} and {max}")]
    OutOfRange {
        field: &'static str,
        value: String,
        min: &'static str,
        max: &'static str,
    },
    #[error(
        "spec.ca.selfSigned.rootValidity {root:?} is too short for spec.workloadCertTtl {ttl:?}: \
         the root must last at least {ROOT_VALIDITY_PER_TTL} workload certificate lifetimes"
    )]
    RootTooShort { root: String, ttl: String },
}

impl DurationRange {
    /// The CEL rule (beside the grammar rule, which reports malformed strings).
    pub fn rule(&self) -> kube::core::Rule {
        kube::core::Rule::new(format!(
            "!self.matches('{pattern}') || (duration(self) >= duration('{min}') && duration(self) <= duration('{max}'))",
            pattern = crate::duration::PATTERN,
            min = self.min,
            max = self.max,
        ))
        .message(kube::core::Message::Message(format!(
            "must be between {} and {}",
            self.min, self.max
        )))
    }

    /// Parses `value` and checks the range.
    pub fn check(&self, value: &str) -> Result<std::time::Duration, InvalidDuration> {
        let parse = |v: &str| {
            crate::duration::parse(v).map_err(|source| InvalidDuration::Syntax {
                field: self.field,
                source,
            })
        };
        let d = parse(value)?;
        if d < parse(self.min)? || d > parse(self.max)? {
            return Err(InvalidDuration::OutOfRange {
                field: self.field,
                value: value.to_string(),
                min: self.min,
                max: self.max,
            });
        }
        Ok(d)
    }
}

impl MeshSpec {
    /// `workloadCertTtl`, validated.
    pub fn workload_cert_ttl(&self) -> Result<std::time::Duration, InvalidDuration> {
        WORKLOAD_CERT_TTL.check(&self.workload_cert_ttl)
    }

    /// `ca.selfSigned.rootValidity` (its default when unset), validated, also against
    /// `workloadCertTtl`.
    pub fn root_validity(&self) -> Result<std::time::Duration, InvalidDuration> {
        let root = self
            .ca
            .self_signed
            .clone()
            .unwrap_or_default()
            .root_validity;
        let validity = ROOT_VALIDITY.check(&root)?;
        let ttl = self.workload_cert_ttl()?;
        if validity < ttl * ROOT_VALIDITY_PER_TTL {
            return Err(InvalidDuration::RootTooShort {
                root,
                ttl: self.workload_cert_ttl.clone(),
            });
        }
        Ok(validity)
    }
}

/// A Secret holding a CA certificate and key (`tls.crt`, `tls.key`, and optionally `ca.crt`
/// with extra roots to trust).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaSecretRef {
    /// Name of the Secret.
    pub name: String,
    /// Namespace of the Secret; defaults to the operator's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// What happens to pod creation when the injection webhook cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FailurePolicy {
    /// Refuse pod creation: no pod in a meshed namespace ever runs without its sidecar.
    #[default]
    Fail,
    /// Admit the pod without a sidecar: availability over security.
    Ignore,
}

/// Which pods get a sidecar.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InjectionSpec {
    /// Namespaces whose pods are injected, by label. Defaults to namespaces labelled
    /// `trellis.dev/inject: enabled`; a selector given here replaces that label (it alone then
    /// selects nothing). A namespace labelled `trellis.dev/inject: disabled` is never selected.
    /// A pod's own `trellis.dev/inject` wins, and a pod labelled `trellis.dev/inject: enabled`
    /// is injected in any namespace that is not excluded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// What the API server does with pods when the webhook is unreachable: `Fail` or `Ignore`.
    /// There is no silent default in the webhook configuration: this value is written as is.
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// Namespaces never injected, in addition to `kube-system`, `kube-public`,
    /// `kube-node-lease` and the operator's own namespace.
    #[serde(default)]
    pub excluded_namespaces: Vec<String>,
}

impl Default for InjectionSpec {
    fn default() -> Self {
        Self {
            namespace_selector: None,
            failure_policy: FailurePolicy::Fail,
            excluded_namespaces: Vec::new(),
        }
    }
}

/// A label selector (the `matchLabels` part of `metav1.LabelSelector`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels that must all be present with these values.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// Image pull policy of the sidecar.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

/// Log level of the sidecar.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

/// Access log format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AccessLogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// One human-readable line per request.
    Text,
}

/// Settings of the injected sidecar.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxySpec {
    /// Sidecar image. Empty or absent: the operator's own proxy image (its `--proxy-image`
    /// flag, `TRELLIS_PROXY_IMAGE`, which OLM sets from the bundle's `relatedImages`), so
    /// upgrading the operator also rolls out the proxy it was released with. Changing the
    /// effective image rolls the new version out as `rollout` says; `status.rollout.desiredVersion`
    /// shows the image in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub image: Option<String>,
    /// Image pull policy of the sidecar and its init container.
    #[serde(default)]
    pub image_pull_policy: PullPolicy,
    /// Compute resources of the sidecar; pods may override them with
    /// `trellis.dev/proxy-cpu-request` style annotations.
    #[serde(default)]
    pub resources: ProxyResources,
    /// Log level of the sidecar.
    #[serde(default)]
    pub log_level: LogLevel,
    /// Per-request access logs on the sidecar's stdout.
    #[serde(default)]
    pub access_log: AccessLogSpec,
}

/// The proxy image of this build, the default of the operator's `--proxy-image`: the image
/// released together with this operator.
pub const BUILT_IN_PROXY_IMAGE: &str = concat!(
    "ghcr.io/trellis-mesh/trellis-proxy:",
    env!("CARGO_PKG_VERSION")
);

/// The operator's default proxy image, set once at start from `--proxy-image`.
///
/// A process-wide value rather than a parameter threaded through the injector, the rollout
/// and the status controllers: it is configuration of the process, fixed before any of them
/// runs, and every reader must see the same one (see [`ProxySpec::effective_image`]).
static OPERATOR_PROXY_IMAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the operator's default proxy image; only the first call counts (the operator makes it
/// at start). Returns whether this call set it.
pub fn set_operator_proxy_image(image: String) -> bool {
    OPERATOR_PROXY_IMAGE.set(image).is_ok()
}

/// The default proxy image in force: `--proxy-image` when the operator set it, else this
/// build's.
pub fn operator_proxy_image() -> &'static str {
    OPERATOR_PROXY_IMAGE
        .get()
        .map(String::as_str)
        .unwrap_or(BUILT_IN_PROXY_IMAGE)
}

/// The image a Mesh's sidecars run: its own `spec.proxy.image` when set and non-empty, else
/// `operator_default`. The pure core of [`ProxySpec::effective_image`].
pub fn resolve_proxy_image<'a>(image: Option<&'a str>, operator_default: &'a str) -> &'a str {
    match image {
        Some(i) if !i.trim().is_empty() => i,
        _ => operator_default,
    }
}

impl ProxySpec {
    /// The proxy image in force for this Mesh. Every reader (the injector, the rollout's
    /// desired version, the `ProxiesUpToDate` condition, `trellis check`) goes through here.
    pub fn effective_image(&self) -> &str {
        resolve_proxy_image(self.image.as_deref(), operator_proxy_image())
    }
}

/// Requests and limits of the sidecar container, as Kubernetes quantities.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyResources {
    /// CPU request, e.g. `10m`.
    #[serde(default = "d_cpu_req")]
    pub cpu_request: String,
    /// Memory request, e.g. `16Mi`.
    #[serde(default = "d_mem_req")]
    pub memory_request: String,
    /// CPU limit; omit for none (recommended: CPU limits throttle latency).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<String>,
    /// Memory limit, e.g. `64Mi`.
    #[serde(default = "d_mem_lim")]
    pub memory_limit: String,
}

fn d_cpu_req() -> String {
    "10m".into()
}
fn d_mem_req() -> String {
    "16Mi".into()
}
fn d_mem_lim() -> String {
    "64Mi".into()
}

impl Default for ProxyResources {
    fn default() -> Self {
        Self {
            cpu_request: d_cpu_req(),
            memory_request: d_mem_req(),
            cpu_limit: None,
            memory_limit: d_mem_lim(),
        }
    }
}

/// Access log settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessLogSpec {
    /// Write one line per request.
    #[serde(default)]
    pub enabled: bool,
    /// `Json` or `Text`.
    #[serde(default)]
    pub format: AccessLogFormat,
}

/// How a new sidecar version reaches running workloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RolloutMode {
    /// The operator restarts out-of-date workloads in batches.
    #[default]
    Automatic,
    /// Workloads pick the new sidecar up when you restart them.
    Manual,
}

/// Sidecar rollout settings: how a new `proxy.image` reaches running workloads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// `Automatic` (the operator restarts out-of-date workloads in health-gated batches) or
    /// `Manual` (it only reports them).
    #[serde(default)]
    pub mode: RolloutMode,
    /// Workloads (Deployments, StatefulSets, DaemonSets) restarted at once in automatic mode (at
    /// least 1). The next batch starts only when every workload of this one passed the gate.
    #[serde(default = "d_batch")]
    #[x_kube(validation = Rule::new("self >= 1").message("batchSize must be at least 1"))]
    pub batch_size: u32,
    /// How long a batch may take, from its restart to passing the health gate, before the
    /// workloads still not through count as failed (`failurePolicy` says what follows), as a
    /// duration such as `10m`.
    #[serde(default = "d_deadline")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = super::duration_rule())]
    pub progress_deadline: String,
    /// Stop between batches: nothing is restarted and the batch in flight is not judged. When
    /// unpaused the rollout resumes where it stopped (the time spent paused does not count
    /// against `progressDeadline`). Any edit of the Mesh (pausing and unpausing, or a new image)
    /// also lets a rollout that a failure paused try again.
    #[serde(default)]
    pub paused: bool,
    /// What a failed batch does. `Pause` (default) stops the rollout with the reason in
    /// `status.rollout`; `Rollback` restarts the failed workloads on the proxy image they ran
    /// before, pins them there (pod template annotation `trellis.dev/proxy-image`) and carries on
    /// with the others.
    #[serde(default)]
    pub failure_policy: RolloutFailurePolicy,
    /// Workloads restarted before all others: while any canary is out of date, batches contain
    /// only canaries.
    #[serde(default)]
    pub canary: CanarySelector,
    /// When a restarted workload counts as healthy.
    #[serde(default)]
    pub health_gate: HealthGateSpec,
}

fn d_batch() -> u32 {
    5
}
fn d_deadline() -> String {
    "10m".into()
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            mode: RolloutMode::Automatic,
            batch_size: d_batch(),
            progress_deadline: d_deadline(),
            paused: false,
            failure_policy: RolloutFailurePolicy::default(),
            canary: CanarySelector::default(),
            health_gate: HealthGateSpec::default(),
        }
    }
}

/// What a rollout does with a workload that misses `progressDeadline` or fails the health gate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RolloutFailurePolicy {
    /// Stop the rollout and report why; edit the Mesh to try again.
    #[default]
    Pause,
    /// Put the failed workloads back on their previous proxy image and continue with the rest.
    Rollback,
}

/// Canaries of a rollout. A workload is a canary when its namespace's labels match
/// `namespaceSelector` or its own labels match `workloadSelector`; an absent or empty selector
/// matches nothing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanarySelector {
    /// Namespaces whose workloads are canaries, by namespace label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Workloads that are canaries, by the workload's own labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<LabelSelector>,
}

/// The health gate: a restarted workload passes when its new pods' own inbound golden metrics
/// (read from their sidecars' admin port, `/metrics` on 15020) over `window` are no worse than
/// what its old pods showed over the same window before the restart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthGateSpec {
    /// How long the metrics are watched, before the restart (baseline) and after it, as a
    /// duration such as `30s`. Longer is more certain and makes every batch that much slower.
    #[serde(default = "d_gate_window")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = super::duration_rule())]
    pub window: String,
    /// How many percentage points the success rate (share of non-5xx responses) may fall below
    /// the baseline, e.g. `1` accepts 99 % after a baseline of 100 %.
    #[serde(default = "d_gate_drop")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 100.0")
        .message("maxSuccessRateDropPercent must be between 0 and 100"))]
    pub max_success_rate_drop_percent: f64,
    /// How many times the baseline's p99 latency the new pods' p99 may be, e.g. `2`. A p99
    /// within 25 ms of the baseline always passes (millisecond latencies are noise-bound).
    #[serde(default = "d_gate_p99")]
    #[x_kube(validation = Rule::new("self >= 1.0").message("maxP99Factor must be at least 1"))]
    pub max_p99_factor: f64,
}

fn d_gate_window() -> String {
    "30s".into()
}
fn d_gate_drop() -> f64 {
    1.0
}
fn d_gate_p99() -> f64 {
    2.0
}

impl Default for HealthGateSpec {
    fn default() -> Self {
        Self {
            window: d_gate_window(),
            max_success_rate_drop_percent: d_gate_drop(),
            max_p99_factor: d_gate_p99(),
        }
    }
}

/// Observability addons: Prometheus metrics, Grafana dashboards and tracing, either installed
/// by the operator for evaluation (`mode: Install`) or handed to the monitoring stack the
/// cluster already runs (`mode: Integrate`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
// The rules test each field with `has()`: they must hold whether or not the API server has
// filled in the defaults yet (an absent `mode` is `Install`, an absent `enabled` is false).
// `namespace` is a CEL reserved word: Kubernetes CEL spells the field `__namespace__`.
#[x_kube(
    validation = Rule::new("(!has(self.mode) || self.mode == 'Install') || ((!has(self.metrics) || !has(self.metrics.image)) && (!has(self.dashboards) || !has(self.dashboards.image)) && (!has(self.tracing) || !has(self.tracing.image)))")
        .message("metrics.image, dashboards.image and tracing.image choose what mode Install installs; Integrate installs nothing: remove them"),
    validation = Rule::new("(has(self.mode) && self.mode == 'Integrate') || !has(self.dashboards) || !has(self.dashboards.__namespace__)")
        .message("dashboards.namespace is where mode Integrate puts the dashboard ConfigMap; mode Install provisions Grafana in the operator's namespace: remove it"),
    validation = Rule::new("(has(self.mode) && self.mode == 'Integrate') || !has(self.dashboards) || !has(self.dashboards.enabled) || !self.dashboards.enabled || (has(self.metrics) && has(self.metrics.enabled) && self.metrics.enabled)")
        .message("mode Install: the installed Grafana reads the installed Prometheus, so dashboards.enabled needs metrics.enabled"),
    validation = Rule::new("(!has(self.mode) || self.mode == 'Install') || !has(self.tracing) || !has(self.tracing.enabled) || !self.tracing.enabled || has(self.tracing.collector)")
        .message("mode Integrate installs no tracing backend: tracing.enabled needs tracing.collector"),
    validation = Rule::new("!has(self.tracing) || !has(self.tracing.image) || !has(self.tracing.collector)")
        .message("tracing.image is the Jaeger installed when no collector is given: remove one of them")
)]
#[serde(rename_all = "camelCase")]
pub struct ObservabilitySpec {
    /// `Install` (the default; evaluation grade): the operator runs a pinned Prometheus,
    /// Grafana and Jaeger in its own namespace, owned by this Mesh and labelled
    /// `trellis.dev/grade: evaluation`. `Integrate` (production): the operator installs no
    /// server; it keeps a PodMonitor, a ServiceMonitor and a PrometheusRule for the cluster's
    /// Prometheus Operator (condition `ObservabilityReady` reason `PrometheusOperatorMissing`
    /// when `monitoring.coreos.com/v1` is not served) and the dashboards as a ConfigMap
    /// labelled `grafana_dashboard: "1"` for the Grafana chart's sidecar.
    #[serde(default)]
    pub mode: ObservabilityMode,
    /// Metrics. Install: Prometheus scraping every sidecar's admin port (15020, `/metrics`).
    /// Integrate: the PodMonitor, ServiceMonitor and PrometheusRule. In both modes injected
    /// pods carry `prometheus.io/scrape|port|path` annotations for the proxy, unless the app
    /// sets its own `prometheus.io/*` annotations (then the app's are kept).
    #[serde(default)]
    pub metrics: AddonSpec,
    /// Dashboards. Install: Grafana with Prometheus as its data source and the Trellis
    /// dashboards provisioned. Integrate: the dashboards as the ConfigMap `trellis-dashboards`.
    #[serde(default)]
    pub dashboards: DashboardsSpec,
    /// Distributed tracing.
    #[serde(default)]
    pub tracing: TracingSpec,
}

/// Whether the operator installs the observability servers or integrates with existing ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ObservabilityMode {
    /// Install pinned Prometheus, Grafana and Jaeger for evaluation (single replica, emptyDir
    /// storage: data is lost when a pod restarts).
    #[default]
    Install,
    /// Keep Prometheus Operator objects and Grafana dashboard ConfigMaps for the monitoring
    /// stack the cluster runs.
    Integrate,
}

/// An addon the operator installs (mode `Install`) or integrates with (mode `Integrate`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddonSpec {
    /// Turn the addon on. Turning it off deletes what the operator made for it.
    #[serde(default)]
    pub enabled: bool,
    /// Image of the installed server (mode `Install` only); defaults to the pinned upstream
    /// image. Changing it rolls the addon's Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// The dashboards addon.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DashboardsSpec {
    /// Turn the dashboards on. Turning them off deletes what the operator made for them.
    #[serde(default)]
    pub enabled: bool,
    /// Image of the installed Grafana (mode `Install` only); defaults to the pinned image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Mode `Integrate`: the namespace of the dashboard ConfigMap (where the Grafana chart's
    /// dashboard sidecar looks); defaults to the operator's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
        .message("dashboards.namespace must be a namespace name"))]
    pub namespace: Option<String>,
}

/// Tracing settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TracingSpec {
    /// Export spans from the sidecars.
    #[serde(default)]
    pub enabled: bool,
    /// Percent of new traces sampled, 0 to 100.
    #[serde(default = "d_sampling")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 100.0")
        .message("samplingPercent must be between 0 and 100"))]
    pub sampling_percent: f64,
    /// OTLP collector address: `host:port` or `http://host:port` for OTLP/gRPC, and OTLP/HTTP
    /// (protobuf) when the port is 4318 or a path is given (`http://otel:4318`,
    /// `http://otel:8080/v1/traces`; a path is used as given). Plaintext only: the sidecars have
    /// no trust anchors for a collector's certificate, so `https://` is refused. Without it, mode
    /// `Install` installs Jaeger all-in-one in the operator's namespace and the sidecars export
    /// to it; mode `Integrate` exports nothing. Checked here as well as by the sidecars, because
    /// a value the sidecars refuse would stop every namespace's config from updating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^((http://)?[^/\\\\s]+:[0-9]{1,5}|http://[^/\\\\s]+:[0-9]{1,5}/[^\\\\s?#]*)$')")
        .message("collector must be host:port or http://host:port[/path] (OTLP/gRPC, or OTLP/HTTP on port 4318 or with a path; plaintext)"))]
    pub collector: Option<String>,
    /// Image of the Jaeger the operator installs (mode `Install`, no `collector`); defaults to
    /// the pinned image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

fn d_sampling() -> f64 {
    1.0
}

impl Default for TracingSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            sampling_percent: d_sampling(),
            collector: None,
            image: None,
        }
    }
}

/// Observed state of the mesh.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshStatus {
    /// `Accepted`; `Ready` (True only when `CAReady`, `WebhookReady` and `Programmed` are True
    /// and `Degraded` is not, each at the current `metadata.generation`); `CAReady`,
    /// `WebhookReady`, `Programmed`, `Degraded`, and `ProxiesUpToDate` (every injected pod runs
    /// the Mesh's proxy image; not part of `Ready`), and `ObservabilityReady` (the observability
    /// addons, with each addon's state in the message; not part of `Ready`). Each controller
    /// writes its own conditions.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The generation `Accepted` and `Ready` were computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The root CA currently signing workload certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaStatus>,
    /// Sidecar counts across the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxies: Option<ProxyCounts>,
    /// Progress of the sidecar rollout (written by the rollout controller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Boxed: it is the largest part of the status and most writers only carry it over.
    pub rollout: Option<Box<RolloutStatus>>,
    /// Propagation of the current generation to the connected proxies (written by the
    /// propagation writer, with the `Propagated` condition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub propagation: Option<super::propagation::PropagationStatus>,
}

/// Where a rollout stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RolloutState {
    /// Nothing was restarted for the desired version (nothing out of date, or `Manual` mode).
    #[default]
    Idle,
    /// A batch is in flight or about to start.
    Progressing,
    /// Stopped: by `spec.rollout.paused`, or by a failed batch under `failurePolicy: Pause`.
    Paused,
    /// Done, but some workloads were rolled back and stay pinned to their previous version.
    Failed,
    /// Every automatically rolled workload runs the desired version.
    Complete,
}

/// The rollout's progress, and what it needs to resume where it stopped.
///
/// Atomic for server-side apply: the rollout controller replaces it whole. With per-field
/// ownership, a field it stops reporting (a held generation, a version no pod runs any more)
/// would survive as long as another writer that carries the status over still co-owns it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("x-kubernetes-map-type" = "atomic"))]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// `Idle`, `Progressing`, `Paused`, `Failed` or `Complete`.
    pub state: RolloutState,
    /// The proxy image every sidecar should run (`spec.proxy.image`, else the operator's
    /// default proxy image).
    pub desired_version: String,
    /// Why the rollout is in this state (CamelCase).
    #[serde(default)]
    pub reason: String,
    /// What is happening, and what to do about it.
    #[serde(default)]
    pub message: String,
    /// Injected pods per proxy version they run (their `trellis.dev/proxy-version`).
    #[serde(default)]
    pub pods: BTreeMap<String, i64>,
    /// The batch in flight or last finished (1-based; 0 before the first).
    #[serde(default)]
    pub current_batch: u32,
    /// Batches this rollout takes: those started plus those still needed.
    #[serde(default)]
    pub total_batches: u32,
    /// The workloads of the batch in flight.
    #[serde(default)]
    pub in_flight: Vec<RolloutWorkload>,
    /// The last ten workload failures, newest last.
    #[serde(default)]
    pub failures: Vec<RolloutFailure>,
    /// Set when a failed batch paused the rollout: the Mesh generation it stopped at. An edit
    /// of the Mesh (a higher generation) lets it try again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_at_generation: Option<i64>,
    /// When `spec.rollout.paused` stopped a rollout with a batch in flight (RFC 3339); the
    /// batch's deadline moves by the time spent paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_at: Option<String>,
}

/// A workload of the batch in flight.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutWorkload {
    /// `Deployment`, `StatefulSet` or `DaemonSet`.
    pub kind: String,
    /// Namespace of the workload.
    pub namespace: String,
    /// Name of the workload.
    pub name: String,
    /// When the operator restarted it (RFC 3339), the `kubectl.kubernetes.io/restartedAt` value.
    pub restarted_at: String,
    /// When it counts as failed unless it passed (RFC 3339): the restart plus
    /// `progressDeadline`, moved by any time spent paused.
    pub deadline: String,
    /// The proxy version most of its pods ran before the restart (what `Rollback` returns to).
    #[serde(default)]
    pub previous_version: String,
    /// Its golden metrics before the restart, if it served traffic then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<GoldenSignals>,
    /// It finished restarting and passed the health gate.
    #[serde(default)]
    pub passed: bool,
}

/// Inbound golden metrics of a workload's pods over the health gate window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GoldenSignals {
    /// Requests completed in the window.
    pub requests: u64,
    /// Share of them not answered with a 5xx, 0 to 1.
    pub success_rate: f64,
    /// 99th percentile response latency in seconds, when there were requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_seconds: Option<f64>,
}

/// A workload that failed its batch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutFailure {
    /// `Deployment`, `StatefulSet` or `DaemonSet`.
    pub kind: String,
    /// Namespace of the workload.
    pub namespace: String,
    /// Name of the workload.
    pub name: String,
    /// The version it failed to reach.
    pub version: String,
    /// `DeadlineExceeded` or `HealthGateFailed`.
    pub reason: String,
    /// What was seen.
    pub message: String,
    /// When (RFC 3339).
    pub time: String,
}

/// The signing root.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaStatus {
    /// SHA-256 fingerprint of the root certificate (hex).
    pub fingerprint: String,
    /// When the root expires (RFC 3339).
    pub not_after: String,
    /// Stage of a root rotation in progress, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<String>,
}

/// Sidecar counts, from the pods carrying the `trellis.dev/proxy-version` annotation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyCounts {
    /// Pods with a sidecar (not being deleted).
    pub total: i64,
    /// Pods whose sidecar runs the Mesh's current proxy image (`spec.proxy.image`, else the operator's default).
    pub up_to_date: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17: an empty or absent `spec.proxy.image` means the operator's default, and the
    /// CRD no longer writes a default image into every Mesh.
    #[test]
    fn an_empty_proxy_image_is_the_operators_default() {
        assert_eq!(resolve_proxy_image(None, "op:1"), "op:1");
        assert_eq!(resolve_proxy_image(Some(""), "op:1"), "op:1");
        assert_eq!(resolve_proxy_image(Some("  "), "op:1"), "op:1");
        assert_eq!(resolve_proxy_image(Some("mine:2"), "op:1"), "mine:2");
        let spec: MeshSpec = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(spec.proxy.image, None);
        assert_eq!(spec.proxy.effective_image(), operator_proxy_image());
        let crd = serde_json::to_value(<Mesh as kube::CustomResourceExt>::crd()).unwrap();
        let proxy = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["proxy"];
        assert!(
            proxy["properties"]["image"].get("default").is_none(),
            "{proxy}"
        );
        assert!(proxy["default"].get("image").is_none(), "{proxy}");
    }

    /// Issue 13 item 6: durations outside their range are refused with a message naming the
    /// field and the range, never accepted (a 0s TTL) and never a panic (a huge validity).
    #[test]
    fn durations_out_of_range_are_refused_with_the_field_and_range() {
        let spec = |ttl: &str, root: &str| MeshSpec {
            workload_cert_ttl: ttl.into(),
            ca: CaSpec {
                self_signed: Some(SelfSignedCa {
                    root_validity: root.into(),
                }),
                secret_ref: None,
            },
            ..MeshSpec::default()
        };
        let ok = spec("24h", "87600h");
        assert_eq!(ok.workload_cert_ttl().unwrap().as_secs(), 86_400);
        assert_eq!(ok.root_validity().unwrap().as_secs(), 87_600 * 3600);
        let e = spec("0s", "87600h")
            .workload_cert_ttl()
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "spec.workloadCertTtl \"0s\" is out of range: it must be between 10m and 2160h"
        );
        assert!(spec("2161h", "87600h").workload_cert_ttl().is_err());
        let e = spec("24h", "99999999999h")
            .root_validity()
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("spec.ca.selfSigned.rootValidity \"99999999999h\" is out of range"),
            "{e}"
        );
        let e = spec("24h", "99999999999999999999999h")
            .root_validity()
            .unwrap_err()
            .to_string();
        assert!(e.contains("too large"), "{e}");
        let e = spec("2000h", "2400h")
            .root_validity()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("at least 5 workload certificate lifetimes"),
            "{e}"
        );
        // A bad TTL is reported by root_validity too (it depends on it).
        assert!(spec("0s", "87600h").root_validity().is_err());
    }

    #[test]
    fn default_spec_is_what_an_empty_spec_deserializes_to() {
        let parsed: MeshSpec = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(parsed, MeshSpec::default());
    }
}
