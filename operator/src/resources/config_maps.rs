//! The immutable ConfigMaps the instances read: one per plan version, and one
//! per restore.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use keystone_crds::Plan;

use super::{
    ANNOTATION_PLAN_HASH, PLAN_KEY, RESTORE_KEY, meta, pipeline_labels, plan_config_map_name,
};

pub fn restore_config_map_name(pipeline: &str, id: &str) -> String {
    format!("{pipeline}-restore-{id}")
}

/// A restore the instances apply once: immutable, like the plan.
pub fn restore_config_map(
    plan: &Plan,
    restore: &keystone_crds::checkpoint::RestorePlan,
    owner: &OwnerReference,
) -> Result<ConfigMap, serde_json::Error> {
    Ok(ConfigMap {
        metadata: meta(
            restore_config_map_name(&plan.pipeline, &restore.id),
            &plan.namespace,
            pipeline_labels(&plan.pipeline),
            owner,
        ),
        data: Some(BTreeMap::from([(
            RESTORE_KEY.to_owned(),
            serde_json::to_string_pretty(restore)?,
        )])),
        immutable: Some(true),
        ..ConfigMap::default()
    })
}

/// The plan as the runtime reads it, pretty-printed so `kubectl get cm -o yaml` is legible.
pub fn plan_json(plan: &Plan) -> Result<String, serde_json::Error> {
    serde_json::to_string_pretty(plan)
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
