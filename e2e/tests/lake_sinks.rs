//! The lake sinks end to end: `keystone-runtime serve` instances read the
//! testbed's real Kafka and write Hive-style Parquet to the testbed's
//! S3-compatible store (gofakes3), or an Iceberg table through the testbed's
//! REST catalog (Apache Iceberg's own); independent readers (pyarrow's
//! dataset with hive partitioning, pyiceberg: `e2e/readers`) read the result.
//! Each test computes its reference from the input it produces.
//!
//! - instances SIGKILLed three times mid-stream, then a rollback to a
//!   checkpoint: every event once (the replay skips what the lake holds);
//!   Parquet rows in their folders and `_SUCCESS` in exactly the hours event
//!   time has passed, Iceberg snapshots naming their epochs;
//! - the store (Parquet) or the catalog (Iceberg) stopped for 30 s
//!   mid-stream: the instance stays up, and afterwards nothing is lost or
//!   doubled; the Parquet sink commits nothing it could not stage.
//!
//! Needs `target/debug/keystone-runtime` and a running testbed with Kafka and
//! the lake (`e2e/testbed up`).

mod runtime_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use keystone_crds::checkpoint::{InputRestore, ReplaySuppression, RestorePlan, StageRestore};
use keystone_e2e::Testbed;
use keystone_e2e::lake::Lake;
use runtime_support::*;
use serde_json::Value;

/// The outage tests stop the one store or the one catalog: they take these
/// exclusively.
static STORE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());
static CATALOG: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// How long published files may take to appear after the commit that covers
/// them (the publish follows the commit at once; this is slack for a slow
/// machine).
const PUBLISH_SLACK: Duration = Duration::from_secs(30);

/// A Parquet sink writing `s3://<bucket>/<name>`, folders by shard, date
/// and hour.
fn parquet_sink(name: &str, lake: &Lake) -> String {
    format!(
        r#"    - name: lake
      parquet:
        path: {url}
        partitionBy: [shard, "day(at)", "hour(at)"]
        credentialsSecret: lake-s3
"#,
        url = lake.url(name)
    )
}

/// An Iceberg sink appending to table `e2e.<table>`, partitioned by shard
/// and hour, a snapshot a second; an s3:// warehouse takes the store's keys
/// from the sink's Secret.
fn iceberg_sink(table: &str, lake: &Lake) -> String {
    let secret = if lake.warehouse.starts_with("s3://") {
        ", credentialsSecret: lake-s3"
    } else {
        ""
    };
    format!(
        r#"    - name: lake
      iceberg:
        catalog: {{type: rest, uri: '{uri}', warehouse: '{warehouse}'{secret}}}
        namespace: e2e
        table: {table}
        partitionBy: [shard, "hour(at)"]
        commitInterval: 1s
"#,
        uri = lake.catalog,
        warehouse = lake.warehouse
    )
}

/// A pipeline reading `<name>.in` into `sink`.
fn manifest(name: &str, sink: &str) -> String {
    format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: {name}, namespace: e2e}}
spec:
  source:
    topic: {name}.in
    key: [id]
    schema:
      fields:
        - {{name: id, type: string}}
        - {{name: shard, type: integer}}
        - {{name: at, type: timestamp}}
        - {{name: amount, type: number}}
  sinks:
{sink}  delivery: ExactlyOnce
  commitInterval: 500ms
"#
    )
}

/// One input event of the reference.
struct Row {
    id: String,
    shard: i64,
    at: DateTime<Utc>,
    amount: f64,
}

/// `count` events whose time runs from 10:00 to 13:00 in input order.
fn input(count: usize) -> Vec<Row> {
    let start = DateTime::parse_from_rfc3339("2026-12-03T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let span = chrono::Duration::hours(3);
    (0..count)
        .map(|i| Row {
            id: format!("e{i:06}"),
            shard: (i % 3) as i64,
            at: start + span * i as i32 / count as i32,
            amount: i as f64 / 4.0,
        })
        .collect()
}

fn pairs(rows: &[Row]) -> Vec<(String, String)> {
    rows.iter()
        .map(|r| {
            let at = r.at.to_rfc3339_opts(SecondsFormat::Millis, true);
            let value = format!(
                r#"{{"id":"{}","shard":{},"at":"{at}","amount":{}}}"#,
                r.id, r.shard, r.amount
            );
            (r.id.clone(), value)
        })
        .collect()
}

/// Where a test's rows are.
enum Written<'a> {
    /// A Parquet tree under this prefix of the bucket.
    Parquet(&'a str),
    /// Iceberg table `namespace.table`.
    Iceberg(&'a str),
}

impl Written<'_> {
    fn rows(&self, lake: &Lake) -> Vec<Value> {
        match self {
            Written::Parquet(prefix) => lake.rows(prefix),
            // Not there yet (no table before the first commit): no rows.
            Written::Iceberg(table) => lake.iceberg_rows(table).unwrap_or_default(),
        }
    }
}

/// The lake holds each input event once, with its values (and, in a
/// Parquet tree, in its folder).
fn assert_rows_are_reference(lake: &Lake, written: &Written<'_>, input: &[Row], logs: &str) {
    let deadline = Instant::now() + PUBLISH_SLACK;
    let mut rows = written.rows(lake);
    while rows.len() < input.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        rows = written.rows(lake);
    }
    let mut seen: BTreeMap<String, Value> = BTreeMap::new();
    for row in &rows {
        let id = row["id"].as_str().unwrap().to_owned();
        if let Some(first) = seen.insert(id.clone(), row.clone()) {
            panic!("{id} is in the lake twice: {first} and {row}; logs: {logs}");
        }
    }
    assert_eq!(
        rows.len(),
        input.len(),
        "the lake holds {} rows for {} events; logs: {logs}",
        rows.len(),
        input.len()
    );
    for r in input {
        let row = seen
            .get(&r.id)
            .unwrap_or_else(|| panic!("{} is missing from the lake; logs: {logs}", r.id));
        if let Written::Parquet(_) = written {
            // Folder values, read as text.
            assert_eq!(row["shard"], Value::from(r.shard.to_string()), "{row}");
            let date = r.at.format("%Y-%m-%d").to_string();
            assert_eq!(row["date"], Value::from(date), "{row}");
            assert_eq!(
                row["hour"],
                Value::from(r.at.format("%H").to_string()),
                "{row}"
            );
        } else {
            assert_eq!(row["shard"], Value::from(r.shard), "{row}");
        }
        let at = DateTime::parse_from_rfc3339(row["at"].as_str().unwrap()).unwrap();
        assert_eq!(at, r.at, "{row}");
        assert_eq!(row["amount"].as_f64(), Some(r.amount), "{row}");
    }
}

/// Streams 6000 events into `sink` while instances are SIGKILLed three
/// times, then rolls the stage back to a checkpoint and streams the rest:
/// the lake must hold every event once. Returns the harness (instances still
/// running) and the logs, for the caller's own checks.
async fn sigkills_and_a_rollback(
    test: &str,
    name: &str,
    sink: &str,
    lake: &Lake,
    written: &Written<'_>,
) -> (Harness, String) {
    let mut rng = Lcg(seed(test));
    let partitions = 4;
    let mut h = Harness::new(name, &manifest(name, sink), partitions).await;
    let source = h.plan.source.topic.clone();
    let instances = ["a", "b"];
    let logs = logs(&h, &instances);
    let sink_env = lake.sink_env();
    let env: Vec<(&str, &str)> = sink_env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let rows = input(6000);
    // Two thirds stream in through the SIGKILLs; then a checkpoint, a sixth
    // after it (rolled back, so read twice), and the last sixth.
    let (checkpoint_at, restore_at) = (rows.len() * 2 / 3, rows.len() * 5 / 6);
    let slices = 40;
    let batches: Vec<Vec<(String, String)>> = (0..slices)
        .map(|s| pairs(&rows[checkpoint_at * s / slices..checkpoint_at * (s + 1) / slices]))
        .collect();
    stream_through_sigkills(
        &mut h,
        &mut rng,
        &instances,
        &env,
        &source,
        batches,
        Duration::from_secs(8),
    );
    wait_caught_up(&mut h, partitions, &logs);
    for instance in instances {
        h.wait_ready(instance);
    }
    h.wait_for_partitions(&instances);
    let at = stage_checkpoint(&h, &instances, partitions, checkpoint_at);
    let p = producer(&h.bootstrap);
    produce(&p, &source, &pairs(&rows[checkpoint_at..restore_at]));
    wait_caught_up(&mut h, partitions, &logs);
    for instance in instances {
        h.terminate(instance);
    }
    let restore = RestorePlan {
        id: unique("rollback"),
        checkpoint: None,
        stages: BTreeMap::from([(
            "s0".to_owned(),
            StageRestore {
                input: InputRestore::Offsets(at.source_offsets.clone()),
                state: BTreeMap::new(),
            },
        )]),
        suppress: Some(ReplaySuppression {
            sink_positions: BTreeMap::new(),
        }),
    };
    start_restored(&mut h, &instances, &env, &restore);
    produce(&p, &source, &pairs(&rows[restore_at..]));
    wait_caught_up(&mut h, partitions, &logs);
    let suppressed: f64 = instances
        .iter()
        .map(|i| {
            let (_, metrics) = h.http(i, "GET", "/metrics");
            metrics
                .lines()
                .filter(|l| {
                    l.starts_with("keystone_replay_suppressed_records_total{")
                        && l.contains(r#"topic="lake""#)
                })
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum::<f64>()
        })
        .sum();
    assert_eq!(
        suppressed as usize,
        restore_at - checkpoint_at,
        "the replay skips exactly the events after the checkpoint; logs: {logs}"
    );
    assert_rows_are_reference(lake, written, &rows, &logs);
    (h, logs)
}

#[tokio::test(flavor = "multi_thread")]
async fn parquet_on_s3_holds_every_event_once_through_sigkills_and_a_rollback() {
    let _shared = STORE.read().await;
    let lake = Lake::from_env();
    let name = unique("lake-pq");
    let (mut h, logs) = sigkills_and_a_rollback(
        "parquet_on_s3_holds_every_event_once_through_sigkills_and_a_rollback",
        &name,
        &parquet_sink(&name, &lake),
        &lake,
        &Written::Parquet(&name),
    )
    .await;

    // Event time reached 12:59 on every partition: the hours 10 and 11 of
    // every shard are complete, 12 is not.
    let keys = lake.keys(&name);
    for shard in 0..3 {
        for (hour, complete) in [(10, true), (11, true), (12, false)] {
            let marker = format!("shard={shard}/date=2026-12-03/hour={hour}/_SUCCESS");
            assert_eq!(
                keys.contains(&marker),
                complete,
                "{marker} present: {}; keys: {keys:?}; logs: {logs}",
                keys.contains(&marker)
            );
        }
    }
    for instance in ["a", "b"] {
        h.terminate(instance);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn iceberg_holds_every_event_once_through_sigkills_and_a_rollback() {
    let _shared = CATALOG.read().await;
    // Data files, staging manifests and table metadata all on the store.
    let lake = Lake::from_env().with_s3_warehouse();
    let name = unique("lake-ice");
    let table = name.replace('-', "_");
    let qualified = format!("e2e.{table}");
    let (mut h, logs) = sigkills_and_a_rollback(
        "iceberg_holds_every_event_once_through_sigkills_and_a_rollback",
        &name,
        &iceberg_sink(&table, &lake),
        &lake,
        &Written::Iceberg(&qualified),
    )
    .await;
    // Every snapshot names the epochs it appends; none is named twice.
    let snapshots = lake.iceberg_snapshots(&qualified).expect("snapshots");
    let mut epochs = std::collections::BTreeSet::new();
    for snapshot in &snapshots {
        let summary = &snapshot["summary"];
        let instance = summary["keystone.instance"].as_str().expect("instance");
        let mut named = Vec::new();
        if let Some(own) = summary["keystone.epochs"].as_str() {
            named.extend(own.split(',').map(|r| format!("{instance}.{r}")));
        }
        if let Some(recovered) = summary["keystone.recovered"].as_str() {
            named.extend(recovered.split(',').map(str::to_owned));
        }
        for range in named {
            let (who, span) = range.split_once('.').expect("instance.first-last");
            let (first, last) = span.split_once('-').expect("first-last");
            for epoch in first.parse::<u64>().unwrap()..=last.parse::<u64>().unwrap() {
                assert!(
                    epochs.insert((who.to_owned(), epoch)),
                    "epoch {who}.{epoch} appended twice: {snapshots:?}; logs: {logs}"
                );
            }
        }
    }
    for instance in ["a", "b"] {
        h.terminate(instance);
    }
}

/// Streams 3000 events into `sink`, a third of them while `component` of the
/// testbed is stopped for 30 s: the instance must stay up, commit nothing it
/// could not stage when `stages_need_it`, and lose and double nothing.
async fn outage(
    component: &str,
    stages_need_it: bool,
    name: &str,
    sink: &str,
    lake: &Lake,
    written: &Written<'_>,
) {
    let testbed = Testbed::from_env().await.expect("testbed");
    let partitions = 2;
    let mut h = Harness::new(name, &manifest(name, sink), partitions).await;
    let source = h.plan.source.topic.clone();
    let logs = logs(&h, &["a"]);
    let sink_env = lake.sink_env();
    let env: Vec<(&str, &str)> = sink_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let rows = input(3000);
    let p = producer(&h.bootstrap);

    h.start("a", &env);
    produce(&p, &source, &pairs(&rows[..1000]));
    wait_caught_up(&mut h, partitions, &logs);
    testbed.stop(component).await.expect("stopping it");
    let stopped = Instant::now();
    produce(&p, &source, &pairs(&rows[1000..2000]));
    let committed_when_stopped = committed(&h, partitions);
    while stopped.elapsed() < Duration::from_secs(30) {
        assert_running(&mut h, &logs);
        std::thread::sleep(Duration::from_secs(1));
    }
    if stages_need_it {
        // Nothing was committed that the store did not take.
        let committed_while_down = committed(&h, partitions);
        let moved: i64 = committed_while_down
            .iter()
            .map(|(p, o)| o - committed_when_stopped.get(p).copied().unwrap_or(0))
            .sum();
        assert_eq!(
            moved, 0,
            "offsets moved while {component} was down; logs: {logs}"
        );
    }
    testbed.start(component).await.expect("starting it again");
    produce(&p, &source, &pairs(&rows[2000..]));
    wait_caught_up(&mut h, partitions, &logs);
    assert_rows_are_reference(lake, written, &rows, &logs);
    h.terminate("a");
}

#[tokio::test(flavor = "multi_thread")]
async fn parquet_waits_while_the_store_is_down_and_loses_nothing() {
    let _exclusive = STORE.write().await;
    let lake = Lake::from_env();
    let name = unique("lake-pq-down");
    let sink = parquet_sink(&name, &lake);
    outage("s3", true, &name, &sink, &lake, &Written::Parquet(&name)).await;
}

/// Staging needs no catalog (files and staging manifests go to the
/// warehouse): offsets go on committing while the catalog is away, with the
/// staged epochs named in their metadata, and the snapshot comes after.
#[tokio::test(flavor = "multi_thread")]
async fn iceberg_waits_while_the_catalog_is_down_and_loses_nothing() {
    let _exclusive = CATALOG.write().await;
    let lake = Lake::from_env();
    let name = unique("lake-ice-down");
    let table = name.replace('-', "_");
    let qualified = format!("e2e.{table}");
    let sink = iceberg_sink(&table, &lake);
    outage(
        "iceberg",
        false,
        &name,
        &sink,
        &lake,
        &Written::Iceberg(&qualified),
    )
    .await;
}
