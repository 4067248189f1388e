//! `trellis-proxy`: the sidecar. With no subcommand it runs the proxy; `trellis-proxy init`
//! writes the pod's iptables rules (run by the injected init container).
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "trellis-proxy", version, about = "The Trellis sidecar proxy")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: trellis_proxy::run::RunArgs,
}

// Parsed once at startup: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy (the default).
    Run(trellis_proxy::run::RunArgs),
    /// Write the pod's iptables redirect rules and exit.
    Init(trellis_proxy::init::InitArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        None => trellis_proxy::run::main(cli.run),
        Some(Cmd::Run(args)) => trellis_proxy::run::main(args),
        Some(Cmd::Init(args)) => trellis_proxy::init::main(args),
    }
}
