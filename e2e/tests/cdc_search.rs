//! CDC into search, end to end: a PostgreSQL table changed by concurrent
//! writers (before, during and after its initial snapshot), captured by
//! `keystone-runtime capture` into a Kafka topic, read from that topic by a
//! `keystone-runtime serve` stage whose search sink writes the testbed's
//! OpenSearch with the commit LSN (`seq`) as the external version and deletes
//! on `op: d`. Once the writers stop and everything is through, the index is
//! compared with a SELECT of the table: the same ids, every document's values,
//! no deleted row; and each document's `seq`, `op` and `_version` with the
//! row's last event in the topic.
//!
//! Needs `target/debug/keystone-runtime` (`cargo build -p keystone-runtime`;
//! scripts/test builds it) and a testbed with Kafka, PostgreSQL and OpenSearch.

mod capture_support;
mod runtime_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use capture_support::{Capture, Writers};
use keystone_e2e::Testbed;
use keystone_e2e::opensearch::OpenSearch;
use keystone_e2e::postgres::Postgres;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use runtime_support::{
    Harness, Lcg, TIMEOUT, assert_running, end_offsets, group_offsets, logs, unique,
};
use serde_json::{Value, json};

/// Rows of the table before the capture starts.
const ROWS: i64 = 20_000;
/// How long the writers change the table.
const WRITING: Duration = Duration::from_secs(6);
/// Partitions of the capture's topic (the stage's source).
const PARTITIONS: i32 = 3;

/// The table: one column of each kind the document carries; some amounts
/// and notes are NULL.
async fn create_table(client: &tokio_postgres::Client, table: &str) {
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, account int NOT NULL, amount numeric(12,2), note text, active boolean NOT NULL);
             INSERT INTO {table}
               SELECT g, g % 100,
                      CASE WHEN g % 50 = 0 THEN NULL ELSE (g % 1000) * 1.25 END,
                      CASE WHEN g % 70 = 0 THEN NULL ELSE 'initial ' || g END,
                      g % 3 = 0
               FROM generate_series(1, {ROWS}) g;"
        ))
        .await
        .unwrap();
}

/// Writers that change the table until stopped, one to three distinct rows
/// per transaction, each on its own connection: updates of every column
/// (some to and from NULL), deletes, inserts of new rows, and inserts again
/// of rows deleted earlier (the same id back after its delete).
async fn start_writers(pg: &Postgres, table: &str, count: u64) -> Writers {
    let table = table.to_owned();
    Writers::start(pg, count, |writer| {
        let table = table.clone();
        let mut rng = Lcg(writer * 7919 + 23);
        let mut next_new = 1_000_000 * (writer as i64 + 1);
        let mut inserted: Vec<i64> = Vec::new();
        let mut deleted: Vec<i64> = Vec::new();
        let mut n = 0u64;
        move || {
            let mut ids = Vec::new();
            let mut statements = Vec::new();
            for _ in 0..=rng.below(3) {
                n += 1;
                let kind = rng.below(20);
                // Again a row deleted earlier (maybe by another writer:
                // a row already back is left alone).
                if kind == 0 && !deleted.is_empty() {
                    let id = deleted.swap_remove(rng.below(deleted.len() as u64) as usize);
                    if !ids.contains(&id) {
                        ids.push(id);
                        statements.push(format!(
                            "INSERT INTO {table} (id, account, amount, note, active) VALUES ({id}, {}, 7.77, 'back {n}', true) ON CONFLICT (id) DO NOTHING",
                            rng.below(100)
                        ));
                    }
                    continue;
                }
                if kind < 4 {
                    next_new += 1;
                    inserted.push(next_new);
                    ids.push(next_new);
                    let amount = if rng.below(5) == 0 {
                        "NULL".to_owned()
                    } else {
                        format!("{}.{:02}", rng.below(10_000), rng.below(100))
                    };
                    let note = if rng.below(5) == 0 {
                        "NULL".to_owned()
                    } else {
                        format!("'new {n} ''quoted'' ü'")
                    };
                    statements.push(format!(
                        "INSERT INTO {table} (id, account, amount, note, active) VALUES ({next_new}, {}, {amount}, {note}, {})",
                        rng.below(100),
                        rng.below(2) == 0
                    ));
                    continue;
                }
                // An existing row: mostly the snapshot's, some inserted here.
                let id = if !inserted.is_empty() && rng.below(4) == 0 {
                    inserted[rng.below(inserted.len() as u64) as usize]
                } else {
                    1 + rng.below(ROWS as u64) as i64
                };
                if ids.contains(&id) {
                    continue;
                }
                ids.push(id);
                statements.push(match kind {
                    4 | 5 => {
                        deleted.push(id);
                        format!("DELETE FROM {table} WHERE id = {id}")
                    }
                    6 => format!(
                        "UPDATE {table} SET amount = NULL, note = NULL WHERE id = {id}"
                    ),
                    7 => format!(
                        "UPDATE {table} SET amount = 3.50, note = 'restored {n}' WHERE id = {id}"
                    ),
                    _ => format!(
                        "UPDATE {table} SET account = account + 1, amount = amount + 0.01, note = 'w{writer} {n}', active = NOT active WHERE id = {id}"
                    ),
                });
            }
            statements
        }
    })
    .await
}

/// The table's rows as the documents carry them, by id.
async fn table_rows(client: &tokio_postgres::Client, table: &str) -> BTreeMap<i64, Value> {
    client
        .query(
            &format!("SELECT id, account, amount::text, note, active FROM {table}"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let id: i64 = r.get(0);
            let row = json!({
                "id": id,
                "account": r.get::<_, i32>(1),
                "amount": r.get::<_, Option<String>>(2),
                "note": r.get::<_, Option<String>>(3),
                "active": r.get::<_, bool>(4),
            });
            (id, row)
        })
        .collect()
}

/// One committed record of the capture's topic.
struct Record {
    partition: i32,
    offset: i64,
    event: Value,
}

/// Every committed record of `topic`, each partition read to its end (the
/// consumer's position past the end offset, transaction markers included).
fn read_topic(bootstrap: &str, topic: &str) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("e2e-reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let mut ends = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        let (_, high) = consumer
            .fetch_watermarks(topic, partition, TIMEOUT)
            .unwrap();
        ends.insert(partition, high);
        tpl.add_partition_offset(topic, partition, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message.expect("reading the capture's topic");
            let payload = message.payload().unwrap_or_default();
            records.push(Record {
                partition: message.partition(),
                offset: message.offset(),
                event: serde_json::from_slice(payload)
                    .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(payload))),
            });
            continue;
        }
        let positions = consumer.position().unwrap();
        let at_end = ends.iter().all(|(&partition, &end)| {
            end == 0
                || matches!(
                    positions.find_partition(topic, partition).map(|e| e.offset()),
                    Some(Offset::Offset(next)) if next >= end
                )
        });
        if at_end {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "{topic} not read to its ends {ends:?} within 120 s: positions {:?}, {} records",
            positions
                .elements()
                .iter()
                .map(|e| (e.partition(), e.offset()))
                .collect::<Vec<_>>(),
            records.len()
        );
    }
}

/// Waits until the stage's group committed every record of the topic (the
/// offset after each partition's last record; a transaction's commit marker
/// may follow it): with the sink flushed before each commit, everything is
/// then in the index.
fn wait_stage_caught_up(h: &mut Harness, records: &[Record], logs: &str) {
    let mut last: BTreeMap<i32, i64> = BTreeMap::new();
    for r in records {
        let offset = last.entry(r.partition).or_default();
        *offset = (*offset).max(r.offset + 1);
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        assert_running(h, logs);
        let committed: BTreeMap<i32, i64> = group_offsets(h, PARTITIONS)
            .into_iter()
            .map(|(p, (o, _))| (p, o))
            .collect();
        if last
            .iter()
            .all(|(p, end)| committed.get(p).is_some_and(|c| c >= end))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the stage did not commit its input within 180 s: committed {committed:?}, records end at {last:?}; logs: {logs}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The Pipeline: the capture's events in, shaped into documents, into the
/// search sink with `seq` as external version (deletes: `op` = `d`).
fn pipeline(name: &str, topic: &str, url: &str, index: &str) -> String {
    format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: {name}, namespace: e2e}}
spec:
  source:
    topic: {topic}
    key: [id]
    schema:
      fields:
        - {{name: id, type: integer}}
        - {{name: op, type: string}}
        - {{name: seq, type: integer}}
        - {{name: ts, type: integer}}
        - {{name: after, type: object, optional: true}}
        - {{name: after.account, type: integer, optional: true}}
        - {{name: after.amount, type: string, optional: true}}
        - {{name: after.note, type: string, optional: true}}
        - {{name: after.active, type: boolean, optional: true}}
  steps:
    - name: document
      project:
        fields:
          - {{name: id, from: /id}}
          - {{name: seq, from: /seq}}
          - {{name: op, from: /op}}
          - {{name: account, from: /after/account, optional: true}}
          - {{name: amount, from: /after/amount, optional: true}}
          - {{name: note, from: /after/note, optional: true}}
          - {{name: active, from: /after/active, optional: true}}
  sinks:
    - name: search
      elasticsearch:
        endpoint: {url}
        index: {index}
        idFields: [id]
        versionField: seq
        bulkSize: 500
        indexSettings: {{number_of_replicas: "0"}}
  delivery: ExactlyOnce
  commitInterval: 300ms
"#
    )
}

/// What the topic says of the rows: each row's last event, after checking
/// that its `seq` strictly increases (the external versions rely on it).
struct TopicSummary {
    last: BTreeMap<i64, Value>,
    snapshot_rows: usize,
    deletes: usize,
    back_after_delete: usize,
}

fn summarize(records: &[Record], capture_log: &str) -> TopicSummary {
    let mut last: BTreeMap<i64, Value> = BTreeMap::new();
    let (mut snapshot_rows, mut deletes, mut back_after_delete) = (0, 0, 0);
    for Record { event, .. } in records {
        let id = event["id"]
            .as_i64()
            .unwrap_or_else(|| panic!("no id in {event}"));
        match event["op"].as_str() {
            Some("r") => snapshot_rows += 1,
            Some("d") => deletes += 1,
            Some("c" | "u") => {}
            _ => panic!("an event without a known op: {event}"),
        }
        if let Some(previous) = last.get(&id) {
            let (seq, previous_seq) = (event["seq"].as_u64(), previous["seq"].as_u64());
            assert!(
                seq > previous_seq,
                "row {id}: seq {seq:?} after {previous_seq:?}\n{previous}\n{event}\n{capture_log}"
            );
            if previous["op"] == "d" && event["op"] != "d" {
                back_after_delete += 1;
            }
        }
        last.insert(id, event.clone());
    }
    TopicSummary {
        last,
        snapshot_rows,
        deletes,
        back_after_delete,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_changed_by_concurrent_writers_ends_equal_to_its_search_index() {
    let started = Instant::now();
    let Some(pg) = Postgres::require() else {
        return;
    };
    let os = OpenSearch::from_env()
        .await
        .expect("OpenSearch of the testbed (run `e2e/testbed up`)");
    os.wait_ready(Duration::from_secs(60))
        .await
        .expect("OpenSearch ready");
    let testbed = Testbed::from_env().await.expect("testbed");
    let bootstrap = testbed.kafka_bootstrap_servers().expect("kafka").to_owned();
    let admin = pg.admin().await;

    let name = unique("cdc-search");
    let index = name.clone();
    let _index_cleanup = os.delete_on_drop(&index);
    let Some(mut capture) = Capture::new("cdc-search").await else {
        return;
    };
    let topic = capture.topic.clone();
    // The Harness creates the source topic: the capture's.
    let manifest = pipeline(&name, &topic, os.url(), &index);
    let mut h = Harness::new(&name, &manifest, PARTITIONS).await;
    let client = pg.connect().await;
    create_table(&client, &capture.table).await;

    // The writers run before, during and after the snapshot; the stage
    // indexes while the capture still snapshots and streams.
    let writers = start_writers(&pg, &capture.table, 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    capture.start(2000);
    let instances = ["a", "b"];
    for instance in instances {
        h.start(instance, &[]);
    }
    let logs = format!("{} {}", logs(&h, &instances), capture.log_path().display());
    let writing_until = Instant::now() + WRITING - Duration::from_millis(500);
    while Instant::now() < writing_until {
        tokio::time::sleep(Duration::from_millis(250)).await;
        capture.assert_running();
        assert_running(&mut h, &logs);
    }
    let transactions = writers.stop().await;
    assert!(
        transactions > 300,
        "the writers committed only {transactions} transactions"
    );

    // Everything into Kafka, then everything through the stage.
    capture.wait_snapshot_done().await;
    capture.wait_caught_up(&admin).await;
    let records = read_topic(&bootstrap, &topic);
    let topic_summary = summarize(&records, &capture.logs());
    wait_stage_caught_up(&mut h, &records, &logs);

    // The index against the table, and against each row's last event.
    let table = table_rows(&client, &capture.table).await;
    os.refresh(&index).await.expect("refresh");
    let docs: BTreeMap<String, (Value, i64)> = os
        .search_all(&index)
        .await
        .expect("search_all")
        .into_iter()
        .map(|(id, source, version)| (id, (source, version)))
        .collect();
    let mut wrong = Vec::new();
    for (id, row) in &table {
        let last = topic_summary.last.get(id);
        let mut want = row.clone();
        if let Some(last) = last {
            want["seq"] = last["seq"].clone();
            want["op"] = last["op"].clone();
        }
        match docs.get(&id.to_string()) {
            None => wrong.push(format!(
                "row {id}: not in the index; table {row}; last event {last:?}"
            )),
            Some((doc, version)) => {
                let version_wrong = last.is_some_and(|l| l["seq"].as_i64() != Some(*version));
                if *doc != want || version_wrong {
                    wrong.push(format!(
                        "row {id}: index {doc} (version {version}), table {row}, last event {last:?}"
                    ));
                }
            }
        }
    }
    for (id, (doc, version)) in &docs {
        let known = id.parse::<i64>().ok().filter(|id| table.contains_key(id));
        if known.is_none() {
            let last = id
                .parse::<i64>()
                .ok()
                .and_then(|id| topic_summary.last.get(&id));
            wrong.push(format!(
                "document {id}: not a row of the table (deleted?); index {doc} (version {version}), last event {last:?}"
            ));
        }
    }
    let deleted = topic_summary
        .last
        .values()
        .filter(|e| e["op"] == "d")
        .count();
    assert!(
        wrong.is_empty(),
        "the index differs from the table in {} places ({} rows, {} documents):\n{}\nlogs: {logs}",
        wrong.len(),
        table.len(),
        docs.len(),
        wrong
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let count = os.count(&index).await.expect("count");
    assert_eq!(count as usize, table.len(), "document count; logs: {logs}");

    // The workload did what it is meant to: a snapshot raced by writers,
    // deletes, and rows back after their delete.
    assert!(
        topic_summary.snapshot_rows > (ROWS as usize) * 3 / 4,
        "{} snapshot rows of {ROWS}",
        topic_summary.snapshot_rows
    );
    assert!(
        records.len() > topic_summary.snapshot_rows + 500,
        "{} events, {} from the snapshot",
        records.len(),
        topic_summary.snapshot_rows
    );
    assert!(
        deleted > 20 && topic_summary.back_after_delete > 2,
        "{deleted} rows end deleted, {} came back after a delete",
        topic_summary.back_after_delete
    );
    let metric = |name: &str| -> f64 { instances.iter().map(|i| h.metric(i, name)).sum() };
    let deletes_applied = metric(r#"keystone_sink_items_total{result="deleted""#);
    let conflicts = metric(r#"keystone_sink_items_total{result="version_conflict""#);
    assert!(
        deletes_applied >= deleted as f64,
        "{deletes_applied} deletes applied by the sink, but {deleted} rows end deleted; logs: {logs}"
    );
    // The capture writes in transactions: each partition ends with a commit
    // marker after the last record the stage commits past.
    let committed: BTreeMap<i32, i64> = group_offsets(&h, PARTITIONS)
        .into_iter()
        .map(|(p, (o, _))| (p, o))
        .collect();
    eprintln!(
        "{transactions} transactions; {} events ({} snapshot rows, {} deletes, {} rows back after a delete); \
         {} rows, {deleted} deleted; the sink applied {deletes_applied} deletes and met {conflicts} version conflicts; \
         the stage committed {committed:?} of the topic's end offsets {:?}; in {:?}",
        records.len(),
        topic_summary.snapshot_rows,
        topic_summary.deletes,
        topic_summary.back_after_delete,
        table.len(),
        end_offsets(&h, &topic, PARTITIONS),
        started.elapsed()
    );

    for instance in instances {
        h.terminate(instance);
    }
    capture.clean_up(&admin).await;
}
