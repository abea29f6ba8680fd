//! The values sinks read from Secrets, passed to the stage that writes the
//! sinks as environment references.

use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, SecretKeySelector};
use keystone_crds::Plan;
use keystone_crds::plan::{PlanStage, StageOutput};

/// Where a stage that reads or writes Avro finds the registry's CA certificates.
pub const REGISTRY_CA_DIR: &str = "/var/run/secrets/keystone/registry-ca";
const REGISTRY_CA_VOLUME: &str = "registry-ca";

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

/// Whether `stage` talks to the schema registry: it decodes an Avro source,
/// or writes an Avro sink.
fn uses_registry(plan: &Plan, stage: &PlanStage) -> bool {
    let reads = plan.source.avro.is_some() && stage.input.topic == plan.source.topic;
    let writes = stage.output == StageOutput::Sinks && plan.sinks.iter().any(|s| s.avro.is_some());
    reads || writes
}

/// The registry's credentials for a stage that talks to it, as Secret
/// references (each key optional: `username` and `password`, or `token`),
/// and the CA file's path when the registry has a CA Secret.
pub fn registry_env(plan: &Plan, stage: &PlanStage) -> Vec<EnvVar> {
    let Some(registry) = plan
        .schema_registry
        .as_ref()
        .filter(|_| uses_registry(plan, stage))
    else {
        return Vec::new();
    };
    let mut env = Vec::new();
    if let Some(secret) = &registry.credentials_secret {
        for (name, key) in [
            ("KEYSTONE_REGISTRY_USERNAME", "username"),
            ("KEYSTONE_REGISTRY_PASSWORD", "password"),
            ("KEYSTONE_REGISTRY_TOKEN", "token"),
        ] {
            env.push(EnvVar {
                name: name.to_owned(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: secret.clone(),
                        key: key.to_owned(),
                        optional: Some(true),
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            });
        }
    }
    if registry.ca_secret.is_some() {
        env.push(super::deployment::env(
            "KEYSTONE_REGISTRY_CA_FILE",
            format!("{REGISTRY_CA_DIR}/ca.crt"),
        ));
    }
    env
}

/// The registry's CA Secret as a volume of a stage that talks to it:
/// (volume, Secret, directory).
pub fn registry_mounts(
    plan: &Plan,
    stage: &PlanStage,
) -> Vec<(&'static str, String, &'static str)> {
    plan.schema_registry
        .as_ref()
        .filter(|_| uses_registry(plan, stage))
        .and_then(|r| r.ca_secret.clone())
        .map(|secret| (REGISTRY_CA_VOLUME, secret, REGISTRY_CA_DIR))
        .into_iter()
        .collect()
}
