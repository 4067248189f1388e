//! The outbound table: every Service with a TCP port, its cluster IPs, ports, protocols,
//! endpoints (from EndpointSlices) and the SPIFFE IDs of the meshed pods behind it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use trellis_proxy::config::{Endpoint, OutboundService, Protocol, ServicePort, spiffe_id};

use super::visibility::{self, Scope};
use super::{ObjectKey, Problem, Snapshot};
use crate::pods::{NamespacePods, PodRecord};

/// Label EndpointSlices carry to name their Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The compiled table, sorted by `(namespace, name)`.
pub(crate) struct Table {
    pub services: BTreeMap<ObjectKey, Arc<OutboundService>>,
    /// Services whose `trellis.dev/export-to` narrows who sees them (absent: everyone).
    pub exports: BTreeMap<ObjectKey, Scope>,
}

impl Table {
    pub fn get(&self, key: &ObjectKey) -> Option<&OutboundService> {
        self.services.get(key).map(|s| &**s)
    }
}

/// What the compiler needs of a pod.
struct PodInfo<'a> {
    identity: Option<String>,
    labels: Option<&'a BTreeMap<String, String>>,
    ips: Vec<IpAddr>,
}

/// The protocol of a service port, from `appProtocol` first, then the port name's prefix
/// (`http-`, `http2-`, `grpc-`, `tcp-`, or exactly that word), else [`Protocol::Auto`].
pub fn infer_protocol(app_protocol: Option<&str>, name: Option<&str>) -> Protocol {
    if let Some(ap) = app_protocol {
        match ap.to_ascii_lowercase().as_str() {
            "kubernetes.io/h2c" | "http2" | "h2c" => return Protocol::Http2,
            "grpc" => return Protocol::Grpc,
            "http" | "kubernetes.io/ws" => return Protocol::Http1,
            "tcp" => return Protocol::Tcp,
            _ => {}
        }
    }
    if let Some(name) = name {
        let name = name.to_ascii_lowercase();
        let word = name.split('-').next().unwrap_or_default();
        match word {
            "http" => return Protocol::Http1,
            "http2" | "h2c" => return Protocol::Http2,
            "grpc" => return Protocol::Grpc,
            "tcp" => return Protocol::Tcp,
            _ => {}
        }
    }
    Protocol::Auto
}

fn pod_info<'a>(pod: &'a PodRecord, trust_domain: &str) -> PodInfo<'a> {
    let identity = pod
        .proxy_version()
        .is_some()
        .then(|| spiffe_id(trust_domain, pod.namespace(), pod.service_account()));
    PodInfo {
        identity,
        labels: pod.labels(),
        ips: pod.ips().collect(),
    }
}

fn selects(selector: &BTreeMap<String, String>, labels: Option<&BTreeMap<String, String>>) -> bool {
    !selector.is_empty()
        && selector
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// The rows of one namespace's Services, and the objects they were compiled from.
///
/// A Service's row depends only on objects of its own namespace (the Service, its
/// EndpointSlices, the pods there) and the trust domain, so when none of those changed since the
/// previous compile the rows are reused as they are. "Unchanged" is pointer identity: reflector
/// stores hand out the same `Arc` until an object changes, the pod cache the same
/// [`NamespacePods`] until a pod of the namespace changes, and the previous inputs are held
/// here, so an address cannot be reused by a different object while it is compared.
pub(crate) struct NamespaceRows {
    trust_domain: String,
    default_export: String,
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
    pods: Option<Arc<NamespacePods>>,
    rows: Vec<(ObjectKey, Arc<OutboundService>)>,
    exports: Vec<(ObjectKey, Scope)>,
    problems: Vec<Problem>,
}

impl std::fmt::Debug for NamespaceRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamespaceRows")
            .field("services", &self.rows.len())
            .finish_non_exhaustive()
    }
}

/// Every namespace's rows, kept in the compile's output for the next compile.
pub(crate) type RowCache = BTreeMap<String, Arc<NamespaceRows>>;

/// One namespace's inputs, the Services and slices sorted by address.
#[derive(Default)]
struct Inputs<'a> {
    services: Vec<&'a Arc<Service>>,
    slices: Vec<&'a Arc<EndpointSlice>>,
    /// The namespace's pods, as the pod cache indexes them (not grouped per compile).
    pods: Option<&'a Arc<NamespacePods>>,
}

fn namespace_of(m: &ObjectMeta) -> &str {
    m.namespace.as_deref().unwrap_or_default()
}

fn same<T>(held: &[Arc<T>], now: &[&Arc<T>]) -> bool {
    held.len() == now.len() && held.iter().zip(now).all(|(a, b)| Arc::ptr_eq(a, b))
}

fn same_pods(held: Option<&Arc<NamespacePods>>, now: Option<&Arc<NamespacePods>>) -> bool {
    match (held, now) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

fn by_address<T>(v: &mut [&Arc<T>]) {
    v.sort_unstable_by_key(|a| Arc::as_ptr(a));
}

/// Builds the table, reusing the rows of every namespace whose inputs are those `previous` was
/// built from; malformed Services and endpoints are skipped and reported. Returns the table,
/// the rows for the next compile, and how many namespaces were compiled anew.
pub(crate) fn build(
    snapshot: &Snapshot,
    previous: Option<&RowCache>,
    problems: &mut Vec<Problem>,
) -> (Table, RowCache, usize) {
    let trust_domain = snapshot
        .mesh
        .as_ref()
        .map(|m| m.spec.trust_domain.as_str())
        .unwrap_or("cluster.local");
    let default_export = match snapshot
        .mesh
        .as_ref()
        .map(|m| visibility::mesh_default(&m.spec.outbound.default_export_to))
    {
        None => "*".to_string(),
        Some(Ok(v)) => v,
        Some(Err(message)) => {
            problems.push(Problem {
                kind: "Mesh",
                object: ObjectKey::new("", crate::api::MESH_NAME),
                message,
            });
            "*".to_string()
        }
    };

    let mut groups: BTreeMap<&str, Inputs<'_>> = BTreeMap::new();
    let named = |m: &'_ ObjectMeta| {
        m.name.as_deref().is_some_and(|n| !n.is_empty())
            && m.namespace.as_deref().is_some_and(|n| !n.is_empty())
    };
    for s in snapshot.services.iter().filter(|s| named(&s.metadata)) {
        groups
            .entry(namespace_of(&s.metadata))
            .or_default()
            .services
            .push(s);
    }
    for s in snapshot
        .endpoint_slices
        .iter()
        .filter(|s| named(&s.metadata))
    {
        groups
            .entry(namespace_of(&s.metadata))
            .or_default()
            .slices
            .push(s);
    }

    let mut cache = RowCache::new();
    let mut rebuilt = 0;
    let mut table = Table {
        services: BTreeMap::new(),
        exports: BTreeMap::new(),
    };
    for (ns, mut inputs) in groups {
        by_address(&mut inputs.services);
        by_address(&mut inputs.slices);
        // Only a namespace with Services has rows: its pods matter only there.
        inputs.pods = snapshot.pods.namespace(ns);
        let reuse = previous.and_then(|p| p.get(ns)).filter(|held| {
            held.trust_domain == trust_domain
                && held.default_export == default_export
                && same(&held.services, &inputs.services)
                && same(&held.slices, &inputs.slices)
                && same_pods(held.pods.as_ref(), inputs.pods)
        });
        let rows = match reuse {
            Some(held) => held.clone(),
            None => {
                rebuilt += 1;
                Arc::new(build_namespace(&inputs, trust_domain, &default_export))
            }
        };
        for (key, svc) in &rows.rows {
            table.services.insert(key.clone(), svc.clone());
        }
        for (key, scope) in &rows.exports {
            table.exports.insert(key.clone(), scope.clone());
        }
        problems.extend(rows.problems.iter().cloned());
        cache.insert(ns.to_string(), rows);
    }
    (table, cache, rebuilt)
}

/// Compiles the rows of one namespace's Services. Endpoints are matched to pods of the same
/// namespace only (where EndpointSlice controllers put them); an endpoint naming a pod in
/// another namespace gets no identity.
fn build_namespace(inputs: &Inputs<'_>, trust_domain: &str, default_export: &str) -> NamespaceRows {
    // By name: the cache holds a namespace's pods sorted by name, as this map is.
    let pods: BTreeMap<&str, PodInfo<'_>> = inputs
        .pods
        .map(|ns| {
            ns.iter()
                .map(|p| (p.name(), pod_info(p, trust_domain)))
                .collect()
        })
        .unwrap_or_default();
    let mut slices: BTreeMap<ObjectKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in &inputs.slices {
        let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let ns = slice.metadata.namespace.clone().unwrap_or_default();
        slices
            .entry(ObjectKey::new(ns, svc.clone()))
            .or_default()
            .push(slice);
    }
    for v in slices.values_mut() {
        v.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }

    let mut rows = BTreeMap::new();
    let mut exports = Vec::new();
    let mut problems = Vec::new();
    for svc in &inputs.services {
        let key = ObjectKey::of(&svc.metadata);
        let mut report = |message: String| {
            problems.push(Problem {
                kind: "Service",
                object: key.clone(),
                message,
            })
        };
        match compile_service(svc, &key, &slices, &pods, &mut report) {
            Ok(Some(s)) => {
                match visibility::export_scope(
                    svc.metadata.annotations.as_ref(),
                    &key.namespace,
                    default_export,
                ) {
                    Ok(Scope::All) => {}
                    Ok(scope) => exports.push((key.clone(), scope)),
                    Err(message) => report(message),
                }
                rows.insert(key.clone(), Arc::new(s));
            }
            Ok(None) => {}
            Err(message) => report(message),
        }
    }
    exports.sort_by(|a, b| a.0.cmp(&b.0));
    problems.sort();
    NamespaceRows {
        trust_domain: trust_domain.to_string(),
        default_export: default_export.to_string(),
        services: inputs.services.iter().map(|a| Arc::clone(a)).collect(),
        slices: inputs.slices.iter().map(|a| Arc::clone(a)).collect(),
        pods: inputs.pods.cloned(),
        rows: rows.into_iter().collect(),
        exports,
        problems,
    }
}

fn compile_service(
    svc: &Service,
    key: &ObjectKey,
    slices: &BTreeMap<ObjectKey, Vec<&EndpointSlice>>,
    pods: &BTreeMap<&str, PodInfo<'_>>,
    report: &mut impl FnMut(String),
) -> Result<Option<OutboundService>, String> {
    let Some(spec) = &svc.spec else {
        return Err("has no spec".into());
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        // A DNS alias, not an address the proxy can intercept: not in the table.
        return Ok(None);
    }
    let raw_ports = spec.ports.as_deref().unwrap_or_default();
    if raw_ports.is_empty() {
        return Err("has no ports".into());
    }

    let mut addresses = Vec::new();
    let ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) => vec![ip.as_str()],
        _ => vec![],
    };
    for ip in ips {
        if ip == "None" || ip.is_empty() {
            continue; // headless
        }
        let parsed: IpAddr = ip
            .parse()
            .map_err(|_| format!("cluster IP {ip:?} is not an IP address"))?;
        if !addresses.contains(&parsed) {
            addresses.push(parsed);
        }
    }
    addresses.sort();

    let mut ports: Vec<ServicePort> = Vec::new();
    for p in raw_ports {
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue; // UDP and SCTP are not proxied
        }
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {} is out of range", p.port))?;
        if ports.iter().any(|q| q.port == port) {
            return Err(format!("port {port} is listed twice"));
        }
        ports.push(ServicePort {
            port,
            name: p.name.clone().filter(|n| !n.is_empty()),
            protocol: infer_protocol(p.app_protocol.as_deref(), p.name.as_deref()),
            endpoints: Vec::new(),
        });
    }
    if ports.is_empty() {
        return Ok(None); // UDP-only (DNS and the like): nothing to proxy
    }
    ports.sort_by_key(|p| p.port);

    // Pods the Service selects: the fallback for endpoints without a targetRef, and a source of
    // identities for pods that are not endpoints yet (starting), so identities do not flap.
    let selector = spec.selector.clone().unwrap_or_default();
    let selected: Vec<&PodInfo<'_>> = if selector.is_empty() {
        Vec::new()
    } else {
        pods.values()
            .filter(|p| selects(&selector, p.labels))
            .collect()
    };
    let mut identities: BTreeSet<String> =
        selected.iter().filter_map(|p| p.identity.clone()).collect();

    for slice in slices.get(key).map(Vec::as_slice).unwrap_or_default() {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue; // FQDN slices name hosts, not addresses
        }
        let slice_ports = slice.ports.as_deref().unwrap_or_default();
        for ep in slice.endpoints.as_deref().unwrap_or_default() {
            // `Some(None)`: a pod in another namespace, which gets no identity.
            let pod = ep.target_ref.as_ref().and_then(|r| {
                (r.kind.as_deref() == Some("Pod")).then(|| {
                    let here = r.namespace.as_deref().is_none_or(|ns| ns == key.namespace);
                    let name = r.name.as_deref().unwrap_or_default();
                    here.then_some(name)
                })
            });
            let mut addrs = Vec::new();
            for a in &ep.addresses {
                match a.parse::<IpAddr>() {
                    Ok(ip) => addrs.push(ip),
                    Err(_) => report(format!(
                        "EndpointSlice {}: endpoint address {a:?} is not an IP address (skipped)",
                        slice.metadata.name.as_deref().unwrap_or_default()
                    )),
                }
            }
            let identity = match pod.flatten().and_then(|name| pods.get(name)) {
                Some(p) => p.identity.clone(),
                None if pod.is_none() => selected
                    .iter()
                    .find(|p| p.ips.iter().any(|ip| addrs.contains(ip)))
                    .and_then(|p| p.identity.clone()),
                None => None,
            };
            if let Some(id) = &identity {
                identities.insert(id.clone());
            }
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            for sp in ports.iter_mut() {
                let Some(port) = slice_ports
                    .iter()
                    .find(|p| {
                        p.name.as_deref().unwrap_or_default()
                            == sp.name.as_deref().unwrap_or_default()
                            && p.protocol.as_deref().unwrap_or("TCP") == "TCP"
                    })
                    .and_then(|p| p.port)
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p != 0)
                else {
                    continue;
                };
                for ip in &addrs {
                    sp.endpoints.push(Endpoint {
                        address: SocketAddr::new(*ip, port),
                        identity: identity.clone(),
                        zone: ep.zone.clone(),
                    });
                }
            }
        }
    }
    for sp in ports.iter_mut() {
        sp.endpoints.sort_by(|a, b| {
            (a.address, &a.identity, &a.zone).cmp(&(b.address, &b.identity, &b.zone))
        });
        sp.endpoints.dedup_by(|a, b| a.address == b.address);
    }

    Ok(Some(OutboundService {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        addresses,
        ports,
        identities: identities.into_iter().collect(),
        policy: None,
    }))
}
