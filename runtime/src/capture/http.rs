//! The capture's operations endpoints: `/metrics` (Prometheus), `/healthz`
//! (the loop turned within the last two minutes), `/readyz` (streaming),
//! `/table` (the captured table's columns as the catalog has them, and why
//! the capture refuses to stream, if it does; JSON), and
//! `POST /drop-slot` (with the control token): the operator's request, when
//! the pipeline is deleted with `topicDeletionPolicy: Delete`, to stop
//! streaming and drop the replication slot. The capture holds the database
//! credentials, so the operator never needs to read them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use keystone_crds::pipeline::capture::SourceTable;
use prometheus::{Encoder, IntCounter, IntGauge, Opts, Registry, TextEncoder};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::host::{ControlToken, refusal};

/// A request to the capture loop: drop the slot, answer how it went.
pub type DropSlot = oneshot::Sender<Result<(), String>>;

/// How long the loop may go without a turn before `/healthz` fails.
const STALL: Duration = Duration::from_secs(120);

/// What the capture exports, labelled with its slot.
pub struct CaptureMetrics {
    registry: Registry,
    pub transactions: IntCounter,
    pub events: IntCounter,
    pub snapshot_rows: IntCounter,
    pub snapshot_chunks: IntCounter,
    /// Chunks read again because their select missed a transaction whose
    /// events were already captured.
    pub snapshot_chunk_retries: IntCounter,
    pub snapshot_done: IntGauge,
    /// Rows and chunks of the current (or last) snapshot committed to Kafka,
    /// over the capture's restarts.
    pub snapshot_committed_rows: IntGauge,
    pub snapshot_committed_chunks: IntGauge,
    pub kafka_commits: IntCounter,
    pub retained_wal_bytes: IntGauge,
    /// Commit time of the last transaction in Kafka, epoch milliseconds.
    pub last_commit_time_ms: IntGauge,
    ready: AtomicBool,
    /// Whether the capture streamed at some point since it started.
    streamed: AtomicBool,
    last_beat_ms: AtomicU64,
    report: Mutex<TableReport>,
}

/// What `GET /table` answers.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TableReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<SourceTable>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl CaptureMetrics {
    pub fn new(slot: &str) -> Result<CaptureMetrics, prometheus::Error> {
        let registry = Registry::new_custom(
            None,
            Some([("slot".to_owned(), slot.to_owned())].into_iter().collect()),
        )?;
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::with_opts(Opts::new(name, help))?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::with_opts(Opts::new(name, help))?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        Ok(CaptureMetrics {
            transactions: counter(
                "keystone_capture_transactions_total",
                "Database transactions captured into Kafka.",
            )?,
            events: counter(
                "keystone_capture_events_total",
                "Change events produced from the log.",
            )?,
            snapshot_rows: counter(
                "keystone_capture_snapshot_rows_total",
                "Rows produced by snapshots.",
            )?,
            snapshot_chunks: counter(
                "keystone_capture_snapshot_chunks_total",
                "Snapshot chunks completed.",
            )?,
            snapshot_chunk_retries: counter(
                "keystone_capture_snapshot_chunk_retries_total",
                "Snapshot chunks read again: their select missed a transaction already captured (committed in the log, not yet visible).",
            )?,
            snapshot_done: gauge(
                "keystone_capture_snapshot_done",
                "1 when no snapshot is in progress.",
            )?,
            snapshot_committed_rows: gauge(
                "keystone_capture_snapshot_committed_rows",
                "Rows of the current (or last) snapshot in Kafka, over restarts.",
            )?,
            snapshot_committed_chunks: gauge(
                "keystone_capture_snapshot_committed_chunks",
                "Chunks of the current (or last) snapshot in Kafka, over restarts.",
            )?,
            kafka_commits: counter(
                "keystone_capture_kafka_commits_total",
                "Kafka transactions committed.",
            )?,
            retained_wal_bytes: gauge(
                "keystone_capture_retained_wal_bytes",
                "WAL the database keeps for the slot (its position less the slot's confirmed one).",
            )?,
            last_commit_time_ms: gauge(
                "keystone_capture_last_commit_time_ms",
                "Commit time (epoch ms) of the last database transaction in Kafka.",
            )?,
            registry,
            ready: AtomicBool::new(false),
            streamed: AtomicBool::new(false),
            last_beat_ms: AtomicU64::new(now_ms()),
            report: Mutex::default(),
        })
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        if ready {
            self.streamed.store(true, Ordering::Relaxed);
        }
    }

    /// Whether the capture streamed at some point: an error before it did
    /// is a refusal to report and retry, not a crash.
    pub fn streamed(&self) -> bool {
        self.streamed.load(Ordering::Relaxed)
    }

    /// The table as the catalog describes it now.
    pub fn set_table(&self, table: SourceTable) {
        if let Ok(mut report) = self.report.lock() {
            report.table = Some(table);
        }
    }

    /// Why the capture does not stream (`None` once it does).
    pub fn set_problem(&self, problem: Option<String>) {
        if let Ok(mut report) = self.report.lock() {
            report.problem = problem;
        }
    }

    pub fn table_report(&self) -> TableReport {
        self.report.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// The loop turned.
    pub fn beat(&self) {
        self.last_beat_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn stalled(&self) -> bool {
        now_ms().saturating_sub(self.last_beat_ms.load(Ordering::Relaxed))
            > STALL.as_millis() as u64
    }

    fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut body);
        body
    }
}

pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<CaptureMetrics>,
    token: Option<ControlToken>,
    drops: mpsc::Sender<DropSlot>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "operations endpoints listening");
    let token = Arc::new(token);
    loop {
        let (stream, _) = crate::host::accept_retrying(&listener).await;
        let (metrics, token, drops) = (metrics.clone(), token.clone(), drops.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                handle(request, metrics.clone(), token.clone(), drops.clone())
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    request: Request<Incoming>,
    metrics: Arc<CaptureMetrics>,
    token: Arc<Option<ControlToken>>,
    drops: mpsc::Sender<DropSlot>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let content_type = if request.uri().path() == "/table" {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    let (status, body): (StatusCode, Bytes) = match (request.method(), request.uri().path()) {
        (&Method::POST, "/drop-slot") => {
            let authorization = request
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            match refusal(token.as_ref().as_ref(), authorization) {
                Some((status, body)) => (
                    StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN),
                    body.into(),
                ),
                None => {
                    let (reply, answer) = oneshot::channel();
                    let result = match drops.send(reply).await {
                        Ok(()) => answer
                            .await
                            .unwrap_or_else(|_| Err("the capture stopped".into())),
                        Err(_) => Err("the capture is not running".into()),
                    };
                    match result {
                        Ok(()) => (StatusCode::OK, "slot dropped\n".into()),
                        Err(error) => {
                            (StatusCode::SERVICE_UNAVAILABLE, format!("{error}\n").into())
                        }
                    }
                }
            }
        }
        (&Method::GET, "/metrics") => (StatusCode::OK, metrics.encode().into()),
        (&Method::GET, "/table") => (
            StatusCode::OK,
            serde_json::to_vec(&metrics.table_report())
                .unwrap_or_default()
                .into(),
        ),
        (&Method::GET, "/healthz") if metrics.stalled() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the capture loop has not turned for two minutes\n".into(),
        ),
        (&Method::GET, "/healthz") => (StatusCode::OK, "ok\n".into()),
        (&Method::GET, "/readyz") if metrics.ready.load(Ordering::Relaxed) => {
            (StatusCode::OK, "ready\n".into())
        }
        (&Method::GET, "/readyz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not streaming yet\n".into(),
        ),
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    };
    Ok(Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body))
        .expect("a valid response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_carry_the_slot_and_stalls_show() {
        let metrics = CaptureMetrics::new("orders").unwrap();
        metrics.events.inc_by(3);
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(
            text.contains(r#"keystone_capture_events_total{slot="orders"} 3"#),
            "{text}"
        );
        assert!(!metrics.stalled());
        metrics.last_beat_ms.store(0, Ordering::Relaxed);
        assert!(metrics.stalled());
    }
}
