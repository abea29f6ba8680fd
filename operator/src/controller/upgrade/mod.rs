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

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use keystone_crds::Plan;
use keystone_crds::pipeline::{
    Pipeline, PipelinePhase, PipelineSpec, PipelineStatus, UpgradePhase,
};
use kube::Api;

use super::workloads::Target;
use crate::context::Context;
use crate::error::Error;
use crate::resources;
use crate::status::Cond;

mod health;
mod incarnation;
mod observe;
mod prepare;
mod restore;

pub use incarnation::{ANNOTATION_ADOPT_STATE, STATE_ORIGIN, STATE_OWNERS};
pub(super) use observe::{observe, stable_replaced};
pub(super) use prepare::prepare;

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

pub(super) fn spec_json(spec: &PipelineSpec) -> String {
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
pub(super) async fn load_plan(
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
