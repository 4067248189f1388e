//! Mesh `spec.discovery.configMap: Bootstrap` (issue #19, layer 4): each namespace's ConfigMap
//! carries only its bootstrap set, its size does not follow the cluster, and the discovery
//! stream still answers for every Service the namespace may see.

mod compiler_fixtures;

use compiler_fixtures::*;
use trellis_operator::api::mesh::ConfigMapContent;
use trellis_operator::api::traffic_policy::SplitBackend;
use trellis_operator::compiler::visibility::EXPORT_TO_ANNOTATION;
use trellis_operator::compiler::{Output, compile, compile_discovery, compile_incremental};
use trellis_operator::discovery::View;
use trellis_proxy::config::ProxyConfig;
use trellis_proxy::discovery::Target;

fn bootstrap() -> M {
    mesh().spec(|s| s.discovery.config_map = ConfigMapContent::Bootstrap)
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

/// Two meshed namespaces with a Service each, plus `n` Services in `others` (not meshed).
fn cluster(extra: usize) -> World {
    let mut w = World::new()
        .with(namespace("shop").meshed())
        .with(namespace("pay").meshed())
        .with(namespace("others"))
        .with(namespace("trellis-system"))
        .with(service("shop", "web").ip("10.96.0.10").port(80, "http"))
        .with(service("pay", "api").ip("10.96.1.10").port(80, "http"));
    for i in 0..extra {
        w.add(
            service("others", &format!("s{i}"))
                .ip(&format!("10.97.{}.{}", i / 250, i % 250 + 1))
                .port(8080, "http"),
        );
    }
    w
}

#[test]
fn bootstrap_configmap_does_not_grow_with_services_of_other_namespaces() {
    let small = cluster(0).with(bootstrap());
    let large = cluster(200).with(bootstrap());
    let (a, b) = (compile(&small.snap), compile(&large.snap));
    assert_eq!(listed(&a, "shop"), ["web.shop"]);
    // Same bytes, not only the same size: nothing of the 200 new Services leaks in.
    assert_eq!(a.config("shop"), b.config("shop"));
    assert_eq!(a.configs["shop"].len(), b.configs["shop"].len());
    assert_eq!(listed(&b, "pay"), ["api.pay"]);
    // Adding Services elsewhere rewrites no bootstrap ConfigMap.
    let inc = compile_incremental(&large.snap, Some(&a));
    assert!(
        inc.changed_since(&a).is_empty(),
        "{:?}",
        inc.changed_since(&a)
    );

    // The contrast, so the test means something: in Full mode the same cluster lists all 202
    // Services in every meshed namespace.
    let full = compile(
        &cluster(200)
            .with(mesh().spec(|s| s.discovery.config_map = ConfigMapContent::Full))
            .snap,
    );
    assert_eq!(listed(&full, "shop").len(), 202);
    assert!(full.configs["shop"].len() > 20 * b.configs["shop"].len());
}

#[test]
fn auto_is_the_default_and_a_small_cluster_compiles_as_under_an_explicit_full() {
    let none = compile(&cluster(3).snap);
    let explicit = compile(
        &cluster(3)
            .with(mesh().spec(|s| s.discovery.config_map = ConfigMapContent::Full))
            .snap,
    );
    assert_eq!(listed(&none, "shop").len(), 5);
    assert_eq!(none.render_all(), explicit.render_all());
}

#[test]
fn the_discovery_view_answers_from_the_full_table_in_bootstrap_mode() {
    let w = cluster(20).with(bootstrap());
    for out in [compile(&w.snap), compile_discovery(&w.snap, None)] {
        let view = View::new(&out, 1).expect("view");
        // Not in shop's ConfigMap, but shop may see it: the stream serves it.
        let key = view
            .resolve(&Target::Service("s7.others".into()), "shop")
            .expect("resolved from the full table");
        assert_eq!(key, "s7.others");
        assert!(view.service(&key, "shop").is_some());
        assert_eq!(
            view.resolve(&Target::Service("api.pay".into()), "shop")
                .as_deref(),
            Some("api.pay")
        );
        assert_eq!(view.len(), 22);
    }
}

#[test]
fn bootstrap_keeps_split_backends_and_drops_foreign_services() {
    // web splits to web-v2, which is exported to no namespace: the split's owner declared the
    // route, so shop's bootstrap must carry web-v2 (the sidecar refuses a split to a Service
    // its table lacks). pay's api is not shop's, so it is left to the stream.
    let w = cluster(0)
        .with(
            service("shop", "web-v2")
                .ip("10.96.0.11")
                .port(80, "http")
                .annotate(EXPORT_TO_ANNOTATION, "~"),
        )
        .with(traffic_policy("shop", "split", "web").spec(|s| {
            s.split = vec![
                SplitBackend {
                    name: "web".into(),
                    weight: 90,
                },
                SplitBackend {
                    name: "web-v2".into(),
                    weight: 10,
                },
            ]
        }))
        .with(bootstrap());
    let out = compile(&w.snap);
    assert_eq!(listed(&out, "shop"), ["web.shop", "web-v2.shop"]);
    assert_eq!(listed(&out, "pay"), ["api.pay"]);
    assert!(out.invalid.is_empty() && out.too_large.is_empty());
    // The policy reaches every namespace that sees `web` (shop and pay, the latter through the
    // stream), not only the ConfigMaps that list it.
    let conditions =
        &out.traffic_policies[&trellis_operator::compiler::ObjectKey::new("shop", "split")];
    let programmed = conditions.iter().find(|c| c.type_ == "Programmed").unwrap();
    assert_eq!(programmed.reason, "Programmed", "{programmed:?}");
}

#[test]
fn a_policy_on_a_service_no_configmap_lists_still_reaches_its_callers() {
    // others/s0 is in no bootstrap ConfigMap (others is not meshed), yet shop and pay call it
    // through the stream, which carries the policy: it is programmed, not "NotVisible".
    let w = cluster(1)
        .with(traffic_policy("others", "t", "s0").spec(|s| {
            s.timeouts = Some(trellis_operator::api::traffic_policy::TimeoutsSpec {
                request: Some("2s".into()),
                ..Default::default()
            })
        }))
        .with(bootstrap());
    let out = compile(&w.snap);
    assert_eq!(listed(&out, "shop"), ["web.shop"]);
    let conditions =
        &out.traffic_policies[&trellis_operator::compiler::ObjectKey::new("others", "t")];
    let programmed = conditions.iter().find(|c| c.type_ == "Programmed").unwrap();
    assert_eq!(programmed.reason, "Programmed", "{programmed:?}");
}

#[test]
fn switching_modes_rewrites_each_namespace_once_and_matches_a_fresh_compile() {
    let full = cluster(5);
    let boot = cluster(5).with(bootstrap());
    let before = compile(&full.snap);
    let after = compile_incremental(&boot.snap, Some(&before));
    assert_eq!(after.render_all(), compile(&boot.snap).render_all());
    assert_eq!(
        after.changed_since(&before).into_iter().collect::<Vec<_>>(),
        ["pay", "shop"]
    );
}
