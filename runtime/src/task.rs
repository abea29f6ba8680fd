//! The task runner: one chain instance of a stage. On Kafka there is one task per
//! input partition; in local mode one per stage. The runner, not the operators,
//! owns parsing, source-schema and required-field checks, batching, timers,
//! metrics and the collection of changelog records.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keystone_crds::ops::Operator as Op;
use keystone_crds::plan::PlanStage;
use keystone_crds::processor::RequiredField;
use keystone_crds::schema::{FieldType, SchemaSpec};

use crate::avro::AvroDecoder;
use crate::clock::Clock;
use crate::error::RuntimeError;
use crate::event::{DeadLetter, Event, Provenance};
use crate::operator::{Ctx, Operator, Output};
use crate::ops::{self, Table};
use crate::schema::Validator;
use crate::state::StateChange;

/// The name dead letters of unparseable or schema-violating input carry as their step.
pub const SOURCE_STEP: &str = "source";

/// How a task runs.
#[derive(Clone, Copy, Debug)]
pub struct TaskOptions {
    /// Keep every state change for the changelog (Kafka). Off in local mode.
    pub record_changes: bool,
}

/// Counters of one step (or of the source check, named `source`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepMetrics {
    pub name: String,
    pub events_in: u64,
    pub events_out: u64,
    pub dropped: u64,
    pub dead_lettered: u64,
    /// Time spent in the step's checks and operator.
    pub busy: Duration,
}

impl StepMetrics {
    /// Adds `other`'s counts and busy time (not its name).
    pub fn add(&mut self, other: &StepMetrics) {
        self.events_in += other.events_in;
        self.events_out += other.events_out;
        self.dropped += other.dropped;
        self.dead_lettered += other.dead_lettered;
        self.busy += other.busy;
    }

    /// Events in per second of busy time.
    pub fn throughput(&self) -> Option<f64> {
        let secs = self.busy.as_secs_f64();
        (secs > 0.0 && self.events_in > 0).then(|| self.events_in as f64 / secs)
    }
}

/// One record for a step's changelog topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangelogRecord {
    /// Index of the step in the stage.
    pub step: usize,
    pub change: StateChange,
}

struct Step {
    requires: Validator,
    op: Box<dyn Operator>,
    out: Output,
    metrics: StepMetrics,
    changelog_topic: Option<String>,
}

/// Parsing of raw input and the source-schema check: the part of a stage's work
/// that needs none of its steps' state, so that local mode can run it on its own
/// thread ahead of the steps.
pub struct SourceCheck {
    schema: Option<Validator>,
    /// Reads Avro records (the registry's wire format) instead of JSON.
    avro: Option<Arc<AvroDecoder>>,
    metrics: StepMetrics,
}

impl SourceCheck {
    /// Checks every event against `schema` when given; without it, only parses.
    pub fn new(schema: Option<&SchemaSpec>) -> Self {
        Self {
            schema: schema.map(Validator::for_source),
            avro: None,
            metrics: StepMetrics {
                name: SOURCE_STEP.to_owned(),
                ..StepMetrics::default()
            },
        }
    }

    /// Reads input as Avro records with `decoder` (whose writer schemas the
    /// caller fetches before each batch) rather than as JSON.
    pub fn reading_avro(mut self, decoder: Arc<AvroDecoder>) -> Self {
        self.avro = Some(decoder);
        self
    }

    /// Parses raw input (one JSON object each, or one Avro record with
    /// [`reading_avro`](Self::reading_avro)) and checks the source schema.
    /// Unparseable or invalid input is appended to `dead_letters` as step `source`;
    /// the events carry the source record they come from.
    pub fn check(
        &mut self,
        records: impl IntoIterator<Item = (Vec<u8>, Option<Provenance>)>,
        dead_letters: &mut Vec<DeadLetter>,
    ) -> Vec<Event> {
        let checked = self.check_apart(records);
        self.metrics.add(&checked.metrics);
        dead_letters.extend(checked.dead_letters);
        checked.events
    }

    /// As [`check`](Self::check), without touching this checker: what it
    /// found and counted comes back whole, for the task that takes it
    /// ([`StageTask::push_checked`]). A serving stage checks on another
    /// thread than its steps this way.
    pub fn check_apart(
        &self,
        records: impl IntoIterator<Item = (Vec<u8>, Option<Provenance>)>,
    ) -> Checked {
        let started = Instant::now();
        let mut checked = Checked::default();
        for (raw, source) in records {
            checked.metrics.events_in += 1;
            let parsed = match &self.avro {
                Some(decoder) => decoder.decode(raw),
                None => Event::parse(raw),
            };
            let refused = match parsed {
                Ok(mut event) => match self.schema.as_ref().map(|v| v.check(&event.value)) {
                    Some(Err(reason)) => Some((event.raw, reason)),
                    _ => {
                        event.source = source;
                        checked.events.push(event);
                        None
                    }
                },
                Err(refused) => Some(refused),
            };
            if let Some((original, reason)) = refused {
                checked.metrics.dead_lettered += 1;
                checked.dead_letters.push(DeadLetter {
                    step: SOURCE_STEP.to_owned(),
                    reason,
                    original,
                });
            }
        }
        checked.metrics.events_out += checked.events.len() as u64;
        checked.metrics.busy += started.elapsed();
        checked
    }

    pub fn metrics(&self) -> &StepMetrics {
        &self.metrics
    }
}

/// Input parsed and checked apart from its task
/// ([`SourceCheck::check_apart`]): the events in input order, the refused
/// records as dead letters of step `source`, and the source check's counts.
#[derive(Debug, Default)]
pub struct Checked {
    pub events: Vec<Event>,
    pub dead_letters: Vec<DeadLetter>,
    pub metrics: StepMetrics,
}

/// One instance of a stage's chain of steps.
pub struct StageTask {
    name: String,
    source: SourceCheck,
    steps: Vec<Step>,
    clock: Arc<dyn Clock>,
    events: Vec<Event>,
    dead_letters: Vec<DeadLetter>,
    changelog: Vec<ChangelogRecord>,
    started: bool,
    /// At end of input, the step being closed.
    closing: usize,
}

impl StageTask {
    /// Builds the stage's operators. `source_schema` is checked on every input event
    /// when given (the stage that reads the pipeline's source). `tables` are the join
    /// and enrich tables by name.
    pub fn new(
        stage: &PlanStage,
        source_schema: Option<&SchemaSpec>,
        tables: &BTreeMap<String, Table>,
        clock: Arc<dyn Clock>,
        options: TaskOptions,
    ) -> Result<Self, RuntimeError> {
        // Requirements that the source check already proved need no second look:
        // a field the source schema declares non-optional, of a satisfying type, as
        // long as only steps that never change events (filter, dedup, order,
        // rekey) came before.
        let mut guaranteed: BTreeMap<&str, FieldType> = source_schema
            .map(|schema| {
                schema
                    .fields
                    .iter()
                    .filter(|f| !f.optional)
                    .map(|f| (f.name.as_str(), f.field_type))
                    .collect()
            })
            .unwrap_or_default();
        let steps = stage
            .steps
            .iter()
            .map(|step| {
                let unproven: Vec<RequiredField> = step
                    .requires
                    .iter()
                    .filter(|r| {
                        !guaranteed
                            .get(r.name.as_str())
                            .is_some_and(|t| t.satisfies(r.field_type))
                    })
                    .cloned()
                    .collect();
                let passes_events_unchanged = matches!(
                    step.operator.single(),
                    Some(Op::Filter(_) | Op::Dedup(_) | Op::Order(_) | Op::Rekey(_))
                );
                if !passes_events_unchanged {
                    guaranteed.clear();
                }
                Ok(Step {
                    requires: Validator::for_step(&unproven),
                    op: ops::build(step, tables)?,
                    out: Output::new(&step.name, options.record_changes),
                    metrics: StepMetrics {
                        name: step.name.clone(),
                        ..StepMetrics::default()
                    },
                    changelog_topic: step.state.as_ref().map(|s| s.changelog_topic.clone()),
                })
            })
            .collect::<Result<Vec<_>, RuntimeError>>()?;
        Ok(Self {
            name: stage.name.clone(),
            source: SourceCheck::new(source_schema),
            steps,
            clock,
            events: Vec::new(),
            dead_letters: Vec::new(),
            changelog: Vec::new(),
            started: false,
            closing: 0,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn ctx(&mut self) -> Ctx {
        let ctx = Ctx {
            now_ms: self.clock.now_ms(),
        };
        if !self.started {
            self.started = true;
            for step in &mut self.steps {
                step.op.on_start(&ctx);
            }
        }
        ctx
    }

    /// Parses raw input (one JSON object each), checks the source schema, and runs
    /// the batch through the steps, then the timers. Unparseable or invalid input
    /// becomes a dead letter of step `source`.
    pub fn push_raw(&mut self, raws: impl IntoIterator<Item = Vec<u8>>) {
        self.push_records(raws.into_iter().map(|raw| (raw, None)));
    }

    /// As [`push_raw`](Self::push_raw), with the source record each event comes
    /// from; the events carry it through every step.
    pub fn push_records(
        &mut self,
        records: impl IntoIterator<Item = (Vec<u8>, Option<Provenance>)>,
    ) {
        let batch = self.source.check(records, &mut self.dead_letters);
        self.push_events(batch);
    }

    /// Runs input checked apart ([`SourceCheck::check_apart`] with this
    /// task's source schema) through the steps, as
    /// [`push_records`](Self::push_records) would have.
    pub fn push_checked(&mut self, checked: Checked) {
        self.source.metrics.add(&checked.metrics);
        self.dead_letters.extend(checked.dead_letters);
        self.push_events(checked.events);
    }

    /// Runs parsed events (for example the previous stage's output in local mode)
    /// through the steps, then the timers.
    pub fn push_events(&mut self, batch: Vec<Event>) {
        let ctx = self.ctx();
        self.run_from(0, batch, &ctx);
        self.fire_timers(&ctx);
    }

    /// Fires every step's timer at the clock's current time.
    pub fn tick(&mut self) {
        let ctx = self.ctx();
        self.fire_timers(&ctx);
    }

    /// End of input: closes the steps in order, so that what one flushes passes
    /// through the steps after it before they close.
    pub fn finish(&mut self) {
        while self.finish_part() {}
    }

    /// End of input, a part at a time: flushes some of what the step being
    /// closed holds back and passes it through the steps after it. Returns
    /// whether there is more; the caller takes the events out in between, so
    /// that a step holding a lot never has all of it parsed at once.
    pub fn finish_part(&mut self) -> bool {
        let ctx = self.ctx();
        if self.closing == 0 {
            self.fire_timers(&ctx);
        }
        let Some(step) = self.steps.get_mut(self.closing) else {
            return false;
        };
        let started = Instant::now();
        step.op.on_close(&ctx, &mut step.out);
        step.metrics.busy += started.elapsed();
        let done = !step.op.holds_back();
        let index = self.closing;
        let produced = self.collect(index, Vec::new());
        self.run_from(index + 1, produced, &ctx);
        if done {
            self.closing += 1;
        }
        self.closing < self.steps.len()
    }

    fn fire_timers(&mut self, ctx: &Ctx) {
        for index in 0..self.steps.len() {
            let step = &mut self.steps[index];
            let started = Instant::now();
            step.op.on_timer(ctx, &mut step.out);
            step.metrics.busy += started.elapsed();
            let produced = self.collect(index, Vec::new());
            if !produced.is_empty() {
                self.run_from(index + 1, produced, ctx);
            }
        }
    }

    fn run_from(&mut self, start: usize, mut batch: Vec<Event>, ctx: &Ctx) {
        for index in start..self.steps.len() {
            if batch.is_empty() {
                return;
            }
            let step = &mut self.steps[index];
            step.metrics.events_in += batch.len() as u64;
            let started = Instant::now();
            if !step.requires.is_empty() {
                let mut valid = Vec::with_capacity(batch.len());
                for event in batch.drain(..) {
                    match step.requires.check(&event.value) {
                        Ok(()) => valid.push(event),
                        Err(reason) => step.out.dead_letter(event, reason),
                    }
                }
                batch = valid;
            }
            step.op.process_batch(&mut batch, ctx, &mut step.out);
            step.metrics.busy += started.elapsed();
            batch = self.collect(index, batch);
        }
        if self.events.is_empty() {
            self.events = batch;
        } else {
            self.events.append(&mut batch);
        }
    }

    /// Takes what step `index` produced, leaving `spare` (an empty vector whose
    /// capacity is reused) as its next output buffer.
    fn collect(&mut self, index: usize, mut spare: Vec<Event>) -> Vec<Event> {
        spare.clear();
        let step = &mut self.steps[index];
        let produced = std::mem::replace(&mut step.out.events, spare);
        step.metrics.events_out += produced.len() as u64;
        step.metrics.dropped += std::mem::take(&mut step.out.dropped);
        step.metrics.dead_lettered += step.out.dead_letters.len() as u64;
        self.dead_letters.append(&mut step.out.dead_letters);
        if !step.out.changes.is_empty() {
            self.changelog
                .extend(step.out.changes.drain(..).map(|change| ChangelogRecord {
                    step: index,
                    change,
                }));
        }
        produced
    }

    /// Events that left the last step since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    pub fn take_dead_letters(&mut self) -> Vec<DeadLetter> {
        std::mem::take(&mut self.dead_letters)
    }

    /// State changes since the last call, in the order they happened.
    pub fn take_changelog(&mut self) -> Vec<ChangelogRecord> {
        std::mem::take(&mut self.changelog)
    }

    /// The changelog topic of step `index`, if it keeps state.
    pub fn changelog_topic(&self, index: usize) -> Option<&str> {
        self.steps.get(index)?.changelog_topic.as_deref()
    }

    /// A full snapshot: for every stateful step, its name and its state as records.
    pub fn checkpoint(&self) -> Vec<(String, Vec<StateChange>)> {
        self.steps
            .iter()
            .filter(|s| s.op.is_stateful())
            .map(|s| (s.metrics.name.clone(), s.op.snapshot()))
            .collect()
    }

    /// Restores one step's state from a snapshot or its changelog.
    pub fn restore(&mut self, step: &str, changes: Vec<StateChange>) -> Result<(), RuntimeError> {
        self.step_named(step)?
            .op
            .restore(changes)
            .map_err(|source| RuntimeError::State {
                step: step.to_owned(),
                source,
            })
    }

    fn step_named(&mut self, step: &str) -> Result<&mut Step, RuntimeError> {
        let stage = &self.name;
        self.steps
            .iter_mut()
            .find(|s| s.metrics.name == step)
            .ok_or_else(|| RuntimeError::InvalidStep {
                step: step.to_owned(),
                message: format!("no such step in stage {stage}"),
            })
    }

    /// Applies table-topic rows that arrived while running to a join or enrich step.
    pub fn update_table(
        &mut self,
        step: &str,
        changes: Vec<StateChange>,
    ) -> Result<(), RuntimeError> {
        self.step_named(step)?
            .op
            .update_table(changes)
            .map_err(|source| RuntimeError::State {
                step: step.to_owned(),
                source,
            })
    }

    /// The source check's counters (meaningful for the stage that reads the source).
    pub fn source_metrics(&self) -> &StepMetrics {
        self.source.metrics()
    }

    pub fn step_metrics(&self) -> impl Iterator<Item = &StepMetrics> {
        self.steps.iter().map(|s| &s.metrics)
    }

    /// Live state entries per step, for metrics.
    /// Bytes of events its steps hold back.
    pub fn buffered_bytes(&self) -> u64 {
        self.steps
            .iter()
            .map(|s| s.op.buffered_bytes() as u64)
            .sum()
    }

    /// The clock's time, epoch milliseconds.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    pub fn state_entries(&self) -> Vec<(String, usize)> {
        self.steps
            .iter()
            .filter(|s| s.op.is_stateful())
            .map(|s| (s.metrics.name.clone(), s.op.state_entries()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sonic_rs::JsonValueTrait;

    use crate::clock::ManualClock;

    #[test]
    fn events_carry_their_source_record_through_held_back_releases() {
        let manifest = r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: p, namespace: n}
spec:
  source:
    topic: in
    key: [k]
    schema: {fields: [{name: k, type: string}, {name: seq, type: integer}]}
  steps:
    - name: order
      order: {key: [k], sequence: seq, maxDelay: 10s, contiguous: true}
  sinks: [{name: out, kafka: {topic: out}}]
"#;
        let manifests = keystone_crds::parse_manifests("p.yaml", manifest).unwrap();
        let plan = keystone_crds::compile(&manifests.pipelines[0], &[]).unwrap();
        let clock = ManualClock::new(0);
        let mut task = StageTask::new(
            &plan.stages[0],
            Some(&plan.source.schema),
            &BTreeMap::new(),
            Arc::new(clock.clone()),
            TaskOptions {
                record_changes: false,
            },
        )
        .unwrap();
        let record = |seq: i64, offset: i64| {
            (
                format!(r#"{{"k":"a","seq":{seq}}}"#).into_bytes(),
                Some(Provenance {
                    partition: 2,
                    offset,
                }),
            )
        };
        let released = |task: &mut StageTask| -> Vec<(Option<i64>, i64)> {
            task.take_events()
                .iter()
                .map(|e| {
                    (
                        e.value.get("seq").and_then(|v| v.as_i64()),
                        e.source.unwrap().offset,
                    )
                })
                .collect()
        };
        // 2 waits for 1; 5 waits for 3 and 4, which never come: the timer releases it.
        task.push_records([record(2, 10), record(1, 11), record(5, 12)]);
        assert_eq!(released(&mut task), [(Some(1), 11), (Some(2), 10)]);
        clock.advance(11_000);
        task.tick();
        assert_eq!(released(&mut task), [(Some(5), 12)]);
    }
}
