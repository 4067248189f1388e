//! Child processes of `trellis dev`: started each in its own process group (so a Ctrl-C in the
//! terminal reaches only `trellis dev`, which then stops them in order), logged to files in the
//! state directory, always reaped, and stopped by the kernel if `trellis dev` dies without
//! stopping them ([`exit_with_parent`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process_group};
use tokio::process::{Child, Command};

/// Why a child could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("start {name}: {source}")]
    Spawn {
        name: String,
        source: std::io::Error,
    },
    #[error("log file {}: {source}", path.display())]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A running child.
pub struct Proc {
    /// What it is (`catalog-0 sidecar`), for the display and errors.
    pub name: String,
    pub log: PathBuf,
    child: Child,
    /// Set once the child is reaped.
    pub exited: Option<std::process::ExitStatus>,
}

impl Proc {
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Checks, without blocking, whether the child has exited.
    pub fn poll(&mut self) -> Option<std::process::ExitStatus> {
        if self.exited.is_none()
            && let Ok(Some(st)) = self.child.try_wait()
        {
            self.exited = Some(st);
        }
        self.exited
    }

    /// Asks the child's process group to stop (SIGTERM): a proxy drains, a load client writes
    /// its final counts.
    pub fn terminate(&mut self) {
        if self.poll().is_none() {
            signal_group(self, Signal::TERM);
        }
    }

    /// Stops the child's process group at once (SIGKILL).
    pub fn kill(&mut self) {
        if self.poll().is_none() {
            signal_group(self, Signal::KILL);
            let _ = self.child.start_kill();
        }
    }

    /// The last lines of the child's log, for an error report.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Starts `program args...` with stdout and stderr appended to `log`.
pub fn spawn(
    name: &str,
    program: &Path,
    args: &[String],
    env: &[(&str, String)],
    log: &Path,
) -> Result<Proc, SuperviseError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| SuperviseError::Log {
            path: log.to_path_buf(),
            source,
        })?;
    let err_file = file.try_clone().map_err(|source| SuperviseError::Log {
        path: log.to_path_buf(),
        source,
    })?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err_file))
        // Its own process group: terminal signals go to `trellis dev` only, and stopping the
        // group also stops anything the child started.
        .process_group(0)
        // Last line of defence if `trellis dev` unwinds without running its shutdown.
        .kill_on_drop(true);
    cmd.env(
        PARENT_ENV,
        rustix::process::getpid().as_raw_nonzero().to_string(),
    );
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().map_err(|source| SuperviseError::Spawn {
        name: name.to_string(),
        source,
    })?;
    Ok(Proc {
        name: name.to_string(),
        log: log.to_path_buf(),
        child,
        exited: None,
    })
}

/// Set on every child: the pid of the `trellis dev` that started it.
pub const PARENT_ENV: &str = "TRELLIS_DEV_PARENT";

/// Called first thing by the `trellis proxy` and `trellis demo-service` children: when
/// `trellis dev` is SIGKILLed (or crashes) its shutdown never runs, so the kernel is asked to
/// send this process SIGTERM when its parent goes away; it then drains and exits instead of
/// holding the dev ports forever. (The workspace forbids `unsafe`, so this runs in the child
/// rather than in a `pre_exec` hook.) The death signal follows the parent *thread* that forked,
/// a runtime worker that lives as long as `trellis dev`. If the parent is already gone (it died
/// before this ran), the process exits at once.
pub fn exit_with_parent() {
    let Some(parent) = std::env::var(PARENT_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    if let Err(e) = rustix::process::set_parent_process_death_signal(Some(Signal::TERM)) {
        eprintln!("trellis: cannot ask to be stopped with trellis dev: {e}");
        return;
    }
    if rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) != Some(parent) {
        eprintln!("trellis: trellis dev (pid {parent}) exited before this process started");
        std::process::exit(1);
    }
}

fn signal_group(p: &Proc, sig: Signal) {
    if let Some(pid) = p.pid().and_then(|id| Pid::from_raw(id as i32)) {
        // ESRCH (already gone) is fine: the child is reaped below either way.
        let _ = kill_process_group(pid, sig);
    }
}

/// Stops every child: SIGTERM to each process group (the proxies drain), then SIGKILL to
/// whatever is still running after `grace`, and reaps them all. Returns the names of the
/// children that needed SIGKILL.
pub async fn stop_all(procs: &mut [Proc], grace: Duration) -> Vec<String> {
    for p in procs.iter_mut() {
        if p.poll().is_none() {
            signal_group(p, Signal::TERM);
        }
    }
    let deadline = tokio::time::Instant::now() + grace;
    let mut killed = Vec::new();
    for p in procs.iter_mut() {
        if p.exited.is_some() {
            continue;
        }
        match tokio::time::timeout_at(deadline, p.child.wait()).await {
            Ok(Ok(st)) => p.exited = Some(st),
            _ => {
                signal_group(p, Signal::KILL);
                let _ = p.child.start_kill();
                if let Ok(st) = p.child.wait().await {
                    p.exited = Some(st);
                }
                killed.push(p.name.clone());
            }
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Live (non-zombie) processes of a process group, from /proc.
    fn live_members(pgid: u32) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid pgrp ...
            let Some(after) = stat.rsplit_once(") ").map(|x| x.1) else {
                continue;
            };
            let f: Vec<&str> = after.split_whitespace().collect();
            if f.len() > 2 && f[2] == pgid.to_string() && f[0] != "Z" {
                out.push(stat);
            }
        }
        out
    }

    #[tokio::test]
    async fn children_are_stopped_and_reaped_with_their_groups() {
        let d = tempfile::tempdir().unwrap();
        let sh = Path::new("/bin/sh");
        // One child that exits on SIGTERM, one that ignores it (and starts a grandchild).
        let polite = spawn(
            "polite",
            sh,
            &["-c".into(), "sleep 30".into()],
            &[],
            &d.path().join("a.log"),
        )
        .unwrap();
        let stubborn = spawn(
            "stubborn",
            sh,
            &[
                "-c".into(),
                "trap '' TERM; sleep 30 & wait; sleep 30".into(),
            ],
            &[],
            &d.path().join("b.log"),
        )
        .unwrap();
        let pids: Vec<u32> = [&polite, &stubborn]
            .iter()
            .filter_map(|p| p.pid())
            .collect();
        let mut procs = vec![polite, stubborn];
        tokio::time::sleep(Duration::from_millis(100)).await;
        let killed = stop_all(&mut procs, Duration::from_millis(500)).await;
        assert_eq!(killed, vec!["stubborn".to_string()]);
        for p in &procs {
            assert!(p.exited.is_some(), "{} reaped", p.name);
        }
        // No live process is left in either group (grandchildren are reaped by init, which
        // may take a moment: zombies do not count).
        for pid in pids {
            let mut live = Vec::new();
            for _ in 0..40 {
                live = live_members(pid);
                if live.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(live.is_empty(), "group {pid} still has {live:?}");
        }
    }
}
