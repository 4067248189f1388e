//! `trellis stat`: golden metrics per workload and per edge from Prometheus (see
//! [`crate::stat`]).

use anyhow::Context as _;

use crate::stat::Target;
use crate::stat::prometheus::Prometheus;

/// Arguments of `trellis stat`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// `deploy/NAME` (a workload), `ns/NAME` (a namespace), or nothing for every workload.
    pub target: Option<Target>,
    /// Only this namespace (with `deploy/NAME` or no target).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Prometheus scraping the sidecars, e.g. http://127.0.0.1:9090 (a port-forward).
    #[arg(long, env = "TRELLIS_PROMETHEUS")]
    pub prometheus: String,
    /// Window rates and quantiles are computed over (a Prometheus duration).
    #[arg(long, default_value = "1m")]
    pub window: String,
    /// `table` or `json`.
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let prom = Prometheus::new(&a.prometheus)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let stat = rt.block_on(prom.stat(&a.window))?.filter(
        &a.target.unwrap_or(crate::stat::Target::All),
        a.namespace.as_deref(),
    );
    if a.output == "json" {
        println!("{}", serde_json::to_string_pretty(&stat)?);
    } else {
        print!("{}", stat.render());
    }
    Ok(())
}
