//! A small OpenSearch client for the search sink's end-to-end tests, against
//! the OpenSearch that `e2e/testbed up` starts (plain HTTP, no auth).
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! use keystone_e2e::opensearch::OpenSearch;
//! let os = OpenSearch::from_env().await?;
//! os.create_index("orders", &serde_json::json!({"settings": {"number_of_replicas": 0}})).await?;
//! // ... let the sink write, then:
//! os.refresh("orders").await?;
//! for (id, source, version) in os.search_all("orders").await? { /* ... */ }
//! os.stop().await?;  // fault tests: `e2e/testbed stop opensearch`, data kept
//! os.start().await?; // `e2e/testbed start opensearch`, waits until ready
//! # Ok(()) }
//! ```
//!
//! Each request opens its own HTTP/1 connection (hyper's connection API, as
//! [`crate::testapp::http_get`] does): a stopped and restarted server never
//! meets a stale pooled connection, and no more hyper-util features than e2e
//! declares are needed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, header};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::testbed::state_dir;
use crate::{Testbed, TestbedError};

/// Time allowed for one request (connect, send, read the whole answer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Page size of [`OpenSearch::search_all`]'s scroll.
const SCROLL_PAGE: usize = 1000;

/// An answer: status and body.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
}

impl Reply {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("not JSON (HTTP {}): {}", self.status, self.text()))
    }
}

/// The testbed's OpenSearch.
#[derive(Clone, Debug)]
pub struct OpenSearch {
    /// `http://HOST:PORT`, no trailing slash.
    url: String,
    /// `HOST:PORT`.
    authority: String,
    /// The testbed state folder, for `e2e/testbed stop|start opensearch`.
    state: PathBuf,
}

impl OpenSearch {
    /// `KEYSTONE_OPENSEARCH_URL`, else the URL in the testbed state's env
    /// file (`$KEYSTONE_TESTBED_STATE/env`, default `target/testbed/env`).
    /// Fails with a message telling to run `e2e/testbed up` when there is
    /// no testbed or it runs without OpenSearch.
    pub async fn from_env() -> anyhow::Result<Self> {
        match std::env::var("KEYSTONE_OPENSEARCH_URL") {
            Ok(url) if !url.is_empty() => return Self::new(&url),
            _ => {}
        }
        let tb = Testbed::from_env().await?;
        let url = tb
            .var("KEYSTONE_OPENSEARCH_URL")
            .ok_or(TestbedError::Missing {
                component: "opensearch",
            })?;
        Self::new(url)
    }

    /// A client for `http://HOST:PORT` (plain HTTP only).
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            anyhow!("OpenSearch URL {url:?}: only http://HOST:PORT is supported (the testbed's has no TLS)")
        })?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            bail!("OpenSearch URL {url:?}: expected http://HOST:PORT without a path");
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Self {
            url: format!("http://{authority}"),
            authority,
            state: state_dir(),
        })
    }

    /// `http://HOST:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `HOST:PORT`.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// A guard that deletes `index` when dropped, so a test leaves no index
    /// behind whether it passes or fails.
    pub fn delete_on_drop(&self, index: &str) -> IndexCleanup {
        IndexCleanup {
            authority: self.authority.clone(),
            index: index.to_owned(),
        }
    }

    /// One request; `body` is `(content type, bytes)`. Any status is `Ok`.
    pub async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<(&str, Bytes)>,
    ) -> anyhow::Result<Reply> {
        let what = format!("{method} {}{path_and_query}", self.url);
        let send = async {
            let stream = tokio::net::TcpStream::connect(&self.authority)
                .await
                .with_context(|| format!("connecting to OpenSearch at {}", self.url))?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut req = Request::builder()
                .method(method)
                .uri(path_and_query)
                .header(header::HOST, &self.authority)
                .header(header::ACCEPT, "application/json");
            let body = match body {
                Some((content_type, bytes)) => {
                    req = req.header(header::CONTENT_TYPE, content_type);
                    Full::new(bytes)
                }
                None => Full::new(Bytes::new()),
            };
            let resp = sender.send_request(req.body(body)?).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok(Reply { status, body })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, send)
            .await
            .map_err(|_| anyhow!("{what}: no answer within {REQUEST_TIMEOUT:?}"))?
            .with_context(|| what.clone())
    }

    /// A request with an optional JSON body.
    pub async fn request_json(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Reply> {
        let body = body.map(|b| ("application/json", Bytes::from(b.to_string())));
        self.request(method, path_and_query, body).await
    }

    /// A JSON request that must succeed (2xx); its JSON answer.
    async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let reply = self
            .request_json(method.clone(), path_and_query, body)
            .await?;
        ensure_success(&method, path_and_query, &reply)?;
        reply.json()
    }

    /// `PUT /NAME` with `body` (settings, mappings). Tests on the one-node
    /// testbed want `"number_of_replicas": 0`, or the index stays yellow.
    pub async fn create_index(&self, name: &str, body: &Value) -> anyhow::Result<()> {
        self.call(Method::PUT, &format!("/{}", encode(name)), Some(body))
            .await
            .map(drop)
    }

    /// `DELETE /NAME`; an index that does not exist is fine.
    pub async fn delete_index(&self, name: &str) -> anyhow::Result<()> {
        let path = format!("/{}", encode(name));
        let reply = self.request(Method::DELETE, &path, None).await?;
        if reply.status == 404 {
            return Ok(());
        }
        ensure_success(&Method::DELETE, &path, &reply)
    }

    /// `POST /INDEX/_refresh`: what was indexed becomes searchable.
    pub async fn refresh(&self, index: &str) -> anyhow::Result<()> {
        self.call(Method::POST, &format!("/{}/_refresh", encode(index)), None)
            .await
            .map(drop)
    }

    /// The number of searchable documents (after the last refresh).
    pub async fn count(&self, index: &str) -> anyhow::Result<u64> {
        let v = self
            .call(Method::GET, &format!("/{}/_count", encode(index)), None)
            .await?;
        v["count"]
            .as_u64()
            .ok_or_else(|| anyhow!("_count of {index}: no count in {v}"))
    }

    /// A document by id (real time, no refresh needed): its source and
    /// version, or `None` when the document or the index does not exist.
    pub async fn get(&self, index: &str, id: &str) -> anyhow::Result<Option<(Value, i64)>> {
        let path = format!("/{}/_doc/{}", encode(index), encode(id));
        let reply = self.request(Method::GET, &path, None).await?;
        if reply.status == 404 {
            return Ok(None);
        }
        ensure_success(&Method::GET, &path, &reply)?;
        let v = reply.json()?;
        if v["found"] != Value::Bool(true) {
            return Ok(None);
        }
        let version = v["_version"]
            .as_i64()
            .ok_or_else(|| anyhow!("GET {path}: no _version in {v}"))?;
        Ok(Some((v["_source"].clone(), version)))
    }

    /// Every searchable document of the index (after the last refresh), as
    /// `(id, source, version)` sorted by id. Reads with a scroll, so there is
    /// no 10 000 document limit.
    pub async fn search_all(&self, index: &str) -> anyhow::Result<Vec<(String, Value, i64)>> {
        let mut docs = Vec::new();
        let mut scroll_id = None;
        let result = self.scroll(index, &mut scroll_id, &mut docs).await;
        if let Some(id) = scroll_id {
            // Best effort: the scroll expires by itself after a minute.
            let _ = self
                .request_json(
                    Method::DELETE,
                    "/_search/scroll",
                    Some(&json!({"scroll_id": [id]})),
                )
                .await;
        }
        result?;
        docs.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(docs)
    }

    async fn scroll(
        &self,
        index: &str,
        scroll_id: &mut Option<String>,
        docs: &mut Vec<(String, Value, i64)>,
    ) -> anyhow::Result<()> {
        let mut page = self
            .call(
                Method::POST,
                &format!("/{}/_search?scroll=1m", encode(index)),
                Some(&json!({
                    "size": SCROLL_PAGE,
                    "version": true,
                    "sort": ["_doc"],
                    "query": {"match_all": {}},
                })),
            )
            .await?;
        loop {
            if let Some(id) = page["_scroll_id"].as_str() {
                *scroll_id = Some(id.to_owned());
            }
            let hits = page["hits"]["hits"]
                .as_array()
                .ok_or_else(|| anyhow!("search of {index}: no hits in {page}"))?;
            if hits.is_empty() {
                return Ok(());
            }
            for hit in hits {
                let id = hit["_id"]
                    .as_str()
                    .ok_or_else(|| anyhow!("search of {index}: hit without _id: {hit}"))?;
                let version = hit["_version"]
                    .as_i64()
                    .ok_or_else(|| anyhow!("search of {index}: hit without _version: {hit}"))?;
                docs.push((id.to_owned(), hit["_source"].clone(), version));
            }
            let id = scroll_id
                .as_deref()
                .ok_or_else(|| anyhow!("search of {index}: no _scroll_id in the answer"))?;
            page = self
                .call(
                    Method::POST,
                    "/_search/scroll",
                    Some(&json!({"scroll": "1m", "scroll_id": id})),
                )
                .await?;
        }
    }

    /// `POST /_bulk` with NDJSON (each line ends with `\n`, the last one
    /// too). Fails on a non-2xx answer only: the answer's `errors` flag and
    /// each item's `status` are the caller's to check.
    pub async fn bulk(&self, ndjson: &str) -> anyhow::Result<Value> {
        let reply = self
            .request(
                Method::POST,
                "/_bulk",
                Some(("application/x-ndjson", Bytes::from(ndjson.to_owned()))),
            )
            .await?;
        ensure_success(&Method::POST, "/_bulk", &reply)?;
        reply.json()
    }

    /// `GET /_cluster/health`.
    pub async fn health(&self) -> anyhow::Result<Value> {
        self.call(Method::GET, "/_cluster/health", None).await
    }

    /// Polls the cluster health until it is green or yellow.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let last = match self.health().await {
                Ok(h) if h["status"] == "green" || h["status"] == "yellow" => return Ok(()),
                Ok(h) => format!("cluster status {}", h["status"]),
                Err(e) => format!("{e:#}"),
            };
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "OpenSearch at {} not ready (green or yellow) within {timeout:?}; last: {last}",
                    self.url
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `e2e/testbed stop opensearch`: the process stops, its data stays.
    pub async fn stop(&self) -> anyhow::Result<()> {
        self.testbed(&["stop", "opensearch"]).await
    }

    /// `e2e/testbed start opensearch`: starts it again on the same port and
    /// returns once it is ready.
    pub async fn start(&self) -> anyhow::Result<()> {
        self.testbed(&["start", "opensearch"]).await?;
        self.wait_ready(Duration::from_secs(30)).await
    }

    async fn testbed(&self, args: &[&str]) -> anyhow::Result<()> {
        crate::testbed::run_script(&self.state, args).await
    }
}

fn ensure_success(method: &Method, path: &str, reply: &Reply) -> anyhow::Result<()> {
    if reply.is_success() {
        Ok(())
    } else {
        bail!("{method} {path}: HTTP {}: {}", reply.status, reply.text())
    }
}

/// Percent-encodes a path segment (index names, document ids).
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Deletes its index when dropped; see [`OpenSearch::delete_on_drop`]. The
/// request is blocking: `Drop` cannot await, and a test's runtime may already
/// be shutting down.
pub struct IndexCleanup {
    authority: String,
    index: String,
}

impl Drop for IndexCleanup {
    fn drop(&mut self) {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(&self.authority) else {
            return;
        };
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let request = format!(
            "DELETE /{} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.index, self.authority
        );
        if stream.write_all(request.as_bytes()).is_ok() {
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let os = OpenSearch::new("http://127.0.0.1:19200/").expect("url");
        assert_eq!(os.url(), "http://127.0.0.1:19200");
        assert_eq!(os.authority(), "127.0.0.1:19200");
        assert_eq!(
            OpenSearch::new("http://localhost")
                .expect("url")
                .authority(),
            "localhost:80"
        );
        assert!(OpenSearch::new("https://127.0.0.1:19200").is_err());
        assert!(OpenSearch::new("http://127.0.0.1:19200/x").is_err());
        assert!(OpenSearch::new("http://").is_err());
    }

    #[test]
    fn encodes_path_segments() {
        assert_eq!(encode("orders-2024.01_x~"), "orders-2024.01_x~");
        assert_eq!(encode("a/b c?#%"), "a%2Fb%20c%3F%23%25");
        assert_eq!(encode("é"), "%C3%A9");
    }
}
