//! The objects each Pipeline controls, by kind, as the owned-object watches report them.
//!
//! A reconcile removes the objects of stages its plan no longer has. Asking
//! the API server for them (a label-selected list per kind) made every
//! reconcile scan every Deployment, Service and budget of the namespace: with
//! thousands of Pipelines that was most of a reconcile's time, and wasted
//! whenever nothing was stale, which is nearly always. The controller watches
//! these kinds anyway (their changes wake it); this index keeps, from those
//! same events, the names of the objects each Pipeline controls.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::api::PartialObjectMeta;
use kube::runtime::watcher::{self, Event, watcher};
use serde::de::DeserializeOwned;

use super::api_for;
use super::object_key::ObjectKey;
use super::wakes::{self, Watched};
use crate::context::Context;
use crate::resources::LABEL_PIPELINE;

/// The kinds whose objects a Pipeline's reconcile removes when stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum OwnedKind {
    ConfigMap,
    Deployment,
    Service,
    PodDisruptionBudget,
}

/// The index of every watched namespace (or of all of them).
#[derive(Default)]
pub(crate) struct OwnedObjects {
    scopes: Mutex<HashMap<Option<String>, Arc<Mutex<ScopeIndex>>>>,
}

impl OwnedObjects {
    /// The index the watches of `namespace` (None: every namespace) keep.
    pub(crate) fn scope(&self, namespace: Option<&str>) -> Arc<Mutex<ScopeIndex>> {
        lock(&self.scopes)
            .entry(namespace.map(str::to_owned))
            .or_default()
            .clone()
    }

    /// The names of the objects of `kind` in `namespace` that the object with
    /// uid `owner` controls; None until the watch of the kind has listed them
    /// (the caller asks the API server instead).
    pub(crate) fn names(
        &self,
        namespace: &str,
        kind: OwnedKind,
        owner: &str,
    ) -> Option<Vec<String>> {
        let scopes = lock(&self.scopes);
        let scope = scopes
            .get(&Some(namespace.to_owned()))
            .or_else(|| scopes.get(&None))?;
        lock(scope).kinds.get(&kind)?.names(owner)
    }
}

/// The changes of owned objects of kind `K`, watched by metadata only, that
/// wake their Pipeline; indexed on the way.
pub(super) fn metadata_changes<K>(
    ctx: &Context,
    namespace: Option<&str>,
    config: &watcher::Config,
) -> impl Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Indexed
        + Clone
        + std::fmt::Debug
        + DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    wakes::changed(
        track(
            ctx.owned.scope(namespace),
            K::OWNED_KIND,
            watcher(
                api_for::<PartialObjectMeta<K>>(&ctx.client, namespace),
                config.clone(),
            ),
        ),
        wakes::owned_metadata,
        Watched::Owned,
    )
}

/// The changes of owned Deployments that wake their Pipeline (a full watch:
/// their status tells whether a rollout is done); indexed on the way.
pub(super) fn deployment_changes(
    ctx: &Context,
    namespace: Option<&str>,
    config: &watcher::Config,
) -> impl Stream<Item = Result<Deployment, watcher::Error>> + Send + 'static {
    wakes::changed(
        track(
            ctx.owned.scope(namespace),
            OwnedKind::Deployment,
            watcher(
                api_for::<Deployment>(&ctx.client, namespace),
                config.clone(),
            ),
        ),
        wakes::deployment,
        Watched::Owned,
    )
}

/// The kinds watched by metadata whose objects the index keeps.
pub(super) trait Indexed {
    const OWNED_KIND: OwnedKind;
}

impl Indexed for ConfigMap {
    const OWNED_KIND: OwnedKind = OwnedKind::ConfigMap;
}

impl Indexed for Service {
    const OWNED_KIND: OwnedKind = OwnedKind::Service;
}

impl Indexed for PodDisruptionBudget {
    const OWNED_KIND: OwnedKind = OwnedKind::PodDisruptionBudget;
}

/// Keeps `scope`'s index of `kind` from a watch of that kind's owned objects,
/// passing the events on unchanged.
fn track<K, S>(
    scope: Arc<Mutex<ScopeIndex>>,
    kind: OwnedKind,
    events: S,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource + Send + 'static,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
{
    events.inspect(move |event| {
        if let Ok(event) = event {
            lock(&scope).kinds.entry(kind).or_default().apply(event);
        }
    })
}

#[derive(Default)]
pub(crate) struct ScopeIndex {
    kinds: HashMap<OwnedKind, KindIndex>,
}

/// One kind's objects by controlling owner.
#[derive(Default)]
struct KindIndex {
    /// Whether the watch has listed the objects once: before that, what the
    /// index lacks may exist all the same.
    listed: bool,
    current: Owners,
    /// What a relist (after a watch restart) has found so far; it replaces
    /// `current` when done, which drops what was deleted while the watch was away.
    relisting: Option<Owners>,
}

impl KindIndex {
    fn apply<K: Resource>(&mut self, event: &Event<K>) {
        match event {
            Event::Init => self.relisting = Some(Owners::default()),
            Event::InitApply(object) => self
                .relisting
                .as_mut()
                .unwrap_or(&mut self.current)
                .insert(object.meta()),
            Event::InitDone => {
                if let Some(relisted) = self.relisting.take() {
                    self.current = relisted;
                }
                self.listed = true;
            }
            Event::Apply(object) => self.current.insert(object.meta()),
            Event::Delete(object) => {
                if let Some(uid) = &object.meta().uid {
                    self.current.remove(ObjectKey::from_uid(uid));
                }
            }
        }
    }

    fn names(&self, owner: &str) -> Option<Vec<String>> {
        self.listed.then(|| {
            self.current
                .names
                .get(&ObjectKey::from_uid(owner))
                .map(|objects| objects.iter().map(|(_, name)| name.to_string()).collect())
                .unwrap_or_default()
        })
    }
}

#[derive(Default)]
struct Owners {
    /// Owner -> the objects it controls (a handful), by key and name.
    names: HashMap<ObjectKey, Vec<(ObjectKey, Box<str>)>>,
    /// Object -> owner, for an object whose owner changes or that goes.
    owner_of: HashMap<ObjectKey, ObjectKey>,
}

impl Owners {
    /// Records an object of a Pipeline: one that carries the pipeline label
    /// and has a controlling owner (those the label-selected list found).
    fn insert(&mut self, meta: &ObjectMeta) {
        let Some(uid) = &meta.uid else { return };
        let object = ObjectKey::from_uid(uid);
        let labelled = meta
            .labels
            .as_ref()
            .is_some_and(|labels| labels.contains_key(LABEL_PIPELINE));
        let owner = meta
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true));
        let owner = owner.map(|owner| ObjectKey::from_uid(&owner.uid));
        // Most events are status updates of an object already recorded
        // under the same owner (a name never changes): nothing to redo.
        if labelled && owner.is_some() && self.owner_of.get(&object) == owner.as_ref() {
            return;
        }
        self.remove(object);
        if let (true, Some(owner), Some(name)) = (labelled, owner, &meta.name) {
            self.names
                .entry(owner)
                // Mostly one object per kind and owner: no room for four.
                .or_insert_with(|| Vec::with_capacity(1))
                .push((object, name.as_str().into()));
            self.owner_of.insert(object, owner);
        }
    }

    fn remove(&mut self, object: ObjectKey) {
        let Some(owner) = self.owner_of.remove(&object) else {
            return;
        };
        if let Some(objects) = self.names.get_mut(&owner) {
            objects.retain(|(key, _)| *key != object);
            if objects.is_empty() {
                self.names.remove(&owner);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn deployment(uid: &str, name: &str, owner: Option<&str>, labelled: bool) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                uid: Some(uid.into()),
                name: Some(name.into()),
                namespace: Some("team".into()),
                labels: labelled.then(|| [(LABEL_PIPELINE.to_owned(), "p".to_owned())].into()),
                owner_references: owner.map(|owner| {
                    vec![OwnerReference {
                        uid: owner.into(),
                        controller: Some(true),
                        ..OwnerReference::default()
                    }]
                }),
                ..ObjectMeta::default()
            },
            ..Deployment::default()
        }
    }

    /// A Deployment Pipeline P controls.
    fn of_p(uid: &str, name: &str) -> Deployment {
        deployment(uid, name, Some("P"), true)
    }

    fn feed(objects: &OwnedObjects, scope: Option<&str>, events: Vec<Event<Deployment>>) {
        let index = objects.scope(scope);
        for event in events {
            lock(&index)
                .kinds
                .entry(OwnedKind::Deployment)
                .or_default()
                .apply(&event);
        }
    }

    /// The Deployments `owner` controls in namespace "team", sorted.
    fn deployments_of(objects: &OwnedObjects, owner: &str) -> Option<Vec<String>> {
        objects
            .names("team", OwnedKind::Deployment, owner)
            .map(|mut names| {
                names.sort();
                names
            })
    }

    #[test]
    fn nothing_is_known_until_the_watch_has_listed() {
        let objects = OwnedObjects::default();
        feed(
            &objects,
            Some("team"),
            vec![Event::Init, Event::InitApply(of_p("d1", "p-a"))],
        );
        assert_eq!(deployments_of(&objects, "P"), None);
        feed(&objects, Some("team"), vec![Event::InitDone]);
        assert_eq!(deployments_of(&objects, "P"), Some(vec!["p-a".to_owned()]));
        // Another kind's watch has not listed.
        assert_eq!(objects.names("team", OwnedKind::Service, "P"), None);
        // Another namespace is not this scope's.
        assert_eq!(objects.names("other", OwnedKind::Deployment, "P"), None);
    }

    #[test]
    fn names_follow_creations_deletions_and_owner_changes() {
        let objects = OwnedObjects::default();
        feed(
            &objects,
            None,
            vec![
                Event::Init,
                Event::InitApply(of_p("d1", "p-a")),
                Event::InitApply(deployment("q1", "q-a", Some("Q"), true)),
                // Not a Pipeline's: no controlling owner, or no pipeline label.
                Event::InitApply(deployment("x1", "loose", None, true)),
                Event::InitApply(deployment("x2", "unlabelled", Some("P"), false)),
                Event::InitDone,
                Event::Apply(of_p("d2", "p-b")),
            ],
        );
        // The scope of every namespace answers for any namespace.
        assert_eq!(
            deployments_of(&objects, "P"),
            Some(vec!["p-a".into(), "p-b".into()])
        );
        feed(
            &objects,
            None,
            vec![
                Event::Delete(of_p("d1", "p-a")),
                // Adopted by another owner: no longer P's.
                Event::Apply(deployment("d2", "p-b", Some("Q"), true)),
            ],
        );
        assert_eq!(deployments_of(&objects, "P"), Some(vec![]));
        assert_eq!(
            deployments_of(&objects, "Q"),
            Some(vec!["p-b".into(), "q-a".into()])
        );
    }

    #[test]
    fn a_relist_forgets_what_went_while_the_watch_was_away_and_answers_meanwhile() {
        let objects = OwnedObjects::default();
        feed(
            &objects,
            Some("team"),
            vec![
                Event::Init,
                Event::InitApply(of_p("d1", "p-a")),
                Event::InitApply(of_p("d2", "p-b")),
                Event::InitDone,
                // The watch restarts; p-a was deleted while it was away.
                Event::Init,
                Event::InitApply(of_p("d2", "p-b")),
            ],
        );
        // Mid-relist the last complete listing answers.
        assert_eq!(
            deployments_of(&objects, "P"),
            Some(vec!["p-a".into(), "p-b".into()])
        );
        feed(
            &objects,
            Some("team"),
            vec![Event::InitApply(of_p("d3", "p-c")), Event::InitDone],
        );
        assert_eq!(
            deployments_of(&objects, "P"),
            Some(vec!["p-b".into(), "p-c".into()])
        );
    }
}
