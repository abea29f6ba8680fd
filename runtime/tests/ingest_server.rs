//! The ingest endpoint over real HTTP: every answer a client can get, with
//! its status and body, and what reached the delivery behind it (nothing,
//! unless the answer is a 2xx).

mod ingest_support;

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ingest_support::*;
use keystone_runtime::ingest::endpoint::{Idempotency, Partial};
use keystone_runtime::ingest::server::ServerSettings;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn accepted_records_are_delivered_with_their_key_and_token_before_the_answer() {
    let server = start(|_| {}, ServerSettings::default()).await;
    let body = "{\"user\":\"a\",\"amount\":1}\n{\"user\":\"b\",\"amount\":2}\n";
    let (status, reply, _) = answer(
        server
            .post(Some("tok-partner"))
            .header("content-type", "application/x-ndjson")
            .body(body),
    )
    .await;
    assert_eq!((status, reply), (200, json!({"accepted": 2})));
    let delivered = server.delivered();
    assert_eq!(delivered.len(), 2);
    assert_eq!(delivered[0].key.as_deref(), Some(&b"a"[..]));
    assert_eq!(delivered[1].value, br#"{"user":"b","amount":2}"#);
    assert!(
        server
            .origins()
            .iter()
            .all(|o| o.token.as_deref() == Some("partner"))
    );

    // gzip on the wire.
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gzip.write_all(br#"[{"user":"c","amount":3}]"#).unwrap();
    let (status, reply, _) = answer(
        server
            .post(Some("tok-mobile"))
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(gzip.finish().unwrap()),
    )
    .await;
    assert_eq!((status, reply), (200, json!({"accepted": 1})));
    assert_eq!(server.delivered().len(), 3);
}

#[tokio::test]
async fn a_request_without_a_token_of_this_pipeline_is_401_and_delivers_nothing() {
    let server = start(|_| {}, ServerSettings::default()).await;
    let one = r#"{"user":"a","amount":1}"#;
    for token in [None, Some("tok-unknown"), Some("")] {
        let (status, reply, headers) = answer(server.post(token).body(one)).await;
        assert_eq!(status, 401, "{token:?}: {reply}");
        assert!(
            reply["error"].as_str().unwrap().contains("bearer token"),
            "{reply}"
        );
        assert_eq!(
            headers["www-authenticate"],
            "Bearer realm=\"keystone-ingest\""
        );
    }
    assert!(server.delivered().is_empty());
}

#[tokio::test]
async fn a_token_granted_to_other_pipelines_only_is_403_and_delivers_nothing() {
    // One Secret with both tokens, shared with another pipeline: this one
    // grants `mobile` only.
    let tokens = both_tokens().granted(&["mobile".to_owned()]);
    let server = start_endpoint(endpoint(tokens), |_| {}, ServerSettings::default()).await;
    let one = r#"{"user":"a","amount":1}"#;
    let (status, reply, headers) = answer(server.post(Some("tok-partner")).body(one)).await;
    assert_eq!(status, 403, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("\"partner\"")
            && reply["error"].as_str().unwrap().contains("grantedTokens"),
        "{reply}"
    );
    assert!(!headers.contains_key("www-authenticate"));
    assert!(server.delivered().is_empty());
    let (status, reply, _) = answer(server.post(Some("tok-unknown")).body(one)).await;
    assert_eq!(status, 401, "a token of no pipeline: {reply}");
    let (status, reply, _) = answer(server.post(Some("tok-mobile")).body(one)).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(server.delivered().len(), 1);
}

#[tokio::test]
async fn a_well_formed_trace_context_is_carried_onto_each_record() {
    let server = start(|_| {}, ServerSettings::default()).await;
    let two = "{\"user\":\"a\",\"amount\":1}\n{\"user\":\"b\",\"amount\":2}";
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (status, reply, _) = answer(
        server
            .post(Some("tok-mobile"))
            .header("content-type", "application/x-ndjson")
            .header("traceparent", trace)
            .body(two),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let (status, reply, _) = answer(
        server
            .post(Some("tok-mobile"))
            .header("traceparent", "not-a-trace")
            .body("{\"user\":\"c\",\"amount\":3}"),
    )
    .await;
    assert_eq!(
        status, 200,
        "a malformed trace context is no reason to refuse: {reply}"
    );
    let traces: Vec<Option<String>> = server
        .origins()
        .into_iter()
        .map(|o| o.traceparent)
        .collect();
    assert_eq!(
        traces,
        [Some(trace.to_owned()), Some(trace.to_owned()), None]
    );
}

#[tokio::test]
async fn a_batch_with_bad_records_is_422_listing_each_and_delivers_nothing() {
    let server = start(|_| {}, ServerSettings::default()).await;
    let body = r#"[{"user":"a","amount":1},{"user":"b","amount":"x"},{"amount":3}]"#;
    let (status, reply, _) = answer(server.post(Some("tok-mobile")).body(body)).await;
    assert_eq!(status, 422, "{reply}");
    assert_eq!(reply["accepted"], 0);
    assert_eq!(reply["refused"], 2);
    assert_eq!(
        reply["errors"],
        json!([
            {"index": 1, "field": "amount", "reason": "field \"amount\" is string, but the source schema requires integer"},
            {"index": 2, "field": "user", "reason": "missing field \"user\" (string) required by the source schema"},
        ])
    );
    assert!(server.delivered().is_empty());
}

#[tokio::test]
async fn accept_valid_delivers_the_valid_records_and_lists_the_others() {
    let server = start(
        |e| e.partial = Partial::AcceptValid,
        ServerSettings::default(),
    )
    .await;
    let body = r#"[{"user":"a","amount":1},{"user":"b","amount":"x"},{"user":"c","amount":3}]"#;
    let (status, reply, _) = answer(server.post(Some("tok-mobile")).body(body)).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        (reply["accepted"].clone(), reply["refused"].clone()),
        (json!(2), json!(1))
    );
    assert_eq!(reply["errors"][0]["index"], 1);
    let users: Vec<_> = server
        .delivered()
        .iter()
        .map(|r| r.key.clone().unwrap())
        .collect();
    assert_eq!(users, vec![b"a".to_vec(), b"c".to_vec()]);

    // Nothing valid: still 422.
    let (status, _, _) = answer(server.post(Some("tok-mobile")).body(r#"{"user":1}"#)).await;
    assert_eq!(status, 422);
}

#[tokio::test]
async fn wrong_method_path_type_and_size_are_refused_with_their_codes() {
    let server = start(|_| {}, ServerSettings::default()).await;
    let get = server.client.get(format!("{}/v1/orders", server.url));
    let (status, _, headers) = answer(get).await;
    assert_eq!(
        (status, &headers["allow"]),
        (
            405,
            &"POST".parse::<reqwest::header::HeaderValue>().unwrap()
        )
    );
    let elsewhere = server.client.post(format!("{}/v2/other", server.url));
    let (status, reply, _) = answer(elsewhere.bearer_auth("tok-mobile")).await;
    assert_eq!(status, 404);
    assert!(
        reply["error"].as_str().unwrap().contains("POST /v1/orders"),
        "{reply}"
    );

    let (status, reply, _) = answer(
        server
            .post(Some("tok-mobile"))
            .header("content-type", "text/csv")
            .body("user,amount"),
    )
    .await;
    assert_eq!(status, 415, "{reply}");
    let (status, _, _) = answer(
        server
            .post(Some("tok-mobile"))
            .header("content-encoding", "br")
            .body("{}"),
    )
    .await;
    assert_eq!(status, 415);

    // Past the limit: by its Content-Length, and streamed without one.
    let large = format!(r#"{{"user":"a","amount":1,"pad":"{}"}}"#, "x".repeat(LIMIT));
    let (status, reply, _) = answer(server.post(Some("tok-mobile")).body(large.clone())).await;
    assert_eq!(status, 413, "{reply}");
    let mut chunked = b"POST /v1/orders HTTP/1.1\r\nhost: x\r\nauthorization: Bearer tok-mobile\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for chunk in large.as_bytes().chunks(4096) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let reply = raw(&server, &chunked).await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(server.delivered().is_empty());
}

#[tokio::test]
async fn past_the_rate_limit_is_429_with_retry_after_per_token() {
    // 1 record per second with a burst of 500: the first 500 pass at once.
    let server = start(|_| {}, ServerSettings::default()).await;
    let batch = |n: usize| format!("[{}]", vec![r#"{"user":"a","amount":1}"#; n].join(","));
    let (status, _, _) = answer(server.post(Some("tok-mobile")).body(batch(500))).await;
    assert_eq!(status, 200);
    let (status, reply, headers) = answer(server.post(Some("tok-mobile")).body(batch(10))).await;
    assert_eq!(status, 429, "{reply}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "{retry}");
    // Another token has its own budget; a batch past the burst never passes.
    let (status, _, _) = answer(server.post(Some("tok-partner")).body(batch(10))).await;
    assert_eq!(status, 200);
    let (status, reply, _) = answer(server.post(Some("tok-partner")).body(batch(501))).await;
    assert_eq!(status, 413, "{reply}");
    assert_eq!(server.delivered().len(), 510);
}

#[tokio::test]
async fn an_unavailable_topic_is_503_with_retry_after_and_nothing_is_promised() {
    let server = start(|_| {}, ServerSettings::default()).await;
    *server.memory.down.lock().unwrap() = true;
    let one = r#"{"user":"a","amount":1}"#;
    let (status, reply, headers) = answer(server.post(Some("tok-mobile")).body(one)).await;
    assert_eq!(status, 503, "{reply}");
    assert_eq!(headers["retry-after"], "5");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("the broker is down"),
        "{reply}"
    );
    *server.memory.down.lock().unwrap() = false;
    let (status, _, _) = answer(server.post(Some("tok-mobile")).body(one)).await;
    assert_eq!(status, 200);
    assert_eq!(server.delivered().len(), 1);
}

#[tokio::test]
async fn requests_past_the_in_flight_bound_are_503_at_once() {
    let settings = ServerSettings {
        max_in_flight: 2,
        ..ServerSettings::default()
    };
    let server = Arc::new(start(|_| {}, settings).await);
    *server.memory.held.lock().unwrap() = true;
    let one = r#"{"user":"a","amount":1}"#;
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(answer(server.post(Some("tok-mobile")).body(one))))
        .collect();
    // Both hold a permit once their delivery has begun.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while server.memory.entered.load(Ordering::SeqCst) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the held requests never reached delivery"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, reply, headers) = answer(server.post(Some("tok-mobile")).body(one)).await;
    assert_eq!(status, 503, "{reply}");
    assert_eq!(headers["retry-after"], "1");
    let metrics = server.metrics().await;
    for line in [
        "keystone_ingest_requests_in_flight 2",
        r#"keystone_ingest_refusals_total{reason="busy",token="mobile"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    *server.memory.held.lock().unwrap() = false;
    server.memory.released.notify_waiters();
    for request in held {
        assert_eq!(request.await.unwrap().0, 200);
    }
    assert_eq!(server.delivered().len(), 2);
}

#[tokio::test]
async fn an_idempotency_key_is_required_when_configured_and_stamped_per_record() {
    let server = start(
        |e| {
            e.idempotency = Idempotency::Header {
                field: "requestId".to_owned(),
            }
        },
        ServerSettings::default(),
    )
    .await;
    let body = r#"[{"user":"a","amount":1},{"user":"b","amount":2}]"#;
    let (status, reply, _) = answer(server.post(Some("tok-mobile")).body(body)).await;
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("Idempotency-Key"),
        "{reply}"
    );
    let (status, _, _) = answer(
        server
            .post(Some("tok-mobile"))
            .header("idempotency-key", "r-1")
            .body(body),
    )
    .await;
    assert_eq!(status, 200);
    let ids: Vec<Value> = server
        .delivered()
        .iter()
        .map(|r| serde_json::from_slice::<Value>(&r.value).unwrap()["requestId"].clone())
        .collect();
    assert_eq!(ids, vec![json!("r-1/0"), json!("r-1/1")]);
}

#[tokio::test]
async fn odd_bodies_get_a_4xx_and_the_server_keeps_answering() {
    let server = start(|_| {}, ServerSettings::default()).await;
    let deep = format!(
        r#"{{"user":"a","amount":1,"d":{}{}}}"#,
        "[".repeat(20_000),
        "]".repeat(20_000)
    );
    let mut invalid_utf8 = br#"{"user":""#.to_vec();
    invalid_utf8.extend_from_slice(&[0xc3, 0x28]);
    invalid_utf8.extend_from_slice(br#"","amount":1}"#);
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("invalid UTF-8", invalid_utf8),
        ("20,000 levels deep", deep.into_bytes()),
        (
            "an integer beyond 64 bits",
            br#"{"user":"a","amount":98765432109876543210987654321}"#.to_vec(),
        ),
        ("not JSON", b"{\"user\":".to_vec()),
        ("a bare string", b"\"hello\"".to_vec()),
        ("100 MB", vec![b' '; 100 << 20]),
    ];
    for (what, body) in bodies {
        let (status, reply, _) = answer(server.post(Some("tok-mobile")).body(body)).await;
        assert!((400..500).contains(&status), "{what}: {status} {reply}");
    }
    let (status, _, _) = answer(
        server
            .post(Some("tok-mobile"))
            .body(r#"{"user":"a","amount":1}"#),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(server.delivered().len(), 1);
}

#[tokio::test]
async fn a_client_that_stalls_its_body_gets_408() {
    let settings = ServerSettings {
        body_timeout: Duration::from_millis(300),
        ..ServerSettings::default()
    };
    let server = start(|_| {}, settings).await;
    let reply = raw(
        &server,
        b"POST /v1/orders HTTP/1.1\r\nhost: x\r\nauthorization: Bearer tok-mobile\r\ncontent-length: 100\r\n\r\n{\"user\"",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
}

/// Sends `request` as is on a new connection; returns the answer's head and
/// body as text, read until the body's JSON line ends.
async fn raw(server: &Server, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(server.url.trim_start_matches("http://"))
        .await
        .unwrap();
    // The server may answer (and close) before it read all of a large request.
    let _ = stream.write_all(request).await;
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
            if reply.windows(4).any(|w| w == b"\r\n\r\n") && reply.ends_with(b"}\n") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer within 10 s");
    String::from_utf8_lossy(&reply).into_owned()
}

#[tokio::test]
async fn metrics_count_requests_records_and_refusals_by_token() {
    let server = start(|_| {}, ServerSettings::default()).await;
    answer(
        server
            .post(Some("tok-mobile"))
            .body(r#"{"user":"a","amount":1}"#),
    )
    .await;
    answer(server.post(Some("tok-mobile")).body(r#"{"user":"a"}"#)).await;
    answer(server.post(None).body("{}")).await;
    let text = server.metrics().await;
    for line in [
        r#"keystone_ingest_requests_total{code="200"} 1"#,
        r#"keystone_ingest_requests_total{code="422"} 1"#,
        r#"keystone_ingest_requests_total{code="401"} 1"#,
        r#"keystone_ingest_records_total{outcome="accepted",token="mobile"} 1"#,
        r#"keystone_ingest_records_total{outcome="refused",token="mobile"} 1"#,
        r#"keystone_ingest_refusals_total{reason="invalid",token="mobile"} 1"#,
        r#"keystone_ingest_refusals_total{reason="unauthorized",token=""} 1"#,
        // Every answer of the events path, refusals before the body too.
        "keystone_ingest_request_duration_seconds_count 3",
        "keystone_ingest_requests_in_flight 0",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
}
