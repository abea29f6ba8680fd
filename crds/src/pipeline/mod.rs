//! The `Pipeline` custom resource.

// Several printer columns share `type_ = "string"`; clippy reads that as a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::ops::OperatorSpec;
use crate::schema::SchemaSpec;

pub mod avro;
pub mod capture;
pub mod http;
pub mod partitioning;
mod sinks;
mod status;

pub use sinks::{
    ElasticsearchSinkSpec, IcebergCatalogSpec, IcebergCatalogType, IcebergSinkSpec, KafkaSinkSpec,
    ParquetSinkSpec, SinkKind, SinkSecretKey, SinkSecretRef, SinkSpec,
};
pub use status::{
    CaptureStatus, CheckpointInProgress, CheckpointSummary, IngestStatus, PipelinePhase,
    PipelineStatus, RestoreStatus, StageStatus, TopicStatus, UpgradePhase, UpgradeStatus,
};

/// A real-time data pipeline: events from a Kafka topic flow through an ordered
/// list of steps into one or more sinks. The operator checks the steps' contracts,
/// creates the topics the pipeline needs and runs it.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "keystone.dev",
    version = "v1alpha1",
    kind = "Pipeline",
    namespaced,
    status = "PipelineStatus",
    shortname = "ksp",
    category = "keystone",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.readyStages",
        description = "ready stages / stages"
    ),
    printcolumn(name = "Source", type_ = "string", json_path = ".spec.source.topic"),
    printcolumn(
        name = "Checkpoint",
        type_ = "date",
        json_path = ".status.lastCheckpoint.time",
        description = "age of the last successful checkpoint"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.steps) || self.steps.all(s, self.steps.exists_one(t, t.name == s.name))",
     "message": "step names must be unique within a pipeline"},
    {"rule": "self.sinks.all(s, !has(s.kafka) || s.kafka.topic != self.source.topic || (has(s.kafka.cluster) ? s.kafka.cluster : '') != (has(self.source.cluster) ? self.source.cluster : ''))",
     "message": "the source topic cannot also be a Kafka sink topic: that would feed the pipeline its own output"},
]))]
#[serde(rename_all = "camelCase")]
pub struct PipelineSpec {
    /// Where events come from.
    pub source: SourceSpec,
    /// The processing steps, applied in order. Each is a `processorRef` or one inline operator.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub steps: Vec<StepSpec>,
    /// Where processed events go. Every sink receives every event that leaves the last step.
    #[schemars(length(min = 1, max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub sinks: Vec<SinkSpec>,
    /// Instances per stage (one Kafka consumer each). At most the number of partitions is useful.
    #[serde(default = "default_parallelism")]
    #[schemars(range(min = 1, max = 1024))]
    pub parallelism: i32,
    /// Delivery guarantee: `ExactlyOnce` (Kafka transactions; the default) or
    /// `AtLeastOnce` (no transactions: after a crash the events since the last
    /// commit are processed again, with keyed state as of that commit, so some
    /// outputs may repeat and none is lost).
    #[serde(default)]
    pub delivery: Delivery,
    /// How often outputs and consumed offsets are committed together (one Kafka
    /// transaction per interval under exactly-once). Lower means lower latency.
    /// Under exactly-once a stage that has read all its input commits sooner,
    /// 100 ms after its last commit, unless it writes a Parquet or Iceberg sink
    /// (whose every commit publishes files). At most `5m` when commits are
    /// Kafka transactions (`ExactlyOnce`, or a `postgres` source): the
    /// transaction timeout is three intervals (at least 10 s), and brokers allow
    /// 15 minutes by default.
    #[serde(default = "default_commit_interval")]
    pub commit_interval: Duration,
    /// How often the operator takes a checkpoint of the whole pipeline.
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: Duration,
    /// Set or change this to any new value to take a checkpoint now, for example
    /// `kubectl patch ksp NAME --type merge -p '{"spec":{"checkpointTrigger":"'$(date +%s)'"}}'`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub checkpoint_trigger: Option<String>,
    /// How many successful checkpoints are kept (one ConfigMap each). The checkpoint
    /// an upgrade may roll back to is kept as well, beyond this count.
    #[serde(default = "default_checkpoint_retention")]
    #[schemars(range(min = 1, max = 100))]
    pub checkpoint_retention: i32,
    /// `Running` (the default) or `Suspended`: a suspended pipeline takes a
    /// checkpoint, stops its instances there and resumes from it when set back to `Running`.
    #[serde(default)]
    pub state: PipelineState,
    /// Redeploy from a retained checkpoint: input is re-read from the checkpoint's
    /// offsets and state is restored to its positions. Done once per distinct
    /// `checkpoint` and `nonce`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreSpec>,
    /// Where events that cannot be processed go, with the reason.
    #[serde(default)]
    pub dead_letter: DeadLetterSpec,
    /// Whether the operator may create repartition topics when a stateful step is keyed
    /// differently from how the stream is partitioned. When false, such a pipeline is invalid.
    #[serde(default = "default_true")]
    pub allow_repartition: bool,
    /// Whether this pipeline may be part of a cycle of pipelines that feed each
    /// other through Kafka topics (one's sink topic is the next one's source, on
    /// the same cluster), so that events go round again. Such a cycle is refused
    /// unless every pipeline in it sets this to true: the refused pipelines are
    /// not deployed and their `ContractsValid` condition names the others. Set it
    /// only when the feedback is intended and something ends it (a filter that
    /// lets each event round the loop a bounded number of times, say).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_topic_cycles: bool,
    /// The schema registry of the Avro source and sinks (`format: avro`); the
    /// Kafka cluster's registry in the operator's configuration when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_registry: Option<avro::SchemaRegistrySpec>,
    /// How changes to a running pipeline are rolled out.
    #[serde(default)]
    pub upgrade: UpgradeSpec,
    /// What happens to the topics this pipeline created when it is deleted.
    #[serde(default)]
    pub topic_deletion_policy: TopicDeletionPolicy,
    /// Runtime container image; the operator's configured image when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub runtime_image: Option<String>,
    /// CPU and memory for each runtime instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
}

fn default_parallelism() -> i32 {
    1
}
fn default_commit_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_checkpoint_interval() -> Duration {
    Duration::from_secs(300)
}
fn default_checkpoint_retention() -> i32 {
    5
}

/// Whether a pipeline's instances run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PipelineState {
    #[default]
    Running,
    Suspended,
}

/// A request to redeploy from a named checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSpec {
    /// The checkpoint id, as listed in `status.checkpoints`.
    #[schemars(length(min = 1, max = 63))]
    pub checkpoint: String,
    /// Change this to restore the same checkpoint again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub nonce: Option<String>,
}
fn default_true() -> bool {
    true
}

/// The source of a pipeline: a Kafka topic of JSON events, a PostgreSQL
/// table whose changes are captured into one, or an HTTP endpoint that
/// writes into one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!(has(self.postgres) && has(self.http))",
     "message": "set at most one of postgres and http: each writes the source topic"},
    {"rule": "!has(self.avro) || (has(self.format) && self.format == 'avro')",
     "message": "avro is read only with format: avro"},
]))]
#[serde(rename_all = "camelCase")]
pub struct SourceSpec {
    /// The Kafka cluster, by its name in the operator's configuration; the default cluster when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub cluster: Option<String>,
    /// The topic to read. It must exist, unless `postgres` or `http` is set:
    /// then the operator creates it (and owns it), and the capture or the
    /// ingest endpoint writes into it.
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[A-Za-z0-9._\-]+$"))]
    pub topic: String,
    /// Capture a PostgreSQL table's changes into `topic` (change data capture
    /// with an initial snapshot); see the fields for what the database needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<capture::PostgresSourceSpec>,
    /// Receive events over HTTP into `topic`: an ingest endpoint that checks
    /// every record against `schema` and `key` before it is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<http::HttpSourceSpec>,
    /// The encoding of record values: `json` (the default), or `avro` in the
    /// schema registry's wire format (`schemaRegistry` names the registry).
    /// With `avro` the source schema is the registered schema's, so `schema`
    /// need not be declared; fields declared there are checked against it.
    #[serde(default)]
    pub format: Format,
    /// Which registered schema Avro values are read with (`format: avro`);
    /// the latest version of `<topic>-value` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avro: Option<avro::AvroSourceSpec>,
    /// The fields the topic is keyed (partitioned) by. Steps keyed by the same fields
    /// need no repartition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(length(min = 1, max = 256)))]
    pub key: Vec<String>,
    /// Where a new consumer group starts reading.
    #[serde(default)]
    pub start_from: StartPosition,
    /// The schema of the events; the checker propagates it through the steps.
    /// With `postgres`, the capture's envelope fields and, once the capture
    /// has described the table, its columns (the key's at the top level,
    /// all under `after` and `before`) are added to the fields declared
    /// here; a declared field is checked against the table's column.
    #[serde(default = "open_schema")]
    pub schema: SchemaSpec,
}

fn open_schema() -> SchemaSpec {
    SchemaSpec {
        fields: Vec::new(),
        open: true,
    }
}

/// Encoding of Kafka record values (or keys).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// JSON text: one object per record value (or per line in local mode).
    #[default]
    Json,
    /// Avro binary framed with the schema's registry id (magic byte 0, the
    /// id in 4 bytes big-endian), as Confluent's and Apicurio's serializers write.
    Avro,
}

/// Where a consumer group without committed offsets starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum StartPosition {
    /// The oldest retained event.
    #[default]
    Earliest,
    /// Only events produced after the pipeline starts.
    Latest,
}

/// Delivery guarantee.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Delivery {
    /// Every event affects the sinks exactly once (Kafka transactions, idempotent external sinks).
    #[default]
    ExactlyOnce,
    /// Every event reaches the sinks at least once; duplicates are possible after failures.
    AtLeastOnce,
}

/// One processing step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "[has(self.processorRef), has(self.filter), has(self.map), has(self.project), has(self.extract), has(self.dedup), has(self.order), has(self.join), has(self.enrich), has(self.rekey)].filter(x, x).size() == 1",
     "message": "each step sets exactly one of processorRef, filter, map, project, extract, dedup, order, join, enrich or rekey"}
]))]
#[serde(rename_all = "camelCase")]
pub struct StepSpec {
    /// The step's name, unique in the pipeline. It names the step in metrics,
    /// dead letters, errors and internal topics.
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// A Processor in the same namespace to run as this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processor_ref: Option<ProcessorRef>,
    /// An inline built-in operator (instead of `processorRef`).
    #[serde(flatten)]
    pub operator: OperatorSpec,
    /// Instances for this step; it then runs in a stage of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub parallelism: Option<i32>,
}

/// A reference to a Processor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProcessorRef {
    /// The Processor's name, in the pipeline's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The dead-letter topic.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterSpec {
    /// Topic name; `keystone.<namespace>.<pipeline>.dlq` when unset. Created by the pipeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[A-Za-z0-9._\-]+$"))]
    pub topic: Option<String>,
    /// How long dead letters are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Duration>,
}

/// How spec changes reach running instances.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeSpec {
    /// Where the new version starts: `Checkpoint` (a fresh checkpoint; the default),
    /// `LastState` (the last committed state) or `Stateless` (state dropped).
    #[serde(default)]
    pub mode: UpgradeMode,
    /// `Rolling` replaces instances one by one; `Recreate` stops all first.
    #[serde(default)]
    pub strategy: UpgradeStrategy,
    /// Allow a change that existing state cannot serve (a new dedup key, say) to
    /// drop that state. Without it such a change stops with a condition.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_state_reset: bool,
    /// Roll back to the last stable spec when the new version fails its health check.
    #[serde(default = "default_true")]
    pub rollback_on_failure: bool,
    /// How long the new version must stay healthy before it counts as stable.
    #[serde(default = "default_health_window")]
    pub health_window: Duration,
    /// What the new version must stay within during the health window.
    #[serde(default)]
    pub health_gate: HealthGate,
    /// Where a `Stateless` upgrade starts reading: `Committed` (the consumer
    /// group's offsets; the default), `Earliest` or `Latest`.
    #[serde(default)]
    pub start_from: UpgradeStartPosition,
}

/// Bounds a new version must stay within during its health window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthGate {
    /// Container restarts of the new version's instances tolerated (summed over all pods).
    #[serde(default = "default_max_restarts")]
    #[schemars(range(min = 0, max = 1000))]
    pub max_restarts: i32,
    /// Largest share of input records, in percent, that may go to the dead-letter topic.
    #[serde(default = "default_max_dead_letter_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub max_dead_letter_percent: i32,
    /// Largest consumer lag (records behind, summed over partitions) at the end of the window; unbounded when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_consumer_lag: Option<i64>,
}

fn default_max_restarts() -> i32 {
    1
}
fn default_max_dead_letter_percent() -> i32 {
    10
}

impl Default for HealthGate {
    fn default() -> Self {
        Self {
            max_restarts: default_max_restarts(),
            max_dead_letter_percent: default_max_dead_letter_percent(),
            max_consumer_lag: None,
        }
    }
}

/// Where a stateless upgrade starts reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UpgradeStartPosition {
    #[default]
    Committed,
    Earliest,
    Latest,
}

fn default_health_window() -> Duration {
    Duration::from_secs(120)
}

impl Default for UpgradeSpec {
    fn default() -> Self {
        Self {
            mode: UpgradeMode::default(),
            strategy: UpgradeStrategy::default(),
            allow_state_reset: false,
            rollback_on_failure: true,
            health_window: default_health_window(),
            health_gate: HealthGate::default(),
            start_from: UpgradeStartPosition::default(),
        }
    }
}

/// Where an upgraded pipeline resumes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UpgradeMode {
    #[default]
    Checkpoint,
    LastState,
    Stateless,
}

/// How instances are replaced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UpgradeStrategy {
    #[default]
    Rolling,
    Recreate,
}

/// What happens to created topics when the pipeline is deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TopicDeletionPolicy {
    /// Keep them.
    #[default]
    Retain,
    /// Delete the sink and internal topics this pipeline created and, for a
    /// `postgres` source, the capture topic and the replication slot (the
    /// publication stays).
    Delete,
}
