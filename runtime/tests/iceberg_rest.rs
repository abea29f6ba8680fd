//! The Iceberg sink against Apache Iceberg's own REST catalog (the
//! testbed's `lake` component), read back by an independent reader: pyiceberg
//! through `e2e/readers/read_iceberg.py`.
//!
//! Runs when `KEYSTONE_TESTBED_ICEBERG_URI` is set (`e2e/testbed env`
//! exports it); with `KEYSTONE_TEST_REQUIRE_ICEBERG=1` a missing catalog
//! fails the test instead of skipping it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use keystone_crds::duration::Duration as SpecDuration;
use keystone_crds::pipeline::{IcebergCatalogSpec, IcebergCatalogType, IcebergSinkSpec, SinkSpec};
use keystone_crds::plan::PlanSink;
use keystone_crds::schema::{FieldSpec, FieldType, SchemaSpec};
use keystone_runtime::connectors::iceberg::IcebergSink;
use keystone_runtime::connectors::{Prepared, Sink, SinkContext, SinkOutput, SinkRecord};
use keystone_runtime::event::{Event, Provenance};
use serde_json::Value;

struct Testbed {
    uri: String,
    warehouse: String,
    python: String,
    readers: PathBuf,
}

fn testbed() -> Option<Testbed> {
    let required = std::env::var("KEYSTONE_TEST_REQUIRE_ICEBERG").as_deref() == Ok("1");
    let Ok(uri) = std::env::var("KEYSTONE_TESTBED_ICEBERG_URI") else {
        assert!(
            !required,
            "KEYSTONE_TEST_REQUIRE_ICEBERG=1 but KEYSTONE_TESTBED_ICEBERG_URI is not set: start the testbed with its lake component (e2e/testbed up), and export its env (e2e/testbed env)"
        );
        eprintln!("skipped: KEYSTONE_TESTBED_ICEBERG_URI is not set (no Iceberg REST catalog)");
        return None;
    };
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set, but KEYSTONE_TESTBED_ICEBERG_URI is: export the testbed's env (e2e/testbed env)"))
    };
    let readers = std::env::var("KEYSTONE_TESTBED_READERS").map_or_else(
        |_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../e2e/readers"),
        PathBuf::from,
    );
    Some(Testbed {
        uri,
        warehouse: var("KEYSTONE_TESTBED_ICEBERG_WAREHOUSE"),
        python: var("KEYSTONE_TESTBED_LAKE_PYTHON"),
        readers,
    })
}

impl Testbed {
    /// The reader's output, one JSON value per line.
    fn read(&self, table: &str, mode: &[&str]) -> Vec<Value> {
        let output = Command::new(&self.python)
            .arg(self.readers.join("read_iceberg.py"))
            .args(["--uri", &self.uri, "--table", table])
            .args(mode)
            .output()
            .expect("running read_iceberg.py");
        assert!(
            output.status.success(),
            "read_iceberg.py {mode:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}

fn field(name: &str, field_type: FieldType, optional: bool) -> FieldSpec {
    FieldSpec {
        name: name.into(),
        field_type,
        optional,
        description: None,
    }
}

fn plan_sink(bed: &Testbed, namespace: &str, table: &str) -> PlanSink {
    PlanSink {
        name: "orders-lake".into(),
        key: vec![],
        schema: SchemaSpec {
            fields: vec![
                field("id", FieldType::Integer, false),
                field("country", FieldType::String, false),
                field("at", FieldType::Timestamp, false),
                field("amount", FieldType::Number, true),
                field("customer.name", FieldType::String, true),
                field("tags", FieldType::Array, true),
            ],
            open: true,
        },
        spec: SinkSpec {
            name: "orders-lake".into(),
            kafka: None,
            elasticsearch: None,
            iceberg: Some(IcebergSinkSpec {
                catalog: IcebergCatalogSpec {
                    catalog_type: IcebergCatalogType::Rest,
                    uri: bed.uri.clone(),
                    warehouse: bed.warehouse.clone(),
                    credentials_secret: None,
                },
                namespace: namespace.into(),
                table: table.into(),
                partition_by: vec!["country".into(), "day(at)".into(), "bucket(4, id)".into()],
                // Epochs accumulate: only the first publish and recoveries append.
                commit_interval: SpecDuration::from_secs(3600),
            }),
            parquet: None,
        },
        avro: None,
        avro_key: None,
    }
}

fn event(id: i64) -> String {
    let country = ["NL", "DE", "FR", "BE"][id as usize % 4];
    format!(
        r#"{{"id":{id},"country":"{country}","at":"2026-03-{:02}T{:02}:15:00.5Z","amount":{id}.25,"customer":{{"name":"c{id}"}},"tags":["t",{id}],"extra":"not a column"}}"#,
        1 + id % 5,
        id % 24
    )
}

fn connect(plan: &PlanSink) -> IcebergSink {
    let registry = prometheus::Registry::new();
    let context = SinkContext {
        registry: &registry,
        pipeline: "orders-it",
    };
    IcebergSink::connect(plan, &context).unwrap()
}

fn write(sink: &mut IcebergSink, ids: std::ops::Range<i64>) {
    let mut out = SinkOutput::default();
    for id in ids {
        let mut event = Event::parse(event(id).into_bytes()).unwrap();
        event.source = Some(Provenance {
            partition: 0,
            offset: id,
        });
        let value = sonic_rs::to_vec(&event.value).unwrap();
        sink.write(
            &SinkRecord {
                event: &event,
                value: &value,
            },
            &mut out,
        )
        .unwrap();
    }
    assert!(out.dead_letters.is_empty(), "{:?}", out.dead_letters);
}

fn prepare(sink: &mut IcebergSink) {
    let mut out = SinkOutput::default();
    assert_eq!(
        sink.prepare(Duration::from_secs(30), &mut out).unwrap(),
        Prepared::Ready
    );
}

#[test]
fn a_partitioned_iceberg_table_written_through_the_rest_catalog_reads_back_exactly_once() {
    let Some(bed) = testbed() else {
        return;
    };
    // The sink's warnings say why a publish left its epochs staged.
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let namespace = "keystone_it";
    let table = format!("orders_{}_{stamp}", std::process::id());
    let qualified = format!("{namespace}.{table}");
    let plan = plan_sink(&bed, namespace, &table);

    // The first instance: epoch 1 appended at once, epochs 2 and 3 staged
    // and committed with the offsets, then it stops before appending them.
    let mut first = connect(&plan);
    write(&mut first, 0..400);
    prepare(&mut first);
    first.publish().unwrap();
    write(&mut first, 400..700);
    prepare(&mut first);
    first.publish().unwrap();
    write(&mut first, 700..900);
    prepare(&mut first);
    first.publish().unwrap();
    let marker = first.staged().pop().expect("epochs 2-3 are staged");
    assert_eq!((marker.first, marker.last), (2, 3));
    let first_instance = marker.instance.clone();
    drop(first);

    // The instance given its partitions appends them with its own epoch.
    let mut heir = connect(&plan);
    heir.recover(vec![marker.clone()]).unwrap();
    write(&mut heir, 900..950);
    prepare(&mut heir);
    heir.publish().unwrap();
    assert!(heir.staged().is_empty());

    // Another recovery of the same marker appends nothing.
    let mut late = connect(&plan);
    late.recover(vec![marker.clone()]).unwrap();
    late.publish().unwrap();
    assert!(late.staged().is_empty());

    let rows = bed.read(&qualified, &[]);
    let mut seen: BTreeMap<i64, usize> = BTreeMap::new();
    for row in &rows {
        *seen.entry(row["id"].as_i64().unwrap()).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "rows read more than once: {twice:?}");
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (0..950).collect::<Vec<_>>(),
        "every row exactly once"
    );
    let row = rows.iter().find(|r| r["id"] == 29).unwrap();
    assert_eq!(row["country"], "DE");
    assert_eq!(row["amount"], 29.25);
    assert_eq!(row["customer"]["name"], "c29");
    assert_eq!(row["tags"], r#"["t",29]"#, "arrays are JSON text");
    let at = row["at"].as_str().unwrap();
    assert!(at.starts_with("2026-03-05T05:15:00.500000"), "{at}");
    assert!(
        row.get("extra").is_none(),
        "fields beyond the contract are not columns"
    );

    let snapshots = bed.read(&qualified, &["--snapshots"]);
    assert_eq!(snapshots.len(), 2, "{snapshots:#?}");
    let summary = |i: usize| -> HashMap<String, String> {
        serde_json::from_value(snapshots[i]["summary"].clone()).unwrap()
    };
    let (one, two) = (summary(0), summary(1));
    assert_eq!(snapshots[0]["operation"], "append");
    assert_eq!(one["keystone.pipeline"], "orders-it");
    assert_eq!(one["keystone.sink"], "orders-lake");
    assert_eq!(one["keystone.instance"], first_instance);
    assert_eq!(one["keystone.epochs"], "1-1");
    assert_eq!(one["added-records"], "400");
    assert_ne!(two["keystone.instance"], first_instance);
    assert_eq!(two["keystone.epochs"], "1-1");
    assert_eq!(two["keystone.recovered"], marker.to_string());
    assert_eq!(two["added-records"], "550");
    assert_eq!(two["total-records"], "950");

    let files = bed.read(&qualified, &["--files"]);
    assert!(
        files.len() > 4,
        "one file per partition at least: {}",
        files.len()
    );
    for file in &files {
        assert_eq!(file["spec_id"], 0);
        let partition = &file["partition"];
        for key in ["country", "at_day", "id_bucket_4"] {
            assert!(partition.get(key).is_some(), "{partition}");
        }
        let path = file["file_path"].as_str().unwrap();
        assert!(path.contains("/data/country="), "{path}");
    }
    let total: i64 = files
        .iter()
        .map(|f| f["record_count"].as_i64().unwrap())
        .sum();
    assert_eq!(total, 950);
}
