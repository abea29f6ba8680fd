//! The stage's producer, and what its delivery reports tell the commit.
//!
//! Every record is tagged with the commit epoch it was sent in. Under
//! at-least-once the loop seals an epoch at each commit interval, keeps
//! consuming, and commits the offsets of that moment once every record of that
//! epoch and the ones before it is acknowledged, instead of flushing the
//! producer: a flush stops intake for a broker round trip per interval, which is
//! what sets the tail latency at a steady rate.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext};

use crate::kafka::{TransportError, failed};

/// A commit epoch: the records sent between two seals.
pub type Epoch = usize;

/// Records sent but not acknowledged yet, per epoch. An epoch's count goes
/// negative while it is open (acknowledgements arrive before it is sealed with
/// the number sent) and is dropped when it reaches zero after sealing.
#[derive(Debug, Default)]
struct Unacked {
    by_epoch: BTreeMap<Epoch, i64>,
}

impl Unacked {
    fn sealed(&mut self, epoch: Epoch, sent: i64) {
        self.add(epoch, sent);
    }

    fn acknowledged(&mut self, epoch: Epoch) {
        self.add(epoch, -1);
    }

    fn add(&mut self, epoch: Epoch, delta: i64) {
        let count = self.by_epoch.entry(epoch).or_insert(0);
        *count += delta;
        if *count == 0 {
            self.by_epoch.remove(&epoch);
        }
    }

    /// Every record of `epoch` and of the epochs before it is acknowledged.
    /// Open epochs are always later than sealed ones, so a negative count never
    /// hides an outstanding record here.
    fn settled_through(&self, epoch: Epoch) -> bool {
        self.by_epoch.range(..=epoch).next().is_none()
    }
}

/// Delivery reports: failures (at-least-once must not commit past them), the
/// last offset written per topic partition (checkpoint positions) and the
/// records still in flight per epoch. One lock, taken once per report on the
/// producer's thread.
#[derive(Default)]
pub struct Deliveries(Mutex<Reports>);

#[derive(Default)]
struct Reports {
    failures: Vec<String>,
    /// Last acknowledged offset, by topic, then partition (looked up by `&str`,
    /// so that a report allocates nothing once its topic is known).
    last_offsets: HashMap<String, HashMap<i32, i64>>,
    /// The same, per epoch not folded into `settled_offsets` yet: the position a
    /// settled epoch's commit carries must not include a later epoch's records.
    epoch_offsets: BTreeMap<Epoch, HashMap<String, HashMap<i32, i64>>>,
    /// Last acknowledged offset of the epochs settled so far.
    settled_offsets: HashMap<String, HashMap<i32, i64>>,
    unacked: Unacked,
}

/// Raises `topic`/`partition`'s last offset to `offset`, allocating the topic's
/// name only the first time it is seen.
fn record_offset(
    offsets: &mut HashMap<String, HashMap<i32, i64>>,
    topic: &str,
    partition: i32,
    offset: i64,
) {
    let partitions = match offsets.get_mut(topic) {
        Some(partitions) => partitions,
        None => offsets.entry(topic.to_owned()).or_default(),
    };
    let last = partitions.entry(partition).or_insert(-1);
    *last = (*last).max(offset);
}

fn next_after(
    offsets: &HashMap<String, HashMap<i32, i64>>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    offsets
        .get(topic)
        .and_then(|partitions| partitions.get(&partition))
        .map(|last| last + 1)
}

impl Deliveries {
    fn reports(&self) -> std::sync::MutexGuard<'_, Reports> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Failures reported since the last call.
    pub fn take_failures(&self) -> Vec<String> {
        std::mem::take(&mut self.reports().failures)
    }

    /// The offset after the last record acknowledged on a partition, if any.
    pub fn next_position(&self, topic: &str, partition: i32) -> Option<i64> {
        next_after(&self.reports().last_offsets, topic, partition)
    }

    /// Takes the acknowledged offsets of every epoch up to `through` (all of them
    /// when `None`, after a flush) into the settled positions.
    pub fn settle_positions(&self, through: Option<Epoch>) {
        let reports = &mut *self.reports();
        let later = match through {
            Some(epoch) => reports.epoch_offsets.split_off(&(epoch + 1)),
            None => BTreeMap::new(),
        };
        let settled = std::mem::replace(&mut reports.epoch_offsets, later);
        for offsets in settled.into_values() {
            for (topic, partitions) in offsets {
                for (partition, offset) in partitions {
                    record_offset(&mut reports.settled_offsets, &topic, partition, offset);
                }
            }
        }
    }

    /// The offset after the last record of a settled epoch on a partition, if any.
    pub fn settled_position(&self, topic: &str, partition: i32) -> Option<i64> {
        next_after(&self.reports().settled_offsets, topic, partition)
    }
}

pub struct ProducerCtx {
    deliveries: Arc<Deliveries>,
}

impl ClientContext for ProducerCtx {}

impl ProducerContext for ProducerCtx {
    type DeliveryOpaque = Epoch;

    fn delivery(&self, result: &DeliveryResult<'_>, epoch: Epoch) {
        let mut reports = self.deliveries.reports();
        match result {
            Ok(message) => {
                let (topic, partition, offset) =
                    (message.topic(), message.partition(), message.offset());
                record_offset(&mut reports.last_offsets, topic, partition, offset);
                let epoch_offsets = reports.epoch_offsets.entry(epoch).or_default();
                record_offset(epoch_offsets, topic, partition, offset);
            }
            Err((error, message)) => reports.failures.push(format!(
                "{}[{}]: {error}",
                message.topic(),
                message.partition()
            )),
        }
        // A failed record is settled too: the failure itself blocks the commit.
        reports.unacked.acknowledged(epoch);
    }
}

/// The producer with its epoch bookkeeping. Shared (`Arc`) by the host, which
/// writes changelogs, dead letters and repartition records and seals epochs, and
/// the Kafka sinks; all of them on the stage's one engine thread, so the
/// counters need no ordering beyond their own.
pub struct Outbox {
    pub producer: ThreadedProducer<ProducerCtx>,
    pub deliveries: Arc<Deliveries>,
    epoch: AtomicUsize,
    sent_in_epoch: AtomicI64,
    /// Records sent since the producer was created.
    sent_total: AtomicU64,
}

impl Outbox {
    pub fn create(config: &ClientConfig) -> Result<Self, TransportError> {
        let deliveries = Arc::new(Deliveries::default());
        let producer = config
            .create_with_context(ProducerCtx {
                deliveries: deliveries.clone(),
            })
            .map_err(failed("creating the producer"))?;
        Ok(Self {
            producer,
            deliveries,
            epoch: AtomicUsize::new(0),
            sent_in_epoch: AtomicI64::new(0),
            sent_total: AtomicU64::new(0),
        })
    }

    /// Produces one record in the current epoch, waiting while the local queue is full.
    pub fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        partition: Option<i32>,
        headers: Option<OwnedHeaders>,
    ) -> Result<(), TransportError> {
        let mut record: BaseRecord<'_, [u8], [u8], Epoch> =
            BaseRecord::with_opaque_to(topic, self.epoch.load(Ordering::Relaxed));
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(value) = value {
            record = record.payload(value);
        }
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => {
                    self.sent_in_epoch.fetch_add(1, Ordering::Relaxed);
                    self.sent_total.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The producer's thread drains the queue; wait for room.
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((source, _)) => return Err(failed("producing a record")(source)),
            }
        }
    }

    /// Records sent since the producer was created.
    pub fn sent_total(&self) -> u64 {
        self.sent_total.load(Ordering::Relaxed)
    }

    /// Closes the current epoch and returns it; later records belong to the next.
    pub fn seal(&self) -> Epoch {
        let sealed = self.epoch.fetch_add(1, Ordering::Relaxed);
        let sent = self.sent_in_epoch.swap(0, Ordering::Relaxed);
        self.deliveries.reports().unacked.sealed(sealed, sent);
        sealed
    }

    /// Whether every record sent up to the end of `epoch` is acknowledged.
    pub fn settled_through(&self, epoch: Epoch) -> bool {
        self.deliveries.reports().unacked.settled_through(epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_settles_when_it_and_every_earlier_epoch_is_acknowledged() {
        let mut unacked = Unacked::default();
        // Epoch 0: three records, one acknowledged before the seal.
        unacked.acknowledged(0);
        unacked.sealed(0, 3);
        // Epoch 1: one record, acknowledged at once; epoch 2 is open.
        unacked.acknowledged(1);
        unacked.sealed(1, 1);
        unacked.acknowledged(2);
        assert!(!unacked.settled_through(0));
        assert!(!unacked.settled_through(1), "epoch 0 still holds records");
        unacked.acknowledged(0);
        unacked.acknowledged(0);
        assert!(unacked.settled_through(0));
        assert!(unacked.settled_through(1));
        // The open epoch's early acknowledgement does not count as settled work.
        unacked.sealed(2, 2);
        assert!(!unacked.settled_through(2));
        unacked.acknowledged(2);
        assert!(unacked.settled_through(2));
    }

    #[test]
    fn settled_positions_take_no_later_epoch() {
        let deliveries = Deliveries::default();
        {
            let reports = &mut *deliveries.reports();
            for (epoch, offset) in [(0, 10), (0, 11), (1, 12), (2, 13)] {
                let offsets = reports.epoch_offsets.entry(epoch).or_default();
                record_offset(offsets, "log", 0, offset);
            }
            record_offset(reports.epoch_offsets.entry(1).or_default(), "log", 1, 4);
        }
        assert_eq!(deliveries.settled_position("log", 0), None);
        deliveries.settle_positions(Some(0));
        assert_eq!(deliveries.settled_position("log", 0), Some(12));
        assert_eq!(deliveries.settled_position("log", 1), None);
        deliveries.settle_positions(Some(1));
        assert_eq!(deliveries.settled_position("log", 0), Some(13));
        assert_eq!(deliveries.settled_position("log", 1), Some(5));
        deliveries.settle_positions(None);
        assert_eq!(deliveries.settled_position("log", 0), Some(14));
        assert!(deliveries.reports().epoch_offsets.is_empty());
    }

    #[test]
    fn an_empty_epoch_is_settled_at_once() {
        let mut unacked = Unacked::default();
        unacked.sealed(0, 0);
        assert!(unacked.settled_through(0));
        assert!(unacked.by_epoch.is_empty());
    }
}
