//! `_SUCCESS` markers of time folders, kept in the store itself so that they
//! survive the instance that published into a folder and agree across
//! instances:
//!
//! - `_keystone/event-time/<partition>/<micros>`: the highest event time
//!   published from each input partition (one key each, names only: one
//!   listing reads them all). Event time is the lowest of them: a folder is
//!   complete when every partition has moved past its end;
//! - `_keystone/awaiting/<end micros>/<folder>/pending`: a time folder that
//!   was published into and is not complete yet.
//!
//! Whoever publishes next (any instance) writes `_SUCCESS` in each awaiting
//! folder whose end event time has passed, then forgets it. Readers skip the
//! `_keystone` folder like every name starting with `_`.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutPayload};

use super::layout::{SUCCESS, join};
use super::store::Store;
use crate::connectors::lake::LakeError;

const EVENT_TIME: &str = "_keystone/event-time";
const AWAITING: &str = "_keystone/awaiting";
const PENDING: &str = "pending";

/// The completion bookkeeping of one sink.
pub struct Marks<'a> {
    pub store: &'a Store,
    pub io: &'a tokio::runtime::Runtime,
}

impl Marks<'_> {
    fn list(&self, prefix: &str) -> Result<Vec<String>, LakeError> {
        let base = self.store.path(prefix);
        let objects = self.store.objects.clone();
        let listed = self
            .io
            .block_on(objects.list(Some(&base)).try_collect::<Vec<_>>())
            .map_err(|source| self.error(prefix, source))?;
        Ok(listed
            .into_iter()
            .filter_map(|meta| {
                let parts: Vec<String> = meta
                    .location
                    .prefix_match(&base)?
                    .map(|p| p.as_ref().to_owned())
                    .collect();
                Some(parts.join("/"))
            })
            .collect())
    }

    fn put(&self, relative: &str) -> Result<(), LakeError> {
        let objects = self.store.objects.clone();
        self.io
            .block_on(objects.put(&self.store.path(relative), PutPayload::new()))
            .map(|_| ())
            .map_err(|source| self.error(relative, source))
    }

    fn delete(&self, relative: &str) -> Result<(), LakeError> {
        let objects = self.store.objects.clone();
        match self.io.block_on(objects.delete(&self.store.path(relative))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(self.error(relative, source)),
        }
    }

    fn error(&self, relative: &str, source: object_store::Error) -> LakeError {
        LakeError::Store {
            location: self.store.show(relative),
            source,
        }
    }

    /// Records the folders just published into that have an end.
    pub fn await_folders(&self, folders: &BTreeMap<String, i64>) -> Result<(), LakeError> {
        for (folder, end) in folders {
            self.put(&format!("{AWAITING}/{end}/{folder}/{PENDING}"))?;
        }
        Ok(())
    }

    /// Records the highest event time published per input partition (a time
    /// lower than the one recorded, as after a replay, changes nothing), and
    /// returns event time: the lowest of every partition's, once any has one.
    pub fn advance(&self, event_time: &BTreeMap<i32, i64>) -> Result<Option<i64>, LakeError> {
        let mut recorded = self.event_times()?;
        for (&partition, &micros) in event_time {
            let old = recorded.get(&partition).copied();
            if old.is_some_and(|old| old >= micros) {
                continue;
            }
            self.put(&format!("{EVENT_TIME}/{partition}/{micros}"))?;
            if let Some(old) = old {
                self.delete(&format!("{EVENT_TIME}/{partition}/{old}"))?;
            }
            recorded.insert(partition, micros);
        }
        Ok(recorded.values().min().copied())
    }

    /// The recorded event time of each input partition.
    fn event_times(&self) -> Result<BTreeMap<i32, i64>, LakeError> {
        let mut times: BTreeMap<i32, i64> = BTreeMap::new();
        for key in self.list(EVENT_TIME)? {
            let Some((partition, micros)) = key.split_once('/') else {
                continue;
            };
            if let (Ok(partition), Ok(micros)) = (partition.parse(), micros.parse::<i64>()) {
                let time = times.entry(partition).or_insert(micros);
                *time = (*time).max(micros);
            }
        }
        Ok(times)
    }

    /// Writes `_SUCCESS` in every awaiting folder that event time
    /// (`watermark`) has passed; returns those folders.
    pub fn mark_complete(&self, watermark: i64) -> Result<Vec<String>, LakeError> {
        let mut marked = Vec::new();
        for key in self.list(AWAITING)? {
            let Some((end, rest)) = key.split_once('/') else {
                continue;
            };
            let (Ok(end), Some(folder)) = (
                end.parse::<i64>(),
                rest.strip_suffix(&format!("/{PENDING}")),
            ) else {
                continue;
            };
            if end <= watermark {
                self.put(&join(folder, SUCCESS))?;
                self.delete(&format!("{AWAITING}/{key}"))?;
                marked.push(folder.to_owned());
            }
        }
        Ok(marked)
    }
}
