//! Sink-level tests: local mode (golden bulk lines), the behaviour against an
//! unreachable cluster, and (when `KEYSTONE_OPENSEARCH_URL` is set) a real
//! OpenSearch, reached directly or through a small TCP proxy that fails on
//! purpose. With `KEYSTONE_TEST_REQUIRE_OPENSEARCH=1` a missing URL fails the
//! real-server tests instead of skipping them.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use keystone_crds::pipeline::ElasticsearchSinkSpec;
use keystone_crds::schema::{FieldSpec, FieldType, SchemaSpec};

use super::config::SearchConfig;
use super::config::testing::{test_sink, test_spec};
use super::metrics::{ItemResult, RetryReason, SinkMetrics};
use super::test_support::{
    Cluster, Failure, Proxy, SharedWriter, closed_port, opensearch_url, unique_index,
};
use super::*;
use crate::event::Event;

fn event(text: &str) -> Event {
    Event::parse(text.as_bytes().to_vec()).unwrap()
}

/// Writes each event as the host would (serialized once), returning the dead letters.
fn write_all(sink: &mut SearchSink, events: &[Event]) -> Vec<DeadLetter> {
    let mut out = SinkOutput::default();
    for event in events {
        let value = sonic_rs::to_vec(&event.value).unwrap();
        sink.write(
            &SinkRecord {
                event,
                value: &value,
            },
            &mut out,
        )
        .unwrap();
    }
    out.dead_letters
}

fn field(name: &str, field_type: FieldType) -> FieldSpec {
    FieldSpec {
        name: name.into(),
        field_type,
        optional: false,
        description: None,
    }
}

#[test]
fn local_mode_renders_the_bulk_lines() {
    let mut spec = test_spec("http://unused:9200", "orders", &["tenant", "id"]);
    spec.version_field = Some("v".into());
    let out = SharedWriter::default();
    let plan = test_sink("orders-search", spec, SchemaSpec::default());
    let mut sink = SearchSink::to_writer(&plan, Box::new(out.clone())).unwrap();
    assert_eq!(sink.guarantee(), Guarantee::Idempotent);
    let events = [
        event(r#"{"tenant":"acme","id":1,"v":1,"total":9.5}"#),
        event(r#"{"tenant":"acme","id":2,"v":1,"note":"a\"b"}"#),
        event(r#"{"tenant":"acme","id":1,"v":2,"total":10}"#),
        event(r#"{"tenant":"acme","id":2,"v":3,"op":"d"}"#),
        event(r#"{"tenant":"acme","v":4}"#),
        event(r#"{"tenant":"acme","id":3,"v":-1}"#),
    ];
    let dead = write_all(&mut sink, &events);
    let mut prepared = SinkOutput::default();
    assert_eq!(
        sink.prepare(Duration::from_secs(1), &mut prepared).unwrap(),
        Prepared::Ready
    );
    let expected = r#"{"index":{"_index":"orders","_id":"acme:1","version":1,"version_type":"external"}}
{"tenant":"acme","id":1,"v":1,"total":9.5}
{"index":{"_index":"orders","_id":"acme:2","version":1,"version_type":"external"}}
{"tenant":"acme","id":2,"v":1,"note":"a\"b"}
{"index":{"_index":"orders","_id":"acme:1","version":2,"version_type":"external"}}
{"tenant":"acme","id":1,"v":2,"total":10}
{"delete":{"_index":"orders","_id":"acme:2","version":3,"version_type":"external"}}
"#;
    assert_eq!(
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap(),
        expected
    );
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].step, "sink:orders-search");
    assert_eq!(
        dead[0].reason,
        r#"no document id for search index orders: id field "id" is missing or null"#
    );
    assert_eq!(dead[0].original, events[4].raw);
    assert!(
        dead[1].reason.contains(r#""v" is -1"#),
        "{}",
        dead[1].reason
    );
}

fn fast_config(plan: &PlanSink) -> SearchConfig {
    let mut config = SearchConfig::offline(plan).unwrap();
    config.retry_delays = (Duration::from_millis(20), Duration::from_millis(300));
    config
}

fn connect(config: SearchConfig, registry: &prometheus::Registry) -> SearchSink {
    let context = SinkContext {
        registry,
        pipeline: "test",
    };
    SearchSink::start(config, &context).unwrap()
}

/// Prepares until ready or `limit` passes, collecting dead letters.
fn prepare_until_ready(sink: &mut SearchSink, limit: Duration) -> Vec<DeadLetter> {
    let deadline = Instant::now() + limit;
    let mut out = SinkOutput::default();
    while Instant::now() < deadline {
        if sink.prepare(Duration::from_millis(500), &mut out).unwrap() == Prepared::Ready {
            return out.dead_letters;
        }
    }
    panic!("the sink was not ready within {limit:?}");
}

#[test]
fn an_unreachable_cluster_holds_the_host_and_loses_nothing() {
    let port = closed_port();
    let mut spec = test_spec(&format!("http://127.0.0.1:{port}"), "orders", &["id"]);
    spec.bulk_size = 1;
    spec.max_in_flight_bytes = 1024;
    let plan = test_sink("held", spec, SchemaSpec::default());
    let registry = prometheus::Registry::new();
    let mut sink = connect(fast_config(&plan), &registry);
    let mut written = 0;
    while !sink.backpressured() {
        let e = event(&format!(r#"{{"id":{written},"payload":"0123456789"}}"#));
        assert!(write_all(&mut sink, &[e]).is_empty());
        written += 1;
        assert!(written < 100, "never backpressured");
    }
    assert!(written > 5, "each document is far smaller than the limit");
    let mut out = SinkOutput::default();
    assert_eq!(
        sink.prepare(Duration::from_millis(300), &mut out).unwrap(),
        Prepared::Pending
    );
    assert!(sink.backpressured());
    let metrics = sink.metrics().unwrap();
    assert!(metrics.retries_of(RetryReason::Connect) >= 1);
    assert!(metrics.in_flight_bytes.get() >= 1024);
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        text.contains("keystone_sink_in_flight_bytes{sink=\"held\"}"),
        "{text}"
    );
}

#[test]
fn abort_drops_buffered_documents_only() {
    let port = closed_port();
    let spec = test_spec(&format!("http://127.0.0.1:{port}"), "orders", &["id"]);
    let plan = test_sink("aborted", spec, SchemaSpec::default());
    let registry = prometheus::Registry::new();
    let mut sink = connect(fast_config(&plan), &registry);
    write_all(&mut sink, &[event(r#"{"id":1}"#), event(r#"{"id":2}"#)]);
    sink.abort();
    let mut out = SinkOutput::default();
    // Nothing was sent, so nothing is pending: the replay writes them again.
    assert_eq!(
        sink.prepare(Duration::ZERO, &mut out).unwrap(),
        Prepared::Ready
    );
    write_all(&mut sink, &[event(r#"{"id":3}"#)]);
    assert_eq!(
        sink.prepare(Duration::from_millis(50), &mut out).unwrap(),
        Prepared::Pending
    );
    // Sent requests are not dropped by an abort: they finish on their own.
    sink.abort();
    assert_eq!(
        sink.prepare(Duration::from_millis(50), &mut out).unwrap(),
        Prepared::Pending
    );
}

// ---------------------------------------------------------------------------
// A real OpenSearch (the testbed's, or one started by hand).

#[test]
fn a_refused_index_creation_is_an_error_naming_the_index() {
    let Some(url) = opensearch_url() else { return };
    let mut spec = test_spec(&url, &unique_index("refused"), &["id"]);
    spec.index_settings
        .insert("number_of_shards".into(), "0".into());
    let plan = test_sink("refused", spec, SchemaSpec::default());
    let registry = prometheus::Registry::new();
    let mut sink = connect(fast_config(&plan), &registry);
    write_all(&mut sink, &[event(r#"{"id":1}"#)]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let error = loop {
        match sink.prepare(Duration::from_millis(200), &mut SinkOutput::default()) {
            Err(error) => break error.to_string(),
            Ok(_) => assert!(Instant::now() < deadline, "no error"),
        }
    };
    assert!(error.contains("sink \"refused\""), "{error}");
    assert!(error.contains("ks-test-refused"), "{error}");
    assert!(error.contains("could not be created: HTTP 400"), "{error}");
}

fn search_spec(url: &str, index: &str) -> ElasticsearchSinkSpec {
    let mut spec = test_spec(url, index, &["id"]);
    spec.index_settings
        .insert("number_of_replicas".into(), "0".into());
    spec
}

fn orders_schema() -> SchemaSpec {
    SchemaSpec {
        fields: vec![
            field("id", FieldType::String),
            field("v", FieldType::Integer),
            field("n", FieldType::Integer),
            field("at", FieldType::Timestamp),
            field("customer.id", FieldType::Integer),
            field("customer.name", FieldType::String),
        ],
        open: true,
    }
}

#[test]
fn indexes_updates_and_deletes_with_versions_and_replays_as_conflicts() {
    let Some(url) = opensearch_url() else { return };
    let cluster = Cluster::new(&url);
    let index = unique_index("versions");
    let _cleanup = cluster.cleanup(&index);
    let mut spec = search_spec(&url, &index);
    spec.version_field = Some("v".into());
    spec.bulk_size = 2;
    let plan = test_sink("versioned", spec, orders_schema());
    let registry = prometheus::Registry::new();
    let mut sink = connect(fast_config(&plan), &registry);
    let events = [
        event(
            r#"{"id":"a","v":1,"n":1,"at":"2026-01-01T00:00:00Z","customer":{"id":7,"name":"x"}}"#,
        ),
        event(r#"{"id":"b","v":1,"n":10,"at":1767225600000}"#),
        event(r#"{"id":"a","v":2,"n":2}"#),
        event(r#"{"id":"b","v":2,"op":"d"}"#),
        event(r#"{"id":"c","v":5,"n":5}"#),
        // Late and older than what the index holds: a conflict, not a write.
        event(r#"{"id":"c","v":4,"n":4}"#),
    ];
    assert!(write_all(&mut sink, &events).is_empty());
    assert!(prepare_until_ready(&mut sink, Duration::from_secs(60)).is_empty());

    let (_, mapping) = cluster.call(reqwest::Method::GET, &format!("{index}/_mapping"));
    let properties = &mapping[&index]["mappings"]["properties"];
    assert_eq!(properties["n"]["type"], "long", "{mapping}");
    assert_eq!(properties["id"]["type"], "keyword", "{mapping}");
    assert_eq!(properties["at"]["type"], "date", "{mapping}");
    assert_eq!(
        properties["customer"]["properties"]["id"]["type"], "long",
        "{mapping}"
    );

    let (a, a_version) = cluster.doc(&index, "a").unwrap();
    assert_eq!((a["n"].as_i64(), a_version), (Some(2), 2));
    assert!(cluster.doc(&index, "b").is_none());
    let (c, c_version) = cluster.doc(&index, "c").unwrap();
    assert_eq!((c["n"].as_i64(), c_version), (Some(5), 5));
    // Batches go out concurrently (versions keep the order irrelevant), so
    // which write of an id lands first, and is "created", varies.
    let metrics = sink.metrics().unwrap();
    let written = |m: &SinkMetrics| {
        m.items_of(ItemResult::Created)
            + m.items_of(ItemResult::Updated)
            + m.items_of(ItemResult::VersionConflict)
    };
    assert_eq!(written(&metrics), 5);
    assert!(metrics.items_of(ItemResult::VersionConflict) >= 1);
    assert_eq!(metrics.items_of(ItemResult::Deleted), 1);
    let created = metrics.items_of(ItemResult::Created);
    let updated = metrics.items_of(ItemResult::Updated);
    let conflicts = metrics.items_of(ItemResult::VersionConflict);

    // A replay of the whole batch changes nothing: every write is a conflict.
    assert!(write_all(&mut sink, &events).is_empty());
    assert!(prepare_until_ready(&mut sink, Duration::from_secs(60)).is_empty());
    assert_eq!(metrics.items_of(ItemResult::Created), created);
    assert_eq!(metrics.items_of(ItemResult::Updated), updated);
    assert_eq!(
        metrics.items_of(ItemResult::VersionConflict),
        conflicts + events.len() as u64
    );
    assert_eq!(metrics.items_of(ItemResult::Failed), 0);
    assert_eq!(cluster.doc(&index, "a").unwrap(), (a, 2));
    assert_eq!(cluster.doc(&index, "c").unwrap(), (c, 5));
    assert!(cluster.doc(&index, "b").is_none());
}

#[test]
fn a_document_that_breaks_the_mapping_is_a_dead_letter() {
    let Some(url) = opensearch_url() else { return };
    let cluster = Cluster::new(&url);
    let index = unique_index("mapping");
    let _cleanup = cluster.cleanup(&index);
    let plan = test_sink("mapping", search_spec(&url, &index), orders_schema());
    let registry = prometheus::Registry::new();
    let mut sink = connect(fast_config(&plan), &registry);
    let events = [
        event(r#"{"id":"1","n":1}"#),
        event(r#"{"id":"2","n":"not a number"}"#),
        event(r#"{"id":"3","n":3}"#),
    ];
    let mut dead = write_all(&mut sink, &events);
    dead.extend(prepare_until_ready(&mut sink, Duration::from_secs(60)));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].step, "sink:mapping");
    assert_eq!(dead[0].original, events[1].raw);
    let prefix = format!("search index {index} refused the document: mapper_parsing_exception: ");
    assert!(dead[0].reason.starts_with(&prefix), "{}", dead[0].reason);
    assert!(dead[0].reason.contains("[n]"), "{}", dead[0].reason);
    assert!(cluster.doc(&index, "1").is_some() && cluster.doc(&index, "3").is_some());
    assert!(cluster.doc(&index, "2").is_none());
    assert_eq!(sink.metrics().unwrap().items_of(ItemResult::Failed), 1);
}

#[test]
fn without_versions_the_last_write_of_each_id_wins() {
    let Some(url) = opensearch_url() else { return };
    let cluster = Cluster::new(&url);
    let index = unique_index("order");
    let _cleanup = cluster.cleanup(&index);
    let mut spec = search_spec(&url, &index);
    // One document per request: many requests in flight at once, across lanes.
    spec.bulk_size = 1;
    let plan = test_sink("ordered", spec, orders_schema());
    let registry = prometheus::Registry::new();
    let mut sink = connect(fast_config(&plan), &registry);
    let ids = 6;
    let rounds = 40;
    let events: Vec<Event> = (0..rounds)
        .flat_map(|round| (0..ids).map(move |id| event(&format!(r#"{{"id":"{id}","n":{round}}}"#))))
        .collect();
    assert!(write_all(&mut sink, &events).is_empty());
    assert!(prepare_until_ready(&mut sink, Duration::from_secs(120)).is_empty());
    for id in 0..ids {
        let (doc, _) = cluster.doc(&index, &id.to_string()).unwrap();
        assert_eq!(doc["n"].as_i64(), Some(rounds - 1), "id {id}: {doc}");
    }
}

#[test]
fn requests_answered_503_are_sent_again_until_they_succeed() {
    let Some(url) = opensearch_url() else { return };
    let cluster = Cluster::new(&url);
    let proxy = Proxy::start(0, cluster.address(), 3, Failure::Unavailable);
    let index = unique_index("retry");
    let _cleanup = cluster.cleanup(&index);
    let mut spec = search_spec(&format!("http://127.0.0.1:{}", proxy.port), &index);
    spec.bulk_size = 2;
    let plan = test_sink("retried", spec, orders_schema());
    let registry = prometheus::Registry::new();
    let mut sink = connect(fast_config(&plan), &registry);
    let events: Vec<Event> = (0..10)
        .map(|i| event(&format!(r#"{{"id":"{}","n":{i}}}"#, i % 3)))
        .collect();
    assert!(write_all(&mut sink, &events).is_empty());
    assert!(prepare_until_ready(&mut sink, Duration::from_secs(60)).is_empty());
    assert_eq!(proxy.failed.load(Ordering::SeqCst), 3);
    let metrics = sink.metrics().unwrap();
    assert_eq!(metrics.retries_of(RetryReason::Status5xx), 3);
    assert_eq!(cluster.count(&index), 3);
    for (id, last) in [("0", 9), ("1", 7), ("2", 8)] {
        assert_eq!(
            cluster.doc(&index, id).unwrap().0["n"].as_i64(),
            Some(last),
            "id {id}"
        );
    }
}

#[test]
fn a_request_too_large_is_sent_in_halves_and_a_document_too_large_is_dead_lettered() {
    let Some(url) = opensearch_url() else { return };
    let cluster = Cluster::new(&url);
    // 413 to the 4-document request, to its first half (2) and to that half's
    // first document; everything after is forwarded.
    let proxy = Proxy::start(0, cluster.address(), 3, Failure::TooLarge);
    let index = unique_index("too-large");
    let _cleanup = cluster.cleanup(&index);
    let mut spec = search_spec(&format!("http://127.0.0.1:{}", proxy.port), &index);
    spec.bulk_size = 4;
    // No index check first (the proxy answers 413 to anything): the cluster
    // creates the index on the first write.
    spec.create_index = false;
    let plan = test_sink("large", spec, orders_schema());
    let registry = prometheus::Registry::new();
    let mut sink = connect(fast_config(&plan), &registry);
    // One id: one lane, so the four writes go out as one request, in order.
    let events: Vec<Event> = (0..4)
        .map(|n| event(&format!(r#"{{"id":"x","n":{n}}}"#)))
        .collect();
    assert!(write_all(&mut sink, &events).is_empty());
    let dead = prepare_until_ready(&mut sink, Duration::from_secs(60));
    assert_eq!(proxy.failed.load(Ordering::SeqCst), 3);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].reason.contains("HTTP 413"), "{}", dead[0].reason);
    assert_eq!(dead[0].original, events[0].raw);
    // The other three went through, in order: the last write wins.
    assert_eq!(cluster.doc(&index, "x").unwrap().0["n"].as_i64(), Some(3));
    let metrics = sink.metrics().unwrap();
    assert_eq!(metrics.items_of(ItemResult::Failed), 1);
    assert!(!sink.backpressured());
}

#[test]
fn the_sink_catches_up_when_the_cluster_appears() {
    let Some(url) = opensearch_url() else { return };
    let cluster = Cluster::new(&url);
    let port = closed_port();
    let index = unique_index("late");
    let _cleanup = cluster.cleanup(&index);
    let mut spec = search_spec(&format!("http://127.0.0.1:{port}"), &index);
    spec.bulk_size = 1;
    spec.max_in_flight_bytes = 1024;
    let plan = test_sink("late", spec, orders_schema());
    let registry = prometheus::Registry::new();
    let mut sink = connect(fast_config(&plan), &registry);
    let mut written = 0;
    while !sink.backpressured() {
        let e = event(&format!(r#"{{"id":"{written}","n":{written}}}"#));
        assert!(write_all(&mut sink, &[e]).is_empty());
        written += 1;
    }
    let mut out = SinkOutput::default();
    assert_eq!(
        sink.prepare(Duration::from_millis(200), &mut out).unwrap(),
        Prepared::Pending
    );
    assert!(sink.metrics().unwrap().retries_of(RetryReason::Connect) >= 1);
    // The cluster "appears" on the port the sink keeps trying.
    let _proxy = Proxy::start(port, cluster.address(), 0, Failure::Unavailable);
    assert!(prepare_until_ready(&mut sink, Duration::from_secs(60)).is_empty());
    assert!(!sink.backpressured());
    assert_eq!(cluster.count(&index), written);
}

#[test]
fn items_the_cluster_rejects_are_sent_again_in_order() {
    let Some(url) = opensearch_url() else { return };
    let cluster = Cluster::new(&url);
    let proxy = Proxy::start(0, cluster.address(), 2, Failure::RejectItems);
    let index = unique_index("items");
    let _cleanup = cluster.cleanup(&index);
    let mut spec = search_spec(&format!("http://127.0.0.1:{}", proxy.port), &index);
    // The bulk requests create the index (with a dynamic mapping): the first
    // requests through the proxy are bulk requests.
    spec.create_index = false;
    spec.bulk_size = 3;
    let plan = test_sink("items", spec, orders_schema());
    let registry = prometheus::Registry::new();
    let mut sink = connect(fast_config(&plan), &registry);
    // Two ids, so every lane batch holds several writes of one id.
    let events: Vec<Event> = (0..12)
        .map(|i| event(&format!(r#"{{"id":"{}","n":{i}}}"#, i % 2)))
        .collect();
    assert!(write_all(&mut sink, &events).is_empty());
    assert!(prepare_until_ready(&mut sink, Duration::from_secs(60)).is_empty());
    assert_eq!(proxy.failed.load(Ordering::SeqCst), 2);
    let metrics = sink.metrics().unwrap();
    // Two requests of three items each were refused item by item.
    assert_eq!(metrics.retries_of(RetryReason::Item), 6);
    assert_eq!(
        metrics.items_of(ItemResult::Created) + metrics.items_of(ItemResult::Updated),
        12
    );
    assert_eq!(cluster.doc(&index, "0").unwrap().0["n"].as_i64(), Some(10));
    assert_eq!(cluster.doc(&index, "1").unwrap().0["n"].as_i64(), Some(11));
}
