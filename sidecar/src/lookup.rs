//! Finding a connection's destination Service in O(1).
//!
//! Every new outbound connection asks "which Service is this?" — by original destination
//! (cluster IP or endpoint address, and port) when iptables redirected it, by HTTP authority in
//! local mode. Scanning the outbound table for that made connection setup cost grow with the
//! cluster (every Service, port and endpoint, per connection). [`OutboundIndex`] is built once
//! per config, off the request path, when the reloader accepts a config
//! ([`crate::reload::Snapshot::new`]), and answers with hash lookups.
//!
//! The answers are exactly those of the scan it replaces (a property test checks it against
//! [`scan`]): the first Service in config order wins where several match.

use std::collections::HashMap;

/// A hash map for the request path: foldhash instead of std's SipHash, which cost about 150
/// instructions per lookup of a short key (callgrind; a request made five: two in the route
/// table, one by authority, two in the connection pool) where foldhash takes a tenth of that.
/// Seeded per process, as std's is. foldhash claims less resistance to collision flooding than
/// SipHash, so these maps are keyed only by what the mesh's config or the pod's own
/// application chooses (Service names, addresses, pool keys), never by what an outside peer
/// sends (per-peer connection counts keep std's hasher: see `conn_limit`).
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
use std::net::SocketAddr;

use crate::config::{OutboundService, ProxyConfig};

/// Hash maps from what a connection carries to the position of its Service in
/// [`ProxyConfig::outbound`].
#[derive(Debug, Default)]
pub struct OutboundIndex {
    /// `cluster IP:service port` and endpoint addresses (whose port is a service port).
    by_addr: FastMap<SocketAddr, u32>,
    /// Service name alone (`reviews`): the first Service of that name in any namespace.
    by_name: FastMap<Box<str>, u32>,
    /// `name.namespace`, the prefix of every longer cluster DNS form.
    by_key: FastMap<Box<str>, u32>,
}

impl OutboundIndex {
    pub fn build(cfg: &ProxyConfig) -> Self {
        let mut ix = OutboundIndex::default();
        for (i, s) in cfg.outbound.iter().enumerate() {
            // The config validator bounds nothing here, but 4 billion Services do not fit a
            // config anyway; stop indexing rather than wrap.
            let Ok(i) = u32::try_from(i) else { break };
            for p in &s.ports {
                for ip in &s.addresses {
                    ix.by_addr.entry(SocketAddr::new(*ip, p.port)).or_insert(i);
                }
                for e in &p.endpoints {
                    if s.port(e.address.port()).is_some() {
                        ix.by_addr.entry(e.address).or_insert(i);
                    }
                }
            }
            ix.by_name.entry(s.name.as_str().into()).or_insert(i);
            ix.by_key.entry(s.key().into_boxed_str()).or_insert(i);
        }
        ix
    }

    /// The Service (and port) a redirected connection was meant for. `cfg` must be the config
    /// this index was built from.
    pub fn service_for_addr<'a>(
        &self,
        cfg: &'a ProxyConfig,
        dst: SocketAddr,
    ) -> Option<&'a OutboundService> {
        cfg.outbound.get(*self.by_addr.get(&dst)? as usize)
    }

    /// Local mode: the Service an HTTP authority names, in any of the forms cluster DNS
    /// accepts (`name`, `name.ns`, `name.ns.svc`, `name.ns.svc.<domain>`), and the port (from
    /// the authority, else the Service's first port).
    pub fn service_for_authority<'a>(
        &self,
        cfg: &'a ProxyConfig,
        authority: &str,
    ) -> Option<(&'a OutboundService, u16)> {
        let (host, port) = split_authority(authority);
        let svc = cfg.outbound.get(self.by_host(host)? as usize)?;
        let port = match port {
            Some(p) if svc.port(p).is_some() => p,
            Some(_) => return None,
            None => svc.ports.first()?.port,
        };
        Some((svc, port))
    }

    fn by_host(&self, host: &str) -> Option<u32> {
        let host = host.trim_end_matches('.');
        let mut dots = host.match_indices('.').map(|(i, _)| i);
        if dots.next().is_none() {
            return self.by_name.get(host).copied();
        }
        let key = match dots.next() {
            None => host,
            // Past `name.ns`, only `.svc` (and anything after it) names a Service.
            Some(second) => {
                let rest = &host[second + 1..];
                let third = rest.split('.').next().unwrap_or("");
                if third != "svc" {
                    return None;
                }
                &host[..second]
            }
        };
        self.by_key.get(key).copied()
    }
}

/// `host[:port]`; a port that does not parse leaves the whole authority as the host (as an
/// IPv6 literal without brackets would).
fn split_authority(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
            Ok(p) => (h, Some(p)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}

/// The linear scans the index replaced, kept as the reference the index is tested against and
/// the baseline `hack/bench-lookup.sh` measures it against.
pub mod scan {
    use super::*;

    pub fn service_for_addr(cfg: &ProxyConfig, dst: SocketAddr) -> Option<&OutboundService> {
        cfg.outbound.iter().find(|s| {
            s.port(dst.port()).is_some()
                && (s.addresses.contains(&dst.ip())
                    || s.ports
                        .iter()
                        .any(|p| p.endpoints.iter().any(|e| e.address == dst)))
        })
    }

    pub fn service_for_authority<'a>(
        cfg: &'a ProxyConfig,
        authority: &str,
    ) -> Option<(&'a OutboundService, u16)> {
        let (host, port) = split_authority(authority);
        let svc = cfg.outbound.iter().find(|s| s.matches_authority(host))?;
        let port = match port {
            Some(p) if svc.port(p).is_some() => p,
            Some(_) => return None,
            None => svc.ports.first()?.port,
        };
        Some((svc, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CONFIG_VERSION, Endpoint, MeshSettings, Protocol, ServicePort, Telemetry};
    use proptest::prelude::*;

    fn svc(name: &str, ns: &str, ips: &[&str], ports: &[(u16, &[&str])]) -> OutboundService {
        OutboundService {
            name: name.into(),
            namespace: ns.into(),
            addresses: ips.iter().map(|i| i.parse().unwrap()).collect(),
            ports: ports
                .iter()
                .map(|(port, eps)| ServicePort {
                    port: *port,
                    name: None,
                    protocol: Protocol::Auto,
                    endpoints: eps
                        .iter()
                        .map(|e| Endpoint {
                            address: e.parse().unwrap(),
                            identity: None,
                            zone: None,
                        })
                        .collect(),
                })
                .collect(),
            identities: vec![],
            policy: None,
        }
    }

    fn cfg(outbound: Vec<OutboundService>) -> ProxyConfig {
        ProxyConfig {
            version: CONFIG_VERSION,
            revision: String::new(),
            namespace: "shop".into(),
            mesh: MeshSettings {
                trust_domain: "cluster.local".into(),
                identity_endpoint: None,
                telemetry: Telemetry::default(),
                skip_detection_ports: vec![],
                detect_timeout_ms: 100,
            },
            inbound: vec![],
            outbound,
        }
    }

    #[test]
    fn first_service_in_config_order_wins_like_the_scan() {
        let c = cfg(vec![
            svc(
                "reviews",
                "shop",
                &["10.96.0.10"],
                &[(9080, &["10.0.0.5:9080"])],
            ),
            svc("reviews", "other", &["10.96.0.10"], &[(9080, &[])]),
            svc(
                "db",
                "shop",
                &[],
                &[(5432, &["10.0.0.5:5432"]), (5433, &[])],
            ),
        ]);
        let ix = OutboundIndex::build(&c);
        let addr = |a: &str| ix.service_for_addr(&c, a.parse().unwrap()).map(|s| s.key());
        assert_eq!(addr("10.96.0.10:9080").as_deref(), Some("reviews.shop"));
        assert_eq!(addr("10.0.0.5:9080").as_deref(), Some("reviews.shop"));
        assert_eq!(addr("10.0.0.5:5432").as_deref(), Some("db.shop"));
        assert_eq!(addr("10.96.0.10:1"), None);
        let auth = |a: &str| ix.service_for_authority(&c, a).map(|(s, p)| (s.key(), p));
        assert_eq!(auth("reviews"), Some(("reviews.shop".into(), 9080)));
        assert_eq!(
            auth("reviews.other:9080"),
            Some(("reviews.other".into(), 9080))
        );
        assert_eq!(
            auth("db.shop.svc.cluster.local.:5433"),
            Some(("db.shop".into(), 5433))
        );
        assert_eq!(auth("db.shop.pod"), None);
        assert_eq!(auth("db:1"), None);
    }

    fn arb_service() -> impl Strategy<Value = OutboundService> {
        let name = prop_oneof![Just("a"), Just("b"), Just("svc"), Just("a.b")];
        let ns = prop_oneof![Just("a"), Just("b"), Just("svc"), Just("b.svc")];
        let ip = (0u8..3).prop_map(|i| format!("10.0.0.{i}"));
        let port = 1u16..4;
        let ep = (0u8..3, 1u16..4).prop_map(|(i, p)| format!("10.0.0.{i}:{p}"));
        (
            name,
            ns,
            proptest::collection::vec(ip, 0..2),
            proptest::collection::vec((port, proptest::collection::vec(ep, 0..3)), 1..3),
        )
            .prop_map(|(name, ns, ips, ports)| {
                let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
                let eps: Vec<Vec<&str>> = ports
                    .iter()
                    .map(|(_, e)| e.iter().map(String::as_str).collect())
                    .collect();
                let ports: Vec<(u16, &[&str])> = ports
                    .iter()
                    .zip(&eps)
                    .map(|((p, _), e)| (*p, e.as_slice()))
                    .collect();
                svc(name, ns, &ips, &ports)
            })
    }

    proptest! {
        /// The index gives the scan's answer for every address and authority, including
        /// Services that share addresses, names, or dotted names no DNS form reaches.
        #[test]
        fn index_answers_like_the_scan(
            services in proptest::collection::vec(arb_service(), 0..6),
            ip in 0u8..4,
            port in 0u16..5,
            host in prop_oneof![
                Just("a"), Just("b"), Just("a.b"), Just("a.b.svc"), Just("a.b.svc.x.y"),
                Just("a.b.pod"), Just("b.svc"), Just("a.b.svc."), Just("svc.svc.svc"),
                Just("a.b.svc.svc"), Just(""), Just("."), Just("a..b"),
            ],
            with_port in proptest::option::of(0u16..5),
        ) {
            let c = cfg(services);
            let ix = OutboundIndex::build(&c);
            let dst: SocketAddr = format!("10.0.0.{ip}:{port}").parse().unwrap();
            prop_assert_eq!(
                ix.service_for_addr(&c, dst).map(|s| s as *const _),
                scan::service_for_addr(&c, dst).map(|s| s as *const _)
            );
            let authority = match with_port {
                Some(p) => format!("{host}:{p}"),
                None => host.to_string(),
            };
            prop_assert_eq!(
                ix.service_for_authority(&c, &authority).map(|(s, p)| (s as *const _, p)),
                scan::service_for_authority(&c, &authority).map(|(s, p)| (s as *const _, p))
            );
        }
    }
}
