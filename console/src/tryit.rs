//! "Try it": sample events through a pipeline's steps in local mode, in this
//! process, with what each step let through, dropped and dead-lettered. The
//! same engine as `keystone-runtime run`; input is bounded so that one try
//! cannot hold the server.

use std::path::PathBuf;
use std::sync::Arc;

use keystone_crds::Plan;
use keystone_crds::ops::Operator as Op;
use keystone_runtime::local::{LocalPipeline, load_tables};
use keystone_runtime::{StepMetrics, SystemClock};

/// Sample events one try takes at most.
pub const MAX_EVENTS: usize = 10_000;
/// What a try shows of the output and of the dead letters.
const SHOWN: usize = 200;

#[derive(Debug, Default)]
pub struct TryOutcome {
    pub steps: Vec<StepMetrics>,
    pub output: Vec<String>,
    pub output_total: usize,
    /// (step, reason, original event).
    pub dead_letters: Vec<(String, String, String)>,
    pub dead_letters_total: usize,
}

/// The tables a plan's join and enrich steps look up, by name.
pub fn tables_of(plan: &Plan) -> Vec<String> {
    let mut names: Vec<String> = plan
        .stages
        .iter()
        .flat_map(|s| &s.steps)
        .filter_map(|step| match step.operator.single() {
            Some(Op::Join(j)) => Some(j.table.name.clone()),
            Some(Op::Enrich(e)) => Some(e.table.name.clone()),
            _ => None,
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Runs `events` (JSON lines) through the plan, with `tables` rows (JSON lines
/// by table name).
pub async fn run(
    plan: Plan,
    events: String,
    tables: Vec<(String, String)>,
) -> Result<TryOutcome, String> {
    tokio::task::spawn_blocking(move || run_blocking(&plan, &events, &tables))
        .await
        .map_err(|e| format!("the try stopped: {e}"))?
}

fn run_blocking(
    plan: &Plan,
    events: &str,
    tables: &[(String, String)],
) -> Result<TryOutcome, String> {
    let lines: Vec<Vec<u8>> = events
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.as_bytes().to_vec())
        .collect();
    if lines.is_empty() {
        return Err("Paste some sample events first: one JSON object per line.".to_owned());
    }
    if lines.len() > MAX_EVENTS {
        return Err(format!(
            "{} sample events: a try takes at most {MAX_EVENTS}.",
            lines.len()
        ));
    }
    // Table rows are loaded the way `run --table NAME=FILE` loads them.
    let folder = TempFolder::new().map_err(|e| format!("cannot make a temporary folder: {e}"))?;
    let mut files = Vec::new();
    for (name, rows) in tables {
        let path = folder.0.join(format!("table-{}.jsonl", files.len()));
        std::fs::write(&path, rows).map_err(|e| format!("cannot write the rows of {name}: {e}"))?;
        files.push((name.clone(), path));
    }
    let loaded = load_tables(plan, &files).map_err(|e| e.to_string())?;
    let mut pipeline =
        LocalPipeline::new(plan, &loaded, Arc::new(SystemClock)).map_err(|e| e.to_string())?;
    let (mut out, mut dead) = pipeline.push_lines(lines);
    let (more_out, more_dead) = pipeline.finish();
    out.extend(more_out);
    dead.extend(more_dead);
    let mut outcome = TryOutcome {
        steps: pipeline.metrics(),
        output_total: out.len(),
        dead_letters_total: dead.len(),
        ..TryOutcome::default()
    };
    for event in out.iter().take(SHOWN) {
        let mut line = Vec::new();
        event.write_json_line(&mut line);
        outcome
            .output
            .push(String::from_utf8_lossy(&line).trim_end().to_owned());
    }
    for letter in dead.iter().take(SHOWN) {
        outcome.dead_letters.push((
            letter.step.clone(),
            letter.reason.clone(),
            String::from_utf8_lossy(&letter.original).into_owned(),
        ));
    }
    Ok(outcome)
}

/// A folder removed when dropped.
struct TempFolder(PathBuf);

impl TempFolder {
    fn new() -> std::io::Result<Self> {
        let path = std::env::temp_dir().join(format!(
            "keystone-console-try-{}",
            crate::auth::random_hex(8)
        ));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }
}

impl Drop for TempFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_plan(file: &str) -> Plan {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/samples/");
        let mut reading = keystone_crds::Reading::default();
        for f in [file, "processors.yaml"] {
            let text = std::fs::read_to_string(format!("{dir}{f}")).unwrap();
            reading.extend(keystone_crds::Reading::parse(f, &text));
        }
        reading.compile(0).expect("the sample compiles")
    }

    #[tokio::test]
    async fn a_try_reports_each_steps_counts_the_output_and_the_dead_letters() {
        let plan = sample_plan("clickstream-etl.yaml");
        let events = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/samples/data/clicks.jsonl"
        ))
        .unwrap();
        let events = format!("{events}\nnot json\n");
        let outcome = run(plan.clone(), events, Vec::new()).await.unwrap();
        assert_eq!(outcome.steps[0].name, "source");
        let steps: Vec<&str> = outcome.steps.iter().map(|s| s.name.as_str()).collect();
        for step in plan.stages.iter().flat_map(|s| &s.steps) {
            assert!(steps.contains(&step.name.as_str()), "{steps:?}");
        }
        assert!(outcome.output_total > 0);
        assert_eq!(outcome.output.len(), outcome.output_total.min(SHOWN));
        assert_eq!(outcome.dead_letters_total, 1, "the line that is not JSON");
        assert_eq!(outcome.dead_letters[0].2, "not json");
        assert_eq!(
            outcome.steps[0].events_in as usize,
            outcome.output_total
                + outcome.dead_letters_total
                + outcome
                    .steps
                    .iter()
                    .map(|s| s.dropped as usize)
                    .sum::<usize>()
        );
    }

    #[tokio::test]
    async fn a_join_needs_its_table_rows_and_uses_them() {
        let plan = sample_plan("orders-join-customers.yaml");
        let tables = tables_of(&plan);
        assert!(!tables.is_empty());
        let orders = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/samples/data/orders.jsonl"
        ))
        .unwrap();
        let customers = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/samples/data/customers.jsonl"
        ))
        .unwrap();
        let missing = run(plan.clone(), orders.clone(), Vec::new())
            .await
            .unwrap_err();
        assert!(missing.contains(&tables[0]), "{missing}");
        let outcome = run(plan, orders, vec![(tables[0].clone(), customers)])
            .await
            .unwrap();
        assert!(outcome.output_total > 0);
    }

    #[tokio::test]
    async fn empty_and_oversized_input_is_refused_with_a_reason() {
        let plan = sample_plan("clickstream-etl.yaml");
        assert!(
            run(plan.clone(), "\n".into(), Vec::new())
                .await
                .unwrap_err()
                .contains("Paste")
        );
        let many = "{}\n".repeat(MAX_EVENTS + 1);
        assert!(
            run(plan, many, Vec::new())
                .await
                .unwrap_err()
                .contains("at most")
        );
    }
}
