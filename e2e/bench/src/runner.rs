//! The runner: for each scenario, every engine in turn (A B C A B C ...), warm-up
//! rounds first, each run's output digested and compared with the reference.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::Args;

use crate::GenArgs;
use crate::digest::{self, OutputDigest};
use crate::generate::{self, Dataset};
use crate::measure::{self, Limits, Measured};
use crate::report::{self, EngineSummary, RatioSummary, Results, RunRecord, ScenarioResult, Stat};
use crate::scenario::{self, Engine, Scenario};

pub const PEERS: [&str; 3] = ["flink", "kstreams", "flink-opensearch"];
pub const FLINK_VERSION: &str = "2.3.0";
/// S9's Flink: no OpenSearch connector is published for Flink 2.x.
pub const FLINK_SEARCH_VERSION: &str = "1.19.3";
pub const KAFKA_STREAMS_VERSION: &str = "4.1.1";

#[derive(Debug, Args)]
pub struct RunArgs {
    /// S1..S8, a comma-separated list, or `all`. S5-S8 are reported as not measured yet.
    #[arg(long, default_value = "all")]
    pub scenario: String,
    #[command(flatten)]
    pub data: GenArgs,
    /// Measured runs per engine, after the warm-up rounds.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Warm-up rounds per engine (run and checked, not counted).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Cores every engine is pinned to (`taskset -c`).
    #[arg(long, default_value = "0,1")]
    pub cpus: String,
    /// Memory limit of every engine process (a memory cgroup), MiB.
    #[arg(long, default_value_t = 4096)]
    pub mem_limit_mib: u64,
    /// JVM heap (-Xms and -Xmx) of the peers.
    #[arg(long, default_value = "2g")]
    pub jvm_heap: String,
    /// Parallelism of the peers; Keystone's local mode runs one instance per stage.
    #[arg(long, default_value_t = 1)]
    pub parallelism: u32,
    /// Only these engines (comma-separated: keystone, flink-heap, flink-rocksdb, kafka-streams-ttd).
    #[arg(long)]
    pub engines: Option<String>,
    /// The keystone-runtime binary; target/release/keystone-runtime by default.
    #[arg(long)]
    pub runtime_bin: Option<PathBuf>,
    /// Where RESULTS.md and RESULTS.json go; e2e/bench by default. Scenarios not run
    /// keep their previous results.
    #[arg(long)]
    pub results_dir: Option<PathBuf>,
    /// Kafka bootstrap servers for S5 and S6 (the testbed's: `eval "$(e2e/testbed env)"`).
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:19092"
    )]
    pub brokers: String,
    /// Give up on a Kafka-mode run after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub kafka_timeout_s: u64,
    /// S7: the fixed input rate, events/s.
    #[arg(long, default_value_t = 5000.0)]
    pub latency_rate: f64,
    /// S7: seconds measured after the warm-up.
    #[arg(long, default_value_t = 30.0)]
    pub latency_secs: f64,
    /// S9: the OpenSearch (or Elasticsearch) endpoint (the testbed's: `eval "$(e2e/testbed env)"`).
    #[arg(
        long,
        env = "KEYSTONE_OPENSEARCH_URL",
        default_value = "http://127.0.0.1:19200"
    )]
    pub search_url: String,
    /// S9: concurrent connections of the plain bulk loader (the ceiling).
    #[arg(long, default_value_t = 4)]
    pub bulk_concurrency: usize,
}

pub fn bench_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn repo_dir() -> PathBuf {
    bench_dir().join("../..")
}

/// Builds a peer with Maven into the cache folder; returns its class path.
pub fn build_peer(name: &str, rebuild: bool) -> anyhow::Result<String> {
    let out = generate::cache_dir().join("peers").join(name);
    let cp_file = out.join("classpath.txt");
    let src = bench_dir().join("peers").join(name);
    let newest_source = newest_mtime(&src)?;
    let built = std::fs::metadata(&cp_file).and_then(|m| m.modified()).ok();
    if rebuild || built.is_none_or(|b| b < newest_source) {
        eprintln!("building the {name} peer with Maven into {}", out.display());
        let status = Command::new("mvn")
            .args(["-B", "-q", "package"])
            .arg(format!("-Dbench.out={}", out.display()))
            .current_dir(&src)
            .status()
            .context("running mvn (is Maven installed?)")?;
        if !status.success() {
            bail!("building the {name} peer failed");
        }
        // Touch the class path so that it is newer than the sources.
        let text = std::fs::read_to_string(&cp_file)?;
        std::fs::write(&cp_file, text)?;
    }
    let deps = std::fs::read_to_string(&cp_file)?;
    Ok(format!("{}:{}", out.join("classes").display(), deps.trim()))
}

fn newest_mtime(dir: &Path) -> anyhow::Result<std::time::SystemTime> {
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        let t = if meta.is_dir() {
            newest_mtime(&entry.path())?
        } else {
            meta.modified()?
        };
        newest = newest.max(t);
    }
    Ok(newest)
}

struct Ctx<'a> {
    args: &'a RunArgs,
    data: &'a Dataset,
    limits: &'a Limits,
    runtime_bin: PathBuf,
    flink_cp: Option<String>,
    kstreams_cp: Option<String>,
    /// The S9 Flink peer's class path; only the Kafka-mode scenarios use it.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    flink_search_cp: Option<String>,
    scratch: PathBuf,
}

impl Ctx<'_> {
    fn config_text(&self, s: Scenario, engine: Engine) -> String {
        let a = self.args;
        match engine {
            Engine::Keystone if s.is_search() => format!(
                "keystone-runtime serve (release build, one process running the stage of the plan compiled from pipelines/s9-kafka-search.yaml: dedup, order, project, the elasticsearch sink: bulk requests of 1,000 documents or 5 MB sent concurrently (external versions make their order irrelevant) up to 32 MB in flight, every request flushed and answered before the offsets are committed every commitInterval (1 s): at-least-once delivery into idempotent writes) against Kafka 4.1.1 at {} and OpenSearch at {}",
                a.brokers, a.search_url
            ),
            Engine::FlinkSearch => format!(
                "Flink {FLINK_SEARCH_VERSION} DataStream on a local MiniCluster (peers/flink-opensearch S9Job; no OpenSearch connector exists for Flink 2.x), flink-connector-kafka 3.3.0-1.19 (KafkaSource from the earliest offset, a new group), the S2 dedup and S3 reorder KeyedProcessFunctions of peers/flink, flink-connector-opensearch2 2.0.0-1.19 (Opensearch2Sink: 1,000 actions or 5 MB per bulk request, no time-based flush, the connector's BulkProcessor with 0 concurrent requests i.e. a bulk request blocks the task; flushed on every checkpoint, DeliveryGuarantee.AT_LEAST_ONCE; a 409 version conflict counts as applied), checkpoints every 1 s (AT_LEAST_ONCE mode, file storage), parallelism {}, object reuse on, heap state, JVM -Xms{h} -Xmx{h}, Jackson 2.21.3",
                a.parallelism,
                h = a.jvm_heap
            ),
            Engine::BulkCeiling => format!(
                "keystone-bench search-ceiling: the final documents already projected, each order's changes in sequence order, 1,000 per bulk request with id and external version, on {} keep-alive HTTP/1.1 connections (documents routed by order id), request bodies built before the clock starts; no Kafka, no parsing of events",
                a.bulk_concurrency
            ),
            Engine::Keystone if !s.is_engine_only() => format!(
                "keystone-runtime serve (release build, one process running the stage of the plan compiled from the scenario's pipeline; librdkafka producer acks=all, idempotent, lz4, linger 5 ms; at-least-once: every commitInterval (1 s) the offsets of that moment are committed (async) once the outputs sent before them are acknowledged, without pausing consumption; exactly-once: 1 s transactions) against the single-broker Kafka 4.1.1 at {}",
                a.brokers
            ),
            Engine::Keystone => "keystone-runtime run (local mode, one instance per stage; the steps on a second thread, reading, parsing, checking and writing on the first), release build; pipeline e2e/bench/pipelines/*.yaml".to_owned(),
            Engine::FlinkHeap | Engine::FlinkRocksDb => format!(
                "Flink {FLINK_VERSION} DataStream on a local MiniCluster, parallelism {}, object reuse on, state backend {}, no checkpoints (local mode has none), JVM -Xms{h} -Xmx{h} (default G1), Jackson {}",
                a.parallelism,
                if engine == Engine::FlinkHeap {
                    "hashmap (heap)"
                } else {
                    "rocksdb (defaults: managed memory, RocksDB timers)"
                },
                "2.21.3",
                h = a.jvm_heap
            ),
            Engine::KafkaStreamsTtd => format!(
                "Kafka Streams {KAFKA_STREAMS_VERSION} topology driven by TopologyTestDriver (engine only: no broker, one thread, records piped one by one and their output drained every 10k; the driver commits after every record, which a real app does only every commit.interval.ms, so this ratio overstates Keystone's lead), JVM -Xms{h} -Xmx{h}",
                h = a.jvm_heap
            ),
            Engine::FlinkKafka => format!(
                "Flink {FLINK_VERSION} DataStream on a local MiniCluster, flink-connector-kafka 5.0.0-2.2 (KafkaSource from the earliest offset, a new group; KafkaSink, at-least-once for S5, exactly-once for S6 with transactional id prefix per run), parallelism {}, object reuse on, heap state, checkpoints every 1 s to a file checkpoint storage (S5 AT_LEAST_ONCE mode, S6 EXACTLY_ONCE), JVM -Xms{h} -Xmx{h}, Jackson 2.21.3",
                a.parallelism,
                h = a.jvm_heap
            ),
            Engine::KafkaStreams => format!(
                "Kafka Streams {KAFKA_STREAMS_VERSION} KafkaStreams application (peers/kstreams KafkaApp), num.stream.threads {}, commit.interval.ms 1000, processing.guarantee at_least_once (S5) or exactly_once_v2 (S6), in-memory key-value store with its changelog topic, JVM -Xms{h} -Xmx{h}",
                a.parallelism,
                h = a.jvm_heap
            ),
        }
    }

    fn command(&self, s: Scenario, engine: Engine, input: &Path, output: &Path) -> Vec<String> {
        let p = |x: &Path| x.display().to_string();
        let sid = s.id().to_ascii_lowercase();
        match engine {
            Engine::Keystone => {
                let mut v = vec![
                    p(&self.runtime_bin),
                    "run".into(),
                    p(&s.pipeline(&bench_dir())),
                    "--input".into(),
                    p(input),
                    "--output".into(),
                    p(output),
                    "--dead-letters".into(),
                    p(&self.scratch.join("dead-letters.jsonl")),
                    "--quiet".into(),
                ];
                if s.needs_table() {
                    v.push("--table".into());
                    v.push(format!("customers={}", p(&self.data.table)));
                }
                v
            }
            Engine::FlinkHeap | Engine::FlinkRocksDb | Engine::KafkaStreamsTtd => {
                let (cp, main) = if engine == Engine::KafkaStreamsTtd {
                    (
                        self.kstreams_cp.clone(),
                        "dev.keystone.bench.kstreams.BenchTopology",
                    )
                } else {
                    (self.flink_cp.clone(), "dev.keystone.bench.flink.BenchJob")
                };
                let backend = if engine == Engine::FlinkHeap {
                    "heap"
                } else {
                    "rocksdb"
                };
                vec![
                    "java".into(),
                    format!("-Xms{}", self.args.jvm_heap),
                    format!("-Xmx{}", self.args.jvm_heap),
                    "-cp".into(),
                    cp.unwrap_or_default(),
                    main.into(),
                    "--scenario".into(),
                    sid,
                    "--input".into(),
                    p(input),
                    "--output".into(),
                    p(output),
                    "--table".into(),
                    p(&self.data.table),
                    "--backend".into(),
                    backend.into(),
                    "--parallelism".into(),
                    self.args.parallelism.to_string(),
                ]
            }
            Engine::FlinkKafka
            | Engine::KafkaStreams
            | Engine::FlinkSearch
            | Engine::BulkCeiling => {
                unreachable!("Kafka-mode engines are driven by kafka_run and search_run")
            }
        }
    }
}

fn output_files(output: &Path) -> Vec<PathBuf> {
    if output.exists() {
        return vec![output.to_path_buf()];
    }
    (0..1024)
        .map(|i| PathBuf::from(format!("{}.{i}", output.display())))
        .take_while(|p| p.exists())
        .collect()
}

fn clear_outputs(output: &Path) {
    let _ = std::fs::remove_file(output);
    for f in output_files(output) {
        let _ = std::fs::remove_file(f);
    }
}

fn job_seconds(stdout: &str) -> Option<f64> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("KSBENCH_JOB_MS "))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .next_back()
        .map(|ms| ms / 1000.0)
}

fn one_run(
    ctx: &Ctx,
    s: Scenario,
    engine: Engine,
    input: &Path,
    events: u64,
    reference: Option<&OutputDigest>,
) -> anyhow::Result<(Measured, RunRecord)> {
    let output = ctx
        .scratch
        .join(format!("{}-{}.out.jsonl", s.id(), engine.name()));
    clear_outputs(&output);
    let argv = ctx.command(s, engine, input, &output);
    let m = measure::run(&argv, ctx.limits, &ctx.scratch)?;
    let mut record = RunRecord {
        round: 0,
        warmup: false,
        engine: engine.name().into(),
        wall_s: m.wall_s,
        engine_s: m.wall_s,
        time_basis: "wall".into(),
        cpu_s: m.cpu_s,
        peak_rss_mib: m.peak_rss_mib,
        events_per_s: 0.0,
        cpu_s_per_m_events: 0.0,
        output: None,
        digest_ok: false,
        loadavg_1m: m.loadavg_1m,
        error: None,
        latency_p50_ms: None,
        latency_p99_ms: None,
        search_cpu_s: None,
        search_actions: None,
    };
    if engine != Engine::Keystone
        && let Some(job) = job_seconds(&m.stdout)
    {
        record.engine_s = job;
        record.time_basis = "job (net runtime reported by the engine)".into();
    }
    if events > 0 {
        record.events_per_s = events as f64 / record.engine_s;
        record.cpu_s_per_m_events = m.cpu_s / (events as f64 / 1e6);
    }
    if !m.exit_ok {
        record.error = Some(format!("exited with an error:\n{}", m.stderr_tail));
        return Ok((m, record));
    }
    if let Some(reference) = reference {
        match digest::digest_files(&output_files(&output), s.digest_mode()) {
            Ok(d) => {
                record.digest_ok = &d == reference;
                if !record.digest_ok {
                    record.error = Some(format!(
                        "output digest {} ({} lines) differs from the reference {} ({} lines)",
                        d.sha256, d.lines, reference.sha256, reference.lines
                    ));
                }
                record.output = Some(d);
            }
            Err(e) => record.error = Some(format!("cannot digest the output: {e:#}")),
        }
    } else {
        record.digest_ok = true;
    }
    clear_outputs(&output);
    Ok((m, record))
}

/// The warm-up and measured rounds, every engine once per round in turn.
fn rounds(
    ctx: &Ctx,
    s: Scenario,
    engines: &[Engine],
    mut run: impl FnMut(Engine, usize) -> anyhow::Result<RunRecord>,
) -> anyhow::Result<Vec<RunRecord>> {
    let args = ctx.args;
    let mut runs = Vec::new();
    for round in 0..args.warmup + args.runs {
        for &engine in engines {
            let mut rec = run(engine, round)?;
            rec.round = round;
            rec.warmup = round < args.warmup;
            print_run(s, &rec);
            runs.push(rec);
        }
    }
    Ok(runs)
}

/// One line of progress per run, on stderr.
fn print_run(s: Scenario, rec: &RunRecord) {
    let basis = rec.time_basis.split([' ', ':']).next().unwrap_or("wall");
    eprintln!(
        "[{}] round {}{} {:<18} {:>10.0} ev/s ({basis} {:.2}s, wall {:.2}s) cpu {:.2}s rss {:.0} MiB load {:.2} {}",
        s.id(),
        rec.round,
        if rec.warmup { " (warm-up)" } else { "" },
        rec.engine,
        rec.events_per_s,
        rec.engine_s,
        rec.wall_s,
        rec.cpu_s,
        rec.peak_rss_mib,
        rec.loadavg_1m,
        match &rec.error {
            None => "digest ok".to_owned(),
            Some(e) => format!("FAILED: {e}"),
        }
    );
}

fn engine_selected(args: &RunArgs, engine: Engine) -> bool {
    match &args.engines {
        None => true,
        Some(list) => list.split(',').any(|e| e.trim() == engine.name()),
    }
}

fn run_scenario(ctx: &Ctx, s: Scenario) -> anyhow::Result<ScenarioResult> {
    let args = ctx.args;
    let input = s.input(ctx.data);
    let events = count_lines(&input)?;
    eprintln!("[{}] {}: computing the reference output", s.id(), s.title());
    let reference = s.reference(ctx.data)?;
    let engines: Vec<Engine> = s
        .engines()
        .into_iter()
        .filter(|e| engine_selected(args, *e))
        .collect();
    let load_start = measure::loadavg();

    // Start-up cost: each engine on an empty input (reported, not subtracted).
    let empty = ctx.scratch.join("empty.jsonl");
    std::fs::write(&empty, b"")?;
    let mut startup = Vec::new();
    for &engine in &engines {
        let (_, rec) = one_run(ctx, s, engine, &empty, 0, None)?;
        eprintln!(
            "[{}] {:<18} empty input: wall {:.2}s cpu {:.2}s rss {:.0} MiB{}",
            s.id(),
            engine.name(),
            rec.wall_s,
            rec.cpu_s,
            rec.peak_rss_mib,
            rec.error
                .as_deref()
                .map(|e| format!(" ERROR {e}"))
                .unwrap_or_default()
        );
        startup.push(rec);
    }

    let runs = rounds(ctx, s, &engines, |engine, _| {
        Ok(one_run(ctx, s, engine, &input, events, Some(&reference))?.1)
    })?;
    let load_end = measure::loadavg();
    summarize(
        ctx,
        s,
        Summary {
            engines,
            input,
            events,
            reference,
            load_start,
            load_end,
            startup,
            runs,
        },
    )
}

/// What a scenario's runs produced, to be summarized.
struct Summary {
    engines: Vec<Engine>,
    input: PathBuf,
    events: u64,
    reference: OutputDigest,
    load_start: f64,
    load_end: f64,
    startup: Vec<RunRecord>,
    runs: Vec<RunRecord>,
}

fn summarize(ctx: &Ctx, s: Scenario, sum: Summary) -> anyhow::Result<ScenarioResult> {
    let args = ctx.args;
    let Summary {
        engines,
        input,
        events,
        reference,
        load_start,
        load_end,
        startup,
        runs,
    } = sum;
    let measured: Vec<&RunRecord> = runs.iter().filter(|r| !r.warmup).collect();
    let summaries: Vec<EngineSummary> = engines
        .iter()
        .map(|&engine| {
            let mine: Vec<&&RunRecord> = measured
                .iter()
                .filter(|r| r.engine == engine.name())
                .collect();
            let ok: Vec<&&RunRecord> = mine.iter().copied().filter(|r| r.digest_ok).collect();
            EngineSummary {
                engine: engine.name().into(),
                config: ctx.config_text(s, engine),
                runs: mine.len(),
                failed_runs: mine.len() - ok.len(),
                time_basis: ok.first().map(|r| r.time_basis.clone()).unwrap_or_default(),
                events_per_s: Stat::of(ok.iter().map(|r| r.events_per_s)),
                events_per_s_wall: Stat::of(ok.iter().map(|r| events as f64 / r.wall_s)),
                cpu_s_per_m_events: Stat::of(ok.iter().map(|r| r.cpu_s_per_m_events)),
                peak_rss_mib: Stat::of(ok.iter().map(|r| r.peak_rss_mib)),
                wall_s: Stat::of(ok.iter().map(|r| r.wall_s)),
            }
        })
        .collect();

    let mut ratios = Vec::new();
    if engines.contains(&Engine::Keystone) {
        for &peer in engines.iter().filter(|e| **e != Engine::Keystone) {
            let target = s
                .targets()
                .into_iter()
                .find(|t| t.peer == peer)
                .map(|t| t.ratio);
            let mut per_pair = Vec::new();
            let mut per_pair_wall = Vec::new();
            let mut cpu_per_pair = Vec::new();
            let mut failed_pairs = 0;
            for round in args.warmup..args.warmup + args.runs {
                let find = |e: Engine| {
                    measured
                        .iter()
                        .find(|r| r.round == round && r.engine == e.name())
                };
                let (Some(k), Some(p)) = (find(Engine::Keystone), find(peer)) else {
                    continue;
                };
                if !(k.digest_ok && p.digest_ok) {
                    failed_pairs += 1;
                    continue;
                }
                per_pair.push(k.events_per_s / p.events_per_s);
                per_pair_wall.push(p.wall_s / k.wall_s);
                cpu_per_pair.push(p.cpu_s_per_m_events / k.cpu_s_per_m_events);
            }
            let stat = Stat::of(per_pair.iter().copied());
            ratios.push(RatioSummary {
                peer: peer.name().into(),
                failed_pairs,
                met: match (target, stat.as_ref()) {
                    (Some(t), Some(st)) if failed_pairs == 0 => Some(st.median >= t),
                    (Some(_), _) => Some(false),
                    _ => None,
                },
                target,
                events_per_s: stat,
                events_per_s_per_pair: per_pair,
                wall_ratio: Stat::of(per_pair_wall.iter().copied()),
                cpu_ratio: Stat::of(cpu_per_pair.iter().copied()),
            });
        }
    }
    let failed = runs.iter().any(|r| !r.digest_ok);
    Ok(ScenarioResult {
        id: s.id().into(),
        title: s.title().into(),
        target: s.target_text().into(),
        status: if failed {
            "failed".into()
        } else {
            "measured".into()
        },
        reason: if failed {
            "at least one run's output did not match the reference (see runs)".into()
        } else {
            String::new()
        },
        input: Some(report::InputInfo {
            path: input.display().to_string(),
            events,
            bytes: std::fs::metadata(&input)?.len(),
        }),
        pipeline: Some(
            s.pipeline(&bench_dir())
                .strip_prefix(repo_dir())
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| s.pipeline(Path::new("e2e/bench")).display().to_string()),
        ),
        runtime_bin: Some(ctx.runtime_bin.display().to_string()),
        reference: Some(reference),
        loadavg_start: Some(load_start),
        loadavg_end: Some(load_end),
        engines: summaries,
        ratios,
        startup,
        runs,
        notes: None,
    })
}

fn count_lines(path: &Path) -> anyhow::Result<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        n += buf[..k].iter().filter(|b| **b == b'\n').count() as u64;
    }
    Ok(n)
}

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let scenarios: Vec<Scenario> = if args.scenario.eq_ignore_ascii_case("all") {
        scenario::ALL.to_vec()
    } else {
        args.scenario
            .split(',')
            .map(|s| Scenario::parse(s.trim()))
            .collect::<anyhow::Result<_>>()?
    };
    let results_dir = args.results_dir.clone().unwrap_or_else(bench_dir);
    let data = generate::ensure(&args.data.config())?;
    eprintln!("input in {}", data.dir.display());
    let runtime_bin = args
        .runtime_bin
        .clone()
        .unwrap_or_else(|| repo_dir().join("target/release/keystone-runtime"));
    let engine_only: Vec<Scenario> = scenarios
        .iter()
        .copied()
        .filter(|s| s.is_engine_only())
        .collect();
    let wanted = |e: Engine| {
        engine_only
            .iter()
            .any(|s| s.engines().contains(&e) && engine_selected(args, e))
    };
    if wanted(Engine::Keystone) && !runtime_bin.exists() {
        bail!(
            "{} does not exist: build it with `cargo build --release -p keystone-runtime`",
            runtime_bin.display()
        );
    }
    let flink_cp = if wanted(Engine::FlinkHeap) || wanted(Engine::FlinkRocksDb) {
        Some(build_peer("flink", false)?)
    } else {
        None
    };
    let kafka_wanted = |e: Engine| {
        scenarios
            .iter()
            .any(|s| !s.is_engine_only() && s.engines().contains(&e) && engine_selected(args, e))
    };
    let flink_cp = match flink_cp {
        None if kafka_wanted(Engine::FlinkKafka) => Some(build_peer("flink", false)?),
        cp => cp,
    };
    let kstreams_cp = if wanted(Engine::KafkaStreamsTtd) || kafka_wanted(Engine::KafkaStreams) {
        Some(build_peer("kstreams", false)?)
    } else {
        None
    };
    let flink_search_cp = if kafka_wanted(Engine::FlinkSearch) {
        Some(build_peer("flink-opensearch", false)?)
    } else {
        None
    };
    let scratch = generate::cache_dir().join("out");
    std::fs::create_dir_all(&scratch)?;
    let limits = Limits::new(&args.cpus, args.mem_limit_mib);
    eprintln!("limits: {}", limits.how);
    let ctx = Ctx {
        args,
        data: &data,
        limits: &limits,
        runtime_bin,
        flink_cp,
        kstreams_cp,
        flink_search_cp,
        scratch,
    };
    let mut results = Results::load_or_new(&results_dir.join("RESULTS.json"))?;
    let outcome = (|| -> anyhow::Result<()> {
        for &s in &scenarios {
            let result = if s.is_engine_only() {
                run_scenario(&ctx, s)?
            } else if s.is_kafka() {
                run_kafka_scenario(&ctx, s)?
            } else if s == Scenario::S7 {
                run_latency_scenario(&ctx, s)?
            } else if s.is_search() {
                run_search_scenario(&ctx, s)?
            } else {
                // Not measured by this command: keep what the results file says.
                continue;
            };
            results.put(result);
            results.stamp(args, &data, &limits);
            results.write(&results_dir)?;
        }
        Ok(())
    })();
    limits.release();
    outcome?;
    eprintln!("wrote {}", results_dir.join("RESULTS.md").display());
    Ok(())
}

#[cfg(not(feature = "kafka"))]
fn run_kafka_scenario(_: &Ctx, s: Scenario) -> anyhow::Result<ScenarioResult> {
    bail!(
        "{} runs on Kafka: build the runner with `cargo build --release -p keystone-bench --features kafka`",
        s.id()
    )
}

/// S5/S6: every engine drains the pre-loaded events topic into its own output
/// topic; the watcher reads that topic (read_committed) until every expected record
/// is there, digests it and stops the engine. Time: from the first output record's
/// broker append time to the moment the last expected record was read, the same
/// for every engine (start-up, group join and table restore before the first
/// output are left out for all of them).
#[cfg(feature = "kafka")]
fn run_kafka_scenario(ctx: &Ctx, s: Scenario) -> anyhow::Result<ScenarioResult> {
    let args = ctx.args;
    let input = s.input(ctx.data);
    let events = count_lines(&input)?;
    eprintln!("[{}] {}: computing the reference output", s.id(), s.title());
    let reference = s.reference(ctx.data)?;
    let source = "bench.events";
    let source_partitions = 2;
    let loaded = crate::kafka::drive::partitions(&args.brokers, source).unwrap_or(0);
    if loaded != source_partitions {
        eprintln!("[{}] loading {events} events into {source}", s.id());
        crate::kafka::load(&crate::kafka::LoadArgs {
            brokers: args.brokers.clone(),
            topic: source.into(),
            partitions: source_partitions as i32,
            input: Some(input.clone()),
            key_field: "event_id".into(),
            data: args.data.clone(),
        })?;
    }
    let engines: Vec<Engine> = s
        .engines()
        .into_iter()
        .filter(|e| engine_selected(args, *e))
        .collect();
    let load_start = measure::loadavg();
    let runs = rounds(ctx, s, &engines, |engine, round| {
        kafka_run(ctx, s, engine, round, events, &reference)
    })?;
    let load_end = measure::loadavg();
    summarize(
        ctx,
        s,
        Summary {
            engines,
            input,
            events,
            reference,
            load_start,
            load_end,
            startup: Vec::new(),
            runs,
        },
    )
}

/// One Kafka-mode engine run, set up: its output topic, command, scratch folder,
/// and the topics to delete afterwards.
#[cfg(feature = "kafka")]
struct KafkaEngineRun {
    out_topic: String,
    run_dir: PathBuf,
    argv: Vec<String>,
    created: Vec<String>,
    prefixes: Vec<String>,
}

#[cfg(feature = "kafka")]
impl KafkaEngineRun {
    fn clean_up(&self, brokers: &str) {
        if let Err(e) = crate::kafka::drive::delete_topics(brokers, &self.created, &self.prefixes) {
            eprintln!("deleting the run's topics: {e:#}");
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

/// Creates the run's topics (and Keystone's plan) and builds the engine's command,
/// reading `source` (2 partitions) into a new output topic (2 partitions).
#[cfg(feature = "kafka")]
fn kafka_engine(
    ctx: &Ctx,
    s: Scenario,
    engine: Engine,
    round: usize,
    source: &str,
) -> anyhow::Result<KafkaEngineRun> {
    use crate::kafka::drive;
    let args = ctx.args;
    let brokers = args.brokers.as_str();
    let sid = s.id().to_ascii_lowercase();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let name = format!("bench-{sid}-{}-r{round}-{stamp}", engine.name());
    let out_topic = format!("{name}.out");
    let run_dir = ctx.scratch.join("kafka").join(&name);
    std::fs::create_dir_all(&run_dir)?;
    let p = |x: &Path| x.display().to_string();
    let java = |cp: &Option<String>, main: &str| -> Vec<String> {
        vec![
            "java".into(),
            format!("-Xms{}", args.jvm_heap),
            format!("-Xmx{}", args.jvm_heap),
            "-cp".into(),
            cp.clone().unwrap_or_default(),
            main.into(),
        ]
    };
    // S7 runs the S5 topology.
    let job = if s == Scenario::S7 { Scenario::S5 } else { s };
    let job_id = job.id().to_ascii_lowercase();
    let mut created: Vec<String> = Vec::new();
    let mut prefixes: Vec<String> = Vec::new();
    let argv: Vec<String> = match engine {
        Engine::Keystone => {
            let (plan, topics) =
                drive::keystone_plan(&job.pipeline(&bench_dir()), &name, &out_topic, source, 2)?;
            let plan_path = run_dir.join("plan.json");
            std::fs::write(&plan_path, plan)?;
            drive::create_topics(brokers, &topics)?;
            created.extend(topics.into_iter().map(|t| t.0));
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            vec![
                p(&ctx.runtime_bin),
                "serve".into(),
                "--plan".into(),
                p(&plan_path),
                "--stage".into(),
                "s0".into(),
                "--bootstrap-servers".into(),
                brokers.into(),
                "--instance-id".into(),
                name.clone(),
                "--http-addr".into(),
                format!("127.0.0.1:{port}"),
            ]
        }
        Engine::FlinkKafka => {
            drive::create_topics(brokers, &[drive::output_topic(&out_topic, 2)])?;
            created.push(out_topic.clone());
            let mut v = java(&ctx.flink_cp, "dev.keystone.bench.flink.BenchJob");
            v.extend(
                [
                    "--scenario",
                    &job_id,
                    "--bootstrap",
                    brokers,
                    "--in-topic",
                    source,
                    "--out-topic",
                    &out_topic,
                    "--group",
                    &name,
                    "--backend",
                    "heap",
                    "--checkpoint-dir",
                    &p(&run_dir.join("checkpoints")),
                    "--parallelism",
                    &args.parallelism.to_string(),
                ]
                .map(String::from),
            );
            v
        }
        Engine::KafkaStreams => {
            drive::create_topics(brokers, &[drive::output_topic(&out_topic, 2)])?;
            created.push(out_topic.clone());
            prefixes.push(format!("{name}-"));
            let mut v = java(&ctx.kstreams_cp, "dev.keystone.bench.kstreams.KafkaApp");
            let delivery = if job == Scenario::S6 {
                "exactly-once"
            } else {
                "at-least-once"
            };
            v.extend(
                [
                    "--app-id",
                    &name,
                    "--bootstrap",
                    brokers,
                    "--in-topic",
                    source,
                    "--out-topic",
                    &out_topic,
                    "--delivery",
                    delivery,
                    "--state-dir",
                    &p(&run_dir.join("state")),
                    "--commit-ms",
                    "1000",
                    "--threads",
                    &args.parallelism.to_string(),
                ]
                .map(String::from),
            );
            v
        }
        other => bail!("{} does not run on Kafka", other.name()),
    };
    Ok(KafkaEngineRun {
        out_topic,
        run_dir,
        argv,
        created,
        prefixes,
    })
}

#[cfg(feature = "kafka")]
fn empty_record(engine: Engine, m: &Measured, time_basis: &str) -> RunRecord {
    RunRecord {
        round: 0,
        warmup: false,
        engine: engine.name().into(),
        wall_s: m.wall_s,
        // Not NaN: JSON has none, and RESULTS.json is read back.
        engine_s: 0.0,
        time_basis: time_basis.into(),
        cpu_s: m.cpu_s,
        peak_rss_mib: m.peak_rss_mib,
        events_per_s: 0.0,
        cpu_s_per_m_events: 0.0,
        output: None,
        digest_ok: false,
        loadavg_1m: m.loadavg_1m,
        error: None,
        latency_p50_ms: None,
        latency_p99_ms: None,
        search_cpu_s: None,
        search_actions: None,
    }
}

#[cfg(feature = "kafka")]
fn kafka_run(
    ctx: &Ctx,
    s: Scenario,
    engine: Engine,
    round: usize,
    events: u64,
    reference: &OutputDigest,
) -> anyhow::Result<RunRecord> {
    use crate::kafka::drive;
    let args = ctx.args;
    let brokers = args.brokers.as_str();
    let run = kafka_engine(ctx, s, engine, round, "bench.events")?;
    let expected = reference.lines;
    let (tx, rx) = std::sync::mpsc::channel::<u32>();
    let watcher = {
        let brokers = brokers.to_owned();
        let topic = run.out_topic.clone();
        let mode = s.digest_mode();
        let timeout = std::time::Duration::from_secs(args.kafka_timeout_s);
        std::thread::spawn(move || -> anyhow::Result<drive::Drained> {
            let pid = rx.recv()?;
            let drained = drive::drain(&brokers, &topic, 2, expected, mode, timeout, pid);
            drive::stop(pid);
            drained
        })
    };
    let m = measure::run_hooked(&run.argv, ctx.limits, &ctx.scratch, |pid| {
        let _ = tx.send(pid);
    });
    let drained = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("the output watcher panicked"))?;
    let m = m?;
    run.clean_up(brokers);
    let mut record = empty_record(
        engine,
        &m,
        "drain: first output record appended (broker LogAppendTime) to the last expected one read (read_committed)",
    );
    record.cpu_s_per_m_events = m.cpu_s / (events as f64 / 1e6);
    match drained {
        Err(e) => {
            record.error = Some(format!("{e:#}\n{}", m.stderr_tail));
        }
        Ok(d) => {
            record.engine_s = d.seconds();
            record.events_per_s = events as f64 / d.seconds();
            record.digest_ok = &d.digest == reference;
            if !d.complete {
                record.error = Some(format!(
                    "only {} of {expected} output records{}:\n{}",
                    d.count,
                    if d.engine_exited_early {
                        " (the engine exited)"
                    } else {
                        " before the timeout"
                    },
                    m.stderr_tail
                ));
            } else if !record.digest_ok {
                record.error = Some(format!(
                    "output digest {} ({} lines) differs from the reference {} ({} lines)",
                    d.digest.sha256, d.digest.lines, reference.sha256, reference.lines
                ));
            }
            record.output = Some(d.digest);
        }
    }
    Ok(record)
}

/// S7: the S5 topology fed at a fixed rate from a fresh input topic. The harness
/// produces `rate` events/s (the generated events in order, keyed by event_id):
/// first until the engine's first output arrives plus 5 s (start-up and JIT
/// warm-up), then `latency_secs` measured; latency per event = when the harness
/// read its output (read_committed) minus when the harness sent it, for the
/// events first sent in the measured phase.
#[cfg(feature = "kafka")]
fn latency_run(
    ctx: &Ctx,
    engine: Engine,
    round: usize,
    lines: &[String],
) -> anyhow::Result<RunRecord> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use crate::kafka::drive::{self, Phase};
    let args = ctx.args;
    let brokers = args.brokers.clone();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let source = format!("bench-s7-in-{}-r{round}-{stamp}", engine.name());
    drive::create_topics(&brokers, &[(source.clone(), 2, Vec::new())])?;
    let mut run = kafka_engine(ctx, Scenario::S7, engine, round, &source)?;
    run.created.push(source.clone());
    let done = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicU64::new(0));
    let receiver = {
        let (brokers, topic, done, seen) = (
            brokers.clone(),
            run.out_topic.clone(),
            done.clone(),
            seen.clone(),
        );
        std::thread::spawn(move || drive::receive_times(&brokers, &topic, 2, &done, &seen))
    };
    let (tx, rx) = std::sync::mpsc::channel::<u32>();
    let rate = args.latency_rate;
    let measure_secs = args.latency_secs;
    let producer = {
        let (brokers, source, seen, done) =
            (brokers.clone(), source.clone(), seen.clone(), done.clone());
        let lines = lines.to_vec();
        std::thread::spawn(
            move || -> anyhow::Result<(std::collections::HashMap<String, i64>, u32)> {
                let pid = rx.recv()?;
                let start = std::time::Instant::now();
                let mut measure_from: Option<u64> = None;
                let mut warm_until: Option<std::time::Instant> = None;
                let measure_n = (rate * measure_secs) as u64;
                let sent_at = drive::produce_at_rate(&brokers, &source, &lines, rate, |sent| {
                    if let Some(from) = measure_from {
                        return if sent < from + measure_n {
                            Phase::Measure
                        } else {
                            Phase::Stop
                        };
                    }
                    if start.elapsed() > std::time::Duration::from_secs(180) {
                        return Phase::Stop;
                    }
                    match warm_until {
                        None if seen.load(Ordering::Relaxed) > 0 => {
                            warm_until =
                                Some(std::time::Instant::now() + std::time::Duration::from_secs(5));
                            Phase::Warmup
                        }
                        Some(t) if std::time::Instant::now() >= t => {
                            measure_from = Some(sent);
                            Phase::Measure
                        }
                        _ => Phase::Warmup,
                    }
                })?;
                // Let the last outputs arrive (a commit interval and then some).
                std::thread::sleep(std::time::Duration::from_secs(5));
                done.store(true, Ordering::Relaxed);
                drive::stop(pid);
                Ok((sent_at, pid))
            },
        )
    };
    let m = measure::run_hooked(&run.argv, ctx.limits, &ctx.scratch, |pid| {
        let _ = tx.send(pid);
    });
    let produced = producer
        .join()
        .map_err(|_| anyhow::anyhow!("the producer panicked"));
    done.store(true, Ordering::Relaxed);
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver panicked"));
    let m = m?;
    run.clean_up(&brokers);
    let mut record = empty_record(
        engine,
        &m,
        "latency: harness read (read_committed) minus harness send, per event, at a fixed rate",
    );
    let (sent_at, _) = match produced? {
        Ok(x) => x,
        Err(e) => {
            record.error = Some(format!("producing: {e:#}\n{}", m.stderr_tail));
            return Ok(record);
        }
    };
    let received = match received? {
        Ok(x) => x,
        Err(e) => {
            record.error = Some(format!("reading the output: {e:#}"));
            return Ok(record);
        }
    };
    let mut latencies: Vec<i64> = sent_at
        .iter()
        .filter_map(|(id, sent)| received.get(id).map(|r| r - sent))
        .collect();
    latencies.sort_unstable();
    // Ids first sent in the measured phase that the reference drops (redeliveries
    // of warm-up events) have no output; anything else missing is an error.
    if latencies.is_empty() || latencies.len() < sent_at.len() * 3 / 4 {
        record.error = Some(format!(
            "only {} of {} measured events came out{}:\n{}",
            latencies.len(),
            sent_at.len(),
            if sent_at.is_empty() {
                " (no output within 180 s: never measured)"
            } else {
                ""
            },
            m.stderr_tail
        ));
        return Ok(record);
    }
    let q = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize] as f64;
    record.latency_p50_ms = Some(q(0.5));
    record.latency_p99_ms = Some(q(0.99));
    record.events_per_s = rate;
    record.engine_s = latencies.len() as f64;
    record.digest_ok = true;
    Ok(record)
}

#[cfg(feature = "kafka")]
fn run_latency_scenario(ctx: &Ctx, s: Scenario) -> anyhow::Result<ScenarioResult> {
    let args = ctx.args;
    let input = ctx.data.events.clone();
    let lines: Vec<String> = std::fs::read_to_string(&input)?
        .lines()
        .map(str::to_owned)
        .collect();
    let engines: Vec<Engine> = s
        .engines()
        .into_iter()
        .filter(|e| engine_selected(args, *e))
        .collect();
    let load_start = measure::loadavg();
    let mut runs = Vec::new();
    for round in 0..args.warmup + args.runs {
        for &engine in &engines {
            let mut rec = latency_run(ctx, engine, round, &lines)?;
            rec.round = round;
            rec.warmup = round < args.warmup;
            eprintln!(
                "[{}] round {round}{} {:<14} p50 {:?} ms p99 {:?} ms ({} events) cpu {:.2}s rss {:.0} MiB load {:.2} {}",
                s.id(),
                if rec.warmup { " (warm-up)" } else { "" },
                engine.name(),
                rec.latency_p50_ms,
                rec.latency_p99_ms,
                rec.engine_s,
                rec.cpu_s,
                rec.peak_rss_mib,
                rec.loadavg_1m,
                rec.error.as_deref().unwrap_or("ok")
            );
            runs.push(rec);
        }
    }
    let load_end = measure::loadavg();
    let measured: Vec<&RunRecord> = runs.iter().filter(|r| !r.warmup && r.digest_ok).collect();
    let p99 = |e: Engine, round: usize| {
        measured
            .iter()
            .find(|r| r.engine == e.name() && r.round == round)
            .and_then(|r| r.latency_p99_ms)
    };
    let mut ratios = Vec::new();
    for &peer in engines.iter().filter(|e| **e != Engine::Keystone) {
        let per_pair: Vec<f64> = (args.warmup..args.warmup + args.runs)
            .filter_map(|round| Some(p99(Engine::Keystone, round)? / p99(peer, round)?))
            .collect();
        let stat = Stat::of(per_pair.iter().copied());
        let target = (peer == Engine::FlinkKafka).then_some(0.2);
        ratios.push(RatioSummary {
            peer: peer.name().into(),
            target,
            met: target.map(|t| stat.as_ref().is_some_and(|st| st.median <= t)),
            failed_pairs: args.runs - per_pair.len(),
            events_per_s_per_pair: per_pair,
            events_per_s: stat,
            wall_ratio: None,
            cpu_ratio: None,
        });
    }
    let engines_summary: Vec<EngineSummary> = engines
        .iter()
        .map(|&e| {
            let mine: Vec<&&RunRecord> = measured.iter().filter(|r| r.engine == e.name()).collect();
            EngineSummary {
                engine: e.name().into(),
                config: ctx.config_text(s, e),
                runs: runs
                    .iter()
                    .filter(|r| !r.warmup && r.engine == e.name())
                    .count(),
                failed_runs: runs
                    .iter()
                    .filter(|r| !r.warmup && r.engine == e.name() && !r.digest_ok)
                    .count(),
                time_basis: "latency".into(),
                events_per_s: Stat::of(mine.iter().filter_map(|r| r.latency_p99_ms)),
                events_per_s_wall: Stat::of(mine.iter().filter_map(|r| r.latency_p50_ms)),
                cpu_s_per_m_events: None,
                peak_rss_mib: Stat::of(mine.iter().map(|r| r.peak_rss_mib)),
                wall_s: Stat::of(mine.iter().map(|r| r.wall_s)),
            }
        })
        .collect();
    let failed = runs.iter().any(|r| !r.digest_ok);
    Ok(ScenarioResult {
        id: s.id().into(),
        title: s.title().into(),
        target: s.target_text().into(),
        status: if failed {
            "failed".into()
        } else {
            "measured".into()
        },
        reason: format!(
            "p99 latency ratio Keystone / peer per pair (lower is better) at {:.0} events/s for {:.0} s after warm-up",
            args.latency_rate, args.latency_secs
        ),
        input: Some(report::InputInfo {
            path: input.display().to_string(),
            events: (args.latency_rate * args.latency_secs) as u64,
            bytes: 0,
        }),
        pipeline: Some(
            "e2e/bench/pipelines/s5-kafka-dedup-project.yaml (source topic replaced per run)"
                .into(),
        ),
        runtime_bin: Some(ctx.runtime_bin.display().to_string()),
        reference: None,
        loadavg_start: Some(load_start),
        loadavg_end: Some(load_end),
        engines: engines_summary,
        ratios,
        startup: Vec::new(),
        runs,
        notes: None,
    })
}

#[cfg(not(feature = "kafka"))]
fn run_latency_scenario(_: &Ctx, s: Scenario) -> anyhow::Result<ScenarioResult> {
    bail!(
        "{} runs on Kafka: build the runner with `cargo build --release -p keystone-bench --features kafka`",
        s.id()
    )
}

#[cfg(not(feature = "kafka"))]
fn run_search_scenario(_: &Ctx, s: Scenario) -> anyhow::Result<ScenarioResult> {
    bail!(
        "{} runs on Kafka: build the runner with `cargo build --release -p keystone-bench --features kafka`",
        s.id()
    )
}

#[cfg(feature = "kafka")]
/// CPU seconds (user + system) the OpenSearch process has used so far: the process
/// whose command line runs `org.opensearch.bootstrap.OpenSearch` with the
/// endpoint's `http.port`, if it runs on this machine.
fn search_cpu_s(base: &str) -> Option<f64> {
    let port = base
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .trim_end_matches('/');
    let port_arg = format!("http.port={port}");
    let ticks = 100.0; // USER_HZ on Linux
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if !cmd.contains("org.opensearch.bootstrap.OpenSearch") || !cmd.contains(&port_arg) {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        let utime: f64 = f.get(11)?.parse().ok()?;
        let stime: f64 = f.get(12)?.parse().ok()?;
        return Some((utime + stime) / ticks);
    }
    None
}

/// S9: the CDC events (pre-loaded into `bench.cdc`, keyed by order_id, 2
/// partitions) go through dedup, order and projection into a fresh index per run
/// (created by the harness with the same settings for every engine). Time: from
/// the first index action the index answered to the poll that saw the last
/// expected one (`_stats/indexing`: indexed + conflicts; real time, no refresh),
/// the same rule for every engine. Then the index is refreshed and read back:
/// every order's document must be its last change at version `seq`.
#[cfg(feature = "kafka")]
fn run_search_scenario(ctx: &Ctx, s: Scenario) -> anyhow::Result<ScenarioResult> {
    use crate::search;
    let args = ctx.args;
    let input = s.input(ctx.data);
    let events = count_lines(&input)?;
    eprintln!("[{}] {}: computing the reference", s.id(), s.title());
    let reference = search::reference(&input)?;
    let docs_file = ctx.scratch.join("s9-documents.tsv");
    search::write_docs(&docs_file, &reference)?;
    let source = "bench.cdc";
    match crate::kafka::drive::records(&args.brokers, source)? {
        Some((2, n)) if n as u64 == events => {}
        _ => {
            eprintln!("[{}] loading {events} CDC events into {source}", s.id());
            crate::kafka::load(&crate::kafka::LoadArgs {
                brokers: args.brokers.clone(),
                topic: source.into(),
                partitions: 2,
                input: Some(input.clone()),
                key_field: "order_id".into(),
                data: args.data.clone(),
            })?;
        }
    }
    let engines: Vec<Engine> = s
        .engines()
        .into_iter()
        .filter(|e| engine_selected(args, *e))
        .collect();
    let load_start = measure::loadavg();
    let runs = rounds(ctx, s, &engines, |engine, round| {
        search_run(ctx, engine, round, events, &reference, &docs_file, source)
    })?;
    let load_end = measure::loadavg();
    let mut result = summarize(
        ctx,
        s,
        Summary {
            engines: engines.clone(),
            input,
            events,
            reference: reference.digest.clone(),
            load_start,
            load_end,
            startup: Vec::new(),
            runs,
        },
    )?;
    result.notes = Some(search_notes(&result, events, &reference, &engines));
    Ok(result)
}

#[cfg(feature = "kafka")]
/// The S9 section's notes: documents per second, the ceiling fraction, and the
/// OpenSearch process's CPU per engine.
fn search_notes(
    result: &ScenarioResult,
    events: u64,
    reference: &crate::search::Reference,
    engines: &[Engine],
) -> String {
    use std::fmt::Write;
    let mut md = String::new();
    let per_doc = events as f64 / reference.actions as f64;
    let _ = writeln!(
        md,
        "Input: {events} CDC events = {} distinct changes (index actions; {:.3} events per action, the rest are redeliveries the dedup drops) for {} orders (final documents). Every engine's time runs from the first index action the index answered to the poll (every 50 ms) that saw the last one (`_stats/indexing`: indexed + version conflicts, real time, no refresh; the last one: the count reached the number of distinct changes, or its last change before 8 s without any); then the index is refreshed and every document read back and digested (id, version, source) against the reference: the last change of every order at version `seq`. Each engine writes a fresh index created by the harness: 1 shard, `number_of_replicas: 0`, `refresh_interval: -1`, the mapping Keystone derives from the schema. The ceiling's events/s is input events over its time to apply the same {} documents, so Keystone / ceiling is the ratio of the times to apply the same actions.\n",
        reference.actions, per_doc, reference.documents, reference.actions
    );
    let _ = writeln!(
        md,
        "| engine | index actions answered per run | distinct changes/s, median (min-max) | OpenSearch CPU-s per run, median | engine CPU-s per run, median |\n|---|---|---|---|---|"
    );
    for &e in engines {
        let mine: Vec<&RunRecord> = result
            .runs
            .iter()
            .filter(|r| !r.warmup && r.digest_ok && r.engine == e.name())
            .collect();
        let docs = Stat::of(mine.iter().map(|r| r.events_per_s / per_doc));
        let search_cpu = Stat::of(mine.iter().filter_map(|r| r.search_cpu_s));
        let cpu = Stat::of(mine.iter().map(|r| r.cpu_s));
        let actions: Vec<String> = mine
            .iter()
            .filter_map(|r| r.search_actions.map(|a| a.to_string()))
            .collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            e.name(),
            actions.join(", "),
            docs.map(|d| format!("{:.0} ({:.0}-{:.0})", d.median, d.min, d.max))
                .unwrap_or_else(|| "-".into()),
            search_cpu
                .map(|d| format!("{:.1}", d.median))
                .unwrap_or_else(|| "-".into()),
            cpu.map(|d| format!("{:.1}", d.median))
                .unwrap_or_else(|| "-".into()),
        );
    }
    md
}

#[cfg(feature = "kafka")]
fn search_run(
    ctx: &Ctx,
    engine: Engine,
    round: usize,
    events: u64,
    reference: &crate::search::Reference,
    docs_file: &Path,
    source: &str,
) -> anyhow::Result<RunRecord> {
    use crate::kafka::drive;
    use crate::search;
    let args = ctx.args;
    let brokers = args.brokers.as_str();
    let base = args.search_url.as_str();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let name = format!("bench-s9-{}-r{round}-{stamp}", engine.name());
    let index = name.clone();
    let run_dir = ctx.scratch.join("search").join(&name);
    std::fs::create_dir_all(&run_dir)?;
    search::create_index(base, &index)?;
    let p = |x: &Path| x.display().to_string();
    let mut created: Vec<String> = Vec::new();
    let argv: Vec<String> = match engine {
        Engine::Keystone => {
            let manifest = Scenario::S9.pipeline(&bench_dir());
            let text = std::fs::read_to_string(&manifest)?
                .replace("name: bench-s9", &format!("name: {name}"))
                .replace("index: bench-s9", &format!("index: {index}"))
                .replace(
                    "endpoint: http://127.0.0.1:19200",
                    &format!("endpoint: {base}"),
                )
                .replace("topic: bench.cdc", &format!("topic: {source}"));
            let (plan, topics) = drive::compile_plan(&manifest.display().to_string(), &text, 2)?;
            let plan_path = run_dir.join("plan.json");
            std::fs::write(&plan_path, plan)?;
            drive::create_topics(brokers, &topics)?;
            created.extend(topics.into_iter().map(|t| t.0));
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            vec![
                p(&ctx.runtime_bin),
                "serve".into(),
                "--plan".into(),
                p(&plan_path),
                "--stage".into(),
                "s0".into(),
                "--bootstrap-servers".into(),
                brokers.into(),
                "--instance-id".into(),
                name.clone(),
                "--http-addr".into(),
                format!("127.0.0.1:{port}"),
            ]
        }
        Engine::FlinkSearch => [
            "java",
            &format!("-Xms{}", args.jvm_heap),
            &format!("-Xmx{}", args.jvm_heap),
            "-cp",
            ctx.flink_search_cp.as_deref().unwrap_or_default(),
            "dev.keystone.bench.flinkos.S9Job",
            "--bootstrap",
            brokers,
            "--in-topic",
            source,
            "--group",
            &name,
            "--endpoint",
            base,
            "--index",
            &index,
            "--bulk-size",
            "1000",
            "--checkpoint-dir",
            &p(&run_dir.join("checkpoints")),
            "--parallelism",
            &args.parallelism.to_string(),
        ]
        .map(String::from)
        .to_vec(),
        Engine::BulkCeiling => vec![
            p(&std::env::current_exe()?),
            "search-ceiling".into(),
            "--endpoint".into(),
            base.into(),
            "--index".into(),
            index.clone(),
            "--docs".into(),
            p(docs_file),
            "--bulk-size".into(),
            "1000".into(),
            "--concurrency".into(),
            args.bulk_concurrency.to_string(),
        ],
        other => bail!("{} does not run S9", other.name()),
    };
    let (tx, rx) = std::sync::mpsc::channel::<u32>();
    let expected = reference.actions;
    let watcher = {
        let base = base.to_owned();
        let index = index.clone();
        let timeout = std::time::Duration::from_secs(args.kafka_timeout_s);
        std::thread::spawn(move || -> anyhow::Result<(search::Applied, Option<f64>)> {
            let pid = rx.recv()?;
            let cpu0 = search_cpu_s(&base);
            let applied = search::wait_applied(
                &base,
                &index,
                expected,
                timeout,
                std::time::Duration::from_secs(8),
                || drive::alive(pid),
            );
            let cpu = cpu0.zip(search_cpu_s(&base)).map(|(a, b)| b - a);
            drive::stop(pid);
            Ok((applied?, cpu))
        })
    };
    let m = measure::run_hooked(&argv, ctx.limits, &ctx.scratch, |pid| {
        let _ = tx.send(pid);
    });
    let watched = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("the index watcher panicked"))?;
    let m = m?;
    if let Err(e) = drive::delete_topics(brokers, &created, &[]) {
        eprintln!("deleting the run's topics: {e:#}");
    }
    let _ = std::fs::remove_dir_all(&run_dir);
    let mut record = empty_record(
        engine,
        &m,
        "applied: first index action answered to the last one (index _stats, polled every 50 ms)",
    );
    record.cpu_s_per_m_events = m.cpu_s / (events as f64 / 1e6);
    match watched {
        Err(e) => record.error = Some(format!("{e:#}\n{}", m.stderr_tail)),
        Ok((applied, cpu)) => {
            record.search_cpu_s = cpu;
            record.search_actions = Some(applied.answered);
            record.engine_s = applied.seconds;
            record.events_per_s = events as f64 / applied.seconds;
            match search::read_back(base, &index) {
                Err(e) => record.error = Some(format!("reading the index back: {e:#}")),
                Ok(d) => {
                    record.digest_ok = d == reference.digest;
                    if !record.digest_ok {
                        record.error = Some(format!(
                            "index digest {} ({} documents) differs from the reference {} ({} documents) after {} of {expected} index actions{}:\n{}",
                            d.sha256,
                            d.lines,
                            reference.digest.sha256,
                            reference.digest.lines,
                            applied.answered,
                            if applied.engine_exited_early {
                                " (the engine exited)"
                            } else {
                                ""
                            },
                            m.stderr_tail
                        ));
                    }
                    record.output = Some(d);
                }
            }
        }
    }
    search::delete_index(base, &index);
    Ok(record)
}
