//! Arbitrary clusters for property tests: every kind the compiler reads, valid and malformed,
//! over a small set of names so that objects collide, refer to each other and change.
//! Included with `#[path]` by the property tests that need it (it needs `proptest`).
#![allow(dead_code)]

use std::sync::Arc;

use proptest::prelude::*;
use trellis_operator::api::peer_authentication::MtlsMode as M;
use trellis_operator::api::traffic_policy::{RetriesSpec, RetryOn, SplitBackend, TimeoutsSpec};
use trellis_operator::compiler::Snapshot;
use trellis_operator::compiler::visibility::{EXPORT_TO_ANNOTATION, IMPORT_FROM_ANNOTATION};

use crate::compiler_fixtures::*;

pub const NAMESPACES: [&str; 4] = ["a", "b", "c", "trellis-system"];
pub const NAMES: [&str; 4] = ["x", "y", "z", "w"];

pub fn ns() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&NAMESPACES[..])
}
pub fn name() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&NAMES[..])
}
pub fn ip() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u8..4, 0u8..4).prop_map(|(a, b)| format!("10.0.{a}.{b}")),
        Just("fd00::1".to_string()),
        Just("None".to_string()),
        Just("999.1.1.1".to_string()),
        Just(String::new()),
    ]
}
pub fn port_name() -> impl Strategy<Value = Option<&'static str>> {
    prop::option::of(prop::sample::select(
        &["http", "grpc-a", "tcp-db", "web", ""][..],
    ))
}
/// `export-to` / `import-from` values, valid and not.
pub fn scope() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&["*", ".", "~", "a", "b,.", "c, a", "A!", "", "~,a"][..])
}
pub fn mode() -> impl Strategy<Value = M> {
    prop::sample::select(&[M::Unset, M::Strict, M::Permissive, M::Disable][..])
}
pub fn duration() -> impl Strategy<Value = String> {
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
pub enum Obj {
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

pub fn obj() -> impl Strategy<Value = Obj> {
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

pub fn world(objs: &[Obj]) -> World {
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

/// Gives `into` the `Arc`s of `from` for objects with equal content, as a reflector store does
/// for objects that did not change between two snapshots.
pub fn share(from: &Snapshot, into: &mut Snapshot) {
    fn swap<T: PartialEq>(from: &[Arc<T>], into: &mut [Arc<T>]) {
        for o in into.iter_mut() {
            if let Some(f) = from.iter().find(|f| ***f == **o) {
                *o = f.clone();
            }
        }
    }
    swap(&from.services, &mut into.services);
    swap(&from.endpoint_slices, &mut into.endpoint_slices);
    // The pod cache keeps a namespace's set when a relist brings equal pods.
    into.pods.keep_unchanged(&from.pods);
    swap(&from.namespaces, &mut into.namespaces);
}
