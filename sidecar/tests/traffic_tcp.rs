//! Opaque TCP: per-connection endpoint choice, `maxConnections`, and ejection of an endpoint
//! that refuses connections, against real TCP echo servers.

mod traffic_support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use traffic_support::*;
use trellis_proxy::config::*;
use trellis_proxy::traffic::{Dispatcher, PlainUpstream, TcpRefused};

async fn echo_server() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn tcp_connections_are_balanced_limited_and_dead_endpoints_ejected() {
    let a = echo_server().await;
    let b = echo_server().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let pol = TrafficPolicy {
        source: "shop/db".into(),
        circuit_breaker: Some(CircuitBreaker {
            max_connections: Some(6),
            ..Default::default()
        }),
        outlier_detection: Some(OutlierDetection {
            consecutive_failures: 1,
            base_ejection_ms: 30_000,
            max_ejection_percent: 50,
        }),
        load_balancer: LoadBalancer {
            algorithm: LbAlgorithm::LeastRequest,
            hash_key: None,
        },
        ..Default::default()
    };
    let svc = service("db", &[a, b, dead], Protocol::Tcp, Some(pol));
    let d = Dispatcher::new(Arc::new(PlainUpstream::default()));
    d.update(&config(vec![svc.clone()]));
    let mut open = Vec::new();
    let mut per_addr: HashMap<_, u32> = HashMap::new();
    let mut failures = 0;
    // Hold connections open: least-request spreads them, the dead endpoint is ejected on its
    // first refused connect and never picked again.
    while open.len() < 6 {
        let t = d.pick_tcp(&svc, 80, &ctx()).expect("under the limit");
        let start = Instant::now();
        match tokio::net::TcpStream::connect(t.target.addr).await {
            Ok(mut s) => {
                t.connected(Ok(start.elapsed()));
                s.write_all(b"ping").await.unwrap();
                let mut buf = [0u8; 4];
                s.read_exact(&mut buf).await.unwrap();
                assert_eq!(&buf, b"ping");
                *per_addr.entry(t.target.addr).or_default() += 1;
                open.push((s, t));
            }
            Err(_) => {
                assert_eq!(t.target.addr, dead);
                t.connected(Err(()));
                failures += 1;
            }
        }
    }
    assert!(
        failures <= 1,
        "ejected after one refused connect: {failures}"
    );
    assert_eq!(per_addr.get(&a), Some(&3), "{per_addr:?}");
    assert_eq!(per_addr.get(&b), Some(&3), "{per_addr:?}");
    assert!(matches!(
        d.pick_tcp(&svc, 80, &ctx()),
        Err(TcpRefused::Overflow { .. })
    ));
    open.pop();
    assert!(
        d.pick_tcp(&svc, 80, &ctx()).is_ok(),
        "a closed connection frees its slot"
    );
}
