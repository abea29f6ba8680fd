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

pub mod avro;

pub use avro::SchemaArgs;

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
    /// A pipeline whose source is Avro (`spec.source.format: avro`) is
    /// checked against its reader schema, as the operator checks it: the
    /// `--schema-file`, else the registry's (`--registry`, else the
    /// manifest's `spec.schemaRegistry.url`); the text output says which, as
    /// `NAME: source schema: the Avro schema SUBJECT version N (from ORIGIN)`.
    /// When that schema cannot be had, the pipeline is not checked: a
    /// diagnostic at `spec.source.format` says why (kind `source-schema`).
    ///
    /// Exit status: 0 when every manifest is valid, 1 on schema or contract
    /// errors (and Avro sources without a schema), 2 when a file cannot be
    /// read (missing, or not YAML) or the flags are wrong.
    Check {
        /// Files holding Pipeline and Processor manifests (multi-document YAML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// How to print problems: `text` for people, `json` for editors and CI.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[command(flatten)]
        schemas: SchemaArgs,
    },
    /// Print a pipeline's compiled plan as JSON, exactly as the operator stores it
    /// for the runtime, so that plans can be diffed in review and given to
    /// `serve --plan` without a cluster.
    ///
    /// One pipeline per invocation: with several in the files, name it with
    /// `--pipeline`. Problems are printed and exit as with `check`. A
    /// pipeline that uses Avro gets the plan's Avro parts as the operator
    /// fills them: the source's reader schema (from `--schema-file` or the
    /// registry, as for `check`) and each Avro sink's schema derived from its
    /// output contract, with the manifest's registry (else `--registry`).
    Plan {
        /// Files holding the Pipeline and the Processors it references.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The pipeline to compile when the files hold several.
        #[arg(long)]
        pipeline: Option<String>,
        #[command(flatten)]
        schemas: SchemaArgs,
    },
    /// Run a pipeline locally on JSON lines, with no cluster and no Kafka.
    Run(RunArgs),
    /// Run one stage of a compiled plan on Kafka (what a runtime pod runs).
    Serve(ServeCli),
    /// Capture a PostgreSQL database's changes into a Kafka topic (what a
    /// pipeline's capture pod runs for `spec.source.postgres`).
    Capture(crate::capture::cli::CaptureCli),
    /// Serve a pipeline's HTTP ingest endpoint, writing what it accepts into
    /// the source topic (what a pipeline's ingest pods run).
    Ingest(crate::ingest::cli::IngestCli),
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

fn serve(args: ServeCli) -> i32 {
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

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Files holding the Pipeline and the Processors it references.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Input events, one JSON object per line; `-` for stdin. A file named
    /// `*.avro` is read as an Avro container file, each record an event.
    #[arg(long, short, required_unless_present = "listen")]
    pub input: Option<PathBuf>,
    /// Instead of `--input`: serve the pipeline's HTTP ingest endpoint on this
    /// address (`127.0.0.1:8080`) and run what it accepts, until Ctrl-C. Each
    /// request (one JSON object, an array, or NDJSON) is checked against the
    /// source schema and key and answered once its events were processed.
    #[arg(long, value_name = "ADDR", conflicts_with = "input")]
    pub listen: Option<std::net::SocketAddr>,
    /// Where events reaching the sinks go, as JSON lines; `-` for stdout. A
    /// file named `*.avro` is written as an Avro container file whose schema
    /// is derived from the output contract.
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
    /// Bytes of held-back events (those `order` steps wait with) past which
    /// the instance stops reading input until its timers have released
    /// enough, e.g. `256MiB`. Default: half the container's memory limit
    /// (cgroup v2), or 256MiB when there is none.
    #[arg(long, env = "KEYSTONE_MAX_BUFFERED_BYTES", value_name = "SIZE")]
    pub max_buffered_bytes: Option<crate::buffers::Size>,
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
        Command::Check {
            files,
            output,
            schemas,
        } => Ok(check(
            &files,
            output,
            &schemas,
            &mut std::io::stdout(),
            &mut std::io::stderr(),
        )),
        Command::Plan {
            files,
            pipeline,
            schemas,
        } => Ok(plan(
            &files,
            pipeline.as_deref(),
            &schemas,
            &mut std::io::stdout(),
            &mut std::io::stderr(),
        )),
        Command::Serve(args) => Ok(serve(args)),
        Command::Capture(args) => Ok(crate::capture::cli::capture(args)),
        Command::Ingest(args) => Ok(crate::ingest::cli::ingest(args)),
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

/// `check`: plans' summaries (and the schema each Avro source was checked
/// against) to `out` and problems to `err` (text), or only the problems, as
/// JSON, to `out`; returns the exit status.
pub fn check(
    files: &[PathBuf],
    output: Output,
    schemas: &SchemaArgs,
    out: &mut impl Write,
    err: &mut impl Write,
) -> i32 {
    let reading = local::read_all(files);
    if reading.diagnostics.is_empty()
        && reading.manifests.pipelines.is_empty()
        && reading.manifests.processors.is_empty()
    {
        let _ = writeln!(err, "no Pipeline or Processor in the given files");
        return 2;
    }
    let sources = match avro::Sources::resolve(&reading, schemas, None) {
        Ok(sources) => sources,
        Err(usage) => {
            let _ = writeln!(err, "{usage}");
            return 2;
        }
    };
    let checked = manifest::check_with(&reading, |index| sources.facts(index));
    match output {
        Output::Text => {
            for plan in &checked.plans {
                let _ = write!(out, "{}", plan.describe());
                if let Some(line) = sources.describe(&reading, plan) {
                    let _ = writeln!(out, "{line}");
                }
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
    schemas: &SchemaArgs,
    out: &mut impl Write,
    err: &mut impl Write,
) -> i32 {
    let compiled = local::read_manifests(files).and_then(|reading| {
        let index = local::select_pipeline(&reading, pipeline)?;
        let sources = avro::Sources::resolve(&reading, schemas, Some(index))
            .map_err(RuntimeError::Usage)?;
        let manifest_error = |diagnostics| {
            RuntimeError::Manifest(manifest::ManifestErrors(reading.sorted(diagnostics)))
        };
        let mut plan = sources
            .facts(index)
            .and_then(|facts| reading.compile_with(index, &facts))
            .map_err(manifest_error)?;
        let pipeline = &reading.manifests.pipelines[index];
        match avro::plan_registry(pipeline, schemas) {
            Some(registry) => {
                let reader = sources.reader(index);
                keystone_avro::plan::complete_plan(&mut plan, &registry, reader).map_err(
                    |errors| {
                        let origin = &reading.pipeline_origins[index];
                        manifest_error(
                            errors
                                .iter()
                                .map(|error| avro::diagnostic(origin, error))
                                .collect(),
                        )
                    },
                )?;
            }
            None if keystone_avro::plan::uses_avro(pipeline) => {
                let _ = writeln!(
                    err,
                    "note: {} uses Avro but names no schema registry (spec.schemaRegistry; the operator takes its Kafka cluster's): the plan's Avro parts are left out; --registry URL fills them",
                    pipeline.metadata.name.as_deref().unwrap_or("the pipeline")
                );
            }
            None => {}
        }
        Ok(plan)
    });
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

/// A regular file's identity: device and inode when it exists (so that
/// symlinks and hard links to one file are one), else its canonical parent and
/// name. `None` for what is not a regular file (a terminal, a pipe, /dev/null):
/// writing those truncates nothing, and two outputs may share one.
fn file_identity(path: &std::path::Path) -> Option<FileIdentity> {
    use std::os::unix::fs::MetadataExt;
    if let Ok(meta) = std::fs::metadata(path) {
        return meta
            .is_file()
            .then(|| FileIdentity::Inode(meta.dev(), meta.ino()));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let name = path.file_name()?;
    Some(FileIdentity::Path(
        std::fs::canonicalize(parent).ok()?.join(name),
    ))
}

#[derive(PartialEq, Eq)]
enum FileIdentity {
    Inode(u64, u64),
    Path(PathBuf),
}

/// Refuses a run whose outputs name one of its inputs (creating the output would
/// truncate the input before it is read) or each other (they would overwrite
/// each other). Checked before any file is opened for writing.
fn refuse_overlapping_files(args: &RunArgs) -> Result<(), RuntimeError> {
    let mut inputs: Vec<(String, &std::path::Path)> = Vec::new();
    if let Some(input) = args.input.as_deref().filter(|i| !is_stdio(i)) {
        inputs.push(("the --input file".into(), input));
    }
    for file in &args.files {
        inputs.push(("the manifest file".into(), file));
    }
    for (name, file) in &args.tables {
        inputs.push((format!("the rows of --table {name}"), file));
    }
    let mut outputs: Vec<(String, &std::path::Path)> = Vec::new();
    if !is_stdio(&args.output) {
        outputs.push(("--output".into(), &args.output));
    }
    if let Some(path) = args.dead_letters.as_deref().filter(|p| !is_stdio(p)) {
        outputs.push(("--dead-letters".into(), path));
    }
    for (name, target) in &args.sinks {
        if let SinkTarget::File(path) = target
            && !is_stdio(path)
        {
            outputs.push((format!("--sink {name}"), path));
        }
    }
    let inputs: Vec<_> = inputs
        .into_iter()
        .filter_map(|(what, path)| file_identity(path).map(|id| (what, path, id)))
        .collect();
    let mut seen: Vec<(String, &std::path::Path, FileIdentity)> = Vec::new();
    for (what, path) in outputs {
        let Some(id) = file_identity(path) else {
            continue;
        };
        if let Some((input, input_path, _)) = inputs.iter().find(|(_, _, i)| *i == id) {
            return Err(RuntimeError::Usage(format!(
                "{what} {} is {input} {}: writing it would destroy the input before it is read; write to another file",
                path.display(),
                input_path.display()
            )));
        }
        if let Some((other, other_path, _)) = seen.iter().find(|(_, _, i)| *i == id) {
            return Err(RuntimeError::Usage(format!(
                "{what} {} is the same file as {other} {}: give each output its own file",
                path.display(),
                other_path.display()
            )));
        }
        seen.push((what, path, id));
    }
    Ok(())
}

/// `run`: local mode.
pub fn run(args: &RunArgs) -> Result<(), RuntimeError> {
    refuse_overlapping_files(args)?;
    let manifests = local::read_manifests(&args.files)?;
    let plan = local::compile_pipeline(&manifests, args.pipeline.as_deref())?;
    let tables = local::load_tables(&plan, &args.tables)?;
    let mut pipeline = LocalPipeline::new(&plan, &tables, Arc::new(SystemClock))?;
    if let Some(limit) = args.max_buffered_bytes {
        pipeline = pipeline.with_buffer_limit(limit.0);
    }
    let input_path = args.input.clone().unwrap_or_else(|| PathBuf::from("-"));
    let (input, length): (Box<dyn BufRead>, Option<u64>) = if args.listen.is_some() {
        (Box::new(std::io::empty()), None)
    } else if is_stdio(&input_path) {
        (
            Box::new(BufReader::with_capacity(1 << 20, std::io::stdin().lock())),
            None,
        )
    } else {
        let file = File::open(&input_path).map_err(|e| {
            RuntimeError::Usage(format!("cannot open input {}: {e}", input_path.display()))
        })?;
        let length = file.metadata().ok().map(|m| m.len());
        if local::avro::is_avro(&input_path) {
            // Progress counts the JSON read, not the file's bytes: no total.
            let records = local::avro::AvroLines::new(BufReader::new(file), &input_path)?;
            (Box::new(BufReader::with_capacity(1 << 20, records)), None)
        } else {
            (Box::new(BufReader::with_capacity(1 << 20, file)), length)
        }
    };
    let create = |path: &PathBuf| {
        File::create(path)
            .map_err(|e| RuntimeError::Usage(format!("cannot create {}: {e}", path.display())))
    };
    let mut output: Box<dyn Write> = if is_stdio(&args.output) {
        Box::new(BufWriter::with_capacity(1 << 20, std::io::stdout().lock()))
    } else if local::avro::is_avro(&args.output) {
        let schema = local::avro::output_schema(&plan)?;
        Box::new(local::avro::AvroRecords::new(
            BufWriter::with_capacity(1 << 20, create(&args.output)?),
            schema,
        )?)
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

    if let Some(addr) = args.listen {
        let summary = local::listen::listen(
            &plan,
            &mut pipeline,
            &mut output,
            &mut sinks,
            &mut dead_letters,
            addr,
            |bound, path| {
                let unused = match plan.ingest.as_ref() {
                    Some(http) if http.tls.is_some() => " (no tokens or TLS in local mode)",
                    Some(_) => " (no tokens in local mode)",
                    None => "",
                };
                eprintln!(
                    "listening on http://{bound}{path}{unused}: POST events (a JSON object, an array, or NDJSON); Ctrl-C stops"
                )
            },
        )?;
        if !args.quiet {
            eprint!("{}", summary.render());
        }
        return Ok(());
    }
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
        &input_path,
    )?;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    if !args.quiet {
        eprint!("{}", summary.render());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

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
