//! Least privilege, checked both ways: `config/rbac` grants exactly `trellis_operator::rbac::RULES`
//! (no verb or resource more, none less), and every Kubernetes kind the operator's code builds an
//! `Api` for is covered by a rule. The recorded API exchanges (`tests/recorded`) check each
//! request the tests see against the same rules, so code that starts calling an API the install
//! does not grant fails there.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use trellis_operator::rbac::{RULES, Scope};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// One `(group, resource, verb, name or "*")` per grant.
type Grant = (String, String, String, String);

fn expand_yaml(rules: &[PolicyRule]) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for r in rules {
        let names = r
            .resource_names
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| vec!["*".into()]);
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    for n in &names {
                        out.insert((g.clone(), res.clone(), v.clone(), n.clone()));
                    }
                }
            }
        }
    }
    out
}

fn expand_code(scope: Scope) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for r in RULES.iter().filter(|r| r.scope == scope) {
        let names: Vec<&str> = if r.names.is_empty() {
            vec!["*"]
        } else {
            r.names.to_vec()
        };
        for res in r.resources {
            for v in r.verbs {
                for n in &names {
                    out.insert((
                        r.group.to_string(),
                        res.to_string(),
                        v.to_string(),
                        n.to_string(),
                    ));
                }
            }
        }
    }
    out
}

fn read(file: &str) -> String {
    std::fs::read_to_string(repo_root().join(file)).unwrap()
}

#[test]
fn config_rbac_grants_exactly_the_rules_in_the_code() {
    let cluster: ClusterRole =
        serde_saphyr::from_str(&read("config/rbac/cluster_role.yaml")).unwrap();
    let role: Role = serde_saphyr::from_str(&read("config/rbac/role.yaml")).unwrap();
    for (file, yaml, code) in [
        (
            "config/rbac/cluster_role.yaml",
            expand_yaml(&cluster.rules.unwrap_or_default()),
            expand_code(Scope::Cluster),
        ),
        (
            "config/rbac/role.yaml",
            expand_yaml(&role.rules.unwrap_or_default()),
            expand_code(Scope::OperatorNamespace),
        ),
    ] {
        let extra: Vec<_> = yaml.difference(&code).collect();
        let missing: Vec<_> = code.difference(&yaml).collect();
        assert!(
            extra.is_empty() && missing.is_empty(),
            "{file} differs from operator/src/rbac.rs:\n  granted but not in the code: \
             {extra:?}\n  in the code but not granted: {missing:?}"
        );
    }
}

/// The `(group, resource)` behind each kind the operator may build an `Api` for. A kind missing
/// here fails the test below: add it, and a rule for it.
fn resource_of(kind: &str) -> Option<(&'static str, &'static str)> {
    Some(match kind {
        "Mesh" => ("trellis.dev", "meshes"),
        "TrafficPolicy" => ("trellis.dev", "trafficpolicies"),
        "PeerAuthentication" => ("trellis.dev", "peerauthentications"),
        "ConfigMap" => ("", "configmaps"),
        "Secret" => ("", "secrets"),
        "Namespace" => ("", "namespaces"),
        "Service" => ("", "services"),
        "Pod" | "SlimPod" => ("", "pods"),
        "EndpointSlice" => ("discovery.k8s.io", "endpointslices"),
        "TokenReview" => ("authentication.k8s.io", "tokenreviews"),
        "Lease" => ("coordination.k8s.io", "leases"),
        "Deployment" => ("apps", "deployments"),
        "StatefulSet" => ("apps", "statefulsets"),
        "DaemonSet" => ("apps", "daemonsets"),
        "MutatingWebhookConfiguration" => (
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
        ),
        _ => return None,
    })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// Every `Api::<Kind>` / `Api<Kind>` (also behind `PartialObjectMeta<..>`) in the operator's
/// code (the local `trellis dev` mesh excepted, and the CLI and `trellis check`, which use the
/// user's credentials) is a
/// kind some rule grants.
#[test]
fn every_api_the_code_builds_is_granted() {
    let src = repo_root().join("operator/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut seen = BTreeSet::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().to_string();
        // `trellis check` reads the cluster as the user running it, not as the operator.
        if rel.starts_with("dev/")
            || rel.starts_with("cli/")
            || rel.starts_with("check/")
            || rel == "rbac.rs"
        {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, _) in text.match_indices("Api") {
            let rest = &text[i + 3..];
            let rest = rest.strip_prefix("::").unwrap_or(rest);
            let Some(rest) = rest.strip_prefix('<') else {
                continue;
            };
            let rest = rest.strip_prefix("PartialObjectMeta<").unwrap_or(rest);
            let kind: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let kind = kind.rsplit("::").next().unwrap_or_default().to_string();
            // Generic helpers (`Api<K>`, `Api<Self>`) are checked at their call sites, and
            // dynamic ones (`Api<DynamicObject>`, the addons) by every recorded exchange
            // (`tests/recorded`, `assert_granted`).
            if kind.len() <= 1 || kind == "Self" || kind == "DynamicObject" {
                continue;
            }
            seen.insert((rel.clone(), kind));
        }
    }
    assert!(seen.len() > 10, "found too few Api uses: {seen:?}");
    for (file, kind) in seen {
        let (group, resource) = resource_of(&kind).unwrap_or_else(|| {
            panic!("operator/src/{file}: Api<{kind}>: no RBAC mapping; add a rule")
        });
        assert!(
            RULES
                .iter()
                .any(|r| r.group == group && r.resources.contains(&resource)),
            "operator/src/{file}: Api<{kind}> ({group}/{resource}) is not granted by any rule"
        );
    }
}
