//! Which changes of watched objects wake a Pipeline's reconcile.
//!
//! A watch reports every write to an object, and most writes change nothing
//! a reconcile reads: the Deployment controller rewrites a Deployment's status
//! several times per rollout (timestamps, messages, counters the operator
//! ignores), the disruption controller a budget's status, and each status the
//! operator records comes back to it as an update of the Pipeline. With
//! thousands of Pipelines each such wake is a full reconcile (a contract
//! check, server-side applies), and they queued ahead of the reconciles that
//! had work to do. So each watched kind wakes a Pipeline only when what the
//! operator reads of it changed; a deletion always wakes it.

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};
use keystone_crds::pipeline::Pipeline;
use keystone_crds::processor::Processor;
use kube::Resource;
use kube::runtime::watcher::{self, Event};

use super::object_key::ObjectKey;
use crate::context::FIELD_MANAGER;

/// What is watched, which decides the wakes a fingerprint does not.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Watched {
    /// Objects a Pipeline owns. Their deletion wakes it (they are put back);
    /// their creation by the operator does not (the reconcile that applied
    /// them is the one running), while one by anyone else does.
    Owned,
    /// Pipelines themselves: a new one wakes, a deleted one is forgotten
    /// (its finalizer's work began when its deletion did).
    Pipelines,
    /// Processors, for the Pipelines that use them: a new one and a deleted
    /// one wake them (a reference resolves or breaks).
    Processors,
}

/// The objects of `events` whose `fingerprint` differs from the one the
/// stream last passed on for them, and new and deleted ones as [`Watched`] says.
pub(super) fn changed<K, S>(
    events: S,
    fingerprint: fn(&K) -> u64,
    watched: Watched,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Send + 'static,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
{
    let mut seen = Seen {
        watched,
        ..Seen::default()
    };
    events.filter_map(move |event| {
        futures::future::ready(match event {
            Ok(event) => seen.wakes(event, fingerprint).map(Ok),
            Err(error) => Some(Err(error)),
        })
    })
}

/// The fingerprint last passed on per object, by uid.
struct Seen {
    watched: Watched,
    last: HashMap<ObjectKey, u64>,
    /// Whatever the watch does not list again was deleted while it was
    /// away, and is forgotten.
    relisted: Relist<ObjectKey>,
}

impl Default for Seen {
    fn default() -> Self {
        Self {
            watched: Watched::Owned,
            last: HashMap::new(),
            relisted: Relist::default(),
        }
    }
}

impl Seen {
    fn wakes<K: Resource>(&mut self, event: Event<K>, fingerprint: fn(&K) -> u64) -> Option<K> {
        match event {
            Event::Init => {
                self.relisted.start();
                None
            }
            Event::InitApply(object) => {
                let key = ObjectKey::of(object.meta());
                self.relisted.listed(|| key);
                self.if_changed(key, object, fingerprint)
            }
            Event::InitDone => {
                if let Some(relisted) = self.relisted.finish() {
                    self.last.retain(|id, _| relisted.contains(id));
                }
                None
            }
            Event::Apply(object) => {
                self.if_changed(ObjectKey::of(object.meta()), object, fingerprint)
            }
            Event::Delete(object) => {
                self.last.remove(&ObjectKey::of(object.meta()));
                (self.watched != Watched::Pipelines).then_some(object)
            }
        }
    }

    fn if_changed<K: Resource>(
        &mut self,
        key: ObjectKey,
        object: K,
        fingerprint: fn(&K) -> u64,
    ) -> Option<K> {
        let now = fingerprint(&object);
        let wakes = match self.last.insert(key, now) {
            Some(before) => before != now,
            None => match self.watched {
                Watched::Pipelines | Watched::Processors => true,
                Watched::Owned => !written_by_operator(object.meta()),
            },
        };
        wakes.then_some(object)
    }
}

/// The objects a watch has listed so far while it relists (after a restart
/// or an expired resource version): what it knew and does not list again was
/// deleted while it was away.
pub(super) struct Relist<Id>(Option<HashSet<Id>>);

impl<Id> Default for Relist<Id> {
    fn default() -> Self {
        Self(None)
    }
}

impl<Id: Eq + Hash> Relist<Id> {
    pub(super) fn start(&mut self) {
        self.0 = Some(HashSet::new());
    }

    /// Notes an object listed, if a relist is running.
    pub(super) fn listed(&mut self, id: impl FnOnce() -> Id) {
        if let Some(listed) = &mut self.0 {
            listed.insert(id());
        }
    }

    /// Ends the relist: what it listed, if one was running.
    pub(super) fn finish(&mut self) -> Option<HashSet<Id>> {
        self.0.take()
    }
}

/// Whether only the operator has written the object (its server-side applies).
fn written_by_operator(meta: &ObjectMeta) -> bool {
    meta.managed_fields.as_ref().is_some_and(|entries| {
        !entries.is_empty()
            && entries
                .iter()
                .all(|entry| entry.manager.as_deref() == Some(FIELD_MANAGER))
    })
}

fn hash_of(value: impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// What anyone may change in an object's metadata that the operator answers:
/// its spec's generation, labels and annotations (a user's nudge), owners,
/// finalizers and the start of its deletion. Not its resourceVersion or
/// managedFields, which every write changes.
fn metadata_part(meta: &ObjectMeta) -> u64 {
    hash_of((
        meta.generation,
        &meta.labels,
        &meta.annotations,
        meta.owner_references.as_ref().map(|owners| {
            owners
                .iter()
                .map(|o| (&o.uid, o.controller))
                .collect::<Vec<_>>()
        }),
        &meta.finalizers,
        meta.deletion_timestamp.is_some(),
    ))
}

/// A Pipeline wakes its reconcile when its spec or metadata change, not when
/// the operator records its status.
pub(super) fn pipeline(pipeline: &Pipeline) -> u64 {
    metadata_part(&pipeline.metadata)
}

/// A Processor wakes the Pipelines that use it when its spec or metadata
/// change, not when the operator records its status (`usedBy`, which every
/// Pipeline that starts using it changes: with a wake per write, n Pipelines
/// sharing a Processor would cost n² reconciles).
pub(super) fn processor(processor: &Processor) -> u64 {
    metadata_part(&processor.metadata)
}

/// An owned object watched by metadata only (ConfigMap, Service, budget):
/// its metadata and who manages which of its fields. A hand edit of a
/// ConfigMap's data or a Service's spec adds its editor there and wakes the
/// pipeline, whose apply puts it right; a controller rewriting the same
/// status fields (a budget's) changes only the entry's time.
pub(super) fn owned_metadata<K: Resource>(object: &K) -> u64 {
    let meta = object.meta();
    let managers = meta.managed_fields.as_ref().map(|entries| {
        entries
            .iter()
            .map(
                |ManagedFieldsEntry {
                     manager,
                     operation,
                     subresource,
                     fields_v1,
                     ..
                 }| {
                    (
                        manager,
                        operation,
                        subresource,
                        fields_v1.as_ref().map(|f| f.0.to_string()),
                    )
                },
            )
            .collect::<Vec<_>>()
    });
    hash_of((metadata_part(meta), managers))
}

/// A Deployment: its metadata and the status the reconcile reads (whether the
/// rollout went through, the ready count, a progress deadline passed), not
/// the timestamps and messages the Deployment controller rewrites.
pub(super) fn deployment(deployment: &Deployment) -> u64 {
    let status = deployment.status.as_ref().map(|s| {
        (
            s.observed_generation,
            s.replicas,
            s.updated_replicas,
            s.ready_replicas,
            s.available_replicas,
            s.conditions.as_ref().map(|conditions| {
                conditions
                    .iter()
                    .map(|c| (&c.type_, &c.status, &c.reason))
                    .collect::<Vec<_>>()
            }),
        )
    });
    hash_of((metadata_part(&deployment.metadata), status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};
    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, Time};
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    fn meta(uid: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some("orders-s0".into()),
            namespace: Some("shop".into()),
            uid: Some(uid.into()),
            generation: Some(1),
            resource_version: Some("1".into()),
            ..ObjectMeta::default()
        }
    }

    fn progressing(reason: &str, status: &str, at: i64) -> DeploymentCondition {
        DeploymentCondition {
            type_: "Progressing".into(),
            status: status.into(),
            reason: Some(reason.into()),
            message: Some(format!("written at {at}")),
            last_update_time: Some(Time(Timestamp::from_second(at).unwrap())),
            ..DeploymentCondition::default()
        }
    }

    fn deployment_at(uid: &str, ready: i32, condition: DeploymentCondition) -> Deployment {
        Deployment {
            metadata: meta(uid),
            status: Some(DeploymentStatus {
                observed_generation: Some(1),
                replicas: Some(1),
                updated_replicas: Some(1),
                ready_replicas: Some(ready),
                conditions: Some(vec![condition]),
                ..DeploymentStatus::default()
            }),
            ..Deployment::default()
        }
    }

    fn wakes<K: Resource>(seen: &mut Seen, event: Event<K>, fingerprint: fn(&K) -> u64) -> bool {
        seen.wakes(event, fingerprint).is_some()
    }

    #[test]
    fn a_deployment_wakes_its_pipeline_when_what_the_reconcile_reads_changes() {
        let mut seen = Seen::default();
        let created = deployment_at("a", 0, progressing("ReplicaSetUpdated", "True", 10));
        assert!(wakes(&mut seen, Event::Apply(created), deployment));
        // The Deployment controller rewrites the same condition's time and message.
        let rewritten = deployment_at("a", 0, progressing("ReplicaSetUpdated", "True", 20));
        assert!(!wakes(&mut seen, Event::Apply(rewritten), deployment));
        let ready = deployment_at("a", 1, progressing("ReplicaSetUpdated", "True", 20));
        assert!(wakes(&mut seen, Event::Apply(ready.clone()), deployment));
        let deadline = deployment_at("a", 1, progressing("ProgressDeadlineExceeded", "False", 30));
        assert!(wakes(&mut seen, Event::Apply(deadline), deployment));
        // An annotation added by hand (a user's nudge, another tool's mark).
        let mut annotated = ready.clone();
        annotated.metadata.annotations = Some([("team".to_owned(), "a".to_owned())].into());
        assert!(wakes(&mut seen, Event::Apply(annotated), deployment));
        // Deleted: it wakes (to be put back) and is forgotten; the one put
        // back is another object.
        assert!(wakes(&mut seen, Event::Delete(ready.clone()), deployment));
        assert!(seen.last.is_empty());
        let recreated = deployment_at("b", 1, progressing("ReplicaSetUpdated", "True", 20));
        assert!(wakes(&mut seen, Event::Apply(recreated), deployment));
    }

    #[test]
    fn a_pipeline_wakes_for_its_spec_and_metadata_not_for_its_own_status() {
        let mut seen = Seen {
            watched: Watched::Pipelines,
            ..Seen::default()
        };
        let mut pipeline: Pipeline = serde_json::from_value(json!({
            "apiVersion": "keystone.dev/v1alpha1",
            "kind": "Pipeline",
            "metadata": {"name": "orders", "namespace": "shop", "uid": "p", "generation": 1},
            "spec": {
                "source": {"topic": "in", "schema": {"fields": [{"name": "id", "type": "string"}]}},
                "sinks": [{"name": "out", "kafka": {"topic": "out"}}]
            }
        }))
        .unwrap();
        assert!(wakes(
            &mut seen,
            Event::InitApply(pipeline.clone()),
            super::pipeline
        ));
        pipeline.status = Some(serde_json::from_value(json!({"phase": "Running"})).unwrap());
        pipeline.metadata.resource_version = Some("2".into());
        assert!(!wakes(
            &mut seen,
            Event::Apply(pipeline.clone()),
            super::pipeline
        ));
        pipeline.metadata.generation = Some(2);
        assert!(wakes(
            &mut seen,
            Event::Apply(pipeline.clone()),
            super::pipeline
        ));
        pipeline.metadata.annotations = Some([("nudge".to_owned(), "1".to_owned())].into());
        assert!(wakes(
            &mut seen,
            Event::Apply(pipeline.clone()),
            super::pipeline
        ));
        pipeline.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(40).unwrap()));
        assert!(wakes(
            &mut seen,
            Event::Apply(pipeline.clone()),
            super::pipeline
        ));
        assert!(!wakes(&mut seen, Event::Delete(pipeline), super::pipeline));
        assert!(seen.last.is_empty());
    }

    #[test]
    fn a_processor_wakes_its_pipelines_for_its_spec_and_existence_not_its_status() {
        let mut seen = Seen {
            watched: Watched::Processors,
            ..Seen::default()
        };
        let mut processor: Processor = serde_json::from_value(json!({
            "apiVersion": "keystone.dev/v1alpha1",
            "kind": "Processor",
            "metadata": {"name": "mask", "namespace": "shop", "uid": "m", "generation": 1},
            "spec": {"filter": {"expression": "!test"}}
        }))
        .unwrap();
        assert!(wakes(
            &mut seen,
            Event::Apply(processor.clone()),
            super::processor
        ));
        processor.status = Some(serde_json::from_value(json!({"usedBy": ["orders"]})).unwrap());
        processor.metadata.resource_version = Some("2".into());
        assert!(!wakes(
            &mut seen,
            Event::Apply(processor.clone()),
            super::processor
        ));
        processor.metadata.generation = Some(2);
        assert!(wakes(
            &mut seen,
            Event::Apply(processor.clone()),
            super::processor
        ));
        assert!(wakes(&mut seen, Event::Delete(processor), super::processor));
        assert!(seen.last.is_empty());
    }

    fn config_map(manager: &str, fields: serde_json::Value, at: i64) -> ConfigMap {
        let mut map = ConfigMap {
            metadata: meta("c"),
            ..ConfigMap::default()
        };
        map.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some("Update".into()),
            fields_v1: Some(FieldsV1(fields)),
            time: Some(Time(Timestamp::from_second(at).unwrap())),
            ..ManagedFieldsEntry::default()
        }]);
        map
    }

    #[test]
    fn an_owned_object_watched_by_metadata_wakes_when_someone_else_edits_it() {
        let mut seen = Seen::default();
        let fields = json!({"f:data": {"f:plan.json": {}}});
        // Created by the operator's apply: the reconcile that applied it runs.
        let applied = config_map(FIELD_MANAGER, fields.clone(), 10);
        assert!(!wakes(&mut seen, Event::Apply(applied), owned_metadata));
        // The same manager rewriting the same fields (a controller's status
        // updates) changes only the entry's time.
        let again = config_map(FIELD_MANAGER, fields.clone(), 20);
        assert!(!wakes(&mut seen, Event::Apply(again), owned_metadata));
        let edited = config_map("kubectl-edit", fields, 30);
        assert!(wakes(&mut seen, Event::Apply(edited), owned_metadata));
    }

    #[test]
    fn a_new_object_wakes_unless_the_operator_alone_wrote_it() {
        let mut seen = Seen::default();
        let entry = |manager: &str| ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some("Apply".into()),
            ..ManagedFieldsEntry::default()
        };
        let mut applied = deployment_at("a", 0, progressing("NewReplicaSetCreated", "True", 1));
        applied.metadata.managed_fields = Some(vec![entry(FIELD_MANAGER)]);
        assert!(!wakes(&mut seen, Event::Apply(applied.clone()), deployment));
        // The Deployment controller's first status of it.
        let mut progressing_status =
            deployment_at("a", 0, progressing("ReplicaSetUpdated", "True", 2));
        progressing_status.metadata.managed_fields =
            Some(vec![entry(FIELD_MANAGER), entry("kube-controller-manager")]);
        assert!(wakes(
            &mut seen,
            Event::Apply(progressing_status),
            deployment
        ));
        // Made by someone else (another tool, a restore from backup).
        let mut foreign = deployment_at("b", 0, progressing("NewReplicaSetCreated", "True", 1));
        foreign.metadata.managed_fields = Some(vec![entry("velero")]);
        assert!(wakes(&mut seen, Event::Apply(foreign), deployment));
    }

    #[test]
    fn a_relist_forgets_what_was_deleted_while_the_watch_was_away() {
        let mut seen = Seen::default();
        let kept = deployment_at("kept", 1, progressing("NewReplicaSetAvailable", "True", 1));
        let gone = deployment_at("gone", 1, progressing("NewReplicaSetAvailable", "True", 1));
        assert!(wakes(&mut seen, Event::Apply(kept.clone()), deployment));
        assert!(wakes(&mut seen, Event::Apply(gone), deployment));
        assert!(!wakes(&mut seen, Event::Init, deployment));
        // Listed again unchanged: no wake.
        assert!(!wakes(&mut seen, Event::InitApply(kept), deployment));
        assert!(!wakes(&mut seen, Event::InitDone, deployment));
        assert_eq!(
            seen.last.keys().collect::<Vec<_>>(),
            [&ObjectKey::from_uid("kept")]
        );
    }
}
