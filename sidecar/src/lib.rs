//! The Trellis sidecar proxy. The data plane knows nothing of Kubernetes: it reads the config
//! contract ([`config`]) from files and its identity from files or the identity endpoint.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod config;
pub mod conn_limit;
pub mod creds;
pub mod discovery;
pub mod fswatch;
pub mod identity;
pub mod init;
pub mod lookup;
pub mod metrics;
pub mod probe;
pub mod proxy;
pub mod reload;
pub mod run;
pub mod shutdown;
pub mod spans;
pub mod tls;
pub mod traffic;
pub mod workers;
