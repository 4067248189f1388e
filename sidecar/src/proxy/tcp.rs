//! L4: splices two streams and counts what passed.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::MissedTickBehavior;

use crate::metrics::{ByteCount, OpenConn, TcpBytesMeter, TcpLabels};

use super::Shared;
use super::upstream::Io;

/// How often an open connection publishes its byte counts to `tcp_transfer_bytes` (the rest is
/// published at close). Istio's default `tcpReportingDuration`: fine enough that `rate()` over
/// the usual 15 to 60 s scrape interval follows a long-lived connection (database session,
/// WebSocket, opaque gRPC stream) instead of seeing one jump at close, coarse enough that the
/// timer wake-up it costs every connection, idle ones included, stays negligible.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(15);

/// Copies both ways until both sides close (half-close is propagated), publishing the bytes
/// copied every `shared.tcp_flush_interval` and when the copy ends or is cancelled.
pub async fn splice<A: Io, B: Io>(shared: &Shared, client: A, upstream: B, labels: TcpLabels) {
    splice_until(shared, client, upstream, labels, std::future::pending()).await
}

/// How long a revoked splice waits for each side to take its close (TLS close_notify, FIN)
/// before the sockets are simply dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// [`splice`] that ends early when `until` resolves (the peer's certificate expired or its root
/// left the bundle, see [`super::peer_trust`]): copying stops and both sides are shut down
/// cleanly, so each end reads a normal end of stream instead of a reset.
pub async fn splice_until<A: Io, B: Io>(
    shared: &Shared,
    client: A,
    upstream: B,
    labels: TcpLabels,
    until: impl std::future::Future<Output = ()>,
) {
    let open = OpenConn::new(&shared.metrics, &labels);
    let meter = TcpBytesMeter::new(&shared.metrics, &labels);
    let mut client = Counted::new(client, meter.to_client());
    let mut upstream = Counted::new(upstream, meter.from_client());
    let revoked = {
        let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        tokio::pin!(copy);
        tokio::pin!(until);
        let every = shared.tcp_flush_interval;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        // Ticks missed on a busy runtime are not worth a burst of catch-up flushes.
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                r = &mut copy => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "tcp splice ended with an error");
                    }
                    break false;
                }
                _ = &mut until => break true,
                _ = tick.tick() => meter.flush(),
            }
        }
    };
    if revoked {
        tracing::debug!(
            dst_service = %labels.dst_service,
            "tcp connection closed: the peer's certificate expired or is no longer trusted"
        );
        use tokio::io::AsyncWriteExt;
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            let _ = tokio::join!(client.shutdown(), upstream.shutdown());
        })
        .await;
    }
    // Bytes first, then the open gauge: a scrape that sees the connection gone sees all of its
    // bytes. Cancellation drops them in the same order (reverse declaration).
    drop(meter);
    drop(open);
}

/// A stream that counts the bytes written into it, i.e. the bytes the copy loop delivered to
/// this side (a read that could not be written on is not counted, as `copy_bidirectional`'s own
/// totals do not count it).
struct Counted<S> {
    inner: S,
    written: ByteCount,
}

impl<S> Counted<S> {
    fn new(inner: S, written: ByteCount) -> Self {
        Self { inner, written }
    }

    fn count(&self, r: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = r {
            self.written.add(n);
        }
        r
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.count(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.count(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
