//! The clickstream sample, `config/samples/clickstream-etl.yaml`, on the
//! cluster: the operator deploys it, the runtime pods write its Iceberg table
//! through the testbed's REST catalog and its Parquet tree to the testbed's
//! S3-compatible store with the keys of a Secret, and independent readers
//! (pyiceberg, pyarrow) find each kept click once: in the table, and in its
//! `action=` and `date=` folders.
//!
//! Needs `cargo build -p keystone-runtime` as well as the operator, and the
//! testbed's lake.

mod operator_support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use keystone_crds::Pipeline;
use keystone_e2e::lake::Lake;
use keystone_e2e::{wait_for, wait_until};
use kube::Api;
use operator_support::*;
use serde_json::Value;

/// The clicks the sample keeps (real users' views and purchases), by
/// (user, time), with the folder values the lake must put them in.
fn reference(input: &str) -> BTreeMap<(String, i64), Value> {
    let mut kept = BTreeMap::new();
    for line in input.lines() {
        let click: Value = serde_json::from_str(line).expect("the sample's clicks are JSON");
        let action = click["action"].as_str().unwrap_or_default();
        if click["user"]["bot"] == Value::Bool(true) || !["view", "purchase"].contains(&action) {
            continue;
        }
        let ts = click["ts"].as_i64().expect("ts");
        let date = chrono::DateTime::from_timestamp_millis(ts)
            .expect("a time")
            .format("%Y-%m-%d")
            .to_string();
        let user = click["user"]["id"].as_str().expect("user.id").to_owned();
        kept.insert(
            (user.clone(), ts),
            serde_json::json!({
                "user_id": user,
                "session_id": click["session_id"],
                "action": action,
                "page": click["page"],
                "ts": ts,
                "price": click["price"],
                "epoch_day": ts / 86_400_000,
                "date": date,
            }),
        );
    }
    kept
}

#[tokio::test]
async fn the_clickstream_sample_lands_in_the_lake_on_the_cluster() {
    let tb = testbed().await;
    require_runtime_binary();
    install_crds(&tb);
    // The sample's warehouse is s3://keystone/warehouse, the testbed's S3 catalog's.
    let lake = Lake::from_env().with_s3_warehouse();
    let ns = pipeline_namespace(&tb, "op-lake").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let operator = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "op-lake");
    let kafka = Kafka::new(&tb);

    // The sample as a user would apply it, pointed at this testbed: its own
    // topics and lake prefix, the store's endpoint and keys in the Secret.
    let source = unique("e2e.web.clicks");
    let clean = format!("{source}.clean");
    let prefix = unique("clickstream").replace('.', "-");
    let table = unique("clicks").replace(['.', '-'], "_");
    kafka.create(&source, 3).await;
    let secret_key = "lake-secret-never-in-the-plan";
    create_secret(
        &ns,
        "lake-s3",
        &[
            ("endpoint", &lake.endpoint),
            ("accessKeyId", "keystone"),
            ("secretAccessKey", secret_key),
        ],
    )
    .await;
    let sample = std::fs::read_to_string(repo().join("config/samples/clickstream-etl.yaml"))
        .expect("the sample");
    let manifest = sample
        .replace("namespace: default", &format!("namespace: {}", ns.name()))
        .replace("topic: web.clicks.clean", &format!("topic: {clean}"))
        .replace("topic: web.clicks", &format!("topic: {source}"))
        .replace("s3://keystone/clickstream", &lake.url(&prefix))
        .replace("http://iceberg-rest.lake.svc:8181", &lake.catalog)
        .replace("table: clicks", &format!("table: {table}"))
        .replace("commitInterval: 1m", "commitInterval: 2s")
        .replace(
            "commitInterval: 10s",
            "commitInterval: 500ms\n  topicDeletionPolicy: Delete",
        )
        .replace("parallelism: 3", "parallelism: 2");
    assert!(manifest.contains(&lake.url(&prefix)), "{manifest}");
    assert!(manifest.contains(&lake.warehouse), "{manifest}");
    apply_yaml(&tb, &manifest).await;

    wait_ready(&ns, "clickstream-etl", &operator).await;

    // The keys reach the pods as Secret references, never through the plan.
    let deployments: Api<Deployment> = ns.api();
    let deployment = deployments
        .get("clickstream-etl-s0")
        .await
        .expect("the stage's Deployment");
    let rendered = serde_json::to_string(&deployment).expect("JSON");
    assert!(
        rendered.contains("KEYSTONE_SINK_LAKE_SECRET_ACCESS_KEY") && rendered.contains("lake-s3"),
        "{rendered}"
    );
    assert!(!rendered.contains(secret_key), "{rendered}");

    let input = std::fs::read_to_string(repo().join("config/samples/data/clicks.jsonl"))
        .expect("the sample data");
    produce_lines(&tb, &source, &input, |line| {
        let click: Value = serde_json::from_str(line).expect("JSON");
        click["session_id"].as_str().unwrap_or_default().to_owned()
    })
    .await;

    let expected = reference(&input);
    assert_eq!(expected.len(), 28, "the sample keeps 28 clicks");
    let rows = wait_until(
        Duration::from_secs(120),
        "the lake holds every kept click",
        || async {
            let rows = lake.rows(&prefix);
            (rows.len() >= expected.len()).then_some(rows)
        },
        || async { format!("{} rows so far", lake.rows(&prefix).len()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    assert_eq!(rows.len(), expected.len(), "each click once: {rows:?}");
    for row in rows {
        let key = (
            row["user_id"].as_str().expect("user_id").to_owned(),
            row["ts"].as_i64().expect("ts"),
        );
        let want = expected
            .get(&key)
            .unwrap_or_else(|| panic!("{row} is not a kept click"));
        for field in [
            "session_id",
            "action",
            "page",
            "ts",
            "price",
            "epoch_day",
            "date",
        ] {
            assert_eq!(row[field], want[field], "{field} of {row}");
        }
    }

    // The table: every kept click once, its values as the contract types them.
    let table = format!("web.{table}");
    let rows = wait_until(
        Duration::from_secs(120),
        "the Iceberg table holds every kept click",
        || async {
            let rows = lake.iceberg_rows(&table).ok()?;
            (rows.len() >= expected.len()).then_some(rows)
        },
        || async { format!("{:?}", lake.iceberg_rows(&table).map(|r| r.len())) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    assert_eq!(rows.len(), expected.len(), "each click once: {rows:?}");
    for row in &rows {
        let key = (
            row["user_id"].as_str().expect("user_id").to_owned(),
            row["ts"].as_i64().expect("ts"),
        );
        let want = expected
            .get(&key)
            .unwrap_or_else(|| panic!("{row} is not a kept click"));
        for field in ["session_id", "action", "page", "ts", "price", "epoch_day"] {
            assert_eq!(row[field], want[field], "{field} of {row}");
        }
        let at = chrono::DateTime::parse_from_rfc3339(row["at"].as_str().expect("at"))
            .expect("at is a timestamp");
        assert_eq!(at.timestamp_millis(), key.1, "{row}");
    }
    let snapshots = lake.iceberg_snapshots(&table).expect("snapshots");
    assert!(
        snapshots.iter().all(|s| s["summary"]["keystone.pipeline"]
            .as_str()
            .is_some_and(|p| p.contains("clickstream-etl"))),
        "every snapshot names the pipeline: {snapshots:?}"
    );
    ns.delete().await.expect("delete namespace");
}

/// An Iceberg table made by other tooling whose schema cannot take the
/// pipeline's rows is refused before anything is deployed, with a condition
/// naming the sink, the table and the column; once the table is gone, the
/// operator's own recheck (no Kubernetes change) deploys the pipeline and its
/// sink creates the table from the contract.
#[tokio::test]
async fn an_existing_table_that_cannot_take_the_contract_is_refused_before_deploy() {
    let tb = testbed().await;
    require_runtime_binary();
    install_crds(&tb);
    let lake = Lake::from_env();
    let ns = pipeline_namespace(&tb, "op-table").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let operator = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "op-table");
    let kafka = Kafka::new(&tb);
    let source = unique("e2e.orders");
    kafka.create(&source, 1).await;
    let name = unique("t").replace(['.', '-'], "_");
    let table = format!("e2e_check.{name}");
    lake.create_iceberg_table(&table, &["id:string:required", "amount:string"])
        .expect("create the other tooling's table");

    let manifest = format!(
        r#"apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata:
  name: orders-lake
  namespace: {ns}
spec:
  topicDeletionPolicy: Delete
  source:
    topic: {source}
    key: [id]
    schema:
      fields:
        - {{name: id, type: string}}
        - {{name: amount, type: number, optional: true}}
  sinks:
    - name: warehouse
      iceberg:
        catalog:
          type: rest
          uri: {catalog}
          warehouse: {warehouse}
        namespace: e2e_check
        table: {name}
        commitInterval: 2s
"#,
        ns = ns.name(),
        catalog = lake.catalog,
        warehouse = lake.warehouse,
    );
    apply_yaml(&tb, &manifest).await;
    let pipelines: Api<Pipeline> = ns.api();
    let refused = wait_for(
        &pipelines,
        "orders-lake",
        Duration::from_secs(90),
        "ContractsValid=False TableIncompatible",
        |p| {
            condition_is(p, "ContractsValid", "False")
                && condition(p, "ContractsValid").is_some_and(|c| c.reason == "TableIncompatible")
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    let message = &condition(&refused, "ContractsValid")
        .expect("condition")
        .message;
    assert_eq!(
        message,
        &format!(
            "sink warehouse: table {table} cannot take the output contract's rows: column amount is string in the table, but the output contract makes it double"
        )
    );
    let deployments: Api<Deployment> = ns.api();
    let deployed = deployments
        .list(&Default::default())
        .await
        .expect("list Deployments");
    assert!(
        deployed.items.is_empty(),
        "nothing is deployed for a table that cannot take the rows: {:?}",
        deployed
            .items
            .iter()
            .map(|d| &d.metadata.name)
            .collect::<Vec<_>>()
    );

    // The table is dropped behind Kubernetes' back: the recheck finds it gone.
    lake.drop_iceberg_table(&table).expect("drop the table");
    let ready = wait_ready(&ns, "orders-lake", &operator).await;
    let message = &condition(&ready, "ContractsValid")
        .expect("condition")
        .message;
    assert!(
        message.contains(&format!("sink warehouse: table {table} does not exist yet"))
            || message.contains(&format!(
                "sink warehouse: table {table} takes the contract's rows"
            )),
        "{message}"
    );
    // The sink made the table from the contract: amount is a double now.
    wait_until(
        Duration::from_secs(60),
        "the sink creates the table",
        || async { lake.iceberg_snapshots(&table).ok() },
        || async { format!("{:?}", lake.iceberg_snapshots(&table)) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    ns.delete().await.expect("delete namespace");
}
