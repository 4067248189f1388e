//! Pre-install checks: can Trellis be installed into this cluster by this user?

use super::Check;

/// Kubernetes minor version Trellis needs: CEL validation rules (GA in 1.29) and native
/// sidecars (init containers with `restartPolicy: Always`, on by default from 1.29, GA in 1.33;
/// 1.30 is the oldest release still patched when Trellis was written).
pub const MIN_MINOR: u32 = 30;

/// `GET /version`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerVersion {
    pub major: String,
    pub minor: String,
    pub git_version: String,
}

/// One permission `kubectl apply -k config/default` needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permission {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
    /// `None` for cluster-scoped resources.
    pub namespace: Option<String>,
}

impl Permission {
    pub fn describe(&self) -> String {
        let res = if self.group.is_empty() {
            self.resource.to_string()
        } else {
            format!("{}.{}", self.resource, self.group)
        };
        match &self.namespace {
            Some(ns) => format!("{} {res} in {ns}", self.verb),
            None => format!("{} {res}", self.verb),
        }
    }
}

/// What the install creates, so what the installing user must be allowed to create.
pub fn install_permissions(operator_namespace: &str) -> Vec<Permission> {
    let cluster = |group, resource| Permission {
        verb: "create",
        group,
        resource,
        namespace: None,
    };
    let ns = |group, resource| Permission {
        verb: "create",
        group,
        resource,
        namespace: Some(operator_namespace.to_string()),
    };
    vec![
        cluster("", "namespaces"),
        cluster("apiextensions.k8s.io", "customresourcedefinitions"),
        cluster("rbac.authorization.k8s.io", "clusterroles"),
        cluster("rbac.authorization.k8s.io", "clusterrolebindings"),
        ns("rbac.authorization.k8s.io", "roles"),
        ns("rbac.authorization.k8s.io", "rolebindings"),
        ns("", "serviceaccounts"),
        ns("", "services"),
        ns("apps", "deployments"),
        ns("policy", "poddisruptionbudgets"),
    ]
}

/// The part of a CustomResourceDefinition the checks look at.
#[derive(Clone, Debug, PartialEq)]
pub struct CrdView {
    pub group: String,
    pub kind: String,
    /// `(name, served, storage)` of each version.
    pub versions: Vec<(String, bool, bool)>,
    /// The `openAPIV3Schema` of the version Trellis serves, if the CRD has it.
    pub schema: Option<serde_json::Value>,
}

/// A CRD this build of Trellis installs.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpectedCrd {
    pub name: String,
    pub group: String,
    pub kind: String,
    pub version: String,
    pub schema: serde_json::Value,
}

/// The CRDs generated from this build's types (what `trellis crds` prints).
pub fn expected_crds() -> Vec<ExpectedCrd> {
    crate::api::crds()
        .into_iter()
        .map(|crd| {
            let v = crd
                .spec
                .versions
                .iter()
                .find(|v| v.storage)
                .expect("a generated CRD has a storage version");
            ExpectedCrd {
                name: crd.metadata.name.clone().unwrap_or_default(),
                group: crd.spec.group.clone(),
                kind: crd.spec.names.kind.clone(),
                version: v.name.clone(),
                schema: serde_json::to_value(
                    v.schema
                        .as_ref()
                        .and_then(|s| s.open_api_v3_schema.as_ref()),
                )
                .unwrap_or_default(),
            }
        })
        .collect()
}

/// A MutatingWebhookConfiguration: its name and its webhooks' names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookConfigView {
    pub name: String,
    pub webhooks: Vec<String>,
}

/// What the pre-install checks read.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub version: Result<ServerVersion, String>,
    /// Each permission with the SelfSubjectAccessReview's answer (`allowed`), or the error.
    pub access: Vec<(Permission, Result<bool, String>)>,
    /// Each expected CRD with what the cluster has under its name (`None`: free).
    pub crds: Vec<(ExpectedCrd, Result<Option<CrdView>, String>)>,
    pub webhooks: Result<Vec<WebhookConfigView>, String>,
}

/// Sidecar injectors of other meshes, by a part of their webhook names.
const OTHER_INJECTORS: [(&str, &str); 5] = [
    ("sidecar-injector.istio.io", "Istio"),
    ("linkerd-proxy-injector.linkerd.io", "Linkerd"),
    ("kuma-admission.kuma.io", "Kuma"),
    ("connect-injector.consul.hashicorp.com", "Consul"),
    ("osm-inject", "Open Service Mesh"),
];

pub fn check_version(v: &Result<ServerVersion, String>) -> Check {
    const NAME: &str = "Kubernetes API server";
    match v {
        Err(e) => Check::fail(
            NAME,
            format!("not reachable: {e}"),
            "check KUBECONFIG / the current kubectl context (`kubectl version`)",
        ),
        Ok(v) => {
            // Some providers report a minor such as `30+`.
            let digits: String = v.minor.chars().take_while(char::is_ascii_digit).collect();
            let minor = digits.parse::<u32>().ok();
            match (v.major.as_str(), minor) {
                ("1", Some(m)) if m >= MIN_MINOR => {
                    Check::pass(NAME, format!("reachable, version {}", v.git_version))
                }
                _ => Check::fail(
                    NAME,
                    format!("version {} is older than 1.{MIN_MINOR}", v.git_version),
                    format!(
                        "Trellis needs Kubernetes 1.{MIN_MINOR} or newer (CEL validation rules, native sidecars): upgrade the cluster"
                    ),
                ),
            }
        }
    }
}

fn check_access(access: &[(Permission, Result<bool, String>)]) -> Check {
    const NAME: &str = "RBAC to install";
    let denied: Vec<String> = access
        .iter()
        .filter(|(_, a)| !matches!(a, Ok(true)))
        .map(|(p, a)| match a {
            Err(e) => format!("{} ({e})", p.describe()),
            _ => p.describe(),
        })
        .collect();
    if denied.is_empty() {
        Check::pass(NAME, format!("allowed to {} kinds of object", access.len()))
    } else {
        Check::fail(
            NAME,
            format!("not allowed to {}", denied.join(", ")),
            "install as a cluster administrator (cluster-admin), or have one grant these",
        )
    }
}

fn check_crd_names(crds: &[(ExpectedCrd, Result<Option<CrdView>, String>)]) -> Vec<Check> {
    crds.iter()
        .map(|(want, got)| {
            let name = format!("CRD name {} free or Trellis's", want.name);
            match got {
                Err(e) => Check::fail(
                    name,
                    format!("cannot read it: {e}"),
                    "you need get on customresourcedefinitions.apiextensions.k8s.io",
                ),
                Ok(None) => Check::pass(name, "free"),
                Ok(Some(c)) if c.group == want.group && c.kind == want.kind => {
                    Check::pass(name, "already installed by Trellis")
                }
                Ok(Some(c)) => Check::fail(
                    name,
                    format!("taken by kind {} of group {}", c.kind, c.group),
                    format!(
                        "another product owns {}: remove it (`kubectl delete crd {}`) before installing",
                        want.name, want.name
                    ),
                ),
            }
        })
        .collect()
}

fn check_other_meshes(webhooks: &Result<Vec<WebhookConfigView>, String>) -> Check {
    const NAME: &str = "no other mesh's sidecar injector";
    match webhooks {
        Err(e) => Check::fail(
            NAME,
            format!("cannot list mutating webhook configurations: {e}"),
            "you need list on mutatingwebhookconfigurations.admissionregistration.k8s.io",
        ),
        Ok(list) => {
            let found: Vec<String> = list
                .iter()
                .filter_map(|c| {
                    c.webhooks.iter().find_map(|w| {
                        OTHER_INJECTORS
                            .iter()
                            .find(|(part, _)| w.contains(part))
                            .map(|(_, mesh)| format!("{mesh} ({})", c.name))
                    })
                })
                .collect();
            if found.is_empty() {
                Check::pass(NAME, "none found")
            } else {
                Check::fail(
                    NAME,
                    format!("found {}", found.join(", ")),
                    "two injectors would give pods two proxies fighting over the same iptables redirect: uninstall the other mesh, or keep its namespaces and Trellis's apart",
                )
            }
        }
    }
}

/// Whether the other checks are worth running: on an unreachable or too old API server they
/// would only add noise.
pub fn version_ok(v: &Result<ServerVersion, String>) -> bool {
    check_version(v).outcome == super::Outcome::Pass
}

/// The pre-install checks, in the order they are shown.
pub fn checks(o: &Observed) -> Vec<Check> {
    let mut out = vec![check_version(&o.version)];
    if !version_ok(&o.version) {
        return out;
    }
    out.push(check_access(&o.access));
    out.extend(check_crd_names(&o.crds));
    out.push(check_other_meshes(&o.webhooks));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Outcome;

    fn v(minor: &str) -> Result<ServerVersion, String> {
        Ok(ServerVersion {
            major: "1".into(),
            minor: minor.into(),
            git_version: format!("v1.{minor}.0"),
        })
    }

    #[test]
    fn versions_below_1_30_fail_and_provider_suffixes_parse() {
        assert_eq!(check_version(&v("29")).outcome, Outcome::Fail);
        assert_eq!(check_version(&v("30")).outcome, Outcome::Pass);
        assert_eq!(check_version(&v("31+")).outcome, Outcome::Pass);
        assert_eq!(check_version(&v("")).outcome, Outcome::Fail);
    }

    #[test]
    fn every_generated_crd_is_expected_with_a_schema() {
        let e = expected_crds();
        assert_eq!(e.len(), 3);
        assert!(
            e.iter()
                .all(|c| c.schema.is_object() && c.version == "v1alpha1")
        );
    }
}
