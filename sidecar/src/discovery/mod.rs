//! The sidecar's side of the operator's discovery stream: the wire protocol ([`proto`]) and
//! the client that keeps a stream open ([`client`]), what it learned ([`cache`], pure) and the
//! resolver the data path asks ([`resolver`]).

pub mod cache;
pub mod client;
pub mod proto;
pub mod resolver;

pub use proto::{
    ClientMessage, Decoder, FrameError, MAX_FRAME, MAX_SUBSCRIPTIONS, PATH, ServerMessage, Target,
    encode, workload_namespace,
};
