//! What `trellis dev` reads from its directory.
//!
//! Two kinds of files:
//! - `services.yaml`: the local stand-in for Deployments and Services (which programs run, how
//!   many replicas, what each one calls). Its schema is ours and parsed strictly: an unknown
//!   field, a call to a service that does not exist or a bad duration is an error naming the
//!   place, never a silent default.
//! - every other `*.yaml` / `*.yml` file: `trellis.dev/v1alpha1` objects (`Mesh`,
//!   `TrafficPolicy`, `PeerAuthentication`) exactly as `kubectl apply` would take them, several
//!   per file separated by `---`. Any other kind is an error: the directory is meant to be
//!   applied to a cluster unchanged, so it must not hold things a cluster would not accept from
//!   us.
//!
//! ```yaml
//! # services.yaml
//! services:
//!   - name: catalog          # Service and Deployment name (DNS label)
//!     namespace: shop        # meshed namespace
//!     serviceAccount: catalog  # default: the service name
//!     replicas: 3            # 1..=8
//!     port: 9080             # the Service port
//!     protocol: http         # http (HTTP/1.1), grpc (HTTP/2, gRPC framing) or tcp (opaque)
//!     labels: {version: v1}  # extra pod labels (app=<name> is always set)
//!     latency: 5ms           # time each request spends in the program
//!     failureRate: 0.3       # fraction of requests answered with 500 (0..=1)
//!     failingReplicas: 1     # only the first N replicas fail (default: all)
//!     calls: [reviews]       # downstream services called per request (`name` or `name.ns`)
//! clients:
//!   - name: load             # a traffic generator (a Pod, not a Service)
//!     namespace: shop
//!     meshed: true           # true: through its own sidecar; false: plaintext, no sidecar
//!     target: frontend       # the service it calls
//!     rate: 20               # requests per second, steady
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::api::{Mesh, PeerAuthentication, TrafficPolicy};

/// Name of the local service description inside the directory.
pub const SERVICES_FILE: &str = "services.yaml";
/// Upper bound on replicas per service: each replica is two processes and four ports.
pub const MAX_REPLICAS: u32 = 8;
/// Upper bound on a client's rate: the demo is meant to be watched, not benchmarked.
pub const MAX_RATE: f64 = 1000.0;

/// Why a directory could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Yaml { path: PathBuf, message: String },
    #[error("{}: document {index}: {message}", path.display())]
    Document {
        path: PathBuf,
        index: usize,
        message: String,
    },
    #[error("{}: {}", path.display(), problems.join("; "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
    #[error("{}: no {SERVICES_FILE} (the local services to run; see examples/demo/)", dir.display())]
    NoServices { dir: PathBuf },
}

/// Application protocol a demo service speaks. `tcp` is a line protocol (a request line, an
/// answer line) that the sidecars carry as opaque TCP over mTLS: its Service port is declared
/// `appProtocol: tcp`, so no sidecar looks for HTTP in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1.
    #[default]
    Http,
    /// HTTP/2 with gRPC framing and `grpc-status` trailers.
    Grpc,
    /// Opaque TCP (see above).
    Tcp,
}

impl AppProtocol {
    /// The Service port's `appProtocol`, which the compiler reads.
    pub fn app_protocol(self) -> &'static str {
        match self {
            AppProtocol::Http => "http",
            AppProtocol::Grpc => "grpc",
            AppProtocol::Tcp => "tcp",
        }
    }
}

/// `services.yaml` as written.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    services: Vec<RawService>,
    #[serde(default)]
    clients: Vec<RawClient>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawService {
    name: String,
    namespace: String,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default = "one")]
    replicas: u32,
    port: u16,
    #[serde(default)]
    protocol: AppProtocol,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    latency: Option<String>,
    #[serde(default)]
    failure_rate: f64,
    #[serde(default)]
    failing_replicas: Option<u32>,
    #[serde(default)]
    calls: Vec<String>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawClient {
    name: String,
    namespace: String,
    #[serde(default)]
    service_account: Option<String>,
    meshed: bool,
    target: String,
    rate: f64,
}

/// A local service: a Service, its Deployment's pods, and the demo program they run.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub replicas: u32,
    pub port: u16,
    pub protocol: AppProtocol,
    pub labels: BTreeMap<String, String>,
    pub latency: Duration,
    pub failure_rate: f64,
    /// Replicas with index below this fail at `failure_rate`; the others never fail.
    pub failing_replicas: u32,
    /// `name.namespace` keys of the services called per request.
    pub calls: Vec<String>,
}

impl ServiceSpec {
    /// `name.namespace`.
    pub fn key(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }

    /// The pod labels every replica carries (what the downward-API `labels` file holds).
    pub fn pod_labels(&self) -> BTreeMap<String, String> {
        let mut l = self.labels.clone();
        l.insert("app".into(), self.name.clone());
        l
    }

    /// The failure rate of one replica.
    pub fn replica_failure_rate(&self, replica: u32) -> f64 {
        if replica < self.failing_replicas {
            self.failure_rate
        } else {
            0.0
        }
    }
}

/// A traffic generator.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// With a sidecar (mTLS, identity) or plaintext straight at the target's pods.
    pub meshed: bool,
    /// `name.namespace` of the service called.
    pub target: String,
    pub rate: f64,
}

impl ClientSpec {
    pub fn key(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }

    pub fn pod_labels(&self) -> BTreeMap<String, String> {
        [("app".to_string(), self.name.clone())].into()
    }
}

/// The validated local topology.
#[derive(Clone, Debug, PartialEq)]
pub struct Topology {
    pub services: Vec<ServiceSpec>,
    pub clients: Vec<ClientSpec>,
}

impl Topology {
    pub fn service(&self, key: &str) -> Option<&ServiceSpec> {
        self.services.iter().find(|s| s.key() == key)
    }

    /// Every namespace a service or client lives in, sorted.
    pub fn namespaces(&self) -> BTreeSet<String> {
        self.services
            .iter()
            .map(|s| s.namespace.clone())
            .chain(self.clients.iter().map(|c| c.namespace.clone()))
            .collect()
    }
}

/// The Trellis objects of the directory.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub meshes: Vec<Mesh>,
    pub traffic_policies: Vec<TrafficPolicy>,
    pub peer_authentications: Vec<PeerAuthentication>,
}

/// Everything `trellis dev` reads from its directory.
#[derive(Clone, Debug)]
pub struct DevDir {
    pub topology: Topology,
    pub objects: Objects,
}

fn yaml_options() -> serde_saphyr::Options {
    // `y`/`n`/`on`/`off` stay strings: only `true`/`false` are booleans.
    serde_saphyr::options! { strict_booleans: true }
}

/// Parses and validates `services.yaml` text. `path` only names the file in errors.
pub fn parse_services(path: &Path, text: &str) -> Result<Topology, SpecError> {
    let raw: RawFile =
        serde_saphyr::from_str_with_options(text, yaml_options()).map_err(|e| SpecError::Yaml {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    validate(raw).map_err(|problems| SpecError::Invalid {
        path: path.to_path_buf(),
        problems,
    })
}

/// A Kubernetes name: a DNS-1123 label.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Resolves `name` or `name.ns` against the caller's namespace.
fn qualify(reference: &str, namespace: &str) -> String {
    if reference.contains('.') {
        reference.to_string()
    } else {
        format!("{reference}.{namespace}")
    }
}

fn validate(raw: RawFile) -> Result<Topology, Vec<String>> {
    let mut problems = Vec::new();
    let mut services = Vec::new();
    let mut keys = BTreeSet::new();
    let mut ports = BTreeSet::new();
    if raw.services.is_empty() {
        problems.push("services: at least one service is required".to_string());
    }
    for (i, s) in raw.services.iter().enumerate() {
        let at = format!("services[{i}] ({})", s.name);
        for (what, v) in [("name", &s.name), ("namespace", &s.namespace)] {
            if !is_dns_label(v) {
                problems.push(format!(
                    "{at}.{what}: {v:?} is not a DNS label (lowercase letters, digits, '-')"
                ));
            }
        }
        let sa = s.service_account.clone().unwrap_or_else(|| s.name.clone());
        if !is_dns_label(&sa) {
            problems.push(format!("{at}.serviceAccount: {sa:?} is not a DNS label"));
        }
        if s.replicas == 0 || s.replicas > MAX_REPLICAS {
            problems.push(format!(
                "{at}.replicas: must be between 1 and {MAX_REPLICAS}"
            ));
        }
        if s.port == 0 {
            problems.push(format!("{at}.port: must be a port number (1-65535)"));
        } else if !ports.insert((s.namespace.clone(), s.name.clone(), s.port)) {
            problems.push(format!("{at}.port: duplicate"));
        }
        if !(s.failure_rate.is_finite() && (0.0..=1.0).contains(&s.failure_rate)) {
            problems.push(format!(
                "{at}.failureRate: must be between 0 and 1, got {}",
                s.failure_rate
            ));
        }
        if let Some(n) = s.failing_replicas
            && n > s.replicas
        {
            problems.push(format!(
                "{at}.failingReplicas: {n} is more than replicas ({})",
                s.replicas
            ));
        }
        if s.labels.contains_key("app") {
            problems.push(format!("{at}.labels: `app` is set from the name"));
        }
        let latency = match s.latency.as_deref().map(crate::duration::parse) {
            None => Duration::ZERO,
            Some(Ok(d)) if d <= Duration::from_secs(10) => d,
            Some(Ok(_)) => {
                problems.push(format!("{at}.latency: at most 10s"));
                Duration::ZERO
            }
            Some(Err(e)) => {
                problems.push(format!("{at}.latency: {e}"));
                Duration::ZERO
            }
        };
        let key = format!("{}.{}", s.name, s.namespace);
        if !keys.insert(key.clone()) {
            problems.push(format!("{at}: duplicate service {key}"));
        }
        services.push(ServiceSpec {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            service_account: sa,
            replicas: s.replicas,
            port: s.port,
            protocol: s.protocol,
            labels: s.labels.clone(),
            latency,
            failure_rate: s.failure_rate,
            failing_replicas: s.failing_replicas.unwrap_or(s.replicas),
            calls: s.calls.iter().map(|c| qualify(c, &s.namespace)).collect(),
        });
    }
    let tcp: BTreeSet<String> = services
        .iter()
        .filter(|s| s.protocol == AppProtocol::Tcp)
        .map(ServiceSpec::key)
        .collect();
    for (i, s) in services.iter().enumerate() {
        if s.protocol == AppProtocol::Tcp && !s.calls.is_empty() {
            problems.push(format!(
                "services[{i}] ({}).calls: a tcp service answers lines and calls nothing",
                s.name
            ));
        }
        for (j, c) in s.calls.iter().enumerate() {
            if tcp.contains(c) {
                // Locally each caller of an opaque TCP service needs a sidecar listener of its
                // own (no iptables to redirect by destination): clients have exactly one.
                problems.push(format!(
                    "services[{i}] ({}).calls[{j}]: {c} speaks opaque TCP; in trellis dev only \
                     a client (clients[].target) calls it",
                    s.name
                ));
            } else if !keys.contains(c) {
                problems.push(format!(
                    "services[{i}] ({}).calls[{j}]: no service {c} in this file",
                    s.name
                ));
            } else if *c == s.key() {
                problems.push(format!(
                    "services[{i}] ({}).calls[{j}]: a service calling itself loops forever",
                    s.name
                ));
            }
        }
    }
    if let Some(cycle) = find_cycle(&services) {
        problems.push(format!(
            "services: calls form a cycle ({}): every request would loop",
            cycle.join(" -> ")
        ));
    }
    let mut clients = Vec::new();
    for (i, c) in raw.clients.iter().enumerate() {
        let at = format!("clients[{i}] ({})", c.name);
        for (what, v) in [("name", &c.name), ("namespace", &c.namespace)] {
            if !is_dns_label(v) {
                problems.push(format!("{at}.{what}: {v:?} is not a DNS label"));
            }
        }
        let key = format!("{}.{}", c.name, c.namespace);
        if !keys.insert(key.clone()) {
            problems.push(format!("{at}: name {key} is already used"));
        }
        let target = qualify(&c.target, &c.namespace);
        if !services.iter().any(|s| s.key() == target) {
            problems.push(format!("{at}.target: no service {target} in this file"));
        } else if tcp.contains(&target) && !c.meshed {
            problems.push(format!(
                "{at}.meshed: {target} speaks opaque TCP; its clients go through a sidecar \
                 (the plaintext client speaks HTTP)"
            ));
        }
        if !(c.rate.is_finite() && c.rate > 0.0 && c.rate <= MAX_RATE) {
            problems.push(format!(
                "{at}.rate: must be above 0 and at most {MAX_RATE} requests/s"
            ));
        }
        let sa = c.service_account.clone().unwrap_or_else(|| c.name.clone());
        if !is_dns_label(&sa) {
            problems.push(format!("{at}.serviceAccount: {sa:?} is not a DNS label"));
        }
        clients.push(ClientSpec {
            name: c.name.clone(),
            namespace: c.namespace.clone(),
            service_account: sa,
            meshed: c.meshed,
            target,
            rate: c.rate,
        });
    }
    if problems.is_empty() {
        Ok(Topology { services, clients })
    } else {
        Err(problems)
    }
}

/// A call cycle, if any (depth-first search over the call graph).
fn find_cycle(services: &[ServiceSpec]) -> Option<Vec<String>> {
    fn visit(
        key: &str,
        services: &[ServiceSpec],
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(pos) = stack.iter().position(|k| k == key) {
            let mut cycle = stack[pos..].to_vec();
            cycle.push(key.to_string());
            return Some(cycle);
        }
        if done.contains(key) {
            return None;
        }
        stack.push(key.to_string());
        if let Some(s) = services.iter().find(|s| s.key() == key) {
            for c in &s.calls {
                if c != key
                    && let Some(cycle) = visit(c, services, stack, done)
                {
                    return Some(cycle);
                }
            }
        }
        stack.pop();
        done.insert(key.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for s in services {
        if let Some(c) = visit(&s.key(), services, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

/// Parses the Trellis objects of one YAML file (any number of `---` documents).
pub fn parse_objects(path: &Path, text: &str, into: &mut Objects) -> Result<(), SpecError> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple_with_options(text, yaml_options()).map_err(|e| {
            SpecError::Yaml {
                path: path.to_path_buf(),
                message: e.to_string(),
            }
        })?;
    for (index, doc) in docs.into_iter().enumerate() {
        let index = index + 1;
        let derr = |message: String| SpecError::Document {
            path: path.to_path_buf(),
            index,
            message,
        };
        if doc.is_null() {
            continue;
        }
        let field = |f: &str| {
            doc.get(f)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        let kind = kind.as_str();
        let expected = format!("{}/{}", crate::api::GROUP, crate::api::VERSION);
        if api_version != expected {
            return Err(derr(format!(
                "apiVersion {api_version:?} (kind {kind:?}) is not {expected}: this directory holds \
                 only Mesh, TrafficPolicy and PeerAuthentication objects, plus {SERVICES_FILE}"
            )));
        }
        let name = doc
            .pointer("/metadata/name")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        if name.is_empty() {
            return Err(derr(format!("{kind} has no metadata.name")));
        }
        let what = |e: serde_json::Error| derr(format!("{kind} {name}: {e}"));
        match kind {
            "Mesh" => into.meshes.push(serde_json::from_value(doc).map_err(what)?),
            "TrafficPolicy" | "PeerAuthentication" => {
                if doc
                    .pointer("/metadata/namespace")
                    .and_then(|v| v.as_str())
                    .is_none()
                {
                    return Err(derr(format!(
                        "{kind} {name} has no metadata.namespace (a cluster would put it in \
                         `default`; say which namespace you mean)"
                    )));
                }
                if kind == "TrafficPolicy" {
                    into.traffic_policies
                        .push(serde_json::from_value(doc).map_err(what)?);
                } else {
                    into.peer_authentications
                        .push(serde_json::from_value(doc).map_err(what)?);
                }
            }
            other => {
                return Err(derr(format!(
                    "unknown kind {other:?}: expected Mesh, TrafficPolicy or PeerAuthentication"
                )));
            }
        }
    }
    Ok(())
}

/// The YAML files of a directory, sorted, `services.yaml` included.
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, SpecError> {
    let io = |source| SpecError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let is_yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if is_yaml && !hidden && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Loads and validates the whole directory. Nothing is used unless everything parses.
pub fn load_dir(dir: &Path) -> Result<DevDir, SpecError> {
    let mut topology = None;
    let mut objects = Objects::default();
    for path in yaml_files(dir)? {
        let text = std::fs::read_to_string(&path).map_err(|source| SpecError::Io {
            path: path.clone(),
            source,
        })?;
        if path.file_name().and_then(|n| n.to_str()) == Some(SERVICES_FILE) {
            topology = Some(parse_services(&path, &text)?);
        } else {
            parse_objects(&path, &text, &mut objects)?;
        }
    }
    let topology = topology.ok_or_else(|| SpecError::NoServices {
        dir: dir.to_path_buf(),
    })?;
    check_objects(dir, &topology, &objects)?;
    Ok(DevDir { topology, objects })
}

/// Cross-file checks a cluster would not make but that catch typos in a local demo: a policy in
/// a namespace no local service lives in would silently apply to nothing.
fn check_objects(dir: &Path, topo: &Topology, objects: &Objects) -> Result<(), SpecError> {
    let mut problems = Vec::new();
    let meshes: Vec<_> = objects
        .meshes
        .iter()
        .filter(|m| m.metadata.name.as_deref() == Some(crate::api::MESH_NAME))
        .collect();
    if objects.meshes.len() > meshes.len() {
        problems.push(format!(
            "only the Mesh named `{}` is used; rename or remove the others",
            crate::api::MESH_NAME
        ));
    }
    let namespaces = topo.namespaces();
    for tp in &objects.traffic_policies {
        let ns = tp.metadata.namespace.clone().unwrap_or_default();
        let name = tp.metadata.name.clone().unwrap_or_default();
        let target = format!("{}.{ns}", tp.spec.target_ref.name);
        if topo.service(&target).is_none() {
            problems.push(format!(
                "TrafficPolicy {ns}/{name}: targets {target}, which {SERVICES_FILE} does not define"
            ));
        }
    }
    for pa in &objects.peer_authentications {
        let ns = pa.metadata.namespace.clone().unwrap_or_default();
        if !namespaces.contains(&ns) && ns != crate::dev::ROOT_NAMESPACE {
            problems.push(format!(
                "PeerAuthentication {ns}/{}: no local service runs in namespace {ns}",
                pa.metadata.name.clone().unwrap_or_default()
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(SpecError::Invalid {
            path: dir.to_path_buf(),
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
services:
  - name: frontend
    namespace: shop
    port: 8080
    calls: [catalog, reviews.shop]
  - name: catalog
    namespace: shop
    replicas: 3
    port: 9080
    failureRate: 0.3
    failingReplicas: 1
    latency: 5ms
  - name: reviews
    namespace: shop
    port: 9081
    protocol: grpc
clients:
  - name: load
    namespace: shop
    meshed: true
    target: frontend
    rate: 20
"#;

    fn parse(text: &str) -> Result<Topology, SpecError> {
        parse_services(Path::new("services.yaml"), text)
    }

    fn problems(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_the_documented_shape() {
        let t = parse(GOOD).unwrap();
        assert_eq!(t.services.len(), 3);
        let fe = &t.services[0];
        assert_eq!(fe.service_account, "frontend");
        assert_eq!(fe.calls, vec!["catalog.shop", "reviews.shop"]);
        let cat = t.service("catalog.shop").unwrap();
        assert_eq!(cat.replica_failure_rate(0), 0.3);
        assert_eq!(cat.replica_failure_rate(1), 0.0);
        assert_eq!(cat.latency, Duration::from_millis(5));
        assert_eq!(
            t.service("reviews.shop").unwrap().protocol,
            AppProtocol::Grpc
        );
        assert_eq!(t.clients[0].target, "frontend.shop");
    }

    #[test]
    fn unknown_fields_are_errors() {
        let e = problems(&GOOD.replace("failureRate: 0.3", "failurRate: 0.3"));
        assert!(e.contains("failurRate"), "{e}");
        let e = problems("services: []\nextra: 1\n");
        assert!(e.contains("extra"), "{e}");
    }

    #[test]
    fn bad_values_are_all_reported() {
        let text = GOOD
            .replace("failureRate: 0.3", "failureRate: 1.5")
            .replace("latency: 5ms", "latency: 5 parsecs")
            .replace(
                "calls: [catalog, reviews.shop]",
                "calls: [catalog, ratings]",
            )
            .replace("rate: 20", "rate: 0");
        let e = problems(&text);
        for needle in [
            "failureRate: must be between 0 and 1",
            "latency: invalid duration",
            "no service ratings.shop",
            "rate: must be above 0",
        ] {
            assert!(e.contains(needle), "{needle} missing from {e}");
        }
        assert!(e.starts_with("services.yaml: "), "{e}");
    }

    #[test]
    fn protocol_and_names_are_checked() {
        let e = problems(&GOOD.replace("protocol: grpc", "protocol: quic"));
        assert!(e.contains("quic"), "{e}");
        let e = problems(&GOOD.replace("name: catalog\n", "name: Catalog\n"));
        assert!(e.contains("not a DNS label"), "{e}");
        let e = problems(&GOOD.replace("replicas: 3", "replicas: 99"));
        assert!(e.contains("replicas: must be between 1 and 8"), "{e}");
    }

    #[test]
    fn tcp_services_are_used_by_meshed_clients_only() {
        let text = GOOD.replace(
            "clients:\n",
            "  - name: cache\n    namespace: shop\n    port: 6379\n    protocol: tcp\n\
             clients:\n  - name: warmer\n    namespace: shop\n    meshed: true\n    \
             target: cache\n    rate: 5\n",
        );
        let t = parse(&text).unwrap();
        assert_eq!(t.service("cache.shop").unwrap().protocol, AppProtocol::Tcp);
        let e =
            problems(&text.replace("calls: [catalog, reviews.shop]", "calls: [catalog, cache]"));
        assert!(e.contains("cache.shop speaks opaque TCP"), "{e}");
        let e = problems(&text.replace(
            "meshed: true\n    target: cache",
            "meshed: false\n    target: cache",
        ));
        assert!(e.contains("clients[0] (warmer).meshed"), "{e}");
        let e = problems(&text.replace("protocol: tcp\n", "protocol: tcp\n    calls: [catalog]\n"));
        assert!(
            e.contains("a tcp service answers lines and calls nothing"),
            "{e}"
        );
    }

    #[test]
    fn call_cycles_are_refused() {
        let text = GOOD.replace(
            "    protocol: grpc\n",
            "    protocol: grpc\n    calls: [frontend]\n",
        );
        let e = problems(&text);
        assert!(e.contains("cycle"), "{e}");
    }

    #[test]
    fn objects_dispatch_on_kind_and_refuse_others() {
        let mut o = Objects::default();
        let text = r#"
apiVersion: trellis.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec:
  mtls: {mode: Strict}
---
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: catalog, namespace: shop}
spec:
  targetRef: {name: catalog}
  retries: {attempts: 3, retryOn: [ServerError]}
"#;
        parse_objects(Path::new("p.yaml"), text, &mut o).unwrap();
        assert_eq!(o.peer_authentications.len(), 1);
        assert_eq!(o.traffic_policies.len(), 1);
        let e = parse_objects(
            Path::new("x.yaml"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n",
            &mut o,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("x.yaml: document 1") && e.contains("ConfigMap"),
            "{e}"
        );
        let e = parse_objects(
            Path::new("y.yaml"),
            "apiVersion: trellis.dev/v1alpha1\nkind: Gateway\nmetadata: {name: a}\n",
            &mut o,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown kind \"Gateway\""), "{e}");
        let e = parse_objects(
            Path::new("z.yaml"),
            "apiVersion: trellis.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: a}\n",
            &mut o,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no metadata.namespace"), "{e}");
        let e = parse_objects(Path::new("w.yaml"), "a: [unclosed\n", &mut o)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("w.yaml: "), "{e}");
    }
}
