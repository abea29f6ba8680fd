//! What the runtime's end-to-end tests share: a pipeline's plan and topics on
//! the testbed's Kafka, runtime instances as child processes, producing and
//! reading records, and the CDC workload with its exactly-once check.
//!
//! Needs `target/debug/keystone-runtime` (`cargo build -p keystone-runtime`;
//! scripts/test builds it) and a running testbed.

// Each test file uses a different part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keystone_crds::checkpoint::InstanceCheckpoint;
use keystone_crds::plan::{Partitions, Plan, TopicRole};
use keystone_e2e::Testbed;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

pub const TIMEOUT: Duration = Duration::from_secs(30);

pub fn runtime_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/keystone-runtime");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p keystone-runtime` (scripts/test does)",
        path.display()
    );
    path
}

pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A small deterministic generator (no dependency, same sequence every run).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One pipeline under test: its plan on disk, its topics, its instances.
pub struct Harness {
    pub bootstrap: String,
    pub dir: PathBuf,
    pub plan_path: PathBuf,
    pub plan: Plan,
    pub instances: BTreeMap<String, Child>,
    pub ports: BTreeMap<String, u16>,
}

impl Harness {
    pub async fn new(name: &str, manifest: &str, source_partitions: i32) -> Self {
        let testbed = Testbed::from_env().await.expect("testbed");
        let bootstrap = testbed.kafka_bootstrap_servers().expect("kafka").to_owned();
        let manifests = keystone_crds::parse_manifests("pipeline.yaml", manifest)
            .unwrap_or_else(|e| panic!("{e}"));
        let plan =
            keystone_crds::compile(&manifests.pipelines[0], &[]).unwrap_or_else(|e| panic!("{e}"));
        let dir = testbed.state_dir().join("runtime-tests").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let plan_path = dir.join("plan.json");
        std::fs::write(&plan_path, serde_json::to_vec_pretty(&plan).unwrap()).unwrap();
        let harness = Self {
            bootstrap,
            dir,
            plan_path,
            plan,
            instances: BTreeMap::new(),
            ports: BTreeMap::new(),
        };
        harness.create_topics(source_partitions).await;
        harness
    }

    /// Creates the source and every topic the plan creates (as the operator would).
    pub async fn create_topics(&self, source_partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .unwrap();
        let mut topics = Vec::new();
        for topic in &self.plan.topics {
            let partitions = match (&topic.role, &topic.partitions) {
                // Sources and tables are the user's; here the test makes them,
                // tables compacted and co-partitioned with the source.
                (TopicRole::Source | TopicRole::Table, _) => source_partitions,
                (_, Some(Partitions::Fixed(n))) => *n,
                (_, Some(Partitions::SameAs(_))) => source_partitions,
                (_, None) => continue,
            };
            let mut new = NewTopic::new(&topic.name, partitions, TopicReplication::Fixed(1));
            if topic.role == TopicRole::Table {
                new = new.set("cleanup.policy", "compact");
            }
            for (key, value) in &topic.config {
                new = new.set(key, value);
            }
            topics.push(new);
        }
        for result in admin
            .create_topics(&topics, &AdminOptions::new())
            .await
            .unwrap()
        {
            result.unwrap_or_else(|(topic, e)| panic!("creating {topic}: {e}"));
        }
    }

    pub fn start(&mut self, instance: &str, extra_env: &[(&str, &str)]) {
        self.start_stage(instance, "s0", extra_env);
    }

    pub fn start_stage(&mut self, instance: &str, stage: &str, extra_env: &[(&str, &str)]) {
        let port = *self
            .ports
            .entry(instance.to_owned())
            .or_insert_with(free_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{instance}.log")))
            .unwrap();
        let mut command = Command::new(runtime_binary());
        command
            .args(["serve", "--plan"])
            .arg(&self.plan_path)
            .args([
                "--stage",
                stage,
                "--kafka-config",
                "session.timeout.ms=6000",
            ])
            .env("KAFKA_BOOTSTRAP_SERVERS", &self.bootstrap)
            .env("POD_NAME", instance)
            .env("KEYSTONE_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("KEYSTONE_CONTROL_TOKEN", CONTROL_TOKEN)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        for (key, value) in extra_env {
            command.env(key, value);
        }
        let child = command.spawn().expect("runtime starts");
        self.instances.insert(instance.to_owned(), child);
    }

    pub fn kill(&mut self, instance: &str) {
        if let Some(mut child) = self.instances.remove(instance) {
            child.kill().ok(); // SIGKILL: no chance to commit
            child.wait().ok();
        }
    }

    pub fn terminate(&mut self, instance: &str) {
        if let Some(mut child) = self.instances.remove(instance) {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .ok();
            let deadline = Instant::now() + TIMEOUT;
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        assert!(
                            status.success(),
                            "{instance} exited with {status} after SIGTERM; see {}",
                            self.log(instance)
                        );
                        return;
                    }
                    _ if Instant::now() > deadline => {
                        panic!("{instance} did not stop within {TIMEOUT:?} of SIGTERM")
                    }
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }

    /// Waits until every named instance processes at least one partition.
    pub fn wait_for_partitions(&self, instances: &[&str]) {
        let deadline = Instant::now() + TIMEOUT;
        for instance in instances {
            loop {
                let (_, metrics) = self.http(instance, "GET", "/metrics");
                if metric_value(&metrics, "keystone_assigned_partitions").unwrap_or(0.0) >= 1.0 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{instance} got no partition within {TIMEOUT:?}; see {}",
                    self.log(instance)
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    pub fn log(&self, instance: &str) -> String {
        self.dir
            .join(format!("{instance}.log"))
            .display()
            .to_string()
    }

    /// The port of an instance's endpoints.
    pub fn port(&self, instance: &str) -> u16 {
        self.ports[instance]
    }

    pub fn http(&self, instance: &str, method: &str, path: &str) -> (u16, String) {
        let port = self.ports[instance];
        http_request(port, method, path)
    }

    /// Waits up to [`TIMEOUT`] for the instance's `/readyz` to answer 200.
    pub fn wait_ready(&self, instance: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while self.http(instance, "GET", "/readyz").0 != 200 {
            assert!(
                Instant::now() < deadline,
                "{instance} never ready; see {}",
                self.log(instance)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The sum of a metric's samples in the instance's `/metrics` (0 when absent).
    pub fn metric(&self, instance: &str, name: &str) -> f64 {
        let (_, metrics) = self.http(instance, "GET", "/metrics");
        metric_value(&metrics, name).unwrap_or(0.0)
    }

    pub fn sink_topic(&self) -> String {
        self.plan.sinks[0]
            .spec
            .kafka
            .as_ref()
            .unwrap()
            .topic
            .clone()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let names: Vec<String> = self.instances.keys().cloned().collect();
        for name in names {
            self.kill(&name);
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The control token the instances started here are given; [`http_request`]
/// presents it on every `POST`.
pub const CONTROL_TOKEN: &str = "e2e-control-token";

/// A request to an instance's endpoints; a `POST` carries the control token.
pub fn http_request(port: u16, method: &str, path: &str) -> (u16, String) {
    let authorization = (method == "POST").then(|| format!("Bearer {CONTROL_TOKEN}"));
    http_request_as(port, method, path, authorization.as_deref())
}

/// A request with the given `Authorization` header value, or none.
pub fn http_request_as(
    port: u16,
    method: &str,
    path: &str,
    authorization: Option<&str>,
) -> (u16, String) {
    keystone_e2e::http::request("127.0.0.1", port, method, path, authorization)
}

pub fn producer(bootstrap: &str) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()
        .unwrap()
}

pub fn produce<V: AsRef<[u8]>>(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    records: &[(String, V)],
) {
    for (key, value) in records {
        let mut record = BaseRecord::to(topic)
            .key(key.as_bytes())
            .payload(value.as_ref());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    producer.flush(TIMEOUT).unwrap();
}

/// Every committed record of `topic` (key, value, headers), read from the
/// beginning until `expected` arrived and nothing more came for `quiet`.
pub fn read_committed(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    within: Duration,
    quiet: Duration,
) -> Vec<(String, String, BTreeMap<String, String>)> {
    read_committed_bytes(bootstrap, topic, expected, within, quiet)
        .into_iter()
        .map(|(key, value, headers)| {
            (
                String::from_utf8_lossy(&key).into_owned(),
                String::from_utf8_lossy(&value).into_owned(),
                headers,
            )
        })
        .collect()
}

/// A record's key, value and headers, the key and value as they are.
pub type RawRecord = (Vec<u8>, Vec<u8>, BTreeMap<String, String>);

/// As [`read_committed`], keys and values as they are (binary values: Avro).
pub fn read_committed_bytes(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    within: Duration,
    quiet: Duration,
) -> Vec<RawRecord> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("e2e-reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT).unwrap();
    let mut tpl = TopicPartitionList::new();
    for partition in metadata.topics()[0].partitions() {
        tpl.add_partition_offset(topic, partition.id(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut records = Vec::new();
    let deadline = Instant::now() + within;
    let mut last_record = Instant::now();
    loop {
        if records.len() >= expected && last_record.elapsed() >= quiet {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            let mut headers = BTreeMap::new();
            if let Some(h) = message.headers() {
                for header in h.iter() {
                    headers.insert(
                        header.key.to_owned(),
                        String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                    );
                }
            }
            records.push((
                message.key().unwrap_or_default().to_vec(),
                message.payload().unwrap_or_default().to_vec(),
                headers,
            ));
            last_record = Instant::now();
        }
    }
    records
}

/// The group's committed offsets and their metadata, read as any client would.
pub fn group_offsets(h: &Harness, partitions: i32) -> BTreeMap<i32, (i64, String)> {
    let stage = &h.plan.stages[0];
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &h.bootstrap)
        .set("group.id", &stage.consumer_group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for partition in 0..partitions {
        tpl.add_partition(&stage.input.topic, partition);
    }
    // A coordinator still loading (a fresh broker, a group just created)
    // answers with a retriable error: ask again until TIMEOUT.
    let deadline = Instant::now() + TIMEOUT;
    let committed = loop {
        match consumer.committed_offsets(tpl.clone(), TIMEOUT) {
            Ok(committed) => break committed,
            Err(error) if Instant::now() < deadline => {
                eprintln!("reading the group's committed offsets: {error}; asking again");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(error) => panic!("reading the group's committed offsets: {error}"),
        }
    };
    committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), (o, e.metadata().to_owned()))),
            _ => None,
        })
        .collect()
}

/// The steps of the CDC pipelines: redeliveries removed, then each order's
/// events put in sequence.
pub const CDC_STEPS: &str = r#"  steps:
    - name: dedup
      dedup: {key: [order_id, event_id], window: 1h}
    - name: order
      order: {key: [order_id], sequence: seq, maxDelay: 10s, contiguous: true, onStale: Drop}
"#;

pub fn cdc_pipeline(name: &str) -> String {
    cdc_manifest(
        name,
        &format!(
            r#"{CDC_STEPS}  sinks:
    - name: out
      kafka: {{topic: {name}.out, partitions: 3, key: [order_id], preserveOrder: true}}
  delivery: ExactlyOnce
  commitInterval: 300ms
"#
        ),
    )
}

/// A Pipeline `name` reading the CDC events of [`cdc_input`] from `<name>.in`
/// (keyed by order, with the schema `event_id`, `order_id`, `seq`), followed by
/// `rest`: the spec's steps, sinks and settings, indented as spec members.
pub fn cdc_manifest(name: &str, rest: &str) -> String {
    cdc_manifest_in("e2e", name, &format!("{name}.in"), rest)
}

/// As [`cdc_manifest`], in namespace `ns`, reading `source`.
pub fn cdc_manifest_in(ns: &str, name: &str, source: &str, rest: &str) -> String {
    format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: {name}, namespace: {ns}}}
spec:
  source:
    topic: {source}
    key: [order_id]
    schema:
      fields:
        - {{name: event_id, type: string}}
        - {{name: order_id, type: string}}
        - {{name: seq, type: integer}}
{rest}"#
    )
}

/// CDC input: `keys` orders with sequences 1..=`seqs`; the first event of an
/// order comes first, later ones are locally swapped (bounded disorder), and a
/// fifth of the events is delivered twice (a redelivery a few events later).
pub fn cdc_input(keys: u32, seqs: i64, seed: u64) -> Vec<(String, String)> {
    let mut rng = Lcg(seed);
    let mut per_key: Vec<Vec<(String, String)>> = Vec::new();
    for k in 0..keys {
        let order = format!("order-{k}");
        let mut sequence: Vec<i64> = (1..=seqs).collect();
        let mut i = 1;
        while i + 1 < sequence.len() {
            if rng.below(3) == 0 {
                sequence.swap(i, i + 1);
                i += 2;
            } else {
                i += 1;
            }
        }
        let mut events = Vec::new();
        for seq in sequence {
            let event =
                format!(r#"{{"event_id":"{order}-{seq}","order_id":"{order}","seq":{seq}}}"#);
            events.push((order.clone(), event.clone()));
            if rng.below(5) == 0 {
                events.push((order.clone(), event));
            }
        }
        per_key.push(events);
    }
    // Interleave the orders, keeping each order's own sequence of events.
    let mut out = Vec::new();
    let mut cursors = vec![0usize; per_key.len()];
    while out.len() < per_key.iter().map(Vec::len).sum() {
        let k = rng.below(per_key.len() as u64) as usize;
        if cursors[k] < per_key[k].len() {
            out.push(per_key[k][cursors[k]].clone());
            cursors[k] += 1;
        }
    }
    out
}

/// Every order's sequences 1..=seqs exactly once and ascending.
pub fn assert_exactly_once_in_order(
    records: &[(String, String, BTreeMap<String, String>)],
    keys: u32,
    seqs: i64,
    logs: &str,
) {
    let mut by_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (key, value, _) in records {
        let event: serde_json::Value = serde_json::from_str(value).unwrap();
        assert_eq!(
            event["order_id"].as_str(),
            Some(key.as_str()),
            "record key is the order id"
        );
        by_key
            .entry(key.clone())
            .or_default()
            .push(event["seq"].as_i64().unwrap());
    }
    let expected: Vec<i64> = (1..=seqs).collect();
    let mut wrong = Vec::new();
    for k in 0..keys {
        let key = format!("order-{k}");
        let got = by_key.get(&key).cloned().unwrap_or_default();
        if got != expected {
            wrong.push(format!("{key}: {got:?}"));
        }
    }
    assert!(
        wrong.is_empty() && records.len() == (keys as usize) * (seqs as usize),
        "{} records; orders not exactly once and in order:\n{}\nlogs: {logs}",
        records.len(),
        wrong.join("\n")
    );
}

pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .reduce(|a, b| a + b)
}

/// How long a stage may take to consume everything produced.
pub const CATCH_UP: Duration = Duration::from_secs(180);

/// End offsets of every partition of `topic`.
pub fn end_offsets(h: &Harness, topic: &str, partitions: i32) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &h.bootstrap)
        .create()
        .unwrap();
    (0..partitions)
        .map(|p| (p, consumer.fetch_watermarks(topic, p, TIMEOUT).unwrap().1))
        .collect()
}

/// The group's committed offsets per partition.
pub fn committed(h: &Harness, partitions: i32) -> BTreeMap<i32, i64> {
    group_offsets(h, partitions)
        .into_iter()
        .map(|(p, (o, _))| (p, o))
        .collect()
}

/// Waits until the stage's group committed the end of every input partition:
/// with the sink prepared before each commit, everything is in the index.
/// Fails at once when an instance exits (none should, on its own).
pub fn wait_caught_up(h: &mut Harness, partitions: i32, logs: &str) {
    let source = h.plan.source.topic.clone();
    let deadline = Instant::now() + CATCH_UP;
    loop {
        assert_running(h, logs);
        let ends = end_offsets(h, &source, partitions);
        let done = committed(h, partitions);
        // A partition that never held a record may have no committed offset.
        if ends
            .iter()
            .all(|(p, end)| done.get(p).copied().unwrap_or(0) == *end)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the group did not commit the end of the input within {CATCH_UP:?}: committed {done:?}, ends {ends:?}; logs: {logs}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Every instance the harness started is still running.
pub fn assert_running(h: &mut Harness, logs: &str) {
    for (instance, child) in &mut h.instances {
        if let Some(status) = child.try_wait().unwrap() {
            let log =
                std::fs::read_to_string(h.dir.join(format!("{instance}.log"))).unwrap_or_default();
            let last: Vec<&str> = log.lines().rev().take(3).collect();
            panic!(
                "{instance} exited ({status}) by itself; its last lines:\n{}\nlogs: {logs}",
                last.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// The log paths of `instances`, for failure messages.
pub fn logs(h: &Harness, instances: &[&str]) -> String {
    instances
        .iter()
        .map(|i| h.log(i))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The test's random seed: `KEYSTONE_TEST_SEED`, else the clock (printed, to replay).
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("KEYSTONE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: seed {seed} (KEYSTONE_TEST_SEED={seed} replays it)");
    seed
}

/// One checkpoint of the whole stage: every instance's answer, merged, once
/// they cover every partition exactly once and everything produced.
pub fn stage_checkpoint(
    h: &Harness,
    instances: &[&str],
    partitions: i32,
    produced: usize,
) -> InstanceCheckpoint {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut merged: Option<InstanceCheckpoint> = None;
        let mut overlap = false;
        let mut last = String::new();
        for instance in instances {
            let (status, body) = h.http(instance, "POST", "/checkpoint");
            if status != 200 {
                last = format!("{instance}: HTTP {status}: {body}");
                overlap = true;
                break;
            }
            let one: InstanceCheckpoint =
                serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
            match &mut merged {
                None => merged = Some(one),
                Some(all) => {
                    for (p, o) in one.source_offsets {
                        overlap |= all.source_offsets.insert(p, o).is_some();
                    }
                    for (topic, positions) in one.changelog_positions {
                        all.changelog_positions
                            .entry(topic)
                            .or_default()
                            .extend(positions);
                    }
                }
            }
        }
        if let Some(all) = merged.filter(|_| !overlap) {
            let covered: Vec<i32> = all.source_offsets.keys().copied().collect();
            let sum: i64 = all.source_offsets.values().sum();
            if covered == (0..partitions).collect::<Vec<_>>() && sum as usize == produced {
                return all;
            }
            last = format!("{all:?}");
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint of the stage covering its {partitions} partitions and {produced} records; last: {last}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Starts `instances` with `env`, produces `slices` to `topic` one after
/// another over `streaming`, and meanwhile SIGKILLs a random instance at
/// three random moments, mid-stream with no chance to commit, restarting it
/// at once. Returns when every slice is produced.
pub fn stream_through_sigkills(
    h: &mut Harness,
    rng: &mut Lcg,
    instances: &[&str],
    env: &[(&str, &str)],
    topic: &str,
    slices: Vec<Vec<(String, String)>>,
    streaming: Duration,
) {
    let mut kill_at: Vec<Duration> = (0..3)
        .map(|_| Duration::from_millis(300 + rng.below(streaming.as_millis() as u64 - 300)))
        .collect();
    kill_at.sort();
    eprintln!("SIGKILLs at {kill_at:?} of {streaming:?} of streaming");
    for instance in instances {
        h.start(instance, env);
    }
    let (bootstrap, topic) = (h.bootstrap.clone(), topic.to_owned());
    let pause = streaming / slices.len().max(1) as u32;
    let started = Instant::now();
    let producing = std::thread::spawn(move || {
        let p = producer(&bootstrap);
        for slice in slices {
            produce(&p, &topic, &slice);
            std::thread::sleep(pause);
        }
    });
    for at in kill_at {
        std::thread::sleep(at.saturating_sub(started.elapsed()));
        let victim = instances[rng.below(instances.len() as u64) as usize];
        eprintln!("SIGKILL {victim} at {:?}", started.elapsed());
        h.kill(victim);
        h.start(victim, env);
    }
    producing.join().expect("producer");
}

/// Starts `instances` again with `env` and `restore` (written to the
/// harness's folder and named by `KEYSTONE_RESTORE`).
pub fn start_restored(
    h: &mut Harness,
    instances: &[&str],
    env: &[(&str, &str)],
    restore: &keystone_crds::checkpoint::RestorePlan,
) {
    let restore_path = h.dir.join("restore.json");
    std::fs::write(&restore_path, serde_json::to_vec_pretty(restore).unwrap()).unwrap();
    let restore_path = restore_path.display().to_string();
    let mut with_restore = env.to_vec();
    with_restore.push(("KEYSTONE_RESTORE", restore_path.as_str()));
    for instance in instances {
        h.start(instance, &with_restore);
    }
}
