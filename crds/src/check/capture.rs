//! `spec.source.postgres`: the capture topic the operator creates, the
//! capture's configuration in the plan, and what the checker can tell
//! without the database (the table's columns are checked by the capture
//! when it starts).

use std::collections::BTreeMap;

use super::{Checker, ErrorKind};
use crate::pipeline::capture::{CaptureConfig, Envelope};
use crate::plan::{Partitions, PlanTopic, TopicRole};
use crate::schema::{FieldType, Schema};

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

impl Checker<'_> {
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
    }
}
