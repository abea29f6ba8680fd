//! Keystone's lake tables: the columns a pipeline's output contract gives a
//! table (`columns`) and the Iceberg schema of those columns, with the rules
//! by which an existing table takes the contract's rows (`iceberg_schema`).
//!
//! The runtime's Iceberg and Parquet sinks write by these rules, and the
//! operator checks an existing table by the same ones before it deploys, so
//! the two never disagree on what fits.

pub mod columns;
#[cfg(feature = "iceberg")]
pub mod iceberg_schema;
