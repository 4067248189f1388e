//! The subset of kustomize that `config/` uses (`resources`, `namespace`, `images`), so the
//! bundle is generated from the same files as `kubectl apply -k config/default` without a
//! kustomize binary or network at generation or test time.
//!
//! Any other kustomization field is refused with an error naming it: a patch this renderer
//! silently ignored would make the bundle differ from the kustomize install. A test compares
//! this renderer's output with `kubectl kustomize config/default` where kubectl is installed.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{Error, Source};

/// Kustomization fields this renderer implements; anything else is an error.
const SUPPORTED: [&str; 5] = ["apiVersion", "kind", "resources", "namespace", "images"];

/// Kinds that have no namespace, so the `namespace` field leaves them alone.
const CLUSTER_SCOPED: [&str; 9] = [
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "PriorityClass",
    "StorageClass",
    "APIService",
];

/// Renders the kustomization in `dir` (relative to the source root), in kustomize's order:
/// resources depth-first as listed, then this level's `images`, then its `namespace`.
pub fn render(src: &dyn Source, dir: &Path) -> Result<Vec<Value>, Error> {
    let kpath = dir.join("kustomization.yaml");
    let k: Value = parse_one(src, &kpath)?;
    let Some(fields) = k.as_object() else {
        return Err(Error::Source {
            path: kpath,
            message: "a kustomization must be a mapping".into(),
        });
    };
    if let Some(other) = fields.keys().find(|f| !SUPPORTED.contains(&f.as_str())) {
        return Err(Error::Source {
            path: kpath,
            message: format!(
                "field `{other}` is not supported by the bundle generator's kustomize subset \
                 ({}); extend operator/src/bundle/kustomize.rs or express it in plain resources",
                SUPPORTED[2..].join(", ")
            ),
        });
    }
    let mut docs = Vec::new();
    for r in fields
        .get("resources")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(r) = r.as_str() else {
            return Err(Error::Source {
                path: kpath.clone(),
                message: format!("resources entry {r} is not a path"),
            });
        };
        let path = normalize(&dir.join(r));
        if src.is_dir(&path) {
            docs.extend(render(src, &path)?);
        } else {
            docs.extend(parse_all(src, &path)?);
        }
    }
    for image in fields
        .get("images")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let rule = ImageRule::from_value(image).map_err(|message| Error::Source {
            path: kpath.clone(),
            message,
        })?;
        for d in &mut docs {
            rule.apply(d);
        }
    }
    if let Some(ns) = fields.get("namespace").and_then(Value::as_str) {
        for d in &mut docs {
            set_namespace(d, ns);
        }
    }
    Ok(docs)
}

/// `a/b/../c` -> `a/c`, so paths in errors read like the repository's.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir if out.file_name().is_some() => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

fn parse_one(src: &dyn Source, path: &Path) -> Result<Value, Error> {
    let text = src.read(path)?;
    serde_saphyr::from_str(&text).map_err(|e| Error::Source {
        path: path.to_path_buf(),
        message: format!("not YAML: {e}"),
    })
}

/// Every non-empty document of a multi-document YAML file.
pub fn parse_all(src: &dyn Source, path: &Path) -> Result<Vec<Value>, Error> {
    let text = src.read(path)?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).map_err(|e| Error::Source {
        path: path.to_path_buf(),
        message: format!("not YAML: {e}"),
    })?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// One `images` entry: containers whose image name is `name` get a new name, tag or digest.
struct ImageRule {
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
    digest: Option<String>,
}

impl ImageRule {
    fn from_value(v: &Value) -> Result<Self, String> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        Ok(Self {
            name: s("name").ok_or_else(|| format!("images entry {v} has no name"))?,
            new_name: s("newName"),
            new_tag: s("newTag"),
            digest: s("digest"),
        })
    }

    fn apply(&self, doc: &mut Value) {
        for c in containers_mut(doc) {
            let Some(image) = c.get("image").and_then(Value::as_str) else {
                continue;
            };
            let (name, tag, digest) = split_image(image);
            if name != self.name {
                continue;
            }
            let name = self.new_name.as_deref().unwrap_or(name);
            let image = match (&self.digest, &self.new_tag, digest, tag) {
                (Some(d), ..) => format!("{name}@{d}"),
                (None, Some(t), ..) => format!("{name}:{t}"),
                (None, None, Some(d), _) => format!("{name}@{d}"),
                (None, None, None, Some(t)) => format!("{name}:{t}"),
                (None, None, None, None) => name.to_string(),
            };
            c["image"] = Value::String(image);
        }
    }
}

/// `registry:5000/repo:tag@sha256:x` -> (`registry:5000/repo`, `tag`, `sha256:x`).
pub fn split_image(image: &str) -> (&str, Option<&str>, Option<&str>) {
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    let slash = rest.rfind('/').map_or(0, |i| i + 1);
    match rest[slash..].rfind(':') {
        Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..]), digest),
        None => (rest, None, digest),
    }
}

/// The containers and init containers of a workload or of a pod template.
pub fn containers_mut(doc: &mut Value) -> Vec<&mut Value> {
    let spec = if doc.pointer("/spec/template/spec").is_some() {
        doc.pointer_mut("/spec/template/spec")
    } else {
        doc.get_mut("spec")
    };
    let Some(Value::Object(spec)) = spec else {
        return Vec::new();
    };
    spec.iter_mut()
        .filter(|(k, _)| *k == "containers" || *k == "initContainers")
        .filter_map(|(_, v)| v.as_array_mut())
        .flatten()
        .collect()
}

fn set_namespace(doc: &mut Value, ns: &str) {
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    if kind == "Namespace" {
        // kustomize renames the Namespace object itself to the target namespace.
        doc["metadata"]["name"] = Value::String(ns.into());
    } else if !CLUSTER_SCOPED.contains(&kind.as_str()) && doc["metadata"].is_object() {
        doc["metadata"]["namespace"] = Value::String(ns.into());
    }
    if kind == "RoleBinding" || kind == "ClusterRoleBinding" {
        // kustomize's default (`setRoleBindingSubjects: defaultOnly`): ServiceAccount subjects
        // without a namespace, or in `default`, follow the kustomization's namespace.
        for s in doc["subjects"].as_array_mut().into_iter().flatten() {
            let unset = s
                .get("namespace")
                .and_then(Value::as_str)
                .is_none_or(|n| n.is_empty() || n == "default");
            if s["kind"] == "ServiceAccount" && unset {
                s["namespace"] = Value::String(ns.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_image_references() {
        assert_eq!(split_image("nginx"), ("nginx", None, None));
        assert_eq!(
            split_image("ghcr.io/a/b:1.2"),
            ("ghcr.io/a/b", Some("1.2"), None)
        );
        assert_eq!(
            split_image("localhost:5000/b@sha256:00"),
            ("localhost:5000/b", None, Some("sha256:00"))
        );
        assert_eq!(
            split_image("localhost:5000/b:t@sha256:00"),
            ("localhost:5000/b", Some("t"), Some("sha256:00"))
        );
    }

    #[test]
    fn normalizes_parent_components() {
        assert_eq!(
            normalize(Path::new("config/crd/../../crds")),
            PathBuf::from("crds")
        );
    }
}
