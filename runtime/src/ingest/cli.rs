//! `keystone-runtime ingest`: the HTTP ingest endpoint of a plan, writing to
//! its source topic. Flags default to the pod's environment as the operator
//! sets it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use keystone_crds::pipeline::http::HttpSourceSpec;
use keystone_crds::{PLAN_VERSION, Plan};

use super::body::Contract;
use super::endpoint::Endpoint;
use super::kafka::KafkaDelivery;
use super::metrics::IngestMetrics;
use super::server::{Listening, ServerSettings, bind_and_serve, stop_signal};
use super::tls::{ReloadingTls, TlsFiles};
use super::tokens::Tokens;
use crate::cli::{init_logging, kafka_settings_with_credentials, parse_kafka_property};
use crate::kafka::KafkaSettings;
use crate::schema::Validator;

/// How often the tokens directory is read again (the kubelet updates a
/// mounted Secret within about a minute).
const TOKENS_RELOAD: Duration = Duration::from_secs(15);

/// How often the TLS files are read again (certificates are renewed days
/// ahead of their expiry).
const TLS_RELOAD: Duration = Duration::from_secs(60);

#[derive(Debug, Args)]
pub struct IngestCli {
    /// The compiled plan whose `ingest` to serve (what the operator mounts).
    #[arg(long, env = "KEYSTONE_PLAN", default_value = "/etc/keystone/plan.json")]
    pub plan: PathBuf,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: String,
    /// This instance's identity (Kafka client id).
    #[arg(long, env = "POD_NAME", default_value = "ingest")]
    pub instance_id: String,
    /// Extra librdkafka settings, `KEY=VALUE`, as for `serve` (no secrets:
    /// SASL credentials come from the environment).
    #[arg(long = "kafka-config", value_parser = parse_kafka_property)]
    pub kafka_config: Vec<(String, String)>,
    /// Where the endpoint listens; `/healthz`, `/readyz` and `/metrics` are
    /// served beside it.
    #[arg(long, env = "KEYSTONE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// The tokens that may send events: a directory with one file per token
    /// (the tokens Secret, mounted), the file's name being the token's.
    #[arg(
        long,
        env = "KEYSTONE_INGEST_TOKENS",
        default_value = "/var/run/secrets/keystone/ingest-tokens"
    )]
    pub tokens_dir: PathBuf,
    /// Where the endpoint takes events over TLS when the plan asks for TLS
    /// (`spec.source.http.tls`); `--listen` then serves only the probes and
    /// metrics.
    #[arg(long, env = "KEYSTONE_HTTPS_ADDR", default_value = "0.0.0.0:8443")]
    pub tls_listen: SocketAddr,
    /// The server's `tls.crt` and `tls.key` (the TLS Secret, mounted), when
    /// the plan asks for TLS.
    #[arg(
        long,
        env = "KEYSTONE_INGEST_TLS",
        default_value = "/var/run/secrets/keystone/ingest-tls"
    )]
    pub tls_dir: PathBuf,
    /// The client authorities' `ca.crt` (the client CA Secret, mounted), when
    /// the plan asks for mutual TLS.
    #[arg(
        long,
        env = "KEYSTONE_INGEST_CLIENT_CA",
        default_value = "/var/run/secrets/keystone/ingest-client-ca"
    )]
    pub client_ca_dir: PathBuf,
    /// Seconds the broker may take to acknowledge a request's records before
    /// the request is answered 503.
    #[arg(long, default_value_t = 10)]
    pub delivery_timeout_secs: u64,
    /// Requests read at once at most; each holds up to the body limit.
    #[arg(long, default_value_t = 64)]
    pub max_in_flight: usize,
    /// Log as JSON lines.
    #[arg(long, env = "KEYSTONE_LOG_JSON")]
    pub log_json: bool,
}

/// Serves until SIGTERM or SIGINT; returns the exit status.
pub fn ingest(args: IngestCli) -> i32 {
    init_logging(args.log_json);
    let (plan, http) = match read_plan(&args.plan) {
        Ok(read) => read,
        Err(error) => {
            eprintln!("error: {error}");
            return 2;
        }
    };
    let Some(extra) = kafka_settings_with_credentials(args.kafka_config.clone()) else {
        return 2;
    };
    let settings = KafkaSettings {
        bootstrap_servers: args.bootstrap_servers.clone(),
        instance_id: args.instance_id.clone(),
        extra,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: {error}");
            return 1;
        }
    };
    match runtime.block_on(serve(&args, &plan, &http, &settings)) {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("error: {error}");
            1
        }
    }
}

async fn serve(
    args: &IngestCli,
    plan: &Plan,
    http: &HttpSourceSpec,
    settings: &KafkaSettings,
) -> Result<(), String> {
    let tokens = Tokens::watch_dir(args.tokens_dir.clone(), TOKENS_RELOAD)
        .map_err(|e| {
            format!(
                "cannot read the ingest tokens in {}: {e}",
                args.tokens_dir.display()
            )
        })?
        .granted(&http.granted_tokens);
    if tokens.names().is_empty() {
        tracing::warn!(dir = %args.tokens_dir.display(), "no ingest token yet: every request is refused (401) until the tokens Secret has one");
    }
    let tls = match &http.tls {
        None => None,
        Some(tls) => {
            let files = TlsFiles {
                dir: args.tls_dir.clone(),
                client_ca_dir: tls
                    .client_ca_secret
                    .as_ref()
                    .map(|_| args.client_ca_dir.clone()),
            };
            Some(ReloadingTls::watch(files, TLS_RELOAD)?)
        }
    };
    let max_body_bytes = usize::try_from(http.max_body_bytes).unwrap_or(usize::MAX);
    let delivery = KafkaDelivery::new(
        settings,
        plan.source.topic.clone(),
        Duration::from_secs(args.delivery_timeout_secs),
        // As many bytes as the requests in flight may hold.
        max_body_bytes.saturating_mul(args.max_in_flight),
    )
    .map_err(|e| format!("cannot create the Kafka producer: {e}"))?;
    let mut endpoint = Endpoint::from_spec(
        http,
        Contract::new(Validator::for_source(&plan.source.schema), &plan.source.key),
        Some(tokens),
        Arc::new(delivery),
    );
    endpoint.metrics = IngestMetrics::for_pipeline(&plan.pipeline);
    let endpoint = Arc::new(endpoint);
    let server = ServerSettings {
        max_in_flight: args.max_in_flight.max(1),
        ..ServerSettings::default()
    };
    // With TLS, events take the TLS port and the plain one keeps the probes
    // and metrics, which the kubelet and the scraper reach without a client
    // certificate.
    let listeners = match tls {
        None => vec![(args.listen, Listening::plain())],
        Some(tls) => vec![
            (
                args.listen,
                Listening {
                    tls: None,
                    events: false,
                },
            ),
            (
                args.tls_listen,
                Listening {
                    tls: Some(tls),
                    events: true,
                },
            ),
        ],
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        stop_signal().await;
        let _ = stop.send(true);
    });
    // One that cannot bind ends them all: a pod half up would pass its probes.
    let serving = listeners.into_iter().map(|(addr, listening)| {
        let (endpoint, mut stopped) = (endpoint.clone(), stopped.clone());
        async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            bind_and_serve(addr, endpoint, server, listening, shutdown)
                .await
                .map_err(|e| format!("cannot serve on {addr}: {e}"))
        }
    });
    futures::future::try_join_all(serving).await.map(|_| ())
}

fn read_plan(path: &Path) -> Result<(Plan, HttpSourceSpec), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let plan: Plan = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if plan.version != PLAN_VERSION {
        return Err(format!(
            "{}: plan version {} is not this runtime's ({PLAN_VERSION})",
            path.display(),
            plan.version
        ));
    }
    let http = plan.ingest.clone().ok_or_else(|| {
        format!(
            "{}: the plan has no ingest endpoint (spec.source.http)",
            path.display()
        )
    })?;
    Ok((plan, http))
}
