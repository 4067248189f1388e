//! The subscription registry: per proxy stream, what it subscribed to and what it still has
//! to be told. Pure and synchronous; the server edge wraps it in a mutex and wakes streams.
//!
//! # Bounded, latest-wins
//! A stream's pending work is a set of Service keys, not a queue of messages: when a Service
//! changes twice before the stream is flushed, the second change replaces nothing, the key is
//! already pending, and the flush sends the state of the current view. So what a slow proxy
//! costs the operator is bounded by its subscriptions ([`MAX_SUBSCRIPTIONS`]) whatever the
//! churn, and never by the rate of change. Past [`MAX_PENDING`] keys the set is dropped and the
//! stream is marked for a fresh snapshot of everything it holds (one flag instead of the keys).
//!
//! # A change costs what it touches
//! The registry keeps, per Service key, the streams subscribed to it, and per namespace its
//! streams. [`Registry::update`] follows a compile in place ([`View::follow`]) and re-checks
//! only the streams subscribed to a Service that changed (or of a namespace whose import scope
//! changed): an endpoint change among 1 000 streams of 20 subscriptions each looks at the two
//! or three streams that hold that Service, not at 20 000 subscriptions. Streams an update
//! does not concern are not woken and get no message; a stream counts as up to date
//! ([`Propagation`]) when it acknowledged a generation at least as new as the last change it
//! was sent, which is what "applied the current view" means for what it subscribed to.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use trellis_proxy::discovery::{MAX_SUBSCRIPTIONS, ServerMessage, Target};

use super::view::View;
use crate::compiler::Output;

/// Keys a stream may have pending before it is switched to a fresh snapshot.
pub const MAX_PENDING: usize = 256;

/// A stream's handle in the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(u64);

#[derive(Debug, Default)]
struct Pending {
    keys: BTreeSet<String>,
    unknown: Vec<Target>,
    /// Send every subscription's state (overflow).
    resync: bool,
    /// Send `Synced` (a new view was published since the last flush).
    synced: bool,
}

impl Pending {
    fn mark(&mut self, key: &str) {
        if self.resync || self.keys.contains(key) {
            return;
        }
        if self.keys.len() >= MAX_PENDING {
            self.keys.clear();
            self.resync = true;
        } else {
            self.keys.insert(key.to_string());
        }
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.unknown.is_empty() && !self.resync && !self.synced
    }
}

#[derive(Debug)]
struct Stream {
    /// From the client certificate's SPIFFE ID, never from the request.
    namespace: String,
    /// Subscribed Service keys (`name.namespace`).
    subscriptions: BTreeSet<String>,
    /// Targets asked for before the first view existed, resolved when it arrives.
    unresolved: Vec<Target>,
    pending: Pending,
    acked: u64,
    /// The generation of the last view that gave this stream something to send: it is up to
    /// date once it acknowledged that generation (or a later one).
    owed: u64,
    /// Who is at the other end, for propagation reports (`None` for streams opened by
    /// [`Registry::open`] alone).
    peer: Option<Peer>,
    /// The ConfigMap settings digest the proxy reported ([`Registry::loaded`]).
    settings: Option<String>,
    /// The ConfigMap policies digest the proxy reported ([`Registry::loaded`]).
    policies: Option<String>,
}

impl Stream {
    /// The view generation whose state this stream's proxy holds for everything it subscribed
    /// to: `latest` once it acknowledged the last change it was sent and nothing waits to be
    /// sent (updates that did not concern it are not sent, so its own ack stays older), else
    /// what it acknowledged.
    fn applied(&self, latest: u64) -> u64 {
        if self.acked >= self.owed && self.pending.is_empty() {
            latest.max(self.acked)
        } else {
            self.acked
        }
    }
}

/// Who a stream's proxy is: from its certificate and its connection, never from a message.
#[derive(Clone, Debug, PartialEq)]
pub struct Peer {
    pub identity: String,
    pub addr: std::net::IpAddr,
    pub connected: jiff::Timestamp,
}

/// Every stream of this server.
#[derive(Debug, Default)]
pub struct Registry {
    view: Option<Arc<View>>,
    streams: HashMap<StreamId, Stream>,
    /// Service key -> the streams subscribed to it (the reverse of `Stream::subscriptions`).
    subscribers: HashMap<String, BTreeSet<StreamId>>,
    /// Namespace -> its streams (an import scope change concerns all of them).
    by_namespace: HashMap<String, BTreeSet<StreamId>>,
    /// Streams with targets asked for before the first view.
    waiting: BTreeSet<StreamId>,
    next_id: u64,
}

fn index_add(index: &mut HashMap<String, BTreeSet<StreamId>>, key: &str, id: StreamId) {
    match index.get_mut(key) {
        Some(ids) => {
            ids.insert(id);
        }
        None => {
            index.insert(key.to_string(), BTreeSet::from([id]));
        }
    }
}

fn index_remove(index: &mut HashMap<String, BTreeSet<StreamId>>, key: &str, id: StreamId) {
    if let Some(ids) = index.get_mut(key) {
        ids.remove(&id);
        if ids.is_empty() {
            index.remove(key);
        }
    }
}

/// How many streams applied the current view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Propagation {
    pub generation: u64,
    pub updated: usize,
    pub total: usize,
}

impl Registry {
    pub fn view(&self) -> Option<&Arc<View>> {
        self.view.as_ref()
    }

    /// A new stream for a proxy of `namespace` (taken from its certificate).
    pub fn open(&mut self, namespace: &str) -> StreamId {
        self.next_id += 1;
        let id = StreamId(self.next_id);
        self.streams.insert(
            id,
            Stream {
                namespace: namespace.to_string(),
                subscriptions: BTreeSet::new(),
                unresolved: Vec::new(),
                pending: Pending::default(),
                acked: 0,
                owed: 0,
                peer: None,
                settings: None,
                policies: None,
            },
        );
        index_add(&mut self.by_namespace, namespace, id);
        id
    }

    pub fn close(&mut self, id: StreamId) {
        let Some(stream) = self.streams.remove(&id) else {
            return;
        };
        for key in &stream.subscriptions {
            index_remove(&mut self.subscribers, key, id);
        }
        index_remove(&mut self.by_namespace, &stream.namespace, id);
        self.waiting.remove(&id);
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Adds subscriptions; returns whether the stream has something to send. Targets past
    /// [`MAX_SUBSCRIPTIONS`] are answered `Unknown` (the proxy keeps its old behaviour for
    /// them) rather than held.
    pub fn subscribe(&mut self, id: StreamId, targets: Vec<Target>) -> bool {
        let Some(stream) = self.streams.get_mut(&id) else {
            return false;
        };
        for target in targets {
            let held = stream.subscriptions.len() + stream.unresolved.len();
            let Some(view) = self.view.as_ref() else {
                if held < MAX_SUBSCRIPTIONS && !stream.unresolved.contains(&target) {
                    stream.unresolved.push(target);
                    self.waiting.insert(id);
                }
                continue;
            };
            match view.resolve(&target, &stream.namespace) {
                Some(key) if stream.subscriptions.contains(&key) => stream.pending.mark(&key),
                Some(key) if held < MAX_SUBSCRIPTIONS => {
                    stream.pending.mark(&key);
                    index_add(&mut self.subscribers, &key, id);
                    stream.subscriptions.insert(key);
                }
                _ => {
                    if stream.pending.unknown.len() < MAX_SUBSCRIPTIONS {
                        stream.pending.unknown.push(target);
                    }
                }
            }
        }
        if stream.pending.is_empty() {
            return false;
        }
        stream.owed = self.view.as_ref().map_or(0, |v| v.generation());
        true
    }

    /// Records the generation a proxy applied.
    pub fn ack(&mut self, id: StreamId, generation: u64) {
        if let Some(s) = self.streams.get_mut(&id) {
            // A proxy cannot have applied a view that was never published.
            let latest = self.view.as_ref().map_or(0, |v| v.generation());
            s.acked = s.acked.max(generation.min(latest));
        }
    }

    /// Publishes a view built from scratch; returns the streams to wake. Every subscription
    /// of every stream is compared with the previous view (this is the path for a view that
    /// does not follow the current one; [`Self::update`] is the incremental one), and every
    /// stream gets a `Synced` with the new generation.
    pub fn publish(&mut self, view: Arc<View>) -> Vec<StreamId> {
        let previous = self.view.replace(view.clone());
        let generation = view.generation();
        self.resolve_waiting(&view);
        let mut wake = Vec::with_capacity(self.streams.len());
        for (id, stream) in &mut self.streams {
            if let Some(previous) = &previous {
                for key in &stream.subscriptions {
                    if view.changed(previous, key, &stream.namespace) {
                        stream.pending.mark(key);
                    }
                }
            }
            stream.pending.synced = true;
            stream.owed = generation;
            wake.push(*id);
        }
        wake.sort();
        wake
    }

    /// Moves to the compile `out` as view `generation`, at the cost of what changed: the view
    /// is re-indexed for the Services the compiler rebuilt, and only the streams subscribed to
    /// one of them (or of a namespace whose import scope changed) are checked, marked and
    /// returned to be woken. Falls back to [`Self::publish`] of a fresh view when `out` does
    /// not follow the current view's compile.
    pub fn update(&mut self, out: &Output, generation: u64) -> Vec<StreamId> {
        let followed = self.view.as_mut().and_then(|current| {
            let before = current.before();
            // In place unless a caller still holds this view (then it is copied once).
            let changes = Arc::make_mut(current).follow(out, generation)?;
            Some((before, changes))
        });
        let Some((before, changes)) = followed else {
            return match View::new(out, generation) {
                Some(view) => self.publish(Arc::new(view)),
                None => Vec::new(),
            };
        };
        let Some(view) = self.view.clone() else {
            return Vec::new();
        };
        let mut wake: BTreeSet<StreamId> = self.resolve_waiting(&view).into_iter().collect();
        let mut check = |id: StreamId, key: &str, streams: &mut HashMap<StreamId, Stream>| {
            let Some(stream) = streams.get_mut(&id) else {
                return;
            };
            if view.changed_since(&before, key, &stream.namespace) {
                stream.pending.mark(key);
                stream.pending.synced = true;
                stream.owed = generation;
                wake.insert(id);
            }
        };
        for key in &changes.services {
            for id in self.subscribers.get(key).into_iter().flatten() {
                check(*id, key, &mut self.streams);
            }
        }
        for ns in &changes.namespaces {
            for id in self.by_namespace.get(ns).into_iter().flatten() {
                let Some(stream) = self.streams.get(id) else {
                    continue;
                };
                let keys: Vec<String> = stream.subscriptions.iter().cloned().collect();
                for key in keys {
                    check(*id, &key, &mut self.streams);
                }
            }
        }
        wake.into_iter().collect()
    }

    /// Answers the targets streams asked for before the first view; returns those streams.
    fn resolve_waiting(&mut self, view: &View) -> Vec<StreamId> {
        let waiting = std::mem::take(&mut self.waiting);
        for id in &waiting {
            let Some(stream) = self.streams.get_mut(id) else {
                continue;
            };
            for target in std::mem::take(&mut stream.unresolved) {
                match view.resolve(&target, &stream.namespace) {
                    Some(key) => {
                        stream.pending.mark(&key);
                        index_add(&mut self.subscribers, &key, *id);
                        stream.subscriptions.insert(key);
                    }
                    None => stream.pending.unknown.push(target),
                }
            }
            stream.pending.synced = true;
            stream.owed = view.generation();
        }
        waiting.into_iter().collect()
    }

    /// Drains what a stream has to send, rendered from the current view (latest state only).
    pub fn take(&mut self, id: StreamId) -> Vec<ServerMessage> {
        let (Some(stream), Some(view)) = (self.streams.get_mut(&id), self.view.as_ref()) else {
            return Vec::new();
        };
        let pending = std::mem::take(&mut stream.pending);
        let keys: Vec<String> = if pending.resync {
            stream.subscriptions.iter().cloned().collect()
        } else {
            pending.keys.into_iter().collect()
        };
        let mut out = Vec::with_capacity(keys.len() + pending.unknown.len() + 1);
        for key in keys {
            let service = view.service(&key, &stream.namespace);
            if service.is_none() {
                // Gone or hidden: the proxy drops it, and a later connection asks again.
                stream.subscriptions.remove(&key);
                index_remove(&mut self.subscribers, &key, id);
            }
            out.push(ServerMessage::Service {
                key,
                service: service.map(Box::new),
            });
        }
        out.extend(
            pending
                .unknown
                .into_iter()
                .map(|target| ServerMessage::Unknown { target }),
        );
        if pending.synced || !out.is_empty() {
            out.push(ServerMessage::Synced {
                generation: view.generation(),
            });
        }
        out
    }

    /// Pending keys of a stream (tests and metrics).
    pub fn pending_len(&self, id: StreamId) -> usize {
        self.streams.get(&id).map_or(0, |s| s.pending.keys.len())
    }

    /// Subscriptions of a stream.
    pub fn subscriptions(&self, id: StreamId) -> Vec<String> {
        self.streams
            .get(&id)
            .map(|s| s.subscriptions.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The streams subscribed to a Service key (tests and tools).
    pub fn subscribers(&self, key: &str) -> Vec<StreamId> {
        self.subscribers
            .get(key)
            .map(|ids| ids.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Records who a stream's proxy is (its certificate's ID and its address).
    pub fn set_peer(&mut self, id: StreamId, peer: Peer) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.peer = Some(peer);
        }
    }

    /// Records the settings and policies digests of the ConfigMap config a proxy serves
    /// from. Bounded: a digest is 32 hex characters; anything longer is no digest and is
    /// dropped.
    pub fn loaded(&mut self, id: StreamId, settings: String, policies: Option<String>) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.settings = (settings.len() <= 64).then_some(settings);
            s.policies = policies.filter(|p| p.len() <= 64);
        }
    }

    /// A copy of what every stream reported, for the propagation count.
    pub fn stream_states(&self) -> Vec<crate::propagation::StreamState> {
        let latest = self.view.as_ref().map_or(0, |v| v.generation());
        self.streams
            .values()
            .map(|s| crate::propagation::StreamState {
                namespace: s.namespace.clone(),
                identity: s
                    .peer
                    .as_ref()
                    .map(|p| p.identity.clone())
                    .unwrap_or_default(),
                addr: s.peer.as_ref().map(|p| p.addr),
                connected: s.peer.as_ref().map(|p| p.connected),
                acked: s.applied(latest),
                settings: s.settings.clone(),
                policies: s.policies.clone(),
                subscriptions: s.subscriptions.iter().cloned().collect(),
            })
            .collect()
    }

    /// How many streams hold the current view for everything they subscribed to (they
    /// acknowledged the last change they were sent).
    pub fn propagation(&self) -> Propagation {
        let generation = self.view.as_ref().map_or(0, |v| v.generation());
        Propagation {
            generation,
            updated: self
                .streams
                .values()
                .filter(|s| s.applied(generation) >= generation)
                .count(),
            total: self.streams.len(),
        }
    }
}
