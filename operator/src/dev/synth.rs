//! The Kubernetes objects a cluster would hold for the local services, synthesized so the
//! operator's compiler runs on the same kinds of input it sees in a cluster.
//!
//! What differs from a cluster, and why:
//! - every pod's IP is 127.0.0.1 and each replica is reached at its sidecar's inbound port, so
//!   each replica gets its own EndpointSlice (a slice carries one port list; replicas here differ
//!   by port, not by address);
//! - Services get a synthetic cluster IP from 10.96.0.0/16 that nothing listens on: without
//!   iptables, apps reach services through the Host header, and the compiled endpoints are what
//!   the sidecars actually connect to;
//! - an opaque TCP Service has no Host header to route by, so a caller's sidecar must know the
//!   Service from the address the app connected to, as it does from the original destination
//!   behind iptables. Its cluster IP is therefore 127.0.0.1 and its ports are the outbound
//!   listeners of its callers' sidecars (each meshed client of it, on its current and its spare
//!   ports), named `tcp-0`, `tcp-1`, ...; every replica's EndpointSlice maps each of those
//!   names to its sidecar's inbound port. A client's sidecar thus carries every connection its
//!   app opens as opaque TCP, over mTLS, to that Service.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Pod, PodCondition, PodSpec, PodStatus, Service,
    ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::plan::{Plan, Role};
use super::spec::{AppProtocol, Topology};

/// The label that meshes a namespace.
pub const INJECT_LABEL: &str = "trellis.dev/inject";

/// Objects a cluster would hold for the local topology.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub namespaces: Vec<Namespace>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub pods: Vec<Pod>,
}

/// A stable per-pod UID (the TokenReview reports it as `pod-uid`).
pub fn pod_uid(namespace: &str, pod: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(format!("{namespace}/{pod}").as_bytes());
    let x = hex::encode(&h[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

fn meta(name: &str, namespace: Option<&str>, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: namespace.map(str::to_string),
        labels: (!labels.is_empty()).then_some(labels),
        // The compiler breaks TrafficPolicy conflicts by age; synthesized objects all share one.
        creation_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::UNIX_EPOCH,
        )),
        generation: Some(1),
        ..Default::default()
    }
}

/// Builds the objects for a topology laid out by `plan`.
pub fn synthesize(topo: &Topology, plan: &Plan) -> Cluster {
    let mut c = Cluster::default();
    for ns in topo.namespaces() {
        c.namespaces.push(Namespace {
            metadata: meta(
                &ns,
                None,
                [(INJECT_LABEL.to_string(), "enabled".to_string())].into(),
            ),
            ..Default::default()
        });
    }
    c.namespaces.push(Namespace {
        metadata: meta(super::ROOT_NAMESPACE, None, BTreeMap::new()),
        ..Default::default()
    });
    for (i, s) in topo.services.iter().enumerate() {
        let port_name = s.protocol.app_protocol().to_string();
        if s.protocol == AppProtocol::Tcp {
            c.services.push(tcp_service(s, plan));
            continue;
        }
        let port = ServicePort {
            name: Some(port_name.clone()),
            port: i32::from(s.port),
            target_port: Some(IntOrString::String(port_name.clone())),
            protocol: Some("TCP".into()),
            app_protocol: Some(s.protocol.app_protocol().into()),
            ..Default::default()
        };
        let cluster_ip = format!("10.96.{}.{}", i / 250, 10 + i % 250);
        c.services.push(service_object(s, cluster_ip, vec![port]));
    }
    for pod in &plan.pods {
        let (container_port, port_name) = match &pod.role {
            Role::Service { protocol, .. } => (pod.app_port, protocol.app_protocol()),
            Role::Client { .. } => (pod.app_port, "metrics"),
        };
        let mut labels = pod.labels.clone();
        if pod.proxy.is_none() {
            labels.insert(INJECT_LABEL.into(), "disabled".into());
        }
        let mut pmeta = meta(&pod.name, Some(&pod.namespace), labels);
        pmeta.uid = Some(pod_uid(&pod.namespace, &pod.name));
        if pod.proxy.is_none() {
            pmeta.annotations = Some([(INJECT_LABEL.to_string(), "disabled".to_string())].into());
        }
        c.pods.push(Pod {
            metadata: pmeta,
            spec: Some(PodSpec {
                service_account_name: Some(pod.service_account.clone()),
                containers: vec![Container {
                    name: "app".into(),
                    ports: Some(vec![ContainerPort {
                        name: Some(port_name.into()),
                        container_port: i32::from(container_port),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some("127.0.0.1".into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        });
        let (Role::Service { protocol, .. }, Some(proxy)) = (&pod.role, pod.proxy) else {
            continue;
        };
        // The slice's ports: one per Service port, by name (see the module's doc for tcp).
        let slice_ports = match protocol {
            AppProtocol::Tcp => tcp_port_names(plan, key_of(&pod.role))
                .into_iter()
                .map(|(name, _)| name)
                .collect(),
            _ => vec![protocol.app_protocol().to_string()],
        };
        c.endpoint_slices.push(EndpointSlice {
            metadata: meta(
                &pod.name,
                Some(&pod.namespace),
                [(
                    "kubernetes.io/service-name".to_string(),
                    pod.workload.clone(),
                )]
                .into(),
            ),
            address_type: "IPv4".into(),
            endpoints: Some(vec![Endpoint {
                addresses: vec!["127.0.0.1".into()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                target_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                    kind: Some("Pod".into()),
                    name: Some(pod.name.clone()),
                    namespace: Some(pod.namespace.clone()),
                    uid: Some(pod_uid(&pod.namespace, &pod.name)),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ports: Some(
                slice_ports
                    .into_iter()
                    .map(|name| EndpointPort {
                        name: Some(name),
                        // The sidecar's inbound listener: what a caller's sidecar connects to
                        // locally (in a cluster: the pod port, redirected to 15006 by iptables).
                        port: Some(i32::from(proxy.inbound)),
                        protocol: Some("TCP".into()),
                        app_protocol: Some(protocol.app_protocol().into()),
                    })
                    .collect(),
            ),
        });
    }
    c
}

fn key_of(role: &Role) -> &str {
    match role {
        Role::Service { key, .. } => key,
        Role::Client { target, .. } => target,
    }
}

/// The ports of an opaque TCP Service `key`: the outbound listeners of its meshed callers'
/// sidecars, current and spare, sorted, with the names `tcp-0`, `tcp-1`, ... in that order.
pub fn tcp_port_names(plan: &Plan, key: &str) -> Vec<(String, u16)> {
    let mut ports: Vec<u16> = plan
        .pods
        .iter()
        .filter(|p| matches!(&p.role, Role::Client { target, .. } if target == key))
        .filter_map(|p| {
            let spare = plan
                .spare
                .get(&format!("{}/{}", p.namespace, p.name))
                .map(|s| s.proxy.outbound);
            Some([p.proxy?.outbound].into_iter().chain(spare))
        })
        .flatten()
        .collect();
    ports.sort_unstable();
    ports
        .into_iter()
        .enumerate()
        .map(|(i, p)| (format!("tcp-{i}"), p))
        .collect()
}

/// An opaque TCP Service (see the module's doc): cluster IP 127.0.0.1, one port per caller
/// sidecar's outbound listener.
fn tcp_service(s: &crate::dev::spec::ServiceSpec, plan: &Plan) -> Service {
    let ports = tcp_port_names(plan, &s.key())
        .into_iter()
        .map(|(name, port)| ServicePort {
            name: Some(name.clone()),
            port: i32::from(port),
            target_port: Some(IntOrString::String(name)),
            protocol: Some("TCP".into()),
            app_protocol: Some(AppProtocol::Tcp.app_protocol().into()),
            ..Default::default()
        })
        .collect();
    service_object(s, "127.0.0.1".into(), ports)
}

/// The ClusterIP Service of a demo service: labelled and selecting `app: <name>`.
fn service_object(
    s: &crate::dev::spec::ServiceSpec,
    cluster_ip: String,
    ports: Vec<ServicePort>,
) -> Service {
    Service {
        metadata: meta(
            &s.name,
            Some(&s.namespace),
            [("app".to_string(), s.name.clone())].into(),
        ),
        spec: Some(ServiceSpec {
            selector: Some([("app".to_string(), s.name.clone())].into()),
            cluster_ip: Some(cluster_ip),
            type_: Some("ClusterIP".into()),
            ports: Some(ports),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::dev::spec::parse_services;

    #[test]
    fn one_slice_per_replica_pointing_at_its_sidecar() {
        let t = parse_services(
            Path::new("s.yaml"),
            "services:\n  - {name: api, namespace: a, port: 81, replicas: 2}\n\
             clients:\n  - {name: old, namespace: a, meshed: false, target: api, rate: 1}\n",
        )
        .unwrap();
        let plan = Plan::new(&t, 30000, Path::new("/st")).unwrap();
        let c = synthesize(&t, &plan);
        assert_eq!(c.namespaces.len(), 2);
        assert_eq!(c.services.len(), 1);
        assert_eq!(c.endpoint_slices.len(), 2);
        assert_eq!(c.pods.len(), 3);
        let inbound = plan.pods[1].proxy.unwrap().inbound;
        let slice = &c.endpoint_slices[1];
        assert_eq!(
            slice.ports.as_ref().unwrap()[0].port,
            Some(i32::from(inbound))
        );
        assert_eq!(
            slice.endpoints.as_ref().unwrap()[0]
                .target_ref
                .as_ref()
                .unwrap()
                .name
                .as_deref(),
            Some("api-1")
        );
        let old = c
            .pods
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some("old-0"))
            .unwrap();
        assert_eq!(
            old.metadata.labels.as_ref().unwrap()[INJECT_LABEL],
            "disabled",
            "the plaintext client is outside the mesh"
        );
        assert_eq!(pod_uid("a", "api-0"), pod_uid("a", "api-0"));
    }

    /// An opaque TCP Service is found by its caller's sidecar from the address its app
    /// connected to: 127.0.0.1 and that sidecar's outbound port, current or spare.
    #[test]
    fn a_tcp_service_listens_where_its_callers_sidecars_do() {
        let t = parse_services(
            Path::new("s.yaml"),
            "services:\n  - {name: cache, namespace: a, port: 6379, protocol: tcp, replicas: 2}\n\
             clients:\n  - {name: warmer, namespace: a, meshed: true, target: cache, rate: 1}\n",
        )
        .unwrap();
        let plan = Plan::new(&t, 30000, Path::new("/st")).unwrap();
        let c = synthesize(&t, &plan);
        let warmer = plan.pods.iter().find(|p| p.workload == "warmer").unwrap();
        let spare = plan.spare["a/warmer-0"].proxy.outbound;
        let spec = c.services[0].spec.as_ref().unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("127.0.0.1"));
        let ports: Vec<(Option<&str>, i32, Option<&str>)> = spec
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.as_deref(), p.port, p.app_protocol.as_deref()))
            .collect();
        let out = i32::from(warmer.proxy.unwrap().outbound);
        assert_eq!(
            ports,
            [
                (Some("tcp-0"), out, Some("tcp")),
                (Some("tcp-1"), i32::from(spare), Some("tcp"))
            ]
        );
        for (slice, pod) in c.endpoint_slices.iter().zip(plan.replicas_of("cache.a")) {
            let names: Vec<(Option<&str>, Option<i32>)> = slice
                .ports
                .as_ref()
                .unwrap()
                .iter()
                .map(|p| (p.name.as_deref(), p.port))
                .collect();
            let inbound = Some(i32::from(pod.proxy.unwrap().inbound));
            assert_eq!(names, [(Some("tcp-0"), inbound), (Some("tcp-1"), inbound)]);
        }
        assert_ne!(pod_uid("a", "api-0"), pod_uid("a", "api-1"));
    }
}
