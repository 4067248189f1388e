//! Recorded API exchanges for the controllers' thin API layer (`tower_test::mock::pair`, the
//! `ApiServerVerifier` pattern of kube-rs controller-rs): every request is checked for method,
//! path and body, in order, and answered with a recorded reply; "no request" is proved by
//! seeing the client dropped, or by virtual time passing, with nothing sent.
#![allow(dead_code)]

use std::time::Duration;

use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One expected request and the reply to give.
pub struct Exchange {
    pub method: Method,
    pub path_and_query: String,
    /// Checks the JSON body (`Null` when empty).
    pub check: Box<dyn FnOnce(&Value) + Send>,
    /// `Null` echoes the request body, as the API server does for an apply.
    pub reply: Value,
    pub status: u16,
}

pub fn exchange(
    method: Method,
    pq: &str,
    check: impl FnOnce(&Value) + Send + 'static,
    reply: Value,
) -> Exchange {
    Exchange {
        method,
        path_and_query: pq.into(),
        check: Box::new(check),
        reply,
        status: 200,
    }
}

/// A `Status` failure body.
pub fn api_status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// The operator namespaces the tests install into: the Role's rules hold in these.
pub const OPERATOR_NAMESPACES: [&str; 3] = ["trellis-system", "mesh-ops", "operators"];

/// Every request the code makes must be granted by the install's RBAC
/// (`trellis_operator::rbac::RULES`, which `config/rbac` must say), unless the recorded reply is
/// the API server's 403 (the test is about being refused).
pub fn assert_granted(ex: &Exchange) {
    let Some(r) = trellis_operator::rbac::Request::of(ex.method.as_str(), &ex.path_and_query)
    else {
        return;
    };
    let granted = OPERATOR_NAMESPACES
        .iter()
        .any(|ns| trellis_operator::rbac::allows(&r, ns));
    assert!(
        granted || ex.status == 403,
        "{} {} is not granted by the operator's RBAC (operator/src/rbac.rs, config/rbac): {r:?}",
        ex.method,
        ex.path_and_query
    );
}

/// A reply sent as these bytes, not as JSON: what a service or pod proxy relays (a proxy's
/// `/metrics`, a webhook's plain-text error).
pub fn text_reply(text: &str) -> Value {
    json!({ TEXT_REPLY: text })
}

const TEXT_REPLY: &str = "$recorded-text";

/// A client whose every request goes to the returned handle.
pub fn mock() -> (Client, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

/// The API server side of a client.
pub struct ApiServer(pub Handle);

impl ApiServer {
    /// The next request must arrive within `within` and match `ex`; it gets `ex`'s reply.
    /// A server-side apply must say so in its content type.
    pub async fn expect(&mut self, within: Duration, ex: Exchange) {
        self.expect_as(within, ex, true).await
    }

    /// [`ApiServer::expect`], checking the request against the operator's RBAC only when
    /// `operator_rbac` (the `trellis` CLI runs with the user's credentials, not the operator's).
    pub async fn expect_as(&mut self, within: Duration, ex: Exchange, operator_rbac: bool) {
        let (req, send) = tokio::time::timeout(within, self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("no {} {} within {within:?}", ex.method, ex.path_and_query))
            .unwrap_or_else(|| {
                panic!(
                    "the client was dropped before {} {}",
                    ex.method, ex.path_and_query
                )
            });
        assert_eq!(
            (req.method(), req.uri().path_and_query().unwrap().as_str()),
            (&ex.method, ex.path_and_query.as_str()),
        );
        if operator_rbac {
            assert_granted(&ex);
        }
        if ex.method == Method::PATCH && ex.path_and_query.contains("fieldManager=") {
            assert_eq!(
                req.headers()["content-type"],
                "application/apply-patch+yaml",
                "{}",
                ex.path_and_query
            );
        }
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        let reply = if ex.reply.is_null() {
            body.clone()
        } else {
            ex.reply
        };
        (ex.check)(&body);
        let bytes = match reply.get(TEXT_REPLY).and_then(Value::as_str) {
            Some(text) => text.as_bytes().to_vec(),
            None => serde_json::to_vec(&reply).unwrap(),
        };
        send.send_response(
            Response::builder()
                .status(ex.status)
                .body(Body::from(bytes))
                .unwrap(),
        );
    }

    /// No request for `d`, and the client still alive.
    pub async fn expect_none_for(&mut self, d: Duration) {
        match tokio::time::timeout(d, self.0.next_request()).await {
            Err(_) => {}
            Ok(Some((req, _))) => panic!("unexpected request {} {}", req.method(), req.uri()),
            Ok(None) => panic!("the client was dropped"),
        }
    }

    /// Every client handle is dropped with no further request.
    pub async fn expect_no_more(mut self) {
        let next = tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
            .await
            .expect("the client was not dropped");
        if let Some((req, _)) = next {
            panic!("unexpected extra request {} {}", req.method(), req.uri());
        }
    }
}

/// Answers `expected` in order (each within 5 s), then requires that every client handle is
/// dropped with no further request.
pub fn verifier(handle: Handle, expected: Vec<Exchange>) -> tokio::task::JoinHandle<()> {
    verifier_as(handle, expected, true)
}

/// A [`verifier`] for the `trellis` CLI's requests, which run with the user's credentials and
/// so are not checked against the operator's RBAC.
pub fn user_verifier(handle: Handle, expected: Vec<Exchange>) -> tokio::task::JoinHandle<()> {
    verifier_as(handle, expected, false)
}

fn verifier_as(
    handle: Handle,
    expected: Vec<Exchange>,
    operator_rbac: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut server = ApiServer(handle);
        for ex in expected {
            server
                .expect_as(Duration::from_secs(5), ex, operator_rbac)
                .await;
        }
        server.expect_no_more().await;
    })
}
