//! The observed state of a pipeline: its phase, topics, stages, checkpoints,
//! upgrades and restores.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::RestoreSpec;

/// The observed state of a pipeline.
// The parts most Pipelines never or seldom have are boxed: the operator caches
// every Pipeline, and unboxed they made each one's status twice the size.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PipelineStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// A one-word summary: Pending, Invalid, Provisioning, Running, Degraded, Upgrading, Suspended or Deleting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<PipelinePhase>,
    /// Conditions keyed by type: Ready, ContractsValid, TopicsReady, RuntimeReady, ...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Ready stages out of all stages, for example `2/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_stages: Option<String>,
    /// The topics the pipeline uses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<TopicStatus>,
    /// The runtime stages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageStatus>,
    /// The last successful checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<Box<CheckpointSummary>>,
    /// The last failed checkpoint, with its reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failed_checkpoint: Option<Box<CheckpointSummary>>,
    /// The retained checkpoints, oldest first; each is a ConfigMap `<pipeline>-checkpoint-<id>`
    /// with the per-stage, per-partition offsets and state positions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checkpoints: Vec<CheckpointSummary>,
    /// The checkpoint being taken, while it is. An operator that takes over
    /// from one that stopped while taking it records it as failed and resumes
    /// the instances it may have stopped.
    // Written as null when none, so that the operator's merge patch of status removes it.
    #[serde(default)]
    pub checkpoint_in_progress: Option<CheckpointInProgress>,
    /// The `spec.checkpointTrigger` value last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint_trigger: Option<String>,
    /// Hash of the compiled plan that is deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_hash: Option<String>,
    /// The spec last deployed (JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reconciled_spec: Option<String>,
    /// The spec that last passed its health window (JSON): what a rollback returns to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_stable_spec: Option<String>,
    /// Hash of the plan of the last stable spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_plan_hash: Option<String>,
    /// The current or last upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<Box<UpgradeStatus>>,
    /// The last restore from a checkpoint (requested, a rollback, a state reset or a stateless upgrade).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restore: Option<Box<RestoreStatus>>,
    /// The `spec.restore` request last acted on: a request is carried out once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restore_request: Option<RestoreSpec>,
    /// What the capture of a `postgres` source last reported (from its
    /// metrics, read while the pipeline is reconciled and every 10 s while a
    /// snapshot runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<Box<CaptureStatus>>,
    /// Where the HTTP ingest endpoint of an `http` source takes events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingest: Option<IngestStatus>,
}

/// The HTTP ingest endpoint of an `http` source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngestStatus {
    /// The endpoint inside the cluster: `POST` events here with a bearer
    /// token from the tokens Secret (its Service, port 8080, or 8443 over
    /// TLS, and the path).
    pub url: String,
    /// The endpoint outside the cluster, through the Ingress the operator
    /// made for it (the chart's `ingest.ingress`); none without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_url: Option<String>,
}

/// The capture's progress: its snapshot and the database's WAL it holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaptureStatus {
    /// Whether no snapshot is in progress (the initial one, or one a
    /// `snapshot.trigger` asked for, is done, or none was asked for).
    pub snapshot_done: bool,
    /// Rows of the current (or last) snapshot in the capture topic.
    pub snapshot_rows: i64,
    /// Chunks of the current (or last) snapshot done.
    pub snapshot_chunks: i64,
    /// Bytes of WAL the database keeps for the replication slot: it grows
    /// while the capture does not advance (stopped, failing, or slower than
    /// the writes), and the database's disk pays for it.
    pub retained_wal_bytes: i64,
    /// When the last captured transaction committed in the database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_commit_time: Option<Time>,
    /// The captured table's columns as the capture last read them from the
    /// database; the source schema takes its columns from them, and the
    /// declared fields are checked against them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<super::capture::SourceTable>,
    /// Why the capture does not stream, when it refuses to (a table without
    /// a primary key, a missing publication, an unreachable database).
    // Written as null when none, so that the operator's merge patch of status removes it.
    #[serde(default)]
    pub problem: Option<String>,
    /// When the operator last read these from the capture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_time: Option<Time>,
}

/// A checkpoint being taken.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointInProgress {
    /// What asked for it: Periodic, Manual, Upgrade or Suspend.
    pub trigger: String,
    /// Hash of the plan it is taken of.
    pub plan_hash: String,
    /// Whether the instances stop at its barrier (and wait there to be resumed,
    /// replaced or scaled to zero).
    pub stop: bool,
    /// When it started.
    pub started: Time,
}

/// Where an upgrade is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UpgradePhase {
    /// Taking the checkpoint the new version starts from (and can roll back to).
    Checkpointing,
    /// The new version is rolling out.
    Deploying,
    /// The new version runs; the health window is open.
    Observing,
    /// It passed the health window and is the stable version.
    Stable,
    /// The change was not rolled out (state-incompatible without `allowStateReset`, the checkpoint failed,
    /// or the spec went back to the running version while its checkpoint was taken).
    Blocked,
    /// It failed its health check; the last stable version is being restored.
    RollingBack,
    /// It failed its health check and the last stable version runs again.
    RolledBack,
    /// It failed its health check and `rollbackOnFailure` is off.
    Failed,
}

/// An upgrade from one plan to another.
///
/// Every field is written, unset ones as null: the operator merge-patches its
/// status, and a new upgrade must not keep the last one's message, checkpoint
/// or `readySince` (which would cut its health window short).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeStatus {
    /// Where it is.
    pub phase: UpgradePhase,
    /// The spec generation being rolled out.
    pub generation: i64,
    /// How the change was classified: Ignore, Scale, Upgrade, StateIncompatible
    /// or TableIncompatible (a lake sink's table cannot hold the new output).
    pub change: String,
    /// What changed, in words.
    #[serde(default)]
    pub reasons: Vec<String>,
    /// Plan hash before.
    #[serde(default)]
    pub from_plan_hash: Option<String>,
    /// Plan hash after.
    pub to_plan_hash: String,
    /// The checkpoint taken before the upgrade (the rollback point).
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// Whether keyed state was dropped (`allowStateReset`, or a `Stateless` upgrade).
    #[serde(default)]
    pub state_reset: bool,
    /// When the upgrade started.
    pub started: Time,
    /// When the new version was first seen fully ready (the health window starts).
    #[serde(default)]
    pub ready_since: Option<Time>,
    /// Why it is blocked, failed or rolled back.
    #[serde(default)]
    pub message: Option<String>,
}

/// A redeploy from a checkpoint. Every field is written, unset ones as null,
/// so that a new restore keeps nothing of the last one's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStatus {
    /// The restore's id (the ConfigMap `<pipeline>-restore-<id>` the instances read).
    pub id: String,
    /// The checkpoint restored, if any (a state reset restores none).
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// The `spec.restore.nonce` it answered.
    #[serde(default)]
    pub nonce: Option<String>,
    /// Why: Requested, Rollback, StateReset or Stateless.
    pub reason: String,
    /// When it was started.
    pub time: Time,
    /// The plan the restored instances run; their pods carry the restore until the next plan change.
    pub plan_hash: String,
}

/// A one-word summary of a pipeline's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PipelinePhase {
    Pending,
    Invalid,
    Provisioning,
    Running,
    Degraded,
    Upgrading,
    Suspended,
    Deleting,
}

/// A topic the pipeline reads or writes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicStatus {
    /// Topic name.
    pub name: String,
    /// What the pipeline uses it for: source, sink, repartition, changelog, deadLetter or table.
    pub role: String,
    /// Current partition count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<i32>,
    /// Whether this pipeline created (and owns) the topic.
    #[serde(default)]
    pub created: bool,
}

/// A runtime stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageStatus {
    /// Stage name (also the Deployment's name suffix).
    pub name: String,
    /// The steps fused into this stage.
    #[serde(default)]
    pub steps: Vec<String>,
    /// Desired instances.
    pub replicas: i32,
    /// Ready instances.
    #[serde(default)]
    pub ready_replicas: i32,
}

/// A checkpoint, as summarized in status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSummary {
    /// Checkpoint id.
    pub id: String,
    /// When it completed (or failed).
    pub time: Time,
    /// Why it failed, for a failed checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What asked for it: Periodic, Manual, Upgrade or Suspend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// Hash of the plan that was running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_hash: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The operator merge-patches its status: an unset field of a new upgrade
    /// must be written as null, or the stored one keeps the last upgrade's.
    #[test]
    fn a_new_upgrade_record_clears_what_the_last_one_set() {
        let upgrade = UpgradeStatus {
            phase: UpgradePhase::Deploying,
            generation: 2,
            change: "Upgrade".into(),
            reasons: Vec::new(),
            from_plan_hash: None,
            to_plan_hash: "b".into(),
            checkpoint: None,
            state_reset: false,
            started: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            ready_since: None,
            message: None,
        };
        let json = serde_json::to_value(&upgrade).unwrap();
        for field in [
            "reasons",
            "fromPlanHash",
            "checkpoint",
            "stateReset",
            "readySince",
            "message",
        ] {
            assert!(json.get(field).is_some(), "{field} is not written: {json}");
        }
        let mut stored = serde_json::json!({"phase": "RolledBack", "message": "failed", "readySince": "2026-01-01T00:00:00Z", "checkpoint": "c1"});
        json_patch::merge(&mut stored, &json);
        assert_eq!(stored.get("message"), None, "{stored}");
        assert_eq!(stored.get("readySince"), None, "{stored}");
        assert_eq!(stored.get("checkpoint"), None, "{stored}");
    }
}
