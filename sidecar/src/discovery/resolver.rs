//! Resolving unknown destinations from the operator, and keeping what was learned.
//!
//! The ConfigMap is the bootstrap: the proxy serves from it before the stream is up and
//! whenever the operator is unreachable. The first connection to an address (or, in local
//! mode, an authority) the config does not know asks the [`Resolver`], which subscribes on the
//! stream and waits for the answer, at most [`RESOLVE_WAIT`] and only while a stream is up,
//! so an unreachable operator never delays traffic. Services the operator pushes go into a
//! cache that [`Resolver::merge`] lays over the ConfigMap's config, and the merged config is published
//! to the data path on the same channel a ConfigMap reload uses: the new snapshot's index
//! covers the bootstrap set plus the subscriptions (both bounded), and nothing is re-read
//! from disk. A pushed Service replaces the ConfigMap's entry of the same name (it is newer).
//!
//! The stream is kept by [`Resolver::run`]: it connects to the configured operator addresses
//! in turn (a Service name resolves to any replica), with exponential backoff, subscribes again
//! to everything it holds after a reconnect, and acknowledges each generation once its changes
//! are in the cache. When the stream is down the cache stays as it is: the proxy keeps serving
//! the last state it was told.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::client::Stream;
use super::proto::{ClientMessage, MAX_SUBSCRIPTIONS, ServerMessage, Target};
use crate::config::OutboundService;
use crate::creds::CredentialsRx;
use crate::reload::{ConfigRx, ConfigTx, Snapshot};

/// How long the first connection to an unknown destination waits for the operator's answer
/// before it is handled as before (plaintext pass-through).
pub const RESOLVE_WAIT: Duration = Duration::from_secs(1);
/// How long an `Unknown` answer is remembered: connections to non-mesh destinations (the
/// internet, a database outside the cluster) do not ask again on every connection.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where the operator's stream is and who it must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// `host:port` entries, tried in turn (`trellis-operator.<ns>.svc:15010`).
    pub addrs: Vec<String>,
    /// The operator's SPIFFE ID; no other server certificate is accepted.
    pub operator_id: String,
}

#[derive(Default)]
struct State {
    /// Pushed Services by `name.namespace`.
    cache: BTreeMap<String, OutboundService>,
    /// Everything asked for (re-sent after a reconnect).
    subscribed: HashSet<Target>,
    /// `Unknown` answers and when they arrived.
    unknown: HashMap<Target, Instant>,
}

/// The sidecar's discovery client.
pub struct Resolver {
    settings: Settings,
    state: Mutex<State>,
    connected: AtomicBool,
    /// Woken on every batch the operator finishes (`Synced`), on `Unknown`, and on disconnect.
    answered: Notify,
    requests: mpsc::Sender<Target>,
    requests_rx: Mutex<Option<mpsc::Receiver<Target>>>,
    cache_tx: watch::Sender<Arc<BTreeMap<String, OutboundService>>>,
    /// The settings digest of the ConfigMap config in force
    /// ([`crate::config::ProxyConfig::settings_digest`]), reported to the operator.
    loaded: watch::Sender<Option<String>>,
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
            state: Mutex::default(),
            connected: AtomicBool::new(false),
            answered: Notify::new(),
            requests,
            requests_rx: Mutex::new(Some(rx)),
            cache_tx: watch::channel(Arc::new(BTreeMap::new())).0,
            loaded: watch::channel(None).0,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a stream to the operator is up.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Asks the operator about `target` and waits (at most `wait`, and only while connected)
    /// until it answered. The caller then looks the destination up again in the current
    /// snapshot, which includes the answer when there was one.
    pub async fn resolve(&self, target: Target, wait: Duration) {
        {
            let mut st = self.state();
            if let Some(at) = st.unknown.get(&target) {
                if at.elapsed() < NEGATIVE_TTL {
                    return;
                }
                st.unknown.remove(&target);
            }
            if st.subscribed.contains(&target) || st.subscribed.len() >= MAX_SUBSCRIPTIONS {
                // Already asked (the answer is in the cache, or on its way) or full.
                return;
            }
            if !self.is_connected() {
                return;
            }
            st.subscribed.insert(target.clone());
        }
        let answered = self.answered.notified();
        tokio::pin!(answered);
        answered.as_mut().enable();
        if self.requests.try_send(target).is_err() {
            return;
        }
        let _ = tokio::time::timeout(wait, answered).await;
    }

    /// The learned Services, for [`Resolver::merge`].
    pub fn cache(&self) -> watch::Receiver<Arc<BTreeMap<String, OutboundService>>> {
        self.cache_tx.subscribe()
    }

    /// Records the ConfigMap config now in force, for the next [`ClientMessage::Loaded`].
    fn set_loaded(&self, file: &Snapshot) {
        let digest = file.config.settings_digest();
        self.loaded.send_if_modified(|cur| {
            let changed = cur.as_deref() != Some(digest.as_str());
            if changed {
                *cur = Some(digest);
            }
            changed
        });
    }

    fn apply(&self, msg: ServerMessage) -> Option<u64> {
        match msg {
            ServerMessage::Service { key, service } => {
                let mut st = self.state();
                match service {
                    Some(s) => {
                        st.cache.insert(key, *s);
                    }
                    None => {
                        st.cache.remove(&key);
                        st.subscribed.remove(&Target::Service(key));
                    }
                }
                None
            }
            ServerMessage::Unknown { target } => {
                let mut st = self.state();
                st.subscribed.remove(&target);
                // A Service re-subscribed after a reconnect may be gone (or hidden) by now: the
                // cache must not keep serving it (the next `Synced` publishes the removal).
                if let Target::Service(key) = &target {
                    st.cache.remove(key);
                }
                st.unknown.insert(target, Instant::now());
                drop(st);
                self.answered.notify_waiters();
                None
            }
            ServerMessage::Synced { generation } => {
                // Waiters are woken by `merge` once the data path can see the batch.
                let cache = Arc::new(self.state().cache.clone());
                self.cache_tx.send_replace(cache);
                Some(generation)
            }
        }
    }

    /// Keeps a stream to the operator until `shutdown`, reconnecting with backoff.
    pub async fn run(self: Arc<Self>, creds: CredentialsRx, shutdown: CancellationToken) {
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
            let tls = creds.borrow().as_ref().and_then(|c| {
                crate::tls::client_config(
                    c,
                    std::slice::from_ref(&self.settings.operator_id),
                    &[b"h2"],
                )
                .ok()
            });
            let addr = self
                .settings
                .addrs
                .get(next % self.settings.addrs.len().max(1));
            next += 1;
            let opened = match (tls, addr) {
                (Some(tls), Some(addr)) => match resolve_addr(addr).await {
                    Some(sa) => Stream::open(sa, tls).await.map_err(|e| e.to_string()),
                    None => Err(format!("{addr} does not resolve")),
                },
                (None, _) => Err("no workload certificate yet".into()),
                (_, None) => Err("no operator address configured".into()),
            };
            match opened {
                Ok(stream) => {
                    backoff = BACKOFF_MIN;
                    self.session(stream, &mut requests, &shutdown).await;
                    self.connected.store(false, Ordering::Relaxed);
                    self.answered.notify_waiters();
                }
                Err(error) => tracing::debug!(%error, "discovery stream not opened"),
            }
            let jitter = Duration::from_millis(rand::random::<u64>() % 50);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff + jitter) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn session(
        &self,
        mut stream: Stream,
        requests: &mut mpsc::Receiver<Target>,
        shutdown: &CancellationToken,
    ) {
        let held: Vec<Target> = {
            let st = self.state();
            st.subscribed
                .iter()
                .cloned()
                .chain(st.cache.keys().map(|k| Target::Service(k.clone())))
                .collect::<HashSet<_>>()
                .into_iter()
                .collect()
        };
        // Requests queued while disconnected were answered by the timeout; drop them.
        while requests.try_recv().is_ok() {}
        if !held.is_empty()
            && !stream
                .send(&ClientMessage::Subscribe { targets: held })
                .await
        {
            return;
        }
        let mut loaded = self.loaded.subscribe();
        let settings = loaded.borrow_and_update().clone();
        if let Some(settings) = settings
            && !stream.send(&ClientMessage::Loaded { settings }).await
        {
            return;
        }
        self.connected.store(true, Ordering::Relaxed);
        tracing::info!("discovery stream up");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                c = loaded.changed() => {
                    if c.is_err() {
                        return;
                    }
                    let settings = loaded.borrow_and_update().clone();
                    if let Some(settings) = settings
                        && !stream.send(&ClientMessage::Loaded { settings }).await
                    {
                        return;
                    }
                }
                t = requests.recv() => {
                    let Some(t) = t else { return };
                    let mut targets = vec![t];
                    while let Ok(t) = requests.try_recv() {
                        targets.push(t);
                    }
                    if !stream.send(&ClientMessage::Subscribe { targets }).await {
                        return;
                    }
                }
                m = stream.recv() => match m {
                    Ok(Some(m)) => {
                        if let Some(generation) = self.apply(m)
                            && !stream.send(&ClientMessage::Ack { generation }).await
                        {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(error) => {
                        tracing::info!(%error, "discovery stream lost; serving from cache");
                        return;
                    }
                },
            }
        }
    }
}

async fn resolve_addr(addr: &str) -> Option<SocketAddr> {
    tokio::net::lookup_host(addr).await.ok()?.next()
}

impl Resolver {
    /// Lays the learned Services over the ConfigMap's config and publishes the result on `out`
    /// (what the data path reads), calling `on_apply` with each merged snapshot, until `files`
    /// closes; then wakes the connections waiting for an answer. A merged config the sidecar's
    /// validator refuses (say, a pushed split whose backend is not known here) is not
    /// published: the ConfigMap's config alone is.
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
            let learned = cache.borrow_and_update().clone();
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
    if learned.is_empty() {
        return file.clone();
    }
    let mut cfg = (*file.config).clone();
    cfg.outbound.retain(|s| !learned.contains_key(&s.key()));
    cfg.outbound.extend(learned.values().cloned());
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
        assert!(cache.borrow().is_empty(), "published only at Synced");
        assert_eq!(r.apply(ServerMessage::Synced { generation: 3 }), Some(3));
        assert_eq!(cache.borrow().len(), 2);
        // Deleted while we were subscribed, and gone by the time of a re-subscribe.
        r.apply(ServerMessage::Service {
            key: "web.shop".into(),
            service: None,
        });
        r.apply(ServerMessage::Unknown {
            target: Target::Service("db.shop".into()),
        });
        r.apply(ServerMessage::Synced { generation: 4 });
        assert!(cache.borrow().is_empty());
    }
}
