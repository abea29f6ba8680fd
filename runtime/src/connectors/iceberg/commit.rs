//! Staged epochs and the snapshots that append them, exactly once.
//!
//! - `prepare` writes a staging manifest per epoch, beside the table's
//!   metadata: `<table>/metadata/keystone-staging/<instance>-<epoch>.json`,
//!   the epoch's data files as Iceberg's JSON form of a manifest entry. It
//!   lets whoever recovers the epoch (another instance, after a crash)
//!   append the same files.
//! - A snapshot's summary names the epochs it appends: `keystone.instance`
//!   (the committing instance) with `keystone.epochs` (its epochs, as
//!   `first-last` ranges), and `keystone.recovered` (other instances'
//!   epochs, as `<instance>.<first>-<last>` markers). Before committing, the
//!   table's snapshots are read and every epoch one of them names is left out:
//!   an epoch is appended once, whoever commits it and however often.
//! - Once the snapshot is committed, the staging manifests are deleted.
//!
//! Snapshot expiry removes summaries: an epoch whose covering snapshot was
//! expired while its staging manifest was left behind (a crash between the
//! commit and the deletion) is still refused by the crate's check that no
//! added file is already in the table.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::RangeInclusive;

use iceberg::spec::{DataFile, deserialize_data_file_from_json, serialize_data_file_to_json};
use iceberg::table::Table;
use iceberg::transaction::{ApplyTransactionAction, Transaction};
use iceberg::{Catalog, Error, ErrorKind, TableIdent};
use serde::{Deserialize, Serialize};

use crate::connectors::StagedEpochs;
use crate::connectors::lake::LakeError;
use crate::connectors::lake::provenance::Runs;

pub const PIPELINE: &str = "keystone.pipeline";
pub const SINK: &str = "keystone.sink";
pub const INSTANCE: &str = "keystone.instance";
pub const EPOCHS: &str = "keystone.epochs";
pub const RECOVERED: &str = "keystone.recovered";

/// Where staging manifests live, under the table's location.
pub const STAGING: &str = "metadata/keystone-staging";

/// Commits tried per publish when other writers commit in between.
const COMMIT_ATTEMPTS: usize = 5;

/// One sink instance's epoch.
pub type EpochId = (String, u64);

/// The source records the table's snapshots hold from `from` on (per
/// partition; `None`: from each partition's start), read from their
/// summaries: what a replay after a rollback must not append again.
pub fn delivered(table: &Table, from: Option<&BTreeMap<i32, i64>>) -> Runs {
    let mut delivered = Runs::default();
    for snapshot in table.metadata().snapshots() {
        let Some(text) = snapshot.summary().additional_properties.get(PROVENANCE) else {
            continue;
        };
        for entry in text.split(';') {
            let Some((partition, runs)) = entry.split_once(':') else {
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
            delivered.add_text(partition, runs, start);
        }
    }
    delivered
}

/// Who commits: recorded in each snapshot's summary.
pub struct Committer<'a> {
    pub pipeline: &'a str,
    pub sink: &'a str,
    pub instance: &'a str,
}

/// The data files of one epoch, all of one partition spec, and the source
/// records its rows come from (runs of offsets per input partition, as
/// `lake::provenance` writes them).
#[derive(Clone, Debug)]
pub struct EpochFiles {
    pub spec_id: i32,
    pub files: Vec<DataFile>,
    pub provenance: BTreeMap<i32, String>,
}

/// The snapshot summary property with the source records a snapshot
/// appends: `<partition>:<runs>;...` (read back after a rollback).
pub const PROVENANCE: &str = "keystone.provenance";

/// An epoch to append, and its data files once known.
pub enum Held {
    /// This instance staged it and holds its files.
    Files(EpochFiles),
    /// Named by a commit (recovered): its files are in its staging manifest.
    Unread,
    /// Its staging manifest is gone: appended and cleaned up already.
    Gone,
}

/// A staging manifest: one epoch's data files.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StagingManifest {
    pipeline: String,
    sink: String,
    instance: String,
    epoch: u64,
    partition_spec_id: i32,
    schema_id: i32,
    /// Each file as the crate serializes it: kept as its text, since the
    /// crate reads a partition's fields in the order they are written.
    data_files: Vec<String>,
    /// The epoch's source records per input partition.
    #[serde(default)]
    provenance: BTreeMap<i32, String>,
}

pub fn manifest_path(table: &Table, instance: &str, epoch: u64) -> String {
    format!(
        "{}/{STAGING}/{instance}-{epoch}.json",
        table.metadata().location().trim_end_matches('/')
    )
}

fn invalid(message: String) -> Error {
    Error::new(ErrorKind::DataInvalid, message)
}

/// Writes the staging manifest of one epoch (overwriting an earlier try).
pub async fn write_manifest(
    table: &Table,
    who: &Committer<'_>,
    epoch: u64,
    staged: &EpochFiles,
) -> iceberg::Result<()> {
    let metadata = table.metadata();
    let spec_id = staged.spec_id;
    let schema = metadata.current_schema();
    let partition_type = metadata
        .partition_spec_by_id(spec_id)
        .ok_or_else(|| invalid(format!("the table has no partition spec {spec_id}")))?
        .partition_type(schema)?;
    let data_files = staged
        .files
        .iter()
        .map(|file| {
            serialize_data_file_to_json(file.clone(), &partition_type, metadata.format_version())
        })
        .collect::<iceberg::Result<Vec<String>>>()?;
    let manifest = StagingManifest {
        pipeline: who.pipeline.to_owned(),
        sink: who.sink.to_owned(),
        instance: who.instance.to_owned(),
        epoch,
        partition_spec_id: spec_id,
        schema_id: schema.schema_id(),
        data_files,
        provenance: staged.provenance.clone(),
    };
    let bytes = serde_json::to_vec(&manifest)
        .map_err(|e| invalid(format!("a staging manifest's JSON: {e}")))?;
    table
        .file_io()
        .new_output(manifest_path(table, who.instance, epoch))?
        .write(bytes.into())
        .await
}

/// The data files of a staged epoch, or `None` when its manifest is gone.
pub async fn read_manifest(
    table: &Table,
    instance: &str,
    epoch: u64,
) -> iceberg::Result<Option<EpochFiles>> {
    let path = manifest_path(table, instance, epoch);
    let file_io = table.file_io();
    if !file_io.exists(&path).await? {
        return Ok(None);
    }
    let bytes = file_io.new_input(&path)?.read().await?;
    let manifest: StagingManifest = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(format!("staging manifest {path}: {e}")))?;
    let metadata = table.metadata();
    let schema = metadata
        .schema_by_id(manifest.schema_id)
        .unwrap_or(metadata.current_schema());
    let spec = metadata
        .partition_spec_by_id(manifest.partition_spec_id)
        .ok_or_else(|| {
            invalid(format!(
                "staging manifest {path} names partition spec {}, which the table lacks",
                manifest.partition_spec_id
            ))
        })?;
    let partition_type = spec.partition_type(schema)?;
    let files = manifest
        .data_files
        .iter()
        .map(|json| {
            deserialize_data_file_from_json(
                json,
                manifest.partition_spec_id,
                &partition_type,
                schema,
            )
        })
        .collect::<iceberg::Result<Vec<_>>>()?;
    Ok(Some(EpochFiles {
        spec_id: manifest.partition_spec_id,
        files,
        provenance: manifest.provenance,
    }))
}

pub async fn delete_manifest(table: &Table, instance: &str, epoch: u64) -> iceberg::Result<()> {
    table
        .file_io()
        .delete(manifest_path(table, instance, epoch))
        .await
}

/// The epochs the table's snapshots name, per instance.
#[derive(Debug, Default)]
pub struct Coverage {
    ranges: HashMap<String, Vec<RangeInclusive<u64>>>,
}

impl Coverage {
    pub fn of(table: &Table) -> Coverage {
        let mut coverage = Coverage::default();
        for snapshot in table.metadata().snapshots() {
            let properties = &snapshot.summary().additional_properties;
            if let (Some(instance), Some(epochs)) =
                (properties.get(INSTANCE), properties.get(EPOCHS))
            {
                for range in epochs.split(',').filter_map(parse_range) {
                    coverage.add(instance, range);
                }
            }
            if let Some(recovered) = properties.get(RECOVERED) {
                for marker in recovered.split(',').filter_map(StagedEpochs::parse) {
                    coverage.add(&marker.instance, marker.epochs());
                }
            }
        }
        coverage
    }

    fn add(&mut self, instance: &str, range: RangeInclusive<u64>) {
        self.ranges
            .entry(instance.to_owned())
            .or_default()
            .push(range);
    }

    pub fn covers(&self, (instance, epoch): &EpochId) -> bool {
        self.ranges
            .get(instance)
            .is_some_and(|ranges| ranges.iter().any(|r| r.contains(epoch)))
    }
}

fn parse_range(text: &str) -> Option<RangeInclusive<u64>> {
    let (first, last) = text.trim().split_once('-')?;
    let (first, last): (u64, u64) = (first.parse().ok()?, last.parse().ok()?);
    (first <= last).then_some(first..=last)
}

/// `1-3,5-5`: the epochs as ranges of consecutive numbers.
fn ranges(epochs: impl IntoIterator<Item = u64>) -> Vec<RangeInclusive<u64>> {
    let mut out: Vec<RangeInclusive<u64>> = Vec::new();
    for epoch in epochs {
        match out.last_mut() {
            Some(last) if *last.end() + 1 == epoch => *last = *last.start()..=epoch,
            _ => out.push(epoch..=epoch),
        }
    }
    out
}

/// The summary properties of a snapshot appending `epochs`.
pub fn summary(who: &Committer<'_>, epochs: &BTreeSet<EpochId>) -> HashMap<String, String> {
    let mut by_instance: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (instance, epoch) in epochs {
        by_instance.entry(instance).or_default().push(*epoch);
    }
    let mut properties = HashMap::from([
        (PIPELINE.to_owned(), who.pipeline.to_owned()),
        (SINK.to_owned(), who.sink.to_owned()),
        (INSTANCE.to_owned(), who.instance.to_owned()),
    ]);
    if let Some(own) = by_instance.remove(who.instance) {
        let text: Vec<String> = ranges(own)
            .into_iter()
            .map(|r| format!("{}-{}", r.start(), r.end()))
            .collect();
        properties.insert(EPOCHS.to_owned(), text.join(","));
    }
    let recovered: Vec<String> = by_instance
        .into_iter()
        .flat_map(|(instance, epochs)| {
            ranges(epochs).into_iter().map(move |r| {
                StagedEpochs {
                    instance: instance.to_owned(),
                    first: *r.start(),
                    last: *r.end(),
                }
                .to_string()
            })
        })
        .collect();
    if !recovered.is_empty() {
        properties.insert(RECOVERED.to_owned(), recovered.join(","));
    }
    properties
}

/// What a publish did.
#[derive(Debug, Default)]
pub struct Appended {
    /// The snapshot committed, if there was anything to append.
    pub snapshot: Option<i64>,
    /// The epochs it appended.
    pub epochs: BTreeSet<EpochId>,
    /// The table as of the commit.
    pub table: Option<Table>,
}

/// Appends every epoch of `epochs` that no snapshot names yet, as one
/// snapshot. A commit that loses a race (another writer committed first) is
/// tried again on the fresh table, with the snapshots read again.
pub async fn append(
    catalog: &dyn Catalog,
    ident: &TableIdent,
    who: &Committer<'_>,
    epochs: &mut BTreeMap<EpochId, Held>,
) -> Result<Appended, LakeError> {
    let show = format!(
        "{}.{}",
        ident.namespace().clone().inner().join("."),
        ident.name()
    );
    let fail = |what: &str, source| LakeError::Iceberg {
        what: format!("{what} of table {show}"),
        source: Box::new(source),
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let table = catalog
            .load_table(ident)
            .await
            .map_err(|e| fail("loading the snapshots", e))?;
        let coverage = Coverage::of(&table);
        let default_spec = table.metadata().default_partition_spec_id();
        let mut files = Vec::new();
        let mut appending = BTreeSet::new();
        let mut provenance = Runs::default();
        for (id, held) in epochs.iter_mut() {
            if coverage.covers(id) {
                continue;
            }
            if matches!(held, Held::Unread) {
                *held = match read_manifest(&table, &id.0, id.1)
                    .await
                    .map_err(|e| fail("reading a staging manifest", e))?
                {
                    Some(staged) => Held::Files(staged),
                    None => Held::Gone,
                };
            }
            let Held::Files(staged) = held else {
                tracing::debug!(sink = who.sink, instance = %id.0, epoch = id.1, "no staging manifest left for a recovered epoch: appended before");
                continue;
            };
            if staged.spec_id != default_spec {
                return Err(LakeError::Table {
                    table: show.clone(),
                    message: format!(
                        "epoch {}.{} was staged under partition spec {}, but the table's default spec is now {default_spec}; the iceberg crate appends files of the default spec only",
                        id.0, id.1, staged.spec_id
                    ),
                });
            }
            files.extend(staged.files.iter().cloned());
            for (partition, runs) in &staged.provenance {
                provenance.add_text(*partition, runs, 0);
            }
            appending.insert(id.clone());
        }
        if appending.is_empty() {
            return Ok(Appended {
                table: Some(table),
                ..Appended::default()
            });
        }
        let transaction = Transaction::new(&table);
        let mut properties = summary(who, &appending);
        if !provenance.is_empty() {
            let text: Vec<String> = provenance
                .by_partition()
                .map(|(partition, _, _, runs)| format!("{partition}:{runs}"))
                .collect();
            properties.insert(PROVENANCE.to_owned(), text.join(";"));
        }
        let action = transaction
            .fast_append()
            .set_snapshot_properties(properties)
            .add_data_files(files);
        let result = match action.apply(transaction) {
            Ok(transaction) => transaction.commit(catalog).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(table) => {
                return Ok(Appended {
                    snapshot: table.metadata().current_snapshot().map(|s| s.snapshot_id()),
                    epochs: appending,
                    table: Some(table),
                });
            }
            // A conflict the transaction's own retries did not resolve, or
            // files another writer appended meanwhile (the crate refuses
            // files already in the table): read the snapshots again.
            Err(e)
                if attempt < COMMIT_ATTEMPTS
                    && (e.retryable()
                        || matches!(
                            e.kind(),
                            ErrorKind::CatalogCommitConflicts | ErrorKind::DataInvalid
                        )) =>
            {
                tracing::info!(sink = who.sink, error = %e, attempt, "the append lost a race; reading the snapshots again");
            }
            Err(e) => return Err(fail("appending a snapshot", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_name_own_and_recovered_epochs_as_ranges() {
        let who = Committer {
            pipeline: "orders",
            sink: "lake",
            instance: "aaaa",
        };
        let epochs: BTreeSet<EpochId> = [
            ("aaaa".to_owned(), 1),
            ("aaaa".to_owned(), 2),
            ("aaaa".to_owned(), 3),
            ("aaaa".to_owned(), 5),
            ("bbbb".to_owned(), 7),
        ]
        .into();
        let properties = summary(&who, &epochs);
        assert_eq!(properties[EPOCHS], "1-3,5-5");
        assert_eq!(properties[RECOVERED], "bbbb.7-7");
        assert_eq!(properties[INSTANCE], "aaaa");
        assert_eq!(properties[PIPELINE], "orders");

        let mut coverage = Coverage::default();
        for range in properties[EPOCHS].split(',').filter_map(parse_range) {
            coverage.add("aaaa", range);
        }
        assert!(coverage.covers(&("aaaa".to_owned(), 2)));
        assert!(!coverage.covers(&("aaaa".to_owned(), 4)));
        assert!(!coverage.covers(&("bbbb".to_owned(), 2)));
        assert_eq!(parse_range("9-3"), None);
        assert_eq!(parse_range("x-3"), None);
    }
}
