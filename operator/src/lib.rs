//! The Trellis operator library: the API types, the pure reconcile logic, and the thin layers
//! that talk to the Kubernetes API. Binaries (`trellis-operator`, `trellis`) only wire these.
#![forbid(unsafe_code)]

pub mod addons;
pub mod api;
pub mod bundle;
pub mod ca;
pub mod check;
pub mod cli;
pub mod compiler;
pub mod controller;
pub mod dashboard;
pub mod dev;
pub mod discovery;
pub mod duration;
pub mod identity;
pub mod inject;
pub mod loopback_http;
pub mod pods;
pub mod propagation;
pub mod rbac;
pub mod rollout;
pub mod runtime;
pub mod stat;
pub mod status;
pub mod webhook;
