//! W3C Trace Context (`traceparent`) and the sampling decision, as pure functions over bytes.
//!
//! Kept apart from the exporter so the rules (what continues a trace, what starts one, what is
//! left untouched) are tested without sockets, and so the per-request path allocates nothing:
//! parsing reads the header in place and formatting writes into a fixed 55-byte array.

use std::cell::RefCell;

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

/// A parsed `traceparent` (<https://www.w3.org/TR/trace-context/#traceparent-header>).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    /// The caller's span: the parent of the span this proxy records.
    pub parent_id: [u8; 8],
    pub flags: u8,
}

/// Bit 0 of `trace-flags`: the caller recorded (and wants recorded) this trace.
pub const SAMPLED: u8 = 0x01;

/// Length of a version-00 `traceparent`: `00-` + 32 + `-` + 16 + `-` + 2.
pub const LEN: usize = 55;

impl TraceParent {
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// Parses a header value. `None` for anything the W3C spec says to ignore: version `ff`,
    /// wrong lengths, upper-case or non-hex digits, all-zero ids. A later version is read by its
    /// version-00 prefix, as the spec asks.
    pub fn parse(v: &[u8]) -> Option<Self> {
        if v.len() < LEN {
            return None;
        }
        let version = hex_byte(&v[0..2])?;
        if version == 0xff || (version == 0 && v.len() != LEN) {
            return None;
        }
        if v.len() > LEN && v[LEN] != b'-' {
            return None;
        }
        if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, b) in trace_id.iter_mut().enumerate() {
            *b = hex_byte(&v[3 + 2 * i..5 + 2 * i])?;
        }
        let mut parent_id = [0u8; 8];
        for (i, b) in parent_id.iter_mut().enumerate() {
            *b = hex_byte(&v[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&v[53..55])?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            parent_id,
            flags,
        })
    }
}

/// The span this proxy records for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanIds {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The caller's span, when the request continued a trace.
    pub parent_id: Option<[u8; 8]>,
    pub flags: u8,
}

impl SpanIds {
    /// The `traceparent` to forward: same trace, this span as the parent of the next hop.
    pub fn traceparent(&self) -> [u8; LEN] {
        format(&self.trace_id, &self.span_id, self.flags)
    }
}

/// The chance of starting a trace, fixed once per tracer so the per-request decision is one
/// integer comparison against a uniform `u64` (no float conversion, no division).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampler {
    /// 0 % (or a NaN that validation let through): nothing is started, nothing is rolled.
    Never,
    /// 100 %: everything is started, nothing is rolled.
    Always,
    /// Start when the roll is below this: `percent / 100` of the `u64` range.
    Below(u64),
}

impl Sampler {
    pub fn new(percent: f64) -> Self {
        if percent.is_nan() || percent <= 0.0 {
            Self::Never
        } else if percent >= 100.0 {
            Self::Always
        } else {
            // Below 2^64 for any percent under 100; `as` saturates anyway.
            Self::Below((percent / 100.0 * 18_446_744_073_709_551_616.0) as u64)
        }
    }

    /// Whether a request without a usable `traceparent` starts a trace; `roll` (uniform over
    /// all `u64`) is called only when the answer depends on it.
    pub fn starts(self, roll: impl FnOnce() -> u64) -> bool {
        match self {
            Self::Never => false,
            Self::Always => true,
            Self::Below(t) => roll() < t,
        }
    }
}

/// Whether to record a span, given the request's `traceparent` (raw bytes, if any).
///
/// - A valid sampled parent is continued: same trace id, the caller's span as parent.
/// - A valid unsampled parent is honoured: no span, and the header is left as it came.
/// - No header, or one the spec says to ignore, starts a trace as `sampler` says (`roll` is
///   uniform over all `u64`).
///
/// `new_ids` is called only when a span is recorded, so an unsampled request draws no ids.
pub fn decide(
    incoming: Option<&[u8]>,
    sampler: Sampler,
    roll: impl FnOnce() -> u64,
    new_ids: impl FnOnce() -> ([u8; 16], [u8; 8]),
) -> Option<SpanIds> {
    match incoming.and_then(TraceParent::parse) {
        Some(p) if p.sampled() => Some(SpanIds {
            trace_id: p.trace_id,
            span_id: new_ids().1,
            parent_id: Some(p.parent_id),
            flags: p.flags,
        }),
        Some(_) => None,
        None => {
            if !sampler.starts(roll) {
                return None;
            }
            let (trace_id, span_id) = new_ids();
            Some(SpanIds {
                trace_id,
                span_id,
                parent_id: None,
                flags: SAMPLED,
            })
        }
    }
}

thread_local! {
    /// The sampling rolls and ids of this thread: Xoshiro256++ (rand's `SmallRng`), seeded once
    /// per thread from the OS through `rand::rng()`. Not `rand::rng()` itself: that is ChaCha12
    /// with periodic reseeding, built to be unpredictable, and its block refills were the
    /// largest single cost of a sampled request (`hack/bench-spans.rs` under `perf`). Trace and
    /// span ids need to be unique, not secret (they travel in clear headers); the OpenTelemetry
    /// SDK's own id generator makes the same choice.
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

/// A uniform `u64` from this thread's generator: the sampling roll.
pub fn roll() -> u64 {
    RNG.with(|r| r.borrow_mut().next_u64())
}

/// Random, non-zero ids (the spec forbids all-zero ones).
pub fn random_ids() -> ([u8; 16], [u8; 8]) {
    RNG.with(|r| {
        let mut r = r.borrow_mut();
        loop {
            let t = (u128::from(r.next_u64()) << 64 | u128::from(r.next_u64())).to_be_bytes();
            let s = r.next_u64().to_be_bytes();
            if t != [0; 16] && s != [0; 8] {
                return (t, s);
            }
        }
    })
}

/// Lower-case hex, as the spec requires.
pub fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[(b >> 4) as usize];
        out[2 * i + 1] = HEX[(b & 0xf) as usize];
    }
}

fn format(trace_id: &[u8; 16], span_id: &[u8; 8], flags: u8) -> [u8; LEN] {
    let mut out = [b'-'; LEN];
    out[0] = b'0';
    out[1] = b'0';
    hex_into(trace_id, &mut out[3..35]);
    hex_into(span_id, &mut out[36..52]);
    hex_into(&[flags], &mut out[53..55]);
    out
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    Some((nibble(two[0])? << 4) | nibble(two[1])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn ids() -> ([u8; 16], [u8; 8]) {
        ([0x11; 16], [0x22; 8])
    }

    #[test]
    fn parses_and_formats_round_trip() {
        let p = TraceParent::parse(TP).unwrap();
        assert!(p.sampled());
        assert_eq!(
            p.parent_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(format(&p.trace_id, &p.parent_id, p.flags), TP);
    }

    #[test]
    fn rejects_what_the_spec_says_to_ignore() {
        let bad: [&[u8]; 8] = [
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // upper case
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero parent id
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // version ff
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", // 00 with a tail
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",    // short
            b"00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // separator
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", // tail without dash
        ];
        for b in bad {
            assert_eq!(
                TraceParent::parse(b),
                None,
                "{}",
                String::from_utf8_lossy(b)
            );
        }
        // A later version is read by its version-00 prefix.
        let later = b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what";
        assert!(TraceParent::parse(later).is_some());
    }

    #[test]
    fn continues_a_sampled_parent_whatever_the_percentage() {
        let s = decide(Some(TP), Sampler::new(0.0), || unreachable!(), ids).unwrap();
        let p = TraceParent::parse(TP).unwrap();
        assert_eq!(s.trace_id, p.trace_id);
        assert_eq!(s.parent_id, Some(p.parent_id));
        assert_eq!(s.span_id, [0x22; 8]);
        let fwd = TraceParent::parse(&s.traceparent()).unwrap();
        assert_eq!(fwd.trace_id, p.trace_id, "same trace forwarded");
        assert_eq!(
            fwd.parent_id, [0x22; 8],
            "our span is the next hop's parent"
        );
        assert!(fwd.sampled());
    }

    #[test]
    fn honours_an_unsampled_parent() {
        let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let all = Sampler::new(100.0);
        assert_eq!(decide(Some(tp), all, || 0, || unreachable!()), None);
    }

    #[test]
    fn starts_traces_by_percentage() {
        let never = Sampler::new(0.0);
        assert_eq!(
            decide(None, never, || unreachable!(), || unreachable!()),
            None
        );
        let ten = Sampler::new(10.0);
        let Sampler::Below(edge) = ten else {
            panic!("{ten:?}")
        };
        // 10 % of the u64 range, to f64's precision.
        assert!(
            (edge as f64 / u64::MAX as f64 - 0.1).abs() < 1e-12,
            "{edge}"
        );
        assert_eq!(decide(None, ten, || edge, || unreachable!()), None);
        assert_eq!(decide(None, ten, || u64::MAX, || unreachable!()), None);
        let s = decide(None, ten, || edge - 1, ids).unwrap();
        assert_eq!(s.parent_id, None);
        assert_eq!(s.trace_id, [0x11; 16]);
        assert_eq!(s.flags, SAMPLED);
        assert!(decide(None, ten, || 0, ids).is_some());
        // 100 % starts everything without rolling.
        let all = Sampler::new(100.0);
        assert!(decide(None, all, || unreachable!(), ids).is_some());
        // A malformed header counts as none.
        assert!(decide(Some(b"garbage"), all, || unreachable!(), ids).is_some());
        assert_eq!(Sampler::new(f64::NAN), Sampler::Never);
        assert_eq!(Sampler::new(-1.0), Sampler::Never);
        assert_eq!(Sampler::new(250.0), Sampler::Always);
    }

    /// The thread's generator: the share of rolls a 1 % sampler starts is 1 % (within five
    /// standard deviations over 200 000 rolls), and ids are never zero and never repeat.
    #[test]
    fn the_thread_generator_samples_at_the_rate_and_draws_distinct_ids() {
        let one = Sampler::new(1.0);
        let n = 200_000u32;
        let started = (0..n).filter(|_| one.starts(roll)).count() as f64;
        let (mean, sd) = (f64::from(n) * 0.01, (f64::from(n) * 0.01 * 0.99).sqrt());
        assert!(
            (started - mean).abs() < 5.0 * sd,
            "{started} of {n} started"
        );
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let (t, s) = random_ids();
            assert_ne!(t, [0; 16]);
            assert_ne!(s, [0; 8]);
            assert!(seen.insert((t, s)), "an id pair repeated");
        }
        // Another thread draws its own sequence (seeded apart, not copied).
        let here: Vec<_> = (0..4).map(|_| roll()).collect();
        let there = std::thread::spawn(|| (0..4).map(|_| roll()).collect::<Vec<_>>())
            .join()
            .unwrap();
        assert_ne!(here, there);
    }
}
