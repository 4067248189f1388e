//! The admin server (15020). It runs apart from the data path (its own listener and tasks) so
//! a saturated data path still answers probes.
//!
//! Routes are split by who may call them ([`Access`]):
//! - public, read-only: `/live`, `/ready` (the kubelet, from the node's address), `/metrics`
//!   (Prometheus, from wherever it runs) and the kubelet's rewritten app probes under
//!   `GET /app-health/...` (see [`crate::probe`]: they run only the probes the injector wrote,
//!   and answer with a verdict, never the app's body).
//! - loopback only: everything that changes state or shows configuration, `POST /shutdown`
//!   and `GET /config` (the whole outbound table, endpoints and identities), and any future
//!   debug route. Anyone else gets `403`.
//!
//! Why one listener with a per-route check rather than a second listener on 127.0.0.1: the
//! kubelet and Prometheus need the pod-IP listener anyway, the check is one comparison on the
//! peer address (which the kernel guarantees: packets from outside with a loopback source are
//! dropped as martians), and `kubectl exec ... curl localhost:15020/config` keeps working.
//!
//! Because the port is public, it is bounded so that a slow or greedy client cannot take it
//! from the kubelet ([`Limits`]): HTTP/1.1 only (what the kubelet and Prometheus speak), a header
//! read timeout (which also closes idle keep-alive connections), a cap on requests per
//! connection and on a connection's lifetime, and caps on open connections, in total and per
//! peer address.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::conn_limit::{Gate, Slot};
use crate::creds::CredentialsRx;
use crate::metrics::{Metrics, OPENMETRICS_CONTENT_TYPE};
use crate::probe::{PATH_PREFIX, Prober};
use crate::reload::{ConfigRx, ReloadStatus};
use crate::shutdown::Shutdown;

/// Bounds on what one client can hold of the admin server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A request head must arrive within this; an idle keep-alive connection is closed after it.
    pub header_read_timeout: Duration,
    /// A connection is closed (after its current response) once this old.
    pub max_connection_age: Duration,
    /// A connection is closed after this many requests.
    pub max_requests_per_connection: u32,
    /// Open connections, all peers together; a new one beyond it closes the oldest
    /// ([`Gate::evicting`]): with a refusing total, a few addresses within their per-peer
    /// share (4 of 32 by default) could hold it full of idle connections and lock the
    /// kubelet's probes out, failing the pod's liveness. A probe's connection lives
    /// milliseconds, so it is never the oldest for long.
    pub max_connections: usize,
    /// Open connections from one peer address; more are closed at once. Keeps one client
    /// from holding most of [`Limits::max_connections`].
    pub max_connections_per_peer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // The kubelet's default probe timeout is 1 s: a request head takes far less.
            header_read_timeout: Duration::from_secs(5),
            max_connection_age: Duration::from_secs(60),
            max_requests_per_connection: 100,
            // The kubelet, a Prometheus or two and someone debugging need a handful; the
            // kubelet opens one connection per probe in flight (every container's liveness,
            // readiness and startup probes may overlap), all from the node's address.
            max_connections: 128,
            max_connections_per_peer: 32,
        }
    }
}

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone who can reach the port: read-only routes for the kubelet and Prometheus.
    Public,
    /// Only peers on loopback, i.e. inside the pod: routes that change state or show config.
    Loopback,
}

/// The admin routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Live,
    Ready,
    Metrics,
    /// `/app-health/...`: one of the app's rewritten kubelet probes.
    AppHealth,
    Config,
    Shutdown,
}

impl Route {
    pub fn parse(path: &str) -> Option<Route> {
        Some(match path {
            "/live" => Route::Live,
            "/ready" => Route::Ready,
            "/metrics" => Route::Metrics,
            "/config" => Route::Config,
            "/shutdown" => Route::Shutdown,
            p if p.starts_with(PATH_PREFIX) => Route::AppHealth,
            _ => return None,
        })
    }

    pub fn access(self) -> Access {
        match self {
            Route::Live | Route::Ready | Route::Metrics | Route::AppHealth => Access::Public,
            Route::Config | Route::Shutdown => Access::Loopback,
        }
    }

    fn method(self) -> Method {
        match self {
            Route::Shutdown => Method::POST,
            _ => Method::GET,
        }
    }
}

/// Whether `peer` may call a route with `access`.
pub fn allowed(access: Access, peer: IpAddr) -> bool {
    match access {
        Access::Public => true,
        // `to_canonical`: an IPv4 peer on a dual-stack socket shows as `::ffff:127.0.0.1`.
        Access::Loopback => peer.to_canonical().is_loopback(),
    }
}

pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub config: ConfigRx,
    pub status: Arc<Mutex<ReloadStatus>>,
    pub creds: CredentialsRx,
    pub shutdown: Shutdown,
    /// The app probes the injector configured; `/app-health/...` runs only these.
    pub probes: Arc<Prober>,
    pub limits: Limits,
    /// Open connections against [`Limits::max_connections`] and
    /// [`Limits::max_connections_per_peer`].
    open: Arc<Gate>,
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

impl Admin {
    pub fn new(
        metrics: Arc<Metrics>,
        config: ConfigRx,
        status: Arc<Mutex<ReloadStatus>>,
        creds: CredentialsRx,
        shutdown: Shutdown,
        probes: Arc<Prober>,
        limits: Limits,
    ) -> Self {
        Self {
            open: Gate::evicting(limits.max_connections, limits.max_connections_per_peer),
            metrics,
            config,
            status,
            creds,
            shutdown,
            probes,
            limits,
        }
    }

    /// Ready only when a config is loaded and a certificate is held, and not once shutting down.
    pub fn ready(&self) -> bool {
        self.config.borrow().is_some()
            && self.creds.borrow().is_some()
            && !self.shutdown.is_triggered()
    }

    fn config_json(&self) -> serde_json::Value {
        let snap = self.config.borrow().clone();
        let status = self.status.lock().expect("status lock").clone();
        let creds = self.creds.borrow().clone();
        let secs = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        serde_json::json!({
            "ready": self.ready(),
            "revision": snap.as_ref().map(|s| s.config.revision.clone()),
            "version": snap.as_ref().map(|s| s.config.version),
            "appliedAt": snap.as_ref().map(|s| secs(s.applied_at)),
            "lastError": status.last_error,
            "lastErrorAt": status.last_error_at.map(secs),
            "reloadsApplied": status.applied,
            "reloadsRejected": status.rejected,
            "labels": snap.as_ref().map(|s| s.labels.as_ref().clone()),
            "inboundPolicy": snap.as_ref().and_then(|s| s.config.inbound_for(&s.labels).map(|p| p.source.clone())),
            "identity": creds.as_ref().map(|c| c.spiffe_id.clone()),
            "certificateNotAfter": creds.as_ref().map(|c| secs(c.not_after)),
            "config": snap.as_ref().map(|s| s.config.as_ref()),
        })
    }

    async fn handle(&self, req: &Request<Incoming>, peer: IpAddr) -> Response<Full<Bytes>> {
        let Some(route) = Route::parse(req.uri().path()) else {
            return text(StatusCode::NOT_FOUND, "not found\n");
        };
        if !allowed(route.access(), peer) {
            tracing::debug!(%peer, ?route, "admin route refused: loopback only");
            return text(StatusCode::FORBIDDEN, "forbidden: loopback only\n");
        }
        if req.method() != route.method() {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        match route {
            Route::Live => text(StatusCode::OK, "live\n"),
            Route::Ready if self.ready() => text(StatusCode::OK, "ready\n"),
            Route::Ready => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            Route::Metrics => {
                let mut r = Response::new(Full::new(Bytes::from(self.metrics.encode())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE),
                );
                r
            }
            Route::Config => {
                let body = serde_json::to_vec_pretty(&self.config_json()).unwrap_or_default();
                let mut r = Response::new(Full::new(Bytes::from(body)));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                r
            }
            Route::Shutdown => {
                tracing::info!("shutdown requested on the admin port");
                self.shutdown.trigger();
                text(StatusCode::OK, "shutting down\n")
            }
            Route::AppHealth => {
                let ua = req.headers().get(header::USER_AGENT);
                let (status, body) = match self.probes.run(req.uri().path(), ua).await {
                    Some(outcome) => (outcome.status(), format!("{}\n", outcome.detail)),
                    None => (StatusCode::NOT_FOUND, "no such probe\n".into()),
                };
                let mut r = Response::new(Full::new(Bytes::from(body)));
                *r.status_mut() = status;
                r
            }
        }
    }

    /// Serves until the process exits. The admin port keeps answering during the drain (so
    /// `/ready` can report the shutdown) and closes when the process exits.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = self.open.admit(peer.ip()) else {
                tracing::debug!(%peer, "admin connection refused: too many open");
                drop(stream);
                continue;
            };
            tokio::spawn(self.clone().serve_conn(stream, peer, slot));
        }
    }

    async fn serve_conn(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        slot: Slot,
    ) {
        let served = Arc::new(AtomicU32::new(0));
        let max = self.limits.max_requests_per_connection.max(1);
        let admin = self.clone();
        let svc = hyper::service::service_fn(move |req| {
            let admin = admin.clone();
            let last = served.fetch_add(1, Ordering::Relaxed) + 1 >= max;
            async move {
                let mut r = admin.handle(&req, peer.ip()).await;
                if last {
                    r.headers_mut().insert(
                        header::CONNECTION,
                        header::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, Infallible>(r)
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            .max_buf_size(64 * 1024);
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        tokio::pin!(conn);
        let age = tokio::time::sleep(self.limits.max_connection_age);
        tokio::pin!(age);
        tokio::select! {
            _ = conn.as_mut() => {}
            // Its place went to a newer connection: the total is full, likely of a flood.
            _ = slot.evicted() => {}
            _ = &mut age => {
                conn.as_mut().graceful_shutdown();
                // A peer that stops reading cannot hold the slot past a second header timeout.
                let _ = tokio::time::timeout(self.limits.header_read_timeout, conn).await;
            }
        }
        drop(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_and_config_routes_are_loopback_only() {
        let outside: IpAddr = "10.0.0.9".parse().unwrap();
        for (path, public) in [
            ("/live", true),
            ("/ready", true),
            ("/metrics", true),
            ("/config", false),
            ("/shutdown", false),
            ("/app-health/app/readyz", true),
        ] {
            let access = Route::parse(path).unwrap().access();
            assert_eq!(allowed(access, outside), public, "{path}");
            for lo in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
                assert!(allowed(access, lo.parse().unwrap()), "{path} from {lo}");
            }
        }
        assert!(!allowed(
            Access::Loopback,
            "::ffff:10.0.0.9".parse().unwrap()
        ));
        assert!(Route::parse("/debug").is_none());
    }
}
