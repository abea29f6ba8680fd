//! How a change of a running pipeline must be rolled out, decided from the
//! compiled plans before and after (the Flink operator's `DiffType`, on plans
//! rather than raw specs so that a change that compiles to the same plan is
//! recognized as such).

use std::collections::BTreeMap;

use crate::ops::Operator;
use crate::plan::{Plan, PlanStep};

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
}

/// Classifies the change from `old` to `new`.
pub fn classify(old: &Plan, new: &Plan) -> ChangeClass {
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
}
