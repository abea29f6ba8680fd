//! The Iceberg sink: rows of the output contract appended to an Apache
//! Iceberg table through a REST catalog, exactly once (see
//! [`lake`](super::lake) for the protocol, [`commit`] for how snapshots
//! name their epochs).
//!
//! - The table is loaded, or created from the contract's columns with the
//!   partition spec of `partitionBy` (and its namespace with it), when the
//!   sink starts or, while the catalog is away, at the next `prepare`. An
//!   existing table must take the contract's rows: a missing column, another
//!   type or a required column the events may lack is a permanent error.
//! - [`Sink::write`] buffers rows (an event that does not fit is a dead
//!   letter naming the column) and writes them, every [`BATCH_ROWS`], into
//!   the epoch's Parquet files, one writer per partition, on the sink's I/O
//!   runtime: encoding and compressing run beside the stage's thread.
//! - [`Sink::prepare`] closes the epoch's files and stages them: a staging
//!   manifest beside the table's metadata names them.
//! - [`Sink::publish`] appends every staged epoch as one snapshot, at most
//!   once per `commitInterval` (at once for epochs recovered from another
//!   instance); until then the epochs stay in the commits' markers.
//!
//! A catalog or store that is down makes `prepare` answer `Pending` (the
//! work is kept and tried again) and leaves appending to a later publish:
//! nothing is lost, nothing is appended twice. Files of an aborted epoch, or
//! of a try abandoned halfway, are left in the table's data folder as
//! orphans that no snapshot references (Iceberg's orphan-file cleanup
//! removes them).
//!
//! Append only: the iceberg crate (0.10) writes equality-delete files but has
//! no transaction action that commits them (`fast_append` refuses any file
//! that is not data), so upserts are not offered.

mod catalog;
mod commit;
mod files;
mod table;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use iceberg::Catalog;
use iceberg::table::Table;
use keystone_crds::plan::PlanSink;

use self::commit::{Committer, EpochFiles, EpochId, Held};
use self::files::EpochWriter;
use self::table::{Shape, TableSpec};
use super::StagedEpochs;
use super::lake::columns::{Column, columns_of};
use super::lake::provenance::{Replay, Runs};
use super::lake::rows::Rows;
use super::lake::{EpochLedger, LakeError};
use super::{Guarantee, Prepared, Sink, SinkContext, SinkError, SinkOutput, SinkRecord};
use crate::event::DeadLetter;

/// Rows buffered before they are written into the epoch's files.
pub const BATCH_ROWS: usize = 8192;
/// Rows held for the current epoch (written or not: a try that fails is
/// written again) beyond this hold the host's input.
const MAX_HELD_BYTES: usize = 256 * 1024 * 1024;
/// The longest one call to the catalog or the store may take before the
/// sink gives up on it and tries again later.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the sink waits for the catalog when it starts; beyond that it
/// starts anyway and opens the table at the first `prepare`.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long appending may take after the final commit (the pod's shutdown
/// grace is 25 s, the commit comes first).
const FINISH_TIMEOUT: Duration = Duration::from_secs(10);

/// The Iceberg sink (see the module documentation).
pub struct IcebergSink {
    name: String,
    step: String,
    pipeline: String,
    table: TableSpec,
    columns: Arc<Vec<Column>>,
    commit_interval: Duration,
    // Dropped before the runtime its work is spawned on.
    catalog: Arc<dyn Catalog>,
    /// The table once loaded (or created) and checked.
    bound: Option<Bound>,
    /// Rows not yet a batch.
    rows: Rows,
    /// The current epoch's batches (contract-shaped), kept until its files
    /// are closed: a failed try writes them again.
    batches: Vec<RecordBatch>,
    batch_bytes: usize,
    /// The open files of the current epoch and how many of `batches` they
    /// hold (or are being written into them).
    writer: Option<EpochWriter>,
    written: usize,
    /// Batches being encoded into the files on the I/O runtime, off the
    /// stage's thread; the files come back when they are written. At most
    /// one such write at a time (the next waits for it), so the stage never
    /// runs more than a batch ahead of its files.
    writing: Option<tokio::task::JoinHandle<Result<EpochWriter, LakeError>>>,
    /// Tries at writing the current epoch (part of the file names).
    attempt: u32,
    /// Files of the current epoch closed but not yet staged.
    closed: Option<EpochFiles>,
    ledger: EpochLedger,
    /// The files of each staged epoch not yet appended.
    staged_files: BTreeMap<u64, EpochFiles>,
    last_snapshot: Option<Instant>,
    /// The source records of the current epoch's rows.
    provenance: Runs,
    /// After a rollback: what the replay must not append again.
    replay: Replay,
    /// After a rollback: where the replay starts (`None`: every partition
    /// from its beginning), to read the table's provenance again from.
    replay_from: Option<BTreeMap<i32, i64>>,
    io: tokio::runtime::Runtime,
}

struct Bound {
    table: Table,
    shape: Shape,
}

impl IcebergSink {
    /// Builds the sink of `sink`, reading the catalog's and the store's
    /// credentials from the environment. The table is opened now if the
    /// catalog answers in time, else at the first `prepare`.
    pub fn connect(sink: &PlanSink, context: &SinkContext<'_>) -> Result<IcebergSink, SinkError> {
        let lake = |source| SinkError::Lake {
            sink: sink.name.clone(),
            source: Box::new(source),
        };
        let Some(spec) = &sink.spec.iceberg else {
            return Err(lake(LakeError::Path {
                path: String::new(),
                message: "the sink sets no iceberg settings".to_owned(),
            }));
        };
        let props = catalog::rest_properties(&sink.spec, spec, &|name| std::env::var(name).ok())
            .map_err(lake)?;
        let io = runtime().map_err(lake)?;
        let catalog = catalog::open_rest(props, &io).map_err(lake)?;
        Self::build(sink, context.pipeline, io, catalog).map_err(lake)
    }

    /// Builds the sink over `catalog`, whose work runs on `io` (or on a
    /// runtime of its own).
    fn build(
        sink: &PlanSink,
        pipeline: &str,
        io: tokio::runtime::Runtime,
        catalog: Arc<dyn Catalog>,
    ) -> Result<IcebergSink, LakeError> {
        let Some(spec) = &sink.spec.iceberg else {
            return Err(LakeError::Path {
                path: String::new(),
                message: "the sink sets no iceberg settings".to_owned(),
            });
        };
        let columns = Arc::new(columns_of(&sink.schema)?);
        let table = TableSpec::new(
            &spec.namespace,
            &spec.table,
            columns.clone(),
            &spec.partition_by,
        )?;
        let ledger = EpochLedger::new();
        let mut sink = IcebergSink {
            step: format!("sink:{}", sink.name),
            name: sink.name.clone(),
            pipeline: pipeline.to_owned(),
            table,
            rows: Rows::new(columns.clone()),
            columns,
            commit_interval: spec.commit_interval.as_std(),
            catalog,
            bound: None,
            batches: Vec::new(),
            batch_bytes: 0,
            writer: None,
            written: 0,
            writing: None,
            attempt: 0,
            closed: None,
            ledger,
            staged_files: BTreeMap::new(),
            last_snapshot: None,
            provenance: Runs::default(),
            replay: Replay::default(),
            replay_from: None,
            io,
        };
        match sink.bind(START_TIMEOUT) {
            Ok(()) => {}
            Err(error) if error.is_permanent() => return Err(error),
            Err(error) => {
                tracing::warn!(sink = %sink.name, table = %sink.table.show(), %error, "the Iceberg catalog is not answering; opening the table at the first commit");
            }
        }
        tracing::info!(
            sink = %sink.name,
            table = %sink.table.show(),
            instance = %sink.ledger.instance,
            "iceberg sink ready"
        );
        Ok(sink)
    }

    fn error(&self, source: LakeError) -> SinkError {
        SinkError::Lake {
            sink: self.name.clone(),
            source: Box::new(source),
        }
    }

    fn who(&self) -> Committer<'_> {
        Committer {
            pipeline: &self.pipeline,
            sink: &self.name,
            instance: &self.ledger.instance,
        }
    }

    /// Runs `work` on the sink's runtime, for at most `limit`.
    fn run<T>(
        &self,
        what: &str,
        limit: Duration,
        work: impl Future<Output = Result<T, LakeError>>,
    ) -> Result<T, LakeError> {
        self.io
            .block_on(async { tokio::time::timeout(limit, work).await })
            .unwrap_or_else(|_| {
                Err(LakeError::Iceberg {
                    what: what.to_owned(),
                    source: Box::new(iceberg::Error::new(
                        iceberg::ErrorKind::Unexpected,
                        format!("no answer within {} s", limit.as_secs()),
                    )),
                })
            })
    }

    /// Loads (or creates) and checks the table, once.
    fn bind(&mut self, limit: Duration) -> Result<(), LakeError> {
        if self.bound.is_some() {
            return Ok(());
        }
        let what = format!("opening table {}", self.table.show());
        let table = self.run(&what, limit, self.table.open(self.catalog.as_ref()))?;
        let shape = Shape::of(&table)?;
        self.bound = Some(Bound { table, shape });
        Ok(())
    }

    /// The buffered rows become a batch of the current epoch.
    fn take_rows(&mut self) -> Result<(), LakeError> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let batch = self.rows.take_batch()?;
        self.batch_bytes += batch.get_array_memory_size();
        self.batches.push(batch);
        Ok(())
    }

    /// Starts writing the epoch's batches not yet in its files (opening them
    /// first) on the I/O runtime, after the write before it has finished;
    /// with `settle`, waits for it too. On failure the files are abandoned:
    /// the next try writes every batch again into new ones.
    fn write_batches(&mut self, settle: bool) -> Result<(), LakeError> {
        if self.bound.is_none() {
            return Ok(());
        }
        self.settle_writing()?;
        if self.written < self.batches.len() {
            match self.start_writing() {
                Ok(handle) => {
                    self.writing = Some(handle);
                    self.written = self.batches.len();
                }
                Err(error) => {
                    self.abandon_files();
                    return Err(error);
                }
            }
        }
        if settle {
            self.settle_writing()?;
        }
        Ok(())
    }

    /// Waits for the write under way, if any, and takes the files back.
    fn settle_writing(&mut self) -> Result<(), LakeError> {
        let Some(handle) = self.writing.take() else {
            return Ok(());
        };
        let what = format!("writing data files of table {}", self.table.show());
        let abort = handle.abort_handle();
        let settled = self.run(&what, IO_TIMEOUT, async {
            handle.await.unwrap_or_else(|joined| {
                Err(LakeError::Iceberg {
                    what: what.clone(),
                    source: Box::new(iceberg::Error::new(
                        iceberg::ErrorKind::Unexpected,
                        format!("the write stopped: {joined}"),
                    )),
                })
            })
        });
        match settled {
            Ok(writer) => {
                self.writer = Some(writer);
                Ok(())
            }
            Err(error) => {
                abort.abort();
                self.abandon_files();
                Err(error)
            }
        }
    }

    /// Spawns the write of the batches not yet in the files.
    fn start_writing(
        &mut self,
    ) -> Result<tokio::task::JoinHandle<Result<EpochWriter, LakeError>>, LakeError> {
        let what = format!("writing data files of table {}", self.table.show());
        let Some(bound) = &self.bound else {
            return Err(LakeError::Table {
                table: self.table.show(),
                message: "not opened yet".to_owned(),
            });
        };
        let mut writer = match self.writer.take() {
            Some(writer) => writer,
            None => {
                let prefix = format!(
                    "keystone-{}-{}-{}",
                    self.ledger.instance, self.ledger.current, self.attempt
                );
                EpochWriter::new(&bound.table, prefix).map_err(|source| LakeError::Iceberg {
                    what: what.clone(),
                    source: Box::new(source),
                })?
            }
        };
        let shaped = self.batches[self.written..]
            .iter()
            .map(|batch| bound.shape.conform(batch))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.io.spawn(async move {
            for batch in shaped {
                writer
                    .write(batch)
                    .await
                    .map_err(|source| LakeError::Iceberg {
                        what: what.clone(),
                        source: Box::new(source),
                    })?;
            }
            Ok(writer)
        }))
    }

    /// Drops the open files (orphans); the next try starts new ones.
    fn abandon_files(&mut self) {
        let _context = self.io.enter();
        if let Some(writing) = self.writing.take() {
            writing.abort();
        }
        self.writer = None;
        self.written = 0;
        self.attempt += 1;
    }

    /// Closes the epoch's files and stages them; `false` when the catalog or
    /// the store did not let it finish (what is done so far is kept).
    fn stage(&mut self) -> Result<bool, LakeError> {
        if let Err(error) = self.bind(IO_TIMEOUT) {
            if error.is_permanent() {
                return Err(error);
            }
            tracing::warn!(sink = %self.name, %error, "the table cannot be opened; trying again at the next commit");
            return Ok(false);
        }
        if !self.batches.is_empty() {
            if let Err(error) = self.write_batches(true) {
                tracing::warn!(sink = %self.name, %error, "writing data files failed; trying again at the next commit");
                return Ok(false);
            }
            let Some(writer) = self.writer.take() else {
                return Ok(false);
            };
            let what = format!("closing data files of table {}", self.table.show());
            let closing = async {
                writer.close().await.map_err(|source| LakeError::Iceberg {
                    what: what.clone(),
                    source: Box::new(source),
                })
            };
            match self.run(&what, IO_TIMEOUT, closing) {
                Ok(files) => {
                    let closed = self.closed.get_or_insert(EpochFiles {
                        spec_id: files.spec_id,
                        files: Vec::new(),
                        provenance: BTreeMap::new(),
                    });
                    closed.files.extend(files.files);
                    self.batches.clear();
                    self.batch_bytes = 0;
                    self.written = 0;
                    self.attempt += 1;
                }
                Err(error) => {
                    self.abandon_files();
                    tracing::warn!(sink = %self.name, %error, "closing data files failed; writing them again at the next commit");
                    return Ok(false);
                }
            }
        }
        if let Some(closed) = self.closed.as_mut() {
            for (partition, _, _, runs) in self.provenance.by_partition() {
                closed.provenance.insert(partition, runs);
            }
        }
        let Some(closed) = &self.closed else {
            return Ok(true);
        };
        let Some(bound) = &self.bound else {
            return Ok(false);
        };
        let epoch = self.ledger.current;
        let what = format!("staging epoch {epoch} of table {}", self.table.show());
        let writing = async {
            commit::write_manifest(&bound.table, &self.who(), epoch, closed)
                .await
                .map_err(|source| LakeError::Iceberg {
                    what: what.clone(),
                    source: Box::new(source),
                })
        };
        if let Err(error) = self.run(&what, IO_TIMEOUT, writing) {
            tracing::warn!(sink = %self.name, %error, "staging the closed data files failed; trying again at the next commit");
            return Ok(false);
        }
        if let Some(closed) = self.closed.take() {
            self.staged_files.insert(epoch, closed);
        }
        self.provenance.clear();
        self.ledger.staged();
        self.attempt = 0;
        Ok(true)
    }

    /// Appends every staged epoch the last commit covers (and every
    /// recovered one) as one snapshot, then deletes their staging manifests.
    /// Appends the staged epochs; the table as of the append, if one was read.
    fn append_staged(&mut self, limit: Duration) -> Result<Option<Table>, LakeError> {
        self.bind(limit)?;
        let mut epochs: BTreeMap<EpochId, Held> = BTreeMap::new();
        for marker in &self.ledger.recovered {
            for epoch in marker.epochs() {
                epochs.insert((marker.instance.clone(), epoch), Held::Unread);
            }
        }
        if let Some(own) = self.ledger.marker() {
            for epoch in own.epochs() {
                let held = match self.staged_files.get(&epoch) {
                    Some(files) => Held::Files(files.clone()),
                    None => Held::Unread,
                };
                epochs.insert((own.instance.clone(), epoch), held);
            }
        }
        let who = self.who();
        let what = format!("appending to table {}", self.table.show());
        let appended = self.run(
            &what,
            limit,
            commit::append(self.catalog.as_ref(), &self.table.ident, &who, &mut epochs),
        )?;
        if let Some(snapshot) = appended.snapshot {
            let first = appended.epochs.first().map(|(i, e)| format!("{i}.{e}"));
            let last = appended.epochs.last().map(|(i, e)| format!("{i}.{e}"));
            tracing::info!(sink = %self.name, table = %self.table.show(), snapshot, epochs = appended.epochs.len(), first, last, "appended a snapshot");
            self.last_snapshot = Some(Instant::now());
        }
        // Every epoch is in the table now (this snapshot, or an earlier one):
        // their staging manifests are done with.
        if let Some(table) = &appended.table {
            let deleting = async {
                let left = epochs
                    .iter()
                    .filter(|(_, held)| !matches!(held, Held::Gone));
                for ((instance, epoch), _) in left {
                    if let Err(error) = commit::delete_manifest(table, instance, *epoch).await {
                        tracing::warn!(instance = %instance, epoch, %error, "deleting a staging manifest failed; it is left behind");
                    }
                }
                Ok(())
            };
            let _ = self.run("deleting staging manifests", limit, deleting);
        }
        self.ledger.recovered.clear();
        self.staged_files.clear();
        self.ledger.published();
        Ok(appended.table)
    }

    fn refuse(&self, record: &SinkRecord<'_>, reason: String, out: &mut SinkOutput) {
        out.dead_letters.push(DeadLetter {
            step: self.step.clone(),
            reason,
            original: record.event.raw.clone(),
        });
    }
}

/// A small runtime of its own: the catalog and the writers spawn work on it
/// while the host's thread waits.
fn runtime() -> Result<tokio::runtime::Runtime, LakeError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("iceberg-sink")
        .enable_all()
        .build()
        .map_err(LakeError::Runtime)
}

impl Sink for IcebergSink {
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
        if let Err(reason) = self.rows.push(&record.event.value) {
            self.refuse(record, reason, out);
            return Ok(());
        }
        if let Some(source) = source {
            self.provenance.record(source.partition, source.offset);
        }
        if self.rows.len() >= BATCH_ROWS {
            self.take_rows().map_err(|e| self.error(e))?;
            if let Err(error) = self.write_batches(false) {
                // The batches are kept: `prepare` writes them again.
                tracing::warn!(sink = %self.name, %error, "writing data files failed; trying again at the next commit");
            }
        }
        Ok(())
    }

    fn backpressured(&self) -> bool {
        self.batch_bytes + self.rows.bytes() >= MAX_HELD_BYTES
    }

    fn prepare(&mut self, _wait: Duration, _out: &mut SinkOutput) -> Result<Prepared, SinkError> {
        self.take_rows().map_err(|e| self.error(e))?;
        if self.batches.is_empty() && self.closed.is_none() {
            return Ok(Prepared::Ready);
        }
        match self.stage() {
            Ok(true) => Ok(Prepared::Ready),
            Ok(false) => Ok(Prepared::Pending),
            Err(error) => Err(self.error(error)),
        }
    }

    fn staged(&self) -> Vec<StagedEpochs> {
        self.ledger.staged_markers()
    }

    fn publish(&mut self) -> Result<(), SinkError> {
        if self.ledger.marker().is_none() && self.ledger.recovered.is_empty() {
            return Ok(());
        }
        let due = !self.ledger.recovered.is_empty()
            || self
                .last_snapshot
                .is_none_or(|at| at.elapsed() >= self.commit_interval);
        if !due {
            return Ok(());
        }
        if let Err(error) = self.append_staged(IO_TIMEOUT) {
            // The epochs stay staged and named in the next commits: appending
            // is tried again then, or by whoever reads these partitions next.
            tracing::warn!(sink = %self.name, %error, "appending the staged epochs failed; trying again at the next commit");
        }
        Ok(())
    }

    fn finish(&mut self) {
        if self.ledger.marker().is_none() && self.ledger.recovered.is_empty() {
            return;
        }
        // Within the pod's shutdown grace, whatever the commit interval.
        match self.append_staged(FINISH_TIMEOUT) {
            Ok(_) => {
                tracing::info!(sink = %self.name, "appended the staged epochs before stopping")
            }
            Err(error) => {
                tracing::warn!(sink = %self.name, %error, "appending the staged epochs before stopping failed; whoever reads these partitions next appends them");
            }
        }
    }

    fn abort(&mut self) {
        self.rows = Rows::new(self.columns.clone());
        self.provenance.clear();
        self.batches.clear();
        self.batch_bytes = 0;
        self.abandon_files();
        self.closed = None;
        // What the last commit covers is named in its metadata, and comes back
        // through `recover`; the rest is never appended. The next epoch gets
        // a new number, so nothing staged now is reused.
        self.staged_files.clear();
        self.ledger.published();
        self.ledger.current += 1;
        self.attempt = 0;
    }

    fn suppress_replay(
        &mut self,
        from: Option<&BTreeMap<i32, i64>>,
        suppressed: prometheus::IntCounter,
    ) -> Result<(), SinkError> {
        // The table must be read now: a replay that cannot tell what the
        // table holds would append it twice.
        self.bind(IO_TIMEOUT).map_err(|e| self.error(e))?;
        let delivered = self
            .bound
            .as_ref()
            .map(|bound| commit::delivered(&bound.table, from))
            .unwrap_or_default();
        self.replay = Replay::new(delivered, suppressed);
        self.replay_from = from.cloned();
        tracing::info!(sink = %self.name, held = self.replay.held(), "the replay skips the source records the table holds");
        Ok(())
    }

    fn recover(&mut self, staged: Vec<StagedEpochs>) -> Result<(), SinkError> {
        for marker in self.ledger.recover(staged) {
            tracing::info!(sink = %self.name, epochs = %marker, "appending epochs a commit names, unless a snapshot has them");
        }
        if !self.replay.is_active() || self.ledger.recovered.is_empty() {
            return Ok(());
        }
        // The replay must skip what these epochs hold too: they are appended
        // now, and the table's provenance read again, before it starts.
        let table = self.append_staged(IO_TIMEOUT).map_err(|e| self.error(e))?;
        if let Some(table) = table {
            self.replay
                .renew(commit::delivered(&table, self.replay_from.as_ref()));
            tracing::info!(sink = %self.name, held = self.replay.held(), "appended the recovered epochs before the replay; it skips what they hold too");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
