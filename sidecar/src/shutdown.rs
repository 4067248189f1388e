//! Graceful shutdown: one signal (SIGTERM, SIGINT or `POST /shutdown`), listeners stop
//! accepting, HTTP connections finish their in-flight requests and close, and the process
//! waits for every connection task up to the drain deadline.
//!
//! The drain has two phases. The inbound side stops first: its listener closes and its
//! connections finish what they are serving. The outbound side keeps accepting until then,
//! because the application is still answering those inbound requests and may need new
//! connections through the proxy to do it (a request that lands as the pod starts to stop,
//! whose handler calls another Service); closing outbound at the signal turned such requests
//! into 5xx. Once inbound is drained (or the deadline passes), outbound closes and drains too.
//! This is the order Kubernetes' own termination implies: callers stop sending to a
//! terminating pod, and the pod's outgoing calls must keep working while it finishes.

use std::time::Duration;

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// Shared by every listener and connection task. Cheap to clone.
#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
    /// Inbound connection tasks (also in `tracker`): the first phase of the drain.
    inbound: TaskTracker,
    /// Cancelled once the inbound side is drained: outbound stops accepting and drains.
    outbound: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the shutdown (idempotent).
    pub fn trigger(&self) {
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once shutdown has started.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Connection tasks are spawned here so the drain can wait for them.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Inbound connection tasks are also tracked here: the outbound side closes after them.
    pub fn inbound_tracker(&self) -> &TaskTracker {
        &self.inbound
    }

    /// What the outbound side stops on: cancelled once the inbound side is drained, never
    /// before shutdown starts.
    pub fn outbound_token(&self) -> CancellationToken {
        self.outbound.clone()
    }

    /// Waits for the tracked tasks, at most `deadline`: first the inbound connections, then,
    /// with outbound closed, everything else. Returns whether everything finished.
    pub async fn drain(&self, deadline: Duration) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        self.tracker.close();
        self.inbound.close();
        let open = self.tracker.len();
        if open > 0 {
            tracing::info!(connections = open, ?deadline, "draining");
        }
        let _ = tokio::time::timeout_at(until, self.inbound.wait()).await;
        self.outbound.cancel();
        let done = tokio::time::timeout_at(until, self.tracker.wait())
            .await
            .is_ok();
        if !done {
            tracing::warn!(
                connections = self.tracker.len(),
                "drain deadline passed; closing the rest"
            );
        }
        done
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_tasks_then_gives_up_at_the_deadline() {
        let s = Shutdown::new();
        s.tracker()
            .spawn(tokio::time::sleep(Duration::from_millis(20)));
        assert!(s.drain(Duration::from_secs(5)).await);
        let s = Shutdown::new();
        s.tracker()
            .spawn(tokio::time::sleep(Duration::from_secs(60)));
        assert!(!s.drain(Duration::from_millis(20)).await);
    }
}
