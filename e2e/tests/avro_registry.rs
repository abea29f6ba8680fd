//! Keystone's Avro (`keystone-avro`) against a real schema registry, the
//! testbed's Apicurio Registry through its Confluent-compatible API, and
//! against serializers the project did not write: confluent-kafka's
//! `AvroSerializer` and `AvroDeserializer` (Python, `e2e/readers/avro_registry.py`).
//!
//! - records the Python serializer registered and wrote are read field by
//!   field, logical types included, also after the producer registers a new
//!   compatible version;
//! - records Keystone writes with a schema derived from an output contract
//!   are read back by the Python deserializer;
//! - registration, versions, the compatibility check under BACKWARD (Apicurio
//!   answers it without reasons; Keystone's own reading names the field), and
//!   the errors of unknown ids and subjects;
//! - local mode on Avro container files fastavro wrote, its output read back
//!   by fastavro.
//!
//! Needs a running testbed with the registry (`e2e/testbed up`).

mod avro_support;
mod runtime_support;

use std::process::Command;

use avro_support::{hex, python, registry, unhex};
use keystone_avro::registry::RegistryError;
use keystone_avro::{AvroSchema, Shape, can_read, contract, decode, encode, wire};
use keystone_crds::schema::{FieldSpec, FieldType, SchemaSpec};
use runtime_support::{runtime_binary, unique};
use serde_json::{Value, json};

const ORDER_V1: &str = r#"{
  "type": "record", "name": "Order", "namespace": "shop",
  "fields": [
    {"name": "id", "type": "long"},
    {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["NEW", "PAID"]}},
    {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}},
    {"name": "placed_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "ship_on", "type": ["null", {"type": "int", "logicalType": "date"}], "default": null},
    {"name": "token", "type": {"type": "string", "logicalType": "uuid"}},
    {"name": "customer", "type": {"type": "record", "name": "Customer", "fields": [
      {"name": "id", "type": "int"},
      {"name": "tier", "type": ["null", "string"], "default": null}
    ]}},
    {"name": "lines", "type": {"type": "array", "items": "string"}},
    {"name": "labels", "type": {"type": "map", "values": "long"}},
    {"name": "gift", "type": "boolean"}
  ]
}"#;

/// V1 with a new optional field: BACKWARD compatible.
fn order_v2() -> String {
    ORDER_V1.replace(
        r#"{"name": "gift", "type": "boolean"}"#,
        r#"{"name": "gift", "type": "boolean"},
    {"name": "note", "type": ["null", "string"], "default": null}"#,
    )
}

fn orders() -> Vec<Value> {
    (1..=3)
        .map(|i| {
            json!({
                "id": i,
                "status": if i % 2 == 0 { "PAID" } else { "NEW" },
                "amount": format!("{i}2.50"),
                "placed_at": format!("2026-12-0{i}T10:00:00.123Z"),
                "ship_on": if i == 2 { Value::Null } else { json!(format!("2026-12-1{i}")) },
                "token": format!("67e55044-10b1-426f-9247-bb680e5fe0c{i}"),
                "customer": {"id": 100 + i, "tier": if i == 1 { json!("gold") } else { Value::Null }},
                "lines": (0..i).map(|l| format!("line-{l}")).collect::<Vec<_>>(),
                "labels": {"qty": i * 10},
                "gift": i == 3,
            })
        })
        .collect()
}

/// A schema in a file of its own, removed when dropped.
struct SchemaFile(std::path::PathBuf);

impl SchemaFile {
    fn new(text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}.avsc", unique("keystone-e2e-schema")));
        std::fs::write(&path, text).expect("schema file");
        Self(path)
    }
    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for SchemaFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn records_the_python_serializer_writes_are_read_field_by_field() {
    let registry = registry();
    let topic = unique("e2e.avro.orders");
    let subject = format!("{topic}-value");
    let v1 = SchemaFile::new(ORDER_V1);
    let input: Vec<String> = orders().iter().map(Value::to_string).collect();
    let framed = python(
        &["serialize", "--topic", &topic, "--schema-file", v1.path()],
        &input,
    );
    assert_eq!(framed.len(), 3, "{framed:?}");

    // The reader schema: the subject's latest version, as a source reads it.
    let reader = registry.latest(&subject).await.expect("latest");
    assert_eq!(reader.version, 1);
    let reader_shape = Shape::new((*reader.schema).clone()).expect("reader");
    let mut read = Vec::new();
    for record in &framed {
        let bytes = unhex(record);
        let (id, datum) = wire::split(&bytes).expect("framed");
        assert_eq!(
            id, reader.id,
            "the serializer registered the schema it wrote with"
        );
        let writer = registry.schema_by_id(id).await.expect("writer schema");
        can_read(&writer, &reader.schema).expect("readable");
        read.push(decode(id, datum, &writer, &reader_shape).expect("decode"));
    }
    assert_eq!(read, orders());

    // The producer registers a compatible new version and writes with it; the
    // consumer reads old and new records with the latest as its reader.
    let v2 = SchemaFile::new(&order_v2());
    let mut newer = orders()[0].clone();
    newer["id"] = json!(4);
    newer["note"] = json!("leave at the door");
    let framed_v2 = python(
        &["serialize", "--topic", &topic, "--schema-file", v2.path()],
        &[newer.to_string()],
    );
    let latest = registry.latest(&subject).await.expect("latest");
    assert_eq!(latest.version, 2);
    let latest_shape = Shape::new((*latest.schema).clone()).expect("reader");
    let bytes = unhex(&framed_v2[0]);
    let (id_v2, datum) = wire::split(&bytes).expect("framed");
    assert_eq!(id_v2, latest.id);
    let writer_v2 = registry.schema_by_id(id_v2).await.expect("writer");
    assert_eq!(
        decode(id_v2, datum, &writer_v2, &latest_shape).expect("decode"),
        newer
    );
    let old = unhex(&framed[0]);
    let (id_v1, datum) = wire::split(&old).expect("framed");
    let writer_v1 = registry.schema_by_id(id_v1).await.expect("writer");
    let mut expected = orders()[0].clone();
    expected["note"] = Value::Null;
    assert_eq!(
        decode(id_v1, datum, &writer_v1, &latest_shape).expect("decode"),
        expected,
        "an old record read with the new reader has the new field's default"
    );
    // And a consumer still on version 1 reads the new record without it.
    let mut without_note = newer.clone();
    without_note.as_object_mut().expect("object").remove("note");
    assert_eq!(
        decode(id_v2, &bytes[5..], &writer_v2, &reader_shape).expect("decode"),
        without_note
    );
}

fn field(name: &str, field_type: FieldType, optional: bool) -> FieldSpec {
    FieldSpec {
        name: name.into(),
        field_type,
        optional,
        description: None,
    }
}

#[tokio::test]
async fn records_keystone_writes_are_read_by_the_python_deserializer() {
    let registry = registry();
    let topic = unique("e2e.avro.out");
    let contract = SchemaSpec {
        fields: vec![
            field("id", FieldType::String, false),
            field("customer.id", FieldType::Integer, false),
            field("customer.tier", FieldType::String, true),
            field("total", FieldType::Number, true),
            field("at", FieldType::Timestamp, false),
            field("tags", FieldType::Array, true),
            field("paid", FieldType::Boolean, false),
        ],
        open: true,
    };
    let output =
        contract::schema_for_output(&contract, "dev.keystone.e2e", "Order").expect("schema");
    let id = registry
        .register(&format!("{topic}-value"), &output.text)
        .await
        .expect("register");
    let events = [
        json!({"id": "o-1", "customer": {"id": 7, "tier": "gold"}, "total": 12.5,
               "at": "2026-12-05T10:00:00.123456Z", "tags": ["a", "b"], "paid": true}),
        // Optional fields absent; a timestamp as epoch milliseconds.
        json!({"id": "o-2", "customer": {"id": 8}, "at": 1_764_928_800_000_i64, "paid": false}),
    ];
    let shape = Shape::new(output.schema.clone()).expect("shape");
    let framed: Vec<String> = events
        .iter()
        .map(|e| hex(&encode(e, &shape, id).expect("encode")))
        .collect();
    let read: Vec<Value> = python(&["deserialize", "--topic", &topic], &framed)
        .iter()
        .map(|line| serde_json::from_str(line).expect("json"))
        .collect();
    assert_eq!(
        read,
        vec![
            json!({"id": "o-1", "customer": {"id": 7, "tier": "gold"}, "total": 12.5,
                   "at": "2026-12-05T10:00:00.123456+00:00", "tags": "[\"a\",\"b\"]", "paid": true}),
            json!({"id": "o-2", "customer": {"id": 8, "tier": null}, "total": null,
                   "at": "2025-12-05T10:00:00+00:00", "tags": null, "paid": false}),
        ]
    );
}

#[tokio::test]
async fn the_registry_registers_versions_and_judges_compatibility() {
    let registry = registry();
    let subject = format!("{}-value", unique("e2e.avro.compat"));
    let v1 = r#"{"type": "record", "name": "User", "namespace": "app", "fields": [
      {"name": "id", "type": "long"}]}"#;
    // Nothing registered yet: any schema is compatible.
    let verdict = registry.compatibility(&subject, v1).await.expect("check");
    assert!(verdict.compatible, "{verdict:?}");
    let id1 = registry.register(&subject, v1).await.expect("register");
    assert_eq!(
        registry.register(&subject, v1).await.expect("again"),
        id1,
        "registering the same schema again finds it"
    );
    let first = registry.version(&subject, 1).await.expect("version 1");
    assert_eq!((first.id, first.version), (id1, 1));
    assert_eq!(
        registry
            .schema_by_id(id1)
            .await
            .expect("by id")
            .canonical_form(),
        AvroSchema::parse_str(v1).expect("v1").canonical_form()
    );

    // A required field without a default: old records cannot be read with it.
    let breaking = r#"{"type": "record", "name": "User", "namespace": "app", "fields": [
      {"name": "id", "type": "long"}, {"name": "email", "type": "string"}]}"#;
    let verdict = registry
        .compatibility(&subject, breaking)
        .await
        .expect("check");
    assert!(!verdict.compatible, "{verdict:?}");
    // Apicurio gives no reason: Keystone's own reading names the field.
    assert!(
        verdict.messages.len() == 1
            && verdict.messages[0].starts_with(
                "consumers using the new schema cannot read records written with version 1: "
            )
            && verdict.messages[0].contains("email"),
        "{verdict:?}"
    );
    assert_eq!(
        registry.compatibility_level(&subject).await.expect("level"),
        "BACKWARD"
    );
    let refused = registry.register(&subject, breaking).await.unwrap_err();
    assert!(
        matches!(&refused, RegistryError::Refused { status: 409, .. }),
        "{refused}"
    );
    // An optional one: compatible, a new version.
    let optional = r#"{"type": "record", "name": "User", "namespace": "app", "fields": [
      {"name": "id", "type": "long"}, {"name": "email", "type": ["null", "string"], "default": null}]}"#;
    assert!(
        registry
            .compatibility(&subject, optional)
            .await
            .expect("check")
            .compatible
    );
    let id2 = registry
        .register(&subject, optional)
        .await
        .expect("register");
    assert_ne!(id2, id1);
    let latest = registry.latest(&subject).await.expect("latest");
    assert_eq!((latest.id, latest.version), (id2, 2));

    // What does not exist is not found, and not the registry's outage.
    let missing = registry.schema_by_id(i32::MAX as u32).await.unwrap_err();
    assert!(
        matches!(missing, RegistryError::NotFound { .. }),
        "{missing}"
    );
    assert!(!missing.is_transient());
    let missing = registry.latest(&unique("e2e.avro.none")).await.unwrap_err();
    assert!(
        matches!(missing, RegistryError::NotFound { .. }),
        "{missing}"
    );
}

/// The orders of [`ORDER_V1`], the paid ones' amount and buyer's tier.
const PAID_ORDERS: &str = r#"apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata:
  name: paid-orders
  namespace: shop
spec:
  source:
    topic: orders
    key: [id]
    schema:
      open: false
      fields:
        - {name: id, type: integer}
        - {name: status, type: string}
        - {name: amount, type: string}
        - {name: placed_at, type: timestamp}
        - {name: ship_on, type: string, optional: true}
        - {name: token, type: string}
        - {name: customer.id, type: integer}
        - {name: customer.tier, type: string, optional: true}
        - {name: lines, type: array}
        - {name: labels, type: object}
        - {name: gift, type: boolean}
  steps:
    - name: not-gifts
      filter: {expression: "!gift"}
    - name: shape
      project:
        fields:
          - {name: id, from: /id}
          - {name: amount, from: /amount}
          - {name: placed_at, from: /placed_at}
          - {name: tier, from: /customer/tier, optional: true}
  sinks:
    - name: out
      kafka: {topic: orders.paid}
"#;

#[test]
fn local_mode_reads_and_writes_the_avro_files_fastavro_writes_and_reads() {
    let dir = std::env::temp_dir().join(unique("keystone-e2e-avro-local"));
    std::fs::create_dir_all(&dir).expect("scratch");
    let manifest = dir.join("paid-orders.yaml");
    std::fs::write(&manifest, PAID_ORDERS).expect("manifest");
    let schema = SchemaFile::new(ORDER_V1);
    let input = dir.join("orders.avro");
    let input_path = input.to_str().expect("utf-8");
    let orders: Vec<String> = orders().iter().map(Value::to_string).collect();
    python(
        &[
            "write-container",
            "--schema-file",
            schema.path(),
            input_path,
        ],
        &orders,
    );
    let output = dir.join("paid.avro");
    let run = Command::new(runtime_binary())
        .arg("run")
        .arg(&manifest)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .arg("--quiet")
        .output()
        .expect("keystone-runtime");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // Every event fits the source contract: no dead letters.
    assert_eq!(String::from_utf8_lossy(&run.stderr), "");
    let read: Vec<Value> = python(&["read-container", output.to_str().expect("utf-8")], &[])
        .iter()
        .map(|line| serde_json::from_str(line).expect("json"))
        .collect();
    assert_eq!(
        read,
        [
            json!({"id": 1, "amount": "12.50", "placed_at": "2026-12-01T10:00:00.123000+00:00", "tier": "gold"}),
            json!({"id": 2, "amount": "22.50", "placed_at": "2026-12-02T10:00:00.123000+00:00", "tier": null}),
        ]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
