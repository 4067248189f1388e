//! The pod cache (issue 19): pods are cached compacted ([`PodCompactor`], the watch's modify
//! step), and everything the operator computes from them must be what it computes from the
//! full objects.

mod compiler_fixtures;

use std::collections::BTreeMap;
use std::sync::Arc;

use compiler_fixtures::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, OwnerReference};
use trellis_operator::compiler::{self, PodCompactor, SlimPod, Snapshot};
use trellis_operator::controller::proxies;

/// The shop, plus what exercises every pod field the compiler reads: a pod opted in by label
/// in a namespace nobody selected, and a Service whose endpoint has no targetRef (its
/// identity comes from the pods its selector matches, by IP). Every pod carries what a real
/// one carries and nobody reads: owner, uid, resource version, managed fields, more labels
/// and annotations.
fn cluster() -> Snapshot {
    let mut w = shop()
        .with(namespace("batch"))
        .with(
            pod("batch", "job-0")
                .sa("jobs")
                .ip("10.0.2.1")
                .label("trellis.dev/inject", "enabled"),
        )
        .with(
            service("shop", "ratings")
                .ip("10.96.0.12")
                .port(8080, "http")
                .selector("app", "ratings"),
        )
        .with(
            slice("shop", "ratings", "ratings-1")
                .port(Some("http"), 8080)
                .endpoint("10.0.0.9", None),
        )
        .with(
            pod("shop", "ratings-0")
                .sa("ratings")
                .ip("10.0.0.9")
                .label("app", "ratings")
                .sidecar(),
        );
    for (i, p) in w.snap.pods.iter_mut().enumerate() {
        let m = &mut Arc::make_mut(p).metadata;
        m.uid = Some(format!("uid-{i}"));
        m.resource_version = Some(format!("{}", 1000 + i));
        m.generate_name = Some("x-".into());
        m.creation_timestamp = Some(at(i as i64));
        m.owner_references = Some(vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: "ReplicaSet".into(),
            name: "x-abc".into(),
            uid: "rs".into(),
            controller: Some(true),
            ..Default::default()
        }]);
        m.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some("kubelet".into()),
            ..Default::default()
        }]);
        m.labels
            .get_or_insert_with(BTreeMap::new)
            .insert("pod-template-hash".into(), "abc".into());
        m.annotations
            .get_or_insert_with(BTreeMap::new)
            .insert("prometheus.io/scrape".into(), "true".into());
    }
    w.snap
}

/// Each pod as the watch caches it: the API server's JSON read as a `SlimPod`, then compacted
/// by one compactor (as the watch has one).
fn as_cached(snap: &Snapshot) -> Snapshot {
    let mut compactor = PodCompactor::default();
    let mut out = snap.clone();
    out.pods = snap
        .pods
        .iter()
        .map(|p| {
            let json = serde_json::to_string(p.as_ref()).unwrap();
            let mut cached: SlimPod = serde_json::from_str(&json).unwrap();
            compactor.compact(&mut cached);
            Arc::new(cached)
        })
        .collect();
    out
}

#[test]
fn a_compacted_pod_compiles_to_the_same_output_as_the_full_one() {
    let full = cluster();
    let cached = as_cached(&full);
    let (a, b) = (compiler::compile(&full), compiler::compile(&cached));
    assert!(a.meshed.contains("batch"), "opted in by a pod label");
    assert_eq!(a.meshed, b.meshed);
    assert_eq!(a.render_all(), b.render_all());
    assert_eq!(a.problems, b.problems);
    assert_eq!(a.policies, b.policies);
    // The selector fallback found the identity by labels and IP.
    let shop = a.config("shop").unwrap();
    assert!(
        shop.contains("spiffe://cluster.local/ns/shop/sa/ratings"),
        "{shop}"
    );
    // The Mesh's proxy counts read the proxy version.
    let mesh = trellis_operator::api::Mesh::new("default", Default::default());
    assert_eq!(
        proxies::report(&full.pods, &mesh).0,
        proxies::report(&cached.pods, &mesh).0
    );
    assert_eq!(proxies::report(&cached.pods, &mesh).0.total, 3);
    // What the propagation report names lagging proxies by, and what the rollout restarts.
    for (f, c) in full.pods.iter().zip(&cached.pods) {
        let owner = trellis_operator::rollout::observe::owner(c);
        assert_eq!(trellis_operator::rollout::observe::owner(f), owner);
        assert_eq!(
            owner.unwrap().name,
            "x",
            "the Deployment behind ReplicaSet x-abc"
        );
        assert_eq!(f.proxy_version(), c.proxy_version());
        assert_eq!(f.status.pod_ip, c.status.pod_ip);
        assert_eq!(f.ips(), c.ips());
        assert_eq!(f.metadata.name, c.metadata.name);
        assert_eq!(f.service_account(), c.service_account());
    }
}

#[test]
fn compaction_drops_what_nobody_reads_and_shares_equal_labels() {
    let cached = as_cached(&cluster());
    let reviews: Vec<&Arc<SlimPod>> = cached
        .pods
        .iter()
        .filter(|p| p.metadata.name.as_deref().unwrap().starts_with("reviews-"))
        .collect();
    assert_eq!(reviews.len(), 2);
    // One label map for both replicas.
    assert!(std::ptr::eq(
        reviews[0].labels().unwrap(),
        reviews[1].labels().unwrap()
    ));
    let m = &reviews[0].metadata;
    assert_eq!(m.labels, None, "moved out of the metadata");
    assert_eq!(m.annotations, None);
    assert_eq!(m.owner_references, None, "the controller moved out, shared");
    assert!(std::ptr::eq(
        reviews[0].controller().unwrap(),
        reviews[1].controller().unwrap()
    ));
    assert_eq!(m.managed_fields, None);
    assert_eq!(m.uid, None);
    assert_eq!(m.resource_version, None);
    assert!(reviews[0].status.pod_ips.is_empty(), "it repeated podIP");
    assert_eq!(reviews[0].status.pod_ip.as_deref(), Some("10.0.0.5"));
    assert_eq!(
        reviews[0].proxy_version(),
        Some("0.1.0"),
        "the injector's mark stays readable"
    );
}
