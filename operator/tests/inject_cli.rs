//! `trellis inject` / `trellis uninject` on a multi-document bundle: workloads get the webhook's
//! patch, everything else passes through unchanged, and uninject restores the input.
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;
use trellis_operator::cli::inject::{inject_value, parse, render, uninject_value};
use trellis_operator::inject::{InjectContext, default_mesh};

fn bundle() -> String {
    std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/inject/manifests.yaml"),
    )
    .unwrap()
}

fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap()
}

fn proxy_names(template: &Value) -> Vec<String> {
    template["spec"]["initContainers"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Flattens Lists so each object can be compared.
fn objects(docs: &[Value]) -> Vec<Value> {
    docs.iter()
        .flat_map(|d| match d["items"].as_array() {
            Some(items) if kind(d) == "List" => items.clone(),
            _ => vec![d.clone()],
        })
        .collect()
}

fn template(obj: &Value) -> Option<&Value> {
    match kind(obj) {
        "Pod" => Some(obj),
        "CronJob" => obj.pointer("/spec/jobTemplate/spec/template"),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            obj.pointer("/spec/template")
        }
        _ => None,
    }
}

#[test]
fn yaml_round_trip_keeps_tricky_scalars() {
    let docs = parse(&bundle(), "bundle").unwrap();
    let cm = docs.iter().find(|d| kind(d) == "ConfigMap").unwrap();
    assert_eq!(cm["data"]["answer"], "y", "y must stay a string");
    assert_eq!(cm["data"]["mode"], "0755");
    assert_eq!(cm["data"]["enabled"], "true");
    let again = parse(&render(&docs).unwrap(), "rendered").unwrap();
    assert_eq!(again, docs);
}

#[test]
fn injects_workloads_and_passes_everything_else_through() {
    let original = parse(&bundle(), "bundle").unwrap();
    let mut docs = original.clone();
    let mut notes = Vec::new();
    for d in &mut docs {
        inject_value(d, &default_mesh(), &InjectContext::default(), &mut notes).unwrap();
    }
    let before = objects(&original);
    let after = objects(&docs);
    assert_eq!(before.len(), after.len());
    let mut injected = Vec::new();
    for (b, a) in before.iter().zip(&after) {
        let name = format!("{}/{}", kind(b), b["metadata"]["name"]);
        match template(a) {
            Some(t) if proxy_names(t).contains(&"trellis-proxy".to_string()) => {
                let names = proxy_names(t);
                assert_eq!(&names[..2], ["trellis-init", "trellis-proxy"], "{name}");
                // Only the template changed.
                let mut a_without = a.clone();
                let mut b_without = b.clone();
                if kind(b) != "Pod" {
                    for v in [&mut a_without, &mut b_without] {
                        let ptr = if kind(b) == "CronJob" {
                            "/spec/jobTemplate/spec/template"
                        } else {
                            "/spec/template"
                        };
                        *v.pointer_mut(ptr).unwrap() = Value::Null;
                    }
                    assert_eq!(
                        a_without, b_without,
                        "{name}: fields outside the template changed"
                    );
                }
                injected.push(name);
            }
            _ => assert_eq!(a, b, "{name} must pass through unchanged"),
        }
    }
    assert_eq!(
        injected,
        [
            "Deployment/\"web\"",
            "StatefulSet/\"db\"",
            "DaemonSet/\"agent\"",
            "CronJob/\"backup\"",
            "Job/\"migrate\"",
            "ReplicaSet/\"rs\"",
        ]
    );
    assert!(
        notes
            .iter()
            .any(|n| n.contains("Pod/opted-out") && n.contains("opts out")),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.contains("Deployment/dns") && n.contains("excluded")),
        "{notes:?}"
    );
    // The DaemonSet's own init container runs after ours.
    let ds = after.iter().find(|d| kind(d) == "DaemonSet").unwrap();
    assert_eq!(
        proxy_names(template(ds).unwrap()),
        ["trellis-init", "trellis-proxy", "setup"]
    );
    // The StatefulSet's opaque ports reach the proxy.
    let sts = after.iter().find(|d| kind(d) == "StatefulSet").unwrap();
    let env = &template(sts).unwrap()["spec"]["initContainers"][1]["env"];
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "TRELLIS_OPAQUE_PORTS" && e["value"] == "5432")
    );

    // Uninject restores the input exactly (as JSON values).
    for d in &mut docs {
        uninject_value(d);
    }
    assert_eq!(docs, original);
}

fn trellis(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn cli_inject_then_uninject_round_trips_through_stdin() {
    let injected = trellis(&["inject", "-"], &bundle());
    assert!(
        injected.status.success(),
        "{}",
        String::from_utf8_lossy(&injected.stderr)
    );
    let injected_text = String::from_utf8(injected.stdout).unwrap();
    assert!(injected_text.contains("trellis-proxy"));
    let stderr = String::from_utf8_lossy(&injected.stderr);
    assert!(stderr.contains("Pod/opted-out: not injected"), "{stderr}");
    // Injecting again changes nothing: every workload is already injected.
    let twice = trellis(&["inject"], &injected_text);
    assert!(twice.status.success());
    assert_eq!(
        parse(&String::from_utf8(twice.stdout).unwrap(), "twice").unwrap(),
        parse(&injected_text, "once").unwrap()
    );
    // `-f`, as kubectl and istioctl take manifests, reads the same.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bundle.yaml");
    std::fs::write(&file, bundle()).unwrap();
    let by_flag = trellis(&["inject", "-f", file.to_str().unwrap()], "");
    assert!(by_flag.status.success());
    assert_eq!(
        parse(&String::from_utf8(by_flag.stdout).unwrap(), "by -f").unwrap(),
        parse(&injected_text, "once").unwrap()
    );
    let back = trellis(&["uninject", "-"], &injected_text);
    assert!(
        back.status.success(),
        "{}",
        String::from_utf8_lossy(&back.stderr)
    );
    assert_eq!(
        parse(&String::from_utf8(back.stdout).unwrap(), "back").unwrap(),
        parse(&bundle(), "bundle").unwrap()
    );
}

/// The typical Deployment, probed on its only port: the probes go to the proxy, the port stays
/// meshed (no exclusion), and uninject gives the probes back as written.
#[test]
fn probed_deployment_keeps_its_port_meshed() {
    let original = parse(&bundle(), "bundle").unwrap();
    let mut docs = original.clone();
    let mut notes = Vec::new();
    for d in &mut docs {
        inject_value(d, &default_mesh(), &InjectContext::default(), &mut notes).unwrap();
    }
    let web = docs
        .iter()
        .find(|d| kind(d) == "Deployment" && d["metadata"]["name"] == "web")
        .unwrap();
    let t = template(web).unwrap();
    let init_args = t["spec"]["initContainers"][0]["args"].to_string();
    assert!(!init_args.contains("exclude-inbound"), "{init_args}");
    let c = &t["spec"]["containers"][0];
    assert_eq!(
        c["readinessProbe"],
        serde_json::json!({"httpGet": {"path": "/app-health/web/readyz", "port": 15020}, "periodSeconds": 5})
    );
    assert_eq!(
        c["livenessProbe"],
        serde_json::json!({"httpGet": {"path": "/app-health/web/livez", "port": 15020}, "timeoutSeconds": 2})
    );
    assert!(notes.iter().all(|n| !n.contains("probe")), "{notes:?}");
    for d in &mut docs {
        uninject_value(d);
    }
    assert_eq!(docs, original);
}

#[test]
fn cli_uses_the_mesh_file() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        "apiVersion: trellis.dev/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec:\n  proxy:\n    image: registry.example/trellis-proxy:9.9.9\n    logLevel: debug\n",
    )
    .unwrap();
    let deploy = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    spec: {containers: [{name: web, image: web:1}]}\n";
    let out = trellis(&["inject", "--mesh", mesh.to_str().unwrap()], deploy);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = parse(&String::from_utf8(out.stdout).unwrap(), "out").unwrap();
    let t = &docs[0]["spec"]["template"];
    assert_eq!(
        t["metadata"]["annotations"]["trellis.dev/proxy-version"],
        "registry.example/trellis-proxy:9.9.9"
    );
    assert_eq!(
        t["spec"]["initContainers"][1]["image"],
        "registry.example/trellis-proxy:9.9.9"
    );
    // A template without metadata gets it for the annotation, and loses it again on uninject.
    let back = trellis(&["uninject"], &render(&docs).unwrap());
    assert_eq!(
        parse(&String::from_utf8(back.stdout).unwrap(), "back").unwrap(),
        parse(deploy, "deploy").unwrap()
    );
}

#[test]
fn cli_bad_input_fails_and_writes_nothing() {
    let bad_annotation = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations: {trellis.dev/exclude-outbound-cidrs: \"10.0.0.0/99\"}\nspec: {containers: [{name: c, image: c}]}\n";
    let out = trellis(
        &["inject"],
        &format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: ok}}\n---\n{bad_annotation}"),
    );
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing may be written on error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Pod/p") && err.contains("10.0.0.0/99"),
        "{err}"
    );

    let out = trellis(&["inject"], "kind: [unclosed\n");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid YAML"));

    let out = trellis(&["inject", "/nonexistent/manifest.yaml"], "");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/manifest.yaml")
    );
}
