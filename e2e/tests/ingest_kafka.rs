//! `keystone-runtime ingest` on the testbed's real Kafka: a 2xx only once
//! the records are in the source topic (keyed, with the sending token's name
//! and the idempotency key), nothing of a refused request in it, and a 503
//! with `Retry-After` when the broker cannot store them.
//!
//! Needs `target/debug/keystone-runtime` (`cargo build -p keystone-runtime`;
//! scripts/test builds it) and a running testbed.

mod runtime_support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keystone_crds::pipeline::http::{HttpPartial, HttpSourceSpec};
use runtime_support::*;
use serde_json::{Value, json};

const MANIFEST: &str = r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: NAME}
spec:
  source:
    topic: e2e.NAME
    key: [user]
    schema:
      fields:
        - {name: user, type: string}
        - {name: amount, type: integer}
        - {name: rid, type: string}
  steps:
    - name: once
      dedup: {key: [rid], window: 10m}
  sinks: [{name: out, kafka: {topic: e2e.NAME.out}}]
"#;

/// The sender's trace context, carried onto each record.
const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// An ingest process and the URL of its endpoint.
struct Ingest {
    child: Child,
    url: String,
    port: u16,
}

impl Drop for Ingest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The harness's plan with an ingest endpoint at `/events` (records stamped
/// with `rid`), and one token, `mobile`.
async fn harness(name: &str) -> Harness {
    let mut h = Harness::new(name, &MANIFEST.replace("NAME", name), 3).await;
    h.plan.ingest = Some(HttpSourceSpec {
        path: "/events".to_owned(),
        tokens_secret: "unused-here".to_owned(),
        granted_tokens: Vec::new(),
        tls: None,
        max_body_bytes: 1 << 20,
        max_records: 1000,
        rate_limit: None,
        partial: HttpPartial::RejectAll,
        idempotency_field: Some("rid".to_owned()),
        partitions: 3,
        replicas: 1,
    });
    std::fs::write(&h.plan_path, serde_json::to_vec_pretty(&h.plan).unwrap()).unwrap();
    let tokens = h.dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    std::fs::write(tokens.join("mobile"), "tok-mobile\n").unwrap();
    h
}

fn start(h: &Harness, bootstrap: &str, extra: &[&str]) -> Ingest {
    let port = free_port();
    let log = std::fs::File::create(h.dir.join("ingest.log")).unwrap();
    let child = Command::new(runtime_binary())
        .arg("ingest")
        .arg("--plan")
        .arg(&h.plan_path)
        .arg("--tokens-dir")
        .arg(h.dir.join("tokens"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .env("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("the runtime starts");
    let ingest = Ingest {
        child,
        url: format!("http://127.0.0.1:{port}/events"),
        port,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_request(ingest.port, "GET", "/healthz").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the ingest endpoint did not come up:\n{}",
            log_of(&h.dir)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ingest
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("ingest.log")).unwrap_or_default()
}

async fn post(
    ingest: &Ingest,
    key: &str,
    body: String,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let response = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
        .post(&ingest.url)
        .bearer_auth("tok-mobile")
        .header("content-type", "application/x-ndjson")
        .header("idempotency-key", key)
        .header("traceparent", TRACE)
        .body(body)
        .send()
        .await
        .expect("an answer");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.bytes().await.expect("a body");
    let body = serde_json::from_slice(&body).expect("JSON");
    (status, body, headers)
}

#[tokio::test(flavor = "multi_thread")]
async fn accepted_records_are_in_the_source_topic_when_the_answer_comes() {
    let name = unique("ingest");
    let h = harness(&name).await;
    let ingest = start(&h, &h.bootstrap, &[]);
    let body: String = (0..50)
        .map(|i| format!("{{\"user\":\"u{}\",\"amount\":{i}}}\n", i % 7))
        .collect();
    let (status, reply, _) = post(&ingest, "req-1", body).await;
    assert_eq!((status, reply), (200, json!({"accepted": 50})));

    // Already there: read without waiting for more.
    let topic = &h.plan.source.topic;
    let records = read_committed(
        &h.bootstrap,
        topic,
        50,
        Duration::from_secs(10),
        Duration::ZERO,
    );
    assert_eq!(records.len(), 50, "{records:?}");
    let mut stamps = Vec::new();
    for (key, value, headers) in &records {
        let value: Value = serde_json::from_str(value).unwrap();
        assert_eq!(value["user"].as_str(), Some(key.as_str()), "keyed by user");
        assert_eq!(
            headers.get("keystone-ingest-token").map(String::as_str),
            Some("mobile")
        );
        assert_eq!(headers.get("traceparent").map(String::as_str), Some(TRACE));
        stamps.push(value["rid"].as_str().unwrap().to_owned());
    }
    stamps.sort();
    let mut expected: Vec<String> = (0..50).map(|i| format!("req-1/{i}")).collect();
    expected.sort();
    assert_eq!(stamps, expected);

    // A batch with one bad record: refused whole, nothing written.
    let (status, reply, _) = post(
        &ingest,
        "req-2",
        "{\"user\":\"a\",\"amount\":1}\n{\"user\":\"b\",\"amount\":\"x\"}\n".to_owned(),
    )
    .await;
    assert_eq!(status, 422, "{reply}");
    let records = read_committed(
        &h.bootstrap,
        topic,
        51,
        Duration::from_secs(3),
        Duration::ZERO,
    );
    assert_eq!(records.len(), 50, "a refused request wrote records");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_that_cannot_store_the_records_gets_503_with_retry_after() {
    let name = unique("ingest-down");
    let h = harness(&name).await;
    // Nothing listens there: no record is ever acknowledged.
    let dead = format!("127.0.0.1:{}", free_port());
    let ingest = start(&h, &dead, &["--delivery-timeout-secs", "2"]);
    let started = Instant::now();
    let (status, reply, headers) = post(
        &ingest,
        "req-1",
        "{\"user\":\"a\",\"amount\":1}\n".to_owned(),
    )
    .await;
    assert_eq!(status, 503, "{reply}\n{}", log_of(&h.dir));
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    assert!(
        reply["error"].as_str().unwrap().contains("retry it"),
        "{reply}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the answer took {:?}",
        started.elapsed()
    );
}
