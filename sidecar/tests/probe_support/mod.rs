//! Real applications for the app-probe tests: an HTTP/1.1 app (plain or behind a self-signed
//! TLS certificate), a gRPC health server over h2c, and a server that accepts and never answers.
//! Used in-process (tests/probes.rs) and inside network namespaces (tests/netns_probes.rs).
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// The probe header the fixtures' readiness probe sends.
pub const PROBE_HEADER: (&str, &str) = ("x-probe", "ready");

/// The HTTP app's answer:
/// - `/healthz?full=1`: 200 when the request carries [`PROBE_HEADER`], else 400 (so a probe that
///   lost its path, query or header fails);
/// - `/fail`: 500; `/moved`: 302;
/// - `/probe-source`: 200 when the peer is 127.0.0.6 (the proxy's probe source), else 403;
/// - anything else: 200 with `app saw: <method> <path>`.
fn answer(req: &Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let (status, body) = match path {
        "/healthz?full=1" => {
            let ok = req.headers().get(PROBE_HEADER.0).map(HeaderValue::as_bytes)
                == Some(PROBE_HEADER.1.as_bytes());
            if ok {
                (StatusCode::OK, "healthy\n".to_string())
            } else {
                (StatusCode::BAD_REQUEST, "probe header missing\n".into())
            }
        }
        "/fail" => (StatusCode::INTERNAL_SERVER_ERROR, "failing\n".into()),
        "/moved" => (StatusCode::FOUND, "elsewhere\n".into()),
        "/probe-source" if peer.ip().to_string() == "127.0.0.6" => {
            (StatusCode::OK, "from the probe source\n".into())
        }
        "/probe-source" => (StatusCode::FORBIDDEN, format!("from {}\n", peer.ip())),
        _ => (
            StatusCode::OK,
            format!("app saw: {} {path}\n", req.method()),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

/// Serves the HTTP app on `listener` (plain HTTP/1.1, or TLS when `tls` is given).
pub fn serve_http(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) {
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let r = answer(&req, peer);
                    async move { Ok::<_, Infallible>(r) }
                });
                let builder = hyper::server::conn::http1::Builder::new();
                match tls {
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    Some(cfg) => {
                        let Ok(tls) = tokio_rustls::TlsAcceptor::from(cfg).accept(stream).await
                        else {
                            return;
                        };
                        let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                    }
                }
            });
        }
    });
}

pub async fn http_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    serve_http(l, None);
    addr
}

/// A TLS server config with a self-signed certificate for a name nobody probes with, as an
/// app's own serving certificate typically is.
pub fn self_signed_tls() -> Arc<rustls::ServerConfig> {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["app.example.invalid".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(trellis_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], der)
        .unwrap();
    Arc::new(cfg)
}

pub async fn https_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    serve_http(l, Some(self_signed_tls()));
    addr
}

/// Accepts connections and never answers (holds them open for a minute).
pub async fn hanging_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                drop(s);
            });
        }
    });
    addr
}

/// The service name of a `HealthCheckRequest` (field 1), decoded by hand.
fn requested_service(body: &[u8]) -> String {
    let msg = body.get(5..).unwrap_or_default();
    match msg {
        [0x0a, len, rest @ ..] => {
            String::from_utf8_lossy(&rest[..usize::from(*len).min(rest.len())]).into_owned()
        }
        _ => String::new(),
    }
}

/// A gRPC health server over h2c, as `grpc.health.v1.Health/Check` answers: the overall health
/// (service `""`) and `ready` are `SERVING`, `down` is `NOT_SERVING`, any other service is
/// `NOT_FOUND` (grpc-status 5, as the reference implementation answers).
pub fn serve_grpc_health(listener: TcpListener) {
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let path_ok = req.uri().path() == "/grpc.health.v1.Health/Check";
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let service = requested_service(&body);
                    let (grpc_status, serving) = match (path_ok, service.as_str()) {
                        (false, _) => ("12", None),
                        (true, "" | "ready") => ("0", Some(1u8)),
                        (true, "down") => ("0", Some(2)),
                        (true, _) => ("5", None),
                    };
                    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = Vec::new();
                    if let Some(s) = serving {
                        let mut b = BytesMut::new();
                        b.put_u8(0);
                        b.put_u32(2);
                        b.put_slice(&[0x08, s]);
                        frames.push(Ok(Frame::data(b.freeze())));
                    }
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from_static(grpc_status));
                    frames.push(Ok(Frame::trailers(trailers)));
                    let mut r = Response::new(StreamBody::new(futures::stream::iter(frames)));
                    r.headers_mut()
                        .insert("content-type", HeaderValue::from_static("application/grpc"));
                    Ok::<_, Infallible>(r)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

pub async fn grpc_health() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    serve_grpc_health(l);
    addr
}

/// A port on 127.0.0.1 with nothing listening (bound, then closed).
pub async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}
