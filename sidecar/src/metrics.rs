//! Golden metrics, one registry (prefix `trellis_proxy`), served on the admin port in the
//! OpenMetrics text format.
//!
//! Cardinality is bounded by construction: label values come from the config (destination
//! `name.namespace`), from verified peer certificates (SPIFFE IDs), from status codes, or from
//! fixed sets. Request paths and client addresses are never labels. Label values are `Arc<str>`
//! so recording a request clones pointers, not strings.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::traffic::TrafficMetrics;

/// The content type `/metrics` is served with.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which listener saw the traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: &'static str,
    /// Verified SPIFFE ID of the other proxy; empty for plaintext.
    pub peer_identity: Arc<str>,
    /// `name.namespace` of the destination Service (outbound) or `local` (inbound); `unknown`
    /// when nothing in the config matched.
    pub dst_service: Arc<str>,
    pub status_code: u16,
    pub status_class: &'static str,
    pub tls: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LatencyLabels {
    pub direction: &'static str,
    pub dst_service: Arc<str>,
    pub status_class: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    pub direction: &'static str,
    pub dst_service: Arc<str>,
    pub tls: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpBytesLabels {
    pub direction: &'static str,
    pub dst_service: Arc<str>,
    pub tls: bool,
    /// `from_client` or `to_client`, relative to the side that opened the connection.
    pub flow: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RevisionLabels {
    pub revision: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RuntimeLabels {
    /// `current_thread` or `multi_thread`.
    pub flavor: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Every metric the proxy records.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    pub tcp_open: Family<TcpLabels, Gauge>,
    pub tcp_connections: Family<TcpLabels, Counter>,
    pub tcp_bytes: Family<TcpBytesLabels, Counter>,
    pub refused: Family<ReasonLabels, Counter>,
    pub config_reloads: Family<ResultLabels, Counter>,
    /// 1 while the newest config on disk is refused and an older one is in force.
    pub config_stale: Gauge,
    /// One series, value 1, labelled with the revision of the config in force: what a cluster
    /// tool (`trellis check --proxy`) compares with the ConfigMap, without the loopback-only
    /// `/config`.
    pub config_info: Family<RevisionLabels, Gauge>,
    /// One series, value 1, labelled with the proxy version this process says it is
    /// (`--proxy-version`): what a rollout counts when pods carry no annotation, as in
    /// `trellis dev`, where every local proxy is the same binary.
    pub proxy_info: Family<VersionLabels, Gauge>,
    pub cert_expiry: Gauge,
    /// Spans lost to a full export queue or a failed export (see [`crate::spans::export`]).
    pub spans_dropped: Counter,
    /// The runtime's worker threads, labelled with its flavour: benchmarks record it, and a
    /// dashboard can tell a proxy starved by a one-core allowance from a slow one.
    pub runtime_workers: Family<RuntimeLabels, Gauge>,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s: a proxy hop is sub-millisecond, application latency spans the rest.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 16,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::with_traffic(&TrafficMetrics::new())
    }

    /// The registry, with the traffic layer's families (`trellis_proxy_traffic_*`) in it too.
    pub fn with_traffic(traffic: &TrafficMetrics) -> Self {
        let mut registry = Registry::with_prefix("trellis_proxy");
        traffic.register(&mut registry);
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests completed, by direction, peer, destination and status",
            requests.clone(),
        );
        let latency = Family::<LatencyLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register_with_unit(
            "response_latency",
            "Time from request received to response headers sent",
            Unit::Seconds,
            latency.clone(),
        );
        let tcp_open = Family::<TcpLabels, Gauge>::default();
        registry.register(
            "tcp_connections_open",
            "Proxied connections currently open",
            tcp_open.clone(),
        );
        let tcp_connections = Family::<TcpLabels, Counter>::default();
        registry.register(
            "tcp_connections",
            "Proxied connections accepted",
            tcp_connections.clone(),
        );
        let tcp_bytes = Family::<TcpBytesLabels, Counter>::default();
        registry.register_with_unit(
            "tcp_transfer",
            "Bytes proxied at L4, published while connections are open and at close",
            Unit::Bytes,
            tcp_bytes.clone(),
        );
        let refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "inbound_refused",
            "Inbound connections refused (plaintext under Strict, failed handshakes, too many unauthenticated, evicted while unauthenticated)",
            refused.clone(),
        );
        let config_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config load attempts by result (applied, rejected)",
            config_reloads.clone(),
        );
        let config_stale = Gauge::default();
        registry.register(
            "config_stale",
            "1 while the config on disk is refused and the last good one is in force",
            config_stale.clone(),
        );
        let config_info = Family::<RevisionLabels, Gauge>::default();
        registry.register(
            "config_info",
            "1, labelled with the revision of the config in force",
            config_info.clone(),
        );
        // One series, `trellis_proxy_build_info{version} 1`, naming the version this process
        // runs as (`--proxy-version`, by default the crate's): dashboards count proxies per
        // version, the old-version alert compares it with the operator's own, and `trellis dev`
        // follows a local rollout by it. A gauge family rather than an OpenMetrics info so the
        // version can be set after start.
        let proxy_info = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "build_info",
            "1, labelled with the proxy version (--proxy-version) this process runs as",
            proxy_info.clone(),
        );
        proxy_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        let cert_expiry = Gauge::default();
        registry.register(
            "cert_expiry_timestamp_seconds",
            "Unix time at which the proxy's certificate expires",
            cert_expiry.clone(),
        );
        let spans_dropped = Counter::default();
        registry.register(
            "spans_dropped",
            "Trace spans dropped because the export queue was full or the collector did not take them",
            spans_dropped.clone(),
        );
        let runtime_workers = Family::<RuntimeLabels, Gauge>::default();
        registry.register(
            "runtime_workers",
            "Worker threads of the proxy's runtime, by runtime flavour",
            runtime_workers.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            tcp_open,
            tcp_connections,
            tcp_bytes,
            refused,
            config_reloads,
            config_stale,
            config_info,
            proxy_info,
            cert_expiry,
            spans_dropped,
            runtime_workers,
        }
    }

    /// Records the runtime the proxy runs on; once, at start.
    pub fn set_runtime(&self, flavor: crate::workers::Flavor, workers: usize) {
        self.runtime_workers.clear();
        self.runtime_workers
            .get_or_create(&RuntimeLabels {
                flavor: flavor.as_str(),
            })
            .set(i64::try_from(workers).unwrap_or(i64::MAX));
    }

    /// Makes `trellis_proxy_build_info` name `version` alone. Called once at start.
    pub fn set_proxy_version(&self, version: &str) {
        self.proxy_info.clear();
        self.proxy_info
            .get_or_create(&VersionLabels {
                version: version.to_string(),
            })
            .set(1);
    }

    /// Makes `config_info` name `revision` alone. Called once per applied config, never on the
    /// request path.
    pub fn set_config_revision(&self, revision: &str) {
        self.config_info.clear();
        self.config_info
            .get_or_create(&RevisionLabels {
                revision: revision.to_string(),
            })
            .set(1);
    }

    /// Records one completed HTTP request, reusing the series of the connection's previous
    /// request when the labels match. Requests on one connection almost always share their
    /// labels, and the family lookups (two label-set hashes, two read locks) are a measurable
    /// share of a proxied request's CPU.
    #[allow(clippy::too_many_arguments)]
    pub fn record_request_cached(
        &self,
        cache: &SeriesCache,
        direction: Direction,
        peer_identity: &Arc<str>,
        dst_service: &Arc<str>,
        status: u16,
        tls: bool,
        elapsed: Duration,
    ) {
        let mut slot = cache.0.lock().expect("series cache lock");
        let hit = slot.as_ref().is_some_and(|c| {
            c.direction == direction
                && c.status == status
                && c.tls == tls
                && same(&c.peer_identity, peer_identity)
                && same(&c.dst_service, dst_service)
        });
        if !hit {
            let (requests, latency) =
                self.series(direction, peer_identity, dst_service, status, tls);
            *slot = Some(CachedSeries {
                direction,
                peer_identity: peer_identity.clone(),
                dst_service: dst_service.clone(),
                status,
                tls,
                requests,
                latency,
            });
        }
        let c = slot.as_ref().expect("filled above");
        c.requests.inc();
        c.latency.observe(elapsed.as_secs_f64());
    }

    fn series(
        &self,
        direction: Direction,
        peer_identity: &Arc<str>,
        dst_service: &Arc<str>,
        status: u16,
        tls: bool,
    ) -> (Counter, Histogram) {
        let status_class = status_class(status);
        let requests = self.requests.get_or_create_owned(&RequestLabels {
            direction: direction.as_str(),
            peer_identity: peer_identity.clone(),
            dst_service: dst_service.clone(),
            status_code: status,
            status_class,
            tls,
        });
        let latency = self.latency.get_or_create_owned(&LatencyLabels {
            direction: direction.as_str(),
            dst_service: dst_service.clone(),
            status_class,
        });
        (requests, latency)
    }

    /// The registry in OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

fn same(a: &Arc<str>, b: &Arc<str>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// The series one connection last recorded into (see [`Metrics::record_request_cached`]).
/// Handles share their values with the family, so a cached handle counts into the same series
/// `/metrics` shows.
#[derive(Default)]
pub struct SeriesCache(std::sync::Mutex<Option<CachedSeries>>);

struct CachedSeries {
    direction: Direction,
    peer_identity: Arc<str>,
    dst_service: Arc<str>,
    status: u16,
    tls: bool,
    requests: Counter,
    latency: Histogram,
}

/// `2xx`, `4xx`, ... for a status code.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Counts an open connection until dropped.
pub struct OpenConn {
    gauge: Gauge,
}

impl OpenConn {
    pub fn new(metrics: &Metrics, labels: &TcpLabels) -> Self {
        metrics.tcp_connections.get_or_create(labels).inc();
        let gauge = metrics.tcp_open.get_or_create(labels).clone();
        gauge.inc();
        Self { gauge }
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// One connection's `tcp_transfer_bytes`, counted by the connection and published in batches.
///
/// The copy loop adds to counters that only this connection touches, so a write costs an
/// uncontended add instead of bouncing the family's shared cache line between every core that
/// carries traffic with the same labels. [`TcpBytesMeter::flush`] moves what accumulated into
/// the family; the last flush runs on drop, so the total is exact however the connection ends
/// (closed, failed, or cancelled by a policy change or shutdown), and no byte is published twice.
pub struct TcpBytesMeter {
    from_client: Flow,
    to_client: Flow,
}

struct Flow {
    pending: ByteCount,
    published: Counter,
}

impl Flow {
    fn flush(&self) {
        // `swap` hands every byte counted so far to exactly one flush.
        let n = self.pending.0.swap(0, Ordering::Relaxed);
        if n > 0 {
            self.published.inc_by(n);
        }
    }
}

/// Where the copy loop counts the bytes of one flow.
#[derive(Clone, Debug, Default)]
pub struct ByteCount(Arc<AtomicU64>);

impl ByteCount {
    pub fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl TcpBytesMeter {
    pub fn new(metrics: &Metrics, labels: &TcpLabels) -> Self {
        // The family's handles are looked up once, not per flush: the lookup takes its lock.
        let flow = |flow| Flow {
            pending: ByteCount::default(),
            published: metrics
                .tcp_bytes
                .get_or_create(&TcpBytesLabels {
                    direction: labels.direction,
                    dst_service: labels.dst_service.clone(),
                    tls: labels.tls,
                    flow,
                })
                .clone(),
        };
        Self {
            from_client: flow("from_client"),
            to_client: flow("to_client"),
        }
    }

    pub fn from_client(&self) -> ByteCount {
        self.from_client.pending.clone()
    }

    pub fn to_client(&self) -> ByteCount {
        self.to_client.pending.clone()
    }

    /// Publishes what was counted since the last flush.
    pub fn flush(&self) {
        self.from_client.flush();
        self.to_client.flush();
    }
}

impl Drop for TcpBytesMeter {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `trellis dev` counts a local rollout by this series: one, naming the version alone.
    #[test]
    fn proxy_info_names_the_version_it_was_started_as() {
        let m = Metrics::new();
        m.set_proxy_version("v1");
        m.set_proxy_version("v2");
        let text = m.encode();
        assert!(
            text.contains("trellis_proxy_build_info{version=\"v2\"} 1"),
            "{text}"
        );
        assert!(!text.contains("version=\"v1\""), "{text}");
        assert!(
            !text.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
            "{text}"
        );
    }

    #[test]
    fn encodes_requests_with_bounded_labels() {
        let m = Metrics::new();
        let peer: Arc<str> = "spiffe://cluster.local/ns/a/sa/b".into();
        let svc: Arc<str> = "reviews.shop".into();
        m.record_request_cached(
            &SeriesCache::default(),
            Direction::Outbound,
            &peer,
            &svc,
            503,
            true,
            Duration::from_millis(3),
        );
        let text = m.encode();
        assert!(
            text.contains("trellis_proxy_requests_total{direction=\"outbound\",peer_identity=\"spiffe://cluster.local/ns/a/sa/b\",dst_service=\"reviews.shop\",status_code=\"503\",status_class=\"5xx\",tls=\"true\"} 1"),
            "{text}"
        );
        assert!(text.contains("trellis_proxy_response_latency_seconds_bucket"));
        assert!(text.ends_with("# EOF\n"));
    }

    /// The proxy's version is a series of its own, so a dashboard can count proxies per version
    /// and an alert can find proxies left on an old one.
    #[test]
    fn exports_its_version() {
        let text = Metrics::new().encode();
        let want = format!(
            "trellis_proxy_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&want), "{want} not in:\n{text}");
    }

    #[test]
    fn cached_series_count_into_the_family() {
        let m = Metrics::new();
        let cache = SeriesCache::default();
        let peer: Arc<str> = "spiffe://cluster.local/ns/a/sa/b".into();
        let svc: Arc<str> = "reviews.shop".into();
        let other_svc: Arc<str> = "ratings.shop".into();
        let ms = Duration::from_millis(1);
        for (svc, status) in [
            (&svc, 200),
            (&svc, 200),
            (&svc, 503),
            (&other_svc, 200),
            (&svc, 200),
        ] {
            m.record_request_cached(&cache, Direction::Outbound, &peer, svc, status, true, ms);
        }
        // Equal labels in a different allocation hit the same series.
        let copy: Arc<str> = "reviews.shop".into();
        m.record_request_cached(&cache, Direction::Outbound, &peer, &copy, 200, true, ms);
        let text = m.encode();
        let count = |svc: &str, status: u16| {
            let series = format!(
                "trellis_proxy_requests_total{{direction=\"outbound\",peer_identity=\"{peer}\",dst_service=\"{svc}\",status_code=\"{status}\",status_class=\"{}\",tls=\"true\"}}",
                status_class(status)
            );
            text.lines()
                .find_map(|l| l.strip_prefix(series.as_str()))
                .map(|v| v.trim().parse::<u64>().unwrap())
        };
        assert_eq!(count("reviews.shop", 200), Some(4), "{text}");
        assert_eq!(count("reviews.shop", 503), Some(1), "{text}");
        assert_eq!(count("ratings.shop", 200), Some(1), "{text}");
        assert!(text.contains(
            "trellis_proxy_response_latency_seconds_count{direction=\"outbound\",dst_service=\"reviews.shop\",status_class=\"2xx\"} 4"
        ), "{text}");
    }

    #[test]
    fn tcp_bytes_are_published_by_flushes_once_each() {
        let m = Metrics::new();
        let labels = TcpLabels {
            direction: "outbound",
            dst_service: "db.shop".into(),
            tls: true,
        };
        let series = |flow| {
            format!(
                "trellis_proxy_tcp_transfer_bytes_total{{direction=\"outbound\",dst_service=\"db.shop\",tls=\"true\",flow=\"{flow}\"}}"
            )
        };
        let value = |text: &str, flow| {
            let series = series(flow);
            text.lines()
                .find_map(|l| l.strip_prefix(series.as_str()))
                .map(|v| v.trim().parse::<u64>().unwrap())
        };
        let meter = TcpBytesMeter::new(&m, &labels);
        let (up, down) = (meter.from_client(), meter.to_client());
        up.add(100);
        down.add(7);
        assert_eq!(
            value(&m.encode(), "from_client"),
            Some(0),
            "not before a flush"
        );
        meter.flush();
        up.add(20);
        let text = m.encode();
        assert_eq!(value(&text, "from_client"), Some(100), "{text}");
        assert_eq!(value(&text, "to_client"), Some(7), "{text}");
        meter.flush();
        meter.flush();
        up.add(3);
        drop(meter);
        let text = m.encode();
        assert_eq!(value(&text, "from_client"), Some(123), "{text}");
        assert_eq!(value(&text, "to_client"), Some(7), "{text}");
    }
}
