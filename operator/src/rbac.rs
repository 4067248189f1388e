//! What the operator may do on the API server: the one list that `config/rbac/cluster_role.yaml`
//! and `config/rbac/role.yaml` must say (a test compares them) and that every recorded API
//! exchange in the tests is checked against ([`Request::of`], [`allows`]), so a test fails as
//! soon as code calls an API the install does not grant, and a grant no code uses stands out.
//!
//! Least privilege, with the reason next to each rule. Two limits of RBAC shape it: `create`
//! cannot be limited by name (the API server may authorize it before the name is known), and a
//! ClusterRole cannot be limited by namespace, so writes go by name wherever the verb allows,
//! and Secrets and Leases are in a Role in the operator's namespace only.

/// Where a rule applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// The ClusterRole: every namespace and cluster-scoped objects.
    Cluster,
    /// The Role in the operator's own namespace.
    OperatorNamespace,
}

/// One RBAC rule.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub scope: Scope,
    pub group: &'static str,
    /// Resource, or `resource/subresource`.
    pub resources: &'static [&'static str],
    pub verbs: &'static [&'static str],
    /// Object names the rule is limited to; empty means any.
    pub names: &'static [&'static str],
    /// Server-side applies under this rule only ever change objects that already exist (the
    /// rollout's restart of a user's workload), so they are not granted `create` with it. An
    /// apply to a missing object is then refused by the API server (403), which is right: the
    /// operator must never create a user's workload. See [`allows`].
    pub apply_updates_only: bool,
}

const fn cluster(
    group: &'static str,
    resources: &'static [&'static str],
    verbs: &'static [&'static str],
) -> Rule {
    Rule {
        scope: Scope::Cluster,
        group,
        resources,
        verbs,
        names: &[],
        apply_updates_only: false,
    }
}

/// Every rule the operator needs, and nothing else.
pub const RULES: &[Rule] = &[
    // The Trellis kinds: watched everywhere (controllers, compiler, webhook); the one `default`
    // Mesh is also read directly (CA pass, issuer follower). Spec is never changed. `get` on
    // the other two is not called, but OLM's bundle validation requires it on every owned kind
    // an operator watches (operator/src/bundle/validate.rs).
    cluster(
        "trellis.dev",
        &["meshes", "trafficpolicies", "peerauthentications"],
        &["get", "list", "watch"],
    ),
    // Status only, by server-side apply (a PATCH) from the status writer.
    cluster(
        "trellis.dev",
        &[
            "meshes/status",
            "trafficpolicies/status",
            "peerauthentications/status",
        ],
        &["patch"],
    ),
    // The compiler's `trellis-proxy` and the CA's `trellis-trust-bundle` in every meshed
    // namespace: watched by label, created by server-side apply, rewritten and deleted by name
    // only, so no other ConfigMap can be changed.
    cluster("", &["configmaps"], &["list", "watch", "create"]),
    // The same, plus the observability addons' ConfigMaps (Prometheus's configuration,
    // Grafana's provisioning, and the dashboards, which mode Integrate puts in the namespace
    // the Mesh names, hence cluster scope).
    Rule {
        scope: Scope::Cluster,
        group: "",
        resources: &["configmaps"],
        verbs: &["patch", "delete"],
        names: &[
            "trellis-proxy",
            "trellis-trust-bundle",
            "trellis-prometheus",
            "trellis-grafana",
            "trellis-dashboards",
        ],
        apply_updates_only: false,
    },
    // What the compiler and the webhook read: namespaces (labels decide the mesh), Services and
    // EndpointSlices (outbound table), pods (identities, opted-in pods, proxy counts).
    cluster("", &["namespaces", "services", "pods"], &["list", "watch"]),
    cluster("discovery.k8s.io", &["endpointslices"], &["list", "watch"]),
    // Events on condition transitions (kube's Recorder: events.k8s.io, create then patch).
    cluster("events.k8s.io", &["events"], &["create", "patch"]),
    // The identity endpoint proves each sidecar's token.
    cluster("authentication.k8s.io", &["tokenreviews"], &["create"]),
    // The injection webhook's configuration: created by server-side apply, then watched,
    // converged and (without a Mesh) deleted, by name.
    cluster(
        "admissionregistration.k8s.io",
        &["mutatingwebhookconfigurations"],
        &["create"],
    ),
    Rule {
        scope: Scope::Cluster,
        group: "admissionregistration.k8s.io",
        resources: &["mutatingwebhookconfigurations"],
        verbs: &["list", "watch", "patch", "delete"],
        names: &["trellis-sidecar-injector"],
        apply_updates_only: false,
    },
    // The CA Secret (created, rotated, watched, read by every replica) and a `secretRef` left
    // in the operator's namespace. A `secretRef` elsewhere needs its own Role there (README).
    Rule {
        scope: Scope::OperatorNamespace,
        group: "",
        resources: &["secrets"],
        verbs: &["get", "list", "watch", "create", "patch"],
        names: &[],
        apply_updates_only: false,
    },
    // The rollout controller watches the workloads of meshed pods and restarts an out-of-date
    // one by server-side apply of its pod template's `kubectl.kubernetes.io/restartedAt` (and,
    // on a rollback, the `trellis.dev/proxy-image` pin). It never creates or deletes one, so
    // its applies are not granted `create` (`apply_updates_only`).
    Rule {
        scope: Scope::Cluster,
        group: "apps",
        resources: &["deployments", "statefulsets", "daemonsets"],
        verbs: &["get", "list", "watch", "patch"],
        names: &[],
        apply_updates_only: true,
    },
    // The rollout's health gate reads the new pods' sidecar metrics (admin port 15020,
    // `/metrics`, public and read-only) through the API server's pod proxy.
    cluster("", &["pods/proxy"], &["get"]),
    // Observability addons, mode Install (operator/src/addons): Prometheus, Grafana and Jaeger
    // in the operator's namespace only. Created by server-side apply (create cannot be limited
    // by name); changed and deleted by name only. Deployments are read and patched under the
    // rollout's cluster rule above; Services are listed and watched under the compiler's.
    Rule {
        scope: Scope::OperatorNamespace,
        group: "apps",
        resources: &["deployments"],
        verbs: &["create"],
        names: &[],
        apply_updates_only: false,
    },
    Rule {
        scope: Scope::OperatorNamespace,
        group: "apps",
        resources: &["deployments"],
        verbs: &["delete"],
        names: &["trellis-prometheus", "trellis-grafana", "trellis-jaeger"],
        apply_updates_only: false,
    },
    Rule {
        scope: Scope::OperatorNamespace,
        group: "",
        resources: &["services"],
        verbs: &["create"],
        names: &[],
        apply_updates_only: false,
    },
    Rule {
        scope: Scope::OperatorNamespace,
        group: "",
        resources: &["services"],
        verbs: &["patch", "delete"],
        names: &["trellis-prometheus", "trellis-grafana", "trellis-jaeger"],
        apply_updates_only: false,
    },
    Rule {
        scope: Scope::OperatorNamespace,
        group: "",
        resources: &["serviceaccounts"],
        verbs: &["list", "watch", "create"],
        names: &[],
        apply_updates_only: false,
    },
    Rule {
        scope: Scope::OperatorNamespace,
        group: "",
        resources: &["serviceaccounts"],
        verbs: &["patch", "delete"],
        names: &["trellis-prometheus"],
        apply_updates_only: false,
    },
    // Who may reach each addon (Prometheus: Grafana only; Jaeger: OTLP only; Grafana: nobody
    // but `kubectl port-forward`).
    Rule {
        scope: Scope::OperatorNamespace,
        group: "networking.k8s.io",
        resources: &["networkpolicies"],
        verbs: &["list", "watch", "create"],
        names: &[],
        apply_updates_only: false,
    },
    Rule {
        scope: Scope::OperatorNamespace,
        group: "networking.k8s.io",
        resources: &["networkpolicies"],
        verbs: &["patch", "delete"],
        names: &["trellis-prometheus", "trellis-grafana", "trellis-jaeger"],
        apply_updates_only: false,
    },
    // The installed Prometheus discovers pods cluster-wide: its ClusterRole and binding,
    // listed by label and changed by name. RBAC lets only a holder of a role's permissions
    // create or bind it, which is why the operator may `get` pods (below) too.
    cluster(
        "rbac.authorization.k8s.io",
        &["clusterroles", "clusterrolebindings"],
        &["list", "watch", "create"],
    ),
    Rule {
        scope: Scope::Cluster,
        group: "rbac.authorization.k8s.io",
        resources: &["clusterroles", "clusterrolebindings"],
        verbs: &["patch", "delete"],
        names: &["trellis-prometheus"],
        apply_updates_only: false,
    },
    // Not called by the operator: held because the Prometheus ClusterRole grants it (no
    // escalation), beside the `list`/`watch` on pods above.
    cluster("", &["pods"], &["get"]),
    // Mode Integrate: the PodMonitor, ServiceMonitor and PrometheusRule for the cluster's
    // Prometheus Operator, in the operator's namespace, changed by name.
    Rule {
        scope: Scope::OperatorNamespace,
        group: "monitoring.coreos.com",
        resources: &["podmonitors", "servicemonitors", "prometheusrules"],
        verbs: &["list", "create"],
        names: &[],
        apply_updates_only: false,
    },
    Rule {
        scope: Scope::OperatorNamespace,
        group: "monitoring.coreos.com",
        resources: &["podmonitors", "servicemonitors", "prometheusrules"],
        verbs: &["patch", "delete"],
        names: &["trellis-proxies", "trellis-operator", "trellis"],
        apply_updates_only: false,
    },
    // Leader election: one Lease, created on first start, renewed by patch. Propagation
    // reports: one Lease per replica (up to 32 when its report is sharded), applied by it and deleted when it stops; the leader
    // lists them (by label) and deletes those of replicas long gone.
    Rule {
        scope: Scope::OperatorNamespace,
        group: "coordination.k8s.io",
        resources: &["leases"],
        verbs: &["get", "list", "create", "patch", "delete"],
        names: &[],
        apply_updates_only: false,
    },
];

/// The RBAC attributes of one API request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub verb: &'static str,
    pub group: String,
    /// Resource, or `resource/subresource`.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// A server-side apply, which creates the object when it does not exist: it needs
    /// `create` as well as `patch`.
    pub apply: bool,
}

impl Request {
    /// Reads the attributes from a method and a path with query, as the API server does:
    /// `GET` is `get` with a name, else `list` (or `watch` with `watch=true`); a
    /// `metadata.name` field selector names the object of a list or watch. `None` for paths
    /// that are not resource requests (discovery, `/version`).
    pub fn of(method: &str, path_and_query: &str) -> Option<Request> {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match parts.as_slice() {
            ["api", "v1", rest @ ..] => (String::new(), rest),
            ["apis", group, _version, rest @ ..] => (group.to_string(), rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, r, tail @ ..] => (Some(ns.to_string()), {
                let mut v = vec![*r];
                v.extend_from_slice(tail);
                v
            }),
            r => (None, r.to_vec()),
        };
        let (resource, name, sub) = match rest.as_slice() {
            [r] => (*r, None, None),
            [r, n] => (*r, Some(n.to_string()), None),
            [r, n, s] => (*r, Some(n.to_string()), Some(*s)),
            _ => return None,
        };
        let query: Vec<(&str, String)> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k, v.replace("%3D", "=").replace("%2F", "/")))
            .collect();
        let q = |key: &str| {
            query
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.clone())
        };
        let verb = match (method, name.is_some()) {
            ("GET", true) => "get",
            ("GET", false) if q("watch").as_deref() == Some("true") => "watch",
            ("GET", false) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", true) => "delete",
            ("DELETE", false) => "deletecollection",
            _ => return None,
        };
        let name = name.or_else(|| {
            q("fieldSelector").and_then(|f| f.strip_prefix("metadata.name=").map(str::to_string))
        });
        Some(Request {
            verb,
            group,
            resource: match sub {
                Some(s) => format!("{resource}/{s}"),
                None => resource.to_string(),
            },
            namespace,
            name,
            apply: method == "PATCH" && q("fieldManager").is_some(),
        })
    }
}

fn granted(rules: &[Rule], verb: &str, r: &Request, operator_namespace: &str) -> bool {
    rules.iter().any(|rule| {
        let in_scope = match rule.scope {
            Scope::Cluster => true,
            Scope::OperatorNamespace => r.namespace.as_deref() == Some(operator_namespace),
        };
        in_scope
            && rule.group == r.group
            && rule.resources.contains(&r.resource.as_str())
            && rule.verbs.contains(&verb)
            && (rule.names.is_empty()
                || (verb != "create" && r.name.as_deref().is_some_and(|n| rule.names.contains(&n))))
    })
}

/// Whether [`RULES`] let an operator running in `operator_namespace` make `r`. A server-side
/// apply must be allowed to create too (it creates a missing object), except on a subresource
/// (status), which it never creates, and under a rule marked
/// [`apply_updates_only`](Rule::apply_updates_only): objects the operator only changes and
/// never creates, where the API server refusing an apply to a missing one is the intent.
pub fn allows(r: &Request, operator_namespace: &str) -> bool {
    allows_under(RULES, r, operator_namespace)
}

fn allows_under(rules: &[Rule], r: &Request, operator_namespace: &str) -> bool {
    if !granted(rules, r.verb, r, operator_namespace) {
        return false;
    }
    let create_too = r.apply && !r.resource.contains('/');
    if !create_too {
        return true;
    }
    let updates_only: Vec<Rule> = rules
        .iter()
        .filter(|rule| rule.apply_updates_only)
        .copied()
        .collect();
    granted(&updates_only, r.verb, r, operator_namespace)
        || granted(rules, "create", r, operator_namespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_requests_as_the_api_server_does() {
        let r = Request::of(
            "GET",
            "/api/v1/configmaps?&labelSelector=trellis.dev%2Fcomponent%3Dtrust-bundle",
        )
        .unwrap();
        assert_eq!(
            (r.verb, r.resource.as_str(), r.namespace),
            ("list", "configmaps", None)
        );
        let r = Request::of(
            "GET",
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations?&watch=true&fieldSelector=metadata.name%3Dtrellis-sidecar-injector",
        )
        .unwrap();
        assert_eq!(r.verb, "watch");
        assert_eq!(r.name.as_deref(), Some("trellis-sidecar-injector"));
        assert!(allows(&r, "trellis-system"));
        let r = Request::of(
            "PATCH",
            "/apis/trellis.dev/v1alpha1/meshes/default/status?&force=true&fieldManager=trellis-operator",
        )
        .unwrap();
        assert_eq!((r.resource.as_str(), r.apply), ("meshes/status", true));
        assert!(allows(&r, "trellis-system"));
        assert!(Request::of("GET", "/version").is_none());
    }

    #[test]
    fn writes_are_limited_to_what_the_operator_owns() {
        let allowed = |m: &str, p: &str| allows(&Request::of(m, p).unwrap(), "mesh-ops");
        assert!(allowed(
            "PATCH",
            "/api/v1/namespaces/shop/configmaps/trellis-proxy?&force=true&fieldManager=trellis-operator"
        ));
        assert!(!allowed(
            "PATCH",
            "/api/v1/namespaces/shop/configmaps/app-settings?&force=true&fieldManager=trellis-operator"
        ));
        assert!(!allowed(
            "DELETE",
            "/api/v1/namespaces/shop/configmaps/app-settings"
        ));
        assert!(allowed(
            "GET",
            "/api/v1/namespaces/mesh-ops/secrets/trellis-ca"
        ));
        assert!(!allowed(
            "GET",
            "/api/v1/namespaces/shop/secrets/db-password"
        ));
        assert!(!allowed(
            "DELETE",
            "/apis/apps/v1/namespaces/shop/deployments/web"
        ));
        assert!(!allowed(
            "POST",
            "/apis/apps/v1/namespaces/shop/deployments"
        ));
        assert!(!allowed(
            "DELETE",
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/other"
        ));
    }

    #[test]
    fn the_rollout_restarts_workloads_by_apply_without_create() {
        let restart = |kind: &str| {
            Request::of(
                "PATCH",
                &format!(
                    "/apis/apps/v1/namespaces/shop/{kind}/web?&force=true&fieldManager=trellis-operator%2Frollout"
                ),
            )
            .unwrap()
        };
        for kind in ["deployments", "statefulsets", "daemonsets"] {
            let r = restart(kind);
            assert!(r.apply);
            assert!(allows(&r, "mesh-ops"), "{kind}");
            // Not because `create` was granted: the install must not let the operator create
            // a user's workload.
            assert!(!granted(RULES, "create", &r, "mesh-ops"), "{kind}");
        }
        assert!(!allows(&restart("replicasets"), "mesh-ops"));

        // The marker is what exempts the apply: the same rule without it would need `create`,
        // and configmaps (applied, and created) still need it.
        let unmarked: Vec<Rule> = RULES
            .iter()
            .map(|rule| Rule {
                apply_updates_only: false,
                ..*rule
            })
            .collect();
        assert!(!allows_under(
            &unmarked,
            &restart("deployments"),
            "mesh-ops"
        ));
        let no_configmap_create: Vec<Rule> = RULES
            .iter()
            .filter(|rule| {
                !(rule.resources.contains(&"configmaps") && rule.verbs.contains(&"create"))
            })
            .copied()
            .collect();
        let cm = Request::of(
            "PATCH",
            "/api/v1/namespaces/shop/configmaps/trellis-proxy?&force=true&fieldManager=trellis-operator",
        )
        .unwrap();
        assert!(allows_under(RULES, &cm, "mesh-ops"));
        assert!(!allows_under(&no_configmap_create, &cm, "mesh-ops"));

        let scrape = Request {
            verb: "get",
            group: String::new(),
            resource: "pods/proxy".into(),
            namespace: Some("shop".into()),
            name: Some("web-1:15020".into()),
            apply: false,
        };
        assert!(allows(&scrape, "mesh-ops"));
    }
}
