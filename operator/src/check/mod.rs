//! `trellis check`: is the cluster ready for Trellis, is Trellis healthy, are the proxies in
//! step with the control plane. Read the way `linkerd check` reads: one line per check, pass or
//! fail, and for a failure a hint that says what to do.
//!
//! Shape: the API layer ([`observe`]) reads what it needs, in a fixed order, into small plain
//! views (`Observed*`); pure functions ([`preinstall`], [`installed`], [`dataplane`]) turn a view
//! and the current time into [`Check`]s. So every rule is tested with plain values, and the API
//! layer is tested once against recorded exchanges (`operator/tests/check.rs`).
//!
//! Nothing here writes to the cluster: RBAC is probed with SelfSubjectAccessReviews, the
//! webhook and identity endpoint through the API server's service proxy, and proxies through
//! the pod proxy to the admin port's public `/metrics` (never the loopback-only `/config`).

pub mod dataplane;
pub mod installed;
pub mod observe;
pub mod preinstall;
pub mod propagation;

use std::fmt::Write as _;

/// How a check came out. A warning is shown but does not fail `trellis check`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// What was checked, e.g. `operator Deployment available`.
    pub name: String,
    pub outcome: Outcome,
    /// What was found (`2/2 replicas ready`, `expires in 3 days`).
    pub detail: String,
    /// What to do about a warning or failure.
    pub hint: Option<String>,
}

impl Check {
    pub fn pass(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            outcome: Outcome::Pass,
            detail: detail.into(),
            hint: None,
        }
    }

    pub fn fail(
        name: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            outcome: Outcome::Fail,
            detail: detail.into(),
            hint: Some(hint.into()),
        }
    }

    pub fn warn(
        name: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Self {
            outcome: Outcome::Warn,
            ..Self::fail(name, detail, hint)
        }
    }
}

/// A titled group of checks (`pre-install`, `control plane`, `data plane: shop`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    pub title: String,
    pub checks: Vec<Check>,
}

/// Everything one `trellis check` run found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub sections: Vec<Section>,
}

impl Report {
    pub fn push(&mut self, title: impl Into<String>, checks: Vec<Check>) {
        self.sections.push(Section {
            title: title.into(),
            checks,
        });
    }

    /// The failed checks; `trellis check` exits non-zero when there is any.
    pub fn failures(&self) -> usize {
        self.all().filter(|c| c.outcome == Outcome::Fail).count()
    }

    pub fn all(&self) -> impl Iterator<Item = &Check> {
        self.sections.iter().flat_map(|s| &s.checks)
    }

    /// The text `trellis check` prints.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for s in &self.sections {
            let _ = writeln!(out, "{}\n{}", s.title, "-".repeat(s.title.chars().count()));
            for c in &s.checks {
                let mark = match c.outcome {
                    Outcome::Pass => "[ok]  ",
                    Outcome::Warn => "[warn]",
                    Outcome::Fail => "[FAIL]",
                };
                let _ = writeln!(out, "{mark} {}: {}", c.name, c.detail);
                if let Some(h) = &c.hint {
                    let _ = writeln!(out, "       hint: {h}");
                }
            }
            out.push('\n');
        }
        let failed = self.failures();
        let warned = self.all().filter(|c| c.outcome == Outcome::Warn).count();
        let total = self.all().count();
        if failed == 0 {
            let _ = writeln!(
                out,
                "Status check results are ok: {total} checks, {warned} warnings"
            );
        } else {
            let _ = writeln!(out, "{failed} of {total} checks failed ({warned} warnings)");
        }
        out
    }
}

/// Days (rounded down) and hours, the way expiry is shown: `3 days`, `5 h`.
pub fn human_remaining(secs: i64) -> String {
    if secs >= 2 * 86_400 {
        format!("{} days", secs / 86_400)
    } else if secs >= 3600 {
        format!("{} h", secs / 3600)
    } else {
        format!("{} min", secs.max(0) / 60)
    }
}
