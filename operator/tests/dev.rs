//! `trellis dev` end to end: the built `trellis` binary runs the example mesh on loopback (real
//! CA, compiler, sidecars and demo programs), every edge must carry mTLS traffic, switching the
//! namespace's PeerAuthentication to `Strict` must make the sidecars refuse a plaintext request,
//! a broken edit must leave the running config alone, and SIGTERM must leave no process and no
//! file behind.

mod dev_ports;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use trellis_operator::dev::metrics;
use trellis_operator::dev::plan::Plan;
use trellis_operator::dev::spec;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/demo");

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// `GET path` over a fresh connection; `None` when no HTTP response came back.
fn http_get(addr: SocketAddr, host: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    text.starts_with("HTTP/1.").then_some(text)
}

fn body_of(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("")
}

/// Processes (other than zombies) whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'));
        if cmd.contains(needle) && !zombie {
            out.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
        }
    }
    out
}

struct Dev {
    child: Child,
    out: PathBuf,
}

impl Dev {
    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        // Only reached when the test failed before its own SIGTERM: do not leak the mesh.
        if self.child.try_wait().ok().flatten().is_none() {
            if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if self.child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn start(dir: &Path, base: u16, state: &Path, out: &Path, extra: &[&str]) -> Dev {
    let log = std::fs::File::create(out).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .arg("dev")
        .arg(dir)
        .args(["--base-port", &base.to_string()])
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    Dev {
        child,
        out: out.to_path_buf(),
    }
}

/// Successful mTLS requests (opaque TCP: connections) each sidecar of `source` sent to `dst`,
/// from its `/metrics`, read as trellis dev's own view reads them.
fn mtls_successes(plan: &Plan, source: &str, dst: &str) -> f64 {
    let mut total = 0.0;
    for pod in plan.pods.iter().filter(|p| p.workload_key() == source) {
        let Some(px) = pod.proxy else { continue };
        let Some(resp) = http_get(
            SocketAddr::from(([127, 0, 0, 1], px.admin)),
            "localhost",
            "/metrics",
        ) else {
            continue;
        };
        let Ok(samples) = metrics::parse(body_of(&resp)) else {
            continue;
        };
        total += trellis_operator::dev::stats::edges_from_scrape(source, &samples)
            .iter()
            .filter(|(k, _)| k.mtls && k.destination == dst)
            .map(|(_, c)| c.successes)
            .sum::<f64>();
    }
    total
}

/// The example mesh copied into a temp dir, with its plan on free ports.
struct Example {
    tmp: tempfile::TempDir,
    dir: PathBuf,
    state: PathBuf,
    loaded: spec::DevDir,
    base: u16,
    plan: Plan,
}

fn example() -> Example {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mesh");
    copy_dir(Path::new(EXAMPLE), &dir);
    let state = tmp.path().join("state");
    let loaded = spec::load_dir(&dir).expect("the example loads");
    let probe = Plan::new(&loaded.topology, 20000, &state).unwrap();
    let base = dev_ports::free_base(probe.ports().len() as u16);
    let plan = Plan::new(&loaded.topology, base, &state).unwrap();
    Example {
        tmp,
        dir,
        state,
        loaded,
        base,
        plan,
    }
}

#[test]
fn dev_runs_the_example_mesh_enforces_strict_and_cleans_up() {
    let Example {
        tmp,
        dir,
        state,
        loaded,
        base,
        plan,
    } = example();
    let mut dev = start(&dir, base, &state, &tmp.path().join("out.txt"), &[]);

    // 1. Every declared edge of a meshed workload carries successful mTLS traffic.
    let mut edges: Vec<(String, String)> = Vec::new();
    for s in &loaded.topology.services {
        for c in &s.calls {
            edges.push((s.key(), c.clone()));
        }
    }
    for c in loaded.topology.clients.iter().filter(|c| c.meshed) {
        edges.push((c.key(), c.target.clone()));
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut missing = edges.clone();
    while Instant::now() < deadline && !missing.is_empty() {
        if let Some(st) = dev.child.try_wait().unwrap() {
            panic!("trellis dev exited early ({st}):\n{}", dev.output());
        }
        missing.retain(|(s, d)| mtls_successes(&plan, s, d) <= 0.0);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        missing.is_empty(),
        "edges without mTLS traffic: {missing:?}\n{}",
        dev.output()
    );

    // 2. Permissive: a plaintext request straight at a frontend pod's sidecar is answered.
    let frontend = plan
        .replicas_of("frontend.shop")
        .next()
        .unwrap()
        .proxy
        .unwrap();
    let inbound = SocketAddr::from(([127, 0, 0, 1], frontend.inbound));
    let resp = http_get(inbound, "frontend.shop:8080", "/").expect("plaintext answered");
    assert!(resp.contains("frontend-0"), "{resp}");

    // 3. Strict in the namespace: the same request is refused, with no HTTP answer.
    let pa = dir.join("peer-authentication.yaml");
    let text = std::fs::read_to_string(&pa).unwrap();
    let strict = text.replace("mode: Permissive", "mode: Strict");
    assert_ne!(text, strict);
    std::fs::write(&pa, strict).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut refused = false;
    while Instant::now() < deadline {
        if http_get(inbound, "frontend.shop:8080", "/").is_none() {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        refused,
        "plaintext still answered 20s after Strict\n{}",
        dev.output()
    );
    // ... while mTLS traffic keeps flowing.
    let before = mtls_successes(&plan, "load.shop", "frontend.shop");
    std::thread::sleep(Duration::from_secs(2));
    assert!(mtls_successes(&plan, "load.shop", "frontend.shop") > before);

    // 4. A broken edit is refused and changes nothing.
    let cfg = state.join("pods/shop/frontend-0/config.json");
    let applied = std::fs::read(&cfg).unwrap();
    std::fs::write(dir.join("traffic-policies.yaml"), "kind: [unclosed\n").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(std::fs::read(&cfg).unwrap(), applied);
    assert!(http_get(inbound, "frontend.shop:8080", "/").is_none());

    // 5. SIGTERM: everything stops, nothing is left.
    let pid = rustix::process::Pid::from_raw(dev.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = dev.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "trellis dev did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = dev.output();
    assert!(status.success(), "{status}\n{out}");
    assert!(out.contains("edit refused"), "{out}");
    // Certificates came from the identity endpoint, whose TokenReview stand-in is announced.
    assert!(
        out.contains(&format!("identity endpoint https://127.0.0.1:{base}"))
            && out.contains("local stand-in"),
        "{out}"
    );
    // The live view saw it too: the plaintext client's requests were refused.
    assert!(out.contains("plaintext, refused so far"), "{out}");
    let needle = state.display().to_string();
    let mut left = processes_mentioning(&needle);
    for _ in 0..20 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        left = processes_mentioning(&needle);
    }
    assert!(left.is_empty(), "processes left: {left:?}");
    assert!(!state.exists(), "state dir removed");
}

#[test]
fn a_killed_trellis_dev_leaves_no_process_behind() {
    let Example {
        tmp,
        dir,
        state,
        loaded: _,
        base,
        plan,
    } = example();
    let mut dev = start(&dir, base, &state, &tmp.path().join("out.txt"), &[]);
    // Wait until the mesh carries mTLS traffic: every sidecar and app is up by then.
    let deadline = Instant::now() + Duration::from_secs(90);
    while mtls_successes(&plan, "load.shop", "frontend.shop") <= 0.0 {
        if let Some(st) = dev.child.try_wait().unwrap() {
            panic!("trellis dev exited early ({st}):\n{}", dev.output());
        }
        assert!(
            Instant::now() < deadline,
            "the mesh never carried traffic:\n{}",
            dev.output()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let children = live_children_of(dev.child.id());
    assert!(
        children.len() >= plan.pods.len(),
        "expected a process per pod at least, found {children:?}"
    );
    // SIGKILL: no shutdown code runs; the kernel's parent-death signal must stop the children.
    dev.child.kill().unwrap();
    dev.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let alive = || {
        children
            .iter()
            .filter(|pid| is_alive(**pid))
            .copied()
            .collect::<Vec<_>>()
    };
    let mut left = alive();
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        left = alive();
    }
    assert!(
        left.is_empty(),
        "children still running after SIGKILL: {left:?}"
    );
}

/// `(pid, state, ppid)` of every process.
fn processes() -> Vec<(u32, char, u32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = f.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        out.push((pid, state, ppid));
    }
    out
}

fn live_children_of(parent: u32) -> Vec<u32> {
    processes()
        .into_iter()
        .filter(|(_, state, ppid)| *ppid == parent && *state != 'Z')
        .map(|(pid, ..)| pid)
        .collect()
}

/// Running (not gone, not a zombie waiting for a reaper).
fn is_alive(pid: u32) -> bool {
    processes()
        .into_iter()
        .any(|(p, state, _)| p == pid && state != 'Z')
}

#[test]
fn a_taken_port_is_named_before_anything_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let hold = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hold.local_addr().unwrap().port();
    let state = tmp.path().join("state");
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["dev", EXAMPLE, "--once", "--base-port"])
        .arg(port.to_string())
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("port {port} (identity endpoint)")),
        "{err}"
    );
    assert!(!state.exists(), "nothing created");
}

#[test]
fn a_bad_directory_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mesh");
    copy_dir(Path::new(EXAMPLE), &dir);
    std::fs::write(
        dir.join("extra.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .arg("dev")
        .arg(&dir)
        .arg("--once")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("extra.yaml: document 1") && err.contains("VirtualService"),
        "{err}"
    );
}
