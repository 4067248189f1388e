//! The pure core of one replica's count: what each tracked object's current generation needs a
//! proxy to have applied, and, given this replica's streams, how many have.
//!
//! # What "applied" means, per kind
//! Every replica numbers its compiles with its view generation (the `Synced` number its streams
//! acknowledge). The [`Tracker`] remembers, per object, the first of its compiles that saw the
//! object's current `metadata.generation` (`since`).
//! - **Mesh** and **PeerAuthentication** reach proxies through the `trellis-proxy` ConfigMap,
//!   not the stream. A proxy reports the settings digest of the ConfigMap config it serves
//!   from ([`trellis_proxy::config::ProxyConfig::settings_digest`]: mesh settings and inbound
//!   policies). The tracker keeps, per namespace, the recent digests and the last compile at
//!   which each was current; a proxy has applied the object when its digest was current at or
//!   after `since` (its config was compiled from the object's current generation or a later
//!   state). A digest the tracker never saw (from before this replica started, or pushed out
//!   of the bounded history) counts as not applied: lag is over-reported, never hidden.
//!   The Mesh affects every stream; a PeerAuthentication the streams of its namespace, or every
//!   stream when it is the mesh-wide one (no selector, in the root namespace).
//! - **TrafficPolicy** is counted over the stream: its target Service is pushed with the policy
//!   attached, so the affected proxies are the streams subscribed to that Service and a proxy
//!   has applied it once it acknowledged a view generation ≥ `since`. Proxies that hold the
//!   Service only from their ConfigMap (the default `Full` ConfigMap content lists every
//!   visible Service, so they never subscribe) are not counted: their copy follows the
//!   ConfigMap, whose writing `Programmed` reports. Counting them would need each namespace's
//!   whole-table revision, which only the leader's full compile computes.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::compiler::{Output, Snapshot};

/// Digests remembered per namespace. Settings change only on a Mesh or PeerAuthentication edit,
/// and a proxy catches up within the kubelet's sync (a minute or two): a handful is plenty.
pub const SETTINGS_HISTORY: usize = 8;
/// Compile times remembered, for "behind since" (older lag is reported from the oldest known).
pub const TIMES_HISTORY: usize = 1024;

/// A tracked object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    /// `Mesh`, `TrafficPolicy` or `PeerAuthentication`.
    pub kind: String,
    /// Empty for the (cluster-scoped) Mesh.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(kind: &str, namespace: &str, name: &str) -> Self {
        Self {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// Which streams an object affects and how they receive it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Scope {
    /// Every stream, through the ConfigMap settings.
    AllSettings,
    /// Streams of one namespace, through the ConfigMap settings.
    NamespaceSettings(String),
    /// Streams subscribed to this Service key (`name.namespace`), over the stream.
    Subscribers(String),
}

#[derive(Clone, Debug)]
struct Tracked {
    generation: i64,
    since: u64,
    scope: Scope,
}

/// A settings digest and the last compile at which it was its namespace's (`None`: now).
#[derive(Clone, Debug)]
struct Seen {
    digest: String,
    until: Option<u64>,
}

/// What one stream told this replica (a copy, taken under the registry's lock).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StreamState {
    /// From the client certificate.
    pub namespace: String,
    pub identity: String,
    /// The TCP peer (the pod's IP: sidecar traffic bypasses the redirect).
    pub addr: Option<IpAddr>,
    pub connected: Option<Timestamp>,
    /// The view generation whose state the proxy holds: what it acknowledged, or the latest
    /// once it acknowledged every change it was sent (a view that changes nothing it
    /// subscribed to is not sent to it, see `discovery::registry`).
    pub acked: u64,
    /// The ConfigMap settings digest reported (`None`: not reported yet).
    pub settings: Option<String>,
    /// Subscribed Service keys (`name.namespace`).
    pub subscriptions: Vec<String>,
}

/// One object's count on one replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectCount {
    #[serde(flatten)]
    pub object: ObjectRef,
    /// The `metadata.generation` counted against.
    pub generation: i64,
    pub updated: u64,
    pub total: u64,
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
    /// Whether the ConfigMap settings it runs are its namespace's current ones.
    pub settings_current: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_since: Option<Timestamp>,
    /// Since when it has been missing something (the oldest change it has not applied, or
    /// when it connected, whichever is later).
    pub behind_since: Timestamp,
}

/// Per-replica bookkeeping across compiles. Pure: fed by [`Tracker::observe`], read by
/// [`Tracker::count`] and [`Tracker::lagging`].
#[derive(Debug, Default)]
pub struct Tracker {
    latest: u64,
    objects: BTreeMap<ObjectRef, Tracked>,
    settings: HashMap<String, VecDeque<Seen>>,
    times: VecDeque<(u64, Timestamp)>,
}

impl Tracker {
    /// The latest compile observed.
    pub fn latest(&self) -> u64 {
        self.latest
    }

    /// Records compile `seq` (the view generation it was published as) at `now`: which
    /// generation of each object it saw, and each namespace's settings digest.
    pub fn observe(&mut self, seq: u64, now: Timestamp, snapshot: &Snapshot, out: &Output) {
        self.latest = self.latest.max(seq);
        if self.times.back().is_none_or(|(s, _)| *s < seq) {
            self.times.push_back((seq, now));
            if self.times.len() > TIMES_HISTORY {
                self.times.pop_front();
            }
        }
        let root = snapshot.settings.root_namespace.as_str();
        let mut seen: BTreeMap<ObjectRef, (i64, Scope)> = BTreeMap::new();
        if let Some(mesh) = &snapshot.mesh {
            seen.insert(
                ObjectRef::new("Mesh", "", &mesh.metadata.name.clone().unwrap_or_default()),
                (mesh.metadata.generation.unwrap_or(0), Scope::AllSettings),
            );
        }
        for pa in &snapshot.peer_authentications {
            let ns = pa.metadata.namespace.clone().unwrap_or_default();
            let scope = if ns == root && pa.spec.selector.is_none() {
                Scope::AllSettings
            } else {
                Scope::NamespaceSettings(ns.clone())
            };
            let name = pa.metadata.name.clone().unwrap_or_default();
            seen.insert(
                ObjectRef::new("PeerAuthentication", &ns, &name),
                (pa.metadata.generation.unwrap_or(0), scope),
            );
        }
        for tp in &snapshot.traffic_policies {
            let ns = tp.metadata.namespace.clone().unwrap_or_default();
            let name = tp.metadata.name.clone().unwrap_or_default();
            let key = format!("{}.{ns}", tp.spec.target_ref.name);
            seen.insert(
                ObjectRef::new("TrafficPolicy", &ns, &name),
                (tp.metadata.generation.unwrap_or(0), Scope::Subscribers(key)),
            );
        }
        let mut next = BTreeMap::new();
        for (object, (generation, scope)) in seen {
            let since = match self.objects.get(&object) {
                Some(t) if t.generation == generation => t.since,
                _ => seq,
            };
            next.insert(
                object,
                Tracked {
                    generation,
                    since,
                    scope,
                },
            );
        }
        self.objects = next;
        for (ns, digest) in &out.settings {
            let history = self.settings.entry(ns.clone()).or_default();
            if history
                .back()
                .is_some_and(|s| s.until.is_none() && s.digest == *digest)
            {
                continue;
            }
            if let Some(current) = history.back_mut().filter(|s| s.until.is_none()) {
                current.until = Some(seq.saturating_sub(1));
            }
            history.retain(|s| s.digest != *digest);
            history.push_back(Seen {
                digest: digest.clone(),
                until: None,
            });
            while history.len() > SETTINGS_HISTORY {
                history.pop_front();
            }
        }
        self.settings.retain(|ns, _| out.settings.contains_key(ns));
    }

    /// Whether a stream runs settings that were current at or after compile `since`.
    fn settings_applied(&self, s: &StreamState, since: u64) -> bool {
        let (Some(digest), Some(history)) = (&s.settings, self.settings.get(&s.namespace)) else {
            return false;
        };
        history
            .iter()
            .find(|seen| seen.digest == *digest)
            .is_some_and(|seen| seen.until.is_none_or(|until| until >= since))
    }

    fn settings_current(&self, s: &StreamState) -> bool {
        self.settings_applied(s, self.latest)
    }

    /// Every tracked object's count over `streams`. Linear in the streams plus their
    /// subscriptions, once per report (every few seconds), never per request.
    pub fn count(&self, streams: &[StreamState]) -> Vec<ObjectCount> {
        // Subscribers per Service key that some TrafficPolicy targets.
        let mut subscribers: HashMap<&str, Vec<&StreamState>> = self
            .objects
            .values()
            .filter_map(|t| match &t.scope {
                Scope::Subscribers(key) => Some((key.as_str(), Vec::new())),
                _ => None,
            })
            .collect();
        let mut by_namespace: HashMap<&str, Vec<&StreamState>> = HashMap::new();
        for s in streams {
            by_namespace.entry(&s.namespace).or_default().push(s);
            for key in &s.subscriptions {
                if let Some(list) = subscribers.get_mut(key.as_str()) {
                    list.push(s);
                }
            }
        }
        let mut out = Vec::with_capacity(self.objects.len());
        for (object, t) in &self.objects {
            let (total, updated) = match &t.scope {
                Scope::AllSettings => (
                    streams.len(),
                    streams
                        .iter()
                        .filter(|s| self.settings_applied(s, t.since))
                        .count(),
                ),
                Scope::NamespaceSettings(ns) => {
                    let list = by_namespace.get(ns.as_str()).map_or(&[][..], Vec::as_slice);
                    (
                        list.len(),
                        list.iter()
                            .filter(|s| self.settings_applied(s, t.since))
                            .count(),
                    )
                }
                Scope::Subscribers(key) => {
                    let list = subscribers.get(key.as_str()).map_or(&[][..], Vec::as_slice);
                    (
                        list.len(),
                        list.iter().filter(|s| s.acked >= t.since).count(),
                    )
                }
            };
            out.push(ObjectCount {
                object: object.clone(),
                generation: t.generation,
                updated: updated as u64,
                total: total as u64,
            });
        }
        out
    }

    /// When compile `seq` was observed (the oldest known time for older ones).
    fn time_of(&self, seq: u64) -> Option<Timestamp> {
        let i = self.times.partition_point(|(s, _)| *s < seq);
        self.times.get(i).or(self.times.back()).map(|(_, t)| *t)
    }

    /// The streams that miss something this replica published (a view generation not yet
    /// acknowledged, or ConfigMap settings that are not their namespace's current ones),
    /// longest behind first, at most `limit`; and how many there are in all. `pod_of` names
    /// the pod behind an address.
    pub fn lagging(
        &self,
        streams: &[StreamState],
        pod_of: impl Fn(IpAddr) -> Option<String>,
        limit: usize,
    ) -> (Vec<LaggingProxy>, usize) {
        let mut all: Vec<LaggingProxy> = Vec::new();
        let mut n = 0;
        for s in streams {
            let view_behind = s.acked < self.latest;
            // A namespace without a current digest (not meshed any more) has nothing to apply.
            let has_settings = self
                .settings
                .get(&s.namespace)
                .is_some_and(|h| h.back().is_some_and(|b| b.until.is_none()));
            let settings_current = !has_settings || self.settings_current(s);
            if !view_behind && settings_current {
                continue;
            }
            n += 1;
            let mut since_seq = if view_behind { s.acked + 1 } else { u64::MAX };
            if !settings_current {
                since_seq = since_seq.min(self.settings_since(s));
            }
            let behind = self.time_of(since_seq).unwrap_or_default();
            let behind_since = match s.connected {
                Some(c) if c > behind => c,
                _ => behind,
            };
            all.push(LaggingProxy {
                namespace: s.namespace.clone(),
                pod: s.addr.and_then(&pod_of).unwrap_or_default(),
                identity: s.identity.clone(),
                acked: s.acked,
                latest: self.latest,
                settings_current,
                connected_since: s.connected,
                behind_since,
            });
        }
        all.sort_by(|a, b| {
            (a.behind_since, &a.namespace, &a.pod).cmp(&(b.behind_since, &b.namespace, &b.pod))
        });
        all.truncate(limit);
        (all, n)
    }

    /// The first compile of the namespace's current settings, which a stream that does not run
    /// them has been missing since.
    fn settings_since(&self, s: &StreamState) -> u64 {
        let Some(history) = self.settings.get(&s.namespace) else {
            return self.latest;
        };
        let previous_until = history
            .iter()
            .filter_map(|seen| seen.until)
            .max()
            .unwrap_or(0);
        previous_until + 1
    }
}
