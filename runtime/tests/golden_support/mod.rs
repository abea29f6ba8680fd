//! What the golden tests share (`tests/golden.rs` runs the cases on their JSON
//! lines, `tests/golden_avro.rs` on the same lines as an Avro container): a
//! case's compiled pipeline, tables and clock, and the run of input lines
//! through it in local mode.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keystone_crds::Plan;
use keystone_runtime::ManualClock;
use keystone_runtime::event::{DeadLetter, Event};
use keystone_runtime::local::{self, LocalPipeline};
use keystone_runtime::ops::Table;

pub const START_MS: i64 = 1_767_225_600_000;

/// One case directory, compiled.
pub struct Case {
    /// Read by `golden_avro.rs` (the source contract, the output schema).
    #[allow(dead_code)]
    pub plan: Plan,
    tables: BTreeMap<String, Table>,
    /// Processing time advanced before each input line.
    tick: i64,
}

impl Case {
    pub fn load(dir: &Path) -> Self {
        let mut files = vec![dir.join("pipeline.yaml")];
        if dir.join("processors.yaml").exists() {
            files.push(dir.join("processors.yaml"));
        }
        let manifests = local::read_manifests(&files).unwrap();
        let plan = local::compile_pipeline(&manifests, None)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut table_files = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir.join("tables")) {
            for entry in entries {
                let path = entry.unwrap().path();
                let name = path.file_stem().unwrap().to_string_lossy().into_owned();
                table_files.push((name, path));
            }
        }
        let tables = local::load_tables(&plan, &table_files).unwrap();
        let tick: i64 = std::fs::read_to_string(dir.join("tick-ms"))
            .map(|t| t.trim().parse().unwrap())
            .unwrap_or(0);
        Self { plan, tables, tick }
    }

    /// Runs the input through a new pipeline, one line at a time: the clock
    /// advances by the case's tick before each. `None` is a line that takes its
    /// tick (and the steps' timers run) but is not read: the Avro run's stand-in
    /// for a JSON line no Avro record can be, so that the other records arrive
    /// at the same processing times as in the JSON run.
    pub fn run(&self, input: impl IntoIterator<Item = Option<Vec<u8>>>) -> Outcome {
        let clock = ManualClock::new(START_MS);
        let mut pipeline =
            LocalPipeline::new(&self.plan, &self.tables, Arc::new(clock.clone())).unwrap();
        let mut events: Vec<Event> = Vec::new();
        let mut dead: Vec<DeadLetter> = Vec::new();
        for line in input {
            clock.advance(self.tick);
            let (e, d) = pipeline.push_lines(line.into_iter().collect());
            events.extend(e);
            dead.extend(d);
        }
        let (e, d) = pipeline.finish();
        events.extend(e);
        dead.extend(d);
        let render = |write: &dyn Fn(&mut Vec<u8>)| {
            let mut buf = Vec::new();
            write(&mut buf);
            String::from_utf8(buf).unwrap().trim_end().to_owned()
        };
        Outcome {
            events: events
                .iter()
                .map(|e| render(&|b| e.write_json_line(b)))
                .collect(),
            dead_letters: dead
                .iter()
                .map(|d| render(&|b| d.write_json_line(b)))
                .collect(),
        }
    }
}

/// The events and dead letters of a run, as the JSON lines local mode writes.
pub struct Outcome {
    pub events: Vec<String>,
    pub dead_letters: Vec<String>,
}

/// The lines of `input.jsonl` that local mode reads (blank lines are skipped),
/// numbered from 1 as in the file.
pub fn input_lines(dir: &Path) -> Vec<(usize, Vec<u8>)> {
    let input = std::fs::read(dir.join("input.jsonl")).unwrap();
    input
        .split(|b| *b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
        .map(|(i, line)| (i + 1, line.to_vec()))
        .collect()
}

pub fn parse_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// The case directories, sorted.
pub fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("pipeline.yaml").exists())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 10,
        "expected the golden cases, found {}",
        dirs.len()
    );
    dirs
}
