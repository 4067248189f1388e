//! Durations as users write them in CRs: `500ms`, `2s`, `1m30s`, `24h`.
//!
//! One parser for every duration field, so the CEL pattern in the CRDs, the compiler and the CA
//! agree on what is valid.

use std::time::Duration;

/// The regex the CRD schemas use for duration fields; [`parse`] accepts exactly these strings.
pub const PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {why} (use e.g. 500ms, 2s, 1m30s, 24h)")]
pub struct DurationError {
    pub input: String,
    pub why: &'static str,
}

/// Parses a sequence of `<digits><unit>` with units `ms`, `s`, `m`, `h`.
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let err = |why| DurationError {
        input: input.to_string(),
        why,
    };
    if input.is_empty() {
        return Err(err("empty"));
    }
    let bytes = input.as_bytes();
    let mut i = 0;
    let mut total: u128 = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(err("expected a number"));
        }
        let n: u128 = input[start..i]
            .parse()
            .map_err(|_| err("number too large"))?;
        let unit_ms: u128 = if input[i..].starts_with("ms") {
            i += 2;
            1
        } else {
            let u = match bytes.get(i) {
                Some(b's') => 1_000,
                Some(b'm') => 60_000,
                Some(b'h') => 3_600_000,
                _ => return Err(err("expected a unit (ms, s, m, h)")),
            };
            i += 1;
            u
        };
        total = total
            .checked_add(n.checked_mul(unit_ms).ok_or_else(|| err("too large"))?)
            .ok_or_else(|| err("too large"))?;
    }
    let ms = u64::try_from(total).map_err(|_| err("too large"))?;
    Ok(Duration::from_millis(ms))
}

/// Parses to whole milliseconds, the unit of the sidecar config.
pub fn parse_ms(input: &str) -> Result<u64, DurationError> {
    parse(input).map(|d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sequences() {
        assert_eq!(parse_ms("500ms").unwrap(), 500);
        assert_eq!(parse_ms("2s").unwrap(), 2_000);
        assert_eq!(parse_ms("1m30s").unwrap(), 90_000);
        assert_eq!(parse_ms("24h").unwrap(), 86_400_000);
        assert_eq!(parse_ms("1h1m1s1ms").unwrap(), 3_661_001);
    }

    #[test]
    fn refuses_nonsense() {
        for bad in [
            "",
            "5",
            "s",
            "1.5s",
            "-1s",
            "5d",
            "5 s",
            "1s2",
            "99999999999999999999999h",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
