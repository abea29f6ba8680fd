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
//! - **Changelog**: `hash (8 bytes, big-endian) -> t0 (8 bytes)` on every pass,
//!   a tombstone on eviction.

use std::collections::hash_map::Entry;

use keystone_crds::ops::DedupSpec;

use crate::event::{Event, FieldPath, encode_key, timestamp_ms};
use crate::operator::{Ctx, Operator, Output};
use crate::state::{HashKeyed, StateChange, StateError, hash64, hex, read_i64};

/// How far ahead of processing time an event time may be, in milliseconds.
pub const MAX_EVENT_TIME_AHEAD_MS: i64 = 60 * 60 * 1000;

pub struct Dedup {
    key: Vec<FieldPath>,
    window_ms: i64,
    event_time: Option<FieldPath>,
    first_seen: HashKeyed<u64, i64>,
    watermark: i64,
    next_sweep: i64,
    key_buf: Vec<u8>,
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
            let record = out.records_changes();
            let mut evicted = Vec::new();
            self.first_seen.retain(|hash, t0| {
                let live = t0.saturating_add(window) > watermark;
                if !live && record {
                    evicted.push(*hash);
                }
                live
            });
            for hash in evicted {
                out.change(|| StateChange::delete(hash.to_be_bytes().to_vec()));
            }
            self.next_sweep = watermark.saturating_add(self.sweep_interval());
        }
    }
}

/// Epoch milliseconds as RFC 3339 when chrono can show them, else as a number.
fn describe_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("{ms} ms since the epoch"))
}

impl Operator for Dedup {
    fn process(&mut self, event: Event, ctx: &Ctx, out: &mut Output) {
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
                out.drop_event(event);
            }
            Entry::Occupied(mut seen) => {
                seen.insert(time);
                out.change(|| {
                    StateChange::upsert(hash.to_be_bytes().to_vec(), time.to_be_bytes().to_vec())
                });
                out.emit(event);
            }
            Entry::Vacant(slot) => {
                slot.insert(time);
                out.change(|| {
                    StateChange::upsert(hash.to_be_bytes().to_vec(), time.to_be_bytes().to_vec())
                });
                out.emit(event);
            }
        }
    }

    fn process_batch(&mut self, batch: &mut Vec<Event>, ctx: &Ctx, out: &mut Output) {
        for event in batch.drain(..) {
            self.process(event, ctx, out);
        }
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
        let mut records: Vec<StateChange> = self
            .first_seen
            .iter()
            .map(|(hash, t0)| {
                StateChange::upsert(hash.to_be_bytes().to_vec(), t0.to_be_bytes().to_vec())
            })
            .collect();
        records.sort_by(|a, b| a.key.cmp(&b.key));
        records
    }

    fn restore(&mut self, changes: Vec<StateChange>) -> Result<(), StateError> {
        self.first_seen.clear();
        for change in changes {
            let key: [u8; 8] =
                change
                    .key
                    .as_slice()
                    .try_into()
                    .map_err(|_| StateError::KeyLength {
                        expected: 8,
                        found: change.key.len(),
                    })?;
            let hash = u64::from_be_bytes(key);
            match change.value {
                None => {
                    self.first_seen.remove(&hash);
                }
                Some(value) => {
                    let t0 = read_i64(&value, 0)
                        .filter(|_| value.len() == 8)
                        .ok_or_else(|| StateError::Value {
                            key: hex(&change.key),
                            message: format!("expected 8 bytes, found {}", value.len()),
                        })?;
                    self.first_seen.insert(hash, t0);
                }
            }
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

    #[test]
    fn expired_keys_are_evicted_with_tombstones() {
        let mut op = dedup(800, Some("ts"));
        let input: Vec<String> = (0..100)
            .map(|i| format!(r#"{{"id":{i},"ts":{}}}"#, i * 100))
            .collect();
        let refs: Vec<&str> = input.iter().map(String::as_str).collect();
        let out = run_at(&mut op, 0, events(&refs));
        assert_eq!(out.json().len(), 100);
        // Watermark 9900: only keys with t0 > 9100 can still be live.
        assert!(op.state_entries() <= 9, "{} live keys", op.state_entries());
        assert!(out.changes.iter().any(|c| c.value.is_none()));
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
