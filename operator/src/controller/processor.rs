//! The Processor controller, and which Pipelines use which Processor.

use super::*;

/// Processor reconcile: validate its declared contract and report which pipelines use it.
pub async fn reconcile_processor(
    processor: Arc<Processor>,
    ctx: Arc<ProcessorContext>,
) -> Result<Action, Error> {
    let key = key_of(processor.as_ref());
    let span = info_span!("reconcile", processor = %key);
    async move {
        let shared = &ctx.shared;
        shared
            .metrics
            .reconciles
            .with_label_values(&["processor"])
            .inc();
        let timer = shared
            .metrics
            .duration
            .with_label_values(&["processor"])
            .start_timer();
        let namespace = processor.namespace().unwrap_or_default();
        let name = processor.name_any();
        let mut used_by: Vec<String> = ctx
            .pipelines
            .state()
            .iter()
            .filter(|p| {
                p.namespace().as_deref() == Some(namespace.as_str()) && references(p, &name)
            })
            .map(|p| p.name_any())
            .collect();
        used_by.sort();
        let generation = processor.metadata.generation;
        let mut status = processor.status.clone().unwrap_or_default();
        let cond = match check_processor(&processor) {
            Ok(()) => Cond::new(
                "ContractValid",
                true,
                "ContractValid",
                "the declared contract agrees with the operator",
            ),
            Err(errors) => Cond::new(
                "ContractValid",
                false,
                "ContractInvalid",
                errors.to_string(),
            ),
        };
        set_condition(&mut status.conditions, &cond, generation, Timestamp::now());
        status.observed_generation = generation;
        status.operator = processor
            .spec
            .operator
            .single()
            .map(|op| op.kind().to_owned());
        status.used_by = used_by;
        let result = write_processor_status(&processor, &namespace, status, shared).await;
        timer.observe_duration();
        if let Err(error) = &result {
            shared
                .metrics
                .failures
                .with_label_values(&["processor", error.metric_label()])
                .inc();
        }
        // A Pipeline that stops referencing it does not wake it: look again now and then.
        result.map(|_| Action::requeue(Duration::from_secs(300)))
    }
    .instrument(span)
    .await
}

async fn write_processor_status(
    processor: &Processor,
    namespace: &str,
    status: ProcessorStatus,
    ctx: &Context,
) -> Result<(), Error> {
    let strip = |s: &ProcessorStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time =
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH);
        }
        s
    };
    if processor.status.as_ref().map(strip) == Some(strip(&status)) {
        return Ok(());
    }
    let api: Api<Processor> = Api::namespaced(ctx.client.clone(), namespace);
    api.patch_status(
        &processor.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({ "status": status })),
    )
    .await?;
    Ok(())
}

pub fn processor_error_policy(
    processor: Arc<Processor>,
    error: &Error,
    ctx: Arc<ProcessorContext>,
) -> Action {
    let failures = ctx
        .shared
        .failure_count(&format!("processor:{}", key_of(processor.as_ref())), true);
    Action::requeue(backoff(failures, error.is_permanent()))
}

pub struct ProcessorContext {
    pub shared: Arc<Context>,
    pub pipelines: Store<Pipeline>,
}

/// Whether a pipeline has a step that references the processor.
pub fn references(pipeline: &Pipeline, processor: &str) -> bool {
    pipeline.spec.steps.iter().any(|s| {
        s.processor_ref
            .as_ref()
            .is_some_and(|r| r.name == processor)
    })
}

/// The processors a pipeline references.
pub fn processors_used_by(pipeline: &Pipeline) -> Vec<ObjectRef<Processor>> {
    let namespace = pipeline.namespace();
    pipeline
        .spec
        .steps
        .iter()
        .filter_map(|s| s.processor_ref.as_ref())
        .map(|r| {
            let object = ObjectRef::<Processor>::new(&r.name);
            match &namespace {
                Some(ns) => object.within(ns),
                None => object,
            }
        })
        .collect()
}

/// The pipelines to re-reconcile when a processor changes.
pub fn pipelines_using(store: &Store<Pipeline>, processor: &Processor) -> Vec<ObjectRef<Pipeline>> {
    let namespace = processor.namespace();
    let name = processor.name_any();
    store
        .state()
        .iter()
        .filter(|p| p.namespace() == namespace && references(p, &name))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}
