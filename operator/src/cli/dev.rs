//! `trellis dev`: the whole mesh on this machine, with no cluster. See [`crate::dev`].
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

/// The example `trellis dev` runs when given no directory.
pub const DEFAULT_DIR: &str = "examples/demo";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory with the mesh's YAML: Mesh, TrafficPolicy and PeerAuthentication objects (as a
    /// cluster takes them) and services.yaml (the local services to run).
    #[arg(default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Stop after this long (e.g. `20s`, `2m`), print a summary, and exit non-zero unless every
    /// edge carried successful mTLS traffic. For CI.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Stop as soon as every edge has carried successful mTLS traffic (at most `--duration`,
    /// default 90s), then print the summary.
    #[arg(long)]
    pub once: bool,
    /// First of the consecutive 127.0.0.1 ports used (identity endpoint, then per pod: app,
    /// sidecar outbound, inbound, admin; then the same again per meshed pod, spare ports where
    /// a proxy rollout starts each pod's replacement).
    #[arg(long, default_value_t = 17000)]
    pub base_port: u16,
    /// Where configs, credentials and logs go (must be empty or missing; removed on exit).
    /// Default: a new directory under the system temp dir.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Where sidecars get certificates: `endpoint` (the identity endpoint, as in a cluster) or
    /// `files` (issued by the CA directly and passed as --cert-file/--key-file).
    #[arg(long, value_enum, default_value_t = crate::dev::creds::Mode::default())]
    pub credentials: crate::dev::creds::Mode,
    /// Export the sidecars' spans over OTLP/gRPC to this collector (`host:port`, e.g. a Jaeger
    /// all-in-one on `127.0.0.1:4317`), sampling every request unless the Mesh sets tracing.
    #[arg(long, value_parser = parse_collector)]
    pub otlp: Option<String>,
    /// 127.0.0.1 port of the live service graph in the browser (0: any free port). The URL is
    /// printed beside the table.
    #[arg(long, default_value_t = 0)]
    pub dashboard_port: u16,
    /// Simulate a bad proxy version: pods whose proxy runs this version (the Mesh's
    /// `spec.proxy.image`) answer every request with a 500. Set the Mesh to it while `trellis
    /// dev` runs and watch the rollout's health gate stop it.
    #[arg(long)]
    pub fail_version: Option<String>,
}

fn parse_collector(s: &str) -> Result<String, String> {
    match trellis_proxy::config::collector_problem(s) {
        None => Ok(s.to_owned()),
        Some(why) => Err(why.to_owned()),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::duration::parse(s).map_err(|e| e.to_string())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let dir = if a.dir.exists() || a.dir != std::path::Path::new(DEFAULT_DIR) {
        a.dir
    } else {
        // `cargo run` from elsewhere than the repository root: the example next to the sources.
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(DEFAULT_DIR)
    };
    let exe = std::env::current_exe().context("locate the trellis binary")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(crate::dev::run::run(crate::dev::run::Options {
        dir,
        base_port: a.base_port,
        state_dir: a.state_dir,
        duration: a.duration,
        once: a.once,
        exe,
        credentials: a.credentials,
        otlp: a.otlp,
        dashboard_port: a.dashboard_port,
        fail_version: a.fail_version,
    }))
}
