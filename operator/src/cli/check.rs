//! `trellis check`: the thin edge over [`crate::check`]. Connects with the current kubeconfig
//! context, prints the report and fails (exit code 1) when any check failed.

use anyhow::Context as _;

use crate::check::observe::{Scope, run};

/// Arguments of `trellis check`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Check that Trellis can be installed (API server version, RBAC, free CRD names, no other
    /// mesh's injector) instead of checking an installed Trellis.
    #[arg(long, conflicts_with = "proxy")]
    pub pre: bool,
    /// Also check the data plane: every meshed namespace's pods, proxy versions, certificates
    /// and config revisions.
    #[arg(long)]
    pub proxy: bool,
    /// With `--proxy`: fail when a proxy has been behind the operator (a stream push not
    /// applied, or its namespace's ConfigMap settings or TrafficPolicies not loaded) for
    /// longer than this; proxies behind for less are a warning. ConfigMaps reach pods on the
    /// kubelet's sync, about a minute.
    #[arg(long, default_value = "3m", value_parser = parse_threshold, requires = "proxy")]
    pub lag_threshold: std::time::Duration,
    /// Namespace Trellis is (or will be) installed in.
    #[arg(long, default_value = "trellis-system")]
    pub namespace: String,
}

/// The report for `args`, from the API server `client` talks to.
pub async fn report(client: &kube::Client, args: &Args) -> crate::check::Report {
    let scope = Scope {
        namespace: args.namespace.clone(),
        pre: args.pre,
        proxy: args.proxy,
        lag_threshold_secs: args.lag_threshold.as_secs() as i64,
    };
    let now = jiff::Timestamp::now().as_second();
    run(client, &scope, now).await
}

fn parse_threshold(s: &str) -> Result<std::time::Duration, String> {
    crate::duration::parse(s).map_err(|e| e.to_string())
}

pub fn run_cli(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = rt.block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("no usable kubeconfig (KUBECONFIG, ~/.kube/config or in-cluster)")?;
        anyhow::Ok(report(&client, &args).await)
    })?;
    print!("{}", report.render());
    match report.failures() {
        0 => Ok(()),
        n => anyhow::bail!("{n} check(s) failed"),
    }
}
