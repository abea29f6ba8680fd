//! Hostile records and commits on the testbed's real Kafka: records nested
//! 20,000 levels deep (at the top level and inside a field a CEL filter reads),
//! duplicate keys, numbers beyond 64 bits, `-0` and a byte order mark become dead
//! letters or pass unchanged while the partition goes on; a group whose
//! committed offset carries metadata that is not UTF-8 is read.
//!
//! Needs `target/debug/keystone-runtime` (`cargo build -p keystone-runtime`) and
//! a running testbed.

mod runtime_support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use runtime_support::*;

fn manifest(name: &str) -> String {
    format!(
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
        - {{name: payload, type: any}}
        - {{name: n, type: integer, optional: true}}
  steps:
    - name: keep
      filter: {{expression: 'payload != null && id != "skip"'}}
  sinks:
    - name: out
      kafka: {{topic: {name}.out, partitions: 1}}
  delivery: ExactlyOnce
  commitInterval: 300ms
"#
    )
}

/// The values of the first `expected` committed records of the sink topic.
fn sink_values(h: &Harness, expected: usize) -> Vec<String> {
    read_committed(
        &h.bootstrap,
        &h.sink_topic(),
        expected,
        Duration::from_secs(90),
        Duration::from_secs(1),
    )
    .into_iter()
    .map(|(_, value, _)| value)
    .collect()
}

fn nested(levels: usize) -> String {
    format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_records_are_dead_letters_and_the_partition_goes_on() {
    let name = unique("hostile");
    let mut h = Harness::new(&name, &manifest(&name), 1).await;
    let source = h.plan.source.topic.clone();
    let p = producer(&h.bootstrap);
    h.start("a", &[]);
    let record = |value: String| ("k".to_owned(), value);
    let records = vec![
        record(r#"{"id":"first","payload":{}}"#.into()),
        record(format!(
            r#"{{"id":"top","payload":1,"x":{}}}"#,
            nested(20_000)
        )),
        record(format!(
            r#"{{"id":"in-filter","payload":{}}}"#,
            nested(2_000)
        )),
        record(r#"{"id":"dup","payload":{"a":1,"a":2}}"#.into()),
        record(r#"{"id":"wide","payload":{"n":1180591620717411303424},"n":-0}"#.into()),
        record(r#"{"id":"n-wide","payload":{},"n":18446744073709551616}"#.into()),
        record("\u{feff}{\"id\":\"bom\",\"payload\":{}}".into()),
        record(r#"{"id":"last","payload":{}}"#.into()),
    ];
    produce(&p, &source, &records);
    let values = sink_values(&h, 4);
    assert_eq!(
        values,
        [
            r#"{"id":"first","payload":{}}"#,
            r#"{"id":"wide","payload":{"n":1180591620717411303424},"n":0}"#,
            r#"{"id":"bom","payload":{}}"#,
            r#"{"id":"last","payload":{}}"#,
        ]
    );
    let mut dead = read_committed(
        &h.bootstrap,
        &h.plan.dead_letter_topic,
        4,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    dead.sort_by_key(|(_, _, headers)| headers["keystone.offset"].parse::<i64>().unwrap());
    let found: Vec<(&str, &str)> = dead
        .iter()
        .map(|(_, _, headers)| {
            (
                headers["keystone.offset"].as_str(),
                headers["keystone.reason"].as_str(),
            )
        })
        .collect();
    let deep = "nested deeper than the limit of 128 levels of objects and arrays, at ";
    assert_eq!(found.len(), 4, "{found:?}");
    assert_eq!(found[0].0, "1");
    assert!(
        found[0].1.starts_with(&format!("{deep}/x/0/0/")),
        "{found:?}"
    );
    assert_eq!(found[1].0, "2");
    assert!(
        found[1].1.starts_with(&format!("{deep}/payload/0/0/")),
        "{found:?}"
    );
    assert_eq!(
        found[2],
        ("3", r#"duplicate key "a" in the object at /payload"#)
    );
    assert_eq!(
        found[3],
        (
            "5",
            r#"field "n" is integer beyond 64 bits, but the source schema requires integer"#
        )
    );
    assert_eq!(dead[0].1, records[1].1, "the original bytes are kept");
    assert!(
        !h.log("a").contains("panicked"),
        "the instance did not panic: {}",
        h.log("a")
    );
}

/// Commits `offset` for `group` with metadata of any bytes, through bare
/// FindCoordinator v1 and OffsetCommit v2 requests (Kafka clients only take
/// text for metadata), asking again while the group coordinator loads.
fn commit_with_raw_metadata(
    bootstrap: &str,
    group: &str,
    topic: &str,
    offset: i64,
    metadata: &[u8],
) {
    fn put_str(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&i16::try_from(bytes.len()).unwrap().to_be_bytes());
        out.extend_from_slice(bytes);
    }
    fn call(stream: &mut std::net::TcpStream, api_key: i16, version: i16, body: &[u8]) -> Vec<u8> {
        let mut message = Vec::new();
        message.extend_from_slice(&api_key.to_be_bytes());
        message.extend_from_slice(&version.to_be_bytes());
        message.extend_from_slice(&7i32.to_be_bytes());
        put_str(&mut message, b"e2e");
        message.extend_from_slice(body);
        let length = i32::try_from(message.len()).unwrap().to_be_bytes();
        stream.write_all(&length).unwrap();
        stream.write_all(&message).unwrap();
        let mut length = [0u8; 4];
        stream.read_exact(&mut length).unwrap();
        let mut response = vec![0u8; usize::try_from(i32::from_be_bytes(length)).unwrap()];
        stream.read_exact(&mut response).unwrap();
        response
    }
    let mut stream = std::net::TcpStream::connect(bootstrap.split(',').next().unwrap()).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        // FindCoordinator v1: correlation id, throttle time, then the error code.
        let mut body = Vec::new();
        put_str(&mut body, group.as_bytes());
        body.push(0); // a group
        let response = call(&mut stream, 10, 1, &body);
        let error = i16::from_be_bytes([response[8], response[9]]);
        let mut body = Vec::new();
        put_str(&mut body, group.as_bytes());
        body.extend_from_slice(&(-1i32).to_be_bytes()); // no generation
        put_str(&mut body, b""); // no member
        body.extend_from_slice(&(-1i64).to_be_bytes()); // the broker's retention
        body.extend_from_slice(&1i32.to_be_bytes());
        put_str(&mut body, topic.as_bytes());
        body.extend_from_slice(&1i32.to_be_bytes());
        body.extend_from_slice(&0i32.to_be_bytes());
        body.extend_from_slice(&offset.to_be_bytes());
        put_str(&mut body, metadata);
        let committed = error == 0 && {
            let response = call(&mut stream, 8, 2, &body);
            response[response.len() - 2..] == [0, 0]
        };
        if committed {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the commit was refused until the deadline"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// rdkafka's `metadata()` panics on metadata that is not UTF-8. The runtime
/// reads such a commit as carrying no Keystone metadata. (This broker decodes
/// commit metadata and answers it re-encoded, with U+FFFD for invalid bytes; the
/// runtime's unit test against librdkafka's mock broker, which keeps the bytes,
/// covers the invalid case itself.)
#[tokio::test(flavor = "multi_thread")]
async fn a_group_commit_with_metadata_that_is_not_utf8_does_not_stop_the_runtime() {
    let name = unique("commit-meta");
    let mut h = Harness::new(&name, &manifest(&name), 1).await;
    let source = h.plan.source.topic.clone();
    let p = producer(&h.bootstrap);
    let records: Vec<(String, String)> = (0..4)
        .map(|i| ("k".to_owned(), format!(r#"{{"id":"e{i}","payload":{{}}}}"#)))
        .collect();
    produce(&p, &source, &records);
    // Offset 2 committed by someone else, with metadata that is not UTF-8.
    let group = h.plan.stages[0].consumer_group.clone();
    commit_with_raw_metadata(
        &h.bootstrap,
        &group,
        &source,
        2,
        b"\xff\xfe keystone.restore=x \xc3",
    );
    h.start("a", &[]);
    let values = sink_values(&h, 2);
    assert_eq!(
        values,
        [r#"{"id":"e2","payload":{}}"#, r#"{"id":"e3","payload":{}}"#],
        "the runtime resumes from the committed offset"
    );
    assert!(!h.log("a").contains("panicked"), "{}", h.log("a"));
}

/// A record the broker took but larger than the event size limit (1,000,000
/// bytes; a Java producer writes up to 1 MiB by default) is a dead letter with
/// its whole original, instead of a sink record the broker refuses, which
/// stopped the stage.
#[tokio::test(flavor = "multi_thread")]
async fn a_record_over_the_size_limit_is_a_dead_letter_with_its_bytes() {
    use rdkafka::ClientConfig;
    use rdkafka::producer::ThreadedProducer;
    let name = unique("large");
    let mut h = Harness::new(&name, &manifest(&name), 1).await;
    let source = h.plan.source.topic.clone();
    let p: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", &h.bootstrap)
        .set("message.max.bytes", "2000000")
        .create()
        .unwrap();
    h.start("a", &[]);
    let large = format!(r#"{{"id":"large","payload":"{}"}}"#, "x".repeat(1_040_000));
    let fits = format!(r#"{{"id":"fits","payload":"{}"}}"#, "x".repeat(990_000));
    let records = vec![
        ("k".to_owned(), large.clone()),
        ("k".to_owned(), fits.clone()),
        ("k".to_owned(), r#"{"id":"after","payload":{}}"#.to_owned()),
    ];
    produce(&p, &source, &records);
    let values = sink_values(&h, 2);
    assert_eq!(
        values,
        [fits.as_str(), r#"{"id":"after","payload":{}}"#],
        "{}",
        h.log("a")
    );
    let dead = read_committed(
        &h.bootstrap,
        &h.plan.dead_letter_topic,
        1,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1, large, "the whole original");
    assert_eq!(
        dead[0].2["keystone.reason"],
        format!(
            "the event is {} bytes, larger than the limit of 1000000 bytes",
            large.len()
        )
    );
    assert_eq!(dead[0].2["keystone.offset"], "0");
}

/// An event a step made larger than the record limit (a `map` doubling a
/// 600,000-byte field) is a dead letter of step `sinks` with its original,
/// instead of a sink record the broker refuses, which failed the
/// transaction and, retried, stopped the stage; the partition goes on.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_the_steps_grew_past_the_limit_is_a_dead_letter() {
    use rdkafka::ClientConfig;
    use rdkafka::producer::ThreadedProducer;
    let name = unique("grown");
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
        - {{name: payload, type: string}}
  steps:
    - name: twice
      map:
        fields:
          - {{name: payload, expression: 'payload + payload', type: string}}
  sinks:
    - name: out
      kafka: {{topic: {name}.out, partitions: 1}}
  delivery: ExactlyOnce
  commitInterval: 300ms
"#
    );
    let mut h = Harness::new(&name, &manifest, 1).await;
    let source = h.plan.source.topic.clone();
    let p: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", &h.bootstrap)
        .create()
        .unwrap();
    h.start("a", &[]);
    let large = format!(r#"{{"id":"large","payload":"{}"}}"#, "x".repeat(600_000));
    let records = vec![
        (
            "k".to_owned(),
            r#"{"id":"before","payload":"ab"}"#.to_owned(),
        ),
        ("k".to_owned(), large.clone()),
        (
            "k".to_owned(),
            r#"{"id":"after","payload":"cd"}"#.to_owned(),
        ),
    ];
    produce(&p, &source, &records);
    let values = sink_values(&h, 2);
    assert_eq!(
        values,
        [
            r#"{"id":"before","payload":"abab"}"#,
            r#"{"id":"after","payload":"cdcd"}"#
        ],
        "{}",
        h.log("a")
    );
    let dead = read_committed(
        &h.bootstrap,
        &h.plan.dead_letter_topic,
        1,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1, large, "the whole original");
    assert_eq!(dead[0].2["keystone.step"], "sinks");
    let grown = r#"{"id":"large","payload":""}"#.len() + 1_200_000;
    assert_eq!(
        dead[0].2["keystone.reason"],
        format!(
            "the event is {grown} bytes after the steps, larger than the limit of 1000000 bytes for a record a stage writes"
        )
    );
    assert_eq!(dead[0].2["keystone.offset"], "1");
    assert!(!h.log("a").contains("panicked"), "{}", h.log("a"));
}
