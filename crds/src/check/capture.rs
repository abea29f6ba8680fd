//! `spec.source.postgres`: the capture topic the operator creates, the
//! capture's configuration in the plan, the source schema the capture's
//! events have (its envelope, and the table's columns once the capture
//! described the table), and the declared schema checked against the table.

use std::collections::BTreeMap;

use super::{Checker, ErrorKind};
use crate::pipeline::capture::{CaptureConfig, Envelope, SourceTable};
use crate::plan::{PLAN_VERSION, Partitions, Plan, PlanSource, PlanTopic, TopicRole};
use crate::schema::{FieldSpec, FieldType, Schema, SchemaSpec};

/// PostgreSQL's identifier limit: longer names are cut, and two pipelines'
/// slots could then collide.
const MAX_IDENTIFIER: usize = 63;

/// The fields of Keystone's envelope and the types the capture writes them with.
const ENVELOPE_FIELDS: [(&str, &[FieldType]); 6] = [
    ("op", &[FieldType::String]),
    ("seq", &[FieldType::Integer, FieldType::Number]),
    (
        "ts",
        &[FieldType::Integer, FieldType::Number, FieldType::Timestamp],
    ),
    ("before", &[FieldType::Object]),
    ("after", &[FieldType::Object]),
    ("source", &[FieldType::Object]),
];

impl<'a> Checker<'a> {
    /// The table the capture described, if it is one the spec captures.
    pub(super) fn captured_table(&self) -> Option<&'a SourceTable> {
        let postgres = self.pipeline.spec.source.postgres.as_ref()?;
        self.source_table.filter(|t| postgres.captures(t))
    }

    /// The schema of the source's events: the declared fields, and for a
    /// capture the fields its envelope always has and, once the capture
    /// described the table, the table's columns. Steps are then checked
    /// against the real table, and a column added or dropped changes the
    /// plan, so that the classifier judges it as an upgrade.
    pub(super) fn source_schema(&self) -> SchemaSpec {
        let source = &self.pipeline.spec.source;
        if let Some(http) = &source.http {
            return ingest_schema(&source.schema, http);
        }
        if let Some(registered) = self.avro_source() {
            return self.avro_source_schema(registered);
        }
        let Some(postgres) = &source.postgres else {
            return source.schema.clone();
        };
        let mut schema = source.schema.clone();
        let table = self.captured_table();
        for field in captured_fields(postgres.envelope, table) {
            if !declared_elsewhere(&source.schema, &field) {
                schema.fields.push(field);
            }
        }
        // With the table the events' whole shape is known: a step that uses
        // a column the table lacks is refused, not left to the runtime.
        if table.is_some() {
            schema.open = false;
        }
        schema
    }

    /// The plan of a capture alone: its topic and configuration, no stages
    /// and no sinks. Checked without the steps, it can run before the table
    /// is known, so that the capture describes the table the steps are then
    /// checked against.
    pub(super) fn capture_plan(&mut self) -> Plan {
        let spec = &self.pipeline.spec;
        let schema = self.source_schema();
        self.check_capture(&Schema::from_spec(&schema));
        if spec.source.postgres.is_none() {
            self.error(
                ErrorKind::InvalidOperator,
                "spec.source",
                None,
                "only a postgres source has a capture to run on its own",
            );
        }
        Plan {
            version: PLAN_VERSION,
            namespace: self.namespace.clone(),
            pipeline: self.name.clone(),
            source: PlanSource {
                cluster: spec.source.cluster.clone(),
                topic: spec.source.topic.clone(),
                key: spec.source.key.clone(),
                start_from: spec.source.start_from,
                schema,
                avro: None,
            },
            delivery: spec.delivery,
            commit_interval_ms: spec.commit_interval.as_millis(),
            checkpoint_interval_ms: spec.checkpoint_interval.as_millis(),
            dead_letter_topic: String::new(),
            stages: Vec::new(),
            sinks: Vec::new(),
            topics: vec![self.source_topic()],
            capture: self.capture_config(),
            ingest: None,
            schema_registry: None,
        }
    }

    /// The source topic: the user's (it must exist), or the capture's, which
    /// the operator creates compacted, with the spec's partitions and retention.
    pub(super) fn source_topic(&self) -> PlanTopic {
        let source = &self.pipeline.spec.source;
        let mut topic = PlanTopic {
            name: source.topic.clone(),
            cluster: source.cluster.clone(),
            role: TopicRole::Source,
            create: false,
            partitions: None,
            replication_factor: None,
            config: BTreeMap::new(),
        };
        if let Some(http) = &source.http {
            topic.create = true;
            topic.partitions = Some(Partitions::Fixed(http.partitions));
        }
        if let Some(postgres) = &source.postgres {
            topic.create = true;
            topic.partitions = Some(Partitions::Fixed(postgres.partitions));
            let policy = if postgres.retention.is_some() {
                "compact,delete"
            } else {
                "compact"
            };
            topic
                .config
                .insert("cleanup.policy".to_owned(), policy.to_owned());
            if let Some(retention) = &postgres.retention {
                topic
                    .config
                    .insert("retention.ms".to_owned(), retention.as_millis().to_string());
            }
        }
        topic
    }

    pub(super) fn capture_config(&self) -> Option<CaptureConfig> {
        let spec = &self.pipeline.spec;
        spec.source.postgres.as_ref().map(|postgres| {
            postgres.capture_config(
                &self.namespace,
                &self.name,
                &spec.source.topic,
                spec.commit_interval,
            )
        })
    }

    /// Checks a capture source: its names, its key and the envelope's fields
    /// the schema declares.
    pub(super) fn check_capture(&mut self, schema: &Schema) {
        let source = &self.pipeline.spec.source;
        if let Some(http) = &source.http {
            self.check_ingest(http);
        }
        let Some(postgres) = &source.postgres else {
            return;
        };
        for (field, name, given) in [
            (
                "publication",
                postgres.publication_name(&self.namespace, &self.name),
                postgres.publication.is_some(),
            ),
            (
                "slot",
                postgres.slot_name(&self.namespace, &self.name),
                postgres.slot.is_some(),
            ),
        ] {
            if !given && name.len() > MAX_IDENTIFIER {
                self.error(
                    ErrorKind::InvalidOperator,
                    format!("spec.source.postgres.{field}"),
                    None,
                    format!(
                        "the {field} name derived from the namespace and pipeline, {name:?}, is longer than PostgreSQL's {MAX_IDENTIFIER} characters; set {field}"
                    ),
                );
            }
        }
        match postgres.envelope {
            Envelope::Keystone => {
                if source.key.is_empty() {
                    self.error(
                        ErrorKind::MissingField,
                        "spec.source.key",
                        None,
                        "the capture topic is keyed by the table's primary key: list its columns in key (events carry them at the top level)",
                    );
                }
                for (field, types) in ENVELOPE_FIELDS {
                    if let Some(info) = schema.get(field)
                        && !types.contains(&info.field_type)
                    {
                        self.error(
                            ErrorKind::WrongType,
                            "spec.source.schema",
                            None,
                            format!(
                                "field {field:?} is declared {:?}, but the capture writes it as {:?}",
                                info.field_type, types[0]
                            ),
                        );
                    }
                }
            }
            Envelope::Debezium => {
                if !source.key.is_empty() {
                    self.error(
                        ErrorKind::InvalidOperator,
                        "spec.source.key",
                        None,
                        "with envelope debezium the records' key is a JSON object of the primary key that no event field equals: leave key empty (or use the keystone envelope)",
                    );
                }
            }
        }
        if let Some(table) = self.captured_table() {
            self.check_against_table(table, postgres.envelope);
        }
    }

    /// Checks the declared source schema and key against the captured
    /// table: every declared column field names a column whose values have
    /// the declared type, and the key is the primary key.
    fn check_against_table(&mut self, table: &SourceTable, envelope: Envelope) {
        let source = &self.pipeline.spec.source;
        let primary_key = table.primary_key();
        if envelope == Envelope::Keystone && !source.key.is_empty() && source.key != primary_key {
            self.error(
                ErrorKind::MissingField,
                "spec.source.key",
                None,
                format!(
                    "the capture keys events by {}'s primary key [{}], but key is [{}]",
                    table.name,
                    primary_key.join(", "),
                    source.key.join(", ")
                ),
            );
        }
        let row_objects: &[&str] = &["before", "after"];
        for (i, field) in source.schema.fields.iter().enumerate() {
            let mut segments = field.name.split('.');
            let first = segments.next().unwrap_or_default();
            let (column_name, nested) = if row_objects.contains(&first) {
                match segments.next() {
                    Some(column) => (column, segments.next().is_some()),
                    None => continue,
                }
            } else if envelope == Envelope::Keystone && !is_envelope_field(first) {
                // Top-level fields of Keystone's envelope are the key's columns.
                if table.column(first).is_some_and(|c| !c.primary_key) {
                    self.error(
                        ErrorKind::MissingField,
                        format!("spec.source.schema.fields[{i}]"),
                        None,
                        format!(
                            "{first:?} is a column of {} but not of its primary key [{}]: events carry only the key's columns at the top level (the rest is under after and before)",
                            table.name,
                            primary_key.join(", ")
                        ),
                    );
                    continue;
                }
                (first, segments.next().is_some())
            } else {
                continue;
            };
            let Some(column) = table.column(column_name) else {
                self.error(
                    ErrorKind::MissingField,
                    format!("spec.source.schema.fields[{i}]"),
                    None,
                    format!(
                        "{} is declared, but {} has no column {column_name:?} (its columns: {})",
                        field.name,
                        table.name,
                        table
                            .columns
                            .iter()
                            .map(|c| c.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
                continue;
            };
            // Fields inside a column (a json or jsonb value) are the user's to know.
            let holds = if nested {
                matches!(column.field_type, FieldType::Any | FieldType::Object)
            } else {
                column.field_type.satisfies(field.field_type)
            };
            if !holds {
                self.error(
                    ErrorKind::WrongType,
                    format!("spec.source.schema.fields[{i}]"),
                    None,
                    format!(
                        "{} is declared {}, but column {} of {} is {}, which the capture writes as {}",
                        field.name,
                        field.field_type,
                        column.name,
                        table.name,
                        column.sql_type,
                        column.field_type
                    ),
                );
            }
        }
    }
}

/// The fields of a capture's events: its envelope's, and with the table the
/// columns (the key's at the top level of Keystone's envelope, every one
/// under `after` and `before`, which a delete or an insert lacks).
fn captured_fields(envelope: Envelope, table: Option<&SourceTable>) -> Vec<FieldSpec> {
    use FieldType::{Array, Boolean, Integer, Object, String, Timestamp};
    let field = |name: &str, field_type: FieldType, optional: bool| FieldSpec {
        name: name.to_owned(),
        field_type,
        optional,
        description: None,
    };
    let mut fields = match envelope {
        Envelope::Keystone => vec![
            field("op", String, false),
            field("seq", Integer, false),
            field("ts", Timestamp, false),
            field("before", Object, true),
            field("after", Object, true),
            field("unchanged", Array, true),
            field("source", Object, false),
            field("source.db", String, false),
            field("source.schema", String, false),
            field("source.table", String, false),
            field("source.lsn", String, false),
            field("source.snapshot", Boolean, false),
            field("source.txid", Integer, true),
        ],
        Envelope::Debezium => vec![
            field("op", String, false),
            field("ts_ms", Timestamp, false),
            field("before", Object, true),
            field("after", Object, true),
            field("source", Object, false),
            field("source.version", String, false),
            field("source.connector", String, false),
            field("source.name", String, false),
            field("source.ts_ms", Timestamp, false),
            field("source.snapshot", String, false),
            field("source.db", String, false),
            field("source.schema", String, false),
            field("source.table", String, false),
            field("source.txId", Integer, true),
            field("source.lsn", Integer, false),
        ],
    };
    let Some(table) = table else {
        return fields;
    };
    if envelope == Envelope::Keystone {
        for column in table.columns.iter().filter(|c| c.primary_key) {
            fields.push(field(&column.name, column.field_type, false));
        }
    }
    for row in ["after", "before"] {
        for column in &table.columns {
            fields.push(field(
                &format!("{row}.{}", column.name),
                column.field_type,
                true,
            ));
        }
    }
    fields
}

/// Whether the declared schema already says what `derived` is: it declares
/// the path itself, an ancestor that is not an object (so the path cannot
/// exist), or members of a column that is not an object (a `json` column
/// whose shape the user knows).
fn declared_elsewhere(declared: &SchemaSpec, derived: &FieldSpec) -> bool {
    let path = derived.name.as_str();
    let below = format!("{path}.");
    declared.fields.iter().any(|f| {
        f.name == path
            || (f.name.starts_with(&below) && derived.field_type != FieldType::Object)
            || path
                .strip_prefix(f.name.as_str())
                .is_some_and(|rest| rest.starts_with('.') && f.field_type != FieldType::Object)
    })
}

fn is_envelope_field(name: &str) -> bool {
    ENVELOPE_FIELDS.iter().any(|(field, _)| *field == name) || name == "unchanged"
}

impl Checker<'_> {
    /// The idempotency field is a string the endpoint writes: a declaration
    /// of it as anything else could never hold.
    fn check_ingest(&mut self, http: &crate::pipeline::http::HttpSourceSpec) {
        let Some(field) = &http.idempotency_field else {
            return;
        };
        let declared = self
            .pipeline
            .spec
            .source
            .schema
            .fields
            .iter()
            .find(|f| &f.name == field);
        if let Some(declared) = declared
            && !matches!(declared.field_type, FieldType::String | FieldType::Any)
        {
            self.error(
                ErrorKind::InvalidOperator,
                "spec.source.http.idempotencyField",
                None,
                format!(
                    "the endpoint writes \"<Idempotency-Key>/<index>\" (a string) into {field:?}, which the source schema declares {}; declare it a string or leave it out",
                    declared.field_type
                ),
            );
        }
    }
}

/// The source schema of an HTTP source: the declared fields, and the field
/// the endpoint stamps with each request's idempotency key (a string on every
/// record), unless declared.
fn ingest_schema(
    declared: &SchemaSpec,
    http: &crate::pipeline::http::HttpSourceSpec,
) -> SchemaSpec {
    let mut schema = declared.clone();
    if let Some(field) = &http.idempotency_field
        && !declared.fields.iter().any(|f| &f.name == field)
    {
        schema.fields.push(FieldSpec {
            name: field.clone(),
            field_type: FieldType::String,
            optional: false,
            description: None,
        });
    }
    schema
}
