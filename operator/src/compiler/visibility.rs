//! Which Services each namespace's outbound table lists.
//!
//! By default every meshed namespace sees every Service, so a TrafficPolicy (or a new identity
//! behind a Service) changes every namespace's config: at 1 000 Services and 200 namespaces one
//! policy edit is 200 ConfigMap writes of several hundred KiB each, and the table alone can
//! outgrow a ConfigMap. Two annotations, with Istio's `exportTo` / Sidecar-egress semantics,
//! let the owners of each side say who talks to whom, and the compiler then writes a policy
//! change only into the namespaces that can call the Service:
//!
//! - `trellis.dev/export-to` on a **Service**: the namespaces that may see it. `*` (default)
//!   is every namespace, `.` the Service's own, `~` none; otherwise namespace names, comma
//!   separated (`.,frontend,batch`).
//! - `trellis.dev/import-from` on a **Namespace**: the namespaces whose Services its sidecars
//!   see, besides its own, which is always included. `*` (default) is every namespace.
//!
//! A Service is in namespace N's table when its export list admits N and N imports the
//! Service's namespace. The split backends of a visible Service are added too (they live in the
//! Service's namespace and the sidecar must be able to route the split), whatever their own
//! `export-to` says: the split's owner declared that route.
//!
//! Visibility is a scaling and hygiene control, not a security boundary: a call to a Service
//! that is not in the table leaves the sidecar as plain TCP to the original destination, which
//! a Strict destination refuses. Authorization is the inbound policy's job.
//!
//! A malformed annotation is reported as a problem (the Mesh's `Degraded` condition names it)
//! and treated as `*`, the default: hiding Services because of a typo would break calls that
//! worked, while showing them only costs config size.

use std::collections::BTreeSet;

/// Annotation on a Service: which namespaces see it.
pub const EXPORT_TO_ANNOTATION: &str = "trellis.dev/export-to";
/// Annotation on a Namespace: which other namespaces' Services its sidecars see.
pub const IMPORT_FROM_ANNOTATION: &str = "trellis.dev/import-from";

/// A set of namespaces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace (the default).
    #[default]
    All,
    /// Only these (possibly none).
    Only(BTreeSet<String>),
}

impl Scope {
    pub fn contains(&self, namespace: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Only(set) => set.contains(namespace),
        }
    }

    pub fn is_all(&self) -> bool {
        matches!(self, Scope::All)
    }
}

/// Whether `s` is a DNS-1123 label, the syntax of a namespace name.
fn is_namespace_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Parses an annotation value. `.` stands for `own`; `~` (none) is accepted only when
/// `allow_none` (an import list always includes its own namespace, so "none" would be a
/// confusing way to say `.`). Errors name the offending entry.
pub fn parse(value: &str, own: &str, allow_none: bool) -> Result<Scope, String> {
    let entries: Vec<&str> = value.split(',').map(str::trim).collect();
    if entries.iter().all(|e| e.is_empty()) {
        return Err("is empty; use * for every namespace".into());
    }
    let mut set = BTreeSet::new();
    let mut all = false;
    let mut none = false;
    for e in entries {
        match e {
            "" => continue,
            "*" => all = true,
            "." => {
                set.insert(own.to_string());
            }
            "~" if allow_none => none = true,
            name if is_namespace_name(name) => {
                set.insert(name.to_string());
            }
            other => {
                return Err(format!(
                    "{other:?} is not a namespace name{}",
                    if allow_none {
                        ", `.`, `*` or `~`"
                    } else {
                        ", `.` or `*`"
                    }
                ));
            }
        }
    }
    if none && (all || !set.is_empty()) {
        return Err("`~` (no namespace) cannot be combined with other entries".into());
    }
    Ok(if all { Scope::All } else { Scope::Only(set) })
}

/// The export scope of a Service from its annotations, else the Mesh's `defaultExportTo`
/// (`default`, already checked by [`mesh_default`]); `Err` carries the problem message (the
/// scope is then `*`).
pub fn export_scope(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
    own: &str,
    default: &str,
) -> Result<Scope, String> {
    match annotations.and_then(|a| a.get(EXPORT_TO_ANNOTATION)) {
        None if default == "*" => Ok(Scope::All),
        None => Ok(parse(default, own, true).unwrap_or_default()),
        Some(v) => parse(v, own, true).map_err(|e| {
            format!("annotation {EXPORT_TO_ANNOTATION}={v:?}: {e}; treated as * until fixed")
        }),
    }
}

/// The Mesh's `outbound.defaultExportTo` as one annotation-style value. The CRD's rules refuse
/// bad entries; one that got past them (an old API server without CEL) is reported and `*`
/// is used, as for a bad annotation.
pub fn mesh_default(entries: &[String]) -> Result<String, String> {
    let joined = entries.join(",");
    // `.` resolves per Service; any namespace name stands in for checking the syntax.
    match parse(&joined, "x", true) {
        Ok(_) => Ok(joined),
        Err(e) => Err(format!(
            "spec.outbound.defaultExportTo {entries:?}: {e}; treated as * until fixed"
        )),
    }
}

/// The import scope of a Namespace from its annotations, its own name included.
pub fn import_scope(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
    own: &str,
) -> Result<Scope, String> {
    match annotations.and_then(|a| a.get(IMPORT_FROM_ANNOTATION)) {
        None => Ok(Scope::All),
        Some(v) => match parse(v, own, false) {
            Ok(Scope::All) => Ok(Scope::All),
            Ok(Scope::Only(mut set)) => {
                set.insert(own.to_string());
                Ok(Scope::Only(set))
            }
            Err(e) => Err(format!(
                "annotation {IMPORT_FROM_ANNOTATION}={v:?}: {e}; treated as * until fixed"
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only(names: &[&str]) -> Scope {
        Scope::Only(names.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(parse("*", "shop", true), Ok(Scope::All));
        assert_eq!(parse(".", "shop", true), Ok(only(&["shop"])));
        assert_eq!(parse("~", "shop", true), Ok(only(&[])));
        assert_eq!(
            parse(" ., frontend ,batch,", "shop", true),
            Ok(only(&["batch", "frontend", "shop"]))
        );
        assert_eq!(parse("frontend,*", "shop", true), Ok(Scope::All));
    }

    #[test]
    fn rejects_what_is_not_a_namespace() {
        for bad in ["", " , ", "Shop", "a_b", "-a", "a-", "~,shop", "shop/x"] {
            assert!(parse(bad, "shop", true).is_err(), "{bad:?}");
        }
        assert!(parse("~", "shop", false).is_err());
        assert!(parse(&"a".repeat(64), "shop", true).is_err());
        assert!(parse(&"a".repeat(63), "shop", true).is_ok());
    }

    #[test]
    fn import_always_includes_the_own_namespace() {
        let a = [(IMPORT_FROM_ANNOTATION.to_string(), "shared".to_string())].into();
        assert_eq!(
            import_scope(Some(&a), "shop"),
            Ok(only(&["shared", "shop"]))
        );
        assert_eq!(import_scope(None, "shop"), Ok(Scope::All));
        let bad = [(IMPORT_FROM_ANNOTATION.to_string(), "Shared".to_string())].into();
        let e = import_scope(Some(&bad), "shop").unwrap_err();
        assert!(
            e.contains("\"Shared\"") && e.contains("treated as *"),
            "{e}"
        );
    }

    #[test]
    fn export_defaults_to_everyone_and_reports_typos() {
        assert_eq!(export_scope(None, "shop", "*"), Ok(Scope::All));
        let a = [(EXPORT_TO_ANNOTATION.to_string(), ".".to_string())].into();
        assert_eq!(export_scope(Some(&a), "shop", "*"), Ok(only(&["shop"])));
        let bad = [(EXPORT_TO_ANNOTATION.to_string(), "fr0nt end".to_string())].into();
        assert!(
            export_scope(Some(&bad), "shop", "*")
                .unwrap_err()
                .contains(EXPORT_TO_ANNOTATION)
        );
    }

    #[test]
    fn the_mesh_default_applies_to_services_without_the_annotation() {
        assert_eq!(export_scope(None, "shop", "."), Ok(only(&["shop"])));
        assert_eq!(
            export_scope(None, "shop", ".,ops"),
            Ok(only(&["ops", "shop"]))
        );
        let a = [(EXPORT_TO_ANNOTATION.to_string(), "*".to_string())].into();
        assert_eq!(export_scope(Some(&a), "shop", "."), Ok(Scope::All));
        assert_eq!(
            mesh_default(&[".".into(), "ops".into()]),
            Ok(".,ops".into())
        );
        let e = mesh_default(&["Ops".into()]).unwrap_err();
        assert!(
            e.contains("defaultExportTo") && e.contains("treated as *"),
            "{e}"
        );
    }
}
