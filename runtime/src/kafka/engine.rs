//! The consume-process-commit loop of one stage instance.
//!
//! One task ([`StageTask`]) per assigned input partition, each with its own
//! state. Under exactly-once, everything one commit interval produces — sink or
//! repartition records, dead letters, changelog records — and the consumed
//! offsets go into one Kafka transaction (`send_offsets_to_transaction` with the
//! group's metadata, as Kafka Streams' EOS v2 does). Under at-least-once the
//! offsets of each interval are committed once the outputs sent before them are
//! acknowledged, while consumption goes on (see `outbox`); rebalances,
//! checkpoints and shutdown flush the producer and commit synchronously.
//!
//! Rebalances run inside `poll`: before partitions are revoked the current work
//! is committed; when partitions are assigned their state is restored from the
//! changelogs before any of their records is processed (the pod reports not
//! ready meanwhile).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use keystone_crds::checkpoint::{InputRestore, InstanceCheckpoint, RestorePlan, StateRestore};
use keystone_crds::ops::{Operator as Op, TableSpec};
use keystone_crds::pipeline::Delivery;
use keystone_crds::plan::{Plan, PlanStage, StageOutput};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::Producer;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use sonic_rs::JsonValueTrait;

use crate::clock::SystemClock;
use crate::event::{Event, FieldPath, Provenance};
use crate::kafka::http::Control;
use crate::kafka::metadata::CommitMetadata;
use crate::kafka::outbox::{Epoch, Outbox};
use crate::kafka::restore::{self, RawRecord};
use crate::kafka::{ServeArgs, ServeError, Shared, config};
use crate::ops::Table;
use crate::state::StateChange;
use crate::task::{StageTask, StepMetrics, TaskOptions};

/// How long blocking Kafka calls (commits, transactions) may take.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);
/// Records taken from `poll` before they are processed together.
const MAX_BATCH: usize = 2048;
/// Retries of a retriable commit failure, with doubling backoff from 100 ms.
const COMMIT_RETRIES: u32 = 6;

/// The consumer's context: rebalance callbacks reach the engine's core.
pub struct ConsumerCtx {
    core: Arc<Mutex<Core>>,
    shared: Arc<Shared>,
}

impl ClientContext for ConsumerCtx {}

impl ConsumerContext for ConsumerCtx {
    /// Results of asynchronous commits (at-least-once intervals). Only counted:
    /// the next commit covers a failed one. The core is not locked here, as
    /// librdkafka may call this from inside a synchronous commit.
    fn commit_callback(&self, result: KafkaResult<()>, _: &TopicPartitionList) {
        if let Err(error) = result {
            tracing::warn!(%error, "an offset commit failed; the next one covers it");
            if let Ok(metrics) = self.shared.metrics.lock() {
                metrics.commit_failures.with_label_values(&["kafka"]).inc();
            }
        }
    }

    /// The default rebalance, except that restored partitions get their start
    /// offsets in the assignment itself (so nothing is ever fetched from the
    /// committed offset first), and that partitions assigned while stopped are
    /// paused at once.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                {
                    let mut core = self.core.lock().unwrap_or_else(|p| p.into_inner());
                    if let Err(error) = core.prepare_restores(consumer, tpl) {
                        tracing::error!(%error, "reading where restored partitions start failed");
                        core.fatal = Some(error);
                    }
                }
                if let Err(error) = assign(consumer, tpl) {
                    tracing::error!(%error, "assigning partitions failed");
                }
                self.post_rebalance(consumer, &Rebalance::Assign(tpl));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.pre_rebalance(consumer, &Rebalance::Revoke(tpl));
                if let Err(error) = unassign(consumer, tpl) {
                    tracing::error!(%error, "unassigning partitions failed");
                }
                self.post_rebalance(consumer, &Rebalance::Revoke(tpl));
            }
            other => {
                let code: rdkafka::types::RDKafkaErrorCode = other.into();
                tracing::warn!(%code, "rebalance error");
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            let mut core = self.core.lock().unwrap_or_else(|p| p.into_inner());
            core.shared
                .metrics
                .lock()
                .map(|m| m.rebalances.with_label_values(&["revoke"]).inc())
                .ok();
            // Lost partitions (the session expired) may already belong to another
            // instance: their work must not be committed, only thrown away.
            if consumer.assignment_lost() {
                core.abort_open_transaction();
            } else if let Err(error) = core.commit(consumer, "rebalance") {
                tracing::error!(%error, "commit before revocation failed; the work since the last commit is redone by the new owner");
                core.abort_open_transaction();
            }
            core.drop_tasks(&partitions);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                let mut core = self.core.lock().unwrap_or_else(|p| p.into_inner());
                core.shared
                    .metrics
                    .lock()
                    .map(|m| m.rebalances.with_label_values(&["assign"]).inc())
                    .ok();
                if let Err(error) = core
                    .add_tasks(consumer, &partitions)
                    .and_then(|()| core.commit_restores(consumer))
                {
                    // Without its state a partition cannot be processed correctly:
                    // stop, and let the restart (and a new rebalance) try again.
                    tracing::error!(%error, "restoring assigned partitions failed");
                    core.fatal = Some(error);
                }
                if core.stopped
                    && let Err(error) = consumer.pause(tpl)
                {
                    tracing::error!(%error, "pausing partitions assigned while stopped failed");
                }
                core.shared.joined.store(true, Ordering::SeqCst);
                core.update_assignment_metrics();
            }
            Rebalance::Revoke(_) => {
                let core = self.core.lock().unwrap_or_else(|p| p.into_inner());
                core.update_assignment_metrics();
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
    }
}

/// Offsets of a batch's records by a hash of their bytes, to name the offset of a
/// dead letter, which carries only the original bytes. Byte-identical records
/// (redeliveries) are matched in offset order.
#[derive(Default)]
struct OffsetLookup {
    recorded: Vec<(u64, i64)>,
    /// Built on the first lookup: most batches have no dead letter.
    by_hash: Option<HashMap<u64, std::collections::VecDeque<i64>>>,
}

impl OffsetLookup {
    fn record(&mut self, payload: &[u8], offset: i64) {
        self.recorded
            .push((xxhash_rust::xxh3::xxh3_64(payload), offset));
    }

    fn take(&mut self, original: &[u8]) -> Option<i64> {
        let recorded = &self.recorded;
        let by_hash = self.by_hash.get_or_insert_with(|| {
            let mut map: HashMap<u64, std::collections::VecDeque<i64>> = HashMap::new();
            for (hash, offset) in recorded {
                map.entry(*hash).or_default().push_back(*offset);
            }
            map
        });
        by_hash
            .get_mut(&xxhash_rust::xxh3::xxh3_64(original))?
            .pop_front()
    }
}

/// Records of one input partition as polled: offset, value and the source record
/// they come from.
type Records = Vec<(i64, Option<Vec<u8>>, Option<Provenance>)>;

/// Headers of repartition and sink records naming the pipeline source record
/// (partition and offset, as decimal text) an event comes from.
const SOURCE_PARTITION_HEADER: &str = "keystone.source.partition";
const SOURCE_OFFSET_HEADER: &str = "keystone.source.offset";

fn provenance_headers(source: Option<Provenance>) -> Option<OwnedHeaders> {
    let source = source?;
    let partition = source.partition.to_string();
    let offset = source.offset.to_string();
    Some(
        OwnedHeaders::new_with_capacity(2)
            .insert(Header {
                key: SOURCE_PARTITION_HEADER,
                value: Some(partition.as_bytes()),
            })
            .insert(Header {
                key: SOURCE_OFFSET_HEADER,
                value: Some(offset.as_bytes()),
            }),
    )
}

/// The source record a repartition or sink record names in its headers.
fn provenance_of(message: &impl Message) -> Option<Provenance> {
    let headers = message.headers()?;
    let (mut partition, mut offset) = (None, None);
    for header in headers.iter() {
        let text = || std::str::from_utf8(header.value?).ok();
        match header.key {
            SOURCE_PARTITION_HEADER => partition = text().and_then(|t| t.parse().ok()),
            SOURCE_OFFSET_HEADER => offset = text().and_then(|t| t.parse().ok()),
            _ => {}
        }
    }
    Some(Provenance {
        partition: partition?,
        offset: offset?,
    })
}

/// Sink records a replay must not write again, by sink topic: the source
/// records that the sink holds past the checkpoint (`RestorePlan.suppress`).
#[derive(Default)]
struct Suppression {
    delivered: HashMap<String, HashSet<Provenance>>,
    /// Records skipped, by sink topic.
    skipped: BTreeMap<String, u64>,
    reported_all: bool,
}

impl Suppression {
    /// Reads every listed partition of the stage's sink topics from its position
    /// to its current end (committed records only).
    fn load(
        config: &ClientConfig,
        plan: &keystone_crds::checkpoint::ReplaySuppression,
        sinks: &[(String, Vec<FieldPath>)],
    ) -> Result<Self, ServeError> {
        let mut starts = BTreeMap::new();
        for (topic, _) in sinks {
            for (partition, offset) in plan.sink_positions.get(topic).into_iter().flatten() {
                starts.insert((topic.clone(), *partition), *offset);
            }
        }
        let mut delivered: HashMap<String, HashSet<Provenance>> = HashMap::new();
        let mut without = 0u64;
        restore::scan(config, &starts, |message| match provenance_of(message) {
            Some(source) => {
                delivered
                    .entry(message.topic().to_owned())
                    .or_default()
                    .insert(source);
            }
            None => without += 1,
        })?;
        for (topic, sources) in &delivered {
            tracing::info!(
                topic,
                delivered = sources.len(),
                "replay suppression: sink records past the checkpoint will not be written again"
            );
        }
        if without > 0 {
            tracing::warn!(
                records = without,
                "replay suppression: sink records without source headers cannot be recognised"
            );
        }
        Ok(Self {
            delivered,
            ..Self::default()
        })
    }

    /// Whether the sink `topic` already holds the record of `source`.
    fn holds(&mut self, topic: &str, source: Option<Provenance>) -> bool {
        let held = source.is_some_and(|source| {
            self.delivered
                .get(topic)
                .is_some_and(|sources| sources.contains(&source))
        });
        if held {
            *self.skipped.entry(topic.to_owned()).or_default() += 1;
        }
        held
    }

    fn is_empty(&self) -> bool {
        self.delivered.is_empty()
    }

    /// Logs once when every delivered record was met again.
    fn report(&mut self) {
        let delivered: usize = self.delivered.values().map(HashSet::len).sum();
        let skipped: u64 = self.skipped.values().sum();
        if !self.reported_all && delivered > 0 && skipped as usize >= delivered {
            self.reported_all = true;
            tracing::info!(
                skipped,
                "replay suppression: every record delivered past the checkpoint was met again and skipped"
            );
        }
    }
}

/// Where the stage's events go.
enum Route {
    Repartition { topic: String, key: Vec<FieldPath> },
    Sinks(Vec<(String, Vec<FieldPath>)>),
}

/// A step whose state is restored from a topic.
struct StateSource {
    step: String,
    topic: String,
    /// A join/enrich table: records are rows, keyed by the table's key fields.
    table: Option<TableSpec>,
}

/// Everything the loop and the rebalance callbacks share.
pub struct Core {
    plan: Arc<Plan>,
    stage: PlanStage,
    exactly_once: bool,
    reads_source: bool,
    outbox: Outbox,
    /// At-least-once: epochs sealed at an interval commit, oldest first, with the
    /// positions to commit once their records are acknowledged.
    sealed: VecDeque<SealedEpoch>,
    restore_config: ClientConfig,
    route: Route,
    state_sources: Vec<StateSource>,
    tasks: BTreeMap<i32, StageTask>,
    /// Reads rows that join and enrich tables receive while the stage runs, from
    /// where each table partition's restore stopped.
    table_reader: Option<BaseConsumer>,
    /// Table partitions the reader is assigned.
    table_assignment: BTreeSet<(String, i32)>,
    /// Partitions whose timers may fire: they processed input since they were
    /// (re)assigned, or have none waiting. Until then a restored task's
    /// processing-time timers would count the downtime as waiting time and release
    /// held-back events ahead of predecessors that are next in the partition.
    live: BTreeSet<i32>,
    /// Next offset to consume per partition, for the next commit.
    positions: BTreeMap<i32, i64>,
    /// Offsets covered by the last successful commit.
    committed: BTreeMap<i32, i64>,
    in_transaction: bool,
    retired: BTreeMap<String, StepMetrics>,
    shared: Arc<Shared>,
    fatal: Option<ServeError>,
    /// Reported in checkpoints.
    instance_id: String,
    plan_hash: String,
    /// Where a partition without committed offsets starts (`auto.offset.reset`).
    start_from_earliest: bool,
    /// The `--restore` plan, if any.
    restore: Option<ActiveRestore>,
    /// Assigned partitions whose restore is applied before they are processed,
    /// with the offset their input starts at.
    pending_restores: BTreeMap<i32, i64>,
    /// Partitions restored whose start offset (and compensations) are not committed yet.
    uncommitted_restores: Vec<i32>,
    /// Per changelog partition, the end its last restore read up to: its position
    /// as long as this instance wrote nothing to it.
    changelog_ends: BTreeMap<(String, i32), i64>,
    /// Processing stopped after a checkpoint: partitions paused, no output.
    stopped: bool,
    suppression: Suppression,
}

struct SealedEpoch {
    epoch: Epoch,
    positions: BTreeMap<i32, i64>,
    sealed_at: Instant,
}

/// The `--restore` plan as this stage applies it.
pub struct ActiveRestore {
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
    fn new_task(&self) -> Result<StageTask, ServeError> {
        let source_schema = self.reads_source.then_some(&self.plan.source.schema);
        StageTask::new(
            &self.stage,
            source_schema,
            &BTreeMap::new(),
            Arc::new(SystemClock),
            TaskOptions {
                record_changes: true,
            },
        )
        .map_err(ServeError::Runtime)
    }

    /// Creates the tasks of newly assigned partitions and restores their state,
    /// reading every changelog and table partition they need with one reader.
    fn add_tasks(
        &mut self,
        consumer: &BaseConsumer<ConsumerCtx>,
        partitions: &[i32],
    ) -> Result<(), ServeError> {
        self.shared
            .restoring
            .fetch_add(partitions.len(), Ordering::SeqCst);
        let result = self
            .committed_changelog_positions(consumer, partitions)
            .and_then(|at_commit| self.restore_tasks(partitions, &at_commit));
        self.shared
            .restoring
            .fetch_sub(partitions.len(), Ordering::SeqCst);
        result
    }

    /// At-least-once: the changelog positions committed with each partition's
    /// offset (see `metadata`), which its state is restored as of.
    fn committed_changelog_positions(
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

    fn restore_tasks(
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
    fn rewind_of(&self, topic: &str, partition: i32) -> Option<restore::Rewind> {
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
    fn commit_restores(&mut self, consumer: &BaseConsumer<ConsumerCtx>) -> Result<(), ServeError> {
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
    fn prepare_restores(
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
    fn committed_in_group(
        &self,
        consumer: &BaseConsumer<ConsumerCtx>,
        partitions: &[i32],
    ) -> Result<BTreeMap<i32, (Option<i64>, CommitMetadata)>, ServeError> {
        committed_in_group(consumer, &self.stage.input.topic, partitions)
    }

    fn watermarks(
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
    fn start_of(
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

    fn drop_tasks(&mut self, partitions: &[i32]) {
        for partition in partitions {
            if let Some(task) = self.tasks.remove(partition) {
                add_task_metrics(&mut self.retired, &task);
            }
            self.positions.remove(partition);
            self.committed.remove(partition);
            for sealed in &mut self.sealed {
                sealed.positions.remove(partition);
            }
            self.live.remove(partition);
            self.unfollow_table_partition(*partition);
        }
    }

    /// Counts the tasks, one per assigned partition, rather than asking the
    /// consumer: these run inside rebalance callbacks, and `assignment()` there
    /// can block for good while the consumer closes (seen at shutdown).
    fn update_assignment_metrics(&self) {
        let assigned = self.tasks.len();
        self.shared
            .metrics
            .lock()
            .map(|m| {
                m.assigned_partitions.set(assigned as i64);
                m.restoring_partitions
                    .set(self.shared.restoring.load(Ordering::SeqCst) as i64);
            })
            .ok();
    }

    fn begin_if_needed(&mut self) -> Result<(), ServeError> {
        if self.exactly_once && !self.in_transaction {
            self.outbox
                .producer
                .begin_transaction()
                .map_err(|source| ServeError::Kafka {
                    what: "beginning a transaction",
                    source,
                })?;
            self.in_transaction = true;
        }
        Ok(())
    }

    /// Processes records of one partition (in offset order).
    fn process(&mut self, partition: i32, records: Records) -> Result<(), ServeError> {
        if !self.tasks.contains_key(&partition) {
            // Records of a partition revoked while they were buffered: the new
            // owner reprocesses them from the committed offset.
            return Ok(());
        }
        let Some(last_offset) = records.last().map(|(offset, _, _)| *offset) else {
            return Ok(());
        };
        self.begin_if_needed()?;
        // The whole batch goes through the steps at once; dead letters find their
        // offsets again by their original bytes.
        let mut offsets = OffsetLookup::default();
        let task = self.tasks.get_mut(&partition).expect("checked above");
        task.push_records(records.into_iter().map(|(offset, payload, source)| {
            let payload = payload.unwrap_or_default();
            offsets.record(&payload, offset);
            (payload, source)
        }));
        let input_topic = self.stage.input.topic.clone();
        self.drain(partition, &input_topic, &mut offsets)?;
        self.positions.insert(partition, last_offset + 1);
        self.live.insert(partition);
        Ok(())
    }

    /// Fires every task's timers (releases held-back events, expires state).
    fn tick(&mut self) -> Result<(), ServeError> {
        let partitions: Vec<i32> = self.live.iter().copied().collect();
        let input_topic = self.stage.input.topic.clone();
        for partition in partitions {
            if let Some(task) = self.tasks.get_mut(&partition) {
                task.tick();
                if task_has_output(task) {
                    self.begin_if_needed()?;
                    self.drain(partition, &input_topic, &mut OffsetLookup::default())?;
                }
            }
        }
        Ok(())
    }

    /// Sends what a task produced: events, dead letters, changelog records.
    fn drain(
        &mut self,
        partition: i32,
        input_topic: &str,
        offsets: &mut OffsetLookup,
    ) -> Result<(), ServeError> {
        let Some(task) = self.tasks.get_mut(&partition) else {
            return Ok(());
        };
        let events = task.take_events();
        let mut dead_letters = task.take_dead_letters();
        let changelog = task.take_changelog();
        let changelog_topics: Vec<Option<String>> = changelog
            .iter()
            .map(|record| task.changelog_topic(record.step).map(str::to_owned))
            .collect();
        for event in events {
            let value = sonic_rs::to_vec(&event.value).unwrap_or_default();
            match &self.route {
                Route::Repartition { topic, key } => match record_key(&event, key) {
                    Some(key) => self.outbox.send(
                        topic,
                        Some(&key),
                        Some(&value),
                        None,
                        provenance_headers(event.source),
                    )?,
                    None => dead_letters.push(crate::event::DeadLetter {
                        step: "repartition".to_owned(),
                        reason: format!(
                            "the event lacks a key field of the repartition topic {topic} ({})",
                            key.iter()
                                .map(|k| k.dotted.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        original: event.raw,
                    }),
                },
                Route::Sinks(sinks) => {
                    for (topic, key) in sinks {
                        // Already delivered before a rollback: the state above still
                        // changed, only the record is not written again.
                        if !self.suppression.is_empty()
                            && self.suppression.holds(topic, event.source)
                        {
                            continue;
                        }
                        let key = record_key(&event, key);
                        self.outbox.send(
                            topic,
                            key.as_deref(),
                            Some(&value),
                            None,
                            provenance_headers(event.source),
                        )?;
                    }
                }
            }
        }
        for letter in dead_letters {
            let offset_text = offsets.take(&letter.original).unwrap_or(-1).to_string();
            let partition_text = partition.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "keystone.reason",
                    value: Some(letter.reason.as_bytes()),
                })
                .insert(Header {
                    key: "keystone.step",
                    value: Some(letter.step.as_bytes()),
                })
                .insert(Header {
                    key: "keystone.topic",
                    value: Some(input_topic.as_bytes()),
                })
                .insert(Header {
                    key: "keystone.partition",
                    value: Some(partition_text.as_bytes()),
                })
                .insert(Header {
                    key: "keystone.offset",
                    value: Some(offset_text.as_bytes()),
                });
            self.outbox.send(
                &self.plan.dead_letter_topic,
                None,
                Some(&letter.original),
                None,
                Some(headers),
            )?;
        }
        let mut changelog_bytes: BTreeMap<String, u64> = BTreeMap::new();
        for (record, topic) in changelog.into_iter().zip(changelog_topics) {
            let Some(topic) = topic else { continue };
            // Tables are materialized from their own topic, which is never written.
            if self
                .state_sources
                .iter()
                .any(|s| s.table.is_some() && s.topic == topic)
            {
                continue;
            }
            let step = self
                .stage
                .steps
                .get(record.step)
                .map(|s| s.name.clone())
                .unwrap_or_default();
            *changelog_bytes.entry(step).or_default() +=
                (record.change.key.len() + record.change.value.as_ref().map_or(0, Vec::len)) as u64;
            self.outbox.send(
                &topic,
                Some(&record.change.key),
                record.change.value.as_deref(),
                Some(partition),
                None,
            )?;
        }
        if !changelog_bytes.is_empty() {
            self.shared
                .metrics
                .lock()
                .map(|m| {
                    for (step, bytes) in changelog_bytes {
                        m.changelog_bytes.with_label_values(&[&step]).inc_by(bytes);
                    }
                })
                .ok();
        }
        Ok(())
    }

    /// Keeps reading the table partitions just restored, from where the restore stopped.
    fn follow_tables(
        &mut self,
        read_up_to: &BTreeMap<(String, i32), i64>,
    ) -> Result<(), ServeError> {
        let Some(reader) = &self.table_reader else {
            return Ok(());
        };
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in read_up_to {
            let is_table = self
                .state_sources
                .iter()
                .any(|s| s.table.is_some() && &s.topic == topic);
            if is_table && self.table_assignment.insert((topic.clone(), *partition)) {
                tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
                    .map_err(|source| ServeError::Kafka {
                        what: "following a table partition",
                        source,
                    })?;
            }
        }
        if tpl.count() > 0 {
            reader
                .incremental_assign(&tpl)
                .map_err(|source| ServeError::Kafka {
                    what: "following table partitions",
                    source,
                })?;
        }
        Ok(())
    }

    /// Stops reading a partitioned table's partition when its stream partition goes.
    fn unfollow_table_partition(&mut self, partition: i32) {
        let Some(reader) = &self.table_reader else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        for source in &self.state_sources {
            if let Some(table) = &source.table
                && !table.replicated
                && self
                    .table_assignment
                    .remove(&(source.topic.clone(), partition))
            {
                let _ = tpl.add_partition(&source.topic, partition);
            }
        }
        if tpl.count() > 0
            && let Err(error) = reader.incremental_unassign(&tpl)
        {
            tracing::warn!(%error, "unassigning table partitions");
        }
    }

    /// Applies table rows that arrived since the last call to the tasks that use
    /// them: the task of the same partition, or every task for a replicated table.
    fn poll_tables(&mut self) -> Result<(), ServeError> {
        let Some(reader) = &self.table_reader else {
            return Ok(());
        };
        let mut arrived: BTreeMap<(String, i32), Vec<RawRecord>> = BTreeMap::new();
        for _ in 0..10_000 {
            match reader.poll(Duration::ZERO) {
                Some(Ok(message)) => arrived
                    .entry((message.topic().to_owned(), message.partition()))
                    .or_default()
                    .push((
                        message.key().map(<[u8]>::to_vec),
                        message.payload().map(<[u8]>::to_vec),
                    )),
                Some(Err(error)) => {
                    tracing::warn!(%error, "reading table updates");
                    break;
                }
                None => break,
            }
        }
        for ((topic, partition), records) in arrived {
            for source in self.state_sources.iter().filter(|s| s.topic == topic) {
                let Some(spec) = &source.table else { continue };
                let changes = table_changes(spec, records.clone());
                let targets: Vec<i32> = if spec.replicated {
                    self.tasks.keys().copied().collect()
                } else {
                    vec![partition]
                };
                for target in targets {
                    if let Some(task) = self.tasks.get_mut(&target) {
                        task.update_table(&source.step, changes.clone())
                            .map_err(ServeError::Runtime)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Partitions that are not live yet but have nothing to consume become live.
    fn mark_idle_partitions_live(&mut self, consumer: &BaseConsumer<ConsumerCtx>) {
        let waiting: Vec<i32> = self
            .tasks
            .keys()
            .filter(|p| !self.live.contains(p))
            .copied()
            .collect();
        if waiting.is_empty() {
            return;
        }
        let Ok(positions) = consumer.position() else {
            return;
        };
        for partition in waiting {
            let topic = &self.stage.input.topic;
            let Ok((low, high)) =
                consumer.fetch_watermarks(topic, partition, Duration::from_secs(1))
            else {
                continue;
            };
            let idle = match positions
                .find_partition(topic, partition)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(next)) => next >= high,
                // No position yet: idle only if the partition holds nothing to read
                // past the committed offset (or nothing at all).
                _ => high == low || self.committed.get(&partition).is_some_and(|c| *c >= high),
            };
            if idle {
                self.live.insert(partition);
            }
        }
    }

    fn offsets_list(
        &self,
        positions: &BTreeMap<i32, i64>,
    ) -> Result<TopicPartitionList, ServeError> {
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
    fn changelog_positions_of(&self, partition: i32) -> BTreeMap<String, i64> {
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
    fn commit(
        &mut self,
        consumer: &BaseConsumer<ConsumerCtx>,
        reason: &'static str,
    ) -> Result<(), ServeError> {
        let started = Instant::now();
        let result = if self.exactly_once {
            self.commit_transaction(consumer)
        } else {
            self.commit_at_least_once(consumer)
        };
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

    fn commit_transaction(
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

    fn commit_at_least_once(
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
    fn check_deliveries(&self) -> Result<(), ServeError> {
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
    /// [`Core::commit_settled`] commits them once the epoch is acknowledged.
    fn commit_interval(&mut self, consumer: &BaseConsumer<ConsumerCtx>) -> Result<(), ServeError> {
        if self.exactly_once {
            return self.commit(consumer, "interval");
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
        self.commit_settled(consumer)
    }

    /// At-least-once: commits, without waiting, the positions of the latest
    /// sealed epoch whose records (and every earlier epoch's) are acknowledged.
    fn commit_settled(&mut self, consumer: &BaseConsumer<ConsumerCtx>) -> Result<(), ServeError> {
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
    fn abort_open_transaction(&mut self) {
        if self.exactly_once && self.in_transaction {
            if let Err(error) = self.outbox.producer.abort_transaction(KAFKA_TIMEOUT) {
                tracing::error!(%error, "aborting the transaction failed");
            }
            self.in_transaction = false;
        }
    }

    /// After an aborted transaction: state and positions go back to the last commit.
    fn rewind(&mut self, consumer: &BaseConsumer<ConsumerCtx>) -> Result<(), ServeError> {
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
        self.add_tasks(consumer, &partitions)?;
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

    /// Commits at a barrier and reports, for every assigned partition, the next
    /// input offset and the changelog positions committed with it. Partitions not
    /// processed since their assignment are committed at their start (resolved to
    /// an offset when the group has none), so the group's offsets are the checkpoint.
    fn checkpoint(
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
    fn stop(&mut self, consumer: &BaseConsumer<ConsumerCtx>) -> Result<(), ServeError> {
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
    fn resume(&mut self, consumer: &BaseConsumer<ConsumerCtx>) -> Result<(), ServeError> {
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

    fn set_stopped(&mut self, stopped: bool) {
        self.stopped = stopped;
        self.shared.stopped.store(stopped, Ordering::SeqCst);
        self.shared
            .metrics
            .lock()
            .map(|m| m.stopped.set(i64::from(stopped)))
            .ok();
    }

    fn publish_metrics(&mut self) {
        let mut totals: BTreeMap<String, StepMetrics> = self.retired.clone();
        let mut entries: BTreeMap<String, usize> = BTreeMap::new();
        for task in self.tasks.values() {
            add_task_metrics(&mut totals, task);
            for (step, count) in task.state_entries() {
                *entries.entry(step).or_default() += count;
            }
        }
        let totals: Vec<StepMetrics> = totals.into_values().collect();
        if let Ok(mut m) = self.shared.metrics.lock() {
            m.record_steps(&totals);
            for (step, count) in entries {
                m.state_entries
                    .with_label_values(&[&step])
                    .set(count as i64);
            }
            for (topic, skipped) in &self.suppression.skipped {
                let counter = m.suppressed_records.with_label_values(&[topic]);
                counter.inc_by(skipped.saturating_sub(counter.get()));
            }
        }
        self.suppression.report();
    }
}

/// Adds a task's per-step counters (its source check included) to `totals`.
/// Whether every partition of the stage's input already carries this restore's
/// marker: nothing will be replayed, so the sink scan of a replay suppression
/// (which grows with the time since the checkpoint) is skipped on a restart.
fn restore_applied_everywhere(
    args: &ServeArgs,
    stage: &PlanStage,
    plan: &RestorePlan,
) -> Result<bool, ServeError> {
    let mut config = config::restore_reader(args, &stage.consumer_group);
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

/// A group's committed offset (if any) and its metadata, per partition of `topic`.
fn committed_in_group<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partitions: &[i32],
) -> Result<BTreeMap<i32, (Option<i64>, CommitMetadata)>, ServeError> {
    let mut tpl = TopicPartitionList::new();
    for &partition in partitions {
        tpl.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(tpl, KAFKA_TIMEOUT)
        .map_err(|source| ServeError::Kafka {
            what: "reading the group's committed offsets",
            source,
        })?;
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

fn add_task_metrics(totals: &mut BTreeMap<String, StepMetrics>, task: &StageTask) {
    for metrics in std::iter::once(task.source_metrics()).chain(task.step_metrics()) {
        let total = totals
            .entry(metrics.name.clone())
            .or_insert_with(|| StepMetrics {
                name: metrics.name.clone(),
                ..StepMetrics::default()
            });
        total.events_in += metrics.events_in;
        total.events_out += metrics.events_out;
        total.dropped += metrics.dropped;
        total.dead_lettered += metrics.dead_lettered;
    }
}

fn task_has_output(_task: &StageTask) -> bool {
    // Draining is cheap when nothing was produced; always drain.
    true
}

/// Turns table-topic records (JSON rows) into the join operator's state records,
/// keyed as the operator keys rows. A tombstone's key is the key value itself
/// (a single key field) or a JSON array of the key values.
fn table_changes(spec: &TableSpec, records: Vec<RawRecord>) -> Vec<StateChange> {
    let table = Table::new(spec);
    let mut changes = Vec::with_capacity(records.len());
    for (key, value) in records {
        match value {
            Some(bytes) => match sonic_rs::from_slice::<sonic_rs::Value>(&bytes) {
                Ok(row) => match table.row_key(&row) {
                    Ok(row_key) => changes.push(StateChange::upsert(row_key, bytes)),
                    Err(reason) => {
                        tracing::warn!(table = spec.name, reason, "skipping a table row")
                    }
                },
                Err(error) => {
                    tracing::warn!(table = spec.name, %error, "skipping a table row that is not JSON")
                }
            },
            None => {
                let Some(key) = key else { continue };
                let Some(row) = key_row(spec, &key) else {
                    continue;
                };
                if let Ok(row_key) = table.row_key(&row) {
                    changes.push(StateChange::delete(row_key));
                }
            }
        }
    }
    changes
}

fn key_row(spec: &TableSpec, key: &[u8]) -> Option<sonic_rs::Value> {
    let values: Vec<sonic_rs::Value> = if spec.key.len() == 1 {
        let text = std::str::from_utf8(key).ok()?;
        vec![sonic_rs::from_str(text).unwrap_or_else(|_| sonic_rs::Value::from(text))]
    } else {
        sonic_rs::from_slice(key).ok()?
    };
    let mut row = sonic_rs::Object::new();
    for (field, value) in spec.key.iter().zip(values) {
        row.insert(field, value);
    }
    Some(row.into_value())
}

/// The Kafka record key of an event: the single key field's text (strings as
/// is, other values as JSON), or a JSON array of the key values. `None` when a
/// key field is missing or there are no key fields.
fn record_key(event: &Event, fields: &[FieldPath]) -> Option<Vec<u8>> {
    match fields {
        [] => None,
        [single] => {
            let value = single.get(&event.value)?;
            Some(match value.as_str() {
                Some(text) => text.as_bytes().to_vec(),
                None => sonic_rs::to_vec(value).ok()?,
            })
        }
        many => {
            let mut values = Vec::with_capacity(many.len());
            for field in many {
                values.push(field.get(&event.value)?.clone());
            }
            sonic_rs::to_vec(&values).ok()
        }
    }
}

/// Runs the stage until shutdown is requested (or a fatal error).
pub fn run(
    args: &ServeArgs,
    plan: Arc<Plan>,
    stage: PlanStage,
    shared: Arc<Shared>,
    restore: Option<RestorePlan>,
    controls: mpsc::Receiver<Control>,
) -> Result<(), ServeError> {
    let exactly_once = plan.delivery == Delivery::ExactlyOnce;
    let last_stage = plan.stages.last().is_some_and(|s| s.name == stage.name);
    let route = match &stage.output {
        StageOutput::Repartition { topic, key } => Route::Repartition {
            topic: topic.clone(),
            key: key.iter().map(|k| FieldPath::new(k)).collect(),
        },
        StageOutput::Sinks => {
            let mut sinks = Vec::new();
            for sink in &plan.sinks {
                match &sink.spec.kafka {
                    Some(kafka) => {
                        let key = if kafka.key.is_empty() {
                            &sink.key
                        } else {
                            &kafka.key
                        };
                        sinks.push((
                            kafka.topic.clone(),
                            key.iter().map(|k| FieldPath::new(k)).collect(),
                        ));
                    }
                    None => return Err(ServeError::UnsupportedSink(sink.name.clone())),
                }
            }
            debug_assert!(last_stage);
            Route::Sinks(sinks)
        }
    };
    let state_sources: Vec<StateSource> = stage
        .steps
        .iter()
        .filter_map(|step| {
            let state = step.state.as_ref();
            match step.operator.single() {
                Some(Op::Join(join)) => Some(StateSource {
                    step: step.name.clone(),
                    topic: join.table.topic.clone(),
                    table: Some(join.table.clone()),
                }),
                Some(Op::Enrich(enrich)) => Some(StateSource {
                    step: step.name.clone(),
                    topic: enrich.table.topic.clone(),
                    table: Some(enrich.table.clone()),
                }),
                _ => state.map(|state| StateSource {
                    step: step.name.clone(),
                    topic: state.changelog_topic.clone(),
                    table: None,
                }),
            }
        })
        .collect();

    // One transactional id per stage instance: a restarted instance fences its
    // previous incarnation (a zombie) when it initializes transactions.
    let transactional_id = format!("{}.{}", stage.consumer_group, args.instance_id);
    let outbox = Outbox::create(&config::producer(
        args,
        exactly_once.then_some(&transactional_id),
    ))?;
    if exactly_once {
        outbox
            .producer
            .init_transactions(KAFKA_TIMEOUT)
            .map_err(|source| ServeError::Kafka {
                what: "initializing transactions",
                source,
            })?;
    }

    let table_reader = if state_sources
        .iter()
        .any(|s: &StateSource| s.table.is_some())
    {
        Some(
            config::restore_reader(args, &stage.consumer_group)
                .create::<BaseConsumer>()
                .map_err(|source| ServeError::Kafka {
                    what: "creating the table reader",
                    source,
                })?,
        )
    } else {
        None
    };
    let start_from_earliest = plan.source.start_from
        == keystone_crds::pipeline::StartPosition::Earliest
        || !stage.input.topic.eq(&plan.source.topic);
    // Before anything is processed: what the sinks already hold past the checkpoint.
    let suppress = match restore.as_ref() {
        Some(wanted)
            if wanted.suppress.is_some() && !restore_applied_everywhere(args, &stage, wanted)? =>
        {
            wanted.suppress.as_ref()
        }
        _ => None,
    };
    let suppression = match (suppress, &route) {
        (Some(suppress), Route::Sinks(sinks)) => Suppression::load(
            &config::restore_reader(args, &stage.consumer_group),
            suppress,
            sinks,
        )?,
        _ => Suppression::default(),
    };
    let reads_source = stage.input.topic == plan.source.topic;
    let core = Arc::new(Mutex::new(Core {
        reads_source,
        restore_config: config::restore_reader(args, &stage.consumer_group),
        plan: plan.clone(),
        stage: stage.clone(),
        exactly_once,
        outbox,
        sealed: VecDeque::new(),
        route,
        state_sources,
        tasks: BTreeMap::new(),
        table_reader,
        table_assignment: BTreeSet::new(),
        live: BTreeSet::new(),
        positions: BTreeMap::new(),
        committed: BTreeMap::new(),
        in_transaction: false,
        retired: BTreeMap::new(),
        shared: shared.clone(),
        fatal: None,
        instance_id: args.instance_id.clone(),
        plan_hash: plan.hash(),
        start_from_earliest,
        restore: restore.as_ref().map(|r| ActiveRestore::new(r, &stage.name)),
        pending_restores: BTreeMap::new(),
        uncommitted_restores: Vec::new(),
        changelog_ends: BTreeMap::new(),
        stopped: false,
        suppression,
    }));
    let consumer: BaseConsumer<ConsumerCtx> = config::consumer(
        args,
        &stage.consumer_group,
        exactly_once,
        start_from_earliest,
    )
    .create_with_context(ConsumerCtx {
        core: core.clone(),
        shared: shared.clone(),
    })
    .map_err(|source| ServeError::Kafka {
        what: "creating the consumer",
        source,
    })?;
    consumer
        .subscribe(&[&stage.input.topic])
        .map_err(|source| ServeError::Kafka {
            what: "subscribing to the input topic",
            source,
        })?;
    shared.running.store(true, Ordering::SeqCst);
    tracing::info!(
        stage = stage.name,
        topic = stage.input.topic,
        exactly_once,
        "consuming"
    );

    let commit_interval = Duration::from_millis(plan.commit_interval_ms.max(10));
    let mut last_commit = Instant::now();
    let mut last_lag = Instant::now();
    let mut lag_reported = false;
    let mut consecutive_failures = 0u32;
    loop {
        if let Some(error) = core.lock().unwrap_or_else(|p| p.into_inner()).fatal.take() {
            return Err(error);
        }
        if shared.shutdown.load(Ordering::SeqCst) {
            break;
        }
        // Poll a batch, grouped by partition in arrival (offset) order: what is
        // fetched already, without waiting for more once there is something (a
        // batch waits for nothing, so latency is not traded for batch size). The
        // lock is not held while polling: rebalance callbacks take it inside `poll`.
        let mut batch: BTreeMap<i32, Records> = BTreeMap::new();
        let mut polled = 0;
        while polled < MAX_BATCH {
            match consumer.poll(if polled == 0 {
                Duration::from_millis(50)
            } else {
                Duration::ZERO
            }) {
                Some(Ok(message)) => {
                    // The first stage's events come from the source itself; later
                    // stages read it from the repartition record's headers.
                    let source = if reads_source {
                        Some(Provenance {
                            partition: message.partition(),
                            offset: message.offset(),
                        })
                    } else {
                        provenance_of(&message)
                    };
                    batch.entry(message.partition()).or_default().push((
                        message.offset(),
                        message.payload().map(<[u8]>::to_vec),
                        source,
                    ));
                    polled += 1;
                }
                Some(Err(error)) => {
                    // Transient broker conditions (a leader moving, a broker down) are
                    // retried inside librdkafka; they are only reported here.
                    tracing::warn!(%error, "consumer error");
                    break;
                }
                None => break,
            }
        }

        let mut guard = core.lock().unwrap_or_else(|p| p.into_inner());
        let core = &mut *guard;
        // A rebalance inside this poll may have failed (a partition's restore):
        // nothing polled after it may be processed.
        if let Some(error) = core.fatal.take() {
            return Err(error);
        }
        // Table rows first, so that events see every row that arrived before them.
        let mut step_result = core.poll_tables();
        if core.stopped {
            // Records fetched before the pause took effect: dropped, and read
            // again from the committed offsets on resume.
            batch.clear();
        }
        for (partition, records) in batch {
            if step_result.is_err() {
                break;
            }
            step_result = core.process(partition, records);
        }
        if step_result.is_ok() && !core.stopped {
            step_result = core.tick();
        }
        let control = controls.try_recv().ok();
        if step_result.is_ok() && !exactly_once && !core.sealed.is_empty() {
            step_result = core.commit_settled(&consumer);
        }
        if step_result.is_ok() && (last_commit.elapsed() >= commit_interval || control.is_some()) {
            step_result = match control {
                Some(Control::Checkpoint { stop, reply }) => {
                    let result = core.checkpoint(&consumer, stop);
                    let _ =
                        reply.send(result.as_ref().map(Clone::clone).map_err(|e| e.to_string()));
                    result.map(|_| ())
                }
                Some(Control::Resume { reply }) => {
                    let result = core
                        .commit(&consumer, "resume")
                        .and_then(|()| core.resume(&consumer));
                    let _ = reply.send(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                    result
                }
                None => core.commit_interval(&consumer),
            };
            last_commit = Instant::now();
        }
        match step_result {
            Ok(()) => consecutive_failures = 0,
            Err(error) if error.is_fatal() => return Err(error),
            Err(error) => {
                consecutive_failures += 1;
                tracing::error!(%error, consecutive_failures, "processing or commit failed; going back to the last commit");
                core.abort_open_transaction();
                if consecutive_failures > COMMIT_RETRIES {
                    return Err(error);
                }
                std::thread::sleep(Duration::from_millis(200 << consecutive_failures.min(5)));
                core.rewind(&consumer)?;
            }
        }
        if polled == 0 {
            core.mark_idle_partitions_live(&consumer);
        }
        // Lag needs a broker round trip per partition: every 5 s, and once as soon
        // as there is a first commit to measure from.
        if last_lag.elapsed() >= Duration::from_secs(5)
            || (!lag_reported && !core.committed.is_empty())
        {
            update_lag(&consumer, core);
            lag_reported = !core.committed.is_empty();
            last_lag = Instant::now();
        }
        core.publish_metrics();
    }

    // Shutdown: commit what was processed, then leave.
    let mut core = core.lock().unwrap_or_else(|p| p.into_inner());
    core.commit(&consumer, "shutdown")?;
    core.publish_metrics();
    shared.running.store(false, Ordering::SeqCst);
    tracing::info!("stopped after a final commit");
    Ok(())
}

fn update_lag(consumer: &BaseConsumer<ConsumerCtx>, core: &Core) {
    let Ok(metrics) = core.shared.metrics.lock() else {
        return;
    };
    for (&partition, &position) in &core.committed {
        if let Ok((_, high)) =
            consumer.fetch_watermarks(&core.stage.input.topic, partition, Duration::from_secs(1))
        {
            metrics
                .consumer_lag
                .with_label_values(&[&partition.to_string()])
                .set((high - position).max(0));
        }
    }
}

fn assign(consumer: &BaseConsumer<ConsumerCtx>, tpl: &TopicPartitionList) -> KafkaResult<()> {
    match consumer.rebalance_protocol() {
        RebalanceProtocol::Cooperative => consumer.incremental_assign(tpl),
        _ => consumer.assign(tpl),
    }
}

fn unassign(consumer: &BaseConsumer<ConsumerCtx>, tpl: &TopicPartitionList) -> KafkaResult<()> {
    match consumer.rebalance_protocol() {
        RebalanceProtocol::Cooperative => consumer.incremental_unassign(tpl),
        _ => consumer.unassign(),
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::Timestamp;
    use rdkafka::message::OwnedMessage;

    use super::*;

    fn message(headers: Option<OwnedHeaders>) -> OwnedMessage {
        OwnedMessage::new(
            None,
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            0,
            headers,
        )
    }

    #[test]
    fn provenance_round_trips_through_headers() {
        let source = Provenance {
            partition: 7,
            offset: 1_234_567_890_123,
        };
        let headers = provenance_headers(Some(source));
        assert_eq!(provenance_of(&message(headers)), Some(source));
        assert_eq!(provenance_headers(None).map(|h| h.count()), None);
        assert_eq!(provenance_of(&message(None)), None);
        let partial = OwnedHeaders::new().insert(Header {
            key: SOURCE_PARTITION_HEADER,
            value: Some("3"),
        });
        assert_eq!(provenance_of(&message(Some(partial))), None);
    }

    #[test]
    fn suppression_skips_only_what_the_topic_holds() {
        let held = Provenance {
            partition: 1,
            offset: 5,
        };
        let mut suppression = Suppression {
            delivered: HashMap::from([("out".to_owned(), HashSet::from([held]))]),
            ..Suppression::default()
        };
        assert!(suppression.holds("out", Some(held)));
        assert!(!suppression.holds("other", Some(held)));
        assert!(!suppression.holds("out", Some(Provenance { offset: 6, ..held })));
        assert!(!suppression.holds("out", None));
        assert_eq!(suppression.skipped, BTreeMap::from([("out".to_owned(), 1)]));
    }
}
