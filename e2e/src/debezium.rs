//! Debezium's PostgreSQL connector in Kafka Connect standalone, against the
//! testbed's Kafka and PostgreSQL: the reference Keystone's change-data
//! capture is compared with. The jars come from `e2e/testbed.d/debezium.sh
//! ensure` (Maven Central, cached; `e2e/testbed up` installs them with the
//! postgres component).
//!
//! ```no_run
//! # async fn t(pg: keystone_e2e::postgres::Postgres, dir: &std::path::Path) {
//! use keystone_e2e::debezium::{Debezium, DebeziumConfig};
//! let config = DebeziumConfig::new("orders", "orders_slot", "orders_pub", "public.orders", "dbz");
//! // The publication must exist; the slot is created when missing. Events of
//! // public.orders go to the topic `dbz.public.orders`.
//! let mut connect = Debezium::start(&pg, "127.0.0.1:19092", dir, &config).unwrap();
//! connect.wait_running(std::time::Duration::from_secs(90)).await.unwrap();
//! // ... stopped (SIGTERM, then SIGKILL) when dropped.
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::postgres::Postgres;
use crate::testbed::state_dir;

/// How long Kafka Connect gets to stop after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Where `e2e/testbed.d/debezium.sh ensure` installed Kafka Connect and the connector.
#[derive(Clone, Debug)]
pub struct Install {
    /// The cached install folder (`debezium-<version>-<pom hash>`).
    pub home: PathBuf,
    /// The worker's class path (`java -cp`).
    pub classpath: String,
    /// The worker's `plugin.path`, holding `debezium-connector-postgres/`.
    pub plugin_path: PathBuf,
}

impl Install {
    /// Runs `e2e/testbed.d/debezium.sh ensure` (a no-op once cached) for the
    /// testbed's cache folder and Kafka version.
    pub fn ensure() -> anyhow::Result<Install> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("testbed.d/debezium.sh");
        let output = Command::new(&script)
            .arg("ensure")
            .env("KEYSTONE_TESTBED_STATE", state_dir())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !output.status.success() {
            bail!(
                "{} ensure failed ({}): {}",
                script.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let var = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_owned)
                .with_context(|| format!("{} printed no {name}: {text}", script.display()))
        };
        Ok(Install {
            home: var("KEYSTONE_DEBEZIUM_HOME")?.into(),
            classpath: var("KEYSTONE_DEBEZIUM_CLASSPATH")?,
            plugin_path: var("KEYSTONE_DEBEZIUM_PLUGIN_PATH")?.into(),
        })
    }
}

/// One connector: what it captures and where its events go.
#[derive(Clone, Debug)]
pub struct DebeziumConfig {
    /// The connector's name (Connect's REST API and offsets).
    pub name: String,
    /// The replication slot (`pgoutput`); created when missing.
    pub slot: String,
    /// The publication; it must exist (`publication.autocreate.mode=disabled`).
    pub publication: String,
    /// `table.include.list`: `schema.table`, comma-separated.
    pub tables: String,
    /// `topic.prefix`: events of `schema.table` go to `<prefix>.<schema>.<table>`.
    pub topic_prefix: String,
    /// `snapshot.mode`: `initial` (the default) or `no_data`.
    pub snapshot_mode: String,
    /// How often Connect commits the source offsets (and Debezium then
    /// confirms the slot's position): `offset.flush.interval.ms`.
    pub offset_flush_ms: u64,
    /// JVM options before the class path; `-Xmx512m` by default.
    pub jvm_options: Vec<String>,
    /// More connector properties (`key=value`), after the ones above.
    pub extra: Vec<(String, String)>,
}

impl DebeziumConfig {
    pub fn new(
        name: &str,
        slot: &str,
        publication: &str,
        tables: &str,
        topic_prefix: &str,
    ) -> DebeziumConfig {
        DebeziumConfig {
            name: name.to_owned(),
            slot: slot.to_owned(),
            publication: publication.to_owned(),
            tables: tables.to_owned(),
            topic_prefix: topic_prefix.to_owned(),
            snapshot_mode: "initial".to_owned(),
            offset_flush_ms: 1000,
            jvm_options: vec!["-Xmx512m".to_owned()],
            extra: Vec::new(),
        }
    }

    /// The topic the events of `table` (`schema.table`) go to.
    pub fn topic(&self, table: &str) -> String {
        format!("{}.{table}", self.topic_prefix)
    }
}

/// The worker's properties: the testbed's Kafka, JSON without schemas,
/// offsets in a file, the REST listener on loopback.
pub fn worker_properties(
    install: &Install,
    bootstrap: &str,
    offsets: &Path,
    rest_port: u16,
    offset_flush_ms: u64,
) -> String {
    format!(
        "bootstrap.servers={bootstrap}
key.converter=org.apache.kafka.connect.json.JsonConverter
value.converter=org.apache.kafka.connect.json.JsonConverter
key.converter.schemas.enable=false
value.converter.schemas.enable=false
offset.storage.file.filename={offsets}
offset.flush.interval.ms={offset_flush_ms}
listeners=http://127.0.0.1:{rest_port}
plugin.path={plugins}
# Every plugin there has ServiceLoader manifests: no class scanning (seconds).
plugin.discovery=service_load
",
        offsets = offsets.display(),
        plugins = install.plugin_path.display(),
    )
}

/// The connector's properties (`pgoutput`, an existing publication, decimals
/// as strings).
pub fn connector_properties(pg: &Postgres, config: &DebeziumConfig) -> String {
    let mut text = format!(
        "name={name}
connector.class=io.debezium.connector.postgresql.PostgresConnector
tasks.max=1
database.hostname={host}
database.port={port}
database.user={user}
database.password={password}
database.dbname={database}
topic.prefix={prefix}
plugin.name=pgoutput
slot.name={slot}
publication.name={publication}
publication.autocreate.mode=disabled
table.include.list={tables}
decimal.handling.mode=string
snapshot.mode={snapshot}
",
        name = config.name,
        host = pg.host,
        port = pg.port,
        user = pg.user,
        password = pg.password,
        database = pg.database,
        prefix = config.topic_prefix,
        slot = config.slot,
        publication = config.publication,
        tables = config.tables,
        snapshot = config.snapshot_mode,
    );
    for (key, value) in &config.extra {
        text.push_str(&format!("{key}={value}\n"));
    }
    text
}

/// log4j2 for the worker: INFO, without the clients' configuration dumps.
pub const LOG4J2_PROPERTIES: &str = "rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
";

/// A running Kafka Connect standalone worker with one Debezium connector.
pub struct Debezium {
    child: Option<Child>,
    pub name: String,
    pub rest_port: u16,
    /// The worker's output (stdout and stderr).
    pub log: PathBuf,
    /// The file holding Connect's source offsets.
    pub offsets: PathBuf,
}

impl Debezium {
    /// Writes the properties into `dir` and starts the worker (`java`, the
    /// default one: Java 17) against `bootstrap` and `pg`; returns at once
    /// (see [`Debezium::wait_running`]).
    pub fn start(
        pg: &Postgres,
        bootstrap: &str,
        dir: &Path,
        config: &DebeziumConfig,
    ) -> anyhow::Result<Debezium> {
        let install = Install::ensure()?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let rest_port = free_port()?;
        let offsets = dir.join(format!("{}.offsets", config.name));
        let worker = dir.join(format!("{}.worker.properties", config.name));
        let connector = dir.join(format!("{}.connector.properties", config.name));
        let log4j = dir.join("connect-log4j2.properties");
        std::fs::write(
            &worker,
            worker_properties(
                &install,
                bootstrap,
                &offsets,
                rest_port,
                config.offset_flush_ms,
            ),
        )?;
        std::fs::write(&connector, connector_properties(pg, config))?;
        std::fs::write(&log4j, LOG4J2_PROPERTIES)?;
        let log = dir.join(format!("{}.connect.log", config.name));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new("java")
            .args(&config.jvm_options)
            .arg(format!("-Dlog4j2.configurationFile={}", log4j.display()))
            .arg("-cp")
            .arg(&install.classpath)
            .arg("org.apache.kafka.connect.cli.ConnectStandalone")
            .arg(&worker)
            .arg(&connector)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()
            .context("starting Kafka Connect (java)")?;
        Ok(Debezium {
            child: Some(child),
            name: config.name.clone(),
            rest_port,
            log,
            offsets,
        })
    }

    /// The worker's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The worker's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// An error naming the exit status and the log's tail when the worker exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(child) = &mut self.child
            && let Some(status) = child.try_wait()?
        {
            bail!(
                "Kafka Connect exited with {status}; log {}:\n{}",
                self.log.display(),
                tail(&self.logs(), 40)
            );
        }
        Ok(())
    }

    /// Waits until the connector's task runs (the REST API's status), so the
    /// slot exists and the snapshot or the stream has started; an error when
    /// the task failed, the worker exited or `timeout` passed.
    pub async fn wait_running(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let path = format!("/connectors/{}/status", self.name);
        loop {
            self.check_running()?;
            let port = self.rest_port;
            let path = path.clone();
            let (status, body) = tokio::task::spawn_blocking(move || {
                crate::http::request("127.0.0.1", port, "GET", &path, None)
            })
            .await?;
            if status == 200 {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let task = &v["tasks"][0];
                match task["state"].as_str() {
                    Some("RUNNING") => return Ok(()),
                    Some("FAILED") => bail!(
                        "the connector's task failed: {}\nlog {}:\n{}",
                        task["trace"].as_str().unwrap_or_default(),
                        self.log.display(),
                        tail(&self.logs(), 40)
                    ),
                    _ => {}
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the connector's task was not running within {timeout:?} (last status {status}: {body}); log {}:\n{}",
                    self.log.display(),
                    tail(&self.logs(), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// SIGTERM (Connect commits its offsets and stops the task), SIGKILL
    /// after 20 s; waits for the process.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_ok() {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        child.kill().ok();
        child.wait().ok();
    }
}

impl Drop for Debezium {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
