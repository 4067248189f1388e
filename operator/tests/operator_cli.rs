//! The `trellis-operator` binary as a user meets it: without a cluster, with bad flags, with
//! `--help`.

use std::process::Command;

fn operator() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trellis-operator"));
    // No cluster: no kubeconfig and not inside a pod.
    cmd.env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env("HOME", "/nonexistent")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("POD_NAMESPACE")
        // Port 0 so a developer's running operator or anything on 8080 cannot interfere.
        .args(["--admin-addr", "127.0.0.1:0"]);
    cmd
}

#[test]
fn without_a_cluster_it_exits_with_one_line_saying_what_to_do() {
    let out = operator().output().unwrap();
    assert!(!out.status.success(), "exit status {:?}", out.status);
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "stderr must be exactly one line, got:\n{stderr}"
    );
    assert!(
        lines[0].starts_with("trellis-operator: cannot reach the Kubernetes API"),
        "{stderr}"
    );
    assert!(
        lines[0].contains("run inside a cluster or set KUBECONFIG"),
        "{stderr}"
    );
}

#[test]
fn every_invalid_flag_is_reported_before_anything_runs() {
    let out = operator()
        .args([
            "--webhook-addr",
            "nowhere",
            "--lease-duration",
            "forever",
            "--log-format",
            "xml",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 3, "{stderr}");
    for flag in ["--webhook-addr", "--lease-duration", "--log-format"] {
        assert!(stderr.contains(flag), "{flag} missing from:\n{stderr}");
    }
}

#[test]
fn help_documents_every_flag_and_its_environment_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_trellis-operator"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for (flag, env) in [
        ("--namespace", "POD_NAMESPACE"),
        ("--pod-name", "POD_NAME"),
        ("--admin-addr", "TRELLIS_ADMIN_ADDR"),
        ("--webhook-addr", "TRELLIS_WEBHOOK_ADDR"),
        ("--identity-addr", "TRELLIS_IDENTITY_ADDR"),
        ("--lease-name", "TRELLIS_LEASE_NAME"),
        ("--lease-duration", "TRELLIS_LEASE_DURATION"),
        ("--log-level", "TRELLIS_LOG_LEVEL"),
        ("--log-format", "TRELLIS_LOG_FORMAT"),
        ("--shutdown-grace", "TRELLIS_SHUTDOWN_GRACE"),
    ] {
        assert!(help.contains(flag), "{flag} not in --help:\n{help}");
        assert!(
            help.contains(&format!("env: {env}")),
            "{env} not in --help:\n{help}"
        );
    }
}
