//! How the local sidecars get their certificates.
//!
//! [`Mode::Endpoint`] is the cluster's flow: the operator's identity endpoint runs in this
//! process on 127.0.0.1 (serving certificate from the mesh CA, with `127.0.0.1` and
//! `localhost` added to its names), and each sidecar sends a CSR with the token from its
//! projected volume. The endpoint checks the token with a TokenReview through a `kube::Client`
//! whose transport is the local stand-in ([`super::tokenreview`]); nothing else differs.
//!
//! [`Mode::Files`] issues each sidecar's certificate directly from the mesh CA and hands it
//! over as files (`--cert-file`/`--key-file`, the proxy's file-credential mode), for
//! debugging the data path without the identity flow. The key is then generated here and
//! exists on disk (mode 0600, inside the state directory, removed on exit); with the endpoint
//! it never leaves the sidecar's memory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;

use super::control::MeshParams;
use super::plan::Plan;
use super::run::pod_key;
use super::tokenreview::TokenAuthority;
use crate::ca::CertificateAuthority;

/// Where sidecars get certificates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The identity endpoint, as in a cluster.
    #[default]
    Endpoint,
    /// Files issued by the CA directly.
    Files,
}

/// What starting the credential source needs.
pub struct Inputs<'a> {
    pub mode: Mode,
    pub ca: &'a Arc<CertificateAuthority>,
    pub plan: &'a Plan,
    pub params: &'a MeshParams,
    pub state_dir: &'a Path,
    pub tokens: &'a TokenAuthority,
    pub identity_url: &'a str,
    pub shutdown: &'a tokio_util::sync::CancellationToken,
    /// The operator's registry, where the identity endpoint counts what it does.
    pub metrics: &'a super::operator_metrics::OperatorMetrics,
}

fn write_private(path: &Path, data: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(data.as_bytes())?;
    Ok(())
}

/// Starts the credential source and returns the extra proxy arguments per pod, and a line
/// describing the source for the display.
pub async fn start(i: Inputs<'_>) -> anyhow::Result<(BTreeMap<String, Vec<String>>, String)> {
    match i.mode {
        Mode::Files => files(i),
        Mode::Endpoint => endpoint(i).await,
    }
}

async fn endpoint(i: Inputs<'_>) -> anyhow::Result<(BTreeMap<String, Vec<String>>, String)> {
    use crate::ca::IssuerState;
    use crate::ca::serving::{OPERATOR_SERVICE_DNS, SERVING_CERT_TTL, ServingCert};
    use crate::identity::{IdentityConfig, IdentityService};

    let state = IssuerState {
        ca: i.ca.clone(),
        trust_bundle_pem: i.ca.roots_pem().to_string(),
        trust_domain: i.params.trust_domain.clone(),
        workload_ttl: i.params.workload_ttl,
    };
    let (tx, rx) = tokio::sync::watch::channel(Some(Arc::new(state)));
    // The endpoint outlives this function: keep the sender alive until shutdown.
    let shutdown = i.shutdown.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        drop(tx);
    });
    let serving = ServingCert::new(
        vec![
            OPERATOR_SERVICE_DNS.to_string(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ],
        SERVING_CERT_TTL,
    );
    serving.refresh(i.ca, SystemTime::now())?;
    let tls = serving.server_config(&[b"h2", b"http/1.1"]);
    // Every local proxy connects from 127.0.0.1: the per-address cap would make them one
    // client, so only the total applies here.
    let mut config = IdentityConfig::default();
    config.connections.max_connections_per_peer = config.connections.max_connections;
    let service = IdentityService::new(i.tokens.client(), rx, config, i.metrics.identity());
    let addr = SocketAddr::from(([127, 0, 0, 1], i.plan.identity_port));
    crate::identity::server::bind_and_serve(addr, tls, service, i.shutdown.clone())
        .await
        .with_context(|| format!("identity endpoint on {addr}"))?;
    let args = i
        .plan
        .pods
        .iter()
        .filter(|p| p.proxy.is_some())
        .map(|p| {
            (
                pod_key(p),
                vec![
                    "--identity-endpoint".to_string(),
                    i.identity_url.to_string(),
                ],
            )
        })
        .collect();
    Ok((
        args,
        format!(
            "identity endpoint {} (TokenReview: a local stand-in that answers only for tokens \
             trellis dev minted)",
            i.identity_url
        ),
    ))
}

fn files(i: Inputs<'_>) -> anyhow::Result<(BTreeMap<String, Vec<String>>, String)> {
    let mut args = BTreeMap::new();
    for pod in &i.plan.pods {
        if pod.proxy.is_none() {
            continue;
        }
        let id = trellis_proxy::config::spiffe_id(
            &i.params.trust_domain,
            &pod.namespace,
            &pod.service_account,
        );
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)?
            .pem()?;
        let issued =
            i.ca.sign_workload_csr(&csr, &id, i.params.workload_ttl, SystemTime::now())?;
        let base = i.state_dir.join("creds");
        let cert_path = base.join(format!("{}.{}.crt", pod.name, pod.namespace));
        let key_path = base.join(format!("{}.{}.key", pod.name, pod.namespace));
        write_private(
            &cert_path,
            &format!("{}{}", issued.cert_pem, i.ca.intermediates_pem()),
        )?;
        write_private(&key_path, &key.serialize_pem())?;
        args.insert(
            pod_key(pod),
            vec![
                "--cert-file".into(),
                cert_path.display().to_string(),
                "--key-file".into(),
                key_path.display().to_string(),
            ],
        );
    }
    Ok((
        args,
        "certificates: issued by the local mesh CA as files (--credentials files)".to_string(),
    ))
}
