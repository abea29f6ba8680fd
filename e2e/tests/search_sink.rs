//! The Elasticsearch/OpenSearch sink end to end: `keystone-runtime serve`
//! instances read the testbed's real Kafka and write the testbed's real
//! OpenSearch. Each test computes its reference from the input it produces
//! (never from what the runtime wrote) and compares the whole index with it:
//! document count, every document's content and, with `versionField`, its
//! `_version`.
//!
//! - CDC (creates, updates, deletes, redeliveries, per-key disorder) through
//!   dedup + order + project, with instances SIGKILLed at random points and a
//!   rollback to a checkpoint whose replay the external versions suppress;
//! - a document the index's mapping refuses is dead-lettered with its original
//!   bytes and the index's reason, and the rest flows;
//! - OpenSearch stopped for 30 s mid-stream: the instance stays up and ready,
//!   commits nothing while the cluster is away, and loses and duplicates
//!   nothing (with and without external versions).
//!
//! Needs `target/debug/keystone-runtime` (`cargo build -p keystone-runtime`;
//! scripts/test builds it) and a running testbed with OpenSearch.

mod runtime_support;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keystone_crds::checkpoint::{InputRestore, RestorePlan, StageRestore, StateRestore};
use keystone_e2e::opensearch::OpenSearch;
use runtime_support::*;
use serde_json::{Value, json};

/// The outage tests stop the one OpenSearch: they take this exclusively, the
/// other tests of this file share it.
static OPENSEARCH: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn opensearch() -> OpenSearch {
    let os = OpenSearch::from_env()
        .await
        .expect("OpenSearch of the testbed (run `e2e/testbed up`)");
    os.wait_ready(Duration::from_secs(60))
        .await
        .expect("OpenSearch ready");
    os
}

// ---------------------------------------------------------------------------
// The CDC workload and its reference
// ---------------------------------------------------------------------------

/// One produced record of the CDC stream.
#[derive(Clone, Debug)]
struct Produced {
    key: String,
    value: String,
    order_id: String,
    seq: i64,
}

/// A CDC stream and what the index must hold after it.
struct Cdc {
    records: Vec<Produced>,
    /// Per order: the document and its version, or `None` when the order's
    /// last change is a delete.
    reference: BTreeMap<String, Option<(Value, i64)>>,
}

impl Cdc {
    fn pairs(&self, range: std::ops::Range<usize>) -> Vec<(String, String)> {
        self.records[range]
            .iter()
            .map(|r| (r.key.clone(), r.value.clone()))
            .collect()
    }

    fn live(&self) -> usize {
        self.reference.values().filter(|d| d.is_some()).count()
    }

    fn deleted(&self) -> usize {
        self.reference.values().filter(|d| d.is_none()).count()
    }
}

const STATUSES: [&str; 5] = ["created", "paid", "packed", "shipped", "delivered"];

/// `keys` orders with 3..=14 changes each: the first a create (`op` "c"),
/// then updates ("u") and deletes ("d", without `after`); an order deleted
/// mid-stream is created again by its next change, and every seventh order
/// ends deleted. Per order, `seq` counts the changes from 1; adjacent changes
/// (not the first) are swapped now and then, and a fifth of the changes is
/// delivered again (same `event_id`) up to three changes later. The orders
/// are interleaved at random, each keeping its own (disordered) sequence.
fn cdc_stream(keys: u32, seed: u64) -> Cdc {
    let mut rng = Lcg(seed);
    let mut per_key: Vec<Vec<Produced>> = Vec::new();
    let mut reference = BTreeMap::new();
    for k in 0..keys {
        let order = format!("order-{k}");
        let n = 3 + rng.below(12) as i64;
        let mut changes = Vec::new();
        let mut previous = "";
        for seq in 1..=n {
            let op = if seq == 1 || previous == "d" {
                "c"
            } else if (seq == n && k % 7 == 0) || rng.below(8) == 0 {
                "d"
            } else {
                "u"
            };
            previous = op;
            let event_id = format!("{order}-{seq}");
            let (value, doc) = if op == "d" {
                (
                    json!({"event_id": event_id, "order_id": order, "seq": seq, "op": op}),
                    None,
                )
            } else {
                let status = STATUSES[rng.below(STATUSES.len() as u64) as usize];
                let amount = rng.below(100_000) as i64;
                (
                    json!({"event_id": event_id, "order_id": order, "seq": seq, "op": op,
                           "after": {"status": status, "amount": amount}}),
                    Some(json!({"order_id": order, "seq": seq, "op": op,
                                "status": status, "amount": amount})),
                )
            };
            changes.push(Produced {
                key: order.clone(),
                value: value.to_string(),
                order_id: order.clone(),
                seq,
            });
            if seq == n {
                reference.insert(order.clone(), doc.map(|d| (d, seq)));
            }
        }
        // Local disorder: swap neighbours, never the first change.
        let mut i = 1;
        while i + 1 < changes.len() {
            if rng.below(3) == 0 {
                changes.swap(i, i + 1);
                i += 2;
            } else {
                i += 1;
            }
        }
        // Redeliveries, up to three changes later.
        let mut events = changes.clone();
        for change in changes.iter().rev() {
            if rng.below(5) == 0 {
                let at = events.iter().position(|e| e.value == change.value).unwrap();
                let later = (at + 1 + rng.below(3) as usize).min(events.len());
                events.insert(later, change.clone());
            }
        }
        per_key.push(events);
    }
    let total: usize = per_key.iter().map(Vec::len).sum();
    let mut records = Vec::with_capacity(total);
    let mut cursors = vec![0usize; per_key.len()];
    while records.len() < total {
        let k = rng.below(per_key.len() as u64) as usize;
        if cursors[k] < per_key[k].len() {
            records.push(per_key[k][cursors[k]].clone());
            cursors[k] += 1;
        }
    }
    Cdc { records, reference }
}

/// The CDC pipeline of these tests: dedup by event, order by `seq`, project
/// to the document, into one search sink (`version_field` when given).
fn cdc_search_pipeline(name: &str, url: &str, index: &str, version_field: Option<&str>) -> String {
    let version = version_field
        .map(|f| format!("\n        versionField: {f}"))
        .unwrap_or_default();
    format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: {name}, namespace: e2e}}
spec:
  source:
    topic: {name}.in
    key: [order_id]
    schema:
      fields:
        - {{name: event_id, type: string}}
        - {{name: order_id, type: string}}
        - {{name: seq, type: integer}}
        - {{name: op, type: string}}
        - {{name: after, type: object, optional: true}}
        - {{name: after.status, type: string, optional: true}}
        - {{name: after.amount, type: integer, optional: true}}
  steps:
    - name: dedup
      dedup: {{key: [order_id, event_id], window: 1h}}
    - name: order
      order: {{key: [order_id], sequence: seq, maxDelay: 2m, contiguous: true, onStale: DeadLetter}}
    - name: document
      project:
        fields:
          - {{name: order_id, from: /order_id}}
          - {{name: seq, from: /seq}}
          - {{name: op, from: /op}}
          - {{name: status, from: /after/status, optional: true}}
          - {{name: amount, from: /after/amount, optional: true}}
  sinks:
    - name: search
      elasticsearch:
        endpoint: {url}
        index: {index}
        idFields: [order_id]{version}
        bulkSize: 200
        # Deletes keep their tombstone (and version) for the whole test, so a
        # replay never brings a deleted order back.
        indexSettings: {{number_of_replicas: "0", gc_deletes: "1h"}}
  delivery: ExactlyOnce
  commitInterval: 300ms
"#
    )
}

/// Compares the index with the reference: the count, every live order's
/// document (and `_version` when `versions`), no deleted order.
async fn assert_index_is_reference(
    os: &OpenSearch,
    index: &str,
    cdc: &Cdc,
    versions: bool,
    logs: &str,
) {
    os.refresh(index).await.expect("refresh");
    let count = os.count(index).await.expect("count");
    let docs = os.search_all(index).await.expect("search_all");
    let got: BTreeMap<String, (Value, i64)> = docs
        .into_iter()
        .map(|(id, source, version)| (id, (source, version)))
        .collect();
    let mut wrong = Vec::new();
    for (order, expected) in &cdc.reference {
        match (expected, got.get(order)) {
            (None, None) => {}
            (None, Some(doc)) => {
                wrong.push(format!("{order}: deleted, but the index holds {doc:?}"))
            }
            (Some(want), None) => wrong.push(format!("{order}: missing, expected {want:?}")),
            (Some((want_doc, want_version)), Some((doc, version))) => {
                if doc != want_doc || (versions && version != want_version) {
                    wrong.push(format!(
                        "{order}: expected {want_doc} version {want_version}, got {doc} version {version}"
                    ));
                }
            }
        }
    }
    for id in got.keys().filter(|id| !cdc.reference.contains_key(*id)) {
        wrong.push(format!("{id}: not an order of the input"));
    }
    assert!(
        wrong.is_empty(),
        "the index differs from the reference in {} of {} orders:\n{}\nlogs: {logs}",
        wrong.len(),
        cdc.reference.len(),
        wrong
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(count as usize, cdc.live(), "document count; logs: {logs}");
}

// ---------------------------------------------------------------------------
// Stage helpers
// ---------------------------------------------------------------------------

const VERSION_CONFLICTS: &str = r#"keystone_sink_items_total{result="version_conflict""#;

// ---------------------------------------------------------------------------
// 1. CDC, SIGKILLs and a rollback
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn cdc_into_search_survives_sigkills_and_a_rollback() {
    let _shared = OPENSEARCH.read().await;
    let started = Instant::now();
    let os = opensearch().await;
    let seed = seed("cdc_into_search_survives_sigkills_and_a_rollback");
    let mut rng = Lcg(seed);

    let name = unique("search-cdc");
    let index = name.clone();
    let _cleanup = os.delete_on_drop(&index);
    let partitions = 4;
    let manifest = cdc_search_pipeline(&name, os.url(), &index, Some("seq"));
    let mut h = Harness::new(&name, &manifest, partitions).await;
    let source = h.plan.source.topic.clone();
    let instances = ["a", "b"];
    let logs = logs(&h, &instances);

    let cdc = cdc_stream(400, seed);
    let total = cdc.records.len();
    assert!(
        cdc.deleted() >= 40 && total > 3000,
        "the workload: {total} records, {} deleted orders",
        cdc.deleted()
    );
    // Two thirds of the input streams in while instances are SIGKILLed at
    // three random moments; then a checkpoint, a sixth after it (rolled
    // back), and the last sixth after the restore.
    let (checkpoint_at, restore_at) = (total * 2 / 3, total * 5 / 6);
    let p = producer(&h.bootstrap);
    let slices = 40;
    let first: Vec<Vec<(String, String)>> = (0..slices)
        .map(|s| cdc.pairs(checkpoint_at * s / slices..checkpoint_at * (s + 1) / slices))
        .collect();
    eprintln!("{total} records");
    stream_through_sigkills(
        &mut h,
        &mut rng,
        &instances,
        &[],
        &source,
        first,
        Duration::from_secs(8),
    );

    // The rollback: a checkpoint of the stage once it consumed everything so
    // far, more input through the stage and into the index, then the stage
    // stopped and started again from the checkpoint.
    wait_caught_up(&mut h, partitions, &logs);
    for instance in instances {
        h.wait_ready(instance);
    }
    h.wait_for_partitions(&instances);
    let at = stage_checkpoint(&h, &instances, partitions, checkpoint_at);
    assert_eq!(
        at.changelog_positions.len(),
        2,
        "dedup and order keep state: {at:?}"
    );
    produce(&p, &source, &cdc.pairs(checkpoint_at..restore_at));
    wait_caught_up(&mut h, partitions, &logs);
    for instance in instances {
        h.terminate(instance);
    }
    let restore = RestorePlan {
        id: unique("rollback"),
        checkpoint: None,
        stages: BTreeMap::from([(
            "s0".to_owned(),
            StageRestore {
                input: InputRestore::Offsets(at.source_offsets.clone()),
                state: at
                    .changelog_positions
                    .iter()
                    .map(|(topic, positions)| (topic.clone(), StateRestore::At(positions.clone())))
                    .collect(),
            },
        )]),
        suppress: None,
    };
    start_restored(&mut h, &instances, &[], &restore);
    produce(&p, &source, &cdc.pairs(restore_at..total));
    wait_caught_up(&mut h, partitions, &logs);

    // The restore was applied on every partition and recorded with the offsets.
    let group = group_offsets(&h, partitions);
    for (partition, (_, metadata)) in &group {
        assert_eq!(
            metadata,
            &restore.commit_metadata(),
            "partition {partition}; logs: {logs}"
        );
    }
    let applied: f64 = instances
        .iter()
        .map(|i| h.metric(i, "keystone_restore_applied_partitions_total"))
        .sum();
    assert!(
        applied >= partitions as f64,
        "restore applied on {applied} partitions; logs: {logs}"
    );

    // The replay wrote again every change first read between the checkpoint
    // and the stop that had left the order step by then: each one found its
    // version (or a newer one) in the index.
    let mut first_seen: HashMap<(String, i64), usize> = HashMap::new();
    for (i, r) in cdc.records.iter().enumerate() {
        first_seen.entry((r.order_id.clone(), r.seq)).or_insert(i);
    }
    let replayed = first_seen
        .iter()
        .filter(|((order, seq), first)| {
            (checkpoint_at..restore_at).contains(*first)
                && (1..*seq).all(|s| first_seen[&(order.clone(), s)] < restore_at)
        })
        .count();
    let conflicts: f64 = instances
        .iter()
        .map(|i| h.metric(i, VERSION_CONFLICTS))
        .sum();
    assert!(replayed > 0, "the rollback replays nothing: a useless test");
    assert!(
        conflicts >= replayed as f64,
        "{conflicts} version conflicts after the restore, but {replayed} changes were replayed; logs: {logs}"
    );

    assert_index_is_reference(&os, &index, &cdc, true, &logs).await;
    eprintln!(
        "{total} records, {} live and {} deleted orders, {replayed} replayed changes, {conflicts} version conflicts, in {:?}",
        cdc.live(),
        cdc.deleted(),
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 2. A document the mapping refuses
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_document_that_breaks_the_mapping_is_dead_lettered_and_the_rest_flows() {
    let _shared = OPENSEARCH.read().await;
    let os = opensearch().await;
    let name = unique("search-dlq");
    let index = name.clone();
    let _cleanup = os.delete_on_drop(&index);
    os.delete_index(&index)
        .await
        .expect("delete leftover index");
    os.create_index(
        &index,
        &json!({
            "settings": {"number_of_shards": 1, "number_of_replicas": 0},
            "mappings": {"dynamic": "strict", "properties": {
                "id": {"type": "keyword"},
                "amount": {"type": "long"},
                "note": {"type": "keyword"},
            }},
        }),
    )
    .await
    .expect("create the strict index");

    let manifest = format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: {name}, namespace: e2e}}
spec:
  source:
    topic: {name}.in
    key: [id]
    schema:
      fields:
        - {{name: id, type: string}}
        - {{name: amount, type: any}}
        - {{name: note, type: string, optional: true}}
  sinks:
    - name: search
      elasticsearch:
        endpoint: {url}
        index: {index}
        idFields: [id]
        bulkSize: 10
  delivery: ExactlyOnce
  commitInterval: 300ms
"#,
        url = os.url()
    );
    let partitions = 2;
    let mut h = Harness::new(&name, &manifest, partitions).await;
    let source = h.plan.source.topic.clone();
    let dead_letters = h.plan.dead_letter_topic.clone();

    // Forty documents; the 17th carries its amount as a string the long field
    // cannot parse. It sits in the middle of a bulk request with good ones.
    let bad_id = "doc-17";
    let bad = format!(r#"{{"id":"{bad_id}","amount":"seventeen","note":"not a number"}}"#);
    let mut input = Vec::new();
    let mut expected = BTreeMap::new();
    for n in 0..40 {
        let id = format!("doc-{n}");
        if id == bad_id {
            input.push((id, bad.clone()));
            continue;
        }
        let doc = json!({"id": id, "amount": n * 100, "note": format!("note {n}")});
        input.push((id.clone(), doc.to_string()));
        expected.insert(id, doc);
    }
    h.start("a", &[]);
    produce(&producer(&h.bootstrap), &source, &input);
    let logs = h.log("a");
    wait_caught_up(&mut h, partitions, &logs);

    let letters = read_committed(
        &h.bootstrap,
        &dead_letters,
        1,
        Duration::from_secs(30),
        Duration::from_secs(3),
    );
    assert_eq!(letters.len(), 1, "{letters:?}; logs: {logs}");
    let (_, value, headers) = &letters[0];
    assert_eq!(value, &bad, "the dead letter holds the original bytes");
    let reason = headers.get("keystone.reason").cloned().unwrap_or_default();
    assert!(
        reason.contains(&index)
            && (reason.contains("mapper_parsing_exception")
                || reason.contains("document_parsing_exception")),
        "keystone.reason names the index and the error type: {headers:?}"
    );
    assert_eq!(headers.get("keystone.topic"), Some(&source), "{headers:?}");

    os.refresh(&index).await.expect("refresh");
    let docs: BTreeMap<String, Value> = os
        .search_all(&index)
        .await
        .expect("search_all")
        .into_iter()
        .map(|(id, source, _)| (id, source))
        .collect();
    assert_eq!(docs, expected, "every other document; logs: {logs}");
    assert_eq!(os.count(&index).await.expect("count"), 39);
    assert!(
        h.metric("a", r#"keystone_sink_items_total{result="failed""#) >= 1.0,
        "the refused item is counted"
    );
}

// ---------------------------------------------------------------------------
// 3. OpenSearch down for 30 s mid-stream
// ---------------------------------------------------------------------------

/// `/readyz` answers that were not 200: when (since the watch started), the
/// status and the body.
type NotReady = Vec<(Duration, u16, String)>;

/// Samples `/readyz` of a port until stopped: how many samples, and the answers
/// that were not 200.
struct ReadinessWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(usize, NotReady)>,
}

impl ReadinessWatch {
    fn start(port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let (mut samples, mut bad) = (0, Vec::new());
            while !flag.load(Ordering::Relaxed) {
                let (status, body) = http_request(port, "GET", "/readyz");
                samples += 1;
                if status != 200 {
                    bad.push((started.elapsed(), status, body));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            (samples, bad)
        });
        Self { stop, thread }
    }

    fn finish(self) -> (usize, NotReady) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

async fn opensearch_outage(prefix: &str, version_field: Option<&str>) {
    let _exclusive = OPENSEARCH.write().await;
    let started = Instant::now();
    let os = opensearch().await;
    let seed = seed(prefix);
    let name = unique(prefix);
    let index = name.clone();
    let _cleanup = os.delete_on_drop(&index);
    let partitions = 3;
    let manifest = cdc_search_pipeline(&name, os.url(), &index, version_field);
    let mut h = Harness::new(&name, &manifest, partitions).await;
    let source = h.plan.source.topic.clone();
    let logs = h.log("a");
    let cdc = cdc_stream(200, seed);
    let total = cdc.records.len();

    h.start("a", &[]);
    h.wait_ready("a");
    let watch = ReadinessWatch::start(h.ports["a"]);

    // About 60 s of input in 40 chunks; OpenSearch goes away after ~15 s.
    let chunks = 40;
    let pairs: Vec<Vec<(String, String)>> = (0..chunks)
        .map(|c| cdc.pairs(total * c / chunks..total * (c + 1) / chunks))
        .collect();
    let bootstrap = h.bootstrap.clone();
    let topic = source.clone();
    let producing = std::thread::spawn(move || {
        let p = producer(&bootstrap);
        for chunk in pairs {
            produce(&p, &topic, &chunk);
            std::thread::sleep(Duration::from_millis(1500));
        }
    });
    tokio::time::sleep(Duration::from_secs(15)).await;
    let indexed_before = {
        os.refresh(&index).await.expect("refresh before the outage");
        os.count(&index).await.expect("count before the outage")
    };
    os.stop().await.expect("e2e/testbed stop opensearch");
    let stopped_at = Instant::now();
    // A commit already under way may still finish; after that, none may
    // until the cluster has the documents.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let frozen = committed(&h, partitions);
    let ends_then = end_offsets(&h, &source, partitions);
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(stopped_at.elapsed())).await;
    let still = committed(&h, partitions);
    let ends_later = end_offsets(&h, &source, partitions);
    let retries = h.metric("a", "keystone_sink_retries_total");
    os.start().await.expect("e2e/testbed start opensearch");
    let outage = stopped_at.elapsed();

    producing.join().expect("producer");
    wait_caught_up(&mut h, partitions, &logs);
    let (samples, not_ready) = watch.finish();
    // The instance rode out the outage: it never exited (nor restarted).
    assert_running(&mut h, &logs);

    assert!(
        indexed_before > 0,
        "nothing was indexed before the outage: the outage hit no stream"
    );
    assert!(
        not_ready.is_empty(),
        "/readyz not ready in {} of {samples} samples: {not_ready:?}; logs: {logs}",
        not_ready.len()
    );
    assert!(
        ends_later.values().sum::<i64>() > ends_then.values().sum::<i64>(),
        "the input went on during the outage"
    );
    assert_eq!(
        frozen, still,
        "offsets were committed while OpenSearch was down; logs: {logs}"
    );
    assert!(
        retries > 0.0,
        "the sink never retried: it did not see the outage; logs: {logs}"
    );
    assert_index_is_reference(&os, &index, &cdc, version_field.is_some(), &logs).await;
    eprintln!(
        "{total} records, {indexed_before} indexed before an outage of {outage:?}, {retries} retries, {samples} readiness samples, in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn opensearch_down_for_30s_mid_stream_loses_and_duplicates_nothing() {
    opensearch_outage("search-outage", Some("seq")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn opensearch_down_for_30s_without_versions_keeps_the_last_write_per_key() {
    opensearch_outage("search-outage-nover", None).await;
}
