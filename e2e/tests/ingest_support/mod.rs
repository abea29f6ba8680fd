//! What the ingest endpoint's load and outage tests share: a pipeline with an
//! HTTP source, the `keystone-runtime ingest` process on a fixed port (so it
//! can be SIGKILLed and started again where its clients send), batches of
//! records with their idempotency keys, vegeta posting them, and the check
//! that a topic holds every record sent.
//!
//! Needs `target/debug/keystone-runtime` and a running testbed (with vegeta,
//! which `e2e/testbed up` builds).

// Each test file uses a different part of this module.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use keystone_e2e::Testbed;
use serde_json::Value;

use crate::runtime_support::{Lcg, free_port, http_request, metric_value, runtime_binary};

/// The only token of the endpoint, and its name (stamped on each record).
pub const TOKEN: &str = "tok-mobile";
pub const TOKEN_NAME: &str = "mobile";

/// A pipeline `name` with an HTTP source on `partitions` partitions: records
/// `{user, amount}` keyed by user, stamped `rid` = `<Idempotency-Key>/<index>`,
/// deduplicated on `rid`, written to `e2e.<name>.out`.
pub fn manifest(name: &str, partitions: i32) -> String {
    format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: {name}}}
spec:
  source:
    topic: e2e.{name}
    key: [user]
    http:
      path: /events
      tokensSecret: unused-here
      idempotencyField: rid
      maxRecords: 1000
      partitions: {partitions}
    schema:
      fields:
        - {{name: user, type: string}}
        - {{name: amount, type: integer}}
  steps:
    - name: once
      dedup: {{key: [rid], window: 10m}}
  sinks: [{{name: out, kafka: {{topic: e2e.{name}.out, partitions: {partitions}}}}}]
  commitInterval: 300ms
"#
    )
}

/// `keystone-runtime ingest` serving the harness's plan on one port for its
/// whole life, restarts included.
pub struct IngestProcess {
    child: Child,
    args: Vec<String>,
    bootstrap: String,
    pub log: PathBuf,
    pub port: u16,
}

impl IngestProcess {
    /// Starts it with the token [`TOKEN`] and `extra` flags, and waits until
    /// it answers.
    pub fn start(h: &crate::runtime_support::Harness, extra: &[&str]) -> Self {
        let tokens = h.dir.join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        std::fs::write(tokens.join(TOKEN_NAME), format!("{TOKEN}\n")).unwrap();
        let port = free_port();
        let mut args: Vec<String> = vec![
            "ingest".into(),
            "--plan".into(),
            h.plan_path.display().to_string(),
            "--tokens-dir".into(),
            tokens.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let log = h.dir.join("ingest.log");
        let child = spawn(&args, &h.bootstrap, &log);
        let mut ingest = Self {
            child,
            args,
            bootstrap: h.bootstrap.clone(),
            log,
            port,
        };
        ingest.wait_up();
        ingest
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/events", self.port)
    }

    /// SIGKILL (no chance to answer what it holds), then the same command on
    /// the same port, as a restarted container behind its Service.
    pub fn sigkill_and_restart(&mut self) {
        self.child.kill().expect("SIGKILL the ingest process");
        self.child.wait().ok();
        self.child = spawn(&self.args, &self.bootstrap, &self.log);
        self.wait_up();
    }

    /// Requests this process answered, whatever the answer.
    pub fn answered(&self) -> f64 {
        let (_, metrics) = http_request(self.port, "GET", "/metrics");
        metric_value(&metrics, "keystone_ingest_requests_total").unwrap_or(0.0)
    }

    /// Fails when the process exited by itself.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "the ingest process exited by itself ({status}); see {}",
                self.log.display()
            );
        }
    }

    fn wait_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_request(self.port, "GET", "/healthz").0 != 200 {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "the ingest endpoint did not come up; see {}",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for IngestProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(args: &[String], bootstrap: &str, log: &Path) -> Child {
    // Appended: the log of every incarnation stays.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(runtime_binary())
        .args(args)
        .env("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("the runtime starts")
}

/// One request's worth of records, and the `Idempotency-Key` it is sent
/// with on every try.
pub struct Batch {
    pub id: usize,
    pub key: String,
    /// (user, amount) of each record; the amount is unique in the test.
    pub records: Vec<(String, i64)>,
}

impl Batch {
    pub fn new(prefix: &str, id: usize, size: usize) -> Self {
        let records = (0..size)
            .map(|i| (format!("u{}", (id * 7 + i) % 50), (id * 1000 + i) as i64))
            .collect();
        Self {
            id,
            key: format!("{prefix}-b{id}"),
            records,
        }
    }

    /// The body: NDJSON, one record per line.
    pub fn body(&self) -> String {
        self.records
            .iter()
            .map(|(user, amount)| format!("{{\"user\":\"{user}\",\"amount\":{amount}}}\n"))
            .collect()
    }

    /// What the endpoint stamps on record `index`.
    pub fn rid(&self, index: usize) -> String {
        format!("{}/{index}", self.key)
    }
}

/// `count` batches of `min..=max` records each (sizes drawn from `rng`).
pub fn batches(prefix: &str, count: usize, min: u64, max: u64, rng: &mut Lcg) -> Vec<Batch> {
    (0..count)
        .map(|id| Batch::new(prefix, id, (min + rng.below(max - min + 1)) as usize))
        .collect()
}

/// Checks `records` (key, value, headers) of a topic against every record of
/// `batches`: each present with the value and key sent, nothing else there,
/// and, when `exactly_once`, none twice. Returns the number of duplicates.
pub fn check_topic(
    topic: &str,
    records: &[(String, String, BTreeMap<String, String>)],
    batches: &[&Batch],
    exactly_once: bool,
    logs: &str,
) -> usize {
    let mut expected: HashMap<String, (&str, i64)> = HashMap::new();
    for batch in batches {
        for (index, (user, amount)) in batch.records.iter().enumerate() {
            expected.insert(batch.rid(index), (user.as_str(), *amount));
        }
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut wrong = Vec::new();
    for (key, value, headers) in records {
        let value: Value = serde_json::from_str(value).unwrap_or_else(|e| panic!("{e}: {value}"));
        let rid = value["rid"].as_str().unwrap_or_default().to_owned();
        match expected.get(&rid) {
            None => wrong.push(format!("not sent: {value}")),
            Some((user, amount)) => {
                if value["user"].as_str() != Some(user)
                    || value["amount"].as_i64() != Some(*amount)
                    || key != user
                {
                    wrong.push(format!(
                        "{rid}: sent user {user} amount {amount}, found key {key} {value}"
                    ));
                }
            }
        }
        // Only the source topic carries the ingest's header.
        if let Some(token) = headers.get("keystone-ingest-token")
            && token != TOKEN_NAME
        {
            wrong.push(format!("{rid}: token header {token}"));
        }
        *seen.entry(rid).or_default() += 1;
    }
    let mut missing: Vec<&String> = expected.keys().filter(|r| !seen.contains_key(*r)).collect();
    missing.sort();
    let duplicates: usize = seen.values().map(|n| n.saturating_sub(1)).sum();
    let mut twice: Vec<(&String, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    twice.sort();
    let mut report = String::new();
    if !missing.is_empty() {
        let _ = writeln!(
            report,
            "{} of {} records missing, e.g. {:?}",
            missing.len(),
            expected.len(),
            &missing[..missing.len().min(10)]
        );
    }
    if !wrong.is_empty() {
        let _ = writeln!(
            report,
            "{} records wrong, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(10)]
        );
    }
    if exactly_once && !twice.is_empty() {
        let _ = writeln!(
            report,
            "{} records more than once, e.g. {:?}",
            twice.len(),
            &twice[..twice.len().min(10)]
        );
    }
    assert!(
        report.is_empty(),
        "{topic} ({} records read): {report}logs: {logs}",
        records.len()
    );
    duplicates
}

/// vegeta, the testbed's HTTP load generator.
#[derive(Clone)]
pub struct Vegeta {
    bin: PathBuf,
    dir: PathBuf,
}

/// What one request of an attack got.
#[derive(Debug)]
pub struct Outcome {
    pub batch: usize,
    /// 0 when no answer came (refused, reset, timed out).
    pub code: u16,
    pub error: String,
    pub started: SystemTime,
    pub latency: Duration,
    pub retry_after: Option<String>,
    pub body: Vec<u8>,
}

impl Outcome {
    pub fn ended(&self) -> SystemTime {
        self.started + self.latency
    }
}

/// A running attack.
pub struct Attack {
    child: Child,
    name: String,
    output: PathBuf,
    deadline: Instant,
}

impl Attack {
    pub fn is_finished(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }
}

impl Vegeta {
    /// The testbed's vegeta; its files go to `dir`.
    pub fn new(tb: &Testbed, dir: &Path) -> Self {
        let bin = PathBuf::from(
            tb.var("KEYSTONE_TESTBED_VEGETA")
                .expect("the testbed has no vegeta: run `e2e/testbed up`"),
        );
        assert!(
            bin.exists(),
            "{} is missing: run `e2e/testbed up`",
            bin.display()
        );
        Self {
            bin,
            dir: dir.to_owned(),
        }
    }

    /// Starts posting each of `batches` once to `url?batch=<id>` over at most
    /// `connections` connections, each request as soon as one is free.
    pub fn attack(
        &self,
        name: &str,
        url: &str,
        batches: &[&Batch],
        connections: usize,
        timeout: Duration,
    ) -> Attack {
        let targets = self.dir.join(format!("{name}.targets"));
        let mut lines = String::new();
        for batch in batches {
            let target = serde_json::json!({
                "method": "POST",
                "url": format!("{url}?batch={}", batch.id),
                "header": {
                    "Authorization": [format!("Bearer {TOKEN}")],
                    "Content-Type": ["application/x-ndjson"],
                    "Idempotency-Key": [batch.key],
                },
                "body": BASE64.encode(batch.body().as_bytes()),
            });
            // Each target ends with a newline: vegeta drops an unterminated last line.
            lines.push_str(&target.to_string());
            lines.push('\n');
        }
        std::fs::write(&targets, lines).unwrap();
        let output = self.dir.join(format!("{name}.bin"));
        let child = Command::new(&self.bin)
            .arg("attack")
            .args(["-format=json", "-lazy", "-rate=0"])
            .arg(format!("-workers={connections}"))
            .arg(format!("-max-workers={connections}"))
            .arg(format!("-connections={connections}"))
            .arg(format!("-max-connections={connections}"))
            .arg(format!("-timeout={}ms", timeout.as_millis()))
            .arg(format!("-targets={}", targets.display()))
            .arg(format!("-output={}", output.display()))
            .stderr(Stdio::piped())
            .spawn()
            .expect("vegeta starts");
        // However slow the endpoint, no request takes longer than the timeout.
        let rounds = batches.len().div_ceil(connections.max(1)) as u32;
        Attack {
            child,
            name: name.to_owned(),
            output,
            deadline: Instant::now() + timeout * (rounds + 2),
        }
    }

    /// Waits for the attack to end; one outcome per batch, by batch id.
    pub fn finish(&self, mut attack: Attack) -> Vec<Outcome> {
        loop {
            if let Some(status) = attack.child.try_wait().unwrap() {
                let mut stderr = String::new();
                use std::io::Read as _;
                attack
                    .child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut stderr)
                    .ok();
                assert!(
                    status.success(),
                    "vegeta {}: {status}: {stderr}",
                    attack.name
                );
                break;
            }
            if Instant::now() > attack.deadline {
                attack.child.kill().ok();
                panic!("vegeta {} did not end by its deadline", attack.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let encoded = Command::new(&self.bin)
            .args(["encode", "--to", "json"])
            .arg(&attack.output)
            .output()
            .expect("vegeta encode");
        assert!(encoded.status.success(), "vegeta encode: {encoded:?}");
        let mut outcomes = Vec::new();
        for line in String::from_utf8(encoded.stdout).unwrap().lines() {
            let result: Value = serde_json::from_str(line).unwrap();
            let url = result["url"].as_str().unwrap_or_default();
            // The workers' last tries find no target left: no request.
            if url.is_empty() {
                continue;
            }
            let batch = url
                .rsplit_once("?batch=")
                .and_then(|(_, id)| id.parse().ok())
                .unwrap_or_else(|| panic!("no batch in {url}"));
            let timestamp = result["timestamp"].as_str().unwrap();
            let started: SystemTime = chrono::DateTime::parse_from_rfc3339(timestamp)
                .unwrap_or_else(|e| panic!("{e}: {timestamp}"))
                .into();
            outcomes.push(Outcome {
                batch,
                code: result["code"].as_u64().unwrap() as u16,
                error: result["error"].as_str().unwrap_or_default().to_owned(),
                started,
                latency: Duration::from_nanos(result["latency"].as_u64().unwrap()),
                retry_after: result["headers"]["Retry-After"][0]
                    .as_str()
                    .map(str::to_owned),
                body: result["body"]
                    .as_str()
                    .map(|b| BASE64.decode(b).expect("vegeta writes bodies in base64"))
                    .unwrap_or_default(),
            });
        }
        outcomes.sort_by_key(|o| o.batch);
        outcomes
    }
}
