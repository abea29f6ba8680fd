//! The operator model: one trait with default hooks. The task runner
//! ([`crate::task::StageTask`]) owns the loop, batching, required-field checks,
//! timers and metrics; an operator only says what happens to events and state.

use std::sync::Arc;

use crate::event::{DeadLetter, Event};
use crate::state::{StateChange, StateError};

/// What an operator may know about the moment it is called.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    /// Processing time, epoch milliseconds, read once per batch from the task's clock.
    pub now_ms: i64,
}

/// A step's operator.
///
/// Lifecycle: `on_start`, then `process_batch` for every batch and `on_timer`
/// after every batch (and whenever the runner's clock moves without input), then
/// `on_close` at end of input (local mode) or shutdown. `snapshot` and `restore`
/// move keyed state in and out as changelog records; an operator that records
/// its changes through [`Output::change`] while processing lets the runner keep a
/// changelog topic exactly equal to a snapshot at every commit.
pub trait Operator: Send {
    /// Called once before the first batch (after any `restore`).
    fn on_start(&mut self, _ctx: &Ctx) {}

    /// Processes one event. Each input event ends in exactly one of: emitted
    /// (possibly later), dropped, dead-lettered.
    fn process(&mut self, event: Event, ctx: &Ctx, out: &mut Output);

    /// Processes a batch, leaving `batch` empty. Override to amortize work per batch.
    fn process_batch(&mut self, batch: &mut Vec<Event>, ctx: &Ctx, out: &mut Output) {
        for event in batch.drain(..) {
            self.process(event, ctx, out);
        }
    }

    /// Processing time has advanced to `ctx.now_ms`: release or expire what is due.
    fn on_timer(&mut self, _ctx: &Ctx, _out: &mut Output) {}

    /// End of input: emit what is still held back, all of it or a part at
    /// a time (then [`holds_back`](Self::holds_back) says there is more, and
    /// it is called again).
    fn on_close(&mut self, _ctx: &Ctx, _out: &mut Output) {}

    /// Whether events are still held back after `on_close`.
    fn holds_back(&self) -> bool {
        false
    }

    /// Whether the operator keeps keyed state (and so has a changelog topic).
    fn is_stateful(&self) -> bool {
        false
    }

    /// The whole state as upsert records, one per live key.
    fn snapshot(&self) -> Vec<StateChange> {
        Vec::new()
    }

    /// Replaces the state with the result of applying `changes` in order (a
    /// snapshot or a changelog read from its beginning).
    fn restore(&mut self, changes: Vec<StateChange>) -> Result<(), StateError> {
        if changes.is_empty() {
            Ok(())
        } else {
            Err(StateError::Stateless {
                records: changes.len(),
            })
        }
    }

    /// Applies changes that arrive while running from outside the operator: rows
    /// of a join or enrich table's compacted topic. Only table operators accept them.
    fn update_table(&mut self, changes: Vec<StateChange>) -> Result<(), StateError> {
        if changes.is_empty() {
            Ok(())
        } else {
            Err(StateError::Stateless {
                records: changes.len(),
            })
        }
    }

    /// Live state entries (keys), for metrics.
    fn state_entries(&self) -> usize {
        0
    }

    /// Memory the events it holds back take, in bytes: what the instance's
    /// buffer limit ([`crate::buffers`]) counts.
    fn buffered_bytes(&self) -> usize {
        0
    }
}

/// Where an operator puts what it produces. The runner drains it after each call.
#[derive(Debug)]
pub struct Output {
    step: Arc<str>,
    record_changes: bool,
    pub(crate) events: Vec<Event>,
    pub(crate) dead_letters: Vec<DeadLetter>,
    pub(crate) changes: Vec<StateChange>,
    pub(crate) dropped: u64,
}

impl Output {
    /// An output for step `step`; state changes are kept only when `record_changes`.
    pub fn new(step: &str, record_changes: bool) -> Self {
        Self {
            step: Arc::from(step),
            record_changes,
            events: Vec::new(),
            dead_letters: Vec::new(),
            changes: Vec::new(),
            dropped: 0,
        }
    }

    pub fn step(&self) -> &str {
        &self.step
    }

    pub fn emit(&mut self, event: Event) {
        self.events.push(event);
    }

    /// The event is intentionally discarded (filtered out, duplicate, stale, no
    /// join match); it counts in the step's `dropped` metric.
    pub fn drop_event(&mut self, _event: Event) {
        self.dropped += 1;
    }

    /// The event cannot be processed: it goes to the dead-letter output with `reason`.
    pub fn dead_letter(&mut self, event: Event, reason: impl Into<String>) {
        self.dead_letters.push(DeadLetter {
            step: self.step.to_string(),
            reason: reason.into(),
            original: event.raw,
        });
    }

    /// Whether state changes are being recorded (on Kafka, for the changelog).
    /// Operators may skip encoding changes when not.
    pub fn records_changes(&self) -> bool {
        self.record_changes
    }

    /// Records one state change, built only when changes are recorded.
    pub fn change(&mut self, make: impl FnOnce() -> StateChange) {
        if self.record_changes {
            self.changes.push(make());
        }
    }

    /// Events emitted so far (tests).
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    pub fn take_dead_letters(&mut self) -> Vec<DeadLetter> {
        std::mem::take(&mut self.dead_letters)
    }

    pub fn take_changes(&mut self) -> Vec<StateChange> {
        std::mem::take(&mut self.changes)
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}
