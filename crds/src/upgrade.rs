//! How a change of a running pipeline must be rolled out, decided from the
//! compiled plans before and after (the Flink operator's `DiffType`, on plans
//! rather than raw specs so that a change that compiles to the same plan is
//! recognized as such).

use std::collections::BTreeMap;

use crate::ops::Operator;
use crate::plan::{Plan, PlanStep};
use crate::schema::FieldType;

/// The kind of change, from the least to the most disruptive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeClass {
    /// Nothing the runtime sees changed (the checkpoint interval, say).
    Ignore,
    /// Only stage parallelism changed: instances are added or removed and
    /// partitions rebalance; state moves with them through the changelogs.
    Scale { stages: Vec<String> },
    /// The logic changed in ways the existing state still fits: the new version
    /// resumes from the old state and offsets.
    Upgrade { reasons: Vec<String> },
    /// The existing state cannot serve the new version. Rolling it out means
    /// dropping that state, which only an explicit `allowStateReset` permits.
    StateIncompatible { reasons: Vec<String> },
    /// A lake sink's table (or Parquet tree) cannot hold what the new version
    /// writes: a column removed while required, retyped, made optional, or a
    /// new required one. Only a new optional column is added in place; the
    /// rest needs a new table or path, so the change is not rolled out.
    TableIncompatible { reasons: Vec<String> },
}

/// Classifies the change from `old` to `new`.
pub fn classify(old: &Plan, new: &Plan) -> ChangeClass {
    let tables = table_incompatibilities(old, new);
    if !tables.is_empty() {
        return ChangeClass::TableIncompatible { reasons: tables };
    }
    let incompatible = state_incompatibilities(old, new);
    if !incompatible.is_empty() {
        return ChangeClass::StateIncompatible {
            reasons: incompatible,
        };
    }
    let mut upgrade = Vec::new();
    if old.source.topic != new.source.topic || old.source.cluster != new.source.cluster {
        upgrade.push(format!(
            "the source topic changed from {} to {}",
            old.source.topic, new.source.topic
        ));
    }
    if old.delivery != new.delivery {
        upgrade.push(format!(
            "delivery changed from {:?} to {:?}",
            old.delivery, new.delivery
        ));
    }
    if old.commit_interval_ms != new.commit_interval_ms {
        upgrade.push("the commit interval changed".to_owned());
    }
    if old.dead_letter_topic != new.dead_letter_topic {
        upgrade.push("the dead-letter topic changed".to_owned());
    }
    if old.sinks != new.sinks {
        upgrade.push("the sinks changed".to_owned());
    }
    if old.source.schema != new.source.schema {
        upgrade.push("the source schema changed".to_owned());
    }
    let inputs = |plan: &Plan| -> Vec<String> {
        plan.stages.iter().map(|s| s.input.topic.clone()).collect()
    };
    if inputs(old) != inputs(new) {
        upgrade.push("the stages changed (repartition topics)".to_owned());
    }
    let old_steps = steps_by_name(old);
    for (name, step) in steps_by_name(new) {
        match old_steps.get(name) {
            Some(before)
                if before.operator != step.operator || before.requires != step.requires =>
            {
                upgrade.push(format!("step {name:?} changed"));
            }
            None => upgrade.push(format!("step {name:?} was added")),
            _ => {}
        }
    }
    for name in old_steps.keys() {
        if !new
            .stages
            .iter()
            .flat_map(|s| &s.steps)
            .any(|s| &s.name == name)
        {
            upgrade.push(format!("step {name:?} was removed"));
        }
    }
    if !upgrade.is_empty() {
        return ChangeClass::Upgrade { reasons: upgrade };
    }
    let scaled: Vec<String> = old
        .stages
        .iter()
        .zip(&new.stages)
        .filter(|(a, b)| a.parallelism != b.parallelism)
        .map(|(_, b)| b.name.clone())
        .collect();
    if !scaled.is_empty() {
        return ChangeClass::Scale { stages: scaled };
    }
    ChangeClass::Ignore
}

/// Why the tables of lake sinks that stay (same name, same table or path)
/// cannot hold the new version's output, if they cannot.
fn table_incompatibilities(old: &Plan, new: &Plan) -> Vec<String> {
    let mut reasons = Vec::new();
    for before in &old.sinks {
        let Some(after) = new.sinks.iter().find(|s| s.name == before.name) else {
            continue;
        };
        let Some(table) = lake_destination(&before.spec) else {
            continue;
        };
        if lake_destination(&after.spec).as_ref() != Some(&table) {
            continue;
        }
        let fields = |schema: &crate::schema::SchemaSpec| -> BTreeMap<String, (FieldType, bool)> {
            schema
                .fields
                .iter()
                .map(|f| (f.name.clone(), (f.field_type, f.optional)))
                .collect()
        };
        let (was, now) = (fields(&before.schema), fields(&after.schema));
        let sink = &before.name;
        for (name, (old_type, old_optional)) in &was {
            match now.get(name) {
                None if !old_optional => reasons.push(format!(
                    "sink {sink:?} writes {table}, whose column {name} is required, but the new output has no field {name}"
                )),
                Some((new_type, _)) if new_type != old_type => reasons.push(format!(
                    "sink {sink:?} writes {table}, whose column {name} holds {old_type}, but the new output's {name} is {new_type}"
                )),
                Some((_, true)) if !old_optional => reasons.push(format!(
                    "sink {sink:?} writes {table}, whose column {name} is required, but the new output's {name} is optional"
                )),
                _ => {}
            }
        }
        for (name, (_, optional)) in &now {
            if !was.contains_key(name) && !optional {
                reasons.push(format!(
                    "sink {sink:?} writes {table}, which has no column {name}: a new column can only be added as optional (the rows already there have no value)"
                ));
            }
        }
    }
    reasons
}

/// The table or tree a lake sink writes, for messages and to tell whether two
/// versions of a sink write the same one.
fn lake_destination(sink: &crate::pipeline::SinkSpec) -> Option<String> {
    if let Some(iceberg) = &sink.iceberg {
        return Some(format!(
            "table {}.{} of {}",
            iceberg.namespace, iceberg.table, iceberg.catalog.uri
        ));
    }
    sink.parquet
        .as_ref()
        .map(|p| format!("Parquet tree {}", p.path))
}

fn steps_by_name(plan: &Plan) -> BTreeMap<&str, &PlanStep> {
    plan.stages
        .iter()
        .flat_map(|s| &s.steps)
        .map(|s| (s.name.as_str(), s))
        .collect()
}

/// Why the old plan's state cannot serve the new plan, if it cannot.
fn state_incompatibilities(old: &Plan, new: &Plan) -> Vec<String> {
    let mut reasons = Vec::new();
    let new_steps = steps_by_name(new);
    let stateful = |plan: &Plan| -> Vec<String> {
        plan.stages
            .iter()
            .flat_map(|s| &s.steps)
            .filter(|s| s.state.is_some() && !is_table(s))
            .map(|s| s.name.clone())
            .collect()
    };
    for name in stateful(old) {
        let before = steps_by_name(old)[name.as_str()];
        let Some(after) = new_steps.get(name.as_str()) else {
            reasons.push(format!(
                "stateful step {name:?} was removed: its state would be dropped"
            ));
            continue;
        };
        let (Some(old_op), Some(new_op)) = (before.operator.single(), after.operator.single())
        else {
            continue;
        };
        if old_op.kind() != new_op.kind() {
            reasons.push(format!(
                "step {name:?} changed from {} to {}: the {} state cannot be read as {} state",
                old_op.kind(),
                new_op.kind(),
                old_op.kind(),
                new_op.kind()
            ));
            continue;
        }
        let (old_state, new_state) = (before.state.as_ref(), after.state.as_ref());
        if old_state.map(|s| &s.key) != new_state.map(|s| &s.key) {
            reasons.push(format!(
                "step {name:?} keys its state by [{}] instead of [{}]: existing entries would be looked up under the wrong keys",
                new_state.map(|s| s.key.join(", ")).unwrap_or_default(),
                old_state.map(|s| s.key.join(", ")).unwrap_or_default()
            ));
        }
        if old_state.map(|s| &s.changelog_topic) != new_state.map(|s| &s.changelog_topic) {
            reasons.push(format!("step {name:?} moved to another changelog topic"));
        }
        if let (Operator::Order(a), Operator::Order(b)) = (old_op, new_op)
            && a.sequence != b.sequence
        {
            reasons.push(format!(
                "step {name:?} orders by {:?} instead of {:?}: the last emitted sequences mean something else",
                b.sequence, a.sequence
            ));
        }
        if let (Operator::Dedup(a), Operator::Dedup(b)) = (old_op, new_op)
            && a.event_time_field != b.event_time_field
        {
            reasons.push(format!(
                "step {name:?} measures its window on another clock: remembered times would be compared with the wrong one"
            ));
        }
    }
    // Stateful steps that stay must keep their relative order: each one's state
    // holds what the steps before it let through.
    let old_order = stateful(old);
    let kept_old: Vec<&String> = old_order
        .iter()
        .filter(|n| new_steps.contains_key(n.as_str()))
        .collect();
    let new_order = stateful(new);
    let kept_new: Vec<&String> = new_order.iter().filter(|n| kept_old.contains(n)).collect();
    if kept_old != kept_new {
        reasons.push(format!(
            "stateful steps were reordered ({} before, {} now)",
            kept_old
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            kept_new
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if old.source.topic != new.source.topic && !stateful(old).is_empty() {
        reasons.push(format!(
            "the source topic changed from {} to {}: state and offsets belong to the old topic",
            old.source.topic, new.source.topic
        ));
    }
    reasons
}

/// A join or enrich table is rebuilt from its own topic, so it is never state
/// a change can lose.
fn is_table(step: &PlanStep) -> bool {
    matches!(
        step.operator.single(),
        Some(Operator::Join(_) | Operator::Enrich(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{compile, parse_manifests};

    fn plan(steps: &str, extra: &str) -> Plan {
        let text = format!(
            r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: p, namespace: ns}}
spec:
  source:
    topic: in
    key: [id]
    schema:
      fields:
        - {{name: id, type: string}}
        - {{name: event_id, type: string}}
        - {{name: seq, type: integer}}
        - {{name: version, type: integer}}
        - {{name: amount, type: number}}
  steps:
{steps}  sinks:
    - name: out
      kafka: {{topic: out}}
{extra}"#
        );
        let manifests = parse_manifests("p.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
        compile(&manifests.pipelines[0], &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    const BASE: &str = "    - name: dedup\n      dedup: {key: [id, event_id], window: 10m}\n    - name: order\n      order: {key: [id], sequence: seq, maxDelay: 5s}\n    - name: big\n      filter: {expression: 'amount > 10.0'}\n";

    #[test]
    fn the_same_plan_is_ignored_and_operator_only_settings_too() {
        assert_eq!(
            classify(&plan(BASE, ""), &plan(BASE, "")),
            ChangeClass::Ignore
        );
        assert_eq!(
            classify(&plan(BASE, ""), &plan(BASE, "  checkpointInterval: 1m\n")),
            ChangeClass::Ignore
        );
    }

    #[test]
    fn parallelism_alone_is_a_scale() {
        assert_eq!(
            classify(&plan(BASE, ""), &plan(BASE, "  parallelism: 4\n")),
            ChangeClass::Scale {
                stages: vec!["s0".into()]
            }
        );
    }

    #[test]
    fn stateless_logic_and_window_changes_are_upgrades() {
        let new = BASE
            .replace("amount > 10.0", "amount > 20.0")
            .replace("window: 10m", "window: 1h");
        assert_eq!(
            classify(&plan(BASE, ""), &plan(&new, "")),
            ChangeClass::Upgrade {
                reasons: vec![
                    "step \"big\" changed".into(),
                    "step \"dedup\" changed".into()
                ]
            }
        );
    }

    #[test]
    fn a_new_dedup_key_is_state_incompatible() {
        let new = BASE.replace("key: [id, event_id]", "key: [id, seq]");
        assert_eq!(
            classify(&plan(BASE, ""), &plan(&new, "")),
            ChangeClass::StateIncompatible {
                reasons: vec![
                    "step \"dedup\" keys its state by [id, seq] instead of [id, event_id]: existing entries would be looked up under the wrong keys".into()
                ]
            }
        );
    }

    #[test]
    fn removing_replacing_or_reordering_stateful_steps_is_state_incompatible() {
        let removed = BASE.replace(
            "    - name: dedup\n      dedup: {key: [id, event_id], window: 10m}\n",
            "",
        );
        assert!(matches!(
            classify(&plan(BASE, ""), &plan(&removed, "")),
            ChangeClass::StateIncompatible { reasons } if reasons == ["stateful step \"dedup\" was removed: its state would be dropped"]
        ));
        let replaced = BASE.replace(
            "order: {key: [id], sequence: seq, maxDelay: 5s}",
            "dedup: {key: [id], window: 5s}",
        );
        assert!(matches!(
            classify(&plan(BASE, ""), &plan(&replaced, "")),
            ChangeClass::StateIncompatible { reasons } if reasons[0].starts_with("step \"order\" changed from order to dedup")
        ));
        let reordered = "    - name: order\n      order: {key: [id], sequence: seq, maxDelay: 5s}\n    - name: dedup\n      dedup: {key: [id, event_id], window: 10m}\n";
        assert!(matches!(
            classify(&plan(BASE, ""), &plan(reordered, "")),
            ChangeClass::StateIncompatible { reasons } if reasons == ["stateful steps were reordered (dedup, order before, order, dedup now)"]
        ));
        let resequenced = BASE.replace("sequence: seq", "sequence: version");
        assert!(matches!(
            classify(&plan(BASE, ""), &plan(&resequenced, "")),
            ChangeClass::StateIncompatible { reasons } if reasons[0].contains("orders by \"version\" instead of \"seq\"")
        ));
    }

    #[test]
    fn adding_a_stateful_step_is_an_upgrade() {
        let added = format!("{BASE}    - name: again\n      dedup: {{key: [id], window: 1m}}\n");
        assert_eq!(
            classify(&plan(BASE, ""), &plan(&added, "")),
            ChangeClass::Upgrade {
                reasons: vec!["step \"again\" was added".into()]
            }
        );
    }

    fn lake_plan(fields: &str, path: &str) -> Plan {
        let text = format!(
            r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: p, namespace: ns}}
spec:
  source:
    topic: in
    key: [id]
    schema:
      fields:
        - {{name: id, type: string}}
{fields}  sinks:
    - name: lake
      parquet: {{path: '{path}'}}
"#
        );
        let manifests = parse_manifests("p.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
        compile(&manifests.pipelines[0], &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_lake_table_takes_new_optional_columns_and_refuses_other_changes() {
        let base = "        - {name: amount, type: number}\n        - {name: note, type: string, optional: true}\n";
        let old = lake_plan(base, "s3://lake/t");
        let added = format!("{base}        - {{name: tag, type: string, optional: true}}\n");
        assert!(matches!(
            classify(&old, &lake_plan(&added, "s3://lake/t")),
            ChangeClass::Upgrade { .. }
        ));
        let cases = [
            (
                format!("{base}        - {{name: tag, type: string}}\n"),
                "sink \"lake\" writes Parquet tree s3://lake/t, which has no column tag: a new column can only be added as optional (the rows already there have no value)",
            ),
            (
                base.replace("amount, type: number", "amount, type: integer"),
                "sink \"lake\" writes Parquet tree s3://lake/t, whose column amount holds number, but the new output's amount is integer",
            ),
            (
                base.replace(
                    "{name: amount, type: number}",
                    "{name: amount, type: number, optional: true}",
                ),
                "sink \"lake\" writes Parquet tree s3://lake/t, whose column amount is required, but the new output's amount is optional",
            ),
            (
                base.replace("        - {name: amount, type: number}\n", ""),
                "sink \"lake\" writes Parquet tree s3://lake/t, whose column amount is required, but the new output has no field amount",
            ),
        ];
        for (fields, reason) in cases {
            assert_eq!(
                classify(&old, &lake_plan(&fields, "s3://lake/t")),
                ChangeClass::TableIncompatible {
                    reasons: vec![reason.to_owned()]
                },
                "{fields}"
            );
        }
        // Dropping an optional column is fine; a new path is a new tree.
        let dropped = base.replace("        - {name: note, type: string, optional: true}\n", "");
        assert!(matches!(
            classify(&old, &lake_plan(&dropped, "s3://lake/t")),
            ChangeClass::Upgrade { .. }
        ));
        let retyped = base.replace("amount, type: number", "amount, type: integer");
        assert!(matches!(
            classify(&old, &lake_plan(&retyped, "s3://lake/t2")),
            ChangeClass::Upgrade { .. }
        ));
    }
}
