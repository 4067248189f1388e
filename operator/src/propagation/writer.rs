//! The leader: sums the replicas' reports and writes `status.propagation` and `Propagated`.
//!
//! Coalescing is by time: every [`INTERVAL`] the writer reads the reports once and writes each
//! object whose numbers changed, so an object gets at most one patch per interval whatever
//! happened in between (latest wins) and none when nothing changed. Writes are server-side
//! apply on `/status` under [`FIELD_MANAGER`], sending only `status.propagation` and the
//! `Propagated` condition: `conditions` is a map list keyed by `type`, so the other
//! controllers' conditions are theirs. `lastTransitionTime` is kept from this writer's own
//! last write while the condition's status holds (after a leader change the first write
//! starts it anew: the writer keeps no state in the cluster beyond what it writes).

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::report::{aggregate, condition, fresh};
use super::{
    FIELD_MANAGER, INTERVAL, ObjectRef, REPORT_ANNOTATION, REPORT_LABEL, REPORT_LABEL_VALUE,
    ReplicaReport, STALE,
};
use crate::api::conditions::{Condition, merge_conditions};
use crate::api::{Mesh, PeerAuthentication, PropagationStatus, TrafficPolicy};

/// Reports not renewed for this long are deleted by the leader (a replica killed without
/// deleting its own): long past [`STALE`], so a replica that was only slow is never removed.
pub const GARBAGE: Duration = Duration::from_secs(600);

/// Reads the report Leases of `namespace` (either format, [`super::encode::decode`]), each
/// with its name and renew time; `None` (logged) for one whose annotation does not decode.
/// Shards are not joined here: the leader deletes a long-dead replica's Leases one by one,
/// shards too, before it joins the rest ([`super::encode::merge`]).
pub async fn read_reports(
    client: &Client,
    namespace: &str,
) -> Result<Vec<(Option<jiff::Timestamp>, String, Option<ReplicaReport>)>, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let list = api
        .list(&ListParams::default().labels(&format!("{REPORT_LABEL}={REPORT_LABEL_VALUE}")))
        .await?;
    let mut out = Vec::new();
    for lease in list.items {
        let name = lease.metadata.name.clone().unwrap_or_default();
        let renewed = lease
            .spec
            .as_ref()
            .and_then(|s| s.renew_time.as_ref())
            .map(|t| t.0);
        let parsed = lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REPORT_ANNOTATION))
            .map(|annotation| super::encode::decode(annotation));
        let report = match parsed {
            Some(Ok(report)) => Some(report),
            Some(Err(error)) => {
                tracing::warn!(%error, lease = %name, "propagation report unreadable; skipped");
                None
            }
            None => {
                tracing::warn!(lease = %name, "propagation report Lease without a report; skipped");
                None
            }
        };
        out.push((renewed, name, report));
    }
    Ok(out)
}

/// The leader's writer; [`Writer::tick`] is one round.
pub struct Writer {
    client: Client,
    namespace: String,
    written: HashMap<ObjectRef, (PropagationStatus, Condition)>,
}

/// What one round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Round {
    pub reports: usize,
    pub patched: usize,
    pub unchanged: usize,
}

impl Writer {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            client,
            namespace: namespace.to_string(),
            written: HashMap::new(),
        }
    }

    /// Reads the reports, sums the fresh ones, writes what changed.
    pub async fn tick(&mut self, now: jiff::Timestamp) -> Result<Round, kube::Error> {
        let all = read_reports(&self.client, &self.namespace).await?;
        let mut garbage = Vec::new();
        let mut kept = Vec::with_capacity(all.len());
        for (renewed, name, report) in all {
            if renewed.is_some_and(|t| {
                now.duration_since(t)
                    .try_into()
                    .is_ok_and(|age: Duration| age > GARBAGE)
            }) {
                garbage.push(name);
            } else if let Some(report) = report {
                kept.push((renewed, name, report));
            }
        }
        // Shards joined to their replica's report (shard 0's renew time decides freshness).
        let dated = super::encode::merge(kept)
            .into_iter()
            .map(|(renewed, _, report)| (renewed, report))
            .collect();
        let reports = fresh(dated, now, STALE);
        for r in reports.iter().filter(|r| r.omitted > 0) {
            tracing::warn!(
                replica = %r.replica,
                omitted = r.omitted,
                "a replica's propagation report did not fit its Leases; the counts of the objects it left out miss its proxies"
            );
        }
        let mut round = Round {
            reports: reports.len(),
            ..Default::default()
        };
        let sums = aggregate(&reports);
        let stamp = now.round(jiff::Unit::Second).unwrap_or(now).to_string();
        for (object, p) in &sums {
            let previous = self.written.get(object);
            let existing: Vec<Condition> = previous.map(|(_, c)| c.clone()).into_iter().collect();
            let cond = merge_conditions(&existing, vec![condition(object, p)], &stamp)
                .pop()
                .expect("one condition in, one out");
            if previous.is_some_and(|(s, c)| s == p && *c == cond) {
                round.unchanged += 1;
                continue;
            }
            match self.patch(object, p, &cond).await {
                // A reply that does not parse still means the API server took the apply.
                Ok(()) | Err(kube::Error::SerdeError(_)) => {
                    round.patched += 1;
                    self.written.insert(object.clone(), (p.clone(), cond));
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    // Deleted since the replicas counted it.
                    self.written.remove(object);
                }
                Err(error) => {
                    tracing::warn!(%error, %object, "propagation status not written; next round retries")
                }
            }
        }
        self.written.retain(|o, _| sums.contains_key(o));
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
        for name in garbage {
            if let Err(error) = api.delete(&name, &Default::default()).await {
                tracing::debug!(%error, lease = %name, "stale propagation report not deleted");
            }
        }
        Ok(round)
    }

    async fn patch(
        &self,
        object: &ObjectRef,
        p: &PropagationStatus,
        cond: &Condition,
    ) -> Result<(), kube::Error> {
        let body = serde_json::json!({
            "apiVersion": format!("{}/{}", crate::api::GROUP, crate::api::VERSION),
            "kind": object.kind,
            "status": { "propagation": p, "conditions": [cond] },
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let patch = Patch::Apply(&body);
        let c = self.client.clone();
        let ns = object.namespace.as_str();
        match object.kind.as_str() {
            "Mesh" => {
                Api::<Mesh>::all(c)
                    .patch_status(&object.name, &params, &patch)
                    .await?
            }
            "TrafficPolicy" => {
                let _ = Api::<TrafficPolicy>::namespaced(c, ns)
                    .patch_status(&object.name, &params, &patch)
                    .await?;
                return Ok(());
            }
            "PeerAuthentication" => {
                let _ = Api::<PeerAuthentication>::namespaced(c, ns)
                    .patch_status(&object.name, &params, &patch)
                    .await?;
                return Ok(());
            }
            _ => return Ok(()),
        };
        Ok(())
    }
}

/// Runs the writer every [`INTERVAL`] until `shutdown` (the leader's controllers' token).
pub async fn run(client: Client, namespace: String, shutdown: CancellationToken) {
    run_with_clock(client, namespace, shutdown, jiff::Timestamp::now).await
}

/// [`run`] with the wall clock (report freshness, transition times) supplied, for tests.
pub async fn run_with_clock(
    client: Client,
    namespace: String,
    shutdown: CancellationToken,
    clock: impl Fn() -> jiff::Timestamp,
) {
    let mut writer = Writer::new(client, &namespace);
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match writer.tick(clock()).await {
            Ok(round) => tracing::debug!(?round, "propagation round"),
            Err(error) => {
                tracing::warn!(%error, "propagation reports not read; next round retries")
            }
        }
    }
}
