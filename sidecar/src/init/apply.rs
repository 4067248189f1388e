//! Applying the rendered rules with the real `iptables-restore` of the chosen backend.
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use super::InitError;
use super::rules::{self, Family, Jumps, RuleSpec};

/// Which iptables implementation writes the rules. Both speak the same restore syntax; they keep
/// separate rulesets, so the pod's rules must go where the kernel's other rules (if any) live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
    /// Pick at run time: the backend that already holds rules, else nft, else legacy.
    Auto,
}

impl Backend {
    pub fn parse(s: &str) -> Result<Backend, InitError> {
        match s {
            "nft" => Ok(Backend::Nft),
            "legacy" => Ok(Backend::Legacy),
            "auto" | "" => Ok(Backend::Auto),
            other => Err(InitError::BadBackend(other.to_string())),
        }
    }

    fn prefix(self, family: Family) -> &'static str {
        match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Backend::Nft => "-nft",
            Backend::Legacy => "-legacy",
            Backend::Auto => "",
        }
    }

    /// The rule-editing tool (`iptables-nft`, `ip6tables-legacy`, ...).
    pub fn tool(self, family: Family) -> String {
        format!("{}{}", self.prefix(family), self.suffix())
    }

    /// The restore tool (`iptables-nft-restore`, ...).
    pub fn restore_tool(self, family: Family) -> String {
        format!("{}{}-restore", self.prefix(family), self.suffix())
    }

    /// The save tool (`iptables-nft-save`, ...).
    pub fn save_tool(self, family: Family) -> String {
        format!("{}{}-save", self.prefix(family), self.suffix())
    }
}

/// Whether `name` is an executable on `PATH`.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
}

/// Number of rules (`-A` lines) a backend holds in this network namespace; 0 when it cannot say.
fn rule_count(backend: Backend) -> usize {
    Command::new(backend.save_tool(Family::V4))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("-A "))
                .count()
        })
        .unwrap_or(0)
}

/// Resolves `Auto` to a concrete backend, as Istio does: the one that already has rules in
/// this network namespace wins (someone else's rules there tell us which one the kernel path
/// uses); with none, nft (the Debian and modern default), else legacy.
pub fn resolve(backend: Backend) -> Result<Backend, InitError> {
    if backend != Backend::Auto {
        return Ok(backend);
    }
    let nft = on_path(&Backend::Nft.restore_tool(Family::V4));
    let legacy = on_path(&Backend::Legacy.restore_tool(Family::V4));
    match (nft, legacy) {
        (true, true) => {
            if rule_count(Backend::Legacy) > rule_count(Backend::Nft) {
                Ok(Backend::Legacy)
            } else {
                Ok(Backend::Nft)
            }
        }
        (true, false) => Ok(Backend::Nft),
        (false, true) => Ok(Backend::Legacy),
        (false, false) if on_path("iptables-restore") => Ok(Backend::Auto),
        (false, false) => Err(InitError::NoBackend),
    }
}

/// Whether the rule `args` (chain first) exists in `table`.
fn rule_exists(
    backend: Backend,
    family: Family,
    table: &str,
    args: &[&str],
) -> Result<bool, InitError> {
    let tool = backend.tool(family);
    let status = Command::new(&tool)
        .args(["-t", table, "-C"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|source| InitError::Spawn {
            tool: tool.clone(),
            source,
        })?;
    Ok(status.success())
}

fn restore(backend: Backend, family: Family, text: &str) -> Result<(), InitError> {
    let tool = backend.restore_tool(family);
    let spawn = |source| InitError::Spawn {
        tool: tool.clone(),
        source,
    };
    let mut child = Command::new(&tool)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes()).map_err(spawn)?;
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(InitError::Failed {
            tool,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn apply_family(spec: &RuleSpec, backend: Backend, family: Family) -> Result<String, InitError> {
    let jumps = Jumps {
        prerouting: !rule_exists(backend, family, "nat", &rules::JUMP_PREROUTING)?,
        output: !rule_exists(backend, family, "nat", &rules::JUMP_OUTPUT)?,
        guard: !rule_exists(backend, family, "raw", &rules::JUMP_GUARD)?,
    };
    let text = rules::render(spec, family, jumps);
    restore(backend, family, &text)?;
    Ok(text)
}

/// Applies the rules for IPv4, and for IPv6 when the kernel has it. Returns what was applied.
pub fn apply(spec: &RuleSpec, backend: Backend) -> Result<Vec<(Family, String)>, InitError> {
    let backend = resolve(backend)?;
    let mut applied = vec![(Family::V4, apply_family(spec, backend, Family::V4)?)];
    let v6_tool = backend.restore_tool(Family::V6);
    if Path::new("/proc/net/if_inet6").exists() && on_path(&v6_tool) {
        applied.push((Family::V6, apply_family(spec, backend, Family::V6)?));
    } else {
        eprintln!(
            "trellis-proxy init: IPv6 not available ({v6_tool} or kernel IPv6 missing); IPv4 rules only"
        );
    }
    Ok(applied)
}
