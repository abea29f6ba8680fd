//! Keystone runtime: executes a compiled pipeline [`Plan`](keystone_crds::Plan).
//!
//! The model, written once and shared by local mode and (next) the Kafka runtime:
//!
//! - An [`Event`] keeps the bytes it arrived as (for dead letters) and is parsed
//!   once per stage into a `sonic_rs::Value` that every step of the stage works on.
//! - Every step runs an [`Operator`]: one trait with default hooks (start, process a
//!   batch, timer, close, snapshot, restore). Operators write what they produce into
//!   an [`Output`]: events, dead letters, drops and keyed-state changes
//!   ([`StateChange`], the records of a compacted changelog topic).
//! - A [`StageTask`] owns one chain instance (one per input partition on Kafka): it
//!   parses input, checks each step's required fields, runs the steps batch by batch,
//!   fires timers from an injectable [`Clock`], and keeps per-step metrics.
//! - [`local`] runs all stages of a plan in one process over JSON-lines files.
//!
//! Features, all on by default: `kafka` (`serve`, `ingest`: [`kafka`],
//! [`host`]'s engine, the Kafka sink), `lake` (the Parquet and Iceberg sinks)
//! and `capture` (PostgreSQL change capture). Without them the crate is local
//! mode, the checker and the search sink, and builds in a fraction of the
//! time; local mode runs every manifest the same either way, since its sinks
//! write to files unless `--connect` asks for the real destination.

pub mod avro;
pub mod buffers;
#[cfg(feature = "capture")]
pub mod capture;
pub mod cli;
pub mod clock;
pub mod connectors;
pub mod error;
pub mod event;
pub mod expr;
pub mod host;
pub mod ingest;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod local;
pub mod operator;
pub mod ops;
pub mod registry;
pub mod schema;
pub mod secret;
pub mod state;
pub mod task;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::RuntimeError;
pub use event::{DeadLetter, Event};
pub use operator::{Ctx, Operator, Output};
pub use state::{StateChange, StateError};
pub use task::{StageTask, StepMetrics, TaskOptions};
