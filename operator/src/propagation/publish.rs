//! Every replica: its report into its own Lease (see the module docs of [`super`] for why).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    FIELD_MANAGER, HEARTBEAT, INTERVAL, REPORT_ANNOTATION, REPORT_LABEL, REPORT_LABEL_VALUE,
    ReplicaReport, lease_name,
};

/// Whether a report must be written: it changed, or the last write is a [`HEARTBEAT`] old.
pub fn due(last: Option<&(ReplicaReport, Instant)>, report: &ReplicaReport, now: Instant) -> bool {
    match last {
        None => true,
        Some((written, at)) => written != report || now.duration_since(*at) >= HEARTBEAT,
    }
}

/// The Lease holding `report` (server-side apply body).
pub fn lease_body(
    namespace: &str,
    report: &ReplicaReport,
    now: jiff::Timestamp,
) -> serde_json::Value {
    let json = serde_json::to_string(report).expect("reports serialize");
    serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": lease_name(&report.replica),
            "namespace": namespace,
            "labels": { REPORT_LABEL: REPORT_LABEL_VALUE },
            "annotations": { REPORT_ANNOTATION: json },
        },
        "spec": {
            "holderIdentity": report.replica,
            "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now),
        },
    })
}

/// Publishes `source()`, cut to fit a Lease ([`super::report::fit`]), every [`INTERVAL`] when
/// [`due`], until `shutdown`; then deletes the
/// Lease, so the leader stops counting this replica at once (its proxies reconnect
/// elsewhere).
pub async fn run(
    client: Client,
    namespace: String,
    replica: String,
    source: impl Fn() -> ReplicaReport + Send,
    shutdown: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let name = lease_name(&replica);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut last: Option<(ReplicaReport, Instant)> = None;
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let mut report = source();
        if !super::report::fit(&mut report, super::report::MAX_REPORT_BYTES) {
            tracing::warn!(
                objects = report.objects.len(),
                "propagation report larger than a Lease annotation holds even without its lagging proxies; the API server will refuse it"
            );
        }
        let now = Instant::now();
        if !due(last.as_ref(), &report, now) {
            continue;
        }
        let body = lease_body(&namespace, &report, jiff::Timestamp::now());
        match api.patch(&name, &params, &Patch::Apply(&body)).await {
            Ok(_) => last = Some((report, now)),
            Err(error) => tracing::warn!(%error, lease = %name, "propagation report not written"),
        }
    }
    if last.is_some() {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            api.delete(&name, &Default::default()),
        )
        .await;
    }
}
