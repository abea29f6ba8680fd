//! What the ingest endpoint's HTTP tests share: an endpoint with two tokens
//! in front of a delivery that keeps the records in memory (and can be made
//! to fail or hold), served on a loopback port.
#![allow(dead_code)]

use std::num::NonZeroU32;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use keystone_crds::schema::SchemaSpec;
use keystone_runtime::ingest::body::{Contract, Limits};
use keystone_runtime::ingest::endpoint::{
    Deliver, Endpoint, Origin, RateLimit, Record, Unavailable,
};
use keystone_runtime::ingest::server::{ServerSettings, serve};
use keystone_runtime::ingest::tokens::Tokens;
use keystone_runtime::schema::Validator;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// Records delivered so far; fails while `down`, holds while `held`.
#[derive(Default)]
pub struct Memory {
    /// Deliveries begun (held ones included).
    pub entered: AtomicUsize,
    pub records: Mutex<Vec<Record>>,
    /// The origin of each record of `records`.
    pub origins: Mutex<Vec<Origin>>,
    pub down: Mutex<bool>,
    pub held: Mutex<bool>,
    pub released: Notify,
}

impl Deliver for Memory {
    fn deliver(
        &self,
        origin: Origin,
        records: Vec<Record>,
    ) -> BoxFuture<'_, Result<(), Unavailable>> {
        Box::pin(async move {
            self.entered.fetch_add(1, Ordering::SeqCst);
            loop {
                // Created before the check: a release in between still wakes it.
                let released = self.released.notified();
                if !*self.held.lock().unwrap() {
                    break;
                }
                released.await;
            }
            if *self.down.lock().unwrap() {
                return Err(Unavailable {
                    reason: "the broker is down".to_owned(),
                    retry_after: Duration::from_secs(5),
                });
            }
            let count = records.len();
            self.origins
                .lock()
                .unwrap()
                .extend(std::iter::repeat_n(origin, count));
            self.records.lock().unwrap().extend(records);
            Ok(())
        })
    }
}

pub struct Server {
    pub url: String,
    pub memory: Arc<Memory>,
    pub client: reqwest::Client,
}

pub const LIMIT: usize = 64 * 1024;

pub fn both_tokens() -> Tokens {
    Tokens::new([
        ("mobile".to_owned(), "tok-mobile".to_owned()),
        ("partner".to_owned(), "tok-partner\n".to_owned()),
    ])
}

pub async fn start(configure: impl FnOnce(&mut Endpoint), settings: ServerSettings) -> Server {
    let endpoint = endpoint(both_tokens());
    start_endpoint(endpoint, configure, settings).await
}

pub fn endpoint(tokens: Tokens) -> (Endpoint, Arc<Memory>) {
    let schema: SchemaSpec = serde_json::from_str(
        r#"{"fields": [{"name": "user", "type": "string"}, {"name": "amount", "type": "integer"}]}"#,
    )
    .unwrap();
    let memory = Arc::new(Memory::default());
    let endpoint = Endpoint::new(
        "/v1/orders".to_owned(),
        Limits {
            max_body_bytes: LIMIT,
            max_records: 1000,
        },
        Contract::new(Validator::for_source(&schema), &["user".to_owned()]),
        Some(tokens),
        Some(RateLimit {
            records_per_second: NonZeroU32::new(1).unwrap(),
            burst: NonZeroU32::new(500).unwrap(),
        }),
        memory.clone(),
    );
    (endpoint, memory)
}

pub async fn start_endpoint(
    (mut endpoint, memory): (Endpoint, Arc<Memory>),
    configure: impl FnOnce(&mut Endpoint),
    settings: ServerSettings,
) -> Server {
    configure(&mut endpoint);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(
        listener,
        Arc::new(endpoint),
        settings,
        std::future::pending(),
    ));
    Server {
        url,
        memory,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
    }
}

impl Server {
    pub fn post(&self, token: Option<&str>) -> reqwest::RequestBuilder {
        let request = self.client.post(format!("{}/v1/orders", self.url));
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// The endpoint's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let response = self
            .client
            .get(format!("{}/metrics", self.url))
            .send()
            .await;
        response.unwrap().text().await.unwrap()
    }

    /// The origin of each delivered record.
    pub fn origins(&self) -> Vec<Origin> {
        self.memory.origins.lock().unwrap().clone()
    }

    pub fn delivered(&self) -> Vec<Record> {
        self.memory.records.lock().unwrap().clone()
    }
}

pub async fn answer(request: reqwest::RequestBuilder) -> (u16, Value, reqwest::header::HeaderMap) {
    let response = request.send().await.expect("an answer");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.bytes().await.unwrap();
    let body = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {body:?}"));
    (status, body, headers)
}
