//! The sidecar-to-sidecar HTTP/2 hop attacked by a hostile mesh peer: a workload that holds a
//! valid mesh certificate (a compromised pod is in the threat model) and speaks raw HTTP/2
//! frames to a real proxy's inbound listener over real mTLS (ALPN `h2`), and, the other way,
//! a hostile mesh server answering a real proxy's outbound requests.
//!
//! The hop's server is `h2` driven directly ([`trellis_proxy::proxy::h2server`]) and so is the
//! client ([`trellis_proxy::proxy::h2client`]): the protections hyper used to configure have to
//! be set there. Each test shows a bound holds as a peer would notice it: the connection is
//! closed (with `GOAWAY` where the protocol says so), the application is not flooded, what
//! the proxy buffers stays bounded, and other clients keep being served meanwhile.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trellis_proxy::config::{MtlsMode, Protocol};
use trellis_proxy::tls;

const SECS5: Duration = Duration::from_secs(5);
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Frame types and flags (RFC 9113 section 6).
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// An HPACK integer with an `n`-bit prefix, the prefix byte's other bits set to `flags`.
fn hpack_int(out: &mut Vec<u8>, n: u8, flags: u8, v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = v - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// An HPACK string literal (no Huffman).
fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 7, 0, s.len());
    out.extend_from_slice(s);
}

/// A header field literal with a literal name: `0x00` without indexing, `0x40` with
/// incremental indexing (it enters the dynamic table).
fn hpack_literal(out: &mut Vec<u8>, kind: u8, name: &[u8], value: &[u8]) {
    out.push(kind);
    hpack_str(out, name);
    hpack_str(out, value);
}

/// `GET http://app/` from the static table, asking the server sidecar for HTTP/1.1 to the
/// application (as a client sidecar does for an HTTP/1.1 caller).
fn get_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x84];
    // :authority (static index 1), literal value
    b.push(0x01);
    hpack_str(&mut b, b"app");
    hpack_literal(&mut b, 0x00, b"trellis-orig-proto", b"1");
    b
}

/// A frame as read: type, flags, stream, payload.
type Read = (u8, u8, u32, Vec<u8>);

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Read> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0; len];
    r.read_exact(&mut payload).await?;
    Ok((head[3], head[4], stream, payload))
}

/// Reads frames until the connection ends; returns the GOAWAY error code if one came.
async fn goaway_then_close<R: AsyncRead + Unpin>(r: &mut R) -> Option<u32> {
    let mut code = None;
    while let Ok((kind, _, _, payload)) = read_frame(r).await {
        if kind == GOAWAY {
            code = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
        }
    }
    code
}

/// The application: HTTP/1.1 and HTTP/2, counts its requests; `/big` streams [`BIG`] bytes
/// (made as they are asked for) and counts those it managed to hand to its socket.
struct App {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    big_sent: Arc<AtomicU64>,
}

const BIG: u64 = 1024 * 1024 * 1024;

async fn app() -> App {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let requests = Arc::new(AtomicU64::new(0));
    let big_sent = Arc::new(AtomicU64::new(0));
    let (r, b) = (requests.clone(), big_sent.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (r, b) = (r.clone(), b.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    r.fetch_add(1, Ordering::SeqCst);
                    let b = b.clone();
                    async move {
                        if req.uri().path() != "/big" {
                            let body = Full::new(Bytes::from_static(b"ok"))
                                .map_err(|e| match e {})
                                .boxed();
                            return Ok::<_, std::convert::Infallible>(Response::new(body));
                        }
                        let chunk = Bytes::from(vec![7u8; 64 * 1024]);
                        let frames = futures::stream::unfold(0u64, move |sent| {
                            let (chunk, b) = (chunk.clone(), b.clone());
                            async move {
                                if sent >= BIG {
                                    return None;
                                }
                                // Counted when the body is asked for the next chunk, i.e. once
                                // the previous one was written.
                                b.store(sent, Ordering::SeqCst);
                                let f: Result<Frame<Bytes>, std::convert::Infallible> =
                                    Ok(Frame::data(chunk.clone()));
                                Some((f, sent + chunk.len() as u64))
                            }
                        });
                        Ok(Response::new(BodyExt::boxed(StreamBody::new(frames))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    App {
        addr,
        requests,
        big_sent,
    }
}

/// A proxy whose inbound listener serves the app (Strict: mTLS only).
async fn server_proxy(pki: &Pki, app: SocketAddr) -> TestProxy {
    let cfg = config("r1", inbound(MtlsMode::Strict), vec![]);
    TestProxy::start(pki, &id("backend"), &cfg, Some(app)).await
}

/// Credentials of a workload of the mesh.
fn mesh_creds(pki: &Pki, sa: &str) -> trellis_proxy::creds::Credentials {
    let (cert, key) = pki.leaf(&id(sa));
    tls::credentials_from_pem(
        &std::fs::read(cert).unwrap(),
        &std::fs::read(key).unwrap(),
        pki.ca_pem.as_bytes(),
    )
    .unwrap()
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// A compromised mesh workload's mTLS connection to `addr` with ALPN `h2`, the HTTP/2
/// preface and an empty SETTINGS sent, and the server's SETTINGS acknowledged.
async fn hostile_peer(pki: &Pki, addr: SocketAddr) -> Tls {
    let creds = mesh_creds(pki, "mallory");
    let cfg = tls::client_config(&creds, &[], &[b"h2"]).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut s = TlsConnector::from(cfg)
        .connect(tls::mesh_server_name(), tcp)
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(SETTINGS, ACK, 0, &[]));
    s.write_all(&out).await.unwrap();
    s
}

/// A server proxy (Strict) in front of the counting [`App`]: what each attack aims at.
struct Target {
    pki: Pki,
    app: App,
    proxy: TestProxy,
}

impl Target {
    async fn new() -> Self {
        let pki = Pki::new("attack-ca");
        let app = app().await;
        let proxy = server_proxy(&pki, app.addr).await;
        Target { pki, app, proxy }
    }

    /// A compromised mesh workload's connection to the proxy (see [`hostile_peer`]).
    async fn hostile(&self) -> Tls {
        hostile_peer(&self.pki, self.proxy.running.inbound_addr).await
    }

    /// After the attack, a well-behaved client on a new connection is still served.
    async fn assert_serves(&self) {
        assert_eq!(
            honest_get(&self.pki, self.proxy.running.inbound_addr).await,
            Ok(StatusCode::OK)
        );
    }
}

/// One request from a well-behaved mesh client (the `h2` crate) on a new connection: what
/// the status is, or why there is none.
async fn honest_get(pki: &Pki, addr: SocketAddr) -> Result<StatusCode, String> {
    let creds = mesh_creds(pki, "honest");
    let cfg = tls::client_config(&creds, &[], &[b"h2"]).unwrap();
    let go = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let s = TlsConnector::from(cfg)
            .connect(tls::mesh_server_name(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sr, conn) = h2::client::handshake(s).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get("http://app/").body(()).unwrap();
        let (resp, _) = sr.send_request(req, true).map_err(|e| e.to_string())?;
        let resp = resp.await.map_err(|e| e.to_string())?;
        Ok(resp.status())
    };
    tokio::time::timeout(SECS5, go)
        .await
        .map_err(|_| "timed out".to_string())?
}

#[tokio::test]
async fn rapid_reset_closes_the_connection_and_spares_the_application() {
    // CVE-2023-44487: HEADERS then RST_STREAM, over and over. Each stream costs the server a
    // request (to the application) unless it is cut off before it is accepted.
    let t = Target::new().await;
    let s = t.hostile().await;
    let (mut rd, mut wr) = tokio::io::split(s);
    const PAIRS: u32 = 20_000;
    let writer = tokio::spawn(async move {
        let block = get_block();
        for batch in 0..PAIRS / 100 {
            let mut out = Vec::new();
            for i in 0..100 {
                let stream = 2 * (batch * 100 + i) + 1;
                out.extend(frame(HEADERS, END_STREAM | END_HEADERS, stream, &block));
                out.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes())); // CANCEL
            }
            if wr.write_all(&out).await.is_err() {
                return batch * 100;
            }
        }
        PAIRS
    });
    let code = tokio::time::timeout(SECS5, goaway_then_close(&mut rd))
        .await
        .expect("the connection stayed open under a rapid-reset flood");
    assert_eq!(
        code,
        Some(ENHANCE_YOUR_CALM),
        "closed without GOAWAY(ENHANCE_YOUR_CALM)"
    );
    let sent = writer.await.unwrap();
    let seen = t.app.requests.load(Ordering::SeqCst);
    assert!(
        seen <= 50,
        "the application got {seen} requests from a reset flood ({sent} pairs written)"
    );
    t.assert_serves().await;
}

#[tokio::test]
async fn a_peer_that_makes_the_server_reset_streams_loses_the_connection() {
    // The "MadeYouReset" family (CVE-2025-8671): streams opened, then made invalid, so that
    // the server resets them itself and no RST_STREAM from the peer is counted. Here DATA
    // after END_STREAM, thousands of times: h2 treats the first as a connection error, so the
    // loop never gets going (its own bound on such resets, 1024, is not reached).
    let t = Target::new().await;
    let s = t.hostile().await;
    let (mut rd, mut wr) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        let block = get_block();
        for batch in 0..50u32 {
            let mut out = Vec::new();
            for i in 0..100 {
                let stream = 2 * (batch * 100 + i) + 1;
                out.extend(frame(HEADERS, END_STREAM | END_HEADERS, stream, &block));
                out.extend(frame(DATA, END_STREAM, stream, b"x"));
            }
            if wr.write_all(&out).await.is_err() {
                return;
            }
        }
    });
    let code = tokio::time::timeout(SECS5, goaway_then_close(&mut rd))
        .await
        .expect("the connection stayed open while the peer made the server reset streams");
    assert_eq!(code, Some(0x1), "PROTOCOL_ERROR expected");
    writer.abort();
    let seen = t.app.requests.load(Ordering::SeqCst);
    assert!(seen <= 1, "the application got {seen} requests");
    t.assert_serves().await;
}

#[tokio::test]
async fn a_continuation_flood_is_cut_off() {
    // A header block that never ends: HEADERS without END_HEADERS, then CONTINUATION frames
    // without it, forever (the 2024 CONTINUATION flood).
    let t = Target::new().await;
    let s = t.hostile().await;
    let (mut rd, mut wr) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        wr.write_all(&frame(HEADERS, END_STREAM, 1, &[0x82]))
            .await
            .unwrap();
        let one = frame(CONTINUATION, 0, 1, &[0x82; 1024]);
        let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 64).collect();
        let mut frames = 0u64;
        // 64 MiB of header block if nothing stops it.
        while frames < 64 * 1024 {
            if wr.write_all(&batch).await.is_err() {
                break;
            }
            frames += 64;
        }
        frames
    });
    let code = tokio::time::timeout(SECS5, goaway_then_close(&mut rd))
        .await
        .expect("the connection stayed open under a CONTINUATION flood");
    assert!(code.is_some(), "closed without GOAWAY");
    let frames = tokio::time::timeout(SECS5, writer)
        .await
        .expect("the flood's writes were never refused")
        .unwrap();
    assert!(
        frames < 64 * 1024,
        "all {frames} CONTINUATION frames were taken"
    );
    assert_eq!(t.app.requests.load(Ordering::SeqCst), 0);
    t.assert_serves().await;
}

/// Reads until every stream in `streams` has its answer (`true`: a `200` head; `false`: any
/// other head, h2 answers an oversized list with `431`, or a reset), or the connection ends.
async fn answers<R: AsyncRead + Unpin>(
    r: &mut R,
    streams: usize,
) -> std::collections::BTreeMap<u32, bool> {
    let mut answered = std::collections::BTreeMap::new();
    let _ = tokio::time::timeout(SECS5, async {
        while answered.len() < streams {
            let Ok((kind, flags, stream, payload)) = read_frame(r).await else {
                return;
            };
            match kind {
                // 0x88: `:status 200` from the static table.
                HEADERS if flags & END_HEADERS != 0 => {
                    answered.entry(stream).or_insert(payload[0] == 0x88);
                }
                RST_STREAM => {
                    answered.entry(stream).or_insert(false);
                }
                GOAWAY => return,
                _ => {}
            }
        }
    })
    .await;
    answered
}

#[tokio::test]
async fn a_header_list_over_the_limit_is_refused_and_the_connection_serves_on() {
    let t = Target::new().await;
    let mut s = t.hostile().await;
    // Stream 1: an 80 KiB header, over the hop's limit (`h2server::MAX_HEADER_LIST_SIZE`),
    // in HEADERS + CONTINUATIONs of at most the default 16 KiB frame size; stream 3: an
    // honest request on the same connection.
    const { assert!(80 * 1024 > trellis_proxy::proxy::h2server::MAX_HEADER_LIST_SIZE) };
    let mut big = get_block();
    hpack_literal(&mut big, 0x00, b"x-big", &[b'b'; 80 * 1024]);
    let chunks: Vec<&[u8]> = big.chunks(16 * 1024 - 1).collect();
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        let first = if i == 0 { END_STREAM } else { 0 };
        let last = if i + 1 == chunks.len() {
            END_HEADERS
        } else {
            0
        };
        out.extend(frame(kind, first | last, 1, chunk));
    }
    out.extend(frame(HEADERS, END_STREAM | END_HEADERS, 3, &get_block()));
    s.write_all(&out).await.unwrap();
    let answered = answers(&mut s, 2).await;
    assert_eq!(
        answered.get(&1),
        Some(&false),
        "80 KiB of headers: {answered:?}"
    );
    assert_eq!(
        answered.get(&3),
        Some(&true),
        "the connection stopped: {answered:?}"
    );
    assert_eq!(t.app.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_hpack_bomb_closes_the_connection_before_it_reaches_the_application() {
    let t = Target::new().await;
    let s = t.hostile().await;
    let (mut rd, mut wr) = tokio::io::split(s);
    // Stream 1 puts a 4000-byte header into the server's HPACK dynamic table (index 62);
    // then stream after stream is 4000 one-byte references to it (16 MB decoded each).
    let mut first = get_block();
    hpack_literal(&mut first, 0x40, b"x-bomb", &[b'b'; 4000]);
    let mut bomb = get_block();
    bomb.extend(std::iter::repeat_n(0x80 | 62, 4000));
    let writer = tokio::spawn(async move {
        let mut out = frame(HEADERS, END_STREAM | END_HEADERS, 1, &first);
        for i in 1..1000u32 {
            out.extend(frame(HEADERS, END_STREAM | END_HEADERS, 2 * i + 1, &bomb));
        }
        let _ = wr.write_all(&out).await;
    });
    let code = tokio::time::timeout(SECS5, goaway_then_close(&mut rd))
        .await
        .expect("the connection stayed open under HPACK bombs");
    assert_eq!(code, Some(ENHANCE_YOUR_CALM));
    writer.abort();
    assert!(t.app.requests.load(Ordering::SeqCst) <= 1);
    t.assert_serves().await;
}

#[tokio::test]
async fn a_peer_that_never_reads_holds_a_bounded_amount_of_the_response() {
    // A peer that opens the windows as wide as HTTP/2 allows, asks for 1 GiB and then never
    // reads its socket: what the proxy takes from the application is bounded by flow control
    // and its send buffer, not by the response's size.
    let t = Target::new().await;
    let mut s = t.hostile().await;
    let mut settings = Vec::new();
    settings.extend(4u16.to_be_bytes()); // INITIAL_WINDOW_SIZE
    settings.extend(0x7fff_ffffu32.to_be_bytes());
    let mut out = frame(SETTINGS, 0, 0, &settings);
    out.extend(frame(
        WINDOW_UPDATE,
        0,
        0,
        &(0x7fff_ffffu32 - 65_535).to_be_bytes(),
    ));
    let mut block = vec![0x82, 0x86, 0x04];
    hpack_str(&mut block, b"/big");
    block.push(0x01);
    hpack_str(&mut block, b"app");
    hpack_literal(&mut block, 0x00, b"trellis-orig-proto", b"1");
    out.extend(frame(HEADERS, END_STREAM | END_HEADERS, 1, &block));
    s.write_all(&out).await.unwrap();
    // Let everything that can move move.
    let mut last = u64::MAX;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = t.app.big_sent.load(Ordering::SeqCst);
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    let taken = t.app.big_sent.load(Ordering::SeqCst);
    assert!(taken > 0, "the response never started");
    // Most of what left the application sits in the kernel: loopback socket buffers autotune
    // to tens of MiB (18 MiB taken in all when measured); the proxy itself holds at most a
    // stream's send buffer and a read buffer. A proxy that buffered without bound would take
    // the whole GiB.
    assert!(
        taken < 64 * 1024 * 1024,
        "the proxy took {} MiB of the response for a peer that reads nothing",
        taken >> 20
    );
    t.assert_serves().await;
    drop(s);
}

#[tokio::test]
async fn ping_and_settings_floods_from_a_peer_that_never_reads_stall_the_peer() {
    // Every PING and SETTINGS needs an acknowledgement. A peer that sends them without
    // reading must not make the proxy queue acknowledgements without bound: once they back
    // up, the proxy stops reading, and the flood stalls in the peer's own socket.
    let pki = Pki::new("attack-ca");
    let app = app().await;
    let b = server_proxy(&pki, app.addr).await;
    for kind in [PING, SETTINGS] {
        let s = hostile_peer(&pki, b.running.inbound_addr).await;
        let (_rd, mut wr) = tokio::io::split(s);
        let one = if kind == PING {
            frame(PING, 0, 0, &[1; 8])
        } else {
            // ENABLE_PUSH = 0, a valid setting to acknowledge.
            frame(SETTINGS, 0, 0, &[0, 2, 0, 0, 0, 0])
        };
        let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 4096).collect();
        // 256 MiB of frames if nothing pushes back.
        let total = 256 * 1024 * 1024 / batch.len();
        let written = Arc::new(AtomicU64::new(0));
        let w = written.clone();
        let writer = tokio::spawn(async move {
            for _ in 0..total {
                if wr.write_all(&batch).await.is_err() {
                    return;
                }
                w.fetch_add(1, Ordering::SeqCst);
            }
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        let n = written.load(Ordering::SeqCst) as usize;
        assert!(
            n < total && !writer.is_finished(),
            "frame kind {kind}: the whole flood was taken ({n} batches)"
        );
        // The proxy still serves others while the flood is stuck.
        assert_eq!(
            honest_get(&pki, b.running.inbound_addr).await,
            Ok(StatusCode::OK),
            "frame kind {kind}"
        );
        writer.abort();
    }
}

#[tokio::test]
async fn a_window_update_past_the_maximum_closes_the_connection() {
    let t = Target::new().await;
    let mut s = t.hostile().await;
    // Two increments summing past 2^31-1 on the connection window.
    let mut out = frame(WINDOW_UPDATE, 0, 0, &0x7fff_ffffu32.to_be_bytes());
    out.extend(frame(WINDOW_UPDATE, 0, 0, &0x7fff_ffffu32.to_be_bytes()));
    s.write_all(&out).await.unwrap();
    let code = tokio::time::timeout(SECS5, goaway_then_close(&mut s))
        .await
        .expect("the connection stayed open after a window overflow");
    assert_eq!(code, Some(0x3), "FLOW_CONTROL_ERROR expected");
    t.assert_serves().await;
}

/// A hostile mesh server: mTLS with a mesh certificate, ALPN `h2`, raw frames. Every request
/// (whatever it asks) gets `200` with one `x-big` header of `header_len` bytes, and `ok`.
async fn hostile_server(pki: &Pki, header_len: usize) -> SocketAddr {
    let creds = mesh_creds(pki, "evil");
    let cfg = tls::server_config(&creds, &[b"h2"]).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = TlsAcceptor::from(cfg.clone());
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut preface = [0u8; 24];
                if s.read_exact(&mut preface).await.is_err() {
                    return;
                }
                let _ = s.write_all(&frame(SETTINGS, 0, 0, &[])).await;
                while let Ok((kind, flags, stream, _)) = read_frame(&mut s).await {
                    let out = match kind {
                        SETTINGS if flags & ACK == 0 => frame(SETTINGS, ACK, 0, &[]),
                        HEADERS if flags & END_HEADERS != 0 => response(stream, header_len),
                        _ => continue,
                    };
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// `200`, `x-big: bbb...` (`len` bytes) in HEADERS + CONTINUATION frames of 16 KiB, then
/// DATA `ok`.
fn response(stream: u32, len: usize) -> Vec<u8> {
    let mut block = vec![0x88];
    hpack_literal(&mut block, 0x00, b"x-big", &vec![b'b'; len]);
    let mut chunks = block.chunks(16 * 1024).peekable();
    let mut out = Vec::new();
    let mut first = true;
    while let Some(c) = chunks.next() {
        let last = chunks.peek().is_none();
        let flags = if last { END_HEADERS } else { 0 };
        let kind = if first { HEADERS } else { CONTINUATION };
        out.extend(frame(kind, flags, stream, c));
        first = false;
    }
    out.extend(frame(DATA, END_STREAM, stream, b"ok"));
    out
}

#[tokio::test]
async fn a_hostile_mesh_server_cannot_make_the_client_proxy_take_huge_response_headers() {
    // The client side of the hop: a mesh server answering with 1 MiB of response headers
    // would have the client sidecar buffer them (per stream) and hand them to the application.
    let pki = Pki::new("attack-ca");
    let big = hostile_server(&pki, 1024 * 1024).await;
    let fine = hostile_server(&pki, 4 * 1024).await;
    let cfg = config(
        "r1",
        inbound(MtlsMode::Strict),
        vec![
            service("big", 80, Protocol::Http2, big, vec![id("evil")]),
            service("fine", 80, Protocol::Http2, fine, vec![id("evil")]),
        ],
    );
    let a = TestProxy::start(&pki, &id("client"), &cfg, None).await;
    let (status, headers, body) = h1_send(a.running.outbound_addr, get("fine.shop", "/"))
        .await
        .unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "ordinary response headers must pass"
    );
    assert_eq!(headers["x-big"].len(), 4 * 1024);
    assert_eq!(body, "ok");
    let r = tokio::time::timeout(
        SECS5,
        h1_send(a.running.outbound_addr, get("big.shop", "/")),
    )
    .await
    .expect("no answer");
    match r {
        Ok((status, headers, _)) => {
            assert!(
                status.is_server_error() && !headers.contains_key("x-big"),
                "1 MiB of response headers from a mesh peer were accepted ({status})"
            );
        }
        // The test's own HTTP/1.1 client refuses a head this large: the proxy passed it on.
        Err(e) => panic!("the huge response head reached the application ({e})"),
    }
}
