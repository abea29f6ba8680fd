//! The testbed's OpenSearch and the e2e client for it: externally versioned
//! documents written with the bulk API read back with their versions, stale
//! versions are refused, the server answers connections from a pod address,
//! and the documents survive `e2e/testbed stop|start opensearch`.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty};
use hyper::Method;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use keystone_e2e::Testbed;
use keystone_e2e::opensearch::OpenSearch;
use serde_json::{Value, json};

/// The tests of this file take turns: one of them stops the server.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn opensearch() -> OpenSearch {
    let os = OpenSearch::from_env().await.expect("opensearch");
    os.wait_ready(Duration::from_secs(60))
        .await
        .expect("opensearch ready");
    os
}

async fn fresh_index(os: &OpenSearch, name: &str) {
    os.delete_index(name).await.expect("delete leftover index");
    os.create_index(
        name,
        &json!({
            "settings": {"number_of_shards": 1, "number_of_replicas": 0},
            "mappings": {"properties": {"name": {"type": "keyword"}, "n": {"type": "long"}}},
        }),
    )
    .await
    .expect("create index");
}

/// NDJSON for the bulk API: `(id, external version, source)` index actions.
fn bulk_body(index: &str, docs: &[(&str, i64, Value)]) -> String {
    let mut body = String::new();
    for (id, version, source) in docs {
        let action = json!({"index": {
            "_index": index, "_id": id, "version": version, "version_type": "external",
        }});
        body.push_str(&format!("{action}\n{source}\n"));
    }
    body
}

fn item_statuses(resp: &Value) -> Vec<u64> {
    resp["items"]
        .as_array()
        .unwrap_or_else(|| panic!("bulk answer without items: {resp}"))
        .iter()
        .map(|item| item["index"]["status"].as_u64().unwrap_or(0))
        .collect()
}

/// `GET /` from a pod address (`127.<pod net>.0.5`): pods of the process
/// kubelet reach the OpenSearch bound to 127.0.0.1.
async fn get_root_from_pod_address(os: &OpenSearch, pod_net: u8) -> (Ipv4Addr, u16, Value) {
    let source = Ipv4Addr::new(127, pod_net, 0, 5);
    let server: SocketAddr = tokio::net::lookup_host(os.authority())
        .await
        .expect("resolve")
        .next()
        .expect("an address");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((source, 0)))
        .expect("bind the pod address");
    let stream = socket
        .connect(server)
        .await
        .expect("connect from pod address");
    let local = match stream.local_addr().expect("local addr") {
        SocketAddr::V4(a) => *a.ip(),
        other => panic!("not IPv4: {other}"),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = hyper::Request::get("/")
        .header(hyper::header::HOST, os.authority())
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = sender.send_request(req).await.expect("GET /");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (
        local,
        status,
        serde_json::from_slice(&body).expect("JSON from GET /"),
    )
}

#[tokio::test]
async fn versioned_documents_survive_a_restart() {
    let _serial = SERIAL.lock().await;
    let os = opensearch().await;

    let tb = Testbed::from_env().await.expect("testbed");
    let pod_net: u8 = tb
        .var("KEYSTONE_TESTBED_POD_NET")
        .unwrap_or("1")
        .parse()
        .expect("pod net");
    let (local, status, root) = get_root_from_pod_address(&os, pod_net).await;
    assert_eq!(local, Ipv4Addr::new(127, pod_net, 0, 5));
    assert_eq!(status, 200, "{root}");
    assert_eq!(root["version"]["distribution"], "opensearch", "{root}");
    let version = tb.var("KEYSTONE_OPENSEARCH_VERSION").unwrap_or("2.19.6");
    assert_eq!(root["version"]["number"], version, "{root}");

    let index = format!("e2e-os-restart-{}", std::process::id());
    fresh_index(&os, &index).await;

    let resp = os
        .bulk(&bulk_body(
            &index,
            &[
                ("a", 5, json!({"name": "alpha", "n": 1})),
                ("b", 7, json!({"name": "beta", "n": 2})),
            ],
        ))
        .await
        .expect("bulk");
    assert_eq!(resp["errors"], false, "{resp}");
    assert_eq!(item_statuses(&resp), [201, 201], "{resp}");

    // External versions: an older one (4 < 5) and an equal one (7) are
    // refused with 409, a newer one (8) replaces the document.
    let resp = os
        .bulk(&bulk_body(
            &index,
            &[
                ("a", 4, json!({"name": "stale", "n": -1})),
                ("b", 7, json!({"name": "same version", "n": -1})),
                ("b", 8, json!({"name": "beta", "n": 3})),
            ],
        ))
        .await
        .expect("bulk");
    assert_eq!(resp["errors"], true, "{resp}");
    assert_eq!(item_statuses(&resp), [409, 409, 200], "{resp}");
    assert_eq!(
        resp["items"][0]["index"]["error"]["type"], "version_conflict_engine_exception",
        "{resp}"
    );

    // Real-time get, before any refresh.
    assert_eq!(
        os.get(&index, "a").await.expect("get a"),
        Some((json!({"name": "alpha", "n": 1}), 5))
    );
    assert_eq!(os.get(&index, "nope").await.expect("get nope"), None);

    os.refresh(&index).await.expect("refresh");
    let expected = vec![
        ("a".to_owned(), json!({"name": "alpha", "n": 1}), 5),
        ("b".to_owned(), json!({"name": "beta", "n": 3}), 8),
    ];
    assert_eq!(os.search_all(&index).await.expect("search"), expected);
    assert_eq!(os.count(&index).await.expect("count"), 2);

    os.stop().await.expect("e2e/testbed stop opensearch");
    let down = os.health().await;
    assert!(
        down.is_err(),
        "OpenSearch still answers after stop: {down:?}"
    );
    assert!(
        os.search_all(&index).await.is_err(),
        "search_all must fail while OpenSearch is down"
    );

    os.start().await.expect("e2e/testbed start opensearch");
    let health = os
        .request_json(Method::GET, &format!("/_cluster/health/{index}"), None)
        .await
        .expect("index health after start")
        .json()
        .expect("health JSON");
    assert_eq!(health["status"], "green", "{health}");
    assert_eq!(
        os.search_all(&index).await.expect("search after restart"),
        expected
    );
    assert_eq!(os.count(&index).await.expect("count after restart"), 2);
    assert_eq!(
        os.get(&index, "b").await.expect("get b after restart"),
        Some((json!({"name": "beta", "n": 3}), 8))
    );

    os.delete_index(&index).await.expect("delete index");
    assert_eq!(os.get(&index, "a").await.expect("get after delete"), None);
    assert!(os.count(&index).await.is_err(), "count of a deleted index");
    os.delete_index(&index)
        .await
        .expect("deleting a missing index is fine");
}

#[tokio::test]
async fn search_all_reads_past_one_page() {
    let _serial = SERIAL.lock().await;
    let os = opensearch().await;
    let index = format!("e2e-os-scroll-{}", std::process::id());
    fresh_index(&os, &index).await;

    // 2500 documents: more than two pages of search_all's scroll.
    let docs: Vec<(String, i64, Value)> = (0..2500)
        .map(|i| (format!("doc-{i:05}"), 100 + i, json!({"name": "x", "n": i})))
        .collect();
    let borrowed: Vec<(&str, i64, Value)> = docs
        .iter()
        .map(|(id, v, s)| (id.as_str(), *v, s.clone()))
        .collect();
    let resp = os.bulk(&bulk_body(&index, &borrowed)).await.expect("bulk");
    assert_eq!(resp["errors"], false);
    assert_eq!(item_statuses(&resp).len(), 2500);

    os.refresh(&index).await.expect("refresh");
    assert_eq!(os.count(&index).await.expect("count"), 2500);
    let all = os.search_all(&index).await.expect("search_all");
    assert_eq!(all.len(), 2500);
    for ((id, source, version), (want_id, want_version, want_source)) in all.iter().zip(&docs) {
        assert_eq!(id, want_id);
        assert_eq!(version, want_version);
        assert_eq!(source, want_source);
    }

    os.delete_index(&index).await.expect("delete index");
}
