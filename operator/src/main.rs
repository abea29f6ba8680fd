//! `keystone-operator`: flags, telemetry, leader election, then the controllers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use keystone_operator::metrics::{self, Health, Metrics};
use keystone_operator::{Context, OperatorConfig, run_controllers};
use kube_lease_manager::{LeaseManagerBuilder, LeaseParams};
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Parser)]
#[command(
    name = "keystone-operator",
    version,
    about = "Reconciles Keystone Pipelines and Processors"
)]
struct Args {
    /// Operator configuration (YAML or JSON): Kafka clusters, runtime image, watched namespaces.
    #[arg(long, env = "KEYSTONE_OPERATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "KEYSTONE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    #[arg(long, env = "KEYSTONE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Take a Lease before acting, so several replicas can run and only one acts.
    #[arg(long, env = "KEYSTONE_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, env = "KEYSTONE_LEASE_NAME", default_value = "keystone-operator")]
    lease_name: String,
    /// The operator's namespace: its Lease, topic ownership ledger and Kafka credential Secrets.
    #[arg(long, env = "POD_NAMESPACE", default_value = "keystone-system")]
    namespace: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Before any client: two providers are linked in, and rustls picks none.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    match args.log_format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }

    let config = OperatorConfig::load(args.config.as_deref())
        .context("loading the operator configuration")?;
    tracing::info!(
        clusters = ?config.kafka_clusters.keys().collect::<Vec<_>>(),
        namespaces = ?config.watch_namespaces,
        runtime_image = config.runtime_image(),
        "configuration loaded"
    );
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    client
        .apiserver_version()
        .await
        .context("the Kubernetes API server does not answer")?;

    let metrics = Metrics::new();
    let health = Health::default();
    let server = tokio::spawn(metrics::serve(
        args.metrics_addr,
        metrics.clone(),
        health.clone(),
    ));
    health.ready.store(true, Ordering::Relaxed);

    if args.leader_elect {
        let identity = args
            .identity
            .clone()
            .unwrap_or_else(|| format!("keystone-operator-{}", std::process::id()));
        let manager = LeaseManagerBuilder::new(client.clone(), &args.lease_name)
            .with_namespace(&args.namespace)
            .with_parameters(LeaseParams::new(identity.clone(), 15, 5))
            .build()
            .await
            .context("setting up leader election")?;
        let (mut leader, _task) = manager.watch().await;
        tracing::info!(%identity, lease = %args.lease_name, "waiting to become the leader");
        while !*leader.borrow_and_update() {
            leader.changed().await.context("leader election stopped")?;
        }
        tracing::info!(%identity, "became the leader");
        // Losing the lease means another replica may act: stop at once, as
        // controller-runtime does, and let the Deployment restart us as a standby.
        tokio::spawn(async move {
            loop {
                if leader.changed().await.is_err() || !*leader.borrow_and_update() {
                    tracing::error!("lost the leader lease; exiting");
                    std::process::exit(1);
                }
            }
        });
    }

    let ctx = Arc::new(Context::new(
        client,
        config.clone(),
        args.namespace.clone(),
        metrics,
    ));
    let controllers = async {
        if config.watch_namespaces.is_empty() {
            run_controllers(ctx.clone(), None).await;
        } else {
            futures::future::join_all(
                config
                    .watch_namespaces
                    .iter()
                    .map(|ns| run_controllers(ctx.clone(), Some(ns.clone()))),
            )
            .await;
        }
    };
    tokio::select! {
        _ = controllers => tracing::info!("controllers stopped"),
        result = server => {
            result.context("metrics server task")?.context("metrics server")?;
        }
    }
    Ok(())
}
