//! The Hive-style Parquet sink: rows of the output contract in zstd Parquet
//! files under `field=value/` folders, on a local folder or an S3-compatible
//! store, exactly once (see [`lake`](super::lake) for the protocol).
//!
//! - [`Sink::write`] routes each event to its folder's open file (an event
//!   that fits no folder or no row is a dead letter naming the field);
//! - a file closes when it reaches [`FILE_BYTES`], when `rollInterval` has
//!   passed, and at every `prepare`; closed files are uploaded under
//!   `_staging/<instance>/<epoch>/`, with the name they will be published as;
//! - [`Sink::publish`] moves each staged file into place (rename, or copy and
//!   delete on S3): a reader never sees a partial or uncommitted file, and a
//!   publish repeated after a crash moves what is left;
//! - when event time (the lowest of the input partitions' highest published
//!   times) passes the end of a `day` or `hour` folder, the next publish
//!   writes `_SUCCESS` there (bookkeeping in the store: `marks`).
//!
//! A store that is down makes `prepare` answer `Pending` (the host holds its
//! input and asks again) and leaves publishing to the next commit: nothing is
//! lost, nothing is published twice.

mod layout;
mod marks;
mod store;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use futures::TryStreamExt;
use keystone_crds::plan::PlanSink;
use object_store::{ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use self::layout::{Folder, Layout, file_name, join, staging_prefix};
use self::marks::Marks;
use self::store::Store;
use super::StagedEpochs;
use super::lake::columns::{Column, columns_of};
use super::lake::provenance::{Replay, Runs};
use super::lake::rows::Rows;
use super::lake::{EpochLedger, LakeError};
use super::{Guarantee, Prepared, Sink, SinkContext, SinkError, SinkOutput, SinkRecord};
use crate::event::DeadLetter;

/// A file closes when its rows reach this many bytes of values (see
/// [`Rows::bytes`]).
pub const FILE_BYTES: usize = 128 * 1024 * 1024;
/// Where published epochs record their source records.
const PROVENANCE: &str = "_keystone/provenance";
/// Closed files waiting for upload beyond this hold the host's input.
const MAX_UNUPLOADED_BYTES: usize = 256 * 1024 * 1024;

/// The Parquet sink (see the module documentation).
pub struct ParquetSink {
    name: String,
    step: String,
    /// The columns in the files: the contract's, less the folder fields.
    columns: Arc<Vec<Column>>,
    layout: Layout,
    store: Store,
    io: tokio::runtime::Runtime,
    properties: WriterProperties,
    roll_interval: Duration,
    ledger: EpochLedger,
    /// Open files of the current epoch, per folder.
    open: BTreeMap<Folder, OpenFile>,
    /// Files of the current epoch per folder so far (the next file's number).
    files_in_epoch: BTreeMap<Folder, usize>,
    /// Closed files of the current epoch not yet uploaded: (staged path, bytes).
    unuploaded: Vec<(String, Vec<u8>)>,
    unuploaded_bytes: usize,
    /// The folders of each staged, unpublished epoch, and the event time
    /// per input partition its files reach.
    staged_folders: BTreeMap<u64, (Vec<Folder>, BTreeMap<i32, i64>)>,
    /// The highest event time written per input partition (epoch microseconds).
    event_time: BTreeMap<i32, i64>,
    /// The source records of the current epoch's rows.
    provenance: Runs,
    /// After a rollback: what the replay must not write again.
    replay: Replay,
    /// After a rollback: where the replay starts (`None`: every partition
    /// from its beginning), to read the published provenance again from.
    replay_from: Option<BTreeMap<i32, i64>>,
}

/// One file's rows as zstd Parquet.
fn encode(batch: &RecordBatch, properties: &WriterProperties) -> Result<Vec<u8>, LakeError> {
    let mut writer = ArrowWriter::try_new(Vec::new(), batch.schema(), Some(properties.clone()))?;
    writer.write(batch)?;
    Ok(writer.into_inner()?)
}

struct OpenFile {
    rows: Rows,
    opened: Instant,
}

impl ParquetSink {
    /// Builds the sink of `sink`, reading the store's credentials from the
    /// environment. The store is not contacted until the first upload.
    pub fn connect(sink: &PlanSink, context: &SinkContext<'_>) -> Result<ParquetSink, SinkError> {
        let _ = context;
        Self::build(sink, &|name| std::env::var(name).ok()).map_err(|source| SinkError::Lake {
            sink: sink.name.clone(),
            source: Box::new(source),
        })
    }

    fn build(sink: &PlanSink, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, LakeError> {
        let Some(spec) = &sink.spec.parquet else {
            return Err(LakeError::Path {
                path: String::new(),
                message: "the sink sets no parquet settings".to_owned(),
            });
        };
        let layout = Layout::new(&spec.partition_by)?;
        let folder_fields = layout.folder_fields();
        let columns: Vec<Column> = columns_of(&sink.schema)?
            .into_iter()
            .filter(|c| !folder_fields.contains(&c.name.as_str()))
            .collect();
        let store = Store::open(&sink.spec, env)?;
        let io = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(LakeError::Runtime)?;
        let properties = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .build();
        let ledger = EpochLedger::new();
        tracing::info!(
            sink = %sink.name,
            path = %store.location,
            instance = %ledger.instance,
            "parquet sink ready"
        );
        Ok(ParquetSink {
            step: format!("sink:{}", sink.name),
            name: sink.name.clone(),
            columns: Arc::new(columns),
            layout,
            store,
            io,
            properties,
            roll_interval: spec.roll_interval.as_std(),
            ledger,
            open: BTreeMap::new(),
            files_in_epoch: BTreeMap::new(),
            unuploaded: Vec::new(),
            unuploaded_bytes: 0,
            staged_folders: BTreeMap::new(),
            event_time: BTreeMap::new(),
            provenance: Runs::default(),
            replay: Replay::default(),
            replay_from: None,
        })
    }

    fn error(&self, source: LakeError) -> SinkError {
        SinkError::Lake {
            sink: self.name.clone(),
            source: Box::new(source),
        }
    }

    /// Closes the open file of `folder`: encoded, and queued for upload under
    /// the current epoch's staging prefix.
    fn close(&mut self, folder: &Folder) -> Result<(), LakeError> {
        let Some(batch) = self.take_file(folder)? else {
            return Ok(());
        };
        let bytes = encode(&batch, &self.properties)?;
        self.queue(folder, bytes);
        Ok(())
    }

    /// Closes every open file, encoding them on two threads (a commit closes
    /// a file per folder, and encoding is most of a commit's work).
    fn close_all(&mut self) -> Result<(), LakeError> {
        let folders: Vec<Folder> = self.open.keys().cloned().collect();
        let mut batches = Vec::new();
        for folder in folders {
            if let Some(batch) = self.take_file(&folder)? {
                batches.push((folder, batch));
            }
        }
        let properties = &self.properties;
        let encoded: Vec<(Folder, Result<Vec<u8>, LakeError>)> = std::thread::scope(|scope| {
            // The second half on another thread, the first here.
            let half = batches.len() / 2;
            let (mine, theirs) = batches.split_at(batches.len() - half);
            let other = (!theirs.is_empty()).then(|| {
                scope.spawn(move || {
                    theirs
                        .iter()
                        .map(|(folder, batch)| (folder.clone(), encode(batch, properties)))
                        .collect::<Vec<_>>()
                })
            });
            let mut encoded: Vec<_> = mine
                .iter()
                .map(|(folder, batch)| (folder.clone(), encode(batch, properties)))
                .collect();
            if let Some(other) = other {
                encoded.extend(
                    other
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                );
            }
            encoded
        });
        for (folder, bytes) in encoded {
            self.queue(&folder, bytes?);
        }
        Ok(())
    }

    /// Takes the rows of `folder`'s open file, which closes; `None` for no file.
    fn take_file(&mut self, folder: &Folder) -> Result<Option<RecordBatch>, LakeError> {
        let Some(mut file) = self.open.remove(folder) else {
            return Ok(None);
        };
        if file.rows.is_empty() {
            return Ok(None);
        }
        Ok(Some(file.rows.take_batch()?))
    }

    /// Queues a closed file of `folder` for upload under the current epoch's
    /// staging prefix.
    fn queue(&mut self, folder: &Folder, bytes: Vec<u8>) {
        let n = self.files_in_epoch.entry(folder.clone()).or_insert(0);
        let name = file_name(&self.ledger.instance, self.ledger.current, *n);
        *n += 1;
        let staged = join(
            &staging_prefix(&self.ledger.instance, self.ledger.current),
            &join(&folder.path, &name),
        );
        self.unuploaded_bytes += bytes.len();
        self.unuploaded.push((staged, bytes));
    }

    /// Uploads the closed files; false when the store did not take them all
    /// (the rest are tried again).
    fn upload(&mut self) -> bool {
        while let Some((staged, bytes)) = self.unuploaded.last() {
            let path = self.store.path(staged);
            let payload = PutPayload::from(bytes.clone());
            let objects = self.store.objects.clone();
            if let Err(error) = self.io.block_on(objects.put(&path, payload)) {
                tracing::warn!(sink = %self.name, file = %self.store.show(staged), %error, "staging a file failed; trying again at the next commit");
                return false;
            }
            self.unuploaded_bytes -= bytes.len();
            self.unuploaded.pop();
        }
        true
    }

    /// Moves every staged file of one epoch into place. Files already moved
    /// (by an earlier try, or by another instance recovering the same epoch)
    /// are simply not there any more.
    fn publish_epoch(&self, instance: &str, epoch: u64) -> Result<(), LakeError> {
        let prefix_text = staging_prefix(instance, epoch);
        let prefix = self.store.path(&prefix_text);
        let objects = self.store.objects.clone();
        let store_error = |source| LakeError::Store {
            location: self.store.show(&prefix_text),
            source,
        };
        let staged: Vec<_> = self
            .io
            .block_on(objects.list(Some(&prefix)).try_collect::<Vec<_>>())
            .map_err(store_error)?;
        for object in staged {
            let Some(relative) = object.location.prefix_match(&prefix) else {
                continue;
            };
            let target = self.store.path_of_parts(relative);
            match self.io.block_on(objects.rename(&object.location, &target)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(source) => return Err(store_error(source)),
            }
        }
        Ok(())
    }

    /// Publishes every staged epoch the last commit covers; on failure they
    /// stay staged (and named in the next commits) and are tried again.
    fn publish_staged(&mut self) -> Result<(), LakeError> {
        let markers = self.ledger.staged_markers();
        for marker in &markers {
            for epoch in marker.epochs() {
                self.publish_epoch(&marker.instance, epoch)?;
            }
        }
        self.ledger.recovered.clear();
        let mut folders: BTreeMap<String, i64> = BTreeMap::new();
        let mut event_time: BTreeMap<i32, i64> = BTreeMap::new();
        if let Some(own) = self.ledger.marker() {
            for epoch in own.epochs() {
                let (staged, times) = self.staged_folders.remove(&epoch).unwrap_or_default();
                for folder in staged {
                    if let Some(end) = folder.ends_at {
                        folders.insert(folder.path, end);
                    }
                }
                for (partition, micros) in times {
                    let time = event_time.entry(partition).or_insert(micros);
                    *time = (*time).max(micros);
                }
            }
        }
        self.ledger.published();
        if self.layout.time_field().is_some() {
            let marks = Marks {
                store: &self.store,
                io: &self.io,
            };
            marks.await_folders(&folders)?;
            let Some(watermark) = marks.advance(&event_time)? else {
                return Ok(());
            };
            for folder in marks.mark_complete(watermark)? {
                tracing::debug!(sink = %self.name, %folder, "time folder complete");
            }
        }
        Ok(())
    }

    /// Queues the current epoch's source records for staging beside its
    /// files: `_keystone/provenance/<partition>/<first>-<last>-<instance>-<epoch>`
    /// once published (names sort by offset; the text holds the runs).
    fn stage_provenance(&mut self) {
        let prefix = staging_prefix(&self.ledger.instance, self.ledger.current);
        for (partition, first, last, runs) in self.provenance.by_partition() {
            let key = format!(
                "{prefix}/{PROVENANCE}/{partition}/{first:020}-{last:020}-{}-{:08}",
                self.ledger.instance, self.ledger.current
            );
            self.unuploaded_bytes += runs.len();
            self.unuploaded.push((key, runs.into_bytes()));
        }
        self.provenance.clear();
    }

    /// Reads the source records the lake holds from `from` on (see
    /// [`Sink::suppress_replay`]).
    fn load_delivered(&self, from: Option<&BTreeMap<i32, i64>>) -> Result<Runs, LakeError> {
        let mut delivered = Runs::default();
        let objects = self.store.objects.clone();
        let base = self.store.path(PROVENANCE);
        let store_error = |source| LakeError::Store {
            location: self.store.show(PROVENANCE),
            source,
        };
        let listed = self
            .io
            .block_on(objects.list(Some(&base)).try_collect::<Vec<_>>())
            .map_err(store_error)?;
        for object in listed {
            let Some(parts) = object.location.prefix_match(&base) else {
                continue;
            };
            let parts: Vec<String> = parts.map(|p| p.as_ref().to_owned()).collect();
            let [partition, name] = parts.as_slice() else {
                continue;
            };
            let Ok(partition) = partition.parse::<i32>() else {
                continue;
            };
            let start = match from {
                Some(from) => match from.get(&partition) {
                    Some(offset) => *offset,
                    None => continue,
                },
                None => 0,
            };
            let last = name
                .split('-')
                .nth(1)
                .and_then(|l| l.parse::<i64>().ok())
                .unwrap_or(i64::MAX);
            if last < start {
                continue;
            }
            let bytes = self
                .io
                .block_on(async { objects.get(&object.location).await?.bytes().await })
                .map_err(store_error)?;
            let text = String::from_utf8_lossy(&bytes);
            if !delivered.add_text(partition, &text, start) {
                tracing::warn!(sink = %self.name, file = %object.location, "unreadable provenance file ignored");
            }
        }
        Ok(delivered)
    }

    fn refuse(&self, record: &SinkRecord<'_>, reason: String, out: &mut SinkOutput) {
        out.dead_letters.push(DeadLetter {
            step: self.step.clone(),
            reason,
            original: record.event.raw.clone(),
        });
    }
}

impl Sink for ParquetSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn guarantee(&self) -> Guarantee {
        Guarantee::TwoPhase
    }

    fn takes_serialized(&self) -> bool {
        false
    }

    fn write(&mut self, record: &SinkRecord<'_>, out: &mut SinkOutput) -> Result<(), SinkError> {
        let source = record.event.source;
        if self.replay.skips(source) {
            return Ok(());
        }
        let value = &record.event.value;
        let folder = match self.layout.folder_of(value) {
            Ok(folder) => folder,
            Err(reason) => {
                self.refuse(record, reason, out);
                return Ok(());
            }
        };
        let columns = &self.columns;
        let file = self.open.entry(folder.clone()).or_insert_with(|| OpenFile {
            rows: Rows::new(columns.clone()),
            opened: Instant::now(),
        });
        if let Err(reason) = file.rows.push(value) {
            self.refuse(record, reason, out);
            return Ok(());
        }
        if let Some(source) = source {
            self.provenance.record(source.partition, source.offset);
        }
        let full = file.rows.bytes() >= FILE_BYTES;
        let old = file.opened.elapsed() >= self.roll_interval;
        if let Some(micros) = self.layout.event_time(value) {
            let partition = record.event.source.map_or(-1, |s| s.partition);
            let seen = self.event_time.entry(partition).or_insert(micros);
            *seen = (*seen).max(micros);
        }
        let result = if old {
            self.close_all()
        } else if full {
            self.close(&folder)
        } else {
            Ok(())
        };
        result.map_err(|e| self.error(e))
    }

    fn backpressured(&self) -> bool {
        self.unuploaded_bytes >= MAX_UNUPLOADED_BYTES
    }

    fn prepare(&mut self, _wait: Duration, _out: &mut SinkOutput) -> Result<Prepared, SinkError> {
        self.close_all().map_err(|e| self.error(e))?;
        self.stage_provenance();
        if !self.upload() {
            return Ok(Prepared::Pending);
        }
        if !self.files_in_epoch.is_empty() {
            let folders: Vec<Folder> = std::mem::take(&mut self.files_in_epoch)
                .into_keys()
                .collect();
            self.staged_folders
                .insert(self.ledger.current, (folders, self.event_time.clone()));
            self.ledger.staged();
        }
        Ok(Prepared::Ready)
    }

    fn staged(&self) -> Vec<StagedEpochs> {
        self.ledger.staged_markers()
    }

    fn publish(&mut self) -> Result<(), SinkError> {
        if let Err(error) = self.publish_staged() {
            // The epochs stay staged and named in the next commits: publishing
            // is tried again then, or by whoever reads these partitions next.
            tracing::warn!(sink = %self.name, %error, "publishing staged files failed; trying again at the next commit");
        }
        Ok(())
    }

    fn abort(&mut self) {
        self.open.clear();
        self.provenance.clear();
        self.files_in_epoch.clear();
        self.unuploaded.clear();
        self.unuploaded_bytes = 0;
        // What the last commit covers is named in its metadata, and comes back
        // through `recover`; the rest is never published. The next epoch gets
        // a new number, so nothing staged now is reused.
        self.ledger.published();
        self.staged_folders.clear();
        self.ledger.current += 1;
    }

    fn suppress_replay(
        &mut self,
        from: Option<&BTreeMap<i32, i64>>,
        suppressed: prometheus::IntCounter,
    ) -> Result<(), SinkError> {
        let delivered = self.load_delivered(from).map_err(|e| self.error(e))?;
        self.replay = Replay::new(delivered, suppressed);
        self.replay_from = from.cloned();
        tracing::info!(sink = %self.name, held = self.replay.held(), "the replay skips the source records the lake holds");
        Ok(())
    }

    fn recover(&mut self, staged: Vec<StagedEpochs>) -> Result<(), SinkError> {
        for marker in self.ledger.recover(staged) {
            tracing::info!(sink = %self.name, epochs = %marker, "publishing epochs a commit names, if still staged");
        }
        if !self.replay.is_active() || self.ledger.recovered.is_empty() {
            return Ok(());
        }
        // The replay must skip what these epochs hold too: they are published
        // now, and the provenance read again, before it starts.
        self.publish_staged().map_err(|e| self.error(e))?;
        let delivered = self
            .load_delivered(self.replay_from.as_ref())
            .map_err(|e| self.error(e))?;
        self.replay.renew(delivered);
        tracing::info!(sink = %self.name, held = self.replay.held(), "published the recovered epochs before the replay; it skips what they hold too");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
