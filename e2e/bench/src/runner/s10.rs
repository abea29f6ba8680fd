//! S10: Kafka -> project -> Iceberg, Keystone's iceberg sink against Flink's
//! Iceberg sink on the same REST catalog and warehouse (both exactly once, a
//! commit a second); and the Parquet part: Keystone's parquet sink against a
//! pyarrow writer (the writer's ceiling) on the same rows.

use std::io::BufRead;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use super::kafka_mode::{empty_record, keystone_serve, load_once};
use super::{
    Ctx, Summary, bench_dir, check_digest, count_lines, repo_dir, rounds, selected_engines,
    summarize,
};
use crate::digest::{Digester, Mode, OutputDigest};
use crate::kafka::drive;
use crate::measure::{self, Measured};
use crate::report::{RatioSummary, RunRecord, ScenarioResult, Stat};
use crate::scenario::{Engine, Scenario};
use crate::search::Conn;

const NAMESPACE: &str = "bench";
const SOURCE: &str = "bench.s10";
/// The five fields every engine writes, from the event's top level.
const FIELDS: [&str; 5] = ["event_id", "ts", "user_id", "amount", "country"];
/// The catalog is polled this often for the table's snapshots.
const POLL: Duration = Duration::from_millis(100);
/// After the rows are complete: a commit interval and then some, to see any
/// snapshot (or file) beyond them.
const SETTLE: Duration = Duration::from_millis(2500);
/// Flink 1.19's reflection needs these on Java 17 (Flink's own
/// `env.java.opts.all` defaults; the Iceberg committer's state goes through Kryo).
const JAVA_OPENS: [&str; 12] = [
    "java.lang",
    "java.net",
    "java.io",
    "java.nio",
    "sun.nio.ch",
    "java.lang.reflect",
    "java.text",
    "java.time",
    "java.util",
    "java.util.concurrent",
    "java.util.concurrent.atomic",
    "java.util.concurrent.locks",
];

/// The row an engine writes for an event (or reads back from a table).
fn row(ev: &Value) -> Value {
    Value::Object(
        FIELDS
            .iter()
            .map(|f| ((*f).to_owned(), ev.get(*f).cloned().unwrap_or(Value::Null)))
            .collect(),
    )
}

/// The multiset digest of the rows of every input event.
fn reference(input: &Path) -> anyhow::Result<OutputDigest> {
    let mut d = Digester::new(Mode::Multiset);
    let file = std::fs::File::open(input)?;
    for line in std::io::BufReader::with_capacity(1 << 20, file).lines() {
        let ev: Value = serde_json::from_str(&line?)?;
        d.add_value(&row(&ev))?;
    }
    Ok(d.finish())
}

/// Runs one of the testbed's readers (e2e/readers) and digests the rows it prints.
fn read_back(ctx: &Ctx, reader: &str, args: &[&str]) -> anyhow::Result<OutputDigest> {
    let script = repo_dir().join("e2e/readers").join(reader);
    let out = Command::new(&ctx.args.lake_python)
        .arg(&script)
        .args(args)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{reader} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut d = Digester::new(Mode::Multiset);
    for line in out.stdout.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        d.add_value(&row(&serde_json::from_slice(line)?))?;
    }
    Ok(d.finish())
}

/// One snapshot of a table: when it was committed and the rows it holds.
#[derive(Clone, Copy, Debug)]
struct Snap {
    seq: i64,
    at_ms: i64,
    total: u64,
}

/// The table's snapshots in commit order; `None` while it does not exist.
fn snapshots(base: &str, table: &str) -> anyhow::Result<Option<Vec<Snap>>> {
    let mut c = Conn::open(base)?;
    let (status, v) = c.json(
        "GET",
        &format!("/v1/namespaces/{NAMESPACE}/tables/{table}"),
        None,
    )?;
    match status {
        404 => return Ok(None),
        200 => {}
        other => bail!("loading table {table}: {other} {v}"),
    }
    let mut snaps: Vec<Snap> = v["metadata"]["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| Snap {
                    seq: s["sequence-number"].as_i64().unwrap_or_default(),
                    at_ms: s["timestamp-ms"].as_i64().unwrap_or_default(),
                    total: s["summary"]["total-records"]
                        .as_str()
                        .and_then(|t| t.parse().ok())
                        .unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    snaps.sort_by_key(|s| (s.seq, s.at_ms));
    Ok(Some(snaps))
}

/// The timed span of a run: from the first commit (snapshot or publish) to the
/// one at which every row is there; the rows of the first commit are not counted.
#[derive(Debug, Default)]
struct Span {
    seconds: f64,
    rows_timed: u64,
    first_rows: u64,
    commits: usize,
    final_rows: u64,
}

/// Polls the table until its current snapshot holds `expected` rows, then waits
/// [`SETTLE`] and reads the final count.
fn wait_table(
    base: &str,
    table: &str,
    expected: u64,
    timeout: Duration,
    pid: u32,
) -> anyhow::Result<Span> {
    let start = Instant::now();
    let mut exited = false;
    loop {
        let snaps = snapshots(base, table)?.unwrap_or_default();
        if snaps.last().is_some_and(|s| s.total >= expected) {
            let first = snaps[0];
            let at = snaps.iter().position(|s| s.total >= expected).unwrap_or(0);
            if at == 0 {
                bail!("every row came in the first snapshot: too few events to time");
            }
            std::thread::sleep(SETTLE);
            let last = snapshots(base, table)?.unwrap_or_default();
            return Ok(Span {
                seconds: (snaps[at].at_ms - first.at_ms) as f64 / 1000.0,
                rows_timed: snaps[at].total - first.total,
                first_rows: first.total,
                commits: at + 1,
                final_rows: last.last().map(|s| s.total).unwrap_or_default(),
            });
        }
        if exited {
            bail!(
                "the engine exited with {} of {expected} rows in the table",
                snaps.last().map(|s| s.total).unwrap_or_default()
            );
        }
        exited = !drive::alive(pid);
        if start.elapsed() > timeout {
            bail!(
                "only {} of {expected} rows after {timeout:?}",
                snaps.last().map(|s| s.total).unwrap_or_default()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Runs lake_s10.py's Parquet watcher on `dir` until `expected` rows are published.
fn wait_parquet(
    python: &str,
    dir: &Path,
    expected: u64,
    timeout: Duration,
    pid: u32,
) -> anyhow::Result<Span> {
    let out = Command::new(python)
        .arg(bench_dir().join("lake_s10.py"))
        .args(["watch", "--dir"])
        .arg(dir)
        .args([
            "--expected",
            &expected.to_string(),
            "--pid",
            &pid.to_string(),
        ])
        .args(["--timeout", &timeout.as_secs().to_string()])
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "the Parquet watcher: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let rows = v["rows"].as_u64().unwrap_or_default();
    let (Some(first), Some(done)) = (v["first_s"].as_f64(), v["done_s"].as_f64()) else {
        bail!("only {rows} of {expected} rows published");
    };
    let first_rows = v["first_rows"].as_u64().unwrap_or_default();
    if first_rows >= expected {
        bail!("every row came in the first publish: too few events to time");
    }
    Ok(Span {
        seconds: done - first,
        rows_timed: rows - first_rows,
        first_rows,
        commits: v["files"].as_u64().unwrap_or_default() as usize,
        final_rows: rows,
    })
}

fn stamp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// S10: the events (loaded into `bench.s10`, keyed by event_id, 2 partitions)
/// projected to five fields into a new Iceberg table per run (Keystone, Flink)
/// or a new Parquet folder per run (Keystone's parquet sink, the pyarrow
/// writer). Time: from the first commit to the commit at which every row is
/// there (the Iceberg snapshots' commit times from the catalog; the Parquet
/// watcher's polls); rows of the first commit are left out, so start-up and
/// the first interval's work are out for every engine. Then the rows are read
/// back with the testbed's readers and digested against the reference.
pub(super) fn run_lake_scenario(ctx: &Ctx, s: Scenario) -> anyhow::Result<ScenarioResult> {
    let args = ctx.args;
    let input = s.input(ctx.data);
    let events = count_lines(&input)?;
    eprintln!("[{}] {}: computing the reference", s.id(), s.title());
    let reference = reference(&input)?;
    load_once(ctx, s, SOURCE, &input, events, "event_id")?;
    let mut c = Conn::open(&args.iceberg_uri)?;
    let (status, body) = c.json(
        "POST",
        "/v1/namespaces",
        Some(&serde_json::json!({"namespace": [NAMESPACE]})),
    )?;
    if status != 200 && status != 409 {
        bail!("creating namespace {NAMESPACE}: {status} {body}");
    }
    let engines = selected_engines(args, s);
    let load_start = measure::loadavg();
    let mut spans: Vec<(Engine, Span)> = Vec::new();
    let runs = rounds(ctx, s, &engines, |engine, round| {
        let (record, span) = lake_run(ctx, engine, round, events, &reference, &input)?;
        spans.extend(span.map(|sp| (engine, sp)));
        Ok(record)
    })?;
    let load_end = measure::loadavg();
    let mut result = summarize(
        ctx,
        s,
        Summary {
            engines: engines.clone(),
            input,
            events,
            reference,
            load_start,
            load_end,
            startup: Vec::new(),
            runs,
        },
    )?;
    // summarize pairs Keystone (iceberg) with every other engine; the Parquet
    // pair is Keystone's parquet sink against the pyarrow writer.
    result
        .ratios
        .retain(|r| r.peer == Engine::FlinkIceberg.name());
    if engines.contains(&Engine::KeystoneParquet) && engines.contains(&Engine::ParquetCeiling) {
        result.ratios.push(parquet_ratio(ctx, &result.runs));
    }
    result.notes = Some(lake_notes(events, &spans, &engines));
    Ok(result)
}

/// keystone-parquet rows/s over pyarrow's, per round.
fn parquet_ratio(ctx: &Ctx, runs: &[RunRecord]) -> RatioSummary {
    let args = ctx.args;
    let mut per_pair = Vec::new();
    let mut failed_pairs = 0;
    for round in args.warmup..args.warmup + args.runs {
        let find = |e: Engine| {
            runs.iter()
                .find(|r| !r.warmup && r.round == round && r.engine == e.name())
        };
        let (Some(k), Some(p)) = (find(Engine::KeystoneParquet), find(Engine::ParquetCeiling))
        else {
            continue;
        };
        if !(k.digest_ok && p.digest_ok) {
            failed_pairs += 1;
            continue;
        }
        per_pair.push(k.events_per_s / p.events_per_s);
    }
    RatioSummary {
        peer: "pyarrow-ceiling (Parquet: keystone-parquet / pyarrow)".into(),
        target: None,
        met: None,
        failed_pairs,
        events_per_s: Stat::of(per_pair.iter().copied()),
        events_per_s_per_pair: per_pair,
        wall_ratio: None,
        cpu_ratio: None,
    }
}

fn lake_notes(events: u64, spans: &[(Engine, Span)], engines: &[Engine]) -> String {
    use std::fmt::Write;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Input: {events} events, each one row of five fields (event_id, ts, user_id, amount, country), partitioned by country (8 values). Iceberg (keystone, flink): a new table per run in the same REST catalog and file:// warehouse, both exactly once with a commit (snapshot) every 1 s; time from the first snapshot's commit time to that of the snapshot whose total-records reached {events} (the catalog's snapshot summaries, polled every 100 ms), rows counted: those after the first snapshot. Parquet: keystone-parquet (a commit every 1 s, files published by rename) timed the same way from the first poll (50 ms) that saw published files to the one that saw every row; pyarrow-ceiling: the time of one write_to_dataset call of the whole Arrow table (no Kafka, no parsing, no commits). Every run's rows are read back (pyiceberg, pyarrow.dataset) and digested against the reference; a table with any row more or less fails the run.\n"
    );
    let _ = writeln!(
        md,
        "| engine | commits (Iceberg snapshots; Parquet files) up to the last row, per run (warm-up first) | rows in the first commit, per run (warm-up first) |\n|---|---|---|"
    );
    for &e in engines.iter().filter(|e| **e != Engine::ParquetCeiling) {
        let mine: Vec<&Span> = spans
            .iter()
            .filter(|(x, _)| *x == e)
            .map(|(_, s)| s)
            .collect();
        let list =
            |f: &dyn Fn(&Span) -> String| mine.iter().map(|s| f(s)).collect::<Vec<_>>().join(", ");
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            e.name(),
            list(&|s| s.commits.to_string()),
            list(&|s| s.first_rows.to_string())
        );
    }
    md
}

/// The command of one S10 run and where it writes; creates nothing in the catalog.
fn lake_argv(
    ctx: &Ctx,
    engine: Engine,
    name: &str,
    table: &str,
    dir: &Path,
    input: &Path,
    created: &mut Vec<String>,
) -> anyhow::Result<Vec<String>> {
    let args = ctx.args;
    let p = |x: &Path| x.display().to_string();
    Ok(match engine {
        Engine::Keystone | Engine::KeystoneParquet => {
            let (manifest, text) = if engine == Engine::Keystone {
                let manifest = Scenario::S10.pipeline(&bench_dir());
                let text = std::fs::read_to_string(&manifest)?
                    .replace("name: bench-s10\n", &format!("name: {name}\n"))
                    .replace("table: bench_s10", &format!("table: {table}"))
                    .replace("http://127.0.0.1:19181", &args.iceberg_uri)
                    .replace("file:///tmp/warehouse", &args.iceberg_warehouse);
                (manifest, text)
            } else {
                let manifest = bench_dir().join("pipelines/s10-kafka-parquet.yaml");
                let text = std::fs::read_to_string(&manifest)?
                    .replace("name: bench-s10p\n", &format!("name: {name}\n"))
                    .replace(
                        "path: file:///tmp/bench-s10p",
                        &format!("path: file://{}", p(&dir.join("lake"))),
                    );
                (manifest, text)
            };
            let (plan, topics) = drive::compile_plan(&manifest.display().to_string(), &text, 2)?;
            keystone_serve(ctx, &plan, &topics, dir, name, created)?
        }
        Engine::FlinkIceberg => {
            let mut v = vec![
                "java".to_owned(),
                format!("-Xms{}", args.jvm_heap),
                format!("-Xmx{}", args.jvm_heap),
            ];
            v.extend(
                JAVA_OPENS
                    .iter()
                    .map(|m| format!("--add-opens=java.base/{m}=ALL-UNNAMED")),
            );
            v.extend(
                [
                    "-cp",
                    ctx.flink_iceberg_cp.as_deref().unwrap_or_default(),
                    "dev.keystone.bench.flinkice.S10Job",
                    "--bootstrap",
                    &args.brokers,
                    "--in-topic",
                    SOURCE,
                    "--group",
                    name,
                    "--catalog-uri",
                    &args.iceberg_uri,
                    "--warehouse",
                    &args.iceberg_warehouse,
                    "--namespace",
                    NAMESPACE,
                    "--table",
                    table,
                    "--checkpoint-ms",
                    "1000",
                    "--checkpoint-dir",
                    &p(&dir.join("checkpoints")),
                    "--parallelism",
                    &args.parallelism.to_string(),
                ]
                .map(String::from),
            );
            v
        }
        Engine::ParquetCeiling => vec![
            args.lake_python.clone(),
            p(&bench_dir().join("lake_s10.py")),
            "ceiling".into(),
            "--input".into(),
            p(input),
            "--out".into(),
            p(&dir.join("lake")),
        ],
        other => bail!("{} does not run S10", other.name()),
    })
}

fn lake_run(
    ctx: &Ctx,
    engine: Engine,
    round: usize,
    events: u64,
    reference: &OutputDigest,
    input: &Path,
) -> anyhow::Result<(RunRecord, Option<Span>)> {
    let args = ctx.args;
    let name = format!("bench-s10-{}-r{round}-{}", engine.name(), stamp());
    let table = name.replace('-', "_");
    let dir = ctx.scratch.join("lake").join(&name);
    std::fs::create_dir_all(&dir)?;
    let mut created = Vec::new();
    let argv = lake_argv(ctx, engine, &name, &table, &dir, input, &mut created)?;
    let timeout = Duration::from_secs(args.kafka_timeout_s);
    let iceberg = matches!(engine, Engine::Keystone | Engine::FlinkIceberg);
    let (tx, rx) = std::sync::mpsc::channel::<u32>();
    let watcher = (engine != Engine::ParquetCeiling).then(|| {
        let base = args.iceberg_uri.clone();
        let table = table.clone();
        let lake = dir.join("lake");
        let python = args.lake_python.clone();
        std::thread::spawn(move || -> anyhow::Result<Span> {
            let pid = rx.recv()?;
            let span = if iceberg {
                wait_table(&base, &table, events, timeout, pid)
            } else {
                wait_parquet(&python, &lake, events, timeout, pid)
            };
            drive::stop(pid);
            span
        })
    });
    let m = measure::run_hooked(&argv, ctx.limits, &ctx.scratch, |pid| {
        let _ = tx.send(pid);
    });
    let span = match watcher {
        Some(w) => Some(
            w.join()
                .map_err(|_| anyhow::anyhow!("the table watcher panicked"))?,
        ),
        None => None,
    };
    let m = m?;
    if let Err(e) = drive::delete_topics(&args.brokers, &created, &[]) {
        eprintln!("deleting the run's topics: {e:#}");
    }
    let (mut record, span) = finish(ctx, engine, &m, span, events, reference, &table, &dir);
    record.cpu_s_per_m_events = m.cpu_s / (events as f64 / 1e6);
    if iceberg {
        let _ = Conn::open(&args.iceberg_uri).and_then(|mut c| {
            c.json(
                "DELETE",
                &format!("/v1/namespaces/{NAMESPACE}/tables/{table}?purgeRequested=true"),
                None,
            )
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok((record, span))
}

/// The run's record: its timing and the check of its rows.
#[allow(clippy::too_many_arguments)]
fn finish(
    ctx: &Ctx,
    engine: Engine,
    m: &Measured,
    span: Option<anyhow::Result<Span>>,
    events: u64,
    reference: &OutputDigest,
    table: &str,
    dir: &Path,
) -> (RunRecord, Option<Span>) {
    let basis = match engine {
        Engine::ParquetCeiling => "write: one pyarrow write_to_dataset call (table built before)",
        Engine::KeystoneParquet => {
            "publish: first published files to the publish that completed the rows (polled every 50 ms)"
        }
        _ => {
            "commit: first snapshot to the snapshot that completed the rows (catalog commit times)"
        }
    };
    let mut record = empty_record(engine, m, basis);
    let span = match span {
        Some(Err(e)) => {
            record.error = Some(format!("{e:#}\n{}", m.stderr_tail));
            return (record, None);
        }
        Some(Ok(span)) => {
            if span.final_rows != events {
                record.error = Some(format!(
                    "the table holds {} rows, not {events}",
                    span.final_rows
                ));
                return (record, Some(span));
            }
            record.engine_s = span.seconds;
            record.events_per_s = span.rows_timed as f64 / span.seconds;
            Some(span)
        }
        None => {
            let v: Option<Value> = m
                .stdout
                .lines()
                .last()
                .and_then(|l| serde_json::from_str(l).ok());
            let Some((rows, secs)) =
                v.and_then(|v| Some((v["rows"].as_u64()?, v["seconds"].as_f64()?)))
            else {
                record.error = Some(format!("no result from the writer:\n{}", m.stderr_tail));
                return (record, None);
            };
            record.engine_s = secs;
            record.events_per_s = rows as f64 / secs;
            None
        }
    };
    let qualified = format!("{NAMESPACE}.{table}");
    let lake = dir.join("lake").display().to_string();
    let read = if matches!(engine, Engine::Keystone | Engine::FlinkIceberg) {
        read_back(
            ctx,
            "read_iceberg.py",
            &["--uri", &ctx.args.iceberg_uri, "--table", &qualified],
        )
    } else {
        read_back(ctx, "read_parquet.py", &["--path", &lake])
    };
    match read {
        Err(e) => record.error = Some(format!("reading the rows back: {e:#}")),
        Ok(d) => check_digest(&mut record, d, reference, "rows"),
    }
    (record, span)
}
