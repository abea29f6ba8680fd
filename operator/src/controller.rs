//! The Pipeline and Processor controllers.
//!
//! Every Pipeline reconcile follows one order: observe (the Pipeline, its
//! Processors), validate (the contract checker; an invalid spec gets a
//! condition and a Warning event, nothing is deployed or deleted, and the
//! controller waits for a change), record status, act (topics, then the plan
//! ConfigMap and per-stage workloads), and record status again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, EnvVar, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use keystone_crds::pipeline::{
    Pipeline, PipelinePhase, PipelineStatus, StageStatus, TopicDeletionPolicy, TopicStatus,
};
use keystone_crds::processor::{Processor, ProcessorStatus};
use keystone_crds::{Plan, check_processor, compile};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::Mutex;
use tracing::{Instrument, info, info_span, warn};

use crate::config::OperatorConfig;
use crate::error::{Error, backoff};
use crate::kafka::{Admin, client_properties};
use crate::ledger::{LedgerStore, key as ledger_key};
use crate::metrics::Metrics;
use crate::resources::{self, LABEL_MANAGED_BY, LABEL_PIPELINE, MANAGED_BY, WorkloadParams};
use crate::status::{
    CONTRACTS_VALID, Cond, RUNTIME_READY, TOPICS_READY, differs, ready_stages, runtime_condition,
    set_condition, summarize, transitions,
};
use crate::topics::{
    DesiredTopic, Owner, Ownership, TopicProblem, TopicStep, decide, desired_topics,
    resolve_partitions,
};

/// The one field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "keystone-operator";
/// Present only on Pipelines with `topicDeletionPolicy: Delete`: deleting them
/// must wait until their topics are gone. `Retain` pipelines carry none, so
/// their namespace is never held up.
pub const FINALIZER: &str = "keystone.dev/delete-topics";
/// How long a deleted pipeline's topic cleanup may fail before the finalizer
/// is dropped anyway (with a Warning), so a namespace deletion never hangs
/// on an unreachable Kafka.
const CLEANUP_GRACE: Duration = Duration::from_secs(600);

/// Shared state of the controllers.
pub struct Context {
    pub client: Client,
    pub config: OperatorConfig,
    /// Where the ledger, the Lease and the Kafka credential Secrets live.
    pub operator_namespace: String,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub ledger: LedgerStore,
    admins: Mutex<HashMap<String, Admin>>,
    failures: std::sync::Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        config: OperatorConfig,
        operator_namespace: String,
        metrics: Metrics,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            ledger: LedgerStore::new(Api::namespaced(client.clone(), &operator_namespace)),
            client,
            config,
            operator_namespace,
            metrics,
            admins: Mutex::new(HashMap::new()),
            failures: std::sync::Mutex::new(HashMap::new()),
        }
    }

    async fn admin(&self, cluster: &str) -> Result<Admin, Error> {
        let mut admins = self.admins.lock().await;
        if let Some(admin) = admins.get(cluster) {
            return Ok(admin.clone());
        }
        let config = self
            .config
            .kafka_clusters
            .get(cluster)
            .ok_or(Error::MissingField {
                kind: "operator configuration",
                field: "kafkaClusters entry",
            })?;
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.operator_namespace);
        let props = client_properties(cluster, config, &secrets).await?;
        let admin = Admin::connect(cluster, &props)?;
        admins.insert(cluster.to_owned(), admin.clone());
        Ok(admin)
    }

    async fn publish(
        &self,
        pipeline: &Pipeline,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = KubeEvent {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note.chars().take(1000).collect()),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(e) = self
            .recorder
            .publish(&event, &pipeline.object_ref(&()))
            .await
        {
            warn!(error = %e, reason, "could not publish event");
        }
    }

    fn failure_count(&self, key: &str, failed: bool) -> u32 {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failed {
            let n = failures.entry(key.to_owned()).or_insert(0);
            *n += 1;
            *n
        } else {
            failures.remove(key);
            0
        }
    }
}

fn key_of<K: Resource>(object: &K) -> String {
    format!(
        "{}/{}",
        object.meta().namespace.as_deref().unwrap_or_default(),
        object.meta().name.as_deref().unwrap_or_default()
    )
}

/// The Pipeline reconcile entry: a span, a timer, then apply or cleanup.
pub async fn reconcile(pipeline: Arc<Pipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = key_of(pipeline.as_ref());
    let span = info_span!("reconcile", pipeline = %key, generation = pipeline.metadata.generation);
    async move {
        ctx.metrics
            .reconciles
            .with_label_values(&["pipeline"])
            .inc();
        let timer = ctx
            .metrics
            .duration
            .with_label_values(&["pipeline"])
            .start_timer();
        let result = if pipeline.metadata.deletion_timestamp.is_some() {
            cleanup(&pipeline, &ctx).await
        } else {
            match apply(&pipeline, &ctx).await {
                // The namespace is going: nothing new can be written there, and its
                // deletion will delete the Pipeline (then `cleanup` runs).
                Err(Error::Kube(kube::Error::Api(status)))
                    if status.code == 403 && status.message.contains("being terminated") =>
                {
                    Ok(Action::await_change())
                }
                other => other,
            }
        };
        timer.observe_duration();
        match &result {
            Ok(_) => {
                ctx.failure_count(&key, false);
            }
            Err(error) => {
                warn!(%error, "reconcile failed");
                ctx.metrics
                    .failures
                    .with_label_values(&["pipeline", error.metric_label()])
                    .inc();
            }
        }
        result
    }
    .instrument(span)
    .await
}

/// Transient errors back off exponentially per object, capped; permanent ones start slower.
pub fn error_policy(pipeline: Arc<Pipeline>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.failure_count(&key_of(pipeline.as_ref()), true);
    Action::requeue(backoff(failures, error.is_permanent()))
}

struct Observed {
    api: Api<Pipeline>,
    namespace: String,
    name: String,
    generation: Option<i64>,
    old: Option<PipelineStatus>,
    status: PipelineStatus,
}

impl Observed {
    fn set(&mut self, cond: &Cond) {
        set_condition(
            &mut self.status.conditions,
            cond,
            self.generation,
            Timestamp::now(),
        );
    }

    fn deployed_before(&self) -> bool {
        self.old
            .as_ref()
            .and_then(|s| s.plan_hash.as_ref())
            .is_some()
    }

    fn summarize(
        &mut self,
        contracts: &Cond,
        topics: Option<&Cond>,
        runtime: Option<&Cond>,
    ) -> PipelinePhase {
        let (phase, ready) = summarize(contracts, topics, runtime, self.deployed_before());
        self.set(&ready);
        self.status.phase = Some(phase);
        phase
    }

    /// Writes the status if it changed and publishes an event per transition.
    async fn record(&mut self, pipeline: &Pipeline, ctx: &Context) -> Result<(), Error> {
        self.status.observed_generation = self.generation;
        if !differs(self.old.as_ref(), &self.status) {
            return Ok(());
        }
        let patch = json!({ "status": self.status });
        self.api
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        let old_conditions = self
            .old
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        for t in transitions(&old_conditions, &self.status.conditions) {
            ctx.publish(pipeline, t.warning, &t.reason, "Reconcile", t.note)
                .await;
        }
        ctx.metrics
            .set_phase(
                &format!("{}/{}", self.namespace, self.name),
                self.status.phase,
            )
            .await;
        self.old = Some(self.status.clone());
        Ok(())
    }
}

async fn apply(pipeline: &Pipeline, ctx: &Context) -> Result<Action, Error> {
    // Observe.
    let namespace = pipeline.namespace().ok_or(Error::MissingField {
        kind: "Pipeline",
        field: "metadata.namespace",
    })?;
    let name = pipeline.name_any();
    let mut observed = Observed {
        api: Api::namespaced(ctx.client.clone(), &namespace),
        namespace: namespace.clone(),
        name: name.clone(),
        generation: pipeline.metadata.generation,
        old: pipeline.status.clone(),
        status: pipeline.status.clone().unwrap_or_default(),
    };
    let processors: Vec<Processor> = Api::<Processor>::namespaced(ctx.client.clone(), &namespace)
        .list(&ListParams::default())
        .await?
        .items;

    // Validate: an invalid spec deploys and deletes nothing, and waits for a change.
    if let Some(problem) = resources::name_problem(&name) {
        let contracts = Cond::new(CONTRACTS_VALID, false, "InvalidName", problem);
        observed.set(&contracts);
        observed.summarize(&contracts, None, None);
        observed.record(pipeline, ctx).await?;
        return Ok(Action::await_change());
    }
    let plan = match compile(pipeline, &processors) {
        Ok(plan) => plan,
        Err(errors) => {
            let contracts = Cond::new(
                CONTRACTS_VALID,
                false,
                "ContractsInvalid",
                errors.to_string(),
            );
            observed.set(&contracts);
            observed.summarize(&contracts, None, None);
            observed.record(pipeline, ctx).await?;
            return Ok(Action::await_change());
        }
    };
    let contracts = Cond::new(
        CONTRACTS_VALID,
        true,
        "ContractsValid",
        format!(
            "{} step(s) checked; {} stage(s), {} topic(s)",
            plan.stages.iter().map(|s| s.steps.len()).sum::<usize>(),
            plan.stages.len(),
            plan.topics.len()
        ),
    );
    observed.set(&contracts);
    let desired = match desired_topics(&plan, |c| ctx.config.resolve_cluster(c)) {
        Ok(desired) => desired,
        Err(unknown) => {
            let topics = Cond::new(
                TOPICS_READY,
                false,
                "UnknownCluster",
                format!(
                    "Kafka cluster(s) {} are not in the operator's configuration (configured: {})",
                    unknown.join(", "),
                    ctx.config
                        .kafka_clusters
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            observed.set(&topics);
            observed.summarize(&contracts, Some(&topics), None);
            observed.status.phase = Some(PipelinePhase::Invalid);
            observed.record(pipeline, ctx).await?;
            return Ok(Action::await_change());
        }
    };
    sync_finalizer(pipeline, &observed.api).await?;

    // Record what validation found before acting, so a slow or failing act
    // never hides it.
    if observed
        .old
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == CONTRACTS_VALID))
        .is_none_or(|c| c.status != "True")
    {
        observed.summarize(&contracts, None, None);
        observed.record(pipeline, ctx).await?;
    }

    // Act: topics first (the runtime needs them), then the workloads.
    let owner = Owner {
        namespace: namespace.clone(),
        name: name.clone(),
    };
    let outcome = match reconcile_topics(pipeline, ctx, &owner, &desired).await {
        Ok(outcome) => outcome,
        Err(error) => {
            let topics = Cond::new(TOPICS_READY, false, "KafkaUnavailable", error.to_string());
            observed.set(&topics);
            let runtime = find_cond(&observed.status, RUNTIME_READY);
            observed.summarize(&contracts, Some(&topics), runtime.as_ref());
            observed.record(pipeline, ctx).await?;
            return Err(error);
        }
    };
    observed.set(&outcome.condition);
    observed.status.topics = outcome.statuses;

    let runtime = if outcome.blocked {
        // The runtime keeps the version it runs; it cannot run the new plan without its topics.
        find_cond(&observed.status, RUNTIME_READY)
    } else {
        let Workloads {
            stages,
            rolled_out,
            failing,
        } = apply_workloads(pipeline, ctx, &plan, &desired).await?;
        let mut runtime = runtime_condition(&stages, rolled_out);
        if !runtime.ok && !failing.is_empty() {
            runtime = Cond::new(
                RUNTIME_READY,
                false,
                "InstancesFailing",
                format!(
                    "stages {} did not become ready within their progress deadline: {}",
                    failing.join(", "),
                    runtime.message
                ),
            );
        }
        observed.set(&runtime);
        observed.status.ready_stages = Some(ready_stages(&stages));
        observed.status.stages = stages;
        observed.status.plan_hash = Some(plan.hash());
        Some(runtime)
    };
    let phase = observed.summarize(&contracts, Some(&outcome.condition), runtime.as_ref());
    observed.record(pipeline, ctx).await?;

    Ok(match phase {
        // Kafka has no watch: look for drift now and then.
        PipelinePhase::Running => Action::requeue(Duration::from_secs(300)),
        _ => Action::requeue(Duration::from_secs(30)),
    })
}

fn find_cond(status: &PipelineStatus, type_: &'static str) -> Option<Cond> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| {
            Cond::new(
                type_,
                c.status == "True",
                c.reason.clone(),
                c.message.clone(),
            )
        })
}

/// Adds the finalizer when the pipeline deletes its topics, removes it otherwise.
async fn sync_finalizer(pipeline: &Pipeline, api: &Api<Pipeline>) -> Result<(), Error> {
    let wants = pipeline.spec.topic_deletion_policy == TopicDeletionPolicy::Delete;
    let has = pipeline.finalizers().iter().any(|f| f == FINALIZER);
    if wants == has {
        return Ok(());
    }
    let mut finalizers: Vec<String> = pipeline
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if wants {
        finalizers.push(FINALIZER.to_owned());
    }
    // The resourceVersion makes the patch fail, not clobber, if the list changed meanwhile.
    let patch = json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": pipeline.resource_version(),
        }
    });
    api.patch(
        &pipeline.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

struct TopicsOutcome {
    statuses: Vec<TopicStatus>,
    condition: Cond,
    blocked: bool,
}

async fn reconcile_topics(
    pipeline: &Pipeline,
    ctx: &Context,
    owner: &Owner,
    desired: &[DesiredTopic],
) -> Result<TopicsOutcome, Error> {
    let mut by_cluster: BTreeMap<&str, Vec<&DesiredTopic>> = BTreeMap::new();
    for topic in desired {
        by_cluster
            .entry(topic.cluster.as_str())
            .or_default()
            .push(topic);
    }
    let mut ledger = ctx.ledger.read().await?;
    let mut statuses = Vec::new();
    let mut problems = Vec::new();
    for (cluster, topics) in by_cluster {
        let admin = ctx.admin(cluster).await?;
        let names: Vec<String> = topics.iter().map(|t| t.name.clone()).collect();
        let partitions = admin.partitions(&names).await?;
        let mut observed = BTreeMap::new();
        for topic in &topics {
            if let Some(&count) = partitions.get(&topic.name) {
                let mine = ledger.ownership(cluster, &topic.name, owner) == Ownership::Mine;
                observed.insert(
                    topic.name.clone(),
                    admin
                        .observe(&topic.name, count, topic.create && mine)
                        .await?,
                );
            }
        }
        let owned_topics: Vec<DesiredTopic> = topics.iter().map(|t| (*t).clone()).collect();
        let resolved = resolve_partitions(&owned_topics, &observed);
        // Claim before creating: a crash in between leaves a claim, never an orphan.
        let to_claim: Vec<String> = topics
            .iter()
            .filter(|t| {
                t.create
                    && !observed.contains_key(&t.name)
                    && ledger.ownership(cluster, &t.name, owner) == Ownership::Unclaimed
            })
            .map(|t| ledger_key(cluster, &t.name))
            .collect();
        if !to_claim.is_empty() {
            ledger = ctx.ledger.claim(&to_claim, owner).await?;
        }
        for topic in topics {
            let ownership = ledger.ownership(cluster, &topic.name, owner);
            let decision = decide(
                topic,
                observed.get(&topic.name),
                &ownership,
                resolved.get(&topic.name).copied(),
            );
            let mut rejected = None;
            for step in &decision.steps {
                match execute(pipeline, ctx, &admin, topic, step).await {
                    Ok(()) => {}
                    Err(error) if error.is_spec_rejection() => {
                        rejected = Some(TopicProblem::Rejected {
                            error: error.to_string(),
                        });
                        break;
                    }
                    Err(error) => return Err(error),
                }
            }
            if let Some(problem) = rejected.as_ref().or(decision.problem.as_ref()) {
                problems.push((topic.name.clone(), problem.clone()));
            }
            statuses.push(TopicStatus {
                name: topic.name.clone(),
                role: topic.role.as_str().to_owned(),
                partitions: decision.partitions,
                // Claimed but not created yet (its partitions unknown) is not "created".
                created: decision.owned && decision.partitions.is_some(),
            });
        }
    }
    // A missing topic explains the ones whose partitions follow it: say it once.
    if problems.iter().any(|(_, p)| *p == TopicProblem::Missing) {
        problems.retain(|(_, p)| !matches!(p, TopicProblem::Unresolved { .. }));
    }
    let blocked = problems.iter().any(|(_, p)| p.blocks_runtime());
    let condition = match problems.first() {
        None => Cond::new(
            TOPICS_READY,
            true,
            "TopicsReady",
            format!("{} topic(s) exist as the plan needs them", statuses.len()),
        ),
        Some((_, first)) => Cond::new(
            TOPICS_READY,
            false,
            first.reason(),
            problems
                .iter()
                .map(|(name, p)| p.describe(name))
                .collect::<Vec<_>>()
                .join("; "),
        ),
    };
    Ok(TopicsOutcome {
        statuses,
        condition,
        blocked,
    })
}

async fn execute(
    pipeline: &Pipeline,
    ctx: &Context,
    admin: &Admin,
    topic: &DesiredTopic,
    step: &TopicStep,
) -> Result<(), Error> {
    match step {
        TopicStep::Create {
            partitions,
            replication_factor,
            config,
        } => {
            admin
                .create(&topic.name, *partitions, *replication_factor, config)
                .await?;
            info!(topic = %topic.name, partitions, "created topic");
            ctx.metrics
                .topic_changes
                .with_label_values(&["created"])
                .inc();
            ctx.publish(
                pipeline,
                false,
                "TopicCreated",
                "CreateTopic",
                format!(
                    "created {} topic {:?} on cluster {:?} with {partitions} partition(s)",
                    topic.role.as_str(),
                    topic.name,
                    topic.cluster
                ),
            )
            .await;
        }
        TopicStep::RaisePartitions { from, to } => {
            admin.raise_partitions(&topic.name, *to).await?;
            info!(topic = %topic.name, from, to, "raised partitions");
            ctx.metrics
                .topic_changes
                .with_label_values(&["partitions_raised"])
                .inc();
            ctx.publish(
                pipeline,
                false,
                "PartitionsRaised",
                "RaisePartitions",
                format!(
                    "raised topic {:?} from {from} to {to} partitions",
                    topic.name
                ),
            )
            .await;
        }
        TopicStep::CorrectConfig { config, drift } => {
            admin.set_config(&topic.name, config).await?;
            info!(topic = %topic.name, ?drift, "corrected topic config drift");
            ctx.metrics
                .topic_changes
                .with_label_values(&["config_corrected"])
                .inc();
            ctx.publish(
                pipeline,
                true,
                "TopicConfigDrift",
                "CorrectTopicConfig",
                format!(
                    "topic {:?} config differed from the spec and was corrected: {}",
                    topic.name,
                    drift.join(", ")
                ),
            )
            .await;
        }
    }
    Ok(())
}

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
async fn apply_workloads(
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

struct Workloads {
    stages: Vec<StageStatus>,
    rolled_out: bool,
    /// Stages whose rollout exceeded its progress deadline.
    failing: Vec<String>,
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

/// A deleted pipeline: with `Delete`, its created topics go, then the finalizer.
async fn cleanup(pipeline: &Pipeline, ctx: &Context) -> Result<Action, Error> {
    let key = key_of(pipeline);
    ctx.metrics.set_phase(&key, None).await;
    if !pipeline.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let namespace = pipeline.namespace().unwrap_or_default();
    let api: Api<Pipeline> = Api::namespaced(ctx.client.clone(), &namespace);
    if pipeline.spec.topic_deletion_policy == TopicDeletionPolicy::Delete {
        let owner = Owner {
            namespace: namespace.clone(),
            name: pipeline.name_any(),
        };
        match delete_owned_topics(pipeline, ctx, &owner).await {
            Ok(()) => {}
            Err(error) => {
                let since = pipeline
                    .metadata
                    .deletion_timestamp
                    .as_ref()
                    .map(|t| Timestamp::now().duration_since(t.0).unsigned_abs())
                    .unwrap_or_default();
                if since < CLEANUP_GRACE {
                    return Err(error);
                }
                ctx.publish(
                    pipeline,
                    true,
                    "TopicsNotDeleted",
                    "DeleteTopics",
                    format!(
                        "gave up deleting the pipeline's topics after {}s so that deletion can finish: {error}; delete them by hand",
                        since.as_secs()
                    ),
                )
                .await;
            }
        }
    }
    let finalizers: Vec<String> = pipeline
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    let patch = json!({ "metadata": { "finalizers": finalizers, "resourceVersion": pipeline.resource_version() } });
    match api
        .patch(
            &pipeline.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}

async fn delete_owned_topics(
    pipeline: &Pipeline,
    ctx: &Context,
    owner: &Owner,
) -> Result<(), Error> {
    let ledger = ctx.ledger.read().await?;
    let owned = ledger.owned_by(owner);
    let mut released = Vec::new();
    for (cluster, topic) in owned {
        if ctx.config.kafka_clusters.contains_key(&cluster) {
            let admin = ctx.admin(&cluster).await?;
            admin.delete(&topic).await?;
            ctx.metrics
                .topic_changes
                .with_label_values(&["deleted"])
                .inc();
            ctx.publish(
                pipeline,
                false,
                "TopicDeleted",
                "DeleteTopic",
                format!(
                    "deleted topic {topic:?} on cluster {cluster:?} (topicDeletionPolicy: Delete)"
                ),
            )
            .await;
        } else {
            warn!(%cluster, %topic, "cluster no longer configured; releasing the claim without deleting");
        }
        released.push(ledger_key(&cluster, &topic));
    }
    if !released.is_empty() {
        ctx.ledger.release(&released, owner).await?;
    }
    Ok(())
}

/// Processor reconcile: validate its declared contract and report which pipelines use it.
pub async fn reconcile_processor(
    processor: Arc<Processor>,
    ctx: Arc<ProcessorContext>,
) -> Result<Action, Error> {
    let key = key_of(processor.as_ref());
    let span = info_span!("reconcile", processor = %key);
    async move {
        let shared = &ctx.shared;
        shared
            .metrics
            .reconciles
            .with_label_values(&["processor"])
            .inc();
        let timer = shared
            .metrics
            .duration
            .with_label_values(&["processor"])
            .start_timer();
        let namespace = processor.namespace().unwrap_or_default();
        let name = processor.name_any();
        let mut used_by: Vec<String> = ctx
            .pipelines
            .state()
            .iter()
            .filter(|p| {
                p.namespace().as_deref() == Some(namespace.as_str()) && references(p, &name)
            })
            .map(|p| p.name_any())
            .collect();
        used_by.sort();
        let generation = processor.metadata.generation;
        let mut status = processor.status.clone().unwrap_or_default();
        let cond = match check_processor(&processor) {
            Ok(()) => Cond::new(
                "ContractValid",
                true,
                "ContractValid",
                "the declared contract agrees with the operator",
            ),
            Err(errors) => Cond::new(
                "ContractValid",
                false,
                "ContractInvalid",
                errors.to_string(),
            ),
        };
        set_condition(&mut status.conditions, &cond, generation, Timestamp::now());
        status.observed_generation = generation;
        status.operator = processor
            .spec
            .operator
            .single()
            .map(|op| op.kind().to_owned());
        status.used_by = used_by;
        let result = write_processor_status(&processor, &namespace, status, shared).await;
        timer.observe_duration();
        if let Err(error) = &result {
            shared
                .metrics
                .failures
                .with_label_values(&["processor", error.metric_label()])
                .inc();
        }
        // A Pipeline that stops referencing it does not wake it: look again now and then.
        result.map(|_| Action::requeue(Duration::from_secs(300)))
    }
    .instrument(span)
    .await
}

async fn write_processor_status(
    processor: &Processor,
    namespace: &str,
    status: ProcessorStatus,
    ctx: &Context,
) -> Result<(), Error> {
    let strip = |s: &ProcessorStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time =
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH);
        }
        s
    };
    if processor.status.as_ref().map(strip) == Some(strip(&status)) {
        return Ok(());
    }
    let api: Api<Processor> = Api::namespaced(ctx.client.clone(), namespace);
    api.patch_status(
        &processor.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({ "status": status })),
    )
    .await?;
    Ok(())
}

pub fn processor_error_policy(
    processor: Arc<Processor>,
    error: &Error,
    ctx: Arc<ProcessorContext>,
) -> Action {
    let failures = ctx
        .shared
        .failure_count(&format!("processor:{}", key_of(processor.as_ref())), true);
    Action::requeue(backoff(failures, error.is_permanent()))
}

pub struct ProcessorContext {
    pub shared: Arc<Context>,
    pub pipelines: Store<Pipeline>,
}

/// Whether a pipeline has a step that references the processor.
pub fn references(pipeline: &Pipeline, processor: &str) -> bool {
    pipeline.spec.steps.iter().any(|s| {
        s.processor_ref
            .as_ref()
            .is_some_and(|r| r.name == processor)
    })
}

/// The processors a pipeline references.
pub fn processors_used_by(pipeline: &Pipeline) -> Vec<ObjectRef<Processor>> {
    let namespace = pipeline.namespace();
    pipeline
        .spec
        .steps
        .iter()
        .filter_map(|s| s.processor_ref.as_ref())
        .map(|r| {
            let object = ObjectRef::<Processor>::new(&r.name);
            match &namespace {
                Some(ns) => object.within(ns),
                None => object,
            }
        })
        .collect()
}

/// The pipelines to re-reconcile when a processor changes.
pub fn pipelines_using(store: &Store<Pipeline>, processor: &Processor) -> Vec<ObjectRef<Pipeline>> {
    let namespace = processor.namespace();
    let name = processor.name_any();
    store
        .state()
        .iter()
        .filter(|p| p.namespace() == namespace && references(p, &name))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

fn api_for<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the Pipeline and Processor controllers for one namespace (None: all)
/// until shutdown.
pub async fn run_controllers(ctx: Arc<Context>, namespace: Option<String>) {
    let ns = namespace.as_deref();
    let client = &ctx.client;
    let owned = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}"));
    let pipelines = Controller::new(
        api_for::<Pipeline>(client, ns),
        watcher::Config::default().any_semantic(),
    );
    let store = pipelines.store();
    let mapper_store = store.clone();
    let pipeline_controller = pipelines
        .owns(api_for::<ConfigMap>(client, ns), owned.clone())
        .owns(api_for::<Deployment>(client, ns), owned.clone())
        .owns(api_for::<Service>(client, ns), owned.clone())
        .owns(api_for::<PodDisruptionBudget>(client, ns), owned)
        .watches(
            api_for::<Processor>(client, ns),
            watcher::Config::default(),
            move |processor| pipelines_using(&mapper_store, &processor),
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "pipeline reconcile error");
            }
        });

    let processor_ctx = Arc::new(ProcessorContext {
        shared: ctx.clone(),
        pipelines: store.clone(),
    });
    let processor_controller =
        Controller::new(api_for::<Processor>(client, ns), watcher::Config::default())
            // A Pipeline that starts referencing a Processor changes its usedBy.
            .watches(
                api_for::<Pipeline>(client, ns),
                watcher::Config::default(),
                |pipeline| processors_used_by(&pipeline),
            )
            .shutdown_on_signal()
            .run(reconcile_processor, processor_error_policy, processor_ctx)
            .for_each(|result| async move {
                if let Err(error) = result {
                    tracing::debug!(%error, "processor reconcile error");
                }
            });
    info!(namespace = ns.unwrap_or("(all)"), "controllers started");
    futures::join!(pipeline_controller, processor_controller);
}
