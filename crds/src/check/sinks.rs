//! The sinks' part of the contract: what each kind of sink needs from the
//! events that reach it, and the topics Kafka sinks add to the plan.

use std::collections::BTreeMap;

use super::{Checker, ErrorKind, StreamState, key_set, show_key, show_set};
use crate::pipeline::SinkSpec;
use crate::plan::{Partitions, PlanSink, PlanTopic, TopicRole};
use crate::schema::FieldType;

impl Checker<'_> {
    pub(super) fn check_sinks(
        &mut self,
        stream: &StreamState,
        topics: &mut Vec<PlanTopic>,
        dead_letter_topic: &str,
    ) -> Vec<PlanSink> {
        let spec = &self.pipeline.spec;
        let mut sinks = Vec::new();
        let mut sink_topics: BTreeMap<String, usize> = BTreeMap::new();
        for (i, sink) in spec.sinks.iter().enumerate() {
            let path = format!("spec.sinks[{i}]");
            let set = [
                sink.kafka.is_some(),
                sink.elasticsearch.is_some(),
                sink.iceberg.is_some(),
                sink.parquet.is_some(),
            ]
            .iter()
            .filter(|set| **set)
            .count();
            if set != 1 {
                self.error(
                    ErrorKind::InvalidSink,
                    &path,
                    Some(&sink.name),
                    "set exactly one of kafka, elasticsearch, iceberg or parquet",
                );
                continue;
            }
            let mut key = stream.key.clone();
            if let Some(kafka) = &sink.kafka {
                if !kafka.key.is_empty() {
                    key = kafka.key.clone();
                }
                self.require_sink_fields(
                    &kafka.key,
                    stream,
                    &format!("{path}.kafka.key"),
                    &sink.name,
                    "the record key",
                );
                if kafka.topic == spec.source.topic && kafka.cluster == spec.source.cluster {
                    self.error(
                        ErrorKind::TopicCycle,
                        format!("{path}.kafka.topic"),
                        Some(&sink.name),
                        format!("topic {:?} is the pipeline's source: writing to it would feed the pipeline its own output", kafka.topic),
                    );
                }
                if let Some(table) = topics
                    .iter()
                    .find(|t| t.role == TopicRole::Table && t.name == kafka.topic)
                {
                    self.error(
                        ErrorKind::TopicCycle,
                        format!("{path}.kafka.topic"),
                        Some(&sink.name),
                        format!(
                            "topic {:?} is also read as a join table: the pipeline would look up rows it wrote itself (a cycle)",
                            table.name
                        ),
                    );
                }
                if kafka.topic == dead_letter_topic {
                    self.error(
                        ErrorKind::TopicCycle,
                        format!("{path}.kafka.topic"),
                        Some(&sink.name),
                        format!(
                            "topic {:?} is the pipeline's dead-letter topic",
                            kafka.topic
                        ),
                    );
                }
                if let Some(first) = sink_topics.insert(kafka.topic.clone(), i) {
                    self.error(
                        ErrorKind::InvalidSink,
                        format!("{path}.kafka.topic"),
                        Some(&sink.name),
                        format!(
                            "topic {:?} is already written by spec.sinks[{first}]",
                            kafka.topic
                        ),
                    );
                }
                if kafka.preserve_order {
                    self.require_order(
                        stream,
                        &key,
                        &format!("{path}.kafka"),
                        &sink.name,
                        "preserveOrder is set",
                    );
                }
                topics.push(PlanTopic {
                    name: kafka.topic.clone(),
                    cluster: kafka.cluster.clone(),
                    role: TopicRole::Sink,
                    create: kafka.create,
                    partitions: kafka.create.then_some(Partitions::Fixed(kafka.partitions)),
                    replication_factor: kafka.replication_factor,
                    config: kafka.config.clone(),
                });
            }
            if let Some(es) = &sink.elasticsearch {
                self.require_sink_fields(
                    &es.id_fields,
                    stream,
                    &format!("{path}.elasticsearch.idFields"),
                    &sink.name,
                    "the document id",
                );
                match &es.version_field {
                    Some(version) => match stream.schema.get(version) {
                        None => self.error(
                            ErrorKind::MissingField,
                            format!("{path}.elasticsearch.versionField"),
                            Some(&sink.name),
                            format!("version field {version:?} does not reach the sink; available: {}", stream.schema.describe()),
                        ),
                        Some(info) if info.field_type != FieldType::Integer => self.error(
                            ErrorKind::WrongType,
                            format!("{path}.elasticsearch.versionField"),
                            Some(&sink.name),
                            format!("version field {version:?} must be an integer to serve as an external version, but it is {}", info.field_type),
                        ),
                        Some(_) => {}
                    },
                    None => self.require_order(
                        stream,
                        &es.id_fields,
                        &format!("{path}.elasticsearch"),
                        &sink.name,
                        "documents are overwritten by id without a versionField",
                    ),
                }
            }
            if let Some(iceberg) = &sink.iceberg {
                self.require_sink_fields(
                    &iceberg.partition_by,
                    stream,
                    &format!("{path}.iceberg.partitionBy"),
                    &sink.name,
                    "a partition column",
                );
            }
            if let Some(parquet) = &sink.parquet {
                self.require_sink_fields(
                    &parquet.partition_by,
                    stream,
                    &format!("{path}.parquet.partitionBy"),
                    &sink.name,
                    "a partition directory",
                );
            }
            sinks.push(PlanSink {
                name: sink.name.clone(),
                key,
                schema: stream.schema.to_spec(),
                spec: SinkSpec::clone(sink),
            });
        }
        sinks
    }

    fn require_sink_fields(
        &mut self,
        fields: &[String],
        stream: &StreamState,
        path: &str,
        sink: &str,
        purpose: &str,
    ) {
        for (i, field) in fields.iter().enumerate() {
            if stream.schema.get(field).is_none() {
                self.error(
                    ErrorKind::MissingField,
                    format!("{path}[{i}]"),
                    Some(sink),
                    format!("needs field {field:?} for {purpose}, but it does not reach the sink; available: {}", stream.schema.describe()),
                );
            }
        }
    }

    fn require_order(
        &mut self,
        stream: &StreamState,
        key: &[String],
        path: &str,
        sink: &str,
        why: &str,
    ) {
        let needed = key_set(key);
        if !stream
            .ordered_by
            .as_ref()
            .is_some_and(|o| o.is_subset(&needed))
        {
            let have = match &stream.ordered_by {
                Some(o) => format!("the stream is only in order per {}", show_set(o)),
                None => "the stream has no known per-key order".to_owned(),
            };
            self.error(
                ErrorKind::OrderNotGuaranteed,
                path,
                Some(sink),
                format!(
                    "{why}, so events must arrive in order per {}, but {have}; add an order step keyed by {}{}",
                    show_key(key),
                    show_key(key),
                    if path.ends_with("elasticsearch") { " or set versionField" } else { "" }
                ),
            );
        }
    }
}
