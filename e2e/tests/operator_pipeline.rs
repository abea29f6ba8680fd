//! The operator against the real API server and Kafka: a Pipeline becomes
//! topics, a plan ConfigMap, per-stage Deployments, Services and
//! PodDisruptionBudgets, with honest conditions; partitions are raised and a
//! decrease is refused; config drift is corrected; an invalid contract leaves
//! the running version alone; deletion honours topicDeletionPolicy.

mod operator_support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use keystone_crds::{Pipeline, Plan};
use keystone_e2e::{wait_for, wait_for_deletion, wait_for_event};
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use operator_support::*;
use serde_json::json;

fn plan_hash(d: &Deployment) -> String {
    d.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get("keystone.dev/plan-hash").cloned())
        .unwrap_or_default()
}

/// Touching an annotation wakes the controller without a spec change (Kafka has no watch).
async fn nudge(api: &Api<Pipeline>, name: &str, n: u32) {
    let patch = json!({"metadata": {"annotations": {"e2e.keystone.dev/nudge": n.to_string()}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate");
}

#[tokio::test]
async fn pipeline_lifecycle_topics_workloads_status_and_delete() {
    let tb = testbed().await;
    install_crds(&tb);
    let ns = pipeline_namespace(&tb, "op-pipeline").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let _operator = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "op-a");
    let kafka = Kafka::new(&tb);

    let source = unique("e2e.clicks");
    let sink = format!("{source}.out");
    kafka.create(&source, 2).await;
    let name = "clicks";
    apply_yaml(
        &tb,
        &pipeline_yaml(ns.name(), name, &source, &sink, 3, "Delete"),
    )
    .await;
    let pipelines: Api<Pipeline> = ns.api();
    let client = ns.client();

    // Topics: created with the right partitions and configs; status says so.
    let p = wait_condition(&pipelines, name, "TopicsReady", "True").await;
    assert!(condition_is(&p, "ContractsValid", "True"));
    let status = p.status.clone().expect("status");
    let dlq = format!("keystone.{}.{name}.dlq", ns.name());
    let repartition = format!("keystone.{}.{name}.repartition.per-user", ns.name());
    let changelog = format!("keystone.{}.{name}.changelog.per-user", ns.name());
    assert_eq!(kafka.partitions(&sink), Some(3));
    for internal in [&dlq, &repartition, &changelog] {
        assert_eq!(
            kafka.partitions(internal),
            Some(2),
            "{internal} follows the source's partitions"
        );
    }
    assert_eq!(
        kafka
            .dynamic_config(&sink)
            .await
            .get("retention.ms")
            .map(String::as_str),
        Some("3600000")
    );
    assert_eq!(
        kafka
            .dynamic_config(&changelog)
            .await
            .get("cleanup.policy")
            .map(String::as_str),
        Some("compact")
    );
    let created: Vec<&str> = status
        .topics
        .iter()
        .filter(|t| t.created)
        .map(|t| t.name.as_str())
        .collect();
    assert!(
        created.contains(&sink.as_str()) && created.contains(&changelog.as_str()),
        "{created:?}"
    );
    assert!(
        status
            .topics
            .iter()
            .any(|t| t.name == source && !t.created && t.role == "source"),
        "{:?}",
        status.topics
    );
    assert!(
        p.finalizers()
            .iter()
            .any(|f| f == "keystone.dev/delete-topics")
    );

    // Workloads: one Deployment, Service and PDB per stage, owned by the Pipeline.
    let deployments: Api<Deployment> = ns.api();
    let p = wait_for(&pipelines, name, WAIT, "stages in status", |p| {
        p.status.as_ref().is_some_and(|s| s.stages.len() == 2)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let deployed = p
        .status
        .as_ref()
        .and_then(|s| s.plan_hash.clone())
        .expect("planHash");
    let cm: ConfigMap = ns
        .api()
        .get(&format!("{name}-plan-{deployed}"))
        .await
        .expect("plan ConfigMap");
    let plan: Plan =
        serde_json::from_str(&cm.data.as_ref().expect("data")["plan.json"]).expect("plan parses");
    assert_eq!(plan.stages.len(), 2);
    for stage in ["s0", "s1"] {
        let object = format!("{name}-{stage}");
        let d = deployments.get(&object).await.expect("deployment");
        assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(2));
        assert_eq!(plan_hash(&d), plan.hash());
        let owner = &d.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("Pipeline", Some(true))
        );
        assert_eq!(owner.uid, p.uid().expect("uid"));
        ns.api::<Service>().get(&object).await.expect("service");
        ns.api::<PodDisruptionBudget>()
            .get(&object)
            .await
            .expect("pdb");
    }
    let status = p.status.clone().expect("status");
    assert_eq!(status.plan_hash.as_deref(), Some(plan.hash().as_str()));
    assert_eq!(
        status.ready_stages.as_deref().map(|s| s.ends_with("/2")),
        Some(true)
    );
    let runtime = condition(&p, "RuntimeReady").expect("RuntimeReady");
    assert!(
        runtime.message.contains("s0") || runtime.status == "True",
        "{runtime:?}"
    );

    // A spec change that changes the plan rolls the pods (a new template hash).
    let before = plan_hash(
        &deployments
            .get(&format!("{name}-s0"))
            .await
            .expect("deployment"),
    );
    let patch = json!({"spec": {"commitInterval": "2s"}});
    pipelines
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch");
    let s0 = format!("{name}-s0");
    wait_for(
        &deployments,
        &s0,
        WAIT,
        "a new plan hash on the pod template",
        |d| {
            let h = plan_hash(d);
            !h.is_empty() && h != before
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // Raising partitions raises them (the sink's, in Kafka).
    let patch = json!({"spec": {"sinks": [{"name": "out", "kafka": {"topic": sink, "partitions": 5, "config": {"retention.ms": "3600000"}}}]}});
    pipelines
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("raise partitions");
    kafka
        .wait_partitions(&sink, "raised to 5", |p| p == Some(5))
        .await;
    wait_for_event(&client, Some(ns.name()), name, &["PartitionsRaised"], WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Lowering them: the API server accepts the spec (so that a GitOps sync of
    // an older value succeeds), the topic keeps its partitions, and the
    // pipeline says so and what to do.
    let patch =
        json!({"spec": {"sinks": [{"name": "out", "kafka": {"topic": sink, "partitions": 4}}]}});
    pipelines
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("a lower partition count is accepted by the API server");
    let p = wait_for(
        &pipelines,
        name,
        WAIT,
        "TopicsReady=False PartitionDecreaseRefused for the spec's 4",
        |p| {
            condition(p, "TopicsReady").is_some_and(|c| {
                c.status == "False"
                    && c.reason == "PartitionDecreaseRefused"
                    && c.message.contains("asks for 4")
            })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let c = condition(&p, "TopicsReady").expect("condition");
    assert!(
        c.message.contains("5 partitions")
            && c.message
                .contains("set partitions to 5 or more in the spec"),
        "{}",
        c.message
    );
    assert_eq!(
        kafka.partitions(&sink),
        Some(5),
        "the topic keeps its partitions"
    );
    kafka.raise_partitions(&sink, 7).await;
    nudge(&pipelines, name, 1).await;
    let p = wait_for(
        &pipelines,
        name,
        WAIT,
        "TopicsReady=False PartitionDecreaseRefused for the topic's 7",
        |p| {
            condition(p, "TopicsReady").is_some_and(|c| {
                c.status == "False"
                    && c.reason == "PartitionDecreaseRefused"
                    && c.message.contains("7 partitions")
            })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let c = condition(&p, "TopicsReady").expect("condition");
    assert!(
        c.message.contains("7 partitions") && c.message.contains(&sink),
        "{}",
        c.message
    );
    assert_eq!(
        kafka.partitions(&sink),
        Some(7),
        "the operator never removes partitions"
    );
    // Restore agreement so the rest of the test starts clean.
    let patch = json!({"spec": {"sinks": [{"name": "out", "kafka": {"topic": sink, "partitions": 7, "config": {"retention.ms": "3600000"}}}]}});
    pipelines
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("agree on 7");
    wait_condition(&pipelines, name, "TopicsReady", "True").await;

    // Config drift is corrected and reported.
    kafka
        .set_config(&sink, &[("retention.ms", "1000"), ("segment.ms", "600000")])
        .await;
    nudge(&pipelines, name, 2).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let config = kafka.dynamic_config(&sink).await;
        if config.get("retention.ms").map(String::as_str) == Some("3600000")
            && !config.contains_key("segment.ms")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "drift not corrected: {config:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_for_event(&client, Some(ns.name()), name, &["TopicConfigDrift"], WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // An invalid contract: ContractsValid=False with the checker's message, a
    // Warning event, and the running version untouched.
    let running_hash = plan_hash(&deployments.get(&s0).await.expect("deployment"));
    let cm_before = ns
        .api::<ConfigMap>()
        .get(&format!("{name}-plan-{running_hash}"))
        .await
        .expect("cm")
        .data;
    let patch = json!({"spec": {"steps": [{"name": "per-user", "dedup": {"key": ["no_such_field"], "window": "1m"}}]}});
    pipelines
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch to an invalid contract");
    let p = wait_condition(&pipelines, name, "ContractsValid", "False").await;
    let c = condition(&p, "ContractsValid").expect("condition");
    assert!(
        c.message.contains("spec.steps[0]") && c.message.contains("no_such_field"),
        "{}",
        c.message
    );
    assert_eq!(
        p.status.as_ref().and_then(|s| s.phase),
        Some(keystone_crds::pipeline::PipelinePhase::Invalid)
    );
    wait_for_event(
        &client,
        Some(ns.name()),
        name,
        &["Warning", "ContractsInvalid"],
        WAIT,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        plan_hash(&deployments.get(&s0).await.expect("deployment")),
        running_hash
    );
    assert_eq!(
        ns.api::<ConfigMap>()
            .get(&format!("{name}-plan-{running_hash}"))
            .await
            .expect("cm")
            .data,
        cm_before
    );

    // A plan with one stage fewer: the dropped stage's Deployment, Service
    // and budget go, the remaining stage's stay.
    let patch = json!({"spec": {"steps": [], "upgrade": {"allowStateReset": true}}});
    pipelines
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch to one stage");
    wait_for(&pipelines, name, WAIT, "one stage in status", |p| {
        p.status.as_ref().is_some_and(|s| s.stages.len() == 1)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let s1 = format!("{name}-s1");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = (
            deployments.get_opt(&s1).await.expect("get").is_some(),
            ns.api::<Service>()
                .get_opt(&s1)
                .await
                .expect("get")
                .is_some(),
            ns.api::<PodDisruptionBudget>()
                .get_opt(&s1)
                .await
                .expect("get")
                .is_some(),
        );
        if left == (false, false, false) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dropped stage's (Deployment, Service, budget) still there: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    deployments
        .get(&s0)
        .await
        .expect("the kept stage's Deployment");
    ns.api::<Service>()
        .get(&s0)
        .await
        .expect("the kept stage's Service");

    // Delete: the topics the pipeline created go, the source stays.
    pipelines
        .delete(name, &Default::default())
        .await
        .expect("delete pipeline");
    wait_for_deletion(&pipelines, name, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for topic in [&sink, &dlq, &repartition, &changelog] {
        kafka
            .wait_partitions(topic, "deleted", |p| p.is_none())
            .await;
    }
    assert_eq!(
        kafka.partitions(&source),
        Some(2),
        "the source is never deleted"
    );
    ns.delete().await.expect("delete namespace");
}

#[tokio::test]
async fn retain_keeps_topics_and_the_namespace_goes() {
    let tb = testbed().await;
    install_crds(&tb);
    let ns = pipeline_namespace(&tb, "op-retain").await;
    let ns_name = ns.name().to_owned();
    let op_ns = operator_namespace(&tb, &ns).await;
    let _operator = OperatorProcess::start(&tb, &ns_name, op_ns.name(), "op-r");
    let kafka = Kafka::new(&tb);
    let source = unique("e2e.retain");
    let sink = format!("{source}.out");
    kafka.create(&source, 1).await;
    apply_yaml(
        &tb,
        &pipeline_yaml(&ns_name, "keep", &source, &sink, 2, "Retain"),
    )
    .await;
    let pipelines: Api<Pipeline> = ns.api();
    let p = wait_condition(&pipelines, "keep", "TopicsReady", "True").await;
    assert!(
        p.finalizers().is_empty(),
        "Retain pipelines carry no finalizer: {:?}",
        p.finalizers()
    );
    // A Delete pipeline in the same namespace: its finalizer must not hold the namespace.
    let sink2 = format!("{source}.gone");
    apply_yaml(
        &tb,
        &pipeline_yaml(&ns_name, "drop", &source, &sink2, 1, "Delete"),
    )
    .await;
    wait_condition(&pipelines, "drop", "TopicsReady", "True").await;

    // Deleting the namespace (with the pipelines in it) never hangs; Retain topics stay.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> =
        Api::all(tb.client().expect("client"));
    ns.delete().await.expect("delete namespace");
    wait_for_deletion(&namespaces, &ns_name, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(kafka.partitions(&sink), Some(2));
    assert!(kafka.exists(&format!("keystone.{ns_name}.keep.dlq")));
    assert_eq!(
        kafka.partitions(&sink2),
        None,
        "the Delete pipeline's topics went with it"
    );
    assert!(!kafka.exists(&format!("keystone.{ns_name}.drop.dlq")));
}

#[tokio::test]
async fn another_pipelines_topic_is_a_conflict_and_a_missing_source_is_reported() {
    let tb = testbed().await;
    install_crds(&tb);
    let ns = pipeline_namespace(&tb, "op-conflict").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let _operator = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "op-c");
    let kafka = Kafka::new(&tb);
    let source = unique("e2e.conflict");
    let sink = format!("{source}.shared");
    let pipelines: Api<Pipeline> = ns.api();

    // The source does not exist yet: TopicsReady=False naming it, nothing deployed.
    apply_yaml(
        &tb,
        &pipeline_yaml(ns.name(), "first", &source, &sink, 1, "Delete"),
    )
    .await;
    let p = wait_condition(&pipelines, "first", "TopicsReady", "False").await;
    let c = condition(&p, "TopicsReady").expect("condition");
    assert_eq!(c.reason, "TopicMissing");
    assert!(c.message.contains(&source), "{}", c.message);
    assert!(
        ns.api::<Deployment>()
            .get_opt("first-s0")
            .await
            .expect("get")
            .is_none()
    );

    kafka.create(&source, 1).await;
    nudge(&pipelines, "first", 1).await;
    wait_condition(&pipelines, "first", "TopicsReady", "True").await;

    apply_yaml(
        &tb,
        &pipeline_yaml(ns.name(), "second", &source, &sink, 1, "Delete"),
    )
    .await;
    let p = wait_for(&pipelines, "second", WAIT, "TopicConflict", |p| {
        condition(p, "TopicsReady").is_some_and(|c| c.reason == "TopicConflict")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let c = condition(&p, "TopicsReady").expect("condition");
    assert!(
        c.message.contains(&format!("{}/first", ns.name())),
        "{}",
        c.message
    );
    assert!(
        ns.api::<Deployment>()
            .get_opt("second-s0")
            .await
            .expect("get")
            .is_none()
    );

    // Deleting the second never deletes the first's topic.
    pipelines
        .delete("second", &Default::default())
        .await
        .expect("delete");
    wait_for_deletion(&pipelines, "second", WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(kafka.partitions(&sink), Some(1));
    pipelines
        .delete("first", &Default::default())
        .await
        .expect("delete");
    wait_for_deletion(&pipelines, "first", WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    kafka
        .wait_partitions(&sink, "deleted with its owner", |p| p.is_none())
        .await;
    ns.delete().await.expect("delete namespace");
}
