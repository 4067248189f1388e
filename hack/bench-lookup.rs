//! Destination lookup with 10 versus 10 000 Services: the per-config index against the linear
//! scan it replaced. Run with `hack/bench-lookup.sh`; not run by CI, only compiled.
//!
//! Each Service has a cluster IP, two ports and three endpoints per port (the shape the
//! compiler emits with inline discovery). Queries are a fixed random mix of cluster IP:port,
//! endpoint address and `name.ns.svc.cluster.local:port` authorities over all Services, so the
//! large table is probed across its whole size (cache misses included). Sizes and methods run
//! interleaved in every round; the report gives per-lookup medians over the rounds and the
//! ratio of 10 000 Services to 10, measured in the same run.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use trellis_proxy::config::{
    CONFIG_VERSION, Endpoint, MeshSettings, OutboundService, Protocol, ProxyConfig, ServicePort,
    Telemetry,
};
use trellis_proxy::lookup::scan;
use trellis_proxy::reload::Snapshot;

fn ip(net: u8, i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, net, (i >> 8) as u8, i as u8))
}

fn config(n: usize) -> ProxyConfig {
    let outbound = (0..n)
        .map(|i| OutboundService {
            name: format!("svc-{i}"),
            namespace: format!("ns-{}", i % 50),
            addresses: vec![ip(96, i)],
            ports: [80u16, 9090]
                .iter()
                .enumerate()
                .map(|(pi, port)| ServicePort {
                    port: *port,
                    name: None,
                    protocol: Protocol::Http1,
                    endpoints: (0..3)
                        .map(|e| Endpoint {
                            address: SocketAddr::new(ip(1 + (pi * 3 + e) as u8, i), *port),
                            identity: None,
                            zone: None,
                        })
                        .collect(),
                })
                .collect(),
            identities: vec![],
            policy: None,
        })
        .collect();
    ProxyConfig {
        version: CONFIG_VERSION,
        revision: String::new(),
        namespace: "ns-0".into(),
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

enum Query {
    Addr(SocketAddr),
    Authority(String),
}

/// A deterministic pseudo-random mix over all `n` Services (xorshift; no dependency).
fn queries(n: usize, count: usize) -> Vec<Query> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..count)
        .map(|_| {
            let i = next() as usize % n;
            let port = if next() % 2 == 0 { 80 } else { 9090 };
            match next() % 3 {
                0 => Query::Addr(SocketAddr::new(ip(96, i), port)),
                1 => Query::Addr(SocketAddr::new(ip(1 + (next() % 6) as u8, i), port)),
                _ => Query::Authority(format!("svc-{i}.ns-{}.svc.cluster.local:{port}", i % 50)),
            }
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Method {
    Index,
    Scan,
}

/// Nanoseconds per lookup over `iters` lookups cycling through `qs`.
fn measure(snap: &Snapshot, qs: &[Query], method: Method, iters: usize) -> f64 {
    let start = Instant::now();
    let mut found = 0usize;
    for q in qs.iter().cycle().take(iters) {
        let hit = match (method, q) {
            (Method::Index, Query::Addr(a)) => snap.service_for_addr(*a).is_some(),
            (Method::Index, Query::Authority(h)) => snap.service_for_authority(h).is_some(),
            (Method::Scan, Query::Addr(a)) => scan::service_for_addr(&snap.config, *a).is_some(),
            (Method::Scan, Query::Authority(h)) => {
                scan::service_for_authority(&snap.config, h).is_some()
            }
        };
        found += usize::from(black_box(hit));
    }
    let took = start.elapsed();
    assert_eq!(found, iters, "every query names a Service");
    took.as_nanos() as f64 / iters as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut rounds = 5usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => rounds = args.next().and_then(|v| v.parse().ok()).unwrap_or(rounds),
            other => {
                eprintln!("unknown flag {other}; flags: --rounds N");
                std::process::exit(64);
            }
        }
    }
    let sizes = [10usize, 10_000];
    let mut snaps = Vec::new();
    let mut build = BTreeMap::new();
    for &n in &sizes {
        let cfg = config(n);
        let t = Instant::now();
        let snap = Snapshot::new(cfg, BTreeMap::new());
        build.insert(n, t.elapsed());
        snaps.push((n, snap, queries(n, 4096)));
    }
    let mut results: BTreeMap<(usize, &str), Vec<f64>> = BTreeMap::new();
    for _ in 0..rounds {
        for (n, snap, qs) in &snaps {
            for (method, name) in [(Method::Index, "index"), (Method::Scan, "scan")] {
                // The scan of 10 000 Services takes tens of microseconds: fewer iterations.
                let iters = match (method, *n) {
                    (Method::Scan, n) if n > 100 => 4_096,
                    _ => 1_000_000,
                };
                results
                    .entry((*n, name))
                    .or_default()
                    .push(measure(snap, qs, method, iters));
            }
        }
    }
    println!("rounds: {rounds} (interleaved); ns per lookup, median over rounds\n");
    println!("| method | 10 Services | 10 000 Services | ratio 10 000 / 10 |");
    println!("|---|---|---|---|");
    for name in ["index", "scan"] {
        let small = median(results[&(10, name)].clone());
        let large = median(results[&(10_000, name)].clone());
        println!(
            "| {name} | {small:.1} | {large:.1} | {:.2}x |",
            large / small
        );
    }
    println!(
        "\nindex build (once per config reload): {:?} for 10 Services, {:?} for 10 000",
        build[&10],
        round_us(build[&10_000])
    );
}

fn round_us(d: Duration) -> Duration {
    Duration::from_micros(d.as_micros() as u64)
}
