//! `spec.source.http`: events sent by applications and devices over HTTP,
//! checked against the source contract at the door and written into the
//! pipeline's source topic.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Receive events over HTTP into the source `topic`, which the operator then
/// creates and owns. An ingest Deployment and Service serve `POST <path>`:
/// one JSON object, a JSON array of objects, or NDJSON (`application/x-ndjson`),
/// optionally gzip or zstd encoded. Each record is checked against the
/// source schema and key before anything is written: a bad record is refused
/// (422) with its index, field and reason. A 2xx is sent only after the
/// broker acknowledged every accepted record (acks=all); a broker that is
/// down or slow gives 503 with `Retry-After`, never a lost event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpSourceSpec {
    /// The URL path events are sent to.
    #[serde(default = "default_path")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^/[A-Za-z0-9._~/-]*$"))]
    pub path: String,
    /// A Secret in the pipeline's namespace holding the bearer tokens that may
    /// send events: each key is a token's name, its value the token. Several
    /// at once let a token be rotated without a gap; a change takes effect
    /// within a minute, without a restart. Each record carries the name of the
    /// token that sent it (Kafka header `keystone-ingest-token`).
    #[schemars(length(min = 1, max = 253))]
    pub tokens_secret: String,
    /// The most bytes of one request's body, after decompression (413 past it).
    #[serde(default = "default_max_body_bytes")]
    #[schemars(range(min = 1024, max = 268_435_456))]
    pub max_body_bytes: i64,
    /// The most records in one request (413 past it).
    #[serde(default = "default_max_records")]
    #[schemars(range(min = 1, max = 100_000))]
    pub max_records: i32,
    /// A limit per token on the records it may send (429 with `Retry-After`
    /// past it). No limit when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<HttpRateLimit>,
    /// A request with some bad records: `RejectAll` refuses it whole (422,
    /// nothing written); `AcceptValid` writes the valid ones and answers 200
    /// with the refused ones listed.
    #[serde(default)]
    pub partial: HttpPartial,
    /// Retried requests made harmless: each request must carry an
    /// `Idempotency-Key` header (unique per request, the same on each retry),
    /// and `<key>/<index>` is written into this top-level field of each of
    /// its records. A `dedup` step keyed on the field drops what a retry sent
    /// again. Requests are not required to carry a key when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub idempotency_field: Option<String>,
    /// Partitions of the topic the events land in (keyed by `source.key`).
    #[serde(default = "default_partitions")]
    #[schemars(range(min = 1, max = 1000))]
    pub partitions: i32,
    /// Ingest pods behind the Service.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: i32,
}

/// A per-token rate limit, in records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpRateLimit {
    /// Records per second, per token, per ingest pod.
    #[schemars(range(min = 1, max = 10_000_000))]
    pub records_per_second: i32,
    /// Records a token may send at once above the rate; also the most records
    /// one request may carry. `recordsPerSecond` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub burst: Option<i32>,
}

/// What a request with some bad records gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum HttpPartial {
    /// Refused whole (422): nothing of it is written.
    #[default]
    RejectAll,
    /// The valid records are written; the answer lists the others.
    AcceptValid,
}

fn default_path() -> String {
    "/".to_owned()
}

fn default_max_body_bytes() -> i64 {
    10 << 20
}

fn default_max_records() -> i32 {
    10_000
}

fn default_partitions() -> i32 {
    3
}

fn default_replicas() -> i32 {
    2
}
