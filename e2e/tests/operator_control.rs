//! The control plane between the operator and the runtime pods, against real
//! pods in a namespace that enforces Pod Security "restricted":
//!
//! - a Pipeline deleted (`Retain`) and created again under the same name starts
//!   with empty state instead of the old one's dedup and order state (the old
//!   one's committed offsets included), and says so; created with
//!   `keystone.dev/adopt-state-from: <uid>` it continues from that state;
//! - `POST /checkpoint` on a pod needs the operator's token (no token: 401, a
//!   wrong one: 403), and the operator's own checkpoints still succeed;
//! - a pod that accepts connections and never answers holds no reconcile,
//!   whether a manual checkpoint or a suspend's asks it.
//!
//! Needs `cargo build -p keystone-operator -p keystone-runtime`.

mod operator_support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use keystone_crds::Pipeline;
use keystone_crds::pipeline::PipelinePhase;
use keystone_e2e::{wait_for, wait_until};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use operator_support::*;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

const NAME: &str = "orders";
const KEYS: u64 = 8;

fn manifest(ns: &str, source: &str, sink: &str, annotations: &str) -> String {
    format!(
        r#"apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata:
  name: {NAME}
  namespace: {ns}
{annotations}spec:
  source:
    topic: {source}
    key: [order_id]
    schema:
      fields:
        - {{name: event_id, type: string}}
        - {{name: order_id, type: string}}
        - {{name: seq, type: integer}}
  steps:
    - name: once
      dedup: {{key: [order_id, event_id], window: 1h}}
    - name: in-order
      order: {{key: [order_id], sequence: seq, maxDelay: 1s, maxBuffered: 1000, onStale: Drop}}
  commitInterval: 200ms
  topicDeletionPolicy: Retain
  sinks:
    - name: out
      kafka:
        topic: {sink}
        partitions: 2
"#
    )
}

/// Events `seqs` of every order (`order-0` .. `order-7`), in sequence order.
async fn produce(bootstrap: &str, topic: &str, seqs: std::ops::RangeInclusive<u64>) -> usize {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let mut sent = 0;
    for seq in seqs {
        for key in 0..KEYS {
            let order = format!("order-{key}");
            let value =
                json!({"event_id": format!("{order}-{seq}"), "order_id": order, "seq": seq})
                    .to_string();
            producer
                .send(
                    FutureRecord::to(topic).key(&order).payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
            sent += 1;
        }
    }
    sent
}

/// The committed records of `topic` as (order, seq), once there are at least
/// `expected` and nothing more arrived for a few seconds (120 s at most).
fn read_all(bootstrap: &str, topic: &str, expected: usize) -> Vec<(String, u64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("e2e-control-reader"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut quiet_since = std::time::Instant::now();
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                let value: serde_json::Value =
                    serde_json::from_slice(message.payload().unwrap_or_default()).expect("JSON");
                seen.push((
                    value["order_id"].as_str().unwrap_or_default().to_owned(),
                    value["seq"].as_u64().expect("seq"),
                ));
                quiet_since = std::time::Instant::now();
            }
            Some(Err(e)) => panic!("consume {topic}: {e}"),
            None => {}
        }
        if seen.len() >= expected && quiet_since.elapsed() > Duration::from_secs(5) {
            return seen;
        }
        if std::time::Instant::now() > deadline {
            return seen;
        }
    }
}

/// Each order's sequences as the sink holds them (an order is in one
/// partition, so in the order it was written).
fn assert_per_order(seen: &[(String, u64)], expected: &[u64]) {
    for key in 0..KEYS {
        let order = format!("order-{key}");
        let seqs: Vec<u64> = seen
            .iter()
            .filter(|(o, _)| *o == order)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(
            seqs, expected,
            "{order}: each incarnation's output once, in order"
        );
    }
}

fn state_origin(p: &Pipeline) -> Option<(String, String, String)> {
    condition(p, "StateOrigin").map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn delete_and_wait_gone(tb_ns: &keystone_e2e::TestNamespace, operator: &OperatorProcess) {
    let pipelines: Api<Pipeline> = tb_ns.api();
    pipelines
        .delete(NAME, &DeleteParams::foreground())
        .await
        .expect("delete the pipeline");
    let pods: Api<Pod> = tb_ns.api();
    wait_until(
        Duration::from_secs(120),
        "the pipeline and its pods are gone",
        || async {
            let pipeline_gone = pipelines.get_opt(NAME).await.ok().flatten().is_none();
            let pods_left = pods
                .list(&ListParams::default().labels(&format!("keystone.dev/pipeline={NAME}")))
                .await
                .map(|l| l.items.len())
                .unwrap_or(1);
            (pipeline_gone && pods_left == 0).then_some(())
        },
        || async { "the pipeline or some of its pods are still there".to_owned() },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
}

/// A test's testbed, restricted namespace, operator and source topic.
struct Setup {
    tb: keystone_e2e::Testbed,
    ns: keystone_e2e::TestNamespace,
    _operator_ns: OperatorNamespace,
    operator: OperatorProcess,
    bootstrap: String,
    source: String,
    sink: String,
    pipelines: Api<Pipeline>,
}

impl Setup {
    async fn new(test: &str) -> Self {
        let tb = testbed().await;
        require_runtime_binary();
        install_crds(&tb);
        let ns = pipeline_namespace(&tb, test).await;
        let operator_ns = operator_namespace(&tb, &ns).await;
        let operator = OperatorProcess::start(&tb, ns.name(), operator_ns.name(), test);
        let bootstrap = tb.kafka_bootstrap_servers().expect("kafka").to_owned();
        let source = unique(&format!("e2e.{test}"));
        Kafka::new(&tb).create(&source, 2).await;
        let pipelines = ns.api();
        Self {
            sink: format!("{source}.out"),
            tb,
            ns,
            _operator_ns: operator_ns,
            operator,
            bootstrap,
            source,
            pipelines,
        }
    }

    /// Applies the pipeline (with `annotations` and `extra` spec lines) and
    /// waits until it is Ready.
    async fn apply_ready(&self, annotations: &str, extra: &str) -> Pipeline {
        let yaml = manifest(self.ns.name(), &self.source, &self.sink, annotations) + extra;
        apply_yaml(&self.tb, &yaml).await;
        wait_ready_with_runtime(&self.pipelines, NAME, &self.operator).await
    }

    /// Merge-patches the pipeline's spec; returns the new generation.
    async fn patch_spec(&self, spec: serde_json::Value) -> i64 {
        self.pipelines
            .patch(
                NAME,
                &PatchParams::default(),
                &Patch::Merge(&json!({ "spec": spec })),
            )
            .await
            .unwrap_or_else(|e| panic!("patch {spec}: {e}"))
            .metadata
            .generation
            .expect("generation")
    }

    /// Waits until the status describes `generation` (the operator reconciled it).
    async fn wait_observed(&self, generation: i64, within: Duration) -> Pipeline {
        wait_for(&self.pipelines, NAME, within, "the change observed", |p| {
            p.status
                .as_ref()
                .is_some_and(|s| s.observed_generation == Some(generation))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", self.operator.log_text()))
    }

    /// The pipeline's (first) runtime pod.
    async fn pod(&self) -> Pod {
        self.ns
            .api::<Pod>()
            .list(&ListParams::default().labels(&format!("keystone.dev/pipeline={NAME}")))
            .await
            .expect("pods")
            .items
            .into_iter()
            .next()
            .expect("a runtime pod")
    }
}

#[tokio::test]
async fn a_recreated_pipeline_starts_empty_unless_it_adopts_the_earlier_state() {
    let t = Setup::new("op-incarnation").await;
    let (tb, ns, operator, pipelines) = (&t.tb, &t.ns, &t.operator, &t.pipelines);
    let (bootstrap, source, sink) = (&t.bootstrap, &t.source, &t.sink);

    // The first incarnation processes seqs 1..=5 of every order.
    let first = t.apply_ready("", "").await;
    assert_eq!(
        state_origin(&first).map(|c| c.1),
        Some("Fresh".to_owned()),
        "{:?}",
        first.status
    );
    let first_uid = first.uid().expect("uid");
    let batch = produce(bootstrap, source, 1..=5).await;
    let seen = read_all(bootstrap, sink, batch);
    assert_eq!(
        seen.len(),
        batch,
        "the first incarnation delivers everything"
    );

    // Deleted with Retain: its changelogs and consumer groups stay. The same
    // events arrive again (a producer re-sending its snapshot), then the
    // pipeline is created again under the same name.
    delete_and_wait_gone(ns, operator).await;
    produce(bootstrap, source, 1..=5).await;
    apply_yaml(tb, &manifest(ns.name(), source, sink, "")).await;
    let second = wait_ready_with_runtime(pipelines, NAME, operator).await;
    let second_uid = second.uid().expect("uid");
    assert_ne!(second_uid, first_uid);
    let (status, reason, message) = state_origin(&second).expect("a StateOrigin condition");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "Discarded"),
        "{message}"
    );
    assert!(
        message.contains(&first_uid),
        "names the earlier incarnation: {message}"
    );
    // It runs as a new pipeline: from the beginning of the source with empty
    // state, so the first batch passes again and its re-sent copy is a
    // duplicate. (With the old state, every event was dropped as stale.)
    let seen = read_all(bootstrap, sink, 2 * batch);
    assert_eq!(
        seen.len(),
        2 * batch,
        "the second incarnation delivers each distinct event once; sink: {seen:?}"
    );
    assert_per_order(&seen, &[1, 2, 3, 4, 5, 1, 2, 3, 4, 5]);

    // A third incarnation adopts the second's state: it goes on from its
    // committed offsets with its dedup and order state, so a re-sent old event
    // is dropped and only the new ones pass.
    delete_and_wait_gone(ns, operator).await;
    let adopt = format!("  annotations:\n    keystone.dev/adopt-state-from: {second_uid}\n");
    apply_yaml(tb, &manifest(ns.name(), source, sink, &adopt)).await;
    let third = wait_ready_with_runtime(pipelines, NAME, operator).await;
    let (status, reason, message) = state_origin(&third).expect("a StateOrigin condition");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "Adopted"),
        "{message}"
    );
    assert!(message.contains(&second_uid), "{message}");
    produce(bootstrap, source, 3..=3).await;
    let new = produce(bootstrap, source, 6..=7).await;
    let seen = read_all(bootstrap, sink, 2 * batch + new);
    assert_eq!(
        seen.len(),
        2 * batch + new,
        "only the new events pass after adoption; sink: {:?}",
        &seen[(2 * batch).min(seen.len())..]
    );
    assert_per_order(&seen, &[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 6, 7]);

    // An adoption naming another incarnation is refused, not guessed.
    delete_and_wait_gone(ns, operator).await;
    let wrong =
        "  annotations:\n    keystone.dev/adopt-state-from: 00000000-0000-0000-0000-000000000000\n";
    apply_yaml(tb, &manifest(ns.name(), source, sink, wrong)).await;
    let refused = wait_for(
        pipelines,
        NAME,
        Duration::from_secs(60),
        "AdoptRefused",
        |p| state_origin(p).is_some_and(|c| c.1 == "AdoptRefused"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    let message = state_origin(&refused).expect("condition").2;
    assert!(message.contains(&third.uid().expect("uid")), "{message}");
    let pods: Api<Pod> = ns.api();
    assert!(
        pods.list(&ListParams::default().labels(&format!("keystone.dev/pipeline={NAME}")))
            .await
            .expect("pods")
            .items
            .is_empty(),
        "nothing runs while the adoption is refused"
    );

    // An operator that lost its record (or an older one that never wrote
    // it) finds the earlier state in Kafka itself: the stage's consumer group
    // still has committed offsets, so that state is discarded, and named.
    delete_and_wait_gone(ns, operator).await;
    forget_state_owner(&t).await;
    apply_yaml(tb, &manifest(ns.name(), source, sink, "")).await;
    let fourth = wait_ready_with_runtime(pipelines, NAME, operator).await;
    let (status, reason, message) = state_origin(&fourth).expect("a StateOrigin condition");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "Discarded"),
        "{message}"
    );
    let group = format!("keystone.{}.{NAME}.s0", ns.name());
    assert!(
        message.contains("deleted before its owner was recorded")
            && message.contains(&format!("consumer group {group} has committed offsets on "))
            && message.contains(&format!("partition(s) of {source}")),
        "names what it found in Kafka: {message}"
    );
}

/// Removes the operator's record of whose state the pipeline runs on, as an
/// operator that predates the record (or lost it) would have none. The record
/// is in exactly one of the shards `keystone-state-owners-NN`.
async fn forget_state_owner(t: &Setup) {
    let maps: Api<ConfigMap> =
        Api::namespaced(t.tb.client().expect("client"), t._operator_ns.name());
    let key = format!("{}.{NAME}", t.ns.name());
    let holding: Vec<String> = maps
        .list(&ListParams::default())
        .await
        .expect("the operator's ConfigMaps")
        .items
        .into_iter()
        .filter(|cm| cm.data.as_ref().is_some_and(|d| d.contains_key(&key)))
        .map(|cm| cm.name_any())
        .collect();
    assert!(
        matches!(holding.as_slice(), [one] if one.starts_with("keystone-state-owners-")),
        "one shard records {key}: {holding:?}"
    );
    maps.patch(
        &holding[0],
        &PatchParams::default(),
        &Patch::Merge(&json!({ "data": { key: null } })),
    )
    .await
    .expect("remove the record");
}

/// A POST to a runtime pod's port, as any client in the cluster could send it.
fn post(ip: &str, path: &str, authorization: Option<&str>) -> (u16, String) {
    keystone_e2e::http::request(ip, 8080, "POST", path, authorization)
}

#[tokio::test]
async fn control_endpoints_refuse_anyone_but_the_operator() {
    let t = Setup::new("op-control").await;
    let (operator, pipelines) = (&t.operator, &t.pipelines);
    let (bootstrap, source, sink) = (&t.bootstrap, &t.source, &t.sink);
    t.apply_ready("", "").await;
    let batch = produce(bootstrap, source, 1..=3).await;
    let pod = t.pod().await;
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP");
    // Any other client in the cluster: refused, and nothing stops.
    for (authorization, expected) in [
        (None, 401),
        (Some("Bearer guessed"), 403),
        (Some("Basic b3BlcmF0b3I6"), 403),
    ] {
        for path in ["/checkpoint?stop=true", "/resume"] {
            let (status, body) = post(&ip, path, authorization);
            assert_eq!(
                status, expected,
                "POST {path} with {authorization:?}: {body}"
            );
        }
    }
    assert_eq!(
        read_all(bootstrap, sink, batch).len(),
        batch,
        "the refused stop stopped nothing"
    );

    // The operator's checkpoint carries the token and succeeds.
    pipelines
        .patch(
            NAME,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"checkpointTrigger": "control-1"}})),
        )
        .await
        .expect("trigger a checkpoint");
    let done = wait_for(
        pipelines,
        NAME,
        Duration::from_secs(120),
        "a checkpoint",
        |p| p.status.as_ref().is_some_and(|s| !s.checkpoints.is_empty()),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    assert!(
        done.status
            .as_ref()
            .and_then(|s| s.last_failed_checkpoint.as_ref())
            .is_none(),
        "{:?}",
        done.status
    );
    // The token is in a Secret the Pipeline owns, never in the pod spec.
    let spec = serde_json::to_string(&pod.spec).expect("pod spec");
    assert!(spec.contains(&format!("{NAME}-control")), "{spec}");
    assert!(!spec.contains("Bearer"), "{spec}");
}

#[tokio::test]
async fn a_pod_that_accepts_and_never_answers_holds_no_reconcile() {
    let t = Setup::new("op-hang").await;
    let (operator, pipelines) = (&t.operator, &t.pipelines);
    t.apply_ready("", "  checkpointInterval: 1h\n").await;

    // The stage's one instance hangs.
    let pod = t.pod().await;
    let frozen = Frozen::freeze(&t.tb, &pod);

    // A manual checkpoint: the operator asks the hung pod and waits for up to
    // its request timeout. Meanwhile another change of the same pipeline is
    // reconciled and recorded.
    t.patch_spec(json!({"checkpointTrigger": "hang-1"})).await;
    let generation = t
        .patch_spec(json!({"upgrade": {"healthWindow": "7s"}}))
        .await;
    let seen = t.wait_observed(generation, Duration::from_secs(60)).await;
    let status = seen.status.clone().unwrap_or_default();
    assert!(
        status.last_failed_checkpoint.is_none() && status.checkpoints.is_empty(),
        "the change was recorded while the checkpoint still waited on the hung pod: {status:?}"
    );

    // The checkpoint fails, naming the pod: on the bounded request timeout, or
    // earlier when the kubelet restarts the hung pod (its /healthz stops
    // answering too) and the connection is reset.
    let failed = wait_for(
        pipelines,
        NAME,
        Duration::from_secs(150),
        "the checkpoint failed",
        |p| {
            p.status
                .as_ref()
                .is_some_and(|s| s.last_failed_checkpoint.is_some())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    let status = failed.status.unwrap_or_default();
    assert_eq!(status.last_checkpoint_trigger.as_deref(), Some("hang-1"));
    let reason = status
        .last_failed_checkpoint
        .and_then(|c| c.reason)
        .unwrap_or_default();
    let pod_name = pod.name_any();
    assert!(
        reason.contains(&pod_name) && reason.contains("POST"),
        "the failure names the pod that did not answer: {reason}"
    );
    drop(frozen);
}

#[tokio::test]
async fn a_suspend_waits_for_a_hung_pod_in_the_background() {
    let t = Setup::new("op-hang-suspend").await;
    let (operator, pipelines) = (&t.operator, &t.pipelines);
    t.apply_ready("", "  checkpointInterval: 1h\n").await;
    let log = || operator.log_text();

    // The suspend's checkpoint (stop at a barrier) asks the hung pod and
    // waits for its answer, outside the reconcile: the pipeline says it is
    // suspending, and a further change is reconciled meanwhile. The kubelet
    // restarts a pod whose /healthz fails 3 times 10 s apart, so the pod
    // stays frozen well below 30 s.
    let pod = t.pod().await;
    let frozen = Frozen::freeze(&t.tb, &pod);
    let generation = t.patch_spec(json!({"state": "Suspended"})).await;
    let suspending = wait_for(
        pipelines,
        NAME,
        Duration::from_secs(10),
        "the suspend's checkpoint waiting on the hung pod",
        |p| {
            p.status
                .as_ref()
                .is_some_and(|s| s.observed_generation == Some(generation))
                && condition(p, "SpecApplied").is_some_and(|c| c.reason == "Suspending")
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", log()));
    assert_ne!(
        suspending.status.as_ref().and_then(|s| s.phase),
        Some(PipelinePhase::Suspended),
        "suspended before the checkpoint was taken"
    );
    let generation = t
        .patch_spec(json!({"upgrade": {"healthWindow": "7s"}}))
        .await;
    let seen = t.wait_observed(generation, Duration::from_secs(10)).await;
    let status = seen.status.clone().unwrap_or_default();
    assert!(
        status.last_checkpoint.is_none() && status.last_failed_checkpoint.is_none(),
        "the checkpoint did not wait for the hung pod: {status:?}"
    );
    assert_ne!(status.phase, Some(PipelinePhase::Suspended));

    // The pod answers the request it holds: the checkpoint completes, and the
    // reconcile that collects it scales the stage to zero.
    drop(frozen);
    let done = wait_for(pipelines, NAME, Duration::from_secs(90), "suspended", |p| {
        p.status.as_ref().and_then(|s| s.phase) == Some(PipelinePhase::Suspended)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", log()));
    let last = done
        .status
        .as_ref()
        .and_then(|s| s.last_checkpoint.clone())
        .expect("the suspend's checkpoint is recorded");
    assert_eq!(last.trigger.as_deref(), Some("Suspend"), "{last:?}");
    let deployments: Api<Deployment> = t.ns.api();
    let selector = format!("keystone.dev/pipeline={NAME}");
    wait_until(
        Duration::from_secs(60),
        "the stage scaled to zero",
        || async {
            deployments
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()
                .filter(|l| {
                    !l.items.is_empty()
                        && l.items
                            .iter()
                            .all(|d| d.spec.as_ref().and_then(|s| s.replicas) == Some(0))
                })
        },
        || async { log() },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}
