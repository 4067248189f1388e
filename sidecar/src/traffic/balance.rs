//! Endpoint choice: P2C over peak-EWMA (default), least request, round robin, random, and
//! consistent hashing on a ring with virtual nodes.
//!
//! A pick never allocates. Ejected endpoints, endpoints whose one probe is busy and endpoints a
//! retry already tried are skipped; when that leaves nothing, the constraints are relaxed in
//! order (tried first, then ejection: Envoy's "panic mode"), so a request always has somewhere
//! to go while any endpoint exists.
//!
//! # P2C over peak-EWMA, and why it used to send ~8 % to a 10x slower endpoint
//!
//! Cost of an endpoint = latency estimate x (requests in flight + 1), as in Linkerd (tower's
//! `PeakEwma`) and Finagle; of two random endpoints the cheaper one wins. The estimate
//! ([`super::endpoint::PeakEwma`]) is fed with the time from handing the request to the pool to
//! its response headers: it includes waiting for a pooled stream and, for a new connection, the
//! connect and handshake, which is queueing the next request to that endpoint would see too.
//! It stops at headers because a body's length says more about the payload than about the
//! endpoint; the request still counts as in flight until its body ends.
//!
//! `hack/bench-lb.sh` (two 1 ms endpoints, one 10 ms, 500 requests/s) measured 7.9-8.2 % to the
//! slow endpoint and a p99 2.7x the fast endpoints'. The first version copied tower's estimator
//! and inherited three things that together made it balance by in-flight count alone:
//!
//! 1. Reading the cost (every pick, for two endpoints) decayed the stored estimate toward zero
//!    *and* reset its timestamp, so a faster sample that followed was weighted by the time since
//!    the last pick, microseconds against a 10 s time constant: it moved nothing. The estimate
//!    was "the highest sample, decayed toward zero", never an average of what was measured.
//! 2. A new endpoint (every endpoint of a fresh proxy) started at 30 ms. Since lower samples
//!    had no weight, the fast endpoints' estimates left 30 ms only by the 10 s decay, and the
//!    slow endpoint's 10 ms samples never exceeded them: for the first ~20 s all three looked
//!    alike and in-flight counts decided (round robin's and least request's numbers, near
//!    enough). In a steady state, a fast endpoint's estimate sat at its latest stall (one
//!    descheduled moment on a busy host), held for tens of seconds by the 10 s decay, so the
//!    (in-flight + 1) factor of a fast endpoint with two requests out still overtook the slow
//!    one.
//! 3. The same 10 s constant served two purposes: forgetting a one-off peak of an endpoint in
//!    use, and letting an unused endpoint's estimate drift down so it is probed again.
//!
//! Then: reading changed nothing; a lower sample was blended in by the time since the previous
//! *sample* with a 1 s constant; an endpoint without samples drifted toward zero with its own
//! 5 s constant ([`super::endpoint::EWMA_IDLE_DECAY`]), which probes an avoided endpoint again;
//! a higher sample still replaced the estimate, at most twofold per 100 ms; and a new endpoint
//! was put on probation for its first three answers: it costs nothing while idle and a
//! prohibitive amount per request in flight (Finagle's penalty), so it is tried at once, one
//! request at a time, and its estimate starts at the best of those answers (a stall only ever
//! adds latency). That took the share to 0.1-0.4 %, but on a 2-core host still 0.7-1.3 % in one
//! round of three, enough to own the p99: a peak estimator sits at the highest answers of the
//! last second, and the fast endpoints (answering in ~1.3 ms) looked 3-4 ms, as costly with two
//! requests in flight as the idle slow one. Now a higher sample is blended in too, with a
//! 50 ms constant ([`super::endpoint::EWMA_RISE`], by time, a sample standing for at most one
//! round trip) against 250 ms on the way down ([`super::endpoint::EWMA_DECAY`]): the estimate
//! is an upper expectile of recent answers instead of their maximum (1.3-1.4 ms there), quick
//! to follow a real slowdown and barely moved by one outlier or by a stalled client's burst of
//! late answers; the slow endpoint gets only its probes, every ~4 s (0.02-0.03 %). The
//! simulation tests below drive this core with a deterministic clock and a client that stalls
//! now and then.

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use rand::Rng;

/// Costs closer than this factor are a tie, settled by the random draw. Equal endpoints'
/// estimates differ only by sampling noise (a few percent), and with strict comparison the one
/// whose estimate happened to be lowest won nearly every comparison, and kept winning, since
/// an endpoint that gets no traffic only drifts down by the slow idle decay: a new fast
/// endpoint could sit at 6 % of the traffic beside two equals (13 % now, in the simulation of
/// `a_new_endpoint_is_neither_flooded_nor_starved`). A real difference (a slower endpoint, a
/// request already in flight: cost times two) is well outside it; a wider factor (1.25 was
/// tried) lets a busy client's fast endpoints, costed up by their requests in flight, tie with
/// a 10x slower idle one.
const NEAR_TIE: f64 = 1.1;

use super::endpoint::{Ejection, EndpointState};
use crate::config::LbAlgorithm;

/// Virtual nodes per endpoint on the hash ring. With 160 points per endpoint the share of each
/// endpoint stays within a few percent of 1/N, and adding or removing one endpoint moves about
/// 1/N of the keys (only the arcs its points own).
pub const VNODES: u32 = 160;

/// 64-bit FNV-1a followed by the murmur3 finalizer: stable across processes and builds (ring
/// positions must not depend on a random seed), and well mixed for short keys.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    fmix64(h)
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// Hash of a source IP, for `HashKey::SourceIp`.
pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => hash_bytes(&v4.octets()),
        IpAddr::V6(v6) => hash_bytes(&v6.octets()),
    }
}

fn addr_point(addr: SocketAddr, vnode: u32) -> u64 {
    let mut buf = [0u8; 16 + 2 + 4];
    let n = match addr.ip() {
        IpAddr::V4(v4) => {
            buf[..4].copy_from_slice(&v4.octets());
            4
        }
        IpAddr::V6(v6) => {
            buf[..16].copy_from_slice(&v6.octets());
            16
        }
    };
    buf[n..n + 2].copy_from_slice(&addr.port().to_be_bytes());
    buf[n + 2..n + 6].copy_from_slice(&vnode.to_be_bytes());
    hash_bytes(&buf[..n + 6])
}

/// Consistent-hash ring: sorted points, each owned by an endpoint index. Points depend only on
/// the endpoint's address, so rebuilding the ring after a change keeps every other arc.
#[derive(Debug)]
pub struct Ring {
    points: Vec<(u64, u32)>,
}

impl Ring {
    pub fn new(addrs: &[SocketAddr]) -> Self {
        let mut points = Vec::with_capacity(addrs.len() * VNODES as usize);
        for (i, a) in addrs.iter().enumerate() {
            for v in 0..VNODES {
                points.push((addr_point(*a, v), i as u32));
            }
        }
        points.sort_unstable();
        Self { points }
    }

    /// The first endpoint clockwise from `hash` that `ok` accepts.
    pub fn lookup(&self, hash: u64, mut ok: impl FnMut(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|(p, _)| *p < hash);
        let n = self.points.len();
        let mut last = u32::MAX;
        for k in 0..n {
            let idx = self.points[(start + k) % n].1;
            if idx != last {
                if ok(idx as usize) {
                    return Some(idx as usize);
                }
                last = idx;
            }
        }
        None
    }
}

/// The endpoints of one destination port, fixed between reloads.
#[derive(Debug)]
pub struct EndpointSet {
    pub(crate) eps: Vec<Arc<EndpointState>>,
    pub(crate) ring: Option<Ring>,
}

impl EndpointSet {
    pub(crate) fn new(eps: Vec<Arc<EndpointState>>, with_ring: bool) -> Self {
        let ring = with_ring.then(|| Ring::new(&eps.iter().map(|e| e.addr).collect::<Vec<_>>()));
        Self { eps, ring }
    }

    pub fn len(&self) -> usize {
        self.eps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.eps.is_empty()
    }
}

/// One pick: the endpoint set, what a retry already tried, and expiry notices for the gauge.
pub(crate) struct Pick<'a> {
    pub set: &'a EndpointSet,
    pub tried: &'a [usize],
    pub now_ms: u64,
    pub now: Instant,
    /// Ejections found expired during this pick (the ejected gauge goes down by this much).
    pub expired: Cell<u32>,
}

impl Pick<'_> {
    fn ok(&self, i: usize, respect_tried: bool, respect_ejection: bool) -> bool {
        if respect_tried && self.tried.contains(&i) {
            return false;
        }
        if respect_ejection {
            let ep = &self.set.eps[i];
            match ep.ejection(self.now_ms) {
                Ejection::Ejected => return false,
                Ejection::Expired => self.expired.set(self.expired.get() + 1),
                Ejection::No => {}
            }
            if ep.probe_busy() {
                return false;
            }
        }
        true
    }

    /// Picks an endpoint index; `None` only when the set is empty.
    pub fn choose(&self, algo: LbAlgorithm, rr: &AtomicUsize, hash: Option<u64>) -> Option<usize> {
        if self.set.is_empty() {
            return None;
        }
        for (tried, ejection) in [(true, true), (false, true), (true, false), (false, false)] {
            let ok = |i: usize| self.ok(i, tried, ejection);
            let got = match (algo, hash, &self.set.ring) {
                (LbAlgorithm::ConsistentHash, Some(h), Some(ring)) => ring.lookup(h, ok),
                (LbAlgorithm::RoundRobin, ..) => {
                    let start = rr.fetch_add(1, Ordering::Relaxed);
                    self.first_from(start, usize::MAX, ok)
                }
                (LbAlgorithm::P2cEwma, ..) => self.p2c(ok, |e| e.ewma_cost(self.now)),
                (LbAlgorithm::LeastRequest, ..) => self.p2c(ok, |e| f64::from(e.inflight())),
                // Random, and consistent hashing without a key on this request.
                _ => {
                    let start = rand::rng().random_range(0..self.set.len());
                    self.first_from(start, usize::MAX, ok)
                }
            };
            if got.is_some() {
                return got;
            }
        }
        None
    }

    fn first_from(&self, start: usize, skip: usize, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.set.len();
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| i != skip && ok(i))
    }

    /// Power of two choices: two distinct random candidates, the cheaper wins, unless the two
    /// are within [`NEAR_TIE`] of each other: then the first (random) one does.
    fn p2c(
        &self,
        ok: impl Fn(usize) -> bool,
        cost: impl Fn(&EndpointState) -> f64,
    ) -> Option<usize> {
        let n = self.set.len();
        let mut rng = rand::rng();
        let a = self.first_from(rng.random_range(0..n), usize::MAX, &ok)?;
        if n == 1 {
            return Some(a);
        }
        let off = rng.random_range(1..n);
        let Some(b) = self.first_from((a + off) % n, a, &ok) else {
            return Some(a);
        };
        let (ca, cb) = (cost(&self.set.eps[a]), cost(&self.set.eps[b]));
        Some(if cb * NEAR_TIE < ca { b } else { a })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 8080)))
            .collect()
    }

    #[test]
    fn ring_moves_about_one_nth_of_keys() {
        let before = addrs(10);
        let mut after = before.clone();
        after.push(SocketAddr::from(([10, 9, 9, 9], 8080)));
        let (r1, r2) = (Ring::new(&before), Ring::new(&after));
        let keys = 20_000u32;
        let mut moved = 0;
        let mut counts = [0u32; 11];
        for k in 0..keys {
            let h = hash_bytes(format!("user-{k}").as_bytes());
            let a = before[r1.lookup(h, |_| true).unwrap()];
            let b = after[r2.lookup(h, |_| true).unwrap()];
            counts[r2.lookup(h, |_| true).unwrap()] += 1;
            if a != b {
                moved += 1;
                assert_eq!(b, after[10], "keys only move to the new endpoint");
            }
        }
        let frac = moved as f64 / keys as f64;
        // Ideal 1/11 = 0.091.
        assert!((0.06..0.13).contains(&frac), "moved {frac}");
        for c in counts {
            let share = c as f64 / keys as f64;
            assert!((0.06..0.13).contains(&share), "share {share} {counts:?}");
        }
    }

    #[test]
    fn ring_skips_rejected_endpoints_to_the_next() {
        let a = addrs(5);
        let r = Ring::new(&a);
        for k in 0..1000u32 {
            let h = hash_bytes(&k.to_be_bytes());
            let first = r.lookup(h, |_| true).unwrap();
            let second = r.lookup(h, |i| i != first).unwrap();
            assert_ne!(first, second);
            // Stable: the same key always falls over to the same endpoint.
            assert_eq!(second, r.lookup(h, |i| i != first).unwrap());
        }
    }

    /// A discrete-event simulation of one client on the pure balancer core: open-loop arrivals
    /// every `period`, each request completing after the latency its endpoint draws, on a clock
    /// the test drives. Returns how many requests each endpoint got while `count` was true.
    mod sim {
        use super::super::*;
        use crate::traffic::endpoint::{EndpointState, InflightGuard, now_ms_at};
        use rand::{Rng, SeedableRng, rngs::StdRng};
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        use std::time::Duration;

        /// Base latency of each endpoint over time (ms), by simulated time.
        pub type Latency = dyn Fn(usize, Duration) -> f64;

        pub struct Sim {
            pub eps: Vec<Arc<EndpointState>>,
            pub t0: Instant,
            pub now: Duration,
            rng: StdRng,
            /// (observed at, endpoint, sent at, guard id)
            done: BinaryHeap<Reverse<(Duration, usize, Duration, u64)>>,
            guards: std::collections::HashMap<u64, InflightGuard>,
            seq: u64,
            /// The client's stalls (start, end): nothing it does happens inside one.
            stall: (Duration, Duration),
            /// Mean gap between stalls, and their longest length.
            stall_every: Duration,
            stall_max: Duration,
        }

        impl Sim {
            pub fn new(n: usize, seed: u64) -> Self {
                let t0 = Instant::now();
                let eps = (0..n)
                    .map(|i| {
                        Arc::new(EndpointState::new(
                            SocketAddr::from(([10, 0, 0, i as u8 + 1], 80)),
                            Arc::from(Vec::new()),
                        ))
                    })
                    .collect();
                Self {
                    eps,
                    t0,
                    now: Duration::ZERO,
                    rng: StdRng::seed_from_u64(seed),
                    done: BinaryHeap::new(),
                    guards: Default::default(),
                    seq: 0,
                    stall: (Duration::ZERO, Duration::ZERO),
                    stall_every: Duration::from_secs(1),
                    stall_max: Duration::from_millis(10),
                }
            }

            /// A busy, shared machine: the client is descheduled for up to `max`, on average
            /// every `every`. Work due during a stall happens at its end, all at once, and every
            /// request in flight measures the stall as part of its round trip.
            pub fn noise(&mut self, every: Duration, max: Duration) {
                self.stall_every = every;
                self.stall_max = max;
            }

            /// When the client gets to do what is due at `t`.
            fn release(&mut self, t: Duration) -> Duration {
                while self.stall.1 < t {
                    let gap = self.rng.random_range(0.0..2.0) * self.stall_every.as_secs_f64();
                    let start = self.stall.1 + Duration::from_secs_f64(gap);
                    let len = self.rng.random_range(0.0..1.0) * self.stall_max.as_secs_f64();
                    self.stall = (start, start + Duration::from_secs_f64(len));
                }
                if t >= self.stall.0 { self.stall.1 } else { t }
            }

            pub fn add(&mut self) -> usize {
                let i = self.eps.len();
                self.eps.push(Arc::new(EndpointState::new_at(
                    SocketAddr::from(([10, 0, 1, i as u8 + 1], 80)),
                    Arc::from(Vec::new()),
                    self.t0 + self.now,
                )));
                i
            }

            /// Runs `dur` of arrivals every `period`; `lat` gives an endpoint's base latency
            /// (ms) at a time, to which each request adds up to 20 % of jitter, and one in fifty
            /// 150 % (a healthy endpoint's tail: its p98 is 2.5x its median). Returns
            /// requests per endpoint.
            pub fn run(&mut self, dur: Duration, period: Duration, lat: &Latency) -> Vec<u64> {
                let mut counts = vec![0u64; self.eps.len()];
                let end = self.now + dur;
                let set = EndpointSet::new(self.eps.clone(), false);
                let rr = AtomicUsize::new(0);
                let mut arrival = self.now;
                while arrival < end {
                    arrival += period;
                    let at = self.release(arrival);
                    self.complete_until(at);
                    self.now = at;
                    let now = self.t0 + at;
                    let pick = Pick {
                        set: &set,
                        tried: &[],
                        now_ms: now_ms_at(now),
                        now,
                        expired: Default::default(),
                    };
                    let i = pick.choose(LbAlgorithm::P2cEwma, &rr, None).unwrap();
                    counts[i] += 1;
                    let base = lat(i, at);
                    let mut jitter = self.rng.random_range(0.0..0.2) * base;
                    if self.rng.random_ratio(1, 50) {
                        jitter += 1.5 * base;
                    }
                    let answered = at + Duration::from_secs_f64((base + jitter) / 1000.0);
                    let observed = self.release(answered);
                    self.seq += 1;
                    self.guards.insert(self.seq, self.eps[i].start());
                    self.done.push(Reverse((observed, i, at, self.seq)));
                }
                self.now = arrival;
                counts
            }

            fn complete_until(&mut self, t: Duration) {
                while let Some(Reverse((at, i, sent, seq))) = self.done.peek().copied() {
                    if at > t {
                        break;
                    }
                    self.done.pop();
                    let guard = self.guards.remove(&seq).unwrap();
                    self.eps[i].observe_rtt(at - sent, self.t0 + at);
                    drop(guard);
                }
            }
        }
    }

    fn share(counts: &[u64], i: usize) -> f64 {
        counts[i] as f64 / counts.iter().sum::<u64>() as f64
    }

    const RATE_500: Duration = Duration::from_millis(2);
    const RATE_1000: Duration = Duration::from_millis(1);

    /// The bench's scenario (`hack/bench-lb.sh`): two fast endpoints and one 10x slower, 1000
    /// requests/s from a fresh balancer, 2 s of warm-up then 10 s measured, on a client that
    /// stalls now and then, endpoints with a tail. The first estimator sent 5-10 % here: it
    /// started every endpoint at 30 ms and let no faster sample pull that down, so for its first
    /// ~20 s it balanced by in-flight count alone. The peak estimator after it (a higher sample
    /// replaced the estimate) sent 0.07-1.8 %: the fast endpoints' tails held their estimates
    /// up. Now 0.02-0.07 %.
    #[test]
    fn p2c_ewma_starves_a_ten_times_slower_endpoint() {
        for (fast, slow) in [(1.0, 10.0), (5.0, 50.0)] {
            for seed in 0..3 {
                let mut s = sim::Sim::new(3, seed);
                let lat = move |i: usize, _| if i == 2 { slow } else { fast };
                s.run(Duration::from_secs(2), RATE_1000, &lat);
                let counts = s.run(Duration::from_secs(10), RATE_1000, &lat);
                let sh = share(&counts, 2);
                assert!(
                    sh < 0.003,
                    "{fast}/{slow} ms, seed {seed}: slow endpoint got {sh}: {counts:?}"
                );
                // ... and in the long run, not only after a fresh start.
                let counts = s.run(Duration::from_secs(60), RATE_1000, &lat);
                let sh = share(&counts, 2);
                assert!(
                    sh < 0.003,
                    "{fast}/{slow} ms, seed {seed}, steady: slow endpoint got {sh}: {counts:?}"
                );
            }
        }
    }

    /// A client descheduled for up to 40 ms twice a second (the load this benchmark met on a
    /// shared 2-core machine): every request in flight measures the stall, fast and slow
    /// alike, in a burst of samples when the client runs again. The peak estimator sent 0.8 % here
    /// (1 ms / 10 ms, the first seed); now at most 0.14 %.
    #[test]
    fn p2c_ewma_starves_a_slow_endpoint_on_a_very_busy_client() {
        for (fast, slow) in [(1.0, 10.0), (5.0, 50.0)] {
            for seed in 0..3 {
                let mut s = sim::Sim::new(3, seed);
                s.noise(Duration::from_millis(500), Duration::from_millis(40));
                let lat = move |i: usize, _| if i == 2 { slow } else { fast };
                s.run(Duration::from_secs(2), RATE_1000, &lat);
                let counts = s.run(Duration::from_secs(30), RATE_1000, &lat);
                let sh = share(&counts, 2);
                assert!(
                    sh < 0.003,
                    "{fast}/{slow} ms, seed {seed}: slow endpoint got {sh}: {counts:?}"
                );
            }
        }
    }

    /// A slow endpoint keeps being probed, so when it recovers it is noticed and gets its share
    /// back within a bounded time.
    #[test]
    fn a_recovered_endpoint_gets_traffic_back_within_bounded_time() {
        for seed in 0..3 {
            let mut s = sim::Sim::new(3, seed);
            let slow_until = Duration::from_secs(30);
            let lat =
                move |i: usize, t: Duration| if i == 2 && t < slow_until { 10.0 } else { 1.0 };
            let before = s.run(slow_until, RATE_500, &lat);
            assert!(share(&before, 2) < 0.01, "{before:?}");
            // Recovered at 30 s: within 15 s it is probed and back in rotation. Among equal
            // endpoints the one with the lowest estimate wins each comparison, so shares are
            // uneven (about 20 % against 40 % here): back in rotation means a real share.
            s.run(Duration::from_secs(15), RATE_500, &lat);
            let after = s.run(Duration::from_secs(20), RATE_500, &lat);
            let sh = share(&after, 2);
            assert!(
                sh > 0.1,
                "seed {seed}: recovered endpoint got {sh}: {after:?}"
            );
        }
    }

    /// An endpoint nothing was measured on gets one request at a time until its first answer
    /// (not flooded while it may be slow), then its fair share if it is fast (not starved).
    #[test]
    fn a_new_endpoint_is_neither_flooded_nor_starved() {
        for seed in 0..10 {
            // A new fast endpoint joins two warmed-up ones: it is tried at once, and over the
            // next seconds gets a real share (not yet its third: near-ties go to the random
            // draw, but estimates further apart than NEAR_TIE still decide; before that, the
            // lowest estimate won every comparison and it could sit at 6 %).
            let mut s = sim::Sim::new(2, seed);
            let lat = |_: usize, _| 1.0;
            s.run(Duration::from_secs(20), RATE_500, &lat);
            let new = s.add();
            let first = s.run(Duration::from_millis(20), RATE_500, &lat);
            assert!(first[new] >= 1, "seed {seed}: not tried at once: {first:?}");
            let next = s.run(Duration::from_secs(10), RATE_500, &lat);
            let sh = share(&next, new);
            assert!(
                sh > 0.1,
                "seed {seed}: new fast endpoint got {sh} in its first 10 s: {next:?}"
            );

            // A new endpoint that turns out 50x slower: while its first request is out (50 ms,
            // 25 arrivals) it gets no more, and afterwards it is starved like any slow one.
            let mut s = sim::Sim::new(2, seed);
            s.noise(Duration::from_secs(1), Duration::ZERO);
            let lat = |i: usize, _| if i == 2 { 50.0 } else { 1.0 };
            s.run(Duration::from_secs(20), RATE_500, &lat);
            let new = s.add();
            let first = s.run(Duration::from_millis(40), RATE_500, &lat);
            assert!(
                first[new] <= 1,
                "seed {seed}: flooded before its first answer: {first:?}"
            );
            let rest = s.run(Duration::from_secs(5), RATE_500, &lat);
            let sh = share(&rest, new);
            assert!(
                sh < 0.003,
                "seed {seed}: slow new endpoint got {sh}: {rest:?}"
            );
        }
    }

    proptest::proptest! {
        /// Removing an endpoint moves exactly the keys it owned; nothing else changes owner.
        #[test]
        fn removal_moves_only_the_removed_endpoints_keys(n in 2u16..24, gone in 0usize..24, seed in 0u64..1000) {
            let before = addrs(n);
            let gone = gone % before.len();
            let mut after = before.clone();
            after.remove(gone);
            let (r1, r2) = (Ring::new(&before), Ring::new(&after));
            for k in 0..300u64 {
                let h = hash_bytes(&(seed * 1000 + k).to_be_bytes());
                let a = before[r1.lookup(h, |_| true).unwrap()];
                let b = after[r2.lookup(h, |_| true).unwrap()];
                if a != before[gone] {
                    proptest::prop_assert_eq!(a, b);
                }
            }
        }
    }
}
