//! Root-only fixture for whole-mesh tests in network namespaces: a `node` namespace holding a
//! bridge (the host's side, like a CNI bridge on a Kubernetes node), two meshed pods (`client`
//! and `server`, each with the real `trellis-proxy init` rules) and an unmeshed `outside` host,
//! all on one IPv4 and one IPv6 subnet. Real `trellis-proxy` binaries run in the pods as UID
//! 2137 with certificates from a test CA.
//!
//! Helper processes (applications, one-shot clients) are the calling test binary itself,
//! started inside a namespace with `ip netns exec` and entering its `netns_helper` test, which
//! calls [`helper_main`].
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{Pki, kubelet_write};
use crate::netns_support::{Namespaces, run};
use trellis_proxy::config::ProxyConfig;

pub const ROLE: &str = "TRELLIS_NETNS_ROLE";

pub const NODE_IP: &str = "10.252.9.254";
pub const CLIENT_IP: &str = "10.252.9.1";
pub const SERVER_IP: &str = "10.252.9.2";
pub const OUTSIDE_IP: &str = "10.252.9.3";
pub const NODE_IP6: &str = "fd52::fe";
pub const CLIENT_IP6: &str = "fd52::1";
pub const SERVER_IP6: &str = "fd52::2";
pub const OUTSIDE_IP6: &str = "fd52::3";
/// Virtual Service addresses: routable from the client pod (so `connect()` reaches its OUTPUT
/// chain), never served by anyone.
pub const CLUSTER_IP: &str = "10.96.77.10";
pub const CLUSTER_IP6: &str = "fd96::10";

pub fn skip_reason() -> Option<String> {
    crate::netns_support::skip_reason(&["ip", "iptables-save", "iptables-restore", "setpriv"])
}

/// The four namespaces; deleted (with every link and rule) on drop.
pub struct Net {
    pub node: String,
    pub client: String,
    pub server: String,
    pub outside: String,
    _guard: Namespaces,
}

impl Net {
    /// Builds the namespaces and runs `trellis-proxy init` (default flags plus `init_args`) in
    /// both pods. `tag` keeps the names of concurrent tests apart.
    pub fn new(tag: &str, init_args: &[&str]) -> Net {
        let pid = std::process::id();
        let name = |role: &str| format!("tr-{tag}-{role}-{pid}");
        let (node, client, server, outside) = (name("node"), name("c"), name("s"), name("o"));
        let mut guard = Namespaces(Vec::new());
        for ns in [&node, &client, &server, &outside] {
            run(&["ip", "netns", "add", ns]);
            guard.0.push(ns.clone());
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        run(&["ip", "-n", &node, "link", "add", "br0", "type", "bridge"]);
        run(&[
            "ip",
            "-n",
            &node,
            "addr",
            "add",
            &format!("{NODE_IP}/24"),
            "dev",
            "br0",
        ]);
        run(&[
            "ip",
            "-n",
            &node,
            "addr",
            "add",
            &format!("{NODE_IP6}/64"),
            "dev",
            "br0",
            "nodad",
        ]);
        run(&["ip", "-n", &node, "link", "set", "br0", "up"]);
        for (ns, ip, ip6, i) in [
            (&client, CLIENT_IP, CLIENT_IP6, 1),
            (&server, SERVER_IP, SERVER_IP6, 2),
            (&outside, OUTSIDE_IP, OUTSIDE_IP6, 3),
        ] {
            let (pod_end, node_end) = ("eth0", format!("veth{i}"));
            run(&[
                "ip", "link", "add", pod_end, "netns", ns, "type", "veth", "peer", "name",
                &node_end, "netns", &node,
            ]);
            run(&["ip", "-n", &node, "link", "set", &node_end, "master", "br0"]);
            run(&["ip", "-n", &node, "link", "set", &node_end, "up"]);
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                pod_end,
            ]);
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip6}/64"),
                "dev",
                pod_end,
                "nodad",
            ]);
            run(&["ip", "-n", ns, "link", "set", pod_end, "up"]);
            run(&["ip", "-n", ns, "route", "add", "default", "via", NODE_IP]);
            run(&[
                "ip", "-n", ns, "-6", "route", "add", "default", "via", NODE_IP6,
            ]);
        }
        let net = Net {
            node,
            client,
            server,
            outside,
            _guard: guard,
        };
        for ns in [&net.client, &net.server] {
            let out = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    ns,
                    env!("CARGO_BIN_EXE_trellis-proxy"),
                    "init",
                ])
                .args(init_args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "init in {ns}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        net
    }
}

/// A child process; killed on drop unless already reaped.
pub struct Proc(pub Option<Child>);

/// What a started helper prints, a line at a time (its progress: `READY`, ...).
pub type Report = std::io::Lines<BufReader<std::process::ChildStdout>>;

impl Proc {
    /// Starts `cmd` with its stdin held open (a helper stops when it closes) and its stdout
    /// read as the helper's [`Report`].
    pub fn spawn_reporting(cmd: &mut Command) -> (Proc, Report) {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        (Proc(Some(child)), lines)
    }

    /// SIGTERM, then the exit status (the graceful-shutdown path of the real binary).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
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

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.0
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
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

/// This test binary inside `ns` (as `uid`, or root), entering its `netns_helper` test.
pub fn helper(ns: &str, uid: Option<u32>, role: &str) -> Command {
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
    cmd.arg(std::env::current_exe().unwrap())
        .args([
            "netns_helper",
            "--ignored",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role);
    cmd
}

/// An HTTP/1.1 application in `ns` on each of `listen` (e.g. `127.0.0.1:8081`), answering
/// every request with `app saw: <request head>` and appending the request line to `seen`.
pub fn start_app(ns: &str, listen: &[&str], seen: &Path) -> Proc {
    let (proc, mut lines) = Proc::spawn_reporting(
        helper(ns, None, "app")
            .env("TRELLIS_NETNS_LISTEN", listen.join(","))
            .env("TRELLIS_NETNS_SEEN", seen),
    );
    loop {
        match lines.next() {
            Some(Ok(l)) if l == "READY" => break,
            Some(Ok(_)) => continue,
            other => panic!("app in {ns} died before READY: {other:?}"),
        }
    }
    proc
}

/// One HTTP/1.1 request from inside `ns` (as `uid`, or root); the raw response, or `None`
/// when the connection failed or closed without an answer.
pub fn http(
    ns: &str,
    uid: Option<u32>,
    method: &str,
    addr: &str,
    host: &str,
    path: &str,
) -> Option<String> {
    let out = helper(ns, uid, "http")
        .env("TRELLIS_NETNS_ADDR", addr)
        .env("TRELLIS_NETNS_METHOD", method)
        .env("TRELLIS_NETNS_HOST", host)
        .env("TRELLIS_NETNS_PATH", path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = stdout.find("RESULT-BEGIN\n")? + "RESULT-BEGIN\n".len();
    let end = stdout.find("\nRESULT-END")?;
    Some(stdout[start..end].to_string())
}

/// What a TCP connect from a namespace got.
#[derive(Debug, PartialEq, Eq)]
pub enum Connect {
    /// The handshake completed.
    Established,
    /// RST: nothing listens there.
    Refused,
    /// No answer within the timeout: the SYN was dropped.
    TimedOut,
    Other(String),
}

/// A bare TCP connect from inside `ns` to `addr`, with a half-second timeout (a SYN-ACK across
/// the bridge takes well under a millisecond).
pub fn tcp_connect(ns: &str, addr: &str) -> Connect {
    let out = helper(ns, None, "connect")
        .env("TRELLIS_NETNS_ADDR", addr)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().find_map(|l| l.strip_prefix("CONNECT ")) {
        Some("established") => Connect::Established,
        Some("refused") => Connect::Refused,
        Some("timeout") => Connect::TimedOut,
        Some(other) => Connect::Other(other.to_string()),
        None => Connect::Other(format!(
            "no result: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

/// Connections from inside `ns` to `addr` that start a TLS handshake and never finish it (see
/// [`helper_flood`]), held until [`Flood::end`].
pub struct Flood {
    proc: Proc,
    /// For each connection opened past the flood: whether it was closed at once.
    pub extra_closed: Vec<bool>,
    /// Whether the flood's own connections were all still open once the extras were tried.
    pub held: bool,
}

impl Flood {
    /// Opens `held` stalled connections, then `extra` more, and reports what became of them.
    pub fn start(ns: &str, addr: &str, held: usize, extra: usize) -> Flood {
        let (proc, mut lines) = Proc::spawn_reporting(
            helper(ns, None, "flood")
                .env("TRELLIS_NETNS_ADDR", addr)
                .env("TRELLIS_NETNS_HELD", held.to_string())
                .env("TRELLIS_NETNS_EXTRA", extra.to_string()),
        );
        let mut extra_closed = Vec::new();
        loop {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Some(r) = l.strip_prefix("EXTRA ") {
                        extra_closed.push(r == "closed");
                    } else if let Some(r) = l.strip_prefix("FLOODING ") {
                        return Flood {
                            proc,
                            extra_closed,
                            held: r == "held",
                        };
                    }
                }
                other => panic!("flood from {ns} died before it was in place: {other:?}"),
            }
        }
    }

    /// Closes every connection of the flood.
    pub fn end(mut self) {
        self.proc.terminate();
    }
}

/// The files a proxy reads, readable by UID 2137.
pub fn proxy_dir(pki: &Pki, spiffe_id: &str, cfg: &ProxyConfig) -> tempfile::TempDir {
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

/// A proxy running in a pod namespace as UID 2137, and where its log goes.
pub struct PodProxy {
    pub proc: Proc,
    pub log: PathBuf,
    pub ns: String,
    _dir: tempfile::TempDir,
}

impl PodProxy {
    /// Starts the real binary in `ns` with the pod's default flags plus `extra`, and waits
    /// until its `/ready` answers 200 on loopback.
    pub fn start(
        ns: &str,
        pki: &Pki,
        spiffe_id: &str,
        cfg: &ProxyConfig,
        logs: &Path,
        extra: &[&str],
    ) -> PodProxy {
        let dir = proxy_dir(pki, spiffe_id, cfg);
        let log = logs.join(format!("{ns}.log"));
        let out = std::fs::File::create(&log).unwrap();
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
            .arg(dir.path())
            .arg("--cert-file")
            .arg(dir.path().join("tls.crt"))
            .arg("--key-file")
            .arg(dir.path().join("tls.key"))
            .args(["--log-format", "text", "--drain-timeout", "2s"])
            .args(extra)
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        let p = PodProxy {
            proc: Proc(Some(child)),
            log,
            ns: ns.to_string(),
            _dir: dir,
        };
        p.wait_ready();
        p
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&self) {
        for _ in 0..100 {
            if self
                .admin("GET", "/ready")
                .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("proxy in {} not ready: {}", self.ns, self.log_text());
    }

    /// A request to the admin port from inside the pod, over loopback.
    pub fn admin(&self, method: &str, path: &str) -> Option<String> {
        http(&self.ns, None, method, "127.0.0.1:15020", "admin", path)
    }
}

/// Entry point of the helper processes; does nothing unless started by a test (the role is in
/// the environment).
pub fn helper_main() {
    match std::env::var(ROLE).as_deref() {
        Ok("app") => helper_app(),
        Ok("http") => helper_http(),
        Ok("connect") => helper_connect(),
        Ok("flood") => helper_flood(),
        _ => {}
    }
}

fn helper_app() {
    let seen: PathBuf = std::env::var("TRELLIS_NETNS_SEEN").unwrap().into();
    for addr in std::env::var("TRELLIS_NETNS_LISTEN").unwrap().split(',') {
        let listener = TcpListener::bind(addr).unwrap();
        let seen = seen.clone();
        let addr = addr.to_string();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let seen = seen.clone();
                let addr = addr.clone();
                std::thread::spawn(move || serve_app(stream, &seen, &addr));
            }
        });
    }
    // libtest has printed "test netns_helper ... " without a newline: start a fresh line.
    println!("\nREADY");
    std::io::stdout().flush().unwrap();
    // Live until the test closes stdin (kills us), but never longer than two minutes.
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(120));
        std::process::exit(0);
    });
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    std::thread::sleep(Duration::from_secs(120));
}

fn serve_app(mut stream: TcpStream, seen: &Path, listener: &str) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    loop {
        // One request head (no bodies here), answered with what was seen.
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
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(seen)
            .unwrap();
        let _ = writeln!(
            f,
            "{listener} from {peer}: {}",
            head.first().cloned().unwrap_or_default()
        );
        let body = format!("app on {listener} saw from {peer}: {}\n", head.join("\n"));
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if stream.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

fn helper_http() {
    let addr: SocketAddr = std::env::var("TRELLIS_NETNS_ADDR")
        .unwrap()
        .parse()
        .unwrap();
    let method = std::env::var("TRELLIS_NETNS_METHOD").unwrap();
    let host = std::env::var("TRELLIS_NETNS_HOST").unwrap();
    let path = std::env::var("TRELLIS_NETNS_PATH").unwrap();
    // Kernel-answered handshakes only (local bridge or loopback): a dropped SYN fails fast.
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return;
    };
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
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

fn helper_connect() {
    let addr: SocketAddr = std::env::var("TRELLIS_NETNS_ADDR")
        .unwrap()
        .parse()
        .unwrap();
    let result = match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
        Ok(_) => "established".to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => "refused".into(),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => "timeout".into(),
        Err(e) => format!("error {e}"),
    };
    println!("\nCONNECT {result}");
}

/// Whether the peer closes `s` within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// `TRELLIS_NETNS_HELD` connections to `TRELLIS_NETNS_ADDR` that send the first bytes of a TLS
/// ClientHello (announcing 512 more that never come), then `TRELLIS_NETNS_EXTRA` more, each
/// reported as `EXTRA closed` (closed within a second) or `EXTRA open`; then `FLOODING held`
/// (the first ones all still open) or `FLOODING dropped`, and holds them until stdin closes.
fn helper_flood() {
    const CLIENT_HELLO_START: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
    let addr: SocketAddr = std::env::var("TRELLIS_NETNS_ADDR")
        .unwrap()
        .parse()
        .unwrap();
    let count = |k: &str| -> usize { std::env::var(k).unwrap().parse().unwrap() };
    let stalled = || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).unwrap();
        let _ = s.write_all(CLIENT_HELLO_START);
        s
    };
    let mut held: Vec<TcpStream> = (0..count("TRELLIS_NETNS_HELD"))
        .map(|_| stalled())
        .collect();
    println!();
    for _ in 0..count("TRELLIS_NETNS_EXTRA") {
        let closed = closed_within(&mut stalled(), Duration::from_secs(1));
        println!("EXTRA {}", if closed { "closed" } else { "open" });
    }
    let all_held = held
        .iter_mut()
        .all(|s| !closed_within(s, Duration::from_millis(100)));
    println!("FLOODING {}", if all_held { "held" } else { "dropped" });
    std::io::stdout().flush().unwrap();
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(60));
        std::process::exit(0);
    });
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}
