//! `keystone-console`: the web console. See the crate's documentation.

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use keystone_console::deadletters::DeadLetterReader;
use keystone_console::{AppState, AuthMode, router};
use keystone_operator::OperatorConfig;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "The Keystone console: declare, check, try and watch pipelines in a browser"
)]
struct Cli {
    /// Where the console serves its pages and `/healthz`.
    #[arg(long, env = "KEYSTONE_CONSOLE_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// How users are identified: `token` (each signs in with a Kubernetes
    /// bearer token) or `proxy` (an authenticating proxy names them in headers
    /// and the console impersonates them).
    #[arg(
        long,
        env = "KEYSTONE_CONSOLE_AUTH",
        value_enum,
        default_value = "token"
    )]
    auth: Auth,
    /// The proxy's header naming the user (`--auth proxy`).
    #[arg(
        long,
        env = "KEYSTONE_CONSOLE_USER_HEADER",
        default_value = "X-Forwarded-User"
    )]
    user_header: String,
    /// The proxy's header listing the user's groups, comma-separated (`--auth proxy`).
    #[arg(
        long,
        env = "KEYSTONE_CONSOLE_GROUPS_HEADER",
        default_value = "X-Forwarded-Groups"
    )]
    groups_header: String,
    /// Mark the session cookie `Secure` (the console is reached over HTTPS).
    #[arg(long, env = "KEYSTONE_CONSOLE_SECURE_COOKIES", default_value_t = false, action = clap::ArgAction::Set)]
    secure_cookies: bool,
    /// The operator's config file: the Kafka clusters the console reads
    /// pipelines' dead letters from (`KAFKA_BOOTSTRAP_SERVERS` when unset).
    #[arg(long, env = "KEYSTONE_OPERATOR_CONFIG")]
    operator_config: Option<std::path::PathBuf>,
    /// The namespace of the Secrets holding Kafka credentials (the console's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "keystone-system")]
    namespace: String,
    /// Log lines as `text` or `json`; the level from RUST_LOG.
    #[arg(long, env = "KEYSTONE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Auth {
    Token,
    Proxy,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match cli.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }
    // kube and reqwest use rustls; with more than one provider linked, none is
    // chosen by default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kube = kube::Config::infer()
        .await
        .context("finding the API server (in-cluster, or KUBECONFIG)")?;
    let auth = match cli.auth {
        Auth::Token => AuthMode::Token,
        Auth::Proxy => AuthMode::Proxy {
            user_header: cli.user_header.to_ascii_lowercase(),
            groups_header: cli.groups_header.to_ascii_lowercase(),
        },
    };
    // The console's own account reads only the Kafka credentials the
    // operator's configuration names; everything else is done as the user.
    let own = kube::Client::try_from(kube.clone()).context("the console's own client")?;
    let operator = OperatorConfig::load(cli.operator_config.as_deref()).map_err(|e| e.to_string());
    let dead_letters =
        DeadLetterReader::load(operator.as_ref().map_err(Clone::clone), own, &cli.namespace).await;
    if let Some(reason) = &dead_letters.unavailable {
        tracing::warn!(%reason, "dead letters will not be shown");
    }
    let operator = operator.unwrap_or_else(|reason| {
        tracing::warn!(%reason, "the operator's policy will not be checked");
        OperatorConfig::default()
    });
    let app = router(AppState::new(
        kube,
        auth,
        cli.secure_cookies,
        dead_letters,
        operator,
    ));
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("binding {}", cli.listen))?;
    tracing::info!(address = %cli.listen, "console listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
