//! The bounded queue between requests and the OTLP exporter.
//!
//! The OpenTelemetry SDK's batch processor drops spans when its queue is full but does not
//! report how many, and the mesh promises a counter (`trellis_proxy_spans_dropped_total`). So
//! requests hand finished spans to a bounded channel with `try_send` (never waiting), and one
//! task drains it in batches into `opentelemetry-otlp`'s exporter. A full queue, or a batch the
//! collector did not take (down, slow past the timeout, refusing), is counted as dropped:
//! requests never wait for the collector and memory stays bounded by [`QUEUE`].

use std::time::Duration;

use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Spans waiting for export. A span is a few hundred bytes with its attributes, so this bounds
/// the backlog to about a megabyte while riding out a collector hiccup of a second or two at
/// ~1000 sampled requests per second. The OpenTelemetry SDK's default queue is the same size.
pub const QUEUE: usize = 2048;
/// Spans per export call (the SDK's default batch size).
pub const MAX_BATCH: usize = 512;
/// How long a span may wait for companions before a partial batch goes out.
pub const BATCH_DELAY: Duration = Duration::from_millis(500);
/// An export slower than this counts as failed; its spans are dropped and the next batch goes.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The request side of the queue.
#[derive(Clone, Debug)]
pub struct Queue {
    tx: mpsc::Sender<SpanData>,
    dropped: Counter,
    /// Cancelled when the export task has sent (or dropped) its last batch.
    finished: CancellationToken,
}

impl Queue {
    /// Starts the export task on the current runtime. It ends once every [`Queue`] clone is
    /// dropped and the backlog is sent (or dropped).
    pub fn start<E: SpanExporter + 'static>(exporter: E, dropped: Counter) -> Self {
        Self::start_with(exporter, dropped, BATCH_DELAY, EXPORT_TIMEOUT)
    }

    /// [`Queue::start`] with other delays, so tests need not wait seconds.
    pub fn start_with<E: SpanExporter + 'static>(
        exporter: E,
        dropped: Counter,
        batch_delay: Duration,
        export_timeout: Duration,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let finished = CancellationToken::new();
        let done = finished.clone().drop_guard();
        let counter = dropped.clone();
        tokio::spawn(async move {
            let _done = done;
            run(rx, exporter, counter, batch_delay, export_timeout).await
        });
        Self {
            tx,
            dropped,
            finished,
        }
    }

    /// Resolves once every clone of this queue is dropped and the backlog is exported (or
    /// dropped): what a stopping proxy waits for, so its last spans are not lost.
    pub fn finished(&self) -> CancellationToken {
        self.finished.clone()
    }

    /// Queues one span, or counts it as dropped when the queue is full. Never waits.
    pub fn push(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

async fn run<E: SpanExporter>(
    mut rx: mpsc::Receiver<SpanData>,
    exporter: E,
    dropped: Counter,
    batch_delay: Duration,
    timeout: Duration,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            break;
        }
        // Give a partial batch a moment to fill, so a trickle of requests is not one export
        // call per span.
        let deadline = tokio::time::sleep(batch_delay);
        tokio::pin!(deadline);
        let mut closed = false;
        while batch.len() < MAX_BATCH && !closed {
            let room = MAX_BATCH - batch.len();
            tokio::select! {
                n = rx.recv_many(&mut batch, room) => closed = n == 0,
                _ = &mut deadline => break,
            }
        }
        let n = batch.len() as u64;
        let sent = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
        match tokio::time::timeout(timeout, exporter.export(sent)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                dropped.inc_by(n);
                tracing::debug!(error = %e, spans = n, "span export failed; spans dropped");
            }
            Err(_) => {
                dropped.inc_by(n);
                tracing::debug!(spans = n, "span export timed out; spans dropped");
            }
        }
        if closed {
            break;
        }
    }
    let _ = exporter.shutdown();
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_sdk::error::OTelSdkResult;
    use std::sync::{Arc, Mutex};

    /// An exporter that never finishes (a collector that accepted the connection and hangs).
    #[derive(Debug, Clone, Default)]
    struct Stuck(Arc<Mutex<usize>>);

    impl SpanExporter for Stuck {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            *self.0.lock().unwrap() += batch.len();
            std::future::pending().await
        }
    }

    fn span() -> SpanData {
        use opentelemetry::trace::{SpanContext, SpanKind, Status};
        SpanData {
            span_context: SpanContext::empty_context(),
            parent_span_id: opentelemetry::trace::SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Server,
            name: "GET".into(),
            start_time: std::time::SystemTime::now(),
            end_time: std::time::SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        }
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
        let q = Queue::start_with(
            stuck.clone(),
            dropped.clone(),
            Duration::from_millis(20),
            timeout,
        );
        for _ in 0..MAX_BATCH {
            q.push(span());
        }
        eventually("the first batch went to the exporter", || {
            *stuck.0.lock().unwrap() == MAX_BATCH
        })
        .await;
        // The exporter hangs: the queue takes QUEUE more spans, and no request waits for it.
        let started = std::time::Instant::now();
        for _ in 0..QUEUE + 100 {
            q.push(span());
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
}
