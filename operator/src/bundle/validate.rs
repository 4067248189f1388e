//! Checks a bundle the way operator-framework's validator (`operator-sdk bundle validate`, the
//! `operator-framework/api` package, with its OperatorHub and good-practices suites) does, for
//! the rules that can break an install or an OperatorHub listing, plus Trellis's own policy
//! (AllNamespaces only, no webhook definitions).
//!
//! The upstream validator is Go; no Go toolchain new enough to build it is available to CI, so
//! these rules are re-implemented here from its documented behaviour, and each is proven to fire
//! on a deliberately broken bundle (`operator/tests/bundle.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write as _;

use serde_json::Value;

use super::{Bundle, METADATA_DIR, csv::KIND, is_semver};

/// OLM refuses bundles whose gzip-compressed manifests exceed this (the size of an etcd value
/// the bundle is unpacked into, minus headroom).
pub const MAX_COMPRESSED_BYTES: usize = 1 << 20;

/// The rule a finding breaks; tests assert on it rather than on message text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rule {
    /// Every file parses; there is exactly one CSV.
    Parse,
    /// CSV identity and OperatorHub metadata: name `<package>.v<version>`, semver versions,
    /// display name, description, icon, maintainers, links, provider, capabilities,
    /// categories, every deployment image in `relatedImages`.
    CsvMetadata,
    /// `installModes` types are valid and unique, at least one supported; Trellis supports
    /// AllNamespaces only.
    InstallModes,
    /// `alm-examples` is a JSON array whose every kind is owned, with an example of every
    /// owned kind (OperatorHub's "create" forms start from them).
    AlmExamples,
    /// Every owned CRD is in the bundle (name, group, kind, served version).
    OwnedCrdsInBundle,
    /// Every CRD in the bundle is owned.
    BundledCrdsOwned,
    /// Every spec/status descriptor path exists in the CRD schema; x-descriptors are URNs.
    Descriptors,
    /// annotations.yaml has the required keys and bundle.Dockerfile carries the same labels.
    Annotations,
    /// The compressed bundle is under [`MAX_COMPRESSED_BYTES`].
    Size,
    /// Every container of the install sets CPU and memory requests.
    ResourceRequests,
    /// The operator's ServiceAccount may watch the owned kinds and write their status.
    Rbac,
    /// No `webhookdefinitions`: OLM would rewrite the injection webhook's namespaceSelector.
    Webhooks,
}

/// One broken rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub rule: Rule,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:?}] {}", self.rule, self.message)
    }
}

struct Report(Vec<Finding>);

impl Report {
    fn add(&mut self, rule: Rule, message: impl Into<String>) {
        self.0.push(Finding {
            rule,
            message: message.into(),
        });
    }
}

/// Every finding; empty means the bundle is valid.
pub fn validate(b: &Bundle) -> Vec<Finding> {
    let mut r = Report(Vec::new());
    for (path, text) in &b.files {
        if path.ends_with(".yaml")
            && let Err(e) = serde_saphyr::from_str::<Value>(text)
        {
            r.add(Rule::Parse, format!("{path} is not YAML: {e}"));
        }
    }
    let csvs: Vec<(String, Value)> = b.manifests().filter(|(_, d)| d["kind"] == KIND).collect();
    let [(_, csv)] = csvs.as_slice() else {
        r.add(
            Rule::Parse,
            format!(
                "manifests/ must hold exactly one {KIND}, found {}",
                csvs.len()
            ),
        );
        return r.0;
    };
    let crds: Vec<Value> = b
        .manifests()
        .filter(|(_, d)| d["kind"] == "CustomResourceDefinition")
        .map(|(_, d)| d)
        .collect();
    let annotations = annotations(b, &mut r);
    csv_metadata(csv, &annotations, &mut r);
    install_modes(csv, &mut r);
    alm_examples(csv, &mut r);
    owned_crds(csv, &crds, &mut r);
    descriptors(csv, &crds, &mut r);
    size(b, &mut r);
    resource_requests(csv, &mut r);
    rbac(csv, &crds, &mut r);
    if csv["spec"]["webhookdefinitions"]
        .as_array()
        .is_some_and(|w| !w.is_empty())
    {
        r.add(
            Rule::Webhooks,
            "spec.webhookdefinitions is set: OLM rewrites a declared webhook's namespaceSelector \
             to the OperatorGroup's namespaces, which breaks sidecar injection; the operator \
             manages trellis-sidecar-injector itself",
        );
    }
    r.0.sort_by_key(|f| f.rule);
    r.0
}

fn str_of<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or_default()
}

fn csv_metadata(csv: &Value, ann: &BTreeMap<String, String>, r: &mut Report) {
    let version = str_of(csv, "/spec/version");
    if !is_semver(version) {
        r.add(
            Rule::CsvMetadata,
            format!("spec.version {version:?} is not semver"),
        );
    }
    let package = ann
        .get("operators.operatorframework.io.bundle.package.v1")
        .map(String::as_str)
        .unwrap_or_default();
    let name = str_of(csv, "/metadata/name");
    if name != format!("{package}.v{version}") {
        r.add(
            Rule::CsvMetadata,
            format!("metadata.name {name:?} must be <package>.v<version>: {package}.v{version}"),
        );
    }
    let min_kube = str_of(csv, "/spec/minKubeVersion");
    if !is_semver(min_kube) {
        r.add(
            Rule::CsvMetadata,
            format!("spec.minKubeVersion {min_kube:?} is not semver"),
        );
    }
    for field in [
        "/spec/displayName",
        "/spec/description",
        "/spec/provider/name",
    ] {
        if str_of(csv, field).trim().is_empty() {
            r.add(Rule::CsvMetadata, format!("{field} is empty"));
        }
    }
    for list in ["/spec/maintainers", "/spec/links", "/spec/keywords"] {
        if csv
            .pointer(list)
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
        {
            r.add(Rule::CsvMetadata, format!("{list} is empty"));
        }
    }
    let icon_ok = csv["spec"]["icon"].as_array().is_some_and(|icons| {
        !icons.is_empty()
            && icons.iter().all(|i| {
                use base64::Engine as _;
                let data = i["base64data"].as_str().unwrap_or_default();
                !data.is_empty()
                    && base64::engine::general_purpose::STANDARD
                        .decode(data)
                        .is_ok()
                    && i["mediatype"].as_str().is_some_and(|m| {
                        ["image/svg+xml", "image/png", "image/jpeg", "image/gif"].contains(&m)
                    })
            })
    });
    if !icon_ok {
        r.add(
            Rule::CsvMetadata,
            "spec.icon needs base64data and an image mediatype",
        );
    }
    const CAPABILITIES: [&str; 5] = [
        "Basic Install",
        "Seamless Upgrades",
        "Full Lifecycle",
        "Deep Insights",
        "Auto Pilot",
    ];
    let cap = str_of(csv, "/metadata/annotations/capabilities");
    if !CAPABILITIES.contains(&cap) {
        r.add(
            Rule::CsvMetadata,
            format!("capabilities {cap:?} is not one of {CAPABILITIES:?}"),
        );
    }
    if str_of(csv, "/metadata/annotations/categories").is_empty() {
        r.add(Rule::CsvMetadata, "the categories annotation is empty");
    }
    let related: BTreeSet<&str> = csv["spec"]["relatedImages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["image"].as_str())
        .collect();
    for c in containers(csv) {
        let image = c["image"].as_str().unwrap_or_default();
        if !related.contains(image) {
            r.add(
                Rule::CsvMetadata,
                format!("container image {image} is not in spec.relatedImages (disconnected mirroring would miss it)"),
            );
        }
    }
    // The operator injects the image its environment names; OLM mirrors relatedImages. They
    // must be the same image, or a mirrored install injects an image it never mirrored.
    let proxy_related = csv["spec"]["relatedImages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["name"] == "trellis-proxy")
        .and_then(|i| i["image"].as_str());
    for c in containers(csv) {
        let env = c["env"].as_array().into_iter().flatten();
        for e in env.filter(|e| e["name"] == super::csv::PROXY_IMAGE_ENV) {
            let value = e["value"].as_str();
            if value.is_none() || value != proxy_related {
                r.add(
                    Rule::CsvMetadata,
                    format!(
                        "{} is {value:?} but the trellis-proxy relatedImage is {proxy_related:?}",
                        super::csv::PROXY_IMAGE_ENV
                    ),
                );
            }
        }
    }
}

fn install_modes(csv: &Value, r: &mut Report) {
    const TYPES: [&str; 4] = [
        "OwnNamespace",
        "SingleNamespace",
        "MultiNamespace",
        "AllNamespaces",
    ];
    let modes = csv["spec"]["installModes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut seen = BTreeSet::new();
    let mut supported = Vec::new();
    for m in &modes {
        let t = m["type"].as_str().unwrap_or_default();
        if !TYPES.contains(&t) {
            r.add(
                Rule::InstallModes,
                format!("install mode {t:?} is not one of {TYPES:?}"),
            );
        }
        if !seen.insert(t) {
            r.add(
                Rule::InstallModes,
                format!("install mode {t} is listed twice"),
            );
        }
        match m["supported"].as_bool() {
            Some(true) => supported.push(t),
            Some(false) => {}
            None => r.add(
                Rule::InstallModes,
                format!("install mode {t}: supported must be a boolean"),
            ),
        }
    }
    if supported.is_empty() {
        r.add(Rule::InstallModes, "no install mode is supported");
    } else if supported != ["AllNamespaces"] {
        r.add(
            Rule::InstallModes,
            format!(
                "only AllNamespaces may be supported (the mesh is cluster-wide), not {supported:?}"
            ),
        );
    }
}

/// `(group, version, kind)` of every owned CRD; the group is the owned name after its first dot.
fn owned(csv: &Value) -> Vec<(String, String, String, &Value)> {
    csv["spec"]["customresourcedefinitions"]["owned"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|o| {
            let name = o["name"].as_str().unwrap_or_default();
            let group = name.split_once('.').map(|(_, g)| g).unwrap_or_default();
            (
                group.to_string(),
                o["version"].as_str().unwrap_or_default().to_string(),
                o["kind"].as_str().unwrap_or_default().to_string(),
                o,
            )
        })
        .collect()
}

fn alm_examples(csv: &Value, r: &mut Report) {
    let text = str_of(csv, "/metadata/annotations/alm-examples");
    let examples: Vec<Value> = match serde_json::from_str(text) {
        Ok(Value::Array(a)) if !a.is_empty() => a,
        Ok(_) => {
            return r.add(
                Rule::AlmExamples,
                "alm-examples must be a non-empty JSON array",
            );
        }
        Err(e) => return r.add(Rule::AlmExamples, format!("alm-examples is not JSON: {e}")),
    };
    let owned = owned(csv);
    for (g, v, k, _) in &owned {
        let shown = examples
            .iter()
            .any(|e| e["kind"] == k.as_str() && e["apiVersion"] == format!("{g}/{v}").as_str());
        if !shown {
            r.add(
                Rule::AlmExamples,
                format!("owned {g}/{v} {k} has no example in alm-examples"),
            );
        }
    }
    for ex in &examples {
        let api = ex["apiVersion"].as_str().unwrap_or_default();
        let kind = ex["kind"].as_str().unwrap_or_default();
        let (group, version) = api.split_once('/').unwrap_or(("", api));
        if !owned
            .iter()
            .any(|(g, v, k, _)| g == group && v == version && k == kind)
        {
            r.add(
                Rule::AlmExamples,
                format!("alm-examples has a {api} {kind}, which the CSV does not own"),
            );
        }
    }
}

fn crd_versions(crd: &Value) -> impl Iterator<Item = &Value> {
    crd["spec"]["versions"].as_array().into_iter().flatten()
}

fn owned_crds(csv: &Value, crds: &[Value], r: &mut Report) {
    let owned = owned(csv);
    for (group, version, kind, o) in &owned {
        let name = o["name"].as_str().unwrap_or_default();
        let found = crds.iter().find(|c| c["metadata"]["name"] == name);
        match found {
            None => r.add(
                Rule::OwnedCrdsInBundle,
                format!("owned CRD {name} ({kind}) is not in the bundle"),
            ),
            Some(c) => {
                let served =
                    crd_versions(c).any(|v| v["name"] == version.as_str() && v["served"] == true);
                if c["spec"]["group"] != group.as_str()
                    || c["spec"]["names"]["kind"] != kind.as_str()
                    || !served
                {
                    r.add(
                        Rule::OwnedCrdsInBundle,
                        format!(
                            "owned {group}/{version} {kind} does not match CRD {name} ({}/{} served versions {:?})",
                            c["spec"]["group"],
                            c["spec"]["names"]["kind"],
                            crd_versions(c).filter(|v| v["served"] == true).map(|v| v["name"].clone()).collect::<Vec<_>>()
                        ),
                    );
                }
            }
        }
        for field in ["displayName", "description"] {
            if o[field].as_str().is_none_or(|s| s.trim().is_empty()) {
                r.add(
                    Rule::OwnedCrdsInBundle,
                    format!("owned {kind} has no {field}"),
                );
            }
        }
    }
    for c in crds {
        let name = c["metadata"]["name"].as_str().unwrap_or_default();
        if !owned.iter().any(|(_, _, _, o)| o["name"] == name) {
            r.add(
                Rule::BundledCrdsOwned,
                format!("CRD {name} is in the bundle but not owned by the CSV"),
            );
        }
    }
}

/// The schema node a descriptor path names (`a.b`, `a[0].b`), starting at `root`.
fn schema_at<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    let mut node = root;
    for seg in path.split('.') {
        let (name, indices) = match seg.find('[') {
            Some(i) => (&seg[..i], &seg[i..]),
            None => (seg, ""),
        };
        if name.is_empty() {
            return None;
        }
        node = node.get("properties")?.get(name)?;
        for _ in indices.matches('[') {
            node = node.get("items")?;
        }
    }
    Some(node)
}

fn descriptors(csv: &Value, crds: &[Value], r: &mut Report) {
    for (_, version, kind, o) in owned(csv) {
        let Some(crd) = crds.iter().find(|c| c["metadata"]["name"] == o["name"]) else {
            continue;
        };
        let Some(schema) = crd_versions(crd)
            .find(|v| v["name"] == version.as_str())
            .map(|v| &v["schema"]["openAPIV3Schema"])
        else {
            continue;
        };
        for (list, top) in [("specDescriptors", "spec"), ("statusDescriptors", "status")] {
            let Some(root) = schema["properties"].get(top) else {
                continue;
            };
            for d in o[list].as_array().into_iter().flatten() {
                let path = d["path"].as_str().unwrap_or_default();
                if schema_at(root, path).is_none() {
                    r.add(
                        Rule::Descriptors,
                        format!("{kind} {list} path {top}.{path} is not in the CRD schema"),
                    );
                }
                for x in d["x-descriptors"].as_array().into_iter().flatten() {
                    if !x
                        .as_str()
                        .is_some_and(|x| x.starts_with("urn:alm:descriptor:"))
                    {
                        r.add(
                            Rule::Descriptors,
                            format!("{kind} {list} {path}: x-descriptor {x} is not a urn:alm:descriptor: URN"),
                        );
                    }
                }
                if d["displayName"].as_str().is_none_or(str::is_empty) {
                    r.add(
                        Rule::Descriptors,
                        format!("{kind} {list} {path} has no displayName"),
                    );
                }
            }
        }
        let has_conditions = o["statusDescriptors"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|d| {
                d["path"] == "conditions"
                    && d["x-descriptors"].as_array().is_some_and(|x| {
                        x.iter()
                            .any(|x| x == "urn:alm:descriptor:io.kubernetes.conditions")
                    })
            });
        if !has_conditions {
            r.add(
                Rule::Descriptors,
                format!("{kind} has no conditions status descriptor with x-descriptor urn:alm:descriptor:io.kubernetes.conditions"),
            );
        }
    }
}

/// annotations.yaml, checked, and compared with bundle.Dockerfile's labels.
fn annotations(b: &Bundle, r: &mut Report) -> BTreeMap<String, String> {
    let path = format!("{METADATA_DIR}annotations.yaml");
    let parsed: Option<Value> = b
        .files
        .get(&path)
        .and_then(|t| serde_saphyr::from_str(t).ok());
    let ann: BTreeMap<String, String> = parsed
        .as_ref()
        .and_then(|v| v["annotations"].as_object())
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str().map_or_else(|| v.to_string(), str::to_string),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if ann.is_empty() {
        r.add(
            Rule::Annotations,
            format!("{path} is missing or has no annotations"),
        );
    }
    let key = |k: &str| format!("operators.operatorframework.io.bundle.{k}.v1");
    for (k, want) in [
        ("mediatype", Some("registry+v1")),
        ("manifests", Some("manifests/")),
        ("metadata", Some("metadata/")),
        ("package", None),
        ("channels", None),
    ] {
        match (ann.get(&key(k)), want) {
            (None, _) => r.add(Rule::Annotations, format!("{path} has no {}", key(k))),
            (Some(v), Some(w)) if v != w => r.add(
                Rule::Annotations,
                format!("{} is {v:?}, must be {w:?}", key(k)),
            ),
            (Some(v), None) if v.trim().is_empty() => {
                r.add(Rule::Annotations, format!("{} is empty", key(k)))
            }
            _ => {}
        }
    }
    if let Some(default) = ann.get("operators.operatorframework.io.bundle.channel.default.v1") {
        let channels = ann.get(&key("channels")).cloned().unwrap_or_default();
        if !channels.split(',').any(|c| c.trim() == default) {
            r.add(
                Rule::Annotations,
                format!("default channel {default:?} is not among the channels {channels:?}"),
            );
        }
    }
    match b.files.get("bundle.Dockerfile") {
        None => r.add(Rule::Annotations, "bundle.Dockerfile is missing"),
        Some(df) => {
            let labels: BTreeMap<String, String> = df
                .lines()
                .filter_map(|l| l.trim().strip_prefix("LABEL "))
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
                .collect();
            if labels != ann {
                let differ: Vec<&String> = labels
                    .keys()
                    .chain(ann.keys())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .filter(|k| labels.get(*k) != ann.get(*k))
                    .collect();
                r.add(
                    Rule::Annotations,
                    format!("bundle.Dockerfile labels and {path} disagree on {differ:?}"),
                );
            }
            for dir in ["manifests/", "metadata/"] {
                if !df
                    .lines()
                    .any(|l| l.starts_with("COPY ") && l.contains(&format!("/{dir}")))
                {
                    r.add(
                        Rule::Annotations,
                        format!("bundle.Dockerfile does not COPY {dir}"),
                    );
                }
            }
        }
    }
    ann
}

/// The bundle gzip-compressed, as the bundle unpacker stores it.
pub fn compressed_size(b: &Bundle) -> usize {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    for (path, text) in &b.files {
        // Writing into a Vec cannot fail.
        let _ = gz.write_all(path.as_bytes());
        let _ = gz.write_all(text.as_bytes());
    }
    gz.finish().map(|v| v.len()).unwrap_or(usize::MAX)
}

fn size(b: &Bundle, r: &mut Report) {
    let n = compressed_size(b);
    if n >= MAX_COMPRESSED_BYTES {
        r.add(
            Rule::Size,
            format!("the bundle is {n} bytes compressed; OLM's limit is {MAX_COMPRESSED_BYTES}"),
        );
    }
}

fn deployments(csv: &Value) -> impl Iterator<Item = &Value> {
    csv["spec"]["install"]["spec"]["deployments"]
        .as_array()
        .into_iter()
        .flatten()
}

fn containers(csv: &Value) -> impl Iterator<Item = &Value> {
    deployments(csv).flat_map(|d| {
        let pod = &d["spec"]["template"]["spec"];
        pod["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(pod["initContainers"].as_array().into_iter().flatten())
    })
}

fn resource_requests(csv: &Value, r: &mut Report) {
    if deployments(csv).next().is_none() {
        r.add(
            Rule::ResourceRequests,
            "the install strategy has no deployments",
        );
    }
    for c in containers(csv) {
        for res in ["cpu", "memory"] {
            if c["resources"]["requests"][res]
                .as_str()
                .is_none_or(str::is_empty)
            {
                r.add(
                    Rule::ResourceRequests,
                    format!("container {} sets no {res} request", c["name"]),
                );
            }
        }
    }
}

fn grants(rules: &[Value], group: &str, resource: &str, verb: &str) -> bool {
    let has = |r: &Value, field: &str, want: &str| {
        r[field]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == want || x == "*"))
    };
    rules.iter().any(|r| {
        has(r, "apiGroups", group) && has(r, "resources", resource) && has(r, "verbs", verb)
    })
}

fn rbac(csv: &Value, crds: &[Value], r: &mut Report) {
    let install = &csv["spec"]["install"]["spec"];
    let accounts: BTreeSet<&str> = deployments(csv)
        .map(|d| str_of(d, "/spec/template/spec/serviceAccountName"))
        .collect();
    for sa in &accounts {
        if sa.is_empty() {
            r.add(
                Rule::Rbac,
                "a deployment runs without serviceAccountName (OLM grants nothing to `default`)",
            );
        }
    }
    let mut cluster_rules = Vec::new();
    for list in ["clusterPermissions", "permissions"] {
        for p in install[list].as_array().into_iter().flatten() {
            let sa = p["serviceAccountName"].as_str().unwrap_or_default();
            if !accounts.contains(sa) {
                r.add(
                    Rule::Rbac,
                    format!("{list} is for service account {sa:?}, which no deployment uses"),
                );
            }
            if list == "clusterPermissions" {
                cluster_rules.extend(p["rules"].as_array().cloned().unwrap_or_default());
            }
        }
    }
    for (group, _, kind, o) in owned(csv) {
        let plural = crds
            .iter()
            .find(|c| c["metadata"]["name"] == o["name"])
            .and_then(|c| c["spec"]["names"]["plural"].as_str())
            .unwrap_or_else(|| {
                o["name"]
                    .as_str()
                    .unwrap_or_default()
                    .split('.')
                    .next()
                    .unwrap_or_default()
            });
        for verb in ["get", "list", "watch"] {
            if !grants(&cluster_rules, &group, plural, verb) {
                r.add(
                    Rule::Rbac,
                    format!("clusterPermissions do not grant {verb} on {plural}.{group} ({kind}): the operator watches them cluster-wide"),
                );
            }
        }
        let status = format!("{plural}/status");
        if !["patch", "update"]
            .iter()
            .any(|v| grants(&cluster_rules, &group, &status, v))
        {
            r.add(
                Rule::Rbac,
                format!("clusterPermissions do not grant patch on {status}.{group}: the operator writes {kind} status"),
            );
        }
    }
}
