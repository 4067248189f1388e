//! Endpoint choice: P2C over peak-EWMA (default), least request, round robin, random, and
//! consistent hashing on a ring with virtual nodes.
//!
//! A pick never allocates. Ejected endpoints, endpoints whose one probe is busy and endpoints a
//! retry already tried are skipped; when that leaves nothing, the constraints are relaxed in
//! order (tried first, then ejection: Envoy's "panic mode"), so a request always has somewhere
//! to go while any endpoint exists.

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use rand::Rng;

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

    /// Power of two choices: two distinct random candidates, the cheaper wins.
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
        Some(if cb < ca { b } else { a })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
