//! Every replica: its report into its own Lease (see the module docs of [`super`] for why).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::encode::{MAX_SHARDS, layout, shard_lease_name};
use super::report::MAX_REPORT_BYTES;
use super::{
    FIELD_MANAGER, HEARTBEAT, INTERVAL, REPORT_ANNOTATION, REPORT_LABEL, REPORT_LABEL_VALUE,
    ReplicaReport, lease_name,
};

/// What the publisher tells Prometheus about its report's size: how many Leases it takes, and
/// how many objects it left out past [`MAX_SHARDS`] (non-zero means the counts of those objects
/// miss this replica's proxies; the README's "Report size" says when).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub leases: Gauge,
    pub omitted: Gauge,
}

impl Metrics {
    /// Registers as `trellis_operator_propagation_report_leases` and
    /// `trellis_operator_propagation_report_omitted_objects`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let r = registry.sub_registry_with_prefix("propagation_report");
        r.register(
            "leases",
            "Leases this replica's propagation report takes (1 unless sharded)",
            self.leases.clone(),
        );
        r.register(
            "omitted_objects",
            "Objects this replica's propagation report left out: it did not fit its Leases, and their counts miss this replica's proxies",
            self.omitted.clone(),
        );
    }
}

/// Whether a Lease must be written: its annotation changed, or its last write is a
/// [`HEARTBEAT`] old (each shard's Lease is renewed on its own, so the leader's garbage rule,
/// by renew time, never removes a shard whose bytes did not change).
pub fn due(last: Option<&(String, Instant)>, annotation: &str, now: Instant) -> bool {
    match last {
        None => true,
        Some((written, at)) => written != annotation || now.duration_since(*at) >= HEARTBEAT,
    }
}

/// The Lease `name` holding one annotation of `replica`'s report (server-side apply body).
pub fn lease_body(
    namespace: &str,
    name: &str,
    replica: &str,
    annotation: &str,
    now: jiff::Timestamp,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": { REPORT_LABEL: REPORT_LABEL_VALUE },
            "annotations": { REPORT_ANNOTATION: annotation },
        },
        "spec": {
            "holderIdentity": replica,
            "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now),
        },
    })
}

/// The Lease of shard `index` of `replica`'s report.
fn name_of(replica: &str, index: usize) -> String {
    if index == 0 {
        lease_name(replica)
    } else {
        shard_lease_name(replica, index)
    }
}

/// Publishes `source()`, laid out to fit Leases ([`super::encode::layout`]: one Lease, or up
/// to [`MAX_SHARDS`]), every [`INTERVAL`], each Lease only when [`due`], until `shutdown`;
/// then deletes its Leases, so the leader stops counting this replica at once (its proxies
/// reconnect elsewhere). Shards `1..n` are written before shard 0 (which announces `n`), and
/// shards a smaller layout no longer uses are deleted after it.
pub async fn run(
    client: Client,
    namespace: String,
    replica: String,
    source: impl Fn() -> ReplicaReport + Send,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    // Per shard index: what was last written there, and when.
    let mut written: Vec<Option<(String, Instant)>> = Vec::new();
    let mut warned = false;
    let mut previous: Option<(ReplicaReport, super::encode::Layout)> = None;
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let report = source();
        let objects = report.objects.len();
        // The layout costs a gzip of the whole report (milliseconds per thousand objects):
        // reused while the report is unchanged, which is most rounds.
        let layout = match &previous {
            Some((r, l)) if *r == report => l.clone(),
            _ => {
                let l = layout(&report, MAX_REPORT_BYTES, MAX_SHARDS);
                previous = Some((report, l.clone()));
                l
            }
        };
        if layout.omitted > 0 {
            // Once per crossing, not every 5 s.
            if !warned {
                tracing::warn!(
                    objects,
                    omitted = layout.omitted,
                    leases = MAX_SHARDS,
                    "propagation report larger than {MAX_SHARDS} Leases hold; the counts of the omitted objects miss this replica's proxies"
                );
            }
            warned = true;
        } else {
            warned = false;
        }
        let n = layout.annotations.len();
        metrics.leases.set(n as i64);
        metrics.omitted.set(layout.omitted as i64);
        written.resize(written.len().max(n), None);
        let now = Instant::now();
        for i in (1..n).chain([0]) {
            let annotation = &layout.annotations[i];
            if !due(written[i].as_ref(), annotation, now) {
                continue;
            }
            let name = name_of(&replica, i);
            let body = lease_body(
                &namespace,
                &name,
                &replica,
                annotation,
                jiff::Timestamp::now(),
            );
            match api.patch(&name, &params, &Patch::Apply(&body)).await {
                Ok(_) => written[i] = Some((annotation.clone(), now)),
                Err(error) => {
                    tracing::warn!(%error, lease = %name, "propagation report not written")
                }
            }
        }
        for (i, slot) in written.iter_mut().enumerate().skip(n) {
            if slot.is_some() {
                let name = name_of(&replica, i);
                match api.delete(&name, &Default::default()).await {
                    Ok(_) => *slot = None,
                    Err(kube::Error::Api(s)) if s.code == 404 => *slot = None,
                    Err(error) => {
                        tracing::debug!(%error, lease = %name, "unused propagation shard not deleted; next round retries")
                    }
                }
            }
        }
        while written.len() > n && written.last().is_some_and(Option::is_none) {
            written.pop();
        }
    }
    // Shard 0 first: without it the readers ignore the others at once.
    let stop = async {
        for (i, slot) in written.iter().enumerate() {
            if slot.is_some() {
                let _ = api.delete(&name_of(&replica, i), &Default::default()).await;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), stop).await;
}
