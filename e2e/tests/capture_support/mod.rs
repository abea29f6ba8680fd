//! What the capture's end-to-end tests share: a table's capture under test
//! (`keystone-runtime capture` as a child process, with its slot,
//! publication and topic on the testbed's PostgreSQL and Kafka).
//!
//! Needs `target/debug/keystone-runtime` (scripts/test builds it) and a
//! testbed with Kafka and PostgreSQL.

// Each test file uses a different part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keystone_e2e::Testbed;
use keystone_e2e::postgres::Postgres;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use serde_json::{Value, json};
use tokio_postgres::error::SqlState;

use crate::runtime_support::{free_port, http_request, metric_value, runtime_binary, unique};

/// One capture under test: its table, topic, slot and process.
pub struct Capture {
    pub pg: Postgres,
    pub bootstrap: String,
    pub name: String,
    pub table: String,
    pub topic: String,
    pub dir: PathBuf,
    child: Option<Child>,
    starts: u32,
    /// Where its operations endpoints listen.
    pub port: u16,
}

impl Capture {
    pub async fn new(prefix: &str) -> Option<Capture> {
        let pg = Postgres::require()?;
        let testbed = Testbed::from_env().await.expect("testbed");
        let bootstrap = testbed.kafka_bootstrap_servers().expect("kafka").to_owned();
        // Slot, publication and table names: lower case, digits, underscores.
        let name = unique(prefix).replace('-', "_");
        let dir = testbed.state_dir().join("capture-tests").join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        Some(Capture {
            table: format!("public.{name}"),
            topic: format!("cdc.{name}"),
            pg,
            bootstrap,
            name,
            dir,
            child: None,
            starts: 0,
            port: free_port(),
        })
    }

    /// A connection as the capture's role, which owns the test's tables.
    pub async fn connect(&self) -> tokio_postgres::Client {
        self.pg.connect().await
    }

    pub async fn create_topic(&self, partitions: i32) {
        create_topics(&self.bootstrap, &[&self.topic], partitions).await;
    }

    /// Creates the test table `(id, account, version, amount, note)` (see
    /// [`table_rows`]) with `rows` rows, owned by the capture's role.
    pub async fn create_table(&self, rows: i64) {
        self.connect()
            .await
            .batch_execute(&format!(
                "CREATE TABLE {t} (id bigint PRIMARY KEY, account int NOT NULL, version int NOT NULL, amount numeric(12,2), note text);
                 INSERT INTO {t} SELECT g, g % 100, 0, 10.00, 'initial' FROM generate_series(1, {rows}) g;",
                t = self.table
            ))
            .await
            .unwrap();
    }

    pub fn start(&mut self, chunk_size: u32) {
        self.start_with(chunk_size, json!({}));
    }

    /// Starts (again) the capture with `chunkSize` and any `extra`
    /// configuration fields (`{"envelope": "debezium"}`, say).
    pub fn start_with(&mut self, chunk_size: u32, extra: Value) {
        let mut config = json!({
            "postgres": {"host": self.pg.host, "port": self.pg.port, "database": self.pg.database, "user": self.pg.user},
            "tables": [self.table],
            "publication": self.name, "createPublication": true,
            "slot": self.name, "createSlot": true,
            "topic": self.topic,
            "snapshot": {"chunkSize": chunk_size},
            "commitInterval": "100ms",
        });
        if let (Some(config), Value::Object(extra)) = (config.as_object_mut(), extra) {
            config.extend(extra);
        }
        let path = self.dir.join("capture.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        self.starts += 1;
        let log =
            std::fs::File::create(self.dir.join(format!("capture-{}.log", self.starts))).unwrap();
        let child = Command::new(runtime_binary())
            .arg("capture")
            .arg("--config")
            .arg(&path)
            .arg("--bootstrap-servers")
            .arg(&self.bootstrap)
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{}", self.port))
            .env("KEYSTONE_POSTGRES_PASSWORD", &self.pg.password)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("the capture starts");
        self.child = Some(child);
    }

    /// Waits until the running instance has completed `chunks` snapshot chunks.
    pub async fn wait_for_chunks(&mut self, chunks: u32) {
        self.wait_for_metric("keystone_capture_snapshot_chunks_total", f64::from(chunks))
            .await;
    }

    /// Waits until the running instance's metric `name` is `at_least`.
    pub async fn wait_for_metric(&mut self, name: &str, at_least: f64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.assert_running();
            let (_, metrics) = http_request(self.port, "GET", "/metrics");
            if metric_value(&metrics, name).unwrap_or(0.0) >= at_least {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} not {at_least} within 60 s\n{metrics}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok(); // SIGKILL: no chance to commit
            child.wait().ok();
        }
    }

    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                let path = self.dir.join(format!("capture-{n}.log"));
                format!(
                    "--- {}\n{}",
                    path.display(),
                    std::fs::read_to_string(&path).unwrap_or_default()
                )
            })
            .collect()
    }

    pub fn assert_running(&mut self) {
        if let Some(child) = &mut self.child
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("the capture exited with {status}\n{}", self.logs());
        }
    }

    /// Waits until the slot has confirmed everything written so far: every
    /// change is then in Kafka.
    pub async fn wait_caught_up(&mut self, admin: &tokio_postgres::Client) {
        let target: String = admin
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            self.assert_running();
            let done: Option<bool> = admin
                .query_one(
                    "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
                    &[&target, &self.name],
                )
                .await
                .unwrap()
                .get(0);
            if done == Some(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the slot did not confirm {target} within 120 s\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Drops the slot and publication (a test's slot would keep WAL forever).
    pub async fn clean_up(mut self, admin: &tokio_postgres::Client) {
        self.kill();
        drop_slot(admin, &self.name).await;
        admin
            .batch_execute(&format!(
                "DROP PUBLICATION IF EXISTS {0}; DROP TABLE IF EXISTS {0}",
                self.name
            ))
            .await
            .unwrap();
    }

    /// The running (or last) instance's log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("capture-{}.log", self.starts))
    }

    /// Waits until the running instance logged the end of its snapshot.
    pub async fn wait_snapshot_done(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .contains("snapshot done")
        {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "the snapshot did not end within 120 s\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writers changing a table until stopped, each on its own connection: each
/// transaction runs the statements its writer's generator gives (none: no
/// transaction). Two writers locking rows in opposite orders make the
/// database abort one, which changes nothing.
pub struct Writers {
    stop: Arc<AtomicBool>,
    transactions: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    /// `count` writers; `generator(writer)` makes each one's statements.
    pub async fn start<F, G>(pg: &Postgres, count: u64, generator: F) -> Writers
    where
        F: Fn(u64) -> G,
        G: FnMut() -> Vec<String> + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let transactions = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for writer in 0..count {
            let mut client = pg.connect().await;
            let mut next = generator(writer);
            let (stop, transactions) = (stop.clone(), transactions.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let statements = next();
                    if statements.is_empty() {
                        continue;
                    }
                    let txn = client.transaction().await.unwrap();
                    let mut result = Ok(());
                    for sql in &statements {
                        result = txn.batch_execute(sql).await;
                        if result.is_err() {
                            break;
                        }
                    }
                    let result = match result {
                        Ok(()) => txn.commit().await,
                        Err(e) => Err(e),
                    };
                    match result {
                        Ok(()) => {
                            transactions.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) => {}
                        Err(e) => panic!("writer {writer}: {e}"),
                    }
                }
            }));
        }
        Writers {
            stop,
            transactions,
            tasks,
        }
    }

    /// Stops them; the transactions they committed.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("a writer failed");
        }
        self.transactions.load(Ordering::Relaxed)
    }
}

/// The rows of a test table `(id, account, version, amount, note)` as the
/// captures render them, by id.
pub async fn table_rows(admin: &tokio_postgres::Client, table: &str) -> BTreeMap<i64, Value> {
    admin
        .query(
            &format!("SELECT id, account, version, amount::text, note FROM {table}"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let id: i64 = r.get(0);
            let row = json!({
                "id": id,
                "account": r.get::<_, i32>(1),
                "version": r.get::<_, i32>(2),
                "amount": r.get::<_, Option<String>>(3),
                "note": r.get::<_, Option<String>>(4),
            });
            (id, row)
        })
        .collect()
}

/// Creates `topics` with `partitions` each on the testbed's Kafka.
pub async fn create_topics(bootstrap: &str, topics: &[&str], partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    for result in admin
        .create_topics(&new, &AdminOptions::new())
        .await
        .unwrap()
    {
        result.unwrap_or_else(|(topic, e)| panic!("creating {topic}: {e}"));
    }
}

/// Drops a replication slot (a test's slot would keep WAL forever), waiting
/// for a walsender that still holds it to let go.
pub async fn drop_slot(admin: &tokio_postgres::Client, slot: &str) {
    for _ in 0..50 {
        let dropped = admin
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await;
        if dropped.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
