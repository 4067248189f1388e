//! The operator process: configuration, startup checks, the admin server, leader election,
//! controllers, the servers every replica runs, and graceful shutdown.
//!
//! Shape (see `../shared/DESIGN.md`): every replica serves the admin endpoints and the
//! [`replica_servers`] (identity and webhook); only the replica holding the Lease runs the
//! controllers ([`crate::controller::all`]), so two replicas never fight over the objects they
//! write.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kube::Client;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use trellis_proxy::conn_limit::{self, ConnLimits, Ended};

use crate::api;

/// Exit code for invalid configuration (the same as clap's usage errors).
pub const EXIT_CONFIG: u8 = 2;

/// Raw command line / environment, before validation. Values that can be invalid are taken as
/// strings so that [`Config::from_args`] can report every invalid one at once.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "trellis-operator",
    version,
    about = "The Trellis operator: CRD controllers, workload identity (CA) and sidecar injection.",
    long_about = "The Trellis operator. Every replica serves the admin endpoints (/healthz, /readyz, \
/metrics), the identity endpoint and the injection webhook; the replica holding the Lease runs \
the controllers. Each flag can also be set by the environment variable shown."
)]
pub struct Args {
    /// Namespace the operator runs in: its Lease, the CA Secret and the mesh root namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "trellis-system")]
    pub namespace: String,
    /// Name of this replica (the Lease holder identity). Defaults to the host name.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Address of the admin server (/healthz, /readyz, /metrics).
    #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: String,
    /// Address of the sidecar injection webhook (HTTPS).
    #[arg(long, env = "TRELLIS_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    pub webhook_addr: String,
    /// Address of the workload identity endpoint (HTTPS).
    #[arg(long, env = "TRELLIS_IDENTITY_ADDR", default_value = "0.0.0.0:15012")]
    pub identity_addr: String,
    /// Address of the discovery stream sidecars resolve destinations from (mTLS, HTTP/2).
    #[arg(long, env = "TRELLIS_DISCOVERY_ADDR", default_value = "0.0.0.0:15010")]
    pub discovery_addr: String,
    /// Name of the Lease (in --namespace) that elects the replica running the controllers.
    #[arg(long, env = "TRELLIS_LEASE_NAME", default_value = "trellis-operator")]
    pub lease_name: String,
    /// How long a leader's Lease stays valid without renewal, as a duration (e.g. 15s). A new
    /// leader takes over at most this long after the old one dies.
    #[arg(long, env = "TRELLIS_LEASE_DURATION", default_value = "15s")]
    pub lease_duration: String,
    /// Log filter: a level (error, warn, info, debug, trace) or a tracing directive such as
    /// `info,kube=debug`.
    #[arg(long, env = "TRELLIS_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format: `json` (one object per line) or `text`.
    #[arg(long, env = "TRELLIS_LOG_FORMAT", default_value = "json")]
    pub log_format: String,
    /// How long shutdown waits for servers and controllers to finish, as a duration.
    #[arg(long, env = "TRELLIS_SHUTDOWN_GRACE", default_value = "10s")]
    pub shutdown_grace: String,
    /// After SIGTERM, how long the replica reports not-ready while its listeners keep serving,
    /// before they close, as a duration (0s to 60s): the time for its endpoints to leave the
    /// Service so that the API server stops sending admission reviews here before the webhook
    /// stops answering (with `failurePolicy: Fail`, a closed listener is a failed pod create).
    #[arg(long, env = "TRELLIS_SHUTDOWN_DELAY", default_value = "5s")]
    pub shutdown_delay: String,
    /// The proxy image of a Mesh whose `spec.proxy.image` is empty: the sidecar released with
    /// this operator (OLM sets it from the bundle's `relatedImages`, so a mirrored install
    /// injects the mirrored image).
    #[arg(long, env = "TRELLIS_PROXY_IMAGE", default_value = crate::api::mesh::BUILT_IN_PROXY_IMAGE)]
    pub proxy_image: String,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub namespace: String,
    pub pod_name: String,
    pub admin_addr: SocketAddr,
    pub webhook_addr: SocketAddr,
    pub identity_addr: SocketAddr,
    pub discovery_addr: SocketAddr,
    pub lease_name: String,
    pub lease_duration: Duration,
    pub log_level: String,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
    pub shutdown_delay: Duration,
    pub proxy_image: String,
}

/// The longest accepted `--shutdown-delay`: with the grace period it must fit the pod's
/// `terminationGracePeriodSeconds` (30 s in config/manager).
pub const MAX_SHUTDOWN_DELAY: Duration = Duration::from_secs(60);

impl Config {
    /// Validates every field; the error lists every invalid value, one per line.
    pub fn from_args(a: Args) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let mut addr = |flag: &str, env: &str, v: &str| -> SocketAddr {
            v.parse().unwrap_or_else(|e| {
                errors.push(format!(
                    "--{flag} ({env}) {v:?} is not a socket address like 0.0.0.0:8080: {e}"
                ));
                SocketAddr::from(([0, 0, 0, 0], 0))
            })
        };
        let admin_addr = addr("admin-addr", "TRELLIS_ADMIN_ADDR", &a.admin_addr);
        let webhook_addr = addr("webhook-addr", "TRELLIS_WEBHOOK_ADDR", &a.webhook_addr);
        let identity_addr = addr("identity-addr", "TRELLIS_IDENTITY_ADDR", &a.identity_addr);
        let discovery_addr = addr(
            "discovery-addr",
            "TRELLIS_DISCOVERY_ADDR",
            &a.discovery_addr,
        );
        let mut duration = |flag: &str, env: &str, v: &str, min: Duration| -> Duration {
            match crate::duration::parse(v) {
                Ok(d) if d >= min => d,
                Ok(_) => {
                    errors.push(format!("--{flag} ({env}) {v:?} must be at least {min:?}"));
                    min
                }
                Err(e) => {
                    errors.push(format!("--{flag} ({env}): {e}"));
                    min
                }
            }
        };
        let lease_duration = duration(
            "lease-duration",
            "TRELLIS_LEASE_DURATION",
            &a.lease_duration,
            Duration::from_secs(5),
        );
        let shutdown_grace = duration(
            "shutdown-grace",
            "TRELLIS_SHUTDOWN_GRACE",
            &a.shutdown_grace,
            Duration::ZERO,
        );
        let shutdown_delay = duration(
            "shutdown-delay",
            "TRELLIS_SHUTDOWN_DELAY",
            &a.shutdown_delay,
            Duration::ZERO,
        );
        if shutdown_delay > MAX_SHUTDOWN_DELAY {
            errors.push(format!(
                "--shutdown-delay (TRELLIS_SHUTDOWN_DELAY) {:?} must be at most {MAX_SHUTDOWN_DELAY:?}",
                a.shutdown_delay
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&a.log_level) {
            errors.push(format!(
                "--log-level (TRELLIS_LOG_LEVEL) {:?} is not a level or tracing directive: {e}",
                a.log_level
            ));
        }
        let log_format = match a.log_format.as_str() {
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            other => {
                errors.push(format!(
                    "--log-format (TRELLIS_LOG_FORMAT) {other:?} must be json or text"
                ));
                LogFormat::Json
            }
        };
        if !is_dns_label(&a.namespace) {
            errors.push(format!(
                "--namespace (POD_NAMESPACE) {:?} is not a valid namespace name",
                a.namespace
            ));
        }
        if !is_dns_subdomain(&a.lease_name) {
            errors.push(format!(
                "--lease-name (TRELLIS_LEASE_NAME) {:?} is not a valid object name",
                a.lease_name
            ));
        }
        if a.proxy_image.is_empty()
            || a.proxy_image.len() > 512
            || a.proxy_image.contains(char::is_whitespace)
        {
            errors.push(format!(
                "--proxy-image (TRELLIS_PROXY_IMAGE) {:?} is not an image reference",
                a.proxy_image
            ));
        }
        let pod_name = a
            .pod_name
            .filter(|p| !p.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| format!("trellis-operator-{}", std::process::id()));
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            namespace: a.namespace,
            pod_name,
            admin_addr,
            webhook_addr,
            identity_addr,
            discovery_addr,
            lease_name: a.lease_name,
            lease_duration,
            log_level: a.log_level,
            log_format,
            shutdown_grace,
            shutdown_delay,
            proxy_image: a.proxy_image,
        })
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Installs the global tracing subscriber (JSON or text, to stdout: stderr is kept for the
/// one-line fatal error a user reads).
pub fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let _ = match config.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot reach the Kubernetes API ({0}): run inside a cluster or set KUBECONFIG to a reachable cluster"
    )]
    NoCluster(String),
    #[error(
        "the Trellis CRDs are not installed (missing: {}): install them: kubectl apply -k config/default",
        .0.join(", ")
    )]
    CrdsMissing(Vec<String>),
    #[error("cannot listen on {addr} for the {what}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("leader election with Lease {namespace}/{name} failed: {detail}")]
    Lease {
        namespace: String,
        name: String,
        detail: String,
    },
    #[error("{name} failed: {detail}")]
    Server { name: String, detail: String },
}

/// Readiness: `/readyz` answers 200 only when every registered gate is open and every
/// registered check passes, and never once shutdown has begun ([`Readiness::begin_shutdown`]).
///
/// Gates are flags a task opens; checks are evaluated at each `/readyz` (the serving
/// certificate is "present and unexpired" at the moment of the probe, not when some task last
/// looked). Register both before the admin server starts, so a probe can never see a readiness
/// with a part missing.
#[derive(Clone, Default)]
pub struct Readiness {
    gates: Arc<Mutex<BTreeMap<String, GateState>>>,
}

/// A readiness check evaluated at each probe.
pub type Check = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Clone)]
enum GateState {
    Flag(bool),
    Check(Check),
}

/// Name of the part that is never ready once shutdown began.
pub const SHUTTING_DOWN: &str = "shutting-down";

/// One readiness gate, closed until [`Gate::set`]`(true)`.
#[derive(Clone)]
pub struct Gate {
    name: String,
    gates: Arc<Mutex<BTreeMap<String, GateState>>>,
}

impl Readiness {
    /// Registers a closed gate named `name`.
    pub fn gate(&self, name: &str) -> Gate {
        self.lock().insert(name.to_string(), GateState::Flag(false));
        Gate {
            name: name.to_string(),
            gates: self.gates.clone(),
        }
    }

    /// Registers a check named `name`, evaluated at every probe.
    pub fn check(&self, name: &str, check: Check) {
        self.lock()
            .insert(name.to_string(), GateState::Check(check));
    }

    /// Turns readiness off for good: endpoints stop routing to this replica while its
    /// listeners keep serving what is still routed here.
    pub fn begin_shutdown(&self) {
        self.lock()
            .insert(SHUTTING_DOWN.to_string(), GateState::Flag(false));
    }

    /// The gates that are still closed (empty when ready).
    pub fn not_ready(&self) -> Vec<String> {
        let parts: Vec<(String, GateState)> = self
            .lock()
            .iter()
            .map(|(n, g)| (n.clone(), g.clone()))
            .collect();
        // Checks run outside the lock: they may take their own locks.
        parts
            .into_iter()
            .filter(|(_, g)| match g {
                GateState::Flag(open) => !open,
                GateState::Check(check) => !check(),
            })
            .map(|(n, _)| n)
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, GateState>> {
        self.gates.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Gate {
    pub fn set(&self, ready: bool) {
        self.gates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.name.clone(), GateState::Flag(ready));
    }
}

/// What every server and controller gets from the runtime.
#[derive(Clone)]
pub struct Services {
    pub client: Client,
    pub config: Arc<Config>,
    /// Cancelled on SIGTERM/SIGINT: stop accepting, drain, return.
    pub shutdown: CancellationToken,
    pub readiness: Readiness,
    /// The one metrics registry; register under a component prefix (`registry.sub_registry_with_prefix`).
    pub registry: Arc<Mutex<Registry>>,
    /// The compiler's watches, one set per process: the discovery stream reads them on every
    /// replica, the compile controller on the leader.
    pub stores: crate::controller::compile::SharedStores,
}

/// A server every replica runs (identity, webhook). It must return when `shutdown` fires.
pub type ExtraServer = (
    &'static str,
    Box<dyn FnOnce(Services) -> BoxFuture<'static, anyhow::Result<()>> + Send>,
);

/// The servers every replica runs next to the admin server, whether or not it leads, for an
/// operator in `namespace` (`--namespace`, `POD_NAMESPACE`).
pub fn replica_servers(namespace: &str) -> Vec<ExtraServer> {
    // One serving certificate from the mesh CA for both HTTPS servers; its resolver-backed
    // rustls config picks up renewals by itself, so the webhook's channel never needs a new value.
    let serving = crate::identity::replica::serving_cert(namespace);
    let (_, webhook_tls) =
        tokio::sync::watch::channel(serving.server_config(&[b"h2", b"http/1.1"]));
    vec![
        crate::identity::replica::server(serving),
        crate::webhook::replica_server(webhook_tls),
        crate::discovery::replica::server(),
    ]
}

/// The content type of every Trellis `/metrics` (prometheus-client writes OpenMetrics text).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The operator's one metrics registry: the `trellis_operator` prefix, and the version as
/// `trellis_operator_build_info{version}` (the control-plane dashboard's versions panel). The
/// old-proxy alert compares the sidecars' `trellis_proxy_build_info` with the injector's
/// `trellis_operator_desired_proxy_info` instead (see [`crate::webhook::DesiredProxy`]).
pub fn new_registry() -> Registry {
    let mut registry = Registry::with_prefix("trellis_operator");
    registry.register(
        "build",
        "The operator's version",
        prometheus_client::metrics::info::Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    registry
}

/// Builds a client and proves the API server answers.
pub async fn connect() -> Result<Client, Error> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| Error::NoCluster(one_line(&e)))?;
    let client = Client::try_from(config).map_err(|e| Error::NoCluster(one_line(&e)))?;
    match tokio::time::timeout(Duration::from_secs(10), client.apiserver_version()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(e)) => Err(Error::NoCluster(one_line(&e))),
        Err(_) => Err(Error::NoCluster("no answer within 10s".into())),
    }
}

fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = inner.source();
    }
    s.replace('\n', " ")
}

/// Checks that the API server serves every Trellis kind (discovery needs no RBAC).
pub async fn check_crds(client: &Client) -> Result<(), Error> {
    let expected: Vec<String> = api::crds()
        .iter()
        .map(|c| format!("{}.{}", c.spec.names.plural, c.spec.group))
        .collect();
    let served: Vec<String> = match client
        .list_api_group_resources(&format!("{}/{}", api::GROUP, api::VERSION))
        .await
    {
        Ok(list) => list
            .resources
            .iter()
            .map(|r| format!("{}.{}", r.name, api::GROUP))
            .collect(),
        Err(kube::Error::Api(s)) if s.code == 404 => Vec::new(),
        Err(e) => return Err(Error::NoCluster(one_line(&e))),
    };
    let missing: Vec<String> = expected
        .into_iter()
        .filter(|e| !served.contains(e))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::CrdsMissing(missing))
    }
}

/// Runs the operator until SIGTERM/SIGINT.
pub async fn run(config: Config, extras: Vec<ExtraServer>) -> Result<(), Error> {
    // Before any controller or the webhook reads a Mesh.
    crate::api::mesh::set_operator_proxy_image(config.proxy_image.clone());
    let client = connect().await?;
    check_crds(&client).await?;

    let shutdown = CancellationToken::new();
    let services = Services {
        client: client.clone(),
        config: Arc::new(config.clone()),
        shutdown: shutdown.clone(),
        readiness: Readiness::default(),
        registry: Arc::new(Mutex::new(new_registry())),
        stores: crate::controller::compile::SharedStores::new(client.clone(), shutdown.clone()),
    };
    let metrics = Arc::new(crate::controller::Metrics::register(
        &mut services.registry.lock().expect("registry lock"),
    ));
    let election_gate = services.readiness.gate("leader-election");

    tokio::spawn(signal_on_shutdown(
        shutdown.clone(),
        services.readiness.clone(),
        config.shutdown_delay,
    ));

    let admin = TcpListener::bind(config.admin_addr)
        .await
        .map_err(|source| Error::Bind {
            what: "admin server",
            addr: config.admin_addr,
            source,
        })?;
    tracing::info!(addr = %config.admin_addr, "admin server listening");
    let mut tasks = tokio::task::JoinSet::new();
    // The servers register their readiness parts when started, before the admin server
    // answers its first probe.
    for (name, start) in extras {
        let fut = start(services.clone());
        tasks.spawn(async move {
            fut.await.map_err(|e| Error::Server {
                name: name.to_string(),
                detail: format!("{e:#}"),
            })
        });
    }
    {
        let s = services.clone();
        tasks.spawn(async move {
            serve_admin(admin, s).await;
            Ok::<(), Error>(())
        });
    }
    {
        let s = services.clone();
        tasks.spawn(async move { lead(s, metrics, election_gate).await });
    }

    // Run until shutdown or until a task fails; then drain within the grace period.
    let mut result = Ok(());
    tokio::select! {
        _ = shutdown.cancelled() => {}
        Some(joined) = tasks.join_next() => {
            if let Ok(Err(e)) = joined {
                result = Err(e);
            }
            shutdown.cancel();
        }
    }
    tracing::info!(grace = ?config.shutdown_grace, "shutting down");
    let drain = async {
        while let Some(joined) = tasks.join_next().await {
            if let Ok(Err(e)) = joined {
                tracing::error!(error = %e, "task failed during shutdown");
            }
        }
    };
    if tokio::time::timeout(config.shutdown_grace, drain)
        .await
        .is_err()
    {
        tracing::warn!("grace period over; aborting remaining tasks");
        tasks.abort_all();
    }
    result
}

/// Waits for SIGTERM or SIGINT, then [`drain_then_stop`].
async fn signal_on_shutdown(shutdown: CancellationToken, readiness: Readiness, delay: Duration) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install SIGTERM handler");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = shutdown.cancelled() => return,
    }
    drain_then_stop(&readiness, delay, &shutdown).await;
}

/// The shutdown sequence: readiness off at once, listeners still serving for `delay` (so the
/// replica's endpoints leave the Service while requests routed here are still answered), then
/// `shutdown` fires and the servers drain and close. Returns early if `shutdown` fires first.
pub async fn drain_then_stop(readiness: &Readiness, delay: Duration, shutdown: &CancellationToken) {
    readiness.begin_shutdown();
    tracing::info!(
        ?delay,
        "not ready; listeners close after the shutdown delay"
    );
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = shutdown.cancelled() => {}
    }
    shutdown.cancel();
}

/// Takes part in leader election; while leading, runs the controllers.
async fn lead(
    services: Services,
    metrics: Arc<crate::controller::Metrics>,
    gate: Gate,
) -> Result<(), Error> {
    let config = &services.config;
    let lease_err = |e: kube_lease_manager::LeaseManagerError| Error::Lease {
        namespace: config.namespace.clone(),
        name: config.lease_name.clone(),
        detail: e.to_string(),
    };
    let secs = config.lease_duration.as_secs().max(5);
    let manager =
        kube_lease_manager::LeaseManagerBuilder::new(services.client.clone(), &config.lease_name)
            .with_namespace(&config.namespace)
            .with_identity(&config.pod_name)
            .with_duration(secs)
            .with_grace((secs / 3).max(2))
            .with_field_manager(format!("{}-lease", api::FIELD_MANAGER))
            .build()
            .await
            .map_err(lease_err)?;
    let (mut leader, lease_task) = manager.watch().await;
    let ctx = Arc::new(crate::controller::Context {
        client: services.client.clone(),
        status: crate::status::StatusWriter::new(services.client.clone()),
        namespace: config.namespace.clone(),
        metrics: metrics.clone(),
        stores: services.stores.clone(),
    });
    let controllers_gate = services.readiness.gate("controllers");
    let mut running: Option<(CancellationToken, tokio::task::JoinSet<()>)> = None;
    // A follower is ready (it serves the webhook and identity); a leader once its controllers
    // run. The first lease state decides which one this replica is.
    controllers_gate.set(true);
    gate.set(true);
    loop {
        let is_leader = *leader.borrow_and_update();
        metrics.leader.set(i64::from(is_leader));
        match (is_leader, running.is_some()) {
            (true, false) => {
                tracing::info!(identity = %config.pod_name, "became leader; starting controllers");
                controllers_gate.set(false);
                let token = services.shutdown.child_token();
                let mut set = tokio::task::JoinSet::new();
                for (name, fut) in crate::controller::all(ctx.clone(), token.clone()) {
                    set.spawn(async move {
                        fut.await;
                        tracing::info!(controller = name, "controller stopped");
                    });
                }
                running = Some((token, set));
                controllers_gate.set(true);
            }
            (false, true) => {
                tracing::warn!(identity = %config.pod_name, "lost leadership; stopping controllers");
                if let Some((token, mut set)) = running.take() {
                    token.cancel();
                    while set.join_next().await.is_some() {}
                }
            }
            _ => {}
        }
        tokio::select! {
            changed = leader.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = services.shutdown.cancelled() => break,
        }
    }
    if let Some((token, mut set)) = running.take() {
        token.cancel();
        while set.join_next().await.is_some() {}
    }
    // Closing the channel makes the lease task release the Lease, so a standby takes over at
    // once instead of after the lease duration.
    drop(leader);
    match lease_task.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(lease_err(e)),
        Err(e) => Err(Error::Lease {
            namespace: config.namespace.clone(),
            name: config.lease_name.clone(),
            detail: e.to_string(),
        }),
    }
}

/// Bounds of the admin server. Its port serves the kubelet's probes and Prometheus, so it is
/// reachable from the cluster, in plaintext: the kubelet and a Prometheus or two need a
/// handful of connections, and none needs one for long.
pub const ADMIN_LIMITS: ConnLimits = ConnLimits {
    max_connections: 128,
    max_connections_per_peer: 32,
    max_age: Duration::from_secs(60),
    drain: Duration::from_secs(5),
};
/// A request head must arrive within this (and an idle HTTP/1.1 connection is closed after
/// it): a probe's whole default timeout is 1 s.
pub const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `/healthz`, `/readyz` and `/metrics` until shutdown, within [`ADMIN_LIMITS`].
pub async fn serve_admin(listener: TcpListener, services: Services) {
    serve_admin_with(listener, services, ADMIN_LIMITS, ADMIN_HEADER_TIMEOUT).await
}

/// [`serve_admin`] with its bounds as parameters (tests shorten them).
pub async fn serve_admin_with(
    listener: TcpListener,
    services: Services,
    limits: ConnLimits,
    header_timeout: Duration,
) {
    let gate = limits.gate();
    let connections = tokio_util::task::TaskTracker::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    let builder = Arc::new(builder);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        // EMFILE and friends: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(slot) = gate.admit(peer.ip()) else {
                    tracing::debug!(%peer, "admin connection refused: too many open");
                    continue;
                };
                let s = services.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let s = s.clone();
                    async move { Ok::<_, Infallible>(admin_response(&req, &s)) }
                });
                let builder = builder.clone();
                let shutdown = services.shutdown.clone();
                connections.spawn(async move {
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    let ended = conn_limit::drive(
                        conn,
                        |c| c.graceful_shutdown(),
                        &limits,
                        &shutdown,
                        &slot,
                    );
                    match ended.await {
                        Ended::Closed(Ok(())) => {}
                        Ended::Closed(Err(e)) => {
                            tracing::debug!(error = %e, "admin connection ended with an error");
                        }
                        Ended::Dropped => {
                            tracing::debug!(%peer, "admin connection dropped: still open after the drain");
                        }
                    }
                });
            }
            _ = services.shutdown.cancelled() => break,
        }
    }
    connections.close();
    connections.wait().await;
}

/// The admin endpoints. Pure apart from reading readiness and metrics.
pub fn admin_response(req: &Request<Incoming>, s: &Services) -> Response<Full<Bytes>> {
    admin_route(req.method(), req.uri().path(), s)
}

fn admin_route(method: &Method, path: &str, s: &Services) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, ctype: &str, body: String| {
        Response::builder()
            .status(code)
            .header(http::header::CONTENT_TYPE, ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts")
    };
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != Method::GET && method != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "use GET\n".into());
    }
    match path {
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" => {
            let not_ready = s.readiness.not_ready();
            if not_ready.is_empty() {
                reply(StatusCode::OK, TEXT, "ok\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("not ready: {}\n", not_ready.join(", ")),
                )
            }
        }
        "/metrics" => {
            let mut out = String::new();
            let registry = s.registry.lock().expect("registry lock");
            match prometheus_client::encoding::text::encode(&mut out, &registry) {
                Ok(()) => reply(StatusCode::OK, OPENMETRICS, out),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    format!("encoding metrics: {e}\n"),
                ),
            }
        }
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> Result<Config, Vec<String>> {
        let mut argv = vec!["trellis-operator"];
        argv.extend_from_slice(args);
        Config::from_args(Args::try_parse_from(argv).unwrap())
    }

    #[test]
    fn defaults_follow_the_design() {
        // Environment variables would override defaults; this test only sets flags it checks.
        let c = parse(&["--namespace", "trellis-system", "--pod-name", "op-0"]).unwrap();
        assert_eq!(c.namespace, "trellis-system");
        assert_eq!(c.admin_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(c.webhook_addr.to_string(), "0.0.0.0:9443");
        assert_eq!(c.identity_addr.to_string(), "0.0.0.0:15012");
        assert_eq!(c.discovery_addr.to_string(), "0.0.0.0:15010");
        assert_eq!(c.lease_name, "trellis-operator");
        assert_eq!(c.lease_duration, Duration::from_secs(15));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.pod_name, "op-0");
        assert_eq!(c.shutdown_delay, Duration::from_secs(5));
        assert_eq!(c.proxy_image, crate::api::mesh::BUILT_IN_PROXY_IMAGE);
        let c = parse(&["--proxy-image", "mirror.example/trellis-proxy@sha256:ab"]).unwrap();
        assert_eq!(c.proxy_image, "mirror.example/trellis-proxy@sha256:ab");
    }

    #[test]
    fn every_invalid_value_is_reported() {
        let errors = parse(&[
            "--admin-addr",
            "localhost",
            "--webhook-addr",
            "0.0.0.0:99999",
            "--identity-addr",
            "x:1",
            "--lease-duration",
            "15",
            "--log-level",
            "info,=[",
            "--log-format",
            "yaml",
            "--namespace",
            "Trellis_System",
            "--lease-name",
            "UPPER",
            "--shutdown-grace",
            "soon",
            "--shutdown-delay",
            "2m",
            "--proxy-image",
            "two words",
        ])
        .unwrap_err();
        let joined = errors.join("\n");
        for flag in [
            "--admin-addr",
            "--webhook-addr",
            "--identity-addr",
            "--lease-duration",
            "--log-level",
            "--log-format",
            "--namespace",
            "--lease-name",
            "--shutdown-grace",
            "--shutdown-delay",
            "--proxy-image",
        ] {
            assert!(joined.contains(flag), "{flag} not reported in:\n{joined}");
        }
        assert_eq!(errors.len(), 11, "{joined}");
    }

    #[test]
    fn a_too_short_lease_is_refused() {
        let errors = parse(&["--lease-duration", "1s"]).unwrap_err();
        assert!(errors[0].contains("at least"), "{errors:?}");
    }

    fn services() -> Services {
        let (svc, _handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = Client::new(svc, "default");
        Services {
            client: client.clone(),
            config: Arc::new(parse(&["--pod-name", "t"]).unwrap()),
            shutdown: CancellationToken::new(),
            readiness: Readiness::default(),
            registry: Arc::new(Mutex::new(new_registry())),
            stores: crate::controller::compile::SharedStores::new(client, CancellationToken::new()),
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let code = out[9..12].parse().unwrap();
        let ctype = out
            .lines()
            .find_map(|l| l.strip_prefix("content-type: "))
            .unwrap_or_default()
            .to_string();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
        (code, ctype, body)
    }

    /// Issue 13 item 5: on shutdown, readiness turns off at once while the listeners keep
    /// answering for the delay; only then does shutdown fire and the servers close.
    #[tokio::test]
    async fn shutdown_reports_not_ready_while_listeners_keep_serving_for_the_delay() {
        let s = services();
        let gate = s.readiness.gate("leader-election");
        gate.set(true);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_admin(listener, s.clone()));
        assert_eq!(get(addr, "/readyz").await.0, 200);

        let delay = Duration::from_millis(800);
        let started = std::time::Instant::now();
        let stopping = {
            let (r, t) = (s.readiness.clone(), s.shutdown.clone());
            tokio::spawn(async move { drain_then_stop(&r, delay, &t).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (code, _, body) = get(addr, "/readyz").await;
        assert_eq!((code, body.as_str()), (503, "not ready: shutting-down\n"));
        // Still serving: the listener is open and answers.
        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert!(!s.shutdown.is_cancelled());

        stopping.await.unwrap();
        assert!(started.elapsed() >= delay);
        assert!(s.shutdown.is_cancelled());
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("admin server stops after the delay")
            .unwrap();
        // A gate opening late does not make a stopping replica ready again.
        gate.set(true);
        assert_eq!(s.readiness.not_ready(), ["shutting-down"]);
    }

    #[test]
    fn checks_are_evaluated_at_each_probe() {
        let r = Readiness::default();
        let present = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let p = present.clone();
        r.check(
            "serving-certificate",
            Arc::new(move || p.load(std::sync::atomic::Ordering::SeqCst)),
        );
        assert_eq!(r.not_ready(), ["serving-certificate"]);
        present.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(r.not_ready().is_empty());
        present.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(r.not_ready(), ["serving-certificate"]);
    }

    /// `check_crds` against a recorded discovery answer.
    async fn crds_check_with(status: u16, reply: serde_json::Value) -> Result<(), Error> {
        let (svc, mut handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let server = tokio::spawn(async move {
            let (req, send) = tokio::time::timeout(Duration::from_secs(1), handle.next_request())
                .await
                .expect("discovery request")
                .expect("discovery request");
            assert_eq!(req.method(), Method::GET);
            assert_eq!(req.uri().path(), "/apis/trellis.dev/v1alpha1");
            send.send_response(
                http::Response::builder()
                    .status(status)
                    .body(kube::client::Body::from(
                        serde_json::to_vec(&reply).unwrap(),
                    ))
                    .unwrap(),
            );
        });
        let res = check_crds(&Client::new(svc, "default")).await;
        server.await.unwrap();
        res
    }

    #[tokio::test]
    async fn missing_crds_are_named_with_the_install_command() {
        let err = crds_check_with(
            404,
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "code": 404, "reason": "NotFound", "message": "the server could not find the requested resource"}),
        )
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(
                "meshes.trellis.dev, trafficpolicies.trellis.dev, peerauthentications.trellis.dev"
            ),
            "{msg}"
        );
        assert!(
            msg.ends_with("install them: kubectl apply -k config/default"),
            "{msg}"
        );

        let resource = |name: &str, kind: &str| serde_json::json!({"name": name, "singularName": "", "namespaced": true, "kind": kind, "verbs": ["get"]});
        let err = crds_check_with(
            200,
            serde_json::json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "trellis.dev/v1alpha1",
                               "resources": [resource("meshes", "Mesh"), resource("meshes/status", "Mesh")]}),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, Error::CrdsMissing(m) if m == &["trafficpolicies.trellis.dev", "peerauthentications.trellis.dev"]),
            "{err:?}"
        );
        crds_check_with(
            200,
            serde_json::json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "trellis.dev/v1alpha1",
                               "resources": [resource("meshes", "Mesh"), resource("trafficpolicies", "TrafficPolicy"),
                                             resource("peerauthentications", "PeerAuthentication")]}),
        )
        .await
        .unwrap();
    }

    /// Whether the server closes `s` within `within` (what it sends meanwhile is dropped).
    async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        tokio::time::timeout(within, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    /// The admin port is reachable from the cluster in plaintext: a head that never ends, an
    /// idle HTTP/2 connection and a client opening more than its share cannot hold it.
    #[tokio::test]
    async fn admin_server_cuts_off_slow_heads_idle_connections_and_greedy_peers() {
        use tokio::io::AsyncWriteExt;
        let s = services();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ConnLimits {
            max_connections: 16,
            max_connections_per_peer: 2,
            max_age: Duration::from_millis(600),
            drain: Duration::from_millis(300),
        };
        let server = tokio::spawn(serve_admin_with(
            listener,
            s.clone(),
            limits,
            Duration::from_millis(300),
        ));
        let connect = || tokio::net::TcpStream::connect(addr);
        let mut slow = connect().await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        let mut h2 = connect().await.unwrap();
        h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut third = connect().await.unwrap();
        assert!(
            closed_within(&mut third, Duration::from_millis(500)).await,
            "a connection past the per-peer cap was served"
        );
        assert!(
            closed_within(&mut slow, Duration::from_secs(3)).await,
            "a request head that never ends held its connection"
        );
        assert!(
            closed_within(&mut h2, Duration::from_secs(3)).await,
            "an idle HTTP/2 connection was held past its age"
        );
        assert_eq!(get(addr, "/healthz").await.0, 200);
        s.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("admin server stops on shutdown")
            .unwrap();
    }

    #[tokio::test]
    async fn admin_server_reports_health_readiness_and_metrics() {
        let s = services();
        let metrics = crate::controller::Metrics::register(&mut s.registry.lock().unwrap());
        metrics.leader.set(1);
        let gate = s.readiness.gate("controllers");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_admin(listener, s.clone()));

        assert_eq!(get(addr, "/healthz").await.0, 200);
        let (code, _, body) = get(addr, "/readyz").await;
        assert_eq!((code, body.as_str()), (503, "not ready: controllers\n"));
        gate.set(true);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        let (code, ctype, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
        assert!(body.contains("trellis_operator_leader 1"), "{body}");
        let version = format!(
            "trellis_operator_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(body.contains(&version), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
        assert_eq!(get(addr, "/nope").await.0, 404);

        s.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("admin server stops on shutdown")
            .unwrap();
    }
}
