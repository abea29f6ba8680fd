//! Checkpoints taken outside the reconcile: started by one reconcile,
//! collected (outcome recorded in status) by a later one, and recovered when
//! the operator that started one stopped before collecting it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use keystone_crds::checkpoint::{CheckpointTrigger, PipelineCheckpoint};
use keystone_crds::pipeline::{CheckpointInProgress, CheckpointSummary, Pipeline, PipelineStatus};
use keystone_crds::plan::Plan;
use kube::ResourceExt;
use tracing::{debug, info, warn};

use super::instances::ready_instances;
use super::schedule::{due, next_in};
use super::{CheckpointFailure, checkpoint_id, record_outcome, resume, take_and_store};
use crate::context::Context;

/// How often a reconcile looks whether a background checkpoint has finished.
const BACKGROUND_POLL: Duration = Duration::from_secs(1);
/// How often a due checkpoint looks whether its instances are Ready again
/// (readiness probes run every 5 s).
const INSTANCES_POLL: Duration = Duration::from_secs(2);
/// How long a due checkpoint waits for its instances to be Ready before it is
/// taken anyway (and fails with the reason): two readiness periods and more.
const READY_GRACE: Duration = Duration::from_secs(20);

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
    status.last_failed_checkpoint = Some(Box::new(CheckpointSummary {
        id: checkpoint_id(orphan.started.0),
        time: Time(Timestamp::now()),
        reason: Some(reason.clone()),
        trigger: Some(orphan.trigger.clone()),
        plan_hash: Some(orphan.plan_hash.clone()),
    }));
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
        resume_in_background(ctx, plan, "an unfinished checkpoint stopped");
    }
    None
}

/// Resumes the pipeline's stopped instances outside the reconcile (a hung pod
/// must not hold it); `what` says what stopped them, for the log. Until the
/// resume has finished the pipeline counts as [`in_flight`]: a checkpoint
/// started meanwhile would find its instances stopped and fail.
pub fn resume_in_background(ctx: &Arc<Context>, plan: &Plan, what: &'static str) {
    let (task_ctx, task_plan) = (ctx.clone(), plan.clone());
    let task = tokio::spawn(async move {
        match resume(&task_ctx, &task_plan).await {
            Ok(()) => info!(pipeline = %task_plan.pipeline, "resumed the instances {what}"),
            Err(failure) => {
                warn!(pipeline = %task_plan.pipeline, reason = %failure, "could not resume the instances {what}")
            }
        }
    });
    ctx.background_resumes
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(background_key(plan), task);
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
/// finished and waits to be collected, or its stopped instances are being
/// resumed: what stops or replaces instances, or starts another checkpoint,
/// waits for it (an aligned or stop checkpoint holds stopped instances).
pub fn in_flight(ctx: &Context, plan: &Plan) -> bool {
    let key = background_key(plan);
    let resuming = {
        let mut resumes = ctx
            .background_resumes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        resumes.retain(|_, task| !task.is_finished());
        resumes.contains_key(&key)
    };
    resuming
        || ctx
            .background_checkpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(&key)
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
///
/// A due checkpoint waits up to [`READY_GRACE`] while an instance is not
/// Ready or a rollout is in progress (the Deployments' status can lag behind
/// their pods by seconds, so the pods are looked at): instances resumed a
/// moment ago, or a pod being replaced, are not a failed checkpoint, and a
/// manual trigger stays pending meanwhile. Past the grace it is taken, and
/// fails naming the pod, so a lasting cause is reported, not hidden.
pub async fn run_due(
    pipeline: &Pipeline,
    ctx: &Arc<Context>,
    plan: &Plan,
    status: &mut PipelineStatus,
) -> Duration {
    if in_flight(ctx, plan) {
        return BACKGROUND_POLL;
    }
    if let Some(trigger) = due(&pipeline.spec, status, Timestamp::now()) {
        let key = background_key(plan);
        let ready = every_instance_ready(ctx, plan).await;
        let mut waits = ctx
            .checkpoint_waits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(waiting) = ready {
            let since = *waits.entry(key.clone()).or_insert_with(Instant::now);
            if since.elapsed() < READY_GRACE {
                debug!(pipeline = %plan.pipeline, trigger = trigger.as_str(), reason = %waiting, "a due checkpoint waits for the instances");
                return INSTANCES_POLL;
            }
        }
        waits.remove(&key);
        drop(waits);
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

/// Whether every stage has its desired instances Ready on the plan, as a
/// checkpoint needs them ([`ready_instances`]); the first reason if not.
async fn every_instance_ready(ctx: &Context, plan: &Plan) -> Result<(), CheckpointFailure> {
    let plan_hash = plan.hash();
    for stage in &plan.stages {
        ready_instances(ctx, plan, stage, &plan_hash).await?;
    }
    Ok(())
}
