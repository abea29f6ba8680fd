//! Operator-driven checkpoints of a whole pipeline.
//!
//! A checkpoint asks every runtime instance of every stage to commit at a barrier
//! (`POST /checkpoint` on its pod address) and merges the answers: per stage and
//! input partition the next offset to consume, and the changelog positions
//! committed with it. The runtime commits offsets and state of a partition in one
//! transaction, so within a stage the cut is consistent per partition; what the
//! operator adds is the cut across stages (see [`take_checkpoint`]) and the
//! checks that make a merged answer trustworthy: every desired instance Ready on
//! the current plan, every input partition reported exactly once, every plan
//! hash the same.
//!
//! Successful checkpoints are stored as immutable ConfigMaps
//! `<pipeline>-checkpoint-<id>` (`checkpoint.json`) and listed in
//! `status.checkpoints`, oldest first, pruned to `spec.checkpointRetention` plus
//! the ids a caller pins (the checkpoint an upgrade may roll back to). A failure
//! is recorded in `status.lastFailedCheckpoint` with its reason, never listed.

mod instances;
mod offsets;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use keystone_crds::checkpoint::{
    CheckpointTrigger, InstanceCheckpoint, PipelineCheckpoint, Positions, StageCheckpoint,
};
use keystone_crds::pipeline::{
    CheckpointInProgress, CheckpointSummary, Pipeline, PipelinePhase, PipelineSpec, PipelineStatus,
};
use keystone_crds::plan::{Plan, PlanStage, TopicRole};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Resource, ResourceExt};
use tracing::{info, warn};

use crate::context::Context;
use crate::error::Error;
use crate::resources;

pub use instances::{pod_get, resume};

/// Label of a checkpoint ConfigMap: the checkpoint id.
pub const LABEL_CHECKPOINT: &str = "keystone.dev/checkpoint";
/// The key of the checkpoint in its ConfigMap.
pub const CHECKPOINT_KEY: &str = "checkpoint.json";
/// After a failed checkpoint the next periodic one waits at least this long (or
/// the interval, if shorter), so a pipeline that cannot be checkpointed is not
/// asked every reconcile.
pub const FAILURE_RETRY: Duration = Duration::from_secs(30);
/// Periodic checkpoints are never closer than this, whatever the spec says.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Why a checkpoint was not taken, in words that name the stage, pod or
/// partition concerned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct CheckpointFailure {
    pub reason: String,
}

impl CheckpointFailure {
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

/// The name of the ConfigMap holding one checkpoint.
pub fn checkpoint_config_map_name(pipeline: &str, id: &str) -> String {
    format!("{pipeline}-checkpoint-{id}")
}

/// A checkpoint id: the UTC time to the millisecond, `20260102-150405-123`.
/// Short, valid in object names and label values, and sorted as the checkpoints
/// were taken.
pub fn checkpoint_id(now: Timestamp) -> String {
    format!(
        "{}-{:03}",
        now.strftime("%Y%m%d-%H%M%S"),
        now.as_millisecond().rem_euclid(1000)
    )
}

/// Takes a checkpoint of the running pipeline: every instance of every stage
/// commits at a barrier and reports its offsets and state positions.
///
/// Before the first barrier the end offsets of the sink topics are read into
/// `sink_positions`: everything the pipeline writes after the checkpoint lies past
/// them. Every stage's instances are checked first (each desired replica Ready
/// and running `plan`), so a checkpoint that cannot succeed stops nothing.
///
/// With `stop`, the cut is aligned: stage 0 is checkpointed and stops; each next
/// stage is checkpointed only once its consumer group has consumed its input
/// (the previous stage's repartition topic, now final) to the end, then stops in
/// turn. Nothing is in flight between stages, so a restore can even change how
/// stages are split. If a later step fails, the stopped instances are resumed.
///
/// Without `stop` nothing pauses, and stages are checkpointed downstream first
/// (the last stage, then the one before, ...). Each stage's offsets and state agree
/// per partition. Across a stage boundary, what the earlier stage committed after
/// the later stage's barrier lies in the repartition topic past the later stage's
/// offsets, so restoring all stages to this checkpoint (with the repartition
/// topic kept) processes each record exactly once: the records between the two
/// barriers are the channel state, and the topic holds them. The cut is not
/// aligned, so a restore that changes the stage layout needs a `stop` checkpoint.
pub async fn take_checkpoint(
    ctx: &Context,
    pipeline: &Pipeline,
    plan: &Plan,
    trigger: CheckpointTrigger,
    stop: bool,
) -> Result<PipelineCheckpoint, CheckpointFailure> {
    let now = Timestamp::now();
    let plan_hash = plan.hash();
    let mut kafka = offsets::KafkaView::new(ctx);

    let token = crate::control::token(ctx, &plan.namespace, &plan.pipeline)
        .await
        .map_err(|e| CheckpointFailure::new(e.to_string()))?;
    let mut targets = Vec::with_capacity(plan.stages.len());
    for stage in &plan.stages {
        targets.push(instances::ready_instances(ctx, plan, stage, &plan_hash).await?);
    }
    let mut sink_positions = Positions::new();
    for topic in plan.topics.iter().filter(|t| t.role == TopicRole::Sink) {
        let cluster = ctx.config.resolve_cluster(topic.cluster.as_deref());
        sink_positions.insert(
            topic.name.clone(),
            kafka.end_offsets(cluster.as_deref(), &topic.name).await?,
        );
    }

    let order: Vec<usize> = if stop {
        (0..plan.stages.len()).collect()
    } else {
        (0..plan.stages.len()).rev().collect()
    };
    let mut stages: BTreeMap<usize, StageCheckpoint> = BTreeMap::new();
    let mut stopped: Vec<instances::Instance> = Vec::new();
    let mut outcome = Ok(());
    for index in order {
        let stage = &plan.stages[index];
        let cluster = ctx.config.resolve_cluster(stage.input.cluster.as_deref());
        let result = async {
            if stop && index > 0 {
                kafka
                    .wait_drained(cluster.as_deref(), stage)
                    .await
                    .map_err(|reason| {
                        CheckpointFailure::new(format!("stage {}: {reason}", stage.name))
                    })?;
            }
            let answers = instances::checkpoint_all(&targets[index], stop, &token).await;
            for (instance, answer) in targets[index].iter().zip(&answers) {
                if answer.as_ref().is_ok_and(|a| a.stopped) {
                    stopped.push(instance.clone());
                }
            }
            let partitions = kafka
                .partition_count(cluster.as_deref(), &stage.input.topic)
                .await?;
            let answers = targets[index]
                .iter()
                .zip(answers)
                .map(|(instance, answer)| (instance.pod.clone(), answer))
                .collect();
            merge_stage(stage, partitions, &plan_hash, stop, answers)
                .map_err(CheckpointFailure::new)
        }
        .await;
        match result {
            Ok(merged) => {
                stages.insert(index, merged);
            }
            Err(failure) => {
                outcome = Err(failure);
                break;
            }
        }
    }
    if let Err(failure) = outcome {
        if !stopped.is_empty()
            && let Err(resume_failure) = instances::post_resume(&stopped, &token).await
        {
            warn!(reason = %resume_failure, "could not resume instances after a failed checkpoint");
            return Err(CheckpointFailure::new(format!(
                "{failure}; then resuming the stopped instances failed: {resume_failure}"
            )));
        }
        return Err(failure);
    }
    Ok(PipelineCheckpoint {
        id: checkpoint_id(now),
        pipeline: plan.pipeline.clone(),
        namespace: plan.namespace.clone(),
        plan_hash,
        time: now.to_string(),
        trigger,
        stages: stages.into_values().collect(),
        sink_positions,
    })
    .inspect(|c| {
        info!(
            pipeline = %pipeline.name_any(),
            id = %c.id,
            trigger = trigger.as_str(),
            stop,
            "checkpoint taken"
        )
    })
}

/// Merges one stage's answers (pod name, answer or why there is none) and
/// checks them: every instance answered, for this stage and input topic, on
/// `plan_hash` (an answer without a hash comes from a runtime that does not
/// report it), stopped when asked to, and every partition of the input topic
/// (`partitions` of them) is reported by exactly one instance. A partition
/// missing or reported twice means a rebalance is in progress.
pub fn merge_stage(
    stage: &PlanStage,
    partitions: i32,
    plan_hash: &str,
    stop: bool,
    answers: Vec<(String, Result<InstanceCheckpoint, String>)>,
) -> Result<StageCheckpoint, String> {
    let name = &stage.name;
    let topic = &stage.input.topic;
    let mut owners: BTreeMap<i32, String> = BTreeMap::new();
    let mut merged = StageCheckpoint {
        name: name.clone(),
        input_topic: topic.clone(),
        source_offsets: BTreeMap::new(),
        changelog_positions: Positions::new(),
    };
    for (pod, answer) in answers {
        let answer = answer.map_err(|e| format!("stage {name}: pod {pod}: {e}"))?;
        if answer.stage != *name || answer.input_topic != *topic {
            return Err(format!(
                "stage {name}: pod {pod} answered for stage {} reading {:?}, not for stage {name} reading {topic:?}",
                answer.stage, answer.input_topic
            ));
        }
        if !answer.plan_hash.is_empty() && answer.plan_hash != plan_hash {
            return Err(format!(
                "stage {name}: pod {pod} runs plan {}, not the current plan {plan_hash}",
                answer.plan_hash
            ));
        }
        if stop && !answer.stopped {
            return Err(format!(
                "stage {name}: pod {pod} did not stop at the barrier (its runtime may not support ?stop=true)"
            ));
        }
        for (&partition, &offset) in &answer.source_offsets {
            if !(0..partitions).contains(&partition) {
                return Err(format!(
                    "stage {name}: pod {pod} reports partition {partition} of {topic:?}, which has {partitions} partition(s)"
                ));
            }
            if let Some(other) = owners.insert(partition, pod.clone()) {
                return Err(format!(
                    "stage {name}: partition {partition} of {topic:?} is reported by both {other} and {pod} (a rebalance is in progress)"
                ));
            }
            merged.source_offsets.insert(partition, offset);
        }
        for (changelog, positions) in answer.changelog_positions {
            merged
                .changelog_positions
                .entry(changelog)
                .or_default()
                .extend(positions);
        }
    }
    let missing: Vec<String> = (0..partitions)
        .filter(|p| !owners.contains_key(p))
        .map(|p| p.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "stage {name}: partition(s) {} of {topic:?} are reported by no instance (a rebalance is in progress, or an instance has not consumed them yet)",
            missing.join(", ")
        ));
    }
    Ok(merged)
}

/// The ConfigMap that stores a checkpoint. Its owner reference to the Pipeline is
/// not a controller reference: the ConfigMap goes with the Pipeline, but neither
/// wakes the controller when written nor counts as a stale plan ConfigMap.
pub fn checkpoint_config_map(
    pipeline: &Pipeline,
    checkpoint: &PipelineCheckpoint,
) -> Result<ConfigMap, Error> {
    let owner = pipeline.owner_ref(&()).ok_or(Error::MissingField {
        kind: "Pipeline",
        field: "metadata.uid",
    })?;
    let json = resources::fitting_json(
        checkpoint,
        "checkpoint",
        " (it lists offsets per stage, partition and changelog: fewer partitions per stage)",
    )
    .map_err(|e| Error::fit("checkpoint", e))?;
    let mut labels = resources::pipeline_labels(&checkpoint.pipeline);
    labels.insert(LABEL_CHECKPOINT.to_owned(), checkpoint.id.clone());
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(checkpoint_config_map_name(
                &checkpoint.pipeline,
                &checkpoint.id,
            )),
            namespace: Some(checkpoint.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(CHECKPOINT_KEY.to_owned(), json)])),
        immutable: Some(true),
        ..ConfigMap::default()
    })
}

/// Writes a checkpoint's ConfigMap (created once: a checkpoint never changes).
pub async fn store_checkpoint(
    ctx: &Context,
    pipeline: &Pipeline,
    checkpoint: &PipelineCheckpoint,
) -> Result<(), Error> {
    let config_map = checkpoint_config_map(pipeline, checkpoint)?;
    Api::<ConfigMap>::namespaced(ctx.client.clone(), &checkpoint.namespace)
        .create(&PostParams::default(), &config_map)
        .await?;
    Ok(())
}

/// Reads a stored checkpoint.
pub async fn load_checkpoint(
    ctx: &Context,
    namespace: &str,
    pipeline_name: &str,
    id: &str,
) -> Result<PipelineCheckpoint, Error> {
    let name = checkpoint_config_map_name(pipeline_name, id);
    let config_map = Api::<ConfigMap>::namespaced(ctx.client.clone(), namespace)
        .get(&name)
        .await?;
    let problem = |message: String| Error::Checkpoint {
        namespace: namespace.to_owned(),
        name: name.clone(),
        message,
    };
    let json = config_map
        .data
        .as_ref()
        .and_then(|d| d.get(CHECKPOINT_KEY))
        .ok_or_else(|| problem(format!("no key {CHECKPOINT_KEY}")))?;
    serde_json::from_str(json).map_err(|e| problem(format!("{CHECKPOINT_KEY}: {e}")))
}

/// A checkpoint as status lists it.
fn summary(
    id: String,
    time: Timestamp,
    trigger: CheckpointTrigger,
    plan_hash: String,
    reason: Option<String>,
) -> CheckpointSummary {
    CheckpointSummary {
        id,
        time: Time(time),
        reason,
        trigger: Some(trigger.as_str().to_owned()),
        plan_hash: Some(plan_hash),
    }
}

/// Which retained checkpoints to keep: the newest `retention` ones and the
/// pinned ones, oldest first; and the others (to delete).
pub fn retain(
    checkpoints: &[CheckpointSummary],
    retention: i32,
    pinned: &[String],
) -> (Vec<CheckpointSummary>, Vec<CheckpointSummary>) {
    let mut sorted = checkpoints.to_vec();
    // Ids sort as the checkpoints were taken.
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    sorted.dedup_by(|a, b| a.id == b.id);
    let newest_from = sorted.len().saturating_sub(retention.max(1) as usize);
    let (mut kept, mut pruned) = (Vec::new(), Vec::new());
    for (i, checkpoint) in sorted.into_iter().enumerate() {
        if i >= newest_from || pinned.contains(&checkpoint.id) {
            kept.push(checkpoint);
        } else {
            pruned.push(checkpoint);
        }
    }
    (kept, pruned)
}

/// Takes a checkpoint and stores its ConfigMap; times it. No status, no events.
async fn take_and_store(
    ctx: &Context,
    pipeline: &Pipeline,
    plan: &Plan,
    trigger: CheckpointTrigger,
    stop: bool,
) -> Result<PipelineCheckpoint, CheckpointFailure> {
    let timer = ctx.metrics.checkpoint_duration.start_timer();
    let result = match take_checkpoint(ctx, pipeline, plan, trigger, stop).await {
        Ok(checkpoint) => match store_checkpoint(ctx, pipeline, &checkpoint).await {
            Ok(()) => Ok(checkpoint),
            Err(e) => Err(CheckpointFailure::new(format!(
                "storing the checkpoint as ConfigMap {}/{}: {e}",
                plan.namespace,
                checkpoint_config_map_name(&plan.pipeline, &checkpoint.id)
            ))),
        },
        Err(failure) => Err(failure),
    };
    timer.observe_duration();
    result
}

/// Records a checkpoint's outcome in `status` (listing and pruning on
/// success), with its event and metric.
async fn record_outcome(
    ctx: &Context,
    pipeline: &Pipeline,
    plan: &Plan,
    trigger: CheckpointTrigger,
    result: &Result<PipelineCheckpoint, CheckpointFailure>,
    status: &mut PipelineStatus,
    pinned: &[String],
) {
    let now = Timestamp::now();
    match result {
        Ok(checkpoint) => {
            ctx.metrics
                .checkpoints
                .with_label_values(&["succeeded"])
                .inc();
            let taken = checkpoint.time.parse().unwrap_or(now);
            let done = summary(
                checkpoint.id.clone(),
                taken,
                trigger,
                checkpoint.plan_hash.clone(),
                None,
            );
            status.last_checkpoint = Some(done.clone());
            status.checkpoints.push(done);
            // The ConfigMaps are the durable record: one whose status entry was lost
            // (a crash before the status write, a reconcile that started from an
            // older status) is listed again, or pruned, from them.
            status
                .checkpoints
                .extend(stored_checkpoints(ctx, plan).await);
            let (kept, pruned) = retain(
                &status.checkpoints,
                pipeline.spec.checkpoint_retention,
                pinned,
            );
            status.checkpoints = kept;
            // A ConfigMap that could not be deleted stays listed, so the next prune retries it.
            let undeleted = delete_checkpoints(ctx, plan, &pruned).await;
            status.checkpoints.extend(undeleted);
            status.checkpoints.sort_by(|a, b| a.id.cmp(&b.id));
            let partitions: usize = checkpoint
                .stages
                .iter()
                .map(|s| s.source_offsets.len())
                .sum();
            ctx.publish(
                pipeline,
                false,
                "CheckpointCompleted",
                "Checkpoint",
                format!(
                    "{} checkpoint {} of plan {}: {} stage(s), {} input partition(s)",
                    trigger.as_str(),
                    checkpoint.id,
                    checkpoint.plan_hash,
                    checkpoint.stages.len(),
                    partitions
                ),
            )
            .await;
        }
        Err(failure) => {
            ctx.metrics.checkpoints.with_label_values(&["failed"]).inc();
            warn!(pipeline = %pipeline.name_any(), reason = %failure, "checkpoint failed");
            status.last_failed_checkpoint = Some(summary(
                checkpoint_id(now),
                now,
                trigger,
                plan.hash(),
                Some(failure.reason.clone()),
            ));
            ctx.publish(
                pipeline,
                true,
                "CheckpointFailed",
                "Checkpoint",
                format!("{} checkpoint failed: {failure}", trigger.as_str()),
            )
            .await;
        }
    }
}

/// A checkpoint as status lists it, from its ConfigMap: from `checkpoint.json`,
/// or (unreadable) the id label and the creation time, so it can still be pruned.
fn stored_summary(config_map: &ConfigMap) -> Option<CheckpointSummary> {
    let stored: Option<PipelineCheckpoint> = config_map
        .data
        .as_ref()
        .and_then(|d| d.get(CHECKPOINT_KEY))
        .and_then(|json| serde_json::from_str(json).ok());
    if let Some(c) = stored {
        let time = c.time.parse().ok()?;
        return Some(summary(c.id, time, c.trigger, c.plan_hash, None));
    }
    let id = config_map.metadata.labels.as_ref()?.get(LABEL_CHECKPOINT)?;
    Some(CheckpointSummary {
        id: id.clone(),
        time: config_map.metadata.creation_timestamp.clone()?,
        reason: None,
        trigger: None,
        plan_hash: None,
    })
}

/// The checkpoints stored for the plan's pipeline (empty if they cannot be listed).
async fn stored_checkpoints(ctx: &Context, plan: &Plan) -> Vec<CheckpointSummary> {
    let selector = format!(
        "{}={},{LABEL_CHECKPOINT}",
        resources::LABEL_PIPELINE,
        plan.pipeline
    );
    match Api::<ConfigMap>::namespaced(ctx.client.clone(), &plan.namespace)
        .list(&ListParams::default().labels(&selector))
        .await
    {
        Ok(list) => list.items.iter().filter_map(stored_summary).collect(),
        Err(error) => {
            warn!(%error, %selector, "could not list the stored checkpoints");
            Vec::new()
        }
    }
}

/// Deletes the ConfigMaps of pruned checkpoints; returns those it could not delete.
async fn delete_checkpoints(
    ctx: &Context,
    plan: &Plan,
    pruned: &[CheckpointSummary],
) -> Vec<CheckpointSummary> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &plan.namespace);
    let mut failed = Vec::new();
    for checkpoint in pruned {
        let name = checkpoint_config_map_name(&plan.pipeline, &checkpoint.id);
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => {
                warn!(config_map = %name, %error, "could not delete a pruned checkpoint");
                failed.push(checkpoint.clone());
            }
        }
    }
    failed
}

/// The Ready condition's last transition to True: when the pipeline started running.
fn running_since(status: &PipelineStatus) -> Option<Timestamp> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")
        .map(|c| c.last_transition_time.0)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Time until the next periodic checkpoint (zero: due), counted from the last
/// success (or from when the pipeline became Ready), and after a later failure
/// no sooner than `min(interval, FAILURE_RETRY)` after it.
fn periodic_in(spec: &PipelineSpec, status: &PipelineStatus, now: Timestamp) -> Option<Duration> {
    let interval = spec.checkpoint_interval.as_std().max(MIN_INTERVAL);
    let since = status
        .last_checkpoint
        .as_ref()
        .map(|c| c.time.0)
        .or_else(|| running_since(status))?;
    let mut next = since.as_millisecond().saturating_add(millis(interval));
    if let Some(failed) = &status.last_failed_checkpoint
        && failed.time.0 >= since
    {
        let retry = failed
            .time
            .0
            .as_millisecond()
            .saturating_add(millis(interval.min(FAILURE_RETRY)));
        next = next.max(retry);
    }
    let wait = next.saturating_sub(now.as_millisecond()).max(0);
    Some(Duration::from_millis(wait as u64))
}

fn due(spec: &PipelineSpec, status: &PipelineStatus, now: Timestamp) -> Option<CheckpointTrigger> {
    if status.phase != Some(PipelinePhase::Running) {
        return None;
    }
    if spec.checkpoint_trigger.is_some()
        && spec.checkpoint_trigger != status.last_checkpoint_trigger
    {
        return Some(CheckpointTrigger::Manual);
    }
    periodic_in(spec, status, now)
        .is_some_and(|wait| wait.is_zero())
        .then_some(CheckpointTrigger::Periodic)
}

/// The checkpoint due now, if any: `Manual` when `spec.checkpointTrigger` is set
/// and differs from `status.lastCheckpointTrigger`; `Periodic` when
/// `checkpointInterval` has passed since the last success (or since the
/// pipeline became Ready), and after a failure no sooner than
/// `min(interval, 30s)` after it. Only while the pipeline is Running.
pub fn checkpoint_due(pipeline: &Pipeline, now: Timestamp) -> Option<CheckpointTrigger> {
    due(
        &pipeline.spec,
        &pipeline.status.clone().unwrap_or_default(),
        now,
    )
}

fn next_in(spec: &PipelineSpec, status: &PipelineStatus, now: Timestamp) -> Duration {
    let interval = spec.checkpoint_interval.as_std().max(MIN_INTERVAL);
    match due(spec, status, now) {
        Some(_) => Duration::ZERO,
        None if status.phase != Some(PipelinePhase::Running) => interval,
        None => periodic_in(spec, status, now).unwrap_or(interval),
    }
}

/// How long until the next checkpoint is due (zero: now), for the requeue. Not
/// Running: the interval (a phase change reconciles anyway).
pub fn next_checkpoint_in(pipeline: &Pipeline, now: Timestamp) -> Duration {
    next_in(
        &pipeline.spec,
        &pipeline.status.clone().unwrap_or_default(),
        now,
    )
}

/// How often a reconcile looks whether a background checkpoint has finished.
const BACKGROUND_POLL: Duration = Duration::from_secs(1);

/// What a background checkpoint is taken for, which decides what follows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Periodic or manual: the instances go on (an aligned one resumes them).
    Routine,
    /// Before a suspend, or before an upgrade replaces the instances (the
    /// rollback point and the new version's start): a stop checkpoint, whose
    /// instances stay stopped until the reconcile that collects it scales them
    /// to zero or replaces them. One it does not use resumes them.
    Stop,
}

/// A checkpoint running outside the reconcile: its pods may take up to a
/// minute each to answer (or hang until the request timeout), and the
/// pipeline's other changes must not wait for that.
pub struct Background {
    trigger: CheckpointTrigger,
    purpose: Purpose,
    /// `spec.checkpointTrigger` of a manual one: handled once its outcome is recorded.
    manual: Option<String>,
    /// The plan it was taken of.
    plan: Plan,
    task: tokio::task::JoinHandle<Result<PipelineCheckpoint, CheckpointFailure>>,
}

/// A background checkpoint that has finished, as the reconcile that collected
/// it sees it (its outcome is already recorded in status).
#[derive(Debug)]
pub struct Finished {
    pub trigger: CheckpointTrigger,
    pub purpose: Purpose,
    /// A plan of the pipeline, to find its instances by (the one it was taken
    /// of, or for an orphan the current one).
    pub plan: Plan,
    /// The hash of the plan it was taken of.
    pub plan_hash: String,
    /// The checkpoint's id, or why it failed.
    pub result: Result<String, String>,
    /// Left unfinished by an operator that stopped while taking it: whether
    /// its instances stopped is unknown, and nothing resumed them.
    pub orphan: bool,
}

impl Finished {
    /// Whether this is the stop checkpoint `trigger` asked for, of the plan
    /// with `plan_hash`, taken by this operator.
    pub fn is_stop_for(&self, trigger: CheckpointTrigger, plan_hash: &str) -> bool {
        self.purpose == Purpose::Stop
            && !self.orphan
            && self.trigger == trigger
            && self.plan_hash == plan_hash
    }
}

fn background_key(plan: &Plan) -> String {
    format!("{}/{}", plan.namespace, plan.pipeline)
}

/// Records the outcome of the pipeline's background checkpoint if it has
/// finished (status, events, metrics, pruning) and returns it. Every reconcile
/// calls it first, whatever it then does, so an outcome is recorded in the
/// order it happened.
pub async fn collect_finished(
    ctx: &Context,
    pipeline: &Pipeline,
    plan: &Plan,
    status: &mut PipelineStatus,
) -> Option<Finished> {
    let key = background_key(plan);
    let done = {
        let mut running = ctx
            .background_checkpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match running.get(&key) {
            Some(b) if b.task.is_finished() => running.remove(&key)?,
            _ => return None,
        }
    };
    let result = done.task.await.unwrap_or_else(|e| {
        Err(CheckpointFailure::new(format!(
            "the checkpoint task ended without an answer: {e}"
        )))
    });
    status.checkpoint_in_progress = None;
    if done.trigger == CheckpointTrigger::Manual {
        status.last_checkpoint_trigger = done.manual;
    }
    record_outcome(
        ctx,
        pipeline,
        &done.plan,
        done.trigger,
        &result,
        status,
        &pinned(status),
    )
    .await;
    Some(Finished {
        trigger: done.trigger,
        purpose: done.purpose,
        plan_hash: done.plan.hash(),
        plan: done.plan,
        result: result.map(|c| c.id).map_err(|f| f.reason),
        orphan: false,
    })
}

/// A checkpoint status says is being taken, but that no task of this
/// operator takes: its predecessor stopped (crashed, was killed, lost its
/// lease) while taking it. It is recorded as failed; the instances a
/// periodic or manual one stopped at its barrier are resumed (a manual one
/// is taken again: its trigger was not handled). An upgrade's or suspend's is
/// returned: the upgrade or suspend goes on as if it had not started (its
/// stopped instances are not Ready, so they are replaced or scaled to zero
/// without a new checkpoint), and if the change was withdrawn meanwhile the
/// reconcile resumes them.
pub async fn recover_orphaned(
    ctx: &Arc<Context>,
    pipeline: &Pipeline,
    plan: &Plan,
    status: &mut PipelineStatus,
) -> Option<Finished> {
    let orphan = status.checkpoint_in_progress.clone()?;
    if in_flight(ctx, plan) {
        return None;
    }
    status.checkpoint_in_progress = None;
    let reason = format!(
        "the operator stopped while taking this checkpoint (started {}); {}",
        orphan.started.0,
        if orphan.stop {
            "its instances may have stopped at the barrier"
        } else {
            "nothing was stopped"
        }
    );
    warn!(pipeline = %pipeline.name_any(), %reason, "a checkpoint was left unfinished");
    status.last_failed_checkpoint = Some(CheckpointSummary {
        id: checkpoint_id(orphan.started.0),
        time: Time(Timestamp::now()),
        reason: Some(reason.clone()),
        trigger: Some(orphan.trigger.clone()),
        plan_hash: Some(orphan.plan_hash.clone()),
    });
    ctx.metrics.checkpoints.with_label_values(&["failed"]).inc();
    ctx.publish(
        pipeline,
        true,
        "CheckpointFailed",
        "Checkpoint",
        format!("{} checkpoint failed: {reason}", orphan.trigger),
    )
    .await;
    let stopping = [CheckpointTrigger::Upgrade, CheckpointTrigger::Suspend]
        .into_iter()
        .find(|t| t.as_str() == orphan.trigger);
    if let Some(trigger) = stopping {
        return Some(Finished {
            trigger,
            purpose: Purpose::Stop,
            plan: plan.clone(),
            plan_hash: orphan.plan_hash,
            result: Err(reason),
            orphan: true,
        });
    }
    if orphan.stop {
        // In the background: a hung pod must not hold the reconcile.
        let (task_ctx, task_plan) = (ctx.clone(), plan.clone());
        tokio::spawn(async move {
            match resume(&task_ctx, &task_plan).await {
                Ok(()) => {
                    info!(pipeline = %task_plan.pipeline, "resumed the instances an unfinished checkpoint stopped")
                }
                Err(failure) => {
                    warn!(pipeline = %task_plan.pipeline, reason = %failure, "could not resume the instances an unfinished checkpoint stopped")
                }
            }
        });
    }
    None
}

/// The checkpoint an upgrade may roll back to: never pruned.
fn pinned(status: &PipelineStatus) -> Vec<String> {
    status
        .upgrade
        .as_ref()
        .and_then(|u| u.checkpoint.clone())
        .into_iter()
        .collect()
}

/// Whether a background checkpoint of the pipeline is running, or has
/// finished and waits to be collected: what stops or replaces instances, or
/// starts another checkpoint, waits for it (an aligned or stop checkpoint
/// holds stopped instances).
pub fn in_flight(ctx: &Context, plan: &Plan) -> bool {
    ctx.background_checkpoints
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .contains_key(&background_key(plan))
}

/// Starts a checkpoint of `plan` in the background; [`collect_finished`]
/// records its outcome in a later reconcile. A routine one with `stop`
/// resumes the instances once taken; a [`Purpose::Stop`] one leaves them
/// stopped. A failed one resumes whatever it stopped.
pub fn start_background(
    ctx: &Arc<Context>,
    pipeline: &Pipeline,
    plan: &Plan,
    trigger: CheckpointTrigger,
    purpose: Purpose,
    stop: bool,
    status: &mut PipelineStatus,
) {
    status.checkpoint_in_progress = Some(CheckpointInProgress {
        trigger: trigger.as_str().to_owned(),
        plan_hash: plan.hash(),
        stop,
        started: Time(Timestamp::now()),
    });
    // A manual trigger counts as handled (whether the checkpoint succeeds or
    // fails) when its outcome is recorded.
    let manual = (trigger == CheckpointTrigger::Manual)
        .then(|| pipeline.spec.checkpoint_trigger.clone())
        .flatten();
    let resume_after = stop && purpose == Purpose::Routine;
    let (task_ctx, task_pipeline, task_plan) = (ctx.clone(), pipeline.clone(), plan.clone());
    let task = tokio::spawn(async move {
        let taken = take_and_store(&task_ctx, &task_pipeline, &task_plan, trigger, stop).await;
        if resume_after
            && taken.is_ok()
            && let Err(failure) = resume(&task_ctx, &task_plan).await
        {
            warn!(pipeline = %task_plan.pipeline, reason = %failure, "resuming after an aligned checkpoint failed; retried next reconcile");
        }
        taken
    });
    ctx.background_checkpoints
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(
            background_key(plan),
            Background {
                trigger,
                purpose,
                manual,
                plan: plan.clone(),
                task,
            },
        );
}

/// Starts the periodic or manual checkpoint that is due, in the background;
/// returns when to look again. The reconcile never waits for an instance: a
/// pod that accepts the connection and never answers holds only the
/// background task, for the bounded request time.
pub fn run_due(
    pipeline: &Pipeline,
    ctx: &Arc<Context>,
    plan: &Plan,
    status: &mut PipelineStatus,
) -> Duration {
    if in_flight(ctx, plan) {
        return BACKGROUND_POLL;
    }
    if let Some(trigger) = due(&pipeline.spec, status, Timestamp::now()) {
        // With more than one stage the cut is aligned (stop, drain, resume): a
        // restore starts later stages at their input's end, which is exact only
        // for an aligned cut. One stage needs no pause: offsets and state of a
        // partition are committed together.
        let aligned = plan.stages.len() > 1;
        start_background(
            ctx,
            pipeline,
            plan,
            trigger,
            Purpose::Routine,
            aligned,
            status,
        );
        return BACKGROUND_POLL;
    }
    next_in(&pipeline.spec, status, Timestamp::now())
}

#[cfg(test)]
mod tests;

/// The end offset of every partition of `topics` on `cluster`: where a restore
/// starts the stages after the first, once every instance has stopped.
pub async fn end_offsets(
    ctx: &Context,
    cluster: Option<&str>,
    topics: &[String],
) -> Result<Positions, CheckpointFailure> {
    let mut kafka = offsets::KafkaView::new(ctx);
    let mut ends = Positions::new();
    for topic in topics {
        ends.insert(topic.clone(), kafka.end_offsets(cluster, topic).await?);
    }
    Ok(ends)
}

/// What earlier runs left of a pipeline's internal state, in words: consumer
/// groups of its stages with committed offsets, changelog topics with records.
/// Empty for a pipeline that never ran under this name.
pub async fn retained_state(ctx: &Context, plan: &Plan) -> Result<Vec<String>, CheckpointFailure> {
    let mut kafka = offsets::KafkaView::new(ctx);
    let mut found = Vec::new();
    for stage in &plan.stages {
        let cluster = ctx.config.resolve_cluster(stage.input.cluster.as_deref());
        let committed = kafka
            .committed_partitions(cluster.as_deref(), stage)
            .await
            .map_err(CheckpointFailure::new)?;
        if !committed.is_empty() {
            found.push(format!(
                "consumer group {} has committed offsets on {} partition(s) of {}",
                stage.consumer_group,
                committed.len(),
                stage.input.topic
            ));
        }
    }
    for topic in plan
        .topics
        .iter()
        .filter(|t| t.role == TopicRole::Changelog)
    {
        let cluster = ctx.config.resolve_cluster(topic.cluster.as_deref());
        let records: i64 = kafka
            .end_offsets(cluster.as_deref(), &topic.name)
            .await?
            .values()
            .sum();
        if records > 0 {
            found.push(format!(
                "changelog topic {} holds {records} record(s)",
                topic.name
            ));
        }
    }
    Ok(found)
}
