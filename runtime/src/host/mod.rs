//! `keystone-runtime serve`: the host of one stage of a compiled plan. It runs
//! the consume-process-commit loop on the Kafka transport (`crate::kafka`), with
//! keyed state in changelog topics, exactly-once commits, dead letters with
//! headers, the sinks bound to the commit protocol (`crate::connectors`), and the
//! operations endpoints.
//!
//! Modules by concern: `run` (the loop), `parse` (parsing a polled batch on a
//! second thread ahead of the steps), `process` (tasks, routing to the next
//! stage or the sinks, dead letters), `commit` (transactions, at-least-once
//! epochs, rewinds), `checkpoint` (barriers, stop, resume), `rebalance`
//! (assignments), `restore` (state from changelogs and `--restore` plans),
//! `tables` (join and enrich tables), `sinks`, `http` and `metrics`.
//!
//! Checkpoints and restores (the operator's side is in `keystone_crds::checkpoint`):
//!
//! - `POST /checkpoint` commits at a barrier and answers an `InstanceCheckpoint`
//!   with every owned input partition (one not processed since its assignment is
//!   committed at its start: the group's offset, else the start position resolved
//!   to an offset) and every owned changelog partition (after the last write, else
//!   where the restore read up to). `?stop=true` then pauses every partition
//!   (also those assigned later): no output, no timers, group membership kept;
//!   `POST /resume` goes on from the committed offsets.
//! - `serve --restore FILE` (`KEYSTONE_RESTORE`) applies a `RestorePlan` to each
//!   partition whose committed offset does not carry `keystone.restore=<id>` in
//!   its metadata: input start, changelog state (rewound with compensating
//!   records so that the changelog's latest values are the restored state), and
//!   the start committed with the metadata in the same transaction. Every commit
//!   carries the metadata while the flag is set. Join and enrich tables are never
//!   rewound: they follow their own topic. A rewind needs the records before the
//!   position: a changelog compacted past it restores the compacted state.
//! - Under at-least-once every offset commit also carries the changelog
//!   positions of its partition (`keystone.changelog=<topic>@<position>`, see
//!   `metadata`), and a partition's state is restored as of them: a changelog
//!   record acknowledged while its event's output was not is undone, so the
//!   event read again is processed again instead of being taken for a duplicate.
//! - Sink and repartition records carry `keystone.source.partition` and
//!   `keystone.source.offset` (the source record the event comes from); with
//!   `RestorePlan.suppress` a sink record whose source the sink already holds past
//!   the checkpoint is not written again (state still changes).
//!
//! Without the `kafka` feature only what other servers share is built:
//! `accept`, `control` (the control token, the watchdog) and `metrics`.

mod accept;
#[cfg(feature = "kafka")]
mod checkpoint;
#[cfg(feature = "kafka")]
mod commit;
mod control;
#[cfg(feature = "kafka")]
mod http;
pub(crate) mod metrics;
#[cfg(feature = "kafka")]
mod parse;
#[cfg(feature = "kafka")]
mod process;
#[cfg(feature = "kafka")]
mod rebalance;
#[cfg(feature = "kafka")]
pub(crate) mod registry;
#[cfg(feature = "kafka")]
mod restore;
#[cfg(feature = "kafka")]
mod run;
#[cfg(feature = "kafka")]
mod serve;
#[cfg(feature = "kafka")]
mod sinks;
#[cfg(feature = "kafka")]
mod tables;

pub use accept::accept_retrying;
pub use control::{ControlToken, DEFAULT_WATCHDOG_TIMEOUT, Watchdog, refusal};
pub use metrics::Metrics;
#[cfg(feature = "kafka")]
pub use serve::*;
