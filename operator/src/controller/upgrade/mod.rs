//! Changing a running pipeline: suspend and resume, restores from a named
//! checkpoint, and upgrades with a health gate and automatic rollback.
//!
//! `prepare` runs before the workloads are applied and decides what to run
//! (the spec's plan, the last stable one, or the running one held), taking the
//! checkpoints and writing the restores a transition needs. `observe` runs after
//! and moves an upgrade along: Deploying → Observing → Stable, or on a failed
//! health check → RollingBack → RolledBack (or Failed without rollback).
//!
//! Every step is recorded in `status.upgrade` before the next is taken, so an
//! operator restart resumes where the previous one stopped.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use keystone_crds::checkpoint::{CheckpointTrigger, PipelineCheckpoint, Positions, RestorePlan};
use keystone_crds::pipeline::{
    PipelineSpec, PipelineState, RestoreStatus, UpgradeMode, UpgradePhase, UpgradeStatus,
};
use keystone_crds::upgrade::{ChangeClass, classify};

use super::workloads::Target;
use super::*;
use crate::checkpoint as ckpt;
use crate::rollout::{self, HealthSample};

/// The condition that says whether the spec's current generation runs.
pub const SPEC_APPLIED: &str = "SpecApplied";
/// How long a new version may take to become ready, beyond its health window.
const DEPLOY_GRACE: Duration = Duration::from_secs(180);
/// How long stopped instances may take to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// How often an upgrade in progress is looked at.
const WATCH_INTERVAL: Duration = Duration::from_secs(3);

/// What `prepare` decided.
pub(super) enum Prepared {
    /// Apply these workloads.
    Deploy(Box<Target>),
    /// Keep what runs untouched and look again after this long.
    Hold(Duration),
}

fn deployed() -> Cond {
    Cond::new(SPEC_APPLIED, true, "Deployed", "the current spec runs")
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn spec_json(spec: &PipelineSpec) -> String {
    serde_json::to_string(spec).unwrap_or_default()
}

fn parse_spec(json: Option<&String>) -> Option<PipelineSpec> {
    json.and_then(|j| serde_json::from_str(j).ok())
}

/// Whether the runtime sees a difference besides the plan: its image or resources.
fn runtime_changes(old: &PipelineSpec, new: &PipelineSpec) -> Vec<String> {
    let mut reasons = Vec::new();
    if old.runtime_image != new.runtime_image {
        reasons.push(format!(
            "the runtime image changed from {} to {}",
            old.runtime_image.as_deref().unwrap_or("the default"),
            new.runtime_image.as_deref().unwrap_or("the default")
        ));
    }
    if old.resources != new.resources {
        reasons.push("the runtime resources changed".to_owned());
    }
    reasons
}

/// The plan of a deployed version, from its (immutable) ConfigMap.
async fn load_plan(
    ctx: &Context,
    namespace: &str,
    pipeline: &str,
    hash: &str,
) -> Result<Option<Plan>, Error> {
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(cm) = config_maps
        .get_opt(&resources::plan_config_map_name(pipeline, hash))
        .await?
    else {
        return Ok(None);
    };
    let json = cm
        .data
        .and_then(|d| d.get(resources::PLAN_KEY).cloned())
        .unwrap_or_default();
    Ok(serde_json::from_str(&json).ok())
}

fn restore_id(generation: i64, what: &str) -> String {
    // Unique per pipeline generation and purpose, and short enough for a ConfigMap name.
    format!("g{generation}-{what}-{}", Timestamp::now().as_second())
}

struct Versions<'a> {
    pipeline: &'a Pipeline,
    namespace: String,
    name: String,
    generation: i64,
    plan: &'a Plan,
}

impl Versions<'_> {
    fn target(&self, plan: Plan, spec: PipelineSpec, status: &PipelineStatus) -> Target {
        let hash = plan.hash();
        let restore = status
            .last_restore
            .as_ref()
            .filter(|r| r.plan_hash == hash)
            .map(|r| resources::restore_config_map_name(&self.name, &r.id));
        Target {
            plan,
            spec,
            replicas: None,
            restore,
            keep_plans: status.stable_plan_hash.iter().cloned().collect(),
        }
    }

    fn new_target(&self, status: &PipelineStatus) -> Target {
        self.target(self.plan.clone(), self.pipeline.spec.clone(), status)
    }

    /// What runs now: the deployed plan with the spec it was deployed from.
    async fn running_target(
        &self,
        ctx: &Context,
        status: &PipelineStatus,
    ) -> Result<Target, Error> {
        let hash = status.plan_hash.clone().unwrap_or_default();
        if hash == self.plan.hash() {
            return Ok(self.new_target(status));
        }
        let plan = load_plan(ctx, &self.namespace, &self.name, &hash)
            .await?
            .unwrap_or_else(|| self.plan.clone());
        let spec = parse_spec(status.last_reconciled_spec.as_ref())
            .unwrap_or_else(|| self.pipeline.spec.clone());
        Ok(self.target(plan, spec, status))
    }

    /// The last stable version, if one is known and its plan still exists.
    async fn stable_target(
        &self,
        ctx: &Context,
        status: &PipelineStatus,
    ) -> Result<Option<Target>, Error> {
        let (Some(hash), Some(spec)) = (
            status.stable_plan_hash.clone(),
            parse_spec(status.last_stable_spec.as_ref()),
        ) else {
            return Ok(None);
        };
        Ok(load_plan(ctx, &self.namespace, &self.name, &hash)
            .await?
            .map(|plan| self.target(plan, spec, status)))
    }
}

/// Scales every stage of `running` to zero and waits until its pods are gone,
/// so nothing processes while a restore is written.
async fn stop_instances(
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
async fn write_restore(
    pipeline: &Pipeline,
    ctx: &Context,
    plan: &Plan,
    restore: &RestorePlan,
    reason: &str,
    nonce: Option<String>,
    status: &mut PipelineStatus,
) -> Result<String, Error> {
    let owner = controller_owner(pipeline)?;
    let cm = resources::restore_config_map(plan, restore, &owner).map_err(|source| {
        Error::Serialize {
            what: "restore",
            source,
        }
    })?;
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
    status.last_restore = Some(RestoreStatus {
        id: restore.id.clone(),
        checkpoint: restore.checkpoint.clone(),
        nonce,
        reason: reason.to_owned(),
        time: now(),
        plan_hash: plan.hash(),
    });
    Ok(resources::restore_config_map_name(
        &plan.pipeline,
        &restore.id,
    ))
}

/// A restore of `plan` to `checkpoint`: the instances of `running` are stopped
/// first, then the later stages' inputs are read to their ends.
#[allow(clippy::too_many_arguments)]
async fn restore_to(
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

/// Decides what to run before the workloads are applied.
pub(super) async fn prepare(
    pipeline: &Pipeline,
    ctx: &Context,
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

    // Never deployed: nothing to carry over.
    let Some(deployed_hash) = observed.status.plan_hash.clone() else {
        observed.status.last_reconciled_spec = Some(spec_json(spec));
        let mut target = v.new_target(&observed.status);
        if spec.state == PipelineState::Suspended {
            target.replicas = Some(0);
        }
        return Ok(Prepared::Deploy(Box::new(target)));
    };

    // Suspend: stop at a checkpoint, then scale to zero. Resuming needs nothing
    // special: the stopped instances committed nothing after the checkpoint.
    if spec.state == PipelineState::Suspended {
        let mut running = v.running_target(ctx, &observed.status).await?;
        if observed.status.phase != Some(PipelinePhase::Suspended)
            && instances_ready(ctx, &running.plan).await?
        {
            let pins = pinned(&observed.status);
            let taken = ckpt::checkpoint_now(
                ctx,
                pipeline,
                &running.plan,
                CheckpointTrigger::Suspend,
                true,
                &mut observed.status,
                &pins,
            )
            .await;
            match taken {
                Ok(_) => {}
                Err(failure) => {
                    observed.set(&Cond::new(
                        SPEC_APPLIED,
                        false,
                        "SuspendCheckpointFailed",
                        format!("the pipeline keeps running until a checkpoint at suspend succeeds: {failure}"),
                    ));
                    return Ok(Prepared::Hold(Duration::from_secs(30)));
                }
            }
        }
        running.replicas = Some(0);
        return Ok(Prepared::Deploy(Box::new(running)));
    }

    // A restore the user asked for.
    if let Some(request) = &spec.restore {
        let done = observed.status.last_restore_request.as_ref() == Some(request);
        if !done {
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
                return roll_back(pipeline, ctx, &v, upgrade, observed, desired).await;
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
        observed.status.last_reconciled_spec = Some(spec_json(spec));
        return Ok(Prepared::Deploy(Box::new(v.new_target(&observed.status))));
    }

    // A change: classify it on the compiled plans.
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
    };
    let mut upgrade = UpgradeStatus {
        change: change.to_owned(),
        reasons: reasons.clone(),
        ..started
    };
    if state_incompatible && !spec.upgrade.allow_state_reset {
        let message = format!(
            "the running state cannot serve the new spec ({}); the previous version keeps running. Set spec.upgrade.allowStateReset: true to drop that state and roll out",
            reasons.join("; ")
        );
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
        observed.status.upgrade = Some(upgrade);
        observed.set(&Cond::new(
            SPEC_APPLIED,
            false,
            "StateIncompatible",
            message,
        ));
        return Ok(Prepared::Deploy(Box::new(running)));
    }
    let stateless = spec.upgrade.mode == UpgradeMode::Stateless;
    let state_reset = state_incompatible || stateless;

    // The rollback point: a fresh checkpoint, or the last one (LastState, Stateless, Scale).
    let fresh = spec.upgrade.mode == UpgradeMode::Checkpoint && change != "Scale";
    if fresh && instances_ready(ctx, &running.plan).await? {
        // The stable version's rollback point stays pinned until this upgrade has its own.
        let pins = pinned(&observed.status);
        let taken = ckpt::checkpoint_now(
            ctx,
            pipeline,
            &running.plan,
            CheckpointTrigger::Upgrade,
            // Always a stop checkpoint: its cut is aligned across stages (what a
            // rollback's restore of later stages relies on), and the new version
            // starts exactly there. With Rolling the stopped instances hand
            // their partitions over as they are replaced.
            true,
            &mut observed.status,
            &pins,
        )
        .await;
        match taken {
            Ok(checkpoint) => {
                upgrade.checkpoint = Some(checkpoint.id.clone());
            }
            Err(failure) => {
                let message = format!(
                    "the checkpoint before the upgrade failed, so the previous version keeps running and the upgrade is retried: {failure}"
                );
                upgrade.phase = UpgradePhase::Blocked;
                upgrade.message = Some(message.clone());
                observed.status.upgrade = Some(upgrade);
                observed.set(&Cond::new(SPEC_APPLIED, false, "CheckpointFailed", message));
                return Ok(Prepared::Hold(Duration::from_secs(30)));
            }
        }
    } else if change != "Scale" {
        upgrade.checkpoint = observed
            .status
            .last_checkpoint
            .as_ref()
            .filter(|c| c.plan_hash.as_deref() == Some(deployed_hash.as_str()))
            .map(|c| c.id.clone());
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
    observed.status.upgrade = Some(upgrade);
    observed.status.plan_hash = Some(new_hash);
    observed.status.last_reconciled_spec = Some(spec_json(spec));
    observed.set(&Cond::new(SPEC_APPLIED, false, "Upgrading", note));
    Ok(Prepared::Deploy(Box::new(v.new_target(&observed.status))))
}

/// Checkpoints an upgrade or a suspend must keep beyond the retention count.
fn pinned(status: &PipelineStatus) -> Vec<String> {
    status
        .upgrade
        .iter()
        .filter_map(|u| u.checkpoint.clone())
        .collect()
}

/// The pods of every stage of `plan`'s pipeline, of any version.
async fn pipeline_pods(ctx: &Context, plan: &Plan) -> Result<Vec<Pod>, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &plan.namespace);
    let selector = resources::pipeline_selector(&plan.pipeline);
    Ok(pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items)
}

/// Whether any instance of `plan` is ready (there is something to checkpoint).
async fn instances_ready(ctx: &Context, plan: &Plan) -> Result<bool, Error> {
    Ok(pipeline_pods(ctx, plan)
        .await?
        .iter()
        .any(resources::pod_ready))
}

/// Why a checkpoint of another plan cannot be restored into the current one, if it cannot.
async fn restore_incompatibility(
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

/// Runs the last stable version again, restored to the checkpoint taken
/// before the failed upgrade, replaying what came after it without writing
/// again what the failed version already delivered.
async fn roll_back(
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

/// What the health gate reads of the instances of `plan_hash`.
async fn sample_health(
    ctx: &Context,
    plan: &Plan,
    failing: &[String],
) -> Result<HealthSample, Error> {
    let hash = plan.hash();
    let first_step = plan
        .stages
        .first()
        .and_then(|s| s.steps.first())
        .map(|s| format!("step=\"{}\"", s.name));
    let mut sample = HealthSample {
        failing_stages: failing.to_vec(),
        ..HealthSample::default()
    };
    for pod in pipeline_pods(ctx, plan).await? {
        let runs_plan = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(resources::ANNOTATION_PLAN_HASH))
            .is_some_and(|h| *h == hash);
        if !runs_plan {
            continue;
        }
        let status = pod.status.clone().unwrap_or_default();
        sample.restarts += status
            .container_statuses
            .iter()
            .flatten()
            .map(|c| c.restart_count)
            .sum::<i32>();
        let Some(ip) = status.pod_ip.as_deref() else {
            continue;
        };
        if !resources::pod_ready(&pod) {
            continue;
        }
        // A pod that cannot answer now is judged by its restarts and readiness.
        let Ok(text) = ckpt::pod_get(ip, resources::HTTP_PORT, "/metrics").await else {
            continue;
        };
        let stage_is_first = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(resources::LABEL_STAGE))
            .is_some_and(|s| plan.stages.first().is_some_and(|first| first.name == *s));
        if stage_is_first && let Some(label) = &first_step {
            sample.events_in +=
                rollout::metric_sum(&text, "keystone_step_events_in_total", Some(label)) as u64;
        }
        sample.dead_lettered +=
            rollout::metric_sum(&text, "keystone_step_events_dead_lettered_total", None) as u64;
        // Documents a sink's destination refused went to the dead letters too.
        sample.dead_lettered += rollout::metric_sum(
            &text,
            "keystone_sink_items_total",
            Some(r#"result="failed""#),
        ) as u64;
        sample.sinks_held += rollout::metric_sum(&text, "keystone_sink_intake_held", None) as i64;
        sample.lag += rollout::metric_sum(&text, "keystone_consumer_lag", None) as i64;
    }
    Ok(sample)
}

fn elapsed_since(time: &Time) -> Duration {
    let seconds = Timestamp::now().as_second() - time.0.as_second();
    Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

/// Moves an upgrade along after the workloads were applied; returns how soon
/// to look again while one is in progress.
pub(super) async fn observe(
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

/// The phase an upgrade shows, over what the conditions alone say.
pub(super) fn phase_override(status: &PipelineStatus, generation: i64) -> Option<PipelinePhase> {
    let upgrade = status.upgrade.as_ref()?;
    match upgrade.phase {
        UpgradePhase::Deploying
        | UpgradePhase::Observing
        | UpgradePhase::RollingBack
        | UpgradePhase::Checkpointing => Some(PipelinePhase::Upgrading),
        UpgradePhase::RolledBack | UpgradePhase::Failed | UpgradePhase::Blocked
            if upgrade.generation == generation =>
        {
            Some(PipelinePhase::Degraded)
        }
        _ => None,
    }
}
