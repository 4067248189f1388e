//! The ClusterServiceVersion: the hand-written base (`config/manifests/bases`) completed from
//! the rendered install.

use base64::Engine as _;
use serde_json::{Value, json};

use super::kustomize::split_image;
use super::{Error, PACKAGE};

pub const API_VERSION: &str = "operators.coreos.com/v1alpha1";
pub const KIND: &str = "ClusterServiceVersion";

/// The rendered install, sorted into what OLM carries where.
#[derive(Debug, Default)]
pub struct Parts {
    pub crds: Vec<Value>,
    pub deployments: Vec<Value>,
    /// ClusterRole rules bound to the operator's ServiceAccount (`clusterPermissions`).
    pub cluster_rules: Vec<Value>,
    /// Role rules bound to it in its own namespace (`permissions`).
    pub namespace_rules: Vec<Value>,
    pub service_account: String,
    /// Shipped as plain manifests (Services, PodDisruptionBudget), namespace removed.
    pub others: Vec<Value>,
}

impl Parts {
    /// Sorts the install. Kinds the bundle cannot carry are an error, so nothing in `config/`
    /// is dropped without someone deciding how OLM installs it.
    pub fn split(install: Vec<Value>) -> Result<Self, Error> {
        let mut p = Parts::default();
        let mut roles = Vec::new();
        let mut bindings = Vec::new();
        let mut accounts = Vec::new();
        for mut obj in install {
            let kind = obj["kind"].as_str().unwrap_or_default().to_string();
            match kind.as_str() {
                "CustomResourceDefinition" => p.crds.push(obj),
                "Deployment" => p.deployments.push(obj),
                // OLM installs into a namespace the user (or OperatorHub) chose.
                "Namespace" => {}
                "ServiceAccount" => accounts.push(obj),
                "ClusterRole" | "Role" => roles.push(obj),
                "ClusterRoleBinding" | "RoleBinding" => bindings.push(obj),
                "Service" | "PodDisruptionBudget" | "ConfigMap" => {
                    if let Some(m) = obj["metadata"].as_object_mut() {
                        m.remove("namespace");
                    }
                    p.others.push(obj)
                }
                other => {
                    return Err(Error::Install(format!(
                        "config/default renders a {other} ({}), which the bundle generator does \
                         not know how to ship through OLM; teach operator/src/bundle/csv.rs",
                        obj["metadata"]["name"]
                    )));
                }
            }
        }
        let [sa] = accounts.as_slice() else {
            return Err(Error::Install(format!(
                "the install must have exactly one ServiceAccount, found {}",
                accounts.len()
            )));
        };
        p.service_account = sa["metadata"]["name"].as_str().unwrap_or_default().into();
        for b in &bindings {
            let to_sa =
                b["subjects"].as_array().into_iter().flatten().any(|s| {
                    s["kind"] == "ServiceAccount" && s["name"] == p.service_account.as_str()
                });
            if !to_sa {
                return Err(Error::Install(format!(
                    "{} {} binds something other than the operator's ServiceAccount; OLM only \
                     grants permissions to the CSV's service accounts",
                    b["kind"], b["metadata"]["name"]
                )));
            }
            let role_kind = b["roleRef"]["kind"].as_str().unwrap_or_default();
            let role_name = &b["roleRef"]["name"];
            let role = roles
                .iter()
                .find(|r| r["kind"] == role_kind && &r["metadata"]["name"] == role_name)
                .ok_or_else(|| {
                    Error::Install(format!(
                        "{} {} refers to {role_kind} {role_name}, which the install does not have",
                        b["kind"], b["metadata"]["name"]
                    ))
                })?;
            let rules = role["rules"].as_array().cloned().unwrap_or_default();
            match (b["kind"].as_str(), role_kind) {
                (Some("ClusterRoleBinding"), "ClusterRole") => p.cluster_rules.extend(rules),
                (Some("RoleBinding"), "Role") => p.namespace_rules.extend(rules),
                // A RoleBinding to a ClusterRole grants it in one namespace.
                (Some("RoleBinding"), "ClusterRole") => p.namespace_rules.extend(rules),
                (k, r) => {
                    return Err(Error::Install(format!("unexpected binding {k:?} to {r}")));
                }
            }
        }
        if p.deployments.is_empty() {
            return Err(Error::Install("the install has no Deployment".into()));
        }
        Ok(p)
    }
}

/// The environment variable that gives the operator its default proxy image.
pub const PROXY_IMAGE_ENV: &str = "TRELLIS_PROXY_IMAGE";

/// The operator's default proxy image: the `TRELLIS_PROXY_IMAGE` value `config/manager` sets
/// on the operator container. What a Mesh without `spec.proxy.image` injects, so it is also
/// the proxy entry of `relatedImages`.
pub fn default_proxy_image(deployment: &Value) -> Option<String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == PROXY_IMAGE_ENV)?["value"]
        .as_str()
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// Completes the base CSV.
pub fn csv(
    base: &Value,
    parts: &Parts,
    samples: &[Value],
    icon_svg: &str,
    version: &str,
) -> Result<Value, Error> {
    let mut csv = base.clone();
    if csv["kind"] != KIND || csv["apiVersion"] != API_VERSION {
        return Err(Error::Install(format!(
            "the CSV base must be a {API_VERSION} {KIND}"
        )));
    }
    let operator_image = parts.deployments[0]["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // One source of truth for the version: the operator image config/manager pins.
    let (_, tag, _) = split_image(&operator_image);
    if tag != Some(version) {
        return Err(Error::Install(format!(
            "--version is {version} but config/manager/kustomization.yaml installs operator image \
             {operator_image}; set its newTag to {version} first, so the bundle and \
             `kubectl apply -k config/default` install the same operator"
        )));
    }
    let proxy_image = default_proxy_image(&parts.deployments[0]).ok_or_else(|| {
        Error::Install(format!(
            "the operator container in config/manager sets no {PROXY_IMAGE_ENV} value"
        ))
    })?;

    let meta = csv["metadata"]
        .as_object_mut()
        .ok_or_else(|| Error::Install("the CSV base has no metadata".into()))?;
    meta.insert("name".into(), json!(format!("{PACKAGE}.v{version}")));
    let ann = meta
        .entry("annotations")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| Error::Install("metadata.annotations must be a mapping".into()))?;
    let examples = serde_json::to_string_pretty(samples)
        .map_err(|e| Error::Install(format!("alm-examples: {e}")))?;
    ann.insert("alm-examples".into(), json!(examples));
    ann.insert("containerImage".into(), json!(operator_image));
    // Any earlier version upgrades straight to this one.
    ann.insert("olm.skipRange".into(), json!(format!("<{version}")));

    let spec = csv["spec"]
        .as_object_mut()
        .ok_or_else(|| Error::Install("the CSV base has no spec".into()))?;
    spec.insert("version".into(), json!(version));
    spec.insert(
        "icon".into(),
        json!([{
            "base64data": base64::engine::general_purpose::STANDARD.encode(icon_svg.trim_end()),
            "mediatype": "image/svg+xml",
        }]),
    );
    // Everything the operator may run, so a disconnected install mirrors all of it: itself,
    // the sidecar, and the evaluation addons' pinned images.
    let mut related = vec![
        json!({"name": "trellis-operator", "image": operator_image}),
        json!({"name": "trellis-proxy", "image": proxy_image}),
    ];
    related.extend(
        crate::addons::images::ALL
            .iter()
            .map(|(name, image)| json!({"name": name, "image": image})),
    );
    spec.insert("relatedImages".into(), Value::Array(related));
    spec.insert("install".into(), install(parts));
    let owned = spec
        .get_mut("customresourcedefinitions")
        .and_then(|c| c.get_mut("owned"))
        .and_then(Value::as_array_mut)
        .ok_or_else(|| Error::Install("the CSV base lists no owned CRDs".into()))?;
    for o in owned.iter_mut() {
        let kind = o["kind"].as_str().unwrap_or_default().to_string();
        let crd = parts
            .crds
            .iter()
            .find(|c| c["spec"]["names"]["kind"] == kind.as_str())
            .ok_or_else(|| {
                Error::Install(format!(
                    "the CSV base owns {kind}, which is not among the generated CRDs"
                ))
            })?;
        let name = crd["metadata"]["name"].clone();
        let served = crd["spec"]["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["storage"] == true)
            .map(|v| v["name"].clone())
            .unwrap_or_default();
        let o = o
            .as_object_mut()
            .ok_or_else(|| Error::Install(format!("owned entry {kind} is not a mapping")))?;
        o.insert("name".into(), name);
        o.insert("version".into(), served);
    }
    for crd in &parts.crds {
        let kind = &crd["spec"]["names"]["kind"];
        if !owned.iter().any(|o| &o["kind"] == kind) {
            return Err(Error::Install(format!(
                "CRD {kind} is not described in config/manifests/bases: add an owned entry with \
                 its display name, description and descriptors"
            )));
        }
    }
    Ok(csv)
}

/// The install strategy: the Deployments as they are in `config/manager`, and the RBAC rules
/// OLM turns into a (Cluster)Role and binding for the ServiceAccount in its namespace.
fn install(parts: &Parts) -> Value {
    let deployments: Vec<Value> = parts
        .deployments
        .iter()
        .map(|d| {
            json!({
                "name": d["metadata"]["name"],
                "label": d["metadata"]["labels"],
                "spec": d["spec"],
            })
        })
        .collect();
    let mut spec = json!({
        "deployments": deployments,
        "clusterPermissions": [{
            "serviceAccountName": parts.service_account,
            "rules": parts.cluster_rules,
        }],
    });
    if !parts.namespace_rules.is_empty() {
        spec["permissions"] = json!([{
            "serviceAccountName": parts.service_account,
            "rules": parts.namespace_rules,
        }]);
    }
    json!({"strategy": "deployment", "spec": spec})
}
