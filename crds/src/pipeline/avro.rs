//! Avro values and the schema registry they are framed for: how a source
//! reads them, how a Kafka sink writes them, and where the registry is.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::default_true;

/// A schema registry with the Confluent-compatible REST API (Confluent Schema
/// Registry, Apicurio's `ccompat` API, Karapace, Redpanda).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchemaRegistrySpec {
    /// The API's base URL, for example `http://schema-registry.kafka:8081` or
    /// Apicurio's `http://apicurio.kafka:8080/apis/ccompat/v7`. The operator
    /// asks it for the source's schema and the sinks' compatibility; the
    /// pipeline's pods fetch writer schemas from it.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub url: String,
    /// A Secret in the pipeline's namespace with `username` and `password`
    /// (basic authentication) or `token` (a bearer token). Anonymous when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: Option<String>,
    /// A Secret in the pipeline's namespace whose `ca.crt` holds the PEM
    /// certificates to trust for an `https` URL, besides the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub ca_secret: Option<String>,
}

/// How a subject is named from the topic and the record (the serializers'
/// `subject.name.strategy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SubjectStrategy {
    /// `<topic>-value` (and `<topic>-key`).
    #[default]
    TopicName,
    /// The record's full name.
    RecordName,
    /// `<topic>-<record full name>`.
    TopicRecordName,
}

/// Which part of a Kafka record a schema describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordPart {
    Key,
    Value,
}

/// The subject of `part` of the records on `topic` whose schema is the
/// record `record` (full name).
pub fn subject_name(
    strategy: SubjectStrategy,
    topic: &str,
    record: &str,
    part: RecordPart,
) -> String {
    match (strategy, part) {
        (SubjectStrategy::TopicName, RecordPart::Key) => format!("{topic}-key"),
        (SubjectStrategy::TopicName, RecordPart::Value) => format!("{topic}-value"),
        (SubjectStrategy::RecordName, _) => record.to_owned(),
        (SubjectStrategy::TopicRecordName, _) => format!("{topic}-{record}"),
    }
}

/// How a source reads Avro values (`format: avro`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.subject) || has(self.recordName) || !has(self.subjectStrategy) || self.subjectStrategy == 'TopicName'",
     "message": "RecordName and TopicRecordName need recordName (or set subject)"},
    {"rule": "!has(self.schema) || !has(self.version)",
     "message": "schema and version are exclusive: an inline schema is the reader schema itself"},
]))]
#[serde(rename_all = "camelCase")]
pub struct AvroSourceSpec {
    /// How the reader schema's subject is named; `TopicName` (`<topic>-value`) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_strategy: Option<SubjectStrategy>,
    /// The record's full name, for the `RecordName` strategies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub record_name: Option<String>,
    /// The subject itself, instead of a strategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub subject: Option<String>,
    /// The subject's version to read with. When unset the latest version is
    /// the reader schema, and the operator follows it: a version registered
    /// later is rolled out as an upgrade, so its new fields reach the steps.
    /// Records of any writer schema that resolves against the reader are read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub version: Option<i32>,
    /// The reader schema itself (Avro schema JSON, as in an `.avsc` file),
    /// instead of a registered version: the steps are checked against it,
    /// `keystone-runtime check` needs neither a registry nor a file, and the
    /// operator does not follow the subject's new versions. Records are still
    /// framed with their writer schema's registry id, fetched from the
    /// registry and resolved against this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 262144))]
    pub schema: Option<String>,
}

impl AvroSourceSpec {
    /// The pinned version (the schema refuses one below 1).
    pub fn pinned_version(&self) -> Option<u32> {
        self.version.and_then(|v| u32::try_from(v).ok())
    }

    /// The subject the reader schema is registered under, for `topic`.
    pub fn subject(&self, topic: &str) -> String {
        if let Some(subject) = &self.subject {
            return subject.clone();
        }
        subject_name(
            self.subject_strategy.unwrap_or_default(),
            topic,
            self.record_name.as_deref().unwrap_or_default(),
            RecordPart::Value,
        )
    }
}

/// How a Kafka sink writes Avro values (`format: avro`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AvroSinkSpec {
    /// How the subject is named; `TopicName` (`<topic>-value`) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_strategy: Option<SubjectStrategy>,
    /// The full name of the record schema derived from the output contract;
    /// `dev.keystone.<namespace>.<pipeline>` (dots and dashes as `_` in the
    /// name) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 512),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
    )]
    pub record_name: Option<String>,
    /// The subject itself, instead of a strategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub subject: Option<String>,
    /// Write with this registered version of the subject, as registered; its
    /// fields must take the output contract. When unset the schema is derived
    /// from the output contract (optional fields as `["null", T]` with
    /// default null) and checked against the subject's compatibility rule
    /// before every deploy and upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub version: Option<i32>,
    /// Register the derived schema under the subject (the default). When
    /// false, for registries where only a pipeline of approvals registers,
    /// the derived schema must already be registered there.
    #[serde(default = "default_true")]
    pub auto_register: bool,
}

impl Default for AvroSinkSpec {
    fn default() -> Self {
        Self {
            subject_strategy: None,
            record_name: None,
            subject: None,
            version: None,
            auto_register: true,
        }
    }
}

impl AvroSinkSpec {
    /// The pinned version (the schema refuses one below 1).
    pub fn pinned_version(&self) -> Option<u32> {
        self.version.and_then(|v| u32::try_from(v).ok())
    }

    /// The subject a sink on `topic` writes under, its record named `record`.
    pub fn subject(&self, topic: &str, record: &str) -> String {
        if let Some(subject) = &self.subject {
            return subject.clone();
        }
        subject_name(
            self.subject_strategy.unwrap_or_default(),
            topic,
            self.record_name.as_deref().unwrap_or(record),
            RecordPart::Value,
        )
    }
}

/// The default full name of a pipeline's derived record schema: namespace
/// `dev.keystone.<namespace>`, name the pipeline's, with what Avro names
/// cannot hold as `_`.
pub fn default_record_name(namespace: &str, pipeline: &str) -> (String, String) {
    let clean = |s: &str| -> String {
        let mut out: String = s
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        if out.starts_with(|c: char| c.is_ascii_digit()) {
            out.insert(0, '_');
        }
        out
    };
    (
        format!("dev.keystone.{}", clean(namespace)),
        clean(pipeline),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_strategy_or_the_explicit_subject() {
        let source = AvroSourceSpec::default();
        assert_eq!(source.subject("orders"), "orders-value");
        let by_record = AvroSourceSpec {
            subject_strategy: Some(SubjectStrategy::TopicRecordName),
            record_name: Some("shop.Order".into()),
            ..AvroSourceSpec::default()
        };
        assert_eq!(by_record.subject("orders"), "orders-shop.Order");
        let explicit = AvroSourceSpec {
            subject: Some("custom".into()),
            ..by_record
        };
        assert_eq!(explicit.subject("orders"), "custom");
        let sink = AvroSinkSpec {
            subject_strategy: Some(SubjectStrategy::RecordName),
            ..AvroSinkSpec::default()
        };
        assert_eq!(
            sink.subject("out", "dev.keystone.shop.clean"),
            "dev.keystone.shop.clean"
        );
    }

    #[test]
    fn default_record_names_are_avro_names() {
        assert_eq!(
            default_record_name("team-a", "9-orders.v2"),
            ("dev.keystone.team_a".to_owned(), "_9_orders_v2".to_owned())
        );
    }
}
