//! The plan ConfigMap and per-stage Deployments, Services and PodDisruptionBudgets.

use k8s_openapi::api::core::v1::Secret;

use super::owned::OwnedKind;
use super::*;
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use keystone_crds::pipeline::IngestStatus;

/// Environment the runtime needs to reach the plan's clusters.
fn kafka_env(ctx: &Context, desired: &[DesiredTopic], plan: &Plan) -> Vec<EnvVar> {
    let env = |name: &str, value: String| EnvVar {
        name: name.to_owned(),
        value: Some(value),
        ..EnvVar::default()
    };
    let mut out = Vec::new();
    let source_cluster = ctx.config.resolve_cluster(plan.source.cluster.as_deref());
    if let Some(cluster) = source_cluster
        .as_ref()
        .and_then(|c| ctx.config.kafka_clusters.get(c))
    {
        out.push(env(
            "KAFKA_BOOTSTRAP_SERVERS",
            cluster.bootstrap_servers.clone(),
        ));
        if let Some(protocol) = &cluster.security_protocol {
            out.push(env("KAFKA_SECURITY_PROTOCOL", protocol.clone()));
        }
    }
    // Every cluster the plan touches, by name, for sinks on other clusters.
    let mut clusters = serde_json::Map::new();
    for topic in desired {
        if let Some(cluster) = ctx.config.kafka_clusters.get(&topic.cluster) {
            clusters.insert(
                topic.cluster.clone(),
                json!({
                    "bootstrapServers": cluster.bootstrap_servers,
                    "securityProtocol": cluster.security_protocol,
                    "saslMechanism": cluster.sasl.as_ref().map(|s| s.mechanism.clone()),
                }),
            );
        }
    }
    out.push(env(
        "KEYSTONE_KAFKA_CLUSTERS",
        serde_json::Value::Object(clusters).to_string(),
    ));
    out
}

/// The source cluster's security settings for the runtime pods, with a digest
/// of the Secret data they read (from the pipeline's namespace), so that a
/// rotated credential rolls them.
async fn runtime_security(ctx: &Context, plan: &Plan) -> resources::RuntimeSecurity {
    let Some(cluster) = ctx
        .config
        .resolve_cluster(plan.source.cluster.as_deref())
        .and_then(|c| ctx.config.kafka_clusters.get(&c))
    else {
        return resources::RuntimeSecurity::default();
    };
    // With per-pipeline ACLs, the pods authenticate as the pipeline's own principal.
    let cluster = &if cluster.per_pipeline_acls() {
        crate::acls::runtime_cluster(cluster, &plan.pipeline)
    } else {
        cluster.clone()
    };
    let mut security = resources::runtime_security(cluster);
    let keys = resources::referenced_secret_keys(cluster);
    if keys.is_empty() {
        return security;
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &plan.namespace);
    let mut secrets = BTreeMap::new();
    for key in &keys {
        if secrets.contains_key(&key.secret) {
            continue;
        }
        match api.get_opt(&key.secret).await {
            Ok(Some(secret)) => {
                secrets.insert(key.secret.clone(), secret);
            }
            // Absent: the pods wait for it; its creation changes the digest.
            Ok(None) => {}
            // Not allowed to read it (an older chart's RBAC): no digest, and
            // rotations need a restart of the pods, as before.
            Err(error) => {
                warn!(secret = %key.secret, %error, "cannot read a Kafka credential Secret; its rotation will not roll the pods");
                return security;
            }
        }
    }
    security.annotations.insert(
        resources::ANNOTATION_CREDENTIALS_HASH.to_owned(),
        resources::credentials_hash(&keys, &secrets),
    );
    security
}

async fn ssa<K>(api: &Api<K>, object: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = ()>
        + k8s_openapi::Resource
        + serde::Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    let name = object.meta().name.clone().ok_or(Error::MissingField {
        kind: K::KIND,
        field: "metadata.name",
    })?;
    let value = resources::with_type_meta(object).map_err(|source| Error::Serialize {
        what: K::KIND,
        source,
    })?;
    Ok(api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&value),
        )
        .await?)
}

/// What to run: usually the spec's plan; during a rollback the last stable one.
pub(super) struct Target {
    pub(super) plan: Plan,
    /// The spec the plan came from (its image, resources and strategy are used).
    pub(super) spec: PipelineSpec,
    /// Instances per stage instead of the plan's parallelism.
    pub(super) replicas: Option<i32>,
    /// The restore ConfigMap the instances apply.
    pub(super) restore: Option<String>,
    /// Plan hashes whose ConfigMaps must stay (the last stable one, for a rollback).
    pub(super) keep_plans: Vec<String>,
}

/// Applies the plan ConfigMap and each stage's Deployment, Service and
/// PodDisruptionBudget, removes those of stages the plan no longer has, and
/// reports each stage's replicas.
pub(super) async fn apply_workloads(
    pipeline: &Pipeline,
    ctx: &Context,
    target: &Target,
    desired: &[DesiredTopic],
) -> Result<Workloads, Error> {
    let plan = &target.plan;
    let namespace = plan.namespace.as_str();
    let owner = controller_owner(pipeline)?;
    let plan_json = resources::plan_json(plan).map_err(|e| Error::fit("plan", e))?;
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    ssa(
        &config_maps,
        &resources::plan_config_map(plan, plan_json, &owner),
    )
    .await?;
    crate::control::ensure_secret(ctx, namespace, &plan.pipeline, &owner).await?;
    if let Some(config) = ctx.config.network_policy.as_ref().filter(|c| c.enabled) {
        let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), namespace);
        ssa(
            &policies,
            &resources::network_policy(
                &plan.pipeline,
                namespace,
                &ctx.operator_namespace,
                config,
                &owner,
            ),
        )
        .await?;
    }

    let params = WorkloadParams {
        owner: owner.clone(),
        image: target
            .spec
            .runtime_image
            .clone()
            .unwrap_or_else(|| ctx.config.runtime_image().to_owned()),
        image_pull_policy: ctx.config.runtime_image_pull_policy.clone(),
        resources: target
            .spec
            .resources
            .clone()
            .or_else(|| ctx.config.runtime_resources.clone()),
        strategy: target.spec.upgrade.strategy,
        kafka_env: kafka_env(ctx, desired, plan),
        security: runtime_security(ctx, plan).await,
        bind_host: ctx.config.runtime_bind_address.clone(),
        replicas: target.replicas,
        restore: target.restore.clone(),
    };
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), namespace);
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), namespace);
    let mut stages = Vec::new();
    let mut rolled_out = true;
    let mut failing = Vec::new();
    for stage in &plan.stages {
        let applied = ssa(&deployments, &resources::deployment(plan, stage, &params)).await?;
        ssa(&services, &resources::service(plan, stage, &owner)).await?;
        ssa(
            &budgets,
            &resources::pod_disruption_budget(plan, stage, &owner),
        )
        .await?;
        let status = applied.status.clone().unwrap_or_default();
        let generation = applied.metadata.generation.unwrap_or_default();
        // The Deployment controller gives up on a rollout after its progress deadline.
        if status.conditions.iter().flatten().any(|c| {
            c.type_ == "Progressing"
                && c.status == "False"
                && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        }) {
            failing.push(stage.name.clone());
        }
        let replicas = target.replicas.unwrap_or(stage.parallelism);
        if status.observed_generation.unwrap_or_default() < generation
            || status.updated_replicas.unwrap_or_default() < replicas
            || status.replicas.unwrap_or_default() > replicas
        {
            rolled_out = false;
        }
        stages.push(StageStatus {
            name: stage.name.clone(),
            steps: stage.steps.iter().map(|s| s.name.clone()).collect(),
            replicas,
            ready_replicas: status.ready_replicas.unwrap_or_default(),
        });
    }

    let mut wanted: Vec<String> = plan
        .stages
        .iter()
        .map(|s| resources::stage_object_name(&plan.pipeline, &s.name))
        .collect();
    // The capture that writes the source topic: one instance, counted as a
    // stage so that the pipeline is ready only when it streams.
    if let (Some(_), Some(postgres)) = (&plan.capture, &target.spec.source.postgres) {
        let applied = ssa(
            &deployments,
            &resources::capture_deployment(plan, &postgres.credentials_secret, &params),
        )
        .await?;
        rolled_out &= source_component(
            plan,
            &applied,
            resources::CAPTURE_COMPONENT,
            &mut stages,
            &mut wanted,
        );
    }
    // The HTTP ingest endpoint that writes the source topic, with its
    // Service; counted as a stage as the capture is.
    let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), namespace);
    if let Some(http) = &plan.ingest {
        let params = WorkloadParams {
            resources: ctx
                .config
                .ingest
                .resources
                .clone()
                .or_else(|| params.resources.clone()),
            ..params.clone()
        };
        let applied = ssa(
            &deployments,
            &resources::ingest_deployment(plan, http, &params),
        )
        .await?;
        ssa(&services, &resources::ingest_service(plan, http, &owner)).await?;
        if ctx
            .config
            .network_policy
            .as_ref()
            .is_some_and(|c| c.enabled)
        {
            let (port, _) = resources::ingest_port(http);
            ssa(
                &policies,
                &resources::ingest_network_policy(&plan.pipeline, namespace, port, &owner),
            )
            .await?;
        }
        if let Some(ingress) = ingest_ingress_config(ctx) {
            let ingresses: Api<Ingress> = Api::namespaced(ctx.client.clone(), namespace);
            ssa(
                &ingresses,
                &resources::ingest_ingress(ingress, plan, http, &owner),
            )
            .await?;
        }
        rolled_out &= source_component(
            plan,
            &applied,
            resources::INGEST_COMPONENT,
            &mut stages,
            &mut wanted,
        );
    }
    let sweep = Sweep {
        ctx,
        namespace,
        uid: pipeline.uid().unwrap_or_default(),
        selector: format!(
            "{LABEL_PIPELINE}={},{LABEL_MANAGED_BY}={MANAGED_BY}",
            plan.pipeline
        ),
        // A stage the last status recorded and the plan no longer has may have
        // been applied so recently that its watch has not reported it yet.
        ask_server: recorded_stages_differ(pipeline, plan, &wanted),
    };
    let unwanted = |name: &str| !wanted.iter().any(|w| w == name);
    sweep
        .remove(&deployments, OwnedKind::Deployment, unwanted)
        .await?;
    sweep
        .remove(&services, OwnedKind::Service, unwanted)
        .await?;
    sweep
        .remove(&budgets, OwnedKind::PodDisruptionBudget, unwanted)
        .await?;
    // Plan ConfigMaps of earlier versions go once every stage runs the current
    // one, except those a rollback may need. Checkpoints and restores are not plans.
    if rolled_out {
        let keep: Vec<String> = std::iter::once(plan.hash())
            .chain(target.keep_plans.iter().cloned())
            .map(|hash| resources::plan_config_map_name(&plan.pipeline, &hash))
            .collect();
        let plans_prefix = resources::plan_config_map_name(&plan.pipeline, "");
        let unwanted =
            |name: &str| name.starts_with(&plans_prefix) && !keep.iter().any(|k| k == name);
        sweep
            .remove(&config_maps, OwnedKind::ConfigMap, unwanted)
            .await?;
    }
    Ok(Workloads {
        stages,
        rolled_out,
        failing,
    })
}

/// The status of the pipeline's HTTP ingest endpoint, if it has one; the
/// NetworkPolicy that opened the endpoint of one it no longer has, and an
/// Ingress no longer wanted, are removed.
pub(super) async fn ingest_status(
    ctx: &Context,
    pipeline: &Pipeline,
    plan: &Plan,
    old: Option<&PipelineStatus>,
) -> Result<Option<IngestStatus>, Error> {
    let namespace = pipeline.namespace().unwrap_or_default();
    let had = old.and_then(|s| s.ingest.as_ref());
    let ingress = ingest_ingress_config(ctx);
    // An Ingress made before (the endpoint, or the chart's ingress, since
    // removed) goes; its name is known from the status that reported it.
    if had.is_some_and(|h| h.ingress_url.is_some()) && (plan.ingest.is_none() || ingress.is_none())
    {
        let ingresses: Api<Ingress> = Api::namespaced(ctx.client.clone(), &namespace);
        let name = resources::ingest_ingress_name(&plan.pipeline);
        match delete_if_present(&ingresses, &name).await {
            // The chart's ingress turned off takes the operator's right to
            // Ingresses with it: the object stays until its Pipeline goes.
            Err(Error::Kube(kube::Error::Api(status))) if status.code == 403 => {
                tracing::warn!(pipeline = %plan.pipeline, ingress = %name, "the Ingress of an ingest endpoint is no longer wanted but the operator may not delete it; delete it by hand")
            }
            other => other?,
        }
    }
    if let Some(http) = &plan.ingest {
        return Ok(Some(IngestStatus {
            url: resources::ingest_service_url(plan, http),
            ingress_url: ingress.map(|i| resources::ingest_ingress_url(i, plan, http)),
        }));
    }
    if had.is_some() {
        let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &namespace);
        delete_if_present(
            &policies,
            &resources::ingest_network_policy_name(&plan.pipeline),
        )
        .await?;
    }
    Ok(None)
}

/// The chart's Ingress for ingest endpoints, when enabled.
fn ingest_ingress_config(ctx: &Context) -> Option<&crate::config::IngestIngressConfig> {
    ctx.config.ingest.ingress.as_ref().filter(|i| i.enabled)
}

/// Deletes `name`; one already gone is no error.
async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Records a component that writes the source topic (the capture, the
/// ingest endpoint) among the stages and the wanted objects; returns whether
/// its Deployment has rolled out.
fn source_component(
    plan: &Plan,
    applied: &Deployment,
    component: &str,
    stages: &mut Vec<StageStatus>,
    wanted: &mut Vec<String>,
) -> bool {
    let replicas = applied.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = applied.status.clone().unwrap_or_default();
    stages.push(StageStatus {
        name: component.to_owned(),
        steps: Vec::new(),
        replicas,
        ready_replicas: status.ready_replicas.unwrap_or_default(),
    });
    wanted.push(resources::stage_object_name(&plan.pipeline, component));
    status.updated_replicas.unwrap_or_default() >= replicas
        && status.replicas.unwrap_or_default() <= replicas
}

pub(super) struct Workloads {
    pub(super) stages: Vec<StageStatus>,
    pub(super) rolled_out: bool,
    /// Stages whose rollout exceeded its progress deadline.
    pub(super) failing: Vec<String>,
}

/// Whether the status recorded stages (and source components) and they are
/// not the objects the plan wants now. None recorded is a first deploy, with
/// nothing stale but what a failed one left, which the index knows by now.
fn recorded_stages_differ(pipeline: &Pipeline, plan: &Plan, wanted: &[String]) -> bool {
    let recorded = pipeline.status.iter().flat_map(|s| &s.stages);
    let mut recorded: Vec<String> = recorded
        .map(|stage| resources::stage_object_name(&plan.pipeline, &stage.name))
        .collect();
    if recorded.is_empty() {
        return false;
    }
    let mut wanted = wanted.to_vec();
    recorded.sort();
    wanted.sort();
    recorded != wanted
}

/// Removes the objects a pipeline controls that it no longer wants.
struct Sweep<'a> {
    ctx: &'a Context,
    namespace: &'a str,
    uid: String,
    selector: String,
    /// Ask the API server which objects exist rather than the watches' index.
    ask_server: bool,
}

impl Sweep<'_> {
    /// Deletes the objects of `kind` this pipeline controls whose name is
    /// `unwanted`. The names come from the owned-object watches' index,
    /// unless it has not listed yet or `ask_server` is set (a list of
    /// metadata then, by label).
    async fn remove<K>(
        &self,
        api: &Api<K>,
        kind: OwnedKind,
        unwanted: impl Fn(&str) -> bool,
    ) -> Result<(), Error>
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    {
        let indexed = (!self.ask_server)
            .then(|| self.ctx.owned.names(self.namespace, kind, &self.uid))
            .flatten();
        let names = match indexed {
            Some(names) => names,
            None => self.listed(api).await?,
        };
        for name in names.iter().filter(|name| unwanted(name)) {
            info!(object = %name, "removing a stage the plan no longer has");
            delete_if_present(api, name).await?;
        }
        Ok(())
    }

    async fn listed<K>(&self, api: &Api<K>) -> Result<Vec<String>, Error>
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    {
        let listed = api
            .list_metadata(&ListParams::default().labels(&self.selector))
            .await?;
        Ok(listed
            .into_iter()
            .filter(|object| {
                object
                    .meta()
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.uid == self.uid && o.controller == Some(true))
            })
            .filter_map(|object| object.metadata.name)
            .collect())
    }
}
