use super::*;
use serde_json::json;

fn parse(json: &str) -> Schema {
    Schema::parse_str(json).expect("schema")
}

/// [`super::decode`] with the reader prepared for this one record.
fn decode(
    id: u32,
    datum: &[u8],
    writer: &Schema,
    reader: &Schema,
) -> Result<serde_json::Value, RecordError> {
    super::decode(
        id,
        datum,
        writer,
        &Shape::new(reader.clone()).expect("shape"),
    )
}

/// [`super::encode`] with the schema prepared for this one record.
fn encode(event: &serde_json::Value, schema: &Schema, id: u32) -> Result<Vec<u8>, RecordError> {
    super::encode(event, &Shape::new(schema.clone()).expect("shape"), id)
}

const V1: &str = r#"{"type": "record", "name": "User", "namespace": "app", "fields": [
  {"name": "id", "type": "int"},
  {"name": "name", "type": "string"}
]}"#;

/// V1 with `id` widened to long and a new optional field.
const V2: &str = r#"{"type": "record", "name": "User", "namespace": "app", "fields": [
  {"name": "id", "type": "long"},
  {"name": "name", "type": "string"},
  {"name": "email", "type": ["null", "string"], "default": null}
]}"#;

#[test]
fn the_wire_bytes_are_the_registrys() {
    // {id: 1, name: "a"}: zig-zag 1 is 0x02; a string is its length then bytes.
    let framed = encode(&json!({"id": 1, "name": "a"}), &parse(V1), 7).expect("encode");
    assert_eq!(framed, b"\x00\x00\x00\x00\x07\x02\x02a");
    let (id, datum) = wire::split(&framed).expect("framed");
    assert_eq!(
        decode(id, datum, &parse(V1), &parse(V1)).expect("decode"),
        json!({"id": 1, "name": "a"})
    );
}

#[test]
fn an_older_writer_reads_as_the_newer_reader_and_back() {
    let (v1, v2) = (parse(V1), parse(V2));
    assert_eq!(can_read(&v1, &v2), Ok(()));
    let reason = can_read(&v2, &v1).unwrap_err();
    assert!(
        reason.contains("'id'"),
        "a long is not read as an int: {reason}"
    );
    let old = encode(&json!({"id": 5, "name": "ann"}), &v1, 1).expect("encode");
    assert_eq!(
        decode(1, &old[5..], &v1, &v2).expect("decode"),
        json!({"id": 5, "name": "ann", "email": null})
    );
    let new = encode(&json!({"id": 6, "name": "bob", "email": "b@x"}), &v2, 2).expect("encode");
    let v1_long = parse(&V1.replace("\"int\"", "\"long\""));
    assert_eq!(can_read(&v2, &v1_long), Ok(()));
    assert_eq!(
        decode(2, &new[5..], &v2, &v1_long).expect("decode"),
        json!({"id": 6, "name": "bob"}),
        "a field the reader lacks is dropped"
    );
}

#[test]
fn a_writer_the_reader_cannot_read_is_named() {
    let required_email = parse(
        r#"{"type": "record", "name": "User", "namespace": "app", "fields": [
          {"name": "id", "type": "int"},
          {"name": "email", "type": "string"}
        ]}"#,
    );
    let reason = can_read(&parse(V1), &required_email).unwrap_err();
    assert!(reason.contains("email"), "{reason}");
    let datum = &encode(&json!({"id": 1, "name": "a"}), &parse(V1), 1).expect("encode")[5..];
    let error = decode(1, datum, &parse(V1), &required_email).unwrap_err();
    assert!(
        matches!(error, RecordError::Unresolvable { id: 1, .. }),
        "{error}"
    );
}

#[test]
fn bad_bytes_are_the_records_fault_with_a_reason() {
    let v1 = parse(V1);
    let datum = encode(&json!({"id": 1, "name": "abc"}), &v1, 1).expect("encode");
    let truncated = decode(1, &datum[5..datum.len() - 1], &v1, &v1).unwrap_err();
    assert!(
        truncated
            .to_string()
            .starts_with("the record does not decode with its writer schema (id 1): ")
            && truncated
                .to_string()
                .ends_with("the datum ends inside a field (truncated)"),
        "{truncated}"
    );
    // Cut inside the length of a string, and with nothing at all.
    for cut in [&datum[5..6], &[][..]] {
        assert!(
            matches!(
                decode(1, cut, &v1, &v1),
                Err(RecordError::Undecodable { .. })
            ),
            "{cut:?}"
        );
    }
    let mut longer = datum[5..].to_vec();
    longer.extend_from_slice(b"xy");
    assert_eq!(
        decode(1, &longer, &v1, &v1).unwrap_err().to_string(),
        "2 bytes follow the record written with schema id 1"
    );
    // A string whose length prefix claims more than there is.
    let lying = b"\x02\xfe\xff\xff\xff\x0f";
    assert!(matches!(
        decode(1, lying, &v1, &v1),
        Err(RecordError::Undecodable { .. })
    ));
}

#[test]
fn declared_lengths_past_the_limit_are_refused_before_allocating() {
    // The limit in force is the first one set in this process (tests/limits.rs
    // checks Keystone's): either refuses these.
    let v1 = parse(V1);
    // A name declaring 2^40 bytes.
    let mut datum = vec![0x02];
    let mut n: u64 = (1 << 40) << 1;
    while n >= 0x80 {
        datum.push((n as u8) | 0x80);
        n >>= 7;
    }
    datum.push(n as u8);
    let error = decode(1, &datum, &v1, &v1).unwrap_err();
    assert!(matches!(error, RecordError::Undecodable { .. }), "{error}");
    // An array declaring a billion optional strings in a few bytes.
    let list = parse(
        r#"{"type": "record", "name": "L", "fields": [
          {"name": "xs", "type": {"type": "array", "items": ["null", "string"]}}
        ]}"#,
    );
    let error = decode(1, b"\x80\xa8\xd6\xb9\x07", &list, &list).unwrap_err();
    assert!(matches!(error, RecordError::Undecodable { .. }), "{error}");
    let error = decode(1, b"\x80\x80\x80\x20\x02", &list, &list).unwrap_err();
    assert!(matches!(error, RecordError::Undecodable { .. }), "{error}");
}

#[test]
fn writer_schemas_without_a_bound_on_their_records_are_refused() {
    let nulls = parse(
        r#"{"type": "record", "name": "N", "fields": [
          {"name": "inner", "type": {"type": "record", "name": "I", "fields": [
            {"name": "nothing", "type": {"type": "array", "items": "null"}}
          ]}}
        ]}"#,
    );
    assert_eq!(
        can_read(&nulls, &nulls).unwrap_err(),
        "the writer schema's array inner.nothing holds items that take no bytes (null or empty records): Keystone does not read such arrays"
    );
    let list = parse(
        r#"{"type": "record", "name": "Node", "fields": [
          {"name": "next", "type": ["null", "Node"], "default": null}
        ]}"#,
    );
    assert!(
        can_read(&list, &list)
            .unwrap_err()
            .contains("Node contains itself"),
        "recursive"
    );
}

const FUZZED: &str = r#"{"type": "record", "name": "R", "fields": [
  {"name": "a", "type": ["null", "string", "long"]},
  {"name": "b", "type": {"type": "array", "items": {"type": "map", "values": "double"}}},
  {"name": "c", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 3}},
  {"name": "d", "type": {"type": "long", "logicalType": "timestamp-micros"}},
  {"name": "e", "type": {"type": "int", "logicalType": "date"}},
  {"name": "f", "type": {"type": "enum", "name": "E", "symbols": ["X", "Y"]}},
  {"name": "g", "type": {"type": "string", "logicalType": "uuid"}}
]}"#;

/// A valid datum of [`FUZZED`] with bytes overwritten and its end cut.
fn mutated(edits: &[(usize, u8)], keep: usize) -> Vec<u8> {
    let event = json!({
        "a": "text", "b": [{"k": 1.5}, {}], "c": "-12.345", "d": "2026-12-05T00:00:00.000001Z",
        "e": "2026-12-05", "f": "Y", "g": "67e55044-10b1-426f-9247-bb680e5fe0c8"
    });
    let mut datum = encode(&event, &parse(FUZZED), 1).expect("encode")[5..].to_vec();
    for &(at, byte) in edits {
        let len = datum.len();
        datum[at % len] = byte;
    }
    datum.truncate(keep);
    datum
}

proptest::proptest! {
    /// No bytes crash the reader: every datum decodes or is refused, and what
    /// decodes is written back as the same event.
    #[test]
    fn any_bytes_decode_or_are_refused(
        edits in proptest::collection::vec((0..usize::MAX, proptest::num::u8::ANY), 0..4),
        keep in 0..200usize,
    ) {
        let schema = parse(FUZZED);
        let datum = mutated(&edits, keep);
        let mut text = Vec::new();
        let shape = Shape::new(schema.clone()).expect("shape");
        // The reader's own schema: read without resolution, it must give
        // what resolution gives, refusals included.
        let writer = WriterSchema::new(&schema, &shape).expect("prepared");
        proptest::prop_assert!(writer.is_reader());
        let as_text = super::decode_json(1, &datum, &writer, &shape, &mut text);
        match decode(1, &datum, &schema, &schema) {
            Ok(event) => {
                as_text.expect("the text of what decodes");
                proptest::prop_assert_eq!(serde_json::from_slice::<serde_json::Value>(&text).expect("JSON"), event.clone());
                let written = encode(&event, &schema, 1).expect("what was read is written");
                proptest::prop_assert_eq!(decode(1, &written[5..], &schema, &schema).expect("read back"), event);
            }
            Err(error) => proptest::prop_assert_eq!(
                as_text.expect_err("refused as text too").to_string(),
                error.to_string()
            ),
        }
    }
}

#[test]
fn the_fuzzed_datums_include_records_that_decode() {
    let schema = parse(FUZZED);
    decode(1, &mutated(&[], usize::MAX), &schema, &schema).expect("unedited");
    // A changed symbol index still decodes; a cut one does not.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut decoded = 0;
    for _ in 0..500 {
        use proptest::strategy::{Strategy, ValueTree};
        let edits = proptest::collection::vec((0..usize::MAX, proptest::num::u8::ANY), 0..4)
            .new_tree(&mut runner)
            .expect("edits")
            .current();
        if decode(1, &mutated(&edits, usize::MAX), &schema, &schema).is_ok() {
            decoded += 1;
        }
    }
    assert!(decoded > 50 && decoded < 500, "{decoded} of 500 decoded");
}
#[test]
fn a_decimal_in_as_few_bytes_as_it_needs_is_read() {
    // What Java's and Python's serializers write for 12.34 at precision 10:
    // the unscaled 1234 in two bytes.
    let schema = parse(
        r#"{"type": "record", "name": "P", "fields": [
          {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}},
          {"name": "refund", "type": ["null", {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}]}
        ]}"#,
    );
    let datum = b"\x04\x04\xd2\x02\x02\xfb";
    assert_eq!(
        decode(1, datum, &schema, &schema).expect("decode"),
        json!({"price": "12.34", "refund": "-0.05"})
    );
}

#[test]
fn only_the_readers_own_schema_skips_resolution() {
    let reader = parse(
        r#"{"type": "record", "name": "R", "fields": [
      {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}}]}"#,
    );
    let shape = Shape::new(reader.clone()).expect("shape");
    assert!(super::is_reader_schema(&reader, &shape));
    // The same parsing canonical form, without the logical type: resolution
    // makes the long a timestamp, so it must not be skipped.
    let plain =
        parse(r#"{"type": "record", "name": "R", "fields": [{"name": "at", "type": "long"}]}"#);
    assert!(!super::is_reader_schema(&plain, &shape));
    let with_default = parse(
        r#"{"type": "record", "name": "R", "fields": [
      {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
      {"name": "note", "type": ["null", "string"], "default": null}]}"#,
    );
    assert!(!super::is_reader_schema(&with_default, &shape));
}

#[test]
fn a_prepared_writer_that_is_not_the_reader_is_resolved() {
    let writer = parse(V1);
    let reader = parse(V2);
    let shape = Shape::new(reader.clone()).expect("shape");
    let prepared = WriterSchema::new(&writer, &shape).expect("prepared");
    assert!(!prepared.is_reader());
    let datum = &encode(&json!({"id": 7, "name": "ada"}), &writer, 1).expect("encode")[5..];
    let mut text = Vec::new();
    super::decode_json(1, datum, &prepared, &shape, &mut text).expect("decode");
    let expected = decode(1, datum, &writer, &reader).expect("decode");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&text).expect("JSON"),
        expected
    );
    assert_eq!(expected["id"], json!(7));
    // A datum cut short, or with bytes after it, is refused as unprepared.
    let cut = &datum[..datum.len() - 1];
    assert!(matches!(
        super::decode_json(1, cut, &prepared, &shape, &mut Vec::new()),
        Err(RecordError::Undecodable { .. })
    ));
    let long = [datum, b"\x00"].concat();
    assert!(matches!(
        super::decode_json(1, &long, &prepared, &shape, &mut Vec::new()),
        Err(RecordError::TrailingBytes { extra: 1, .. })
    ));
}

#[test]
fn a_framed_writer_writes_what_encode_writes_record_after_record() {
    let schema = parse(FUZZED);
    let mut writer =
        FramedWriter::new(Shape::new(schema.clone()).expect("shape"), 300).expect("writer");
    let events = [
        json!({
            "a": "text", "b": [{"k": 1.5}, {}], "c": "-12.345", "d": "2026-12-05T00:00:00.000001Z",
            "e": "2026-12-05", "f": "Y", "g": "67e55044-10b1-426f-9247-bb680e5fe0c8"
        }),
        json!({
            "a": null, "b": [], "c": "0.001", "d": "1970-01-01T00:00:00Z",
            "e": "1969-12-31", "f": "X", "g": "00000000-0000-0000-0000-000000000000"
        }),
    ];
    for event in events.iter().chain(&events) {
        let framed = writer.encode::<json::SerdeJson>(event).expect("fits");
        assert_eq!(framed, encode(event, &schema, 300).expect("fits"));
        assert_eq!(&framed[..5], b"\x00\x00\x00\x01\x2c", "magic and id 300");
        assert_eq!(
            decode(300, &framed[5..], &schema, &schema).expect("read back"),
            *event
        );
    }
    let misfit = json!({"a": null, "b": [], "c": "0", "d": "1970-01-01T00:00:00Z",
        "e": "1970-01-01", "f": "Z", "g": "00000000-0000-0000-0000-000000000000"});
    assert_eq!(
        writer
            .encode::<json::SerdeJson>(&misfit)
            .expect_err("Z is no symbol of E")
            .to_string(),
        encode(&misfit, &schema, 300)
            .expect_err("refused")
            .to_string()
    );
}
