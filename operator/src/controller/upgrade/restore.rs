//! Restores and rollbacks: stopping the instances, writing the restore they
//! apply once, and running the last stable version again from the checkpoint
//! taken before a failed upgrade.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use keystone_crds::Plan;
use keystone_crds::checkpoint::{PipelineCheckpoint, Positions, RestorePlan};
use keystone_crds::pipeline::{Pipeline, PipelineStatus, RestoreStatus, UpgradeStatus};
use keystone_crds::upgrade::{ChangeClass, classify};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};

use super::health::pipeline_pods;
use super::{Prepared, STOP_TIMEOUT, Versions, load_plan, now, restore_id};
use crate::checkpoint as ckpt;
use crate::context::Context;
use crate::controller::workloads::{Target, apply_workloads};
use crate::controller::{Observed, controller_owner};
use crate::error::Error;
use crate::resources;
use crate::rollout;
use crate::topics::DesiredTopic;

/// Scales every stage of `running` to zero and waits until its pods are gone,
/// so nothing processes while a restore is written.
pub(super) async fn stop_instances(
    pipeline: &Pipeline,
    ctx: &Context,
    running: &Target,
    desired: &[DesiredTopic],
) -> Result<(), Error> {
    let stopped = Target {
        plan: running.plan.clone(),
        spec: running.spec.clone(),
        replicas: Some(0),
        restore: running.restore.clone(),
        keep_plans: running.keep_plans.clone(),
    };
    apply_workloads(pipeline, ctx, &stopped, desired).await?;
    let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
    loop {
        let left = pipeline_pods(ctx, &running.plan).await?.len();
        if left == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Error::Stopping(format!(
                "{left} instance(s) of pipeline {} still run {}s after they were told to stop",
                running.plan.pipeline,
                STOP_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Writes the restore ConfigMap and records it as the active restore of `plan`.
pub(super) async fn write_restore(
    pipeline: &Pipeline,
    ctx: &Context,
    plan: &Plan,
    restore: &RestorePlan,
    reason: &str,
    nonce: Option<String>,
    status: &mut PipelineStatus,
) -> Result<String, Error> {
    let owner = controller_owner(pipeline)?;
    let cm = resources::restore_config_map(plan, restore, &owner)
        .map_err(|e| Error::fit("restore", e))?;
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &plan.namespace);
    match config_maps.create(&PostParams::default(), &cm).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    // Earlier restores are done with: every caller stopped the instances that
    // mounted them before writing this one.
    let prefix = resources::restore_config_map_name(&plan.pipeline, "");
    let current = resources::restore_config_map_name(&plan.pipeline, &restore.id);
    let selector = resources::pipeline_selector(&plan.pipeline);
    for old in config_maps
        .list(&ListParams::default().labels(&selector))
        .await?
    {
        let name = old.metadata.name.unwrap_or_default();
        if name.starts_with(&prefix) && name != current {
            match config_maps.delete(&name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    status.last_restore = Some(Box::new(RestoreStatus {
        id: restore.id.clone(),
        checkpoint: restore.checkpoint.clone(),
        nonce,
        reason: reason.to_owned(),
        time: now(),
        plan_hash: plan.hash(),
    }));
    Ok(resources::restore_config_map_name(
        &plan.pipeline,
        &restore.id,
    ))
}

/// A restore of `plan` to `checkpoint`: the instances of `running` are stopped
/// first, then the later stages' inputs are read to their ends.
#[allow(clippy::too_many_arguments)]
pub(super) async fn restore_to(
    pipeline: &Pipeline,
    ctx: &Context,
    running: &Target,
    plan: &Plan,
    checkpoint: &PipelineCheckpoint,
    id: String,
    suppress: bool,
    desired: &[DesiredTopic],
) -> Result<RestorePlan, Error> {
    stop_instances(pipeline, ctx, running, desired).await?;
    let downstream = rollout::downstream_inputs(plan);
    let cluster = ctx.config.resolve_cluster(plan.source.cluster.as_deref());
    let ends: Positions = ckpt::end_offsets(ctx, cluster.as_deref(), &downstream)
        .await
        .map_err(|failure| Error::Restore(failure.reason))?;
    rollout::restore_from_checkpoint(&id, checkpoint, plan, &ends, suppress).map_err(Error::Restore)
}
/// Why a checkpoint of another plan cannot be restored into the current one, if it cannot.
pub(super) async fn restore_incompatibility(
    ctx: &Context,
    v: &Versions<'_>,
    checkpoint: &PipelineCheckpoint,
) -> Result<Option<String>, Error> {
    let Some(old) = load_plan(ctx, &v.namespace, &v.name, &checkpoint.plan_hash).await? else {
        return Ok(Some(format!(
            "checkpoint {} was taken of plan {}, which is no longer kept, so it cannot be checked against the current plan {}",
            checkpoint.id,
            checkpoint.plan_hash,
            v.plan.hash()
        )));
    };
    Ok(match classify(&old, v.plan) {
        ChangeClass::StateIncompatible { reasons } => Some(format!(
            "checkpoint {} holds state the current plan cannot use: {}",
            checkpoint.id,
            reasons.join("; ")
        )),
        _ => None,
    })
}
/// Runs the last stable version again, restored to the checkpoint taken
/// before the failed upgrade, replaying what came after it without writing
/// again what the failed version already delivered.
pub(super) async fn roll_back(
    pipeline: &Pipeline,
    ctx: &Context,
    v: &Versions<'_>,
    upgrade: UpgradeStatus,
    observed: &mut Observed,
    desired: &[DesiredTopic],
) -> Result<Prepared, Error> {
    let Some(stable) = v.stable_target(ctx, &observed.status).await? else {
        return Ok(Prepared::Deploy(Box::new(v.new_target(&observed.status))));
    };
    let stable_hash = stable.plan.hash();
    let rolled = observed.status.last_restore.as_ref().is_some_and(|r| {
        r.reason == "Rollback" && r.plan_hash == stable_hash && r.time.0 >= upgrade.started.0
    });
    let already_running_stable = observed.status.plan_hash.as_deref() == Some(stable_hash.as_str());
    if rolled || (already_running_stable && upgrade.checkpoint.is_none()) {
        return Ok(Prepared::Deploy(Box::new(v.target(
            stable.plan,
            stable.spec,
            &observed.status,
        ))));
    }
    let failed = v.new_target(&observed.status);
    match &upgrade.checkpoint {
        Some(id) => {
            let checkpoint = ckpt::load_checkpoint(ctx, &v.namespace, &v.name, id).await?;
            let restore = restore_to(
                pipeline,
                ctx,
                &failed,
                &stable.plan,
                &checkpoint,
                restore_id(v.generation, "rollback"),
                true,
                desired,
            )
            .await?;
            write_restore(
                pipeline,
                ctx,
                &stable.plan,
                &restore,
                "Rollback",
                None,
                &mut observed.status,
            )
            .await?;
        }
        None => stop_instances(pipeline, ctx, &failed, desired).await?,
    }
    observed.status.plan_hash = Some(stable_hash);
    observed.status.last_reconciled_spec = observed.status.last_stable_spec.clone();
    Ok(Prepared::Deploy(Box::new(v.target(
        stable.plan,
        stable.spec,
        &observed.status,
    ))))
}
