//! Pure decisions of the upgrade flow: what a restore asks of each stage, and
//! whether a new version is healthy. The controller (`controller::upgrade`)
//! gathers the inputs and acts on the answers.

use std::collections::BTreeMap;

use keystone_crds::Plan;
use keystone_crds::checkpoint::{
    InputRestore, PipelineCheckpoint, Positions, ReplaySuppression, RestorePlan, StageRestore,
    StateRestore,
};
use keystone_crds::pipeline::{HealthGate, UpgradeStartPosition};
use keystone_crds::plan::TopicRole;

/// The changelog topics a stage writes its own state to (tables are read, never restored).
pub fn changelog_topics(plan: &Plan, stage: &str) -> Vec<String> {
    let changelogs: Vec<&str> = plan
        .topics
        .iter()
        .filter(|t| t.role == TopicRole::Changelog)
        .map(|t| t.name.as_str())
        .collect();
    plan.stage(stage)
        .map(|s| {
            s.steps
                .iter()
                .filter_map(|step| step.state.as_ref())
                .map(|state| state.changelog_topic.clone())
                .filter(|topic| changelogs.contains(&topic.as_str()))
                .collect()
        })
        .unwrap_or_default()
}

/// The input topics of every stage after the first: on a restore they are read
/// from their end as found once every instance has stopped, because the first
/// stage re-reads its input from the checkpoint and writes again everything
/// after it; what lies in them already came from input after the checkpoint.
pub fn downstream_inputs(plan: &Plan) -> Vec<String> {
    plan.stages
        .iter()
        .skip(1)
        .map(|s| s.input.topic.clone())
        .collect()
}

/// A restore of `plan` to `checkpoint`. `downstream_ends` holds the end offsets
/// of [`downstream_inputs`], read after the instances stopped. With `suppress`,
/// sink records the replay finds already delivered since the checkpoint are not
/// written again (a rollback: the failed version delivered some of them).
pub fn restore_from_checkpoint(
    id: &str,
    checkpoint: &PipelineCheckpoint,
    plan: &Plan,
    downstream_ends: &Positions,
    suppress: bool,
) -> Result<RestorePlan, String> {
    let mut stages = BTreeMap::new();
    for (index, stage) in plan.stages.iter().enumerate() {
        let taken = checkpoint
            .stages
            .iter()
            .find(|s| s.name == stage.name)
            .ok_or_else(|| {
                format!(
                    "checkpoint {} has no stage {} (it was taken of another plan shape)",
                    checkpoint.id, stage.name
                )
            })?;
        let input = if index == 0 {
            if taken.input_topic != stage.input.topic {
                return Err(format!(
                    "checkpoint {} read {} but the pipeline now reads {}",
                    checkpoint.id, taken.input_topic, stage.input.topic
                ));
            }
            InputRestore::Offsets(taken.source_offsets.clone())
        } else {
            let ends = downstream_ends.get(&stage.input.topic).ok_or_else(|| {
                format!(
                    "the end offsets of {} (input of stage {}) are unknown",
                    stage.input.topic, stage.name
                )
            })?;
            InputRestore::Offsets(ends.clone())
        };
        let mut state = BTreeMap::new();
        for topic in changelog_topics(plan, &stage.name) {
            let restore = match taken.changelog_positions.get(&topic) {
                Some(positions) => StateRestore::At(positions.clone()),
                // A stateful step the checkpointed version did not have starts empty.
                None => StateRestore::Empty,
            };
            state.insert(topic, restore);
        }
        stages.insert(stage.name.clone(), StageRestore { input, state });
    }
    Ok(RestorePlan {
        id: id.to_owned(),
        checkpoint: Some(checkpoint.id.clone()),
        stages,
        suppress: suppress.then(|| ReplaySuppression {
            sink_positions: checkpoint.sink_positions.clone(),
        }),
    })
}

/// A restore that drops all keyed state. Stateless upgrades read the first
/// stage's input from `start`; a state reset keeps the committed offsets.
/// Later stages skip what is in their input topics when the first stage re-reads
/// (Earliest), and otherwise go on from their committed offsets.
pub fn reset_state(id: &str, plan: &Plan, start: UpgradeStartPosition) -> RestorePlan {
    let mut stages = BTreeMap::new();
    for (index, stage) in plan.stages.iter().enumerate() {
        let input = match (index, start) {
            (_, UpgradeStartPosition::Committed) => InputRestore::Committed,
            (0, UpgradeStartPosition::Earliest) => InputRestore::Earliest,
            (_, UpgradeStartPosition::Earliest) | (_, UpgradeStartPosition::Latest) => {
                InputRestore::Latest
            }
        };
        let state = changelog_topics(plan, &stage.name)
            .into_iter()
            .map(|topic| (topic, StateRestore::Empty))
            .collect();
        stages.insert(stage.name.clone(), StageRestore { input, state });
    }
    RestorePlan {
        id: id.to_owned(),
        checkpoint: None,
        stages,
        suppress: None,
    }
}

/// The restore of a new incarnation that starts empty: every changelog emptied,
/// the first stage from the beginning of its source (as a pipeline that never
/// ran), later stages from the ends of their inputs as they are now, before
/// anything of this incarnation runs (what is there was written by the earlier
/// one and is produced again).
pub fn fresh_start(id: &str, plan: &Plan, downstream_ends: &Positions) -> RestorePlan {
    let mut restore = reset_state(id, plan, UpgradeStartPosition::Earliest);
    for stage in plan.stages.iter().skip(1) {
        if let (Some(restored), Some(ends)) = (
            restore.stages.get_mut(&stage.name),
            downstream_ends.get(&stage.input.topic),
        ) {
            restored.input = InputRestore::Offsets(ends.clone());
        }
    }
    restore
}

/// What the operator saw of a new version's instances.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HealthSample {
    /// Container restarts summed over the new version's pods.
    pub restarts: i32,
    /// Events that reached the first step of the first stage.
    pub events_in: u64,
    /// Events sent to the dead-letter topic, by any step or refused by a sink.
    pub dead_lettered: u64,
    /// Consumer lag summed over every stage's partitions.
    pub lag: i64,
    /// Stages whose rollout exceeded its progress deadline.
    pub failing_stages: Vec<String>,
    /// Instances whose intake is held because a sink cannot write (its
    /// destination unreachable, refusing the requests, or too slow).
    pub sinks_held: i64,
}

/// Fewer input events than this say nothing about a dead-letter rate.
const MIN_EVENTS_FOR_RATE: u64 = 20;

/// Why the new version is unhealthy, if it is. The lag bound applies only at
/// the end of the window (`window_done`): a version catching up is not failing.
pub fn health_verdict(
    gate: &HealthGate,
    sample: &HealthSample,
    window_done: bool,
) -> Option<String> {
    if !sample.failing_stages.is_empty() {
        return Some(format!(
            "stages {} did not become ready within their progress deadline",
            sample.failing_stages.join(", ")
        ));
    }
    if sample.restarts > gate.max_restarts {
        return Some(format!(
            "{} container restart(s) of the new version (at most {} allowed)",
            sample.restarts, gate.max_restarts
        ));
    }
    let allowed = u64::try_from(gate.max_dead_letter_percent).unwrap_or(0);
    if sample.events_in >= MIN_EVENTS_FOR_RATE
        && sample.dead_lettered * 100 > allowed * sample.events_in
    {
        return Some(format!(
            "{} of {} events ({}%) went to the dead-letter topic (at most {}% allowed)",
            sample.dead_lettered,
            sample.events_in,
            sample.dead_lettered * 100 / sample.events_in,
            allowed
        ));
    }
    if window_done && sample.sinks_held > 0 {
        return Some(format!(
            "{} instance(s) still wait for a sink at the end of the health window: it cannot write (see keystone_sink_retries_total and the pods' logs)",
            sample.sinks_held
        ));
    }
    if let Some(max_lag) = gate.max_consumer_lag
        && window_done
        && sample.lag > max_lag
    {
        return Some(format!(
            "consumer lag is {} records at the end of the health window (at most {max_lag} allowed)",
            sample.lag
        ));
    }
    None
}

/// The sum of a metric's samples in Prometheus text, optionally only those
/// whose labels contain `label` (`name="value"`).
pub fn metric_sum(text: &str, name: &str, label: Option<&str>) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(rest) => {
                    let (labels, value) = rest.split_once('}')?;
                    (labels, value)
                }
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            if label.is_some_and(|wanted| !labels.split(',').any(|l| l == wanted)) {
                return None;
            }
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use keystone_crds::checkpoint::{CheckpointTrigger, StageCheckpoint};
    use keystone_crds::{Pipeline, compile};

    fn plan(yaml: &str) -> Plan {
        let mut pipeline: Pipeline = serde_yaml_ng::from_str(yaml).unwrap();
        pipeline.metadata.namespace = Some("ns".into());
        compile(&pipeline, &[]).unwrap()
    }

    const TWO_STAGES: &str = r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: p}
spec:
  source:
    topic: in
    key: [user]
    schema:
      fields:
        - {name: user, type: string}
        - {name: id, type: string}
  steps:
    - name: by-id
      dedup: {key: [id], window: 10m}
  sinks:
    - name: out
      kafka: {topic: out, partitions: 1}
"#;

    fn checkpoint(plan: &Plan) -> PipelineCheckpoint {
        PipelineCheckpoint {
            id: "c1".into(),
            pipeline: "p".into(),
            namespace: "ns".into(),
            plan_hash: plan.hash(),
            time: "2026-11-26T10:00:00Z".into(),
            trigger: CheckpointTrigger::Upgrade,
            stages: plan
                .stages
                .iter()
                .map(|s| StageCheckpoint {
                    name: s.name.clone(),
                    input_topic: s.input.topic.clone(),
                    source_offsets: BTreeMap::from([(0, 10), (1, 20)]),
                    changelog_positions: changelog_topics(plan, &s.name)
                        .into_iter()
                        .map(|t| (t, BTreeMap::from([(0, 3), (1, 4)])))
                        .collect(),
                })
                .collect(),
            sink_positions: BTreeMap::from([("out".to_owned(), BTreeMap::from([(0, 99)]))]),
        }
    }

    #[test]
    fn a_restore_rewinds_the_first_stage_and_skips_what_later_stages_would_see_twice() {
        let plan = plan(TWO_STAGES);
        assert_eq!(plan.stages.len(), 2, "dedup by id repartitions: {plan:#?}");
        let downstream = downstream_inputs(&plan);
        let ends: Positions = downstream
            .iter()
            .map(|t| (t.clone(), BTreeMap::from([(0, 500)])))
            .collect();
        let restore =
            restore_from_checkpoint("r1", &checkpoint(&plan), &plan, &ends, true).unwrap();
        let first = &restore.stages["s0"];
        assert_eq!(
            first.input,
            InputRestore::Offsets(BTreeMap::from([(0, 10), (1, 20)]))
        );
        let second = &restore.stages["s1"];
        assert_eq!(
            second.input,
            InputRestore::Offsets(BTreeMap::from([(0, 500)]))
        );
        let changelogs = changelog_topics(&plan, "s1");
        assert_eq!(changelogs.len(), 1);
        assert_eq!(
            second.state[&changelogs[0]],
            StateRestore::At(BTreeMap::from([(0, 3), (1, 4)]))
        );
        assert_eq!(
            restore.suppress.unwrap().sink_positions["out"][&0],
            99,
            "a rollback looks for delivered records from the checkpoint's sink ends"
        );
    }

    #[test]
    fn a_restore_needs_the_checkpoint_to_know_every_stage() {
        let plan = plan(TWO_STAGES);
        let mut taken = checkpoint(&plan);
        taken.stages.pop();
        let error =
            restore_from_checkpoint("r1", &taken, &plan, &Positions::new(), false).unwrap_err();
        assert!(error.contains("no stage s1"), "{error}");
    }

    #[test]
    fn resets_drop_every_changelog_and_start_where_asked() {
        let plan = plan(TWO_STAGES);
        let reset = reset_state("r2", &plan, UpgradeStartPosition::Earliest);
        assert_eq!(reset.stages["s0"].input, InputRestore::Earliest);
        assert_eq!(reset.stages["s1"].input, InputRestore::Latest);
        assert!(
            reset.stages["s1"]
                .state
                .values()
                .all(|s| *s == StateRestore::Empty)
        );
        assert!(!reset.stages["s1"].state.is_empty());
        let kept = reset_state("r3", &plan, UpgradeStartPosition::Committed);
        assert!(
            kept.stages
                .values()
                .all(|s| s.input == InputRestore::Committed)
        );
    }

    #[test]
    fn a_fresh_start_empties_state_rereads_the_source_and_skips_what_downstream_holds() {
        let plan = plan(TWO_STAGES);
        let downstream = downstream_inputs(&plan);
        assert_eq!(downstream.len(), 1);
        let ends = Positions::from([(downstream[0].clone(), BTreeMap::from([(0, 7), (1, 9)]))]);
        let fresh = fresh_start("fresh-1", &plan, &ends);
        assert_eq!(fresh.checkpoint, None);
        assert_eq!(fresh.stages["s0"].input, InputRestore::Earliest);
        assert_eq!(
            fresh.stages["s1"].input,
            InputRestore::Offsets(BTreeMap::from([(0, 7), (1, 9)]))
        );
        for stage in fresh.stages.values() {
            assert!(stage.state.values().all(|s| *s == StateRestore::Empty));
        }
        assert!(!fresh.stages["s1"].state.is_empty());
    }

    #[test]
    fn health_fails_on_restarts_dead_letters_and_final_lag() {
        let gate = HealthGate {
            max_restarts: 1,
            max_dead_letter_percent: 10,
            max_consumer_lag: Some(100),
        };
        let healthy = HealthSample {
            restarts: 1,
            events_in: 1000,
            dead_lettered: 100,
            lag: 5000,
            failing_stages: vec![],
            sinks_held: 0,
        };
        assert_eq!(health_verdict(&gate, &healthy, false), None);
        let lagging = health_verdict(&gate, &healthy, true).unwrap();
        assert!(lagging.contains("consumer lag is 5000"), "{lagging}");
        let crashing = HealthSample {
            restarts: 2,
            ..healthy.clone()
        };
        assert!(
            health_verdict(&gate, &crashing, false)
                .unwrap()
                .contains("2 container restart")
        );
        let held = HealthSample {
            sinks_held: 1,
            lag: 0,
            ..healthy.clone()
        };
        assert_eq!(
            health_verdict(&gate, &held, false),
            None,
            "a sink may catch up"
        );
        assert!(
            health_verdict(&gate, &held, true)
                .unwrap()
                .contains("wait for a sink")
        );
        let dead = HealthSample {
            dead_lettered: 101,
            lag: 0,
            ..healthy.clone()
        };
        let why = health_verdict(&gate, &dead, false).unwrap();
        assert!(why.contains("101 of 1000 events (10%)"), "{why}");
        let few = HealthSample {
            events_in: 5,
            dead_lettered: 5,
            lag: 0,
            ..healthy
        };
        assert_eq!(
            health_verdict(&gate, &few, true),
            None,
            "too few events to judge a rate"
        );
    }

    #[test]
    fn metric_sums_read_prometheus_text() {
        let text = "# HELP keystone_step_events_in_total x\n\
            keystone_step_events_in_total{pipeline=\"p\",step=\"a\"} 7\n\
            keystone_step_events_in_total{pipeline=\"p\",step=\"b\"} 5\n\
            keystone_step_events_in_total_other 100\n\
            keystone_consumer_lag{partition=\"0\"} 3\n\
            keystone_consumer_lag{partition=\"1\"} 4\n";
        assert_eq!(
            metric_sum(text, "keystone_step_events_in_total", None),
            12.0
        );
        assert_eq!(
            metric_sum(text, "keystone_step_events_in_total", Some("step=\"a\"")),
            7.0
        );
        assert_eq!(metric_sum(text, "keystone_consumer_lag", None), 7.0);
        assert_eq!(metric_sum(text, "keystone_missing", None), 0.0);
    }
}
