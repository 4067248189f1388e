//! `trellis`: the user's CLI. Each subcommand lives in `trellis_operator::cli`.
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use trellis_operator::cli;

#[derive(Parser)]
#[command(name = "trellis", version, about = "Trellis service mesh CLI")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check the cluster before install (`--pre`), Trellis once installed, and the proxies
    /// (`--proxy`); exits non-zero when any check fails.
    Check(cli::check::Args),
    /// Print the CustomResourceDefinitions generated from the Rust types.
    Crds(cli::crds::Args),
    /// Write the OLM bundle (registry+v1) generated from config/ and crds/.
    Bundle(cli::bundle::Args),
    /// Add the sidecar to workload manifests (files or stdin), as the webhook would.
    Inject(cli::inject::InjectArgs),
    /// Remove an injected sidecar from workload manifests.
    Uninject(cli::inject::UninjectArgs),
    /// Golden metrics per workload and edge from Prometheus (`deploy/NAME`, `ns/NAME` or all).
    Stat(cli::stat::Args),
    /// The live service graph in the browser, from Prometheus, on 127.0.0.1.
    Dashboard(cli::dashboard::Args),
    /// Run the whole mesh on this machine, with no cluster.
    Dev(cli::dev::Args),
    /// Run the sidecar proxy: the same code as the `trellis-proxy` binary, so one
    /// `cargo run --bin trellis -- dev` builds everything the local mesh runs.
    #[command(hide = true)]
    Proxy(Box<trellis_proxy::run::RunArgs>),
    /// The demo program `trellis dev` runs for each local service and client.
    #[command(hide = true)]
    DemoService(trellis_operator::dev::demo::Args),
}

fn main() -> ExitCode {
    let result = match Cli::parse().cmd {
        Cmd::Proxy(a) => {
            trellis_operator::dev::supervise::exit_with_parent();
            return trellis_proxy::run::main(*a);
        }
        Cmd::DemoService(a) => {
            trellis_operator::dev::supervise::exit_with_parent();
            return trellis_operator::dev::demo::main(a);
        }
        Cmd::Check(a) => cli::check::run_cli(a),
        Cmd::Crds(a) => cli::crds::run(a),
        Cmd::Bundle(a) => cli::bundle::run(a),
        Cmd::Inject(a) => cli::inject::run_inject(a),
        Cmd::Uninject(a) => cli::inject::run_uninject(a),
        Cmd::Dev(a) => cli::dev::run(a),
        Cmd::Stat(a) => cli::stat::run(a),
        Cmd::Dashboard(a) => cli::dashboard::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis: {e:#}");
            ExitCode::FAILURE
        }
    }
}
