//! Root-only attack suite: what a host outside the mesh can do to a meshed pod, tried for real.
//!
//! Each test builds its own [`netns_pods::Net`]: a `node` namespace (the host, holding the
//! bridge), an unmeshed `outside` host, and `client` and `server` pods with the real
//! `trellis-proxy init` rules and real proxy binaries as UID 2137. The server pod's application
//! listens on `[::]:8080` (all addresses) and on `127.0.0.1:8081` (loopback only, like a debug
//! server), and writes down every request it sees. Both pods are `Strict`.
//!
//! Skips with a message when not root or when `ip` / `iptables` / `setpriv` are missing.

mod common;
mod netns_pods;
mod netns_support;

use std::net::SocketAddr;

use common::*;
use netns_pods::*;
use trellis_proxy::config::{Endpoint, MtlsMode, OutboundService, Protocol, ServicePort};

fn port(port: u16, endpoint: &str) -> ServicePort {
    ServicePort {
        port,
        name: None,
        protocol: Protocol::Http1,
        endpoints: vec![Endpoint {
            address: endpoint.parse::<SocketAddr>().unwrap(),
            identity: Some(id("backend")),
            zone: None,
        }],
    }
}

/// `backend.shop` (IPv4: port 80 to the app's all-address listener, 81 to its loopback-only
/// one) and `backend6.shop` (IPv6, port 80).
fn services() -> Vec<OutboundService> {
    vec![
        OutboundService {
            name: "backend".into(),
            namespace: "shop".into(),
            addresses: vec![CLUSTER_IP.parse().unwrap()],
            ports: vec![
                port(80, &format!("{SERVER_IP}:8080")),
                port(81, &format!("{SERVER_IP}:8081")),
            ],
            identities: vec![id("backend")],
            policy: None,
        },
        OutboundService {
            name: "backend6".into(),
            namespace: "shop".into(),
            addresses: vec![CLUSTER_IP6.parse().unwrap()],
            ports: vec![port(80, &format!("[{SERVER_IP6}]:8080"))],
            identities: vec![id("backend")],
            policy: None,
        },
    ]
}

/// The whole scene of one test.
struct Scene {
    net: Net,
    seen: std::path::PathBuf,
    _app: Proc,
    server: PodProxy,
    client: PodProxy,
    _tmp: tempfile::TempDir,
}

impl Scene {
    fn new(tag: &str, server_flags: &[&str]) -> Scene {
        let net = Net::new(tag, &[]);
        let tmp = tempfile::tempdir().unwrap();
        let seen = tmp.path().join("seen");
        std::fs::write(&seen, "").unwrap();
        let app = start_app(&net.server, &["[::]:8080", "127.0.0.1:8081"], &seen);
        let pki = Pki::new("mesh");
        let ccfg = config("client-1", inbound(MtlsMode::Strict), services());
        let scfg = config("server-1", inbound(MtlsMode::Strict), vec![]);
        let server = PodProxy::start(
            &net.server,
            &pki,
            &id("backend"),
            &scfg,
            tmp.path(),
            server_flags,
        );
        let client = PodProxy::start(&net.client, &pki, &id("web"), &ccfg, tmp.path(), &[]);
        Scene {
            net,
            seen,
            _app: app,
            server,
            client,
            _tmp: tmp,
        }
    }

    /// Every request the server pod's application has seen, one line each.
    fn seen(&self) -> String {
        std::fs::read_to_string(&self.seen).unwrap()
    }

    /// A request from the client pod's application to a Service address, through both
    /// sidecars.
    fn meshed(&self, addr: &str, host: &str, path: &str) -> Option<String> {
        http(&self.net.client, None, "GET", addr, host, path)
    }

    fn logs(&self) -> String {
        format!(
            "client log:\n{}\nserver log:\n{}",
            self.client.log_text(),
            self.server.log_text()
        )
    }

    /// The attackers: the unmeshed host and the node.
    fn outsiders(&self) -> [(&'static str, &str); 2] {
        [("outside", &self.net.outside), ("node", &self.net.node)]
    }
}

fn ok_from_app(resp: &Option<String>) -> bool {
    resp.as_deref()
        .is_some_and(|r| r.starts_with("HTTP/1.1 200") && r.contains("app on"))
}

macro_rules! skip_unless_root {
    ($name:literal) => {
        if let Some(why) = skip_reason() {
            eprintln!("SKIP {}: {why}", $name);
            return;
        }
    };
}

/// (a) The client pod's 15001 is no relay: a plain request to it from outside with
/// `Host: backend.shop:80` does not leave over mTLS with the pod's identity.
#[test]
fn relay_through_the_outbound_port_is_refused() {
    skip_unless_root!("relay_through_the_outbound_port_is_refused");
    let s = Scene::new("relay", &[]);
    for (who, ns) in s.outsiders() {
        for target in [
            format!("{CLIENT_IP}:15001"),
            format!("[{CLIENT_IP6}]:15001"),
        ] {
            for host in ["backend.shop:80", "backend.shop", "backend6.shop"] {
                let resp = http(ns, None, "GET", &target, host, "/relayed");
                assert!(
                    resp.as_deref().is_none_or(|r| !r.contains("app on")),
                    "{who} relayed through {target} with Host {host}: {resp:?}"
                );
            }
        }
    }
    assert_eq!(s.seen(), "", "the Strict destination saw relayed requests");
    // The same request from the client pod's application, redirected by iptables, works.
    let resp = s.meshed(&format!("{CLUSTER_IP}:80"), "backend.shop", "/mine");
    assert!(ok_from_app(&resp), "{resp:?}\n{}", s.logs());
}

/// (b) `POST /shutdown` and `GET /config` on 15020 answer 403 to anyone but loopback, the
/// proxy keeps serving, and the kubelet's and Prometheus's routes stay public.
#[test]
fn admin_state_and_config_are_loopback_only() {
    skip_unless_root!("admin_state_and_config_are_loopback_only");
    let mut s = Scene::new("admin", &[]);
    for (who, ns) in s.outsiders() {
        for (ip, pod) in [(SERVER_IP, &s.server), (CLIENT_IP, &s.client)] {
            let admin = format!("{ip}:15020");
            let shut = http(ns, None, "POST", &admin, "admin", "/shutdown");
            assert!(
                shut.as_deref()
                    .is_some_and(|r| r.starts_with("HTTP/1.1 403")),
                "{who} POST /shutdown on {}: {shut:?}",
                pod.ns
            );
            let cfg = http(ns, None, "GET", &admin, "admin", "/config");
            assert!(
                cfg.as_deref()
                    .is_some_and(|r| r.starts_with("HTTP/1.1 403") && !r.contains("backend")),
                "{who} GET /config on {}: {cfg:?}",
                pod.ns
            );
            for public in ["/ready", "/live", "/metrics"] {
                let r = http(ns, None, "GET", &admin, "admin", public);
                assert!(
                    r.as_deref().is_some_and(|r| r.starts_with("HTTP/1.1 200")),
                    "{who} GET {public}: {r:?}"
                );
            }
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        s.server.proc.alive() && s.client.proc.alive(),
        "{}",
        s.logs()
    );
    let resp = s.meshed(&format!("{CLUSTER_IP}:80"), "backend.shop", "/after");
    assert!(ok_from_app(&resp), "{resp:?}\n{}", s.logs());
    // Inside the pod, over loopback, both still answer.
    let cfg = s.client.admin("GET", "/config").unwrap_or_default();
    assert!(
        cfg.starts_with("HTTP/1.1 200") && cfg.contains("backend"),
        "{cfg}"
    );
    let shut = s.server.admin("POST", "/shutdown").unwrap_or_default();
    assert!(shut.starts_with("HTTP/1.1 200"), "{shut}");
    let status = s.server.proc.terminate();
    assert!(status.success(), "{status:?}");
}

/// (c) Inbound traffic goes to the pod IP, never to 127.0.0.1: a server bound only to
/// loopback is not reachable through the mesh, one bound to all addresses is.
#[test]
fn loopback_only_server_is_not_reachable_through_the_mesh() {
    skip_unless_root!("loopback_only_server_is_not_reachable_through_the_mesh");
    let s = Scene::new("loop", &[]);
    let resp = s.meshed(&format!("{CLUSTER_IP}:81"), "backend.shop", "/debug");
    assert!(
        !ok_from_app(&resp),
        "loopback-only server reached: {resp:?}"
    );
    assert!(!s.seen().contains("127.0.0.1:8081"), "{}", s.seen());
    let resp = s.meshed(&format!("{CLUSTER_IP}:80"), "backend.shop", "/public");
    assert!(ok_from_app(&resp), "{resp:?}\n{}", s.logs());
    assert!(s.seen().contains("[::]:8080"), "{}", s.seen());
}

/// The documented escape hatch (`trellis.dev/inbound-to-localhost: "true"`, passed to the
/// proxy as `--inbound-to-localhost`) keeps forwarding to loopback for apps that need it.
#[test]
fn inbound_to_localhost_reaches_a_loopback_only_server() {
    skip_unless_root!("inbound_to_localhost_reaches_a_loopback_only_server");
    let s = Scene::new("tolo", &["--inbound-to-localhost"]);
    let resp = s.meshed(&format!("{CLUSTER_IP}:81"), "backend.shop", "/debug");
    assert!(ok_from_app(&resp), "{resp:?}\n{}", s.logs());
    assert!(s.seen().contains("127.0.0.1:8081"), "{}", s.seen());
}

/// (d) Dual stack: an IPv6 client reaches an IPv6 server through both sidecars, over mTLS.
#[test]
fn ipv6_client_reaches_ipv6_server_through_both_sidecars() {
    skip_unless_root!("ipv6_client_reaches_ipv6_server_through_both_sidecars");
    let s = Scene::new("six", &[]);
    let resp = s.meshed(&format!("[{CLUSTER_IP6}]:80"), "backend6.shop", "/six");
    assert!(ok_from_app(&resp), "{resp:?}\n{}", s.logs());
    let m = s.server.admin("GET", "/metrics").unwrap_or_default();
    assert!(
        m.lines().any(
            |l| l.starts_with("trellis_proxy_requests_total{direction=\"inbound\"")
                && l.contains(&format!("peer_identity=\"{}\"", id("web")))
                && l.contains("tls=\"true\"")
        ),
        "{m}"
    );
    // IPv4 keeps working beside it.
    let resp = s.meshed(&format!("{CLUSTER_IP}:80"), "backend.shop", "/four");
    assert!(ok_from_app(&resp), "{resp:?}\n{}", s.logs());
}

/// (e) Direct connections from outside the pod to the proxy's own ports are dropped (no
/// handshake at all), on both families, while redirected traffic still flows and the admin
/// port still answers.
#[test]
fn direct_connections_to_proxy_ports_are_dropped() {
    skip_unless_root!("direct_connections_to_proxy_ports_are_dropped");
    let s = Scene::new("drop", &[]);
    for (who, ns) in s.outsiders() {
        for target in [
            format!("{SERVER_IP}:15006"),
            format!("{SERVER_IP}:15001"),
            format!("{CLIENT_IP}:15001"),
            format!("{CLIENT_IP}:15006"),
            format!("[{SERVER_IP6}]:15006"),
            format!("[{CLIENT_IP6}]:15001"),
        ] {
            assert_eq!(
                tcp_connect(ns, &target),
                Connect::TimedOut,
                "{who} -> {target} was not dropped"
            );
        }
        assert_eq!(
            tcp_connect(ns, &format!("{SERVER_IP}:15020")),
            Connect::Established
        );
    }
    let resp = s.meshed(&format!("{CLUSTER_IP}:80"), "backend.shop", "/still");
    assert!(ok_from_app(&resp), "{resp:?}\n{}", s.logs());
}

/// An unmeshed host floods the server pod with TLS handshakes it never finishes (through the
/// real `PREROUTING` redirect to 15006): past the per-address cap its connections are closed at
/// once, the client pod's requests are still served meanwhile, and once the flood ends the host
/// may connect again.
#[test]
fn a_handshake_flood_from_outside_is_capped_and_the_mesh_is_served() {
    skip_unless_root!("a_handshake_flood_from_outside_is_capped_and_the_mesh_is_served");
    const PER_PEER: usize = 8;
    let s = Scene::new(
        "flood",
        &[&format!("--inbound-max-pending-per-peer={PER_PEER}")],
    );
    let app = format!("{SERVER_IP}:8080");
    let flood = Flood::start(&s.net.outside, &app, PER_PEER, 3);
    assert!(
        flood.held,
        "the flood's own connections were closed\n{}",
        s.logs()
    );
    assert_eq!(
        flood.extra_closed,
        [true; 3],
        "connections over the cap were not closed at once\n{}",
        s.logs()
    );
    for i in 0..3 {
        let resp = s.meshed(
            &format!("{CLUSTER_IP}:80"),
            "backend.shop",
            &format!("/during/{i}"),
        );
        assert!(ok_from_app(&resp), "{resp:?}\n{}", s.logs());
    }
    let metrics = s.server.admin("GET", "/metrics").unwrap_or_default();
    assert!(
        metrics.contains("trellis_proxy_inbound_refused_total{reason=\"too_many_pending\"} 3"),
        "{metrics}"
    );
    flood.end();
    // The proxy sees the flood's connections close and gives their places back.
    let mut admitted = false;
    for _ in 0..20 {
        if Flood::start(&s.net.outside, &app, 1, 0).held {
            admitted = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(admitted, "the host stayed locked out after its flood ended");
}

/// Entry point of the helper processes; does nothing unless started by a test above.
#[test]
#[ignore = "helper process for the tests in this file"]
fn netns_helper() {
    helper_main();
}

/// Two hosts outside the mesh, each within its per-address cap, together fill the total of
/// unauthenticated connections with TLS handshakes they never finish (through the real
/// `PREROUTING` redirect). The client pod's requests are still served: its handshake takes the
/// place of the oldest stalled one, which is closed.
#[test]
fn stalled_handshakes_from_two_hosts_cannot_fill_the_total() {
    skip_unless_root!("stalled_handshakes_from_two_hosts_cannot_fill_the_total");
    const PER_PEER: usize = 4;
    let s = Scene::new(
        "fill",
        &[
            &format!("--inbound-max-pending-per-peer={PER_PEER}"),
            &format!("--inbound-max-pending={}", 2 * PER_PEER),
        ],
    );
    let app = format!("{SERVER_IP}:8080");
    let floods: Vec<Flood> = s
        .outsiders()
        .iter()
        .map(|(_, ns)| Flood::start(ns, &app, PER_PEER, 0))
        .collect();
    assert!(
        floods.iter().all(|f| f.held),
        "a flood's own connections were closed before the total was full\n{}",
        s.logs()
    );
    for i in 0..3 {
        let resp = s.meshed(
            &format!("{CLUSTER_IP}:80"),
            "backend.shop",
            &format!("/full/{i}"),
        );
        assert!(ok_from_app(&resp), "{resp:?}\n{}", s.logs());
    }
    let metrics = s.server.admin("GET", "/metrics").unwrap_or_default();
    assert!(
        metrics.contains("trellis_proxy_inbound_refused_total{reason=\"pending_evicted\"}"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("reason=\"too_many_pending\""),
        "no host went past its own cap: {metrics}"
    );
    for f in floods {
        f.end();
    }
}
