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

use keystone_avro::registry::RegistryError;
use keystone_avro::{AvroSchema, RecordError, Shape, can_read, wire};

use crate::event::Event;

/// What is known of one writer schema id.
#[derive(Clone, Debug)]
enum Writer {
    /// Its records decode with this schema and resolve against the reader's.
    Readable(Arc<AvroSchema>),
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
            Ok(schema) => match can_read(&schema, self.reader.schema()) {
                Ok(()) => Writer::Readable(schema),
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
            // The JSON form goes through the parser every event goes through:
            // its limits (size, depth) hold for Avro input too.
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
            Some(Writer::Readable(schema)) => {
                let value = keystone_avro::decode(id, datum, &schema, &self.reader)
                    .map_err(|e| e.to_string())?;
                serde_json::to_vec(&value).map_err(|e| e.to_string())
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
        assert!(
            reason.contains("as JSON") && reason.contains("limit"),
            "{reason}"
        );
    }
}
