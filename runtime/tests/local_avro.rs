//! `keystone-runtime run` on Avro container files: `--input FILE.avro` reads
//! each record as an event, `--output FILE.avro` writes the events with the
//! schema derived from the output contract. The files are written and read
//! here with the Apache codec's own container writer and reader.

use std::path::{Path, PathBuf};
use std::process::Command;

use apache_avro::types::Value;
use apache_avro::{Reader, Schema, Writer};
use serde_json::json;

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("local-avro");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

const PAYMENT: &str = r#"{"type": "record", "name": "Payment", "namespace": "bank", "fields": [
  {"name": "id", "type": "string"},
  {"name": "amount", "type": "double"},
  {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["paid", "refunded"]}},
  {"name": "card", "type": ["null", {"type": "record", "name": "Card", "fields": [
    {"name": "country", "type": ["null", "string"], "default": null}
  ]}], "default": null},
  {"name": "placed_at", "type": {"type": "long", "logicalType": "timestamp-millis"}}
]}"#;

fn payment(id: &str, amount: f64, status: u32, country: Option<&str>) -> Value {
    let symbol = ["paid", "refunded"][status as usize].to_owned();
    let card = match country {
        Some(c) => Value::Union(
            1,
            Box::new(Value::Record(vec![(
                "country".into(),
                Value::Union(1, Box::new(Value::String(c.into()))),
            )])),
        ),
        None => Value::Union(0, Box::new(Value::Null)),
    };
    Value::Record(vec![
        ("id".into(), Value::String(id.into())),
        ("amount".into(), Value::Double(amount)),
        ("status".into(), Value::Enum(status, symbol)),
        ("card".into(), card),
        (
            "placed_at".into(),
            Value::TimestampMillis(1_764_928_800_000),
        ),
    ])
}

/// `keystone-runtime run` on the filter-project golden case's pipeline.
fn run(args: &[&Path]) -> std::process::Output {
    let manifest =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/filter-project/pipeline.yaml");
    Command::new(env!("CARGO_BIN_EXE_keystone-runtime"))
        .arg("run")
        .arg(&manifest)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_pipeline_reads_and_writes_avro_container_files() {
    let schema = Schema::parse_str(PAYMENT).unwrap();
    let input = scratch("payments.avro");
    {
        let mut writer = Writer::new(&schema, std::fs::File::create(&input).unwrap());
        for record in [
            payment("p1", 250.0, 0, Some("FR")),
            payment("p2", 20.0, 0, None),
            payment("p3", 100.0, 0, None),
            payment("p4", 500.0, 1, Some("US")),
        ] {
            writer.append(record).unwrap();
        }
        writer.flush().unwrap();
    }
    let output = scratch("large.avro");
    let dead = scratch("dead.jsonl");
    let out = run(&[
        "--input".as_ref(),
        &input,
        "--output".as_ref(),
        &output,
        "--dead-letters".as_ref(),
        &dead,
        "--quiet".as_ref(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&dead).unwrap(), "");

    let reader = Reader::new(std::fs::File::open(&output).unwrap()).unwrap();
    let written = reader.writer_schema().clone();
    // The contract's fields, in its order (as a lake table's columns).
    let expected_schema = Schema::parse_str(
        r#"{"type": "record", "name": "filter_project", "namespace": "dev.keystone.golden", "fields": [
          {"name": "amount", "type": "double"},
          {"name": "country", "type": ["null", "string"], "default": null},
          {"name": "id", "type": "string"}
        ]}"#,
    )
    .unwrap();
    assert_eq!(written.canonical_form(), expected_schema.canonical_form());
    let events: Vec<serde_json::Value> = reader
        .map(|record| serde_json::Value::try_from(record.unwrap()).unwrap())
        .collect();
    assert_eq!(
        events,
        [
            json!({"id": "p1", "amount": 250.0, "country": "FR"}),
            json!({"id": "p3", "amount": 100.0, "country": null}),
        ]
    );
}

#[test]
fn an_input_that_is_not_an_avro_container_is_refused_by_name() {
    let input = scratch("not-avro.avro");
    std::fs::write(&input, "{\"id\": \"p1\"}\n").unwrap();
    let out = run(&["--input".as_ref(), &input]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("not-avro.avro is not an Avro container file"),
        "{stderr}"
    );
}
