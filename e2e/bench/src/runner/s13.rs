//! S13: records per second ingested over HTTP. Keystone's endpoint
//! (`keystone-runtime ingest`, release build) is driven by vegeta with NDJSON
//! batches of the generated events on a fixed number of connections, and
//! answers 2xx only once the broker acknowledged every record (idempotent
//! producer, acks=all); the ceiling is a plain rdkafka producer writing the
//! same events to the same broker (`keystone-bench load`), in the same rounds.
//! No peer HTTP-to-Kafka path runs here (README.md, S13).

use std::path::PathBuf;

use clap::Args;

use super::RunArgs;
use crate::scenario::Engine;

#[derive(Debug, Args)]
pub struct HttpArgs {
    /// S13: seconds vegeta sends requests in each Keystone run.
    #[arg(long, default_value_t = 30)]
    pub http_secs: u64,
    /// S13: records per NDJSON request.
    #[arg(long, default_value_t = 100)]
    pub http_batch: usize,
    /// S13: vegeta's workers and connections, and the endpoint's requests in flight.
    #[arg(long, default_value_t = 64)]
    pub http_connections: usize,
    /// S13: distinct request bodies (consecutive generated events), sent in turn.
    #[arg(long, default_value_t = 1000)]
    pub http_bodies: usize,
    /// S13: the vegeta binary (the testbed's: `eval "$(e2e/testbed env)"`).
    #[arg(long, env = "KEYSTONE_TESTBED_VEGETA", default_value = "vegeta")]
    pub vegeta: PathBuf,
}

/// The configurations of S13's engines, as the results list them.
pub(super) fn config_text(args: &RunArgs, engine: Engine) -> String {
    let h = &args.http;
    if engine == Engine::ProducerCeiling {
        return format!(
            "keystone-bench load: the generated events file read line by line (again from the start as needed, for as many records as the endpoint acknowledged in the same round) and produced with librdkafka (BaseProducer: acks=all, idempotent, linger 5 ms, batch.size 1,000,000, no compression, the default partitioner, keyed by event_id) into a topic of the same partitions, flushed at the end; records/s from the first send to the flush's return; the Kafka 4.1.1 broker at {}",
            args.brokers
        );
    }
    format!(
        "keystone-runtime ingest (release build) serving the plan compiled from pipelines/s13-http-ingest.yaml (one bearer token, NDJSON checked against S5's event schema and key, no idempotency field, --max-in-flight {c}; its producer: acks=all, idempotent, lz4, linger 5 ms, 256 KiB batches, murmur2_random; a 2xx only once every record of the request is acknowledged), driven by vegeta {} (JSON targets with bodies, -rate=0 -workers={c} -max-workers={c} -connections={c} -max-connections={c}, keep-alive HTTP/1.1) for {} s per run with {} distinct bodies of {} records in turn; records/s = 2xx answers x {} / (attack duration + wait for the last answer); the Kafka 4.1.1 broker at {}",
        std::env::var("KEYSTONE_VEGETA_VERSION").unwrap_or_else(|_| "v12.13.0".into()),
        h.http_secs,
        h.http_bodies,
        h.http_batch,
        h.http_batch,
        args.brokers,
        c = h.http_connections,
    )
}

/// Base64 (RFC 4648, padded): vegeta's JSON targets carry bodies so.
#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (b(0) << 16) | (b(1) << 8) | b(2);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(not(feature = "kafka"))]
pub(super) fn run_http_scenario(
    _: &super::Ctx,
    s: crate::scenario::Scenario,
) -> anyhow::Result<crate::report::ScenarioResult> {
    anyhow::bail!(
        "{} runs on Kafka: build the runner with `cargo build --release -p keystone-bench --features kafka`",
        s.id()
    )
}

#[cfg(feature = "kafka")]
pub(super) use with_kafka::run_http_scenario;

#[cfg(feature = "kafka")]
mod with_kafka {
    use std::collections::BTreeMap;
    use std::io::{BufRead, Read, Write};
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use anyhow::{Context, bail};
    use serde_json::Value;

    use super::super::kafka_mode::empty_record;
    use super::super::{Ctx, Summary, bench_dir, rounds, selected_engines, summarize};
    use super::base64;
    use crate::digest::OutputDigest;
    use crate::kafka::drive;
    use crate::measure::{self, Measured};
    use crate::report::{InputInfo, RunRecord, ScenarioResult};
    use crate::scenario::{Engine, Scenario};

    /// The source topic's name in the manifest, replaced per run.
    const SOURCE: &str = "bench.s13.in";
    const TOKEN_NAME: &str = "bench";
    const TOKEN: &str = "tok-s13-bench";

    /// What every run of the scenario shares.
    struct Setup {
        manifest: PathBuf,
        manifest_text: String,
        path: String,
        partitions: i32,
        /// The request bodies, base64, for vegeta's JSON targets.
        bodies: Vec<String>,
        events: PathBuf,
        broker_pid: Option<u32>,
    }

    /// What the notes say of one run.
    struct RunNote {
        round: usize,
        engine: Engine,
        records_per_s: f64,
        seconds: f64,
        requests: u64,
        ok: u64,
        /// p50, p90, p99 and max request latency, ms.
        latency_ms: [f64; 4],
        topic_records: i64,
        acknowledged: u64,
        engine_cpu_s: f64,
        vegeta_cpu_s: Option<f64>,
        broker_cpu_s: Option<f64>,
        /// CPU seconds of the endpoint's threads during the attack, by kind.
        threads: Vec<(String, f64)>,
    }

    /// CPU seconds (user + system) in a `/proc/.../stat` file.
    fn stat_cpu_s(path: &Path) -> Option<f64> {
        let stat = std::fs::read_to_string(path).ok()?;
        let after = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        let utime: f64 = f.get(11)?.parse().ok()?;
        let stime: f64 = f.get(12)?.parse().ok()?;
        Some((utime + stime) / 100.0) // USER_HZ
    }

    fn process_cpu_s(pid: Option<u32>) -> Option<f64> {
        stat_cpu_s(Path::new(&format!("/proc/{}/stat", pid?)))
    }

    /// CPU seconds per kind of thread of `pid` (the thread's name without its
    /// number): tokio's workers parse and check, librdkafka's threads batch,
    /// compress and talk to the broker.
    fn thread_cpu(pid: u32) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return out;
        };
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let kind = comm
                .trim()
                .trim_end_matches(|c: char| c.is_ascii_digit() || c == '-')
                .to_owned();
            if let Some(cpu) = stat_cpu_s(&task.path().join("stat")) {
                *out.entry(kind).or_default() += cpu;
            }
        }
        out
    }

    /// The testbed's broker: `$KEYSTONE_TESTBED_STATE/pids/kafka.pid` (pid, start time).
    fn broker_pid() -> Option<u32> {
        let state = std::env::var_os("KEYSTONE_TESTBED_STATE")?;
        let text = std::fs::read_to_string(Path::new(&state).join("pids/kafka.pid")).ok()?;
        text.split_whitespace().next()?.parse().ok()
    }

    fn stamp() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
    }

    fn free_port() -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    }

    /// `GET /healthz` answers 200.
    fn healthy(port: u16) -> bool {
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        if stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).is_ok() && head.ends_with(b" 200")
    }

    /// The first `bodies` x `batch` generated events, as NDJSON bodies (base64).
    fn bodies(events: &Path, bodies: usize, batch: usize) -> anyhow::Result<(Vec<String>, u64)> {
        let file = std::fs::File::open(events).with_context(|| events.display().to_string())?;
        let mut lines = std::io::BufReader::new(file).lines();
        let (mut out, mut bytes) = (Vec::with_capacity(bodies), 0u64);
        for _ in 0..bodies {
            let mut body = String::new();
            for _ in 0..batch {
                let line = lines
                    .next()
                    .context("fewer generated events than bodies x batch")??;
                body.push_str(&line);
                body.push('\n');
            }
            bytes += body.len() as u64;
            out.push(base64(body.as_bytes()));
        }
        Ok((out, bytes))
    }

    /// S13: per round, Keystone's endpoint under vegeta for `--http-secs`, then
    /// the plain producer writing the generated events; each into a fresh topic
    /// of the endpoint's partitions, whose record count must equal what was
    /// acknowledged (2xx answers x batch; the producer's records).
    pub(in super::super) fn run_http_scenario(
        ctx: &Ctx,
        s: Scenario,
    ) -> anyhow::Result<ScenarioResult> {
        let args = ctx.args;
        let h = &args.http;
        if !ctx.runtime_bin.exists() {
            bail!(
                "{} does not exist: build it with `cargo build --release -p keystone-runtime`",
                ctx.runtime_bin.display()
            );
        }
        let manifest = s.pipeline(&bench_dir());
        let manifest_text = std::fs::read_to_string(&manifest)?;
        let (plan, _) = drive::compile_plan(&manifest.display().to_string(), &manifest_text, 1)?;
        let plan: keystone_crds::Plan = serde_json::from_str(&plan)?;
        let http = plan
            .ingest
            .context("the S13 manifest has no spec.source.http")?;
        let (encoded, bytes) = bodies(&ctx.data.events, h.http_bodies, h.http_batch)?;
        let setup = Setup {
            manifest: manifest.clone(),
            manifest_text,
            path: http.path.clone(),
            partitions: http.partitions,
            bodies: encoded,
            events: ctx.data.events.clone(),
            broker_pid: broker_pid(),
        };
        if setup.broker_pid.is_none() {
            eprintln!(
                "[S13] no $KEYSTONE_TESTBED_STATE/pids/kafka.pid: the broker's CPU is not reported"
            );
        }
        let engines = selected_engines(args, s);
        let load_start = measure::loadavg();
        let mut notes: Vec<RunNote> = Vec::new();
        let runs = rounds(ctx, s, &engines, |engine, round| {
            let (record, note) = if engine == Engine::ProducerCeiling {
                // As many records as the endpoint took in this round.
                let records = notes
                    .iter()
                    .rfind(|n| n.round == round && n.engine == Engine::Keystone)
                    .map(|n| n.acknowledged);
                ceiling_run(ctx, &setup, round, records)?
            } else {
                ingest_run(ctx, &setup, round)?
            };
            notes.extend(note);
            Ok(record)
        })?;
        let load_end = measure::loadavg();
        let mut result = summarize(
            ctx,
            s,
            Summary {
                engines,
                input: ctx.data.events.clone(),
                events: (h.http_bodies * h.http_batch) as u64,
                reference: OutputDigest {
                    lines: 0,
                    sha256: String::new(),
                },
                load_start,
                load_end,
                startup: Vec::new(),
                runs,
            },
        )?;
        // Runs differ in their records and the processes wait before and
        // after the load: only the measured time means anything.
        for e in &mut result.engines {
            e.events_per_s_wall = None;
        }
        for r in &mut result.ratios {
            r.wall_ratio = None;
        }
        result.reference = None;
        result.input = Some(InputInfo {
            path: ctx.data.events.display().to_string(),
            events: (h.http_bodies * h.http_batch) as u64,
            bytes,
        });
        result.notes = Some(notes_markdown(args, &setup, &notes));
        Ok(result)
    }

    /// One run of the endpoint: a fresh topic, the process under the runner's
    /// limits, vegeta against it, then the topic's records counted.
    fn ingest_run(
        ctx: &Ctx,
        setup: &Setup,
        round: usize,
    ) -> anyhow::Result<(RunRecord, Option<RunNote>)> {
        let args = ctx.args;
        let h = &args.http;
        let name = format!("bench-s13-keystone-r{round}-{}", stamp());
        let dir = ctx.scratch.join("s13").join(&name);
        std::fs::create_dir_all(dir.join("tokens"))?;
        std::fs::write(dir.join("tokens").join(TOKEN_NAME), TOKEN)?;
        let (plan, _) = drive::compile_plan(
            &setup.manifest.display().to_string(),
            &setup
                .manifest_text
                .replace(&format!("topic: {SOURCE}"), &format!("topic: {name}")),
            setup.partitions,
        )?;
        let plan_path = dir.join("plan.json");
        std::fs::write(&plan_path, plan)?;
        drive::create_topics(&args.brokers, &[(name.clone(), setup.partitions, vec![])])?;
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}{}", setup.path);
        let targets = dir.join("targets.json");
        let mut out = std::io::BufWriter::new(std::fs::File::create(&targets)?);
        for body in &setup.bodies {
            writeln!(
                out,
                r#"{{"method":"POST","url":"{url}","body":"{body}","header":{{"Authorization":["Bearer {TOKEN}"],"Content-Type":["application/x-ndjson"]}}}}"#
            )?;
        }
        out.flush()?;
        drop(out);
        let p = |x: &Path| x.display().to_string();
        let argv = vec![
            "env".into(),
            format!("KAFKA_BOOTSTRAP_SERVERS={}", args.brokers),
            "RUST_LOG=warn".into(),
            p(&ctx.runtime_bin),
            "ingest".into(),
            "--plan".into(),
            p(&plan_path),
            "--tokens-dir".into(),
            p(&dir.join("tokens")),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--max-in-flight".into(),
            h.http_connections.to_string(),
        ];
        let (tx, rx) = std::sync::mpsc::channel::<u32>();
        let attacker = {
            let (dir, vegeta, cpus) = (dir.clone(), h.vegeta.clone(), args.cpus.clone());
            let (secs, conns, broker) = (h.http_secs, h.http_connections, setup.broker_pid);
            std::thread::spawn(move || -> anyhow::Result<Attack> {
                let timer = rx.recv()?;
                let attack = attack(&dir, &vegeta, &cpus, secs, conns, broker, port, timer);
                drive::stop(timer);
                attack
            })
        };
        let m = measure::run_hooked(&argv, ctx.limits, &ctx.scratch, |pid| {
            let _ = tx.send(pid);
        });
        let attack = attacker
            .join()
            .map_err(|_| anyhow::anyhow!("the vegeta driver panicked"))?;
        let m = m?;
        let counted = drive::records(&args.brokers, &name);
        if let Err(e) = drive::delete_topics(&args.brokers, std::slice::from_ref(&name), &[]) {
            eprintln!("deleting the run's topic: {e:#}");
        }
        let result = (|| {
            let attack = attack?;
            let report = vegeta_report(&h.vegeta, &dir.join("results.bin"))?;
            let topic_records = counted?.map(|(_, n)| n).unwrap_or(0);
            Ok::<_, anyhow::Error>(ingest_record(ctx, &m, round, attack, report, topic_records))
        })();
        let _ = std::fs::remove_dir_all(&dir);
        match result {
            Ok((record, note)) => Ok((record, Some(note))),
            Err(e) => {
                let mut record = empty_record(Engine::Keystone, &m, "vegeta: failed");
                record.error = Some(format!("{e:#}\n{}", m.stderr_tail));
                Ok((record, None))
            }
        }
    }

    /// What the attack measured besides vegeta's results.
    struct Attack {
        vegeta_cpu_s: Option<f64>,
        broker_cpu_s: Option<f64>,
        engine_cpu_s: Option<f64>,
        threads: Vec<(String, f64)>,
    }

    /// Waits for the endpoint, then vegeta for `secs` (timed by GNU time),
    /// sampling the endpoint's threads and the broker before and after.
    #[allow(clippy::too_many_arguments)]
    fn attack(
        dir: &Path,
        vegeta: &Path,
        cpus: &str,
        secs: u64,
        connections: usize,
        broker: Option<u32>,
        port: u16,
        timer: u32,
    ) -> anyhow::Result<Attack> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !healthy(port) {
            if !drive::alive(timer) || Instant::now() > deadline {
                bail!("the ingest endpoint did not come up on port {port}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let engine = drive::engine_pid(timer).context("no engine process")?;
        let (threads0, broker0, engine0) = (
            thread_cpu(engine),
            process_cpu_s(broker),
            process_cpu_s(Some(engine)),
        );
        let time_file = dir.join("vegeta.time");
        let c = connections.to_string();
        let out = Command::new("/usr/bin/time")
            .args(["-f", "%e %U %S %M", "-o"])
            .arg(&time_file)
            .args(["taskset", "-c", cpus])
            .arg(vegeta)
            .args(["attack", "-format=json", "-rate=0", "-timeout=30s"])
            .arg(format!("-targets={}", dir.join("targets.json").display()))
            .arg(format!("-output={}", dir.join("results.bin").display()))
            .arg(format!("-duration={secs}s"))
            .args([
                format!("-workers={c}"),
                format!("-max-workers={c}"),
                format!("-connections={c}"),
                format!("-max-connections={c}"),
            ])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", vegeta.display()))?;
        if !out.status.success() {
            bail!(
                "vegeta attack failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let threads1 = thread_cpu(engine);
        let threads = threads1
            .iter()
            .map(|(k, v)| (k.clone(), v - threads0.get(k).copied().unwrap_or(0.0)))
            // Idle threads (the main one, rdk:main) would only add noise.
            .filter(|(_, v)| *v >= 0.05)
            .collect();
        let numbers = measure::time_numbers(&time_file);
        Ok(Attack {
            vegeta_cpu_s: match numbers.as_slice() {
                [_, user, sys, _] => Some(user + sys),
                _ => None,
            },
            broker_cpu_s: process_cpu_s(broker).zip(broker0).map(|(b, a)| b - a),
            engine_cpu_s: process_cpu_s(Some(engine)).zip(engine0).map(|(b, a)| b - a),
            threads,
        })
    }

    /// `vegeta report -type=json` of the attack's results.
    fn vegeta_report(vegeta: &Path, results: &Path) -> anyhow::Result<Value> {
        let out = Command::new(vegeta)
            .args(["report", "-type=json"])
            .arg(results)
            .output()
            .with_context(|| format!("running {} report", vegeta.display()))?;
        if !out.status.success() {
            bail!(
                "vegeta report failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn ingest_record(
        ctx: &Ctx,
        m: &Measured,
        round: usize,
        attack: Attack,
        report: Value,
        topic_records: i64,
    ) -> (RunRecord, RunNote) {
        let batch = ctx.args.http.http_batch as u64;
        let ns = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        let requests = report["requests"].as_u64().unwrap_or(0);
        let ok: u64 = report["status_codes"]
            .as_object()
            .map(|codes| {
                codes
                    .iter()
                    .filter(|(code, _)| code.starts_with('2'))
                    .filter_map(|(_, n)| n.as_u64())
                    .sum()
            })
            .unwrap_or(0);
        let seconds = (ns(&report["duration"]) + ns(&report["wait"])) / 1e9;
        let lat = &report["latencies"];
        let latency_ms = ["50th", "90th", "99th", "max"].map(|p| ns(&lat[p]) / 1e6);
        let acknowledged = ok * batch;
        let mut record = empty_record(
            Engine::Keystone,
            m,
            "vegeta: 2xx answers x records per request / (attack duration + wait for the last answer)",
        );
        record.engine_s = seconds;
        record.events_per_s = acknowledged as f64 / seconds;
        record.cpu_s_per_m_events = m.cpu_s / (acknowledged as f64 / 1e6);
        record.latency_p50_ms = Some(latency_ms[0]);
        record.latency_p99_ms = Some(latency_ms[2]);
        record.digest_ok = ok > 0 && topic_records == acknowledged as i64;
        if !record.digest_ok {
            let errors: Vec<&str> = report["errors"]
                .as_array()
                .map(|e| e.iter().filter_map(Value::as_str).take(3).collect())
                .unwrap_or_default();
            record.error = Some(format!(
                "the topic holds {topic_records} records, the 2xx answers acknowledged {acknowledged} ({ok} of {requests} requests 2xx; status codes {}; errors {errors:?})",
                report["status_codes"]
            ));
        }
        let note = RunNote {
            round,
            engine: Engine::Keystone,
            records_per_s: record.events_per_s,
            seconds,
            requests,
            ok,
            latency_ms,
            topic_records,
            acknowledged,
            engine_cpu_s: attack.engine_cpu_s.unwrap_or(m.cpu_s),
            vegeta_cpu_s: attack.vegeta_cpu_s,
            broker_cpu_s: attack.broker_cpu_s,
            threads: attack.threads,
        };
        (record, note)
    }

    /// One run of the plain producer (`keystone-bench load`, this binary)
    /// under the runner's limits: `records` generated events in turn (the
    /// file once when `None`) into a fresh topic.
    fn ceiling_run(
        ctx: &Ctx,
        setup: &Setup,
        round: usize,
        records: Option<u64>,
    ) -> anyhow::Result<(RunRecord, Option<RunNote>)> {
        let args = ctx.args;
        let topic = format!("bench-s13-producer-r{round}-{}", stamp());
        let mut argv = vec![
            std::env::current_exe()?.display().to_string(),
            "load".into(),
            "--brokers".into(),
            args.brokers.clone(),
            "--topic".into(),
            topic.clone(),
            "--partitions".into(),
            setup.partitions.to_string(),
            "--input".into(),
            setup.events.display().to_string(),
        ];
        if let Some(n) = records.filter(|n| *n > 0) {
            argv.extend(["--records".into(), n.to_string()]);
        }
        let broker0 = process_cpu_s(setup.broker_pid);
        let m = measure::run(&argv, ctx.limits, &ctx.scratch)?;
        let broker_cpu_s = process_cpu_s(setup.broker_pid)
            .zip(broker0)
            .map(|(b, a)| b - a);
        let counted = drive::records(&args.brokers, &topic);
        if let Err(e) = drive::delete_topics(&args.brokers, std::slice::from_ref(&topic), &[]) {
            eprintln!("deleting the run's topic: {e:#}");
        }
        let mut record = empty_record(
            Engine::ProducerCeiling,
            &m,
            "load: from the first send to the flush's return (all acknowledged)",
        );
        // "loaded N records into T (P partitions) in S s: R records/s"
        let parsed = m.stdout.lines().find_map(|l| {
            let rest = l.strip_prefix("loaded ")?;
            let n: u64 = rest.split_whitespace().next()?.parse().ok()?;
            let secs: f64 = rest.split(" in ").nth(1)?.split('s').next()?.parse().ok()?;
            Some((n, secs))
        });
        let Some((n, secs)) = parsed.filter(|_| m.exit_ok) else {
            record.error = Some(format!(
                "keystone-bench load failed:\n{}\n{}",
                m.stdout.trim(),
                m.stderr_tail
            ));
            return Ok((record, None));
        };
        let topic_records = counted?.map(|(_, n)| n).unwrap_or(0);
        record.engine_s = secs;
        record.events_per_s = n as f64 / secs;
        record.cpu_s_per_m_events = m.cpu_s / (n as f64 / 1e6);
        record.digest_ok = topic_records == n as i64;
        if !record.digest_ok {
            record.error = Some(format!(
                "the topic holds {topic_records} records, the producer acknowledged {n}"
            ));
        }
        let note = RunNote {
            round,
            engine: Engine::ProducerCeiling,
            records_per_s: record.events_per_s,
            seconds: secs,
            requests: 0,
            ok: 0,
            latency_ms: [f64::NAN; 4],
            topic_records,
            acknowledged: n,
            engine_cpu_s: m.cpu_s,
            vegeta_cpu_s: None,
            broker_cpu_s,
            threads: Vec::new(),
        };
        Ok((record, Some(note)))
    }

    fn notes_markdown(args: &super::super::RunArgs, setup: &Setup, notes: &[RunNote]) -> String {
        use std::fmt::Write as _;
        let h = &args.http;
        let mut md = String::new();
        let _ = writeln!(
            md,
            "Requests: `POST {}` with `Authorization: Bearer` and `Content-Type: application/x-ndjson`, bodies of {} consecutive generated events (about 300 bytes each), {} distinct bodies sent in turn by vegeta (`-rate=0`, {} workers and connections) for {} s per run. The endpoint and the plain producer each write a fresh topic of {} partitions (`keystone-bench load`: the generated events in turn, keyed by event_id, as many as the endpoint acknowledged in the same round); after each run the topic's record count (high minus low watermarks) must equal what was acknowledged (2xx answers x {}; the producer's records), or the run fails. No peer HTTP-to-Kafka path runs here (see README.md, S13). Warm-up rounds are listed first; CPU seconds are measured while vegeta runs (the endpoint's from /proc, by thread kind: `tokio-rt-worker` reads HTTP, parses and checks the records and hands them to librdkafka, `rdk:broker` batches, compresses and sends them, `producer pollin` resolves the deliveries), the plain producer's for its whole process, the broker's from /proc over the same interval. Every process runs under the same `taskset -c {}`, vegeta too.\n",
            setup.path,
            h.http_batch,
            h.http_bodies,
            h.http_connections,
            h.http_secs,
            setup.partitions,
            h.http_batch,
            args.cpus,
        );
        let _ = writeln!(
            md,
            "| round | engine | records/s | s | requests (2xx) | latency ms p50 / p90 / p99 / max | records in topic / acknowledged | CPU-s: engine (cores) | vegeta | broker | engine's threads, CPU-s |\n|---|---|---|---|---|---|---|---|---|---|---|"
        );
        let opt = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
        for n in notes {
            let keystone = n.engine == Engine::Keystone;
            let _ = writeln!(
                md,
                "| {}{} | {} | {:.0} | {:.1} | {} | {} | {} / {} | {:.1} ({:.2}) | {} | {} | {} |",
                n.round,
                if n.round < args.warmup {
                    " (warm-up)"
                } else {
                    ""
                },
                n.engine.name(),
                n.records_per_s,
                n.seconds,
                if keystone {
                    format!("{} ({})", n.requests, n.ok)
                } else {
                    "-".into()
                },
                if keystone {
                    n.latency_ms
                        .iter()
                        .map(|v| format!("{v:.1}"))
                        .collect::<Vec<_>>()
                        .join(" / ")
                } else {
                    "-".into()
                },
                n.topic_records,
                n.acknowledged,
                n.engine_cpu_s,
                n.engine_cpu_s / n.seconds,
                opt(n.vegeta_cpu_s),
                opt(n.broker_cpu_s),
                n.threads
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.1}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_is_rfc_4648() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }
}
