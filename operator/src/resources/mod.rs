//! The desired Kubernetes objects of a pipeline: its plan ConfigMap, and per
//! stage a Deployment, a metrics Service and a PodDisruptionBudget. Pure
//! builders; the reconciler applies them with server-side apply.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde::Serialize;

mod config_maps;
mod deployment;
mod ingest;
mod network_policy;
mod security;
mod services;
mod sink_secrets;
#[cfg(test)]
mod tests;

pub use config_maps::{
    CONFIG_MAP_DATA_LIMIT, FitError, TooLarge, fitting_json, plan_config_map, plan_json,
    restore_config_map, restore_config_map_name,
};
pub use deployment::{
    CAPTURE_COMPONENT, HTTPS_PORT, INGEST_COMPONENT, WorkloadParams, capture_deployment,
    default_resources, deployment, ingest_deployment,
};
pub use ingest::{
    ingest_host, ingest_ingress, ingest_ingress_name, ingest_ingress_url, ingest_port,
    ingest_service, ingest_service_url,
};
pub use network_policy::{
    ingest_network_policy, ingest_network_policy_name, network_policy, network_policy_name,
};
pub use security::{
    ANNOTATION_CREDENTIALS_HASH, RuntimeSecurity, TLS_DIR, credentials_hash,
    referenced_secret_keys, runtime_security, secret_bytes,
};
pub use services::{component_service, pod_disruption_budget, service};
pub use sink_secrets::sink_secret_env;

pub const MANAGED_BY: &str = "keystone-operator";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_PIPELINE: &str = "keystone.dev/pipeline";
pub const LABEL_STAGE: &str = "keystone.dev/stage";
pub const ANNOTATION_PLAN_HASH: &str = "keystone.dev/plan-hash";
pub const PLAN_KEY: &str = "plan.json";
pub const PLAN_DIR: &str = "/etc/keystone";
pub const HTTP_PORT: i32 = 8080;
pub const ANNOTATION_RESTORE: &str = "keystone.dev/restore";
pub const RESTORE_KEY: &str = "restore.json";
pub const RESTORE_DIR: &str = "/etc/keystone-restore";
pub use keystone_crds::validate::MAX_PIPELINE_NAME;

/// Why a Pipeline's name cannot name its objects, if it cannot: Services need
/// DNS-1035 labels (a letter first) and label values are at most 63 characters.
pub fn name_problem(name: &str) -> Option<String> {
    // The same rule `keystone-runtime check` applies, so the two cannot differ.
    keystone_crds::validate::pipeline_name_problem(name)
}

/// The name of the plan ConfigMap of one plan version. Each version gets its
/// own immutable ConfigMap, so pods of the previous version (still running
/// during a rollout, or restarted then) keep reading the plan they were made
/// for, and a rollback has its plan at hand.
pub fn plan_config_map_name(pipeline: &str, hash: &str) -> String {
    format!("{pipeline}-plan-{hash}")
}

/// The name of a stage's Deployment, Service and PodDisruptionBudget.
pub fn stage_object_name(pipeline: &str, stage: &str) -> String {
    format!("{pipeline}-{stage}")
}

/// The label selector of every object (and pod) of a pipeline.
pub fn pipeline_selector(pipeline: &str) -> String {
    format!("{LABEL_PIPELINE}={pipeline}")
}

/// Whether the pod's Ready condition is True.
pub fn pod_ready(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether the pod writes the pipeline's source topic (its capture, or its
/// HTTP ingest endpoint) rather than running a stage: it holds no stage
/// state and takes no checkpoints.
pub fn is_source_pod(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_STAGE))
        .is_some_and(|stage| stage == CAPTURE_COMPONENT || stage == INGEST_COMPONENT)
}

pub fn pipeline_labels(pipeline: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "keystone-runtime".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), pipeline.to_owned()),
        (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
        (LABEL_PIPELINE.to_owned(), pipeline.to_owned()),
    ])
}

fn selector_labels(pipeline: &str, stage: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_PIPELINE.to_owned(), pipeline.to_owned()),
        (LABEL_STAGE.to_owned(), stage.to_owned()),
    ])
}

fn stage_labels(pipeline: &str, stage: &str) -> BTreeMap<String, String> {
    let mut labels = pipeline_labels(pipeline);
    labels.insert("app.kubernetes.io/component".to_owned(), stage.to_owned());
    labels.extend(selector_labels(pipeline, stage));
    labels
}

fn meta(
    name: String,
    namespace: &str,
    labels: BTreeMap<String, String>,
    owner: &OwnerReference,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}
/// Server-side apply needs apiVersion and kind in the body.
pub fn with_type_meta<K>(object: &K) -> Result<serde_json::Value, serde_json::Error>
where
    K: k8s_openapi::Resource + Serialize,
{
    let mut value = serde_json::to_value(object)?;
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".to_owned(), K::API_VERSION.into());
        map.insert("kind".to_owned(), K::KIND.into());
    }
    Ok(value)
}
