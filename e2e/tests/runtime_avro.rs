//! A stage whose source values are Avro (`plan.source.avro`), on the
//! testbed's Kafka and schema registry (Apicurio, its Confluent-compatible
//! API), fed by a producer the project did not write: confluent-kafka's
//! `AvroSerializer` (`e2e/readers/avro_registry.py`), which registers v1 and
//! then a compatible v2 of the subject.
//!
//! - v1 records and v2 records (a new optional field) are read with the
//!   plan's reader schema (v1) and flow through a filter exactly once;
//! - poison bytes of each kind (JSON on the Avro topic, a truncated datum,
//!   an id the registry does not know, a writer schema that cannot be read as
//!   the reader's) are dead letters with the reason and offset, and the
//!   partition goes on;
//! - the registry cut off for 30 s while records of a writer schema the stage
//!   has not seen arrive: the stage waits (its metric says so), dead-letters
//!   nothing, and once the registry answers again everything arrives, once;
//! - Kafka sinks writing Avro (`plan.sinks[].avro`): one registers the schema
//!   derived from the output contract, one writes with a pinned version of
//!   the subject; both topics read back field by field with the schema the
//!   registry has for the records' id (confluent-kafka's `AvroDeserializer`
//!   reads what the same encoder writes in `avro_registry.rs`).
//!
//! The registry is reached through a gate in this test (a TCP forwarder that
//! can refuse and cut connections): Apicurio keeps its schemas in memory, so
//! stopping the process would lose them, and the outage is the network's.
//!
//! Needs `target/debug/keystone-runtime` and a running testbed with the
//! registry (`e2e/testbed up`).

mod avro_support;
mod runtime_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use avro_support::{CLICK_V1, Gate, click_v2, registry, registry_address, serialized, var};
use keystone_avro::{AvroSchema, Shape, contract, encode, wire};
use keystone_crds::plan::{PlanAvroSink, PlanAvroSource, PlanAvroWriter};
use runtime_support::*;
use serde_json::{Value, json};

/// `id` as a string: a long is not read as a string.
const CLICK_INCOMPATIBLE: &str = r#"{"type": "record", "name": "Click", "namespace": "web", "fields": [
  {"name": "id", "type": "string"}
]}"#;

/// A pipeline keeping the events whose `id` is not a multiple of 3, from
/// `<name>.in` (the fields the steps read, and `extra_fields`) into `sinks`
/// (YAML list items).
fn manifest(name: &str, extra_fields: &str, sinks: &str) -> String {
    format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: {name}, namespace: e2e}}
spec:
  source:
    topic: {name}.in
    key: [user]
    schema:
      fields:
        - {{name: id, type: integer}}
        - {{name: user, type: string}}
{extra_fields}
  steps:
    - name: keep
      filter: {{expression: 'id % 3 != 0'}}
  sinks:
{sinks}
  delivery: ExactlyOnce
  commitInterval: 300ms
"#
    )
}

fn click(id: i64, v2: bool) -> Value {
    let mut value = json!({"id": id, "user": format!("u{}", id % 7), "at": "2026-12-05T10:00:00Z"});
    if v2 {
        value["referrer"] = json!(format!("r{id}"));
    }
    value
}

fn ids_of(records: &[(String, String, BTreeMap<String, String>)]) -> Vec<i64> {
    let mut ids: Vec<i64> = records
        .iter()
        .map(|(_, value, _)| {
            serde_json::from_str::<Value>(value).expect("JSON output")["id"]
                .as_i64()
                .expect("id")
        })
        .collect();
    ids.sort_unstable();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_records_flow_poison_is_dead_lettered_and_a_registry_outage_loses_nothing() {
    let name = unique("avro-src");
    let mut h = Harness::new(
        &name,
        &manifest(
            &name,
            "",
            &format!("    - {{name: out, kafka: {{topic: {name}.out, partitions: 2}}}}"),
        ),
        2,
    )
    .await;
    let topic = h.plan.source.topic.clone();
    let subject = format!("{topic}-value");

    // The producer's two versions, registered by its serializer.
    let v1_records = serialized(
        &topic,
        CLICK_V1,
        &(0..300).map(|i| click(i, false)).collect::<Vec<_>>(),
    );
    let v2_records = serialized(
        &topic,
        &click_v2(),
        &(300..500).map(|i| click(i, true)).collect::<Vec<_>>(),
    );
    let (v1_id, _) = wire::split(&v1_records[0]).expect("framed");
    let (v2_id, _) = wire::split(&v2_records[0]).expect("framed");
    assert_ne!(v1_id, v2_id, "the serializer registered a second version");
    let client = registry();
    let registered = client.version(&subject, 2).await.expect("v2 registered");
    assert_eq!(registered.id, v2_id);

    // Poison of each kind, with what its dead letter must say.
    let incompatible_id = client
        .register(&format!("{topic}-incompatible-value"), CLICK_INCOMPATIBLE)
        .await
        .expect("register the incompatible writer");
    let incompatible_shape =
        Shape::new(AvroSchema::parse_str(CLICK_INCOMPATIBLE).unwrap()).unwrap();
    let truncated = v1_records[1][..v1_records[1].len() - 1].to_vec();
    let unknown = wire::frame(2_000_000_000, &v1_records[2][5..]);
    let poison: Vec<(Vec<u8>, &str)> = vec![
        (br#"{"id": 1, "user": "u1"}"#.to_vec(), "it looks like JSON"),
        (truncated, "truncated"),
        (unknown, "schema id 2000000000"),
        (
            encode(&json!({"id": "x"}), &incompatible_shape, incompatible_id).unwrap(),
            "cannot be read as the reader schema",
        ),
    ];

    // The stage reads with v1, through the gate.
    let (address, path) = registry_address();
    let gate = Gate::start(address);
    let reader = AvroSchema::parse_str(CLICK_V1).unwrap();
    h.plan.source.schema = contract::contract_of(&reader).expect("the contract of v1");
    h.plan.source.avro = Some(PlanAvroSource {
        registry_url: format!("http://127.0.0.1:{}{path}", gate.port),
        subject: subject.clone(),
        version: 1,
        reader_schema: CLICK_V1.to_owned(),
    });
    std::fs::write(&h.plan_path, serde_json::to_vec_pretty(&h.plan).unwrap()).unwrap();

    // v1 records with the poison among them, on both partitions.
    let mut first: Vec<(String, Vec<u8>)> = v1_records
        .iter()
        .enumerate()
        .filter(|(i, _)| !(1..=2).contains(i))
        .map(|(i, bytes)| (format!("u{}", i % 7), bytes.clone()))
        .collect();
    for (n, (bytes, _)) in poison.iter().enumerate() {
        first.insert(40 * (n + 1), (format!("u{n}"), bytes.clone()));
    }
    produce(&producer(&h.bootstrap), &topic, &first);
    h.start("a", &[]);
    h.wait_ready("a");
    let out = h.sink_topic();
    let expected_first: Vec<i64> = (0..300)
        .filter(|i| i % 3 != 0 && !(1..=2).contains(i))
        .collect();
    let seen = read_committed(
        &h.bootstrap,
        &out,
        expected_first.len(),
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    assert_eq!(ids_of(&seen), expected_first, "see {}", h.log("a"));
    for (_, value, _) in &seen {
        let value: Value = serde_json::from_str(value).unwrap();
        assert!(
            value["at"]
                .as_str()
                .is_some_and(|at| at.starts_with("2026-12-05T10:00:00")),
            "timestamp-millis as RFC 3339: {value}"
        );
    }

    // The registry cut off while records of v2 (an id the stage has not seen) arrive.
    gate.shut();
    let outage = Instant::now();
    let second: Vec<(String, Vec<u8>)> = v2_records
        .iter()
        .enumerate()
        .map(|(i, bytes)| (format!("u{}", (i + 300) % 7), bytes.clone()))
        .collect();
    produce(&producer(&h.bootstrap), &topic, &second);
    let deadline = Instant::now() + Duration::from_secs(20);
    while h.metric("a", "keystone_schema_registry_waiting") != 1.0 {
        assert!(
            Instant::now() < deadline,
            "the stage never said it waits; see {}",
            h.log("a")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed()));
    let during = read_committed(
        &h.bootstrap,
        &out,
        usize::MAX,
        Duration::from_secs(3),
        Duration::from_secs(1),
    );
    assert!(
        ids_of(&during).iter().all(|id| *id < 300),
        "nothing of v2 was read while the registry was away"
    );
    assert_eq!(h.metric("a", "keystone_schema_registry_waiting"), 1.0);
    gate.reopen();

    let expected_all: Vec<i64> = expected_first
        .iter()
        .copied()
        .chain((300..500).filter(|i| i % 3 != 0))
        .collect();
    let seen = read_committed(
        &h.bootstrap,
        &out,
        expected_all.len(),
        Duration::from_secs(90),
        Duration::from_secs(3),
    );
    assert_eq!(
        ids_of(&seen),
        expected_all,
        "every event once; see {}",
        h.log("a")
    );
    for (_, value, _) in &seen {
        let value: Value = serde_json::from_str(value).unwrap();
        assert!(
            value.get("referrer").is_none(),
            "read as the reader schema (v1): {value}"
        );
    }
    assert_eq!(h.metric("a", "keystone_schema_registry_waiting"), 0.0);

    // The poison and nothing else in the dead letters, each with its reason and offset.
    let letters = read_committed(
        &h.bootstrap,
        &h.plan.dead_letter_topic,
        poison.len(),
        Duration::from_secs(30),
        Duration::from_secs(2),
    );
    assert_eq!(letters.len(), poison.len(), "{letters:?}");
    for (bytes, reason) in &poison {
        let letter = letters
            .iter()
            .find(|(_, value, _)| *value == String::from_utf8_lossy(bytes))
            .unwrap_or_else(|| {
                panic!("no dead letter holds the poison expected to say {reason:?}: {letters:?}")
            });
        let headers = &letter.2;
        assert!(
            headers["keystone.reason"].contains(reason),
            "{reason:?} in {headers:?}"
        );
        assert_eq!(headers["keystone.step"], "source");
        assert_ne!(headers["keystone.offset"], "-1", "{headers:?}");
    }
    h.terminate("a");
}

#[tokio::test]
async fn avro_sinks_write_the_contracts_schema_and_read_back_field_by_field() {
    let name = unique("avro-sink");
    let mut h = Harness::new(
        &name,
        &manifest(
            &name,
            "        - {name: at, type: timestamp}\n        - {name: note, type: string, optional: true}",
            &format!(
                "    - {{name: out, kafka: {{topic: {name}.out, partitions: 2}}}}\n    - {{name: pinned, kafka: {{topic: {name}.pinned, partitions: 1}}}}"
            ),
        ),
        2,
    ).await;
    let registry_url = var("KEYSTONE_TESTBED_REGISTRY_URL");
    let out = h.plan.sinks[0].spec.kafka.as_ref().unwrap().topic.clone();
    let pinned = h.plan.sinks[1].spec.kafka.as_ref().unwrap().topic.clone();
    let subject = format!("{out}-value");
    // `out` registers the schema derived from the output contract; `pinned`
    // writes with version 1 of the same subject, as registered.
    let derived =
        contract::schema_for_output(&h.plan.sinks[0].schema, "dev.keystone.e2e", "clicks")
            .expect("a schema from the output contract");
    h.plan.sinks[0].avro = Some(PlanAvroSink {
        registry_url: registry_url.clone(),
        subject: subject.clone(),
        writer: PlanAvroWriter::Register {
            schema: derived.text.clone(),
        },
    });
    h.plan.sinks[1].avro = Some(PlanAvroSink {
        registry_url,
        subject: subject.clone(),
        writer: PlanAvroWriter::Version { version: 1 },
    });
    std::fs::write(&h.plan_path, serde_json::to_vec_pretty(&h.plan).unwrap()).unwrap();

    let input: Vec<(String, String)> = (0..120)
        .map(|i: i64| {
            let mut value =
                json!({"id": i, "user": format!("u{}", i % 5), "at": "2026-12-05T10:00:00.123Z"});
            if i % 2 == 0 {
                value["note"] = json!(format!("n{i}"));
            }
            (format!("u{}", i % 5), value.to_string())
        })
        .collect();
    produce(&producer(&h.bootstrap), &h.plan.source.topic, &input);
    h.start("a", &[]);
    h.wait_ready("a");
    let registered = registry()
        .version(&subject, 1)
        .await
        .expect("the sink registered its schema");
    assert_eq!(
        *registered.schema, derived.schema,
        "the registered schema is the derived one"
    );

    // Each record read with the writer schema the registry has for its id.
    let writer = registry()
        .schema_by_id(registered.id)
        .await
        .expect("the schema by id");
    let shape = Shape::new(AvroSchema::clone(&writer)).expect("shape");
    let expected: Vec<Value> = (0..120)
        .filter(|i| i % 3 != 0)
        .map(|i: i64| {
            json!({
                "id": i,
                "user": format!("u{}", i % 5),
                "at": "2026-12-05T10:00:00.123Z",
                "note": (i % 2 == 0).then(|| format!("n{i}")),
            })
        })
        .collect();
    for topic in [&out, &pinned] {
        let records = read_committed_bytes(
            &h.bootstrap,
            topic,
            expected.len(),
            Duration::from_secs(60),
            Duration::from_secs(2),
        );
        assert_eq!(records.len(), expected.len(), "{topic}; see {}", h.log("a"));
        let mut read: Vec<Value> = records
            .iter()
            .map(|(_, value, _)| {
                let (id, datum) = wire::split(value).expect("the wire format");
                assert_eq!(id, registered.id, "{topic}: written with the registered id");
                keystone_avro::decode(id, datum, &writer, &shape).expect("decodes")
            })
            .collect();
        read.sort_by_key(|v| v["id"].as_i64());
        assert_eq!(read, expected, "{topic}: field by field");
    }
    h.terminate("a");
}
