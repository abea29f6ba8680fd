//! The Kafka admin client for one configured cluster: observe topics, create,
//! raise partitions, correct configs, delete.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use rdkafka::ClientConfig;
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, ConfigSource, NewPartitions, NewTopic,
    ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use keystone_kafka_admin::GroupOffsets;

use crate::config::{KafkaCluster, SecretKey};
use crate::error::Error;
use crate::topics::ObservedTopic;

const TIMEOUT: Duration = Duration::from_secs(15);

/// An admin client bound to one cluster.
#[derive(Clone)]
pub struct Admin {
    cluster: String,
    client: Arc<AdminClient<DefaultClientContext>>,
    config: ClientConfig,
    /// Made at its first use: most reconciles never read a group's offsets.
    group_offsets: Arc<OnceLock<GroupOffsets>>,
}

/// The group of the operator's offset reader (`GroupOffsets`), which it never
/// joins; under the `keystone.` prefix its stages' groups have.
const OFFSET_READER_GROUP: &str = "keystone.operator.offsets";

/// librdkafka properties for a cluster, with credentials read from Secrets.
pub async fn client_properties(
    name: &str,
    cluster: &KafkaCluster,
    secrets: &Api<Secret>,
) -> Result<BTreeMap<String, String>, Error> {
    let mut props = BTreeMap::new();
    props.insert(
        "bootstrap.servers".to_owned(),
        cluster.bootstrap_servers.clone(),
    );
    if let Some(protocol) = &cluster.security_protocol {
        props.insert("security.protocol".to_owned(), protocol.to_lowercase());
    }
    if let Some(tls) = &cluster.tls {
        for (property, key) in [
            ("ssl.ca.pem", &tls.ca),
            ("ssl.certificate.pem", &tls.certificate),
            ("ssl.key.pem", &tls.key),
        ] {
            if let Some(key) = key {
                props.insert(property.to_owned(), secret_value(name, secrets, key).await?);
            }
        }
    }
    if let Some(sasl) = &cluster.sasl {
        props.insert("sasl.mechanism".to_owned(), sasl.mechanism.clone());
        props.insert(
            "sasl.username".to_owned(),
            secret_value(name, secrets, &sasl.username).await?,
        );
        props.insert(
            "sasl.password".to_owned(),
            secret_value(name, secrets, &sasl.password).await?,
        );
    }
    props.extend(cluster.client_config.clone());
    Ok(props)
}

async fn secret_value(
    cluster: &str,
    secrets: &Api<Secret>,
    key: &SecretKey,
) -> Result<String, Error> {
    let secret = secrets.get(&key.secret).await?;
    let missing = || Error::SecretKey {
        cluster: cluster.to_owned(),
        namespace: secret.metadata.namespace.clone().unwrap_or_default(),
        name: key.secret.clone(),
        key: key.key.clone(),
    };
    let bytes = crate::resources::secret_bytes(&secret, &key.key).ok_or_else(missing)?;
    String::from_utf8(bytes).map_err(|_| missing())
}

impl Admin {
    pub fn connect(cluster: &str, props: &BTreeMap<String, String>) -> Result<Admin, Error> {
        let mut config = ClientConfig::new();
        for (k, v) in props {
            config.set(k, v);
        }
        let client = config
            .create::<AdminClient<DefaultClientContext>>()
            .map_err(|source| Error::Kafka {
                cluster: cluster.to_owned(),
                source,
            })?;
        Ok(Admin {
            cluster: cluster.to_owned(),
            client: Arc::new(client),
            config,
            group_offsets: Arc::new(OnceLock::new()),
        })
    }

    /// The same connection, for ACLs and SCRAM credentials.
    pub fn authorization(&self) -> keystone_kafka_admin::KafkaAdmin {
        keystone_kafka_admin::KafkaAdmin::with_client(self.client.clone())
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    fn options() -> AdminOptions {
        AdminOptions::new()
            .request_timeout(Some(TIMEOUT))
            .operation_timeout(Some(TIMEOUT))
    }

    fn kafka_error(&self, source: rdkafka::error::KafkaError) -> Error {
        Error::Kafka {
            cluster: self.cluster.clone(),
            source,
        }
    }

    fn topic_error(&self, topic: &str, code: RDKafkaErrorCode) -> Error {
        Error::Topic {
            cluster: self.cluster.clone(),
            topic: topic.to_owned(),
            source: code,
        }
    }

    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let after = TIMEOUT + Duration::from_secs(5);
        tokio::time::timeout(after, fut)
            .await
            .map_err(|_| Error::KafkaTimeout {
                cluster: self.cluster.clone(),
                after,
            })?
    }

    /// Runs a blocking librdkafka call on the blocking pool, bounded.
    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        call: impl FnOnce(Arc<AdminClient<DefaultClientContext>>) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let client = self.client.clone();
        let cluster = self.cluster.clone();
        let after = TIMEOUT + Duration::from_secs(5);
        match tokio::time::timeout(after, tokio::task::spawn_blocking(move || call(client))).await {
            Err(_) => Err(Error::KafkaTimeout { cluster, after }),
            Ok(Err(join)) => {
                tracing::error!(error = %join, "{what} task failed");
                Err(Error::KafkaTimeout { cluster, after })
            }
            Ok(Ok(result)) => result,
        }
    }

    /// Partition counts of the named topics that exist.
    pub async fn partitions(&self, names: &[String]) -> Result<BTreeMap<String, i32>, Error> {
        let names = names.to_vec();
        let cluster = self.cluster.clone();
        self.blocking("metadata", move |client| {
            // All topics: naming a missing topic in a metadata request may create it.
            let metadata = client
                .inner()
                .fetch_metadata(None, TIMEOUT)
                .map_err(|source| Error::Kafka { cluster, source })?;
            let mut out = BTreeMap::new();
            for topic in metadata.topics() {
                // A topic being deleted (or not yet created everywhere) reports an error: absent.
                if topic.error().is_none() && names.iter().any(|n| n == topic.name()) {
                    out.insert(topic.name().to_owned(), topic.partitions().len() as i32);
                }
            }
            Ok(out)
        })
        .await
    }

    /// The partitions of `topic` on which consumer group `group` has
    /// committed an offset. One request to the group's coordinator, on the
    /// shared connection: no consumer is made and the group is not joined.
    pub async fn committed_partitions(&self, group: &str, topic: &str) -> Result<Vec<i32>, Error> {
        let (group, topic) = (group.to_owned(), topic.to_owned());
        let cluster = self.cluster.clone();
        let (config, reader) = (self.config.clone(), self.group_offsets.clone());
        self.blocking("committed offsets", move |_| {
            let failed = |source| Error::KafkaAdmin {
                cluster: cluster.clone(),
                source,
            };
            let reader = match reader.get() {
                Some(reader) => reader,
                None => {
                    let connected =
                        GroupOffsets::connect(&config, OFFSET_READER_GROUP).map_err(failed)?;
                    reader.get_or_init(|| connected)
                }
            };
            let committed = reader.committed_offsets(&group, TIMEOUT).map_err(failed)?;
            let mut partitions: Vec<i32> = committed
                .into_iter()
                .filter(|c| c.topic == topic)
                .map(|c| c.partition)
                .collect();
            partitions.sort_unstable();
            Ok(partitions)
        })
        .await
    }

    /// The end offset (high watermark) of each partition of `topic`, which
    /// has `partitions` partitions.
    pub async fn end_offsets(
        &self,
        topic: &str,
        partitions: i32,
    ) -> Result<BTreeMap<i32, i64>, Error> {
        let topic = topic.to_owned();
        let cluster = self.cluster.clone();
        self.blocking("watermarks", move |client| {
            let mut ends = BTreeMap::new();
            for partition in 0..partitions {
                let (_, high) = client
                    .inner()
                    .fetch_watermarks(&topic, partition, TIMEOUT)
                    .map_err(|source| Error::Kafka {
                        cluster: cluster.clone(),
                        source,
                    })?;
                ends.insert(partition, high);
            }
            Ok(ends)
        })
        .await
    }

    /// The topic's dynamic (per-topic) configs, the set `alter_configs` replaces.
    pub async fn dynamic_config(&self, topic: &str) -> Result<BTreeMap<String, String>, Error> {
        self.bounded(async {
            let results = self
                .client
                .describe_configs(&[ResourceSpecifier::Topic(topic)], &Self::options())
                .await
                .map_err(|e| self.kafka_error(e))?;
            let mut out = BTreeMap::new();
            for result in results {
                let resource = result.map_err(|code| self.topic_error(topic, code))?;
                for entry in resource.entries {
                    if entry.source == ConfigSource::DynamicTopic
                        && let Some(value) = entry.value
                    {
                        out.insert(entry.name, value);
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    pub async fn observe(
        &self,
        topic: &str,
        partitions: i32,
        with_config: bool,
    ) -> Result<ObservedTopic, Error> {
        let config = if with_config {
            Some(self.dynamic_config(topic).await?)
        } else {
            None
        };
        Ok(ObservedTopic { partitions, config })
    }

    pub async fn create(
        &self,
        topic: &str,
        partitions: i32,
        replication_factor: i32,
        config: &BTreeMap<String, String>,
    ) -> Result<(), Error> {
        self.bounded(async {
            let mut new = NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(replication_factor),
            );
            for (k, v) in config {
                new = new.set(k, v);
            }
            let results = self
                .client
                .create_topics(&[new], &Self::options())
                .await
                .map_err(|e| self.kafka_error(e))?;
            for result in results {
                match result {
                    Ok(_) => {}
                    // Someone (our previous run) created it in between: observed next time.
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((_, code)) => return Err(self.topic_error(topic, code)),
                }
            }
            Ok(())
        })
        .await
    }

    pub async fn raise_partitions(&self, topic: &str, total: i32) -> Result<(), Error> {
        self.bounded(async {
            let results = self
                .client
                .create_partitions(
                    &[NewPartitions::new(topic, total.max(1) as usize)],
                    &Self::options(),
                )
                .await
                .map_err(|e| self.kafka_error(e))?;
            for result in results {
                result.map_err(|(_, code)| self.topic_error(topic, code))?;
            }
            Ok(())
        })
        .await
    }

    /// Replaces the topic's whole dynamic config set (the legacy AlterConfigs
    /// API rdkafka wraps is not incremental), which is what drift correction wants.
    pub async fn set_config(
        &self,
        topic: &str,
        config: &BTreeMap<String, String>,
    ) -> Result<(), Error> {
        self.bounded(async {
            let mut alter = AlterConfig::new(ResourceSpecifier::Topic(topic));
            for (k, v) in config {
                alter = alter.set(k, v);
            }
            let results = self
                .client
                .alter_configs(&[alter], &Self::options())
                .await
                .map_err(|e| self.kafka_error(e))?;
            for result in results {
                result.map_err(|(_, code)| self.topic_error(topic, code))?;
            }
            Ok(())
        })
        .await
    }

    pub async fn delete(&self, topic: &str) -> Result<(), Error> {
        self.bounded(async {
            let results = self
                .client
                .delete_topics(&[topic], &Self::options())
                .await
                .map_err(|e| self.kafka_error(e))?;
            for result in results {
                match result {
                    Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                    Err((_, code)) => return Err(self.topic_error(topic, code)),
                }
            }
            Ok(())
        })
        .await
    }
}
