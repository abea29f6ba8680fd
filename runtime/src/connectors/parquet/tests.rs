//! The Parquet sink on a local folder: staging and publishing, recovery of
//! another instance's committed epochs, aborts, refused rows, `_SUCCESS`.
//! Files are read back with the parquet crate's own reader.

use std::path::{Path, PathBuf};

use arrow_array::{Array, Int64Array};
use keystone_crds::pipeline::{ParquetSinkSpec, SinkSpec};
use keystone_crds::schema::{FieldSpec, FieldType, SchemaSpec};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::*;
use crate::event::{Event, Provenance};

fn field(name: &str, field_type: FieldType, optional: bool) -> FieldSpec {
    FieldSpec {
        name: name.into(),
        field_type,
        optional,
        description: None,
    }
}

fn plan_sink(dir: &Path, partition_by: &[&str]) -> PlanSink {
    PlanSink {
        name: "lake".into(),
        key: vec![],
        schema: SchemaSpec {
            fields: vec![
                field("id", FieldType::Integer, false),
                field("country", FieldType::String, false),
                field("at", FieldType::Timestamp, false),
                field("user.name", FieldType::String, true),
            ],
            open: true,
        },
        spec: SinkSpec {
            name: "lake".into(),
            kafka: None,
            elasticsearch: None,
            iceberg: None,
            parquet: Some(ParquetSinkSpec {
                path: format!("file://{}", dir.display()),
                partition_by: partition_by.iter().map(|t| t.to_string()).collect(),
                roll_interval: keystone_crds::duration::Duration::from_secs(3600),
                credentials_secret: None,
            }),
        },
        avro: None,
        avro_key: None,
    }
}

fn sink(dir: &Path, partition_by: &[&str]) -> ParquetSink {
    ParquetSink::build(&plan_sink(dir, partition_by), &|_| None).unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keystone-parquet-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(sink: &mut ParquetSink, partition: i32, texts: &[&str]) -> Vec<DeadLetter> {
    write_from(sink, partition, 0, texts)
}

/// Writes `texts` as the records of `partition` from offset `first` on.
fn write_from(
    sink: &mut ParquetSink,
    partition: i32,
    first: i64,
    texts: &[&str],
) -> Vec<DeadLetter> {
    let mut out = SinkOutput::default();
    for (offset, text) in (first..).zip(texts) {
        let mut event = Event::parse(text.as_bytes().to_vec()).unwrap();
        event.source = Some(Provenance { partition, offset });
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

fn prepare(sink: &mut ParquetSink) {
    let mut out = SinkOutput::default();
    assert_eq!(
        sink.prepare(Duration::from_secs(5), &mut out).unwrap(),
        Prepared::Ready
    );
}

/// Every file under `dir` (relative paths, sorted).
fn files(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, found: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(base, &path, found);
            } else {
                found.push(path.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut found = Vec::new();
    walk(dir, dir, &mut found);
    found.sort();
    found
}

/// Published data files (readers skip `_` names: staging and markers).
fn published(dir: &Path) -> Vec<String> {
    files(dir)
        .into_iter()
        .filter(|f| !f.split('/').any(|part| part.starts_with('_')))
        .collect()
}

/// The ids in the published files, sorted.
fn published_ids(dir: &Path) -> Vec<i64> {
    let mut ids = Vec::new();
    for file in published(dir) {
        let reader =
            ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(dir.join(&file)).unwrap())
                .unwrap()
                .build()
                .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let column = batch.column_by_name("id").unwrap();
            let column = column.as_any().downcast_ref::<Int64Array>().unwrap();
            ids.extend(column.iter().flatten());
        }
    }
    ids.sort();
    ids
}

#[test]
fn files_are_staged_at_prepare_and_published_after_the_commit() {
    let dir = temp_dir("publish");
    let mut sink = sink(&dir, &["country", "day(at)"]);
    assert_eq!(sink.guarantee(), Guarantee::TwoPhase);
    let refused = write(
        &mut sink,
        0,
        &[
            r#"{"id":1,"country":"NL","at":"2026-12-03T10:00:00Z","user":{"name":"ann"}}"#,
            r#"{"id":2,"country":"NL","at":"2026-12-03T11:00:00Z"}"#,
            r#"{"id":3,"country":"FR","at":"2026-12-04T01:00:00Z","extra":true}"#,
        ],
    );
    assert!(refused.is_empty(), "{refused:?}");
    assert!(files(&dir).is_empty(), "nothing is written before prepare");
    prepare(&mut sink);
    let staged = sink.staged();
    assert_eq!(staged.len(), 1);
    assert_eq!(staged[0].epochs(), 1..=1);
    assert!(
        published(&dir).is_empty(),
        "staged files are invisible to readers"
    );
    let staged_data: Vec<String> = files(&dir)
        .into_iter()
        .filter(|f| f.ends_with(".parquet"))
        .collect();
    assert_eq!(
        staged_data.len(),
        2,
        "one file per folder: {:?}",
        files(&dir)
    );
    assert!(
        files(&dir)
            .iter()
            .any(|f| f.contains("/_keystone/provenance/0/")),
        "the epoch's source records are staged beside its files: {:?}",
        files(&dir)
    );
    sink.publish().unwrap();
    assert!(sink.staged().is_empty());
    let instance = &staged[0].instance;
    assert_eq!(
        published(&dir),
        [
            format!("country=FR/date=2026-12-04/part-{instance}-00000001-0000.zstd.parquet"),
            format!("country=NL/date=2026-12-03/part-{instance}-00000001-0000.zstd.parquet"),
        ]
    );
    assert_eq!(published_ids(&dir), [1, 2, 3]);
    // The partition column lives in the folder name only, as Hive has it.
    let file = dir.join(&published(&dir)[1]);
    let reader =
        ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(file).unwrap()).unwrap();
    let schema = reader.schema().clone();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["id", "at", "user"]);
    let metadata = reader.metadata().clone();
    let compression = metadata.row_group(0).column(0).compression();
    assert!(
        matches!(compression, Compression::ZSTD(_)),
        "{compression:?}"
    );
    let batch = reader.build().unwrap().next().unwrap().unwrap();
    let user = batch.column_by_name("user").unwrap();
    assert_eq!(
        user.null_count(),
        1,
        "the event without user has a null struct"
    );
}

#[test]
fn an_abort_drops_what_was_not_staged_and_epochs_are_not_reused() {
    let dir = temp_dir("abort");
    let mut sink = sink(&dir, &[]);
    write(&mut sink, 0, &[r#"{"id":1,"country":"NL","at":1}"#]);
    sink.abort();
    prepare(&mut sink);
    assert!(sink.staged().is_empty(), "nothing left to stage");
    write(&mut sink, 0, &[r#"{"id":2,"country":"NL","at":1}"#]);
    prepare(&mut sink);
    assert_eq!(sink.staged()[0].epochs(), 2..=2, "epoch 1 was aborted");
    sink.publish().unwrap();
    assert_eq!(published_ids(&dir), [2]);
}

#[test]
fn epochs_a_commit_names_are_published_by_whoever_recovers_them() {
    let dir = temp_dir("recover");
    // The first instance stages and "commits" (its marker is what the host
    // would write in the offset metadata), then dies before publishing.
    let mut first = sink(&dir, &["country"]);
    write(&mut first, 0, &[r#"{"id":1,"country":"NL","at":1}"#]);
    prepare(&mut first);
    write(&mut first, 0, &[r#"{"id":2,"country":"NL","at":2}"#]);
    prepare(&mut first);
    let committed = first.staged();
    assert_eq!(committed[0].epochs(), 1..=2);
    // It staged a third epoch that was never committed.
    write(&mut first, 0, &[r#"{"id":3,"country":"NL","at":3}"#]);
    prepare(&mut first);
    drop(first);

    let mut second = sink(&dir, &["country"]);
    second.recover(committed.clone()).unwrap();
    assert_eq!(
        second.staged(),
        committed,
        "named in the next commit until published"
    );
    write(&mut second, 0, &[r#"{"id":3,"country":"NL","at":3}"#]);
    prepare(&mut second);
    second.publish().unwrap();
    assert_eq!(
        published_ids(&dir),
        [1, 2, 3],
        "the uncommitted epoch is not published"
    );
    // A second recovery of the same epochs (another instance, or a retry)
    // finds nothing left to move.
    let mut third = sink(&dir, &["country"]);
    third.recover(committed).unwrap();
    prepare(&mut third);
    third.publish().unwrap();
    assert_eq!(published_ids(&dir), [1, 2, 3]);
}

#[test]
fn events_that_fit_no_row_or_folder_are_dead_letters_naming_the_field() {
    let dir = temp_dir("refused");
    let mut sink = sink(&dir, &["country", "hour(at)"]);
    let refused = write(
        &mut sink,
        0,
        &[
            r#"{"id":"one","country":"NL","at":1}"#,
            r#"{"country":"NL","at":1}"#,
            r#"{"id":1,"country":"NL","at":"soon"}"#,
            r#"{"id":1,"country":["NL"],"at":1}"#,
            r#"{"id":4,"country":"NL","at":1,"user":{"name":5}}"#,
            r#"{"id":5,"country":"NL","at":1}"#,
        ],
    );
    let reasons: Vec<&str> = refused.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(refused.len(), 5, "{reasons:?}");
    assert!(reasons[0].contains("id is string"), "{}", reasons[0]);
    assert!(reasons[1].contains("lacks id"), "{}", reasons[1]);
    assert!(
        reasons[2].contains("needs at to be a timestamp"),
        "{}",
        reasons[2]
    );
    assert!(
        reasons[3].contains("cannot name a folder"),
        "{}",
        reasons[3]
    );
    assert!(
        reasons[4].contains("user.name is integer"),
        "{}",
        reasons[4]
    );
    assert!(refused.iter().all(|d| d.step == "sink:lake"));
    prepare(&mut sink);
    sink.publish().unwrap();
    assert_eq!(
        published_ids(&dir),
        [5],
        "refused rows left the others whole"
    );
}

#[test]
fn success_marks_a_time_folder_once_event_time_passes_its_end() {
    let dir = temp_dir("success");
    let mut sink = sink(&dir, &["day(at)", "hour(at)"]);
    write(
        &mut sink,
        0,
        &[r#"{"id":1,"country":"NL","at":"2026-12-03T10:59:00Z"}"#],
    );
    write(
        &mut sink,
        1,
        &[r#"{"id":2,"country":"NL","at":"2026-12-03T11:30:00Z"}"#],
    );
    prepare(&mut sink);
    sink.publish().unwrap();
    let marker = "date=2026-12-03/hour=10/_SUCCESS";
    assert!(
        !files(&dir).contains(&marker.to_owned()),
        "partition 0 has not passed 11:00 yet"
    );
    write(
        &mut sink,
        0,
        &[r#"{"id":3,"country":"NL","at":"2026-12-03T11:01:00Z"}"#],
    );
    prepare(&mut sink);
    sink.publish().unwrap();
    let all = files(&dir);
    assert!(all.contains(&marker.to_owned()), "{all:?}");
    let next_hour = "date=2026-12-03/hour=11/_SUCCESS".to_owned();
    assert!(!all.contains(&next_hour));
    // The bookkeeping lives in the store: another instance (this one gone)
    // completes the folder once every partition passes its end.
    drop(sink);
    let mut next = super::tests::sink(&dir, &["day(at)", "hour(at)"]);
    write(
        &mut next,
        0,
        &[r#"{"id":4,"country":"NL","at":"2026-12-03T12:00:00Z"}"#],
    );
    prepare(&mut next);
    next.publish().unwrap();
    assert!(
        !files(&dir).contains(&next_hour),
        "partition 1 is still at 11:30"
    );
    write(
        &mut next,
        1,
        &[r#"{"id":5,"country":"NL","at":"2026-12-03T12:10:00Z"}"#],
    );
    prepare(&mut next);
    next.publish().unwrap();
    assert!(files(&dir).contains(&next_hour), "{:?}", files(&dir));
    assert_eq!(published_ids(&dir), [1, 2, 3, 4, 5]);
}

#[test]
fn folder_values_are_escaped_on_disk_as_hive_writes_them() {
    let dir = temp_dir("escape");
    let mut sink = sink(&dir, &["country"]);
    write(&mut sink, 0, &[r#"{"id":1,"country":"a/b%","at":1}"#]);
    prepare(&mut sink);
    sink.publish().unwrap();
    let published = published(&dir);
    assert_eq!(published.len(), 1);
    assert!(
        published[0].starts_with("country=a%2Fb%25/"),
        "{published:?}"
    );
}

#[test]
fn a_contract_without_fields_or_an_unwritable_term_is_refused_at_build() {
    let dir = temp_dir("refuse-build");
    let mut plan = plan_sink(&dir, &["bucket(4, id)"]);
    let error = ParquetSink::build(&plan, &|_| None).err().unwrap();
    assert!(error.to_string().contains("bucket(4, id)"), "{error}");
    assert!(error.is_permanent());
    plan = plan_sink(&dir, &[]);
    plan.schema = SchemaSpec::default();
    let error = ParquetSink::build(&plan, &|_| None).err().unwrap();
    assert!(error.to_string().contains("lists no fields"), "{error}");
}

/// Events 0..n of one country, as partition 0 holds them at offsets 0..n.
fn numbered_events(n: i64) -> Vec<String> {
    (0..n)
        .map(|i| format!(r#"{{"id":{i},"country":"NL","at":{i}}}"#))
        .collect()
}

/// A sink by country that has published the first six of `texts`.
fn sink_with_six_published(dir: &Path, texts: &[&str]) -> ParquetSink {
    let mut first = sink(dir, &["country"]);
    write(&mut first, 0, &texts[..6]);
    prepare(&mut first);
    first.publish().unwrap();
    first
}

#[test]
fn a_replay_after_a_rollback_skips_what_the_lake_holds() {
    let dir = temp_dir("rollback");
    let events = numbered_events(8);
    let texts: Vec<&str> = events.iter().map(String::as_str).collect();
    let first = sink_with_six_published(&dir, &texts);
    drop(first);

    // Rolled back to offset 2 of partition 0: offsets 2..=5 are held already.
    let mut second = sink(&dir, &["country"]);
    let suppressed = prometheus::IntCounter::new("suppressed", "test").unwrap();
    second
        .suppress_replay(Some(&BTreeMap::from([(0, 2)])), suppressed.clone())
        .unwrap();
    assert!(write_from(&mut second, 0, 2, &texts[2..]).is_empty());
    prepare(&mut second);
    second.publish().unwrap();
    assert_eq!(suppressed.get(), 4);
    assert_eq!(published_ids(&dir), [0, 1, 2, 3, 4, 5, 6, 7]);
}

#[test]
fn a_replay_skips_what_committed_epochs_not_yet_published_hold() {
    let dir = temp_dir("rollback-staged");
    let events = numbered_events(10);
    let texts: Vec<&str> = events.iter().map(String::as_str).collect();
    let mut first = sink_with_six_published(&dir, &texts);
    // Offsets 6 and 7: staged and committed, then the instance stops
    // before publishing them.
    write_from(&mut first, 0, 6, &texts[6..8]);
    prepare(&mut first);
    let committed = first.staged();
    drop(first);

    // Rolled back to offset 2: the replay reads 2..=9 again, and the epoch
    // its partition's last commit names is recovered before it starts.
    let mut second = sink(&dir, &["country"]);
    let suppressed = prometheus::IntCounter::new("suppressed", "test").unwrap();
    second
        .suppress_replay(Some(&BTreeMap::from([(0, 2)])), suppressed.clone())
        .unwrap();
    second.recover(committed).unwrap();
    assert!(write_from(&mut second, 0, 2, &texts[2..]).is_empty());
    prepare(&mut second);
    second.publish().unwrap();
    assert_eq!(suppressed.get(), 6, "offsets 2..=7 are in the lake");
    assert_eq!(published_ids(&dir), (0..10).collect::<Vec<_>>());
}
