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

/// The most a report's JSON may take: the API server refuses an object whose annotations total
/// more than 256 KiB, and a replica whose report is refused drops out of every count once its
/// last one is [`super::STALE`]. A little is left for the annotation's key and any other
/// annotation on the Lease.
pub const MAX_REPORT_BYTES: usize = 250 * 1024;

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
    /// The proxies longest behind, longest first: at most [`MAX_LISTED`], and fewer when the
    /// report would not fit [`MAX_REPORT_BYTES`] ([`fit`]).
    #[serde(default)]
    pub lagging: Vec<LaggingProxy>,
    /// How many proxies are behind in all.
    #[serde(default)]
    pub lagging_total: u64,
    /// Which shard of the replica's report this is (0: the one with the header and the
    /// lagging list), when it did not fit one Lease ([`super::encode`]).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub shard: u32,
    /// How many shards the report has (0 or 1: one; absent in the first format).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub shards: u32,
    /// Objects left out of the report because it did not fit [`super::encode::MAX_SHARDS`]
    /// Leases: their counts miss this replica's proxies (`trellis check --proxy` and the
    /// leader's log say so).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub omitted: u64,
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

/// Makes `report` fit `budget` bytes of JSON by dropping lagging proxies from the end of its
/// list (the least behind: the list is longest behind first); the counts are what the statuses
/// are made of and are never dropped, and `lagging_total` still counts every proxy behind.
/// Returns whether it fits: it does not when the counts alone are larger (so many objects
/// that the report needs another home; the caller says so).
pub fn fit(report: &mut ReplicaReport, budget: usize) -> bool {
    let mut size = json_len(&*report);
    while size > budget {
        let Some(last) = report.lagging.pop() else {
            return false;
        };
        // The entry and the comma before it.
        size = size.saturating_sub(json_len(&last) + 1);
    }
    true
}

fn json_len<T: Serialize>(v: &T) -> usize {
    serde_json::to_vec(v).map_or(0, |b| b.len())
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
    fn a_report_is_cut_to_fit_from_its_least_behind_proxies_and_never_its_counts() {
        let at = |s: i64| Timestamp::from_second(1_800_000_000 + s).unwrap();
        let proxy = |i: i64| LaggingProxy {
            namespace: "shop".into(),
            pod: format!("web-{i}"),
            identity: format!("spiffe://cluster.local/ns/shop/sa/web-{i}"),
            acked: 1,
            latest: 2,
            stale: crate::propagation::Stale {
                generation: Some(at(i)),
                ..Default::default()
            },
            connected_since: None,
            behind_since: at(i),
        };
        let full = ReplicaReport {
            replica: "op-a".into(),
            latest: 2,
            streams: 40,
            objects: (0..20)
                .map(|i| count("TrafficPolicy", &format!("tp-{i}"), 1, 1, 2))
                .collect(),
            lagging: (0..40).map(proxy).collect(),
            lagging_total: 40,
            ..Default::default()
        };
        let whole = json_len(&full);
        // Fits: untouched.
        let mut r = full.clone();
        assert!(fit(&mut r, whole));
        assert_eq!(r, full);
        // Every budget in between: as many of the longest behind as fit, in order.
        for budget in [whole - 1, whole / 2, json_len(&full.objects) + 200] {
            let mut r = full.clone();
            assert!(fit(&mut r, budget), "{budget}");
            assert!(json_len(&r) <= budget, "{} > {budget}", json_len(&r));
            assert!(r.lagging.len() < 40);
            assert_eq!(r.lagging[..], full.lagging[..r.lagging.len()]);
            assert_eq!(
                (r.objects.clone(), r.lagging_total),
                (full.objects.clone(), 40)
            );
            // Not cut more than needed: one more entry would not have fitted.
            let mut more = r.clone();
            more.lagging.push(full.lagging[r.lagging.len()].clone());
            assert!(json_len(&more) > budget);
        }
        // The counts alone too large: said so, and nothing of them dropped.
        let mut r = full.clone();
        assert!(!fit(&mut r, 100));
        assert_eq!(r.objects, full.objects);
        assert!(r.lagging.is_empty());
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
