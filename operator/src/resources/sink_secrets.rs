//! The values sinks read from Secrets, passed to the stage that writes the
//! sinks as environment references.

use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, SecretKeySelector};
use keystone_crds::Plan;
use keystone_crds::plan::{PlanStage, StageOutput};

/// The environment through which the stage that writes the sinks receives the
/// values its sinks read from Secrets: references (`secretKeyRef`, named by
/// `SinkSpec::secret_env`), so no value ever passes through the operator, the
/// Deployment or the plan. Other stages get none.
pub fn sink_secret_env(plan: &Plan, stage: &PlanStage) -> Vec<EnvVar> {
    if stage.output != StageOutput::Sinks {
        return Vec::new();
    }
    plan.sinks
        .iter()
        .flat_map(|sink| {
            sink.spec.secret_refs().into_iter().map(|reference| EnvVar {
                name: sink.spec.secret_env(reference.key),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: reference.secret.to_owned(),
                        key: reference.key.secret_key().to_owned(),
                        optional: reference.optional.then_some(true),
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            })
        })
        .collect()
}
