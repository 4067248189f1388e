//! A close-delimited response that fails mid-way ends with a reset, not a close.
//!
//! An HTTP/1.0 client reads a response without `Content-Length` until the connection closes
//! (it has no chunked encoding, so hyper sends such a body close-delimited). When the upstream
//! fails mid-response (the application dies, the hop between the sidecars is reset), hyper
//! ends the connection, and a normal close (FIN) looks exactly like the end of the body: the
//! client took a truncated response for a complete one. A reset (RST, `SO_LINGER` 0) is the
//! only way left to say it failed, as Envoy does. HTTP/1.1 clients need none of this: a
//! missing last chunk or a short `Content-Length` body already tells them.
//!
//! The connection's socket ([`ResetOnAbort`]) and the response bodies of its HTTP/1.0
//! requests ([`flag_errors`]) share one flag; only HTTP/1.0 responses are wrapped, so other
//! requests pay nothing but the flag's allocation per connection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::io::Prefixed;
use crate::traffic::{Body, BoxError};

/// Set when a response body failed; read when the connection is dropped.
pub type Flag = Arc<AtomicBool>;

/// The client's connection: reset instead of closed when dropped after [`Flag`] was set.
pub struct ResetOnAbort {
    io: Prefixed<TcpStream>,
    aborted: Flag,
}

impl ResetOnAbort {
    pub fn new(io: Prefixed<TcpStream>, aborted: Flag) -> Self {
        ResetOnAbort { io, aborted }
    }
}

impl Drop for ResetOnAbort {
    fn drop(&mut self) {
        if self.aborted.load(Ordering::Relaxed) {
            let _ = socket2::SockRef::from(self.io.get_ref()).set_linger(Some(Duration::ZERO));
        }
    }
}

impl AsyncRead for ResetOnAbort {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResetOnAbort {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// `resp` whose body sets `aborted` if it fails.
pub fn flag_errors(resp: Response<Body>, aborted: &Flag) -> Response<Body> {
    let aborted = aborted.clone();
    resp.map(|inner| FlagOnError { inner, aborted }.boxed())
}

struct FlagOnError {
    inner: Body,
    aborted: Flag,
}

impl HttpBody for FlagOnError {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let r = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if matches!(r, Some(Err(_))) {
            self.aborted.store(true, Ordering::Relaxed);
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
