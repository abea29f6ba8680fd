//! Moving an upgrade along after the workloads were applied: Deploying →
//! Observing → Stable, or on a failed health check → RollingBack → RolledBack
//! (or Failed without rollback).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use keystone_crds::pipeline::{Pipeline, PipelineState, PipelineStatus, UpgradePhase};

use super::health::sample_health;
use super::{
    DEPLOY_GRACE, SPEC_APPLIED, WATCH_INTERVAL, deployed, now, parse_spec, runtime_changes,
    spec_json,
};
use crate::context::Context;
use crate::controller::Observed;
use crate::controller::workloads::{Target, Workloads};
use crate::error::Error;
use crate::rollout;
use crate::status::Cond;

fn elapsed_since(time: &Time) -> Duration {
    let seconds = Timestamp::now().as_second() - time.0.as_second();
    Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

/// Moves an upgrade along after the workloads were applied; returns how soon
/// to look again while one is in progress.
pub(in crate::controller) async fn observe(
    pipeline: &Pipeline,
    ctx: &Context,
    target: &Target,
    workloads: &Workloads,
    observed: &mut Observed,
) -> Result<Option<Duration>, Error> {
    if pipeline.spec.state == PipelineState::Suspended {
        // The phase is set by the caller, over what the conditions say.
        observed.set(&Cond::new(
            SPEC_APPLIED,
            true,
            "Suspended",
            "suspended at a checkpoint; set spec.state: Running to resume",
        ));
        return Ok(None);
    }
    let all_ready = workloads.rolled_out
        && workloads
            .stages
            .iter()
            .all(|s| s.ready_replicas >= s.replicas);
    let Some(mut upgrade) = observed.status.upgrade.clone() else {
        // A first deploy (or a restore) becomes the stable version once it runs.
        if all_ready
            && observed.status.stable_plan_hash.as_deref() != Some(target.plan.hash().as_str())
        {
            observed.status.stable_plan_hash = Some(target.plan.hash());
            observed.status.last_stable_spec = Some(spec_json(&target.spec));
        }
        if all_ready {
            observed.set(&deployed());
        }
        return Ok(None);
    };
    if upgrade.generation != pipeline.metadata.generation.unwrap_or_default()
        && !matches!(upgrade.phase, UpgradePhase::Blocked)
    {
        // A newer spec replaced this upgrade's target; `prepare` started the next one or none was needed.
        if all_ready && observed.status.plan_hash.as_deref() == Some(target.plan.hash().as_str()) {
            observed.set(&deployed());
        }
        return Ok(None);
    }
    let gate = &pipeline.spec.upgrade;
    let before = upgrade.clone();
    let mut again = Some(WATCH_INTERVAL);
    match upgrade.phase {
        UpgradePhase::Deploying | UpgradePhase::Observing => {
            let sample = sample_health(ctx, &target.plan, &workloads.failing).await?;
            let window = gate.health_window.as_std();
            let window_done = upgrade
                .ready_since
                .as_ref()
                .is_some_and(|t| elapsed_since(t) >= window);
            let mut verdict = rollout::health_verdict(&gate.health_gate, &sample, window_done);
            if verdict.is_none() && upgrade.phase == UpgradePhase::Deploying {
                if all_ready {
                    upgrade.phase = UpgradePhase::Observing;
                    upgrade.ready_since = Some(now());
                } else if elapsed_since(&upgrade.started) > window + DEPLOY_GRACE {
                    verdict = Some(format!(
                        "the new version was not ready {}s after the upgrade started",
                        (window + DEPLOY_GRACE).as_secs()
                    ));
                }
            }
            if let Some(reason) = verdict {
                // The stable version differs in its plan or in what the pods run (image, resources).
                let stable_differs = observed.status.stable_plan_hash.as_ref().is_some_and(|h| {
                    *h != upgrade.to_plan_hash
                        || parse_spec(observed.status.last_stable_spec.as_ref()).is_some_and(
                            |stable| !runtime_changes(&stable, &pipeline.spec).is_empty(),
                        )
                });
                if gate.rollback_on_failure && stable_differs {
                    upgrade.phase = UpgradePhase::RollingBack;
                    upgrade.message = Some(format!(
                        "{reason}; rolling back to plan {}{}",
                        observed.status.stable_plan_hash.clone().unwrap_or_default(),
                        upgrade
                            .checkpoint
                            .as_ref()
                            .map(|c| format!(" from checkpoint {c}"))
                            .unwrap_or_else(|| " from the last committed state".to_owned())
                    ));
                    again = Some(Duration::ZERO);
                } else {
                    upgrade.phase = UpgradePhase::Failed;
                    let why = if gate.rollback_on_failure {
                        "there is no earlier stable version to roll back to"
                    } else {
                        "rollbackOnFailure is off"
                    };
                    upgrade.message =
                        Some(format!("{reason}; {why}, so the new version keeps running"));
                    again = None;
                }
                let message = upgrade.message.clone().unwrap_or_default();
                ctx.publish(pipeline, true, "UpgradeFailed", "Upgrade", message.clone())
                    .await;
                observed.set(&Cond::new(SPEC_APPLIED, false, "UpgradeFailed", message));
            } else if upgrade.phase == UpgradePhase::Observing && window_done {
                upgrade.phase = UpgradePhase::Stable;
                observed.status.stable_plan_hash = Some(upgrade.to_plan_hash.clone());
                observed.status.last_stable_spec = Some(spec_json(&pipeline.spec));
                let note = format!(
                    "plan {} passed its {}s health window and is the stable version",
                    upgrade.to_plan_hash,
                    window.as_secs()
                );
                ctx.publish(pipeline, false, "UpgradeSucceeded", "Upgrade", note.clone())
                    .await;
                observed.set(&Cond::new(SPEC_APPLIED, true, "Upgraded", note));
                again = None;
            }
        }
        UpgradePhase::RollingBack => {
            if all_ready && observed.status.plan_hash == observed.status.stable_plan_hash {
                upgrade.phase = UpgradePhase::RolledBack;
                let note = format!(
                    "rolled back to plan {}: {}",
                    target.plan.hash(),
                    upgrade.message.clone().unwrap_or_default()
                );
                ctx.publish(pipeline, true, "RolledBack", "Rollback", note.clone())
                    .await;
                observed.set(&Cond::new(SPEC_APPLIED, false, "RolledBack", note));
                again = None;
            }
        }
        UpgradePhase::Stable => {
            observed.set(&Cond::new(
                SPEC_APPLIED,
                true,
                "Upgraded",
                "the current spec runs and passed its health window",
            ));
            again = None;
        }
        UpgradePhase::RolledBack
        | UpgradePhase::Failed
        | UpgradePhase::Blocked
        | UpgradePhase::Checkpointing => {
            again = None;
        }
    }
    if upgrade != before {
        observed.status.upgrade = Some(upgrade);
    }
    Ok(again)
}

/// At once when this reconcile replaced the stable plan. Its ConfigMap stays
/// until the new stable plan is recorded (a rollback must find it until
/// then); the next reconcile, which reads that record, removes it, and nothing
/// else wakes that reconcile: the operator's own status writes do not.
pub(in crate::controller) fn stable_replaced(
    before: Option<&PipelineStatus>,
    now: &PipelineStatus,
) -> Option<Duration> {
    before
        .and_then(|s| s.stable_plan_hash.as_ref())
        .is_some_and(|old| now.stable_plan_hash.as_ref() != Some(old))
        .then_some(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stable(hash: Option<&str>) -> PipelineStatus {
        PipelineStatus {
            stable_plan_hash: hash.map(str::to_owned),
            ..PipelineStatus::default()
        }
    }

    #[test]
    fn a_replaced_stable_plan_asks_for_the_reconcile_that_removes_its_config_map() {
        let replaced = stable_replaced(Some(&stable(Some("old"))), &stable(Some("new")));
        assert_eq!(replaced, Some(Duration::ZERO));
        // A first stable plan replaces none; an unchanged one has nothing to remove.
        assert_eq!(
            stable_replaced(Some(&stable(None)), &stable(Some("new"))),
            None
        );
        assert_eq!(stable_replaced(None, &stable(Some("new"))), None);
        assert_eq!(
            stable_replaced(Some(&stable(Some("same"))), &stable(Some("same"))),
            None
        );
    }
}
