//! Waiting on conditions with a timeout and a failure message that explains
//! what was seen: the object's status and its recent events. No fixed sleeps.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use kube::api::ListParams;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

const POLL: Duration = Duration::from_millis(200);

// Debug prints the (multi-line) message, so `.unwrap()` in a test shows the
// status and events readably.
#[derive(Error)]
pub enum WaitError {
    #[error("timed out after {after:?} waiting for {what}\n{details}")]
    Timeout {
        what: String,
        after: Duration,
        details: String,
    },
    #[error("kubernetes API error while waiting for {what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
}

impl Debug for WaitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Polls `name` until `condition` holds and returns the object. On timeout
/// the error shows the last status seen and the object's recent events.
pub async fn wait_for<K, F>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    what: &str,
    condition: F,
) -> Result<K, WaitError>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
    F: Fn(&K) -> bool,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last: Option<K> = None;
    loop {
        match api.get_opt(name).await {
            Ok(Some(obj)) => {
                if condition(&obj) {
                    return Ok(obj);
                }
                last = Some(obj);
            }
            Ok(None) => last = None,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "transient error while waiting");
            }
            Err(source) => {
                return Err(WaitError::Api {
                    what: what.to_owned(),
                    source,
                });
            }
        }
        if tokio::time::Instant::now() >= deadline {
            let details = describe(api, name, last.as_ref()).await;
            return Err(WaitError::Timeout {
                what: format!("{what} ({name})"),
                after: timeout,
                details,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls until `name` no longer exists.
pub async fn wait_for_deletion<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
) -> Result<(), WaitError>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match api.get_opt(name).await {
            Ok(None) => return Ok(()),
            Ok(Some(obj)) => Some(obj),
            Err(_) => None,
        };
        if tokio::time::Instant::now() >= deadline {
            let details = describe(api, name, last.as_ref()).await;
            return Err(WaitError::Timeout {
                what: format!("deletion of {name}"),
                after: timeout,
                details,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `check` until it returns `Some`; `describe` explains the last state
/// on timeout (e.g. list the pods of a namespace).
pub async fn wait_until<T, C, CF, D, DF>(
    timeout: Duration,
    what: &str,
    mut check: C,
    describe: D,
) -> Result<T, WaitError>
where
    C: FnMut() -> CF,
    CF: Future<Output = Option<T>>,
    D: FnOnce() -> DF,
    DF: Future<Output = String>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(WaitError::Timeout {
                what: what.to_owned(),
                after: timeout,
                details: describe().await,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn describe<K>(api: &Api<K>, name: &str, last: Option<&K>) -> String
where
    K: Resource + Clone + Serialize,
{
    let status = match last {
        None => "object not found".to_owned(),
        Some(obj) => {
            let value = serde_json::to_value(obj).unwrap_or_default();
            let status = value
                .get("status")
                .cloned()
                .unwrap_or(serde_json::Value::Null);
            format!(
                "last status of {}/{}:\n{}",
                obj.namespace().unwrap_or_default(),
                obj.name_any(),
                serde_json::to_string_pretty(&status).unwrap_or_default()
            )
        }
    };
    let ns = last
        .and_then(|o| o.namespace())
        .or_else(|| api_namespace(api));
    let events = recent_events(&api_client(api), ns.as_deref(), name).await;
    format!("{status}\nrecent events for {name}:\n{events}")
}

fn api_client<K: Resource + Clone>(api: &Api<K>) -> Client {
    api.clone().into_client()
}

fn api_namespace<K: Resource>(api: &Api<K>) -> Option<String> {
    api.namespace().map(str::to_owned)
}

/// Polls the events about objects named `name` until one line contains every
/// needle, and returns them. Events are written after the effect they report
/// (a raised topic, a status), so a test waits for them instead of racing.
pub async fn wait_for_event(
    client: &Client,
    ns: Option<&str>,
    name: &str,
    needles: &[&str],
    timeout: Duration,
) -> Result<String, WaitError> {
    let found = |events: &str| {
        events
            .lines()
            .any(|line| needles.iter().all(|n| line.contains(n)))
    };
    wait_until(
        timeout,
        &format!("an event about {name} with {needles:?}"),
        || async {
            let events = recent_events(client, ns, name).await;
            found(&events).then_some(events)
        },
        || async {
            format!(
                "recent events for {name}:\n{}",
                recent_events(client, ns, name).await
            )
        },
    )
    .await
}

/// The latest events about objects named `name` (in `ns`, or everywhere),
/// one line each, newest last.
pub async fn recent_events(client: &Client, ns: Option<&str>, name: &str) -> String {
    let api: Api<Event> = match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let lp = ListParams::default().fields(&format!("involvedObject.name={name}"));
    match api.list(&lp).await {
        Err(e) => format!("  (could not list events: {e})"),
        Ok(list) if list.items.is_empty() => "  (none)".to_owned(),
        Ok(list) => {
            let mut items = list.items;
            items.sort_by_key(|e| e.last_timestamp.clone().map(|t| t.0));
            items
                .iter()
                .rev()
                .take(15)
                .rev()
                .map(|e| {
                    format!(
                        "  {} {} {}: {}",
                        e.type_.as_deref().unwrap_or(""),
                        e.involved_object.kind.as_deref().unwrap_or(""),
                        e.reason.as_deref().unwrap_or(""),
                        e.message.as_deref().unwrap_or("")
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
    }
}
