//! How the local sidecars get their certificates.
//!
//! Until the identity endpoint is on `main`, `trellis dev` issues each sidecar's certificate
//! directly from the mesh CA and hands it over as files (`--cert-file`/`--key-file`, the
//! proxy's documented file-credential mode). The key is generated here, so unlike the endpoint
//! flow it exists on disk (mode 0600, inside the state directory, removed on exit).

use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::SystemTime;

use anyhow::Context as _;

use super::control::MeshParams;
use super::plan::Plan;
use super::run::pod_key;
use super::tokenreview::TokenAuthority;
use crate::ca::CertificateAuthority;

/// What starting the credential source needs.
pub struct Inputs<'a> {
    pub ca: &'a CertificateAuthority,
    pub plan: &'a Plan,
    pub params: &'a MeshParams,
    pub state_dir: &'a Path,
    pub tokens: &'a TokenAuthority,
    pub identity_url: &'a str,
    pub shutdown: &'a tokio_util::sync::CancellationToken,
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

/// Issues every sidecar's credentials and returns the extra proxy arguments per pod, and a
/// line describing the source for the display.
pub async fn start(i: Inputs<'_>) -> anyhow::Result<(BTreeMap<String, Vec<String>>, String)> {
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
    let _ = (i.tokens, i.identity_url, i.shutdown);
    Ok((
        args,
        "certificates: issued by the local mesh CA as files (identity endpoint not on main yet)"
            .to_string(),
    ))
}
