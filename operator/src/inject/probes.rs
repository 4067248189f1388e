//! The kubelet-probe rewrite: the app's network probes go to the proxy's admin port, and the
//! proxy performs the originals against the app (`trellis_proxy::probe`).
//!
//! Why: the kubelet probes in plaintext from the node. Under `Strict` mTLS the inbound proxy
//! refuses that, and excluding probed ports from redirection (what Trellis did before) takes the
//! serving port of almost every HTTP workload out of the mesh. With the rewrite no port leaves
//! the mesh because it is probed, and the only plaintext that reaches the app is the proxy's own
//! probe, which the kubelet can only trigger, never aim.
//!
//! What is rewritten: the `httpGet`, `tcpSocket` and `grpc` liveness, readiness and startup
//! probes of the app containers and of native sidecars (init containers with
//! `restartPolicy: Always`; other init containers cannot have probes), named ports resolved
//! against the container's own ports. Only the action changes: it becomes
//! `httpGet :15020/app-health/<container>/<livez|readyz|startupz>`, and every timing field
//! (`initialDelaySeconds`, `periodSeconds`, `timeoutSeconds`, `successThreshold`,
//! `failureThreshold`, `terminationGracePeriodSeconds`) stays as written. The proxy gets the
//! original actions, ports resolved, in `TRELLIS_APP_PROBES`; the original actions as written
//! are kept in the [`ANNOTATION_ORIGINAL_PROBES`] annotation, from which `trellis uninject`
//! restores them exactly.
//!
//! What is left alone, and why:
//! - `exec` probes: they run inside the container and never cross the network.
//! - probes with `host:` set (`httpGet.host`, `tcpSocket.host`): the kubelet sends them to that
//!   host, not to this pod, so the pod's redirection never sees them; and rewriting them would
//!   make the proxy probe some other host on the kubelet's behalf, which is not its job. They keep
//!   working exactly as before.
//! - probes whose port cannot be resolved (a named port the container does not declare, or a
//!   number outside 1..=65535): the kubelet fails them either way; the decision carries a
//!   warning naming the container and probe, so the mistake is visible at admission.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, PodSpec, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};
use trellis_proxy::probe::{
    AppProbe, GrpcProbe, HttpGetProbe, ProbeHeader, ProbeKind, Scheme, TcpProbe, probe_path,
};

use super::{ADMIN_PORT, InjectError, to_value};

/// The original probe actions as written, `{"<container>": {"<probe field>": {<action>}}}`,
/// on injected pods that had probes rewritten; `trellis uninject` restores them from it.
pub const ANNOTATION_ORIGINAL_PROBES: &str = "trellis.dev/original-probes";
/// Env var carrying the probes to the proxy (see `trellis_proxy::probe`).
pub const ENV_APP_PROBES: &str = trellis_proxy::probe::ENV_APP_PROBES;

/// The pod fields of the three probes, with the probe's kind.
const PROBES: [(&str, ProbeKind); 3] = [
    ("livenessProbe", ProbeKind::Liveness),
    ("readinessProbe", ProbeKind::Readiness),
    ("startupProbe", ProbeKind::Startup),
];

/// What the rewrite adds to the injection.
#[derive(Debug, Default)]
pub struct Rewrite {
    /// JSON Patch operations on the pod's containers, against the pod as it came in (apply them
    /// before anything is inserted into `initContainers`).
    pub ops: Vec<Value>,
    /// `TRELLIS_APP_PROBES` for the proxy, by path.
    pub app_probes: BTreeMap<String, AppProbe>,
    /// The [`ANNOTATION_ORIGINAL_PROBES`] content.
    pub originals: BTreeMap<String, BTreeMap<String, Value>>,
    pub warnings: Vec<String>,
}

impl Rewrite {
    pub fn is_empty(&self) -> bool {
        self.app_probes.is_empty()
    }
}

/// Plans the rewrite of every eligible probe of the pod (see the module docs).
pub fn rewrite(spec: &PodSpec) -> Result<Rewrite, InjectError> {
    let mut out = Rewrite::default();
    for (i, c) in spec.containers.iter().enumerate() {
        rewrite_container(&format!("/spec/containers/{i}"), c, &mut out)?;
    }
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        if c.restart_policy.as_deref() == Some("Always") {
            rewrite_container(&format!("/spec/initContainers/{i}"), c, &mut out)?;
        }
    }
    Ok(out)
}

fn probe_of(c: &Container, kind: ProbeKind) -> Option<&Probe> {
    match kind {
        ProbeKind::Liveness => c.liveness_probe.as_ref(),
        ProbeKind::Readiness => c.readiness_probe.as_ref(),
        ProbeKind::Startup => c.startup_probe.as_ref(),
    }
}

/// A probe's port as the kubelet resolves it: a number, or the name of one of the container's
/// own ports.
fn resolve(c: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok().filter(|n| *n != 0),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .filter(|n| *n != 0),
    }
}

/// The proxy's view of one probe action, with the original action as written; `Err` carries
/// why it is left alone (for a warning), `Ok(None)` means nothing to do.
type Planned = Option<(AppProbe, &'static str, Value)>;

fn plan(c: &Container, probe: &Probe) -> Result<Planned, String> {
    let timeout_seconds = probe
        .timeout_seconds
        .and_then(|t| u32::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(1);
    let app = |http_get, tcp_socket, grpc| AppProbe {
        http_get,
        tcp_socket,
        grpc,
        timeout_seconds,
    };
    if let Some(h) = &probe.http_get {
        if h.host.is_some() {
            return Ok(None);
        }
        let port = resolve(c, &h.port).ok_or_else(|| format!("port {:?} not found", h.port))?;
        let scheme = match h.scheme.as_deref() {
            None | Some("HTTP") => Scheme::Http,
            Some("HTTPS") => Scheme::Https,
            Some(other) => return Err(format!("scheme {other:?} is not HTTP or HTTPS")),
        };
        let path = match h.path.as_deref() {
            None | Some("") => "/".to_string(),
            Some(p) if p.starts_with('/') => p.to_string(),
            Some(p) => format!("/{p}"),
        };
        let http = HttpGetProbe {
            path,
            port,
            scheme,
            http_headers: h
                .http_headers
                .iter()
                .flatten()
                .map(|hd| ProbeHeader {
                    name: hd.name.clone(),
                    value: hd.value.clone(),
                })
                .collect(),
        };
        let original = serde_json::to_value(h).map_err(|e| e.to_string())?;
        return Ok(Some((app(Some(http), None, None), "httpGet", original)));
    }
    if let Some(t) = &probe.tcp_socket {
        if t.host.is_some() {
            return Ok(None);
        }
        let port = resolve(c, &t.port).ok_or_else(|| format!("port {:?} not found", t.port))?;
        let original = serde_json::to_value(t).map_err(|e| e.to_string())?;
        return Ok(Some((
            app(None, Some(TcpProbe { port }), None),
            "tcpSocket",
            original,
        )));
    }
    if let Some(g) = &probe.grpc {
        let port = u16::try_from(g.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {} is not a port", g.port))?;
        let grpc = GrpcProbe {
            port,
            service: g.service.clone().filter(|s| !s.is_empty()),
        };
        let original = serde_json::to_value(g).map_err(|e| e.to_string())?;
        return Ok(Some((app(None, None, Some(grpc)), "grpc", original)));
    }
    Ok(None)
}

fn rewrite_container(base: &str, c: &Container, out: &mut Rewrite) -> Result<(), InjectError> {
    for (field, kind) in PROBES {
        let Some(probe) = probe_of(c, kind) else {
            continue;
        };
        let (app, action, original) = match plan(c, probe) {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(why) => {
                out.warnings.push(format!(
                    "trellis: the {field} of container {} is not rewritten to the proxy ({why}); \
                     the kubelet will fail it",
                    c.name
                ));
                continue;
            }
        };
        let path = probe_path(&c.name, kind);
        let new = to_value(&HTTPGetAction {
            path: Some(path.clone()),
            port: IntOrString::Int(i32::from(ADMIN_PORT)),
            ..Default::default()
        })?;
        let at = format!("{base}/{field}");
        if action == "httpGet" {
            out.ops
                .push(json!({"op": "replace", "path": format!("{at}/httpGet"), "value": new}));
        } else {
            out.ops
                .push(json!({"op": "remove", "path": format!("{at}/{action}")}));
            out.ops
                .push(json!({"op": "add", "path": format!("{at}/httpGet"), "value": new}));
        }
        out.app_probes.insert(path, app);
        out.originals
            .entry(c.name.clone())
            .or_default()
            .insert(field.to_string(), json!({ action: original }));
    }
    Ok(())
}

/// Puts the original probe actions back into a pod (or pod template) given as JSON, from
/// [`ANNOTATION_ORIGINAL_PROBES`], and removes the annotation. A probe is only restored while it
/// still is the rewritten one (pointing at its `/app-health/...` path); an annotation that does
/// not parse is left in place, so nothing is lost. Returns whether anything changed.
pub fn restore(pod: &mut Value) -> bool {
    let Some(text) = pod
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(ANNOTATION_ORIGINAL_PROBES))
        .and_then(Value::as_str)
    else {
        return false;
    };
    let Ok(originals) = serde_json::from_str::<BTreeMap<String, BTreeMap<String, Value>>>(text)
    else {
        return false;
    };
    for list in ["containers", "initContainers"] {
        let Some(items) = pod
            .pointer_mut(&format!("/spec/{list}"))
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        for c in items {
            let Some(name) = c.get("name").and_then(Value::as_str).map(str::to_owned) else {
                continue;
            };
            let Some(fields) = originals.get(&name) else {
                continue;
            };
            for (field, kind) in PROBES {
                let (Some(original), Some(probe)) = (
                    fields.get(field).and_then(Value::as_object),
                    c.get_mut(field).and_then(Value::as_object_mut),
                ) else {
                    continue;
                };
                let rewritten = probe
                    .get("httpGet")
                    .and_then(|h| h.get("path"))
                    .and_then(Value::as_str)
                    == Some(probe_path(&name, kind).as_str());
                if rewritten && original.len() == 1 {
                    probe.remove("httpGet");
                    probe.extend(original.clone());
                }
            }
        }
    }
    if let Some(ann) = pod
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
    {
        ann.remove(ANNOTATION_ORIGINAL_PROBES);
    }
    true
}
