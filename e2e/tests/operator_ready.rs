//! The whole path: the operator deploys a Pipeline, the runtime pods (the real
//! `keystone-runtime serve`, run by the process kubelet) become ready, the
//! Pipeline is Ready=True, and events produced to the source arrive processed
//! in the sink topic.
//!
//! Needs `cargo build -p keystone-runtime` (the kubelet maps `keystone/runtime*`
//! to target/debug/keystone-runtime) as well as the operator.

mod operator_support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use keystone_crds::Pipeline;
use keystone_crds::pipeline::PipelinePhase;
use keystone_e2e::wait_for;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use operator_support::*;
use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};

fn runtime_binary() {
    let path = repo().join("target/debug/keystone-runtime");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p keystone-runtime` before the e2e tests",
        path.display()
    );
}

#[tokio::test]
async fn a_pipeline_runs_ready_and_processes_events_end_to_end() {
    let tb = testbed().await;
    runtime_binary();
    install_crds(&tb);
    let ns = pipeline_namespace(&tb, "op-ready").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let operator = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "op-ready");
    let kafka = Kafka::new(&tb);
    let source = unique("e2e.ready");
    let sink = format!("{source}.out");
    kafka.create(&source, 1).await;
    let manifest = format!(
        r#"apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata:
  name: purchases
  namespace: {ns}
spec:
  source:
    topic: {source}
    key: [user]
    schema:
      fields:
        - {{name: user, type: string}}
        - {{name: action, type: string}}
        - {{name: seq, type: integer}}
  steps:
    - name: only-purchases
      filter:
        expression: 'action == "purchase"'
  commitInterval: 200ms
  topicDeletionPolicy: Delete
  upgrade: {{healthWindow: 5s}}
  sinks:
    - name: out
      kafka: {{topic: {sink}, partitions: 1}}
"#,
        ns = ns.name()
    );
    apply_yaml(&tb, &manifest).await;
    let pipelines: Api<Pipeline> = ns.api();
    let p = wait_for(
        &pipelines,
        "purchases",
        Duration::from_secs(180),
        "Ready=True",
        |p| condition_is(p, "Ready", "True"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    let status = p.status.expect("status");
    assert_eq!(status.phase, Some(PipelinePhase::Running));
    assert_eq!(status.ready_stages.as_deref(), Some("1/1"));
    // The printer columns tell the same story.
    let mut get = tb.kubectl().expect("kubectl");
    get.args(["get", "pipelines", "-n", ns.name()]);
    let table = run_ok(get);
    let row = table
        .lines()
        .find(|l| l.starts_with("purchases"))
        .unwrap_or_default();
    assert!(
        row.contains("Running") && row.contains("1/1") && row.contains(&source),
        "{table}"
    );

    let bootstrap = tb.kafka_bootstrap_servers().expect("kafka").to_owned();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("producer");
    for (i, action) in ["view", "purchase", "view", "purchase", "purchase"]
        .iter()
        .enumerate()
    {
        let value = format!(r#"{{"user":"u{i}","action":"{action}","seq":{i}}}"#);
        producer
            .send(
                FutureRecord::to(&source)
                    .key(&format!("u{i}"))
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    }
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", format!("e2e-{sink}"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[sink.as_str()]).expect("subscribe");
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while seen.len() < 3 {
        let message = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {seen:?} reached {sink}"))
            .expect("consume");
        let value: serde_json::Value =
            serde_json::from_slice(message.payload().unwrap_or_default()).expect("JSON event");
        seen.push(value["seq"].as_i64().expect("seq"));
    }
    seen.sort();
    assert_eq!(seen, vec![1, 3, 4], "only purchases, each once");

    // A spec change rolls the pods onto the new plan, which then processes what follows.
    let old_hash = status.plan_hash.clone().expect("plan hash");
    let patch = serde_json::json!({"spec": {"steps": [
        {"name": "only-purchases", "filter": {"expression": "action == \"view\""}}
    ]}});
    pipelines
        .patch("purchases", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch the filter");
    let deployments: Api<Deployment> = ns.api();
    wait_for(
        &deployments,
        "purchases-s0",
        Duration::from_secs(180),
        "the new pod template rolled out",
        |d| {
            let spec_gen = d.metadata.generation.unwrap_or_default();
            d.status.as_ref().is_some_and(|s| {
                s.observed_generation.unwrap_or_default() >= spec_gen
                    && s.updated_replicas == Some(1)
                    && s.ready_replicas == Some(1)
                    && s.replicas == Some(1)
            })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let p = wait_for(
        &pipelines,
        "purchases",
        Duration::from_secs(120),
        "Running (past its health window) on the new plan",
        |p| {
            condition_is(p, "Ready", "True")
                && p.status.as_ref().and_then(|s| s.plan_hash.as_ref()) != Some(&old_hash)
                && p.status.as_ref().and_then(|s| s.phase) == Some(PipelinePhase::Running)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    let new_hash = p
        .status
        .as_ref()
        .and_then(|s| s.plan_hash.clone())
        .expect("plan hash");
    assert_eq!(p.status.and_then(|s| s.phase), Some(PipelinePhase::Running));
    // Once the new version passed its health window (and so is the version a
    // rollback would return to), only its plan ConfigMap is left; checkpoints
    // (the upgrade took one) are ConfigMaps of their own.
    let config_maps: Api<ConfigMap> = ns.api();
    let current = format!("purchases-plan-{new_hash}");
    keystone_e2e::wait_until(
        Duration::from_secs(60),
        "only the current plan ConfigMap",
        || async {
            let list = config_maps
                .list(&ListParams::default().labels("keystone.dev/pipeline=purchases"))
                .await
                .ok()?;
            let names: Vec<String> = list
                .items
                .iter()
                .filter_map(|c| c.metadata.name.clone())
                .filter(|n| n.starts_with("purchases-plan-"))
                .collect();
            (names == vec![current.clone()]).then_some(())
        },
        || async {
            format!(
                "{:?}",
                config_maps.list(&ListParams::default()).await.map(|l| l
                    .items
                    .into_iter()
                    .map(|c| c.metadata.name)
                    .collect::<Vec<_>>())
            )
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    for (seq, action) in [(10, "purchase"), (11, "view")] {
        let value = format!(r#"{{"user":"v{seq}","action":"{action}","seq":{seq}}}"#);
        producer
            .send(
                FutureRecord::to(&source)
                    .key(&format!("v{seq}"))
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    }
    let mut after = Vec::new();
    while !after.contains(&11) {
        let message = tokio::time::timeout_at(
            tokio::time::Instant::now() + Duration::from_secs(90),
            consumer.recv(),
        )
        .await
        .unwrap_or_else(|_| panic!("after the upgrade only {after:?} reached {sink}"))
        .expect("consume");
        let value: serde_json::Value =
            serde_json::from_slice(message.payload().unwrap_or_default()).expect("JSON event");
        after.push(value["seq"].as_i64().expect("seq"));
    }
    assert!(
        !after.contains(&10),
        "the new filter keeps views only, and nothing before it is replayed: {after:?}"
    );
    assert!(
        after.iter().all(|s| *s >= 10),
        "events processed before the upgrade were not written again: {after:?}"
    );
    ns.delete().await.expect("delete namespace");
}
