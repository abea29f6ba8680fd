//! S11: change data capture from PostgreSQL into Kafka. Keystone's capture
//! (`keystone-runtime capture`, release build) against Debezium's PostgreSQL
//! connector in Kafka Connect standalone, on the same database and broker:
//! rows per second of an initial snapshot, and changes per second streamed
//! from a write-heavy table. Each engine runs alone, on its own slot,
//! publication and topic, over the same data.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, Timestamp};
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
use serde_json::json;

use super::kafka_mode::empty_record;
use super::{Ctx, RunArgs, Summary, repo_dir, rounds, selected_engines, summarize};
use crate::digest::{Digester, Mode, OutputDigest};
use crate::kafka::drive;
use crate::measure;
use crate::report::{RatioSummary, RunRecord, ScenarioResult, Stat};
use crate::scenario::{Engine, Scenario};

/// The table every snapshot run copies (`--capture-rows` rows, never written).
const SNAP_TABLE: &str = "bench_s11_snap";
/// The table the writer changes before each round's streaming runs.
const WRITE_TABLE: &str = "bench_s11_write";
/// Names of everything a run creates (slots, publications, topics) start so.
const PREFIX: &str = "bench_s11";
/// After the last expected record: read on this long for any record more.
const SETTLE: Duration = Duration::from_secs(2);
/// The target for snapshot rows/s (the change throughput's is Scenario::targets).
const SNAPSHOT_TARGET: f64 = 2.0;

/// Rows of the snapshot table's and the writes' shape; `round` says which
/// round's writes changed a row last.
fn create_sql(rows: u64, updates: u64) -> String {
    format!(
        "DROP TABLE IF EXISTS {SNAP_TABLE}, {WRITE_TABLE};
CREATE TABLE {SNAP_TABLE} (id bigint PRIMARY KEY, account int NOT NULL, version int NOT NULL, round int NOT NULL,
  amount numeric(12,2), note text, updated_at timestamptz NOT NULL);
INSERT INTO {SNAP_TABLE}
  SELECT g, g % 1000, 0, 0, (g % 100000) / 100.0, 'row ' || g, '2026-01-01 00:00:00+00'::timestamptz + g * interval '1 second'
  FROM generate_series(1, {rows}) g;
CREATE TABLE {WRITE_TABLE} (LIKE {SNAP_TABLE} INCLUDING ALL);
INSERT INTO {WRITE_TABLE} SELECT * FROM {SNAP_TABLE} WHERE id <= {updates};
ALTER TABLE {SNAP_TABLE} OWNER TO keystone;
ALTER TABLE {WRITE_TABLE} OWNER TO keystone;
VACUUM ANALYZE {SNAP_TABLE};
VACUUM ANALYZE {WRITE_TABLE};
-- One round's writes, one transaction of per_txn rows at a time: four
-- transactions updating the next rows of 1..updates (each row once), then
-- one inserting new rows, and so on.
CREATE OR REPLACE PROCEDURE bench_s11_writes(r int, updates bigint, inserts bigint, per_txn int, first_new bigint)
LANGUAGE plpgsql AS $$
DECLARE
  u bigint := 0;
  i bigint := 0;
  k bigint := 0;
BEGIN
  WHILE u < updates OR i < inserts LOOP
    IF u < updates AND (k % 5 <> 4 OR i >= inserts) THEN
      UPDATE {WRITE_TABLE} SET version = version + 1, round = r, amount = amount + 0.01,
        note = 'round ' || r, updated_at = now()
        WHERE id > u AND id <= LEAST(u + per_txn, updates);
      u := LEAST(u + per_txn, updates);
    ELSE
      INSERT INTO {WRITE_TABLE}
        SELECT g, g % 1000, 0, r, 1.00, 'new in round ' || r, now()
        FROM generate_series(first_new + i, first_new + LEAST(i + per_txn, inserts) - 1) g;
      i := LEAST(i + per_txn, inserts);
    END IF;
    k := k + 1;
    COMMIT;
  END LOOP;
END $$;
"
    )
}

/// The testbed's PostgreSQL through its own `psql` (no client library in the runner).
struct Pg<'a> {
    args: &'a RunArgs,
}

impl Pg<'_> {
    /// Runs `sql` as the superuser (autocommit, stops at the first error);
    /// returns the output rows, unaligned, `|`-separated.
    fn psql(&self, sql: &str) -> anyhow::Result<String> {
        let psql = self.args.pg_bin.join("psql");
        let mut child = Command::new(&psql)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(&self.args.pg_admin_url)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", psql.display()))?;
        child
            .stdin
            .take()
            .context("psql's stdin")?
            .write_all(sql.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "psql failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                sql.lines().take(3).collect::<Vec<_>>().join("\n")
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Drops a slot, waiting while a walsender still holds it (an engine just stopped).
    fn drop_slot(&self, slot: &str) {
        for _ in 0..100 {
            let sql = format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}'"
            );
            if self.psql(&sql).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("[S11] could not drop slot {slot}");
    }

    /// Slots and publications of earlier, interrupted runs.
    fn drop_leftovers(&self) -> anyhow::Result<()> {
        self.psql(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE '{PREFIX}%' AND NOT active;
             SELECT 'DROP PUBLICATION ' || pubname FROM pg_publication WHERE pubname LIKE '{PREFIX}%' \\gexec"
        ))?;
        Ok(())
    }

    /// The multiset digest of `{"id", "version"}` of the rows `filter` selects.
    fn digest(&self, table: &str, filter: &str) -> anyhow::Result<OutputDigest> {
        let out = self.psql(&format!("SELECT id, version FROM {table} WHERE {filter}"))?;
        let mut d = Digester::new(Mode::Multiset);
        for line in out.lines().filter(|l| !l.is_empty()) {
            let (id, version) = line.split_once('|').context("a row without |")?;
            d.add_value(&json!({"id": id.parse::<i64>()?, "version": version.parse::<i64>()?}))?;
        }
        Ok(d.finish())
    }
}

/// Where `e2e/testbed.d/debezium.sh ensure` installed Kafka Connect and the connector.
struct DebeziumInstall {
    classpath: String,
    plugin_path: String,
}

fn debezium_install() -> anyhow::Result<DebeziumInstall> {
    let script = repo_dir().join("e2e/testbed.d/debezium.sh");
    let out = Command::new(&script)
        .arg("ensure")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} ensure failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8(out.stdout)?;
    let var = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
            .with_context(|| format!("{} printed no {name}", script.display()))
    };
    Ok(DebeziumInstall {
        classpath: var("KEYSTONE_DEBEZIUM_CLASSPATH")?,
        plugin_path: var("KEYSTONE_DEBEZIUM_PLUGIN_PATH")?,
    })
}

/// Which phase an engine measures.
fn is_snapshot(engine: Engine) -> bool {
    matches!(engine, Engine::KeystoneSnapshot | Engine::DebeziumSnapshot)
}

fn is_debezium(engine: Engine) -> bool {
    matches!(engine, Engine::Debezium | Engine::DebeziumSnapshot)
}

/// Connect's producer gets Keystone's producer batching, so both send the
/// same kind of batches to the broker.
const CONNECT_PRODUCER: &str = "producer.compression.type=lz4
producer.linger.ms=5
producer.batch.size=262144
";

/// One run's names: slot, publication, topic (lower case, underscores).
struct Names {
    slot: String,
    publication: String,
    topic: String,
}

fn names(engine: Engine, round: usize, table: &str) -> Names {
    let base = format!(
        "{PREFIX}_{}_r{round}_{}",
        engine.name().replace('-', "_"),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
    );
    Names {
        slot: base.clone(),
        publication: base.clone(),
        // Debezium's: <topic.prefix>.<schema>.<table>.
        topic: if is_debezium(engine) {
            format!("{base}.public.{table}")
        } else {
            base.replace('_', "-")
        },
    }
}

/// The command of one run (and what it writes into `dir`).
fn argv(
    ctx: &Ctx,
    engine: Engine,
    n: &Names,
    table: &str,
    dir: &Path,
    debezium: Option<&DebeziumInstall>,
) -> anyhow::Result<Vec<String>> {
    let a = ctx.args;
    let p = |x: &Path| x.display().to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    if !is_debezium(engine) {
        let config = json!({
            "postgres": {"host": a.pg_host, "port": a.pg_port, "database": a.pg_database, "user": a.pg_user},
            "tables": [format!("public.{table}")],
            "publication": n.publication, "createPublication": false,
            "slot": n.slot, "createSlot": engine == Engine::KeystoneSnapshot,
            "topic": n.topic,
            "envelope": "debezium",
            "decimalHandling": "string",
            "snapshot": {"mode": if engine == Engine::KeystoneSnapshot { "initial" } else { "never" }},
            "commitInterval": "100ms",
        });
        let path = dir.join("capture.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
        return Ok(vec![
            "env".into(),
            format!("KEYSTONE_POSTGRES_PASSWORD={}", a.pg_password),
            format!("KEYSTONE_HTTP_ADDR=127.0.0.1:{port}"),
            "RUST_LOG=info".into(),
            p(&ctx.runtime_bin),
            "capture".into(),
            "--config".into(),
            p(&path),
            "--bootstrap-servers".into(),
            a.brokers.clone(),
        ]);
    }
    let install = debezium.context("Debezium is not installed")?;
    let worker = dir.join("worker.properties");
    std::fs::write(
        &worker,
        format!(
            "bootstrap.servers={}
key.converter=org.apache.kafka.connect.json.JsonConverter
value.converter=org.apache.kafka.connect.json.JsonConverter
key.converter.schemas.enable=false
value.converter.schemas.enable=false
offset.storage.file.filename={}
offset.flush.interval.ms=1000
listeners=http://127.0.0.1:{port}
plugin.path={}
plugin.discovery=service_load
{CONNECT_PRODUCER}",
            a.brokers,
            p(&dir.join("offsets.dat")),
            install.plugin_path
        ),
    )?;
    let connector = dir.join("connector.properties");
    std::fs::write(
        &connector,
        format!(
            "name={slot}
connector.class=io.debezium.connector.postgresql.PostgresConnector
tasks.max=1
database.hostname={}
database.port={}
database.user={}
database.password={}
database.dbname={}
topic.prefix={slot}
plugin.name=pgoutput
slot.name={slot}
publication.name={}
publication.autocreate.mode=disabled
table.include.list=public.{table}
decimal.handling.mode=string
snapshot.mode={}
",
            a.pg_host,
            a.pg_port,
            a.pg_user,
            a.pg_password,
            a.pg_database,
            n.publication,
            if engine == Engine::DebeziumSnapshot {
                "initial"
            } else {
                "no_data"
            },
            slot = n.slot,
        ),
    )?;
    let log4j = dir.join("log4j2.properties");
    std::fs::write(
        &log4j,
        "rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
",
    )?;
    Ok(vec![
        "java".into(),
        format!("-Xms{}", a.jvm_heap),
        format!("-Xmx{}", a.jvm_heap),
        format!("-Dlog4j2.configurationFile={}", p(&log4j)),
        "-cp".into(),
        install.classpath.clone(),
        "org.apache.kafka.connect.cli.ConnectStandalone".into(),
        p(&worker),
        p(&connector),
    ])
}

/// The fields of an event the watcher reads.
#[derive(Deserialize)]
struct Event {
    op: String,
    after: Option<After>,
}

#[derive(Deserialize)]
struct After {
    id: i64,
    version: i64,
}

/// What the watcher saw of one run.
struct Watched {
    /// Events of the phase's kind (`r`, or `c` and `u`).
    count: u64,
    /// Records of another kind, or beyond the expected count.
    unexpected: u64,
    first_append_ms: i64,
    last_read_ms: i64,
    digest: OutputDigest,
    /// When the engine was started and when its first record was appended, epoch ms.
    started_ms: i64,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Reads `topic` (read_committed) until `expected` events of the phase's kind
/// arrived, then [`SETTLE`] more for any record beyond them; digests
/// `{"id", "version"}` of each event's `after`.
fn watch(
    brokers: &str,
    topic: &str,
    snapshot: bool,
    expected: u64,
    timeout: Duration,
    timer_pid: u32,
    started_ms: i64,
) -> anyhow::Result<Watched> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("keystone-bench-s11-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .set(
            "fetch.queue.backoff.ms",
            crate::kafka::FETCH_QUEUE_BACKOFF_MS,
        )
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let mut digester = Digester::new(Mode::Multiset);
    let (mut count, mut unexpected) = (0u64, 0u64);
    let mut first_append_ms = i64::MAX;
    let mut last_read_ms = 0;
    let deadline = Instant::now() + timeout;
    let mut settle_until: Option<Instant> = None;
    loop {
        if settle_until.is_some_and(|t| Instant::now() >= t) {
            break;
        }
        if Instant::now() > deadline {
            bail!("{count} of {expected} events in {topic} after {timeout:?}");
        }
        let Some(msg) = consumer.poll(Duration::from_millis(100)) else {
            if !drive::alive(timer_pid) {
                bail!("the engine exited with {count} of {expected} events in {topic}");
            }
            continue;
        };
        let msg = msg?;
        if let Timestamp::LogAppendTime(ms) | Timestamp::CreateTime(ms) = msg.timestamp() {
            first_append_ms = first_append_ms.min(ms);
        }
        // Debezium's tombstones (after deletes): the workload deletes nothing.
        let Some(payload) = msg.payload() else {
            unexpected += 1;
            continue;
        };
        let event: Event = serde_json::from_slice(payload)
            .with_context(|| format!("an event of {topic} does not read"))?;
        let wanted = if snapshot {
            event.op == "r"
        } else {
            event.op == "c" || event.op == "u"
        };
        match event.after {
            Some(after) if wanted && count < expected => {
                digester.add_value(&json!({"id": after.id, "version": after.version}))?;
                count += 1;
                if count == expected {
                    last_read_ms = now_ms();
                    settle_until = Some(Instant::now() + SETTLE);
                }
            }
            _ => unexpected += 1,
        }
    }
    Ok(Watched {
        count,
        unexpected,
        first_append_ms,
        last_read_ms,
        digest: digester.finish(),
        started_ms,
    })
}

/// Per round: the slots of the streaming runs, made before the writes.
struct RoundSlots {
    round: usize,
    names: HashMap<&'static str, Names>,
    reference: OutputDigest,
    write_s: f64,
}

/// Notes per run, for the section's table.
struct RunNote {
    engine: Engine,
    first_record_s: f64,
    unexpected: u64,
}

/// S11: `--capture-rows` N. Snapshot runs: a fresh slot per run on a table of N
/// rows; time from the first snapshot record's append to reading the N-th.
/// Streaming runs: per round, one slot per engine made before the writer
/// commits N changes (4/5 updates of distinct rows, 1/5 inserts, in
/// transactions of `--capture-txn-rows` rows), then each engine alone drains
/// its slot's backlog from a cold start; time from the first change's append
/// to reading the N-th. Every run's events are digested (`id`, `version` of
/// `after`) against the table.
pub(super) fn run_capture_scenario(ctx: &Ctx, s: Scenario) -> anyhow::Result<ScenarioResult> {
    let args = ctx.args;
    let pg = Pg { args };
    let rows = args.capture_rows;
    let updates = rows * 4 / 5;
    let inserts = rows - updates;
    let engines = selected_engines(args, s);
    let debezium = if engines.iter().any(|e| is_debezium(*e)) {
        Some(debezium_install()?)
    } else {
        None
    };
    eprintln!("[S11] creating {SNAP_TABLE} ({rows} rows) and {WRITE_TABLE} ({updates} rows)");
    pg.drop_leftovers()?;
    let sql = create_sql(rows, updates);
    let workload = ctx.scratch.join("s11-workload.sql");
    std::fs::write(&workload, &sql)?;
    pg.psql(&sql)?;
    let snapshot_reference = pg.digest(SNAP_TABLE, "true")?;
    let load_start = measure::loadavg();
    let mut slots: Option<RoundSlots> = None;
    let mut notes: Vec<RunNote> = Vec::new();
    let mut write_times: Vec<f64> = Vec::new();
    let streaming: Vec<Engine> = engines
        .iter()
        .copied()
        .filter(|e| !is_snapshot(*e))
        .collect();
    let runs = rounds(ctx, s, &engines, |engine, round| {
        let (table, reference, n) = if is_snapshot(engine) {
            let n = names(engine, round, SNAP_TABLE);
            pg.psql(&format!(
                "CREATE PUBLICATION {} FOR TABLE {SNAP_TABLE}",
                n.publication
            ))?;
            (SNAP_TABLE, snapshot_reference.clone(), n)
        } else {
            if slots.as_ref().is_none_or(|sl| sl.round != round) {
                let prepared = prepare_round(&pg, &streaming, round, updates, inserts)?;
                write_times.push(prepared.write_s);
                slots = Some(prepared);
            }
            let sl = slots.as_mut().context("no slots")?;
            let n = sl
                .names
                .remove(engine.name())
                .context("no slot for the engine")?;
            (WRITE_TABLE, sl.reference.clone(), n)
        };
        let result = capture_run(ctx, engine, table, &n, &reference, debezium.as_ref());
        pg.drop_slot(&n.slot);
        if is_snapshot(engine) {
            pg.psql(&format!("DROP PUBLICATION IF EXISTS {}", n.publication))?;
        }
        let (record, note) = result?;
        notes.extend(note);
        Ok(record)
    })?;
    pg.drop_leftovers()?;
    let load_end = measure::loadavg();
    let mut result = summarize(
        ctx,
        s,
        Summary {
            engines: engines.clone(),
            input: workload,
            events: rows,
            reference: snapshot_reference,
            load_start,
            load_end,
            startup: Vec::new(),
            runs,
        },
    )?;
    // summarize pairs Keystone (changes) with every other engine; the
    // snapshot pair is keystone-snapshot against debezium-snapshot.
    result.ratios.retain(|r| r.peer == Engine::Debezium.name());
    if engines.contains(&Engine::KeystoneSnapshot) && engines.contains(&Engine::DebeziumSnapshot) {
        result.ratios.push(pair_ratio(
            ctx,
            &result.runs,
            Engine::KeystoneSnapshot,
            Engine::DebeziumSnapshot,
        ));
    }
    result.pipeline = Some("e2e/bench/src/runner/s11.rs (capture configurations)".into());
    result.notes = Some(capture_notes(args, rows, &write_times, &notes));
    Ok(result)
}

/// The round's streaming slots (one per engine, over one publication each),
/// then the writer's N changes; the reference: every row this round changed,
/// at its version now.
fn prepare_round(
    pg: &Pg,
    engines: &[Engine],
    round: usize,
    updates: u64,
    inserts: u64,
) -> anyhow::Result<RoundSlots> {
    let mut map = HashMap::new();
    for &engine in engines {
        let n = names(engine, round, WRITE_TABLE);
        pg.psql(&format!(
            "CREATE PUBLICATION {} FOR TABLE {WRITE_TABLE};
             SELECT pg_create_logical_replication_slot('{}', 'pgoutput');",
            n.publication, n.slot
        ))?;
        map.insert(engine.name(), n);
    }
    let r = round + 1;
    let first_new = 1_000_000_000 + r as u64 * 100_000_000;
    let t = Instant::now();
    pg.psql(&format!(
        "CALL bench_s11_writes({r}, {updates}, {inserts}, {}, {first_new});",
        pg.args.capture_txn_rows
    ))?;
    let write_s = t.elapsed().as_secs_f64();
    eprintln!(
        "[S11] round {round}: {} changes written in {write_s:.1} s ({:.0}/s)",
        updates + inserts,
        (updates + inserts) as f64 / write_s
    );
    let reference = pg.digest(WRITE_TABLE, &format!("round = {r}"))?;
    Ok(RoundSlots {
        round,
        names: map,
        reference,
        write_s,
    })
}

fn capture_run(
    ctx: &Ctx,
    engine: Engine,
    table: &str,
    n: &Names,
    reference: &OutputDigest,
    debezium: Option<&DebeziumInstall>,
) -> anyhow::Result<(RunRecord, Option<RunNote>)> {
    let args = ctx.args;
    let dir = ctx.scratch.join("capture").join(&n.slot);
    std::fs::create_dir_all(&dir)?;
    drive::create_topics(&args.brokers, &[drive::output_topic(&n.topic, 1)])?;
    let argv = argv(ctx, engine, n, table, &dir, debezium)?;
    let expected = reference.lines;
    let snapshot = is_snapshot(engine);
    let (tx, rx) = std::sync::mpsc::channel::<u32>();
    let watcher = {
        let brokers = args.brokers.clone();
        let topic = n.topic.clone();
        let timeout = Duration::from_secs(args.kafka_timeout_s);
        std::thread::spawn(move || -> anyhow::Result<Watched> {
            let pid = rx.recv()?;
            let watched = watch(&brokers, &topic, snapshot, expected, timeout, pid, now_ms());
            drive::stop(pid);
            watched
        })
    };
    let m = measure::run_hooked(&argv, ctx.limits, &ctx.scratch, |pid| {
        let _ = tx.send(pid);
    });
    let watched = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("the topic watcher panicked"))?;
    let m = m?;
    if let Err(e) = drive::delete_topics(&args.brokers, std::slice::from_ref(&n.topic), &[]) {
        eprintln!("deleting the run's topic: {e:#}");
    }
    let mut record = empty_record(
        engine,
        &m,
        "drain: from the first record's append time to reading the last expected one (read_committed)",
    );
    record.cpu_s_per_m_events = m.cpu_s / (expected as f64 / 1e6);
    let note = match watched {
        Err(e) => {
            let log = if is_debezium(engine) {
                tail(&m.stdout, 30)
            } else {
                m.stderr_tail.clone()
            };
            record.error = Some(format!("{e:#}\n{log}"));
            None
        }
        Ok(w) => {
            record.engine_s = (w.last_read_ms - w.first_append_ms) as f64 / 1000.0;
            record.events_per_s = w.count as f64 / record.engine_s;
            record.digest_ok = w.digest == *reference && w.unexpected == 0;
            if !record.digest_ok {
                record.error = Some(format!(
                    "events digest {} ({} events, {} other records) differs from the table's {} ({} rows)",
                    w.digest.sha256,
                    w.digest.lines,
                    w.unexpected,
                    reference.sha256,
                    reference.lines
                ));
            }
            record.output = Some(w.digest);
            Some(RunNote {
                engine,
                first_record_s: (w.first_append_ms - w.started_ms) as f64 / 1000.0,
                unexpected: w.unexpected,
            })
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok((record, note))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `a`'s events/s over `b`'s, per round.
fn pair_ratio(ctx: &Ctx, runs: &[RunRecord], a: Engine, b: Engine) -> RatioSummary {
    let args = ctx.args;
    let mut per_pair = Vec::new();
    let mut wall = Vec::new();
    let mut cpu = Vec::new();
    let mut failed_pairs = 0;
    for round in args.warmup..args.warmup + args.runs {
        let find = |e: Engine| {
            runs.iter()
                .find(|r| !r.warmup && r.round == round && r.engine == e.name())
        };
        let (Some(x), Some(y)) = (find(a), find(b)) else {
            continue;
        };
        if !(x.digest_ok && y.digest_ok) {
            failed_pairs += 1;
            continue;
        }
        per_pair.push(x.events_per_s / y.events_per_s);
        wall.push(y.wall_s / x.wall_s);
        cpu.push(y.cpu_s_per_m_events / x.cpu_s_per_m_events);
    }
    let stat = Stat::of(per_pair.iter().copied());
    RatioSummary {
        peer: format!(
            "{} (snapshot rows/s: {} / {})",
            b.name(),
            a.name(),
            b.name()
        ),
        target: Some(SNAPSHOT_TARGET),
        met: Some(failed_pairs == 0 && stat.as_ref().is_some_and(|s| s.median >= SNAPSHOT_TARGET)),
        failed_pairs,
        events_per_s: stat,
        events_per_s_per_pair: per_pair,
        wall_ratio: Stat::of(wall.into_iter()),
        cpu_ratio: Stat::of(cpu.into_iter()),
    }
}

fn capture_notes(args: &RunArgs, rows: u64, write_times: &[f64], notes: &[RunNote]) -> String {
    use std::fmt::Write;
    let mut md = String::new();
    let updates = rows * 4 / 5;
    let _ = writeln!(
        md,
        "Workload (`s11-workload.sql` in the bench cache, written by the runner): `{SNAP_TABLE}`, {rows} rows of 7 columns (bigint key, int, int, int, numeric(12,2), text, timestamptz), for the snapshot runs (a fresh slot per run: Keystone and Debezium each create theirs); `{WRITE_TABLE}`, {updates} rows of the same shape, which a PL/pgSQL procedure changes before each round's streaming runs: {rows} changes in transactions of {} rows (four transactions updating the next rows, each row once per round, then one inserting new rows: {updates} updates and {} inserts), committed while one slot per streaming engine (made just before, over its own publication) retains them. Each engine then runs alone and drains its slot's backlog from a cold start. Time: from the first record's broker append time (LogAppendTime) to the moment the watcher read the last expected event (read_committed), so start-up (the JVM and Connect's plugin loading; the slot's creation) is left out for both; rows/s and changes/s = N / that time. Every run's events are digested (`id` and `version` of `after`, as a multiset) against the table read by SELECT (snapshot: every row at version 0; streaming: every row the round changed, at its version after the round), and a record of another kind or beyond N fails the run (a SETTLE of {} s is read after the last one). The topic has 1 partition (`LogAppendTime`).\n",
        args.capture_txn_rows,
        rows - updates,
        SETTLE.as_secs()
    );
    if !write_times.is_empty() {
        let list: Vec<String> = write_times
            .iter()
            .map(|t| format!("{t:.1} s ({:.0}/s)", rows as f64 / t))
            .collect();
        let _ = writeln!(
            md,
            "PostgreSQL's writes per round (warm-up first): {}.\n",
            list.join(", ")
        );
    }
    let _ = writeln!(
        md,
        "| engine | seconds from process start to the first record, per run (warm-up first) | other records per run |\n|---|---|---|"
    );
    let mut engines: Vec<Engine> = Vec::new();
    for n in notes {
        if !engines.contains(&n.engine) {
            engines.push(n.engine);
        }
    }
    for e in engines {
        let mine: Vec<&RunNote> = notes.iter().filter(|n| n.engine == e).collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            e.name(),
            mine.iter()
                .map(|n| format!("{:.1}", n.first_record_s))
                .collect::<Vec<_>>()
                .join(", "),
            mine.iter()
                .map(|n| n.unexpected.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    md
}
