//! The command line: `check`, `plan` and `run` (local mode). `serve` (a stage on
//! Kafka) joins them with the Kafka runtime.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use keystone_crds::Diagnostic;
use keystone_crds::manifest;

use crate::clock::SystemClock;
use crate::error::RuntimeError;
use crate::local::{self, LocalPipeline, LocalSinks, SinkTarget};

#[derive(Debug, Parser)]
#[command(
    name = "keystone-runtime",
    version,
    about = "Keystone runtime: check and run pipelines"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check pipelines against their schema and processing contracts and print
    /// their plans' summaries.
    ///
    /// Every problem in every document of every file is reported, each as
    /// `FILE:LINE:COLUMN: PATH (STEP): MESSAGE`, with a `  hint: ...` line when
    /// the fix is obvious. `--output json` prints instead one JSON object,
    /// `{"diagnostics": [...]}`, each with file, line, column, path, step, kind,
    /// message and hint (null when absent).
    ///
    /// Exit status: 0 when every manifest is valid, 1 on schema or contract
    /// errors, 2 when a file cannot be read (missing, or not YAML).
    Check {
        /// Files holding Pipeline and Processor manifests (multi-document YAML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// How to print problems: `text` for people, `json` for editors and CI.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print a pipeline's compiled plan as JSON, exactly as the operator stores it
    /// for the runtime, so that plans can be diffed in review and given to
    /// `serve --plan` without a cluster.
    ///
    /// One pipeline per invocation: with several in the files, name it with
    /// `--pipeline`. Problems are printed and exit as with `check`.
    Plan {
        /// Files holding the Pipeline and the Processors it references.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The pipeline to compile when the files hold several.
        #[arg(long)]
        pipeline: Option<String>,
    },
    /// Run a pipeline locally on JSON lines, with no cluster and no Kafka.
    Run(RunArgs),
    /// Run one stage of a compiled plan on Kafka (what a runtime pod runs).
    Serve(ServeCli),
}

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
    /// Extra librdkafka settings, `KEY=VALUE` (TLS, SASL, ...); repeatable.
    #[arg(long = "kafka-config", value_parser = parse_key_value)]
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
}

fn parse_control_token(text: &str) -> Result<crate::host::ControlToken, String> {
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

/// How `check` prints what it finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Plans' summaries on stdout; problems on stderr, one per line, with hints.
    Text,
    /// One JSON object on stdout: `{"diagnostics": [...]}`.
    Json,
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

fn serve(args: ServeCli) -> i32 {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    let result = crate::host::serve(crate::host::ServeArgs {
        plan: args.plan,
        stage: args.stage,
        kafka: crate::kafka::KafkaSettings {
            bootstrap_servers: args.bootstrap_servers,
            instance_id: args.instance_id,
            extra: args.kafka_config,
        },
        http_addr: args.http_addr,
        restore: args.restore,
        control_token: args.control_token,
        watchdog_timeout: args.watchdog_timeout,
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

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Files holding the Pipeline and the Processors it references.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Input events, one JSON object per line; `-` for stdin.
    #[arg(long, short)]
    pub input: PathBuf,
    /// Where events reaching the sinks go, as JSON lines; `-` for stdout.
    #[arg(long, short, default_value = "-")]
    pub output: PathBuf,
    /// Where dead letters go, as JSON lines with reason, step and original; stderr when unset.
    #[arg(long)]
    pub dead_letters: Option<PathBuf>,
    /// Rows of a join or enrich table: `NAME=FILE` (JSON lines, latest row per key wins).
    #[arg(long = "table", value_parser = parse_table)]
    pub tables: Vec<(String, PathBuf)>,
    /// Send one sink elsewhere: `NAME=FILE` (`-` for stdout) with the sink's own
    /// records (a Kafka sink's events, a search sink's bulk requests). Other
    /// sinks keep going to `--output`.
    #[arg(long = "sink", value_parser = local::sinks::parse_sink_file)]
    pub sinks: Vec<(String, SinkTarget)>,
    /// Write sink NAME to its real destination (a search sink's endpoint, with
    /// credentials from the environment as on a cluster) instead of a file.
    #[arg(long = "connect", value_name = "NAME")]
    pub connect: Vec<String>,
    /// The pipeline to run when the files hold several.
    #[arg(long)]
    pub pipeline: Option<String>,
    /// No summary on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

fn parse_table(text: &str) -> Result<(String, PathBuf), String> {
    match text.split_once('=') {
        Some((name, file)) if !name.is_empty() && !file.is_empty() => {
            Ok((name.to_owned(), PathBuf::from(file)))
        }
        _ => Err(format!("expected NAME=FILE, got {text:?}")),
    }
}

/// Runs a command; returns the exit status. Errors that stop a command are
/// printed to stderr here; `Err` is left for the caller to print.
pub fn execute(cli: Cli) -> Result<i32, RuntimeError> {
    match cli.command {
        Command::Check { files, output } => Ok(check(
            &files,
            output,
            &mut std::io::stdout(),
            &mut std::io::stderr(),
        )),
        Command::Plan { files, pipeline } => Ok(plan(
            &files,
            pipeline.as_deref(),
            &mut std::io::stdout(),
            &mut std::io::stderr(),
        )),
        Command::Serve(args) => Ok(serve(args)),
        Command::Run(args) => match run(&args) {
            Ok(()) => Ok(0),
            Err(
                error @ (RuntimeError::Contract(_)
                | RuntimeError::Manifest(_)
                | RuntimeError::Usage(_)
                | RuntimeError::Table { .. }),
            ) => {
                eprintln!("{error}");
                Ok(error.exit_code())
            }
            Err(other) => Err(other),
        },
    }
}

/// `check`: plans' summaries to `out` and problems to `err` (text), or only the
/// problems, as JSON, to `out`; returns the exit status.
pub fn check(files: &[PathBuf], output: Output, out: &mut impl Write, err: &mut impl Write) -> i32 {
    let reading = local::read_all(files);
    if reading.diagnostics.is_empty()
        && reading.manifests.pipelines.is_empty()
        && reading.manifests.processors.is_empty()
    {
        let _ = writeln!(err, "no Pipeline or Processor in the given files");
        return 2;
    }
    let checked = manifest::check(&reading);
    match output {
        Output::Text => {
            for plan in &checked.plans {
                let _ = write!(out, "{}", plan.describe());
            }
            for diagnostic in &checked.diagnostics {
                let _ = writeln!(err, "{diagnostic}");
            }
        }
        Output::Json => {
            // A struct, not `json!`, so that fields keep the documented order.
            #[derive(serde::Serialize)]
            struct Report<'a> {
                diagnostics: &'a [Diagnostic],
            }
            let report = Report {
                diagnostics: &checked.diagnostics,
            };
            match serde_json::to_string(&report) {
                Ok(json) => {
                    let _ = writeln!(out, "{json}");
                }
                Err(error) => {
                    let _ = writeln!(err, "the diagnostics do not serialize: {error}");
                    return 3;
                }
            }
        }
    }
    Diagnostic::exit_status(&checked.diagnostics)
}

/// `plan`: the compiled plan as JSON to `out`, problems to `err`; returns the
/// exit status.
pub fn plan(
    files: &[PathBuf],
    pipeline: Option<&str>,
    out: &mut impl Write,
    err: &mut impl Write,
) -> i32 {
    let compiled = local::read_manifests(files)
        .and_then(|reading| local::compile_pipeline(&reading, pipeline));
    let plan = match compiled {
        Ok(plan) => plan,
        Err(error) => {
            let _ = writeln!(err, "{error}");
            return error.exit_code();
        }
    };
    // The operator's ConfigMap holds exactly this (`plan_json`), which is what
    // `serve --plan` reads.
    match serde_json::to_string_pretty(&plan) {
        Ok(json) => {
            let _ = writeln!(out, "{json}");
            0
        }
        Err(error) => {
            let _ = writeln!(err, "the plan does not serialize: {error}");
            3
        }
    }
}

fn is_stdio(path: &std::path::Path) -> bool {
    path.as_os_str() == "-"
}

/// `run`: local mode.
pub fn run(args: &RunArgs) -> Result<(), RuntimeError> {
    let manifests = local::read_manifests(&args.files)?;
    let plan = local::compile_pipeline(&manifests, args.pipeline.as_deref())?;
    let tables = local::load_tables(&plan, &args.tables)?;
    let mut pipeline = LocalPipeline::new(&plan, &tables, Arc::new(SystemClock))?;

    let (input, length): (Box<dyn BufRead>, Option<u64>) = if is_stdio(&args.input) {
        (
            Box::new(BufReader::with_capacity(1 << 20, std::io::stdin().lock())),
            None,
        )
    } else {
        let file = File::open(&args.input).map_err(|e| {
            RuntimeError::Usage(format!("cannot open input {}: {e}", args.input.display()))
        })?;
        let length = file.metadata().ok().map(|m| m.len());
        (Box::new(BufReader::with_capacity(1 << 20, file)), length)
    };
    let create = |path: &PathBuf| {
        File::create(path)
            .map_err(|e| RuntimeError::Usage(format!("cannot create {}: {e}", path.display())))
    };
    let mut output: Box<dyn Write> = if is_stdio(&args.output) {
        Box::new(BufWriter::with_capacity(1 << 20, std::io::stdout().lock()))
    } else {
        Box::new(BufWriter::with_capacity(1 << 20, create(&args.output)?))
    };
    let targets: Vec<(String, SinkTarget)> = args
        .sinks
        .iter()
        .cloned()
        .chain(
            args.connect
                .iter()
                .map(|name| (name.clone(), SinkTarget::Connect)),
        )
        .collect();
    let mut sinks = LocalSinks::new(&plan, &targets, |path| {
        Ok(if is_stdio(path) {
            Box::new(std::io::stdout()) as Box<dyn Write + Send>
        } else {
            Box::new(BufWriter::new(File::create(path).map_err(|e| {
                RuntimeError::Usage(format!("cannot create {}: {e}", path.display()))
            })?))
        })
    })?;
    let mut dead_letters: Box<dyn Write> = match &args.dead_letters {
        Some(path) if !is_stdio(path) => Box::new(BufWriter::new(create(path)?)),
        _ => Box::new(std::io::stderr()),
    };

    let progress = (!args.quiet && std::io::stderr().is_terminal()).then(|| match length {
        Some(total) => ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {bytes} read, {bytes_per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    });
    let summary = local::run(
        &mut pipeline,
        input,
        &mut output,
        &mut sinks,
        &mut dead_letters,
        |bytes| {
            if let Some(bar) = &progress {
                bar.inc(bytes);
            }
        },
        &args.input,
    )?;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    if !args.quiet {
        eprint!("{}", summary.render());
    }
    Ok(())
}
