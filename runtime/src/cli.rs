//! The command line: `check`, `plan` and `run` (local mode); with the `kafka`
//! feature, `serve` (a stage on Kafka) and `ingest`; with `capture`, `capture`.

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
#[cfg(feature = "kafka")]
pub(crate) mod serve;

pub use avro::SchemaArgs;
#[cfg(feature = "kafka")]
pub(crate) use serve::{
    ServeCli, init_logging, kafka_settings_with_credentials, parse_kafka_property,
};

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
    #[cfg(feature = "kafka")]
    Serve(ServeCli),
    /// Capture a PostgreSQL database's changes into a Kafka topic (what a
    /// pipeline's capture pod runs for `spec.source.postgres`).
    #[cfg(feature = "capture")]
    Capture(crate::capture::cli::CaptureCli),
    /// Serve a pipeline's HTTP ingest endpoint, writing what it accepts into
    /// the source topic (what a pipeline's ingest pods run).
    #[cfg(feature = "kafka")]
    Ingest(crate::ingest::cli::IngestCli),
}

/// How `check` prints what it finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Plans' summaries on stdout; problems on stderr, one per line, with hints.
    Text,
    /// One JSON object on stdout: `{"diagnostics": [...]}`.
    Json,
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
        #[cfg(feature = "kafka")]
        Command::Serve(args) => Ok(serve::serve(args)),
        #[cfg(feature = "capture")]
        Command::Capture(args) => Ok(crate::capture::cli::capture(args)),
        #[cfg(feature = "kafka")]
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
