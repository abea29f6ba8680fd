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
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::config::OperatorConfig;
use crate::error::Error;
use crate::events::EventPublisher;
use crate::kafka::{Admin, client_properties};
use crate::ledger::LedgerStore;
use crate::metrics::Metrics;

/// The one field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "keystone-operator";

/// How long the operator trusts the credentials it read for an admin client
/// before reading its Secrets again.
pub const CREDENTIALS_RECHECK: Duration = Duration::from_secs(30);

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
    pub state_owners: LedgerStore,
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
    pipeline_stores: std::sync::Mutex<Vec<Store<Pipeline>>>,
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
            state_owners: LedgerStore::named(
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
        }
    }

    /// Adds a watched namespace's cache of Pipelines to those
    /// [`Context::known_pipelines`] reads.
    pub(crate) fn register_pipeline_store(&self, store: Store<Pipeline>) {
        self.pipeline_stores
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(store);
    }

    /// Every Pipeline the operator's caches hold now, without waiting for a cache
    /// still listing (for a watch mapper, which cannot wait).
    pub(crate) fn pipeline_stores_now(&self) -> Vec<Arc<Pipeline>> {
        self.pipeline_stores
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .flat_map(Store::state)
            .collect()
    }

    /// Every Pipeline the operator watches, once each cache has listed them all.
    pub(crate) async fn known_pipelines(&self) -> Vec<Arc<Pipeline>> {
        let stores: Vec<Store<Pipeline>> = self
            .pipeline_stores
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut pipelines = Vec::new();
        for store in stores {
            // A cache still listing would hide the other end of a cycle. Its
            // writer lives as long as the controllers, so an error means shutdown.
            if store.wait_until_ready().await.is_ok() {
                pipelines.extend(store.state());
            }
        }
        pipelines
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
