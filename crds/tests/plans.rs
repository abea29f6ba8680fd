//! How the compiler cuts stages and names topics.

use keystone_crds::plan::{Partitions, StageOutput, TopicRole};
use keystone_crds::{Plan, compile, parse_manifests};

fn plan(steps: &str, extra_spec: &str) -> Plan {
    let text = format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: p, namespace: ns}}
spec:
  source:
    topic: in
    key: [a]
    schema:
      fields:
        - {{name: a, type: string}}
        - {{name: b, type: string}}
        - {{name: seq, type: integer}}
  steps:
{steps}  sinks:
    - name: out
      kafka: {{topic: out}}
{extra_spec}"#
    );
    let manifests = parse_manifests("p.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    compile(&manifests.pipelines[0], &[]).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn stateless_steps_fuse_into_one_stage() {
    let plan = plan(
        "    - name: f\n      filter: {expression: 'b != \"\"'}\n    - name: m\n      map: {fields: [{name: c, expression: 'b + a', type: string}]}\n",
        "",
    );
    assert_eq!(plan.stages.len(), 1);
    assert_eq!(plan.stages[0].steps.len(), 2);
    assert_eq!(plan.stages[0].consumer_group, "keystone.ns.p.s0");
    assert_eq!(plan.stages[0].output, StageOutput::Sinks);
}

#[test]
fn state_keyed_by_a_superset_of_the_partitioning_needs_no_repartition() {
    let plan = plan(
        "    - name: d\n      dedup: {key: [b, a], window: 1m}\n",
        "",
    );
    assert_eq!(plan.stages.len(), 1);
}

#[test]
fn rekey_then_state_repartitions_and_records_the_new_partitioning() {
    let plan = plan(
        "    - name: r\n      rekey: {key: [b]}\n    - name: d\n      dedup: {key: [b], window: 1m}\n",
        "",
    );
    assert_eq!(plan.stages.len(), 2);
    assert_eq!(
        plan.stages[0].output,
        StageOutput::Repartition {
            topic: "keystone.ns.p.repartition.d".into(),
            key: vec!["b".into()]
        }
    );
    assert_eq!(plan.stages[1].input.partitioned_by, ["b"]);
    let changelog = plan
        .topics
        .iter()
        .find(|t| t.role == TopicRole::Changelog)
        .unwrap();
    assert_eq!(changelog.name, "keystone.ns.p.changelog.d");
    assert_eq!(
        changelog.config.get("cleanup.policy").map(String::as_str),
        Some("compact")
    );
    assert_eq!(
        changelog.partitions,
        Some(Partitions::SameAs("keystone.ns.p.repartition.d".into())),
        "a changelog has one partition per partition of its stage's input"
    );
}

#[test]
fn a_step_with_its_own_parallelism_runs_in_its_own_stage() {
    let plan = plan(
        "    - name: f\n      filter: {expression: 'true'}\n    - name: heavy\n      parallelism: 4\n      map: {fields: [{name: c, expression: 'b', type: string}]}\n    - name: g\n      filter: {expression: 'true'}\n",
        "  parallelism: 2\n",
    );
    let shape: Vec<(i32, Vec<&str>)> = plan
        .stages
        .iter()
        .map(|s| {
            (
                s.parallelism,
                s.steps.iter().map(|st| st.name.as_str()).collect(),
            )
        })
        .collect();
    assert_eq!(shape, [(2, vec!["f"]), (4, vec!["heavy"]), (2, vec!["g"])]);
}

#[test]
fn a_first_step_with_its_own_parallelism_sets_the_first_stage() {
    let plan = plan(
        "    - name: f\n      parallelism: 3\n      filter: {expression: 'true'}\n",
        "",
    );
    assert_eq!(plan.stages.len(), 1);
    assert_eq!(plan.stages[0].parallelism, 3);
}

#[test]
fn order_then_sink_with_preserve_order_is_valid_after_repartition() {
    // dedup by [seq-less key b] loses the order per a; the order step restores it per a.
    let text = r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: p}
spec:
  source:
    topic: in
    key: [a]
    schema: {fields: [{name: a, type: string}, {name: b, type: string}, {name: seq, type: integer}]}
  steps:
    - name: d
      dedup: {key: [b], window: 1m}
    - name: o
      order: {key: [a], sequence: seq, maxDelay: 1s}
  sinks:
    - name: out
      kafka: {topic: out, key: [a], preserveOrder: true}
"#;
    let manifests = parse_manifests("p.yaml", text).unwrap();
    let plan = compile(&manifests.pipelines[0], &[]).unwrap();
    assert_eq!(plan.namespace, "default");
    assert_eq!(plan.stages.len(), 3, "{}", plan.describe());
    assert_eq!(plan.sinks[0].key, ["a"]);
}

#[test]
fn dead_letter_topic_and_retention() {
    let plan = plan(
        "    - name: f\n      filter: {expression: 'true'}\n",
        "  deadLetter: {retention: 7d}\n",
    );
    assert_eq!(plan.dead_letter_topic, "keystone.ns.p.dlq");
    let dlq = plan
        .topics
        .iter()
        .find(|t| t.role == TopicRole::DeadLetter)
        .unwrap();
    assert_eq!(
        dlq.config.get("retention.ms").map(String::as_str),
        Some("604800000")
    );
    assert!(dlq.create);
}
