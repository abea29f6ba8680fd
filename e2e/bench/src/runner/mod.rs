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

pub const PEERS: [&str; 5] = [
    "flink",
    "kstreams",
    "flink-opensearch",
    "flink-iceberg",
    "kstreams-avro",
];
pub const FLINK_VERSION: &str = "2.3.0";
/// S9's Flink: no OpenSearch connector is published for Flink 2.x.
pub const FLINK_SEARCH_VERSION: &str = "1.19.3";
pub const KAFKA_STREAMS_VERSION: &str = "4.1.1";
/// S10's Iceberg Flink runtime: the newest built for Flink 1.19 (1.10+ has none).
pub const ICEBERG_FLINK_VERSION: &str = "1.9.2";
/// S11's peer: Debezium's PostgreSQL connector (e2e/testbed.d/debezium-pom.xml).
pub const DEBEZIUM_VERSION: &str = "3.6.1.Final";
/// S12's Kafka Streams peer: Apache Avro's Java library under a hand-written serde.
pub const AVRO_JAVA_VERSION: &str = "1.12.0";

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
    /// S10: the Iceberg REST catalog (the testbed's: `eval "$(e2e/testbed env)"`).
    #[arg(
        long,
        env = "KEYSTONE_TESTBED_ICEBERG_URI",
        default_value = "http://127.0.0.1:19181"
    )]
    pub iceberg_uri: String,
    /// S10: the catalog's warehouse (a file:// folder on the testbed).
    #[arg(long, env = "KEYSTONE_TESTBED_ICEBERG_WAREHOUSE", default_value = "")]
    pub iceberg_warehouse: String,
    /// S10: the Python with pyarrow and pyiceberg (the testbed's readers' virtualenv).
    #[arg(long, env = "KEYSTONE_TESTBED_LAKE_PYTHON", default_value = "python3")]
    pub lake_python: String,
    /// S11: rows of the snapshot table, and changes written per round.
    #[arg(long, default_value_t = 500_000)]
    pub capture_rows: u64,
    /// S11: rows per transaction of the writes.
    #[arg(long, default_value_t = 10)]
    pub capture_txn_rows: u32,
    /// S11: the PostgreSQL superuser's URL (the testbed's: `eval "$(e2e/testbed env)"`).
    #[arg(
        long,
        env = "KEYSTONE_TESTBED_POSTGRES_ADMIN_URL",
        default_value = "postgres://postgres:postgres@127.0.0.1:15432/keystone",
        hide_env_values = true
    )]
    pub pg_admin_url: String,
    /// S11: the database the captures read, and how they log in.
    #[arg(
        long,
        env = "KEYSTONE_TESTBED_POSTGRES_HOST",
        default_value = "127.0.0.1"
    )]
    pub pg_host: String,
    #[arg(long, env = "KEYSTONE_TESTBED_POSTGRES_PORT", default_value_t = 15432)]
    pub pg_port: u16,
    #[arg(
        long,
        env = "KEYSTONE_TESTBED_POSTGRES_DATABASE",
        default_value = "keystone"
    )]
    pub pg_database: String,
    #[arg(
        long,
        env = "KEYSTONE_TESTBED_POSTGRES_USER",
        default_value = "keystone"
    )]
    pub pg_user: String,
    #[arg(
        long,
        env = "KEYSTONE_TESTBED_POSTGRES_PASSWORD",
        default_value = "keystone",
        hide_env_values = true
    )]
    pub pg_password: String,
    /// S11: the folder of `psql` (PostgreSQL 15's client).
    #[arg(
        long,
        env = "KEYSTONE_TESTBED_POSTGRES_BIN",
        default_value = "/usr/lib/postgresql/15/bin"
    )]
    pub pg_bin: PathBuf,
    /// S12: the schema registry's Confluent-compatible API (the testbed's Apicurio:
    /// `eval "$(e2e/testbed env)"`).
    #[arg(
        long,
        env = "KEYSTONE_TESTBED_REGISTRY_URL",
        default_value = "http://127.0.0.1:19081/apis/ccompat/v7"
    )]
    pub registry_url: String,
    #[command(flatten)]
    pub http: s13::HttpArgs,
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

/// S11's engines (runner/s11.rs writes these configurations).
fn capture_config_text(args: &RunArgs, engine: Engine) -> String {
    match engine {
        Engine::Keystone | Engine::KeystoneSnapshot => format!(
            "keystone-runtime capture (release build): a pgoutput slot into a Kafka topic exactly once (events and the position reached in one Kafka transaction every commitInterval, 100 ms; librdkafka producer acks=all, idempotent, lz4, linger 5 ms, 256 KiB batches), envelope debezium, decimalHandling string, {}; against PostgreSQL 15 at {}:{} and Kafka 4.1.1 at {}",
            if engine == Engine::KeystoneSnapshot {
                "snapshot mode initial (DBLog watermarks, chunkSize 4096, the default), slot created by the capture"
            } else {
                "snapshot mode never, an existing slot"
            },
            args.pg_host,
            args.pg_port,
            args.brokers
        ),
        _ => format!(
            "Debezium {DEBEZIUM_VERSION} PostgreSQL connector in Kafka Connect 4.1.1 standalone (ConnectStandalone, one task), plugin.name pgoutput, an existing publication (publication.autocreate.mode disabled), decimal.handling.mode string, JsonConverter without schemas for keys and values, offsets in a file flushed every 1 s, the connector's defaults otherwise (max.batch.size 2048, max.queue.size 8192); Connect's producer (acks=all, idempotent: at-least-once) with Keystone's batching (lz4, linger 5 ms, 256 KiB batches); {}; JVM -Xms{h} -Xmx{h} (default G1), Java 17",
            if engine == Engine::DebeziumSnapshot {
                "snapshot.mode initial (the slot created by the connector, its exported snapshot read with snapshot.fetch.size 10240, the default)"
            } else {
                "snapshot.mode no_data, an existing slot"
            },
            h = args.jvm_heap
        ),
    }
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
    /// The S10 Flink peer's class path.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    flink_iceberg_cp: Option<String>,
    /// S12's Kafka Streams peer (Avro serde).
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    kstreams_avro_cp: Option<String>,
    scratch: PathBuf,
}

/// S10's Keystone engines: the iceberg sink, or the parquet sink.
fn keystone_lake_config(engine: Engine, brokers: &str) -> String {
    format!(
        "keystone-runtime serve (release build, one process running the stage of the plan compiled from pipelines/{}: project, then the {} sink; delivery ExactlyOnce, commitInterval 1 s: at each commit the epoch's files are closed and staged (zstd level 1) before the input offsets are committed, then {}) against Kafka 4.1.1 at {}",
        if engine == Engine::Keystone {
            "s10-kafka-iceberg.yaml"
        } else {
            "s10-kafka-parquet.yaml"
        },
        if engine == Engine::Keystone {
            "iceberg"
        } else {
            "parquet"
        },
        if engine == Engine::Keystone {
            "appended to the table as one snapshot through the REST catalog (sink commitInterval 1 s)"
        } else {
            "published by renames into Hive folders by country on a local folder"
        },
        brokers
    )
}

impl Ctx<'_> {
    fn config_text(&self, s: Scenario, engine: Engine) -> String {
        let a = self.args;
        match engine {
            Engine::Keystone if s.is_http() => s13::config_text(a, engine),
            Engine::ProducerCeiling => s13::config_text(a, engine),
            Engine::Keystone if s.is_capture() => capture_config_text(a, engine),
            Engine::KeystoneSnapshot | Engine::Debezium | Engine::DebeziumSnapshot => {
                capture_config_text(a, engine)
            }
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
            Engine::Keystone if s.is_lake() => keystone_lake_config(engine, &a.brokers),
            Engine::KeystoneParquet => keystone_lake_config(engine, &a.brokers),
            Engine::FlinkIceberg => format!(
                "Flink {FLINK_SEARCH_VERSION} DataStream on a local MiniCluster (peers/flink-iceberg S10Job), flink-connector-kafka 3.3.0-1.19 (KafkaSource from the earliest offset, a new group), Jackson projection to RowData, iceberg-flink-runtime-1.19 {ICEBERG_FLINK_VERSION} FlinkSink (writer + single committer: the data files of each checkpoint appended as one snapshot when it completes: exactly once), checkpoints every 1 s in EXACTLY_ONCE mode (file storage), the same REST catalog (HadoopFileIO on the file:// warehouse), table partitioned identity(country), zstd level 1, parallelism {}, object reuse on, JVM -Xms{h} -Xmx{h}",
                a.parallelism,
                h = a.jvm_heap
            ),
            Engine::ParquetCeiling => "e2e/bench/lake_s10.py ceiling with the testbed's lake Python: pyarrow write_to_dataset of the same rows (Hive folders by country, zstd level 1), the Arrow table built from the events before the clock starts; no Kafka, no parsing, no commits".to_owned(),
            Engine::Keystone if s == Scenario::S12 => format!(
                "keystone-runtime serve (release build, one process running the stage of the plan compiled from pipelines/s12-kafka-avro.yaml: S5's job; source format avro: each writer schema fetched by id from the registry once, the record resolved to the subject's latest version; sink format avro: the schema derived from the output contract, registered under <topic>-value when the stage starts; librdkafka producer acks=all, idempotent, lz4, linger 5 ms; at-least-once, commitInterval 1 s) against the single-broker Kafka 4.1.1 at {} and the registry at {}",
                a.brokers, a.registry_url
            ),
            Engine::KeystoneJson => format!(
                "the same keystone-runtime serve on S5's plan (pipelines/s5-kafka-dedup-project.yaml: JSON in and out), reading the JSON events topic, in the same rounds as the Avro runs; against Kafka 4.1.1 at {}",
                a.brokers
            ),
            Engine::KafkaStreamsAvro => format!(
                "Kafka Streams {KAFKA_STREAMS_VERSION} KafkaStreams application (peers/kstreams-avro AvroApp: S5's KafkaApp on GenericRecord values), a hand-written Confluent-framing serde over Apache Avro {AVRO_JAVA_VERSION} (GenericDatumReader with the writer schema fetched by id from the registry's REST API with java.net.http and cached; GenericDatumWriter, its schema registered under <topic>-value on first use; reused binary decoder and encoder), num.stream.threads {}, commit.interval.ms 1000, at_least_once, in-memory key-value store with its changelog topic, JVM -Xms{h} -Xmx{h}; registry at {}",
                a.parallelism,
                a.registry_url,
                h = a.jvm_heap
            ),
            Engine::Keystone if !s.is_engine_only() => format!(
                "keystone-runtime serve (release build, one process running the stage of the plan compiled from the scenario's pipeline; librdkafka producer acks=all, idempotent, lz4, linger 5 ms; at-least-once: every commitInterval (1 s) the offsets of that moment are committed (async) once the outputs sent before them are acknowledged, without pausing consumption; exactly-once: a transaction every 1 s, or 100 ms after the last once the stage has read all its input) against the single-broker Kafka 4.1.1 at {}",
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
            | Engine::BulkCeiling
            | Engine::FlinkIceberg
            | Engine::KeystoneParquet
            | Engine::ParquetCeiling
            | Engine::Debezium
            | Engine::KeystoneSnapshot
            | Engine::DebeziumSnapshot
            | Engine::ProducerCeiling
            | Engine::KeystoneJson
            | Engine::KafkaStreamsAvro => {
                unreachable!(
                    "Kafka-mode engines are driven by kafka_run, search_run, lake_run, capture_run and s13"
                )
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
        ceiling: None,
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
            Ok(d) => check_digest(&mut record, d, reference, "output"),
            Err(e) => record.error = Some(format!("cannot digest the output: {e:#}")),
        }
    } else {
        record.digest_ok = true;
    }
    clear_outputs(&output);
    Ok((m, record))
}

/// Records an output's digest and whether it equals the reference's (an error
/// naming both when not); `what` names the output ("output", "rows").
fn check_digest(record: &mut RunRecord, d: OutputDigest, reference: &OutputDigest, what: &str) {
    record.digest_ok = &d == reference;
    if !record.digest_ok {
        record.error = Some(format!(
            "{what} digest {} ({} lines) differs from the reference {} ({} lines)",
            d.sha256, d.lines, reference.sha256, reference.lines
        ));
    }
    record.output = Some(d);
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

/// The scenario's engines that `--engines` selects.
fn selected_engines(args: &RunArgs, s: Scenario) -> Vec<Engine> {
    s.engines()
        .into_iter()
        .filter(|e| engine_selected(args, *e))
        .collect()
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
    let engines = selected_engines(args, s);
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
        ceiling: None,
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
    let flink_iceberg_cp = if kafka_wanted(Engine::FlinkIceberg) {
        Some(build_peer("flink-iceberg", false)?)
    } else {
        None
    };
    let kstreams_avro_cp = if kafka_wanted(Engine::KafkaStreamsAvro) {
        Some(build_peer("kstreams-avro", false)?)
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
        flink_iceberg_cp,
        kstreams_avro_cp,
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
            } else if s.is_lake() {
                run_lake_scenario(&ctx, s)?
            } else if s.is_capture() {
                run_capture_scenario(&ctx, s)?
            } else if s.is_http() {
                s13::run_http_scenario(&ctx, s)?
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

#[cfg(not(feature = "kafka"))]
fn run_lake_scenario(_: &Ctx, s: Scenario) -> anyhow::Result<ScenarioResult> {
    bail!(
        "{} runs on Kafka: build the runner with `cargo build --release -p keystone-bench --features kafka`",
        s.id()
    )
}

#[cfg(not(feature = "kafka"))]
fn run_capture_scenario(_: &Ctx, s: Scenario) -> anyhow::Result<ScenarioResult> {
    bail!(
        "{} runs on Kafka: build the runner with `cargo build --release -p keystone-bench --features kafka`",
        s.id()
    )
}

// The Kafka-mode scenarios (S5-S7) and S9 drive a broker (and OpenSearch):
// built with the kafka feature only.
#[cfg(feature = "kafka")]
mod kafka_ceiling;
#[cfg(feature = "kafka")]
mod kafka_mode;
#[cfg(feature = "kafka")]
mod s10;
#[cfg(feature = "kafka")]
mod s11;
// S13's options and configurations build without Kafka; its runs need it.
mod s13;
#[cfg(feature = "kafka")]
mod s9;
#[cfg(feature = "kafka")]
use kafka_mode::{run_kafka_scenario, run_latency_scenario};
#[cfg(feature = "kafka")]
use s9::run_search_scenario;
#[cfg(feature = "kafka")]
use s10::run_lake_scenario;
#[cfg(feature = "kafka")]
use s11::run_capture_scenario;
