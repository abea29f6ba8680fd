//! `spec.source.postgres`: change data captured from a PostgreSQL database
//! into the pipeline's source topic.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::schema::FieldType;

/// Capture a PostgreSQL database's changes into the source `topic`, which
/// the operator then creates and owns (compacted, keyed by primary key). A
/// capture Deployment (one instance) streams a logical replication slot
/// (`pgoutput`) into it exactly once, after an initial snapshot of the table
/// that never pauses the stream. Each event carries the primary key's
/// columns, `op` (`c`, `u`, `d`, or `r` for a snapshot's row), `seq` (the
/// commit LSN: larger for every later change of the same row), `ts` (commit
/// time, epoch milliseconds), `before`, `after` and `source`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresSourceSpec {
    /// The database server's host name.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// The database server's port.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// The database to capture from.
    #[schemars(length(min = 1, max = 63))]
    pub database: String,
    /// A Secret in the pipeline's namespace with `username` and `password`:
    /// a role with the `REPLICATION` attribute that can read the table (and,
    /// for the operator to create the publication, owns the table and has
    /// `CREATE` on the database).
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: String,
    /// The table to capture, as `schema.table` (`public` when no schema is
    /// given). It needs a primary key. One table per pipeline: capture more
    /// tables with more pipelines.
    #[schemars(length(min = 1, max = 1))]
    #[schemars(inner(
        length(min = 1, max = 127),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")
    ))]
    pub tables: Vec<String>,
    /// The publication the slot streams; `keystone_<namespace>_<pipeline>`
    /// (dashes as underscores) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9_]+$"))]
    pub publication: Option<String>,
    /// The logical replication slot; the publication's name when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9_]+$"))]
    pub slot: Option<String>,
    /// Create the publication (for the table) and the slot when they do not
    /// exist. When false they must exist.
    #[serde(default = "default_true")]
    pub create: bool,
    /// Partitions of the capture topic.
    #[serde(default = "default_partitions")]
    #[schemars(range(min = 1, max = 10000))]
    pub partitions: i32,
    /// How long the capture topic keeps events besides each row's last one
    /// (the topic is compacted: the last event of every row stays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Duration>,
    /// The events' shape: `keystone` (the default) or `debezium`.
    #[serde(default)]
    pub envelope: Envelope,
    /// How `numeric` columns are rendered: `string` (exact, the default) or `number`.
    #[serde(default)]
    pub decimal_handling: DecimalHandling,
    /// When the table's existing rows are copied.
    #[serde(default)]
    pub snapshot: SnapshotSpec,
    /// Bytes of WAL the replication slot may hold back before the pipeline's
    /// `WalRetention` condition turns False: the database keeps every WAL
    /// segment the slot has not confirmed, and its disk pays for a capture
    /// that is stopped or slower than the writes. The slot is never dropped
    /// for it (that would lose changes). 1 GiB by default.
    #[serde(default = "default_max_retained_wal_bytes")]
    #[schemars(range(min = 1))]
    pub max_retained_wal_bytes: i64,
}

fn default_max_retained_wal_bytes() -> i64 {
    1 << 30
}

fn default_port() -> i32 {
    5432
}
fn default_true() -> bool {
    true
}
fn default_partitions() -> i32 {
    6
}

/// The events' shape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Envelope {
    /// The primary key's columns at the top level, then `op`, `seq`, `ts`,
    /// `before`, `after`, `source` and, when an update left TOAST values
    /// out, `unchanged` (their column names).
    #[default]
    Keystone,
    /// Debezium's change-event envelope (`before`, `after`, `source`, `op`,
    /// `ts_ms`) with a JSON key object, for consumers written for it.
    Debezium,
}

/// How `numeric` columns are rendered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DecimalHandling {
    /// As strings with every digit (`"12.50"`): exact.
    #[default]
    String,
    /// As JSON numbers (64-bit floats): digits beyond 15-17 significant ones are rounded.
    Number,
}

/// The snapshot policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSpec {
    /// `initial` (copy the rows when the capture first starts) or `never`.
    #[serde(default)]
    pub mode: SnapshotMode,
    /// Set or change this to any new value to copy the rows again, while the
    /// log keeps flowing, for example
    /// `kubectl patch ksp NAME --type merge -p '{"spec":{"source":{"postgres":{"snapshot":{"trigger":"'$(date +%s)'"}}}}}'`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub trigger: Option<String>,
    /// Stop copying (the log keeps flowing); set back to false to resume
    /// where the copy stood.
    #[serde(default)]
    pub paused: bool,
    /// Rows per chunk: the rows read between two watermarks, held in memory
    /// until the log reaches the second.
    #[serde(default = "default_chunk_size")]
    #[schemars(range(min = 1, max = 1000000))]
    // Kubernetes knows no "uint32" format (kubectl warns on apply).
    #[schemars(extend("format" = "int64"))]
    pub chunk_size: u32,
}

fn default_chunk_size() -> u32 {
    4096
}

impl Default for SnapshotSpec {
    fn default() -> Self {
        SnapshotSpec {
            mode: SnapshotMode::default(),
            trigger: None,
            paused: false,
            chunk_size: default_chunk_size(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SnapshotMode {
    /// Copy the table's rows when the capture first starts, then only the log.
    #[default]
    Initial,
    /// Only the log (a copy may still be asked for with `trigger`).
    Never,
}

/// What a capture instance runs (the plan's `capture`; JSON, camelCase).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaptureConfig {
    pub postgres: Connection,
    /// The tables captured, as `schema.table`.
    pub tables: Vec<String>,
    pub publication: String,
    /// Create the publication (for exactly `tables`) when it does not exist.
    #[serde(default)]
    pub create_publication: bool,
    pub slot: String,
    /// Create the slot when it does not exist.
    #[serde(default)]
    pub create_slot: bool,
    /// The Kafka topic the events go to. It must exist.
    pub topic: String,
    #[serde(default)]
    pub envelope: Envelope,
    #[serde(default)]
    pub decimal_handling: DecimalHandling,
    #[serde(default)]
    pub snapshot: SnapshotSpec,
    /// How often captured transactions are committed to Kafka (one Kafka
    /// transaction each, with the position reached).
    #[serde(default = "default_commit_interval")]
    pub commit_interval: Duration,
    /// The Kafka transactional id; by default `keystone-capture.<slot>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transactional_id: Option<String>,
}

fn default_commit_interval() -> Duration {
    Duration::from_millis(100)
}

/// Where the database is. The password (and, when `user` is unset, the user
/// name) come from the environment, never from the plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Connection {
    pub host: String,
    #[serde(default = "default_connection_port")]
    pub port: u16,
    pub database: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

fn default_connection_port() -> u16 {
    5432
}

impl CaptureConfig {
    /// The Kafka transactional id that fences earlier instances.
    pub fn transactional_id(&self) -> String {
        self.transactional_id
            .clone()
            .unwrap_or_else(|| format!("keystone-capture.{}", self.slot))
    }

    /// The consumer group whose committed offset carries the capture's position.
    pub fn progress_group(&self) -> String {
        format!("keystone-capture.{}", self.slot)
    }
}

/// A captured table as the capture read it from the database's catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceTable {
    /// `schema.table`.
    pub name: String,
    /// The columns, in the table's order.
    pub columns: Vec<SourceColumn>,
}

/// One column of a captured table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceColumn {
    pub name: String,
    /// The SQL type, as PostgreSQL prints it (`numeric(12,2)`).
    #[serde(rename = "type")]
    pub sql_type: String,
    /// The contract type of its values in events (`decimalHandling` decides
    /// `numeric`'s).
    pub field_type: FieldType,
    /// Whether the column may be NULL.
    pub nullable: bool,
    /// Whether it is part of the primary key.
    #[serde(default)]
    pub primary_key: bool,
}

impl SourceTable {
    pub fn column(&self, name: &str) -> Option<&SourceColumn> {
        self.columns.iter().find(|c| c.name == name)
    }

    pub fn primary_key(&self) -> Vec<String> {
        self.columns
            .iter()
            .filter(|c| c.primary_key)
            .map(|c| c.name.clone())
            .collect()
    }

    /// What changed from `old` to this table, one phrase per column
    /// (`column discount numeric(12,2) added`); empty when nothing did.
    pub fn changes_since(&self, old: &SourceTable) -> Vec<String> {
        let mut changes = Vec::new();
        for column in &self.columns {
            match old.column(&column.name) {
                None => changes.push(format!("column {} {} added", column.name, column.sql_type)),
                Some(was) if was.sql_type != column.sql_type => changes.push(format!(
                    "column {} changed from {} to {}",
                    column.name, was.sql_type, column.sql_type
                )),
                Some(was) if was.nullable != column.nullable => changes.push(format!(
                    "column {} {}",
                    column.name,
                    if column.nullable {
                        "may now be NULL"
                    } else {
                        "is now NOT NULL"
                    }
                )),
                Some(was) if was.primary_key != column.primary_key => changes.push(format!(
                    "column {} {} the primary key",
                    column.name,
                    if column.primary_key { "joined" } else { "left" }
                )),
                Some(_) => {}
            }
        }
        for column in &old.columns {
            if self.column(&column.name).is_none() {
                changes.push(format!("column {} dropped", column.name));
            }
        }
        changes
    }
}

/// `schema.table` for a `tables` entry (`public` when no schema is given).
pub fn qualified_table(table: &str) -> String {
    if table.contains('.') {
        table.to_owned()
    } else {
        format!("public.{table}")
    }
}

impl PostgresSourceSpec {
    /// Whether `table` (as a capture describes it) is one this spec captures.
    pub fn captures(&self, table: &SourceTable) -> bool {
        self.tables.iter().any(|n| qualified_table(n) == table.name)
    }

    /// The publication's name: given, or derived from the pipeline's.
    pub fn publication_name(&self, namespace: &str, pipeline: &str) -> String {
        self.publication
            .clone()
            .unwrap_or_else(|| format!("keystone_{namespace}_{pipeline}").replace(['-', '.'], "_"))
    }

    /// The slot's name: given, or the publication's.
    pub fn slot_name(&self, namespace: &str, pipeline: &str) -> String {
        self.slot
            .clone()
            .unwrap_or_else(|| self.publication_name(namespace, pipeline))
    }

    /// The capture's configuration for `topic`; the user name comes from the Secret.
    pub fn capture_config(
        &self,
        namespace: &str,
        pipeline: &str,
        topic: &str,
        commit_interval: Duration,
    ) -> CaptureConfig {
        CaptureConfig {
            postgres: Connection {
                host: self.host.clone(),
                port: u16::try_from(self.port).unwrap_or(5432),
                database: self.database.clone(),
                user: None,
            },
            tables: self.tables.clone(),
            publication: self.publication_name(namespace, pipeline),
            create_publication: self.create,
            slot: self.slot_name(namespace, pipeline),
            create_slot: self.create,
            topic: topic.to_owned(),
            envelope: self.envelope,
            decimal_handling: self.decimal_handling,
            snapshot: self.snapshot.clone(),
            commit_interval,
            transactional_id: Some(format!("keystone-capture.{namespace}.{pipeline}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_default_from_the_pipeline() {
        let spec: PostgresSourceSpec = serde_json::from_value(serde_json::json!({
            "host": "db", "database": "shop", "credentialsSecret": "shop-db", "tables": ["orders"],
        }))
        .unwrap();
        assert_eq!(
            spec.publication_name("team-a", "orders-cdc"),
            "keystone_team_a_orders_cdc"
        );
        assert_eq!(
            spec.slot_name("team-a", "orders-cdc"),
            "keystone_team_a_orders_cdc"
        );
        let config =
            spec.capture_config("team-a", "orders-cdc", "orders.cdc", Duration::from_secs(1));
        assert!(config.create_slot && config.create_publication);
        assert_eq!(config.snapshot.chunk_size, 4096);
        assert_eq!(config.postgres.port, 5432);
        let text = serde_json::to_string(&config).unwrap();
        assert_eq!(
            serde_json::from_str::<CaptureConfig>(&text).unwrap(),
            config
        );
    }
}
