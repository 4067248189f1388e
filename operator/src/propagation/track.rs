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
//! - **TrafficPolicy** reaches a proxy two ways, and each proxy is counted by the way it holds
//!   the policy. A proxy subscribed to the target Service gets it pushed with the policy
//!   attached, and has applied it once it acknowledged a view generation ≥ `since`. A proxy
//!   whose ConfigMap lists the Service (a full table lists every visible Service, so such
//!   proxies never subscribe; a bootstrap set lists the namespace's own; under the default
//!   `Auto` each namespace has one or the other, [`crate::compiler::Output::bootstrapped`])
//!   holds the policy from its ConfigMap: it reports the policies digest of the config it
//!   loaded ([`trellis_proxy::config::ProxyConfig::policies_digest`]), the compiler computes
//!   the same digest per namespace over the policy-bearing Services that namespace's ConfigMap
//!   lists ([`crate::compiler::Output::policies`], cheap: no table is rendered), and the proxy
//!   has applied the policy when its digest was current at or after `since`, the rule the
//!   settings follow. A proxy that reports no policies digest (older than the field) counts
//!   as not applied.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::lag::{LaggingProxy, Standing, classify};
use crate::compiler::{Output, Snapshot};

/// Digests remembered per namespace. Settings change only on a Mesh or PeerAuthentication edit,
/// and a proxy catches up within the kubelet's sync (a minute or two): a handful is plenty.
pub const SETTINGS_HISTORY: usize = 8;
/// Compile times remembered, for "behind since": at most one per [`TIMES_RESOLUTION`], so they
/// cover at least an hour however fast the compiles come (a compile every 100 ms under
/// endpoint churn would otherwise push a stuck proxy's lag out of a per-compile history within
/// a couple of minutes, and it would never pass `--lag-threshold`). Older lag is dated at the
/// oldest time known, still over an hour ago.
pub const TIMES_HISTORY: usize = 3600;
/// The resolution of those times: a compile within this of the last one remembered is dated
/// at that one, so a lag is dated at most this much early (over-reported, never hidden).
pub const TIMES_RESOLUTION: std::time::Duration = std::time::Duration::from_secs(1);

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
    /// Proxies holding this Service key (`name.namespace`): subscribed to it (over the
    /// stream), or listing it in their ConfigMap (through the policies digest).
    Policy(String),
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
    /// The ConfigMap policies digest reported (`None`: not reported, or a proxy older than
    /// the field).
    pub policies: Option<String>,
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

/// Per-replica bookkeeping across compiles. Pure: fed by [`Tracker::observe`], read by
/// [`Tracker::count`] and [`Tracker::lagging`] (classified by [`super::lag`]).
#[derive(Debug, Default)]
pub struct Tracker {
    latest: u64,
    objects: BTreeMap<ObjectRef, Tracked>,
    settings: HashMap<String, VecDeque<Seen>>,
    /// The same history for each namespace's ConfigMap policies digest.
    policies: HashMap<String, VecDeque<Seen>>,
    /// Per namespace, the Service keys with a policy that its ConfigMap lists (latest compile).
    listed: HashMap<String, Arc<BTreeSet<String>>>,
    times: VecDeque<(u64, Timestamp)>,
}

/// Records `digest` as namespace's current one at compile `seq` in `history`.
fn record(history: &mut VecDeque<Seen>, digest: &str, seq: u64) {
    if history
        .back()
        .is_some_and(|s| s.until.is_none() && s.digest == digest)
    {
        return;
    }
    if let Some(current) = history.back_mut().filter(|s| s.until.is_none()) {
        current.until = Some(seq.saturating_sub(1));
    }
    history.retain(|s| s.digest != digest);
    history.push_back(Seen {
        digest: digest.to_string(),
        until: None,
    });
    while history.len() > SETTINGS_HISTORY {
        history.pop_front();
    }
}

/// Where a reported `digest` stands in a namespace's `history`.
fn standing(history: &VecDeque<Seen>, digest: Option<&String>) -> Standing {
    let Some(digest) = digest else {
        return Standing::Unknown;
    };
    match history.iter().find(|seen| seen.digest == *digest) {
        Some(Seen { until: None, .. }) => Standing::Current,
        Some(Seen {
            until: Some(until), ..
        }) => Standing::Superseded { at: until + 1 },
        None => Standing::Unknown,
    }
}

/// Whether `digest` was current at or after compile `since` according to `history`.
fn applied(history: Option<&VecDeque<Seen>>, digest: Option<&String>, since: u64) -> bool {
    let (Some(digest), Some(history)) = (digest, history) else {
        return false;
    };
    history
        .iter()
        .find(|seen| seen.digest == *digest)
        .is_some_and(|seen| seen.until.is_none_or(|until| until >= since))
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
        let due = self.times.back().is_none_or(|(s, t)| {
            *s < seq
                && now
                    .duration_since(*t)
                    .try_into()
                    .is_ok_and(|d: std::time::Duration| d >= TIMES_RESOLUTION)
        });
        if due {
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
                (tp.metadata.generation.unwrap_or(0), Scope::Policy(key)),
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
            record(self.settings.entry(ns.clone()).or_default(), digest, seq);
        }
        self.settings.retain(|ns, _| out.settings.contains_key(ns));
        for (ns, listed) in &out.policies {
            record(
                self.policies.entry(ns.clone()).or_default(),
                &listed.digest,
                seq,
            );
        }
        self.policies.retain(|ns, _| out.policies.contains_key(ns));
        self.listed = out
            .policies
            .iter()
            .map(|(ns, l)| (ns.clone(), l.services.clone()))
            .collect();
    }

    /// Whether a stream runs settings that were current at or after compile `since`.
    fn settings_applied(&self, s: &StreamState, since: u64) -> bool {
        applied(self.settings.get(&s.namespace), s.settings.as_ref(), since)
    }

    /// Whether a stream's ConfigMap carries the policies that were current at or after
    /// compile `since`.
    fn policies_applied(&self, s: &StreamState, since: u64) -> bool {
        applied(self.policies.get(&s.namespace), s.policies.as_ref(), since)
    }

    /// Every tracked object's count over `streams`. Linear in the streams plus their
    /// subscriptions, once per report (every few seconds), never per request.
    pub fn count(&self, streams: &[StreamState]) -> Vec<ObjectCount> {
        // Subscribers per Service key that some TrafficPolicy targets.
        let mut subscribers: HashMap<&str, Vec<&StreamState>> = self
            .objects
            .values()
            .filter_map(|t| match &t.scope {
                Scope::Policy(key) => Some((key.as_str(), Vec::new())),
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
                Scope::Policy(key) => {
                    let list = subscribers.get(key.as_str()).map_or(&[][..], Vec::as_slice);
                    let mut total = list.len();
                    let mut updated = list.iter().filter(|s| s.acked >= t.since).count();
                    // Proxies holding the Service from their ConfigMap (and not subscribed to
                    // it, which the stream's copy would override).
                    for (ns, streams) in &by_namespace {
                        if !self.listed.get(*ns).is_some_and(|l| l.contains(key)) {
                            continue;
                        }
                        for s in streams {
                            if s.subscriptions.iter().any(|k| k == key) {
                                continue;
                            }
                            total += 1;
                            updated += usize::from(self.policies_applied(s, t.since));
                        }
                    }
                    (total, updated)
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

    /// When compile `seq` was observed: the time of the last compile remembered at or before it
    /// (at most [`TIMES_RESOLUTION`] early), or the oldest time known for older ones.
    fn time_of(&self, seq: u64) -> Option<Timestamp> {
        let i = self.times.partition_point(|(s, _)| *s <= seq);
        self.times.get(i.saturating_sub(1)).map(|(_, t)| *t)
    }

    /// What one stream misses of what this replica published, per aspect (see
    /// [`super::lag`]): a view generation not acknowledged, its namespace's current ConfigMap
    /// settings, or the TrafficPolicies that ConfigMap carries.
    pub fn behind(&self, s: &StreamState) -> super::lag::Behind {
        // A namespace without a digest (not meshed any more) has nothing to apply.
        let settings = self
            .settings
            .get(&s.namespace)
            .map(|h| standing(h, s.settings.as_ref()));
        // (Whether they matter is asked only of a proxy that does not run the current ones.)
        let policies = self
            .policies
            .get(&s.namespace)
            .map(|h| standing(h, s.policies.as_ref()))
            .filter(|st| *st == Standing::Current || self.policies_matter(s));
        classify(s.acked, self.latest, settings, policies)
    }

    /// Whether the TrafficPolicies a stream's ConfigMap carries decide anything for it. Not
    /// when the ConfigMap carries none and the proxy reports no digest (older than the
    /// field), nor when the stream subscribed to every policy-bearing Service the ConfigMap
    /// lists (the stream's copy overrides the ConfigMap's; `count` skips those the same way).
    /// A proxy that reports a digest while none is listed is compared: a digest of policies
    /// since deleted is a deleted policy still in force.
    fn policies_matter(&self, s: &StreamState) -> bool {
        let listed = self.listed.get(&s.namespace).map(|l| l.as_ref());
        match listed {
            Some(l) if !l.is_empty() => !l.iter().all(|k| s.subscriptions.contains(k)),
            _ => s.policies.is_some(),
        }
    }

    /// The streams that miss something this replica published (see [`Self::behind`]), longest
    /// behind first, at most `limit`; and how many there are in all. `pod_of` names the pod
    /// behind an address.
    pub fn lagging(
        &self,
        streams: &[StreamState],
        pod_of: impl Fn(IpAddr) -> Option<String>,
        limit: usize,
    ) -> (Vec<LaggingProxy>, usize) {
        let mut all: Vec<LaggingProxy> = Vec::new();
        let mut n = 0;
        for s in streams {
            let Some(stale) = self.behind(s).dated(|seq| self.time_of(seq), s.connected) else {
                continue;
            };
            n += 1;
            if limit == 0 {
                continue;
            }
            all.push(LaggingProxy {
                namespace: s.namespace.clone(),
                pod: s.addr.and_then(&pod_of).unwrap_or_default(),
                identity: s.identity.clone(),
                acked: s.acked,
                latest: self.latest,
                behind_since: stale.oldest().unwrap_or_default(),
                stale,
                connected_since: s.connected,
            });
        }
        all.sort_by(|a, b| {
            (a.behind_since, &a.namespace, &a.pod).cmp(&(b.behind_since, &b.namespace, &b.pod))
        });
        all.truncate(limit);
        (all, n)
    }
}
