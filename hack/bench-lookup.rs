//! Destination lookup with 10 versus 10 000 Services: the per-config index against the linear
//! scan it replaced, and connection setup through a real in-process proxy. Run with
//! `hack/bench-lookup.sh`; not run by CI, only compiled.
//!
//! Connection setup: two proxies (10 and 10 000 Services in their config, the destination last
//! in config order) in local mode on loopback, each in front of the same HTTP/1.1 upstream;
//! every sample is a new TCP connection to the proxy's outbound port carrying one
//! `Connection: close` request routed by its authority, timed until the response has been
//! read to the end.
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
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
            let pi = (next() % 2) as usize;
            let port = [80, 9090][pi];
            match next() % 3 {
                0 => Query::Addr(SocketAddr::new(ip(96, i), port)),
                1 => {
                    let net = 1 + (pi * 3) as u8 + (next() % 3) as u8;
                    Query::Addr(SocketAddr::new(ip(net, i), port))
                }
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

/// Credentials for the proxy (it is ready only with a certificate; the bench itself is
/// plaintext).
fn creds() -> trellis_proxy::creds::Credentials {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_der = ca.self_signed(&ca_key).unwrap().der().clone();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::URI(
        "spiffe://cluster.local/ns/bench/sa/client"
            .try_into()
            .unwrap(),
    )];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    trellis_proxy::tls::credentials_from_parts(
        vec![cert.der().clone()],
        rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        vec![ca_der],
    )
    .unwrap()
}

/// A keep-it-simple HTTP/1.1 upstream answering `ok`.
async fn upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A proxy whose config has `n` Services, the last of which (`target.bench:80`) leads to
/// `upstream`. Returns its outbound address and the temp dir it reads.
async fn proxy(n: usize, upstream: SocketAddr) -> (SocketAddr, tempfile::TempDir) {
    let mut cfg = config(n - 1);
    cfg.outbound.push(OutboundService {
        name: "target".into(),
        namespace: "bench".into(),
        addresses: vec![],
        ports: vec![ServicePort {
            port: 80,
            name: None,
            protocol: Protocol::Http1,
            endpoints: vec![Endpoint {
                address: upstream,
                identity: None,
                zone: None,
            }],
        }],
        identities: vec![],
        policy: None,
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), cfg.to_json_pretty()).unwrap();
    std::fs::write(dir.path().join("labels"), "app=\"bench\"\n").unwrap();
    let (tx, rx) = trellis_proxy::creds::channel();
    tx.send_replace(Some(Arc::new(creds())));
    // Keep the sender alive with the proxy.
    std::mem::forget(tx);
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let running = trellis_proxy::run::start(
        trellis_proxy::run::Options {
            dir: dir.path().to_path_buf(),
            outbound_addrs: vec![any],
            inbound_addrs: vec![any],
            admin_addrs: vec![any],
            // Routing by authority: no iptables here.
            local_mode: true,
            inbound_target: None,
            inbound_to_localhost: false,
            admin_limits: trellis_proxy::admin::Limits::default(),
            opaque_ports: Vec::new(),
            tcp_flush_interval: trellis_proxy::proxy::tcp::FLUSH_INTERVAL,
            inbound_limits: Default::default(),
            app_probes: Default::default(),
            pod_ip: None,
            pod: Default::default(),
            discovery: None,
        },
        rx,
    )
    .await
    .unwrap();
    let addr = running.outbound_addr;
    std::mem::forget(running);
    // Wait for the config to load: the first request that routes.
    for _ in 0..500 {
        if one_connection(addr).await.is_ok() {
            return (addr, dir);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("proxy with {n} Services did not route within 10 s");
}

/// One new connection, one request, the response read to the end.
async fn one_connection(proxy: SocketAddr) -> Result<Duration, String> {
    let start = Instant::now();
    let mut s = TcpStream::connect(proxy).await.map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: target.bench:80\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(256);
    s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    let took = start.elapsed();
    if buf.starts_with(b"HTTP/1.1 200") {
        Ok(took)
    } else {
        Err(String::from_utf8_lossy(&buf).into_owned())
    }
}

/// Connection setup through real proxies: median microseconds per connection, per round.
fn setup_bench(rounds: usize, per_round: usize) -> BTreeMap<usize, Vec<f64>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let up = upstream().await;
        let mut proxies = Vec::new();
        for n in [10usize, 10_000] {
            proxies.push((n, proxy(n, up).await));
        }
        let mut out: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        for _ in 0..rounds {
            for (n, (addr, _)) in &proxies {
                let mut samples = Vec::with_capacity(per_round);
                for _ in 0..per_round {
                    let d = one_connection(*addr)
                        .await
                        .expect("request through the proxy");
                    samples.push(d.as_secs_f64() * 1e6);
                }
                out.entry(*n).or_default().push(median(samples));
            }
        }
        out
    })
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
    let per_round = 500;
    let setup = setup_bench(rounds, per_round);
    let small = median(setup[&10].clone());
    let large = median(setup[&10_000].clone());
    println!(
        "\nconnection setup through the proxy (new connection + one request, {per_round} per \
         round and proxy, median of per-round medians, µs):\n"
    );
    println!("| 10 Services | 10 000 Services | ratio 10 000 / 10 |");
    println!("|---|---|---|");
    println!("| {small:.1} | {large:.1} | {:.3}x |", large / small);
}

fn round_us(d: Duration) -> Duration {
    Duration::from_micros(d.as_micros() as u64)
}
