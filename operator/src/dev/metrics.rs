//! Reading the proxies' `/metrics`: an OpenMetrics / Prometheus text parser and histogram
//! quantiles, so the live view shows exactly what a Prometheus server would compute.

use std::collections::BTreeMap;

/// Why a scrape could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("metrics line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

/// One sample: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, k: &str) -> Option<&str> {
        self.labels.get(k).map(String::as_str)
    }
}

/// Parses the text exposition format (OpenMetrics 1.0 and Prometheus 0.0.4). Comments, `# EOF`,
/// timestamps and exemplars are accepted and ignored.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |message: &str| ParseError {
            line: i + 1,
            message: format!("{message}: {raw:?}"),
        };
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .ok_or_else(|| err("no value"))?;
        let name = &line[..name_end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(err("bad metric name"));
        }
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(r) = rest.strip_prefix('{') {
            let (parsed, after) = parse_labels(r).map_err(&err)?;
            labels = parsed;
            rest = after;
        }
        let rest = rest.trim_start();
        // Drop an exemplar (` # {...} v`), then take the first field as the value.
        let rest = rest.split(" # ").next().unwrap_or("");
        let value_text = rest
            .split_whitespace()
            .next()
            .ok_or_else(|| err("no value"))?;
        let value = parse_value(value_text).ok_or_else(|| err("bad value"))?;
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(out)
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Parses `k="v",k2="v2"}` and returns the labels and what follows the `}`.
fn parse_labels(mut s: &str) -> Result<(BTreeMap<String, String>, &str), &'static str> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = s.find('=').ok_or("label without '='")?;
        let key = s[..eq].trim();
        if key.is_empty() {
            return Err("empty label name");
        }
        s = s[eq + 1..].trim_start();
        s = s.strip_prefix('"').ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value"),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated escape"),
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.insert(key.to_string(), value);
        s = s[end + 1..].trim_start();
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        } else if !s.starts_with('}') {
            return Err("expected ',' or '}' after a label");
        }
    }
}

/// Cumulative histogram buckets: `(upper bound, count of observations <= bound)`, ascending,
/// the last one `+Inf`.
pub type Buckets = Vec<(f64, f64)>;

/// Adds bucket counts with equal bounds (merging several series or replicas).
pub fn merge_buckets(into: &mut BTreeMap<OrdF64, f64>, le: f64, count: f64) {
    *into.entry(OrdF64(le)).or_default() += count;
}

/// An `f64` usable as a map key (bucket bounds are never NaN).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OrdF64(pub f64);
impl Eq for OrdF64 {}
impl PartialOrd for OrdF64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrdF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The `q` quantile (0..=1) of a cumulative histogram, interpolated linearly inside the bucket
/// the way Prometheus' `histogram_quantile` does: observations are assumed uniform within a
/// bucket, the lowest bucket starts at 0, and a quantile falling in `+Inf` reports the highest
/// finite bound. `None` when there are no observations.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 || !q.is_finite() {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let mut prev_bound = 0.0;
    let mut prev_count = 0.0;
    for &(bound, count) in buckets {
        if count >= rank && count > prev_count {
            if bound.is_infinite() {
                return Some(prev_bound);
            }
            let within = (rank - prev_count) / (count - prev_count);
            return Some(prev_bound + (bound - prev_bound) * within);
        }
        prev_bound = if bound.is_finite() { bound } else { prev_bound };
        prev_count = count;
    }
    Some(prev_bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openmetrics_text() {
        let text = r#"# HELP trellis_requests Requests.
# TYPE trellis_requests counter
trellis_requests_total{direction="outbound",dst="catalog.shop",tls="true"} 42
trellis_requests_total{direction="inbound",peer="spiffe://cluster.local/ns/a/sa/b",msg="a \"q\" \\ b"} 7 1700000000
trellis_latency_seconds_bucket{le="+Inf"} 3 # {trace_id="abc"} 0.2
trellis_up 1.5e3
# EOF
"#;
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].name, "trellis_requests_total");
        assert_eq!(s[0].label("dst"), Some("catalog.shop"));
        assert_eq!(s[0].value, 42.0);
        assert_eq!(s[1].label("msg"), Some("a \"q\" \\ b"));
        assert_eq!(s[1].value, 7.0);
        assert_eq!(s[2].label("le"), Some("+Inf"));
        assert_eq!(s[2].value, 3.0);
        assert_eq!(s[3].value, 1500.0);
    }

    #[test]
    fn malformed_lines_name_the_line() {
        let e = parse("ok 1\nbad{a=\"x} 1\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(parse("x{a=1} 2").is_err());
        assert!(parse("x{a=\"1\"}").is_err());
        assert!(parse("x{a=\"1\"} twelve").is_err());
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        // 100 observations: 50 in (0, 0.01], 40 in (0.01, 0.1], 10 in (0.1, 1].
        let b = vec![
            (0.01, 50.0),
            (0.1, 90.0),
            (1.0, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert!((quantile(0.5, &b).unwrap() - 0.01).abs() < 1e-12);
        // rank 70: 20 of the 40 in the second bucket -> halfway from 0.01 to 0.1.
        assert!((quantile(0.7, &b).unwrap() - 0.055).abs() < 1e-12);
        // rank 99: 9 of 10 in the third bucket.
        assert!((quantile(0.99, &b).unwrap() - 0.91).abs() < 1e-12);
        assert_eq!(quantile(0.5, &[(0.1, 0.0), (f64::INFINITY, 0.0)]), None);
        // Everything above the last finite bound reports that bound.
        let over = vec![(0.1, 0.0), (f64::INFINITY, 5.0)];
        assert_eq!(quantile(0.5, &over), Some(0.1));
    }
}
