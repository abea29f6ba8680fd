//! The processing path of a stage: one task per assigned input partition, the
//! events it produces routed to the next stage's topic or to the sinks, dead
//! letters with their headers, and the stage's metrics.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use keystone_crds::ops::TableSpec;
use keystone_crds::plan::{Plan, PlanStage};
use rdkafka::ClientConfig;
use rdkafka::Offset;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};

use crate::clock::SystemClock;
use crate::connectors::SinkOutput;
use crate::event::record_key;
use crate::event::{DeadLetter, FieldPath, Provenance, too_large_to_write};
use crate::host::commit::SealedEpoch;
use crate::host::parse::{self, Parsed};
use crate::host::rebalance::ConsumerCtx;
use crate::host::restore::ActiveRestore;
use crate::host::sinks::Sinks;
use crate::host::tables::Tables;
use crate::host::{ServeError, Shared};
use crate::kafka::outbox::Outbox;
use crate::kafka::records::provenance_headers;
use crate::task::{SourceCheck, StageTask, StepMetrics, TaskOptions};

/// Records of one input partition as polled: offset, value and the source record
/// they come from.
pub(super) type Records = Vec<(i64, Option<Vec<u8>>, Option<Provenance>)>;

/// Where the stage's events go.
pub(super) enum Route {
    Repartition { topic: String, key: Vec<FieldPath> },
    Sinks(Sinks),
}

/// A step whose state is restored from a topic.
pub(super) struct StateSource {
    pub(super) step: String,
    pub(super) topic: String,
    /// A join/enrich table: records are rows, keyed by the table's key fields.
    pub(super) table: Option<TableSpec>,
}

/// Everything the loop and the rebalance callbacks share.
pub(super) struct Core {
    pub(super) plan: Arc<Plan>,
    pub(super) stage: PlanStage,
    pub(super) exactly_once: bool,
    pub(super) reads_source: bool,
    pub(super) outbox: Arc<Outbox>,
    /// At-least-once: epochs sealed at an interval commit, oldest first, with the
    /// positions to commit once their records are acknowledged.
    pub(super) sealed: VecDeque<SealedEpoch>,
    pub(super) restore_config: ClientConfig,
    pub(super) route: Route,
    pub(super) state_sources: Vec<StateSource>,
    pub(super) tasks: BTreeMap<i32, StageTask>,
    /// Parses and checks input for every task (their source check, shared
    /// with the thread that parses ahead).
    pub(super) checker: Arc<SourceCheck>,
    pub(super) tables: Tables,
    /// Partitions whose timers may fire: they processed input since they were
    /// (re)assigned, or have none waiting. Until then a restored task's
    /// processing-time timers would count the downtime as waiting time and release
    /// held-back events ahead of predecessors that are next in the partition.
    pub(super) live: BTreeSet<i32>,
    /// Next offset to consume per partition, for the next commit.
    pub(super) positions: BTreeMap<i32, i64>,
    /// Offsets covered by the last successful commit.
    pub(super) committed: BTreeMap<i32, i64>,
    pub(super) in_transaction: bool,
    /// When the open transaction began, and how many records the producer had
    /// sent by then (so that an empty transaction, unknown to the broker, can be
    /// told apart).
    pub(super) transaction_began: Option<(std::time::Instant, u64)>,
    /// The broker aborts (and fences) a transaction open longer than this.
    pub(super) transaction_timeout: Duration,
    pub(super) retired: BTreeMap<String, StepMetrics>,
    pub(super) shared: Arc<Shared>,
    pub(super) fatal: Option<ServeError>,
    /// Reported in checkpoints.
    pub(super) instance_id: String,
    pub(super) plan_hash: String,
    /// Where a partition without committed offsets starts (`auto.offset.reset`).
    pub(super) start_from_earliest: bool,
    /// The `--restore` plan, if any.
    pub(super) restore: Option<ActiveRestore>,
    /// Assigned partitions whose restore is applied before they are processed,
    /// with the offset their input starts at.
    pub(super) pending_restores: BTreeMap<i32, i64>,
    /// Partitions restored whose start offset (and compensations) are not committed yet.
    pub(super) uncommitted_restores: Vec<i32>,
    /// Per changelog partition, the end its last restore read up to: its position
    /// as long as this instance wrote nothing to it.
    pub(super) changelog_ends: BTreeMap<(String, i32), i64>,
    /// Processing stopped after a checkpoint: partitions paused, no output.
    pub(super) stopped: bool,
    /// The last interval commit found a sink not prepared: nothing was committed.
    pub(super) sinks_pending: bool,
    /// Intake paused because a sink is backpressured or not prepared yet.
    pub(super) held: bool,
    /// Whether intake is paused because held-back events reached the limit
    /// (timers go on: they are what makes room).
    pub(super) buffers: crate::buffers::IntakeGate,
}

impl Core {
    pub(super) fn new_task(&self) -> Result<StageTask, ServeError> {
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

    /// Processes a polled batch, partition by partition in offset order,
    /// parsing ahead of the steps on a second thread (see [`parse`](super::parse)).
    pub(super) fn process(&mut self, batch: BTreeMap<i32, Records>) -> Result<(), ServeError> {
        let checker = self.checker.clone();
        parse::parse_ahead(&checker, batch, |parsed| self.process_parsed(parsed))
    }

    /// Runs one partition's parsed records through its task and routes what
    /// comes out.
    fn process_parsed(&mut self, parsed: Parsed) -> Result<(), ServeError> {
        let Parsed {
            partition,
            last_offset,
            mut offsets,
            checked,
        } = parsed;
        if !self.tasks.contains_key(&partition) {
            // Records of a partition revoked while they were buffered: the new
            // owner reprocesses them from the committed offset.
            return Ok(());
        }
        self.begin_if_needed()?;
        let Some(task) = self.tasks.get_mut(&partition) else {
            return Ok(());
        };
        // Dead letters find their offsets again by their original bytes.
        task.push_checked(checked);
        let input_topic = self.stage.input.topic.clone();
        self.drain(partition, &input_topic, &mut offsets)?;
        self.positions.insert(partition, last_offset + 1);
        self.live.insert(partition);
        Ok(())
    }

    /// Fires every task's timers (releases held-back events, expires state).
    pub(super) fn tick(&mut self) -> Result<(), ServeError> {
        let partitions: Vec<i32> = self.live.iter().copied().collect();
        let input_topic = self.stage.input.topic.clone();
        for partition in partitions {
            if let Some(task) = self.tasks.get_mut(&partition) {
                // Draining is cheap when nothing was produced: always drain.
                task.tick();
                self.begin_if_needed()?;
                self.drain(partition, &input_topic, &mut OffsetLookup::default())?;
            }
        }
        Ok(())
    }

    /// Sends what a task produced: events, dead letters, changelog records.
    pub(super) fn drain(
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
        let serialize = match &self.route {
            Route::Repartition { .. } => true,
            Route::Sinks(sinks) => sinks.takes_serialized(),
        };
        for event in events {
            // Columns (the lake sinks) read the document itself.
            let value = if serialize {
                sonic_rs::to_vec(&event.value).unwrap_or_default()
            } else {
                Vec::new()
            };
            if let Some(reason) = too_large_to_write(value.len()) {
                let step = match self.route {
                    Route::Repartition { .. } => "repartition",
                    Route::Sinks(_) => "sinks",
                };
                dead_letters.push(DeadLetter {
                    step: step.to_owned(),
                    reason,
                    original: event.raw,
                });
                continue;
            }
            match &mut self.route {
                Route::Repartition { topic, key } => match record_key(&event, key) {
                    Some(key) => self.outbox.send(
                        topic,
                        Some(&key),
                        Some(&value),
                        None,
                        provenance_headers(event.source),
                    )?,
                    None => dead_letters.push(DeadLetter {
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
                    let mut refused = SinkOutput::default();
                    sinks.write(&event, &value, &mut refused)?;
                    dead_letters.extend(refused.dead_letters);
                }
            }
        }
        for letter in dead_letters {
            let offset = offsets.take(&letter.original);
            self.send_dead_letter(&letter, input_topic, Some(partition), offset)?;
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

    /// Writes a dead letter with the reason, the step and where it was read
    /// (partition and offset of the stage's input, when known).
    pub(super) fn send_dead_letter(
        &mut self,
        letter: &DeadLetter,
        input_topic: &str,
        partition: Option<i32>,
        offset: Option<i64>,
    ) -> Result<(), ServeError> {
        let partition_text = partition.unwrap_or(-1).to_string();
        let offset_text = offset.unwrap_or(-1).to_string();
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
        Ok(())
    }

    /// Partitions that are not live yet but have nothing to consume become live.
    pub(super) fn mark_idle_partitions_live(&mut self, consumer: &BaseConsumer<ConsumerCtx>) {
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

    pub(super) fn publish_metrics(&mut self) {
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
        }
    }
}

/// Adds a task's per-step counters (its source check included) to `totals`.
pub(super) fn add_task_metrics(totals: &mut BTreeMap<String, StepMetrics>, task: &StageTask) {
    for metrics in std::iter::once(task.source_metrics()).chain(task.step_metrics()) {
        let total = totals
            .entry(metrics.name.clone())
            .or_insert_with(|| StepMetrics {
                name: metrics.name.clone(),
                ..StepMetrics::default()
            });
        total.add(metrics);
    }
}

/// Offsets of a batch's records by a hash of their bytes, to name the offset of a
/// dead letter, which carries only the original bytes. Byte-identical records
/// (redeliveries) are matched in offset order.
#[derive(Default)]
pub(super) struct OffsetLookup {
    recorded: Vec<(u64, i64)>,
    /// Built on the first lookup: most batches have no dead letter.
    by_hash: Option<HashMap<u64, std::collections::VecDeque<i64>>>,
}

impl OffsetLookup {
    pub(super) fn record(&mut self, payload: &[u8], offset: i64) {
        self.recorded
            .push((xxhash_rust::xxh3::xxh3_64(payload), offset));
    }

    pub(super) fn take(&mut self, original: &[u8]) -> Option<i64> {
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
