//! Checkpoints and restores of the runtime on the testbed's real Kafka:
//! checkpoints that cover idle partitions, stop and resume, restores of input
//! offsets and state (applied once), and replay suppression after a rollback.
//!
//! Needs `target/debug/keystone-runtime` (`cargo build -p keystone-runtime`;
//! scripts/test builds it) and a running testbed.

mod runtime_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keystone_crds::checkpoint::{
    InputRestore, InstanceCheckpoint, ReplaySuppression, RestorePlan, StageRestore, StateRestore,
};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use runtime_support::*;

/// A stage with one dedup step (by `id`) and one Kafka sink.
fn dedup_pipeline(name: &str, start_from: &str) -> String {
    format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: {name}, namespace: e2e}}
spec:
  source:
    topic: {name}.in
    key: [id]
    startFrom: {start_from}
    schema:
      fields:
        - {{name: id, type: string}}
  steps:
    - name: dedup
      dedup: {{key: [id], window: 1h}}
  sinks:
    - name: out
      kafka: {{topic: {name}.out, partitions: 2, key: [id]}}
  delivery: ExactlyOnce
  commitInterval: 200ms
"#
    )
}

fn event(id: &str) -> String {
    format!(r#"{{"id":"{id}"}}"#)
}

fn ids(range: std::ops::Range<u32>) -> Vec<(String, String)> {
    range
        .map(|n| {
            let id = format!("id-{n}");
            (id.clone(), event(&id))
        })
        .collect()
}

fn produce_to_partition(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    partition: i32,
    count: usize,
) {
    for n in 0..count {
        let value = event(&format!("p{partition}-{n}"));
        let record = BaseRecord::<[u8], [u8]>::to(topic)
            .partition(partition)
            .payload(value.as_bytes());
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(TIMEOUT).unwrap();
}

/// The sink's records by id: how often each id arrived.
fn sink_counts(h: &Harness, expected: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (_, value, _) in read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        expected,
        Duration::from_secs(60),
        Duration::from_secs(2),
    ) {
        let event: serde_json::Value = serde_json::from_str(&value).unwrap();
        *counts
            .entry(event["id"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    counts
}

fn checkpoint(h: &Harness, instance: &str, query: &str) -> InstanceCheckpoint {
    let (status, body) = h.http(instance, "POST", &format!("/checkpoint{query}"));
    assert_eq!(status, 200, "{body}; see {}", h.log(instance));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn changelog_topic(h: &Harness) -> String {
    h.plan.stages[0].steps[0]
        .state
        .as_ref()
        .unwrap()
        .changelog_topic
        .clone()
}

/// A changelog record as a restore reads it.
struct Logged {
    partition: i32,
    offset: i64,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
}

/// The committed records of `topic`'s partitions from `from` (the beginning
/// where it has no offset), read until each partition's end.
fn changelog_records(
    h: &Harness,
    topic: &str,
    partitions: i32,
    from: &BTreeMap<i32, i64>,
) -> Vec<Logged> {
    let ends = end_offsets(h, topic, partitions);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &h.bootstrap)
        .set("group.id", unique("e2e-changelog-reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for partition in 0..partitions {
        let offset = from
            .get(&partition)
            .map_or(Offset::Beginning, |o| Offset::Offset(*o));
        tpl.add_partition_offset(topic, partition, offset).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Transaction markers take offsets too: done once every position is at the end.
        let positions = consumer.position().unwrap();
        let done = (0..partitions).all(|partition| {
            let end = ends[&partition];
            match positions
                .find_partition(topic, partition)
                .map(|p| p.offset())
            {
                Some(Offset::Offset(at)) => at >= end,
                _ => from.get(&partition).copied().unwrap_or(0) >= end || end == 0,
            }
        });
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reading {topic} to {ends:?} timed out at {positions:?}"
        );
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            records.push(Logged {
                partition: message.partition(),
                offset: message.offset(),
                key: message.key().unwrap_or_default().to_vec(),
                value: message.payload().map(<[u8]>::to_vec),
            });
        }
    }
    records
}

/// Writes the restore plan and (re)starts `instance` with it.
fn start_with_restore(h: &mut Harness, instance: &str, plan: &RestorePlan) {
    let path = h.dir.join("restore.json");
    std::fs::write(&path, serde_json::to_vec_pretty(plan).unwrap()).unwrap();
    let path = path.display().to_string();
    h.start(instance, &[("KEYSTONE_RESTORE", path.as_str())]);
}

fn restore_plan(
    id: &str,
    input: InputRestore,
    state: BTreeMap<String, StateRestore>,
    suppress: Option<ReplaySuppression>,
) -> RestorePlan {
    RestorePlan {
        id: id.to_owned(),
        checkpoint: None,
        stages: BTreeMap::from([("s0".to_owned(), StageRestore { input, state })]),
        suppress,
    }
}

/// A dedup stage on two partitions, instance `a` running, that delivered ids 0..20.
async fn dedup_stage_with_twenty_ids(
    prefix: &str,
) -> (Harness, ThreadedProducer<DefaultProducerContext>) {
    let name = unique(prefix);
    let mut h = Harness::new(&name, &dedup_pipeline(&name, "Earliest"), 2).await;
    let p = producer(&h.bootstrap);
    h.start("a", &[]);
    produce(&p, &h.plan.source.topic, &ids(0..20));
    assert_eq!(sink_counts(&h, 20).len(), 20);
    (h, p)
}

/// A restore to checkpoint `at`: its input offsets and its changelog positions.
fn back_to(
    id: &str,
    at: &InstanceCheckpoint,
    changelog: &str,
    suppress: Option<ReplaySuppression>,
) -> RestorePlan {
    restore_plan(
        id,
        InputRestore::Offsets(at.source_offsets.clone()),
        BTreeMap::from([(
            changelog.to_owned(),
            StateRestore::At(at.changelog_positions[changelog].clone()),
        )]),
        suppress,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_covers_idle_partitions_and_is_the_groups_committed_offsets() {
    let name = unique("ckpt-idle");
    let mut h = Harness::new(&name, &dedup_pipeline(&name, "Latest"), 4).await;
    let source = h.plan.source.topic.clone();
    let p = producer(&h.bootstrap);
    // Partition 3 holds records from before the start: a group starting at the
    // latest offset never reads them, and its start must still be an offset.
    produce_to_partition(&p, &source, 3, 3);
    h.start("a", &[]);
    h.wait_ready("a");
    h.wait_for_partitions(&["a"]);
    // The assignment fetched its start offsets before anything new arrives.
    std::thread::sleep(Duration::from_secs(2));
    produce_to_partition(&p, &source, 0, 10);
    produce_to_partition(&p, &source, 1, 5);
    assert_eq!(sink_counts(&h, 15).len(), 15);

    let checkpoint = checkpoint(&h, "a", "");
    assert_eq!(
        checkpoint.source_offsets,
        BTreeMap::from([(0, 10), (1, 5), (2, 0), (3, 3)]),
        "every owned partition, idle ones at their resolved start"
    );
    assert_eq!(checkpoint.instance, "a");
    assert_eq!(checkpoint.plan_hash, h.plan.hash());
    assert!(!checkpoint.stopped);
    let changelog = changelog_topic(&h);
    let positions = &checkpoint.changelog_positions[&changelog];
    assert_eq!(
        positions.keys().copied().collect::<Vec<_>>(),
        [0, 1, 2, 3],
        "{checkpoint:?}"
    );
    assert_eq!((positions[&2], positions[&3]), (0, 0), "{checkpoint:?}");
    // Dedup logs the keys that passed in a batch as one record: at least one
    // record per partition that had events, each within the checkpoint.
    assert!(positions[&0] >= 1 && positions[&1] >= 1, "{checkpoint:?}");
    let logged = changelog_records(&h, &changelog, 4, &BTreeMap::new());
    for partition in [0, 1] {
        let before: Vec<i64> = logged
            .iter()
            .filter(|r| r.partition == partition)
            .map(|r| r.offset)
            .collect();
        assert!(
            !before.is_empty() && before.iter().all(|o| *o < positions[&partition]),
            "partition {partition}'s records {before:?} are before its position: {checkpoint:?}"
        );
    }
    let ends = end_offsets(&h, &changelog, 4);
    for (partition, position) in positions {
        assert!(
            *position <= ends[partition],
            "changelog position past the end: {checkpoint:?} {ends:?}"
        );
    }
    let group: BTreeMap<i32, i64> = group_offsets(&h, 4)
        .into_iter()
        .map(|(p, (o, _))| (p, o))
        .collect();
    assert_eq!(
        group, checkpoint.source_offsets,
        "the group's committed offsets"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_processes_nothing_more_and_resume_processes_exactly_the_rest() {
    let name = unique("ckpt-stop");
    let mut h = Harness::new(&name, &cdc_pipeline(&name), 3).await;
    let (keys, seqs) = (12, 20);
    let input = cdc_input(keys, seqs, 11);
    let source = h.plan.source.topic.clone();
    let p = producer(&h.bootstrap);
    h.start("a", &[]);
    h.wait_ready("a");
    let half = input.len() / 2;
    produce(&p, &source, &input[..half]);
    std::thread::sleep(Duration::from_secs(3));

    let started = Instant::now();
    let stopped = checkpoint(&h, "a", "?stop=true");
    let stop_took = started.elapsed();
    assert!(stopped.stopped, "{stopped:?}");
    assert_eq!(
        stopped.source_offsets.values().sum::<i64>() as usize,
        half,
        "the stop's checkpoint covers everything consumed: {stopped:?}"
    );
    assert_eq!(h.metric("a", "keystone_runtime_stopped"), 1.0);
    // A stopped instance processes nothing, and says so to the kubelet (and to
    // anyone looking at the Deployment): it is not ready until resumed.
    let (ready, why) = h.http("a", "GET", "/readyz");
    assert_eq!(ready, 503, "a stopped instance is not ready: {why}");
    assert!(why.contains("stopped after a checkpoint"), "{why}");
    // Nobody without the token can resume it (or stop it again).
    let port = h.port("a");
    for authorization in [
        None,
        Some("Bearer not-the-token"),
        Some("Basic e2e-control-token"),
    ] {
        let (status, body) = http_request_as(port, "POST", "/resume", authorization);
        assert!(
            status == 401 || status == 403,
            "POST /resume with {authorization:?} answered {status}: {body}"
        );
    }
    assert_eq!(
        h.metric("a", "keystone_runtime_stopped"),
        1.0,
        "still stopped"
    );
    let before = read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        1,
        Duration::from_secs(10),
        Duration::from_secs(2),
    )
    .len();

    produce(&p, &source, &input[half..]);
    std::thread::sleep(Duration::from_secs(4));
    let after = read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        before,
        Duration::from_secs(10),
        Duration::from_secs(2),
    )
    .len();
    assert_eq!(after, before, "records were processed while stopped");
    let again = checkpoint(&h, "a", "");
    assert_eq!(again.source_offsets, stopped.source_offsets);
    assert_eq!(again.changelog_positions, stopped.changelog_positions);
    assert!(again.stopped);

    let (status, body) = h.http("a", "POST", "/resume");
    assert_eq!(status, 200, "{body}");
    assert_eq!(h.metric("a", "keystone_runtime_stopped"), 0.0);
    h.wait_ready("a");
    let records = read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        (keys as usize) * (seqs as usize),
        Duration::from_secs(60),
        Duration::from_secs(3),
    );
    assert_exactly_once_in_order(&records, keys, seqs, &h.log("a"));
    eprintln!("stop with checkpoint took {stop_took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_rewinds_input_and_dedup_state_once() {
    let (mut h, p) = dedup_stage_with_twenty_ids("restore").await;
    let (source, changelog) = (h.plan.source.topic.clone(), changelog_topic(&h));
    let at = checkpoint(&h, "a", "");

    // After the checkpoint: ten new ids and redeliveries of five old ones.
    let mut later = ids(20..30);
    later.extend(ids(0..5));
    produce(&p, &source, &later);
    assert_eq!(sink_counts(&h, 30).len(), 30);
    h.terminate("a");
    let written_after: std::collections::BTreeSet<(i32, Vec<u8>)> =
        changelog_records(&h, &changelog, 2, &at.changelog_positions[&changelog])
            .into_iter()
            .map(|r| (r.partition, r.key))
            .collect();
    assert!(!written_after.is_empty(), "ten new ids were logged");

    let plan = back_to("r1", &at, &changelog, None);
    start_with_restore(&mut h, "a", &plan);
    // The replay emits the ids first seen after the checkpoint again; the old
    // ids' redeliveries stay suppressed by the restored state.
    let counts = sink_counts(&h, 40);
    let twice: Vec<&String> = counts
        .iter()
        .filter(|(_, n)| **n == 2)
        .map(|(id, _)| id)
        .collect();
    let expected: Vec<String> = (20..30).map(|n| format!("id-{n}")).collect();
    assert_eq!(
        twice,
        expected.iter().collect::<Vec<_>>(),
        "{counts:?}; see {}",
        h.log("a")
    );
    assert!(
        counts.values().all(|n| *n <= 2) && counts.len() == 30,
        "{counts:?}"
    );
    assert_eq!(
        h.metric("a", "keystone_restore_applied_partitions_total"),
        2.0
    );
    assert_eq!(
        h.metric("a", "keystone_restore_compensation_records_total"),
        written_after.len() as f64,
        "one tombstone per changelog key written after the checkpoint"
    );
    // The marker went through TxnOffsetCommit and comes back from the group.
    let group = group_offsets(&h, 2);
    assert_eq!(group.len(), 2, "{group:?}");
    for (partition, (_, metadata)) in &group {
        assert_eq!(metadata, "keystone.restore=r1", "partition {partition}");
    }

    // Killed after the restore was committed and restarted with the same plan:
    // no second rewind.
    let checkpoint_after = checkpoint(&h, "a", "");
    h.kill("a");
    start_with_restore(&mut h, "a", &plan);
    h.wait_ready("a");
    produce(&p, &source, &ids(30..32));
    let counts = sink_counts(&h, 42);
    assert_eq!(
        counts.values().sum::<usize>(),
        42,
        "{counts:?}; see {}",
        h.log("a")
    );
    assert_eq!(
        h.metric("a", "keystone_restore_applied_partitions_total"),
        0.0
    );
    let resumed = checkpoint(&h, "a", "");
    assert_eq!(
        resumed.source_offsets.values().sum::<i64>(),
        checkpoint_after.source_offsets.values().sum::<i64>() + 2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_state_restore_forgets_every_key() {
    let (mut h, p) = dedup_stage_with_twenty_ids("restore-empty").await;
    let (source, changelog) = (h.plan.source.topic.clone(), changelog_topic(&h));
    h.terminate("a");
    let mut latest: BTreeMap<(i32, Vec<u8>), bool> = BTreeMap::new();
    for record in changelog_records(&h, &changelog, 2, &BTreeMap::new()) {
        latest.insert((record.partition, record.key), record.value.is_some());
    }
    let live = latest.values().filter(|live| **live).count();
    assert!(live > 0, "twenty ids were logged");

    let plan = restore_plan(
        "r-empty",
        InputRestore::Committed,
        BTreeMap::from([(changelog.clone(), StateRestore::Empty)]),
        None,
    );
    start_with_restore(&mut h, "a", &plan);
    h.wait_ready("a");
    assert_eq!(
        h.metric("a", "keystone_restore_compensation_records_total"),
        live as f64,
        "one tombstone per live changelog key"
    );
    // Without state, the same ids pass again.
    produce(&p, &source, &ids(0..20));
    let counts = sink_counts(&h, 40);
    assert!(
        counts.len() == 20 && counts.values().all(|n| *n == 2),
        "{counts:?}; see {}",
        h.log("a")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_suppressed_replay_delivers_every_event_exactly_once() {
    let (mut h, p) = dedup_stage_with_twenty_ids("suppress").await;
    let (source, changelog) = (h.plan.source.topic.clone(), changelog_topic(&h));
    let sink = h.sink_topic();
    // As the operator does: the sink's ends just before the barrier.
    let sink_positions = end_offsets(&h, &sink, 2);
    let at = checkpoint(&h, "a", "");

    // The version after the checkpoint delivers ten more, then is rolled back.
    produce(&p, &source, &ids(20..30));
    assert_eq!(sink_counts(&h, 30).len(), 30);
    h.terminate("a");

    let suppress = ReplaySuppression {
        sink_positions: BTreeMap::from([(sink.clone(), sink_positions)]),
    };
    let plan = back_to("r-suppress", &at, &changelog, Some(suppress));
    start_with_restore(&mut h, "a", &plan);
    produce(&p, &source, &ids(30..40));
    let counts = sink_counts(&h, 40);
    assert!(
        counts.len() == 40 && counts.values().all(|n| *n == 1),
        "{counts:?}; see {}",
        h.log("a")
    );
    assert_eq!(
        h.metric("a", "keystone_replay_suppressed_records_total"),
        10.0
    );
    // The replay went through to the end: nothing is left to consume.
    let done = checkpoint(&h, "a", "");
    assert_eq!(done.source_offsets.values().sum::<i64>(), 40);
}

/// Every record of `topic` names, in its source headers, the source record with
/// the same value (the first one, where the source holds the value twice).
fn assert_records_name_their_source(h: &Harness, topic: &str, expected: usize) {
    let source = &h.plan.source.topic;
    let mut origin: BTreeMap<String, (String, String)> = BTreeMap::new();
    for (value, partition, offset) in read_with_positions(&h.bootstrap, source) {
        origin
            .entry(value)
            .or_insert((partition.to_string(), offset.to_string()));
    }
    let records = read_committed(
        &h.bootstrap,
        topic,
        expected,
        Duration::from_secs(30),
        Duration::from_secs(1),
    );
    assert_eq!(records.len(), expected, "{topic}");
    for (_, value, headers) in &records {
        let named = (
            headers
                .get("keystone.source.partition")
                .cloned()
                .unwrap_or_default(),
            headers
                .get("keystone.source.offset")
                .cloned()
                .unwrap_or_default(),
        );
        assert_eq!(
            Some(&named),
            origin.get(value),
            "{topic}: {value} {headers:?}"
        );
    }
}

/// Every record of `topic` with its partition and offset.
fn read_with_positions(bootstrap: &str, topic: &str) -> Vec<(String, i32, i64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("e2e-reader"))
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let partitions = consumer
        .fetch_metadata(Some(topic), TIMEOUT)
        .unwrap()
        .topics()[0]
        .partitions()
        .len() as i32;
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for partition in 0..partitions {
        let (_, high) = consumer
            .fetch_watermarks(topic, partition, TIMEOUT)
            .unwrap();
        ends.insert(partition, high);
        tpl.add_partition_offset(topic, partition, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut records = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while records.len() < ends.values().sum::<i64>() as usize && Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            records.push((
                String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned(),
                message.partition(),
                message.offset(),
            ));
        }
    }
    records
}

#[tokio::test(flavor = "multi_thread")]
async fn sink_and_repartition_records_name_their_source_record() {
    let name = unique("provenance");
    // Order holds events back and releases them later; the rekey cuts a second
    // stage that reads the source record from the repartition record's headers.
    let manifest = cdc_manifest(
        &name,
        &format!(
            r#"  steps:
    - name: order
      order: {{key: [order_id], sequence: seq, maxDelay: 10s, contiguous: true, onStale: Drop}}
    - name: by-event
      rekey: {{key: [event_id]}}
    - name: dedup
      dedup: {{key: [event_id], window: 1h}}
  sinks:
    - name: out
      kafka: {{topic: {name}.out, partitions: 2}}
  commitInterval: 200ms
"#
        ),
    );
    let mut h = Harness::new(&name, &manifest, 3).await;
    assert_eq!(h.plan.stages.len(), 2);
    let repartition = h.plan.stages[1].input.topic.clone();
    h.start_stage("first", "s0", &[]);
    h.start_stage("second", "s1", &[]);
    let (keys, seqs) = (6, 8);
    produce(
        &producer(&h.bootstrap),
        &h.plan.source.topic.clone(),
        &cdc_input(keys, seqs, 3),
    );
    let expected = (keys as usize) * (seqs as usize);
    assert_records_name_their_source(&h, &repartition, expected);
    assert_records_name_their_source(&h, &h.sink_topic(), expected);
}
