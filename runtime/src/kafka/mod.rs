//! The Kafka transport of a stage: client settings, the producer with its
//! delivery bookkeeping, reading and rewinding changelogs, the metadata carried
//! in offset commits, and the record headers that name an event's source.
//!
//! Nothing here knows about the stage host (`crate::host`): the host drives
//! these pieces, and the Kafka sink (`crate::connectors::kafka`) writes through
//! the same producer.

pub mod config;
pub mod metadata;
pub mod outbox;
pub mod records;
pub mod restore;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::metadata::CommitMetadata;

/// How long blocking Kafka calls (commits, transactions, look-ups) may take.
pub const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the brokers are and how every client of one instance connects.
#[derive(Clone, Debug)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    /// The instance's stable identity: client id, static group membership.
    pub instance_id: String,
    /// Extra librdkafka settings (TLS, SASL, ...), applied to every client last.
    pub extra: Vec<(String, String)>,
}

/// A failure of the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{what}: {source}")]
    Kafka {
        what: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("topic {0:?} does not exist")]
    MissingTopic(String),
    #[error("restoring changelog partitions {partitions:?} did not finish in time")]
    RestoreTimeout { partitions: Vec<(String, i32)> },
}

/// Wraps a librdkafka error with what was being done.
pub fn failed(what: &'static str) -> impl FnOnce(KafkaError) -> TransportError {
    move |source| TransportError::Kafka { what, source }
}

/// A group's committed offset (if any) and its metadata, per partition of `topic`.
pub fn committed_in_group<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partitions: &[i32],
) -> Result<BTreeMap<i32, (Option<i64>, CommitMetadata)>, TransportError> {
    let mut tpl = TopicPartitionList::new();
    for &partition in partitions {
        tpl.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(tpl, KAFKA_TIMEOUT)
        .map_err(failed("reading the group's committed offsets"))?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            (e.partition(), (offset, CommitMetadata::parse(e.metadata())))
        })
        .collect())
}
