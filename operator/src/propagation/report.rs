//! What a replica publishes about its streams, how the leader sums the replicas' reports, and
//! the status that follows. Pure.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::lag::LaggingProxy;
use super::track::{ObjectCount, ObjectRef};
use crate::api::PropagationStatus;
use crate::api::conditions::{Condition, ConditionStatus};

/// The condition type the propagation writer owns.
pub const PROPAGATED: &str = "Propagated";
/// Lagging proxies one replica lists at most: `trellis check --proxy` needs the worst ones,
/// and the report must stay far below an annotation's 256 KiB.
pub const MAX_LISTED: usize = 100;

/// One replica's counts (the annotation of its report Lease).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaReport {
    /// The replica (its pod name).
    pub replica: String,
    /// Its latest view generation.
    pub latest: u64,
    /// Streams it serves.
    pub streams: u64,
    #[serde(default)]
    pub objects: Vec<ObjectCount>,
    /// The proxies longest behind, at most [`MAX_LISTED`].
    #[serde(default)]
    pub lagging: Vec<LaggingProxy>,
    /// How many proxies are behind in all.
    #[serde(default)]
    pub lagging_total: u64,
}

/// Sums the counts of fresh reports per object: the generation is the highest any replica
/// counted against (a replica whose caches have not seen it yet lags behind with it), and only
/// the reports at that generation contribute updated proxies, while every report's proxies
/// count towards the total.
pub fn aggregate(reports: &[ReplicaReport]) -> BTreeMap<ObjectRef, PropagationStatus> {
    let mut out: BTreeMap<ObjectRef, PropagationStatus> = BTreeMap::new();
    for r in reports {
        for c in &r.objects {
            let e = out.entry(c.object.clone()).or_insert(PropagationStatus {
                generation: c.generation,
                updated: 0,
                total: 0,
            });
            e.generation = e.generation.max(c.generation);
        }
    }
    for r in reports {
        for c in &r.objects {
            if let Some(e) = out.get_mut(&c.object) {
                e.total += c.total as i64;
                if c.generation == e.generation {
                    e.updated += c.updated as i64;
                }
            }
        }
    }
    out
}

/// The `Propagated` condition for a count.
pub fn condition(object: &ObjectRef, p: &PropagationStatus) -> Condition {
    let lag = p.total - p.updated;
    let what = if object.kind == "TrafficPolicy" {
        "proxies subscribed to its Service over the discovery stream"
    } else {
        "connected proxies it affects"
    };
    let (status, reason, message) = if p.total == 0 {
        (
            ConditionStatus::True,
            "NoProxies",
            format!("no {what} (generation {})", p.generation),
        )
    } else if lag <= 0 {
        (
            ConditionStatus::True,
            "Propagated",
            format!("all {} {what} applied generation {}", p.total, p.generation),
        )
    } else {
        (
            ConditionStatus::False,
            "Propagating",
            format!(
                "{lag} of {} {what} have not applied generation {} yet; `trellis check --proxy` lists them",
                p.total, p.generation
            ),
        )
    };
    Condition::new(PROPAGATED, status, reason, message, Some(p.generation))
}

/// Whether a report renewed `at` still counts at `now`: no older than `max_age` (a renew time
/// ahead of `now` is clock skew, and counts). The one rule for the leader's sums and for
/// `trellis check --proxy`, so a dead replica's proxies leave the lagging list exactly when
/// they leave the counts.
pub fn is_fresh(at: Option<Timestamp>, now: Timestamp, max_age: std::time::Duration) -> bool {
    at.is_some_and(|at| {
        now.duration_since(at)
            .try_into()
            .is_ok_and(|age: std::time::Duration| age <= max_age)
            || at > now
    })
}

/// Reports younger than `max_age` at `now` (by their Lease's renew time, [`is_fresh`]): a
/// replica that died stops renewing, and its proxies reconnect to (and are counted by) the
/// others.
pub fn fresh(
    reports: Vec<(Option<Timestamp>, ReplicaReport)>,
    now: Timestamp,
    max_age: std::time::Duration,
) -> Vec<ReplicaReport> {
    reports
        .into_iter()
        .filter(|(at, _)| is_fresh(*at, now, max_age))
        .map(|(_, r)| r)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(kind: &str, name: &str, generation: i64, updated: u64, total: u64) -> ObjectCount {
        ObjectCount {
            object: ObjectRef::new(kind, "shop", name),
            generation,
            updated,
            total,
        }
    }

    #[test]
    fn replicas_are_summed_and_a_replica_behind_on_the_generation_counts_no_updated_proxy() {
        let a = ReplicaReport {
            replica: "op-a".into(),
            objects: vec![count("TrafficPolicy", "reviews", 3, 4, 5)],
            ..Default::default()
        };
        let b = ReplicaReport {
            replica: "op-b".into(),
            objects: vec![count("TrafficPolicy", "reviews", 2, 7, 7)],
            ..Default::default()
        };
        let sum = aggregate(&[a, b]);
        assert_eq!(
            sum[&ObjectRef::new("TrafficPolicy", "shop", "reviews")],
            PropagationStatus {
                generation: 3,
                updated: 4,
                total: 12
            }
        );
    }

    #[test]
    fn the_condition_says_how_many_lag() {
        let o = ObjectRef::new("PeerAuthentication", "shop", "strict");
        let c = condition(
            &o,
            &PropagationStatus {
                generation: 2,
                updated: 3,
                total: 5,
            },
        );
        assert_eq!(
            (c.status, c.reason.as_str()),
            (ConditionStatus::False, "Propagating")
        );
        assert!(c.message.starts_with("2 of 5 "), "{}", c.message);
        assert_eq!(c.observed_generation, Some(2));
        let c = condition(
            &o,
            &PropagationStatus {
                generation: 2,
                updated: 5,
                total: 5,
            },
        );
        assert!(c.is_true());
        let c = condition(&o, &PropagationStatus::default());
        assert_eq!(c.reason, "NoProxies");
    }

    #[test]
    fn stale_reports_are_ignored() {
        let now: Timestamp = "2026-11-29T12:00:00Z".parse().unwrap();
        let r = |name: &str| ReplicaReport {
            replica: name.into(),
            ..Default::default()
        };
        let kept = fresh(
            vec![
                (Some("2026-11-29T11:59:30Z".parse().unwrap()), r("live")),
                (Some("2026-11-29T11:50:00Z".parse().unwrap()), r("dead")),
                (None, r("never")),
            ],
            now,
            std::time::Duration::from_secs(90),
        );
        assert_eq!(kept, vec![r("live")]);
    }
}
