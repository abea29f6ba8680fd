//! The Processor controller, and which Pipelines use which Processor.

use super::*;

use std::collections::{BTreeSet, HashMap};

use super::wakes::Relist;

use futures::Stream;

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
        // Pipeline events wake it (`usage_changes`); looked at again now and
        // then in case the watch missed one while it was away.
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
        &Patch::Merge(&status_patch(&status)),
    )
    .await?;
    Ok(())
}

/// The merge patch of a Processor's status. A field the status serializes
/// without when empty is written as empty (or null) all the same: left out
/// of a merge patch, it would keep its old value, and the last Pipeline
/// that stops using a Processor would stay in its `usedBy`.
fn status_patch(status: &ProcessorStatus) -> serde_json::Value {
    let mut patch = json!({ "status": status });
    patch["status"]["usedBy"] = json!(status.used_by);
    patch["status"]["operator"] = json!(status.operator);
    patch
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

/// The names of the processors a pipeline's steps reference.
fn referenced(pipeline: &Pipeline) -> BTreeSet<String> {
    pipeline
        .spec
        .steps
        .iter()
        .filter_map(|s| s.processor_ref.as_ref())
        .map(|r| r.name.clone())
        .collect()
}

/// Which processors each pipeline references, as last reported, so that a
/// Pipeline's event wakes exactly the processors whose `usedBy` it changes:
/// those it starts or stops referencing, all of its own when it is deleted,
/// and none when only its status was written (each Pipeline status the
/// operator records would otherwise reconcile every processor it uses).
#[derive(Default)]
struct Usage {
    by_pipeline: HashMap<(String, String), BTreeSet<String>>,
    /// A pipeline not listed again was deleted while the watch was away.
    relisted: Relist<(String, String)>,
}

impl Usage {
    fn changes(&mut self, event: watcher::Event<Pipeline>) -> Vec<ObjectRef<Processor>> {
        let mut woken = Vec::new();
        match event {
            watcher::Event::Init => self.relisted.start(),
            watcher::Event::InitApply(pipeline) | watcher::Event::Apply(pipeline) => {
                let key = key_of_pipeline(&pipeline);
                self.relisted.listed(|| key.clone());
                let now = referenced(&pipeline);
                let before = self.by_pipeline.get(&key);
                woken.extend(
                    before
                        .unwrap_or(&BTreeSet::new())
                        .symmetric_difference(&now)
                        .map(|name| processor_ref(&key.0, name)),
                );
                self.by_pipeline.insert(key, now);
            }
            watcher::Event::InitDone => {
                if let Some(relisted) = self.relisted.finish() {
                    let gone: Vec<_> = self
                        .by_pipeline
                        .keys()
                        .filter(|key| !relisted.contains(*key))
                        .cloned()
                        .collect();
                    for key in gone {
                        woken.extend(self.forget(&key));
                    }
                }
            }
            watcher::Event::Delete(pipeline) => {
                woken.extend(self.forget(&key_of_pipeline(&pipeline)));
            }
        }
        woken
    }

    fn forget(&mut self, key: &(String, String)) -> Vec<ObjectRef<Processor>> {
        self.by_pipeline
            .remove(key)
            .unwrap_or_default()
            .iter()
            .map(|name| processor_ref(&key.0, name))
            .collect()
    }
}

fn key_of_pipeline(pipeline: &Pipeline) -> (String, String) {
    (
        pipeline.namespace().unwrap_or_default(),
        pipeline.name_any(),
    )
}

fn processor_ref(namespace: &str, name: &str) -> ObjectRef<Processor> {
    ObjectRef::<Processor>::new(name).within(namespace)
}

/// The processors whose `usedBy` the Pipeline events change. The events come
/// after the Pipeline cache took them in, which is what the reconcile reads.
pub fn usage_changes(
    events: impl Stream<Item = watcher::Event<Pipeline>> + Send + 'static,
) -> impl Stream<Item = ObjectRef<Processor>> + Send + 'static {
    let mut usage = Usage::default();
    events.flat_map(move |event| futures::stream::iter(usage.changes(event)))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(name: &str, processors: &[&str]) -> Pipeline {
        let steps: String = processors
            .iter()
            .map(|p| format!("\n    - {{name: step-{p}, processorRef: {{name: {p}}}}}"))
            .collect();
        let yaml = format!(
            "apiVersion: keystone.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  source: {{topic: in, schema: {{fields: []}}}}\n  steps:{steps}\n  sinks: [{{name: out, kafka: {{topic: out}}}}]\n"
        );
        serde_yaml_ng::from_str(&yaml).expect("a valid pipeline")
    }

    fn names(refs: Vec<ObjectRef<Processor>>) -> Vec<String> {
        let mut names: Vec<String> = refs
            .into_iter()
            .map(|r| format!("{}/{}", r.namespace.unwrap_or_default(), r.name))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_pipeline_event_wakes_the_processors_whose_used_by_it_changes() {
        let mut usage = Usage::default();
        let first = pipeline("orders", &["mask", "enrich"]);
        assert_eq!(
            names(usage.changes(watcher::Event::Apply(first.clone()))),
            ["shop/enrich", "shop/mask"]
        );
        // Its status written, or the same references again: nobody.
        let mut with_status = first.clone();
        with_status.status = Some(Default::default());
        assert!(usage.changes(watcher::Event::Apply(with_status)).is_empty());
        // One reference swapped for another: both, the other one untouched.
        let swapped = pipeline("orders", &["mask", "score"]);
        assert_eq!(
            names(usage.changes(watcher::Event::Apply(swapped.clone()))),
            ["shop/enrich", "shop/score"]
        );
        assert_eq!(
            names(usage.changes(watcher::Event::Delete(swapped))),
            ["shop/mask", "shop/score"]
        );
    }

    #[test]
    fn a_processor_nobody_uses_has_its_used_by_emptied_not_left_as_it_was() {
        let patch = status_patch(&ProcessorStatus::default());
        assert_eq!(patch["status"]["usedBy"], json!([]));
        assert_eq!(patch["status"]["operator"], json!(null));
        let used = ProcessorStatus {
            used_by: vec!["orders".into()],
            operator: Some("filter".into()),
            ..ProcessorStatus::default()
        };
        let patch = status_patch(&used);
        assert_eq!(patch["status"]["usedBy"], json!(["orders"]));
        assert_eq!(patch["status"]["operator"], json!("filter"));
    }

    #[test]
    fn a_relist_wakes_the_processors_of_pipelines_deleted_meanwhile() {
        let mut usage = Usage::default();
        usage.changes(watcher::Event::Apply(pipeline("kept", &["mask"])));
        usage.changes(watcher::Event::Apply(pipeline("gone", &["enrich"])));
        assert!(usage.changes(watcher::Event::Init).is_empty());
        assert!(
            usage
                .changes(watcher::Event::InitApply(pipeline("kept", &["mask"])))
                .is_empty()
        );
        assert_eq!(
            names(usage.changes(watcher::Event::InitDone)),
            ["shop/enrich"]
        );
        assert_eq!(
            names(usage.changes(watcher::Event::Delete(pipeline("kept", &["mask"])))),
            ["shop/mask"]
        );
    }
}
