//! Which proxies lag, on what, and since when: the pure classification behind each replica's
//! list of lagging proxies (`trellis check --proxy`).
//!
//! A proxy receives what the operator publishes three ways, and can be behind on each
//! independently, so the report says which ([`Stale`]) rather than one "behind" bit:
//! - **generation**: a view the stream pushed (endpoints, streamed TrafficPolicies) and the
//!   proxy has not acknowledged;
//! - **settings**: the Mesh and PeerAuthentication settings its namespace's `trellis-proxy`
//!   ConfigMap carries (settings digest);
//! - **policies**: the TrafficPolicies that ConfigMap carries (policies digest); where it
//!   carries the full table (`configMap: Full`, or `Auto` while the table fits 64 KiB) most
//!   proxies hold their policies this way and never subscribe.
//!
//! Each aspect is classified from compile numbers ([`classify`]), then dated
//! ([`Behind::dated`]): the time of the first compile the proxy has not applied, or when it
//! connected if that is later (a replica knows nothing of a proxy before its stream opened).
//! Dates are instants, not ages, so a report of an unchanged lag is an unchanged report and the
//! Lease is not rewritten for it (see [`super::publish::due`]).

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Where a digest a proxy reported stands in its namespace's history of digests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// The namespace's current one.
    Current,
    /// Current until a later compile: the proxy misses what compile `at` published.
    Superseded { at: u64 },
    /// Not in the history (older than this replica or its bounded history) or not reported:
    /// missing since before anything the replica knows (lag is over-reported, never hidden).
    Unknown,
}

/// The first compile (view generation) whose change a proxy has not applied, per aspect;
/// `None`: applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Behind {
    pub generation: Option<u64>,
    pub settings: Option<u64>,
    pub policies: Option<u64>,
}

/// Classifies one proxy. `acked` is the view generation it holds, `latest` the replica's;
/// `settings` and `policies` are `None` when its namespace has nothing of that kind to apply
/// (not meshed any more; no TrafficPolicy its ConfigMap could carry and no digest reported).
pub fn classify(
    acked: u64,
    latest: u64,
    settings: Option<Standing>,
    policies: Option<Standing>,
) -> Behind {
    let missed = |s: Option<Standing>| match s? {
        Standing::Current => None,
        Standing::Superseded { at } => Some(at),
        Standing::Unknown => Some(0),
    };
    Behind {
        generation: (acked < latest).then_some(acked + 1),
        settings: missed(settings),
        policies: missed(policies),
    }
}

impl Behind {
    pub fn is_current(&self) -> bool {
        *self == Self::default()
    }

    /// The compile numbers as instants: `time_of` dates a compile (the oldest known for older
    /// ones), and no lag is dated before `connected`. `None` when nothing is behind.
    pub fn dated(
        &self,
        time_of: impl Fn(u64) -> Option<Timestamp>,
        connected: Option<Timestamp>,
    ) -> Option<Stale> {
        if self.is_current() {
            return None;
        }
        let date = |seq: Option<u64>| {
            let at = time_of(seq?).unwrap_or_default();
            Some(match connected {
                Some(c) if c > at => c,
                _ => at,
            })
        };
        Some(Stale {
            generation: date(self.generation),
            settings: date(self.settings),
            policies: date(self.policies),
        })
    }
}

/// What a lagging proxy has not applied, each with the time it has been missing it since.
/// Bounded by construction (three instants), so a listed proxy costs the report a fixed size.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stale {
    /// A view the discovery stream pushed and the proxy has not acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<Timestamp>,
    /// Its namespace's ConfigMap settings (Mesh, PeerAuthentication).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<Timestamp>,
    /// The TrafficPolicies its namespace's ConfigMap carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies: Option<Timestamp>,
}

impl Stale {
    /// The aspects missed, oldest first (ties in the order generation, settings, policies).
    pub fn aspects(&self) -> Vec<(&'static str, Timestamp)> {
        let mut out: Vec<(&'static str, Timestamp)> = [
            ("generation", self.generation),
            ("settings", self.settings),
            ("policies", self.policies),
        ]
        .into_iter()
        .filter_map(|(name, at)| Some((name, at?)))
        .collect();
        out.sort_by_key(|(_, at)| *at);
        out
    }

    /// Since when the proxy has missed anything (the oldest aspect).
    pub fn oldest(&self) -> Option<Timestamp> {
        [self.generation, self.settings, self.policies]
            .into_iter()
            .flatten()
            .min()
    }
}

/// A proxy that has not applied everything this replica published.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LaggingProxy {
    pub namespace: String,
    /// The pod whose IP the stream comes from (empty when no pod has that IP).
    #[serde(default)]
    pub pod: String,
    pub identity: String,
    /// The view generation it acknowledged, and the replica's latest.
    pub acked: u64,
    pub latest: u64,
    /// What it misses and since when. Empty in a report from a replica older than the field.
    #[serde(default)]
    pub stale: Stale,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_since: Option<Timestamp>,
    /// Since when it has been missing something: the oldest of [`Self::stale`].
    pub behind_since: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    /// Compile `n` happened at `t(10 * n)`; nothing is known before compile 3.
    fn time_of(seq: u64) -> Option<Timestamp> {
        Some(t(10 * seq.max(3) as i64))
    }

    #[test]
    fn a_proxy_that_applied_everything_is_not_behind() {
        let b = classify(7, 7, Some(Standing::Current), Some(Standing::Current));
        assert!(b.is_current());
        assert_eq!(b.dated(time_of, Some(t(0))), None);
        // Nothing to apply in its namespace is nothing to miss.
        assert!(classify(7, 7, None, None).is_current());
    }

    #[test]
    fn each_aspect_is_classified_on_its_own() {
        // Acked everything the stream pushed, settings current, the ConfigMap's policies
        // superseded at compile 5: behind on policies alone (issue 19).
        let b = classify(
            7,
            7,
            Some(Standing::Current),
            Some(Standing::Superseded { at: 5 }),
        );
        assert_eq!(
            b,
            Behind {
                generation: None,
                settings: None,
                policies: Some(5)
            }
        );
        let s = b.dated(time_of, Some(t(0))).unwrap();
        assert_eq!(
            s,
            Stale {
                policies: Some(t(50)),
                ..Stale::default()
            }
        );
        assert_eq!(s.aspects(), [("policies", t(50))]);

        // A view not acknowledged: missing since the first view after its ack.
        let b = classify(4, 7, Some(Standing::Current), Some(Standing::Current));
        assert_eq!(b.generation, Some(5));
        assert_eq!((b.settings, b.policies), (None, None));

        // A digest the replica never saw (or none reported) is missing since before anything
        // the replica knows: dated at its oldest compile.
        let b = classify(7, 7, Some(Standing::Unknown), None);
        assert_eq!(b.settings, Some(0));
        assert_eq!(b.dated(time_of, None).unwrap().settings, Some(t(30)));
    }

    #[test]
    fn lags_are_dated_no_earlier_than_the_connection_and_listed_oldest_first() {
        let b = classify(
            5,
            9,
            Some(Standing::Superseded { at: 8 }),
            Some(Standing::Unknown),
        );
        // Connected at t(45): what it missed before is dated at its connection.
        let s = b.dated(time_of, Some(t(45))).unwrap();
        assert_eq!(
            s,
            Stale {
                generation: Some(t(60)),
                settings: Some(t(80)),
                policies: Some(t(45)),
            }
        );
        assert_eq!(
            s.aspects(),
            [
                ("policies", t(45)),
                ("generation", t(60)),
                ("settings", t(80))
            ]
        );
        assert_eq!(s.oldest(), Some(t(45)));
    }

    #[test]
    fn a_report_from_an_older_replica_reads_with_nothing_named_stale() {
        let old = r#"{"namespace":"shop","pod":"web-0","identity":"spiffe://cluster.local/ns/shop/sa/web",
            "acked":6,"latest":7,"settingsCurrent":false,"behindSince":"2026-11-29T12:00:00Z"}"#;
        let p: LaggingProxy = serde_json::from_str(old).unwrap();
        assert_eq!(p.stale, Stale::default());
        assert!(p.stale.aspects().is_empty());
    }
}
