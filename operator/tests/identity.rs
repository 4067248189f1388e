//! The identity endpoint over real TLS, with TokenReviews answered from recorded API server
//! exchanges (tower-test). Every refusal must carry a clear reason and issue nothing.

mod identity_support;
mod support;

use std::time::Duration;

use identity_support::*;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use support::net::closed_within;
use trellis_operator::identity::{CERTIFICATE_PATH, IdentityConfig};
use trellis_proxy::conn_limit::ConnLimits;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.projected.token";
const REVIEWS: &str = "spiffe://cluster.local/ns/shop/sa/reviews";

fn metrics_text(ep: &Endpoint) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &ep.registry).unwrap();
    out
}

/// Posts and expects a refusal with `status` whose message contains `why`; nothing issued.
async fn refused(ep: &Endpoint, token: Option<&str>, body: Vec<u8>, status: u16, why: &str) {
    let (code, json) = post(ep.addr, &ep.bundle_pem(), CERTIFICATE_PATH, token, body).await;
    assert_eq!(code, status, "{json}");
    let msg = json["error"].as_str().expect("error field");
    assert!(msg.contains(why), "{msg:?} should mention {why:?}");
    assert!(json.get("certificateChain").is_none());
    assert_eq!(ep.service.metrics().issued(), 0, "nothing may be issued");
}

#[tokio::test]
async fn issues_only_the_proven_identity() {
    let (ep, mut api) = start(Duration::from_secs(3600), IdentityConfig::default()).await;
    for sans in [vec![REVIEWS], vec![]] {
        let (key, csr) = csr(&sans);
        let client = async {
            post(
                ep.addr,
                &ep.bundle_pem(),
                CERTIFICATE_PATH,
                Some(TOKEN),
                body(&csr),
            )
            .await
        };
        let ((code, json), ()) = tokio::join!(
            client,
            api.token_review(TOKEN, review_allowed("shop", "reviews"))
        );
        assert_eq!(code, 200, "{json}");
        let chain: Vec<_> =
            CertificateDer::pem_slice_iter(json["certificateChain"].as_str().unwrap().as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        assert_eq!(chain.len(), 1);
        let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names, vec![GeneralName::URI(REVIEWS)]);
        assert_eq!(
            leaf.public_key().raw,
            rcgen::PublicKeyData::subject_public_key_info(&key)
        );
        let (_, root) = X509Certificate::from_der(ep.ca.cert_der()).unwrap();
        leaf.verify_signature(Some(root.public_key())).unwrap();
        assert_eq!(json["trustBundle"], ep.ca.roots_pem());
        let not_after: jiff::Timestamp = json["notAfter"].as_str().unwrap().parse().unwrap();
        assert_eq!(not_after.as_second(), leaf.validity().not_after.timestamp());
    }
    api.no_more_calls().await;
    assert_eq!(ep.service.metrics().issued(), 2);
    let text = metrics_text(&ep);
    assert!(
        text.contains("trellis_identity_issuances_total 2"),
        "{text}"
    );
    assert!(
        text.contains("trellis_identity_request_duration_seconds_count 2"),
        "{text}"
    );
    ep.stop().await;
}

#[tokio::test]
async fn refuses_denied_unauthenticated_wrong_audience_and_unbound_tokens() {
    let (ep, mut api) = start(Duration::from_secs(3600), IdentityConfig::default()).await;
    let (_, csr) = csr(&[REVIEWS]);
    let cases = [
        (
            review_denied(
                "[invalid bearer token, square/go-jose: error in cryptographic primitive]",
            ),
            401,
            "not authenticated: [invalid bearer token",
        ),
        (
            serde_json::json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {}, "spec": {"token": "x"}, "status": {"authenticated": false, "user": {}}}),
            401,
            "not authenticated",
        ),
        (
            review_denied(
                r#"[invalid bearer token, token audiences ["https://kubernetes.default.svc"] is invalid for the target audiences ["trellis"]]"#,
            ),
            401,
            "is invalid for the target audiences",
        ),
        (
            review_other_audience("shop", "reviews"),
            401,
            "audience \"trellis\"",
        ),
        (
            review_legacy_token("shop", "reviews"),
            403,
            "not bound to a pod",
        ),
        (
            serde_json::json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {}, "spec": {"token": "x"}, "status": {"authenticated": true, "audiences": ["trellis"], "user": {"username": "alice", "extra": {"authentication.kubernetes.io/pod-name": ["p"]}}}}),
            403,
            "not a service account",
        ),
    ];
    // One token per case: a refused token's review is cached, so sending the same token again
    // would be answered without asking the API server.
    for (i, (answer, status, why)) in cases.into_iter().enumerate() {
        let token = format!("{TOKEN}{i}");
        let ((), ()) = tokio::join!(
            refused(&ep, Some(&token), body(&csr), status, why),
            api.token_review(&token, answer)
        );
    }
    api.no_more_calls().await;
    let text = metrics_text(&ep);
    for reason in [
        "unauthenticated\"} 3",
        "wrong_audience\"} 1",
        "not_bound\"} 1",
        "not_service_account\"} 1",
    ] {
        assert!(
            text.contains(&format!(
                "trellis_identity_rejections_total{{reason=\"{reason}"
            )),
            "{reason}\n{text}"
        );
    }
    ep.stop().await;
}

#[tokio::test]
async fn refuses_csrs_for_other_identities_weak_keys_and_garbage() {
    let (ep, mut api) = start(Duration::from_secs(3600), IdentityConfig::default()).await;
    let other_sa = csr(&["spiffe://cluster.local/ns/shop/sa/payments"]).1;
    let extra_san = csr(&[REVIEWS, "reviews.shop.svc"]).1;
    let p384 = {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap()
    };
    let rsa = include_str!("../src/ca/testdata/rsa2048.csr").to_string();
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            body(&other_sa),
            403,
            "spiffe://cluster.local/ns/shop/sa/payments",
        ),
        (body(&extra_san), 403, "dns:reviews.shop.svc"),
        (
            body("-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"),
            400,
            "malformed CSR",
        ),
        (body("not a csr"), 400, "malformed CSR"),
        (body(&p384), 400, "workload keys must be ECDSA P-256"),
        (body(&rsa), 400, "RSA-2048 key"),
    ];
    for (b, status, why) in cases {
        let ((), ()) = tokio::join!(
            refused(&ep, Some(TOKEN), b, status, why),
            api.token_review(TOKEN, review_allowed("shop", "reviews"))
        );
    }
    // Refused before any TokenReview: no token, bad JSON, oversized body, unknown path.
    refused(&ep, None, body(&other_sa), 401, "Authorization: Bearer").await;
    refused(
        &ep,
        Some(TOKEN),
        b"{\"csr\": 1}".to_vec(),
        400,
        "invalid request body",
    )
    .await;
    refused(
        &ep,
        Some(TOKEN),
        b"{\"csr\": \"x\", \"spiffeId\": \"spiffe://x/y\"}".to_vec(),
        400,
        "unknown field",
    )
    .await;
    let huge = body(&"A".repeat(20 * 1024));
    refused(&ep, Some(TOKEN), huge, 413, "larger than 16384 bytes").await;
    let (code, _) = post(
        ep.addr,
        &ep.bundle_pem(),
        "/v1/other",
        Some(TOKEN),
        body("x"),
    )
    .await;
    assert_eq!(code, 404);
    api.no_more_calls().await;
    let text = metrics_text(&ep);
    for reason in [
        "foreign_identity\"} 2",
        "malformed_csr\"} 2",
        "weak_key\"} 2",
        "too_large\"} 1",
        "missing_token\"} 1",
    ] {
        assert!(
            text.contains(&format!("reason=\"{reason}")),
            "{reason}\n{text}"
        );
    }
    ep.stop().await;
}

#[tokio::test]
async fn rate_limits_per_identity() {
    let config = IdentityConfig {
        rate_burst: 2.0,
        rate_per_sec: 0.001,
        ..IdentityConfig::default()
    };
    let (ep, mut api) = start(Duration::from_secs(3600), config).await;
    let bundle = ep.bundle_pem();
    let (_, req) = csr(&[]);
    for _ in 0..2 {
        let ((code, _), ()) = tokio::join!(
            post(ep.addr, &bundle, CERTIFICATE_PATH, Some(TOKEN), body(&req)),
            api.token_review(TOKEN, review_allowed("shop", "reviews"))
        );
        assert_eq!(code, 200);
    }
    let ((code, json), ()) = tokio::join!(
        post(ep.addr, &bundle, CERTIFICATE_PATH, Some(TOKEN), body(&req)),
        api.token_review(TOKEN, review_allowed("shop", "reviews"))
    );
    assert_eq!(code, 429, "{json}");
    assert!(json["error"].as_str().unwrap().contains("shop/reviews"));
    // Another identity has its own bucket.
    let ((code, _), ()) = tokio::join!(
        post(ep.addr, &bundle, CERTIFICATE_PATH, Some(TOKEN), body(&req)),
        api.token_review(TOKEN, review_allowed("shop", "ratings"))
    );
    assert_eq!(code, 200);
    assert_eq!(ep.service.metrics().issued(), 3);
    ep.stop().await;
}

#[tokio::test]
async fn token_review_outage_is_a_503_and_issues_nothing() {
    let (ep, mut api) = start(Duration::from_secs(3600), IdentityConfig::default()).await;
    let bundle = ep.bundle_pem();
    let (_, req) = csr(&[]);
    let client = post(ep.addr, &bundle, CERTIFICATE_PATH, Some(TOKEN), body(&req));
    let server = async {
        let (_, send) = api.0.next_request().await.unwrap();
        send.send_response(
            http::Response::builder()
                .status(500)
                .body(kube::client::Body::from(
                    br#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"etcdserver: request timed out","reason":"InternalError","code":500}"#.to_vec(),
                ))
                .unwrap(),
        );
    };
    let ((code, json), ()) = tokio::join!(client, server);
    assert_eq!(code, 503, "{json}");
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("TokenReview failed")
    );
    assert_eq!(ep.service.metrics().issued(), 0);
    ep.stop().await;
}

/// Issue 13 item 6: a garbage token costs one TokenReview, then is answered from the cache;
/// a source sending many garbage tokens is limited before any TokenReview, while other
/// sources are still served.
#[tokio::test]
async fn garbage_tokens_cannot_make_one_token_review_per_request() {
    let config = IdentityConfig {
        source_burst: 5.0,
        source_per_sec: 0.001,
        ..IdentityConfig::default()
    };
    let (ep, mut api) = start(Duration::from_secs(3600), config).await;
    let bundle = ep.bundle_pem();
    let (_, req) = csr(&[]);
    // The same garbage token three times: one review.
    let ((code, _), ()) = tokio::join!(
        post(
            ep.addr,
            &bundle,
            CERTIFICATE_PATH,
            Some("garbage"),
            body(&req)
        ),
        api.token_review("garbage", review_denied("[invalid bearer token]"))
    );
    assert_eq!(code, 401);
    for _ in 0..2 {
        let (code, json) = post(
            ep.addr,
            &bundle,
            CERTIFICATE_PATH,
            Some("garbage"),
            body(&req),
        )
        .await;
        assert_eq!(code, 401, "{json}");
        assert!(
            json["error"]
                .as_str()
                .unwrap()
                .contains("not authenticated"),
            "{json}"
        );
    }
    api.no_more_calls().await;
    // Fresh garbage from the same source: two more reviews use up its budget of 5 requests.
    for i in 0..2 {
        let token = format!("garbage-{i}");
        let ((code, _), ()) = tokio::join!(
            post(ep.addr, &bundle, CERTIFICATE_PATH, Some(&token), body(&req)),
            api.token_review(&token, review_denied("[invalid bearer token]"))
        );
        assert_eq!(code, 401);
    }
    for i in 2..50 {
        let token = format!("garbage-{i}");
        let (code, json) = post(ep.addr, &bundle, CERTIFICATE_PATH, Some(&token), body(&req)).await;
        assert_eq!(code, 429, "{json}");
        assert!(
            json["error"].as_str().unwrap().contains("127.0.0.1"),
            "{json}"
        );
    }
    api.no_more_calls().await;
    assert_eq!(ep.service.metrics().token_reviews(), 3);
    // Another pod (source address) is served meanwhile.
    let other: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let ((code, json), ()) = tokio::join!(
        post_from(
            other,
            ep.addr,
            &bundle,
            CERTIFICATE_PATH,
            Some(TOKEN),
            body(&req)
        ),
        api.token_review(TOKEN, review_allowed("shop", "reviews"))
    );
    assert_eq!(code, 200, "{json}");
    let text = metrics_text(&ep);
    assert!(
        text.contains("reason=\"source_rate_limited\"} 48"),
        "{text}"
    );
    assert!(
        text.contains("trellis_identity_review_cache_hits_total 2"),
        "{text}"
    );
    ep.stop().await;
}

/// An accepted token is reviewed once and reused until it expires (capped), so a sidecar's
/// retries do not each cost a TokenReview.
#[tokio::test]
async fn a_valid_token_is_reviewed_once_while_it_is_valid() {
    let (ep, mut api) = start(Duration::from_secs(3600), IdentityConfig::default()).await;
    let bundle = ep.bundle_pem();
    let token = jwt_expiring_in(3600, "a");
    let (_, req) = csr(&[]);
    let ((code, _), ()) = tokio::join!(
        post(ep.addr, &bundle, CERTIFICATE_PATH, Some(&token), body(&req)),
        api.token_review(&token, review_allowed("shop", "reviews"))
    );
    assert_eq!(code, 200);
    let (code, json) = post(ep.addr, &bundle, CERTIFICATE_PATH, Some(&token), body(&req)).await;
    assert_eq!(code, 200, "{json}");
    api.no_more_calls().await;
    assert_eq!(ep.service.metrics().issued(), 2);
    assert_eq!(ep.service.metrics().token_reviews(), 1);
    // An already expired token is never cached: each use is reviewed (and the API server
    // refuses it).
    let expired = jwt_expiring_in(0, "b");
    for _ in 0..2 {
        let ((code, _), ()) = tokio::join!(
            post(
                ep.addr,
                &bundle,
                CERTIFICATE_PATH,
                Some(&expired),
                body(&req)
            ),
            api.token_review(&expired, review_allowed("shop", "reviews"))
        );
        assert_eq!(code, 200);
    }
    ep.stop().await;
}

/// At most `max_in_flight` requests are processed at once: past it, 503 without a
/// TokenReview.
#[tokio::test]
async fn requests_past_the_concurrency_limit_get_503_without_a_token_review() {
    let config = IdentityConfig {
        max_in_flight: 1,
        ..IdentityConfig::default()
    };
    let (ep, mut api) = start(Duration::from_secs(3600), config).await;
    let bundle = ep.bundle_pem();
    let (_, req) = csr(&[]);
    let first = tokio::spawn({
        let bundle = bundle.clone();
        let req = req.clone();
        let addr = ep.addr;
        async move { post(addr, &bundle, CERTIFICATE_PATH, Some(TOKEN), body(&req)).await }
    });
    // The first request's TokenReview arrives and is held: it occupies the one slot.
    let (review, send) = tokio::time::timeout(Duration::from_secs(5), api.0.next_request())
        .await
        .unwrap()
        .unwrap();
    drop(review);
    let (code, json) = post(ep.addr, &bundle, CERTIFICATE_PATH, Some(TOKEN), body(&req)).await;
    assert_eq!(code, 503, "{json}");
    assert!(
        json["error"].as_str().unwrap().contains("in flight"),
        "{json}"
    );
    api.no_more_calls().await;
    send.send_response(
        http::Response::builder()
            .status(201)
            .body(kube::client::Body::from(
                serde_json::to_vec(&review_allowed("shop", "reviews")).unwrap(),
            ))
            .unwrap(),
    );
    let (code, _) = first.await.unwrap();
    assert_eq!(code, 200);
    ep.stop().await;
}

/// An oversized token is refused without a TokenReview.
#[tokio::test]
async fn an_oversized_token_is_refused_without_a_token_review() {
    let (ep, mut api) = start(Duration::from_secs(3600), IdentityConfig::default()).await;
    let (_, req) = csr(&[]);
    let huge = "a".repeat(trellis_operator::identity::MAX_TOKEN_BYTES + 1);
    refused(&ep, Some(&huge), body(&req), 401, "longer than").await;
    api.no_more_calls().await;
    ep.stop().await;
}

/// A TLS connection from `source` speaking HTTP/2 (the preface and an empty SETTINGS), then
/// idle: HTTP/2 has no header timeout between requests and hyper's server no idle timeout.
async fn idle_h2(
    ep: &Endpoint,
    source: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use tokio::io::AsyncWriteExt;
    let mut tls = tls_from(source.parse().unwrap(), ep.addr, &ep.bundle_pem()).await?;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await?;
    Ok(tls)
}

fn connection_limits(tune: impl FnOnce(&mut ConnLimits)) -> IdentityConfig {
    let mut config = IdentityConfig::default();
    tune(&mut config.connections);
    config
}

#[tokio::test]
async fn an_idle_http2_connection_ends_at_its_age() {
    let config = connection_limits(|c| {
        c.max_age = Duration::from_millis(500);
        c.drain = Duration::from_millis(500);
    });
    let (ep, _api) = start(Duration::from_secs(3600), config).await;
    let mut idle = idle_h2(&ep, "127.0.0.1").await.unwrap();
    assert!(
        closed_within(&mut idle, Duration::from_secs(4)).await,
        "an idle HTTP/2 connection stayed open past its age and the drain"
    );
    ep.stop().await;
}

#[tokio::test]
async fn connections_past_the_per_source_cap_are_closed_and_other_pods_are_served() {
    let config = connection_limits(|c| c.max_connections_per_peer = 3);
    let (ep, _api) = start(Duration::from_secs(3600), config).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(idle_h2(&ep, "127.0.0.1").await.unwrap());
    }
    match idle_h2(&ep, "127.0.0.1").await {
        Err(_) => {}
        Ok(mut extra) => assert!(
            closed_within(&mut extra, Duration::from_secs(2)).await,
            "a connection past the per-source cap was kept"
        ),
    }
    for c in &mut held {
        assert!(!closed_within(c, Duration::from_millis(100)).await);
    }
    // Another pod is answered (a refusal for its missing token, decided without a review).
    let (code, _) = post_from(
        "127.0.0.2".parse().unwrap(),
        ep.addr,
        &ep.bundle_pem(),
        CERTIFICATE_PATH,
        None,
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(code, 401);
    drop(held);
    ep.stop().await;
}
