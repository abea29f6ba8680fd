//! The checkpoint protocol of a stage instance: commit at a barrier and report
//! the positions (`POST /checkpoint`), stop and resume processing, and the hold
//! a backpressured sink puts on intake.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use keystone_crds::checkpoint::InstanceCheckpoint;
use rdkafka::Offset;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::host::ServeError;
use crate::host::process::Core;
use crate::host::rebalance::ConsumerCtx;
use crate::kafka::KAFKA_TIMEOUT;

impl Core {
    /// Commits at a barrier and reports, for every assigned partition, the next
    /// input offset and the changelog positions committed with it. Partitions not
    /// processed since their assignment are committed at their start (resolved to
    /// an offset when the group has none), so the group's offsets are the checkpoint.
    pub(super) fn checkpoint(
        &mut self,
        consumer: &BaseConsumer<ConsumerCtx>,
        stop: bool,
    ) -> Result<InstanceCheckpoint, ServeError> {
        let topic = self.stage.input.topic.clone();
        let assigned: Vec<i32> = consumer
            .assignment()
            .map_err(|source| ServeError::Kafka {
                what: "reading the assignment",
                source,
            })?
            .elements_for_topic(&topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let unprocessed: Vec<i32> = assigned
            .iter()
            .filter(|p| !self.positions.contains_key(p))
            .copied()
            .collect();
        if !unprocessed.is_empty() {
            let committed = self.committed_in_group(consumer, &unprocessed)?;
            for partition in unprocessed {
                let offset = committed.get(&partition).and_then(|c| c.0);
                let start = self.start_of(consumer, partition, offset)?;
                self.positions.insert(partition, start);
            }
            self.begin_if_needed()?;
        }
        self.commit(consumer, "checkpoint")?;
        if stop {
            self.stop(consumer)?;
        }
        let source_offsets = assigned
            .iter()
            .filter_map(|p| self.committed.get(p).map(|o| (*p, *o)))
            .collect();
        let changelog_topics: BTreeSet<&str> = self
            .state_sources
            .iter()
            .filter(|s| s.table.is_none())
            .map(|s| s.topic.as_str())
            .collect();
        let mut changelog_positions: keystone_crds::checkpoint::Positions = BTreeMap::new();
        for topic in changelog_topics {
            for &partition in &assigned {
                let key = (topic.to_owned(), partition);
                // Written since the restore: after the last write; else where the
                // restore read up to.
                let written = self.outbox.deliveries.next_position(topic, partition);
                if let Some(position) = self.changelog_ends.get(&key).copied().max(written) {
                    changelog_positions
                        .entry(topic.to_owned())
                        .or_default()
                        .insert(partition, position);
                }
            }
        }
        Ok(InstanceCheckpoint {
            pipeline: self.plan.pipeline.clone(),
            stage: self.stage.name.clone(),
            instance: self.instance_id.clone(),
            plan_hash: self.plan_hash.clone(),
            input_topic: topic,
            source_offsets,
            changelog_positions,
            stopped: self.stopped,
        })
    }

    /// Stops processing: every assigned partition is paused (and those assigned
    /// later, in `rebalance`); polling goes on, so the group membership stays.
    pub(super) fn stop(&mut self, consumer: &BaseConsumer<ConsumerCtx>) -> Result<(), ServeError> {
        let assignment = consumer.assignment().map_err(|source| ServeError::Kafka {
            what: "reading the assignment",
            source,
        })?;
        consumer
            .pause(&assignment)
            .map_err(|source| ServeError::Kafka {
                what: "pausing the input partitions",
                source,
            })?;
        if !self.stopped {
            tracing::info!(
                partitions = assignment.count(),
                "stopped after a checkpoint"
            );
        }
        self.set_stopped(true);
        Ok(())
    }

    /// Undoes a stop: resumes every partition from its committed offset (records
    /// fetched while paused were dropped).
    pub(super) fn resume(
        &mut self,
        consumer: &BaseConsumer<ConsumerCtx>,
    ) -> Result<(), ServeError> {
        if !self.stopped {
            return Ok(());
        }
        let assignment = consumer.assignment().map_err(|source| ServeError::Kafka {
            what: "reading the assignment",
            source,
        })?;
        consumer
            .resume(&assignment)
            .map_err(|source| ServeError::Kafka {
                what: "resuming the input partitions",
                source,
            })?;
        self.set_stopped(false);
        // As after an assignment: timers wait until a partition has read what
        // arrived while stopped, or the stop would count as waiting time and
        // release held-back events ahead of predecessors read next.
        self.live.clear();
        for (&partition, &offset) in &self.committed {
            consumer
                .seek(
                    &self.stage.input.topic,
                    partition,
                    Offset::Offset(offset),
                    KAFKA_TIMEOUT,
                )
                .map_err(|source| ServeError::Kafka {
                    what: "seeking to the committed offset after a stop",
                    source,
                })?;
        }
        tracing::info!(partitions = assignment.count(), "resumed");
        Ok(())
    }

    pub(super) fn set_stopped(&mut self, stopped: bool) {
        self.stopped = stopped;
        self.shared.stopped.store(stopped, Ordering::SeqCst);
        self.shared
            .metrics
            .lock()
            .map(|m| m.stopped.set(i64::from(stopped)))
            .ok();
    }

    /// Pauses intake while the sinks ask for it (backpressure, or writes not
    /// yet durable) or the held-back events are past the instance's limit, and
    /// resumes it after. Unlike a stop, records already polled are processed,
    /// and a resumed partition goes on from the next record polled: librdkafka
    /// drops what it fetched while paused and fetches it again.
    pub(super) fn hold_intake(&mut self, consumer: &BaseConsumer<ConsumerCtx>) {
        let for_sinks = self.sinks_hold_intake();
        let buffered: u64 = self
            .tasks
            .values()
            .map(crate::StageTask::buffered_bytes)
            .sum();
        let was_full = self.buffers.is_full();
        let for_buffers = self.buffers.update(buffered);
        self.shared
            .metrics
            .lock()
            .map(|m| {
                m.buffered_bytes
                    .set(i64::try_from(buffered).unwrap_or(i64::MAX));
                m.buffer_held.set(i64::from(for_buffers));
            })
            .ok();
        let hold = for_sinks || for_buffers;
        if !hold && !self.held && !was_full {
            return;
        }
        let Ok(assignment) = consumer.assignment() else {
            return;
        };
        if hold {
            // Again every turn: partitions assigned since are paused too.
            if let Err(error) = consumer.pause(&assignment) {
                tracing::warn!(%error, "pausing intake failed");
                return;
            }
            if for_sinks && !self.held {
                tracing::info!("a sink is behind: intake paused until it catches up");
            }
            if for_buffers && !was_full {
                tracing::info!(
                    buffered,
                    limit = self.buffers.limit(),
                    "held-back events reached the limit: intake paused until timers release enough"
                );
            }
        } else if !self.stopped {
            if let Err(error) = consumer.resume(&assignment) {
                tracing::warn!(%error, "resuming intake failed");
                return;
            }
            if self.held {
                // As after a stop: timers wait until a partition has read what
                // arrived while intake was held for the sinks, or the hold would
                // count as waiting time (found by benchmark S9: the order step
                // released events past gaps whose predecessors were still
                // unread, then dropped those late). A hold for the buffers lets
                // timers run: they are what makes room.
                self.live.clear();
            }
            tracing::info!("intake resumed");
        }
        self.held = for_sinks;
        self.shared
            .metrics
            .lock()
            .map(|m| m.sink_held.set(i64::from(for_sinks)))
            .ok();
    }
}
