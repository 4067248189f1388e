//! Response coalescing: a small response leaves the proxy as one write, not two.
//!
//! hyper hands a response over as soon as its head is parsed, and its HTTP/1.1 client reads
//! the body only once someone polls for it. So the server that forwards the response (the
//! inbound proxy's HTTP/2 stream to the peer sidecar, the outbound proxy's HTTP/1.1 connection
//! to the application) writes the head, flushes it, and writes the body a wakeup later: two
//! TLS records, two segments, and on the far side two reads, two wakeups and two writes to the
//! application. With two worker threads, `strace` of a Trellis pair showed the response split
//! like this on about half the requests (with one worker thread the tasks happen to run in an
//! order that already coalesces them, and this changes nothing).
//!
//! [`prefetch`] waits, briefly, for the body's first frame before the response is returned, so
//! head and first chunk are written together. It only does so where waiting cannot be seen:
//! the body's length is known (`Content-Length`, so not a stream whose head the client needs
//! early: server-sent events, gRPC streams and chunked downloads pass untouched), non-zero,
//! and at most [`MAX_PREFETCH_BYTES`]; and it waits at most [`PREFETCH_WAIT`]. A body that is
//! not there by then goes out as before, head first.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::traffic::{Body, BoxError};

/// Responses with a known length up to this are coalesced; larger ones are written in many
/// pieces anyway, where one more makes no difference.
pub const MAX_PREFETCH_BYTES: u64 = 64 * 1024;

/// The longest a response head is held back for its body. The body normally arrives in the
/// same read as the head (it is already in the connection's buffer), so this only bounds the
/// odd server that sends a known-length body late.
pub const PREFETCH_WAIT: Duration = Duration::from_millis(1);

/// The response with its body's first frame already read, when the body is small, of known
/// length and arrives within `wait`; otherwise the response as it was.
pub async fn prefetch(resp: Response<Body>, wait: Duration) -> Response<Body> {
    if !worth_prefetching(resp.body()) {
        return resp;
    }
    let (parts, mut body) = resp.into_parts();
    // Nearly always the body is already there (it came in the same read as the head, and a
    // pooled HTTP/1.1 connection delivers it in the same poll): take it without arming the
    // timeout, which costs a clock read and a timer handle per response. A body that is not
    // there yet is polled again below with this task's waker.
    let ready = {
        let mut quiet = Context::from_waker(std::task::Waker::noop());
        Pin::new(&mut body).poll_frame(&mut quiet)
    };
    if let Poll::Ready(first) = ready {
        let rest = body;
        return Response::from_parts(parts, Prefetched { first, rest }.boxed());
    }
    let first = match tokio::time::timeout(wait, body.frame()).await {
        Ok(Some(frame)) => Some(frame),
        // Ended without a frame (the length lied): the body reports the end itself.
        Ok(None) => None,
        // Not there in time: forward as usual. Dropping the `frame()` future loses nothing.
        Err(_) => return Response::from_parts(parts, body),
    };
    Response::from_parts(parts, Prefetched { first, rest: body }.boxed())
}

/// Whether [`prefetch`] may hold the head back for this body.
fn worth_prefetching(body: &Body) -> bool {
    !body.is_end_stream()
        && body
            .size_hint()
            .exact()
            .is_some_and(|n| n > 0 && n <= MAX_PREFETCH_BYTES)
}

/// A body whose first frame (or error) was read ahead.
struct Prefetched {
    first: Option<Result<Frame<Bytes>, BoxError>>,
    rest: Body,
}

impl HttpBody for Prefetched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(first));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let ahead = match &self.first {
            Some(Ok(f)) => f.data_ref().map_or(0, |d| d.len() as u64),
            _ => 0,
        };
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + ahead);
        if let Some(u) = rest.upper() {
            hint.set_upper(u + ahead);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use http_body_util::{Full, StreamBody};
    use std::time::Instant;

    /// A body of `len` bytes (declared up front, like `Content-Length`) whose data is sent on
    /// the returned channel, or a stream of unknown length when `len` is `None`.
    fn channel_body(len: Option<u64>) -> (tokio::sync::mpsc::Sender<Bytes>, Body) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, BoxError>(Frame::data(b)), rx))
        });
        let body = Sized {
            inner: StreamBody::new(stream),
            len,
        };
        (tx, body.boxed())
    }

    pin_project_lite::pin_project! {
        struct Sized<B> { #[pin] inner: B, len: Option<u64> }
    }

    impl<B: HttpBody<Data = Bytes, Error = BoxError>> HttpBody for Sized<B> {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            // Counts down like hyper's `Content-Length` bodies do.
            let this = self.project();
            let r = this.inner.poll_frame(cx);
            if let (Poll::Ready(Some(Ok(f))), Some(len)) = (&r, this.len.as_mut())
                && let Some(d) = f.data_ref()
            {
                *len = len.saturating_sub(d.len() as u64);
            }
            r
        }
        fn size_hint(&self) -> SizeHint {
            self.len.map(SizeHint::with_exact).unwrap_or_default()
        }
    }

    /// Whether the body's next frame is there without waiting.
    fn next_ready(body: &mut Body) -> bool {
        body.frame().now_or_never().is_some()
    }

    #[tokio::test]
    async fn a_small_body_that_follows_its_head_is_read_with_it() {
        let (tx, body) = channel_body(Some(5));
        // The body arrives just after the head, as when hyper reads it on the next poll.
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            tx.send(Bytes::from_static(b"hello")).await.unwrap();
        });
        let resp = prefetch(Response::new(body), Duration::from_secs(5)).await;
        let mut body = resp.into_body();
        assert_eq!(body.size_hint().exact(), Some(5));
        let first = body.frame().now_or_never().expect("first frame read ahead");
        assert_eq!(first.unwrap().unwrap().into_data().unwrap(), "hello");
    }

    /// A body already there is taken without the timeout: this runtime has no timer, and
    /// arming one would panic.
    #[test]
    fn a_body_already_there_is_taken_without_a_timer() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (tx, body) = channel_body(Some(5));
        tx.try_send(Bytes::from_static(b"hello")).unwrap();
        let resp = rt.block_on(prefetch(Response::new(body), Duration::from_secs(5)));
        let mut body = resp.into_body();
        let first = body.frame().now_or_never().expect("first frame read ahead");
        assert_eq!(first.unwrap().unwrap().into_data().unwrap(), "hello");
    }

    #[tokio::test]
    async fn a_stream_of_unknown_length_is_not_held_back() {
        // Server-sent events: the head must reach the client before any event exists.
        let (_tx, body) = channel_body(None);
        let started = Instant::now();
        let resp = prefetch(Response::new(body), Duration::from_secs(5)).await;
        assert!(started.elapsed() < Duration::from_secs(1));
        let mut body = resp.into_body();
        assert!(!next_ready(&mut body), "nothing was read ahead");
    }

    #[tokio::test]
    async fn a_late_body_waits_at_most_the_bound() {
        let (tx, body) = channel_body(Some(5));
        let started = Instant::now();
        let resp = prefetch(Response::new(body), Duration::from_millis(20)).await;
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(20), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
        // The body still arrives in full afterwards.
        tx.send(Bytes::from_static(b"hello")).await.unwrap();
        drop(tx);
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got, "hello");
    }

    #[tokio::test]
    async fn large_and_empty_bodies_are_left_alone() {
        let (_tx, body) = channel_body(Some(MAX_PREFETCH_BYTES + 1));
        let started = Instant::now();
        let resp = prefetch(Response::new(body), Duration::from_secs(5)).await;
        assert!(started.elapsed() < Duration::from_secs(1));
        let mut body = resp.into_body();
        assert!(!next_ready(&mut body));

        let empty = Full::new(Bytes::new()).map_err(|e| match e {}).boxed();
        let resp = prefetch(Response::new(empty), Duration::from_secs(5)).await;
        assert!(resp.body().is_end_stream());
    }

    #[tokio::test]
    async fn a_body_error_is_passed_on_not_lost() {
        let stream =
            futures::stream::iter([Err::<Frame<Bytes>, BoxError>("upstream reset".into())]);
        let body = Sized {
            inner: StreamBody::new(stream),
            len: Some(10),
        }
        .boxed();
        let resp = prefetch(Response::new(body), Duration::from_secs(5)).await;
        let err = resp.into_body().collect().await.unwrap_err();
        assert_eq!(err.to_string(), "upstream reset");
    }
}
