//! Reading a changelog or table topic's partitions to their end, to restore state.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::kafka::ServeError;

/// One record as read: key and value (`None` value is a tombstone).
pub type RawRecord = (Option<Vec<u8>>, Option<Vec<u8>>);

/// How long a restore may take before the instance gives up (and restarts).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(600);

/// Reads `partitions` of `topic` from the beginning to their current end
/// (committed data only), in offset order per partition.
pub fn read_to_end(config: &ClientConfig, topic: &str, partitions: &[i32]) -> Result<Vec<RawRecord>, ServeError> {
    let consumer: BaseConsumer = config.create().map_err(|source| ServeError::Kafka {
        what: "creating the restore reader",
        source,
    })?;
    let mut remaining = BTreeSet::new();
    let mut tpl = TopicPartitionList::new();
    for &partition in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(30))
            .map_err(|source| ServeError::Kafka {
                what: "reading the end of a changelog partition",
                source,
            })?;
        // An empty (or fully compacted-away) partition has nothing to restore.
        if high > low {
            remaining.insert(partition);
            tpl.add_partition_offset(topic, partition, Offset::Beginning)
                .map_err(|source| ServeError::Kafka {
                    what: "assigning a changelog partition",
                    source,
                })?;
        }
    }
    let mut records = Vec::new();
    if remaining.is_empty() {
        return Ok(records);
    }
    consumer.assign(&tpl).map_err(|source| ServeError::Kafka {
        what: "assigning changelog partitions",
        source,
    })?;
    let started = Instant::now();
    while !remaining.is_empty() {
        if started.elapsed() > RESTORE_TIMEOUT {
            return Err(ServeError::RestoreTimeout {
                topic: topic.to_owned(),
                partitions: remaining.into_iter().collect(),
            });
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => records.push((
                message.key().map(<[u8]>::to_vec),
                message.payload().map(<[u8]>::to_vec),
            )),
            // With enable.partition.eof, reaching the end (the last stable offset
            // under read_committed) is reported per partition.
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                remaining.remove(&partition);
            }
            Some(Err(error)) => {
                tracing::warn!(%error, topic, "error while restoring; retrying");
            }
            None => {}
        }
    }
    Ok(records)
}

/// All partitions of a topic, for replicated tables.
pub fn partitions_of(config: &ClientConfig, topic: &str) -> Result<Vec<i32>, ServeError> {
    let consumer: BaseConsumer = config.create().map_err(|source| ServeError::Kafka {
        what: "creating a metadata reader",
        source,
    })?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .map_err(|source| ServeError::Kafka {
            what: "reading topic metadata",
            source,
        })?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(ServeError::MissingTopic(topic.to_owned()));
    }
    Ok(partitions)
}
