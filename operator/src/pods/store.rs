//! The edge of the pod cache: the [`PodIndex`] behind a lock, shared by one writer (the pod
//! watch) and any number of readers, the "has synced" signal, and the watch itself.
//!
//! Readers take a [`PodSet`] snapshot (one `Arc` clone under a read lock) and never hold the
//! lock while they work; the writer holds it for one event's apply. It mirrors the reflector's
//! `Store`/`Writer` pair it replaces: `state()`, `wait_until_ready()` that fails when the
//! writer is dropped before the first list completed (its watch ended; the cache will never be
//! the cluster's), and a watch stream that yields once per event after applying it.

use std::sync::{Arc, RwLock};

use futures::{StreamExt, stream::BoxStream};
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use tokio::sync::watch as signal;

use super::index::PodIndex;
use super::set::PodSet;
use crate::compiler::SlimPod;

/// The pod cache as readers see it. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PodStore {
    index: Arc<RwLock<PodIndex>>,
    ready: signal::Receiver<bool>,
}

/// The writer was dropped before the first list completed.
#[derive(Debug, thiserror::Error)]
#[error("the pod watch ended before the pod cache synced")]
pub struct WriterDropped;

impl PodStore {
    /// The current pods (a snapshot: later changes do not show in it).
    pub fn state(&self) -> PodSet {
        self.index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .pods()
            .clone()
    }

    /// Waits for the first complete list.
    pub async fn wait_until_ready(&self) -> Result<(), WriterDropped> {
        let mut ready = self.ready.clone();
        ready
            .wait_for(|synced| *synced)
            .await
            .map(|_| ())
            .map_err(|_| WriterDropped)
    }
}

/// The only writer of a [`PodStore`]: fed the pod watcher's events.
#[derive(Debug)]
pub struct PodWriter {
    index: Arc<RwLock<PodIndex>>,
    ready: signal::Sender<bool>,
}

impl PodWriter {
    /// Applies one event ([`PodIndex::apply`]); returns whether the pods changed.
    pub fn apply_watcher_event(&mut self, event: &Event<SlimPod>) -> bool {
        let (changed, synced) = {
            let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
            (index.apply(event), index.synced())
        };
        if synced && !*self.ready.borrow() {
            self.ready.send_replace(true);
        }
        changed
    }
}

/// A new, empty pod cache.
pub fn store() -> (PodStore, PodWriter) {
    let index = Arc::new(RwLock::new(PodIndex::default()));
    let (tx, rx) = signal::channel(false);
    (
        PodStore {
            index: index.clone(),
            ready: rx,
        },
        PodWriter { index, ready: tx },
    )
}

/// Watches pods into `writer`, with the watcher's default backoff; yields once per event
/// (after applying it), as a reflector does, so every pod event still wakes the compile and
/// the discovery loop. Watch errors are logged and retried.
pub fn watch(
    api: Api<SlimPod>,
    config: watcher::Config,
    mut writer: PodWriter,
) -> BoxStream<'static, ()> {
    watcher(api, config)
        .default_backoff()
        .filter_map(move |event| {
            let out = match event {
                Ok(event) => {
                    writer.apply_watcher_event(&event);
                    Some(())
                }
                Err(e) => {
                    tracing::warn!(kind = "Pod", error = %e, "watch failed; retrying with backoff");
                    None
                }
            };
            futures::future::ready(out)
        })
        .boxed()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn pod(name: &str) -> SlimPod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "namespace": "n"}}))
            .unwrap()
    }

    #[tokio::test]
    async fn ready_after_the_first_list_and_an_error_if_the_watch_ends_before() {
        let (store, mut writer) = super::store();
        let waiting = tokio::spawn({
            let store = store.clone();
            async move { store.wait_until_ready().await }
        });
        writer.apply_watcher_event(&Event::Init);
        writer.apply_watcher_event(&Event::InitApply(pod("a")));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiting.is_finished(),
            "not ready half way through the list"
        );
        assert!(store.state().is_empty());
        writer.apply_watcher_event(&Event::InitDone);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("ready")
            .unwrap()
            .expect("synced");
        assert_eq!(store.state().len(), 1);
        // Once synced, a dropped writer does not unsync readers.
        drop(writer);
        store.wait_until_ready().await.expect("still synced");

        let (never, writer) = super::store();
        drop(writer);
        assert!(never.wait_until_ready().await.is_err());
    }
}
