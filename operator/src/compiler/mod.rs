//! The control-plane compiler: a pure function from a [`Snapshot`] of observed objects to the
//! desired `trellis-proxy` ConfigMap of every meshed namespace and the status of every CR.
//!
//! Nothing here talks to the API server; `controller::compile` feeds it reflector stores and
//! applies the [`Output`]. Everything is sorted, so the same snapshot gives byte-identical
//! configs and unchanged namespaces cause no writes.
//!
//! # Decisions (documented here because they are policy, not accident)
//! - **Outbound visibility.** By default every namespace's table lists every Service of the
//!   cluster that has a TCP port (meshed or not): a meshed workload may call anything, and a
//!   Service whose pods have no sidecar is listed with empty `identities`, which tells the proxy
//!   to use plaintext. A TrafficPolicy therefore changes the table of every meshed namespace,
//!   unless `trellis.dev/export-to` / `trellis.dev/import-from` narrow who sees the Service
//!   (see [`visibility`]); then it changes exactly the namespaces that see it.
//! - **Bootstrap ConfigMaps** (Mesh `spec.discovery.configMap`). The table above grows with
//!   the cluster (past about 1 500 Services it no longer fits a ConfigMap), so with the
//!   discovery stream serving everything else a namespace's config may carry only its own
//!   Services and their split backends (`bootstrap_plan`), at a size the rest of the cluster
//!   does not change; adding a Service elsewhere then rewrites no such ConfigMap. The stream
//!   serves from the full table ([`compile_discovery`] never cuts it), and a TrafficPolicy's
//!   `Programmed` still counts every namespace that sees its Service, listed or streamed. The
//!   default, `Auto`, chooses per namespace (`carries_bootstrap`): the full table while it
//!   renders to at most [`AUTO_FULL_TABLE_MAX_BYTES`], so a small mesh keeps the resilience of
//!   a full table (a sidecar that cannot reach the operator can still call everything), else
//!   the bootstrap set, so no ConfigMap outgrows the bound issue #19 set. `Full` and
//!   `Bootstrap` force one or the other; [`Output::bootstrapped`] records the choice, and
//!   everything that depends on what a ConfigMap lists ([`Output::policies`], the reach of
//!   TrafficPolicies) follows it.
//! - **Inline endpoints.** By default ([`InlineEndpoints::SameNamespace`]) a namespace's config
//!   carries the endpoints of its own Services only; other Services are reached through their
//!   cluster IP (the design's fallback) and verified against the Service-level identities. With
//!   endpoints inlined everywhere, 10 000 endpoints make every config larger than a ConfigMap
//!   and every pod restart rewrites every namespace. [`InlineEndpoints::All`] exists for small
//!   meshes and local runs.
//! - **Who has an identity.** A pod counts as meshed when the injector marked it with
//!   `trellis.dev/proxy-version`; a pod without a sidecar cannot answer mTLS, so it contributes
//!   no identity (its Service stays plaintext until it is restarted with a sidecar).
//! - **PeerAuthentication with a selector in the root namespace** is an ordinary workload policy
//!   of the root namespace (as in Istio), not a mesh-wide one. The root namespace is never
//!   meshed, so such a policy reports `Programmed=False` with a message saying how to fix it.
//! - **One TrafficPolicy per Service.** The config carries one policy per destination Service,
//!   so two policies on the same Service conflict even when they name different ports.
//!
//! # Incremental compiles
//! A compile builds the shared indexes once (outbound table, policies) and reuses from the
//! previous compile ([`compile_incremental`]) the pre-serialized, pre-validated fragment of
//! every Service whose compiled value did not change; per namespace it computes only its
//! inbound policies and a plan of fragments, and the revision and size follow from the plan
//! without rendering. No text is produced here: the applier compares each namespace's revision
//! with what it observed and renders only the ConfigMaps it writes. A TrafficPolicy change
//! re-serializes one fragment and moves the revision of the namespaces that see its Service; a
//! namespace-level PeerAuthentication or an endpoint change touches one namespace.

mod inbound;
mod outbound;
mod pod;
mod policy;
mod render;
pub mod visibility;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use trellis_proxy::config::{
    AccessLog, AccessLogFormat, CONFIG_VERSION, MeshSettings, ProxyConfig, Telemetry,
    TracingSettings,
};

use crate::api::conditions::{Condition, ConditionStatus};
use crate::api::mesh::ConfigMapContent;
use crate::api::{Mesh, PeerAuthentication, TrafficPolicy};

pub use outbound::infer_protocol;
pub use pod::{SlimPod, SlimPodSpec, SlimPodStatus};

/// Name of the ConfigMap the compiler writes into every meshed namespace.
pub const CONFIGMAP_NAME: &str = "trellis-proxy";
/// Key of the compiled config in that ConfigMap.
pub const CONFIG_KEY: &str = "config.json";
/// The operator's namespace in the default install, where a PeerAuthentication without selector
/// applies mesh-wide. The running operator uses its own (`POD_NAMESPACE`,
/// `controller::compile_settings`).
pub const DEFAULT_ROOT_NAMESPACE: &str = "trellis-system";
/// Where sidecars ask for certificates in the default install (`controller::compile_settings`
/// for others).
pub const DEFAULT_IDENTITY_ENDPOINT: &str = "https://trellis-operator.trellis-system.svc:15012";
/// Namespace label that opts a namespace into the mesh (`enabled`) or out of it (`disabled`).
pub const INJECT_LABEL: &str = crate::inject::scope::INJECT;
/// Annotation the injector puts on every pod that received a sidecar.
pub const PROXY_VERSION_ANNOTATION: &str = crate::inject::scope::PROXY_VERSION;
/// A ConfigMap may hold 1 MiB; keep 64 KiB for metadata and managed fields.
pub const DEFAULT_MAX_CONFIG_BYTES: usize = 1024 * 1024 - 64 * 1024;
/// Under `configMap: Auto`, the largest `config.json` a namespace's full table may render to;
/// above it the namespace carries its bootstrap set. Issue #19's bound on a ConfigMap in a
/// large cluster: small enough that a namespace's copy costs little to store and push to every
/// kubelet, large enough for the full table of a mesh of about a hundred Services.
pub const AUTO_FULL_TABLE_MAX_BYTES: usize = 64 * 1024;
/// Namespaces that are never meshed, whatever their labels say.
pub const SYSTEM_NAMESPACES: [&str; 3] = crate::inject::scope::SYSTEM_NAMESPACES;

/// The meshed namespaces of the last compile ([`Output::meshed`]), which the compile
/// controller publishes so the CA writes trust bundles for exactly those; `None` before the
/// first compile.
pub type MeshedRx = tokio::sync::watch::Receiver<Option<Arc<BTreeSet<String>>>>;
/// The sending end of [`MeshedRx`].
pub type MeshedTx = tokio::sync::watch::Sender<Option<Arc<BTreeSet<String>>>>;
/// Server-first protocols' well-known ports (SMTP, MySQL, PostgreSQL, Redis, ...): the proxy
/// must not wait for the client to speak first there. Linkerd ships the same list.
pub const DEFAULT_SKIP_DETECTION_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// Which Services carry inline endpoints in a namespace's config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InlineEndpoints {
    /// Only the namespace's own Services (see the module docs for why).
    #[default]
    SameNamespace,
    /// Every Service (small meshes, local runs).
    All,
    /// None: every destination is reached through its cluster IP.
    None,
}

/// Compiler settings that do not come from the cluster.
#[derive(Clone, Debug)]
pub struct Settings {
    pub root_namespace: String,
    pub identity_endpoint: Option<String>,
    pub inline_endpoints: InlineEndpoints,
    /// Largest `config.json` written; larger ones are refused (see `Degraded`).
    pub max_config_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            root_namespace: DEFAULT_ROOT_NAMESPACE.into(),
            identity_endpoint: Some(DEFAULT_IDENTITY_ENDPOINT.into()),
            inline_endpoints: InlineEndpoints::default(),
            max_config_bytes: DEFAULT_MAX_CONFIG_BYTES,
        }
    }
}

/// Everything the compiler reads. Objects are `Arc`s because reflector stores hand them out that
/// way; order does not matter (the compiler sorts).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The Mesh named `default`, if it exists; without it the defaults apply.
    pub mesh: Option<Arc<Mesh>>,
    pub traffic_policies: Vec<Arc<TrafficPolicy>>,
    pub peer_authentications: Vec<Arc<PeerAuthentication>>,
    pub namespaces: Vec<Arc<Namespace>>,
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    /// Pods, as the pod cache holds them: records indexed by namespace
    /// ([`crate::pods::PodSet`]).
    pub pods: crate::pods::PodSet,
    pub settings: Settings,
}

/// `namespace/name` of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn of(meta: &ObjectMeta) -> Self {
        Self::new(
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        )
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            // Cluster-scoped (a Namespace).
            write!(f, "{}", self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// An object the compiler skipped, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub kind: &'static str,
    pub object: ObjectKey,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.object, self.message)
    }
}

pub(crate) use render::Fragments;
pub use render::NamespaceConfig;

impl NamespaceConfig {
    /// Content hash of the config (also its `revision` field).
    pub fn revision(&self) -> &str {
        &self.header.revision
    }

    /// The `config.json` text, rendered now from the shared fragments.
    pub fn render(&self) -> String {
        self.fragments.render(&self.header, &self.plan)
    }

    /// Length of [`render`](Self::render)'s text, without rendering.
    pub fn len(&self) -> usize {
        self.fragments.rendered_len(&self.header, &self.plan)
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// SHA-256 (hex) of a config text.
pub fn digest(json: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(json.as_bytes()))
}

/// A namespace whose config was not emitted because it is too large.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TooLarge {
    pub revision: String,
    pub bytes: usize,
}

/// What the compiler wants the cluster to look like.
#[derive(Clone, Debug, Default)]
pub struct Output {
    /// Every meshed namespace (emitted or not). A `trellis-proxy` ConfigMap managed by the
    /// operator outside this set is an orphan to delete.
    pub meshed: BTreeSet<String>,
    /// Desired `config.json` per meshed namespace (rendered on demand).
    pub configs: BTreeMap<String, Arc<NamespaceConfig>>,
    /// Meshed namespaces whose ConfigMap carries the bootstrap set instead of the full table:
    /// every one under `Bootstrap`, those whose full table exceeds
    /// [`AUTO_FULL_TABLE_MAX_BYTES`] under `Auto`, none under `Full`. What [`Self::policies`]
    /// and the TrafficPolicies' reach were computed with; [`compile_discovery`] computes it too.
    pub bootstrapped: BTreeSet<String>,
    /// Meshed namespaces whose config was refused: the ConfigMap in the cluster stays as it is.
    pub too_large: BTreeMap<String, TooLarge>,
    /// Meshed namespaces whose compiled config failed the sidecar's validation (a compiler bug or
    /// a Mesh setting the sidecar refuses, such as a bad trust domain): not emitted either.
    pub invalid: BTreeMap<String, String>,
    /// Conditions (`Accepted`, `Programmed`, `Ready`) of every TrafficPolicy.
    pub traffic_policies: BTreeMap<ObjectKey, Vec<Condition>>,
    /// Conditions (`Accepted`, `Programmed`, `Ready`) of every PeerAuthentication.
    pub peer_authentications: BTreeMap<ObjectKey, Vec<Condition>>,
    /// The compiler's Mesh conditions (`Programmed`, `Degraded`).
    pub mesh: Vec<Condition>,
    /// Per meshed namespace, the digest of the settings its config carries from the Mesh and
    /// the PeerAuthentications ([`ProxyConfig::settings_digest`]): what a proxy that runs them
    /// reports on the discovery stream. Computed by [`compile_discovery`] too (it is cheap: no
    /// outbound plan), so every replica can count propagation.
    pub settings: BTreeMap<String, String>,
    /// Per meshed namespace, the TrafficPolicies its ConfigMap carries (the Services with a
    /// policy that its `Full` table, or its `Bootstrap` set, lists) and their digest: what a
    /// proxy serving from that ConfigMap reports on the discovery stream, so propagation counts
    /// proxies that hold a policy from their ConfigMap and never subscribe to its Service.
    /// Computed by [`compile_discovery`] too, over the policy-bearing Services only.
    pub policies: BTreeMap<String, ListedPolicies>,
    /// Objects skipped as malformed.
    pub problems: Vec<Problem>,
    /// How much of this compile was new work.
    pub stats: CompileStats,
    /// The shared fragments and the outbound rows, for the next [`compile_incremental`].
    fragments: Option<Arc<render::Fragments>>,
    rows: Option<Arc<outbound::RowCache>>,
    /// The import scope of every meshed namespace that narrows it (the others import `*`):
    /// the discovery stream authorizes with the same rule the tables were built with.
    imports: Arc<BTreeMap<String, visibility::Scope>>,
}

/// The TrafficPolicies one namespace's ConfigMap carries ([`Output::policies`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListedPolicies {
    /// [`trellis_proxy::config::policies_digest`] over them, as the proxy computes it
    /// ([`ProxyConfig::policies_digest`]).
    pub digest: String,
    /// Their Services' `name.namespace` keys; shared by the namespaces that list the same.
    pub services: Arc<BTreeSet<String>>,
}

/// How much work a compile did, against what a compile from scratch would do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompileStats {
    /// Services in the outbound table.
    pub services: usize,
    /// Services serialized and validated anew (the rest were reused from the previous compile).
    pub serialized: usize,
    /// Namespaces whose Services, EndpointSlices or pods changed, so their outbound rows were
    /// compiled anew (out of every namespace holding any of those).
    pub namespaces_indexed: usize,
}

impl Output {
    /// The desired `config.json` of a namespace, rendered.
    pub fn config(&self, namespace: &str) -> Option<String> {
        self.configs.get(namespace).map(|c| c.render())
    }

    /// Every desired config, rendered (tests and tools; the applier renders only what it
    /// writes).
    pub fn render_all(&self) -> BTreeMap<String, String> {
        self.configs
            .iter()
            .map(|(ns, c)| (ns.clone(), c.render()))
            .collect()
    }

    /// The compiled table (every Service with its policy and all its endpoints), which the
    /// discovery stream serves from: the very entries the ConfigMaps are rendered from.
    pub(crate) fn fragments(&self) -> Option<&Arc<render::Fragments>> {
        self.fragments.as_ref()
    }

    /// The import scope of every meshed namespace that narrows it (shared, so the discovery
    /// view holds it without a copy and sees at a pointer comparison whether it moved).
    pub(crate) fn imports(&self) -> &Arc<BTreeMap<String, visibility::Scope>> {
        &self.imports
    }

    /// What a namespace imports (`trellis.dev/import-from`; `*` when not narrowed).
    pub fn import_scope(&self, namespace: &str) -> &visibility::Scope {
        static ALL: visibility::Scope = visibility::Scope::All;
        self.imports.get(namespace).unwrap_or(&ALL)
    }

    /// Namespaces whose desired config differs from `previous` (new, changed or gone).
    pub fn changed_since(&self, previous: &Output) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (ns, c) in &self.configs {
            if previous.configs.get(ns).map(|p| p.revision()) != Some(c.revision()) {
                out.insert(ns.clone());
            }
        }
        for ns in previous.configs.keys() {
            if !self.configs.contains_key(ns) && !self.too_large.contains_key(ns) {
                out.insert(ns.clone());
            }
        }
        out
    }
}

/// Compiles a snapshot from scratch.
pub fn compile(snapshot: &Snapshot) -> Output {
    compile_incremental(snapshot, None)
}

/// Compiles a snapshot, reusing what `previous` (the last compile's output) already serialized.
///
/// The compile is per namespace over shared indexes: the outbound table and the policies are
/// built once, and each Service's fragment is serialized and validated only when its compiled
/// value differs from `previous`'s; each namespace adds its inbound policies and a plan of
/// fragments, from which its revision and size follow without rendering. The result is the same
/// as [`compile`]'s, byte for byte (tests check). What changed since `previous` is
/// [`Output::changed_since`]; the applier renders and writes only those.
pub fn compile_incremental(snapshot: &Snapshot, previous: Option<&Output>) -> Output {
    compile_with(snapshot, previous, true)
}

/// The shared part of [`compile_incremental`] only: the outbound table with policies attached
/// (fragments), the meshed namespaces and their import scopes, without any namespace's config
/// or any status. What the discovery stream serves from (`crate::discovery::View`): at 1 000
/// namespaces the per-namespace plans are most of a compile's time and the stream needs none
/// of them. Its output is a valid `previous` for either function.
pub fn compile_discovery(snapshot: &Snapshot, previous: Option<&Output>) -> Output {
    compile_with(snapshot, previous, false)
}

fn compile_with(snapshot: &Snapshot, previous: Option<&Output>, namespaces: bool) -> Output {
    let mut problems = Vec::new();
    let settings = &snapshot.settings;
    let mesh_spec = snapshot.mesh.as_ref().map(|m| &m.spec);
    let meshed = meshed_namespaces(snapshot);
    let imports = import_scopes(snapshot, &meshed, &mut problems);

    let (table, rows, rebuilt) = outbound::build(
        snapshot,
        previous.and_then(|p| p.rows.as_deref()),
        &mut problems,
    );
    let policies = policy::compile(&snapshot.traffic_policies, &table);
    let inbound = inbound::resolve(&snapshot.peer_authentications, &settings.root_namespace);
    let header_mesh = mesh_settings(mesh_spec, settings);
    let blank = ProxyConfig {
        version: CONFIG_VERSION,
        revision: String::new(),
        namespace: String::new(),
        mesh: header_mesh.clone(),
        inbound: Vec::new(),
        outbound: Vec::new(),
    };
    let fragments = Arc::new(render::Fragments::build(
        table,
        &policies.attached,
        &blank,
        previous.and_then(|p| p.fragments.as_deref()),
    ));

    let mut out = Output {
        meshed: meshed.clone(),
        stats: CompileStats {
            services: fragments.len(),
            serialized: fragments.serialized,
            namespaces_indexed: rebuilt,
        },
        fragments: Some(fragments.clone()),
        rows: Some(Arc::new(rows)),
        ..Default::default()
    };
    // Shared with the previous compile when equal: the discovery view then sees at a pointer
    // comparison that no namespace's import scope moved.
    let imports = match previous {
        Some(p) if *p.imports == imports => p.imports.clone(),
        _ => Arc::new(imports),
    };
    out.imports = imports.clone();
    out.settings = meshed
        .iter()
        .map(|ns| {
            let header = ProxyConfig {
                inbound: inbound.policies_for(ns),
                ..blank.clone()
            };
            (ns.clone(), header.settings_digest())
        })
        .collect();
    let mode = mesh_spec
        .map(|m| m.discovery.config_map)
        .unwrap_or_default();
    let header_of = |ns: &str| ProxyConfig {
        namespace: ns.to_string(),
        inbound: inbound.policies_for(ns),
        ..blank.clone()
    };
    if !namespaces {
        // The same decision the namespace loop below makes, so every replica counts
        // propagation against what the ConfigMaps really list. Under `Auto` it needs each
        // namespace's visible plan (for its size), which the loop has anyway; under `Full` and
        // `Bootstrap` it costs nothing.
        out.bootstrapped = meshed
            .iter()
            .filter(|ns| match mode {
                ConfigMapContent::Full => false,
                ConfigMapContent::Bootstrap => true,
                ConfigMapContent::Auto => {
                    let import = imports.get(*ns).unwrap_or(&visibility::Scope::All);
                    let visible = fragments.plan(ns, settings.inline_endpoints, import);
                    carries_bootstrap(mode, &fragments, &header_of(ns), &visible)
                }
            })
            .cloned()
            .collect();
        out.policies = listed_policies(&fragments, &meshed, &imports, &out.bootstrapped);
        problems.sort();
        problems.dedup();
        out.problems = problems;
        return out;
    }
    // How many meshed namespaces see each Service, and how many of those got their config:
    // what a TrafficPolicy's `Programmed` condition reports.
    let mut reach = Reach::new(fragments.len());
    for ns in &meshed {
        let import = imports.get(ns).unwrap_or(&visibility::Scope::All);
        // What the namespace's sidecars may call (and so what a TrafficPolicy reaches), whether
        // the ConfigMap lists it or the discovery stream serves it.
        let visible = fragments.plan(ns, settings.inline_endpoints, import);
        let mut header = header_of(ns);
        let (plan, wider) = if carries_bootstrap(mode, &fragments, &header, &visible) {
            out.bootstrapped.insert(ns.clone());
            let plan = bootstrap_plan(&fragments, ns, settings.inline_endpoints);
            (plan, Some(visible))
        } else {
            (visible, None)
        };
        // The sidecar's own validation, so a config it would refuse is never written: each
        // Service once (in `Fragments::build`), each namespace's header here. Together they are
        // everything `ProxyConfig::validate` checks (tests parse every rendered config back).
        let errors = header
            .validate()
            .err()
            .map(|errs| {
                errs.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .or_else(|| fragments.table_errors.clone());
        if let Some(e) = errors {
            reach.add(wider.as_ref().unwrap_or(&plan), false);
            out.invalid.insert(ns.clone(), e);
            continue;
        }
        header.revision = fragments.revision(&header, &plan);
        let config = NamespaceConfig {
            header,
            plan,
            fragments: fragments.clone(),
        };
        let bytes = config.len();
        if bytes > settings.max_config_bytes {
            reach.add(wider.as_ref().unwrap_or(&config.plan), false);
            out.too_large.insert(
                ns.clone(),
                TooLarge {
                    revision: config.revision().to_string(),
                    bytes,
                },
            );
            continue;
        }
        reach.add(wider.as_ref().unwrap_or(&config.plan), true);
        out.configs.insert(ns.clone(), Arc::new(config));
    }

    out.policies = listed_policies(&fragments, &meshed, &imports, &out.bootstrapped);
    out.traffic_policies = policies.conditions(&meshed, |target| {
        fragments.index_of(target).map(|i| reach.get(i))
    });
    let emitted: BTreeSet<&str> = out.configs.keys().map(String::as_str).collect();
    out.peer_authentications = inbound.conditions(&emitted, &meshed, &settings.root_namespace);
    problems.sort();
    problems.dedup();
    out.mesh = mesh_conditions(snapshot, &out, &problems);
    out.problems = problems;
    out
}

/// Whether a namespace's ConfigMap carries its bootstrap set rather than `visible`, its full
/// table. Under `Auto` the size decides, taken from the lengths of the fragments the compile
/// already holds (no text is rendered): the header (its revision is a fixed-length hash, so it
/// is measured with a placeholder of that length) plus the visible Services. A 10 000-Service
/// cluster thus costs one plan per namespace, which `Bootstrap` computes as well (for the
/// reach of TrafficPolicies).
fn carries_bootstrap(
    mode: ConfigMapContent,
    fragments: &render::Fragments,
    header: &ProxyConfig,
    visible: &render::Plan,
) -> bool {
    match mode {
        ConfigMapContent::Full => false,
        ConfigMapContent::Bootstrap => true,
        ConfigMapContent::Auto => {
            debug_assert!(header.revision.is_empty());
            fragments.rendered_len(header, visible) + render::REVISION_LEN
                > AUTO_FULL_TABLE_MAX_BYTES
        }
    }
}

/// The bootstrap set of `namespace` (Mesh `spec.discovery.configMap: Bootstrap`): its own
/// Services that it may see and, transitively, the backends their TrafficPolicies split to
/// (the sidecar refuses a split to a Service its table lacks). It is the visibility plan of a
/// namespace that imports only itself, so it is a subset of what the namespace sees (every
/// namespace imports its own Services) and its size depends on the namespace alone, never on
/// the rest of the cluster. Everything else the discovery stream serves from the full table.
fn bootstrap_plan(
    fragments: &render::Fragments,
    namespace: &str,
    inline: InlineEndpoints,
) -> render::Plan {
    let own = visibility::Scope::Only(BTreeSet::from([namespace.to_string()]));
    fragments.plan(namespace, inline, &own)
}

/// [`Output::policies`]: per meshed namespace, the policy-bearing Services its ConfigMap
/// lists (its visible table, or its bootstrap set when it is in `bootstrapped`) and their
/// digest. Namespaces that list the
/// same Services (every namespace importing everything, the default) share one digest and one
/// set, computed once.
fn listed_policies(
    fragments: &render::Fragments,
    meshed: &BTreeSet<String>,
    imports: &BTreeMap<String, visibility::Scope>,
    bootstrapped: &BTreeSet<String>,
) -> BTreeMap<String, ListedPolicies> {
    let mut shared: std::collections::HashMap<Vec<u32>, ListedPolicies> = Default::default();
    let mut out = BTreeMap::new();
    for ns in meshed {
        let own;
        let scope = if bootstrapped.contains(ns) {
            own = visibility::Scope::Only(BTreeSet::from([ns.clone()]));
            &own
        } else {
            imports.get(ns).unwrap_or(&visibility::Scope::All)
        };
        let listed = fragments.listed_policies(ns, scope);
        let entry = shared
            .entry(listed)
            .or_insert_with_key(|listed| ListedPolicies {
                digest: fragments.policies_digest(listed),
                services: Arc::new(
                    listed
                        .iter()
                        .map(|i| {
                            let (namespace, name) = fragments.key_at(*i);
                            format!("{name}.{namespace}")
                        })
                        .collect(),
                ),
            })
            .clone();
        out.insert(ns.clone(), entry);
    }
    out
}

/// Per Service: in how many meshed namespaces' tables it is, and how many of those were written.
struct Reach {
    /// Namespaces that see the whole table (counted once instead of per Service).
    all: (usize, usize),
    each: Vec<(usize, usize)>,
}

impl Reach {
    fn new(services: usize) -> Self {
        Self {
            all: (0, 0),
            each: vec![(0, 0); services],
        }
    }

    fn add(&mut self, plan: &render::Plan, written: bool) {
        let slot = |c: &mut (usize, usize)| {
            c.0 += 1;
            c.1 += usize::from(written);
        };
        match plan.included() {
            None => slot(&mut self.all),
            Some(list) => list.iter().for_each(|i| slot(&mut self.each[*i as usize])),
        }
    }

    /// `(seen by, written into)` for one Service.
    fn get(&self, i: u32) -> PolicyReach {
        let e = self.each[i as usize];
        PolicyReach {
            namespaces: self.all.0 + e.0,
            written: self.all.1 + e.1,
        }
    }
}

/// How far a Service's policy reaches: the meshed namespaces whose table lists the Service, and
/// how many of those had their config written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PolicyReach {
    pub namespaces: usize,
    pub written: usize,
}

/// The import scope of every meshed namespace that narrows it; malformed annotations are
/// reported (and mean `*`).
fn import_scopes(
    snapshot: &Snapshot,
    meshed: &BTreeSet<String>,
    problems: &mut Vec<Problem>,
) -> BTreeMap<String, visibility::Scope> {
    let mut out = BTreeMap::new();
    for ns in &snapshot.namespaces {
        let Some(name) = ns.metadata.name.as_deref() else {
            continue;
        };
        if !meshed.contains(name) {
            continue;
        }
        match visibility::import_scope(ns.metadata.annotations.as_ref(), name) {
            Ok(visibility::Scope::All) => {}
            Ok(scope) => {
                out.insert(name.to_string(), scope);
            }
            Err(message) => problems.push(Problem {
                kind: "Namespace",
                object: ObjectKey::new("", name),
                message,
            }),
        }
    }
    out
}

/// Namespaces that get a config, by [`crate::inject::scope`]'s rule (the one the webhook
/// configuration and the injector follow): namespaces selected for injection, and namespaces
/// holding a pod that was injected or is labelled `trellis.dev/inject: enabled` (it opted in
/// from an unselected namespace, and its sidecar mounts the ConfigMaps). Never the system
/// namespaces, the root namespace, the Mesh's `excludedNamespaces`, or namespaces being
/// deleted.
pub fn meshed_namespaces(snapshot: &Snapshot) -> BTreeSet<String> {
    let default_spec;
    let spec = match snapshot.mesh.as_ref() {
        Some(m) => &m.spec,
        None => {
            default_spec = crate::api::MeshSpec::default();
            &default_spec
        }
    };
    let scope = crate::inject::Scope::new(spec, &snapshot.settings.root_namespace);
    let with_opted_in_pods: BTreeSet<&str> = snapshot
        .pods
        .namespaces()
        .filter(|(_, pods)| pods.any_wants_proxy())
        .map(|(ns, _)| ns)
        .collect();
    let empty = BTreeMap::new();
    let mut out = BTreeSet::new();
    for ns in &snapshot.namespaces {
        let Some(name) = ns.metadata.name.as_deref() else {
            continue;
        };
        if ns.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let labels = ns.metadata.labels.as_ref().unwrap_or(&empty);
        if crate::inject::scope::namespace_needs_config(
            &scope,
            name,
            labels,
            with_opted_in_pods.contains(name),
        ) {
            out.insert(name.to_string());
        }
    }
    out
}

fn mesh_settings(spec: Option<&crate::api::MeshSpec>, settings: &Settings) -> MeshSettings {
    let default_spec;
    let spec = match spec {
        Some(s) => s,
        None => {
            default_spec = crate::api::MeshSpec::default();
            &default_spec
        }
    };
    let tracing = &spec.observability.tracing;
    MeshSettings {
        trust_domain: spec.trust_domain.clone(),
        identity_endpoint: settings.identity_endpoint.clone(),
        telemetry: Telemetry {
            access_log: AccessLog {
                enabled: spec.proxy.access_log.enabled,
                format: match spec.proxy.access_log.format {
                    crate::api::mesh::AccessLogFormat::Json => AccessLogFormat::Json,
                    crate::api::mesh::AccessLogFormat::Text => AccessLogFormat::Text,
                },
            },
            tracing: match (&tracing.collector, tracing.enabled) {
                (Some(collector), true) if !collector.is_empty() => Some(TracingSettings {
                    sampling_percent: tracing.sampling_percent,
                    collector: collector.clone(),
                }),
                // Mode Install without a collector: the Jaeger the addon controller installs in
                // the operator's (root) namespace.
                (_, true)
                    if spec.observability.mode == crate::api::mesh::ObservabilityMode::Install =>
                {
                    Some(TracingSettings {
                        sampling_percent: tracing.sampling_percent,
                        collector: crate::addons::desired::jaeger_collector(
                            &settings.root_namespace,
                        ),
                    })
                }
                _ => None,
            },
        },
        skip_detection_ports: DEFAULT_SKIP_DETECTION_PORTS.to_vec(),
        detect_timeout_ms: 100,
    }
}

fn list<T: AsRef<str>>(items: impl IntoIterator<Item = T>, max: usize) -> String {
    let items: Vec<String> = items.into_iter().map(|s| s.as_ref().to_string()).collect();
    if items.len() > max {
        format!("{} and {} more", items[..max].join(", "), items.len() - max)
    } else {
        items.join(", ")
    }
}

fn mesh_conditions(snapshot: &Snapshot, out: &Output, problems: &[Problem]) -> Vec<Condition> {
    let generation = snapshot.mesh.as_ref().and_then(|m| m.metadata.generation);
    let defaults = if snapshot.mesh.is_none() {
        " No Mesh named `default` exists: the defaults apply (trust domain cluster.local)."
    } else {
        ""
    };
    let max = snapshot.settings.max_config_bytes;
    // Under `Auto` which namespaces left the full table is news (their sidecars now depend on
    // the discovery stream for other namespaces' Services); under `Bootstrap` it is every one.
    let mode = snapshot.mesh.as_ref().map(|m| m.spec.discovery.config_map);
    let auto = if mode.unwrap_or_default() == ConfigMapContent::Auto && !out.bootstrapped.is_empty()
    {
        format!(
            " configMap Auto: {} namespace(s) carry the bootstrap set, their full table \
             exceeding {AUTO_FULL_TABLE_MAX_BYTES} bytes (other Services come from the \
             discovery stream): {}.",
            out.bootstrapped.len(),
            list(&out.bootstrapped, 10)
        )
    } else {
        String::new()
    };
    let programmed = if out.too_large.is_empty() && out.invalid.is_empty() {
        Condition::new(
            "Programmed",
            ConditionStatus::True,
            "Programmed",
            format!(
                "Sidecar configuration compiled for {} meshed namespace(s).{auto}{defaults}",
                out.configs.len()
            ),
            generation,
        )
    } else {
        let failed = out.too_large.keys().chain(out.invalid.keys());
        Condition::new(
            "Programmed",
            ConditionStatus::False,
            if out.too_large.is_empty() {
                "InvalidConfig"
            } else {
                "ConfigTooLarge"
            },
            format!(
                "Sidecar configuration not updated in namespace(s) {}; see the Degraded condition.{auto}{defaults}",
                list(failed, 10)
            ),
            generation,
        )
    };
    let degraded = if !out.too_large.is_empty() {
        Condition::new(
            "Degraded",
            ConditionStatus::True,
            "ConfigTooLarge",
            format!(
                "The compiled config of namespace(s) {} exceeds {max} bytes, the ConfigMap limit \
                 minus headroom; the previous ConfigMap stays in force. Reduce the number of \
                 Services or inlined endpoints (TrafficPolicies and Services cluster-wide count).",
                list(
                    out.too_large
                        .iter()
                        .map(|(ns, t)| format!("{ns} ({} bytes)", t.bytes)),
                    10
                )
            ),
            generation,
        )
    } else if !out.invalid.is_empty() {
        Condition::new(
            "Degraded",
            ConditionStatus::True,
            "InvalidConfig",
            format!(
                "The compiled config was refused by the sidecar's validation in namespace(s) {}; \
                 the previous ConfigMap stays in force. First error: {}",
                list(out.invalid.keys(), 10),
                out.invalid
                    .values()
                    .next()
                    .map(String::as_str)
                    .unwrap_or_default()
            ),
            generation,
        )
    } else if !problems.is_empty() {
        Condition::new(
            "Degraded",
            ConditionStatus::True,
            "MalformedObjects",
            format!(
                "Skipped {} malformed object(s): {}",
                problems.len(),
                list(problems.iter().map(|p| p.to_string()), 5)
            ),
            generation,
        )
    } else {
        Condition::new(
            "Degraded",
            ConditionStatus::False,
            "AsExpected",
            "",
            generation,
        )
    };
    vec![programmed, degraded]
}

/// `(creationTimestamp, namespace, name)`: the order "oldest wins" uses everywhere.
pub(crate) fn age_key(meta: &ObjectMeta) -> (Option<jiff::Timestamp>, String, String) {
    (
        meta.creation_timestamp.as_ref().map(|t| t.0),
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}
