//! The discovery stream's wire protocol: messages and their framing.
//!
//! # Transport (why not gRPC)
//! One long-lived HTTP/2 `POST` to [`PATH`] over mTLS: the request body carries the proxy's
//! messages ([`ClientMessage`]), the response body the operator's ([`ServerMessage`]), each a
//! frame of a 4-byte big-endian length followed by that many bytes of JSON. HTTP/2 gives what
//! gRPC would (multiplexing, flow control so a slow proxy pushes back on its own stream only,
//! one TLS connection), and hyper and rustls are already in both binaries. gRPC with tonic
//! would add prost, a code generator and a second schema language for types that already exist:
//! a pushed Service is the config contract's own [`OutboundService`], so the ConfigMap and the
//! stream cannot drift apart, and its validation is the same. JSON costs more bytes than
//! protobuf, but a Service is pushed only when it changes, debounced, to the proxies that asked
//! for it.
//!
//! # Semantics
//! The proxy subscribes to [`Target`]s (a Service by name, or an address it saw as an original
//! destination). The operator answers each with the Service's current state
//! ([`ServerMessage::Service`]) or [`ServerMessage::Unknown`] (no such Service, or one the
//! proxy's namespace may not see: the two are indistinguishable on purpose), and from then on
//! pushes the Service again whenever it changes, latest state only. After each batch it sends
//! [`ServerMessage::Synced`] with the operator's view generation; the proxy acknowledges the
//! generation it applied ([`ClientMessage::Ack`]) and, separately, the settings of the ConfigMap
//! config it serves from ([`ClientMessage::Loaded`]): together what propagation status counts.
//!
//! # Versions
//! The operator is upgraded before the proxies it rolls out, so for a while a newer operator
//! talks to older proxies (and, when a Mesh pins a newer proxy image, the other way round).
//! Either side therefore skips a message kind it does not know ([`Decoder::next_message`]
//! logs it and reads on) and ignores fields it does not know in the messages it does, so a
//! later version can add both without closing every older peer's stream. What a message
//! carries of the config contract ([`OutboundService`]) stays as strict as the ConfigMap.

use std::net::IpAddr;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::config::OutboundService;

/// The request path of the stream.
pub const PATH: &str = "/trellis.discovery.v1/stream";
/// The largest frame either side accepts. A Service with every endpoint of a large Deployment
/// (5 000 pods) is about 1 MiB of JSON; anything larger is refused rather than buffered.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;
/// Targets one stream may hold; a proxy that talks to more distinct Services than this keeps
/// the oldest subscriptions and falls back to the ConfigMap for the rest. It bounds the
/// operator's per-stream state (subscriptions and the pending map) whatever the proxy sends.
pub const MAX_SUBSCRIPTIONS: usize = 1024;

/// What a proxy asks about.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Target {
    /// A Service by `name.namespace` (an HTTP authority the proxy did not know).
    Service(String),
    /// An original destination address (a cluster IP or an endpoint) the proxy did not know.
    Address(IpAddr),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Service(s) => f.write_str(s),
            Target::Address(a) => write!(f, "{a}"),
        }
    }
}

/// Proxy -> operator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ClientMessage {
    /// Resolve these targets and keep me posted.
    Subscribe { targets: Vec<Target> },
    /// I applied everything up to this generation.
    Ack { generation: u64 },
    /// The ConfigMap config I serve from has these settings
    /// ([`crate::config::ProxyConfig::settings_digest`]): what tells the operator whether a
    /// Mesh or PeerAuthentication edit, which reaches proxies through the ConfigMap and not
    /// the stream, is in force here. Sent when the stream opens and on every reload that
    /// changes it. An operator older than this message (and than the skipping of unknown
    /// kinds, see the module's doc) closes the stream on it; the operator is upgraded before
    /// the proxies it rolls out, so that pairing does not occur.
    Loaded {
        settings: String,
        /// [`crate::config::ProxyConfig::policies_digest`] of the same config: whether the
        /// TrafficPolicies the ConfigMap carries are current. Absent from proxies older than
        /// the field (the operator then counts them as not having applied a policy edit).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policies: Option<String>,
    },
}

/// Operator -> proxy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ServerMessage {
    /// The current state of a subscribed Service (`name.namespace`); `None` when it was deleted
    /// or is no longer visible to the proxy's namespace (drop it from the cache).
    Service {
        key: String,
        #[serde(default)]
        service: Option<Box<OutboundService>>,
    },
    /// The target resolves to nothing this proxy may see: keep the old behaviour for it.
    Unknown { target: Target },
    /// Everything the operator knew at this generation has been sent.
    Synced { generation: u64 },
}

/// A message type of the stream: the tags (serde's externally tagged, camelCase) of its kinds,
/// so that [`Decoder::next_message`] can tell a kind it does not know (skipped) from a
/// malformed message of one it does (an error).
pub trait Message: for<'de> Deserialize<'de> {
    const KINDS: &'static [&'static str];
}

impl Message for ClientMessage {
    const KINDS: &'static [&'static str] = &["subscribe", "ack", "loaded"];
}

impl Message for ServerMessage {
    const KINDS: &'static [&'static str] = &["service", "unknown", "synced"];
}

/// The tag of a message of a kind `T` does not have, if `body` is one: a JSON object with a
/// single key that is not one of `T`'s kinds.
fn unknown_kind<T: Message>(body: &[u8]) -> Option<String> {
    let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body).ok()?;
    let mut keys = obj.keys();
    let (Some(tag), None) = (keys.next(), keys.next()) else {
        return None;
    };
    (!T::KINDS.contains(&tag.as_str())).then(|| tag.clone())
}

/// A frame that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
}

/// One message as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Bytes {
    let json = serde_json::to_vec(msg).expect("discovery messages serialize");
    let mut out = BytesMut::with_capacity(4 + json.len());
    out.put_u32(json.len() as u32);
    out.put_slice(&json);
    out.freeze()
}

/// Reassembles frames from the chunks a body delivers (which need not align with frames).
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole message, if one has arrived; messages of a kind `T` does not know (a
    /// newer peer's) are skipped. An error is final: the stream is out of step and must be
    /// closed.
    pub fn next_message<T: Message>(&mut self) -> Result<Option<T>, FrameError> {
        loop {
            if self.buf.len() < 4 {
                return Ok(None);
            }
            let len =
                u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
            if len > MAX_FRAME {
                return Err(FrameError::TooLarge(len));
            }
            if self.buf.len() < 4 + len {
                return Ok(None);
            }
            self.buf.advance(4);
            let body = self.buf.split_to(len);
            match serde_json::from_slice(&body) {
                Ok(m) => return Ok(Some(m)),
                Err(e) => match unknown_kind::<T>(&body) {
                    Some(kind) => {
                        tracing::debug!(%kind, "discovery: skipped a message of a kind this version does not know");
                    }
                    None => return Err(e.into()),
                },
            }
        }
    }
}

/// The namespace of a workload SPIFFE ID (`spiffe://<td>/ns/<ns>/sa/<sa>`), the only source
/// of a stream's authority: never a field of the request.
pub fn workload_namespace(spiffe_id: &str) -> Option<&str> {
    let rest = spiffe_id.strip_prefix("spiffe://")?;
    let mut parts = rest.split('/');
    let (_td, ns_word, ns, sa_word, sa) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    (ns_word == "ns"
        && sa_word == "sa"
        && !ns.is_empty()
        && !sa.is_empty()
        && parts.next().is_none())
    .then_some(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_arbitrary_chunking() {
        let msgs = vec![
            ClientMessage::Subscribe {
                targets: vec![
                    Target::Service("web.shop".into()),
                    Target::Address("10.96.0.7".parse().unwrap()),
                ],
            },
            ClientMessage::Ack { generation: 7 },
            ClientMessage::Loaded {
                settings: "0123abcd".into(),
                policies: Some("4567ef01".into()),
            },
            ClientMessage::Loaded {
                settings: "0123abcd".into(),
                policies: None,
            },
        ];
        let wire: Vec<u8> = msgs.iter().flat_map(|m| encode(m).to_vec()).collect();
        for chunk in [1, 3, 5, wire.len()] {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for c in wire.chunks(chunk) {
                d.push(c);
                while let Some(m) = d.next_message::<ClientMessage>().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, msgs, "chunk {chunk}");
        }
    }

    #[test]
    fn oversized_and_malformed_frames_are_errors() {
        let mut d = Decoder::default();
        d.push(&((MAX_FRAME as u32) + 1).to_be_bytes());
        assert!(matches!(
            d.next_message::<ClientMessage>(),
            Err(FrameError::TooLarge(_))
        ));
        let mut d = Decoder::default();
        d.push(&3u32.to_be_bytes());
        d.push(b"{x}");
        assert!(matches!(
            d.next_message::<ClientMessage>(),
            Err(FrameError::Json(_))
        ));
        // A kind this version knows, malformed: an error, not a skip.
        let mut d = Decoder::default();
        d.push(&encode(
            &serde_json::json!({"ack": {"generation": "seven"}}),
        ));
        assert!(d.next_message::<ClientMessage>().is_err());
        let mut d = Decoder::default();
        d.push(&encode(&serde_json::json!({"ack": {}, "loaded": {}})));
        assert!(d.next_message::<ClientMessage>().is_err());
    }

    /// A newer peer's messages: an unknown kind is skipped and the next message still read;
    /// an unknown field of a known kind is ignored. Before, either closed the stream, so a
    /// newer operator would have cut every older proxy off its pushes.
    #[test]
    fn a_newer_peers_messages_do_not_close_the_stream() {
        let mut d = Decoder::default();
        d.push(&encode(&serde_json::json!({"drain": {"within": "5s"}})));
        d.push(&encode(
            &serde_json::json!({"synced": {"generation": 9, "epoch": 2}}),
        ));
        assert_eq!(
            d.next_message::<ServerMessage>().unwrap(),
            Some(ServerMessage::Synced { generation: 9 })
        );
        let mut d = Decoder::default();
        d.push(&encode(&serde_json::json!({"health": {"ok": true}})));
        d.push(&encode(
            &serde_json::json!({"subscribe": {"targets": [], "namespace": "x"}}),
        ));
        assert_eq!(
            d.next_message::<ClientMessage>().unwrap(),
            Some(ClientMessage::Subscribe { targets: vec![] })
        );
        // A skipped message leaves a partial frame behind it waiting.
        let mut d = Decoder::default();
        d.push(&encode(&serde_json::json!({"drain": {}})));
        d.push(&encode(&ServerMessage::Synced { generation: 1 })[..5]);
        assert_eq!(d.next_message::<ServerMessage>().unwrap(), None);
    }

    /// `KINDS` names exactly the tags serde writes, or a known kind would be skipped.
    #[test]
    fn kinds_are_the_tags_serde_writes() {
        let tag = |v: serde_json::Value| v.as_object().unwrap().keys().next().unwrap().clone();
        let client = [
            ClientMessage::Subscribe { targets: vec![] },
            ClientMessage::Ack { generation: 1 },
            ClientMessage::Loaded {
                settings: String::new(),
                policies: None,
            },
        ]
        .map(|m| tag(serde_json::to_value(m).unwrap()));
        assert_eq!(client.as_slice(), ClientMessage::KINDS);
        let server = [
            ServerMessage::Service {
                key: String::new(),
                service: None,
            },
            ServerMessage::Unknown {
                target: Target::Service(String::new()),
            },
            ServerMessage::Synced { generation: 1 },
        ]
        .map(|m| tag(serde_json::to_value(m).unwrap()));
        assert_eq!(server.as_slice(), ServerMessage::KINDS);
    }

    #[test]
    fn namespace_comes_only_from_a_workload_id() {
        assert_eq!(
            workload_namespace("spiffe://cluster.local/ns/shop/sa/web"),
            Some("shop")
        );
        for bad in [
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns//sa/web",
            "spiffe://cluster.local/ns/shop/sa/web/extra",
            "spiffe://cluster.local/x/shop/sa/web",
            "https://cluster.local/ns/shop/sa/web",
        ] {
            assert_eq!(workload_namespace(bad), None, "{bad}");
        }
    }
}
