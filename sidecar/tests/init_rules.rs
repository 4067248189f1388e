//! Golden tests of the `iptables-restore` files `trellis-proxy init` generates.
//!
//! Regenerate after an intended change with `UPDATE_GOLDEN=1 cargo test -p trellis-proxy --test
//! init_rules` and review the diff.
use std::path::PathBuf;

use trellis_proxy::init::rules::{self, Family, Jumps, RuleSpec};

fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    assert_eq!(actual, expected, "golden file {} differs", path.display());
}

fn with_exclusions() -> RuleSpec {
    RuleSpec {
        exclude_inbound_ports: rules::parse_ports("8081,9000,8081").unwrap(),
        exclude_outbound_ports: rules::parse_ports("5432, 3306").unwrap(),
        exclude_outbound_cidrs: rules::parse_cidrs("169.254.169.254/32,10.96.0.0/12,fd00::/8")
            .unwrap(),
        ..RuleSpec::default()
    }
}

#[test]
fn default_rules_v4() {
    golden(
        "init-default-v4.rules",
        &rules::render(&RuleSpec::default(), Family::V4, Jumps::ALL),
    );
}

#[test]
fn default_rules_v6() {
    golden(
        "init-default-v6.rules",
        &rules::render(&RuleSpec::default(), Family::V6, Jumps::ALL),
    );
}

#[test]
fn exclusion_rules_v4() {
    golden(
        "init-exclusions-v4.rules",
        &rules::render(&with_exclusions(), Family::V4, Jumps::ALL),
    );
}

#[test]
fn exclusion_rules_v6() {
    golden(
        "init-exclusions-v6.rules",
        &rules::render(&with_exclusions(), Family::V6, Jumps::ALL),
    );
}

/// The CLI's dry run prints exactly the rendered files (IPv4 then IPv6) and touches nothing.
#[test]
fn dry_run_prints_the_golden_rules() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trellis-proxy"))
        .args([
            "init",
            "--dry-run",
            "--exclude-inbound-ports",
            "8081,9000,8081",
            "--exclude-outbound-ports",
            "5432, 3306",
            "--exclude-outbound-cidrs",
            "169.254.169.254/32,10.96.0.0/12,fd00::/8",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let expected = rules::render(&with_exclusions(), Family::V4, Jumps::ALL)
        + &rules::render(&with_exclusions(), Family::V6, Jumps::ALL);
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expected);
}

/// Every bad flag is reported (not just the first) with exit code 64, before anything is applied.
#[test]
fn bad_flags_are_all_reported() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trellis-proxy"))
        .args([
            "init",
            "--exclude-inbound-ports",
            "80,http",
            "--exclude-outbound-cidrs",
            "10.0.0.0/40",
            "--backend",
            "bpf",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("invalid port \"http\""), "{err}");
    assert!(err.contains("invalid CIDR \"10.0.0.0/40\""), "{err}");
    assert!(err.contains("invalid backend \"bpf\""), "{err}");
    assert!(out.stdout.is_empty());
}
