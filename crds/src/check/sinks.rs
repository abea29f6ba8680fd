//! The sinks' part of the contract: which kinds of sink this version can
//! write, what each kind needs from the events that reach it, and the topics
//! Kafka sinks add to the plan.

use std::collections::BTreeMap;

use super::expressions::EVENT_VARIABLE;
use super::typing::Usage;
use super::{Checker, ErrorKind, StreamState, key_set, show_key, show_set};
use crate::pipeline::{ElasticsearchSinkSpec, SinkKind, SinkSpec};
use crate::plan::{Partitions, PlanSink, PlanTopic, TopicRole};
use crate::schema::{FieldType, Schema};

/// The kinds of sink this version of Keystone can write. The checker refuses
/// the others, so a pipeline with one is never deployed only for its runtime
/// to refuse the plan.
pub const WRITABLE_SINKS: &[SinkKind] = &[
    SinkKind::Kafka,
    SinkKind::Elasticsearch,
    SinkKind::Iceberg,
    SinkKind::Parquet,
];

/// The field whose string value `d` marks a delete in a search sink without
/// `deleteWhen` (the Debezium convention).
const DEFAULT_DELETE_FIELD: &str = "op";

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

/// Why Elasticsearch and OpenSearch would refuse `index` as an index name, if
/// they would. The CRD's pattern refuses the same names; this says why, and
/// covers manifests checked without an API server.
fn index_name_problem(index: &str) -> Option<String> {
    let Some(first) = index.chars().next() else {
        return Some("the index name is empty".to_owned());
    };
    if index == "." || index == ".." {
        return Some(format!(
            "{index:?} is not a valid index name (. and .. are reserved); choose another name"
        ));
    }
    if matches!(first, '_' | '-' | '+') {
        return Some(format!(
            "index {index:?} starts with '{first}', which Elasticsearch and OpenSearch refuse; start it with a lowercase letter or digit"
        ));
    }
    if first == '.' {
        return Some(format!(
            "index {index:?} starts with '.', which marks hidden and system indices; start it with a lowercase letter or digit"
        ));
    }
    if index.chars().any(|c| c.is_ascii_uppercase()) {
        return Some(format!(
            "index {index:?} has uppercase letters, which Elasticsearch and OpenSearch refuse; use {:?}",
            index.to_ascii_lowercase()
        ));
    }
    if let Some(bad) = index
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.')))
    {
        return Some(format!(
            "index {index:?} contains {bad:?}; index names may contain only lowercase letters, digits, '_', '-' and '.'"
        ));
    }
    if index.len() > 255 {
        return Some(format!(
            "the index name is {} bytes long; Elasticsearch and OpenSearch allow at most 255",
            index.len()
        ));
    }
    None
}

/// Whether a document id can be made of the field's values.
fn is_scalar(field_type: FieldType) -> bool {
    match field_type {
        FieldType::String
        | FieldType::Integer
        | FieldType::Number
        | FieldType::Boolean
        | FieldType::Timestamp => true,
        FieldType::Object | FieldType::Array | FieldType::Any => false,
    }
}

/// Whether events may lack `path`, and if so why, as words to put after the
/// field's name: nothing when the field itself is optional, ` (its parent "a"
/// is)` when an object it is nested in is.
fn optional_because(schema: &Schema, path: &str) -> Option<String> {
    if schema.get(path).is_some_and(|info| info.optional) {
        return Some(String::new());
    }
    path.match_indices('.')
        .map(|(i, _)| &path[..i])
        .find(|parent| schema.get(parent).is_some_and(|info| info.optional))
        .map(|parent| format!(" (its parent {parent:?} is)"))
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
                self.require_source_cluster(
                    kafka.cluster.as_deref(),
                    &format!("{path}.kafka.cluster"),
                    &sink.name,
                    "sink",
                );
                if kafka.avro.is_some() && kafka.format != crate::pipeline::Format::Avro {
                    self.error(
                        ErrorKind::InvalidSink,
                        format!("{path}.kafka.avro"),
                        Some(&sink.name),
                        "avro is written only with format: avro",
                    );
                }
                if kafka.key_format == crate::pipeline::Format::Avro && key.is_empty() {
                    self.error(
                        ErrorKind::InvalidSink,
                        format!("{path}.kafka.keyFormat"),
                        Some(&sink.name),
                        "keyFormat: avro writes the key fields as Avro, but the sink has none: set kafka.key, or key the stream (source key or a keyed step)",
                    );
                }
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
                self.check_search_sink(es, stream, &format!("{path}.elasticsearch"), &sink.name);
            }
            if let Some(iceberg) = &sink.iceberg {
                self.check_iceberg_sink(iceberg, stream, &format!("{path}.iceberg"), &sink.name);
            }
            if let Some(parquet) = &sink.parquet {
                self.check_parquet_sink(parquet, stream, &format!("{path}.parquet"), &sink.name);
            }
            sinks.push(PlanSink {
                name: sink.name.clone(),
                key,
                schema: stream.schema.to_spec(),
                spec: SinkSpec::clone(sink),
                avro: None,
                avro_key: None,
            });
        }
        sinks
    }

    /// A Kafka sink or table must be on the source's cluster. A stage's
    /// clients (and, under exactly-once, the one transaction that commits its
    /// input offsets with its outputs) are bound to one cluster: a topic named
    /// on another would be created there by the operator but written or read on
    /// the source's. Both sides are compared as written, since the checker
    /// does not know which cluster the operator's configuration makes the
    /// default: naming it on one side only is refused too.
    pub(super) fn require_source_cluster(
        &mut self,
        cluster: Option<&str>,
        path: &str,
        subject: &str,
        what: &str,
    ) {
        let source = self.pipeline.spec.source.cluster.as_deref();
        if cluster == source {
            return;
        }
        let show = |c: Option<&str>| match c {
            Some(name) => format!("cluster {name:?}"),
            None => "the default cluster".to_owned(),
        };
        self.error(
            ErrorKind::CrossCluster,
            path,
            Some(subject),
            format!(
                "the {what} is on {} but the source is on {}: a pipeline reads and writes one Kafka cluster \
                 (its offsets and outputs commit in one transaction, which cannot span clusters); \
                 name the same cluster as spec.source.cluster (or leave both unset), or move the data \
                 between clusters with a replicator such as MirrorMaker 2",
                show(cluster),
                show(source)
            ),
        );
    }

    /// A search sink: a valid index name; an id made of required scalar
    /// fields; a required integer version, or the per-id order that makes
    /// overwrites by id safe; and a delete condition that can be evaluated on
    /// the events that reach the sink.
    fn check_search_sink(
        &mut self,
        es: &ElasticsearchSinkSpec,
        stream: &StreamState,
        path: &str,
        sink: &str,
    ) {
        if let Some(problem) = index_name_problem(&es.index) {
            self.error(
                ErrorKind::InvalidSink,
                format!("{path}.index"),
                Some(sink),
                problem,
            );
        }

        self.require_sink_fields(
            &es.id_fields,
            stream,
            &format!("{path}.idFields"),
            sink,
            "the document id",
        );
        for (i, field) in es.id_fields.iter().enumerate() {
            // A field that does not reach the sink was reported above.
            let Some(info) = stream.schema.get(field) else {
                continue;
            };
            if !is_scalar(info.field_type) {
                self.error(
                    ErrorKind::WrongType,
                    format!("{path}.idFields[{i}]"),
                    Some(sink),
                    format!(
                        "id field {field:?} is {}, but a document id is made of scalar values (string, integer, number, boolean or timestamp); choose a scalar field, or derive one with a map step",
                        info.field_type
                    ),
                );
            } else if let Some(because) = optional_because(&stream.schema, field) {
                self.error(
                    ErrorKind::OptionalField,
                    format!("{path}.idFields[{i}]"),
                    Some(sink),
                    format!(
                        "id field {field:?} is optional{because}: an event without it could not be indexed (it would have no document id); make it required (events without it then go to the dead-letter topic) or choose required id fields"
                    ),
                );
            }
        }

        match &es.version_field {
            Some(version) => match stream.schema.get(version) {
                None => self.error(
                    ErrorKind::MissingField,
                    format!("{path}.versionField"),
                    Some(sink),
                    format!(
                        "version field {version:?} does not reach the sink; available: {}",
                        stream.schema.describe()
                    ),
                ),
                Some(info) if info.field_type != FieldType::Integer => self.error(
                    ErrorKind::WrongType,
                    format!("{path}.versionField"),
                    Some(sink),
                    format!(
                        "version field {version:?} must be an integer to serve as an external version, but it is {}",
                        info.field_type
                    ),
                ),
                Some(_) => {
                    if let Some(because) = optional_because(&stream.schema, version) {
                        self.error(
                            ErrorKind::OptionalField,
                            format!("{path}.versionField"),
                            Some(sink),
                            format!(
                                "version field {version:?} is optional{because}: an event without it could not be written with its external version; make it required (events without it then go to the dead-letter topic) or choose a required version field"
                            ),
                        );
                    }
                }
            },
            None => self.require_order(
                stream,
                &es.id_fields,
                path,
                sink,
                "documents are overwritten by id without a versionField",
            ),
        }

        match &es.delete_when {
            Some(expression) => {
                self.check_delete_when(expression, stream, &format!("{path}.deleteWhen"), sink)
            }
            None => {
                if let Some(op) = stream.schema.get(DEFAULT_DELETE_FIELD)
                    && !op.field_type.satisfies(FieldType::String)
                {
                    self.error(
                        ErrorKind::WrongType,
                        format!("{path}.deleteWhen"),
                        Some(sink),
                        format!(
                            "deleteWhen is unset, so an event whose {DEFAULT_DELETE_FIELD:?} field is the string \"d\" is a delete (the Debezium convention), but {DEFAULT_DELETE_FIELD:?} reaches the sink as {}; set deleteWhen to the CEL condition that marks a delete in these events",
                            op.field_type
                        ),
                    );
                }
            }
        }
    }

    /// `deleteWhen` parses as CEL, can be a bool, and reads only what reaches
    /// the sink: its top-level fields, or the whole event as `event`.
    fn check_delete_when(
        &mut self,
        expression: &str,
        stream: &StreamState,
        path: &str,
        sink: &str,
    ) {
        let usage = Usage::Condition {
            subject: "deleteWhen",
            need: "it must be a bool that says whether the event is a delete",
            example: "== \"d\"",
        };
        let Some(variables) = self.check_expression(expression, &stream.schema, usage, path, sink)
        else {
            return;
        };
        for variable in variables {
            if stream.schema.get(&variable).is_some() || variable == EVENT_VARIABLE {
                continue;
            }
            self.error(
                ErrorKind::MissingField,
                path,
                Some(sink),
                format!(
                    "needs field {variable:?} for deleteWhen, but it does not reach the sink; available: {}",
                    stream.schema.describe()
                ),
            );
        }
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
