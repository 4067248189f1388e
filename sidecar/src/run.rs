//! The proxy process: wires config reload, credentials, listeners, admin and shutdown.
//!
//! [`start`] runs everything on the current tokio runtime and returns the bound addresses, so
//! integration tests run whole proxies in-process on `127.0.0.1:0`; [`main`] adds the runtime,
//! logging, credentials from files and signal handling.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;

use crate::admin::Admin;
use crate::creds::CredentialsRx;
use crate::metrics::{Direction, Metrics};
use crate::probe::{ProbeSet, Prober};
use crate::proxy::inbound::Forward;
use crate::proxy::mtls::TlsCache;
use crate::proxy::tcp::FLUSH_INTERVAL;
use crate::proxy::upstream::{Pool, SourceAddr};
use crate::proxy::{Shared, accept_loop, inbound_http_builder, outbound_http_builder};
use crate::reload::{ConfigRx, Watcher};
use crate::shutdown::Shutdown;
use crate::traffic::{Dispatcher, InboundRateLimiter, TrafficMetrics};

/// Flags and environment of `trellis-proxy run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// The projected volume: `config.json`, `labels`, `ca.pem`, `token`.
    #[arg(long, env = "TRELLIS_DIR", default_value = "/var/run/trellis")]
    pub dir: PathBuf,
    /// Outbound listeners, comma separated. Loopback: the `OUTPUT` chain's REDIRECT delivers
    /// there, and nothing outside the pod can reach it. An IPv6 address is skipped (with a
    /// log line) when the kernel has no IPv6.
    #[arg(
        long,
        env = "TRELLIS_OUTBOUND_ADDR",
        value_delimiter = ',',
        default_value = "127.0.0.1:15001,[::1]:15001"
    )]
    pub outbound_addr: Vec<SocketAddr>,
    /// Inbound listeners, comma separated: all addresses of both families (the `PREROUTING`
    /// REDIRECT delivers to the pod IP); non-redirected connections are closed.
    #[arg(
        long,
        env = "TRELLIS_INBOUND_ADDR",
        value_delimiter = ',',
        default_value = "0.0.0.0:15006,[::]:15006"
    )]
    pub inbound_addr: Vec<SocketAddr>,
    /// Admin listeners, comma separated (the kubelet probes the pod IP of either family).
    #[arg(
        long,
        env = "TRELLIS_ADMIN_ADDR",
        value_delimiter = ',',
        default_value = "0.0.0.0:15020,[::]:15020"
    )]
    pub admin_addr: Vec<SocketAddr>,
    /// Overrides the config's identity endpoint.
    #[arg(long, env = "TRELLIS_IDENTITY_ENDPOINT")]
    pub identity_endpoint: Option<String>,
    /// PEM certificate chain (leaf first): credentials from files instead of the identity
    /// endpoint. The trust bundle is `<dir>/ca.pem`.
    #[arg(long, env = "TRELLIS_CERT_FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key for `--cert-file`.
    #[arg(long, env = "TRELLIS_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    #[arg(long, env = "TRELLIS_POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    #[arg(long, env = "TRELLIS_POD_NAME")]
    pub pod_name: Option<String>,
    #[arg(long, env = "TRELLIS_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,
    /// `tracing` filter, e.g. `info` or `trellis_proxy=debug`.
    #[arg(long, env = "TRELLIS_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    #[arg(long, env = "TRELLIS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
    /// How long in-flight requests may take to finish after SIGTERM (`5s`, `500ms`).
    #[arg(long, env = "TRELLIS_DRAIN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Local mode, for `trellis dev` and benchmarks (no iptables): the outbound listener also
    /// serves connections that were not redirected, routing HTTP by the `Host` header. Never
    /// in a pod: there it would let anyone who reaches the port send requests with the pod's
    /// identity.
    #[arg(long, env = "TRELLIS_LOCAL_MODE")]
    pub local_mode: bool,
    /// Local mode only: inbound traffic goes here instead of the original destination.
    #[arg(long, env = "TRELLIS_INBOUND_TARGET", requires = "local_mode")]
    pub inbound_target: Option<SocketAddr>,
    /// Forward inbound traffic to `127.0.0.1`/`[::1]` instead of the pod IP, for applications
    /// that bind only to localhost (pod annotation `trellis.dev/inbound-to-localhost: "true"`).
    /// Risk: every service the application binds to loopback, debug and admin servers meant to
    /// stay private included, becomes reachable from the mesh.
    #[arg(
        long,
        env = "TRELLIS_INBOUND_TO_LOCALHOST",
        conflicts_with = "inbound_target"
    )]
    pub inbound_to_localhost: bool,
    /// Ports of this pod proxied as opaque TCP without protocol detection (mTLS still applies),
    /// in addition to the config's `skipDetectionPorts`: the injector sets this from the pod's
    /// `trellis.dev/opaque-ports` annotation, e.g. `3306,6379`.
    #[arg(long, env = "TRELLIS_OPAQUE_PORTS", value_delimiter = ',')]
    pub opaque_ports: Vec<u16>,
    /// How often open TCP connections add their bytes to `trellis_proxy_tcp_transfer_bytes_total`
    /// (default `15s`, as in Istio). Shorter follows traffic more closely, at the cost of a timer
    /// wake-up per open connection per interval.
    #[arg(long, env = "TRELLIS_TCP_FLUSH_INTERVAL", value_parser = parse_flush_interval)]
    pub tcp_flush_interval: Option<Duration>,
    /// Inbound connections that have not authenticated yet (protocol detection or the mTLS
    /// handshake in progress) allowed from one peer address; more are closed at once (see
    /// [`crate::proxy::inbound::Limits`]). Default 64.
    #[arg(long, env = "TRELLIS_INBOUND_MAX_PENDING_PER_PEER", value_parser = parse_cap)]
    pub inbound_max_pending_per_peer: Option<usize>,
    /// Inbound connections that have not authenticated yet, all peers together. Default 1024.
    #[arg(long, env = "TRELLIS_INBOUND_MAX_PENDING", value_parser = parse_cap)]
    pub inbound_max_pending: Option<usize>,
    /// The app's kubelet probes, as the injector rewrote them, as JSON keyed by path (see
    /// [`crate::probe`]); `GET /app-health/...` on the admin port runs these and nothing else.
    #[arg(long, env = crate::probe::ENV_APP_PROBES, default_value = "", hide_default_value = true, value_parser = parse_probes)]
    pub app_probes: ProbeSet,
    /// The proxy version this process reports as `trellis_proxy_build_info{version}` (default: the
    /// crate version). In a cluster the injector passes the image the pod was injected with (the
    /// pod's `trellis.dev/proxy-version`), which the operator's
    /// `trellis_operator_desired_proxy_info` is compared with; `trellis dev`, whose
    /// proxies are all this one binary, names the version it started each proxy as, so a local
    /// rollout can be seen and counted.
    #[arg(long, env = "TRELLIS_PROXY_VERSION", default_value = env!("CARGO_PKG_VERSION"))]
    pub proxy_version: String,
    /// The pod's IP (downward API `status.podIP`): where app probes go, as the kubelet's would.
    /// Without it they go to 127.0.0.1.
    #[arg(long, env = "TRELLIS_POD_IP")]
    pub pod_ip: Option<IpAddr>,
    /// Worker threads; `0` uses every core. Overrides the CPU allowance (see
    /// [`crate::workers`]); 1 runs tokio's current-thread runtime.
    #[arg(long, env = crate::workers::ENV_CONCURRENCY, value_parser = crate::workers::parse_concurrency)]
    pub concurrency: Option<usize>,
    /// The container's CPU limit (or request) in millicores, from the downward API; rounded up
    /// to whole cores for the worker count. Without it, and without `--concurrency`, one core.
    #[arg(long, env = crate::workers::ENV_CPU_MILLIS)]
    pub cpu_millis: Option<String>,
    /// The operator's discovery stream, `host:port` (comma-separated for several), set by the
    /// injector. Without it the proxy knows only what its ConfigMap lists.
    #[arg(
        long,
        env = "TRELLIS_DISCOVERY_ADDR",
        value_delimiter = ',',
        requires = "discovery_id"
    )]
    pub discovery_addr: Vec<String>,
    /// The SPIFFE ID the discovery server must present (the operator's).
    #[arg(long, env = "TRELLIS_DISCOVERY_ID")]
    pub discovery_id: Option<String>,
}

fn parse_probes(s: &str) -> Result<ProbeSet, String> {
    s.parse()
        .map_err(|e: crate::probe::ProbeSetError| e.to_string())
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// `250ms`, `5s`, `2m`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 5s or 500ms)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s or m)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A [`parse_duration`] that is not zero: a zero period would mean flushing in a busy loop.
fn parse_flush_interval(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Err(format!("{s:?}: the flush interval must be more than zero")),
        d => Ok(d),
    }
}

/// A connection cap: a whole number from 1 (0 would refuse every connection).
fn parse_cap(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err(format!("{s:?}: the cap must be at least 1")),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

/// Raises the soft limit on open files to the hard limit, as the Go runtime does at start:
/// container runtimes may leave the soft limit at 1024 (containerd 2 does) while allowing far
/// more, and every connection the proxy holds costs one descriptor (two when it is forwarded).
/// An unlimited hard limit is taken as Linux's default ceiling (`fs.nr_open`, 1 048 576): the
/// kernel refuses an unlimited soft limit for open files. Returns the soft limit in force
/// afterwards (`None`: unlimited).
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    const NR_OPEN_DEFAULT: u64 = 1 << 20;
    let lim = getrlimit(Resource::Nofile);
    let target = lim.maximum.unwrap_or(NR_OPEN_DEFAULT);
    if lim.current.is_some_and(|c| c < target) {
        let raised = Rlimit {
            current: Some(target),
            maximum: lim.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => return Some(target),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
        }
    }
    lim.current
}

/// Where to listen and where the files are; the in-process subset of [`RunArgs`].
#[derive(Clone, Debug)]
pub struct Options {
    pub dir: PathBuf,
    pub outbound_addrs: Vec<SocketAddr>,
    pub inbound_addrs: Vec<SocketAddr>,
    pub admin_addrs: Vec<SocketAddr>,
    /// See [`RunArgs::local_mode`].
    pub local_mode: bool,
    /// See [`RunArgs::inbound_target`]; refused at start without `local_mode`.
    pub inbound_target: Option<SocketAddr>,
    /// See [`RunArgs::inbound_to_localhost`].
    pub inbound_to_localhost: bool,
    /// Bounds of the admin server; tests shorten them.
    pub admin_limits: crate::admin::Limits,
    /// Ports never detected (see [`RunArgs::opaque_ports`]).
    pub opaque_ports: Vec<u16>,
    /// See [`RunArgs::tcp_flush_interval`]; tests shorten it to see bytes of open connections
    /// without waiting 15 s.
    pub tcp_flush_interval: Duration,
    /// Bounds of the inbound listener (caps from flags; tests shorten the timeouts).
    pub inbound_limits: crate::proxy::inbound::Limits,
    /// See [`RunArgs::app_probes`].
    pub app_probes: ProbeSet,
    /// Where app probes go (see [`RunArgs::pod_ip`]); `None` is 127.0.0.1.
    pub pod_ip: Option<IpAddr>,
    /// The pod, as exported spans name it (resource attributes).
    pub pod: crate::spans::Pod,
    /// The operator's discovery stream, if the injector configured one.
    pub discovery: Option<crate::discovery::resolver::Settings>,
}

impl From<&RunArgs> for Options {
    fn from(a: &RunArgs) -> Self {
        Self {
            dir: a.dir.clone(),
            outbound_addrs: a.outbound_addr.clone(),
            inbound_addrs: a.inbound_addr.clone(),
            admin_addrs: a.admin_addr.clone(),
            local_mode: a.local_mode,
            inbound_target: a.inbound_target,
            inbound_to_localhost: a.inbound_to_localhost,
            admin_limits: crate::admin::Limits::default(),
            opaque_ports: a.opaque_ports.clone(),
            tcp_flush_interval: a.tcp_flush_interval.unwrap_or(FLUSH_INTERVAL),
            inbound_limits: {
                let d = crate::proxy::inbound::Limits::default();
                crate::proxy::inbound::Limits {
                    max_pending_per_peer: a
                        .inbound_max_pending_per_peer
                        .unwrap_or(d.max_pending_per_peer),
                    max_pending: a.inbound_max_pending.unwrap_or(d.max_pending),
                    ..d
                }
            },
            app_probes: a.app_probes.clone(),
            pod_ip: a.pod_ip,
            pod: crate::spans::Pod {
                name: a.pod_name.clone(),
                namespace: a.pod_namespace.clone(),
                service_account: a.service_account.clone(),
            },
            discovery: match (&a.discovery_addr, &a.discovery_id) {
                (addrs, Some(id)) if !addrs.is_empty() => {
                    Some(crate::discovery::resolver::Settings {
                        addrs: addrs.clone(),
                        operator_id: id.clone(),
                    })
                }
                _ => None,
            },
        }
    }
}

/// A started proxy; each address is the first one bound of its kind.
pub struct Running {
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shutdown: Shutdown,
    pub metrics: Arc<Metrics>,
    /// The config in force (for the identity client, which may take its endpoint from it).
    pub config: ConfigRx,
    /// The span exporter, flushed on the way out.
    pub tracing: Arc<crate::spans::Tracing>,
    /// Wake-ups when the config directory (and the trust bundle in it) may have changed: one
    /// inotify instance for every reader of that directory.
    pub dir_changes: crate::fswatch::Changes,
}

/// How long a stopping proxy waits for its last spans to reach the collector: short against
/// the pod's grace period, long enough for one export to a healthy collector.
pub const SPAN_FLUSH: Duration = Duration::from_secs(2);

impl Running {
    /// Waits for the shutdown signal, drains for at most `deadline`, then sends the spans still
    /// queued (for at most [`SPAN_FLUSH`]).
    pub async fn wait(&self, deadline: Duration) -> bool {
        self.shutdown.cancelled().await;
        let drained = self.shutdown.drain(deadline).await;
        if !self.tracing.flush(SPAN_FLUSH).await {
            tracing::warn!("spans still queued at exit were not all exported");
        }
        drained
    }
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no {what} address to listen on")]
    NoAddress { what: &'static str },
    #[error("--inbound-target is for local mode only: add --local-mode")]
    InboundTargetWithoutLocalMode,
}

/// One listener. IPv6 sockets are IPv6-only, so `[::]:15006` and `0.0.0.0:15006` coexist.
fn bind_one(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

/// Whether a failed IPv6 bind means "this kernel or pod has no IPv6" (skip it) rather than a
/// real problem (refuse to start).
fn no_ipv6(addr: SocketAddr, e: &std::io::Error) -> bool {
    const EAFNOSUPPORT: i32 = 97;
    addr.is_ipv6()
        && (e.kind() == std::io::ErrorKind::AddrNotAvailable
            || e.raw_os_error() == Some(EAFNOSUPPORT))
}

/// Binds every address of one kind. An IPv6 address the kernel cannot offer is skipped with a
/// log line (the init rules then have no IPv6 traffic to redirect either); any other failure,
/// or nothing bound at all, stops the start.
fn bind_all(addrs: &[SocketAddr], what: &'static str) -> Result<Vec<TcpListener>, StartError> {
    let mut out = Vec::new();
    for &addr in addrs {
        match bind_one(addr) {
            Ok(l) => out.push(l),
            Err(e) if no_ipv6(addr, &e) => {
                tracing::info!(%addr, error = %e, "IPv6 not available here; not listening on it");
            }
            Err(source) => return Err(StartError::Bind { addr, source }),
        }
    }
    if out.is_empty() {
        return Err(StartError::NoAddress { what });
    }
    Ok(out)
}

/// Starts every task of a proxy on the current runtime.
pub async fn start(opts: Options, creds: CredentialsRx) -> Result<Running, StartError> {
    let inbound_forward = match (opts.inbound_target, opts.local_mode) {
        (Some(_), false) => return Err(StartError::InboundTargetWithoutLocalMode),
        (Some(t), true) => Forward::Fixed(t),
        (None, _) if opts.inbound_to_localhost => Forward::Localhost,
        (None, _) => Forward::OriginalDst,
    };
    let outbound = bind_all(&opts.outbound_addrs, "outbound")?;
    let inbound = bind_all(&opts.inbound_addrs, "inbound")?;
    let admin_l = bind_all(&opts.admin_addrs, "admin")?;
    let traffic_metrics = TrafficMetrics::new();
    let metrics = Arc::new(Metrics::with_traffic(&traffic_metrics));
    let (flavor, workers) = crate::workers::current();
    metrics.set_runtime(flavor, workers);
    let shutdown = Shutdown::new();
    let tls = Arc::new(TlsCache::new(creds.clone()));
    let pool = Pool::new(tls.clone());
    let inbound_pool = Pool::with_source(tls.clone(), SourceAddr::InboundLoopback);
    let dispatcher = Arc::new(Dispatcher::new_with_metrics(
        Arc::new(pool.clone()),
        traffic_metrics,
    ));
    let limiter: Arc<Mutex<Option<Arc<InboundRateLimiter>>>> = Arc::default();

    let tracing = Arc::new(crate::spans::Tracing::new(
        opts.pod.clone(),
        metrics.spans_dropped.clone(),
    ));

    let (mut watcher, files) = Watcher::new(&opts.dir, metrics.clone());
    let hook: Arc<dyn Fn(&crate::reload::Snapshot) + Send + Sync> = {
        let dispatcher = dispatcher.clone();
        let limiter = limiter.clone();
        let tracing = tracing.clone();
        Arc::new(move |snap: &crate::reload::Snapshot| {
            dispatcher.update(&snap.config);
            tracing.apply(
                snap.config.mesh.telemetry.tracing.as_ref(),
                &snap.labels,
                &snap.config.namespace,
            );
            let wanted = snap
                .config
                .inbound_for(&snap.labels)
                .and_then(|p| p.rate_limit.as_ref());
            let mut slot = limiter.lock().expect("limiter lock");
            let same = match (slot.as_ref(), wanted) {
                (Some(cur), Some(w)) => cur.limit() == w,
                (None, None) => true,
                _ => false,
            };
            if !same {
                // A changed limit starts with full buckets; an unchanged one keeps its state.
                *slot = wanted
                    .map(|w| Arc::new(InboundRateLimiter::with_metrics(w, dispatcher.metrics())));
            }
        })
    };
    // With discovery, the data path reads the ConfigMap's config with the learned Services
    // laid over it (see `crate::discovery::resolver`); without, the ConfigMap's as it is.
    let discovery = opts
        .discovery
        .clone()
        .map(crate::discovery::resolver::Resolver::new);
    let config = match &discovery {
        None => {
            let hook = hook.clone();
            watcher.on_apply(Box::new(move |snap| hook(snap)));
            watcher.poll();
            files
        }
        Some(resolver) => {
            watcher.poll();
            let initial = files.borrow().clone();
            if let Some(snap) = &initial {
                hook(snap);
            }
            let (tx, rx) = tokio::sync::watch::channel(initial);
            let hook = hook.clone();
            tokio::spawn(resolver.clone().merge(files, tx, move |snap| hook(snap)));
            tokio::spawn(resolver.clone().run(creds.clone(), shutdown.token()));
            rx
        }
    };
    let status = watcher.status();
    let dir_changes = crate::fswatch::spawn(vec![opts.dir.clone()], shutdown.token());
    if !dir_changes.watching() {
        tracing::info!(dir = %opts.dir.display(), "the config directory is not watched (yet); polling it");
    }
    tokio::spawn(watcher.run(dir_changes.clone(), shutdown.token()));

    let addrs = |ls: &[TcpListener]| -> Vec<SocketAddr> {
        ls.iter()
            .map(|l| l.local_addr().expect("bound listener has an address"))
            .collect()
    };
    let (outbound_addrs, inbound_addrs, admin_addrs) =
        (addrs(&outbound), addrs(&inbound), addrs(&admin_l));
    let mut own_ports: Vec<u16> = [&outbound_addrs, &inbound_addrs, &admin_addrs]
        .into_iter()
        .flatten()
        .map(|a| a.port())
        .collect();
    own_ports.sort_unstable();
    own_ports.dedup();
    let running = Running {
        outbound_addr: outbound_addrs[0],
        inbound_addr: inbound_addrs[0],
        admin_addr: admin_addrs[0],
        shutdown: shutdown.clone(),
        metrics: metrics.clone(),
        config: config.clone(),
        tracing: tracing.clone(),
        dir_changes,
    };

    let shared = Arc::new(Shared {
        config: config.clone(),
        tls,
        dispatcher,
        pool,
        inbound_pool,
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        local_mode: opts.local_mode,
        inbound: inbound_forward,
        own_ports,
        opaque_ports: opts.opaque_ports.clone(),
        inbound_limiter: limiter,
        // `Options` can be built in code, past the flag's check: tokio's interval panics on zero.
        tcp_flush_interval: opts.tcp_flush_interval.max(Duration::from_millis(1)),
        http: outbound_http_builder(),
        inbound_http: inbound_http_builder(opts.inbound_limits.header_read_timeout),
        inbound_limits: opts.inbound_limits,
        inbound_pending: crate::conn_limit::Gate::evicting(
            opts.inbound_limits.max_pending,
            opts.inbound_limits.max_pending_per_peer,
        ),
        tracing,
        discovery,
    });
    for l in outbound {
        tokio::spawn(accept_loop(l, shared.clone(), Direction::Outbound));
    }
    for l in inbound {
        tokio::spawn(accept_loop(l, shared.clone(), Direction::Inbound));
    }
    tokio::spawn(track_cert_expiry(creds.clone(), metrics.clone()));
    let admin = Arc::new(Admin::new(
        metrics,
        config,
        status,
        creds,
        shutdown,
        Arc::new(Prober::new(
            opts.app_probes,
            opts.pod_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        )),
        opts.admin_limits.clone(),
    ));
    for l in admin_l {
        tokio::spawn(admin.clone().serve(l));
    }
    tracing::info!(
        outbound = ?outbound_addrs,
        inbound = ?inbound_addrs,
        admin = ?admin_addrs,
        local_mode = opts.local_mode,
        inbound_forward = ?inbound_forward,
        "proxy listening"
    );
    Ok(running)
}

/// Keeps `trellis_proxy_cert_expiry_timestamp_seconds` in step with the credentials.
async fn track_cert_expiry(mut creds: CredentialsRx, metrics: Arc<Metrics>) {
    loop {
        let not_after = creds.borrow_and_update().as_ref().map(|c| c.not_after);
        if let Some(t) = not_after {
            let secs = t
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            metrics.cert_expiry.set(secs);
        }
        if creds.changed().await.is_err() {
            return;
        }
    }
}

fn init_logging(args: &RunArgs) {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

pub fn main(args: RunArgs) -> ExitCode {
    init_logging(&args);
    let available = std::thread::available_parallelism().map_or(1, usize::from);
    let (sizing, warning) =
        crate::workers::size(args.concurrency, args.cpu_millis.as_deref(), available);
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
        tracing::warn!(
            "TOKIO_WORKER_THREADS is ignored; use --concurrency or {}",
            crate::workers::ENV_CONCURRENCY
        );
    }
    match raise_fd_limit() {
        Some(n) => tracing::info!(open_files = n, "open file limit"),
        None => tracing::info!("open file limit: unlimited"),
    }
    let runtime = match crate::workers::build(sizing) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        workers = sizing.workers,
        flavor = sizing.flavor().as_str(),
        source = %sizing.source,
        available_cores = available,
        "runtime"
    );
    runtime.block_on(async move {
        let (creds_tx, creds_rx) = crate::creds::channel();
        let running = match start(Options::from(&args), creds_rx).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return ExitCode::from(64);
            }
        };
        match (&args.cert_file, &args.key_file) {
            (Some(cert), Some(key)) => {
                tokio::spawn(crate::tls::watch_pem_files(
                    cert.clone(),
                    key.clone(),
                    args.dir.join("ca.pem"),
                    creds_tx,
                ));
            }
            _ => {
                tokio::spawn(identity_task(
                    args.identity_endpoint.clone(),
                    running.config.clone(),
                    args.dir.clone(),
                    running.dir_changes.clone(),
                    creds_tx,
                    running.shutdown.token(),
                ));
            }
        }
        running.metrics.set_proxy_version(&args.proxy_version);
        let sd = running.shutdown.clone();
        tokio::spawn(async move {
            crate::shutdown::signal().await;
            sd.trigger();
        });
        running.wait(args.drain_timeout).await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

/// Runs the identity client against `--identity-endpoint`, or the config's
/// `mesh.identityEndpoint` once a config names one. The proxy stays not-ready until then.
async fn identity_task(
    flag: Option<String>,
    mut config: ConfigRx,
    dir: PathBuf,
    changes: crate::fswatch::Changes,
    tx: crate::creds::CredentialsTx,
    stop: tokio_util::sync::CancellationToken,
) {
    let endpoint = match flag {
        Some(e) => e,
        None => loop {
            let from_config = config
                .borrow_and_update()
                .as_ref()
                .and_then(|s| s.config.mesh.identity_endpoint.clone());
            if let Some(e) = from_config {
                break e;
            }
            tracing::info!("waiting for an identity endpoint (flag or config)");
            tokio::select! {
                r = config.changed() => if r.is_err() { return },
                _ = stop.cancelled() => return,
            }
        },
    };
    if let Err(e) = crate::identity::run_identity_client(endpoint, dir, changes, tx, stop).await {
        tracing::error!(error = %e, "identity client stopped; the proxy will not become ready");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("trellis-proxy").chain(args.iter().copied()))
            .map(|c| c.run)
    }

    #[test]
    fn default_listeners_are_dual_stack_and_outbound_is_loopback_only() {
        let a = parse(&[]).unwrap();
        let s = |v: &[SocketAddr]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(s(&a.outbound_addr), ["127.0.0.1:15001", "[::1]:15001"]);
        assert_eq!(s(&a.inbound_addr), ["0.0.0.0:15006", "[::]:15006"]);
        assert_eq!(s(&a.admin_addr), ["0.0.0.0:15020", "[::]:15020"]);
        assert!(!a.local_mode && !a.inbound_to_localhost);
    }

    #[test]
    fn inbound_target_is_for_local_mode_only() {
        assert!(parse(&["--inbound-target", "127.0.0.1:9000"]).is_err());
        let a = parse(&["--local-mode", "--inbound-target", "127.0.0.1:9000"]).unwrap();
        assert!(a.local_mode && a.inbound_target.is_some());
        assert!(
            parse(&[
                "--local-mode",
                "--inbound-target",
                "127.0.0.1:9000",
                "--inbound-to-localhost"
            ])
            .is_err()
        );
    }

    #[test]
    fn concurrency_flag_and_cpu_allowance() {
        let a = parse(&[]).unwrap();
        assert_eq!((a.concurrency, a.cpu_millis), (None, None));
        let a = parse(&["--concurrency", "0", "--cpu-millis", "1500"]).unwrap();
        assert_eq!(a.concurrency, Some(0));
        assert_eq!(a.cpu_millis.as_deref(), Some("1500"));
        for bad in ["-1", "two", "100000"] {
            let flag = format!("--concurrency={bad}");
            let e = parse(&[&flag]).expect_err(bad).to_string();
            assert!(e.contains("--concurrency"), "{e}");
        }
    }

    #[test]
    fn inbound_caps_come_from_flags_and_refuse_zero() {
        let d = crate::proxy::inbound::Limits::default();
        assert_eq!(Options::from(&parse(&[]).unwrap()).inbound_limits, d);
        let a = parse(&[
            "--inbound-max-pending-per-peer",
            "8",
            "--inbound-max-pending=100",
        ])
        .unwrap();
        let l = Options::from(&a).inbound_limits;
        assert_eq!((l.max_pending_per_peer, l.max_pending), (8, 100));
        assert_eq!(l.idle_timeout, d.idle_timeout);
        for bad in ["0", "-1", "many"] {
            let flag = format!("--inbound-max-pending={bad}");
            let e = parse(&[&flag]).expect_err(bad).to_string();
            assert!(e.contains("--inbound-max-pending"), "{e}");
        }
    }

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        // Start below the hard limit (by one: other tests of this process hold sockets).
        let before = getrlimit(Resource::Nofile);
        if let Some(hard) = before.maximum {
            let lowered = Rlimit {
                current: Some(hard - 1),
                maximum: Some(hard),
            };
            setrlimit(Resource::Nofile, lowered).unwrap();
        }
        let soft = raise_fd_limit();
        let now = getrlimit(Resource::Nofile);
        assert_eq!(now.current, soft);
        if now.maximum.is_some() {
            assert_eq!(now.current, now.maximum);
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("x").is_err());
        assert_eq!(
            parse_flush_interval("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert!(parse_flush_interval("0s").is_err());
    }
}
