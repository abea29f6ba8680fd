//! The capture loop: the replication stream in, Kafka transactions out.
//!
//! Exactly once: a database transaction's events go into one Kafka
//! transaction (several database transactions may share one), and that Kafka
//! transaction also commits, as the metadata of an offset of the capture's
//! progress group, the commit LSN it reached and where the snapshot stands.
//! The slot's confirmed position advances only after that commit. After a
//! crash the new instance fences the old producer (same transactional id),
//! reads the progress, and skips the transactions the slot sends again that
//! are already in Kafka: a read_committed consumer sees each change once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pg_walstream::{LogicalReplicationMessage, LogicalReplicationParser};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;

use crate::capture::changes::{Change, Relation, TableName, TransactionChanges};
use crate::capture::config::{CaptureConfig, SnapshotMode};
use crate::capture::events::{Commit, ENVELOPE_FIELDS, Envelope, lsn_text, render};
use crate::capture::http::{CaptureMetrics, DropSlot};
use crate::capture::snapshot::{Chunk, Reached, RecentTransactions, SnapshotProgress, Watermark};
use crate::capture::source::{self, SESSION_OPTIONS, TableInfo};
use crate::kafka::{KAFKA_TIMEOUT, KafkaSettings, config as kafka_config};

/// The capture's position, committed with its events.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Commit LSN of the last database transaction in Kafka.
    pub lsn: u64,
    /// The end of its commit record: what the slot may confirm.
    pub ack: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotProgress>,
}

const PROGRESS_PREFIX: &str = "keystone.capture=";
/// Brokers' default `offset.metadata.max.bytes`.
const MAX_PROGRESS_BYTES: usize = 4096;
/// Events per Kafka transaction before it is committed early.
const MAX_EVENTS_PER_COMMIT: usize = 100_000;

/// How many of the transactions last sent to Kafka a chunk's select is
/// checked against. A transaction is invisible only between writing its
/// commit record and leaving the server's list of running ones: far fewer
/// commits than this pass meanwhile.
const RECENT_TRANSACTIONS: usize = 16_384;

/// How long a chunk whose select missed a captured transaction waits before
/// it is read again.
const CHUNK_RETRY_WAIT: Duration = Duration::from_millis(20);

impl Progress {
    fn encode(&self) -> Result<String, String> {
        let text = format!(
            "{PROGRESS_PREFIX}{}",
            serde_json::to_string(self).map_err(|e| e.to_string())?
        );
        if text.len() > MAX_PROGRESS_BYTES {
            return Err(format!(
                "the capture's position takes {} bytes, more than the {MAX_PROGRESS_BYTES} a Kafka offset's metadata holds \
                 (a snapshot's primary key this long cannot be recorded)",
                text.len()
            ));
        }
        Ok(text)
    }

    fn decode(text: &str) -> Result<Option<Progress>, String> {
        match text.strip_prefix(PROGRESS_PREFIX) {
            Some(json) => serde_json::from_str(json)
                .map(Some)
                .map_err(|e| format!("the committed capture position {json:?} does not read: {e}")),
            None if text.is_empty() => Ok(None),
            None => Err(format!(
                "the progress group's offset carries {text:?}, not a capture position: another client commits to it"
            )),
        }
    }
}

/// Microseconds since 2000-01-01 (PostgreSQL's epoch) to Unix milliseconds.
fn unix_ms(pg_micros: i64) -> i64 {
    pg_micros.div_euclid(1000) + 946_684_800_000
}

/// A database transaction being received.
struct OpenTransaction {
    lsn: u64,
    xid: u32,
    time_ms: i64,
    changes: TransactionChanges,
    truncated: Vec<Arc<TableName>>,
    watermarks: Vec<Watermark>,
}

struct Capture {
    config: CaptureConfig,
    tables: Vec<TableInfo>,
    /// Catalog tables by name, and the log's relations (by relation id) of captured tables.
    by_name: HashMap<TableName, usize>,
    relations: HashMap<u32, Arc<Relation>>,
    parser: LogicalReplicationParser,
    sql: tokio_postgres::Client,
    producer: ThreadedProducer<DefaultProducerContext>,
    progress_group: rdkafka::consumer::ConsumerGroupMetadata,
    /// What Kafka holds, and what the open Kafka transaction will make it.
    committed: Progress,
    pending: Progress,
    in_transaction: bool,
    transaction_began: Instant,
    events_in_transaction: usize,
    current: Option<OpenTransaction>,
    chunk: Option<Chunk>,
    /// Transactions lately sent to Kafka, to tell whether a chunk's select
    /// missed one of them.
    recent: RecentTransactions,
    acked: u64,
    metrics: Arc<CaptureMetrics>,
    /// Commit time of the last transaction in the open Kafka transaction.
    pending_time_ms: i64,
    skipped_transactions: u64,
    /// A captured table whose columns the log says changed: described again
    /// from the catalog before the next event.
    changed_table: Option<usize>,
}

/// Runs a capture until `shutdown` resolves or an error stops it.
pub async fn run(
    config: CaptureConfig,
    kafka: KafkaSettings,
    user: String,
    password: String,
    metrics: Arc<CaptureMetrics>,
    drops: &mut mpsc::Receiver<DropSlot>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Stopped, String> {
    let names = crate::capture::config::table_names(&config)?;
    let sql = source::connect(&config.postgres, &user, &password).await?;
    let mut tables = Vec::new();
    for name in &names {
        let table = source::describe(&sql, name).await?;
        if config.envelope == Envelope::Keystone
            && let Some(clash) = table
                .primary_key
                .iter()
                .find(|k| ENVELOPE_FIELDS.contains(&k.as_str()))
        {
            return Err(format!(
                "{name}: primary key column {clash:?} has the name of a field of Keystone's event envelope ({}); \
                 use envelope: debezium for this table",
                ENVELOPE_FIELDS.join(", ")
            ));
        }
        metrics.set_table(table.report(config.decimal_handling));
        tables.push(table);
    }
    source::ensure_publication(
        &sql,
        &config.publication,
        &tables,
        config.create_publication,
    )
    .await?;
    source::ensure_slot(&sql, &config.slot, config.create_slot).await?;

    let (producer, progress_group, committed) =
        tokio::task::block_in_place(|| open_kafka(&config, &kafka))?;
    let mut pending = committed.clone();
    start_snapshot_if_due(&config, &mut pending);
    tracing::info!(
        slot = %config.slot,
        topic = %config.topic,
        position = %lsn_text(committed.lsn),
        snapshot = ?pending.snapshot,
        "capture starting"
    );

    let replication = ReplicationConfig::new(
        config.postgres.host.clone(),
        user,
        password,
        config.postgres.database.clone(),
        config.slot.clone(),
        config.publication.clone(),
    )
    .with_port(config.postgres.port)
    .with_tls(TlsConfig::disabled())
    .with_options(SESSION_OPTIONS)
    .with_application_name(format!("keystone-capture-{}", config.slot))
    .with_status_interval(Duration::from_secs(1))
    .with_ack_lsn(Lsn::from_u64(committed.ack));
    let mut replication = start_replication(replication).await?;
    metrics.set_problem(None);
    metrics.set_ready(true);

    let by_name = tables
        .iter()
        .enumerate()
        .map(|(i, t)| ((*t.name).clone(), i))
        .collect();
    let mut capture = Capture {
        tables,
        by_name,
        relations: HashMap::new(),
        parser: LogicalReplicationParser::with_protocol_version(1),
        sql,
        producer,
        progress_group,
        acked: committed.ack,
        committed,
        pending,
        in_transaction: false,
        transaction_began: Instant::now(),
        events_in_transaction: 0,
        current: None,
        chunk: None,
        recent: RecentTransactions::new(RECENT_TRANSACTIONS),
        metrics,
        pending_time_ms: 0,
        skipped_transactions: 0,
        changed_table: None,
        config,
    };
    let result = capture.run(&mut replication, drops, shutdown).await;
    replication.stop();
    result
}

/// Why a capture stopped without an error.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Asked to (SIGTERM): the next instance goes on from its position.
    Shutdown,
    /// Its slot was dropped (the pipeline is being deleted): nothing may
    /// stream again, or a new slot would be made.
    SlotDropped,
}

/// How long a new instance waits for the slot a killed one held: the server
/// notices the dead connection within seconds, or after `wal_sender_timeout`
/// (60 s by default) when the network dropped it silently.
const SLOT_RELEASE_WAIT: Duration = Duration::from_secs(90);

/// Connects and starts streaming; waits while an earlier instance's session
/// still holds the slot.
async fn start_replication(config: ReplicationConfig) -> Result<ReplicationClient, String> {
    let slot = config.slot.clone();
    let deadline = Instant::now() + SLOT_RELEASE_WAIT;
    loop {
        let started = async {
            let mut client = ReplicationClient::connect(config.clone()).await?;
            client.wait_started().await?;
            Ok::<_, pgwire_replication::PgWireError>(client)
        }
        .await;
        match started {
            Ok(client) => return Ok(client),
            Err(e) if e.to_string().contains("is active for PID") && Instant::now() < deadline => {
                tracing::info!(
                    slot,
                    "the slot is still held by an earlier session; waiting"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(format!("starting replication from slot {slot}: {e}")),
        }
    }
}

/// The transactional producer (fenced in), the progress group's metadata and
/// the committed progress.
fn open_kafka(
    config: &CaptureConfig,
    kafka: &KafkaSettings,
) -> Result<
    (
        ThreadedProducer<DefaultProducerContext>,
        rdkafka::consumer::ConsumerGroupMetadata,
        Progress,
    ),
    String,
> {
    let kafka_error = |what: &str| {
        let what = what.to_owned();
        move |e: KafkaError| format!("{what}: {e}")
    };
    let producer: ThreadedProducer<DefaultProducerContext> = kafka_config::producer(
        kafka,
        Some(kafka_config::Transactions {
            id: &config.transactional_id(),
            commit_interval: config.commit_interval.as_std(),
        }),
    )
    .create()
    .map_err(kafka_error("creating the producer"))?;
    let mut reader: ClientConfig = kafka_config::restore_reader(kafka, "unused");
    reader.set("group.id", config.progress_group());
    let consumer: BaseConsumer = reader
        .create()
        .map_err(kafka_error("creating the progress reader"))?;
    let metadata = consumer
        .fetch_metadata(Some(&config.topic), KAFKA_TIMEOUT)
        .map_err(kafka_error("reading the topic's metadata"))?;
    if metadata
        .topics()
        .first()
        .is_none_or(|t| t.error().is_some() || t.partitions().is_empty())
    {
        return Err(format!("topic {:?} does not exist", config.topic));
    }
    // Fences any earlier instance and aborts its open transaction, so that
    // the progress read next is final.
    producer
        .init_transactions(KAFKA_TIMEOUT)
        .map_err(kafka_error(
            "initializing transactions (fencing earlier instances)",
        ))?;
    let mut partitions = TopicPartitionList::new();
    partitions.add_partition(&config.topic, 0);
    let committed = consumer
        .committed_offsets(partitions, KAFKA_TIMEOUT)
        .map_err(kafka_error("reading the capture's committed position"))?;
    let progress = match committed.elements().first() {
        Some(element) if matches!(element.offset(), Offset::Offset(_)) => {
            let text = crate::kafka::commit_metadata_text(element).unwrap_or_default();
            Progress::decode(&text)?.unwrap_or_default()
        }
        _ => Progress::default(),
    };
    let group = consumer
        .group_metadata()
        .ok_or("the progress reader has no group metadata")?;
    Ok((producer, group, progress))
}

/// Starts a snapshot when the policy or a new trigger asks for one.
fn start_snapshot_if_due(config: &CaptureConfig, progress: &mut Progress) {
    let trigger = config.snapshot.trigger.clone();
    let due = match &progress.snapshot {
        // A new trigger value asks for a new snapshot.
        Some(snapshot) => trigger.is_some() && snapshot.trigger != trigger,
        // The first start (nothing in Kafka yet) under `initial`, or any trigger.
        None => {
            trigger.is_some()
                || (config.snapshot.mode == SnapshotMode::Initial && progress.lsn == 0)
        }
    };
    if due {
        progress.snapshot = Some(SnapshotProgress {
            trigger,
            ..SnapshotProgress::default()
        });
    }
}

impl Capture {
    async fn run(
        &mut self,
        replication: &mut ReplicationClient,
        drops: &mut mpsc::Receiver<DropSlot>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<Stopped, String> {
        let interval = self.config.commit_interval.as_std();
        let mut report = tokio::time::interval(Duration::from_secs(10));
        tokio::pin!(shutdown);
        loop {
            self.metrics.beat();
            self.metrics.snapshot_done.set(i64::from(
                self.pending.snapshot.as_ref().is_none_or(|s| s.done),
            ));
            if let Some(snapshot) = &self.committed.snapshot {
                let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
                self.metrics
                    .snapshot_committed_rows
                    .set(count(snapshot.rows));
                self.metrics
                    .snapshot_committed_chunks
                    .set(count(snapshot.chunks));
            }
            if self.wants_chunk() {
                self.start_chunk().await?;
            }
            let deadline = tokio::time::Instant::from_std(self.transaction_began + interval);
            let must_commit = self.in_transaction || self.pending != self.committed;
            tokio::select! {
                biased;
                () = &mut shutdown => {
                    // Only whole database transactions are in the open Kafka
                    // transaction: committing it is safe.
                    self.commit(replication)?;
                    tracing::info!(position = %lsn_text(self.committed.lsn), "capture stopped");
                    return Ok(Stopped::Shutdown);
                }
                Some(reply) = drops.recv() => {
                    let result = self.drop_slot(replication).await;
                    let dropped = result.is_ok();
                    let _ = reply.send(result);
                    if dropped {
                        return Ok(Stopped::SlotDropped);
                    }
                }
                event = replication.recv() => match event {
                    Ok(Some(event)) => {
                        self.on_event(event, replication)?;
                        if let Some(index) = self.changed_table.take() {
                            self.describe_again(index).await;
                        }
                    }
                    Ok(None) => return Err("the replication stream ended".into()),
                    Err(e) => return Err(format!("replication from slot {}: {e}", self.config.slot)),
                },
                () = tokio::time::sleep_until(deadline), if must_commit => {}
                _ = report.tick() => {
                    let retained = source::retained_wal_bytes(&self.sql, &self.config.slot).await?;
                    self.metrics.retained_wal_bytes.set(retained.unwrap_or(0));
                    tracing::info!(
                        transactions = self.metrics.transactions.get(),
                        events = self.metrics.events.get(),
                        snapshot_rows = self.metrics.snapshot_rows.get(),
                        skipped_transactions = self.skipped_transactions,
                        retained_wal_bytes = ?retained,
                        position = %lsn_text(self.committed.lsn),
                        "capture progress"
                    );
                }
            }
            let due = self.transaction_began.elapsed() >= interval
                || self.events_in_transaction >= MAX_EVENTS_PER_COMMIT;
            if self.current.is_none()
                && (self.in_transaction || self.pending != self.committed)
                && due
            {
                self.commit(replication)?;
            }
        }
    }

    /// Reads a table's columns again after the log announced new ones (an
    /// `ALTER TABLE`): snapshot chunks select them, and `/table` shows them.
    /// A table the catalog no longer describes keeps its last description:
    /// the log goes on either way.
    async fn describe_again(&mut self, index: usize) {
        let name = self.tables[index].name.clone();
        match source::describe(&self.sql, &name).await {
            Ok(table) => {
                tracing::info!(table = %name, columns = table.columns.len(), "the table's columns changed");
                self.metrics
                    .set_table(table.report(self.config.decimal_handling));
                self.tables[index] = table;
            }
            Err(error) => {
                tracing::warn!(table = %name, %error, "could not describe the table again after its columns changed");
            }
        }
    }

    /// Commits what is open, stops streaming and drops the slot once the
    /// server has let go of it.
    async fn drop_slot(&mut self, replication: &mut ReplicationClient) -> Result<(), String> {
        if self.current.is_none() {
            self.commit(replication)?;
        }
        replication.stop();
        self.metrics.set_ready(false);
        let slot = self.config.slot.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let active: Option<bool> = self
                .sql
                .query_opt(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .map_err(|e| format!("reading slot {slot}: {}", source::error_text(&e)))?
                .map(|row| row.get(0));
            match active {
                None => return Ok(()),
                Some(false) => {
                    self.sql
                        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                        .await
                        .map_err(|e| format!("dropping slot {slot}: {}", source::error_text(&e)))?;
                    tracing::info!(%slot, "dropped the replication slot: the pipeline is being deleted");
                    return Ok(());
                }
                Some(true) if Instant::now() > deadline => {
                    return Err(format!(
                        "slot {slot} is still held by a replication session after 30 s"
                    ));
                }
                Some(true) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Whether a snapshot chunk should be read now: a snapshot is running,
    /// not paused, no chunk waits for its watermarks, and no database
    /// transaction is half received.
    fn wants_chunk(&self) -> bool {
        self.chunk.is_none()
            && self.current.is_none()
            && !self.config.snapshot.paused
            && self.pending.snapshot.as_ref().is_some_and(|s| !s.done)
    }

    async fn start_chunk(&mut self) -> Result<(), String> {
        let Some(snapshot) = &self.pending.snapshot else {
            return Ok(());
        };
        let table = &self.tables[snapshot.table];
        let relation = table.relation()?;
        let id = uuid::Uuid::new_v4().to_string();
        source::emit_watermark(&self.sql, &Watermark::Low(id.clone())).await?;
        let query = source::ChunkQuery {
            table,
            relation: &relation,
            after: snapshot.after.as_deref(),
            limit: self.config.snapshot.chunk_size,
            decimals: self.config.decimal_handling,
        };
        let selected = source::select_chunk(&self.sql, &query).await?;
        if let Some(xid) = self.recent.any_unseen_by(&selected.visibility) {
            // Its events are in Kafka already, and the chunk's rows would
            // follow them with older values. It is visible by now, or in a
            // moment: the chunk is read again (its watermarks, left in the
            // log without a chunk, are passed over).
            tracing::debug!(
                xid,
                "a transaction already captured was not yet visible to a snapshot chunk's select: reading the chunk again"
            );
            self.metrics.snapshot_chunk_retries.inc();
            tokio::time::sleep(CHUNK_RETRY_WAIT).await;
            return Ok(());
        }
        let ends_table = selected.rows.len() < self.config.snapshot.chunk_size as usize;
        source::emit_watermark(&self.sql, &Watermark::High(id.clone())).await?;
        self.chunk = Some(Chunk::new(
            id,
            table.name.clone(),
            selected.visibility,
            selected.rows,
            selected.last_key,
            ends_table,
        ));
        Ok(())
    }

    fn on_event(
        &mut self,
        event: ReplicationEvent,
        replication: &ReplicationClient,
    ) -> Result<(), String> {
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                self.current = Some(OpenTransaction {
                    lsn: final_lsn.as_u64(),
                    xid,
                    time_ms: unix_ms(commit_time_micros),
                    changes: TransactionChanges::default(),
                    truncated: Vec::new(),
                    watermarks: Vec::new(),
                });
            }
            ReplicationEvent::XLogData { data, .. } => self.on_data(&data)?,
            ReplicationEvent::Message {
                transactional: true,
                prefix,
                content,
                ..
            } => {
                if let (Some(current), Some(watermark)) =
                    (&mut self.current, Watermark::parse(&prefix, &content))
                {
                    current.watermarks.push(watermark);
                }
            }
            ReplicationEvent::Commit { lsn, end_lsn, .. } => {
                self.on_commit(lsn.as_u64(), end_lsn.as_u64())?
            }
            // Idle, with everything received in Kafka: let the slot move on,
            // or the database keeps WAL for tables nobody changes.
            ReplicationEvent::KeepAlive { wal_end, .. }
                if self.current.is_none()
                    && !self.in_transaction
                    && self.pending == self.committed
                    && wal_end.as_u64() > self.acked =>
            {
                self.acked = wal_end.as_u64();
                replication.update_applied_lsn(wal_end);
            }
            _ => {}
        }
        Ok(())
    }

    fn on_data(&mut self, data: &[u8]) -> Result<(), String> {
        let message = self
            .parser
            .parse_wal_message(data)
            .map_err(|e| format!("decoding pgoutput: {e}"))?
            .message;
        let decimals = self.config.decimal_handling;
        match message {
            LogicalReplicationMessage::Relation {
                relation_id,
                namespace,
                relation_name,
                columns,
                ..
            } => {
                let name = TableName {
                    schema: namespace.to_string(),
                    name: relation_name.to_string(),
                };
                if let Some(&index) = self.by_name.get(&name) {
                    let table = &self.tables[index];
                    let columns: Vec<_> = columns
                        .iter()
                        .map(|c| crate::capture::changes::Column {
                            name: c.name.clone(),
                            type_oid: c.type_id,
                        })
                        .collect();
                    if columns != table.columns {
                        self.changed_table = Some(index);
                    }
                    let relation = Relation::new(table.name.clone(), columns, &table.primary_key)?;
                    self.relations.insert(relation_id, Arc::new(relation));
                }
            }
            LogicalReplicationMessage::Insert { relation_id, tuple } => {
                if let Some(relation) = self.relations.get(&relation_id).cloned() {
                    let after = relation.decode(&tuple, decimals)?;
                    self.push(Change::insert(&relation, after)?)?;
                }
            }
            LogicalReplicationMessage::Update {
                relation_id,
                old_tuple,
                new_tuple,
                key_type,
            } => {
                if let Some(relation) = self.relations.get(&relation_id).cloned() {
                    let old = old_tuple
                        .map(|t| relation.decode(&t, decimals))
                        .transpose()?;
                    let after = relation.decode(&new_tuple, decimals)?;
                    let full = key_type == Some('O');
                    for change in Change::update(&relation, old, full, after)? {
                        self.push(change)?;
                    }
                }
            }
            LogicalReplicationMessage::Delete {
                relation_id,
                old_tuple,
                key_type,
            } => {
                if let Some(relation) = self.relations.get(&relation_id).cloned() {
                    let old = relation.decode(&old_tuple, decimals)?;
                    self.push(Change::delete(&relation, old, key_type == 'O')?)?;
                }
            }
            LogicalReplicationMessage::Truncate { relation_ids, .. } => {
                let tables: Vec<_> = relation_ids
                    .iter()
                    .filter_map(|id| self.relations.get(id).map(|r| r.table.clone()))
                    .collect();
                let current = self.current_transaction()?;
                current.truncated.extend(tables);
            }
            _ => {}
        }
        Ok(())
    }

    fn current_transaction(&mut self) -> Result<&mut OpenTransaction, String> {
        self.current
            .as_mut()
            .ok_or_else(|| "a change outside a transaction in the replication stream".to_owned())
    }

    fn push(&mut self, change: Change) -> Result<(), String> {
        self.current_transaction()?.changes.push(change);
        Ok(())
    }

    fn on_commit(&mut self, lsn: u64, end_lsn: u64) -> Result<(), String> {
        let current = self
            .current
            .take()
            .ok_or("a commit without a begin in the replication stream")?;
        if current.lsn != lsn {
            return Err(format!(
                "the replication stream committed {} after beginning {}",
                lsn_text(lsn),
                lsn_text(current.lsn)
            ));
        }
        if lsn <= self.committed.lsn {
            // Sent again after a restart: already in Kafka.
            self.skipped_transactions += 1;
            return Ok(());
        }
        let database = self.config.postgres.database.clone();
        let commit = Commit {
            database: &database,
            lsn,
            xid: Some(current.xid),
            time_ms: current.time_ms,
        };
        for table in &current.truncated {
            let event = json!({
                "op": "t", "seq": lsn, "ts": current.time_ms,
                "source": {"db": &database, "schema": table.schema, "table": table.name, "lsn": lsn_text(lsn), "snapshot": false, "txid": current.xid},
            });
            tracing::warn!(table = %table, "a TRUNCATE is in the log: its rows' deletes are not; a truncate event without a key is emitted");
            self.send(None, serde_json::to_vec(&event).unwrap_or_default())?;
        }
        for change in current.changes.into_changes() {
            if let Some(chunk) = &mut self.chunk {
                chunk.overtaken_by(current.xid, &change.table, &change.key);
            }
            let (key, value) = render(&change, &commit, self.config.envelope);
            self.send(Some(key), value)?;
            self.metrics.events.inc();
        }
        for watermark in &current.watermarks {
            let reached = match &mut self.chunk {
                Some(chunk) => chunk.reach(watermark),
                None => Reached::Nothing,
            };
            if reached == Reached::High {
                let chunk = self.chunk.take().ok_or("no chunk at its high watermark")?;
                self.emit_chunk(chunk, &commit)?;
            }
        }
        self.recent.push(current.xid);
        self.metrics.transactions.inc();
        self.pending_time_ms = current.time_ms;
        self.pending.lsn = lsn;
        self.pending.ack = end_lsn;
        Ok(())
    }

    /// The chunk's rows the log did not overtake, at its high watermark, and
    /// the snapshot's progress past them.
    fn emit_chunk(&mut self, chunk: Chunk, commit: &Commit<'_>) -> Result<(), String> {
        let ends_table = chunk.ends_table;
        let last_key = chunk.last_key.clone();
        let mut rows = 0;
        for change in chunk.into_rows() {
            let (key, value) = render(&change, commit, self.config.envelope);
            self.send(Some(key), value)?;
            rows += 1;
        }
        self.metrics.snapshot_rows.inc_by(rows);
        self.metrics.snapshot_chunks.inc();
        let tables = self.tables.len();
        let snapshot = self
            .pending
            .snapshot
            .as_mut()
            .ok_or("a chunk without a snapshot")?;
        snapshot.rows += rows;
        snapshot.chunks += 1;
        if ends_table {
            snapshot.table += 1;
            snapshot.after = None;
            if snapshot.table == tables {
                snapshot.done = true;
                tracing::info!(
                    rows = snapshot.rows,
                    chunks = snapshot.chunks,
                    "snapshot done"
                );
            }
        } else {
            snapshot.after = last_key;
        }
        Ok(())
    }

    fn begin(&mut self) -> Result<(), String> {
        if !self.in_transaction {
            tokio::task::block_in_place(|| self.producer.begin_transaction())
                .map_err(|e| format!("beginning a Kafka transaction: {e}"))?;
            self.in_transaction = true;
            self.transaction_began = Instant::now();
            self.events_in_transaction = 0;
        }
        Ok(())
    }

    fn send(&mut self, key: Option<Vec<u8>>, value: Vec<u8>) -> Result<(), String> {
        self.begin()?;
        let mut record = BaseRecord::<Vec<u8>, Vec<u8>>::to(&self.config.topic).payload(&value);
        if let Some(key) = &key {
            record = record.key(key);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(1)));
                }
                Err((e, _)) => return Err(format!("producing to {}: {e}", self.config.topic)),
            }
        }
        self.events_in_transaction += 1;
        Ok(())
    }

    /// Commits the open Kafka transaction with the progress it reaches, then
    /// lets the slot confirm it.
    fn commit(&mut self, replication: &ReplicationClient) -> Result<(), String> {
        if !self.in_transaction && self.pending == self.committed {
            return Ok(());
        }
        self.begin()?;
        let metadata = self.pending.encode()?;
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset(&self.config.topic, 0, Offset::Offset(0))
            .map_err(|e| format!("recording the capture's position: {e}"))?;
        if let Some(mut element) = offsets.find_partition(&self.config.topic, 0) {
            element.set_metadata(metadata);
        }
        tokio::task::block_in_place(|| {
            self.producer
                .send_offsets_to_transaction(&offsets, &self.progress_group, KAFKA_TIMEOUT)
                .and_then(|()| self.producer.commit_transaction(KAFKA_TIMEOUT))
        })
        .map_err(|e| format!("committing a Kafka transaction: {e}"))?;
        self.in_transaction = false;
        self.committed = self.pending.clone();
        self.metrics.kafka_commits.inc();
        self.metrics.last_commit_time_ms.set(self.pending_time_ms);
        if self.committed.ack > self.acked {
            self.acked = self.committed.ack;
            replication.update_applied_lsn(Lsn::from_u64(self.committed.ack));
        }
        self.transaction_began = Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_round_trips_and_refuses_foreign_metadata() {
        let progress = Progress {
            lsn: 42,
            ack: 50,
            snapshot: Some(SnapshotProgress {
                table: 1,
                after: Some(vec!["o'1".into()]),
                rows: 10,
                chunks: 2,
                ..SnapshotProgress::default()
            }),
        };
        let text = progress.encode().unwrap();
        assert_eq!(Progress::decode(&text).unwrap(), Some(progress));
        assert_eq!(Progress::decode("").unwrap(), None);
        assert!(Progress::decode("someone else").is_err());
        let long = Progress {
            snapshot: Some(SnapshotProgress {
                after: Some(vec!["x".repeat(5000)]),
                ..SnapshotProgress::default()
            }),
            ..Progress::default()
        };
        assert!(long.encode().unwrap_err().contains("4096"));
    }

    #[test]
    fn postgres_time_converts_to_unix_milliseconds() {
        assert_eq!(unix_ms(0), 946_684_800_000);
        assert_eq!(unix_ms(1_500), 946_684_800_001);
    }

    fn config(mode: &str, trigger: Option<&str>) -> CaptureConfig {
        let mut config: CaptureConfig = serde_json::from_value(json!({
            "postgres": {"host": "h", "database": "d", "user": "u"},
            "tables": ["t"], "publication": "p", "slot": "s", "topic": "x",
            "snapshot": {"mode": mode},
        }))
        .unwrap();
        config.snapshot.trigger = trigger.map(str::to_owned);
        config
    }

    #[test]
    fn snapshots_start_first_time_under_initial_and_on_each_new_trigger() {
        let mut fresh = Progress::default();
        start_snapshot_if_due(&config("initial", None), &mut fresh);
        assert!(fresh.snapshot.is_some());

        let mut running = Progress {
            lsn: 9,
            ..Progress::default()
        };
        start_snapshot_if_due(&config("initial", None), &mut running);
        assert!(
            running.snapshot.is_none(),
            "a restart does not snapshot again"
        );
        start_snapshot_if_due(&config("never", None), &mut Progress::default());

        let mut never = Progress::default();
        start_snapshot_if_due(&config("never", None), &mut never);
        assert!(never.snapshot.is_none());

        start_snapshot_if_due(&config("never", Some("1")), &mut never);
        assert_eq!(
            never.snapshot.as_ref().unwrap().trigger.as_deref(),
            Some("1")
        );
        never.snapshot.as_mut().unwrap().done = true;
        start_snapshot_if_due(&config("never", Some("1")), &mut never);
        assert!(
            never.snapshot.as_ref().unwrap().done,
            "the same trigger is done"
        );
        start_snapshot_if_due(&config("never", Some("2")), &mut never);
        assert!(
            !never.snapshot.as_ref().unwrap().done,
            "a new trigger starts again"
        );
    }
}
