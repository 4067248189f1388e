//! Mesh `spec.discovery.configMap: Auto` (the default, issue #19): per namespace, the full
//! table while its `config.json` stays within 64 KiB, else the bootstrap set. A small mesh
//! compiles exactly as `Full` did; a large one never writes a ConfigMap past the bound, where
//! `Full` stops updating (`ConfigTooLarge`).

mod compiler_fixtures;
mod synthetic;

use std::collections::BTreeSet;
use std::sync::Arc;

use compiler_fixtures::*;
use trellis_operator::api::mesh::ConfigMapContent;
use trellis_operator::compiler::visibility::IMPORT_FROM_ANNOTATION;
use trellis_operator::compiler::{
    AUTO_FULL_TABLE_MAX_BYTES, ObjectKey, Output, Snapshot, compile, compile_discovery,
    compile_incremental,
};
use trellis_operator::discovery::View;
use trellis_proxy::config::ProxyConfig;
use trellis_proxy::discovery::Target;

fn with_mode(mut snap: Snapshot, mode: ConfigMapContent) -> Snapshot {
    let mut m = snap
        .mesh
        .as_deref()
        .cloned()
        .unwrap_or_else(|| trellis_operator::api::Mesh::new("default", Default::default()));
    m.spec.discovery.config_map = mode;
    snap.mesh = Some(Arc::new(m));
    snap
}

/// `name.namespace` of every Service in a namespace's rendered config.
fn listed(out: &Output, ns: &str) -> Vec<String> {
    let json = out.config(ns).expect("config emitted");
    let config = ProxyConfig::from_json(json.as_bytes()).expect("the sidecar parses it");
    config
        .outbound
        .iter()
        .map(|s| format!("{}.{}", s.name, s.namespace))
        .collect()
}

fn condition<'a>(out: &'a Output, type_: &str) -> &'a trellis_operator::api::Condition {
    out.mesh.iter().find(|c| c.type_ == type_).unwrap()
}

/// `big` sees every Service (its own, `lib`'s `n` and `small`'s); `small` imports only itself
/// and `tools` (one Service, with a TrafficPolicy that `big` sees too).
fn mixed(n: usize) -> World {
    let mut w = World::new()
        .with(namespace("big").meshed())
        .with(
            namespace("small")
                .meshed()
                .annotate(IMPORT_FROM_ANNOTATION, "small,tools"),
        )
        .with(namespace("lib"))
        .with(namespace("tools"))
        .with(namespace("trellis-system"))
        .with(service("big", "front").ip("10.96.0.10").port(80, "http"))
        .with(service("small", "api").ip("10.96.1.10").port(80, "http"))
        .with(service("tools", "dns").ip("10.96.2.10").port(53, "tcp-dns"))
        .with(traffic_policy("tools", "t", "dns").spec(|s| {
            s.timeouts = Some(trellis_operator::api::traffic_policy::TimeoutsSpec {
                connect: Some("2s".into()),
                ..Default::default()
            })
        }))
        .with(mesh());
    for i in 0..n {
        w.add(
            service("lib", &format!("s{i}"))
                .ip(&format!("10.97.{}.{}", i / 250, i % 250 + 1))
                .port(8080, "http"),
        );
    }
    w
}

#[test]
fn auto_is_the_default() {
    assert_eq!(ConfigMapContent::default(), ConfigMapContent::Auto);
    let spec: trellis_operator::api::MeshSpec = serde_json::from_str("{}").unwrap();
    assert_eq!(spec.discovery.config_map, ConfigMapContent::Auto);
}

#[test]
fn a_small_cluster_compiles_under_auto_exactly_as_under_full() {
    for world in [shop(), mixed(20)] {
        let full = compile(&with_mode(world.snap.clone(), ConfigMapContent::Full));
        let auto = compile(&world.snap);
        assert!(!auto.configs.is_empty());
        assert_eq!(auto.render_all(), full.render_all());
        assert!(auto.bootstrapped.is_empty(), "{:?}", auto.bootstrapped);
        assert_eq!(auto.policies, full.policies);
        assert_eq!(auto.traffic_policies, full.traffic_policies);
        // Nothing about Auto in the status while every namespace keeps its full table.
        assert!(
            !condition(&auto, "Programmed").message.contains("Auto"),
            "{:?}",
            auto.mesh
        );
    }
}

#[test]
fn a_namespace_over_the_threshold_carries_its_bootstrap_set_and_a_small_one_its_full_table() {
    let w = mixed(400);
    let full = compile(&with_mode(w.snap.clone(), ConfigMapContent::Full));
    // The test means something: big's full table is over the bound, small's is not.
    assert!(full.configs["big"].len() > AUTO_FULL_TABLE_MAX_BYTES);
    assert!(full.configs["small"].len() < AUTO_FULL_TABLE_MAX_BYTES);

    let auto = compile(&w.snap);
    assert_eq!(auto.bootstrapped, BTreeSet::from(["big".to_string()]));
    assert_eq!(listed(&auto, "big"), ["front.big"]);
    assert!(auto.configs["big"].len() <= AUTO_FULL_TABLE_MAX_BYTES);
    assert_eq!(listed(&auto, "small"), ["api.small", "dns.tools"]);
    assert_eq!(auto.config("small"), full.config("small"));

    // What each ConfigMap lists is what propagation counts against, on every replica.
    assert!(auto.policies["small"].services.contains("dns.tools"));
    assert!(auto.policies["big"].services.is_empty());
    assert!(full.policies["big"].services.contains("dns.tools"));
    let table_only = compile_discovery(&w.snap, None);
    assert_eq!(table_only.bootstrapped, auto.bootstrapped);
    assert_eq!(table_only.policies, auto.policies);

    // The policy reaches both namespaces: small through its ConfigMap, big through the stream.
    let programmed = auto.traffic_policies[&ObjectKey::new("tools", "t")]
        .iter()
        .find(|c| c.type_ == "Programmed")
        .unwrap();
    assert_eq!(programmed.reason, "Programmed", "{programmed:?}");
    // And the stream answers big for what its ConfigMap no longer lists.
    let view = View::new(&auto, 1).expect("view");
    assert_eq!(
        view.resolve(&Target::Service("s7.lib".into()), "big")
            .as_deref(),
        Some("s7.lib")
    );

    // The Mesh says which namespaces left the full table.
    let message = &condition(&auto, "Programmed").message;
    assert!(
        message.contains("configMap Auto: 1 namespace(s) carry the bootstrap set"),
        "{message}"
    );
    assert!(message.contains(": big."), "{message}");
}

#[test]
fn crossing_the_threshold_rewrites_the_namespace_and_matches_a_fresh_compile() {
    let before = compile(&mixed(20).snap);
    let grown = mixed(400);
    let after = compile_incremental(&grown.snap, Some(&before));
    assert_eq!(after.render_all(), compile(&grown.snap).render_all());
    assert_eq!(after.bootstrapped, BTreeSet::from(["big".to_string()]));
    // small lists nothing of lib: its bytes did not move.
    assert_eq!(
        after.changed_since(&before).into_iter().collect::<Vec<_>>(),
        ["big"]
    );
    // And back.
    let shrunk = compile_incremental(&mixed(20).snap, Some(&after));
    assert!(shrunk.bootstrapped.is_empty());
    assert_eq!(shrunk.render_all(), before.render_all());
}

#[test]
fn explicit_full_and_bootstrap_keep_their_meaning_above_the_threshold() {
    let w = mixed(400);
    let full = compile(&with_mode(w.snap.clone(), ConfigMapContent::Full));
    assert!(full.bootstrapped.is_empty());
    assert_eq!(listed(&full, "big").len(), 403);
    let boot = compile(&with_mode(w.snap.clone(), ConfigMapContent::Bootstrap));
    assert_eq!(
        boot.bootstrapped,
        BTreeSet::from(["big".to_string(), "small".to_string()])
    );
    assert_eq!(listed(&boot, "small"), ["api.small"]);
    // Auto's report is Auto's: an explicit Bootstrap does not repeat it.
    assert!(!condition(&boot, "Programmed").message.contains("Auto"));
}

/// The compiler benchmark's cluster at a size where one copy of the table passes the 1 MiB
/// object limit: `Full` refuses every namespace, `Auto` (the default) writes every one within
/// 64 KiB.
#[test]
fn no_configmap_exceeds_the_threshold_on_a_cluster_where_full_no_longer_fits() {
    let snap = synthetic::synthetic(synthetic::Size {
        namespaces: 100,
        services: 2_500,
        endpoints_per_service: 2,
        traffic_policies: 200,
    });
    let full = compile(&with_mode(snap.clone(), ConfigMapContent::Full));
    assert_eq!(
        full.too_large.len(),
        100,
        "{:?} {:?}",
        full.mesh,
        full.configs.values().next().map(|c| c.len())
    );
    assert_eq!(condition(&full, "Programmed").reason, "ConfigTooLarge");

    let auto = compile(&snap);
    assert!(auto.too_large.is_empty() && auto.invalid.is_empty());
    assert_eq!(auto.configs.len(), 100);
    assert_eq!(auto.bootstrapped.len(), 100);
    let largest = auto.configs.values().map(|c| c.len()).max().unwrap();
    assert!(largest <= AUTO_FULL_TABLE_MAX_BYTES, "{largest}");
    for (ns, json) in auto.render_all() {
        assert!(
            json.len() <= AUTO_FULL_TABLE_MAX_BYTES,
            "{ns}: {}",
            json.len()
        );
        let config = ProxyConfig::from_json(json.as_bytes()).expect("the sidecar parses it");
        assert_eq!(config.outbound.len(), 25, "{ns}");
    }
    let programmed = condition(&auto, "Programmed");
    assert_eq!(programmed.reason, "Programmed");
    assert!(
        programmed
            .message
            .contains("100 namespace(s) carry the bootstrap set")
            && programmed.message.contains("and 90 more"),
        "{}",
        programmed.message
    );
    // Every TrafficPolicy reaches every namespace (listed or streamed).
    for conds in auto.traffic_policies.values() {
        let p = conds.iter().find(|c| c.type_ == "Programmed").unwrap();
        assert_eq!(p.reason, "Programmed", "{p:?}");
    }
}

/// The decision is taken from fragment lengths, before anything is rendered: it must agree
/// with the rendered text's real length on both sides of the threshold.
#[test]
fn the_size_decision_agrees_with_the_rendered_length() {
    let mut seen = BTreeSet::new();
    for n in (100..400).step_by(3) {
        let w = mixed(n);
        let full = compile(&with_mode(w.snap.clone(), ConfigMapContent::Full));
        let auto = compile(&w.snap);
        let over = full.config("big").unwrap().len() > AUTO_FULL_TABLE_MAX_BYTES;
        assert_eq!(auto.bootstrapped.contains("big"), over, "{n} Services");
        seen.insert(over);
    }
    // The range straddles the threshold.
    assert_eq!(seen, BTreeSet::from([false, true]));
}
