//! The schema registry's part of a Pipeline's reconcile: the conditions it
//! sets when the registry cannot be asked or refuses, and what it resolved.

use keystone_crds::Plan;
use keystone_crds::pipeline::{Pipeline, PipelineStatus};
use keystone_crds::plan::PlanAvroWriter;
use kube::runtime::controller::Action;

use super::Observed;
use crate::context::Context;
use crate::error::Error;
use std::time::Duration;

use crate::registry::{
    Problem, REGISTRY_RECHECK, Resolved, SCHEMA_REGISTRY, WAITING_RECHECK, waiting_pods,
};
use crate::status::{CONTRACTS_VALID, Cond};

/// Records why the registry could not be asked (or refused), and looks
/// again later: nothing deployed is touched.
pub(super) async fn registry_problem(
    pipeline: &Pipeline,
    ctx: &Context,
    observed: &mut Observed,
    problem: Problem,
) -> Result<Action, Error> {
    match problem {
        Problem::Unavailable(message) => {
            let condition = Cond::new(SCHEMA_REGISTRY, false, "RegistryUnavailable", message);
            observed.set(&condition);
        }
        Problem::Invalid { reason, message } => {
            let contracts = Cond::new(CONTRACTS_VALID, false, reason, message);
            observed.set(&contracts);
            observed.summarize(&contracts, None, None);
        }
    }
    observed.record(pipeline, ctx).await?;
    // The registry may change (a schema registered, a rule relaxed) without
    // a change in Kubernetes.
    Ok(Action::requeue(REGISTRY_RECHECK))
}

/// What the registry resolved, for the condition's message.
pub(super) fn registry_summary(plan: &Plan) -> String {
    let mut parts = Vec::new();
    if let Some(source) = &plan.source.avro {
        parts.push(format!("source reads {}", source.reader_name()));
    }
    for sink in &plan.sinks {
        let written = [
            (&sink.avro, "the output contract's schema", "version"),
            (&sink.avro_key, "the key fields' schema", "key version"),
        ];
        for (avro, derived, pinned) in written {
            let Some(avro) = avro else {
                continue;
            };
            let how = match &avro.writer {
                PlanAvroWriter::Register { .. } => derived.to_owned(),
                PlanAvroWriter::Version { version } => format!("{pinned} {version}"),
            };
            parts.push(format!(
                "sink {:?} writes {how} under {}",
                sink.name, avro.subject
            ));
        }
    }
    parts.join("; ")
}

/// Marks the registry condition False when ready pods of the pipeline wait
/// for the registry (`keystone_schema_registry_waiting`), naming them; how
/// soon to look again, while they do.
pub(super) async fn stages_waiting(
    ctx: &Context,
    observed: &mut Observed,
    namespace: &str,
    name: &str,
) -> Option<Duration> {
    let waiting = waiting_pods(ctx, namespace, name).await;
    if waiting.is_empty() {
        return None;
    }
    observed.set(&Cond::new(
        SCHEMA_REGISTRY,
        false,
        "StagesWaiting",
        format!(
            "{} wait(s) for the schema registry (keystone_schema_registry_waiting): their logs say why; nothing is dead-lettered meanwhile",
            waiting.join(", ")
        ),
    ));
    Some(WAITING_RECHECK)
}

/// The plan that runs, when the spec is the one it was deployed from: what
/// a reconcile goes on with while the registry does not answer (a changed
/// spec waits for the registry, which its check needs).
pub(super) async fn deployed_unchanged(
    pipeline: &Pipeline,
    ctx: &Context,
    status: &PipelineStatus,
) -> Result<Option<Plan>, Error> {
    let (Some(hash), Some(deployed_spec)) = (&status.plan_hash, &status.last_reconciled_spec)
    else {
        return Ok(None);
    };
    if *deployed_spec != super::upgrade::spec_json(&pipeline.spec) {
        return Ok(None);
    }
    let namespace = pipeline.metadata.namespace.as_deref().unwrap_or_default();
    let name = pipeline.metadata.name.as_deref().unwrap_or_default();
    super::upgrade::load_plan(ctx, namespace, name, hash).await
}

/// Whether the pipeline reads the latest version of its source's subject
/// (neither a pinned version nor its own schema), which the operator then
/// follows.
pub(super) fn follows_latest(avro: &Resolved, pipeline: &Pipeline) -> bool {
    matches!(
        avro,
        Resolved::Ready {
            reader: Some(_),
            ..
        }
    ) && pipeline
        .spec
        .source
        .avro
        .as_ref()
        .is_none_or(|a| a.version.is_none() && a.schema.is_none())
}
