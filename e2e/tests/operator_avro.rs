//! Avro pipelines on the cluster, with the testbed's schema registry
//! (Apicurio's Confluent-compatible API, global rule BACKWARD):
//!
//! - a `format: avro` source is checked against the schema its producer
//!   (confluent-kafka's AvroSerializer) registered: a filter on a field the
//!   schema lacks is refused naming the field, the subject and the version;
//!   fixed, the pipeline runs and its Avro sink registers the schema derived
//!   from the output contract; every record read back with the registry's
//!   schema for its id, field by field;
//! - the producer registers a compatible v2 with a new optional field: the
//!   operator follows the subject's latest version and rolls it out as an
//!   upgrade, and the new field reaches the sink;
//! - an output change the subject's rule calls incompatible is refused
//!   before deploy, quoting the reason and naming the field, while the old
//!   version keeps running; a compatible one registers a new version;
//! - a reader schema written in the manifest (`source.avro.schema`) is the
//!   one the steps are checked against and records are read as: a filter on
//!   its optional field the registered schema lacks runs, and v1 records
//!   arrive with the field's default.
//!
//! Needs `cargo build -p keystone-runtime -p keystone-operator` and the
//! testbed with its registry.

mod avro_support;
mod operator_support;
mod runtime_support;

use std::time::Duration;

use avro_support::{
    CLICK_V1, Gate, click_v2, hex, python, registry, registry_address, serialized, var,
};
use k8s_openapi::api::core::v1::Service;
use keystone_avro::{AvroSchema, Shape, wire};
use keystone_crds::Pipeline;
use keystone_crds::pipeline::UpgradePhase;
use keystone_e2e::{Testbed, wait_for};
use kube::ResourceExt;
use kube::api::ListParams;
use operator_support::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

fn click(id: i64, referrer: bool) -> Value {
    let mut value = json!({"id": id, "user": format!("u{}", id % 7), "at": "2026-12-05T10:00:00Z"});
    if referrer {
        value["referrer"] = json!(format!("r{id}"));
    }
    value
}

async fn produce_bytes(tb: &Testbed, topic: &str, values: Vec<Vec<u8>>) {
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set(
            "bootstrap.servers",
            tb.kafka_bootstrap_servers().expect("kafka"),
        )
        .create()
        .expect("producer");
    for value in values {
        producer
            .send(
                FutureRecord::to(topic).key("k").payload(&value),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    }
}

/// The values of `topic`'s records, each decoded with the schema the
/// registry has for its id, sorted by `id`; waits for `expected` of them.
async fn read_avro(tb: &Testbed, topic: &str, expected: usize) -> Vec<Value> {
    let records = runtime_support::read_committed_bytes(
        tb.kafka_bootstrap_servers().expect("kafka"),
        topic,
        expected,
        Duration::from_secs(120),
        Duration::from_secs(2),
    );
    let registry = registry();
    let mut values = Vec::new();
    for (_, value, _) in records {
        let (id, datum) = wire::split(&value).expect("the wire format");
        let writer = registry.schema_by_id(id).await.expect("the writer schema");
        let shape = Shape::new(AvroSchema::clone(&writer)).expect("shape");
        values.push(keystone_avro::decode(id, datum, &writer, &shape).expect("decodes"));
    }
    values.sort_by_key(|v| v["id"].as_i64());
    values
}

fn clicks_pipeline(ns: &str, source: &str, filter: &str, registry: &str) -> String {
    format!(
        r#"apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata:
  name: clicks
  namespace: {ns}
spec:
  topicDeletionPolicy: Delete
  schemaRegistry:
    url: {registry}
  source:
    topic: {source}
    format: avro
  upgrade:
    healthWindow: 5s
  steps:
    - name: some
      filter: {{expression: "{filter}"}}
  sinks:
    - name: out
      kafka: {{topic: {source}.out, format: avro, key: [id], keyFormat: avro}}
"#
    )
}

fn condition_message(p: &Pipeline, type_: &str) -> String {
    condition(p, type_)
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn an_avro_source_is_checked_against_its_registered_schema_and_follows_new_versions() {
    let tb = testbed().await;
    require_runtime_binary();
    install_crds(&tb);
    let ns = pipeline_namespace(&tb, "op-avro").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let operator = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "op-avro");
    let kafka = Kafka::new(&tb);
    let source = unique("e2e.clicks");
    kafka.create(&source, 1).await;
    let subject = format!("{source}-value");
    // The operator and the pods reach the registry through a gate the test
    // can shut.
    let gate = Gate::start(registry_address().0);
    let url = gate.url();
    // The producer registers v1 under <topic>-value and writes with it.
    let v1: Vec<Value> = (0..30).map(|i| click(i, false)).collect();
    produce_bytes(&tb, &source, serialized(&source, CLICK_V1, &v1)).await;

    // A filter on a field producers do not send is refused before deploy.
    apply_yaml(
        &tb,
        &clicks_pipeline(ns.name(), &source, "referrer != null", &url),
    )
    .await;
    let pipelines = ns.api::<Pipeline>();
    let refused = wait_for(
        &pipelines,
        "clicks",
        Duration::from_secs(90),
        "ContractsValid=False",
        |p| condition_is(p, "ContractsValid", "False"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    let message = condition_message(&refused, "ContractsValid");
    assert!(message.contains("spec.steps[0] (some)"), "{message}");
    assert!(message.contains("\"referrer\""), "{message}");
    assert!(
        message.contains(&format!(
            "the source schema is the Avro schema {subject} version 1 (from the registry at {url}"
        )),
        "{message}"
    );

    // Fixed: it runs, and its sink registers the output contract's schema.
    apply_yaml(
        &tb,
        &clicks_pipeline(ns.name(), &source, "id % 3 != 0", &url),
    )
    .await;
    let ready = wait_ready(&ns, "clicks", &operator).await;
    let resolved = condition_message(&ready, "SchemaRegistryReady");
    assert!(
        resolved.contains(&format!("source reads {subject} version 1"))
            && resolved.contains(&format!(
                "sink \"out\" writes the output contract's schema under {source}.out-value"
            ))
            && resolved.contains(&format!(
                "sink \"out\" writes the key fields' schema under {source}.out-key"
            )),
        "{resolved}"
    );
    let out = format!("{source}.out");
    let expected: Vec<Value> = (0..30)
        .filter(|i| i % 3 != 0)
        .map(|i| click(i, false))
        .collect();
    assert_eq!(read_avro(&tb, &out, expected.len()).await, expected);
    // And by a consumer the project did not write: confluent-kafka's
    // AvroDeserializer, field by field (it prints timestamps as Python does).
    let records = runtime_support::read_committed_bytes(
        tb.kafka_bootstrap_servers().expect("kafka"),
        &out,
        expected.len(),
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    let framed: Vec<String> = records.iter().map(|(_, value, _)| hex(value)).collect();
    let mut by_python: Vec<Value> = python(&["deserialize", "--topic", &out], &framed)
        .iter()
        .map(|line| serde_json::from_str(line).expect("JSON"))
        .collect();
    // Keys (keyFormat: avro) too: each the record's id, as the schema
    // registered under <topic>-key (a long) has it.
    let framed_keys: Vec<String> = records.iter().map(|(key, _, _)| hex(key)).collect();
    let keys: Vec<Value> = python(&["deserialize", "--topic", &out, "--key"], &framed_keys)
        .iter()
        .map(|line| serde_json::from_str(line).expect("JSON"))
        .collect();
    let ids: Vec<Value> = by_python.iter().map(|v| v["id"].clone()).collect();
    assert_eq!(keys, ids, "each record keyed by its id, as Avro");
    let key_schema = registry()
        .version(&format!("{out}-key"), 1)
        .await
        .expect("the key schema registered under <topic>-key");
    assert_eq!(*key_schema.schema, AvroSchema::Long);
    by_python.sort_by_key(|v| v["id"].as_i64());
    let as_python: Vec<Value> = expected
        .iter()
        .map(|v| {
            let mut v = v.clone();
            v["at"] = json!("2026-12-05T10:00:00+00:00");
            v
        })
        .collect();
    assert_eq!(by_python, as_python);

    // The registry cut off: the condition says so; records of the writer
    // schema the stage knows flow on.
    gate.shut();
    wait_for(
        &pipelines,
        "clicks",
        Duration::from_secs(90),
        "SchemaRegistryReady=False RegistryUnavailable",
        |p| {
            condition(p, "SchemaRegistryReady")
                .is_some_and(|c| c.status == "False" && c.reason == "RegistryUnavailable")
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    let more: Vec<Value> = (100..110).map(|i| click(i, false)).collect();
    produce_bytes(&tb, &source, serialized(&source, CLICK_V1, &more)).await;
    let with_more: Vec<Value> = expected
        .iter()
        .cloned()
        .chain(
            more.into_iter()
                .filter(|c| c["id"].as_i64().is_some_and(|i| i % 3 != 0)),
        )
        .collect();
    assert_eq!(read_avro(&tb, &out, with_more.len()).await, with_more);
    // The operator goes on with the plan that runs meanwhile (the spec is
    // unchanged): a stage's Service deleted by hand is put back.
    let services = ns.api::<Service>();
    let selector = ListParams::default().labels("keystone.dev/pipeline=clicks");
    let deleted = services
        .list(&selector)
        .await
        .expect("services")
        .items
        .into_iter()
        .next()
        .expect("the stage's Service");
    let (service, old_uid) = (deleted.name_any(), deleted.uid());
    services
        .delete(&service, &Default::default())
        .await
        .expect("delete the Service");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let now = services.get_opt(&service).await.expect("get");
        if now.is_some_and(|s| s.uid() != old_uid) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the Service {service} was not put back while the registry was cut off\noperator log:\n{}",
            operator.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let cut_off = pipelines.get("clicks").await.expect("pipeline");
    assert_eq!(
        condition(&cut_off, "SchemaRegistryReady").map(|c| c.reason.as_str()),
        Some("RegistryUnavailable"),
        "still said while the registry is cut off"
    );
    gate.reopen();
    wait_for(
        &pipelines,
        "clicks",
        Duration::from_secs(90),
        "SchemaRegistryReady=True again",
        |p| condition_is(p, "SchemaRegistryReady", "True"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));

    // v2 registered: the operator reads with it after an upgrade.
    registry()
        .register(&subject, &click_v2())
        .await
        .expect("register v2");
    wait_for(
        &pipelines,
        "clicks",
        Duration::from_secs(180),
        "the upgrade to version 2 rolled out",
        |p| {
            condition_message(p, "SchemaRegistryReady")
                .contains(&format!("source reads {subject} version 2"))
                && p.status
                    .as_ref()
                    .and_then(|s| s.upgrade.as_ref())
                    .is_some_and(|u| {
                        matches!(u.phase, UpgradePhase::Observing | UpgradePhase::Stable)
                    })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    let v2: Vec<Value> = (30..60).map(|i| click(i, true)).collect();
    produce_bytes(&tb, &source, serialized(&source, &click_v2(), &v2)).await;
    let expected: Vec<Value> = (0..60)
        .filter(|i| i % 3 != 0)
        .map(|i| {
            // Read with v2, v1 records carry the new field's default.
            let mut value = click(i, i >= 30);
            if i < 30 {
                value["referrer"] = Value::Null;
            }
            value
        })
        .collect();
    let read: Vec<Value> = read_avro(&tb, &out, 40 + 7)
        .await
        .into_iter()
        .filter(|v| v["id"].as_i64() < Some(100))
        .collect();
    // Records before the upgrade were written with the sink's first schema.
    let (before, after): (Vec<Value>, Vec<Value>) =
        read.into_iter().partition(|v| v["id"].as_i64() < Some(30));
    assert_eq!(
        after,
        expected[20..].to_vec(),
        "the new field reaches the sink"
    );
    assert_eq!(
        before,
        (0..30)
            .filter(|i| i % 3 != 0)
            .map(|i| click(i, false))
            .collect::<Vec<_>>(),
        "written once, before the upgrade"
    );
    let versions = registry()
        .latest(&format!("{out}-value"))
        .await
        .expect("the sink's subject");
    assert_eq!(versions.version, 2, "the sink registered its new schema");
    pipelines
        .delete("clicks", &Default::default())
        .await
        .expect("delete");
}

fn orders_pipeline(ns: &str, source: &str, steps: &str) -> String {
    format!(
        r#"apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata:
  name: orders
  namespace: {ns}
spec:
  topicDeletionPolicy: Delete
  schemaRegistry:
    url: {registry}
  source:
    topic: {source}
    key: [id]
    schema:
      fields:
        - {{name: id, type: string}}
        - {{name: amount, type: number}}
  upgrade:
    healthWindow: 5s
{steps}
  sinks:
    - name: out
      kafka: {{topic: {source}.out, format: avro, key: [id], keyFormat: avro}}
"#,
        registry = var("KEYSTONE_TESTBED_REGISTRY_URL"),
    )
}

#[tokio::test]
async fn an_incompatible_output_change_is_refused_with_the_registrys_reason() {
    let tb = testbed().await;
    require_runtime_binary();
    install_crds(&tb);
    let ns = pipeline_namespace(&tb, "op-avro-out").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let operator = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "op-avro-out");
    let kafka = Kafka::new(&tb);
    let source = unique("e2e.orders");
    kafka.create(&source, 1).await;
    let out = format!("{source}.out");
    let order = |i: i64| json!({"id": format!("o{i}"), "amount": i as f64 * 1.5});
    let produce = async |range: std::ops::Range<i64>| {
        let lines: Vec<String> = range.map(|i| order(i).to_string()).collect();
        produce_lines(&tb, &source, &lines.join("\n"), |_| "k".into()).await;
    };
    produce(0..10).await;
    apply_yaml(&tb, &orders_pipeline(ns.name(), &source, "")).await;
    wait_ready(&ns, "orders", &operator).await;
    let first: Vec<Value> = (0..10).map(order).collect();
    assert_eq!(read_avro(&tb, &out, 10).await.len(), first.len());

    // A required field new to the output: readers of the new schema could
    // not read what was written before (BACKWARD).
    let required = "  steps:\n    - name: tag\n      map:\n        fields:\n          - {name: currency, type: string, expression: \"'EUR'\"}";
    apply_yaml(&tb, &orders_pipeline(ns.name(), &source, required)).await;
    let pipelines = ns.api::<Pipeline>();
    let refused = wait_for(
        &pipelines,
        "orders",
        Duration::from_secs(90),
        "ContractsValid=False SchemaIncompatible",
        |p| {
            condition(p, "ContractsValid")
                .is_some_and(|c| c.status == "False" && c.reason == "SchemaIncompatible")
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    let message = condition_message(&refused, "ContractsValid");
    assert!(
        message.starts_with(&format!(
            "sink \"out\": the schema derived from the output contract is incompatible with subject {out}-value"
        )) && message.contains("currency"),
        "{message}"
    );
    // The running version goes on.
    produce(10..15).await;
    assert_eq!(
        read_avro(&tb, &out, 15).await.len(),
        15,
        "the old version runs on"
    );

    // Compatible: a field dropped from the output (readers of the new schema
    // ignore it in old records).
    let dropped =
        "  steps:\n    - name: slim\n      project:\n        fields: [{name: id, from: /id}]";
    apply_yaml(&tb, &orders_pipeline(ns.name(), &source, dropped)).await;
    wait_for(
        &pipelines,
        "orders",
        Duration::from_secs(180),
        "the compatible change rolled out",
        |p| {
            condition_is(p, "ContractsValid", "True")
                && p.status
                    .as_ref()
                    .and_then(|s| s.upgrade.as_ref())
                    .is_some_and(|u| {
                        matches!(u.phase, UpgradePhase::Observing | UpgradePhase::Stable)
                    })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    produce(15..20).await;
    let read = read_avro(&tb, &out, 20).await;
    let slim: Vec<&Value> = read.iter().filter(|v| v.get("amount").is_none()).collect();
    assert_eq!(
        slim.len(),
        5,
        "records after the upgrade carry id only: {read:?}"
    );
    let latest = registry()
        .latest(&format!("{out}-value"))
        .await
        .expect("subject");
    assert_eq!(latest.version, 2, "a new version was registered");
    pipelines
        .delete("orders", &Default::default())
        .await
        .expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_schema_in_the_manifest_is_checked_and_read_with() {
    let tb = testbed().await;
    require_runtime_binary();
    install_crds(&tb);
    let ns = pipeline_namespace(&tb, "op-avro-inline").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let operator = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "op-avro-inline");
    let kafka = Kafka::new(&tb);
    let source = unique("e2e.inline");
    kafka.create(&source, 1).await;
    // The producer registers v1 (no referrer) and writes with it.
    let v1: Vec<Value> = (0..20).map(|i| click(i, false)).collect();
    produce_bytes(&tb, &source, serialized(&source, CLICK_V1, &v1)).await;

    // The manifest reads with v2 (a new optional referrer) of its own: the
    // filter on referrer is checked against it, not against v1.
    let inline = serde_json::to_string(&click_v2().replace('\n', " ")).expect("quoted");
    let manifest = clicks_pipeline(
        ns.name(),
        &source,
        "referrer == null",
        &var("KEYSTONE_TESTBED_REGISTRY_URL"),
    )
    .replace(
        "    format: avro\n",
        &format!("    format: avro\n    avro:\n      schema: {inline}\n"),
    );
    apply_yaml(&tb, &manifest).await;
    let ready = wait_ready(&ns, "clicks", &operator).await;
    let resolved = condition_message(&ready, "SchemaRegistryReady");
    assert!(
        resolved.contains("source reads the schema of spec.source.avro.schema"),
        "{resolved}"
    );
    let expected: Vec<Value> = (0..20)
        .map(|i| {
            let mut value = click(i, false);
            value["referrer"] = Value::Null;
            value
        })
        .collect();
    assert_eq!(
        read_avro(&tb, &format!("{source}.out"), expected.len()).await,
        expected,
        "v1 records read as the manifest's v2: the new field's default"
    );
    ns.api::<Pipeline>()
        .delete("clicks", &Default::default())
        .await
        .expect("delete");
}
