//! Ports for the `trellis dev` tests: a run of consecutive free 127.0.0.1 ports below the
//! kernel's ephemeral range.
//!
//! Below it, because `trellis dev` binds its run only as each process starts (a replacement
//! proxy's spare ports only during a rollout), and anything that takes an ephemeral port
//! meanwhile (the dashboard and operator-metrics listeners on port 0, every outgoing
//! connection's local port, other tests) could take one of them: a replacement proxy then
//! failed with "Address already in use".

use std::net::{SocketAddr, TcpListener};

/// The first port of the kernel's ephemeral range (Linux's default when unreadable).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// The first of `count` consecutive ports that are free now, all below the ephemeral range.
pub fn free_base(count: u16) -> u16 {
    const LOW: u16 = 10000;
    let high = ephemeral_start().saturating_sub(count);
    assert!(
        high > LOW,
        "no room for {count} ports between {LOW} and the ephemeral range"
    );
    for _ in 0..500 {
        let base = LOW + rand::random::<u16>() % (high - LOW);
        if (base..base + count)
            .all(|p| TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], p))).is_ok())
        {
            return base;
        }
    }
    panic!("no {count} consecutive free ports on 127.0.0.1 below the ephemeral range");
}
