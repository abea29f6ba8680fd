//! The immutable ConfigMaps the instances read: one per plan version, and one
//! per restore.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use keystone_crds::Plan;

use super::{
    ANNOTATION_PLAN_HASH, PLAN_KEY, RESTORE_KEY, meta, pipeline_labels, plan_config_map_name,
};

/// What a ConfigMap's data may hold here: the API server refuses objects over
/// 1 MiB (data, keys and metadata together, as stored in etcd); this leaves
/// 16 KiB for the metadata (names, labels, owner references).
pub const CONFIG_MAP_DATA_LIMIT: usize = 1024 * 1024 - 16 * 1024;

/// A document that does not fit in a ConfigMap even written compactly.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the {what} is {size} bytes of JSON even without whitespace, more than the {CONFIG_MAP_DATA_LIMIT} bytes a ConfigMap holds (Kubernetes refuses objects over 1 MiB){hint}"
)]
pub struct TooLarge {
    pub what: &'static str,
    pub size: usize,
    pub hint: &'static str,
}

/// The JSON of `value` for a ConfigMap: pretty-printed (legible with
/// `kubectl get cm -o yaml`) when that fits, compact when only that fits,
/// refused (naming the size) otherwise, so that the limit is never met first
/// by the API server's opaque "Too long" on a write.
pub fn fitting_json<T: serde::Serialize>(
    value: &T,
    what: &'static str,
    hint: &'static str,
) -> Result<String, FitError> {
    let pretty = serde_json::to_string_pretty(value)?;
    if pretty.len() <= CONFIG_MAP_DATA_LIMIT {
        return Ok(pretty);
    }
    let compact = serde_json::to_string(value)?;
    if compact.len() <= CONFIG_MAP_DATA_LIMIT {
        return Ok(compact);
    }
    Err(FitError::TooLarge(TooLarge {
        what,
        size: compact.len(),
        hint,
    }))
}

#[derive(Debug, thiserror::Error)]
pub enum FitError {
    #[error(transparent)]
    Serialize(#[from] serde_json::Error),
    #[error(transparent)]
    TooLarge(TooLarge),
}

pub fn restore_config_map_name(pipeline: &str, id: &str) -> String {
    format!("{pipeline}-restore-{id}")
}

/// A restore the instances apply once: immutable, like the plan.
pub fn restore_config_map(
    plan: &Plan,
    restore: &keystone_crds::checkpoint::RestorePlan,
    owner: &OwnerReference,
) -> Result<ConfigMap, FitError> {
    let json = fitting_json(
        restore,
        "restore plan",
        " (it lists offsets per partition: fewer partitions per stage, or fewer stages)",
    )?;
    Ok(ConfigMap {
        metadata: meta(
            restore_config_map_name(&plan.pipeline, &restore.id),
            &plan.namespace,
            pipeline_labels(&plan.pipeline),
            owner,
        ),
        data: Some(BTreeMap::from([(RESTORE_KEY.to_owned(), json)])),
        immutable: Some(true),
        ..ConfigMap::default()
    })
}

/// The plan as the runtime reads it, pretty-printed so `kubectl get cm -o yaml`
/// is legible (compact if only that fits; refused if neither does).
pub fn plan_json(plan: &Plan) -> Result<String, FitError> {
    fitting_json(
        plan,
        "compiled plan",
        " (fewer steps, or smaller inline expressions and schemas)",
    )
}

pub fn plan_config_map(plan: &Plan, plan_json: String, owner: &OwnerReference) -> ConfigMap {
    let mut metadata = meta(
        plan_config_map_name(&plan.pipeline, &plan.hash()),
        &plan.namespace,
        pipeline_labels(&plan.pipeline),
        owner,
    );
    metadata.annotations = Some(BTreeMap::from([(
        ANNOTATION_PLAN_HASH.to_owned(),
        plan.hash(),
    )]));
    ConfigMap {
        metadata,
        data: Some(BTreeMap::from([(PLAN_KEY.to_owned(), plan_json)])),
        immutable: Some(true),
        ..ConfigMap::default()
    }
}
