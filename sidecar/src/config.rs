//! The contract between the control plane and the sidecar.
//!
//! The operator compiles `Mesh`, `TrafficPolicy` and `PeerAuthentication` objects into one
//! [`ProxyConfig`] per meshed namespace and writes it, as JSON, into the `trellis-proxy`
//! ConfigMap (key `config.json`). The sidecar reads the projected file. These types are the only
//! thing both sides share, so they carry no Kubernetes dependency and a `version` field: a proxy
//! refuses a config whose version it does not speak instead of guessing.
//!
//! Durations are integers in milliseconds: the CRDs take human strings (`"1.5s"`), the compiler
//! parses them once, and the hot path never parses text.
//!
//! A config is validated as a whole ([`ProxyConfig::validate`]) and every problem is reported, not
//! just the first, so one reload attempt tells the operator everything that is wrong.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// The config schema version this proxy speaks.
pub const CONFIG_VERSION: u32 = 1;

/// Longest duration a config may carry (30 days). Timers, deadlines and ejection arithmetic
/// add durations to clock readings; bounding every duration keeps that arithmetic far from
/// overflow and refuses values that can only be typos.
pub const MAX_DURATION_MS: u64 = 30 * 24 * 3600 * 1000;
/// Slowest rate limit: one request per 1000 s. Below it the wait for the next token is not a
/// number a `Retry-After` header or a timer can carry.
pub const MIN_RATE_PER_SECOND: f64 = 0.001;
/// Fastest rate limit; above it a limit limits nothing.
pub const MAX_RATE_PER_SECOND: f64 = 1e9;

/// The whole config for the sidecars of one namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// Schema version; must equal [`CONFIG_VERSION`].
    pub version: u32,
    /// Opaque revision of the content (the compiler uses a hash), shown on `/config` and in logs
    /// so an operator can tell which compile a proxy runs.
    #[serde(default)]
    pub revision: String,
    /// Namespace this config was compiled for.
    #[serde(default)]
    pub namespace: String,
    pub mesh: MeshSettings,
    /// Inbound policies, most specific first. A proxy uses the first whose selector matches its
    /// own labels; the compiler has already resolved precedence and `Unset` inheritance.
    #[serde(default)]
    pub inbound: Vec<InboundPolicy>,
    /// Every destination Service the proxy may route to.
    #[serde(default)]
    pub outbound: Vec<OutboundService>,
}

/// Mesh-wide settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshSettings {
    /// SPIFFE trust domain, for example `cluster.local`.
    pub trust_domain: String,
    /// Where the proxy asks for its certificate (`https://host:port`). `None` means credentials
    /// come from files (tests, local runs with pre-issued certificates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_endpoint: Option<String>,
    #[serde(default)]
    pub telemetry: Telemetry,
    /// Ports on which the proxy never waits for the client to speak first (server-first
    /// protocols such as MySQL or SMTP). Traffic on them is proxied as opaque TCP.
    #[serde(default)]
    pub skip_detection_ports: Vec<u16>,
    /// How long protocol detection waits for the first bytes before treating the connection as
    /// opaque TCP.
    #[serde(default = "default_detect_timeout_ms")]
    pub detect_timeout_ms: u64,
}

fn default_detect_timeout_ms() -> u64 {
    100
}

/// Telemetry switches.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Telemetry {
    #[serde(default)]
    pub access_log: AccessLog,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSettings>,
}

/// Access logs: one line per request on stdout.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLog {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub format: AccessLogFormat,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessLogFormat {
    #[default]
    Json,
    Text,
}

/// Distributed tracing: the proxy always propagates `traceparent`; it exports spans only when
/// this is set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingSettings {
    /// Percent of new traces sampled, 0 to 100.
    pub sampling_percent: f64,
    /// OTLP collector address: `host:port` or `http://host:port[/path]`; see
    /// [`parse_collector`] for which protocol each form means.
    pub collector: String,
}

/// The wire protocol spans are exported with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CollectorProtocol {
    /// OTLP/gRPC (the collector's port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (the collector's port 4318).
    HttpProtobuf,
}

/// A collector address resolved to what the exporter needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Collector {
    pub protocol: CollectorProtocol,
    /// For gRPC `http://host:port`; for OTLP/HTTP the URL spans are POSTed to.
    pub url: String,
}

/// The OTLP/HTTP port collectors listen on by convention.
pub const OTLP_HTTP_PORT: u16 = 4318;
/// The OTLP/HTTP path of traces, appended when the address names no path.
pub const OTLP_HTTP_TRACES_PATH: &str = "/v1/traces";

const COLLECTOR_FORMS: &str = "must be host:port or http://host:port[/path] (OTLP/gRPC; OTLP/HTTP \
     on port 4318 or when a path such as /v1/traces is given; plaintext)";

/// Resolves a collector address (the config's form) to a protocol and URL.
///
/// The protocol follows the address, as users write it for other OpenTelemetry SDKs: port 4318
/// or an explicit path (OTLP/HTTP's signal URL, used as given) means OTLP/HTTP protobuf,
/// anything else OTLP/gRPC. `https://` is refused here rather than failing on every export:
/// the sidecar has no trust anchors for a collector's certificate (the mesh CA signs workload
/// identities, not collectors), so TLS to the collector would either trust nothing or trust
/// anything. Collectors are reached in plaintext on the cluster network, like Prometheus
/// scrapes.
pub fn parse_collector(c: &str) -> Result<Collector, &'static str> {
    let (scheme, rest) = match c.split_once("://") {
        Some(("http", rest)) => (true, rest),
        Some(("https", _)) => {
            return Err(
                "https is not supported: the sidecars have no trust anchors for a \
                 collector's certificate; use the collector's plaintext port (http://host:4317 \
                 for gRPC, http://host:4318 for HTTP)",
            );
        }
        Some(_) => return Err(COLLECTOR_FORMS),
        None => (false, c),
    };
    let (hostport, path) = match rest.find('/') {
        // A path only in URL form, so `host:port/x` is not mistaken for an address.
        Some(i) if scheme => rest.split_at(i),
        Some(_) => return Err(COLLECTOR_FORMS),
        None => (rest, ""),
    };
    let port = hostport
        .rsplit_once(':')
        .and_then(|(h, p)| (!h.is_empty()).then_some(p))
        .and_then(|p| p.parse::<u16>().ok());
    let bad_char = |ch: char| ch.is_whitespace() || ch == '?' || ch == '#';
    let Some(port) = port else {
        return Err(COLLECTOR_FORMS);
    };
    if hostport.contains(bad_char) || path.contains(bad_char) {
        return Err(COLLECTOR_FORMS);
    }
    Ok(if !path.is_empty() {
        Collector {
            protocol: CollectorProtocol::HttpProtobuf,
            url: format!("http://{hostport}{path}"),
        }
    } else if port == OTLP_HTTP_PORT {
        Collector {
            protocol: CollectorProtocol::HttpProtobuf,
            url: format!("http://{hostport}{OTLP_HTTP_TRACES_PATH}"),
        }
    } else {
        Collector {
            protocol: CollectorProtocol::Grpc,
            url: format!("http://{hostport}"),
        }
    })
}

/// Why a collector address cannot be exported to, if it cannot (see [`parse_collector`]).
pub fn collector_problem(c: &str) -> Option<&'static str> {
    parse_collector(c).err()
}

/// mTLS mode of an inbound port, already resolved (never `Unset`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MtlsMode {
    /// Only mTLS from a peer whose certificate chains to the trust bundle.
    #[default]
    Strict,
    /// mTLS and plaintext both accepted (migration).
    Permissive,
    /// Plaintext only; TLS is passed through untouched.
    Disable,
}

/// Inbound policy for the workloads a selector matches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundPolicy {
    /// Where the policy came from (`namespace/name` of the PeerAuthentication, or `mesh-default`),
    /// for logs and `/config`.
    pub source: String,
    /// `matchLabels`-style selector; empty matches every workload.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    pub mtls: MtlsMode,
    /// Per container-port overrides of `mtls`.
    #[serde(default)]
    pub port_mtls: BTreeMap<u16, MtlsMode>,
    /// Local rate limit applied to inbound requests, per source identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

impl InboundPolicy {
    /// Whether the selector matches a workload's labels.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// The mTLS mode for a container port.
    pub fn mode_for_port(&self, port: u16) -> MtlsMode {
        self.port_mtls.get(&port).copied().unwrap_or(self.mtls)
    }
}

/// Application protocol of a service port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protocol {
    /// Detect per connection (HTTP/1.1, HTTP/2 prior knowledge, TLS, else opaque).
    #[default]
    Auto,
    Http1,
    Http2,
    Grpc,
    /// Opaque TCP: never detected, proxied at L4 (mTLS still applies).
    Tcp,
}

/// A destination Service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundService {
    pub name: String,
    pub namespace: String,
    /// Cluster IPs the Service is reached at (empty for headless Services).
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// SPIFFE IDs the destination may present. Empty means the destination is not meshed and is
    /// reached in plaintext.
    #[serde(default)]
    pub identities: Vec<String>,
    /// Traffic policy from the TrafficPolicy attached to this Service, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<TrafficPolicy>,
}

impl OutboundService {
    /// `name.namespace`, the key splits refer to and metrics label with.
    pub fn key(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }

    /// Whether an HTTP authority (`host` or `host:port`) names this Service, in any of the forms
    /// cluster DNS accepts: `name`, `name.ns`, `name.ns.svc`, `name.ns.svc.<domain>`.
    pub fn matches_authority(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        let mut parts = host.split('.');
        if parts.next() != Some(self.name.as_str()) {
            return false;
        }
        match parts.next() {
            None => true,
            Some(ns) if ns == self.namespace => match parts.next() {
                None => true,
                Some("svc") => true,
                Some(_) => false,
            },
            Some(_) => false,
        }
    }

    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

/// One port of a destination Service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: Protocol,
    /// Endpoints behind this port. Empty means "no inline discovery": the proxy connects to the
    /// original destination and lets kube-proxy pick.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

/// One backend address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    pub address: SocketAddr,
    /// SPIFFE ID of the pod behind this address, when known; otherwise any of the Service's
    /// identities is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Zone, for future locality-aware balancing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

/// Compiled traffic policy for one destination Service.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    /// `namespace/name` of the TrafficPolicy object this came from.
    #[serde(default)]
    pub source: String,
    /// Restrict the policy to one service port; `None` applies to all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Weighted split of requests to other Services (canary). Empty sends everything to the
    /// Service itself. Backends are `name.namespace` keys of other [`OutboundService`]s; to keep
    /// part of the traffic on this Service, list it too.
    #[serde(default)]
    pub split: Vec<WeightedBackend>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    #[serde(default)]
    pub algorithm: LbAlgorithm,
    /// Required when `algorithm` is `ConsistentHash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_key: Option<HashKey>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LbAlgorithm {
    /// Power of two choices over peak-EWMA latency.
    #[default]
    P2cEwma,
    LeastRequest,
    RoundRobin,
    Random,
    ConsistentHash,
}

/// What a consistent hash is computed over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum HashKey {
    Header(String),
    Cookie(String),
    SourceIp,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// Whole request, including retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_ms: Option<u64>,
    /// Idle time of a connection (or stream) before it is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_ms: Option<u64>,
}

/// Conditions under which a request is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RetryOn {
    ConnectFailure,
    Reset,
    /// Any 5xx response.
    ServerError,
    /// 502, 503, 504.
    GatewayError,
    /// The codes in [`Retries::status_codes`].
    RetriableStatusCodes,
    /// The gRPC codes in [`Retries::grpc_codes`].
    GrpcStatus,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    /// Total attempts including the first (2 means one retry).
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout_ms: Option<u64>,
    pub retry_on: Vec<RetryOn>,
    #[serde(default)]
    pub status_codes: Vec<u16>,
    /// gRPC status codes (numeric, e.g. 14 for UNAVAILABLE).
    #[serde(default)]
    pub grpc_codes: Vec<u32>,
    #[serde(default = "default_backoff_base_ms")]
    pub backoff_base_ms: u64,
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Retries may add at most this percent of recent requests.
    #[serde(default = "default_budget_percent")]
    pub budget_percent: f64,
    /// Retries always allowed per second regardless of the percent.
    #[serde(default = "default_min_retries_per_second")]
    pub min_retries_per_second: u32,
    /// Retry non-idempotent methods (POST, PATCH) too.
    #[serde(default)]
    pub retry_non_idempotent: bool,
}

fn default_backoff_base_ms() -> u64 {
    25
}
fn default_backoff_max_ms() -> u64 {
    250
}
fn default_budget_percent() -> f64 {
    20.0
}
fn default_min_retries_per_second() -> u32 {
    10
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreaker {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    pub consecutive_failures: u32,
    /// First ejection lasts this long; each further ejection of the same endpoint doubles it.
    pub base_ejection_ms: u64,
    /// At most this percent of a Service's endpoints are ejected at once.
    pub max_ejection_percent: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_second: f64,
    pub burst: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedBackend {
    /// `name.namespace` of the backend Service.
    pub service: String,
    pub weight: u32,
}

/// One problem found in a config. A config with any is refused whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// JSON-pointer-like path of the offending field, e.g. `outbound[2].ports[0].port`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("config is not valid JSON for this schema: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("config is invalid: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<ConfigError>),
}

/// The digest of a set of Services' TrafficPolicies, given as `(namespace, name, policy)` in
/// `(namespace, name)` order: the one function both the proxy
/// ([`ProxyConfig::policies_digest`]) and the operator (over what a namespace's ConfigMap
/// lists) hash with, over the contract's own serialization, so equal policies give equal
/// digests on both sides. 32 hex characters, like [`ProxyConfig::settings_digest`].
pub fn policies_digest<'a>(
    policies: impl IntoIterator<Item = (&'a str, &'a str, &'a TrafficPolicy)>,
) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for entry in policies {
        let json = serde_json::to_vec(&entry).expect("policy serializes");
        // Length-prefixed, so no two different lists hash the same bytes.
        h.update((json.len() as u64).to_le_bytes());
        h.update(&json);
    }
    hex::encode(&h.finalize()[..16])
}

impl ProxyConfig {
    /// Parses and validates. Either the whole config is usable or it is refused.
    pub fn from_json(bytes: &[u8]) -> Result<Self, LoadError> {
        let cfg: ProxyConfig = serde_json::from_slice(bytes)?;
        cfg.validate().map_err(LoadError::Invalid)?;
        Ok(cfg)
    }

    /// Canonical serialization: the compiler relies on this being deterministic (struct field
    /// order, `BTreeMap`s, and `Vec`s the compiler sorts), so equal configs give equal bytes.
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serializes")
    }

    /// A digest of what the Mesh and the PeerAuthentications decide in this config: the mesh
    /// settings and the inbound policies, nothing of the outbound table. The proxy reports it
    /// on the discovery stream ([`crate::discovery::ClientMessage::Loaded`]) and the operator
    /// computes the same digest for every namespace, so it can tell whether a proxy runs the
    /// current Mesh and PeerAuthentication settings without knowing the (per-namespace,
    /// costly) revision of the whole table. Both sides hash the contract's own serialization
    /// of the same values, so a config that round-trips through JSON keeps its digest.
    pub fn settings_digest(&self) -> String {
        use sha2::{Digest, Sha256};
        #[derive(Serialize)]
        struct Settings<'a> {
            mesh: &'a MeshSettings,
            inbound: &'a [InboundPolicy],
        }
        let json = serde_json::to_vec(&Settings {
            mesh: &self.mesh,
            inbound: &self.inbound,
        })
        .expect("config serializes");
        hex::encode(&Sha256::digest(&json)[..16])
    }

    /// A digest of the TrafficPolicies this config carries: every outbound Service that has
    /// a policy, with it ([`policies_digest`]). The proxy reports it beside
    /// [`Self::settings_digest`], so the operator can count a proxy that holds a policy from
    /// its ConfigMap (the `Full` content lists every visible Service and the proxy never
    /// subscribes to them) by what it loaded, as it counts streamed policies by acks.
    pub fn policies_digest(&self) -> String {
        let mut with_policy: Vec<(&str, &str, &TrafficPolicy)> = self
            .outbound
            .iter()
            .filter_map(|s| Some((s.namespace.as_str(), s.name.as_str(), s.policy.as_ref()?)))
            .collect();
        with_policy.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        policies_digest(with_policy)
    }

    /// The inbound policy that applies to a workload with these labels.
    pub fn inbound_for(&self, labels: &BTreeMap<String, String>) -> Option<&InboundPolicy> {
        self.inbound.iter().find(|p| p.matches(labels))
    }

    /// Looks a destination up by its `name.namespace` key.
    pub fn service(&self, key: &str) -> Option<&OutboundService> {
        self.outbound.iter().find(|s| s.key() == key)
    }

    /// Checks everything that serde's types cannot, and reports every problem.
    pub fn validate(&self) -> Result<(), Vec<ConfigError>> {
        let mut errs = Vec::new();
        let mut err = |path: String, message: &str| {
            errs.push(ConfigError {
                path,
                message: message.to_string(),
            })
        };
        if self.version != CONFIG_VERSION {
            err(
                "version".into(),
                &format!(
                    "unsupported version {} (this proxy speaks {CONFIG_VERSION})",
                    self.version
                ),
            );
        }
        if !is_dns_like(&self.mesh.trust_domain) {
            err(
                "mesh.trustDomain".into(),
                "must be a non-empty DNS-like name (letters, digits, '-', '.')",
            );
        }
        if let Some(ep) = &self.mesh.identity_endpoint
            && !ep.starts_with("https://")
        {
            err(
                "mesh.identityEndpoint".into(),
                "must be an https:// URL: certificates are never requested in plaintext",
            );
        }
        if self.mesh.detect_timeout_ms == 0 || self.mesh.detect_timeout_ms > 10_000 {
            err("mesh.detectTimeoutMs".into(), "must be between 1 and 10000");
        }
        if let Some(t) = &self.mesh.telemetry.tracing {
            if !(0.0..=100.0).contains(&t.sampling_percent) {
                err(
                    "mesh.telemetry.tracing.samplingPercent".into(),
                    "must be between 0 and 100",
                );
            }
            if let Some(problem) = collector_problem(&t.collector) {
                err("mesh.telemetry.tracing.collector".into(), problem);
            }
        }
        for (i, p) in self.inbound.iter().enumerate() {
            if p.port_mtls.contains_key(&0) {
                err(format!("inbound[{i}].portMtls"), "port 0 is not a port");
            }
            if let Some(rl) = &p.rate_limit {
                validate_rate_limit(rl, &format!("inbound[{i}].rateLimit"), &mut err);
            }
        }
        let mut keys = std::collections::BTreeSet::new();
        for (i, s) in self.outbound.iter().enumerate() {
            let at = format!("outbound[{i}]");
            if s.name.is_empty() || s.namespace.is_empty() {
                err(at.clone(), "name and namespace are required");
            }
            if !keys.insert(s.key()) {
                err(at.clone(), &format!("duplicate service {}", s.key()));
            }
            if s.ports.is_empty() {
                err(format!("{at}.ports"), "at least one port is required");
            }
            let mut seen = std::collections::BTreeSet::new();
            for (j, p) in s.ports.iter().enumerate() {
                if p.port == 0 {
                    err(format!("{at}.ports[{j}].port"), "port 0 is not a port");
                }
                if !seen.insert(p.port) {
                    err(format!("{at}.ports[{j}].port"), "duplicate port");
                }
                for (k, e) in p.endpoints.iter().enumerate() {
                    if e.address.port() == 0 {
                        err(
                            format!("{at}.ports[{j}].endpoints[{k}].address"),
                            "endpoint port 0 is not a port",
                        );
                    }
                    if let Some(id) = &e.identity
                        && !is_spiffe_id(id)
                    {
                        err(
                            format!("{at}.ports[{j}].endpoints[{k}].identity"),
                            "must be a spiffe:// ID",
                        );
                    }
                }
            }
            for (j, id) in s.identities.iter().enumerate() {
                if !is_spiffe_id(id) {
                    err(format!("{at}.identities[{j}]"), "must be a spiffe:// ID");
                }
            }
            if let Some(pol) = &s.policy {
                validate_policy(pol, &format!("{at}.policy"), s, &mut err);
            }
        }
        // Split backends must exist: checked after all keys are known.
        for (i, s) in self.outbound.iter().enumerate() {
            if let Some(pol) = &s.policy {
                for (j, b) in pol.split.iter().enumerate() {
                    if !keys.contains(&b.service) {
                        err(
                            format!("outbound[{i}].policy.split[{j}].service"),
                            &format!("unknown backend service {}", b.service),
                        );
                    }
                }
            }
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }
}

fn validate_rate_limit(rl: &RateLimit, at: &str, err: &mut impl FnMut(String, &str)) {
    // NaN fails both comparisons.
    if !(rl.requests_per_second >= MIN_RATE_PER_SECOND
        && rl.requests_per_second <= MAX_RATE_PER_SECOND)
    {
        err(
            format!("{at}.requestsPerSecond"),
            &format!(
                "must be between {MIN_RATE_PER_SECOND} and {MAX_RATE_PER_SECOND:e} (got {})",
                rl.requests_per_second
            ),
        );
    }
    if rl.burst == 0 {
        err(format!("{at}.burst"), "must be at least 1");
    }
}

fn validate_policy(
    pol: &TrafficPolicy,
    at: &str,
    svc: &OutboundService,
    err: &mut impl FnMut(String, &str),
) {
    if let Some(port) = pol.port
        && svc.port(port).is_none()
    {
        err(format!("{at}.port"), &format!("service has no port {port}"));
    }
    if pol.load_balancer.algorithm == LbAlgorithm::ConsistentHash
        && pol.load_balancer.hash_key.is_none()
    {
        err(
            format!("{at}.loadBalancer.hashKey"),
            "required for ConsistentHash",
        );
    }
    for (name, v) in [
        ("requestMs", pol.timeouts.request_ms),
        ("idleMs", pol.timeouts.idle_ms),
        ("connectMs", pol.timeouts.connect_ms),
    ] {
        if let Some(v) = v {
            validate_duration_ms(v, 1, &format!("{at}.timeouts.{name}"), err);
        }
    }
    if let Some(r) = &pol.retries {
        if r.attempts == 0 || r.attempts > 10 {
            err(format!("{at}.retries.attempts"), "must be between 1 and 10");
        }
        if let Some(v) = r.per_try_timeout_ms {
            validate_duration_ms(v, 1, &format!("{at}.retries.perTryTimeoutMs"), err);
        }
        validate_duration_ms(
            r.backoff_base_ms,
            0,
            &format!("{at}.retries.backoffBaseMs"),
            err,
        );
        validate_duration_ms(
            r.backoff_max_ms,
            0,
            &format!("{at}.retries.backoffMaxMs"),
            err,
        );
        if r.backoff_base_ms > r.backoff_max_ms {
            err(
                format!("{at}.retries.backoffBaseMs"),
                "must not exceed backoffMaxMs",
            );
        }
        if !(r.budget_percent.is_finite() && (0.0..=100.0).contains(&r.budget_percent)) {
            err(
                format!("{at}.retries.budgetPercent"),
                "must be between 0 and 100",
            );
        }
        if r.status_codes.iter().any(|c| !(100..=599).contains(c)) {
            err(
                format!("{at}.retries.statusCodes"),
                "must be HTTP status codes (100-599)",
            );
        }
        if r.grpc_codes.iter().any(|c| *c > 16) {
            err(
                format!("{at}.retries.grpcCodes"),
                "must be gRPC status codes (0-16)",
            );
        }
    }
    if let Some(o) = &pol.outlier_detection {
        if o.consecutive_failures == 0 {
            err(
                format!("{at}.outlierDetection.consecutiveFailures"),
                "must be at least 1",
            );
        }
        validate_duration_ms(
            o.base_ejection_ms,
            1,
            &format!("{at}.outlierDetection.baseEjectionMs"),
            err,
        );
        if o.max_ejection_percent > 100 {
            err(
                format!("{at}.outlierDetection.maxEjectionPercent"),
                "must be between 0 and 100",
            );
        }
    }
    if let Some(rl) = &pol.rate_limit {
        validate_rate_limit(rl, &format!("{at}.rateLimit"), err);
    }
    if !pol.split.is_empty() && pol.split.iter().all(|b| b.weight == 0) {
        err(
            format!("{at}.split"),
            "at least one weight must be positive",
        );
    }
    // The balancer draws a number below the sum of the weights, as a u32.
    let total: u64 = pol.split.iter().map(|b| u64::from(b.weight)).sum();
    if total > u64::from(u32::MAX) {
        err(
            format!("{at}.split"),
            &format!(
                "the weights must add up to at most {} (got {total})",
                u32::MAX
            ),
        );
    }
}

/// A duration in milliseconds between `min` and [`MAX_DURATION_MS`].
fn validate_duration_ms(v: u64, min: u64, at: &str, err: &mut impl FnMut(String, &str)) {
    if v < min || v > MAX_DURATION_MS {
        err(
            at.to_string(),
            &format!("must be between {min} and {MAX_DURATION_MS} milliseconds (30 days), got {v}"),
        );
    }
}

/// A SPIFFE ID as the mesh issues them: `spiffe://<trust-domain>/<path>`.
pub fn is_spiffe_id(s: &str) -> bool {
    match s.strip_prefix("spiffe://") {
        Some(rest) => match rest.split_once('/') {
            Some((td, path)) => is_dns_like(td) && !path.is_empty() && !path.contains("//"),
            None => false,
        },
        None => false,
    }
}

/// The SPIFFE ID of a Kubernetes workload.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

fn is_dns_like(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !s.starts_with('.')
        && !s.ends_with('.')
}

/// Parses the downward-API labels file (`key="value"` per line, values escaped as Go `%q`).
/// Lines that do not parse are skipped: kubelet writes this file, and a label we cannot read
/// must not stop the proxy.
pub fn parse_downward_labels(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim();
        let Some(inner) = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
            continue;
        };
        let mut value = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some('n') => value.push('\n'),
                    Some('t') => value.push('\t'),
                    Some(other) => value.push(other),
                    None => {}
                }
            } else {
                value.push(c);
            }
        }
        out.insert(k.trim().to_string(), value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> ProxyConfig {
        ProxyConfig {
            version: CONFIG_VERSION,
            revision: "r1".into(),
            namespace: "shop".into(),
            mesh: MeshSettings {
                trust_domain: "cluster.local".into(),
                identity_endpoint: Some("https://trellis-operator.trellis-system.svc:15012".into()),
                telemetry: Telemetry::default(),
                skip_detection_ports: vec![3306],
                detect_timeout_ms: 100,
            },
            inbound: vec![
                InboundPolicy {
                    source: "shop/db-permissive".into(),
                    selector: [("app".to_string(), "db".to_string())].into(),
                    mtls: MtlsMode::Permissive,
                    port_mtls: [(9090, MtlsMode::Disable)].into(),
                    rate_limit: None,
                },
                InboundPolicy {
                    source: "mesh-default".into(),
                    selector: BTreeMap::new(),
                    mtls: MtlsMode::Strict,
                    port_mtls: BTreeMap::new(),
                    rate_limit: None,
                },
            ],
            outbound: vec![
                OutboundService {
                    name: "reviews".into(),
                    namespace: "shop".into(),
                    addresses: vec!["10.96.0.10".parse().unwrap()],
                    ports: vec![ServicePort {
                        port: 9080,
                        name: Some("http".into()),
                        protocol: Protocol::Http1,
                        endpoints: vec![Endpoint {
                            address: "10.0.0.5:9080".parse().unwrap(),
                            identity: Some(spiffe_id("cluster.local", "shop", "reviews")),
                            zone: None,
                        }],
                    }],
                    identities: vec![spiffe_id("cluster.local", "shop", "reviews")],
                    policy: Some(TrafficPolicy {
                        source: "shop/reviews".into(),
                        retries: Some(Retries {
                            attempts: 3,
                            per_try_timeout_ms: Some(200),
                            retry_on: vec![RetryOn::GatewayError],
                            status_codes: vec![],
                            grpc_codes: vec![14],
                            backoff_base_ms: 25,
                            backoff_max_ms: 250,
                            budget_percent: 20.0,
                            min_retries_per_second: 10,
                            retry_non_idempotent: false,
                        }),
                        split: vec![
                            WeightedBackend {
                                service: "reviews.shop".into(),
                                weight: 90,
                            },
                            WeightedBackend {
                                service: "reviews-v2.shop".into(),
                                weight: 10,
                            },
                        ],
                        ..Default::default()
                    }),
                },
                OutboundService {
                    name: "reviews-v2".into(),
                    namespace: "shop".into(),
                    addresses: vec![],
                    ports: vec![ServicePort {
                        port: 9080,
                        name: None,
                        protocol: Protocol::Auto,
                        endpoints: vec![],
                    }],
                    identities: vec![],
                    policy: None,
                },
            ],
        }
    }

    #[test]
    fn round_trips_through_json() {
        let cfg = sample();
        let json = cfg.to_json_pretty();
        let back = ProxyConfig::from_json(json.as_bytes()).expect("valid");
        assert_eq!(back, cfg);
        assert_eq!(
            back.to_json_pretty(),
            json,
            "serialization is deterministic"
        );
    }

    #[test]
    fn refuses_collectors_the_exporter_cannot_reach() {
        for ok in [
            "otel.obs:4317",
            "http://10.0.0.1:4317",
            "[::1]:4317",
            "otel.obs:4318",
            "http://otel.obs:4318",
            "http://otel.obs:9000/v1/traces",
        ] {
            assert_eq!(collector_problem(ok), None, "{ok}");
        }
        for bad in [
            "",
            "otel.obs",
            ":4317",
            "https://otel:4317",
            "https://otel:4318",
            "grpc://otel:4317",
            "otel:port",
            "otel:99999",
            "otel:4317/v1",
            "http://otel:4318/v1/traces?x=1",
            "a b:1",
        ] {
            assert!(collector_problem(bad).is_some(), "{bad:?}");
        }
        assert!(
            collector_problem("https://otel:4318")
                .unwrap()
                .contains("trust")
        );
        let mut cfg = sample();
        cfg.mesh.telemetry.tracing = Some(TracingSettings {
            sampling_percent: 1.0,
            collector: "https://otel:4317".into(),
        });
        let errs = cfg.validate().unwrap_err();
        assert_eq!(errs[0].path, "mesh.telemetry.tracing.collector");
    }

    #[test]
    fn the_collector_address_picks_the_protocol() {
        let c = |s| parse_collector(s).unwrap();
        let grpc = |url: &str| Collector {
            protocol: CollectorProtocol::Grpc,
            url: url.into(),
        };
        let http = |url: &str| Collector {
            protocol: CollectorProtocol::HttpProtobuf,
            url: url.into(),
        };
        assert_eq!(c("otel:4317"), grpc("http://otel:4317"));
        assert_eq!(c("http://otel:4317"), grpc("http://otel:4317"));
        assert_eq!(c("otel:4318"), http("http://otel:4318/v1/traces"));
        assert_eq!(c("http://[::1]:4318"), http("http://[::1]:4318/v1/traces"));
        assert_eq!(
            c("http://otel:80/otlp/v1/traces"),
            http("http://otel:80/otlp/v1/traces")
        );
        assert_eq!(c("http://otel:4318/"), http("http://otel:4318/"));
    }

    #[test]
    fn reports_every_problem_not_just_the_first() {
        let mut cfg = sample();
        cfg.version = 99;
        cfg.mesh.trust_domain = String::new();
        cfg.outbound[0].policy.as_mut().unwrap().split[1].service = "nope.shop".into();
        cfg.outbound[1].ports[0].port = 0;
        let errs = cfg.validate().unwrap_err();
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        assert!(paths.contains(&"version"), "{paths:?}");
        assert!(paths.contains(&"mesh.trustDomain"), "{paths:?}");
        assert!(
            paths.contains(&"outbound[0].policy.split[1].service"),
            "{paths:?}"
        );
        assert!(paths.contains(&"outbound[1].ports[0].port"), "{paths:?}");
    }

    #[test]
    fn refuses_unknown_fields_and_plaintext_identity_endpoint() {
        let mut v: serde_json::Value = serde_json::from_str(&sample().to_json_pretty()).unwrap();
        v["surprise"] = true.into();
        assert!(matches!(
            ProxyConfig::from_json(v.to_string().as_bytes()),
            Err(LoadError::Parse(_))
        ));
        let mut cfg = sample();
        cfg.mesh.identity_endpoint = Some("http://operator:15012".into());
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn inbound_picks_first_matching_selector() {
        let cfg = sample();
        let db: BTreeMap<_, _> = [("app".to_string(), "db".to_string())].into();
        let web: BTreeMap<_, _> = [("app".to_string(), "web".to_string())].into();
        let p = cfg.inbound_for(&db).unwrap();
        assert_eq!(p.mode_for_port(5432), MtlsMode::Permissive);
        assert_eq!(p.mode_for_port(9090), MtlsMode::Disable);
        assert_eq!(cfg.inbound_for(&web).unwrap().mtls, MtlsMode::Strict);
    }

    #[test]
    fn authority_matching_follows_cluster_dns() {
        let s = &sample().outbound[0];
        for ok in [
            "reviews",
            "reviews.shop",
            "reviews.shop.svc",
            "reviews.shop.svc.cluster.local",
        ] {
            assert!(s.matches_authority(ok), "{ok}");
        }
        for bad in [
            "reviews.other",
            "reviewsx",
            "ratings.shop",
            "reviews.shop.pod",
        ] {
            assert!(!s.matches_authority(bad), "{bad}");
        }
    }

    #[test]
    fn spiffe_ids() {
        assert!(is_spiffe_id("spiffe://cluster.local/ns/a/sa/b"));
        assert!(!is_spiffe_id("spiffe://cluster.local"));
        assert!(!is_spiffe_id("https://cluster.local/ns/a"));
        assert_eq!(
            spiffe_id("td", "ns1", "sa1"),
            "spiffe://td/ns/ns1/sa/sa1".to_string()
        );
    }

    #[test]
    fn downward_labels_parse_quoted_values() {
        let labels = parse_downward_labels(
            "app=\"reviews\"\npod-template-hash=\"7d4f\"\nweird=\"a\\\"b\"\nbroken\n",
        );
        assert_eq!(labels.get("app").unwrap(), "reviews");
        assert_eq!(labels.get("weird").unwrap(), "a\"b");
        assert_eq!(labels.len(), 3);
    }
}
