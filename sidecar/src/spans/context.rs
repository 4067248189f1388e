//! W3C Trace Context (`traceparent`) and the sampling decision, as pure functions over bytes.
//!
//! Kept apart from the exporter so the rules (what continues a trace, what starts one, what is
//! left untouched) are tested without sockets, and so the per-request path allocates nothing:
//! parsing reads the header in place and formatting writes into a fixed 55-byte array.

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

/// Whether to record a span, given the request's `traceparent` (raw bytes, if any).
///
/// - A valid sampled parent is continued: same trace id, the caller's span as parent.
/// - A valid unsampled parent is honoured: no span, and the header is left as it came.
/// - No header, or one the spec says to ignore, starts a trace with probability
///   `percent / 100` (`roll` is uniform in `[0, 1)`).
///
/// `new_ids` is called only when a span is recorded, so an unsampled request draws no ids.
pub fn decide(
    incoming: Option<&[u8]>,
    percent: f64,
    roll: impl FnOnce() -> f64,
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
            if percent <= 0.0 || roll() * 100.0 >= percent {
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

/// Random, non-zero ids (the spec forbids all-zero ones).
pub fn random_ids() -> ([u8; 16], [u8; 8]) {
    loop {
        let t: [u8; 16] = rand::random();
        let s: [u8; 8] = rand::random();
        if t != [0; 16] && s != [0; 8] {
            return (t, s);
        }
    }
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
        let s = decide(Some(TP), 0.0, || unreachable!(), ids).unwrap();
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
        assert_eq!(decide(Some(tp), 100.0, || 0.0, || unreachable!()), None);
    }

    #[test]
    fn starts_traces_by_percentage() {
        assert_eq!(decide(None, 0.0, || 0.0, || unreachable!()), None);
        assert_eq!(decide(None, 10.0, || 0.1, || unreachable!()), None);
        let s = decide(None, 10.0, || 0.099, ids).unwrap();
        assert_eq!(s.parent_id, None);
        assert_eq!(s.trace_id, [0x11; 16]);
        assert_eq!(s.flags, SAMPLED);
        assert!(decide(None, 100.0, || 0.999_999, ids).is_some());
        // A malformed header counts as none.
        assert!(decide(Some(b"garbage"), 100.0, || 0.5, ids).is_some());
    }
}
