//! The PostgreSQL sample (`config/samples/orders-from-postgres.yaml`) on the
//! cluster: the operator creates the capture topic and runs the capture pod
//! with the database credentials from a Secret; the table's snapshot and the
//! changes concurrent writers make reach the sink topic, whose last state per
//! order equals the table at the end.
//!
//! Needs `cargo build -p keystone-runtime` as well as the operator, and the
//! testbed's PostgreSQL.

mod operator_support;
mod runtime_support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use keystone_e2e::postgres::Postgres;
use keystone_e2e::wait_until;
use kube::Api;
use kube::api::ListParams;
use operator_support::capture::{CaptureSample, wait_slot_dropped};
use operator_support::*;
use serde_json::{Value, json};

const ROWS: i64 = 3_000;

/// The table's rows as the pipeline's `current-state` step renders them.
async fn table_states(db: &tokio_postgres::Client, table: &str) -> BTreeMap<i64, Value> {
    db.query(&format!("SELECT id, status, amount::text FROM {table}"), &[])
        .await
        .expect("select")
        .iter()
        .map(|r| {
            let id: i64 = r.get(0);
            let state = json!({"status": r.get::<_, Option<String>>(1), "amount": r.get::<_, Option<String>>(2)});
            (id, state)
        })
        .collect()
}

/// The last state per id in the sink topic (deleted ids absent), and
/// whether each id's `seq` only grew.
fn sink_states(
    records: &[(String, String, BTreeMap<String, String>)],
) -> (BTreeMap<i64, Value>, bool) {
    let mut last: BTreeMap<i64, Value> = BTreeMap::new();
    let mut ordered = true;
    for (_, value, _) in records {
        let Ok(event) = serde_json::from_str::<Value>(value) else {
            continue;
        };
        let Some(id) = event["id"].as_i64() else {
            continue;
        };
        if let Some(previous) = last.get(&id) {
            ordered &= event["seq"].as_u64() > previous["seq"].as_u64();
        }
        last.insert(id, event);
    }
    let states = last
        .into_iter()
        .filter(|(_, e)| e["op"] != "d")
        .map(|(id, e)| (id, json!({"status": e["status"], "amount": e["amount"]})))
        .collect();
    (states, ordered)
}

#[tokio::test]
async fn the_postgres_sample_captures_a_table_into_its_pipeline_on_the_cluster() {
    let Some(pg) = Postgres::require() else {
        return;
    };
    let tb = testbed().await;
    require_runtime_binary();
    install_crds(&tb);
    let ns = pipeline_namespace(&tb, "op-capture").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let operator = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "op-capture");

    let sample = CaptureSample::create(
        &pg,
        &ns,
        "id bigint PRIMARY KEY, status text, amount numeric(10,2)",
        "SELECT g, 'created', g * 1.5",
        ROWS,
        "\n      snapshot: {chunkSize: 500}",
    )
    .await;
    let (table, source, states, password) = (
        sample.table.clone(),
        sample.source.clone(),
        sample.states.clone(),
        sample.password.clone(),
    );
    let db = pg.admin().await;
    let manifest = sample.manifest.clone();
    apply_yaml(&tb, &manifest).await;
    wait_ready(&ns, "orders-from-postgres", &operator).await;
    // The snapshot's progress reaches the status.
    let status = keystone_e2e::wait_for(
        &ns.api::<keystone_crds::Pipeline>(),
        "orders-from-postgres",
        Duration::from_secs(60),
        "status.capture with the snapshot done",
        |p| {
            p.status
                .as_ref()
                .and_then(|s| s.capture.as_ref())
                .is_some_and(|c| c.snapshot_done && c.snapshot_rows == ROWS)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    let capture_status = status.status.unwrap().capture.unwrap();
    assert!(capture_status.snapshot_chunks >= 6, "{capture_status:?}");
    assert!(
        capture_status.last_commit_time.is_some(),
        "{capture_status:?}"
    );

    // The operator created the capture topic, and the capture's credentials
    // reach its pod from the Secret, never through the plan.
    assert!(
        Kafka::new(&tb).exists(&source),
        "the capture topic was not created"
    );
    let deployments: Api<Deployment> = ns.api();
    let capture = deployments
        .get("orders-from-postgres-capture")
        .await
        .expect("the capture's Deployment");
    let rendered = serde_json::to_string(&capture).expect("JSON");
    assert!(
        rendered.contains("secretKeyRef") && rendered.contains("shop-db"),
        "{rendered}"
    );
    assert!(rendered.contains("\"capture\""), "{rendered}");
    let config_maps: Api<ConfigMap> = ns.api();
    let mut plans_with_columns = 0;
    for config_map in config_maps
        .list(&ListParams::default())
        .await
        .expect("ConfigMaps")
    {
        let text = serde_json::to_string(&config_map.data).expect("JSON");
        assert!(
            !text.contains(&password),
            "a ConfigMap holds the database password"
        );
        plans_with_columns += usize::from(text.contains("after.amount"));
    }
    // The sample declares only the key: the columns came from the table.
    assert!(
        plans_with_columns > 0,
        "no plan has the table's columns in its source schema"
    );

    // Changes while the pipeline runs: updates, deletes and inserts.
    for round in 0..30_i64 {
        db.batch_execute(&format!(
            "UPDATE {table} SET status = 'paid-{round}', amount = amount + 1 WHERE id % 30 = {round};
             DELETE FROM {table} WHERE id = {};
             INSERT INTO {table} VALUES ({}, 'new', 9.99);",
            round * 97 + 5,
            ROWS + round + 1,
        ))
        .await
        .expect("a change");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let expected = table_states(&db, &table).await;
    let bootstrap = tb.kafka_bootstrap_servers().expect("kafka").to_owned();
    let read_sink = || {
        let records = runtime_support::read_committed(
            &bootstrap,
            &states,
            1,
            Duration::from_secs(20),
            Duration::from_secs(1),
        );
        sink_states(&records)
    };
    let result = wait_until(
        Duration::from_secs(120),
        "the sink topic's last state per order equals the table",
        || async {
            let (states, ordered) = read_sink();
            (states == expected).then_some(ordered)
        },
        || async {
            let (states, _) = read_sink();
            let differing: Vec<_> = expected
                .iter()
                .filter(|(id, state)| states.get(id) != Some(state))
                .take(5)
                .collect();
            format!(
                "{} of {} rows in the topic; first differing rows: {differing:?}",
                states.len(),
                expected.len()
            )
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    assert!(result, "an order's seq went backwards in the sink topic");

    // topicDeletionPolicy: Delete: the capture drops its slot, which would
    // otherwise keep WAL forever, when the operator asks it to.
    ns.api::<keystone_crds::Pipeline>()
        .delete("orders-from-postgres", &kube::api::DeleteParams::default())
        .await
        .expect("delete the pipeline");
    wait_slot_dropped(&db, &sample.slot, &operator).await;
    ns.delete().await.expect("delete namespace");
    sample.clean_up(&db, &pg).await;
}
