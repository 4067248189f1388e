//! Bounds on what clients can hold of a listener that strangers can reach: how many
//! connections are open (in all, and from one peer address) and how long one may live.
//!
//! Used by the operator's in-cluster TLS listeners (the injection webhook and the identity
//! endpoint), which anything in the cluster can connect to before it has proved anything, and
//! by the sidecar's admin port and inbound listener (whose connections count only until they
//! have authenticated, see [`crate::proxy::inbound::Limits`]).
//! Without these bounds a client that completes TLS and then speaks HTTP/2 (hyper's server
//! has no idle timeout for it) could hold connections open for ever, as many as the process
//! has file descriptors, and lock out the API server and every sidecar asking for a
//! certificate. The per-peer cap keeps one client from filling the total; the age bound
//! makes every connection end (gracefully: requests in flight finish) so none is held for
//! ever, idle or slow.
//!
//! Pure core ([`Gate::admit`], counting) and a thin edge ([`drive`], one connection's life).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The bounds of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Open connections, all peers together; more are closed at once.
    pub max_connections: usize,
    /// Open connections from one peer address; more are closed at once.
    pub max_connections_per_peer: usize,
    /// A connection this old is shut down gracefully (HTTP/2 `GOAWAY`, HTTP/1.1 closes after
    /// the response in flight); clients reconnect.
    pub max_age: Duration,
    /// How long requests in flight may finish after a graceful shutdown (for age or for the
    /// process's shutdown) before the connection is dropped; also bounds a peer that never
    /// answers the `GOAWAY`.
    pub drain: Duration,
}

impl ConnLimits {
    /// A gate counting against these limits' caps; past the total it evicts the oldest
    /// connection ([`Gate::evicting`]), so a few addresses within their per-peer share cannot
    /// lock everyone else out. [`drive`] closes an evicted connection gracefully.
    pub fn gate(&self) -> Arc<Gate> {
        Gate::evicting(self.max_connections, self.max_connections_per_peer)
    }
}

/// Counts open connections against a cap in all and one per peer address.
pub struct Gate {
    max_connections: usize,
    max_connections_per_peer: usize,
    /// When the total is full, make room by evicting the oldest connection instead of refusing
    /// the new one (see [`Gate::evicting`]).
    evict_oldest: bool,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    next_id: u64,
    /// Admitted connections by admission order (ids only grow), so the first is the oldest.
    slots: BTreeMap<u64, (IpAddr, CancellationToken)>,
    /// Only peers with open connections.
    per_peer: HashMap<IpAddr, usize>,
}

impl Open {
    fn release(&mut self, peer: IpAddr) {
        if let Some(n) = self.per_peer.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&peer);
            }
        }
    }
}

/// One admitted connection; gives its place back on drop.
pub struct Slot {
    gate: Arc<Gate>,
    id: u64,
    peer: IpAddr,
    evicted: CancellationToken,
}

impl Slot {
    /// Completes when an evicting gate ([`Gate::evicting`]) has taken this place back for a
    /// newer connection: the holder should close its connection. Never completes otherwise.
    pub fn evicted(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.evicted.cancelled()
    }
}

impl Gate {
    /// A gate that refuses connections beyond either cap.
    pub fn new(max_connections: usize, max_connections_per_peer: usize) -> Arc<Self> {
        Self::build(max_connections, max_connections_per_peer, false)
    }

    /// A gate for listeners whose legitimate connections hold a place briefly (a handshake in
    /// progress, a probe) or reconnect when closed: when the total is full, the oldest
    /// connection is evicted ([`Slot::evicted`]) and the new one admitted; only the per-peer
    /// cap refuses.
    ///
    /// A refusing total lets a few hosts lock everyone out: `total / per_peer` addresses, each
    /// holding its share of stalled handshakes for as long as the handshake timeout allows,
    /// and every new connection, a mesh peer's too, is turned away. Evicting the oldest turns
    /// that around: a legitimate handshake takes milliseconds, so it is never the oldest for
    /// long, and to push one out an attacker would have to open `total` connections within
    /// that handshake's few milliseconds. The connection evicted is nearly always one that
    /// has stalled longest, which is the one to close.
    pub fn evicting(max_connections: usize, max_connections_per_peer: usize) -> Arc<Self> {
        Self::build(max_connections, max_connections_per_peer, true)
    }

    fn build(max_connections: usize, max_connections_per_peer: usize, evict: bool) -> Arc<Self> {
        Arc::new(Gate {
            max_connections,
            max_connections_per_peer,
            evict_oldest: evict,
            open: Mutex::default(),
        })
    }

    /// Admits a connection from `peer` within the limits, or `None`: close it.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mine = open.per_peer.get(&peer).copied().unwrap_or(0);
        if mine >= self.max_connections_per_peer {
            return None;
        }
        let mut evict = None;
        if open.slots.len() >= self.max_connections {
            if !self.evict_oldest {
                return None;
            }
            // A cap of zero has nothing to evict: refuse.
            let (_, (oldest, token)) = open.slots.pop_first()?;
            open.release(oldest);
            evict = Some(token);
        }
        let id = open.next_id;
        open.next_id += 1;
        let evicted = CancellationToken::new();
        open.slots.insert(id, (peer, evicted.clone()));
        *open.per_peer.entry(peer).or_insert(0) += 1;
        drop(open);
        // Outside the lock: cancelling wakes the evicted connection's task.
        if let Some(token) = evict {
            token.cancel();
        }
        Some(Slot {
            gate: self.clone(),
            id,
            peer,
            evicted,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .slots
            .len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().unwrap_or_else(|p| p.into_inner());
        // An evicted slot gave its place back when it was evicted.
        if open.slots.remove(&self.id).is_some() {
            open.release(self.peer);
        }
    }
}

/// Why [`drive`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended<E> {
    /// The connection ended by itself (or after a graceful shutdown, within the drain).
    Closed(Result<(), E>),
    /// It was still open `drain` after the graceful shutdown, and was dropped.
    Dropped,
}

/// How long an evicted connection ([`Slot::evicted`]) may drain, at most. Its place is taken
/// at once, so while it drains it is open beyond the cap: under a flood that keeps evicting,
/// that overshoot is the eviction rate times this, kept to a second's worth.
pub const EVICTED_DRAIN: Duration = Duration::from_secs(1);

/// Runs one connection (a hyper connection future; `graceful` starts its graceful shutdown)
/// until it ends. When it reaches `limits.max_age`, `shutdown` is cancelled or its `slot` is
/// evicted, it is shut down gracefully, and dropped if it has not ended `limits.drain` later
/// ([`EVICTED_DRAIN`] at most when evicted).
pub async fn drive<C, E>(
    conn: C,
    graceful: impl FnOnce(Pin<&mut C>),
    limits: &ConnLimits,
    shutdown: &CancellationToken,
    slot: &Slot,
) -> Ended<E>
where
    C: Future<Output = Result<(), E>>,
{
    let mut conn = std::pin::pin!(conn);
    let drain = tokio::select! {
        r = conn.as_mut() => return Ended::Closed(r),
        _ = tokio::time::sleep(limits.max_age) => limits.drain,
        _ = shutdown.cancelled() => limits.drain,
        _ = slot.evicted() => limits.drain.min(EVICTED_DRAIN),
    };
    graceful(conn.as_mut());
    match tokio::time::timeout(drain, conn).await {
        Ok(r) => Ended::Closed(r),
        Err(_) => Ended::Dropped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn limits(total: usize, per_peer: usize) -> ConnLimits {
        ConnLimits {
            max_connections: total,
            max_connections_per_peer: per_peer,
            max_age: Duration::from_secs(60),
            drain: Duration::from_secs(1),
        }
    }

    #[test]
    fn one_peer_cannot_fill_the_total_and_slots_come_back_on_drop() {
        let gate = Gate::new(3, 2);
        let (a, b, c) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        );
        let a1 = gate.admit(a).unwrap();
        let _a2 = gate.admit(a).unwrap();
        assert!(gate.admit(a).is_none(), "per-peer cap");
        let _b1 = gate.admit(b).unwrap();
        assert!(gate.admit(c).is_none(), "total cap");
        drop(a1);
        assert_eq!(gate.open(), 2);
        assert!(gate.admit(c).is_some());
    }

    #[tokio::test]
    async fn a_full_evicting_gate_makes_room_by_evicting_the_oldest() {
        let gate = Gate::evicting(3, 2);
        let (a, b, c) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        );
        let a1 = gate.admit(a).unwrap();
        let a2 = gate.admit(a).unwrap();
        let b1 = gate.admit(b).unwrap();
        // The per-peer cap still refuses, and evicts no one.
        assert!(gate.admit(a).is_none(), "per-peer cap");
        assert!(a1.evicted().now_or_never().is_none());
        // The total is full: a new peer gets in, the oldest (a1) is told to go.
        let c1 = gate.admit(c).unwrap();
        assert!(
            a1.evicted().now_or_never().is_some(),
            "the oldest was not evicted"
        );
        for s in [&a2, &b1, &c1] {
            assert!(
                s.evicted().now_or_never().is_none(),
                "a newer one was evicted"
            );
        }
        assert_eq!(gate.open(), 3);
        // a's place went with the eviction: a may connect again (evicting a2, now the oldest),
        // and dropping the evicted slot gives back nothing twice.
        drop(a1);
        assert_eq!(gate.open(), 3);
        let a3 = gate.admit(a).unwrap();
        assert!(a2.evicted().now_or_never().is_some());
        drop(a2);
        drop((b1, c1, a3));
        assert_eq!(gate.open(), 0);
        assert!(gate.open.lock().unwrap().per_peer.is_empty());
        // A refusing gate of the same size refuses instead.
        let refusing = Gate::new(1, 1);
        let r1 = refusing.admit(a).unwrap();
        assert!(refusing.admit(b).is_none());
        assert!(r1.evicted().now_or_never().is_none());
        // And an evicting gate of size zero admits no one.
        assert!(Gate::evicting(0, 1).admit(a).is_none());
    }

    #[tokio::test]
    async fn a_connection_is_shut_down_gracefully_at_its_age_and_dropped_after_the_drain() {
        let l = ConnLimits {
            max_age: Duration::from_millis(100),
            drain: Duration::from_millis(100),
            ..limits(1, 1)
        };
        let never = CancellationToken::new();
        let gate = Gate::evicting(8, 8);
        let slot = gate.admit("10.0.0.1".parse().unwrap()).unwrap();
        // A connection that ends as soon as it is asked to shut down, and one that ignores it.
        // (Its graceful shutdown is dropping the sender.)
        fn obliging() -> (
            impl Future<Output = Result<(), ()>>,
            tokio::sync::oneshot::Sender<()>,
        ) {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let conn = async move {
                let _ = rx.await;
                Ok(())
            };
            (conn, tx)
        }
        async fn stubborn(l: &ConnLimits, stop: &CancellationToken, slot: &Slot) -> Duration {
            let start = std::time::Instant::now();
            let pending = std::future::pending::<Result<(), ()>>();
            assert_eq!(drive(pending, |_| {}, l, stop, slot).await, Ended::Dropped);
            start.elapsed()
        }
        let (conn, tx) = obliging();
        let ended = drive(conn, move |_| drop(tx), &l, &never, &slot).await;
        assert_eq!(ended, Ended::Closed(Ok(())));
        // Ignores the shutdown: dropped after the drain.
        assert!(stubborn(&l, &never, &slot).await >= l.max_age + l.drain);
        // Shutdown starts the same graceful path before the age.
        let stop = CancellationToken::new();
        stop.cancel();
        assert!(stubborn(&l, &stop, &slot).await < l.max_age + l.drain);
        // So does losing the slot to a newer connection (the gate of `l` holds one).
        let gate = l.gate();
        let old = gate.admit("10.0.0.1".parse().unwrap()).unwrap();
        let _newer = gate.admit("10.0.0.2".parse().unwrap()).unwrap();
        let (conn, tx) = obliging();
        let start = std::time::Instant::now();
        let ended = drive(conn, move |_| drop(tx), &l, &never, &old).await;
        assert_eq!(ended, Ended::Closed(Ok(())));
        assert!(start.elapsed() < l.max_age, "not closed at eviction");
        // An evicted connection that ignores the shutdown drains for a second at most, not
        // the listener's whole drain.
        let long = ConnLimits {
            max_age: Duration::from_secs(60),
            drain: Duration::from_secs(30),
            ..l
        };
        let gate = long.gate();
        let old = gate.admit("10.0.0.1".parse().unwrap()).unwrap();
        let _newer = gate.admit("10.0.0.2".parse().unwrap()).unwrap();
        let took = stubborn(&long, &never, &old).await;
        assert!(took < Duration::from_secs(3), "{took:?}");
    }
}
