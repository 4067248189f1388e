//! The control plane of the local mesh: the operator's own compiler and CA, fed with the
//! directory's objects and the synthesized cluster, producing exactly the files kubelet would
//! project into each pod.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use trellis_proxy::config::spiffe_id;

use super::plan::{Plan, Pod};
use super::spec::DevDir;
use super::synth::synthesize;
use crate::api::{Mesh, MeshSpec};
use crate::ca::CertificateAuthority;
use crate::compiler::{self, InlineEndpoints, Settings, Snapshot};

/// Why the control plane could not produce configs.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("Mesh: {0}")]
    Mesh(String),
    #[error("compiler: {0}")]
    Compile(String),
    #[error("CA: {0}")]
    Ca(#[from] crate::ca::CaError),
}

/// The Mesh the directory declares (the one named `default`), or the defaults a cluster's
/// `Mesh default` would have.
pub fn mesh_of(dev: &DevDir) -> Mesh {
    dev.objects
        .meshes
        .iter()
        .find(|m| m.metadata.name.as_deref() == Some(crate::api::MESH_NAME))
        .cloned()
        .unwrap_or_else(|| {
            let spec: MeshSpec = serde_json::from_value(serde_json::json!({}))
                .expect("an empty MeshSpec takes its defaults");
            Mesh::new(crate::api::MESH_NAME, spec)
        })
}

/// `trellis dev --otlp`: the directory's Mesh with tracing on and pointed at `collector`. Every
/// request is sampled unless the Mesh already enables tracing (then its percentage stands): a
/// local run has little traffic and is for looking at.
pub fn with_otlp(dev: &mut DevDir, collector: &str) {
    let mut mesh = mesh_of(dev);
    let tracing = &mut mesh.spec.observability.tracing;
    if !tracing.enabled {
        tracing.sampling_percent = 100.0;
    }
    tracing.enabled = true;
    tracing.collector = Some(collector.to_owned());
    dev.objects
        .meshes
        .retain(|m| m.metadata.name.as_deref() != Some(crate::api::MESH_NAME));
    dev.objects.meshes.push(mesh);
}

/// Mesh settings `trellis dev` needs, parsed once.
#[derive(Clone, Debug)]
pub struct MeshParams {
    pub trust_domain: String,
    pub workload_ttl: Duration,
    pub root_validity: Duration,
}

pub fn mesh_params(mesh: &Mesh) -> Result<MeshParams, ControlError> {
    let ttl = mesh
        .spec
        .workload_cert_ttl()
        .map_err(|e| ControlError::Mesh(e.to_string()))?;
    let root_validity = mesh
        .spec
        .root_validity()
        .map_err(|e| ControlError::Mesh(e.to_string()))?;
    if mesh.spec.ca.secret_ref.is_some() {
        return Err(ControlError::Mesh(
            "spec.ca.secretRef names a Secret, and `trellis dev` has no cluster to read it from: \
             remove it to use a local self-signed root"
                .into(),
        ));
    }
    if mesh.spec.discovery.config_map == crate::api::mesh::ConfigMapContent::Bootstrap {
        // Bootstrap configs list only a namespace's own Services and leave the rest to the
        // operator's discovery stream, which `trellis dev` does not run: calls across
        // namespaces would silently turn into plaintext.
        return Err(ControlError::Mesh(
            "spec.discovery.configMap is Bootstrap, which leaves every other namespace's \
             Services to the operator's discovery stream, and `trellis dev` runs none: remove it \
             (or set Auto or Full: trellis dev keeps the full table)"
                .into(),
        ));
    }
    Ok(MeshParams {
        trust_domain: mesh.spec.trust_domain.clone(),
        workload_ttl: ttl,
        root_validity,
    })
}

/// A pod's SPIFFE ID (or `None` for a pod without a sidecar).
pub fn identity_of(pod: &Pod, trust_domain: &str) -> Option<String> {
    pod.proxy
        .map(|_| spiffe_id(trust_domain, &pod.namespace, &pod.service_account))
}

/// The Mesh `trellis dev` compiles with: `configMap: Auto` becomes `Full`. Auto would give a
/// namespace whose table passes 64 KiB only its bootstrap set and leave the rest to a discovery
/// stream `trellis dev` does not run, silently turning its calls to other namespaces into
/// plaintext; a local demo is small, and when it is not [`oversized_full_tables`] says so.
/// `Bootstrap` never gets here ([`mesh_params`] refuses it).
fn full_table_mesh(mut mesh: Mesh) -> Mesh {
    use crate::api::mesh::ConfigMapContent;
    if mesh.spec.discovery.config_map == ConfigMapContent::Auto {
        mesh.spec.discovery.config_map = ConfigMapContent::Full;
    }
    mesh
}

/// One message per namespace whose full table exceeds what `configMap: Auto` keeps in a
/// cluster: `trellis dev` still writes it whole (every Service stays callable), and says that a
/// cluster would carry only the bootstrap set there.
fn oversized_full_tables(out: &compiler::Output) -> Vec<String> {
    out.configs
        .iter()
        .filter(|(_, c)| c.len() > compiler::AUTO_FULL_TABLE_MAX_BYTES)
        .map(|(ns, c)| {
            format!(
                "namespace {ns}: its full table is {} bytes, over the {} bytes up to which \
                 `configMap: Auto` keeps it in a cluster (there, this namespace would carry only \
                 its bootstrap set and resolve the rest from the discovery stream); trellis dev \
                 runs no discovery stream, so it keeps the full table",
                c.len(),
                compiler::AUTO_FULL_TABLE_MAX_BYTES
            )
        })
        .collect()
}

/// Compiles the directory into each meshed namespace's `config.json`, with the operator's
/// compiler. `identity_endpoint` is the local endpoint's URL, so the config the sidecars read
/// names the endpoint they actually use.
pub fn compile(
    dev: &DevDir,
    plan: &Plan,
    identity_endpoint: &str,
) -> Result<BTreeMap<String, String>, ControlError> {
    let (configs, warnings) = compile_warning(dev, plan, identity_endpoint)?;
    for warning in warnings {
        eprintln!("trellis dev: {warning}");
    }
    Ok(configs)
}

/// [`compile`], with the warnings it prints returned instead.
fn compile_warning(
    dev: &DevDir,
    plan: &Plan,
    identity_endpoint: &str,
) -> Result<(BTreeMap<String, String>, Vec<String>), ControlError> {
    let cluster = synthesize(&dev.topology, plan);
    let mut pods = cluster.pods;
    // What the injector does to every pod it gives a sidecar: the compiler counts a pod as
    // meshed (and its identity as the Service's) only with this annotation.
    for (pod, planned) in pods.iter_mut().zip(&plan.pods) {
        if planned.proxy.is_some() {
            pod.metadata.annotations.get_or_insert_default().insert(
                compiler::PROXY_VERSION_ANNOTATION.to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            );
        }
    }
    let snapshot = Snapshot {
        mesh: Some(Arc::new(full_table_mesh(mesh_of(dev)))),
        traffic_policies: dev
            .objects
            .traffic_policies
            .iter()
            .cloned()
            .map(Arc::new)
            .collect(),
        peer_authentications: dev
            .objects
            .peer_authentications
            .iter()
            .cloned()
            .map(Arc::new)
            .collect(),
        namespaces: cluster.namespaces.into_iter().map(Arc::new).collect(),
        services: cluster.services.into_iter().map(Arc::new).collect(),
        endpoint_slices: cluster.endpoint_slices.into_iter().map(Arc::new).collect(),
        pods: crate::pods::PodSet::from_pods(
            &pods
                .iter()
                .map(crate::compiler::SlimPod::from)
                .collect::<Vec<_>>(),
        ),
        settings: Settings {
            root_namespace: super::ROOT_NAMESPACE.into(),
            identity_endpoint: Some(identity_endpoint.to_string()),
            // Local replicas differ by port only: every config must carry every endpoint.
            inline_endpoints: InlineEndpoints::All,
            ..Settings::default()
        },
    };
    let out = compiler::compile(&snapshot);
    let warnings = oversized_full_tables(&out);
    let mut problems: Vec<String> = Vec::new();
    for (key, conds) in out
        .traffic_policies
        .iter()
        .map(|(k, c)| (format!("TrafficPolicy {}/{}", k.namespace, k.name), c))
        .chain(
            out.peer_authentications
                .iter()
                .map(|(k, c)| (format!("PeerAuthentication {}/{}", k.namespace, k.name), c)),
        )
    {
        for c in conds {
            if c.type_ == "Accepted" && !c.is_true() {
                problems.push(format!("{key}: {} ({})", c.message, c.reason));
            }
        }
    }
    for (ns, why) in &out.invalid {
        problems.push(format!("namespace {ns}: compiled config is invalid: {why}"));
    }
    for (ns, tl) in &out.too_large {
        problems.push(format!(
            "namespace {ns}: config too large ({} bytes)",
            tl.bytes
        ));
    }
    if !problems.is_empty() {
        return Err(ControlError::Compile(problems.join("; ")));
    }
    let mut configs = BTreeMap::new();
    for ns in dev.topology.namespaces() {
        match out.config(&ns) {
            Some(json) => {
                configs.insert(ns, json.to_string());
            }
            None => {
                return Err(ControlError::Compile(format!(
                    "no config for namespace {ns} (is it meshed?)"
                )));
            }
        }
    }
    Ok((configs, warnings))
}

/// The mesh CA for this run: a fresh self-signed root, as the Mesh reconciler creates when no
/// Secret holds one.
pub fn new_ca(params: &MeshParams) -> Result<CertificateAuthority, ControlError> {
    Ok(CertificateAuthority::generate(
        &params.trust_domain,
        params.root_validity,
        SystemTime::now(),
    )?)
}

/// The downward-API `labels` file: `key="value"` lines, values escaped like Go's `%q`.
pub fn labels_file(labels: &BTreeMap<String, String>) -> String {
    let mut s = String::new();
    for (k, v) in labels {
        let escaped = v
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        s.push_str(&format!("{k}=\"{escaped}\"\n"));
    }
    s
}

/// The projected volume of one pod: what kubelet would put in `/var/run/trellis/`.
pub fn volume_files(
    config_json: &str,
    ca_pem: &str,
    pod: &Pod,
    token: &str,
) -> BTreeMap<String, Vec<u8>> {
    [
        ("config.json".to_string(), config_json.as_bytes().to_vec()),
        ("ca.pem".to_string(), ca_pem.as_bytes().to_vec()),
        ("labels".to_string(), labels_file(&pod.labels).into_bytes()),
        ("token".to_string(), token.as_bytes().to_vec()),
    ]
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proxy::config::parse_downward_labels;

    #[test]
    fn otlp_flag_reaches_every_sidecar_config() {
        let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo");
        let mut dev = super::super::spec::load_dir(&demo).unwrap();
        let state = tempfile::tempdir().unwrap();
        let plan = Plan::new(&dev.topology, 17000, state.path()).unwrap();
        let tracing_of = |configs: &BTreeMap<String, String>| -> Vec<serde_json::Value> {
            configs
                .values()
                .map(|c| {
                    let v: serde_json::Value = serde_json::from_str(c).unwrap();
                    v["mesh"]["telemetry"]["tracing"].clone()
                })
                .collect()
        };
        let before = compile(&dev, &plan, "https://127.0.0.1:1").unwrap();
        assert!(tracing_of(&before).iter().all(|t| t.is_null()));
        with_otlp(&mut dev, "127.0.0.1:4317");
        let after = compile(&dev, &plan, "https://127.0.0.1:1").unwrap();
        assert!(!after.is_empty());
        for t in tracing_of(&after) {
            assert_eq!(t["collector"], "127.0.0.1:4317");
            assert_eq!(t["samplingPercent"], 100.0);
        }
    }

    #[test]
    fn bootstrap_configmaps_are_refused_with_the_field_named() {
        let mut mesh = Mesh::new(crate::api::MESH_NAME, MeshSpec::default());
        assert!(mesh_params(&mesh).is_ok());
        mesh.spec.discovery.config_map = crate::api::mesh::ConfigMapContent::Bootstrap;
        let err = mesh_params(&mesh).unwrap_err().to_string();
        assert!(err.contains("spec.discovery.configMap"), "{err}");
    }

    /// A dev directory whose `big` namespace has `n` Services (one replica each).
    fn big_dir(n: usize, dir: &std::path::Path) -> DevDir {
        let mut yaml = String::from("services:\n");
        for i in 0..n {
            yaml.push_str(&format!(
                "  - name: s{i}\n    namespace: big\n    port: {}\n",
                8000 + i
            ));
        }
        yaml.push_str("  - name: api\n    namespace: small\n    port: 9999\n");
        std::fs::write(dir.join("services.yaml"), yaml).unwrap();
        super::super::spec::load_dir(dir).unwrap()
    }

    #[test]
    fn auto_keeps_every_service_in_trellis_dev_and_says_when_a_cluster_would_not() {
        let dir = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let dev = big_dir(200, dir.path());
        assert_eq!(
            mesh_of(&dev).spec.discovery.config_map,
            crate::api::mesh::ConfigMapContent::Auto
        );
        let plan = Plan::new(&dev.topology, 17000, state.path()).unwrap();
        let (configs, warnings) = compile_warning(&dev, &plan, "https://127.0.0.1:1").unwrap();
        // Every Service in every namespace's config, though `big`'s is past Auto's bound:
        // no discovery stream runs here to serve what a bootstrap set would leave out.
        for (ns, json) in &configs {
            let config = trellis_proxy::config::ProxyConfig::from_json(json.as_bytes()).unwrap();
            assert_eq!(config.outbound.len(), 201, "{ns}");
        }
        assert!(configs["big"].len() > compiler::AUTO_FULL_TABLE_MAX_BYTES);

        // And the run says so, for every namespace past the bound.
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].starts_with("namespace big: its full table is"));
        assert!(
            warnings[0].contains("keeps the full table"),
            "{}",
            warnings[0]
        );
        // A demo-sized directory gets no warning.
        let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo");
        let dev = super::super::spec::load_dir(&demo).unwrap();
        let plan = Plan::new(&dev.topology, 18000, state.path()).unwrap();
        let (_, warnings) = compile_warning(&dev, &plan, "https://127.0.0.1:1").unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn labels_file_round_trips_through_the_proxy_parser() {
        let labels: BTreeMap<String, String> = [
            ("app".to_string(), "catalog".to_string()),
            ("odd".to_string(), "a\"b\\c".to_string()),
        ]
        .into();
        assert_eq!(parse_downward_labels(&labels_file(&labels)), labels);
    }
}
