//! Protocol detection: what the client speaks, read from its first bytes.
//!
//! Detection reads (it does not peek) so it can wait for more bytes without spinning; the bytes
//! it read are handed back and replayed with [`super::io::Prefixed`]. It waits at most the
//! configured timeout: a client that says nothing (a server-first protocol such as MySQL on a
//! port that was not listed in `skipDetectionPorts`) is treated as opaque TCP after that.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The HTTP/2 connection preface (RFC 9113 section 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP/1.1 request lines start with one of these (RFC 9110 section 9).
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Longest prefix detection ever needs.
const MAX_NEEDED: usize = 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    /// HTTP/2 with prior knowledge (the preface).
    Http2,
    /// A TLS handshake record carrying a ClientHello.
    Tls,
    /// Anything else, including silence until the timeout.
    Opaque,
}

impl Detected {
    pub fn is_http(self) -> bool {
        matches!(self, Detected::Http1 | Detected::Http2)
    }
}

/// Classifies what has been read so far; `None` means "need more bytes".
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    if buf[0] == 0x16 {
        // TLS record: type handshake, version 3.x, then length (2), then handshake type 1.
        if buf.len() < 6 {
            return if buf.len() >= 2 && buf[1] != 0x03 {
                Some(Detected::Opaque)
            } else {
                None
            };
        }
        return Some(if buf[1] == 0x03 && buf[5] == 0x01 {
            Detected::Tls
        } else {
            Detected::Opaque
        });
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Some(Detected::Http2)
        } else {
            None
        };
    }
    let mut maybe = false;
    for m in METHODS {
        if buf.starts_with(m) {
            return Some(Detected::Http1);
        }
        if m.starts_with(buf) {
            maybe = true;
        }
    }
    if maybe { None } else { Some(Detected::Opaque) }
}

/// Reads until the protocol is known, the peer closes, or `timeout` passes. Returns the verdict
/// and every byte read (to replay).
pub async fn detect<S: AsyncRead + Unpin>(
    io: &mut S,
    timeout: Duration,
) -> std::io::Result<(Detected, Bytes)> {
    let mut buf = BytesMut::with_capacity(512);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let read = tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await;
        match read {
            Err(_elapsed) => return Ok((Detected::Opaque, buf.freeze())),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => return Ok((Detected::Opaque, buf.freeze())),
            Ok(Ok(_)) => {
                if let Some(d) = classify(&buf) {
                    return Ok((d, buf.freeze()));
                }
                if buf.len() >= MAX_NEEDED {
                    return Ok((Detected::Opaque, buf.freeze()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classifies_complete_prefixes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"POST /x HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00]),
            Some(Detected::Tls)
        );
        assert_eq!(classify(b"\x00\x00\x00\x01mysql"), Some(Detected::Opaque));
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Detected::Opaque));
    }

    #[test]
    fn waits_on_ambiguous_prefixes() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(&[0x16, 0x03]), None);
    }

    #[tokio::test]
    async fn silent_client_is_opaque_after_timeout() {
        let (_a, mut b) = tokio::io::duplex(64);
        let (d, bytes) = detect(&mut b, Duration::from_millis(20)).await.unwrap();
        assert_eq!(d, Detected::Opaque);
        assert!(bytes.is_empty());
    }

    #[tokio::test]
    async fn split_preface_is_reassembled() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let task = tokio::spawn(async move {
            a.write_all(&H2_PREFACE[..5]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            a.write_all(&H2_PREFACE[5..]).await.unwrap();
            a
        });
        let (d, bytes) = detect(&mut b, Duration::from_secs(2)).await.unwrap();
        assert_eq!(d, Detected::Http2);
        assert_eq!(&bytes[..], H2_PREFACE);
        drop(task.await);
    }
}
