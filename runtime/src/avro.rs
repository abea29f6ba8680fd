//! Avro record values on Kafka, read as events: each record framed in the
//! schema registry's wire format (magic byte, schema id, Avro binary), its
//! writer schema fetched by id and resolved against the reader schema by
//! Avro's resolution rules.
//!
//! Parsing never waits on the registry: the ids a batch names are looked up
//! first ([`AvroDecoder::unknown_ids`], then [`AvroDecoder::learn`] with the
//! registry's answer), so a registry that is down holds the batch instead of
//! dead-lettering it. Only what is the record's own fault goes to the dead
//! letters: bytes not in the wire format, an id the registry does not know,
//! a writer schema that is not Avro or cannot be read as the reader schema,
//! and a datum that does not decode.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, PoisonError, RwLock};

use keystone_avro::json::{Document, Kind};
use keystone_avro::registry::RegistryError;
use keystone_avro::{AvroSchema, RecordError, Shape, WriterSchema, can_read, wire};
use sonic_rs::{JsonContainerTrait, JsonType, JsonValueTrait, Value};

use crate::event::Event;

/// What is known of one writer schema id.
#[derive(Clone, Debug)]
enum Writer {
    /// Its records decode with this schema and resolve against the reader's.
    Readable(Arc<WriterSchema>),
    /// Its records are dead letters, for this reason.
    Refused(String),
}

/// Reads framed Avro records as events of one reader schema. Shared by the
/// thread that fetches writer schemas and the one that parses.
pub struct AvroDecoder {
    reader: Shape,
    writers: RwLock<HashMap<u32, Writer>>,
}

impl AvroDecoder {
    /// A decoder whose events have the shape of `reader`.
    pub fn new(reader: Shape) -> Self {
        keystone_avro::limit_allocations();
        Self {
            reader,
            writers: RwLock::new(HashMap::new()),
        }
    }

    /// The reader schema.
    pub fn reader(&self) -> &AvroSchema {
        self.reader.schema()
    }

    /// The schema ids named by `payloads` whose writer schema is not known
    /// yet: to fetch before they are decoded. Bytes not in the wire format
    /// name none (they are dead letters once decoded).
    pub fn unknown_ids<'a>(&self, payloads: impl IntoIterator<Item = &'a [u8]>) -> BTreeSet<u32> {
        let writers = self.writers.read().unwrap_or_else(PoisonError::into_inner);
        payloads
            .into_iter()
            .filter_map(|payload| wire::split(payload).ok().map(|(id, _)| id))
            .filter(|id| !writers.contains_key(id))
            .collect()
    }

    /// Records the registry's answer for `id`. A schema whose records resolve
    /// against the reader's makes them readable; one that does not, an id the
    /// registry does not know, or a schema Keystone does not read makes them
    /// dead letters with the reason. Any other error (the registry down,
    /// refusing the credentials, misconfigured) is no record's fault: it is
    /// returned, nothing is learned, and the caller asks again later.
    pub fn learn(
        &self,
        id: u32,
        answer: Result<Arc<AvroSchema>, RegistryError>,
    ) -> Result<(), RegistryError> {
        let writer = match answer {
            Ok(schema) => match can_read(&schema, self.reader.schema())
                .and_then(|()| WriterSchema::new(&schema, &self.reader))
            {
                Ok(prepared) => Writer::Readable(Arc::new(prepared)),
                Err(reason) => {
                    Writer::Refused(RecordError::Unresolvable { id, reason }.to_string())
                }
            },
            Err(error @ (RegistryError::NotFound { .. } | RegistryError::NotAvro { .. })) => {
                Writer::Refused(format!(
                    "the record names writer schema id {id}, which cannot be read: {error}"
                ))
            }
            Err(error) => return Err(error),
        };
        self.writers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, writer);
        Ok(())
    }

    /// The event one record holds, its `raw` bytes the record's own (a dead
    /// letter of it later carries what was read); or the record's bytes with
    /// why it cannot be read.
    pub fn decode(&self, raw: Vec<u8>) -> Result<Event, (Vec<u8>, String)> {
        let decoded = match wire::split(&raw) {
            Err(error) => Err(RecordError::from(error).to_string()),
            Ok((id, datum)) => self.decode_datum(id, datum),
        };
        match decoded {
            Err(reason) => Err((raw, reason)),
            // The value is written as JSON text straight from the Avro value
            // and parsed as every event is: its limits (size, depth) hold for
            // Avro input too, and only a parsed document keeps its members in
            // order (sonic-rs's built objects are hash maps).
            Ok(json) => match Event::parse(json) {
                Ok(mut event) => {
                    event.raw = raw;
                    Ok(event)
                }
                Err((_, reason)) => Err((raw, format!("the record's value as JSON: {reason}"))),
            },
        }
    }

    /// The JSON bytes of one datum written with schema `id`.
    fn decode_datum(&self, id: u32, datum: &[u8]) -> Result<Vec<u8>, String> {
        let writer = self
            .writers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned();
        match writer {
            Some(Writer::Readable(writer)) => {
                // The JSON form is larger than the datum (names, quotes, base64).
                let mut json = Vec::with_capacity(datum.len() * 2 + 64);
                keystone_avro::decode_json(id, datum, &writer, &self.reader, &mut json)
                    .map_err(|e| e.to_string())?;
                Ok(json)
            }
            Some(Writer::Refused(reason)) => Err(reason),
            // The ids of a batch are learned before it is parsed: only a defect
            // gets here, and it says so rather than guessing a schema.
            None => Err(format!(
                "the record's writer schema (id {id}) was not fetched before the record was read"
            )),
        }
    }
}

/// The runtime's events (sonic-rs documents) as the document model Avro
/// records are written from: an event is encoded as it is held, not written
/// out as JSON text and parsed again.
pub struct Sonic;

impl Document for Sonic {
    type Value = sonic_rs::Value;

    fn kind(value: &Value) -> Kind {
        match value.get_type() {
            JsonType::Null => Kind::Null,
            JsonType::Boolean => Kind::Boolean,
            JsonType::Number => Kind::Number,
            JsonType::String => Kind::String,
            JsonType::Array => Kind::Array,
            JsonType::Object => Kind::Object,
        }
    }

    fn as_bool(value: &Value) -> Option<bool> {
        value.as_bool()
    }

    fn as_i64(value: &Value) -> Option<i64> {
        value.as_i64()
    }

    fn as_u64(value: &Value) -> Option<u64> {
        value.as_u64()
    }

    fn as_f64(value: &Value) -> Option<f64> {
        value.as_f64()
    }

    fn as_str(value: &Value) -> Option<&str> {
        value.as_str()
    }

    fn number_text(value: &Value) -> Option<String> {
        // A number kept as its text (one beyond 64 bits) is exact as it came;
        // in exponent form it is read as a float, like every other number.
        if let Some(raw) = value.as_raw_number()
            && !raw.as_str().contains(['e', 'E'])
        {
            return Some(raw.as_str().to_owned());
        }
        value.as_number().map(|n| n.to_string())
    }

    fn items(value: &Value) -> Option<impl Iterator<Item = &Value>> {
        value.as_array().map(|items| items.iter())
    }

    fn members(value: &Value) -> Option<impl Iterator<Item = (&str, &Value)>> {
        value.as_object().map(|object| object.iter())
    }

    fn get<'v>(value: &'v Value, name: &str) -> Option<&'v Value> {
        value.as_object()?.get(&name)
    }

    fn text(value: &Value) -> String {
        // Serializing a document cannot fail: keys are strings, numbers finite.
        sonic_rs::to_string(value).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use keystone_avro::registry::RegistryError;
    use sonic_rs::JsonValueTrait;

    use super::*;

    const V1: &str = r#"{"type": "record", "name": "Order", "namespace": "shop", "fields": [
      {"name": "id", "type": "long"},
      {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
      {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}}
    ]}"#;

    /// V1 and an optional field.
    const V2: &str = r#"{"type": "record", "name": "Order", "namespace": "shop", "fields": [
      {"name": "id", "type": "long"},
      {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
      {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
      {"name": "note", "type": ["null", "string"], "default": null}
    ]}"#;

    /// `id` as a string: a long is not read as a string.
    const INCOMPATIBLE: &str = r#"{"type": "record", "name": "Order", "namespace": "shop", "fields": [
      {"name": "id", "type": "string"}
    ]}"#;

    fn schema(text: &str) -> Arc<AvroSchema> {
        Arc::new(AvroSchema::parse_str(text).expect("schema"))
    }

    fn shape(text: &str) -> Shape {
        Shape::new(AvroSchema::parse_str(text).expect("schema")).expect("shape")
    }

    /// A record as a producer with `writer` registered as `id` writes it.
    fn framed(writer: &str, id: u32, event: serde_json::Value) -> Vec<u8> {
        keystone_avro::encode(&event, &shape(writer), id).expect("encode")
    }

    fn order(id: i64) -> serde_json::Value {
        serde_json::json!({"id": id, "amount": "12.30", "at": "2026-12-05T10:00:00Z"})
    }

    fn not_found(id: u32) -> RegistryError {
        RegistryError::NotFound {
            what: format!("schema id {id}"),
            message: "Schema not found".into(),
        }
    }

    #[test]
    fn records_of_known_writers_are_events_that_keep_their_bytes() {
        let decoder = AvroDecoder::new(shape(V2));
        let old = framed(V1, 1, order(7));
        let new = framed(
            V2,
            2,
            serde_json::json!({"id": 8, "amount": "-0.05", "at": "2026-12-05T10:00:01Z", "note": "gift"}),
        );
        assert_eq!(
            decoder.unknown_ids([old.as_slice(), new.as_slice(), b"{\"json\":1}"]),
            BTreeSet::from([1, 2]),
            "bytes not in the wire format name no id"
        );
        decoder.learn(1, Ok(schema(V1))).expect("learn v1");
        decoder.learn(2, Ok(schema(V2))).expect("learn v2");
        assert!(
            decoder
                .unknown_ids([old.as_slice(), new.as_slice()])
                .is_empty()
        );

        let event = decoder.decode(old.clone()).expect("v1 record");
        assert_eq!(event.raw, old, "a dead letter of it carries what was read");
        assert_eq!(event.value.get("id").and_then(|v| v.as_i64()), Some(7));
        assert_eq!(
            event.value.get("amount").and_then(|v| v.as_str()),
            Some("12.30")
        );
        assert_eq!(
            event.value.get("at").and_then(|v| v.as_str()),
            Some("2026-12-05T10:00:00Z")
        );
        assert!(
            event.value.get("note").is_some_and(|v| v.is_null()),
            "the reader's default for what the older writer lacks"
        );
        let event = decoder.decode(new).expect("v2 record");
        assert_eq!(
            event.value.get("note").and_then(|v| v.as_str()),
            Some("gift")
        );
        assert_eq!(
            event.value.get("amount").and_then(|v| v.as_str()),
            Some("-0.05")
        );
    }

    #[test]
    fn what_is_the_records_fault_is_refused_with_the_reason() {
        let decoder = AvroDecoder::new(shape(V1));
        decoder.learn(1, Ok(schema(V1))).expect("learn");
        decoder.learn(3, Ok(schema(INCOMPATIBLE))).expect("learn");
        decoder.learn(4, Err(not_found(4))).expect("learn");
        let whole = framed(V1, 1, order(1));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"{\"id\": 1}".to_vec(), "magic"),
            (whole[..3].to_vec(), "shorter than the 5-byte header"),
            (whole[..whole.len() - 2].to_vec(), "truncated"),
            ([whole.as_slice(), b"\x00"].concat(), "1 bytes follow"),
            (
                framed(INCOMPATIBLE, 3, serde_json::json!({"id": "x"})),
                "cannot be read as the reader schema",
            ),
            (wire::frame(4, &whole[5..]), "schema id 4"),
        ];
        for (bytes, expected) in cases {
            let (original, reason) = decoder.decode(bytes.clone()).expect_err("refused");
            assert_eq!(original, bytes, "the dead letter keeps the record's bytes");
            assert!(
                reason.contains(expected),
                "{expected:?} in {reason:?} for {bytes:?}"
            );
        }
    }

    #[test]
    fn a_registry_that_cannot_answer_is_no_records_fault() {
        let decoder = AvroDecoder::new(shape(V1));
        let down = RegistryError::Unavailable {
            url: "http://registry".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(decoder.learn(1, Err(down.clone())), Err(down));
        let refused = RegistryError::Refused {
            what: "schema id 1".into(),
            status: 401,
            message: "Unauthorized".into(),
        };
        assert_eq!(decoder.learn(1, Err(refused.clone())), Err(refused));
        let record = framed(V1, 1, order(1));
        assert_eq!(
            decoder.unknown_ids([record.as_slice()]),
            BTreeSet::from([1]),
            "still to fetch"
        );
        decoder.learn(1, Ok(schema(V1))).expect("learn");
        assert!(decoder.decode(record).is_ok());
    }

    #[test]
    fn limits_of_events_hold_for_avro_input() {
        // A record whose JSON form is larger than an event may be.
        let blob = r#"{"type": "record", "name": "Blob", "fields": [
          {"name": "data", "type": "string"}
        ]}"#;
        let decoder = AvroDecoder::new(shape(blob));
        decoder.learn(9, Ok(schema(blob))).expect("learn");
        let large = "x".repeat(crate::event::MAX_EVENT_BYTES + 1);
        let record = framed(blob, 9, serde_json::json!({ "data": large }));
        let (original, reason) = decoder.decode(record.clone()).expect_err("too large");
        assert_eq!(original, record);
        let json_bytes = r#"{"data":""}"#.len() + large.len();
        assert_eq!(
            reason,
            format!(
                "the record's value as JSON: the event is {json_bytes} bytes, larger than the limit of {} bytes",
                crate::event::MAX_EVENT_BYTES
            )
        );
        // At the limit it is an event.
        let fits = "x".repeat(crate::event::MAX_EVENT_BYTES - r#"{"data":""}"#.len());
        let event = decoder
            .decode(framed(blob, 9, serde_json::json!({ "data": fits })))
            .expect("at the limit");
        assert_eq!(
            event
                .value
                .get("data")
                .and_then(|v| v.as_str())
                .map(str::len),
            Some(fits.len())
        );
    }

    #[test]
    fn nesting_deeper_than_an_event_may_is_refused() {
        // The codec recurses once per level, with large frames unoptimized.
        std::thread::Builder::new()
            .stack_size(16 << 20)
            .spawn(refuse_what_nests_too_deep)
            .expect("thread")
            .join()
            .expect("passed");
    }

    fn refuse_what_nests_too_deep() {
        use apache_avro::types::Value as Avro;
        // A field of arrays in arrays, deeper than an event may nest (and than
        // a schema parsed from text can be: this one is built).
        let levels = crate::event::MAX_DEPTH + 10;
        let (mut items, mut value) = (AvroSchema::Long, Avro::Long(1));
        for _ in 0..levels {
            items = AvroSchema::array(items);
            value = Avro::Array(vec![value]);
        }
        let text =
            r#"{"type": "record", "name": "Deep", "fields": [{"name": "a", "type": "long"}]}"#;
        let AvroSchema::Record(mut record) = AvroSchema::parse_str(text).expect("schema") else {
            unreachable!("a record")
        };
        record.fields[0].schema = items;
        let deep = AvroSchema::Record(record);
        let datum = apache_avro::to_avro_datum(&deep, Avro::Record(vec![("a".into(), value)]))
            .expect("encode");
        let decoder = AvroDecoder::new(Shape::new(deep.clone()).expect("shape"));
        decoder.learn(7, Ok(Arc::new(deep))).expect("learn");
        let record = wire::frame(7, &datum);
        let (original, reason) = decoder.decode(record.clone()).expect_err("too deep");
        assert_eq!(original, record);
        assert!(
            reason.starts_with(
                "the record's value as JSON: nested deeper than the limit of 128 levels of objects and arrays, at /a/0/0/"
            ),
            "{reason}"
        );
    }

    /// Every type of [`EVERY_TYPE`] in one event.
    fn every_type() -> serde_json::Value {
        serde_json::json!({
            "i": -7, "l": 9_007_199_254_740_993_i64, "d": 2.5, "f": 0.5, "b": true, "s": "ünï \"q\"\n",
            "raw": "AAEC/w==", "four": "AQIDBA==", "e": "GREEN",
            "u": "67e55044-10b1-426f-9247-bb680e5fe0c8",
            "money": "-1234.50", "day": "2024-01-01", "clock": "13:45:07.250",
            "ms": "2026-12-05T11:30:00.123Z", "us": "2026-12-05T11:30:00.123456Z",
            "local": "2026-12-05T11:30:00.123",
            "tags": ["a", "b"], "attrs": {"n": 3, "a": -1}, "maybe": "here",
            "nested": {"x": 1, "deeper": {"y": [1.5, -0.0]}}, "again": {"x": 2, "deeper": {"y": []}},
            "json": "[1,{\"k\":true}]"
        })
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
      {"name": "nested", "type": {"type": "record", "name": "Inner", "fields": [
        {"name": "x", "type": "long"},
        {"name": "deeper", "type": {"type": "record", "name": "Deeper", "fields": [
          {"name": "y", "type": {"type": "array", "items": "double"}}
        ]}}
      ]}},
      {"name": "again", "type": "Inner"},
      {"name": "json", "type": "string"},
      {"name": "level", "type": "int", "default": 3}
    ]}"#;

    /// The event the text round trip made of a record: `serde_json`'s value
    /// of it (members sorted), written out and parsed as an event.
    fn through_text(record: &[u8], writer: &str, reader: &Shape) -> sonic_rs::Value {
        let (id, datum) = wire::split(record).expect("framed");
        let value = keystone_avro::decode(id, datum, &schema(writer), reader).expect("decode");
        Event::parse(serde_json::to_vec(&value).expect("JSON"))
            .expect("event")
            .value
    }

    #[test]
    fn every_type_and_nested_records_read_as_the_text_round_trip_read_them() {
        let decoder = AvroDecoder::new(shape(EVERY_TYPE));
        decoder.learn(5, Ok(schema(EVERY_TYPE))).expect("learn");
        let record = framed(EVERY_TYPE, 5, every_type());
        let event = decoder.decode(record.clone()).expect("decode");
        assert_eq!(event.raw, record);
        let expected = through_text(&record, EVERY_TYPE, &shape(EVERY_TYPE));
        assert_eq!(event.value, expected, "the same document");
        let members: Vec<&str> = event
            .value
            .as_object()
            .expect("object")
            .iter()
            .map(|(name, _)| name)
            .collect();
        let fields: serde_json::Value = serde_json::from_str(EVERY_TYPE).expect("schema");
        let fields: Vec<&str> = fields["fields"]
            .as_array()
            .expect("fields")
            .iter()
            .map(|field| field["name"].as_str().expect("name"))
            .collect();
        assert_eq!(members, fields, "members in the schema's order");
        let y = event
            .value
            .pointer(&sonic_rs::pointer!["nested", "deeper", "y"])
            .and_then(|v| v.as_array().map(|a| a.len()));
        assert_eq!(y, Some(2));
        assert_eq!(event.value["money"].as_str(), Some("-1234.50"));
        assert_eq!(
            event.value["us"].as_str(),
            Some("2026-12-05T11:30:00.123456Z")
        );
        assert_eq!(event.value["raw"].as_str(), Some("AAEC/w=="));
        assert_eq!(event.value["level"].as_i64(), Some(3), "the default");
    }

    /// A `serde_json` value as the runtime holds an event.
    fn document(value: &serde_json::Value) -> sonic_rs::Value {
        crate::event::parse_value(&serde_json::to_vec(value).expect("JSON")).expect("event")
    }

    /// What the sink wrote before: the event's text parsed by `serde_json`.
    fn encoded_as_before(event: &sonic_rs::Value, shape: &Shape) -> Result<Vec<u8>, String> {
        let value: serde_json::Value =
            serde_json::from_slice(&sonic_rs::to_vec(event).expect("text")).expect("JSON");
        keystone_avro::encode(&value, shape, 3).map_err(|e| e.to_string())
    }

    #[test]
    fn events_are_encoded_from_their_documents_as_from_their_text() {
        let shape = shape(EVERY_TYPE);
        let encode = |event: &sonic_rs::Value| {
            keystone_avro::encode_document::<Sonic>(event, &shape, 3).map_err(|e| e.to_string())
        };
        let mut variants = vec![every_type()];
        // What an event may hold besides what reading gives.
        let mut other = every_type();
        other["ms"] = serde_json::json!(1_764_932_400_123_i64);
        other["us"] = serde_json::json!(0);
        other["money"] = serde_json::json!(12.5);
        other["day"] = serde_json::json!(19_723);
        other["maybe"] = serde_json::Value::Null;
        other["json"] = serde_json::json!([1, {"k": true}, "x"]);
        other.as_object_mut().expect("object").remove("level");
        variants.push(other);
        for event in &mut variants {
            // One entry: a map's entries are encoded in no set order.
            event["attrs"] = serde_json::json!({"n": 3});
            let event = document(event);
            assert_eq!(encode(&event), encoded_as_before(&event, &shape), "{event}");
            assert!(encode(&event).is_ok());
        }
        // Refused alike, with the same reasons.
        for (field, value) in [
            ("i", serde_json::json!(1.5)),
            ("i", serde_json::json!(1_i64 << 40)),
            ("l", serde_json::json!("7")),
            ("money", serde_json::json!("1.234")),
            ("money", serde_json::json!(1e300)),
            ("day", serde_json::json!("05.12.2026")),
            ("clock", serde_json::json!(5)),
            ("ms", serde_json::json!("yesterday")),
            ("ms", serde_json::json!(1e300)),
            ("local", serde_json::json!("2026-12-05T11:30:00Z")),
            ("e", serde_json::json!("BLUE")),
            ("four", serde_json::json!("AQID")),
            ("raw", serde_json::json!("not base64!")),
            ("u", serde_json::json!("nope")),
            ("tags", serde_json::json!("a")),
            ("attrs", serde_json::json!({"n": "x"})),
            ("nested", serde_json::json!({"x": 1})),
            ("again", serde_json::json!(null)),
        ] {
            let mut event = every_type();
            event[field] = value;
            let event = document(&event);
            let refused = encode(&event).expect_err("refused");
            assert_eq!(Err(refused.clone()), encoded_as_before(&event, &shape));
            assert!(refused.contains(&format!("field {field}")), "{refused}");
        }
    }

    #[test]
    fn numbers_beyond_64_bits_are_decimals_exactly() {
        let decimal = r#"{"type": "record", "name": "D", "fields": [
          {"name": "v", "type": {"type": "bytes", "logicalType": "decimal", "precision": 30, "scale": 2}},
          {"name": "n", "type": "long"}
        ]}"#;
        let shape = shape(decimal);
        let event = crate::event::parse_value(br#"{"v": 123456789012345678901.25, "n": 1}"#)
            .expect("event");
        let framed = keystone_avro::encode_document::<Sonic>(&event, &shape, 1).expect("fits");
        let (_, datum) = wire::split(&framed).expect("framed");
        let read = keystone_avro::decode(1, datum, shape.schema(), &shape).expect("decode");
        assert_eq!(
            read["v"], "123456789012345678901.25",
            "not rounded to a double"
        );
        let wide =
            crate::event::parse_value(br#"{"v": 1, "n": 123456789012345678901}"#).expect("event");
        assert_eq!(
            keystone_avro::encode_document::<Sonic>(&wide, &shape, 1).map_err(|e| e.to_string()),
            Err("field n: expected an integer, found a number".to_owned())
        );
    }
}
