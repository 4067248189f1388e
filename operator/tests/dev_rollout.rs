//! The sidecar rollout in `trellis dev`, end to end: the built `trellis` binary runs the example
//! mesh, its clients send constant traffic at `frontend` (the meshed `load` client at 20 rps
//! through its sidecar, the plaintext `legacy` client straight at the frontend pods) and at the
//! opaque TCP `cache` (the meshed `warmer` client, 5 connections/s), and the test edits the
//! proxy version in `mesh.yaml`.
//! - A healthy version: every local proxy must end on it (its process started as that version
//!   and its admin port says so), and not one client request may fail across the whole run.
//! - A version `--fail-version` makes bad: the health gate must stop the rollout after the first
//!   batch, say why, and leave the workloads of later batches on the old version.

mod dev_ports;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use trellis_operator::dev::plan::Plan;
use trellis_operator::dev::spec;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/demo");
const OLD: &str = "ghcr.io/trellis-mesh/trellis-proxy:0.1.0";
/// Bound of one rollout (four batches of the example's seven meshed workloads, each with a 5 s
/// baseline and a 5 s gate window, its replicas replaced one at a time) on a loaded CI machine.
const ROLLOUT_BOUND: Duration = Duration::from_secs(130);

/// One local mesh at a time: each runs some twenty processes, and two at once on a small CI
/// machine starve both (a starved proxy times out requests, which this test would count).
static ONE_MESH: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_mesh() -> std::sync::MutexGuard<'static, ()> {
    ONE_MESH.lock().unwrap_or_else(|e| e.into_inner())
}

fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// A running `trellis dev` on a copy of the example.
struct Dev {
    child: Child,
    out: PathBuf,
    dir: PathBuf,
    state: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Dev {
    /// Starts on a copy of the example, each file passed through `edit(name, text)`.
    fn start(extra: &[&str], edit: impl Fn(&str, &str) -> String) -> Dev {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("mesh");
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(EXAMPLE).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(e.path()).unwrap();
            std::fs::write(dir.join(&name), edit(&name, &text)).unwrap();
        }
        let state = tmp.path().join("state");
        let loaded = spec::load_dir(&dir).expect("the example loads");
        let probe = Plan::new(&loaded.topology, 20000, &state).unwrap();
        let base = dev_ports::free_base(probe.ports().len() as u16);
        let out = tmp.path().join("out.txt");
        let log = std::fs::File::create(&out).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_trellis"))
            .arg("dev")
            .arg(&dir)
            .args(["--base-port", &base.to_string()])
            .arg("--state-dir")
            .arg(&state)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        Dev {
            child,
            out,
            dir,
            state,
            _tmp: tmp,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// The last snapshot printed (they start with `--- <n>s`).
    fn last_frame(&self) -> String {
        let out = self.output();
        out.rsplit_once("\n--- ")
            .map(|x| x.1.to_string())
            .unwrap_or_default()
    }

    fn set_version(&self, version: &str) {
        let mesh = self.dir.join("mesh.yaml");
        let text = std::fs::read_to_string(&mesh).unwrap();
        let edited = text.replace(OLD, version);
        assert_ne!(text, edited, "the example names {OLD}");
        std::fs::write(&mesh, edited).unwrap();
    }

    /// Waits until the last frame satisfies `done`; panics with the output after `bound`.
    fn wait_frame(&mut self, what: &str, bound: Duration, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("trellis dev exited early ({st}):\n{}", self.output());
            }
            let frame = self.last_frame();
            if done(&frame) {
                return frame;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!(
            "{what}: not within {}s; output:\n{}",
            bound.as_secs(),
            self.output()
        );
    }

    /// Every running proxy of this mesh: (pod name, the version its process was started as,
    /// the version its admin port reports).
    fn proxies(&self) -> Vec<(String, String, Option<String>)> {
        let needle = self.state.join("pods").display().to_string();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmd
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let zombie = std::fs::read_to_string(e.path().join("stat"))
                .unwrap_or_default()
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'));
            if zombie
                || args.get(1).map(String::as_str) != Some("proxy")
                || !args.iter().any(|a| a.starts_with(&needle))
            {
                continue;
            }
            let flag = |name: &str| {
                args.iter()
                    .position(|a| a == name)
                    .and_then(|i| args.get(i + 1).cloned())
                    .unwrap_or_default()
            };
            let admin: SocketAddr = flag("--admin-addr").parse().unwrap();
            let reported = http_get(admin, "/metrics").and_then(|m| {
                let line = m
                    .lines()
                    .find(|l| l.starts_with("trellis_proxy_build_info{"))?
                    .to_string();
                Some(line.split('"').nth(1)?.to_string())
            });
            out.push((flag("--pod-name"), flag("--proxy-version"), reported));
        }
        out.sort();
        out
    }

    /// Warnings, errors and 5xx access-log lines in the children's logs (trellis dev removes
    /// them when it stops), to explain a failed request.
    fn log_problems(&self) -> String {
        let mut out = String::new();
        let Ok(dir) = std::fs::read_dir(self.state.join("logs")) else {
            return out;
        };
        for e in dir.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            for l in text
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("\"status\":5"))
            {
                out.push_str(&format!("{}: {l}\n", e.file_name().to_string_lossy()));
            }
        }
        out
    }

    /// SIGTERM, wait for the exit, and the final summary.
    fn stop(self) -> String {
        self.stop_with_output().0
    }

    /// SIGTERM, wait for the exit: the final summary and the whole output.
    fn stop_with_output(mut self) -> (String, String) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "trellis dev did not stop");
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = self.output();
        let summary = out
            .rsplit_once("=== trellis dev:")
            .map(|x| x.1.to_string())
            .unwrap_or_else(|| out.clone());
        (summary, out)
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
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

/// `(ok, failed)` of a client's whole-run line in a frame.
fn client_counts(frame: &str, client: &str) -> Option<(f64, f64)> {
    let line = frame
        .lines()
        .find(|l| l.starts_with(&format!("CLIENT {client} ")))?;
    let num = |after: &str| -> Option<f64> {
        line.split(after)
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((num(" ok ")?, num(" failed ")?))
}

/// The example with three sources of failure that are not the rollout's taken out, since this
/// test counts every failed request: the gate is made deaf to latency (a loaded CI machine moves
/// a 5 s window's p99 by more than any factor), the catalog replica that fails 30 % of
/// requests on purpose stops failing (retries hide most of its failures, but not all when
/// the machine is starved and tries time out), and catalog's timeouts are loosened (a starved
/// machine stalled every catalog replica past a 500 ms try and the 2 s deadline at once).
fn only_rollout_failures(name: &str, text: &str) -> String {
    match name {
        "mesh.yaml" => {
            let out = text.replace("maxP99Factor: 5", "maxP99Factor: 1000");
            assert_ne!(out, text, "the example's mesh.yaml sets maxP99Factor: 5");
            // Access logs, so that a failed request's hops show in `log_problems`.
            let image = format!("    image: {OLD}\n");
            let logged = out.replace(
                &image,
                &format!("{image}    accessLog:\n      enabled: true\n"),
            );
            assert_ne!(logged, out, "the example's mesh.yaml sets the proxy image");
            logged
        }
        "traffic-policies.yaml" => {
            // Catalog's 500 ms tries and 2 s deadline are for watching a retry locally; on a
            // starved machine a whole try set can miss them, with no rollout involved.
            let out = text
                .replace("request: 2s", "request: 8s")
                .replace("connect: 500ms", "connect: 2s")
                .replace("perTryTimeout: 500ms", "perTryTimeout: 2s");
            assert_ne!(out, text, "the example's catalog policy sets its timeouts");
            out
        }
        "services.yaml" => {
            let out = text.replace("failureRate: 0.3", "failureRate: 0");
            assert_ne!(out, text, "the example's catalog fails 30 %");
            out
        }
        _ => text.to_string(),
    }
}

#[test]
fn a_new_proxy_version_reaches_every_local_proxy_without_a_failed_request() {
    let _one = one_mesh();
    let new = "ghcr.io/trellis-mesh/trellis-proxy:0.2.0";
    let mut dev = Dev::start(&[], only_rollout_failures);
    let first = dev.wait_frame("traffic from both clients", Duration::from_secs(60), |f| {
        ["load.shop", "legacy.shop", "warmer.shop"]
            .iter()
            .all(|c| client_counts(f, c).is_some_and(|(ok, _)| ok > 0.0))
    });
    let sending_since = Instant::now();
    let (counted_at_first, _) = client_counts(&first, "load.shop").unwrap();
    let before = dev.proxies();
    assert_eq!(before.len(), 10, "one proxy per meshed pod: {before:?}");
    assert!(
        before
            .iter()
            .all(|(_, v, r)| v == OLD && r.as_deref() == Some(OLD)),
        "{before:?}"
    );

    dev.set_version(new);
    let frame = dev.wait_frame("the rollout completes", ROLLOUT_BOUND, |f| {
        f.contains("ROLLOUT Complete") && f.contains(&format!("desired {new}"))
    });
    assert!(
        frame.contains(&format!("pods by version: {new}=10")),
        "{frame}"
    );
    let after = dev.proxies();
    assert_eq!(after.len(), 10, "no proxy left over: {after:?}");
    for (pod, started_as, reports) in &after {
        assert_eq!(started_as, new, "{pod}: {after:?}");
        assert_eq!(reports.as_deref(), Some(new), "{pod}: {after:?}");
    }

    let problems = dev.log_problems();
    let sending_for = sending_since.elapsed().as_secs_f64();
    let (summary, output) = dev.stop_with_output();
    // Every request is counted, restarts included: a client stopped without finishing (or
    // killed) would take its uncounted requests, failed ones too, with it. `load` sends 20/s;
    // half of that allows for a starved machine delaying its ticks.
    let (ok, failed) = client_counts(&summary, "load.shop").unwrap();
    assert!(
        ok + failed - counted_at_first >= 0.5 * 20.0 * sending_for,
        "load.shop: {} requests counted over {sending_for:.0}s at 20/s:\n{summary}",
        ok + failed - counted_at_first
    );
    for client in ["load.shop", "legacy.shop", "warmer.shop"] {
        let (ok, failed) = client_counts(&summary, client)
            .unwrap_or_else(|| panic!("no counts for {client}:\n{summary}"));
        assert!(ok > 50.0, "{client} kept sending: {summary}");
        assert_eq!(
            failed, 0.0,
            "{client} lost requests; the whole run:\n{output}\nwarnings in the logs:\n{problems}"
        );
    }
}

#[test]
fn a_failing_version_pauses_the_rollout_with_the_reason_and_later_batches_untouched() {
    let _one = one_mesh();
    let bad = "ghcr.io/trellis-mesh/trellis-proxy:0.3.0-bad";
    let mut dev = Dev::start(&["--fail-version", bad], only_rollout_failures);
    dev.wait_frame(
        "traffic from the meshed client",
        Duration::from_secs(60),
        |f| client_counts(f, "load.shop").is_some_and(|(ok, _)| ok > 0.0),
    );
    dev.set_version(bad);
    let frame = dev.wait_frame("the gate pauses the rollout", ROLLOUT_BOUND, |f| {
        f.contains("ROLLOUT Paused") && f.contains("HealthGateFailed")
    });
    // The table says why: the failed workload and its success rate against the baseline.
    assert!(frame.contains("batch 1 of 4"), "{frame}");
    assert!(
        frame.contains("success rate") && frame.contains("below the baseline"),
        "{frame}"
    );
    // Batch 1 is cache and catalog (canary-less, by name); the later batches never started.
    std::thread::sleep(Duration::from_secs(3));
    let proxies = dev.proxies();
    assert_eq!(proxies.len(), 10, "{proxies:?}");
    for (pod, started_as, reports) in &proxies {
        let first_batch = pod.starts_with("cache-") || pod.starts_with("catalog-");
        let want = if first_batch { bad } else { OLD };
        assert_eq!(started_as, want, "{pod}: {proxies:?}\n{frame}");
        assert_eq!(reports.as_deref(), Some(want), "{pod}: {proxies:?}");
    }
    let frame = dev.last_frame();
    assert!(frame.contains("ROLLOUT Paused"), "still paused: {frame}");
    dev.stop();
}
