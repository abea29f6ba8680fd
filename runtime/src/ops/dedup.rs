//! `dedup`: the first event for a key within the window passes; later events for
//! the same key are dropped (counted in `dropped`) until the window has run out.
//!
//! - **Key**: the values of the `key` fields, canonically encoded (typed: `"1"`
//!   and `1` differ) and hashed to 64 bits with xxh3. Only the hash is stored.
//!   Two different keys collide with probability about n²/2⁶⁵ for n live keys
//!   (3·10⁻⁸ at 1M keys); a collision would drop the second key's first event.
//! - **Time**: `eventTimeField` (RFC 3339 string or epoch-ms integer) when set,
//!   otherwise processing time from the task's clock. An event whose time field
//!   does not hold a timestamp goes to the dead-letter output.
//! - **Window**: a key is remembered from its first passing event at time `t0`; an
//!   event with time `< t0 + window` is a duplicate (also one with an earlier event
//!   time than `t0`). The window is not extended by duplicates. An event at or after
//!   `t0 + window` passes and starts a new window.
//! - **Far-future event time**: an event whose event time is more than
//!   [`MAX_EVENT_TIME_AHEAD_MS`] (1 hour) ahead of processing time goes to the
//!   dead-letter output instead of moving the watermark: one such event (a
//!   `ts` of i64::MAX) would otherwise expire every key at once, and every later
//!   redelivery would pass. The bound is Kafka's own for record timestamps
//!   (`log.message.timestamp.after.max.ms`, 1 hour by default); the watermark
//!   therefore never runs more than an hour ahead of the clock.
//! - **Memory**: keys are evicted once the watermark (the highest time seen, or
//!   processing time) passes `t0 + window`, by a sweep every window/8 of watermark
//!   progress. In event time a duplicate that arrives after its key was evicted
//!   passes again. Per live key the state is a 16-byte entry (hash, `t0`) in an
//!   open-addressing table (hashbrown, 1 control byte, load factor 7/16 to 7/8):
//!   about 20 to 40 bytes per key.
//! - **Changelog**: the entries that passed in one batch are one record, not one
//!   record each (on Kafka a record per passing event was half of what a
//!   dedup pipeline wrote). Key: version byte 1, the record's latest `t0` and
//!   an xxh3 of the value (8 bytes each, big-endian); value: the entries, 16
//!   bytes each (hash, `t0`), at most [`ENTRIES_PER_RECORD`] per record. The
//!   key is unique per content, so a compacted changelog keeps every record
//!   until its tombstone, which is written once the watermark has passed the
//!   record's latest `t0` plus the window (every entry in it has expired then).
//!   A key that passes again is in a newer record with a later `t0`; restore
//!   takes the latest `t0` per key. Changelogs of earlier versions hold
//!   `hash (8 bytes) -> t0 (8 bytes)` per key: they restore, and those keys get
//!   their per-key tombstone when they pass again or expire.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::BuildHasherDefault;

use keystone_crds::ops::DedupSpec;

use crate::event::{Event, FieldPath, encode_key, timestamp_ms};
use crate::operator::{Ctx, Operator, Output};
use crate::state::{HashKeyed, PassThroughHasher, StateChange, StateError, hash64, hex, read_i64};

/// How far ahead of processing time an event time may be, in milliseconds.
pub const MAX_EVENT_TIME_AHEAD_MS: i64 = 60 * 60 * 1000;

/// Entries per changelog record: 16 bytes each, so a record stays at 64 KiB,
/// well under Kafka's default 1 MB message limit.
pub const ENTRIES_PER_RECORD: usize = 4096;

const RECORD_VERSION: u8 = 1;
const RECORD_KEY_LEN: usize = 17;
const ENTRY_LEN: usize = 16;
/// The key length of the per-key records of earlier versions.
const PER_KEY_LEN: usize = 8;

/// A changelog record of entries, known by its latest `t0` and its content hash.
type RecordId = (i64, u64);

fn record_key((latest, content): RecordId) -> Vec<u8> {
    let mut key = Vec::with_capacity(RECORD_KEY_LEN);
    key.push(RECORD_VERSION);
    key.extend_from_slice(&latest.to_be_bytes());
    key.extend_from_slice(&content.to_be_bytes());
    key
}

/// One record for `entries` (key hash, `t0`), and its id.
fn encode_record(entries: impl ExactSizeIterator<Item = (u64, i64)>) -> (RecordId, Vec<u8>) {
    let mut value = Vec::with_capacity(entries.len() * ENTRY_LEN);
    let mut latest = i64::MIN;
    for (hash, t0) in entries {
        value.extend_from_slice(&hash.to_be_bytes());
        value.extend_from_slice(&t0.to_be_bytes());
        latest = latest.max(t0);
    }
    ((latest, hash64(&value)), value)
}

pub struct Dedup {
    key: Vec<FieldPath>,
    window_ms: i64,
    event_time: Option<FieldPath>,
    first_seen: HashKeyed<u64, i64>,
    watermark: i64,
    next_sweep: i64,
    key_buf: Vec<u8>,
    /// Entries that passed since the last changelog record was written.
    unlogged: Vec<(u64, i64)>,
    /// The changelog records written and not yet deleted, oldest latest `t0` first.
    logged: BTreeSet<RecordId>,
    /// Keys restored from an earlier version's per-key records, which need a
    /// per-key tombstone of their own.
    per_key: HashSet<u64, BuildHasherDefault<PassThroughHasher>>,
}

impl Dedup {
    pub fn new(spec: &DedupSpec) -> Self {
        Self {
            key: spec.key.iter().map(|k| FieldPath::new(k)).collect(),
            window_ms: i64::try_from(spec.window.as_millis()).unwrap_or(i64::MAX),
            event_time: spec.event_time_field.as_deref().map(FieldPath::new),
            first_seen: HashKeyed::default(),
            watermark: i64::MIN,
            next_sweep: i64::MIN,
            key_buf: Vec::with_capacity(64),
            unlogged: Vec::new(),
            logged: BTreeSet::new(),
            per_key: HashSet::default(),
        }
    }

    fn sweep_interval(&self) -> i64 {
        (self.window_ms / 8).max(1)
    }

    fn advance(&mut self, time: i64, out: &mut Output) {
        if time > self.watermark {
            self.watermark = time;
        }
        if self.watermark >= self.next_sweep {
            let (watermark, window) = (self.watermark, self.window_ms);
            let per_key = &mut self.per_key;
            let mut evicted = Vec::new();
            self.first_seen.retain(|hash, t0| {
                let live = t0.saturating_add(window) > watermark;
                if !live && !per_key.is_empty() && per_key.remove(hash) {
                    evicted.push(*hash);
                }
                live
            });
            for hash in evicted {
                out.change(|| StateChange::delete(hash.to_be_bytes().to_vec()));
            }
            while let Some(&(latest, content)) = self.logged.first() {
                if latest.saturating_add(window) > watermark {
                    break;
                }
                self.logged.pop_first();
                out.change(|| StateChange::delete(record_key((latest, content))));
            }
            self.next_sweep = watermark.saturating_add(self.sweep_interval());
        }
    }

    fn passed(&mut self, hash: u64, time: i64, out: &mut Output) {
        if !out.records_changes() {
            return;
        }
        self.unlogged.push((hash, time));
        if !self.per_key.is_empty() && self.per_key.remove(&hash) {
            out.change(|| StateChange::delete(hash.to_be_bytes().to_vec()));
        }
    }

    /// Writes the entries that passed since the last call as changelog records.
    fn log_passed(&mut self, out: &mut Output) {
        for chunk in self.unlogged.chunks(ENTRIES_PER_RECORD) {
            let (id, value) = encode_record(chunk.iter().copied());
            self.logged.insert(id);
            out.change(|| StateChange::upsert(record_key(id), value));
        }
        self.unlogged.clear();
    }

    fn process_one(&mut self, event: Event, ctx: &Ctx, out: &mut Output) {
        self.key_buf.clear();
        if let Err(missing) = encode_key(&event.value, &self.key, &mut self.key_buf) {
            let reason = format!("dedup: missing key field {:?}", missing.dotted);
            return out.dead_letter(event, reason);
        }
        let hash = hash64(&self.key_buf);
        let time = match &self.event_time {
            None => ctx.now_ms,
            Some(field) => match field.get(&event.value).and_then(timestamp_ms) {
                None => {
                    let reason = format!(
                        "dedup: event-time field {:?} is missing or not a timestamp (RFC 3339 or epoch milliseconds)",
                        field.dotted
                    );
                    return out.dead_letter(event, reason);
                }
                Some(t) if t > ctx.now_ms.saturating_add(MAX_EVENT_TIME_AHEAD_MS) => {
                    let reason = format!(
                        "dedup: event time {} in field {:?} is more than 1 hour ahead of processing time {}: it would expire every key's window",
                        describe_ms(t),
                        field.dotted,
                        describe_ms(ctx.now_ms)
                    );
                    return out.dead_letter(event, reason);
                }
                Some(t) => t,
            },
        };
        if time > self.watermark {
            self.watermark = time;
            if time >= self.next_sweep {
                self.advance(time, out);
            }
        }
        match self.first_seen.entry(hash) {
            Entry::Occupied(seen) if time < seen.get().saturating_add(self.window_ms) => {
                return out.drop_event(event);
            }
            Entry::Occupied(mut seen) => {
                seen.insert(time);
            }
            Entry::Vacant(slot) => {
                slot.insert(time);
            }
        }
        self.passed(hash, time, out);
        out.emit(event);
    }
}

/// Epoch milliseconds as RFC 3339 when chrono can show them, else as a number.
fn describe_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("{ms} ms since the epoch"))
}

fn malformed(key: &[u8], message: String) -> StateError {
    StateError::Value {
        key: hex(key),
        message,
    }
}

impl Operator for Dedup {
    fn process(&mut self, event: Event, ctx: &Ctx, out: &mut Output) {
        self.process_one(event, ctx, out);
        self.log_passed(out);
    }

    fn process_batch(&mut self, batch: &mut Vec<Event>, ctx: &Ctx, out: &mut Output) {
        for event in batch.drain(..) {
            self.process_one(event, ctx, out);
        }
        self.log_passed(out);
        let watermark = self.watermark;
        self.advance(watermark, out);
    }

    fn on_timer(&mut self, ctx: &Ctx, out: &mut Output) {
        if self.event_time.is_none() {
            self.advance(ctx.now_ms, out);
        }
    }

    fn is_stateful(&self) -> bool {
        true
    }

    fn snapshot(&self) -> Vec<StateChange> {
        let mut entries: Vec<(i64, u64)> = self
            .first_seen
            .iter()
            .map(|(hash, t0)| (*t0, *hash))
            .collect();
        entries.sort_unstable();
        entries
            .chunks(ENTRIES_PER_RECORD)
            .map(|chunk| {
                let (id, value) = encode_record(chunk.iter().map(|&(t0, hash)| (hash, t0)));
                StateChange::upsert(record_key(id), value)
            })
            .collect()
    }

    fn restore(&mut self, changes: Vec<StateChange>) -> Result<(), StateError> {
        self.first_seen.clear();
        self.unlogged.clear();
        self.logged.clear();
        self.per_key.clear();
        let mut per_key: HashKeyed<u64, i64> = HashKeyed::default();
        let mut records: HashMap<RecordId, Vec<u8>> = HashMap::new();
        for change in changes {
            match change.key.len() {
                PER_KEY_LEN => {
                    let hash = u64::from_be_bytes(change.key[..].try_into().expect("8 bytes"));
                    match change.value {
                        None => {
                            per_key.remove(&hash);
                        }
                        Some(value) => {
                            let t0 = read_i64(&value, 0)
                                .filter(|_| value.len() == 8)
                                .ok_or_else(|| {
                                    malformed(
                                        &change.key,
                                        format!("expected 8 bytes, found {}", value.len()),
                                    )
                                })?;
                            per_key.insert(hash, t0);
                        }
                    }
                }
                RECORD_KEY_LEN if change.key[0] == RECORD_VERSION => {
                    let latest = read_i64(&change.key, 1).expect("17 bytes");
                    let content = u64::from_be_bytes(change.key[9..].try_into().expect("8 bytes"));
                    match change.value {
                        None => {
                            records.remove(&(latest, content));
                        }
                        Some(value) if value.is_empty() || value.len() % ENTRY_LEN != 0 => {
                            return Err(malformed(
                                &change.key,
                                format!(
                                    "expected a non-empty multiple of {ENTRY_LEN} bytes, found {}",
                                    value.len()
                                ),
                            ));
                        }
                        Some(value) => {
                            records.insert((latest, content), value);
                        }
                    }
                }
                RECORD_KEY_LEN => {
                    return Err(malformed(
                        &change.key,
                        format!(
                            "record version {} is not one this runtime reads (it reads {RECORD_VERSION})",
                            change.key[0]
                        ),
                    ));
                }
                found => {
                    return Err(StateError::KeyLength {
                        expected: RECORD_KEY_LEN,
                        found,
                    });
                }
            }
        }
        for (hash, t0) in per_key {
            self.first_seen.insert(hash, t0);
            self.per_key.insert(hash);
        }
        for (id, value) in records {
            for entry in value.chunks_exact(ENTRY_LEN) {
                let hash = u64::from_be_bytes(entry[..8].try_into().expect("8 bytes"));
                let t0 = read_i64(entry, 8).expect("16 bytes");
                // A key's later pass is in a later record; the latest t0 is its window.
                let seen = self.first_seen.entry(hash).or_insert(t0);
                *seen = (*seen).max(t0);
            }
            self.logged.insert(id);
        }
        // The restored keys' first times bound the watermark from below.
        self.watermark = self.first_seen.values().copied().max().unwrap_or(i64::MIN);
        self.next_sweep = i64::MIN;
        Ok(())
    }

    fn state_entries(&self) -> usize {
        self.first_seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{events, run_at, run_split};
    use keystone_crds::Duration;

    fn dedup(window_ms: u64, event_time: Option<&str>) -> Dedup {
        Dedup::new(&DedupSpec {
            key: vec!["id".into()],
            window: Duration::from_millis(window_ms),
            event_time_field: event_time.map(str::to_owned),
        })
    }

    #[test]
    fn first_event_per_key_passes_within_the_window() {
        let mut op = dedup(1000, Some("ts"));
        let out = run_at(
            &mut op,
            0,
            events(&[
                r#"{"id":"a","ts":0}"#,
                r#"{"id":"a","ts":999}"#,
                r#"{"id":"b","ts":500}"#,
                r#"{"id":"a","ts":1000}"#,
                r#"{"id":"a","ts":1500}"#,
                r#"{"id":"a","ts":"1970-01-01T00:00:02Z"}"#,
                r#"{"id":"a","ts":"soon"}"#,
            ]),
        );
        assert_eq!(
            out.json(),
            vec![
                r#"{"id":"a","ts":0}"#,
                r#"{"id":"b","ts":500}"#,
                r#"{"id":"a","ts":1000}"#,
                r#"{"id":"a","ts":"1970-01-01T00:00:02Z"}"#,
            ]
        );
        assert_eq!(out.dropped, 2);
        assert_eq!(out.dead.len(), 1);
    }

    #[test]
    fn processing_time_windows_use_the_clock() {
        let mut op = dedup(1000, None);
        let first = run_at(&mut op, 10_000, events(&[r#"{"id":1}"#, r#"{"id":1}"#]));
        assert_eq!(first.json().len(), 1);
        let later = run_at(&mut op, 10_999, events(&[r#"{"id":1}"#]));
        assert_eq!(later.json().len(), 0);
        let expired = run_at(&mut op, 11_000, events(&[r#"{"id":1}"#]));
        assert_eq!(expired.json().len(), 1);
    }

    fn id_events(ids: impl Iterator<Item = i64>, ts: impl Fn(i64) -> i64) -> Vec<Event> {
        let lines: Vec<String> = ids
            .map(|i| format!(r#"{{"id":{i},"ts":{}}}"#, ts(i)))
            .collect();
        events(&lines.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn key_hash(id: &str) -> u64 {
        let event = Event::parse(format!(r#"{{"id":"{id}"}}"#).into_bytes()).unwrap();
        let mut key = Vec::new();
        encode_key(&event.value, &[FieldPath::new("id")], &mut key).unwrap();
        hash64(&key)
    }

    fn upserts(changes: &[StateChange]) -> Vec<&StateChange> {
        changes.iter().filter(|c| c.value.is_some()).collect()
    }

    #[test]
    fn a_batch_of_passing_events_is_one_changelog_record() {
        let mut op = dedup(60_000, None);
        let mut batch = id_events(0..5000, |_| 0);
        batch.extend(id_events(0..100, |_| 0));
        let out = run_at(&mut op, 1000, batch);
        assert_eq!(out.json().len(), 5000);
        assert_eq!(out.dropped, 100);
        let records = upserts(&out.changes);
        assert_eq!(
            records.len(),
            2,
            "5,000 entries in records of {ENTRIES_PER_RECORD}"
        );
        assert_eq!(out.changes.len(), 2, "nothing has expired");
        let sizes: Vec<usize> = records
            .iter()
            .map(|r| r.value.as_ref().unwrap().len() / ENTRY_LEN)
            .collect();
        assert_eq!(sizes, vec![ENTRIES_PER_RECORD, 5000 - ENTRIES_PER_RECORD]);
        assert!(records.iter().all(|r| r.key.len() == RECORD_KEY_LEN));

        let mut restored = dedup(60_000, None);
        restored.restore(out.changes).unwrap();
        assert_eq!(restored.state_entries(), 5000);
        let again = run_at(
            &mut restored,
            2000,
            id_events([7, 4999, 5000].into_iter(), |_| 0),
        );
        assert_eq!(again.json(), vec![r#"{"id":5000,"ts":0}"#]);
    }

    #[test]
    fn a_record_is_deleted_once_every_entry_in_it_has_expired() {
        let mut op = dedup(800, Some("ts"));
        let mut changes = Vec::new();
        // Ten batches of ten keys; batch k holds times k*1000 .. k*1000+900.
        for k in 0..10 {
            let out = run_at(&mut op, 0, id_events(k * 10..k * 10 + 10, |i| i * 100));
            assert_eq!(out.json().len(), 10);
            changes.extend(out.changes);
        }
        // Watermark 9900: only keys with t0 > 9100 can still be live.
        assert!(op.state_entries() <= 9, "{} live keys", op.state_entries());
        let written: Vec<Vec<u8>> = upserts(&changes).iter().map(|c| c.key.clone()).collect();
        let deleted: Vec<Vec<u8>> = changes
            .iter()
            .filter(|c| c.value.is_none())
            .map(|c| c.key.clone())
            .collect();
        assert_eq!(written.len(), 10);
        // Batches 0..=8 end at or before 8900, and 8900 + 800 <= 9900.
        assert_eq!(deleted, written[..9].to_vec());
        let compacted = crate::state::compact(changes);
        assert_eq!(compacted.len(), 1);
        assert_eq!(compacted[0].0, written[9]);

        let mut restored = dedup(800, Some("ts"));
        restored
            .restore(
                compacted
                    .into_iter()
                    .map(|(key, value)| StateChange::upsert(key, value))
                    .collect(),
            )
            .unwrap();
        let redelivered = run_at(&mut restored, 0, id_events(92..100, |i| i * 100));
        assert_eq!(redelivered.dropped, 8, "every live key is restored");
    }

    #[test]
    fn per_key_records_of_earlier_versions_restore_and_are_deleted_per_key() {
        let legacy = |id: &str, t0: Option<i64>| StateChange {
            key: key_hash(id).to_be_bytes().to_vec(),
            value: t0.map(|t| t.to_be_bytes().to_vec()),
        };
        let mut changelog = vec![
            legacy("a", Some(0)),
            legacy("b", Some(0)),
            legacy("c", Some(0)),
            legacy("c", None),
        ];
        let mut op = dedup(1000, Some("ts"));
        op.restore(changelog.clone()).unwrap();
        assert_eq!(op.state_entries(), 2);

        // a's window ends at 1000, before the next sweep (at 990 + 1000/8).
        let first = run_at(
            &mut op,
            0,
            events(&[
                r#"{"id":"b","ts":500}"#,
                r#"{"id":"y","ts":990}"#,
                r#"{"id":"a","ts":1000}"#,
            ]),
        );
        assert_eq!(
            first.json(),
            vec![r#"{"id":"y","ts":990}"#, r#"{"id":"a","ts":1000}"#]
        );
        assert_eq!(first.dropped, 1, "b is a duplicate of its restored entry");
        assert!(
            first.changes.contains(&legacy("a", None)),
            "a passed again: its per-key record is deleted"
        );
        let second = run_at(&mut op, 0, events(&[r#"{"id":"d","ts":3000}"#]));
        assert!(
            second.changes.contains(&legacy("b", None)),
            "b expired: its per-key record is deleted"
        );
        changelog.extend(first.changes);
        changelog.extend(second.changes);
        let compacted = crate::state::compact(changelog);
        assert_eq!(compacted.len(), 1, "only d's record is left: {compacted:?}");
        assert_eq!(compacted[0].0.len(), RECORD_KEY_LEN);
    }

    #[test]
    fn malformed_changelog_records_are_refused_with_the_reason() {
        let mut op = dedup(1000, None);
        let short = op.restore(vec![StateChange::upsert(vec![1; 5], vec![0; 16])]);
        assert_eq!(
            short,
            Err(StateError::KeyLength {
                expected: RECORD_KEY_LEN,
                found: 5
            })
        );
        let mut key = record_key((0, 0));
        let torn = op.restore(vec![StateChange::upsert(key.clone(), vec![0; 15])]);
        assert!(
            matches!(&torn, Err(StateError::Value { message, .. }) if message.contains("found 15")),
            "{torn:?}"
        );
        key[0] = 2;
        let newer = op.restore(vec![StateChange::upsert(key, vec![0; 16])]);
        assert!(
            matches!(&newer, Err(StateError::Value { message, .. }) if message.contains("version 2")),
            "{newer:?}"
        );
    }

    #[test]
    fn a_far_future_event_time_does_not_expire_every_key() {
        let now = 1_767_225_600_000; // 2026-01-01
        let mut op = dedup(60_000, Some("ts"));
        let first = run_at(
            &mut op,
            now,
            events(&[
                &format!(r#"{{"id":"a","ts":{now}}}"#),
                &format!(r#"{{"id":"b","ts":{}}}"#, now + 1),
            ]),
        );
        assert_eq!(first.json().len(), 2);
        let future = run_at(
            &mut op,
            now + 2,
            events(&[
                &format!(r#"{{"id":"x","ts":{}}}"#, i64::MAX),
                &format!(r#"{{"id":"y","ts":{}}}"#, now + MAX_EVENT_TIME_AHEAD_MS + 3),
            ]),
        );
        assert_eq!(future.json().len(), 0);
        assert_eq!(future.dead.len(), 2);
        assert!(
            future.dead[0].reason.starts_with(
                "dedup: event time 9223372036854775807 ms since the epoch in field \"ts\" is more than 1 hour ahead of processing time 2026-01-01T00:00:00.002Z"
            ),
            "{}",
            future.dead[0].reason
        );
        // Redeliveries of the earlier keys are still duplicates.
        let redelivered = run_at(
            &mut op,
            now + 3,
            events(&[
                &format!(r#"{{"id":"a","ts":{now}}}"#),
                &format!(r#"{{"id":"b","ts":{}}}"#, now + 1),
            ]),
        );
        assert_eq!(redelivered.json().len(), 0);
        assert_eq!(redelivered.dropped, 2);
        assert_eq!(op.state_entries(), 2);
        // Up to the bound an event time is taken as it is.
        let ahead = run_at(
            &mut op,
            now + 4,
            events(&[&format!(
                r#"{{"id":"c","ts":{}}}"#,
                now + 4 + MAX_EVENT_TIME_AHEAD_MS
            )]),
        );
        assert_eq!(ahead.json().len(), 1);
    }

    #[test]
    fn checkpoint_restore_continues_like_an_uninterrupted_run() {
        let input: Vec<String> = (0..200)
            .map(|i| format!(r#"{{"id":{},"ts":{}}}"#, (i * 7) % 31, i * 10))
            .collect();
        let refs: Vec<&str> = input.iter().map(String::as_str).collect();
        let (whole, resumed) = run_split(|| dedup(300, Some("ts")), &refs, 77);
        assert_eq!(whole, resumed);
    }
}
