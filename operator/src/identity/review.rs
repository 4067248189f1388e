//! Proving who is calling: a TokenReview of the caller's projected ServiceAccount token.
//!
//! The namespace and service account come from the review's `user.username`
//! (`system:serviceaccount:<ns>:<sa>`), never from the request. The token must have been
//! minted for our audience (the review is asked for `trellis` and the answer must include it),
//! and it must be a bound token: the API server adds the pod name to `user.extra` only for
//! tokens bound to a pod, which legacy Secret-based tokens (long-lived, not bound) are not.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

/// The audience projected tokens must be minted for.
pub const AUDIENCE: &str = "trellis";

/// The `user.extra` key the API server sets on pod-bound tokens.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

/// Who the TokenReview says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    /// The pod the token is bound to (for the audit log).
    pub pod: String,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ReviewError {
    #[error("token is not authenticated{}", .0.as_deref().map(|e| format!(": {e}")).unwrap_or_default())]
    Unauthenticated(Option<String>),
    #[error("token was not issued for audience {AUDIENCE:?}")]
    WrongAudience,
    #[error("caller {0:?} is not a service account")]
    NotServiceAccount(String),
    #[error("token is not bound to a pod (use a projected service account token)")]
    NotBound,
    #[error("TokenReview failed: {0}")]
    Unavailable(String),
}

impl ReviewError {
    /// Short stable label for the rejections metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ReviewError::Unauthenticated(_) => "unauthenticated",
            ReviewError::WrongAudience => "wrong_audience",
            ReviewError::NotServiceAccount(_) => "not_service_account",
            ReviewError::NotBound => "not_bound",
            ReviewError::Unavailable(_) => "token_review_unavailable",
        }
    }
}

/// Interprets a TokenReview answer. Pure, so every rule is tested without an API server.
pub fn caller_from_review(review: &TokenReview) -> Result<Caller, ReviewError> {
    let status = review
        .status
        .as_ref()
        .ok_or_else(|| ReviewError::Unauthenticated(Some("no status in the review".into())))?;
    if status.authenticated != Some(true) {
        return Err(ReviewError::Unauthenticated(
            status.error.clone().filter(|e| !e.is_empty()),
        ));
    }
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == AUDIENCE))
    {
        return Err(ReviewError::WrongAudience);
    }
    let user = status.user.as_ref();
    let username = user.and_then(|u| u.username.clone()).unwrap_or_default();
    let (namespace, service_account) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| is_dns_label(ns) && is_dns_subdomain(sa))
        .map(|(ns, sa)| (ns.to_string(), sa.to_string()))
        .ok_or_else(|| ReviewError::NotServiceAccount(username.clone()))?;
    let pod = user
        .and_then(|u| u.extra.as_ref())
        .and_then(|e| e.get(POD_NAME_EXTRA))
        .and_then(|v| v.first())
        .filter(|p| !p.is_empty())
        .cloned()
        .ok_or(ReviewError::NotBound)?;
    Ok(Caller {
        namespace,
        service_account,
        pod,
    })
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Asks the API server to review `token` for our audience.
pub async fn review_token(client: &kube::Client, token: &str) -> Result<Caller, ReviewError> {
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: token.to_string(),
            audiences: Some(vec![AUDIENCE.to_string()]),
        },
        ..Default::default()
    };
    let api: Api<TokenReview> = Api::all(client.clone());
    let answer = api
        .create(&PostParams::default(), &request)
        .await
        .map_err(|e| ReviewError::Unavailable(e.to_string()))?;
    caller_from_review(&answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};

    fn review(
        authenticated: bool,
        audiences: &[&str],
        username: &str,
        pod: Option<&str>,
    ) -> TokenReview {
        TokenReview {
            status: Some(TokenReviewStatus {
                authenticated: Some(authenticated),
                audiences: Some(audiences.iter().map(|s| s.to_string()).collect()),
                user: Some(UserInfo {
                    username: Some(username.into()),
                    extra: pod.map(|p| [(POD_NAME_EXTRA.to_string(), vec![p.to_string()])].into()),
                    ..Default::default()
                }),
                error: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn accepts_bound_service_account_token_for_our_audience() {
        let c = caller_from_review(&review(
            true,
            &["trellis"],
            "system:serviceaccount:shop:reviews",
            Some("reviews-7d9f"),
        ))
        .unwrap();
        assert_eq!(
            c,
            Caller {
                namespace: "shop".into(),
                service_account: "reviews".into(),
                pod: "reviews-7d9f".into()
            }
        );
    }

    #[test]
    fn refuses_each_failure_with_its_reason() {
        let sa = "system:serviceaccount:shop:reviews";
        assert_eq!(
            caller_from_review(&review(false, &["trellis"], sa, Some("p"))),
            Err(ReviewError::Unauthenticated(None))
        );
        assert_eq!(
            caller_from_review(&review(
                true,
                &["https://kubernetes.default.svc"],
                sa,
                Some("p")
            )),
            Err(ReviewError::WrongAudience)
        );
        assert_eq!(
            caller_from_review(&review(true, &["trellis"], sa, None)),
            Err(ReviewError::NotBound)
        );
        for user in [
            "alice",
            "system:serviceaccount:shop",
            "system:serviceaccount:Shop:x",
            "system:serviceaccount::x",
            "system:serviceaccount:a/b:x",
        ] {
            assert!(
                matches!(
                    caller_from_review(&review(true, &["trellis"], user, Some("p"))),
                    Err(ReviewError::NotServiceAccount(_))
                ),
                "{user}"
            );
        }
        assert!(matches!(
            caller_from_review(&TokenReview::default()),
            Err(ReviewError::Unauthenticated(_))
        ));
    }
}
