//! Token buckets: local rate limits (per destination, and per source identity inbound) and the
//! retry budget.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::RateLimit;

/// Longest wait a bucket reports. Validation keeps real rates far above the rate that needs
/// it ([`crate::config::MIN_RATE_PER_SECOND`]); the cap keeps a bucket built from anything
/// else from computing an unrepresentable `Duration` (a panic while the bucket is locked).
pub const MAX_WAIT: Duration = Duration::from_secs(86_400);

/// A token bucket refilled continuously at `rate` per second up to `burst`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<BucketState>,
}

#[derive(Debug, Clone, Copy)]
struct BucketState {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// Starts full. A rate that is not a positive finite number never refills (NaN would
    /// otherwise refill to full on every call, infinity to NaN).
    pub fn new(rate_per_sec: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        let rate = if rate_per_sec.is_finite() && rate_per_sec > 0.0 {
            rate_per_sec
        } else {
            0.0
        };
        Self {
            rate,
            burst,
            state: Mutex::new(BucketState {
                tokens: burst,
                at: Instant::now(),
            }),
        }
    }

    pub fn from_config(rl: &RateLimit) -> Self {
        Self::new(rl.requests_per_second, rl.burst)
    }

    /// Whether this bucket was built from `rl` (a reload with the same limit keeps the bucket).
    pub fn same_config(&self, rl: &RateLimit) -> bool {
        let same = Self::new(rl.requests_per_second, rl.burst);
        self.rate == same.rate && self.burst == same.burst
    }

    /// Takes one token, or says how long until one is available.
    pub fn try_acquire(&self) -> Result<(), Duration> {
        self.try_acquire_at(Instant::now())
    }

    fn refill(&self, s: &mut BucketState, now: Instant) {
        let dt = now.saturating_duration_since(s.at).as_secs_f64();
        s.tokens = (s.tokens + dt * self.rate).min(self.burst);
        s.at = now;
    }

    pub(crate) fn try_acquire_at(&self, now: Instant) -> Result<(), Duration> {
        let mut s = self.state.lock().expect("bucket lock");
        self.refill(&mut s, now);
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - s.tokens) / self.rate;
            Err(Duration::try_from_secs_f64(wait).map_or(MAX_WAIT, |w| w.min(MAX_WAIT)))
        }
    }

    /// Whether the bucket is full at `now` (an idle source; safe to forget).
    fn is_full(&self, now: Instant) -> bool {
        let mut s = self.state.lock().expect("bucket lock");
        self.refill(&mut s, now);
        s.tokens >= self.burst
    }
}

/// Per-source-identity inbound rate limit (`InboundPolicy.rate_limit`), for the core's inbound
/// listener: call [`InboundRateLimiter::check`] with the peer's SPIFFE ID (or its IP for
/// plaintext peers) and answer [`rate_limited_response`] on `Err`.
#[derive(Debug)]
pub struct InboundRateLimiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<String, TokenBucket>>,
    refused: Option<prometheus_client::metrics::counter::Counter>,
}

/// Sources tracked before idle (full) buckets are swept, so a scan of many identities cannot
/// grow memory without bound.
const MAX_SOURCES: usize = 10_000;

impl InboundRateLimiter {
    pub fn new(limit: &RateLimit) -> Self {
        Self {
            limit: limit.clone(),
            buckets: Mutex::new(HashMap::new()),
            refused: None,
        }
    }

    /// Like [`Self::new`], counting refusals in `traffic_inbound_rate_limited_total`.
    pub fn with_metrics(limit: &RateLimit, metrics: &super::TrafficMetrics) -> Self {
        Self {
            refused: Some(metrics.inbound_rate_limited.clone()),
            ..Self::new(limit)
        }
    }

    pub fn limit(&self) -> &RateLimit {
        &self.limit
    }

    /// Takes a token for `source`, or returns how long until it has one.
    pub fn check(&self, source: &str) -> Result<(), Duration> {
        let r = self.check_inner(source);
        if r.is_err()
            && let Some(c) = &self.refused
        {
            c.inc();
        }
        r
    }

    fn check_inner(&self, source: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut map = self.buckets.lock().expect("limiter lock");
        if let Some(b) = map.get(source) {
            return b.try_acquire_at(now);
        }
        if map.len() >= MAX_SOURCES {
            map.retain(|_, b| !b.is_full(now));
            if map.len() >= MAX_SOURCES {
                // Every tracked source is active: refuse new ones rather than grow.
                return Err(Duration::from_secs(1));
            }
        }
        let b = TokenBucket::from_config(&self.limit);
        let r = b.try_acquire_at(now);
        map.insert(source.to_string(), b);
        r
    }
}

/// `429 Too Many Requests` with `Retry-After` in whole seconds (at least 1).
pub fn rate_limited_response(retry_after: Duration) -> http::Response<super::Body> {
    let mut r = super::error_response(http::StatusCode::TOO_MANY_REQUESTS);
    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    r.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from(secs.max(1)),
    );
    r
}

/// Retry budget (Finagle's `RetryBudget`, as Linkerd): every request deposits `percent`/100 of a
/// token that stays valid for [`BUDGET_TTL`]; every retry withdraws one. On top of that,
/// `min_per_sec` retries per second are always allowed (a bucket refilled at that rate, holding
/// one second's worth), so a quiet client can still retry. Retries therefore add at most
/// `percent`% of recent requests plus `min_per_sec` per second: an outage is never multiplied.
#[derive(Debug)]
pub struct RetryBudget {
    percent: f64,
    min_per_sec: u32,
    /// Deposits minus withdrawals per one-second slot, in thousandths of a token.
    state: Mutex<BudgetState>,
    reserve: TokenBucket,
}

/// How long a request's deposit counts.
pub const BUDGET_TTL: Duration = Duration::from_secs(10);
const SLOTS: usize = 10;

#[derive(Debug)]
struct BudgetState {
    slots: [i64; SLOTS],
    /// Index of the slot for `slot_start`.
    current: usize,
    slot_start: Instant,
}

impl RetryBudget {
    /// `percent` outside 0..=100 (or NaN, which validation refuses) is clamped, so deposits
    /// stay far from overflowing the slot counters.
    pub fn new(percent: f64, min_per_sec: u32) -> Self {
        let percent = if percent.is_nan() {
            0.0
        } else {
            percent.clamp(0.0, 100.0)
        };
        Self {
            percent,
            min_per_sec,
            state: Mutex::new(BudgetState {
                slots: [0; SLOTS],
                current: 0,
                slot_start: Instant::now(),
            }),
            reserve: TokenBucket::new(f64::from(min_per_sec), min_per_sec.max(1)),
        }
    }

    pub fn same_config(&self, percent: f64, min_per_sec: u32) -> bool {
        let same = Self::new(percent, min_per_sec);
        self.percent == same.percent && self.min_per_sec == min_per_sec
    }

    fn roll(s: &mut BudgetState, now: Instant) {
        let slot = BUDGET_TTL / SLOTS as u32;
        let mut elapsed = now.saturating_duration_since(s.slot_start);
        let mut cleared = 0;
        while elapsed >= slot && cleared < SLOTS {
            s.current = (s.current + 1) % SLOTS;
            s.slots[s.current] = 0;
            s.slot_start += slot;
            elapsed -= slot;
            cleared += 1;
        }
        if cleared == SLOTS {
            s.slot_start = now;
        }
    }

    /// Called once per request (not per retry).
    pub fn deposit(&self) {
        if self.percent <= 0.0 {
            return;
        }
        let mut s = self.state.lock().expect("budget lock");
        Self::roll(&mut s, Instant::now());
        let cur = s.current;
        s.slots[cur] = s.slots[cur].saturating_add((self.percent * 10.0) as i64);
    }

    /// Takes the budget for one retry, or returns false (budget exhausted).
    pub fn withdraw(&self) -> bool {
        {
            let mut s = self.state.lock().expect("budget lock");
            Self::roll(&mut s, Instant::now());
            let balance: i64 = s.slots.iter().sum();
            if balance >= 1000 {
                let cur = s.current;
                s.slots[cur] -= 1000;
                return true;
            }
        }
        self.min_per_sec > 0 && self.reserve.try_acquire().is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_at_rate() {
        let b = TokenBucket::new(10.0, 2);
        let t0 = Instant::now();
        assert!(b.try_acquire_at(t0).is_ok());
        assert!(b.try_acquire_at(t0).is_ok());
        let wait = b.try_acquire_at(t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::from_millis(90));
        assert!(b.try_acquire_at(t0 + Duration::from_millis(101)).is_ok());
    }

    #[test]
    fn budget_allows_percent_of_deposits() {
        let b = RetryBudget::new(20.0, 0);
        for _ in 0..100 {
            b.deposit();
        }
        let allowed = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(allowed, 20);
    }

    #[test]
    fn budget_min_per_second_without_traffic() {
        let b = RetryBudget::new(20.0, 5);
        let allowed = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(allowed, 5);
    }

    #[test]
    fn inbound_limits_each_source_apart() {
        let m = super::super::TrafficMetrics::new();
        let l = InboundRateLimiter::with_metrics(
            &RateLimit {
                requests_per_second: 1.0,
                burst: 2,
            },
            &m,
        );
        assert!(l.check("spiffe://td/ns/a/sa/x").is_ok());
        assert!(l.check("spiffe://td/ns/a/sa/x").is_ok());
        assert!(l.check("spiffe://td/ns/a/sa/x").is_err());
        assert!(l.check("spiffe://td/ns/a/sa/y").is_ok());
        assert_eq!(m.inbound_rate_limited.get(), 1);
        let r = rate_limited_response(Duration::from_millis(300));
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "1");
    }
}
