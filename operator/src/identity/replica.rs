//! What every operator replica runs for identity: the issuer follower, the serving
//! certificate renewal and the HTTPS endpoint on `--identity-addr` (15012).

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::net::TcpListener;

use super::{IdentityConfig, IdentityMetrics, IdentityService, server};
use crate::ca::serving::{SERVING_CERT_TTL, ServingCert, operator_service_dns};
use crate::runtime::{ExtraServer, Services};

/// DNS names of the operator Service in the operator's `namespace`, as clients may spell them.
pub fn service_names(namespace: &str) -> Vec<String> {
    let svc = operator_service_dns(namespace);
    vec![
        svc.clone(),
        format!("{svc}.cluster.local"),
        format!("trellis-operator.{namespace}"),
    ]
}

/// The operator's serving certificate (identity endpoint and webhook share it: both are reached
/// through the `trellis-operator` Service in `namespace`). Renewed by [`server()`]'s task.
pub fn serving_cert(namespace: &str) -> Arc<ServingCert> {
    ServingCert::new(service_names(namespace), SERVING_CERT_TTL)
}

/// The identity endpoint as a runtime server. It also keeps `serving` renewed from the mesh CA,
/// for every server that presents it.
pub fn server(serving: Arc<ServingCert>) -> ExtraServer {
    (
        "identity",
        Box::new(move |s: Services| {
            // Not ready until there is a certificate to present: the webhook and this endpoint
            // would fail every TLS handshake without one.
            let cert = serving.clone();
            s.readiness.check(
                "serving-certificate",
                Arc::new(move || cert.is_valid_at(std::time::SystemTime::now())),
            );
            run(s, serving).boxed()
        }),
    )
}

async fn run(s: Services, serving: Arc<ServingCert>) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::watch::channel(None);
    tokio::spawn(crate::ca::controller::follow_issuer(
        s.client.clone(),
        s.config.namespace.clone(),
        tx,
        s.shutdown.clone(),
    ));
    tokio::spawn(serving.clone().run_renewal(
        rx.clone(),
        Duration::from_secs(60),
        s.shutdown.clone(),
    ));
    let metrics = {
        let mut registry = s
            .registry
            .lock()
            .map_err(|_| anyhow::anyhow!("metrics registry lock poisoned"))?;
        IdentityMetrics::register(&mut registry)
    };
    let service = IdentityService::new(s.client.clone(), rx, IdentityConfig::default(), metrics);
    let listener = TcpListener::bind(s.config.identity_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", s.config.identity_addr))?;
    tracing::info!(addr = %s.config.identity_addr, "identity endpoint listening");
    server::serve(
        listener,
        serving.server_config(&[b"h2", b"http/1.1"]),
        Arc::clone(&service),
        s.shutdown.clone(),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    /// OLM installs the operator into a namespace of the user's choosing; the webhook (API
    /// server) and the sidecars reach it as `trellis-operator.<that namespace>.svc`, so the
    /// serving certificate must name that Service, not the default install's.
    #[test]
    fn the_serving_certificate_names_the_service_in_the_operators_namespace() {
        let names = super::service_names("operators");
        assert_eq!(
            names,
            [
                "trellis-operator.operators.svc",
                "trellis-operator.operators.svc.cluster.local",
                "trellis-operator.operators",
            ]
        );
        assert!(names.iter().all(|n| !n.contains("trellis-system")));
    }
}
