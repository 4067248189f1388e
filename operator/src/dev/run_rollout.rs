//! The local rollout's edge: runs [`crate::dev::rollout::pass`] (the cluster's planner and
//! gate) on what `trellis dev` observes of its own proxies, and carries out the restarts it
//! plans, one replica at a time with one surge replica per workload:
//! 1. *Starting*: a new proxy (as the new version) and a new app on the pod's spare ports; the
//!    old pair keeps serving.
//! 2. *Moving*: once the new proxy answers `/ready` (and a service's app accepts), the pod's
//!    endpoint becomes the new ports: the config is recompiled and every running sidecar must
//!    report the new revision (`trellis_proxy_config_info`) before the old pair is touched,
//!    so no caller still routes to it.
//! 3. *Settling*: a moment for requests already sent to the old pair to finish.
//! 4. *Draining*: SIGTERM to the old pair, in the order that loses nothing: a service's proxy
//!    first (it drains its connections, then its app may go), a client's app first (it finishes
//!    its requests and writes its final counts, then its proxy may go). SIGKILL after
//!    [`DRAIN_BOUND`].

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::super::rollout::{self, LocalPod, LocalWorkload, PassInput};
use super::super::supervise::{self, Proc};
use super::super::{control, demo, metrics};
use super::{LocalMesh, Pod, Role, now_hms, pod_key};
use crate::api::mesh::RolloutStatus;
use crate::rollout::plan::{Action, Pin, Plan as RolloutPlan};

/// How often a pass starts (when the previous one is done): the cluster controller's tick,
/// shortened because nothing here waits on an API server.
const PASS_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for every sidecar to load the config that moves a pod's endpoint.
const MOVE_BOUND: Duration = Duration::from_secs(10);
/// After traffic moved: longer than any demo request takes, so none is cut short.
const SETTLE: Duration = Duration::from_secs(1);
/// Longest wait for the old pair to exit after SIGTERM (the proxy's drain timeout is 1 s).
const DRAIN_BOUND: Duration = Duration::from_secs(5);
/// Wait before replacing a pod again after its replacement failed to start.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Failures the table lists.
const FAILURES_SHOWN: usize = 3;

/// The local rollout's memory.
#[derive(Default)]
pub(super) struct Edge {
    /// The planner's memory (`status.rollout` in a cluster).
    pub status: Option<RolloutStatus>,
    pass: Option<JoinHandle<RolloutPlan>>,
    last_pass: Option<Instant>,
    /// Restarts under way, by workload key (`name.namespace`).
    restarts: BTreeMap<String, Restart>,
    /// Rollback pins, by workload key.
    pins: BTreeMap<String, Pin>,
    /// The version each meshed pod's proxy was started as, by pod key.
    pub versions: BTreeMap<String, String>,
    /// Edits of the Mesh since start: the planner's `generation`.
    pub generation: i64,
    /// Requests of client apps a restart replaced, by workload key.
    pub retired_counts: BTreeMap<String, Tally>,
    /// The latest counts of each running client app, by pod key.
    pub client_counts: BTreeMap<String, Tally>,
    /// See [`hold_ports`].
    pub held: Vec<tokio::net::TcpSocket>,
    /// The final-counts file of each running client app, by pod key.
    pub count_files: BTreeMap<String, PathBuf>,
    /// Generation of replacement processes, for unique log and count file names.
    spawned: u64,
}

struct Restart {
    version: String,
    queue: VecDeque<String>,
    current: Option<Swap>,
    /// After a replacement failed to start: when to try it again. Like a kubelet restarting
    /// a crashed container, the restart keeps trying; the planner's `progressDeadline` is what
    /// gives up on it.
    retry_at: Option<Instant>,
}

enum Phase {
    Starting,
    Moving { since: Instant },
    Settling { until: Instant },
    Draining { since: Instant },
}

/// One pod's replacement.
struct Swap {
    pod: String,
    version: String,
    /// The new pair until it takes the pod's place, then the old pair.
    proxy: Option<Proc>,
    app: Option<Proc>,
    /// A client app's final-counts file: the new app's until it takes the pod's place, then
    /// the old app's.
    final_counts: Option<PathBuf>,
    client: bool,
    phase: Phase,
    /// Names the replacement's log files.
    generation: u64,
}

/// A load client's requests by outcome (`ok`, `error`, `connect`, ...).
pub(super) type Tally = BTreeMap<String, f64>;

/// Holds every pod port of both slots, bound but not listening, for the whole run. A port a
/// replacement will need could otherwise be taken meanwhile as the local port of some outgoing
/// connection (the layout often lies in the kernel's ephemeral range), and the replacement
/// could not listen there: the kernel never picks a port a socket is bound to. The children
/// bind with `SO_REUSEADDR` like the holders, so they listen beside them; and a connection to
/// a held port nobody listens on is refused at once, as to a free one.
pub(super) fn hold_ports(plan: &super::super::plan::Plan) -> Vec<tokio::net::TcpSocket> {
    let slots = plan
        .pods
        .iter()
        .map(|p| (p.app_port, p.proxy))
        .chain(plan.spare.values().map(|s| (s.app, Some(s.proxy))));
    let mut out = Vec::new();
    for (app, proxy) in slots {
        let mut ports = vec![app];
        if let Some(x) = proxy {
            ports.extend([x.outbound, x.inbound, x.admin]);
        }
        for port in ports {
            let held = tokio::net::TcpSocket::new_v4().and_then(|s| {
                s.set_reuseaddr(true)?;
                s.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
                Ok(s)
            });
            // Best effort: an unheld port is only as exposed as it was before.
            if let Ok(s) = held {
                out.push(s);
            }
        }
    }
    out
}

/// The requests by outcome in a load client's counters.
pub(super) fn client_tally(samples: &[metrics::Sample]) -> Tally {
    let mut out = Tally::new();
    for s in samples.iter().filter(|s| s.name == demo::LOAD_REQUESTS) {
        let outcome = s.label("outcome").unwrap_or("unknown").to_string();
        *out.entry(outcome).or_default() += s.value;
    }
    out
}

fn add(into: &mut Tally, from: &Tally) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

impl LocalMesh {
    fn desired(&self) -> (String, crate::api::mesh::RolloutSpec) {
        let mesh = control::mesh_of(&self.dev);
        (
            mesh.spec.proxy.effective_image().to_owned(),
            mesh.spec.rollout,
        )
    }

    /// The version new proxies start as at `trellis dev` start.
    pub(super) fn initial_version(&self) -> String {
        self.desired().0
    }

    /// One step: advance the replacements, take a finished pass's plan, start the next pass.
    pub(super) async fn rollout_tick(&mut self) {
        let keys: Vec<String> = self.ro.restarts.keys().cloned().collect();
        for wk in keys {
            self.advance(&wk).await;
        }
        if self.ro.pass.as_ref().is_some_and(|h| h.is_finished()) {
            let handle = self.ro.pass.take().expect("checked above");
            match handle.await {
                Ok(plan) => self.apply(plan),
                Err(e) => self.note(format!("rollout pass failed: {e}")),
            }
        }
        let due = self.ro.last_pass.is_none_or(|t| t.elapsed() >= PASS_EVERY);
        if self.ro.pass.is_none() && due {
            self.ro.last_pass = Some(Instant::now());
            let input = self.pass_input();
            self.ro.pass = Some(tokio::spawn(rollout::pass(input)));
        }
    }

    fn local_workloads(&self) -> Vec<LocalWorkload> {
        let mut out: Vec<LocalWorkload> = Vec::new();
        for p in self.plan.pods.iter().filter(|p| p.proxy.is_some()) {
            let wk = p.workload_key();
            let pod = LocalPod {
                name: p.name.clone(),
                version: self
                    .ro
                    .versions
                    .get(&pod_key(p))
                    .cloned()
                    .unwrap_or_default(),
                ready: self.ready.get(&pod_key(p)).copied().unwrap_or(false),
                admin: SocketAddr::from(([127, 0, 0, 1], p.proxy.map_or(0, |x| x.admin))),
            };
            match out
                .iter_mut()
                .find(|w| w.name == p.workload && w.namespace == p.namespace)
            {
                Some(w) => w.pods.push(pod),
                None => out.push(LocalWorkload {
                    namespace: p.namespace.clone(),
                    name: p.workload.clone(),
                    labels: p.labels.clone(),
                    pods: vec![pod],
                    restarting: self.ro.restarts.contains_key(&wk),
                    pin: self.ro.pins.get(&wk).cloned(),
                }),
            }
        }
        out
    }

    fn pass_input(&self) -> PassInput {
        let (desired, spec) = self.desired();
        let local = self.local_workloads();
        let ns_labels = [(
            super::super::synth::INJECT_LABEL.to_string(),
            "enabled".to_string(),
        )]
        .into();
        let (workloads, pods) = rollout::observe(&local, &spec.canary, &ns_labels);
        let admin = local
            .iter()
            .flat_map(|w| {
                w.pods
                    .iter()
                    .map(|p| ((w.namespace.clone(), p.name.clone()), p.admin))
            })
            .collect();
        PassInput {
            now: jiff::Timestamp::now()
                .round(jiff::Unit::Second)
                .unwrap_or_else(|_| jiff::Timestamp::now()),
            generation: self.ro.generation,
            desired,
            spec,
            workloads,
            pods,
            admin,
            previous: self.ro.status.clone(),
        }
    }

    fn note(&mut self, line: String) {
        let line = format!("{} {line}", now_hms());
        if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            // Snapshots come every few seconds and keep three lines: a log keeps every step.
            println!("{line}");
        }
        self.status.push(line);
        if self.status.len() > 3 {
            let drop = self.status.len() - 3;
            self.status.drain(..drop);
        }
    }

    /// Carries out a plan: its restarts and rollbacks become queued replacements.
    fn apply(&mut self, plan: RolloutPlan) {
        let (desired, _) = self.desired();
        for e in &plan.events {
            self.note(format!("rollout {}: {}", e.reason, e.message));
        }
        for a in &plan.actions {
            let key = a.key();
            let wk = format!("{}.{}", key.name, key.namespace);
            if let Action::Rollback {
                version,
                failed_version,
                ..
            } = a
            {
                self.ro.pins.insert(
                    wk.clone(),
                    Pin {
                        version: version.clone(),
                        failed_version: failed_version.clone(),
                    },
                );
            }
            let version = rollout::restart_version(self.ro.pins.get(&wk), &desired);
            let queue: VecDeque<String> = self
                .plan
                .pods
                .iter()
                .filter(|p| p.proxy.is_some() && p.workload_key() == wk)
                .map(pod_key)
                .collect();
            if queue.is_empty() {
                continue;
            }
            let current = self
                .ro
                .restarts
                .remove(&wk)
                .and_then(|r| r.current)
                .filter(|s| !matches!(s.phase, Phase::Starting));
            self.ro.restarts.insert(
                wk,
                Restart {
                    version,
                    queue,
                    current,
                    retry_at: None,
                },
            );
        }
        self.ro.status = Some(plan.status);
    }

    /// The rollout's lines for the table.
    pub(super) fn rollout_lines(&self) -> Vec<String> {
        let mut lines = match &self.ro.status {
            Some(st) if !st.desired_version.is_empty() => rollout::describe(st, FAILURES_SHOWN),
            _ => Vec::new(),
        };
        for (wk, r) in &self.ro.restarts {
            let doing = r.current.as_ref().map_or("queued".to_string(), |s| {
                let phase = match s.phase {
                    Phase::Starting => "starting its replacement",
                    Phase::Moving { .. } => "moving traffic to its replacement",
                    Phase::Settling { .. } => "letting requests finish",
                    Phase::Draining { .. } => "draining the old proxy",
                };
                format!("{}: {phase}", s.pod)
            });
            lines.push(format!(
                "  restarting {wk} onto {} ({} pod(s) to go): {doing}",
                r.version,
                r.queue.len()
            ));
        }
        lines
    }

    /// Versions of a workload's pods, for its row (`v1=2 v2=1`).
    pub(super) fn versions_of(&self, pods: &[&Pod]) -> String {
        let mut by: BTreeMap<&str, u32> = BTreeMap::new();
        for p in pods {
            if let Some(v) = self.ro.versions.get(&pod_key(p)) {
                *by.entry(v.as_str()).or_default() += 1;
            }
        }
        by.iter()
            .map(|(v, n)| format!("{v}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Client requests over the whole run, restarts included, by workload and outcome.
    pub(super) fn client_totals(&self) -> BTreeMap<String, Tally> {
        let mut by = self.ro.retired_counts.clone();
        for p in &self.plan.pods {
            if let Some(t) = self.ro.client_counts.get(&pod_key(p)) {
                add(by.entry(p.workload_key()).or_default(), t);
            }
        }
        by
    }

    /// Every process the rollout holds (new pairs not yet in place, old pairs draining), for
    /// the final stop.
    pub(super) fn take_rollout_procs(&mut self) -> Vec<Proc> {
        let mut out = Vec::new();
        for r in self.ro.restarts.values_mut() {
            if let Some(s) = r.current.take() {
                out.extend(s.proxy);
                out.extend(s.app);
            }
        }
        out
    }

    async fn advance(&mut self, wk: &str) {
        let Some(mut r) = self.ro.restarts.remove(wk) else {
            return;
        };
        if r.retry_at.is_some_and(|t| Instant::now() < t) {
            self.ro.restarts.insert(wk.to_string(), r);
            return;
        }
        r.retry_at = None;
        let swap = match r.current.take() {
            Some(s) => s,
            None => {
                let Some(pod) = r.queue.pop_front() else {
                    return; // Done: the workload's rollout finished.
                };
                match self.start_replacement(&pod, &r.version) {
                    Ok(s) => s,
                    Err(e) => {
                        self.note(format!(
                            "rollout: {pod}: cannot start its replacement: {e:#}; retrying"
                        ));
                        r.queue.push_front(pod);
                        r.retry_at = Some(Instant::now() + RETRY_AFTER);
                        self.ro.restarts.insert(wk.to_string(), r);
                        return;
                    }
                }
            }
        };
        let pod = swap.pod.clone();
        match self.step(swap).await {
            Ok(Some(s)) => r.current = Some(s),
            Ok(None) => {}
            Err(e) => {
                // Only a replacement that never took the pod's place fails: the old pair keeps
                // serving, and the pod is replaced again shortly.
                self.note(format!("rollout: {wk}: {e}; retrying"));
                r.queue.push_front(pod);
                r.retry_at = Some(Instant::now() + RETRY_AFTER);
            }
        }
        self.ro.restarts.insert(wk.to_string(), r);
    }

    fn start_replacement(&mut self, pod_id: &str, version: &str) -> anyhow::Result<Swap> {
        let pod = self
            .plan
            .pods
            .iter()
            .find(|p| pod_key(p) == pod_id)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no such pod"))?;
        let spare = *self
            .plan
            .spare
            .get(pod_id)
            .ok_or_else(|| anyhow::anyhow!("no spare ports"))?;
        let mut new = pod.clone();
        new.app_port = spare.app;
        new.proxy = Some(spare.proxy);
        self.ro.spawned += 1;
        let n = self.ro.spawned;
        let logs = self.state_dir.join("logs");
        let proxy = supervise::spawn(
            &format!("{} sidecar", pod.name),
            &self.opts.exe,
            &self.proxy_args(&new, version),
            &[],
            &logs.join(format!("{}.{}.proxy.{n}.log", pod.name, pod.namespace)),
        )?;
        let client = matches!(pod.role, Role::Client { .. });
        let final_counts =
            client.then(|| logs.join(format!("{}.{}.final.{n}", pod.name, pod.namespace)));
        Ok(Swap {
            pod: pod_id.to_string(),
            version: version.to_string(),
            proxy: Some(proxy),
            app: None,
            generation: n,
            final_counts,
            client,
            phase: Phase::Starting,
        })
    }

    fn spawn_app(&self, s: &Swap, spare: super::super::plan::Slot) -> anyhow::Result<Proc> {
        let mut new = self
            .plan
            .pods
            .iter()
            .find(|p| pod_key(p) == s.pod)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no such pod"))?;
        new.app_port = spare.app;
        new.proxy = Some(spare.proxy);
        let log = self.state_dir.join("logs").join(format!(
            "{}.{}.app.{}.log",
            new.name, new.namespace, s.generation
        ));
        Ok(supervise::spawn(
            &format!("{} app", new.name),
            &self.opts.exe,
            &self.app_args_as(&new, &s.version, s.final_counts.as_deref()),
            &[],
            &log,
        )?)
    }

    /// Advances one replacement; `None` when it is done.
    async fn step(&mut self, mut s: Swap) -> Result<Option<Swap>, String> {
        match s.phase {
            Phase::Starting => {
                let exited = [&mut s.proxy, &mut s.app]
                    .into_iter()
                    .flatten()
                    .find_map(|p| {
                        let st = p.poll()?;
                        Some(format!(
                            "{} of the replacement exited ({st}): {}",
                            p.name,
                            p.log_tail(3)
                        ))
                    });
                if let Some(why) = exited {
                    stop_now(&mut s);
                    return Err(why);
                }
                let Some(spare) = self.plan.spare.get(&s.pod).copied() else {
                    stop_now(&mut s);
                    return Err("no spare ports".into());
                };
                let admin = SocketAddr::from(([127, 0, 0, 1], spare.proxy.admin));
                let ready = matches!(self.get(admin, "/ready").await, Some((200, _)));
                if !ready {
                    return Ok(Some(s));
                }
                if s.app.is_none() {
                    // The app starts once its proxy is ready, as at `trellis dev` start (and as a
                    // native sidecar container holds the app in a cluster): a client's first
                    // requests would otherwise meet a proxy without a certificate.
                    match self.spawn_app(&s, spare) {
                        Ok(app) => s.app = Some(app),
                        Err(e) => {
                            stop_now(&mut s);
                            return Err(format!("starting the replacement's app: {e:#}"));
                        }
                    }
                }
                let app_up = s.client
                    || tokio::net::TcpStream::connect(("127.0.0.1", spare.app))
                        .await
                        .is_ok();
                if !app_up {
                    return Ok(Some(s));
                }
                self.take_place(&mut s)?;
                self.note(format!(
                    "rollout: {}: replacement on {} ready; moving traffic to it",
                    s.pod, s.version
                ));
                s.phase = Phase::Moving {
                    since: Instant::now(),
                };
                Ok(Some(s))
            }
            Phase::Moving { since } => {
                if self.all_on_latest().await || since.elapsed() > MOVE_BOUND {
                    if since.elapsed() > MOVE_BOUND {
                        self.note(format!(
                            "rollout: {}: not every sidecar loaded the new endpoints within {}s",
                            s.pod,
                            MOVE_BOUND.as_secs()
                        ));
                    }
                    s.phase = Phase::Settling {
                        until: Instant::now() + SETTLE,
                    };
                }
                Ok(Some(s))
            }
            Phase::Settling { until } => {
                if Instant::now() >= until {
                    // A client's app goes first (it finishes its requests through its proxy); a
                    // service's proxy goes first (it drains what callers still send).
                    let first = if s.client { &mut s.app } else { &mut s.proxy };
                    if let Some(p) = first {
                        p.terminate();
                    }
                    self.note(format!("rollout: {}: draining the old pair", s.pod));
                    s.phase = Phase::Draining {
                        since: Instant::now(),
                    };
                }
                Ok(Some(s))
            }
            Phase::Draining { since } => {
                let (first, second) = if s.client {
                    (&mut s.app, &mut s.proxy)
                } else {
                    (&mut s.proxy, &mut s.app)
                };
                let first_done = first.as_mut().is_none_or(|p| p.poll().is_some());
                if first_done && let Some(p) = second.as_mut() {
                    p.terminate();
                }
                let second_done = second.as_mut().is_none_or(|p| p.poll().is_some());
                if first_done && second_done {
                    self.retire_counts(&s);
                    return Ok(None);
                }
                if since.elapsed() > DRAIN_BOUND {
                    self.note(format!(
                        "rollout: {}: the old pair did not exit within {}s; killed",
                        s.pod,
                        DRAIN_BOUND.as_secs()
                    ));
                    stop_now(&mut s);
                    self.retire_counts(&s);
                    return Ok(None);
                }
                Ok(Some(s))
            }
        }
    }

    /// The new pair takes the pod's place: its ports, its process slots, its version, and the
    /// pod's endpoint in the next config. `s` then holds the old pair. Nothing changes unless
    /// the new config compiles.
    fn take_place(&mut self, s: &mut Swap) -> Result<(), String> {
        let idx = *self
            .pod_procs
            .get(&s.pod)
            .ok_or_else(|| format!("{}: no processes", s.pod))?;
        let mut plan = self.plan.clone();
        plan.swap_slot(&s.pod)
            .ok_or_else(|| format!("{}: no spare ports", s.pod))?;
        let configs = control::compile(&self.dev, &plan, &self.identity_url())
            .map_err(|e| format!("recompiling for the new endpoint: {e}"))?;
        self.plan = plan;
        self.configs = configs;
        if let (Some(i), Some(new)) = (idx.proxy, s.proxy.take()) {
            s.proxy = Some(std::mem::replace(&mut self.procs[i], new));
        }
        if let (Some(i), Some(new)) = (idx.app, s.app.take()) {
            s.app = Some(std::mem::replace(&mut self.procs[i], new));
        }
        // From now on the pod's client app is the new one: its count file is the pod's, and the
        // old app's (where it writes its final counts) goes with the old pair.
        if s.client
            && let Some(new_path) = s.final_counts.take()
        {
            s.final_counts = self.ro.count_files.insert(s.pod.clone(), new_path);
        }
        self.ro.versions.insert(s.pod.clone(), s.version.clone());
        self.ready.insert(s.pod.clone(), true);
        if let Err(e) = self.write_live_endpoints() {
            self.note(format!(
                "rollout: {}: writing the live endpoints: {e:#}",
                s.pod
            ));
        }
        if let Err(e) = self.write_volumes() {
            // The sidecars keep the previous config; moving traffic waits its bound, then
            // the old pair drains anyway (its callers retry or fail, and the table says so).
            self.note(format!(
                "rollout: {}: writing the new endpoint: {e:#}",
                s.pod
            ));
        }
        Ok(())
    }

    /// Every running sidecar reports the latest revision compiled for its namespace. Configs
    /// only move forward, so a sidecar on the latest one also has every earlier endpoint move
    /// (another workload's replacement may have recompiled since this one's).
    async fn all_on_latest(&self) -> bool {
        let revisions: BTreeMap<&String, String> = self
            .configs
            .iter()
            .filter_map(|(ns, c)| Some((ns, revision_of(c)?)))
            .collect();
        let targets: Vec<(SocketAddr, &String)> = self
            .plan
            .pods
            .iter()
            .filter_map(|p| {
                let want = revisions.get(&p.namespace)?;
                Some((SocketAddr::from(([127, 0, 0, 1], p.proxy?.admin)), want))
            })
            .collect();
        let bodies =
            futures::future::join_all(targets.iter().map(|(a, _)| self.get(*a, "/metrics"))).await;
        targets.iter().zip(bodies).all(|((_, want), body)| {
            let Some((200, text)) = body else {
                return false;
            };
            metrics::parse(&text).is_ok_and(|samples| {
                samples.iter().any(|s| {
                    s.name == "trellis_proxy_config_info" && s.label("revision") == Some(want)
                })
            })
        })
    }

    fn retire_counts(&mut self, s: &Swap) {
        let Some(path) = &s.final_counts else { return };
        let Ok(text) = std::fs::read_to_string(path) else {
            self.note(format!(
                "rollout: {}: the old client wrote no final counts",
                s.pod
            ));
            return;
        };
        let Ok(samples) = metrics::parse(&text) else {
            return;
        };
        let tally = client_tally(&samples);
        let wk = self
            .plan
            .pods
            .iter()
            .find(|p| pod_key(p) == s.pod)
            .map(Pod::workload_key)
            .unwrap_or_default();
        add(self.ro.retired_counts.entry(wk).or_default(), &tally);
    }
}

fn stop_now(s: &mut Swap) {
    for p in [&mut s.proxy, &mut s.app].into_iter().flatten() {
        p.kill();
    }
}

fn revision_of(config_json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(config_json).ok()?;
    Some(v.get("revision")?.as_str()?.to_string())
}
