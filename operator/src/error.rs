//! The operator's errors. An invalid spec is not an error here: it is a
//! condition and an event, and the controller waits for a change. What reaches
//! `error_policy` is transient (Kafka or the API server unavailable, a
//! concurrent update) and is retried with a capped backoff.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),

    #[error("Kafka cluster {cluster:?}: {source}")]
    Kafka {
        cluster: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },

    #[error("Kafka cluster {cluster:?}: topic {topic:?}: {source}")]
    Topic {
        cluster: String,
        topic: String,
        #[source]
        source: rdkafka::error::RDKafkaErrorCode,
    },

    /// A request rdkafka does not wrap failed: creating, listing or deleting a
    /// Pipeline's principal or ACLs, or reading a consumer group's offsets.
    #[error("Kafka cluster {cluster:?}: {source}")]
    KafkaAdmin {
        cluster: String,
        #[source]
        source: keystone_kafka_admin::AdminError,
    },

    #[error("Kafka cluster {cluster:?} did not answer within {after:?}")]
    KafkaTimeout { cluster: String, after: Duration },

    #[error("Secret {namespace}/{name} has no key {key:?} for Kafka cluster {cluster:?}")]
    SecretKey {
        cluster: String,
        namespace: String,
        name: String,
        key: String,
    },

    #[error("serializing {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    #[error("checkpoint ConfigMap {namespace}/{name}: {message}")]
    Checkpoint {
        namespace: String,
        name: String,
        message: String,
    },

    #[error("the topic ownership ledger kept changing under us")]
    LedgerContention,

    #[error("{kind} without {field}")]
    MissingField {
        kind: &'static str,
        field: &'static str,
    },

    /// Instances told to stop (before a restore) did not exit in time.
    #[error("stopping instances: {0}")]
    Stopping(String),

    /// A restore could not be planned from a checkpoint.
    #[error("planning a restore: {0}")]
    Restore(String),

    /// A document does not fit in a ConfigMap.
    #[error(transparent)]
    TooLarge(#[from] crate::resources::TooLarge),

    /// The key of the runtime control tokens is unusable.
    #[error("the control key {0}")]
    ControlKey(String),

    /// The capture's database (spec.source.postgres) refused or did not answer.
    #[error("the capture's database: {0}")]
    Capture(String),

    /// A watched namespace's Pipelines (which the cycle check needs, every
    /// namespace's) or Processors were not listed in time: its watch is
    /// failing or slow.
    #[error("the {kind}s of namespace {namespace} are not listed yet (waited {after:?})")]
    NotListed {
        kind: &'static str,
        namespace: String,
        after: Duration,
    },
}

impl Error {
    /// A bounded label for the failure counter.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(status)) if status.code == 409 => "kube_conflict",
            Error::Kube(_) => "kube_api",
            Error::Kafka { .. } => "kafka",
            Error::Topic { .. } => "kafka_topic",
            Error::KafkaTimeout { .. } => "kafka_timeout",
            Error::KafkaAdmin { .. } => "kafka_admin",
            Error::SecretKey { .. } => "secret",
            Error::Serialize { .. } => "serialize",
            Error::Checkpoint { .. } => "checkpoint",
            Error::LedgerContention => "ledger_contention",
            Error::MissingField { .. } => "missing_field",
            Error::Stopping(_) => "stopping",
            Error::Restore(_) => "restore",
            Error::ControlKey(_) => "control_key",
            Error::TooLarge(_) => "too_large",
            Error::Capture(_) => "capture",
            Error::NotListed { .. } => "not_listed",
        }
    }

    /// A topic request Kafka refuses because of what the spec asks (a config it
    /// does not know, a replication factor above the broker count, ...).
    pub fn is_spec_rejection(&self) -> bool {
        use rdkafka::error::RDKafkaErrorCode as Code;
        matches!(
            self,
            Error::Topic {
                source: Code::InvalidConfig
                    | Code::InvalidPartitions
                    | Code::InvalidReplicationFactor
                    | Code::InvalidReplicaAssignment
                    | Code::PolicyViolation
                    | Code::InvalidTopic
                    | Code::InvalidRequest,
                ..
            }
        )
    }

    /// Errors that retrying will not fix without a change somewhere
    /// (configuration, a Secret). They still back off, only from a longer start.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Error::SecretKey { .. }
                | Error::Serialize { .. }
                | Error::MissingField { .. }
                | Error::Checkpoint { .. }
                | Error::ControlKey(_)
                | Error::TooLarge(_)
        )
    }
}

impl Error {
    /// A ConfigMap document that failed to serialize or does not fit.
    pub fn fit(what: &'static str, error: crate::resources::FitError) -> Self {
        match error {
            crate::resources::FitError::Serialize(source) => Error::Serialize { what, source },
            crate::resources::FitError::TooLarge(too_large) => Error::TooLarge(too_large),
        }
    }
}

impl From<kube::Error> for Error {
    fn from(error: kube::Error) -> Self {
        Error::Kube(error)
    }
}

/// The requeue delay after the `failures`-th consecutive failure: exponential
/// from 1 s (30 s for permanent errors), capped at 5 minutes.
pub fn backoff(failures: u32, permanent: bool) -> Duration {
    let base: u64 = if permanent { 30 } else { 1 };
    let cap: u64 = 300;
    let exp = failures.saturating_sub(1).min(16);
    Duration::from_secs(base.saturating_mul(1u64 << exp).min(cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1, false), Duration::from_secs(1));
        assert_eq!(backoff(2, false), Duration::from_secs(2));
        assert_eq!(backoff(5, false), Duration::from_secs(16));
        assert_eq!(backoff(30, false), Duration::from_secs(300));
        assert_eq!(backoff(1, true), Duration::from_secs(30));
        assert_eq!(backoff(u32::MAX, true), Duration::from_secs(300));
    }

    #[test]
    fn labels_are_bounded() {
        let e = Error::KafkaTimeout {
            cluster: "x".into(),
            after: Duration::from_secs(1),
        };
        assert_eq!(e.metric_label(), "kafka_timeout");
        assert!(!e.is_permanent());
        assert!(
            Error::MissingField {
                kind: "Pipeline",
                field: "metadata.namespace"
            }
            .is_permanent()
        );
    }
}
