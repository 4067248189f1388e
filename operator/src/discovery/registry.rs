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

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use trellis_proxy::discovery::{MAX_SUBSCRIPTIONS, ServerMessage, Target};

use super::view::View;

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
    /// Who is at the other end, for propagation reports (`None` for streams opened by
    /// [`Registry::open`] alone).
    peer: Option<Peer>,
    /// The ConfigMap settings digest the proxy reported ([`Registry::loaded`]).
    settings: Option<String>,
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
    next_id: u64,
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
                peer: None,
                settings: None,
            },
        );
        id
    }

    pub fn close(&mut self, id: StreamId) {
        self.streams.remove(&id);
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
                }
                continue;
            };
            match view.resolve(&target, &stream.namespace) {
                Some(key) if stream.subscriptions.contains(&key) => stream.pending.mark(&key),
                Some(key) if held < MAX_SUBSCRIPTIONS => {
                    stream.pending.mark(&key);
                    stream.subscriptions.insert(key);
                }
                _ => {
                    if stream.pending.unknown.len() < MAX_SUBSCRIPTIONS {
                        stream.pending.unknown.push(target);
                    }
                }
            }
        }
        !stream.pending.is_empty()
    }

    /// Records the generation a proxy applied.
    pub fn ack(&mut self, id: StreamId, generation: u64) {
        if let Some(s) = self.streams.get_mut(&id) {
            // A proxy cannot have applied a view that was never published.
            let latest = self.view.as_ref().map_or(0, |v| v.generation());
            s.acked = s.acked.max(generation.min(latest));
        }
    }

    /// Publishes a new view; returns the streams to wake. Each stream gets the Services whose
    /// state as its namespace sees it changed, and a `Synced` with the new generation.
    pub fn publish(&mut self, view: Arc<View>) -> Vec<StreamId> {
        let previous = self.view.replace(view.clone());
        let mut wake = Vec::with_capacity(self.streams.len());
        for (id, stream) in &mut self.streams {
            for target in std::mem::take(&mut stream.unresolved) {
                match view.resolve(&target, &stream.namespace) {
                    Some(key) => {
                        stream.pending.mark(&key);
                        stream.subscriptions.insert(key);
                    }
                    None => stream.pending.unknown.push(target),
                }
            }
            if let Some(previous) = &previous {
                for key in &stream.subscriptions {
                    if view.changed(previous, key, &stream.namespace) {
                        stream.pending.mark(key);
                    }
                }
            }
            stream.pending.synced = true;
            wake.push(*id);
        }
        wake
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

    /// Records who a stream's proxy is (its certificate's ID and its address).
    pub fn set_peer(&mut self, id: StreamId, peer: Peer) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.peer = Some(peer);
        }
    }

    /// Records the settings digest of the ConfigMap config a proxy serves from. Bounded: a
    /// digest is 32 hex characters; anything longer is no digest and is dropped.
    pub fn loaded(&mut self, id: StreamId, settings: String) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.settings = (settings.len() <= 64).then_some(settings);
        }
    }

    /// A copy of what every stream reported, for the propagation count.
    pub fn stream_states(&self) -> Vec<crate::propagation::StreamState> {
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
                acked: s.acked,
                settings: s.settings.clone(),
                subscriptions: s.subscriptions.iter().cloned().collect(),
            })
            .collect()
    }

    /// How many streams acknowledged the current view.
    pub fn propagation(&self) -> Propagation {
        let generation = self.view.as_ref().map_or(0, |v| v.generation());
        Propagation {
            generation,
            updated: self
                .streams
                .values()
                .filter(|s| s.acked >= generation)
                .count(),
            total: self.streams.len(),
        }
    }
}
