//! Property tests: any snapshot, however malformed, compiles without panicking, gives the same
//! bytes twice and in any input order, and every emitted config passes the sidecar's parser.

#[path = "compiler_fixtures/arbitrary.rs"]
mod arbitrary;
mod compiler_fixtures;

use arbitrary::*;
use compiler_fixtures::*;
use proptest::prelude::*;
use std::collections::BTreeSet;
use trellis_operator::api::mesh::ConfigMapContent;

use trellis_operator::compiler::{Output, Snapshot, compile, compile_incremental};
use trellis_proxy::config::ProxyConfig;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_snapshot_compiles_deterministically(objs in prop::collection::vec(obj(), 0..40)) {
        let w = world(&objs);
        let a = compile(&w.snap);
        let b = compile(&w.snap);
        let rendered = a.render_all();
        prop_assert_eq!(&rendered, &b.render_all());
        prop_assert_eq!(&a.traffic_policies, &b.traffic_policies);
        prop_assert_eq!(&a.mesh, &b.mesh);
        for (ns, json) in &rendered {
            let parsed = ProxyConfig::from_json(json.as_bytes());
            prop_assert!(parsed.is_ok(), "{}: {:?}", ns, parsed.err());
            prop_assert_eq!(&parsed.unwrap().to_json_pretty(), json);
            prop_assert_eq!(json.len(), a.configs[ns].len());
        }
        // Nothing the validator refused: every invalid object was caught before rendering.
        prop_assert!(a.invalid.is_empty(), "{:?}", a.invalid);
        // Every policy has a status.
        prop_assert_eq!(a.traffic_policies.len() + a.peer_authentications.len(),
            w.snap.traffic_policies.iter().map(|t| (t.metadata.namespace.clone(), t.metadata.name.clone())).collect::<std::collections::BTreeSet<_>>().len()
            + w.snap.peer_authentications.iter().map(|t| (t.metadata.namespace.clone(), t.metadata.name.clone())).collect::<std::collections::BTreeSet<_>>().len());
        // Reversed input order: same bytes.
        let mut r = w.snap.clone();
        r.services.reverse();
        r.endpoint_slices.reverse();
        r.namespaces.reverse();
        let c = compile(&r);
        prop_assert_eq!(&rendered, &c.render_all());
        prop_assert!(c.changed_since(&a).is_empty());
    }

    /// A recompile that reuses the previous compile's rows and fragments gives exactly what a
    /// compile from scratch gives (text, revisions, statuses), whatever was added, changed or
    /// removed in between. Unchanged objects keep their `Arc`, as reflector stores do.
    #[test]
    fn incremental_compile_equals_a_full_compile(
        objs in prop::collection::vec(obj(), 0..40),
        edits in prop::collection::vec(obj(), 0..8),
        cut in 0usize..40,
        flips in prop::collection::vec(any::<bool>(), 8),
        mode in prop::sample::select(vec![
            ConfigMapContent::Auto,
            ConfigMapContent::Full,
            ConfigMapContent::Bootstrap,
        ]),
    ) {
        let bootstrap = mode == ConfigMapContent::Bootstrap;
        let mut before = world(&objs[..cut.min(objs.len())]);
        before.add(mode_mesh(mode));
        // Only pods change (sidecar added or removed), the most common change of all.
        let mut restarted = before.clone();
        let pods: Vec<_> = restarted.snap.pods.iter().map(slim_of).collect();
        for (i, mut pod) in pods.into_iter().enumerate() {
            if flips[i % flips.len()] {
                let a = pod.metadata.annotations.get_or_insert_with(Default::default);
                if a.remove("trellis.dev/proxy-version").is_none() {
                    a.insert("trellis.dev/proxy-version".into(), "v2".into());
                }
                restarted.snap.pods.insert(trellis_operator::pods::PodRecord::of(&pod).unwrap());
            }
        }
        // `edits` come first, so for a key they share with `objs` the edit wins (a change).
        let mut after = world(&[edits, objs].concat());
        after.add(mode_mesh(mode));
        share(&before.snap, &mut after.snap);
        for (a, b) in [(&before, &after), (&after, &before), (&before, &restarted)] {
            let previous = compile(&a.snap);
            let inc = compile_incremental(&b.snap, Some(&previous));
            let full = compile(&b.snap);
            same(&inc, &full)?;
            only_changed_bytes_are_written(&previous, &inc)?;
            if bootstrap {
                only_the_bootstrap_set(&b.snap, &inc)?;
            }
            prop_assert!(inc.stats.serialized <= full.stats.serialized);
            prop_assert!(inc.stats.namespaces_indexed <= full.stats.namespaces_indexed);
        }
        // Nothing changed: nothing compiled anew.
        let first = compile(&after.snap);
        let again = compile_incremental(&after.snap, Some(&first));
        prop_assert_eq!(again.stats.serialized, 0);
        prop_assert_eq!(again.stats.namespaces_indexed, 0);
        same(&again, &first)?;
    }
}

fn mode_mesh(mode: ConfigMapContent) -> compiler_fixtures::M {
    mesh().spec(|s| s.discovery.config_map = mode)
}

/// The applier writes `changed_since`: it must be exactly the namespaces whose text changed
/// (new or gone included), except one whose new config is refused (its old ConfigMap stays).
fn only_changed_bytes_are_written(previous: &Output, now: &Output) -> Result<(), TestCaseError> {
    let (old, new) = (previous.render_all(), now.render_all());
    let expected: BTreeSet<String> = old
        .keys()
        .chain(new.keys())
        .filter(|ns| old.get(*ns) != new.get(*ns))
        .filter(|ns| new.contains_key(*ns) || !now.too_large.contains_key(*ns))
        .cloned()
        .collect();
    prop_assert_eq!(now.changed_since(previous), expected);
    Ok(())
}

/// In Bootstrap mode a namespace's config lists its own Services and the split backends of
/// what it lists (which live in the same namespace), never another namespace's Service.
fn only_the_bootstrap_set(snap: &Snapshot, out: &Output) -> Result<(), TestCaseError> {
    let full = {
        let mut s = snap.clone();
        let mut m = s.mesh.as_deref().cloned().expect("a Mesh");
        m.spec.discovery.config_map = ConfigMapContent::Full;
        s.mesh = Some(std::sync::Arc::new(m));
        compile(&s)
    };
    for (ns, json) in out.render_all() {
        let config = ProxyConfig::from_json(json.as_bytes()).unwrap();
        for svc in &config.outbound {
            prop_assert_eq!(&svc.namespace, &ns);
        }
        // A subset of what the namespace sees in Full mode.
        if let Some(f) = full.config(&ns) {
            let seen: BTreeSet<_> = ProxyConfig::from_json(f.as_bytes())
                .unwrap()
                .outbound
                .iter()
                .map(|s| (s.namespace.clone(), s.name.clone()))
                .collect();
            for svc in &config.outbound {
                prop_assert!(seen.contains(&(svc.namespace.clone(), svc.name.clone())));
            }
        }
    }
    Ok(())
}

fn same(a: &Output, b: &Output) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.render_all(), b.render_all());
    let revisions = |o: &Output| {
        o.configs
            .iter()
            .map(|(ns, c)| (ns.clone(), c.revision().to_string()))
            .collect::<Vec<_>>()
    };
    prop_assert_eq!(revisions(a), revisions(b));
    prop_assert_eq!(&a.traffic_policies, &b.traffic_policies);
    prop_assert_eq!(&a.peer_authentications, &b.peer_authentications);
    prop_assert_eq!(&a.mesh, &b.mesh);
    prop_assert_eq!(&a.too_large, &b.too_large);
    prop_assert_eq!(&a.invalid, &b.invalid);
    prop_assert_eq!(&a.bootstrapped, &b.bootstrapped);
    prop_assert_eq!(&a.policies, &b.policies);
    Ok(())
}
