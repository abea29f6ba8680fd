//! A snapshot raced by transactions that are in the log but not yet visible,
//! against the testbed's real PostgreSQL and Kafka.
//!
//! A transaction writes its commit record before other sessions can see it;
//! with a synchronous standby named that never connects, it stays in between
//! (waiting for the standby) for as long as the test likes, while logical
//! decoding already streams it. A chunk's select then misses changes that
//! the capture has captured, or will capture before the chunk's watermarks:
//! the snapshot rows must not follow those events with older values.
//!
//! The standby setting is server-wide, so this test has a binary of its own
//! (cargo runs test binaries one at a time), every other session commits
//! with `synchronous_commit = local` meanwhile, and both settings are reset
//! when the test ends, passing or not.

mod capture_support;
mod runtime_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use capture_support::{Capture, table_rows};
use keystone_e2e::postgres::Postgres;
use runtime_support::{http_request, metric_value, read_committed};
use serde_json::{Value, json};

/// Makes commits wait for a standby that never comes, for sessions that ask
/// for `synchronous_commit = on`; undone when dropped.
struct UnreachableStandby {
    pg: Postgres,
}

impl UnreachableStandby {
    async fn install(pg: &Postgres) -> UnreachableStandby {
        let guard = UnreachableStandby { pg: pg.clone() };
        let admin = pg.admin().await;
        // One statement at a time: ALTER SYSTEM refuses a transaction block.
        for statement in [
            "ALTER SYSTEM SET synchronous_commit = 'local'",
            "ALTER SYSTEM SET synchronous_standby_names = 'keystone_test_never_connects'",
            "SELECT pg_reload_conf()",
        ] {
            admin
                .batch_execute(statement)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e:?}"));
        }
        guard
    }

    async fn reset(admin: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
        for statement in [
            "ALTER SYSTEM RESET synchronous_standby_names",
            "ALTER SYSTEM RESET synchronous_commit",
            "SELECT pg_reload_conf()",
        ] {
            admin.batch_execute(statement).await?;
        }
        Ok(())
    }
}

impl Drop for UnreachableStandby {
    fn drop(&mut self) {
        let pg = self.pg.clone();
        // Drop cannot await: a thread with a runtime of its own does it.
        let reset = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(async move { UnreachableStandby::reset(&pg.admin().await).await })
        });
        if let Ok(Err(e)) = reset.join() {
            eprintln!("resetting synchronous_standby_names: {e:?}");
        }
    }
}

/// Starts a transaction updating row `id` that commits into the log and then
/// waits for the standby, invisible to everyone else; returns once the
/// server shows it waiting.
async fn stuck_update(
    pg: &Postgres,
    admin: &tokio_postgres::Client,
    table: &str,
    id: i64,
) -> tokio::task::JoinHandle<()> {
    let client = pg.connect().await;
    let application = format!("keystone-stuck-{id}");
    client
        .batch_execute(&format!(
            "SET synchronous_commit = on; SET application_name = '{application}'"
        ))
        .await
        .unwrap();
    let update =
        format!("UPDATE {table} SET version = version + 1, note = 'stuck' WHERE id = {id}");
    let task = tokio::spawn(async move {
        client
            .batch_execute(&update)
            .await
            .expect("the stuck update");
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: Option<String> = admin
            .query_opt(
                "SELECT wait_event FROM pg_stat_activity WHERE application_name = $1",
                &[&application],
            )
            .await
            .unwrap()
            .and_then(|row| row.get(0));
        if waiting.as_deref() == Some("SyncRep") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the update of row {id} is not waiting for the standby (wait event {waiting:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let note: String = admin
        .query_one(&format!("SELECT note FROM {table} WHERE id = {id}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(note, "initial", "row {id}: the waiting update is visible");
    task
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_rows_never_follow_changes_committed_but_not_yet_visible() {
    let Some(mut capture) = Capture::new("cdc-vis").await else {
        return;
    };
    let admin = capture.pg.admin().await;
    capture.create_table(10).await;
    capture.create_topic(1).await;
    // The slot first: making one waits for every running transaction.
    capture.start_with(5, json!({"snapshot": {"mode": "never", "chunkSize": 5}}));
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_request(capture.port, "GET", "/readyz").0 != 200 {
        capture.assert_running();
        assert!(
            Instant::now() < deadline,
            "the capture is not streaming\n{}",
            capture.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    capture.kill();

    let standby = UnreachableStandby::install(&capture.pg).await;
    // Row 2 is in the first chunk, row 8 in the second.
    let stuck = [
        stuck_update(&capture.pg, &admin, &capture.table, 2).await,
        stuck_update(&capture.pg, &admin, &capture.table, 8).await,
    ];
    // A snapshot of two chunks of five. The first chunk's select misses both
    // updates, which the log carries before its low watermark; the second
    // finds them already captured and still invisible, and waits.
    capture.start_with(
        5,
        json!({"snapshot": {"mode": "never", "chunkSize": 5, "trigger": "visibility"}}),
    );
    capture.wait_for_chunks(1).await;
    capture
        .wait_for_metric("keystone_capture_snapshot_chunk_retries_total", 3.0)
        .await;
    let (_, metrics) = http_request(capture.port, "GET", "/metrics");
    assert_eq!(
        metric_value(&metrics, "keystone_capture_snapshot_chunks_total"),
        Some(1.0),
        "the second chunk went on while a captured change was invisible\n{metrics}"
    );

    UnreachableStandby::reset(&admin).await.expect("reset");
    for task in stuck {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the stuck updates commit once no standby is named")
            .unwrap();
    }
    drop(standby);
    capture.wait_snapshot_done().await;
    capture.wait_caught_up(&admin).await;

    // Each row's events: the snapshot's row, if any, never older than a
    // change before it, and the last event equal to the table.
    let records = read_committed(
        &capture.bootstrap,
        &capture.topic,
        1,
        Duration::from_secs(60),
        Duration::from_secs(3),
    );
    let mut events: BTreeMap<i64, Vec<Value>> = BTreeMap::new();
    for (_, value, _) in &records {
        let event: Value = serde_json::from_str(value).unwrap();
        events
            .entry(event["id"].as_i64().expect("id"))
            .or_default()
            .push(event);
    }
    let logs = capture.logs();
    for (id, row_events) in &events {
        let versions: Vec<_> = row_events
            .iter()
            .map(|e| (e["op"].clone(), e["after"]["version"].clone()))
            .collect();
        for pair in row_events.windows(2) {
            assert!(
                pair[1]["after"]["version"].as_i64() >= pair[0]["after"]["version"].as_i64(),
                "row {id}: an older row after a newer one: {versions:?}\n{logs}"
            );
        }
    }
    let table = table_rows(&admin, &capture.table).await;
    assert_eq!(table.len(), 10);
    for (id, row) in &table {
        let last = events
            .get(id)
            .and_then(|e| e.last())
            .unwrap_or_else(|| panic!("row {id}: no event\n{logs}"));
        assert_eq!(&last["after"], row, "row {id}: last event {last}\n{logs}");
    }
    for id in [2, 8] {
        assert_eq!(table[&id]["note"], "stuck", "row {id}");
        assert_eq!(
            events[&id][0]["op"], "u",
            "row {id}: the log's update comes first"
        );
    }
    capture.clean_up(&admin).await;
}
