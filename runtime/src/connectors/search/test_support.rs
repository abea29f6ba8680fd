//! Helpers of the sink's tests: a writer to read back, a real cluster's
//! client, and a TCP proxy that fails on purpose.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A writer whose bytes the test can read afterwards.
#[derive(Clone, Default)]
pub(super) struct SharedWriter(pub Arc<Mutex<Vec<u8>>>);

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A port nothing listens on (bound, then released).
pub(super) fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The cluster's URL, or `None` to skip; a panic when the cluster is required.
pub(super) fn opensearch_url() -> Option<String> {
    match std::env::var("KEYSTONE_OPENSEARCH_URL") {
        Ok(url) if !url.is_empty() => Some(url.trim_end_matches('/').to_owned()),
        _ => {
            let required = std::env::var("KEYSTONE_TEST_REQUIRE_OPENSEARCH").as_deref() == Ok("1");
            assert!(
                !required,
                "KEYSTONE_TEST_REQUIRE_OPENSEARCH=1 but KEYSTONE_OPENSEARCH_URL is not set: start the testbed (e2e/testbed up), which exports it"
            );
            eprintln!("skipped: KEYSTONE_OPENSEARCH_URL is not set");
            None
        }
    }
}

pub(super) fn unique_index(test: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "ks-test-{test}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A client of the cluster, to read back what the sink wrote.
pub(super) struct Cluster {
    url: String,
    runtime: tokio::runtime::Runtime,
    http: reqwest::Client,
}

impl Cluster {
    pub(super) fn new(url: &str) -> Cluster {
        Cluster {
            url: url.to_owned(),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            http: reqwest::Client::new(),
        }
    }

    pub(super) fn call(&self, method: reqwest::Method, path: &str) -> (u16, serde_json::Value) {
        self.runtime.block_on(async {
            let response = self
                .http
                .request(method, format!("{}/{path}", self.url))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body = response.bytes().await.unwrap();
            (status, serde_json::from_slice(&body).unwrap_or_default())
        })
    }

    /// The document's `_source` and `_version`, when it exists.
    pub(super) fn doc(&self, index: &str, id: &str) -> Option<(serde_json::Value, i64)> {
        let (status, body) = self.call(reqwest::Method::GET, &format!("{index}/_doc/{id}"));
        (status == 200).then(|| (body["_source"].clone(), body["_version"].as_i64().unwrap()))
    }

    pub(super) fn count(&self, index: &str) -> u64 {
        self.call(reqwest::Method::POST, &format!("{index}/_refresh"));
        let (_, body) = self.call(reqwest::Method::GET, &format!("{index}/_count"));
        body["count"].as_u64().unwrap()
    }

    /// Deletes `index` when the returned guard drops, even when the test fails.
    pub(super) fn cleanup(&self, index: &str) -> Cleanup<'_> {
        Cleanup {
            cluster: self,
            index: index.to_owned(),
        }
    }

    pub(super) fn address(&self) -> SocketAddr {
        let url = reqwest::Url::parse(&self.url).unwrap();
        let host = url.host_str().unwrap().to_owned();
        let port = url.port_or_known_default().unwrap();
        std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
            .unwrap()
            .next()
            .unwrap()
    }
}

pub(super) struct Cleanup<'a> {
    cluster: &'a Cluster,
    index: String,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        // Best effort, and no panic while a failed test unwinds.
        let url = format!("{}/{}", self.cluster.url, self.index);
        let _ = self
            .cluster
            .runtime
            .block_on(self.cluster.http.delete(url).send());
    }
}

/// How the proxy fails a connection.
#[derive(Clone, Copy)]
pub(super) enum Failure {
    /// HTTP 503 to the whole request.
    Unavailable,
    /// HTTP 200 to a bulk request, every item refused with 429 (a full write
    /// queue), as a busy cluster answers.
    RejectItems,
    /// HTTP 413: the request is larger than the cluster's http.max_content_length.
    TooLarge,
}

/// A TCP proxy to the cluster that fails its first `fail_first` connections
/// (one request each) and forwards the others. It listens on `port` (0: any).
pub(super) struct Proxy {
    pub(super) port: u16,
    pub(super) failed: Arc<AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

impl Proxy {
    pub(super) fn start(
        port: u16,
        upstream: SocketAddr,
        fail_first: usize,
        failure: Failure,
    ) -> Proxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let failed = Arc::new(AtomicUsize::new(0));
        let counter = failed.clone();
        runtime.spawn(async move {
            let accepted = AtomicUsize::new(0);
            while let Ok((mut client, _)) = listener.accept().await {
                if accepted.fetch_add(1, Ordering::SeqCst) < fail_first {
                    counter.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        let _ = fail(&mut client, failure).await;
                    });
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Proxy {
            port,
            failed,
            _runtime: runtime,
        }
    }
}

/// Reads one request (head and `content-length` body) and fails it.
async fn fail(client: &mut tokio::net::TcpStream, failure: Failure) -> std::io::Result<()> {
    let mut received = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        received.extend_from_slice(&chunk[..n]);
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8_lossy(&received[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while received.len() < head_end + length {
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        received.extend_from_slice(&chunk[..n]);
    }
    let (status, body) = match failure {
        Failure::Unavailable => (
            "503 Service Unavailable",
            r#"{"error":"the proxy is failing on purpose"}"#.to_owned(),
        ),
        Failure::TooLarge => (
            "413 Request Entity Too Large",
            r#"{"error":"the proxy finds every request too large"}"#.to_owned(),
        ),
        Failure::RejectItems => {
            let actions = received[head_end..]
                .split(|b| *b == b'\n')
                .filter(|line| line.starts_with(b"{\"index\"") || line.starts_with(b"{\"delete\""))
                .count();
            let item = r#"{"index":{"status":429,"error":{"type":"rejected_execution_exception","reason":"rejected execution of primary operation"}}}"#;
            let items = vec![item; actions].join(",");
            (
                "200 OK",
                format!(r#"{{"took":1,"errors":true,"items":[{items}]}}"#),
            )
        }
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    client.write_all(response.as_bytes()).await?;
    client.shutdown().await
}
