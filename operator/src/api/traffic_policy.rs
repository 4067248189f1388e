//! `TrafficPolicy`: how clients reach one Service (balancing, timeouts, retries, circuit
//! breaking, rate limits, canary splits).

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::conditions::Condition;

/// Client-side traffic policy for one Service. Applied by every sidecar that calls the Service,
/// that is every meshed namespace that sees it (see the Service's `trellis.dev/export-to` and
/// the namespace's `trellis.dev/import-from` annotations). When two policies target the same
/// Service (and port), the oldest wins and the others report `Accepted=False` with reason
/// `Conflicted`.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    doc = "How clients in the mesh call one Service: load balancing, timeouts, retries with a budget, circuit breaking, outlier detection, local rate limits and weighted (canary) splits.",
    plural = "trafficpolicies",
    shortname = "tp",
    namespaced,
    status = "TrafficPolicyStatus",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRef.name"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Programmed","type":"string","jsonPath":".status.conditions[?(@.type==\"Programmed\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Accepted\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    /// The Service (in this namespace) the policy applies to.
    pub target_ref: TargetRef,
    /// How requests are spread over the Service's endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSpec>,
    /// Request, idle and connect timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TimeoutsSpec>,
    /// Automatic retries, bounded by a retry budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetriesSpec>,
    /// Limits that shed load fast instead of queueing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    /// Ejection of endpoints that keep failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    /// Token-bucket rate limit applied by each calling sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// Weighted split of the Service's traffic to other Services in this namespace (canary).
    /// To keep part of the traffic on the target itself, list it too. At least one weight must be
    /// above zero.
    #[serde(default)]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.size() == 0 || self.exists(b, b.weight > 0)")
        .message("split weights are all zero: give at least one backend a weight above 0"))]
    pub split: Vec<SplitBackend>,
}

/// A reference to a Service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// Kind of the target; only `Service` is supported.
    #[serde(default = "service_kind")]
    #[x_kube(validation = Rule::new("self == 'Service'")
        .message("targetRef.kind must be Service"))]
    pub kind: String,
    /// Name of the Service.
    pub name: String,
    /// Restrict the policy to this Service port (1 to 65535).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("targetRef.port must be 1 to 65535"))]
    pub port: Option<u16>,
}

fn service_kind() -> String {
    "Service".into()
}

/// Load-balancing algorithm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LbAlgorithm {
    /// Power of two choices over peak-EWMA latency: fast endpoints get more traffic.
    #[default]
    P2CEWMA,
    /// The endpoint with the fewest requests in flight (of two picked at random).
    LeastRequest,
    /// Each endpoint in turn.
    RoundRobin,
    /// A random endpoint.
    Random,
    /// The same key always reaches the same endpoint while it is healthy; see `hash`.
    ConsistentHash,
}

/// Load-balancing settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(
    validation = Rule::new("!has(self.algorithm) || self.algorithm != 'ConsistentHash' || has(self.hash)")
        .message("algorithm ConsistentHash needs hash: set one of header, cookie or sourceIp"),
    validation = Rule::new("!has(self.hash) || (has(self.algorithm) && self.algorithm == 'ConsistentHash')")
        .message("hash is only used with algorithm ConsistentHash")
)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSpec {
    /// `P2CEWMA` (default), `LeastRequest`, `RoundRobin`, `Random` or `ConsistentHash`.
    #[serde(default)]
    pub algorithm: LbAlgorithm,
    /// What `ConsistentHash` hashes on; required with it and set exactly one field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<HashSpec>,
}

/// The key of a consistent hash: set exactly one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new(
    "(has(self.header) ? 1 : 0) + (has(self.cookie) ? 1 : 0) + (has(self.sourceIp) ? 1 : 0) == 1"
).message("hash needs exactly one of header, cookie or sourceIp"))]
#[serde(rename_all = "camelCase")]
pub struct HashSpec {
    /// Hash on this request header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Hash on this cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    /// Hash on the caller's IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<bool>,
}

/// Timeouts, as durations such as `500ms`, `2s` or `1m`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutsSpec {
    /// Whole request including retries; a timed-out request gets 504.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = super::duration_rule())]
    pub request: Option<String>,
    /// Close connections idle this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = super::duration_rule())]
    pub idle: Option<String>,
    /// Give up connecting to an endpoint after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = super::duration_rule())]
    pub connect: Option<String>,
}

/// When a request is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RetryOn {
    /// The connection to the endpoint could not be made. Like `Reset`, it also covers an
    /// HTTP/2 stream the endpoint refused unprocessed (`REFUSED_STREAM`), for any method.
    ConnectFailure,
    /// The endpoint reset the connection or stream before answering.
    Reset,
    /// Any 5xx response.
    ServerError,
    /// 502, 503 or 504.
    GatewayError,
    /// A status code listed in `statusCodes`.
    RetriableStatusCodes,
    /// A gRPC status listed in `grpcCodes`.
    GrpcStatus,
}

/// gRPC status codes by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(clippy::upper_case_acronyms)]
pub enum GrpcCode {
    Cancelled,
    Unknown,
    DeadlineExceeded,
    ResourceExhausted,
    Aborted,
    Internal,
    Unavailable,
}

impl GrpcCode {
    /// The numeric code on the wire.
    pub fn code(self) -> u32 {
        match self {
            GrpcCode::Cancelled => 1,
            GrpcCode::Unknown => 2,
            GrpcCode::DeadlineExceeded => 4,
            GrpcCode::ResourceExhausted => 8,
            GrpcCode::Aborted => 10,
            GrpcCode::Internal => 13,
            GrpcCode::Unavailable => 14,
        }
    }
}

/// Retry settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetriesSpec {
    /// Total attempts including the first, 1 to 10 (2 means one retry).
    #[x_kube(validation = Rule::new("self >= 1 && self <= 10")
        .message("attempts must be 1 to 10 (it counts the first try)"))]
    pub attempts: u32,
    /// Timeout of each attempt, as a duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = super::duration_rule())]
    pub per_try_timeout: Option<String>,
    /// Conditions that trigger a retry. Defaults to `ConnectFailure`, `Reset`, `GatewayError`.
    #[serde(default)]
    #[schemars(length(max = 8))]
    pub retry_on: Vec<RetryOn>,
    /// Status codes retried with `RetriableStatusCodes` (100 to 599).
    #[serde(default)]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.all(c, c >= 100 && c <= 599)")
        .message("statusCodes must be HTTP status codes (100 to 599)"))]
    pub status_codes: Vec<u16>,
    /// gRPC statuses retried with `GrpcStatus`, e.g. `UNAVAILABLE`.
    #[serde(default)]
    #[schemars(length(max = 8))]
    pub grpc_codes: Vec<GrpcCode>,
    /// First backoff between attempts (doubles each time, with jitter), as a duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = super::duration_rule())]
    pub backoff: Option<String>,
    /// Retry budget: retries may add at most this percent of recent requests (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self <= 100").message("budgetPercent must be 0 to 100"))]
    pub budget_percent: Option<u32>,
    /// Retries per second always allowed regardless of the percent (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retries_per_second: Option<u32>,
    /// Also retry non-idempotent methods such as POST. Off by default: a retried POST may
    /// run twice.
    #[serde(default)]
    pub retry_non_idempotent: bool,
}

/// Circuit-breaking limits per calling sidecar; excess requests get 503 at once.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakerSpec {
    /// Connections open to the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
}

/// Outlier detection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetectionSpec {
    /// Failures in a row (5xx, connect failures, resets) that eject an endpoint.
    #[serde(default = "d_consecutive")]
    #[x_kube(validation = Rule::new("self >= 1").message("consecutiveFailures must be at least 1"))]
    pub consecutive_failures: u32,
    /// First ejection time, as a duration; each further ejection of the same endpoint doubles it.
    #[serde(default = "d_ejection")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = super::duration_rule())]
    pub base_ejection_time: String,
    /// At most this percent of endpoints are ejected at once (0 to 100).
    #[serde(default = "d_max_eject")]
    #[x_kube(validation = Rule::new("self <= 100").message("maxEjectionPercent must be 0 to 100"))]
    pub max_ejection_percent: u32,
}

fn d_consecutive() -> u32 {
    5
}
fn d_ejection() -> String {
    "30s".into()
}
fn d_max_eject() -> u32 {
    50
}

/// Local rate limit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// Sustained requests per second allowed by each calling sidecar.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000000000").message("requestsPerSecond must be 1 to 1000000000"))]
    pub requests_per_second: u32,
    /// Requests allowed in a burst above the sustained rate; defaults to `requestsPerSecond`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// One backend of a weighted split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SplitBackend {
    /// Name of a Service in this namespace.
    pub name: String,
    /// Relative weight, 0 to 10000.
    #[x_kube(validation = Rule::new("self <= 10000").message("weight must be 0 to 10000"))]
    pub weight: u32,
}

/// Observed state of a TrafficPolicy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicyStatus {
    /// `Accepted` (reasons `Accepted`, `TargetNotFound`, `Conflicted`, `Invalid`), `Programmed`,
    /// `Ready`.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The generation the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Propagation of the current generation to the connected proxies (written by the
    /// propagation writer, with the `Propagated` condition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub propagation: Option<super::propagation::PropagationStatus>,
}
