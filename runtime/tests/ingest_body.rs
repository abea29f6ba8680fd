//! The ingest body: content type and encoding, limits, framing, and each
//! record checked against the source contract, for good input and odd.

use std::io::Write;

use keystone_crds::schema::SchemaSpec;
use keystone_runtime::ingest::body::{
    Checked, Contract, Encoding, Framing, Limits, Refusal, Stamp, decode, records,
};
use keystone_runtime::schema::Validator;

const LIMITS: Limits = Limits {
    max_body_bytes: 1 << 20,
    max_records: 100,
};

fn contract() -> Contract {
    // As a manifest declares it.
    let schema: SchemaSpec = serde_json::from_str(
        r#"{"fields": [
            {"name": "user", "type": "string"},
            {"name": "amount", "type": "integer"},
            {"name": "note", "type": "string", "optional": true}
        ]}"#,
    )
    .unwrap();
    Contract::new(Validator::for_source(&schema), &["user".to_owned()])
}

fn check(body: &str, framing: Framing) -> Result<Vec<Checked>, Refusal> {
    records(body.as_bytes(), framing, LIMITS, &contract(), None)
}

/// Each record's outcome: `Ok(raw JSON)` or `Err((field, reason))`.
fn outcomes(checked: Vec<Checked>) -> Vec<Result<String, (Option<String>, String)>> {
    checked
        .into_iter()
        .enumerate()
        .map(|(i, c)| match c {
            Ok(event) => Ok(String::from_utf8(event.raw).unwrap()),
            Err(e) => {
                assert_eq!(e.index, i, "errors carry their record's index");
                Err((e.field, e.reason))
            }
        })
        .collect()
}

#[test]
fn content_types_name_the_framing_and_others_are_415() {
    assert_eq!(Framing::from_content_type(None), Ok(Framing::Json));
    for json in [
        "application/json",
        "Application/JSON; charset=utf-8",
        "application/json;charset=\"UTF-8\"",
    ] {
        assert_eq!(
            Framing::from_content_type(Some(json)),
            Ok(Framing::Json),
            "{json}"
        );
    }
    for ndjson in [
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonl",
    ] {
        assert_eq!(
            Framing::from_content_type(Some(ndjson)),
            Ok(Framing::Ndjson),
            "{ndjson}"
        );
    }
    for refused in [
        "text/plain",
        "application/avro",
        "application/json; charset=latin1",
        "",
    ] {
        let refusal = Framing::from_content_type(Some(refused)).unwrap_err();
        assert_eq!(refusal.status, 415, "{refused}: {refusal:?}");
    }
    let refusal = Framing::from_content_type(Some("text/csv")).unwrap_err();
    assert!(
        refusal.reason.contains("\"text/csv\"") && refusal.reason.contains("application/x-ndjson"),
        "{}",
        refusal.reason
    );
}

#[test]
fn content_encodings_are_identity_gzip_or_zstd_and_others_are_415() {
    assert_eq!(Encoding::from_header(None), Ok(Encoding::Identity));
    assert_eq!(Encoding::from_header(Some("GZIP")), Ok(Encoding::Gzip));
    assert_eq!(Encoding::from_header(Some("zstd")), Ok(Encoding::Zstd));
    let refusal = Encoding::from_header(Some("br")).unwrap_err();
    assert_eq!(refusal.status, 415);
    assert!(refusal.reason.contains("\"br\""), "{}", refusal.reason);
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

#[test]
fn compressed_bodies_are_inflated_within_the_limit() {
    let body = br#"{"user":"a","amount":1}"#.to_vec();
    assert_eq!(decode(gzip(&body), Encoding::Gzip, 1024), Ok(body.clone()));
    let zstd = zstd::encode_all(&body[..], 3).unwrap();
    assert_eq!(decode(zstd, Encoding::Zstd, 1024), Ok(body.clone()));
    assert_eq!(
        decode(body.clone(), Encoding::Identity, body.len()),
        Ok(body.clone())
    );

    // Past the limit: 413, also for a small body that inflates past it (a
    // 64 MiB run of zeros in a few kilobytes), without inflating it all.
    let refusal = decode(body.clone(), Encoding::Identity, body.len() - 1).unwrap_err();
    assert_eq!(refusal.status, 413);
    let bomb = gzip(&vec![0u8; 64 << 20]);
    assert!(bomb.len() < 100_000);
    let refusal = decode(bomb, Encoding::Gzip, 1 << 20).unwrap_err();
    assert_eq!(refusal.status, 413, "{refusal:?}");
    assert!(
        refusal.reason.contains("1048576 bytes"),
        "{}",
        refusal.reason
    );
    let bomb = zstd::encode_all(&vec![0u8; 64 << 20][..], 3).unwrap();
    assert_eq!(
        decode(bomb, Encoding::Zstd, 1 << 20).unwrap_err().status,
        413
    );

    // Bytes that are not what the header says: 400, naming the encoding.
    for (bytes, encoding, name) in [
        (b"not gzip".to_vec(), Encoding::Gzip, "gzip"),
        (b"not zstd".to_vec(), Encoding::Zstd, "zstd"),
        (gzip(&body)[..10].to_vec(), Encoding::Gzip, "gzip"),
    ] {
        let refusal = decode(bytes, encoding, 1024).unwrap_err();
        assert_eq!(refusal.status, 400, "{refusal:?}");
        assert!(refusal.reason.contains(name), "{}", refusal.reason);
    }
}

#[test]
fn an_object_an_array_and_ndjson_are_batches_of_records() {
    let one = outcomes(check(r#" {"user":"a","amount":1} "#, Framing::Json).unwrap());
    assert_eq!(one, vec![Ok(r#"{"user":"a","amount":1}"#.to_owned())]);

    let array = outcomes(
        check(
            "\u{feff}[{\"user\":\"a\",\"amount\":1},\n {\"user\":\"b\",\"amount\":2,\"extra\":[1,{}]}]",
            Framing::Json,
        )
        .unwrap(),
    );
    assert_eq!(
        array,
        vec![
            Ok(r#"{"user":"a","amount":1}"#.to_owned()),
            Ok(r#"{"user":"b","amount":2,"extra":[1,{}]}"#.to_owned()),
        ]
    );

    let lines = outcomes(
        check(
            "{\"user\":\"a\",\"amount\":1}\r\n\n  \n{\"user\":\"b\",\"amount\":2}",
            Framing::Ndjson,
        )
        .unwrap(),
    );
    assert_eq!(lines.len(), 2, "blank lines are no records: {lines:?}");
    assert!(lines.iter().all(Result::is_ok), "{lines:?}");
    assert!(check("", Framing::Ndjson).unwrap().is_empty());
    assert_eq!(check("[]", Framing::Json).unwrap().len(), 0);
}

#[test]
fn each_bad_record_is_named_by_index_field_and_reason() {
    let body = r#"[
        {"user":"a","amount":1},
        {"user":"b"},
        {"user":"c","amount":"ten"},
        {"amount":3},
        {"user":null,"amount":3},
        7,
        {"user":"d","amount":4,"note":null}
    ]"#;
    let got = outcomes(check(body, Framing::Json).unwrap());
    let field = |f: &str| Some(f.to_owned());
    assert!(got[0].is_ok() && got[6].is_ok(), "{got:?}");
    assert_eq!(
        got[1],
        Err((
            field("amount"),
            r#"missing field "amount" (integer) required by the source schema"#.to_owned()
        ))
    );
    assert_eq!(
        got[2],
        Err((
            field("amount"),
            r#"field "amount" is string, but the source schema requires integer"#.to_owned()
        ))
    );
    for i in [3, 4] {
        let Err((f, reason)) = &got[i] else {
            panic!("record {i} accepted")
        };
        assert_eq!(f.as_deref(), Some("user"), "record {i}: {reason}");
    }
    assert_eq!(
        got[5],
        Err((
            None,
            "not a JSON object: the record is a JSON integer".to_owned()
        ))
    );

    // NDJSON: a line that is not JSON is that record's fault alone.
    let got = outcomes(
        check(
            "{\"user\":\"a\",\"amount\":1}\n{\"user\":\n{\"user\":\"b\",\"amount\":2}",
            Framing::Ndjson,
        )
        .unwrap(),
    );
    assert!(got[0].is_ok() && got[2].is_ok(), "{got:?}");
    assert!(matches!(&got[1], Err((None, _))), "{got:?}");
}

#[test]
fn a_body_that_is_no_batch_is_refused_whole() {
    let refusal = check(r#"[{"user":"a","amount":1},"#, Framing::Json).unwrap_err();
    assert_eq!(refusal.status, 400, "{refusal:?}");
    assert!(
        refusal.reason.starts_with("the body is not a JSON array"),
        "{}",
        refusal.reason
    );

    let many = format!("[{}]", vec![r#"{"user":"a","amount":1}"#; 101].join(","));
    let refusal = check(&many, Framing::Json).unwrap_err();
    assert_eq!(refusal.status, 413);
    assert!(
        refusal
            .reason
            .contains("101 records, more than the limit of 100"),
        "{}",
        refusal.reason
    );
    let lines = vec![r#"{"user":"a","amount":1}"#; 101].join("\n");
    assert_eq!(check(&lines, Framing::Ndjson).unwrap_err().status, 413);
}

#[test]
fn odd_bodies_are_refused_without_a_panic() {
    // Invalid UTF-8 inside a string.
    let mut bytes = br#"{"user":"a"#.to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe]);
    bytes.extend_from_slice(br#"","amount":1}"#);
    for framing in [Framing::Json, Framing::Ndjson] {
        let got = records(&bytes, framing, LIMITS, &contract(), None).unwrap();
        assert!(
            matches!(&got[..], [Err(e)] if e.field.is_none()),
            "{framing:?}"
        );
    }
    let array = [b"[".as_slice(), &bytes, b"]"].concat();
    assert_eq!(
        records(&array, Framing::Json, LIMITS, &contract(), None)
            .unwrap_err()
            .status,
        400
    );

    // 20,000 levels deep, as a record and inside an array.
    let deep = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    let object = format!(r#"{{"user":"a","amount":1,"deep":{deep}}}"#);
    let got = check(&object, Framing::Json).unwrap();
    let Err(error) = &got[0] else {
        panic!("a record 20,000 levels deep was accepted")
    };
    assert!(
        error.reason.contains("nested deeper than the limit"),
        "{}",
        error.reason
    );
    assert_eq!(
        check(&format!("[{object}]"), Framing::Json)
            .unwrap_err()
            .status,
        400
    );
    assert_eq!(check(&deep, Framing::Json).unwrap_err().status, 400);

    // Numbers without a 64-bit form, anywhere: refused with their place.
    for (body, pointer) in [
        (
            r#"{"user":"a","amount":1,"id":123456789012345678901234567890}"#,
            "id",
        ),
        (
            r#"{"user":"a","amount":1,"m":{"x":[1,-18446744073709551617]}}"#,
            "m.x[1]",
        ),
        (r#"{"user":"a","amount":1,"big":1e400}"#, "big"),
    ] {
        let got = outcomes(check(body, Framing::Json).unwrap());
        let Err((Some(field), reason)) = &got[0] else {
            panic!("{body}: {got:?}")
        };
        assert_eq!(field, pointer, "{reason}");
        assert!(reason.contains("does not fit in 64 bits"), "{reason}");
    }
    // What has one passes: the 64-bit extremes, long floats, small exponents.
    let fits = r#"{"user":"a","amount":-9223372036854775808,"u":18446744073709551615,"pi":3.14159265358979323846264,"e":1.5e300,"s":"12345678901234567890123"}"#;
    assert!(outcomes(check(fits, Framing::Json).unwrap())[0].is_ok());

    // Integers wider than 64 bits where the contract wants an integer.
    let got = outcomes(
        check(
            r#"{"user":"a","amount":123456789012345678901234567890}"#,
            Framing::Json,
        )
        .unwrap(),
    );
    assert!(
        matches!(&got[0], Err((Some(f), _)) if f == "amount"),
        "{got:?}"
    );
}

#[test]
fn an_idempotency_key_is_stamped_on_each_record_before_the_check() {
    // The stamped field may be declared (here required), and overrides a
    // value the sender put there.
    let schema: SchemaSpec = serde_json::from_str(
        r#"{"fields": [{"name": "user", "type": "string"}, {"name": "rid", "type": "string"}]}"#,
    )
    .unwrap();
    let contract = Contract::new(Validator::for_source(&schema), &["user".to_owned()]);
    let stamp = Stamp {
        field: "rid",
        key: "req-7",
    };
    let got = records(
        br#"[{"user":"a"},{"user":"b","rid":"mine"}]"#,
        Framing::Json,
        LIMITS,
        &contract,
        Some(stamp),
    )
    .unwrap();
    let stamped: Vec<serde_json::Value> = outcomes(got)
        .into_iter()
        .map(|raw| serde_json::from_str(&raw.expect("accepted")).unwrap())
        .collect();
    assert_eq!(
        stamped,
        vec![
            serde_json::json!({"user": "a", "rid": "req-7/0"}),
            serde_json::json!({"user": "b", "rid": "req-7/1"}),
        ]
    );
}
