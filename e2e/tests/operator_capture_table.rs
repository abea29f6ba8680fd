//! A captured table on the cluster, as the operator follows it: the capture
//! runs alone until it has described the table (no stage before); a table
//! without a primary key is refused in the `SourceTable` condition (and the
//! capture starts once the key is added, without a restart); the capture's
//! description of the table reaches `status.capture.table`, and the key the
//! spec does not declare comes from it; a column added in the database is
//! reported and rolled out as an upgrade; a slot holding back more WAL than
//! `maxRetainedWalBytes` turns `WalRetention` False; a column the declared
//! schema uses, dropped in the database, turns `SourceTable` and
//! `ContractsValid` False while the running version goes on.
//!
//! Needs `cargo build -p keystone-runtime` as well as the operator, and the
//! testbed's PostgreSQL.

mod operator_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use keystone_crds::Pipeline;
use keystone_crds::pipeline::UpgradePhase;
use keystone_e2e::postgres::Postgres;
use kube::Api;
use kube::api::{Patch, PatchParams};
use operator_support::capture::{CaptureSample, wait_slot_dropped};
use operator_support::*;
use serde_json::json;

const NAME: &str = "orders-from-postgres";

/// Waits until the pipeline's condition `type_` has `status` and `reason`;
/// returns its message.
async fn wait_reason(
    api: &Api<Pipeline>,
    operator: &OperatorProcess,
    type_: &str,
    status: &str,
    reason: &str,
) -> String {
    let pipeline = keystone_e2e::wait_for(
        api,
        NAME,
        Duration::from_secs(150),
        &format!("condition {type_}={status} ({reason})"),
        |p| condition(p, type_).is_some_and(|c| c.status == status && c.reason == reason),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    condition(&pipeline, type_).unwrap().message.clone()
}

#[tokio::test]
async fn the_operator_follows_the_captured_tables_columns_key_and_wal() {
    let Some(pg) = Postgres::require() else {
        return;
    };
    let tb = testbed().await;
    require_runtime_binary();
    install_crds(&tb);
    let ns = pipeline_namespace(&tb, "op-capture-table").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let operator = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "op-capture-table");

    // No primary key yet.
    let sample = CaptureSample::create(
        &pg,
        &ns,
        "id bigint NOT NULL, status text, amount numeric(10,2)",
        "SELECT g, 'created', g * 1.5",
        100,
        "",
    )
    .await;
    let table = sample.table.clone();
    // Nothing of the table declared but a column the test drops later.
    let manifest = sample.manifest.replace(
        "- {name: id, type: integer}",
        "- {name: after.status, type: string, optional: true}",
    );
    assert_ne!(manifest, sample.manifest);
    let suffix = table.trim_start_matches("public.orders_").to_owned();
    let db = pg.admin().await;
    apply_yaml(&tb, &manifest).await;
    let pipelines: Api<Pipeline> = ns.api();

    // Refused, with the reason, while the capture waits for the key.
    let refused = wait_reason(
        &pipelines,
        &operator,
        "SourceTable",
        "False",
        "CaptureRefused",
    )
    .await;
    assert!(refused.contains("has no primary key"), "{refused}");
    assert!(refused.contains(&format!("orders_{suffix}")), "{refused}");
    // The capture runs alone: the steps wait for the table's columns.
    let waiting = wait_reason(
        &pipelines,
        &operator,
        "Ready",
        "False",
        "AwaitingSourceTable",
    )
    .await;
    assert!(waiting.contains("has no primary key"), "{waiting}");
    let pipeline = pipelines.get(NAME).await.expect("the pipeline");
    assert_eq!(
        condition(&pipeline, "ContractsValid").map(|c| (c.status.clone(), c.reason.clone())),
        Some(("Unknown".to_owned(), "AwaitingSourceTable".to_owned())),
        "not checked yet, not invalid"
    );
    let deployments: Api<Deployment> = ns.api();
    let names: Vec<String> = deployments
        .list(&Default::default())
        .await
        .expect("Deployments")
        .items
        .into_iter()
        .filter_map(|d| d.metadata.name)
        .collect();
    assert_eq!(names, vec![format!("{NAME}-capture")]);

    // The key added, the same capture starts; the table is in the status.
    db.batch_execute(&format!("ALTER TABLE {table} ADD PRIMARY KEY (id)"))
        .await
        .expect("add the primary key");
    let compatible = wait_reason(&pipelines, &operator, "SourceTable", "True", "Compatible").await;
    assert!(
        compatible.contains("3 columns, primary key [id]"),
        "{compatible}"
    );
    let pipeline = wait_ready(&ns, NAME, &operator).await;
    let described = pipeline.status.unwrap().capture.unwrap().table.unwrap();
    let columns: Vec<(&str, &str, bool, bool)> = described
        .columns
        .iter()
        .map(|c| {
            (
                c.name.as_str(),
                c.sql_type.as_str(),
                c.nullable,
                c.primary_key,
            )
        })
        .collect();
    assert_eq!(
        columns,
        vec![
            ("id", "bigint", false, true),
            ("status", "text", true, false),
            ("amount", "numeric(10,2)", true, false),
        ]
    );

    // Writes keep the slot behind its server; with a limit of one byte the
    // retained WAL is over it.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let writing = writing.clone();
        let (db, table) = (pg.admin().await, table.clone());
        tokio::spawn(async move {
            let mut n = 0_i64;
            while writing.load(Ordering::Relaxed) {
                n += 1;
                let _ = db
                    .execute(
                        &format!(
                            "UPDATE {table} SET amount = amount + 1 WHERE id = {}",
                            n % 100 + 1
                        ),
                        &[],
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let limit = json!({"spec": {"source": {"postgres": {"maxRetainedWalBytes": 1}}}});
    pipelines
        .patch(NAME, &PatchParams::default(), &Patch::Merge(&limit))
        .await
        .expect("patch the WAL limit");
    let retained = wait_reason(
        &pipelines,
        &operator,
        "WalRetention",
        "False",
        "WalRetained",
    )
    .await;
    assert!(
        retained.contains("more than maxRetainedWalBytes (1 B)"),
        "{retained}"
    );
    let limit =
        json!({"spec": {"source": {"postgres": {"maxRetainedWalBytes": 1_073_741_824_i64}}}});
    pipelines
        .patch(NAME, &PatchParams::default(), &Patch::Merge(&limit))
        .await
        .expect("patch the WAL limit back");
    wait_reason(&pipelines, &operator, "WalRetention", "True", "WithinLimit").await;

    // A column added: a change the declared schema survives. The writer's
    // next update sends the new columns through the log.
    db.batch_execute(&format!(
        "ALTER TABLE {table} ADD COLUMN discount numeric(5,2)"
    ))
    .await
    .expect("add a column");
    let changed = wait_reason(
        &pipelines,
        &operator,
        "SourceTable",
        "True",
        "ColumnsChanged",
    )
    .await;
    assert!(
        changed.contains("column discount numeric(5,2) added"),
        "{changed}"
    );
    assert!(changed.contains("rolls out as an upgrade"), "{changed}");
    let upgraded = keystone_e2e::wait_for(
        &pipelines,
        NAME,
        Duration::from_secs(150),
        "the new column rolled out as an upgrade",
        |p| {
            p.status
                .as_ref()
                .and_then(|s| s.upgrade.as_ref())
                .is_some_and(|u| {
                    // Deployed; it becomes Stable after the health window.
                    matches!(u.phase, UpgradePhase::Observing | UpgradePhase::Stable)
                        && u.reasons.iter().any(|r| r == "the source schema changed")
                })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    assert_eq!(
        condition(&upgraded, "ContractsValid").map(|c| c.status.as_str()),
        Some("True")
    );

    // A column the declared schema uses, dropped: refused, and the running
    // version goes on.
    db.batch_execute(&format!("ALTER TABLE {table} DROP COLUMN status"))
        .await
        .expect("drop a column");
    let mismatch = wait_reason(
        &pipelines,
        &operator,
        "SourceTable",
        "False",
        "SchemaMismatch",
    )
    .await;
    assert!(
        mismatch.contains(&format!(
            "after.status is declared, but {table} has no column \"status\""
        )),
        "{mismatch}"
    );
    let pipeline = pipelines.get(NAME).await.expect("the pipeline");
    let contracts = condition(&pipeline, "ContractsValid").expect("ContractsValid");
    assert_eq!(contracts.status, "False", "{contracts:?}");
    let capture = deployments
        .get(&format!("{NAME}-capture"))
        .await
        .expect("the capture still runs");
    assert_eq!(
        capture.status.and_then(|s| s.ready_replicas),
        Some(1),
        "the capture stays up"
    );
    writing.store(false, Ordering::Relaxed);
    writer.await.expect("the writer");

    pipelines
        .delete(NAME, &kube::api::DeleteParams::default())
        .await
        .expect("delete the pipeline");
    wait_slot_dropped(&db, &sample.slot, &operator).await;
    ns.delete().await.expect("delete namespace");
    sample.clean_up(&db, &pg).await;
}
