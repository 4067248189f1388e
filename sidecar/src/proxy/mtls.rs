//! TLS configs for the data path, built once per credentials snapshot (not per connection) on
//! top of the SPIFFE-verifying builders in [`crate::tls`].
//!
//! ALPN between proxies says what the TLS stream carries: `http/1.1` (HTTP/1.x from the
//! application, pooled, and `Upgrade` requests on connections of their own), `h2` (HTTP/2, and
//! HTTP/1.1 requests to a busy peer, marked with
//! `trellis-orig-proto`; see [`super::upstream`]), or `trellis.tcp` (opaque TCP, proxied at L4
//! without detection so server-first protocols never wait).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::{ClientConfig, ServerConfig};

use crate::creds::{Credentials, CredentialsRx};
use crate::tls::{self, TlsError};

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
pub const ALPN_TCP: &[u8] = b"trellis.tcp";

/// What a mesh TLS connection carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Alpn {
    H2,
    Http1,
    Tcp,
}

impl Alpn {
    pub fn id(self) -> &'static [u8] {
        match self {
            Alpn::H2 => ALPN_H2,
            Alpn::Http1 => ALPN_HTTP1,
            Alpn::Tcp => ALPN_TCP,
        }
    }

    pub fn from_id(id: Option<&[u8]>) -> Option<Self> {
        match id? {
            ALPN_H2 => Some(Alpn::H2),
            ALPN_HTTP1 => Some(Alpn::Http1),
            ALPN_TCP => Some(Alpn::Tcp),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MtlsError {
    #[error("no credentials yet")]
    NoCredentials,
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Upper bound on cached client configs (one per distinct identity set and ALPN); the config
/// bounds the real number, this only guards against churn.
const MAX_CLIENT_CONFIGS: usize = 4096;

#[derive(Default)]
struct Inner {
    creds: Option<Arc<Credentials>>,
    server: Option<Arc<ServerConfig>>,
    clients: HashMap<(Arc<[String]>, Alpn), Arc<ClientConfig>>,
}

/// Builds and caches server and client configs for the current credentials.
pub struct TlsCache {
    creds: CredentialsRx,
    inner: Mutex<Inner>,
}

impl TlsCache {
    pub fn new(creds: CredentialsRx) -> Self {
        Self {
            creds,
            inner: Mutex::default(),
        }
    }

    /// The credentials new connections use.
    pub fn credentials(&self) -> Option<Arc<Credentials>> {
        self.creds.borrow().clone()
    }

    /// A receiver that sees every credentials change (the pool re-checks its connections'
    /// peers on each).
    pub fn subscribe(&self) -> CredentialsRx {
        self.creds.clone()
    }

    fn locked(&self) -> Result<(std::sync::MutexGuard<'_, Inner>, Arc<Credentials>), MtlsError> {
        let current = self.credentials().ok_or(MtlsError::NoCredentials)?;
        let mut inner = self.inner.lock().expect("tls cache lock");
        if !inner
            .creds
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, &current))
        {
            // New certificate or trust bundle: configs built from the old one are for
            // connections that already exist; new connections get new configs.
            inner.creds = Some(current.clone());
            inner.server = None;
            inner.clients.clear();
        }
        Ok((inner, current))
    }

    /// The inbound config (client certificate required), offering every mesh ALPN.
    pub fn server(&self) -> Result<Arc<ServerConfig>, MtlsError> {
        let (mut inner, creds) = self.locked()?;
        if let Some(s) = &inner.server {
            return Ok(s.clone());
        }
        let cfg = tls::server_config(&creds, &[ALPN_H2, ALPN_HTTP1, ALPN_TCP])?;
        inner.server = Some(cfg.clone());
        Ok(cfg)
    }

    /// The outbound config for a destination with these identities, carrying `alpn`.
    pub fn client(
        &self,
        identities: &Arc<[String]>,
        alpn: Alpn,
    ) -> Result<Arc<ClientConfig>, MtlsError> {
        let (mut inner, creds) = self.locked()?;
        let key = (identities.clone(), alpn);
        if let Some(c) = inner.clients.get(&key) {
            return Ok(c.clone());
        }
        let cfg = tls::client_config(&creds, identities, &[alpn.id()])?;
        if inner.clients.len() >= MAX_CLIENT_CONFIGS {
            inner.clients.clear();
        }
        inner.clients.insert(key, cfg.clone());
        Ok(cfg)
    }
}
