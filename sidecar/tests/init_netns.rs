//! Root-only: the real `trellis-proxy init` in a fresh network namespace, proven with real TCP
//! connections.
//!
//! Two namespaces joined by a veth pair: `pod` (10.251.7.1, where init runs) and `peer`
//! (10.251.7.2). Listeners run in helper processes started with `ip netns exec` (this same test
//! binary, entering [`netns_helper`]); each accepted connection is answered with the listener's
//! port and the connection's original destination read with `SO_ORIGINAL_DST`, so the test sees
//! where a connection landed and where it was meant to go.
//!
//! Skips with a message when not root or when `ip` / `iptables` are missing.
mod netns_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use netns_support::{Namespaces, run};

const POD_IP: &str = "10.251.7.1";
const PEER_IP: &str = "10.251.7.2";
const ROLE: &str = "TRELLIS_NETNS_ROLE";

fn skip_reason() -> Option<String> {
    netns_support::skip_reason(&["ip", "iptables-nft-save", "iptables-nft-restore", "setpriv"])
}

/// A helper process; killed on drop.
struct Helper(Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn helper_cmd(ns: &str, uid: Option<u32>) -> Command {
    let exe = std::env::current_exe().unwrap();
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
    cmd.arg(exe).args([
        "netns_helper",
        "--ignored",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ]);
    cmd
}

/// Starts listeners on `ports` inside `ns` and waits until they are bound.
fn serve(ns: &str, ports: &[u16]) -> Helper {
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    let mut child = helper_cmd(ns, None)
        .env(ROLE, "server")
        .env("TRELLIS_NETNS_LISTEN", list.join(","))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let helper = Helper(child);
    loop {
        match lines.next() {
            Some(Ok(l)) if l == "READY" => break,
            Some(Ok(_)) => continue,
            other => panic!("server helper in {ns} died before READY: {other:?}"),
        }
    }
    helper
}

/// Connects from `ns` (as `uid`) to `addr` and returns the answering listener's report
/// (`"<listener port> <original destination>"`).
fn connect(ns: &str, uid: Option<u32>, addr: &str) -> String {
    connect_from(ns, uid, None, addr)
}

/// [`connect`] from the local address `bind` (any port).
fn connect_from(ns: &str, uid: Option<u32>, bind: Option<&str>, addr: &str) -> String {
    let out = helper_cmd(ns, uid)
        .env(ROLE, "client")
        .env("TRELLIS_NETNS_CONNECT", addr)
        .env("TRELLIS_NETNS_BIND", bind.unwrap_or(""))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .map(str::to_string)
        .unwrap_or_else(|| {
            panic!(
                "client {ns} -> {addr} got no answer: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// The nat table of one backend's save tool (`iptables-nft-save`, `ip6tables-legacy-save`...)
/// without comments, for comparing two runs.
fn nat_rules(ns: &str, save: &str) -> String {
    run(&["ip", "netns", "exec", ns, save, "-t", "nat"])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn init_redirects_real_connections_in_a_network_namespace() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP init_redirects_real_connections_in_a_network_namespace: {why}");
        return;
    }
    let id = std::process::id();
    let (pod, peer) = (format!("trellis-pod-{id}"), format!("trellis-peer-{id}"));
    run(&["ip", "netns", "add", &pod]);
    let _guard_pod = Namespaces(vec![pod.clone()]);
    run(&["ip", "netns", "add", &peer]);
    let _guard_peer = Namespaces(vec![peer.clone()]);
    let (veth_pod, veth_peer) = (format!("tpod{id}"), format!("tpeer{id}"));
    let (veth_pod, veth_peer) = (
        &veth_pod[..veth_pod.len().min(15)],
        &veth_peer[..veth_peer.len().min(15)],
    );
    run(&[
        "ip", "link", "add", veth_pod, "netns", &pod, "type", "veth", "peer", "name", veth_peer,
        "netns", &peer,
    ]);
    for (ns, dev, ip) in [(&pod, veth_pod, POD_IP), (&peer, veth_peer, PEER_IP)] {
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
    // A default route, so connect() to an "external" address is routed (then redirected).
    run(&["ip", "-n", &pod, "route", "add", "default", "via", PEER_IP]);

    let init = |extra: &[&str]| {
        let mut args = vec![
            "netns",
            "exec",
            &pod,
            env!("CARGO_BIN_EXE_trellis-proxy"),
            "init",
            "--exclude-inbound-ports",
            "8081",
            "--exclude-outbound-ports",
            "9091",
            "--backend",
            "nft",
        ];
        args.extend_from_slice(extra);
        let out = Command::new("ip").args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let first = init(&[]);
    assert!(
        first.contains("-A PREROUTING -p tcp -j TRELLIS_INBOUND"),
        "{first}"
    );
    let after_first = nat_rules(&pod, "iptables-nft-save");
    assert!(
        after_first.contains("REDIRECT --to-ports 15006"),
        "{after_first}"
    );
    let v6_after_first = nat_rules(&pod, "ip6tables-nft-save");
    assert!(v6_after_first.contains("REDIRECT --to-ports 15006"));
    let second = init(&[]);
    assert!(
        !second.contains("-A PREROUTING"),
        "second run must not add the jump again: {second}"
    );
    assert_eq!(
        nat_rules(&pod, "iptables-nft-save"),
        after_first,
        "running init twice changed the ruleset"
    );
    assert_eq!(
        nat_rules(&pod, "ip6tables-nft-save"),
        v6_after_first,
        "running init twice changed the IPv6 ruleset"
    );

    let _pod_server = serve(&pod, &[15006, 15001, 15020, 8080, 8081]);
    let _peer_server = serve(&peer, &[9090, 9091]);

    // Inbound: a peer connecting to the app's port lands on the inbound listener, and the
    // original destination is the app's port.
    assert_eq!(
        connect(&peer, None, &format!("{POD_IP}:8080")),
        format!("15006 {POD_IP}:8080")
    );
    // Excluded inbound port and the admin port: not redirected.
    assert!(connect(&peer, None, &format!("{POD_IP}:8081")).starts_with("8081 "));
    assert!(connect(&peer, None, &format!("{POD_IP}:15020")).starts_with("15020 "));
    // Outbound from the app (root here, any non-proxy UID): lands on the outbound listener
    // with the original destination preserved, even for an address nobody serves.
    assert_eq!(
        connect(&pod, None, "10.99.0.1:80"),
        "15001 10.99.0.1:80".to_string()
    );
    assert_eq!(
        connect(&pod, None, &format!("{PEER_IP}:9090")),
        format!("15001 {PEER_IP}:9090")
    );
    // The same connection from the proxy's UID goes straight to the peer.
    assert!(connect(&pod, Some(2137), &format!("{PEER_IP}:9090")).starts_with("9090 "));
    // A non-proxy, non-root UID is redirected like root.
    assert_eq!(
        connect(&pod, Some(1000), &format!("{PEER_IP}:9090")),
        format!("15001 {PEER_IP}:9090")
    );
    // Excluded outbound port: straight to the peer.
    assert!(connect(&pod, None, &format!("{PEER_IP}:9091")).starts_with("9091 "));
    // The app talking to itself over loopback stays direct, also through its own pod IP
    // (routed over lo), as in Istio.
    assert!(connect(&pod, None, "127.0.0.1:8080").starts_with("8080 "));
    assert!(connect(&pod, None, &format!("{POD_IP}:8080")).starts_with("8080 "));
    // The proxy calling its own pod IP is sent to inbound, like a request from another pod.
    assert_eq!(
        connect(&pod, Some(2137), &format!("{POD_IP}:8080")),
        format!("15006 {POD_IP}:8080")
    );
    // The proxy forwarding inbound traffic to its pod IP from 127.0.0.6 (how inbound forwards)
    // stays direct: no loop back into inbound.
    assert!(
        connect_from(
            &pod,
            Some(2137),
            Some("127.0.0.6"),
            &format!("{POD_IP}:8080")
        )
        .starts_with("8080 ")
    );
    // The proxy reaching the app over 127.0.0.1 (`inbound-to-localhost`) stays direct.
    assert!(connect(&pod, Some(2137), "127.0.0.1:8080").starts_with("8080 "));
}

/// Entry point of the helper processes the test above starts inside the namespaces; does
/// nothing unless started by it (the role is in the environment).
#[test]
#[ignore = "helper process for init_redirects_real_connections_in_a_network_namespace"]
fn netns_helper() {
    match std::env::var(ROLE).as_deref() {
        Ok("server") => helper_server(),
        Ok("client") => helper_client(),
        _ => {}
    }
}

fn helper_server() {
    let ports = std::env::var("TRELLIS_NETNS_LISTEN").unwrap();
    for port in ports.split(',') {
        let listener = TcpListener::bind(format!("0.0.0.0:{port}")).unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                answer(stream);
            }
        });
    }
    // libtest has printed "test netns_helper ... " without a newline: start a fresh line.
    println!("\nREADY");
    std::io::stdout().flush().unwrap();
    // Live until the test closes stdin (kills us), but never longer than a minute.
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(60));
        std::process::exit(0);
    });
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

fn answer(mut stream: TcpStream) {
    let local = stream.local_addr().map(|a| a.port()).unwrap_or(0);
    let orig = socket2::SockRef::from(&stream)
        .original_dst_v4()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a: SocketAddr| a.to_string())
        .unwrap_or_else(|| "-".into());
    let _ = writeln!(stream, "{local} {orig}");
}

fn helper_client() {
    let addr: SocketAddr = std::env::var("TRELLIS_NETNS_CONNECT")
        .unwrap()
        .parse()
        .unwrap();
    let bind = std::env::var("TRELLIS_NETNS_BIND").unwrap_or_default();
    let mut stream = if bind.is_empty() {
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap()
    } else {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let local: SocketAddr = format!("{bind}:0").parse().unwrap();
        sock.bind(&local.into()).unwrap();
        sock.connect_timeout(&addr.into(), Duration::from_secs(5))
            .unwrap();
        sock.into()
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(&mut stream).read_line(&mut line).unwrap();
    println!("\nRESULT {}", line.trim());
}

/// The legacy backend: applied twice in a fresh namespace, the ruleset is the same and holds
/// the redirects. Skips when the kernel has no legacy iptables (`ip_tables` module).
#[test]
fn legacy_backend_is_idempotent() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP legacy_backend_is_idempotent: {why}");
        return;
    }
    let ns = format!("trellis-legacy-{}", std::process::id());
    run(&["ip", "netns", "add", &ns]);
    let _guard = Namespaces(vec![ns.clone()]);
    let usable = Command::new("ip")
        .args(["netns", "exec", &ns, "iptables-legacy-save", "-t", "nat"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !usable {
        eprintln!("SKIP legacy_backend_is_idempotent: iptables-legacy unusable here");
        return;
    }
    let init = || {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                env!("CARGO_BIN_EXE_trellis-proxy"),
                "init",
            ])
            .args([
                "--backend",
                "legacy",
                "--exclude-outbound-cidrs",
                "10.0.0.0/8",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    init();
    let first = nat_rules(&ns, "iptables-legacy-save");
    assert!(
        first.contains("-A TRELLIS_OUTPUT -d 10.0.0.0/8 -j RETURN"),
        "{first}"
    );
    assert!(
        first.contains("-A OUTPUT -p tcp -j TRELLIS_OUTPUT"),
        "{first}"
    );
    init();
    assert_eq!(nat_rules(&ns, "iptables-legacy-save"), first);
    // auto now finds the legacy rules and stays on legacy instead of adding nft rules.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            env!("CARGO_BIN_EXE_trellis-proxy"),
            "init",
        ])
        .args(["--exclude-outbound-cidrs", "10.0.0.0/8"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(nat_rules(&ns, "iptables-legacy-save"), first);
    assert!(!nat_rules(&ns, "iptables-nft-save").contains("TRELLIS"));
}
