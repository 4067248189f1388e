//! Endpoint discovery behind one trait.
//!
//! Today endpoints come inline in the config ([`InlineEndpoints`]). A push stream from the
//! operator will implement [`Discover`] too and call [`super::Dispatcher::refresh_endpoints`]
//! when its view changes; the dispatcher then rebuilds the endpoint sets from the last config
//! exactly as on a reload (kept endpoints keep their state, removed ones drain).

use crate::config::{Endpoint, OutboundService, ServicePort};

/// Where the endpoints of a Service port come from.
pub trait Discover: Send + Sync + 'static {
    /// The endpoints of `service:port` right now. Empty means "no discovery": requests go to
    /// the original destination (the cluster IP, which kube-proxy balances).
    fn endpoints(&self, service: &OutboundService, port: &ServicePort) -> Vec<Endpoint>;
}

/// Endpoints listed inline in the config (`ServicePort::endpoints`).
#[derive(Clone, Copy, Debug, Default)]
pub struct InlineEndpoints;

impl Discover for InlineEndpoints {
    fn endpoints(&self, _service: &OutboundService, port: &ServicePort) -> Vec<Endpoint> {
        port.endpoints.clone()
    }
}
