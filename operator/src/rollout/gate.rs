//! The health gate: a restarted workload's new pods must serve no worse than its old pods did.
//!
//! The signal is each pod's own sidecar: its inbound golden metrics on the admin port
//! (`trellis_proxy_requests_total` and `trellis_proxy_response_latency_seconds` with
//! `direction="inbound"`), which is what the workload's callers experienced. A window is two
//! scrapes `window` apart and the difference of the counters between them, summed over the
//! workload's pods: the same computation Prometheus' `rate()` and `histogram_quantile()` make,
//! without needing a Prometheus. The baseline is the same measurement over the old pods just
//! before the restart.
//!
//! [`judge`] is pure. [`measure`] does the I/O through a [`Scrape`]: in a cluster the API
//! server's pod proxy ([`PodProxy`]; the admin port is public and read-only by design, and the
//! pod proxy needs no network path from the operator to the pod), locally a direct address
//! ([`Direct`], for `trellis dev` and tests).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, join_all};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioExecutor;

use super::observe::PodTarget;
use super::plan::{Verdict, Workload, WorkloadKey};
use crate::api::mesh::{GoldenSignals, HealthGateSpec, RolloutSpec, RolloutWorkload};
use crate::dev::metrics::{OrdF64, parse, quantile};

/// The sidecar's admin port.
pub const ADMIN_PORT: u16 = 15020;
/// A scrape larger than this is refused (a sidecar's metrics are a few KiB to a few hundred).
const MAX_SCRAPE: usize = 8 << 20;
/// A new p99 within this of the baseline's always passes: at millisecond scale a window's p99
/// moves by more than any sensible factor with scheduling noise alone (seen on a loaded CI
/// machine: 2.2 ms -> 11 ms for the same healthy app), which would fail healthy rollouts.
pub const P99_SLACK_SECONDS: f64 = 0.025;
/// How long one scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the gate could not measure.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("reading the metrics of pod {pod}: {message}")]
    Scrape { pod: String, message: String },
    #[error("the metrics of pod {pod} do not parse: {source}")]
    Parse {
        pod: String,
        #[source]
        source: crate::dev::metrics::ParseError,
    },
    #[error("no pod to measure")]
    NoPods,
}

/// Reads one pod's sidecar `/metrics`.
pub trait Scrape: Send + Sync {
    fn scrape<'a>(&'a self, pod: &'a PodTarget) -> BoxFuture<'a, Result<String, GateError>>;
}

/// Through the API server: `GET /api/v1/namespaces/<ns>/pods/<name>:15020/proxy/metrics`
/// (RBAC: `get` on `pods/proxy`).
pub struct PodProxy(pub kube::Client);

impl Scrape for PodProxy {
    fn scrape<'a>(&'a self, pod: &'a PodTarget) -> BoxFuture<'a, Result<String, GateError>> {
        Box::pin(async move {
            let path = format!(
                "/api/v1/namespaces/{}/pods/{}:{ADMIN_PORT}/proxy/metrics",
                pod.namespace, pod.name
            );
            let req = http::Request::get(path)
                .body(Vec::new())
                .map_err(|e| scrape_error(pod, e))?;
            let text = tokio::time::timeout(SCRAPE_TIMEOUT, self.0.request_text(req))
                .await
                .map_err(|_| scrape_error(pod, "timed out"))?
                .map_err(|e| scrape_error(pod, e))?;
            if text.len() > MAX_SCRAPE {
                return Err(scrape_error(pod, "response too large"));
            }
            Ok(text)
        })
    }
}

/// Maps a pod to its sidecar's admin address.
type Resolve = Arc<dyn Fn(&PodTarget) -> Option<SocketAddr> + Send + Sync>;

/// Straight to an admin address, `http://<addr>/metrics`; `resolve` maps a pod to it.
pub struct Direct {
    resolve: Resolve,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Empty<bytes::Bytes>,
    >,
}

impl Direct {
    pub fn new(resolve: impl Fn(&PodTarget) -> Option<SocketAddr> + Send + Sync + 'static) -> Self {
        Self {
            resolve: Arc::new(resolve),
            // A fresh connection per scrape: the two scrapes of a window are `window` apart, and
            // an admin server closing its idle connection meanwhile would fail the second.
            client: hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build_http(),
        }
    }

    /// The pod's IP on the admin port: what the operator reaches when it can route to pods.
    pub fn pod_ip() -> Self {
        Self::new(|p| Some(SocketAddr::new(p.ip.as_deref()?.parse().ok()?, ADMIN_PORT)))
    }
}

impl Scrape for Direct {
    fn scrape<'a>(&'a self, pod: &'a PodTarget) -> BoxFuture<'a, Result<String, GateError>> {
        Box::pin(async move {
            let addr = (self.resolve)(pod).ok_or_else(|| scrape_error(pod, "no address"))?;
            let uri: http::Uri = format!("http://{addr}/metrics")
                .parse()
                .map_err(|e| scrape_error(pod, e))?;
            let fetch = async {
                let resp = self
                    .client
                    .get(uri)
                    .await
                    .map_err(|e| scrape_error(pod, e))?;
                if !resp.status().is_success() {
                    return Err(scrape_error(pod, format!("HTTP {}", resp.status())));
                }
                let body = Limited::new(resp.into_body(), MAX_SCRAPE)
                    .collect()
                    .await
                    .map_err(|e| scrape_error(pod, e))?
                    .to_bytes();
                String::from_utf8(body.to_vec()).map_err(|e| scrape_error(pod, e))
            };
            tokio::time::timeout(SCRAPE_TIMEOUT, fetch)
                .await
                .map_err(|_| scrape_error(pod, "timed out"))?
        })
    }
}

fn scrape_error(pod: &PodTarget, e: impl ToString) -> GateError {
    GateError::Scrape {
        pod: format!("{}/{}", pod.namespace, pod.name),
        message: e.to_string(),
    }
}

/// Cumulative inbound counters of one scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    pub requests: f64,
    pub failures: f64,
    /// Latency histogram: upper bound -> cumulative count.
    pub buckets: BTreeMap<OrdF64, f64>,
}

impl Counters {
    /// The inbound counters in a scrape.
    pub fn from_text(text: &str) -> Result<Self, crate::dev::metrics::ParseError> {
        let mut c = Counters::default();
        for s in parse(text)? {
            if s.label("direction") != Some("inbound") {
                continue;
            }
            match s.name.as_str() {
                "trellis_proxy_requests_total" => {
                    c.requests += s.value;
                    if s.label("status_class") == Some("5xx") {
                        c.failures += s.value;
                    }
                }
                "trellis_proxy_response_latency_seconds_bucket" => {
                    let Some(le) = s.label("le").and_then(parse_le) else {
                        continue;
                    };
                    *c.buckets.entry(OrdF64(le)).or_default() += s.value;
                }
                _ => {}
            }
        }
        Ok(c)
    }

    /// What happened between `earlier` and `self`. A counter that went down was reset (the
    /// sidecar restarted), so everything it shows now happened in the window.
    fn since(&self, earlier: &Counters) -> Counters {
        if self.requests < earlier.requests {
            return self.clone();
        }
        Counters {
            requests: self.requests - earlier.requests,
            failures: (self.failures - earlier.failures).max(0.0),
            buckets: self
                .buckets
                .iter()
                .map(|(le, n)| (*le, (n - earlier.buckets.get(le).unwrap_or(&0.0)).max(0.0)))
                .collect(),
        }
    }

    fn add(&mut self, other: &Counters) {
        self.requests += other.requests;
        self.failures += other.failures;
        for (le, n) in &other.buckets {
            *self.buckets.entry(*le).or_default() += n;
        }
    }

    /// The golden signals of a window's counters.
    pub fn signals(&self) -> GoldenSignals {
        let buckets: Vec<(f64, f64)> = self.buckets.iter().map(|(le, n)| (le.0, *n)).collect();
        let requests = self.requests.max(0.0).round() as u64;
        GoldenSignals {
            requests,
            success_rate: if self.requests > 0.0 {
                1.0 - self.failures / self.requests
            } else {
                1.0
            },
            p99_seconds: if requests > 0 {
                quantile(0.99, &buckets)
            } else {
                None
            },
        }
    }
}

fn parse_le(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        _ => s.parse().ok(),
    }
}

async fn scrape_all(scraper: &dyn Scrape, pods: &[PodTarget]) -> Vec<Result<Counters, GateError>> {
    join_all(pods.iter().map(|p| async move {
        let text = scraper.scrape(p).await?;
        Counters::from_text(&text).map_err(|source| GateError::Parse {
            pod: format!("{}/{}", p.namespace, p.name),
            source,
        })
    }))
    .await
}

/// The golden signals of `pods` over `window`: a scrape of every pod, `window` later another,
/// the differences summed. Every pod must answer both times: a new pod whose sidecar cannot be
/// read cannot pass a gate.
pub async fn measure(
    scraper: &dyn Scrape,
    pods: &[PodTarget],
    window: Duration,
) -> Result<GoldenSignals, GateError> {
    if pods.is_empty() {
        return Err(GateError::NoPods);
    }
    let before = scrape_all(scraper, pods).await;
    let before = before.into_iter().collect::<Result<Vec<_>, _>>()?;
    tokio::time::sleep(window).await;
    let after = scrape_all(scraper, pods).await;
    let mut total = Counters::default();
    for (a, b) in after.into_iter().zip(&before) {
        total.add(&a?.since(b));
    }
    Ok(total.signals())
}

/// Whether `new` is healthy enough next to `baseline` (the old pods' window), under `gate`'s
/// thresholds. No traffic in the new window is nothing to judge and passes; no baseline
/// traffic means the new pods are held to a 100 % baseline success rate and latency is not
/// compared.
pub fn judge(
    baseline: Option<&GoldenSignals>,
    new: &GoldenSignals,
    gate: &HealthGateSpec,
    window: &str,
) -> Verdict {
    if new.requests == 0 {
        return Verdict::Pass;
    }
    let base = baseline.filter(|b| b.requests > 0);
    let base_rate = base.map_or(1.0, |b| b.success_rate);
    let floor = base_rate - gate.max_success_rate_drop_percent / 100.0;
    // A tolerance for the float arithmetic, far below one request in a million.
    if new.success_rate < floor - 1e-9 {
        return Verdict::Fail(format!(
            "success rate {:.1} % over {window} ({} requests) is more than {} point(s) below the baseline {:.1} %",
            new.success_rate * 100.0,
            new.requests,
            gate.max_success_rate_drop_percent,
            base_rate * 100.0
        ));
    }
    if let (Some(b), Some(n)) = (base.and_then(|b| b.p99_seconds), new.p99_seconds)
        && n > b * gate.max_p99_factor
        && n - b > P99_SLACK_SECONDS
    {
        return Verdict::Fail(format!(
            "p99 latency {:.1} ms over {window} is more than {}x the baseline {:.1} ms",
            n * 1000.0,
            gate.max_p99_factor,
            b * 1000.0
        ));
    }
    Verdict::Pass
}

/// The gate's verdicts on the workloads [`super::plan::awaiting_gate`] named: each one's pods on
/// `desired` measured over the spec's window and judged against the baseline its in-flight
/// entry carries. Shared by the cluster controller and `trellis dev`, so both gate alike.
pub async fn verdicts(
    scraper: &dyn Scrape,
    spec: &RolloutSpec,
    desired: &str,
    awaiting: &[(&RolloutWorkload, &Workload)],
    pods: &BTreeMap<WorkloadKey, Vec<PodTarget>>,
) -> BTreeMap<WorkloadKey, Verdict> {
    let window = crate::duration::parse(&spec.health_gate.window);
    join_all(awaiting.iter().map(|(flight, w)| {
        let new: Vec<PodTarget> = pods
            .get(&w.key)
            .into_iter()
            .flatten()
            .filter(|p| p.version == desired)
            .cloned()
            .collect();
        let window = window.clone();
        async move {
            let verdict = match window {
                Err(e) => Verdict::Fail(format!("spec.rollout.healthGate.window: {e}")),
                Ok(d) => match measure(scraper, &new, d).await {
                    Ok(now) => judge(
                        flight.baseline.as_ref(),
                        &now,
                        &spec.health_gate,
                        &spec.health_gate.window,
                    ),
                    Err(e) => Verdict::Fail(format!("cannot read the new pods' metrics: {e}")),
                },
            };
            (w.key.clone(), verdict)
        }
    }))
    .await
    .into_iter()
    .collect()
}

/// The baselines of the workloads about to restart: their current pods over `window`. A
/// workload whose pods cannot be read gets `None` (its new pods are then held to 100 %).
pub async fn baselines(
    scraper: &dyn Scrape,
    window: Option<Duration>,
    restarts: &[WorkloadKey],
    pods: &BTreeMap<WorkloadKey, Vec<PodTarget>>,
) -> BTreeMap<WorkloadKey, Option<GoldenSignals>> {
    let Some(window) = window else {
        return restarts.iter().map(|k| (k.clone(), None)).collect();
    };
    join_all(restarts.iter().map(|key| async move {
        let current = pods.get(key).cloned().unwrap_or_default();
        let b = match measure(scraper, &current, window).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::info!(workload = %key, error = %e, "no baseline; judging against 100 %");
                None
            }
        };
        (key.clone(), b)
    }))
    .await
    .into_iter()
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signals(requests: u64, success_rate: f64, p99: Option<f64>) -> GoldenSignals {
        GoldenSignals {
            requests,
            success_rate,
            p99_seconds: p99,
        }
    }

    #[test]
    fn judges_success_rate_against_the_baseline_margin() {
        let gate = HealthGateSpec::default();
        let base = signals(1000, 0.995, Some(0.010));
        assert_eq!(
            judge(Some(&base), &signals(100, 0.99, Some(0.010)), &gate, "30s"),
            Verdict::Pass
        );
        let Verdict::Fail(why) = judge(Some(&base), &signals(100, 0.98, Some(0.010)), &gate, "30s")
        else {
            panic!("98 % is 1.5 points below 99.5 %");
        };
        assert!(why.contains("98.0 %") && why.contains("99.5 %"), "{why}");
        // No baseline traffic: held to 100 %.
        assert!(matches!(
            judge(None, &signals(10, 0.9, None), &gate, "30s"),
            Verdict::Fail(_)
        ));
        assert_eq!(
            judge(None, &signals(0, 1.0, None), &gate, "30s"),
            Verdict::Pass
        );
    }

    #[test]
    fn judges_p99_against_the_baseline_factor() {
        let gate = HealthGateSpec::default();
        let base = signals(1000, 1.0, Some(0.010));
        assert_eq!(
            judge(Some(&base), &signals(100, 1.0, Some(0.019)), &gate, "30s"),
            Verdict::Pass
        );
        let Verdict::Fail(why) = judge(Some(&base), &signals(100, 1.0, Some(0.05)), &gate, "30s")
        else {
            panic!("5x the baseline p99");
        };
        assert!(why.contains("p99"), "{why}");
    }

    #[test]
    fn counters_take_the_inbound_series_and_survive_a_reset() {
        let text = "\
trellis_proxy_requests_total{direction=\"inbound\",peer_identity=\"\",dst_service=\"local\",status_code=\"200\",status_class=\"2xx\",tls=\"true\"} 90
trellis_proxy_requests_total{direction=\"inbound\",peer_identity=\"\",dst_service=\"local\",status_code=\"503\",status_class=\"5xx\",tls=\"true\"} 10
trellis_proxy_requests_total{direction=\"outbound\",peer_identity=\"\",dst_service=\"x.shop\",status_code=\"503\",status_class=\"5xx\",tls=\"true\"} 50
trellis_proxy_response_latency_seconds_bucket{direction=\"inbound\",dst_service=\"local\",status_class=\"2xx\",le=\"0.01\"} 99
trellis_proxy_response_latency_seconds_bucket{direction=\"inbound\",dst_service=\"local\",status_class=\"2xx\",le=\"+Inf\"} 100
# EOF
";
        let c = Counters::from_text(text).unwrap();
        assert_eq!((c.requests, c.failures), (100.0, 10.0));
        let s = c.since(&Counters::default()).signals();
        assert_eq!(s.requests, 100);
        assert!((s.success_rate - 0.9).abs() < 1e-9);
        let mut later = c.clone();
        later.requests = 5.0;
        later.failures = 0.0;
        assert_eq!(later.since(&c).requests, 5.0, "a reset counts from zero");
    }
}
