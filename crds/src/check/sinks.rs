//! The sinks' part of the contract: which kinds of sink this version can
//! write, what each kind needs from the events that reach it, and the topics
//! Kafka sinks add to the plan.

use std::collections::BTreeMap;

use super::{Checker, ErrorKind, StreamState, key_set, show_key, show_set};
use crate::pipeline::{SinkKind, SinkSpec};
use crate::plan::{Partitions, PlanSink, PlanTopic, TopicRole};
use crate::schema::FieldType;

/// The kinds of sink this version of Keystone can write. The checker refuses
/// the others, so a pipeline with one is never deployed only for its runtime
/// to refuse the plan.
pub const WRITABLE_SINKS: &[SinkKind] = &[SinkKind::Kafka, SinkKind::Elasticsearch];

/// The writable kinds in words: `kafka and elasticsearch`.
fn writable_kinds() -> String {
    let names: Vec<&str> = WRITABLE_SINKS.iter().map(|k| k.as_str()).collect();
    match names.split_last() {
        None => "no".to_owned(),
        Some((last, [])) => (*last).to_owned(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

/// Why a sink of `kind` is refused, and what the user can do instead.
fn unsupported_message(kind: SinkKind) -> String {
    let instead = match kind {
        SinkKind::Iceberg => "write to a Kafka topic that a separate job loads into the table",
        SinkKind::Parquet => {
            "write to a Kafka topic that a separate job writes out as Parquet files"
        }
        SinkKind::Kafka | SinkKind::Elasticsearch => "write to a Kafka topic instead",
    };
    format!(
        "{kind} sinks cannot be written by this version of Keystone yet (it writes {} sinks); remove the sink or {instead}",
        writable_kinds()
    )
}

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
            let Some(kind) = sink.kind() else {
                self.error(
                    ErrorKind::InvalidSink,
                    &path,
                    Some(&sink.name),
                    "set exactly one of kafka, elasticsearch, iceberg or parquet",
                );
                continue;
            };
            if !WRITABLE_SINKS.contains(&kind) {
                // Its other checks still run: every error is reported, not only the first.
                self.error(
                    ErrorKind::UnsupportedSink,
                    format!("{path}.{kind}"),
                    Some(&sink.name),
                    unsupported_message(kind),
                );
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
