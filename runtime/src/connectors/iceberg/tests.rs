//! The Iceberg sink over the crate's memory catalog, with the table's files
//! in a local folder: the table created from the contract, staging and
//! appending, recovery of another instance's epochs, aborts, refused rows,
//! conflicting tables. Rows are read back with the crate's own scan.

use std::collections::HashMap;
use std::path::PathBuf;

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::{Array, RecordBatch};
use futures::TryStreamExt;
use iceberg::memory::{MEMORY_CATALOG_WAREHOUSE, MemoryCatalogBuilder};
use iceberg::spec::{NestedField, PrimitiveType, Schema, Transform as IcebergTransform, Type};
use iceberg::{CatalogBuilder, NamespaceIdent, TableCreation, TableIdent};
use iceberg_storage_opendal::OpenDalResolvingStorageFactory;
use keystone_crds::duration::Duration as SpecDuration;
use keystone_crds::pipeline::{IcebergCatalogSpec, IcebergCatalogType, IcebergSinkSpec, SinkSpec};
use keystone_crds::schema::{FieldSpec, FieldType, SchemaSpec};

use super::commit::{EPOCHS, INSTANCE, PIPELINE, RECOVERED, SINK, STAGING};
use super::*;
use crate::event::{Event, Provenance};

/// A memory catalog whose tables live in a temporary folder.
struct Lake {
    dir: PathBuf,
    catalog: Arc<dyn Catalog>,
    // Runs the catalog's spawned work; outlives every sink of the test.
    rt: tokio::runtime::Runtime,
}

impl Lake {
    fn new(name: &str) -> Lake {
        let dir =
            std::env::temp_dir().join(format!("keystone-iceberg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let rt = runtime().unwrap();
        let catalog = rt
            .block_on(
                MemoryCatalogBuilder::default()
                    .with_storage_factory(Arc::new(OpenDalResolvingStorageFactory::new()))
                    .with_runtime(iceberg::Runtime::new(&rt))
                    .load(
                        "test",
                        HashMap::from([(
                            MEMORY_CATALOG_WAREHOUSE.to_owned(),
                            format!("file://{}", dir.display()),
                        )]),
                    ),
            )
            .unwrap();
        Lake {
            dir,
            catalog: Arc::new(catalog),
            rt,
        }
    }

    fn sink(&self, partition_by: &[&str], commit_interval: u64) -> IcebergSink {
        self.try_sink(partition_by, commit_interval).unwrap()
    }

    fn try_sink(
        &self,
        partition_by: &[&str],
        commit_interval: u64,
    ) -> Result<IcebergSink, LakeError> {
        IcebergSink::build(
            &plan_sink(partition_by, commit_interval),
            "orders-pipeline",
            runtime().unwrap(),
            self.catalog.clone(),
        )
    }

    fn ident() -> TableIdent {
        TableIdent::new(NamespaceIdent::new("shop".into()), "orders".into())
    }

    fn table(&self) -> Table {
        self.rt
            .block_on(self.catalog.load_table(&Self::ident()))
            .unwrap()
    }

    /// The summaries of the table's snapshots, oldest first.
    fn summaries(&self) -> Vec<HashMap<String, String>> {
        let table = self.table();
        let mut snapshots: Vec<_> = table.metadata().snapshots().cloned().collect();
        snapshots.sort_by_key(|s| s.sequence_number());
        snapshots
            .iter()
            .map(|s| s.summary().additional_properties.clone())
            .collect()
    }

    /// Every row of the table's current snapshot, read with the crate's scan.
    fn batches(&self) -> Vec<RecordBatch> {
        let table = self.table();
        self.rt.block_on(async {
            table
                .scan()
                .select_all()
                .build()
                .unwrap()
                .to_arrow()
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap()
        })
    }

    /// The ids in the table, sorted.
    fn ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .batches()
            .iter()
            .flat_map(|b| {
                let column = b.column_by_name("id").unwrap().as_primitive::<Int64Type>();
                column.iter().flatten().collect::<Vec<_>>()
            })
            .collect();
        ids.sort();
        ids
    }

    /// The staging manifests left (file names).
    fn staging(&self) -> Vec<String> {
        let folder = self.dir.join("shop/orders").join(STAGING);
        let mut names: Vec<String> = std::fs::read_dir(folder)
            .map(|entries| {
                entries
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Drop for Lake {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
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

fn plan_sink(partition_by: &[&str], commit_interval: u64) -> PlanSink {
    PlanSink {
        name: "lake".into(),
        key: vec![],
        schema: SchemaSpec {
            fields: vec![
                field("id", FieldType::Integer, false),
                field("country", FieldType::String, false),
                field("at", FieldType::Timestamp, false),
                field("amount", FieldType::Number, true),
                field("user.name", FieldType::String, true),
                field("tags", FieldType::Array, true),
            ],
            open: true,
        },
        spec: SinkSpec {
            name: "lake".into(),
            kafka: None,
            elasticsearch: None,
            iceberg: Some(IcebergSinkSpec {
                catalog: IcebergCatalogSpec {
                    catalog_type: IcebergCatalogType::Rest,
                    uri: "http://127.0.0.1:1".into(),
                    warehouse: "unused".into(),
                    credentials_secret: None,
                },
                namespace: "shop".into(),
                table: "orders".into(),
                partition_by: partition_by.iter().map(|t| t.to_string()).collect(),
                commit_interval: SpecDuration::from_secs(commit_interval),
            }),
            parquet: None,
        },
        avro: None,
        avro_key: None,
    }
}

fn event(id: i64) -> String {
    let country = ["NL", "DE", "FR"][id as usize % 3];
    format!(
        r#"{{"id":{id},"country":"{country}","at":"2026-03-0{}T1{}:30:00Z","amount":{}.5,"user":{{"name":"u{id}"}},"tags":["a",{id}]}}"#,
        1 + id % 3,
        id % 4,
        id
    )
}

fn write_texts(sink: &mut IcebergSink, texts: &[String]) -> Vec<DeadLetter> {
    write_texts_from(sink, 0, texts)
}

/// Writes `texts` as the records of partition 0 from offset `first` on.
fn write_texts_from(sink: &mut IcebergSink, first: i64, texts: &[String]) -> Vec<DeadLetter> {
    let mut out = SinkOutput::default();
    for (offset, text) in (first..).zip(texts) {
        let mut event = Event::parse(text.as_bytes().to_vec()).unwrap();
        event.source = Some(Provenance {
            partition: 0,
            offset,
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
    out.dead_letters
}

fn write(sink: &mut IcebergSink, ids: std::ops::Range<i64>) {
    let texts: Vec<String> = ids.map(event).collect();
    assert!(write_texts(sink, &texts).is_empty());
}

fn prepare(sink: &mut IcebergSink) {
    let mut out = SinkOutput::default();
    assert_eq!(
        sink.prepare(Duration::from_secs(5), &mut out).unwrap(),
        Prepared::Ready
    );
}

#[test]
fn a_missing_table_is_created_from_the_contract_with_its_partition_spec() {
    let lake = Lake::new("create");
    let sink = lake.sink(&["country", "day(at)", "bucket(4, id)"], 60);
    assert_eq!(sink.guarantee(), Guarantee::TwoPhase);
    let table = lake.table();
    let schema = table.metadata().current_schema();
    let described: Vec<(String, bool)> = schema
        .as_struct()
        .fields()
        .iter()
        .map(|f| (f.name.clone(), f.required))
        .collect();
    let expected = [
        ("id", true),
        ("country", true),
        ("at", true),
        ("amount", false),
        // Every member listed is optional, so the struct is too.
        ("user", false),
        ("tags", false),
    ];
    assert_eq!(
        described,
        expected.map(|(n, r)| (n.to_owned(), r)),
        "columns in the contract's order, required unless optional"
    );
    let primitive = |name: &str| match schema.field_by_name(name).unwrap().field_type.as_ref() {
        Type::Primitive(p) => p.clone(),
        other => panic!("{name} is {other}"),
    };
    assert_eq!(primitive("id"), PrimitiveType::Long);
    assert_eq!(primitive("country"), PrimitiveType::String);
    assert_eq!(primitive("at"), PrimitiveType::Timestamptz);
    assert_eq!(primitive("amount"), PrimitiveType::Double);
    assert_eq!(
        primitive("tags"),
        PrimitiveType::String,
        "arrays are JSON text"
    );
    let user = schema.field_by_name("user.name").unwrap();
    assert_eq!(*user.field_type, Type::Primitive(PrimitiveType::String));
    assert!(!user.required);

    let spec = table.metadata().default_partition_spec();
    assert_eq!(spec.spec_id(), 0);
    let fields: Vec<(String, IcebergTransform, String)> = spec
        .fields()
        .iter()
        .map(|f| {
            let source = schema.name_by_field_id(f.source_id).unwrap().to_owned();
            (f.name.clone(), f.transform, source)
        })
        .collect();
    assert_eq!(
        fields,
        [
            (
                "country".into(),
                IcebergTransform::Identity,
                "country".into()
            ),
            ("at_day".into(), IcebergTransform::Day, "at".into()),
            (
                "id_bucket_4".into(),
                IcebergTransform::Bucket(4),
                "id".into()
            ),
        ]
    );
}

#[test]
fn rows_staged_at_prepare_are_appended_once_at_publish() {
    let lake = Lake::new("publish");
    let mut sink = lake.sink(&["country", "day(at)"], 60);
    write(&mut sink, 0..30);
    prepare(&mut sink);
    let instance = sink.ledger.instance.clone();
    assert_eq!(
        sink.staged(),
        [StagedEpochs {
            instance: instance.clone(),
            first: 1,
            last: 1
        }]
    );
    assert_eq!(lake.staging(), [format!("{instance}-1.json")]);
    assert!(
        lake.summaries().is_empty(),
        "nothing is visible before publish"
    );
    // Data files are in the table's partition folders already.
    let data = lake.dir.join("shop/orders/data");
    assert!(data.join("country=NL").is_dir(), "{}", data.display());

    sink.publish().unwrap();
    assert_eq!(lake.ids(), (0..30).collect::<Vec<_>>());
    let summaries = lake.summaries();
    assert_eq!(summaries.len(), 1);
    let summary = &summaries[0];
    assert_eq!(summary[PIPELINE], "orders-pipeline");
    assert_eq!(summary[SINK], "lake");
    assert_eq!(summary[INSTANCE], instance);
    assert_eq!(summary[EPOCHS], "1-1");
    assert!(!summary.contains_key(RECOVERED));
    assert_eq!(summary["added-records"], "30");
    assert!(sink.staged().is_empty());
    assert!(lake.staging().is_empty(), "staging manifests are deleted");

    // The rows as written: nested members, JSON text, timestamps.
    let batches = lake.batches();
    let batch = batches.iter().find(|b| b.num_rows() > 0).unwrap();
    let user = batch.column_by_name("user").unwrap().as_struct();
    assert!(
        user.column_by_name("name")
            .unwrap()
            .as_string::<i32>()
            .value(0)
            .starts_with('u')
    );
    let tags = batch.column_by_name("tags").unwrap().as_string::<i32>();
    assert!(tags.value(0).starts_with("[\"a\","), "{}", tags.value(0));

    // The same epoch again (a marker naming it, as after a crash): nothing.
    sink.recover(vec![StagedEpochs {
        instance: instance.clone(),
        first: 1,
        last: 1,
    }])
    .unwrap();
    sink.publish().unwrap();
    let mut other = lake.sink(&["country", "day(at)"], 60);
    other
        .recover(vec![StagedEpochs {
            instance,
            first: 1,
            last: 1,
        }])
        .unwrap();
    other.publish().unwrap();
    assert_eq!(lake.summaries().len(), 1, "no second snapshot");
    assert_eq!(lake.ids(), (0..30).collect::<Vec<_>>());
    assert!(sink.staged().is_empty() && other.staged().is_empty());
}

#[test]
fn epochs_accumulate_until_the_commit_interval_has_passed() {
    let lake = Lake::new("interval");
    let mut sink = lake.sink(&[], 3600);
    write(&mut sink, 0..5);
    prepare(&mut sink);
    sink.publish().unwrap();
    assert_eq!(
        lake.summaries().len(),
        1,
        "the first publish appends at once"
    );

    write(&mut sink, 5..10);
    prepare(&mut sink);
    sink.publish().unwrap();
    write(&mut sink, 10..15);
    prepare(&mut sink);
    sink.publish().unwrap();
    assert_eq!(
        lake.summaries().len(),
        1,
        "within the interval nothing more"
    );
    let instance = sink.ledger.instance.clone();
    assert_eq!(
        sink.staged(),
        [StagedEpochs {
            instance: instance.clone(),
            first: 2,
            last: 3
        }],
        "unappended epochs stay in the commits' markers"
    );
    assert_eq!(lake.ids(), (0..5).collect::<Vec<_>>());

    // A recovery appends at once, with everything staged, in one snapshot.
    sink.recover(vec![StagedEpochs {
        instance: instance.clone(),
        first: 2,
        last: 2,
    }])
    .unwrap();
    sink.publish().unwrap();
    let summaries = lake.summaries();
    assert_eq!(summaries.len(), 2);
    assert_eq!(summaries[1][EPOCHS], "2-3");
    assert_eq!(lake.ids(), (0..15).collect::<Vec<_>>());
    assert!(sink.staged().is_empty());
}

/// Several partition fields: a staging manifest must keep their order.
const TERMS: &[&str] = &["country", "day(at)", "bucket(2, id)"];

#[test]
fn a_recovered_epoch_of_another_instance_is_appended_exactly_once() {
    let lake = Lake::new("recover");
    let mut crashed = lake.sink(TERMS, 60);
    write(&mut crashed, 0..12);
    prepare(&mut crashed);
    let marker = crashed.staged().pop().unwrap();
    // The instance stops after the host committed its marker, before publishing.
    drop(crashed);
    let manifest = lake
        .dir
        .join("shop/orders")
        .join(STAGING)
        .join(format!("{}-1.json", marker.instance));
    let kept = std::fs::read(&manifest).unwrap();

    let mut heir = lake.sink(TERMS, 3600);
    heir.recover(vec![marker.clone()]).unwrap();
    assert_eq!(
        heir.staged(),
        std::slice::from_ref(&marker),
        "named in the heir's commits until appended"
    );
    write(&mut heir, 100..103);
    prepare(&mut heir);
    heir.publish().unwrap();
    let summaries = lake.summaries();
    assert_eq!(
        summaries.len(),
        1,
        "its own epoch and the recovered one together"
    );
    assert_eq!(summaries[0][RECOVERED], marker.to_string());
    assert_eq!(summaries[0][INSTANCE], heir.ledger.instance);
    assert_eq!(summaries[0][EPOCHS], "1-1");
    let mut expected: Vec<i64> = (0..12).chain(100..103).collect();
    expected.sort();
    assert_eq!(lake.ids(), expected);
    assert!(lake.staging().is_empty());

    // A crash between the append and the clean-up leaves the manifest: a
    // third instance recovering the same marker appends nothing.
    std::fs::write(&manifest, kept).unwrap();
    let mut third = lake.sink(TERMS, 60);
    third.recover(vec![marker]).unwrap();
    third.publish().unwrap();
    assert_eq!(lake.summaries().len(), 1);
    assert_eq!(lake.ids(), expected);
    assert!(
        lake.staging().is_empty(),
        "the left-over manifest is cleaned up"
    );
}

#[test]
fn an_abort_drops_buffered_and_staged_rows_and_never_reuses_an_epoch() {
    let lake = Lake::new("abort");
    let mut sink = lake.sink(&["country"], 60);
    write(&mut sink, 0..4);
    prepare(&mut sink);
    write(&mut sink, 4..8);
    sink.abort();
    assert!(sink.staged().is_empty());
    write(&mut sink, 8..10);
    prepare(&mut sink);
    let instance = sink.ledger.instance.clone();
    assert_eq!(
        sink.staged(),
        [StagedEpochs {
            instance,
            first: 3,
            last: 3
        }]
    );
    sink.publish().unwrap();
    assert_eq!(lake.ids(), [8, 9]);
    assert_eq!(lake.summaries()[0][EPOCHS], "3-3");
}

#[test]
fn batches_are_written_as_they_fill_and_files_close_at_prepare() {
    let lake = Lake::new("batches");
    let mut sink = lake.sink(&["bucket(3, id)"], 60);
    let n = (BATCH_ROWS * 2 + 100) as i64;
    write(&mut sink, 0..n);
    assert_eq!(sink.written, 2, "two full batches are in the open files");
    assert!(!sink.backpressured());
    prepare(&mut sink);
    sink.publish().unwrap();
    assert_eq!(lake.ids(), (0..n).collect::<Vec<_>>());
    let table = lake.table();
    let snapshot = table.metadata().current_snapshot().unwrap();
    assert_eq!(
        snapshot.summary().additional_properties["added-data-files"],
        "3"
    );
}

#[test]
fn an_abort_while_a_batch_is_being_written_leaves_none_of_it_in_the_table() {
    let lake = Lake::new("abort-writing");
    let mut sink = lake.sink(&["country"], 60);
    let n = BATCH_ROWS as i64;
    write(&mut sink, 0..n);
    assert!(
        sink.writing.is_some(),
        "a full batch is written beside the stage's thread"
    );
    sink.abort();
    assert!(sink.writing.is_none());
    write(&mut sink, n..n + 5);
    prepare(&mut sink);
    sink.publish().unwrap();
    assert_eq!(lake.ids(), (n..n + 5).collect::<Vec<_>>());
}

#[test]
fn an_event_that_does_not_fit_is_a_dead_letter_naming_the_column() {
    let lake = Lake::new("dead");
    let mut sink = lake.sink(&[], 60);
    let letters = write_texts(
        &mut sink,
        &[
            event(1),
            r#"{"id":"two","country":"NL","at":"2026-03-01T10:00:00Z"}"#.to_owned(),
            r#"{"id":3,"at":"2026-03-01T10:00:00Z"}"#.to_owned(),
            r#"{"id":4,"country":"NL","at":"2026-03-01T10:00:00Z","user":{"name":5}}"#.to_owned(),
        ],
    );
    let reasons: Vec<(&str, &str)> = letters
        .iter()
        .map(|l| (l.step.as_str(), l.reason.as_str()))
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons.iter().all(|(step, _)| *step == "sink:lake"));
    assert!(reasons[0].1.contains("id is string"), "{}", reasons[0].1);
    assert!(reasons[1].1.contains("lacks country"), "{}", reasons[1].1);
    assert!(reasons[2].1.contains("user.name"), "{}", reasons[2].1);
    assert_eq!(
        letters[1].original,
        br#"{"id":3,"at":"2026-03-01T10:00:00Z"}"#
    );
    prepare(&mut sink);
    sink.publish().unwrap();
    assert_eq!(
        lake.ids(),
        [1],
        "the refused events left the rows as they were"
    );
}

fn create_table(lake: &Lake, fields: Vec<NestedField>) {
    let schema = Schema::builder()
        .with_fields(fields.into_iter().map(Arc::new))
        .build()
        .unwrap();
    lake.rt.block_on(async {
        let namespace = NamespaceIdent::new("shop".into());
        lake.catalog
            .create_namespace(&namespace, HashMap::new())
            .await
            .unwrap();
        lake.catalog
            .create_table(
                &namespace,
                TableCreation::builder()
                    .name("orders".into())
                    .schema(schema)
                    .build(),
            )
            .await
            .unwrap();
    });
}

fn string() -> Type {
    Type::Primitive(PrimitiveType::String)
}

#[test]
fn an_existing_table_that_cannot_take_the_rows_is_refused_naming_the_column() {
    let cases: Vec<(&str, Vec<NestedField>, &str)> = vec![
        (
            "type",
            vec![NestedField::required(1, "id", string())],
            "column id is string in the table, but the output contract makes it long",
        ),
        (
            "missing",
            vec![NestedField::required(
                1,
                "id",
                Type::Primitive(PrimitiveType::Long),
            )],
            "the output contract's field country has no column in the table",
        ),
        (
            "required",
            vec![
                NestedField::required(1, "id", Type::Primitive(PrimitiveType::Long)),
                NestedField::required(2, "country", string()),
                NestedField::required(3, "at", Type::Primitive(PrimitiveType::Timestamptz)),
                NestedField::required(4, "amount", Type::Primitive(PrimitiveType::Double)),
            ],
            "column amount is required in the table, but the output contract marks it optional",
        ),
    ];
    for (name, fields, message) in cases {
        let lake = Lake::new(&format!("conflict-{name}"));
        create_table(&lake, fields);
        let Err(error) = lake.try_sink(&[], 60) else {
            panic!("{name}: the sink accepted a conflicting table");
        };
        assert!(error.is_permanent(), "{name}: {error}");
        let text = error.to_string();
        assert!(text.contains("table shop.orders"), "{name}: {text}");
        assert!(text.contains(message), "{name}: {text}");
    }
}

#[test]
fn an_existing_table_takes_the_rows_in_its_own_column_order() {
    let lake = Lake::new("existing");
    let long = || Type::Primitive(PrimitiveType::Long);
    create_table(
        &lake,
        vec![
            NestedField::optional(1, "note", string()),
            NestedField::optional(2, "tags", string()),
            NestedField::required(3, "at", Type::Primitive(PrimitiveType::Timestamptz)),
            NestedField::optional(
                4,
                "user",
                Type::Struct(iceberg::spec::StructType::new(vec![
                    Arc::new(NestedField::optional(5, "name", string())),
                    Arc::new(NestedField::optional(6, "age", long())),
                ])),
            ),
            NestedField::optional(7, "amount", Type::Primitive(PrimitiveType::Double)),
            NestedField::required(8, "country", string()),
            NestedField::required(9, "id", long()),
        ],
    );
    let mut sink = lake.sink(&[], 60);
    write(&mut sink, 0..3);
    prepare(&mut sink);
    sink.publish().unwrap();
    assert_eq!(lake.ids(), [0, 1, 2]);
    let batches = lake.batches();
    let batch = &batches[0];
    assert_eq!(
        batch.column_by_name("note").unwrap().null_count(),
        batch.num_rows()
    );
    let user = batch.column_by_name("user").unwrap().as_struct();
    assert_eq!(
        user.column_by_name("age").unwrap().null_count(),
        batch.num_rows()
    );
    assert_eq!(user.column_by_name("name").unwrap().null_count(), 0);
}

#[test]
fn the_sink_starts_while_the_catalog_is_away_and_holds_its_work() {
    let lake = Lake::new("away");
    let registry = prometheus::Registry::new();
    let context = SinkContext {
        registry: &registry,
        pipeline: "orders-pipeline",
    };
    // Nothing listens on port 1: every call is refused at once.
    let mut sink = IcebergSink::connect(&plan_sink(&[], 60), &context).unwrap();
    write(&mut sink, 0..3);
    let mut out = SinkOutput::default();
    assert_eq!(
        sink.prepare(Duration::from_secs(1), &mut out).unwrap(),
        Prepared::Pending
    );
    assert!(sink.staged().is_empty());
    assert_eq!(sink.batches.len(), 1, "the rows are kept for the next try");
    // The table is still opened later, once the catalog answers.
    sink.catalog = lake.catalog.clone();
    prepare(&mut sink);
    sink.publish().unwrap();
    assert_eq!(lake.ids(), [0, 1, 2]);
}

#[test]
fn two_instances_appending_the_same_epoch_at_once_append_it_once() {
    let lake = Lake::new("race");
    let mut crashed = lake.sink(&["country"], 60);
    write(&mut crashed, 0..9);
    prepare(&mut crashed);
    let marker = crashed.staged().pop().unwrap();
    drop(crashed);
    let epochs = || -> BTreeMap<EpochId, Held> {
        BTreeMap::from([((marker.instance.clone(), 1), Held::Unread)])
    };
    let (mut first, mut second) = (epochs(), epochs());
    let ident = Lake::ident();
    let who = |instance| Committer {
        pipeline: "orders-pipeline",
        sink: "lake",
        instance,
    };
    let (a, b) = (who("aaaaaaaaaaaa"), who("bbbbbbbbbbbb"));
    // Both read the snapshots before either commits, unless one finishes
    // first: either way the epoch must be appended once.
    let (a, b) = lake.rt.block_on(async {
        tokio::join!(
            commit::append(lake.catalog.as_ref(), &ident, &a, &mut first),
            commit::append(lake.catalog.as_ref(), &ident, &b, &mut second),
        )
    });
    let snapshots = [a.unwrap().snapshot, b.unwrap().snapshot];
    assert_eq!(snapshots.iter().flatten().count(), 1, "{snapshots:?}");
    assert_eq!(lake.summaries().len(), 1);
    assert_eq!(lake.summaries()[0][RECOVERED], marker.to_string());
    assert_eq!(lake.ids(), (0..9).collect::<Vec<_>>());
}

#[test]
fn a_replay_after_a_rollback_skips_what_the_table_holds() {
    let lake = Lake::new("rollback");
    let mut first = lake.sink(&["country"], 60);
    // Offsets 0..6 of partition 0 (write_texts numbers them from 0).
    write(&mut first, 0..6);
    prepare(&mut first);
    first.publish().unwrap();
    let summaries = lake.summaries();
    assert_eq!(summaries[0][super::commit::PROVENANCE], "0:0-5");
    drop(first);

    // Rolled back to offset 2: the replay reads offsets 2..8 again.
    let mut second = lake.sink(&["country"], 60);
    let suppressed = prometheus::IntCounter::new("suppressed", "test").unwrap();
    second
        .suppress_replay(Some(&BTreeMap::from([(0, 2)])), suppressed.clone())
        .unwrap();
    let texts: Vec<String> = (2..8).map(event).collect();
    assert!(write_texts_from(&mut second, 2, &texts).is_empty());
    prepare(&mut second);
    second.publish().unwrap();
    assert_eq!(suppressed.get(), 4, "offsets 2..=5 are in the table");
    assert_eq!(lake.ids(), (0..8).collect::<Vec<_>>());
    assert_eq!(lake.summaries()[1][super::commit::PROVENANCE], "0:6-7");
}

#[test]
fn a_replay_skips_what_committed_epochs_not_yet_appended_hold() {
    let lake = Lake::new("rollback-staged");
    let mut first = lake.sink(&["country"], 3600);
    write(&mut first, 0..6);
    prepare(&mut first);
    first.publish().unwrap();
    // Offsets 6 and 7: staged and committed, not appended yet (the commit
    // interval has not passed) when the instance stops.
    let texts: Vec<String> = (6..8).map(event).collect();
    assert!(write_texts_from(&mut first, 6, &texts).is_empty());
    prepare(&mut first);
    first.publish().unwrap();
    assert_eq!(lake.summaries().len(), 1, "epoch 2 waits for the interval");
    let marker = first.staged().pop().expect("epoch 2 is staged");
    drop(first);

    // Rolled back to offset 2: the replay reads 2..=9 again, and the epoch
    // its partition's last commit names is recovered before it starts.
    // (No commit interval: the replay's epoch is appended at its publish.)
    let mut second = lake.sink(&["country"], 0);
    let suppressed = prometheus::IntCounter::new("suppressed", "test").unwrap();
    second
        .suppress_replay(Some(&BTreeMap::from([(0, 2)])), suppressed.clone())
        .unwrap();
    second.recover(vec![marker]).unwrap();
    assert_eq!(
        lake.summaries().len(),
        2,
        "appended before the replay starts"
    );
    let texts: Vec<String> = (2..10).map(event).collect();
    assert!(write_texts_from(&mut second, 2, &texts).is_empty());
    prepare(&mut second);
    second.publish().unwrap();
    assert_eq!(suppressed.get(), 6, "offsets 2..=7 are in the table");
    assert_eq!(lake.ids(), (0..10).collect::<Vec<_>>());
}

#[test]
fn a_stopping_instance_appends_what_waits_for_the_commit_interval() {
    let lake = Lake::new("finish");
    let mut sink = lake.sink(&["country"], 3600);
    write(&mut sink, 0..6);
    prepare(&mut sink);
    sink.publish().unwrap();
    let texts: Vec<String> = (6..9).map(event).collect();
    assert!(write_texts_from(&mut sink, 6, &texts).is_empty());
    prepare(&mut sink);
    sink.publish().unwrap();
    assert_eq!(lake.summaries().len(), 1, "epoch 2 waits for the interval");
    sink.finish();
    assert_eq!(lake.summaries().len(), 2);
    assert_eq!(lake.ids(), (0..9).collect::<Vec<_>>());
    assert!(
        sink.staged().is_empty(),
        "nothing left for the next instance"
    );
}

#[test]
fn new_optional_fields_of_the_contract_become_columns_of_the_table() {
    let lake = Lake::new("evolve");
    // Without the struct column: the crate's scan cannot read a struct
    // column of files older than a schema change ("Incorrect number of
    // arrays for StructArray fields"), which other readers do.
    let without_struct = || {
        let mut plan = plan_sink(&["country"], 60);
        plan.schema.fields.retain(|f| !f.name.starts_with("user."));
        plan
    };
    let build = |plan: &PlanSink| {
        IcebergSink::build(
            plan,
            "orders-pipeline",
            runtime().unwrap(),
            lake.catalog.clone(),
        )
    };
    let mut first = build(&without_struct()).unwrap();
    write(&mut first, 0..3);
    prepare(&mut first);
    first.publish().unwrap();
    drop(first);

    // The next version's contract adds an optional field.
    let mut plan = without_struct();
    plan.schema
        .fields
        .push(field("note", FieldType::String, true));
    let mut second = build(&plan).unwrap();
    let texts =
        vec![r#"{"id":3,"country":"NL","at":"2026-03-01T10:00:00Z","note":"new"}"#.to_owned()];
    assert!(write_texts(&mut second, &texts).is_empty());
    prepare(&mut second);
    second.publish().unwrap();

    let schema = lake.table().metadata().current_schema().clone();
    let note = schema.field_by_name("note").expect("note was added");
    assert!(!note.required);
    assert_eq!(lake.ids(), [0, 1, 2, 3]);
    let notes: Vec<Option<String>> = lake
        .batches()
        .iter()
        .flat_map(|b| {
            let column = b.column_by_name("note").unwrap().as_string::<i32>().clone();
            (0..column.len())
                .map(|i| column.is_valid(i).then(|| column.value(i).to_owned()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(notes.iter().flatten().collect::<Vec<_>>(), ["new"]);
    assert_eq!(
        notes.iter().filter(|n| n.is_none()).count(),
        3,
        "older rows read null"
    );

    // A new required field is refused, naming it: the rows there have none.
    let mut plan = without_struct();
    plan.schema
        .fields
        .push(field("region", FieldType::String, false));
    let error = build(&plan).err().expect("a new required field is refused");
    assert!(
        error.to_string().contains("field region has no column"),
        "{error}"
    );
    assert!(error.is_permanent());
}
