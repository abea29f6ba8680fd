//! The built-in operators, one module each, and how a plan step becomes one.

pub mod dedup;
pub mod filter;
pub mod join;
pub mod map;
pub mod order;
pub mod project;
pub mod rekey;

use std::collections::BTreeMap;

use keystone_crds::ops::Operator as Op;
use keystone_crds::plan::PlanStep;

use crate::error::RuntimeError;
use crate::operator::Operator;

pub use dedup::Dedup;
pub use filter::Filter;
pub use join::{Join, Table};
pub use map::MapOp;
pub use order::Order;
pub use project::Project;
pub use rekey::Rekey;

/// Builds the operator of a plan step. `tables` holds the loaded tables by name
/// (local mode); a join or enrich step whose table is absent there gets an empty
/// table that the caller fills (on Kafka, from the table topic).
pub fn build(
    step: &PlanStep,
    tables: &BTreeMap<String, Table>,
) -> Result<Box<dyn Operator>, RuntimeError> {
    let op = step
        .operator
        .single()
        .ok_or_else(|| RuntimeError::InvalidStep {
            step: step.name.clone(),
            message: "the plan step does not set exactly one operator".to_owned(),
        })?;
    let table_for = |spec: &keystone_crds::ops::TableSpec| {
        tables
            .get(&spec.name)
            .cloned()
            .unwrap_or_else(|| Table::new(spec))
    };
    let named = |e: RuntimeError| match e {
        RuntimeError::InvalidStep { message, .. } => RuntimeError::InvalidStep {
            step: step.name.clone(),
            message,
        },
        other => other,
    };
    Ok(match op {
        Op::Filter(spec) => Box::new(Filter::new(spec)?),
        Op::Map(spec) => Box::new(MapOp::new(spec)?),
        Op::Project(spec) => Box::new(Project::replacing(spec).map_err(named)?),
        Op::Extract(spec) => Box::new(Project::extending(spec).map_err(named)?),
        Op::Dedup(spec) => Box::new(Dedup::new(spec)),
        Op::Order(spec) => Box::new(Order::new(spec)),
        Op::Join(spec) => Box::new(Join::inner_or_left(spec, table_for(&spec.table))),
        Op::Enrich(spec) => Box::new(Join::left_into(spec, table_for(&spec.table))),
        Op::Rekey(_) => Box::new(Rekey),
    })
}

/// Helpers for operator unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use crate::event::{DeadLetter, Event};
    use crate::operator::{Ctx, Operator, Output};
    use crate::state::StateChange;

    pub struct TestOut {
        pub events: Vec<Event>,
        pub dead: Vec<DeadLetter>,
        pub dropped: u64,
        pub changes: Vec<StateChange>,
    }

    impl TestOut {
        pub fn json(&self) -> Vec<String> {
            self.events.iter().map(|e| canonical(&e.value)).collect()
        }
    }

    /// JSON with sorted keys, so expectations do not depend on member order.
    pub fn canonical(value: &sonic_rs::Value) -> String {
        let text = sonic_rs::to_string(value).unwrap();
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        parsed.to_string()
    }

    pub fn events(lines: &[&str]) -> Vec<Event> {
        lines
            .iter()
            .map(|l| Event::parse(l.as_bytes().to_vec()).unwrap())
            .collect()
    }

    fn collect(mut out: Output) -> TestOut {
        TestOut {
            events: out.take_events(),
            dead: out.take_dead_letters(),
            dropped: out.dropped(),
            changes: out.take_changes(),
        }
    }

    /// One batch at `now_ms`, then the timer.
    pub fn run_at(op: &mut dyn Operator, now_ms: i64, mut batch: Vec<Event>) -> TestOut {
        let ctx = Ctx { now_ms };
        let mut out = Output::new("test", true);
        op.process_batch(&mut batch, &ctx, &mut out);
        op.on_timer(&ctx, &mut out);
        collect(out)
    }

    pub fn run(op: &mut dyn Operator, batch: Vec<Event>) -> TestOut {
        run_at(op, 0, batch)
    }

    pub fn close(op: &mut dyn Operator, now_ms: i64) -> TestOut {
        let mut out = Output::new("test", true);
        op.on_close(&Ctx { now_ms }, &mut out);
        while op.holds_back() {
            op.on_close(&Ctx { now_ms }, &mut out);
        }
        collect(out)
    }

    /// Event `i` at processing time `i * 10`, one per batch, then end of input.
    /// Returns every output line (events, then `DL:` reasons, `DROP` marks) in order.
    fn feed(
        op: &mut dyn Operator,
        lines: &[&str],
        start: usize,
        log: &mut Vec<String>,
        changes: &mut Vec<StateChange>,
    ) {
        for (offset, line) in lines.iter().enumerate() {
            let now = ((start + offset) * 10) as i64;
            let out = run_at(op, now, events(&[line]));
            record(out, log, changes);
        }
    }

    fn record(out: TestOut, log: &mut Vec<String>, changes: &mut Vec<StateChange>) {
        log.extend(out.json());
        log.extend(out.dead.iter().map(|d| format!("DL: {}", d.reason)));
        log.extend((0..out.dropped).map(|_| "DROP".to_owned()));
        changes.extend(out.changes);
    }

    /// Runs `lines` uninterrupted, and again with a stop after `split` events:
    /// snapshot -> restore into a fresh instance -> continue. Also checks that the
    /// changelog recorded up to the stop restores the same state as the snapshot.
    /// Returns (uninterrupted, resumed) logs.
    pub fn run_split<O: Operator>(
        make: impl Fn() -> O,
        lines: &[&str],
        split: usize,
    ) -> (Vec<String>, Vec<String>) {
        let end = (lines.len() * 10) as i64;
        let mut whole = Vec::new();
        let mut ignored = Vec::new();
        let mut op = make();
        feed(&mut op, lines, 0, &mut whole, &mut ignored);
        record(close(&mut op, end), &mut whole, &mut ignored);

        let mut resumed = Vec::new();
        let mut changelog = Vec::new();
        let mut first = make();
        // The changelog starts from the initial state (tables preloaded).
        changelog.extend(first.snapshot());
        feed(&mut first, &lines[..split], 0, &mut resumed, &mut changelog);
        let snapshot = first.snapshot();
        drop(first);

        let mut from_changelog = make();
        from_changelog.restore(changelog).unwrap();
        assert_eq!(
            from_changelog.snapshot(),
            snapshot,
            "the changelog restores the snapshot's state"
        );

        let mut second = make();
        second.restore(snapshot).unwrap();
        feed(
            &mut second,
            &lines[split..],
            split,
            &mut resumed,
            &mut ignored,
        );
        record(close(&mut second, end), &mut resumed, &mut ignored);
        (whole, resumed)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::run_split;
    use super::*;
    use keystone_crds::ops::{ComputedField, FilterSpec, MapSpec, ProjectSpec, ProjectedField};
    use keystone_crds::schema::FieldType;

    const INPUT: [&str; 4] = [
        r#"{"id":1,"v":5}"#,
        r#"{"id":2,"v":50}"#,
        r#"{"id":3}"#,
        r#"{"id":4,"v":"x"}"#,
    ];

    fn projection() -> ProjectSpec {
        ProjectSpec {
            fields: vec![ProjectedField {
                name: "value".into(),
                from: "/v".into(),
                optional: false,
            }],
        }
    }

    /// Stateless operators: an empty snapshot, and a restart changes nothing.
    #[test]
    fn stateless_operators_restore_trivially() {
        let filter = || {
            Filter::new(&FilterSpec {
                expression: "v > 10".into(),
            })
            .unwrap()
        };
        let map = || {
            MapOp::new(&MapSpec {
                fields: vec![ComputedField {
                    name: "w".into(),
                    expression: "v * 2".into(),
                    field_type: FieldType::Integer,
                }],
            })
            .unwrap()
        };
        for split in 0..=INPUT.len() {
            let (a, b) = run_split(filter, &INPUT, split);
            assert_eq!(a, b);
            let (a, b) = run_split(map, &INPUT, split);
            assert_eq!(a, b);
            let (a, b) = run_split(|| Project::replacing(&projection()).unwrap(), &INPUT, split);
            assert_eq!(a, b);
            let (a, b) = run_split(|| Project::extending(&projection()).unwrap(), &INPUT, split);
            assert_eq!(a, b);
            let (a, b) = run_split(|| Rekey, &INPUT, split);
            assert_eq!(a, b);
        }
        assert!(filter().snapshot().is_empty() && !filter().is_stateful());
        assert!(
            filter()
                .restore(vec![crate::state::StateChange::delete(vec![1])])
                .is_err()
        );
    }
}
