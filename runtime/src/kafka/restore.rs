//! Reading a changelog or table topic's partitions to their end, to restore state,
//! and bringing a changelog partition back to an earlier position (`--restore`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::kafka::TransportError;
use crate::state::StateChange;

/// One record as read: key and value (`None` value is a tombstone).
pub type RawRecord = (Option<Vec<u8>>, Option<Vec<u8>>);

/// A record with its offset.
pub type LoggedRecord = (i64, RawRecord);

/// How long a restore may take before the instance gives up (and restarts).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(600);

/// Reads every given topic partition from the beginning to its current end
/// (committed data only), in offset order per partition, with one reader.
pub fn read_to_end(
    config: &ClientConfig,
    partitions: &BTreeSet<(String, i32)>,
) -> Result<Restored, TransportError> {
    let mut records: BTreeMap<(String, i32), Vec<LoggedRecord>> = partitions
        .iter()
        .map(|key| (key.clone(), Vec::new()))
        .collect();
    let starts = partitions.iter().map(|key| (key.clone(), 0)).collect();
    let read_up_to = scan(config, &starts, |message| {
        records
            .entry((message.topic().to_owned(), message.partition()))
            .or_default()
            .push((
                message.offset(),
                (
                    message.key().map(<[u8]>::to_vec),
                    message.payload().map(<[u8]>::to_vec),
                ),
            ));
    })?;
    Ok(Restored {
        records,
        read_up_to,
    })
}

/// Reads each topic partition from its start offset (or its beginning, if that
/// is later) to its end as found now, committed data only, handing every record
/// to `on_record` in offset order per partition. Returns the ends read up to.
pub fn scan(
    config: &ClientConfig,
    starts: &BTreeMap<(String, i32), i64>,
    mut on_record: impl FnMut(&BorrowedMessage<'_>),
) -> Result<BTreeMap<(String, i32), i64>, TransportError> {
    let consumer: BaseConsumer<QuietEof> =
        config
            .create_with_context(QuietEof)
            .map_err(|source| TransportError::Kafka {
                what: "creating the restore reader",
                source,
            })?;
    // The end of each partition when the reading starts. Nothing else writes a
    // changelog partition being restored: its previous owner was fenced or is
    // dead, and an open transaction of a dead owner holds the reader back
    // (read_committed) until the broker aborts it.
    let mut ends: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let mut read_up_to = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), start) in starts {
        let (low, high) = consumer
            .fetch_watermarks(topic, *partition, Duration::from_secs(30))
            .map_err(|source| TransportError::Kafka {
                what: "reading the bounds of a partition to read",
                source,
            })?;
        read_up_to.insert((topic.clone(), *partition), high);
        let start = (*start).max(low);
        // An empty (or fully compacted-away) partition has nothing to read.
        if high > start {
            ends.insert((topic.clone(), *partition), high);
            tpl.add_partition_offset(topic, *partition, Offset::Offset(start))
                .map_err(|source| TransportError::Kafka {
                    what: "assigning a partition to read",
                    source,
                })?;
        }
    }
    if ends.is_empty() {
        return Ok(read_up_to);
    }
    consumer
        .assign(&tpl)
        .map_err(|source| TransportError::Kafka {
            what: "assigning partitions to read",
            source,
        })?;
    let started = Instant::now();
    while !ends.is_empty() {
        if started.elapsed() > RESTORE_TIMEOUT {
            return Err(TransportError::RestoreTimeout {
                partitions: ends.into_keys().collect(),
            });
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => on_record(&message),
            // End-of-partition events are not relied on (librdkafka sometimes
            // reports them on the main queue without the partition); the
            // position check below decides.
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(error)) => tracing::warn!(%error, "error while reading to the end; retrying"),
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
    Ok(read_up_to)
}

/// What a restore read: the records per partition, and where each partition's
/// reading stopped (where a reader of later changes goes on).
pub struct Restored {
    pub records: BTreeMap<(String, i32), Vec<LoggedRecord>>,
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
pub fn partitions_of(config: &ClientConfig, topic: &str) -> Result<Vec<i32>, TransportError> {
    let consumer: BaseConsumer = config.create().map_err(|source| TransportError::Kafka {
        what: "creating a metadata reader",
        source,
    })?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .map_err(|source| TransportError::Kafka {
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
        return Err(TransportError::MissingTopic(topic.to_owned()));
    }
    Ok(partitions)
}

/// Where a restore takes a changelog partition's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rewind {
    /// The state as of this offset: records before it count, later ones are undone.
    To(i64),
    /// No state at all.
    Empty,
}

/// A changelog partition brought back to an earlier state.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rewound {
    /// The changes that rebuild the task's state, in changelog order.
    pub state: Vec<StateChange>,
    /// Records to append to the changelog so that its latest value per key is the
    /// state again: the value at the position, or a tombstone. Sorted by key.
    pub compensations: Vec<StateChange>,
}

/// Splits a changelog partition's records (in offset order) at `to`. Keys whose
/// latest value already equals their value at the position need no compensation.
pub fn rewind(records: &[LoggedRecord], to: Rewind) -> Rewound {
    let position = match to {
        Rewind::To(position) => position,
        Rewind::Empty => i64::MIN,
    };
    let mut at_position: HashMap<&[u8], Option<&[u8]>> = HashMap::new();
    let mut latest: BTreeMap<&[u8], Option<&[u8]>> = BTreeMap::new();
    let mut changed_after: BTreeSet<&[u8]> = BTreeSet::new();
    let mut state = Vec::new();
    for (offset, (key, value)) in records {
        let Some(key) = key.as_deref() else { continue };
        latest.insert(key, value.as_deref());
        if *offset < position {
            at_position.insert(key, value.as_deref());
            state.push(StateChange {
                key: key.to_vec(),
                value: value.clone(),
            });
        } else {
            changed_after.insert(key);
        }
    }
    let compensations = match to {
        Rewind::To(_) => changed_after
            .into_iter()
            .filter_map(|key| {
                let then = at_position.get(key).copied().flatten();
                (latest.get(key).copied().flatten() != then).then(|| StateChange {
                    key: key.to_vec(),
                    value: then.map(<[u8]>::to_vec),
                })
            })
            .collect(),
        // Every key that still has a value gets a tombstone.
        Rewind::Empty => latest
            .into_iter()
            .filter(|(_, value)| value.is_some())
            .map(|(key, _)| StateChange::delete(key.to_vec()))
            .collect(),
    };
    Rewound {
        state,
        compensations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: i64, key: &str, value: Option<&str>) -> LoggedRecord {
        (
            offset,
            (
                Some(key.as_bytes().to_vec()),
                value.map(|v| v.as_bytes().to_vec()),
            ),
        )
    }

    fn change(key: &str, value: Option<&str>) -> StateChange {
        StateChange {
            key: key.as_bytes().to_vec(),
            value: value.map(|v| v.as_bytes().to_vec()),
        }
    }

    #[test]
    fn rewinding_keeps_earlier_changes_and_undoes_later_ones() {
        let records = [
            record(0, "a", Some("a1")),
            record(1, "b", Some("b1")),
            record(2, "c", Some("c1")),
            record(3, "c", None),
            // The position: 4. Later: a changes, b is deleted, d appears, c comes
            // back, e appears and goes again, and a goes back to a1.
            record(4, "a", Some("a2")),
            record(5, "b", None),
            record(6, "d", Some("d1")),
            record(7, "c", Some("c2")),
            record(8, "e", Some("e1")),
            record(9, "e", None),
            record(10, "a", Some("a1")),
        ];
        let rewound = rewind(&records, Rewind::To(4));
        assert_eq!(
            rewound.state,
            [
                change("a", Some("a1")),
                change("b", Some("b1")),
                change("c", Some("c1")),
                change("c", None),
            ]
        );
        assert_eq!(
            rewound.compensations,
            [
                change("b", Some("b1")),
                change("c", None),
                change("d", None),
            ],
            "a and e already have their value at the position"
        );
    }

    #[test]
    fn rewinding_to_the_end_changes_nothing() {
        let records = [record(0, "a", Some("1")), record(1, "b", Some("2"))];
        let rewound = rewind(&records, Rewind::To(2));
        assert_eq!(rewound.state.len(), 2);
        assert!(rewound.compensations.is_empty());
        // Compacted away or never written: nothing before the position.
        let rewound = rewind(&records, Rewind::To(0));
        assert!(rewound.state.is_empty());
        assert_eq!(
            rewound.compensations,
            [change("a", None), change("b", None)]
        );
    }

    #[test]
    fn emptying_tombstones_every_live_key() {
        let records = [
            record(0, "a", Some("1")),
            record(1, "b", Some("2")),
            record(2, "b", None),
            (3, (None, Some(b"keyless".to_vec()))),
        ];
        let rewound = rewind(&records, Rewind::Empty);
        assert!(rewound.state.is_empty());
        assert_eq!(rewound.compensations, [change("a", None)]);
    }
}
