//! Change data capture from PostgreSQL into Kafka (`keystone-runtime capture`).
//!
//! One instance per source: it streams a `pgoutput` logical replication slot,
//! turns each transaction's row changes into events (one per row, ordered by
//! commit LSN), reads the tables' existing rows in chunks interleaved with the
//! log (`snapshot`), and writes both into the capture topic exactly once
//! (`run`). The rest of a pipeline reads that topic as any source.

pub mod changes;
pub mod cli;
pub mod config;
pub mod events;
pub mod http;
pub mod run;
pub mod snapshot;
pub mod source;
pub mod values;

pub use config::CaptureConfig;
pub use run::run;
