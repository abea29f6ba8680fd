//! State at assignment: a partition's keyed state is restored from its
//! changelogs (as of the committed positions under at-least-once), join and
//! enrich tables from their topics, and a `--restore` plan is applied once per
//! partition (input start and state, rewound with compensating records).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use keystone_crds::checkpoint::{InputRestore, RestorePlan, StateRestore};
use keystone_crds::plan::PlanStage;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::connectors::StagedEpochs;
use crate::host::process::{Core, Route};
use crate::host::rebalance::ConsumerCtx;
use crate::host::tables::table_changes;
use crate::host::{ServeArgs, ServeError};
use crate::kafka::metadata::CommitMetadata;
use crate::kafka::{KAFKA_TIMEOUT, committed_in_group, config, restore};
use crate::state::StateChange;

/// The `--restore` plan as this stage applies it.
pub(super) struct ActiveRestore {
    /// The id every offset commit carries (`keystone.restore=<id>`).
    pub id: String,
    /// This stage's part of the plan; `None` when the plan does not list the stage.
    pub stage: Option<keystone_crds::checkpoint::StageRestore>,
}

impl ActiveRestore {
    pub fn new(plan: &RestorePlan, stage: &str) -> Self {
        Self {
            id: plan.id.clone(),
            stage: plan.stages.get(stage).cloned(),
        }
    }
}

impl Core {
    /// Creates the tasks of newly assigned partitions and restores their state,
    /// reading every changelog and table partition they need with one reader.
    pub(super) fn add_tasks(
        &mut self,
        consumer: &BaseConsumer<ConsumerCtx>,
        partitions: &[i32],
    ) -> Result<(), ServeError> {
        self.shared
            .restoring
            .fetch_add(partitions.len(), Ordering::SeqCst);
        let result = self.load_tasks(consumer, partitions);
        self.shared
            .restoring
            .fetch_sub(partitions.len(), Ordering::SeqCst);
        result
    }

    /// Creates the tasks of `partitions` with their state restored. Used as is by
    /// a rewind to the last commit: the partitions stay this instance's, so
    /// readiness does not change (a sink that waits for its destination rewinds
    /// while the pod must stay ready).
    pub(super) fn load_tasks(
        &mut self,
        consumer: &BaseConsumer<ConsumerCtx>,
        partitions: &[i32],
    ) -> Result<(), ServeError> {
        self.recover_staged(consumer, partitions)?;
        self.committed_changelog_positions(consumer, partitions)
            .and_then(|at_commit| self.restore_tasks(partitions, &at_commit))
    }

    /// Gives the two-phase sinks the epochs the last commits of `partitions`
    /// name: committed, and perhaps not yet published when their writer
    /// stopped (see `connectors::lake`).
    fn recover_staged(
        &mut self,
        consumer: &BaseConsumer<ConsumerCtx>,
        partitions: &[i32],
    ) -> Result<(), ServeError> {
        if !matches!(&self.route, Route::Sinks(sinks) if sinks.two_phase()) {
            return Ok(());
        }
        let mut staged: BTreeMap<String, Vec<StagedEpochs>> = BTreeMap::new();
        for (_, (_, metadata)) in self.committed_in_group(consumer, partitions)? {
            for (sink, epochs) in metadata.staged {
                let known = staged.entry(sink).or_default();
                for epoch in epochs {
                    if !known.contains(&epoch) {
                        known.push(epoch);
                    }
                }
            }
        }
        if let Route::Sinks(sinks) = &mut self.route {
            sinks.recover(staged)?;
        }
        Ok(())
    }

    /// At-least-once: the changelog positions committed with each partition's
    /// offset (see `metadata`), which its state is restored as of.
    pub(super) fn committed_changelog_positions(
        &self,
        consumer: &BaseConsumer<ConsumerCtx>,
        partitions: &[i32],
    ) -> Result<BTreeMap<i32, BTreeMap<String, i64>>, ServeError> {
        if self.exactly_once || !self.state_sources.iter().any(|s| s.table.is_none()) {
            return Ok(BTreeMap::new());
        }
        Ok(self
            .committed_in_group(consumer, partitions)?
            .into_iter()
            .map(|(partition, (_, metadata))| (partition, metadata.changelog))
            .collect())
    }

    pub(super) fn restore_tasks(
        &mut self,
        partitions: &[i32],
        at_commit: &BTreeMap<i32, BTreeMap<String, i64>>,
    ) -> Result<(), ServeError> {
        let mut wanted: BTreeSet<(String, i32)> = BTreeSet::new();
        let mut replicated: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        for source in &self.state_sources {
            match &source.table {
                Some(table) if table.replicated => {
                    let all = restore::partitions_of(&self.restore_config, &source.topic)?;
                    wanted.extend(all.iter().map(|p| (source.topic.clone(), *p)));
                    replicated.insert(source.topic.clone(), all);
                }
                _ => wanted.extend(partitions.iter().map(|p| (source.topic.clone(), *p))),
            }
        }
        let restored = restore::read_to_end(&self.restore_config, &wanted)?;
        self.follow_tables(&restored.read_up_to)?;
        for (key, end) in &restored.read_up_to {
            if self
                .state_sources
                .iter()
                .any(|s| s.table.is_none() && s.topic == key.0)
            {
                self.changelog_ends.insert(key.clone(), *end);
            }
        }
        let mut read = restored.records;
        let mut compensations: Vec<(String, i32, StateChange)> = Vec::new();
        for &partition in partitions {
            let mut task = self.new_task()?;
            let restoring = self.pending_restores.remove(&partition);
            for source in &self.state_sources {
                let logged: Vec<restore::LoggedRecord> = match replicated.get(&source.topic) {
                    Some(all) => all
                        .iter()
                        .flat_map(|p| {
                            read.get(&(source.topic.clone(), *p))
                                .cloned()
                                .unwrap_or_default()
                        })
                        .collect(),
                    None => read
                        .remove(&(source.topic.clone(), partition))
                        .unwrap_or_default(),
                };
                let count = logged.len();
                let changes = match &source.table {
                    None => {
                        // A restore plan decides; else the position committed with
                        // the offset (at-least-once), else everything logged.
                        let rewind = match restoring {
                            Some(_) => self.rewind_of(&source.topic, partition),
                            None => at_commit
                                .get(&partition)
                                .and_then(|positions| positions.get(&source.topic))
                                .map(|position| restore::Rewind::To(*position)),
                        };
                        match rewind {
                            Some(to) => {
                                let rewound = restore::rewind(&logged, to);
                                tracing::info!(
                                    partition,
                                    topic = source.topic,
                                    ?to,
                                    kept = rewound.state.len(),
                                    compensations = rewound.compensations.len(),
                                    reason = if restoring.is_some() {
                                        "restore"
                                    } else {
                                        "committed position"
                                    },
                                    "state rewound"
                                );
                                compensations.extend(
                                    rewound
                                        .compensations
                                        .into_iter()
                                        .map(|c| (source.topic.clone(), partition, c)),
                                );
                                rewound.state
                            }
                            None => logged
                                .into_iter()
                                .filter_map(|(_, (key, value))| {
                                    key.map(|key| StateChange { key, value })
                                })
                                .collect(),
                        }
                    }
                    Some(spec) => table_changes(spec, logged.into_iter().map(|(_, r)| r).collect()),
                };
                task.restore(&source.step, changes)
                    .map_err(ServeError::Runtime)?;
                self.shared
                    .metrics
                    .lock()
                    .map(|m| m.restore_records.inc_by(count as u64))
                    .ok();
                tracing::info!(
                    partition,
                    step = source.step,
                    topic = source.topic,
                    records = count,
                    "state restored"
                );
            }
            self.tasks.insert(partition, task);
            if let Some(start) = restoring {
                // The restored start is committed (with the restore's metadata) before
                // anything of the partition is processed: see `commit_restores`.
                self.positions.insert(partition, start);
                self.uncommitted_restores.push(partition);
            }
        }
        if !compensations.is_empty() {
            self.begin_if_needed()?;
            let count = compensations.len() as u64;
            for (topic, partition, change) in compensations {
                self.outbox.send(
                    &topic,
                    Some(&change.key),
                    change.value.as_deref(),
                    Some(partition),
                    None,
                )?;
            }
            self.shared
                .metrics
                .lock()
                .map(|m| m.restore_compensations.inc_by(count))
                .ok();
        }
        Ok(())
    }

    /// How the restore takes a changelog partition back, if it names the topic
    /// (and, for `At`, the partition). Tables are never rewound: they follow
    /// their own topic.
    pub(super) fn rewind_of(&self, topic: &str, partition: i32) -> Option<restore::Rewind> {
        let stage = self.restore.as_ref()?.stage.as_ref()?;
        match stage.state.get(topic)? {
            StateRestore::Empty => Some(restore::Rewind::Empty),
            StateRestore::At(positions) => match positions.get(&partition) {
                Some(position) => Some(restore::Rewind::To(*position)),
                None => {
                    tracing::warn!(
                        topic,
                        partition,
                        "the restore plan has no position for this changelog partition; its state is kept"
                    );
                    None
                }
            },
        }
    }

    /// Commits the start offsets of partitions just restored, with the
    /// compensating changelog records, in one transaction (at-least-once: after
    /// the compensations are flushed). From then on the group's offsets carry the
    /// restore's metadata, and a restart does not apply it again.
    pub(super) fn commit_restores(
        &mut self,
        consumer: &BaseConsumer<ConsumerCtx>,
    ) -> Result<(), ServeError> {
        if self.uncommitted_restores.is_empty() {
            return Ok(());
        }
        // Even without compensations the offsets need a transaction to travel in.
        self.begin_if_needed()?;
        self.commit(consumer, "restore")?;
        let partitions = std::mem::take(&mut self.uncommitted_restores);
        self.shared
            .metrics
            .lock()
            .map(|m| m.restores_applied.inc_by(partitions.len() as u64))
            .ok();
        let starts: BTreeMap<i32, i64> = partitions
            .iter()
            .filter_map(|p| self.committed.get(p).map(|o| (*p, *o)))
            .collect();
        tracing::info!(?starts, "restore applied and committed");
        Ok(())
    }

    /// Reads the restore's marker in the group's committed offsets of newly
    /// assigned partitions; those without it get their start offset from the
    /// restore plan, set in the assignment, and are restored before processing.
    pub(super) fn prepare_restores(
        &mut self,
        consumer: &BaseConsumer<ConsumerCtx>,
        tpl: &mut TopicPartitionList,
    ) -> Result<(), ServeError> {
        let Some(ActiveRestore {
            id,
            stage: Some(stage),
        }) = &self.restore
        else {
            return Ok(());
        };
        let (id, input) = (id.clone(), stage.input.clone());
        let topic = self.stage.input.topic.clone();
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        if partitions.is_empty() {
            return Ok(());
        }
        let committed = self.committed_in_group(consumer, &partitions)?;
        for partition in partitions {
            let (offset, metadata) = committed.get(&partition).cloned().unwrap_or_default();
            if metadata.restore.as_ref() == Some(&id) {
                tracing::info!(
                    partition,
                    "the restore was applied before: starting normally"
                );
                continue;
            }
            let start = match &input {
                InputRestore::Earliest => self.watermarks(consumer, partition)?.0,
                InputRestore::Latest => self.watermarks(consumer, partition)?.1,
                InputRestore::Offsets(offsets) => match offsets.get(&partition) {
                    Some(start) => *start,
                    None => self.start_of(consumer, partition, offset)?,
                },
                InputRestore::Committed => self.start_of(consumer, partition, offset)?,
            };
            tpl.set_partition_offset(&topic, partition, Offset::Offset(start))
                .map_err(|source| ServeError::Kafka {
                    what: "setting a restored partition's start offset",
                    source,
                })?;
            tracing::info!(partition, start, "applying the restore to this partition");
            self.pending_restores.insert(partition, start);
        }
        Ok(())
    }

    /// The group's committed offset (if any) and its metadata, per partition.
    pub(super) fn committed_in_group(
        &self,
        consumer: &BaseConsumer<ConsumerCtx>,
        partitions: &[i32],
    ) -> Result<BTreeMap<i32, (Option<i64>, CommitMetadata)>, ServeError> {
        Ok(committed_in_group(
            consumer,
            &self.stage.input.topic,
            partitions,
        )?)
    }

    pub(super) fn watermarks(
        &self,
        consumer: &BaseConsumer<ConsumerCtx>,
        partition: i32,
    ) -> Result<(i64, i64), ServeError> {
        consumer
            .fetch_watermarks(&self.stage.input.topic, partition, KAFKA_TIMEOUT)
            .map_err(|source| ServeError::Kafka {
                what: "reading the bounds of an input partition",
                source,
            })
    }

    /// Where a partition starts: its committed offset, else where
    /// `auto.offset.reset` puts it, as a concrete offset.
    pub(super) fn start_of(
        &self,
        consumer: &BaseConsumer<ConsumerCtx>,
        partition: i32,
        committed: Option<i64>,
    ) -> Result<i64, ServeError> {
        match committed {
            Some(offset) => Ok(offset),
            None => {
                let (low, high) = self.watermarks(consumer, partition)?;
                Ok(if self.start_from_earliest { low } else { high })
            }
        }
    }
}

/// Whether every partition of the stage's input already carries this restore's
/// marker: nothing will be replayed, so the sink scan of a replay suppression
/// (which grows with the time since the checkpoint) is skipped on a restart.
pub(super) fn restore_applied_everywhere(
    args: &ServeArgs,
    stage: &PlanStage,
    plan: &RestorePlan,
) -> Result<bool, ServeError> {
    let mut config = config::restore_reader(&args.kafka, &stage.consumer_group);
    config.set("group.id", &stage.consumer_group);
    let partitions = restore::partitions_of(&config, &stage.input.topic)?;
    let reader: BaseConsumer = config.create().map_err(|source| ServeError::Kafka {
        what: "creating an offsets reader",
        source,
    })?;
    let committed = committed_in_group(&reader, &stage.input.topic, &partitions)?;
    Ok(!partitions.is_empty()
        && committed.values().all(|(offset, metadata)| {
            offset.is_some() && metadata.restore.as_ref() == Some(&plan.id)
        }))
}
