//! What a Pipeline depends on: a Processor it references (its creation or
//! change re-reconciles the Pipeline without touching it) and a reachable
//! Kafka cluster (an outage shows in a condition, and the operator backs off).

mod operator_support;

use keystone_crds::{Pipeline, Processor};
use keystone_e2e::{wait_for, wait_for_event};
use kube::Api;
use operator_support::*;

fn processor_pipeline(ns: &str, source: &str, sink: &str) -> String {
    format!(
        r#"apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata:
  name: uses-processor
  namespace: {ns}
spec:
  source:
    topic: {source}
    schema:
      fields:
        - {{name: id, type: string}}
        - {{name: test, type: boolean}}
  steps:
    - name: drop-tests
      processorRef: {{name: drop-test-events}}
  topicDeletionPolicy: Delete
  sinks:
    - name: out
      kafka: {{topic: {sink}}}
"#
    )
}

fn processor(ns: &str, field_type: &str) -> String {
    format!(
        r#"apiVersion: keystone.dev/v1alpha1
kind: Processor
metadata:
  name: drop-test-events
  namespace: {ns}
spec:
  filter:
    expression: '!test'
  contract:
    requires:
      - {{name: test, type: {field_type}}}
"#
    )
}

#[tokio::test]
async fn a_processor_change_re_reconciles_the_pipelines_that_use_it() {
    let tb = testbed().await;
    install_crds(&tb);
    let ns = pipeline_namespace(&tb, "op-processor").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let _operator = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "op-p");
    let kafka = Kafka::new(&tb);
    let source = unique("e2e.proc");
    kafka.create(&source, 1).await;
    let pipelines: Api<Pipeline> = ns.api();

    // The referenced Processor does not exist: invalid, with the checker's words.
    apply_yaml(
        &tb,
        &processor_pipeline(ns.name(), &source, &format!("{source}.out")),
    )
    .await;
    let p = wait_condition(&pipelines, "uses-processor", "ContractsValid", "False").await;
    let c = condition(&p, "ContractsValid").expect("condition");
    assert!(
        c.message.contains("drop-test-events") && c.message.contains("not found"),
        "{}",
        c.message
    );

    // Creating it makes the Pipeline valid, with no change to the Pipeline.
    let generation = p.metadata.generation;
    apply_yaml(&tb, &processor(ns.name(), "boolean")).await;
    let p = wait_condition(&pipelines, "uses-processor", "ContractsValid", "True").await;
    assert_eq!(p.metadata.generation, generation);
    wait_condition(&pipelines, "uses-processor", "TopicsReady", "True").await;

    // The Processor's own status: valid, and who uses it.
    let processors: Api<Processor> = ns.api();
    let proc = wait_for(
        &processors,
        "drop-test-events",
        WAIT,
        "processor status",
        |p| {
            p.status
                .as_ref()
                .is_some_and(|s| s.used_by == vec!["uses-processor".to_owned()])
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let status = proc.status.expect("status");
    assert_eq!(status.operator.as_deref(), Some("filter"));
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "ContractValid" && c.status == "True")
    );

    // A Processor change that breaks the contract invalidates the Pipeline.
    apply_yaml(&tb, &processor(ns.name(), "string")).await;
    let p = wait_condition(&pipelines, "uses-processor", "ContractsValid", "False").await;
    let c = condition(&p, "ContractsValid").expect("condition");
    assert!(c.message.contains("test"), "{}", c.message);
    pipelines
        .delete("uses-processor", &Default::default())
        .await
        .expect("delete");
    keystone_e2e::wait_for_deletion(&pipelines, "uses-processor", WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The deletion reaches the Processor's usedBy through its watch, well
    // before its 5-minute look-again.
    wait_for(
        &processors,
        "drop-test-events",
        WAIT,
        "the deleted pipeline gone from usedBy",
        |p| p.status.as_ref().is_some_and(|s| s.used_by.is_empty()),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    ns.delete().await.expect("delete namespace");
}

#[tokio::test]
async fn an_unreachable_kafka_shows_in_a_condition() {
    let tb = testbed().await;
    install_crds(&tb);
    let ns = pipeline_namespace(&tb, "op-nokafka").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    // Nothing listens on port 9 of loopback.
    let operator = OperatorProcess::start_with(
        &tb,
        ns.name(),
        op_ns.name(),
        "op-nokafka",
        &[("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")],
    );
    let pipelines: Api<Pipeline> = ns.api();
    apply_yaml(
        &tb,
        &pipeline_yaml(
            ns.name(),
            "stranded",
            "e2e.nowhere",
            "e2e.nowhere.out",
            1,
            "Retain",
        ),
    )
    .await;
    let p = wait_for(
        &pipelines,
        "stranded",
        WAIT,
        "TopicsReady=False KafkaUnavailable",
        |p| condition(p, "TopicsReady").is_some_and(|c| c.reason == "KafkaUnavailable"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    assert!(condition_is(&p, "ContractsValid", "True"));
    assert!(condition(&p, "Ready").is_some_and(|c| c.status == "False"));
    // The event is written after the status: wait for it rather than race it.
    let client = tb.client().expect("client");
    wait_for_event(
        &client,
        Some(ns.name()),
        "stranded",
        &["KafkaUnavailable"],
        WAIT,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let metrics = operator.metrics().await;
    assert!(
        metrics.contains(
            "keystone_operator_reconcile_failures_total{controller=\"pipeline\",reason=\"kafka"
        ),
        "{metrics}"
    );
    ns.delete().await.expect("delete namespace");
}

#[tokio::test]
async fn a_topic_config_kafka_refuses_is_a_condition_not_a_retry_storm() {
    let tb = testbed().await;
    install_crds(&tb);
    let ns = pipeline_namespace(&tb, "op-rejected").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let operator = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "op-rej");
    let kafka = Kafka::new(&tb);
    let source = unique("e2e.rejected");
    kafka.create(&source, 1).await;
    let manifest = pipeline_yaml(
        ns.name(),
        "typo",
        &source,
        &format!("{source}.out"),
        1,
        "Retain",
    )
    .replace("retention.ms: \"3600000\"", "retention.msec: \"3600000\"");
    apply_yaml(&tb, &manifest).await;
    let pipelines: Api<Pipeline> = ns.api();
    let p = wait_for(
        &pipelines,
        "typo",
        WAIT,
        "TopicsReady=False TopicRejected",
        |p| condition(p, "TopicsReady").is_some_and(|c| c.reason == "TopicRejected"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    let c = condition(&p, "TopicsReady").expect("condition");
    assert!(
        c.message.contains(&format!("{source}.out")),
        "{}",
        c.message
    );
    assert_eq!(kafka.partitions(&format!("{source}.out")), None);

    // A sink on another cluster than the source: refused by the checker (one
    // stage's clients and transaction are bound to one cluster), nothing deployed.
    let manifest = pipeline_yaml(
        ns.name(),
        "split",
        &source,
        &format!("{source}.split"),
        1,
        "Retain",
    )
    .replace("      kafka:\n", "      kafka:\n        cluster: nowhere\n");
    apply_yaml(&tb, &manifest).await;
    let p = wait_for(
        &pipelines,
        "split",
        WAIT,
        "ContractsValid=False naming the sink's cluster",
        |p| {
            condition(p, "ContractsValid").is_some_and(|c| {
                c.status == "False" && c.message.contains("spec.sinks[0].kafka.cluster")
            })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    let c = condition(&p, "ContractsValid").expect("condition");
    assert!(c.message.contains("one Kafka cluster"), "{}", c.message);
    assert_eq!(kafka.partitions(&format!("{source}.split")), None);
    assert!(
        ns.api::<k8s_openapi::api::apps::v1::Deployment>()
            .get_opt("split-s0")
            .await
            .expect("get")
            .is_none()
    );

    // A Kafka cluster the operator does not know (named by the source and the
    // sink alike): Invalid, waiting for a change.
    let manifest = pipeline_yaml(
        ns.name(),
        "elsewhere",
        &source,
        &format!("{source}.x"),
        1,
        "Retain",
    )
    .replace("      kafka:\n", "      kafka:\n        cluster: nowhere\n")
    .replace("  source:\n", "  source:\n    cluster: nowhere\n");
    apply_yaml(&tb, &manifest).await;
    let p = wait_for(
        &pipelines,
        "elsewhere",
        WAIT,
        "TopicsReady=False UnknownCluster",
        |p| condition(p, "TopicsReady").is_some_and(|c| c.reason == "UnknownCluster"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    assert_eq!(
        p.status.as_ref().and_then(|s| s.phase),
        Some(keystone_crds::pipeline::PipelinePhase::Invalid)
    );
    assert!(condition(&p, "TopicsReady").is_some_and(|c| c.message.contains("nowhere")));
    assert!(
        ns.api::<k8s_openapi::api::apps::v1::Deployment>()
            .get_opt("typo-s0")
            .await
            .expect("get")
            .is_none()
    );
}
