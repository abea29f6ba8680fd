//! HTTP ingest: events from applications and devices that have no Kafka
//! client, checked against the pipeline's source contract at the door.
//!
//! - [`body`]: a request's bytes to checked events, or a refusal naming what
//!   is wrong (content type and encoding, limits, framing, the contract).
//! - [`tokens`]: the named bearer tokens an endpoint admits.
//! - [`endpoint`]: one request to its answer; a 2xx only once every
//!   accepted record is delivered.
//! - [`server`]: the HTTP server around it, with its timeouts, probes and
//!   metrics; [`tls`]: its TLS and mutual TLS.
//! - [`kafka`]: delivery to the source topic; [`cli`]: `keystone-runtime
//!   ingest`, what an ingest pod runs.

pub mod body;
#[cfg(feature = "kafka")]
pub mod cli;
pub mod endpoint;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod metrics;
pub mod server;
pub mod tls;
pub mod tokens;
