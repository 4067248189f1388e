//! The API layer of `trellis check`: reads, in a fixed order, what the pure checks look at.
//! It only reads (and asks SelfSubjectAccessReviews, which change nothing).

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};

use super::installed::{Answer, DeploymentView, LeaseView};
use super::preinstall::{CrdView, ExpectedCrd, Permission, ServerVersion, WebhookConfigView};
use super::{Report, dataplane, installed, preinstall};
use crate::api::{MESH_NAME, Mesh, MeshSpec};
use crate::inject::{ADMIN_PORT, PROXY_CONTAINER};

/// Name of the operator's Deployment, Service and Lease in the default install.
pub const OPERATOR: &str = "trellis-operator";

/// What to check.
#[derive(Clone, Debug)]
pub struct Scope {
    /// The operator's namespace.
    pub namespace: String,
    /// Pre-install checks instead of the control-plane checks.
    pub pre: bool,
    /// Also the data plane.
    pub proxy: bool,
    /// With `proxy`: a proxy behind the operator for longer than this (seconds) fails.
    pub lag_threshold_secs: i64,
}

/// Reads the operator replicas' propagation reports (their Leases, by label).
pub async fn propagation(client: &Client, namespace: &str) -> super::propagation::Observed {
    use crate::propagation::{REPORT_ANNOTATION, REPORT_LABEL, REPORT_LABEL_VALUE};
    let api = Api::<Lease>::namespaced(client.clone(), namespace);
    let reports = api
        .list(&ListParams::default().labels(&format!("{REPORT_LABEL}={REPORT_LABEL_VALUE}")))
        .await
        .map_err(describe)
        .map(|list| {
            let leases = list
                .items
                .into_iter()
                .filter_map(|l| {
                    let at = l
                        .spec
                        .as_ref()
                        .and_then(|s| s.renew_time.as_ref())
                        .map(|t| t.0.as_second());
                    let annotation = l.metadata.annotations.as_ref()?.get(REPORT_ANNOTATION)?;
                    // A report this build cannot read is skipped (a newer operator's, or
                    // corrupt); either format of this one is read, shards joined below.
                    let r = crate::propagation::encode::decode(annotation).ok()?;
                    Some((at, l.metadata.name.unwrap_or_default(), r))
                })
                .collect();
            crate::propagation::encode::merge(leases)
                .into_iter()
                .map(|(at, _, r)| (at, r))
                .collect()
        });
    super::propagation::Observed {
        namespace: namespace.to_string(),
        reports,
    }
}

/// A failed read as the user should see it: the API server's message when there is one.
fn describe(e: kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.reason),
        other => other.to_string(),
    }
}

async fn get_opt<K>(api: Api<K>, name: &str) -> Result<Option<K>, String>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name).await.map_err(describe)
}

/// `GET path` through the API server, whatever the status (service and pod proxies answer
/// with the backend's status).
pub async fn raw_get(client: &Client, path: &str) -> Result<Answer, String> {
    let req = http::Request::get(path)
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    let resp = client
        .send(req.map(kube::client::Body::from))
        .await
        .map_err(describe)?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect_bytes()
        .await
        .map_err(|e| e.to_string())?;
    Ok(Answer {
        status,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

async fn version(client: &Client) -> Result<ServerVersion, String> {
    let v = client.apiserver_version().await.map_err(describe)?;
    Ok(ServerVersion {
        major: v.major,
        minor: v.minor,
        git_version: v.git_version,
    })
}

async fn allowed(client: &Client, p: &Permission) -> Result<bool, String> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(p.verb.into()),
                group: Some(p.group.into()),
                resource: Some(p.resource.into()),
                namespace: p.namespace.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(describe)?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

fn crd_view(c: CustomResourceDefinition, version: &str) -> CrdView {
    CrdView {
        group: c.spec.group.clone(),
        kind: c.spec.names.kind.clone(),
        versions: c
            .spec
            .versions
            .iter()
            .map(|v| (v.name.clone(), v.served, v.storage))
            .collect(),
        schema: c
            .spec
            .versions
            .iter()
            .find(|v| v.name == version)
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| serde_json::to_value(s).ok()),
    }
}

async fn crds(client: &Client) -> Vec<(ExpectedCrd, Result<Option<CrdView>, String>)> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let mut out = Vec::new();
    for want in preinstall::expected_crds() {
        let got = get_opt(api.clone(), &want.name)
            .await
            .map(|c| c.map(|c| crd_view(c, &want.version)));
        out.push((want, got));
    }
    out
}

/// Reads what the pre-install checks need; stops after the version when the API server does
/// not answer.
pub async fn preinstall(client: &Client, namespace: &str) -> preinstall::Observed {
    let version = version(client).await;
    if !preinstall::version_ok(&version) {
        return preinstall::Observed {
            version,
            access: Vec::new(),
            crds: Vec::new(),
            webhooks: Ok(Vec::new()),
        };
    }
    let mut access = Vec::new();
    for p in preinstall::install_permissions(namespace) {
        let a = allowed(client, &p).await;
        access.push((p, a));
    }
    let crds = crds(client).await;
    let webhooks = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(describe)
        .map(|l| {
            l.items
                .into_iter()
                .map(|c| WebhookConfigView {
                    name: c.name_any(),
                    webhooks: c
                        .webhooks
                        .unwrap_or_default()
                        .into_iter()
                        .map(|w| w.name)
                        .collect(),
                })
                .collect()
        });
    preinstall::Observed {
        version,
        access,
        crds,
        webhooks,
    }
}

/// Reads what the control-plane checks need.
pub async fn installed(client: &Client, ns: &str) -> installed::Observed {
    let crds = crds(client).await;
    let deployment = get_opt(Api::<Deployment>::namespaced(client.clone(), ns), OPERATOR)
        .await
        .map(|d| {
            d.map(|d| {
                let status = d.status.unwrap_or_default();
                DeploymentView {
                    desired: d.spec.replicas.unwrap_or(1),
                    available: status.available_replicas.unwrap_or(0),
                    available_condition: status
                        .conditions
                        .unwrap_or_default()
                        .into_iter()
                        .find(|c| c.type_.as_deref() == Some("Available"))
                        .map(|c| (c.status.unwrap_or_default(), c.message.unwrap_or_default())),
                }
            })
        });
    let lease = get_opt(Api::<Lease>::namespaced(client.clone(), ns), OPERATOR)
        .await
        .map(|l| {
            l.map(|l| {
                let spec = l.spec.unwrap_or_default();
                LeaseView {
                    holder: spec.holder_identity,
                    renewed_at: spec.renew_time.map(|t| t.0.as_second()),
                    duration_secs: spec.lease_duration_seconds,
                }
            })
        });
    let mesh = get_opt(Api::<Mesh>::all(client.clone()), MESH_NAME).await;
    let webhook_bundles = get_opt(
        Api::<MutatingWebhookConfiguration>::all(client.clone()),
        crate::inject::webhook_config::NAME,
    )
    .await
    .map(|c| {
        c.map(|c| {
            c.webhooks
                .unwrap_or_default()
                .into_iter()
                .map(|w| {
                    w.client_config
                        .ca_bundle
                        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                        .unwrap_or_default()
                })
                .collect()
        })
    });
    let service = |port: i32, path: &str| {
        format!("/api/v1/namespaces/{ns}/services/https:{OPERATOR}:{port}/proxy{path}")
    };
    let webhook_answer = raw_get(
        client,
        &service(
            crate::inject::webhook_config::SERVICE_PORT,
            crate::inject::webhook_config::PATH,
        ),
    )
    .await;
    let identity_answer = raw_get(
        client,
        &service(
            i32::from(crate::identity::server::IDENTITY_PORT),
            crate::identity::CERTIFICATE_PATH,
        ),
    )
    .await;
    installed::Observed {
        operator_namespace: ns.to_string(),
        crds,
        deployment,
        lease,
        mesh,
        webhook_bundles,
        webhook_answer,
        identity_answer,
    }
}

fn has_proxy(p: &Pod) -> bool {
    p.spec.as_ref().is_some_and(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .any(|c| c.name == PROXY_CONTAINER)
    })
}

/// Reads what the data-plane checks need: the namespaces the Mesh selects (by its namespace
/// selector, less the excluded ones), their ConfigMap and pods, and each running proxy's
/// `/metrics`.
/// The proxy image the Mesh's sidecars should run, as `trellis check` can know it: the
/// operator resolves an empty `spec.proxy.image` to its own `--proxy-image`, which this CLI
/// cannot see, and publishes the result as `status.rollout.desiredVersion`; before it has, the
/// image of this build stands in.
pub fn desired_image(mesh: &Mesh) -> String {
    let published = mesh
        .status
        .as_ref()
        .and_then(|s| s.rollout.as_deref())
        .map(|r| r.desired_version.as_str())
        .filter(|v| !v.is_empty());
    crate::api::mesh::resolve_proxy_image(
        mesh.spec.proxy.image.as_deref(),
        published.unwrap_or(crate::api::mesh::operator_proxy_image()),
    )
    .to_owned()
}

pub async fn dataplane(
    client: &Client,
    operator_ns: &str,
    mesh: &MeshSpec,
    desired_image: String,
) -> dataplane::Observed {
    let scope = crate::inject::scope::Scope::new(mesh, operator_ns);
    let selector = scope
        .namespace_match_labels()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    // The one meshed predicate (`inject::scope`), as the webhook and the compiler use it.
    let excluded = |n: &str| scope.namespace_excluded(n);
    let names = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(describe)
        .map(|l| {
            let mut v: Vec<String> = l
                .items
                .iter()
                .map(|n| n.name_any())
                .filter(|n| !excluded(n))
                .collect();
            v.sort();
            v
        });
    let namespaces = match names {
        Err(e) => Err(e),
        Ok(names) => {
            let mut out = Vec::new();
            for ns in names {
                out.push(namespace(client, &ns).await);
            }
            Ok(out)
        }
    };
    dataplane::Observed {
        desired_version: desired_image,
        cert_ttl_secs: crate::duration::parse(&mesh.workload_cert_ttl)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(24 * 3600),
        namespaces,
    }
}

async fn namespace(client: &Client, ns: &str) -> dataplane::NamespaceView {
    let config_revision = get_opt(
        Api::<ConfigMap>::namespaced(client.clone(), ns),
        crate::compiler::CONFIGMAP_NAME,
    )
    .await
    .map(|cm| {
        cm.map(|cm| {
            cm.data
                .unwrap_or_default()
                .get(crate::compiler::CONFIG_KEY)
                .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
                .and_then(|v| v["revision"].as_str().map(str::to_owned))
                .unwrap_or_default()
        })
    });
    let pods = match Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
    {
        Err(e) => Err(describe(e)),
        Ok(list) => {
            let mut pods = Vec::new();
            let mut items = list.items;
            items.sort_by_key(|p| p.name_any());
            for p in items {
                let name = p.name_any();
                let proxy = has_proxy(&p);
                let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                let metrics = if proxy && running {
                    let path =
                        format!("/api/v1/namespaces/{ns}/pods/{name}:{ADMIN_PORT}/proxy/metrics");
                    Some(raw_get(client, &path).await)
                } else {
                    None
                };
                pods.push(dataplane::PodView {
                    proxy_version: p
                        .annotations()
                        .get(crate::inject::ANNOTATION_PROXY_VERSION)
                        .cloned(),
                    name,
                    has_proxy: proxy,
                    running,
                    metrics,
                });
            }
            Ok(pods)
        }
    };
    dataplane::NamespaceView {
        name: ns.to_string(),
        config_revision,
        pods,
    }
}

/// Runs the checks `scope` asks for. `now` is Unix seconds.
pub async fn run(client: &Client, scope: &Scope, now: i64) -> Report {
    let mut report = Report::default();
    if scope.pre {
        let o = preinstall(client, &scope.namespace).await;
        report.push("Pre-install", preinstall::checks(&o));
        return report;
    }
    let v = version(client).await;
    let reachable = v.is_ok();
    report.push("Kubernetes API", vec![preinstall::check_version(&v)]);
    if !reachable {
        return report;
    }
    let o = installed(client, &scope.namespace).await;
    report.push("Control plane", installed::checks(&o, now));
    if scope.proxy {
        let (spec, desired) = match &o.mesh {
            Ok(Some(m)) => (m.spec.clone(), desired_image(m)),
            _ => (
                MeshSpec::default(),
                crate::api::mesh::operator_proxy_image().to_owned(),
            ),
        };
        let d = dataplane(client, &scope.namespace, &spec, desired).await;
        for (title, checks) in dataplane::sections(&d, now) {
            report.push(title, checks);
        }
        let p = propagation(client, &scope.namespace).await;
        report.push(
            "Propagation",
            super::propagation::checks(&p, now, scope.lag_threshold_secs),
        );
    }
    report
}
