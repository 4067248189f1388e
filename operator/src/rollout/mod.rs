//! Sidecar rollout: a new proxy image reaches every workload in health-gated batches.
//!
//! - [`plan`]: the pure planner. Observed workloads, the rollout spec, the health gate's
//!   verdicts and the previous rollout status go in; the restarts to make, the new
//!   `status.rollout` and the Events to record come out. Property-tested.
//! - [`gate`]: the health gate. Reads the sidecars' own golden metrics (admin `/metrics`) before
//!   and after a restart and judges the new pods against the old ones.
//! - [`observe`]: turns Deployments, StatefulSets, DaemonSets and Pods into the planner's
//!   [`plan::Workload`]s (pure).
//! - [`controller`]: the thin edge. Reflector stores, the server-side apply of the
//!   `kubectl.kubernetes.io/restartedAt` pod-template annotation, one debounced status write.

pub mod controller;
pub mod gate;
pub mod observe;
pub mod plan;

/// Field manager of every write the rollout controller makes (restarts and its status fields).
pub const FIELD_MANAGER: &str = "trellis-operator/rollout";
/// The pod-template annotation `kubectl rollout restart` sets; changing it restarts the pods
/// under the workload's own update strategy.
pub const RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";
/// `manual` on a workload opts it out of automatic rollout.
pub const ROLLOUT_ANNOTATION: &str = "trellis.dev/rollout";
/// On a pod template: the proxy image the injector uses instead of the Mesh's (a rollback pin).
pub const PROXY_IMAGE_ANNOTATION: &str = crate::inject::ANNOTATION_PROXY_IMAGE;
/// On a pod template, beside the pin: the version the workload failed to reach. The pin holds
/// while that version is the desired one; a newer image rolls the workload again.
pub const FAILED_VERSION_ANNOTATION: &str = "trellis.dev/rollout-failed-version";
/// The condition the rollout controller owns on the Mesh.
pub const CONDITION: &str = "RolloutProgressing";
