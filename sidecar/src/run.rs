//! The proxy process: wires config reload, identity, listeners, admin and shutdown.
//! (Owned by the proxy-core work; this is the entry point `main.rs` calls.)
use std::process::ExitCode;

/// Flags and environment of `trellis-proxy run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {}

pub fn main(_args: RunArgs) -> ExitCode {
    eprintln!("trellis-proxy: run is not built yet");
    ExitCode::from(64)
}
