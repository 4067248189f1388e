//! Long-lived connections that leave the pool close when their mTLS peer stops being trusted:
//! opaque TCP and upgraded (WebSocket-style) tunnels, outbound and inbound, at the peer
//! certificate's notAfter, and inbound connections when a reload removes the client's root.
//! Two real proxies in-process, real mTLS with short-lived certificates from a test CA, real
//! TCP and HTTP peers.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_proxy::config::{MtlsMode, Protocol};
use trellis_proxy::creds::{Credentials, CredentialsTx};

/// Lifetime of the short-lived certificates: long enough for two debug-build proxies to start
/// and connect on a loaded machine, short enough to wait for.
const SHORT: Duration = Duration::from_secs(6);
const LONG: Duration = Duration::from_secs(3600);

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let der = p.self_signed(&key).unwrap().der().clone();
        Ca {
            issuer: Issuer::new(p, key),
            der,
        }
    }

    /// Credentials for `id`, valid from a minute ago for `life`, trusting `roots`.
    fn creds(&self, id: &str, life: Duration, roots: &[&Ca]) -> Arc<Credentials> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now + time::Duration::try_from(life).unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Arc::new(
            trellis_proxy::tls::credentials_from_parts(
                vec![cert.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
                roots.iter().map(|r| r.der.clone()).collect(),
            )
            .unwrap(),
        )
    }
}

async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
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

/// Client proxy `a` (identity `web`) and server proxy `b` (identity `db`, forwarding to
/// `upstream`), each with the credentials given; `a` routes `db.shop` to `b` with `protocol`.
/// For TCP the Service's address is `a`'s own outbound listener (local mode has no original
/// destination), so a plain connect to it is routed like a redirected one.
struct Pair {
    a: TestProxy,
    _b: TestProxy,
    a_creds: CredentialsTx,
    b_creds: CredentialsTx,
}

async fn pair(
    a_creds: Arc<Credentials>,
    b_creds: Arc<Credentials>,
    upstream: SocketAddr,
    protocol: Protocol,
) -> Pair {
    let (btx, brx) = trellis_proxy::creds::channel();
    btx.send_replace(Some(b_creds));
    let b = TestProxy::start_with_creds(
        brx,
        &config("b1", inbound(MtlsMode::Strict), vec![]),
        Some(upstream),
    )
    .await;
    let (atx, arx) = trellis_proxy::creds::channel();
    atx.send_replace(Some(a_creds));
    let mut a =
        TestProxy::start_with_creds(arx, &config("a1", inbound(MtlsMode::Strict), vec![]), None)
            .await;
    let out = a.running.outbound_addr;
    let port = if protocol == Protocol::Tcp {
        out.port()
    } else {
        8080
    };
    let mut svc = service("db", port, protocol, b.running.inbound_addr, vec![id("db")]);
    if protocol == Protocol::Tcp {
        svc.addresses = vec![out.ip()];
    }
    a.apply(&config("a2", inbound(MtlsMode::Strict), vec![svc]))
        .await;
    Pair {
        a,
        _b: b,
        a_creds: atx,
        b_creds: btx,
    }
}

fn not_after(c: &Credentials) -> SystemTime {
    c.not_after
}

async fn echo_round(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("echo through both proxies")
        .unwrap();
    assert_eq!(buf, msg);
}

/// Waits for the connection to end and returns when it did. A clean close reads as end of
/// stream; a reset fails the test (the close must be graceful).
async fn wait_closed(s: &mut TcpStream, limit: Duration) -> SystemTime {
    let mut buf = [0u8; 64];
    let end = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return SystemTime::now(),
                Ok(_) => continue,
                Err(e) => panic!("connection reset instead of closed: {e}"),
            }
        }
    })
    .await;
    end.expect("the connection stayed open")
}

/// Closed at notAfter: not before it (give or take the certificate's one-second precision),
/// and within two seconds after.
fn assert_closed_at(closed: SystemTime, expires: SystemTime) {
    let early = expires.duration_since(closed).unwrap_or(Duration::ZERO);
    assert!(
        early <= Duration::from_secs(1),
        "closed {early:?} before notAfter"
    );
    let late = closed.duration_since(expires).unwrap_or(Duration::ZERO);
    assert!(
        late <= Duration::from_secs(2),
        "closed {late:?} after notAfter"
    );
}

async fn connect_tcp(p: &Pair) -> TcpStream {
    let mut s = TcpStream::connect(p.a.running.outbound_addr).await.unwrap();
    echo_round(&mut s, b"hello").await;
    s
}

/// HTTP/1.1 upgrade through both proxies to the common upstream's echo; returns the tunnel.
async fn connect_upgrade(p: &Pair) -> TcpStream {
    let mut s = TcpStream::connect(p.a.running.outbound_addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: db.shop:8080\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "closed during the 101");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    echo_round(&mut s, b"hello").await;
    s
}

#[tokio::test]
async fn inbound_tcp_closes_when_the_client_certificate_expires() {
    let ca = Ca::new("mesh");
    let a = ca.creds(&id("web"), SHORT, &[&ca]);
    let expires = not_after(&a);
    let p = pair(
        a,
        ca.creds(&id("db"), LONG, &[&ca]),
        echo_server().await,
        Protocol::Tcp,
    )
    .await;
    let mut s = connect_tcp(&p).await;
    let closed = wait_closed(&mut s, SHORT + Duration::from_secs(5)).await;
    assert_closed_at(closed, expires);
}

#[tokio::test]
async fn outbound_tcp_closes_when_the_server_certificate_expires() {
    let ca = Ca::new("mesh");
    let b = ca.creds(&id("db"), SHORT, &[&ca]);
    let expires = not_after(&b);
    let p = pair(
        ca.creds(&id("web"), LONG, &[&ca]),
        b,
        echo_server().await,
        Protocol::Tcp,
    )
    .await;
    let mut s = connect_tcp(&p).await;
    let closed = wait_closed(&mut s, SHORT + Duration::from_secs(5)).await;
    assert_closed_at(closed, expires);
}

#[tokio::test]
async fn upgraded_tunnels_close_when_either_peer_certificate_expires() {
    let up = upstream(Speaks::Http1Only).await;
    let ca = Ca::new("mesh");
    // The client proxy's certificate expires: the server proxy's inbound tunnel closes.
    let a = ca.creds(&id("web"), SHORT, &[&ca]);
    let expires = not_after(&a);
    let p = pair(a, ca.creds(&id("db"), LONG, &[&ca]), up, Protocol::Http1).await;
    let mut s = connect_upgrade(&p).await;
    let closed = wait_closed(&mut s, SHORT + Duration::from_secs(5)).await;
    assert_closed_at(closed, expires);

    // The server proxy's certificate expires: the client proxy's outbound tunnel closes.
    let b = ca.creds(&id("db"), SHORT, &[&ca]);
    let expires = not_after(&b);
    let p = pair(ca.creds(&id("web"), LONG, &[&ca]), b, up, Protocol::Http1).await;
    let mut s = connect_upgrade(&p).await;
    let closed = wait_closed(&mut s, SHORT + Duration::from_secs(5)).await;
    assert_closed_at(closed, expires);
}

#[tokio::test]
async fn connections_close_when_a_reload_removes_the_peers_root() {
    let (root_a, root_b) = (Ca::new("root-a"), Ca::new("root-b"));
    // `web` holds a certificate from root A, `db` from root B; both trust both roots.
    let p = pair(
        root_a.creds(&id("web"), LONG, &[&root_a, &root_b]),
        root_b.creds(&id("db"), LONG, &[&root_a, &root_b]),
        echo_server().await,
        Protocol::Tcp,
    )
    .await;
    let mut s = connect_tcp(&p).await;
    // A renewal that keeps both roots leaves the connection alone.
    p.b_creds
        .send_replace(Some(root_b.creds(&id("db"), LONG, &[&root_a, &root_b])));
    echo_round(&mut s, b"still here").await;
    // Root A leaves the server proxy's bundle: its inbound connection from `web` closes.
    let started = Instant::now();
    p.b_creds
        .send_replace(Some(root_b.creds(&id("db"), LONG, &[&root_b])));
    wait_closed(&mut s, Duration::from_secs(5)).await;
    assert!(started.elapsed() < Duration::from_secs(2));

    // Again from the client's side: root B leaves the client proxy's bundle, and its
    // outbound connection to `db` closes.
    let p = pair(
        root_a.creds(&id("web"), LONG, &[&root_a, &root_b]),
        root_b.creds(&id("db"), LONG, &[&root_a, &root_b]),
        echo_server().await,
        Protocol::Tcp,
    )
    .await;
    let mut s = connect_tcp(&p).await;
    p.a_creds
        .send_replace(Some(root_a.creds(&id("web"), LONG, &[&root_a])));
    wait_closed(&mut s, Duration::from_secs(5)).await;
}

/// Inbound HTTP: the client proxy's pooled HTTP/2 connection to the server proxy is shut down
/// by the server side when a reload removes the client's root, so the next requests need a new
/// handshake, which the server refuses. Before, the old connection kept carrying requests from
/// a client the server no longer trusts.
#[tokio::test]
async fn inbound_http_connection_closes_when_a_reload_removes_the_clients_root() {
    let (root_a, root_b) = (Ca::new("root-a"), Ca::new("root-b"));
    let p = pair(
        root_a.creds(&id("web"), LONG, &[&root_a, &root_b]),
        root_b.creds(&id("db"), LONG, &[&root_a, &root_b]),
        upstream(Speaks::Both).await,
        Protocol::Http1,
    )
    .await;
    let out = p.a.running.outbound_addr;
    let (status, _, _) = h1_send(out, get("db.shop:8080", "/echo")).await.unwrap();
    assert_eq!(status, http::StatusCode::OK);
    p.b_creds
        .send_replace(Some(root_b.creds(&id("db"), LONG, &[&root_b])));
    let started = Instant::now();
    loop {
        let (status, _, _) = h1_send(out, get("db.shop:8080", "/echo")).await.unwrap();
        if status != http::StatusCode::OK {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "requests still reach a server that no longer trusts the client's root"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
