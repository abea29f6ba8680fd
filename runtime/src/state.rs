//! Keyed state as the Kafka runtime persists it: every change is one record of a
//! compacted changelog topic, `key -> value` for an upsert and `key -> tombstone`
//! for a delete. A full snapshot is the same records for every live key, so
//! restoring from a snapshot and restoring from a compacted changelog are one code
//! path: apply the records in order, last write per key wins.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// One changelog record.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StateChange {
    pub key: Vec<u8>,
    /// `None` is a tombstone: the key was deleted.
    pub value: Option<Vec<u8>>,
}

impl StateChange {
    pub fn upsert(key: Vec<u8>, value: Vec<u8>) -> Self {
        Self {
            key,
            value: Some(value),
        }
    }

    pub fn delete(key: Vec<u8>) -> Self {
        Self { key, value: None }
    }
}

/// A changelog record that an operator cannot read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("changelog record with a {found}-byte key, expected {expected} bytes")]
    KeyLength { expected: usize, found: usize },
    #[error("changelog record for key {key} has a malformed value: {message}")]
    Value { key: String, message: String },
    #[error("the operator keeps no state, but {records} changelog records were given")]
    Stateless { records: usize },
}

/// Compacts records in changelog order: the last write per key, tombstones removed.
pub fn compact(changes: impl IntoIterator<Item = StateChange>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut latest: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>> = Default::default();
    for change in changes {
        latest.insert(change.key, change.value);
    }
    latest
        .into_iter()
        .filter_map(|(key, value)| value.map(|v| (key, v)))
        .collect()
}

/// A hasher for keys that already are hashes (xxh3 of the key bytes): it passes
/// them through instead of hashing them again.
#[derive(Default, Clone, Copy)]
pub struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached for key types other than u64/u128; fold them in.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn write_u128(&mut self, n: u128) {
        self.0 = (n as u64) ^ ((n >> 64) as u64);
    }
}

/// A map keyed by key hashes.
pub type HashKeyed<K, V> = HashMap<K, V, BuildHasherDefault<PassThroughHasher>>;

/// 64-bit xxh3 of canonical key bytes. Stable across processes and versions,
/// which the changelog needs.
pub fn hash64(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// 128-bit xxh3 of canonical key bytes.
pub fn hash128(bytes: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(bytes)
}

pub(crate) fn read_i64(bytes: &[u8], at: usize) -> Option<i64> {
    let slice = bytes.get(at..at + 8)?;
    Some(i64::from_be_bytes(slice.try_into().ok()?))
}

pub(crate) fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let slice = bytes.get(at..at + 4)?;
    Some(u32::from_be_bytes(slice.try_into().ok()?))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compaction_keeps_the_last_write() {
        let records = vec![
            StateChange::upsert(b"a".to_vec(), b"1".to_vec()),
            StateChange::upsert(b"b".to_vec(), b"1".to_vec()),
            StateChange::upsert(b"a".to_vec(), b"2".to_vec()),
            StateChange::delete(b"b".to_vec()),
        ];
        assert_eq!(compact(records), vec![(b"a".to_vec(), b"2".to_vec())]);
    }

    #[test]
    fn hashes_are_stable() {
        // The changelog outlives the process: a changed hash would orphan all state.
        assert_eq!(hash64(b"order-1"), hash64(b"order-1"));
        assert_ne!(hash64(b"order-1"), hash64(b"order-2"));
        assert_eq!(hash64(b""), 0x2d06800538d394c2);
    }
}
