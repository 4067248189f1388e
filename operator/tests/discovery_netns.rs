//! Root-only: the redirected-address path of on-demand discovery, end to end. Three network
//! namespaces: the `client` pod, the `server` pod (joined by a veth pair, the client's default
//! route through it so a connect() to a virtual cluster IP reaches the OUTPUT chain) and the
//! `operator` pod (a second veth pair from the client). The iptables rules of
//! `trellis-proxy init` (the same function the init container runs) are installed in both pods;
//! a real proxy (`trellis proxy`, the same code as the `trellis-proxy` binary) runs in each as
//! UID 2137, with certificates from a test CA; the operator's real discovery server runs in the
//! operator namespace, serving a compile of a cluster whose Mesh is in `Bootstrap` mode.
//!
//! The application connects to the Service's cluster IP, with a `Host` header that names
//! nothing: the only way to the Service is the original destination address, which the
//! client's ConfigMap does not list. Its proxy must ask the operator for that address, learn
//! the Service, and carry the request over mTLS to the server pod, whose proxy accepts only
//! mTLS (`Strict`): a 200 proves both.
//!
//! In-process parts (the application, the operator, the one-shot clients, the rules) run on
//! threads moved into their namespace with `setns`. Skips with a message when not root or when
//! `ip` / `iptables` / `setpriv` are missing.

#[path = "../../sidecar/tests/common/mod.rs"]
mod common;
mod compiler_fixtures;
#[path = "../../sidecar/tests/netns_support/mod.rs"]
mod netns_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use common::{Pki, kubelet_write};
use compiler_fixtures::*;
use netns_support::{Namespaces, run};
use tokio_util::sync::CancellationToken;
use trellis_operator::api::mesh::ConfigMapContent;
use trellis_operator::discovery::{Hub, serve};
use trellis_proxy::config::{MtlsMode, ProxyConfig};

const OPERATOR_ID: &str = "spiffe://cluster.local/ns/trellis-system/sa/trellis-operator";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const BACKEND_ID: &str = "spiffe://cluster.local/ns/api/sa/backend";
const CLUSTER_IP: &str = "10.96.78.20";
const APP_PORT: u16 = 8080;
const DISCOVERY_PORT: u16 = 15010;

fn skip_reason() -> Option<String> {
    netns_support::skip_reason(&["ip", "iptables-save", "iptables-restore", "setpriv"])
}

/// Runs `f` on a new thread inside network namespace `ns`: every socket it opens, and every
/// process it starts, lives there.
fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        f()
    })
}

fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in(ns, f).join().unwrap()
}

/// One HTTP/1.1 GET from inside `ns` (as root: not the proxy's UID, so redirected when the
/// destination is not loopback); the raw response, or `None`.
fn http_get(ns: &str, addr: &str, host: &str, path: &str) -> Option<String> {
    let (addr, host, path): (SocketAddr, String, String) =
        (addr.parse().unwrap(), host.into(), path.into());
    in_ns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).ok()?;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        (!out.is_empty()).then(|| String::from_utf8_lossy(&out).into_owned())
    })
}

/// The application in the server pod: answers each request with the request head it saw.
fn start_app(ns: &str) {
    let (tx, rx) = std::sync::mpsc::channel();
    spawn_in(ns, move || {
        let listener = TcpListener::bind(("0.0.0.0", APP_PORT)).unwrap();
        tx.send(()).unwrap();
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                loop {
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
    rx.recv_timeout(Duration::from_secs(5))
        .expect("app listening");
}

/// The operator's discovery server in `ns` on `addr`, serving `out`, until `stop`.
fn start_operator(
    ns: &str,
    addr: SocketAddr,
    pki: &Pki,
    out: &trellis_operator::compiler::Output,
    stop: CancellationToken,
) {
    let (cert, key) = pki.leaf(OPERATOR_ID);
    let creds = trellis_proxy::tls::credentials_from_pem(
        &std::fs::read(cert).unwrap(),
        &std::fs::read(key).unwrap(),
        pki.ca_pem.as_bytes(),
    )
    .unwrap();
    let tls = trellis_proxy::tls::server_config(&creds, &[b"h2"]).unwrap();
    let hub = Hub::new();
    hub.publish(out);
    let (tx, rx) = std::sync::mpsc::channel();
    spawn_in(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            tx.send(()).unwrap();
            let tls = tokio::sync::watch::channel(Some(tls)).1;
            serve(listener, tls, hub, stop).await;
        });
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("operator listening");
}

/// A child process; killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Files a proxy reads, readable by UID 2137.
fn proxy_dir(pki: &Pki, spiffe_id: &str, cfg: &ProxyConfig) -> tempfile::TempDir {
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

/// The real proxy (`trellis proxy`) in `ns` as UID 2137, the UID the rules exempt.
fn start_proxy(ns: &str, dir: &Path, log: &Path, extra: &[&str]) -> Proc {
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
        .arg(env!("CARGO_BIN_EXE_trellis"))
        .arg("proxy")
        .arg("--dir")
        .arg(dir)
        .arg("--cert-file")
        .arg(dir.join("tls.crt"))
        .arg("--key-file")
        .arg(dir.join("tls.key"))
        .args(["--log-format", "text"])
        .args(extra)
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap();
    Proc(child)
}

fn wait_ready(ns: &str, log: &Path) {
    for _ in 0..100 {
        if let Some(r) = http_get(ns, "127.0.0.1:15020", "admin", "/ready")
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

fn init_rules(ns: &str) {
    let code = in_ns(ns, || {
        trellis_proxy::init::main(trellis_proxy::init::InitArgs {
            proxy_uid: 2137,
            inbound_port: 15006,
            outbound_port: 15001,
            exclude_inbound_ports: String::new(),
            exclude_outbound_ports: String::new(),
            exclude_outbound_cidrs: String::new(),
            backend: "auto".into(),
            dry_run: false,
        })
    });
    assert_eq!(code, std::process::ExitCode::SUCCESS, "init in {ns}");
}

#[test]
fn an_intercepted_connect_to_an_unlisted_cluster_ip_is_resolved_on_demand_and_carried_over_mtls() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP discovery_netns: {why}");
        return;
    }
    let pid = std::process::id();
    let (cns, sns, ons) = (
        format!("trellis-dc-{pid}"),
        format!("trellis-ds-{pid}"),
        format!("trellis-do-{pid}"),
    );
    let _guard = Namespaces(vec![cns.clone(), sns.clone(), ons.clone()]);
    for ns in [&cns, &sns, &ons] {
        run(&["ip", "netns", "add", ns]);
        run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    // client <-> server pod, and client <-> operator pod.
    let (cip, sip) = ("10.251.19.1", "10.251.19.2");
    let (c2ip, oip) = ("10.251.20.1", "10.251.20.2");
    for (tag, a, a_ip, b, b_ip) in [("s", &cns, cip, &sns, sip), ("o", &cns, c2ip, &ons, oip)] {
        let (va, vb) = (format!("td{tag}a{pid}"), format!("td{tag}b{pid}"));
        let (va, vb) = (&va[..va.len().min(15)], &vb[..vb.len().min(15)]);
        run(&[
            "ip", "link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b,
        ]);
        for (ns, dev, ip) in [(a, va, a_ip), (b, vb, b_ip)] {
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
    }
    // The cluster IP is virtual: routable (so connect() gets to the OUTPUT chain), never served.
    run(&["ip", "-n", &cns, "route", "add", "default", "via", sip]);
    init_rules(&cns);
    init_rules(&sns);
    start_app(&sns);

    // The cluster: shop (the client's namespace, no Services of its own) and api/backend,
    // whose one endpoint is the server pod. Bootstrap mode: shop's ConfigMap lists nothing of
    // api, so the client's proxy can only learn the Service from the stream.
    let w = World::new()
        .with(namespace("shop").meshed())
        .with(namespace("api").meshed())
        .with(namespace("trellis-system"))
        .with(mesh().spec(|s| s.discovery.config_map = ConfigMapContent::Bootstrap))
        .with(service("api", "backend").ip(CLUSTER_IP).port(80, "http"))
        .with(
            slice("api", "backend", "backend-1")
                .port(Some("http"), i32::from(APP_PORT))
                .endpoint(sip, Some("backend-0")),
        )
        .with(pod("api", "backend-0").sa("backend").ip(sip).sidecar());
    let out = trellis_operator::compiler::compile(&w.snap);
    let client_cfg = ProxyConfig::from_json(out.config("shop").unwrap().as_bytes()).unwrap();
    assert!(
        client_cfg.outbound.iter().all(|s| s.namespace != "api"),
        "{:?}",
        client_cfg.outbound
    );

    let pki = Pki::new("mesh");
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let discovery: SocketAddr = format!("{oip}:{DISCOVERY_PORT}").parse().unwrap();
    start_operator(&ons, discovery, &pki, &out, stop);

    let server_cfg = common::config("server-1", common::inbound(MtlsMode::Strict), vec![]);
    let cdir = proxy_dir(&pki, CLIENT_ID, &client_cfg);
    let sdir = proxy_dir(&pki, BACKEND_ID, &server_cfg);
    let logs = tempfile::tempdir().unwrap();
    let (clog, slog) = (
        logs.path().join("client.log"),
        logs.path().join("server.log"),
    );
    let _sproxy = start_proxy(&sns, sdir.path(), &slog, &[]);
    let _cproxy = start_proxy(
        &cns,
        cdir.path(),
        &clog,
        &[
            "--discovery-addr",
            &discovery.to_string(),
            "--discovery-id",
            OPERATOR_ID,
        ],
    );
    wait_ready(&sns, &slog);
    wait_ready(&cns, &clog);

    // The application connects to the cluster IP, in plaintext, naming nothing in `Host`:
    // the first connection resolves the address and goes out over mTLS.
    let resp =
        http_get(&cns, &format!("{CLUSTER_IP}:80"), CLUSTER_IP, "/hello").unwrap_or_else(|| {
            panic!(
                "no response; client log: {}",
                std::fs::read_to_string(&clog).unwrap_or_default()
            )
        });
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "{resp}\nclient log: {}\nserver log: {}",
        std::fs::read_to_string(&clog).unwrap_or_default(),
        std::fs::read_to_string(&slog).unwrap_or_default()
    );
    assert!(resp.contains("app saw: GET /hello"), "{resp}");

    // Both proxies saw it, each with the other's verified identity, over TLS; the client's
    // proxy labels it with the Service it learned.
    let cm = http_get(&cns, "127.0.0.1:15020", "admin", "/metrics").unwrap();
    assert!(
        cm.lines().any(
            |l| l.starts_with("trellis_proxy_requests_total{direction=\"outbound\"")
                && l.contains(&format!("peer_identity=\"{BACKEND_ID}\""))
                && l.contains("dst_service=\"backend.api\"")
                && l.contains("tls=\"true\"")
                && l.ends_with(" 1")
        ),
        "{cm}"
    );
    let sm = http_get(&sns, "127.0.0.1:15020", "admin", "/metrics").unwrap();
    assert!(
        sm.lines().any(
            |l| l.starts_with("trellis_proxy_requests_total{direction=\"inbound\"")
                && l.contains(&format!("peer_identity=\"{CLIENT_ID}\""))
                && l.contains("tls=\"true\"")
                && l.ends_with(" 1")
        ),
        "{sm}"
    );
    // The contrast that makes the 200 mean something: plaintext to the server pod, bypassing
    // the client's proxy, is refused there (the port is Strict).
    let bypass = in_ns(&cns, move || {
        let addr: SocketAddr = format!("{sip}:{APP_PORT}").parse().unwrap();
        // As the proxy's UID: the client pod's rules let it through untouched.
        let out = Command::new("setpriv")
            .args(["--reuid=2137", "--regid=2137", "--clear-groups"])
            .args(["bash", "-c"])
            .arg(format!(
                "exec 3<>/dev/tcp/{}/{} && printf 'GET / HTTP/1.1\\r\\nhost: x\\r\\n\\r\\n' >&3 && timeout 3 cat <&3",
                addr.ip(),
                addr.port()
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    assert!(
        !bypass.contains("app saw"),
        "plaintext reached the app: {bypass}"
    );
}
