//! Where a local run's results go: sink events to the output (unless every
//! sink is routed elsewhere) and to the routed sinks, dead letters to theirs,
//! both as JSON lines.

use std::io::Write;

use super::{Batch, LocalSinks, RunSummary};
use crate::error::RuntimeError;
use crate::event::{DeadLetter, too_large_to_write};

pub(super) struct BatchWriter<'a, W: Write, D: Write> {
    output: &'a mut W,
    sinks: &'a mut LocalSinks,
    dead_letters: &'a mut D,
    out_buf: Vec<u8>,
    dl_buf: Vec<u8>,
}

const OUTPUT: &str = "output";

impl<'a, W: Write, D: Write> BatchWriter<'a, W, D> {
    pub(super) fn new(
        output: &'a mut W,
        sinks: &'a mut LocalSinks,
        dead_letters: &'a mut D,
    ) -> Self {
        BatchWriter {
            output,
            sinks,
            dead_letters,
            out_buf: Vec::with_capacity(1 << 20),
            dl_buf: Vec::new(),
        }
    }

    /// Writes a batch's events and dead letters; with `settle`, also waits
    /// until the routed sinks have written everything (at the end of input,
    /// or before an ingest request is answered).
    pub(super) fn write(
        &mut self,
        (mut events, mut dead): Batch,
        settle: bool,
        summary: &mut RunSummary,
    ) -> Result<(), RuntimeError> {
        if self.sinks.output_used {
            self.out_buf.clear();
            let mut written = Vec::with_capacity(events.len());
            for event in events {
                let start = self.out_buf.len();
                event.write_json_line(&mut self.out_buf);
                // Without the line end: the record a Kafka sink would write.
                match too_large_to_write(self.out_buf.len() - start - 1) {
                    None => written.push(event),
                    Some(reason) => {
                        self.out_buf.truncate(start);
                        dead.push(DeadLetter {
                            step: "sinks".to_owned(),
                            reason,
                            original: event.raw,
                        });
                    }
                }
            }
            events = written;
            self.output
                .write_all(&self.out_buf)
                .map_err(|e| RuntimeError::io(OUTPUT, e))?;
        }
        dead.extend(self.sinks.write(&mut events)?);
        if settle {
            // What the routed sinks refuse while they finish writing.
            dead.extend(self.sinks.finish()?);
        }
        self.dl_buf.clear();
        for letter in &dead {
            letter.write_json_line(&mut self.dl_buf);
        }
        self.dead_letters
            .write_all(&self.dl_buf)
            .map_err(|e| RuntimeError::io("dead letters", e))?;
        summary.output_events += events.len() as u64;
        summary.dead_letters += dead.len() as u64;
        Ok(())
    }

    pub(super) fn flush(&mut self) -> Result<(), RuntimeError> {
        self.output
            .flush()
            .map_err(|e| RuntimeError::io(OUTPUT, e))?;
        self.dead_letters
            .flush()
            .map_err(|e| RuntimeError::io("dead letters", e))
    }
}
