//! Shared by the CRD tests: the generated schemas, an OpenAPI-v3-subset validator (what the API
//! server checks before CEL) and CEL evaluation through kube's `cel` feature; and by the
//! listener tests: [`net`].
#![allow(dead_code)]

pub mod net;

use serde_json::Value;

/// The `openAPIV3Schema` of the CRD for `kind`, as JSON.
pub fn schema(kind: &str) -> Value {
    let crd = trellis_operator::api::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for kind {kind}"));
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("derived CRD has an openAPIV3Schema"),
    )
    .unwrap()
}

/// Validates `obj` the way the API server does on create: schema defaults, then the OpenAPI
/// checks, then every CEL rule. Returns every error found (not just the first).
pub fn admit(kind: &str, obj: &Value) -> Result<(), Vec<String>> {
    let schema = schema(kind);
    let defaulted = kube::core::cel::apply_defaults(&schema, obj);
    let mut errors = Vec::new();
    openapi::validate(&schema, &defaulted, "", &mut errors);
    if let Err(e) = kube::core::cel::Validator::new().validate(&schema, &defaulted, None) {
        errors.extend(e.into_vec().into_iter().map(|e| e.to_string()));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// A small validator for the OpenAPI v3 subset CRD schemas use. Unknown keywords are an error,
/// so a schema feature this validator does not understand can never pass silently.
pub mod openapi {
    use serde_json::Value;

    /// Keywords this validator understands (and the ones it deliberately ignores because they do
    /// not constrain values: `description`, `title`, `format`, `default`, the merge strategies).
    const KNOWN: &[&str] = &[
        "type",
        "nullable",
        "required",
        "enum",
        "properties",
        "additionalProperties",
        "items",
        "minimum",
        "maximum",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "maxProperties",
        "description",
        "title",
        "format",
        "default",
        "x-kubernetes-validations",
        "x-kubernetes-list-type",
        "x-kubernetes-list-map-keys",
        "x-kubernetes-map-type",
        "x-kubernetes-preserve-unknown-fields",
    ];

    pub fn validate(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
        let s = schema.as_object().expect("schema node is an object");
        for k in s.keys() {
            if !KNOWN.contains(&k.as_str()) {
                errors.push(format!(
                    "{path}: schema keyword {k:?} is not supported by this validator"
                ));
            }
        }
        let here = if path.is_empty() { "<root>" } else { path };
        if value.is_null() {
            if s.get("nullable") != Some(&Value::Bool(true)) {
                errors.push(format!("{here}: must not be null"));
            }
            return;
        }
        if let Some(en) = s.get("enum").and_then(Value::as_array)
            && !en.contains(value)
        {
            errors.push(format!(
                "{here}: {value} is not one of {}",
                Value::Array(en.clone())
            ));
        }
        let ty = s.get("type").and_then(Value::as_str);
        match ty {
            Some("object") => {
                let Some(obj) = value.as_object() else {
                    errors.push(format!("{here}: expected an object, got {value}"));
                    return;
                };
                if let Some(req) = s.get("required").and_then(Value::as_array) {
                    for r in req.iter().filter_map(Value::as_str) {
                        if !obj.contains_key(r) {
                            errors.push(format!("{here}: required field {r:?} is missing"));
                        }
                    }
                }
                if let Some(max) = s.get("maxProperties").and_then(Value::as_u64)
                    && obj.len() as u64 > max
                {
                    errors.push(format!("{here}: more than {max} entries"));
                }
                let props = s.get("properties").and_then(Value::as_object);
                let additional = s.get("additionalProperties");
                let preserve =
                    s.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
                for (k, v) in obj {
                    let child = format!("{path}.{k}");
                    if let Some(p) = props.and_then(|p| p.get(k)) {
                        validate(p, v, &child, errors);
                    } else if let Some(a) = additional.filter(|a| a.is_object()) {
                        validate(a, v, &child, errors);
                    } else if additional == Some(&Value::Bool(true)) || preserve {
                        // kept as is
                    } else if path.is_empty()
                        && ["apiVersion", "kind", "metadata"].contains(&k.as_str())
                    {
                        // validated by the API server itself
                    } else {
                        errors.push(format!(
                            "{child}: unknown field (the API server would drop it)"
                        ));
                    }
                }
            }
            Some("array") => {
                let Some(arr) = value.as_array() else {
                    errors.push(format!("{here}: expected an array, got {value}"));
                    return;
                };
                if let Some(max) = s.get("maxItems").and_then(Value::as_u64)
                    && arr.len() as u64 > max
                {
                    errors.push(format!("{here}: more than {max} items"));
                }
                if let Some(min) = s.get("minItems").and_then(Value::as_u64)
                    && (arr.len() as u64) < min
                {
                    errors.push(format!("{here}: fewer than {min} items"));
                }
                if let Some(items) = s.get("items") {
                    for (i, v) in arr.iter().enumerate() {
                        validate(items, v, &format!("{path}[{i}]"), errors);
                    }
                }
            }
            Some("string") => {
                let Some(st) = value.as_str() else {
                    errors.push(format!("{here}: expected a string, got {value}"));
                    return;
                };
                let len = st.chars().count() as u64;
                if let Some(max) = s.get("maxLength").and_then(Value::as_u64)
                    && len > max
                {
                    errors.push(format!("{here}: longer than {max} characters"));
                }
                if let Some(min) = s.get("minLength").and_then(Value::as_u64)
                    && len < min
                {
                    errors.push(format!("{here}: shorter than {min} characters"));
                }
            }
            Some("integer") | Some("number") => {
                let Some(n) = value.as_f64() else {
                    errors.push(format!("{here}: expected a number, got {value}"));
                    return;
                };
                if ty == Some("integer") && !(value.is_i64() || value.is_u64()) {
                    errors.push(format!("{here}: expected an integer, got {value}"));
                }
                if let Some(min) = s.get("minimum").and_then(Value::as_f64)
                    && n < min
                {
                    errors.push(format!("{here}: {n} is below the minimum {min}"));
                }
                if let Some(max) = s.get("maximum").and_then(Value::as_f64)
                    && n > max
                {
                    errors.push(format!("{here}: {n} is above the maximum {max}"));
                }
            }
            Some("boolean") => {
                if !value.is_boolean() {
                    errors.push(format!("{here}: expected true or false, got {value}"));
                }
            }
            Some(other) => errors.push(format!("{here}: unsupported schema type {other:?}")),
            None => {
                if s.get("x-kubernetes-preserve-unknown-fields") != Some(&Value::Bool(true)) {
                    errors.push(format!("{here}: schema node has no type"));
                }
            }
        }
    }
}
