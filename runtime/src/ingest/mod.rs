//! HTTP ingest: events from applications and devices that have no Kafka
//! client, checked against the pipeline's source contract at the door.
//!
//! [`body`] turns a request's bytes into checked events or a refusal that
//! names what is wrong; the endpoint that authenticates, limits and produces
//! them builds on it.

pub mod body;
