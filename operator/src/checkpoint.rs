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

mod background;
mod instances;
mod offsets;
mod schedule;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use keystone_crds::checkpoint::{
    CheckpointTrigger, InstanceCheckpoint, PipelineCheckpoint, Positions, StageCheckpoint,
};
use keystone_crds::pipeline::{CheckpointSummary, Pipeline, PipelineStatus};
use keystone_crds::plan::{Plan, PlanStage, TopicRole};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Resource, ResourceExt};
use tracing::{info, warn};

use crate::context::Context;
use crate::error::Error;
use crate::resources;

pub use background::{
    Background, Finished, Purpose, collect_finished, in_flight, recover_orphaned,
    resume_in_background, run_due, start_background,
};
pub use instances::{pod_get, pod_post, resume};
pub use schedule::{checkpoint_due, next_checkpoint_in};

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
            status.last_checkpoint = Some(Box::new(done.clone()));
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
            status.last_failed_checkpoint = Some(Box::new(summary(
                checkpoint_id(now),
                now,
                trigger,
                plan.hash(),
                Some(failure.reason.clone()),
            )));
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
/// Empty for a pipeline that never ran under this name. Asked of the cached
/// admin connection of each cluster (every new Pipeline asks this once).
pub async fn retained_state(ctx: &Context, plan: &Plan) -> Result<Vec<String>, CheckpointFailure> {
    let admin = |cluster: Option<String>| async move {
        let name = cluster.ok_or_else(|| {
            CheckpointFailure::new("the Kafka cluster is not in the operator's configuration")
        })?;
        ctx.admin(&name)
            .await
            .map_err(|e| CheckpointFailure::new(e.to_string()))
    };
    let mut found = Vec::new();
    for stage in &plan.stages {
        let committed = admin(ctx.config.resolve_cluster(stage.input.cluster.as_deref()))
            .await?
            .committed_partitions(&stage.consumer_group, &stage.input.topic)
            .await
            .map_err(|e| CheckpointFailure::new(e.to_string()))?;
        if !committed.is_empty() {
            found.push(format!(
                "consumer group {} has committed offsets on {} partition(s) of {}",
                stage.consumer_group,
                committed.len(),
                stage.input.topic
            ));
        }
    }
    // The changelogs by cluster: one metadata request per cluster.
    let mut changelogs: BTreeMap<Option<String>, Vec<String>> = BTreeMap::new();
    for topic in plan
        .topics
        .iter()
        .filter(|t| t.role == TopicRole::Changelog)
    {
        changelogs
            .entry(ctx.config.resolve_cluster(topic.cluster.as_deref()))
            .or_default()
            .push(topic.name.clone());
    }
    for (cluster, names) in changelogs {
        let admin = admin(cluster).await?;
        let partitions = admin
            .partitions(&names)
            .await
            .map_err(|e| CheckpointFailure::new(e.to_string()))?;
        for name in &names {
            // A changelog not created yet holds nothing.
            let Some(&count) = partitions.get(name) else {
                continue;
            };
            let records: i64 = admin
                .end_offsets(name, count)
                .await
                .map_err(|e| CheckpointFailure::new(e.to_string()))?
                .values()
                .sum();
            if records > 0 {
                found.push(format!("changelog topic {name} holds {records} record(s)"));
            }
        }
    }
    Ok(found)
}
