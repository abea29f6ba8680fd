//! Local mode: every stage of a plan in one process, on JSON-lines files.
//! Stage outputs feed the next stage in memory (a repartition is a no-op with one
//! instance), the last stage's events go to the output (every sink receives the
//! same stream, so one output stands for all of them).
//!
//! Sinks can also be sent elsewhere, one by one (see [`sinks`]).
//!
//! [`run`] uses two threads: the steps run on one, while the calling thread reads,
//! parses and checks the next batches and writes what the steps produced, in
//! input order.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use keystone_crds::ops::Operator as Op;
use keystone_crds::{ManifestErrors, PLAN_VERSION, Plan, Reading};

use crate::buffers::IntakeGate;
use crate::clock::Clock;
use crate::error::RuntimeError;
use crate::event::{DeadLetter, Event};
use crate::ops::Table;
use crate::task::{SourceCheck, StageTask, StepMetrics, TaskOptions};

pub mod avro;
pub mod listen;
pub mod sinks;
mod writer;

pub use sinks::{LocalSinks, SinkTarget};
use writer::BatchWriter;

/// Lines read and processed together: large enough to amortize per-batch work,
/// small enough that a batch's parsed documents stay in cache.
pub const BATCH_LINES: usize = 256;

/// Batches [`run`] reads ahead of the steps at most: enough to keep both threads
/// busy through uneven batches, few enough to bound the memory they hold.
const BATCHES_IN_FLIGHT: usize = 4;

/// Reads every file and every document in it, with a located diagnostic for
/// each problem (a file that cannot be read included): one bad document hides
/// nothing else.
pub fn read_all(files: &[PathBuf]) -> Reading {
    let mut reading = Reading::default();
    for file in files {
        let name = file.display().to_string();
        match read_manifest_file(file) {
            Ok(Ok(text)) => reading.extend(Reading::parse(&name, &text)),
            Ok(Err(size)) => reading.extend(Reading::too_large(&name, size)),
            Err(error) => {
                reading.extend(Reading::unreadable(&name, format!("cannot read: {error}")))
            }
        }
    }
    reading
}

/// A manifest file's text, or its size when that is over the limit: a file too
/// large is not read into memory.
fn read_manifest_file(path: &Path) -> std::io::Result<Result<String, u64>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    let limit = keystone_crds::manifest::MAX_MANIFEST_BYTES as u64;
    if size > limit {
        return Ok(Err(size));
    }
    // No more than the limit, and one byte to tell, even if the file grows.
    let mut text = String::new();
    file.take(limit + 1).read_to_string(&mut text)?;
    Ok(Ok(text))
}

/// Reads and merges manifest files; any problem in them is an error, listing all.
pub fn read_manifests(files: &[PathBuf]) -> Result<Reading, RuntimeError> {
    let reading = read_all(files);
    if reading.diagnostics.is_empty() {
        Ok(reading)
    } else {
        let diagnostics = reading.sorted(reading.diagnostics.clone());
        Err(RuntimeError::Manifest(ManifestErrors(diagnostics)))
    }
}

/// The index of the one pipeline read (or of the one named `name`).
pub fn select_pipeline(reading: &Reading, name: Option<&str>) -> Result<usize, RuntimeError> {
    let pipelines = &reading.manifests.pipelines;
    let names: Vec<&str> = pipelines
        .iter()
        .map(|p| p.metadata.name.as_deref().unwrap_or("pipeline"))
        .collect();
    match name {
        Some(name) => pipelines
            .iter()
            .position(|p| p.metadata.name.as_deref() == Some(name))
            .ok_or_else(|| {
                RuntimeError::Usage(format!(
                    "no Pipeline named {name:?} (found: {})",
                    names.join(", ")
                ))
            }),
        None => match pipelines.len() {
            1 => Ok(0),
            0 => Err(RuntimeError::Usage(
                "no Pipeline in the given files".to_owned(),
            )),
            _ => Err(RuntimeError::Usage(format!(
                "{} Pipelines in the given files ({}): choose one with --pipeline",
                names.len(),
                names.join(", ")
            ))),
        },
    }
}

/// Compiles the one pipeline read (or the one named `name`); its contract
/// errors are located in its file.
pub fn compile_pipeline(reading: &Reading, name: Option<&str>) -> Result<Plan, RuntimeError> {
    let index = select_pipeline(reading, name)?;
    reading
        .compile(index)
        .map_err(|diagnostics| RuntimeError::Manifest(ManifestErrors(diagnostics)))
}

/// Loads `--table NAME=FILE` rows for the plan's join and enrich steps. Every
/// table the plan looks up must be given, and every given table must be used.
pub fn load_tables(
    plan: &Plan,
    files: &[(String, PathBuf)],
) -> Result<BTreeMap<String, Table>, RuntimeError> {
    let mut specs = BTreeMap::new();
    for step in plan.stages.iter().flat_map(|s| &s.steps) {
        match step.operator.single() {
            Some(Op::Join(j)) => {
                specs
                    .entry(j.table.name.clone())
                    .or_insert((step.name.clone(), j.table.clone()));
            }
            Some(Op::Enrich(e)) => {
                specs
                    .entry(e.table.name.clone())
                    .or_insert((step.name.clone(), e.table.clone()));
            }
            _ => {}
        }
    }
    let mut tables = BTreeMap::new();
    for (name, path) in files {
        let Some((_, spec)) = specs.get(name) else {
            let known: Vec<&str> = specs.keys().map(String::as_str).collect();
            return Err(RuntimeError::Usage(format!(
                "--table {name}: the pipeline looks up no table named {name:?} (its tables: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )));
        };
        let mut table = Table::new(spec);
        table.load_jsonl(path)?;
        tables.insert(name.clone(), table);
    }
    for (name, (step, _)) in &specs {
        if !tables.contains_key(name) {
            return Err(RuntimeError::Usage(format!(
                "step {step:?} looks up table {name:?}: give its rows with --table {name}=FILE (JSON lines)"
            )));
        }
    }
    Ok(tables)
}

/// All stages of a plan, chained in memory.
pub struct LocalPipeline {
    /// Parses and checks input ahead of the first stage, apart from it, so that
    /// [`run`] can do it on another thread than the steps'.
    source: SourceCheck,
    stages: Vec<StageTask>,
    /// Bytes of held-back events past which [`run`] stops reading input.
    buffer_limit: u64,
}

impl LocalPipeline {
    pub fn new(
        plan: &Plan,
        tables: &BTreeMap<String, Table>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, RuntimeError> {
        if plan.version != PLAN_VERSION {
            return Err(RuntimeError::PlanVersion {
                found: plan.version,
                expected: PLAN_VERSION,
            });
        }
        let options = TaskOptions {
            record_changes: false,
        };
        let stages = plan
            .stages
            .iter()
            .enumerate()
            .map(|(i, stage)| {
                // The first stage gets the source schema for what the check proves
                // about its steps' required fields; its input arrives checked.
                let source = (i == 0).then_some(&plan.source.schema);
                StageTask::new(stage, source, tables, clock.clone(), options)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            source: SourceCheck::new(Some(&plan.source.schema)),
            stages,
            buffer_limit: crate::buffers::default_limit(),
        })
    }

    /// Sets the bytes of held-back events past which [`run`] stops reading
    /// input until timers have released enough.
    pub fn with_buffer_limit(mut self, bytes: u64) -> Self {
        self.buffer_limit = bytes;
        self
    }

    /// Runs raw input lines through every stage; returns what reached the sinks
    /// and the dead letters, in order.
    pub fn push_lines(&mut self, lines: Vec<Vec<u8>>) -> (Vec<Event>, Vec<DeadLetter>) {
        let checked = check_lines(&mut self.source, lines);
        push_checked(&mut self.stages, checked)
    }

    /// Fires timers; what they release flows on through later stages.
    pub fn tick(&mut self) -> (Vec<Event>, Vec<DeadLetter>) {
        self.flow(|stage| stage.tick())
    }

    /// End of input: every stage flushes, in order.
    pub fn finish(&mut self) -> (Vec<Event>, Vec<DeadLetter>) {
        let (mut events, mut dead) = (Vec::new(), Vec::new());
        self.finish_parts(|(mut part, mut letters)| {
            events.append(&mut part);
            dead.append(&mut letters);
            Ok::<_, std::convert::Infallible>(())
        })
        .unwrap_or_else(|never| match never {});
        (events, dead)
    }

    /// End of input, handing what reaches the sinks to `each` a part at a
    /// time: a step that held back a lot flushes it in parts, and no part
    /// waits in memory for the others.
    pub fn finish_parts<E>(
        &mut self,
        mut each: impl FnMut((Vec<Event>, Vec<DeadLetter>)) -> Result<(), E>,
    ) -> Result<(), E> {
        for closing in 0..self.stages.len() {
            loop {
                let more = self.stages[closing].finish_part();
                let mut dead = self.stages[closing].take_dead_letters();
                let mut events = self.stages[closing].take_events();
                for stage in &mut self.stages[closing + 1..] {
                    if !events.is_empty() {
                        stage.push_events(std::mem::take(&mut events));
                    }
                    dead.append(&mut stage.take_dead_letters());
                    events = stage.take_events();
                }
                each((events, dead))?;
                if !more {
                    break;
                }
            }
        }
        Ok(())
    }

    fn flow(&mut self, mut hook: impl FnMut(&mut StageTask)) -> (Vec<Event>, Vec<DeadLetter>) {
        let mut dead = Vec::new();
        let mut events: Vec<Event> = Vec::new();
        for stage in &mut self.stages {
            if !events.is_empty() {
                stage.push_events(std::mem::take(&mut events));
            }
            hook(stage);
            dead.append(&mut stage.take_dead_letters());
            events = stage.take_events();
        }
        (events, dead)
    }

    /// Per-step counters, the source check first.
    pub fn metrics(&self) -> Vec<StepMetrics> {
        let mut all = vec![self.source.metrics().clone()];
        for stage in &self.stages {
            all.extend(stage.step_metrics().cloned());
        }
        all
    }

    pub fn stages(&self) -> &[StageTask] {
        &self.stages
    }

    pub fn stages_mut(&mut self) -> &mut [StageTask] {
        &mut self.stages
    }
}

/// What a local run did.
#[derive(Clone, Debug, Default)]
pub struct RunSummary {
    pub input_events: u64,
    pub output_events: u64,
    pub dead_letters: u64,
    pub elapsed: Duration,
    pub steps: Vec<StepMetrics>,
}

impl RunSummary {
    /// The per-step table printed on stderr.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{:<24} {:>10} {:>10} {:>10} {:>13} {:>14}\n",
            "step", "in", "out", "dropped", "dead-letters", "events/s"
        );
        for step in &self.steps {
            let rate = step
                .throughput()
                .map(|r| format!("{:.0}", r))
                .unwrap_or_else(|| "-".to_owned());
            out.push_str(&format!(
                "{:<24} {:>10} {:>10} {:>10} {:>13} {:>14}\n",
                step.name, step.events_in, step.events_out, step.dropped, step.dead_lettered, rate
            ));
        }
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.input_events as f64 / secs
        } else {
            0.0
        };
        out.push_str(&format!(
            "{} events in, {} out, {} dead letters in {:.3} s ({:.0} events/s)\n",
            self.input_events, self.output_events, self.dead_letters, secs, rate
        ));
        out
    }
}

/// A batch's events and dead letters, in order.
type Batch = (Vec<Event>, Vec<DeadLetter>);

/// Parses and checks input lines: the events that passed, and the dead letters
/// of those that did not.
fn check_lines(source: &mut SourceCheck, lines: Vec<Vec<u8>>) -> Batch {
    let mut dead = Vec::new();
    let events = source.check(lines.into_iter().map(|line| (line, None)), &mut dead);
    (events, dead)
}

/// Runs a checked batch through every stage; returns what reached the sinks and
/// the dead letters (the batch's own first), in order.
/// Bytes of events the stages hold back.
fn buffered_bytes(stages: &[StageTask]) -> u64 {
    stages.iter().map(StageTask::buffered_bytes).sum()
}

/// How long the steps wait for their timers while the buffers are full.
const BUFFER_WAIT: Duration = Duration::from_millis(10);

/// Backpressure: while the held-back events are past the limit, no more
/// input; the timers release what is due and it is handed to `send`.
fn wait_for_buffers(
    stages: &mut [StageTask],
    gate: &mut IntakeGate,
    mut send: impl FnMut(Batch) -> bool,
) {
    while gate.update(buffered_bytes(stages)) {
        let before = stages.first().map(StageTask::now_ms);
        std::thread::sleep(BUFFER_WAIT);
        if stages.first().map(StageTask::now_ms) == before {
            // A clock that does not move (a test's) never releases anything.
            return;
        }
        if !send(push_checked(stages, Batch::default())) {
            return;
        }
    }
}

fn push_checked(stages: &mut [StageTask], (mut events, mut dead): Batch) -> Batch {
    for stage in stages {
        stage.push_events(events);
        dead.append(&mut stage.take_dead_letters());
        events = stage.take_events();
    }
    (events, dead)
}

/// Reads the next batch of non-blank lines (without line ends); returns them and
/// the bytes consumed, none at the end of input. A batch of only blank lines is
/// empty but still goes through the steps (and fires their timers).
fn read_batch(
    input: &mut impl BufRead,
    input_name: &Path,
) -> Result<(Vec<Vec<u8>>, u64), RuntimeError> {
    let mut lines = Vec::with_capacity(BATCH_LINES);
    let mut bytes = 0u64;
    while lines.len() < BATCH_LINES {
        let mut line = Vec::with_capacity(512);
        let read = input
            .read_until(b'\n', &mut line)
            .map_err(|e| RuntimeError::io(input_name, e))?;
        if read == 0 {
            break;
        }
        bytes += read as u64;
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        lines.push(line);
    }
    Ok((lines, bytes))
}

/// Reads JSON lines from `input` until its end, runs them through `pipeline`, writes
/// sink events to `output` (unless every sink is routed by `sinks`) and to the
/// routed sinks, and dead letters to `dead_letters`, both as JSON lines.
/// `on_progress` is told how many input bytes were consumed after every batch.
///
/// The steps run on a second thread, up to [`BATCHES_IN_FLIGHT`] batches behind
/// this one, which reads, parses and checks input and serializes and writes output:
/// per event and stateless work, so that the output is the same, in the same
/// order, as if one thread did everything.
pub fn run<R: BufRead, W: Write, D: Write>(
    pipeline: &mut LocalPipeline,
    mut input: R,
    output: &mut W,
    sinks: &mut LocalSinks,
    dead_letters: &mut D,
    mut on_progress: impl FnMut(u64),
    input_name: &Path,
) -> Result<RunSummary, RuntimeError> {
    let started = Instant::now();
    let mut summary = RunSummary::default();
    let mut writer = BatchWriter::new(output, sinks, dead_letters);
    let mut write =
        |batch: Batch, last: bool, summary: &mut RunSummary| writer.write(batch, last, summary);
    let LocalPipeline {
        source,
        stages,
        buffer_limit,
    } = pipeline;
    let mut gate = IntakeGate::new(*buffer_limit);
    std::thread::scope(|scope| {
        // Unbounded channels, but never more than BATCHES_IN_FLIGHT batches in
        // them: this thread waits for a processed batch before it sends more.
        let (to_steps, checked) = mpsc::channel::<Batch>();
        // Each processed batch says whether it answers an input batch (or
        // only carries what timers released while the buffers were full).
        let (to_writer, processed) = mpsc::channel::<(Batch, bool)>();
        let steps = scope.spawn(move || {
            for batch in checked {
                if to_writer.send((push_checked(stages, batch), true)).is_err() {
                    return; // The writer stopped on an error.
                }
                wait_for_buffers(stages, &mut gate, |batch| {
                    to_writer.send((batch, false)).is_ok()
                });
            }
        });
        let mut in_flight = 0;
        let mut read_error = None;
        loop {
            let (lines, bytes) = match read_batch(&mut input, input_name) {
                Ok((_, 0)) => break,
                Ok(batch) => batch,
                // What was read before the error is still processed and written.
                Err(e) => {
                    read_error = Some(e);
                    break;
                }
            };
            summary.input_events += lines.len() as u64;
            if to_steps.send(check_lines(source, lines)).is_err() {
                break; // The steps' thread panicked: joined below.
            }
            on_progress(bytes);
            in_flight += 1;
            // Write what the steps have finished (so that output does not wait for
            // more input), and wait for them only when they are a window behind.
            // If they panicked, receiving fails here and sending above.
            loop {
                let batch = if in_flight == BATCHES_IN_FLIGHT {
                    processed.recv().ok()
                } else {
                    processed.try_recv().ok()
                };
                let Some((batch, answers_input)) = batch else {
                    break;
                };
                write(batch, false, &mut summary)?;
                if answers_input {
                    in_flight -= 1;
                }
            }
        }
        drop(to_steps);
        for (batch, _) in processed.iter() {
            write(batch, false, &mut summary)?;
        }
        if let Err(panic) = steps.join() {
            std::panic::resume_unwind(panic);
        }
        read_error.map_or(Ok(()), Err)
    })?;
    pipeline.finish_parts(|part| write(part, false, &mut summary))?;
    write((Vec::new(), Vec::new()), true, &mut summary)?;
    writer.flush()?;
    summary.elapsed = started.elapsed();
    summary.steps = pipeline.metrics();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use std::io::{BufReader, Read};

    use super::*;
    use crate::clock::ManualClock;

    const MANIFEST: &str = r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: t}
spec:
  source:
    topic: in
    key: [k]
    schema: {fields: [{name: k, type: integer}, {name: seq, type: integer}, {name: id, type: string}]}
  steps:
    - name: dedup
      dedup: {key: [id], window: 1h}
    - name: order
      order: {key: [k], sequence: seq, maxDelay: 5s, contiguous: true, onStale: DeadLetter}
  sinks: [{name: out, kafka: {topic: out}}]
"#;

    fn pipeline() -> LocalPipeline {
        let reading = Reading::parse("t.yaml", MANIFEST);
        let plan = compile_pipeline(&reading, None).unwrap();
        LocalPipeline::new(&plan, &BTreeMap::new(), Arc::new(ManualClock::new(0))).unwrap()
    }

    /// Many batches of events, redeliveries (dropped), stale sequences (dead letters
    /// of step `order`), unparseable and schema-violating lines (dead letters of
    /// `source`), blank lines and CRLF line ends.
    fn input() -> String {
        let mut text = String::new();
        for seq in 1..=100 {
            for k in 0..50 {
                text.push_str(&format!(r#"{{"k":{k},"seq":{seq},"id":"{k}-{seq}"}}"#));
                text.push_str(if k % 7 == 0 { "\r\n" } else { "\n" });
                if (k + seq) % 13 == 0 {
                    text.push_str(&format!(
                        "{{\"k\":{k},\"seq\":{seq},\"id\":\"{k}-{seq}\"}}\n"
                    ));
                }
                if (k + seq) % 17 == 0 {
                    text.push_str(&format!("{{\"k\":{k},\"seq\":1,\"id\":\"{k}-{seq}-x\"}}\n"));
                }
                if (k * seq) % 101 == 0 {
                    text.push_str("{not json\n\n   \n{\"k\":\"a\",\"seq\":1,\"id\":\"s\"}\n");
                }
            }
        }
        text
    }

    /// One thread's way, independent of `run`'s: the first stage parses and checks
    /// the lines itself.
    fn push_raw(pipeline: &mut LocalPipeline, lines: Vec<Vec<u8>>) -> Batch {
        let mut lines = Some(lines);
        let (mut events, mut dead) = (Vec::new(), Vec::new());
        for stage in pipeline.stages_mut() {
            match lines.take() {
                Some(lines) => stage.push_raw(lines),
                None => stage.push_events(std::mem::take(&mut events)),
            }
            dead.append(&mut stage.take_dead_letters());
            events = stage.take_events();
        }
        (events, dead)
    }

    fn lines((batch, dead): Batch) -> (Vec<u8>, Vec<u8>) {
        let mut out = Vec::new();
        batch.iter().for_each(|e| e.write_json_line(&mut out));
        let mut letters = Vec::new();
        dead.iter().for_each(|d| d.write_json_line(&mut letters));
        (out, letters)
    }

    #[test]
    fn run_writes_what_one_thread_would_in_the_same_order() {
        let text = input();
        let mut expected = (Vec::new(), Vec::new());
        let mut sequential = pipeline();
        let non_blank: Vec<Vec<u8>> = text
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.as_bytes().to_vec())
            .collect();
        assert!(non_blank.len() > 4 * BATCH_LINES * BATCHES_IN_FLIGHT);
        for chunk in non_blank.chunks(BATCH_LINES) {
            let (out, letters) = lines(push_raw(&mut sequential, chunk.to_vec()));
            expected.0.extend(out);
            expected.1.extend(letters);
        }
        let (out, letters) = lines(sequential.finish());
        expected.0.extend(out);
        expected.1.extend(letters);

        let mut threaded = pipeline();
        let (mut output, mut dead_letters) = (Vec::new(), Vec::new());
        let mut progress = 0;
        let summary = run(
            &mut threaded,
            text.as_bytes(),
            &mut output,
            &mut LocalSinks::default(),
            &mut dead_letters,
            |bytes| progress += bytes,
            Path::new("in.jsonl"),
        )
        .unwrap();

        let text_lines = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).unwrap();
        assert!(text_lines(&dead_letters).contains(r#""step":"order""#));
        assert!(text_lines(&dead_letters).contains(r#""step":"source""#));
        assert_eq!(text_lines(&output), text_lines(&expected.0));
        assert_eq!(text_lines(&dead_letters), text_lines(&expected.1));
        assert_eq!(progress, text.len() as u64);
        assert_eq!(summary.input_events, non_blank.len() as u64);
        let counters = |steps: &[StepMetrics]| -> Vec<_> {
            steps
                .iter()
                .map(|s| {
                    (
                        s.name.clone(),
                        s.events_in,
                        s.events_out,
                        s.dropped,
                        s.dead_lettered,
                    )
                })
                .collect()
        };
        let stages = sequential.stages();
        let sequential_steps: Vec<StepMetrics> = std::iter::once(stages[0].source_metrics())
            .chain(stages.iter().flat_map(StageTask::step_metrics))
            .cloned()
            .collect();
        assert_eq!(counters(&summary.steps), counters(&sequential_steps));
    }

    /// Fails once the bytes before it are read.
    struct FailsAfter(&'static [u8]);

    impl Read for FailsAfter {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() {
                return Err(std::io::Error::other("disk on fire"));
            }
            self.0.read(buf)
        }
    }

    #[test]
    fn a_read_error_names_the_input_after_writing_the_batches_read_before_it() {
        let text: &'static str = input().leak();
        // Whole batches and part of one: the part is lost, as it was when reading
        // and processing alternated.
        let cut = text
            .match_indices('\n')
            .nth(3 * BATCH_LINES + 10)
            .map(|(i, _)| i + 1)
            .unwrap();
        let input = BufReader::with_capacity(64, FailsAfter(&text.as_bytes()[..cut]));
        let (mut output, mut dead_letters) = (Vec::new(), Vec::new());
        let error = run(
            &mut pipeline(),
            input,
            &mut output,
            &mut LocalSinks::default(),
            &mut dead_letters,
            |_| {},
            Path::new("in.jsonl"),
        )
        .unwrap_err();
        assert!(error.to_string().contains("in.jsonl"), "{error}");
        assert!(error.to_string().contains("disk on fire"), "{error}");

        let mut expected = pipeline();
        let (mut events, mut dead) = (0, 0);
        let mut batches = &text.as_bytes()[..cut];
        loop {
            let (lines, _) = read_batch(&mut batches, Path::new("in.jsonl")).unwrap();
            if lines.len() < BATCH_LINES {
                break;
            }
            let (e, d) = push_raw(&mut expected, lines);
            events += e.len();
            dead += d.len();
        }
        assert!(events > 0 && dead > 0);
        assert_eq!(output.iter().filter(|b| **b == b'\n').count(), events);
        assert_eq!(dead_letters.iter().filter(|b| **b == b'\n').count(), dead);
    }

    fn waiting_pipeline(max_delay: &str, clock: Arc<dyn Clock>) -> LocalPipeline {
        let manifest = MANIFEST.replace(
            "maxDelay: 5s, contiguous: true",
            &format!("maxDelay: {max_delay}, maxBuffered: 100000, contiguous: false"),
        );
        let reading = Reading::parse("t.yaml", &manifest);
        let plan = compile_pipeline(&reading, None).unwrap();
        LocalPipeline::new(&plan, &BTreeMap::new(), clock).unwrap()
    }

    fn numbered(count: i64) -> Vec<Vec<u8>> {
        (0..count)
            .map(|i| format!(r#"{{"k":{},"seq":{},"id":"e{i}"}}"#, i % 7, i).into_bytes())
            .collect()
    }

    #[test]
    fn past_the_buffer_limit_intake_waits_until_timers_release_enough() {
        let mut pipeline = waiting_pipeline("50ms", Arc::new(crate::clock::SystemClock));
        let checked = check_lines(&mut pipeline.source, numbered(500));
        let (held, _) = push_checked(&mut pipeline.stages, checked);
        assert!(held.is_empty(), "every event waits its maxDelay");
        let buffered = buffered_bytes(&pipeline.stages);
        assert!(buffered > 500 * 30, "{buffered} bytes held for 500 events");
        let mut gate = IntakeGate::new(buffered / 2);
        let mut released = Vec::new();
        wait_for_buffers(&mut pipeline.stages, &mut gate, |(events, _)| {
            released.extend(events);
            true
        });
        assert!(!gate.is_full());
        assert!(buffered_bytes(&pipeline.stages) < buffered / 2 / 10 * 9);
        assert!(
            released.len() >= 250,
            "{} events released while intake waited",
            released.len()
        );
    }

    #[test]
    fn a_clock_that_does_not_move_never_holds_intake_forever() {
        let mut pipeline = waiting_pipeline("5s", Arc::new(ManualClock::new(0)));
        let checked = check_lines(&mut pipeline.source, numbered(50));
        let _ = push_checked(&mut pipeline.stages, checked);
        let mut gate = IntakeGate::new(1);
        wait_for_buffers(&mut pipeline.stages, &mut gate, |_| true);
        assert!(gate.is_full(), "nothing could be released");
    }

    #[test]
    fn end_of_input_flushes_what_waits_in_parts_in_order() {
        let mut pipeline = waiting_pipeline("1h", Arc::new(ManualClock::new(0)));
        let count = 20_000;
        let checked = check_lines(&mut pipeline.source, numbered(count));
        let (early, _) = push_checked(&mut pipeline.stages, checked);
        assert!(early.is_empty(), "every event waits");
        let mut parts = Vec::new();
        pipeline
            .finish_parts(|(events, _)| {
                parts.push(events);
                Ok::<_, ()>(())
            })
            .unwrap();
        assert!(parts.len() > 2, "{} parts", parts.len());
        assert!(parts.iter().all(|p| p.len() <= 8192 + 20_000 / 7 + 1));
        let seqs: Vec<i64> = parts
            .iter()
            .flatten()
            .map(|e| sonic_rs::JsonValueTrait::as_i64(&e.value["seq"]).unwrap())
            .collect();
        assert_eq!(seqs.len(), count as usize);
        // Each key's events ascend.
        for k in 0..7 {
            let of_key: Vec<i64> = seqs.iter().copied().filter(|s| s % 7 == k).collect();
            assert!(of_key.windows(2).all(|w| w[0] < w[1]), "key {k}");
        }
        assert_eq!(buffered_bytes(&pipeline.stages), 0);
    }
}
