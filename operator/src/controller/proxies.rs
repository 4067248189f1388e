//! The Mesh's proxy counts (`status.proxies`, the `Proxies` and `Up To Date` columns of
//! `kubectl get mesh`) and its `ProxiesUpToDate` condition, from the compile controller's pod
//! cache. Pure: the compile controller reports them with its own part of the Mesh status.
//!
//! A pod counts when it carries the `trellis.dev/proxy-version` annotation the injector writes
//! (the proxy image it was injected with); it is up to date when that is the Mesh's
//! `spec.proxy.image`. Pods being deleted are not counted: they are on their way out and a
//! rollout replaces them.

use crate::api::conditions::{Condition, ConditionStatus};
use crate::api::mesh::{ProxyCounts, RolloutMode};
use crate::api::{Mesh, MeshSpec};
use crate::pods::PodSet;

/// The condition type.
pub const PROXIES_UP_TO_DATE: &str = "ProxiesUpToDate";

/// Counts injected pods and those running `image`.
pub fn count(pods: &PodSet, image: &str) -> ProxyCounts {
    let mut counts = ProxyCounts::default();
    for pod in pods.iter() {
        if pod.is_deleting() {
            continue;
        }
        let Some(version) = pod.proxy_version() else {
            continue;
        };
        counts.total += 1;
        if version == image {
            counts.up_to_date += 1;
        }
    }
    counts
}

/// `ProxiesUpToDate`: True when every injected pod runs the Mesh's proxy image.
pub fn condition(counts: &ProxyCounts, spec: &MeshSpec, generation: Option<i64>) -> Condition {
    if counts.up_to_date == counts.total {
        return Condition::new(
            PROXIES_UP_TO_DATE,
            ConditionStatus::True,
            "UpToDate",
            format!(
                "all {} proxies run {}",
                counts.total,
                spec.proxy.effective_image()
            ),
            generation,
        );
    }
    let how = match (spec.rollout.mode, spec.rollout.paused) {
        (RolloutMode::Manual, _) => {
            "rollout mode is Manual: restart the workloads (kubectl rollout restart) to update them"
        }
        (_, true) => "the rollout is paused (spec.rollout.paused)",
        _ => "workloads pick the new proxy up when their pods are re-created",
    };
    Condition::new(
        PROXIES_UP_TO_DATE,
        ConditionStatus::False,
        "OutOfDate",
        format!(
            "{} of {} proxies run {}; {how}",
            counts.up_to_date,
            counts.total,
            spec.proxy.effective_image()
        ),
        generation,
    )
}

/// Counts and condition for `mesh` over `pods`.
pub fn report(pods: &PodSet, mesh: &Mesh) -> (ProxyCounts, Condition) {
    let counts = count(pods, mesh.spec.proxy.effective_image());
    let condition = condition(&counts, &mesh.spec, mesh.metadata.generation);
    (counts, condition)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MeshSpec;
    use crate::compiler::{PROXY_VERSION_ANNOTATION, SlimPod};

    fn pod(name: &str, version: Option<&str>, deleting: bool) -> SlimPod {
        let mut p = SlimPod::default();
        p.metadata.name = Some(name.into());
        p.metadata.namespace = Some("n".into());
        p.metadata.annotations =
            version.map(|v| [(PROXY_VERSION_ANNOTATION.to_string(), v.to_string())].into());
        if deleting {
            p.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ));
        }
        p
    }

    #[test]
    fn counts_injected_pods_and_those_on_the_current_image() {
        let pods = [
            pod("a", Some("proxy:2"), false),
            pod("b", Some("proxy:1"), false),
            pod("c", Some("proxy:2"), false),
            pod("d", None, false),
            pod("e", Some("proxy:1"), true),
        ];
        let all = PodSet::from_pods(&pods);
        let c = count(&all, "proxy:2");
        assert_eq!(
            c,
            ProxyCounts {
                total: 3,
                up_to_date: 2
            }
        );
        let mut spec = MeshSpec::default();
        spec.proxy.image = Some("proxy:2".into());
        let cond = condition(&c, &spec, Some(7));
        assert_eq!(cond.status, ConditionStatus::False);
        assert_eq!(cond.observed_generation, Some(7));
        assert!(
            cond.message.starts_with("2 of 3 proxies run proxy:2"),
            "{}",
            cond.message
        );
        spec.rollout.mode = RolloutMode::Manual;
        assert!(
            condition(&c, &spec, None)
                .message
                .contains("kubectl rollout restart")
        );
        let first = count(&PodSet::from_pods(&pods[..1]), "proxy:2");
        assert!(condition(&first, &spec, None).is_true());
        // No injected pod at all: nothing is out of date.
        let none = PodSet::default();
        assert!(condition(&count(&none, "x"), &spec, None).is_true());
    }
}
