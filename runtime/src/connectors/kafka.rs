//! The Kafka sink: records go through the stage's transactional producer, so
//! under exactly-once they commit atomically with the consumed offsets.
//!
//! After a rollback (`RestorePlan.suppress`), the sink skips events whose
//! source record the topic already holds past the checkpoint: the state they
//! change still changes, only the record is not written twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use keystone_avro::{FramedWriter, Shape};
use keystone_crds::checkpoint::ReplaySuppression;
use keystone_crds::plan::PlanSink;
use prometheus::IntCounter;
use rdkafka::ClientConfig;
use rdkafka::message::Message;

use crate::avro::Sonic;
use crate::connectors::{Guarantee, Prepared, Sink, SinkError, SinkOutput, SinkRecord};
use crate::event::record_key;
use crate::event::{DeadLetter, FieldPath, Provenance};
use crate::kafka::outbox::Outbox;
use crate::kafka::records::{provenance_headers, provenance_of};
use crate::kafka::{TransportError, restore};

pub struct KafkaSink {
    name: String,
    topic: String,
    key: Vec<FieldPath>,
    outbox: Arc<Outbox>,
    suppression: Suppression,
    /// Values written as Avro (the registry's wire format) instead of JSON.
    avro: Option<AvroWriter>,
    /// Keys written as Avro (`keyFormat: avro`), with the key record's field
    /// names (the key paths, `.` as `_`) when there are several key fields.
    avro_key: Option<(AvroWriter, Vec<String>)>,
}

/// The Avro writers of a Kafka sink's values and keys, from the registry.
#[derive(Default)]
pub struct AvroWriters {
    pub value: Option<AvroWriter>,
    pub key: Option<AvroWriter>,
}

/// Writes events as Avro records of one registered schema.
pub struct AvroWriter(FramedWriter);

impl AvroWriter {
    /// Records of `shape`'s schema, registered as `id`.
    pub fn new(shape: Shape, id: u32) -> Result<Self, String> {
        FramedWriter::new(shape, id)
            .map(Self)
            .map_err(|e| e.to_string())
    }

    /// The framed record of an event's document, or why the event does not
    /// fit the schema.
    pub fn encode(&mut self, value: &sonic_rs::Value) -> Result<Vec<u8>, String> {
        self.0.encode::<Sonic>(value).map_err(|e| e.to_string())
    }
}

impl KafkaSink {
    /// `suppressed` counts the records a replay does not write again.
    pub fn new(
        sink: &PlanSink,
        outbox: Arc<Outbox>,
        delivered: HashSet<Provenance>,
        suppressed: IntCounter,
        avro: AvroWriters,
    ) -> Option<Self> {
        let kafka = sink.spec.kafka.as_ref()?;
        // The sink's own key fields, else the stream's key at the sink.
        let key = if kafka.key.is_empty() {
            &sink.key
        } else {
            &kafka.key
        };
        Some(Self {
            name: sink.name.clone(),
            topic: kafka.topic.clone(),
            key: key.iter().map(|k| FieldPath::new(k)).collect(),
            outbox,
            suppression: Suppression {
                delivered,
                suppressed,
                reported_all: false,
            },
            avro: avro.value,
            avro_key: avro.key.map(|writer| {
                let names = key
                    .iter()
                    .map(|path| keystone_avro::contract::key_field_name(path))
                    .collect();
                (writer, names)
            }),
        })
    }

    /// The Avro key of an event: the one key field's value, or a record of
    /// them (a missing field as null, which only an optional field's schema
    /// takes). `Ok(None)` when keys are JSON.
    fn avro_key(&mut self, event: &crate::event::Event) -> Result<Option<Vec<u8>>, String> {
        let Some((writer, names)) = &mut self.avro_key else {
            return Ok(None);
        };
        writer
            .encode(&key_document(&self.key, names, &event.value))
            .map(Some)
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }
}

/// What an Avro key is written from: the one key field's value, or an object
/// of them under `names`; a missing field is null.
fn key_document(key: &[FieldPath], names: &[String], event: &sonic_rs::Value) -> sonic_rs::Value {
    let value_of = |field: &FieldPath| field.get(event).cloned().unwrap_or_default();
    match key {
        [single] => value_of(single),
        fields => {
            let mut record = sonic_rs::Object::new();
            for (field, name) in fields.iter().zip(names) {
                record.insert(name, value_of(field));
            }
            record.into_value()
        }
    }
}

/// The dead letter of a record sink `name` cannot write, and why.
fn refused(name: &str, record: &SinkRecord<'_>, reason: String) -> DeadLetter {
    DeadLetter {
        step: format!("sink:{name}"),
        reason: format!("sink {name}: {reason}"),
        original: record.event.raw.clone(),
    }
}

impl Sink for KafkaSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn guarantee(&self) -> Guarantee {
        Guarantee::Transactional
    }

    fn write(&mut self, record: &SinkRecord<'_>, out: &mut SinkOutput) -> Result<(), SinkError> {
        if self.suppression.holds(record.event.source) {
            return Ok(());
        }
        let encoded;
        let value = match &mut self.avro {
            None => record.value,
            Some(writer) => match writer.encode(&record.event.value) {
                Ok(bytes) => {
                    encoded = bytes;
                    encoded.as_slice()
                }
                Err(reason) => {
                    out.dead_letters.push(refused(&self.name, record, reason));
                    return Ok(());
                }
            },
        };
        let key = match self.avro_key(record.event) {
            Ok(Some(avro)) => Some(avro),
            Ok(None) => record_key(record.event, &self.key),
            Err(reason) => {
                out.dead_letters
                    .push(refused(&self.name, record, format!("key: {reason}")));
                return Ok(());
            }
        };
        self.outbox
            .send(
                &self.topic,
                key.as_deref(),
                Some(value),
                None,
                provenance_headers(record.event.source),
            )
            .map_err(|source| SinkError::Transport {
                sink: self.name.clone(),
                source,
            })
    }

    /// The host's transaction (or, at least once, its acknowledged epochs)
    /// covers what was sent: nothing to wait for here.
    fn prepare(&mut self, _: Duration, _: &mut SinkOutput) -> Result<Prepared, SinkError> {
        Ok(Prepared::Ready)
    }
}

/// Source records a replay must not write again: those the sink topic holds
/// past the checkpoint.
struct Suppression {
    delivered: HashSet<Provenance>,
    suppressed: IntCounter,
    reported_all: bool,
}

impl Suppression {
    fn holds(&mut self, source: Option<Provenance>) -> bool {
        if self.delivered.is_empty() {
            return false;
        }
        let held = source.is_some_and(|source| self.delivered.contains(&source));
        if held {
            self.suppressed.inc();
            if !self.reported_all && self.suppressed.get() as usize >= self.delivered.len() {
                self.reported_all = true;
                tracing::info!(
                    skipped = self.suppressed.get(),
                    "replay suppression: every record delivered past the checkpoint was met again and skipped"
                );
            }
        }
        held
    }
}

/// Reads every listed partition of the sink topics from the checkpoint's
/// position to its current end (committed records only) and returns, per
/// topic, the source records they hold.
pub fn load_delivered(
    config: &ClientConfig,
    plan: &ReplaySuppression,
    topics: &[&str],
) -> Result<HashMap<String, HashSet<Provenance>>, TransportError> {
    let mut starts = BTreeMap::new();
    for topic in topics {
        for (partition, offset) in plan.sink_positions.get(*topic).into_iter().flatten() {
            starts.insert(((*topic).to_owned(), *partition), *offset);
        }
    }
    let mut delivered: HashMap<String, HashSet<Provenance>> = HashMap::new();
    let mut without = 0u64;
    restore::scan(config, &starts, |message| match provenance_of(message) {
        Some(source) => {
            delivered
                .entry(message.topic().to_owned())
                .or_default()
                .insert(source);
        }
        None => without += 1,
    })?;
    for (topic, sources) in &delivered {
        tracing::info!(
            topic,
            delivered = sources.len(),
            "replay suppression: sink records past the checkpoint will not be written again"
        );
    }
    if without > 0 {
        tracing::warn!(
            records = without,
            "replay suppression: sink records without source headers cannot be recognised"
        );
    }
    Ok(delivered)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use prometheus::IntCounter;

    use super::Suppression;
    use crate::event::Provenance;

    #[test]
    fn suppression_skips_only_what_the_topic_holds() {
        let held = Provenance {
            partition: 1,
            offset: 5,
        };
        let mut suppression = Suppression {
            delivered: HashSet::from([held]),
            suppressed: IntCounter::new("suppressed", "test").expect("valid counter"),
            reported_all: false,
        };
        assert!(suppression.holds(Some(held)));
        assert!(!suppression.holds(Some(Provenance { offset: 6, ..held })));
        assert!(!suppression.holds(None));
        assert_eq!(suppression.suppressed.get(), 1);
        assert!(suppression.reported_all);
    }

    #[test]
    fn avro_records_carry_the_registered_id_and_what_does_not_fit_is_refused() {
        let schema = keystone_avro::AvroSchema::parse_str(
            r#"{"type": "record", "name": "R", "fields": [{"name": "id", "type": "long"}]}"#,
        )
        .expect("schema");
        let mut writer =
            super::AvroWriter::new(keystone_avro::Shape::new(schema).expect("shape"), 42)
                .expect("writer");
        let event = |text: &str| crate::event::parse_value(text.as_bytes()).expect("JSON");
        let framed = writer.encode(&event(r#"{"id": 7}"#)).expect("fits");
        assert_eq!(
            framed, b"\x00\x00\x00\x00\x2a\x0e",
            "magic, id 42, zig-zag 7"
        );
        let refused = writer
            .encode(&event(r#"{"id": "seven"}"#))
            .expect_err("does not fit");
        assert!(refused.contains("id"), "{refused}");
    }

    #[test]
    fn avro_keys_are_the_key_fields_as_the_derived_key_schema_has_them() {
        use crate::event::FieldPath;
        use keystone_crds::schema::{FieldSpec, FieldType, SchemaSpec};
        let field = |name: &str, field_type, optional| FieldSpec {
            name: name.into(),
            field_type,
            optional,
            description: None,
        };
        let contract = SchemaSpec {
            fields: vec![
                field("id", FieldType::String, false),
                field("customer.id", FieldType::Integer, false),
                field("region", FieldType::String, true),
            ],
            open: false,
        };
        let paths = |key: &[&str]| -> Vec<String> { key.iter().map(|k| (*k).to_owned()).collect() };
        let write = |key: &[&str], event: &str| {
            let key = paths(key);
            let derived = keystone_avro::contract::schema_for_key(&contract, &key, "ns", "K")
                .expect("key schema");
            let shape = keystone_avro::Shape::new(derived.schema.clone()).expect("shape");
            let mut writer = super::AvroWriter::new(shape, 7).expect("writer");
            let names: Vec<String> = key
                .iter()
                .map(|k| keystone_avro::contract::key_field_name(k))
                .collect();
            let fields: Vec<FieldPath> = key.iter().map(|k| FieldPath::new(k)).collect();
            let event = crate::event::parse_value(event.as_bytes()).expect("JSON");
            let framed = writer.encode(&super::key_document(&fields, &names, &event))?;
            let (id, datum) = keystone_avro::wire::split(&framed).expect("framed");
            assert_eq!(id, 7);
            let reader = keystone_avro::Shape::new(derived.schema.clone()).expect("shape");
            Ok::<_, String>(
                keystone_avro::decode(id, datum, &derived.schema, &reader).expect("decodes"),
            )
        };
        let event = r#"{"id": "o-1", "customer": {"id": 42}, "amount": 3}"#;
        assert_eq!(write(&["id"], event), Ok(serde_json::json!("o-1")));
        assert_eq!(
            write(&["customer.id", "id"], event),
            Ok(serde_json::json!({"customer_id": 42, "id": "o-1"}))
        );
        assert_eq!(
            write(&["region"], event),
            Ok(serde_json::Value::Null),
            "an optional key field that is missing is null"
        );
        let refused = write(&["customer.id"], r#"{"customer": {"id": "x"}}"#)
            .expect_err("a string is no long");
        assert!(!refused.is_empty());
    }
}
