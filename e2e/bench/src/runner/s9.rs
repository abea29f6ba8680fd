//! S9: Kafka -> dedup, order, project -> OpenSearch bulk, Keystone against
//! Flink's OpenSearch connector and a plain bulk loader (the index's ceiling).

use std::path::Path;

use anyhow::bail;

use super::kafka_mode::{empty_record, keystone_serve, load_once};
use super::{Ctx, Summary, bench_dir, count_lines, rounds, selected_engines, summarize};
use crate::measure;
use crate::report::{RunRecord, ScenarioResult, Stat};
use crate::scenario::{Engine, Scenario};

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
pub(super) fn run_search_scenario(ctx: &Ctx, s: Scenario) -> anyhow::Result<ScenarioResult> {
    use crate::search;
    let args = ctx.args;
    let input = s.input(ctx.data);
    let events = count_lines(&input)?;
    eprintln!("[{}] {}: computing the reference", s.id(), s.title());
    let reference = search::reference(&input)?;
    let docs_file = ctx.scratch.join("s9-documents.tsv");
    search::write_docs(&docs_file, &reference)?;
    let source = "bench.cdc";
    load_once(ctx, s, source, &input, events, "order_id")?;
    let engines = selected_engines(args, s);
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
            keystone_serve(ctx, &plan, &topics, &run_dir, &name, &mut created)?
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
