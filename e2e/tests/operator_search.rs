//! The first sample, `config/samples/orders-cdc-to-search.yaml`, on the cluster:
//! the operator deploys it, the runtime pod writes the search sink into the
//! testbed's real OpenSearch with credentials from a Secret, and the index ends
//! up holding the last state of every order, as computed here from the input.
//!
//! Needs `cargo build -p keystone-runtime` as well as the operator.

mod operator_support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use keystone_e2e::opensearch::OpenSearch;
use keystone_e2e::wait_until;
use kube::Api;
use kube::api::ListParams;
use operator_support::*;
use serde_json::{Value, json};

/// What the index must hold: per order, the source fields of its event with the
/// highest `seq`, and that `seq` as the document's version. Lines that are not
/// JSON or whose `seq` is not an integer are the sample's poison events.
fn reference(input: &str) -> BTreeMap<String, (Value, i64)> {
    let mut last: BTreeMap<String, (Value, i64)> = BTreeMap::new();
    for line in input.lines() {
        let Ok(event) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let (Some(order), Some(seq)) = (event["order_id"].as_str(), event["seq"].as_i64()) else {
            continue;
        };
        if last.get(order).is_some_and(|(_, known)| *known >= seq) {
            continue;
        }
        let after = &event["after"];
        let document = json!({
            "order_id": order,
            "seq": seq,
            "op": event["op"],
            "status": after["status"],
            "amount": after["amount"],
            "customer_id": after["customer_id"],
        });
        last.insert(order.to_owned(), (document, seq));
    }
    last
}

#[tokio::test]
async fn the_cdc_to_search_sample_runs_on_the_cluster() {
    let tb = testbed().await;
    require_runtime_binary();
    install_crds(&tb);
    let search = OpenSearch::from_env()
        .await
        .expect("the testbed's OpenSearch");
    let ns = pipeline_namespace(&tb, "op-search").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let operator = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "op-search");
    let kafka = Kafka::new(&tb);

    // The sample as a user would apply it, pointed at this testbed: its own
    // topics and index, the testbed's OpenSearch, and credentials from a Secret.
    let source = unique("e2e.orders.cdc");
    let ordered = format!("{source}.ordered");
    let index = unique("e2e-orders").replace('.', "-").to_lowercase();
    kafka.create(&source, 2).await;
    let password = "s3cr3t-never-in-the-plan";
    create_secret(
        &ns,
        "search-credentials",
        &[("username", "keystone"), ("password", password)],
    )
    .await;
    let sample = std::fs::read_to_string(repo().join("config/samples/orders-cdc-to-search.yaml"))
        .expect("the sample");
    let manifest = sample
        .replace("namespace: default", &format!("namespace: {}", ns.name()))
        .replace("topic: orders.cdc", &format!("topic: {source}"))
        .replace(
            "topic: orders.changes.ordered",
            &format!("topic: {ordered}"),
        )
        .replace("http://opensearch.search.svc:9200", search.url())
        .replace(
            "index: orders",
            &format!(
                "index: {index}\n        indexSettings: {{number_of_replicas: \"0\"}}\n        credentialsSecret: search-credentials"
            ),
        )
        .replace("commitInterval: 1s", "commitInterval: 200ms\n  topicDeletionPolicy: Delete")
        .replace("parallelism: 2", "parallelism: 1");
    assert!(
        manifest.contains(&index) && manifest.contains(search.url()),
        "{manifest}"
    );
    apply_yaml(&tb, &manifest).await;

    wait_ready(&ns, "orders-cdc-to-search", &operator).await;

    // The credentials reach the pod as Secret references, never through the plan.
    let deployments: Api<Deployment> = ns.api();
    let deployment = deployments
        .get("orders-cdc-to-search-s0")
        .await
        .expect("the stage's Deployment");
    let rendered = serde_json::to_string(&deployment).expect("JSON");
    assert!(rendered.contains("secretKeyRef") && rendered.contains("search-credentials"));
    assert!(!rendered.contains(password), "{rendered}");
    let config_maps: Api<ConfigMap> = ns.api();
    for config_map in config_maps
        .list(&ListParams::default())
        .await
        .expect("ConfigMaps")
    {
        let text = serde_json::to_string(&config_map.data).expect("JSON");
        assert!(!text.contains(password), "a ConfigMap holds the password");
    }

    let input = std::fs::read_to_string(repo().join("config/samples/data/orders-cdc.jsonl"))
        .expect("the sample data");
    produce_lines(&tb, &source, &input, |line| {
        serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|e| e["order_id"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "poison".to_owned())
    })
    .await;

    let expected = reference(&input);
    assert_eq!(expected.len(), 6, "the sample has six orders");
    let documents = wait_until(
        Duration::from_secs(120),
        "the index holds the last state of every order",
        || async {
            search.refresh(&index).await.ok()?;
            let documents = search.search_all(&index).await.ok()?;
            let done = documents.len() == expected.len()
                && documents
                    .iter()
                    .all(|(id, _, version)| expected.get(id).is_some_and(|(_, v)| v == version));
            done.then_some(documents)
        },
        || async { format!("{:?}", search.search_all(&index).await) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    for (id, source, version) in documents {
        let (document, seq) = &expected[&id];
        assert_eq!(version, *seq, "{id}: the version is the last seq");
        assert_eq!(&source, document, "{id}: the document is its last state");
    }
    search.delete_index(&index).await.expect("delete the index");
    ns.delete().await.expect("delete namespace");
}
