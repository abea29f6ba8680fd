//! Connectors: where a stage's events leave Keystone.
//!
//! A [`Sink`] is bound to the host's commit protocol, the way Flink's two-phase
//! sinks and Kafka Streams' EOS producers are:
//!
//! 1. [`Sink::write`] takes each event that reaches the sinks (buffered or sent
//!    as the sink sees fit; a sink may refuse new work for a while with
//!    [`Sink::backpressured`], and the host then stops taking input);
//! 2. [`Sink::prepare`] runs before the source offsets are committed: whatever
//!    was written must then be durable (flushed, or staged for a two-phase
//!    publish). A sink that cannot finish in time answers
//!    [`Prepared::Pending`]: the host commits nothing, takes no new input and
//!    asks again;
//! 3. [`Sink::publish`] runs after the offsets are committed (a staged write
//!    becomes visible);
//! 4. [`Sink::abort`] runs when the host goes back to its last commit (an
//!    aborted transaction, a failed commit): staged work is dropped, and the
//!    events are written again from the committed offsets.
//!
//! Each sink declares its [`Guarantee`]; the checker's capability list
//! ([`keystone_crds::check::WRITABLE_SINKS`]) names the kinds [`build`] can build.
//! Adding a sink is one folder here and one arm in [`build`].

#[cfg(feature = "lake")]
pub mod iceberg;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "lake")]
pub mod lake;
#[cfg(feature = "lake")]
pub mod parquet;
pub mod search;
pub mod staged;

use std::collections::BTreeMap;
use std::time::Duration;

use keystone_crds::pipeline::SinkKind;
use keystone_crds::plan::PlanSink;

use crate::event::{DeadLetter, Event};
pub use staged::StagedEpochs;

/// How a sink keeps the exactly-once promise across a crash and a replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guarantee {
    /// Written in the same Kafka transaction as the consumed offsets.
    Transactional,
    /// Written before the offsets are committed; writing the same event again
    /// (a replay) leaves the destination as it was (ids, external versions).
    Idempotent,
    /// Staged before the offsets are committed, made visible after, and
    /// recognised after a crash so that nothing is published twice.
    TwoPhase,
}

/// One event as the sinks receive it.
pub struct SinkRecord<'a> {
    pub event: &'a Event,
    /// The event serialized once for every sink; empty when no sink of the
    /// stage [takes it](Sink::takes_serialized).
    pub value: &'a [u8],
}

/// What a sink hands back to the host besides success: events it refused, to
/// be written to the dead-letter topic (before the offsets are committed).
#[derive(Debug, Default)]
pub struct SinkOutput {
    pub dead_letters: Vec<DeadLetter>,
}

/// The answer of [`Sink::prepare`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prepared {
    /// Everything written so far is durable (or staged): the host may commit.
    Ready,
    /// Not yet (the destination is slow or unreachable and the sink retries):
    /// the host must not commit, should take no new input, and asks again.
    Pending,
}

/// A sink's failure that the host must answer by going back to its last commit
/// (or, if it persists, by stopping). Events a destination refuses are not
/// failures: they become dead letters.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[cfg(feature = "kafka")]
    #[error("sink {sink:?}: {source}")]
    Transport {
        sink: String,
        #[source]
        source: crate::kafka::TransportError,
    },
    #[error("sink {sink:?}: {source}")]
    Search {
        sink: String,
        #[source]
        source: Box<search::SearchError>,
    },
    #[cfg(feature = "lake")]
    #[error("sink {sink:?}: {source}")]
    Lake {
        sink: String,
        #[source]
        source: Box<lake::LakeError>,
    },
    #[error("sink {sink:?}: writing {path}: {source}")]
    File {
        sink: String,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sink {sink:?} is a {kind} sink, which this runtime cannot write")]
    Unsupported { sink: String, kind: SinkKind },
    /// The binary was built without the part that writes this kind.
    #[error(
        "sink {sink:?} is a {kind} sink, and this keystone-runtime was built without its `{feature}` feature, which writes it (build it with its default features)"
    )]
    NotBuilt {
        sink: String,
        kind: SinkKind,
        feature: &'static str,
    },
    #[error("sink {sink:?} sets no kind (exactly one of kafka, elasticsearch, iceberg or parquet)")]
    NoKind { sink: String },
}

impl SinkError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            #[cfg(feature = "kafka")]
            SinkError::Transport { .. } => "sink_kafka",
            SinkError::Search { .. } => "sink_search",
            #[cfg(feature = "lake")]
            SinkError::Lake { .. } => "sink_lake",
            SinkError::File { .. } => "sink_file",
            SinkError::Unsupported { .. } | SinkError::NotBuilt { .. } => "unsupported_sink",
            SinkError::NoKind { .. } => "sink_kind",
        }
    }

    /// Errors that no retry can mend (the plan asks for something this runtime
    /// does not have).
    pub fn is_permanent(&self) -> bool {
        match self {
            SinkError::Unsupported { .. }
            | SinkError::NotBuilt { .. }
            | SinkError::NoKind { .. } => true,
            #[cfg(feature = "lake")]
            SinkError::Lake { source, .. } => source.is_permanent(),
            _ => false,
        }
    }
}

/// A destination bound to the commit protocol (see the module documentation).
pub trait Sink: Send {
    /// The sink's name in the pipeline.
    fn name(&self) -> &str;

    fn guarantee(&self) -> Guarantee;

    /// Whether [`write`](Self::write) reads [`SinkRecord::value`]. The host
    /// serializes an event only when some sink does, and only then refuses
    /// an event too large to be one record (a column holds any size).
    fn takes_serialized(&self) -> bool {
        true
    }

    /// Takes one event. Refused events go to `out.dead_letters`.
    fn write(&mut self, record: &SinkRecord<'_>, out: &mut SinkOutput) -> Result<(), SinkError>;

    /// Whether the sink holds as much unanswered work as it may: the host stops
    /// taking input until it is false again (nothing is buffered without bound).
    fn backpressured(&self) -> bool {
        false
    }

    /// Makes everything written so far durable or staged, waiting at most
    /// `wait`. Events refused on the way go to `out.dead_letters`.
    fn prepare(&mut self, wait: Duration, out: &mut SinkOutput) -> Result<Prepared, SinkError>;

    /// The offsets covering everything prepared are committed.
    fn publish(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    /// The instance stops after its final commit: publish now what waits for
    /// a later publish (a commit interval), so that a stopped pipeline's
    /// destination holds everything it committed. What cannot be published
    /// stays staged and named in that commit, for whoever reads next.
    fn finish(&mut self) {}

    /// The host goes back to its last commit: drop what is staged or buffered;
    /// the events will be written again.
    fn abort(&mut self) {}

    /// After a `Ready` prepare, what a two-phase sink has staged and not yet
    /// published: the host commits it with the input offsets (in their
    /// metadata), so that whoever reads those partitions next can publish it
    /// (see [`staged`]).
    fn staged(&self) -> Vec<StagedEpochs> {
        Vec::new()
    }

    /// This instance was given partitions whose last commits name `staged`
    /// epochs of this sink: they were committed, so whatever of them is not
    /// published yet must be (now, or with this sink's next publish). During
    /// a replay (`suppress_replay`) it is now, before any replayed event is
    /// written, and what they hold joins what the replay skips; an error
    /// then fails the assignment rather than let the replay append them twice.
    fn recover(&mut self, staged: Vec<StagedEpochs>) -> Result<(), SinkError> {
        let _ = staged;
        Ok(())
    }

    /// A rollback replays the input from `from` (per partition; `None`: every
    /// partition from its beginning): events the sink already holds from
    /// there on are not written again, each counted in `suppressed`. Kafka
    /// sinks get theirs when built (`kafka::load_delivered`).
    fn suppress_replay(
        &mut self,
        from: Option<&BTreeMap<i32, i64>>,
        suppressed: prometheus::IntCounter,
    ) -> Result<(), SinkError> {
        let _ = (from, suppressed);
        Ok(())
    }
}

/// What a sink needs from its host to be built.
pub struct SinkContext<'a> {
    /// Metrics of the running stage, where each sink registers its own.
    pub registry: &'a prometheus::Registry,
    /// The pipeline, for names the destination records (user agents, labels).
    pub pipeline: &'a str,
}

/// Builds the connector of a plan's sink. `kafka` builds the Kafka sink, which
/// writes through the host's producer; other kinds build themselves.
pub fn build(
    sink: &PlanSink,
    context: &SinkContext<'_>,
    kafka: impl FnOnce(&PlanSink) -> Result<Box<dyn Sink>, SinkError>,
) -> Result<Box<dyn Sink>, SinkError> {
    let kind = sink.spec.kind().ok_or_else(|| SinkError::NoKind {
        sink: sink.name.clone(),
    })?;
    match kind {
        SinkKind::Kafka => kafka(sink),
        SinkKind::Elasticsearch => Ok(Box::new(search::SearchSink::connect(sink, context)?)),
        #[cfg(feature = "lake")]
        SinkKind::Parquet => Ok(Box::new(parquet::ParquetSink::connect(sink, context)?)),
        #[cfg(feature = "lake")]
        SinkKind::Iceberg => Ok(Box::new(self::iceberg::IcebergSink::connect(
            sink, context,
        )?)),
        #[cfg(not(feature = "lake"))]
        SinkKind::Parquet | SinkKind::Iceberg => Err(SinkError::NotBuilt {
            sink: sink.name.clone(),
            kind,
            feature: "lake",
        }),
    }
}
