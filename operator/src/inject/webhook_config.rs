//! The `MutatingWebhookConfiguration` the operator owns: a pure function of the Mesh spec, the
//! CA bundle and the operator's namespace, plus a thin server-side-apply applier. It is not
//! shipped in `config/`, so a GitOps tool applying `config/` never fights the operator over the
//! CA bundle.
//!
//! Two webhooks, both calling `POST /inject` on the operator Service:
//! - `namespace.inject.trellis.dev`: pods of namespaces the Mesh selects (default label
//!   `trellis.dev/inject: enabled`), except pods labelled `trellis.dev/inject: disabled` (the pod
//!   annotation is evaluated in code, since selectors cannot see annotations);
//! - `pod.inject.trellis.dev`: pods labelled `trellis.dev/inject: enabled` in any other
//!   namespace, so a pod can opt in where its namespace did not. When a pod matches both, the
//!   second call sees the proxy and leaves the pod unchanged.
//!
//! Both exclude the system namespaces, the operator's namespace and the Mesh's excluded
//! namespaces by the `kubernetes.io/metadata.name` label the API server sets on every namespace,
//! so a down operator can never block pods there (the code checks again). Which namespaces and
//! pods are selected is [`super::scope`]'s rule, the one the injector and the compiler use.
//!
//! The configuration is owned by the Mesh (an owner reference), so deleting the Mesh, or the
//! CRDs with it, lets the garbage collector remove it even when no operator runs any more: a
//! leftover configuration with `failurePolicy: Fail` pointing at a deleted Service would block
//! pod creation in every meshed namespace. The CA controller also deletes it when it finds no
//! Mesh ([`delete`]).
//!
//! `failurePolicy` is written exactly as the Mesh says (explicit, no silent default).
//! `reinvocationPolicy: Never`: a reinvocation could only find our proxy already there and skip,
//! so it would cost a round trip for nothing.
use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
    WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use kube::Resource;
use kube::api::{Api, DeleteParams, Patch, PatchParams};

use super::ANNOTATION_INJECT;
use super::scope::{NAMESPACE_NAME_LABEL, Scope};
use crate::api::mesh::FailurePolicy;
use crate::api::{FIELD_MANAGER, Mesh};

/// Name of the configuration object.
pub const NAME: &str = "trellis-sidecar-injector";
/// The operator Service the API server calls.
pub const SERVICE: &str = "trellis-operator";
/// Path of the injection endpoint.
pub const PATH: &str = "/inject";
/// Service port of the webhook (the pods listen on 9443).
pub const SERVICE_PORT: i32 = 443;
/// How long the API server waits for us.
pub const TIMEOUT_SECONDS: i32 = 10;

fn requirement(key: &str, operator: &str, values: Vec<String>) -> LabelSelectorRequirement {
    LabelSelectorRequirement {
        key: key.into(),
        operator: operator.into(),
        values: Some(values),
    }
}

/// The desired configuration, owned by `mesh` (an owner reference needs its `uid`, which
/// every Mesh read from the API server has).
pub fn desired(
    mesh: &Mesh,
    ca_bundle_pem: &str,
    operator_namespace: &str,
) -> MutatingWebhookConfiguration {
    let owner = mesh.controller_owner_ref(&());
    let mesh = &mesh.spec;
    let scope = Scope::new(mesh, operator_namespace);
    let not_excluded = requirement(NAMESPACE_NAME_LABEL, "NotIn", scope.excluded_namespaces());
    let failure_policy = match mesh.injection.failure_policy {
        FailurePolicy::Fail => "Fail",
        FailurePolicy::Ignore => "Ignore",
    };
    let webhook = |name: &str, namespace_selector, object_selector| MutatingWebhook {
        name: name.into(),
        admission_review_versions: vec!["v1".into()],
        client_config: WebhookClientConfig {
            ca_bundle: Some(ByteString(ca_bundle_pem.as_bytes().to_vec())),
            service: Some(ServiceReference {
                name: SERVICE.into(),
                namespace: operator_namespace.into(),
                path: Some(PATH.into()),
                port: Some(SERVICE_PORT),
            }),
            url: None,
        },
        failure_policy: Some(failure_policy.into()),
        match_policy: Some("Equivalent".into()),
        namespace_selector: Some(namespace_selector),
        object_selector: Some(object_selector),
        reinvocation_policy: Some("Never".into()),
        rules: Some(vec![RuleWithOperations {
            api_groups: Some(vec!["".into()]),
            api_versions: Some(vec!["v1".into()]),
            operations: Some(vec!["CREATE".into()]),
            resources: Some(vec!["pods".into()]),
            scope: Some("Namespaced".into()),
        }]),
        side_effects: "None".into(),
        timeout_seconds: Some(TIMEOUT_SECONDS),
        ..Default::default()
    };
    MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(NAME.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                FIELD_MANAGER.to_string(),
            )])),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        webhooks: Some(vec![
            webhook(
                "namespace.inject.trellis.dev",
                LabelSelector {
                    match_labels: Some(scope.namespace_match_labels()),
                    match_expressions: Some(scope.namespace_match_expressions()),
                },
                LabelSelector {
                    match_expressions: Some(vec![requirement(
                        ANNOTATION_INJECT,
                        "NotIn",
                        vec!["disabled".into()],
                    )]),
                    ..Default::default()
                },
            ),
            webhook(
                "pod.inject.trellis.dev",
                LabelSelector {
                    match_expressions: Some(vec![not_excluded]),
                    ..Default::default()
                },
                LabelSelector {
                    match_labels: Some(BTreeMap::from([(
                        ANNOTATION_INJECT.to_string(),
                        "enabled".to_string(),
                    )])),
                    ..Default::default()
                },
            ),
        ]),
    }
}

/// Applies the desired configuration with server-side apply (field manager
/// `trellis-operator`, forced: the operator owns every field it sets and converges them back).
pub async fn apply(
    client: kube::Client,
    desired: &MutatingWebhookConfiguration,
) -> Result<MutatingWebhookConfiguration, kube::Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    api.patch(
        NAME,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(desired),
    )
    .await
}

/// Deletes the configuration (the Mesh is gone, so nothing may call a webhook for it). Returns
/// whether there was one; a configuration already gone is not an error.
pub async fn delete(client: kube::Client) -> Result<bool, kube::Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    match api.delete(NAME, &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}
