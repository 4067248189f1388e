//! Data-plane checks (`trellis check --proxy`): per meshed namespace, are the pods meshed, do
//! their proxies run the Mesh's version, hold a valid certificate and serve the ConfigMap's
//! config? Proxies are read through the API server's pod proxy to the admin port's public
//! `/metrics` (`trellis_proxy_config_info`, `trellis_proxy_cert_expiry_timestamp_seconds`).

use super::installed::Answer;
use super::{Check, human_remaining};
use crate::dev::metrics::{Sample, parse};

/// A pod of a meshed namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    /// It has the `trellis-proxy` container.
    pub has_proxy: bool,
    /// `Running` (only running pods' proxies are read).
    pub running: bool,
    /// The `trellis.dev/proxy-version` annotation (the image the injector used).
    pub proxy_version: Option<String>,
    /// `GET :15020/metrics` through the pod proxy, for running pods with a proxy.
    pub metrics: Option<Result<Answer, String>>,
}

/// A namespace the Mesh selects for injection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceView {
    pub name: String,
    /// The revision of its `trellis-proxy` ConfigMap's `config.json`; `Ok(None)` when there is
    /// no ConfigMap.
    pub config_revision: Result<Option<String>, String>,
    pub pods: Result<Vec<PodView>, String>,
}

/// What the data-plane checks read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// The Mesh's `spec.proxy.image`: the version every proxy should run.
    pub desired_version: String,
    /// The Mesh's workload certificate lifetime, seconds; proxies renew at 70 % of it.
    pub cert_ttl_secs: i64,
    pub namespaces: Result<Vec<NamespaceView>, String>,
}

/// What one proxy's `/metrics` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyState {
    pub revision: Option<String>,
    /// Unix seconds; `None` before the first certificate.
    pub cert_not_after: Option<i64>,
}

/// Reads the config revision and certificate expiry out of a proxy's `/metrics`.
pub fn proxy_state(text: &str) -> Result<ProxyState, String> {
    let samples = parse(text).map_err(|e| e.to_string())?;
    let find = |name: &str| samples.iter().find(|s: &&Sample| s.name == name);
    Ok(ProxyState {
        revision: find("trellis_proxy_config_info")
            .filter(|s| s.value == 1.0)
            .and_then(|s| s.label("revision"))
            .map(str::to_owned),
        cert_not_after: find("trellis_proxy_cert_expiry_timestamp_seconds")
            .filter(|s| s.value > 0.0)
            .map(|s| s.value as i64),
    })
}

fn check_pods_meshed(ns: &str, pods: &[PodView]) -> Check {
    let name = "pods have sidecars";
    let without: Vec<&str> = pods
        .iter()
        .filter(|p| !p.has_proxy)
        .map(|p| p.name.as_str())
        .collect();
    let with = pods.len() - without.len();
    if without.is_empty() {
        Check::pass(name, format!("{with}/{} pods", pods.len()))
    } else {
        Check::fail(
            name,
            format!(
                "{with}/{} pods; without: {}",
                pods.len(),
                without.join(", ")
            ),
            format!(
                "pods created before the namespace was meshed (or while the webhook was down) need a restart: `kubectl -n {ns} rollout restart deploy/NAME`"
            ),
        )
    }
}

fn check_versions(ns: &str, pods: &[PodView], desired: &str) -> Check {
    let name = "proxy versions";
    let stale: Vec<String> = pods
        .iter()
        .filter(|p| p.has_proxy && p.proxy_version.as_deref() != Some(desired))
        .map(|p| {
            format!(
                "{} ({})",
                p.name,
                p.proxy_version
                    .as_deref()
                    .unwrap_or("no version annotation")
            )
        })
        .collect();
    let meshed = pods.iter().filter(|p| p.has_proxy).count();
    if stale.is_empty() {
        Check::pass(name, format!("{meshed} proxies run {desired}"))
    } else {
        Check::fail(
            name,
            format!(
                "{} of {meshed} not at {desired}: {}",
                stale.len(),
                stale.join(", ")
            ),
            format!(
                "the rollout restarts them unless paused or `trellis.dev/rollout: manual`; else `kubectl -n {ns} rollout restart deploy/NAME`"
            ),
        )
    }
}

fn check_proxies(
    ns: &str,
    pods: &[PodView],
    config_revision: &Result<Option<String>, String>,
    ttl: i64,
    now: i64,
) -> Vec<Check> {
    let mut out = Vec::new();
    let want = match config_revision {
        Err(e) => {
            out.push(Check::fail(
                "config revision",
                format!("cannot read ConfigMap {ns}/trellis-proxy: {e}"),
                format!("you need get on configmaps in {ns}"),
            ));
            None
        }
        Ok(None) => {
            out.push(Check::fail(
                "config revision",
                format!("no ConfigMap {ns}/trellis-proxy"),
                "the operator writes it for every meshed namespace: see the Mesh's Degraded condition and the operator's logs",
            ));
            None
        }
        Ok(Some(r)) => Some(r.as_str()),
    };
    for p in pods.iter().filter(|p| p.has_proxy) {
        let Some(scrape) = &p.metrics else {
            out.push(Check::warn(
                format!("proxy {}", p.name),
                "pod not running, not checked",
                format!("`kubectl -n {ns} describe pod {}`", p.name),
            ));
            continue;
        };
        let state = match scrape {
            Err(e) => Err(e.clone()),
            Ok(a) => match a.api_server_error() {
                Some(m) => Err(m),
                None if a.status != 200 => Err(format!("HTTP {}", a.status)),
                None => proxy_state(&a.body),
            },
        };
        let state = match state {
            Ok(s) => s,
            Err(e) => {
                out.push(Check::fail(
                    format!("proxy {}", p.name),
                    format!("its admin port :15020/metrics did not answer: {e}"),
                    format!("you need get on pods/proxy in {ns}; `kubectl -n {ns} logs {} -c trellis-proxy`", p.name),
                ));
                continue;
            }
        };
        out.push(check_cert(ns, &p.name, state.cert_not_after, ttl, now));
        if let Some(want) = want {
            out.push(check_revision(ns, &p.name, state.revision.as_deref(), want));
        }
    }
    out
}

fn check_cert(ns: &str, pod: &str, not_after: Option<i64>, ttl: i64, now: i64) -> Check {
    let name = format!("proxy {pod} certificate");
    let logs = format!(
        "see `kubectl -n {ns} logs {pod} -c trellis-proxy` and the identity endpoint check"
    );
    match not_after {
        None => Check::fail(name, "no certificate yet", logs),
        Some(t) if t <= now => Check::fail(
            name,
            format!("expired {} ago", human_remaining(now - t)),
            format!("its renewal failed; {logs}"),
        ),
        // Renewal starts at 70 % of the lifetime: under 20 % left means it is overdue.
        Some(t) if (t - now) * 5 < ttl => Check::warn(
            name,
            format!("expires in {}, renewal overdue", human_remaining(t - now)),
            logs,
        ),
        Some(t) => Check::pass(name, format!("expires in {}", human_remaining(t - now))),
    }
}

fn check_revision(ns: &str, pod: &str, got: Option<&str>, want: &str) -> Check {
    let name = format!("proxy {pod} config");
    match got {
        Some(r) if r == want => Check::pass(name, format!("revision {r}, as the ConfigMap")),
        other => Check::fail(
            name,
            format!(
                "serves revision {}, the ConfigMap has {want}",
                other.unwrap_or("(none)")
            ),
            format!(
                "kubelet syncs ConfigMaps in about a minute; if it stays, the proxy refused the config: `kubectl -n {ns} logs {pod} -c trellis-proxy` (trellis_proxy_config_stale is 1)"
            ),
        ),
    }
}

/// The data-plane checks: one section per meshed namespace. `now` is Unix seconds.
pub fn sections(o: &Observed, now: i64) -> Vec<(String, Vec<Check>)> {
    let namespaces = match &o.namespaces {
        Err(e) => {
            return vec![(
                "Data plane".into(),
                vec![Check::fail(
                    "meshed namespaces",
                    format!("cannot list namespaces: {e}"),
                    "you need list on namespaces",
                )],
            )];
        }
        Ok(n) if n.is_empty() => {
            return vec![(
                "Data plane".into(),
                vec![Check::warn(
                    "meshed namespaces",
                    "none",
                    "mesh one: `kubectl label namespace NAME trellis.dev/inject=enabled`",
                )],
            )];
        }
        Ok(n) => n,
    };
    namespaces
        .iter()
        .map(|ns| {
            let title = format!("Data plane: namespace {}", ns.name);
            let checks = match &ns.pods {
                Err(e) => vec![Check::fail(
                    "pods",
                    format!("cannot list pods: {e}"),
                    format!("you need list on pods in {}", ns.name),
                )],
                Ok(pods) => {
                    let mut c = vec![
                        check_pods_meshed(&ns.name, pods),
                        check_versions(&ns.name, pods, &o.desired_version),
                    ];
                    c.extend(check_proxies(
                        &ns.name,
                        pods,
                        &ns.config_revision,
                        o.cert_ttl_secs,
                        now,
                    ));
                    c
                }
            };
            (title, checks)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_revision_and_expiry_from_a_proxys_metrics() {
        let m = trellis_proxy::metrics::Metrics::new();
        assert_eq!(
            proxy_state(&m.encode()).unwrap(),
            ProxyState {
                revision: None,
                cert_not_after: None
            }
        );
        m.set_config_revision("abc123");
        m.cert_expiry.set(1_900_000_000);
        assert_eq!(
            proxy_state(&m.encode()).unwrap(),
            ProxyState {
                revision: Some("abc123".into()),
                cert_not_after: Some(1_900_000_000)
            }
        );
    }
}
