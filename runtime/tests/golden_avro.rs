//! The golden cases (`tests/golden/*/`) with their input as an Avro container
//! file: each case's `input.jsonl` is written as records of a writer schema,
//! read back the way `keystone-runtime run --input FILE.avro` reads it
//! ([`AvroLines`]), run through the case's pipeline exactly as `tests/golden.rs`
//! runs the JSON lines, and checked against the SAME `expected.jsonl` and
//! `expected-dead-letters.jsonl`. The events are also written as an Avro
//! container with the schema `--output FILE.avro` derives from the output
//! contract ([`AvroRecords`]), read back and checked against `expected.jsonl`.
//!
//! The writer schema is `input.avsc` in the case's directory when there is one
//! (the source contract is open and the input carries members beyond it, or
//! the contract has a field the derived schema holds as JSON text), otherwise
//! the schema derived from the source contract
//! ([`keystone_avro::contract::schema_for_output`]).
//!
//! What differs between the formats, by construction, and only that:
//!
//! - An input line that is not a record of the writer schema (not JSON, not
//!   an object, or a field of another type than the contract's, missing, or
//!   null where the contract requires a value) cannot be in the container.
//!   Each such line is listed in [`NOT_RECORDS`] with why; the test checks
//!   that exactly the listed lines fail to encode, leaves them out of the Avro
//!   run (the clock still advances for them, so the records after them arrive
//!   at the same processing times) and leaves their dead letter (one each, at
//!   the source check) out of the expected dead letters. All other dead
//!   letters (the steps') must be the same.
//! - A record has every field of its schema: an optional member a JSON line
//!   leaves out is `null` in the Avro run. An object member that is `null` in
//!   what the run produced and absent from what is expected is accepted; any
//!   other member must be there and equal.
//! - An Avro `double` reads back as a JSON float: a number is compared by its
//!   value (`100` and `100.0` are equal), two integers exactly.
//! - The `original` of a dead letter is the line the run read: in the Avro run
//!   the record's JSON form, so it is compared as a JSON value (by the rules
//!   above), and `reason` and `step` as text.

mod golden_support;

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use apache_avro::{Schema, Writer};
use golden_support::{Case, cases, input_lines, parse_lines};
use keystone_avro::Shape;
use keystone_avro::contract::schema_for_output;
use keystone_runtime::local::avro::{AvroLines, AvroRecords, output_schema};
use serde_json::Value;

/// The input lines that no record of the case's writer schema can be, by case
/// and line number in `input.jsonl`: they test the source check of JSON lines,
/// which a record of a schema that has the contract's fields and types passes.
const NOT_RECORDS: &[(&str, usize, &str)] = &[
    (
        "cdc-dedup-order",
        6,
        "seq is a string; the schema's seq is a long",
    ),
    ("cdc-dedup-order", 10, "not JSON"),
    (
        "cdc-dedup-order",
        15,
        "no order_id, which the schema requires",
    ),
    ("dedup-event-time", 8, "ts is not a timestamp"),
    (
        "filter-project",
        5,
        "amount is a string; the schema's is a double",
    ),
    ("filter-project", 6, "no amount, which the schema requires"),
    ("filter-project", 7, "not JSON"),
    ("filter-project", 8, "a JSON array, not a record"),
    // Converts, but to the record whose id is the text "8".
    (
        "filter-project",
        11,
        "id is a number; the schema's is a string",
    ),
    (
        "join-inner",
        4,
        "customer_id is null; the schema's is a string",
    ),
    (
        "join-left-enrich",
        4,
        "customer_id is null; the schema's is a string",
    ),
    ("map-extract", 4, "qty is 2.5; the schema's is a long"),
    (
        "map-extract",
        5,
        "payload has no items, which the schema requires",
    ),
    (
        "order-contiguous",
        9,
        "seq is a string; the schema's is a long",
    ),
    ("order-contiguous", 12, "no k, which the schema requires"),
];

/// Cases whose events are not checked as an `--output FILE.avro` round trip,
/// and why: their events carry what the output contract does not describe,
/// and the derived schema has a column per contract field and no others.
const NO_OUTPUT_ROUND_TRIP: &[(&str, &str)] = &[
    (
        "dedup-processing-time",
        "n is beyond the (open) output contract: the derived schema has no field for it",
    ),
    (
        "map-extract",
        "payload.items and item_count_source are arrays, which the derived schema holds as JSON text",
    ),
];

fn case_name(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().into_owned()
}

fn scratch(case: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("golden-avro")
        .join(case);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The writer schema of the case's input: `input.avsc`, or derived from the
/// source contract.
fn writer_schema(case: &Case, dir: &Path) -> Schema {
    let avsc = dir.join("input.avsc");
    if avsc.exists() {
        let text = std::fs::read_to_string(&avsc).unwrap();
        return Schema::parse_str(&text).unwrap_or_else(|e| panic!("{}: {e}", avsc.display()));
    }
    let name = case_name(dir).replace('-', "_");
    schema_for_output(&case.plan.source.schema, "dev.keystone.golden", &name)
        .unwrap_or_else(|e| panic!("{}: the source contract as a schema: {e}", dir.display()))
        .schema
}

/// Whether `actual` (what the Avro run produced) is `expected`, by the rules in
/// the module's documentation. `epoch_ms`: an integer expected where `actual`
/// is an RFC 3339 string of the same millisecond also matches (a JSON input
/// line may give a timestamp as epoch milliseconds; its record reads back as
/// the RFC 3339 text).
fn matches(actual: &Value, expected: &Value, epoch_ms: bool) -> bool {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => {
            e.iter()
                .all(|(k, ev)| a.get(k).is_some_and(|av| matches(av, ev, epoch_ms)))
                && a.iter().all(|(k, av)| e.contains_key(k) || av.is_null())
        }
        (Value::Array(a), Value::Array(e)) => {
            a.len() == e.len() && a.iter().zip(e).all(|(av, ev)| matches(av, ev, epoch_ms))
        }
        (Value::Number(a), Value::Number(e)) => match (a.as_i64(), e.as_i64()) {
            (Some(a), Some(e)) => a == e,
            _ => a.as_f64() == e.as_f64(),
        },
        (Value::String(a), Value::Number(e)) if epoch_ms => chrono::DateTime::parse_from_rfc3339(a)
            .is_ok_and(|t| Some(t.timestamp_millis()) == e.as_i64()),
        _ => actual == expected,
    }
}

/// The input as an Avro container file: the lines that are records of the
/// schema (that convert to one, and it reads back as the line's event), and
/// the numbers of those that are not, with why.
fn write_input(shape: &Shape, lines: &[(usize, Vec<u8>)], path: &Path) -> Vec<(usize, String)> {
    let mut writer = Writer::new(shape.schema(), File::create(path).unwrap());
    let mut not_records = Vec::new();
    for (number, line) in lines {
        let record = serde_json::from_slice::<Value>(line)
            .map_err(|e| format!("not JSON: {e}"))
            .and_then(|event| {
                let record = shape.from_json(&event).map_err(|e| e.to_string())?;
                // A string field takes any JSON value as its text (`8` as
                // `"8"`): such a record is not the line's event.
                let read = shape.to_json(&record).map_err(|e| e.to_string())?;
                if matches(&read, &event, true) {
                    Ok(record)
                } else {
                    Err(format!("the record reads back as {read}"))
                }
            });
        match record {
            Ok(record) => {
                writer.append(record).unwrap();
            }
            Err(why) => not_records.push((*number, why)),
        }
    }
    writer.flush().unwrap();
    not_records
}

/// The lines `--input FILE.avro` reads from a container file.
fn read_container(input: impl Read, path: &Path) -> Vec<Vec<u8>> {
    let records = AvroLines::new(input, path).unwrap_or_else(|e| panic!("{e}"));
    let mut reader = BufReader::new(records);
    let mut lines = Vec::new();
    loop {
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line).unwrap() == 0 {
            return lines;
        }
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        lines.push(line);
    }
}

fn json(line: &[u8]) -> Value {
    serde_json::from_slice(line)
        .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(line)))
}

/// Checks one case; returns what differs.
fn check_case(dir: &Path) -> Vec<String> {
    let name = case_name(dir);
    let mut problems = Vec::new();
    let case = Case::load(dir);
    let shape = Shape::new(writer_schema(&case, dir)).unwrap();
    let lines = input_lines(dir);

    // The input as a container file, and the lines that cannot be in it.
    let input_path = scratch(&name).join("input.avro");
    let not_records = write_input(&shape, &lines, &input_path);
    let listed: BTreeSet<usize> = NOT_RECORDS
        .iter()
        .filter(|(case, _, _)| *case == name)
        .map(|(_, line, _)| *line)
        .collect();
    let found: BTreeSet<usize> = not_records.iter().map(|(line, _)| *line).collect();
    if listed != found {
        problems.push(format!(
            "the input lines that are not records are {not_records:?}, but NOT_RECORDS lists {listed:?}"
        ));
        return problems;
    }

    // Read back as `--input FILE.avro` reads it: each record is its line's event.
    let records = read_container(
        BufReader::new(File::open(&input_path).unwrap()),
        &input_path,
    );
    let kept: Vec<&(usize, Vec<u8>)> = lines.iter().filter(|(n, _)| !found.contains(n)).collect();
    assert_eq!(
        records.len(),
        kept.len(),
        "{name}: records in {}",
        input_path.display()
    );
    for ((number, line), record) in kept.iter().zip(&records) {
        if !matches(&json(record), &json(line), true) {
            problems.push(format!(
                "input line {number} reads back from Avro as {}",
                String::from_utf8_lossy(record)
            ));
        }
    }

    // The run: the records in the lines' places, a skipped line a tick without input.
    let mut records_iter = records.into_iter();
    let outcome = case.run(lines.iter().map(|(number, _)| {
        if found.contains(number) {
            None
        } else {
            records_iter.next()
        }
    }));

    // Events: the same expected file.
    let expected = parse_lines(&std::fs::read_to_string(dir.join("expected.jsonl")).unwrap());
    let events = parse_lines(&outcome.events.join("\n"));
    compare_events(&mut problems, "events", &events, &expected);

    // Dead letters: the expected file, less those of the lines that are not records.
    let skipped: Vec<Value> = lines
        .iter()
        .filter(|(n, _)| found.contains(n))
        .map(|(_, line)| Value::String(String::from_utf8(line.clone()).unwrap()))
        .collect();
    let all_expected =
        parse_lines(&std::fs::read_to_string(dir.join("expected-dead-letters.jsonl")).unwrap());
    for original in &skipped {
        let letters: Vec<&Value> = all_expected
            .iter()
            .filter(|d| &d["original"] == original)
            .collect();
        assert!(
            letters.len() == 1 && letters[0]["step"] == "source",
            "{name}: the line {original} left out of the Avro run has one dead letter, from the source check, in the JSON run: {letters:?}"
        );
    }
    let expected_dead: Vec<&Value> = all_expected
        .iter()
        .filter(|d| !skipped.contains(&d["original"]))
        .collect();
    let dead = parse_lines(&outcome.dead_letters.join("\n"));
    let same_letter = |a: &Value, e: &Value| {
        a["reason"] == e["reason"]
            && a["step"] == e["step"]
            && matches(
                &json(a["original"].as_str().unwrap_or_default().as_bytes()),
                &json(e["original"].as_str().unwrap_or_default().as_bytes()),
                false,
            )
    };
    if dead.len() != expected_dead.len()
        || !dead
            .iter()
            .zip(&expected_dead)
            .all(|(a, e)| same_letter(a, e))
    {
        problems.push(format!(
            "dead letters:\n  expected {expected_dead:?}\n  got      {dead:?}"
        ));
    }
    for letter in &dead {
        assert!(
            !letter["reason"].as_str().unwrap_or_default().is_empty(),
            "{name}: dead letter without a reason"
        );
        assert!(letter["step"].is_string() && letter["original"].is_string());
    }

    // The events as `--output FILE.avro` writes them, read back.
    if !NO_OUTPUT_ROUND_TRIP.iter().any(|(case, _)| *case == name) {
        match output_round_trip(&case, &outcome.events, &scratch(&name).join("output.avro")) {
            Ok(written) => {
                compare_events(&mut problems, "events written as Avro", &written, &expected)
            }
            Err(e) => problems.push(format!("events written as Avro: {e}")),
        }
    }
    problems
}

fn compare_events(problems: &mut Vec<String>, what: &str, actual: &[Value], expected: &[Value]) {
    if actual.len() != expected.len()
        || !actual
            .iter()
            .zip(expected)
            .all(|(a, e)| matches(a, e, false))
    {
        let show = |v: &[Value]| v.iter().map(|e| format!("\n    {e}")).collect::<String>();
        problems.push(format!(
            "{what}:\n  expected{}\n  got{}",
            show(expected),
            show(actual)
        ));
    }
}

/// Writes `events` (JSON lines) as `--output FILE.avro` does, and reads the
/// file back as events.
fn output_round_trip(case: &Case, events: &[String], path: &Path) -> Result<Vec<Value>, String> {
    let schema = output_schema(&case.plan).map_err(|e| e.to_string())?;
    {
        let mut records =
            AvroRecords::new(File::create(path).unwrap(), schema).map_err(|e| e.to_string())?;
        for event in events {
            records
                .write_all(format!("{event}\n").as_bytes())
                .map_err(|e| e.to_string())?;
        }
        records.flush().map_err(|e| e.to_string())?;
    }
    Ok(
        read_container(BufReader::new(File::open(path).unwrap()), path)
            .iter()
            .map(|line| json(line))
            .collect(),
    )
}

#[test]
fn golden_cases_with_avro_input_and_output() {
    let mut failures = Vec::new();
    for dir in cases() {
        for problem in check_case(&dir) {
            failures.push(format!("{}: {problem}", case_name(&dir)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_listed_line_is_a_line_of_its_case() {
    let names: BTreeSet<String> = cases().iter().map(|d| case_name(d)).collect();
    for (case, line, why) in NOT_RECORDS {
        assert!(names.contains(*case), "{case}: no such case");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(case);
        assert!(
            input_lines(&dir).iter().any(|(n, _)| n == line),
            "{case}: no input line {line} ({why})"
        );
    }
    for (case, _) in NO_OUTPUT_ROUND_TRIP {
        assert!(names.contains(*case), "{case}: no such case");
    }
}
