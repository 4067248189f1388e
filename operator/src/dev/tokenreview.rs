//! The local stand-in for the Kubernetes TokenReview API, used only by `trellis dev`.
//!
//! In a cluster the identity endpoint proves who a sidecar is by sending its projected
//! ServiceAccount token to the API server (`POST /apis/authentication.k8s.io/v1/tokenreviews`).
//! Locally there is no API server, so `trellis dev` mints one opaque random token per pod,
//! writes it into that pod's projected volume (as kubelet would), and answers TokenReviews for
//! exactly those tokens from this in-process service. The identity endpoint code is unchanged:
//! it talks to a real `kube::Client`, whose transport is this service instead of HTTPS to a
//! cluster. Tokens it did not mint, and reviews that do not ask for the `trellis` audience, are
//! answered `authenticated: false`, as the API server would.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};

/// The audience every minted token carries (the sidecar's projected token audience).
pub const AUDIENCE: &str = "trellis";
const PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// Who a minted token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenOwner {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
}

/// The tokens this process minted. Cloning shares the set.
#[derive(Clone, Default)]
pub struct TokenAuthority {
    tokens: Arc<Mutex<BTreeMap<String, TokenOwner>>>,
}

impl TokenAuthority {
    /// Mints a fresh random token for a pod.
    pub fn mint(&self, owner: TokenOwner) -> String {
        let bytes: [u8; 32] = rand::random();
        let token = format!("trellis-dev.{}", hex::encode(bytes));
        self.tokens
            .lock()
            .expect("token set poisoned")
            .insert(token.clone(), owner);
        token
    }

    fn lookup(&self, token: &str) -> Option<TokenOwner> {
        self.tokens
            .lock()
            .expect("token set poisoned")
            .get(token)
            .cloned()
    }

    /// Answers one TokenReview, as the API server would for a bound ServiceAccount token.
    pub fn review(&self, review: &TokenReview) -> TokenReviewStatus {
        let denied = |why: &str| TokenReviewStatus {
            authenticated: Some(false),
            error: Some(why.to_string()),
            ..Default::default()
        };
        let Some(owner) = self.lookup(&review.spec.token) else {
            return denied("token not minted by this `trellis dev` (local TokenReview stand-in)");
        };
        // Requested audiences must intersect the token's; none requested means the API
        // server's own audience, which these tokens do not carry.
        let wanted = review.spec.audiences.clone().unwrap_or_default();
        if !wanted.iter().any(|a| a == AUDIENCE) {
            return denied("token audiences [trellis] do not match the requested audiences");
        }
        let extra = BTreeMap::from([
            (
                "authentication.kubernetes.io/pod-name".to_string(),
                vec![owner.pod_name.clone()],
            ),
            (
                "authentication.kubernetes.io/pod-uid".to_string(),
                vec![owner.pod_uid.clone()],
            ),
        ]);
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec![AUDIENCE.to_string()]),
            error: None,
            user: Some(UserInfo {
                username: Some(format!(
                    "system:serviceaccount:{}:{}",
                    owner.namespace, owner.service_account
                )),
                uid: Some(format!(
                    "dev-sa-{}-{}",
                    owner.namespace, owner.service_account
                )),
                groups: Some(vec![
                    "system:serviceaccounts".to_string(),
                    format!("system:serviceaccounts:{}", owner.namespace),
                    "system:authenticated".to_string(),
                ]),
                extra: Some(extra),
            }),
        }
    }

    /// Serves one HTTP request the way the API server's TokenReview endpoint does; anything
    /// else gets a 404 `Status`, so a caller needing more than TokenReview fails loudly.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: http_body::Body,
        B::Error: std::fmt::Display,
    {
        let status = |code: StatusCode, reason: &str, message: String| {
            let body = serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16(),
            });
            let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
            *r.status_mut() = code;
            r.headers_mut()
                .insert("content-type", "application/json".parse().expect("static"));
            r
        };
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        if method != Method::POST || path != PATH {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("trellis dev answers only TokenReview (POST {PATH}); got {method} {path}"),
            );
        }
        let bytes = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string());
            }
        };
        let mut review: TokenReview = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("not a TokenReview: {e}"),
                );
            }
        };
        review.status = Some(self.review(&review));
        // The API server never echoes the token back.
        review.spec.token = String::new();
        let mut r = Response::new(Full::new(Bytes::from(
            serde_json::to_vec(&review).expect("TokenReview serializes"),
        )));
        *r.status_mut() = StatusCode::CREATED;
        r.headers_mut()
            .insert("content-type", "application/json".parse().expect("static"));
        r
    }

    /// A `kube::Client` whose only backend is this stand-in.
    pub fn client(&self) -> kube::Client {
        let this = self.clone();
        let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.handle(req).await) }
        });
        kube::Client::new(svc, "default")
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::TokenReviewSpec;
    use kube::api::PostParams;

    use super::*;

    fn owner() -> TokenOwner {
        TokenOwner {
            namespace: "shop".into(),
            service_account: "catalog".into(),
            pod_name: "catalog-0".into(),
            pod_uid: "uid-1".into(),
        }
    }

    async fn review_via_kube(
        auth: &TokenAuthority,
        token: &str,
        aud: &[&str],
    ) -> TokenReviewStatus {
        let api: kube::Api<TokenReview> = kube::Api::all(auth.client());
        let tr = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(aud.iter().map(|s| s.to_string()).collect()),
            },
            ..Default::default()
        };
        api.create(&PostParams::default(), &tr)
            .await
            .expect("kube client round trip")
            .status
            .expect("status")
    }

    #[tokio::test]
    async fn answers_minted_tokens_through_a_kube_client() {
        let auth = TokenAuthority::default();
        let token = auth.mint(owner());
        let st = review_via_kube(&auth, &token, &["trellis"]).await;
        assert_eq!(st.authenticated, Some(true));
        let user = st.user.unwrap();
        assert_eq!(
            user.username.as_deref(),
            Some("system:serviceaccount:shop:catalog")
        );
        assert_eq!(
            user.extra.unwrap()["authentication.kubernetes.io/pod-name"],
            vec!["catalog-0".to_string()]
        );
        let wrong_aud = review_via_kube(&auth, &token, &["https://kubernetes.default.svc"]).await;
        assert_eq!(wrong_aud.authenticated, Some(false));
        let unknown = review_via_kube(&auth, "trellis-dev.nope", &["trellis"]).await;
        assert_eq!(unknown.authenticated, Some(false));
        assert!(unknown.error.unwrap().contains("not minted"));
    }

    #[tokio::test]
    async fn other_api_calls_fail_loudly() {
        let auth = TokenAuthority::default();
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(auth.client(), "shop");
        let e = pods
            .list(&Default::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("only TokenReview"), "{e}");
    }
}
