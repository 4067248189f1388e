//! What stands between a caller and a TokenReview: a token bucket per source address, and a
//! bounded cache of review results keyed by the token's SHA-256.
//!
//! The identity endpoint is reachable by every pod in the cluster, and each TokenReview is
//! work for the API server. Without these, any pod could make the API server review one
//! garbage token per request, as fast as it can send them. The per-source bucket bounds what
//! one pod can ask for; the cache answers a repeated token (garbage or valid) without asking
//! again; the endpoint's global concurrency limit (in [`super::IdentityService`]) bounds the
//! rest. All three are O(1) per request.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::review::{Caller, ReviewError};

/// Token buckets, one per key (a source address, an identity).
#[derive(Debug)]
pub struct RateLimiter<K = String> {
    burst: f64,
    per_sec: f64,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

/// Most buckets kept; past it, full buckets (which behave like new ones) are dropped.
const MAX_BUCKETS: usize = 100_000;

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(burst: f64, per_sec: f64) -> Self {
        Self {
            burst,
            per_sec,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key`; false when its bucket is empty.
    pub fn try_acquire(&self, key: &K, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > MAX_BUCKETS {
            let (burst, per_sec) = (self.burst, self.per_sec);
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * per_sec < burst
            });
        }
        let (tokens, at) = buckets.entry(key.clone()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_sec).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The SHA-256 of a token: what the cache keeps instead of the token itself.
pub type TokenHash = [u8; 32];

pub fn token_hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// How long review results are kept.
#[derive(Debug, Clone, Copy)]
pub struct CacheTtl {
    /// A positive result is kept until the token expires, but never longer than this: a
    /// token stops being valid when its pod is deleted, which the cache cannot see.
    pub max: Duration,
    /// A refusal (garbage, expired, wrong audience, unbound) is kept this long.
    pub negative: Duration,
}

/// A bounded cache of TokenReview results. Inserting into a full cache evicts the oldest
/// entry (FIFO), so memory is bounded whatever callers send.
#[derive(Debug)]
pub struct ReviewCache {
    capacity: usize,
    ttl: CacheTtl,
    inner: Mutex<CacheInner>,
}

#[derive(Debug, Default)]
struct CacheInner {
    entries: HashMap<TokenHash, (Result<Caller, ReviewError>, Instant)>,
    order: VecDeque<TokenHash>,
}

impl ReviewCache {
    pub fn new(capacity: usize, ttl: CacheTtl) -> Self {
        Self {
            capacity,
            ttl,
            inner: Mutex::default(),
        }
    }

    /// The cached result for `key`, if one is still valid at `now`.
    pub fn get(&self, key: &TokenHash, now: Instant) -> Option<Result<Caller, ReviewError>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .entries
            .get(key)
            .filter(|(_, until)| *until > now)
            .map(|(result, _)| result.clone())
    }

    /// Keeps `result` for the token `token` (hashed as `key`), for as long as
    /// [`valid_for`] says; results that must not be cached are ignored.
    pub fn put(
        &self,
        key: TokenHash,
        token: &str,
        result: &Result<Caller, ReviewError>,
        now: Instant,
        wall: SystemTime,
    ) {
        let Some(ttl) = valid_for(token, result, self.ttl, wall) else {
            return;
        };
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let CacheInner { entries, order } = &mut *inner;
        if entries.insert(key, (result.clone(), now + ttl)).is_none() {
            order.push_back(key);
        }
        while entries.len() > self.capacity {
            match order.pop_front() {
                Some(oldest) => {
                    entries.remove(&oldest);
                }
                None => break,
            }
        }
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How long a review result may be reused. Pure.
///
/// - An outage (`Unavailable`) is never cached: the next request must ask again.
/// - A refusal is cached for `ttl.negative`.
/// - An accepted token is cached until its `exp` claim, capped at `ttl.max`. The claim is read
///   from the JWT payload without checking the signature, which is safe only because the API
///   server has just authenticated this exact token. A token without a readable `exp` (or
///   already expired) is not cached.
pub fn valid_for(
    token: &str,
    result: &Result<Caller, ReviewError>,
    ttl: CacheTtl,
    now: SystemTime,
) -> Option<Duration> {
    match result {
        Err(ReviewError::Unavailable(_)) => None,
        Err(_) => Some(ttl.negative),
        Ok(_) => {
            let exp = jwt_expiry(token)?;
            let left = exp.duration_since(now).ok()?;
            (!left.is_zero()).then(|| left.min(ttl.max))
        }
    }
}

/// The `exp` claim of a JWT, if the token is one and carries it.
fn jwt_expiry(token: &str) -> Option<SystemTime> {
    #[derive(serde::Deserialize)]
    struct Claims {
        exp: Option<u64>,
    }
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Claims = serde_json::from_slice(&bytes).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(claims.exp?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(exp: u64) -> String {
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        format!(
            "{}.{}.sig",
            b64(serde_json::json!({"alg": "RS256"})),
            b64(serde_json::json!({"aud": ["trellis"], "exp": exp}))
        )
    }

    fn caller() -> Result<Caller, ReviewError> {
        Ok(Caller {
            namespace: "shop".into(),
            service_account: "reviews".into(),
            pod: "reviews-0".into(),
        })
    }

    const TTL: CacheTtl = CacheTtl {
        max: Duration::from_secs(300),
        negative: Duration::from_secs(60),
    };

    #[test]
    fn token_bucket_refills_and_is_per_key() {
        let l = RateLimiter::new(2.0, 1.0);
        let t0 = Instant::now();
        assert!(l.try_acquire(&"a", t0));
        assert!(l.try_acquire(&"a", t0));
        assert!(!l.try_acquire(&"a", t0));
        assert!(l.try_acquire(&"b", t0));
        assert!(!l.try_acquire(&"a", t0 + Duration::from_millis(500)));
        assert!(l.try_acquire(&"a", t0 + Duration::from_millis(1600)));
    }

    #[test]
    fn results_are_kept_until_the_token_expires_capped_and_outages_never() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs());
        // Expires in 100 s: kept 100 s.
        assert_eq!(
            secs(valid_for(&jwt(1_000_100), &caller(), TTL, now)),
            Some(100)
        );
        // Expires in an hour: kept for the cap.
        assert_eq!(
            secs(valid_for(&jwt(1_003_600), &caller(), TTL, now)),
            Some(300)
        );
        // Expired, no exp, not a JWT: not kept.
        assert_eq!(valid_for(&jwt(999_999), &caller(), TTL, now), None);
        assert_eq!(valid_for("a.b.c", &caller(), TTL, now), None);
        assert_eq!(valid_for("opaque-token", &caller(), TTL, now), None);
        // Refusals for the negative TTL; outages never.
        let refused = Err(ReviewError::Unauthenticated(None));
        assert_eq!(secs(valid_for("garbage", &refused, TTL, now)), Some(60));
        let outage = Err(ReviewError::Unavailable("etcd".into()));
        assert_eq!(valid_for("garbage", &outage, TTL, now), None);
    }

    #[test]
    fn the_cache_answers_until_expiry_and_stays_bounded() {
        let cache = ReviewCache::new(3, TTL);
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let refused = Err(ReviewError::Unauthenticated(None));
        for i in 0..10 {
            let token = format!("garbage-{i}");
            cache.put(token_hash(&token), &token, &refused, t0, wall);
            assert!(cache.len() <= 3);
        }
        // The oldest were evicted; the newest answer.
        assert!(cache.get(&token_hash("garbage-0"), t0).is_none());
        assert_eq!(
            cache.get(&token_hash("garbage-9"), t0),
            Some(refused.clone())
        );
        // After the negative TTL, no answer.
        assert!(
            cache
                .get(&token_hash("garbage-9"), t0 + Duration::from_secs(61))
                .is_none()
        );
        // Re-putting a key does not grow the eviction order.
        for _ in 0..5 {
            cache.put(token_hash("garbage-9"), "garbage-9", &refused, t0, wall);
        }
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.inner.lock().unwrap().order.len(), 3);
    }
}
