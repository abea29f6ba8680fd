//! The `Pipeline` custom resource.

// Several printer columns share `type_ = "string"`; clippy reads that as a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::ops::OperatorSpec;
use crate::schema::SchemaSpec;

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
    /// How changes to a running pipeline are rolled out.
    #[serde(default)]
    pub upgrade: UpgradeSpec,
    /// What happens to the topics this pipeline created when it is deleted.
    #[serde(default)]
    pub topic_deletion_policy: TopicDeletionPolicy,
    /// Runtime container image; the operator's configured image when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
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

/// The source of a pipeline: a Kafka topic of JSON events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceSpec {
    /// The Kafka cluster, by its name in the operator's configuration; the default cluster when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub cluster: Option<String>,
    /// The topic to read. It must exist.
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[A-Za-z0-9._\-]+$"))]
    pub topic: String,
    /// The encoding of event values. Only `json` is supported.
    #[serde(default)]
    pub format: Format,
    /// The fields the topic is keyed (partitioned) by. Steps keyed by the same fields
    /// need no repartition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub key: Vec<String>,
    /// Where a new consumer group starts reading.
    #[serde(default)]
    pub start_from: StartPosition,
    /// The schema of the events; the checker propagates it through the steps.
    pub schema: SchemaSpec,
}

/// Encoding of event values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per Kafka record (or per line in local mode).
    #[default]
    Json,
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

/// A destination. Exactly one of `kafka`, `elasticsearch`, `iceberg` or `parquet` is set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "[has(self.kafka), has(self.elasticsearch), has(self.iceberg), has(self.parquet)].filter(x, x).size() == 1",
     "message": "each sink sets exactly one of kafka, elasticsearch, iceberg or parquet"}
]))]
#[serde(rename_all = "camelCase")]
pub struct SinkSpec {
    /// The sink's name, unique in the pipeline.
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Write to a Kafka topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSinkSpec>,
    /// Index into Elasticsearch or OpenSearch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elasticsearch: Option<ElasticsearchSinkSpec>,
    /// Append to an Apache Iceberg table. Not written by this version of
    /// Keystone yet: a pipeline with such a sink does not pass its contract check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iceberg: Option<IcebergSinkSpec>,
    /// Write Hive-style partitioned Parquet files. Not written by this version
    /// of Keystone yet: a pipeline with such a sink does not pass its contract check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parquet: Option<ParquetSinkSpec>,
}

/// The kinds of sink, as [`SinkSpec::kind`] names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SinkKind {
    Kafka,
    Elasticsearch,
    Iceberg,
    Parquet,
}

impl SinkKind {
    pub const ALL: [SinkKind; 4] = [
        SinkKind::Kafka,
        SinkKind::Elasticsearch,
        SinkKind::Iceberg,
        SinkKind::Parquet,
    ];

    /// The field of `SinkSpec` that selects the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Kafka => "kafka",
            SinkKind::Elasticsearch => "elasticsearch",
            SinkKind::Iceberg => "iceberg",
            SinkKind::Parquet => "parquet",
        }
    }
}

impl std::fmt::Display for SinkKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl SinkSpec {
    /// The one kind this sink sets, or `None` when it sets none or several (the
    /// schema refuses both; the checker reports them for manifests read locally).
    pub fn kind(&self) -> Option<SinkKind> {
        let set: Vec<SinkKind> = [
            self.kafka.as_ref().map(|_| SinkKind::Kafka),
            self.elasticsearch.as_ref().map(|_| SinkKind::Elasticsearch),
            self.iceberg.as_ref().map(|_| SinkKind::Iceberg),
            self.parquet.as_ref().map(|_| SinkKind::Parquet),
        ]
        .into_iter()
        .flatten()
        .collect();
        match set.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// The environment variable through which a pod receives `key` of one of
    /// this sink's Secrets (`KEYSTONE_SINK_<NAME>_<KEY>`, the sink's name in
    /// upper case with `-` as `_`). The operator sets it from a Secret
    /// reference; the runtime reads it.
    pub fn secret_env(&self, key: SinkSecretKey) -> String {
        format!(
            "KEYSTONE_SINK_{}_{}",
            self.name.to_uppercase().replace('-', "_"),
            key.env_suffix()
        )
    }

    /// Secrets the sink reads credentials from (they reach the pods as Secret
    /// references, never through the plan).
    pub fn secret_names(&self) -> Vec<&str> {
        let mut names = Vec::new();
        if let Some(es) = &self.elasticsearch {
            names.extend(es.credentials_secret.as_deref());
            names.extend(es.ca_secret.as_deref());
        }
        if let Some(iceberg) = &self.iceberg {
            names.extend(iceberg.catalog.credentials_secret.as_deref());
        }
        if let Some(parquet) = &self.parquet {
            names.extend(parquet.credentials_secret.as_deref());
        }
        names
    }

    /// The Secret values the sink's writer reads, each through the variable
    /// [`SinkSpec::secret_env`] names. A search sink reads `username`,
    /// `password` and `apiKey` of `credentialsSecret`, each optional (basic
    /// authentication or an API key is there), and `ca.crt` of `caSecret`.
    // Iceberg and Parquet credentials get their keys with their writers.
    pub fn secret_refs(&self) -> Vec<SinkSecretRef<'_>> {
        let mut refs = Vec::new();
        if let Some(es) = &self.elasticsearch {
            if let Some(secret) = es.credentials_secret.as_deref() {
                for key in [
                    SinkSecretKey::Username,
                    SinkSecretKey::Password,
                    SinkSecretKey::ApiKey,
                ] {
                    refs.push(SinkSecretRef {
                        secret,
                        key,
                        optional: true,
                    });
                }
            }
            if let Some(secret) = es.ca_secret.as_deref() {
                refs.push(SinkSecretRef {
                    secret,
                    key: SinkSecretKey::CaCert,
                    optional: false,
                });
            }
        }
        refs
    }
}

/// One value a sink reads from a Secret in the pipeline's namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SinkSecretRef<'a> {
    /// The Secret's name.
    pub secret: &'a str,
    pub key: SinkSecretKey,
    /// Whether the Secret may lack the key (or be missing): the variable is then unset.
    pub optional: bool,
}

/// A value a sink reads from one of its Secrets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkSecretKey {
    /// `username` of `credentialsSecret`.
    Username,
    /// `password` of `credentialsSecret`.
    Password,
    /// `apiKey` of `credentialsSecret`.
    ApiKey,
    /// `ca.crt` of `caSecret`.
    CaCert,
}

impl SinkSecretKey {
    /// The key in the Secret.
    pub fn secret_key(self) -> &'static str {
        match self {
            SinkSecretKey::Username => "username",
            SinkSecretKey::Password => "password",
            SinkSecretKey::ApiKey => "apiKey",
            SinkSecretKey::CaCert => "ca.crt",
        }
    }

    fn env_suffix(self) -> &'static str {
        match self {
            SinkSecretKey::Username => "USERNAME",
            SinkSecretKey::Password => "PASSWORD",
            SinkSecretKey::ApiKey => "API_KEY",
            SinkSecretKey::CaCert => "CA_CERT",
        }
    }
}

/// A Kafka topic sink.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSinkSpec {
    /// The Kafka cluster, by its name in the operator's configuration; the default cluster when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub cluster: Option<String>,
    /// The topic to write.
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[A-Za-z0-9._\-]+$"))]
    pub topic: String,
    /// Fields that form the record key; the stream's current key when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub key: Vec<String>,
    /// Whether the pipeline creates the topic (and owns it). When false it must exist.
    #[serde(default = "default_true")]
    pub create: bool,
    /// Partitions of a created topic. Can be raised, never lowered.
    #[serde(default = "default_partitions")]
    #[schemars(range(min = 1, max = 10000))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self >= oldSelf", "message": "partitions can only be raised: Kafka cannot remove partitions without losing their data"}
    ]))]
    pub partitions: i32,
    /// Replication factor of a created topic; the broker default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16))]
    pub replication_factor: Option<i32>,
    /// Topic configs of a created topic (for example `retention.ms`). Drift is corrected.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// Require that each key's events are written in the order of the stream's
    /// per-key order. The checker refuses a pipeline that cannot guarantee it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preserve_order: bool,
}

fn default_partitions() -> i32 {
    1
}

/// An Elasticsearch or OpenSearch index sink, written through the bulk API.
/// Writes are idempotent: the document id comes from the event, so a replay
/// overwrites instead of duplicating, and with `versionField` an older change
/// never overwrites a newer one. Documents are flushed before the source offsets
/// are committed, so a crash replays into idempotent writes (exactly-once effect).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ElasticsearchSinkSpec {
    /// Base URL of the cluster, for example `https://search.example:9200`.
    #[schemars(length(min = 1, max = 2048), regex(pattern = "^https?://"))]
    pub endpoint: String,
    /// The index to write. Lowercase, as Elasticsearch and OpenSearch require.
    #[schemars(
        length(min = 1, max = 255),
        regex(pattern = r"^[a-z0-9][a-z0-9_.\-]*$")
    )]
    pub index: String,
    /// Fields whose values form the document id (joined with `:` when several).
    #[schemars(length(min = 1, max = 8))]
    pub id_fields: Vec<String>,
    /// An integer field used as the external document version
    /// (`version_type=external`), so an older change never overwrites a newer
    /// one: not on redelivery, not on a replay after a restore or a rollback.
    /// Without it, documents are overwritten by id and the stream must be in
    /// order per id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_field: Option<String>,
    /// A CEL expression over the event that marks a delete: the document with
    /// the event's id is deleted (with the event's version when `versionField` is
    /// set). When unset, an event whose `op` field is the string `d` (the
    /// Debezium convention) is a delete, if `op` reaches the sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub delete_when: Option<String>,
    /// Create the index when it does not exist, with a mapping derived from the
    /// pipeline's output schema (string as keyword, integer as long, number as
    /// double, timestamp as date, objects with their fields). An existing index
    /// is used as it is. Set to false where indices are managed elsewhere.
    #[serde(default = "default_true")]
    pub create_index: bool,
    /// Index settings for a created index, for example `number_of_replicas: "0"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub index_settings: BTreeMap<String, String>,
    /// A Secret in the pipeline's namespace with either `username` and
    /// `password` keys (basic authentication) or an `apiKey` key (sent as
    /// `Authorization: ApiKey <apiKey>`). It reaches the pods as environment
    /// variables from the Secret, never through the plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: Option<String>,
    /// A Secret in the pipeline's namespace whose `ca.crt` key holds the PEM
    /// CA bundle that signs the cluster's certificate (for `https` endpoints not
    /// signed by a public CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub ca_secret: Option<String>,
    /// Documents per bulk request.
    #[serde(default = "default_bulk_size")]
    #[schemars(range(min = 1, max = 100_000))]
    pub bulk_size: i32,
    /// Bytes per bulk request (the request is sent when either limit is reached).
    #[serde(default = "default_bulk_bytes")]
    #[schemars(range(min = 1024, max = 104_857_600))]
    pub bulk_bytes: i64,
    /// Bytes of bulk requests sent and not yet answered (retries included). When
    /// reached, the stage stops taking input until the cluster catches up.
    #[serde(default = "default_max_in_flight_bytes")]
    #[schemars(range(min = 1024, max = 1_073_741_824))]
    pub max_in_flight_bytes: i64,
}

fn default_bulk_bytes() -> i64 {
    5 * 1024 * 1024
}

fn default_max_in_flight_bytes() -> i64 {
    32 * 1024 * 1024
}

fn default_bulk_size() -> i32 {
    1000
}

/// An Apache Iceberg table sink. Each commit records the consumed offsets in the
/// snapshot properties, so a replay after a failure does not append twice.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IcebergSinkSpec {
    /// The catalog holding the table.
    pub catalog: IcebergCatalogSpec,
    /// The table's namespace, for example `analytics`.
    #[schemars(length(min = 1, max = 255))]
    pub namespace: String,
    /// The table's name.
    #[schemars(length(min = 1, max = 255))]
    pub table: String,
    /// Fields to partition the table by (identity partitions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partition_by: Vec<String>,
    /// How often data files are committed as a new snapshot.
    #[serde(default = "default_file_commit_interval")]
    pub commit_interval: Duration,
}

fn default_file_commit_interval() -> Duration {
    Duration::from_secs(60)
}

/// An Iceberg catalog.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IcebergCatalogSpec {
    /// `rest` for an Iceberg REST catalog, `sql` for a JDBC-style SQL catalog.
    #[serde(rename = "type")]
    pub catalog_type: IcebergCatalogType,
    /// The catalog's URI.
    #[schemars(length(min = 1, max = 2048))]
    pub uri: String,
    /// Where table data is written, for example `s3://bucket/warehouse`.
    #[schemars(length(min = 1, max = 2048))]
    pub warehouse: String,
    /// A Secret with the catalog's and object store's credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

/// The kind of Iceberg catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum IcebergCatalogType {
    Rest,
    Sql,
}

/// Hive-style partitioned Parquet files (`path/field=value/part-*.parquet`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParquetSinkSpec {
    /// Base location, for example `s3://bucket/events` or `file:///data/events`.
    #[schemars(length(min = 1, max = 2048))]
    pub path: String,
    /// Fields that become directory partitions, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partition_by: Vec<String>,
    /// How often open files are closed and made visible.
    #[serde(default = "default_file_commit_interval")]
    pub roll_interval: Duration,
    /// A Secret with the object store's credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
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
    /// Delete the sink and internal topics this pipeline created.
    Delete,
}

/// The observed state of a pipeline.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PipelineStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// A one-word summary: Pending, Invalid, Provisioning, Running, Degraded, Upgrading, Suspended or Deleting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<PipelinePhase>,
    /// Conditions keyed by type: Ready, ContractsValid, TopicsReady, RuntimeReady, ...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Ready stages out of all stages, for example `2/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_stages: Option<String>,
    /// The topics the pipeline uses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<TopicStatus>,
    /// The runtime stages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageStatus>,
    /// The last successful checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<CheckpointSummary>,
    /// The last failed checkpoint, with its reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failed_checkpoint: Option<CheckpointSummary>,
    /// The retained checkpoints, oldest first; each is a ConfigMap `<pipeline>-checkpoint-<id>`
    /// with the per-stage, per-partition offsets and state positions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checkpoints: Vec<CheckpointSummary>,
    /// The `spec.checkpointTrigger` value last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint_trigger: Option<String>,
    /// Hash of the compiled plan that is deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_hash: Option<String>,
    /// The spec last deployed (JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reconciled_spec: Option<String>,
    /// The spec that last passed its health window (JSON): what a rollback returns to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_stable_spec: Option<String>,
    /// Hash of the plan of the last stable spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_plan_hash: Option<String>,
    /// The current or last upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<UpgradeStatus>,
    /// The last restore from a checkpoint (requested, a rollback, a state reset or a stateless upgrade).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restore: Option<RestoreStatus>,
    /// The `spec.restore` request last acted on: a request is carried out once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restore_request: Option<RestoreSpec>,
}

/// Where an upgrade is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UpgradePhase {
    /// Taking the checkpoint the new version starts from (and can roll back to).
    Checkpointing,
    /// The new version is rolling out.
    Deploying,
    /// The new version runs; the health window is open.
    Observing,
    /// It passed the health window and is the stable version.
    Stable,
    /// The change was not rolled out (state-incompatible without `allowStateReset`, or the checkpoint failed).
    Blocked,
    /// It failed its health check; the last stable version is being restored.
    RollingBack,
    /// It failed its health check and the last stable version runs again.
    RolledBack,
    /// It failed its health check and `rollbackOnFailure` is off.
    Failed,
}

/// An upgrade from one plan to another.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeStatus {
    /// Where it is.
    pub phase: UpgradePhase,
    /// The spec generation being rolled out.
    pub generation: i64,
    /// How the change was classified: Ignore, Scale, Upgrade or StateIncompatible.
    pub change: String,
    /// What changed, in words.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// Plan hash before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_plan_hash: Option<String>,
    /// Plan hash after.
    pub to_plan_hash: String,
    /// The checkpoint taken before the upgrade (the rollback point).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// Whether keyed state was dropped (`allowStateReset`, or a `Stateless` upgrade).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub state_reset: bool,
    /// When the upgrade started.
    pub started: Time,
    /// When the new version was first seen fully ready (the health window starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_since: Option<Time>,
    /// Why it is blocked, failed or rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A redeploy from a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStatus {
    /// The restore's id (the ConfigMap `<pipeline>-restore-<id>` the instances read).
    pub id: String,
    /// The checkpoint restored, if any (a state reset restores none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// The `spec.restore.nonce` it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// Why: Requested, Rollback, StateReset or Stateless.
    pub reason: String,
    /// When it was started.
    pub time: Time,
    /// The plan the restored instances run; their pods carry the restore until the next plan change.
    pub plan_hash: String,
}

/// A one-word summary of a pipeline's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PipelinePhase {
    Pending,
    Invalid,
    Provisioning,
    Running,
    Degraded,
    Upgrading,
    Suspended,
    Deleting,
}

/// A topic the pipeline reads or writes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicStatus {
    /// Topic name.
    pub name: String,
    /// What the pipeline uses it for: source, sink, repartition, changelog, deadLetter or table.
    pub role: String,
    /// Current partition count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<i32>,
    /// Whether this pipeline created (and owns) the topic.
    #[serde(default)]
    pub created: bool,
}

/// A runtime stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageStatus {
    /// Stage name (also the Deployment's name suffix).
    pub name: String,
    /// The steps fused into this stage.
    #[serde(default)]
    pub steps: Vec<String>,
    /// Desired instances.
    pub replicas: i32,
    /// Ready instances.
    #[serde(default)]
    pub ready_replicas: i32,
}

/// A checkpoint, as summarized in status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSummary {
    /// Checkpoint id.
    pub id: String,
    /// When it completed (or failed).
    pub time: Time,
    /// Why it failed, for a failed checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What asked for it: Periodic, Manual, Upgrade or Suspend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// Hash of the plan that was running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_hash: Option<String>,
}
