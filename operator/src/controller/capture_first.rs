//! A `postgres` pipeline that has never been deployed starts with its
//! capture alone: the capture describes the table, and the steps are checked
//! against its columns (`compile_with_source`) before any stage runs. The
//! stages would otherwise start on a plan without the columns and be
//! upgraded a minute later, or never start at all when the steps use columns
//! nobody declared. Until then `ContractsValid` is Unknown (not checked yet,
//! so Argo CD's health check says Progressing, not Degraded).

use super::*;
use keystone_crds::compile_capture;

use crate::status::READY;

/// Whether the capture runs alone first: nothing was deployed yet and the
/// capture has not described a table the spec captures.
pub(super) fn wanted(pipeline: &Pipeline, status: &PipelineStatus) -> bool {
    let Some(postgres) = &pipeline.spec.source.postgres else {
        return false;
    };
    let described = status
        .capture
        .as_ref()
        .and_then(|c| c.table.as_ref())
        .is_some_and(|table| postgres.captures(table));
    status.plan_hash.is_none() && !described && pipeline.spec.state != PipelineState::Suspended
}

/// Provisions the capture's topic and runs the capture alone. `None` when
/// the capture cannot run on its own (its own configuration is refused, or
/// refused by the operator's policy): the full check then reports why.
pub(super) async fn run(
    pipeline: &Pipeline,
    ctx: &Arc<Context>,
    observed: &mut Observed,
) -> Result<Option<Action>, Error> {
    let Ok(plan) = compile_capture(pipeline) else {
        return Ok(None);
    };
    if !ctx
        .config
        .policy
        .violations(&pipeline.spec, &plan, ctx.config.runtime_image())
        .is_empty()
    {
        return Ok(None);
    }
    let Ok(desired) = desired_topics(&plan, pipeline.spec.checkpoint_retention, |c| {
        ctx.config.resolve_cluster(c)
    }) else {
        return Ok(None);
    };
    let tables = pipeline
        .spec
        .source
        .postgres
        .as_ref()
        .map(|p| p.tables.join(", "))
        .unwrap_or_default();
    let waiting = format!(
        "the steps are checked against the columns of {tables} once the capture has described it; the capture runs first"
    );
    let contracts = Cond::unknown(CONTRACTS_VALID, "AwaitingSourceTable", &waiting);
    observed.set(&contracts);
    let has_principal = crate::acls::acl_cluster(ctx, plan.source.cluster.as_deref()).is_some();
    sync_finalizer(pipeline, &observed.api, has_principal).await?;
    let owner = Owner {
        namespace: observed.namespace.clone(),
        name: observed.name.clone(),
    };
    let outcome = reconcile_topics(pipeline, ctx, &owner, &desired).await?;
    observed.set(&outcome.condition);
    observed.status.topics = outcome.statuses;
    let mut ready = format!("{waiting}; ");
    if outcome.blocked {
        ready.push_str(&format!(
            "its topic is not ready: {}",
            outcome.condition.message
        ));
    } else {
        crate::acls::reconcile_pipeline(ctx, pipeline, &plan).await?;
        let target = workloads::Target {
            plan,
            spec: pipeline.spec.clone(),
            replicas: None,
            restore: None,
            keep_plans: Vec::new(),
        };
        let workloads = apply_workloads(pipeline, ctx, &target, &desired).await?;
        observed.status.ready_stages = Some(ready_stages(&workloads.stages));
        observed.status.stages = workloads.stages;
        match observed
            .status
            .capture
            .as_ref()
            .and_then(|c| c.problem.as_ref())
        {
            Some(problem) => ready.push_str(&format!("it does not stream: {problem}")),
            None => ready.push_str("waiting for its description"),
        }
    }
    observed.set(&Cond::new(READY, false, "AwaitingSourceTable", ready));
    observed.status.phase = Some(PipelinePhase::Provisioning);
    observed.record(pipeline, ctx).await?;
    Ok(Some(Action::requeue(CAPTURE_POLL)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keystone_crds::pipeline::CaptureStatus;
    use keystone_crds::pipeline::capture::SourceTable;

    fn pipeline() -> Pipeline {
        let text = r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: orders, namespace: shop}
spec:
  source:
    topic: orders.cdc
    key: [id]
    postgres: {host: db, database: shop, credentialsSecret: s, tables: [orders]}
  sinks:
    - {name: out, kafka: {topic: out}}
"#;
        keystone_crds::parse_manifests("p.yaml", text)
            .unwrap()
            .pipelines
            .remove(0)
    }

    fn described(name: &str) -> PipelineStatus {
        PipelineStatus {
            capture: Some(Box::new(CaptureStatus {
                table: Some(SourceTable {
                    name: name.into(),
                    columns: Vec::new(),
                }),
                ..CaptureStatus::default()
            })),
            ..PipelineStatus::default()
        }
    }

    #[test]
    fn the_capture_runs_alone_until_it_describes_the_captured_table() {
        let p = pipeline();
        assert!(wanted(&p, &PipelineStatus::default()));
        assert!(!wanted(&p, &described("public.orders")));
        assert!(
            wanted(&p, &described("public.customers")),
            "a table the spec no longer captures"
        );
        let deployed = PipelineStatus {
            plan_hash: Some("h".into()),
            ..PipelineStatus::default()
        };
        assert!(
            !wanted(&p, &deployed),
            "a running version is upgraded instead"
        );
        let mut suspended = p.clone();
        suspended.spec.state = PipelineState::Suspended;
        assert!(!wanted(&suspended, &PipelineStatus::default()));
        let mut plain = p;
        plain.spec.source.postgres = None;
        assert!(!wanted(&plain, &PipelineStatus::default()));
    }
}
