//! Golden tests of the injection patch for representative pods, and the scope rules.
//!
//! Regenerate after an intended change with
//! `UPDATE_GOLDEN=1 cargo test -p trellis-operator --test inject_golden` and review the diff.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use trellis_operator::api::MeshSpec;
use trellis_operator::inject::{
    Decision, InjectContext, InjectError, NamespaceInfo, SkipReason, default_mesh, inject,
    uninject_pod_json,
};

fn golden(name: &str, actual: &Value) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/inject")
        .join(name);
    let text = serde_json::to_string_pretty(actual).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    assert_eq!(text, expected, "golden file {} differs", path.display());
}

fn enabled_ns() -> BTreeMap<String, String> {
    BTreeMap::from([("trellis.dev/inject".to_string(), "enabled".to_string())])
}

fn decide(
    pod: &Value,
    ns: &str,
    labels: Option<&BTreeMap<String, String>>,
    mesh: &MeshSpec,
) -> Decision {
    let pod: Pod = serde_json::from_value(pod.clone()).unwrap();
    inject(
        &pod,
        &NamespaceInfo { name: ns, labels },
        mesh,
        &InjectContext::default(),
    )
}

/// Injects `input` in an enabled namespace, checks the patch and patched pod against the golden
/// files, that the patch applied to the raw input JSON gives that pod, that the pod is a valid
/// `Pod`, and that uninjecting it gives the input back. Returns the warnings.
fn check_patch(name: &str, input: Value) -> Vec<String> {
    let labels = enabled_ns();
    let decision = decide(&input, "shop", Some(&labels), &default_mesh());
    let Decision::Patch {
        patch,
        pod,
        warnings,
    } = decision
    else {
        panic!("{name}: expected a patch, got {decision:?}");
    };
    let patch_json = serde_json::to_value(&patch).unwrap();
    golden(&format!("{name}.patch.json"), &patch_json);
    let mut raw = input.clone();
    json_patch::patch(&mut raw, &patch).unwrap();
    // The patched document is a valid Pod, equal to the one the injector returned.
    let reparsed: Pod = serde_json::from_value(raw.clone()).unwrap();
    assert_eq!(&reparsed, pod.as_ref());
    golden(&format!("{name}.patched.json"), &raw);
    // Every add targets a path that exists after the previous ops: the patch also applies
    // cleanly op by op (json_patch::patch above is atomic, this checks the order is right).
    let mut stepwise = input.clone();
    for op in patch.iter() {
        json_patch::patch(&mut stepwise, std::slice::from_ref(op)).unwrap();
    }
    assert_eq!(stepwise, raw);
    // Uninject reverses it exactly.
    let mut back = raw.clone();
    assert!(uninject_pod_json(&mut back));
    assert_eq!(
        back,
        without_empty_holders(input),
        "{name}: uninject did not restore the input"
    );
    warnings
}

/// `annotations: {}`, `initContainers: []` and `volumes: []` mean the same as absent to
/// Kubernetes; uninject cannot tell whether inject created them, and removes them when empty.
fn without_empty_holders(mut pod: Value) -> Value {
    for (parent, key) in [
        ("metadata", "annotations"),
        ("spec", "initContainers"),
        ("spec", "volumes"),
    ] {
        let obj = pod[parent].as_object_mut().unwrap();
        let empty = match obj.get(key) {
            Some(Value::Object(m)) => m.is_empty(),
            Some(Value::Array(a)) => a.is_empty(),
            _ => false,
        };
        if empty {
            obj.remove(key);
        }
    }
    pod
}

fn plain_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-5d8f7", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {
            "serviceAccountName": "web",
            "containers": [{"name": "web", "image": "nginx:1.27", "ports": [{"containerPort": 8080}]}]
        }
    })
}

#[test]
fn plain_deployment_pod() {
    let warnings = check_patch("plain", plain_pod());
    assert!(warnings.is_empty());
}

#[test]
fn named_ports_and_http_probes() {
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "api-0",
            "namespace": "shop",
            "annotations": {"prometheus.io/scrape": "true"}
        },
        "spec": {
            "initContainers": [{"name": "migrate", "image": "api:1", "args": ["migrate"]}],
            "volumes": [{"name": "cache", "emptyDir": {}}],
            "containers": [{
                "name": "api",
                "image": "api:1",
                "ports": [
                    {"name": "http", "containerPort": 8080},
                    {"name": "health", "containerPort": 8081}
                ],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "health"}},
                "livenessProbe": {"httpGet": {"path": "/live", "port": "health"}},
                "startupProbe": {"tcpSocket": {"port": 8080}}
            }, {
                "name": "grpc",
                "image": "api:1",
                "readinessProbe": {"grpc": {"port": 9090}},
                "livenessProbe": {"exec": {"command": ["true"]}}
            }]
        }
    });
    let warnings = check_patch("probes", pod);
    assert!(warnings.is_empty(), "{warnings:?}");
    let v = read_golden("probes.patched.json");
    // No port leaves the mesh because it is probed.
    let args = v["spec"]["initContainers"][0]["args"].as_array().unwrap();
    assert!(
        !args.contains(&json!("--exclude-inbound-ports")),
        "{args:?}"
    );
    let api = &v["spec"]["containers"][0];
    assert_eq!(
        api["readinessProbe"],
        json!({"httpGet": {"path": "/app-health/api/readyz", "port": 15020}})
    );
    assert_eq!(
        api["startupProbe"],
        json!({"httpGet": {"path": "/app-health/api/startupz", "port": 15020}})
    );
    // exec probes stay.
    assert_eq!(
        v["spec"]["containers"][1]["livenessProbe"],
        json!({"exec": {"command": ["true"]}})
    );
}

/// The probe rewrite in full; tests/netns_probes.rs in the sidecar crate runs this very
/// injection (init args, the proxy's env) in network namespaces against real apps.
fn app_probes_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "shop-0", "namespace": "shop"},
        "spec": {
            "initContainers": [
                {"name": "migrate", "image": "shop:1", "args": ["migrate"]},
                {
                    "name": "log-shipper",
                    "image": "shipper:3",
                    "restartPolicy": "Always",
                    "ports": [{"name": "metrics", "containerPort": 9100}],
                    "readinessProbe": {
                        "httpGet": {"path": "/ready", "port": "metrics", "scheme": "HTTPS"},
                        "periodSeconds": 7
                    }
                }
            ],
            "containers": [{
                "name": "web",
                "image": "shop:1",
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {
                    "httpGet": {
                        "path": "/healthz?full=1",
                        "port": "http",
                        "httpHeaders": [{"name": "X-Probe", "value": "ready"}]
                    },
                    "initialDelaySeconds": 1,
                    "periodSeconds": 5,
                    "timeoutSeconds": 2,
                    "successThreshold": 1,
                    "failureThreshold": 3
                },
                "livenessProbe": {
                    "httpGet": {"path": "/fail", "port": 8080},
                    "periodSeconds": 10,
                    "timeoutSeconds": 1,
                    "failureThreshold": 3,
                    "terminationGracePeriodSeconds": 15
                },
                "startupProbe": {
                    "tcpSocket": {"port": "http"},
                    "periodSeconds": 1,
                    "failureThreshold": 30
                }
            }, {
                "name": "grpc",
                "image": "shop-grpc:1",
                "ports": [{"containerPort": 9090}],
                "readinessProbe": {"grpc": {"port": 9090}},
                "livenessProbe": {"grpc": {"port": 9090, "service": "down"}, "timeoutSeconds": 3}
            }, {
                "name": "worker",
                "image": "shop:1",
                "livenessProbe": {"exec": {"command": ["/bin/check"]}},
                "readinessProbe": {"httpGet": {"host": "10.0.0.1", "path": "/", "port": 80}},
                "startupProbe": {"tcpSocket": {"port": "missing"}}
            }]
        }
    })
}

#[test]
fn app_probes_rewritten_to_the_admin_port() {
    let input = app_probes_pod();
    let warnings = check_patch("app-probes", input.clone());
    // The one probe that cannot be rewritten says so.
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("startupProbe") && warnings[0].contains("worker"),
        "{warnings:?}"
    );
    let v = read_golden("app-probes.patched.json");
    let args = v["spec"]["initContainers"][0]["args"].as_array().unwrap();
    assert!(
        !args.contains(&json!("--exclude-inbound-ports")),
        "{args:?}"
    );
    // Every timing field kept; only the action changed.
    let web = &v["spec"]["containers"][0];
    let mut expected = input["spec"]["containers"][0]["readinessProbe"].clone();
    expected["httpGet"] = json!({"path": "/app-health/web/readyz", "port": 15020});
    assert_eq!(web["readinessProbe"], expected);
    let mut expected = input["spec"]["containers"][0]["livenessProbe"].clone();
    expected["httpGet"] = json!({"path": "/app-health/web/livez", "port": 15020});
    assert_eq!(web["livenessProbe"], expected);
    assert_eq!(
        web["startupProbe"],
        json!({
            "httpGet": {"path": "/app-health/web/startupz", "port": 15020},
            "periodSeconds": 1,
            "failureThreshold": 30
        })
    );
    // The native sidecar's probe (now at index 3, after trellis-init and trellis-proxy).
    assert_eq!(
        v["spec"]["initContainers"][3]["readinessProbe"],
        json!({"httpGet": {"path": "/app-health/log-shipper/readyz", "port": 15020}, "periodSeconds": 7})
    );
    // Left alone: exec, host:, and the unresolvable named port.
    let worker = &v["spec"]["containers"][2];
    for field in ["livenessProbe", "readinessProbe", "startupProbe"] {
        assert_eq!(
            worker[field], input["spec"]["containers"][2][field],
            "{field}"
        );
    }
    // The proxy gets the originals with ports resolved, and the pod IP.
    let env = v["spec"]["initContainers"][1]["env"].as_array().unwrap();
    assert!(env.contains(&json!({
        "name": "TRELLIS_POD_IP",
        "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}
    })));
    let probes = env
        .iter()
        .find(|e| e["name"] == "TRELLIS_APP_PROBES")
        .unwrap();
    let probes: Value = serde_json::from_str(probes["value"].as_str().unwrap()).unwrap();
    assert_eq!(
        probes,
        json!({
            "/app-health/web/readyz": {"httpGet": {"path": "/healthz?full=1", "port": 8080,
                "scheme": "HTTP", "httpHeaders": [{"name": "X-Probe", "value": "ready"}]},
                "timeoutSeconds": 2},
            "/app-health/web/livez": {"httpGet": {"path": "/fail", "port": 8080, "scheme": "HTTP"},
                "timeoutSeconds": 1},
            "/app-health/web/startupz": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 1},
            "/app-health/grpc/readyz": {"grpc": {"port": 9090}, "timeoutSeconds": 1},
            "/app-health/grpc/livez": {"grpc": {"port": 9090, "service": "down"}, "timeoutSeconds": 3},
            "/app-health/log-shipper/readyz": {"httpGet": {"path": "/ready", "port": 9100,
                "scheme": "HTTPS"}, "timeoutSeconds": 1}
        })
    );
    // ... which the proxy accepts.
    trellis_proxy::probe::ProbeSet::from_str(&probes.to_string()).unwrap();
}

fn read_golden(name: &str) -> Value {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/inject")
            .join(name),
    )
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Uninject puts back only a probe that is still the rewritten one, and a broken annotation
/// leaves the probes (and the annotation) alone rather than guessing.
#[test]
fn uninject_restores_only_rewritten_probes() {
    let labels = enabled_ns();
    let Decision::Patch { pod, .. } =
        decide(&app_probes_pod(), "shop", Some(&labels), &default_mesh())
    else {
        panic!()
    };
    let injected = serde_json::to_value(&pod).unwrap();
    // Someone changed the readiness probe after injection: it is kept as they wrote it.
    let mut edited = injected.clone();
    edited["spec"]["containers"][0]["readinessProbe"]["httpGet"] =
        json!({"path": "/mine", "port": 8080});
    assert!(uninject_pod_json(&mut edited));
    assert_eq!(
        edited["spec"]["containers"][0]["readinessProbe"]["httpGet"],
        json!({"path": "/mine", "port": 8080})
    );
    assert_eq!(
        edited["spec"]["containers"][0]["livenessProbe"],
        app_probes_pod()["spec"]["containers"][0]["livenessProbe"]
    );
    let mut broken = injected.clone();
    broken["metadata"]["annotations"]["trellis.dev/original-probes"] = json!("{not json");
    assert!(uninject_pod_json(&mut broken));
    assert_eq!(
        broken["metadata"]["annotations"]["trellis.dev/original-probes"],
        "{not json"
    );
    assert_eq!(
        broken["spec"]["containers"][0]["livenessProbe"]["httpGet"]["path"],
        "/app-health/web/livez"
    );
}

#[test]
fn job_pod() {
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "backup-28791-",
            "namespace": "shop",
            "labels": {"batch.kubernetes.io/job-name": "backup-28791"},
            "annotations": {}
        },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "backup", "image": "backup:2", "args": ["--once"]}],
            "volumes": []
        }
    });
    check_patch("job", pod);
}

#[test]
fn exclusion_annotations() {
    let mut pod = plain_pod();
    pod["metadata"]["annotations"] = json!({
        "trellis.dev/exclude-inbound-ports": "9000, 9001",
        "trellis.dev/exclude-outbound-ports": "5432",
        "trellis.dev/exclude-outbound-cidrs": "169.254.169.254/32,fd00::/8",
        "trellis.dev/opaque-ports": "6379,3306",
        "trellis.dev/inbound-to-localhost": "true",
        "trellis.dev/proxy-cpu-request": "50m",
        "trellis.dev/proxy-cpu-limit": "1",
        "trellis.dev/proxy-memory-request": "32Mi",
        "trellis.dev/proxy-memory-limit": "128Mi"
    });
    check_patch("exclusions", pod);
    // Spot checks so a wrong golden file cannot hide the point of this case.
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/inject/exclusions.patched.json"),
    )
    .unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let init = &v["spec"]["initContainers"][0];
    let proxy = &v["spec"]["initContainers"][1];
    assert_eq!(init["name"], "trellis-init");
    assert_eq!(
        init["args"],
        json!([
            "init",
            "--proxy-uid",
            "2137",
            "--inbound-port",
            "15006",
            "--outbound-port",
            "15001",
            "--exclude-inbound-ports",
            "9000,9001",
            "--exclude-outbound-ports",
            "5432",
            "--exclude-outbound-cidrs",
            "169.254.169.254/32,fd00::/8"
        ])
    );
    assert_eq!(proxy["name"], "trellis-proxy");
    assert_eq!(proxy["restartPolicy"], "Always");
    assert!(
        proxy["env"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "TRELLIS_OPAQUE_PORTS", "value": "6379,3306"}))
    );
    assert!(
        proxy["env"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "TRELLIS_INBOUND_TO_LOCALHOST", "value": "true"}))
    );
    assert_eq!(
        proxy["resources"]["limits"],
        json!({"cpu": "1", "memory": "128Mi"})
    );
    assert_eq!(
        proxy["resources"]["requests"],
        json!({"cpu": "50m", "memory": "32Mi"})
    );
}

#[test]
fn already_injected_pod_is_skipped() {
    let labels = enabled_ns();
    // Injected by the webhook: the container is there.
    let Decision::Patch { pod, .. } = decide(&plain_pod(), "shop", Some(&labels), &default_mesh())
    else {
        panic!()
    };
    let injected = serde_json::to_value(&pod).unwrap();
    for candidate in [
        injected,
        // Only the annotation (e.g. the proxy removed by hand): still never injected twice.
        {
            let mut p = plain_pod();
            p["metadata"]["annotations"] = json!({"trellis.dev/proxy-version": "old"});
            p
        },
        // A proxy container added some other way.
        {
            let mut p = plain_pod();
            p["spec"]["containers"]
                .as_array_mut()
                .unwrap()
                .push(json!({"name": "trellis-proxy", "image": "x"}));
            p
        },
    ] {
        assert!(matches!(
            decide(&candidate, "shop", Some(&labels), &default_mesh()),
            Decision::Skip {
                reason: SkipReason::AlreadyInjected
            }
        ));
    }
}

fn skip_reason(
    pod: &Value,
    ns: &str,
    labels: Option<&BTreeMap<String, String>>,
    mesh: &MeshSpec,
) -> Option<SkipReason> {
    match decide(pod, ns, labels, mesh) {
        Decision::Skip { reason } => Some(reason),
        Decision::Patch { .. } => None,
        Decision::Deny { reason } => panic!("unexpected denial: {reason}"),
    }
}

#[test]
fn scope_rules() {
    let enabled = enabled_ns();
    let plain = BTreeMap::new();
    let mesh = default_mesh();
    let with_ann = |v: &str| {
        let mut p = plain_pod();
        p["metadata"]["annotations"] = json!({"trellis.dev/inject": v});
        p
    };
    assert_eq!(
        skip_reason(&plain_pod(), "shop", Some(&enabled), &mesh),
        None
    );
    assert_eq!(
        skip_reason(&plain_pod(), "shop", Some(&plain), &mesh),
        Some(SkipReason::NamespaceNotSelected)
    );
    // Unknown namespace labels: the API server already selected the namespace.
    assert_eq!(skip_reason(&plain_pod(), "shop", None, &mesh), None);
    // The pod wins, both ways.
    assert_eq!(
        skip_reason(&with_ann("disabled"), "shop", Some(&enabled), &mesh),
        Some(SkipReason::PodDisabled)
    );
    assert_eq!(
        skip_reason(&with_ann("enabled"), "shop", Some(&plain), &mesh),
        None
    );
    // A pod label works like the annotation; the annotation wins over the label.
    let mut labelled = plain_pod();
    labelled["metadata"]["labels"]["trellis.dev/inject"] = json!("enabled");
    assert_eq!(skip_reason(&labelled, "shop", Some(&plain), &mesh), None);
    labelled["metadata"]["annotations"] = json!({"trellis.dev/inject": "disabled"});
    assert_eq!(
        skip_reason(&labelled, "shop", Some(&enabled), &mesh),
        Some(SkipReason::PodDisabled)
    );
    // Never these namespaces, even when the pod asks.
    for ns in ["kube-system", "kube-public", "trellis-system"] {
        assert_eq!(
            skip_reason(&with_ann("enabled"), ns, Some(&enabled), &mesh),
            Some(SkipReason::ExcludedNamespace)
        );
    }
    let mut excluding = default_mesh();
    excluding.injection.excluded_namespaces = vec!["legacy".into()];
    assert_eq!(
        skip_reason(&with_ann("enabled"), "legacy", Some(&enabled), &excluding),
        Some(SkipReason::ExcludedNamespace)
    );
    // hostNetwork pods are never injected.
    let mut host = with_ann("enabled");
    host["spec"]["hostNetwork"] = json!(true);
    assert_eq!(
        skip_reason(&host, "shop", Some(&enabled), &mesh),
        Some(SkipReason::HostNetwork)
    );
    // A Mesh namespace selector replaces the default label.
    let mut custom = default_mesh();
    custom.injection.namespace_selector = Some(trellis_operator::api::mesh::LabelSelector {
        match_labels: BTreeMap::from([("mesh".to_string(), "on".to_string())]),
    });
    let mesh_on = BTreeMap::from([("mesh".to_string(), "on".to_string())]);
    assert_eq!(
        skip_reason(&plain_pod(), "shop", Some(&mesh_on), &custom),
        None
    );
    assert_eq!(
        skip_reason(&plain_pod(), "shop", Some(&enabled), &custom),
        Some(SkipReason::NamespaceNotSelected)
    );
}

#[test]
fn bad_annotations_are_denied_with_the_reason() {
    let enabled = enabled_ns();
    for (key, value) in [
        ("trellis.dev/inject", "yes-please"),
        ("trellis.dev/exclude-inbound-ports", "80,http"),
        ("trellis.dev/exclude-outbound-cidrs", "10.0.0.0/99"),
        ("trellis.dev/opaque-ports", "0"),
        ("trellis.dev/inbound-to-localhost", "yes"),
        ("trellis.dev/proxy-memory-limit", "lots"),
    ] {
        let mut pod = plain_pod();
        pod["metadata"]["annotations"] = json!({key: value});
        match decide(&pod, "shop", Some(&enabled), &default_mesh()) {
            Decision::Deny {
                reason: reason @ InjectError::BadAnnotation { .. },
            } => {
                let msg = reason.to_string();
                assert!(msg.contains(key) && msg.contains(value), "{msg}");
            }
            other => panic!("{key}={value}: expected a denial, got {other:?}"),
        }
    }
}

/// The projected volume matches the file layout the proxy reads (DESIGN.md): one volume at
/// /var/run/trellis with config.json, ca.pem, labels and a `trellis`-audience token.
#[test]
fn projected_volume_layout() {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/inject/plain.patched.json"),
    )
    .unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let vol = &v["spec"]["volumes"][0];
    assert_eq!(vol["name"], "trellis");
    let sources = vol["projected"]["sources"].as_array().unwrap();
    assert_eq!(
        sources[0]["configMap"],
        json!({"name": "trellis-proxy", "items": [{"key": "config.json", "path": "config.json"}]})
    );
    assert_eq!(
        sources[1]["configMap"],
        json!({"name": "trellis-trust-bundle", "items": [{"key": "ca.pem", "path": "ca.pem"}]})
    );
    assert_eq!(
        sources[2]["downwardAPI"],
        json!({"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]})
    );
    assert_eq!(
        sources[3]["serviceAccountToken"],
        json!({"audience": "trellis", "expirationSeconds": 3600, "path": "token"})
    );
    let proxy = &v["spec"]["initContainers"][1];
    assert_eq!(
        proxy["volumeMounts"],
        json!([{"name": "trellis", "mountPath": "/var/run/trellis", "readOnly": true}])
    );
    assert_eq!(proxy["securityContext"]["runAsUser"], 2137);
    assert_eq!(
        v["metadata"]["annotations"]["trellis.dev/proxy-version"],
        default_mesh().proxy.effective_image()
    );
    let init = &v["spec"]["initContainers"][0];
    assert_eq!(
        init["securityContext"],
        json!({
            "runAsUser": 0, "runAsNonRoot": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
        })
    );
}

/// The patched pods and the webhook configuration pass the Kubernetes OpenAPI schema of the
/// oldest (1.29) and newest supported versions, strictly (no unknown fields), when PyPI's
/// `kubernetes-validate` is installed; skips with a message otherwise.
#[test]
fn golden_objects_pass_the_kubernetes_schema() {
    let tool =
        std::env::var("KUBERNETES_VALIDATE").unwrap_or_else(|_| "kubernetes-validate".into());
    if std::process::Command::new(&tool)
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIP golden_objects_pass_the_kubernetes_schema: {tool} not installed (pip install kubernetes-validate)"
        );
        return;
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/inject");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.ends_with(".patched.json") || name == "webhook-config.json"
        })
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    for version in ["1.29.0", "1.37.0"] {
        let out = std::process::Command::new(&tool)
            .args(["--strict", "--quiet", "-k", version])
            .args(&files)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "schema {version}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
