//! The rollout planner: a pure function from what the controller observed to what it does next.
//!
//! One batch is in flight at a time. A batch is the next `batchSize` out-of-date workloads,
//! canaries before everyone else (a batch never mixes the two, so no other workload restarts
//! before the canaries passed). Each workload of the batch passes when its own rollout finished
//! (its controller observed the restart, every replica updated and ready, every injected pod on
//! the desired version) *and* the health gate's verdict on its new pods is a pass. It fails
//! when the gate says so, or when the batch's `progressDeadline` passes first. Failures either
//! hold the whole rollout (`Pause`) until the Mesh is edited, or put the failed workloads back on
//! the version they ran before (`Rollback`) while the others carry on.
//!
//! Everything the planner must remember between passes (the batch in flight, when each workload
//! is due, the failures) lives in `status.rollout` itself, so a new leader resumes exactly where
//! the old one stopped, and a paused rollout resumes where it was paused.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use jiff::Timestamp;

use crate::api::mesh::{
    RolloutFailure, RolloutFailurePolicy, RolloutMode, RolloutSpec, RolloutState, RolloutStatus,
    RolloutWorkload,
};

/// How many failures `status.rollout.failures` keeps.
pub const MAX_FAILURES: usize = 10;

/// The workload kinds a rollout restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

impl WorkloadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deployment => "Deployment",
            Self::StatefulSet => "StatefulSet",
            Self::DaemonSet => "DaemonSet",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "Deployment" => Some(Self::Deployment),
            "StatefulSet" => Some(Self::StatefulSet),
            "DaemonSet" => Some(Self::DaemonSet),
            _ => None,
        }
    }
}

/// Names one workload.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadKey {
    pub kind: WorkloadKind,
    pub namespace: String,
    pub name: String,
}

impl WorkloadKey {
    pub fn new(kind: WorkloadKind, namespace: &str, name: &str) -> Self {
        Self {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn of(w: &RolloutWorkload) -> Option<Self> {
        Some(Self::new(
            WorkloadKind::parse(&w.kind)?,
            &w.namespace,
            &w.name,
        ))
    }
}

impl fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
    }
}

/// A rollback pin found on a workload's pod template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    /// The image its pods are pinned to.
    pub version: String,
    /// The desired version it failed to reach; the pin holds while that is still desired.
    pub failed_version: String,
}

/// One workload as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub key: WorkloadKey,
    /// Annotated `trellis.dev/rollout: manual`: reported, never restarted.
    pub manual: bool,
    /// Matches the canary selector.
    pub canary: bool,
    pub pin: Option<Pin>,
    /// Its own controller finished rolling out the current template: observed the latest
    /// generation, and every replica is updated and ready.
    pub rolled_out: bool,
    /// Human-readable replica progress, for failure messages ("1/3 updated, 0/3 ready").
    pub progress: String,
    /// Its injected pods, by the proxy version they run.
    pub pods: BTreeMap<String, u32>,
}

impl Workload {
    fn injected(&self) -> u32 {
        self.pods.values().sum()
    }

    /// Some injected pod runs another version than `desired`.
    pub fn out_of_date(&self, desired: &str) -> bool {
        self.pods.keys().any(|v| v != desired)
    }

    /// Finished restarting onto `desired`.
    fn on_desired(&self, desired: &str) -> bool {
        self.rolled_out && self.injected() > 0 && !self.out_of_date(desired)
    }

    fn pinned_for(&self, desired: &str) -> bool {
        self.pin
            .as_ref()
            .is_some_and(|p| p.failed_version == desired)
    }

    /// The version most of its pods run, other than `desired` (what a rollback returns to).
    fn previous_version(&self, desired: &str) -> String {
        self.pods
            .iter()
            .filter(|(v, _)| v.as_str() != desired)
            .max_by_key(|(v, n)| (**n, std::cmp::Reverse(v.as_str())))
            .map(|(v, _)| v.clone())
            .unwrap_or_default()
    }
}

/// The health gate's verdict on a workload's new pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail(String),
}

/// What the planner reads.
pub struct Input<'a> {
    pub now: Timestamp,
    /// The Mesh's `metadata.generation`.
    pub generation: i64,
    /// The proxy image every sidecar should run.
    pub desired: &'a str,
    pub spec: &'a RolloutSpec,
    pub workloads: &'a [Workload],
    /// Injected pods no workload owns (bare pods, Jobs), by version: reported, never restarted.
    pub unmanaged: &'a BTreeMap<String, u32>,
    /// The gate's verdicts on workloads [`awaiting_gate`] named.
    pub verdicts: &'a BTreeMap<WorkloadKey, Verdict>,
    /// The `status.rollout` the Mesh reports now.
    pub previous: Option<&'a RolloutStatus>,
}

/// A write the controller makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Set the `kubectl.kubernetes.io/restartedAt` pod-template annotation to `stamp`.
    Restart { key: WorkloadKey, stamp: String },
    /// Restart onto `version` and pin it there while `failed_version` is desired.
    Rollback {
        key: WorkloadKey,
        version: String,
        failed_version: String,
        stamp: String,
    },
}

impl Action {
    pub fn key(&self) -> &WorkloadKey {
        match self {
            Action::Restart { key, .. } | Action::Rollback { key, .. } => key,
        }
    }
}

/// An Event to record on the Mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanEvent {
    /// CamelCase: `BatchStarted`, `BatchPassed`, `WorkloadFailed`, `RolledBack`.
    pub reason: &'static str,
    pub message: String,
    pub warning: bool,
}

/// The planner's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub status: RolloutStatus,
    pub events: Vec<PlanEvent>,
}

/// The workloads of the batch in flight that finished restarting and wait for the health gate's
/// verdict; empty while the rollout acts on nothing (paused, manual, held).
pub fn awaiting_gate<'a>(
    spec: &RolloutSpec,
    generation: i64,
    desired: &str,
    workloads: &'a [Workload],
    previous: Option<&'a RolloutStatus>,
) -> Vec<(&'a RolloutWorkload, &'a Workload)> {
    let Some(st) = previous else {
        return Vec::new();
    };
    if spec.mode != RolloutMode::Automatic
        || spec.paused
        || st.desired_version != desired
        || st.held_at_generation.is_some_and(|g| generation <= g)
    {
        return Vec::new();
    }
    let by_key: BTreeMap<&WorkloadKey, &Workload> = workloads.iter().map(|w| (&w.key, w)).collect();
    st.in_flight
        .iter()
        .filter(|f| !f.passed)
        .filter_map(|f| {
            let w = by_key.get(&WorkloadKey::of(f)?)?;
            (!w.manual && w.on_desired(desired)).then_some((f, *w))
        })
        .collect()
}

/// The next step of the rollout. Pure: equal inputs give equal plans.
pub fn plan(input: &Input<'_>) -> Plan {
    let mut st = input.previous.cloned().unwrap_or_default();
    let mut out = Plan {
        actions: Vec::new(),
        status: RolloutStatus::default(),
        events: Vec::new(),
    };
    st.pods = count_pods(input.workloads, input.unmanaged);
    if st.desired_version != input.desired {
        // A new image: what was in flight was heading elsewhere. History stays.
        st.desired_version = input.desired.to_string();
        st.in_flight.clear();
        st.current_batch = 0;
        st.held_at_generation = None;
        st.paused_at = None;
    }
    let desired = input.desired;
    let spec = input.spec;
    let deadline = match crate::duration::parse(&spec.progress_deadline) {
        Ok(d) => d,
        Err(e) => {
            set(
                &mut st,
                RolloutState::Paused,
                "InvalidSpec",
                format!("spec.rollout.progressDeadline: {e}"),
            );
            out.status = st;
            return out;
        }
    };
    if spec.mode == RolloutMode::Manual {
        st.in_flight.clear();
        st.paused_at = None;
        st.total_batches = st.current_batch;
        let behind = input
            .workloads
            .iter()
            .filter(|w| w.out_of_date(desired))
            .count();
        set(
            &mut st,
            RolloutState::Idle,
            "ManualMode",
            format!(
                "spec.rollout.mode is Manual: {behind} workload(s) run another proxy version; restart them to update"
            ),
        );
        out.status = st;
        return out;
    }

    let candidates = candidates(input, &st);
    if spec.paused {
        if !st.in_flight.is_empty() && st.paused_at.is_none() {
            st.paused_at = Some(input.now.to_string());
        }
        st.total_batches = st.current_batch + batches_needed(&candidates, spec.batch_size);
        let msg = format!(
            "spec.rollout.paused is true: stopped at batch {} of {} with {} workload(s) left; set it to false to resume",
            st.current_batch,
            st.total_batches,
            candidates.len() + st.in_flight.iter().filter(|w| !w.passed).count()
        );
        set(&mut st, RolloutState::Paused, "PausedBySpec", msg);
        out.status = st;
        return out;
    }
    if let Some(since) = st
        .paused_at
        .take()
        .and_then(|t| t.parse::<Timestamp>().ok())
    {
        // The batch's clock stood still while paused.
        let paused_for = input.now.duration_since(since);
        for w in &mut st.in_flight {
            if let Ok(due) = w.deadline.parse::<Timestamp>()
                && let Ok(moved) = due.checked_add(paused_for)
            {
                w.deadline = moved.to_string();
            }
        }
    }
    if let Some(g) = st.held_at_generation {
        if input.generation <= g {
            st.total_batches = st.current_batch + batches_needed(&candidates, spec.batch_size);
            held(&mut st);
            out.status = st;
            return out;
        }
        st.held_at_generation = None;
    }

    let failed = judge_in_flight(input, &mut st, &mut out.events);
    let rollback = spec.failure_policy == RolloutFailurePolicy::Rollback;
    let mut hold = false;
    for (key, w, reason, message) in &failed {
        let key = key.clone();
        out.events.push(PlanEvent {
            reason: "WorkloadFailed",
            message: format!("{key} failed on {desired}: {reason}: {message}"),
            warning: true,
        });
        st.failures.push(RolloutFailure {
            kind: w.kind.clone(),
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            version: desired.to_string(),
            reason: reason.to_string(),
            message: message.clone(),
            time: input.now.to_string(),
        });
        if rollback && !w.previous_version.is_empty() {
            out.events.push(PlanEvent {
                reason: "RolledBack",
                message: format!("{key} pinned to {}", w.previous_version),
                warning: true,
            });
            out.actions.push(Action::Rollback {
                key,
                version: w.previous_version.clone(),
                failed_version: desired.to_string(),
                stamp: input.now.to_string(),
            });
        } else {
            hold = true;
        }
    }
    let excess = st.failures.len().saturating_sub(MAX_FAILURES);
    st.failures.drain(..excess);
    // Judged again now that the batch in flight was: a workload that failed under Pause is a
    // candidate for the retry. Rolled-back ones leave the candidates at once (their pin shows up
    // on a later watch event).
    let rolled_back: BTreeSet<WorkloadKey> = out.actions.iter().map(|a| a.key().clone()).collect();
    let candidates: Vec<&Workload> = self::candidates(input, &st)
        .into_iter()
        .filter(|w| !rolled_back.contains(&w.key))
        .collect();

    if hold {
        st.held_at_generation = Some(input.generation);
        st.total_batches = st.current_batch + batches_needed(&candidates, spec.batch_size);
        held(&mut st);
        out.status = st;
        return out;
    }

    if !st.in_flight.is_empty() && st.in_flight.iter().all(|w| w.passed) {
        st.in_flight.clear();
        out.events.push(PlanEvent {
            reason: "BatchPassed",
            message: format!(
                "batch {} of {} passed the health gate on {desired}",
                st.current_batch,
                st.current_batch + batches_needed(&candidates, spec.batch_size)
            ),
            warning: false,
        });
    }

    let mut remaining = candidates.clone();
    if st.in_flight.is_empty() && !remaining.is_empty() {
        let canaries_left = remaining.iter().any(|w| w.canary);
        let batch: Vec<&Workload> = remaining
            .iter()
            .filter(|w| w.canary == canaries_left)
            .take(spec.batch_size.max(1) as usize)
            .copied()
            .collect();
        remaining.retain(|w| !batch.iter().any(|b| b.key == w.key));
        st.current_batch += 1;
        let due = input
            .now
            .checked_add(deadline)
            .unwrap_or(Timestamp::MAX)
            .to_string();
        for w in &batch {
            st.in_flight.push(RolloutWorkload {
                kind: w.key.kind.as_str().into(),
                namespace: w.key.namespace.clone(),
                name: w.key.name.clone(),
                restarted_at: input.now.to_string(),
                deadline: due.clone(),
                previous_version: w.previous_version(desired),
                baseline: None,
                passed: false,
            });
            out.actions.push(Action::Restart {
                key: w.key.clone(),
                stamp: input.now.to_string(),
            });
        }
        out.events.push(PlanEvent {
            reason: "BatchStarted",
            message: format!(
                "batch {} of {} restarting onto {desired}: {}",
                st.current_batch,
                st.current_batch + batches_needed(&remaining, spec.batch_size),
                join(batch.iter().map(|w| w.key.to_string()))
            ),
            warning: false,
        });
    }
    st.total_batches = st.current_batch + batches_needed(&remaining, spec.batch_size);

    if !st.in_flight.is_empty() {
        let waiting: Vec<String> = st
            .in_flight
            .iter()
            .filter(|w| !w.passed)
            .filter_map(|w| WorkloadKey::of(w).map(|k| k.to_string()))
            .collect();
        let msg = format!(
            "batch {} of {} onto {desired}: waiting for {}",
            st.current_batch,
            st.total_batches,
            join(waiting)
        );
        set(&mut st, RolloutState::Progressing, "BatchInProgress", msg);
    } else {
        finished(input, &mut st, rollback);
    }
    out.status = st;
    out
}

/// State and message of a rollout a failure holds: the latest failure says why.
fn held(st: &mut RolloutStatus) {
    let (reason, message) = match st.failures.last() {
        Some(f) => (
            f.reason.clone(),
            format!(
                "batch {} of {} failed: {} {}/{}: {}; fix the cause, then edit the Mesh (for example pause and unpause) to try again",
                st.current_batch, st.total_batches, f.kind, f.namespace, f.name, f.message
            ),
        ),
        None => ("Failed".to_string(), "a batch failed".to_string()),
    };
    set(st, RolloutState::Paused, &reason, message);
}

/// State and message once nothing is left to restart.
fn finished(input: &Input<'_>, st: &mut RolloutStatus, rollback: bool) {
    let desired = input.desired;
    let pinned: Vec<String> = input
        .workloads
        .iter()
        .filter(|w| w.pinned_for(desired) || (rollback && failed_on(st, &w.key, desired)))
        .map(|w| w.key.to_string())
        .collect();
    let manual = input
        .workloads
        .iter()
        .filter(|w| w.manual && w.out_of_date(desired))
        .count();
    let unmanaged: u32 = input
        .unmanaged
        .iter()
        .filter(|(v, _)| v.as_str() != desired)
        .map(|(_, n)| n)
        .sum();
    let mut left = Vec::new();
    if manual > 0 {
        left.push(format!(
            "{manual} workload(s) marked trellis.dev/rollout=manual run another version"
        ));
    }
    if unmanaged > 0 {
        left.push(format!(
            "{unmanaged} pod(s) without a Deployment, StatefulSet or DaemonSet run another version: restart them yourself"
        ));
    }
    let tail = if left.is_empty() {
        String::new()
    } else {
        format!("; {}", left.join("; "))
    };
    if !pinned.is_empty() {
        let msg = format!(
            "done, but {} failed on {desired} and stay pinned to their previous version{tail}",
            join(pinned)
        );
        set(st, RolloutState::Failed, "RolledBack", msg);
    } else if st.current_batch == 0 {
        let msg = format!("every automatically rolled workload runs {desired}{tail}");
        set(st, RolloutState::Idle, "UpToDate", msg);
    } else {
        let msg = format!("every automatically rolled workload runs {desired}{tail}");
        set(st, RolloutState::Complete, "Complete", msg);
    }
}

fn failed_on(st: &RolloutStatus, key: &WorkloadKey, desired: &str) -> bool {
    st.failures
        .iter()
        .any(|f| f.version == desired && WorkloadKey::of_failure(f).as_ref() == Some(key))
}

impl WorkloadKey {
    fn of_failure(f: &RolloutFailure) -> Option<Self> {
        Some(Self::new(
            WorkloadKind::parse(&f.kind)?,
            &f.namespace,
            &f.name,
        ))
    }
}

/// Updates the in-flight entries from what was observed: passes, drops the workloads that are
/// gone or were opted out, and returns the failures (entry, reason, message) it removed.
fn judge_in_flight(
    input: &Input<'_>,
    st: &mut RolloutStatus,
    events: &mut Vec<PlanEvent>,
) -> Vec<(WorkloadKey, RolloutWorkload, &'static str, String)> {
    let by_key: BTreeMap<&WorkloadKey, &Workload> =
        input.workloads.iter().map(|w| (&w.key, w)).collect();
    let mut failed = Vec::new();
    let desired = input.desired;
    st.in_flight.retain_mut(|f| {
        let Some(key) = WorkloadKey::of(f) else {
            return false;
        };
        let Some(w) = by_key.get(&key) else {
            // Deleted mid-batch: nothing left to wait for.
            events.push(PlanEvent {
                reason: "WorkloadGone",
                message: format!("{key} was deleted during its batch"),
                warning: false,
            });
            return false;
        };
        if f.passed {
            return true;
        }
        if w.manual {
            return false;
        }
        if w.on_desired(desired) {
            match input.verdicts.get(&key) {
                Some(Verdict::Pass) => {
                    f.passed = true;
                    return true;
                }
                Some(Verdict::Fail(why)) => {
                    failed.push((key, f.clone(), "HealthGateFailed", why.clone()));
                    return false;
                }
                None => {}
            }
        }
        let overdue = f
            .deadline
            .parse::<Timestamp>()
            .map_or(true, |due| input.now >= due);
        if overdue {
            let msg = format!(
                "not through after spec.rollout.progressDeadline ({}): {}; pods by version: {}",
                input.spec.progress_deadline,
                w.progress,
                join(w.pods.iter().map(|(v, n)| format!("{v}={n}")))
            );
            failed.push((key, f.clone(), "DeadlineExceeded", msg));
            return false;
        }
        true
    });
    failed
}

/// Out-of-date workloads the rollout may restart, canaries first, then by key.
fn candidates<'a>(input: &Input<'a>, st: &RolloutStatus) -> Vec<&'a Workload> {
    let desired = input.desired;
    let in_flight: BTreeSet<WorkloadKey> =
        st.in_flight.iter().filter_map(WorkloadKey::of).collect();
    let rollback = input.spec.failure_policy == RolloutFailurePolicy::Rollback;
    let mut out: Vec<&Workload> = input
        .workloads
        .iter()
        .filter(|w| w.out_of_date(desired))
        .filter(|w| !w.manual && !w.pinned_for(desired) && !in_flight.contains(&w.key))
        .filter(|w| !rollback || !failed_on(st, &w.key, desired))
        .collect();
    out.sort_by(|a, b| (!a.canary, &a.key).cmp(&(!b.canary, &b.key)));
    out
}

/// Batches still needed for `left` (canaries and the others never share a batch).
fn batches_needed(left: &[&Workload], batch_size: u32) -> u32 {
    let size = batch_size.max(1) as usize;
    let canaries = left.iter().filter(|w| w.canary).count();
    (canaries.div_ceil(size) + (left.len() - canaries).div_ceil(size)) as u32
}

fn count_pods(workloads: &[Workload], unmanaged: &BTreeMap<String, u32>) -> BTreeMap<String, i64> {
    let mut pods = BTreeMap::new();
    for (v, n) in workloads.iter().flat_map(|w| &w.pods).chain(unmanaged) {
        *pods.entry(v.clone()).or_insert(0) += i64::from(*n);
    }
    pods
}

fn set(st: &mut RolloutStatus, state: RolloutState, reason: &str, message: String) {
    st.state = state;
    st.reason = reason.to_string();
    st.message = message;
}

fn join(items: impl IntoIterator<Item = String>) -> String {
    items.into_iter().collect::<Vec<_>>().join(", ")
}
