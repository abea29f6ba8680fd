//! `serve`, and the Kafka flags `ingest` and `capture` share with it.

use std::path::PathBuf;

use clap::Args;

/// `serve`: flags default to the pod's environment as the operator sets it.
#[derive(Debug, Args)]
pub struct ServeCli {
    /// The compiled plan (JSON), as mounted from the pipeline's ConfigMap.
    #[arg(long, env = "KEYSTONE_PLAN", default_value = "/etc/keystone/plan.json")]
    pub plan: PathBuf,
    /// The stage of the plan to run.
    #[arg(long, env = "KEYSTONE_STAGE")]
    pub stage: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: String,
    /// This instance's stable identity (static membership, transactional id).
    #[arg(long, env = "POD_NAME")]
    pub instance_id: String,
    /// Where /metrics, /healthz, /readyz and /checkpoint listen.
    #[arg(long, env = "KEYSTONE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: std::net::SocketAddr,
    /// Extra librdkafka settings, `KEY=VALUE` (TLS, SASL mechanism, ...);
    /// repeatable. Secrets are refused here, where every user of the node can
    /// read them: the SASL credentials come from `KAFKA_SASL_USERNAME` and
    /// `KAFKA_SASL_PASSWORD` (or `KAFKA_SASL_PASSWORD_FILE`) in the environment,
    /// key material from files (`ssl.key.location`).
    #[arg(long = "kafka-config", value_parser = parse_kafka_property)]
    pub kafka_config: Vec<(String, String)>,
    /// Log as JSON lines.
    #[arg(long, env = "KEYSTONE_LOG_JSON")]
    pub log_json: bool,
    /// A restore plan (JSON `RestorePlan`) to apply once per partition before
    /// processing it; every offset commit then carries `keystone.restore=<id>`.
    #[arg(long, env = "KEYSTONE_RESTORE")]
    pub restore: Option<PathBuf>,
    /// The credential `POST /checkpoint` and `POST /resume` require, as
    /// `Authorization: Bearer <token>` (the operator sets it from a Secret it
    /// owns). Without it those endpoints refuse every request.
    #[arg(long, env = "KEYSTONE_CONTROL_TOKEN", hide_env_values = true, value_parser = parse_control_token)]
    pub control_token: Option<crate::host::ControlToken>,
    /// How long the engine may go without making progress (a turn of its loop)
    /// before `/healthz` fails and the kubelet restarts the instance, e.g. `60s`, `5m`.
    #[arg(long, env = "KEYSTONE_WATCHDOG_TIMEOUT", default_value = "60s", value_parser = parse_watchdog_timeout)]
    pub watchdog_timeout: std::time::Duration,
    /// Bytes of held-back events (those `order` steps wait with) past which
    /// the instance stops reading input until its timers have released
    /// enough, e.g. `256MiB`. Default: half the container's memory limit
    /// (cgroup v2), or 256MiB when there is none.
    #[arg(long, env = "KEYSTONE_MAX_BUFFERED_BYTES", value_name = "SIZE")]
    pub max_buffered_bytes: Option<crate::buffers::Size>,
}

pub(crate) fn parse_control_token(text: &str) -> Result<crate::host::ControlToken, String> {
    crate::host::ControlToken::new(text).ok_or_else(|| "the control token is empty".to_owned())
}

fn parse_watchdog_timeout(text: &str) -> Result<std::time::Duration, String> {
    let duration = text
        .parse::<keystone_crds::duration::Duration>()
        .map_err(|e| e.to_string())?
        .as_std();
    if duration < std::time::Duration::from_secs(1) {
        return Err(format!(
            "{text}: the watchdog needs at least 1s (a turn may take a few hundred ms)"
        ));
    }
    Ok(duration)
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// A `--kafka-config` setting: `KEY=VALUE`, and no secret.
pub(crate) fn parse_kafka_property(text: &str) -> Result<(String, String), String> {
    let (key, value) = parse_key_value(text)?;
    if crate::kafka::is_secret_property(&key) || key == "sasl.username" {
        return Err(format!(
            "{key} is a credential and the command line is visible to every user of the node; \
             set it in the environment instead ({} and {}, or {} naming a mounted file)",
            crate::kafka::ENV_SASL_USERNAME,
            crate::kafka::ENV_SASL_PASSWORD,
            crate::kafka::ENV_SASL_PASSWORD_FILE
        ));
    }
    Ok((key, value))
}

/// Logs to stderr, as JSON lines when asked; `RUST_LOG` filters (default `info`).
pub(crate) fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The `--kafka-config` settings with the SASL credentials from the
/// environment; `None` (printed) when the credentials are incomplete.
pub(crate) fn kafka_settings_with_credentials(
    settings: Vec<(String, String)>,
) -> Option<Vec<(String, String)>> {
    match crate::kafka::sasl_credentials(
        |name| std::env::var(name).ok(),
        |path| std::fs::read_to_string(path),
    ) {
        Ok(credentials) => {
            let mut extra = settings;
            extra.extend(credentials);
            Some(extra)
        }
        Err(error) => {
            tracing::error!(%error, "no Kafka credentials");
            eprintln!("error: {error}");
            None
        }
    }
}

pub(super) fn serve(args: ServeCli) -> i32 {
    init_logging(args.log_json);
    let Some(extra) = kafka_settings_with_credentials(args.kafka_config) else {
        return 2;
    };
    let result = crate::host::serve(crate::host::ServeArgs {
        plan: args.plan,
        stage: args.stage,
        kafka: crate::kafka::KafkaSettings {
            bootstrap_servers: args.bootstrap_servers,
            instance_id: args.instance_id,
            extra,
        },
        http_addr: args.http_addr,
        restore: args.restore,
        control_token: args.control_token,
        watchdog_timeout: args.watchdog_timeout,
        max_buffered_bytes: args
            .max_buffered_bytes
            .map_or_else(crate::buffers::default_limit, |size| size.0),
    });
    match result {
        Ok(()) => 0,
        Err(error) => {
            tracing::error!(%error, "the stage stopped");
            eprintln!("error: {error}");
            3
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Command};

    fn serve(extra: &[&str]) -> Result<Cli, clap::Error> {
        let base = [
            "keystone-runtime",
            "serve",
            "--stage",
            "s0",
            "--bootstrap-servers",
            "kafka:9093",
            "--instance-id",
            "orders-s0-0",
        ];
        Cli::try_parse_from(base.iter().chain(extra))
    }

    #[test]
    fn credentials_on_the_command_line_are_refused() {
        for setting in [
            "--kafka-config=sasl.password=hunter2",
            "--kafka-config=sasl.username=orders",
            "--kafka-config=ssl.key.password=k",
            "--kafka-config=ssl.key.pem=-----BEGIN",
        ] {
            let error = serve(&[setting]).expect_err(setting).to_string();
            assert!(error.contains("environment"), "{setting}: {error}");
        }
    }

    #[test]
    fn serve_arguments_print_no_secret() {
        let args = crate::host::ServeArgs {
            plan: "/etc/keystone/plan.json".into(),
            stage: "s0".into(),
            kafka: crate::kafka::KafkaSettings {
                bootstrap_servers: "kafka:9093".into(),
                instance_id: "orders-s0-0".into(),
                extra: vec![
                    ("sasl.username".into(), "orders".into()),
                    ("sasl.password".into(), "hunter2-do-not-print".into()),
                ],
            },
            http_addr: "127.0.0.1:8080".parse().expect("address"),
            restore: None,
            control_token: crate::host::ControlToken::new("control-token-do-not-print"),
            watchdog_timeout: std::time::Duration::from_secs(60),
            max_buffered_bytes: crate::buffers::DEFAULT_LIMIT,
        };
        let shown = format!("{args:?}");
        assert!(!shown.contains("hunter2-do-not-print"), "{shown}");
        assert!(!shown.contains("control-token-do-not-print"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn other_settings_are_taken() {
        let cli = serve(&[
            "--kafka-config=security.protocol=sasl_ssl",
            "--kafka-config=sasl.mechanism=SCRAM-SHA-512",
        ])
        .expect("parses");
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(
            args.kafka_config,
            vec![
                ("security.protocol".to_owned(), "sasl_ssl".to_owned()),
                ("sasl.mechanism".to_owned(), "SCRAM-SHA-512".to_owned()),
            ]
        );
    }
}
