//! What a capture instance runs: the database, the tables, the replication
//! slot and publication, the topic and the snapshot policy (JSON, camelCase;
//! the operator writes it from `spec.source.postgres`).

use std::path::Path;

use keystone_crds::duration::Duration;
use serde::{Deserialize, Serialize};

use crate::capture::changes::TableName;
use crate::capture::events::Envelope;
use crate::capture::values::DecimalHandling;

/// The variable holding the database password (from a Secret).
pub const ENV_PASSWORD: &str = "KEYSTONE_POSTGRES_PASSWORD";
/// A file holding it instead (a mounted Secret key).
pub const ENV_PASSWORD_FILE: &str = "KEYSTONE_POSTGRES_PASSWORD_FILE";

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaptureConfig {
    pub postgres: Connection,
    /// The tables captured, as `schema.table` (`public` when no schema is given).
    pub tables: Vec<String>,
    /// The publication the slot streams.
    pub publication: String,
    /// Create the publication (for exactly `tables`) when it does not exist.
    #[serde(default)]
    pub create_publication: bool,
    /// The logical replication slot (`pgoutput`).
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
    pub snapshot: SnapshotConfig,
    /// How often captured transactions are committed to Kafka (one Kafka
    /// transaction each, with the position reached).
    #[serde(default = "default_commit_interval")]
    pub commit_interval: Duration,
    /// The Kafka transactional id; by default `keystone-capture.<slot>`.
    #[serde(default)]
    pub transactional_id: Option<String>,
}

fn default_commit_interval() -> Duration {
    Duration::from_millis(100)
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Connection {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    pub database: String,
    pub user: String,
}

fn default_port() -> u16 {
    5432
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotConfig {
    #[serde(default)]
    pub mode: SnapshotMode,
    /// A new value starts a new snapshot of every table (as
    /// `checkpointTrigger` takes a checkpoint).
    #[serde(default)]
    pub trigger: Option<String>,
    /// Stop reading chunks (the log keeps flowing); false resumes.
    #[serde(default)]
    pub paused: bool,
    /// Rows per chunk.
    #[serde(default = "default_chunk_size")]
    pub chunk_size: u32,
}

fn default_chunk_size() -> u32 {
    4096
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            mode: SnapshotMode::default(),
            trigger: None,
            paused: false,
            chunk_size: default_chunk_size(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum SnapshotMode {
    /// Copy the tables' rows when the capture first starts, then only the log.
    #[default]
    Initial,
    /// Only the log (a snapshot may still be asked for with a trigger).
    Never,
}

impl CaptureConfig {
    pub fn read(path: &Path) -> Result<CaptureConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let config: CaptureConfig =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        config
            .validate()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.tables.is_empty() {
            return Err("tables: name at least one table".into());
        }
        self.table_names()?;
        if self.snapshot.chunk_size == 0 {
            return Err("snapshot.chunkSize must be at least 1".into());
        }
        for (field, name) in [("slot", &self.slot), ("publication", &self.publication)] {
            // PostgreSQL's rule for slot names, applied to both: lower case,
            // digits and underscores, at most 63 bytes.
            if name.is_empty()
                || name.len() > 63
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(format!(
                    "{field}: {name:?} must be 1-63 lower-case letters, digits or underscores"
                ));
            }
        }
        Ok(())
    }

    pub fn table_names(&self) -> Result<Vec<TableName>, String> {
        self.tables
            .iter()
            .map(|t| TableName::parse(t).map_err(|e| format!("tables: {e}")))
            .collect()
    }

    pub fn transactional_id(&self) -> String {
        self.transactional_id
            .clone()
            .unwrap_or_else(|| format!("keystone-capture.{}", self.slot))
    }

    /// The consumer group whose committed offset carries the capture's progress.
    pub fn progress_group(&self) -> String {
        format!("keystone-capture.{}", self.slot)
    }
}

/// The password: from the file named by `KEYSTONE_POSTGRES_PASSWORD_FILE`,
/// else `KEYSTONE_POSTGRES_PASSWORD`, else empty (trust authentication).
pub fn password(env: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    match env(ENV_PASSWORD_FILE).filter(|p| !p.is_empty()) {
        Some(path) => std::fs::read_to_string(&path)
            .map(|text| text.trim_end_matches(['\r', '\n']).to_owned())
            .map_err(|e| format!("{ENV_PASSWORD_FILE}={path}: {e}")),
        None => Ok(env(ENV_PASSWORD).unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<CaptureConfig, String> {
        let text = format!(
            r#"{{"postgres": {{"host": "db", "database": "shop", "user": "cdc"}},
                "tables": ["orders", "billing.invoices"], "publication": "p", "slot": "s",
                "topic": "shop.cdc"{extra}}}"#
        );
        let config: CaptureConfig = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn defaults_snapshot_once_and_commit_every_100ms() {
        let c = config("").unwrap();
        assert_eq!(c.postgres.port, 5432);
        assert_eq!(c.snapshot.mode, SnapshotMode::Initial);
        assert_eq!(c.snapshot.chunk_size, 4096);
        assert_eq!(
            c.commit_interval.as_std(),
            std::time::Duration::from_millis(100)
        );
        assert_eq!(c.transactional_id(), "keystone-capture.s");
        let tables = c.table_names().unwrap();
        assert_eq!(tables[0].to_string(), "public.orders");
        assert_eq!(tables[1].to_string(), "billing.invoices");
    }

    #[test]
    fn bad_names_and_unknown_fields_are_refused_by_name() {
        let mut c = config("").unwrap();
        c.slot = "Bad-Slot".into();
        assert!(c.validate().unwrap_err().starts_with("slot:"));
        let error = config(r#", "snapshot": {"chunkSize": 0}"#).unwrap_err();
        assert!(error.contains("chunkSize"), "{error}");
        let error = config(r#", "tabels": []"#).unwrap_err();
        assert!(error.contains("tabels"), "{error}");
    }
}
