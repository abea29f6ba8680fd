//! What the operator and the runtime exchange about checkpoints and restores.
//!
//! A checkpoint of one stage is the union of what each of its instances answers to
//! `POST /checkpoint`: every instance commits its open transaction at that barrier
//! and reports, for every partition it owns, the next input offset and the
//! changelog positions committed with it. Offsets and state of one partition are
//! committed in the same transaction, so per partition they always agree.
//!
//! A restore is the reverse: the operator writes a [`RestorePlan`] into a
//! ConfigMap, and each instance (`serve --restore FILE`) applies it once per
//! partition, marking it applied in the metadata of the offsets it commits.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Per topic, per partition, an offset.
pub type Positions = BTreeMap<String, BTreeMap<i32, i64>>;

/// The prefix of the offset-commit metadata that marks a restore applied.
pub const RESTORE_METADATA_PREFIX: &str = "keystone.restore=";

/// One runtime instance's answer to `POST /checkpoint`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceCheckpoint {
    pub pipeline: String,
    pub stage: String,
    /// The pod name.
    #[serde(default)]
    pub instance: String,
    /// The plan hash the instance runs.
    #[serde(default)]
    pub plan_hash: String,
    pub input_topic: String,
    /// Next offset to consume, for every input partition the instance owns.
    pub source_offsets: BTreeMap<i32, i64>,
    /// Per changelog topic, for every owned partition, the offset after the
    /// last state change committed (the end of the partition when nothing was written).
    pub changelog_positions: Positions,
    /// The instance stopped consuming after this checkpoint (`?stop=true`).
    #[serde(default)]
    pub stopped: bool,
}

/// What asked for a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckpointTrigger {
    Periodic,
    Manual,
    Upgrade,
    Suspend,
}

impl CheckpointTrigger {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointTrigger::Periodic => "Periodic",
            CheckpointTrigger::Manual => "Manual",
            CheckpointTrigger::Upgrade => "Upgrade",
            CheckpointTrigger::Suspend => "Suspend",
        }
    }
}

/// One stage of a pipeline checkpoint: the union over its instances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageCheckpoint {
    pub name: String,
    pub input_topic: String,
    /// Next offset to consume, for every input partition.
    pub source_offsets: BTreeMap<i32, i64>,
    /// Per changelog topic, for every partition, the state position.
    #[serde(default)]
    pub changelog_positions: Positions,
}

/// A consistent checkpoint of a whole pipeline, as the operator keeps it
/// (`checkpoint.json` of the ConfigMap `<pipeline>-checkpoint-<id>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineCheckpoint {
    pub id: String,
    pub pipeline: String,
    pub namespace: String,
    pub plan_hash: String,
    /// RFC 3339.
    pub time: String,
    pub trigger: CheckpointTrigger,
    pub stages: Vec<StageCheckpoint>,
    /// End offsets of the sink topics read just before the barrier: every record
    /// written after the checkpoint lies past them (where a rollback's replay looks
    /// for what was already delivered).
    #[serde(default)]
    pub sink_positions: Positions,
}

/// Where a restored stage starts reading its input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum InputRestore {
    /// The consumer group's committed offsets (nothing to do for the input).
    Committed,
    /// The beginning of every partition.
    Earliest,
    /// The end of every partition, as found when the restore is applied.
    Latest,
    /// These offsets, per partition; partitions not listed keep their committed offsets.
    Offsets(BTreeMap<i32, i64>),
}

/// What happens to one changelog topic's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StateRestore {
    /// The state as of these positions (per partition, the offset after the last
    /// change that counts): later changes are undone by writing the values at the
    /// position again (tombstones for keys that did not exist yet).
    At(BTreeMap<i32, i64>),
    /// No state: every key gets a tombstone.
    Empty,
}

/// Sink records a replay must not write again: after a rollback, events that the
/// failed version already delivered are skipped when the replay reaches them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplaySuppression {
    /// Per sink topic and partition, where to start looking for delivered records
    /// (the checkpoint's `sinkPositions`); the end is the end found at restore.
    pub sink_positions: Positions,
}

/// How one stage is restored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageRestore {
    pub input: InputRestore,
    /// Per changelog topic; topics not listed keep their state.
    #[serde(default)]
    pub state: BTreeMap<String, StateRestore>,
}

/// A restore the instances of a pipeline apply once (`serve --restore FILE`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestorePlan {
    /// Unique per restore: instances record it in their committed offsets'
    /// metadata (`keystone.restore=<id>`) so a restarted instance does not apply it twice.
    pub id: String,
    /// The checkpoint restored, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// Per stage name; stages not listed start normally.
    pub stages: BTreeMap<String, StageRestore>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppress: Option<ReplaySuppression>,
}

impl RestorePlan {
    /// The offset-commit metadata that marks this restore applied.
    pub fn commit_metadata(&self) -> String {
        format!("{RESTORE_METADATA_PREFIX}{}", self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_plan_round_trips_as_json_with_readable_variants() {
        let plan = RestorePlan {
            id: "r1".into(),
            checkpoint: Some("7".into()),
            stages: BTreeMap::from([(
                "s0".to_owned(),
                StageRestore {
                    input: InputRestore::Offsets(BTreeMap::from([(0, 42)])),
                    state: BTreeMap::from([
                        ("cl".to_owned(), StateRestore::At(BTreeMap::from([(0, 9)]))),
                        ("cl2".to_owned(), StateRestore::Empty),
                    ]),
                },
            )]),
            suppress: None,
        };
        let json = serde_json::to_value(&plan).unwrap();
        assert_eq!(json["stages"]["s0"]["input"]["offsets"]["0"], 42);
        assert_eq!(json["stages"]["s0"]["state"]["cl"]["at"]["0"], 9);
        assert_eq!(json["stages"]["s0"]["state"]["cl2"], "empty");
        let back: RestorePlan = serde_json::from_value(json).unwrap();
        assert_eq!(back, plan);
        assert_eq!(plan.commit_metadata(), "keystone.restore=r1");
    }
}
