//! What the lake sinks (Iceberg tables, Hive-style Parquet) share: the
//! columns of the output contract, rows into Arrow, and the staged epochs by
//! which they keep exactly once.
//!
//! Exactly once, as Flink's two-phase file sinks do it, with the Kafka offset
//! commit in the place of Flink's checkpoint:
//!
//! 1. each sink instance has a random id; every `prepare` closes the files it
//!    wrote since the last one and stages them as one epoch (numbered from 1)
//!    under that id, durably, before the host commits;
//! 2. the host commits the input offsets with the instance's
//!    [`StagedEpochs`] (the epochs staged and not yet published) in the
//!    offset metadata: the commit and the staged files agree atomically;
//! 3. after the commit the sink publishes (moves files into place, commits a
//!    snapshot) and forgets the epochs;
//! 4. an instance that is given partitions reads the markers in their last
//!    commits and publishes whatever they name that is still staged: a crash
//!    between commit and publish loses nothing. An epoch that was staged but
//!    never committed is never published (its events are read again).
//!
//! Publishing is idempotent (a file already moved, a snapshot whose summary
//! already names the epoch), so two instances recovering the same marker, or
//! a recovery racing the owner's own publish, write each epoch once.

pub use keystone_lake::columns;
pub mod provenance;
pub mod rows;

use super::StagedEpochs;

/// Why a lake sink cannot be built or cannot go on. Messages name the setting
/// or the location; never a credential.
#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error(transparent)]
    Columns(#[from] columns::ColumnsError),
    #[error("partitionBy[{index}] {term:?}: {message}")]
    Partition {
        index: usize,
        term: String,
        message: String,
    },
    #[error("path {path:?}: {message}")]
    Path { path: String, message: String },
    #[error("the object store, at {location}: {source}")]
    Store {
        location: String,
        #[source]
        source: object_store::Error,
    },
    #[error("encoding Parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("building the rows: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("starting the sink's I/O runtime: {0}")]
    Runtime(std::io::Error),
    /// A call to an Iceberg catalog or to the table's files failed.
    #[error("{what}: {source}")]
    Iceberg {
        what: String,
        #[source]
        source: Box<iceberg::Error>,
    },
    /// An existing table cannot take the contract's rows (a column missing,
    /// of another type, or required where events may lack it).
    #[error("table {table}: {message}")]
    Table { table: String, message: String },
}

impl LakeError {
    /// Errors of the manifest (or of a table it names), which no retry mends.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            LakeError::Columns(_)
                | LakeError::Partition { .. }
                | LakeError::Path { .. }
                | LakeError::Table { .. }
        ) || matches!(
            self,
            LakeError::Iceberg { source, .. }
                if source.kind() == iceberg::ErrorKind::FeatureUnsupported
        )
    }
}

/// A new sink instance id: 12 random hex digits, so that two instances (or
/// one instance before and after a restart) never stage under the same name.
pub fn new_instance_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    id[..12].to_owned()
}

/// The epochs staged and not published, tracked by a sink instance.
#[derive(Debug)]
pub struct EpochLedger {
    pub instance: String,
    /// The epoch files are being written into now.
    pub current: u64,
    /// The oldest staged epoch not yet published, if any.
    pub unpublished_from: Option<u64>,
    /// Epochs of other instances (or of this one before a rewind) that the
    /// last commits name, to publish with this instance's next publish.
    pub recovered: Vec<StagedEpochs>,
}

impl EpochLedger {
    pub fn new() -> Self {
        Self {
            instance: new_instance_id(),
            current: 1,
            unpublished_from: None,
            recovered: Vec::new(),
        }
    }

    /// The current epoch is staged: the next one begins.
    pub fn staged(&mut self) {
        self.unpublished_from.get_or_insert(self.current);
        self.current += 1;
    }

    /// What the host commits: the staged epochs not published.
    pub fn marker(&self) -> Option<StagedEpochs> {
        self.unpublished_from.map(|first| StagedEpochs {
            instance: self.instance.clone(),
            first,
            last: self.current - 1,
        })
    }

    /// Every staged epoch is published.
    pub fn published(&mut self) {
        self.unpublished_from = None;
    }

    /// Takes the epochs a commit names; returns those not known yet.
    pub fn recover(&mut self, staged: Vec<StagedEpochs>) -> Vec<StagedEpochs> {
        let mut new = Vec::new();
        for marker in staged {
            if !self.recovered.contains(&marker) {
                self.recovered.push(marker.clone());
                new.push(marker);
            }
        }
        new
    }

    /// What the host commits: the recovered epochs and this instance's own
    /// staged, unpublished ones.
    pub fn staged_markers(&self) -> Vec<StagedEpochs> {
        let mut staged = self.recovered.clone();
        staged.extend(self.marker());
        staged
    }
}

impl Default for EpochLedger {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_names_every_staged_epoch_until_published() {
        let mut ledger = EpochLedger::new();
        assert_eq!(ledger.marker(), None, "nothing staged yet");
        ledger.staged();
        ledger.staged();
        let marker = ledger.marker().unwrap();
        assert_eq!((marker.first, marker.last), (1, 2));
        ledger.published();
        assert_eq!(ledger.marker(), None);
        ledger.staged();
        assert_eq!(ledger.marker().unwrap().epochs(), 3..=3);
    }
}
