//! Root-only: transparent interception end to end. Two network namespaces (`client` and
//! `server` pods) joined by a veth pair; `trellis-proxy init` installs the real iptables
//! redirect rules in both; a real `trellis-proxy` binary runs in each as UID 2137 (the UID the
//! rules exempt), with certificates from a test CA. A client's plain `connect()` to a Service
//! cluster IP is intercepted by its proxy, carried over mTLS to the server pod, intercepted
//! again by the server's inbound rules, and reaches the application on the pod IP (the
//! original destination; an application bound only to loopback is not reachable, see
//! `netns_attack.rs`).
//!
//! Helper processes (the upstream application and one-shot HTTP clients) are this test binary
//! started inside a namespace with `ip netns exec`, entering [`netns_mesh_helper`].
//! Skips with a message when not root or when `ip` / `iptables` / `setpriv` are missing.

mod common;
mod netns_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use trellis_proxy::config::{Endpoint, MtlsMode, OutboundService, Protocol, ServicePort};

use netns_support::{Namespaces, run};

const ROLE: &str = "TRELLIS_MESH_ROLE";
const APP_PORT: u16 = 8080;
const CLUSTER_IP: &str = "10.96.77.10";

fn skip_reason() -> Option<String> {
    netns_support::skip_reason(&["ip", "iptables-save", "iptables-restore", "setpriv"])
}

/// A child process; killed on drop unless already reaped.
struct Proc(Option<Child>);

impl Proc {
    /// SIGTERM, then the exit status (the graceful-shutdown path of the real binary).
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.0.take().unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn helper(ns: &str, role: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(std::env::current_exe().unwrap())
        .args([
            "netns_mesh_helper",
            "--ignored",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role);
    cmd
}

/// One HTTP/1.1 GET from inside `ns` (as `uid`, or root); returns the raw response.
fn http_get(ns: &str, uid: Option<u32>, addr: &str, host: &str, path: &str) -> Option<String> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]);
    if let Some(uid) = uid {
        cmd.args([
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
        ]);
    }
    let out = cmd
        .arg(std::env::current_exe().unwrap())
        .args([
            "netns_mesh_helper",
            "--ignored",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, "get")
        .env("TRELLIS_MESH_ADDR", addr)
        .env("TRELLIS_MESH_HOST", host)
        .env("TRELLIS_MESH_PATH", path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = stdout.find("RESULT-BEGIN\n")? + "RESULT-BEGIN\n".len();
    let end = stdout.find("\nRESULT-END")?;
    Some(stdout[start..end].to_string())
}

/// Files a proxy reads, readable by UID 2137.
fn proxy_dir(
    pki: &Pki,
    spiffe_id: &str,
    cfg: &trellis_proxy::config::ProxyConfig,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
    kubelet_write(dir.path(), 1, &cfg.to_json_pretty(), "app=\"test\"\n");
    let (cert, key) = pki.leaf(spiffe_id);
    std::fs::copy(cert, dir.path().join("tls.crt")).unwrap();
    std::fs::copy(key, dir.path().join("tls.key")).unwrap();
    chmod_tree(dir.path());
    dir
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

fn start_proxy(ns: &str, dir: &Path, log: &Path) -> Proc {
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "setpriv",
            "--reuid=2137",
            "--regid=2137",
            "--clear-groups",
        ])
        .arg(env!("CARGO_BIN_EXE_trellis-proxy"))
        .arg("--dir")
        .arg(dir)
        .arg("--cert-file")
        .arg(dir.join("tls.crt"))
        .arg("--key-file")
        .arg(dir.join("tls.key"))
        .args(["--log-format", "text", "--drain-timeout", "2s"])
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap();
    Proc(Some(child))
}

fn wait_ready(ns: &str, log: &Path) {
    for _ in 0..100 {
        if let Some(r) = http_get(ns, None, "127.0.0.1:15020", "admin", "/ready")
            && r.starts_with("HTTP/1.1 200")
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "proxy in {ns} not ready: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

#[test]
fn intercepted_connect_reaches_upstream_through_two_proxies_over_mtls() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP intercepted_connect_reaches_upstream_through_two_proxies_over_mtls: {why}");
        return;
    }
    let pid = std::process::id();
    let (cns, sns) = (format!("trellis-mc-{pid}"), format!("trellis-ms-{pid}"));
    let (cip, sip) = ("10.252.9.1", "10.252.9.2");
    run(&["ip", "netns", "add", &cns]);
    let _g1 = Namespaces(vec![cns.clone()]);
    run(&["ip", "netns", "add", &sns]);
    let _g2 = Namespaces(vec![sns.clone()]);
    let (vc, vs) = (format!("tmc{pid}"), format!("tms{pid}"));
    let (vc, vs) = (&vc[..vc.len().min(15)], &vs[..vs.len().min(15)]);
    run(&[
        "ip", "link", "add", vc, "netns", &cns, "type", "veth", "peer", "name", vs, "netns", &sns,
    ]);
    for (ns, dev, ip) in [(&cns, vc, cip), (&sns, vs, sip)] {
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
    // The cluster IP is virtual: routable (so connect() gets to the OUTPUT chain), never served.
    run(&["ip", "-n", &cns, "route", "add", "default", "via", sip]);
    for ns in [&cns, &sns] {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                env!("CARGO_BIN_EXE_trellis-proxy"),
                "init",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "init in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The application in the server pod, on all addresses: reachable from outside the pod
    // solely through its proxy (the port is redirected and Strict).
    let mut app = helper(&sns, "app")
        .env("TRELLIS_MESH_LISTEN", format!("0.0.0.0:{APP_PORT}"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(app.stdout.take().unwrap()).lines();
    let _app = Proc(Some(app));
    loop {
        match lines.next() {
            Some(Ok(l)) if l == "READY" => break,
            Some(Ok(_)) => continue,
            other => panic!("app died before READY: {other:?}"),
        }
    }

    let pki = Pki::new("mesh");
    let backend = OutboundService {
        name: "backend".into(),
        namespace: "shop".into(),
        addresses: vec![CLUSTER_IP.parse().unwrap()],
        ports: vec![ServicePort {
            port: 80,
            name: Some("http".into()),
            protocol: Protocol::Http1,
            endpoints: vec![Endpoint {
                address: SocketAddr::new(sip.parse().unwrap(), APP_PORT),
                identity: Some(id("backend")),
                zone: None,
            }],
        }],
        identities: vec![id("backend")],
        policy: None,
    };
    let mut ccfg = config("client-1", inbound(MtlsMode::Strict), vec![backend]);
    ccfg.mesh.telemetry.access_log.enabled = true;
    let mut scfg = config("server-1", inbound(MtlsMode::Strict), vec![]);
    scfg.mesh.telemetry.access_log.enabled = true;
    let cdir = proxy_dir(&pki, &id("web"), &ccfg);
    let sdir = proxy_dir(&pki, &id("backend"), &scfg);
    let logs = tempfile::tempdir().unwrap();
    let (clog, slog) = (
        logs.path().join("client.log"),
        logs.path().join("server.log"),
    );
    let mut sproxy = start_proxy(&sns, sdir.path(), &slog);
    let _cproxy = start_proxy(&cns, cdir.path(), &clog);
    wait_ready(&sns, &slog);
    wait_ready(&cns, &clog);

    // The client (root: not the proxy UID) connects to the cluster IP in plaintext.
    let resp = http_get(
        &cns,
        None,
        &format!("{CLUSTER_IP}:80"),
        "backend.shop",
        "/hello",
    )
    .unwrap_or_else(|| {
        panic!(
            "no response; client log: {}",
            std::fs::read_to_string(&clog).unwrap_or_default()
        )
    });
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("app saw: GET /hello"), "{resp}");
    let request_id = resp
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-request-id: ")
                .map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("request id added: {resp}"));

    // Both proxies saw the request, each with the other's verified identity, over TLS.
    let cm = http_get(&cns, None, "127.0.0.1:15020", "admin", "/metrics").unwrap();
    assert!(
        cm.lines().any(
            |l| l.starts_with("trellis_proxy_requests_total{direction=\"outbound\"")
                && l.contains(&format!("peer_identity=\"{}\"", id("backend")))
                && l.contains("tls=\"true\"")
                && l.ends_with(" 1")
        ),
        "{cm}"
    );
    let sm = http_get(&sns, None, "127.0.0.1:15020", "admin", "/metrics").unwrap();
    assert!(
        sm.lines().any(
            |l| l.starts_with("trellis_proxy_requests_total{direction=\"inbound\"")
                && l.contains(&format!("peer_identity=\"{}\"", id("web")))
                && l.contains("tls=\"true\"")
                && l.ends_with(" 1")
        ),
        "{sm}"
    );

    // Bypassing the client proxy (as UID 2137, which the client pod's rules exempt), plaintext
    // to the server pod is intercepted there and refused: the port is Strict.
    let bypass = http_get(
        &cns,
        Some(2137),
        &format!("{sip}:{APP_PORT}"),
        "backend",
        "/hello",
    );
    assert!(
        bypass.as_deref().is_none_or(|r| !r.contains("app saw")),
        "plaintext reached the app: {bypass:?}"
    );
    let sm = http_get(&sns, None, "127.0.0.1:15020", "admin", "/metrics").unwrap();
    assert!(
        sm.contains("trellis_proxy_inbound_refused_total{reason=\"plaintext\"} 1"),
        "{sm}"
    );

    // SIGTERM: the real binary drains and exits 0.
    let status = sproxy.terminate();
    assert!(status.success(), "server proxy exit: {status:?}");
    let slog_text = std::fs::read_to_string(&slog).unwrap();
    // One JSON access log line per request, on stdout, with the peer identity.
    assert!(
        slog_text.lines().any(|l| l.starts_with('{')
            && l.contains("\"direction\":\"inbound\"")
            && l.contains(&id("web"))
            && l.contains("\"path\":\"/hello\"")
            && l.contains(&format!("\"requestId\":\"{request_id}\""))),
        "{slog_text}"
    );
}

/// Entry point of the helper processes; does nothing unless started by the test above.
#[test]
#[ignore = "helper process for intercepted_connect_reaches_upstream_through_two_proxies_over_mtls"]
fn netns_mesh_helper() {
    match std::env::var(ROLE).as_deref() {
        Ok("app") => helper_app(),
        Ok("get") => helper_get(),
        _ => {}
    }
}

fn helper_app() {
    let listener = TcpListener::bind(std::env::var("TRELLIS_MESH_LISTEN").unwrap()).unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                loop {
                    // One request head (no bodies in this test), answered with what was seen.
                    let mut head = Vec::new();
                    loop {
                        let mut line = String::new();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push(line.trim_end().to_string());
                    }
                    let body = format!("app saw: {}\n", head.join("\n"));
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    println!("\nREADY");
    std::io::stdout().flush().unwrap();
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(120));
        std::process::exit(0);
    });
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    std::thread::sleep(Duration::from_secs(120));
}

fn helper_get() {
    let addr: SocketAddr = std::env::var("TRELLIS_MESH_ADDR").unwrap().parse().unwrap();
    let host = std::env::var("TRELLIS_MESH_HOST").unwrap();
    let path = std::env::var("TRELLIS_MESH_PATH").unwrap();
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(3)) else {
        return;
    };
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
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
