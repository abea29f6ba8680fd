//! An HTTP source on the cluster: the operator creates the source topic and
//! runs the ingest Deployment with the tokens Secret mounted, and reports the
//! endpoint in status; events `POST`ed with a token flow through the
//! pipeline to its sink, a retried request (the same `Idempotency-Key`) is
//! dropped by the pipeline's dedup, and a request without a token is refused.
//!
//! Needs `cargo build -p keystone-runtime` as well as the operator.

mod operator_support;
mod runtime_support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use operator_support::*;
use serde_json::Value;

fn manifest(namespace: &str, topic: &str) -> String {
    format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: clicks, namespace: {namespace}}}
spec:
  source:
    topic: {topic}
    key: [user]
    http:
      path: /v1/clicks
      tokensSecret: clicks-tokens
      idempotencyField: rid
      partitions: 2
      replicas: 1
    schema:
      fields:
        - {{name: user, type: string}}
        - {{name: page, type: string}}
  steps:
    - name: once
      dedup: {{key: [rid], window: 10m}}
  sinks:
    - name: out
      kafka: {{topic: {topic}.out, create: true, partitions: 2}}
  commitInterval: 200ms
"#
    )
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    key: &str,
    body: &str,
) -> (u16, String) {
    let mut request = client
        .post(url)
        .header("content-type", "application/x-ndjson")
        .header("idempotency-key", key)
        .body(body.to_owned());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("an answer");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

#[tokio::test]
async fn events_posted_to_the_ingest_endpoint_flow_through_the_pipeline_on_the_cluster() {
    let tb = testbed().await;
    require_runtime_binary();
    install_crds(&tb);
    let ns = pipeline_namespace(&tb, "op-ingest").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let operator = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "op-ingest");
    create_secret(&ns, "clicks-tokens", &[("mobile", "tok-mobile")]).await;
    let topic = unique("e2e.clicks");
    apply_yaml(&tb, &manifest(ns.name(), &topic)).await;
    let pipeline = wait_ready(&ns, "clicks", &operator).await;
    let status = pipeline.status.expect("status");
    assert_eq!(
        status.ingest.map(|i| i.url),
        Some(format!(
            "http://clicks-ingest.{}.svc:8080/v1/clicks",
            ns.name()
        ))
    );
    assert_eq!(
        Kafka::new(&tb).partitions(&topic),
        Some(2),
        "the operator creates an HTTP source's topic"
    );
    assert!(
        status
            .stages
            .iter()
            .any(|s| s.name == "ingest" && s.ready_replicas == 1),
        "{:?}",
        status.stages
    );

    // The Service's name does not resolve outside the cluster: the pod's address.
    let pods = ns
        .api::<Pod>()
        .list(
            &ListParams::default().labels("keystone.dev/pipeline=clicks,keystone.dev/stage=ingest"),
        )
        .await
        .expect("pods");
    let ip = pods
        .items
        .iter()
        .find_map(|p| p.status.as_ref().and_then(|s| s.pod_ip.clone()))
        .expect("the ingest pod's IP");
    let url = format!("http://{ip}:8080/v1/clicks");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let body: String = (0..20)
        .map(|i| format!("{{\"user\":\"u{}\",\"page\":\"/p{i}\"}}\n", i % 4))
        .collect();
    let (status, reply) = post(&client, &url, None, "req-1", &body).await;
    assert_eq!(status, 401, "{reply}");
    let (status, reply) = post(&client, &url, Some("tok-mobile"), "req-1", &body).await;
    assert_eq!(status, 200, "{reply}");
    // A client that did not see the answer sends it again.
    let (status, reply) = post(&client, &url, Some("tok-mobile"), "req-1", &body).await;
    assert_eq!(status, 200, "{reply}");

    let bootstrap = tb.kafka_bootstrap_servers().expect("kafka").to_owned();
    let source = runtime_support::read_committed(
        &bootstrap,
        &topic,
        40,
        Duration::from_secs(30),
        Duration::from_secs(1),
    );
    assert_eq!(source.len(), 40, "both sends are in the source topic");
    let out = runtime_support::read_committed(
        &bootstrap,
        &format!("{topic}.out"),
        20,
        Duration::from_secs(60),
        Duration::from_secs(5),
    );
    let mut rids: Vec<String> = out
        .iter()
        .map(|(_, value, _)| {
            let event: Value = serde_json::from_str(value).expect("JSON");
            event["rid"].as_str().expect("rid").to_owned()
        })
        .collect();
    rids.sort();
    let mut expected: Vec<String> = (0..20).map(|i| format!("req-1/{i}")).collect();
    expected.sort();
    assert_eq!(
        rids, expected,
        "each record once: the retry was dropped by dedup"
    );
    ns.delete().await.expect("delete namespace");
}
