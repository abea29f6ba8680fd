//! `keystone-runtime capture`: flags default to the pod's environment as the
//! operator sets it.

use std::path::PathBuf;

use clap::Args;

use std::sync::Arc;

use crate::capture::config::{password, read, user};
use crate::capture::http::{CaptureMetrics, serve};
use crate::capture::run::Stopped;
use crate::cli::serve::parse_control_token;
use crate::cli::{init_logging, kafka_settings_with_credentials, parse_kafka_property};
use crate::kafka::KafkaSettings;

/// How long a capture that cannot start waits before it tries again.
const REFUSAL_RETRY: std::time::Duration = std::time::Duration::from_secs(20);

#[derive(Debug, Args)]
pub struct CaptureCli {
    /// The compiled plan whose `capture` to run (what the operator mounts),
    /// or a capture configuration alone (JSON: database, tables, slot,
    /// publication, topic and snapshot policy). The database password comes
    /// from `KEYSTONE_POSTGRES_PASSWORD` or the file
    /// `KEYSTONE_POSTGRES_PASSWORD_FILE` names, the user from the
    /// configuration or `KEYSTONE_POSTGRES_USER`.
    #[arg(
        long = "plan",
        visible_alias = "config",
        env = "KEYSTONE_PLAN",
        default_value = "/etc/keystone/plan.json"
    )]
    pub config: PathBuf,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: String,
    /// This instance's identity (Kafka client id).
    #[arg(long, env = "POD_NAME", default_value = "capture")]
    pub instance_id: String,
    /// Extra librdkafka settings, `KEY=VALUE`, as for `serve` (no secrets:
    /// SASL credentials come from the environment).
    #[arg(long = "kafka-config", value_parser = parse_kafka_property)]
    pub kafka_config: Vec<(String, String)>,
    /// Where /metrics, /healthz and /readyz listen.
    #[arg(long, env = "KEYSTONE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: std::net::SocketAddr,
    /// Log as JSON lines.
    #[arg(long, env = "KEYSTONE_LOG_JSON")]
    pub log_json: bool,
    /// The credential `POST /drop-slot` requires, as `Authorization: Bearer
    /// <token>` (the operator sets it from a Secret it owns). Without it that
    /// endpoint refuses every request.
    #[arg(long, env = "KEYSTONE_CONTROL_TOKEN", hide_env_values = true, value_parser = parse_control_token)]
    pub control_token: Option<crate::host::ControlToken>,
}

/// Runs the capture until SIGTERM or SIGINT (then commits what it has and
/// stops); returns the exit status.
pub fn capture(args: CaptureCli) -> i32 {
    init_logging(args.log_json);
    let config = match read(&args.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return 2;
        }
    };
    let env = |name: &str| std::env::var(name).ok();
    let (user, password) = match user(&config, env).and_then(|u| Ok((u, password(env)?))) {
        Ok(credentials) => credentials,
        Err(error) => {
            eprintln!("error: {error}");
            return 2;
        }
    };
    let Some(extra) = kafka_settings_with_credentials(args.kafka_config) else {
        return 2;
    };
    let kafka = KafkaSettings {
        bootstrap_servers: args.bootstrap_servers,
        instance_id: args.instance_id,
        extra,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return 3;
        }
    };
    let metrics = match CaptureMetrics::new(&config.slot) {
        Ok(metrics) => Arc::new(metrics),
        Err(error) => {
            eprintln!("error: registering metrics: {error}");
            return 3;
        }
    };
    let (http_addr, token) = (args.http_addr, args.control_token);
    let result = runtime.block_on(async {
        let (drops, mut requests) = tokio::sync::mpsc::channel(1);
        let served = metrics.clone();
        let endpoints = tokio::spawn(async move {
            if let Err(error) = serve(http_addr, served, token, drops).await {
                tracing::error!(%error, %http_addr, "the operations endpoints stopped");
            }
        });
        let mut shutdown = Box::pin(shutdown_signal());
        let beats = metrics.clone();
        let result = 'attempts: loop {
            let result = crate::capture::run(
                config.clone(),
                kafka.clone(),
                user.clone(),
                password.clone(),
                metrics.clone(),
                &mut requests,
                &mut shutdown,
            )
            .await;
            // A capture that never streamed was refused (no primary key, no
            // publication, no database): it says why on /table, where the
            // operator reads it into a condition, and tries again, rather
            // than crash-looping with the reason only in its log.
            let Err(problem) = &result else {
                break result;
            };
            if metrics.streamed() {
                break result;
            }
            tracing::warn!(%problem, retry_in = ?REFUSAL_RETRY, "the capture cannot start");
            metrics.set_problem(Some(problem.clone()));
            // The wait is far shorter than /healthz's stall limit: one beat.
            beats.beat();
            let retry = tokio::time::sleep(REFUSAL_RETRY);
            tokio::pin!(retry);
            loop {
                tokio::select! {
                    () = &mut shutdown => break 'attempts Ok(Stopped::Shutdown),
                    () = &mut retry => break,
                    Some(reply) = requests.recv() => {
                        // Nothing streams, so no slot is held: a slot this
                        // capture made before the refusal is left to the
                        // next instance, which can drop it.
                        let _ = reply.send(Err(format!("the capture is not streaming: {problem}")));
                    }
                }
            }
        };
        if result == Ok(Stopped::SlotDropped) {
            // Exiting would have the Deployment start a capture that makes
            // the slot again: stay alive (and not ready) until the pod is deleted.
            let idle = async {
                loop {
                    beats.beat();
                    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
                }
            };
            tokio::select! {
                () = &mut shutdown => {}
                () = idle => {}
            }
        }
        endpoints.abort();
        result
    });
    match result {
        Ok(_) => 0,
        Err(error) => {
            tracing::error!(%error, "the capture stopped");
            eprintln!("error: {error}");
            3
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
