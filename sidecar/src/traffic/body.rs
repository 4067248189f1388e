//! Bodies: a request body that can be replayed for a retry, and a response body that carries
//! the in-flight accounting until the response ends.
//!
//! The request body is not collected up front: a streaming client (gRPC client or bidi
//! streaming) may wait for the response before sending more, so collecting would deadlock.
//! Instead the first attempt streams through and keeps a copy of what it sent (up to
//! [`MAX_REPLAY_BYTES`]); a retry replays the copy and continues from the original body. Once
//! the copy would exceed the limit it is dropped and the request is no longer retryable.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::{Body, BoxError};

/// Request bodies up to this size are kept for replay.
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;

#[derive(Debug)]
struct Shared {
    /// The client's body, read by whichever attempt is current.
    source: Option<Body>,
    chunks: Vec<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
    ended: bool,
    /// The copy is incomplete (too large, or the client's body failed): no replay.
    unreplayable: bool,
    /// Attempt currently allowed to read; older attempts' bodies (still held by a connection)
    /// get an error instead of stealing the client's data.
    generation: u32,
}

/// Handle on a request body shared by the attempts of one request.
#[derive(Clone, Debug)]
pub(crate) struct Replay {
    shared: Arc<Mutex<Shared>>,
    hint: SizeHint,
}

impl Replay {
    pub(crate) fn new(body: Body) -> Self {
        let hint = body.size_hint();
        let ended = body.is_end_stream();
        Self {
            shared: Arc::new(Mutex::new(Shared {
                source: (!ended).then_some(body),
                chunks: Vec::new(),
                len: 0,
                trailers: None,
                ended,
                unreplayable: hint.lower() as usize > MAX_REPLAY_BYTES,
                generation: 0,
            })),
            hint,
        }
    }

    /// Whether another attempt could send the same body.
    pub(crate) fn can_replay(&self) -> bool {
        !self.shared.lock().expect("replay lock").unreplayable
    }

    /// The body for the next attempt.
    pub(crate) fn attempt(&self) -> Body {
        let generation = {
            let mut s = self.shared.lock().expect("replay lock");
            s.generation += 1;
            s.generation
        };
        http_body_util::BodyExt::boxed(ReplayBody {
            shared: self.shared.clone(),
            generation,
            pos: 0,
            trailers_sent: false,
            hint: self.hint,
        })
    }
}

struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    generation: u32,
    pos: usize,
    trailers_sent: bool,
    hint: SizeHint,
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut s = this.shared.lock().expect("replay lock");
        if s.generation != this.generation {
            return Poll::Ready(Some(Err("request body superseded by a retry".into())));
        }
        if this.pos < s.chunks.len() {
            let b = s.chunks[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if s.ended {
            if !this.trailers_sent
                && let Some(t) = &s.trailers
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
            }
            return Poll::Ready(None);
        }
        let Some(src) = s.source.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(src).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.ended = true;
                s.source = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.unreplayable = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !s.unreplayable {
                        s.len += data.len();
                        if s.len > MAX_REPLAY_BYTES {
                            s.unreplayable = true;
                            s.chunks = Vec::new();
                        } else {
                            s.chunks.push(data.clone());
                            this.pos += 1;
                        }
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    this.trailers_sent = true;
                }
                if s.source.as_ref().is_some_and(|b| b.is_end_stream()) {
                    s.ended = true;
                    s.source = None;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self.shared.lock().expect("replay lock");
        s.ended && this_done(self, &s)
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

fn this_done(b: &ReplayBody, s: &Shared) -> bool {
    b.pos >= s.chunks.len() && (s.trailers.is_none() || b.trailers_sent)
}

/// A response body holding guards (in-flight counts, circuit-breaker slot) until it ends or is
/// dropped, so a long stream keeps counting and a removed endpoint drains.
pub(crate) struct Guarded<G> {
    pub(crate) inner: Body,
    pub(crate) guard: Option<G>,
}

impl<G: Send + Sync + Unpin + 'static> HttpBody for Guarded<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = r {
            this.guard = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn chunked(parts: &[&'static str]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        StreamBody::new(futures::stream::iter(frames)).boxed()
    }

    #[tokio::test]
    async fn replays_a_partially_read_body_in_full() {
        let r = Replay::new(chunked(&["ab", "cd", "ef"]));
        let mut first = r.attempt();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ab");
        drop(first);
        assert!(r.can_replay());
        let all = r.attempt().collect().await.unwrap().to_bytes();
        assert_eq!(all, "abcdef");
        let again = r.attempt().collect().await.unwrap().to_bytes();
        assert_eq!(again, "abcdef");
    }

    #[tokio::test]
    async fn old_attempts_cannot_steal_the_body() {
        let r = Replay::new(chunked(&["ab", "cd"]));
        let mut first = r.attempt();
        let _second = r.attempt();
        assert!(first.frame().await.unwrap().is_err());
    }

    #[tokio::test]
    async fn large_bodies_stream_but_are_not_replayable() {
        static BIG: [u8; 40 * 1024] = [b'x'; 40 * 1024];
        let big = std::str::from_utf8(&BIG).unwrap();
        let r = Replay::new(chunked(&[big, big]));
        let n = r.attempt().collect().await.unwrap().to_bytes().len();
        assert_eq!(n, 80 * 1024);
        assert!(!r.can_replay());
    }
}
