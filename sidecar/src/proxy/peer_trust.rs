//! Retiring long-lived mTLS connections whose peer is no longer trusted.
//!
//! A handshake proves the peer's certificate once. A pooled HTTP/2 connection is re-checked by
//! the pool before each request (see [`super::upstream`]), but an opaque TCP splice, an upgraded
//! (WebSocket) tunnel or an inbound connection can live for days, far past the peer's
//! certificate (24 h by default) and past a root rotation that removed the peer's root from the
//! bundle. Each of those holds a [`PeerTrust`] taken at the handshake and closes gracefully
//! (TLS close_notify and FIN; an HTTP connection finishes the requests in flight) when
//! [`PeerTrust::revoked`] resolves: at the peer leaf's notAfter, or at the first credentials
//! change under which the peer's chain no longer verifies.
//!
//! Pure core: [`PeerTrust::holds`] (chain, role, credentials, time -> trusted or not). Edge:
//! [`PeerTrust::revoked`], a timer plus the credentials watch.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::CommonState;
use rustls_pki_types::CertificateDer;

use crate::creds::{Credentials, CredentialsRx};

/// Longest single sleep while waiting for notAfter: far-future certificates (a test CA's, a
/// clock that jumps) are re-read at least this often instead of trusting one huge timer.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// Which verifier the peer's chain answered to at the handshake, and answers to again.
#[derive(Clone, Debug)]
enum Role {
    /// The peer was the server (we connected out): its SPIFFE ID must be one of these.
    Server { expected: Arc<[String]> },
    /// The peer was the client (it connected in): any SPIFFE ID of our trust domain.
    Client,
}

/// The verified peer chain of one mTLS connection and when it stops being valid.
#[derive(Clone, Debug)]
pub struct PeerTrust {
    chain: Arc<[CertificateDer<'static>]>,
    expires: SystemTime,
    role: Role,
}

impl PeerTrust {
    /// For a connection we opened to a server expected to be one of `expected`. `None` when the
    /// handshake left no readable chain (rustls always keeps the chain it verified).
    pub fn of_server(conn: &CommonState, expected: &Arc<[String]>) -> Option<Self> {
        Self::from_conn(
            conn,
            Role::Server {
                expected: expected.clone(),
            },
        )
    }

    /// For a connection a mesh client opened to us.
    pub fn of_client(conn: &CommonState) -> Option<Self> {
        Self::from_conn(conn, Role::Client)
    }

    fn from_conn(conn: &CommonState, role: Role) -> Option<Self> {
        let chain: Arc<[CertificateDer<'static>]> = conn
            .peer_certificates()?
            .iter()
            .map(|c| c.clone().into_owned())
            .collect();
        let expires = crate::tls::not_after_of(chain.first()?).ok()?;
        Some(Self {
            chain,
            expires,
            role,
        })
    }

    /// When the peer's leaf expires.
    pub fn expires(&self) -> SystemTime {
        self.expires
    }

    /// Whether the connection may stay open at `now` under `creds`: the leaf has not expired
    /// and, when credentials are known, the chain still verifies against their bundle. No
    /// credentials (never loaded) judge nothing: the handshake's verdict stands.
    pub fn holds(&self, creds: Option<&Credentials>, now: SystemTime) -> bool {
        if now >= self.expires {
            return false;
        }
        let Some(creds) = creds else {
            return true;
        };
        match &self.role {
            Role::Server { expected } => {
                crate::tls::verify_server_chain(creds, &self.chain, expected).is_ok()
            }
            Role::Client => crate::tls::verify_client_chain(creds, &self.chain).is_ok(),
        }
    }

    /// Resolves when the connection must close: at notAfter, or when a credentials change
    /// leaves the chain unverifiable. Never resolves otherwise (cancel-safe: drop it).
    pub async fn revoked(&self, mut creds: CredentialsRx) {
        let mut watching = true;
        loop {
            let left = self
                .expires
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            if left.is_zero() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(left.min(MAX_SLEEP)) => {}
                changed = creds.changed(), if watching => {
                    if changed.is_err() {
                        // The credentials source is gone: only the expiry remains to wait for.
                        watching = false;
                        continue;
                    }
                    let current = creds.borrow_and_update().clone();
                    if !self.holds(current.as_deref(), SystemTime::now()) {
                        return;
                    }
                }
            }
        }
    }
}

/// [`PeerTrust::revoked`] for an optional trust (plaintext connections have none and are never
/// revoked by this).
pub async fn revoked(trust: Option<PeerTrust>, creds: CredentialsRx) {
    match trust {
        Some(t) => t.revoked(creds).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::testutil::TestCa;
    use time::OffsetDateTime;

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/db";

    fn trust(ca: &TestCa, role: Role, life: time::Duration) -> PeerTrust {
        let now = OffsetDateTime::now_utc();
        let (leaf, _) = ca.leaf_between(ID, now - time::Duration::minutes(1), now + life);
        PeerTrust {
            expires: crate::tls::not_after_of(&leaf).unwrap(),
            chain: Arc::from(vec![leaf]),
            role,
        }
    }

    fn server_role() -> Role {
        Role::Server {
            expected: Arc::from(vec![ID.to_string()]),
        }
    }

    #[test]
    fn holds_until_expiry_and_while_the_root_is_trusted() {
        let (a, b) = (TestCa::new("a"), TestCa::new("b"));
        let both = b.creds("spiffe://cluster.local/ns/shop/sa/me", &[&a, &b]);
        let only_b = b.creds("spiffe://cluster.local/ns/shop/sa/me", &[&b]);
        for role in [server_role(), Role::Client] {
            let t = trust(&a, role, time::Duration::hours(1));
            let now = SystemTime::now();
            assert!(t.holds(Some(&both), now));
            assert!(t.holds(None, now));
            assert!(!t.holds(Some(&only_b), now), "root left the bundle");
            assert!(!t.holds(None, t.expires()), "expired");
        }
        // A server that is no longer one of the expected identities is not trusted either.
        let t = trust(
            &a,
            Role::Server {
                expected: Arc::from(vec!["spiffe://cluster.local/ns/shop/sa/other".to_string()]),
            },
            time::Duration::hours(1),
        );
        assert!(!t.holds(Some(&both), SystemTime::now()));
    }

    #[tokio::test]
    async fn revoked_fires_when_a_reload_drops_the_root_not_before() {
        let (a, b) = (TestCa::new("a"), TestCa::new("b"));
        let me = "spiffe://cluster.local/ns/shop/sa/me";
        let (tx, rx) = crate::creds::channel();
        tx.send_replace(Some(Arc::new(b.creds(me, &[&a, &b]))));
        let t = trust(&a, Role::Client, time::Duration::hours(1));
        let fut = t.revoked(rx);
        tokio::pin!(fut);
        // A renewal that keeps the root changes nothing.
        tx.send_replace(Some(Arc::new(b.creds(me, &[&a, &b]))));
        assert!(
            tokio::time::timeout(Duration::from_millis(100), fut.as_mut())
                .await
                .is_err()
        );
        tx.send_replace(Some(Arc::new(b.creds(me, &[&b]))));
        tokio::time::timeout(Duration::from_secs(1), fut)
            .await
            .expect("revoked once the root is gone");
    }
}
