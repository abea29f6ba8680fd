use super::*;
use keystone_crds::pipeline::PipelinePhase;

use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(secs).expect("valid")
}

fn pipeline(extra_spec: &str) -> Pipeline {
    let mut pipeline: Pipeline = serde_yaml_ng::from_str(&format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: p, namespace: n, uid: u-1}}
spec:
  source: {{topic: in, key: [a], schema: {{fields: [{{name: a, type: string}}, {{name: b, type: string}}]}}}}
  steps:
    - {{name: once, dedup: {{key: [b], window: 1m}}}}
  parallelism: 2
  sinks:
    - {{name: out, kafka: {{topic: out}}}}
{extra_spec}
"#
    ))
    .expect("pipeline");
    pipeline.status = Some(PipelineStatus::default());
    pipeline
}

fn plan(pipeline: &Pipeline) -> Plan {
    keystone_crds::compile(pipeline, &[]).expect("valid")
}

fn set_running_since(pipeline: &mut Pipeline, secs: i64) {
    let status = pipeline.status.get_or_insert_with(Default::default);
    status.phase = Some(PipelinePhase::Running);
    status.conditions = vec![Condition {
        type_: "Ready".into(),
        status: "True".into(),
        reason: "Running".into(),
        message: String::new(),
        last_transition_time: Time(t(secs)),
        observed_generation: None,
    }];
}

fn done(id: &str, secs: i64) -> CheckpointSummary {
    summary(
        id.into(),
        t(secs),
        CheckpointTrigger::Periodic,
        "h".into(),
        None,
    )
}

#[test]
fn ids_are_short_dns_safe_and_sort_in_time() {
    let a = checkpoint_id(Timestamp::from_millisecond(1_767_225_600_007).expect("valid"));
    let b = checkpoint_id(Timestamp::from_millisecond(1_767_225_600_120).expect("valid"));
    let c = checkpoint_id(Timestamp::from_millisecond(1_767_225_661_000).expect("valid"));
    assert_eq!(a, "20260101-000000-007");
    assert!(a < b && b < c, "{a} {b} {c}");
    assert!(a.chars().all(|ch| ch.is_ascii_digit() || ch == '-'));
    assert_eq!(
        checkpoint_config_map_name("p", &a),
        "p-checkpoint-20260101-000000-007"
    );
}

#[test]
fn nothing_is_due_unless_running() {
    let mut p = pipeline("  checkpointTrigger: one");
    assert_eq!(checkpoint_due(&p, t(10_000)), None);
    p.status.as_mut().expect("status").phase = Some(PipelinePhase::Degraded);
    assert_eq!(checkpoint_due(&p, t(10_000)), None);
    set_running_since(&mut p, 0);
    assert_eq!(
        checkpoint_due(&p, t(10_000)),
        Some(CheckpointTrigger::Manual)
    );
}

#[test]
fn a_new_trigger_value_asks_once() {
    let mut p = pipeline("  checkpointTrigger: one");
    set_running_since(&mut p, 1000);
    assert_eq!(checkpoint_due(&p, t(1001)), Some(CheckpointTrigger::Manual));
    assert_eq!(next_checkpoint_in(&p, t(1001)), Duration::ZERO);
    // Handled (whether it succeeded or failed): not again for the same value.
    p.status.as_mut().expect("status").last_checkpoint_trigger = Some("one".into());
    assert_eq!(checkpoint_due(&p, t(1001)), None);
    p.spec.checkpoint_trigger = Some("two".into());
    assert_eq!(checkpoint_due(&p, t(1001)), Some(CheckpointTrigger::Manual));
}

#[test]
fn periodic_checkpoints_follow_the_last_success() {
    let mut p = pipeline("  checkpointInterval: 5m");
    set_running_since(&mut p, 1000);
    // The first one an interval after the pipeline became ready.
    assert_eq!(checkpoint_due(&p, t(1299)), None);
    assert_eq!(next_checkpoint_in(&p, t(1299)), Duration::from_secs(1));
    assert_eq!(
        checkpoint_due(&p, t(1300)),
        Some(CheckpointTrigger::Periodic)
    );
    let status = p.status.as_mut().expect("status");
    status.last_checkpoint = Some(Box::new(done("x", 1300)));
    assert_eq!(checkpoint_due(&p, t(1500)), None);
    assert_eq!(next_checkpoint_in(&p, t(1500)), Duration::from_secs(100));
    assert_eq!(
        checkpoint_due(&p, t(1600)),
        Some(CheckpointTrigger::Periodic)
    );
}

#[test]
fn after_a_failure_the_retry_waits_the_shorter_of_interval_and_30s() {
    let mut p = pipeline("  checkpointInterval: 5m");
    set_running_since(&mut p, 0);
    let status = p.status.as_mut().expect("status");
    status.last_checkpoint = Some(Box::new(done("x", 1000)));
    let mut failed = done("y", 1300);
    failed.reason = Some("stage s1: pod p-s1-a is not Ready".into());
    status.last_failed_checkpoint = Some(Box::new(failed));
    assert_eq!(checkpoint_due(&p, t(1310)), None);
    assert_eq!(next_checkpoint_in(&p, t(1310)), Duration::from_secs(20));
    assert_eq!(
        checkpoint_due(&p, t(1330)),
        Some(CheckpointTrigger::Periodic)
    );
    // With a 10 s interval the retry comes after 10 s, not 30.
    p.spec.checkpoint_interval = "10s".parse().expect("duration");
    p.status.as_mut().expect("status").last_failed_checkpoint = Some(Box::new(done("z", 1400)));
    assert_eq!(next_checkpoint_in(&p, t(1405)), Duration::from_secs(5));
    // An older failure does not hold back the next periodic one.
    p.status.as_mut().expect("status").last_checkpoint = Some(Box::new(done("w", 1500)));
    assert_eq!(next_checkpoint_in(&p, t(1505)), Duration::from_secs(5));
}

#[test]
fn retention_keeps_the_newest_and_the_pinned() {
    let all: Vec<CheckpointSummary> = ["a1", "a2", "a3", "a4", "a5"]
        .iter()
        .enumerate()
        .map(|(i, id)| done(id, i as i64))
        .collect();
    let (kept, pruned) = retain(&all, 2, &[]);
    assert_eq!(ids(&kept), ["a4", "a5"]);
    assert_eq!(ids(&pruned), ["a1", "a2", "a3"]);
    let (kept, pruned) = retain(&all, 2, &["a2".to_owned()]);
    assert_eq!(ids(&kept), ["a2", "a4", "a5"]);
    assert_eq!(ids(&pruned), ["a1", "a3"]);
    // Out of order in, oldest first out.
    let shuffled = vec![all[4].clone(), all[0].clone(), all[2].clone()];
    let (kept, pruned) = retain(&shuffled, 5, &[]);
    assert_eq!(ids(&kept), ["a1", "a3", "a5"]);
    assert!(pruned.is_empty());
}

fn ids(list: &[CheckpointSummary]) -> Vec<&str> {
    list.iter().map(|c| c.id.as_str()).collect()
}

fn answer(stage: &PlanStage, pod: &str, offsets: &[(i32, i64)]) -> InstanceCheckpoint {
    InstanceCheckpoint {
        pipeline: "p".into(),
        stage: stage.name.clone(),
        instance: pod.into(),
        plan_hash: "h1".into(),
        input_topic: stage.input.topic.clone(),
        source_offsets: offsets.iter().copied().collect(),
        changelog_positions: Positions::from([(
            "cl".to_owned(),
            offsets.iter().map(|(p, o)| (*p, o * 10)).collect(),
        )]),
        stopped: false,
    }
}

#[test]
fn a_stage_merges_when_every_partition_is_reported_once() {
    let plan = plan(&pipeline(""));
    let stage = &plan.stages[0];
    let merged = merge_stage(
        stage,
        3,
        "h1",
        false,
        vec![
            ("a".into(), Ok(answer(stage, "a", &[(0, 5), (2, 7)]))),
            ("b".into(), Ok(answer(stage, "b", &[(1, 6)]))),
        ],
    )
    .expect("merged");
    assert_eq!(
        merged.source_offsets,
        BTreeMap::from([(0, 5), (1, 6), (2, 7)])
    );
    assert_eq!(
        merged.changelog_positions["cl"],
        BTreeMap::from([(0, 50), (1, 60), (2, 70)])
    );
    assert_eq!(merged.input_topic, "in");
}

#[test]
fn a_rebalance_shows_as_a_missing_or_doubly_reported_partition() {
    let plan = plan(&pipeline(""));
    let stage = &plan.stages[0];
    let missing = merge_stage(
        stage,
        3,
        "h1",
        false,
        vec![
            ("a".into(), Ok(answer(stage, "a", &[(0, 5)]))),
            ("b".into(), Ok(answer(stage, "b", &[(1, 6)]))),
        ],
    )
    .expect_err("partition 2 is missing");
    assert!(
        missing.contains("partition(s) 2 of \"in\"") && missing.contains("stage s0"),
        "{missing}"
    );
    let twice = merge_stage(
        stage,
        2,
        "h1",
        false,
        vec![
            ("a".into(), Ok(answer(stage, "a", &[(0, 5), (1, 6)]))),
            ("b".into(), Ok(answer(stage, "b", &[(1, 6)]))),
        ],
    )
    .expect_err("partition 1 twice");
    assert!(
        twice.contains("partition 1 of \"in\" is reported by both a and b"),
        "{twice}"
    );
    let beyond = merge_stage(
        stage,
        1,
        "h1",
        false,
        vec![("a".into(), Ok(answer(stage, "a", &[(0, 5), (1, 6)])))],
    )
    .expect_err("partition 1 does not exist");
    assert!(beyond.contains("which has 1 partition(s)"), "{beyond}");
}

#[test]
fn every_instance_must_answer_on_the_same_plan() {
    let plan = plan(&pipeline(""));
    let stage = &plan.stages[0];
    let silent = merge_stage(
        stage,
        1,
        "h1",
        false,
        vec![
            ("a".into(), Ok(answer(stage, "a", &[(0, 5)]))),
            (
                "b".into(),
                Err("POST http://127.0.0.9:8080/checkpoint: refused".into()),
            ),
        ],
    )
    .expect_err("b did not answer");
    assert!(silent.starts_with("stage s0: pod b: POST"), "{silent}");
    let mut other = answer(stage, "a", &[(0, 5)]);
    other.plan_hash = "h0".into();
    let stale = merge_stage(stage, 1, "h1", false, vec![("a".into(), Ok(other))])
        .expect_err("another plan");
    assert!(
        stale.contains("runs plan h0, not the current plan h1"),
        "{stale}"
    );
    let running = merge_stage(
        stage,
        1,
        "h1",
        true,
        vec![("a".into(), Ok(answer(stage, "a", &[(0, 5)])))],
    )
    .expect_err("asked to stop, did not");
    assert!(running.contains("did not stop"), "{running}");
}

#[test]
fn the_older_runtime_answer_parses_without_instance_hash_or_stopped() {
    let plan = plan(&pipeline(""));
    let stage = &plan.stages[0];
    let old = r#"{"pipeline":"p","stage":"s0","inputTopic":"in","sourceOffsets":{"0":5},"changelogPositions":{}}"#;
    let parsed: InstanceCheckpoint = serde_json::from_str(old).expect("old shape");
    assert!(parsed.plan_hash.is_empty() && !parsed.stopped);
    let merged = merge_stage(stage, 1, "h1", false, vec![("a".into(), Ok(parsed))])
        .expect("no hash to compare");
    assert_eq!(merged.source_offsets[&0], 5);
}

fn pod(name: &str, hash: &str, ready: bool, ip: Option<&str>) -> Pod {
    let mut pod = Pod::default();
    pod.metadata.name = Some(name.into());
    pod.metadata.annotations = Some(BTreeMap::from([(
        resources::ANNOTATION_PLAN_HASH.to_owned(),
        hash.to_owned(),
    )]));
    pod.status = Some(PodStatus {
        phase: Some("Running".into()),
        pod_ip: ip.map(str::to_owned),
        conditions: Some(vec![PodCondition {
            type_: "Ready".into(),
            status: if ready { "True" } else { "False" }.into(),
            ..PodCondition::default()
        }]),
        ..PodStatus::default()
    });
    pod
}

#[test]
fn every_desired_instance_must_be_ready_on_the_current_plan() {
    let plan = plan(&pipeline(""));
    let stage = &plan.stages[0];
    let ok = instances::check_pods(
        stage,
        "h1",
        &[
            pod("p-s0-b", "h1", true, Some("127.1.0.3")),
            pod("p-s0-a", "h1", true, Some("127.1.0.2")),
        ],
    )
    .expect("ready");
    assert_eq!(ok[0].pod, "p-s0-a");
    assert_eq!(ok[0].base, "http://127.1.0.2:8080");

    let unready = instances::check_pods(
        stage,
        "h1",
        &[
            pod("p-s0-a", "h1", true, Some("127.1.0.2")),
            pod("p-s0-b", "h1", false, Some("127.1.0.3")),
        ],
    )
    .expect_err("b is not ready");
    assert_eq!(unready, "stage s0: pod p-s0-b is not Ready");
    let old = instances::check_pods(stage, "h1", &[pod("p-s0-a", "h0", true, Some("1.2.3.4"))])
        .expect_err("old plan");
    assert!(
        old.contains("runs plan h0, not the current plan h1"),
        "{old}"
    );
    let short = instances::check_pods(stage, "h1", &[pod("p-s0-a", "h1", true, Some("1.2.3.4"))])
        .expect_err("one of two");
    assert_eq!(short, "stage s0: 1 ready instance(s) of 2 desired");
    let mut going = pod("p-s0-a", "h1", true, Some("1.2.3.4"));
    going.metadata.deletion_timestamp = Some(Time(t(5)));
    let going = instances::check_pods(stage, "h1", &[going]).expect_err("terminating");
    assert!(going.contains("p-s0-a is terminating"), "{going}");
    // A pod that ended does not count either way.
    let mut ended = pod("p-s0-c", "h0", false, None);
    ended.status.as_mut().expect("status").phase = Some("Failed".into());
    instances::check_pods(
        stage,
        "h1",
        &[
            pod("p-s0-a", "h1", true, Some("127.1.0.2")),
            pod("p-s0-b", "h1", true, Some("127.1.0.3")),
            ended,
        ],
    )
    .expect("the failed pod is ignored");
}

fn stored(trigger: CheckpointTrigger) -> PipelineCheckpoint {
    PipelineCheckpoint {
        id: "20260101-000000-007".into(),
        pipeline: "p".into(),
        namespace: "n".into(),
        plan_hash: "h1".into(),
        time: "2026-01-01T00:00:00.007Z".into(),
        trigger,
        stages: vec![],
        sink_positions: Positions::from([("out".to_owned(), BTreeMap::from([(0, 3)]))]),
    }
}

#[test]
fn the_config_map_goes_with_the_pipeline_without_being_controlled() {
    let p = pipeline("");
    let checkpoint = stored(CheckpointTrigger::Manual);
    let cm = checkpoint_config_map(&p, &checkpoint).expect("config map");
    assert_eq!(
        cm.metadata.name.as_deref(),
        Some("p-checkpoint-20260101-000000-007")
    );
    let labels = cm.metadata.labels.as_ref().expect("labels");
    assert_eq!(labels[LABEL_CHECKPOINT], "20260101-000000-007");
    assert_eq!(labels[resources::LABEL_PIPELINE], "p");
    let owner = &cm.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("Pipeline", "u-1")
    );
    assert_ne!(owner.controller, Some(true));
    assert_eq!(cm.immutable, Some(true));
    let back: PipelineCheckpoint =
        serde_json::from_str(&cm.data.as_ref().expect("data")[CHECKPOINT_KEY]).expect("json");
    assert_eq!(back, checkpoint);
}

#[test]
fn a_pod_without_a_plan_hash_is_named_as_foreign() {
    let plan = plan(&pipeline(""));
    let mut stray = pod("p-s0-x", "h1", true, Some("127.1.0.4"));
    stray.metadata.annotations = None;
    let error = instances::check_pods(&plan.stages[0], "h1", &[stray]).expect_err("foreign");
    assert!(
        error.starts_with("stage s0: pod p-s0-x has no keystone.dev/plan-hash annotation"),
        "{error}"
    );
}

#[test]
fn a_stored_checkpoint_is_summarized_from_its_config_map() {
    let p = pipeline("");
    let checkpoint = stored(CheckpointTrigger::Periodic);
    let mut cm = checkpoint_config_map(&p, &checkpoint).expect("config map");
    let listed = stored_summary(&cm).expect("summary");
    assert_eq!(listed.id, checkpoint.id);
    assert_eq!(listed.trigger.as_deref(), Some("Periodic"));
    assert_eq!(listed.plan_hash.as_deref(), Some("h1"));
    assert_eq!(listed.time.0.as_millisecond() % 1000, 7);
    // Unreadable: still listed by its label and creation time, so it can be pruned.
    cm.data = None;
    cm.metadata.creation_timestamp = Some(Time(t(42)));
    let listed = stored_summary(&cm).expect("summary");
    assert_eq!(
        (listed.id.as_str(), listed.time.0),
        (checkpoint.id.as_str(), t(42))
    );
}

/// A pod address that swallows connection attempts (here: a listener whose
/// accept queue is full, so the kernel drops further SYNs) fails after the
/// connect timeout, with the cause, not after the whole request timeout.
#[tokio::test]
async fn an_unreachable_pod_fails_at_the_connect_timeout_and_says_why() {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    let listener = socket.listen(0).expect("listen");
    let port = listener.local_addr().expect("address").port();
    // Fill the accept queue (nothing accepts): later connection attempts hang.
    let mut queued = Vec::new();
    for _ in 0..4 {
        match tokio::time::timeout(
            std::time::Duration::from_millis(300),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        {
            Ok(Ok(stream)) => queued.push(stream),
            _ => break,
        }
    }
    let error = instances::pod_get("127.0.0.1", i32::from(port), "/metrics")
        .await
        .expect_err("nothing answers");
    assert!(
        error.contains(&format!("http://127.0.0.1:{port}/metrics"))
            && error.contains("tcp connect error"),
        "{error}"
    );
    assert!(
        !error.contains("no answer within"),
        "the request timeout ran out, not the connect timeout: {error}"
    );
    drop(queued);
}
