//! Per-endpoint state that outlives config reloads: in-flight count, peak-EWMA latency and
//! outlier-detection (ejection) state.
//!
//! An [`EndpointState`] is shared (`Arc`) between the destination table and every request in
//! flight to it. A reload that keeps an address keeps its state, so balancer statistics and
//! ejections survive; a reload that removes an address only drops the table's reference, and
//! requests in flight finish on their own reference (the endpoint drains).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::config::OutlierDetection;

/// How fast a measured endpoint's estimate follows samples below it (the time constant of the
/// EWMA between samples). Five times [`EWMA_RISE`]: the estimate is pessimistic (it sits near
/// the upper end of what an endpoint answers, an upper expectile), but not so pessimistic that
/// a healthy endpoint's tail makes it look like a slower one; and what a stall added is
/// forgotten within a second of traffic.
pub const EWMA_DECAY: Duration = Duration::from_millis(250);
/// How fast the estimate of an endpoint that gets no traffic drifts toward zero, which is what
/// makes the balancer probe it again: once its decayed estimate is down to what a fast peer costs
/// with its requests in flight. An endpoint 10x slower than its peers is tried every few seconds
/// (every 4 s in `hack/bench-lb.sh`, at most every `ln(10) * EWMA_IDLE_DECAY` ≈ 12 s): a
/// negligible share, yet a recovery is noticed within that.
pub const EWMA_IDLE_DECAY: Duration = Duration::from_secs(5);
/// Cost of each request in flight to an endpoint still on probation (fewer than
/// [`PROBATION_SAMPLES`] answers): far above any real estimate, so such an endpoint gets one
/// request at a time (Finagle's "penalty"), but nothing while idle, so it is tried at once.
const UNMEASURED_PENDING_COST_NS: f64 = 1e12;
/// Answers a new endpoint gives, one at a time, before it competes on its estimate; the
/// estimate is their minimum. A stall only ever adds latency, so the minimum of a few is what
/// the endpoint can do; one unlucky first sample would otherwise mark a fast endpoint as slow
/// and starve it for the whole idle decay.
const PROBATION_SAMPLES: u8 = 3;
/// How fast the estimate follows samples *above* it: the time constant of the EWMA between
/// samples on the way up. Short, so a real slowdown is followed within a few hundred
/// milliseconds of traffic (a 1 ms endpoint turned 10 ms looks 5 ms after 17 answers, 34 ms
/// at 500 requests/s), but weighted by time like the way down, and a sample stands for at most
/// one round trip, so what moves it is how long an endpoint stays slow, not how many slow
/// samples arrive: the burst of late answers read together when a descheduled client runs
/// again moves it about as much as one answer, and an isolated slow answer (one in fifty, the
/// p98 of a healthy endpoint) moves it by a few percent of its excess instead of replacing it.
pub const EWMA_RISE: Duration = Duration::from_millis(50);
/// Longest single ejection, whatever the multiplier (Envoy's default `max_ejection_time`).
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// Milliseconds since a process-wide epoch, so ejection deadlines fit in an atomic.
pub(crate) fn now_ms() -> u64 {
    now_ms_at(Instant::now())
}

/// [`now_ms`] for an instant the caller already read (clock reads are not free on every host).
pub(crate) fn now_ms_at(now: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    // +1 so that 0 can mean "not ejected".
    now.saturating_duration_since(epoch).as_millis() as u64 + 1
}

/// Whole milliseconds of `d`, saturating (a `Duration` holds more than `u64` milliseconds).
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Asymmetric-EWMA round-trip estimate: samples pull it up with a short time constant
/// ([`EWMA_RISE`]) and down with a long one ([`EWMA_DECAY`]), both weighted by the time since the
/// previous sample, and while no sample comes the estimate the balancer sees drifts toward zero
/// ([`EWMA_IDLE_DECAY`]), so an avoided endpoint is probed again.
///
/// Two departures from tower's `PeakEwma` (and Finagle's), which replace the estimate with any
/// sample above it and decay it on every read:
///
/// - Reading it changes nothing. There, computing the cost decays the stored estimate toward
///   zero *and* moves its timestamp, so a faster sample that follows is weighted by the few
///   microseconds since the last pick (about 0.00003 at 500 requests/s with a 10 s decay) and
///   changes nothing: the estimate was "the highest sample, decayed", never an average.
/// - A sample above it does not replace it. A peak estimator sits at the highest answer of the
///   last second or so: fast endpoints answering in about 1.3 ms looked 3-4 ms in
///   `hack/bench-lb.sh` (one answer in fifty, a stall of the client or the host, is enough),
///   and with two requests in flight they cost as much as the idle endpoint 10x slower, which
///   then got 0.2-1.3 % of the traffic, enough to own the p99 in one round of three. The
///   estimate is now an upper expectile of the recent samples rather than their maximum
///   (1.3-1.4 ms there; 0.02-0.03 % to the slow endpoint): still peak-sensitive, rising five
///   times faster than it falls, but not to a single outlier.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PeakEwma {
    /// Estimate in nanoseconds as of the last sample; `None` before the first one.
    rtt_ns: Option<f64>,
    sampled: Instant,
    /// Samples so far, counted up to [`PROBATION_SAMPLES`].
    samples: u8,
}

impl PeakEwma {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            rtt_ns: None,
            sampled: now,
            samples: 0,
        }
    }

    fn decay(since: Instant, now: Instant, tau: Duration) -> f64 {
        let elapsed = now.saturating_duration_since(since).as_secs_f64();
        (-elapsed / tau.as_secs_f64()).exp()
    }

    /// Records one round trip that ended at `now`.
    pub(crate) fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        self.rtt_ns = Some(match self.rtt_ns {
            None => rtt,
            Some(est) if self.samples < PROBATION_SAMPLES => est.min(rtt),
            Some(est) if rtt > est => {
                // A sample stands for the time since the previous one, but for no more than one
                // round trip: answers within one round trip of each other were in flight
                // together and met the same conditions (a stall, a burst), so they are one piece
                // of evidence, not many; the first answer after a client stall would otherwise
                // carry the whole stall's weight.
                let span = now
                    .saturating_duration_since(self.sampled)
                    .as_secs_f64()
                    .min(est / 1e9);
                let keep = (-span / EWMA_RISE.as_secs_f64()).exp();
                est * keep + rtt * (1.0 - keep)
            }
            Some(est) => {
                let keep = Self::decay(self.sampled, now, EWMA_DECAY);
                est * keep + rtt * (1.0 - keep)
            }
        });
        self.samples = self.samples.saturating_add(1).min(PROBATION_SAMPLES);
        self.sampled = self.sampled.max(now);
    }

    /// The estimate the balancer uses at `now` (nanoseconds), `None` before the first sample.
    pub(crate) fn estimate(&self, now: Instant) -> Option<f64> {
        self.rtt_ns
            .map(|est| est * Self::decay(self.sampled, now, EWMA_IDLE_DECAY))
    }

    /// Load for P2C: the estimate times (in-flight + 1), as Linkerd and Finagle; an endpoint on
    /// probation costs nothing while idle and [`UNMEASURED_PENDING_COST_NS`] per request in
    /// flight.
    pub(crate) fn cost(&self, now: Instant, pending: u32) -> f64 {
        let pending = f64::from(pending);
        match self.estimate(now) {
            Some(est) if self.samples >= PROBATION_SAMPLES => est * (pending + 1.0),
            _ => UNMEASURED_PENDING_COST_NS * pending,
        }
    }
}

/// Outlier-detection bookkeeping of one endpoint.
#[derive(Debug, Default)]
struct Outlier {
    consecutive_failures: u32,
    /// Ejections so far, decayed by healthy time (see [`EndpointState::multiplier`]).
    ejections: u32,
    /// When the endpoint last became healthy again after a probe, for the multiplier decay.
    healthy_since: Option<Instant>,
}

/// Shared state of one endpoint address.
#[derive(Debug)]
pub struct EndpointState {
    pub(crate) addr: SocketAddr,
    /// SPIFFE IDs accepted from this endpoint.
    pub(crate) identities: Arc<[String]>,
    inflight: AtomicU32,
    ewma: Mutex<PeakEwma>,
    outlier: Mutex<Outlier>,
    /// `now_ms()` deadline of the current ejection; 0 when not ejected.
    ejected_until: AtomicU64,
    /// Set when an ejection expired and no request has succeeded since: one probe at a time.
    probing: AtomicBool,
}

impl EndpointState {
    pub(crate) fn new(addr: SocketAddr, identities: Arc<[String]>) -> Self {
        Self::new_at(addr, identities, Instant::now())
    }

    pub(crate) fn new_at(addr: SocketAddr, identities: Arc<[String]>, now: Instant) -> Self {
        Self {
            addr,
            identities,
            inflight: AtomicU32::new(0),
            ewma: Mutex::new(PeakEwma::new(now)),
            outlier: Mutex::new(Outlier::default()),
            ejected_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Marks one more request in flight until the guard drops.
    pub(crate) fn start(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard(self.clone())
    }

    /// Load for P2C (see [`PeakEwma::cost`]).
    pub(crate) fn ewma_cost(&self, now: Instant) -> f64 {
        let ewma = *self.ewma.lock().expect("ewma lock");
        ewma.cost(now, self.inflight())
    }

    /// Records one round trip (request sent to response headers).
    pub(crate) fn observe_rtt(&self, rtt: Duration, now: Instant) {
        self.ewma.lock().expect("ewma lock").observe(rtt, now);
    }

    /// The latency estimate the balancer uses now; zero before anything was measured.
    pub fn rtt_estimate(&self) -> Duration {
        let est = self
            .ewma
            .lock()
            .expect("ewma lock")
            .estimate(Instant::now());
        Duration::from_nanos(est.unwrap_or(0.0) as u64)
    }

    /// Whether the endpoint is ejected at `now` (a `now_ms()` value). Notices expired ejections
    /// and moves the endpoint to probing, returning `Expired` exactly once per ejection so the
    /// caller can update the ejected gauge.
    pub(crate) fn ejection(&self, now: u64) -> Ejection {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            Ejection::No
        } else if until > now {
            Ejection::Ejected
        } else if self
            .ejected_until
            .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.probing.store(true, Ordering::Release);
            Ejection::Expired
        } else {
            Ejection::No
        }
    }

    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && until > now_ms()
    }

    /// Whether the endpoint is on probation after an ejection and already has its one probe
    /// in flight.
    pub(crate) fn probe_busy(&self) -> bool {
        self.probing.load(Ordering::Acquire) && self.inflight() > 0
    }

    /// Records a success for outlier detection.
    pub(crate) fn record_success(&self) {
        let probing = self.probing.swap(false, Ordering::AcqRel);
        let mut o = self.outlier.lock().expect("outlier lock");
        o.consecutive_failures = 0;
        if probing {
            o.healthy_since = Some(Instant::now());
        }
    }

    /// Records a failure; returns the ejection duration when this failure should eject the
    /// endpoint (the caller checks the max-ejection percentage and then calls [`Self::eject`]).
    pub(crate) fn record_failure(&self, cfg: &OutlierDetection) -> Option<Duration> {
        let probing = self.probing.load(Ordering::Acquire);
        let mut o = self.outlier.lock().expect("outlier lock");
        o.consecutive_failures = o.consecutive_failures.saturating_add(1);
        if self.ejected_until.load(Ordering::Relaxed) != 0 {
            return None;
        }
        if !probing && o.consecutive_failures < cfg.consecutive_failures {
            return None;
        }
        let base = Duration::from_millis(cfg.base_ejection_ms);
        let n = Self::multiplier(&o, base) + 1;
        let factor = 1u32 << (n - 1).min(20);
        Some((base.saturating_mul(factor)).min(MAX_EJECTION.max(base)))
    }

    /// Ejections decay by one per `base` of healthy time since the last probe succeeded, so an
    /// endpoint that stays healthy gradually gets short ejections again.
    fn multiplier(o: &Outlier, base: Duration) -> u32 {
        match o.healthy_since {
            Some(since) if !base.is_zero() => {
                let healthy = since.elapsed().as_nanos() / base.as_nanos();
                o.ejections
                    .saturating_sub(healthy.min(u32::MAX as u128) as u32)
            }
            _ => o.ejections,
        }
    }

    /// Ejects for `d`. Returns false when it was already ejected.
    pub(crate) fn eject(&self, d: Duration, cfg: &OutlierDetection) -> bool {
        let mut o = self.outlier.lock().expect("outlier lock");
        if self.ejected_until.load(Ordering::Relaxed) != 0 {
            return false;
        }
        let base = Duration::from_millis(cfg.base_ejection_ms);
        o.ejections = Self::multiplier(&o, base) + 1;
        o.healthy_since = None;
        o.consecutive_failures = 0;
        self.probing.store(false, Ordering::Release);
        self.ejected_until
            .store(now_ms().saturating_add(ms(d)), Ordering::Release);
        true
    }

    /// Current ejection count (the exponent of the next ejection), for tests.
    pub fn ejections(&self) -> u32 {
        self.outlier.lock().expect("outlier lock").ejections
    }
}

/// Result of [`EndpointState::ejection`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ejection {
    No,
    Ejected,
    /// Was ejected, the ejection just ran out (reported once).
    Expired,
}

/// Counts one request in flight on an endpoint while alive. Travels with the response body so
/// a streaming response keeps counting until it ends, and a removed endpoint drains.
#[derive(Debug)]
pub(crate) struct InflightGuard(Arc<EndpointState>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> EndpointState {
        EndpointState::new("127.0.0.1:1".parse().unwrap(), Arc::from(Vec::new()))
    }

    fn ms_of(ns: Option<f64>) -> f64 {
        ns.unwrap() / 1e6
    }

    /// An estimator past probation, at `ms`.
    fn measured(ms: u64, at: Instant) -> PeakEwma {
        let mut e = PeakEwma::new(at);
        for _ in 0..PROBATION_SAMPLES {
            e.observe(Duration::from_millis(ms), at);
        }
        e
    }

    #[test]
    fn decays_down_with_the_time_between_samples() {
        let t0 = Instant::now();
        let mut e = measured(100, t0);
        assert_eq!(ms_of(e.estimate(t0)), 100.0);
        // A fast sample one decay constant later pulls the estimate most of the way (1 - 1/e).
        let t1 = t0 + EWMA_DECAY;
        e.observe(Duration::from_millis(1), t1);
        let est = ms_of(e.estimate(t1));
        let want = 100.0 / std::f64::consts::E + (1.0 - 1.0 / std::f64::consts::E);
        assert!((est - want).abs() < 0.01, "{est} vs {want}");
        // Without samples it drifts toward zero, so the endpoint is probed again.
        let later = ms_of(e.estimate(t1 + EWMA_IDLE_DECAY));
        assert!((later - want / std::f64::consts::E).abs() < 0.01, "{later}");
    }

    /// A healthy 1 ms endpoint answering every 2 ms until `until`, with every `outlier_every`th
    /// answer taking `outlier_ms`; returns the estimator and the time of its last sample.
    fn steady(until: Duration, outlier_every: u32, outlier_ms: f64) -> (PeakEwma, Instant) {
        let t0 = Instant::now();
        let mut e = measured(1, t0);
        let mut t = t0;
        let mut k = 0;
        while t < t0 + until {
            k += 1;
            t += Duration::from_millis(2);
            let ms = if k % outlier_every == 0 {
                outlier_ms
            } else {
                1.0
            };
            e.observe(Duration::from_secs_f64(ms / 1000.0), t);
        }
        (e, t)
    }

    #[test]
    fn one_slow_answer_in_fifty_barely_moves_it() {
        // A peak estimator would sit at 3 ms here, the cost of an idle endpoint 3x slower.
        let (e, t) = steady(Duration::from_secs(5), 50, 3.0);
        let est = ms_of(e.estimate(t));
        assert!(est < 1.25, "{est}");
    }

    #[test]
    fn a_stalled_client_s_burst_of_late_answers_counts_once() {
        let (mut e, t) = steady(Duration::from_secs(2), u32::MAX, 1.0);
        // The client was descheduled for 40 ms: the ten answers that came in meanwhile are all
        // read when it runs again, each 40 ms late.
        let t = t + Duration::from_millis(40);
        for _ in 0..10 {
            e.observe(Duration::from_millis(41), t);
        }
        let est = ms_of(e.estimate(t));
        assert!(est < 2.0, "one stall made a 1 ms endpoint look {est} ms");
    }

    #[test]
    fn a_real_slowdown_is_followed_within_a_few_dozen_answers() {
        let (mut e, mut t) = steady(Duration::from_secs(2), u32::MAX, 1.0);
        let start = t;
        while ms_of(e.estimate(t)) < 5.0 {
            t += Duration::from_millis(2);
            e.observe(Duration::from_millis(10), t);
            assert!(
                t - start < Duration::from_millis(50),
                "still {:?}",
                e.estimate(t)
            );
        }
        // ... and at a trickle of traffic, within a few answers.
        let (mut e, mut t) = steady(Duration::from_secs(2), u32::MAX, 1.0);
        let mut answers = 0;
        while ms_of(e.estimate(t)) < 5.0 {
            t += Duration::from_millis(200);
            e.observe(Duration::from_millis(10), t);
            answers += 1;
        }
        assert!(answers <= 15, "{answers} answers");
    }

    #[test]
    fn probation_takes_the_best_of_the_first_answers_one_at_a_time() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(t0);
        assert_eq!(e.estimate(t0), None);
        assert_eq!(e.cost(t0, 0), 0.0);
        assert!(e.cost(t0, 1) >= UNMEASURED_PENDING_COST_NS);
        // The first answer met a stall; the next two show what the endpoint really does.
        for ms in [12, 1, 2] {
            assert_eq!(e.cost(t0, 0), 0.0, "still on probation");
            e.observe(Duration::from_millis(ms), t0);
        }
        assert_eq!(ms_of(e.estimate(t0)), 1.0);
        assert_eq!(e.cost(t0, 1), 2.0 * 1e6);
    }

    /// The defect of the first version (and of tower's `PeakEwma`): reading the cost decayed
    /// the estimate and reset its clock, so faster samples that followed carried no weight.
    #[test]
    fn reading_the_cost_does_not_discount_the_next_sample() {
        let t0 = Instant::now();
        let mut e = measured(10, t0);
        // A thousand picks read the cost during the next second.
        for k in 0..1000 {
            e.cost(t0 + Duration::from_millis(k), 0);
        }
        let t1 = t0 + EWMA_DECAY;
        e.observe(Duration::from_millis(1), t1);
        let est = ms_of(e.estimate(t1));
        let want = 10.0 / std::f64::consts::E + (1.0 - 1.0 / std::f64::consts::E);
        assert!((est - want).abs() < 0.01, "{est} vs {want}");
    }

    #[test]
    fn cost_grows_with_inflight() {
        let e = Arc::new(ep());
        let now = Instant::now();
        for _ in 0..PROBATION_SAMPLES {
            e.observe_rtt(Duration::from_millis(5), now);
        }
        let idle = e.ewma_cost(now);
        let g = e.start();
        let busy = e.ewma_cost(now);
        assert!((busy - 2.0 * idle).abs() < 1.0, "{idle} {busy}");
        drop(g);
        assert_eq!(e.inflight(), 0);
    }

    #[test]
    fn unmeasured_endpoint_is_free_when_idle_and_dear_when_busy() {
        let e = Arc::new(ep());
        let now = Instant::now();
        assert_eq!(e.ewma_cost(now), 0.0);
        let g = e.start();
        assert!(e.ewma_cost(now) >= UNMEASURED_PENDING_COST_NS);
        drop(g);
        assert_eq!(e.rtt_estimate(), Duration::ZERO);
    }

    #[test]
    fn ejection_time_doubles_and_decays() {
        let cfg = OutlierDetection {
            consecutive_failures: 2,
            base_ejection_ms: 1000,
            max_ejection_percent: 100,
        };
        let e = ep();
        assert_eq!(e.record_failure(&cfg), None);
        let d = e.record_failure(&cfg).unwrap();
        assert_eq!(d, Duration::from_secs(1));
        assert!(e.eject(d, &cfg));
        assert!(e.is_ejected());
        // Force expiry, then a failing probe re-ejects at once, for twice as long.
        e.ejected_until.store(1, Ordering::Relaxed);
        assert_eq!(e.ejection(now_ms()), Ejection::Expired);
        let d = e.record_failure(&cfg).unwrap();
        assert_eq!(d, Duration::from_secs(2));
        assert!(e.eject(d, &cfg));
        e.ejected_until.store(1, Ordering::Relaxed);
        assert_eq!(e.ejection(now_ms()), Ejection::Expired);
        e.record_success();
        // Healthy again: needs the full run of failures before the next ejection.
        assert_eq!(e.record_failure(&cfg), None);
        assert_eq!(e.record_failure(&cfg), Some(Duration::from_secs(4)));
    }
}
