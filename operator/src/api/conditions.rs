//! Standard status conditions (the shape of `metav1.Condition`).
//!
//! We keep our own type instead of `k8s_openapi`'s `Condition` so it can derive `JsonSchema`
//! with a plain schema, and so `lastTransitionTime` handling lives in one pure function
//! ([`merge_conditions`]) that every status writer uses: equal conditions keep their transition
//! time, which is what keeps status patches from churning.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Status of a condition, as Kubernetes spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    pub fn from_bool(b: bool) -> Self {
        if b { Self::True } else { Self::False }
    }
}

/// One observation of an object's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Kind of condition, e.g. `Ready`, `Accepted`, `Programmed`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// Machine-readable CamelCase reason for the last transition.
    pub reason: String,
    /// Human-readable details: what is wrong and how to fix it.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    /// The `.metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Condition {
    pub fn new(
        type_: impl Into<String>,
        status: ConditionStatus,
        reason: impl Into<String>,
        message: impl Into<String>,
        observed_generation: Option<i64>,
    ) -> Self {
        Self {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message: message.into(),
            last_transition_time: String::new(),
            observed_generation,
        }
    }

    pub fn is_true(&self) -> bool {
        self.status == ConditionStatus::True
    }
}

/// Merges freshly computed conditions into the existing list.
///
/// A condition whose `status` did not change keeps its `lastTransitionTime` (reason and message
/// may still update); a changed or new one gets `now`. Conditions not in `desired` are dropped.
/// The result is ordered like `desired`, so equal inputs give equal output and no patch.
pub fn merge_conditions(
    existing: &[Condition],
    desired: Vec<Condition>,
    now: &str,
) -> Vec<Condition> {
    desired
        .into_iter()
        .map(|mut c| {
            c.last_transition_time = match existing.iter().find(|e| e.type_ == c.type_) {
                Some(old) if old.status == c.status && !old.last_transition_time.is_empty() => {
                    old.last_transition_time.clone()
                }
                _ => now.to_string(),
            };
            c
        })
        .collect()
}

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(t: &str, s: ConditionStatus, reason: &str) -> Condition {
        Condition::new(t, s, reason, "", Some(1))
    }

    #[test]
    fn unchanged_status_keeps_transition_time() {
        let old = merge_conditions(&[], vec![c("Ready", ConditionStatus::True, "Ok")], "t1");
        assert_eq!(old[0].last_transition_time, "t1");
        let same = merge_conditions(
            &old,
            vec![c("Ready", ConditionStatus::True, "StillOk")],
            "t2",
        );
        assert_eq!(same[0].last_transition_time, "t1");
        assert_eq!(same[0].reason, "StillOk");
        let flipped = merge_conditions(
            &same,
            vec![c("Ready", ConditionStatus::False, "Broken")],
            "t3",
        );
        assert_eq!(flipped[0].last_transition_time, "t3");
    }
}
