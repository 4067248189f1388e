//! Property tests of the discovery stream's incremental path: a view that follows compiles in
//! place answers every question exactly as a view built from scratch, and an update wakes
//! exactly the streams whose subscriptions changed, with the very messages a comparison of
//! every subscription (the from-scratch path) sends them; the others get nothing.

#[path = "compiler_fixtures/arbitrary.rs"]
mod arbitrary;
mod compiler_fixtures;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use arbitrary::*;
use proptest::prelude::*;
use trellis_operator::compiler::{Output, Snapshot, compile_discovery, compile_incremental};
use trellis_operator::discovery::{Registry, StreamId, View};
use trellis_proxy::discovery::{ServerMessage, Target};

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        (ns(), name()).prop_map(|(n, s)| Target::Service(format!("{s}.{n}"))),
        (0u8..4, 0u8..4)
            .prop_map(|(a, b)| Target::Address(format!("10.0.{a}.{b}").parse().unwrap())),
        Just(Target::Address("fd00::1".parse().unwrap())),
    ]
}

/// Every address any generated object can carry.
fn addresses() -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = (0..4)
        .flat_map(|a| (0..4).map(move |b| format!("10.0.{a}.{b}").parse().unwrap()))
        .collect();
    v.push("fd00::1".parse().unwrap());
    v
}

/// Everything a proxy can learn from a view, for every namespace (and one that is in no
/// world): answers by name and by address, and the Service values themselves.
fn answers(v: &View) -> Vec<String> {
    let mut out = Vec::new();
    for viewer in NAMESPACES.iter().chain(&["q"]) {
        for n in NAMESPACES {
            for s in NAMES {
                let key = format!("{s}.{n}");
                out.push(format!(
                    "{viewer} {key} {:?} {:?}",
                    v.resolve(&Target::Service(key.clone()), viewer),
                    v.service(&key, viewer)
                ));
            }
        }
        for ip in addresses() {
            out.push(format!(
                "{viewer} {ip} {:?}",
                v.resolve(&Target::Address(ip), viewer)
            ));
        }
    }
    out
}

fn compile_step(snap: &Snapshot, previous: &Output, full: bool) -> Output {
    if full {
        compile_incremental(snap, Some(previous))
    } else {
        compile_discovery(snap, Some(previous))
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn a_followed_view_equals_a_fresh_one_and_updates_reach_exactly_the_changed_subscribers(
        steps in prop::collection::vec(prop::collection::vec(obj(), 0..30), 2..6),
        edits in prop::collection::vec(prop::collection::vec(obj(), 0..4), 5),
        streams in prop::collection::vec((ns(), prop::collection::vec(target(), 0..5)), 0..8),
        full in prop::collection::vec(any::<bool>(), 6),
    ) {
        // A sequence of clusters: each step is a new world or the previous one with a few
        // edits (edits come first, so they win), unchanged objects keeping their `Arc`.
        let mut current = steps[0].clone();
        let mut snap = world(&current).snap;
        let mut out = compile_discovery(&snap, None);
        let mut followed = Registry::default();
        let mut fresh = Registry::default();
        prop_assert!(followed.update(&out, 1).is_empty());
        prop_assert!(fresh.publish(Arc::new(View::new(&out, 1).unwrap())).is_empty());
        let mut ids: Vec<(StreamId, StreamId)> = Vec::new();
        // Random streams, and one per namespace that asks for everything it may see.
        let everything: Vec<Target> = NAMESPACES
            .iter()
            .flat_map(|n| NAMES.iter().map(move |s| Target::Service(format!("{s}.{n}"))))
            .chain(addresses().into_iter().map(Target::Address))
            .collect();
        let all = NAMESPACES.iter().chain(&["q"]).map(|n| (*n, everything.clone()));
        for (namespace, targets) in streams.iter().map(|(n, t)| (*n, t.clone())).chain(all) {
            let (a, b) = (followed.open(namespace), fresh.open(namespace));
            prop_assert_eq!(
                followed.subscribe(a, targets.clone()),
                fresh.subscribe(b, targets)
            );
            prop_assert_eq!(followed.take(a), fresh.take(b));
            ids.push((a, b));
        }
        for (step, objs) in steps.iter().enumerate().skip(1) {
            current = if step % 2 == 0 {
                objs.clone()
            } else {
                [edits[step - 1].clone(), current].concat()
            };
            let mut next = world(&current).snap;
            share(&snap, &mut next);
            let generation = step as u64 + 1;
            let now = compile_step(&next, &out, full[step]);

            // The view itself: followed in place, answering as one built from scratch.
            let mut alone = View::new(&out, generation - 1).unwrap();
            prop_assert!(alone.follow(&now, generation).is_some());
            let scratch = View::new(&now, generation).unwrap();
            prop_assert_eq!(alone.addresses(), scratch.addresses());
            prop_assert_eq!(answers(&alone), answers(&scratch));

            // The registry: the incremental path against the compare-everything path.
            let woken: BTreeSet<StreamId> = followed.update(&now, generation).into_iter().collect();
            fresh.publish(Arc::new(scratch));
            prop_assert_eq!(answers(followed.view().unwrap()), answers(fresh.view().unwrap()));
            for (a, b) in &ids {
                let want = fresh.take(*b);
                let got = followed.take(*a);
                let changed = want.iter().any(|m| !matches!(m, ServerMessage::Synced { .. }));
                prop_assert_eq!(woken.contains(a), changed, "woken: {:?} {:?}", got, want);
                if changed {
                    prop_assert_eq!(&got, &want);
                } else {
                    prop_assert!(got.is_empty(), "{:?}", got);
                    prop_assert_eq!(want, vec![ServerMessage::Synced { generation }]);
                }
                prop_assert_eq!(followed.subscriptions(*a), fresh.subscriptions(*b));
                for key in followed.subscriptions(*a) {
                    prop_assert!(followed.subscribers(&key).contains(a));
                }
            }
            snap = next;
            out = now;
        }
    }
}
