//! The state the controllers share: the API client, the operator's
//! configuration, the event publisher, metrics, the topic ledger and one Kafka
//! admin client per cluster.
//!
//! It is a module of its own so that the controllers and the checkpoint
//! protocol both take it without importing each other.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use keystone_crds::pipeline::Pipeline;
use keystone_crds::processor::Processor;
use kube::api::ListParams;
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::config::OperatorConfig;
use crate::error::Error;
use crate::events::EventPublisher;
use crate::kafka::{Admin, client_properties};
use crate::ledger::{LedgerStore, ShardedMap};
use crate::metrics::Metrics;

/// The one field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "keystone-operator";

/// How long the operator trusts the credentials it read for an admin client
/// before reading its Secrets again.
pub const CREDENTIALS_RECHECK: Duration = Duration::from_secs(30);

/// How long a reconcile waits for every watched namespace's Pipelines (and its
/// own namespace's Processors) to be listed (at start, or after a watch was
/// lost) before it fails and is retried.
pub const CACHE_LISTED: Duration = Duration::from_secs(30);

/// An admin client and the properties (credentials included) it was built with.
struct CachedAdmin {
    admin: Admin,
    props: BTreeMap<String, String>,
    checked: Instant,
}

/// Shared state of the controllers.
pub struct Context {
    pub client: Client,
    pub config: OperatorConfig,
    /// Where the ledger, the Lease and the Kafka credential Secrets live.
    pub operator_namespace: String,
    pub events: EventPublisher,
    pub metrics: Metrics,
    pub ledger: LedgerStore,
    /// Which incarnation (UID) of each pipeline its internal state belongs to.
    pub state_owners: ShardedMap,
    /// The key control tokens derive from, once read (`control`).
    pub control_key: tokio::sync::OnceCell<Vec<u8>>,
    /// Periodic and manual checkpoints running outside the reconcile, per pipeline.
    pub background_checkpoints: std::sync::Mutex<HashMap<String, crate::checkpoint::Background>>,
    /// Resumes of stopped instances running outside the reconcile, per
    /// pipeline: no checkpoint starts before its pipeline's has finished.
    pub background_resumes: std::sync::Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// Since when a due checkpoint has waited for its instances to be Ready, per pipeline.
    pub checkpoint_waits: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    admins: Mutex<HashMap<String, CachedAdmin>>,
    failures: std::sync::Mutex<HashMap<String, u32>>,
    /// The caches of Pipelines, one per watched namespace (or one for all): the
    /// check for cycles between pipelines needs every pipeline, not one.
    pipeline_stores: std::sync::Mutex<Vec<(String, Store<Pipeline>)>>,
    /// The caches of Processors, one per watched namespace (None: for all).
    processor_stores: std::sync::Mutex<Vec<(Option<String>, Store<Processor>)>>,
    /// Schema registry clients, kept across reconciles.
    pub(crate) registries: crate::registry::RegistryClients,
    /// The objects each Pipeline controls, kept from the owned-object watches.
    pub(crate) owned: crate::controller::OwnedObjects,
}

impl Context {
    pub fn new(
        client: Client,
        config: OperatorConfig,
        operator_namespace: String,
        metrics: Metrics,
    ) -> Self {
        Self {
            events: EventPublisher::new(
                client.clone(),
                FIELD_MANAGER,
                std::env::var("POD_NAME").ok(),
            ),
            ledger: LedgerStore::new(Api::namespaced(client.clone(), &operator_namespace)),
            state_owners: ShardedMap::new(
                Api::namespaced(client.clone(), &operator_namespace),
                crate::controller::STATE_OWNERS,
                "Which incarnation of each Pipeline its internal state (changelogs, consumer groups) belongs to: <namespace>.<pipeline> = <metadata.uid>. Written by the operator.",
            ),
            control_key: tokio::sync::OnceCell::new(),
            client,
            config,
            operator_namespace,
            metrics,
            background_checkpoints: std::sync::Mutex::new(HashMap::new()),
            background_resumes: std::sync::Mutex::new(HashMap::new()),
            checkpoint_waits: std::sync::Mutex::new(HashMap::new()),
            admins: Mutex::new(HashMap::new()),
            failures: std::sync::Mutex::new(HashMap::new()),
            pipeline_stores: std::sync::Mutex::new(Vec::new()),
            processor_stores: std::sync::Mutex::new(Vec::new()),
            registries: Default::default(),
            owned: Default::default(),
        }
    }

    /// Adds a watched namespace's (None: every namespace's) cache of Pipelines
    /// to those [`Context::known_pipelines`] reads.
    pub(crate) fn register_pipeline_store(&self, namespace: Option<&str>, store: Store<Pipeline>) {
        self.pipeline_stores
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((namespace.unwrap_or("(all)").to_owned(), store));
    }

    /// Adds a watched namespace's (None: every namespace's) cache of
    /// Processors, which [`Context::processors_in`] reads.
    pub(crate) fn register_processor_store(
        &self,
        namespace: Option<&str>,
        store: Store<Processor>,
    ) {
        self.processor_stores
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((namespace.map(str::to_owned), store));
    }

    /// The Processors of `namespace`: from the cache of the watch that covers
    /// it once it has listed them (the watch's events wake the Pipelines that
    /// use them after the cache took them in), else from the API server.
    pub(crate) async fn processors_in(&self, namespace: &str) -> Result<Vec<Processor>, Error> {
        let store = self
            .processor_stores
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|(scope, _)| scope.as_deref().is_none_or(|scope| scope == namespace))
            .map(|(_, store)| store.clone());
        let Some(store) = store else {
            let api: Api<Processor> = Api::namespaced(self.client.clone(), namespace);
            return Ok(api.list(&ListParams::default()).await?.items);
        };
        match tokio::time::timeout(CACHE_LISTED, store.wait_until_ready()).await {
            Ok(_) => Ok(store
                .state()
                .iter()
                .filter(|p| p.metadata.namespace.as_deref() == Some(namespace))
                .map(|p| Processor::clone(p))
                .collect()),
            Err(_) => Err(Error::NotListed {
                kind: "Processor",
                namespace: namespace.to_owned(),
                after: CACHE_LISTED,
            }),
        }
    }

    /// Every Pipeline the operator's caches hold now, without waiting for a cache
    /// still listing (for a watch mapper, which cannot wait).
    pub(crate) fn pipeline_stores_now(&self) -> Vec<Arc<Pipeline>> {
        self.pipeline_stores
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .flat_map(|(_, store)| store.state())
            .collect()
    }

    /// Every Pipeline the operator watches, once each cache has listed them
    /// all. A cache still listing would hide the other end of a cycle, so one
    /// that does not list within [`CACHE_LISTED`] fails the reconcile
    /// (retried, and logged with the namespace) rather than hold it.
    pub(crate) async fn known_pipelines(&self) -> Result<Vec<Arc<Pipeline>>, Error> {
        let stores: Vec<(String, Store<Pipeline>)> = self
            .pipeline_stores
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut pipelines = Vec::new();
        for (namespace, store) in stores {
            match tokio::time::timeout(CACHE_LISTED, store.wait_until_ready()).await {
                Ok(Ok(())) => pipelines.extend(store.state()),
                // The writer lives as long as the controllers: gone means shutdown.
                Ok(Err(_)) => {}
                Err(_) => {
                    return Err(Error::NotListed {
                        kind: "Pipeline",
                        namespace,
                        after: CACHE_LISTED,
                    });
                }
            }
        }
        Ok(pipelines)
    }

    /// The admin client of a configured Kafka cluster, connected on first use
    /// and rebuilt when its credentials change. The Secrets are read again at
    /// most every [`CREDENTIALS_RECHECK`]: a rotated password (or certificate)
    /// takes effect without restarting the operator.
    pub(crate) async fn admin(&self, cluster: &str) -> Result<Admin, Error> {
        let mut admins = self.admins.lock().await;
        if let Some(cached) = admins.get(cluster)
            && cached.checked.elapsed() < CREDENTIALS_RECHECK
        {
            return Ok(cached.admin.clone());
        }
        let config = self
            .config
            .kafka_clusters
            .get(cluster)
            .ok_or(Error::MissingField {
                kind: "operator configuration",
                field: "kafkaClusters entry",
            })?;
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.operator_namespace);
        let props = match client_properties(cluster, config, &secrets).await {
            Ok(props) => props,
            // The API server is away (or the Secret is being replaced): keep
            // the client that worked rather than fail every reconcile.
            Err(error) if admins.contains_key(cluster) => {
                warn!(cluster, %error, "could not re-read the cluster's credentials; keeping the current client");
                let cached = admins.get_mut(cluster).expect("checked above");
                cached.checked = Instant::now();
                return Ok(cached.admin.clone());
            }
            Err(error) => return Err(error),
        };
        if let Some(cached) = admins.get_mut(cluster)
            && cached.props == props
        {
            cached.checked = Instant::now();
            return Ok(cached.admin.clone());
        }
        if admins.contains_key(cluster) {
            info!(
                cluster,
                "the cluster's credentials changed; reconnecting the admin client"
            );
        }
        let admin = Admin::connect(cluster, &props)?;
        admins.insert(
            cluster.to_owned(),
            CachedAdmin {
                admin: admin.clone(),
                props,
                checked: Instant::now(),
            },
        );
        Ok(admin)
    }

    pub(crate) async fn publish(
        &self,
        pipeline: &Pipeline,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let note = note.chars().take(1000).collect();
        if let Err(e) = self
            .events
            .publish(&pipeline.object_ref(&()), warning, reason, action, note)
            .await
        {
            warn!(error = %e, reason, "could not publish event");
        }
    }

    /// Consecutive failed reconciles of `key`: counts one more when `failed`,
    /// forgets the key otherwise. The backoff of the error policies grows with it.
    pub(crate) fn failure_count(&self, key: &str, failed: bool) -> u32 {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failed {
            let n = failures.entry(key.to_owned()).or_insert(0);
            *n += 1;
            *n
        } else {
            failures.remove(key);
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector;
    use kube::runtime::watcher::Event;

    /// A context whose client points nowhere: these tests never call the API.
    fn offline_context() -> Context {
        Context::new(
            crate::offline_client(),
            OperatorConfig::default(),
            "ops".into(),
            Metrics::new(),
        )
    }

    fn pipeline(namespace: &str, name: &str) -> Pipeline {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "keystone.dev/v1alpha1",
            "kind": "Pipeline",
            "metadata": { "name": name, "namespace": namespace },
            "spec": {
                "source": { "topic": "in", "schema": { "fields": [] } },
                "sinks": [{ "name": "out", "kafka": { "topic": "out" } }]
            }
        }))
        .expect("pipeline")
    }

    #[tokio::test(start_paused = true)]
    async fn a_namespace_never_listed_fails_the_wait_and_names_the_namespace() {
        let ctx = offline_context();
        let (listed, mut listed_writer) = reflector::store();
        for event in [
            Event::Init,
            Event::InitApply(pipeline("team-a", "orders")),
            Event::InitDone,
        ] {
            listed_writer.apply_watcher_event(&event);
        }
        let (unlisted, _unlisted_writer) = reflector::store::<Pipeline>();
        ctx.register_pipeline_store(Some("team-a"), listed);
        assert_eq!(ctx.known_pipelines().await.expect("listed").len(), 1);

        ctx.register_pipeline_store(Some("team-b"), unlisted);
        match ctx.known_pipelines().await {
            Err(Error::NotListed {
                kind: "Pipeline",
                namespace,
                after,
            }) => {
                assert_eq!(namespace, "team-b");
                assert_eq!(after, CACHE_LISTED);
            }
            other => panic!("expected team-b not listed, got {other:?}"),
        }
        // What the caches hold is still there for the watch mappers.
        assert_eq!(ctx.pipeline_stores_now().len(), 1);
    }

    fn processor(namespace: &str, name: &str) -> Processor {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "keystone.dev/v1alpha1",
            "kind": "Processor",
            "metadata": { "name": name, "namespace": namespace },
            "spec": { "filter": { "expression": "true" } }
        }))
        .expect("processor")
    }

    #[tokio::test(start_paused = true)]
    async fn processors_come_from_the_cache_of_their_namespace_once_it_has_listed() {
        let ctx = offline_context();
        let (store, mut writer) = reflector::store();
        ctx.register_processor_store(None, store);
        match ctx.processors_in("team-a").await {
            Err(Error::NotListed {
                kind: "Processor",
                namespace,
                after,
            }) => {
                assert_eq!(namespace, "team-a");
                assert_eq!(after, CACHE_LISTED);
            }
            other => panic!("expected the Processors not listed, got {other:?}"),
        }
        for event in [
            Event::Init,
            Event::InitApply(processor("team-a", "mask")),
            Event::InitApply(processor("team-b", "mask")),
            Event::InitApply(processor("team-a", "enrich")),
            Event::InitDone,
        ] {
            writer.apply_watcher_event(&event);
        }
        let mut names: Vec<String> = ctx
            .processors_in("team-a")
            .await
            .expect("listed")
            .iter()
            .map(kube::ResourceExt::name_any)
            .collect();
        names.sort();
        assert_eq!(names, ["enrich", "mask"]);
    }
}
