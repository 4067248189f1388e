//! Property tests: any snapshot, however malformed, compiles without panicking, gives the same
//! bytes twice and in any input order, and every emitted config passes the sidecar's parser.

mod compiler_fixtures;

use compiler_fixtures::*;
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::sync::Arc;
use trellis_operator::api::mesh::ConfigMapContent;
use trellis_operator::api::peer_authentication::MtlsMode as M;
use trellis_operator::api::traffic_policy::{RetriesSpec, RetryOn, SplitBackend, TimeoutsSpec};
use trellis_operator::compiler::visibility::{EXPORT_TO_ANNOTATION, IMPORT_FROM_ANNOTATION};

use trellis_operator::compiler::{Output, Snapshot, compile, compile_incremental};
use trellis_proxy::config::ProxyConfig;

const NAMESPACES: [&str; 4] = ["a", "b", "c", "trellis-system"];
const NAMES: [&str; 4] = ["x", "y", "z", "w"];

fn ns() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&NAMESPACES[..])
}
fn name() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&NAMES[..])
}
fn ip() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u8..4, 0u8..4).prop_map(|(a, b)| format!("10.0.{a}.{b}")),
        Just("fd00::1".to_string()),
        Just("None".to_string()),
        Just("999.1.1.1".to_string()),
        Just(String::new()),
    ]
}
fn port_name() -> impl Strategy<Value = Option<&'static str>> {
    prop::option::of(prop::sample::select(
        &["http", "grpc-a", "tcp-db", "web", ""][..],
    ))
}
/// `export-to` / `import-from` values, valid and not.
fn scope() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&["*", ".", "~", "a", "b,.", "c, a", "A!", "", "~,a"][..])
}
fn mode() -> impl Strategy<Value = M> {
    prop::sample::select(&[M::Unset, M::Strict, M::Permissive, M::Disable][..])
}
fn duration() -> impl Strategy<Value = String> {
    prop::sample::select(
        &[
            "1s",
            "0s",
            "1.5s",
            "250ms",
            "",
            "99999999999999999999h",
            "1m30s",
        ][..],
    )
    .prop_map(String::from)
}

#[derive(Debug, Clone)]
enum Obj {
    Ns(&'static str, bool, Option<&'static str>),
    Svc(
        &'static str,
        &'static str,
        String,
        Vec<(i32, Option<&'static str>, bool)>,
        Option<&'static str>,
    ),
    Slice(
        &'static str,
        &'static str,
        u8,
        Vec<(String, Option<&'static str>, Option<bool>)>,
        Vec<(Option<&'static str>, i32)>,
    ),
    Pod(&'static str, &'static str, String, bool),
    Tp(
        &'static str,
        &'static str,
        &'static str,
        i64,
        Option<u16>,
        Option<String>,
        Option<u32>,
        Vec<(&'static str, u32)>,
    ),
    Pa(
        &'static str,
        &'static str,
        M,
        Option<&'static str>,
        Vec<(String, M)>,
        i64,
    ),
}

fn obj() -> impl Strategy<Value = Obj> {
    prop_oneof![
        (ns(), any::<bool>(), prop::option::of(scope())).prop_map(|(n, m, i)| Obj::Ns(n, m, i)),
        (
            ns(),
            name(),
            ip(),
            prop::collection::vec((-1i32..70000, port_name(), any::<bool>()), 0..3),
            prop::option::of(scope())
        )
            .prop_map(|(n, s, i, p, e)| Obj::Svc(n, s, i, p, e)),
        (
            ns(),
            name(),
            0u8..3,
            prop::collection::vec(
                (
                    ip(),
                    prop::option::of(name()),
                    prop::option::of(any::<bool>())
                ),
                0..4
            ),
            prop::collection::vec((port_name(), -1i32..70000), 0..3)
        )
            .prop_map(|(n, s, i, e, p)| Obj::Slice(n, s, i, e, p)),
        (ns(), name(), ip(), any::<bool>()).prop_map(|(n, p, i, s)| Obj::Pod(n, p, i, s)),
        (
            ns(),
            name(),
            name(),
            0i64..5,
            prop::option::of(prop::sample::select(&[80u16, 8080, 0][..])),
            prop::option::of(duration()),
            prop::option::of(0u32..12),
            prop::collection::vec((name(), 0u32..20_000), 0..3)
        )
            .prop_map(|(n, p, t, c, port, d, a, split)| Obj::Tp(n, p, t, c, port, d, a, split)),
        (
            ns(),
            name(),
            mode(),
            prop::option::of(name()),
            prop::collection::vec(
                (
                    prop::sample::select(&["80", "0", "x", "65535", "70000"][..])
                        .prop_map(String::from),
                    mode()
                ),
                0..3
            ),
            0i64..5
        )
            .prop_map(|(n, p, m, s, ports, c)| Obj::Pa(n, p, m, s, ports, c)),
    ]
}

fn world(objs: &[Obj]) -> World {
    let mut w = World::new();
    // A cluster has one object per kind and key; the first generated one stays.
    let mut seen = std::collections::BTreeSet::new();
    for o in objs.iter().cloned() {
        let key = match &o {
            Obj::Ns(n, ..) => ("ns", *n, String::new()),
            Obj::Svc(n, s, ..) => ("svc", *n, s.to_string()),
            Obj::Slice(n, s, i, ..) => ("slice", *n, format!("{s}-{i}")),
            Obj::Pod(n, p, ..) => ("pod", *n, p.to_string()),
            Obj::Tp(n, p, ..) => ("tp", *n, p.to_string()),
            Obj::Pa(n, p, ..) => ("pa", *n, p.to_string()),
        };
        if !seen.insert(key) {
            continue;
        }
        match o {
            Obj::Ns(n, meshed, import) => {
                let mut b = namespace(n);
                if let Some(v) = import {
                    b = b.annotate(IMPORT_FROM_ANNOTATION, v);
                }
                w.add(if meshed { b.meshed() } else { b });
            }
            Obj::Svc(n, s, i, ports, export) => {
                let mut b = service(n, s).ip(&i).selector("app", s);
                if let Some(v) = export {
                    b = b.annotate(EXPORT_TO_ANNOTATION, v);
                }
                for (port, name, udp) in ports {
                    b = b.port_full(port, name, None, udp.then_some("UDP"));
                }
                w.add(b);
            }
            Obj::Slice(n, s, idx, eps, ports) => {
                let mut b = slice(n, s, &format!("{s}-{idx}"));
                for (name, port) in ports {
                    b = b.port(name, port);
                }
                for (addr, pod, ready) in eps {
                    b = b.endpoint_full(&addr, pod, ready);
                }
                w.add(b);
            }
            Obj::Pod(n, p, i, sidecar) => {
                let b = pod(n, p).ip(&i).label("app", p).sa(p);
                w.add(if sidecar { b.sidecar() } else { b });
            }
            Obj::Tp(n, p, t, created, port, dur, attempts, split) => {
                let mut b = traffic_policy(n, p, t).created(created);
                if let Some(port) = port {
                    b = b.port(port);
                }
                w.add(b.spec(|s| {
                    s.timeouts = dur.clone().map(|d| TimeoutsSpec {
                        request: Some(d),
                        ..Default::default()
                    });
                    s.retries = attempts.map(|a| RetriesSpec {
                        attempts: a,
                        per_try_timeout: dur.clone(),
                        retry_on: vec![RetryOn::Reset],
                        status_codes: vec![],
                        grpc_codes: vec![],
                        backoff: None,
                        budget_percent: None,
                        min_retries_per_second: None,
                        retry_non_idempotent: false,
                    });
                    s.split = split
                        .into_iter()
                        .map(|(name, weight)| SplitBackend {
                            name: name.into(),
                            weight,
                        })
                        .collect();
                }));
            }
            Obj::Pa(n, p, m, sel, ports, created) => {
                let mut b = peer_auth(n, p, m).created(created);
                if let Some(s) = sel {
                    b = b.selector("app", s);
                }
                for (port, m) in ports {
                    b = b.port(&port, m);
                }
                w.add(b);
            }
        }
    }
    w
}

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
        r.pods.reverse();
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
        bootstrap in any::<bool>(),
    ) {
        let mut before = world(&objs[..cut.min(objs.len())]);
        if bootstrap {
            before.add(bootstrap_mesh());
        }
        // Only pods change (sidecar added or removed), the most common change of all.
        let mut restarted = before.clone();
        for (i, p) in restarted.snap.pods.iter_mut().enumerate() {
            if flips[i % flips.len()] {
                let mut pod = (**p).clone();
                let a = pod.metadata.annotations.get_or_insert_with(Default::default);
                if a.remove("trellis.dev/proxy-version").is_none() {
                    a.insert("trellis.dev/proxy-version".into(), "v2".into());
                }
                *p = Arc::new(pod);
            }
        }
        // `edits` come first, so for a key they share with `objs` the edit wins (a change).
        let mut after = world(&[edits, objs].concat());
        if bootstrap {
            after.add(bootstrap_mesh());
        }
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

fn bootstrap_mesh() -> compiler_fixtures::M {
    mesh().spec(|s| s.discovery.config_map = ConfigMapContent::Bootstrap)
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
        s.mesh = None;
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

/// Gives `into` the `Arc`s of `from` for objects with equal content, as a reflector store does
/// for objects that did not change between two snapshots.
fn share(from: &Snapshot, into: &mut Snapshot) {
    fn swap<T: PartialEq>(from: &[Arc<T>], into: &mut [Arc<T>]) {
        for o in into.iter_mut() {
            if let Some(f) = from.iter().find(|f| ***f == **o) {
                *o = f.clone();
            }
        }
    }
    swap(&from.services, &mut into.services);
    swap(&from.endpoint_slices, &mut into.endpoint_slices);
    swap(&from.pods, &mut into.pods);
    swap(&from.namespaces, &mut into.namespaces);
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
    Ok(())
}
