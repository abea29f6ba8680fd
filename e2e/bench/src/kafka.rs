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
pub use with_kafka::{ceiling, load};

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
        Ok(ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "5")
            .set("batch.size", "1000000")
            .set("queue.buffering.max.messages", "1000000")
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .create()?)
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
        let input = match &args.input {
            Some(p) => p.clone(),
            None => crate::generate::ensure(&args.data.config())?.events,
        };
        recreate(&args.brokers, &args.topic, args.partitions)?;
        let p = producer(&args.brokers)?;
        let start = Instant::now();
        let file = std::fs::File::open(&input).with_context(|| format!("{}", input.display()))?;
        let mut n: u64 = 0;
        for line in std::io::BufReader::with_capacity(1 << 20, file).lines() {
            let line = line?;
            send(
                &p,
                &args.topic,
                field(&line, &args.key_field).as_bytes(),
                line.as_bytes(),
            )?;
            n += 1;
            if n.is_multiple_of(10_000) {
                p.poll(Duration::ZERO);
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

    /// Consume from `from` (from the beginning, a new group) and produce every record
    /// unchanged to `to`, until `records` were produced and acknowledged.
    pub fn ceiling(args: &CeilingArgs) -> anyhow::Result<()> {
        recreate(&args.brokers, &args.to, 2)?;
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &args.brokers)
            .set(
                "group.id",
                format!("keystone-bench-ceiling-{}", std::process::id()),
            )
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("fetch.min.bytes", "1")
            .create()?;
        consumer.subscribe(&[&args.from])?;
        let p = producer(&args.brokers)?;
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
        let s = start.map(|t| t.elapsed().as_secs_f64()).unwrap_or(f64::NAN);
        println!(
            "consume-produce ceiling: {n} records from {} to {} in {s:.2}s (from the first record): {:.0} records/s",
            args.from,
            args.to,
            n as f64 / s
        );
        Ok(())
    }
}
