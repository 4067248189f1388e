//! Propagation checks (`trellis check --proxy`): which proxies have not applied what the
//! operator published, read from the operator replicas' propagation reports (one Lease per
//! replica, `trellis.dev/component=propagation-report`, see [`crate::propagation`]).
//!
//! Why the reports and not an endpoint on the operator: every replica serves streams, so an
//! endpoint reached through the API server's service proxy would show one replica's proxies
//! at random, and a new listener would need an audience and authentication of its own. The
//! reports already hold what the leader sums; reading them needs `list` on leases in the
//! operator's namespace and nothing else, so who may see the lagging proxies' names and
//! identities is decided by RBAC like everything else `trellis check` reads.

use std::fmt::Write as _;

use super::{Check, Outcome};
use crate::propagation::report::is_fresh;
use crate::propagation::{LaggingProxy, ReplicaReport, STALE};

/// What the propagation checks read: each report with its Lease's renew time (Unix seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub namespace: String,
    pub reports: Result<Vec<(Option<i64>, ReplicaReport)>, String>,
}

fn human(secs: i64) -> String {
    let secs = secs.max(0);
    if secs >= 3600 {
        format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
    } else if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

/// Whether a lagging proxy fails the check: behind for longer than `threshold_secs` on anything
/// (its oldest stale aspect). One only briefly behind is catching up (a ConfigMap edit takes the
/// kubelet's sync, about a minute, to arrive) and is shown as a warning. Pure.
pub fn outcome(p: &LaggingProxy, now: i64, threshold_secs: i64) -> Outcome {
    if now - p.behind_since.as_second() > threshold_secs {
        Outcome::Fail
    } else {
        Outcome::Warn
    }
}

/// The STALE cell: each aspect the proxy misses with how long, oldest first
/// (`policies 4m10s, generation 6/7 40s`).
fn stale_cell(p: &LaggingProxy, now: i64) -> String {
    let aspects = p.stale.aspects();
    if aspects.is_empty() {
        // A report from a replica older than the per-aspect field.
        return format!("unknown {}", human(now - p.behind_since.as_second()));
    }
    aspects
        .iter()
        .map(|(name, at)| {
            let what = if *name == "generation" {
                format!("generation {}/{}", p.acked, p.latest)
            } else {
                (*name).to_string()
            };
            format!("{what} {}", human(now - at.as_second()))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The lagging proxies as a table, in the order given. Pure, for the report and tests.
pub fn table(lagging: &[&LaggingProxy], now: i64) -> String {
    let rows: Vec<[String; 5]> = lagging
        .iter()
        .map(|p| {
            [
                p.namespace.clone(),
                if p.pod.is_empty() {
                    "?".into()
                } else {
                    p.pod.clone()
                },
                stale_cell(p, now),
                p.connected_since
                    .map_or_else(|| "?".into(), |t| human(now - t.as_second()) + " ago"),
                p.identity.clone(),
            ]
        })
        .collect();
    let head = ["NAMESPACE", "POD", "STALE", "CONNECTED", "IDENTITY"];
    let mut widths = head.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        out.push_str("         ");
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                let _ = write!(out, "{c}");
            } else {
                let _ = write!(out, "{c:<w$}  ");
            }
        }
        out.push('\n');
    };
    line(&head);
    for r in &rows {
        line(&r.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out.trim_end().to_string()
}

const FAIL_HINT: &str = "STALE says what each proxy has not applied. generation: a change the discovery stream pushed is not acknowledged (the proxy is slow or stuck); settings (Mesh, PeerAuthentication) or policies (TrafficPolicies): it does not run its namespace's current trellis-proxy ConfigMap (the kubelet has not delivered it, or the proxy refused it). Its log says why: `kubectl -n NS logs POD -c trellis-proxy`";
const WARN_HINT: &str = "a ConfigMap change reaches a proxy on the kubelet's sync (about a minute); run again to see them catch up";

/// The "Propagation" section: replicas reporting, and proxies behind: a failure for those
/// behind for longer than `threshold_secs`, a warning for those only briefly behind.
pub fn checks(o: &Observed, now: i64, threshold_secs: i64) -> Vec<Check> {
    let ns = &o.namespace;
    let reports = match &o.reports {
        Err(e) => {
            return vec![Check::fail(
                "propagation reports",
                format!("cannot list them: {e}"),
                format!("you need list on leases in {ns}"),
            )];
        }
        Ok(r) => r,
    };
    // The grace the leader's sums use, so a dead replica's proxies leave this list when they
    // leave the counts.
    let now_ts = jiff::Timestamp::from_second(now).unwrap_or_default();
    let fresh: Vec<&ReplicaReport> = reports
        .iter()
        .filter(|(at, _)| {
            let at = at.and_then(|s| jiff::Timestamp::from_second(s).ok());
            is_fresh(at, now_ts, STALE)
        })
        .map(|(_, r)| r)
        .collect();
    if fresh.is_empty() {
        return vec![Check::warn(
            "propagation reports",
            format!(
                "no operator replica reported in the last {} s",
                STALE.as_secs()
            ),
            format!(
                "every replica writes one every few seconds: see `kubectl -n {ns} get leases -l trellis.dev/component=propagation-report` and the operator's logs"
            ),
        )];
    }
    let streams: u64 = fresh.iter().map(|r| r.streams).sum();
    let mut out = vec![Check::pass(
        "propagation reports",
        format!(
            "{} operator replica(s), {streams} proxy stream(s)",
            fresh.len()
        ),
    )];
    let cut: Vec<String> = fresh
        .iter()
        .filter(|r| r.omitted > 0)
        .map(|r| format!("{} left out {} object(s)", r.replica, r.omitted))
        .collect();
    if !cut.is_empty() {
        out.push(Check::warn(
            "propagation report size",
            format!(
                "{}: their counts (status.propagation) miss that replica's proxies",
                cut.join(", ")
            ),
            format!(
                "a report holds {} Leases of 256 KiB (about 25 000 objects with long names, more with short ones): see the README's propagation status limits",
                crate::propagation::encode::MAX_SHARDS
            ),
        ));
    }
    let total: u64 = fresh.iter().map(|r| r.lagging_total).sum();
    let mut lagging: Vec<&LaggingProxy> = fresh.iter().flat_map(|r| &r.lagging).collect();
    lagging.sort_by(|a, b| {
        (a.behind_since, &a.namespace, &a.pod).cmp(&(b.behind_since, &b.namespace, &b.pod))
    });
    let name = "proxies in step";
    if total == 0 {
        out.push(Check::pass(
            name,
            format!("all {streams} proxies applied the latest"),
        ));
        return out;
    }
    let (late, brief): (Vec<&LaggingProxy>, Vec<&LaggingProxy>) = lagging
        .iter()
        .partition(|p| outcome(p, now, threshold_secs) == Outcome::Fail);
    let unlisted = total.saturating_sub(lagging.len() as u64);
    let note = if unlisted > 0 {
        format!(
            " ({unlisted} more behind, not listed: each replica lists at most its {} longest behind)",
            crate::propagation::report::MAX_LISTED
        )
    } else {
        String::new()
    };
    let limit = human(threshold_secs);
    if late.is_empty() {
        out.push(Check::warn(
            name,
            format!(
                "{total} of {streams} catching up, none for more than {limit}{note}\n{}",
                table(&brief, now)
            ),
            WARN_HINT,
        ));
        return out;
    }
    out.push(Check::fail(
        name,
        format!(
            "{} of {streams} behind for more than {limit}{note}\n{}",
            late.len(),
            table(&late, now)
        ),
        FAIL_HINT,
    ));
    if !brief.is_empty() {
        out.push(Check::warn(
            "proxies catching up",
            format!(
                "{} of {streams} behind for less than {limit}\n{}",
                brief.len(),
                table(&brief, now)
            ),
            WARN_HINT,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::propagation::Stale;

    const NOW: i64 = 1_900_000_000;

    fn ago(secs: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(NOW - secs).unwrap()
    }

    /// A proxy behind for `behind` seconds on the aspects `stale` sets.
    fn lag(pod: &str, behind: i64, stale: Stale) -> LaggingProxy {
        LaggingProxy {
            namespace: "shop".into(),
            pod: pod.into(),
            identity: format!("spiffe://cluster.local/ns/shop/sa/{pod}"),
            acked: 6,
            latest: 7,
            stale,
            connected_since: Some(ago(3600)),
            behind_since: ago(behind),
        }
    }

    fn policies(behind: i64) -> Stale {
        Stale {
            policies: Some(ago(behind)),
            ..Stale::default()
        }
    }

    fn observed(reports: Vec<(i64, ReplicaReport)>) -> Observed {
        Observed {
            namespace: "trellis-system".into(),
            reports: Ok(reports.into_iter().map(|(a, r)| (Some(a), r)).collect()),
        }
    }

    fn report(lagging: Vec<LaggingProxy>, total: u64) -> ReplicaReport {
        ReplicaReport {
            replica: "op-a".into(),
            latest: 7,
            streams: 10,
            objects: vec![],
            lagging,
            lagging_total: total,
            ..Default::default()
        }
    }

    fn cells(line: &str) -> Vec<&str> {
        line.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect()
    }

    #[test]
    fn a_replica_whose_report_left_objects_out_is_a_warning_naming_it() {
        let whole = report(vec![], 0);
        let cut = ReplicaReport {
            replica: "op-b".into(),
            omitted: 1234,
            ..report(vec![], 0)
        };
        let checks = checks(&observed(vec![(NOW, whole.clone())]), NOW, 180);
        assert!(checks.iter().all(|c| c.name != "propagation report size"));
        let checks = checks_of(vec![(NOW, whole), (NOW, cut)]);
        let c = checks
            .iter()
            .find(|c| c.name == "propagation report size")
            .expect("a size check");
        assert_eq!(c.outcome, Outcome::Warn);
        assert!(
            c.detail.starts_with("op-b left out 1234 object(s)"),
            "{}",
            c.detail
        );
        // A stale report's omission is not reported: it is not counted either.
        let stale = ReplicaReport {
            omitted: 5,
            ..report(vec![], 0)
        };
        let checks = checks_of(vec![(NOW - 3600, stale), (NOW, report(vec![], 0))]);
        assert!(checks.iter().all(|c| c.name != "propagation report size"));
    }

    fn checks_of(reports: Vec<(i64, ReplicaReport)>) -> Vec<Check> {
        checks(&observed(reports), NOW, 180)
    }

    #[test]
    fn the_table_names_each_lagging_proxy_what_is_stale_and_for_how_long() {
        let p = lag(
            "web-0",
            200,
            Stale {
                generation: Some(ago(40)),
                settings: None,
                policies: Some(ago(200)),
            },
        );
        let t = table(&[&p], NOW);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            cells(lines[0]),
            ["NAMESPACE", "POD", "STALE", "CONNECTED", "IDENTITY"]
        );
        assert_eq!(
            cells(lines[1]),
            [
                "shop",
                "web-0",
                "policies 3m20s, generation 6/7 40s",
                "1h00m ago",
                "spiffe://cluster.local/ns/shop/sa/web-0"
            ]
        );
        // A report from an older replica does not say what is stale.
        let old = lag("web-1", 90, Stale::default());
        assert_eq!(
            cells(table(&[&old], NOW).lines().nth(1).unwrap())[2],
            "unknown 1m30s"
        );
    }

    #[test]
    fn a_proxy_fails_only_past_the_threshold() {
        assert_eq!(
            outcome(&lag("a", 121, policies(121)), NOW, 120),
            Outcome::Fail
        );
        assert_eq!(
            outcome(&lag("a", 120, policies(120)), NOW, 120),
            Outcome::Warn
        );
        assert_eq!(outcome(&lag("a", 5, policies(5)), NOW, 120), Outcome::Warn);
    }

    #[test]
    fn a_proxy_behind_past_the_threshold_fails_and_one_catching_up_warns() {
        let c = checks(
            &observed(vec![(
                NOW - 2,
                report(vec![lag("web-0", 30, policies(30))], 1),
            )]),
            NOW,
            120,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].outcome, Outcome::Warn, "{:?}", c[1]);
        assert!(
            c[1].detail
                .starts_with("1 of 10 catching up, none for more than 2m00s\n"),
            "{}",
            c[1].detail
        );
        let c = checks(
            &observed(vec![(
                NOW - 2,
                report(
                    vec![
                        lag("web-0", 30, policies(30)),
                        lag("web-1", 300, policies(300)),
                        lag("web-2", 400, policies(400)),
                    ],
                    5,
                ),
            )]),
            NOW,
            120,
        );
        assert_eq!(c.len(), 3, "{c:?}");
        assert_eq!(
            (c[1].name.as_str(), c[1].outcome),
            ("proxies in step", Outcome::Fail)
        );
        assert!(
            c[1].detail.starts_with(
                "2 of 10 behind for more than 2m00s (2 more behind, not listed: each replica lists at most its 100 longest behind)\n"
            ),
            "{}",
            c[1].detail
        );
        // Longest behind first; the one catching up is not among the failures.
        let rows: Vec<&str> = c[1].detail.lines().skip(2).collect();
        assert_eq!(rows.len(), 2);
        assert!(
            rows[0].contains("web-2") && rows[1].contains("web-1"),
            "{rows:?}"
        );
        assert_eq!(
            (c[2].name.as_str(), c[2].outcome),
            ("proxies catching up", Outcome::Warn)
        );
        assert!(
            c[2].detail
                .starts_with("1 of 10 behind for less than 2m00s\n"),
            "{}",
            c[2].detail
        );
        assert!(c[2].detail.contains("web-0"));
        let c = checks(&observed(vec![(NOW - 2, report(vec![], 0))]), NOW, 120);
        assert_eq!(c[1].outcome, Outcome::Pass);
    }

    #[test]
    fn a_dead_replicas_report_is_not_read() {
        let c = checks(
            &observed(vec![(
                NOW - 600,
                report(vec![lag("web-0", 3000, policies(3000))], 1),
            )]),
            NOW,
            120,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].outcome, Outcome::Warn);
    }

    /// A dead replica's lagging proxies leave the check when its counts leave the statuses:
    /// the same grace, to the second, on either side of it.
    #[test]
    fn a_report_is_read_exactly_as_long_as_the_leader_counts_it() {
        let now = jiff::Timestamp::from_second(NOW).unwrap();
        for age in [
            0,
            1,
            STALE.as_secs() as i64 - 1,
            STALE.as_secs() as i64,
            STALE.as_secs() as i64 + 1,
            600,
            -30,
        ] {
            let r = report(vec![lag("web-0", 3000, policies(3000))], 1);
            let at = jiff::Timestamp::from_second(NOW - age).unwrap();
            let counted =
                !crate::propagation::report::fresh(vec![(Some(at), r.clone())], now, STALE)
                    .is_empty();
            let listed = checks(&observed(vec![(NOW - age, r)]), NOW, 120)
                .iter()
                .any(|c| c.detail.contains("web-0"));
            assert_eq!(listed, counted, "renewed {age} s ago");
            assert_eq!(
                counted,
                age <= STALE.as_secs() as i64,
                "renewed {age} s ago"
            );
        }
    }
}
