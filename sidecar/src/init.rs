//! `trellis-proxy init`: generates the pod's iptables rules and applies them atomically.
use std::process::ExitCode;

/// Flags of `trellis-proxy init`.
#[derive(clap::Args, Debug, Clone)]
pub struct InitArgs {}

pub fn main(_args: InitArgs) -> ExitCode {
    eprintln!("trellis-proxy init: not built yet");
    ExitCode::from(64)
}
