//! Cycles between pipelines through Kafka topics, as the operator sees them.
//!
//! The contract checker looks at one pipeline; `keystone_crds::check::topic_cycles`
//! looks at all. Here a reconcile asks it about the pipeline at hand against
//! every Pipeline the operator caches, and a change of one pipeline's spec
//! re-reconciles the pipelines its topics connect it to (and those whose
//! condition names it), so a cycle appears and clears on both sides.

use std::collections::HashMap;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use keystone_crds::check::{PipelineId, topic_cycles};
use keystone_crds::{ContractError, Pipeline};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use crate::status::CONTRACTS_VALID;

/// The cycle errors of `pipeline`, checked against `known` (the cached
/// Pipelines; its own cached copy is replaced by `pipeline`, which may be
/// newer). Pipelines being deleted do not count: they no longer feed anything.
pub(crate) fn cycle_errors(
    pipeline: &Pipeline,
    known: &[Arc<Pipeline>],
    default_cluster: Option<&str>,
) -> Vec<ContractError> {
    let me = PipelineId::of(pipeline);
    let mut all: Vec<&Pipeline> = known
        .iter()
        .map(AsRef::as_ref)
        .filter(|p| p.metadata.deletion_timestamp.is_none() && PipelineId::of(p) != me)
        .collect();
    all.push(pipeline);
    topic_cycles(&all, default_cluster)
        .into_iter()
        .filter(|cycle| cycle.pipeline == me)
        .map(|cycle| cycle.error)
        .collect()
}

/// The pipelines to look at again after `changed`'s spec changed (or it went):
/// those that read a topic it writes or write the topic it reads, and those
/// whose contracts condition names it (it may have been the other end of a
/// cycle that its change broke).
pub(crate) fn pipelines_to_recheck(
    changed: &Pipeline,
    known: &[Arc<Pipeline>],
    default_cluster: Option<&str>,
) -> Vec<ObjectRef<Pipeline>> {
    let me = PipelineId::of(changed);
    let named = format!("pipeline {me}");
    let cluster = |c: &Option<String>| -> Option<String> {
        match (c, default_cluster) {
            (Some(c), Some(d)) if c == d => None,
            (c, _) => c.clone(),
        }
    };
    let writes = |p: &Pipeline, cluster_name: &Option<String>, topic: &str| {
        p.spec.sinks.iter().any(|s| {
            s.kafka
                .as_ref()
                .is_some_and(|k| k.topic == topic && cluster(&k.cluster) == cluster(cluster_name))
        })
    };
    known
        .iter()
        .filter(|other| PipelineId::of(other) != me)
        .filter(|other| {
            let source = &other.spec.source;
            let fed_by_changed = writes(changed, &source.cluster, &source.topic);
            let feeds_changed = writes(
                other,
                &changed.spec.source.cluster,
                &changed.spec.source.topic,
            );
            let names_changed = other.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == CONTRACTS_VALID && c.message.contains(&named))
            });
            fed_by_changed || feeds_changed || names_changed
        })
        .map(|other| ObjectRef::from_obj(other.as_ref()))
        .collect()
}

/// The Pipelines of a watch whose spec changed (a new generation) or that were
/// deleted: status updates, which every reconcile makes, do not touch the
/// topics, so they wake no other pipeline.
///
/// `events` are those the Pipeline cache has already taken in, and a change
/// passes only once the cache holds it: the changes a (re-)list finds pass at
/// its end, when the cache swaps in what was listed.
pub(crate) fn spec_changes(
    events: impl Stream<Item = Result<watcher::Event<Pipeline>, watcher::Error>>,
) -> impl Stream<Item = Result<Pipeline, watcher::Error>> {
    let mut generations: HashMap<String, Option<i64>> = HashMap::new();
    let mut listed: Vec<Pipeline> = Vec::new();
    events
        .map(move |event| {
            let mut new_generation = |p: Pipeline| {
                let key = format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
                let generation = p.meta().generation;
                (generations.insert(key, generation) != Some(generation)).then_some(p)
            };
            let changed: Vec<Pipeline> = match event {
                Err(error) => return vec![Err(error)],
                Ok(watcher::Event::Apply(p)) => new_generation(p).into_iter().collect(),
                Ok(watcher::Event::InitApply(p)) => {
                    listed.extend(new_generation(p));
                    Vec::new()
                }
                // A list that starts over keeps what the one it replaces found:
                // those generations are already counted as seen.
                Ok(watcher::Event::Init) => Vec::new(),
                Ok(watcher::Event::InitDone) => std::mem::take(&mut listed),
                Ok(watcher::Event::Delete(p)) => {
                    generations.remove(&format!(
                        "{}/{}",
                        p.namespace().unwrap_or_default(),
                        p.name_any()
                    ));
                    vec![p]
                }
            };
            changed.into_iter().map(Ok).collect()
        })
        .flat_map(futures::stream::iter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    use keystone_crds::ErrorKind;
    use keystone_crds::pipeline::PipelineStatus;

    fn pipeline(name: &str, source: &str, sink: &str) -> Pipeline {
        let yaml = format!(
            "apiVersion: keystone.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: {name}, namespace: shop, generation: 1}}\n\
             spec:\n  source:\n    topic: {source}\n    schema: {{fields: []}}\n  sinks:\n    - name: out\n      kafka: {{topic: {sink}}}\n"
        );
        serde_yaml_ng::from_str(&yaml).unwrap()
    }

    #[test]
    fn a_pipeline_closing_a_cycle_gets_an_error_naming_the_other() {
        let a = pipeline("a", "a.in", "b.in");
        let b = Arc::new(pipeline("b", "b.in", "a.in"));
        let errors = cycle_errors(&a, std::slice::from_ref(&b), None);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].kind, ErrorKind::TopicCycle);
        assert!(
            errors[0].message.contains("pipeline shop/b"),
            "{}",
            errors[0].message
        );
        // The reconciled spec counts, not its cached copy: A no longer writes b.in.
        let stale_a = Arc::new(a.clone());
        let fixed_a = pipeline("a", "a.in", "elsewhere");
        assert!(cycle_errors(&fixed_a, &[stale_a, b.clone()], None).is_empty());
        // A pipeline being deleted feeds nothing.
        let mut going = (*b).clone();
        going.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        assert!(cycle_errors(&a, &[Arc::new(going)], None).is_empty());
    }

    #[test]
    fn a_spec_change_rechecks_connected_pipelines_and_those_naming_it() {
        let a = pipeline("a", "a.in", "b.in");
        let c = Arc::new(pipeline("c", "c.in", "a.in"));
        let unrelated = Arc::new(pipeline("u", "u.in", "u.out"));
        let mut stuck = pipeline("s", "s.in", "s.out");
        stuck.status = Some(PipelineStatus {
            conditions: vec![Condition {
                type_: CONTRACTS_VALID.to_owned(),
                status: "False".to_owned(),
                reason: "TopicCycle".to_owned(),
                message: "sink \"out\" writes topic \"a.old\", the source of pipeline shop/a; ..."
                    .to_owned(),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::now(),
                ),
                observed_generation: None,
            }],
            ..PipelineStatus::default()
        });
        let stuck = Arc::new(stuck);
        let b = Arc::new(pipeline("b", "b.in", "out"));
        let known = [Arc::new(a.clone()), b, c, unrelated, stuck];
        let mut names: Vec<String> = pipelines_to_recheck(&a, &known, None)
            .into_iter()
            .map(|r| r.name)
            .collect();
        names.sort();
        assert_eq!(names, ["b", "c", "s"]);
    }

    #[tokio::test]
    async fn only_new_generations_and_deletions_pass() {
        let a1 = pipeline("a", "a.in", "b.in");
        let mut a1_status = a1.clone();
        a1_status.status = Some(PipelineStatus::default());
        let mut a2 = a1.clone();
        a2.metadata.generation = Some(2);
        let events = futures::stream::iter(vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(a1.clone())),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Apply(a1_status)),
            Ok(watcher::Event::Apply(a2)),
            Ok(watcher::Event::Delete(a1)),
        ]);
        let generations: Vec<Option<i64>> = spec_changes(events)
            .map(|p| p.unwrap().metadata.generation)
            .collect()
            .await;
        assert_eq!(generations, [Some(1), Some(2), Some(1)]);
    }

    #[tokio::test]
    async fn a_listing_passes_its_changes_once_the_cache_holds_them() {
        let a = pipeline("a", "a.in", "b.in");
        let b = pipeline("b", "b.in", "a.in");
        let listing = |done: bool| {
            let mut events = vec![
                watcher::Event::Init,
                watcher::Event::InitApply(a.clone()),
                watcher::Event::InitApply(b.clone()),
            ];
            if done {
                events.push(watcher::Event::InitDone);
            }
            futures::stream::iter(events.into_iter().map(Ok))
        };
        let unfinished: Vec<_> = spec_changes(listing(false)).collect().await;
        assert!(unfinished.is_empty(), "{unfinished:?}");
        let names: Vec<String> = spec_changes(listing(true))
            .map(|p| p.unwrap().name_any())
            .collect()
            .await;
        assert_eq!(names, ["a", "b"]);
    }
}
