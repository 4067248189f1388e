//! `trellis-proxy init`: generates the pod's iptables rules and applies them atomically.
//!
//! Run by the injected `trellis-init` init container (root, `NET_ADMIN` + `NET_RAW`, nothing
//! else) before any other container starts. [`rules`] renders one `iptables-restore` file per
//! address family (pure, golden-tested); [`apply`] picks the backend and loads the file with
//! `iptables-restore --noflush`, so the whole ruleset lands in one transaction or not at all.
//! Running it twice yields the same ruleset (see [`rules`] for how).
//!
//! IPv6: the same rules are rendered for `ip6tables` and applied when the kernel has IPv6
//! (`/proc/net/if_inet6`) and an `ip6tables` restore tool exists; otherwise a note is printed.
//! An IPv6 failure is an error, never ignored: a pod whose IPv6 traffic silently bypassed the
//! proxy would bypass mTLS.
use std::process::ExitCode;

pub mod apply;
pub mod rules;

pub use apply::Backend;
pub use rules::{Cidr, Family, Jumps, RuleSpec};

/// Everything that can go wrong in `trellis-proxy init`.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("invalid port {0:?}: expected a number from 1 to 65535")]
    BadPort(String),
    #[error("invalid CIDR {0:?}: expected ADDRESS/PREFIX such as 10.0.0.0/8")]
    BadCidr(String),
    #[error("invalid backend {0:?}: expected nft, legacy or auto")]
    BadBackend(String),
    #[error(
        "no iptables backend found: install iptables (iptables-nft-restore or iptables-legacy-restore)"
    )]
    NoBackend,
    #[error("could not run {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    Failed {
        tool: String,
        status: String,
        stderr: String,
    },
}

/// Flags of `trellis-proxy init`.
#[derive(clap::Args, Debug, Clone)]
pub struct InitArgs {
    /// UID of the proxy; its own traffic is never redirected.
    #[arg(long, default_value_t = 2137)]
    pub proxy_uid: u32,
    /// Port inbound TCP is redirected to.
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// Port outbound TCP is redirected to.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// Inbound ports never redirected, comma separated.
    #[arg(long, default_value = "")]
    pub exclude_inbound_ports: String,
    /// Outbound destination ports never redirected, comma separated.
    #[arg(long, default_value = "")]
    pub exclude_outbound_ports: String,
    /// Outbound destination CIDRs never redirected, comma separated (IPv4 and IPv6 mixed).
    #[arg(long, default_value = "")]
    pub exclude_outbound_cidrs: String,
    /// iptables backend: `nft`, `legacy`, or `auto` (the one that already holds rules, else nft).
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Print the rules and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

impl InitArgs {
    /// Validates every flag and reports every invalid one, not just the first.
    pub fn spec(&self) -> Result<RuleSpec, Vec<InitError>> {
        let mut errors = Vec::new();
        let in_ports = rules::parse_ports(&self.exclude_inbound_ports);
        let out_ports = rules::parse_ports(&self.exclude_outbound_ports);
        let cidrs = rules::parse_cidrs(&self.exclude_outbound_cidrs);
        let spec = RuleSpec {
            proxy_uid: self.proxy_uid,
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            exclude_inbound_ports: in_ports.unwrap_or_else(|e| {
                errors.push(e);
                Vec::new()
            }),
            exclude_outbound_ports: out_ports.unwrap_or_else(|e| {
                errors.push(e);
                Vec::new()
            }),
            exclude_outbound_cidrs: cidrs.unwrap_or_else(|e| {
                errors.push(e);
                Vec::new()
            }),
        };
        if let Err(e) = Backend::parse(&self.backend) {
            errors.push(e);
        }
        if errors.is_empty() {
            Ok(spec)
        } else {
            Err(errors)
        }
    }
}

pub fn main(args: InitArgs) -> ExitCode {
    let spec = match args.spec() {
        Ok(s) => s,
        Err(errors) => {
            for e in errors {
                eprintln!("trellis-proxy init: {e}");
            }
            return ExitCode::from(64);
        }
    };
    if args.dry_run {
        print!("{}", rules::render(&spec, Family::V4, Jumps::ALL));
        print!("{}", rules::render(&spec, Family::V6, Jumps::ALL));
        return ExitCode::SUCCESS;
    }
    let result = Backend::parse(&args.backend).and_then(|b| apply::apply(&spec, b));
    match result {
        Ok(applied) => {
            for (_family, text) in applied {
                print!("{text}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("trellis-proxy init: {e}");
            ExitCode::FAILURE
        }
    }
}
