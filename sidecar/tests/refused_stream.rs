//! A peer that refuses an HTTP/2 stream (`REFUSED_STREAM`, RFC 9113 §8.7) has guaranteed it
//! processed nothing, so the request is as safe to retry as a failed connect, whatever its
//! method. Through the real `Dispatcher` and the core's pool, against a real `h2` server.

mod traffic_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Request, Response};
use traffic_support::*;
use trellis_proxy::config::{Protocol, RetryOn, TrafficPolicy};
use trellis_proxy::creds;
use trellis_proxy::proxy::mtls::TlsCache;
use trellis_proxy::proxy::upstream::Pool;
use trellis_proxy::traffic::{Dispatcher, full};

/// An HTTP/2 server (prior knowledge) that refuses its even-numbered streams (0-based, counted
/// across connections) and answers the others 200 `ok`.
async fn refusing_server() -> (SocketAddr, Arc<AtomicU64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let streams = Arc::new(AtomicU64::new(0));
    let seen = streams.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    if seen.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let mut body = respond.send_response(Response::new(()), false).unwrap();
                    let _ = body.send_data(Bytes::from_static(b"ok"), true);
                }
            });
        }
    });
    (addr, streams)
}

fn post() -> Request<trellis_proxy::traffic::Body> {
    Request::builder()
        .method("POST")
        .uri("/")
        .header("host", "svc.shop")
        .body(full("payload"))
        .unwrap()
}

#[tokio::test]
async fn a_refused_stream_is_retried_even_for_post() {
    let (addr, streams) = refusing_server().await;
    let (_tx, rx) = creds::channel();
    let d = Dispatcher::new(Arc::new(Pool::new(Arc::new(TlsCache::new(rx)))));
    let policy = |on: &[RetryOn]| TrafficPolicy {
        source: "shop/refuse".into(),
        retries: Some(retries(2, on)),
        ..Default::default()
    };
    let on_connect = service(
        "connect",
        &[addr],
        Protocol::Http2,
        Some(policy(&[RetryOn::ConnectFailure])),
    );
    let on_reset = service(
        "reset",
        &[addr],
        Protocol::Http2,
        Some(policy(&[RetryOn::Reset])),
    );
    let none = service("none", &[addr], Protocol::Http2, None);
    d.update(&config(vec![
        on_connect.clone(),
        on_reset.clone(),
        none.clone(),
    ]));

    for svc in [&on_connect, &on_reset] {
        let a = send(&d, svc, post()).await;
        assert_eq!(a.status, 200, "{}: {:?}", svc.name, a.outcome);
        assert_eq!(a.body.as_ref().unwrap(), &Bytes::from_static(b"ok"));
        assert_eq!(
            a.outcome.attempts, 2,
            "{}: refused once, then served",
            svc.name
        );
    }
    assert_eq!(streams.load(Ordering::SeqCst), 4);

    // Without a retry policy the refusal is the answer: 503 with the overflow flag, one try.
    let a = send(&d, &none, post()).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.outcome.attempts, 1);
    assert_eq!(a.outcome.flags, vec!["UO"]);
}
