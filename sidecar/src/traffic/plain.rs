//! A plaintext [`Upstream`] over hyper's pooled client, for targets outside the mesh, for tests
//! and for the load-balancing benchmark. The core's mTLS pool is the production `Upstream`; this
//! one shares its contract (one request to one address, errors classified by type).

use std::error::Error as _;
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Request, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::{Body, Reply, Target, Upstream, UpstreamError};
use crate::config::Protocol;

/// Plaintext HTTP/1.1 and HTTP/2 (prior knowledge, for `Http2`/`Grpc` targets) client.
#[derive(Clone, Debug)]
pub struct PlainUpstream {
    h1: Client<HttpConnector, Body>,
    h2: Client<HttpConnector, Body>,
}

impl Default for PlainUpstream {
    fn default() -> Self {
        Self::new(Duration::from_secs(1))
    }
}

impl PlainUpstream {
    /// Connections time out after `connect_timeout`. hyper's pooled client has one connector
    /// per client, so `Target::connect_timeout` is not applied per target here (the core's
    /// pool applies it).
    pub fn new(connect_timeout: Duration) -> Self {
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(connect_timeout));
        conn.set_nodelay(true);
        let h1 = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(256)
            .build(conn.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(conn);
        Self { h1, h2 }
    }
}

impl Upstream for PlainUpstream {
    fn send(
        &self,
        target: Target,
        mut req: Request<Body>,
    ) -> BoxFuture<'static, Result<Reply, UpstreamError>> {
        let addr = target.addr;
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let uri: Uri = match format!("http://{addr}{pq}").parse() {
            Ok(u) => u,
            Err(e) => {
                return Box::pin(async move {
                    Err(UpstreamError::Other {
                        addr,
                        source: Box::new(e),
                    })
                });
            }
        };
        *req.uri_mut() = uri;
        let client = match target.protocol {
            Protocol::Http2 | Protocol::Grpc => self.h2.clone(),
            _ => {
                *req.version_mut() = http::Version::HTTP_11;
                self.h1.clone()
            }
        };
        Box::pin(async move {
            match client.request(req).await {
                Ok(resp) => Ok(Reply::plain(resp.map(|b| b.map_err(Into::into).boxed()))),
                Err(e) if e.is_connect() => Err(UpstreamError::Connect {
                    addr,
                    source: std::io::Error::other(
                        e.source().map_or_else(|| e.to_string(), |s| s.to_string()),
                    ),
                }),
                Err(e) => Err(UpstreamError::Reset {
                    addr,
                    source: Box::new(e),
                }),
            }
        })
    }
}
