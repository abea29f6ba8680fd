//! What the health gate reads of a version's instances: their pods, restarts,
//! readiness and metrics.

use k8s_openapi::api::core::v1::Pod;
use keystone_crds::Plan;
use kube::Api;
use kube::api::ListParams;

use crate::checkpoint as ckpt;
use crate::context::Context;
use crate::error::Error;
use crate::resources;
use crate::rollout::{self, HealthSample};

/// The pods of every stage of `plan`'s pipeline, of any version.
pub(super) async fn pipeline_pods(ctx: &Context, plan: &Plan) -> Result<Vec<Pod>, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &plan.namespace);
    let selector = resources::pipeline_selector(&plan.pipeline);
    Ok(pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items)
}

/// Whether any instance of `plan`'s stages is ready (there is something to
/// checkpoint; a capture takes no checkpoints).
pub(super) async fn instances_ready(ctx: &Context, plan: &Plan) -> Result<bool, Error> {
    Ok(pipeline_pods(ctx, plan)
        .await?
        .iter()
        .any(|pod| resources::pod_ready(pod) && !resources::is_source_pod(pod)))
}
/// What the health gate reads of the instances of `plan_hash`.
pub(super) async fn sample_health(
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
