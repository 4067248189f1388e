//! Wake-ups for the files the proxy reads from disk: its config, labels and trust bundle (one
//! projected volume) and, with `--cert-file`, its certificate and key.
//!
//! kubelet updates a projected volume by writing a new timestamped directory and renaming a
//! `..data` symlink over the old one. The files' own paths (`config.json -> ..data/config.json`)
//! never change, so inotify on a file sees nothing; every update does show as events in the
//! volume's directory (the new directory created, `..data` moved in). So directories are
//! watched, never files, and an event only says "look now": consumers keep comparing what they
//! read (stat stamps, bytes), exactly as when they polled, so a spurious or coalesced event
//! costs a `stat` and a missed one costs latency, never a wrong config.
//!
//! Before this, consumers polled: the config every 250 ms, the credential files every second.
//! That was seven wake-ups a second on a proxy with no traffic (about 0.5 ms of CPU a second,
//! multiplied by every pod of a cluster) and up to a quarter second before a new config applied.
//! Now an idle proxy wakes for a [`SAFETY_POLL`] every ten seconds, which also catches what
//! inotify cannot report (a file system that does not, the watched path swapped for another
//! directory), and a change applies [`SETTLE`] after it lands.
//!
//! inotify is a shared, limited resource: `fs.inotify.max_user_instances` (128 by default)
//! counts instances per user, and every sidecar on a node runs as the same UID. So the proxy
//! opens one instance for its volume, shared by every consumer through [`Changes`], and when
//! inotify is unavailable (limit reached, no such directory yet) consumers fall back to their
//! own poll interval, as before, until the watch can be set up.
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::io::Errno;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a watched directory may go unchecked: the floor under inotify. Ten seconds, as a
/// kubelet takes up to a minute or two to project a changed ConfigMap anyway.
pub const SAFETY_POLL: Duration = Duration::from_secs(10);

/// Quiet time after an event before consumers are woken: kubelet's swap is several operations
/// (a directory, a symlink, a rename, a removal) and an in-place write may come in pieces, so
/// waking on the first would mostly find nothing new yet.
pub const SETTLE: Duration = Duration::from_millis(10);

/// Events that can mean a file below the directory changed. Not `MODIFY`: that fires on every
/// `write` of a file still being written; `CLOSE_WRITE` fires once it is whole.
fn interest() -> WatchFlags {
    WatchFlags::CREATE
        | WatchFlags::DELETE
        | WatchFlags::MOVED_FROM
        | WatchFlags::MOVED_TO
        | WatchFlags::CLOSE_WRITE
        | WatchFlags::ATTRIB
        | WatchFlags::DELETE_SELF
        | WatchFlags::MOVE_SELF
        | WatchFlags::ONLYDIR
}

/// Timings of the watch task; [`Default`] is production's, tests shorten them.
#[derive(Debug, Clone)]
pub struct Options {
    /// See [`SETTLE`].
    pub settle: Duration,
    /// How often, while some directory could not be watched (missing, removed, limit
    /// reached), it is tried again. Watched paths are checked to still name the directory that
    /// is watched (a swapped directory symlink, a directory replaced) at the same time, and on
    /// the safety poll once every directory is watched.
    pub recheck: Duration,
    /// See [`SAFETY_POLL`].
    pub safety_poll: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            settle: SETTLE,
            recheck: Duration::from_secs(1),
            safety_poll: SAFETY_POLL,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    /// Bumped whenever consumers should look.
    generation: u64,
    /// Every directory is under watch: consumers may wait [`Options::safety_poll`] instead of
    /// their own interval.
    watching: bool,
}

/// A consumer's end: wakes when the watched directories may have changed. Cloning gives another
/// consumer that is woken by the same events.
#[derive(Debug, Clone)]
pub struct Changes {
    rx: Option<watch::Receiver<Seen>>,
    safety_poll: Duration,
}

impl Changes {
    /// No watch at all: [`Changes::changed`] waits the consumer's own poll interval.
    pub fn polling() -> Self {
        Self {
            rx: None,
            safety_poll: SAFETY_POLL,
        }
    }

    /// Whether every directory is under inotify watch right now.
    pub fn watching(&self) -> bool {
        self.rx.as_ref().is_some_and(|rx| rx.borrow().watching)
    }

    /// Waits until the directories may have changed: an inotify event (after [`SETTLE`]), or
    /// `poll` elapsed while some directory is not under watch, or the safety poll elapsed while
    /// all are.
    pub async fn changed(&mut self, poll: Duration) {
        let Some(rx) = &mut self.rx else {
            tokio::time::sleep(poll).await;
            return;
        };
        // `borrow`, not `borrow_and_update`: a bump that came while the consumer was busy
        // (reading the files it announced, say) must still end this wait at once.
        let wait = if rx.borrow().watching {
            self.safety_poll.max(poll)
        } else {
            poll
        };
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() {
                    // The watch task ended (inotify failed): poll from now on.
                    self.rx = None;
                    tokio::time::sleep(poll).await;
                }
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Starts watching `dirs` (deduplicated) until `stop` is cancelled or every [`Changes`] is
/// dropped. Must run inside a tokio runtime with I/O enabled.
pub fn spawn(dirs: Vec<PathBuf>, stop: CancellationToken) -> Changes {
    spawn_with(dirs, stop, Options::default())
}

/// [`spawn`] with other timings.
pub fn spawn_with(mut dirs: Vec<PathBuf>, stop: CancellationToken, opts: Options) -> Changes {
    dirs.sort();
    dirs.dedup();
    // `AsyncFd::new` is deprecated because a `T` could report a different descriptor over
    // time, or not own it (tokio#8587); its replacement is `unsafe`, which this crate forbids.
    // An `OwnedFd` owns its descriptor and always reports the same one, which is the whole of
    // the contract `register` asks callers to uphold.
    #[allow(deprecated)]
    let fd = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC)
        .map_err(std::io::Error::from)
        .and_then(AsyncFd::new);
    let fd = match fd {
        Ok(fd) => fd,
        Err(error) => {
            tracing::warn!(%error, ?dirs, "cannot use inotify; polling for changes instead");
            return Changes {
                rx: None,
                safety_poll: opts.safety_poll,
            };
        }
    };
    let mut task = Task {
        fd,
        dirs: dirs
            .into_iter()
            .map(|path| Dir {
                path,
                watch: None,
                warned: false,
            })
            .collect(),
        opts: opts.clone(),
    };
    task.add_missing();
    let (tx, rx) = watch::channel(Seen {
        generation: 0,
        watching: task.watching(),
    });
    tokio::spawn(task.run(tx, stop));
    Changes {
        rx: Some(rx),
        safety_poll: opts.safety_poll,
    }
}

struct Dir {
    path: PathBuf,
    /// The watch descriptor and the (device, inode) of the directory it watches.
    watch: Option<(i32, (u64, u64))>,
    /// A failure to watch it was logged: not again every recheck.
    warned: bool,
}

struct Task {
    fd: AsyncFd<OwnedFd>,
    dirs: Vec<Dir>,
    opts: Options,
}

/// The (device, inode) of the directory `path` names now, if it names one.
fn dir_id(path: &std::path::Path) -> Option<(u64, u64)> {
    let m = std::fs::metadata(path).ok()?;
    m.is_dir().then(|| (m.dev(), m.ino()))
}

impl Task {
    fn watching(&self) -> bool {
        self.dirs.iter().all(|d| d.watch.is_some())
    }

    /// Tries to watch every directory not under watch. Returns whether any watch was added.
    fn add_missing(&mut self) -> bool {
        let mut added = false;
        for d in self.dirs.iter_mut().filter(|d| d.watch.is_none()) {
            let Some(id) = dir_id(&d.path) else {
                continue;
            };
            match inotify::add_watch(self.fd.get_ref(), &d.path, interest()) {
                Ok(wd) => {
                    tracing::debug!(dir = %d.path.display(), "watching for changes");
                    d.watch = Some((wd, id));
                    d.warned = false;
                    added = true;
                }
                Err(error) if !d.warned => {
                    // ENOSPC: `fs.inotify.max_user_watches` reached.
                    tracing::warn!(%error, dir = %d.path.display(), "cannot watch; polling it instead");
                    d.warned = true;
                }
                Err(_) => {}
            }
        }
        added
    }

    /// Drops watches whose path now names another directory (or none), so that
    /// [`Task::add_missing`] watches what the path names now. Returns whether any was dropped.
    fn drop_stale(&mut self) -> bool {
        let mut dropped = false;
        for d in &mut self.dirs {
            if let Some((wd, id)) = d.watch
                && dir_id(&d.path) != Some(id)
            {
                let _ = inotify::remove_watch(self.fd.get_ref(), wd);
                d.watch = None;
                dropped = true;
            }
        }
        dropped
    }

    /// Forgets a watch the kernel removed (its directory deleted or unmounted) or that no
    /// longer watches its path (the directory moved away).
    fn forget(&mut self, wd: i32, moved: bool) {
        for d in &mut self.dirs {
            if d.watch.is_some_and(|(w, _)| w == wd) {
                if moved {
                    let _ = inotify::remove_watch(self.fd.get_ref(), wd);
                }
                tracing::info!(dir = %d.path.display(), "watched directory went away; polling until it is back");
                d.watch = None;
            }
        }
    }

    /// Reads every queued event. `Ok(true)` if there was any.
    fn drain(&mut self, buf: &mut [MaybeUninit<u8>]) -> std::io::Result<bool> {
        let mut any = false;
        let mut gone = Vec::new();
        loop {
            let res = self.fd.try_io(tokio::io::Interest::READABLE, |fd| {
                let mut reader = inotify::Reader::new(fd, &mut *buf);
                let mut events = Vec::new();
                loop {
                    match reader.next() {
                        Ok(ev) => events.push((ev.wd(), ev.events())),
                        Err(Errno::AGAIN) if events.is_empty() => {
                            return Err(std::io::ErrorKind::WouldBlock.into());
                        }
                        Err(Errno::AGAIN) => return Ok(events),
                        Err(e) => return Err(e.into()),
                    }
                    if reader.is_buffer_empty() {
                        return Ok(events);
                    }
                }
            });
            match res {
                Ok(events) => {
                    any = true;
                    for (wd, ev) in events {
                        if ev.contains(ReadFlags::IGNORED) {
                            gone.push((wd, false));
                        } else if ev.contains(ReadFlags::MOVE_SELF) {
                            gone.push((wd, true));
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        for (wd, moved) in gone {
            self.forget(wd, moved);
        }
        Ok(any)
    }

    async fn run(mut self, tx: watch::Sender<Seen>, stop: CancellationToken) {
        let mut buf = vec![MaybeUninit::<u8>::uninit(); 4096];
        let mut settle_until: Option<Instant> = None;
        let mut last_check = Instant::now();
        let bump = |tx: &watch::Sender<Seen>, watching: bool| {
            tx.send_modify(|s| {
                s.generation += 1;
                s.watching = watching;
            });
        };
        loop {
            // While some directory is unwatched it is tried every `recheck`; once all are,
            // their paths are checked on the safety poll only, so an idle proxy wakes no more
            // often than that.
            let period = if self.watching() {
                self.opts.safety_poll
            } else {
                self.opts.recheck
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
                r = self.fd.readable() => {
                    // The guard only says "readable"; `drain` reads through `try_io`, which
                    // clears the readiness once the queue is empty.
                    let r = r.map(drop);
                    let any = match r.and_then(|()| self.drain(&mut buf)) {
                        Ok(any) => any,
                        Err(error) => {
                            tracing::warn!(%error, "inotify failed; polling for changes instead");
                            return;
                        }
                    };
                    if any && settle_until.is_none() {
                        settle_until = Some(Instant::now() + self.opts.settle);
                    }
                    // A directory that went away is polled from now, not after the settle.
                    if !self.watching() && tx.borrow().watching {
                        bump(&tx, false);
                    }
                }
                _ = tokio::time::sleep_until(settle_until.unwrap_or(last_check)), if settle_until.is_some() => {
                    settle_until = None;
                    bump(&tx, self.watching());
                }
                _ = tokio::time::sleep_until(last_check + period) => {
                    last_check = Instant::now();
                    let dropped = self.drop_stale();
                    let added = self.add_missing();
                    if dropped || added {
                        // The path names another directory now: its files may differ.
                        bump(&tx, self.watching());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fast() -> Options {
        Options {
            settle: Duration::from_millis(5),
            recheck: Duration::from_millis(50),
            safety_poll: Duration::from_secs(3600),
        }
    }

    /// Whether `changes` wakes within `within`, given a consumer poll interval of an hour (so
    /// only an event or a lost watch can wake it).
    async fn wakes(changes: &mut Changes, within: Duration) -> bool {
        tokio::time::timeout(within, changes.changed(Duration::from_secs(3600)))
            .await
            .is_ok()
    }

    fn kubelet_swap(dir: &Path, gen_: u32) {
        crate::reload::tests::kubelet_write(dir, gen_, "{}", "a=\"b\"\n");
    }

    #[tokio::test]
    async fn a_kubelet_style_swap_wakes_every_consumer_and_nothing_else_does() {
        let tmp = tempfile::tempdir().unwrap();
        kubelet_swap(tmp.path(), 0);
        let stop = CancellationToken::new();
        let mut a = spawn_with(vec![tmp.path().to_path_buf()], stop.clone(), fast());
        let mut b = a.clone();
        assert!(a.watching());
        // Reading the files is not a change.
        std::fs::read(tmp.path().join("config.json")).unwrap();
        assert!(!wakes(&mut a, Duration::from_millis(300)).await);
        kubelet_swap(tmp.path(), 1);
        assert!(wakes(&mut a, Duration::from_secs(2)).await);
        // `b` was not waiting when the news came: its next wait ends at once all the same.
        assert!(wakes(&mut b, Duration::from_millis(50)).await);
        // One swap, one wake-up once settled.
        assert!(!wakes(&mut a, Duration::from_millis(300)).await);
        stop.cancel();
    }

    #[tokio::test]
    async fn an_in_place_write_wakes_the_consumer_once_the_file_is_closed() {
        let tmp = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        let mut c = spawn_with(vec![tmp.path().to_path_buf()], stop.clone(), fast());
        std::fs::write(tmp.path().join("tls.crt"), "x").unwrap();
        assert!(wakes(&mut c, Duration::from_secs(2)).await);
        // Held open and written: no wake-up until it is closed.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(tmp.path().join("tls.crt"))
            .unwrap();
        // Opening for writing is no event either.
        assert!(!wakes(&mut c, Duration::from_millis(200)).await);
        std::io::Write::write_all(&mut f, b"more").unwrap();
        assert!(!wakes(&mut c, Duration::from_millis(200)).await);
        drop(f);
        assert!(wakes(&mut c, Duration::from_secs(2)).await);
        stop.cancel();
    }

    #[tokio::test]
    async fn a_removed_directory_is_polled_until_it_is_back_and_then_watched_again() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("vol");
        // Missing at start: polled at the consumer's own interval.
        let stop = CancellationToken::new();
        let mut c = spawn_with(vec![dir.clone()], stop.clone(), fast());
        assert!(!c.watching());
        let polled = Instant::now();
        tokio::time::timeout(
            Duration::from_secs(2),
            c.changed(Duration::from_millis(100)),
        )
        .await
        .unwrap();
        assert!(polled.elapsed() < Duration::from_secs(1));
        std::fs::create_dir(&dir).unwrap();
        // The recheck finds it and wakes consumers: its files are new to them.
        assert!(wakes(&mut c, Duration::from_secs(2)).await);
        assert!(c.watching());
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        assert!(wakes(&mut c, Duration::from_secs(2)).await);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(wakes(&mut c, Duration::from_secs(2)).await);
        assert!(!c.watching(), "a removed directory is no longer watched");
        std::fs::create_dir(&dir).unwrap();
        let back = Instant::now();
        while !c.watching() {
            assert!(back.elapsed() < Duration::from_secs(2), "not watched again");
            c.changed(Duration::from_millis(20)).await;
        }
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        assert!(wakes(&mut c, Duration::from_secs(2)).await);
        stop.cancel();
    }

    #[tokio::test]
    async fn a_swapped_directory_symlink_is_followed_to_the_new_directory() {
        let tmp = tempfile::tempdir().unwrap();
        for v in ["v1", "v2"] {
            std::fs::create_dir(tmp.path().join(v)).unwrap();
        }
        let link = tmp.path().join("current");
        std::os::unix::fs::symlink("v1", &link).unwrap();
        let stop = CancellationToken::new();
        // Watched paths are checked on the safety poll (the consumer's own wait stays an hour).
        let opts = Options {
            safety_poll: Duration::from_millis(200),
            ..fast()
        };
        let mut c = spawn_with(vec![link.clone()], stop.clone(), opts);
        assert!(c.watching());
        let tmp_link = tmp.path().join("current.tmp");
        std::os::unix::fs::symlink("v2", &tmp_link).unwrap();
        std::fs::rename(&tmp_link, &link).unwrap();
        // Nothing happened inside v1; the check sees the path name v2 now.
        assert!(wakes(&mut c, Duration::from_secs(2)).await);
        std::fs::write(tmp.path().join("v2/config.json"), "{}").unwrap();
        assert!(wakes(&mut c, Duration::from_secs(2)).await);
        // v1 is no longer watched.
        std::fs::write(tmp.path().join("v1/config.json"), "{}").unwrap();
        assert!(!wakes(&mut c, Duration::from_millis(300)).await);
        stop.cancel();
    }

    #[tokio::test]
    async fn without_a_watch_consumers_poll_at_their_own_interval() {
        let mut c = Changes::polling();
        assert!(!c.watching());
        let t = Instant::now();
        c.changed(Duration::from_millis(50)).await;
        let e = t.elapsed();
        assert!(
            e >= Duration::from_millis(50) && e < Duration::from_secs(1),
            "{e:?}"
        );
    }
}
