//! The lake sinks' part of the contract: a table needs columns (a declared
//! output schema), and each `partitionBy` term must read a field that reaches
//! the sink with a type its transform takes.

use super::{Checker, ErrorKind, StreamState};
use crate::pipeline::partitioning::{PartitionTerm, Transform};
use crate::pipeline::{IcebergCatalogType, IcebergSinkSpec, ParquetSinkSpec};
use crate::schema::FieldType;

/// Which table format a sink writes, for the rules that differ.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Iceberg,
    Parquet,
}

impl Checker<'_> {
    pub(super) fn check_iceberg_sink(
        &mut self,
        iceberg: &IcebergSinkSpec,
        stream: &StreamState,
        path: &str,
        sink: &str,
    ) {
        if iceberg.catalog.catalog_type == IcebergCatalogType::Sql {
            self.error(
                ErrorKind::UnsupportedSink,
                format!("{path}.catalog.type"),
                Some(sink),
                "sql catalogs are not written by this version of Keystone yet; use an Iceberg REST catalog (type: rest)",
            );
        }
        self.require_columns(stream, path, sink);
        self.check_partition_terms(&iceberg.partition_by, stream, path, sink, Format::Iceberg);
    }

    pub(super) fn check_parquet_sink(
        &mut self,
        parquet: &ParquetSinkSpec,
        stream: &StreamState,
        path: &str,
        sink: &str,
    ) {
        let scheme_ok = parquet.path.starts_with("file:///") || parquet.path.starts_with("s3://");
        if !scheme_ok {
            self.error(
                ErrorKind::InvalidSink,
                format!("{path}.path"),
                Some(sink),
                format!(
                    "path {:?} must be an absolute file:/// URL or an s3://bucket/prefix URL",
                    parquet.path
                ),
            );
        }
        self.require_columns(stream, path, sink);
        self.check_partition_terms(&parquet.partition_by, stream, path, sink, Format::Parquet);
    }

    fn require_columns(&mut self, stream: &StreamState, path: &str, sink: &str) {
        if stream.schema.fields.is_empty() {
            self.error(
                ErrorKind::MissingField,
                path,
                Some(sink),
                "a table's columns come from the output contract, but no field is known to reach the sink; declare the schema of the pipeline's output (or of its source and steps)",
            );
        }
    }

    fn check_partition_terms(
        &mut self,
        terms: &[String],
        stream: &StreamState,
        path: &str,
        sink: &str,
        format: Format,
    ) {
        for (i, text) in terms.iter().enumerate() {
            let at = format!("{path}.partitionBy[{i}]");
            let term = match PartitionTerm::parse(text) {
                Ok(term) => term,
                Err(message) => {
                    self.error(ErrorKind::InvalidSink, at, Some(sink), message);
                    continue;
                }
            };
            if format == Format::Parquet {
                if !matches!(
                    term.transform,
                    Transform::Identity | Transform::Day | Transform::Hour
                ) {
                    self.error(
                        ErrorKind::InvalidSink,
                        &at,
                        Some(sink),
                        format!("{term}: Parquet folders are a field (field=value), day(field) (date=YYYY-MM-DD) or hour(field) (hour=HH)"),
                    );
                    continue;
                }
                if term.transform == Transform::Identity && term.field.contains('.') {
                    self.error(
                        ErrorKind::InvalidSink,
                        &at,
                        Some(sink),
                        format!("{term}: a partition folder takes a top-level field (its column leaves the files, as Hive does); map the member to a top-level field first"),
                    );
                    continue;
                }
            }
            let Some(info) = stream.schema.get(&term.field) else {
                self.error(
                    ErrorKind::MissingField,
                    at,
                    Some(sink),
                    format!(
                        "partition term {term} needs field {:?}, but it does not reach the sink; available: {}",
                        term.field,
                        stream.schema.describe()
                    ),
                );
                continue;
            };
            let takes: &[FieldType] = match term.transform {
                Transform::Identity => &[
                    FieldType::String,
                    FieldType::Integer,
                    FieldType::Boolean,
                    FieldType::Timestamp,
                ],
                Transform::Bucket(_) => &[FieldType::String, FieldType::Integer],
                _ => &[FieldType::Timestamp],
            };
            if !takes.contains(&info.field_type) {
                let names: Vec<String> = takes.iter().map(ToString::to_string).collect();
                self.error(
                    ErrorKind::WrongType,
                    at,
                    Some(sink),
                    format!(
                        "partition term {term} takes a {} field, but {} is {}",
                        names.join(" or "),
                        term.field,
                        info.field_type
                    ),
                );
            }
        }
    }
}
