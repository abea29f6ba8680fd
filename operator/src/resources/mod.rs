//! The desired Kubernetes objects of a pipeline: its plan ConfigMap, and per
//! stage a Deployment, a metrics Service and a PodDisruptionBudget. Pure
//! builders; the reconciler applies them with server-side apply.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use keystone_crds::Plan;
use keystone_crds::pipeline::UpgradeStrategy;
use keystone_crds::plan::{PlanStage, StageOutput};
use serde::Serialize;

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

/// Everything the builders need besides the plan.
#[derive(Clone, Debug)]
pub struct WorkloadParams {
    pub owner: OwnerReference,
    pub image: String,
    pub image_pull_policy: Option<String>,
    pub resources: Option<ResourceRequirements>,
    pub strategy: UpgradeStrategy,
    /// Environment for the runtime's Kafka connections (bootstrap servers, protocol).
    pub kafka_env: Vec<EnvVar>,
    /// The source cluster's security settings for the runtime.
    pub security: RuntimeSecurity,
    /// The host the runtime's HTTP endpoints bind (`$(POD_IP)` in the testbed); its default when None.
    pub bind_host: Option<String>,
    /// Instances per stage instead of the plan's parallelism (0 while suspended or stopped for a restore).
    pub replicas: Option<i32>,
    /// The restore ConfigMap the instances apply once (`serve --restore`).
    pub restore: Option<String>,
}

/// Longest Pipeline name whose stage Services (`<name>-s<N>`, DNS-1035 labels of
/// at most 63 characters) stay valid for up to 1000 stages.
pub const MAX_PIPELINE_NAME: usize = 57;

/// Why a Pipeline's name cannot name its objects, if it cannot: Services need
/// DNS-1035 labels (a letter first) and label values are at most 63 characters.
pub fn name_problem(name: &str) -> Option<String> {
    if name.len() > MAX_PIPELINE_NAME {
        return Some(format!(
            "the pipeline name is {} characters long; at most {MAX_PIPELINE_NAME} fit in the names of its stage Services and labels",
            name.len()
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Some(format!(
            "the pipeline name {name:?} must start with a lowercase letter: it prefixes its stage Services, whose names are DNS-1035 labels"
        ));
    }
    None
}

/// How the runtime authenticates to its source cluster: `--kafka-config`
/// arguments, credentials as environment from Secrets, certificates as files.
/// Secrets are read in the pipeline's namespace, under the names the operator
/// configuration gives (the operator's own copies live in its namespace).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RuntimeSecurity {
    pub args: Vec<String>,
    pub env: Vec<EnvVar>,
    pub volumes: Vec<Volume>,
    pub mounts: Vec<VolumeMount>,
}

pub const TLS_DIR: &str = "/etc/keystone/kafka-tls";

pub fn runtime_security(cluster: &crate::config::KafkaCluster) -> RuntimeSecurity {
    let mut out = RuntimeSecurity::default();
    let setting = |k: &str, v: &str| format!("--kafka-config={k}={v}");
    if let Some(protocol) = &cluster.security_protocol {
        out.args
            .push(setting("security.protocol", &protocol.to_lowercase()));
    }
    if let Some(sasl) = &cluster.sasl {
        out.args.push(setting("sasl.mechanism", &sasl.mechanism));
        // Expanded by the kubelet from the environment: the Deployment holds no secret.
        out.args
            .push(setting("sasl.username", "$(KAFKA_SASL_USERNAME)"));
        out.args
            .push(setting("sasl.password", "$(KAFKA_SASL_PASSWORD)"));
        for (name, key) in [
            ("KAFKA_SASL_USERNAME", &sasl.username),
            ("KAFKA_SASL_PASSWORD", &sasl.password),
        ] {
            out.env.push(EnvVar {
                name: name.to_owned(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: key.secret.clone(),
                        key: key.key.clone(),
                        ..SecretKeySelector::default()
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            });
        }
    }
    if let Some(tls) = &cluster.tls {
        for (property, file, key) in [
            ("ssl.ca.location", "ca.pem", &tls.ca),
            (
                "ssl.certificate.location",
                "certificate.pem",
                &tls.certificate,
            ),
            ("ssl.key.location", "key.pem", &tls.key),
        ] {
            let Some(key) = key else { continue };
            let volume = format!("kafka-tls-{}", file.trim_end_matches(".pem"));
            let dir = format!("{TLS_DIR}/{}", file.trim_end_matches(".pem"));
            out.volumes.push(Volume {
                name: volume.clone(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(key.secret.clone()),
                    items: Some(vec![KeyToPath {
                        key: key.key.clone(),
                        path: file.to_owned(),
                        ..KeyToPath::default()
                    }]),
                    default_mode: Some(0o440),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            });
            out.mounts.push(VolumeMount {
                name: volume,
                mount_path: dir.clone(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
            out.args.push(setting(property, &format!("{dir}/{file}")));
        }
    }
    out
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

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("http".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// Modest defaults: a stage is one Kafka consumer with bounded buffers.
pub fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity("100m".to_owned())),
            ("memory".to_owned(), Quantity("128Mi".to_owned())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_owned(),
            Quantity("512Mi".to_owned()),
        )])),
        ..ResourceRequirements::default()
    }
}

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

pub fn deployment(plan: &Plan, stage: &PlanStage, params: &WorkloadParams) -> Deployment {
    let name = stage_object_name(&plan.pipeline, &stage.name);
    let labels = stage_labels(&plan.pipeline, &stage.name);
    let mut pod_env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        // The runtime binds its endpoints to the pod's address.
        field_env("POD_IP", "status.podIP"),
        env("KEYSTONE_PIPELINE", plan.pipeline.clone()),
        env("KEYSTONE_STAGE", stage.name.clone()),
        env("KEYSTONE_PLAN", format!("{PLAN_DIR}/{PLAN_KEY}")),
    ];
    pod_env.extend(params.kafka_env.iter().cloned());
    if let Some(host) = &params.bind_host {
        pod_env.push(env("KEYSTONE_HTTP_ADDR", format!("{host}:{HTTP_PORT}")));
    }
    let mut args = vec![
        "serve".to_owned(),
        "--plan".to_owned(),
        format!("{PLAN_DIR}/{PLAN_KEY}"),
        "--stage".to_owned(),
        stage.name.clone(),
    ];
    if params.restore.is_some() {
        args.extend([
            "--restore".to_owned(),
            format!("{RESTORE_DIR}/{RESTORE_KEY}"),
        ]);
    }
    args.extend(params.security.args.iter().cloned());
    pod_env.extend(params.security.env.iter().cloned());
    pod_env.extend(sink_secret_env(plan, stage));
    let container = Container {
        name: "runtime".to_owned(),
        image: Some(params.image.clone()),
        image_pull_policy: params.image_pull_policy.clone(),
        args: Some(args),
        env: Some(pod_env),
        ports: Some(vec![ContainerPort {
            name: Some("http".to_owned()),
            container_port: HTTP_PORT,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        resources: Some(params.resources.clone().unwrap_or_else(default_resources)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(
            [
                VolumeMount {
                    name: "plan".to_owned(),
                    mount_path: PLAN_DIR.to_owned(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                },
                VolumeMount {
                    name: "tmp".to_owned(),
                    mount_path: "/tmp".to_owned(),
                    ..VolumeMount::default()
                },
            ]
            .into_iter()
            .chain(params.restore.iter().map(|_| VolumeMount {
                name: "restore".to_owned(),
                mount_path: RESTORE_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            }))
            .chain(params.security.mounts.iter().cloned())
            .collect(),
        ),
        ..Container::default()
    };
    let strategy = match params.strategy {
        UpgradeStrategy::Rolling => DeploymentStrategy {
            type_: Some("RollingUpdate".to_owned()),
            ..DeploymentStrategy::default()
        },
        UpgradeStrategy::Recreate => DeploymentStrategy {
            type_: Some("Recreate".to_owned()),
            ..DeploymentStrategy::default()
        },
    };
    Deployment {
        metadata: meta(name, &plan.namespace, labels.clone(), &params.owner),
        spec: Some(DeploymentSpec {
            replicas: Some(params.replicas.unwrap_or(stage.parallelism)),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&plan.pipeline, &stage.name)),
                ..LabelSelector::default()
            },
            strategy: Some(strategy),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    // A plan change changes the template, which rolls the pods; so does a restore.
                    annotations: Some(
                        [(ANNOTATION_PLAN_HASH.to_owned(), plan.hash())]
                            .into_iter()
                            .chain(
                                params
                                    .restore
                                    .iter()
                                    .map(|name| (ANNOTATION_RESTORE.to_owned(), name.clone())),
                            )
                            .collect(),
                    ),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    // The runtime never talks to the API server.
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(30),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        fs_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    volumes: Some(
                        [
                            Volume {
                                name: "plan".to_owned(),
                                config_map: Some(ConfigMapVolumeSource {
                                    name: plan_config_map_name(&plan.pipeline, &plan.hash()),
                                    ..ConfigMapVolumeSource::default()
                                }),
                                ..Volume::default()
                            },
                            Volume {
                                name: "tmp".to_owned(),
                                empty_dir: Some(EmptyDirVolumeSource {
                                    size_limit: Some(Quantity("64Mi".to_owned())),
                                    ..EmptyDirVolumeSource::default()
                                }),
                                ..Volume::default()
                            },
                        ]
                        .into_iter()
                        .chain(params.restore.iter().map(|name| Volume {
                            name: "restore".to_owned(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: name.clone(),
                                ..ConfigMapVolumeSource::default()
                            }),
                            ..Volume::default()
                        }))
                        .chain(params.security.volumes.iter().cloned())
                        .collect(),
                    ),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

pub fn service(plan: &Plan, stage: &PlanStage, owner: &OwnerReference) -> Service {
    let name = stage_object_name(&plan.pipeline, &stage.name);
    Service {
        metadata: meta(
            name,
            &plan.namespace,
            stage_labels(&plan.pipeline, &stage.name),
            owner,
        ),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(&plan.pipeline, &stage.name)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use keystone_crds::{Pipeline, compile};

    const PIPELINE: &str = r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: clicks, namespace: web, uid: "1234", generation: 3}
spec:
  source:
    topic: web.clicks
    key: [session_id]
    schema:
      fields:
        - {name: session_id, type: string}
        - {name: user, type: string}
  steps:
    - name: per-user
      dedup: {key: [user], window: 1m}
  parallelism: 2
  sinks:
    - name: out
      kafka: {topic: web.clicks.out, partitions: 3}
"#;

    fn fixture() -> (Plan, WorkloadParams) {
        fixture_of(PIPELINE)
    }

    fn fixture_of(manifest: &str) -> (Plan, WorkloadParams) {
        let pipeline: Pipeline = serde_yaml_ng::from_str(manifest).expect("pipeline");
        let plan = compile(&pipeline, &[]).expect("valid");
        let owner = kube::Resource::controller_owner_ref(&pipeline, &()).expect("owner");
        let params = WorkloadParams {
            owner,
            image: "keystone/runtime:test".into(),
            image_pull_policy: None,
            resources: None,
            strategy: UpgradeStrategy::Rolling,
            kafka_env: vec![env("KAFKA_BOOTSTRAP_SERVERS", "k:9092")],
            security: RuntimeSecurity::default(),
            bind_host: None,
            replicas: None,
            restore: None,
        };
        (plan, params)
    }

    #[test]
    fn one_deployment_per_stage_with_the_plan_hash_and_a_restricted_pod() {
        let (plan, params) = fixture();
        assert_eq!(
            plan.stages.len(),
            2,
            "the dedup by another key needs its own stage"
        );
        let d = deployment(&plan, &plan.stages[1], &params);
        assert_eq!(d.metadata.name.as_deref(), Some("clicks-s1"));
        let owner = &d.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(owner.controller, Some(true));
        assert_eq!(owner.kind, "Pipeline");
        let spec = d.spec.expect("spec");
        assert_eq!(spec.replicas, Some(2));
        let template = spec.template;
        let annotations = template
            .metadata
            .expect("meta")
            .annotations
            .expect("annotations");
        assert_eq!(annotations[ANNOTATION_PLAN_HASH], plan.hash());
        let pod = template.spec.expect("pod");
        assert_eq!(pod.automount_service_account_token, Some(false));
        let c = &pod.containers[0];
        assert_eq!(
            c.args.as_deref().expect("args"),
            [
                "serve",
                "--plan",
                "/etc/keystone/plan.json",
                "--stage",
                "s1"
            ]
        );
        let sc = c.security_context.as_ref().expect("security context");
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_owned()])
        );
        assert_eq!(
            sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
            Some("RuntimeDefault")
        );
        let probe = c
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("probe");
        assert_eq!(probe.path.as_deref(), Some("/readyz"));
        let envs: Vec<&str> = c
            .env
            .as_ref()
            .expect("env")
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        for name in ["POD_NAME", "POD_NAMESPACE", "KAFKA_BOOTSTRAP_SERVERS"] {
            assert!(envs.contains(&name), "{name} missing from {envs:?}");
        }
    }

    #[test]
    fn sasl_and_tls_reach_the_runtime_without_secrets_in_the_deployment() {
        use crate::config::{KafkaCluster, SaslConfig, SecretKey, TlsConfig};
        let key = |secret: &str, key: &str| SecretKey {
            secret: secret.into(),
            key: key.into(),
        };
        let cluster = KafkaCluster {
            bootstrap_servers: "k:9093".into(),
            security_protocol: Some("SASL_SSL".into()),
            tls: Some(TlsConfig {
                ca: Some(key("kafka-ca", "ca.crt")),
                ..TlsConfig::default()
            }),
            sasl: Some(SaslConfig {
                mechanism: "SCRAM-SHA-512".into(),
                username: key("kafka-user", "username"),
                password: key("kafka-user", "password"),
            }),
            ..KafkaCluster::default()
        };
        let (plan, mut params) = fixture();
        params.security = runtime_security(&cluster);
        let d = deployment(&plan, &plan.stages[0], &params);
        let pod = d.spec.expect("spec").template.spec.expect("pod");
        let c = &pod.containers[0];
        let args = c.args.clone().expect("args");
        for wanted in [
            "--kafka-config=security.protocol=sasl_ssl",
            "--kafka-config=sasl.mechanism=SCRAM-SHA-512",
            "--kafka-config=sasl.password=$(KAFKA_SASL_PASSWORD)",
            "--kafka-config=ssl.ca.location=/etc/keystone/kafka-tls/ca/ca.pem",
        ] {
            assert!(
                args.iter().any(|a| a == wanted),
                "{wanted} missing from {args:?}"
            );
        }
        let env = c.env.clone().expect("env");
        let password = env
            .iter()
            .find(|e| e.name == "KAFKA_SASL_PASSWORD")
            .expect("password env");
        assert_eq!(password.value, None);
        let selector = password
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
            .expect("secret ref");
        assert_eq!(
            (selector.name.as_str(), selector.key.as_str()),
            ("kafka-user", "password")
        );
        let volumes = pod.volumes.expect("volumes");
        let ca = volumes
            .iter()
            .find(|v| v.name == "kafka-tls-ca")
            .expect("ca volume");
        assert_eq!(
            ca.secret.as_ref().and_then(|s| s.secret_name.as_deref()),
            Some("kafka-ca")
        );
        assert!(
            c.volume_mounts
                .as_ref()
                .expect("mounts")
                .iter()
                .any(|m| m.mount_path == "/etc/keystone/kafka-tls/ca")
        );
    }

    /// The fixture writing to a search index as `credentials`, trusting the CA in `es-ca`.
    fn search_fixture(credentials: &str) -> (Plan, WorkloadParams) {
        let manifest = PIPELINE
            .replace(
                "        - {name: user, type: string}\n",
                "        - {name: user, type: string}\n        - {name: seq, type: integer}\n",
            )
            .replace(
                "    - name: out\n      kafka: {topic: web.clicks.out, partitions: 3}\n",
                &format!(
                    "    - name: search-eu\n      elasticsearch: {{endpoint: 'https://es:9200', index: clicks, idFields: [user], versionField: seq, credentialsSecret: {credentials}, caSecret: es-ca}}\n"
                ),
            );
        fixture_of(&manifest)
    }

    fn container_env(deployment: &Deployment) -> Vec<EnvVar> {
        deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|pod| pod.containers[0].env.clone())
            .unwrap_or_default()
    }

    #[test]
    fn the_stage_that_writes_the_sinks_reads_their_secrets_by_reference() {
        use keystone_crds::pipeline::SinkSecretKey;
        let (plan, params) = search_fixture("es-creds");
        assert_eq!(
            plan.stages.len(),
            2,
            "the dedup by user needs its own stage"
        );
        let sink = &plan.sinks[0].spec;
        let writer = deployment(&plan, &plan.stages[1], &params);
        let refs: Vec<(String, String, String, Option<bool>)> = container_env(&writer)
            .into_iter()
            .filter(|e| e.name.starts_with("KEYSTONE_SINK_"))
            .map(|e| {
                assert_eq!(e.value, None, "{} carries a value", e.name);
                let selector = e
                    .value_from
                    .and_then(|v| v.secret_key_ref)
                    .expect("a Secret reference");
                (e.name, selector.name, selector.key, selector.optional)
            })
            .collect();
        let expected = [
            (
                "KEYSTONE_SINK_SEARCH_EU_USERNAME",
                "es-creds",
                "username",
                Some(true),
            ),
            (
                "KEYSTONE_SINK_SEARCH_EU_PASSWORD",
                "es-creds",
                "password",
                Some(true),
            ),
            (
                "KEYSTONE_SINK_SEARCH_EU_API_KEY",
                "es-creds",
                "apiKey",
                Some(true),
            ),
            ("KEYSTONE_SINK_SEARCH_EU_CA_CERT", "es-ca", "ca.crt", None),
        ]
        .map(|(env, secret, key, optional)| {
            (env.to_owned(), secret.to_owned(), key.to_owned(), optional)
        });
        assert_eq!(refs, expected);
        // The names are the ones the runtime looks up.
        assert_eq!(refs[0].0, sink.secret_env(SinkSecretKey::Username));
        assert_eq!(refs[3].0, sink.secret_env(SinkSecretKey::CaCert));

        // The stage before the repartition writes no sink, so it reads no sink Secret.
        let reader = deployment(&plan, &plan.stages[0], &params);
        let names: Vec<String> = container_env(&reader).into_iter().map(|e| e.name).collect();
        assert!(
            !names.iter().any(|n| n.starts_with("KEYSTONE_SINK_")),
            "{names:?}"
        );
    }

    #[test]
    fn a_renamed_sink_secret_rolls_the_pods_that_read_it() {
        let (plan, params) = search_fixture("es-creds");
        let (renamed, _) = search_fixture("es-creds-2");
        let before = deployment(&plan, &plan.stages[1], &params);
        let after = deployment(&renamed, &renamed.stages[1], &params);
        assert_ne!(
            before.spec.as_ref().expect("spec").template,
            after.spec.as_ref().expect("spec").template
        );
        // Not only through the plan hash: the references themselves change.
        assert_ne!(container_env(&before), container_env(&after));
    }

    #[test]
    fn names_that_cannot_name_services_are_refused() {
        assert_eq!(name_problem("orders"), None);
        assert_eq!(name_problem(&"a".repeat(MAX_PIPELINE_NAME)), None);
        assert!(name_problem(&"a".repeat(MAX_PIPELINE_NAME + 1)).is_some());
        assert!(name_problem("1orders").is_some_and(|m| m.contains("lowercase letter")));
        let longest = stage_object_name(&"a".repeat(MAX_PIPELINE_NAME), "s999");
        assert!(longest.len() <= 63, "{}", longest.len());
    }

    #[test]
    fn a_changed_plan_changes_the_pod_template() {
        let (plan, params) = fixture();
        let before = deployment(&plan, &plan.stages[0], &params);
        let mut changed = plan.clone();
        changed.commit_interval_ms += 1;
        let after = deployment(&changed, &changed.stages[0], &params);
        assert_ne!(
            before.spec.expect("spec").template,
            after.spec.expect("spec").template
        );
    }

    #[test]
    fn a_restore_is_mounted_passed_and_rolls_the_pods_and_replicas_can_be_held() {
        let (plan, mut params) = fixture();
        let before = deployment(&plan, &plan.stages[0], &params);
        params.restore = Some("p-restore-r1".to_owned());
        params.replicas = Some(0);
        let after = deployment(&plan, &plan.stages[0], &params);
        let spec = after.spec.expect("spec");
        assert_eq!(spec.replicas, Some(0));
        assert_ne!(before.spec.expect("spec").template, spec.template);
        let pod = spec.template.spec.expect("pod spec");
        let container = &pod.containers[0];
        let args = container.args.clone().unwrap_or_default();
        let at = args
            .iter()
            .position(|a| a == "--restore")
            .expect("--restore");
        assert_eq!(args[at + 1], format!("{RESTORE_DIR}/{RESTORE_KEY}"));
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "restore")
            .expect("restore volume");
        assert_eq!(
            volume.config_map.as_ref().map(|c| c.name.as_str()),
            Some("p-restore-r1")
        );
        assert!(
            container
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == "restore" && m.mount_path == RESTORE_DIR)
        );
    }

    #[test]
    fn service_pdb_and_config_map_select_and_carry_the_plan() {
        let (plan, params) = fixture();
        let stage = &plan.stages[0];
        let svc = service(&plan, stage, &params.owner);
        let selector = svc
            .spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .expect("selector");
        assert_eq!(selector[LABEL_STAGE], "s0");
        let pdb = pod_disruption_budget(&plan, stage, &params.owner);
        assert_eq!(
            pdb.spec.and_then(|s| s.max_unavailable),
            Some(IntOrString::Int(1))
        );
        let json = plan_json(&plan).expect("json");
        let cm = plan_config_map(&plan, json.clone(), &params.owner);
        assert_eq!(
            cm.metadata.name,
            Some(format!("clicks-plan-{}", plan.hash()))
        );
        assert_eq!(cm.immutable, Some(true));
        let back: Plan =
            serde_json::from_str(&cm.data.as_ref().expect("data")[PLAN_KEY]).expect("plan");
        assert_eq!(back, plan);
        let value = with_type_meta(&cm).expect("value");
        assert_eq!(value["kind"], "ConfigMap");
        assert_eq!(value["apiVersion"], "v1");
    }
}
