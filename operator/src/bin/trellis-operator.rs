//! `trellis-operator`: wiring only; everything lives in `trellis_operator::runtime`.
use std::process::ExitCode;

use clap::Parser;
use trellis_operator::runtime::{self, Args, Config};

fn main() -> ExitCode {
    let config = match Config::from_args(Args::parse()) {
        Ok(c) => c,
        Err(errors) => {
            for e in errors {
                eprintln!("trellis-operator: {e}");
            }
            return ExitCode::from(runtime::EXIT_CONFIG);
        }
    };
    runtime::init_logging(&config);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis-operator: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let servers = runtime::replica_servers(&config.namespace);
    match rt.block_on(runtime::run(config, servers)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "trellis-operator stopped");
            eprintln!("trellis-operator: {e}");
            ExitCode::FAILURE
        }
    }
}
