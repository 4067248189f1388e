//! Golden metrics per edge (source service -> destination service), computed from the proxies'
//! own counters the way PromQL would: rates from the difference of two scrapes over the time
//! between them, success rates from the same differences, and latency quantiles from the
//! difference of the cumulative histogram buckets (`histogram_quantile` over a window).
//!
//! The edge is read on the client side: the calling service's sidecar counts each request it
//! sends, with the destination service, the status and whether the hop used mTLS. That is the
//! latency the caller experiences, including the mTLS hop and the server sidecar.

use std::collections::BTreeMap;
use std::time::Instant;

use super::metrics::{OrdF64, Sample, quantile};

/// Names of the proxy's metrics and labels this view reads. Kept in one place because they are
/// the proxy's contract with every dashboard.
pub mod names {
    /// Counter of HTTP requests (OpenMetrics counters carry the `_total` suffix).
    pub const REQUESTS: &str = "trellis_proxy_requests_total";
    /// Histogram of response latency, in seconds.
    pub const LATENCY_BUCKET: &str = "trellis_proxy_response_latency_seconds_bucket";
    pub const DIRECTION: &str = "direction";
    pub const OUTBOUND: &str = "outbound";
    /// `name.namespace` of the destination service.
    pub const DST_SERVICE: &str = "dst_service";
    pub const STATUS: &str = "status_code";
    /// `"true"` when the hop used mTLS.
    pub const TLS: &str = "tls";
    /// Requests per backend Service after splits, labelled `backend`.
    pub const BACKEND_REQUESTS: &str = "trellis_proxy_traffic_requests_total";
    pub const BACKEND_RETRIES: &str = "trellis_proxy_traffic_retries_total";
    pub const BACKEND_EJECTIONS: &str = "trellis_proxy_traffic_ejections_total";
    /// Gauge: endpoints of the backend ejected right now.
    pub const BACKEND_EJECTED: &str = "trellis_proxy_traffic_ejected_endpoints";
    /// Config load attempts by `result` (`applied`, `rejected`).
    pub const CONFIG_RELOADS: &str = "trellis_proxy_config_reloads_total";
    /// Inbound connections refused, by `reason`.
    pub const INBOUND_REFUSED: &str = "trellis_proxy_inbound_refused_total";
    /// Counter of opaque TCP connections, counted once the connection to the destination
    /// (its sidecar, over mTLS when `tls="true"`) is made.
    pub const TCP_CONNECTIONS: &str = "trellis_proxy_tcp_connections_total";
}

/// One edge of the service graph, as the live view and the summary show it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EdgeKey {
    pub source: String,
    pub destination: String,
    pub mtls: bool,
}

/// Cumulative counters of one edge, summed over the source's replicas.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    pub requests: f64,
    /// Responses that are not 5xx (and transport failures the proxy reports as 5xx).
    pub successes: f64,
    /// Cumulative latency buckets (seconds).
    pub buckets: BTreeMap<OrdF64, f64>,
}

impl Counters {
    fn add(&mut self, other: &Counters) {
        self.requests += other.requests;
        self.successes += other.successes;
        for (le, c) in &other.buckets {
            *self.buckets.entry(*le).or_default() += c;
        }
    }

    /// `self - earlier`, treating a decrease (a restarted proxy) as a reset to zero.
    fn since(&self, earlier: &Counters) -> Counters {
        let d = |now: f64, then: f64| if now >= then { now - then } else { now };
        let reset = self.requests < earlier.requests;
        let zero = Counters::default();
        let earlier = if reset { &zero } else { earlier };
        Counters {
            requests: d(self.requests, earlier.requests),
            successes: d(self.successes, earlier.successes),
            buckets: self
                .buckets
                .iter()
                .map(|(le, c)| (*le, d(*c, earlier.buckets.get(le).copied().unwrap_or(0.0))))
                .collect(),
        }
    }

    fn bucket_vec(&self) -> Vec<(f64, f64)> {
        self.buckets.iter().map(|(le, c)| (le.0, *c)).collect()
    }
}

/// Whether an HTTP status (or gRPC-over-HTTP status) counts as a success for the golden
/// "success rate": everything below 500.
fn is_success(status: &str) -> bool {
    status.parse::<u16>().is_ok_and(|s| s < 500)
}

/// Extracts the outbound edges of one sidecar of service `source` from its scrape.
///
/// An opaque TCP edge counts connections as its requests, each a success: the sidecar counts
/// one only once the connection to the destination is made (mTLS handshake included); what the
/// bytes inside meant is the app's business. It has no latency.
///
/// The request counter says whether each request used mTLS; the latency histogram does not
/// (its labels are direction, destination and status class), so a destination's latency is
/// attached to its mTLS edge when there is one, else to its plaintext edge.
pub fn edges_from_scrape(source: &str, samples: &[Sample]) -> BTreeMap<EdgeKey, Counters> {
    let mut out: BTreeMap<EdgeKey, Counters> = BTreeMap::new();
    let mut latency: BTreeMap<String, BTreeMap<OrdF64, f64>> = BTreeMap::new();
    for s in samples {
        if s.label(names::DIRECTION) != Some(names::OUTBOUND) {
            continue;
        }
        let Some(dst) = s.label(names::DST_SERVICE) else {
            continue;
        };
        if s.name == names::REQUESTS {
            let key = EdgeKey {
                source: source.to_string(),
                destination: dst.to_string(),
                mtls: s.label(names::TLS) == Some("true"),
            };
            let c = out.entry(key).or_default();
            c.requests += s.value;
            if s.label(names::STATUS).is_some_and(is_success) {
                c.successes += s.value;
            }
        } else if s.name == names::TCP_CONNECTIONS {
            let c = out
                .entry(EdgeKey {
                    source: source.to_string(),
                    destination: dst.to_string(),
                    mtls: s.label(names::TLS) == Some("true"),
                })
                .or_default();
            c.requests += s.value;
            c.successes += s.value;
        } else if s.name == names::LATENCY_BUCKET {
            let Some(le) = s.label("le").and_then(|l| match l {
                "+Inf" => Some(f64::INFINITY),
                l => l.parse().ok(),
            }) else {
                continue;
            };
            *latency
                .entry(dst.to_string())
                .or_default()
                .entry(OrdF64(le))
                .or_default() += s.value;
        }
    }
    for (dst, buckets) in latency {
        let key = |mtls| EdgeKey {
            source: source.to_string(),
            destination: dst.clone(),
            mtls,
        };
        let k = if out.contains_key(&key(true)) || !out.contains_key(&key(false)) {
            key(true)
        } else {
            key(false)
        };
        out.entry(k).or_default().buckets = buckets;
    }
    out
}

/// Requests the traffic layer of one sidecar of `source` sent to each backend Service, after
/// splits (a canary's share shows here; the request counter names the Service called).
/// How retries are counted is the traffic layer's business; this shows its counter as is.
pub fn backends_from_scrape(source: &str, samples: &[Sample]) -> BTreeMap<EdgeKey, Counters> {
    let mut out: BTreeMap<EdgeKey, Counters> = BTreeMap::new();
    for s in samples {
        if s.name != names::BACKEND_REQUESTS {
            continue;
        }
        let Some(backend) = s.label("backend") else {
            continue;
        };
        let c = out
            .entry(EdgeKey {
                source: source.to_string(),
                destination: backend.to_string(),
                mtls: true,
            })
            .or_default();
        c.requests += s.value;
        c.successes += s.value;
    }
    out
}

/// What a caller's traffic layer did for one backend: retries sent, endpoints ejected by
/// outlier detection (since start) and ejected now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BackendExtras {
    pub retries: f64,
    pub ejections: f64,
    pub ejected_now: f64,
}

impl BackendExtras {
    pub fn add(&mut self, o: &BackendExtras) {
        self.retries += o.retries;
        self.ejections += o.ejections;
        self.ejected_now += o.ejected_now;
    }
}

/// Reads [`BackendExtras`] per backend from one sidecar's scrape.
pub fn backend_extras(samples: &[Sample]) -> BTreeMap<String, BackendExtras> {
    let mut out: BTreeMap<String, BackendExtras> = BTreeMap::new();
    for s in samples {
        let Some(b) = s.label("backend") else {
            continue;
        };
        let e = match s.name.as_str() {
            names::BACKEND_RETRIES | names::BACKEND_EJECTIONS | names::BACKEND_EJECTED => {
                out.entry(b.to_string()).or_default()
            }
            _ => continue,
        };
        match s.name.as_str() {
            names::BACKEND_RETRIES => e.retries += s.value,
            names::BACKEND_EJECTIONS => e.ejections += s.value,
            _ => e.ejected_now += s.value,
        }
    }
    out
}

/// A sidecar's own counters the view shows next to its workload.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SidecarCounts {
    /// Config reloads applied (the first load included).
    pub reloads_applied: f64,
    /// Config files refused (the last good config stayed in force).
    pub reloads_rejected: f64,
    /// Inbound connections refused (plaintext under `Strict`, failed handshakes, over the cap on
    /// unauthenticated connections).
    pub inbound_refused: f64,
    /// Requests the sidecar passed to its app, and how many the app answered with a 5xx:
    /// the server-side view, before the callers' retries.
    pub served: f64,
    pub served_5xx: f64,
    /// Opaque TCP connections the sidecar passed to its app.
    pub tcp_served: f64,
}

impl SidecarCounts {
    pub fn add(&mut self, o: &SidecarCounts) {
        self.reloads_applied += o.reloads_applied;
        self.reloads_rejected += o.reloads_rejected;
        self.inbound_refused += o.inbound_refused;
        self.served += o.served;
        self.served_5xx += o.served_5xx;
        self.tcp_served += o.tcp_served;
    }

    pub fn describe(&self) -> String {
        let tcp = if self.tcp_served > 0.0 {
            format!(", opaque TCP connections {}", self.tcp_served)
        } else {
            String::new()
        };
        format!(
            "served {} (5xx {}){tcp}, inbound refused {}, configs applied {} rejected {}",
            self.served,
            self.served_5xx,
            self.inbound_refused,
            self.reloads_applied,
            self.reloads_rejected
        )
    }
}

/// Reads [`SidecarCounts`] from one sidecar's scrape.
pub fn sidecar_counts(samples: &[Sample]) -> SidecarCounts {
    let mut c = SidecarCounts::default();
    for s in samples {
        match s.name.as_str() {
            names::CONFIG_RELOADS => match s.label("result") {
                Some("applied") => c.reloads_applied += s.value,
                Some("rejected") => c.reloads_rejected += s.value,
                _ => {}
            },
            names::INBOUND_REFUSED => c.inbound_refused += s.value,
            names::TCP_CONNECTIONS if s.label(names::DIRECTION) == Some("inbound") => {
                c.tcp_served += s.value;
            }
            names::REQUESTS if s.label(names::DIRECTION) == Some("inbound") => {
                c.served += s.value;
                if s.label(names::STATUS).is_some_and(|st| !is_success(st)) {
                    c.served_5xx += s.value;
                }
            }
            _ => {}
        }
    }
    c
}

/// What the view shows for one edge.
#[derive(Clone, Debug, PartialEq)]
pub struct EdgeView {
    pub key: EdgeKey,
    /// Requests per second over the last window.
    pub rps: f64,
    /// Fraction of successful requests over the last window (`None` without requests).
    pub success: Option<f64>,
    /// Latency quantiles over the last window, in seconds.
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    /// Since the proxies started.
    pub total_requests: f64,
    pub total_successes: f64,
}

/// Keeps the last scrape of every sidecar and turns two successive scrapes into rates.
#[derive(Default)]
pub struct EdgeStats {
    /// Latest cumulative counters per scrape target (one sidecar), so a target that misses a
    /// scrape keeps its last values instead of looking like a counter reset.
    latest: BTreeMap<String, BTreeMap<EdgeKey, Counters>>,
    previous: Option<(Instant, BTreeMap<EdgeKey, Counters>)>,
}

impl EdgeStats {
    /// Records the scrape of one sidecar (`target` identifies it, e.g. its admin address).
    pub fn record(&mut self, target: &str, edges: BTreeMap<EdgeKey, Counters>) {
        self.latest.insert(target.to_string(), edges);
    }

    fn totals(&self) -> BTreeMap<EdgeKey, Counters> {
        let mut sum: BTreeMap<EdgeKey, Counters> = BTreeMap::new();
        for edges in self.latest.values() {
            for (k, c) in edges {
                sum.entry(k.clone()).or_default().add(c);
            }
        }
        sum
    }

    /// Closes a window at `now`: views computed against the previous window's totals.
    pub fn window(&mut self, now: Instant) -> Vec<EdgeView> {
        let totals = self.totals();
        let views = totals
            .iter()
            .map(|(key, total)| {
                let (delta, secs) = match &self.previous {
                    Some((then, prev)) => (
                        total.since(prev.get(key).unwrap_or(&Counters::default())),
                        now.saturating_duration_since(*then).as_secs_f64(),
                    ),
                    None => (Counters::default(), 0.0),
                };
                let buckets = delta.bucket_vec();
                EdgeView {
                    key: key.clone(),
                    rps: if secs > 0.0 {
                        delta.requests / secs
                    } else {
                        0.0
                    },
                    success: (delta.requests > 0.0).then(|| delta.successes / delta.requests),
                    p50: quantile(0.5, &buckets),
                    p99: quantile(0.99, &buckets),
                    total_requests: total.requests,
                    total_successes: total.successes,
                }
            })
            .collect();
        self.previous = Some((now, totals));
        views
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::dev::metrics::parse;

    fn scrape(ok: u64, fail: u64, fast: u64, slow: u64) -> Vec<Sample> {
        let text = format!(
            r#"trellis_proxy_requests_total{{direction="outbound",dst_service="catalog.shop",status_code="200",tls="true"}} {ok}
trellis_proxy_requests_total{{direction="outbound",dst_service="catalog.shop",status_code="503",tls="true"}} {fail}
trellis_proxy_requests_total{{direction="inbound",dst_service="frontend.shop",status_code="200",tls="true"}} 999
trellis_proxy_response_latency_seconds_bucket{{direction="outbound",dst_service="catalog.shop",status_class="2xx",le="0.01"}} {fast}
trellis_proxy_response_latency_seconds_bucket{{direction="outbound",dst_service="catalog.shop",status_class="2xx",le="0.1"}} {all}
trellis_proxy_response_latency_seconds_bucket{{direction="outbound",dst_service="catalog.shop",status_class="2xx",le="+Inf"}} {all}
"#,
            all = fast + slow
        );
        parse(&text).unwrap()
    }

    #[test]
    fn edges_read_outbound_side_only() {
        let e = edges_from_scrape("frontend.shop", &scrape(90, 10, 50, 50));
        assert_eq!(e.len(), 1);
        let (k, c) = e.iter().next().unwrap();
        assert_eq!(k.destination, "catalog.shop");
        assert!(k.mtls);
        assert_eq!((c.requests, c.successes), (100.0, 90.0));
    }

    /// An opaque TCP edge: the caller's outbound connections (each made over mTLS), not the
    /// server side's inbound ones.
    #[test]
    fn tcp_edges_count_outbound_connections() {
        let text = r#"trellis_proxy_tcp_connections_total{direction="outbound",dst_service="cache.shop",tls="true"} 12
trellis_proxy_tcp_connections_total{direction="inbound",dst_service="local",tls="true"} 99
trellis_proxy_tcp_transfer_bytes_total{direction="outbound",dst_service="cache.shop",tls="true",flow="from_client"} 400
"#;
        let e = edges_from_scrape("warmer.shop", &parse(text).unwrap());
        let key = EdgeKey {
            source: "warmer.shop".into(),
            destination: "cache.shop".into(),
            mtls: true,
        };
        assert_eq!(e.keys().collect::<Vec<_>>(), [&key]);
        assert_eq!((e[&key].requests, e[&key].successes), (12.0, 12.0));
        assert!(e[&key].buckets.is_empty());
    }

    #[test]
    fn rates_and_quantiles_come_from_the_window() {
        let mut st = EdgeStats::default();
        let t0 = Instant::now();
        // Two replicas of the caller.
        st.record(
            "a",
            edges_from_scrape("frontend.shop", &scrape(90, 10, 50, 50)),
        );
        st.record("b", edges_from_scrape("frontend.shop", &scrape(0, 0, 0, 0)));
        let first = st.window(t0);
        assert_eq!(first[0].rps, 0.0, "no rate before a second scrape");
        assert_eq!(first[0].total_requests, 100.0);
        // Two seconds later: a +40 ok (all fast), b +20 ok +20 failed (all slow).
        st.record(
            "a",
            edges_from_scrape("frontend.shop", &scrape(130, 10, 90, 50)),
        );
        st.record(
            "b",
            edges_from_scrape("frontend.shop", &scrape(20, 20, 0, 40)),
        );
        let v = &st.window(t0 + Duration::from_secs(2))[0];
        assert!((v.rps - 40.0).abs() < 1e-9, "{}", v.rps);
        assert!((v.success.unwrap() - 0.75).abs() < 1e-9);
        // 80 observations in the window: 40 <= 10 ms, 40 in (10 ms, 100 ms].
        assert!((v.p50.unwrap() - 0.01).abs() < 1e-9, "{:?}", v.p50);
        assert!((v.p99.unwrap() - (0.01 + 0.09 * (79.2 - 40.0) / 40.0)).abs() < 1e-9);
        assert_eq!(v.total_successes, 150.0);
    }

    #[test]
    fn backends_show_where_a_split_sent_requests() {
        let samples = parse(
            "trellis_proxy_traffic_requests_total{backend=\"reviews.shop\"} 90\n\
             trellis_proxy_traffic_requests_total{backend=\"reviews-v2.shop\"} 10\n\
             trellis_proxy_traffic_retries_total{backend=\"reviews.shop\"} 3\n",
        )
        .unwrap();
        let x = backend_extras(&samples);
        assert_eq!(x["reviews.shop"].retries, 3.0);
        let b = backends_from_scrape("frontend.shop", &samples);
        let v2 = b
            .iter()
            .find(|(k, _)| k.destination == "reviews-v2.shop")
            .unwrap();
        assert_eq!(v2.1.requests, 10.0);
        assert_eq!(b.len(), 2);
        let counts = sidecar_counts(
            &parse(
                "trellis_proxy_config_reloads_total{result=\"applied\"} 2\n\
                 trellis_proxy_config_reloads_total{result=\"rejected\"} 1\n\
                 trellis_proxy_inbound_refused_total{reason=\"plaintext\"} 4\n",
            )
            .unwrap(),
        );
        assert_eq!(
            (
                counts.reloads_applied,
                counts.reloads_rejected,
                counts.inbound_refused
            ),
            (2.0, 1.0, 4.0)
        );
    }

    #[test]
    fn a_restarted_proxy_is_a_reset_not_a_negative_rate() {
        let mut st = EdgeStats::default();
        let t0 = Instant::now();
        st.record("a", edges_from_scrape("f.s", &scrape(100, 0, 100, 0)));
        st.window(t0);
        st.record("a", edges_from_scrape("f.s", &scrape(5, 0, 5, 0)));
        let v = &st.window(t0 + Duration::from_secs(1))[0];
        assert_eq!(v.rps, 5.0);
        assert_eq!(v.success, Some(1.0));
    }
}
