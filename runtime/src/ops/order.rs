//! `order`: per key, events leave in ascending order of their `sequence` field.
//!
//! For each key the operator remembers the last sequence it emitted (`last`) and
//! holds back events that may not leave yet, sorted by sequence.
//!
//! - **Stale**: an event whose sequence is not above `last`, or equals one already
//!   waiting, is stale: dropped (counted) with `onStale: Drop`, dead-lettered with
//!   reason `stale: ...` with `onStale: DeadLetter`. So output is strictly
//!   ascending and unique per key.
//! - **Contiguous** (`contiguous: true`): an event with sequence `last + 1` leaves at
//!   once, followed by every waiting event that continues the run without a gap.
//!   Any other event waits. Contiguous sequences start at 1: for a key with no
//!   emitted history, `firstSequence` (1 by default) leaves at once; a key whose
//!   first sequence is another number has no known predecessor, so its first
//!   events wait as below.
//! - **Waiting**: a held event leaves at the latest `maxDelay` of processing time
//!   after it arrived; it then leaves together with every waiting event of its key
//!   with a lower sequence, in ascending order (a gap is given up on; a missing
//!   sequence arriving later is stale). In non-contiguous mode every event waits its
//!   `maxDelay`, so that late predecessors can overtake it. Waiting counts only
//!   while the pipeline runs: after a restore, the downtime is added to every
//!   held event's deadline.
//! - **Bounded**: when a key holds more than `maxBuffered` events, its lowest
//!   sequence leaves at once (then, if contiguous, the run that follows it).
//! - **End of input**: every key's waiting events leave in ascending order, keys in
//!   the order their oldest waiting event arrived.
//! - **Key**: the `key` fields' values, typed and hashed to 128 bits (xxh3), so
//!   distinct keys practically never share a sequence history.
//! - **Memory**: per key ever seen, about 60 bytes (hash, `last`, an empty waiting
//!   list); plus each waiting event and about 100 bytes beside it. Once more
//!   than 8 MiB wait, a waiting event is kept as its JSON bytes (the bytes it
//!   arrived as too, when a step before changed it), since a parsed document
//!   costs several times its bytes; below, parsed, so that short waits cost no
//!   serialization ([`held`]). `last` is kept for every key: that is what makes
//!   late duplicates stale. The bytes waiting count toward the instance's
//!   limit ([`crate::buffers`]).
//! - **Cost**: a key's waiting events are a short sorted vector, a B-tree once
//!   it holds many; holding and releasing an event is O(log n).
//! - **Changelog**: `hash (16 bytes) + 'L' -> last (8 bytes)` whenever an event
//!   leaves; `hash + 'B' + sequence (8 bytes) -> arrival time, arrival number, the
//!   original bytes and the current event` while it waits, a tombstone when it leaves.

mod held;

use std::collections::VecDeque;

use keystone_crds::ops::{OrderSpec, StalePolicy};
use sonic_rs::JsonValueTrait;

use crate::event::{Event, FieldPath, Provenance, encode_key};
use crate::operator::{Ctx, Operator, Output};
use crate::state::{HashKeyed, StateChange, StateError, compact, hash128, hex, read_i64, read_u32};
use held::{Held, Waiting};

#[derive(Default)]
struct KeyState {
    last: Option<i64>,
    waiting: Waiting,
}

struct Deadline {
    due_ms: i64,
    key: u128,
    seq: i64,
}

pub struct Order {
    key: Vec<FieldPath>,
    sequence: FieldPath,
    max_delay_ms: i64,
    max_buffered: usize,
    contiguous: bool,
    /// A key's first sequence in contiguous mode.
    first_sequence: i64,
    on_stale: StalePolicy,
    keys: HashKeyed<u128, KeyState>,
    /// In arrival order; due times never decrease because processing time does not.
    deadlines: VecDeque<Deadline>,
    next_arrival: u64,
    /// After a restore: the latest arrival among the restored waiting events. The
    /// first call after the restore moves every wait forward by the time since
    /// then, so that the time the pipeline was down does not count as waiting.
    restored_latest_arrival: Option<i64>,
    /// Memory the waiting events take.
    buffered_bytes: usize,
    key_buf: Vec<u8>,
}

fn last_key(key: u128) -> Vec<u8> {
    let mut k = key.to_be_bytes().to_vec();
    k.push(b'L');
    k
}

fn pending_key(key: u128, seq: i64) -> Vec<u8> {
    let mut k = key.to_be_bytes().to_vec();
    k.push(b'B');
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn pending_value(held: &Held) -> Vec<u8> {
    let raw = held.raw();
    let mut v = Vec::with_capacity(33 + raw.len() * 2);
    v.extend_from_slice(&held.arrived_ms.to_be_bytes());
    v.extend_from_slice(&held.arrival.to_be_bytes());
    v.extend_from_slice(&u32::try_from(raw.len()).unwrap_or(u32::MAX).to_be_bytes());
    v.extend_from_slice(raw);
    // The source record, so that a replay after a restore still recognises a
    // waiting event the sink already holds. Marked by a byte a JSON document never
    // starts with; values written before it was added go straight on with JSON.
    if let Some(source) = held.source() {
        v.push(SOURCE_MARK);
        v.extend_from_slice(&source.partition.to_be_bytes());
        v.extend_from_slice(&source.offset.to_be_bytes());
    }
    held.write_document(&mut v);
    v
}

const SOURCE_MARK: u8 = 0x01;

/// Waiting events are kept parsed while those waiting take less than this;
/// beyond, as bytes ([`held`]).
const KEEP_PARSED_BELOW: usize = 8 << 20;

/// Events released per call at end of input, at most (a key's whole run
/// beyond it): parsed again, they cost several times their waiting bytes.
const CLOSE_PART: usize = 8192;

/// Where released events go: one key's state, the step's output, and the
/// count of bytes waiting.
struct Release<'a> {
    key: u128,
    state: &'a mut KeyState,
    out: &'a mut Output,
    buffered_bytes: &'a mut usize,
}

impl Release<'_> {
    /// Emits one event and records the new `last`.
    fn emit(&mut self, event: Event, seq: i64, was_waiting: bool) {
        self.state.last = Some(seq);
        if was_waiting {
            self.out
                .change(|| StateChange::delete(pending_key(self.key, seq)));
        }
        self.out
            .change(|| StateChange::upsert(last_key(self.key), seq.to_be_bytes().to_vec()));
        self.out.emit(event);
    }

    /// Emits the lowest waiting event, if any.
    fn emit_first(&mut self) {
        let Some(held) = self.state.waiting.pop_first() else {
            return;
        };
        *self.buffered_bytes = self.buffered_bytes.saturating_sub(held.footprint());
        let seq = held.seq;
        match held.into_event() {
            Ok(event) => self.emit(event, seq, true),
            Err(event) => {
                // Only a changelog written by something else could hold one.
                self.state.last = Some(seq);
                self.out
                    .change(|| StateChange::delete(pending_key(self.key, seq)));
                self.out
                    .dead_letter(event, "order: a waiting event read back is not JSON");
            }
        }
    }

    /// Emits waiting events up to sequence `through`, then, if contiguous
    /// (`run_from` is the first sequence), the run without gaps that follows.
    fn through(&mut self, through: i64, run_from: Option<i64>) {
        while self
            .state
            .waiting
            .first_seq()
            .is_some_and(|seq| seq <= through)
        {
            self.emit_first();
        }
        if let Some(first) = run_from {
            while let Some(seq) = self.state.waiting.first_seq() {
                if next_in_run(self.state.last, first) != Some(seq) {
                    break;
                }
                self.emit_first();
            }
        }
    }
}

/// In contiguous mode, the sequence that may leave at once after `last`;
/// `first` is a key's first sequence (`firstSequence`).
fn next_in_run(last: Option<i64>, first: i64) -> Option<i64> {
    match last {
        Some(last) => last.checked_add(1),
        None => Some(first),
    }
}

impl Order {
    pub fn new(spec: &OrderSpec) -> Self {
        Self {
            key: spec.key.iter().map(|k| FieldPath::new(k)).collect(),
            sequence: FieldPath::new(&spec.sequence),
            max_delay_ms: i64::try_from(spec.max_delay.as_millis()).unwrap_or(i64::MAX),
            max_buffered: usize::try_from(spec.max_buffered)
                .unwrap_or(usize::MAX)
                .max(1),
            contiguous: spec.contiguous,
            first_sequence: spec.first_sequence,
            on_stale: spec.on_stale,
            keys: HashKeyed::default(),
            deadlines: VecDeque::new(),
            next_arrival: 0,
            restored_latest_arrival: None,
            buffered_bytes: 0,
            key_buf: Vec::with_capacity(64),
        }
    }

    fn stale(&self, event: Event, reason: String, out: &mut Output) {
        match self.on_stale {
            StalePolicy::Drop => out.drop_event(event),
            StalePolicy::DeadLetter => out.dead_letter(event, reason),
        }
    }

    /// Events waiting, over all keys.
    pub fn waiting(&self) -> usize {
        self.keys.values().map(|s| s.waiting.len()).sum()
    }
}

impl Operator for Order {
    fn process(&mut self, event: Event, ctx: &Ctx, out: &mut Output) {
        let first_sequence = self.first_sequence;
        self.key_buf.clear();
        if let Err(missing) = encode_key(&event.value, &self.key, &mut self.key_buf) {
            let reason = format!("order: missing key field {:?}", missing.dotted);
            return out.dead_letter(event, reason);
        }
        let Some(seq) = self.sequence.get(&event.value).and_then(|v| v.as_i64()) else {
            let reason = format!(
                "order: sequence field {:?} is missing or not a 64-bit integer",
                self.sequence.dotted
            );
            return out.dead_letter(event, reason);
        };
        let key = hash128(&self.key_buf);
        let state = self.keys.entry(key).or_default();
        if let Some(last) = state.last
            && seq <= last
        {
            let reason =
                format!("stale: sequence {seq} is not above {last}, the last emitted for its key");
            return self.stale(event, reason, out);
        }
        if state.waiting.contains(seq) {
            let reason =
                format!("stale: sequence {seq} is already waiting to be emitted for its key");
            return self.stale(event, reason, out);
        }
        let mut release = Release {
            key,
            state,
            out,
            buffered_bytes: &mut self.buffered_bytes,
        };
        if self.contiguous && next_in_run(release.state.last, first_sequence) == Some(seq) {
            release.emit(event, seq, false);
            release.through(i64::MIN, Some(first_sequence));
            return;
        }
        let held = if *release.buffered_bytes < KEEP_PARSED_BELOW {
            Held::parsed(seq, ctx.now_ms, self.next_arrival, event)
        } else {
            Held::compact(seq, ctx.now_ms, self.next_arrival, event)
        };
        self.next_arrival += 1;
        *release.buffered_bytes += held.footprint();
        release
            .out
            .change(|| StateChange::upsert(pending_key(key, seq), pending_value(&held)));
        release.state.waiting.insert(held);
        self.deadlines.push_back(Deadline {
            due_ms: ctx.now_ms.saturating_add(self.max_delay_ms),
            key,
            seq,
        });
        if release.state.waiting.len() > self.max_buffered {
            release.emit_first();
            release.through(i64::MIN, self.contiguous.then_some(first_sequence));
        }
    }

    fn on_start(&mut self, ctx: &Ctx) {
        let Some(latest) = self.restored_latest_arrival.take() else {
            return;
        };
        // Downtime is not waiting time: a held event whose predecessor is next in
        // the input must not be released before that input is read again.
        let downtime = ctx.now_ms.saturating_sub(latest).max(0);
        for deadline in &mut self.deadlines {
            deadline.due_ms = deadline.due_ms.saturating_add(downtime);
        }
        for state in self.keys.values_mut() {
            for held in state.waiting.iter_mut() {
                held.arrived_ms = held.arrived_ms.saturating_add(downtime);
            }
        }
    }

    fn on_timer(&mut self, ctx: &Ctx, out: &mut Output) {
        let run_from = self.contiguous.then_some(self.first_sequence);
        while let Some(front) = self.deadlines.front() {
            if front.due_ms > ctx.now_ms {
                break;
            }
            let Deadline { key, seq, .. } = self.deadlines.pop_front().expect("front exists");
            if let Some(state) = self.keys.get_mut(&key)
                && state.waiting.contains(seq)
            {
                Release {
                    key,
                    state,
                    out: &mut *out,
                    buffered_bytes: &mut self.buffered_bytes,
                }
                .through(seq, run_from);
            }
        }
    }

    fn on_close(&mut self, _ctx: &Ctx, out: &mut Output) {
        // Keys in the order their oldest waiting event arrived.
        let mut released = 0;
        while released < CLOSE_PART {
            let Some(deadline) = self.deadlines.pop_front() else {
                break;
            };
            if let Some(state) = self.keys.get_mut(&deadline.key) {
                released += state.waiting.len();
                Release {
                    key: deadline.key,
                    state,
                    out: &mut *out,
                    buffered_bytes: &mut self.buffered_bytes,
                }
                .through(i64::MAX, None);
            }
        }
    }

    fn holds_back(&self) -> bool {
        !self.deadlines.is_empty()
    }

    fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }

    fn is_stateful(&self) -> bool {
        true
    }

    fn snapshot(&self) -> Vec<StateChange> {
        let mut records = Vec::new();
        for (key, state) in &self.keys {
            if let Some(last) = state.last {
                records.push(StateChange::upsert(
                    last_key(*key),
                    last.to_be_bytes().to_vec(),
                ));
            }
            for held in state.waiting.iter() {
                records.push(StateChange::upsert(
                    pending_key(*key, held.seq),
                    pending_value(held),
                ));
            }
        }
        records.sort_by(|a, b| a.key.cmp(&b.key));
        records
    }

    fn restore(&mut self, changes: Vec<StateChange>) -> Result<(), StateError> {
        self.keys.clear();
        self.deadlines.clear();
        self.buffered_bytes = 0;
        let mut waiting: Vec<(u64, u128, i64, i64)> = Vec::new();
        for (record_key, value) in compact(changes) {
            let bad = |message: String| StateError::Value {
                key: hex(&record_key),
                message,
            };
            if record_key.len() < 17 {
                return Err(StateError::KeyLength {
                    expected: 17,
                    found: record_key.len(),
                });
            }
            let key = u128::from_be_bytes(record_key[..16].try_into().expect("16 bytes"));
            match (record_key[16], record_key.len()) {
                (b'L', 17) => {
                    let last = read_i64(&value, 0)
                        .ok_or_else(|| bad("expected an 8-byte sequence".into()))?;
                    self.keys.entry(key).or_default().last = Some(last);
                }
                (b'B', 25) => {
                    let seq = read_i64(&record_key, 17).expect("25-byte key");
                    let arrived_ms = read_i64(&value, 0).ok_or_else(|| bad("truncated".into()))?;
                    let arrival =
                        read_i64(&value, 8).ok_or_else(|| bad("truncated".into()))? as u64;
                    let raw_len =
                        read_u32(&value, 16).ok_or_else(|| bad("truncated".into()))? as usize;
                    let raw = value
                        .get(20..20 + raw_len)
                        .ok_or_else(|| bad("truncated original bytes".into()))?;
                    let mut at = 20 + raw_len;
                    let mut source = None;
                    if value.get(at) == Some(&SOURCE_MARK) {
                        let partition = read_u32(&value, at + 1)
                            .ok_or_else(|| bad("truncated source partition".into()))?;
                        let offset = read_i64(&value, at + 5)
                            .ok_or_else(|| bad("truncated source offset".into()))?;
                        source = Some(Provenance {
                            partition: partition as i32,
                            offset,
                        });
                        at += 13;
                    }
                    let document = &value[at..];
                    if crate::event::reparse(document).is_none() {
                        return Err(bad("the waiting event is not JSON".into()));
                    }
                    let held = Held::from_parts(seq, arrived_ms, arrival, source, raw, document);
                    let state = self.keys.entry(key).or_default();
                    if !state.waiting.contains(seq) {
                        self.buffered_bytes += held.footprint();
                        state.waiting.insert(held);
                    }
                    waiting.push((arrival, key, seq, arrived_ms));
                }
                (tag, len) => {
                    return Err(bad(format!(
                        "unknown record type {tag:#04x} with a {len}-byte key"
                    )));
                }
            }
        }
        waiting.sort();
        self.next_arrival = waiting.last().map_or(0, |w| w.0 + 1);
        self.restored_latest_arrival = waiting.iter().map(|w| w.3).max();
        for (_, key, seq, arrived_ms) in waiting {
            self.deadlines.push_back(Deadline {
                due_ms: arrived_ms.saturating_add(self.max_delay_ms),
                key,
                seq,
            });
        }
        Ok(())
    }

    fn state_entries(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{close, events, run_at, run_split};
    use keystone_crds::Duration;

    fn order(
        contiguous: bool,
        max_delay_ms: u64,
        max_buffered: u32,
        on_stale: StalePolicy,
    ) -> Order {
        Order::new(&OrderSpec {
            key: vec!["k".into()],
            sequence: "seq".into(),
            max_delay: Duration::from_millis(max_delay_ms),
            max_buffered,
            contiguous,
            first_sequence: 1,
            on_stale,
        })
    }

    fn seqs(out: &[String]) -> Vec<String> {
        out.iter()
            .map(|line| {
                let v: sonic_rs::Value = sonic_rs::from_str(line).unwrap();
                format!("{}{}", v["k"].as_str().unwrap(), v["seq"].as_i64().unwrap())
            })
            .collect()
    }

    fn line(k: &str, seq: i64) -> String {
        format!(r#"{{"k":"{k}","seq":{seq}}}"#)
    }

    fn input(pairs: &[(&str, i64)]) -> Vec<Event> {
        let lines: Vec<String> = pairs.iter().map(|(k, s)| line(k, *s)).collect();
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        events(&refs)
    }

    #[test]
    fn contiguous_runs_leave_as_soon_as_the_gap_fills() {
        let mut op = order(true, 60_000, 100, StalePolicy::Drop);
        // Sequence 1 starts a key's run; a key that starts elsewhere (b) has no
        // known predecessor and waits until maxDelay.
        let out = run_at(&mut op, 0, input(&[("a", 2), ("a", 1), ("b", 5)]));
        assert_eq!(seqs(&out.json()), vec!["a1", "a2"]);
        let out = run_at(&mut op, 60_000, vec![]);
        assert_eq!(seqs(&out.json()), vec!["b5"]);
        let out = run_at(
            &mut op,
            60_001,
            input(&[("a", 4), ("a", 5), ("a", 3), ("b", 6), ("a", 3)]),
        );
        assert_eq!(seqs(&out.json()), vec!["a3", "a4", "a5", "b6"]);
        assert_eq!(out.dropped, 1);
    }

    #[test]
    fn stale_events_are_dropped_or_dead_lettered() {
        let mut op = order(true, 0, 100, StalePolicy::DeadLetter);
        let out = run_at(&mut op, 0, input(&[("a", 5)]));
        assert_eq!(seqs(&out.json()), vec!["a5"]);
        let out = run_at(&mut op, 1, input(&[("a", 5), ("a", 4), ("a", 7), ("a", 7)]));
        // 7 waits (6 is missing) until its maxDelay of 0 passes at the timer.
        assert_eq!(seqs(&out.json()), vec!["a7"]);
        let reasons: Vec<&str> = out.dead.iter().map(|d| d.reason.as_str()).collect();
        assert_eq!(
            reasons,
            vec![
                "stale: sequence 5 is not above 5, the last emitted for its key",
                "stale: sequence 4 is not above 5, the last emitted for its key",
                "stale: sequence 7 is already waiting to be emitted for its key",
            ]
        );
    }

    #[test]
    fn max_delay_releases_across_a_gap_in_order() {
        let mut op = order(false, 100, 100, StalePolicy::Drop);
        let _ = run_at(&mut op, 0, input(&[("a", 10)]));
        let _ = run_at(&mut op, 50, input(&[("a", 30), ("a", 20)]));
        let out = run_at(&mut op, 100, vec![]);
        assert_eq!(seqs(&out.json()), vec!["a10"]);
        let out = run_at(&mut op, 149, input(&[("a", 5)]));
        assert_eq!(out.dropped, 1);
        let out = run_at(&mut op, 150, vec![]);
        assert_eq!(seqs(&out.json()), vec!["a20", "a30"]);
    }

    #[test]
    fn max_buffered_forces_the_lowest_out() {
        let mut op = order(true, 60_000, 2, StalePolicy::Drop);
        let _ = run_at(&mut op, 0, input(&[("a", 1)]));
        let _ = run_at(&mut op, 60_000, vec![]);
        let out = run_at(&mut op, 60_001, input(&[("a", 5), ("a", 3), ("a", 4)]));
        // Three waiting > 2: 3 leaves, then 4 and 5 follow contiguously.
        assert_eq!(seqs(&out.json()), vec!["a3", "a4", "a5"]);
    }

    #[test]
    fn waiting_events_keep_their_source_record_through_a_restore() {
        let mut op = order(true, 60_000, 100, StalePolicy::Drop);
        let mut batch = input(&[("a", 2), ("a", 3)]);
        for (i, event) in batch.iter_mut().enumerate() {
            event.source = Some(Provenance {
                partition: 4,
                offset: 100 + i as i64,
            });
        }
        let held = run_at(&mut op, 0, batch);
        assert!(held.events.is_empty(), "a1 is missing, so both wait");
        let mut restored = order(true, 60_000, 100, StalePolicy::Drop);
        restored.restore(op.snapshot()).unwrap();
        // A value written before sources were recorded still reads.
        let mut legacy = Vec::new();
        legacy.extend_from_slice(&0i64.to_be_bytes());
        legacy.extend_from_slice(&9u64.to_be_bytes());
        legacy.extend_from_slice(&0u32.to_be_bytes());
        legacy.extend_from_slice(br#"{"k":"a","seq":4}"#);
        let any_key = op.snapshot()[0].key[..16].try_into().unwrap();
        let mut changes = op.snapshot();
        changes.push(StateChange::upsert(
            pending_key(u128::from_be_bytes(any_key), 4),
            legacy,
        ));
        restored.restore(changes).unwrap();
        let out = run_at(&mut restored, 1, input(&[("a", 1)]));
        assert_eq!(seqs(&out.json()), vec!["a1", "a2", "a3", "a4"]);
        let sources: Vec<Option<i64>> = out
            .events
            .iter()
            .map(|e| e.source.map(|s| s.offset))
            .collect();
        assert_eq!(sources, vec![None, Some(100), Some(101), None]);
        assert_eq!(out.events[1].source.map(|s| s.partition), Some(4));
    }

    #[test]
    fn end_of_input_flushes_in_order() {
        let mut op = order(false, 60_000, 100, StalePolicy::Drop);
        let _ = run_at(&mut op, 0, input(&[("b", 2), ("a", 9), ("b", 1), ("a", 3)]));
        let out = close(&mut op, 1);
        assert_eq!(seqs(&out.json()), vec!["b1", "b2", "a3", "a9"]);
        assert_eq!(op.waiting(), 0);
    }

    #[test]
    fn checkpoint_restore_continues_like_an_uninterrupted_run() {
        // Per key: contiguous sequences shuffled within a window of 4, some repeated.
        let mut lines = Vec::new();
        for round in 0..30i64 {
            for (k, offset) in [("a", 0i64), ("b", 2), ("c", 1)] {
                let base = (round / 4) * 4;
                let seq = base + ((round + offset) * 3 % 4) + 1;
                lines.push(line(k, seq));
            }
        }
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        for split in [1, 20, 45, 89] {
            let (whole, resumed) =
                run_split(|| order(true, 35, 3, StalePolicy::DeadLetter), &refs, split);
            assert_eq!(whole, resumed, "split at {split}");
        }
        let (whole, resumed) = run_split(|| order(false, 35, 3, StalePolicy::Drop), &refs, 50);
        assert_eq!(whole, resumed);
    }

    #[test]
    fn downtime_after_a_restore_does_not_count_as_waiting() {
        let mut op = order(true, 1_000, 100, StalePolicy::Drop);
        // a1 starts the run and leaves at once; a3 then waits for a2.
        let out = run_at(&mut op, 0, input(&[("a", 1)]));
        assert_eq!(seqs(&out.json()), vec!["a1"]);
        let out = run_at(&mut op, 1_000, input(&[("a", 3)]));
        assert!(out.json().is_empty());
        let mut restored = order(true, 1_000, 100, StalePolicy::Drop);
        restored.restore(op.snapshot()).unwrap();
        // Down for a minute, then started: a3 has not waited its second yet, so
        // a2, read next from the input, still overtakes it.
        restored.on_start(&Ctx { now_ms: 61_000 });
        let out = run_at(&mut restored, 61_000, vec![]);
        assert!(
            out.json().is_empty(),
            "a3 was released by a timer that counted the downtime"
        );
        let out = run_at(&mut restored, 61_100, input(&[("a", 2)]));
        assert_eq!(seqs(&out.json()), vec!["a2", "a3"]);
    }
}
