//! What every operator replica runs for discovery: its own compile over the process's one set
//! of watches ([`crate::controller::compile::SharedStores`], which the Lease holder's compile
//! loop reads too; that loop writes ConfigMaps, this one only publishes to the streams, so a
//! follower serves as fresh a view as the leader and proxies may connect to any replica), the
//! operator's own SPIFFE certificate from the mesh CA, and the listener on
//! `--discovery-addr` (15010).
//!
//! The operator's identity is `spiffe://<trust-domain>/ns/<operator namespace>/sa/`
//! [`OPERATOR_SERVICE_ACCOUNT`]; sidecars accept no other server identity on the stream.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::{FutureExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use trellis_proxy::creds::Credentials;

use super::Hub;
use crate::ca::IssuerState;
use crate::propagation::{ReplicaReport, Tracker};
use crate::runtime::{ExtraServer, Services};

/// The operator's ServiceAccount in every install (config/rbac, the OLM bundle).
pub const OPERATOR_SERVICE_ACCOUNT: &str = "trellis-operator";
/// How long this replica gathers watch events before recompiling its view: short, since the
/// point of the stream is sub-second propagation, and the compile is incremental.
pub const COMPILE_DEBOUNCE: Duration = Duration::from_millis(100);

/// The operator's SPIFFE ID in `namespace`.
pub fn operator_id(trust_domain: &str, namespace: &str) -> String {
    trellis_proxy::config::spiffe_id(trust_domain, namespace, OPERATOR_SERVICE_ACCOUNT)
}

/// Issues the operator its own workload certificate from the mesh CA (a fresh P-256 key held
/// in memory only), with the current trust bundle as roots.
pub fn own_credentials(
    issuer: &IssuerState,
    namespace: &str,
    now: SystemTime,
) -> anyhow::Result<Credentials> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)?
        .pem()?;
    let id = operator_id(&issuer.trust_domain, namespace);
    let issued = issuer
        .ca
        .sign_workload_csr(&csr, &id, issuer.workload_ttl, now)?;
    let chain = format!("{}{}", issued.cert_pem, issuer.ca.intermediates_pem());
    Ok(trellis_proxy::tls::credentials_from_pem(
        chain.as_bytes(),
        key.serialize_pem().as_bytes(),
        issuer.trust_bundle_pem.as_bytes(),
    )?)
}

/// The discovery stream as a runtime server.
pub fn server() -> ExtraServer {
    ("discovery", Box::new(move |s: Services| run(s).boxed()))
}

async fn run(s: Services) -> anyhow::Result<()> {
    let (issuer_tx, issuer_rx) = watch::channel(None);
    tokio::spawn(crate::ca::controller::follow_issuer(
        s.client.clone(),
        s.config.namespace.clone(),
        issuer_tx,
        s.shutdown.clone(),
    ));
    let (tls_tx, tls_rx) = watch::channel(None);
    tokio::spawn(keep_certificate(
        issuer_rx,
        s.config.namespace.clone(),
        tls_tx,
        s.shutdown.clone(),
    ));
    let hub = Hub::new();
    tokio::spawn(compile_views(
        s.client.clone(),
        s.stores.clone(),
        crate::controller::compile_settings(&s.config.namespace),
        hub.clone(),
        Reporter {
            namespace: s.config.namespace.clone(),
            replica: s.config.pod_name.clone(),
            metrics: {
                let metrics = crate::propagation::publish::Metrics::default();
                metrics.register(&mut s.registry.lock().unwrap_or_else(|p| p.into_inner()));
                metrics
            },
        },
        s.shutdown.clone(),
    ));
    let listener = TcpListener::bind(s.config.discovery_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", s.config.discovery_addr))?;
    tracing::info!(addr = %s.config.discovery_addr, "discovery stream listening");
    super::serve(listener, tls_rx, hub, s.shutdown.clone()).await;
    Ok(())
}

/// Keeps the listener's TLS config current: a new certificate when the issuer changes (a root
/// rotation, a new trust domain) and at 70 % of the certificate's lifetime.
async fn keep_certificate(
    mut issuer: crate::ca::IssuerRx,
    namespace: String,
    tx: watch::Sender<Option<Arc<rustls::ServerConfig>>>,
    shutdown: CancellationToken,
) {
    loop {
        let state = issuer.borrow_and_update().clone();
        let mut wait = Duration::from_secs(60);
        if let Some(state) = state {
            let built =
                own_credentials(&state, &namespace, SystemTime::now()).and_then(|c| {
                    Ok(trellis_proxy::tls::server_config(&c, &[b"h2"])
                        .map(|cfg| (cfg, c.not_after))?)
                });
            match built {
                Ok((cfg, not_after)) => {
                    tx.send_replace(Some(cfg));
                    let left = not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    wait = (left * 7 / 10).max(Duration::from_secs(60));
                }
                Err(error) => tracing::warn!(%error, "discovery certificate not issued; retrying"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = issuer.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Where this replica's propagation report goes.
struct Reporter {
    namespace: String,
    replica: String,
    metrics: crate::propagation::publish::Metrics,
}

/// This replica's propagation report: the tracker's counts over the hub's streams, the pods
/// behind the lagging ones named from the pod cache.
fn report(
    replica: &str,
    hub: &Hub,
    tracker: &Mutex<Tracker>,
    pods: &crate::pods::PodStore,
) -> ReplicaReport {
    let streams = hub.stream_states();
    let lock = || tracker.lock().unwrap_or_else(|p| p.into_inner());
    // Name pods only when some stream lags: one pass over the pod cache per report, without
    // holding the tracker (the compile loop records each compile in it).
    let any_behind = lock().lagging(&streams, |_| None, 0).1 > 0;
    let by_ip: HashMap<IpAddr, String> = if any_behind {
        // A map for this report only, rather than an IP index kept with the cache: it is needed
        // only while some stream lags, and an index of 100 000 pods would cost about 5 MiB for
        // good.
        let pods = pods.state();
        pods.iter()
            .flat_map(|p| p.ips().map(move |ip: IpAddr| (ip, p.name().to_string())))
            .collect()
    } else {
        HashMap::new()
    };
    let tracker = lock();
    let (lagging, lagging_total) = tracker.lagging(
        &streams,
        |ip| by_ip.get(&ip).cloned(),
        crate::propagation::report::MAX_LISTED,
    );
    ReplicaReport {
        replica: replica.to_string(),
        latest: tracker.latest(),
        streams: streams.len() as u64,
        objects: tracker.count(&streams),
        lagging,
        lagging_total: lagging_total as u64,
        ..Default::default()
    }
}

/// Watches what the compiler reads and publishes each (incremental) compile to the streams;
/// records each compile for the propagation count and publishes this replica's report.
async fn compile_views(
    client: kube::Client,
    shared: crate::controller::compile::SharedStores,
    settings: crate::compiler::Settings,
    hub: Arc<Hub>,
    reporter: Reporter,
    shutdown: CancellationToken,
) {
    // The process's one set of watches: on the Lease holder the compile controller reads the
    // same stores.
    let (stores, changes) = shared.subscribe();
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    {
        let (hub, tracker, pods) = (hub.clone(), tracker.clone(), stores.pods.clone());
        let replica = reporter.replica.clone();
        tokio::spawn(crate::propagation::publish::run(
            client.clone(),
            reporter.namespace,
            reporter.replica,
            move || report(&replica, &hub, &tracker, &pods),
            reporter.metrics,
            shutdown.clone(),
        ));
    }
    let mut changes = std::pin::pin!(changes);
    // The stores fill only while the change stream is polled: poll it until the first compile.
    let ready = async {
        tokio::join!(stores.meshes.wait_until_ready(), async {
            stores.services.wait_until_ready().await.ok();
            stores.endpoint_slices.wait_until_ready().await.ok();
            stores.namespaces.wait_until_ready().await.ok();
            stores.pods.wait_until_ready().await.ok();
            stores.traffic_policies.wait_until_ready().await.ok();
            stores.peer_authentications.wait_until_ready().await.ok();
        })
    };
    let mut ready = std::pin::pin!(ready);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = &mut ready => break,
            c = changes.next() => if c.is_none() { return },
        }
    }
    let mut previous = None;
    loop {
        let snapshot = stores.snapshot(&settings);
        let out = crate::compiler::compile_discovery(&snapshot, previous.as_ref());
        if let Some(seq) = hub.publish(&out) {
            tracker.lock().unwrap_or_else(|p| p.into_inner()).observe(
                seq,
                jiff::Timestamp::now(),
                &snapshot,
                &out,
            );
        }
        previous = Some(out);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            c = changes.next() => if c.is_none() { return },
        }
        // Gather what else arrives within the debounce, still polling so the stores fill.
        let until = tokio::time::sleep(COMPILE_DEBOUNCE);
        tokio::pin!(until);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = &mut until => break,
                c = changes.next() => if c.is_none() { return },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::authority::CertificateAuthority;

    #[test]
    fn the_operator_holds_a_mesh_workload_certificate_with_its_own_id() {
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate("cluster.local", Duration::from_secs(3600), now)
            .unwrap();
        let issuer = IssuerState {
            trust_bundle_pem: ca.roots_pem().to_string(),
            ca: Arc::new(ca),
            trust_domain: "cluster.local".into(),
            workload_ttl: Duration::from_secs(600),
        };
        let c = own_credentials(&issuer, "operators", now).unwrap();
        assert_eq!(
            c.spiffe_id,
            "spiffe://cluster.local/ns/operators/sa/trellis-operator"
        );
        // It is a valid server for a sidecar expecting exactly that ID.
        assert!(
            trellis_proxy::tls::verify_server_chain(
                &c,
                &c.cert_chain,
                std::slice::from_ref(&c.spiffe_id)
            )
            .is_ok()
        );
        assert!(trellis_proxy::tls::server_config(&c, &[b"h2"]).is_ok());
    }
}
