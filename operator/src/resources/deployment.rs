//! A stage's Deployment: the runtime container, its environment, probes,
//! volumes and a restricted pod.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use keystone_crds::Plan;
use keystone_crds::pipeline::UpgradeStrategy;
use keystone_crds::pipeline::http::HttpSourceSpec;
use keystone_crds::plan::PlanStage;

use super::security::RuntimeSecurity;
use super::sink_secrets::{registry_env, registry_mounts, sink_secret_env};
use super::{
    ANNOTATION_PLAN_HASH, ANNOTATION_RESTORE, HTTP_PORT, PLAN_DIR, PLAN_KEY, RESTORE_DIR,
    RESTORE_KEY, meta, plan_config_map_name, selector_labels, stage_labels, stage_object_name,
};

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

pub(super) fn env(name: &str, value: impl Into<String>) -> EnvVar {
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
/// The environment every runtime container gets (with `control`, when
/// given, after the Kafka settings), before its own.
fn common_env(
    plan: &Plan,
    component: &str,
    params: &WorkloadParams,
    control: Option<EnvVar>,
) -> Vec<EnvVar> {
    let mut pod_env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        // The runtime binds its endpoints to the pod's address.
        field_env("POD_IP", "status.podIP"),
        env("KEYSTONE_PIPELINE", plan.pipeline.clone()),
        env("KEYSTONE_STAGE", component.to_owned()),
        env("KEYSTONE_PLAN", format!("{PLAN_DIR}/{PLAN_KEY}")),
    ];
    pod_env.extend(params.kafka_env.iter().cloned());
    pod_env.extend(control);
    if let Some(host) = &params.bind_host {
        pod_env.push(env("KEYSTONE_HTTP_ADDR", format!("{host}:{HTTP_PORT}")));
    }
    pod_env.extend(params.security.env.iter().cloned());
    pod_env
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_owned(),
                key: key.to_owned(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// The Deployment of the pipeline's capture (`spec.source.postgres`): one
/// instance, replaced rather than rolled (two would only wait on each
/// other's replication slot), with the database credentials from the Secret.
pub fn capture_deployment(
    plan: &Plan,
    credentials_secret: &str,
    params: &WorkloadParams,
) -> Deployment {
    // The control token authorizes `POST /drop-slot` (see `crate::capture`).
    let control = secret_env(
        crate::control::CONTROL_TOKEN_ENV,
        &crate::control::control_secret_name(&plan.pipeline),
        crate::control::CONTROL_TOKEN_FIELD,
    );
    let mut pod_env = common_env(plan, CAPTURE_COMPONENT, params, Some(control));
    pod_env.push(secret_env(
        "KEYSTONE_POSTGRES_USER",
        credentials_secret,
        "username",
    ));
    pod_env.push(secret_env(
        "KEYSTONE_POSTGRES_PASSWORD",
        credentials_secret,
        "password",
    ));
    let mut args = vec![
        "capture".to_owned(),
        "--plan".to_owned(),
        format!("{PLAN_DIR}/{PLAN_KEY}"),
    ];
    args.extend(params.security.args.iter().cloned());
    let params = WorkloadParams {
        strategy: UpgradeStrategy::Recreate,
        // A restore reprocesses the stages' input; the capture goes on.
        restore: None,
        ..params.clone()
    };
    let replicas = params.replicas.unwrap_or(1).min(1);
    runtime_deployment(plan, CAPTURE_COMPONENT, args, pod_env, replicas, &params)
}

/// The component name of the capture's objects and pods.
pub const CAPTURE_COMPONENT: &str = "capture";

/// The component name of the HTTP ingest endpoint's objects and pods.
pub const INGEST_COMPONENT: &str = "ingest";

/// Where an ingest pod reads its tokens: the tokens Secret, one file per key.
/// Not below the plan's directory: a mount point inside a read-only volume
/// cannot be created.
const INGEST_TOKENS_DIR: &str = "/var/run/secrets/keystone/ingest-tokens";
/// Where an ingest pod reads its TLS certificate and key (`spec.source.http.tls`).
const INGEST_TLS_DIR: &str = "/var/run/secrets/keystone/ingest-tls";
/// Where an ingest pod reads the client authorities of mutual TLS.
const INGEST_CLIENT_CA_DIR: &str = "/var/run/secrets/keystone/ingest-client-ca";

/// The port an ingest pod takes events on over TLS.
pub const HTTPS_PORT: i32 = 8443;

/// The Deployment of the pipeline's HTTP ingest endpoint (`spec.source.http`):
/// `http.replicas` instances rolled one by one (the Service keeps serving),
/// with the tokens Secret (and the TLS Secrets) mounted, so that a rotation
/// reaches them without a restart.
pub fn ingest_deployment(
    plan: &Plan,
    http: &HttpSourceSpec,
    params: &WorkloadParams,
) -> Deployment {
    let mut pod_env = common_env(plan, INGEST_COMPONENT, params, None);
    pod_env.push(env("KEYSTONE_INGEST_TOKENS", INGEST_TOKENS_DIR.to_owned()));
    let mut mounts = vec![(
        "ingest-tokens",
        http.tokens_secret.as_str(),
        INGEST_TOKENS_DIR,
    )];
    if let Some(tls) = &http.tls {
        pod_env.push(env("KEYSTONE_INGEST_TLS", INGEST_TLS_DIR.to_owned()));
        mounts.push(("ingest-tls", tls.secret.as_str(), INGEST_TLS_DIR));
        if let Some(client_ca) = &tls.client_ca_secret {
            pod_env.push(env(
                "KEYSTONE_INGEST_CLIENT_CA",
                INGEST_CLIENT_CA_DIR.to_owned(),
            ));
            mounts.push(("ingest-client-ca", client_ca.as_str(), INGEST_CLIENT_CA_DIR));
        }
        if let Some(host) = &params.bind_host {
            pod_env.push(env("KEYSTONE_HTTPS_ADDR", format!("{host}:{HTTPS_PORT}")));
        }
    }
    let mut args = vec![
        "ingest".to_owned(),
        "--plan".to_owned(),
        format!("{PLAN_DIR}/{PLAN_KEY}"),
    ];
    args.extend(params.security.args.iter().cloned());
    let params = WorkloadParams {
        strategy: UpgradeStrategy::Rolling,
        // A restore reprocesses the stages' input; the endpoint goes on.
        restore: None,
        ..params.clone()
    };
    let replicas = params
        .replicas
        .map_or(http.replicas, |r| r.min(http.replicas));
    let mut deployment =
        runtime_deployment(plan, INGEST_COMPONENT, args, pod_env, replicas, &params);
    if let Some(pod) = deployment
        .spec
        .as_mut()
        .and_then(|spec| spec.template.spec.as_mut())
    {
        for (volume, secret, dir) in mounts {
            mount_secret(pod, volume, secret, dir);
        }
        if http.tls.is_some() {
            for container in &mut pod.containers {
                container
                    .ports
                    .get_or_insert_with(Vec::new)
                    .push(ContainerPort {
                        name: Some("https".to_owned()),
                        container_port: HTTPS_PORT,
                        protocol: Some("TCP".to_owned()),
                        ..ContainerPort::default()
                    });
            }
        }
    }
    deployment
}

pub fn deployment(plan: &Plan, stage: &PlanStage, params: &WorkloadParams) -> Deployment {
    // The credential of `POST /checkpoint` and `/resume`, from the Secret the
    // operator made for this pipeline (`crate::control`).
    let control = secret_env(
        crate::control::CONTROL_TOKEN_ENV,
        &crate::control::control_secret_name(&plan.pipeline),
        crate::control::CONTROL_TOKEN_FIELD,
    );
    let mut pod_env = common_env(plan, &stage.name, params, Some(control));
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
    pod_env.extend(sink_secret_env(plan, stage));
    pod_env.extend(registry_env(plan, stage));
    let replicas = params.replicas.unwrap_or(stage.parallelism);
    let mut deployment = runtime_deployment(plan, &stage.name, args, pod_env, replicas, params);
    if let Some(pod) = deployment
        .spec
        .as_mut()
        .and_then(|spec| spec.template.spec.as_mut())
    {
        for (volume, secret, dir) in registry_mounts(plan, stage) {
            mount_secret(pod, volume, &secret, dir);
        }
    }
    deployment
}

/// Mounts Secret `secret` read-only at `dir` in every container of `pod`.
fn mount_secret(pod: &mut PodSpec, volume: &str, secret: &str, dir: &str) {
    pod.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: volume.to_owned(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_owned()),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    });
    for container in &mut pod.containers {
        container
            .volume_mounts
            .get_or_insert_with(Vec::new)
            .push(VolumeMount {
                name: volume.to_owned(),
                mount_path: dir.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
    }
}

/// A Deployment of the runtime binary for one component of the pipeline (a
/// stage, or the capture).
fn runtime_deployment(
    plan: &Plan,
    component: &str,
    args: Vec<String>,
    pod_env: Vec<EnvVar>,
    replicas: i32,
    params: &WorkloadParams,
) -> Deployment {
    let name = stage_object_name(&plan.pipeline, component);
    let labels = stage_labels(&plan.pipeline, component);
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
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&plan.pipeline, component)),
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
                            // So does a change of the credentials the pods read.
                            .chain(params.security.annotations.clone())
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
