//! The pod cache (issue 19): pods are cached as records of Trellis's own, indexed by
//! namespace ([`trellis_operator::pods`]), fed the pod watcher's events; everything the
//! operator computes from them must be what it computes from the pods themselves, through
//! every kind of event (list, apply, delete, relist).

mod compiler_fixtures;

use std::collections::BTreeMap;

use compiler_fixtures::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, OwnerReference};
use kube::runtime::watcher::Event;
use trellis_operator::compiler::{self, SlimPod, Snapshot};
use trellis_operator::controller::proxies;
use trellis_operator::pods::{self, PodSet};

/// The shop, plus what exercises every pod field the compiler reads: a pod opted in by label
/// in a namespace nobody selected, and a Service whose endpoint has no targetRef (its
/// identity comes from the pods its selector matches, by IP). Every pod carries what a real
/// one carries and nobody reads: owner, uid, resource version, managed fields, more labels
/// and annotations. Returns the cluster without pods, and the pods.
fn cluster() -> (Snapshot, Vec<SlimPod>) {
    let w = shop()
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
    let mut pods: Vec<SlimPod> = w.snap.pods.iter().map(slim_of).collect();
    for (i, p) in pods.iter_mut().enumerate() {
        let m = &mut p.metadata;
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
    let mut snap = w.snap;
    snap.pods = PodSet::default();
    (snap, pods)
}

/// A pod as the watch delivers it: the API server's JSON, read as a `SlimPod`.
fn on_the_wire(p: &SlimPod) -> SlimPod {
    serde_json::from_str(&serde_json::to_string(p).unwrap()).unwrap()
}

/// What the operator computes from `snap`'s pods, compared with what it computes from `pods`
/// themselves.
fn assert_same_as(snap: &Snapshot, cached: &PodSet, pods: &[SlimPod], what: &str) {
    let mut direct = snap.clone();
    direct.pods = PodSet::from_pods(pods);
    let mut through = snap.clone();
    through.pods = cached.clone();
    let (a, b) = (compiler::compile(&direct), compiler::compile(&through));
    assert_eq!(a.meshed, b.meshed, "{what}");
    assert_eq!(a.render_all(), b.render_all(), "{what}");
    assert_eq!(a.problems, b.problems, "{what}");
    assert_eq!(a.policies, b.policies, "{what}");
    let mesh = trellis_operator::api::Mesh::new("default", Default::default());
    assert_eq!(
        proxies::report(&direct.pods, &mesh).0,
        proxies::report(&through.pods, &mesh).0,
        "{what}"
    );
    assert_eq!(cached.len(), pods.len(), "{what}");
    for p in pods {
        let meta = &p.metadata;
        let c = cached
            .get(
                meta.namespace.as_deref().unwrap(),
                meta.name.as_deref().unwrap(),
            )
            .unwrap_or_else(|| panic!("{what}: {:?} is cached", meta.name));
        assert_eq!(c.labels(), p.labels(), "{what}");
        assert_eq!(c.proxy_version(), p.proxy_version(), "{what}");
        assert_eq!(c.controller(), p.controller(), "{what}");
        assert_eq!(c.service_account(), p.service_account(), "{what}");
        assert_eq!(c.ip().map(|ip| ip.to_string()), p.status.pod_ip, "{what}");
        let mut ips: Vec<_> = c.ips().collect();
        ips.sort();
        let mut want = p.ips();
        want.sort();
        assert_eq!(ips, want, "{what}");
    }
}

#[test]
fn the_cache_fed_by_the_watch_compiles_to_what_the_pods_compile_to() {
    let (snap, mut pods) = cluster();
    let (store, mut writer) = pods::store();
    writer.apply_watcher_event(&Event::Init);
    for p in &pods {
        writer.apply_watcher_event(&Event::InitApply(on_the_wire(p)));
    }
    writer.apply_watcher_event(&Event::InitDone);
    assert_same_as(&snap, &store.state(), &pods, "after the first list");
    let out = compiler::compile(&Snapshot {
        pods: store.state(),
        ..snap.clone()
    });
    assert!(out.meshed.contains("batch"), "opted in by a pod label");
    // The selector fallback found the identity by labels and IP.
    let shop = out.config("shop").unwrap();
    assert!(
        shop.contains("spiffe://cluster.local/ns/shop/sa/ratings"),
        "{shop}"
    );
    // What the rollout restarts: the Deployment behind ReplicaSet x-abc.
    for p in store.state().iter() {
        let owner = trellis_operator::rollout::observe::owner(p).unwrap();
        assert_eq!(owner.name, "x");
    }

    // A pod restarted without its sidecar (an update), one deleted, one created.
    let i = pods
        .iter()
        .position(|p| p.proxy_version().is_some())
        .unwrap();
    pods[i].metadata.annotations = None;
    writer.apply_watcher_event(&Event::Apply(on_the_wire(&pods[i])));
    assert_same_as(&snap, &store.state(), &pods, "after an update");
    let gone = pods.remove(0);
    writer.apply_watcher_event(&Event::Delete(on_the_wire(&gone)));
    assert_same_as(&snap, &store.state(), &pods, "after a delete");
    let mut new = gone.clone();
    new.metadata.name = Some("job-1".into());
    new.status.pod_ip = Some("10.0.2.2".into());
    new.status.pod_ips = vec![];
    pods.push(new.clone());
    writer.apply_watcher_event(&Event::Apply(on_the_wire(&new)));
    assert_same_as(&snap, &store.state(), &pods, "after a create");

    // The watch broke; while it was down the batch namespace emptied. The relist brings the
    // rest, and only at its end does the cache change.
    let before = store.state();
    pods.retain(|p| p.metadata.namespace.as_deref() != Some("batch"));
    writer.apply_watcher_event(&Event::Init);
    for p in &pods {
        writer.apply_watcher_event(&Event::InitApply(on_the_wire(p)));
    }
    assert_eq!(store.state(), before, "nothing changes before InitDone");
    writer.apply_watcher_event(&Event::InitDone);
    assert_same_as(&snap, &store.state(), &pods, "after a relist");
    assert!(store.state().namespace("batch").is_none());
    let out = compiler::compile(&Snapshot {
        pods: store.state(),
        ..snap.clone()
    });
    assert!(!out.meshed.contains("batch"), "its opted-in pods are gone");
}

/// The compile reuses a namespace's rows exactly while the cache hands out the same pod set
/// for it: a pod update that changes nothing the operator reads (a status condition, a new
/// resource version) recompiles nothing, a real change recompiles that namespace alone.
#[test]
fn only_a_namespace_whose_pods_changed_is_compiled_again() {
    let (mut snap, pods) = cluster();
    let (store, mut writer) = pods::store();
    writer.apply_watcher_event(&Event::Init);
    for p in &pods {
        writer.apply_watcher_event(&Event::InitApply(on_the_wire(p)));
    }
    writer.apply_watcher_event(&Event::InitDone);
    snap.pods = store.state();
    let first = compiler::compile_incremental(&snap, None);

    // A pod of the shop, whose Services' rows depend on its pods.
    let reviews = pods
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("reviews-0"))
        .unwrap();
    let mut touched = on_the_wire(reviews);
    touched.metadata.resource_version = Some("999999".into());
    touched.metadata.managed_fields = None;
    writer.apply_watcher_event(&Event::Apply(touched));
    snap.pods = store.state();
    let again = compiler::compile_incremental(&snap, Some(&first));
    assert_eq!(again.stats.namespaces_indexed, 0, "nothing read changed");

    let mut moved = on_the_wire(reviews);
    moved.status.pod_ip = Some("10.0.0.77".into());
    moved.status.pod_ips = vec![];
    writer.apply_watcher_event(&Event::Apply(moved));
    snap.pods = store.state();
    let third = compiler::compile_incremental(&snap, Some(&again));
    assert_eq!(third.stats.namespaces_indexed, 1, "the shop alone");
    assert_eq!(third.render_all(), compiler::compile(&snap).render_all());
}

#[test]
fn equal_labels_and_owners_are_held_once() {
    let (_, pods) = cluster();
    let (store, mut writer) = pods::store();
    writer.apply_watcher_event(&Event::Init);
    for p in &pods {
        writer.apply_watcher_event(&Event::InitApply(on_the_wire(p)));
    }
    writer.apply_watcher_event(&Event::InitDone);
    let cached = store.state();
    let reviews: Vec<_> = cached
        .iter()
        .filter(|p| p.name().starts_with("reviews-"))
        .collect();
    assert_eq!(reviews.len(), 2);
    // One label map for both replicas, one owner reference for every pod of the ReplicaSet.
    assert!(std::ptr::eq(
        reviews[0].labels().unwrap(),
        reviews[1].labels().unwrap()
    ));
    assert!(std::ptr::eq(
        reviews[0].controller().unwrap(),
        reviews[1].controller().unwrap()
    ));
    assert_eq!(reviews[0].ip(), Some("10.0.0.5".parse().unwrap()));
    assert_eq!(reviews[0].ips().count(), 1, "podIPs repeated podIP");
    assert_eq!(
        reviews[0].proxy_version(),
        Some("0.1.0"),
        "the injector's mark stays readable"
    );
}
