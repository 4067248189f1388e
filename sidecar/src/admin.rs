//! The admin server (15020): `/live`, `/ready`, `/metrics`, `/config`, `POST /shutdown`, and
//! the kubelet's rewritten app probes under `GET /app-health/...` (see [`crate::probe`]).
//! It runs apart from the data path (its own listener and tasks) so a saturated data path
//! still answers probes.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::creds::CredentialsRx;
use crate::metrics::{Metrics, OPENMETRICS_CONTENT_TYPE};
use crate::probe::{PATH_PREFIX, Prober};
use crate::reload::{ConfigRx, ReloadStatus};
use crate::shutdown::Shutdown;

pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub config: ConfigRx,
    pub status: Arc<Mutex<ReloadStatus>>,
    pub creds: CredentialsRx,
    pub shutdown: Shutdown,
    /// The app probes the injector configured; `/app-health/...` runs only these.
    pub probes: Arc<Prober>,
}

impl Admin {
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

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let text = |status: StatusCode, body: &'static str| {
            let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            *r.status_mut() = status;
            r
        };
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET, "/ready") => {
                if self.ready() {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
            (&Method::GET, "/metrics") => {
                let mut r = Response::new(Full::new(Bytes::from(self.metrics.encode())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE),
                );
                r
            }
            (&Method::GET, "/config") => {
                let body = serde_json::to_vec_pretty(&self.config_json()).unwrap_or_default();
                let mut r = Response::new(Full::new(Bytes::from(body)));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                r
            }
            (&Method::POST, "/shutdown") => {
                tracing::info!("shutdown requested on the admin port");
                self.shutdown.trigger();
                text(StatusCode::OK, "shutting down\n")
            }
            (_, "/live" | "/ready" | "/metrics" | "/config" | "/shutdown") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// `GET /app-health/...` runs the configured probe (404 for any other path under the
    /// prefix); everything else is answered by [`Admin::handle`].
    async fn respond(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if !req.uri().path().starts_with(PATH_PREFIX) {
            return self.handle(&req);
        }
        let reply = |status: StatusCode, body: String| {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = status;
            r
        };
        if req.method() != Method::GET {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n".into(),
            );
        }
        let ua = req.headers().get(header::USER_AGENT);
        match self.probes.run(req.uri().path(), ua).await {
            Some(outcome) => reply(outcome.status(), format!("{}\n", outcome.detail)),
            None => reply(StatusCode::NOT_FOUND, "no such probe\n".into()),
        }
    }

    /// Serves until `stop` resolves. The admin port keeps answering during the drain (so
    /// `/ready` can report the shutdown) and closes when the process exits.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.respond(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }
}
