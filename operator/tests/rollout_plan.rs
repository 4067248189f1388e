//! The rollout planner, driven through whole simulated rollouts.
//!
//! A world of workloads (some manual, some canaries; each either healthy, failing the health
//! gate, or never becoming ready) is rolled from `v1` to `v2` by calling the planner in a loop,
//! applying its restarts to the world the way the workloads' own controllers would, and feeding
//! back the gate's verdicts. Every step is checked against the rules the issue names; the
//! properties run over random worlds and specs.

use std::collections::{BTreeMap, BTreeSet};

use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;
use trellis_operator::api::mesh::{
    RolloutFailurePolicy, RolloutMode, RolloutSpec, RolloutState, RolloutStatus,
};
use trellis_operator::rollout::plan::{
    Action, Input, Pin, Plan, Verdict, Workload, WorkloadKey, WorkloadKind, awaiting_gate, plan,
};

const OLD: &str = "proxy:v1";
const NEW: &str = "proxy:v2";
/// Simulated time between two planner passes.
const STEP: SignedDuration = SignedDuration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    /// Ready `delay` steps after a restart; the gate passes.
    Healthy { delay: u8 },
    /// Ready after a restart, but the gate fails.
    Failing,
    /// Never ready after a restart.
    Stuck,
}

#[derive(Clone, Debug)]
struct Sim {
    workload: Workload,
    behaviour: Behaviour,
    /// Step of its last restart.
    restarted: Option<u32>,
    replicas: u32,
}

#[derive(Clone, Debug)]
struct World {
    sims: Vec<Sim>,
    spec: RolloutSpec,
    now: Timestamp,
    generation: i64,
    step: u32,
    status: Option<RolloutStatus>,
}

fn key(i: usize) -> WorkloadKey {
    let kinds = [
        WorkloadKind::Deployment,
        WorkloadKind::StatefulSet,
        WorkloadKind::DaemonSet,
    ];
    WorkloadKey::new(
        kinds[i % 3],
        if i.is_multiple_of(2) { "a" } else { "b" },
        &format!("w{i}"),
    )
}

fn workload(i: usize, manual: bool, canary: bool, replicas: u32, current: bool) -> Workload {
    Workload {
        key: key(i),
        manual,
        canary,
        pin: None,
        rolled_out: true,
        progress: format!("{replicas}/{replicas} ready"),
        pods: [(if current { NEW } else { OLD }.to_string(), replicas)].into(),
    }
}

fn behaviour() -> impl Strategy<Value = Behaviour> {
    prop_oneof![
        6 => (0u8..3).prop_map(|delay| Behaviour::Healthy { delay }),
        1 => Just(Behaviour::Failing),
        1 => Just(Behaviour::Stuck),
    ]
}

fn sims(healthy_only: bool) -> impl Strategy<Value = Vec<Sim>> {
    let b = if healthy_only {
        (0u8..3)
            .prop_map(|delay| Behaviour::Healthy { delay })
            .boxed()
    } else {
        behaviour().boxed()
    };
    prop::collection::vec(
        (
            prop::bool::weighted(0.2),
            prop::bool::weighted(0.3),
            1u32..4,
            prop::bool::weighted(0.15),
            b,
        ),
        1..10,
    )
    .prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (manual, canary, replicas, current, behaviour))| Sim {
                workload: workload(i, manual, canary, replicas, current),
                behaviour,
                restarted: None,
                replicas,
            })
            .collect()
    })
}

fn spec(batch_size: u32, rollback: bool) -> RolloutSpec {
    RolloutSpec {
        batch_size,
        progress_deadline: "2m".into(),
        failure_policy: if rollback {
            RolloutFailurePolicy::Rollback
        } else {
            RolloutFailurePolicy::Pause
        },
        ..Default::default()
    }
}

fn t0() -> Timestamp {
    "2026-11-29T12:00:00Z".parse().unwrap()
}

impl World {
    fn new(sims: Vec<Sim>, spec: RolloutSpec) -> Self {
        World {
            sims,
            spec,
            now: t0(),
            generation: 1,
            step: 0,
            status: None,
        }
    }

    fn workloads(&self) -> Vec<Workload> {
        self.sims.iter().map(|s| s.workload.clone()).collect()
    }

    /// The gate's verdicts on what the planner says awaits them.
    fn verdicts(&self, workloads: &[Workload]) -> BTreeMap<WorkloadKey, Verdict> {
        awaiting_gate(
            &self.spec,
            self.generation,
            NEW,
            workloads,
            self.status.as_ref(),
        )
        .into_iter()
        .map(|(_, w)| {
            let sim = self.sims.iter().find(|s| s.workload.key == w.key).unwrap();
            let v = match sim.behaviour {
                Behaviour::Failing => Verdict::Fail("5xx".into()),
                _ => Verdict::Pass,
            };
            (w.key.clone(), v)
        })
        .collect()
    }

    fn plan(&self) -> Plan {
        let workloads = self.workloads();
        let verdicts = self.verdicts(&workloads);
        plan(&Input {
            now: self.now,
            generation: self.generation,
            desired: NEW,
            spec: &self.spec,
            workloads: &workloads,
            unmanaged: &BTreeMap::new(),
            verdicts: &verdicts,
            previous: self.status.as_ref(),
        })
    }

    /// The workloads' controllers act on the plan's writes; time passes.
    fn apply(&mut self, plan: &Plan) {
        for a in &plan.actions {
            let sim = self
                .sims
                .iter_mut()
                .find(|s| &s.workload.key == a.key())
                .unwrap();
            match a {
                Action::Restart { .. } => {
                    sim.restarted = Some(self.step);
                    sim.workload.rolled_out = false;
                }
                Action::Rollback {
                    version,
                    failed_version,
                    ..
                } => {
                    sim.restarted = None;
                    sim.workload.pin = Some(Pin {
                        version: version.clone(),
                        failed_version: failed_version.clone(),
                    });
                    sim.workload.rolled_out = true;
                    sim.workload.pods = [(version.clone(), sim.replicas)].into();
                }
            }
        }
        self.status = Some(plan.status.clone());
        self.step += 1;
        self.now = self.now.checked_add(STEP).unwrap();
        for sim in &mut self.sims {
            let Some(at) = sim.restarted else { continue };
            let ready = match sim.behaviour {
                Behaviour::Healthy { delay } => self.step >= at + 1 + u32::from(delay),
                Behaviour::Failing => self.step > at,
                Behaviour::Stuck => false,
            };
            if ready {
                sim.workload.rolled_out = true;
                sim.workload.pods = [(NEW.to_string(), sim.replicas)].into();
            }
        }
    }
}

fn in_flight_keys(st: Option<&RolloutStatus>) -> BTreeSet<WorkloadKey> {
    st.map(|s| {
        s.in_flight
            .iter()
            .map(|f| WorkloadKey::new(WorkloadKind::parse(&f.kind).unwrap(), &f.namespace, &f.name))
            .collect()
    })
    .unwrap_or_default()
}

fn failed_keys(st: &RolloutStatus) -> BTreeSet<WorkloadKey> {
    st.failures
        .iter()
        .filter(|f| f.version == NEW)
        .map(|f| WorkloadKey::new(WorkloadKind::parse(&f.kind).unwrap(), &f.namespace, &f.name))
        .collect()
}

/// Checks one step against the rules; `before` is the world the plan was made from.
fn check_step(before: &World, p: &Plan) {
    let bs = before.spec.batch_size as usize;
    let by_key: BTreeMap<&WorkloadKey, &Sim> =
        before.sims.iter().map(|s| (&s.workload.key, s)).collect();
    let was_in_flight = in_flight_keys(before.status.as_ref());
    let rollback = before.spec.failure_policy == RolloutFailurePolicy::Rollback;

    // Never more than batchSize in flight, and one batch never mixes canaries and the rest.
    assert!(p.status.in_flight.len() <= bs, "{:?}", p.status.in_flight);
    let now_in_flight = in_flight_keys(Some(&p.status));
    // (A held rollout keeps entries of workloads deleted since; they leave on resume.)
    let canaries: BTreeSet<bool> = now_in_flight
        .iter()
        .filter_map(|k| by_key.get(k).map(|s| s.workload.canary))
        .collect();
    assert!(canaries.len() <= 1, "a batch mixes canaries and others");

    let restarts: Vec<&WorkloadKey> = p
        .actions
        .iter()
        .filter(|a| matches!(a, Action::Restart { .. }))
        .map(Action::key)
        .collect();
    assert!(restarts.len() <= bs);
    if !restarts.is_empty() {
        // A batch starts only when the previous one is over.
        assert!(
            was_in_flight.is_disjoint(&now_in_flight) || was_in_flight.is_empty(),
            "a batch started while another was in flight"
        );
    }
    // Failed on the new version, before or in this pass (then rolled back in this pass).
    let failed = failed_keys(&p.status);
    for k in &restarts {
        let w = &by_key[k].workload;
        assert!(!w.manual, "restarted manual {k}");
        assert!(w.out_of_date(NEW), "restarted up-to-date {k}");
        assert!(w.pin.is_none(), "restarted pinned {k}");
        if !w.canary {
            // Canaries first: no canary is left to roll.
            for s in &before.sims {
                let c = &s.workload;
                let done = !c.canary
                    || c.manual
                    || !c.out_of_date(NEW)
                    || c.pin.is_some()
                    || (rollback && failed.contains(&c.key));
                assert!(done, "{k} restarted before canary {}", c.key);
            }
        }
    }

    // Rollback only under Rollback, only for workloads that just failed in flight.
    let failed_now = failed;
    for a in &p.actions {
        if let Action::Rollback {
            key,
            version,
            failed_version,
            ..
        } = a
        {
            assert!(rollback, "rollback under Pause");
            assert!(
                was_in_flight.contains(key),
                "rolled back {key}, not in flight"
            );
            assert!(
                failed_now.contains(key),
                "rolled back {key} without a failure"
            );
            assert_eq!((version.as_str(), failed_version.as_str()), (OLD, NEW));
            assert!(!by_key[key].workload.manual);
        }
    }

    // The deadline: nothing fails on it early, nothing outlives it in flight.
    let prev_failures = before.status.as_ref().map_or(0, |s| s.failures.len());
    for f in p
        .status
        .failures
        .iter()
        .skip(prev_failures.min(p.status.failures.len()))
    {
        if f.reason == "DeadlineExceeded" {
            let entry = before
                .status
                .as_ref()
                .unwrap()
                .in_flight
                .iter()
                .find(|e| e.name == f.name && e.namespace == f.namespace && e.kind == f.kind)
                .expect("a deadline failure of a workload in flight");
            let due: Timestamp = entry.deadline.parse().unwrap();
            assert!(before.now >= due, "{} failed before its deadline", f.name);
        }
    }
    let held = p.status.held_at_generation.is_some();
    if !held && !before.spec.paused {
        for e in &p.status.in_flight {
            let due: Timestamp = e.deadline.parse().unwrap();
            assert!(
                e.passed || before.now < due,
                "{} is in flight past its deadline",
                e.name
            );
        }
    }
    // A failure under Pause holds the rollout: nothing is restarted.
    if held {
        assert!(p.actions.is_empty(), "acted while held: {:?}", p.actions);
        assert_eq!(p.status.state, RolloutState::Paused);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Every step of a random rollout keeps the rules.
    #[test]
    fn every_step_keeps_the_rules(
        sims in sims(false),
        batch in 1u32..4,
        rollback in any::<bool>(),
        deletions in prop::collection::vec((0usize..10, 0u32..30), 0..3),
    ) {
        let mut w = World::new(sims, spec(batch, rollback));
        for _ in 0..40 {
            for (i, at) in &deletions {
                if *at == w.step && *i < w.sims.len() {
                    w.sims.remove(*i);
                }
            }
            let p = w.plan();
            check_step(&w, &p);
            if p.actions.is_empty() {
                // Nothing changed, nothing done: planning again from its own status gives the
                // same status (no status write every pass).
                let mut again = w.clone();
                again.status = Some(p.status.clone());
                let q = again.plan();
                prop_assert!(q.actions.is_empty());
                prop_assert_eq!(&q.status, &p.status);
            }
            w.apply(&p);
        }
    }

    /// With healthy workloads every automatic one ends on the new version, in the batches the
    /// status promised, and the rollout reports Complete (or Idle when nothing was out of date).
    #[test]
    fn a_healthy_rollout_completes(sims in sims(true), batch in 1u32..4) {
        let mut w = World::new(sims, spec(batch, false));
        let mut first_total = None;
        for _ in 0..80 {
            let p = w.plan();
            check_step(&w, &p);
            if first_total.is_none() && p.status.current_batch > 0 {
                first_total = Some(p.status.total_batches);
            }
            w.apply(&p);
        }
        let st = w.status.clone().unwrap();
        for s in &w.sims {
            if !s.workload.manual {
                prop_assert!(!s.workload.out_of_date(NEW), "{} left behind", s.workload.key);
            }
        }
        prop_assert!(st.failures.is_empty());
        if st.current_batch == 0 {
            prop_assert_eq!(st.state, RolloutState::Idle);
        } else {
            prop_assert_eq!(st.state, RolloutState::Complete);
            prop_assert_eq!(Some(st.current_batch), first_total, "batches as announced");
        }
        // Manual workloads were never touched.
        for s in &w.sims {
            if s.workload.manual {
                prop_assert!(s.restarted.is_none());
            }
        }
    }

    /// Paused acts on nothing and keeps where it stood; unpausing at once plans exactly what
    /// the unpaused planner would have.
    #[test]
    fn pausing_acts_on_nothing_and_resuming_continues(
        sims in sims(false),
        batch in 1u32..4,
        rollback in any::<bool>(),
        pause_at in 0u32..20,
    ) {
        let mut w = World::new(sims, spec(batch, rollback));
        while w.step < pause_at {
            let p = w.plan();
            w.apply(&p);
        }
        let unpaused = w.plan();

        let mut paused_world = w.clone();
        paused_world.spec.paused = true;
        let paused = paused_world.plan();
        prop_assert!(paused.actions.is_empty());
        prop_assert_eq!(paused.status.state, RolloutState::Paused);
        let before = w.status.clone().unwrap_or_default();
        prop_assert_eq!(&paused.status.in_flight, &before.in_flight);
        prop_assert_eq!(paused.status.current_batch, before.current_batch);
        prop_assert_eq!(&paused.status.failures, &before.failures);

        // Verdicts are not even asked for while paused.
        prop_assert!(paused_world.verdicts(&paused_world.workloads()).is_empty());

        let mut resumed_world = w.clone();
        resumed_world.status = Some(paused.status.clone());
        let resumed = resumed_world.plan();
        prop_assert_eq!(resumed.actions, unpaused.actions);
        prop_assert_eq!(resumed.status, unpaused.status);
    }

    /// Manual mode touches nothing, ever.
    #[test]
    fn manual_mode_acts_on_nothing(sims in sims(false), batch in 1u32..4) {
        let mut s = spec(batch, false);
        s.mode = RolloutMode::Manual;
        let mut w = World::new(sims, s);
        for _ in 0..5 {
            let p = w.plan();
            prop_assert!(p.actions.is_empty());
            prop_assert_eq!(p.status.state, RolloutState::Idle);
            w.apply(&p);
        }
    }
}

/// A workload that never becomes ready fails at the deadline, not before; under `Pause` the
/// rollout holds until the Mesh is edited, then retries it.
#[test]
fn a_stuck_workload_pauses_the_rollout_at_the_deadline_until_the_mesh_is_edited() {
    let sims = vec![
        Sim {
            workload: workload(0, false, false, 2, false),
            behaviour: Behaviour::Stuck,
            restarted: None,
            replicas: 2,
        },
        Sim {
            workload: workload(1, false, false, 2, false),
            behaviour: Behaviour::Healthy { delay: 0 },
            restarted: None,
            replicas: 2,
        },
    ];
    let mut w = World::new(sims, spec(1, false));
    let p = w.plan();
    assert_eq!(p.actions.len(), 1);
    assert_eq!(p.actions[0].key(), &key(0));
    assert_eq!(p.status.state, RolloutState::Progressing);
    assert_eq!((p.status.current_batch, p.status.total_batches), (1, 2));
    assert_eq!(p.events[0].reason, "BatchStarted");
    w.apply(&p);
    // 2m deadline, 20 s steps: six more passes in flight, the seventh fails it.
    for _ in 0..5 {
        let p = w.plan();
        assert!(p.actions.is_empty());
        assert_eq!(p.status.state, RolloutState::Progressing);
        w.apply(&p);
    }
    let p = w.plan();
    assert_eq!(p.status.state, RolloutState::Paused);
    assert_eq!(p.status.reason, "DeadlineExceeded");
    assert!(
        p.status.message.contains("Deployment a/w0"),
        "{}",
        p.status.message
    );
    assert_eq!(p.status.failures.len(), 1);
    assert_eq!(p.events[0].reason, "WorkloadFailed");
    assert!(p.events[0].warning);
    w.apply(&p);
    for _ in 0..3 {
        let p = w.plan();
        assert!(p.actions.is_empty(), "held");
        assert_eq!(p.status.reason, "DeadlineExceeded");
        w.apply(&p);
    }
    // An edit of the Mesh: the next batch is the stuck workload again (first by key).
    w.generation += 1;
    let p = w.plan();
    assert_eq!(p.actions.len(), 1);
    assert_eq!(p.actions[0].key(), &key(0));
    assert_eq!(p.status.current_batch, 2);
}

/// Under `Rollback` the failing workload is pinned to its old version and the rest carries on.
#[test]
fn rollback_pins_the_failed_workload_and_continues() {
    let sims = vec![
        Sim {
            workload: workload(0, false, true, 1, false),
            behaviour: Behaviour::Failing,
            restarted: None,
            replicas: 1,
        },
        Sim {
            workload: workload(1, false, false, 1, false),
            behaviour: Behaviour::Healthy { delay: 0 },
            restarted: None,
            replicas: 1,
        },
    ];
    let mut w = World::new(sims, spec(5, true));
    let p = w.plan();
    // The canary goes alone although the batch has room for both.
    assert_eq!(p.actions.len(), 1);
    assert_eq!(p.actions[0].key(), &key(0));
    w.apply(&p);
    let p = w.plan();
    assert_eq!(
        p.actions[0],
        Action::Rollback {
            key: key(0),
            version: OLD.into(),
            failed_version: NEW.into(),
            stamp: w.now.to_string(),
        }
    );
    // The other workload starts in the same pass.
    assert!(matches!(&p.actions[1], Action::Restart { key: k, .. } if *k == key(1)));
    assert_eq!(p.status.failures[0].reason, "HealthGateFailed");
    w.apply(&p);
    for _ in 0..3 {
        let p = w.plan();
        w.apply(&p);
    }
    let st = w.status.unwrap();
    assert_eq!(st.state, RolloutState::Failed);
    assert_eq!(st.reason, "RolledBack");
    assert!(st.message.contains("Deployment a/w0"), "{}", st.message);
    assert_eq!(st.pods, [(OLD.into(), 1), (NEW.into(), 1)].into());
}

/// Time spent paused does not count against the deadline of the batch in flight.
#[test]
fn a_paused_batch_keeps_its_remaining_time() {
    let sims = vec![Sim {
        workload: workload(0, false, false, 1, false),
        behaviour: Behaviour::Stuck,
        restarted: None,
        replicas: 1,
    }];
    let mut w = World::new(sims, spec(1, false));
    let p = w.plan();
    w.apply(&p);
    let due: Timestamp = w.status.as_ref().unwrap().in_flight[0]
        .deadline
        .parse()
        .unwrap();
    w.spec.paused = true;
    for _ in 0..20 {
        let p = w.plan();
        assert!(p.actions.is_empty());
        w.apply(&p);
    }
    w.spec.paused = false;
    let p = w.plan();
    let moved: Timestamp = p.status.in_flight[0].deadline.parse().unwrap();
    assert_eq!(moved.duration_since(due), STEP * 20);
    assert_eq!(p.status.state, RolloutState::Progressing);
}

/// A workload deleted mid-batch leaves the batch; the rollout carries on.
#[test]
fn a_workload_deleted_mid_batch_does_not_wedge_the_rollout() {
    let sims = (0..3)
        .map(|i| Sim {
            workload: workload(i, false, false, 1, false),
            behaviour: Behaviour::Stuck,
            restarted: None,
            replicas: 1,
        })
        .collect();
    let mut w = World::new(sims, spec(2, false));
    let p = w.plan();
    assert_eq!(p.actions.len(), 2);
    w.apply(&p);
    // Both of the batch are deleted; the third is next.
    w.sims.retain(|s| s.workload.key == key(2));
    let p = w.plan();
    assert_eq!(p.actions.len(), 1);
    assert_eq!(p.actions[0].key(), &key(2));
    assert!(p.events.iter().any(|e| e.reason == "WorkloadGone"));
    assert_eq!(p.status.current_batch, 2);
}

/// A new image mid-rollout starts over for the new version; failures stay as history.
#[test]
fn a_new_desired_version_restarts_the_count() {
    let sims = vec![Sim {
        workload: workload(0, false, false, 1, false),
        behaviour: Behaviour::Stuck,
        restarted: None,
        replicas: 1,
    }];
    let mut w = World::new(sims, spec(1, false));
    let p = w.plan();
    w.apply(&p);
    let workloads = w.workloads();
    let p = plan(&Input {
        now: w.now,
        generation: 2,
        desired: "proxy:v3",
        spec: &w.spec,
        workloads: &workloads,
        unmanaged: &BTreeMap::new(),
        verdicts: &BTreeMap::new(),
        previous: w.status.as_ref(),
    });
    assert_eq!(p.status.desired_version, "proxy:v3");
    assert_eq!(p.status.current_batch, 1);
    assert_eq!(p.actions.len(), 1);
}

/// An invalid deadline acts on nothing and says which field is wrong.
#[test]
fn an_invalid_spec_acts_on_nothing() {
    let sims = vec![Sim {
        workload: workload(0, false, false, 1, false),
        behaviour: Behaviour::Stuck,
        restarted: None,
        replicas: 1,
    }];
    let mut s = spec(1, false);
    s.progress_deadline = "soon".into();
    let w = World::new(sims, s);
    let p = w.plan();
    assert!(p.actions.is_empty());
    assert_eq!(p.status.reason, "InvalidSpec");
    assert!(p.status.message.contains("progressDeadline"));
}
