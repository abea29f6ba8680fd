//! Local mode: every stage of a plan in one process, on JSON-lines files.
//! Stage outputs feed the next stage in memory (a repartition is a no-op with one
//! instance), the last stage's events go to the output (every sink receives the
//! same stream, so one output stands for all of them).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keystone_crds::ops::Operator as Op;
use keystone_crds::{Manifests, PLAN_VERSION, Plan, compile, parse_manifests};

use crate::clock::Clock;
use crate::error::RuntimeError;
use crate::event::{DeadLetter, Event};
use crate::ops::Table;
use crate::task::{StageTask, StepMetrics, TaskOptions};

/// Lines read and processed together.
/// Lines read and processed together: large enough to amortize per-batch work,
/// small enough that a batch's parsed documents stay in cache.
pub const BATCH_LINES: usize = 256;

/// Reads and merges manifest files.
pub fn read_manifests(files: &[PathBuf]) -> Result<Manifests, RuntimeError> {
    let mut manifests = Manifests::default();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|e| RuntimeError::io(file, e))?;
        manifests.extend(parse_manifests(&file.display().to_string(), &text)?);
    }
    Ok(manifests)
}

/// Compiles the one pipeline in `manifests` (or the one named `name`).
pub fn compile_pipeline(manifests: &Manifests, name: Option<&str>) -> Result<Plan, RuntimeError> {
    let names: Vec<&str> = manifests
        .pipelines
        .iter()
        .map(|p| p.metadata.name.as_deref().unwrap_or("pipeline"))
        .collect();
    let pipeline = match name {
        Some(name) => manifests
            .pipelines
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
            .ok_or_else(|| {
                RuntimeError::Usage(format!(
                    "no Pipeline named {name:?} (found: {})",
                    names.join(", ")
                ))
            })?,
        None => match manifests.pipelines.as_slice() {
            [one] => one,
            [] => {
                return Err(RuntimeError::Usage(
                    "no Pipeline in the given files".to_owned(),
                ));
            }
            _ => {
                return Err(RuntimeError::Usage(format!(
                    "{} Pipelines in the given files ({}): choose one with --pipeline",
                    names.len(),
                    names.join(", ")
                )));
            }
        },
    };
    compile(pipeline, &manifests.processors).map_err(RuntimeError::Contract)
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
    stages: Vec<StageTask>,
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
                let source = (i == 0).then_some(&plan.source.schema);
                StageTask::new(stage, source, tables, clock.clone(), options)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { stages })
    }

    /// Runs raw input lines through every stage; returns what reached the sinks
    /// and the dead letters, in order.
    pub fn push_lines(&mut self, lines: Vec<Vec<u8>>) -> (Vec<Event>, Vec<DeadLetter>) {
        let mut lines = Some(lines);
        let mut dead = Vec::new();
        let mut events = Vec::new();
        for stage in &mut self.stages {
            match lines.take() {
                Some(lines) => stage.push_raw(lines),
                None => stage.push_events(std::mem::take(&mut events)),
            }
            dead.append(&mut stage.take_dead_letters());
            events = stage.take_events();
        }
        (events, dead)
    }

    /// Fires timers; what they release flows on through later stages.
    pub fn tick(&mut self) -> (Vec<Event>, Vec<DeadLetter>) {
        self.flow(|stage| stage.tick())
    }

    /// End of input: every stage flushes, in order.
    pub fn finish(&mut self) -> (Vec<Event>, Vec<DeadLetter>) {
        self.flow(|stage| stage.finish())
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
        let mut all = Vec::new();
        if let Some(first) = self.stages.first() {
            all.push(first.source_metrics().clone());
        }
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
#[derive(Clone, Debug)]
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

/// Reads JSON lines from `input` until its end, runs them through `pipeline`, writes
/// sink events to `output` and dead letters to `dead_letters`, both as JSON lines.
/// `on_progress` is told how many input bytes were consumed after every batch.
pub fn run<R: BufRead, W: Write, D: Write>(
    pipeline: &mut LocalPipeline,
    mut input: R,
    output: &mut W,
    dead_letters: &mut D,
    mut on_progress: impl FnMut(u64),
    input_name: &Path,
) -> Result<RunSummary, RuntimeError> {
    let started = Instant::now();
    let mut summary = RunSummary {
        input_events: 0,
        output_events: 0,
        dead_letters: 0,
        elapsed: Duration::ZERO,
        steps: Vec::new(),
    };
    let mut out_buf = Vec::with_capacity(1 << 20);
    let mut dl_buf = Vec::new();
    let output_name = Path::new("output");
    let mut write = |events: Vec<Event>,
                     dead: Vec<DeadLetter>,
                     summary: &mut RunSummary|
     -> Result<(), RuntimeError> {
        out_buf.clear();
        for event in &events {
            event.write_json_line(&mut out_buf);
        }
        output
            .write_all(&out_buf)
            .map_err(|e| RuntimeError::io(output_name, e))?;
        dl_buf.clear();
        for letter in &dead {
            letter.write_json_line(&mut dl_buf);
        }
        dead_letters
            .write_all(&dl_buf)
            .map_err(|e| RuntimeError::io("dead letters", e))?;
        summary.output_events += events.len() as u64;
        summary.dead_letters += dead.len() as u64;
        Ok(())
    };
    loop {
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
        if lines.is_empty() && bytes == 0 {
            break;
        }
        summary.input_events += lines.len() as u64;
        let (events, dead) = pipeline.push_lines(lines);
        write(events, dead, &mut summary)?;
        on_progress(bytes);
    }
    let (events, dead) = pipeline.finish();
    write(events, dead, &mut summary)?;
    output
        .flush()
        .map_err(|e| RuntimeError::io(output_name, e))?;
    dead_letters
        .flush()
        .map_err(|e| RuntimeError::io("dead letters", e))?;
    summary.elapsed = started.elapsed();
    summary.steps = pipeline.metrics();
    Ok(summary)
}
