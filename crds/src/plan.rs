//! The compiled plan: what the runtime executes. The operator stores it in a
//! ConfigMap; local mode compiles it the same way. The runtime never reads the
//! custom resources themselves.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ops::OperatorSpec;
use crate::pipeline::{Delivery, SinkSpec, StartPosition};
use crate::processor::RequiredField;
use crate::schema::SchemaSpec;

/// Bumped whenever the plan's meaning changes incompatibly; the runtime refuses
/// plans of another version.
pub const PLAN_VERSION: u32 = 1;

/// The longest `commitInterval` of a pipeline whose commits are Kafka
/// transactions (`delivery: ExactlyOnce`, or a `postgres` source's capture): a
/// transaction stays open for an interval, and at this one its timeout
/// ([`transaction_timeout`]) reaches what brokers allow by default
/// (`transaction.max.timeout.ms`, 15 minutes).
pub const MAX_TRANSACTIONAL_COMMIT_INTERVAL: crate::Duration = crate::Duration::from_secs(5 * 60);

/// The shortest transaction timeout Keystone asks for: Kafka Streams' default
/// under exactly-once, so that a dead instance's open transaction, and the
/// readers waiting on it, are not held longer than they must.
pub const MIN_TRANSACTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The Kafka transaction timeout of a transactional producer committing every
/// `commit_interval`: three intervals, so that the broker never aborts a
/// transaction that is open for an interval and then waits for its commit or a
/// slow sink, and at least [`MIN_TRANSACTION_TIMEOUT`].
pub fn transaction_timeout(commit_interval: std::time::Duration) -> std::time::Duration {
    commit_interval
        .saturating_mul(3)
        .max(MIN_TRANSACTION_TIMEOUT)
}

/// A compiled, versioned pipeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub version: u32,
    pub namespace: String,
    pub pipeline: String,
    pub source: PlanSource,
    pub delivery: Delivery,
    pub commit_interval_ms: u64,
    pub checkpoint_interval_ms: u64,
    pub dead_letter_topic: String,
    /// Stages in data-flow order; the first reads the source, the last writes the sinks.
    pub stages: Vec<PlanStage>,
    /// The sinks, written by the last stage.
    pub sinks: Vec<PlanSink>,
    /// Every topic the pipeline reads or writes, with who creates it.
    pub topics: Vec<PlanTopic>,
    /// The change data capture that writes the source topic
    /// (`spec.source.postgres`), run by its own instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<crate::pipeline::capture::CaptureConfig>,
    /// The HTTP ingest endpoint that writes the source topic
    /// (`spec.source.http`), run by its own instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingest: Option<crate::pipeline::http::HttpSourceSpec>,
    /// The schema registry of the Avro source and sinks, with the Secrets
    /// its credentials and CA are read from (`spec.schemaRegistry`, or the
    /// source cluster's in the operator's configuration). Set by whoever
    /// resolves the Avro schemas (the operator, `check`), not by the checker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_registry: Option<crate::pipeline::avro::SchemaRegistrySpec>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    pub topic: String,
    pub key: Vec<String>,
    pub start_from: StartPosition,
    pub schema: SchemaSpec,
    /// Record values are Avro in the schema registry's wire format; absent: JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avro: Option<PlanAvroSource>,
}

/// How a stage reads Avro record values: writer schemas by id from the
/// registry, each resolved against one reader schema.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanAvroSource {
    /// The registry's API base URL. Credentials and a CA come from the
    /// instance's environment, never from the plan.
    pub registry_url: String,
    /// The subject and version the reader schema is (version 0: the
    /// manifest's own, `spec.source.avro.schema`).
    pub subject: String,
    pub version: u32,
    /// The reader schema's text, fixed when the plan is compiled: every
    /// instance reads the same shape, the one the contract was checked against.
    pub reader_schema: String,
}

impl PlanAvroSource {
    /// Which reader schema this is, for messages: `the schema of
    /// spec.source.avro.schema`, or `SUBJECT version N`.
    pub fn reader_name(&self) -> String {
        if self.version == crate::check::INLINE_VERSION {
            format!("the schema of {}", crate::check::INLINE_SCHEMA_PATH)
        } else {
            format!("{} version {}", self.subject, self.version)
        }
    }
}

/// A group of steps fused into one runtime Deployment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanStage {
    /// `s0`, `s1`, ...
    pub name: String,
    pub parallelism: i32,
    pub input: StageInput,
    pub steps: Vec<PlanStep>,
    pub output: StageOutput,
    /// The Kafka consumer group of the stage's instances.
    pub consumer_group: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageInput {
    pub topic: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The fields the input topic is partitioned by; empty when unknown.
    pub partitioned_by: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StageOutput {
    /// Writes to the next stage's input topic, keyed by `key`.
    Repartition { topic: String, key: Vec<String> },
    /// Writes to the pipeline's sinks.
    Sinks,
}

/// One step as the runtime runs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanStep {
    pub name: String,
    /// The Processor it came from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processor: Option<String>,
    /// Exactly one operator is set.
    pub operator: OperatorSpec,
    /// Fields every event must carry, with their types, before this step runs;
    /// events that do not are dead-lettered with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<RequiredField>,
    /// The stream key after the step.
    pub key_after: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<PlanState>,
}

/// Keyed state of a step, backed by a compacted changelog topic. For `join` and
/// `enrich` the changelog is the table's own compacted topic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanState {
    pub key: Vec<String>,
    pub changelog_topic: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanSink {
    pub name: String,
    /// The stream key at the sink, used as the Kafka record key unless the sink sets one.
    pub key: Vec<String>,
    /// The schema of the events that reach the sink (the pipeline's output
    /// contract): sinks derive index mappings and table schemas from it.
    #[serde(default)]
    pub schema: SchemaSpec,
    pub spec: SinkSpec,
    /// A Kafka sink's values are written as Avro in the schema registry's
    /// wire format; absent: JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avro: Option<PlanAvroSink>,
    /// A Kafka sink's keys are written as Avro (`keyFormat: avro`); absent:
    /// JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avro_key: Option<PlanAvroSink>,
}

/// How a Kafka sink writes Avro record values (or keys).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanAvroSink {
    /// The registry's API base URL. Credentials and a CA come from the
    /// instance's environment, never from the plan.
    pub registry_url: String,
    /// The subject the records' schema is registered under.
    pub subject: String,
    pub writer: PlanAvroWriter,
}

/// The schema a Kafka sink writes with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PlanAvroWriter {
    /// This schema (derived from the output contract), registered under the
    /// subject when an instance starts; the registry answers with the id it
    /// already has when the schema is registered.
    Register { schema: String },
    /// A registered version of the subject, as registered.
    Version { version: u32 },
}

/// What a topic is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TopicRole {
    Source,
    Sink,
    Repartition,
    Changelog,
    DeadLetter,
    Table,
}

impl TopicRole {
    pub fn as_str(self) -> &'static str {
        match self {
            TopicRole::Source => "source",
            TopicRole::Sink => "sink",
            TopicRole::Repartition => "repartition",
            TopicRole::Changelog => "changelog",
            TopicRole::DeadLetter => "deadLetter",
            TopicRole::Table => "table",
        }
    }
}

/// How many partitions a created topic gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Partitions {
    Fixed(i32),
    /// As many as another topic has (changelogs match their stage's input).
    SameAs(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanTopic {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    pub role: TopicRole,
    /// Whether the pipeline creates and owns the topic. Others must exist.
    pub create: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<Partitions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_factor: Option<i32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
}

impl Plan {
    /// A stable hash of the plan, used to roll pods when it changes.
    pub fn hash(&self) -> String {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(&bytes);
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    pub fn stage(&self, name: &str) -> Option<&PlanStage> {
        self.stages.iter().find(|stage| stage.name == name)
    }

    /// A short human-readable account of the stages and topics, as `check` prints it.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "pipeline {}/{} (plan v{}, hash {})\n",
            self.namespace,
            self.pipeline,
            self.version,
            self.hash()
        );
        out.push_str(&format!(
            "source: {} keyed by [{}]\n",
            self.source.topic,
            self.source.key.join(", ")
        ));
        if let Some(capture) = &self.capture {
            out.push_str(&format!(
                "capture: postgres {}:{}/{} tables [{}] via slot {} and publication {} -> {}\n",
                capture.postgres.host,
                capture.postgres.port,
                capture.postgres.database,
                capture.tables.join(", "),
                capture.slot,
                capture.publication,
                capture.topic
            ));
        }
        out.push_str("stages:\n");
        for stage in &self.stages {
            let steps: Vec<&str> = stage.steps.iter().map(|s| s.name.as_str()).collect();
            let output = match &stage.output {
                StageOutput::Repartition { topic, key } => {
                    format!("{topic} keyed by [{}]", key.join(", "))
                }
                StageOutput::Sinks => {
                    let sinks: Vec<&str> = self.sinks.iter().map(|s| s.name.as_str()).collect();
                    format!("sinks {}", sinks.join(", "))
                }
            };
            out.push_str(&format!(
                "  {} x{}: {} -> [{}] -> {}\n",
                stage.name,
                stage.parallelism,
                stage.input.topic,
                steps.join(", "),
                output
            ));
        }
        out.push_str("topics:\n");
        for topic in &self.topics {
            let partitions = match &topic.partitions {
                Some(Partitions::Fixed(n)) => format!(", {n} partitions"),
                Some(Partitions::SameAs(other)) => format!(", partitions as {other}"),
                None => String::new(),
            };
            let owner = if topic.create {
                "created"
            } else {
                "must exist"
            };
            out.push_str(&format!(
                "  {} ({}, {owner}{partitions})\n",
                topic.name,
                topic.role.as_str()
            ));
        }
        out
    }
}
