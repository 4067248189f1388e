//! The idle bound of a connection: it is told to go away after one to two periods without a
//! request in flight, and dropped one period later if it is still there.
//!
//! hyper's HTTP/2 server has no idle timeout, so an h2c client on a `Permissive` or `Disable`
//! port (anyone who reaches the pod IP) could open connections and hold them for ever: saying
//! nothing after the preface, or sending a header block that never ends (no request exists
//! until the block is complete). The mTLS hop ([`super::h2server`]) has the same bound for
//! the same reason and shares the verdict ([`Idleness`]). For HTTP/1.1, hyper's header read
//! timeout already ends a trickled request head and the idle gap between keep-alive requests
//! (it starts whenever the connection waits for a head); this bound backs it up.
//!
//! Checked once a period rather than with a timer reset per request, so a request costs two
//! atomic updates ([`Activity::begin`] and its drop). A request is in flight from its head
//! until its response body has been sent (or dropped): a slow download or a long stream is
//! not idleness, however quiet it is.
//!
//! Pure core ([`Idleness`], one verdict per tick) and a thin edge ([`Activity`], [`Watch`]).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

/// What a tick decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Idle {
    Open,
    /// Idle for at least one period: shut down gracefully (`GOAWAY`, or close between requests).
    GoAway,
    /// Still idle one period after going away (a peer that ignores the `GOAWAY`): drop the
    /// connection; nothing is in flight to lose.
    Close,
}

/// The verdicts of successive ticks.
#[derive(Debug, Default)]
pub struct Idleness {
    /// Idle at the last tick.
    idle_at_last_tick: bool,
    /// [`Idle::GoAway`] was given.
    gone_away: bool,
}

impl Idleness {
    /// One tick; `idle`: nothing is in flight now and nothing started since the last tick.
    pub fn tick(&mut self, idle: bool) -> Idle {
        if idle && self.gone_away {
            return Idle::Close;
        }
        let verdict = if idle && self.idle_at_last_tick {
            self.gone_away = true;
            Idle::GoAway
        } else {
            Idle::Open
        };
        self.idle_at_last_tick = idle;
        verdict
    }
}

/// Requests in flight on one connection, shared by its request handlers.
#[derive(Clone, Default)]
pub struct Activity(Arc<Counts>);

#[derive(Default)]
struct Counts {
    in_flight: AtomicUsize,
    /// A request started since the last [`Activity::idle_since_last_check`].
    started: AtomicBool,
}

/// One request in flight; ends on drop.
pub struct InFlight(Arc<Counts>);

impl Activity {
    /// A request begins; it is in flight until the returned guard is dropped.
    pub fn begin(&self) -> InFlight {
        self.0.in_flight.fetch_add(1, Ordering::Relaxed);
        self.0.started.store(true, Ordering::Relaxed);
        InFlight(self.0.clone())
    }

    /// Whether nothing is in flight and nothing started since the last call.
    fn idle_since_last_check(&self) -> bool {
        let started = self.0.started.swap(false, Ordering::Relaxed);
        !started && self.0.in_flight.load(Ordering::Relaxed) == 0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request in flight until it has been sent or dropped.
pub struct Tracked<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, in_flight: InFlight) -> Self {
        Tracked {
            inner,
            _in_flight: in_flight,
        }
    }
}

impl<B: HttpBody<Data = Bytes> + Unpin> HttpBody for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Ticks one connection's [`Activity`] against the bound.
pub struct Watch {
    tick: tokio::time::Interval,
    activity: Activity,
    idleness: Idleness,
}

impl Watch {
    pub fn new(activity: Activity, period: Duration) -> Self {
        // `interval` panics on zero; a setting built in code may say zero.
        let period = period.max(Duration::from_millis(1));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Watch {
            tick,
            activity,
            idleness: Idleness::default(),
        }
    }

    /// The next verdict that is not [`Idle::Open`].
    pub async fn next(&mut self) -> Idle {
        loop {
            self.tick.tick().await;
            match self.idleness.tick(self.activity.idle_since_last_check()) {
                Idle::Open => {}
                v => return v,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goes_away_after_two_idle_ticks_and_closes_one_later() {
        let mut i = Idleness::default();
        assert_eq!(i.tick(true), Idle::Open, "idle for less than a period");
        assert_eq!(i.tick(true), Idle::GoAway);
        assert_eq!(i.tick(true), Idle::Close);
    }

    #[test]
    fn activity_resets_the_count_and_a_busy_drain_is_not_closed() {
        let mut i = Idleness::default();
        assert_eq!(i.tick(true), Idle::Open);
        assert_eq!(i.tick(false), Idle::Open);
        assert_eq!(i.tick(true), Idle::Open);
        assert_eq!(i.tick(true), Idle::GoAway);
        // Requests still finishing after the GOAWAY are left alone, and it is said only once.
        assert_eq!(i.tick(false), Idle::Open);
        assert_eq!(i.tick(false), Idle::Open);
        assert_eq!(i.tick(true), Idle::Close);
    }

    #[test]
    fn a_request_is_in_flight_until_its_guard_drops_and_counts_even_when_short() {
        let a = Activity::default();
        assert!(a.idle_since_last_check());
        let g = a.begin();
        assert!(!a.idle_since_last_check());
        assert!(!a.idle_since_last_check(), "still in flight");
        drop(g);
        assert!(a.idle_since_last_check(), "ended, and nothing new");
        drop(a.begin());
        assert!(!a.idle_since_last_check(), "begun and ended between checks");
    }
}
