//! The bounded queue between requests and the OTLP exporter, and the thread that exports.
//!
//! The OpenTelemetry SDK's batch processor drops spans when its queue is full but does not
//! report how many, and the mesh promises a counter (`trellis_proxy_spans_dropped_total`). So
//! requests hand finished spans' [`Record`]s to a bounded channel with `try_send` (never
//! waiting), and one thread drains it in batches into `opentelemetry-otlp`'s exporter. A full
//! queue, or a batch the collector did not take (down, slow past the timeout, refusing), is
//! counted as dropped: requests never wait for the collector and memory stays bounded by
//! [`QUEUE`].
//!
//! Why a thread of its own (issue #15), with its own current-thread runtime: the proxy runs by
//! default on one current-thread runtime, and an export (building the `SpanData`, grouping and
//! protobuf-encoding the batch, the HTTP or gRPC round trip) used to run between requests on
//! that same thread. Under callgrind an export costs ~45 000 instructions plus 13 000 (small
//! batches) to 36 000 (batches of hundreds) per span, and while it ran every request waited: the p99 of a sampled-at-1 % proxy rose
//! from 0.22 to 0.49 ms over the untraced one in `hack/bench-proxy.sh --tracing`. On its own
//! thread the export's CPU is still the sidecar's, but it no longer stalls requests and can
//! use another core when there is one.
//!
//! The request side wakes the thread at most twice per batch: when a span arrives at an empty
//! queue (the receiver waits on it) and when a full batch is waiting ([`MAX_BATCH`] queued).
//! Spans in between land in the channel without a wake-up: the thread sleeps out the batch
//! delay instead of being woken per span (a cross-thread wake is a system call on the request
//! thread). An empty queue means no timer at all, so an idle traced sidecar stays asleep.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::InstrumentationScope;
use opentelemetry_sdk::trace::SpanExporter;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::record::Record;

/// Spans waiting for export. A span is a few hundred bytes with its attributes, so this bounds
/// the backlog to about a megabyte while riding out a collector hiccup of a second or two at
/// ~1000 sampled requests per second. The OpenTelemetry SDK's default queue is the same size.
pub const QUEUE: usize = 2048;
/// Spans per export call (the SDK's default batch size).
pub const MAX_BATCH: usize = 512;
/// How long a span may wait for companions before a partial batch goes out (a full batch goes
/// at once). An export has a fixed cost besides its spans (under callgrind ~45 000
/// instructions, two thread wake-ups and a few system calls for the HTTP round trip, against
/// ~13 000 instructions per span in small batches): at 1 % of 1000 requests/s, 500 ms meant
/// five spans per export, and the fixed part was 40 % of the export work. 2 s puts ~20 spans
/// in such a batch; longer would save under 0.05 % of a sidecar's CPU there while traces show
/// up later (the OpenTelemetry SDK's default is 5 s).
pub const BATCH_DELAY: Duration = Duration::from_secs(2);
/// An export slower than this counts as failed; its spans are dropped and the next batch goes.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The request side of the queue. Dropping it closes the queue: the export thread sends what
/// is left, shuts the exporter down and ends.
#[derive(Debug)]
pub struct Queue {
    /// `None` only while dropping.
    tx: Option<mpsc::Sender<Record>>,
    /// Tells the export thread that a full batch waits (or that the queue closed), so it need
    /// not sleep out the batch delay.
    wake: Arc<Notify>,
    dropped: Counter,
    /// Cancelled when the export thread has sent (or dropped) its last batch.
    finished: CancellationToken,
}

impl Queue {
    /// Starts the export thread; `build` makes the exporter inside that thread's runtime. An
    /// error from `build` (or no thread) is returned here and nothing keeps running.
    pub fn start<E, B>(
        build: B,
        scope: InstrumentationScope,
        dropped: Counter,
    ) -> Result<Self, String>
    where
        E: SpanExporter + 'static,
        B: FnOnce() -> Result<E, String> + Send + 'static,
    {
        Self::start_with(build, scope, dropped, BATCH_DELAY, EXPORT_TIMEOUT)
    }

    /// [`Queue::start`] with other delays, so tests need not wait seconds.
    pub fn start_with<E, B>(
        build: B,
        scope: InstrumentationScope,
        dropped: Counter,
        batch_delay: Duration,
        export_timeout: Duration,
    ) -> Result<Self, String>
    where
        E: SpanExporter + 'static,
        B: FnOnce() -> Result<E, String> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(QUEUE);
        let wake = Arc::new(Notify::new());
        let finished = CancellationToken::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let exporter = Exporter {
            rx,
            wake: wake.clone(),
            dropped: dropped.clone(),
            scope,
            batch_delay,
            timeout: export_timeout,
        };
        let done = finished.clone().drop_guard();
        std::thread::Builder::new()
            .name("trellis-spans".into())
            .spawn(move || {
                let _done = done;
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("span export runtime: {e}")));
                        return;
                    }
                };
                let built = {
                    let _in = rt.enter();
                    build()
                };
                match built {
                    Ok(e) => {
                        let _ = ready_tx.send(Ok(()));
                        rt.block_on(exporter.run(e));
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| format!("cannot start the span export thread: {e}"))?;
        ready_rx
            .recv()
            .map_err(|_| "the span export thread ended at start".to_owned())??;
        Ok(Self {
            tx: Some(tx),
            wake,
            dropped,
            finished,
        })
    }

    /// Resolves once the queue is dropped and the backlog is exported (or dropped): what a
    /// stopping proxy waits for, so its last spans are not lost.
    pub fn finished(&self) -> CancellationToken {
        self.finished.clone()
    }

    /// Queues one span, or counts it as dropped when the queue is full. Never waits.
    pub fn push(&self, span: Record) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(span).is_err() {
            self.dropped.inc();
        } else if tx.capacity() == QUEUE - MAX_BATCH {
            // A full batch waits: no reason to sit out the rest of the batch delay.
            self.wake.notify_one();
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // Close the channel first, then wake the thread, so it sends the rest at once instead
        // of after the batch delay (a stopping proxy waits for it).
        drop(self.tx.take());
        self.wake.notify_one();
    }
}

/// The export thread's side.
struct Exporter {
    rx: mpsc::Receiver<Record>,
    wake: Arc<Notify>,
    dropped: Counter,
    scope: InstrumentationScope,
    batch_delay: Duration,
    timeout: Duration,
}

impl Exporter {
    async fn run<E: SpanExporter>(mut self, exporter: E) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            // The first span of a batch: nothing else (no timer) runs while the queue is empty.
            if self.rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
                break;
            }
            // Let a partial batch fill, so a trickle of requests is not one export per span,
            // without being woken for each span that arrives.
            if batch.len() < MAX_BATCH {
                tokio::select! {
                    _ = tokio::time::sleep(self.batch_delay) => {}
                    _ = self.wake.notified() => {}
                }
            }
            // Everything queued by now, in batches of at most MAX_BATCH.
            let mut closed = false;
            loop {
                while batch.len() < MAX_BATCH {
                    match self.rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    }
                }
                let full = batch.len() == MAX_BATCH;
                self.export(&exporter, &mut batch).await;
                if closed || !full {
                    break;
                }
            }
            if closed {
                break;
            }
        }
        let _ = exporter.shutdown();
    }

    async fn export<E: SpanExporter>(&self, exporter: &E, batch: &mut Vec<Record>) {
        let n = batch.len() as u64;
        if n == 0 {
            return;
        }
        let spans = batch
            .drain(..)
            .map(|r| r.into_span_data(&self.scope))
            .collect();
        match tokio::time::timeout(self.timeout, exporter.export(spans)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.dropped.inc_by(n);
                tracing::debug!(error = %e, spans = n, "span export failed; spans dropped");
            }
            Err(_) => {
                self.dropped.inc_by(n);
                tracing::debug!(spans = n, "span export timed out; spans dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::SpanData;
    use std::sync::Mutex;
    use std::time::Instant;

    /// An exporter that never finishes (a collector that accepted the connection and hangs).
    #[derive(Debug, Clone, Default)]
    struct Stuck(Arc<Mutex<usize>>);

    impl SpanExporter for Stuck {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            *self.0.lock().unwrap() += batch.len();
            std::future::pending().await
        }
    }

    /// An exporter that holds its thread for a while on every batch, as encoding a big batch
    /// does, then takes it.
    #[derive(Debug, Clone, Default)]
    struct Busy(Arc<Mutex<usize>>);

    impl SpanExporter for Busy {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            std::thread::sleep(Duration::from_millis(300));
            *self.0.lock().unwrap() += batch.len();
            Ok(())
        }
    }

    fn start<E: SpanExporter + Clone + 'static>(
        e: &E,
        dropped: &Counter,
        batch_delay: Duration,
        timeout: Duration,
    ) -> Queue {
        let e = e.clone();
        Queue::start_with(
            move || Ok(e),
            InstrumentationScope::default(),
            dropped.clone(),
            batch_delay,
            timeout,
        )
        .unwrap()
    }

    async fn eventually(what: &str, f: impl Fn() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what}");
    }

    #[tokio::test]
    async fn a_hung_collector_bounds_the_queue_and_counts_drops() {
        let stuck = Stuck::default();
        let dropped = Counter::default();
        let timeout = Duration::from_millis(300);
        let q = start(&stuck, &dropped, Duration::from_millis(20), timeout);
        for _ in 0..MAX_BATCH {
            q.push(Record::sample());
        }
        eventually("the first batch went to the exporter", || {
            *stuck.0.lock().unwrap() == MAX_BATCH
        })
        .await;
        // The exporter hangs: the queue takes QUEUE more spans, and no request waits for it.
        let started = Instant::now();
        for _ in 0..QUEUE + 100 {
            q.push(Record::sample());
        }
        assert!(
            started.elapsed() < timeout,
            "pushing waited for the exporter"
        );
        assert_eq!(dropped.get(), 100, "what the full queue could not take");
        // The hung export times out: its batch is dropped too, and the next batch goes.
        eventually("the timed-out batch is counted", || {
            dropped.get() == 100 + MAX_BATCH as u64
        })
        .await;
        eventually("the next batch went", || {
            *stuck.0.lock().unwrap() == 2 * MAX_BATCH
        })
        .await;
    }

    /// Issue #15's p99: an export that keeps its thread busy (encoding, I/O set-up) must not
    /// hold up the proxy's own (current-thread) runtime, where every request runs.
    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_export_does_not_stall_the_request_thread() {
        let busy = Busy::default();
        let q = start(
            &busy,
            &Counter::default(),
            Duration::from_millis(1),
            EXPORT_TIMEOUT,
        );
        q.push(Record::sample());
        // Ticks of 5 ms on this thread while the export runs: none may come late by the
        // export's 300 ms.
        let mut worst = Duration::ZERO;
        let until = Instant::now() + Duration::from_millis(600);
        while Instant::now() < until {
            let t = Instant::now();
            tokio::time::sleep(Duration::from_millis(5)).await;
            worst = worst.max(t.elapsed());
        }
        assert_eq!(*busy.0.lock().unwrap(), 1, "the export ran meanwhile");
        assert!(
            worst < Duration::from_millis(150),
            "this thread stalled for {worst:?}"
        );
    }

    /// A queue dropped while its spans wait out a long batch delay sends them at once: a
    /// stopping proxy gets its last spans out well within its flush deadline.
    #[tokio::test]
    async fn a_closed_queue_sends_its_backlog_without_waiting_for_the_batch_delay() {
        let busy = Busy::default();
        let q = start(
            &busy,
            &Counter::default(),
            Duration::from_secs(30),
            EXPORT_TIMEOUT,
        );
        for _ in 0..3 {
            q.push(Record::sample());
        }
        let finished = q.finished();
        drop(q);
        tokio::time::timeout(Duration::from_secs(5), finished.cancelled())
            .await
            .expect("the export thread finished");
        assert_eq!(*busy.0.lock().unwrap(), 3);
    }

    #[test]
    fn an_exporter_that_cannot_be_built_is_an_error_at_start() {
        let e = Queue::start(
            || Err::<Stuck, _>("no such collector".to_owned()),
            InstrumentationScope::default(),
            Counter::default(),
        )
        .unwrap_err();
        assert_eq!(e, "no such collector");
    }
}
