//! Conditions and phase: pure functions from what a reconcile saw to the
//! status it writes, and the events a status change deserves.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use keystone_crds::pipeline::{PipelinePhase, PipelineStatus, StageStatus};

pub const READY: &str = "Ready";
pub const CONTRACTS_VALID: &str = "ContractsValid";
pub const TOPICS_READY: &str = "TopicsReady";
pub const RUNTIME_READY: &str = "RuntimeReady";
/// A `postgres` source's table: described by the capture, and the steps
/// checking against its columns (or why the capture refuses it).
pub const SOURCE_TABLE: &str = "SourceTable";
/// A `postgres` source's replication slot: the WAL it holds back, against
/// `maxRetainedWalBytes`.
pub const WAL_RETENTION: &str = "WalRetention";

/// One condition as the reconciler decides it, before timestamps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub ok: bool,
    /// Not decided yet (status `Unknown`); `ok` is false.
    pub unknown: bool,
    pub reason: String,
    pub message: String,
}

impl Cond {
    pub fn new(
        type_: &'static str,
        ok: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            ok,
            unknown: false,
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// A condition that cannot be decided yet, such as the contracts of a
    /// capture pipeline before its table is described.
    pub fn unknown(
        type_: &'static str,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            unknown: true,
            ..Self::new(type_, false, reason, message)
        }
    }
}

/// Sets `cond` in `conditions`, keeping `lastTransitionTime` when the status
/// did not change (as `meta.SetStatusCondition` does).
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    cond: &Cond,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = match (cond.ok, cond.unknown) {
        (_, true) => "Unknown",
        (true, false) => "True",
        (false, false) => "False",
    };
    // Kubernetes limits condition messages to 32 KiB; keep them readable.
    let message: String = cond.message.chars().take(4000).collect();
    match conditions.iter_mut().find(|c| c.type_ == cond.type_) {
        Some(existing) => {
            if existing.status != status {
                existing.last_transition_time = Time(now);
            }
            existing.status = status.to_owned();
            existing.reason = cond.reason.clone();
            existing.message = message;
            existing.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: cond.type_.to_owned(),
            status: status.to_owned(),
            reason: cond.reason.clone(),
            message,
            observed_generation: generation,
            last_transition_time: Time(now),
        }),
    }
}

pub fn condition<'a>(status: Option<&'a PipelineStatus>, type_: &str) -> Option<&'a Condition> {
    status?.conditions.iter().find(|c| c.type_ == type_)
}

/// Ready is the conjunction of the others; phase is its one-word summary.
pub fn summarize(
    contracts: &Cond,
    topics: Option<&Cond>,
    runtime: Option<&Cond>,
    deployed_before: bool,
) -> (PipelinePhase, Cond) {
    if !contracts.ok {
        let message = if deployed_before {
            "the spec is invalid; the previously deployed version keeps running (see ContractsValid)"
        } else {
            "the spec is invalid; nothing was deployed (see ContractsValid)"
        };
        return (
            PipelinePhase::Invalid,
            Cond::new(READY, false, contracts.reason.clone(), message),
        );
    }
    let Some(topics) = topics else {
        return (
            PipelinePhase::Provisioning,
            Cond::new(READY, false, "Provisioning", "topics are being provisioned"),
        );
    };
    if !topics.ok {
        let phase = if deployed_before || topics.reason != "Provisioning" {
            PipelinePhase::Degraded
        } else {
            PipelinePhase::Provisioning
        };
        return (
            phase,
            Cond::new(READY, false, topics.reason.clone(), topics.message.clone()),
        );
    }
    match runtime {
        Some(runtime) if runtime.ok => (
            PipelinePhase::Running,
            Cond::new(
                READY,
                true,
                "Running",
                "every stage has all its instances ready",
            ),
        ),
        Some(runtime) => {
            let phase = if runtime.reason == "InstancesFailing" {
                PipelinePhase::Degraded
            } else {
                PipelinePhase::Provisioning
            };
            (
                phase,
                Cond::new(
                    READY,
                    false,
                    runtime.reason.clone(),
                    runtime.message.clone(),
                ),
            )
        }
        None => (
            PipelinePhase::Provisioning,
            Cond::new(
                READY,
                false,
                "Provisioning",
                "the runtime is being deployed",
            ),
        ),
    }
}

/// RuntimeReady from the stages' replica counts.
pub fn runtime_condition(stages: &[StageStatus], rolled_out: bool) -> Cond {
    let not_ready: Vec<String> = stages
        .iter()
        .filter(|s| s.ready_replicas < s.replicas)
        .map(|s| format!("{} {}/{}", s.name, s.ready_replicas, s.replicas))
        .collect();
    if not_ready.is_empty() && rolled_out {
        Cond::new(
            RUNTIME_READY,
            true,
            "InstancesReady",
            format!("{} stage(s) ready", stages.len()),
        )
    } else if not_ready.is_empty() {
        Cond::new(
            RUNTIME_READY,
            false,
            "RollingOut",
            "a new version of the runtime is rolling out",
        )
    } else {
        Cond::new(
            RUNTIME_READY,
            false,
            "InstancesNotReady",
            format!("stages not ready (ready/desired): {}", not_ready.join(", ")),
        )
    }
}

pub fn ready_stages(stages: &[StageStatus]) -> String {
    let ready = stages
        .iter()
        .filter(|s| s.ready_replicas >= s.replicas)
        .count();
    format!("{ready}/{}", stages.len())
}

/// An event worth publishing: a condition that changed status or reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub warning: bool,
    pub reason: String,
    pub note: String,
}

/// The event reason for a condition becoming true or false.
fn event_reason(type_: &str, ok: bool, reason: &str) -> &'static str {
    match (type_, ok) {
        (SOURCE_TABLE, true) if reason == "ColumnsChanged" => "SourceSchemaChanged",
        (SOURCE_TABLE, true) => "SourceTableCompatible",
        (SOURCE_TABLE, false) => "SourceTableProblem",
        (WAL_RETENTION, true) => "WalWithinLimit",
        (WAL_RETENTION, false) => "WalRetained",
        (CONTRACTS_VALID, true) => "ContractsValid",
        // Not checked yet (Unknown): the steps wait for the captured table's columns.
        (CONTRACTS_VALID, false) if reason == "AwaitingSourceTable" => "AwaitingSourceTable",
        (CONTRACTS_VALID, false) => "ContractsInvalid",
        (TOPICS_READY, true) => "TopicsReady",
        (TOPICS_READY, false) => "TopicsNotReady",
        (RUNTIME_READY, true) => "RuntimeReady",
        (RUNTIME_READY, false) => "RuntimeNotReady",
        (_, true) => "Ready",
        (_, false) => "NotReady",
    }
}

/// The transitions between two condition lists (Ready last, as the summary).
pub fn transitions(old: &[Condition], new: &[Condition]) -> Vec<Transition> {
    let mut out = Vec::new();
    let order = [
        CONTRACTS_VALID,
        SOURCE_TABLE,
        WAL_RETENTION,
        TOPICS_READY,
        RUNTIME_READY,
        READY,
    ];
    for type_ in order {
        let Some(n) = new.iter().find(|c| c.type_ == type_) else {
            continue;
        };
        let changed = match old.iter().find(|c| c.type_ == type_) {
            None => true,
            Some(o) => o.status != n.status || o.reason != n.reason,
        };
        if changed {
            let ok = n.status == "True";
            // A first "not yet" is the normal start, not a warning.
            let warning = !ok
                && !matches!(
                    n.reason.as_str(),
                    "Provisioning" | "InstancesNotReady" | "RollingOut" | "AwaitingSourceTable"
                );
            out.push(Transition {
                warning,
                reason: event_reason(type_, ok, &n.reason).to_owned(),
                note: format!("{type_}={}: {}: {}", n.status, n.reason, n.message),
            });
        }
    }
    out
}

/// Whether two statuses differ in anything but condition timestamps, so the
/// reconciler writes only real changes (each write wakes the controller).
pub fn differs(old: Option<&PipelineStatus>, new: &PipelineStatus) -> bool {
    let Some(old) = old else { return true };
    let strip = |s: &PipelineStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        s.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
        s
    };
    strip(old) != strip(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).expect("valid")
    }

    fn stage(name: &str, replicas: i32, ready: i32) -> StageStatus {
        StageStatus {
            name: name.into(),
            steps: vec![],
            replicas,
            ready_replicas: ready,
        }
    }

    #[test]
    fn transition_time_changes_only_with_status() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            &Cond::new(READY, false, "Provisioning", "x"),
            Some(1),
            t(10),
        );
        set_condition(
            &mut conditions,
            &Cond::new(READY, false, "Other", "y"),
            Some(2),
            t(20),
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, Time(t(10)));
        assert_eq!(conditions[0].reason, "Other");
        assert_eq!(conditions[0].observed_generation, Some(2));
        set_condition(
            &mut conditions,
            &Cond::new(READY, true, "Running", "z"),
            Some(2),
            t(30),
        );
        assert_eq!(conditions[0].last_transition_time, Time(t(30)));
        assert_eq!(conditions[0].status, "True");
    }

    #[test]
    fn invalid_contracts_win_and_say_what_keeps_running() {
        let contracts = Cond::new(
            CONTRACTS_VALID,
            false,
            "ContractsInvalid",
            "spec.steps[0]: bad",
        );
        let (phase, ready) = summarize(&contracts, None, None, true);
        assert_eq!(phase, PipelinePhase::Invalid);
        assert!(!ready.ok);
        assert!(ready.message.contains("keeps running"));
    }

    #[test]
    fn ready_needs_topics_and_runtime() {
        let contracts = Cond::new(CONTRACTS_VALID, true, "ContractsValid", "");
        let topics = Cond::new(TOPICS_READY, true, "TopicsReady", "");
        let stages = [stage("s0", 2, 2), stage("s1", 1, 0)];
        let runtime = runtime_condition(&stages, true);
        assert!(!runtime.ok);
        assert!(runtime.message.contains("s1 0/1"));
        let (phase, ready) = summarize(&contracts, Some(&topics), Some(&runtime), false);
        assert_eq!(phase, PipelinePhase::Provisioning);
        assert!(!ready.ok);
        let stages = [stage("s0", 2, 2), stage("s1", 1, 1)];
        let runtime = runtime_condition(&stages, true);
        let (phase, ready) = summarize(&contracts, Some(&topics), Some(&runtime), false);
        assert_eq!(phase, PipelinePhase::Running);
        assert!(ready.ok);
        assert_eq!(ready_stages(&stages), "2/2");
        assert!(!runtime_condition(&stages, false).ok);
    }

    #[test]
    fn topic_problems_degrade() {
        let contracts = Cond::new(CONTRACTS_VALID, true, "ContractsValid", "");
        let topics = Cond::new(
            TOPICS_READY,
            false,
            "PartitionDecreaseRefused",
            "t has 4 > 2",
        );
        let (phase, ready) = summarize(&contracts, Some(&topics), None, false);
        assert_eq!(phase, PipelinePhase::Degraded);
        assert_eq!(ready.reason, "PartitionDecreaseRefused");
    }

    #[test]
    fn transitions_name_changed_conditions() {
        let mut old = Vec::new();
        set_condition(
            &mut old,
            &Cond::new(CONTRACTS_VALID, true, "ContractsValid", ""),
            Some(1),
            t(1),
        );
        let mut new = old.clone();
        set_condition(
            &mut new,
            &Cond::new(CONTRACTS_VALID, false, "ContractsInvalid", "m"),
            Some(2),
            t(2),
        );
        set_condition(
            &mut new,
            &Cond::new(READY, false, "ContractsInvalid", "m"),
            Some(2),
            t(2),
        );
        let events = transitions(&old, &new);
        assert_eq!(events.len(), 2);
        assert!(events[0].warning);
        assert_eq!(events[0].reason, "ContractsInvalid");
        assert_eq!(events[1].reason, "NotReady");
        assert!(transitions(&new, &new).is_empty());

        // A capture's table not described yet is a normal start.
        let mut waiting = Vec::new();
        set_condition(
            &mut waiting,
            &Cond::unknown(CONTRACTS_VALID, "AwaitingSourceTable", "m"),
            Some(1),
            t(1),
        );
        assert_eq!(waiting[0].status, "Unknown");
        let events = transitions(&[], &waiting);
        assert!(!events[0].warning);
        assert_eq!(events[0].reason, "AwaitingSourceTable");
    }

    #[test]
    fn timestamps_alone_are_no_difference() {
        let mut a = PipelineStatus::default();
        set_condition(
            &mut a.conditions,
            &Cond::new(READY, true, "Running", ""),
            Some(1),
            t(1),
        );
        let mut b = PipelineStatus::default();
        set_condition(
            &mut b.conditions,
            &Cond::new(READY, true, "Running", ""),
            Some(1),
            t(2),
        );
        assert!(!differs(Some(&a), &b));
        b.ready_stages = Some("1/1".into());
        assert!(differs(Some(&a), &b));
    }
}
