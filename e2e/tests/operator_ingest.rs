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
use keystone_e2e::TestNamespace;
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

/// The idempotency stamps of the records read, sorted.
fn sorted_rids<T>(records: &[(String, String, T)]) -> Vec<String> {
    let mut rids: Vec<String> = records
        .iter()
        .map(|(_, value, _)| {
            let event: Value = serde_json::from_str(value).expect("JSON");
            event["rid"].as_str().expect("rid").to_owned()
        })
        .collect();
    rids.sort();
    rids
}

/// The Service's name does not resolve outside the cluster: the ingest
/// pod's address.
async fn ingest_pod_ip(ns: &TestNamespace) -> String {
    let pods = ns
        .api::<Pod>()
        .list(
            &ListParams::default().labels("keystone.dev/pipeline=clicks,keystone.dev/stage=ingest"),
        )
        .await
        .expect("pods");
    pods.items
        .iter()
        .find_map(|p| p.status.as_ref().and_then(|s| s.pod_ip.clone()))
        .expect("the ingest pod's IP")
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

    let ip = ingest_pod_ip(&ns).await;
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
    let rids = sorted_rids(&out);
    let mut expected: Vec<String> = (0..20).map(|i| format!("req-1/{i}")).collect();
    expected.sort();
    assert_eq!(
        rids, expected,
        "each record once: the retry was dropped by dedup"
    );
    ns.delete().await.expect("delete namespace");
}

/// A certificate authority for the server, one for the devices, a server
/// certificate for `host` and a device's client certificate, made by openssl
/// in `dir`.
fn make_certificates(dir: &std::path::Path, host: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let script = format!(
        r#"set -e
for ca in server-ca devices-ca; do
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -keyout $ca.key -out $ca.crt -subj /CN=$ca \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
done
printf 'subjectAltName=DNS:{host}\nextendedKeyUsage=serverAuth\n' > server.ext
printf 'extendedKeyUsage=clientAuth\n' > device.ext
for leaf in server:server-ca device:devices-ca; do
  name=${{leaf%%:*}}; ca=${{leaf#*:}}
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $name.key -out $name.csr -subj /CN=$name
  openssl x509 -req -in $name.csr -CA $ca.crt -CAkey $ca.key -CAcreateserial -days 2 -out $name.crt -extfile $name.ext
done
"#
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn an_endpoint_with_mutual_tls_granted_tokens_and_an_ingress_on_the_cluster() {
    let tb = testbed().await;
    require_runtime_binary();
    install_crds(&tb);
    let ns = pipeline_namespace(&tb, "op-ingest-tls").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let config = tb
        .state_dir()
        .join(format!("e2e-operator-{}-ingest.yaml", ns.name()));
    std::fs::write(
        &config,
        "ingest:\n  ingress:\n    enabled: true\n    className: nginx\n    host: \"{pipeline}.{namespace}.ingest.test\"\n",
    )
    .unwrap();
    let operator = OperatorProcess::start_with(
        &tb,
        ns.name(),
        op_ns.name(),
        "op-ingest-tls",
        &[("KEYSTONE_OPERATOR_CONFIG", config.to_str().unwrap())],
    );
    let host = format!("clicks-ingest.{}.svc", ns.name());
    let pki = tb.state_dir().join(format!("e2e-{}-pki", ns.name()));
    make_certificates(&pki, &host);
    let read = |file: &str| std::fs::read_to_string(pki.join(file)).unwrap();
    create_secret(
        &ns,
        "clicks-tls",
        &[
            ("tls.crt", &read("server.crt")),
            ("tls.key", &read("server.key")),
        ],
    )
    .await;
    create_secret(&ns, "devices-ca", &[("ca.crt", &read("devices-ca.crt"))]).await;
    // One Secret for the namespace's pipelines; this one grants `mobile` only.
    create_secret(
        &ns,
        "ingest-tokens",
        &[("mobile", "tok-mobile"), ("partner", "tok-partner")],
    )
    .await;
    let topic = unique("e2e.clicks-tls");
    let manifest = manifest(ns.name(), &topic).replace(
        "      tokensSecret: clicks-tokens\n",
        "      tokensSecret: ingest-tokens\n      grantedTokens: [mobile]\n      tls: {secret: clicks-tls, clientCaSecret: devices-ca}\n",
    );
    apply_yaml(&tb, &manifest).await;
    let pipeline = wait_ready(&ns, "clicks", &operator).await;
    let status = pipeline
        .status
        .expect("status")
        .ingest
        .expect("status.ingest");
    assert_eq!(status.url, format!("https://{host}:8443/v1/clicks"));
    assert_eq!(
        status.ingress_url.as_deref(),
        Some(format!("http://clicks.{}.ingest.test/v1/clicks", ns.name()).as_str())
    );
    let ingress = ns
        .api::<k8s_openapi::api::networking::v1::Ingress>()
        .get("clicks-ingest")
        .await
        .expect("the endpoint's Ingress");
    let ingress = serde_json::to_value(&ingress).unwrap();
    assert_eq!(ingress["spec"]["ingressClassName"], "nginx");
    assert_eq!(
        ingress["spec"]["rules"][0]["host"],
        format!("clicks.{}.ingest.test", ns.name())
    );
    assert_eq!(
        ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"],
        serde_json::json!({"name": "clicks-ingest", "port": {"name": "https"}})
    );

    // The certificate names the Service: resolve it to the pod's address.
    let ip: std::net::IpAddr = ingest_pod_ip(&ns).await.parse().expect("an IP");
    let url = format!("https://{host}:8443/v1/clicks");
    let client = |device: bool| {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(read("server-ca.crt").as_bytes()).unwrap(),
            )
            .resolve(&host, std::net::SocketAddr::new(ip, 8443))
            .timeout(Duration::from_secs(60));
        if device {
            let identity = format!("{}{}", read("device.crt"), read("device.key"));
            builder = builder.identity(reqwest::Identity::from_pem(identity.as_bytes()).unwrap());
        }
        builder.build().unwrap()
    };
    let body: String = (0..10)
        .map(|i| format!("{{\"user\":\"u{}\",\"page\":\"/p{i}\"}}\n", i % 3))
        .collect();
    let without_certificate = client(false)
        .post(&url)
        .bearer_auth("tok-mobile")
        .header("idempotency-key", "req-0")
        .body(body.clone())
        .send()
        .await;
    assert!(
        without_certificate.is_err(),
        "no client certificate: {without_certificate:?}"
    );
    let device = client(true);
    let (status, reply) = post(&device, &url, Some("tok-partner"), "req-1", &body).await;
    assert_eq!(status, 403, "a token granted to other pipelines: {reply}");
    let (status, reply) = post(&device, &url, Some("tok-mobile"), "req-1", &body).await;
    assert_eq!(status, 200, "{reply}");
    // Events are not taken in clear on the probes' port.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let (status, reply) = post(
        &plain,
        &format!("http://{ip}:8080/v1/clicks"),
        Some("tok-mobile"),
        "req-2",
        &body,
    )
    .await;
    assert_eq!(status, 404, "{reply}");

    let bootstrap = tb.kafka_bootstrap_servers().expect("kafka").to_owned();
    let out = runtime_support::read_committed(
        &bootstrap,
        &format!("{topic}.out"),
        10,
        Duration::from_secs(60),
        Duration::from_secs(3),
    );
    let rids = sorted_rids(&out);
    let mut expected: Vec<String> = (0..10).map(|i| format!("req-1/{i}")).collect();
    expected.sort();
    assert_eq!(rids, expected, "only the admitted request's records");
    ns.delete().await.expect("delete namespace");
    let _ = std::fs::remove_dir_all(&pki);
}
