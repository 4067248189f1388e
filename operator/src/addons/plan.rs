//! The pure core of the addon reconcile: desired objects ([`super::desired`]) and what the
//! cluster holds go in; what to apply, what to delete and the `ObservabilityReady` condition
//! come out.

use std::collections::{BTreeMap, BTreeSet};

use super::CONDITION;
use super::desired::{
    self, DesiredError, GRAFANA, Inputs, JAEGER, Kind, NAMES, Object, ObjectKey, PROMETHEUS,
};
use crate::api::conditions::{Condition, ConditionStatus};
use crate::api::mesh::ObservabilityMode;

/// The rollout state of an observed addon Deployment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeploymentState {
    pub replicas: i32,
    pub ready: i32,
    pub updated: i32,
    /// `status.observedGeneration` equals `metadata.generation`: the status describes the
    /// current spec.
    pub current: bool,
}

/// An object the operator finds in the cluster with the addon label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub key: ObjectKey,
    /// Its `trellis.dev/addon-hash` annotation.
    pub hash: Option<String>,
    /// UIDs of its owners.
    pub owners: Vec<String>,
    /// For Deployments.
    pub deployment: Option<DeploymentState>,
}

/// What one pass does.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Objects missing or differing from their desired body, in apply order.
    pub apply: Vec<Object>,
    /// Objects the operator made that are no longer wanted.
    pub delete: Vec<ObjectKey>,
    /// `ObservabilityReady`, from the observed state (before this pass's writes).
    pub condition: Condition,
}

/// Plans one pass. `observed` must hold every object carrying the addon label that the
/// operator can see (of every kind in [`Kind::ALL`] it listed).
pub fn plan(i: &Inputs<'_>, observed: &[Observed]) -> Result<Plan, DesiredError> {
    let desired = desired::desired(i)?;
    let by_key: BTreeMap<&ObjectKey, &Observed> = observed.iter().map(|o| (&o.key, o)).collect();
    let apply = desired
        .iter()
        .filter(|d| {
            by_key
                .get(&d.key)
                .is_none_or(|o| o.hash.as_deref() != Some(d.hash()))
        })
        .cloned()
        .collect();
    let wanted: BTreeSet<&ObjectKey> = desired.iter().map(|d| &d.key).collect();
    let mesh_uid = i.mesh.metadata.uid.as_deref();
    let delete = observed
        .iter()
        .filter(|o| !wanted.contains(&o.key))
        // Only what this module names and what the Mesh owns: a user's object that happens to
        // carry the label is never touched.
        .filter(|o| NAMES.contains(&o.key.name.as_str()))
        .filter(|o| mesh_uid.is_some_and(|uid| o.owners.iter().any(|u| u == uid)))
        .map(|o| o.key.clone())
        .collect();
    let condition = condition(i, &desired, &by_key);
    Ok(Plan {
        apply,
        delete,
        condition,
    })
}

/// One addon's line in the condition message.
enum AddonState {
    Ok(String),
    Waiting(String),
}

fn deployment_state(
    name: &str,
    d: &[Object],
    by_key: &BTreeMap<&ObjectKey, &Observed>,
) -> AddonState {
    let Some(want) = d
        .iter()
        .find(|o| o.key.kind == Kind::Deployment && o.key.name == name)
    else {
        return AddonState::Ok("disabled".into());
    };
    let Some(seen) = by_key.get(&want.key) else {
        return AddonState::Waiting("Progressing (Deployment being created)".into());
    };
    if seen.hash.as_deref() != Some(want.hash()) {
        return AddonState::Waiting("Progressing (Deployment being updated)".into());
    }
    let s = seen.deployment.clone().unwrap_or_default();
    let wanted = s.replicas.max(1);
    if s.current && s.updated >= wanted && s.ready >= wanted {
        AddonState::Ok(format!("Available ({}/{wanted} ready)", s.ready))
    } else {
        AddonState::Waiting(format!("Progressing ({}/{wanted} ready)", s.ready.max(0)))
    }
}

fn condition(
    i: &Inputs<'_>,
    desired: &[Object],
    by_key: &BTreeMap<&ObjectKey, &Observed>,
) -> Condition {
    let o = &i.mesh.spec.observability;
    let generation = i.mesh.metadata.generation;
    let mut lines = Vec::new();
    let mut waiting = false;
    let mut missing_api = false;
    let mut push = |name: &str, s: AddonState, lines: &mut Vec<String>| {
        let text = match s {
            AddonState::Ok(t) => t,
            AddonState::Waiting(t) => {
                waiting = true;
                t
            }
        };
        lines.push(format!("{name}: {text}"));
    };
    match o.mode {
        ObservabilityMode::Install => {
            push(
                "prometheus",
                deployment_state(PROMETHEUS, desired, by_key),
                &mut lines,
            );
            push(
                "grafana",
                deployment_state(GRAFANA, desired, by_key),
                &mut lines,
            );
            let jaeger = match (&o.tracing.collector, o.tracing.enabled) {
                (Some(c), true) if !c.is_empty() => {
                    AddonState::Ok(format!("not installed (sidecars export to {c})"))
                }
                _ => deployment_state(JAEGER, desired, by_key),
            };
            push("jaeger", jaeger, &mut lines);
        }
        ObservabilityMode::Integrate => {
            let metrics = if !o.metrics.enabled {
                AddonState::Ok("disabled".into())
            } else if !i.prometheus_operator {
                missing_api = true;
                AddonState::Ok(
                    "the Prometheus Operator API (monitoring.coreos.com/v1) is not served, so \
                     no PodMonitor, ServiceMonitor or PrometheusRule is kept; injected pods \
                     carry prometheus.io/scrape|port|path annotations for an annotation-based \
                     scrape"
                        .into(),
                )
            } else {
                AddonState::Ok(format!(
                    "PodMonitor {ns}/{}, ServiceMonitor {ns}/{}, PrometheusRule {ns}/{}",
                    desired::POD_MONITOR,
                    desired::SERVICE_MONITOR,
                    desired::PROMETHEUS_RULE,
                    ns = i.namespace
                ))
            };
            push("metrics", metrics, &mut lines);
            let dashboards = if o.dashboards.enabled {
                AddonState::Ok(format!(
                    "ConfigMap {}/{} labelled {}=1",
                    desired::dashboards_namespace(i.mesh, i.namespace),
                    desired::DASHBOARDS,
                    desired::GRAFANA_DASHBOARD_LABEL
                ))
            } else {
                AddonState::Ok("disabled".into())
            };
            push("dashboards", dashboards, &mut lines);
            let tracing = match (&o.tracing.collector, o.tracing.enabled) {
                (_, false) => AddonState::Ok("disabled".into()),
                (Some(c), true) if !c.is_empty() => {
                    AddonState::Ok(format!("sidecars export to {c}"))
                }
                _ => AddonState::Waiting(
                    "no collector: mode Integrate installs none, set tracing.collector".into(),
                ),
            };
            push("tracing", tracing, &mut lines);
        }
    }
    let message = lines.join("; ");
    let nothing = !o.metrics.enabled && !o.dashboards.enabled && !o.tracing.enabled;
    let (status, reason) = if missing_api {
        (ConditionStatus::False, "PrometheusOperatorMissing")
    } else if waiting {
        (ConditionStatus::False, "Progressing")
    } else if nothing {
        (ConditionStatus::True, "Disabled")
    } else {
        (ConditionStatus::True, "Available")
    };
    Condition::new(CONDITION, status, reason, message, generation)
}
