//! A stage's metrics Service (the ingest endpoint's Service too) and its
//! PodDisruptionBudget.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use keystone_crds::Plan;
use keystone_crds::plan::PlanStage;

use super::{HTTP_PORT, meta, selector_labels, stage_labels, stage_object_name};

pub fn service(plan: &Plan, stage: &PlanStage, owner: &OwnerReference) -> Service {
    component_service(plan, &stage.name, owner)
}

/// The Service of one component's pods (a stage, or the ingest endpoint) on
/// their HTTP port.
pub fn component_service(plan: &Plan, component: &str, owner: &OwnerReference) -> Service {
    let name = stage_object_name(&plan.pipeline, component);
    Service {
        metadata: meta(
            name,
            &plan.namespace,
            stage_labels(&plan.pipeline, component),
            owner,
        ),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(&plan.pipeline, component)),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: HTTP_PORT,
                target_port: Some(IntOrString::String("http".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// At most one instance of a stage away at a time: a stage's partitions move
/// to the others, which restore their state, so draining several at once hurts.
pub fn pod_disruption_budget(
    plan: &Plan,
    stage: &PlanStage,
    owner: &OwnerReference,
) -> PodDisruptionBudget {
    let name = stage_object_name(&plan.pipeline, &stage.name);
    PodDisruptionBudget {
        metadata: meta(
            name,
            &plan.namespace,
            stage_labels(&plan.pipeline, &stage.name),
            owner,
        ),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&plan.pipeline, &stage.name)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}
