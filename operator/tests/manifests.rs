//! The install manifests: `kubectl kustomize config/default` renders a complete install that
//! validates (strictly) against the Kubernetes schemas, and carries the properties the design
//! promises (2 non-root replicas, probes, PDB, Service ports, the generated CRDs, no static
//! webhook configuration).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cache_dir() -> Option<PathBuf> {
    std::env::var_os("TRELLIS_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/trellis")))
}

/// kubectl from PATH, or the one hack/validate-manifests.sh installs into its virtualenv.
fn kubectl() -> Option<PathBuf> {
    let works = |p: &Path| {
        Command::new(p)
            .args(["version", "--client"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let on_path = PathBuf::from("kubectl");
    if works(&on_path) {
        return Some(on_path);
    }
    let venv = cache_dir()?.join("venv/bin/kubectl");
    works(&venv).then_some(venv)
}

/// The rendered install, or `None` (with a printed reason) when kubectl is not installed.
fn render() -> Option<(String, Vec<Value>)> {
    render_dir(&repo_root().join("config/default"))
}

/// `kubectl kustomize <dir>`, or `None` (with a printed reason) when kubectl is not installed.
fn render_dir(dir: &Path) -> Option<(String, Vec<Value>)> {
    let Some(kubectl) = kubectl() else {
        eprintln!(
            "SKIP: kubectl is not installed; run hack/validate-manifests.sh --install to render config/default"
        );
        return None;
    };
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
    Some((text, docs))
}

fn validator() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TRELLIS_KUBERNETES_VALIDATE") {
        return Some(PathBuf::from(p));
    }
    let p = cache_dir()?.join("venv/bin/kubernetes-validate");
    p.exists().then_some(p)
}

#[test]
fn install_validates_strictly_against_the_kubernetes_schemas() {
    let Some((text, _)) = render() else { return };
    let validator = validator().unwrap_or_else(|| {
        panic!(
            "kubernetes-validate is not installed: run `hack/validate-manifests.sh --install` \
             (hack/install-deps.sh does it)"
        )
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("install.yaml");
    std::fs::write(&file, &text).unwrap();
    let out = Command::new(&validator)
        .args(["--strict", "--kubernetes-version", "1.37"])
        .arg(&file)
        .output()
        .unwrap();
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kubernetes-validate --strict failed:\n{report}"
    );
    // Every object was checked, CRD objects included.
    assert_eq!(
        report.matches("passed for resource").count(),
        text.matches("\nkind: ").count() + usize::from(text.starts_with("kind: ")),
        "{report}"
    );
    assert!(
        report.contains("customresourcedefinition/meshes.trellis.dev"),
        "{report}"
    );
}

fn normalize(v: Value) -> Value {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => Value::from(f as i64),
            _ => Value::Number(n),
        },
        Value::Array(a) => Value::Array(a.into_iter().map(normalize).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, normalize(v))).collect()),
        other => other,
    }
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("config/default renders no {kind} {name}"))
}

#[test]
fn install_has_what_the_design_promises() {
    let Some((_, docs)) = render() else { return };

    // The CRDs are exactly the generated ones.
    for crd in trellis_operator::api::crds() {
        let name = crd.metadata.name.clone().unwrap();
        let rendered = find(&docs, "CustomResourceDefinition", &name);
        // YAML writes 1.0 as 1; compare numbers by value.
        assert!(
            normalize(rendered.clone()) == normalize(serde_json::to_value(&crd).unwrap()),
            "{name} in config/default differs from the types: regenerate crds/"
        );
    }
    // The operator owns the webhook configuration; a static one would fight it.
    assert!(
        docs.iter()
            .all(|d| d["kind"] != "MutatingWebhookConfiguration")
    );
    // Everything namespaced lands in trellis-system.
    for d in &docs {
        if let Some(ns) = d["metadata"]["namespace"].as_str() {
            assert_eq!(ns, "trellis-system", "{}", d["metadata"]["name"]);
        }
    }

    let deploy = find(&docs, "Deployment", "trellis-operator");
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "trellis-operator");
    assert_eq!(pod["priorityClassName"], "system-cluster-critical");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let port = |name: &str| {
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no container port {name}"))["containerPort"]
            .clone()
    };
    assert_eq!(port("admin"), 8080);
    assert_eq!(port("webhook"), 9443);
    assert_eq!(port("identity"), 15012);
    assert_eq!(port("discovery"), 15010);
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "admin");
    for key in ["requests", "limits"] {
        assert!(c["resources"][key]["memory"].is_string(), "memory {key}");
        assert!(c["resources"][key]["cpu"].is_string(), "cpu {key}");
    }
    let env = c["env"].as_array().unwrap();
    let pod_ns = env.iter().find(|e| e["name"] == "POD_NAMESPACE").unwrap();
    assert_eq!(
        pod_ns["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );

    let svc = find(&docs, "Service", "trellis-operator");
    let svc_ports: Vec<(i64, String)> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["port"].as_i64().unwrap(),
                p["targetPort"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        svc_ports,
        [
            (443, "webhook".to_string()),
            (15012, "identity".to_string()),
            (15010, "discovery".to_string())
        ]
    );
    assert_eq!(
        svc["spec"]["selector"],
        deploy["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
            .as_str()
            .map(|n| serde_json::json!({"app.kubernetes.io/name": n}))
            .unwrap()
    );
    let pdb = find(&docs, "PodDisruptionBudget", "trellis-operator");
    assert_eq!(pdb["spec"]["minAvailable"], 1);

    // Secrets and Leases only in the operator's own namespace.
    let cluster_role = find(&docs, "ClusterRole", "trellis-operator");
    for rule in cluster_role["rules"].as_array().unwrap() {
        let resources = rule["resources"].as_array().unwrap();
        assert!(
            !resources
                .iter()
                .any(|r| r == "secrets" || r == "leases" || r == "*"),
            "cluster-wide rule too broad: {rule}"
        );
        assert!(
            !rule["verbs"].as_array().unwrap().iter().any(|v| v == "*"),
            "{rule}"
        );
    }
}

/// Least privilege is reviewable only if every rule says why it exists.
#[test]
fn every_rbac_rule_is_explained() {
    for file in ["config/rbac/cluster_role.yaml", "config/rbac/role.yaml"] {
        let text = std::fs::read_to_string(repo_root().join(file)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim_start().starts_with("- apiGroups:") {
                // Walk back over the rules this comment block covers (a rule split in two, such
                // as create vs. name-limited verbs, shares one comment).
                let mut j = i;
                while j > 0 && !lines[j - 1].trim_start().starts_with('#') {
                    let prev = lines[j - 1].trim_start();
                    if prev == "rules:" {
                        break;
                    }
                    j -= 1;
                }
                assert!(
                    j > 0 && lines[j - 1].trim_start().starts_with('#'),
                    "{file}:{}: RBAC rule without a comment saying why it is needed",
                    i + 1
                );
            }
        }
    }
}

/// An install into another namespace (a kustomize overlay with `namespace:`, as OLM or a
/// platform team would do): every object lands there, the bindings name its ServiceAccount,
/// nothing still says `trellis-system`, and what the operator derives from `POD_NAMESPACE`
/// (the webhook's Service reference, the serving certificate's names, the identity endpoint
/// sidecars call) names the Service the install actually creates.
#[test]
fn install_into_another_namespace_follows_it_everywhere() {
    const NS: &str = "mesh-ops";
    let dir = tempfile::tempdir().unwrap();
    // kustomize refuses absolute paths to bases: walk up from the overlay to `/`.
    let up = "../".repeat(dir.path().components().count() - 1);
    let base = format!("{up}{}", repo_root().join("config/default").display()).replace("//", "/");
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
             namespace: {NS}\nresources:\n  - {base}\n"
        ),
    )
    .unwrap();
    let Some((text, docs)) = render_dir(dir.path()) else {
        return;
    };
    assert!(
        !text.contains("trellis-system"),
        "the overlay still renders trellis-system:\n{}",
        text.lines()
            .filter(|l| l.contains("trellis-system"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    find(&docs, "Namespace", NS);
    for d in &docs {
        if let Some(ns) = d["metadata"]["namespace"].as_str() {
            assert_eq!(ns, NS, "{}", d["metadata"]["name"]);
        }
    }
    for (kind, name) in [
        ("ClusterRoleBinding", "trellis-operator"),
        ("RoleBinding", "trellis-operator"),
    ] {
        let subjects = &find(&docs, kind, name)["subjects"];
        assert_eq!(
            subjects,
            &serde_json::json!([{"kind": "ServiceAccount", "name": "trellis-operator", "namespace": NS}]),
            "{kind}"
        );
    }
    let deploy = find(&docs, "Deployment", "trellis-operator");
    let env = deploy["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    let pod_ns = env.iter().find(|e| e["name"] == "POD_NAMESPACE").unwrap();
    assert_eq!(
        pod_ns["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );

    // What an operator told `POD_NAMESPACE=mesh-ops` derives must reach this Service.
    let svc = find(&docs, "Service", "trellis-operator");
    let svc_dns = format!(
        "{}.{}.svc",
        svc["metadata"]["name"].as_str().unwrap(),
        svc["metadata"]["namespace"].as_str().unwrap()
    );
    let svc_port = |name: &str| {
        svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["port"]
            .as_i64()
            .unwrap()
    };
    assert!(
        trellis_operator::identity::replica::service_names(NS).contains(&svc_dns),
        "the serving certificate does not name {svc_dns}"
    );
    assert_eq!(
        trellis_operator::controller::compile_settings(NS).identity_endpoint,
        Some(format!("https://{svc_dns}:{}", svc_port("https-identity")))
    );
    let mut mesh = trellis_operator::api::Mesh::new("default", Default::default());
    mesh.metadata.uid = Some("uid".into());
    let hook = trellis_operator::inject::webhook_config::desired(&mesh, "pem", NS);
    for w in hook.webhooks.unwrap() {
        let s = w.client_config.service.unwrap();
        assert_eq!(format!("{}.{}.svc", s.name, s.namespace), svc_dns);
        assert_eq!(i64::from(s.port.unwrap()), svc_port("https-webhook"));
    }
}

/// The Argo CD install (`config/argocd`, docs/gitops.md) is config/default plus the Mesh, with
/// the sync waves and options the guide promises and nothing else changed.
#[test]
fn argocd_overlay_orders_crds_operator_mesh() {
    let Some((_, default)) = render() else { return };
    let kubectl = kubectl().unwrap();
    let out = Command::new(kubectl)
        .args(["kustomize", "config/argocd"])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(
        docs.len(),
        default.len() + 1,
        "config/default plus the Mesh"
    );
    for d in &docs {
        let kind = d["kind"].as_str().unwrap();
        let ann = &d["metadata"]["annotations"];
        let (wave, options) = (
            ann["argocd.argoproj.io/sync-wave"].as_str(),
            ann["argocd.argoproj.io/sync-options"].as_str(),
        );
        match kind {
            "CustomResourceDefinition" => {
                assert_eq!((wave, options), (Some("-1"), Some("ServerSideApply=true")))
            }
            "Mesh" => {
                assert_eq!(d["metadata"]["name"], "default");
                assert!(d["metadata"].get("namespace").is_none());
                assert_eq!(
                    (wave, options),
                    (Some("1"), Some("SkipDryRunOnMissingResource=true"))
                )
            }
            // Everything else is config/default's object, unchanged, in wave 0.
            _ => {
                assert!(
                    default.iter().any(|x| x == d),
                    "{kind} {} differs from config/default",
                    d["metadata"]["name"]
                );
                assert_eq!((wave, options), (None, None), "{kind}");
            }
        }
    }
}
