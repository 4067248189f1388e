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
/// EWMA between samples). Short enough that one stalled sample (a busy client, a GC pause) is
/// forgotten within a second or two of traffic, instead of marking a fast endpoint as slow for
/// tens of seconds; a higher sample still takes over at once (peak).
pub const EWMA_DECAY: Duration = Duration::from_secs(1);
/// How fast the estimate of an endpoint that gets no traffic drifts toward zero, which is what
/// makes the balancer probe it again. An endpoint 10x slower than its peers is tried about every
/// `ln(10) * EWMA_IDLE_DECAY` ≈ 12 s: a negligible share, yet a recovery is noticed within that.
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
/// A sample above the estimate raises it at most this many times per [`PEAK_RISE_WINDOW`].
/// Peak-sensitive still (a 10x slowdown is followed within four windows), but a stall (the
/// client was descheduled) doubles a fast endpoint's estimate instead of making it look as
/// slow as the slow endpoint, which is how a slow endpoint used to get a share after every
/// stall.
const PEAK_RISE_MAX: f64 = 2.0;
/// Rises closer together than this count as one: the burst of samples that completes when a
/// stalled client runs again measures the client, not the endpoint, and must not compound.
const PEAK_RISE_WINDOW: Duration = Duration::from_millis(100);
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

/// Peak-EWMA round-trip estimate: a slower sample replaces the estimate at once (peak), faster
/// samples pull it down exponentially with the time since the previous sample
/// ([`EWMA_DECAY`]), and while no sample comes the estimate the balancer sees drifts toward zero
/// ([`EWMA_IDLE_DECAY`]), so an avoided endpoint is probed again.
///
/// Reading it changes nothing, which is where this departs from tower's `PeakEwma` (and from
/// this module's first version): there, computing the cost decays the stored estimate toward
/// zero *and* moves its timestamp, so a faster sample that follows is weighted by the few
/// microseconds since the last pick (about 0.00003 at 500 requests/s with a 10 s decay) and
/// changes nothing. The estimate was then only "the highest sample, decayed toward zero", never
/// an average: fast endpoints sat at their stalls and slow endpoints looked no worse.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PeakEwma {
    /// Estimate in nanoseconds as of the last sample; `None` before the first one.
    rtt_ns: Option<f64>,
    sampled: Instant,
    /// Samples so far, counted up to [`PROBATION_SAMPLES`].
    samples: u8,
    /// The estimate before the current run of rises, and when that run began: rises within
    /// [`PEAK_RISE_WINDOW`] of each other are capped together.
    rise_base: f64,
    rise_at: Instant,
}

impl PeakEwma {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            rtt_ns: None,
            sampled: now,
            samples: 0,
            rise_base: 0.0,
            rise_at: now,
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
                if now.saturating_duration_since(self.rise_at) >= PEAK_RISE_WINDOW
                    || self.rise_base == 0.0
                {
                    self.rise_base = est;
                    self.rise_at = now;
                }
                rtt.min(self.rise_base * PEAK_RISE_MAX).max(est)
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
    fn peak_ewma_jumps_up_and_decays_down() {
        let t0 = Instant::now();
        let mut e = measured(100, t0);
        assert_eq!(ms_of(e.estimate(t0)), 100.0);
        // A fast sample one decay constant later pulls the estimate most of the way (1 - 1/e).
        let t1 = t0 + EWMA_DECAY;
        e.observe(Duration::from_millis(1), t1);
        let est = ms_of(e.estimate(t1));
        let want = 100.0 / std::f64::consts::E + (1.0 - 1.0 / std::f64::consts::E);
        assert!((est - want).abs() < 0.01, "{est} vs {want}");
        // A slow sample raises it at once, at most twofold, and a burst of slow samples (a
        // stalled client catching up) no further: one stall is not taken at face value.
        for _ in 0..4 {
            e.observe(Duration::from_millis(500), t1);
        }
        assert!((ms_of(e.estimate(t1)) - 2.0 * want).abs() < 0.01);
        // A real slowdown keeps answering slowly and is followed within a few windows.
        let mut t = t1;
        for _ in 0..4 {
            t += PEAK_RISE_WINDOW;
            e.observe(Duration::from_millis(500), t);
        }
        assert_eq!(ms_of(e.estimate(t)), 500.0);
        // Without samples it drifts toward zero, so the endpoint is probed again.
        let t1 = t;
        let later = ms_of(e.estimate(t1 + EWMA_IDLE_DECAY));
        assert!(
            (later - 500.0 / std::f64::consts::E).abs() < 0.01,
            "{later}"
        );
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
