//! Outbound: connections the application opens, redirected to 15001.
//!
//! The original destination picks the Service (by cluster IP or endpoint address and port,
//! through the snapshot's [`OutboundIndex`](crate::lookup::OutboundIndex): O(1) per
//! connection, whatever the number of Services).
//! HTTP goes through the traffic layer ([`Dispatcher::dispatch`](crate::traffic::Dispatcher));
//! opaque TCP is spliced at L4, wrapped in mTLS when the destination is meshed. A connection
//! to an address the config does not know is passed through untouched (plaintext).
//!
//! Only redirected connections are served: in a pod the listener is on loopback, and a
//! connection that did not come through the `OUTPUT` chain's redirect (its original destination
//! is the listener itself) is closed. Otherwise anyone reaching the port could send requests
//! into the mesh with this pod's identity. Local mode (`--local-mode`: `trellis dev`, the
//! benchmarks, in-process tests; no iptables, the application connects to 15001 directly) is the
//! one explicit exception: it routes HTTP by the `Host` header (the same index, by authority).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::net::TcpStream;

use super::detect::{Detected, detect};
use super::http::{
    authority, clean_response, ensure_request_id, http10_keep_alive, is_upgrade, keep_http10_alive,
    request_id, strip_hop_by_hop, trace_id,
};
use super::io::{Prefixed, original_dst};
use super::mtls::Alpn;
use super::{Completed, Shared, record, serve_http, spawn_tunnel, tcp};
use super::{abort, coalesce};
use crate::config::{OutboundService, Protocol};
use crate::discovery::Target as DiscoveryTarget;
use crate::discovery::resolver::RESOLVE_WAIT;
use crate::metrics::{Direction, SeriesCache, TcpLabels};
use crate::traffic::{BoxError, Outcome, RequestCtx, Target, Upstream, error_response};

/// Detection timeout for local-mode connections that can only be HTTP.
const LOCAL_DETECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

struct ConnInfo {
    client: SocketAddr,
    orig_dst: SocketAddr,
    redirected: bool,
    /// The `dst_service` label of the connection's last request: a keep-alive connection
    /// nearly always talks to one Service, and building the label costs two allocations.
    dst_service: std::sync::Mutex<Option<Arc<str>>>,
    series: SeriesCache,
    /// Set when an HTTP/1.0 response body failed: the connection is then reset (see
    /// [`super::abort`]).
    aborted: abort::Flag,
}

impl ConnInfo {
    /// `svc.key()` as a shared string, reused while the connection's requests go to `svc`.
    fn dst_service(&self, svc: &OutboundService) -> Arc<str> {
        let mut last = self.dst_service.lock().expect("dst_service lock");
        if let Some(k) = last.as_ref()
            && is_key_of(k, svc)
        {
            return k.clone();
        }
        let k: Arc<str> = svc.key().into();
        *last = Some(k.clone());
        k
    }
}

/// The `name.namespace` an HTTP authority names (`name` alone is in `own_namespace`), for
/// asking the operator; `None` for what cannot be a Service (an IP literal, a foreign domain).
fn service_key(authority: &str, own_namespace: &str) -> Option<String> {
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => authority,
    };
    let host = host.trim_end_matches('.');
    if host.is_empty() || host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
        return None;
    }
    let mut parts = host.split('.');
    let name = parts.next()?;
    match (parts.next(), parts.next()) {
        (None, _) => Some(format!("{name}.{own_namespace}")),
        (Some(ns), None | Some("svc")) => Some(format!("{name}.{ns}")),
        _ => None,
    }
}

/// Whether `key` is `svc.key()` (`name.namespace`), without formatting it.
fn is_key_of(key: &str, svc: &OutboundService) -> bool {
    key.len() == svc.name.len() + 1 + svc.namespace.len()
        && key.starts_with(svc.name.as_str())
        && key.as_bytes()[svc.name.len()] == b'.'
        && key.ends_with(svc.namespace.as_str())
}

pub async fn serve(shared: Arc<Shared>, stream: TcpStream, client: SocketAddr) {
    let (orig_dst, local) = match (original_dst(&stream), stream.local_addr()) {
        (Ok(o), Ok(l)) => (o, l),
        _ => return,
    };
    let redirected = orig_dst != local;
    if !redirected && !shared.local_mode {
        tracing::debug!(%client, "outbound connection was not redirected; closing (not local mode)");
        return;
    }
    let mut snap = shared.config.borrow().clone();
    // An address the config does not know: ask the operator first (bounded, and only while
    // its stream is up), so a meshed destination gets mTLS instead of plaintext.
    if redirected
        && let Some(resolver) = &shared.discovery
        && snap
            .as_deref()
            .is_some_and(|s| s.service_for_addr(orig_dst).is_none())
    {
        let known = || {
            shared
                .config
                .borrow()
                .as_deref()
                .is_some_and(|s| s.service_for_addr(orig_dst).is_some())
        };
        resolver
            .resolve(DiscoveryTarget::Address(orig_dst.ip()), RESOLVE_WAIT, known)
            .await;
        snap = shared.config.borrow().clone();
    }
    let svc_port = snap.as_deref().and_then(|s| {
        let svc = s.service_for_addr(orig_dst)?;
        Some((svc, svc.port(orig_dst.port())?.protocol))
    });
    let opaque_port =
        shared.skips_detection(orig_dst.port()) || matches!(&svc_port, Some((_, Protocol::Tcp)));
    let mut stream = stream;
    // Local mode without a TCP Service on this listener: only HTTP can go anywhere, so a client
    // that connects early and speaks late (pre-connecting pools) is waited for instead of
    // being closed as opaque after the short detection timeout.
    let timeout = if !redirected && svc_port.is_none() {
        LOCAL_DETECT_TIMEOUT
    } else {
        shared.detect_timeout()
    };
    let (detected, prefix) = if opaque_port {
        (Detected::Opaque, bytes::Bytes::new())
    } else {
        match detect(&mut stream, timeout).await {
            Ok(d) => d,
            Err(_) => return,
        }
    };
    let io = Prefixed::new(prefix, stream);
    if detected.is_http() {
        // Requests read the config current at their start, not this connection's.
        drop(snap);
        let aborted = abort::Flag::default();
        let io = abort::ResetOnAbort::new(io, aborted.clone());
        let info = Arc::new(ConnInfo {
            client,
            orig_dst,
            redirected,
            dst_service: std::sync::Mutex::new(None),
            series: SeriesCache::default(),
            aborted,
        });
        let sh = shared.clone();
        serve_http(&shared, io, move |req| {
            handle(sh.clone(), info.clone(), req)
        })
        .await;
        return;
    }
    if !redirected && svc_port.is_none() {
        // Local mode has no original destination for opaque bytes, unless a Service was given
        // this listener's own address.
        tracing::debug!(%client, "opaque connection in local mode; closing");
        return;
    }
    tcp_outbound(&shared, io, orig_dst, client, svc_port.map(|(s, _)| s)).await;
}

async fn tcp_outbound(
    shared: &Shared,
    io: Prefixed<TcpStream>,
    orig_dst: SocketAddr,
    client: SocketAddr,
    svc: Option<&OutboundService>,
) {
    // The traffic layer picks the endpoint per connection (balancer, ejection, split,
    // maxConnections, rate limit); holding `conn` counts the connection until it closes.
    let mut conn = None;
    let (addr, identities, dst_service, timeout): (SocketAddr, Arc<[String]>, Arc<str>, _) =
        match svc {
            Some(s) => {
                let ctx = RequestCtx {
                    original_dst: orig_dst,
                    source_ip: client.ip(),
                };
                let t = match shared.dispatcher.pick_tcp(s, orig_dst.port(), &ctx) {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::debug!(error = %e, "outbound tcp refused by traffic policy");
                        return;
                    }
                };
                let picked = (
                    t.target.addr,
                    t.target.identities.clone(),
                    s.key().into(),
                    t.target.connect_timeout,
                );
                conn = Some(t);
                picked
            }
            None => (orig_dst, Arc::from(Vec::new()), "unknown".into(), None),
        };
    let labels = TcpLabels {
        direction: Direction::Outbound.as_str(),
        dst_service,
        tls: !identities.is_empty(),
    };
    let started = Instant::now();
    match shared
        .pool
        .connect_trusted(addr, &identities, Alpn::Tcp, timeout)
        .await
    {
        Ok((upstream, trust)) => {
            if let Some(t) = &conn {
                t.connected(Ok(started.elapsed()));
            }
            // Closes when the server's certificate expires or its root leaves the bundle.
            let revoked = super::peer_trust::revoked(trust, shared.tls.subscribe());
            tcp::splice_until(shared, io, upstream, labels, revoked).await
        }
        Err(e) => {
            if let Some(t) = &conn {
                t.connected(Err(()));
            }
            tracing::debug!(error = %e, "outbound tcp connect failed")
        }
    }
    drop(conn);
}

async fn handle(
    shared: Arc<Shared>,
    info: Arc<ConnInfo>,
    mut req: Request<Incoming>,
) -> Result<Response<crate::traffic::Body>, Infallible> {
    let start = Instant::now();
    ensure_request_id(req.headers_mut());
    let upgrade = is_upgrade(&req);
    let keep_alive_10 = http10_keep_alive(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    strip_hop_by_hop(req.headers_mut(), upgrade);

    // HTTP/1.0 allows a request without `Host`; HTTP/2 between the sidecars needs an
    // authority (the `http` crate cannot even build a URI with a scheme and none), and without
    // one the hop failed with 502. The authority is where the client connected, as it would
    // have written it had it sent one; the application then gets that as `Host`.
    if info.redirected
        && authority(&req).is_none()
        && let Ok(host) = http::HeaderValue::from_str(&info.orig_dst.to_string())
    {
        req.headers_mut().insert(http::header::HOST, host);
    }
    let method = req.method().clone();
    let version = req.version();
    // Joins or starts the trace before the headers go on, so the next hop's span (or the
    // application's) is this span's child.
    let span = shared.tracing.begin(req.headers_mut());
    // Copied out of the request only when a span or an access log line will be written.
    let (auth, path, trace, request_id) = if span.is_some() || shared.access_log().is_some() {
        (
            authority(&req).unwrap_or("").to_owned(),
            req.uri()
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
            trace_id(req.headers()).map(str::to_owned),
            request_id(req.headers()).to_owned(),
        )
    } else {
        (String::new(), String::new(), None, String::new())
    };

    let mut snap = shared.config.borrow().clone();
    // Local mode: an authority the config does not know is asked of the operator first.
    if !info.redirected
        && let Some(resolver) = &shared.discovery
        && let Some(s) = snap.as_deref()
        && s.service_for_authority(authority(&req).unwrap_or(""))
            .is_none()
        && let Some(key) = service_key(authority(&req).unwrap_or(""), &s.config.namespace)
    {
        let auth = authority(&req).unwrap_or("");
        let known = || {
            shared
                .config
                .borrow()
                .as_deref()
                .is_some_and(|s| s.service_for_authority(auth).is_some())
        };
        resolver
            .resolve(DiscoveryTarget::Service(key), RESOLVE_WAIT, known)
            .await;
        snap = shared.config.borrow().clone();
    }
    // References into the snapshot this request started with: a reload publishes a new
    // snapshot and never changes this one.
    let route = snap.as_deref().and_then(|s| {
        if info.redirected {
            s.service_for_addr(info.orig_dst)
                .map(|svc| (svc, info.orig_dst.port()))
        } else {
            s.service_for_authority(authority(&req).unwrap_or(""))
        }
    });
    let req = req.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed());
    let ctx = RequestCtx {
        original_dst: info.orig_dst,
        source_ip: info.client.ip(),
    };
    let (resp, outcome, dst_service, tls) = match route {
        Some((svc, port)) => {
            let (resp, outcome) = shared.dispatcher.dispatch(svc, port, req, &ctx).await;
            (
                resp,
                outcome,
                info.dst_service(svc),
                !svc.identities.is_empty(),
            )
        }
        None if info.redirected => {
            // Not a Service we know: pass it through, plaintext, to where the client meant.
            let target = Target {
                addr: info.orig_dst,
                identities: Arc::from(Vec::new()),
                protocol: Protocol::Auto,
                connect_timeout: None,
            };
            let mut outcome = Outcome {
                endpoint: Some(info.orig_dst),
                attempts: 1,
                ..Default::default()
            };
            let resp = match shared.pool.send(target, req).await {
                Ok(r) => {
                    outcome.peer = r.peer;
                    r.resp
                }
                Err(e) => {
                    tracing::debug!(error = %e, "passthrough request failed");
                    outcome.flags.push("UF");
                    error_response(StatusCode::BAD_GATEWAY)
                }
            };
            (resp, outcome, Arc::<str>::from("unknown"), false)
        }
        None => {
            let outcome = Outcome {
                flags: vec!["NR"],
                ..Default::default()
            };
            (
                error_response(StatusCode::NOT_FOUND),
                outcome,
                Arc::<str>::from("unknown"),
                false,
            )
        }
    };
    // Head and first chunk go to the application as one write.
    let mut resp = coalesce::prefetch(resp, coalesce::PREFETCH_WAIT).await;
    if let Some(cu) = client_upgrade
        && resp.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        let trust = resp
            .extensions()
            .get::<super::peer_trust::PeerTrust>()
            .cloned();
        spawn_tunnel(&shared, cu, &mut resp, trust);
    }
    clean_response(&mut resp);
    if keep_alive_10 {
        keep_http10_alive(&mut resp);
    }
    if version == http::Version::HTTP_10 {
        resp = abort::flag_errors(resp, &info.aborted);
    }
    let peer = outcome.peer.clone().unwrap_or_default();
    record(
        &shared,
        &Completed {
            direction: Direction::Outbound,
            start,
            method: &method,
            authority: &auth,
            path: &path,
            version,
            request_id: &request_id,
            trace_id: trace.as_deref(),
            peer_identity: &peer,
            dst_service: &dst_service,
            tls,
            series: &info.series,
            span: span.as_ref(),
            outcome: Some(&outcome),
        },
        &resp,
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CONFIG_VERSION, MeshSettings, ProxyConfig, ServicePort, Telemetry};
    use crate::reload::Snapshot;

    fn cfg() -> ProxyConfig {
        ProxyConfig {
            version: CONFIG_VERSION,
            revision: String::new(),
            namespace: "shop".into(),
            mesh: MeshSettings {
                trust_domain: "cluster.local".into(),
                identity_endpoint: None,
                telemetry: Telemetry::default(),
                skip_detection_ports: vec![],
                detect_timeout_ms: 100,
            },
            inbound: vec![],
            outbound: vec![OutboundService {
                name: "reviews".into(),
                namespace: "shop".into(),
                addresses: vec!["10.96.0.10".parse().unwrap()],
                ports: vec![
                    ServicePort {
                        port: 9080,
                        name: None,
                        protocol: Protocol::Http1,
                        endpoints: vec![],
                    },
                    ServicePort {
                        port: 9443,
                        name: None,
                        protocol: Protocol::Auto,
                        endpoints: vec![],
                    },
                ],
                identities: vec![],
                policy: None,
            }],
        }
    }

    #[test]
    fn routes_by_original_destination() {
        let snap = Snapshot::new(cfg(), Default::default());
        assert!(
            snap.service_for_addr("10.96.0.10:9080".parse().unwrap())
                .is_some()
        );
        assert!(
            snap.service_for_addr("10.96.0.10:1234".parse().unwrap())
                .is_none()
        );
        assert!(
            snap.service_for_addr("10.96.0.11:9080".parse().unwrap())
                .is_none()
        );
    }

    #[test]
    fn routes_by_authority_in_local_mode() {
        let snap = Snapshot::new(cfg(), Default::default());
        assert_eq!(snap.service_for_authority("reviews").unwrap().1, 9080);
        assert_eq!(
            snap.service_for_authority("reviews.shop:9443").unwrap().1,
            9443
        );
        assert!(snap.service_for_authority("reviews:1").is_none());
        assert!(snap.service_for_authority("ratings:9080").is_none());
    }

    #[test]
    fn recognises_a_service_key() {
        let svc = &cfg().outbound[0];
        assert!(is_key_of("reviews.shop", svc));
        assert!(!is_key_of("reviews.shops", svc));
        assert!(!is_key_of("reviewsxshop", svc));
        assert!(!is_key_of("ratings.shop", svc));
    }

    #[test]
    fn an_authority_names_the_service_the_operator_is_asked_about() {
        assert_eq!(service_key("web", "shop").as_deref(), Some("web.shop"));
        assert_eq!(service_key("web:8080", "shop").as_deref(), Some("web.shop"));
        assert_eq!(service_key("web.pay", "shop").as_deref(), Some("web.pay"));
        assert_eq!(
            service_key("web.pay.svc.cluster.local.", "shop").as_deref(),
            Some("web.pay")
        );
        for not_a_service in ["", "10.0.0.1:80", "[::1]:80", "example.com.evil", "a.b.c"] {
            assert_eq!(service_key(not_a_service, "shop"), None, "{not_a_service}");
        }
    }
}
