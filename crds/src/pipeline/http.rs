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
    /// The names of the tokens in `tokensSecret` that may send to this
    /// pipeline, when one Secret holds the tokens of several pipelines: a
    /// token of the Secret not listed here is refused with 403. Every token
    /// of the Secret may send when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))
    )]
    pub granted_tokens: Vec<String>,
    /// Serve the endpoint over TLS (port 8443), optionally requiring client
    /// certificates (mutual TLS). The pods' health and metrics stay on the
    /// plain port 8080, which then serves no events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<HttpTls>,
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

/// The endpoint's TLS. Certificates are read again every minute, so that a
/// renewed Secret (cert-manager's, for instance) takes effect without a restart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpTls {
    /// A Secret of type `kubernetes.io/tls` in the pipeline's namespace: the
    /// server's certificate chain (`tls.crt`) and private key (`tls.key`), PEM.
    #[schemars(length(min = 1, max = 253))]
    pub secret: String,
    /// Mutual TLS: a Secret in the pipeline's namespace whose `ca.crt` holds
    /// the PEM certificates of the authorities that sign client certificates.
    /// A client without a certificate signed by one of them is refused during
    /// the handshake. Bearer tokens are still required. No client
    /// certificate is asked for when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub client_ca_secret: Option<String>,
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
