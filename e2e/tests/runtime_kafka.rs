//! The runtime on the testbed's real Kafka: exactly-once through crashes and
//! rebalances, state restored from changelogs, dead letters with headers, and
//! the operations endpoints.
//!
//! Needs `target/debug/keystone-runtime` (`cargo build -p keystone-runtime`;
//! scripts/test builds it) and a running testbed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use keystone_crds::plan::{Partitions, Plan, TopicRole};
use keystone_e2e::Testbed;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const TIMEOUT: Duration = Duration::from_secs(30);

fn runtime_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/keystone-runtime");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p keystone-runtime` (scripts/test does)",
        path.display()
    );
    path
}

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A small deterministic generator (no dependency, same sequence every run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One pipeline under test: its plan on disk, its topics, its instances.
struct Harness {
    bootstrap: String,
    dir: PathBuf,
    plan_path: PathBuf,
    plan: Plan,
    instances: BTreeMap<String, Child>,
    ports: BTreeMap<String, u16>,
}

impl Harness {
    async fn new(name: &str, manifest: &str, source_partitions: i32) -> Self {
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
    async fn create_topics(&self, source_partitions: i32) {
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

    fn start(&mut self, instance: &str, extra_env: &[(&str, &str)]) {
        self.start_stage(instance, "s0", extra_env);
    }

    fn start_stage(&mut self, instance: &str, stage: &str, extra_env: &[(&str, &str)]) {
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
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        for (key, value) in extra_env {
            command.env(key, value);
        }
        let child = command.spawn().expect("runtime starts");
        self.instances.insert(instance.to_owned(), child);
    }

    fn kill(&mut self, instance: &str) {
        if let Some(mut child) = self.instances.remove(instance) {
            child.kill().ok(); // SIGKILL: no chance to commit
            child.wait().ok();
        }
    }

    fn terminate(&mut self, instance: &str) {
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
    fn wait_for_partitions(&self, instances: &[&str]) {
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

    fn log(&self, instance: &str) -> String {
        self.dir
            .join(format!("{instance}.log"))
            .display()
            .to_string()
    }

    fn http(&self, instance: &str, method: &str, path: &str) -> (u16, String) {
        let port = self.ports[instance];
        http_request(port, method, path)
    }

    fn sink_topic(&self) -> String {
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_request(port: u16, method: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    stream.set_read_timeout(Some(Duration::from_secs(70))).ok();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut response = String::new();
    stream.read_to_string(&mut response).ok();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn producer(bootstrap: &str) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()
        .unwrap()
}

fn produce(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    records: &[(String, String)],
) {
    for (key, value) in records {
        let mut record = BaseRecord::to(topic)
            .key(key.as_bytes())
            .payload(value.as_bytes());
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
fn read_committed(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    within: Duration,
    quiet: Duration,
) -> Vec<(String, String, BTreeMap<String, String>)> {
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
                String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
                String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned(),
                headers,
            ));
            last_record = Instant::now();
        }
    }
    records
}

fn cdc_pipeline(name: &str) -> String {
    format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: {name}, namespace: e2e}}
spec:
  source:
    topic: {name}.in
    key: [order_id]
    schema:
      fields:
        - {{name: event_id, type: string}}
        - {{name: order_id, type: string}}
        - {{name: seq, type: integer}}
  steps:
    - name: dedup
      dedup: {{key: [order_id, event_id], window: 1h}}
    - name: order
      order: {{key: [order_id], sequence: seq, maxDelay: 10s, contiguous: true, onStale: Drop}}
  sinks:
    - name: out
      kafka: {{topic: {name}.out, partitions: 3, key: [order_id], preserveOrder: true}}
  delivery: ExactlyOnce
  commitInterval: 300ms
"#
    )
}

/// CDC input: `keys` orders with sequences 1..=`seqs`; the first event of an
/// order comes first, later ones are locally swapped (bounded disorder), and a
/// fifth of the events is delivered twice (a redelivery a few events later).
fn cdc_input(keys: u32, seqs: i64, seed: u64) -> Vec<(String, String)> {
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
fn assert_exactly_once_in_order(
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

#[tokio::test(flavor = "multi_thread")]
async fn exactly_once_through_repeated_sigkill() {
    let name = unique("eos-kill");
    let mut h = Harness::new(&name, &cdc_pipeline(&name), 4).await;
    let (keys, seqs) = (24, 30);
    let input = cdc_input(keys, seqs, 42);
    let source = h.plan.source.topic.clone();
    let bootstrap = h.bootstrap.clone();

    // Input arrives steadily for about 12 s while the instance is killed (SIGKILL,
    // no chance to commit) at arbitrary points and restarted, three times.
    let feeder = std::thread::spawn(move || {
        let p = producer(&bootstrap);
        for chunk in input.chunks(input.len() / 40 + 1) {
            produce(&p, &source, chunk);
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let mut rng = Lcg(7);
    h.start("a", &[]);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(2500 + rng.below(1500)));
        h.kill("a");
        h.start("a", &[]);
    }
    feeder.join().unwrap();
    let out = h.sink_topic();
    let records = read_committed(
        &h.bootstrap,
        &out,
        (keys as usize) * (seqs as usize),
        Duration::from_secs(90),
        Duration::from_secs(3),
    );
    assert_exactly_once_in_order(&records, keys, seqs, &h.log("a"));
    // The last incarnation resumed from committed state, not from scratch.
    let (_, metrics) = h.http("a", "GET", "/metrics");
    assert!(
        metric_value(&metrics, "keystone_restore_records_total").unwrap_or(0.0) > 0.0,
        "the last instance restored no state: the kills did not hit a running pipeline\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn partitions_move_to_the_survivor_with_their_state() {
    let name = unique("eos-move");
    let mut h = Harness::new(&name, &cdc_pipeline(&name), 4).await;
    let (keys, seqs) = (24, 16);
    let input = cdc_input(keys, seqs, 9);
    let source = h.plan.source.topic.clone();
    let p = producer(&h.bootstrap);

    h.start("a", &[]);
    h.start("b", &[]);
    // Both must own partitions before b dies, or there is nothing to move.
    h.wait_for_partitions(&["a", "b"]);
    let half = input.len() / 2;
    produce(&p, &source, &input[..half]);
    std::thread::sleep(Duration::from_millis(2500));
    // b dies; after the session timeout its partitions move to a, which restores
    // their dedup and order state from the changelogs before going on.
    h.kill("b");
    produce(&p, &source, &input[half..]);
    let out = h.sink_topic();
    let records = read_committed(
        &h.bootstrap,
        &out,
        (keys as usize) * (seqs as usize),
        Duration::from_secs(120),
        Duration::from_secs(3),
    );
    assert_exactly_once_in_order(
        &records,
        keys,
        seqs,
        &format!("{} {}", h.log("a"), h.log("b")),
    );
    let (_, metrics) = h.http("a", "GET", "/metrics");
    let restored: f64 = metric_value(&metrics, "keystone_restore_records_total").unwrap_or(0.0);
    assert!(
        restored > 0.0,
        "a restored no state after taking over b's partitions:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn scaling_one_to_three_to_one_loses_and_duplicates_nothing() {
    let name = unique("eos-scale");
    let mut h = Harness::new(&name, &cdc_pipeline(&name), 6).await;
    let (keys, seqs) = (30, 15);
    let input = cdc_input(keys, seqs, 5);
    let source = h.plan.source.topic.clone();
    let p = producer(&h.bootstrap);
    let thirds: Vec<&[(String, String)]> = input.chunks(input.len() / 3 + 1).collect();

    h.start("a", &[]);
    produce(&p, &source, thirds[0]);
    std::thread::sleep(Duration::from_secs(2));
    h.start("b", &[]);
    h.start("c", &[]);
    produce(&p, &source, thirds[1]);
    std::thread::sleep(Duration::from_secs(3));
    h.terminate("b");
    h.terminate("c");
    produce(&p, &source, thirds[2]);
    let out = h.sink_topic();
    let records = read_committed(
        &h.bootstrap,
        &out,
        (keys as usize) * (seqs as usize),
        Duration::from_secs(120),
        Duration::from_secs(3),
    );
    assert_exactly_once_in_order(&records, keys, seqs, &h.log("a"));
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_events_go_to_the_dead_letter_topic_with_headers() {
    let name = unique("dlq");
    let mut h = Harness::new(&name, &cdc_pipeline(&name), 2).await;
    let source = h.plan.source.topic.clone();
    let p = producer(&h.bootstrap);
    h.start("a", &[]);
    let records = vec![
        (
            "order-1".to_owned(),
            r#"{"event_id":"e1","order_id":"order-1","seq":1}"#.to_owned(),
        ),
        ("order-1".to_owned(), "this is not json".to_owned()),
        (
            "order-1".to_owned(),
            r#"{"event_id":"e2","order_id":"order-1","seq":"two"}"#.to_owned(),
        ),
        (
            "order-1".to_owned(),
            r#"{"event_id":"e3","order_id":"order-1","seq":2}"#.to_owned(),
        ),
    ];
    produce(&p, &source, &records);
    let dead = read_committed(
        &h.bootstrap,
        &h.plan.dead_letter_topic,
        2,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    assert_eq!(dead.len(), 2, "{dead:?}");
    // Dead letters carry no key, so they may sit in different partitions: order
    // them by the offset they name. The poison records were offsets 1 and 2.
    let mut dead = dead;
    dead.sort_by_key(|(_, _, headers)| {
        headers
            .get("keystone.offset")
            .and_then(|o| o.parse::<i64>().ok())
    });
    let offsets: Vec<&str> = dead
        .iter()
        .map(|(_, _, h)| h["keystone.offset"].as_str())
        .collect();
    assert_eq!(
        offsets,
        ["1", "2"],
        "each dead letter names its record's offset"
    );
    assert_eq!(dead[0].1, "this is not json", "the original bytes are kept");
    for (_, _, headers) in &dead {
        assert_eq!(
            headers.get("keystone.step").map(String::as_str),
            Some("source"),
            "{headers:?}"
        );
        assert_eq!(headers.get("keystone.topic"), Some(&source), "{headers:?}");
        assert!(
            headers
                .get("keystone.partition")
                .is_some_and(|p| p.parse::<i32>().is_ok()),
            "{headers:?}"
        );
        assert!(
            headers
                .get("keystone.offset")
                .is_some_and(|o| o.parse::<i64>().is_ok_and(|o| o >= 0)),
            "{headers:?}"
        );
        assert!(
            headers
                .get("keystone.reason")
                .is_some_and(|r| !r.is_empty()),
            "{headers:?}"
        );
    }
    assert!(
        dead[1].2["keystone.reason"].contains("seq"),
        "the reason names the field: {:?}",
        dead[1].2
    );
    // The pipeline kept going: both valid events reach the sink, in order.
    let out = read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        2,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    let seqs: Vec<i64> = out
        .iter()
        .map(|(_, v, _)| {
            serde_json::from_str::<serde_json::Value>(v).unwrap()["seq"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, [1, 2]);
}

fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .reduce(|a, b| a + b)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_readiness_and_checkpoints() {
    let name = unique("ops");
    let mut h = Harness::new(&name, &cdc_pipeline(&name), 2).await;
    let source = h.plan.source.topic.clone();
    let p = producer(&h.bootstrap);
    let input = cdc_input(10, 10, 3);
    produce(&p, &source, &input);

    h.start("a", &[]);
    // Ready only once consuming with restored state.
    let deadline = Instant::now() + TIMEOUT;
    while h.http("a", "GET", "/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "never ready; see {}", h.log("a"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(h.http("a", "GET", "/healthz").0, 200);
    let out = read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        100,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    assert_eq!(out.len(), 100);

    let (status, body) = h.http("a", "POST", "/checkpoint");
    assert_eq!(status, 200, "{body}");
    let checkpoint: serde_json::Value = serde_json::from_str(&body).unwrap();
    let offsets = checkpoint["sourceOffsets"].as_object().unwrap();
    let consumed: i64 = offsets.values().map(|v| v.as_i64().unwrap()).sum();
    assert_eq!(
        consumed as usize,
        input.len(),
        "the checkpoint covers every consumed record: {body}"
    );
    assert!(
        checkpoint["changelogPositions"]
            .as_object()
            .is_some_and(|m| m.len() == 2),
        "{body}"
    );

    let (_, metrics) = h.http("a", "GET", "/metrics");
    for series in [
        "keystone_step_events_in_total{",
        "keystone_step_events_out_total{",
        "keystone_step_events_dropped_total{",
        "keystone_step_events_dead_lettered_total{",
        "keystone_consumer_lag{",
        "keystone_commit_duration_seconds_count",
        "keystone_state_entries{",
        "keystone_state_changelog_bytes_total{",
        "keystone_restore_records_total",
        "keystone_rebalances_total{",
        "keystone_assigned_partitions",
    ] {
        assert!(
            metrics.contains(series),
            "/metrics lacks {series}:\n{metrics}"
        );
    }
    let dropped = metric_value(&metrics, "keystone_step_events_dropped_total{").unwrap_or(0.0);
    assert_eq!(
        dropped as usize,
        input.len() - 100,
        "duplicates are counted as dropped:\n{metrics}"
    );

    // A restart restores state first: /readyz is not 200 before the restore ends,
    // and the restored dedup state keeps old duplicates out.
    h.terminate("a");
    let restore_marker = h.dir.join("restore-observed");
    h.start("a", &[]);
    let mut saw_not_ready = false;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (status, body) = h.http("a", "GET", "/readyz");
        if status == 503 {
            saw_not_ready = true;
            std::fs::write(&restore_marker, body).ok();
        }
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never ready after restart; see {}",
            h.log("a")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        saw_not_ready,
        "/readyz answered 200 before the consumer joined and restored"
    );
    let (_, metrics) = h.http("a", "GET", "/metrics");
    assert!(
        metric_value(&metrics, "keystone_restore_records_total").unwrap_or(0.0) > 0.0,
        "{metrics}"
    );
    produce(&p, &source, &input[..10]);
    std::thread::sleep(Duration::from_secs(2));
    let again = read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        100,
        Duration::from_secs(30),
        Duration::from_secs(2),
    );
    assert_eq!(
        again.len(),
        100,
        "redelivered events were let through after the restore"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn enrichment_sees_table_rows_that_change_while_running() {
    let name = unique("enrich");
    let manifest = format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: {name}, namespace: e2e}}
spec:
  source:
    topic: {name}.in
    key: [customer_id]
    schema:
      fields:
        - {{name: order_id, type: string}}
        - {{name: customer_id, type: string}}
  steps:
    - name: customer
      enrich:
        table:
          name: customers
          topic: {name}.customers
          key: [id]
          schema: {{fields: [{{name: id, type: string}}, {{name: tier, type: string}}]}}
        lookupKey: [customer_id]
        into: customer
  sinks:
    - name: out
      kafka: {{topic: {name}.out, partitions: 2}}
  commitInterval: 200ms
"#
    );
    let mut h = Harness::new(&name, &manifest, 3).await;
    assert_eq!(
        h.plan.stages.len(),
        1,
        "the table is co-partitioned with the source: no repartition"
    );
    let table = format!("{name}.customers");
    let source = h.plan.source.topic.clone();
    let p = producer(&h.bootstrap);
    let row = |id: &str, tier: &str| (id.to_owned(), format!(r#"{{"id":"{id}","tier":"{tier}"}}"#));
    let order = |id: &str, customer: &str| {
        (
            customer.to_owned(),
            format!(r#"{{"order_id":"{id}","customer_id":"{customer}"}}"#),
        )
    };
    produce(&p, &table, &[row("c1", "gold"), row("c2", "silver")]);
    h.start("a", &[]);
    produce(&p, &source, &[order("o1", "c1"), order("o2", "c2")]);
    let out = read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        2,
        TIMEOUT,
        Duration::from_millis(500),
    );
    assert_eq!(out.len(), 2, "{out:?}");

    // Rows change and arrive while the stage runs: later events see them.
    produce(&p, &table, &[row("c1", "platinum"), row("c3", "bronze")]);
    std::thread::sleep(Duration::from_secs(2));
    produce(&p, &source, &[order("o3", "c1"), order("o4", "c3")]);
    let out = read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        4,
        TIMEOUT,
        Duration::from_millis(500),
    );
    let tiers: BTreeMap<String, String> = out
        .iter()
        .map(|(_, v, _)| {
            let event: serde_json::Value = serde_json::from_str(v).unwrap();
            (
                event["order_id"].as_str().unwrap().to_owned(),
                event["customer"]["tier"]
                    .as_str()
                    .unwrap_or("<none>")
                    .to_owned(),
            )
        })
        .collect();
    let expected: BTreeMap<String, String> = [
        ("o1", "gold"),
        ("o2", "silver"),
        ("o3", "platinum"),
        ("o4", "bronze"),
    ]
    .into_iter()
    .map(|(o, t)| (o.to_owned(), t.to_owned()))
    .collect();
    assert_eq!(tiers, expected, "logs: {}", h.log("a"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rekeyed_stream_flows_through_a_repartition_topic_into_the_next_stage() {
    let name = unique("repart");
    // Events are keyed by order; the dedup is per customer and event, so the
    // plan cuts a second stage that reads a repartition topic keyed by customer.
    let manifest = format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: {name}, namespace: e2e}}
spec:
  source:
    topic: {name}.in
    key: [order_id]
    schema:
      fields:
        - {{name: order_id, type: string}}
        - {{name: customer_id, type: string}}
        - {{name: event_id, type: string}}
  steps:
    - name: by-customer
      rekey: {{key: [customer_id]}}
    - name: dedup
      dedup: {{key: [customer_id, event_id], window: 1h}}
  sinks:
    - name: out
      kafka: {{topic: {name}.out, partitions: 2}}
  commitInterval: 200ms
"#
    );
    let mut h = Harness::new(&name, &manifest, 3).await;
    assert_eq!(
        h.plan.stages.len(),
        2,
        "{}",
        serde_json::to_string_pretty(&h.plan).unwrap()
    );
    let repartition = format!("keystone.e2e.{name}.repartition.dedup");
    assert_eq!(h.plan.stages[1].input.topic, repartition);
    h.start_stage("first", "s0", &[]);
    h.start_stage("second", "s1", &[]);
    let p = producer(&h.bootstrap);
    // The same event (customer, event id) arrives through two different orders,
    // so on two source partitions: only a stage partitioned by customer sees both.
    let mut input = Vec::new();
    for c in 0..20 {
        for e in 0..5 {
            for order in [format!("o{c}-{e}-a"), format!("o{c}-{e}-b")] {
                input.push((
                    order.clone(),
                    format!(r#"{{"order_id":"{order}","customer_id":"c{c}","event_id":"e{e}"}}"#),
                ));
            }
        }
    }
    produce(&p, &h.plan.source.topic.clone(), &input);
    let out = read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        100,
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    let mut seen = BTreeMap::new();
    for (key, value, _) in &out {
        let event: serde_json::Value = serde_json::from_str(value).unwrap();
        assert_eq!(
            event["customer_id"].as_str(),
            Some(key.as_str()),
            "sink records are keyed by the new key"
        );
        *seen
            .entry((key.clone(), event["event_id"].as_str().unwrap().to_owned()))
            .or_insert(0) += 1;
    }
    assert_eq!(
        seen.len(),
        100,
        "every (customer, event) once: {} records; logs: {} {}",
        out.len(),
        h.log("first"),
        h.log("second")
    );
    assert!(
        seen.values().all(|n| *n == 1),
        "duplicates passed: {seen:?}"
    );
    let through = read_committed(
        &h.bootstrap,
        &repartition,
        200,
        Duration::from_secs(10),
        Duration::from_millis(500),
    );
    assert_eq!(
        through.len(),
        200,
        "the first stage wrote every event to the repartition topic"
    );
}
