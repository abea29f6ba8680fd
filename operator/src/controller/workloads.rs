//! The plan ConfigMap and per-stage Deployments, Services and PodDisruptionBudgets.

use super::*;

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

/// The source cluster's security settings for the runtime pods.
fn runtime_security(ctx: &Context, plan: &Plan) -> resources::RuntimeSecurity {
    ctx.config
        .resolve_cluster(plan.source.cluster.as_deref())
        .and_then(|c| ctx.config.kafka_clusters.get(&c))
        .map(resources::runtime_security)
        .unwrap_or_default()
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

/// Applies the plan ConfigMap and each stage's Deployment, Service and
/// PodDisruptionBudget, removes those of stages the plan no longer has, and
/// reports each stage's replicas.
pub(super) async fn apply_workloads(
    pipeline: &Pipeline,
    ctx: &Context,
    plan: &Plan,
    desired: &[DesiredTopic],
) -> Result<Workloads, Error> {
    let namespace = plan.namespace.as_str();
    let owner = pipeline
        .controller_owner_ref(&())
        .ok_or(Error::MissingField {
            kind: "Pipeline",
            field: "metadata.uid",
        })?;
    let plan_json = resources::plan_json(plan).map_err(|source| Error::Serialize {
        what: "plan",
        source,
    })?;
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    ssa(
        &config_maps,
        &resources::plan_config_map(plan, plan_json, &owner),
    )
    .await?;

    let params = WorkloadParams {
        owner: owner.clone(),
        image: pipeline
            .spec
            .runtime_image
            .clone()
            .unwrap_or_else(|| ctx.config.runtime_image().to_owned()),
        image_pull_policy: ctx.config.runtime_image_pull_policy.clone(),
        resources: pipeline
            .spec
            .resources
            .clone()
            .or_else(|| ctx.config.runtime_resources.clone()),
        strategy: pipeline.spec.upgrade.strategy,
        kafka_env: kafka_env(ctx, desired, plan),
        security: runtime_security(ctx, plan),
        bind_host: ctx.config.runtime_bind_address.clone(),
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
        if status.observed_generation.unwrap_or_default() < generation
            || status.updated_replicas.unwrap_or_default() < stage.parallelism
            || status.replicas.unwrap_or_default() > stage.parallelism
        {
            rolled_out = false;
        }
        stages.push(StageStatus {
            name: stage.name.clone(),
            steps: stage.steps.iter().map(|s| s.name.clone()).collect(),
            replicas: stage.parallelism,
            ready_replicas: status.ready_replicas.unwrap_or_default(),
        });
    }

    let wanted: Vec<String> = plan
        .stages
        .iter()
        .map(|s| resources::stage_object_name(&plan.pipeline, &s.name))
        .collect();
    let uid = pipeline.uid().unwrap_or_default();
    let selector = format!(
        "{LABEL_PIPELINE}={},{LABEL_MANAGED_BY}={MANAGED_BY}",
        plan.pipeline
    );
    remove_stale(&deployments, &selector, &wanted, &uid).await?;
    remove_stale(&services, &selector, &wanted, &uid).await?;
    remove_stale(&budgets, &selector, &wanted, &uid).await?;
    // Plan ConfigMaps of earlier versions go once every stage runs the current one.
    if rolled_out {
        let current = vec![resources::plan_config_map_name(
            &plan.pipeline,
            &plan.hash(),
        )];
        remove_stale(&config_maps, &selector, &current, &uid).await?;
    }
    Ok(Workloads {
        stages,
        rolled_out,
        failing,
    })
}

pub(super) struct Workloads {
    pub(super) stages: Vec<StageStatus>,
    pub(super) rolled_out: bool,
    /// Stages whose rollout exceeded its progress deadline.
    pub(super) failing: Vec<String>,
}

/// Deletes objects this pipeline controls that are not wanted any more.
async fn remove_stale<K>(
    api: &Api<K>,
    selector: &str,
    wanted: &[String],
    uid: &str,
) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    for object in api.list(&ListParams::default().labels(selector)).await? {
        let name = object.meta().name.clone().unwrap_or_default();
        let ours = object
            .meta()
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == uid && o.controller == Some(true));
        if ours && !wanted.contains(&name) {
            info!(object = %name, "removing a stage the plan no longer has");
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}
