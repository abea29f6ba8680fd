//! What a capture instance runs: the database, the tables, the replication
//! slot and publication, the topic and the snapshot policy (JSON, camelCase;
//! the operator compiles it from `spec.source.postgres` into the plan), and
//! the credentials from the environment.

use std::path::Path;

pub use keystone_crds::pipeline::capture::{CaptureConfig, Connection, SnapshotMode};

use crate::capture::changes::TableName;

/// The variable holding the database password (from a Secret).
pub const ENV_PASSWORD: &str = "KEYSTONE_POSTGRES_PASSWORD";
/// A file holding it instead (a mounted Secret key).
pub const ENV_PASSWORD_FILE: &str = "KEYSTONE_POSTGRES_PASSWORD_FILE";

/// The variable holding the database user when the configuration names none
/// (the operator sets it from the credentials Secret).
pub const ENV_USER: &str = "KEYSTONE_POSTGRES_USER";

/// Reads a capture's configuration: a `CaptureConfig`, or a compiled plan
/// whose `capture` it is (what the operator mounts).
pub fn read(path: &Path) -> Result<CaptureConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let config = if value.get("pipeline").is_some() && value.get("stages").is_some() {
        let plan: keystone_crds::Plan =
            serde_json::from_value(value).map_err(|e| format!("{}: {e}", path.display()))?;
        plan.capture.ok_or_else(|| {
            format!(
                "{}: the plan has no capture (spec.source.postgres)",
                path.display()
            )
        })?
    } else {
        serde_json::from_value(value).map_err(|e| format!("{}: {e}", path.display()))?
    };
    validate(&config).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(config)
}

pub fn validate(config: &CaptureConfig) -> Result<(), String> {
    if config.tables.is_empty() {
        return Err("tables: name at least one table".into());
    }
    table_names(config)?;
    if config.snapshot.chunk_size == 0 {
        return Err("snapshot.chunkSize must be at least 1".into());
    }
    for (field, name) in [("slot", &config.slot), ("publication", &config.publication)] {
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

pub fn table_names(config: &CaptureConfig) -> Result<Vec<TableName>, String> {
    config
        .tables
        .iter()
        .map(|t| TableName::parse(t).map_err(|e| format!("tables: {e}")))
        .collect()
}

/// The user: the configuration's, else `KEYSTONE_POSTGRES_USER`.
pub fn user(
    config: &CaptureConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    config
        .postgres
        .user
        .clone()
        .or_else(|| env(ENV_USER).filter(|u| !u.is_empty()))
        .ok_or_else(|| format!("no database user: set postgres.user or {ENV_USER}"))
}

/// The password: from the file named by `KEYSTONE_POSTGRES_PASSWORD_FILE`,
/// else `KEYSTONE_POSTGRES_PASSWORD`, else empty (trust authentication).
pub fn password(env: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    crate::secret::from_env_or_file(
        &env,
        &|path: &str| std::fs::read_to_string(path),
        ENV_PASSWORD,
        ENV_PASSWORD_FILE,
    )
    .map(Option::unwrap_or_default)
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
        validate(&config)?;
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
        assert_eq!(user(&c, |_| None).unwrap(), "cdc");
        let tables = table_names(&c).unwrap();
        assert_eq!(tables[0].to_string(), "public.orders");
        assert_eq!(tables[1].to_string(), "billing.invoices");
    }

    #[test]
    fn bad_names_and_unknown_fields_are_refused_by_name() {
        let mut c = config("").unwrap();
        c.slot = "Bad-Slot".into();
        assert!(validate(&c).unwrap_err().starts_with("slot:"));
        let error = config(r#", "snapshot": {"chunkSize": 0}"#).unwrap_err();
        assert!(error.contains("chunkSize"), "{error}");
        let error = config(r#", "tabels": []"#).unwrap_err();
        assert!(error.contains("tabels"), "{error}");
    }
}
