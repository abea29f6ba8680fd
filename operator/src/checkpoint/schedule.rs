//! When a periodic or manual checkpoint is due.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use keystone_crds::checkpoint::CheckpointTrigger;
use keystone_crds::pipeline::{Pipeline, PipelinePhase, PipelineSpec, PipelineStatus};

use super::{FAILURE_RETRY, MIN_INTERVAL};

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
pub(super) fn periodic_in(
    spec: &PipelineSpec,
    status: &PipelineStatus,
    now: Timestamp,
) -> Option<Duration> {
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

pub(super) fn due(
    spec: &PipelineSpec,
    status: &PipelineStatus,
    now: Timestamp,
) -> Option<CheckpointTrigger> {
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

pub(super) fn next_in(spec: &PipelineSpec, status: &PipelineStatus, now: Timestamp) -> Duration {
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
