//! Fluent fixture builders for compiler tests: `World::new().with(namespace("shop").meshed())`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    Namespace, ObjectReference, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use trellis_operator::api::mesh::LabelSelector;
use trellis_operator::api::peer_authentication::{MtlsMode, MtlsSpec, PeerAuthenticationSpec};
use trellis_operator::api::traffic_policy::{TargetRef, TrafficPolicySpec};
use trellis_operator::api::{Mesh, MeshSpec, PeerAuthentication, TrafficPolicy};
use trellis_operator::compiler::{SlimPod, Snapshot};
use trellis_operator::pods::PodRecord;

pub fn meta(ns: Option<&str>, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: ns.map(Into::into),
        generation: Some(1),
        ..Default::default()
    }
}

pub fn at(second: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + second).unwrap())
}

/// Something that can be put into a snapshot.
pub trait Fixture {
    fn add_to(self, s: &mut Snapshot);
}

#[derive(Clone, Default)]
pub struct World {
    pub snap: Snapshot,
}

impl World {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn with(mut self, f: impl Fixture) -> Self {
        f.add_to(&mut self.snap);
        self
    }
    pub fn add(&mut self, f: impl Fixture) {
        f.add_to(&mut self.snap);
    }
}

/// Sets a label or annotation.
fn put(map: &mut Option<BTreeMap<String, String>>, k: &str, v: &str) {
    map.get_or_insert_with(BTreeMap::new)
        .insert(k.into(), v.into());
}

// ---- Namespace ----
pub struct Ns(Namespace);
pub fn namespace(name: &str) -> Ns {
    Ns(Namespace {
        metadata: meta(None, name),
        ..Default::default()
    })
}
impl Ns {
    pub fn label(mut self, k: &str, v: &str) -> Self {
        put(&mut self.0.metadata.labels, k, v);
        self
    }
    pub fn meshed(self) -> Self {
        self.label("trellis.dev/inject", "enabled")
    }
    pub fn annotate(mut self, k: &str, v: &str) -> Self {
        put(&mut self.0.metadata.annotations, k, v);
        self
    }
}
impl Fixture for Ns {
    fn add_to(self, s: &mut Snapshot) {
        s.namespaces.push(Arc::new(self.0));
    }
}

// ---- Service ----
pub struct Svc(Service);
pub fn service(ns: &str, name: &str) -> Svc {
    Svc(Service {
        metadata: meta(Some(ns), name),
        spec: Some(ServiceSpec::default()),
        ..Default::default()
    })
}
impl Svc {
    fn spec(&mut self) -> &mut ServiceSpec {
        self.0.spec.as_mut().unwrap()
    }
    pub fn ip(mut self, ip: &str) -> Self {
        self.spec()
            .cluster_ips
            .get_or_insert_with(Vec::new)
            .push(ip.into());
        self.spec().cluster_ip.get_or_insert(ip.into());
        self
    }
    pub fn port(self, port: i32, name: &str) -> Self {
        self.port_full(port, Some(name), None, None)
    }
    pub fn port_full(
        mut self,
        port: i32,
        name: Option<&str>,
        app_protocol: Option<&str>,
        protocol: Option<&str>,
    ) -> Self {
        self.spec()
            .ports
            .get_or_insert_with(Vec::new)
            .push(ServicePort {
                port,
                name: name.map(Into::into),
                app_protocol: app_protocol.map(Into::into),
                protocol: protocol.map(Into::into),
                ..Default::default()
            });
        self
    }
    pub fn selector(mut self, k: &str, v: &str) -> Self {
        self.spec()
            .selector
            .get_or_insert_with(BTreeMap::new)
            .insert(k.into(), v.into());
        self
    }
    pub fn type_(mut self, t: &str) -> Self {
        self.spec().type_ = Some(t.into());
        self
    }
    pub fn annotate(mut self, k: &str, v: &str) -> Self {
        put(&mut self.0.metadata.annotations, k, v);
        self
    }
}
impl Fixture for Svc {
    fn add_to(self, s: &mut Snapshot) {
        s.services.push(Arc::new(self.0));
    }
}

// ---- EndpointSlice ----
pub struct Slice(EndpointSlice);
pub fn slice(ns: &str, service: &str, name: &str) -> Slice {
    let mut m = meta(Some(ns), name);
    m.labels = Some(
        [(
            "kubernetes.io/service-name".to_string(),
            service.to_string(),
        )]
        .into(),
    );
    Slice(EndpointSlice {
        metadata: m,
        address_type: "IPv4".into(),
        endpoints: Some(vec![]),
        ports: Some(vec![]),
    })
}
impl Slice {
    pub fn port(mut self, name: Option<&str>, port: i32) -> Self {
        self.0.ports.as_mut().unwrap().push(EndpointPort {
            name: name.map(Into::into),
            port: Some(port),
            protocol: Some("TCP".into()),
            ..Default::default()
        });
        self
    }
    /// An endpoint; `pod` sets the targetRef.
    pub fn endpoint(self, ip: &str, pod: Option<&str>) -> Self {
        self.endpoint_full(ip, pod, None)
    }
    pub fn endpoint_full(mut self, ip: &str, pod: Option<&str>, ready: Option<bool>) -> Self {
        let ns = self.0.metadata.namespace.clone();
        self.0.endpoints.as_mut().unwrap().push(Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions {
                ready,
                ..Default::default()
            }),
            target_ref: pod.map(|p| ObjectReference {
                kind: Some("Pod".into()),
                name: Some(p.into()),
                namespace: ns,
                ..Default::default()
            }),
            ..Default::default()
        });
        self
    }
}
impl Fixture for Slice {
    fn add_to(self, s: &mut Snapshot) {
        s.endpoint_slices.push(Arc::new(self.0));
    }
}

// ---- Pod ----
pub struct P(Pod);
pub fn pod(ns: &str, name: &str) -> P {
    P(Pod {
        metadata: meta(Some(ns), name),
        spec: Some(PodSpec::default()),
        status: Some(PodStatus::default()),
    })
}
impl P {
    pub fn sa(mut self, sa: &str) -> Self {
        self.0.spec.as_mut().unwrap().service_account_name = Some(sa.into());
        self
    }
    pub fn ip(mut self, ip: &str) -> Self {
        let st = self.0.status.as_mut().unwrap();
        st.pod_ip = Some(ip.into());
        st.pod_ips = Some(vec![PodIP { ip: ip.into() }]);
        self
    }
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.0
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(k.into(), v.into());
        self
    }
    /// Injected: carries the injector's `trellis.dev/proxy-version` annotation.
    pub fn sidecar(mut self) -> Self {
        self.0
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert("trellis.dev/proxy-version".into(), "0.1.0".into());
        self
    }
}
impl Fixture for P {
    fn add_to(self, s: &mut Snapshot) {
        s.pods
            .insert(PodRecord::of(&SlimPod::from(&self.0)).expect("a named pod"));
    }
}

/// A pod that reads back as `p` (tests change a cached pod this way: the cache holds records,
/// a change arrives as a new pod).
pub fn slim_of(p: &PodRecord) -> SlimPod {
    let mut pod = SlimPod::default();
    let m = &mut pod.metadata;
    m.name = Some(p.name().into());
    m.namespace = Some(p.namespace().into());
    m.labels = p.labels().cloned();
    m.annotations = p
        .proxy_version()
        .map(|v| [("trellis.dev/proxy-version".to_string(), v.to_string())].into());
    m.owner_references = p.controller().map(|o| vec![o.clone()]);
    if p.is_deleting() {
        m.deletion_timestamp = Some(at(0));
    }
    pod.spec.service_account_name = Some(p.service_account().into());
    pod.status.pod_ip = p.ip().map(|ip| ip.to_string());
    pod.status.pod_ips = p
        .ips()
        .map(|ip| k8s_openapi::api::core::v1::PodIP { ip: ip.to_string() })
        .collect();
    pod
}

// ---- TrafficPolicy ----
pub struct Tp(TrafficPolicy);
pub fn traffic_policy(ns: &str, name: &str, target: &str) -> Tp {
    let mut tp = TrafficPolicy::new(
        name,
        TrafficPolicySpec {
            target_ref: TargetRef {
                kind: "Service".into(),
                name: target.into(),
                port: None,
            },
            load_balancer: None,
            timeouts: None,
            retries: None,
            circuit_breaker: None,
            outlier_detection: None,
            rate_limit: None,
            split: vec![],
        },
    );
    tp.metadata.namespace = Some(ns.into());
    tp.metadata.generation = Some(1);
    Tp(tp)
}
impl Tp {
    pub fn created(mut self, second: i64) -> Self {
        self.0.metadata.creation_timestamp = Some(at(second));
        self
    }
    pub fn port(mut self, port: u16) -> Self {
        self.0.spec.target_ref.port = Some(port);
        self
    }
    pub fn spec(mut self, f: impl FnOnce(&mut TrafficPolicySpec)) -> Self {
        f(&mut self.0.spec);
        self
    }
}
impl Fixture for Tp {
    fn add_to(self, s: &mut Snapshot) {
        s.traffic_policies.push(Arc::new(self.0));
    }
}

// ---- PeerAuthentication ----
pub struct Pa(PeerAuthentication);
pub fn peer_auth(ns: &str, name: &str, mode: MtlsMode) -> Pa {
    let mut pa = PeerAuthentication::new(
        name,
        PeerAuthenticationSpec {
            selector: None,
            mtls: MtlsSpec { mode },
            port_level_mtls: BTreeMap::new(),
        },
    );
    pa.metadata.namespace = Some(ns.into());
    pa.metadata.generation = Some(1);
    Pa(pa)
}
impl Pa {
    pub fn created(mut self, second: i64) -> Self {
        self.0.metadata.creation_timestamp = Some(at(second));
        self
    }
    pub fn selector(mut self, k: &str, v: &str) -> Self {
        self.0
            .spec
            .selector
            .get_or_insert_with(LabelSelector::default)
            .match_labels
            .insert(k.into(), v.into());
        self
    }
    pub fn port(mut self, port: &str, mode: MtlsMode) -> Self {
        self.0
            .spec
            .port_level_mtls
            .insert(port.into(), MtlsSpec { mode });
        self
    }
}
impl Fixture for Pa {
    fn add_to(self, s: &mut Snapshot) {
        s.peer_authentications.push(Arc::new(self.0));
    }
}

// ---- Mesh ----
pub struct M(Mesh);
pub fn mesh() -> M {
    let spec: MeshSpec = serde_json::from_str("{}").unwrap();
    let mut m = Mesh::new("default", spec);
    m.metadata.generation = Some(3);
    m.metadata.uid = Some("mesh-uid".into());
    M(m)
}
impl M {
    pub fn spec(mut self, f: impl FnOnce(&mut MeshSpec)) -> Self {
        f(&mut self.0.spec);
        self
    }
}
impl Fixture for M {
    fn add_to(self, s: &mut Snapshot) {
        s.mesh = Some(Arc::new(self.0));
    }
}

/// A small meshed shop: `shop` (meshed) with reviews (2 pods, one slice), reviews-v2, and
/// `legacy` (not meshed) with a Service whose pod has no sidecar.
pub fn shop() -> World {
    World::new()
        .with(namespace("shop").meshed())
        .with(namespace("legacy"))
        .with(namespace("trellis-system"))
        .with(
            service("shop", "reviews")
                .ip("10.96.0.10")
                .port(9080, "http")
                .selector("app", "reviews"),
        )
        .with(
            service("shop", "reviews-v2")
                .ip("10.96.0.11")
                .port(9080, "http")
                .selector("app", "reviews-v2"),
        )
        .with(
            slice("shop", "reviews", "reviews-abc")
                .port(Some("http"), 9080)
                .endpoint("10.0.0.5", Some("reviews-0"))
                .endpoint("10.0.0.6", Some("reviews-1")),
        )
        .with(
            pod("shop", "reviews-0")
                .sa("reviews")
                .ip("10.0.0.5")
                .label("app", "reviews")
                .sidecar(),
        )
        .with(
            pod("shop", "reviews-1")
                .sa("reviews")
                .ip("10.0.0.6")
                .label("app", "reviews")
                .sidecar(),
        )
        .with(
            service("legacy", "db")
                .ip("10.96.1.1")
                .port(5432, "tcp-postgres")
                .selector("app", "db"),
        )
        .with(
            slice("legacy", "db", "db-1")
                .port(Some("tcp-postgres"), 5432)
                .endpoint("10.0.1.1", Some("db-0")),
        )
        .with(
            pod("legacy", "db-0")
                .sa("db")
                .ip("10.0.1.1")
                .label("app", "db"),
        )
}
