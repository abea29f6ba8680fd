//! The Argo CD health checks, evaluated by a real Lua 5.4 interpreter on
//! sample Pipeline and Processor objects, the way Argo CD runs them: the
//! object as the global `obj`, the script's return value as the health.

use mlua::{Lua, LuaSerdeExt, SerializeOptions, Table};
use serde_json::{Value, json};

const PIPELINE: &str = include_str!("../../config/argocd/pipeline-health.lua");
const PROCESSOR: &str = include_str!("../../config/argocd/processor-health.lua");
const ARGOCD_CM: &str = include_str!("../../config/argocd/argocd-cm.yaml");

fn health(script: &str, object: &Value) -> (String, String) {
    let lua = Lua::new();
    // Absent fields are nil in Argo CD's conversion; never a null sentinel.
    let options = SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false);
    let obj = lua.to_value_with(object, options).expect("object converts");
    lua.globals().set("obj", obj).expect("set obj");
    let hs: Table = lua.load(script).eval().expect("script runs");
    let status: String = hs.get("status").expect("status");
    let message: String = hs
        .get::<Option<String>>("message")
        .expect("message")
        .unwrap_or_default();
    (status, message)
}

fn cond(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({"type": type_, "status": status, "reason": reason, "message": message,
           "lastTransitionTime": "2026-01-01T00:00:00Z"})
}

fn pipeline(generation: i64, status: Option<Value>) -> Value {
    let mut obj = json!({
        "apiVersion": "keystone.dev/v1alpha1",
        "kind": "Pipeline",
        "metadata": {"name": "p", "namespace": "n", "generation": generation},
        "spec": {"source": {"topic": "t"}},
    });
    if let Some(status) = status {
        obj["status"] = status;
    }
    obj
}

#[test]
fn a_pipeline_without_status_is_progressing() {
    let (status, message) = health(PIPELINE, &pipeline(1, None));
    assert_eq!(status, "Progressing");
    assert!(message.contains("observe"), "{message}");
}

#[test]
fn an_unobserved_generation_is_progressing_even_if_ready() {
    let status = json!({"observedGeneration": 1, "phase": "Running",
        "conditions": [cond("Ready", "True", "Running", "ok")]});
    let (health_status, message) = health(PIPELINE, &pipeline(2, Some(status)));
    assert_eq!(health_status, "Progressing");
    assert!(message.contains("generation 2"), "{message}");
}

#[test]
fn ready_is_healthy() {
    let status = json!({"observedGeneration": 3, "phase": "Running", "conditions": [
        cond("ContractsValid", "True", "ContractsValid", ""),
        cond("TopicsReady", "True", "TopicsReady", ""),
        cond("RuntimeReady", "True", "InstancesReady", ""),
        cond("Ready", "True", "Running", "every stage has all its instances ready"),
    ]});
    assert_eq!(health(PIPELINE, &pipeline(3, Some(status))).0, "Healthy");
}

#[test]
fn invalid_contracts_are_degraded_with_the_checker_message() {
    let status = json!({"observedGeneration": 2, "phase": "Invalid", "conditions": [
        cond("ContractsValid", "False", "ContractsInvalid", "spec.steps[1] (dedup): field \"user\" is missing"),
        cond("Ready", "False", "ContractsInvalid", "the spec is invalid"),
    ]});
    let (status, message) = health(PIPELINE, &pipeline(2, Some(status)));
    assert_eq!(status, "Degraded");
    assert!(message.contains("spec.steps[1]"), "{message}");
}

#[test]
fn a_capture_waiting_for_its_table_is_progressing() {
    let status = json!({"observedGeneration": 1, "phase": "Provisioning", "conditions": [
        cond("ContractsValid", "Unknown", "AwaitingSourceTable", "the steps are checked against the columns of public.orders once the capture has described it"),
        cond("Ready", "False", "AwaitingSourceTable", "waiting for its description"),
    ]});
    assert_eq!(
        health(PIPELINE, &pipeline(1, Some(status))).0,
        "Progressing"
    );
}

#[test]
fn degraded_phase_is_degraded_and_provisioning_is_progressing() {
    let degraded = json!({"observedGeneration": 1, "phase": "Degraded", "conditions": [
        cond("ContractsValid", "True", "ContractsValid", ""),
        cond("TopicsReady", "False", "TopicConflict", "topic \"x\" was created by pipeline n/other"),
        cond("Ready", "False", "TopicConflict", "topic \"x\" was created by pipeline n/other"),
    ]});
    let (status, message) = health(PIPELINE, &pipeline(1, Some(degraded)));
    assert_eq!(status, "Degraded");
    assert!(message.starts_with("TopicConflict"), "{message}");

    let provisioning = json!({"observedGeneration": 1, "phase": "Provisioning", "conditions": [
        cond("ContractsValid", "True", "ContractsValid", ""),
        cond("Ready", "False", "InstancesNotReady", "stages not ready (ready/desired): s0 0/2"),
    ]});
    let (status, message) = health(PIPELINE, &pipeline(1, Some(provisioning)));
    assert_eq!(status, "Progressing");
    assert!(message.contains("s0 0/2"), "{message}");

    let upgrading = json!({"observedGeneration": 1, "phase": "Upgrading", "conditions": [
        cond("Ready", "False", "Upgrading", "upgrading from checkpoint"),
    ]});
    assert_eq!(
        health(PIPELINE, &pipeline(1, Some(upgrading))).0,
        "Progressing"
    );
}

#[test]
fn an_upgrade_is_progressing_and_a_rollback_degraded_although_the_old_version_is_ready() {
    let upgrading = json!({"observedGeneration": 4, "phase": "Upgrading", "conditions": [
        cond("Ready", "True", "Ready", "all stages ready"),
        cond("SpecApplied", "False", "Upgrading", "Upgrade from plan a to b"),
    ]});
    let (status, message) = health(PIPELINE, &pipeline(4, Some(upgrading)));
    assert_eq!(status, "Progressing");
    assert!(message.contains("plan a to b"), "{message}");

    let rolled_back = json!({"observedGeneration": 4, "phase": "Degraded", "conditions": [
        cond("Ready", "True", "Ready", "all stages ready"),
        cond("SpecApplied", "False", "RolledBack", "rolled back to plan a: 40% dead-lettered"),
    ]});
    let (status, message) = health(PIPELINE, &pipeline(4, Some(rolled_back)));
    assert_eq!(status, "Degraded");
    assert!(message.starts_with("RolledBack: rolled back"), "{message}");
}

#[test]
fn processor_health_follows_contract_valid() {
    let processor = |status: &str| {
        json!({"metadata": {"name": "x", "generation": 1},
               "status": {"observedGeneration": 1, "conditions": [cond("ContractValid", status, "r", "m")]}})
    };
    assert_eq!(health(PROCESSOR, &processor("True")).0, "Healthy");
    assert_eq!(health(PROCESSOR, &processor("False")).0, "Degraded");
    assert_eq!(
        health(PROCESSOR, &json!({"metadata": {"name": "x"}})).0,
        "Progressing"
    );
}

#[test]
fn argocd_cm_carries_the_scripts_verbatim() {
    let cm: Value = serde_yaml_ng::from_str(ARGOCD_CM).expect("argocd-cm parses");
    assert_eq!(
        cm["data"]["resource.customizations.health.keystone.dev_Pipeline"],
        PIPELINE
    );
    assert_eq!(
        cm["data"]["resource.customizations.health.keystone.dev_Processor"],
        PROCESSOR
    );
}
