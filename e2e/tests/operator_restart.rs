//! Operations: an operator killed mid-reconcile and restarted converges to the
//! same state; with two replicas only the Lease holder acts, and the standby
//! takes over when the leader dies.

mod operator_support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use keystone_crds::Pipeline;
use keystone_e2e::{wait_for, wait_until};
use kube::{Api, ResourceExt};
use operator_support::*;

#[tokio::test]
async fn killed_mid_reconcile_then_restarted_converges_to_the_same_state() {
    let tb = testbed().await;
    install_crds(&tb);
    let ns = pipeline_namespace(&tb, "op-restart").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let kafka = Kafka::new(&tb);
    let source = unique("e2e.restart");
    let sink = format!("{source}.out");
    kafka.create(&source, 3).await;
    let pipelines: Api<Pipeline> = ns.api();
    let deployments: Api<Deployment> = ns.api();

    let mut first = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "op-1");
    apply_yaml(
        &tb,
        &pipeline_yaml(ns.name(), "crash", &source, &sink, 2, "Delete"),
    )
    .await;
    // Kill it as soon as it has started acting (the first topic exists), before it can finish.
    kafka
        .wait_partitions(
            &format!("keystone.{}.crash.dlq", ns.name()),
            "created",
            |p| p.is_some(),
        )
        .await;
    first.kill();
    let log = first.log_text();
    drop(first);

    let second = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "op-2");
    let p = wait_for(&pipelines, "crash", WAIT, "converged", |p| {
        condition_is(p, "TopicsReady", "True")
            && p.status.as_ref().is_some_and(|s| s.stages.len() == 2)
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nfirst operator's log:\n{log}\nsecond:\n{}",
            second.log_text()
        )
    });
    assert_eq!(kafka.partitions(&sink), Some(2));
    for t in ["dlq", "repartition.per-user", "changelog.per-user"] {
        assert_eq!(
            kafka.partitions(&format!("keystone.{}.crash.{t}", ns.name())),
            Some(3)
        );
    }
    let names: Vec<String> = deployments
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .iter()
        .map(|d| d.name_any())
        .collect();
    assert_eq!(names, vec!["crash-s0".to_owned(), "crash-s1".to_owned()]);
    let status = p.status.expect("status");
    assert!(
        status.topics.iter().filter(|t| t.created).count() >= 4,
        "{:?}",
        status.topics
    );
    // The restarted operator counts the pipeline by phase, though nothing changed.
    let counted = |metrics: &str| -> i64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("keystone_operator_pipelines{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
            .sum()
    };
    wait_until(
        Duration::from_secs(60),
        "the restarted operator to count the pipeline",
        || async { (counted(&second.metrics().await) == 1).then_some(()) },
        || async { second.metrics().await },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    drop(second);
    ns.delete().await.expect("delete namespace");
}

#[tokio::test]
async fn only_the_leader_acts_and_the_standby_takes_over() {
    let tb = testbed().await;
    install_crds(&tb);
    let ns = pipeline_namespace(&tb, "op-leader").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let kafka = Kafka::new(&tb);
    let pipelines: Api<Pipeline> = ns.api();

    let mut a = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "replica-a");
    wait_until(
        Duration::from_secs(60),
        "replica-a to lead",
        || async { a_leads(&a) },
        || async { a.log_text() },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let mut b = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "replica-b");

    let source = unique("e2e.leader");
    kafka.create(&source, 1).await;
    apply_yaml(
        &tb,
        &pipeline_yaml(
            ns.name(),
            "led",
            &source,
            &format!("{source}.out"),
            1,
            "Retain",
        ),
    )
    .await;
    wait_condition(&pipelines, "led", "TopicsReady", "True").await;
    let b_log = b.log_text();
    assert!(b_log.contains("waiting to become the leader"), "{b_log}");
    assert!(
        !b_log.contains("became the leader"),
        "two leaders:\n{b_log}"
    );
    assert!(!b_log.contains("reconcile"), "the standby acted:\n{b_log}");
    assert!(b.is_running());

    // The leader dies without releasing the Lease; the standby takes over once it expires.
    a.kill();
    wait_until(
        Duration::from_secs(90),
        "replica-b to lead",
        || async { b.log_text().contains("became the leader").then_some(()) },
        || async { b.log_text() },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let source2 = unique("e2e.leader");
    kafka.create(&source2, 1).await;
    apply_yaml(
        &tb,
        &pipeline_yaml(
            ns.name(),
            "after",
            &source2,
            &format!("{source2}.out"),
            1,
            "Retain",
        ),
    )
    .await;
    wait_condition(&pipelines, "after", "TopicsReady", "True").await;
    // --log-format json: every line is a JSON object with a level and a message.
    for line in b.log_text().lines().filter(|l| !l.trim().is_empty()) {
        let record: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            record.get("level").is_some() && record.get("fields").is_some(),
            "{line}"
        );
    }
    let metrics = b.metrics().await;
    assert!(
        metrics.contains("keystone_operator_reconciles_total"),
        "{metrics}"
    );
    drop(b);
    ns.delete().await.expect("delete namespace");
}

fn a_leads(a: &OperatorProcess) -> Option<()> {
    a.log_text().contains("became the leader").then_some(())
}
