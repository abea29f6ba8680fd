//! The data files of one epoch: rows split by the table's partition spec,
//! each partition written through its own rolling Parquet writer (a file
//! rolls at the table's target size), all closed at `prepare`.
//!
//! Files are named `keystone-<instance>-<epoch>-<attempt>-<n>.parquet`
//! under the table's data location: unique per instance, epoch and try, so a
//! try abandoned halfway (its files are left as orphans, never appended)
//! never collides with the next.

use arrow_array::RecordBatch;
use iceberg::arrow::RecordBatchPartitionSplitter;
use iceberg::spec::{DataFileFormat, PartitionKey, Struct};
use iceberg::table::Table;
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::file_writer::location_generator::{
    DefaultFileNameGenerator, DefaultLocationGenerator,
};
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::partitioning::PartitioningWriter;
use iceberg::writer::partitioning::fanout_writer::FanoutWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use super::commit::EpochFiles;

type FileWriters = FanoutWriter<
    DataFileWriterBuilder<ParquetWriterBuilder, DefaultLocationGenerator, DefaultFileNameGenerator>,
>;

/// The open files of one epoch.
pub struct EpochWriter {
    /// Splits rows by partition; `None` for an unpartitioned table, whose
    /// rows all share `unpartitioned`.
    splitter: Option<RecordBatchPartitionSplitter>,
    unpartitioned: PartitionKey,
    writers: FileWriters,
    spec_id: i32,
    rows: u64,
}

impl EpochWriter {
    pub fn new(table: &Table, file_prefix: String) -> iceberg::Result<EpochWriter> {
        let metadata = table.metadata();
        let schema = metadata.current_schema().clone();
        let spec = metadata.default_partition_spec().clone();
        let properties = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .build();
        let files = RollingFileWriterBuilder::new_with_default_file_size(
            ParquetWriterBuilder::new(properties, schema.clone()),
            table.file_io().clone(),
            DefaultLocationGenerator::new(metadata)?,
            DefaultFileNameGenerator::new(file_prefix, None, DataFileFormat::Parquet),
        );
        let splitter = if spec.is_unpartitioned() {
            None
        } else {
            Some(RecordBatchPartitionSplitter::try_new_with_computed_values(
                schema.clone(),
                spec.clone(),
            )?)
        };
        Ok(EpochWriter {
            splitter,
            unpartitioned: PartitionKey::new(spec.as_ref().clone(), schema, Struct::empty()),
            writers: FanoutWriter::new(DataFileWriterBuilder::new(files)),
            spec_id: spec.spec_id(),
            rows: 0,
        })
    }

    /// Writes rows shaped as the table has them (see `table::Shape`).
    pub async fn write(&mut self, batch: RecordBatch) -> iceberg::Result<()> {
        let rows = batch.num_rows() as u64;
        match &self.splitter {
            Some(splitter) => {
                for (key, part) in splitter.split(&batch)? {
                    self.writers.write(key, part).await?;
                }
            }
            None => {
                self.writers
                    .write(self.unpartitioned.clone(), batch)
                    .await?
            }
        }
        self.rows += rows;
        Ok(())
    }

    /// Closes every file: the epoch's data files, complete in the store.
    pub async fn close(self) -> iceberg::Result<EpochFiles> {
        let files = self.writers.close().await?;
        debug_assert_eq!(
            files.iter().map(|f| f.record_count()).sum::<u64>(),
            self.rows
        );
        Ok(EpochFiles {
            provenance: Default::default(),
            spec_id: self.spec_id,
            files,
        })
    }
}
