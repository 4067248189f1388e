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

use super::Check;
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

/// The lagging proxies as a table, longest behind first. Pure, for the report and tests.
pub fn table(lagging: &[LaggingProxy], now: i64) -> String {
    let rows: Vec<[String; 7]> = lagging
        .iter()
        .map(|p| {
            [
                p.namespace.clone(),
                if p.pod.is_empty() {
                    "?".into()
                } else {
                    p.pod.clone()
                },
                p.identity.clone(),
                format!("{}/{}", p.acked, p.latest),
                if p.settings_current {
                    "current".into()
                } else {
                    "stale".into()
                },
                p.connected_since
                    .map_or_else(|| "?".into(), |t| human(now - t.as_second()) + " ago"),
                human(now - p.behind_since.as_second()),
            ]
        })
        .collect();
    let head = [
        "NAMESPACE",
        "POD",
        "IDENTITY",
        "ACKED",
        "CONFIGMAP",
        "CONNECTED",
        "BEHIND",
    ];
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

/// The "Propagation" section: replicas reporting, and proxies behind, failing for any proxy
/// behind for longer than `threshold_secs`.
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
    let fresh: Vec<&ReplicaReport> = reports
        .iter()
        .filter(|(at, _)| at.is_some_and(|at| now - at <= STALE.as_secs() as i64))
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
    let total: u64 = fresh.iter().map(|r| r.lagging_total).sum();
    let mut lagging: Vec<LaggingProxy> = fresh.iter().flat_map(|r| r.lagging.clone()).collect();
    lagging.sort_by(|a, b| {
        (a.behind_since, &a.namespace, &a.pod).cmp(&(b.behind_since, &b.namespace, &b.pod))
    });
    let name = "proxies in step";
    let late = lagging
        .iter()
        .filter(|p| now - p.behind_since.as_second() > threshold_secs)
        .count();
    let listed = if (lagging.len() as u64) < total {
        format!(" (the {} longest behind listed)", lagging.len())
    } else {
        String::new()
    };
    let check = if total == 0 {
        Check::pass(name, format!("all {streams} proxies applied the latest"))
    } else if late == 0 {
        Check::warn(
            name,
            format!(
                "{total} of {streams} catching up, none for more than {}{listed}\n{}",
                human(threshold_secs),
                table(&lagging, now)
            ),
            "a ConfigMap change reaches a proxy on the kubelet's sync (about a minute); run again to see them catch up",
        )
    } else {
        Check::fail(
            name,
            format!(
                "{late} of {streams} behind for more than {}{listed}\n{}",
                human(threshold_secs),
                table(&lagging, now)
            ),
            "CONFIGMAP stale: the kubelet has not delivered the namespace's trellis-proxy ConfigMap, or the proxy refused it (its log says why: `kubectl -n NS logs POD -c trellis-proxy`); ACKED behind: the proxy has not applied what the stream pushed (slow or stuck; the same log)",
        )
    };
    out.push(check);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_900_000_000;

    fn lag(pod: &str, behind: i64, settings_current: bool) -> LaggingProxy {
        LaggingProxy {
            namespace: "shop".into(),
            pod: pod.into(),
            identity: format!("spiffe://cluster.local/ns/shop/sa/{pod}"),
            acked: 6,
            latest: 7,
            settings_current,
            connected_since: Some(jiff::Timestamp::from_second(NOW - 3600).unwrap()),
            behind_since: jiff::Timestamp::from_second(NOW - behind).unwrap(),
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
        }
    }

    #[test]
    fn the_table_names_each_lagging_proxy_and_how_long_it_has_been_behind() {
        let t = table(&[lag("web-0", 200, false)], NOW);
        let lines: Vec<&str> = t.lines().map(str::trim).collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            [
                "NAMESPACE",
                "POD",
                "IDENTITY",
                "ACKED",
                "CONFIGMAP",
                "CONNECTED",
                "BEHIND"
            ]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "shop",
                "web-0",
                "spiffe://cluster.local/ns/shop/sa/web-0",
                "6/7",
                "stale",
                "1h00m",
                "ago",
                "3m20s"
            ]
        );
    }

    #[test]
    fn a_proxy_behind_past_the_threshold_fails_and_one_catching_up_warns() {
        let c = checks(
            &observed(vec![(NOW - 2, report(vec![lag("web-0", 30, false)], 1))]),
            NOW,
            120,
        );
        assert_eq!(c[1].outcome, super::super::Outcome::Warn, "{:?}", c[1]);
        let c = checks(
            &observed(vec![(
                NOW - 2,
                report(vec![lag("web-0", 30, true), lag("web-1", 300, false)], 3),
            )]),
            NOW,
            120,
        );
        assert_eq!(c[1].outcome, super::super::Outcome::Fail);
        assert!(
            c[1].detail
                .starts_with("1 of 10 behind for more than 2m00s (the 2 longest behind listed)"),
            "{}",
            c[1].detail
        );
        // Longest behind first.
        let rows: Vec<&str> = c[1].detail.lines().skip(2).collect();
        assert!(
            rows[0].contains("web-1") && rows[1].contains("web-0"),
            "{rows:?}"
        );
        let c = checks(&observed(vec![(NOW - 2, report(vec![], 0))]), NOW, 120);
        assert_eq!(c[1].outcome, super::super::Outcome::Pass);
    }

    #[test]
    fn a_dead_replicas_report_is_not_read() {
        let c = checks(
            &observed(vec![(
                NOW - 600,
                report(vec![lag("web-0", 3000, false)], 1),
            )]),
            NOW,
            120,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].outcome, super::super::Outcome::Warn);
    }
}
