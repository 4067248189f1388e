//! Real parts for the proxy's integration tests: a test CA (rcgen) with SPIFFE leaves written as
//! PEM files, in-process proxies started on 127.0.0.1:0 with the file credential source,
//! kubelet-style config writes, and real HTTP/1.1, HTTP/2 and gRPC-like upstream servers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_proxy::config::{
    CONFIG_VERSION, Endpoint, InboundPolicy, MeshSettings, MtlsMode, OutboundService, Protocol,
    ProxyConfig, ServicePort, Telemetry,
};
use trellis_proxy::run::{Options, Running};

pub const TD: &str = "cluster.local";

pub fn id(sa: &str) -> String {
    trellis_proxy::config::spiffe_id(TD, "shop", sa)
}

/// A mesh CA and the leaves it signs, as PEM files in a temp dir.
pub struct Pki {
    issuer: Issuer<'static, KeyPair>,
    pub ca_pem: String,
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_pem = p.self_signed(&key).unwrap().pem();
        Pki {
            issuer: Issuer::new(p, key),
            ca_pem,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Writes a leaf for `spiffe_id` (ECDSA P-256, URI SAN) and returns (cert, key) paths.
    pub fn leaf(&self, spiffe_id: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let stem = spiffe_id.rsplit('/').next().unwrap();
        let n = std::fs::read_dir(self.dir.path()).unwrap().count();
        let cp = self.dir.path().join(format!("{stem}-{n}.crt"));
        let kp = self.dir.path().join(format!("{stem}-{n}.key"));
        std::fs::write(&cp, cert.pem()).unwrap();
        std::fs::write(&kp, key.serialize_pem()).unwrap();
        (cp, kp)
    }
}

/// Writes config and labels the way kubelet does: a new directory, then an atomic rename of
/// the `..data` symlink.
pub fn kubelet_write(dir: &Path, generation: u32, config: &str, labels: &str) {
    let ts = dir.join(format!("..gen_{generation}"));
    std::fs::create_dir(&ts).unwrap();
    std::fs::write(ts.join("config.json"), config).unwrap();
    std::fs::write(ts.join("labels"), labels).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(ts.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for f in ["config.json", "labels"] {
        let link = dir.join(f);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(f), &link).unwrap();
        }
    }
}

pub fn config(
    revision: &str,
    inbound: Vec<InboundPolicy>,
    outbound: Vec<OutboundService>,
) -> ProxyConfig {
    ProxyConfig {
        version: CONFIG_VERSION,
        revision: revision.into(),
        namespace: "shop".into(),
        mesh: MeshSettings {
            trust_domain: TD.into(),
            identity_endpoint: None,
            telemetry: Telemetry::default(),
            skip_detection_ports: vec![],
            detect_timeout_ms: 100,
        },
        inbound,
        outbound,
    }
}

pub fn inbound(mode: MtlsMode) -> Vec<InboundPolicy> {
    vec![InboundPolicy {
        source: "mesh-default".into(),
        selector: BTreeMap::new(),
        mtls: mode,
        port_mtls: BTreeMap::new(),
        rate_limit: None,
    }]
}

/// A Service `name.shop` on `port`, whose one endpoint is `endpoint` (the far proxy's inbound
/// listener in local mode), expecting `identities`.
pub fn service(
    name: &str,
    port: u16,
    protocol: Protocol,
    endpoint: SocketAddr,
    identities: Vec<String>,
) -> OutboundService {
    OutboundService {
        name: name.into(),
        namespace: "shop".into(),
        addresses: vec![],
        ports: vec![ServicePort {
            port,
            name: None,
            protocol,
            endpoints: vec![Endpoint {
                address: endpoint,
                identity: None,
                zone: None,
            }],
        }],
        identities,
        policy: None,
    }
}

/// Client sidecar "web" (revision `a1`, Strict inbound) whose one Service, `backend.shop:8080`
/// speaking `protocol`, has the far proxy's inbound listener `server` as its endpoint and
/// expects `expect` there. `pki` signs web's own certificate (another CA's, to test refusal).
pub async fn client_sidecar(
    pki: &Pki,
    protocol: Protocol,
    server: SocketAddr,
    expect: &str,
) -> TestProxy {
    let cfg = config(
        "a1",
        inbound(MtlsMode::Strict),
        vec![service(
            "backend",
            8080,
            protocol,
            server,
            vec![expect.to_string()],
        )],
    );
    TestProxy::start(pki, &id("web"), &cfg, None).await
}

/// A whole proxy, in-process, reading its files from its own temp dir.
pub struct TestProxy {
    pub running: Running,
    pub dir: tempfile::TempDir,
    pub generation: u32,
}

impl TestProxy {
    pub async fn start(
        pki: &Pki,
        spiffe_id: &str,
        cfg: &ProxyConfig,
        inbound_target: Option<SocketAddr>,
    ) -> Self {
        Self::start_with_opaque(pki, spiffe_id, cfg, inbound_target, Vec::new()).await
    }

    /// Like [`TestProxy::start`], with `--opaque-ports` (the pod annotation's route).
    pub async fn start_with_opaque(
        pki: &Pki,
        spiffe_id: &str,
        cfg: &ProxyConfig,
        inbound_target: Option<SocketAddr>,
        opaque_ports: Vec<u16>,
    ) -> Self {
        Self::start_with(pki, spiffe_id, cfg, inbound_target, |o| {
            o.opaque_ports = opaque_ports
        })
        .await
    }

    /// Like [`TestProxy::start`], with `tweak` applied to the proxy's [`Options`] (flags).
    pub async fn start_with(
        pki: &Pki,
        spiffe_id: &str,
        cfg: &ProxyConfig,
        inbound_target: Option<SocketAddr>,
        tweak: impl FnOnce(&mut Options),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
        let (cert, key) = pki.leaf(spiffe_id);
        let (tx, rx) = trellis_proxy::creds::channel();
        tokio::spawn(trellis_proxy::tls::watch_pem_files(
            cert,
            key,
            dir.path().join("ca.pem"),
            tx,
        ));
        Self::start_in(dir, rx, cfg, inbound_target, tweak).await
    }

    /// A proxy whose credentials the test publishes itself on `creds` (short-lived
    /// certificates, trust bundle changes).
    pub async fn start_with_creds(
        creds: trellis_proxy::creds::CredentialsRx,
        cfg: &ProxyConfig,
        inbound_target: Option<SocketAddr>,
    ) -> Self {
        Self::start_in(
            tempfile::tempdir().unwrap(),
            creds,
            cfg,
            inbound_target,
            |_| {},
        )
        .await
    }

    async fn start_in(
        dir: tempfile::TempDir,
        rx: trellis_proxy::creds::CredentialsRx,
        cfg: &ProxyConfig,
        inbound_target: Option<SocketAddr>,
        tweak: impl FnOnce(&mut Options),
    ) -> Self {
        kubelet_write(dir.path(), 1, &cfg.to_json_pretty(), "app=\"test\"\n");
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        // Local mode: the tests' clients connect to the outbound listener directly, as
        // `trellis dev` does; no iptables here.
        let mut opts = Options {
            dir: dir.path().to_path_buf(),
            outbound_addrs: vec![any],
            inbound_addrs: vec![any],
            admin_addrs: vec![any],
            local_mode: true,
            inbound_target,
            inbound_to_localhost: false,
            admin_limits: trellis_proxy::admin::Limits::default(),
            opaque_ports: Vec::new(),
            tcp_flush_interval: trellis_proxy::proxy::tcp::FLUSH_INTERVAL,
            inbound_limits: Default::default(),
            app_probes: Default::default(),
            pod_ip: None,
            pod: Default::default(),
            discovery: None,
        };
        tweak(&mut opts);
        let running = trellis_proxy::run::start(opts, rx).await.unwrap();
        let p = TestProxy {
            running,
            dir,
            generation: 1,
        };
        p.wait_ready().await;
        p
    }

    pub async fn wait_ready(&self) {
        for _ in 0..250 {
            if self.admin("GET", "/ready").await.0 == StatusCode::OK {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("proxy did not become ready");
    }

    /// Replaces config.json (kubelet-style swap).
    pub fn write_raw_config(&mut self, text: &str) {
        self.generation += 1;
        kubelet_write(self.dir.path(), self.generation, text, "app=\"test\"\n");
    }

    /// Replaces the config and waits until `/config` shows its revision.
    pub async fn apply(&mut self, cfg: &ProxyConfig) {
        self.write_raw_config(&cfg.to_json_pretty());
        for _ in 0..250 {
            if self.revision().await.as_deref() == Some(cfg.revision.as_str()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("config {} was not applied", cfg.revision);
    }

    pub async fn config_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin("GET", "/config").await.1).unwrap()
    }

    pub async fn revision(&self) -> Option<String> {
        self.config_json().await["revision"]
            .as_str()
            .map(str::to_owned)
    }

    pub async fn metrics(&self) -> String {
        self.admin("GET", "/metrics").await.1
    }

    pub async fn admin(&self, method: &str, path: &str) -> (StatusCode, String) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "admin")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = h1_send(self.running.admin_addr, req).await.unwrap();
        (resp.0, String::from_utf8_lossy(&resp.2).into_owned())
    }
}

/// The value of one sample line in OpenMetrics text (`name{labels} value`), matched by a
/// substring of the series.
pub fn metric_value(text: &str, series_contains: &[&str], name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && series_contains.iter().all(|s| l.contains(s)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

pub type Resp = (StatusCode, HeaderMap, Bytes);

/// One HTTP/1.1 request on a fresh connection.
pub async fn h1_send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Result<Resp, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sr, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sr.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, body))
}

pub fn get(authority: &str, path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(path)
        .header("host", authority)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// What the upstream saw, echoed back as JSON.
pub fn echo_json(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not an echo: {e}: {}", String::from_utf8_lossy(body)))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Speaks {
    Http1Only,
    Http2Only,
    Both,
}

/// A real upstream on 127.0.0.1:0.
/// - `/echo`: JSON of what it received (method, path, version, headers, body length);
/// - `/slow`: answers after 300 ms;
/// - `/drip?n=N&ms=M`: a streamed response of `N` chunks `chunk i\n`, one every `M` ms;
/// - `/grpc`: echoes each request body frame as a response frame, then trailers
///   `grpc-status: 0`, `grpc-message: ok` (gRPC framing is opaque to the proxy);
/// - `Upgrade` requests: `101`, then echoes bytes on the upgraded connection.
pub async fn upstream(speaks: Speaks) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(upstream_handle);
                let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                // More than a client may send, so a test sees where the sidecars' limits are.
                b.http1().max_headers(200);
                let b = match speaks {
                    Speaks::Http1Only => {
                        b = b.http1_only();
                        b
                    }
                    Speaks::Http2Only => b.http2_only(),
                    Speaks::Both => b,
                };
                let _ = b.serve_connection_with_upgrades(TokioIo::new(s), svc).await;
            });
        }
    });
    addr
}

type UBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn upstream_handle(mut req: Request<Incoming>) -> Result<Response<UBody>, Infallible> {
    if req.headers().contains_key("upgrade") {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let r = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "echo")
            .body(Full::new(Bytes::new()).boxed())
            .unwrap();
        return Ok(r);
    }
    match req.uri().path() {
        "/grpc" => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(8);
            let mut body = req.into_body();
            tokio::spawn(async move {
                while let Some(Ok(f)) = body.frame().await {
                    if let Ok(data) = f.into_data()
                        && tx.send(Ok(Frame::data(data))).await.is_err()
                    {
                        return;
                    }
                }
                let mut t = HeaderMap::new();
                t.insert("grpc-status", "0".parse().unwrap());
                t.insert("grpc-message", "ok".parse().unwrap());
                let _ = tx.send(Ok(Frame::trailers(t))).await;
            });
            let stream = tokio_stream_from(rx);
            let r = Response::builder()
                .header("content-type", "application/grpc")
                .body(StreamBody::new(stream).boxed())
                .unwrap();
            Ok(r)
        }
        "/drip" => {
            let q = req.uri().query().unwrap_or("");
            let param = |k: &str| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(1)
            };
            let (n, ms) = (param("n"), param("ms"));
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
            tokio::spawn(async move {
                for i in 0..n {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    let chunk = Bytes::from(format!("chunk {i}\n"));
                    if tx.send(Ok(Frame::data(chunk))).await.is_err() {
                        return;
                    }
                }
            });
            Ok(Response::new(
                StreamBody::new(tokio_stream_from(rx)).boxed(),
            ))
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(Response::new(
                Full::new(Bytes::from_static(b"slow")).boxed(),
            ))
        }
        _ => {
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let version = format!("{:?}", req.version());
            let headers: BTreeMap<String, String> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect();
            let authority = req.uri().authority().map(|a| a.to_string());
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let v = serde_json::json!({
                "method": method, "path": path, "version": version, "headers": headers,
                "authority": authority, "bodyLen": body.len(),
            });
            Ok(Response::new(Full::new(Bytes::from(v.to_string())).boxed()))
        }
    }
}

/// An mpsc receiver as a `Stream` (without pulling in tokio-stream).
pub fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Whether the peer closes `tcp` (EOF or a reset) within `within`; whatever it sends first is
/// read and discarded.
pub async fn closed_within<R: tokio::io::AsyncRead + Unpin>(tcp: &mut R, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// One HTTP/2 frame (RFC 9113 section 4.1): the 9-byte header, then the payload; for the
/// clients the tests write out by hand, where a library client would hide what was sent.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}
