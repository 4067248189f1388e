//! The Trellis sidecar proxy. The data plane knows nothing of Kubernetes: it reads the config
//! contract ([`config`]) from files and its identity from files or the identity endpoint.
#![forbid(unsafe_code)]

pub mod config;
pub mod creds;
pub mod init;
pub mod run;
pub mod tls;
pub mod traffic;
