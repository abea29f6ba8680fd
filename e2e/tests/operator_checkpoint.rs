//! Operator-driven checkpoints against real runtime pods: a two-stage pipeline
//! (a repartition before a keyed dedup) with two partitions and two instances
//! per stage runs under a steady input. A manual trigger yields a checkpoint in
//! status and a ConfigMap whose offsets cover both partitions and lie between
//! the consumer group's committed offsets before and after; periodic
//! checkpoints accumulate and retention prunes status and ConfigMaps alike; a
//! checkpoint that cannot be taken (a stage pod that is not Ready) is reported
//! with its reason and never listed, and the next one succeeds once it is gone.
//!
//! Needs `cargo build -p keystone-operator -p keystone-runtime`.

mod operator_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use keystone_crds::Pipeline;
use keystone_crds::checkpoint::{CheckpointTrigger, PipelineCheckpoint};
use keystone_crds::plan::Plan;
use keystone_e2e::{wait_for, wait_until};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use operator_support::*;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const NAME: &str = "clicks";

/// The consumer group's committed offsets of the topic's partitions 0 and 1.
async fn committed(bootstrap: &str, group: &str, topic: &str) -> BTreeMap<i32, i64> {
    let (bootstrap, group, topic) = (bootstrap.to_owned(), group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for partition in 0..2 {
            tpl.add_partition(&topic, partition);
        }
        let offsets = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        offsets
            .elements()
            .iter()
            .map(|e| {
                let offset = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => 0,
                };
                (e.partition(), offset)
            })
            .collect()
    })
    .await
    .expect("committed offsets task")
}

async fn checkpoint_config_maps(api: &Api<ConfigMap>) -> Vec<String> {
    let mut ids: Vec<String> = api
        .list(&ListParams::default().labels(&format!(
            "keystone.dev/pipeline={NAME},keystone.dev/checkpoint"
        )))
        .await
        .expect("list checkpoint ConfigMaps")
        .items
        .into_iter()
        .filter_map(|c| c.metadata.labels?.get("keystone.dev/checkpoint").cloned())
        .collect();
    ids.sort();
    ids
}

fn listed(p: &Pipeline) -> Vec<String> {
    p.status
        .iter()
        .flat_map(|s| &s.checkpoints)
        .map(|c| c.id.clone())
        .collect()
}

/// Waits a minute at most for the Pipeline to satisfy `check`.
async fn wait_pipeline(
    api: &Api<Pipeline>,
    operator: &OperatorProcess,
    what: &str,
    check: impl Fn(&Pipeline) -> bool,
) -> Pipeline {
    wait_for(api, NAME, Duration::from_secs(60), what, check)
        .await
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()))
}

async fn patch_spec(api: &Api<Pipeline>, spec: serde_json::Value) {
    api.patch(
        NAME,
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({ "spec": spec })),
    )
    .await
    .expect("patch the pipeline");
}

#[tokio::test]
async fn checkpoints_on_demand_periodically_with_retention_and_failures() {
    let tb = testbed().await;
    require_runtime_binary();
    install_crds(&tb);
    let ns = pipeline_namespace(&tb, "op-ckpt").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let operator = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "op-ckpt");
    let kafka = Kafka::new(&tb);
    let bootstrap = tb.kafka_bootstrap_servers().expect("kafka").to_owned();
    let source = unique("e2e.ckpt");
    let sink = format!("{source}.out");
    kafka.create(&source, 2).await;
    // Two stages: the dedup by user needs a repartition of the session-keyed source.
    let manifest = pipeline_yaml(ns.name(), NAME, &source, &sink, 2, "Delete")
        + "  commitInterval: 200ms\n  checkpointInterval: 4s\n  checkpointRetention: 10\n";
    apply_yaml(&tb, &manifest).await;
    let pipelines: Api<Pipeline> = ns.api();
    let p = wait_ready_with_runtime(&pipelines, NAME, &operator).await;
    let plan_hash = p
        .status
        .as_ref()
        .and_then(|s| s.plan_hash.clone())
        .expect("plan hash");
    let config_maps: Api<ConfigMap> = ns.api();
    let plan_cm = config_maps
        .get(&format!("{NAME}-plan-{plan_hash}"))
        .await
        .expect("plan ConfigMap");
    let plan: Plan = serde_json::from_str(&plan_cm.data.expect("data")["plan.json"]).expect("plan");
    assert_eq!(plan.stages.len(), 2, "a repartition before the dedup");
    let group = plan.stages[0].consumer_group.clone();

    // Steady input on both partitions until the test ends.
    let producing = Arc::new(AtomicBool::new(true));
    let producer_task = {
        let producing = producing.clone();
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("linger.ms", "5")
            .create()
            .expect("producer");
        let source = source.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while producing.load(Ordering::Relaxed) {
                let key = format!("s{}", i % 8);
                let value = format!(
                    r#"{{"session_id":"{key}","user":"u{}","action":"a{i}"}}"#,
                    i % 16
                );
                producer
                    .send(
                        FutureRecord::to(&source).key(&key).payload(&value),
                        Duration::from_secs(10),
                    )
                    .await
                    .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            i
        })
    };
    // Both partitions have been consumed and committed at least once.
    wait_until(
        Duration::from_secs(60),
        "the first stage commits offsets on both partitions",
        || async {
            let offsets = committed(&bootstrap, &group, &source).await;
            offsets.values().all(|o| *o > 0).then_some(())
        },
        || async { format!("{:?}", committed(&bootstrap, &group, &source).await) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // A manual trigger: a checkpoint between the committed offsets before and after.
    let before = committed(&bootstrap, &group, &source).await;
    patch_spec(
        &pipelines,
        serde_json::json!({"checkpointTrigger": "first"}),
    )
    .await;
    let p = wait_pipeline(&pipelines, &operator, "the manual trigger handled", |p| {
        p.status
            .as_ref()
            .is_some_and(|s| s.last_checkpoint_trigger.as_deref() == Some("first"))
    })
    .await;
    let after = committed(&bootstrap, &group, &source).await;
    let status = p.status.clone().expect("status");
    let manual = status
        .checkpoints
        .iter()
        .rev()
        .find(|c| c.trigger.as_deref() == Some("Manual"))
        .unwrap_or_else(|| {
            panic!(
                "no manual checkpoint listed; last failure: {:?}",
                status.last_failed_checkpoint
            )
        })
        .clone();
    assert_eq!(manual.plan_hash.as_deref(), Some(plan_hash.as_str()));
    assert!(manual.reason.is_none());
    let cm = config_maps
        .get(&format!("{NAME}-checkpoint-{}", manual.id))
        .await
        .expect("the checkpoint's ConfigMap");
    assert_eq!(
        cm.metadata.labels.as_ref().expect("labels")["keystone.dev/checkpoint"],
        manual.id
    );
    assert!(
        cm.metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.kind == "Pipeline" && o.name == NAME),
        "owned by the Pipeline"
    );
    let checkpoint: PipelineCheckpoint =
        serde_json::from_str(&cm.data.expect("data")["checkpoint.json"]).expect("checkpoint.json");
    assert_eq!(checkpoint.id, manual.id);
    assert_eq!(checkpoint.trigger, CheckpointTrigger::Manual);
    assert_eq!(checkpoint.plan_hash, plan_hash);
    let names: Vec<&str> = checkpoint.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["s0", "s1"], "stages in plan order");
    let first = &checkpoint.stages[0];
    assert_eq!(first.input_topic, source);
    assert_eq!(
        first.source_offsets.keys().copied().collect::<Vec<_>>(),
        [0, 1],
        "both source partitions: {checkpoint:?}"
    );
    for partition in [0, 1] {
        let at = first.source_offsets[&partition];
        assert!(
            before[&partition] <= at && at <= after[&partition],
            "partition {partition}: committed {} before, checkpoint {at}, committed {} after",
            before[&partition],
            after[&partition]
        );
    }
    assert_eq!(
        checkpoint.stages[1].source_offsets.len(),
        2,
        "both repartition partitions: {checkpoint:?}"
    );
    assert!(
        checkpoint
            .sink_positions
            .get(&sink)
            .is_some_and(|p| p.len() == 2),
        "the sink's end offsets: {:?}",
        checkpoint.sink_positions
    );

    // Periodic checkpoints accumulate; a lower retention prunes status and ConfigMaps.
    let p = wait_pipeline(
        &pipelines,
        &operator,
        "three periodic checkpoints after the manual one",
        |p| {
            p.status.as_ref().is_some_and(|s| {
                s.checkpoints
                    .iter()
                    .filter(|c| c.id > manual.id && c.trigger.as_deref() == Some("Periodic"))
                    .count()
                    >= 3
            })
        },
    )
    .await;
    assert!(listed(&p).len() >= 4, "{:?}", listed(&p));
    patch_spec(&pipelines, serde_json::json!({"checkpointRetention": 2})).await;
    let p = wait_pipeline(&pipelines, &operator, "retention pruned to two", |p| {
        listed(p).len() == 2
    })
    .await;
    assert!(!listed(&p).contains(&manual.id));
    wait_until(
        Duration::from_secs(30),
        "the ConfigMaps are the listed checkpoints",
        || async {
            let before = pipelines.get(NAME).await.ok()?;
            let maps = checkpoint_config_maps(&config_maps).await;
            let after = pipelines.get(NAME).await.ok()?;
            (listed(&before) == listed(&after) && maps == listed(&after)).then_some(())
        },
        || async {
            format!(
                "ConfigMaps {:?}, status {:?}",
                checkpoint_config_maps(&config_maps).await,
                pipelines.get(NAME).await.map(|p| listed(&p))
            )
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // A stage pod that is not Ready: the checkpoint fails with the reason, unlisted.
    let pods: Api<Pod> = ns.api();
    let stray: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": "clicks-s1-stray",
            "labels": {"keystone.dev/pipeline": NAME, "keystone.dev/stage": "s1"},
        },
        "spec": {
            "containers": [{
                "name": "c",
                "image": "keystone/testapp:dev",
                "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "readinessProbe": {"exec": {"command": ["false"]}, "periodSeconds": 1},
                // The namespace enforces Pod Security "restricted".
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "capabilities": {"drop": ["ALL"]},
                },
            }],
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": 65532,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
        },
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &stray)
        .await
        .expect("create the stray pod");
    let p = wait_pipeline(
        &pipelines,
        &operator,
        "a failed checkpoint naming the stray pod",
        |p| {
            p.status
                .as_ref()
                .and_then(|s| s.last_failed_checkpoint.as_ref())
                .and_then(|f| f.reason.as_deref())
                .is_some_and(|r| r.contains("clicks-s1-stray"))
        },
    )
    .await;
    let status = p.status.expect("status");
    let failed = status.last_failed_checkpoint.expect("failed");
    assert!(
        failed
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with("stage s1: pod clicks-s1-stray")),
        "{failed:?}"
    );
    assert!(
        !status.checkpoints.iter().any(|c| c.id == failed.id),
        "a failed checkpoint is never listed"
    );
    pods.delete("clicks-s1-stray", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete the stray pod");
    wait_pipeline(
        &pipelines,
        &operator,
        "a successful checkpoint after the failure",
        |p| {
            p.status.as_ref().is_some_and(|s| {
                s.last_checkpoint
                    .as_ref()
                    .is_some_and(|c| c.time.0 > failed.time.0)
            })
        },
    )
    .await;

    let metrics = operator.metrics().await;
    assert!(
        metrics.lines().any(|l| l
            .starts_with("keystone_operator_checkpoints_total{result=\"failed\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(
        metrics.contains("keystone_operator_checkpoint_duration_seconds_count"),
        "{metrics}"
    );
    producing.store(false, Ordering::Relaxed);
    let produced = producer_task.await.expect("producer");
    assert!(produced > 0);
    ns.delete().await.expect("delete namespace");
}
