//! The Kafka transport of a stage: client settings, the producer with its
//! delivery bookkeeping, reading and rewinding changelogs, the metadata carried
//! in offset commits, and the record headers that name an event's source.
//!
//! Nothing here knows about the stage host (`crate::host`): the host drives
//! these pieces, and the Kafka sink (`crate::connectors::kafka`) writes through
//! the same producer.

pub mod config;
pub mod metadata;
pub mod outbox;
pub mod records;
pub mod restore;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::metadata::CommitMetadata;

/// How long blocking Kafka calls (commits, transactions, look-ups) may take.
pub const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the brokers are and how every client of one instance connects.
#[derive(Clone)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    /// The instance's stable identity: client id, static group membership.
    pub instance_id: String,
    /// Extra librdkafka settings (TLS, SASL, ...), applied to every client last.
    /// Credentials among them come from the environment, never the command line.
    pub extra: Vec<(String, String)>,
}

/// librdkafka properties whose values are secrets: never printed, never taken
/// from the command line (where any user of the node sees them).
pub fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("password")
        || key.contains("secret")
        || key == "ssl.key.pem"
        || key == "sasl.oauthbearer.config"
}

/// Secrets print as `<redacted>`, so that logging the settings (or anything
/// that holds them, such as the serve arguments) leaks none.
impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let extra: Vec<(&str, &str)> = self
            .extra
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_property(k) {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k.as_str(), v)
            })
            .collect();
        f.debug_struct("KafkaSettings")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("instance_id", &self.instance_id)
            .field("extra", &extra)
            .finish()
    }
}

/// The environment variable holding the SASL user name.
pub const ENV_SASL_USERNAME: &str = "KAFKA_SASL_USERNAME";
/// The environment variable holding the SASL password.
pub const ENV_SASL_PASSWORD: &str = "KAFKA_SASL_PASSWORD";
/// A file holding the SASL password (a mounted Secret key), instead of the variable.
pub const ENV_SASL_PASSWORD_FILE: &str = "KAFKA_SASL_PASSWORD_FILE";

/// SASL credentials from the environment (as the operator sets them from a
/// Secret), as librdkafka properties: none when no user name is set. The
/// password comes from `KAFKA_SASL_PASSWORD_FILE` when it names a file, else
/// from `KAFKA_SASL_PASSWORD`; a user name without a password is an error.
pub fn sasl_credentials(
    env: impl Fn(&str) -> Option<String>,
    read_file: impl Fn(&str) -> std::io::Result<String>,
) -> Result<Vec<(String, String)>, String> {
    let Some(username) = env(ENV_SASL_USERNAME).filter(|s| !s.is_empty()) else {
        return Ok(Vec::new());
    };
    let password = crate::secret::from_env_or_file(
        &env,
        &read_file,
        ENV_SASL_PASSWORD,
        ENV_SASL_PASSWORD_FILE,
    )?
    .ok_or_else(|| {
        format!("{ENV_SASL_USERNAME} is set but neither {ENV_SASL_PASSWORD} nor {ENV_SASL_PASSWORD_FILE} is")
    })?;
    Ok(vec![
        ("sasl.username".to_owned(), username),
        ("sasl.password".to_owned(), password),
    ])
}

/// A failure of the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{what}: {source}")]
    Kafka {
        what: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("topic {0:?} does not exist")]
    MissingTopic(String),
    #[error("restoring changelog partitions {partitions:?} did not finish in time")]
    RestoreTimeout { partitions: Vec<(String, i32)> },
}

/// Wraps a librdkafka error with what was being done.
pub fn failed(what: &'static str) -> impl FnOnce(KafkaError) -> TransportError {
    move |source| TransportError::Kafka { what, source }
}

/// A group's committed offset (if any) and its metadata, per partition of `topic`.
pub fn committed_in_group<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partitions: &[i32],
) -> Result<BTreeMap<i32, (Option<i64>, CommitMetadata)>, TransportError> {
    let mut tpl = TopicPartitionList::new();
    for &partition in partitions {
        tpl.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(tpl, KAFKA_TIMEOUT)
        .map_err(failed("reading the group's committed offsets"))?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            let metadata = commit_metadata_text(e).map_or_else(
                || {
                    tracing::warn!(
                        topic,
                        partition = e.partition(),
                        "the committed offset's metadata is not UTF-8, so not Keystone's: it is ignored"
                    );
                    CommitMetadata::default()
                },
                |text| CommitMetadata::parse(&text),
            );
            (e.partition(), (offset, metadata))
        })
        .collect())
}

/// The metadata of a committed offset, `None` when it is not UTF-8. rdkafka's
/// `metadata()` panics then and offers no byte access without `unsafe`, so the
/// panic is caught (the workspace builds with unwinding panics). Anyone may
/// commit for a group; Keystone only ever writes UTF-8, so such metadata is
/// someone else's and reads as none.
pub(crate) fn commit_metadata_text(
    element: &rdkafka::topic_partition_list::TopicPartitionListElem<'_>,
) -> Option<String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        element.metadata().to_owned()
    }))
    .ok()
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use rdkafka::ClientConfig;
    use rdkafka::mocking::MockCluster;

    use super::*;

    /// Commits `offset` with `metadata` (any bytes) for `group` through a bare
    /// OffsetCommit v2 request: Kafka clients only take text for metadata.
    fn commit_raw(bootstrap: &str, group: &str, topic: &str, offset: i64, metadata: &[u8]) {
        fn string(out: &mut Vec<u8>, bytes: &[u8]) {
            out.extend_from_slice(&i16::try_from(bytes.len()).unwrap().to_be_bytes());
            out.extend_from_slice(bytes);
        }
        let mut message = Vec::new();
        message.extend_from_slice(&8i16.to_be_bytes()); // OffsetCommit
        message.extend_from_slice(&2i16.to_be_bytes()); // version 2
        message.extend_from_slice(&1i32.to_be_bytes()); // correlation id
        string(&mut message, b"test");
        string(&mut message, group.as_bytes());
        message.extend_from_slice(&(-1i32).to_be_bytes()); // generation: none
        string(&mut message, b""); // member id: none
        message.extend_from_slice(&(-1i64).to_be_bytes()); // retention: the broker's
        message.extend_from_slice(&1i32.to_be_bytes()); // one topic
        string(&mut message, topic.as_bytes());
        message.extend_from_slice(&1i32.to_be_bytes()); // one partition
        message.extend_from_slice(&0i32.to_be_bytes());
        message.extend_from_slice(&offset.to_be_bytes());
        string(&mut message, metadata);
        let mut stream = std::net::TcpStream::connect(bootstrap).unwrap();
        stream
            .write_all(&i32::try_from(message.len()).unwrap().to_be_bytes())
            .unwrap();
        stream.write_all(&message).unwrap();
        let mut length = [0u8; 4];
        stream.read_exact(&mut length).unwrap();
        let mut response = vec![0u8; usize::try_from(i32::from_be_bytes(length)).unwrap()];
        stream.read_exact(&mut response).unwrap();
        // correlation id, one topic (name), one partition: id, then its error code.
        let error_at = response.len() - 2;
        assert_eq!(
            &response[error_at..],
            &[0, 0],
            "the commit failed: {response:?}"
        );
    }

    /// librdkafka's mock broker keeps commit metadata as bytes (a real broker
    /// decodes and re-encodes it), so it can hand back metadata that is not
    /// UTF-8, on which rdkafka's `metadata()` panics.
    #[test]
    fn commit_metadata_that_is_not_utf8_reads_as_none() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("input", 1, 1).unwrap();
        let bootstrap = cluster.bootstrap_servers();
        commit_raw(
            &bootstrap,
            "group",
            "input",
            5,
            b"\xff\xfe keystone.restore=r1 \xc3",
        );
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "group")
            .create()
            .unwrap();
        let committed = committed_in_group(&consumer, "input", &[0]).unwrap();
        assert_eq!(committed[&0], (Some(5), CommitMetadata::default()));

        commit_raw(&bootstrap, "group", "input", 6, b"keystone.restore=r1");
        let committed = committed_in_group(&consumer, "input", &[0]).unwrap();
        assert_eq!(committed[&0].0, Some(6));
        assert_eq!(committed[&0].1.restore.as_deref(), Some("r1"));
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    fn no_file(path: &str) -> std::io::Result<String> {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            path.to_owned(),
        ))
    }

    #[test]
    fn debug_redacts_secrets() {
        let settings = KafkaSettings {
            bootstrap_servers: "kafka:9093".into(),
            instance_id: "orders-s0-abc".into(),
            extra: vec![
                ("security.protocol".into(), "sasl_ssl".into()),
                ("sasl.username".into(), "orders".into()),
                ("sasl.password".into(), "hunter2-secret-value".into()),
                ("ssl.key.pem".into(), "-----BEGIN PRIVATE KEY-----".into()),
                ("ssl.key.password".into(), "keypass".into()),
            ],
        };
        let shown = format!("{settings:?}");
        assert!(shown.contains("sasl_ssl"), "{shown}");
        assert!(shown.contains("orders"), "{shown}");
        for secret in ["hunter2-secret-value", "BEGIN PRIVATE KEY", "keypass"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        assert_eq!(shown.matches("<redacted>").count(), 3, "{shown}");
    }

    #[test]
    fn secret_properties_are_recognised() {
        for key in [
            "sasl.password",
            "SASL.PASSWORD",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.key.pem",
            "sasl.oauthbearer.client.secret",
        ] {
            assert!(is_secret_property(key), "{key}");
        }
        for key in ["sasl.username", "sasl.mechanism", "ssl.ca.location"] {
            assert!(!is_secret_property(key), "{key}");
        }
    }

    #[test]
    fn credentials_come_from_the_environment() {
        assert!(sasl_credentials(env(&[]), no_file).unwrap().is_empty());
        let props = sasl_credentials(
            env(&[(ENV_SASL_USERNAME, "u"), (ENV_SASL_PASSWORD, "p")]),
            no_file,
        )
        .unwrap();
        assert_eq!(
            props,
            vec![
                ("sasl.username".to_owned(), "u".to_owned()),
                ("sasl.password".to_owned(), "p".to_owned())
            ]
        );
        // The file wins over the variable, without its trailing newline.
        let props = sasl_credentials(
            env(&[
                (ENV_SASL_USERNAME, "u"),
                (ENV_SASL_PASSWORD, "old"),
                (ENV_SASL_PASSWORD_FILE, "/run/secret/password"),
            ]),
            |path| {
                assert_eq!(path, "/run/secret/password");
                Ok("from-file\n".to_owned())
            },
        )
        .unwrap();
        assert_eq!(props[1].1, "from-file");
        let error = sasl_credentials(env(&[(ENV_SASL_USERNAME, "u")]), no_file).unwrap_err();
        assert!(error.contains(ENV_SASL_PASSWORD), "{error}");
        let error = sasl_credentials(
            env(&[(ENV_SASL_USERNAME, "u"), (ENV_SASL_PASSWORD_FILE, "/nope")]),
            no_file,
        )
        .unwrap_err();
        assert!(error.contains("/nope"), "{error}");
    }
}
