//! Recent dead letters of a pipeline, read from its dead-letter topic with
//! the reason, the step and where the event was read (the runtime's
//! `keystone.*` headers).
//!
//! Dead letters hold the events themselves, so reading them is a right of its
//! own: the console shows them only to a user the API server allows `get` on
//! `pipelines/deadletters` in the pipeline's namespace (the chart's edit
//! role). The Kafka connection is the console's, configured like the
//! operator's (`--operator-config`, `KAFKA_BOOTSTRAP_SERVERS`), with
//! credentials read from the Secrets the operator's configuration names in
//! the console's own namespace.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use keystone_operator::OperatorConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// How long one read of a topic may take.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The bytes of an event shown; the rest is cut.
const SHOWN_BYTES: usize = 2048;

/// One dead letter as the page shows it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeadLetterView {
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub reason: String,
    pub step: String,
    /// Where the event was read: topic, partition and offset.
    pub read_from: String,
    pub original: String,
}

/// Kafka client properties per configured cluster.
#[derive(Clone, Default)]
pub struct DeadLetterReader {
    clusters: BTreeMap<String, BTreeMap<String, String>>,
    default_cluster: Option<String>,
    /// Why dead letters cannot be read at all, when that is so.
    pub unavailable: Option<String>,
}

impl DeadLetterReader {
    /// Reads the operator's configuration and the credentials it names.
    pub async fn load(
        config: Result<&OperatorConfig, String>,
        client: kube::Client,
        namespace: &str,
    ) -> Self {
        let config = match config {
            Ok(config) => config,
            Err(e) => return Self::unavailable(format!("the operator's configuration: {e}")),
        };
        if config.kafka_clusters.is_empty() {
            return Self::unavailable(
                "no Kafka cluster is configured (--operator-config or KAFKA_BOOTSTRAP_SERVERS)",
            );
        }
        // Secrets are read only for clusters with TLS or SASL credentials.
        let secrets: kube::Api<Secret> = kube::Api::namespaced(client, namespace);
        let mut clusters = BTreeMap::new();
        for (name, cluster) in &config.kafka_clusters {
            match keystone_operator::kafka::client_properties(name, cluster, &secrets).await {
                Ok(props) => {
                    clusters.insert(name.clone(), props);
                }
                Err(e) => {
                    return Self::unavailable(format!(
                        "the credentials of Kafka cluster {name} in {namespace}: {e}"
                    ));
                }
            }
        }
        Self {
            clusters,
            default_cluster: config.default_cluster.clone().or_else(|| {
                (config.kafka_clusters.len() == 1)
                    .then(|| config.kafka_clusters.keys().next().cloned())
                    .flatten()
            }),
            unavailable: None,
        }
    }

    fn unavailable(reason: impl Into<String>) -> Self {
        Self {
            unavailable: Some(reason.into()),
            ..Self::default()
        }
    }

    /// The last `count` dead letters of `topic` on `cluster` (the default
    /// cluster when none), newest first.
    pub async fn recent(
        &self,
        cluster: Option<&str>,
        topic: &str,
        count: usize,
    ) -> Result<Vec<DeadLetterView>, String> {
        if let Some(reason) = &self.unavailable {
            return Err(reason.clone());
        }
        let name = cluster
            .map(str::to_owned)
            .or_else(|| self.default_cluster.clone())
            .ok_or("the pipeline names no Kafka cluster and there is no default")?;
        let props = self
            .clusters
            .get(&name)
            .ok_or_else(|| format!("Kafka cluster {name} is not configured"))?
            .clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || read_tail(&props, &topic, count))
            .await
            .map_err(|e| format!("reading the dead letters stopped: {e}"))?
    }
}

/// The last `count` records of every partition, merged newest first.
fn read_tail(
    props: &BTreeMap<String, String>,
    topic: &str,
    count: usize,
) -> Result<Vec<DeadLetterView>, String> {
    let mut config = ClientConfig::new();
    for (key, value) in props {
        config.set(key, value);
    }
    // No group: the console reads, it never commits or joins a group.
    config
        .set("group.id", "keystone-console-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer = config.create().map_err(|e| format!("Kafka client: {e}"))?;
    // All topics: naming a missing topic in a metadata request may create it
    // (auto.create.topics.enable), and reading must never create one.
    let metadata = consumer
        .fetch_metadata(None, READ_TIMEOUT)
        .map_err(|e| format!("reading the metadata of {topic}: {e}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut assignment = TopicPartitionList::new();
    let mut remaining = 0usize;
    for partition in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *partition, READ_TIMEOUT)
            .map_err(|e| format!("reading the offsets of {topic}/{partition}: {e}"))?;
        if high > low {
            let start = (high - count as i64).max(low);
            assignment
                .add_partition_offset(topic, *partition, Offset::Offset(start))
                .map_err(|e| e.to_string())?;
            remaining += 1;
        }
    }
    if remaining == 0 {
        return Ok(Vec::new());
    }
    consumer
        .assign(&assignment)
        .map_err(|e| format!("reading {topic}: {e}"))?;
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut letters = Vec::new();
    while remaining > 0 && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => letters.push(view(&message)),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => remaining -= 1,
            Some(Err(e)) => return Err(format!("reading {topic}: {e}")),
            None => {}
        }
    }
    letters.sort_by_key(|l| std::cmp::Reverse((l.timestamp_ms, l.offset)));
    letters.truncate(count);
    Ok(letters)
}

fn view(message: &rdkafka::message::BorrowedMessage<'_>) -> DeadLetterView {
    let header = |name: &str| -> String {
        message
            .headers()
            .and_then(|h| {
                h.iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
            .unwrap_or_default()
    };
    let payload = message.payload().unwrap_or_default();
    let mut original =
        String::from_utf8_lossy(&payload[..payload.len().min(SHOWN_BYTES)]).into_owned();
    if payload.len() > SHOWN_BYTES {
        original.push_str(&format!(" … ({} bytes)", payload.len()));
    }
    DeadLetterView {
        partition: message.partition(),
        offset: message.offset(),
        timestamp_ms: message.timestamp().to_millis(),
        reason: header("keystone.reason"),
        step: header("keystone.step"),
        read_from: format!(
            "{}/{}@{}",
            header("keystone.topic"),
            header("keystone.partition"),
            header("keystone.offset")
        ),
        original,
    }
}
