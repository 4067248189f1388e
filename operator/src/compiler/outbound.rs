//! The outbound table: every Service with a TCP port, its cluster IPs, ports, protocols,
//! endpoints (from EndpointSlices) and the SPIFFE IDs of the meshed pods behind it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Service;
use trellis_proxy::config::{Endpoint, OutboundService, Protocol, ServicePort, spiffe_id};

use super::visibility::{self, Scope};
use super::{ObjectKey, PROXY_VERSION_ANNOTATION, Problem, SlimPod, Snapshot};

/// Label EndpointSlices carry to name their Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The compiled table, sorted by `(namespace, name)`.
pub(crate) struct Table {
    pub services: BTreeMap<ObjectKey, OutboundService>,
    /// Services whose `trellis.dev/export-to` narrows who sees them (absent: everyone).
    pub exports: BTreeMap<ObjectKey, Scope>,
}

impl Table {
    pub fn get(&self, key: &ObjectKey) -> Option<&OutboundService> {
        self.services.get(key)
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

fn pod_info<'a>(pod: &'a SlimPod, trust_domain: &str) -> PodInfo<'a> {
    let meta = &pod.metadata;
    let meshed = meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(PROXY_VERSION_ANNOTATION));
    let sa = pod.service_account();
    let identity = meshed.then(|| {
        spiffe_id(
            trust_domain,
            meta.namespace.as_deref().unwrap_or_default(),
            sa,
        )
    });
    let mut ips = Vec::new();
    for ip in &pod.status.pod_ips {
        if let Ok(ip) = ip.ip.parse() {
            ips.push(ip);
        }
    }
    if let Some(ip) = pod.status.pod_ip.as_deref().and_then(|ip| ip.parse().ok())
        && !ips.contains(&ip)
    {
        ips.push(ip);
    }
    PodInfo {
        identity,
        labels: meta.labels.as_ref(),
        ips,
    }
}

fn selects(selector: &BTreeMap<String, String>, labels: Option<&BTreeMap<String, String>>) -> bool {
    !selector.is_empty()
        && selector
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// Builds the table; malformed Services and endpoints are skipped and reported.
pub(crate) fn build(snapshot: &Snapshot, problems: &mut Vec<Problem>) -> Table {
    let trust_domain = snapshot
        .mesh
        .as_ref()
        .map(|m| m.spec.trust_domain.as_str())
        .unwrap_or("cluster.local");

    let mut pods: BTreeMap<ObjectKey, PodInfo<'_>> = BTreeMap::new();
    for pod in &snapshot.pods {
        let key = ObjectKey::of(&pod.metadata);
        if key.name.is_empty() || key.namespace.is_empty() {
            continue;
        }
        pods.insert(key, pod_info(pod, trust_domain));
    }
    let mut slices: BTreeMap<ObjectKey, Vec<&k8s_openapi::api::discovery::v1::EndpointSlice>> =
        BTreeMap::new();
    for slice in &snapshot.endpoint_slices {
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

    let mut services = BTreeMap::new();
    let mut exports = BTreeMap::new();
    for svc in &snapshot.services {
        let key = ObjectKey::of(&svc.metadata);
        if key.name.is_empty() || key.namespace.is_empty() {
            continue;
        }
        let mut report = |message: String| {
            problems.push(Problem {
                kind: "Service",
                object: key.clone(),
                message,
            })
        };
        match compile_service(svc, &key, &slices, &pods, &mut report) {
            Ok(Some(s)) => {
                match visibility::export_scope(svc.metadata.annotations.as_ref(), &key.namespace) {
                    Ok(Scope::All) => {}
                    Ok(scope) => {
                        exports.insert(key.clone(), scope);
                    }
                    Err(message) => report(message),
                }
                services.insert(key.clone(), s);
            }
            Ok(None) => {}
            Err(message) => report(message),
        }
    }
    Table { services, exports }
}

fn compile_service(
    svc: &Service,
    key: &ObjectKey,
    slices: &BTreeMap<ObjectKey, Vec<&k8s_openapi::api::discovery::v1::EndpointSlice>>,
    pods: &BTreeMap<ObjectKey, PodInfo<'_>>,
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
        pods.range(ObjectKey::new(key.namespace.clone(), "")..)
            .take_while(|(k, _)| k.namespace == key.namespace)
            .filter(|(_, p)| selects(&selector, p.labels))
            .map(|(_, p)| p)
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
            let pod = ep.target_ref.as_ref().and_then(|r| {
                (r.kind.as_deref() == Some("Pod")).then(|| {
                    ObjectKey::new(
                        r.namespace.clone().unwrap_or_else(|| key.namespace.clone()),
                        r.name.clone().unwrap_or_default(),
                    )
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
            let identity = match pod.as_ref().and_then(|k| pods.get(k)) {
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
