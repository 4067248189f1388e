//! Kubelet probes performed by the proxy: `GET /app-health/<container>/<livez|readyz|startupz>`
//! on the admin port.
//!
//! Why this exists: the kubelet probes from the node in plaintext, without a workload
//! certificate, so under `Strict` mTLS the inbound proxy refuses probes sent to the app's own
//! ports. Excluding probed ports from redirection would take them out of the mesh (almost every
//! HTTP workload probes its serving port). Instead the injector rewrites the app's `httpGet`,
//! `tcpSocket` and `grpc` probes to this route and passes the original probes to the proxy in
//! [`ENV_APP_PROBES`]; the proxy performs them against the app and answers with the result. The
//! kubelet-probe path is then the only plaintext that reaches the application.
//!
//! Not an open proxy: the route only runs the probes of the [`ProbeSet`], looked up by exact
//! path. The caller chooses nothing of the target, port, path or headers, and the answer
//! carries the verdict (a status code and one line of text), never the app's response body.
//! At most [`MAX_CONCURRENT_PROBES`] probes run at once, so a flood of probe requests cannot
//! become a flood against the app.
//!
//! Where a probe goes: the pod IP (`TRELLIS_POD_IP`, from the downward API), where the kubelet
//! itself would have probed, else 127.0.0.1. The probe's connection is bound to the source
//! address [`PROBE_SOURCE_V4`] (`::1` for IPv6), which the pod's iptables rules exempt from the
//! "proxy UID to the pod IP goes to the inbound port" redirect (see `init::rules`): without the
//! exemption the probe would loop into the proxy's own inbound listener and be refused as
//! plaintext.
//!
//! Semantics follow the kubelet's: an HTTP status in 200..=399 is success (redirects are not
//! followed, so a 3xx counts as success; the kubelet follows same-host redirects), HTTPS is not
//! verified, TCP succeeds when the connection opens, gRPC calls `grpc.health.v1.Health/Check`
//! and succeeds on `SERVING`. Each probe is bounded by its `timeoutSeconds`, minus a small margin
//! so the kubelet receives a definite failure before its own timer fires.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{ACCEPT, CONNECTION, CONTENT_TYPE, HOST, HeaderName, HeaderValue, USER_AGENT};
use http::uri::PathAndQuery;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

/// The env var (and `--app-probes` flag) carrying the pod's probes as JSON, keyed by path.
pub const ENV_APP_PROBES: &str = "TRELLIS_APP_PROBES";
/// Every rewritten probe's path starts with this.
pub const PATH_PREFIX: &str = "/app-health/";
/// Source address of the probe's connections to the app (IPv4). The init rules let this source
/// through to the pod IP unredirected; 127.0.0.6 as in Istio, so the app can tell probe
/// traffic from its own loopback traffic.
pub const PROBE_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// Source address of the probe's connections to the app (IPv6; Linux has one loopback address).
pub const PROBE_SOURCE_V6: Ipv6Addr = Ipv6Addr::LOCALHOST;
/// Probes running at once; more wait (within their own deadline). A pod has at most a few
/// probes per container, each run every few seconds, so this only bites on a flood.
pub const MAX_CONCURRENT_PROBES: usize = 16;
/// The gRPC health answer is a few bytes; anything larger is not a health answer.
const MAX_GRPC_BODY: usize = 64 * 1024;

/// Which of a container's probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

impl ProbeKind {
    pub const ALL: [ProbeKind; 3] = [
        ProbeKind::Liveness,
        ProbeKind::Readiness,
        ProbeKind::Startup,
    ];

    /// The last path segment: `livez`, `readyz`, `startupz`.
    pub fn segment(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "livez",
            ProbeKind::Readiness => "readyz",
            ProbeKind::Startup => "startupz",
        }
    }

    fn from_segment(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.segment() == s)
    }
}

/// `/app-health/<container>/<livez|readyz|startupz>`: the rewritten probe's path.
pub fn probe_path(container: &str, kind: ProbeKind) -> String {
    format!("{PATH_PREFIX}{container}/{}", kind.segment())
}

/// One probe as the injector writes it (the wire format of [`ENV_APP_PROBES`]): the Kubernetes
/// probe's action with named ports resolved, and its timeout. Exactly one action is set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppProbe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcProbe>,
    /// The probe's `timeoutSeconds` (the kubelet's default is 1).
    #[serde(default = "one")]
    pub timeout_seconds: u32,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGetProbe {
    /// Path and query, as in the probe (`/` when the probe has none).
    #[serde(default = "root")]
    pub path: String,
    pub port: u16,
    #[serde(default)]
    pub scheme: Scheme,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<ProbeHeader>,
}

fn root() -> String {
    "/".into()
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scheme {
    #[default]
    #[serde(rename = "HTTP")]
    Http,
    #[serde(rename = "HTTPS")]
    Https,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeHeader {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpProbe {
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcProbe {
    pub port: u16,
    /// The service name sent in the health check (empty: the server's overall health).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// A validated probe, ready to run.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Probe {
    action: Action,
    timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    Http {
        scheme: Scheme,
        port: u16,
        path: PathAndQuery,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    Tcp {
        port: u16,
    },
    Grpc {
        port: u16,
        service: String,
    },
}

/// Why [`ENV_APP_PROBES`] was refused: every problem found, not just the first.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {ENV_APP_PROBES}: {}", .0.join("; "))]
pub struct ProbeSetError(pub Vec<String>);

/// The pod's probes by path: what `/app-health/...` may run, and nothing else.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeSet {
    probes: HashMap<String, Probe>,
}

impl ProbeSet {
    pub fn is_empty(&self) -> bool {
        self.probes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.probes.len()
    }

    /// Validates the injector's probes; on any problem nothing is accepted.
    pub fn from_wire(
        wire: &std::collections::BTreeMap<String, AppProbe>,
    ) -> Result<Self, ProbeSetError> {
        let mut problems = Vec::new();
        let mut probes = HashMap::with_capacity(wire.len());
        for (path, p) in wire {
            match validate(path, p) {
                Ok(probe) => {
                    probes.insert(path.clone(), probe);
                }
                Err(why) => problems.push(format!("{path}: {why}")),
            }
        }
        if problems.is_empty() {
            Ok(Self { probes })
        } else {
            Err(ProbeSetError(problems))
        }
    }
}

impl FromStr for ProbeSet {
    type Err = ProbeSetError;

    /// Parses the JSON of [`ENV_APP_PROBES`]; an empty string is an empty set.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Ok(Self::default());
        }
        let wire: std::collections::BTreeMap<String, AppProbe> =
            serde_json::from_str(s).map_err(|e| ProbeSetError(vec![e.to_string()]))?;
        Self::from_wire(&wire)
    }
}

fn validate(path: &str, p: &AppProbe) -> Result<Probe, String> {
    let rest = path
        .strip_prefix(PATH_PREFIX)
        .ok_or_else(|| format!("path must start with {PATH_PREFIX}"))?;
    let (container, kind) = rest
        .split_once('/')
        .ok_or("path must be /app-health/<container>/<livez|readyz|startupz>")?;
    let container_ok = !container.is_empty()
        && container
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !container_ok {
        return Err(format!("{container:?} is not a container name"));
    }
    if ProbeKind::from_segment(kind).is_none() {
        return Err(format!("{kind:?} is not livez, readyz or startupz"));
    }
    if p.timeout_seconds == 0 {
        return Err("timeoutSeconds must be at least 1".into());
    }
    let port_ok = |port: u16| {
        if port == 0 {
            Err("port 0".to_string())
        } else {
            Ok(port)
        }
    };
    let action = match (&p.http_get, &p.tcp_socket, &p.grpc) {
        (Some(h), None, None) => {
            if !h.path.starts_with('/') {
                return Err(format!("httpGet path {:?} must start with /", h.path));
            }
            let path = PathAndQuery::from_str(&h.path)
                .map_err(|e| format!("httpGet path {:?}: {e}", h.path))?;
            let mut headers = Vec::with_capacity(h.http_headers.len());
            for hd in &h.http_headers {
                let name = HeaderName::from_bytes(hd.name.as_bytes())
                    .map_err(|_| format!("{:?} is not a header name", hd.name))?;
                let value = HeaderValue::from_str(&hd.value)
                    .map_err(|_| format!("header {}: value is not valid", hd.name))?;
                headers.push((name, value));
            }
            Action::Http {
                scheme: h.scheme,
                port: port_ok(h.port)?,
                path,
                headers,
            }
        }
        (None, Some(t), None) => Action::Tcp {
            port: port_ok(t.port)?,
        },
        (None, None, Some(g)) => Action::Grpc {
            port: port_ok(g.port)?,
            service: g.service.clone().unwrap_or_default(),
        },
        _ => return Err("exactly one of httpGet, tcpSocket, grpc must be set".into()),
    };
    Ok(Probe {
        action,
        timeout: Duration::from_secs(u64::from(p.timeout_seconds)),
    })
}

/// How long the proxy gives the app: the probe's timeout less a fifth (at most 250 ms), so the
/// failure reaches the kubelet before the kubelet's own timer for the same probe fires, even on a
/// busy node (the kubelet's timer also covers its connection to the admin port).
pub fn app_deadline(timeout: Duration) -> Duration {
    timeout.saturating_sub((timeout / 5).min(Duration::from_millis(250)))
}

/// The verdict of one probe run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub success: bool,
    /// The app's HTTP status, for HTTP probes that got an answer.
    pub app_status: Option<u16>,
    /// One line for the kubelet's event ("app answered 500", "connect: refused", ...).
    pub detail: String,
}

impl Outcome {
    fn ok(app_status: Option<u16>, detail: impl Into<String>) -> Self {
        Self {
            success: true,
            app_status,
            detail: detail.into(),
        }
    }

    fn failed(app_status: Option<u16>, detail: impl Into<String>) -> Self {
        Self {
            success: false,
            app_status,
            detail: detail.into(),
        }
    }

    /// The status the kubelet sees: 200 on success; on failure the app's own 4xx/5xx status
    /// when it answered one (so `kubectl describe` shows it), else 503.
    pub fn status(&self) -> StatusCode {
        if self.success {
            return StatusCode::OK;
        }
        self.app_status
            .filter(|s| (400..=599).contains(s))
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
    }
}

/// Runs the pod's probes against the app.
pub struct Prober {
    probes: ProbeSet,
    target: IpAddr,
    tls: Arc<ClientConfig>,
    permits: Semaphore,
}

impl Prober {
    /// `target` is the pod IP (or 127.0.0.1 when it is not known).
    pub fn new(probes: ProbeSet, target: IpAddr) -> Self {
        Self {
            probes,
            target,
            tls: insecure_client_config(),
            permits: Semaphore::new(MAX_CONCURRENT_PROBES),
        }
    }

    /// Runs the probe registered at `path`; `None` when there is none (the caller answers 404).
    /// `user_agent` is the kubelet's (`kube-probe/1.x`), passed on as the kubelet would send it.
    pub async fn run(&self, path: &str, user_agent: Option<&HeaderValue>) -> Option<Outcome> {
        let probe = self.probes.probes.get(path)?;
        let deadline = app_deadline(probe.timeout);
        let run = async {
            let _permit = self.permits.acquire().await;
            self.perform(&probe.action, user_agent).await
        };
        Some(match tokio::time::timeout(deadline, run).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::failed(
                None,
                format!("no answer within {} ms", deadline.as_millis()),
            ),
        })
    }

    async fn perform(&self, action: &Action, user_agent: Option<&HeaderValue>) -> Outcome {
        match action {
            Action::Tcp { port } => match connect(SocketAddr::new(self.target, *port)).await {
                Ok(_) => Outcome::ok(None, format!("tcp {port}: connected")),
                Err(e) => Outcome::failed(None, format!("tcp {port}: {e}")),
            },
            Action::Http {
                scheme,
                port,
                path,
                headers,
            } => {
                let req = http_request(self.target, *port, path, headers, user_agent);
                let addr = SocketAddr::new(self.target, *port);
                let status = match scheme {
                    Scheme::Http => match connect(addr).await {
                        Ok(tcp) => http1_status(TokioIo::new(tcp), req).await,
                        Err(e) => Err(format!("connect: {e}")),
                    },
                    Scheme::Https => match self.tls_connect(addr).await {
                        Ok(tls) => http1_status(TokioIo::new(tls), req).await,
                        Err(e) => Err(e),
                    },
                };
                match status {
                    Ok(s) if (200..400).contains(&s.as_u16()) => {
                        Outcome::ok(Some(s.as_u16()), format!("app answered {}", s.as_u16()))
                    }
                    Ok(s) => {
                        Outcome::failed(Some(s.as_u16()), format!("app answered {}", s.as_u16()))
                    }
                    Err(e) => Outcome::failed(None, e),
                }
            }
            Action::Grpc { port, service } => {
                match grpc_check(SocketAddr::new(self.target, *port), service).await {
                    Ok(1) => Outcome::ok(None, "grpc: SERVING"),
                    Ok(s) => Outcome::failed(None, format!("grpc: {}", serving_status_name(s))),
                    Err(e) => Outcome::failed(None, format!("grpc: {e}")),
                }
            }
        }
    }

    async fn tls_connect(
        &self,
        addr: SocketAddr,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let tcp = connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .map_err(|e| format!("tls: {e}"))
    }
}

/// Connects from the probe source address (see the module docs), never through the proxy.
async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let (socket, source) = match addr {
        SocketAddr::V4(_) => (TcpSocket::new_v4()?, IpAddr::V4(PROBE_SOURCE_V4)),
        SocketAddr::V6(_) => (TcpSocket::new_v6()?, IpAddr::V6(PROBE_SOURCE_V6)),
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// The request the kubelet would send: the probe's headers, then its defaults for the ones the
/// probe does not set (`Host` is the target address, `Accept: */*`, the kubelet's user agent).
fn http_request(
    target: IpAddr,
    port: u16,
    path: &PathAndQuery,
    headers: &[(HeaderName, HeaderValue)],
    user_agent: Option<&HeaderValue>,
) -> Request<Empty<Bytes>> {
    let mut req = Request::new(Empty::new());
    *req.uri_mut() = http::Uri::from(path.clone());
    let h = req.headers_mut();
    for (name, value) in headers {
        h.append(name.clone(), value.clone());
    }
    if !h.contains_key(HOST) {
        let authority = SocketAddr::new(target, port).to_string();
        if let Ok(v) = HeaderValue::from_str(&authority) {
            h.insert(HOST, v);
        }
    }
    if !h.contains_key(USER_AGENT) {
        h.insert(
            USER_AGENT,
            user_agent
                .cloned()
                .unwrap_or_else(|| HeaderValue::from_static("kube-probe/trellis")),
        );
    }
    if !h.contains_key(ACCEPT) {
        h.insert(ACCEPT, HeaderValue::from_static("*/*"));
    }
    h.insert(CONNECTION, HeaderValue::from_static("close"));
    req
}

/// Aborts a spawned connection task when the probe ends, however it ends (timeout included).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One HTTP/1.1 request; only the status is read, the body is dropped with the connection.
async fn http1_status<T>(io: T, req: Request<Empty<Bytes>>) -> Result<StatusCode, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("http: {e}"))?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("http: {e}"))?;
    Ok(resp.status())
}

/// `grpc.health.v1.Health/Check` over h2c; returns the `ServingStatus` number.
async fn grpc_check(addr: SocketAddr, service: &str) -> Result<u64, String> {
    let tcp = connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let req = Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header(CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .header(USER_AGENT, "kube-probe/trellis")
        .body(Full::new(grpc_frame(&health_request(service))))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status() != StatusCode::OK {
        return Err(format!("HTTP status {}", resp.status().as_u16()));
    }
    let (parts, body) = resp.into_parts();
    let collected = Limited::new(body, MAX_GRPC_BODY)
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    // Trailers-only responses carry grpc-status in the headers.
    let grpc_status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| parts.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    match grpc_status.as_deref() {
        Some("0") => {}
        Some(code) => return Err(format!("grpc-status {code}")),
        None => return Err("no grpc-status".into()),
    }
    let body = collected.to_bytes();
    let message = grpc_unframe(&body).ok_or("malformed response frame")?;
    health_response_status(message).ok_or_else(|| "malformed HealthCheckResponse".into())
}

/// `HealthCheckRequest { string service = 1; }`, encoded by hand: one field is not worth a
/// protobuf code generator.
fn health_request(service: &str) -> Bytes {
    let mut b = BytesMut::new();
    if !service.is_empty() {
        b.put_u8(0x0a); // field 1, length-delimited
        put_varint(&mut b, service.len() as u64);
        b.put_slice(service.as_bytes());
    }
    b.freeze()
}

/// A gRPC length-prefixed message: uncompressed flag, big-endian length, message.
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.put_u8(0);
    b.put_u32(message.len() as u32);
    b.put_slice(message);
    b.freeze()
}

fn grpc_unframe(body: &[u8]) -> Option<&[u8]> {
    let (&flag, rest) = body.split_first()?;
    if flag != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes(rest[..4].try_into().ok()?) as usize;
    rest.get(4..4 + len)
}

fn put_varint(b: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        b.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    b.put_u8(v as u8);
}

fn get_varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        if !b.has_remaining() {
            return None;
        }
        let byte = b.get_u8();
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// `HealthCheckResponse { ServingStatus status = 1; }`: field 1, skipping unknown fields.
/// A message without the field means `UNKNOWN` (0), as proto3 defaults do.
fn health_response_status(mut m: &[u8]) -> Option<u64> {
    let mut status = 0;
    while m.has_remaining() {
        let key = get_varint(&mut m)?;
        match key & 7 {
            0 => {
                let v = get_varint(&mut m)?;
                if key >> 3 == 1 {
                    status = v;
                }
            }
            1 => m = m.get(8..)?,
            2 => {
                let len = usize::try_from(get_varint(&mut m)?).ok()?;
                m = m.get(len..)?;
            }
            5 => m = m.get(4..)?,
            _ => return None,
        }
    }
    Some(status)
}

fn serving_status_name(s: u64) -> String {
    match s {
        0 => "UNKNOWN".into(),
        1 => "SERVING".into(),
        2 => "NOT_SERVING".into(),
        3 => "SERVICE_UNKNOWN".into(),
        n => format!("status {n}"),
    }
}

/// HTTPS probes are not verified, as the kubelet's are not: the app's serving certificate is
/// usually not issued for its pod IP. Handshake signatures are still checked.
fn insecure_client_config() -> Arc<ClientConfig> {
    let provider = crate::tls::provider();
    let verifier = Arc::new(AnyServerCert {
        algs: provider.signature_verification_algorithms,
    });
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        });
    // The ring provider supports the default versions; building cannot fail with it.
    Arc::new(cfg.unwrap_or_else(|e| unreachable!("ring supports TLS 1.2 and 1.3: {e}")))
}

#[derive(Debug)]
struct AnyServerCert {
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_injector_format_and_reports_every_problem() {
        let ok = r#"{
            "/app-health/web/readyz": {"httpGet": {"path": "/healthz?full=1", "port": 8080,
                "scheme": "HTTPS", "httpHeaders": [{"name": "X-Probe", "value": "ready"}]},
                "timeoutSeconds": 2},
            "/app-health/web/startupz": {"tcpSocket": {"port": 8080}},
            "/app-health/grpc/livez": {"grpc": {"port": 9090, "service": "down"}}
        }"#;
        let set: ProbeSet = ok.parse().unwrap();
        assert_eq!(set.len(), 3);
        let ready = &set.probes["/app-health/web/readyz"];
        assert_eq!(ready.timeout, Duration::from_secs(2));
        assert!(matches!(
            &ready.action,
            Action::Http { scheme: Scheme::Https, port: 8080, path, headers }
                if path.as_str() == "/healthz?full=1" && headers.len() == 1
        ));
        assert_eq!(
            set.probes["/app-health/web/startupz"].timeout,
            Duration::from_secs(1),
            "kubelet default"
        );
        assert!("".parse::<ProbeSet>().unwrap().is_empty());

        let bad = r#"{
            "/other/web/readyz": {"tcpSocket": {"port": 1}},
            "/app-health/web/healthz": {"tcpSocket": {"port": 1}},
            "/app-health/Web/livez": {"tcpSocket": {"port": 1}},
            "/app-health/a/livez": {"tcpSocket": {"port": 0}},
            "/app-health/b/livez": {"tcpSocket": {"port": 1}, "grpc": {"port": 1}},
            "/app-health/c/livez": {"tcpSocket": {"port": 1}, "timeoutSeconds": 0},
            "/app-health/d/livez": {"httpGet": {"path": "nope", "port": 1}},
            "/app-health/e/livez": {"httpGet": {"port": 1, "httpHeaders": [{"name": "bad name", "value": ""}]}},
            "/app-health/f/livez": {"tcpSocket": {"port": 1}}
        }"#;
        let err = bad.parse::<ProbeSet>().unwrap_err();
        assert_eq!(err.0.len(), 8, "{err}");
        for key in [
            "/other", "healthz", "Web", "/a/", "/b/", "/c/", "/d/", "/e/",
        ] {
            assert!(err.to_string().contains(key), "{key}: {err}");
        }
        // Not JSON, unknown fields, out-of-range ports: refused with serde's message.
        for s in [
            "{",
            r#"{"/app-health/a/livez": {"exec": {}}}"#,
            r#"{"/app-health/a/livez": {"tcpSocket": {"port": 70000}}}"#,
        ] {
            assert!(s.parse::<ProbeSet>().is_err(), "{s}");
        }
    }

    #[test]
    fn verdicts_follow_the_kubelet() {
        let http = |s| Outcome {
            success: (200..400).contains(&s),
            app_status: Some(s),
            detail: String::new(),
        };
        assert_eq!(http(204).status(), StatusCode::OK);
        assert_eq!(http(302).status(), StatusCode::OK);
        assert_eq!(http(500).status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(http(404).status(), StatusCode::NOT_FOUND);
        assert_eq!(http(101).status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            Outcome::failed(None, "refused").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            app_deadline(Duration::from_secs(1)),
            Duration::from_millis(800)
        );
        assert_eq!(
            app_deadline(Duration::from_secs(10)),
            Duration::from_millis(9750)
        );
    }

    #[test]
    fn health_messages_round_trip_by_hand() {
        assert_eq!(&health_request("")[..], b"");
        assert_eq!(&health_request("down")[..], b"\x0a\x04down");
        let framed = grpc_frame(b"\x08\x01");
        assert_eq!(&framed[..], b"\x00\x00\x00\x00\x02\x08\x01");
        assert_eq!(grpc_unframe(&framed), Some(&b"\x08\x01"[..]));
        assert_eq!(grpc_unframe(b"\x01\x00\x00\x00\x00"), None, "compressed");
        assert_eq!(grpc_unframe(b"\x00\x00\x00\x00\x05\x08"), None, "short");
        assert_eq!(health_response_status(b"\x08\x01"), Some(1));
        assert_eq!(health_response_status(b"\x08\x02"), Some(2));
        assert_eq!(health_response_status(b""), Some(0));
        // An unknown length-delimited field before the status is skipped.
        assert_eq!(health_response_status(b"\x12\x02ab\x08\x01"), Some(1));
        assert_eq!(health_response_status(b"\x08"), None);
        assert_eq!(health_response_status(b"\x12\x09ab"), None);
        let mut big = BytesMut::new();
        put_varint(&mut big, 300);
        assert_eq!(get_varint(&mut &big[..]), Some(300));
    }
}
