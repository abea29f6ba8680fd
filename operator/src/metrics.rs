//! Prometheus metrics and the small HTTP server for `/metrics`, `/healthz` and `/readyz`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use keystone_crds::pipeline::PipelinePhase;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::sync::Mutex;

const PHASES: [PipelinePhase; 8] = [
    PipelinePhase::Pending,
    PipelinePhase::Invalid,
    PipelinePhase::Provisioning,
    PipelinePhase::Running,
    PipelinePhase::Degraded,
    PipelinePhase::Upgrading,
    PipelinePhase::Suspended,
    PipelinePhase::Deleting,
];

pub fn phase_label(phase: PipelinePhase) -> &'static str {
    match phase {
        PipelinePhase::Pending => "Pending",
        PipelinePhase::Invalid => "Invalid",
        PipelinePhase::Provisioning => "Provisioning",
        PipelinePhase::Running => "Running",
        PipelinePhase::Degraded => "Degraded",
        PipelinePhase::Upgrading => "Upgrading",
        PipelinePhase::Suspended => "Suspended",
        PipelinePhase::Deleting => "Deleting",
    }
}

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub failures: IntCounterVec,
    pub duration: HistogramVec,
    pub topic_changes: IntCounterVec,
    /// Pipeline checkpoints taken, by result (`succeeded`, `failed`).
    pub checkpoints: IntCounterVec,
    /// How long a checkpoint took, barrier requests and waits included.
    pub checkpoint_duration: Histogram,
    pipelines: IntGaugeVec,
    /// 1 for each Pipeline's current phase (kube-state-metrics' style), so
    /// alerts name the Pipeline. `pipeline_namespace`, not `namespace`: the
    /// scrape's own `namespace` label is the operator's.
    pipeline_phase: IntGaugeVec,
    phases: Arc<Mutex<HashMap<String, PipelinePhase>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "keystone_operator_reconciles_total",
                "Reconciles run, by controller",
            ),
            &["controller"],
        )
        .expect("valid metric");
        let failures = IntCounterVec::new(
            Opts::new(
                "keystone_operator_reconcile_failures_total",
                "Reconciles that failed, by controller and reason",
            ),
            &["controller", "reason"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "keystone_operator_reconcile_duration_seconds",
                "Reconcile duration",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["controller"],
        )
        .expect("valid metric");
        let topic_changes = IntCounterVec::new(
            Opts::new(
                "keystone_operator_topic_changes_total",
                "Changes made to Kafka topics, by action (created, partitions_raised, config_corrected, deleted)",
            ),
            &["action"],
        )
        .expect("valid metric");
        let checkpoints = IntCounterVec::new(
            Opts::new(
                "keystone_operator_checkpoints_total",
                "Pipeline checkpoints taken, by result (succeeded, failed)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let checkpoint_duration = Histogram::with_opts(
            HistogramOpts::new(
                "keystone_operator_checkpoint_duration_seconds",
                "Duration of a pipeline checkpoint, from the first barrier request to the last answer",
            )
            .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]),
        )
        .expect("valid metric");
        let pipelines = IntGaugeVec::new(
            Opts::new("keystone_operator_pipelines", "Pipelines by phase"),
            &["phase"],
        )
        .expect("valid metric");
        let pipeline_phase = IntGaugeVec::new(
            Opts::new(
                "keystone_operator_pipeline_phase",
                "1 for the phase each Pipeline is in",
            ),
            &["pipeline_namespace", "pipeline", "phase"],
        )
        .expect("valid metric");
        for m in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(failures.clone()),
            Box::new(duration.clone()),
            Box::new(topic_changes.clone()),
            Box::new(checkpoints.clone()),
            Box::new(checkpoint_duration.clone()),
            Box::new(pipelines.clone()),
            Box::new(pipeline_phase.clone()),
        ] {
            registry.register(m).expect("metrics register once");
        }
        for phase in PHASES {
            pipelines.with_label_values(&[phase_label(phase)]).set(0);
        }
        // Both series exist from the start, so a rate or an alert on failures has a baseline.
        for result in ["succeeded", "failed"] {
            checkpoints.with_label_values(&[result]);
        }
        Self {
            registry,
            reconciles,
            failures,
            duration,
            topic_changes,
            checkpoints,
            checkpoint_duration,
            pipelines,
            pipeline_phase,
            phases: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Records a pipeline's phase (None: the pipeline is gone).
    pub async fn set_phase(&self, key: &str, phase: Option<PipelinePhase>) {
        let mut phases = self.phases.lock().await;
        let (namespace, name) = key.split_once('/').unwrap_or(("", key));
        let previous = match phase {
            Some(phase) => phases.insert(key.to_owned(), phase),
            None => phases.remove(key),
        };
        if previous != phase {
            // Counted as they change: recounting every Pipeline per reconcile
            // cost O(n) under this lock, with 10,000 Pipelines too much.
            if let Some(old) = previous {
                let _ =
                    self.pipeline_phase
                        .remove_label_values(&[namespace, name, phase_label(old)]);
                self.pipelines.with_label_values(&[phase_label(old)]).dec();
            }
            if let Some(new) = phase {
                self.pipeline_phase
                    .with_label_values(&[namespace, name, phase_label(new)])
                    .set(1);
                self.pipelines.with_label_values(&[phase_label(new)]).inc();
            }
        }
    }

    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// Readiness: the process is up and connected to the API server (as leader or as standby).
#[derive(Clone, Default)]
pub struct Health {
    pub ready: Arc<AtomicBool>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Metrics, health: Health) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                let health = health.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(respond(req.uri().path(), &metrics, &health))
                }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "http connection ended");
            }
        });
    }
}

fn respond(path: &str, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    let (status, body, content_type) = match path {
        "/metrics" => (
            StatusCode::OK,
            metrics.render(),
            "text/plain; version=0.0.4",
        ),
        "/healthz" => (StatusCode::OK, "ok\n".to_owned(), "text/plain"),
        "/readyz" if health.ready.load(Ordering::Relaxed) => {
            (StatusCode::OK, "ok\n".to_owned(), "text/plain")
        }
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready\n".to_owned(),
            "text/plain",
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "not found\n".to_owned(),
            "text/plain",
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn phases_are_counted_and_rendered() {
        let metrics = Metrics::new();
        metrics.set_phase("a/x", Some(PipelinePhase::Running)).await;
        metrics.set_phase("a/y", Some(PipelinePhase::Running)).await;
        metrics
            .set_phase("a/y", Some(PipelinePhase::Degraded))
            .await;
        metrics.reconciles.with_label_values(&["pipeline"]).inc();
        let text = metrics.render();
        assert!(
            text.contains("keystone_operator_pipelines{phase=\"Running\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("keystone_operator_pipelines{phase=\"Degraded\"} 1"),
            "{text}"
        );
        assert!(text.contains("keystone_operator_reconciles_total{controller=\"pipeline\"} 1"));
        // One series per Pipeline, for its current phase only.
        let y = |phase: &str| {
            format!(
                "keystone_operator_pipeline_phase{{phase=\"{phase}\",pipeline=\"y\",pipeline_namespace=\"a\"}} 1"
            )
        };
        assert!(text.contains(&y("Degraded")), "{text}");
        assert!(!text.contains(&y("Running")), "{text}");
        metrics.set_phase("a/x", None).await;
        let text = metrics.render();
        assert!(text.contains("keystone_operator_pipelines{phase=\"Running\"} 0"));
        assert!(
            !text.contains("pipeline=\"x\""),
            "a deleted Pipeline leaves no series: {text}"
        );
    }

    #[test]
    fn readiness_follows_the_flag() {
        let metrics = Metrics::new();
        let health = Health::default();
        assert_eq!(
            respond("/readyz", &metrics, &health).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        health.ready.store(true, Ordering::Relaxed);
        assert_eq!(
            respond("/readyz", &metrics, &health).status(),
            StatusCode::OK
        );
        assert_eq!(
            respond("/healthz", &metrics, &health).status(),
            StatusCode::OK
        );
        assert_eq!(
            respond("/nope", &metrics, &health).status(),
            StatusCode::NOT_FOUND
        );
    }
}
