//! Pipelines that feed each other through Kafka topics, against the real API
//! server and operator: a cycle is refused on every pipeline in it (a
//! `ContractsValid=False TopicCycle` condition naming the other, nothing
//! deployed); breaking it by changing one pipeline re-reconciles the other,
//! untouched, and both deploy; a cycle is accepted only when every pipeline in
//! it sets `spec.allowTopicCycles: true`.

mod operator_support;

use k8s_openapi::api::apps::v1::Deployment;
use keystone_crds::Pipeline;
use keystone_crds::pipeline::PipelinePhase;
use keystone_e2e::wait_for;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use operator_support::*;
use serde_json::json;

/// A one-stage Pipeline reading `source` and writing `sink`, both on the
/// default Kafka cluster.
fn pipeline(ns: &str, name: &str, source: &str, sink: &str, allow_cycles: bool) -> String {
    format!(
        r#"apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata:
  name: {name}
  namespace: {ns}
spec:
  allowTopicCycles: {allow_cycles}
  source:
    topic: {source}
    schema:
      fields:
        - {{name: id, type: string}}
  topicDeletionPolicy: Retain
  sinks:
    - name: out
      kafka: {{topic: {sink}}}
"#
    )
}

/// Waits for `ContractsValid=False` with reason `TopicCycle` on the current
/// generation, and checks the message names `other` (`namespace/name`).
async fn wait_refused(
    api: &Api<Pipeline>,
    name: &str,
    other: &str,
    operator: &OperatorProcess,
) -> Pipeline {
    let p = wait_for(api, name, WAIT, "ContractsValid=False TopicCycle", |p| {
        condition_is(p, "ContractsValid", "False")
            && condition(p, "ContractsValid").is_some_and(|c| c.reason == "TopicCycle")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    let c = condition(&p, "ContractsValid").expect("ContractsValid");
    assert!(
        c.message
            .contains(&format!("the source of pipeline {other}")),
        "{name}'s condition should name {other}: {}",
        c.message
    );
    assert_eq!(
        p.status.as_ref().and_then(|s| s.phase),
        Some(PipelinePhase::Invalid)
    );
    p
}

async fn wait_deployment(api: &Api<Deployment>, name: &str, operator: &OperatorProcess) {
    wait_for(api, name, WAIT, "the stage's Deployment", |_| true)
        .await
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
}

async fn set_sink(api: &Api<Pipeline>, name: &str, topic: &str) {
    let patch = json!({"spec": {"sinks": [{"name": "out", "kafka": {"topic": topic}}]}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("patching {name}'s sink: {e}"));
}

#[tokio::test]
async fn a_cycle_is_refused_on_both_sides_until_one_side_breaks_it() {
    let tb = testbed().await;
    install_crds(&tb);
    let ns = pipeline_namespace(&tb, "op-cycles").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let kafka = Kafka::new(&tb);
    // Both sources exist, so the pipelines deploy once they are valid (a sink
    // writing an existing topic uses it as it is).
    let a_in = unique("e2e.cycle-a");
    let b_in = unique("e2e.cycle-b");
    kafka.create(&a_in, 1).await;
    kafka.create(&b_in, 1).await;
    let (a, b) = (format!("{}/a", ns.name()), format!("{}/b", ns.name()));

    // A writes B's source and B writes A's. Both exist before the operator
    // starts, so neither is ever judged alone (a reconcile waits for the cache
    // of all Pipelines): neither may be deployed, even for a moment.
    apply_yaml(
        &tb,
        &format!(
            "{}---\n{}",
            pipeline(ns.name(), "a", &a_in, &b_in, false),
            pipeline(ns.name(), "b", &b_in, &a_in, false)
        ),
    )
    .await;
    let operator = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "op-cycles");
    let pipelines: Api<Pipeline> = ns.api();
    let deployments: Api<Deployment> = ns.api();
    wait_refused(&pipelines, "a", &b, &operator).await;
    let p = wait_refused(&pipelines, "b", &a, &operator).await;
    let b_generation = p.metadata.generation;
    let deployed = deployments
        .list(&ListParams::default())
        .await
        .expect("list deployments");
    assert!(
        deployed.items.is_empty(),
        "nothing is deployed for a refused cycle: {:?}",
        deployed
            .items
            .iter()
            .map(|d| d.metadata.name.clone())
            .collect::<Vec<_>>()
    );

    // A writes another topic instead: the cycle is gone, and B, untouched, is
    // looked at again and becomes valid too; both deploy.
    set_sink(&pipelines, "a", &format!("{a_in}.out")).await;
    wait_condition(&pipelines, "a", "ContractsValid", "True").await;
    let p = wait_condition(&pipelines, "b", "ContractsValid", "True").await;
    assert_eq!(
        p.metadata.generation, b_generation,
        "b was re-reconciled, not changed"
    );
    wait_deployment(&deployments, "a-s0", &operator).await;
    wait_deployment(&deployments, "b-s0", &operator).await;
    wait_condition(&pipelines, "b", "TopicsReady", "True").await;

    // B, untouched, follows each of A's changes: closing the cycle again, live,
    // refuses both; breaking it accepts both. Rounds, because B's reconcile must
    // see A's new spec, never the cache's older copy (which it once could).
    for round in 0..8 {
        set_sink(&pipelines, "a", &b_in).await;
        wait_refused(&pipelines, "a", &b, &operator).await;
        let p = wait_refused(&pipelines, "b", &a, &operator).await;
        assert_eq!(p.metadata.generation, b_generation, "round {round}");
        set_sink(&pipelines, "a", &format!("{a_in}.out")).await;
        wait_condition(&pipelines, "a", "ContractsValid", "True").await;
        wait_condition(&pipelines, "b", "ContractsValid", "True").await;
    }

    ns.delete().await.expect("delete namespace");
}

#[tokio::test]
async fn a_cycle_is_accepted_only_when_every_pipeline_in_it_allows_it() {
    let tb = testbed().await;
    install_crds(&tb);
    let ns = pipeline_namespace(&tb, "op-cycles-ok").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let operator = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "op-cycles-ok");
    let kafka = Kafka::new(&tb);
    let a_in = unique("e2e.loop-a");
    let b_in = unique("e2e.loop-b");
    kafka.create(&a_in, 1).await;
    kafka.create(&b_in, 1).await;
    let pipelines: Api<Pipeline> = ns.api();
    let deployments: Api<Deployment> = ns.api();

    // Only A opts in: B, which did not, is refused (that alone breaks the
    // cycle, so A is accepted), and its message asks for the opt-in here only.
    apply_yaml(&tb, &pipeline(ns.name(), "a", &a_in, &b_in, true)).await;
    apply_yaml(&tb, &pipeline(ns.name(), "b", &b_in, &a_in, false)).await;
    let p = wait_refused(&pipelines, "b", &format!("{}/a", ns.name()), &operator).await;
    let message = &condition(&p, "ContractsValid").expect("condition").message;
    assert!(
        message.ends_with("set spec.allowTopicCycles: true here if the feedback is intended"),
        "{message}"
    );
    wait_condition(&pipelines, "a", "ContractsValid", "True").await;

    // B opts in too: both are accepted and deployed.
    let patch = json!({"spec": {"allowTopicCycles": true}});
    pipelines
        .patch("b", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch b");
    for name in ["a", "b"] {
        wait_condition(&pipelines, name, "ContractsValid", "True").await;
        wait_deployment(&deployments, &format!("{name}-s0"), &operator).await;
    }
    ns.delete().await.expect("delete namespace");
}
