//! Keystone's capture (`envelope: debezium`) against Debezium's PostgreSQL
//! connector as a reference, on the same table of the testbed's PostgreSQL:
//! each on its own slot and publication, both started (and their snapshots
//! done) before concurrent writers, both caught up after them. The final
//! state of every row must be the same in both topics and equal the table,
//! and every row's sequence of states must be the same once Debezium's
//! changes of one row within one transaction are collapsed into the last one
//! (Keystone emits one event per row per transaction: its net change).
//!
//! Needs `target/debug/keystone-runtime`, a testbed with Kafka and
//! PostgreSQL, Java 17 and Maven (Kafka Connect and the connector come from
//! `e2e/testbed.d/debezium.sh ensure`, cached; `e2e/testbed up` installs them).

mod capture_support;
mod runtime_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use capture_support::{Capture, Writers, create_topics, drop_slot, table_rows};
use keystone_e2e::debezium::{Debezium, DebeziumConfig};
use keystone_e2e::postgres::Postgres;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use runtime_support::{Lcg, unique};
use serde_json::{Value, json};

/// Rows in the table before the captures start (their snapshots).
const INITIAL_ROWS: i64 = 3_000;
/// The row inserted after the writers stop: once a topic holds it, it holds
/// everything before it (one partition, commit order).
const SENTINEL: i64 = 0;

/// A topic's records from the beginning, read_committed: (key, value), the
/// value `None` for a tombstone.
struct TopicReader {
    consumer: BaseConsumer,
    topic: String,
    records: Vec<(Value, Option<Value>)>,
}

impl TopicReader {
    fn new(bootstrap: &str, topic: &str) -> TopicReader {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", unique("e2e-dbz-reader"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        TopicReader {
            consumer,
            topic: topic.to_owned(),
            records: Vec::new(),
        }
    }

    /// Reads until `done` holds for a record read (it sees each once);
    /// panics after `within` (with `context`: the processes' logs).
    fn read_until(
        &mut self,
        within: Duration,
        what: &str,
        context: &dyn Fn() -> String,
        mut done: impl FnMut(&(Value, Option<Value>)) -> bool,
    ) {
        let deadline = Instant::now() + within;
        loop {
            assert!(
                Instant::now() < deadline,
                "{}: no {what} within {within:?} ({} records read)\n{}",
                self.topic,
                self.records.len(),
                context()
            );
            if let Some(message) = self.consumer.poll(Duration::from_millis(100)) {
                let message = message.unwrap();
                let key = serde_json::from_slice(message.key().unwrap_or_default())
                    .unwrap_or_else(|e| panic!("{}: a key that is not JSON: {e}", self.topic));
                let value = message.payload().map(|v| {
                    serde_json::from_slice(v)
                        .unwrap_or_else(|e| panic!("{}: a value that is not JSON: {e}", self.topic))
                });
                let record = (key, value);
                let finished = done(&record);
                self.records.push(record);
                if finished {
                    return;
                }
            }
        }
    }
}

fn is_snapshot_row((_, value): &(Value, Option<Value>)) -> bool {
    value.as_ref().is_some_and(|v| v["op"] == "r")
}

fn is_sentinel((key, value): &(Value, Option<Value>)) -> bool {
    key["id"] == SENTINEL && value.as_ref().is_some_and(|v| v["after"].is_object())
}

/// A `read_until` condition: `count` snapshot rows read.
fn snapshot_rows(count: i64) -> impl FnMut(&(Value, Option<Value>)) -> bool {
    let mut seen = 0;
    move |record| {
        seen += i64::from(is_snapshot_row(record));
        seen >= count
    }
}

/// Each row's states (`after`; `Null` for a delete), in topic order.
/// Tombstones are skipped; with `collapse`, consecutive events of a row with
/// the same `source.txId` count as their last one. A delete of a row that was
/// absent (inserted and deleted within one transaction) is no state.
fn states(records: &[(Value, Option<Value>)], collapse: bool) -> BTreeMap<i64, Vec<Value>> {
    let mut by_row: BTreeMap<i64, Vec<(Option<u64>, Value)>> = BTreeMap::new();
    for (key, value) in records {
        let Some(value) = value else { continue };
        let id = key["id"]
            .as_i64()
            .unwrap_or_else(|| panic!("no id in the key {key}"));
        let txid = value["source"]["txId"].as_u64();
        let after = value["after"].clone();
        let row = by_row.entry(id).or_default();
        match row.last_mut() {
            Some(last) if collapse && txid.is_some() && last.0 == txid => last.1 = after,
            _ => row.push((txid, after)),
        }
    }
    by_row
        .into_iter()
        .map(|(id, row)| {
            let mut states: Vec<Value> = Vec::new();
            for (_, after) in row {
                let absent = states.last().is_none_or(Value::is_null);
                if !(after.is_null() && absent) {
                    states.push(after);
                }
            }
            (id, states)
        })
        .filter(|(_, states)| !states.is_empty())
        .collect()
}

/// Each row's last state, deleted rows left out.
fn final_rows(states: &BTreeMap<i64, Vec<Value>>) -> BTreeMap<i64, Value> {
    states
        .iter()
        .filter_map(|(id, s)| s.last().filter(|v| !v.is_null()).map(|v| (*id, v.clone())))
        .collect()
}

/// Writers until stopped, each transaction on one to three rows: updates
/// (some twice), deletes (some after an update), inserts of new rows (some
/// then updated or deleted in the same transaction).
async fn start_writers(pg: &Postgres, table: &str, count: u64) -> Writers {
    let table = table.to_owned();
    Writers::start(pg, count, |writer| {
        let t = table.clone();
        let mut rng = Lcg(writer * 104_729 + 7);
        let mut next_new = 1_000_000 * (writer as i64 + 1);
        let update_table = t.clone();
        let update = move |id: i64| {
            format!("UPDATE {update_table} SET version = version + 1, amount = amount + 0.01, note = 'w{writer}' WHERE id = {id}")
        };
        move || {
            let mut statements = Vec::new();
            let mut ids = Vec::new();
            for _ in 0..=rng.below(3) {
                let id = 1 + rng.below(INITIAL_ROWS as u64) as i64;
                if ids.contains(&id) {
                    continue;
                }
                ids.push(id);
                match rng.below(20) {
                    0 => statements.push(format!("DELETE FROM {t} WHERE id = {id}")),
                    1 => {
                        statements.push(update(id));
                        statements.push(format!("DELETE FROM {t} WHERE id = {id}"));
                    }
                    2 | 3 => {
                        statements.push(update(id));
                        statements.push(update(id));
                    }
                    4..=7 => {
                        next_new += 1;
                        statements.push(format!(
                            "INSERT INTO {t} (id, account, version, amount, note) VALUES ({next_new}, {}, 0, 1.25, 'new')",
                            rng.below(100)
                        ));
                        match rng.below(4) {
                            0 => statements.push(update(next_new)),
                            1 if rng.below(4) == 0 => statements
                                .push(format!("DELETE FROM {t} WHERE id = {next_new}")),
                            _ => {}
                        }
                    }
                    _ => statements.push(update(id)),
                }
            }
            statements
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn keystone_and_debezium_capture_the_same_changes_of_concurrent_writers() {
    let Some(mut keystone) = Capture::new("cdc-dbz").await else {
        return;
    };
    let started = Instant::now();
    let (pg, bootstrap) = (keystone.pg.clone(), keystone.bootstrap.clone());
    let (name, table, dir) = (
        keystone.name.clone(),
        keystone.table.clone(),
        keystone.dir.clone(),
    );
    let (dbz_slot, dbz_publication) = (format!("{name}_dbz"), format!("{name}_dbz"));
    let dbz_config = DebeziumConfig {
        // Quicker to start (C1 only, serial GC); a few thousand events.
        jvm_options: ["-Xmx512m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"]
            .map(String::from)
            .to_vec(),
        ..DebeziumConfig::new(&name, &dbz_slot, &dbz_publication, &table, "dbz")
    };
    let dbz_topic = dbz_config.topic(&table);

    let admin = pg.admin().await;
    keystone.create_table(INITIAL_ROWS).await;
    admin
        .batch_execute(&format!(
            "CREATE PUBLICATION {dbz_publication} FOR TABLE {table}"
        ))
        .await
        .unwrap();
    create_topics(&bootstrap, &[&keystone.topic, &dbz_topic], 1).await;

    // Debezium first: its JVM takes 10-20 s to start.
    let mut debezium = Debezium::start(&pg, &bootstrap, &dir, &dbz_config)
        .unwrap_or_else(|e| panic!("Debezium (Kafka Connect) could not start: {e:#}"));
    keystone.start_with(
        4096,
        json!({"envelope": "debezium", "decimalHandling": "string"}),
    );
    debezium
        .wait_running(Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let running_s = started.elapsed().as_secs_f64();
    keystone.assert_running();

    // Both snapshots whole before the writers: a snapshot read while rows
    // change holds other states (DBLog's chunks are read later than
    // Debezium's exported snapshot), which only the final state would match.
    let mut ks_reader = TopicReader::new(&bootstrap, &keystone.topic);
    let mut dbz_reader = TopicReader::new(&bootstrap, &dbz_topic);
    let ks_log = keystone.log_path();
    let ks_logs = move || std::fs::read_to_string(&ks_log).unwrap_or_default();
    ks_reader.read_until(
        Duration::from_secs(60),
        "whole snapshot",
        &ks_logs,
        snapshot_rows(INITIAL_ROWS),
    );
    let dbz_log = debezium.log.clone();
    let dbz_logs = move || std::fs::read_to_string(&dbz_log).unwrap_or_default();
    dbz_reader.read_until(
        Duration::from_secs(60),
        "whole snapshot",
        &dbz_logs,
        snapshot_rows(INITIAL_ROWS),
    );
    let snapshots_s = started.elapsed().as_secs_f64();
    let writers = start_writers(&pg, &table, 3).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let transactions = writers.stop().await;
    assert!(
        transactions > 100,
        "the writers committed only {transactions} transactions"
    );
    keystone.assert_running();
    debezium.check_running().unwrap_or_else(|e| panic!("{e:#}"));
    pg.connect()
        .await
        .batch_execute(&format!(
            "INSERT INTO {table} (id, account, version, amount, note) VALUES ({SENTINEL}, 0, 0, 0, 'end')"
        ))
        .await
        .unwrap();
    ks_reader.read_until(
        Duration::from_secs(60),
        "sentinel row",
        &ks_logs,
        is_sentinel,
    );
    dbz_reader.read_until(
        Duration::from_secs(60),
        "sentinel row",
        &dbz_logs,
        is_sentinel,
    );
    let caught_up_s = started.elapsed().as_secs_f64();
    let expected = table_rows(&admin, &table).await;
    let ks_states = states(&ks_reader.records, false);
    let dbz_states = states(&dbz_reader.records, true);
    let ks_final = final_rows(&ks_states);
    let dbz_final = final_rows(&dbz_states);
    let diff = |a: &BTreeMap<i64, Value>, b: &BTreeMap<i64, Value>| -> Vec<String> {
        a.keys()
            .chain(b.keys())
            .filter(|id| a.get(id) != b.get(id))
            .take(5)
            .map(|id| format!("row {id}: {:?} vs {:?}", a.get(id), b.get(id)))
            .collect()
    };
    assert_eq!(
        ks_final.len(),
        expected.len(),
        "Keystone's final rows differ from the table: {:?}",
        diff(&ks_final, &expected)
    );
    assert!(
        ks_final == expected,
        "Keystone's final rows differ from the table: {:?}",
        diff(&ks_final, &expected)
    );
    assert!(
        dbz_final == expected,
        "Debezium's final rows differ from the table: {:?}",
        diff(&dbz_final, &expected)
    );
    // Keystone never emits two events of one row in one transaction.
    let ks_collapsed = states(&ks_reader.records, true);
    assert_eq!(
        ks_collapsed, ks_states,
        "Keystone emitted two events of one row in one transaction"
    );
    let differing: Vec<String> = ks_states
        .keys()
        .chain(dbz_states.keys())
        .filter(|id| ks_states.get(id) != dbz_states.get(id))
        .take(3)
        .map(|id| {
            format!(
                "row {id}:\n  keystone {:?}\n  debezium {:?}",
                ks_states.get(id),
                dbz_states.get(id)
            )
        })
        .collect();
    assert!(
        differing.is_empty(),
        "rows whose states differ between Keystone and Debezium (collapsed by transaction):\n{}",
        differing.join("\n")
    );
    let changed = ks_states.values().filter(|s| s.len() > 1).count();
    assert!(
        changed > 100,
        "only {changed} rows changed after the snapshot"
    );
    eprintln!(
        "{transactions} transactions; {} Keystone events, {} Debezium records; {} rows, {changed} changed; \
         Debezium's task running at {running_s:.1} s, both snapshots read at {snapshots_s:.1} s, \
         both caught up at {caught_up_s:.1} s, checked at {:.1} s",
        ks_reader.records.len(),
        dbz_reader.records.len(),
        expected.len(),
        started.elapsed().as_secs_f64()
    );

    debezium.stop();
    keystone.clean_up(&admin).await;
    drop_slot(&admin, &dbz_slot).await;
    admin
        .batch_execute(&format!("DROP PUBLICATION IF EXISTS {dbz_publication}"))
        .await
        .unwrap();
}
