//! Kafka-mode throughput: Kafka -> parse, dedup, project -> Kafka, drained from a
//! pre-loaded topic, with exactly-once (1 s transactions) and at-least-once,
//! against a plain rdkafka consume-produce loop on the same machine (the
//! ceiling: no parsing, no state, no transactions).
//!
//! Needs the testbed's Kafka and a release build of the runtime:
//!
//! ```sh
//! e2e/testbed up --only kafka && eval "$(e2e/testbed env)"
//! cargo build --release -p keystone-runtime
//! cargo bench -p keystone-runtime --bench kafka             # 3 rounds of 300k events
//! KEYSTONE_BENCH_EVENTS=1000000 cargo bench -p keystone-runtime --bench kafka -- --rounds 5
//! ```
//!
//! Each round runs the three in turn (ceiling, at-least-once, exactly-once) on
//! fresh topics loaded with the same events; a run is timed from the process
//! start to the moment every input event was counted in (and, for the ceiling,
//! produced), so group join and restore are included. This is a report, not a test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const PARTITIONS: i32 = 4;

fn main() {
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP_SERVERS")
        .expect("KAFKA_BOOTSTRAP_SERVERS: start the testbed and `eval \"$(e2e/testbed env)\"`");
    let events: usize = std::env::var("KEYSTONE_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    // KEYSTONE_BENCH_RUNTIME runs another build; KEYSTONE_BENCH_BASELINE adds runs
    // of a second build in every round, to measure a change against its parent.
    let runtime = std::env::var_os("KEYSTONE_BENCH_RUNTIME").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/keystone-runtime"),
        PathBuf::from,
    );
    let baseline = std::env::var_os("KEYSTONE_BENCH_BASELINE").map(PathBuf::from);
    for binary in std::iter::once(&runtime).chain(&baseline) {
        assert!(
            binary.exists(),
            "{} is missing: cargo build --release -p keystone-runtime",
            binary.display()
        );
    }
    let input = generate(events);
    let bytes: usize = input.iter().map(|(k, v)| k.len() + v.len()).sum();
    println!(
        "# Kafka -> dedup + project -> Kafka: {events} events of {} bytes on average, {PARTITIONS} partitions, {rounds} rounds",
        bytes / events
    );
    let mut results: Vec<(String, Vec<f64>)> = vec![
        ("ceiling (rdkafka consume-produce loop)".into(), vec![]),
        ("keystone at-least-once".into(), vec![]),
        ("keystone exactly-once (1 s transactions)".into(), vec![]),
    ];
    if baseline.is_some() {
        results.push(("baseline at-least-once".into(), vec![]));
        results.push(("baseline exactly-once (1 s transactions)".into(), vec![]));
    }
    for round in 0..rounds {
        for (index, (name, rates)) in results.iter_mut().enumerate() {
            let tag = format!("kbench-{}-{round}-{index}", std::process::id());
            let source = format!("{tag}.in");
            create_topic(&bootstrap, &source);
            load(&bootstrap, &source, &input);
            let seconds = match index {
                0 => ceiling(&bootstrap, &source, &format!("{tag}.out"), events),
                1 => keystone(&bootstrap, &runtime, &tag, &source, "AtLeastOnce"),
                2 => keystone(&bootstrap, &runtime, &tag, &source, "ExactlyOnce"),
                3 => keystone(
                    &bootstrap,
                    baseline_of(&baseline),
                    &tag,
                    &source,
                    "AtLeastOnce",
                ),
                _ => keystone(
                    &bootstrap,
                    baseline_of(&baseline),
                    &tag,
                    &source,
                    "ExactlyOnce",
                ),
            };
            let rate = events as f64 / seconds;
            println!("round {round}: {name}: {seconds:.2} s, {rate:.0} events/s");
            rates.push(rate);
        }
    }
    println!();
    println!("| run | median events/s | min | max | ratio to ceiling (median) |");
    println!("|---|---|---|---|---|");
    let ceiling_rates = results[0].1.clone();
    for (name, rates) in &results {
        let ratios: Vec<f64> = rates
            .iter()
            .zip(&ceiling_rates)
            .map(|(r, c)| r / c)
            .collect();
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.2} |",
            median(rates),
            rates.iter().cloned().fold(f64::INFINITY, f64::min),
            rates.iter().cloned().fold(0.0, f64::max),
            median(&ratios)
        );
    }
    if baseline.is_some() {
        println!();
        for (build, base) in [(1, 3), (2, 4)] {
            let ratios: Vec<f64> = results[build]
                .1
                .iter()
                .zip(&results[base].1)
                .map(|(r, b)| r / b)
                .collect();
            println!(
                "{} / baseline: {:.3} (median of per-round pairs)",
                results[build].0,
                median(&ratios)
            );
        }
    }
}

fn baseline_of(baseline: &Option<PathBuf>) -> &Path {
    baseline
        .as_deref()
        .expect("baseline runs only with a baseline")
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    sorted[sorted.len() / 2]
}

/// ~300-byte events; a fifth repeat an earlier event id (a redelivery).
fn generate(count: usize) -> Vec<(String, String)> {
    let mut state: u64 = 42;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state >> 33
    };
    let mut out = Vec::with_capacity(count);
    let mut distinct = 0u64;
    for _ in 0..count {
        let id = if distinct > 0 && next() % 5 == 0 {
            next() % distinct
        } else {
            distinct += 1;
            distinct - 1
        };
        let user = id % 10_000;
        let value = format!(
            r#"{{"event_id":"evt-{id:012}","user_id":"user-{user:05}","ts":{},"action":"purchase","page":"/catalog/item/{}","amount":{}.{:02},"currency":"EUR","device":{{"os":"linux","browser":"firefox","version":"131.0"}},"session":"s-{:016x}"}}"#,
            1_767_225_600_000u64 + id,
            id % 997,
            id % 500,
            id % 100,
            id.wrapping_mul(0x9e3779b97f4a7c15)
        );
        out.push((format!("user-{user:05}"), value));
    }
    out
}

fn admin(bootstrap: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap()
}

fn create_topic(bootstrap: &str, topic: &str) {
    let admin = admin(bootstrap);
    let topics = [NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1))];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for result in runtime
        .block_on(admin.create_topics(&topics, &AdminOptions::new()))
        .unwrap()
    {
        result.unwrap_or_else(|(t, e)| panic!("creating {t}: {e}"));
    }
}

fn producer(bootstrap: &str) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap()
}

fn load(bootstrap: &str, topic: &str, input: &[(String, String)]) {
    let producer = producer(bootstrap);
    for (key, value) in input {
        let mut record = BaseRecord::to(topic)
            .key(key.as_bytes())
            .payload(value.as_bytes());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120)).unwrap();
}

/// A plain consume-produce loop: what any Kafka-to-Kafka job costs at least.
fn ceiling(bootstrap: &str, source: &str, sink: &str, events: usize) -> f64 {
    create_topic(bootstrap, sink);
    let started = Instant::now();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{source}.ceiling"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.max.bytes", "52428800")
        .set("max.partition.fetch.bytes", "1048576")
        .create()
        .unwrap();
    consumer.subscribe(&[source]).unwrap();
    let producer = producer(bootstrap);
    let mut seen = 0;
    let mut last_commit = Instant::now();
    while seen < events {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            let mut record = BaseRecord::to(sink)
                .key(message.key().unwrap_or_default())
                .payload(message.payload().unwrap_or_default());
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        record = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
            seen += 1;
        }
        if last_commit.elapsed() >= Duration::from_secs(1) {
            producer.flush(Duration::from_secs(30)).unwrap();
            consumer.commit_consumer_state(CommitMode::Sync).ok();
            last_commit = Instant::now();
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    consumer.commit_consumer_state(CommitMode::Sync).ok();
    started.elapsed().as_secs_f64()
}

fn keystone(bootstrap: &str, runtime: &Path, tag: &str, source: &str, delivery: &str) -> f64 {
    let manifest = format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: {tag}, namespace: bench}}
spec:
  source:
    topic: {source}
    key: [user_id]
    schema:
      fields:
        - {{name: event_id, type: string}}
        - {{name: user_id, type: string}}
        - {{name: ts, type: integer}}
        - {{name: amount, type: number}}
  steps:
    - name: dedup
      dedup: {{key: [user_id, event_id], window: 10m}}
    - name: slim
      project:
        fields:
          - {{name: event_id, from: /event_id}}
          - {{name: user_id, from: /user_id}}
          - {{name: amount, from: /amount}}
  sinks:
    - name: out
      kafka: {{topic: {tag}.out, partitions: {PARTITIONS}}}
  delivery: {delivery}
  commitInterval: 1s
"#
    );
    let manifests = keystone_crds::parse_manifests("bench.yaml", &manifest).unwrap();
    let plan = keystone_crds::compile(&manifests.pipelines[0], &[]).unwrap();
    for topic in plan.topics.iter().filter(|t| t.create) {
        create_topic(bootstrap, &topic.name);
    }
    let dir = std::env::temp_dir().join(tag);
    std::fs::create_dir_all(&dir).unwrap();
    let plan_path = dir.join("plan.json");
    std::fs::write(&plan_path, serde_json::to_vec(&plan).unwrap()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let mut child: Child = Command::new(runtime)
        .args(["serve", "--plan"])
        .arg(&plan_path)
        .args(["--stage", "s0"])
        .env("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
        .env("POD_NAME", "bench-0")
        .env("KEYSTONE_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Done when the stage's group has committed offsets at the end of every input
    // partition: the last transaction (or offset commit) covering the input is done.
    let group = plan.stages[0].consumer_group.clone();
    let checker: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", &group)
        .create()
        .unwrap();
    let mut ends = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        let (_, high) = checker
            .fetch_watermarks(source, partition, Duration::from_secs(10))
            .unwrap();
        ends.add_partition_offset(source, partition, Offset::Offset(high))
            .unwrap();
    }
    let mut asked = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        asked.add_partition(source, partition);
    }
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if let Ok(committed) = checker.committed_offsets(asked.clone(), Duration::from_secs(5)) {
            let done = ends.elements().iter().all(|end| {
                matches!(
                    (committed.find_partition(source, end.partition()).map(|e| e.offset()), end.offset()),
                    (Some(Offset::Offset(c)), Offset::Offset(e)) if c >= e
                )
            });
            if done {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the runtime did not drain the topic"
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    child.kill().ok();
    child.wait().ok();
    seconds
}
