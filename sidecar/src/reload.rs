//! Config and labels from the projected volume, reloaded when they change.
//!
//! kubelet updates a projected volume by writing a new timestamped directory and swapping the
//! `..data` symlink atomically; `config.json` and `labels` are symlinks through `..data`. The
//! watcher checks `stat()` of both paths (which follows the symlinks) whenever
//! [`crate::fswatch`] reports that the volume's directory may have changed: a swap changes the
//! inode, an in-place write changes mtime or size. The directory is watched with inotify, not
//! the paths (whose symlinks never change), and a slow safety poll stays under it; where
//! inotify is unavailable the watcher polls every [`POLL_INTERVAL`], as it always did before.
//! A change applies about ten milliseconds after it lands (it was up to a quarter second when
//! polled), and an idle proxy is not woken four times a second to find nothing.
//!
//! A config that fails to parse or validate is refused whole: the last good one stays
//! published, the error is logged, shown on `/config` and counted in
//! `trellis_proxy_config_reloads_total{result="rejected"}`. Consumers read the current
//! [`Snapshot`] per connection from a `watch` channel, so a reload never touches a connection
//! or request already in flight.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{LoadError, OutboundService, ProxyConfig, parse_downward_labels};
use crate::lookup::OutboundIndex;
use crate::metrics::{Metrics, ResultLabels};

/// How often the files are checked when inotify cannot watch their directory. A quarter second,
/// not faster: kubelet itself takes up to a minute or two to refresh a projected ConfigMap, so
/// a faster poll buys no freshness and only wakes an idle proxy (at 20 ms it was 50 wake-ups a
/// second with no traffic at all).
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

pub const CONFIG_FILE: &str = "config.json";
pub const LABELS_FILE: &str = "labels";

/// What the data path uses: one validated config, the workload's labels, and the index that
/// finds a connection's Service without scanning the config.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<ProxyConfig>,
    pub labels: Arc<BTreeMap<String, String>>,
    pub applied_at: SystemTime,
    /// Built in [`Snapshot::new`], once per accepted config, so no connection pays for it;
    /// private so it always matches `config`.
    index: OutboundIndex,
}

impl Snapshot {
    pub fn new(config: ProxyConfig, labels: BTreeMap<String, String>) -> Self {
        let index = OutboundIndex::build(&config);
        Snapshot {
            config: Arc::new(config),
            labels: Arc::new(labels),
            applied_at: SystemTime::now(),
            index,
        }
    }

    /// The Service (and port) a redirected connection was meant for.
    pub fn service_for_addr(&self, dst: std::net::SocketAddr) -> Option<&OutboundService> {
        self.index.service_for_addr(&self.config, dst)
    }

    /// Local mode: the Service an HTTP authority names, and its port.
    pub fn service_for_authority(&self, authority: &str) -> Option<(&OutboundService, u16)> {
        self.index.service_for_authority(&self.config, authority)
    }
}

/// `None` until a config has loaded (the proxy is not ready then).
pub type ConfigRx = watch::Receiver<Option<Arc<Snapshot>>>;
pub type ConfigTx = watch::Sender<Option<Arc<Snapshot>>>;

/// Why the files on disk were not applied.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] LoadError),
}

/// The outcome of the latest attempt, for `/config`.
#[derive(Clone, Debug, Default)]
pub struct ReloadStatus {
    pub last_error: Option<String>,
    pub last_error_at: Option<SystemTime>,
    pub applied: u64,
    pub rejected: u64,
}

/// Identity of a file's current content as far as `stat` can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    mtime_ns: i128,
    len: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        len: m.len(),
    })
}

/// Watches `<dir>/config.json` and `<dir>/labels` and publishes validated snapshots.
pub struct Watcher {
    dir: PathBuf,
    tx: ConfigTx,
    status: Arc<Mutex<ReloadStatus>>,
    metrics: Arc<Metrics>,
    stamps: (Option<Stamp>, Option<Stamp>),
    /// Bytes of the config and labels last applied, so a touch without a change is not a reload.
    last_bytes: Option<(Vec<u8>, Vec<u8>)>,
    /// Called with each accepted snapshot before it is published, so state derived from the
    /// config (the traffic layer's tables) is ready before any request sees the new config.
    on_apply: Option<ApplyHook>,
}

pub type ApplyHook = Box<dyn Fn(&Snapshot) + Send + Sync>;

impl Watcher {
    pub fn new(dir: impl Into<PathBuf>, metrics: Arc<Metrics>) -> (Self, ConfigRx) {
        let (tx, rx) = watch::channel(None);
        let w = Self {
            dir: dir.into(),
            tx,
            status: Arc::default(),
            metrics,
            stamps: (None, None),
            last_bytes: None,
            on_apply: None,
        };
        (w, rx)
    }

    pub fn on_apply(&mut self, hook: ApplyHook) {
        self.on_apply = Some(hook);
    }

    pub fn status(&self) -> Arc<Mutex<ReloadStatus>> {
        self.status.clone()
    }

    pub fn subscribe(&self) -> ConfigRx {
        self.tx.subscribe()
    }

    fn paths(&self) -> (PathBuf, PathBuf) {
        (self.dir.join(CONFIG_FILE), self.dir.join(LABELS_FILE))
    }

    /// Checks the files once; loads them if they changed since the last check. Returns whether a
    /// new snapshot was published.
    pub fn poll(&mut self) -> bool {
        let (cp, lp) = self.paths();
        let stamps = (stamp(&cp), stamp(&lp));
        if stamps == self.stamps && self.tx.borrow().is_some() {
            return false;
        }
        if stamps == self.stamps
            && self
                .status
                .lock()
                .expect("status lock")
                .last_error
                .is_some()
        {
            // Still the same refused (or missing) files: do not count the refusal again.
            return false;
        }
        self.stamps = stamps;
        match self.load(&cp, &lp) {
            Ok(Some(snapshot)) => {
                tracing::info!(
                    revision = %snapshot.config.revision,
                    services = snapshot.config.outbound.len(),
                    "config applied"
                );
                if let Some(hook) = &self.on_apply {
                    hook(&snapshot);
                }
                self.metrics.set_config_revision(&snapshot.config.revision);
                self.tx.send_replace(Some(Arc::new(snapshot)));
                self.metrics
                    .config_reloads
                    .get_or_create(&ResultLabels { result: "applied" })
                    .inc();
                self.metrics.config_stale.set(0);
                let mut st = self.status.lock().expect("status lock");
                st.last_error = None;
                st.applied += 1;
                true
            }
            Ok(None) => false,
            Err(e) => {
                let msg = e.to_string();
                let missing = matches!(&e, ReloadError::Read { source, .. }
                    if source.kind() == std::io::ErrorKind::NotFound);
                if missing {
                    // Not a refusal: kubelet has not projected the ConfigMap (yet).
                    tracing::info!(error = %msg, "waiting for the config file");
                    self.status.lock().expect("status lock").last_error = Some(msg);
                    return false;
                }
                tracing::warn!(error = %msg, "config refused; the last good config stays in force");
                self.metrics
                    .config_reloads
                    .get_or_create(&ResultLabels { result: "rejected" })
                    .inc();
                if self.tx.borrow().is_some() {
                    self.metrics.config_stale.set(1);
                }
                let mut st = self.status.lock().expect("status lock");
                st.last_error = Some(msg);
                st.last_error_at = Some(SystemTime::now());
                st.rejected += 1;
                false
            }
        }
    }

    fn load(&mut self, cp: &Path, lp: &Path) -> Result<Option<Snapshot>, ReloadError> {
        let config_bytes = std::fs::read(cp).map_err(|source| ReloadError::Read {
            path: cp.to_path_buf(),
            source,
        })?;
        // The labels file is optional: without it the workload matches only empty selectors.
        let labels_bytes = match std::fs::read(lp) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(ReloadError::Read {
                    path: lp.to_path_buf(),
                    source,
                });
            }
        };
        if let Some((c, l)) = &self.last_bytes
            && *c == config_bytes
            && *l == labels_bytes
            && self.tx.borrow().is_some()
        {
            return Ok(None);
        }
        let config = ProxyConfig::from_json(&config_bytes)?;
        let labels = parse_downward_labels(&String::from_utf8_lossy(&labels_bytes));
        self.last_bytes = Some((config_bytes, labels_bytes));
        Ok(Some(Snapshot::new(config, labels)))
    }

    /// The directory whose changes [`Watcher::run`] waits for.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Checks the files whenever `changes` (a watch on [`Watcher::dir`]) says they may have
    /// changed, until `stop` is cancelled.
    pub async fn run(mut self, mut changes: crate::fswatch::Changes, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = changes.changed(POLL_INTERVAL) => { self.poll(); }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{CONFIG_VERSION, MeshSettings, Telemetry};

    fn cfg(revision: &str) -> String {
        ProxyConfig {
            version: CONFIG_VERSION,
            revision: revision.into(),
            namespace: "shop".into(),
            mesh: MeshSettings {
                trust_domain: "cluster.local".into(),
                identity_endpoint: None,
                telemetry: Telemetry::default(),
                skip_detection_ports: vec![],
                detect_timeout_ms: 100,
            },
            inbound: vec![],
            outbound: vec![],
        }
        .to_json_pretty()
    }

    /// Writes the files the way kubelet does: a fresh directory, then an atomic rename of the
    /// `..data` symlink.
    pub(crate) fn kubelet_write(dir: &Path, gen_: u32, config: &str, labels: &str) {
        let ts = dir.join(format!("..gen_{gen_}"));
        std::fs::create_dir(&ts).unwrap();
        std::fs::write(ts.join(CONFIG_FILE), config).unwrap();
        std::fs::write(ts.join(LABELS_FILE), labels).unwrap();
        let tmp = dir.join("..data_tmp");
        std::os::unix::fs::symlink(ts.file_name().unwrap(), &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
        for f in [CONFIG_FILE, LABELS_FILE] {
            let link = dir.join(f);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(Path::new("..data").join(f), &link).unwrap();
            }
        }
    }

    #[test]
    fn follows_symlink_swap_and_keeps_last_good_on_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (mut w, rx) = Watcher::new(dir.path(), metrics.clone());
        assert!(!w.poll(), "nothing to load yet");
        assert!(rx.borrow().is_none());

        kubelet_write(dir.path(), 1, &cfg("r1"), "app=\"web\"\n");
        assert!(w.poll());
        assert_eq!(rx.borrow().as_ref().unwrap().config.revision, "r1");
        assert_eq!(rx.borrow().as_ref().unwrap().labels["app"], "web");
        assert!(!w.poll(), "unchanged files are not reloaded");

        kubelet_write(dir.path(), 2, "{ not json", "app=\"web\"\n");
        assert!(!w.poll());
        assert_eq!(rx.borrow().as_ref().unwrap().config.revision, "r1");
        assert!(w.status().lock().unwrap().last_error.is_some());
        assert_eq!(metrics.config_stale.get(), 1);
        assert!(!w.poll(), "a refusal is counted once");
        assert_eq!(w.status().lock().unwrap().rejected, 1);

        kubelet_write(dir.path(), 3, &cfg("r3"), "app=\"api\"\n");
        assert!(w.poll());
        let snap = rx.borrow().clone().unwrap();
        assert_eq!(snap.config.revision, "r3");
        assert_eq!(snap.labels["app"], "api");
        assert!(w.status().lock().unwrap().last_error.is_none());
        assert_eq!(metrics.config_stale.get(), 0);
        let text = metrics.encode();
        assert!(text.contains("trellis_proxy_config_reloads_total{result=\"applied\"} 2"));
        assert!(text.contains("trellis_proxy_config_reloads_total{result=\"rejected\"} 1"));
    }

    /// `trellis check --proxy` compares this series with the ConfigMap's revision: it must name
    /// the config in force (the last good one while a newer one is refused) and only that one.
    /// Under a running watcher a kubelet swap applies at once, not at the next poll: the
    /// safety poll is an hour here, so only the directory watch can have woken it.
    #[tokio::test]
    async fn a_running_watcher_applies_a_swap_as_soon_as_it_lands() {
        let dir = tempfile::tempdir().unwrap();
        kubelet_write(dir.path(), 1, &cfg("r1"), "app=\"web\"\n");
        let (mut w, mut rx) = Watcher::new(dir.path(), Arc::new(Metrics::new()));
        assert!(w.poll());
        let stop = CancellationToken::new();
        let changes = crate::fswatch::spawn_with(
            vec![w.dir().to_path_buf()],
            stop.clone(),
            crate::fswatch::Options {
                safety_poll: Duration::from_secs(3600),
                ..Default::default()
            },
        );
        assert!(changes.watching());
        tokio::spawn(w.run(changes, stop.clone()));
        rx.borrow_and_update();
        for (gen_, rev) in [(2, "r2"), (3, "r3")] {
            kubelet_write(dir.path(), gen_, &cfg(rev), "app=\"web\"\n");
            tokio::time::timeout(Duration::from_secs(2), rx.changed())
                .await
                .expect("applied within 2 s")
                .unwrap();
            assert_eq!(
                rx.borrow_and_update().as_ref().unwrap().config.revision,
                rev
            );
        }
        stop.cancel();
    }

    #[test]
    fn config_info_names_the_revision_in_force_only() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (mut w, _rx) = Watcher::new(dir.path(), metrics.clone());
        let info = |rev: &str| format!("trellis_proxy_config_info{{revision=\"{rev}\"}} 1");
        kubelet_write(dir.path(), 1, &cfg("r1"), "");
        assert!(w.poll());
        assert!(
            metrics.encode().contains(&info("r1")),
            "{}",
            metrics.encode()
        );

        kubelet_write(dir.path(), 2, "{ not json", "");
        assert!(!w.poll());
        assert!(
            metrics.encode().contains(&info("r1")),
            "the last good config stays"
        );

        kubelet_write(dir.path(), 3, &cfg("r3"), "");
        assert!(w.poll());
        let text = metrics.encode();
        assert!(text.contains(&info("r3")), "{text}");
        assert!(!text.contains("revision=\"r1\""), "{text}");
    }
}
