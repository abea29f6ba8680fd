//! Faults under continuous load, audited by an independent reader
//! (`keystone_e2e::audit`): the broker stopped and restarted, runtime
//! instances SIGKILLed at random points and all at once, a sink that stalls
//! for a minute, SIGTERM while the broker is away. After each, every key's
//! events must be at the sink once each and in order.
//!
//! Each test prints its row of `docs/RELIABILITY.md`'s table. The tests stop
//! shared components (the broker, OpenSearch), so they take turns.
//!
//! Needs `target/debug/keystone-runtime` (scripts/test builds it) and a
//! running testbed with OpenSearch.

mod operator_support;
mod runtime_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Event;
use keystone_crds::Pipeline;
use keystone_e2e::audit::{Audit, Expected};
use keystone_e2e::opensearch::OpenSearch;
use keystone_e2e::{Stopped, Testbed};
use kube::Api;
use kube::api::ListParams;
use operator_support::{
    Kafka, OperatorProcess, apply_yaml, condition_is, install_crds, operator_namespace,
    wait_ready_with_runtime,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use runtime_support::*;

/// One fault at a time: they stop components every test here uses.
static FAULT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long the sink may take to hold everything after the load ends.
const CATCH_UP: Duration = Duration::from_secs(240);

async fn testbed() -> Testbed {
    Testbed::from_env().await.expect("testbed")
}

// ---------------------------------------------------------------------------
// Load, supervision and the reader
// ---------------------------------------------------------------------------

/// The CDC workload of `runtime_support::cdc_input`, produced steadily over
/// about `over` by an idempotent producer that rides out a broker outage
/// (records wait in its queue; none is lost or reordered by its retries).
struct Load {
    keys: u32,
    seqs: i64,
    records: usize,
    done: std::thread::JoinHandle<()>,
}

impl Load {
    fn start(bootstrap: &str, topic: &str, keys: u32, seqs: i64, over: Duration) -> Self {
        let input = cdc_input(keys, seqs, u64::from(keys) * 31 + seqs as u64);
        let records = input.len();
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "300000")
            .set("linger.ms", "5")
            .create()
            .expect("producer");
        let topic = topic.to_owned();
        let chunks = 50;
        let pause = over / chunks as u32;
        let done = std::thread::spawn(move || {
            for chunk in input.chunks(records.div_ceil(chunks)) {
                for (key, value) in chunk {
                    let mut record = BaseRecord::to(&topic)
                        .key(key.as_bytes())
                        .payload(value.as_bytes());
                    while let Err((_, back)) = producer.send(record) {
                        record = back;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                std::thread::sleep(pause);
            }
            // The broker may be away: flush until every record is acknowledged.
            let deadline = Instant::now() + Duration::from_secs(300);
            while producer.flush(Duration::from_secs(10)).is_err() {
                assert!(Instant::now() < deadline, "the load could not be delivered");
            }
        });
        Self {
            keys,
            seqs,
            records,
            done,
        }
    }

    fn expected(&self) -> Expected {
        Expected::uniform((0..self.keys).map(|k| format!("order-{k}")), self.seqs)
    }

    fn describe(&self, over: Duration) -> String {
        format!(
            "{} CDC events ({} orders, redeliveries, disorder) over {} s",
            self.records,
            self.keys,
            over.as_secs()
        )
    }

    fn finish(self) {
        self.done.join().expect("load");
    }
}

/// Restarts instances that exit on their own, as a kubelet restarts a
/// container (`restartPolicy: Always`), and counts the restarts.
fn restart_exited(h: &mut Harness, restarts: &mut usize) {
    let exited: Vec<String> = h
        .instances
        .iter_mut()
        .filter_map(|(name, child)| matches!(child.try_wait(), Ok(Some(_))).then(|| name.clone()))
        .collect();
    for name in exited {
        eprintln!("{name} exited; restarting it (see {})", h.log(&name));
        h.instances.remove(&name);
        h.start(&name, &[]);
        *restarts += 1;
    }
}

/// Reads the sink topic (read_committed, from the beginning) in the
/// background for the whole scenario, noting when each record arrived.
struct SinkReader {
    arrivals: Arc<Mutex<Vec<(String, i64, Instant)>>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl SinkReader {
    fn start(bootstrap: &str, topic: &str, partitions: i32) -> Self {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", unique("fault-audit"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .create()
            .expect("audit consumer");
        let mut tpl = TopicPartitionList::new();
        for partition in 0..partitions {
            tpl.add_partition_offset(topic, partition, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).expect("assign");
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (arrivals, stop) = (arrivals.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // Errors while the broker is away are retried by the client.
                    let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) else {
                        continue;
                    };
                    let key = String::from_utf8_lossy(message.key().unwrap_or_default());
                    let value: serde_json::Value =
                        serde_json::from_slice(message.payload().unwrap_or_default())
                            .expect("the sink holds JSON");
                    let seq = value["seq"].as_i64().expect("seq");
                    arrivals
                        .lock()
                        .unwrap()
                        .push((key.into_owned(), seq, Instant::now()));
                }
            })
        };
        Self {
            arrivals,
            stop,
            thread,
        }
    }

    fn count(&self) -> usize {
        self.arrivals.lock().unwrap().len()
    }

    /// Waits until `expected` records arrived (or `within` passed), then a
    /// little longer for any duplicate, and stops.
    fn finish(self, expected: usize, within: Duration) -> Vec<(String, i64, Instant)> {
        let deadline = Instant::now() + within;
        while self.count() < expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_secs(5));
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("audit reader");
        Arc::try_unwrap(self.arrivals)
            .expect("reader stopped")
            .into_inner()
            .unwrap()
    }
}

/// The longest time without a new record at the sink between `from` and the
/// last arrival: how long the fault stalled the output.
fn longest_stall(arrivals: &[(String, i64, Instant)], from: Instant) -> Duration {
    let mut times: Vec<Instant> = arrivals
        .iter()
        .map(|a| a.2)
        .filter(|t| *t >= from)
        .collect();
    times.sort();
    let mut previous = from;
    let mut longest = Duration::ZERO;
    for t in times {
        longest = longest.max(t - previous);
        previous = t;
    }
    longest
}

fn logs(h: &Harness) -> String {
    h.ports
        .keys()
        .map(|i| h.log(i))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A pipeline (dedup + per-key order into a Kafka sink) under load, with its
/// instances supervised and its sink read by the auditor.
struct Scenario {
    h: Harness,
    reader: SinkReader,
    load: Load,
    over: Duration,
    restarts: usize,
}

impl Scenario {
    /// Starts `instances` on a fresh pipeline, waits until each owns a
    /// partition, and starts about `over` of load.
    async fn start(prefix: &str, instances: &[&str], keys: u32, seqs: i64, over: Duration) -> Self {
        let name = unique(prefix);
        let mut h = Harness::new(&name, &cdc_pipeline(&name), 4).await;
        let reader = SinkReader::start(&h.bootstrap, &h.sink_topic(), 3);
        for instance in instances {
            h.start(instance, &[]);
        }
        h.wait_for_partitions(instances);
        let load = Load::start(&h.bootstrap, &h.plan.source.topic, keys, seqs, over);
        Self {
            h,
            reader,
            load,
            over,
            restarts: 0,
        }
    }

    /// Supervises the instances for `period`.
    async fn supervise(&mut self, period: Duration) {
        let until = Instant::now() + period;
        while Instant::now() < until {
            restart_exited(&mut self.h, &mut self.restarts);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until the load is delivered and the sink holds it (or
    /// [`CATCH_UP`] passed), then audits the sink: the fault's row is printed
    /// and the audit must be clean.
    async fn finish(mut self, fault: &str, fault_at: Instant) -> Audit {
        let expected = self.load.expected().events();
        let deadline = Instant::now() + CATCH_UP;
        while (!self.load.done.is_finished() || self.reader.count() < expected)
            && Instant::now() < deadline
        {
            restart_exited(&mut self.h, &mut self.restarts);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let description = self.load.describe(self.over);
        let arrivals = self.reader.finish(expected, Duration::ZERO);
        let audit = Audit::of(
            &self.load.expected(),
            arrivals.iter().map(|(k, s, _)| (k.clone(), *s)),
        );
        self.load.finish();
        assert!(
            arrivals.iter().any(|a| a.2 < fault_at),
            "nothing reached the sink before the fault: it hit no stream; logs: {}",
            logs(&self.h)
        );
        assert!(
            audit.is_clean(),
            "{fault}: {audit}\nlogs: {}",
            logs(&self.h)
        );
        eprintln!(
            "{}\n({} instance restarts by the supervisor)",
            audit.row(
                fault,
                &description,
                self.h.ports.len(),
                longest_stall(&arrivals, fault_at)
            ),
            self.restarts
        );
        audit
    }
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn broker_stopped_for_20s_with_two_instances() {
    let _turn = FAULT.lock().await;
    let tb = testbed().await;
    let over = Duration::from_secs(40);
    let mut s = Scenario::start("fault-broker", &["a", "b"], 30, 60, over).await;
    s.supervise(Duration::from_secs(10)).await;
    let fault_at = Instant::now();
    let broker = Stopped::stop(&tb, "kafka").await;
    s.supervise(Duration::from_secs(20).saturating_sub(fault_at.elapsed()))
        .await;
    broker.start(&tb).await;
    s.finish("broker stopped 20 s, then restarted", fault_at)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_sigkills_at_random_points_then_every_instance_at_once() {
    let _turn = FAULT.lock().await;
    let over = Duration::from_secs(60);
    let mut s = Scenario::start("fault-kills", &["a", "b"], 30, 80, over).await;
    s.supervise(Duration::from_secs(5)).await;
    let fault_at = Instant::now();
    let mut rng = Lcg(2026);
    for _ in 0..20 {
        s.supervise(Duration::from_millis(600 + rng.below(1800)))
            .await;
        let victim = if rng.below(2) == 0 { "a" } else { "b" };
        s.h.kill(victim);
        s.h.start(victim, &[]);
    }
    // A node lost: every instance of the stage at once.
    s.h.kill("a");
    s.h.kill("b");
    s.h.start("a", &[]);
    s.h.start("b", &[]);
    s.finish(
        "20 SIGKILLs at random points, then every instance at once",
        fault_at,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_the_broker_is_away_exits_within_the_grace_period() {
    let _turn = FAULT.lock().await;
    let tb = testbed().await;
    let over = Duration::from_secs(20);
    let mut s = Scenario::start("fault-term", &["a"], 20, 40, over).await;
    s.supervise(Duration::from_secs(6)).await;
    let fault_at = Instant::now();
    let broker = Stopped::stop(&tb, "kafka").await;
    let mut child = s.h.instances.remove("a").expect("instance a");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    // Kubernetes' default terminationGracePeriodSeconds: after it, SIGKILL.
    let grace = Duration::from_secs(30);
    let signalled = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if signalled.elapsed() > grace {
            child.kill().ok();
            panic!(
                "the instance did not exit within the {grace:?} grace period after SIGTERM with the broker away; see {}",
                s.h.log("a")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "exited {status} {:.1} s after SIGTERM with the broker away",
        signalled.elapsed().as_secs_f64()
    );
    broker.start(&tb).await;
    s.h.start("a", &[]);
    s.finish("SIGTERM with the broker away, then started again", fault_at)
        .await;
}

/// What happens to the search sink's cluster for a minute.
enum SearchFault {
    /// SIGSTOP: connections open, nothing answers.
    Stall,
    /// The index refuses every write (`index.blocks.write`, as the cluster
    /// itself sets a read-only block at its flood-stage disk watermark): each
    /// bulk item comes back 403 `cluster_block_exception`.
    WriteBlock,
}

/// The search sink's cluster stalls (SIGSTOP: connections open, nothing
/// answers) for a minute under load; then it goes on.
#[tokio::test(flavor = "multi_thread")]
async fn search_sink_stalled_for_a_minute() {
    search_sink_fault("fault-stall", SearchFault::Stall).await;
}

/// The search index refuses every write for a minute under load: nothing is
/// dead-lettered (the documents are not at fault) and nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn search_index_refusing_writes_for_a_minute() {
    search_sink_fault("fault-block", SearchFault::WriteBlock).await;
}

async fn search_sink_fault(prefix: &str, fault: SearchFault) {
    let _turn = FAULT.lock().await;
    let tb = testbed().await;
    let os = OpenSearch::from_env().await.expect("OpenSearch");
    os.wait_ready(Duration::from_secs(60)).await.expect("ready");
    let name = unique(prefix);
    let index = name.clone();
    let manifest = cdc_manifest(
        &name,
        &format!(
            r#"{CDC_STEPS}  sinks:
    - name: search
      elasticsearch:
        endpoint: {url}
        index: {index}
        idFields: [order_id, event_id]
  delivery: ExactlyOnce
  commitInterval: 500ms
"#,
            url = os.url()
        ),
    );
    let mut h = Harness::new(&name, &manifest, 3).await;
    h.start("a", &[]);
    h.wait_ready("a");
    let over = Duration::from_secs(90);
    let load = Load::start(&h.bootstrap, &h.plan.source.topic, 20, 60, over);
    tokio::time::sleep(Duration::from_secs(10)).await;
    os.refresh(&index).await.expect("refresh");
    let before = os.count(&index).await.expect("count");
    let fault_at = Instant::now();
    let block = |on: bool| {
        let (os, index) = (&os, &index);
        async move {
            let setting = if on {
                serde_json::json!({"index.blocks.write": true})
            } else {
                serde_json::json!({"index.blocks.write": null})
            };
            let reply = os
                .request_json(
                    hyper::Method::PUT,
                    &format!("/{index}/_settings"),
                    Some(&setting),
                )
                .await
                .expect("index settings");
            assert!(reply.is_success(), "{}", reply.text());
        }
    };
    let resume = match fault {
        SearchFault::Stall => {
            let pid = opensearch_pid(&tb);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
            Some(Resume(pid))
        }
        SearchFault::WriteBlock => {
            block(true).await;
            None
        }
    };
    let mut restarts = 0;
    while fault_at.elapsed() < Duration::from_secs(60) {
        restart_exited(&mut h, &mut restarts);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    match fault {
        SearchFault::Stall => drop(resume),
        SearchFault::WriteBlock => block(false).await,
    }
    let resumed = Instant::now();
    let expected = load.expected();
    let deadline = Instant::now() + CATCH_UP;
    let mut recovered = None;
    let docs = loop {
        restart_exited(&mut h, &mut restarts);
        os.refresh(&index).await.ok();
        let count = os.count(&index).await.unwrap_or(0);
        if recovered.is_none() && count > before {
            recovered = Some(resumed.elapsed());
        }
        if (load.done.is_finished() && count as usize >= expected.events())
            || Instant::now() > deadline
        {
            break os.search_all(&index).await.expect("documents");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let description = load.describe(over);
    load.finish();
    // One document per event (id = order and event); a replayed write lands
    // on the same document. An index keeps no arrival order: the audit counts
    // losses, and documents that were never sent or hold the same event twice.
    let audit = Audit::of_unordered(
        &expected,
        docs.iter().map(|(_, source, _)| {
            (
                source["order_id"].as_str().unwrap_or_default().to_owned(),
                source["seq"].as_i64().unwrap_or(-1),
            )
        }),
    );
    assert!(before > 0, "nothing was indexed before the fault");
    assert!(audit.is_clean(), "{audit}\nlogs: {}", h.log("a"));
    let what = match fault {
        SearchFault::Stall => "search cluster stalled 60 s (SIGSTOP)",
        SearchFault::WriteBlock => {
            "search index refusing writes 60 s (index.blocks.write: 403 cluster_block_exception)"
        }
    };
    eprintln!(
        "{}\n({restarts} instance restarts; output resumed {:.1} s after the cluster did)",
        audit.row(
            what,
            &description,
            1,
            (resumed - fault_at) + recovered.unwrap_or_default()
        ),
        recovered.unwrap_or_default().as_secs_f64()
    );
}

/// A pipeline run by the operator, on pods of the process kubelet, reading
/// the CDC load and writing a Kafka sink.
fn operated_pipeline(ns: &str, name: &str, source: &str, sink: &str) -> String {
    cdc_manifest_in(
        ns,
        name,
        source,
        &format!(
            r#"{CDC_STEPS}  sinks:
    - name: out
      kafka: {{topic: {sink}, partitions: 3, key: [order_id], preserveOrder: true}}
  parallelism: 2
  commitInterval: 300ms
  topicDeletionPolicy: Delete
"#
        ),
    )
}

/// The API server goes away for 30 s: the pipeline's pods keep processing
/// (they need no API server), the operator rides it out and recovers its
/// watches, and nothing is upgraded or rolled back because of it.
#[tokio::test(flavor = "multi_thread")]
async fn api_server_stopped_for_30s() {
    let _turn = FAULT.lock().await;
    operator_support::require_runtime_binary();
    let tb = testbed().await;
    install_crds(&tb);
    let ns = tb.namespace("fault-apiserver").await.expect("namespace");
    let op_ns = operator_namespace(&tb, &ns).await;
    let operator = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "fault-apiserver");
    let kafka = Kafka::new(&tb);
    let source = unique("e2e.fault-apiserver");
    let sink = format!("{source}.out");
    kafka.create(&source, 4).await;
    let pipelines: Api<Pipeline> = ns.api();
    apply_yaml(&tb, &operated_pipeline(ns.name(), "orders", &source, &sink)).await;
    wait_ready_with_runtime(&pipelines, "orders", &operator).await;
    let before = pipelines.get("orders").await.expect("get");
    let replica_sets: Api<ReplicaSet> = ns.api();
    let orders_replica_sets = || async {
        let mut names: Vec<String> = replica_sets
            .list(&ListParams::default())
            .await
            .expect("replica sets")
            .items
            .into_iter()
            .filter_map(|r| r.metadata.name)
            .filter(|n| n.starts_with("orders-"))
            .collect();
        names.sort();
        names
    };
    let replica_sets_before = orders_replica_sets().await;

    let bootstrap = tb.kafka_bootstrap_servers().expect("kafka").to_owned();
    let reader = SinkReader::start(&bootstrap, &sink, 3);
    let over = Duration::from_secs(60);
    let load = Load::start(&bootstrap, &source, 24, 60, over);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let fault_at = Instant::now();
    let at_outage = reader.count();
    let api_server = Stopped::stop(&tb, "kube-apiserver").await;
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(fault_at.elapsed())).await;
    let during_outage = reader.count() - at_outage;
    api_server.start(&tb).await;
    let restored_at = Instant::now();

    // The operator recovered its watches: a pipeline created now is acted on.
    let source2 = unique("e2e.fault-apiserver");
    kafka.create(&source2, 1).await;
    apply_yaml(
        &tb,
        &operated_pipeline(ns.name(), "after", &source2, &format!("{source2}.out")),
    )
    .await;
    keystone_e2e::wait_for(
        &pipelines,
        "after",
        Duration::from_secs(180),
        "TopicsReady=True",
        |p| condition_is(p, "TopicsReady", "True"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    let watches_back = restored_at.elapsed();

    let expected = load.expected();
    let description = load.describe(over);
    let deadline = Instant::now() + CATCH_UP;
    while (!load.done.is_finished() || reader.count() < expected.events())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    load.finish();
    let arrivals = reader.finish(expected.events(), Duration::ZERO);
    let audit = Audit::of(&expected, arrivals.iter().map(|(k, s, _)| (k.clone(), *s)));
    assert!(
        audit.is_clean(),
        "{audit}\noperator log:\n{}",
        operator.log_text()
    );
    assert!(
        during_outage > 0,
        "nothing reached the sink while the API server was away: the pods stopped"
    );

    // No spurious change: same plan, no upgrade or rollback, no new ReplicaSet.
    let after = pipelines.get("orders").await.expect("get");
    let plan = |p: &Pipeline| p.status.as_ref().and_then(|s| s.plan_hash.clone());
    let upgrade = |p: &Pipeline| {
        p.status
            .as_ref()
            .and_then(|s| s.upgrade.as_ref())
            .map(|u| serde_json::to_string(u).unwrap())
    };
    assert_eq!(plan(&after), plan(&before), "the plan changed");
    assert_eq!(upgrade(&after), upgrade(&before), "an upgrade happened");
    assert!(condition_is(&after, "Ready", "True"), "{:?}", after.status);
    let events: Api<Event> = ns.api();
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some("orders"))
        .filter_map(|e| e.reason)
        .collect();
    assert!(
        !reasons
            .iter()
            .any(|r| r.starts_with("Upgrade") || r.contains("Roll")),
        "{reasons:?}"
    );
    assert_eq!(
        orders_replica_sets().await,
        replica_sets_before,
        "the pipeline's Deployments rolled out again"
    );
    eprintln!(
        "{}\n({during_outage} records reached the sink during the outage; the operator acted on a new pipeline {:.1} s after the API server returned)",
        audit.row(
            "API server stopped 30 s (operator running)",
            &description,
            2,
            longest_stall(&arrivals, fault_at)
        ),
        watches_back.as_secs_f64()
    );
}

fn opensearch_pid(tb: &Testbed) -> nix::unistd::Pid {
    let text = std::fs::read_to_string(tb.state_dir().join("pids/opensearch.pid"))
        .expect("the testbed's OpenSearch pid file");
    let pid: i32 = text
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a pid");
    nix::unistd::Pid::from_raw(pid)
}

/// Sends SIGCONT when dropped, so a failing test never leaves the shared
/// OpenSearch stopped.
struct Resume(nix::unistd::Pid);

impl Drop for Resume {
    fn drop(&mut self) {
        nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT).ok();
    }
}
