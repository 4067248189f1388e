//! `trellis inject` and `trellis uninject`: the webhook's injection applied to manifests, for
//! teams that commit injected manifests (GitOps) or run without the webhook.
//!
//! Reads files or stdin (`-`), multi-document YAML and `kind: List`. Pod templates of
//! Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs (and bare Pods) get the
//! same JSON Patch the webhook would send ([`crate::inject::inject`]), applied to the manifest's
//! own JSON so every other field stays as written; every other object passes through unchanged
//! (as a value: comments and YAML formatting are not kept). Namespace labels are unknown here, so
//! a workload counts as selected unless it opts out (`trellis.dev/inject: disabled`) or sits in
//! an excluded namespace. Nothing is written unless every document succeeds.
use std::io::Read as _;
use std::path::PathBuf;

use serde_json::{Value, json};

use crate::api::MeshSpec;
use crate::inject::{
    Decision, InjectContext, NamespaceInfo, default_mesh, inject, uninject_pod_json,
};

/// Errors of `trellis inject` / `uninject`.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid YAML: {message}")]
    Yaml { path: String, message: String },
    #[error("{path}: not a Mesh manifest: {message}")]
    Mesh { path: String, message: String },
    #[error("{object}: {message}")]
    Object { object: String, message: String },
    #[error("cannot write YAML: {0}")]
    Write(String),
}

/// The manifests to read: positional, as `linkerd inject` takes them, or `-f`, as `kubectl`
/// and `istioctl kube-inject` do (people type whichever they are used to); both may be given.
#[derive(clap::Args, Debug)]
pub struct ManifestFiles {
    /// Manifest files; `-` or nothing reads stdin.
    pub files: Vec<PathBuf>,
    /// A manifest file (repeatable), as with kubectl; `-` reads stdin.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub filename: Vec<PathBuf>,
}

impl ManifestFiles {
    /// Every file, positional ones first; none means stdin.
    fn all(&self) -> Vec<PathBuf> {
        self.files.iter().chain(&self.filename).cloned().collect()
    }
}

#[derive(clap::Args, Debug)]
pub struct InjectArgs {
    #[command(flatten)]
    pub input: ManifestFiles,
    /// A Mesh manifest whose proxy settings to use (image, resources, log level); defaults
    /// otherwise.
    #[arg(long)]
    pub mesh: Option<PathBuf>,
    /// The operator's namespace (never injected).
    #[arg(long, default_value = "trellis-system")]
    pub operator_namespace: String,
}

#[derive(clap::Args, Debug)]
pub struct UninjectArgs {
    #[command(flatten)]
    pub input: ManifestFiles,
}

pub fn run_inject(a: InjectArgs) -> anyhow::Result<()> {
    let mesh = match &a.mesh {
        Some(path) => load_mesh(&read(path)?, &path.display().to_string())?,
        None => default_mesh(),
    };
    let ctx = InjectContext {
        operator_namespace: a.operator_namespace,
    };
    let mut docs = Vec::new();
    for (name, text) in inputs(&a.input.all())? {
        docs.extend(parse(&text, &name)?);
    }
    let mut notes = Vec::new();
    for doc in &mut docs {
        inject_value(doc, &mesh, &ctx, &mut notes)?;
    }
    for n in notes {
        eprintln!("trellis inject: {n}");
    }
    print!("{}", render(&docs)?);
    Ok(())
}

pub fn run_uninject(a: UninjectArgs) -> anyhow::Result<()> {
    let mut docs = Vec::new();
    for (name, text) in inputs(&a.input.all())? {
        docs.extend(parse(&text, &name)?);
    }
    for doc in &mut docs {
        uninject_value(doc);
    }
    print!("{}", render(&docs)?);
    Ok(())
}

fn read(path: &PathBuf) -> Result<String, CliError> {
    let err = |source| CliError::Read {
        path: path.display().to_string(),
        source,
    };
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(err)?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).map_err(err)
    }
}

fn inputs(files: &[PathBuf]) -> Result<Vec<(String, String)>, CliError> {
    let stdin = [PathBuf::from("-")];
    let files = if files.is_empty() { &stdin[..] } else { files };
    files
        .iter()
        .map(|p| {
            let name = if p.as_os_str() == "-" {
                "<stdin>".to_string()
            } else {
                p.display().to_string()
            };
            read(p).map(|t| (name, t))
        })
        .collect()
}

/// Parses multi-document YAML into JSON values (YAML 1.2 booleans only, so `y`/`n` stay
/// strings); empty documents are dropped.
pub fn parse(text: &str, name: &str) -> Result<Vec<Value>, CliError> {
    let options = serde_saphyr::options! { strict_booleans: true };
    let docs: Vec<Value> =
        serde_saphyr::from_multiple_with_options(text, options).map_err(|e| CliError::Yaml {
            path: name.into(),
            message: e.to_string(),
        })?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Renders documents as multi-document YAML.
pub fn render(docs: &[Value]) -> Result<String, CliError> {
    let mut out = String::new();
    for (i, doc) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        let text = serde_saphyr::to_string(doc).map_err(|e| CliError::Write(e.to_string()))?;
        out.push_str(&text);
        if !text.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

/// Reads a Mesh manifest (`kind: Mesh` with a `spec`), or a bare spec.
pub fn load_mesh(text: &str, name: &str) -> Result<MeshSpec, CliError> {
    let docs = parse(text, name)?;
    let [doc] = docs.as_slice() else {
        return Err(CliError::Mesh {
            path: name.into(),
            message: format!("expected one document, found {}", docs.len()),
        });
    };
    let spec = match doc.get("kind").and_then(Value::as_str) {
        Some("Mesh") => doc.get("spec").cloned().unwrap_or_else(|| json!({})),
        Some(other) => {
            return Err(CliError::Mesh {
                path: name.into(),
                message: format!("kind is {other}"),
            });
        }
        None => doc.clone(),
    };
    serde_json::from_value(spec).map_err(|e| CliError::Mesh {
        path: name.into(),
        message: e.to_string(),
    })
}

fn describe(doc: &Value) -> String {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("object");
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>");
    format!("{kind}/{name}")
}

/// Where the pod template lives in a workload of `kind`, as a JSON pointer.
fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

fn is_list(doc: &Value) -> bool {
    doc.get("kind")
        .and_then(Value::as_str)
        .is_some_and(|k| k == "List" || k.ends_with("List"))
        && doc.get("items").is_some_and(Value::is_array)
}

/// Injects one document in place (recursing into Lists). Skips are reported in `notes`;
/// denials are errors.
pub fn inject_value(
    doc: &mut Value,
    mesh: &MeshSpec,
    ctx: &InjectContext,
    notes: &mut Vec<String>,
) -> Result<(), CliError> {
    if is_list(doc) {
        for item in doc["items"].as_array_mut().into_iter().flatten() {
            inject_value(item, mesh, ctx, notes)?;
        }
        return Ok(());
    }
    let Some(ptr) = doc
        .get("kind")
        .and_then(Value::as_str)
        .and_then(template_pointer)
    else {
        return Ok(());
    };
    let object = describe(doc);
    let namespace = doc
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let Some(template) = doc.pointer_mut(ptr).filter(|t| t.is_object()) else {
        return Err(CliError::Object {
            object,
            message: format!("no pod template at {ptr}"),
        });
    };
    let pod_json = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": template.get("metadata").cloned().unwrap_or_else(|| json!({})),
        "spec": template.get("spec").cloned().unwrap_or(Value::Null),
    });
    let pod = serde_json::from_value(pod_json).map_err(|e| CliError::Object {
        object: object.clone(),
        message: format!("invalid pod template: {e}"),
    })?;
    let ns = NamespaceInfo {
        name: &namespace,
        labels: None,
    };
    match inject(&pod, &ns, mesh, ctx) {
        Decision::Skip { reason } => {
            notes.push(match reason.warning() {
                Some(warning) => format!("{object}: {warning}"),
                None => format!("{object}: not injected: {reason}"),
            });
            Ok(())
        }
        Decision::Deny { reason } => Err(CliError::Object {
            object,
            message: reason.to_string(),
        }),
        Decision::Patch {
            patch, warnings, ..
        } => {
            for w in warnings {
                notes.push(format!("{object}: {w}"));
            }
            // The patch addresses /metadata and /spec of the pod, which are the template's.
            let obj = template.as_object_mut().ok_or_else(|| CliError::Object {
                object: object.clone(),
                message: "pod template is not an object".into(),
            })?;
            obj.entry("metadata").or_insert_with(|| json!({}));
            json_patch::patch(template, &patch).map_err(|e| CliError::Object {
                object,
                message: format!("patch failed: {e}"),
            })
        }
    }
}

/// Removes the injection from one document in place (recursing into Lists); other objects are
/// left alone.
pub fn uninject_value(doc: &mut Value) {
    if is_list(doc) {
        for item in doc["items"].as_array_mut().into_iter().flatten() {
            uninject_value(item);
        }
        return;
    }
    let Some(ptr) = doc
        .get("kind")
        .and_then(Value::as_str)
        .and_then(template_pointer)
    else {
        return;
    };
    if let Some(template) = doc.pointer_mut(ptr)
        && uninject_pod_json(template)
        && let Some(obj) = template.as_object_mut()
    {
        // inject adds an empty metadata to a template without one.
        if obj
            .get("metadata")
            .and_then(Value::as_object)
            .is_some_and(|m| m.is_empty())
        {
            obj.remove("metadata");
        }
    }
}
