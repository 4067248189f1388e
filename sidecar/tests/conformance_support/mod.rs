//! Shared by the conformance tests (`conformance.rs`, `conformance_bulk.rs`): the Python
//! application (`app.py` beside this file), a sidecar pair in front of it, and curl.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use trellis_proxy::config::{MtlsMode, Protocol};

pub const PORT: u16 = 8080;
pub const AUTHORITY: &str = "backend.shop:8080";

pub fn skip_reason() -> Option<String> {
    for tool in ["curl", "python3"] {
        let found = std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("{tool} not installed"));
        }
    }
    None
}

/// The Python application; stopped (its stdin closed, then killed) on drop.
pub struct App {
    pub addr: SocketAddr,
    _child: tokio::process::Child,
}

pub async fn python_app() -> App {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/conformance_support/app.py"
    );
    let mut child = tokio::process::Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("app printed READY")
        .unwrap()
        .expect("app printed READY");
    let port: u16 = line
        .strip_prefix("READY ")
        .unwrap_or_else(|| panic!("app said {line}"))
        .parse()
        .unwrap();
    App {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        _child: child,
    }
}

/// Client proxy A and server proxy B (both Strict mTLS) in front of the Python application;
/// `backend.shop:8080` on A's outbound listener reaches it.
pub struct Pair {
    pub a: TestProxy,
    pub b: TestProxy,
    pub app: Option<App>,
    pub pki: Pki,
}

/// The pair in front of the Python application, the Service port declared `protocol`.
pub async fn pair_with(protocol: Protocol) -> Pair {
    let app = python_app().await;
    let mut p = pair_to(app.addr, protocol).await;
    p.app = Some(app);
    p
}

/// The pair in front of the application at `app`.
pub async fn pair_to(app: SocketAddr, protocol: Protocol) -> Pair {
    let pki = Pki::new("mesh");
    let b = TestProxy::start(
        &pki,
        &id("backend"),
        &config("b1", inbound(MtlsMode::Strict), vec![]),
        Some(app),
    )
    .await;
    let svc = service(
        "backend",
        PORT,
        protocol,
        b.running.inbound_addr,
        vec![id("backend")],
    );
    let a = TestProxy::start(
        &pki,
        &id("web"),
        &config("a1", inbound(MtlsMode::Strict), vec![svc]),
        None,
    )
    .await;
    Pair {
        a,
        b,
        app: None,
        pki,
    }
}

pub async fn pair() -> Pair {
    pair_with(Protocol::Auto).await
}

impl Pair {
    pub fn out(&self) -> SocketAddr {
        self.a.running.outbound_addr
    }

    /// `curl` at `http://backend.shop:8080<path>`, connected to A's outbound listener (local
    /// mode routes by `Host`, which curl sets from the URL).
    pub fn curl(&self, path: &str) -> Curl {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["-sS", "--max-time", "60", "--connect-to"])
            .arg(format!("{AUTHORITY}:{}", self.out()))
            .arg(format!("http://{AUTHORITY}{path}"))
            .kill_on_drop(true);
        Curl(cmd)
    }
}

pub struct Curl(pub tokio::process::Command);

/// What curl printed: the response heads (`-D`), the body and its exit code.
pub struct CurlOut {
    pub code: i32,
    pub head: String,
    pub body: Vec<u8>,
    pub stderr: String,
}

impl CurlOut {
    /// The status of the last response head (after any `100 Continue`).
    pub fn status(&self) -> u16 {
        self.head
            .split("\r\n\r\n")
            .filter(|h| h.starts_with("HTTP/"))
            .last()
            .and_then(|h| h.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {:?} ({})", self.head, self.stderr))
    }

    /// Values of header `name` in the last response head.
    pub fn header(&self, name: &str) -> Vec<String> {
        let last = self
            .head
            .split("\r\n\r\n")
            .filter(|h| h.starts_with("HTTP/"))
            .last()
            .unwrap_or("");
        last.lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} / {} / {}",
                self.head,
                String::from_utf8_lossy(&self.body),
                self.stderr
            )
        })
    }
}

impl Curl {
    pub fn args<'a>(mut self, a: impl IntoIterator<Item = &'a str>) -> Self {
        self.0.args(a);
        self
    }

    pub async fn run(mut self) -> CurlOut {
        let dir = tempfile::tempdir().unwrap();
        let head = dir.path().join("head");
        self.0.arg("-D").arg(&head).stdin(Stdio::null());
        let out = tokio::time::timeout(Duration::from_secs(90), self.0.output())
            .await
            .expect("curl finished")
            .unwrap();
        CurlOut {
            code: out.status.code().unwrap_or(-1),
            head: std::fs::read_to_string(&head).unwrap_or_default(),
            body: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// The values the application received for header `name` (case-insensitive), in order.
pub fn app_header(echo: &serde_json::Value, name: &str) -> Vec<String> {
    echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|kv| kv[0].as_str().unwrap().eq_ignore_ascii_case(name))
        .map(|kv| kv[1].as_str().unwrap().to_string())
        .collect()
}

/// Sends raw bytes on a fresh connection to A and reads until the proxy closes it or `quiet`
/// passes without a byte.
pub async fn raw(addr: SocketAddr, bytes: &[u8], quiet: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        match tokio::time::timeout(quiet, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}
