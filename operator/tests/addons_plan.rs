//! The addon reconcile's pure core (`trellis_operator::addons::{desired, plan}`): which objects
//! `Mesh.spec.observability` asks for, how they are secured and bounded, what Prometheus
//! scrapes, what a pass applies and deletes, and what `ObservabilityReady` says.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{Value, json};
use trellis_operator::addons::desired::{
    self, ADDON_LABEL, GRADE_LABEL, GRAFANA, Inputs, JAEGER, Kind, Object, ObjectKey, PROMETHEUS,
};
use trellis_operator::addons::images;
use trellis_operator::addons::plan::{DeploymentState, Observed, plan};
use trellis_operator::api::conditions::ConditionStatus;
use trellis_operator::api::{Mesh, MeshSpec};

const NS: &str = "mesh-ops";

fn mesh(observability: Value) -> Mesh {
    let spec: MeshSpec = serde_json::from_value(json!({ "observability": observability })).unwrap();
    let mut m = Mesh::new("default", spec);
    m.metadata.uid = Some("mesh-uid".into());
    m.metadata.generation = Some(7);
    m
}

fn all_on() -> Mesh {
    mesh(
        json!({"metrics": {"enabled": true}, "dashboards": {"enabled": true},
                "tracing": {"enabled": true}}),
    )
}

fn desired_of(m: &Mesh, served: bool) -> Vec<Object> {
    desired::desired(&Inputs {
        mesh: m,
        namespace: NS,
        prometheus_operator: served,
    })
    .unwrap()
}

fn find<'a>(objs: &'a [Object], kind: Kind, name: &str) -> &'a Object {
    objs.iter()
        .find(|o| o.key.kind == kind && o.key.name == name)
        .unwrap_or_else(|| panic!("no {kind:?} {name} in {:#?}", keys(objs)))
}

fn keys(objs: &[Object]) -> Vec<String> {
    objs.iter().map(|o| o.key.to_string()).collect()
}

fn deployment(objs: &[Object], name: &str) -> Deployment {
    serde_json::from_value(find(objs, Kind::Deployment, name).body.clone()).unwrap()
}

/// What the cluster would show after the objects were applied and the Deployments became
/// ready (`ready` replicas each).
fn as_observed(objs: &[Object], ready: i32) -> Vec<Observed> {
    objs.iter()
        .map(|o| Observed {
            key: o.key.clone(),
            hash: Some(o.hash().to_string()),
            owners: vec!["mesh-uid".into()],
            deployment: (o.key.kind == Kind::Deployment).then_some(DeploymentState {
                replicas: 1,
                ready,
                updated: 1,
                current: true,
            }),
        })
        .collect()
}

fn inputs(m: &Mesh, served: bool) -> Inputs<'_> {
    Inputs {
        mesh: m,
        namespace: NS,
        prometheus_operator: served,
    }
}

#[test]
fn install_mode_runs_the_three_addons_in_the_operators_namespace_owned_by_the_mesh() {
    let objs = desired_of(&all_on(), false);
    assert_eq!(
        keys(&objs),
        [
            "ServiceAccount mesh-ops/trellis-prometheus",
            "ClusterRole trellis-prometheus",
            "ClusterRoleBinding trellis-prometheus",
            "ConfigMap mesh-ops/trellis-prometheus",
            "ConfigMap mesh-ops/trellis-grafana",
            "ConfigMap mesh-ops/trellis-dashboards",
            "Service mesh-ops/trellis-prometheus",
            "Service mesh-ops/trellis-grafana",
            "Service mesh-ops/trellis-jaeger",
            "NetworkPolicy mesh-ops/trellis-prometheus",
            "NetworkPolicy mesh-ops/trellis-grafana",
            "NetworkPolicy mesh-ops/trellis-jaeger",
            "Deployment mesh-ops/trellis-prometheus",
            "Deployment mesh-ops/trellis-grafana",
            "Deployment mesh-ops/trellis-jaeger",
        ]
    );
    for o in &objs {
        let meta = &o.body["metadata"];
        let owner = &meta["ownerReferences"][0];
        assert_eq!(
            (
                &owner["kind"],
                &owner["name"],
                &owner["uid"],
                &owner["controller"]
            ),
            (
                &json!("Mesh"),
                &json!("default"),
                &json!("mesh-uid"),
                &json!(true)
            ),
            "{}",
            o.key
        );
        assert_eq!(meta["labels"][GRADE_LABEL], "evaluation", "{}", o.key);
        assert!(meta["labels"][ADDON_LABEL].is_string(), "{}", o.key);
        assert_eq!(
            meta["annotations"]["trellis.dev/addon-hash"]
                .as_str()
                .unwrap()
                .len(),
            16
        );
    }
    // The pinned images, unless overridden.
    for (name, image) in [
        (PROMETHEUS, images::PROMETHEUS),
        (GRAFANA, images::GRAFANA),
        (JAEGER, images::JAEGER),
    ] {
        let d = deployment(&objs, name);
        let c = &d.spec.template.spec.unwrap().containers[0];
        assert_eq!(c.image.as_deref(), Some(image));
    }
}

/// Every addon runs non-root, without privilege, with a read-only root filesystem (emptyDir
/// for what it writes) and bounded CPU and memory.
#[test]
fn every_addon_is_non_root_read_only_and_resource_limited() {
    let objs = desired_of(&all_on(), false);
    for name in [PROMETHEUS, GRAFANA, JAEGER] {
        let spec = deployment(&objs, name).spec;
        assert_eq!(spec.replicas, Some(1));
        let pod = spec.template.spec.unwrap();
        let psc = pod.security_context.unwrap();
        assert_eq!(psc.run_as_non_root, Some(true), "{name}");
        assert!(psc.run_as_user.unwrap() > 0, "{name}");
        let c = &pod.containers[0];
        let sc = c.security_context.clone().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true), "{name}");
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{name}");
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{name}");
        assert_eq!(sc.capabilities.unwrap().drop.unwrap(), ["ALL"], "{name}");
        let r = c.resources.clone().unwrap();
        for key in ["cpu", "memory"] {
            assert!(
                r.requests.as_ref().unwrap().contains_key(key),
                "{name} {key}"
            );
            assert!(r.limits.as_ref().unwrap().contains_key(key), "{name} {key}");
        }
        // Every writable path is an emptyDir with a size limit.
        let volumes = pod.volumes.unwrap();
        for m in c
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| m.read_only != Some(true))
        {
            let v = volumes.iter().find(|v| v.name == m.name).unwrap();
            let e = v
                .empty_dir
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: {} is not an emptyDir", m.mount_path));
            assert!(e.size_limit.is_some(), "{name} {}", m.mount_path);
        }
        assert!(c.readiness_probe.is_some(), "{name}");
        // Only Prometheus talks to the API server.
        assert_eq!(
            pod.automount_service_account_token,
            Some(name == PROMETHEUS),
            "{name}"
        );
    }
}

#[test]
fn ports_and_services_are_the_documented_ones() {
    let objs = desired_of(&all_on(), false);
    let ports = |name: &str| -> Vec<(String, i64)> {
        find(&objs, Kind::Service, name).body["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_string(),
                    p["port"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(ports(PROMETHEUS), [("http".to_string(), 9090)]);
    assert_eq!(ports(GRAFANA), [("http".to_string(), 3000)]);
    assert_eq!(
        ports(JAEGER),
        [
            ("otlp-grpc".to_string(), 4317),
            ("otlp-http".to_string(), 4318),
            ("ui".to_string(), 16686)
        ]
    );
    assert_eq!(
        desired::jaeger_collector(NS),
        "http://trellis-jaeger.mesh-ops.svc:4317"
    );
}

/// Each listener's audience: Prometheus only from Grafana, Jaeger's OTLP ports from anywhere
/// (sidecars in every namespace) but not its UI, Grafana from nobody (port-forward only).
#[test]
fn network_policies_state_who_may_connect() {
    let objs = desired_of(&all_on(), false);
    let policy = |name: &str| -> NetworkPolicy {
        serde_json::from_value(find(&objs, Kind::NetworkPolicy, name).body.clone()).unwrap()
    };
    let prom = policy(PROMETHEUS).spec.unwrap();
    assert_eq!(prom.policy_types.unwrap(), ["Ingress"]);
    let rules = prom.ingress.unwrap();
    assert_eq!(rules.len(), 1);
    let from = &rules[0].from.as_ref().unwrap()[0];
    assert_eq!(
        from.pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()["app.kubernetes.io/name"],
        GRAFANA
    );
    assert!(
        from.namespace_selector.is_none(),
        "only Grafana in the same namespace"
    );
    let grafana = policy(GRAFANA).spec.unwrap();
    assert!(grafana.ingress.unwrap().is_empty());
    let jaeger = policy(JAEGER).spec.unwrap().ingress.unwrap();
    let ports: Vec<String> = jaeger[0]
        .ports
        .iter()
        .flatten()
        .map(|p| format!("{:?}", p.port.as_ref().unwrap()))
        .collect();
    assert_eq!(
        ports,
        ["Int(4317)", "Int(4318)"],
        "the UI (16686) is not reachable"
    );
}

/// Prometheus scrapes exactly the proxies' admin port, `/metrics`, in every namespace, and
/// loads the Trellis alert rules.
#[test]
fn the_scrape_config_keeps_only_the_proxies_admin_port() {
    let objs = desired_of(&all_on(), false);
    let cm = find(&objs, Kind::ConfigMap, PROMETHEUS);
    let text = cm.body["data"]["prometheus.yml"].as_str().unwrap();
    let config: Value = serde_saphyr::from_str(text).unwrap();
    let job = &config["scrape_configs"][0];
    assert_eq!(job["job_name"], "trellis-proxies");
    assert_eq!(job["metrics_path"], "/metrics");
    assert_eq!(job["kubernetes_sd_configs"], json!([{"role": "pod"}]));
    assert!(
        job["kubernetes_sd_configs"][0].get("namespaces").is_none(),
        "every namespace"
    );
    let keep = &job["relabel_configs"][0];
    assert_eq!(keep["action"], "keep");
    assert_eq!(keep["regex"], "trellis-proxy;trellis-admin");
    assert_eq!(
        keep["source_labels"],
        json!([
            "__meta_kubernetes_pod_container_name",
            "__meta_kubernetes_pod_container_port_name"
        ])
    );
    // The labels the dashboards and `trellis stat` group by.
    let relabels = job["relabel_configs"].as_array().unwrap();
    for (source, target) in [
        ("__meta_kubernetes_namespace", "namespace"),
        ("__meta_kubernetes_pod_name", "pod"),
        ("__meta_kubernetes_pod_label_app", "app"),
    ] {
        assert!(
            relabels
                .iter()
                .any(|r| r["source_labels"] == json!([source]) && r["target_label"] == target),
            "no {target} label from {source}"
        );
    }
    // The operator's replicas, in its namespace only, on their `admin` port.
    let operator = &config["scrape_configs"][1];
    assert_eq!(operator["job_name"], "trellis-operator");
    assert_eq!(
        operator["kubernetes_sd_configs"][0]["namespaces"]["names"],
        json!([NS])
    );
    assert_eq!(
        operator["relabel_configs"][0]["regex"],
        "trellis-operator;admin"
    );
    assert_eq!(
        config["rule_files"],
        json!(["/etc/prometheus/trellis-rules.yaml"])
    );
    assert_eq!(
        cm.body["data"]["trellis-rules.yaml"],
        trellis_operator::addons::assets::ALERT_RULES
    );
    // The port name the scrape keeps is the one the injector gives the proxy.
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": "a", "namespace": "shop"},
        "spec": {"containers": [{"name": "app", "image": "app"}]}
    }))
    .unwrap();
    let ns = trellis_operator::inject::NamespaceInfo {
        name: "shop",
        labels: None,
    };
    let trellis_operator::inject::Decision::Patch { pod, .. } =
        trellis_operator::inject::inject(&pod, &ns, &all_on().spec, &Default::default())
    else {
        panic!("not injected")
    };
    let proxy = pod
        .spec
        .unwrap()
        .init_containers
        .unwrap()
        .into_iter()
        .find(|c| c.name == "trellis-proxy")
        .unwrap();
    let port = &proxy.ports.unwrap()[0];
    assert_eq!(
        (port.name.as_deref(), port.container_port),
        (Some("trellis-admin"), 15020)
    );
}

/// Grafana reads the installed Prometheus and the dashboards ConfigMap.
#[test]
fn grafana_is_provisioned_with_prometheus_and_the_dashboards() {
    let objs = desired_of(&all_on(), false);
    let prov = &find(&objs, Kind::ConfigMap, GRAFANA).body["data"];
    let ds: Value = serde_saphyr::from_str(prov["datasources.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(ds["datasources"][0]["type"], "prometheus");
    assert_eq!(
        ds["datasources"][0]["url"],
        "http://trellis-prometheus.mesh-ops.svc:9090"
    );
    let providers: Value =
        serde_saphyr::from_str(prov["dashboards.yaml"].as_str().unwrap()).unwrap();
    let path = providers["providers"][0]["options"]["path"]
        .as_str()
        .unwrap()
        .to_string();
    let dash = &find(&objs, Kind::ConfigMap, desired::DASHBOARDS).body;
    for d in trellis_operator::addons::assets::dashboards() {
        assert_eq!(dash["data"][d.file_name], d.json);
    }
    let pod = deployment(&objs, GRAFANA).spec.template.spec.unwrap();
    let mount = pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "dashboards")
        .unwrap();
    assert_eq!(mount.mount_path, path);
    // No default admin password: anonymous viewers, no login form.
    let env: Vec<(String, String)> = pod.containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    assert!(env.contains(&("GF_AUTH_DISABLE_LOGIN_FORM".into(), "true".into())));
    assert!(env.contains(&("GF_AUTH_ANONYMOUS_ORG_ROLE".into(), "Viewer".into())));
}

#[test]
fn a_changed_image_changes_the_deployment_and_its_hash_only() {
    let before = desired_of(&all_on(), false);
    let mut m = all_on();
    m.spec.observability.metrics.image = Some("registry.local/prometheus:v3.5.1".into());
    let after = desired_of(&m, false);
    let d = deployment(&after, PROMETHEUS);
    assert_eq!(
        d.spec.template.spec.unwrap().containers[0].image.as_deref(),
        Some("registry.local/prometheus:v3.5.1")
    );
    let p = plan(&inputs(&m, false), &as_observed(&before, 1)).unwrap();
    let applied: Vec<String> = p.apply.iter().map(|o| o.key.to_string()).collect();
    assert_eq!(applied, ["Deployment mesh-ops/trellis-prometheus"]);
    assert!(p.delete.is_empty());
    // Until the new Deployment is observed, prometheus is progressing.
    assert_eq!(p.condition.status, ConditionStatus::False);
    assert!(
        p.condition
            .message
            .contains("prometheus: Progressing (Deployment being updated)"),
        "{}",
        p.condition.message
    );
}

#[test]
fn a_converged_cluster_needs_no_write_and_is_ready() {
    let m = all_on();
    let objs = desired_of(&m, false);
    let p = plan(&inputs(&m, false), &as_observed(&objs, 1)).unwrap();
    assert!(p.apply.is_empty() && p.delete.is_empty(), "{p:#?}");
    assert_eq!(p.condition.type_, "ObservabilityReady");
    assert_eq!(p.condition.status, ConditionStatus::True);
    assert_eq!(p.condition.reason, "Available");
    assert_eq!(
        p.condition.message,
        "prometheus: Available (1/1 ready); grafana: Available (1/1 ready); jaeger: Available (1/1 ready)"
    );
    assert_eq!(p.condition.observed_generation, Some(7));
}

#[test]
fn the_condition_names_each_addons_state() {
    let m = mesh(json!({"metrics": {"enabled": true}, "dashboards": {"enabled": true}}));
    let objs = desired_of(&m, false);
    let mut seen = as_observed(&objs, 1);
    for o in seen
        .iter_mut()
        .filter(|o| o.key.name == GRAFANA && o.key.kind == Kind::Deployment)
    {
        o.deployment.as_mut().unwrap().ready = 0;
    }
    let p = plan(&inputs(&m, false), &seen).unwrap();
    assert_eq!(p.condition.status, ConditionStatus::False);
    assert_eq!(p.condition.reason, "Progressing");
    assert_eq!(
        p.condition.message,
        "prometheus: Available (1/1 ready); grafana: Progressing (0/1 ready); jaeger: disabled"
    );
}

#[test]
fn a_deleted_deployment_is_applied_again() {
    let m = all_on();
    let objs = desired_of(&m, false);
    let seen: Vec<Observed> = as_observed(&objs, 1)
        .into_iter()
        .filter(|o| !(o.key.kind == Kind::Deployment && o.key.name == JAEGER))
        .collect();
    let p = plan(&inputs(&m, false), &seen).unwrap();
    assert_eq!(keys(&p.apply), ["Deployment mesh-ops/trellis-jaeger"]);
    assert!(
        p.condition
            .message
            .contains("jaeger: Progressing (Deployment being created)")
    );
}

/// `enabled: false` removes what was installed, and only that: an object with the label that
/// the Mesh does not own, or with a name the addons never use, is left alone.
#[test]
fn disabling_deletes_only_what_the_mesh_owns() {
    let on = all_on();
    let mut seen = as_observed(&desired_of(&on, false), 1);
    let stranger = |name: &str, owners: Vec<String>| Observed {
        key: ObjectKey {
            kind: Kind::ConfigMap,
            namespace: Some("shop".into()),
            name: name.into(),
        },
        hash: None,
        owners,
        deployment: None,
    };
    seen.push(stranger("trellis-dashboards", vec!["another-uid".into()]));
    seen.push(stranger("my-config", vec!["mesh-uid".into()]));
    let off = mesh(json!({"metrics": {"enabled": true}}));
    let p = plan(&inputs(&off, false), &seen).unwrap();
    assert!(p.apply.is_empty());
    let deleted: Vec<String> = p.delete.iter().map(ToString::to_string).collect();
    assert_eq!(
        deleted,
        [
            "ConfigMap mesh-ops/trellis-grafana",
            "ConfigMap mesh-ops/trellis-dashboards",
            "Service mesh-ops/trellis-grafana",
            "Service mesh-ops/trellis-jaeger",
            "NetworkPolicy mesh-ops/trellis-grafana",
            "NetworkPolicy mesh-ops/trellis-jaeger",
            "Deployment mesh-ops/trellis-grafana",
            "Deployment mesh-ops/trellis-jaeger",
        ]
    );
    let none = mesh(json!({}));
    let p = plan(
        &inputs(&none, false),
        &as_observed(&desired_of(&on, false), 1),
    )
    .unwrap();
    assert_eq!(p.delete.len(), 15);
    assert_eq!(p.condition.status, ConditionStatus::True);
    assert_eq!(p.condition.reason, "Disabled");
}

#[test]
fn integrate_mode_keeps_prometheus_operator_objects_and_a_dashboard_configmap() {
    let m = mesh(json!({"mode": "Integrate", "metrics": {"enabled": true},
                        "dashboards": {"enabled": true, "namespace": "monitoring"},
                        "tracing": {"enabled": true, "collector": "otel.monitoring:4317"}}));
    let objs = desired_of(&m, true);
    assert_eq!(
        keys(&objs),
        [
            "ConfigMap monitoring/trellis-dashboards",
            "PodMonitor mesh-ops/trellis-proxies",
            "ServiceMonitor mesh-ops/trellis-operator",
            "PrometheusRule mesh-ops/trellis",
        ]
    );
    for o in &objs {
        assert!(
            o.body["metadata"]["labels"].get(GRADE_LABEL).is_none(),
            "{}",
            o.key
        );
        assert_eq!(o.body["metadata"]["ownerReferences"][0]["uid"], "mesh-uid");
    }
    let cm = find(&objs, Kind::ConfigMap, desired::DASHBOARDS);
    assert_eq!(cm.body["metadata"]["labels"]["grafana_dashboard"], "1");
    let pm = &find(&objs, Kind::PodMonitor, "trellis-proxies").body["spec"];
    assert_eq!(pm["namespaceSelector"], json!({"any": true}));
    assert_eq!(pm["podMetricsEndpoints"][0]["port"], "trellis-admin");
    assert_eq!(pm["podTargetLabels"], json!(["app"]));
    assert_eq!(pm["podMetricsEndpoints"][0]["path"], "/metrics");
    let sm = &find(&objs, Kind::ServiceMonitor, "trellis-operator").body["spec"];
    assert_eq!(sm["endpoints"][0]["port"], "http-metrics");
    assert_eq!(sm["namespaceSelector"]["matchNames"], json!([NS]));
    let rule = &find(&objs, Kind::PrometheusRule, "trellis").body["spec"];
    let shipped: Value =
        serde_saphyr::from_str(trellis_operator::addons::assets::ALERT_RULES).unwrap();
    assert_eq!(rule["groups"], shipped["groups"]);
    let p = plan(&inputs(&m, true), &as_observed(&objs, 1)).unwrap();
    assert_eq!(p.condition.status, ConditionStatus::True);
    assert_eq!(
        p.condition.message,
        "metrics: PodMonitor mesh-ops/trellis-proxies, ServiceMonitor mesh-ops/trellis-operator, \
         PrometheusRule mesh-ops/trellis; dashboards: ConfigMap monitoring/trellis-dashboards \
         labelled grafana_dashboard=1; tracing: sidecars export to otel.monitoring:4317"
    );
}

/// Without `monitoring.coreos.com/v1` nothing of it is applied, and the condition says so
/// (and where the metrics are instead), rather than failing the pass.
#[test]
fn integrate_without_the_prometheus_operator_is_a_clear_condition() {
    let m = mesh(
        json!({"mode": "Integrate", "metrics": {"enabled": true}, "dashboards": {"enabled": true}}),
    );
    let p = plan(&inputs(&m, false), &[]).unwrap();
    assert_eq!(keys(&p.apply), ["ConfigMap mesh-ops/trellis-dashboards"]);
    assert_eq!(p.condition.status, ConditionStatus::False);
    assert_eq!(p.condition.reason, "PrometheusOperatorMissing");
    assert!(
        p.condition.message.contains("monitoring.coreos.com/v1"),
        "{}",
        p.condition.message
    );
    assert!(
        p.condition.message.contains("prometheus.io/scrape"),
        "{}",
        p.condition.message
    );
}

/// Every built-in object install mode makes validates strictly (unknown fields are errors)
/// against the Kubernetes schemas, with the validator `hack/validate-manifests.sh --install`
/// puts in place (as `tests/manifests.rs` requires it). The Prometheus Operator kinds have no
/// schema there; their fields are checked above.
#[test]
fn install_mode_objects_validate_strictly_against_the_kubernetes_schemas() {
    let validator = std::env::var_os("TRELLIS_KUBERNETES_VALIDATE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("TRELLIS_CACHE")
                .map(std::path::PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME")
                        .map(|h| std::path::PathBuf::from(h).join(".cache/trellis"))
                })
                .map(|c| c.join("venv/bin/kubernetes-validate"))
        })
        .filter(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "kubernetes-validate is not installed: run `hack/validate-manifests.sh --install` \
                 (hack/install-deps.sh does it)"
            )
        });
    let objs = desired_of(&all_on(), false);
    let text: String = objs
        .iter()
        .map(|o| format!("---\n{}\n", serde_json::to_string(&o.body).unwrap()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("addons.yaml");
    std::fs::write(&file, &text).unwrap();
    let out = std::process::Command::new(&validator)
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
    assert_eq!(
        report.matches("passed for resource").count(),
        objs.len(),
        "{report}"
    );
}

/// The installed Prometheus's configuration and rule file pass the real Prometheus's own check
/// (`promtool check config`, which also checks the rule files it names), as hack/install-deps.sh
/// installs it. Debian builds Prometheus without Kubernetes service discovery, so the
/// `kubernetes_sd_configs` blocks are swapped for a static target here: everything else (global
/// settings, relabelling, rule files) is checked as shipped.
#[test]
fn the_prometheus_config_passes_promtool() {
    let objs = desired_of(&all_on(), false);
    let data = &find(&objs, Kind::ConfigMap, PROMETHEUS).body["data"];
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("trellis-rules.yaml");
    std::fs::write(&rules, data["trellis-rules.yaml"].as_str().unwrap()).unwrap();
    // The config names the rules where the ConfigMap is mounted in the pod.
    let mut config: Value =
        serde_saphyr::from_str(data["prometheus.yml"].as_str().unwrap()).unwrap();
    config["rule_files"] = json!([rules.to_str().unwrap()]);
    for job in config["scrape_configs"].as_array_mut().unwrap() {
        let sd = job.as_object_mut().unwrap().remove("kubernetes_sd_configs");
        assert_eq!(sd.unwrap()[0]["role"], "pod");
        job["static_configs"] = json!([{"targets": ["127.0.0.1:15020"]}]);
    }
    // JSON is YAML.
    let config = serde_json::to_string_pretty(&config).unwrap();
    let file = dir.path().join("prometheus.yml");
    std::fs::write(&file, config).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "config"])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("promtool (Debian's prometheus, hack/install-deps.sh): {e}"));
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "promtool check config failed:\n{report}"
    );
    assert!(report.contains("SUCCESS"), "{report}");
}
