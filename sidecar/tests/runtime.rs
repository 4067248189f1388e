//! The runtime the real `trellis-proxy` binary picks (see `trellis_proxy::workers`): two
//! binaries, each on tokio's current-thread runtime (one by default, one by `--concurrency 1`
//! over a larger CPU allowance), carry keep-alive HTTP over mTLS to a real upstream, and report
//! their runtime on `/metrics`.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use trellis_proxy::config::{MtlsMode, Protocol};

/// A spawned proxy, killed on drop.
struct Proxy {
    child: Child,
    admin: SocketAddr,
    log: std::path::PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn admin_get(&self, path: &str) -> Option<(StatusCode, String)> {
        let r = h1_send(self.admin, get("admin", path)).await.ok()?;
        Some((r.0, String::from_utf8_lossy(&r.2).into_owned()))
    }

    async fn wait_ready(&mut self) {
        for _ in 0..500 {
            if let Some((StatusCode::OK, _)) = self.admin_get("/ready").await {
                return;
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("proxy exited ({st}): {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("proxy not ready: {}", self.log());
    }
}

/// A port nothing listens on right now (the binary needs fixed addresses; the race with other
/// tests binding the same port in between is small).
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Spawn<'a> {
    pki: &'a Pki,
    spiffe_id: String,
    cfg: trellis_proxy::config::ProxyConfig,
    outbound: SocketAddr,
    inbound: SocketAddr,
    inbound_target: Option<SocketAddr>,
    args: &'a [&'a str],
    env: &'a [(&'a str, &'a str)],
}

fn spawn(s: Spawn, dir: &std::path::Path) -> Proxy {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca.pem"), &s.pki.ca_pem).unwrap();
    kubelet_write(dir, 1, &s.cfg.to_json_pretty(), "app=\"test\"\n");
    let (cert, key) = s.pki.leaf(&s.spiffe_id);
    let admin = free_port();
    let log = dir.join("proxy.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trellis-proxy"));
    cmd.arg("--dir")
        .arg(dir)
        .arg("--cert-file")
        .arg(cert)
        .arg("--key-file")
        .arg(key)
        .args(["--outbound-addr", &s.outbound.to_string()])
        .args(["--inbound-addr", &s.inbound.to_string()])
        .args(["--admin-addr", &admin.to_string()])
        .args([
            "--local-mode",
            "--log-format",
            "text",
            "--log-level",
            "info",
        ]);
    if let Some(t) = s.inbound_target {
        cmd.args(["--inbound-target", &t.to_string()]);
    }
    // Only what the test sets: the runner's environment must not size these runtimes.
    cmd.env_remove(trellis_proxy::workers::ENV_CONCURRENCY)
        .env_remove(trellis_proxy::workers::ENV_CPU_MILLIS)
        .env_remove("TOKIO_WORKER_THREADS")
        .env("NO_COLOR", "1");
    for (k, v) in s.env {
        cmd.env(k, v);
    }
    cmd.args(s.args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    Proxy {
        child: cmd.spawn().unwrap(),
        admin,
        log,
    }
}

#[tokio::test]
async fn current_thread_proxies_carry_traffic_and_report_their_runtime() {
    let pki = Pki::new("runtime-ca");
    let tmp = tempfile::tempdir().unwrap();
    let up = upstream(Speaks::Both).await;
    let server_inbound = free_port();
    // The server: a 4-core allowance, overridden to one worker.
    let mut server = spawn(
        Spawn {
            pki: &pki,
            spiffe_id: id("backend"),
            cfg: config("s1", inbound(MtlsMode::Strict), vec![]),
            outbound: free_port(),
            inbound: server_inbound,
            inbound_target: Some(up),
            args: &["--concurrency", "1"],
            env: &[(trellis_proxy::workers::ENV_CPU_MILLIS, "4000")],
        },
        &tmp.path().join("server"),
    );
    // The client: nothing set, the default.
    let client_outbound = free_port();
    let mut client = spawn(
        Spawn {
            pki: &pki,
            spiffe_id: id("web"),
            cfg: config(
                "c1",
                inbound(MtlsMode::Strict),
                vec![service(
                    "backend",
                    8080,
                    Protocol::Http1,
                    server_inbound,
                    vec![id("backend")],
                )],
            ),
            outbound: client_outbound,
            inbound: free_port(),
            inbound_target: None,
            args: &[],
            env: &[],
        },
        &tmp.path().join("client"),
    );
    server.wait_ready().await;
    client.wait_ready().await;

    // 200 requests on one keep-alive connection, then 20 on fresh ones.
    let tcp = TcpStream::connect(client_outbound).await.unwrap();
    let (mut sr, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    for i in 0..200 {
        let resp = sr
            .send_request(get("backend.shop:8080", "/echo"))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "request {i}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(echo_json(&body)["path"], "/echo", "request {i}");
    }
    for i in 0..20 {
        let r = h1_send(client_outbound, get("backend.shop:8080", "/echo"))
            .await
            .unwrap();
        assert_eq!(r.0, StatusCode::OK, "fresh connection {i}");
    }
    // The server saw them over mTLS from the client's identity.
    let (_, m) = server.admin_get("/metrics").await.unwrap();
    let web = id("web");
    assert_eq!(
        metric_value(
            &m,
            &["direction=\"inbound\"", &web, "status_code=\"200\""],
            "trellis_proxy_requests_total"
        ),
        Some(220.0),
        "{m}"
    );

    for (name, p, source) in [
        ("server", &server, "source=--concurrency"),
        ("client", &client, "source=default"),
    ] {
        let (_, m) = p.admin_get("/metrics").await.unwrap();
        assert_eq!(
            metric_value(
                &m,
                &["flavor=\"current_thread\""],
                "trellis_proxy_runtime_workers"
            ),
            Some(1.0),
            "{name}: {m}"
        );
        assert_eq!(
            metric_value(&m, &["multi_thread"], "trellis_proxy_runtime_workers"),
            None,
            "{name}"
        );
        let log = p.log();
        assert!(
            log.lines()
                .any(|l| l.contains("runtime") && l.contains("workers=1") && l.contains(source)),
            "{name}: {log}"
        );
    }
}

/// A CPU allowance above one core gives the multi-thread runtime, with as many workers as whole
/// cores (capped by the machine), and still carries traffic.
#[tokio::test]
async fn an_allowance_above_one_core_runs_multi_thread() {
    let pki = Pki::new("runtime-ca");
    let tmp = tempfile::tempdir().unwrap();
    let up = upstream(Speaks::Both).await;
    let inbound_addr = free_port();
    let mut server = spawn(
        Spawn {
            pki: &pki,
            spiffe_id: id("backend"),
            cfg: config("s1", inbound(MtlsMode::Permissive), vec![]),
            outbound: free_port(),
            inbound: inbound_addr,
            inbound_target: Some(up),
            args: &[],
            env: &[(trellis_proxy::workers::ENV_CPU_MILLIS, "1500")],
        },
        &tmp.path().join("server"),
    );
    server.wait_ready().await;
    // Plaintext under Permissive reaches the upstream through the inbound side.
    let r = h1_send(inbound_addr, get("backend.shop:8080", "/echo"))
        .await
        .unwrap();
    assert_eq!(r.0, StatusCode::OK);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let (flavor, workers) = if cores >= 2 {
        ("multi_thread", 2.0)
    } else {
        ("current_thread", 1.0)
    };
    let (_, m) = server.admin_get("/metrics").await.unwrap();
    assert_eq!(
        metric_value(
            &m,
            &[&format!("flavor=\"{flavor}\"")],
            "trellis_proxy_runtime_workers"
        ),
        Some(workers),
        "{m}"
    );
    assert!(
        server.log().contains("CPU allowance 1500m"),
        "{}",
        server.log()
    );
}
