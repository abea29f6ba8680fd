//! Kubernetes Events about Pipelines (`events.k8s.io/v1`).
//!
//! What kube's `Recorder` does, with a smaller memory: an event that repeats
//! (same object, type, reason and action) within six minutes becomes a series
//! on the first one (its count and last time are patched) instead of a new
//! Event. The `Recorder` remembers every Event it published in those six
//! minutes as a whole object in one hash table that never shrinks: about
//! 1.4 KB per event, 11 MB after 1,000 Pipelines were created together
//! (benchmark S8). Here a repeat needs only the Event's name and count, kept
//! under a 64-bit hash of what it repeats, and the table forgets old series
//! once a minute rather than scanning all of them on every event.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

/// How long a published event can still grow a series (kube's `Recorder` uses the same).
const SERIES_TTL: SignedDuration = SignedDuration::from_mins(6);

/// How often series past their window are dropped from memory.
const SWEEP_EVERY: SignedDuration = SignedDuration::from_mins(1);

/// Which earlier event a new one repeats.
#[derive(Hash)]
struct Key {
    /// The regarded object's uid, else its namespace/name.
    object: String,
    warning: bool,
    reason: String,
    action: String,
}

/// What a repeat needs of the event it repeats.
#[derive(Debug)]
struct Published {
    name: String,
    count: i32,
    last: Timestamp,
}

/// The series that can still grow, by the hash of their [`Key`].
#[derive(Default)]
struct Recent {
    series: HashMap<u64, Published>,
    next_sweep: Option<Timestamp>,
}

/// Publishes Events as `controller` (instance `instance`).
pub struct EventPublisher {
    client: Client,
    controller: String,
    instance: String,
    recent: Mutex<Recent>,
}

impl EventPublisher {
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        Self {
            client,
            controller: controller.to_owned(),
            instance: instance.unwrap_or_else(|| controller.to_owned()),
            recent: Mutex::new(Recent::default()),
        }
    }

    /// Publishes an event about `regarding` (a repeat patches the series of the first).
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let key = Key {
            object: regarding.uid.clone().unwrap_or_else(|| {
                format!("{namespace}/{}", regarding.name.as_deref().unwrap_or(""))
            }),
            warning,
            reason: reason.to_owned(),
            action: action.to_owned(),
        };
        let repeat = self.remember(&key, now, None);
        let events: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        if let Some((name, count)) = repeat {
            let patch = json!({
                "series": EventSeries { count, last_observed_time: MicroTime(now) },
            });
            match events
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return Ok(()),
                // Gone (the API server keeps events for an hour): start anew.
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let name = format!(
            "{}.{:x}",
            regarding.name.as_deref().unwrap_or(&self.controller),
            now.as_nanosecond()
        );
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.to_owned()),
                ..ObjectMeta::default()
            },
            action: Some(action.to_owned()),
            reason: Some(reason.to_owned()),
            note: Some(note),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            type_: Some(if warning { "Warning" } else { "Normal" }.to_owned()),
            ..Event::default()
        };
        let result = events.create(&PostParams::default(), &event).await;
        if result.is_ok() {
            self.remember(&key, now, Some(name));
        }
        result.map(|_| ())
    }

    /// Forgets events older than the series window; with `created`, records a
    /// new event; without, counts a repeat and returns the event it repeats.
    fn remember(
        &self,
        key: &Key,
        now: Timestamp,
        created: Option<String>,
    ) -> Option<(String, i32)> {
        let hash = {
            let mut hasher = DefaultHasher::new();
            key.hash(&mut hasher);
            hasher.finish()
        };
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.next_sweep.is_none_or(|at| at <= now) {
            recent.series.retain(|_, p| p.last + SERIES_TTL > now);
            // A burst of events should not keep its table's size for good.
            if recent.series.capacity() > 64 && recent.series.len() < recent.series.capacity() / 4 {
                recent.series.shrink_to_fit();
            }
            recent.next_sweep = Some(now + SWEEP_EVERY);
        }
        match created {
            Some(name) => {
                recent.series.insert(
                    hash,
                    Published {
                        name,
                        count: 1,
                        last: now,
                    },
                );
                None
            }
            // A series past its window that no sweep has dropped yet is over.
            None => match recent.series.get_mut(&hash) {
                Some(p) if p.last + SERIES_TTL > now => {
                    p.count += 1;
                    p.last = now;
                    Some((p.name.clone(), p.count))
                }
                _ => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(reason: &str) -> Key {
        Key {
            object: "uid-1".to_owned(),
            warning: false,
            reason: reason.to_owned(),
            action: "Reconcile".to_owned(),
        }
    }

    fn publisher() -> EventPublisher {
        // A client that is never used: `remember` needs none.
        EventPublisher::new(crate::offline_client(), "keystone-operator", None)
    }

    #[tokio::test]
    async fn a_repeat_within_the_window_counts_on_the_first_event() {
        let p = publisher();
        let t0 = Timestamp::now();
        assert_eq!(p.remember(&key("A"), t0, None), None);
        p.remember(&key("A"), t0, Some("p.1".to_owned()));
        let t1 = t0 + SignedDuration::from_mins(1);
        assert_eq!(p.remember(&key("A"), t1, None), Some(("p.1".to_owned(), 2)));
        assert_eq!(p.remember(&key("A"), t1, None), Some(("p.1".to_owned(), 3)));
        // Another reason is another event.
        assert_eq!(p.remember(&key("B"), t1, None), None);
        // Past the window since the last repeat: a new event.
        let t2 = t1 + SERIES_TTL + SignedDuration::from_secs(1);
        assert_eq!(p.remember(&key("A"), t2, None), None);
        assert!(p.recent.lock().expect("lock").series.is_empty());
    }

    #[tokio::test]
    async fn a_series_past_its_window_is_over_before_the_next_sweep() {
        let p = publisher();
        let t0 = Timestamp::now();
        p.remember(&key("A"), t0, Some("p.1".to_owned()));
        // Just after a sweep that found A still in its window.
        let t1 = t0 + SERIES_TTL - SignedDuration::from_secs(1);
        assert_eq!(p.remember(&key("B"), t1, None), None);
        let t2 = t1 + SignedDuration::from_secs(2);
        assert_eq!(p.remember(&key("A"), t2, None), None);
        assert_eq!(
            p.recent.lock().expect("lock").series.len(),
            1,
            "kept until the next sweep"
        );
        let t3 = t1 + SWEEP_EVERY;
        assert_eq!(p.remember(&key("B"), t3, None), None);
        assert!(p.recent.lock().expect("lock").series.is_empty());
    }
}
