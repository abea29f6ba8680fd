//! The operator's side of a capture (`spec.source.postgres`), which it never
//! reaches the database for: the capture holds the credentials, so the
//! operator needs no access to the user's Secret.
//!
//! - Status: the capture's progress (`/metrics`) and its table's columns, or
//!   why it refuses to stream (`/table`), become `status.capture` and the
//!   `SourceTable` and `WalRetention` conditions.
//! - Deletion with `topicDeletionPolicy: Delete`: the replication slot is
//!   dropped, or the database would keep WAL for it forever. The running
//!   capture drops it (`POST /drop-slot` with the control token), so a
//!   namespace deletion that already removed the Secret does not stop it.
//!   The publication stays: it holds no WAL and may be the user's.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use keystone_crds::pipeline::CaptureStatus;
use keystone_crds::pipeline::capture::{PostgresSourceSpec, SourceTable};
use keystone_crds::{ContractErrors, Pipeline};
use kube::api::{DeleteParams, ListParams};
use kube::{Api, ResourceExt};
use serde::Deserialize;

use crate::checkpoint::{pod_get, pod_post};
use crate::context::Context;
use crate::error::Error;
use crate::resources::{
    CAPTURE_COMPONENT, HTTP_PORT, LABEL_PIPELINE, LABEL_STAGE, pod_ready, stage_object_name,
};
use crate::status::{Cond, SOURCE_TABLE, WAL_RETENTION};

/// Has the capture drop its slot, then removes the capture. An error (no
/// capture running, the database refused) is retried by the caller until it
/// gives up with a warning that names the slot.
pub async fn drop_slot(pipeline: &Pipeline, ctx: &Context) -> Result<(), Error> {
    let Some(postgres) = &pipeline.spec.source.postgres else {
        return Ok(());
    };
    let namespace = pipeline.namespace().unwrap_or_default();
    let name = pipeline.name_any();
    let slot = postgres.slot_name(&namespace, &name);
    let ip = capture_pod_ip(ctx, &namespace, &name, true).await?.ok_or_else(|| {
            Error::Capture(format!(
                "no running capture to drop replication slot {slot}; drop it with SELECT pg_drop_replication_slot('{slot}') once nothing uses it"
            ))
        })?;
    let token = crate::control::token(ctx, &namespace, &name).await?;
    pod_post(&ip, HTTP_PORT, "/drop-slot", &token)
        .await
        .map_err(|e| Error::Capture(format!("dropping replication slot {slot}: {e}")))?;
    tracing::info!(%slot, pipeline = %name, "the capture dropped its replication slot");
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    match deployments
        .delete(
            &stage_object_name(&name, CAPTURE_COMPONENT),
            &DeleteParams::background(),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The IP of the pipeline's capture pod (a ready one with `ready`), if one runs.
async fn capture_pod_ip(
    ctx: &Context,
    namespace: &str,
    pipeline: &str,
    ready: bool,
) -> Result<Option<String>, Error> {
    let selector = format!("{LABEL_PIPELINE}={pipeline},{LABEL_STAGE}={CAPTURE_COMPONENT}");
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), namespace)
        .list(&ListParams::default().labels(&selector))
        .await?;
    Ok(pods
        .items
        .iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none() && (!ready || pod_ready(pod)))
        .find_map(|pod| pod.status.as_ref()?.pod_ip.clone()))
}

/// What a capture's `/table` answers.
#[derive(Debug, Default, Deserialize)]
struct TableAnswer {
    table: Option<SourceTable>,
    problem: Option<String>,
}

/// The capture's progress from its metrics, and its table (or why it
/// refuses to stream); `None` while no capture answers. A capture that is
/// not ready answers too: it says why.
pub async fn status(ctx: &Context, namespace: &str, pipeline: &str) -> Option<CaptureStatus> {
    let ip = capture_pod_ip(ctx, namespace, pipeline, false)
        .await
        .ok()??;
    let text = pod_get(&ip, HTTP_PORT, "/metrics").await.ok()?;
    let mut status = parse_status(&text);
    let table: TableAnswer = pod_get(&ip, HTTP_PORT, "/table")
        .await
        .ok()
        .and_then(|body| serde_json::from_str(&body).ok())
        .unwrap_or_default();
    status.table = table.table;
    status.problem = table.problem;
    Some(status)
}

/// The least time between two reads of a capture's status: each read that
/// finds something new is a status write, and each write another reconcile.
const READ_GAP_SECS: i64 = 8;

/// Reads the capture's status into `capture`, unless it was read within the
/// last few seconds; a capture that does not describe its table (yet) keeps
/// the last description. Returns the table as it was before.
pub async fn refresh(
    ctx: &Context,
    namespace: &str,
    pipeline: &str,
    capture: &mut Option<Box<CaptureStatus>>,
) -> Option<SourceTable> {
    let previous = capture.as_ref().and_then(|c| c.table.clone());
    let read_recently = capture
        .as_ref()
        .and_then(|c| c.read_time.as_ref())
        .is_some_and(|t| Timestamp::now().duration_since(t.0).as_secs() < READ_GAP_SECS);
    if !read_recently && let Some(mut read) = status(ctx, namespace, pipeline).await {
        if read.table.is_none() {
            read.table = previous.clone();
        }
        *capture = Some(Box::new(read));
    }
    previous
}

/// The `SourceTable` and `WalRetention` conditions of a capture pipeline
/// (none until its capture first answers).
pub fn conditions(
    spec: &PostgresSourceSpec,
    capture: Option<&CaptureStatus>,
    previous: Option<&SourceTable>,
    table_errors: &[String],
    current: Option<&Cond>,
) -> Vec<Cond> {
    let Some(capture) = capture else {
        return Vec::new();
    };
    table_condition(capture, previous, table_errors, current)
        .into_iter()
        .chain([wal_condition(spec, capture)])
        .collect()
}

/// The `SourceTable` condition: why the capture refuses to stream, the
/// spec's disagreements with the table (`table_errors`: the contract errors
/// only the table's columns cause), or that it holds, and what changed in
/// the table since `previous`. `None` until the capture
/// first describes the table or refuses it.
fn table_condition(
    status: &CaptureStatus,
    previous: Option<&SourceTable>,
    table_errors: &[String],
    current: Option<&Cond>,
) -> Option<Cond> {
    if let Some(problem) = &status.problem {
        return Some(Cond::new(
            SOURCE_TABLE,
            false,
            "CaptureRefused",
            format!("the capture does not stream: {problem}"),
        ));
    }
    let table = status.table.as_ref()?;
    let changes = previous
        .map(|old| table.changes_since(old))
        .unwrap_or_default();
    let changed = if changes.is_empty() {
        String::new()
    } else {
        format!("{} changed: {}; ", table.name, changes.join(", "))
    };
    if !table_errors.is_empty() {
        return Some(Cond::new(
            SOURCE_TABLE,
            false,
            "SchemaMismatch",
            format!(
                "{changed}the spec does not check against {}: {}; the running version (if any) goes on until the spec agrees with the table",
                table.name,
                table_errors.join("; ")
            ),
        ));
    }
    if !changes.is_empty() {
        return Some(Cond::new(
            SOURCE_TABLE,
            true,
            "ColumnsChanged",
            format!(
                "{changed}the steps still check against it; the source schema follows the table, so the change rolls out as an upgrade (see status.upgrade)"
            ),
        ));
    }
    // The last change stays reported until the next one.
    if let Some(current) = current
        && current.ok
        && current.reason == "ColumnsChanged"
    {
        return Some(current.clone());
    }
    Some(Cond::new(
        SOURCE_TABLE,
        true,
        "Compatible",
        format!(
            "the steps check against {} ({} columns, primary key [{}])",
            table.name,
            table.columns.len(),
            table.primary_key().join(", ")
        ),
    ))
}

/// The contract errors that only the table's columns cause.
pub fn table_errors(with_table: &ContractErrors, without: Option<&ContractErrors>) -> Vec<String> {
    with_table
        .0
        .iter()
        .filter(|e| without.is_none_or(|w| !w.0.contains(e)))
        .map(ToString::to_string)
        .collect()
}

/// The `WalRetention` condition from the WAL the slot holds back.
fn wal_condition(spec: &PostgresSourceSpec, status: &CaptureStatus) -> Cond {
    let limit = spec.max_retained_wal_bytes;
    if status.retained_wal_bytes > limit {
        Cond::new(
            WAL_RETENTION,
            false,
            "WalRetained",
            format!(
                "the replication slot holds back {} of WAL, more than maxRetainedWalBytes ({}): the capture is stopped, failing or slower than the writes, and the database keeps every WAL segment since its position",
                bytes(status.retained_wal_bytes),
                bytes(limit)
            ),
        )
    } else {
        Cond::new(
            WAL_RETENTION,
            true,
            "WithinLimit",
            format!(
                "the replication slot holds back no more than maxRetainedWalBytes ({}) of WAL",
                bytes(limit)
            ),
        )
    }
}

fn bytes(n: i64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn parse_status(metrics: &str) -> CaptureStatus {
    let value = |name: &str| crate::rollout::metric_sum(metrics, name, None) as i64;
    let last_commit_ms = value("keystone_capture_last_commit_time_ms");
    CaptureStatus {
        snapshot_done: value("keystone_capture_snapshot_done") == 1,
        snapshot_rows: value("keystone_capture_snapshot_committed_rows"),
        snapshot_chunks: value("keystone_capture_snapshot_committed_chunks"),
        retained_wal_bytes: value("keystone_capture_retained_wal_bytes"),
        last_commit_time: (last_commit_ms > 0)
            .then(|| Timestamp::from_millisecond(last_commit_ms).ok())
            .flatten()
            .map(Time),
        table: None,
        problem: None,
        read_time: Some(Time(Timestamp::now())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_reads_the_captures_metrics() {
        let metrics = r#"# HELP keystone_capture_snapshot_done 1 when no snapshot is in progress.
keystone_capture_snapshot_done{slot="s"} 0
keystone_capture_snapshot_committed_rows{slot="s"} 4096
keystone_capture_snapshot_committed_chunks{slot="s"} 1
keystone_capture_retained_wal_bytes{slot="s"} 81920
keystone_capture_last_commit_time_ms{slot="s"} 1796379076153
"#;
        let status = parse_status(metrics);
        assert!(!status.snapshot_done);
        assert_eq!((status.snapshot_rows, status.snapshot_chunks), (4096, 1));
        assert_eq!(status.retained_wal_bytes, 81920);
        assert_eq!(
            status.last_commit_time.unwrap().0.as_millisecond(),
            1_796_379_076_153
        );
        assert_eq!(parse_status("").last_commit_time, None);
    }

    fn table(columns: &[(&str, &str)]) -> SourceTable {
        SourceTable {
            name: "public.orders".into(),
            columns: columns
                .iter()
                .enumerate()
                .map(
                    |(i, (name, sql_type))| keystone_crds::pipeline::capture::SourceColumn {
                        name: (*name).into(),
                        sql_type: (*sql_type).into(),
                        field_type: keystone_crds::schema::FieldType::String,
                        nullable: i > 0,
                        primary_key: i == 0,
                    },
                )
                .collect(),
        }
    }

    #[test]
    fn the_source_table_condition_tells_refusals_mismatches_and_changes() {
        let mut status = CaptureStatus {
            problem: Some("public.orders has no primary key".into()),
            ..CaptureStatus::default()
        };
        let refused = table_condition(&status, None, &[], None).unwrap();
        assert_eq!(
            (refused.ok, refused.reason.as_str()),
            (false, "CaptureRefused")
        );
        assert!(
            refused.message.ends_with("has no primary key"),
            "{}",
            refused.message
        );

        status.problem = None;
        assert_eq!(
            table_condition(&status, None, &[], None),
            None,
            "nothing known yet"
        );

        let old = table(&[("id", "bigint"), ("status", "text")]);
        status.table = Some(old.clone());
        let holds = table_condition(&status, None, &[], None).unwrap();
        assert_eq!((holds.ok, holds.reason.as_str()), (true, "Compatible"));
        assert!(
            holds.message.contains("(2 columns, primary key [id])"),
            "{}",
            holds.message
        );

        status.table = Some(table(&[
            ("id", "bigint"),
            ("status", "text"),
            ("note", "text"),
        ]));
        let changed = table_condition(&status, Some(&old), &[], Some(&holds)).unwrap();
        assert_eq!(
            (changed.ok, changed.reason.as_str()),
            (true, "ColumnsChanged")
        );
        assert!(
            changed
                .message
                .starts_with("public.orders changed: column note text added;"),
            "{}",
            changed.message
        );
        // Reported until the next change.
        let later = table_condition(&status, status.table.as_ref(), &[], Some(&changed)).unwrap();
        assert_eq!(later, changed);

        let errors = vec!["spec.source.schema.fields[4]: after.status is declared, but public.orders has no column \"status\"".to_owned()];
        let mismatch =
            table_condition(&status, status.table.as_ref(), &errors, Some(&changed)).unwrap();
        assert_eq!(
            (mismatch.ok, mismatch.reason.as_str()),
            (false, "SchemaMismatch")
        );
        assert!(
            mismatch.message.contains(&errors[0]),
            "{}",
            mismatch.message
        );
    }

    #[test]
    fn only_the_tables_own_errors_are_the_tables() {
        use keystone_crds::{ContractError, ErrorKind};
        let error = |path: &str| ContractError {
            kind: ErrorKind::MissingField,
            path: path.into(),
            subject: None,
            message: "m".into(),
        };
        let with = ContractErrors(vec![error("spec.steps[0]"), error("spec.source.key")]);
        let without = ContractErrors(vec![error("spec.steps[0]")]);
        assert_eq!(
            table_errors(&with, Some(&without)),
            vec!["spec.source.key: m"]
        );
        assert_eq!(table_errors(&with, None).len(), 2);
    }

    #[test]
    fn the_wal_condition_compares_with_the_limit() {
        let spec: PostgresSourceSpec = serde_json::from_value(serde_json::json!({
            "host": "db", "database": "shop", "credentialsSecret": "s", "tables": ["orders"],
        }))
        .unwrap();
        assert_eq!(spec.max_retained_wal_bytes, 1 << 30);
        let mut status = CaptureStatus {
            retained_wal_bytes: 3 << 29,
            ..CaptureStatus::default()
        };
        let over = wal_condition(&spec, &status);
        assert_eq!((over.ok, over.reason.as_str()), (false, "WalRetained"));
        assert!(
            over.message
                .contains("holds back 1.5 GiB of WAL, more than maxRetainedWalBytes (1.0 GiB)"),
            "{}",
            over.message
        );
        status.retained_wal_bytes = 1 << 30;
        assert!(
            wal_condition(&spec, &status).ok,
            "at the limit is within it"
        );
        assert_eq!(bytes(1), "1 B");
        assert_eq!(bytes(2048), "2.0 KiB");
    }
}
