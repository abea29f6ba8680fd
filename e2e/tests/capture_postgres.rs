//! `keystone-runtime capture` against the testbed's real PostgreSQL and
//! Kafka: an initial snapshot interleaved with concurrent writers, and
//! SIGKILLs mid-snapshot and mid-stream. The topic is compared with the table
//! by SELECT at the end, and each row's events are checked for order, gaps
//! and repeats.
//!
//! Needs `target/debug/keystone-runtime` (scripts/test builds it) and a
//! testbed with Kafka and PostgreSQL.

mod capture_support;
mod runtime_support;

use std::collections::BTreeMap;
use std::time::Duration;

use capture_support::{Capture, Writers, table_rows};
use keystone_e2e::postgres::Postgres;
use runtime_support::{Lcg, http_request, metric_value, read_committed};
use serde_json::Value;

/// Writers that change the table until stopped: updates that add one to a
/// row's `version` (70%), deletes (10%), inserts of new rows (20%), one to
/// three rows per transaction, on separate connections.
async fn start_writers(pg: &Postgres, table: &str, count: u64, existing_rows: i64) -> Writers {
    let table = table.to_owned();
    Writers::start(pg, count, |writer| {
        let table = table.clone();
        let mut rng = Lcg(writer * 7919 + 17);
        let mut next_new = 1_000_000 * (writer as i64 + 1);
        move || {
            // Distinct rows per transaction: two changes of one row in
            // one transaction are one event (their net change).
            let mut ids = Vec::new();
            let mut statements = Vec::new();
            for _ in 0..=rng.below(3) {
                let id = 1 + rng.below(existing_rows as u64) as i64;
                if ids.contains(&id) {
                    continue;
                }
                ids.push(id);
                statements.push(match rng.below(10) {
                    0 => format!("DELETE FROM {table} WHERE id = {id}"),
                    1 | 2 => {
                        next_new += 1;
                        format!(
                            "INSERT INTO {table} (id, account, version, amount, note) VALUES ({next_new}, {}, 0, 1.25, 'new')",
                            rng.below(100)
                        )
                    }
                    _ => format!(
                        "UPDATE {table} SET version = version + 1, amount = amount + 0.01, note = 'w{writer}' WHERE id = {id}"
                    ),
                });
            }
            statements
        }
    })
    .await
}

/// Checks each row's events: sequences strictly increase; an update adds one
/// to the version of the event before it (a gap is a lost change, a repeat a
/// duplicate); a snapshot row repeats it (the log overtook it otherwise); the
/// last event of each row matches the table. Returns (events, snapshot rows).
fn assert_matches_table(
    records: &[(String, String, BTreeMap<String, String>)],
    table: &BTreeMap<i64, Value>,
    logs: &str,
) -> (usize, usize) {
    let mut last: BTreeMap<i64, Value> = BTreeMap::new();
    let mut snapshot_rows = 0;
    for (_, value, _) in records {
        let event: Value = serde_json::from_str(value).unwrap();
        let id = event["id"]
            .as_i64()
            .unwrap_or_else(|| panic!("no id in {event}"));
        let op = event["op"].as_str().unwrap();
        if op == "r" {
            snapshot_rows += 1;
        }
        if let Some(previous) = last.get(&id) {
            let (seq, previous_seq) = (
                event["seq"].as_u64().unwrap(),
                previous["seq"].as_u64().unwrap(),
            );
            assert!(
                seq > previous_seq,
                "row {id}: seq {seq} after {previous_seq}\n{previous}\n{event}\n{logs}"
            );
            let version = |e: &Value| e["after"]["version"].as_i64();
            match (previous["op"].as_str().unwrap(), op) {
                (_, "d") => {}
                ("d", _) => panic!("row {id}: {op} after its delete\n{previous}\n{event}"),
                (_, "u") => assert_eq!(
                    version(&event),
                    version(previous).map(|v| v + 1),
                    "row {id}: a change lost or repeated\n{previous}\n{event}\n{logs}"
                ),
                (_, "r") => assert_eq!(
                    version(&event),
                    version(previous),
                    "row {id}: a snapshot row older or newer than the log before it\n{previous}\n{event}"
                ),
                (p, o) => panic!("row {id}: {o} after {p}\n{previous}\n{event}"),
            }
        }
        last.insert(id, event);
    }
    let captured: BTreeMap<i64, Value> = last
        .into_iter()
        .filter(|(_, e)| e["op"] != "d")
        .map(|(id, e)| (id, e["after"].clone()))
        .collect();
    let missing: Vec<_> = table
        .keys()
        .filter(|id| !captured.contains_key(id))
        .take(5)
        .collect();
    let extra: Vec<_> = captured
        .keys()
        .filter(|id| !table.contains_key(id))
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "rows missing from the topic {missing:?}, in the topic but not the table {extra:?}\n{logs}"
    );
    for (id, row) in table {
        assert_eq!(&captured[id], row, "row {id} differs from the table");
    }
    (records.len(), snapshot_rows)
}

/// Records of the topic in partition order (each row's events in order).
fn read_topic(capture: &Capture) -> Vec<(String, String, BTreeMap<String, String>)> {
    read_committed(
        &capture.bootstrap,
        &capture.topic,
        1,
        Duration::from_secs(60),
        Duration::from_secs(3),
    )
}

/// Stops the writers, waits until the capture has everything, and compares
/// the topic with the table; returns (events, snapshot rows).
async fn finish(
    capture: &mut Capture,
    admin: &tokio_postgres::Client,
    writers: Writers,
) -> (usize, usize) {
    let transactions = writers.stop().await;
    assert!(
        transactions > 100,
        "the writers committed only {transactions} transactions"
    );
    capture.wait_caught_up(admin).await;
    let records = read_topic(capture);
    let table = table_rows(admin, &capture.table).await;
    assert_matches_table(&records, &table, &capture.logs())
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_during_a_snapshot_of_100k_rows_end_equal_to_the_table() {
    let Some(mut capture) = Capture::new("cdc-snap").await else {
        return;
    };
    let admin = capture.pg.admin().await;
    let rows = 100_000;
    capture.create_table(rows).await;
    capture.create_topic(6).await;
    let writers = start_writers(&capture.pg, &capture.table, 4, rows).await;
    // The writers run before, during and after the snapshot.
    tokio::time::sleep(Duration::from_millis(500)).await;
    capture.start(2_000);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (events, snapshot_rows) = finish(&mut capture, &admin, writers).await;
    assert!(
        snapshot_rows > 90_000,
        "{snapshot_rows} snapshot rows of {rows}"
    );
    assert!(
        events > snapshot_rows + 100,
        "{events} events, {snapshot_rows} from the snapshot: the log's changes are missing"
    );
    let (status, metrics) = http_request(capture.port, "GET", "/metrics");
    assert_eq!(status, 200, "{metrics}");
    assert_eq!(
        metric_value(&metrics, "keystone_capture_snapshot_rows_total"),
        Some(snapshot_rows as f64),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "keystone_capture_snapshot_done"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(http_request(capture.port, "GET", "/readyz").0, 200);
    capture.clean_up(&admin).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkills_mid_snapshot_and_mid_stream_lose_and_repeat_nothing() {
    let Some(mut capture) = Capture::new("cdc-kill").await else {
        return;
    };
    let admin = capture.pg.admin().await;
    let rows = 40_000;
    capture.create_table(rows).await;
    capture.create_topic(4).await;
    let writers = start_writers(&capture.pg, &capture.table, 3, rows).await;
    // Small chunks: the snapshot takes several seconds. The first kill lands
    // once some chunks are in (a restart then resumes a snapshot half done),
    // the next two anywhere.
    capture.start(200);
    capture.wait_for_chunks(2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    capture.kill();
    capture.start(200);
    let mut rng = Lcg(11);
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1500 + rng.below(1500))).await;
        capture.assert_running();
        capture.kill();
        capture.start(200);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, snapshot_rows) = finish(&mut capture, &admin, writers).await;
    assert!(
        snapshot_rows > 30_000,
        "{snapshot_rows} snapshot rows of {rows}"
    );
    // A restart resumed a snapshot half done: the kills hit it.
    let logs = capture.logs();
    assert!(
        logs.lines().any(|l| l.contains("capture starting")
            && l.contains("after: Some(")
            && l.contains("done: false")),
        "no instance started in the middle of the snapshot\n{logs}"
    );
    capture.clean_up(&admin).await;
}
