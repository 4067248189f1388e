//! What the discovery client knows, as plain data: the Services the operator pushed, what was
//! asked and is not answered yet, and what the operator said it does not know. Pure and
//! synchronous, so every rule here is tested without a stream; [`super::resolver`] is the edge
//! that owns the stream, publishes the cache and wakes the connections waiting for an answer.
//!
//! # When a connection stops waiting
//! A connection to an unknown destination waits until the data path can route it, or until
//! the operator has answered its target and everything that answer depends on (the backends
//! of a split) and the answer is in the published snapshot. "Answered" is tracked per target:
//! a `Service` target by its key, an `Address` target by the Service whose cluster IPs or
//! endpoints hold that address (the operator resolves it the same way), and an `Unknown` by
//! its target. Every answer bumps [`Cache::answers`]; the published cache carries the count it
//! includes, so a waiter never returns between an answer and its publication.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::proto::{MAX_SUBSCRIPTIONS, ServerMessage, Target};
use crate::config::{OutboundService, ProxyConfig};

/// How long an `Unknown` answer is remembered: connections to non-mesh destinations (the
/// internet, a database outside the cluster) do not ask again on every connection.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// How long a question counts as outstanding. An answer the client cannot match to its
/// question (it should not happen, but the operator is another program) must not make every
/// later connection to that destination wait.
pub const ANSWER_TTL: Duration = Duration::from_secs(2);

/// The client's knowledge.
#[derive(Debug, Default)]
pub struct Cache {
    /// Pushed Services by `name.namespace`.
    services: BTreeMap<String, OutboundService>,
    /// Everything asked for (sent again on every new stream).
    subscribed: HashSet<Target>,
    /// Asked on the current stream, not answered yet, and since when.
    awaiting: HashMap<Target, Instant>,
    /// Of `awaiting`, the backends of learned splits: until they are answered, the split's
    /// Service is held back (see [`overlay`]) and connections to it wait.
    backends: HashSet<Target>,
    /// `Unknown` answers and when they arrived.
    unknown: HashMap<Target, Instant>,
    /// Answers applied so far.
    answers: u64,
}

/// What to do about a target a connection asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Ask {
    /// New: send it on the stream and wait.
    Send,
    /// Asked before: wait if its answer is still outstanding.
    Asked,
    /// The operator said it knows nothing of it, recently: do not wait.
    Unknown,
    /// The subscription limit is reached: do not wait.
    Full,
}

/// What applying one message asks of the edge.
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    /// A batch is complete: publish the cache and acknowledge this generation.
    pub synced: Option<u64>,
    /// Subscribe to these too (backends of a split just learned).
    pub subscribe: Vec<Target>,
}

impl Cache {
    /// The Services learned so far.
    pub fn services(&self) -> &BTreeMap<String, OutboundService> {
        &self.services
    }

    /// Answers applied so far; a published cache is current for waiters once it includes all.
    pub fn answers(&self) -> u64 {
        self.answers
    }

    /// A connection asks about `target`; on [`Ask::Send`] the caller must send it (and call
    /// [`Cache::unsend`] if it cannot).
    pub fn ask(&mut self, target: &Target, now: Instant) -> Ask {
        if let Some(at) = self.unknown.get(target) {
            if now.duration_since(*at) < NEGATIVE_TTL {
                return Ask::Unknown;
            }
            self.unknown.remove(target);
        }
        if self.subscribed.contains(target) {
            return Ask::Asked;
        }
        if self.subscribed.len() >= MAX_SUBSCRIPTIONS {
            return Ask::Full;
        }
        self.subscribed.insert(target.clone());
        self.awaiting.insert(target.clone(), now);
        Ask::Send
    }

    /// A target from [`Cache::ask`] could not be queued: forget it, so a later connection
    /// asks again instead of waiting for an answer that cannot come.
    pub fn unsend(&mut self, target: &Target) {
        self.subscribed.remove(target);
        self.awaiting.remove(target);
    }

    /// A new stream: everything held is asked again (the operator replica may be another
    /// one, or restarted, and knows nothing of this proxy) and is outstanding until answered.
    pub fn resubscribe(&mut self, now: Instant) -> Vec<Target> {
        let held: BTreeSet<Target> = self
            .subscribed
            .iter()
            .cloned()
            .chain(self.services.keys().map(|k| Target::Service(k.clone())))
            .collect();
        self.awaiting = held.iter().map(|t| (t.clone(), now)).collect();
        held.into_iter().collect()
    }

    /// The stream is gone: nothing is outstanding any more (connections stop waiting); what
    /// was learned stays and is served.
    pub fn disconnected(&mut self) {
        self.awaiting.clear();
        self.backends.clear();
    }

    /// Whether a connection waiting for `target` has nothing more to wait for, given that the
    /// snapshot the data path reads includes the first `published` answers.
    pub fn settled(&self, target: &Target, published: u64, now: Instant) -> bool {
        let outstanding = |t: &Target| {
            self.awaiting
                .get(t)
                .is_some_and(|at| now.duration_since(*at) < ANSWER_TTL)
        };
        published >= self.answers && !outstanding(target) && !self.backends.iter().any(outstanding)
    }

    /// Applies one message from the operator.
    pub fn apply(&mut self, msg: ServerMessage, now: Instant) -> Applied {
        let mut applied = Applied::default();
        match msg {
            ServerMessage::Service { key, service } => {
                self.answers += 1;
                let target = Target::Service(key.clone());
                self.answered(&target);
                match service {
                    Some(s) => {
                        for ip in addresses(&s) {
                            self.answered(&Target::Address(ip));
                        }
                        applied.subscribe = self.missing_backends(&s, now);
                        self.services.insert(key, *s);
                    }
                    None => {
                        self.services.remove(&key);
                        self.subscribed.remove(&target);
                    }
                }
            }
            ServerMessage::Unknown { target } => {
                self.answers += 1;
                self.answered(&target);
                self.subscribed.remove(&target);
                // A Service asked again after a reconnect may be gone (or hidden) by now: the
                // cache must not keep serving it (the next `Synced` publishes the removal).
                if let Target::Service(key) = &target {
                    self.services.remove(key);
                }
                self.unknown.insert(target, now);
            }
            ServerMessage::Synced { generation } => applied.synced = Some(generation),
        }
        applied
    }

    fn answered(&mut self, target: &Target) {
        self.awaiting.remove(target);
        self.backends.remove(target);
    }

    /// Split backends of `s` this proxy neither holds nor asked for, now subscribed (they are
    /// what the split routes to, so the proxy must know them: the operator lets a proxy see
    /// the backends of any split it may see).
    fn missing_backends(&mut self, s: &OutboundService, now: Instant) -> Vec<Target> {
        let mut out = Vec::new();
        for b in s.policy.iter().flat_map(|p| &p.split) {
            let target = Target::Service(b.service.clone());
            if b.service == s.key()
                || self.services.contains_key(&b.service)
                || self.subscribed.contains(&target)
                || self.subscribed.len() >= MAX_SUBSCRIPTIONS
            {
                continue;
            }
            self.subscribed.insert(target.clone());
            self.awaiting.insert(target.clone(), now);
            self.backends.insert(target.clone());
            out.push(target);
        }
        out
    }
}

/// The addresses a Service answers an `Address` question for: cluster IPs and endpoint IPs.
fn addresses(s: &OutboundService) -> impl Iterator<Item = IpAddr> + '_ {
    s.addresses.iter().copied().chain(
        s.ports
            .iter()
            .flat_map(|p| p.endpoints.iter().map(|e| e.address.ip())),
    )
}

/// The ConfigMap's config with the learned Services laid over it (a learned Service replaces
/// the ConfigMap's entry of the same name: it is newer). A learned Service whose split names a
/// backend that neither holds is left out (its backends are on their way, or the operator
/// does not know them): the data path keeps the ConfigMap's entry for it, or does not route
/// it yet, instead of refusing the whole merged config. `None` when nothing learned is usable.
pub fn overlay(
    file: &ProxyConfig,
    learned: &BTreeMap<String, OutboundService>,
) -> Option<ProxyConfig> {
    let file_keys: HashSet<String> = file.outbound.iter().map(OutboundService::key).collect();
    let mut usable: BTreeMap<&str, &OutboundService> =
        learned.iter().map(|(k, s)| (k.as_str(), s)).collect();
    // Leaving one out may strand another that splits to it: repeat until nothing changes
    // (split chains are short; each round removes at least one Service).
    loop {
        let known = |k: &str| usable.contains_key(k) || file_keys.contains(k);
        let stranded: Vec<&str> = usable
            .iter()
            .filter(|(_, s)| {
                s.policy
                    .iter()
                    .flat_map(|p| &p.split)
                    .any(|b| !known(&b.service))
            })
            .map(|(k, _)| *k)
            .collect();
        if stranded.is_empty() {
            break;
        }
        for k in stranded {
            tracing::debug!(service = k, "learned split waits for its backends");
            usable.remove(k);
        }
    }
    if usable.is_empty() {
        return None;
    }
    let mut cfg = file.clone();
    cfg.outbound
        .retain(|s| !usable.contains_key(s.key().as_str()));
    cfg.outbound.extend(usable.into_values().cloned());
    Some(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Endpoint, Protocol, ServicePort, TrafficPolicy, WeightedBackend};

    fn svc(name: &str, ip: &str) -> OutboundService {
        OutboundService {
            name: name.into(),
            namespace: "shop".into(),
            addresses: vec![ip.parse().unwrap()],
            ports: vec![ServicePort {
                port: 80,
                name: None,
                protocol: Protocol::Http1,
                endpoints: vec![Endpoint {
                    address: "10.1.0.7:8080".parse().unwrap(),
                    identity: None,
                    zone: None,
                }],
            }],
            identities: vec![],
            policy: None,
        }
    }

    fn split(mut s: OutboundService, backends: &[&str]) -> OutboundService {
        s.policy = Some(TrafficPolicy {
            split: backends
                .iter()
                .map(|b| WeightedBackend {
                    service: (*b).into(),
                    weight: 1,
                })
                .collect(),
            ..Default::default()
        });
        s
    }

    fn push(c: &mut Cache, s: OutboundService, now: Instant) -> Applied {
        c.apply(
            ServerMessage::Service {
                key: s.key(),
                service: Some(Box::new(s)),
            },
            now,
        )
    }

    #[test]
    fn a_question_is_outstanding_until_answered_and_published() {
        let now = Instant::now();
        let mut c = Cache::default();
        let by_ip = Target::Address("10.96.0.1".parse().unwrap());
        let by_endpoint = Target::Address("10.1.0.7".parse().unwrap());
        assert_eq!(c.ask(&by_ip, now), Ask::Send);
        assert_eq!(c.ask(&by_endpoint, now), Ask::Send);
        // A second connection to the same destination waits too, without asking again.
        assert_eq!(c.ask(&by_ip, now), Ask::Asked);
        assert!(!c.settled(&by_ip, c.answers(), now));
        push(&mut c, svc("web", "10.96.0.1"), now);
        // Answered, but not yet in the snapshot the data path reads.
        assert!(!c.settled(&by_ip, 0, now));
        assert!(c.settled(&by_ip, c.answers(), now));
        assert!(
            c.settled(&by_endpoint, c.answers(), now),
            "endpoint IPs answer too"
        );
        // An answer that never comes stops holding connections after a while.
        let lost = Target::Address("10.96.9.9".parse().unwrap());
        c.ask(&lost, now);
        assert!(!c.settled(&lost, c.answers(), now));
        assert!(c.settled(&lost, c.answers(), now + ANSWER_TTL));
    }

    #[test]
    fn unknown_is_remembered_for_a_while_and_drops_a_stale_service() {
        let now = Instant::now();
        let mut c = Cache::default();
        let t = Target::Service("db.shop".into());
        push(&mut c, svc("db", "10.96.0.2"), now);
        c.ask(&t, now);
        c.apply(ServerMessage::Unknown { target: t.clone() }, now);
        assert!(c.services().is_empty());
        assert_eq!(c.ask(&t, now), Ask::Unknown);
        assert_eq!(c.ask(&t, now + NEGATIVE_TTL), Ask::Send);
    }

    #[test]
    fn a_learned_split_subscribes_its_backends_and_waits_for_them() {
        let now = Instant::now();
        let mut c = Cache::default();
        let web = Target::Service("web.shop".into());
        c.ask(&web, now);
        let applied = push(
            &mut c,
            split(svc("web", "10.96.0.1"), &["web.shop", "v2.shop", "v3.shop"]),
            now,
        );
        assert_eq!(
            applied.subscribe,
            vec![
                Target::Service("v2.shop".into()),
                Target::Service("v3.shop".into())
            ],
            "the split's own Service is not asked again"
        );
        assert!(!c.settled(&web, c.answers(), now), "backends outstanding");
        push(&mut c, svc("v2", "10.96.0.2"), now);
        assert!(!c.settled(&web, c.answers(), now));
        c.apply(
            ServerMessage::Unknown {
                target: Target::Service("v3.shop".into()),
            },
            now,
        );
        assert!(c.settled(&web, c.answers(), now));
        // A new stream asks for all of it again.
        let again = c.resubscribe(now);
        assert!(again.contains(&web) && again.contains(&Target::Service("v2.shop".into())));
        assert!(!c.settled(&web, c.answers(), now));
        c.disconnected();
        assert!(c.settled(&web, c.answers(), now));
    }

    #[test]
    fn the_overlay_holds_back_a_split_until_its_backends_are_known() {
        let file: ProxyConfig = serde_json::from_value(serde_json::json!({
            "version": crate::config::CONFIG_VERSION,
            "namespace": "shop",
            "mesh": {"trustDomain": "cluster.local"},
            "outbound": [svc("local", "10.96.0.9")],
        }))
        .unwrap();
        let mut learned = BTreeMap::new();
        learned.insert("a.shop".into(), svc("a", "10.96.0.1"));
        learned.insert(
            "web.shop".into(),
            split(svc("web", "10.96.0.2"), &["v1.shop", "local.shop"]),
        );
        // `top` splits to `web`, which is itself held back: both wait.
        learned.insert(
            "top.shop".into(),
            split(svc("top", "10.96.0.3"), &["web.shop"]),
        );
        let keys = |c: &ProxyConfig| c.outbound.iter().map(|s| s.key()).collect::<Vec<_>>();
        let cfg = overlay(&file, &learned).unwrap();
        assert_eq!(keys(&cfg), ["local.shop", "a.shop"]);
        assert!(cfg.validate().is_ok());
        learned.insert("v1.shop".into(), svc("v1", "10.96.0.4"));
        let cfg = overlay(&file, &learned).unwrap();
        assert_eq!(
            keys(&cfg),
            ["local.shop", "a.shop", "top.shop", "v1.shop", "web.shop"]
        );
        assert!(cfg.validate().is_ok());
        assert!(overlay(&file, &BTreeMap::new()).is_none());
    }
}
