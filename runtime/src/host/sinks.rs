//! The sinks of the stage that writes them, driven by the commit protocol.

use std::time::Duration;

use std::collections::BTreeMap;

use crate::connectors::StagedEpochs;
use crate::connectors::{Guarantee, Prepared, Sink, SinkError, SinkOutput, SinkRecord};
use crate::event::Event;

/// Every sink of the plan; each receives every event that reaches the sinks.
pub(super) struct Sinks {
    sinks: Vec<Box<dyn Sink>>,
    takes_serialized: bool,
}

impl Sinks {
    pub(super) fn new(sinks: Vec<Box<dyn Sink>>) -> Self {
        let takes_serialized = sinks.iter().any(|sink| sink.takes_serialized());
        Self {
            sinks,
            takes_serialized,
        }
    }

    /// Whether some sink reads the serialized event.
    pub(super) fn takes_serialized(&self) -> bool {
        self.takes_serialized
    }

    /// Writes one event to every sink; what a sink refuses goes to `out`.
    pub(super) fn write(
        &mut self,
        event: &Event,
        value: &[u8],
        out: &mut SinkOutput,
    ) -> Result<(), SinkError> {
        let record = SinkRecord { event, value };
        for sink in &mut self.sinks {
            sink.write(&record, out)?;
        }
        Ok(())
    }

    /// Whether some sink holds as much unanswered work as it may.
    pub(super) fn backpressured(&self) -> bool {
        self.sinks.iter().any(|sink| sink.backpressured())
    }

    /// Prepares every sink, all within `wait`: `Ready` only when every one is.
    pub(super) fn prepare(
        &mut self,
        wait: Duration,
        out: &mut SinkOutput,
    ) -> Result<Prepared, SinkError> {
        let deadline = std::time::Instant::now() + wait;
        let mut prepared = Prepared::Ready;
        for sink in &mut self.sinks {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if sink.prepare(left, out)? == Prepared::Pending {
                tracing::debug!(sink = sink.name(), "sink not prepared yet");
                prepared = Prepared::Pending;
            }
        }
        Ok(prepared)
    }

    /// The sinks still preparing, for error messages.
    pub(super) fn names(&self) -> Vec<String> {
        self.sinks.iter().map(|s| s.name().to_owned()).collect()
    }

    pub(super) fn publish(&mut self) -> Result<(), SinkError> {
        for sink in &mut self.sinks {
            sink.publish()?;
        }
        Ok(())
    }

    pub(super) fn finish(&mut self) {
        for sink in &mut self.sinks {
            sink.finish();
        }
    }

    /// Whether some sink stages and publishes (and so has epochs to recover).
    pub(super) fn two_phase(&self) -> bool {
        self.sinks
            .iter()
            .any(|sink| sink.guarantee() == Guarantee::TwoPhase)
    }

    /// What each sink has staged and not published, for the commit metadata.
    pub(super) fn staged(&self) -> BTreeMap<String, Vec<StagedEpochs>> {
        self.sinks
            .iter()
            .map(|sink| (sink.name().to_owned(), sink.staged()))
            .filter(|(_, staged)| !staged.is_empty())
            .collect()
    }

    /// Hands each sink the epochs the last commits of its new partitions name.
    pub(super) fn recover(
        &mut self,
        mut staged: BTreeMap<String, Vec<StagedEpochs>>,
    ) -> Result<(), SinkError> {
        for sink in &mut self.sinks {
            if let Some(epochs) = staged.remove(sink.name()) {
                sink.recover(epochs)?;
            }
        }
        Ok(())
    }

    pub(super) fn abort(&mut self) {
        for sink in &mut self.sinks {
            sink.abort();
        }
    }
}
