//! A client of a Confluent-compatible schema registry's REST API (Confluent
//! Schema Registry, Apicurio's `ccompat/v7`, Karapace, Redpanda): schemas by
//! id (cached: an id's schema never changes), a subject's latest or pinned
//! version, registration, and the compatibility check.
//!
//! Errors say whose fault they are: [`RegistryError::is_transient`] is true
//! when the registry is down, slow or failing (wait and ask again; no record
//! is at fault), false when it answered that something does not exist or is
//! refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apache_avro::Schema;
use backon::{BackoffBuilder, ExponentialBuilder};
use reqwest::{Method, StatusCode, Url};
use serde_json::{Value, json};

use crate::error_chain;

/// How the client proves who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    Basic { username: String, password: String },
    Bearer(String),
}

/// Where the registry is and how to reach it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistryConfig {
    /// The API's base URL, for example `http://registry:8081` or Apicurio's
    /// `http://apicurio:8080/apis/ccompat/v7`.
    pub url: String,
    pub auth: Option<Auth>,
    /// PEM certificates to trust besides the system's, for an `https` URL.
    pub ca_pem: Option<Vec<u8>>,
}

/// What went wrong talking to the registry.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RegistryError {
    #[error("the schema registry at {url} is unavailable: {reason}")]
    Unavailable { url: String, reason: String },
    #[error("the schema registry has no {what}: {message}")]
    NotFound { what: String, message: String },
    #[error("the schema registry refused {what} (HTTP {status}): {message}")]
    Refused {
        what: String,
        status: u16,
        message: String,
    },
    #[error("{what} is not an Avro schema Keystone reads: {reason}")]
    NotAvro { what: String, reason: String },
    #[error("the schema registry's configuration is unusable: {0}")]
    Config(String),
}

impl RegistryError {
    /// Whether asking again later may succeed: the registry is down, slow or
    /// failing, and no record or manifest is at fault.
    pub fn is_transient(&self) -> bool {
        matches!(self, RegistryError::Unavailable { .. })
    }
}

/// A version of a subject.
#[derive(Clone, Debug)]
pub struct Registered {
    pub subject: String,
    pub version: u32,
    pub id: u32,
    pub schema: Arc<Schema>,
    /// The schema's text as registered: docs and defaults included (the
    /// parsed form's canonical text drops defaults, which resolution needs).
    pub text: String,
}

/// The registry's verdict on a schema for a subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compatibility {
    pub compatible: bool,
    /// The registry's reasons, when it gives them.
    pub messages: Vec<String>,
}

// The subject strategies are the CRD's; the serializers name subjects the same way.
pub use keystone_crds::pipeline::avro::{
    RecordPart as Part, SubjectStrategy, subject_name as subject,
};

/// A registry client. Cheap to share: clone the `Arc`.
pub struct Registry {
    http: reqwest::Client,
    base: Url,
    auth: Option<Auth>,
    by_id: Mutex<HashMap<u32, Arc<Schema>>>,
}

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

impl Registry {
    pub fn new(config: &RegistryConfig) -> Result<Self, RegistryError> {
        let base = Url::parse(config.url.trim_end_matches('/'))
            .map_err(|e| RegistryError::Config(format!("url {:?}: {e}", config.url)))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(RegistryError::Config(format!(
                "url {:?} is not an http or https URL",
                config.url
            )));
        }
        let mut http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15));
        if let Some(pem) = &config.ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| RegistryError::Config(format!("the CA certificates: {e}")))?
            {
                http = http.add_root_certificate(cert);
            }
        }
        Ok(Self {
            http: http
                .build()
                .map_err(|e| RegistryError::Config(e.to_string()))?,
            base,
            auth: config.auth.clone(),
            by_id: Mutex::new(HashMap::new()),
        })
    }

    /// The URL of the path `segments` below the base, each segment encoded.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    async fn call(
        &self,
        method: Method,
        url: Url,
        body: Option<Value>,
        what: &str,
    ) -> Result<Value, RegistryError> {
        let mut request = self
            .http
            .request(method, url)
            .header(reqwest::header::ACCEPT, CONTENT_TYPE);
        request = match &self.auth {
            Some(Auth::Basic { username, password }) => {
                request.basic_auth(username, Some(password))
            }
            Some(Auth::Bearer(token)) => request.bearer_auth(token),
            None => request,
        };
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
                .body(body.to_string());
        }
        let unavailable = |reason: String| RegistryError::Unavailable {
            url: self.base.to_string(),
            reason,
        };
        let response = request
            .send()
            .await
            .map_err(|e| unavailable(error_chain(&e)))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| unavailable(error_chain(&e)))?;
        let body: Value = serde_json::from_slice(&bytes).unwrap_or_else(
            |_| json!({"message": String::from_utf8_lossy(&bytes[..bytes.len().min(500)])}),
        );
        if status.is_success() {
            return Ok(body);
        }
        let message = body["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| body.to_string());
        Err(match status {
            s if s.is_server_error()
                || s == StatusCode::TOO_MANY_REQUESTS
                || s == StatusCode::REQUEST_TIMEOUT =>
            {
                unavailable(format!("HTTP {}: {message}", s.as_u16()))
            }
            StatusCode::NOT_FOUND => RegistryError::NotFound {
                what: what.to_owned(),
                message,
            },
            s => RegistryError::Refused {
                what: what.to_owned(),
                status: s.as_u16(),
                message,
            },
        })
    }

    /// The API's base URL, as messages name it.
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    /// The schema registered as `id`, asked once and then kept.
    pub async fn schema_by_id(&self, id: u32) -> Result<Arc<Schema>, RegistryError> {
        if let Some(schema) = self.cached(id) {
            return Ok(schema);
        }
        let what = format!("schema id {id}");
        let body = self
            .call(
                Method::GET,
                self.url(&["schemas", "ids", &id.to_string()]),
                None,
                &what,
            )
            .await?;
        let schema = Arc::new(avro_of(&body, &what)?);
        self.by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, schema.clone());
        Ok(schema)
    }

    /// The schema of `id` if it was asked before.
    pub fn cached(&self, id: u32) -> Option<Arc<Schema>> {
        self.by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// The latest version of `subject`.
    pub async fn latest(&self, subject: &str) -> Result<Registered, RegistryError> {
        self.version_named(subject, "latest").await
    }

    /// Version `version` of `subject`.
    pub async fn version(&self, subject: &str, version: u32) -> Result<Registered, RegistryError> {
        self.version_named(subject, &version.to_string()).await
    }

    async fn version_named(
        &self,
        subject: &str,
        version: &str,
    ) -> Result<Registered, RegistryError> {
        let what = format!("version {version} of subject {subject}");
        let body = self
            .call(
                Method::GET,
                self.url(&["subjects", subject, "versions", version]),
                None,
                &what,
            )
            .await?;
        let schema = Arc::new(avro_of(&body, &what)?);
        let text = body["schema"].as_str().unwrap_or_default().to_owned();
        let number = |field: &str| {
            body[field]
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| RegistryError::Refused {
                    what: what.clone(),
                    status: 200,
                    message: format!("the answer has no {field}: {body}"),
                })
        };
        let (id, version) = (number("id")?, number("version")?);
        self.by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, schema.clone());
        Ok(Registered {
            subject: subject.to_owned(),
            version,
            id,
            schema,
            text,
        })
    }

    /// Registers the schema of JSON text `schema` under `subject` (or finds it
    /// registered there) and returns its id. The registry refuses a schema its
    /// compatibility rule does not allow. The text is sent as given: its docs
    /// and defaults are what consumers see.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let parsed = Schema::parse_str(schema).map_err(|e| RegistryError::NotAvro {
            what: format!("the schema for subject {subject}"),
            reason: e.to_string(),
        })?;
        let what = format!("the schema for subject {subject}");
        let body = self
            .call(
                Method::POST,
                self.url(&["subjects", subject, "versions"]),
                Some(json!({ "schema": schema })),
                &what,
            )
            .await?;
        let id = body["id"]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| RegistryError::Refused {
                what: what.clone(),
                status: 200,
                message: format!("the answer has no id: {body}"),
            })?;
        self.by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Arc::new(parsed));
        Ok(id)
    }

    /// The version under which the schema of JSON text `schema` is registered
    /// in `subject`; `None` when it is not (or the subject does not exist).
    pub async fn lookup(&self, subject: &str, schema: &str) -> Result<Option<u32>, RegistryError> {
        let what = format!("the schema's version in subject {subject}");
        let body = match self
            .call(
                Method::POST,
                self.url(&["subjects", subject]),
                Some(json!({ "schema": schema })),
                &what,
            )
            .await
        {
            Ok(body) => body,
            Err(RegistryError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        body["version"]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| RegistryError::Refused {
                what,
                status: 200,
                message: format!("the answer has no version: {body}"),
            })
    }

    /// The compatibility rule of `subject` (its own, else the registry's):
    /// `BACKWARD`, `FORWARD`, `FULL`, their `_TRANSITIVE` forms, or `NONE`.
    pub async fn compatibility_level(&self, subject: &str) -> Result<String, RegistryError> {
        let mut url = self.url(&["config", subject]);
        url.query_pairs_mut().append_pair("defaultToGlobal", "true");
        let what = format!("the compatibility rule of subject {subject}");
        let body = match self.call(Method::GET, url, None, &what).await {
            // A subject with no version has no rule of its own.
            Err(RegistryError::NotFound { .. }) => {
                self.call(Method::GET, self.url(&["config"]), None, &what)
                    .await?
            }
            other => other?,
        };
        body["compatibilityLevel"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| RegistryError::Refused {
                what,
                status: 200,
                message: format!("the answer has no compatibilityLevel: {body}"),
            })
    }

    /// Whether the schema of JSON text `schema` may be registered next under
    /// `subject`, by the subject's compatibility rule. A subject with no
    /// version yet takes any schema. When the registry refuses without saying
    /// why (Apicurio does), the reasons are Keystone's own reading of the rule
    /// against the latest version (see [`crate::explain`]).
    pub async fn compatibility(
        &self,
        subject: &str,
        schema: &str,
    ) -> Result<Compatibility, RegistryError> {
        let mut url = self.url(&["compatibility", "subjects", subject, "versions", "latest"]);
        url.query_pairs_mut().append_pair("verbose", "true");
        let what = format!("the compatibility check for subject {subject}");
        let body = match self
            .call(Method::POST, url, Some(json!({ "schema": schema })), &what)
            .await
        {
            Ok(body) => body,
            Err(RegistryError::NotFound { .. }) => {
                return Ok(Compatibility {
                    compatible: true,
                    messages: Vec::new(),
                });
            }
            Err(e) => return Err(e),
        };
        let compatible = body["is_compatible"].as_bool().unwrap_or(false);
        let mut messages: Vec<String> = body["messages"]
            .as_array()
            .map(|m| {
                m.iter()
                    .map(|m| m.as_str().map_or_else(|| m.to_string(), str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if !compatible && messages.is_empty() {
            let candidate = Schema::parse_str(schema).map_err(|e| RegistryError::NotAvro {
                what: format!("the schema for subject {subject}"),
                reason: e.to_string(),
            })?;
            let latest = self.latest(subject).await?;
            let level = self.compatibility_level(subject).await?;
            messages = crate::explain(&level, &latest.schema, latest.version, &candidate);
            if messages.is_empty() {
                messages.push(format!(
                    "the registry finds it incompatible under {level} with version {} (it gave no reason)",
                    latest.version
                ));
            }
        }
        Ok(Compatibility {
            compatible,
            messages,
        })
    }
}

/// `call` until it succeeds or fails for good: while the registry is
/// unavailable, waits with exponential backoff (100 ms doubling to 10 s) and
/// tells `waiting` each time, for a condition or a metric.
pub async fn until_available<T, F, Fut>(
    mut call: F,
    mut waiting: impl FnMut(&RegistryError, Duration),
) -> Result<T, RegistryError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, RegistryError>>,
{
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .without_max_times()
        .build();
    loop {
        match call().await {
            Err(e) if e.is_transient() => {
                let delay = backoff.next().unwrap_or(Duration::from_secs(10));
                waiting(&e, delay);
                tokio::time::sleep(delay).await;
            }
            done => return done,
        }
    }
}

/// The schema of a registry answer (`schema`, `schemaType`, `references`).
fn avro_of(body: &Value, what: &str) -> Result<Schema, RegistryError> {
    let not_avro = |reason: String| RegistryError::NotAvro {
        what: what.to_owned(),
        reason,
    };
    match body["schemaType"].as_str() {
        None | Some("AVRO") => {}
        Some(other) => {
            return Err(not_avro(format!(
                "it is a {other} schema; Keystone reads Avro"
            )));
        }
    }
    if body["references"].as_array().is_some_and(|r| !r.is_empty()) {
        return Err(not_avro(
            "it refers to schemas of other subjects (schema references), which Keystone does not resolve"
                .into(),
        ));
    }
    let text = body["schema"]
        .as_str()
        .ok_or_else(|| not_avro(format!("the answer has no schema: {body}")))?;
    Schema::parse_str(text).map_err(|e| not_avro(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_serializers_strategies() {
        let s = |strategy| subject(strategy, "orders", "shop.Order", Part::Value);
        assert_eq!(s(SubjectStrategy::TopicName), "orders-value");
        assert_eq!(s(SubjectStrategy::RecordName), "shop.Order");
        assert_eq!(s(SubjectStrategy::TopicRecordName), "orders-shop.Order");
        assert_eq!(
            subject(
                SubjectStrategy::TopicName,
                "orders",
                "shop.Order",
                Part::Key
            ),
            "orders-key"
        );
    }

    #[test]
    fn subjects_are_one_encoded_path_segment() {
        let registry = Registry::new(&RegistryConfig {
            url: "http://registry:8080/apis/ccompat/v7/".into(),
            ..Default::default()
        })
        .expect("registry");
        assert_eq!(
            registry
                .url(&["subjects", "a/b c?-value", "versions", "latest"])
                .as_str(),
            "http://registry:8080/apis/ccompat/v7/subjects/a%2Fb%20c%3F-value/versions/latest"
        );
    }

    #[test]
    fn a_bad_url_is_a_configuration_error() {
        for url in ["registry:8081", "ftp://registry", "not a url"] {
            let error = Registry::new(&RegistryConfig {
                url: url.into(),
                ..Default::default()
            })
            .err()
            .expect("refused");
            assert!(matches!(error, RegistryError::Config(_)), "{url}: {error}");
        }
    }

    #[test]
    fn answers_that_are_not_avro_are_named() {
        let error = avro_of(
            &json!({"schema": "syntax = \"proto3\";", "schemaType": "PROTOBUF"}),
            "schema id 3",
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "schema id 3 is not an Avro schema Keystone reads: it is a PROTOBUF schema; Keystone reads Avro"
        );
        let error = avro_of(
            &json!({"schema": "\"shop.Customer\"", "references": [{"name": "shop.Customer", "subject": "c", "version": 1}]}),
            "schema id 4",
        )
        .unwrap_err();
        assert!(error.to_string().contains("schema references"), "{error}");
        assert!(avro_of(&json!({"schema": "{\"type\": \"string\"}"}), "x").is_ok());
    }

    #[tokio::test]
    async fn a_registry_that_does_not_answer_is_transient() {
        // A port nothing listens on.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let registry = Registry::new(&RegistryConfig {
            url: format!("http://127.0.0.1:{port}"),
            ..Default::default()
        })
        .expect("registry");
        let error = registry.schema_by_id(1).await.unwrap_err();
        assert!(error.is_transient(), "{error}");
        let waits = std::cell::Cell::new(0);
        let result = until_available(
            || async {
                if waits.get() < 3 {
                    registry.schema_by_id(1).await
                } else {
                    Err(RegistryError::NotFound {
                        what: "schema id 1".into(),
                        message: "gone".into(),
                    })
                }
            },
            |e, _| {
                assert!(e.is_transient());
                waits.set(waits.get() + 1);
            },
        )
        .await;
        assert_eq!(waits.get(), 3);
        assert!(matches!(result, Err(RegistryError::NotFound { .. })));
    }
}
