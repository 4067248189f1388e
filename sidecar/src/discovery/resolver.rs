//! Resolving unknown destinations from the operator, and keeping what was learned.
//!
//! The ConfigMap is the bootstrap: the proxy serves from it before the stream is up and
//! whenever the operator is unreachable. The first connection to an address (or, in local
//! mode, an authority) the config does not know asks the [`Resolver`], which subscribes on the
//! stream and waits for the answer, at most [`RESOLVE_WAIT`], while a stream is up or the first
//! one is being opened (the application's first calls come as the proxy turns ready), never
//! once the operator proved unreachable, so an unreachable operator never delays traffic.
//! Every connection that arrives while a question is outstanding waits for the same answer
//! (a connection pool opening at start must not send all but its first connection in
//! plaintext), and a learned split waits for its backends, which the resolver subscribes to
//! as soon as it learns the split (the rules, pure, are in [`super::cache`]). Services the
//! operator pushes go into a cache that [`Resolver::merge`] lays over the ConfigMap's config,
//! and the merged config is published to the data path on the same channel a ConfigMap reload
//! uses: the new snapshot's index covers the bootstrap set plus the subscriptions (both
//! bounded), and nothing is re-read from disk. A pushed Service replaces the ConfigMap's entry
//! of the same name (it is newer).
//!
//! The stream is kept by [`Resolver::run`]: each attempt dials every address the configured
//! entries resolve to (a headless Service name resolves to every replica), staggered and side
//! by side ([`Stream::open_first`]), so an address that refuses or hangs does not hold the
//! attempt for a connect timeout; attempts repeat with exponential backoff (reset only by a
//! stream that delivered a batch, so a replica that ends every stream at once is not
//! redialled at the minimum backoff by every proxy), subscribes again
//! to everything it holds after a reconnect, and acknowledges each generation once its changes
//! are in the cache. A replica that dies closes the stream; one that hangs (no FIN: a lost node,
//! a partition) is noticed by the stream's HTTP/2 keepalive ([`super::client`]); either way the
//! next attempt starts at the next address. When the stream is down the cache stays as it is:
//! the proxy keeps serving the last state it was told.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::cache::{Ask, Cache};
use super::client::Stream;
use super::proto::{ClientMessage, ServerMessage, Target};
use crate::config::OutboundService;
use crate::creds::CredentialsRx;
use crate::reload::{ConfigRx, ConfigTx, Snapshot};

pub use super::cache::NEGATIVE_TTL;

/// How long the first connection to an unknown destination waits for the operator's answer
/// before it is handled as before (plaintext pass-through).
pub const RESOLVE_WAIT: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where the operator's stream is and who it must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// `host:port` entries (`trellis-operator.<ns>.svc:15010`); every address each resolves
    /// to is dialled (see [`Stream::open_first`]).
    pub addrs: Vec<String>,
    /// The operator's SPIFFE ID; no other server certificate is accepted.
    pub operator_id: String,
}

/// The state of the stream, as far as a connection deciding whether to wait cares.
///
/// `Starting` is the time between the proxy's start and the first attempt's outcome: the
/// application's first calls come right when the proxy turns ready, typically before the
/// stream is up, and must wait for it (bounded) or they would leave as plaintext. Once an
/// attempt has failed, the operator counts as unreachable and nobody waits for it until a
/// stream is up again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Link {
    Starting = 0,
    Up = 1,
    Down = 2,
}

/// What the ConfigMap config in force decides, as reported in [`ClientMessage::Loaded`].
#[derive(Clone, Debug, PartialEq, Eq)]
struct Loaded {
    settings: String,
    policies: String,
}

impl Loaded {
    fn message(self) -> ClientMessage {
        ClientMessage::Loaded {
            settings: self.settings,
            policies: Some(self.policies),
        }
    }
}

/// Learned Services and the number of answers they include (see [`Cache::answers`]).
type Published = (u64, Arc<BTreeMap<String, OutboundService>>);

/// The sidecar's discovery client.
pub struct Resolver {
    settings: Settings,
    cache: Mutex<Cache>,
    link: AtomicU8,
    /// Answers included in the snapshot the data path reads (set by [`Resolver::merge`]).
    merged: AtomicU64,
    /// Woken when a merged snapshot is published and when the stream goes up or down.
    answered: Notify,
    requests: mpsc::Sender<Target>,
    requests_rx: Mutex<Option<mpsc::Receiver<Target>>>,
    cache_tx: watch::Sender<Published>,
    /// The settings and policies digests of the ConfigMap config in force
    /// ([`crate::config::ProxyConfig::settings_digest`],
    /// [`crate::config::ProxyConfig::policies_digest`]), reported to the operator.
    loaded: watch::Sender<Option<Loaded>>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    pub fn new(settings: Settings) -> Arc<Self> {
        // New targets queue here between connections; beyond this many at once, a
        // connection simply does not wait (it is handled as before).
        let (requests, rx) = mpsc::channel(256);
        Arc::new(Self {
            settings,
            cache: Mutex::default(),
            link: AtomicU8::new(Link::Starting as u8),
            merged: AtomicU64::new(0),
            answered: Notify::new(),
            requests,
            requests_rx: Mutex::new(Some(rx)),
            cache_tx: watch::channel((0, Arc::new(BTreeMap::new()))).0,
            loaded: watch::channel(None).0,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn link(&self) -> Link {
        match self.link.load(Ordering::Acquire) {
            0 => Link::Starting,
            1 => Link::Up,
            _ => Link::Down,
        }
    }

    fn set_link(&self, link: Link) {
        self.link.store(link as u8, Ordering::Release);
        self.answered.notify_waiters();
    }

    /// Whether a stream to the operator is up.
    pub fn is_connected(&self) -> bool {
        self.link() == Link::Up
    }

    /// Asks the operator about `target` and waits (at most `wait`, and not at all while the
    /// operator is unreachable) until `known` says the data path can route the destination,
    /// or the operator's answer (and whatever it depends on) is in the published snapshot.
    /// Connections that arrive while the same question is outstanding wait for the same
    /// answer. The caller then looks the destination up again in the current snapshot.
    pub async fn resolve(&self, target: Target, wait: Duration, known: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + wait;
        if self.link() == Link::Down {
            return;
        }
        {
            let mut st = self.state();
            match st.ask(&target, Instant::now()) {
                Ask::Send => {
                    if self.requests.try_send(target.clone()).is_err() {
                        st.unsend(&target);
                        return;
                    }
                }
                Ask::Asked => {}
                Ask::Unknown | Ask::Full => return,
            }
        }
        loop {
            let answered = self.answered.notified();
            tokio::pin!(answered);
            answered.as_mut().enable();
            if known() || self.link() == Link::Down || self.settled(&target) {
                return;
            }
            if tokio::time::timeout_at(deadline, answered).await.is_err() {
                return;
            }
        }
    }

    fn settled(&self, target: &Target) -> bool {
        let merged = self.merged.load(Ordering::Acquire);
        self.link() == Link::Up && self.state().settled(target, merged, Instant::now())
    }

    /// The learned Services, for [`Resolver::merge`].
    pub fn cache(&self) -> watch::Receiver<Published> {
        self.cache_tx.subscribe()
    }

    /// Records the ConfigMap config now in force, for the next [`ClientMessage::Loaded`].
    fn set_loaded(&self, file: &Snapshot) {
        let loaded = Loaded {
            settings: file.config.settings_digest(),
            policies: file.config.policies_digest(),
        };
        self.loaded.send_if_modified(|cur| {
            let changed = cur.as_ref() != Some(&loaded);
            if changed {
                *cur = Some(loaded);
            }
            changed
        });
    }

    /// Applies one message; returns the generation to acknowledge and targets to subscribe.
    fn apply(&self, msg: ServerMessage) -> (Option<u64>, Vec<Target>) {
        let mut st = self.state();
        let applied = st.apply(msg, Instant::now());
        if applied.synced.is_some() {
            // Waiters are woken by `merge` once the data path can see the batch.
            let published = (st.answers(), Arc::new(st.services().clone()));
            drop(st);
            self.cache_tx.send_replace(published);
        }
        (applied.synced, applied.subscribe)
    }

    /// Keeps a stream to the operator until `shutdown`, reconnecting with backoff.
    pub async fn run(self: Arc<Self>, mut creds: CredentialsRx, shutdown: CancellationToken) {
        let Some(mut requests) = self
            .requests_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let mut backoff = BACKOFF_MIN;
        let mut next = 0usize;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let own = creds.borrow_and_update().clone();
            let Some(own) = own else {
                // No certificate yet (the proxy is not ready either): connect as soon as it
                // arrives, not a backoff later, so the stream is up when traffic starts.
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    changed = creds.changed() => if changed.is_err() { return },
                }
                continue;
            };
            let tls = crate::tls::client_config(
                &own,
                std::slice::from_ref(&self.settings.operator_id),
                &[b"h2"],
            );
            let addrs = dial_order(&resolve_all(&self.settings.addrs).await, next);
            next += 1;
            let opened = match tls {
                Err(error) => Err(format!("no TLS config for the stream: {error}")),
                Ok(_) if self.settings.addrs.is_empty() => {
                    Err("no operator address configured".into())
                }
                Ok(_) if addrs.is_empty() => Err(format!(
                    "no operator address resolves ({})",
                    self.settings.addrs.join(", ")
                )),
                Ok(tls) => Stream::open_first(&addrs, tls)
                    .await
                    .map(|(_, stream)| stream)
                    .map_err(|e| e.to_string()),
            };
            match opened {
                Ok(stream) => {
                    // Only a stream that delivered a batch was a success: a replica that ends
                    // every stream at once (a crash loop behind a live port) is redialled with
                    // growing backoff, not every 100 ms by every proxy of the cluster.
                    if self.session(stream, &mut requests, &shutdown).await {
                        backoff = BACKOFF_MIN;
                    }
                    self.state().disconnected();
                    // Until the next stream is up, connections do not wait for the operator.
                    self.set_link(Link::Down);
                }
                Err(error) => {
                    tracing::debug!(%error, "discovery stream not opened");
                    self.set_link(Link::Down);
                }
            }
            let jitter = Duration::from_millis(rand::random::<u64>() % 50);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff + jitter) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Serves one stream until it ends; whether the operator delivered a batch on it.
    async fn session(
        &self,
        mut stream: Stream,
        requests: &mut mpsc::Receiver<Target>,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut served = false;
        // Everything queued so far is subscribed, so it is in what is asked again here.
        while requests.try_recv().is_ok() {}
        let held = self.state().resubscribe(Instant::now());
        if !held.is_empty()
            && !stream
                .send(&ClientMessage::Subscribe { targets: held })
                .await
        {
            return served;
        }
        let mut loaded = self.loaded.subscribe();
        let report = loaded.borrow_and_update().clone();
        if let Some(report) = report
            && !stream.send(&report.message()).await
        {
            return served;
        }
        self.set_link(Link::Up);
        tracing::info!("discovery stream up");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return served,
                c = loaded.changed() => {
                    if c.is_err() {
                        return served;
                    }
                    let report = loaded.borrow_and_update().clone();
                    if let Some(report) = report
                        && !stream.send(&report.message()).await
                    {
                        return served;
                    }
                }
                t = requests.recv() => {
                    let Some(t) = t else { return served };
                    let mut targets = vec![t];
                    while let Ok(t) = requests.try_recv() {
                        targets.push(t);
                    }
                    if !stream.send(&ClientMessage::Subscribe { targets }).await {
                        return served;
                    }
                }
                m = stream.recv() => match m {
                    Ok(Some(m)) => {
                        let (ack, subscribe) = self.apply(m);
                        served |= ack.is_some();
                        if !subscribe.is_empty()
                            && !stream.send(&ClientMessage::Subscribe { targets: subscribe }).await
                        {
                            return served;
                        }
                        if let Some(generation) = ack
                            && !stream.send(&ClientMessage::Ack { generation }).await
                        {
                            return served;
                        }
                    }
                    Ok(None) => {
                        tracing::info!("discovery stream closed by the operator; serving from cache");
                        return served;
                    }
                    Err(error) => {
                        tracing::info!(%error, "discovery stream lost; serving from cache");
                        return served;
                    }
                },
            }
        }
    }
}

/// Every address each `host:port` entry resolves to (a headless Service name resolves to
/// every replica; an entry that does not resolve gives none), looked up side by side so one
/// slow name does not hold the others.
async fn resolve_all(entries: &[String]) -> Vec<Vec<SocketAddr>> {
    futures::future::join_all(entries.iter().map(|entry| async move {
        match tokio::net::lookup_host(entry.as_str()).await {
            Ok(addrs) => addrs.collect(),
            Err(error) => {
                tracing::debug!(%entry, %error, "operator address does not resolve");
                Vec::new()
            }
        }
    }))
    .await
}

/// The order in which one attempt dials the resolved addresses: entry by entry, each in the
/// resolver's order, every address once, starting `attempt` places further on, so that
/// successive attempts (after a replica failed or ended the stream) do not all begin with the
/// same, possibly dead, address. Pure.
fn dial_order(resolved: &[Vec<SocketAddr>], attempt: usize) -> Vec<SocketAddr> {
    let mut order: Vec<SocketAddr> = Vec::new();
    for addr in resolved.iter().flatten() {
        if !order.contains(addr) {
            order.push(*addr);
        }
    }
    if !order.is_empty() {
        let start = attempt % order.len();
        order.rotate_left(start);
    }
    order
}

impl Resolver {
    /// Lays the learned Services over the ConfigMap's config and publishes the result on `out`
    /// (what the data path reads), calling `on_apply` with each merged snapshot, until `files`
    /// closes; then wakes the connections waiting for an answer. A merged config the sidecar's
    /// validator refuses is not published: the ConfigMap's config alone is. (A learned split
    /// whose backends are not known yet is left out before validation, see
    /// [`super::cache::overlay`], so it cannot take every other learned Service down with it.)
    pub async fn merge(
        self: Arc<Self>,
        mut files: ConfigRx,
        out: ConfigTx,
        on_apply: impl Fn(&Snapshot) + Send + 'static,
    ) {
        let mut cache = self.cache();
        let mut reported: Option<Arc<Snapshot>> = None;
        loop {
            let file = files.borrow_and_update().clone();
            let (answers, learned) = cache.borrow_and_update().clone();
            if let Some(file) = file {
                // Only a new file can change the settings; pushes (most iterations) cannot.
                if !reported.as_ref().is_some_and(|r| Arc::ptr_eq(r, &file)) {
                    self.set_loaded(&file);
                    reported = Some(file.clone());
                }
                let merged = merged_snapshot(&file, &learned);
                on_apply(&merged);
                out.send_replace(Some(merged));
            }
            self.merged.store(answers, Ordering::Release);
            self.answered.notify_waiters();
            tokio::select! {
                c = files.changed() => if c.is_err() { return },
                c = cache.changed() => if c.is_err() { return },
            }
        }
    }
}

fn merged_snapshot(
    file: &Arc<Snapshot>,
    learned: &BTreeMap<String, OutboundService>,
) -> Arc<Snapshot> {
    let Some(cfg) = super::cache::overlay(&file.config, learned) else {
        return file.clone();
    };
    match cfg.validate() {
        Ok(()) => Arc::new(Snapshot::new(cfg, (*file.labels).clone())),
        Err(errors) => {
            tracing::warn!(
                errors = ?errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                "discovered Services refused by validation; serving the ConfigMap's config"
            );
            file.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Protocol, ServicePort};

    fn svc(name: &str) -> Box<OutboundService> {
        Box::new(OutboundService {
            name: name.into(),
            namespace: "shop".into(),
            addresses: vec!["10.96.0.1".parse().unwrap()],
            ports: vec![ServicePort {
                port: 80,
                name: None,
                protocol: Protocol::Http1,
                endpoints: vec![],
            }],
            identities: vec![],
            policy: None,
        })
    }

    /// Every resolved address of every entry is dialled once, and each attempt starts one
    /// address further on, so a dead first address does not begin every attempt.
    #[test]
    fn every_resolved_address_is_dialled_and_attempts_rotate() {
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let resolved = vec![
            vec![a("10.0.0.1:15010"), a("10.0.0.2:15010")],
            vec![],
            vec![a("10.0.0.2:15010"), a("10.0.0.3:15010")],
        ];
        assert_eq!(
            dial_order(&resolved, 0),
            [
                a("10.0.0.1:15010"),
                a("10.0.0.2:15010"),
                a("10.0.0.3:15010")
            ]
        );
        assert_eq!(
            dial_order(&resolved, 4),
            [
                a("10.0.0.2:15010"),
                a("10.0.0.3:15010"),
                a("10.0.0.1:15010")
            ]
        );
        assert!(dial_order(&[vec![], vec![]], 3).is_empty());
    }

    /// Each entry keeps its own addresses; one that does not resolve gives none and does not
    /// take the others down with it.
    #[tokio::test]
    async fn an_entry_that_does_not_resolve_leaves_the_others() {
        let resolved =
            resolve_all(&["127.0.0.1:15010".into(), "no-such-host.invalid:1".into()]).await;
        assert_eq!(resolved[0], [SocketAddr::from(([127, 0, 0, 1], 15010))]);
        assert!(resolved[1].is_empty());
    }

    #[test]
    fn the_cache_follows_pushes_and_drops_what_the_operator_no_longer_shows() {
        let r = Resolver::new(Settings {
            addrs: vec![],
            operator_id: "spiffe://cluster.local/ns/trellis-system/sa/trellis-operator".into(),
        });
        let cache = r.cache();
        r.apply(ServerMessage::Service {
            key: "web.shop".into(),
            service: Some(svc("web")),
        });
        r.apply(ServerMessage::Service {
            key: "db.shop".into(),
            service: Some(svc("db")),
        });
        assert!(cache.borrow().1.is_empty(), "published only at Synced");
        assert_eq!(
            r.apply(ServerMessage::Synced { generation: 3 }),
            (Some(3), vec![])
        );
        assert_eq!(cache.borrow().1.len(), 2);
        // Deleted while we were subscribed, and gone by the time of a re-subscribe.
        r.apply(ServerMessage::Service {
            key: "web.shop".into(),
            service: None,
        });
        r.apply(ServerMessage::Unknown {
            target: Target::Service("db.shop".into()),
        });
        r.apply(ServerMessage::Synced { generation: 4 });
        assert!(cache.borrow().1.is_empty());
    }
}
