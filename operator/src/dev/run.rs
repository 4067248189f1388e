//! The `trellis dev` process: starts the local mesh, keeps the live view, follows edits of the
//! directory, and stops everything it started.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::signal::unix::{SignalKind, signal};

use super::control::{self, MeshParams};
use super::display::{self, Frame, ServiceRow};
use super::plan::{Plan, Pod, Role};
use super::spec::{self, DevDir};
use super::stats::{self, EdgeKey, EdgeStats, EdgeView};
use super::supervise::{self, Proc};
use super::tokenreview::{TokenAuthority, TokenOwner};
use super::{creds, metrics, operator_metrics, volume};
use crate::ca::CertificateAuthority;

#[path = "run_rollout.rs"]
mod rollout_edge;

/// What `trellis dev` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    pub dir: PathBuf,
    pub base_port: u16,
    /// `None`: a fresh directory under the system temp dir.
    pub state_dir: Option<PathBuf>,
    /// Stop after this long and report.
    pub duration: Option<Duration>,
    /// Stop as soon as every edge has carried successful mTLS traffic (bounded by `duration`).
    pub once: bool,
    /// The `trellis` binary (this one): run as `trellis proxy` and `trellis demo-service`.
    pub exe: PathBuf,
    /// Where sidecars get their certificates.
    pub credentials: creds::Mode,
    /// `--otlp`: the collector every sidecar exports spans to (overrides the Mesh's tracing).
    pub otlp: Option<String>,
    /// 127.0.0.1 port of the dashboard (0: any free port; the URL is printed).
    pub dashboard_port: u16,
    /// `--fail-version`: pods started as this proxy version answer every request with a 500,
    /// to see the rollout's health gate stop a bad version.
    pub fail_version: Option<String>,
}

/// Longest `--once` waits when no `--duration` bounds it.
pub const ONCE_DEFAULT_BOUND: Duration = Duration::from_secs(90);
/// How often the directory is checked for edits.
const WATCH_EVERY: Duration = Duration::from_millis(250);
/// How often the proxies are scraped and the view refreshed.
const SCRAPE_EVERY: Duration = Duration::from_secs(1);
/// How often a snapshot is printed when stdout is not a terminal.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(5);
/// How long children get to exit on SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How often the rollout's replacements advance (each step is one quick probe).
const ROLLOUT_EVERY: Duration = Duration::from_millis(200);

/// Runs the local mesh until a signal, the duration, or (with `--once`) success. Returns
/// `Ok(())` only when, in a bounded run, every edge carried successful mTLS traffic.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let mut dev = spec::load_dir(&opts.dir)?;
    if let Some(c) = &opts.otlp {
        control::with_otlp(&mut dev, c);
    }
    let mesh = control::mesh_of(&dev);
    let params = control::mesh_params(&mesh)?;
    // Lay out and check every port before creating anything.
    let (state_dir, owned) = state_dir_path(opts.state_dir.as_deref())?;
    let plan = Plan::new(&dev.topology, opts.base_port, &state_dir)?;
    plan.probe_ports()?;
    let dashboard = crate::dashboard::server::bind(opts.dashboard_port)
        .await
        .with_context(|| format!("dashboard port 127.0.0.1:{}", opts.dashboard_port))?;
    let dashboard_url = crate::dashboard::server::url(&dashboard);
    let op_listener = operator_metrics::bind(0)
        .await
        .context("the operator's metrics on 127.0.0.1")?;
    let op_metrics_addr = op_listener.local_addr()?;
    let op_metrics = operator_metrics::OperatorMetrics::default();
    let reconciles = op_metrics.reconciles();
    let (graph_tx, graph_rx) = tokio::sync::watch::channel(crate::dashboard::Graph::default());
    create_state_dir(&state_dir, owned)?;
    let mut local = LocalMesh {
        opts: opts.clone(),
        state_dir: state_dir.clone(),
        plan,
        params,
        dev,
        procs: Vec::new(),
        pod_procs: BTreeMap::new(),
        tokens: TokenAuthority::default(),
        pod_tokens: BTreeMap::new(),
        ca: None,
        configs: BTreeMap::new(),
        status: Vec::new(),
        reload_error: None,
        stats: EdgeStats::default(),
        client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        started: Instant::now(),
        views: Vec::new(),
        notes: Vec::new(),
        ready: BTreeMap::new(),
        shutdown: tokio_util::sync::CancellationToken::new(),
        cred_desc: String::new(),
        sidecars: BTreeMap::new(),
        backends: EdgeStats::default(),
        backend_views: Vec::new(),
        extras: BTreeMap::new(),
        graph_tx,
        dashboard_url,
        refused_prev: BTreeMap::new(),
        last_scrape: None,
        ro: rollout_edge::Edge::default(),
        cred_args: BTreeMap::new(),
        op_metrics: op_metrics.clone(),
        reconciles,
        op_metrics_addr,
    };
    tokio::spawn(operator_metrics::serve(
        op_listener,
        op_metrics,
        local.shutdown.clone(),
    ));
    tokio::spawn(crate::dashboard::server::serve(
        dashboard,
        graph_rx,
        local.shutdown.clone(),
    ));
    let result = local.run().await;
    // Whatever happened, stop what was started and remove the state directory.
    let held = local.take_rollout_procs();
    local.procs.extend(held);
    let killed = supervise::stop_all(&mut local.procs, STOP_GRACE).await;
    local.shutdown.cancel();
    if !killed.is_empty() {
        eprintln!(
            "trellis dev: killed after {}s without exiting: {}",
            STOP_GRACE.as_secs(),
            killed.join(", ")
        );
    }
    // A child killed a moment ago may still have been writing its log: retry briefly.
    let mut removed = Ok(());
    for _ in 0..5 {
        removed = std::fs::remove_dir_all(&state_dir);
        if removed.is_ok() || !state_dir.exists() {
            removed = Ok(());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Err(e) = removed {
        eprintln!("trellis dev: could not remove {}: {e}", state_dir.display());
    }
    result
}

/// The state directory, and whether it is ours to create and remove.
fn state_dir_path(given: Option<&Path>) -> anyhow::Result<(PathBuf, bool)> {
    match given {
        Some(p) => {
            if p.exists()
                && std::fs::read_dir(p)
                    .with_context(|| format!("--state-dir {}", p.display()))?
                    .next()
                    .is_some()
            {
                anyhow::bail!(
                    "--state-dir {} is not empty: trellis dev removes its state directory on \
                     exit, so give it an empty or missing one",
                    p.display()
                );
            }
            Ok((p.to_path_buf(), true))
        }
        None => {
            let nonce: u32 = rand::random();
            Ok((
                std::env::temp_dir()
                    .join(format!("trellis-dev-{}-{nonce:08x}", std::process::id())),
                true,
            ))
        }
    }
}

fn create_state_dir(p: &Path, _owned: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(p).with_context(|| format!("create {}", p.display()))?;
    for sub in ["pods", "logs", "creds"] {
        std::fs::create_dir_all(p.join(sub))
            .with_context(|| format!("create {}", p.join(sub).display()))?;
    }
    Ok(())
}

/// Processes of one pod, as indexes into `LocalMesh::procs`.
#[derive(Default, Clone, Copy)]
struct PodProcs {
    proxy: Option<usize>,
    app: Option<usize>,
}

struct LocalMesh {
    opts: Options,
    state_dir: PathBuf,
    plan: Plan,
    params: MeshParams,
    /// The last directory content that loaded and compiled.
    dev: DevDir,
    procs: Vec<Proc>,
    pod_procs: BTreeMap<String, PodProcs>,
    tokens: TokenAuthority,
    pod_tokens: BTreeMap<String, String>,
    ca: Option<std::sync::Arc<CertificateAuthority>>,
    /// The config each namespace's pods were last given.
    configs: BTreeMap<String, String>,
    status: Vec<String>,
    reload_error: Option<String>,
    stats: EdgeStats,
    client: Client<HttpConnector, Empty<Bytes>>,
    started: Instant,
    views: Vec<EdgeView>,
    notes: Vec<(String, String)>,
    ready: BTreeMap<String, bool>,
    shutdown: tokio_util::sync::CancellationToken,
    /// How the sidecars get their certificates, for the header.
    cred_desc: String,
    /// Latest per-pod sidecar counters (refused connections, config reloads).
    sidecars: BTreeMap<String, stats::SidecarCounts>,
    /// Requests per backend after splits (the canary's share).
    backends: EdgeStats,
    backend_views: Vec<EdgeView>,
    /// Per pod: its workload and its traffic layer's per-backend retries and ejections.
    extras: BTreeMap<String, (String, BTreeMap<String, stats::BackendExtras>)>,
    /// The dashboard's data: the graph of the last window.
    graph_tx: tokio::sync::watch::Sender<crate::dashboard::Graph>,
    dashboard_url: String,
    /// Refused inbound connections per workload at the previous scrape, for rates.
    refused_prev: BTreeMap<String, f64>,
    last_scrape: Option<Instant>,
    /// The sidecar rollout (see `run_rollout.rs`).
    ro: rollout_edge::Edge,
    /// Per pod: the credential flags its proxies start with.
    cred_args: BTreeMap<String, Vec<String>>,
    /// The operator's registry (identity endpoint, injector), served on `op_metrics_addr`.
    op_metrics: operator_metrics::OperatorMetrics,
    /// Counts each compile of the directory (see [`operator_metrics::OperatorMetrics::reconciles`]).
    reconciles: crate::controller::Reconciles,
    op_metrics_addr: SocketAddr,
}

pub(crate) fn pod_key(p: &Pod) -> String {
    format!("{}/{}", p.namespace, p.name)
}

impl LocalMesh {
    fn identity_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.plan.identity_port)
    }

    fn trust_pem(&self) -> String {
        self.ca
            .as_ref()
            .map(|c| c.roots_pem().to_string())
            .unwrap_or_default()
    }

    async fn run(&mut self) -> anyhow::Result<()> {
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        self.start().await?;
        let tty =
            std::io::stdout().is_terminal() && !self.opts.once && self.opts.duration.is_none();
        if tty {
            print!("\x1b[2J");
        } else {
            println!("{}", self.intro());
        }
        let bound = match (self.opts.duration, self.opts.once) {
            (Some(d), _) => Some(d),
            (None, true) => Some(ONCE_DEFAULT_BOUND),
            (None, false) => None,
        };
        let deadline = bound.map(|d| tokio::time::Instant::now() + d);
        let mut watch = tokio::time::interval(WATCH_EVERY);
        let mut scrape = tokio::time::interval(SCRAPE_EVERY);
        let mut rollout = tokio::time::interval(ROLLOUT_EVERY);
        let mut last_snapshot = Instant::now();
        let mut fingerprint = dir_fingerprint(&self.opts.dir);
        let reason = loop {
            tokio::select! {
                _ = sigint.recv() => break "interrupted (SIGINT)",
                _ = sigterm.recv() => break "terminated (SIGTERM)",
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    break "duration elapsed";
                }
                _ = watch.tick() => {
                    let fp = dir_fingerprint(&self.opts.dir);
                    if fp != fingerprint {
                        fingerprint = fp;
                        self.reload().await;
                    }
                }
                _ = rollout.tick() => self.rollout_tick().await,
                _ = scrape.tick() => {
                    self.scrape().await;
                    let frame = self.frame();
                    if tty {
                        print!("{}", display::redraw(&frame));
                        let _ = std::io::stdout().flush();
                    } else if last_snapshot.elapsed() >= SNAPSHOT_EVERY {
                        last_snapshot = Instant::now();
                        println!("--- {:.0}s", self.started.elapsed().as_secs_f64());
                        println!("{frame}");
                    }
                    if self.opts.once && self.missing_edges().is_empty() {
                        break "every edge carried mTLS traffic";
                    }
                }
            }
        };
        let frame = self.frame();
        println!("\n=== trellis dev: {reason}; final state\n{frame}");
        let missing = self.missing_edges();
        let exited = self.unexpected_exits();
        if bound.is_none() && reason != "duration elapsed" {
            // Interactive run stopped by the user: nothing to judge.
            return Ok(());
        }
        if missing.is_empty() && exited.is_empty() {
            println!("OK: every edge carried successful mTLS traffic");
            Ok(())
        } else {
            let mut why = Vec::new();
            if !missing.is_empty() {
                why.push(format!(
                    "no successful mTLS traffic on: {}",
                    missing.join(", ")
                ));
            }
            if !exited.is_empty() {
                why.push(format!("exited early: {}", exited.join("; ")));
            }
            anyhow::bail!("{}", why.join("; "))
        }
    }

    /// Starts the CA, credentials, configs, proxies and apps.
    async fn start(&mut self) -> anyhow::Result<()> {
        self.ro.held = rollout_edge::hold_ports(&self.plan);
        let ca = control::new_ca(&self.params)?;
        std::fs::write(self.state_dir.join("ca.pem"), ca.roots_pem())?;
        self.ca = Some(std::sync::Arc::new(ca));
        for pod in self.plan.pods.clone() {
            if pod.proxy.is_some() {
                let token = self.tokens.mint(TokenOwner {
                    namespace: pod.namespace.clone(),
                    service_account: pod.service_account.clone(),
                    pod_name: pod.name.clone(),
                    pod_uid: super::synth::pod_uid(&pod.namespace, &pod.name),
                });
                self.pod_tokens.insert(pod_key(&pod), token);
            }
        }
        let ca = self.ca.as_ref().expect("CA created above");
        let (cred_args, cred_desc) = creds::start(creds::Inputs {
            mode: self.opts.credentials,
            ca,
            plan: &self.plan,
            params: &self.params,
            state_dir: &self.state_dir,
            tokens: &self.tokens,
            identity_url: &self.identity_url(),
            shutdown: &self.shutdown,
            metrics: &self.op_metrics,
        })
        .await?;
        self.admit_pods()?;
        self.cred_desc = cred_desc;
        let configs = self.counted(control::compile(
            &self.dev,
            &self.plan,
            &self.identity_url(),
        ))?;
        self.configs = configs;
        self.write_volumes()?;
        self.status.push(format!(
            "config compiled by the operator's compiler at {} for namespaces: {}",
            now_hms(),
            self.configs.keys().cloned().collect::<Vec<_>>().join(", ")
        ));
        self.cred_args = cred_args;
        self.ro.generation = 1;
        let version = self.initial_version();
        let exe = self.opts.exe.clone();
        let logs = self.state_dir.join("logs");
        for pod in self.plan.pods.clone() {
            if pod.proxy.is_none() {
                continue;
            }
            self.ro.versions.insert(pod_key(&pod), version.clone());
            let args = self.proxy_args(&pod, &version);
            let p = supervise::spawn(
                &format!("{} sidecar", pod.name),
                &exe,
                &args,
                &[],
                &logs.join(format!("{}.{}.proxy.log", pod.name, pod.namespace)),
            )?;
            self.procs.push(p);
            self.pod_procs.entry(pod_key(&pod)).or_default().proxy = Some(self.procs.len() - 1);
        }
        self.wait_ready(Duration::from_secs(30)).await;
        for p in self.procs.iter_mut() {
            p.poll();
        }
        let dead: Vec<&Proc> = self.procs.iter().filter(|p| p.exited.is_some()).collect();
        if let Some(first) = dead.first() {
            anyhow::bail!(
                "{} exited at start ({}); its log ({}, removed with the state dir) ended with:\n{}\n({} sidecars exited in all)",
                first.name,
                first.exited.map(|s| s.to_string()).unwrap_or_default(),
                first.log.display(),
                first.log_tail(8),
                dead.len()
            );
        }
        self.write_live_endpoints()?;
        for pod in self.plan.pods.clone() {
            let counts = matches!(pod.role, Role::Client { .. }).then(|| {
                let path = logs.join(format!("{}.{}.final.0", pod.name, pod.namespace));
                self.ro.count_files.insert(pod_key(&pod), path.clone());
                path
            });
            let args = self.app_args_as(&pod, &version, counts.as_deref());
            let p = supervise::spawn(
                &format!("{} app", pod.name),
                &exe,
                &args,
                &[],
                &logs.join(format!("{}.{}.app.log", pod.name, pod.namespace)),
            )?;
            self.procs.push(p);
            self.pod_procs.entry(pod_key(&pod)).or_default().app = Some(self.procs.len() - 1);
        }
        self.write_prometheus_config()?;
        Ok(())
    }

    /// Sends every pod through the operator's admission webhook decision, as the API server
    /// sends each new pod: the injector must mesh exactly the pods that get a sidecar here, and
    /// what it decides is counted in the operator's metrics.
    fn admit_pods(&mut self) -> anyhow::Result<()> {
        let cluster = super::synth::synthesize(&self.dev.topology, &self.plan);
        let injector = self.op_metrics.injector(
            control::mesh_of(&self.dev).spec,
            crate::webhook::namespace_labels(&cluster.namespaces),
        );
        let meshed = self
            .plan
            .pods
            .iter()
            .filter(|p| p.proxy.is_some())
            .map(pod_key)
            .collect();
        let n = operator_metrics::admit(&injector, &cluster.pods, &meshed)?;
        self.status.push(format!(
            "{n} pods injected by the operator's admission webhook at {}",
            now_hms()
        ));
        Ok(())
    }

    /// Where a client outside the mesh reads which of its target's pod addresses are endpoints.
    fn live_endpoints_file(&self, pod: &Pod) -> PathBuf {
        self.state_dir
            .join("endpoints")
            .join(format!("{}.{}", pod.name, pod.namespace))
    }

    /// Writes, for every client outside the mesh, the inbound addresses of its target's
    /// replicas as they are now (the stand-in for the EndpointSlices kube-proxy follows). Each
    /// file is replaced whole (write, then rename), so a client never reads half a list.
    pub(super) fn write_live_endpoints(&self) -> anyhow::Result<()> {
        for pod in &self.plan.pods {
            let Role::Client { target, .. } = &pod.role else {
                continue;
            };
            if pod.proxy.is_some() {
                continue;
            }
            let live: Vec<String> = self
                .plan
                .replicas_of(target)
                .filter_map(|p| p.proxy)
                .map(|x| format!("127.0.0.1:{}", x.inbound))
                .collect();
            let path = self.live_endpoints_file(pod);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, live.join(","))?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(())
    }

    /// The flags of a pod's proxy, started as `version`.
    fn proxy_args(&self, pod: &Pod, version: &str) -> Vec<String> {
        let Some(px) = pod.proxy else {
            return Vec::new();
        };
        let mut args = vec![
            "proxy".to_string(),
            "--dir".into(),
            pod.dir.display().to_string(),
            "--outbound-addr".into(),
            format!("127.0.0.1:{}", px.outbound),
            "--inbound-addr".into(),
            format!("127.0.0.1:{}", px.inbound),
            "--admin-addr".into(),
            format!("127.0.0.1:{}", px.admin),
            // No iptables here: apps call the outbound port directly (routed by Host).
            "--local-mode".into(),
            "--inbound-target".into(),
            format!("127.0.0.1:{}", pod.app_port),
            "--pod-namespace".into(),
            pod.namespace.clone(),
            "--pod-name".into(),
            pod.name.clone(),
            "--service-account".into(),
            pod.service_account.clone(),
            "--log-format".into(),
            "text".into(),
            "--drain-timeout".into(),
            "1s".into(),
            "--proxy-version".into(),
            version.to_string(),
            // One worker each (tokio's current-thread runtime), as a pod with a one-core
            // allowance gets; explicit so the user's environment cannot size the demo.
            "--concurrency".into(),
            "1".into(),
        ];
        args.extend(
            self.cred_args
                .get(&pod_key(pod))
                .cloned()
                .unwrap_or_default(),
        );
        args
    }

    /// The flags of a pod's app beside a proxy of `version`: with `--fail-version` naming it,
    /// a service answers every request with a 500 (the simulated bad proxy version).
    fn app_args_as(&self, pod: &Pod, version: &str, final_counts: Option<&Path>) -> Vec<String> {
        let mut a = self.app_args(pod);
        if let Some(path) = final_counts {
            a.push("--final-counts".into());
            a.push(path.display().to_string());
        }
        let failing = self.opts.fail_version.as_deref() == Some(version) && pod.proxy.is_some();
        if failing
            && let Some(i) = a.iter().position(|x| x == "--failure-rate")
            && i + 1 < a.len()
        {
            a[i + 1] = "1".into();
        }
        a
    }

    fn app_args(&self, pod: &Pod) -> Vec<String> {
        let call_arg = |key: &str| -> String {
            let s = self
                .dev
                .topology
                .service(key)
                .expect("validated call target");
            let suffix = match s.protocol {
                spec::AppProtocol::Http => "",
                spec::AppProtocol::Grpc => ":grpc",
                spec::AppProtocol::Tcp => ":tcp",
            };
            format!("{key}:{}{suffix}", s.port)
        };
        match &pod.role {
            Role::Service {
                protocol,
                failure_rate,
                latency_ms,
                calls,
                ..
            } => {
                let mut a = vec![
                    "demo-service".to_string(),
                    "serve".into(),
                    "--name".into(),
                    pod.name.clone(),
                    "--listen".into(),
                    format!("127.0.0.1:{}", pod.app_port),
                    "--failure-rate".into(),
                    failure_rate.to_string(),
                    "--latency-ms".into(),
                    latency_ms.to_string(),
                ];
                match protocol {
                    spec::AppProtocol::Http => {}
                    spec::AppProtocol::Grpc => a.push("--grpc".into()),
                    spec::AppProtocol::Tcp => a.push("--tcp".into()),
                }
                if let Some(px) = pod.proxy {
                    a.push("--outbound".into());
                    a.push(format!("127.0.0.1:{}", px.outbound));
                }
                for c in calls {
                    a.push("--call".into());
                    a.push(call_arg(c));
                }
                a
            }
            Role::Client { target, rate } => {
                let mut a = vec![
                    "demo-service".to_string(),
                    "load".into(),
                    "--name".into(),
                    pod.name.clone(),
                    "--target".into(),
                    call_arg(target),
                    "--rate".into(),
                    rate.to_string(),
                    "--metrics".into(),
                    format!("127.0.0.1:{}", pod.app_port),
                ];
                match pod.proxy {
                    Some(px) => {
                        a.push("--via".into());
                        a.push(format!("127.0.0.1:{}", px.outbound));
                    }
                    None => {
                        // Outside the mesh: straight at the target's pods, as a pod without a
                        // sidecar would (its connection lands on their sidecars' inbound).
                        // Both the ports a replica uses and its spare ones: a rollout moves
                        // replicas between them, and the client skips the closed ones.
                        let direct: Vec<String> = self
                            .plan
                            .replicas_of(target)
                            .flat_map(|p| {
                                let spare = self.plan.spare.get(&pod_key(p)).map(|s| s.proxy);
                                p.proxy.into_iter().chain(spare)
                            })
                            .map(|x| format!("127.0.0.1:{}", x.inbound))
                            .collect();
                        a.push("--direct".into());
                        a.push(direct.join(","));
                        // Which of them are endpoints now: a replacement's proxy listens
                        // before its app does, and kube-proxy would not send there yet.
                        a.push("--live-endpoints".into());
                        a.push(self.live_endpoints_file(pod).display().to_string());
                    }
                }
                a
            }
        }
    }

    /// Writes every meshed pod's projected volume from the current configs.
    fn write_volumes(&self) -> anyhow::Result<usize> {
        let ca_pem = self.trust_pem();
        let mut changed = 0;
        for pod in &self.plan.pods {
            if pod.proxy.is_none() {
                continue;
            }
            let config = self
                .configs
                .get(&pod.namespace)
                .with_context(|| format!("no config for namespace {}", pod.namespace))?;
            let token = self
                .pod_tokens
                .get(&pod_key(pod))
                .map(String::as_str)
                .unwrap_or_default();
            let files = control::volume_files(config, &ca_pem, pod, token);
            if volume::write(&pod.dir, &files)
                .with_context(|| format!("write {}", pod.dir.display()))?
            {
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Counts a compile of the directory as the compile controller's reconcile.
    fn counted<T>(
        &self,
        compiled: Result<T, control::ControlError>,
    ) -> Result<T, control::ControlError> {
        let result = if compiled.is_ok() { "ok" } else { "invalid" };
        let controller = crate::controller::compile_apply::COMPILE_CONTROLLER;
        self.reconciles.count(controller, result);
        compiled
    }

    /// Re-reads the directory after an edit: a valid one is compiled and written (proxies
    /// reload it themselves); an invalid one is reported and changes nothing.
    async fn reload(&mut self) {
        let result = spec::load_dir(&self.opts.dir)
            .map_err(anyhow::Error::from)
            .and_then(|mut dev| {
                if let Some(c) = &self.opts.otlp {
                    control::with_otlp(&mut dev, c);
                }
                if dev.topology != self.dev.topology {
                    anyhow::bail!(
                        "{} changed: the running processes follow the file as it was at start \
                         (restart `trellis dev` to apply it); policies are still reloaded",
                        spec::SERVICES_FILE
                    );
                }
                let mesh = control::mesh_of(&dev);
                let params = control::mesh_params(&mesh)?;
                if params.trust_domain != self.params.trust_domain {
                    anyhow::bail!(
                        "Mesh trustDomain changed: every certificate would change; restart \
                         `trellis dev` to apply it"
                    );
                }
                let configs =
                    self.counted(control::compile(&dev, &self.plan, &self.identity_url()))?;
                Ok((dev, configs))
            });
        match result {
            Ok((dev, configs)) => {
                let spec_of = |d: &DevDir| serde_json::to_value(&control::mesh_of(d).spec).ok();
                if spec_of(&dev) != spec_of(&self.dev) {
                    // What `metadata.generation` counts in a cluster: edits of the Mesh's spec.
                    self.ro.generation += 1;
                }
                let changed_ns: Vec<String> = configs
                    .iter()
                    .filter(|(ns, c)| self.configs.get(*ns) != Some(*c))
                    .map(|(ns, _)| ns.clone())
                    .collect();
                self.op_metrics.set_mesh(control::mesh_of(&dev).spec);
                self.dev = dev;
                self.configs = configs;
                match self.write_volumes() {
                    Ok(n) => {
                        self.reload_error = None;
                        self.status.push(format!(
                            "{} reloaded: {}",
                            now_hms(),
                            if changed_ns.is_empty() {
                                "no config change".to_string()
                            } else {
                                format!(
                                    "new config for {} ({n} pods' volumes swapped; proxies reload live)",
                                    changed_ns.join(", ")
                                )
                            }
                        ));
                    }
                    Err(e) => self.reload_error = Some(format!("{} {e:#}", now_hms())),
                }
            }
            Err(e) => {
                self.reload_error = Some(format!(
                    "{} edit refused, last good config stays: {e:#}",
                    now_hms()
                ));
            }
        }
        if self.status.len() > 3 {
            let drop = self.status.len() - 3;
            self.status.drain(..drop);
        }
    }

    async fn get(&self, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
        let uri: http::Uri = format!("http://{addr}{path}").parse().ok()?;
        let fut = async {
            let resp = self.client.get(uri).await.ok()?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            Some((status, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(Duration::from_millis(900), fut)
            .await
            .ok()
            .flatten()
    }

    async fn wait_ready(&mut self, bound: Duration) {
        let deadline = Instant::now() + bound;
        loop {
            self.check_ready().await;
            let all = self.ready.values().all(|r| *r);
            if all || Instant::now() > deadline || self.procs.iter_mut().any(|p| p.poll().is_some())
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn check_ready(&mut self) {
        let pods: Vec<(String, SocketAddr)> = self
            .plan
            .pods
            .iter()
            .filter_map(|p| {
                p.proxy
                    .map(|x| (pod_key(p), SocketAddr::from(([127, 0, 0, 1], x.admin))))
            })
            .collect();
        let results =
            futures::future::join_all(pods.iter().map(|(_, addr)| self.get(*addr, "/ready"))).await;
        for ((key, _), r) in pods.into_iter().zip(results) {
            self.ready.insert(key, matches!(r, Some((200, _))));
        }
    }

    /// Scrapes every sidecar's `/metrics` and every load client's own counters.
    async fn scrape(&mut self) {
        self.check_ready().await;
        let targets: Vec<(String, String, SocketAddr, bool)> = self
            .plan
            .pods
            .iter()
            .flat_map(|p| {
                let mut t = Vec::new();
                if let Some(x) = p.proxy {
                    t.push((
                        pod_key(p),
                        p.workload_key(),
                        SocketAddr::from(([127, 0, 0, 1], x.admin)),
                        true,
                    ));
                }
                if p.proxy.is_none() && matches!(p.role, Role::Client { .. }) {
                    t.push((
                        pod_key(p),
                        p.workload_key(),
                        SocketAddr::from(([127, 0, 0, 1], p.app_port)),
                        false,
                    ));
                }
                t
            })
            .collect();
        let bodies = futures::future::join_all(
            targets
                .iter()
                .map(|(_, _, addr, _)| self.get(*addr, "/metrics")),
        )
        .await;
        let mut notes = Vec::new();
        for ((id, source, _, is_proxy), body) in targets.into_iter().zip(bodies) {
            let Some((200, text)) = body else { continue };
            let Ok(samples) = metrics::parse(&text) else {
                continue;
            };
            if is_proxy {
                self.stats
                    .record(&id, stats::edges_from_scrape(&source, &samples));
                self.sidecars
                    .insert(id.clone(), stats::sidecar_counts(&samples));
                self.backends
                    .record(&id, stats::backends_from_scrape(&source, &samples));
                self.extras.insert(
                    id.clone(),
                    (source.clone(), stats::backend_extras(&samples)),
                );
            } else {
                let (edges, note) = plaintext_client_edges(&source, &samples);
                if let Some(n) = note {
                    notes.push(n);
                }
                self.stats.record(&id, edges);
            }
        }
        // Opaque TCP edges count connections, and carry no latency: say so beside them.
        for c in &self.dev.topology.clients {
            if self
                .dev
                .topology
                .service(&c.target)
                .is_some_and(|s| s.protocol == spec::AppProtocol::Tcp)
            {
                notes.push((
                    format!("{}>{}", c.key(), c.target),
                    "opaque TCP: RPS and TOTAL count connections".to_string(),
                ));
            }
        }
        self.notes = notes;
        let clients: Vec<(String, SocketAddr)> = self
            .plan
            .pods
            .iter()
            .filter(|p| matches!(p.role, Role::Client { .. }))
            .map(|p| (pod_key(p), SocketAddr::from(([127, 0, 0, 1], p.app_port))))
            .collect();
        let bodies =
            futures::future::join_all(clients.iter().map(|(_, a)| self.get(*a, "/metrics"))).await;
        for ((id, _), body) in clients.into_iter().zip(bodies) {
            if let Some((200, text)) = body
                && let Ok(samples) = metrics::parse(&text)
            {
                let tally = rollout_edge::client_tally(&samples);
                let failed = |t: &rollout_edge::Tally| -> f64 {
                    t.iter()
                        .filter(|(k, _)| k.as_str() != "ok")
                        .map(|(_, v)| v)
                        .sum()
                };
                let before = self.ro.client_counts.get(&id).map(failed);
                if before.is_some_and(|b| failed(&tally) > b) && !std::io::stdout().is_terminal() {
                    // In a log, when a request failed, next to the rollout's steps.
                    println!("{} {id}: failed requests so far {tally:?}", now_hms());
                }
                self.ro.client_counts.insert(id, tally);
            }
        }
        let now = Instant::now();
        self.views = self.stats.window(now);
        self.backend_views = self.backends.window(now);
        self.publish_graph(now);
    }

    /// Hands the window to the dashboard.
    fn publish_graph(&mut self, now: Instant) {
        let secs = self
            .last_scrape
            .map(|t| now.saturating_duration_since(t).as_secs_f64())
            .unwrap_or(0.0);
        self.last_scrape = Some(now);
        let mut refused: BTreeMap<String, f64> = BTreeMap::new();
        for p in &self.plan.pods {
            if let Some(c) = self.sidecars.get(&pod_key(p)) {
                *refused.entry(p.workload_key()).or_default() += c.inbound_refused;
            }
        }
        let rates = refused
            .iter()
            .map(|(k, total)| {
                let before = self.refused_prev.get(k).copied().unwrap_or(*total);
                let rate = if secs > 0.0 {
                    (total - before).max(0.0) / secs
                } else {
                    0.0
                };
                (k.clone(), rate)
            })
            .collect();
        self.refused_prev = refused;
        let graph = super::graph::graph(
            &self.plan.pods,
            &self.dev.objects,
            &self.params.trust_domain,
            &super::graph::Window {
                views: &self.views,
                backends: &self.backend_views,
                refused_rps: &rates,
                at_ms: jiff::Timestamp::now().as_millisecond(),
                secs,
            },
        );
        self.graph_tx.send_replace(graph);
    }

    /// Expected edges (declared calls of meshed workloads) without successful mTLS traffic.
    fn missing_edges(&self) -> Vec<String> {
        let mut expected = BTreeSet::new();
        for s in &self.dev.topology.services {
            for c in &s.calls {
                expected.insert((s.key(), c.clone()));
            }
        }
        for c in &self.dev.topology.clients {
            if c.meshed {
                expected.insert((c.key(), c.target.clone()));
            }
        }
        expected
            .into_iter()
            .filter(|(src, dst)| {
                !self.views.iter().any(|v| {
                    v.key.mtls
                        && &v.key.source == src
                        && &v.key.destination == dst
                        && v.total_successes > 0.0
                })
            })
            .map(|(s, d)| format!("{s} -> {d}"))
            .collect()
    }

    fn unexpected_exits(&mut self) -> Vec<String> {
        self.procs
            .iter_mut()
            .filter_map(|p| {
                p.poll().map(|st| {
                    format!(
                        "{} ({st}); log {}:\n{}",
                        p.name,
                        p.log.display(),
                        p.log_tail(5)
                    )
                })
            })
            .collect()
    }

    fn intro(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "trellis dev: {} pods from {} (state in {})\n",
            self.plan.pods.len(),
            self.opts.dir.display(),
            self.state_dir.display()
        ));
        s.push_str(&format!("{}\n", self.identity_line()));
        s.push_str(&format!("Dashboard: {}\n", self.dashboard_url));
        s.push_str(&format!(
            "Operator metrics (identity endpoint, injector): http://{}/metrics\n",
            self.op_metrics_addr
        ));
        for p in &self.plan.pods {
            if let Some(x) = p.proxy {
                s.push_str(&format!(
                    "  {:<16} metrics http://127.0.0.1:{}/metrics   logs {}\n",
                    p.name,
                    x.admin,
                    self.state_dir
                        .join("logs")
                        .join(format!("{}.{}.proxy.log", p.name, p.namespace))
                        .display()
                ));
            }
        }
        s.push_str(&format!(
            "Prometheus scrape config: {}\n",
            self.state_dir.join("prometheus.yml").display()
        ));
        if let Some(c) = &self.opts.otlp {
            let mesh = control::mesh_of(&self.dev);
            // The names the sidecars give themselves (`service.name`).
            let services: std::collections::BTreeSet<String> = self
                .plan
                .pods
                .iter()
                .filter(|p| p.proxy.is_some())
                .map(|p| {
                    let pod = trellis_proxy::spans::Pod {
                        service_account: Some(p.service_account.clone()),
                        ..Default::default()
                    };
                    trellis_proxy::spans::service_name(&p.labels, &pod)
                })
                .collect();
            // `--otlp` was validated by the same parser when the flags were read.
            let (protocol, url) = match trellis_proxy::config::parse_collector(c) {
                Ok(c) => (
                    match c.protocol {
                        trellis_proxy::config::CollectorProtocol::Grpc => "OTLP/gRPC",
                        trellis_proxy::config::CollectorProtocol::HttpProtobuf => "OTLP/HTTP",
                    },
                    c.url,
                ),
                Err(_) => ("OTLP", c.clone()),
            };
            s.push_str(&format!(
                "Traces: every sidecar exports spans over {protocol} to {url} ({}% of new traces \
                 sampled); look them up in that collector's UI (Jaeger all-in-one: \
                 http://127.0.0.1:16686) by service: {}\n",
                mesh.spec.observability.tracing.sampling_percent,
                services.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
        s
    }

    fn identity_line(&self) -> String {
        self.cred_desc.clone()
    }

    fn frame(&mut self) -> String {
        let td = self.params.trust_domain.clone();
        let mut rows = Vec::new();
        let mut exited_by_pod: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (pod, pp) in &self.pod_procs {
            for i in [pp.proxy, pp.app].into_iter().flatten() {
                if let Some(st) = self.procs[i].poll() {
                    exited_by_pod
                        .entry(pod.clone())
                        .or_default()
                        .push(format!("{} ({st})", self.procs[i].name));
                }
            }
        }
        let mut seen = BTreeSet::new();
        for p in &self.plan.pods {
            let key = p.workload_key();
            if !seen.insert(key.clone()) {
                continue;
            }
            let pods: Vec<&Pod> = self
                .plan
                .pods
                .iter()
                .filter(|q| q.workload_key() == key)
                .collect();
            let ready = pods
                .iter()
                .filter(|q| match q.proxy {
                    Some(_) => self.ready.get(&pod_key(q)).copied().unwrap_or(false),
                    None => !exited_by_pod.contains_key(&pod_key(q)),
                })
                .count() as u32;
            let mut sc = stats::SidecarCounts::default();
            for q in &pods {
                if let Some(c) = self.sidecars.get(&pod_key(q)) {
                    sc.add(c);
                }
            }
            rows.push(ServiceRow {
                versions: p.proxy.is_some().then(|| self.versions_of(&pods)),
                sidecar: (p.proxy.is_some()).then(|| sc.describe()),
                key,
                kind: match p.role {
                    Role::Service { .. } => "service",
                    Role::Client { .. } => "client",
                },
                replicas: pods.len() as u32,
                ready,
                identity: control::identity_of(p, &td),
                exited: pods
                    .iter()
                    .flat_map(|q| exited_by_pod.get(&pod_key(q)).cloned().unwrap_or_default())
                    .collect(),
            });
        }
        let header = format!(
            "trellis dev — {} — up {:.0}s — {}",
            self.opts.dir.display(),
            self.started.elapsed().as_secs_f64(),
            self.identity_line()
        );
        let mut status = self.status.clone();
        if let Some(e) = &self.reload_error {
            status.push(format!("ERROR {e}"));
        }
        let footer = format!(
            "Dashboard: {}\nMetrics: {}\nPrometheus scrape config: {}\nEdit {}/*.yaml: TrafficPolicy and \
             PeerAuthentication changes recompile and the proxies reload live; a new \
             spec.proxy.image in the Mesh rolls the proxies over. Ctrl-C stops everything.\n",
            self.dashboard_url,
            self.plan
                .pods
                .iter()
                .filter_map(|p| p
                    .proxy
                    .map(|x| format!("http://127.0.0.1:{}/metrics ({})", x.admin, p.name)))
                .take(3)
                .chain(std::iter::once("...".to_string()))
                .collect::<Vec<_>>()
                .join(" "),
            self.state_dir.join("prometheus.yml").display(),
            self.opts.dir.display()
        );
        let mut sums: BTreeMap<String, stats::BackendExtras> = BTreeMap::new();
        for (source, per_backend) in self.extras.values() {
            for (b, x) in per_backend {
                sums.entry(format!("{source}>{b}")).or_default().add(x);
            }
        }
        let backend_notes: Vec<(String, String)> = sums
            .into_iter()
            .map(|(k, x)| {
                (
                    k,
                    format!(
                        "retries {}  ejections {}  ejected now {}",
                        x.retries, x.ejections, x.ejected_now
                    ),
                )
            })
            .collect();
        let mut rollout = self.rollout_lines();
        for (workload, tally) in self.client_totals() {
            let ok = tally.get("ok").copied().unwrap_or(0.0);
            let failed: Vec<String> = tally
                .iter()
                .filter(|(k, v)| k.as_str() != "ok" && **v > 0.0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let total_failed: f64 = tally
                .iter()
                .filter(|(k, _)| k.as_str() != "ok")
                .map(|(_, v)| v)
                .sum();
            rollout.push(format!(
                "CLIENT {workload} requests over the whole run (restarts included): ok {ok} failed {total_failed}{}",
                if failed.is_empty() { String::new() } else { format!(" ({})", failed.join(" ")) }
            ));
        }
        display::render(&Frame {
            rollout: &rollout,
            header: &header,
            status_lines: &status,
            services: &rows,
            edges: &self.views,
            backends: &self.backend_views,
            backend_notes: &backend_notes,
            edge_notes: &self.notes,
            footer: &footer,
        })
    }

    /// A Prometheus config scraping every sidecar and the operator's metrics, labelled like the
    /// Kubernetes service discovery would label them.
    fn write_prometheus_config(&self) -> anyhow::Result<()> {
        let mut s = String::from(
            "# Written by `trellis dev`: scrape every local sidecar and the operator.\n\
             # prometheus --config.file=<this file>\n\
             global:\n  scrape_interval: 5s\nscrape_configs:\n  - job_name: trellis-proxies\n    static_configs:\n",
        );
        for p in &self.plan.pods {
            if let Some(x) = p.proxy {
                s.push_str(&format!(
                    "      - targets: ['127.0.0.1:{}']\n        labels: {{namespace: {}, pod: {}, app: {}}}\n",
                    x.admin, p.namespace, p.name, p.workload
                ));
            }
        }
        // The operator's own metrics, labelled as a ServiceMonitor would label its pod.
        let labels: Vec<String> = operator_metrics::scrape_labels()
            .into_iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        s.push_str(&format!(
            "  - job_name: trellis-operator\n    static_configs:\n      - targets: ['{}']\n        labels: {{{}}}\n",
            self.op_metrics_addr,
            labels.join(", ")
        ));
        std::fs::write(self.state_dir.join("prometheus.yml"), s)?;
        Ok(())
    }
}

/// The plaintext client's own counters as an edge without mTLS, and a note on how its
/// failures failed (a `Strict` sidecar closes the connection: `closed`).
fn plaintext_client_edges(
    source: &str,
    samples: &[metrics::Sample],
) -> (BTreeMap<EdgeKey, stats::Counters>, Option<(String, String)>) {
    let mut out = BTreeMap::new();
    let mut failed: BTreeMap<String, f64> = BTreeMap::new();
    for s in samples {
        if s.name != super::demo::LOAD_REQUESTS {
            continue;
        }
        let (Some(target), Some(outcome)) = (s.label("target"), s.label("outcome")) else {
            continue;
        };
        let dst = target.rsplit_once(':').map(|x| x.0).unwrap_or(target);
        let key = EdgeKey {
            source: source.to_string(),
            destination: dst.to_string(),
            mtls: false,
        };
        let c: &mut stats::Counters = out.entry(key).or_default();
        c.requests += s.value;
        if outcome == "ok" {
            c.successes += s.value;
        } else {
            *failed.entry(outcome.to_string()).or_default() += s.value;
        }
    }
    let note = out.keys().next().map(|k| {
        let f: Vec<String> = failed
            .iter()
            .filter(|(_, v)| **v > 0.0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        (
            format!("{}>{}", k.source, k.destination),
            if f.is_empty() {
                "plaintext, accepted".to_string()
            } else {
                format!("plaintext, refused so far: {}", f.join(" "))
            },
        )
    });
    (out, note)
}

/// Paths, sizes and modification times of the directory's YAML files.
fn dir_fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    spec::yaml_files(dir)
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(&p).ok();
            let len = m.as_ref().map(|m| m.len()).unwrap_or(0);
            let mtime = m.and_then(|m| m.modified().ok());
            (p, len, mtime)
        })
        .collect()
}

fn now_hms() -> String {
    jiff::Zoned::now().strftime("%H:%M:%S").to_string()
}
