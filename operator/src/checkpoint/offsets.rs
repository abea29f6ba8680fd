//! What a checkpoint reads from Kafka itself: partition counts, end offsets (high
//! watermarks), and whether a stage's consumer group has consumed its input to
//! the end. librdkafka calls block, so each runs on the blocking pool.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use keystone_crds::plan::PlanStage;
use kube::Api;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::CheckpointFailure;
use crate::context::Context;
use crate::kafka::client_properties;

const TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stage may take to consume what the stopped stage before it wrote.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one look past a committed offset may take.
const PEEK_TIMEOUT: Duration = Duration::from_secs(5);
/// The group id of the operator's own reads; it never subscribes nor commits.
const READER_GROUP: &str = "keystone-operator-checkpoint";

/// Kafka clients for one checkpoint, one per cluster, made on first use.
pub(super) struct KafkaView<'a> {
    ctx: &'a Context,
    readers: HashMap<String, Arc<BaseConsumer>>,
}

async fn blocking<T: Send + 'static>(
    what: String,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("{what}: {e}"))?
}

fn partition_count(consumer: &BaseConsumer, topic: &str) -> Result<i32, String> {
    // All topics: naming a missing topic in a metadata request may create it.
    let metadata = consumer
        .fetch_metadata(None, TIMEOUT)
        .map_err(|e| format!("reading the metadata of {topic:?}: {e}"))?;
    metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len() as i32)
        .ok_or_else(|| format!("topic {topic:?} does not exist"))
}

fn watermarks(consumer: &BaseConsumer, topic: &str, partition: i32) -> Result<(i64, i64), String> {
    consumer
        .fetch_watermarks(topic, partition, TIMEOUT)
        .map_err(|e| format!("reading the offsets of {topic:?} partition {partition}: {e}"))
}

/// A partition a consumer group has not consumed to the end: (partition,
/// committed offset, end offset).
pub(super) type Undrained = (i32, i64, i64);

/// The input partitions the consumer's group has not consumed to the end. A
/// committed offset below the end may only lack transaction markers (exactly-once
/// output ends each transaction with one) or aborted records: those partitions
/// are read from the committed offset, `read_committed`, and count as consumed
/// when the end comes before any record.
fn undrained(consumer: &BaseConsumer, topic: &str) -> Result<Vec<Undrained>, String> {
    let partitions = partition_count(consumer, topic)?;
    let mut wanted = TopicPartitionList::new();
    for partition in 0..partitions {
        wanted.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(wanted, TIMEOUT)
        .map_err(|e| format!("reading the committed offsets of {topic:?}: {e}"))?;
    let mut candidates = BTreeMap::new();
    for partition in 0..partitions {
        let (low, high) = watermarks(consumer, topic, partition)?;
        let next = match committed
            .find_partition(topic, partition)
            .map(|e| e.offset())
        {
            Some(Offset::Offset(offset)) => offset,
            _ => low,
        };
        if next < high {
            candidates.insert(partition, (partition, next, high));
        }
    }
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let mut assignment = TopicPartitionList::new();
    for (partition, next, _) in candidates.values() {
        assignment
            .add_partition_offset(topic, *partition, Offset::Offset(*next))
            .map_err(|e| format!("assigning {topic:?} partition {partition}: {e}"))?;
    }
    consumer
        .assign(&assignment)
        .map_err(|e| format!("assigning {topic:?}: {e}"))?;
    let mut open: BTreeSet<i32> = candidates.keys().copied().collect();
    let mut pending = Vec::new();
    let deadline = std::time::Instant::now() + PEEK_TIMEOUT;
    while !open.is_empty() && std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) if open.remove(&message.partition()) => {
                pending.push(candidates[&message.partition()]);
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                open.remove(&partition);
            }
            Some(Err(e)) => return Err(format!("reading {topic:?}: {e}")),
            Some(Ok(_)) | None => {}
        }
    }
    let _ = consumer.unassign();
    // Not seen to the end in time: not known to be consumed.
    pending.extend(open.iter().map(|p| candidates[p]));
    pending.sort();
    Ok(pending)
}

impl<'a> KafkaView<'a> {
    pub(super) fn new(ctx: &'a Context) -> Self {
        Self {
            ctx,
            readers: HashMap::new(),
        }
    }

    /// A consumer for `cluster` (a configured name); `group` None is the
    /// operator's own reader group.
    async fn consumer(
        &self,
        cluster: Option<&str>,
        group: Option<&str>,
    ) -> Result<(String, BaseConsumer), String> {
        let name = cluster.ok_or("the Kafka cluster is not in the operator's configuration")?;
        let config = self
            .ctx
            .config
            .kafka_clusters
            .get(name)
            .ok_or_else(|| format!("Kafka cluster {name:?} is not configured"))?;
        let secrets: Api<Secret> =
            Api::namespaced(self.ctx.client.clone(), &self.ctx.operator_namespace);
        let props = client_properties(name, config, &secrets)
            .await
            .map_err(|e| e.to_string())?;
        let mut client = ClientConfig::new();
        for (k, v) in &props {
            client.set(k, v);
        }
        client
            .set("group.id", group.unwrap_or(READER_GROUP))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("allow.auto.create.topics", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest");
        let consumer = client
            .create::<BaseConsumer>()
            .map_err(|e| format!("Kafka cluster {name:?}: {e}"))?;
        Ok((name.to_owned(), consumer))
    }

    async fn reader(&mut self, cluster: Option<&str>) -> Result<Arc<BaseConsumer>, String> {
        if let Some(reader) = cluster.and_then(|c| self.readers.get(c)) {
            return Ok(reader.clone());
        }
        let (name, consumer) = self.consumer(cluster, None).await?;
        let reader = Arc::new(consumer);
        self.readers.insert(name, reader.clone());
        Ok(reader)
    }

    /// How many partitions the topic has.
    pub(super) async fn partition_count(
        &mut self,
        cluster: Option<&str>,
        topic: &str,
    ) -> Result<i32, CheckpointFailure> {
        let reader = self.reader(cluster).await.map_err(CheckpointFailure::new)?;
        let name = topic.to_owned();
        blocking(format!("topic {topic:?}"), move || {
            partition_count(&reader, &name)
        })
        .await
        .map_err(CheckpointFailure::new)
    }

    /// The end offset (high watermark) of every partition of the topic.
    pub(super) async fn end_offsets(
        &mut self,
        cluster: Option<&str>,
        topic: &str,
    ) -> Result<BTreeMap<i32, i64>, CheckpointFailure> {
        let reader = self.reader(cluster).await.map_err(CheckpointFailure::new)?;
        let name = topic.to_owned();
        blocking(format!("topic {topic:?}"), move || {
            let mut ends = BTreeMap::new();
            for partition in 0..partition_count(&reader, &name)? {
                ends.insert(partition, watermarks(&reader, &name, partition)?.1);
            }
            Ok(ends)
        })
        .await
        .map_err(CheckpointFailure::new)
    }

    /// Waits (bounded) until the stage's consumer group has consumed its input
    /// topic to the end; the stage before it must have stopped, so the end is final.
    pub(super) async fn wait_drained(
        &mut self,
        cluster: Option<&str>,
        stage: &PlanStage,
    ) -> Result<(), String> {
        let (_, consumer) = self.consumer(cluster, Some(&stage.consumer_group)).await?;
        let consumer = Arc::new(consumer);
        let topic = stage.input.topic.clone();
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        loop {
            let (reader, name) = (consumer.clone(), topic.clone());
            let pending = blocking(format!("topic {topic:?}"), move || {
                undrained(&reader, &name)
            })
            .await?;
            if pending.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let detail: Vec<String> = pending
                    .iter()
                    .map(|(p, next, end)| format!("partition {p} at {next} of {end}"))
                    .collect();
                return Err(format!(
                    "consumer group {} did not consume {topic:?} to the end within {DRAIN_TIMEOUT:?}: {}",
                    stage.consumer_group,
                    detail.join(", ")
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
