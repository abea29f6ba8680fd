//! The HTTP side: bulk requests and index creation over reqwest (rustls),
//! plain `application/x-ndjson` and `application/json` media types, which both
//! Elasticsearch and OpenSearch accept (OpenSearch answers 406 to
//! Elasticsearch 8's `compatible-with` types).

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{Certificate, Client, RequestBuilder, StatusCode};

use super::SearchError;
use super::config::{Credentials, SearchConfig};
use super::metrics::RetryReason;
use super::response::{ItemOutcome, parse_bulk_response};

/// A connection that takes longer than this is as good as refused.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A bulk request of the largest allowed size (100 MiB) to a loaded cluster
/// can take a while; longer than this, it is sent again.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How much of an error answer goes into a log line.
const EXCERPT_CHARS: usize = 300;

/// A request that did not get a usable answer; it is sent again.
#[derive(Debug)]
pub(crate) struct Failure {
    pub reason: RetryReason,
    /// The HTTP status, when there was an answer.
    pub status: Option<u16>,
    /// What went wrong, credentials redacted.
    pub detail: String,
}

/// The outcome of an index check or creation.
pub(crate) enum SetupError {
    /// Worth trying again (the cluster is unreachable, busy or failing).
    Transient(Failure),
    /// No retry will mend it (the settings are refused, access is denied).
    Permanent { status: u16, body: String },
}

pub(crate) struct BulkClient {
    http: Client,
    credentials: Credentials,
    bulk_url: String,
    index_url: String,
}

impl BulkClient {
    pub(crate) fn new(config: &SearchConfig, pipeline: &str) -> Result<BulkClient, SearchError> {
        let mut builder = Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(format!(
                "keystone/{} (pipeline {pipeline}; sink {})",
                env!("CARGO_PKG_VERSION"),
                config.sink
            ));
        if let Some(pem) = &config.ca_cert {
            let env = || config.ca_cert_env.clone();
            let certificates = Certificate::from_pem_bundle(pem)
                .map_err(|source| SearchError::CaCert { env: env(), source })?;
            if certificates.is_empty() {
                return Err(SearchError::NoCaCert { env: env() });
            }
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let http = builder
            .build()
            .map_err(|source| SearchError::Client { source })?;
        Ok(BulkClient {
            http,
            credentials: config.credentials.clone(),
            bulk_url: format!("{}/_bulk", config.endpoint),
            index_url: format!("{}/{}", config.endpoint, config.index),
        })
    }

    /// Sends one bulk request of `items` actions and classifies each item.
    pub(crate) async fn bulk(
        &self,
        body: Vec<u8>,
        items: usize,
    ) -> Result<Vec<ItemOutcome>, Failure> {
        let request = self
            .authorized(self.http.post(&self.bulk_url))
            .header(CONTENT_TYPE, "application/x-ndjson")
            .body(body);
        let response = request.send().await.map_err(|e| self.transport(&e))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| self.transport(&e))?;
        if !status.is_success() {
            return Err(self.refused(status, &body));
        }
        parse_bulk_response(&body, items).map_err(|e| Failure {
            reason: RetryReason::StatusOther,
            status: Some(status.as_u16()),
            detail: self.credentials.redact(&e.to_string()),
        })
    }

    /// Whether the index exists (`HEAD /{index}`).
    pub(crate) async fn index_exists(&self) -> Result<bool, SetupError> {
        let response = self
            .authorized(self.http.head(&self.index_url))
            .send()
            .await
            .map_err(|e| SetupError::Transient(self.transport(&e)))?;
        match response.status() {
            status if status.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            status => Err(self.setup_refused(status, b"")),
        }
    }

    /// Creates the index (`PUT /{index}`); an index another instance created
    /// meanwhile is as good.
    pub(crate) async fn create_index(&self, body: &serde_json::Value) -> Result<(), SetupError> {
        let response = self
            .authorized(self.http.put(&self.index_url))
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| SetupError::Transient(self.transport(&e)))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| SetupError::Transient(self.transport(&e)))?;
        if status.is_success() || already_exists(status, &body) {
            return Ok(());
        }
        Err(self.setup_refused(status, &body))
    }

    /// `text` without the credentials, for log lines quoting the cluster.
    pub(crate) fn redact(&self, text: &str) -> String {
        self.credentials.redact(text)
    }

    fn authorized(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.credentials {
            Credentials::None => request,
            Credentials::Basic { username, password } => {
                request.basic_auth(username.expose(), Some(password.expose()))
            }
            Credentials::ApiKey(key) => {
                match HeaderValue::from_str(&format!("ApiKey {}", key.expose())) {
                    Ok(mut value) => {
                        value.set_sensitive(true);
                        request.header(AUTHORIZATION, value)
                    }
                    // A key that is not a valid header value cannot authenticate:
                    // the cluster's 401 says so (the key itself is never logged).
                    Err(_) => request,
                }
            }
        }
    }

    fn transport(&self, error: &reqwest::Error) -> Failure {
        let reason = if error.is_timeout() {
            RetryReason::Timeout
        } else {
            RetryReason::Connect
        };
        Failure {
            reason,
            status: None,
            detail: self.credentials.redact(&error_chain(error)),
        }
    }

    fn refused(&self, status: StatusCode, body: &[u8]) -> Failure {
        Failure {
            reason: RetryReason::of_status(status.as_u16()),
            status: Some(status.as_u16()),
            detail: self.credentials.redact(&excerpt(body)),
        }
    }

    fn setup_refused(&self, status: StatusCode, body: &[u8]) -> SetupError {
        let code = status.as_u16();
        if code == 408 || code == 429 || status.is_server_error() {
            SetupError::Transient(self.refused(status, body))
        } else {
            SetupError::Permanent {
                status: code,
                body: self.credentials.redact(&excerpt(body)),
            }
        }
    }
}

fn already_exists(status: StatusCode, body: &[u8]) -> bool {
    status == StatusCode::BAD_REQUEST
        && serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| {
                v.pointer("/error/type")
                    .and_then(|t| t.as_str())
                    .map(|t| t == "resource_already_exists_exception")
            })
            .unwrap_or(false)
}

/// An error and its causes on one line (reqwest's own message is only the top).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The start of a body, on one line, for a log line.
pub(crate) fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text
        .chars()
        .take(EXCERPT_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(EXCERPT_CHARS).is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use keystone_crds::schema::SchemaSpec;

    use super::super::config::Secret;
    use super::super::config::testing::{test_sink, test_spec};
    use super::*;

    fn client(credentials: Credentials) -> BulkClient {
        let spec = test_spec("http://127.0.0.1:9/base/", "orders", &["id"]);
        let mut config =
            SearchConfig::offline(&test_sink("s", spec, SchemaSpec::default())).unwrap();
        config.credentials = credentials;
        BulkClient::new(&config, "p").unwrap()
    }

    fn authorization(client: &BulkClient) -> Option<HeaderValue> {
        let request = client
            .authorized(client.http.post(&client.bulk_url))
            .build()
            .unwrap();
        request.headers().get(AUTHORIZATION).cloned()
    }

    #[test]
    fn urls_join_the_endpoint() {
        let c = client(Credentials::None);
        assert_eq!(c.bulk_url, "http://127.0.0.1:9/base/_bulk");
        assert_eq!(c.index_url, "http://127.0.0.1:9/base/orders");
    }

    #[test]
    fn credentials_become_sensitive_headers() {
        assert!(authorization(&client(Credentials::None)).is_none());
        let basic = authorization(&client(Credentials::Basic {
            username: Secret::new("elastic"),
            password: Secret::new("changeme"),
        }))
        .unwrap();
        // base64("elastic:changeme")
        assert_eq!(basic, "Basic ZWxhc3RpYzpjaGFuZ2VtZQ==");
        assert!(basic.is_sensitive());
        let key = authorization(&client(Credentials::ApiKey(Secret::new("a2V5")))).unwrap();
        assert_eq!(key, "ApiKey a2V5");
        assert!(key.is_sensitive());
        assert!(!format!("{key:?}").contains("a2V5"));
    }

    #[test]
    fn a_ca_bundle_must_hold_certificates() {
        let spec = test_spec("https://h:9200", "orders", &["id"]);
        let mut config =
            SearchConfig::offline(&test_sink("s", spec, SchemaSpec::default())).unwrap();
        config.ca_cert = Some(b"not a certificate".to_vec());
        let err = BulkClient::new(&config, "p").err().unwrap().to_string();
        assert!(err.contains("KEYSTONE_SINK_S_CA_CERT"), "{err}");
    }

    /// A self-signed test CA (certificate only; its key was thrown away).
    const TEST_CA: &str = "-----BEGIN CERTIFICATE-----\n\
MIIBjjCCATOgAwIBAgIUUzLBRwyXGIRJ1oew6SWBb9+VttEwCgYIKoZIzj0EAwIw\n\
GzEZMBcGA1UEAwwQa2V5c3RvbmUgdGVzdCBDQTAgFw0yNjEyMDMwNjI3NTlaGA8y\n\
MTI2MTEwOTA2Mjc1OVowGzEZMBcGA1UEAwwQa2V5c3RvbmUgdGVzdCBDQTBZMBMG\n\
ByqGSM49AgEGCCqGSM49AwEHA0IABBDTZBc6mAUkX9ZxnGD+J3LWMMll7jr6R6Gh\n\
g3ZEHFmJ3BNX8NFGYSAMAAml0SdKvldyO1JPnHMZgJOAhOyN1B6jUzBRMB0GA1Ud\n\
DgQWBBQWMyzakyM/KDTIgy8SCIQgGDSpZzAfBgNVHSMEGDAWgBQWMyzakyM/KDTI\n\
gy8SCIQgGDSpZzAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0kAMEYCIQCg\n\
5YVjt30YBxXgqplB/3g6FTWcskpsTrVqSggrmnusVQIhAIhyhhiMWvbLP7QI+LSg\n\
8X+s4acOMw7YAGeMfmya9ViZ\n\
-----END CERTIFICATE-----";

    #[test]
    fn a_ca_bundle_is_trusted() {
        let spec = test_spec("https://h:9200", "orders", &["id"]);
        let mut config =
            SearchConfig::offline(&test_sink("s", spec, SchemaSpec::default())).unwrap();
        let bundle = format!("{TEST_CA}\n{TEST_CA}\n");
        config.ca_cert = Some(bundle.into_bytes());
        assert!(BulkClient::new(&config, "p").is_ok());
    }

    #[test]
    fn failures_quote_the_cluster_without_the_credentials() {
        let c = client(Credentials::Basic {
            username: Secret::new("ingest"),
            password: Secret::new("hunter2"),
        });
        let failure = c.refused(
            StatusCode::UNAUTHORIZED,
            b"{\"error\":\"unable to authenticate user [ingest] with password hunter2\"}",
        );
        assert_eq!(failure.reason, RetryReason::StatusOther);
        assert_eq!(failure.status, Some(401));
        assert!(!failure.detail.contains("ingest") && !failure.detail.contains("hunter2"));
        assert!(
            failure.detail.contains("user [<redacted>]"),
            "{}",
            failure.detail
        );
        let SetupError::Permanent { body, .. } = c.setup_refused(StatusCode::FORBIDDEN, b"ingest")
        else {
            panic!("a 403 is permanent");
        };
        assert_eq!(body, "<redacted>");
    }

    #[test]
    fn excerpts_are_short_single_lines() {
        assert_eq!(excerpt(b"a\nb"), "a b");
        let long = "x".repeat(1000);
        assert_eq!(excerpt(long.as_bytes()).len(), EXCERPT_CHARS + 3);
        assert_eq!(excerpt(&[0xff, b'a']), "\u{fffd}a");
    }

    #[test]
    fn an_existing_index_is_fine() {
        let body = br#"{"error":{"root_cause":[],"type":"resource_already_exists_exception","reason":"index [o/x] already exists"},"status":400}"#;
        assert!(already_exists(StatusCode::BAD_REQUEST, body));
        assert!(!already_exists(StatusCode::BAD_REQUEST, b"{}"));
        assert!(!already_exists(StatusCode::CONFLICT, body));
    }
}
