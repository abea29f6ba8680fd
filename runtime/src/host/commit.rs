//! Commits: under exactly-once one Kafka transaction per interval carries the
//! outputs, changelog writes and consumed offsets; under at-least-once each
//! interval's offsets are committed once its records are acknowledged. Either
//! way the sinks are prepared first (their writes durable or staged), and
//! published after. A failed commit goes back to the last one (`rewind`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};

use crate::connectors::{Prepared, SinkOutput};
use crate::host::ServeError;
use crate::host::process::{Core, Route};
use crate::host::rebalance::ConsumerCtx;
use crate::kafka::KAFKA_TIMEOUT;
use crate::kafka::metadata::CommitMetadata;
use crate::kafka::outbox::Epoch;

/// Retries of a retriable commit failure, with doubling backoff from 100 ms.
pub(super) const COMMIT_RETRIES: u32 = 6;
/// How long an interval commit waits for the sinks before it lets the loop go
/// on (intake held) and asks again.
const SINK_INTERVAL_WAIT: Duration = Duration::from_secs(1);
/// How long a commit that must happen now (checkpoint, rebalance, shutdown)
/// waits for the sinks, at most.
const SINK_FLUSH_WAIT: Duration = Duration::from_secs(30);
/// How long an abort that fails on retriable errors is tried again.
const ABORT_PATIENCE: Duration = Duration::from_secs(120);
/// The share of the transaction timeout after which an open transaction is
/// given up while the sinks are not prepared: the broker would abort it at the
/// timeout and fence this producer, which is fatal.
const TRANSACTION_PATIENCE_PERCENT: u32 = 60;

/// At-least-once: an epoch sealed at an interval commit, with the positions to
/// commit once its records are acknowledged.
pub(super) struct SealedEpoch {
    pub(super) epoch: Epoch,
    pub(super) positions: BTreeMap<i32, i64>,
    pub(super) sealed_at: Instant,
}

impl Core {
    pub(super) fn begin_if_needed(&mut self) -> Result<(), ServeError> {
        if self.exactly_once && !self.in_transaction {
            self.outbox
                .producer
                .begin_transaction()
                .map_err(|source| ServeError::Kafka {
                    what: "beginning a transaction",
                    source,
                })?;
            self.in_transaction = true;
            self.transaction_began = Some((Instant::now(), self.outbox.sent_total()));
        }
        Ok(())
    }

    /// How long the open transaction may still wait for the sinks: up to the
    /// patience share of the transaction timeout (at least a moment, so that a
    /// healthy sink always gets its round trip). Unbounded by it without one.
    fn transaction_patience(&self) -> Option<Duration> {
        let (began, _) = self.transaction_began?;
        let patience = self.transaction_timeout * TRANSACTION_PATIENCE_PERCENT / 100;
        Some(
            patience
                .saturating_sub(began.elapsed())
                .max(Duration::from_millis(500)),
        )
    }

    /// Whether the open transaction holds records (the broker knows it, and
    /// will time it out) and has waited for the sinks as long as it may.
    fn transaction_out_of_patience(&self) -> bool {
        self.transaction_began.is_some_and(|(began, sent)| {
            self.outbox.sent_total() > sent
                && began.elapsed() >= self.transaction_timeout * TRANSACTION_PATIENCE_PERCENT / 100
        })
    }

    /// Whether to commit before the interval is out because the input has
    /// nothing more to read (the loop's last poll came back empty): under
    /// exactly-once the outputs stay invisible to `read_committed` readers until
    /// their transaction commits. Only with something new to commit, never
    /// while intake is stopped or held (the input is not read, so not caught
    /// up), and not with a two-phase sink, whose every commit publishes data
    /// files: a quiet input would fill the lake with small ones.
    pub(super) fn commits_when_caught_up(&self) -> bool {
        self.exactly_once
            && self.transaction_has_news()
            && !self.stopped
            && !self.held
            && !self.buffers.is_full()
            && !self.writes_two_phase()
    }

    /// Whether the open transaction holds something the last commit does not:
    /// records written into it, or offsets read past the committed ones.
    fn transaction_has_news(&self) -> bool {
        let wrote = self
            .transaction_began
            .is_some_and(|(_, sent)| self.outbox.sent_total() > sent);
        self.in_transaction && (wrote || self.positions != self.committed)
    }

    fn writes_two_phase(&self) -> bool {
        match &self.route {
            Route::Sinks(sinks) => sinks.two_phase(),
            Route::Repartition { .. } => false,
        }
    }

    pub(super) fn offsets_list(
        &self,
        positions: &BTreeMap<i32, i64>,
    ) -> Result<TopicPartitionList, ServeError> {
        let staged = match &self.route {
            Route::Sinks(sinks) => sinks.staged(),
            Route::Repartition { .. } => BTreeMap::new(),
        };
        let mut tpl = TopicPartitionList::new();
        for (&partition, &offset) in positions {
            let mut element = tpl.add_partition(&self.stage.input.topic, partition);
            element
                .set_offset(Offset::Offset(offset))
                .map_err(|source| ServeError::Kafka {
                    what: "building the offsets to commit",
                    source,
                })?;
            // Every commit while a restore is given marks it applied, so that a
            // restarted instance never applies it twice.
            let metadata = CommitMetadata {
                restore: self.restore.as_ref().map(|r| r.id.clone()),
                changelog: if self.exactly_once {
                    BTreeMap::new()
                } else {
                    self.changelog_positions_of(partition)
                },
                staged: staged.clone(),
            };
            if metadata != CommitMetadata::default() {
                element.set_metadata(metadata.encode_for_commit());
            }
        }
        Ok(tpl)
    }

    /// Where each changelog partition of an input partition stands for a commit
    /// (at-least-once): after the last record of the settled epochs, else where
    /// the last restore read up to.
    pub(super) fn changelog_positions_of(&self, partition: i32) -> BTreeMap<String, i64> {
        let mut positions = BTreeMap::new();
        for source in self.state_sources.iter().filter(|s| s.table.is_none()) {
            let restored = self
                .changelog_ends
                .get(&(source.topic.clone(), partition))
                .copied();
            let written = self
                .outbox
                .deliveries
                .settled_position(&source.topic, partition);
            if let Some(position) = restored.max(written) {
                positions.insert(source.topic.clone(), position);
            }
        }
        positions
    }

    /// Commits outputs, changelog writes and consumed offsets together.
    pub(super) fn commit(
        &mut self,
        consumer: &BaseConsumer<ConsumerCtx>,
        reason: &'static str,
    ) -> Result<(), ServeError> {
        let started = Instant::now();
        let wait = self
            .transaction_patience()
            .map_or(SINK_FLUSH_WAIT, |left| left.min(SINK_FLUSH_WAIT));
        let result = self
            .prepare_sinks(wait)
            .and_then(|prepared| match prepared {
                Prepared::Ready => Ok(()),
                Prepared::Pending => Err(ServeError::SinkPending {
                    sinks: self.sink_names(),
                    waited: wait,
                }),
            })
            .and_then(|()| {
                if self.exactly_once {
                    self.commit_transaction(consumer)
                } else {
                    self.commit_at_least_once(consumer)
                }
            })
            .and_then(|()| self.publish_sinks());
        let metrics = self.shared.metrics.lock();
        match &result {
            Ok(()) => {
                self.committed = self.positions.clone();
                // The flush (or the transaction) covered every sealed epoch.
                self.sealed.clear();
                if let Ok(m) = metrics {
                    m.commit_duration.observe(started.elapsed().as_secs_f64());
                }
                tracing::debug!(reason, "committed");
            }
            Err(error) => {
                if let Ok(m) = metrics {
                    m.commit_failures
                        .with_label_values(&[error.metric_label()])
                        .inc();
                }
            }
        }
        result
    }

    pub(super) fn commit_transaction(
        &mut self,
        consumer: &BaseConsumer<ConsumerCtx>,
    ) -> Result<(), ServeError> {
        if !self.in_transaction {
            return Ok(());
        }
        let offsets = self.offsets_list(&self.positions)?;
        let group = consumer
            .group_metadata()
            .ok_or(ServeError::NoGroupMetadata)?;
        let mut attempt = 0;
        loop {
            let result = self
                .outbox
                .producer
                .send_offsets_to_transaction(&offsets, &group, KAFKA_TIMEOUT)
                .and_then(|()| self.outbox.producer.commit_transaction(KAFKA_TIMEOUT));
            match result {
                Ok(()) => {
                    self.in_transaction = false;
                    self.transaction_began = None;
                    return Ok(());
                }
                Err(KafkaError::Transaction(error))
                    if error.is_retriable() && attempt < COMMIT_RETRIES =>
                {
                    // A retriable error (a coordinator moving, a timeout): the same
                    // call may be repeated, as librdkafka documents.
                    attempt += 1;
                    tracing::warn!(%error, attempt, "retrying the commit");
                    std::thread::sleep(Duration::from_millis(100 << attempt));
                }
                Err(source) => {
                    return Err(ServeError::Kafka {
                        what: "committing the transaction",
                        source,
                    });
                }
            }
        }
    }

    pub(super) fn commit_at_least_once(
        &mut self,
        consumer: &BaseConsumer<ConsumerCtx>,
    ) -> Result<(), ServeError> {
        self.outbox
            .producer
            .flush(KAFKA_TIMEOUT)
            .map_err(|source| ServeError::Kafka {
                what: "flushing outputs",
                source,
            })?;
        self.check_deliveries()?;
        self.outbox.deliveries.settle_positions(None);
        if self.positions.is_empty() || self.positions == self.committed {
            return Ok(());
        }
        consumer
            .commit(&self.offsets_list(&self.positions)?, CommitMode::Sync)
            .map_err(|source| ServeError::Kafka {
                what: "committing offsets",
                source,
            })
    }

    /// Fails when a record could not be delivered: the offsets then stay
    /// uncommitted, and after the rewind the records are processed again (at
    /// least once).
    pub(super) fn check_deliveries(&self) -> Result<(), ServeError> {
        let failures = self.outbox.deliveries.take_failures();
        match failures.first() {
            Some(first) => Err(ServeError::Delivery {
                count: failures.len(),
                first: first.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The interval commit. Exactly-once commits the transaction; at-least-once
    /// seals the current epoch with the positions it covers and goes on consuming:
    /// `commit_settled` commits them once the epoch is acknowledged.
    pub(super) fn commit_interval(
        &mut self,
        consumer: &BaseConsumer<ConsumerCtx>,
    ) -> Result<Prepared, ServeError> {
        // A sink that cannot make its writes durable yet (its destination slow or
        // down): commit nothing, hold intake, and ask again on the next turn.
        if self.prepare_sinks(SINK_INTERVAL_WAIT)? == Prepared::Pending {
            self.sinks_pending = true;
            if self.transaction_out_of_patience() {
                // The broker would abort the transaction at its timeout and fence
                // this producer. Go back to the last commit instead: the events are
                // read and written again once the sinks catch up (intake is held
                // until then), and their writes are idempotent.
                tracing::warn!(
                    sinks = ?self.sink_names(),
                    "the sinks are not prepared and the transaction is near its timeout: aborting it and going back to the last commit"
                );
                self.abort_open_transaction();
                self.rewind(consumer)?;
            }
            return Ok(Prepared::Pending);
        }
        self.sinks_pending = false;
        if self.exactly_once {
            // An idle stage's transaction holds nothing new: committing it would
            // cost the broker a transaction per interval per instance for
            // nothing. A two-phase sink's commits also record what it published.
            if !self.transaction_has_news() && !self.writes_two_phase() {
                return Ok(Prepared::Ready);
            }
            self.commit(consumer, "interval")?;
            return Ok(Prepared::Ready);
        }
        let covered = self
            .sealed
            .back()
            .map_or(&self.committed, |sealed| &sealed.positions);
        if self.positions != *covered {
            self.sealed.push_back(SealedEpoch {
                epoch: self.outbox.seal(),
                positions: self.positions.clone(),
                sealed_at: Instant::now(),
            });
        }
        self.commit_settled(consumer)?;
        // The sealed epoch's offsets may commit only later, once acknowledged:
        // a two-phase sink (none yet) must publish per epoch, after that commit,
        // rather than here. Idempotent sinks publish nothing.
        self.publish_sinks()?;
        Ok(Prepared::Ready)
    }

    /// At-least-once: commits, without waiting, the positions of the latest
    /// sealed epoch whose records (and every earlier epoch's) are acknowledged.
    pub(super) fn commit_settled(
        &mut self,
        consumer: &BaseConsumer<ConsumerCtx>,
    ) -> Result<(), ServeError> {
        let mut ready = None;
        while let Some(sealed) = self.sealed.front()
            && self.outbox.settled_through(sealed.epoch)
        {
            ready = self.sealed.pop_front();
        }
        let Some(ready) = ready else {
            return Ok(());
        };
        self.check_deliveries()?;
        self.outbox.deliveries.settle_positions(Some(ready.epoch));
        if ready.positions.is_empty() || ready.positions == self.committed {
            return Ok(());
        }
        // The result arrives in `ConsumerCtx::commit_callback`; a failed commit is
        // covered by the next one.
        consumer
            .commit(&self.offsets_list(&ready.positions)?, CommitMode::Async)
            .map_err(|source| ServeError::Kafka {
                what: "committing offsets",
                source,
            })?;
        if let Ok(metrics) = self.shared.metrics.lock() {
            metrics
                .commit_duration
                .observe(ready.sealed_at.elapsed().as_secs_f64());
        }
        tracing::debug!("committed a settled epoch");
        self.committed = ready.positions;
        Ok(())
    }

    /// Aborts the open transaction, if any; its outputs and offsets are discarded.
    pub(super) fn abort_open_transaction(&mut self) {
        if let Route::Sinks(sinks) = &mut self.route {
            sinks.abort();
        }
        if self.exactly_once && self.in_transaction {
            self.abort_transaction_retrying();
            self.in_transaction = false;
            self.transaction_began = None;
        }
    }

    /// librdkafka leaves the producer unusable until an abort that failed on
    /// a retriable error (a timeout: the broker is away) is called again and
    /// succeeds: beginning the next transaction would fail for good ("invalid
    /// state") and stop the instance. So a retriable failure is retried, with
    /// backoff, for as long as a broker outage may reasonably last; after that
    /// the next begin fails and the instance restarts.
    fn abort_transaction_retrying(&mut self) {
        let deadline = Instant::now() + ABORT_PATIENCE;
        let mut pause = Duration::from_millis(100);
        loop {
            match self.outbox.producer.abort_transaction(KAFKA_TIMEOUT) {
                Ok(()) => return,
                Err(KafkaError::Transaction(error))
                    if error.is_retriable() && Instant::now() < deadline =>
                {
                    tracing::warn!(%error, "aborting the transaction failed; trying again");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(error) => {
                    tracing::error!(%error, "aborting the transaction failed");
                    return;
                }
            }
        }
    }

    /// After an aborted transaction: state and positions go back to the last commit.
    pub(super) fn rewind(
        &mut self,
        consumer: &BaseConsumer<ConsumerCtx>,
    ) -> Result<(), ServeError> {
        if !self.exactly_once {
            // Records still in flight would land after the restore has read the
            // changelog (and after its compensations): wait for them first. Their
            // failures are what the rewind already answers.
            if let Err(error) = self.outbox.producer.flush(KAFKA_TIMEOUT) {
                tracing::warn!(%error, "flushing before the rewind did not finish");
            }
            self.outbox.deliveries.take_failures();
        }
        let partitions: Vec<i32> = self.tasks.keys().copied().collect();
        self.drop_tasks(&partitions);
        self.load_tasks(consumer, &partitions)?;
        let committed = consumer
            .committed(KAFKA_TIMEOUT)
            .map_err(|source| ServeError::Kafka {
                what: "reading committed offsets",
                source,
            })?;
        for element in committed.elements() {
            let offset = match element.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            consumer
                .seek(element.topic(), element.partition(), offset, KAFKA_TIMEOUT)
                .map_err(|source| ServeError::Kafka {
                    what: "rewinding to the committed offsets",
                    source,
                })?;
        }
        Ok(())
    }

    /// Prepares the sinks; what they refused on the way goes to the dead letters
    /// (in the open transaction, before the offsets commit).
    fn prepare_sinks(&mut self, wait: Duration) -> Result<Prepared, ServeError> {
        let Route::Sinks(sinks) = &mut self.route else {
            return Ok(Prepared::Ready);
        };
        let mut refused = SinkOutput::default();
        let prepared = sinks.prepare(wait, &mut refused)?;
        if !refused.dead_letters.is_empty() {
            self.begin_if_needed()?;
            let input_topic = self.stage.input.topic.clone();
            for letter in &refused.dead_letters {
                self.send_dead_letter(letter, &input_topic, None, None)?;
            }
        }
        Ok(prepared)
    }

    /// After the final commit (see `Sink::finish`).
    pub(super) fn finish_sinks(&mut self) {
        if let Route::Sinks(sinks) = &mut self.route {
            sinks.finish();
        }
    }

    fn publish_sinks(&mut self) -> Result<(), ServeError> {
        if let Route::Sinks(sinks) = &mut self.route {
            sinks.publish()?;
        }
        Ok(())
    }

    fn sink_names(&self) -> Vec<String> {
        match &self.route {
            Route::Sinks(sinks) => sinks.names(),
            Route::Repartition { .. } => Vec::new(),
        }
    }

    /// Whether intake must wait for the sinks: one is backpressured, or the last
    /// interval commit found one not prepared.
    pub(super) fn sinks_hold_intake(&self) -> bool {
        self.sinks_pending || matches!(&self.route, Route::Sinks(sinks) if sinks.backpressured())
    }
}
