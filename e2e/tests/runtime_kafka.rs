//! The runtime on the testbed's real Kafka: exactly-once through crashes and
//! rebalances, at-least-once without loss through crashes, state restored from
//! changelogs, dead letters with headers, and the operations endpoints.
//!
//! Needs `target/debug/keystone-runtime` (`cargo build -p keystone-runtime`;
//! scripts/test builds it) and a running testbed.

mod runtime_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use runtime_support::*;

#[tokio::test(flavor = "multi_thread")]
async fn exactly_once_through_repeated_sigkill() {
    let name = unique("eos-kill");
    let mut h = Harness::new(&name, &cdc_pipeline(&name), 4).await;
    let (keys, seqs) = (24, 30);
    let input = cdc_input(keys, seqs, 42);
    let source = h.plan.source.topic.clone();
    let bootstrap = h.bootstrap.clone();

    // Input arrives steadily for about 12 s while the instance is killed (SIGKILL,
    // no chance to commit) at arbitrary points and restarted, three times.
    let feeder = std::thread::spawn(move || {
        let p = producer(&bootstrap);
        for chunk in input.chunks(input.len() / 40 + 1) {
            produce(&p, &source, chunk);
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let mut rng = Lcg(7);
    h.start("a", &[]);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(2500 + rng.below(1500)));
        h.kill("a");
        h.start("a", &[]);
    }
    feeder.join().unwrap();
    let out = h.sink_topic();
    let records = read_committed(
        &h.bootstrap,
        &out,
        (keys as usize) * (seqs as usize),
        Duration::from_secs(90),
        Duration::from_secs(3),
    );
    assert_exactly_once_in_order(&records, keys, seqs, &h.log("a"));
    // The last incarnation resumed from committed state, not from scratch.
    let (_, metrics) = h.http("a", "GET", "/metrics");
    assert!(
        metric_value(&metrics, "keystone_restore_records_total").unwrap_or(0.0) > 0.0,
        "the last instance restored no state: the kills did not hit a running pipeline\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn partitions_move_to_the_survivor_with_their_state() {
    let name = unique("eos-move");
    let mut h = Harness::new(&name, &cdc_pipeline(&name), 4).await;
    let (keys, seqs) = (24, 16);
    let input = cdc_input(keys, seqs, 9);
    let source = h.plan.source.topic.clone();
    let p = producer(&h.bootstrap);

    h.start("a", &[]);
    h.start("b", &[]);
    // Both must own partitions before b dies, or there is nothing to move.
    h.wait_for_partitions(&["a", "b"]);
    let half = input.len() / 2;
    produce(&p, &source, &input[..half]);
    std::thread::sleep(Duration::from_millis(2500));
    // b dies; after the session timeout its partitions move to a, which restores
    // their dedup and order state from the changelogs before going on.
    h.kill("b");
    produce(&p, &source, &input[half..]);
    let out = h.sink_topic();
    let records = read_committed(
        &h.bootstrap,
        &out,
        (keys as usize) * (seqs as usize),
        Duration::from_secs(120),
        Duration::from_secs(3),
    );
    assert_exactly_once_in_order(
        &records,
        keys,
        seqs,
        &format!("{} {}", h.log("a"), h.log("b")),
    );
    let (_, metrics) = h.http("a", "GET", "/metrics");
    let restored: f64 = metric_value(&metrics, "keystone_restore_records_total").unwrap_or(0.0);
    assert!(
        restored > 0.0,
        "a restored no state after taking over b's partitions:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn scaling_one_to_three_to_one_loses_and_duplicates_nothing() {
    let name = unique("eos-scale");
    let mut h = Harness::new(&name, &cdc_pipeline(&name), 6).await;
    let (keys, seqs) = (30, 15);
    let input = cdc_input(keys, seqs, 5);
    let source = h.plan.source.topic.clone();
    let p = producer(&h.bootstrap);
    let thirds: Vec<&[(String, String)]> = input.chunks(input.len() / 3 + 1).collect();

    h.start("a", &[]);
    produce(&p, &source, thirds[0]);
    std::thread::sleep(Duration::from_secs(2));
    h.start("b", &[]);
    h.start("c", &[]);
    produce(&p, &source, thirds[1]);
    std::thread::sleep(Duration::from_secs(3));
    h.terminate("b");
    h.terminate("c");
    produce(&p, &source, thirds[2]);
    let out = h.sink_topic();
    let records = read_committed(
        &h.bootstrap,
        &out,
        (keys as usize) * (seqs as usize),
        Duration::from_secs(120),
        Duration::from_secs(3),
    );
    assert_exactly_once_in_order(&records, keys, seqs, &h.log("a"));
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_events_go_to_the_dead_letter_topic_with_headers() {
    let name = unique("dlq");
    let mut h = Harness::new(&name, &cdc_pipeline(&name), 2).await;
    let source = h.plan.source.topic.clone();
    let p = producer(&h.bootstrap);
    h.start("a", &[]);
    let records = vec![
        (
            "order-1".to_owned(),
            r#"{"event_id":"e1","order_id":"order-1","seq":1}"#.to_owned(),
        ),
        ("order-1".to_owned(), "this is not json".to_owned()),
        (
            "order-1".to_owned(),
            r#"{"event_id":"e2","order_id":"order-1","seq":"two"}"#.to_owned(),
        ),
        (
            "order-1".to_owned(),
            r#"{"event_id":"e3","order_id":"order-1","seq":2}"#.to_owned(),
        ),
    ];
    produce(&p, &source, &records);
    let dead = read_committed(
        &h.bootstrap,
        &h.plan.dead_letter_topic,
        2,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    assert_eq!(dead.len(), 2, "{dead:?}");
    // Dead letters carry no key, so they may sit in different partitions: order
    // them by the offset they name. The poison records were offsets 1 and 2.
    let mut dead = dead;
    dead.sort_by_key(|(_, _, headers)| {
        headers
            .get("keystone.offset")
            .and_then(|o| o.parse::<i64>().ok())
    });
    let offsets: Vec<&str> = dead
        .iter()
        .map(|(_, _, h)| h["keystone.offset"].as_str())
        .collect();
    assert_eq!(
        offsets,
        ["1", "2"],
        "each dead letter names its record's offset"
    );
    assert_eq!(dead[0].1, "this is not json", "the original bytes are kept");
    for (_, _, headers) in &dead {
        assert_eq!(
            headers.get("keystone.step").map(String::as_str),
            Some("source"),
            "{headers:?}"
        );
        assert_eq!(headers.get("keystone.topic"), Some(&source), "{headers:?}");
        assert!(
            headers
                .get("keystone.partition")
                .is_some_and(|p| p.parse::<i32>().is_ok()),
            "{headers:?}"
        );
        assert!(
            headers
                .get("keystone.offset")
                .is_some_and(|o| o.parse::<i64>().is_ok_and(|o| o >= 0)),
            "{headers:?}"
        );
        assert!(
            headers
                .get("keystone.reason")
                .is_some_and(|r| !r.is_empty()),
            "{headers:?}"
        );
    }
    assert!(
        dead[1].2["keystone.reason"].contains("seq"),
        "the reason names the field: {:?}",
        dead[1].2
    );
    // The pipeline kept going: both valid events reach the sink, in order.
    let out = read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        2,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    let seqs: Vec<i64> = out
        .iter()
        .map(|(_, v, _)| {
            serde_json::from_str::<serde_json::Value>(v).unwrap()["seq"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, [1, 2]);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_readiness_and_checkpoints() {
    let name = unique("ops");
    let mut h = Harness::new(&name, &cdc_pipeline(&name), 2).await;
    let source = h.plan.source.topic.clone();
    let p = producer(&h.bootstrap);
    let input = cdc_input(10, 10, 3);
    produce(&p, &source, &input);

    h.start("a", &[]);
    // Ready only once consuming with restored state.
    let deadline = Instant::now() + TIMEOUT;
    while h.http("a", "GET", "/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "never ready; see {}", h.log("a"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(h.http("a", "GET", "/healthz").0, 200);
    let out = read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        100,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    assert_eq!(out.len(), 100);

    let (status, body) = h.http("a", "POST", "/checkpoint");
    assert_eq!(status, 200, "{body}");
    let checkpoint: serde_json::Value = serde_json::from_str(&body).unwrap();
    let offsets = checkpoint["sourceOffsets"].as_object().unwrap();
    let consumed: i64 = offsets.values().map(|v| v.as_i64().unwrap()).sum();
    assert_eq!(
        consumed as usize,
        input.len(),
        "the checkpoint covers every consumed record: {body}"
    );
    assert!(
        checkpoint["changelogPositions"]
            .as_object()
            .is_some_and(|m| m.len() == 2),
        "{body}"
    );

    let (_, metrics) = h.http("a", "GET", "/metrics");
    for series in [
        "keystone_step_events_in_total{",
        "keystone_step_events_out_total{",
        "keystone_step_events_dropped_total{",
        "keystone_step_events_dead_lettered_total{",
        "keystone_consumer_lag{",
        "keystone_commit_duration_seconds_count",
        "keystone_state_entries{",
        "keystone_state_changelog_bytes_total{",
        "keystone_restore_records_total",
        "keystone_rebalances_total{",
        "keystone_assigned_partitions",
    ] {
        assert!(
            metrics.contains(series),
            "/metrics lacks {series}:\n{metrics}"
        );
    }
    let dropped = metric_value(&metrics, "keystone_step_events_dropped_total{").unwrap_or(0.0);
    assert_eq!(
        dropped as usize,
        input.len() - 100,
        "duplicates are counted as dropped:\n{metrics}"
    );

    // A restart restores state first: /readyz is not 200 before the restore ends,
    // and the restored dedup state keeps old duplicates out.
    h.terminate("a");
    let restore_marker = h.dir.join("restore-observed");
    h.start("a", &[]);
    let mut saw_not_ready = false;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (status, body) = h.http("a", "GET", "/readyz");
        if status == 503 {
            saw_not_ready = true;
            std::fs::write(&restore_marker, body).ok();
        }
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never ready after restart; see {}",
            h.log("a")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        saw_not_ready,
        "/readyz answered 200 before the consumer joined and restored"
    );
    let (_, metrics) = h.http("a", "GET", "/metrics");
    assert!(
        metric_value(&metrics, "keystone_restore_records_total").unwrap_or(0.0) > 0.0,
        "{metrics}"
    );
    produce(&p, &source, &input[..10]);
    std::thread::sleep(Duration::from_secs(2));
    let again = read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        100,
        Duration::from_secs(30),
        Duration::from_secs(2),
    );
    assert_eq!(
        again.len(),
        100,
        "redelivered events were let through after the restore"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn enrichment_sees_table_rows_that_change_while_running() {
    let name = unique("enrich");
    let manifest = format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: {name}, namespace: e2e}}
spec:
  source:
    topic: {name}.in
    key: [customer_id]
    schema:
      fields:
        - {{name: order_id, type: string}}
        - {{name: customer_id, type: string}}
  steps:
    - name: customer
      enrich:
        table:
          name: customers
          topic: {name}.customers
          key: [id]
          schema: {{fields: [{{name: id, type: string}}, {{name: tier, type: string}}]}}
        lookupKey: [customer_id]
        into: customer
  sinks:
    - name: out
      kafka: {{topic: {name}.out, partitions: 2}}
  commitInterval: 200ms
"#
    );
    let mut h = Harness::new(&name, &manifest, 3).await;
    assert_eq!(
        h.plan.stages.len(),
        1,
        "the table is co-partitioned with the source: no repartition"
    );
    let table = format!("{name}.customers");
    let source = h.plan.source.topic.clone();
    let p = producer(&h.bootstrap);
    let row = |id: &str, tier: &str| (id.to_owned(), format!(r#"{{"id":"{id}","tier":"{tier}"}}"#));
    let order = |id: &str, customer: &str| {
        (
            customer.to_owned(),
            format!(r#"{{"order_id":"{id}","customer_id":"{customer}"}}"#),
        )
    };
    produce(&p, &table, &[row("c1", "gold"), row("c2", "silver")]);
    h.start("a", &[]);
    produce(&p, &source, &[order("o1", "c1"), order("o2", "c2")]);
    let out = read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        2,
        TIMEOUT,
        Duration::from_millis(500),
    );
    assert_eq!(out.len(), 2, "{out:?}");

    // Rows change and arrive while the stage runs: later events see them.
    produce(&p, &table, &[row("c1", "platinum"), row("c3", "bronze")]);
    std::thread::sleep(Duration::from_secs(2));
    produce(&p, &source, &[order("o3", "c1"), order("o4", "c3")]);
    let out = read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        4,
        TIMEOUT,
        Duration::from_millis(500),
    );
    let tiers: BTreeMap<String, String> = out
        .iter()
        .map(|(_, v, _)| {
            let event: serde_json::Value = serde_json::from_str(v).unwrap();
            (
                event["order_id"].as_str().unwrap().to_owned(),
                event["customer"]["tier"]
                    .as_str()
                    .unwrap_or("<none>")
                    .to_owned(),
            )
        })
        .collect();
    let expected: BTreeMap<String, String> = [
        ("o1", "gold"),
        ("o2", "silver"),
        ("o3", "platinum"),
        ("o4", "bronze"),
    ]
    .into_iter()
    .map(|(o, t)| (o.to_owned(), t.to_owned()))
    .collect();
    assert_eq!(tiers, expected, "logs: {}", h.log("a"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rekeyed_stream_flows_through_a_repartition_topic_into_the_next_stage() {
    let name = unique("repart");
    // Events are keyed by order; the dedup is per customer and event, so the
    // plan cuts a second stage that reads a repartition topic keyed by customer.
    let manifest = format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: {name}, namespace: e2e}}
spec:
  source:
    topic: {name}.in
    key: [order_id]
    schema:
      fields:
        - {{name: order_id, type: string}}
        - {{name: customer_id, type: string}}
        - {{name: event_id, type: string}}
  steps:
    - name: by-customer
      rekey: {{key: [customer_id]}}
    - name: dedup
      dedup: {{key: [customer_id, event_id], window: 1h}}
  sinks:
    - name: out
      kafka: {{topic: {name}.out, partitions: 2}}
  commitInterval: 200ms
"#
    );
    let mut h = Harness::new(&name, &manifest, 3).await;
    assert_eq!(
        h.plan.stages.len(),
        2,
        "{}",
        serde_json::to_string_pretty(&h.plan).unwrap()
    );
    let repartition = format!("keystone.e2e.{name}.repartition.dedup");
    assert_eq!(h.plan.stages[1].input.topic, repartition);
    h.start_stage("first", "s0", &[]);
    h.start_stage("second", "s1", &[]);
    let p = producer(&h.bootstrap);
    // The same event (customer, event id) arrives through two different orders,
    // so on two source partitions: only a stage partitioned by customer sees both.
    let mut input = Vec::new();
    for c in 0..20 {
        for e in 0..5 {
            for order in [format!("o{c}-{e}-a"), format!("o{c}-{e}-b")] {
                input.push((
                    order.clone(),
                    format!(r#"{{"order_id":"{order}","customer_id":"c{c}","event_id":"e{e}"}}"#),
                ));
            }
        }
    }
    produce(&p, &h.plan.source.topic.clone(), &input);
    let out = read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        100,
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    let mut seen = BTreeMap::new();
    for (key, value, _) in &out {
        let event: serde_json::Value = serde_json::from_str(value).unwrap();
        assert_eq!(
            event["customer_id"].as_str(),
            Some(key.as_str()),
            "sink records are keyed by the new key"
        );
        *seen
            .entry((key.clone(), event["event_id"].as_str().unwrap().to_owned()))
            .or_insert(0) += 1;
    }
    assert_eq!(
        seen.len(),
        100,
        "every (customer, event) once: {} records; logs: {} {}",
        out.len(),
        h.log("first"),
        h.log("second")
    );
    assert!(
        seen.values().all(|n| *n == 1),
        "duplicates passed: {seen:?}"
    );
    let through = read_committed(
        &h.bootstrap,
        &repartition,
        200,
        Duration::from_secs(10),
        Duration::from_millis(500),
    );
    assert_eq!(
        through.len(),
        200,
        "the first stage wrote every event to the repartition topic"
    );
}

/// Under exactly-once the outputs are committed (visible to `read_committed`
/// readers) once the stage has read its input, not when the interval (5
/// minutes here) runs out; a quiet input then costs no further transaction.
#[tokio::test(flavor = "multi_thread")]
async fn exactly_once_outputs_are_committed_once_the_input_is_read_not_after_the_interval() {
    let name = unique("eos-read");
    let manifest = projecting_pipeline(&name, "  delivery: ExactlyOnce\n  commitInterval: 5m\n");
    let mut h = Harness::new(&name, &manifest, 2).await;
    let source = h.plan.source.topic.clone();
    let p = producer(&h.bootstrap);
    let first = cdc_input(5, 10, 21);
    produce(&p, &source, &first);
    h.start("a", &[]);
    let out = read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        first.len(),
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    assert_eq!(
        out.len(),
        first.len(),
        "outputs committed within a minute, under a 5-minute interval; see {}",
        h.log("a")
    );

    assert_no_commit_while_idle(&h);

    // Input arriving later is committed as soon as it is read, too.
    let second = cdc_input(5, 10, 22);
    produce(&p, &source, &second);
    let out = read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        first.len() + second.len(),
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    assert_eq!(
        out.len(),
        first.len() + second.len(),
        "the second batch's outputs; see {}",
        h.log("a")
    );
}

/// An exactly-once stage with nothing new to commit commits nothing: an idle
/// instance does not cost the broker a transaction per interval.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_exactly_once_stage_commits_no_empty_transactions() {
    let name = unique("eos-idle");
    let manifest = projecting_pipeline(&name, "  delivery: ExactlyOnce\n  commitInterval: 200ms\n");
    let mut h = Harness::new(&name, &manifest, 2).await;
    let input = cdc_input(3, 5, 31);
    produce(
        &producer(&h.bootstrap),
        &h.plan.source.topic.clone(),
        &input,
    );
    h.start("a", &[]);
    let out = read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        input.len(),
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    assert_eq!(out.len(), input.len(), "see {}", h.log("a"));
    // Ten intervals with nothing read and nothing written.
    assert_no_commit_while_idle(&h);
    // A graceful stop still commits, and the group stands at the input's end.
    h.terminate("a");
    assert_eq!(
        committed_in_group(&h, 2),
        input.len() as i64,
        "committed offsets after SIGTERM"
    );
}

/// Instance `a` has committed, and commits nothing more in the next 2 s of
/// quiet input.
#[track_caller]
fn assert_no_commit_while_idle(h: &Harness) {
    let commits = h.metric("a", "keystone_commit_duration_seconds_count");
    assert!(commits >= 1.0, "no commit counted; see {}", h.log("a"));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        h.metric("a", "keystone_commit_duration_seconds_count"),
        commits,
        "the stage committed again with nothing new to commit; see {}",
        h.log("a")
    );
}

/// A stateless pipeline whose projection keeps every field the assertions
/// read, followed by `settings` (spec members such as `delivery`).
fn projecting_pipeline(name: &str, settings: &str) -> String {
    cdc_manifest(
        name,
        &format!(
            r#"  steps:
    - name: keep
      project:
        fields:
          - {{name: event_id, from: /event_id}}
          - {{name: order_id, from: /order_id}}
          - {{name: seq, from: /seq}}
  sinks:
    - name: out
      kafka: {{topic: {name}.out, partitions: 3, key: [order_id]}}
{settings}"#
        ),
    )
}

fn at_least_once_pipeline(name: &str) -> String {
    projecting_pipeline(name, "  delivery: AtLeastOnce\n  commitInterval: 300ms\n")
}

/// The sum of the stage's committed input offsets in its consumer group.
fn committed_in_group(h: &Harness, partitions: i32) -> i64 {
    group_offsets(h, partitions)
        .values()
        .map(|(offset, _)| offset)
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn at_least_once_commits_while_consuming_and_loses_nothing_through_sigkill() {
    let name = unique("alo-kill");
    let mut h = Harness::new(&name, &at_least_once_pipeline(&name), 4).await;
    let input = cdc_input(24, 30, 5);
    let expected: BTreeMap<String, usize> = input.iter().fold(BTreeMap::new(), |mut n, (_, v)| {
        let event: serde_json::Value = serde_json::from_str(v).unwrap();
        *n.entry(event["event_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
        n
    });
    let total = input.len();
    let source = h.plan.source.topic.clone();
    let bootstrap = h.bootstrap.clone();
    let feeder = std::thread::spawn(move || {
        let p = producer(&bootstrap);
        for chunk in input.chunks(input.len() / 40 + 1) {
            produce(&p, &source, chunk);
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    h.start("a", &[]);

    // Offsets are committed while input keeps arriving: the interval commit
    // waits for acknowledgements without holding the loop, and it happens.
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut committed = 0;
    while committed == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        committed = committed_in_group(&h, 4);
    }
    assert!(
        committed > 0 && !feeder.is_finished(),
        "no offsets committed while the input was flowing (committed {committed}); see {}",
        h.log("a")
    );

    // SIGKILL twice mid-stream: whatever was not committed is read again.
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(1500));
        h.kill("a");
        h.start("a", &[]);
    }
    feeder.join().unwrap();
    let records = read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        total,
        Duration::from_secs(90),
        Duration::from_secs(3),
    );
    let mut delivered: BTreeMap<String, usize> = BTreeMap::new();
    for (_, value, _) in &records {
        let event: serde_json::Value = serde_json::from_str(value).unwrap();
        *delivered
            .entry(event["event_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let lost: Vec<&String> = expected
        .iter()
        .filter(|(id, n)| delivered.get(*id).copied().unwrap_or(0) < **n)
        .map(|(id, _)| id)
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {total} input records never reached the sink ({} records read): {lost:?}; see {}",
        lost.len(),
        records.len(),
        h.log("a")
    );

    // A graceful stop commits everything processed: the group is at the input's end.
    h.terminate("a");
    assert_eq!(
        committed_in_group(&h, 4),
        total as i64,
        "committed offsets after SIGTERM"
    );
}

/// An at-least-once pipeline with a dedup step, whose sink refuses records over
/// 8,000 bytes until the test raises its limit.
fn at_least_once_dedup_pipeline(name: &str) -> String {
    cdc_manifest(
        name,
        &format!(
            r#"  steps:
    - name: once
      dedup: {{key: [order_id, event_id], window: 1h}}
  sinks:
    - name: out
      kafka: {{topic: {name}.out, partitions: 1, key: [order_id], config: {{max.message.bytes: "8000"}}}}
  delivery: AtLeastOnce
  commitInterval: 300ms
"#
        ),
    )
}

fn cdc_event(event_id: &str, order_id: &str, seq: i64) -> (String, String) {
    (
        order_id.to_owned(),
        serde_json::json!({"event_id": event_id, "order_id": order_id, "seq": seq}).to_string(),
    )
}

/// Under at-least-once the dedup step's changelog record can be acknowledged
/// while the same event's output is refused. The state is restored as of the
/// changelog positions committed with the input offsets, so the event read
/// again is delivered instead of being dropped as a duplicate of itself.
#[tokio::test(flavor = "multi_thread")]
async fn at_least_once_state_is_restored_as_of_the_commit_so_a_refused_output_is_not_lost() {
    let name = unique("alo-state");
    let mut h = Harness::new(&name, &at_least_once_dedup_pipeline(&name), 1).await;
    let source = h.plan.source.topic.clone();
    let sink = h.sink_topic();
    let p = producer(&h.bootstrap);

    let before: Vec<(String, String)> = (0..10)
        .map(|n| cdc_event(&format!("e{n}"), "o1", n))
        .collect();
    produce(&p, &source, &before);
    h.start("a", &[]);
    let delivered = read_committed(
        &h.bootstrap,
        &sink,
        10,
        Duration::from_secs(60),
        Duration::from_millis(500),
    );
    assert_eq!(delivered.len(), 10, "see {}", h.log("a"));
    let deadline = Instant::now() + TIMEOUT;
    while committed_in_group(&h, 1) < 10 {
        assert!(Instant::now() < deadline, "no commit; see {}", h.log("a"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, metadata) = &group_offsets(&h, 1)[&0];
    let changelog = &h.plan.stages[0].steps[0]
        .state
        .as_ref()
        .unwrap()
        .changelog_topic;
    assert!(
        metadata.contains(&format!("keystone.changelog={changelog}@")),
        "the commit carries the changelog position: {metadata:?}"
    );

    // An event too large for the sink (random hex does not compress), then more.
    let mut rng = Lcg(11);
    let big_id: String = (0..1250).map(|_| format!("{:016x}", rng.next())).collect();
    let mut after = vec![cdc_event(&big_id, "o1", 10)];
    after.extend((11..16).map(|n| cdc_event(&format!("e{n}"), "o1", n)));
    produce(&p, &source, &after);
    let log_path = h.log("a");
    let deadline = Instant::now() + TIMEOUT;
    while !std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .contains("could not be delivered")
    {
        assert!(
            Instant::now() < deadline,
            "the sink never refused the large record; see {log_path}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The sink accepts it now; the instance crashes (or has given up) and restarts.
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &h.bootstrap)
            .create()
            .unwrap();
    let raise = rdkafka::admin::AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic(&sink))
        .set("max.message.bytes", "1000000");
    for result in admin
        .alter_configs(&[raise], &rdkafka::admin::AdminOptions::new())
        .await
        .unwrap()
    {
        result.unwrap_or_else(|(topic, e)| panic!("raising the limit of {topic:?}: {e}"));
    }
    h.kill("a");
    h.start("a", &[]);

    let records = read_committed(
        &h.bootstrap,
        &sink,
        16,
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    let ids: std::collections::BTreeSet<String> = records
        .iter()
        .map(|(_, value, _)| {
            let event: serde_json::Value = serde_json::from_str(value).unwrap();
            event["event_id"].as_str().unwrap().to_owned()
        })
        .collect();
    let missing: Vec<String> = before
        .iter()
        .chain(&after)
        .map(|(_, value)| {
            let event: serde_json::Value = serde_json::from_str(value).unwrap();
            event["event_id"].as_str().unwrap().to_owned()
        })
        .filter(|id| !ids.contains(id))
        .map(|id| id.chars().take(20).collect())
        .collect();
    assert!(
        missing.is_empty(),
        "events never delivered: {missing:?} ({} records read); see {log_path}",
        records.len()
    );
    h.terminate("a");
}

/// An order step that waits for late predecessors: with every event held
/// for its `maxDelay`, the instance's buffer limit is what bounds memory.
fn waiting_order_pipeline(name: &str) -> String {
    cdc_manifest(
        name,
        &format!(
            r#"  steps:
    - name: in-order
      order: {{key: [order_id], sequence: seq, maxDelay: 1s, maxBuffered: 100000, onStale: Drop}}
  sinks:
    - name: out
      kafka: {{topic: {name}.out, partitions: 2, key: [order_id]}}
"#
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn held_back_events_past_the_buffer_limit_pause_intake_and_lose_nothing() {
    let name = unique("order-buffer");
    let mut h = Harness::new(&name, &waiting_order_pipeline(&name), 2).await;
    let input = cdc_input(40, 100, 17);
    let total = input.len();
    produce(&producer(&h.bootstrap), &h.plan.source.topic, &input);
    // Held parsed, about 650 bytes per event: the whole input would be ~3 MB.
    let limit = 64 * 1024;
    h.start("a", &[("KEYSTONE_MAX_BUFFERED_BYTES", "64KiB")]);
    h.wait_ready("a");
    let (mut peak, mut held_seen) = (0.0f64, false);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (_, metrics) = h.http("a", "GET", "/metrics");
        let value = |n: &str| metric_value(&metrics, n).unwrap_or(0.0);
        peak = peak.max(value("keystone_buffered_bytes"));
        held_seen |= value("keystone_buffer_intake_held") == 1.0;
        let settled = value(r#"keystone_step_events_out_total{step="in-order""#)
            + value(r#"keystone_step_events_dropped_total{step="in-order""#);
        if settled as usize >= total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{settled} of {total} events left the order step within 90 s; see {}",
            h.log("a")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        held_seen,
        "intake was never paused for the buffers; see {}",
        h.log("a")
    );
    // Above the limit by at most what one poll (2,048 records) brings in
    // before the pause: below 8 MiB waiting, events are kept parsed and
    // counted at about 650 bytes each.
    assert!(
        peak <= (limit + 2048 * 800) as f64,
        "{peak} bytes held with a limit of {limit}"
    );
    assert!(
        std::fs::read_to_string(h.log("a"))
            .unwrap_or_default()
            .contains("intake paused until timers release enough"),
        "the pause is not in the log {}",
        h.log("a")
    );

    // Nothing lost, nothing twice, each order's events ascending.
    let out = h.metric("a", r#"keystone_step_events_out_total{step="in-order""#) as usize;
    let records = read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        out,
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    assert_eq!(records.len(), out, "records at the sink");
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    let mut distinct = std::collections::BTreeSet::new();
    for (_, value, _) in &records {
        let event: serde_json::Value = serde_json::from_str(value).unwrap();
        let order = event["order_id"].as_str().unwrap().to_owned();
        let seq = event["seq"].as_i64().unwrap();
        if let Some(previous) = last.insert(order.clone(), seq) {
            assert!(seq > previous, "{order}: {seq} after {previous}");
        }
        distinct.insert(event["event_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        distinct.len(),
        records.len(),
        "an event reached the sink twice"
    );
    // Redeliveries are the only stale events when nothing leaves early: most
    // of the 4,000 distinct events get through.
    assert!(
        records.len() > 3_000,
        "{} of {total} events reached the sink",
        records.len()
    );
}
