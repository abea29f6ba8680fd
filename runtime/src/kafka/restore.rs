//! Reading a changelog or table topic's partitions to their end, to restore state.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::kafka::ServeError;

/// One record as read: key and value (`None` value is a tombstone).
pub type RawRecord = (Option<Vec<u8>>, Option<Vec<u8>>);

/// How long a restore may take before the instance gives up (and restarts).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(600);

/// Reads every given topic partition from the beginning to its current end
/// (committed data only), in offset order per partition, with one reader.
pub fn read_to_end(
    config: &ClientConfig,
    partitions: &BTreeSet<(String, i32)>,
) -> Result<Restored, ServeError> {
    let consumer: BaseConsumer<QuietEof> =
        config
            .create_with_context(QuietEof)
            .map_err(|source| ServeError::Kafka {
                what: "creating the restore reader",
                source,
            })?;
    let mut records: BTreeMap<(String, i32), Vec<RawRecord>> = BTreeMap::new();
    // The end of each partition when the restore starts. Nothing else writes a
    // partition being restored: its previous owner was fenced or is dead, and an
    // open transaction of a dead owner holds the reader back (read_committed)
    // until the broker aborts it.
    let mut ends: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let mut read_up_to = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in partitions {
        records.insert((topic.clone(), *partition), Vec::new());
        let (low, high) = consumer
            .fetch_watermarks(topic, *partition, Duration::from_secs(30))
            .map_err(|source| ServeError::Kafka {
                what: "reading the end of a changelog partition",
                source,
            })?;
        read_up_to.insert((topic.clone(), *partition), high);
        // An empty (or fully compacted-away) partition has nothing to restore.
        if high > low {
            ends.insert((topic.clone(), *partition), high);
            tpl.add_partition_offset(topic, *partition, Offset::Beginning)
                .map_err(|source| ServeError::Kafka {
                    what: "assigning a changelog partition",
                    source,
                })?;
        }
    }
    if ends.is_empty() {
        return Ok(Restored {
            records,
            read_up_to,
        });
    }
    consumer.assign(&tpl).map_err(|source| ServeError::Kafka {
        what: "assigning changelog partitions",
        source,
    })?;
    let started = Instant::now();
    while !ends.is_empty() {
        if started.elapsed() > RESTORE_TIMEOUT {
            return Err(ServeError::RestoreTimeout {
                partitions: ends.into_keys().collect(),
            });
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => records
                .entry((message.topic().to_owned(), message.partition()))
                .or_default()
                .push((
                    message.key().map(<[u8]>::to_vec),
                    message.payload().map(<[u8]>::to_vec),
                )),
            // End-of-partition events are not relied on (librdkafka sometimes
            // reports them on the main queue without the partition); the
            // position check below decides.
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(error)) => tracing::warn!(%error, "error while restoring; retrying"),
            None => {}
        }
        // The position moves past transaction markers, so a partition is read
        // to its end exactly when the position reaches the end seen at the start.
        if let Ok(positions) = consumer.position() {
            ends.retain(|(topic, partition), end| {
                !matches!(
                    positions.find_partition(topic, *partition).map(|e| e.offset()),
                    Some(Offset::Offset(next)) if next >= *end
                )
            });
        }
    }
    Ok(Restored {
        records,
        read_up_to,
    })
}

/// What a restore read: the records per partition, and where each partition's
/// reading stopped (where a reader of later changes goes on).
pub struct Restored {
    pub records: BTreeMap<(String, i32), Vec<RawRecord>>,
    pub read_up_to: BTreeMap<(String, i32), i64>,
}

/// A client context that does not log end-of-partition events as errors: for
/// the restore reader they are the expected way to finish.
struct QuietEof;

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(error, KafkaError::PartitionEOF(_))
            || matches!(&error, KafkaError::Global(code) if *code == rdkafka::types::RDKafkaErrorCode::PartitionEOF);
        if !eof {
            tracing::error!(%error, reason, "restore reader error");
        }
    }
}

impl ConsumerContext for QuietEof {}

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
