//! The decision taken before the workloads are applied: what runs (the spec's
//! plan, the last stable one, or the running one held), and the checkpoints
//! and restores a suspend, resume, restore or upgrade needs first.

use std::sync::Arc;
use std::time::Duration;

use keystone_crds::Plan;
use keystone_crds::checkpoint::CheckpointTrigger;
use keystone_crds::pipeline::{
    Pipeline, PipelinePhase, PipelineState, PipelineStatus, UpgradeMode, UpgradePhase,
    UpgradeStatus,
};
use keystone_crds::upgrade::{ChangeClass, classify};

use super::health::instances_ready;
use super::incarnation;
use super::restore::{
    restore_incompatibility, restore_to, roll_back, stop_instances, write_restore,
};
use super::{
    Prepared, SPEC_APPLIED, Versions, now, parse_spec, restore_id, runtime_changes, spec_json,
};
use crate::checkpoint as ckpt;
use crate::context::Context;
use crate::controller::Observed;
use crate::error::Error;
use crate::rollout;
use crate::status::Cond;
use crate::topics::DesiredTopic;

/// How soon a change held by a background checkpoint is looked at again.
const BACKGROUND_WAIT: Duration = Duration::from_secs(1);

/// An upgrade still taking its checkpoint when the spec went back to what
/// runs (a revert, or GitOps self-heal undoing a change made by hand) never
/// rolls out: it ends Blocked, saying so, or the pipeline would stay
/// Upgrading. The reconcile resumes the instances its stop checkpoint left.
async fn withdraw_unstarted_upgrade(
    ctx: &Arc<Context>,
    pipeline: &Pipeline,
    observed: &mut Observed,
    new_hash: &str,
) {
    let Some(upgrade) = observed.status.upgrade.as_mut() else {
        return;
    };
    if upgrade.phase != UpgradePhase::Checkpointing || upgrade.to_plan_hash == new_hash {
        return;
    }
    let message = format!(
        "withdrawn: the spec went back to the running version while the upgrade of generation {} to plan {} took its checkpoint; nothing changed",
        upgrade.generation, upgrade.to_plan_hash
    );
    upgrade.phase = UpgradePhase::Blocked;
    upgrade.message = Some(message.clone());
    observed.set(&super::deployed());
    ctx.publish(pipeline, false, "UpgradeWithdrawn", "Upgrade", message)
        .await;
}

/// Decides what to run before the workloads are applied.
pub(in crate::controller) async fn prepare(
    pipeline: &Pipeline,
    ctx: &Arc<Context>,
    plan: &Plan,
    observed: &mut Observed,
    desired: &[DesiredTopic],
) -> Result<Prepared, Error> {
    let v = Versions {
        pipeline,
        namespace: observed.namespace.clone(),
        name: observed.name.clone(),
        generation: pipeline.metadata.generation.unwrap_or_default(),
        plan,
    };
    let spec = &pipeline.spec;
    let new_hash = plan.hash();

    // Never deployed: whose state it starts from is settled first (an earlier
    // pipeline of the same name may have left some), then nothing to carry over.
    let Some(deployed_hash) = observed.status.plan_hash.clone() else {
        if let Some(wait) = incarnation::settle(pipeline, ctx, plan, observed).await? {
            return Ok(Prepared::Hold(wait));
        }
        observed.status.last_reconciled_spec = Some(spec_json(spec));
        let mut target = v.new_target(&observed.status);
        if spec.state == PipelineState::Suspended {
            target.replicas = Some(0);
        }
        return Ok(Prepared::Deploy(Box::new(target)));
    };

    incarnation::record_existing(pipeline, ctx, observed).await?;

    // Suspend: stop at a checkpoint, then scale to zero. Resuming needs nothing
    // special: the stopped instances committed nothing after the checkpoint.
    // The checkpoint runs in the background (a hung pod must not hold the
    // reconcile); the reconcile that collects it scales to zero.
    if spec.state == PipelineState::Suspended {
        if ckpt::in_flight(ctx, plan) {
            return Ok(Prepared::Hold(BACKGROUND_WAIT));
        }
        let mut running = v.running_target(ctx, &observed.status).await?;
        let running_hash = running.plan.hash();
        let taken = observed
            .finished_checkpoint
            .take_if(|f| f.is_stop_for(CheckpointTrigger::Suspend, &running_hash));
        match taken.map(|f| f.result) {
            Some(Ok(_)) => {}
            Some(Err(failure)) => {
                observed.set(&Cond::new(
                    SPEC_APPLIED,
                    false,
                    "SuspendCheckpointFailed",
                    format!("the pipeline keeps running until a checkpoint at suspend succeeds: {failure}"),
                ));
                return Ok(Prepared::Hold(Duration::from_secs(30)));
            }
            // Not yet taken: take it, unless nothing runs to take it of (a
            // stage not Ready commits nothing, as after a stop checkpoint).
            None if observed.status.phase != Some(PipelinePhase::Suspended)
                && instances_ready(ctx, &running.plan).await? =>
            {
                ckpt::start_background(
                    ctx,
                    pipeline,
                    &running.plan,
                    CheckpointTrigger::Suspend,
                    ckpt::Purpose::Stop,
                    true,
                    &mut observed.status,
                );
                observed.set(&Cond::new(
                    SPEC_APPLIED,
                    false,
                    "Suspending",
                    "stopping every instance at a checkpoint before scaling to zero",
                ));
                return Ok(Prepared::Hold(BACKGROUND_WAIT));
            }
            None => {}
        }
        running.replicas = Some(0);
        return Ok(Prepared::Deploy(Box::new(running)));
    }

    // A restore the user asked for.
    if let Some(request) = &spec.restore {
        let done = observed.status.last_restore_request.as_ref() == Some(request);
        if !done {
            if ckpt::in_flight(ctx, plan) {
                return Ok(Prepared::Hold(BACKGROUND_WAIT));
            }
            // A restore replaces the instances: a stop checkpoint that just
            // finished leaves them stopped, as the restore wants them.
            observed.finished_checkpoint = None;
            let checkpoint = match ckpt::load_checkpoint(
                ctx,
                &v.namespace,
                &v.name,
                &request.checkpoint,
            )
            .await
            {
                Ok(checkpoint) => checkpoint,
                Err(error) => {
                    observed.set(&Cond::new(
                        SPEC_APPLIED,
                        false,
                        "RestoreFailed",
                        format!("cannot restore checkpoint {}: {error}", request.checkpoint),
                    ));
                    return Ok(Prepared::Hold(Duration::from_secs(60)));
                }
            };
            if checkpoint.plan_hash != new_hash
                && let Some(reason) = restore_incompatibility(ctx, &v, &checkpoint).await?
            {
                observed.set(&Cond::new(SPEC_APPLIED, false, "RestoreRefused", reason));
                return Ok(Prepared::Hold(Duration::from_secs(60)));
            }
            let running = v.running_target(ctx, &observed.status).await?;
            let id = restore_id(v.generation, "restore");
            let restore = restore_to(
                pipeline,
                ctx,
                &running,
                plan,
                &checkpoint,
                id,
                false,
                desired,
            )
            .await?;
            write_restore(
                pipeline,
                ctx,
                plan,
                &restore,
                "Requested",
                request.nonce.clone(),
                &mut observed.status,
            )
            .await?;
            observed.status.last_restore_request = Some(request.clone());
            observed.status.plan_hash = Some(new_hash.clone());
            observed.status.last_reconciled_spec = Some(spec_json(spec));
            ctx.publish(
                pipeline,
                false,
                "RestoreStarted",
                "Restore",
                format!(
                    "redeploying from checkpoint {} (restore {})",
                    checkpoint.id, restore.id
                ),
            )
            .await;
            return Ok(Prepared::Deploy(Box::new(v.new_target(&observed.status))));
        }
    }

    // An upgrade of this generation already under way or decided.
    if let Some(upgrade) = observed.status.upgrade.clone()
        && upgrade.generation == v.generation
        && upgrade.to_plan_hash == new_hash
    {
        match upgrade.phase {
            UpgradePhase::Deploying
            | UpgradePhase::Observing
            | UpgradePhase::Stable
            | UpgradePhase::Failed => {
                return Ok(Prepared::Deploy(Box::new(v.new_target(&observed.status))));
            }
            UpgradePhase::RollingBack | UpgradePhase::RolledBack => {
                return roll_back(pipeline, ctx, &v, *upgrade, observed, desired).await;
            }
            UpgradePhase::Checkpointing | UpgradePhase::Blocked => {}
        }
    }

    let running_spec = parse_spec(observed.status.last_reconciled_spec.as_ref());
    let runtime_reasons = running_spec
        .as_ref()
        .map(|old| runtime_changes(old, spec))
        .unwrap_or_default();
    if deployed_hash == new_hash && runtime_reasons.is_empty() {
        withdraw_unstarted_upgrade(ctx, pipeline, observed, &new_hash).await;
        observed.status.last_reconciled_spec = Some(spec_json(spec));
        return Ok(Prepared::Deploy(Box::new(v.new_target(&observed.status))));
    }

    // A change: classify it on the compiled plans. Whatever it needs (a
    // checkpoint, a stop, a rollout) waits for a background checkpoint that
    // may hold stopped instances.
    if ckpt::in_flight(ctx, plan) {
        return Ok(Prepared::Hold(BACKGROUND_WAIT));
    }
    let running = v.running_target(ctx, &observed.status).await?;
    let mut class = if deployed_hash == new_hash {
        ChangeClass::Ignore
    } else {
        classify(&running.plan, plan)
    };
    if !runtime_reasons.is_empty() {
        class = match class {
            ChangeClass::Ignore | ChangeClass::Scale { .. } => ChangeClass::Upgrade {
                reasons: runtime_reasons,
            },
            ChangeClass::Upgrade { mut reasons } => {
                reasons.extend(runtime_reasons);
                ChangeClass::Upgrade { reasons }
            }
            incompatible => incompatible,
        };
    }
    let started = UpgradeStatus {
        phase: UpgradePhase::Deploying,
        generation: v.generation,
        change: String::new(),
        reasons: Vec::new(),
        from_plan_hash: Some(deployed_hash.clone()),
        to_plan_hash: new_hash.clone(),
        checkpoint: None,
        state_reset: false,
        started: now(),
        ready_since: None,
        message: None,
    };
    let (change, reasons, state_incompatible) = match class {
        ChangeClass::Ignore => {
            // Nothing the runtime reads changed: keep the instances as they are.
            withdraw_unstarted_upgrade(ctx, pipeline, observed, &new_hash).await;
            observed.status.last_reconciled_spec = Some(spec_json(spec));
            return Ok(Prepared::Deploy(Box::new(running)));
        }
        ChangeClass::Scale { stages } => (
            "Scale",
            vec![format!(
                "the parallelism of stages {} changed",
                stages.join(", ")
            )],
            false,
        ),
        ChangeClass::Upgrade { reasons } => ("Upgrade", reasons, false),
        ChangeClass::StateIncompatible { reasons } => ("StateIncompatible", reasons, true),
        ChangeClass::TableIncompatible { reasons } => ("TableIncompatible", reasons, false),
    };
    let mut upgrade = UpgradeStatus {
        change: change.to_owned(),
        reasons: reasons.clone(),
        ..started
    };
    let blocked = match change {
        // No setting makes a table hold what it cannot: the user writes a new
        // table (or path), or changes the output back.
        "TableIncompatible" => Some(format!(
            "a lake sink's table cannot hold the new output ({}); the previous version keeps running. Write the sink to a new table or path, or keep the output compatible (new columns optional)",
            reasons.join("; ")
        )),
        "StateIncompatible" if !spec.upgrade.allow_state_reset => Some(format!(
            "the running state cannot serve the new spec ({}); the previous version keeps running. Set spec.upgrade.allowStateReset: true to drop that state and roll out",
            reasons.join("; ")
        )),
        _ => None,
    };
    if let Some(message) = blocked {
        upgrade.phase = UpgradePhase::Blocked;
        upgrade.message = Some(message.clone());
        announce_once(
            ctx,
            pipeline,
            &observed.status,
            &upgrade,
            true,
            "UpgradeBlocked",
            &message,
        )
        .await;
        observed.status.upgrade = Some(Box::new(upgrade));
        observed.set(&Cond::new(SPEC_APPLIED, false, change, message));
        return Ok(Prepared::Deploy(Box::new(running)));
    }
    let stateless = spec.upgrade.mode == UpgradeMode::Stateless;
    let state_reset = state_incompatible || stateless;

    // The rollback point: a fresh checkpoint, or the last one (LastState,
    // Stateless, Scale). A fresh one runs in the background with the upgrade
    // in phase Checkpointing; the reconcile that collects it goes on.
    let fresh = spec.upgrade.mode == UpgradeMode::Checkpoint && change != "Scale";
    let running_hash = running.plan.hash();
    // A scale keeps the instances that run (a stopped one would stay
    // stopped): a stop checkpoint taken for an earlier form of the change is
    // left to the reconcile, which resumes them.
    let taken = observed
        .finished_checkpoint
        .take_if(|f| change != "Scale" && f.is_stop_for(CheckpointTrigger::Upgrade, &running_hash));
    match taken.map(|f| f.result) {
        Some(Ok(id)) if fresh => upgrade.checkpoint = Some(id),
        Some(Err(failure)) if fresh => {
            let message = format!(
                "the checkpoint before the upgrade failed, so the previous version keeps running and the upgrade is retried: {failure}"
            );
            upgrade.phase = UpgradePhase::Blocked;
            upgrade.message = Some(message.clone());
            observed.status.upgrade = Some(Box::new(upgrade));
            observed.set(&Cond::new(SPEC_APPLIED, false, "CheckpointFailed", message));
            return Ok(Prepared::Hold(Duration::from_secs(30)));
        }
        // Taken for a change that has since changed into one without a
        // fresh checkpoint: the instances it stopped are replaced all the
        // same, and it is the newest rollback point.
        Some(Ok(id)) => upgrade.checkpoint = Some(id),
        Some(Err(_)) => upgrade.checkpoint = last_checkpoint_of(&observed.status, &deployed_hash),
        None if fresh && instances_ready(ctx, &running.plan).await? => {
            // Always a stop checkpoint: its cut is aligned across stages (what
            // a rollback's restore of later stages relies on), and the new
            // version starts exactly there. With Rolling the stopped instances
            // hand their partitions over as they are replaced.
            ckpt::start_background(
                ctx,
                pipeline,
                &running.plan,
                CheckpointTrigger::Upgrade,
                ckpt::Purpose::Stop,
                true,
                &mut observed.status,
            );
            let message = format!(
                "{change} from plan {deployed_hash} to {new_hash}: taking the checkpoint it starts from and can roll back to"
            );
            upgrade.phase = UpgradePhase::Checkpointing;
            if let Some(previous) = &observed.status.upgrade
                && previous.generation == upgrade.generation
                && previous.to_plan_hash == upgrade.to_plan_hash
            {
                upgrade.started = previous.started.clone();
            }
            observed.status.upgrade = Some(Box::new(upgrade));
            observed.set(&Cond::new(SPEC_APPLIED, false, "Checkpointing", message));
            return Ok(Prepared::Hold(BACKGROUND_WAIT));
        }
        // Not fresh, or no instance to ask (a stage not Ready commits
        // nothing): the last checkpoint of the running plan.
        None if change != "Scale" => {
            upgrade.checkpoint = last_checkpoint_of(&observed.status, &deployed_hash);
        }
        None => {}
    }

    if state_reset {
        stop_instances(pipeline, ctx, &running, desired).await?;
        let start = if stateless {
            spec.upgrade.start_from
        } else {
            keystone_crds::pipeline::UpgradeStartPosition::Committed
        };
        let reset = rollout::reset_state(&restore_id(v.generation, "reset"), plan, start);
        let reason = if state_incompatible {
            "StateReset"
        } else {
            "Stateless"
        };
        write_restore(
            pipeline,
            ctx,
            plan,
            &reset,
            reason,
            None,
            &mut observed.status,
        )
        .await?;
        upgrade.state_reset = true;
    }
    let note = format!(
        "{change} from plan {deployed_hash} to {new_hash}: {}{}{}",
        reasons.join("; "),
        upgrade
            .checkpoint
            .as_ref()
            .map(|c| format!("; rollback point: checkpoint {c}"))
            .unwrap_or_default(),
        if upgrade.state_reset {
            "; keyed state was reset"
        } else {
            ""
        }
    );
    ctx.publish(pipeline, false, "UpgradeStarted", "Upgrade", note.clone())
        .await;
    observed.status.upgrade = Some(Box::new(upgrade));
    observed.status.plan_hash = Some(new_hash);
    observed.status.last_reconciled_spec = Some(spec_json(spec));
    observed.set(&Cond::new(SPEC_APPLIED, false, "Upgrading", note));
    Ok(Prepared::Deploy(Box::new(v.new_target(&observed.status))))
}

/// The newest checkpoint of the plan with `plan_hash`, if it is the last one taken.
fn last_checkpoint_of(status: &PipelineStatus, plan_hash: &str) -> Option<String> {
    status
        .last_checkpoint
        .as_ref()
        .filter(|c| c.plan_hash.as_deref() == Some(plan_hash))
        .map(|c| c.id.clone())
}
/// Publishes an event the first time an upgrade reaches a state.
async fn announce_once(
    ctx: &Context,
    pipeline: &Pipeline,
    status: &PipelineStatus,
    upgrade: &UpgradeStatus,
    warning: bool,
    reason: &str,
    note: &str,
) {
    let seen = status
        .upgrade
        .as_ref()
        .is_some_and(|u| u.generation == upgrade.generation && u.phase == upgrade.phase);
    if !seen {
        ctx.publish(pipeline, warning, reason, "Upgrade", note.to_owned())
            .await;
    }
}
