use super::*;
use apache_avro::{Days, Decimal, Duration, Millis, Months};
use serde_json::json;

fn parse(json: &str) -> Schema {
    Schema::parse_str(json).expect("schema")
}

fn to_json(value: &Avro, schema: &Schema) -> Result<Value, ValueError> {
    Shape::new(schema.clone())?.to_json(value)
}

fn from_json(event: &Value, schema: &Schema) -> Result<Avro, ValueError> {
    Shape::new(schema.clone())?.from_json(event)
}

/// Written with `schema`, encoded, decoded and read back as JSON.
fn round_trip(event: &Value, schema: &Schema) -> Value {
    let value = from_json(event, schema).expect("to avro");
    let datum = apache_avro::to_avro_datum(schema, value).expect("encode");
    let decoded = apache_avro::from_avro_datum(schema, &mut &datum[..], None).expect("decode");
    to_json(&decoded, schema).expect("to json")
}

const EVERY_TYPE: &str = r#"{"type": "record", "name": "All", "fields": [
  {"name": "i", "type": "int"},
  {"name": "l", "type": "long"},
  {"name": "d", "type": "double"},
  {"name": "f", "type": "float"},
  {"name": "b", "type": "boolean"},
  {"name": "s", "type": "string"},
  {"name": "raw", "type": "bytes"},
  {"name": "four", "type": {"type": "fixed", "name": "Four", "size": 4}},
  {"name": "e", "type": {"type": "enum", "name": "Color", "symbols": ["RED", "GREEN"]}},
  {"name": "u", "type": {"type": "string", "logicalType": "uuid"}},
  {"name": "money", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}},
  {"name": "day", "type": {"type": "int", "logicalType": "date"}},
  {"name": "clock", "type": {"type": "int", "logicalType": "time-millis"}},
  {"name": "ms", "type": {"type": "long", "logicalType": "timestamp-millis"}},
  {"name": "us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
  {"name": "local", "type": {"type": "long", "logicalType": "local-timestamp-millis"}},
  {"name": "tags", "type": {"type": "array", "items": "string"}},
  {"name": "attrs", "type": {"type": "map", "values": "long"}},
  {"name": "maybe", "type": ["null", "string"], "default": null},
  {"name": "nested", "type": {"type": "record", "name": "Inner", "fields": [{"name": "x", "type": "long"}]}},
  {"name": "again", "type": "Inner"}
]}"#;

#[test]
fn every_type_reads_back_as_the_json_it_was_written_from() {
    let schema = parse(EVERY_TYPE);
    let event = json!({
        "i": -7, "l": 9_007_199_254_740_993_i64, "d": 2.5, "f": 0.5, "b": true, "s": "ünï",
        "raw": "AAEC/w==", "four": "AQIDBA==", "e": "GREEN",
        "u": "67e55044-10b1-426f-9247-bb680e5fe0c8",
        "money": "-1234.50", "day": "2024-01-01", "clock": "13:45:07.250",
        "ms": "2026-12-05T11:30:00.123Z", "us": "2026-12-05T11:30:00.123456Z",
        "local": "2026-12-05T11:30:00.123",
        "tags": ["a", "b"], "attrs": {"n": 3}, "maybe": "here",
        "nested": {"x": 1}, "again": {"x": 2}
    });
    assert_eq!(round_trip(&event, &schema), event);
}

#[test]
fn logical_types_read_as_the_contracts_json() {
    let schema = parse(EVERY_TYPE);
    let value = |name: &str, v: Avro| {
        let Schema::Record(record) = &schema else {
            unreachable!()
        };
        let field = &record.fields[record.lookup[name]];
        let mut tree = read::Tree(Value::Null);
        let names = Names::of(&schema).expect("names");
        read::read(
            &v,
            &field.schema,
            &names,
            &Path::ROOT.field(name),
            &mut tree,
        )
        .expect("read");
        tree.0
    };
    assert_eq!(value("day", Avro::Date(19_723)), json!("2024-01-01"));
    assert_eq!(
        value("ms", Avro::TimestampMillis(0)),
        json!("1970-01-01T00:00:00Z")
    );
    assert_eq!(
        value("us", Avro::TimestampMicros(1_500_001)),
        json!("1970-01-01T00:00:01.500001Z")
    );
    assert_eq!(
        value("money", Avro::Decimal(Decimal::from(vec![0x04, 0xE2]))),
        json!("12.50"),
        "1250 at scale 2"
    );
    assert_eq!(
        value("money", Avro::Decimal(Decimal::from(vec![0xFB]))),
        json!("-0.05")
    );
    assert_eq!(value("clock", Avro::TimeMillis(1)), json!("00:00:00.001"));
}

#[test]
fn a_timestamp_may_be_written_from_epoch_milliseconds() {
    let schema = parse(
        r#"{"type": "record", "name": "T", "fields": [
          {"name": "at", "type": {"type": "long", "logicalType": "timestamp-micros"}}
        ]}"#,
    );
    assert_eq!(
        from_json(&json!({"at": 1_500}), &schema).expect("avro"),
        Avro::Record(vec![("at".into(), Avro::TimestampMicros(1_500_000))])
    );
    assert_eq!(
        round_trip(&json!({"at": 1_500}), &schema),
        json!({"at": "1970-01-01T00:00:01.500Z"})
    );
}

#[test]
fn timestamps_far_from_1970_are_written_back() {
    let schema = parse(
        r#"{"type": "record", "name": "T", "fields": [
          {"name": "us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
          {"name": "ms", "type": {"type": "long", "logicalType": "local-timestamp-millis"}}
        ]}"#,
    );
    // Beyond what 64-bit nanoseconds hold (years 1677 to 2262).
    let event = json!({"us": "2794-01-04T20:26:37.116417Z", "ms": "1500-06-01T00:00:00"});
    assert_eq!(round_trip(&event, &schema), event);
}

#[test]
fn decimals_are_written_exactly_or_refused() {
    let schema = parse(
        r#"{"type": "record", "name": "D", "fields": [
          {"name": "v", "type": {"type": "bytes", "logicalType": "decimal", "precision": 30, "scale": 2}}
        ]}"#,
    );
    let back = |v: Value| round_trip(&json!({ "v": v }), &schema)["v"].clone();
    assert_eq!(back(json!(3)), json!("3.00"));
    assert_eq!(back(json!("0.1")), json!("0.10"));
    assert_eq!(back(json!("-0.05")), json!("-0.05"));
    assert_eq!(
        back(json!("1.230")),
        json!("1.23"),
        "trailing zeros beyond the scale"
    );
    assert_eq!(
        back(json!("123456789012345678901234567.89")),
        json!("123456789012345678901234567.89"),
        "beyond a double's precision"
    );
    let refused = |v: Value| {
        from_json(&json!({ "v": v }), &schema)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        refused(json!("1.234")),
        "field v: 1.234 has 3 decimal places, the schema's scale is 2"
    );
    assert_eq!(
        refused(json!("12345678901234567890123456789.1")),
        "field v: 12345678901234567890123456789.1 has 31 digits, the schema's precision is 30"
    );
    assert_eq!(
        refused(json!("1e3")),
        "field v: \"1e3\" is not a decimal number"
    );
    assert_eq!(
        refused(json!(".")),
        "field v: \".\" is not a decimal number"
    );
}

#[test]
fn missing_and_mistyped_fields_are_named_by_path() {
    let schema = parse(
        r#"{"type": "record", "name": "O", "fields": [
          {"name": "customer", "type": {"type": "record", "name": "C", "fields": [
            {"name": "id", "type": "long"},
            {"name": "tier", "type": ["null", "string"], "default": null},
            {"name": "level", "type": "int", "default": 1}
          ]}},
          {"name": "color", "type": {"type": "enum", "name": "Color", "symbols": ["RED"]}}
        ]}"#,
    );
    let error = |event: Value| from_json(&event, &schema).unwrap_err().to_string();
    assert_eq!(
        error(json!({"customer": {}, "color": "RED"})),
        "field customer.id: missing, and the schema requires it (no default)"
    );
    assert_eq!(
        error(json!({"customer": {"id": "7"}, "color": "RED"})),
        "field customer.id: expected an integer, found a string"
    );
    assert_eq!(
        error(json!({"customer": {"id": 7}, "color": "BLUE"})),
        "field color: \"BLUE\" is not one of the enum's symbols [\"RED\"]"
    );
    assert_eq!(
        error(json!({"customer": {"id": 7, "level": 1.5}, "color": "RED"})),
        "field customer.level: expected a 32-bit integer, found a number"
    );
    // Absent optional fields are null; absent fields with a default take it.
    assert_eq!(
        round_trip(&json!({"customer": {"id": 7}, "color": "RED"}), &schema),
        json!({"customer": {"id": 7, "tier": null, "level": 1}, "color": "RED"})
    );
}

#[test]
fn a_string_field_takes_other_json_as_its_text() {
    let schema = parse(
        r#"{"type": "record", "name": "J", "fields": [
          {"name": "tags", "type": ["null", "string"], "default": null},
          {"name": "any", "type": "string"}
        ]}"#,
    );
    assert_eq!(
        round_trip(&json!({"tags": ["a", 1], "any": {"k": true}}), &schema),
        json!({"tags": "[\"a\",1]", "any": "{\"k\":true}"})
    );
}

#[test]
fn a_union_takes_the_first_branch_that_fits() {
    let schema = parse(
        r#"{"type": "record", "name": "U", "fields": [
          {"name": "v", "type": ["null", "long", "double", "boolean"]}
        ]}"#,
    );
    let written = |v: Value| from_json(&json!({ "v": v }), &schema).expect("avro");
    let branch = |v: Value| match written(v) {
        Avro::Record(fields) => match &fields[0].1 {
            Avro::Union(i, _) => *i,
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    assert_eq!(branch(json!(null)), 0);
    assert_eq!(branch(json!(3)), 1);
    assert_eq!(branch(json!(3.5)), 2);
    assert_eq!(branch(json!(false)), 3);
    assert_eq!(
        from_json(&json!({"v": "x"}), &schema)
            .unwrap_err()
            .to_string(),
        "field v: fits no branch of the union: expected an integer, found a string; expected a number, found a string; expected a boolean, found a string"
    );
}

#[test]
fn non_finite_numbers_have_no_json_form() {
    let schema =
        parse(r#"{"type": "record", "name": "N", "fields": [{"name": "x", "type": "double"}]}"#);
    let value = Avro::Record(vec![("x".into(), Avro::Double(f64::NAN))]);
    assert_eq!(
        to_json(&value, &schema).unwrap_err().to_string(),
        "field x: NaN has no JSON form (JSON numbers are finite)"
    );
}

/// [`Shape::write_json`]'s text, checked to be JSON of [`Shape::to_json`]'s
/// value (or the same error).
fn json_text(value: &Avro, schema: &Schema) -> Result<String, ValueError> {
    let shape = Shape::new(schema.clone())?;
    let mut text = Vec::new();
    let written = shape.write_json(value, &mut text);
    match shape.to_json(value) {
        Ok(tree) => {
            written.expect("text where the tree was built");
            assert_eq!(
                serde_json::from_slice::<serde_json::Value>(&text).expect("JSON"),
                tree
            );
        }
        Err(error) => {
            assert_eq!(written, Err(error));
            written?;
        }
    }
    Ok(String::from_utf8(text).expect("UTF-8"))
}

#[test]
fn the_json_text_is_written_as_serde_json_writes_the_event() {
    let schema = parse(EVERY_TYPE);
    let event = json!({
        "i": -7, "l": i64::MIN, "d": -0.0, "f": 0.1, "b": false, "s": "a\"b\\c\n\u{1}é😀",
        "raw": "AAEC/w==", "four": "AQIDBA==", "e": "RED",
        "u": "67e55044-10b1-426f-9247-bb680e5fe0c8",
        "money": "-0.05", "day": "1969-12-31", "clock": "23:59:59.999",
        "ms": "1900-01-01T00:00:00Z", "us": "2026-12-05T11:30:00.000001Z",
        "local": "2026-12-05T11:30:00",
        "tags": [], "attrs": {"z": 1, "a": -2, "m": 3, "": 0}, "maybe": null,
        "nested": {"x": 1}, "again": {"x": 2}
    });
    let value = from_json(&event, &schema).expect("to avro");
    let datum = apache_avro::to_avro_datum(&schema, value).expect("encode");
    let decoded = apache_avro::from_avro_datum(&schema, &mut &datum[..], None).expect("decode");
    let text = json_text(&decoded, &schema).expect("text");
    assert!(
        text.starts_with(r#"{"i":-7,"l":-9223372036854775808,"d":-0.0,"#)
            && text.contains(r#""attrs":{"":0,"a":-2,"m":3,"z":1}"#),
        "a record's members in the schema's order, a map's in key order: {text}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&text).expect("JSON")["f"],
        json!(f64::from(0.1_f32))
    );
}

#[test]
fn durations_unions_and_nesting_are_written_as_text() {
    let schema = parse(
        r#"{"type": "record", "name": "R", "fields": [
          {"name": "wait", "type": {"type": "fixed", "name": "D", "size": 12, "logicalType": "duration"}},
          {"name": "deep", "type": {"type": "record", "name": "R2", "fields": [
            {"name": "n", "type": ["null", "double"], "default": null}
          ]}},
          {"name": "u", "type": ["null", "long", {"type": "array", "items": {"type": "map", "values": ["null", "R2"]}}]}
        ]}"#,
    );
    let r2 = |n: Avro| Avro::Record(vec![("n".into(), n)]);
    let value = Avro::Record(vec![
        (
            "wait".into(),
            Avro::Duration(Duration::new(Months::new(1), Days::new(2), Millis::new(3))),
        ),
        ("deep".into(), r2(Avro::Union(0, Box::new(Avro::Null)))),
        (
            "u".into(),
            Avro::Union(
                2,
                Box::new(Avro::Array(vec![Avro::Map(
                    [
                        ("y".to_owned(), Avro::Union(0, Box::new(Avro::Null))),
                        (
                            "x".to_owned(),
                            Avro::Union(
                                1,
                                Box::new(r2(Avro::Union(1, Box::new(Avro::Double(1.5))))),
                            ),
                        ),
                    ]
                    .into(),
                )])),
            ),
        ),
    ]);
    assert_eq!(
        json_text(&value, &schema).expect("text"),
        r#"{"wait":{"days":2,"millis":3,"months":1},"deep":{"n":null},"u":[{"x":{"n":1.5},"y":null}]}"#
    );
    // An error deep down names its path, in both forms.
    let Avro::Record(mut fields) = value else {
        unreachable!()
    };
    fields[2].1 = Avro::Union(
        2,
        Box::new(Avro::Array(vec![
            Avro::Map(Default::default()),
            Avro::Map(
                [(
                    "k".to_owned(),
                    Avro::Union(
                        1,
                        Box::new(r2(Avro::Union(1, Box::new(Avro::Double(f64::INFINITY))))),
                    ),
                )]
                .into(),
            ),
        ])),
    );
    assert_eq!(
        json_text(&Avro::Record(fields), &schema)
            .unwrap_err()
            .to_string(),
        "field u[1].k.n: inf has no JSON form (JSON numbers are finite)"
    );
}

#[test]
fn nesting_beyond_the_bound_is_refused_not_recursed_into() {
    use apache_avro::schema::ArraySchema;
    // Deeper than any schema parsed from text can be.
    let levels = MAX_NESTING + 10;
    let (mut schema, mut value) = (Schema::Long, Avro::Long(1));
    for _ in 0..levels {
        schema = Schema::Array(ArraySchema {
            items: Box::new(schema),
            attributes: Default::default(),
        });
        value = Avro::Array(vec![value]);
    }
    let reason = json_text(&value, &schema).unwrap_err().reason;
    assert_eq!(
        reason,
        format!("nested deeper than {MAX_NESTING} levels of records, arrays and maps")
    );
    let event = Shape::new(schema.clone())
        .expect("shape")
        .to_json(&value)
        .map(|_| ())
        .unwrap_err();
    assert!(event.path.starts_with("[0][0]"), "{}", event.path);
    let mut event = json!(1);
    for _ in 0..levels {
        event = json!([event]);
    }
    assert_eq!(
        from_json(&event, &schema).unwrap_err().reason,
        reason,
        "writing too"
    );
}

#[test]
fn a_decimal_beyond_its_precision_is_not_of_its_schema() {
    let schema = parse(
        r#"{"type": "record", "name": "P", "fields": [
          {"name": "p", "type": {"type": "bytes", "logicalType": "decimal", "precision": 4, "scale": 1}}
        ]}"#,
    );
    // The bytes of an unscaled 12345 (five digits) and of 1234 (four).
    let of = |bytes: &[u8]| {
        Avro::Record(vec![(
            "p".into(),
            Avro::Decimal(apache_avro::Decimal::from(bytes.to_vec())),
        )])
    };
    assert_eq!(
        json_text(&of(&[0x30, 0x39]), &schema)
            .unwrap_err()
            .to_string(),
        "field p: 1234.5 has 5 digits, the schema's precision is 4"
    );
    assert_eq!(
        json_text(&of(&[0x04, 0xd2]), &schema).unwrap(),
        r#"{"p":"123.4"}"#
    );
}
