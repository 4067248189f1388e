//! The synthetic cluster of the compiler benchmark (`compiler_bench.rs`), shared with the tests
//! that need a cluster too large for a full table per namespace (`auto_configmap.rs`): every
//! namespace meshed with a namespace-wide PeerAuthentication, Services spread round-robin over
//! the namespaces, each with its pods (injected) and one EndpointSlice, and a TrafficPolicy on
//! every other Service.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    Namespace, ObjectReference, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use trellis_operator::api::peer_authentication::{MtlsMode, MtlsSpec, PeerAuthenticationSpec};
use trellis_operator::api::traffic_policy::{
    RetriesSpec, RetryOn, TargetRef, TimeoutsSpec, TrafficPolicySpec,
};
use trellis_operator::api::{PeerAuthentication, TrafficPolicy};
use trellis_operator::compiler::{SlimPod, Snapshot};
use trellis_operator::pods::{Interners, PodRecord};

/// How large a cluster [`synthetic`] builds.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    pub namespaces: usize,
    pub services: usize,
    pub endpoints_per_service: usize,
    /// On Services 0, 2, 4, ...: at most half of `services`.
    pub traffic_policies: usize,
}

/// The benchmark's cluster: 1 000 Services, 10 000 endpoints and pods, 200 namespaces, 500
/// TrafficPolicies.
pub const BENCH: Size = Size {
    namespaces: 200,
    services: 1_000,
    endpoints_per_service: 10,
    traffic_policies: 500,
};

pub fn meta(ns: &str, name: &str, i: usize) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(ns.into()),
        uid: Some(format!("00000000-0000-0000-0000-{i:012}")),
        resource_version: Some(format!("{}", 100_000 + i)),
        generation: Some(1),
        creation_timestamp: Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + i as i64).unwrap(),
        )),
        labels: Some(
            [
                ("app".to_string(), name.to_string()),
                ("app.kubernetes.io/part-of".to_string(), "bench".to_string()),
            ]
            .into(),
        ),
        ..Default::default()
    }
}

pub fn tp_spec(target: &str, timeout: &str) -> TrafficPolicySpec {
    TrafficPolicySpec {
        target_ref: TargetRef {
            kind: "Service".into(),
            name: target.into(),
            port: None,
        },
        load_balancer: None,
        timeouts: Some(TimeoutsSpec {
            request: Some(timeout.into()),
            idle: None,
            connect: Some("1s".into()),
        }),
        retries: Some(RetriesSpec {
            attempts: 3,
            per_try_timeout: Some("500ms".into()),
            retry_on: vec![RetryOn::GatewayError, RetryOn::Reset],
            status_codes: vec![],
            grpc_codes: vec![],
            backoff: None,
            budget_percent: None,
            min_retries_per_second: None,
            retry_non_idempotent: false,
        }),
        circuit_breaker: None,
        outlier_detection: None,
        rate_limit: None,
        split: vec![],
    }
}

pub fn synthetic(size: Size) -> Snapshot {
    let mut s = Snapshot::default();
    // Pods are cached as the pod cache keeps them: records sharing repeated values.
    let mut interners = Interners::default();
    for n in 0..size.namespaces {
        let mut ns = Namespace {
            metadata: meta("", &format!("ns-{n}"), n),
            ..Default::default()
        };
        ns.metadata.namespace = None;
        ns.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("trellis.dev/inject".into(), "enabled".into());
        s.namespaces.push(Arc::new(ns));
        // One namespace-wide policy per namespace, and a workload policy in every tenth.
        let mut pa = PeerAuthentication::new(
            "default",
            PeerAuthenticationSpec {
                selector: None,
                mtls: MtlsSpec {
                    mode: MtlsMode::Strict,
                },
                port_level_mtls: BTreeMap::new(),
            },
        );
        pa.metadata = meta(&format!("ns-{n}"), "default", n);
        s.peer_authentications.push(Arc::new(pa));
    }
    let mut ip = 0u32;
    for i in 0..size.services {
        let ns = format!("ns-{}", i % size.namespaces);
        let name = format!("svc-{i}");
        let spec = ServiceSpec {
            cluster_ip: Some(format!("10.96.{}.{}", i / 250, i % 250 + 1)),
            cluster_ips: Some(vec![format!("10.96.{}.{}", i / 250, i % 250 + 1)]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 8080,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            selector: Some([("app".to_string(), name.clone())].into()),
            type_: Some("ClusterIP".into()),
            ..Default::default()
        };
        s.services.push(Arc::new(Service {
            metadata: meta(&ns, &name, i),
            spec: Some(spec),
            status: None,
        }));
        let mut endpoints = Vec::new();
        for e in 0..size.endpoints_per_service {
            ip += 1;
            let addr = format!("10.{}.{}.{}", 1 + ip / 65536, (ip / 256) % 256, ip % 256);
            let pod_name = format!("{name}-{e}");
            let mut pod = Pod {
                metadata: meta(&ns, &pod_name, ip as usize),
                spec: Some(PodSpec {
                    service_account_name: Some(name.clone()),
                    ..Default::default()
                }),
                status: Some(PodStatus {
                    pod_ip: Some(addr.clone()),
                    pod_ips: Some(vec![PodIP { ip: addr.clone() }]),
                    phase: Some("Running".into()),
                    ..Default::default()
                }),
            };
            pod.metadata.labels = Some([("app".to_string(), name.clone())].into());
            pod.metadata.annotations =
                Some([("trellis.dev/proxy-version".to_string(), "0.1.0".to_string())].into());
            let pod = SlimPod::from(&pod);
            s.pods
                .insert(PodRecord::read(&pod, &mut interners).expect("a named pod"));
            endpoints.push(Endpoint {
                addresses: vec![addr],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".into()),
                    name: Some(pod_name),
                    namespace: Some(ns.clone()),
                    ..Default::default()
                }),
                zone: Some(format!("zone-{}", e % 3)),
                ..Default::default()
            });
        }
        let mut slice_meta = meta(&ns, &format!("{name}-abcde"), i);
        slice_meta.labels = Some([("kubernetes.io/service-name".to_string(), name.clone())].into());
        s.endpoint_slices.push(Arc::new(EndpointSlice {
            metadata: slice_meta,
            address_type: "IPv4".into(),
            endpoints: Some(endpoints),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                protocol: Some("TCP".into()),
                app_protocol: None,
            }]),
        }));
    }
    for t in 0..size.traffic_policies {
        let i = t * 2; // every other Service
        let ns = format!("ns-{}", i % size.namespaces);
        let mut tp = TrafficPolicy::new(&format!("tp-{t}"), tp_spec(&format!("svc-{i}"), "5s"));
        tp.metadata = meta(&ns, &format!("tp-{t}"), t);
        s.traffic_policies.push(Arc::new(tp));
    }
    s
}
