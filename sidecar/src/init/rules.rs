//! Pure generation of the pod's redirect rules as one `iptables-restore` file.
//!
//! The file touches the `raw` table (one chain, [`CHAIN_GUARD`]) and the `nat` table (four
//! chains), all our own. It is applied with `--noflush`, so rules of anyone else survive.
//! Declaring a chain (`:TRELLIS_INBOUND - [0:0]`) in a restore file creates it when missing and
//! flushes it when present, which makes the chain bodies idempotent by construction. The three
//! jumps from the built-in chains (`raw PREROUTING`, `nat PREROUTING`, `nat OUTPUT`) cannot be
//! made idempotent inside the file (a restore file has no "append if absent"), so [`render`]
//! takes which jumps already exist and leaves those out; [`super::apply`] checks them with
//! `iptables -C` first.
//!
//! Traffic the rules drop: new connections from outside the pod (not on `lo`) straight to the
//! proxy's inbound or outbound port. Only redirected traffic may reach those; a direct
//! connection is someone trying to use the proxy (as a relay with the pod's identity, or to
//! reach the inbound side without an original destination). The `raw` table sees the packet
//! before `nat` rewrites it, so a redirected connection (original port 8080) is never confused
//! with a direct one (port 15006). The admin port stays reachable: the kubelet probes it.
//!
//! Traffic the rules leave alone, and why:
//! - inbound to the proxy's own ports (inbound, outbound, admin 15020) so the kubelet can probe
//!   the proxy and redirected connections never loop (from outside, the first two are dropped
//!   earlier, in `raw`);
//! - inbound to the excluded ports (the pod's `trellis.dev/exclude-inbound-ports` annotation;
//!   kubelet probes exclude nothing: the injector sends them through the admin port);
//! - outbound from the proxy UID (the proxy's own upstream connections), including its direct
//!   connections to the app at the pod IP (inbound forwarding and app probes), which come from
//!   [`Family::probe_source`] so that they are told apart from the exception below;
//! - outbound to loopback from the app (app to itself, including the app calling its own pod IP,
//!   which Linux routes over `lo`: like Istio, this stays direct and does not pass through the
//!   proxy);
//! - outbound to the excluded ports and CIDRs.
//!
//! One exception, also as in Istio: the proxy connecting to its own pod IP over `lo` (an
//! outbound request whose endpoint is this very pod) is sent to the inbound port, so the request
//! gets inbound policy exactly like one from another pod. The proxy's inbound forwarding and
//! app probes (see `crate::probe`) must reach the app directly instead, so they are told apart
//! by their source address ([`Family::probe_source`]) and left alone; nothing else the proxy
//! sends uses it.
use std::net::IpAddr;
use std::str::FromStr;

use super::InitError;

/// Chain every inbound TCP connection enters from `PREROUTING`.
pub const CHAIN_INBOUND: &str = "TRELLIS_INBOUND";
/// Chain that redirects to the inbound port.
pub const CHAIN_IN_REDIRECT: &str = "TRELLIS_IN_REDIRECT";
/// Chain every locally generated TCP connection enters from `OUTPUT`.
pub const CHAIN_OUTPUT: &str = "TRELLIS_OUTPUT";
/// Chain that redirects to the outbound port.
pub const CHAIN_OUT_REDIRECT: &str = "TRELLIS_OUT_REDIRECT";
/// Chain in the `raw` table that drops direct connections from outside to the proxy's ports.
pub const CHAIN_GUARD: &str = "TRELLIS_GUARD";

/// The proxy's admin port: never redirected, so kubelet probes reach the proxy itself.
pub const ADMIN_PORT: u16 = 15020;

/// The jump from `PREROUTING` into our inbound chain, as `iptables` rule arguments.
pub const JUMP_PREROUTING: [&str; 5] = ["PREROUTING", "-p", "tcp", "-j", CHAIN_INBOUND];
/// The jump from `OUTPUT` into our outbound chain, as `iptables` rule arguments.
pub const JUMP_OUTPUT: [&str; 5] = ["OUTPUT", "-p", "tcp", "-j", CHAIN_OUTPUT];
/// The jump from `raw PREROUTING` into the guard chain, as `iptables` rule arguments.
pub const JUMP_GUARD: [&str; 5] = ["PREROUTING", "-p", "tcp", "-j", CHAIN_GUARD];

/// Address family of a rules file: `iptables` (IPv4) or `ip6tables` (IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    /// The source address of the proxy's direct connections to the app, app probes
    /// ([`crate::probe::PROBE_SOURCE_V4`] / [`crate::probe::PROBE_SOURCE_V6`]) and inbound
    /// forwarding (`crate::proxy::upstream::SourceAddr`, the same addresses), as a host network.
    pub fn probe_source(self) -> String {
        match self {
            Family::V4 => format!("{}/32", crate::probe::PROBE_SOURCE_V4),
            Family::V6 => format!("{}/128", crate::probe::PROBE_SOURCE_V6),
        }
    }
}

/// An IP network such as `10.0.0.0/8` or `fd00::/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    fn family(&self) -> Family {
        match self.addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = InitError;

    /// Parses `addr/prefix`, or a bare address (a host route: `/32` or `/128`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InitError::BadCidr(s.to_string());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }
}

/// Parses a comma-separated port list (`"8080, 9090"`); empty items are ignored; port 0 and
/// anything above 65535 are refused.
pub fn parse_ports(s: &str) -> Result<Vec<u16>, InitError> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        match item.parse::<u16>() {
            Ok(p) if p != 0 => out.push(p),
            _ => return Err(InitError::BadPort(item.to_string())),
        }
    }
    Ok(out)
}

/// Parses a comma-separated CIDR list.
pub fn parse_cidrs(s: &str) -> Result<Vec<Cidr>, InitError> {
    s.split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty())
        .map(Cidr::from_str)
        .collect()
}

/// Everything the rules depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSpec {
    pub proxy_uid: u32,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<Cidr>,
}

impl Default for RuleSpec {
    fn default() -> Self {
        Self {
            proxy_uid: 2137,
            inbound_port: 15006,
            outbound_port: 15001,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
        }
    }
}

/// Which jumps from built-in chains to add; `true` means "missing, add it".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Jumps {
    pub prerouting: bool,
    pub output: bool,
    /// `raw PREROUTING` into [`CHAIN_GUARD`].
    pub guard: bool,
}

impl Jumps {
    /// A fresh network namespace: every jump is missing.
    pub const ALL: Jumps = Jumps {
        prerouting: true,
        output: true,
        guard: true,
    };
}

/// Sorted, de-duplicated copy (stable output whatever order the annotation used).
fn dedup<T: Ord + Clone>(v: &[T]) -> Vec<T> {
    let mut v = v.to_vec();
    v.sort();
    v.dedup();
    v
}

/// Renders the `iptables-restore` file for one address family.
pub fn render(spec: &RuleSpec, family: Family, jumps: Jumps) -> String {
    let mut f = String::new();
    let uid = spec.proxy_uid;
    let lo = family.loopback();
    let mut line = |s: String| {
        f.push_str(&s);
        f.push('\n');
    };
    let name = match family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    };
    line(format!(
        "# Generated by trellis-proxy init ({name}); applied with iptables-restore --noflush."
    ));
    // Guard: new connections from outside straight to the proxy's data ports are dropped.
    line("*raw".into());
    line(format!(":{CHAIN_GUARD} - [0:0]"));
    if jumps.guard {
        line(format!("-A {}", JUMP_GUARD.join(" ")));
    }
    line(format!("-A {CHAIN_GUARD} -i lo -j RETURN"));
    let mut guarded = vec![spec.inbound_port, spec.outbound_port];
    guarded.dedup();
    for port in guarded {
        line(format!(
            "-A {CHAIN_GUARD} -p tcp --dport {port} --tcp-flags FIN,SYN,RST,ACK SYN -j DROP"
        ));
    }
    line("COMMIT".into());
    line("*nat".into());
    for chain in [
        CHAIN_INBOUND,
        CHAIN_IN_REDIRECT,
        CHAIN_OUTPUT,
        CHAIN_OUT_REDIRECT,
    ] {
        line(format!(":{chain} - [0:0]"));
    }
    if jumps.prerouting {
        line(format!("-A {}", JUMP_PREROUTING.join(" ")));
    }
    if jumps.output {
        line(format!("-A {}", JUMP_OUTPUT.join(" ")));
    }

    // Inbound.
    let mut skip_in = vec![spec.inbound_port, spec.outbound_port, ADMIN_PORT];
    skip_in.extend(dedup(&spec.exclude_inbound_ports));
    let mut seen = Vec::new();
    for port in skip_in {
        if !seen.contains(&port) {
            seen.push(port);
            line(format!(
                "-A {CHAIN_INBOUND} -p tcp --dport {port} -j RETURN"
            ));
        }
    }
    line(format!("-A {CHAIN_INBOUND} -p tcp -j {CHAIN_IN_REDIRECT}"));
    line(format!(
        "-A {CHAIN_IN_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        spec.inbound_port
    ));

    // Outbound. First the proxy's inbound forwarding and app probes to the pod IP (from the
    // exempt source): direct, or they would loop back into inbound through the rule after it.
    line(format!(
        "-A {CHAIN_OUTPUT} -o lo -s {} -m owner --uid-owner {uid} -j RETURN",
        family.probe_source()
    ));
    line(format!(
        "-A {CHAIN_OUTPUT} -o lo ! -d {lo} -m owner --uid-owner {uid} -j {CHAIN_IN_REDIRECT}"
    ));
    line(format!(
        "-A {CHAIN_OUTPUT} -o lo -m owner ! --uid-owner {uid} -j RETURN"
    ));
    line(format!(
        "-A {CHAIN_OUTPUT} -m owner --uid-owner {uid} -j RETURN"
    ));
    line(format!("-A {CHAIN_OUTPUT} -d {lo} -j RETURN"));
    for cidr in dedup_cidrs(&spec.exclude_outbound_cidrs) {
        if cidr.family() == family {
            line(format!("-A {CHAIN_OUTPUT} -d {cidr} -j RETURN"));
        }
    }
    for port in dedup(&spec.exclude_outbound_ports) {
        line(format!("-A {CHAIN_OUTPUT} -p tcp --dport {port} -j RETURN"));
    }
    line(format!("-A {CHAIN_OUTPUT} -j {CHAIN_OUT_REDIRECT}"));
    line(format!(
        "-A {CHAIN_OUT_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        spec.outbound_port
    ));
    line("COMMIT".into());
    f
}

fn dedup_cidrs(v: &[Cidr]) -> Vec<Cidr> {
    let mut out: Vec<Cidr> = Vec::new();
    for c in v {
        if !out.contains(c) {
            out.push(*c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_and_refuse_garbage() {
        assert_eq!(parse_ports(" 80, 443,,").unwrap(), vec![80, 443]);
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("70000").is_err());
        assert!(parse_ports("http").is_err());
    }

    #[test]
    fn cidrs_parse_and_refuse_garbage() {
        let c = parse_cidrs("10.0.0.0/8, fd00::/8,1.2.3.4").unwrap();
        assert_eq!(c[0].to_string(), "10.0.0.0/8");
        assert_eq!(c[1].to_string(), "fd00::/8");
        assert_eq!(c[2].to_string(), "1.2.3.4/32");
        assert!(parse_cidrs("10.0.0.0/33").is_err());
        assert!(parse_cidrs("example.com/8").is_err());
    }

    #[test]
    fn cidrs_go_to_their_own_family_only() {
        let spec = RuleSpec {
            exclude_outbound_cidrs: parse_cidrs("10.0.0.0/8,fd00::/8").unwrap(),
            ..RuleSpec::default()
        };
        let v4 = render(&spec, Family::V4, Jumps::ALL);
        let v6 = render(&spec, Family::V6, Jumps::ALL);
        assert!(v4.contains("-d 10.0.0.0/8 -j RETURN") && !v4.contains("fd00::/8"));
        assert!(v6.contains("-d fd00::/8 -j RETURN") && !v6.contains("10.0.0.0/8"));
        assert!(v6.contains("! -d ::1/128"));
    }

    #[test]
    fn existing_jumps_are_left_out() {
        let none = Jumps {
            prerouting: false,
            output: false,
            guard: false,
        };
        let s = render(&RuleSpec::default(), Family::V4, none);
        assert!(!s.contains("-A PREROUTING") && !s.contains("-A OUTPUT"));
        assert!(s.contains(":TRELLIS_GUARD - [0:0]"));
        // The chains are still declared, hence flushed and refilled: the body is idempotent.
        assert!(s.contains(":TRELLIS_OUTPUT - [0:0]"));
    }
}
