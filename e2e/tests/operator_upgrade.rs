//! Changing a running pipeline under continuous input, driven by the operator
//! against the real runtime pods: upgrades from a checkpoint, scaling, a
//! refused state-incompatible change and its explicit reset, an automatic
//! rollback of a failing version, suspend and resume, and a restore from a
//! named checkpoint. The sink is read `read_committed` and must hold every
//! produced event exactly once, in order per key (a restore replays on purpose).
//!
//! Needs `cargo build -p keystone-operator -p keystone-runtime`.

mod operator_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod};
use keystone_crds::Pipeline;
use keystone_crds::pipeline::{PipelinePhase, UpgradePhase};
use keystone_e2e::{TestNamespace, Testbed, wait_for};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use operator_support::*;
use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

const USERS: u64 = 8;

/// A background producer: its stop flag and its task.
type Producing = (Arc<AtomicBool>, tokio::task::JoinHandle<()>);
const LONG: Duration = Duration::from_secs(240);

/// One pipeline under test: its namespace, operator, topics and input.
struct Flow {
    tb: Testbed,
    ns: TestNamespace,
    _op_ns: OperatorNamespace,
    operator: OperatorProcess,
    source: String,
    sink: String,
    name: &'static str,
    produced: Arc<AtomicU64>,
}

impl Flow {
    async fn start(test: &str, partitions: i32, spec_extra: &str, steps: &str) -> Flow {
        Self::start_keyed(test, partitions, spec_extra, steps, "user").await
    }

    /// As `start`, with the source declared keyed by `source_key`.
    async fn start_keyed(
        test: &str,
        partitions: i32,
        spec_extra: &str,
        steps: &str,
        source_key: &str,
    ) -> Flow {
        let tb = testbed().await;
        install_crds(&tb);
        let ns = pipeline_namespace(&tb, test).await;
        let op_ns = operator_namespace(&tb, &ns).await;
        let operator = OperatorProcess::start(&tb, ns.name(), op_ns.name(), test);
        let kafka = Kafka::new(&tb);
        let source = unique(&format!("e2e.{test}"));
        let sink = format!("{source}.out");
        kafka.create(&source, partitions).await;
        let flow = Flow {
            tb,
            ns,
            _op_ns: op_ns,
            operator,
            source,
            sink,
            name: "orders",
            produced: Arc::new(AtomicU64::new(0)),
        };
        let manifest = format!(
            r#"apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata:
  name: orders
  namespace: {ns}
spec:
  source:
    topic: {source}
    key: [{source_key}]
    schema:
      fields:
        - {{name: user, type: string}}
        - {{name: seq, type: integer}}
        - {{name: action, type: string}}
  steps:
{steps}
  commitInterval: 200ms
  checkpointInterval: 1h
  topicDeletionPolicy: Delete
{spec_extra}
  sinks:
    - name: out
      kafka: {{topic: {sink}, partitions: 2}}
"#,
            ns = flow.ns.name(),
            source = flow.source,
            sink = flow.sink,
        );
        apply_yaml(&flow.tb, &manifest).await;
        flow.wait("Running and Ready", |p| {
            condition_is(p, "Ready", "True")
                && p.status.as_ref().and_then(|s| s.phase) == Some(PipelinePhase::Running)
                && p.status
                    .as_ref()
                    .and_then(|s| s.stable_plan_hash.as_ref())
                    .is_some()
        })
        .await;
        flow
    }

    fn api(&self) -> Api<Pipeline> {
        self.ns.api()
    }

    async fn wait(&self, what: &str, check: impl Fn(&Pipeline) -> bool) -> Pipeline {
        wait_for(&self.api(), self.name, LONG, what, check)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{e}\noperator log (tail):\n{}",
                    tail(&self.operator.log_text(), 60)
                )
            })
    }

    /// The change most tests upgrade with: the projection keeps `action` too.
    async fn keep_action(&self) {
        self.patch(
            json!({"spec": {"steps": [{"name": "shape", "project": {"fields": [
                {"name": "user", "from": "/user"}, {"name": "seq", "from": "/seq"},
                {"name": "action", "from": "/action"}
            ]}}]}}),
        )
        .await;
    }

    async fn patch(&self, patch: serde_json::Value) {
        self.api()
            .patch(self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("patch the pipeline");
    }

    fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set(
                "bootstrap.servers",
                self.tb.kafka_bootstrap_servers().expect("kafka"),
            )
            .set("enable.idempotence", "true")
            .create()
            .expect("producer")
    }

    /// Produces `count` more events, `per_second` of them a second, round-robin
    /// over the users with a per-user sequence continuing from what was produced.
    async fn produce(&self, count: u64, per_second: u64) {
        let producer = self.producer();
        let pause = Duration::from_micros(1_000_000 / per_second.max(1));
        for _ in 0..count {
            let n = self.produced.fetch_add(1, Ordering::SeqCst);
            let user = format!("u{}", n % USERS);
            let seq = n / USERS;
            let value = json!({"user": user, "seq": seq, "action": "buy"}).to_string();
            producer
                .send(
                    FutureRecord::to(&self.source).key(&user).payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
            tokio::time::sleep(pause).await;
        }
    }

    /// Produces events numbered `numbers` again (the same users and sequences).
    async fn resend(&self, numbers: std::ops::Range<u64>) {
        let producer = self.producer();
        for n in numbers {
            let user = format!("u{}", n % USERS);
            let value = json!({"user": user, "seq": n / USERS, "action": "buy"}).to_string();
            producer
                .send(
                    FutureRecord::to(&self.source).key(&user).payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
        }
    }

    /// Produces 100 events a second in the background, and lets a few seconds
    /// of them through before the test changes anything.
    async fn under_load(self) -> (Arc<Self>, Producing) {
        let flow = Arc::new(self);
        let producing = flow.produce_continuously(100);
        tokio::time::sleep(Duration::from_secs(3)).await;
        (flow, producing)
    }

    /// Produces in the background until the returned flag is set.
    fn produce_continuously(self: &Arc<Self>, per_second: u64) -> Producing {
        let stop = Arc::new(AtomicBool::new(false));
        let flow = self.clone();
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            while !flag.load(Ordering::SeqCst) {
                flow.produce(per_second / 5 + 1, per_second).await;
            }
        });
        (stop, task)
    }

    /// Stops the background producer after a few more seconds of input and
    /// checks the sink holds each produced event once (in order per user if `ordered`).
    async fn finish(
        &self,
        (stop, producing): Producing,
        ordered: bool,
    ) -> Vec<(String, u64, serde_json::Value)> {
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::SeqCst);
        producing.await.expect("producer");
        let seen = self.read_sink(self.produced.load(Ordering::SeqCst) as usize);
        self.assert_each_once(&seen, ordered);
        seen
    }

    /// Every committed sink record as (user, seq) in partition order, once
    /// `expected` records are there and nothing more arrives for a few seconds.
    fn read_sink(&self, expected: usize) -> Vec<(String, u64, serde_json::Value)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set(
                "bootstrap.servers",
                self.tb.kafka_bootstrap_servers().expect("kafka"),
            )
            .set("group.id", unique("e2e-reader"))
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        consumer
            .subscribe(&[self.sink.as_str()])
            .expect("subscribe");
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let mut quiet_since = std::time::Instant::now();
        loop {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    let value: serde_json::Value =
                        serde_json::from_slice(message.payload().unwrap_or_default())
                            .expect("JSON event");
                    let user = value["user"].as_str().unwrap_or_default().to_owned();
                    let seq = value["seq"].as_u64().expect("seq");
                    seen.push((user, seq, value));
                    quiet_since = std::time::Instant::now();
                }
                Some(Err(e)) => panic!("consume {}: {e}", self.sink),
                None => {}
            }
            let quiet = quiet_since.elapsed() > Duration::from_secs(4);
            if seen.len() >= expected && quiet {
                return seen;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "only {} of {expected} events reached {} within 120s\noperator log (tail):\n{}",
                seen.len(),
                self.sink,
                tail(&self.operator.log_text(), 40)
            );
        }
    }

    /// Asserts each produced event is in the sink once, in order per user.
    fn assert_exactly_once(&self, seen: &[(String, u64, serde_json::Value)]) {
        self.assert_each_once(seen, true);
    }

    /// Asserts each produced event is in the sink once; in order per user if `ordered`.
    fn assert_each_once(&self, seen: &[(String, u64, serde_json::Value)], ordered: bool) {
        let produced = self.produced.load(Ordering::SeqCst);
        let mut counts: BTreeMap<(String, u64), u32> = BTreeMap::new();
        let mut last: BTreeMap<&str, u64> = BTreeMap::new();
        for (user, seq, _) in seen {
            *counts.entry((user.clone(), *seq)).or_default() += 1;
            if let Some(previous) = last.insert(user, *seq)
                && ordered
            {
                assert!(
                    previous < *seq,
                    "{user}: seq {seq} after {previous}: out of order"
                );
            }
        }
        let duplicates: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(5).collect();
        assert!(
            duplicates.is_empty(),
            "duplicates in the sink: {duplicates:?}"
        );
        let missing: Vec<u64> = (0..produced)
            .filter(|n| !counts.contains_key(&(format!("u{}", n % USERS), n / USERS)))
            .take(10)
            .collect();
        assert!(
            missing.is_empty(),
            "events lost (numbers in production order): {missing:?}"
        );
        assert_eq!(seen.len() as u64, produced);
    }

    async fn events(&self) -> Vec<(String, String)> {
        let events: Api<Event> = self.ns.api();
        events
            .list(&ListParams::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .filter(|e| e.involved_object.name.as_deref() == Some(self.name))
            .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
            .collect()
    }

    /// The Argo CD health check of the repository, run on the live object.
    fn argo_health(&self) -> String {
        let mut get = self.tb.kubectl().expect("kubectl");
        get.args([
            "get",
            "pipeline",
            self.name,
            "-n",
            self.ns.name(),
            "-o",
            "json",
        ]);
        let object = run_ok(get);
        argo_health_of(&object)
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs config/argocd/pipeline-health.lua on a Pipeline's JSON with a real Lua.
fn argo_health_of(object_json: &str) -> String {
    let lua = mlua::Lua::new();
    let script = std::fs::read_to_string(repo().join("config/argocd/pipeline-health.lua"))
        .expect("health check script");
    let value: serde_json::Value = serde_json::from_str(object_json).expect("JSON");
    use mlua::LuaSerdeExt as _;
    lua.globals()
        .set("obj", lua.to_value(&value).expect("to Lua"))
        .expect("set obj");
    let result: mlua::Table = lua.load(&script).eval().expect("health check runs");
    result.get::<String>("status").expect("status")
}

fn upgrade_phase(p: &Pipeline) -> Option<UpgradePhase> {
    p.status.as_ref()?.upgrade.as_ref().map(|u| u.phase)
}

fn upgraded_to_stable(p: &Pipeline) -> bool {
    let generation = p.metadata.generation.unwrap_or_default();
    p.status
        .as_ref()
        .and_then(|s| s.upgrade.as_ref())
        .is_some_and(|u| u.generation == generation && u.phase == UpgradePhase::Stable)
}

const PROJECT: &str = r#"    - name: shape
      project:
        fields:
          - {name: user, from: /user}
          - {name: seq, from: /seq}"#;

#[tokio::test]
async fn an_upgrade_from_a_checkpoint_under_load_delivers_every_event_once_in_order() {
    let (flow, producer) = start_upgrade("up-ckpt").await;
    let upgrading = flow
        .wait("the upgrade under way", |p| {
            matches!(
                upgrade_phase(p),
                Some(UpgradePhase::Deploying | UpgradePhase::Observing | UpgradePhase::Stable)
            )
        })
        .await;
    let upgrade = upgrading
        .status
        .and_then(|s| s.upgrade)
        .expect("upgrade status");
    assert_eq!(upgrade.change, "Upgrade", "{upgrade:?}");
    let checkpoint = upgrade
        .checkpoint
        .clone()
        .expect("an upgrade from a fresh checkpoint names it");
    let config_maps: Api<ConfigMap> = flow.ns.api();
    assert!(
        config_maps
            .get_opt(&format!("orders-checkpoint-{checkpoint}"))
            .await
            .expect("get")
            .is_some(),
        "the rollback point is kept as a ConfigMap"
    );
    let stable = flow
        .wait("the new version stable", upgraded_to_stable)
        .await;
    let seen = flow.finish(producer, true).await;
    assert!(
        seen.last()
            .is_some_and(|(_, _, v)| v.get("action").is_some()),
        "the last events went through the new projection"
    );
    let status = stable.status.expect("status");
    assert_eq!(status.stable_plan_hash, status.plan_hash);
    assert!(
        status
            .last_stable_spec
            .as_deref()
            .is_some_and(|s| s.contains("/action"))
    );
    let reasons: Vec<String> = flow.events().await.into_iter().map(|(r, _)| r).collect();
    assert!(reasons.iter().any(|r| r == "UpgradeStarted"), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r == "UpgradeSucceeded"),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn scaling_two_four_one_under_load_loses_and_duplicates_nothing() {
    let (flow, producer) = Flow::start(
        "up-scale",
        4,
        "  parallelism: 2\n  upgrade: {healthWindow: 3s}",
        PROJECT,
    )
    .await
    .under_load()
    .await;
    let deployments: Api<Deployment> = flow.ns.api();
    for replicas in [4, 1] {
        tokio::time::sleep(Duration::from_secs(3)).await;
        flow.patch(json!({"spec": {"parallelism": replicas}})).await;
        let p = flow
            .wait(
                &format!("scaled to {replicas} and stable"),
                upgraded_to_stable,
            )
            .await;
        assert_eq!(
            p.status
                .and_then(|s| s.upgrade)
                .map(|u| u.change)
                .as_deref(),
            Some("Scale")
        );
        let d = deployments.get("orders-s0").await.expect("deployment");
        assert_eq!(d.spec.and_then(|s| s.replicas), Some(replicas));
    }
    flow.finish(producer, true).await;
}

const DEDUP: &str = r#"    - name: once
      dedup: {key: [user, seq], window: 10m}"#;

#[tokio::test]
async fn a_state_incompatible_change_is_refused_until_a_reset_is_allowed() {
    let flow = Flow::start(
        "up-state",
        1,
        "  upgrade: {healthWindow: 3s, strategy: Recreate}",
        DEDUP,
    )
    .await;
    flow.produce(40, 200).await;
    let before = flow.api().get(flow.name).await.expect("get");
    let deployed = before.status.as_ref().and_then(|s| s.plan_hash.clone());
    flow.patch(json!({"spec": {"steps": [{"name": "once", "dedup": {"key": ["user", "action", "seq"], "window": "10m"}}]}}))
        .await;
    let blocked = flow
        .wait("SpecApplied=False (StateIncompatible)", |p| {
            condition(p, "SpecApplied")
                .is_some_and(|c| c.status == "False" && c.reason == "StateIncompatible")
                && p.status.as_ref().and_then(|s| s.observed_generation) == p.metadata.generation
        })
        .await;
    let message = condition(&blocked, "SpecApplied")
        .expect("condition")
        .message
        .clone();
    assert!(message.contains("allowStateReset"), "{message}");
    assert!(
        message.contains("once"),
        "the message names the step: {message}"
    );
    let status = blocked.status.clone().expect("status");
    assert_eq!(
        status.plan_hash, deployed,
        "the previous version keeps running"
    );
    assert_eq!(status.phase, Some(PipelinePhase::Degraded));
    assert_eq!(flow.argo_health(), "Degraded");
    // Events still flow through the old version.
    flow.produce(40, 200).await;
    let seen = flow.read_sink(80);
    flow.assert_exactly_once(&seen);

    flow.patch(json!({"spec": {"upgrade": {"allowStateReset": true, "healthWindow": "3s"}}}))
        .await;
    let reset = flow
        .wait("the reset upgrade stable", upgraded_to_stable)
        .await;
    let status = reset.status.expect("status");
    let upgrade = status.upgrade.expect("upgrade");
    assert!(
        upgrade.state_reset,
        "status says the state was reset: {upgrade:?}"
    );
    assert_eq!(upgrade.change, "StateIncompatible");
    assert_eq!(
        status.last_restore.map(|r| r.reason).as_deref(),
        Some("StateReset")
    );
    flow.produce(40, 200).await;
    let seen = flow.read_sink(120);
    flow.assert_exactly_once(&seen);
}

/// A pipeline under load (two instances) whose projection has just been
/// changed to keep `action` too: an upgrade from a checkpoint is under way.
async fn start_upgrade(test: &str) -> (Arc<Flow>, Producing) {
    let (flow, producer) = start_before_upgrade(test).await;
    flow.keep_action().await;
    (flow, producer)
}

/// The pipeline [`start_upgrade`] changes, under load, before the change.
async fn start_before_upgrade(test: &str) -> (Arc<Flow>, Producing) {
    Flow::start(
        test,
        2,
        "  parallelism: 2\n  upgrade: {healthWindow: 5s}",
        PROJECT,
    )
    .await
    .under_load()
    .await
}

/// A pipeline under load whose change to a failing version has just been
/// applied; returns it with its producer and the stable plan's hash.
async fn start_failing_upgrade(test: &str) -> (Arc<Flow>, Producing, String) {
    let (flow, producer) = Flow::start(
        test,
        2,
        "  parallelism: 2\n  upgrade: {healthWindow: 20s, healthGate: {maxDeadLetterPercent: 10}}",
        PROJECT,
    )
    .await
    .under_load()
    .await;
    let stable_hash = flow
        .api()
        .get(flow.name)
        .await
        .expect("get")
        .status
        .and_then(|s| s.stable_plan_hash)
        .expect("stable plan");
    // A filter that fails on every odd event ("buy" is not a number: the checker
    // accepts int(action), which works for numeric strings)
    // and passes the even ones: the failed version delivers half of what it
    // reads, and the rollback's replay must deliver the other half only.
    flow.patch(json!({"spec": {"steps": [
        {"name": "broken", "filter": {"expression": "seq % 2 == 0 || int(action) > 1"}},
        {"name": "shape", "project": {"fields": [{"name": "user", "from": "/user"}, {"name": "seq", "from": "/seq"}]}}
    ]}}))
    .await;
    (flow, producer, stable_hash)
}

#[tokio::test]
async fn a_failing_upgrade_is_rolled_back_without_loss_or_duplicates() {
    let (flow, producer, stable_hash) = start_failing_upgrade("up-rollback").await;
    let upgrading = flow
        .wait("Upgrading", |p| {
            p.status.as_ref().and_then(|s| s.phase) == Some(PipelinePhase::Upgrading)
        })
        .await;
    assert_eq!(
        argo_health_of(&serde_json::to_string(&upgrading).unwrap()),
        "Progressing"
    );
    let rolled = flow
        .wait("rolled back", |p| {
            upgrade_phase(p) == Some(UpgradePhase::RolledBack)
        })
        .await;
    let status = rolled.status.clone().expect("status");
    assert_eq!(
        status.plan_hash.as_deref(),
        Some(stable_hash.as_str()),
        "the stable plan runs again"
    );
    assert_eq!(status.phase, Some(PipelinePhase::Degraded));
    let upgrade = status.upgrade.expect("upgrade");
    let message = upgrade.message.clone().unwrap_or_default();
    assert!(message.contains("dead-letter"), "{message}");
    assert!(upgrade.checkpoint.is_some());
    assert_eq!(
        status.last_restore.map(|r| r.reason).as_deref(),
        Some("Rollback")
    );
    let condition = condition(&rolled, "SpecApplied").expect("SpecApplied");
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("False", "RolledBack")
    );
    assert_eq!(flow.argo_health(), "Degraded");
    let reasons: Vec<String> = flow.events().await.into_iter().map(|(r, _)| r).collect();
    assert!(reasons.iter().any(|r| r == "UpgradeFailed"), "{reasons:?}");
    assert!(reasons.iter().any(|r| r == "RolledBack"), "{reasons:?}");
    // Even events the failed version delivered come before the odd ones its
    // rollback replayed, so order per user holds only outside that window.
    flow.finish(producer, false).await;
}

#[tokio::test]
async fn suspend_stops_at_a_checkpoint_and_resume_continues_there() {
    let flow = Flow::start("up-suspend", 2, "  parallelism: 2", PROJECT).await;
    flow.produce(100, 500).await;
    flow.read_sink(100);
    flow.patch(json!({"spec": {"state": "Suspended"}})).await;
    let suspended = flow
        .wait("Suspended", |p| {
            p.status.as_ref().and_then(|s| s.phase) == Some(PipelinePhase::Suspended)
        })
        .await;
    let status = suspended.status.expect("status");
    let last = status.last_checkpoint.expect("a checkpoint at suspend");
    assert_eq!(last.trigger.as_deref(), Some("Suspend"));
    let deployments: Api<Deployment> = flow.ns.api();
    let d = deployments.get("orders-s0").await.expect("deployment");
    assert_eq!(d.spec.and_then(|s| s.replicas), Some(0));
    assert_eq!(flow.argo_health(), "Suspended");
    // Input while suspended waits in the source.
    flow.produce(100, 500).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        flow.read_sink(100).len(),
        100,
        "nothing is processed while suspended"
    );
    flow.patch(json!({"spec": {"state": "Running"}})).await;
    flow.wait("Running again", |p| {
        condition_is(p, "Ready", "True")
            && p.status.as_ref().and_then(|s| s.phase) == Some(PipelinePhase::Running)
    })
    .await;
    let seen = flow.read_sink(200);
    flow.assert_exactly_once(&seen);
}

#[tokio::test]
async fn a_restore_from_an_older_named_checkpoint_replays_from_there() {
    let flow = Flow::start("up-restore", 2, "  parallelism: 2", PROJECT).await;
    flow.produce(60, 500).await;
    flow.read_sink(60);
    flow.patch(json!({"spec": {"checkpointTrigger": "before-b"}}))
        .await;
    let checkpointed = flow
        .wait("the manual checkpoint", |p| {
            p.status.as_ref().is_some_and(|s| {
                s.last_checkpoint_trigger.as_deref() == Some("before-b")
                    && s.last_checkpoint.is_some()
            })
        })
        .await;
    let older = checkpointed
        .status
        .and_then(|s| s.last_checkpoint)
        .expect("checkpoint")
        .id;
    flow.produce(40, 500).await;
    flow.read_sink(100);
    flow.patch(json!({"spec": {"restore": {"checkpoint": older}}}))
        .await;
    let restored = flow
        .wait("restored and Ready", |p| {
            p.status
                .as_ref()
                .and_then(|s| s.last_restore.as_ref())
                .is_some_and(|r| r.checkpoint.as_deref() == Some(older.as_str()))
                && condition_is(p, "Ready", "True")
        })
        .await;
    let restore = restored
        .status
        .and_then(|s| s.last_restore)
        .expect("last restore");
    assert_eq!(restore.reason, "Requested");
    // The 40 events after the checkpoint are processed again; the 60 before are not.
    let seen = flow.read_sink(140);
    let mut counts: BTreeMap<(String, u64), u32> = BTreeMap::new();
    for (user, seq, _) in &seen {
        *counts.entry((user.clone(), *seq)).or_default() += 1;
    }
    for n in 0..100u64 {
        let times = counts
            .get(&(format!("u{}", n % USERS), n / USERS))
            .copied()
            .unwrap_or(0);
        let expected = if n < 60 { 1 } else { 2 };
        assert_eq!(times, expected, "event {n} is in the sink {times} time(s)");
    }
    // The request is carried out once: later reconciles (another spec change
    // here) leave the restore alone, and nothing is replayed again.
    flow.patch(json!({"spec": {"checkpointTrigger": "after-restore"}}))
        .await;
    let later = flow
        .wait("the next manual checkpoint", |p| {
            p.status
                .as_ref()
                .is_some_and(|s| s.last_checkpoint_trigger.as_deref() == Some("after-restore"))
        })
        .await;
    assert_eq!(
        later.status.and_then(|s| s.last_restore).map(|r| r.id),
        Some(restore.id)
    );
    assert_eq!(flow.read_sink(140).len(), 140);
}

#[tokio::test]
async fn a_two_stage_pipeline_is_rolled_back_without_loss_or_duplicates() {
    // Declared keyed by `action`, deduplicated by (user, seq): the dedup runs in
    // a second stage behind a repartition topic.
    let steps = r#"    - name: once
      dedup: {key: [user, seq], window: 10m}"#;
    let (flow, producer) = Flow::start_keyed(
        "up-rollback2",
        2,
        "  parallelism: 2\n  upgrade: {healthWindow: 20s, healthGate: {maxDeadLetterPercent: 10}}",
        steps,
        "action",
    )
    .await
    .under_load()
    .await;
    let first = flow.api().get(flow.name).await.expect("get");
    assert!(
        first.status.as_ref().is_some_and(|s| s.stages.len() == 2),
        "two stages: {:?}",
        first.status.map(|s| s.stages)
    );
    flow.patch(json!({"spec": {"steps": [
        {"name": "broken", "filter": {"expression": "seq % 2 == 0 || int(action) > 1"}},
        {"name": "once", "dedup": {"key": ["user", "seq"], "window": "10m"}}
    ]}}))
    .await;
    let rolled = flow
        .wait("rolled back", |p| {
            upgrade_phase(p) == Some(UpgradePhase::RolledBack)
        })
        .await;
    assert_eq!(
        rolled
            .status
            .and_then(|s| s.last_restore)
            .map(|r| r.reason)
            .as_deref(),
        Some("Rollback")
    );
    flow.finish(producer, false).await;
}

#[tokio::test]
async fn a_stateless_upgrade_drops_state_and_goes_on_from_the_committed_offsets() {
    let flow = Flow::start(
        "up-stateless",
        1,
        "  upgrade: {healthWindow: 3s, mode: Stateless}",
        DEDUP,
    )
    .await;
    flow.produce(40, 200).await;
    flow.read_sink(40);
    // Sent again before the upgrade: the dedup state drops them (given a few
    // commit intervals to be processed and committed before the stop).
    flow.resend(0..40).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    flow.patch(json!({"spec": {"steps": [{"name": "once", "dedup": {"key": ["user", "seq"], "window": "20m"}}]}}))
        .await;
    let stable = flow
        .wait("the stateless upgrade stable", upgraded_to_stable)
        .await;
    let status = stable.status.expect("status");
    let upgrade = status.upgrade.expect("upgrade");
    assert_eq!(upgrade.change, "Upgrade");
    assert!(upgrade.state_reset, "{upgrade:?}");
    assert_eq!(
        status.last_restore.map(|r| r.reason).as_deref(),
        Some("Stateless")
    );
    // After it, with the state dropped, the same events pass once more; nothing
    // before the committed offsets is read again.
    flow.resend(0..40).await;
    let seen = flow.read_sink(80);
    assert_eq!(seen.len(), 80, "40 before, 40 after the state was dropped");
    let mut counts: BTreeMap<(String, u64), u32> = BTreeMap::new();
    for (user, seq, _) in &seen {
        *counts.entry((user.clone(), *seq)).or_default() += 1;
    }
    assert!(counts.values().all(|n| *n == 2), "{counts:?}");
}

#[tokio::test]
async fn a_runtime_that_crashes_is_rolled_back_without_loss_or_duplicates() {
    let (flow, producer) = Flow::start(
        "up-crash",
        2,
        "  parallelism: 2\n  upgrade: {healthWindow: 10s, healthGate: {maxRestarts: 1}}",
        PROJECT,
    )
    .await
    .under_load()
    .await;
    // The process kubelet runs this image as the test app, which refuses the
    // runtime's arguments and exits: a crash loop.
    flow.patch(json!({"spec": {"runtimeImage": "keystone/testapp:crash"}}))
        .await;
    let rolled = flow
        .wait("rolled back", |p| {
            upgrade_phase(p) == Some(UpgradePhase::RolledBack)
        })
        .await;
    let upgrade = rolled.status.and_then(|s| s.upgrade).expect("upgrade");
    let message = upgrade.message.unwrap_or_default();
    assert!(message.contains("restart"), "{message}");
    assert!(
        upgrade.reasons.iter().any(|r| r.contains("runtime image")),
        "{:?}",
        upgrade.reasons
    );
    let deployments: Api<Deployment> = flow.ns.api();
    let image = deployments
        .get("orders-s0")
        .await
        .expect("deployment")
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.containers.first().and_then(|c| c.image.clone()));
    assert_eq!(
        image.as_deref(),
        Some("keystone/runtime:e2e"),
        "the stable image runs again"
    );
    flow.finish(producer, true).await;
}

// ---------------------------------------------------------------------------
// The operator SIGKILLed in the middle of a change
// ---------------------------------------------------------------------------

/// Resolves once `at` holds for a version of the flow's Pipeline, seen by a
/// watch that is in place when this returns (start it before the change that
/// leads there): a state shorter than a poll, such as the checkpoint of a
/// stage that commits every 200 ms, is still seen.
async fn watch_until<F: Fn(&Pipeline) -> bool + Send + 'static>(
    flow: &Flow,
    at: F,
) -> impl std::future::Future<Output = ()> + use<F> {
    let config = watcher::Config::default().fields(&format!("metadata.name={}", flow.name));
    let mut versions = watcher(flow.api(), config).applied_objects().boxed();
    // The first version: listed, and the watch goes on from it.
    let first = versions.next().await;
    async move {
        if let Some(Ok(p)) = &first
            && at(p)
        {
            return;
        }
        while let Some(version) = versions.next().await {
            if let Ok(p) = version
                && at(&p)
            {
                return;
            }
        }
    }
}

/// Kills the flow's operator (SIGKILL) once `reached` (a [`watch_until`])
/// resolves, after a further random delay below `jitter`, and starts a
/// successor; returns it and the upgrade phase the pipeline was in at the kill.
async fn kill_operator_when(
    flow: &Flow,
    reached: impl std::future::Future<Output = ()>,
    jitter: Duration,
    seed: u64,
) -> (OperatorProcess, Option<UpgradePhase>) {
    if tokio::time::timeout(LONG, reached).await.is_err() {
        panic!(
            "timed out after {LONG:?} waiting for the point to kill the operator at\noperator log (tail):\n{}",
            tail(&flow.operator.log_text(), 60)
        );
    }
    let mut rng = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    rng ^= rng >> 29;
    let delay = Duration::from_millis(rng % jitter.as_millis().max(1) as u64);
    tokio::time::sleep(delay).await;
    flow.operator.sigkill();
    let phase = flow
        .api()
        .get(flow.name)
        .await
        .ok()
        .as_ref()
        .and_then(upgrade_phase);
    eprintln!("operator SIGKILLed {delay:?} after the kill point, in upgrade phase {phase:?}");
    (start_successor(flow), phase)
}

/// A second operator for the flow's namespace, after the first was killed.
fn start_successor(flow: &Flow) -> OperatorProcess {
    OperatorProcess::start(
        &flow.tb,
        flow.ns.name(),
        &format!("{}-op", flow.ns.name()),
        "successor",
    )
}

/// The plan hash each stage Deployment's pod template names.
async fn deployed_plans(flow: &Flow) -> Vec<Option<String>> {
    let deployments: Api<Deployment> = flow.ns.api();
    let list = deployments
        .list(&ListParams::default())
        .await
        .expect("deployments");
    list.items
        .into_iter()
        .map(|d| {
            d.spec
                .and_then(|s| s.template.metadata)
                .and_then(|m| m.annotations)
                .and_then(|mut a| a.remove("keystone.dev/plan-hash"))
        })
        .collect()
}

/// Waits (with the successor's log on failure) until `check` holds.
async fn wait_with(
    flow: &Flow,
    operator: &OperatorProcess,
    what: &str,
    check: impl Fn(&Pipeline) -> bool,
) -> Pipeline {
    wait_for(&flow.api(), flow.name, LONG, what, check)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nsuccessor's log (tail):\n{}",
                tail(&operator.log_text(), 60)
            )
        })
}

/// Waits until `successor` completed the upgrade, then asserts that every
/// Deployment runs the new plan and the sink holds each event once, in order
/// per user; returns what the sink holds.
async fn completed_by(
    flow: &Flow,
    successor: &OperatorProcess,
    producer: Producing,
) -> Vec<(String, u64, serde_json::Value)> {
    let stable = wait_with(flow, successor, "the upgrade completed", upgraded_to_stable).await;
    assert_one_plan_everywhere(flow, &stable).await;
    flow.finish(producer, true).await
}

/// Every stage Deployment runs the plan the status names: nothing is left
/// half-upgraded.
async fn assert_one_plan_everywhere(flow: &Flow, p: &Pipeline) {
    let plan = p
        .status
        .as_ref()
        .and_then(|s| s.plan_hash.clone())
        .expect("a plan hash in status");
    let deployments: Api<Deployment> = flow.ns.api();
    let list = deployments
        .list(&ListParams::default())
        .await
        .expect("deployments");
    assert!(!list.items.is_empty(), "no stage Deployments");
    for d in list.items {
        let running = d
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get("keystone.dev/plan-hash"))
            .cloned();
        assert_eq!(
            running.as_deref(),
            Some(plan.as_str()),
            "Deployment {:?} runs another plan than the status names",
            d.metadata.name
        );
    }
}

/// An upgrade under load whose operator is SIGKILLed when `at` holds (plus
/// up to `jitter`): the successor completes it, every Deployment runs the new
/// plan, and the sink holds every event once, in order.
async fn upgrade_survives_an_operator_kill(
    test: &str,
    at: impl Fn(&Pipeline) -> bool + Send + 'static,
    jitter: Duration,
    seed: u64,
) {
    let (flow, producer) = start_before_upgrade(test).await;
    let reached = watch_until(&flow, at).await;
    flow.keep_action().await;
    let (successor, phase) = kill_operator_when(&flow, reached, jitter, seed).await;
    let seen = completed_by(&flow, &successor, producer).await;
    eprintln!(
        "| operator SIGKILLed ({test}, upgrade phase {phase:?}) | 100 events/s | 2 | {} | 0 | 0 | 0 | |",
        seen.len()
    );
}

#[tokio::test]
async fn the_operator_killed_as_it_deploys_an_upgrade_leaves_the_status_naming_the_new_plan() {
    // The kill lands the moment a Deployment names the new plan. The status
    // must name it already (the plan is recorded before it is applied):
    // naming the old one, the successor would retake the old plan's
    // checkpoint of pods that run the new one, and fail forever.
    let (flow, producer) = start_upgrade("kill-apply").await;
    let status = |p: Pipeline| p.status.unwrap_or_default();
    let old = status(flow.api().get(flow.name).await.expect("get"))
        .stable_plan_hash
        .expect("a stable plan before the upgrade");
    let deadline = tokio::time::Instant::now() + LONG;
    while deployed_plans(&flow)
        .await
        .iter()
        .all(|plan| plan.as_deref() == Some(old.as_str()))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no Deployment took the new plan within {LONG:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    flow.operator.sigkill();
    let recorded = status(flow.api().get(flow.name).await.expect("get")).plan_hash;
    assert!(
        recorded.is_some() && recorded.as_deref() != Some(old.as_str()),
        "a Deployment runs the new plan while the status names {recorded:?} (the old plan is {old})"
    );
    completed_by(&flow, &start_successor(&flow), producer).await;
}

#[tokio::test]
async fn the_operator_killed_during_an_upgrade_is_succeeded_by_one_that_completes_it() {
    upgrade_survives_an_operator_kill(
        "kill-upgrade",
        |p| {
            matches!(
                upgrade_phase(p),
                Some(UpgradePhase::Deploying | UpgradePhase::Observing)
            )
        },
        Duration::from_secs(3),
        11,
    )
    .await;
}

#[tokio::test]
async fn the_operator_killed_while_checkpointing_for_an_upgrade_leaves_nothing_stopped() {
    // While the upgrade's checkpoint (stop, commit, read the offsets) runs:
    // the instances may be stopped when it dies, or still running.
    upgrade_survives_an_operator_kill(
        "kill-ckpt",
        |p| upgrade_phase(p) == Some(UpgradePhase::Checkpointing),
        Duration::from_millis(1500),
        23,
    )
    .await;
}

#[tokio::test]
async fn the_operator_killed_during_an_aligned_checkpoint_leaves_nothing_stopped() {
    // Two stages (declared keyed by `action`, deduplicated by (user, seq)
    // behind a repartition topic): a checkpoint stops every instance at an
    // aligned cut and resumes them once taken. The operator dies in between.
    let (flow, producer) = two_stages_under_load("kill-aligned").await;
    // The second stage hangs, so the checkpoint holds the first one stopped
    // while it waits for the second to consume its input (up to a minute):
    // the kill lands there.
    let frozen = freeze_second_stage(&flow).await;
    let reached = watch_until(&flow, |p| {
        p.status
            .as_ref()
            .is_some_and(|s| s.checkpoint_in_progress.is_some())
    })
    .await;
    flow.patch(json!({"spec": {"checkpointTrigger": "k1"}}))
        .await;
    let (successor, _) = kill_operator_when(&flow, reached, Duration::from_millis(1000), 41).await;
    drop(frozen);
    // The successor records the unfinished checkpoint as failed, resumes what
    // it stopped, and takes the manual checkpoint again (its trigger was not
    // handled); the pipeline is Ready with every instance processing.
    let done = wait_with(&flow, &successor, "checkpointed again and Ready", |p| {
        p.status.as_ref().is_some_and(|s| {
            s.last_checkpoint_trigger.as_deref() == Some("k1")
                && s.checkpoint_in_progress.is_none()
                && s.last_checkpoint.is_some()
        }) && condition_is(p, "Ready", "True")
    })
    .await;
    let status = done.status.clone().unwrap_or_default();
    let failed = status
        .last_failed_checkpoint
        .and_then(|c| c.reason)
        .unwrap_or_default();
    assert!(
        failed.contains("the operator stopped while taking this checkpoint"),
        "{failed}\n{}",
        tail(&successor.log_text(), 40)
    );
    let seen = flow.finish(producer, false).await;
    eprintln!(
        "| operator SIGKILLed during an aligned (stop) checkpoint of 2 stages | 100 events/s, 8 users | 2 stages | {} | 0 | 0 | n/a (2 stages) | |",
        seen.len()
    );
}

#[tokio::test]
async fn the_operator_killed_during_a_rollback_is_succeeded_by_one_that_completes_it() {
    let (flow, producer, stable_hash) = start_failing_upgrade("kill-rollback").await;
    // The roll back starts after the 20 s health window: the watch is in place.
    let reached = watch_until(&flow, |p| {
        upgrade_phase(p) == Some(UpgradePhase::RollingBack)
    })
    .await;
    let (successor, _) = kill_operator_when(&flow, reached, Duration::from_millis(1500), 37).await;
    let rolled = wait_with(&flow, &successor, "rolled back", |p| {
        upgrade_phase(p) == Some(UpgradePhase::RolledBack)
    })
    .await;
    assert_eq!(
        rolled.status.as_ref().and_then(|s| s.plan_hash.as_deref()),
        Some(stable_hash.as_str()),
        "the stable plan runs again"
    );
    assert_one_plan_everywhere(&flow, &rolled).await;
    // The failed version's even events precede the replayed odd ones: order
    // per user holds only outside that window (as without the kill).
    let seen = flow.finish(producer, false).await;
    eprintln!(
        "| operator SIGKILLed during a rollback | 100 events/s | 2 | {} | 0 | 0 | n/a (replay) | |",
        seen.len()
    );
}

#[tokio::test]
async fn a_change_undone_while_its_checkpoint_is_taken_is_withdrawn_and_the_pipeline_runs_on() {
    // What GitOps self-heal does to a change made by hand: the spec goes back
    // to the running version while the upgrade's checkpoint is being taken.
    // Two stages, the second frozen: the (aligned, stop) checkpoint waits for
    // it, so the spec goes back while the upgrade is in Checkpointing.
    let (flow, producer) = two_stages_under_load("up-withdrawn").await;
    let running_hash = flow
        .api()
        .get(flow.name)
        .await
        .expect("get")
        .status
        .and_then(|s| s.plan_hash)
        .expect("plan hash");
    let frozen = freeze_second_stage(&flow).await;
    let checkpointing = watch_until(&flow, |p| {
        upgrade_phase(p) == Some(UpgradePhase::Checkpointing)
    })
    .await;
    let once = json!({"name": "once", "dedup": {"key": ["user", "seq"], "window": "10m"}});
    flow.patch(json!({"spec": {"steps": [
        {"name": "all", "filter": {"expression": "true"}},
        once.clone()
    ]}}))
    .await;
    checkpointing.await;
    flow.patch(json!({"spec": {"steps": [once]}})).await;
    drop(frozen);
    let done = flow
        .wait("the upgrade withdrawn and the pipeline Running", |p| {
            upgrade_phase(p) == Some(UpgradePhase::Blocked)
                && p.status.as_ref().and_then(|s| s.phase) == Some(PipelinePhase::Running)
                && condition_is(p, "Ready", "True")
                && condition_is(p, "SpecApplied", "True")
        })
        .await;
    let status = done.status.clone().expect("status");
    assert_eq!(status.plan_hash.as_deref(), Some(running_hash.as_str()));
    let message = status.upgrade.and_then(|u| u.message).unwrap_or_default();
    assert!(message.starts_with("withdrawn: "), "{message}");
    assert_eq!(flow.argo_health(), "Healthy");
    let reasons: Vec<String> = flow.events().await.into_iter().map(|(r, _)| r).collect();
    assert!(
        reasons.iter().any(|r| r == "UpgradeWithdrawn"),
        "{reasons:?}"
    );
    // The next upgrade keeps nothing of the withdrawn one's record (the status
    // is merge-patched: its message would linger, and a stale readySince would
    // cut a health window short).
    let generation = done.metadata.generation.expect("generation");
    flow.patch(json!({"spec": {"steps": [
        {"name": "all", "filter": {"expression": "true"}},
        {"name": "once", "dedup": {"key": ["user", "seq"], "window": "10m"}}
    ]}}))
    .await;
    let upgraded = flow
        .wait("the next upgrade Stable", |p| {
            upgrade_phase(p) == Some(UpgradePhase::Stable)
                && p.status
                    .as_ref()
                    .and_then(|s| s.upgrade.as_ref())
                    .is_some_and(|u| u.generation > generation)
        })
        .await;
    let upgrade = upgraded.status.and_then(|s| s.upgrade).expect("upgrade");
    assert_eq!(upgrade.message, None, "{upgrade:?}");
    let ready_since = upgrade.ready_since.clone().expect("readySince");
    assert!(ready_since.0 >= upgrade.started.0, "{upgrade:?}");
    // Every instance processes again: nothing stays stopped, nothing is lost.
    flow.finish(producer, false).await;
}

/// Two stages under load: the source declared keyed by `action`, deduplicated
/// by (user, seq) behind a repartition topic, so that a checkpoint stops every
/// instance at an aligned cut.
async fn two_stages_under_load(test: &str) -> (Arc<Flow>, Producing) {
    let steps = r#"    - name: once
      dedup: {key: [user, seq], window: 10m}"#;
    Flow::start_keyed(test, 2, "", steps, "action")
        .await
        .under_load()
        .await
}

/// Freezes a pod of the second stage: a checkpoint then waits for it (up to a
/// minute) with the first stage stopped. Thawed when dropped.
async fn freeze_second_stage(flow: &Flow) -> Frozen {
    let second: Api<Pod> = flow.ns.api();
    let pod = second
        .list(&ListParams::default().labels("keystone.dev/pipeline=orders,keystone.dev/stage=s1"))
        .await
        .expect("pods")
        .items
        .into_iter()
        .next()
        .expect("a pod of the second stage");
    Frozen::freeze(&flow.tb, &pod)
}
