//! The search sink's settings: the plan's `elasticsearch` spec checked and
//! converted once, plus the credentials that arrive as environment variables.
//! Nothing here talks to the network.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use keystone_crds::pipeline::SinkSecretKey;
use keystone_crds::plan::PlanSink;
use keystone_crds::schema::SchemaSpec;

use super::SearchError;
use crate::event::FieldPath;

/// Pauses between attempts: short enough that a blip costs little, long
/// enough at the top that a cluster that is down is not hammered.
const RETRY_DELAYS: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(30));

/// A credential value. Its `Debug` never prints it, so that a settings dump or
/// an error cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(String);

impl Secret {
    #[cfg(test)]
    pub(crate) fn new(value: &str) -> Secret {
        Secret(value.to_owned())
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How requests authenticate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Credentials {
    None,
    /// `Authorization: Basic ...`.
    Basic {
        username: Secret,
        password: Secret,
    },
    /// `Authorization: ApiKey <key>` (the encoded key Elasticsearch hands out).
    ApiKey(Secret),
}

impl Credentials {
    /// `text` with every credential value replaced, for log lines that quote
    /// what a server answered (a 401 body may echo the user name).
    pub(crate) fn redact(&self, text: &str) -> String {
        let secrets: Vec<&str> = match self {
            Credentials::None => Vec::new(),
            Credentials::Basic { username, password } => vec![password.expose(), username.expose()],
            Credentials::ApiKey(key) => vec![key.expose()],
        };
        let mut out = text.to_owned();
        for secret in secrets.into_iter().filter(|s| !s.is_empty()) {
            if out.contains(secret) {
                out = out.replace(secret, "<redacted>");
            }
        }
        out
    }
}

/// The checked settings of one search sink.
#[derive(Clone, Debug)]
pub(crate) struct SearchConfig {
    /// The sink's name in the pipeline.
    pub sink: String,
    /// The base URL without a trailing `/`.
    pub endpoint: String,
    pub index: String,
    pub id_fields: Vec<FieldPath>,
    pub version_field: Option<FieldPath>,
    pub delete_when: Option<String>,
    pub create_index: bool,
    pub index_settings: BTreeMap<String, String>,
    /// The output schema at the sink, from which a created index's mapping comes.
    pub schema: SchemaSpec,
    pub bulk_size: usize,
    pub bulk_bytes: usize,
    pub max_in_flight_bytes: usize,
    pub credentials: Credentials,
    /// PEM certificates that sign the cluster's certificate.
    pub ca_cert: Option<Vec<u8>>,
    /// The environment variable the certificates come from, for messages.
    pub ca_cert_env: String,
    /// The first and the longest pause between attempts (jittered, doubling).
    pub retry_delays: (Duration, Duration),
}

impl SearchConfig {
    /// The settings of `sink`, reading credentials through `env` (the process
    /// environment in production; a map in tests). Errors name the setting or
    /// the environment variable, never a credential's value.
    pub(crate) fn from_plan(
        sink: &PlanSink,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<SearchConfig, SearchError> {
        let spec = sink
            .spec
            .elasticsearch
            .as_ref()
            .ok_or(SearchError::NotASearchSink)?;
        let endpoint = checked_endpoint(&spec.endpoint)?;
        check_index_name(&spec.index)?;
        if spec.id_fields.is_empty() || spec.id_fields.iter().any(|f| f.is_empty()) {
            return Err(SearchError::NoIdFields);
        }
        let version_field = match spec.version_field.as_deref() {
            Some("") => return Err(SearchError::EmptyVersionField),
            other => other.map(FieldPath::new),
        };
        let read = |key: SinkSecretKey| {
            let name = sink.spec.secret_env(key);
            // The operator may map an absent optional Secret key to an empty value.
            env(&name).filter(|v| !v.is_empty())
        };
        let credentials = credentials(sink, &read)?;
        let ca_cert = read(SinkSecretKey::CaCert).map(String::into_bytes);
        Ok(SearchConfig {
            sink: sink.name.clone(),
            endpoint,
            index: spec.index.clone(),
            id_fields: spec.id_fields.iter().map(|f| FieldPath::new(f)).collect(),
            version_field,
            delete_when: spec.delete_when.clone(),
            create_index: spec.create_index,
            index_settings: spec.index_settings.clone(),
            schema: sink.schema.clone(),
            bulk_size: at_least("bulkSize", spec.bulk_size.into(), 1)?,
            bulk_bytes: at_least("bulkBytes", spec.bulk_bytes, 1)?,
            max_in_flight_bytes: at_least("maxInFlightBytes", spec.max_in_flight_bytes, 1)?,
            credentials,
            ca_cert,
            ca_cert_env: sink.spec.secret_env(SinkSecretKey::CaCert),
            retry_delays: RETRY_DELAYS,
        })
    }

    /// The settings of a sink that only renders its bulk lines (local mode):
    /// no credentials are read.
    pub(crate) fn offline(sink: &PlanSink) -> Result<SearchConfig, SearchError> {
        SearchConfig::from_plan(sink, &|_| None)
    }

    /// Whether each document carries an external version, which makes the
    /// order in which requests land irrelevant.
    pub(crate) fn versioned(&self) -> bool {
        self.version_field.is_some()
    }
}

fn at_least(setting: &'static str, value: i64, min: i64) -> Result<usize, SearchError> {
    if value < min {
        return Err(SearchError::Setting {
            setting,
            value,
            min,
        });
    }
    usize::try_from(value).map_err(|_| SearchError::Setting {
        setting,
        value,
        min,
    })
}

/// The endpoint as a base URL: `http` or `https`, no credentials in it (they
/// would end up in logs and error messages; they belong in the Secret).
fn checked_endpoint(endpoint: &str) -> Result<String, SearchError> {
    let url = reqwest::Url::parse(endpoint).map_err(|source| SearchError::Endpoint {
        endpoint: without_userinfo(endpoint),
        source,
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(SearchError::EndpointCredentials {
            endpoint: without_userinfo(endpoint),
        });
    }
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(SearchError::EndpointScheme {
            endpoint: endpoint.to_owned(),
        });
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(SearchError::EndpointQuery {
            endpoint: without_userinfo(endpoint),
        });
    }
    Ok(endpoint.trim_end_matches('/').to_owned())
}

/// `endpoint` with anything between `://` and `@` replaced, for messages.
fn without_userinfo(endpoint: &str) -> String {
    let Some((scheme, rest)) = endpoint.split_once("://") else {
        return endpoint.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://<redacted>@{}", &rest[at + 1..]),
        None => endpoint.to_owned(),
    }
}

/// The same rule as the CRD's pattern, for plans that did not pass through the
/// API server (local manifests): the index name goes into request paths.
fn check_index_name(index: &str) -> Result<(), SearchError> {
    let mut chars = index.chars();
    let valid_first = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let valid_rest =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c));
    if valid_first && valid_rest && index.len() <= 255 && index != "." && index != ".." {
        Ok(())
    } else {
        Err(SearchError::IndexName {
            index: index.to_owned(),
        })
    }
}

fn credentials(
    sink: &PlanSink,
    read: &dyn Fn(SinkSecretKey) -> Option<String>,
) -> Result<Credentials, SearchError> {
    let env_name = |key| sink.spec.secret_env(key);
    let username = read(SinkSecretKey::Username);
    let password = read(SinkSecretKey::Password);
    let api_key = read(SinkSecretKey::ApiKey);
    match (username, password, api_key) {
        (None, None, None) => match sink
            .spec
            .elasticsearch
            .as_ref()
            .and_then(|es| es.credentials_secret.clone())
        {
            // The Secret is named but gave nothing: its keys are misspelled or it
            // was not found (the keys are optional references). Writing without
            // credentials would fail later, less clearly.
            Some(secret) => Err(SearchError::NoCredentials {
                secret,
                username_env: env_name(SinkSecretKey::Username),
                password_env: env_name(SinkSecretKey::Password),
                api_key_env: env_name(SinkSecretKey::ApiKey),
            }),
            None => Ok(Credentials::None),
        },
        (None, None, Some(key)) => Ok(Credentials::ApiKey(Secret(key))),
        (Some(username), Some(password), None) => Ok(Credentials::Basic {
            username: Secret(username),
            password: Secret(password),
        }),
        (Some(_), None, None) | (None, Some(_), None) => Err(SearchError::HalfBasicAuth {
            username_env: env_name(SinkSecretKey::Username),
            password_env: env_name(SinkSecretKey::Password),
        }),
        // Which one the user meant is a guess: refuse rather than pick.
        (_, _, Some(_)) => Err(SearchError::TwoCredentials {
            api_key_env: env_name(SinkSecretKey::ApiKey),
            username_env: env_name(SinkSecretKey::Username),
        }),
    }
}

/// Plans for tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeMap;

    use keystone_crds::pipeline::{ElasticsearchSinkSpec, SinkSpec};
    use keystone_crds::plan::PlanSink;
    use keystone_crds::schema::SchemaSpec;

    /// The spec of a search sink with the CRD's defaults, for tests.
    pub(crate) fn test_spec(
        endpoint: &str,
        index: &str,
        id_fields: &[&str],
    ) -> ElasticsearchSinkSpec {
        ElasticsearchSinkSpec {
            endpoint: endpoint.to_owned(),
            index: index.to_owned(),
            id_fields: id_fields.iter().map(|f| (*f).to_owned()).collect(),
            version_field: None,
            delete_when: None,
            create_index: true,
            index_settings: BTreeMap::new(),
            credentials_secret: None,
            ca_secret: None,
            bulk_size: 1000,
            bulk_bytes: 5 * 1024 * 1024,
            max_in_flight_bytes: 32 * 1024 * 1024,
        }
    }

    /// A plan sink around `spec`, for tests.
    pub(crate) fn test_sink(
        name: &str,
        spec: ElasticsearchSinkSpec,
        schema: SchemaSpec,
    ) -> PlanSink {
        PlanSink {
            name: name.to_owned(),
            key: Vec::new(),
            schema,
            spec: SinkSpec {
                name: name.to_owned(),
                kafka: None,
                elasticsearch: Some(spec),
                iceberg: None,
                parquet: None,
            },
            avro: None,
            avro_key: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use keystone_crds::pipeline::ElasticsearchSinkSpec;

    use super::testing::{test_sink, test_spec};
    use super::*;

    fn sink(spec: ElasticsearchSinkSpec) -> PlanSink {
        test_sink("orders-search", spec, SchemaSpec::default())
    }

    fn with_env(sink: &PlanSink, vars: &[(&str, &str)]) -> Result<SearchConfig, SearchError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        SearchConfig::from_plan(sink, &|name| vars.get(name).cloned())
    }

    #[test]
    fn settings_come_from_the_spec() {
        let mut spec = test_spec("https://search.example:9200/", "orders", &["id", "line.no"]);
        spec.version_field = Some("version".into());
        let config = with_env(&sink(spec), &[]).unwrap();
        assert_eq!(config.endpoint, "https://search.example:9200");
        assert_eq!(config.id_fields[1].dotted, "line.no");
        assert!(config.versioned());
        assert_eq!(config.credentials, Credentials::None);
        assert_eq!(config.bulk_size, 1000);
    }

    #[test]
    fn credentials_come_from_the_environment() {
        let plan = sink(test_spec("http://h:9200", "orders", &["id"]));
        let basic = with_env(
            &plan,
            &[
                ("KEYSTONE_SINK_ORDERS_SEARCH_USERNAME", "elastic"),
                ("KEYSTONE_SINK_ORDERS_SEARCH_PASSWORD", "hunter2"),
                ("KEYSTONE_SINK_ORDERS_SEARCH_CA_CERT", "-----BEGIN"),
            ],
        )
        .unwrap();
        assert!(matches!(basic.credentials, Credentials::Basic { .. }));
        assert_eq!(basic.ca_cert.as_deref(), Some(&b"-----BEGIN"[..]));
        let dump = format!("{basic:?}");
        assert!(
            !dump.contains("hunter2") && !dump.contains("elastic"),
            "{dump}"
        );

        let key = with_env(
            &plan,
            &[("KEYSTONE_SINK_ORDERS_SEARCH_API_KEY", "c2VjcmV0")],
        )
        .unwrap();
        assert_eq!(
            key.credentials,
            Credentials::ApiKey(Secret("c2VjcmV0".into()))
        );
        // Empty values count as unset.
        let none = with_env(&plan, &[("KEYSTONE_SINK_ORDERS_SEARCH_API_KEY", "")]).unwrap();
        assert_eq!(none.credentials, Credentials::None);

        // A named Secret that gave nothing is refused, naming what to set.
        let mut named = plan.clone();
        if let Some(es) = named.spec.elasticsearch.as_mut() {
            es.credentials_secret = Some("search-credentials".into());
        }
        let missing = with_env(&named, &[]).unwrap_err().to_string();
        assert!(
            missing.contains("search-credentials")
                && missing.contains("KEYSTONE_SINK_ORDERS_SEARCH_USERNAME")
                && missing.contains("apiKey"),
            "{missing}"
        );
    }

    #[test]
    fn incomplete_or_double_credentials_are_refused_without_their_values() {
        let plan = sink(test_spec("http://h:9200", "orders", &["id"]));
        let half = with_env(
            &plan,
            &[("KEYSTONE_SINK_ORDERS_SEARCH_USERNAME", "elastic")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            half.contains("KEYSTONE_SINK_ORDERS_SEARCH_PASSWORD"),
            "{half}"
        );
        assert!(!half.contains("elastic"), "{half}");
        let both = with_env(
            &plan,
            &[
                ("KEYSTONE_SINK_ORDERS_SEARCH_USERNAME", "u"),
                ("KEYSTONE_SINK_ORDERS_SEARCH_PASSWORD", "p4ss"),
                ("KEYSTONE_SINK_ORDERS_SEARCH_API_KEY", "k3y"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            both.contains("KEYSTONE_SINK_ORDERS_SEARCH_API_KEY"),
            "{both}"
        );
        assert!(!both.contains("p4ss") && !both.contains("k3y"), "{both}");
    }

    #[test]
    fn endpoints_with_credentials_are_refused_and_not_echoed() {
        let err = with_env(
            &sink(test_spec("https://admin:s3cret@h:9200", "orders", &["id"])),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("https://<redacted>@h:9200"), "{err}");
        assert!(!err.contains("s3cret") && !err.contains("admin"), "{err}");
        let err = with_env(&sink(test_spec("ftp://h", "orders", &["id"])), &[]).unwrap_err();
        assert!(err.to_string().contains("http or https"), "{err}");
        assert!(with_env(&sink(test_spec("not a url", "orders", &["id"])), &[]).is_err());
    }

    #[test]
    fn settings_are_checked() {
        let mut spec = test_spec("http://h:9200", "Orders", &["id"]);
        let err = with_env(&sink(spec.clone()), &[]).unwrap_err().to_string();
        assert!(err.contains("\"Orders\""), "{err}");
        spec.index = "orders".into();
        spec.bulk_size = 0;
        let err = with_env(&sink(spec.clone()), &[]).unwrap_err().to_string();
        assert!(err.contains("bulkSize"), "{err}");
        spec.bulk_size = 10;
        spec.id_fields = vec![];
        assert!(matches!(
            with_env(&sink(spec), &[]),
            Err(SearchError::NoIdFields)
        ));
    }

    #[test]
    fn redaction_replaces_every_credential() {
        let credentials = Credentials::Basic {
            username: Secret("elastic".into()),
            password: Secret("hunter2".into()),
        };
        assert_eq!(
            credentials.redact("unable to authenticate user [elastic] with hunter2"),
            "unable to authenticate user [<redacted>] with <redacted>"
        );
        assert_eq!(Credentials::None.redact("as is"), "as is");
    }
}
