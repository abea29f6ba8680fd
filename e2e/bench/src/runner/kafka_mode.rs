//! The Kafka-mode scenarios: S5, S6 and S12 (every engine drains the pre-loaded
//! events topic into its own output topic; S12's is Avro) and S7 (latency at a
//! fixed rate).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::{
    Ctx, Summary, bench_dir, count_lines, kafka_ceiling, rounds, selected_engines, summarize,
};
use crate::digest::OutputDigest;
use crate::measure::{self, Measured};
use crate::report::{self, EngineSummary, RatioSummary, RunRecord, ScenarioResult, Stat};
use crate::scenario::{Engine, Scenario};

pub(super) fn run_kafka_scenario(ctx: &Ctx, s: Scenario) -> anyhow::Result<ScenarioResult> {
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
            records: None,
            data: args.data.clone(),
        })?;
    }
    let engines = selected_engines(args, s);
    // S12: the same events as Avro records, their schema registered.
    let registry = if s == Scenario::S12 {
        // Keystone's JSON run reads S5's topic: exactly this input (the check above
        // looks at the partitions only).
        load_once(ctx, s, source, &input, events, "event_id")?;
        let registry = crate::avro::Registry::new(&args.registry_url)?;
        crate::avro::load_once(
            &args.brokers,
            &registry,
            crate::avro::AVRO_TOPIC,
            &input,
            events,
            &args.data,
        )?;
        Some(registry)
    } else {
        None
    };
    let against_ceiling = engines.iter().any(|&e| kafka_ceiling::tracked(s, e));
    let input_records = if against_ceiling {
        kafka_ceiling::input_records(ctx, source, events)
    } else {
        events
    };
    let load_start = measure::loadavg();
    let runs = rounds(ctx, s, &engines, |engine, round| {
        // Just before Keystone's run: the loop finds the broker as the round's
        // previous run left it, as Keystone does.
        let ceiling = kafka_ceiling::tracked(s, engine)
            .then(|| kafka_ceiling::measure(ctx, s, source, input_records));
        let mut rec = kafka_run(ctx, s, engine, round, events, &reference, registry.as_ref())?;
        if let Some(ceiling) = ceiling {
            kafka_ceiling::complete(s, round, &mut rec, ceiling, events);
        }
        Ok(rec)
    })?;
    if against_ceiling {
        kafka_ceiling::clean_up(ctx, s);
    }
    let load_end = measure::loadavg();
    let mut result = summarize(
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
    )?;
    result.ceiling =
        crate::ceiling::summarize(&result.runs, crate::ceiling::how(s == Scenario::S6, source));
    Ok(result)
}

/// One Kafka-mode engine run, set up: its output topic, command, scratch folder,
/// and the topics to delete afterwards.
struct KafkaEngineRun {
    out_topic: String,
    run_dir: PathBuf,
    argv: Vec<String>,
    created: Vec<String>,
    prefixes: Vec<String>,
}

impl KafkaEngineRun {
    fn clean_up(&self, brokers: &str) {
        if let Err(e) = crate::kafka::drive::delete_topics(brokers, &self.created, &self.prefixes) {
            eprintln!("deleting the run's topics: {e:#}");
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

/// Creates the run's topics (and Keystone's plan) and builds the engine's command,
/// reading `source` (2 partitions) into a new output topic (2 partitions). S12's
/// Avro engines need the registry.
fn kafka_engine(
    ctx: &Ctx,
    s: Scenario,
    engine: Engine,
    round: usize,
    source: &str,
    registry: Option<&crate::avro::Registry>,
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
    // S7 runs the S5 topology; S12's JSON run is S5.
    let job = if s == Scenario::S7 || engine == Engine::KeystoneJson {
        Scenario::S5
    } else {
        s
    };
    let job_id = job.id().to_ascii_lowercase();
    let mut created: Vec<String> = Vec::new();
    let mut prefixes: Vec<String> = Vec::new();
    let argv: Vec<String> = match engine {
        Engine::Keystone if s == Scenario::S12 => {
            let registry = registry.context("S12 needs the registry")?;
            let (plan, topics) = crate::avro::keystone_plan(
                &s.pipeline(&bench_dir()),
                &name,
                &out_topic,
                source,
                2,
                registry,
            )?;
            keystone_serve(ctx, &plan, &topics, &run_dir, &name, &mut created)?
        }
        Engine::Keystone | Engine::KeystoneJson => {
            let (plan, topics) =
                drive::keystone_plan(&job.pipeline(&bench_dir()), &name, &out_topic, source, 2)?;
            keystone_serve(ctx, &plan, &topics, &run_dir, &name, &mut created)?
        }
        Engine::KafkaStreamsAvro => {
            let registry = registry.context("S12 needs the registry")?;
            drive::create_topics(brokers, &[drive::output_topic(&out_topic, 2)])?;
            created.push(out_topic.clone());
            prefixes.push(format!("{name}-"));
            let mut v = java(
                &ctx.kstreams_avro_cp,
                "dev.keystone.bench.kstreams.avro.AvroApp",
            );
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
                    "--registry",
                    registry.url(),
                    "--delivery",
                    "at-least-once",
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

/// The command of one Keystone instance serving stage s0 of `plan`: the plan is
/// written to `run_dir` and its topics are created (and recorded in `created`,
/// for the cleanup).
pub(super) fn keystone_serve(
    ctx: &Ctx,
    plan: &str,
    topics: &[crate::kafka::drive::TopicSpec],
    run_dir: &Path,
    name: &str,
    created: &mut Vec<String>,
) -> anyhow::Result<Vec<String>> {
    let brokers = ctx.args.brokers.as_str();
    let plan_path = run_dir.join("plan.json");
    std::fs::write(&plan_path, plan)?;
    crate::kafka::drive::create_topics(brokers, topics)?;
    created.extend(topics.iter().map(|t| t.0.clone()));
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok(vec![
        ctx.runtime_bin.display().to_string(),
        "serve".into(),
        "--plan".into(),
        plan_path.display().to_string(),
        "--stage".into(),
        "s0".into(),
        "--bootstrap-servers".into(),
        brokers.into(),
        "--instance-id".into(),
        name.to_owned(),
        "--http-addr".into(),
        format!("127.0.0.1:{port}"),
    ])
}

/// Loads `input` into `topic` (2 partitions, keyed by `key_field`) unless it
/// already holds exactly `events` records in 2 partitions.
pub(super) fn load_once(
    ctx: &Ctx,
    s: Scenario,
    topic: &str,
    input: &Path,
    events: u64,
    key_field: &str,
) -> anyhow::Result<()> {
    let args = ctx.args;
    if let Some((2, n)) = crate::kafka::drive::records(&args.brokers, topic)?
        && n as u64 == events
    {
        return Ok(());
    }
    eprintln!("[{}] loading {events} events into {topic}", s.id());
    crate::kafka::load(&crate::kafka::LoadArgs {
        brokers: args.brokers.clone(),
        topic: topic.into(),
        partitions: 2,
        input: Some(input.to_path_buf()),
        key_field: key_field.into(),
        records: None,
        data: args.data.clone(),
    })
}

pub(super) fn empty_record(engine: Engine, m: &Measured, time_basis: &str) -> RunRecord {
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
        ceiling: None,
    }
}

fn kafka_run(
    ctx: &Ctx,
    s: Scenario,
    engine: Engine,
    round: usize,
    events: u64,
    reference: &OutputDigest,
    registry: Option<&crate::avro::Registry>,
) -> anyhow::Result<RunRecord> {
    use crate::kafka::drive;
    let args = ctx.args;
    let brokers = args.brokers.as_str();
    // S12: Avro in and out, but for Keystone's JSON run (S5's topic and plan).
    let avro = s == Scenario::S12 && engine != Engine::KeystoneJson;
    let source = if avro {
        crate::avro::AVRO_TOPIC
    } else {
        "bench.events"
    };
    let run = kafka_engine(ctx, s, engine, round, source, registry)?;
    let decoder = match registry {
        Some(r) if avro => Some(crate::avro::Decoder::new(r.url())?),
        _ => None,
    };
    let expected = reference.lines;
    let (tx, rx) = std::sync::mpsc::channel::<u32>();
    let watcher = {
        let brokers = brokers.to_owned();
        let topic = run.out_topic.clone();
        let mode = s.digest_mode();
        let timeout = std::time::Duration::from_secs(args.kafka_timeout_s);
        std::thread::spawn(move || -> anyhow::Result<drive::Drained> {
            let pid = rx.recv()?;
            let drained = drive::drain(&brokers, &topic, 2, expected, mode, timeout, pid, decoder);
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
    // Before the run's topics are deleted.
    let written =
        kafka_ceiling::tracked(s, engine).then(|| kafka_ceiling::written(brokers, &run.created, s));
    run.clean_up(brokers);
    let mut record = empty_record(
        engine,
        &m,
        "drain: first output record appended (broker LogAppendTime) to the last expected one read (read_committed)",
    );
    record.cpu_s_per_m_events = m.cpu_s / (events as f64 / 1e6);
    record.ceiling = written;
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
    let mut run = kafka_engine(ctx, Scenario::S7, engine, round, &source, None)?;
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

pub(super) fn run_latency_scenario(ctx: &Ctx, s: Scenario) -> anyhow::Result<ScenarioResult> {
    let args = ctx.args;
    let input = ctx.data.events.clone();
    let lines: Vec<String> = std::fs::read_to_string(&input)?
        .lines()
        .map(str::to_owned)
        .collect();
    let engines = selected_engines(args, s);
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
        ceiling: None,
    })
}
