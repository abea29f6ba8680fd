//! The sinks of a pipeline: where its events are written, and the Secrets the
//! sinks read their credentials from.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::default_true;
use crate::duration::Duration;

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
    /// Append to an Apache Iceberg table through a REST catalog, exactly once:
    /// data files are staged before the input offsets are committed and
    /// appended as one snapshot per `commitInterval` after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iceberg: Option<IcebergSinkSpec>,
    /// Write Hive-style partitioned Parquet files, exactly once: files are
    /// staged before the input offsets are committed and published after.
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
    /// authentication or an API key is there), and `ca.crt` of `caSecret`. A
    /// Parquet sink reads the object store's `endpoint`, `region`,
    /// `accessKeyId` and `secretAccessKey` of `credentialsSecret`, each optional.
    /// An Iceberg sink reads the REST catalog's bearer `token` and the same
    /// four object-store keys of `catalog.credentialsSecret`, each optional.
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
        if let Some(secret) = self
            .parquet
            .as_ref()
            .and_then(|p| p.credentials_secret.as_deref())
        {
            for key in SinkSecretKey::OBJECT_STORE {
                refs.push(SinkSecretRef {
                    secret,
                    key,
                    optional: true,
                });
            }
        }
        if let Some(secret) = self
            .iceberg
            .as_ref()
            .and_then(|i| i.catalog.credentials_secret.as_deref())
        {
            for key in std::iter::once(SinkSecretKey::Token).chain(SinkSecretKey::OBJECT_STORE) {
                refs.push(SinkSecretRef {
                    secret,
                    key,
                    optional: true,
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
    /// `endpoint` of an object store's `credentialsSecret` (an S3-compatible
    /// store's URL; AWS S3 when unset).
    Endpoint,
    /// `region` of an object store's `credentialsSecret`.
    Region,
    /// `accessKeyId` of an object store's `credentialsSecret`.
    AccessKeyId,
    /// `secretAccessKey` of an object store's `credentialsSecret`.
    SecretAccessKey,
    /// `token` of an Iceberg catalog's `credentialsSecret`: a bearer token
    /// for the REST catalog.
    Token,
}

impl SinkSecretKey {
    /// The keys of an object store's credentials Secret.
    pub const OBJECT_STORE: [SinkSecretKey; 4] = [
        SinkSecretKey::Endpoint,
        SinkSecretKey::Region,
        SinkSecretKey::AccessKeyId,
        SinkSecretKey::SecretAccessKey,
    ];

    /// The key in the Secret.
    pub fn secret_key(self) -> &'static str {
        match self {
            SinkSecretKey::Username => "username",
            SinkSecretKey::Password => "password",
            SinkSecretKey::ApiKey => "apiKey",
            SinkSecretKey::CaCert => "ca.crt",
            SinkSecretKey::Endpoint => "endpoint",
            SinkSecretKey::Region => "region",
            SinkSecretKey::AccessKeyId => "accessKeyId",
            SinkSecretKey::SecretAccessKey => "secretAccessKey",
            SinkSecretKey::Token => "token",
        }
    }

    fn env_suffix(self) -> &'static str {
        match self {
            SinkSecretKey::Username => "USERNAME",
            SinkSecretKey::Password => "PASSWORD",
            SinkSecretKey::ApiKey => "API_KEY",
            SinkSecretKey::CaCert => "CA_CERT",
            SinkSecretKey::Endpoint => "ENDPOINT",
            SinkSecretKey::Region => "REGION",
            SinkSecretKey::AccessKeyId => "ACCESS_KEY_ID",
            SinkSecretKey::SecretAccessKey => "SECRET_ACCESS_KEY",
            SinkSecretKey::Token => "TOKEN",
        }
    }
}

/// A Kafka topic sink.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.avro) || (has(self.format) && self.format == 'avro')",
     "message": "avro is written only with format: avro"},
]))]
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
    #[schemars(length(max = 8), inner(length(min = 1, max = 256)))]
    pub key: Vec<String>,
    /// Whether the pipeline creates the topic (and owns it). When false it must exist.
    #[serde(default = "default_true")]
    pub create: bool,
    /// Partitions of a created topic. Raising it raises the topic's. Kafka cannot
    /// remove partitions: a value below the topic's count (for example git's
    /// value after someone raised it by hand) is accepted, the topic keeps its
    /// partitions, and the pipeline reports `TopicsReady=False`
    /// (`PartitionDecreaseRefused`) until the spec is raised to match.
    #[serde(default = "default_partitions")]
    #[schemars(range(min = 1, max = 10000))]
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
    /// The encoding of record values: `json` (the default), or `avro` in the
    /// schema registry's wire format (the pipeline's `schemaRegistry`).
    #[serde(default, skip_serializing_if = "is_json")]
    pub format: super::Format,
    /// The schema Avro values are written with (`format: avro`); the output
    /// contract's, registered under `<topic>-value`, when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avro: Option<super::avro::AvroSinkSpec>,
    /// The encoding of record keys: `json` (the default: one key field's
    /// value as text, several as a JSON array), or `avro` in the schema
    /// registry's wire format. An Avro key's schema is derived from the key
    /// fields' types in the output contract (one field: its type; several: a
    /// record of them named after the value's record with `_key`) and
    /// registered under `<topic>-key`; `avro.autoRegister` applies to it too.
    /// An event whose key does not fit goes to the dead-letter topic.
    #[serde(default, skip_serializing_if = "is_json")]
    pub key_format: super::Format,
}

fn is_json(format: &super::Format) -> bool {
    *format == super::Format::Json
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
    #[schemars(length(min = 1, max = 8), inner(length(min = 1, max = 256)))]
    pub id_fields: Vec<String>,
    /// An integer field used as the external document version
    /// (`version_type=external`), so an older change never overwrites a newer
    /// one: not on redelivery, not on a replay after a restore or a rollback.
    /// Without it, documents are overwritten by id and the stream must be in
    /// order per id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub version_field: Option<String>,
    /// A CEL expression over the event that marks a delete: the document with
    /// the event's id is deleted (with the event's version when `versionField` is
    /// set). When unset, an event whose `op` field is the string `d` (the
    /// Debezium convention) is a delete, if `op` reaches the sink. The index
    /// remembers a deleted document's version for `index.gc_deletes` (60 s by
    /// default): raise it through `indexSettings` when a replay (a restore or a
    /// rollback) may reach further back, or the replay could bring a deleted
    /// document back.
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

/// An Apache Iceberg table sink. The table is created from the output contract
/// when missing. Each snapshot's summary names the staged epochs it appends
/// (`keystone.instance`, `keystone.epochs`), so an append repeated after a
/// failure is recognised and not made twice.
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
    /// The table's partition spec, one term each: a field (identity),
    /// `year(field)`, `month(field)`, `day(field)`, `hour(field)` (of a
    /// timestamp field) or `bucket(N, field)` (of a string or integer field).
    /// Used when the sink creates the table; an existing table keeps its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1, max = 256)))]
    pub partition_by: Vec<String>,
    /// How often staged data files are committed as a new snapshot: rows
    /// become visible at most this long after the pipeline commits them.
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
    /// A Secret with the catalog's and object store's credentials, each key
    /// optional: `token` (a bearer token for the REST catalog) and, for an
    /// `s3://` warehouse, `endpoint` (an S3-compatible store's URL; AWS S3
    /// when unset), `region` (`us-east-1` when unset with an `endpoint`),
    /// `accessKeyId` and `secretAccessKey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: Option<String>,
}

/// The kind of Iceberg catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum IcebergCatalogType {
    Rest,
    Sql,
}

/// Hive-style partitioned Parquet files (`path/field=value/part-*.parquet`),
/// with the columns of the output contract (partition columns live in the
/// folder names, as Hive has them) and zstd compression. Files are staged under
/// `path/_staging/` and moved into place once the offsets that cover them are
/// committed, so readers never see a partial or uncommitted file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParquetSinkSpec {
    /// Base location, for example `s3://bucket/events` or `file:///data/events`.
    /// An `s3://` path is written through the S3 API: the endpoint and region
    /// come from `credentialsSecret` (keys `endpoint`, `region`,
    /// `accessKeyId`, `secretAccessKey`).
    #[schemars(length(min = 1, max = 2048))]
    pub path: String,
    /// Partition folders, in order: a top-level field (`field=value/`),
    /// `day(field)` (`date=YYYY-MM-DD/`) or `hour(field)` (`hour=HH/`) of a
    /// timestamp field. When event time passes the end of a `day` or `hour`
    /// folder, a `_SUCCESS` file is written in it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1, max = 256)))]
    pub partition_by: Vec<String>,
    /// How often open files are closed and made visible, at the latest (a
    /// file also closes when it reaches 128 MiB, and at every commit of the
    /// pipeline: set `spec.commitInterval` near this to avoid small files).
    #[serde(default = "default_file_commit_interval")]
    pub roll_interval: Duration,
    /// A Secret with the object store's credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: Option<String>,
}
