//! Metrics of traffic decisions: one family per decision, labelled by backend Service.
//!
//! Handles for each destination are resolved when the config is applied (not per request), so
//! counting a request is an atomic increment with no label lookup or allocation.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// `name.namespace` of the Service.
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverflowLabels {
    pub backend: String,
    /// `requests`, `pending` or `connections`.
    pub limit: &'static str,
}

/// All traffic-layer metrics. Clones share the same series.
#[derive(Clone, Debug, Default)]
pub struct TrafficMetrics {
    pub requests: Family<BackendLabels, Counter>,
    pub retries: Family<BackendLabels, Counter>,
    pub retry_budget_exhausted: Family<BackendLabels, Counter>,
    pub ejections: Family<BackendLabels, Counter>,
    pub ejected: Family<BackendLabels, Gauge>,
    pub overflow: Family<OverflowLabels, Counter>,
    pub rate_limited: Family<BackendLabels, Counter>,
    pub inbound_rate_limited: Counter,
    pub timeouts: Family<BackendLabels, Counter>,
}

impl TrafficMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers every family under the `traffic` prefix (`traffic_retries_total`, ...).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("traffic");
        r.register(
            "requests",
            "Requests dispatched, by backend Service (after splits)",
            self.requests.clone(),
        );
        r.register(
            "retries",
            "Retries sent (attempts after the first)",
            self.retries.clone(),
        );
        r.register(
            "retry_budget_exhausted",
            "Retries refused because the retry budget was empty",
            self.retry_budget_exhausted.clone(),
        );
        r.register(
            "ejections",
            "Endpoints ejected by outlier detection",
            self.ejections.clone(),
        );
        r.register(
            "ejected_endpoints",
            "Endpoints currently ejected (updated when traffic notices the expiry)",
            self.ejected.clone(),
        );
        r.register(
            "overflow",
            "Requests refused with 503 by a circuit-breaker limit",
            self.overflow.clone(),
        );
        r.register(
            "rate_limited",
            "Outbound requests refused with 429 by the local rate limit",
            self.rate_limited.clone(),
        );
        r.register(
            "inbound_rate_limited",
            "Inbound requests refused with 429 by the per-source rate limit",
            self.inbound_rate_limited.clone(),
        );
        r.register(
            "timeouts",
            "Requests answered 504 because the request timeout expired",
            self.timeouts.clone(),
        );
    }

    pub(crate) fn for_backend(&self, backend: &str) -> DestMetrics {
        let l = BackendLabels {
            backend: backend.to_string(),
        };
        let o = |limit| {
            self.overflow.get_or_create_owned(&OverflowLabels {
                backend: backend.to_string(),
                limit,
            })
        };
        DestMetrics {
            requests: self.requests.get_or_create_owned(&l),
            retries: self.retries.get_or_create_owned(&l),
            budget_exhausted: self.retry_budget_exhausted.get_or_create_owned(&l),
            ejections: self.ejections.get_or_create_owned(&l),
            ejected: self.ejected.get_or_create_owned(&l),
            overflow_requests: o("requests"),
            overflow_pending: o("pending"),
            overflow_connections: o("connections"),
            rate_limited: self.rate_limited.get_or_create_owned(&l),
            timeouts: self.timeouts.get_or_create_owned(&l),
        }
    }
}

/// Pre-resolved series of one backend.
#[derive(Clone, Debug)]
pub(crate) struct DestMetrics {
    pub requests: Counter,
    pub retries: Counter,
    pub budget_exhausted: Counter,
    pub ejections: Counter,
    pub ejected: Gauge,
    pub overflow_requests: Counter,
    pub overflow_pending: Counter,
    pub overflow_connections: Counter,
    pub rate_limited: Counter,
    pub timeouts: Counter,
}
