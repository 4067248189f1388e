//! Root-only: kubelet probes through the proxy while the probed ports stay under `Strict` mTLS.
//!
//! Two network namespaces joined by a veth pair: `node` (the kubelet's side, and any host
//! outside the mesh) and `pod`. The pod is set up exactly as the injector sets up the pod of
//! `operator/tests/golden/inject/app-probes.patched.json`: `trellis-proxy` with that pod's
//! `trellis-init` arguments installs the real iptables rules, and the real proxy binary runs as
//! UID 2137 with that pod's `TRELLIS_APP_PROBES` (and `TRELLIS_POD_IP` as the downward API would
//! set it). The applications are real: an HTTP app on 0.0.0.0:8080 (the `web` container) and a
//! gRPC health server on 0.0.0.0:9090 (the `grpc` container); nothing serves the log shipper's
//! 9100. From `node`, plaintext to the serving port is refused, while plain HTTP to the
//! rewritten probe paths on 15020 gets the application's real verdicts.
//!
//! Helper processes (the apps, one-shot HTTP clients) are this test binary started inside a
//! namespace with `ip netns exec`, entering [`netns_probes_helper`]. Skips with a message when
//! not root or when `ip` / `iptables` / `setpriv` are missing.

mod common;
mod netns_support;
mod probe_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;
use trellis_proxy::config::MtlsMode;

use netns_support::{Namespaces, run};

const ROLE: &str = "TRELLIS_PROBES_ROLE";

fn skip_reason() -> Option<String> {
    netns_support::skip_reason(&["ip", "iptables-save", "iptables-restore", "setpriv"])
}

/// A child process; killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn helper(ns: &str, role: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(std::env::current_exe().unwrap())
        .args([
            "netns_probes_helper",
            "--ignored",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role);
    cmd
}

/// One plain HTTP/1.1 GET from inside `ns`, as root; the raw response, or `None` when the
/// connection was refused, reset or closed without an answer.
fn http_get(ns: &str, addr: &str, path: &str) -> Option<String> {
    let out = helper(ns, "get")
        .env("TRELLIS_PROBES_ADDR", addr)
        .env("TRELLIS_PROBES_PATH", path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = stdout.find("RESULT-BEGIN\n")? + "RESULT-BEGIN\n".len();
    let end = stdout.find("\nRESULT-END")?;
    Some(stdout[start..end].to_string())
}

fn chmod_tree(p: &Path) {
    let md = std::fs::symlink_metadata(p).unwrap();
    if md.file_type().is_symlink() {
        return;
    }
    let mode = if md.is_dir() { 0o755 } else { 0o644 };
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    if md.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            chmod_tree(&e.unwrap().path());
        }
    }
}

/// The injected pod this test reproduces, as the operator's golden test pins it.
fn injected_pod() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../operator/tests/golden/inject/app-probes.patched.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn container<'a>(pod: &'a Value, list: &str, name: &str) -> &'a Value {
    pod["spec"][list]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {list} {name}"))
}

/// The rewritten probe's path, as the kubelet would call it.
fn probe_path(pod: &Value, list: &str, name: &str, field: &str) -> String {
    let probe = &container(pod, list, name)[field]["httpGet"];
    assert_eq!(
        probe["port"], 15020,
        "{name} {field} goes to the admin port"
    );
    probe["path"].as_str().unwrap().to_string()
}

#[test]
fn probed_ports_stay_meshed_while_the_kubelet_gets_the_apps_verdicts() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP probed_ports_stay_meshed_while_the_kubelet_gets_the_apps_verdicts: {why}");
        return;
    }
    let pod = injected_pod();
    let init_args: Vec<String> = container(&pod, "initContainers", "trellis-init")["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let proxy_env = container(&pod, "initContainers", "trellis-proxy")["env"]
        .as_array()
        .unwrap();
    let app_probes = proxy_env
        .iter()
        .find(|e| e["name"] == "TRELLIS_APP_PROBES")
        .and_then(|e| e["value"].as_str())
        .expect("the injector passes the probes to the proxy")
        .to_string();
    assert!(
        proxy_env.iter().any(|e| e["name"] == "TRELLIS_POD_IP"),
        "the injector passes the pod IP"
    );

    let pid = std::process::id();
    let (nns, pns) = (format!("trellis-pn-{pid}"), format!("trellis-pp-{pid}"));
    let (nip, pip) = ("10.252.11.1", "10.252.11.2");
    run(&["ip", "netns", "add", &nns]);
    let _g1 = Namespaces(vec![nns.clone()]);
    run(&["ip", "netns", "add", &pns]);
    let _g2 = Namespaces(vec![pns.clone()]);
    let (vn, vp) = (format!("tpn{pid}"), format!("tpp{pid}"));
    let (vn, vp) = (&vn[..vn.len().min(15)], &vp[..vp.len().min(15)]);
    run(&[
        "ip", "link", "add", vn, "netns", &nns, "type", "veth", "peer", "name", vp, "netns", &pns,
    ]);
    for (ns, dev, ip) in [(&nns, vn, nip), (&pns, vp, pip)] {
        run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            dev,
        ]);
        run(&["ip", "-n", ns, "link", "set", dev, "up"]);
    }
    // The pod's rules, from the injected init container's own arguments.
    let out = Command::new("ip")
        .args(["netns", "exec", &pns, env!("CARGO_BIN_EXE_trellis-proxy")])
        .args(&init_args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "init {init_args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The apps, on every address of the pod, as real servers bind.
    let mut app = helper(&pns, "apps").stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(app.stdout.take().unwrap()).lines();
    let _app = Proc(app);
    loop {
        match lines.next() {
            Some(Ok(l)) if l == "READY" => break,
            Some(Ok(_)) => continue,
            other => panic!("apps died before READY: {other:?}"),
        }
    }

    // The proxy, as the injected container runs it.
    let pki = Pki::new("mesh");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
    let cfg = config("shop-0", inbound(MtlsMode::Strict), vec![]);
    kubelet_write(dir.path(), 1, &cfg.to_json_pretty(), "app=\"test\"\n");
    let (cert, key) = pki.leaf(&id("shop"));
    std::fs::copy(cert, dir.path().join("tls.crt")).unwrap();
    std::fs::copy(key, dir.path().join("tls.key")).unwrap();
    chmod_tree(dir.path());
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("proxy.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pns,
            "setpriv",
            "--reuid=2137",
            "--regid=2137",
            "--clear-groups",
        ])
        .arg(env!("CARGO_BIN_EXE_trellis-proxy"))
        .arg("--dir")
        .arg(dir.path())
        .arg("--cert-file")
        .arg(dir.path().join("tls.crt"))
        .arg("--key-file")
        .arg(dir.path().join("tls.key"))
        .args(["--log-format", "text"])
        .env("TRELLIS_APP_PROBES", &app_probes)
        .env("TRELLIS_POD_IP", pip)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let _proxy = Proc(child);
    let ready = (0..100).any(|_| {
        let r = http_get(&pns, "127.0.0.1:15020", "/ready");
        if r.as_deref().is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
        false
    });
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(ready, "proxy not ready: {}", log_text());

    // The serving ports are probed, and stay Strict: the inbound proxy closes plaintext from
    // outside without an answer, so nothing reaches the apps.
    for port in [8080, 9090] {
        let direct = http_get(&nns, &format!("{pip}:{port}"), "/hello");
        assert!(
            direct.is_none(),
            "plaintext reached the probed port {port}: {direct:?}"
        );
    }

    // The kubelet, from the node: plain HTTP to the rewritten probes gets the apps' verdicts.
    let admin = format!("{pip}:15020");
    let kubelet = |list: &str, name: &str, field: &str| {
        let path = probe_path(&pod, list, name, field);
        let r = http_get(&nns, &admin, &path)
            .unwrap_or_else(|| panic!("{path}: no answer; proxy log: {}", log_text()));
        (path, r)
    };
    for (name, field, status, why) in [
        // httpGet on the named port with the probe's header: the app's 200.
        ("web", "readinessProbe", "200", "app answered 200"),
        // The app fails its liveness endpoint: its 500 reaches the kubelet.
        ("web", "livenessProbe", "500", "app answered 500"),
        // tcpSocket on the named serving port.
        ("web", "startupProbe", "200", "connected"),
        // gRPC health: SERVING overall, NOT_SERVING for the service the probe names.
        ("grpc", "readinessProbe", "200", "SERVING"),
        ("grpc", "livenessProbe", "503", "NOT_SERVING"),
    ] {
        let (path, r) = kubelet("containers", name, field);
        assert!(
            r.starts_with(&format!("HTTP/1.1 {status}")) && r.contains(why),
            "{path}: {r}\nproxy log: {}",
            log_text()
        );
    }
    // The native sidecar's HTTPS probe: nothing listens on 9100, so the kubelet sees a failure.
    let (path, r) = kubelet("initContainers", "log-shipper", "readinessProbe");
    assert!(r.starts_with("HTTP/1.1 503"), "{path}: {r}");

    // Only the injected probes run: the worker's probes were not rewritten, and no path aims
    // the proxy anywhere else.
    for path in [
        "/app-health/worker/readyz",
        "/app-health/web/readyz/../../config",
        "/app-health/web/healthz",
    ] {
        let r = http_get(&nns, &admin, path).unwrap();
        assert!(r.starts_with("HTTP/1.1 404"), "{path}: {r}");
    }
    // The plaintext attempts were refused by the inbound proxy, not lost on the way.
    let metrics = http_get(&pns, "127.0.0.1:15020", "/metrics").unwrap();
    assert!(
        metrics.contains("trellis_proxy_inbound_refused_total{reason=\"plaintext\"} 2"),
        "{metrics}"
    );
}

/// Entry point of the helper processes; does nothing unless started by the test above.
#[test]
#[ignore = "helper process for probed_ports_stay_meshed_while_the_kubelet_gets_the_apps_verdicts"]
fn netns_probes_helper() {
    match std::env::var(ROLE).as_deref() {
        Ok("apps") => helper_apps(),
        Ok("get") => helper_get(),
        _ => {}
    }
}

fn helper_apps() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let http = tokio::net::TcpListener::bind("0.0.0.0:8080").await.unwrap();
        probe_support::serve_http(http, None);
        let grpc = tokio::net::TcpListener::bind("0.0.0.0:9090").await.unwrap();
        probe_support::serve_grpc_health(grpc);
        println!("\nREADY");
        std::io::stdout().flush().unwrap();
        // Until the test kills us, or two minutes at most.
        tokio::time::sleep(Duration::from_secs(120)).await;
    });
}

fn helper_get() {
    let addr: SocketAddr = std::env::var("TRELLIS_PROBES_ADDR")
        .unwrap()
        .parse()
        .unwrap();
    let path = std::env::var("TRELLIS_PROBES_PATH").unwrap();
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(3)) else {
        return;
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nuser-agent: kube-probe/1.34\r\nconnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).is_err() {
        return;
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    if out.is_empty() {
        return;
    }
    println!(
        "\nRESULT-BEGIN\n{}\nRESULT-END",
        String::from_utf8_lossy(&out)
    );
}
