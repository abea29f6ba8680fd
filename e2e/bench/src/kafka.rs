//! Kafka-mode harness parts (S5-S7): loading the generated events into a topic of
//! the testbed's Kafka, and the ceiling every Kafka-mode result is bounded by.
//! Built with `--features kafka` (rdkafka compiles librdkafka, which is slow).

use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Bootstrap servers (the testbed's: `eval "$(e2e/testbed env)"` sets KAFKA_BOOTSTRAP).
    #[arg(long, env = "KAFKA_BOOTSTRAP", default_value = "127.0.0.1:19092")]
    pub brokers: String,
    /// The topic to (re)create and fill.
    #[arg(long, default_value = "bench.events")]
    pub topic: String,
    #[arg(long, default_value_t = 2)]
    pub partitions: i32,
    /// The JSON-lines file; the generated events by default.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Field whose value is the record key.
    #[arg(long, default_value = "event_id")]
    pub key_field: String,
    /// Records to produce, the input's lines in turn (the input once when unset):
    /// S13 sends as many as the endpoint took in the same round.
    #[arg(long)]
    pub records: Option<u64>,
    #[command(flatten)]
    pub data: crate::GenArgs,
}

#[derive(Debug, Args)]
pub struct CeilingArgs {
    #[arg(long, env = "KAFKA_BOOTSTRAP", default_value = "127.0.0.1:19092")]
    pub brokers: String,
    #[arg(long, default_value = "bench.events")]
    pub from: String,
    #[arg(long, default_value = "bench.ceiling.out")]
    pub to: String,
    /// Records to drain (the loaded backlog).
    #[arg(long)]
    pub records: u64,
}

/// `fetch.queue.backoff.ms` of every consumer the harness reads with, and of
/// the ceiling loop's: librdkafka's default postpones a partition's next fetch
/// by a second once 100,000 records wait in its queue. The watcher then read an
/// exactly-once engine's output, which becomes visible a commit's worth at a
/// time, about a second late, and that second was in S6's drain time ("S6: the
/// watcher's fetch backoff" in ANALYSIS.md). Keystone's consumers use 10 ms too.
#[cfg(feature = "kafka")]
pub const FETCH_QUEUE_BACKOFF_MS: &str = "10";

#[cfg(not(feature = "kafka"))]
pub fn load(_: &LoadArgs) -> anyhow::Result<()> {
    anyhow::bail!(
        "built without Kafka support: cargo run --release -p keystone-bench --features kafka -- load"
    )
}

#[cfg(not(feature = "kafka"))]
pub fn ceiling(_: &CeilingArgs) -> anyhow::Result<()> {
    anyhow::bail!(
        "built without Kafka support: cargo run --release -p keystone-bench --features kafka -- ceiling"
    )
}

#[cfg(feature = "kafka")]
pub use with_kafka::{CeilingRun, ceiling, load, load_with, measure_ceiling};

#[cfg(feature = "kafka")]
mod with_kafka {
    use std::io::BufRead;
    use std::time::{Duration, Instant};

    use anyhow::{Context, bail};
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::error::KafkaError;
    use rdkafka::message::Message;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::types::RDKafkaErrorCode;

    use super::{CeilingArgs, LoadArgs};

    fn recreate(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()?;
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let _ = futures::executor::block_on(admin.delete_topics(&[topic], &opts));
        for _ in 0..60 {
            let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
            let results = futures::executor::block_on(admin.create_topics(&[new], &opts))?;
            match results.into_iter().next() {
                Some(Ok(_)) => return Ok(()),
                // Deletion is asynchronous on the broker: retry until it is done.
                Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => {
                    std::thread::sleep(Duration::from_millis(500))
                }
                Some(Err((_, code))) => bail!("creating {topic}: {code}"),
                None => bail!("creating {topic}: no result"),
            }
        }
        bail!("{topic} still exists after deleting it")
    }

    fn producer(brokers: &str) -> anyhow::Result<BaseProducer> {
        producer_with(brokers, &[])
    }

    fn producer_with(brokers: &str, extra: &[(&str, &str)]) -> anyhow::Result<BaseProducer> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "5")
            .set("batch.size", "1000000")
            .set("queue.buffering.max.messages", "1000000")
            .set("acks", "all")
            .set("enable.idempotence", "true");
        for (key, value) in extra {
            config.set(*key, *value);
        }
        Ok(config.create()?)
    }

    fn send(p: &BaseProducer, topic: &str, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        loop {
            match p.send(BaseRecord::to(topic).key(key).payload(value)) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    p.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    /// Reads the value of a top-level string field without parsing the line.
    fn field<'a>(line: &'a str, name: &str) -> &'a str {
        let pattern = format!("\"{name}\":\"");
        line.find(&pattern)
            .and_then(|at| {
                let rest = &line[at + pattern.len()..];
                rest.find('"').map(|end| &rest[..end])
            })
            .unwrap_or("")
    }

    pub fn load(args: &LoadArgs) -> anyhow::Result<()> {
        load_lines(args, |line| Ok(std::borrow::Cow::Borrowed(line.as_bytes())))
    }

    /// As [`load`], each line's record value made by `value` (S12: the event as a
    /// framed Avro record).
    pub fn load_with(
        args: &LoadArgs,
        mut value: impl FnMut(&str) -> anyhow::Result<Vec<u8>>,
    ) -> anyhow::Result<()> {
        load_lines(args, |line| Ok(std::borrow::Cow::Owned(value(line)?)))
    }

    fn load_lines(
        args: &LoadArgs,
        mut value: impl for<'l> FnMut(&'l str) -> anyhow::Result<std::borrow::Cow<'l, [u8]>>,
    ) -> anyhow::Result<()> {
        let input = match &args.input {
            Some(p) => p.clone(),
            None => crate::generate::ensure(&args.data.config())?.events,
        };
        recreate(&args.brokers, &args.topic, args.partitions)?;
        let p = producer(&args.brokers)?;
        let start = Instant::now();
        let mut n: u64 = 0;
        'passes: loop {
            let file =
                std::fs::File::open(&input).with_context(|| format!("{}", input.display()))?;
            for line in std::io::BufReader::with_capacity(1 << 20, file).lines() {
                if args.records.is_some_and(|max| n >= max) {
                    break 'passes;
                }
                let line = line?;
                send(
                    &p,
                    &args.topic,
                    field(&line, &args.key_field).as_bytes(),
                    &value(&line)?,
                )?;
                n += 1;
                if n.is_multiple_of(10_000) {
                    p.poll(Duration::ZERO);
                }
            }
            // Once through by default; an empty input would never reach `records`.
            if n == 0 || args.records.is_none_or(|max| n >= max) {
                break;
            }
        }
        p.flush(Duration::from_secs(120))?;
        let s = start.elapsed().as_secs_f64();
        println!(
            "loaded {n} records into {} ({} partitions) in {s:.2}s: {:.0} records/s",
            args.topic,
            args.partitions,
            n as f64 / s
        );
        Ok(())
    }

    /// What one consume-produce loop measured.
    #[derive(Clone, Copy, Debug)]
    pub struct CeilingRun {
        /// Records copied (produced and acknowledged).
        pub records: u64,
        /// From the first record consumed to the last one acknowledged.
        pub seconds: f64,
        pub records_per_s: f64,
    }

    /// The `ceiling` command: [`measure_ceiling`], printed.
    pub fn ceiling(args: &CeilingArgs) -> anyhow::Result<()> {
        let run = measure_ceiling(args)?;
        println!(
            "consume-produce ceiling: {} records from {} to {} in {:.2}s (from the first record): {:.0} records/s",
            run.records, args.from, args.to, run.seconds, run.records_per_s
        );
        Ok(())
    }

    /// Consume from `from` (from the beginning, a new group) and produce every record
    /// unchanged to `to` (recreated), until `records` were produced and acknowledged.
    pub fn measure_ceiling(args: &CeilingArgs) -> anyhow::Result<CeilingRun> {
        recreate(&args.brokers, &args.to, 2)?;
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &args.brokers)
            // A group of its own per call (the runner measures once per round in
            // one process): no member of an earlier round to wait for, and no
            // committed offset, so each starts at the beginning.
            .set(
                "group.id",
                format!(
                    "keystone-bench-ceiling-{}-{}-{}",
                    args.to,
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or_default()
                ),
            )
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("fetch.min.bytes", "1")
            .set("fetch.queue.backoff.ms", super::FETCH_QUEUE_BACKOFF_MS)
            .create()?;
        consumer.subscribe(&[&args.from])?;
        // Compressed as Keystone's stage producer is (lz4), so that the loop's
        // records cost the broker what Keystone's do.
        let p = producer_with(&args.brokers, &[("compression.type", "lz4")])?;
        let mut n: u64 = 0;
        let mut start: Option<Instant> = None;
        let deadline = Instant::now() + Duration::from_secs(600);
        while n < args.records {
            if Instant::now() > deadline {
                bail!("drained only {n} of {} records in 10 minutes", args.records);
            }
            let Some(msg) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let msg = msg?;
            start.get_or_insert_with(Instant::now);
            send(
                &p,
                &args.to,
                msg.key().unwrap_or_default(),
                msg.payload().unwrap_or_default(),
            )?;
            n += 1;
            if n.is_multiple_of(10_000) {
                p.poll(Duration::ZERO);
            }
        }
        p.flush(Duration::from_secs(120))?;
        let seconds = start.map(|t| t.elapsed().as_secs_f64()).unwrap_or(f64::NAN);
        Ok(CeilingRun {
            records: n,
            seconds,
            records_per_s: n as f64 / seconds,
        })
    }
}

/// Driving Kafka-mode runs (S5, S6): topics per run, Keystone's compiled plan,
/// and the watcher that reads an engine's output until every expected record
/// is there, then stops the engine.
#[cfg(feature = "kafka")]
pub mod drive {
    use std::path::Path;
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use anyhow::{Context, bail};
    use keystone_crds::plan::{Partitions, TopicRole};
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::error::KafkaError;
    use rdkafka::message::{Message, Timestamp};
    use rdkafka::{Offset, TopicPartitionList};

    use crate::digest::{Digester, Mode, OutputDigest};

    /// A topic to create: name, partitions, configs.
    pub type TopicSpec = (String, i32, Vec<(String, String)>);

    /// What the watcher saw of one run's output.
    pub struct Drained {
        pub count: u64,
        /// Broker append time (LogAppendTime) of the first output record, epoch ms.
        pub first_append_ms: i64,
        /// When the watcher had read the last expected record (read_committed), epoch ms.
        pub last_read_ms: i64,
        pub digest: OutputDigest,
        pub complete: bool,
        pub engine_exited_early: bool,
    }

    impl Drained {
        /// From the first output record's append to the last one read.
        pub fn seconds(&self) -> f64 {
            (self.last_read_ms - self.first_append_ms) as f64 / 1000.0
        }
    }

    fn admin(brokers: &str) -> anyhow::Result<AdminClient<DefaultClientContext>> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()?)
    }

    pub fn create_topics(brokers: &str, topics: &[TopicSpec]) -> anyhow::Result<()> {
        let admin = admin(brokers)?;
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|(name, partitions, config)| {
                let mut t = NewTopic::new(name, *partitions, TopicReplication::Fixed(1));
                for (k, v) in config {
                    t = t.set(k, v);
                }
                t
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        for r in futures::executor::block_on(admin.create_topics(&new, &opts))? {
            r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
        }
        Ok(())
    }

    /// Deletes the topics that exist among `names` and every topic starting with
    /// one of `prefixes` (Kafka Streams' internal topics).
    pub fn delete_topics(
        brokers: &str,
        names: &[String],
        prefixes: &[String],
    ) -> anyhow::Result<()> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()?;
        let md = consumer.fetch_metadata(None, Duration::from_secs(10))?;
        let doomed: Vec<String> = md
            .topics()
            .iter()
            .map(|t| t.name().to_owned())
            .filter(|t| names.contains(t) || prefixes.iter().any(|p| t.starts_with(p.as_str())))
            .collect();
        if doomed.is_empty() {
            return Ok(());
        }
        let refs: Vec<&str> = doomed.iter().map(String::as_str).collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        futures::executor::block_on(admin(brokers)?.delete_topics(&refs, &opts))?;
        Ok(())
    }

    /// Records a topic holds (the sum of its partitions' high watermarks) and its
    /// partitions; `None` when it does not exist.
    pub fn records(brokers: &str, topic: &str) -> anyhow::Result<Option<(usize, i64)>> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()?;
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let Some(t) = md.topics().first() else {
            return Ok(None);
        };
        if t.partitions().is_empty() {
            return Ok(None);
        }
        let mut total = 0;
        for p in t.partitions() {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
            total += high - low;
        }
        Ok(Some((t.partitions().len(), total)))
    }

    /// What a run wrote into `topics`: the offsets they took (the sum of their
    /// partitions' high watermarks, transaction markers included: the topics are
    /// new, so every offset is the run's) and, with `count_committed`, the data
    /// records among them, read back read_committed (a reader is given neither
    /// control markers nor aborted records).
    pub fn written(
        brokers: &str,
        topics: &[String],
        count_committed: bool,
    ) -> anyhow::Result<(u64, Option<u64>)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            // Watermark queries follow it: read_committed (librdkafka's default)
            // would answer the last stable offset.
            .set("isolation.level", "read_uncommitted")
            .create()?;
        let mut offsets = 0u64;
        let mut ends: Vec<(&str, Vec<(i32, i64)>)> = Vec::new();
        for topic in topics {
            let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
            let t = md
                .topics()
                .first()
                .filter(|t| !t.partitions().is_empty())
                .with_context(|| format!("{topic} does not exist"))?;
            let mut parts = Vec::new();
            for p in t.partitions() {
                let (_, high) =
                    consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
                offsets += high.max(0) as u64;
                parts.push((p.id(), high));
            }
            ends.push((topic, parts));
        }
        if !count_committed {
            return Ok((offsets, None));
        }
        let mut records = 0;
        for (topic, parts) in &ends {
            records += committed_count(brokers, topic, parts)?;
        }
        Ok((offsets, Some(records)))
    }

    /// The data records a read_committed reader gets from `topic`'s partitions
    /// (id, high watermark) from the beginning to their end (for such a reader the
    /// last stable offset, where librdkafka signals the partition's EOF).
    fn committed_count(brokers: &str, topic: &str, parts: &[(i32, i64)]) -> anyhow::Result<u64> {
        // A partition nothing was written to has nothing to count.
        let mut pending: std::collections::HashSet<i32> = parts
            .iter()
            .filter(|(_, high)| *high > 0)
            .map(|(p, _)| *p)
            .collect();
        if pending.is_empty() {
            return Ok(0);
        }
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set(
                "group.id",
                format!("keystone-bench-count-{}", std::process::id()),
            )
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("fetch.queue.backoff.ms", super::FETCH_QUEUE_BACKOFF_MS)
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in &pending {
            tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let mut n = 0u64;
        let deadline = Instant::now() + Duration::from_secs(180);
        while !pending.is_empty() {
            if Instant::now() > deadline {
                bail!(
                    "counting {topic}: {n} records read, partitions {pending:?} unfinished after 180 s"
                );
            }
            match consumer.poll(Duration::from_millis(100)) {
                None => {}
                Some(Ok(_)) => n += 1,
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    pending.remove(&p);
                }
                Some(Err(e)) => return Err(e.into()),
            }
        }
        Ok(n)
    }

    pub fn partitions(brokers: &str, topic: &str) -> anyhow::Result<usize> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()?;
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        Ok(md
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .unwrap_or(0))
    }

    /// The output topic of a run: broker append time as the record time, so every
    /// engine's records are timed by the same clock.
    pub fn output_topic(name: &str, partitions: i32) -> TopicSpec {
        (
            name.to_owned(),
            partitions,
            vec![("message.timestamp.type".into(), "LogAppendTime".into())],
        )
    }

    /// Keystone's plan for one run: the manifest with the pipeline named `name` and
    /// its sink `out_topic`; returns the plan (JSON) and the topics it creates.
    pub fn keystone_plan(
        manifest: &Path,
        name: &str,
        out_topic: &str,
        source_topic: &str,
        source_partitions: i32,
    ) -> anyhow::Result<(String, Vec<TopicSpec>)> {
        let text = renamed_manifest(manifest, name, out_topic, source_topic)?;
        compile_plan(&manifest.display().to_string(), &text, source_partitions)
    }

    /// The manifest's text with the pipeline named `name`, its sink `out_topic` and
    /// its source `source_topic`.
    pub fn renamed_manifest(
        manifest: &Path,
        name: &str,
        out_topic: &str,
        source_topic: &str,
    ) -> anyhow::Result<String> {
        let text = std::fs::read_to_string(manifest)
            .with_context(|| format!("reading {}", manifest.display()))?;
        let stem = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("name: bench-"))
            .context("the manifest names no bench-* pipeline")?
            .trim()
            .to_owned();
        let text = text
            .replace(&format!("name: bench-{stem}"), &format!("name: {name}"))
            .replace(
                &format!("topic: bench.{stem}.out"),
                &format!("topic: {out_topic}"),
            )
            .replace("topic: bench.events", &format!("topic: {source_topic}"));
        Ok(text)
    }

    /// Compiles a manifest's (already renamed) text; returns the plan (JSON) and the
    /// topics it creates (every topic but the source).
    pub fn compile_plan(
        origin: &str,
        text: &str,
        source_partitions: i32,
    ) -> anyhow::Result<(String, Vec<TopicSpec>)> {
        let manifests =
            keystone_crds::parse_manifests(origin, text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let pipeline = manifests.pipelines.first().context("no pipeline")?;
        let plan = keystone_crds::compile(pipeline, &[]).map_err(|e| anyhow::anyhow!("{e}"))?;
        let topics = plan_topics(&plan, source_partitions);
        Ok((serde_json::to_string_pretty(&plan)?, topics))
    }

    /// The topics a plan creates (every topic but the source), as the operator would.
    pub fn plan_topics(plan: &keystone_crds::Plan, source_partitions: i32) -> Vec<TopicSpec> {
        let mut topics = Vec::new();
        for t in &plan.topics {
            let partitions = match (&t.role, &t.partitions) {
                (TopicRole::Source, _) => continue,
                (_, Some(Partitions::Fixed(n))) => *n,
                _ => source_partitions,
            };
            if t.role == TopicRole::Sink {
                topics.push(output_topic(&t.name, partitions));
                continue;
            }
            let mut config: Vec<(String, String)> = t
                .config
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if t.role == TopicRole::Table {
                config.push(("cleanup.policy".into(), "compact".into()));
            }
            topics.push((t.name.clone(), partitions, config));
        }
        topics
    }

    /// A reader of `topic`'s committed records from the beginning of every
    /// partition, in a group of its own (`purpose` names it).
    fn committed_reader(
        brokers: &str,
        topic: &str,
        partitions: usize,
        purpose: &str,
        fetch_wait_ms: u32,
    ) -> anyhow::Result<BaseConsumer> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set(
                "group.id",
                format!("keystone-bench-{purpose}-{}", std::process::id()),
            )
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
            .set("fetch.queue.backoff.ms", super::FETCH_QUEUE_BACKOFF_MS)
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p as i32, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        Ok(consumer)
    }

    fn now_ms() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default()
    }

    /// The engine: the only child of the timer process `timer_pid`.
    pub fn engine_pid(timer_pid: u32) -> Option<u32> {
        std::fs::read_to_string(format!("/proc/{timer_pid}/task/{timer_pid}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    pub fn alive(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
    }

    /// Stops the engine started under `timer_pid`: SIGTERM, then SIGKILL after 20 s.
    pub fn stop(timer_pid: u32) {
        let Some(pid) = engine_pid(timer_pid) else {
            return;
        };
        let signal = |sig: &str| {
            let _ = std::process::Command::new("kill")
                .args([sig, &pid.to_string()])
                .status();
        };
        signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if alive(pid) {
            signal("-KILL");
        }
    }

    /// Reads `topic` from the beginning (read_committed) until `expected` records
    /// arrived, the engine exited, or `timeout` passed; digests the values (JSON
    /// text, or framed Avro records read with `avro`: S12).
    #[allow(clippy::too_many_arguments)]
    pub fn drain(
        brokers: &str,
        topic: &str,
        partitions: usize,
        expected: u64,
        mode: Mode,
        timeout: Duration,
        timer_pid: u32,
        mut avro: Option<crate::avro::Decoder>,
    ) -> anyhow::Result<Drained> {
        let consumer = committed_reader(brokers, topic, partitions, "watch", 10)?;
        let mut digester = Digester::new(mode);
        let mut count = 0u64;
        let mut first_append_ms = i64::MAX;
        let mut last_read_ms = 0;
        let deadline = Instant::now() + timeout;
        let mut engine_exited_early = false;
        while count < expected && Instant::now() < deadline {
            let Some(msg) = consumer.poll(Duration::from_millis(100)) else {
                if !alive(timer_pid) {
                    engine_exited_early = true;
                    break;
                }
                continue;
            };
            let msg = msg?;
            if let Timestamp::LogAppendTime(ms) | Timestamp::CreateTime(ms) = msg.timestamp() {
                first_append_ms = first_append_ms.min(ms);
            }
            let payload = msg.payload().unwrap_or_default();
            match avro.as_mut() {
                Some(decoder) => digester.add_value(&decoder.decode(payload)?)?,
                None => digester.add_line(std::str::from_utf8(payload)?)?,
            }
            count += 1;
            last_read_ms = now_ms();
        }
        if count == 0 {
            bail!("no output record in {topic}");
        }
        Ok(Drained {
            count,
            first_append_ms,
            last_read_ms,
            digest: digester.finish(),
            complete: count >= expected,
            engine_exited_early,
        })
    }

    /// The value of a top-level string field, without parsing the JSON.
    pub fn string_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
        let pattern = format!("\"{name}\":\"");
        let at = line.find(&pattern)? + pattern.len();
        let rest = &line[at..];
        rest.find('"').map(|end| &rest[..end])
    }

    /// What the fixed-rate producer does next.
    pub enum Phase {
        Warmup,
        Measure,
        Stop,
    }

    /// S7's load: `lines` sent to `topic` (keyed by event_id) at `rate` records per
    /// second while `phase` (asked with the number sent so far) says so. Returns the
    /// send time (epoch ms) of each event id first sent in the `Measure` phase.
    pub fn produce_at_rate(
        brokers: &str,
        topic: &str,
        lines: &[String],
        rate: f64,
        mut phase: impl FnMut(u64) -> Phase,
    ) -> anyhow::Result<std::collections::HashMap<String, i64>> {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "0")
            .set("acks", "1")
            .create()?;
        let mut sent_at = std::collections::HashMap::new();
        let start = Instant::now();
        let mut sent: u64 = 0;
        'outer: loop {
            let due = (start.elapsed().as_secs_f64() * rate) as u64;
            while sent < due {
                let measuring = match phase(sent) {
                    Phase::Stop => break 'outer,
                    Phase::Warmup => false,
                    Phase::Measure => true,
                };
                let line = &lines[(sent as usize) % lines.len()];
                let key = string_field(line, "event_id").unwrap_or_default();
                let now = now_ms();
                if producer
                    .send(BaseRecord::to(topic).key(key).payload(line.as_str()))
                    .is_err()
                {
                    producer.poll(Duration::from_millis(1));
                    continue;
                }
                if measuring {
                    sent_at.entry(key.to_owned()).or_insert(now);
                }
                sent += 1;
            }
            producer.poll(Duration::ZERO);
            std::thread::sleep(Duration::from_micros(500));
        }
        producer.flush(Duration::from_secs(30))?;
        Ok(sent_at)
    }

    /// Reads `topic` from the beginning (read_committed) and records when each
    /// event id was first read (epoch ms), until `done` is set; `seen` counts records.
    pub fn receive_times(
        brokers: &str,
        topic: &str,
        partitions: usize,
        done: &std::sync::atomic::AtomicBool,
        seen: &std::sync::atomic::AtomicU64,
    ) -> anyhow::Result<std::collections::HashMap<String, i64>> {
        use std::sync::atomic::Ordering;
        let consumer = committed_reader(brokers, topic, partitions, "latency", 5)?;
        let mut got = std::collections::HashMap::new();
        while !done.load(Ordering::Relaxed) {
            let Some(msg) = consumer.poll(Duration::from_millis(20)) else {
                continue;
            };
            let msg = msg?;
            let now = now_ms();
            let value = std::str::from_utf8(msg.payload().unwrap_or_default())?;
            if let Some(id) = string_field(value, "event_id") {
                got.entry(id.to_owned()).or_insert(now);
            }
            seen.fetch_add(1, Ordering::Relaxed);
        }
        Ok(got)
    }
}
