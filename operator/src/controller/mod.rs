//! The Pipeline and Processor controllers.
//!
//! Every Pipeline reconcile follows one order: observe (the Pipeline, its
//! Processors), validate (the contract checker; an invalid spec gets a
//! condition and a Warning event, nothing is deployed or deleted, and the
//! controller waits for a change), record status, act (topics, then the plan
//! ConfigMap and per-stage workloads), and record status again.

mod capture_first;
mod cycles;
mod deletion;
mod object_key;
mod owned;
mod processor;
mod provision;
mod schemas;
mod upgrade;
mod wakes;
mod workloads;

pub use deletion::FINALIZER;
use deletion::{cleanup, sync_finalizer};
pub(crate) use owned::OwnedObjects;
pub use processor::{
    ProcessorContext, pipelines_using, processor_error_policy, reconcile_processor, references,
    usage_changes,
};
use provision::reconcile_topics;
use schemas::{registry_problem, registry_summary};
use upgrade::Prepared;
pub use upgrade::{ANNOTATION_ADOPT_STATE, STATE_ORIGIN, STATE_OWNERS};
use wakes::Watched;
use workloads::{apply_workloads, ingest_status};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, EnvVar, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use keystone_crds::pipeline::{
    Pipeline, PipelinePhase, PipelineSpec, PipelineState, PipelineStatus, StageStatus, TopicStatus,
    UpgradePhase,
};
use keystone_crds::processor::{Processor, ProcessorStatus};
use keystone_crds::{
    ContractErrors, Plan, SourceFacts, check_processor, compile, compile_with_facts,
};

use crate::registry::{Problem, REGISTRY_RECHECK, Resolved, SCHEMA_REGISTRY};
use kube::api::{DeleteParams, ListParams, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::utils::ResetTimerBackoff;
use kube::runtime::watcher::ExponentialBackoff;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use crate::checkpoint;
use crate::context::{Context, FIELD_MANAGER};
use crate::error::{Error, backoff};
use crate::ledger::key as ledger_key;
use crate::resources::{self, LABEL_MANAGED_BY, LABEL_PIPELINE, MANAGED_BY, WorkloadParams};
use crate::status::{
    CONTRACTS_VALID, Cond, RUNTIME_READY, SOURCE_TABLE, TOPICS_READY, differs, ready_stages,
    runtime_condition, set_condition, summarize, transitions,
};
use crate::tables::TableCheck;
use crate::topics::{
    DesiredTopic, Owner, Ownership, TopicProblem, TopicStep, decide, desired_topics,
    resolve_partitions,
};

/// How often a pipeline whose topics are fine looks for drift in Kafka.
const DRIFT_CHECK: Duration = Duration::from_secs(300);
/// How often a pipeline with a topic problem (missing, conflicting, refused) looks again.
const TOPIC_RECHECK: Duration = Duration::from_secs(30);
/// How often the status follows a capture's snapshot in progress.
const CAPTURE_POLL: Duration = Duration::from_secs(10);
/// How often a capture's table, refusals and retained WAL are looked at.
const CAPTURE_RECHECK: Duration = Duration::from_secs(30);
/// How soon an Iceberg table that was incompatible or could not be checked
/// is checked again.
const TABLE_RECHECK: Duration = Duration::from_secs(30);

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
        // Inside kube's span, which names why it runs:
        // `RUST_LOG=kube_runtime::controller=info,keystone_operator::controller=debug`.
        tracing::debug!("reconcile started");
        ctx.metrics
            .reconciles
            .with_label_values(&["pipeline"])
            .inc();
        let timer = ctx
            .metrics
            .duration
            .with_label_values(&["pipeline"])
            .start_timer();
        let work = async {
            if pipeline.metadata.deletion_timestamp.is_some() {
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
            }
        };
        let result = warn_when_slow(work).await;
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
/// A reconcile that runs this long is waiting on something (a request the
/// API server or a broker does not answer): said once, so that a pipeline the
/// operator seems to ignore shows where it is held.
const SLOW_RECONCILE: Duration = Duration::from_secs(90);

/// Runs a reconcile to its end, warning (within its span) when it takes longer
/// than [`SLOW_RECONCILE`].
async fn warn_when_slow<T>(work: impl std::future::Future<Output = T>) -> T {
    let mut work = std::pin::pin!(work);
    match tokio::time::timeout(SLOW_RECONCILE, &mut work).await {
        Ok(done) => done,
        Err(_) => {
            warn!(
                after_secs = SLOW_RECONCILE.as_secs(),
                "reconcile still running; waiting for it to finish"
            );
            work.await
        }
    }
}

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
    /// A background checkpoint this reconcile collected; `upgrade::prepare`
    /// takes the stop checkpoint it was waiting for.
    finished_checkpoint: Option<checkpoint::Finished>,
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
        // Also after a restart, when nothing changes: the gauge starts empty.
        ctx.metrics
            .set_phase(
                &format!("{}/{}", self.namespace, self.name),
                self.status.phase,
            )
            .await;
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
        self.old = Some(self.status.clone());
        Ok(())
    }
}

async fn apply(pipeline: &Pipeline, ctx: &Arc<Context>) -> Result<Action, Error> {
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
        finished_checkpoint: None,
    };
    let processors = ctx.processors_in(&namespace).await?;

    // Validate: an invalid spec deploys and deletes nothing, and waits for a change.
    if let Some(problem) = resources::name_problem(&name) {
        let contracts = Cond::new(CONTRACTS_VALID, false, "InvalidName", problem);
        observed.set(&contracts);
        observed.summarize(&contracts, None, None);
        observed.record(pipeline, ctx).await?;
        return Ok(Action::await_change());
    }
    // Pipelines feeding each other through topics are refused like a broken
    // contract: the condition names the other pipelines, nothing is deployed.
    let known = ctx.known_pipelines().await?;
    let default_cluster = ctx.config.resolve_cluster(None);
    let cycles = cycles::cycle_errors(pipeline, &known, default_cluster.as_deref());
    // A capture describes its table (or says why it refuses it): read before
    // the check, which takes the source schema's columns from the table.
    let postgres = pipeline.spec.source.postgres.as_ref();
    let previous_table = match postgres {
        Some(_) => {
            crate::capture::refresh(ctx, &namespace, &name, &mut observed.status.capture).await
        }
        None => None,
    };
    // Only a table the spec captures counts (the spec may have moved on).
    let source_table = postgres.and_then(|postgres| {
        let table = observed.status.capture.as_ref()?.table.as_ref()?;
        postgres.captures(table).then(|| table.clone())
    });
    // An Avro source is checked against the schema its producers registered;
    // a registry that does not answer leaves what runs alone.
    let avro = match crate::registry::resolve(ctx, pipeline).await {
        Ok(resolved) => resolved,
        Err(Problem::Unavailable(message)) => {
            match schemas::deployed_unchanged(pipeline, ctx, &observed.status).await? {
                Some(deployed) => {
                    let condition =
                        Cond::new(SCHEMA_REGISTRY, false, "RegistryUnavailable", message);
                    observed.set(&condition);
                    Resolved::Unreachable {
                        deployed: Box::new(deployed),
                    }
                }
                None => {
                    let problem = Problem::Unavailable(message);
                    return registry_problem(pipeline, ctx, &mut observed, problem).await;
                }
            }
        }
        Err(problem) => {
            return registry_problem(pipeline, ctx, &mut observed, problem).await;
        }
    };
    let reader = match &avro {
        Resolved::Ready { reader, .. } => reader.as_ref(),
        Resolved::NotAvro | Resolved::Unreachable { .. } => None,
    };
    let checked = match &avro {
        // The plan that runs was checked when it was deployed.
        Resolved::Unreachable { deployed } => Ok(Plan::clone(deployed)),
        _ => compile_with_facts(
            pipeline,
            &processors,
            &SourceFacts {
                table: source_table.as_ref(),
                registered: reader.map(|r| &r.registered),
            },
        ),
    };
    if let Some(postgres) = postgres {
        // Without a table both checks are the same: no error is the table's.
        let table_errors = match &checked {
            Err(with_table) if source_table.is_some() => crate::capture::table_errors(
                with_table,
                compile(pipeline, &processors).err().as_ref(),
            ),
            _ => Vec::new(),
        };
        let current = find_cond(&observed.status, SOURCE_TABLE);
        let conditions = crate::capture::conditions(
            postgres,
            observed.status.capture.as_deref(),
            previous_table.as_ref(),
            &table_errors,
            current.as_ref(),
        );
        for condition in conditions {
            observed.set(&condition);
        }
    }
    // Never deployed, and the table not described yet: the capture runs
    // alone until it is, then the steps are checked against its columns.
    if cycles.is_empty()
        && capture_first::wanted(pipeline, &observed.status)
        && let Some(action) = capture_first::run(pipeline, ctx, &mut observed).await?
    {
        return Ok(action);
    }
    let compiled = match (checked, cycles.is_empty()) {
        (Ok(plan), true) => Ok(plan),
        (Ok(_), false) => Err(("TopicCycle", ContractErrors(cycles))),
        (Err(mut errors), _) => {
            errors.0.extend(cycles);
            Err(("ContractsInvalid", errors))
        }
    };
    let mut plan = match compiled {
        Ok(plan) => plan,
        Err((reason, errors)) => {
            let contracts = Cond::new(CONTRACTS_VALID, false, reason, errors.to_string());
            observed.set(&contracts);
            observed.summarize(&contracts, None, None);
            observed.record(pipeline, ctx).await?;
            // The table may change back without a change in Kubernetes.
            if source_table.is_some() {
                return Ok(Action::requeue(CAPTURE_RECHECK));
            }
            return Ok(Action::await_change());
        }
    };
    // The sinks' schemas are asked about before anything is deployed: an
    // incompatible output change is refused, and what runs goes on.
    if let Resolved::Ready {
        spec,
        registry,
        reader,
    } = &avro
    {
        if let Err(problem) =
            crate::registry::complete(&mut plan, spec, registry, reader.as_ref()).await
        {
            return registry_problem(pipeline, ctx, &mut observed, problem).await;
        }
        observed.set(&Cond::new(
            SCHEMA_REGISTRY,
            true,
            "SchemasResolved",
            registry_summary(&plan),
        ));
    }
    // The operator's policy (the chart's allow-lists and quotas) is refused
    // like a broken contract: the condition names the field and the limit, and
    // nothing is created with the operator's credentials.
    let violations =
        ctx.config
            .policy
            .violations(&pipeline.spec, &plan, ctx.config.runtime_image());
    if !violations.is_empty() {
        let message = violations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let contracts = Cond::new(CONTRACTS_VALID, false, "PolicyViolation", message);
        observed.set(&contracts);
        observed.summarize(&contracts, None, None);
        observed.record(pipeline, ctx).await?;
        return Ok(Action::await_change());
    }
    // A plan that cannot be stored cannot run: refused like a broken contract,
    // naming its size, before anything is created.
    if let Err(resources::FitError::TooLarge(too_large)) = resources::plan_json(&plan) {
        let contracts = Cond::new(
            CONTRACTS_VALID,
            false,
            "PlanTooLarge",
            too_large.to_string(),
        );
        observed.set(&contracts);
        observed.summarize(&contracts, None, None);
        observed.record(pipeline, ctx).await?;
        return Ok(Action::await_change());
    }
    // An existing Iceberg table that cannot take the contract's rows is
    // refused like a broken contract: its sink would refuse to start. Nothing
    // in Kubernetes changes when the table is fixed, so it is looked at again.
    let tables = crate::tables::check_tables(&plan).await;
    let table_recheck = tables
        .iter()
        .any(TableCheck::wants_recheck)
        .then_some(TABLE_RECHECK);
    let incompatible: Vec<String> = tables
        .iter()
        .filter(|t| t.is_incompatible())
        .map(ToString::to_string)
        .collect();
    if !incompatible.is_empty() {
        let contracts = Cond::new(
            CONTRACTS_VALID,
            false,
            "TableIncompatible",
            incompatible.join("; "),
        );
        observed.set(&contracts);
        observed.summarize(&contracts, None, None);
        observed.record(pipeline, ctx).await?;
        return Ok(Action::requeue(TABLE_RECHECK));
    }
    let mut checked = format!(
        "{} step(s) checked; {} stage(s), {} topic(s)",
        plan.stages.iter().map(|s| s.steps.len()).sum::<usize>(),
        plan.stages.len(),
        plan.topics.len()
    );
    for table in &tables {
        checked.push_str(&format!("; {table}"));
    }
    let contracts = Cond::new(CONTRACTS_VALID, true, "ContractsValid", checked);
    observed.set(&contracts);
    let desired = match desired_topics(&plan, pipeline.spec.checkpoint_retention, |c| {
        ctx.config.resolve_cluster(c)
    }) {
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
    let has_principal = crate::acls::acl_cluster(ctx, plan.source.cluster.as_deref()).is_some();
    sync_finalizer(pipeline, &observed.api, has_principal).await?;

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
    let mut rolled_out_plan: Option<Plan> = None;

    // A background checkpoint that finished is recorded before anything else
    // happens to the pipeline; one still running holds what would stop or
    // replace its instances (`upgrade::prepare`).
    observed.finished_checkpoint =
        checkpoint::collect_finished(ctx, pipeline, &plan, &mut observed.status).await;
    if let Some(orphan) =
        checkpoint::recover_orphaned(ctx, pipeline, &plan, &mut observed.status).await
    {
        observed.finished_checkpoint = Some(orphan);
    }

    let mut again: Option<Duration> = None;
    // A snapshot in progress is followed every 10 s; the table's columns,
    // the capture's refusals and the WAL it holds back every 30 s, whatever
    // an upgrade is doing.
    let capture_poll = plan.capture.as_ref().map(|_| {
        let snapshot_running = observed
            .status
            .capture
            .as_ref()
            .is_some_and(|c| !c.snapshot_done);
        if snapshot_running {
            CAPTURE_POLL
        } else {
            CAPTURE_RECHECK
        }
    });
    // The plan hash and replicas just deployed, if any.
    let mut deployed: Option<(String, Option<i32>)> = None;
    let runtime = if outcome.blocked {
        // The runtime keeps the version it runs; it cannot run the new plan without its topics.
        find_cond(&observed.status, RUNTIME_READY)
    } else {
        match upgrade::prepare(pipeline, ctx, &plan, &mut observed, &desired).await? {
            Prepared::Hold(wait) => {
                again = Some(wait);
                find_cond(&observed.status, RUNTIME_READY)
            }
            Prepared::Deploy(target) => {
                let hash = target.plan.hash();
                deployed = Some((hash.clone(), target.replicas));
                // Write-ahead: a plan replacing the one recorded is recorded
                // (with the checkpoint it starts from) before any workload runs
                // it, so that an operator stopped in between is succeeded by
                // one that knows which plan the pods run.
                let replaces = observed
                    .old
                    .as_ref()
                    .and_then(|old| old.plan_hash.as_deref())
                    .is_some_and(|old| old != hash);
                observed.status.plan_hash = Some(hash);
                if replaces {
                    let generation = pipeline.metadata.generation.unwrap_or_default();
                    if let Some(upgrading) = upgrade::phase_override(&observed.status, generation) {
                        observed.status.phase = Some(upgrading);
                    }
                    observed.record(pipeline, ctx).await?;
                }
                // The pipeline's own principal and ACLs, before pods use them.
                crate::acls::reconcile_pipeline(ctx, pipeline, &target.plan).await?;
                let workloads = apply_workloads(pipeline, ctx, &target, &desired).await?;
                observed.status.ingest =
                    ingest_status(ctx, pipeline, &target.plan, observed.old.as_ref()).await?;
                let mut runtime = runtime_condition(&workloads.stages, workloads.rolled_out);
                if !runtime.ok && !workloads.failing.is_empty() {
                    runtime = Cond::new(
                        RUNTIME_READY,
                        false,
                        "InstancesFailing",
                        format!(
                            "stages {} did not become ready within their progress deadline: {}",
                            workloads.failing.join(", "),
                            runtime.message
                        ),
                    );
                }
                observed.set(&runtime);
                observed.status.ready_stages = Some(ready_stages(&workloads.stages));
                observed.status.stages = workloads.stages.clone();
                again = upgrade::observe(pipeline, ctx, &target, &workloads, &mut observed).await?;
                if workloads.rolled_out
                    && observed.status.upgrade.as_ref().is_none_or(|u| {
                        !matches!(u.phase, UpgradePhase::Deploying | UpgradePhase::RollingBack)
                    })
                {
                    rolled_out_plan = Some(target.plan.clone());
                }
                Some(runtime)
            }
        }
    };
    // A stop checkpoint nothing took (the spec changed again while it ran, or
    // the topics are blocked): its instances must not stay stopped. One left
    // unfinished by a predecessor may have stopped them too: they are resumed
    // when the plan it was taken of keeps running as it is (instances being
    // replaced or scaled to zero are left alone).
    if let Some(unused) = observed.finished_checkpoint.take()
        && unused.purpose == checkpoint::Purpose::Stop
        && (unused.result.is_ok() && !unused.orphan
            || unused.orphan
                && deployed.as_ref().is_some_and(|(hash, replicas)| {
                    *hash == unused.plan_hash && *replicas != Some(0)
                }))
    {
        info!(pipeline = %name, checkpoint = ?unused.result, "resuming the instances a stop checkpoint left that is no longer needed");
        checkpoint::resume_in_background(
            ctx,
            &unused.plan,
            "a stop checkpoint no longer needed left",
        );
    }
    let generation = pipeline.metadata.generation.unwrap_or_default();
    let mut phase = observed.summarize(&contracts, Some(&outcome.condition), runtime.as_ref());
    // Suspended once scaled to zero (or still, while nothing is deployed), not
    // while the suspend's checkpoint is being taken.
    let scaled_to_zero = match &deployed {
        Some((_, replicas)) => *replicas == Some(0),
        None => observed.old.as_ref().and_then(|s| s.phase) == Some(PipelinePhase::Suspended),
    };
    if pipeline.spec.state == PipelineState::Suspended && scaled_to_zero {
        phase = PipelinePhase::Suspended;
    } else if let Some(upgrading) = upgrade::phase_override(&observed.status, generation) {
        phase = upgrading;
    }
    observed.status.phase = Some(phase);

    // A stage that cannot reach the registry waits (and dead-letters
    // nothing): the condition says which pods, until they read on.
    let registry_wait = match (&avro, &deployed) {
        (Resolved::Ready { .. }, Some(_)) => {
            schemas::stages_waiting(ctx, &mut observed, &namespace, &name).await
        }
        _ => None,
    };

    // Checkpoints are taken of a running, rolled-out version only.
    let mut next_checkpoint = None;
    if phase == PipelinePhase::Running
        && let Some(running) = &rolled_out_plan
    {
        next_checkpoint =
            Some(checkpoint::run_due(pipeline, ctx, running, &mut observed.status).await);
    }
    observed.record(pipeline, ctx).await?;

    let stable_replaced = upgrade::stable_replaced(pipeline.status.as_ref(), &observed.status);
    // A source that follows its subject's latest version looks for a new one.
    let registry_recheck = (schemas::follows_latest(&avro, pipeline)
        || matches!(avro, Resolved::Unreachable { .. }))
    .then_some(REGISTRY_RECHECK);
    let wait = [
        again,
        next_checkpoint,
        table_recheck,
        capture_poll,
        registry_recheck,
        registry_wait,
        stable_replaced,
    ]
    .into_iter()
    .flatten()
    .fold(
        idle_requeue(&key_of(pipeline), outcome.condition.ok),
        Duration::min,
    );
    Ok(Action::requeue(wait.max(Duration::from_millis(100))))
}

/// How long a pipeline that waits for nothing timed sleeps before it is looked at again.
///
/// Every change the operator can see wakes a reconcile through the watches
/// (`run_controllers`): the Pipeline, the Processors it uses, and the objects
/// it owns, whose status changes (pods becoming ready, a rollout exceeding its
/// progress deadline) are Deployment status updates. Kafka has no watch, so
/// drift (a topic deleted or reconfigured behind the operator's back) is
/// looked for now and then, and a topic problem (a missing source topic, a
/// conflict) sooner. The period is spread over ±10% per pipeline, so that
/// pipelines applied together do not all come back in the same second.
fn idle_requeue(key: &str, topics_ok: bool) -> Duration {
    use std::hash::{Hash, Hasher};
    let base = if topics_ok {
        DRIFT_CHECK
    } else {
        TOPIC_RECHECK
    };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    // 0.9 to 1.1 of the base, in thousandths.
    let spread = 900 + hasher.finish() % 201;
    base * u32::try_from(spread).unwrap_or(1000) / 1000
}

/// The owner reference that makes an object the Pipeline's (garbage-collected with it).
fn controller_owner(
    pipeline: &Pipeline,
) -> Result<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference, Error> {
    pipeline
        .controller_owner_ref(&())
        .ok_or(Error::MissingField {
            kind: "Pipeline",
            field: "metadata.uid",
        })
}

fn find_cond(status: &PipelineStatus, type_: &'static str) -> Option<Cond> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| Cond {
            unknown: c.status == "Unknown",
            ..Cond::new(
                type_,
                c.status == "True",
                c.reason.clone(),
                c.message.clone(),
            )
        })
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
    // The cache of Pipelines keeps what reconciles read: not their managedFields
    // (about a third of a Pipeline applied with kubectl's server-side apply).
    let (store, writer) = reflector::store();
    // The cycle check below learns of spec changes from this same watch, after
    // the cache has taken them in: a second watch could tell it first, and the
    // pipelines it wakes would be judged against the cache's older copy.
    let (reflected_tx, reflected_rx) = futures::channel::mpsc::unbounded();
    // So does the Processor controller, which reports who uses each processor.
    let (usage_tx, usage_rx) = futures::channel::mpsc::unbounded();
    let reflected = watcher(
        api_for::<Pipeline>(client, ns),
        watcher::Config::default().any_semantic(),
    )
    .modify(|pipeline| pipeline.managed_fields_mut().clear())
    .reflect(writer)
    .inspect(move |event| {
        if let Ok(event) = event {
            // Fails only when the controller (and with it the receiver) is gone.
            let _ = reflected_tx.unbounded_send(Ok(event.clone()));
            let _ = usage_tx.unbounded_send(event.clone());
        }
    });
    // The cache takes in every change; the reconcile wakes for those that are not its own status.
    let pipeline_events = wakes::changed(reflected, wakes::pipeline, Watched::Pipelines);
    ctx.register_pipeline_store(ns, store.clone());
    let pipelines = Controller::for_stream(pipeline_events, store.clone());
    let mapper_store = store.clone();
    // A spec change of one pipeline can make or break a cycle through topics
    // with others, whose conditions must follow.
    let cycle_ctx = ctx.clone();
    let cycle_default_cluster = ctx.config.resolve_cluster(None);
    let spec_changes = cycles::spec_changes(reflected_rx);
    let concurrency = ctx.config.reconcile_concurrency();
    // The reconcile reads the Processors a Pipeline uses from this cache,
    // which takes in each change before it wakes the Pipelines.
    let (processor_store, processor_writer) = reflector::store();
    ctx.register_processor_store(ns, processor_store);
    let processors_reflected =
        watcher(api_for::<Processor>(client, ns), watcher::Config::default())
            .modify(|processor| processor.managed_fields_mut().clear())
            .reflect(processor_writer);
    let pipeline_controller = pipelines
        .with_config(controller::Config::default().concurrency(concurrency))
        .trigger_backoff(trigger_backoff())
        .owns_stream(owned::metadata_changes::<ConfigMap>(&ctx, ns, &owned))
        .owns_stream(owned::deployment_changes(&ctx, ns, &owned))
        .owns_stream(owned::metadata_changes::<Service>(&ctx, ns, &owned))
        .owns_stream(owned::metadata_changes::<PodDisruptionBudget>(
            &ctx, ns, &owned,
        ))
        .watches_stream(
            wakes::changed(processors_reflected, wakes::processor, Watched::Processors),
            move |processor| pipelines_using(&mapper_store, &processor),
        )
        .watches_stream(spec_changes, move |changed| {
            // Every watched namespace's pipelines: topics are shared across them.
            let known: Vec<Arc<Pipeline>> = cycle_ctx.pipeline_stores_now();
            cycles::pipelines_to_recheck(&changed, &known, cycle_default_cluster.as_deref())
        });
    // A rotated Kafka credential rolls the pods that read it at once (their
    // template carries a digest of it): each such Secret is watched by name,
    // which is all the chart's RBAC allows.
    let pipeline_controller = watchable_secret_names(client, ns, &ctx.config)
        .await
        .into_iter()
        .fold(pipeline_controller, |controller, secret| {
            let in_namespace = store.clone();
            // Names only: the reconcile reads the data itself when it needs it.
            let changes = watcher(
                api_for::<PartialObjectMeta<Secret>>(client, ns),
                watcher::Config::default().fields(&format!("metadata.name={secret}")),
            )
            .touched_objects();
            controller.watches_stream(changes, move |changed| {
                pipelines_in_namespace(&in_namespace, &changed)
            })
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move { log_controller_error("Pipeline", result) });

    let processor_ctx = Arc::new(ProcessorContext {
        shared: ctx.clone(),
        pipelines: store.clone(),
    });
    let processor_controller =
        Controller::new(api_for::<Processor>(client, ns), watcher::Config::default())
            .with_config(controller::Config::default().concurrency(concurrency))
            .trigger_backoff(trigger_backoff())
            // A Pipeline that starts or stops referencing a Processor changes its usedBy.
            .reconcile_on(usage_changes(usage_rx))
            .shutdown_on_signal()
            .run(reconcile_processor, processor_error_policy, processor_ctx)
            .for_each(|result| async move { log_controller_error("Processor", result) });
    info!(namespace = ns.unwrap_or("(all)"), "controllers started");
    futures::join!(pipeline_controller, processor_controller);
}

/// What a controller's stream reports besides reconciles. A failed reconcile
/// was logged by the reconcile itself; anything else (a watch the API server
/// refuses, an object gone before its turn) would otherwise go unseen while
/// the objects it concerns wait.
fn log_controller_error<R, E, Q>(kind: &str, result: Result<R, controller::Error<E, Q>>)
where
    E: std::error::Error + 'static,
    Q: std::error::Error + 'static,
{
    match result {
        Ok(_) => {}
        Err(error @ controller::Error::ReconcilerFailed(..)) => {
            tracing::debug!(kind, %error, "reconcile error");
        }
        Err(error) => warn!(kind, %error, "controller error"),
    }
}

/// The runtime credential Secrets the operator may watch. A watch it may not
/// make (RBAC of an older chart) would fail on every retry and slow every
/// other watch of the controller (they share one backoff), so each name is
/// tried once first; without the watch, a rotation rolls the pods at the
/// pipeline's next reconcile.
async fn watchable_secret_names(
    client: &Client,
    namespace: Option<&str>,
    config: &crate::config::OperatorConfig,
) -> Vec<String> {
    let mut names = Vec::new();
    for name in config.runtime_secret_names() {
        let probe = ListParams::default()
            .fields(&format!("metadata.name={name}"))
            .limit(1);
        match api_for::<Secret>(client, namespace)
            .list_metadata(&probe)
            .await
        {
            Ok(_) => names.push(name),
            Err(error) => warn!(
                secret = %name,
                %error,
                "cannot watch a Kafka credential Secret; its rotation rolls the pods at each pipeline's next reconcile"
            ),
        }
    }
    names
}

/// Every Pipeline in the namespace of `object`.
fn pipelines_in_namespace<K: Resource>(
    store: &Store<Pipeline>,
    object: &K,
) -> Vec<ObjectRef<Pipeline>> {
    let namespace = object.meta().namespace.clone();
    store
        .state()
        .iter()
        .filter(|p| p.metadata.namespace == namespace)
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// How long a controller's watches wait after an error. kube-runtime merges
/// all of a controller's watches into one stream with one backoff, so after
/// an API server restart each watch's single "too old resource version"
/// waits in turn, and client-go's default (0.8 s doubling to 30 s, reset
/// after 2 min) adds up to minutes of deafness (measured: 115 s for eight
/// watches). Capped at 2 s it stays kind to a struggling API server (one
/// request per 2 s) and the eight are back within about 16 s.
fn trigger_backoff() -> ResetTimerBackoff<ExponentialBackoff> {
    ResetTimerBackoff::new(
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(2))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .into(),
        Duration::from_secs(60),
    )
}
