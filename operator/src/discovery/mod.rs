//! The discovery stream: sidecars resolve destinations on demand from the operator, which
//! pushes changes to what they subscribed to.
//!
//! # Why (a departure from "everything in one ConfigMap per namespace")
//! The design first put every destination into every namespace's `trellis-proxy` ConfigMap.
//! That stops at about 1 500 Services (a ConfigMap holds 1 MiB) and reaches pods only on the
//! kubelet's sync, a minute or more after the write, so callers keep dialing the IPs of pods a
//! rollout removed. The stream fixes both: a proxy asks for a Service the first time it sees
//! an address or authority its ConfigMap does not list, and the operator pushes that Service's
//! changes within [`DEBOUNCE`] of the compile that saw them. The ConfigMap stays as the
//! bootstrap the proxy serves from before the stream is up and whenever the operator is
//! unreachable: the data plane never depends on the control plane being up.
//!
//! # Shape
//! - [`view`]: one compile's table (the compiler's own entries, policies attached, every
//!   endpoint inline) indexed by name and address, with the compiler's visibility rule; it
//!   follows each compile in place, re-indexing only the Services the compiler rebuilt.
//! - [`registry`]: pure per-stream state: subscriptions (and who subscribed to each Service,
//!   so a change reaches its subscribers without a scan of every stream), a bounded
//!   latest-wins pending set, acknowledged generations, and who each proxy is and which
//!   ConfigMap settings it runs (what [`crate::propagation`] counts).
//! - [`server`]: the mTLS HTTP/2 edge (transport and why in
//!   [`trellis_proxy::discovery::proto`]).
//!
//! # Authorization
//! A stream's namespace is the namespace of the SPIFFE ID in the client certificate, which
//! the mesh CA issued after a TokenReview; nothing in a request names it. What a proxy may
//! learn is what its namespace's ConfigMap would list under `trellis.dev/export-to` and
//! `trellis.dev/import-from`; anything else is answered `Unknown`, exactly as for a Service
//! that does not exist, so a subscription cannot probe for hidden names.

pub mod registry;
pub mod replica;
pub mod server;
pub mod view;

use std::time::Duration;

pub use registry::{Peer, Propagation, Registry, StreamId};
pub use server::{Hub, serve};
pub use view::{Changes, View};

/// How long a stream gathers changes before it is flushed: a rollout changes a Service's
/// endpoints many times within a few milliseconds, and one message with the final state is the
/// point. Well under the 100 ms budget the design allows between a compile and the push.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// The port the discovery stream listens on in the default install.
pub const DEFAULT_PORT: u16 = 15010;
