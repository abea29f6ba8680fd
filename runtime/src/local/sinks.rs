//! Where local mode writes each sink: by default every sink's events go to the
//! run's `--output` (one copy stands for all, since every sink receives the
//! same events); `--sink NAME=FILE` writes one sink's own records to a file
//! (a Kafka sink's events, a search sink's bulk requests), and `--connect NAME`
//! writes a sink to its real destination (the endpoint in the manifest), so a
//! manifest can be tried against an existing cluster from a laptop.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keystone_crds::Plan;
use keystone_crds::pipeline::SinkKind;
use keystone_crds::plan::PlanSink;

use crate::connectors::search::SearchSink;
use crate::connectors::{
    self, Guarantee, Prepared, Sink, SinkContext, SinkError, SinkOutput, SinkRecord,
};
use crate::error::RuntimeError;
use crate::event::{DeadLetter, Event, too_large_to_write};

/// How long the end of a run waits for connected sinks to finish writing.
const FINISH_WAIT: Duration = Duration::from_secs(120);

/// Where one sink goes, as the command line says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkTarget {
    /// A file (`-` for stdout) with the sink's own records.
    File(PathBuf),
    /// The sink's real destination.
    Connect,
}

/// The sinks of a local run that do not simply go to `--output`.
pub struct LocalSinks {
    routed: Vec<Box<dyn Sink>>,
    /// Whether some sink still writes to `--output`.
    pub output_used: bool,
    /// Keeps the registry the connected sinks' metrics live in.
    _registry: prometheus::Registry,
}

impl Default for LocalSinks {
    fn default() -> Self {
        Self {
            routed: Vec::new(),
            output_used: true,
            _registry: prometheus::Registry::new(),
        }
    }
}

impl LocalSinks {
    /// Builds the routed sinks; names must be sinks of the plan, each at most once.
    pub fn new(
        plan: &Plan,
        targets: &[(String, SinkTarget)],
        open: impl Fn(&Path) -> Result<Box<dyn Write + Send>, RuntimeError>,
    ) -> Result<Self, RuntimeError> {
        let registry = prometheus::Registry::new();
        let mut routed: Vec<Box<dyn Sink>> = Vec::new();
        let mut seen = Vec::new();
        for (name, target) in targets {
            let Some(sink) = plan.sinks.iter().find(|s| &s.name == name) else {
                let names: Vec<&str> = plan.sinks.iter().map(|s| s.name.as_str()).collect();
                return Err(RuntimeError::Usage(format!(
                    "the pipeline has no sink {name:?} (its sinks: {})",
                    names.join(", ")
                )));
            };
            if seen.contains(name) {
                return Err(RuntimeError::Usage(format!(
                    "sink {name:?} is given more than one destination"
                )));
            }
            seen.push(name.clone());
            routed.push(build(sink, target, &registry, &plan.pipeline, &open)?);
        }
        Ok(Self {
            output_used: routed.len() < plan.sinks.len(),
            routed,
            _registry: registry,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.routed.is_empty()
    }

    /// Writes events to the routed sinks; what they refuse is returned. An
    /// event too large to be written as one record is refused before any sink
    /// sees it, and taken out of `events`, as the stage's host does.
    pub fn write(&mut self, events: &mut Vec<Event>) -> Result<Vec<DeadLetter>, RuntimeError> {
        let mut out = SinkOutput::default();
        if self.routed.is_empty() {
            return Ok(out.dead_letters);
        }
        let mut written = Vec::with_capacity(events.len());
        for event in events.drain(..) {
            let value = sonic_rs::to_vec(&event.value).unwrap_or_default();
            if let Some(reason) = too_large_to_write(value.len()) {
                out.dead_letters.push(DeadLetter {
                    step: "sinks".to_owned(),
                    reason,
                    original: event.raw,
                });
                continue;
            }
            let record = SinkRecord {
                event: &event,
                value: &value,
            };
            for sink in &mut self.routed {
                sink.write(&record, &mut out).map_err(sink_error)?;
            }
            written.push(event);
        }
        *events = written;
        Ok(out.dead_letters)
    }

    /// Waits until every routed sink has written everything (bounded).
    pub fn finish(&mut self) -> Result<Vec<DeadLetter>, RuntimeError> {
        let mut out = SinkOutput::default();
        let deadline = Instant::now() + FINISH_WAIT;
        for sink in &mut self.routed {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match sink.prepare(left.min(Duration::from_secs(5)), &mut out) {
                    Ok(Prepared::Ready) => break,
                    Ok(Prepared::Pending) if !left.is_zero() => {
                        tracing::info!(sink = sink.name(), "waiting for the sink to catch up");
                    }
                    Ok(Prepared::Pending) => {
                        return Err(RuntimeError::Usage(format!(
                            "sink {:?} did not finish writing within {FINISH_WAIT:?}; its destination may be unreachable (see the log)",
                            sink.name()
                        )));
                    }
                    Err(error) => return Err(sink_error(error)),
                }
            }
            sink.publish().map_err(sink_error)?;
            // A two-phase sink retries a failed publish at its next commit;
            // a local run has none left, so what is still staged is an error.
            if !sink.staged().is_empty() {
                return Err(RuntimeError::Usage(format!(
                    "sink {:?} could not publish its staged files; its destination may be unreachable (see the log)",
                    sink.name()
                )));
            }
        }
        Ok(out.dead_letters)
    }
}

fn sink_error(error: SinkError) -> RuntimeError {
    RuntimeError::Usage(error.to_string())
}

fn build(
    sink: &PlanSink,
    target: &SinkTarget,
    registry: &prometheus::Registry,
    pipeline: &str,
    open: &impl Fn(&Path) -> Result<Box<dyn Write + Send>, RuntimeError>,
) -> Result<Box<dyn Sink>, RuntimeError> {
    let kind = sink.spec.kind();
    match (target, kind) {
        (SinkTarget::File(path), Some(SinkKind::Elasticsearch)) => Ok(Box::new(
            SearchSink::to_writer(sink, open(path)?).map_err(sink_error)?,
        )),
        (SinkTarget::File(path), _) => Ok(Box::new(EventLines {
            name: sink.name.clone(),
            out: open(path)?,
            path: path.clone(),
        })),
        (SinkTarget::Connect, Some(SinkKind::Kafka)) => Err(RuntimeError::Usage(format!(
            "sink {:?} is a Kafka sink: local mode does not write to brokers (run the pipeline on a cluster, or send it to a file with --sink {}=FILE)",
            sink.name, sink.name
        ))),
        (SinkTarget::Connect, _) => {
            let context = SinkContext { registry, pipeline };
            connectors::build(sink, &context, |sink| {
                Err(SinkError::Unsupported {
                    sink: sink.name.clone(),
                    kind: SinkKind::Kafka,
                })
            })
            .map_err(sink_error)
        }
    }
}

/// A sink written as the JSON lines of its events (what a Kafka sink's topic
/// would receive as values).
struct EventLines {
    name: String,
    out: Box<dyn Write + Send>,
    path: PathBuf,
}

impl EventLines {
    fn io_error(&self, source: std::io::Error) -> SinkError {
        SinkError::File {
            sink: self.name.clone(),
            path: self.path.clone(),
            source,
        }
    }
}

impl Sink for EventLines {
    fn name(&self) -> &str {
        &self.name
    }

    fn guarantee(&self) -> Guarantee {
        Guarantee::Idempotent
    }

    fn write(&mut self, record: &SinkRecord<'_>, _: &mut SinkOutput) -> Result<(), SinkError> {
        let result = self
            .out
            .write_all(record.value)
            .and_then(|()| self.out.write_all(b"\n"));
        result.map_err(|e| self.io_error(e))
    }

    fn prepare(&mut self, _: Duration, _: &mut SinkOutput) -> Result<Prepared, SinkError> {
        match self.out.flush() {
            Ok(()) => Ok(Prepared::Ready),
            Err(e) => Err(self.io_error(e)),
        }
    }
}

/// Parses `NAME=FILE`.
pub fn parse_sink_file(text: &str) -> Result<(String, SinkTarget), String> {
    match text.split_once('=') {
        Some((name, file)) if !name.is_empty() && !file.is_empty() => {
            Ok((name.to_owned(), SinkTarget::File(PathBuf::from(file))))
        }
        _ => Err(format!("expected NAME=FILE, got {text:?}")),
    }
}
