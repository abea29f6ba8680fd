//! Prometheus metrics of an ingest endpoint, on the runtime's conventions
//! (`keystone_<noun>_<verb>_total`). Labels are bounded: status codes, a
//! fixed set of refusal reasons, and the endpoint's token names ("" when the
//! sender proved no token).

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Registry, TextEncoder,
};

use crate::host::metrics::{counter, counter_vec, gauge};

/// A request in flight; counted down when dropped.
pub struct InFlight(IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pub struct IngestMetrics {
    registry: Registry,
    in_flight: IntGauge,
    requests: IntCounterVec,
    records: IntCounterVec,
    bytes: IntCounter,
    latency: Histogram,
    refusals: IntCounterVec,
}

impl Default for IngestMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl IngestMetrics {
    /// Unlabelled metrics: an endpoint of no pipeline (tests, local mode).
    pub fn new() -> Self {
        Self::with_registry(Registry::new())
    }

    /// The metrics of `pipeline`'s endpoint, each with its `pipeline` label,
    /// as the stages' metrics have.
    pub fn for_pipeline(pipeline: &str) -> Self {
        let labels =
            std::collections::HashMap::from([("pipeline".to_owned(), pipeline.to_owned())]);
        Self::with_registry(Registry::new_custom(None, Some(labels)).expect("valid registry"))
    }

    fn with_registry(registry: Registry) -> Self {
        let requests = counter_vec(
            &registry,
            "keystone_ingest_requests_total",
            "Ingest requests answered, by HTTP status code",
            &["code"],
        );
        let records = counter_vec(
            &registry,
            "keystone_ingest_records_total",
            "Records received, by outcome (accepted: delivered; refused: not meeting the contract)",
            &["outcome", "token"],
        );
        let refusals = counter_vec(
            &registry,
            "keystone_ingest_refusals_total",
            "Requests refused, by reason and token",
            &["reason", "token"],
        );
        let bytes = counter(
            &registry,
            "keystone_ingest_received_bytes_total",
            "Request body bytes received, as sent (before decompression)",
        );
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "keystone_ingest_request_duration_seconds",
                "Time from a request's headers to its answer, reading its body and delivering its records included",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(latency.clone()))
            .expect("unique metric");
        let in_flight = gauge(
            &registry,
            "keystone_ingest_requests_in_flight",
            "Requests being read, checked or delivered now (at most the server's bound)",
        );
        IngestMetrics {
            registry,
            in_flight,
            requests,
            records,
            bytes,
            latency,
            refusals,
        }
    }

    pub fn answered(&self, status: u16, took: Duration) {
        self.requests
            .with_label_values(&[status.to_string().as_str()])
            .inc();
        self.latency.observe(took.as_secs_f64());
    }

    /// A refusal of the request (its answer is counted by `answered`).
    pub fn refused(&self, reason: &str, token: Option<&str>) {
        self.refusals
            .with_label_values(&[reason, token.unwrap_or_default()])
            .inc();
    }

    /// Counts a request as being read or delivered until the guard drops.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    pub fn refused_records(&self, token: Option<&str>, count: usize) {
        self.records
            .with_label_values(&["refused", token.unwrap_or_default()])
            .inc_by(count as u64);
    }

    pub fn accepted_records(&self, token: Option<&str>, count: usize) {
        self.records
            .with_label_values(&["accepted", token.unwrap_or_default()])
            .inc_by(count as u64);
    }

    pub fn received_bytes(&self, count: usize) {
        self.bytes.inc_by(count as u64);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
