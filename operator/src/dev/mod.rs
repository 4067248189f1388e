//! `trellis dev`: the whole mesh on one machine, with no cluster.
//!
//! The real parts run locally: the mesh CA and the identity endpoint, the admission webhook's
//! decision on every pod, the operator's compiler and metrics ([`operator_metrics`]), one
//! `trellis-proxy` per pod and the demo programs. Only two things are stand-ins, because
//! there is no cluster to provide them:
//! - the TokenReview the identity endpoint makes is answered in-process by [`tokenreview`],
//!   for tokens this process minted and wrote into each pod's projected volume;
//! - Services, EndpointSlices and Pods are synthesized ([`synth`]) from `services.yaml`
//!   instead of being observed from an API server.
//!
//! Local mode has no iptables: each sidecar runs with `--local-mode`, apps are told their
//! sidecar's outbound address and route by the Host header, and each sidecar forwards inbound
//! traffic to its app with `--inbound-target`. Everything listens on 127.0.0.1, so the
//! sidecars' loopback-only admin routes (`/config`) answer `trellis dev`.

pub mod control;
pub mod creds;
pub mod demo;
pub mod display;
pub mod graph;
pub mod metrics;
pub mod operator_metrics;
pub mod plan;
pub mod rollout;
pub mod run;
pub mod spec;
pub mod stats;
pub mod supervise;
pub mod synth;
pub mod tokenreview;
pub mod volume;

/// The mesh's root namespace: a PeerAuthentication here applies mesh-wide.
pub const ROOT_NAMESPACE: &str = "trellis-system";
