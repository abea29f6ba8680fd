//! The state the controllers share: the API client, the operator's
//! configuration, the event publisher, metrics, the topic ledger and one Kafka
//! admin client per cluster.
//!
//! It is a module of its own so that the controllers and the checkpoint
//! protocol both take it without importing each other.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::Secret;
use keystone_crds::pipeline::Pipeline;
use kube::{Api, Client, Resource};
use tokio::sync::Mutex;
use tracing::warn;

use crate::config::OperatorConfig;
use crate::error::Error;
use crate::events::EventPublisher;
use crate::kafka::{Admin, client_properties};
use crate::ledger::LedgerStore;
use crate::metrics::Metrics;

/// The one field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "keystone-operator";

/// Shared state of the controllers.
pub struct Context {
    pub client: Client,
    pub config: OperatorConfig,
    /// Where the ledger, the Lease and the Kafka credential Secrets live.
    pub operator_namespace: String,
    pub events: EventPublisher,
    pub metrics: Metrics,
    pub ledger: LedgerStore,
    admins: Mutex<HashMap<String, Admin>>,
    failures: std::sync::Mutex<HashMap<String, u32>>,
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
            client,
            config,
            operator_namespace,
            metrics,
            admins: Mutex::new(HashMap::new()),
            failures: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The admin client of a configured Kafka cluster, connected on first use.
    pub(crate) async fn admin(&self, cluster: &str) -> Result<Admin, Error> {
        let mut admins = self.admins.lock().await;
        if let Some(admin) = admins.get(cluster) {
            return Ok(admin.clone());
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
        let props = client_properties(cluster, config, &secrets).await?;
        let admin = Admin::connect(cluster, &props)?;
        admins.insert(cluster.to_owned(), admin.clone());
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
