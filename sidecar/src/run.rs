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
use crate::proxy::mtls::TlsCache;
use crate::proxy::tcp::FLUSH_INTERVAL;
use crate::proxy::upstream::Pool;
use crate::proxy::{Shared, accept_loop, http_builder};
use crate::reload::{ConfigRx, Watcher};
use crate::shutdown::Shutdown;
use crate::traffic::{Dispatcher, InboundRateLimiter, TrafficMetrics};

/// Flags and environment of `trellis-proxy run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// The projected volume: `config.json`, `labels`, `ca.pem`, `token`.
    #[arg(long, env = "TRELLIS_DIR", default_value = "/var/run/trellis")]
    pub dir: PathBuf,
    #[arg(long, env = "TRELLIS_OUTBOUND_ADDR", default_value = "0.0.0.0:15001")]
    pub outbound_addr: SocketAddr,
    #[arg(long, env = "TRELLIS_INBOUND_ADDR", default_value = "0.0.0.0:15006")]
    pub inbound_addr: SocketAddr,
    #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = "0.0.0.0:15020")]
    pub admin_addr: SocketAddr,
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
    /// Local mode without iptables: inbound traffic goes here instead of
    /// `127.0.0.1:<original port>`.
    #[arg(long, env = "TRELLIS_INBOUND_TARGET")]
    pub inbound_target: Option<SocketAddr>,
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
    /// The app's kubelet probes, as the injector rewrote them, as JSON keyed by path (see
    /// [`crate::probe`]); `GET /app-health/...` on the admin port runs these and nothing else.
    #[arg(long, env = crate::probe::ENV_APP_PROBES, default_value = "", hide_default_value = true, value_parser = parse_probes)]
    pub app_probes: ProbeSet,
    /// The pod's IP (downward API `status.podIP`): where app probes go, as the kubelet's would.
    /// Without it they go to 127.0.0.1.
    #[arg(long, env = "TRELLIS_POD_IP")]
    pub pod_ip: Option<IpAddr>,
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

/// Where to listen and where the files are; the in-process subset of [`RunArgs`].
#[derive(Clone, Debug)]
pub struct Options {
    pub dir: PathBuf,
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub inbound_target: Option<SocketAddr>,
    /// Ports never detected (see [`RunArgs::opaque_ports`]).
    pub opaque_ports: Vec<u16>,
    /// See [`RunArgs::tcp_flush_interval`]; tests shorten it to see bytes of open connections
    /// without waiting 15 s.
    pub tcp_flush_interval: Duration,
    /// See [`RunArgs::app_probes`].
    pub app_probes: ProbeSet,
    /// Where app probes go (see [`RunArgs::pod_ip`]); `None` is 127.0.0.1.
    pub pod_ip: Option<IpAddr>,
}

impl From<&RunArgs> for Options {
    fn from(a: &RunArgs) -> Self {
        Self {
            dir: a.dir.clone(),
            outbound_addr: a.outbound_addr,
            inbound_addr: a.inbound_addr,
            admin_addr: a.admin_addr,
            inbound_target: a.inbound_target,
            opaque_ports: a.opaque_ports.clone(),
            tcp_flush_interval: a.tcp_flush_interval.unwrap_or(FLUSH_INTERVAL),
            app_probes: a.app_probes.clone(),
            pod_ip: a.pod_ip,
        }
    }
}

/// A started proxy.
pub struct Running {
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shutdown: Shutdown,
    pub metrics: Arc<Metrics>,
    /// The config in force (for the identity client, which may take its endpoint from it).
    pub config: ConfigRx,
}

impl Running {
    /// Waits for the shutdown signal, then drains for at most `deadline`.
    pub async fn wait(&self, deadline: Duration) -> bool {
        self.shutdown.cancelled().await;
        self.shutdown.drain(deadline).await
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
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// Starts every task of a proxy on the current runtime.
pub async fn start(opts: Options, creds: CredentialsRx) -> Result<Running, StartError> {
    let traffic_metrics = TrafficMetrics::new();
    let metrics = Arc::new(Metrics::with_traffic(&traffic_metrics));
    let shutdown = Shutdown::new();
    let tls = Arc::new(TlsCache::new(creds.clone()));
    let pool = Pool::new(tls.clone());
    let dispatcher = Arc::new(Dispatcher::new_with_metrics(
        Arc::new(pool.clone()),
        traffic_metrics,
    ));
    let limiter: Arc<Mutex<Option<Arc<InboundRateLimiter>>>> = Arc::default();

    let (mut watcher, config) = Watcher::new(&opts.dir, metrics.clone());
    {
        let dispatcher = dispatcher.clone();
        let limiter = limiter.clone();
        watcher.on_apply(Box::new(move |snap| {
            dispatcher.update(&snap.config);
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
        }));
    }
    watcher.poll();
    let status = watcher.status();
    tokio::spawn(watcher.run(shutdown.token()));

    let outbound = bind(opts.outbound_addr).await?;
    let inbound = bind(opts.inbound_addr).await?;
    let admin_l = bind(opts.admin_addr).await?;
    let addr = |l: &TcpListener| l.local_addr().expect("bound listener has an address");
    let running = Running {
        outbound_addr: addr(&outbound),
        inbound_addr: addr(&inbound),
        admin_addr: addr(&admin_l),
        shutdown: shutdown.clone(),
        metrics: metrics.clone(),
        config: config.clone(),
    };

    let shared = Arc::new(Shared {
        config: config.clone(),
        tls,
        dispatcher,
        pool,
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        inbound_target: opts.inbound_target,
        opaque_ports: opts.opaque_ports.clone(),
        inbound_limiter: limiter,
        // `Options` can be built in code, past the flag's check: tokio's interval panics on zero.
        tcp_flush_interval: opts.tcp_flush_interval.max(Duration::from_millis(1)),
        http: http_builder(),
    });
    tokio::spawn(accept_loop(outbound, shared.clone(), Direction::Outbound));
    tokio::spawn(accept_loop(inbound, shared, Direction::Inbound));
    tokio::spawn(track_cert_expiry(creds.clone(), metrics.clone()));
    let admin = Arc::new(Admin {
        metrics,
        config,
        status,
        creds,
        shutdown,
        probes: Arc::new(Prober::new(
            opts.app_probes,
            opts.pod_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        )),
    });
    tokio::spawn(admin.serve(admin_l));
    tracing::info!(
        outbound = %running.outbound_addr,
        inbound = %running.inbound_addr,
        admin = %running.admin_addr,
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
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // A sidecar shares the pod's CPU with the application: two workers are enough for
    // thousands of requests per second and keep idle memory small. tokio's own
    // TOKIO_WORKER_THREADS overrides this (e.g. 1 for a pod with a one-CPU limit).
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(2);
    }
    let runtime = match builder.thread_name("trellis-proxy").enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
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
                    creds_tx,
                    running.shutdown.token(),
                ));
            }
        }
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
    if let Err(e) = crate::identity::run_identity_client(endpoint, dir, tx, stop).await {
        tracing::error!(error = %e, "identity client stopped; the proxy will not become ready");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
