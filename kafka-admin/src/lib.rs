//! Kafka ACLs, SCRAM credentials and consumer groups' committed offsets, which
//! rdkafka's `AdminClient` does not wrap, through librdkafka's C admin API on
//! the native handle of an rdkafka client: create, describe and delete ACL
//! bindings; upsert and delete SCRAM credentials; list a group's offsets.
//!
//! Calls block until the broker answers (or the timeout passes): run them on
//! a blocking thread (`tokio::task::spawn_blocking`). Each call has its own
//! result queue, so calls may run concurrently on one [`KafkaAdmin`] (ACLs,
//! credentials) or one [`GroupOffsets`] (offsets, which need a consumer handle).

mod ffi;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BlockingRetryable, ConstantBuilder};
use rdkafka::ClientConfig;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// What an ACL binding is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    Topic,
    Group,
    TransactionalId,
    /// The cluster itself (resource name `kafka-cluster`).
    Cluster,
}

/// How an ACL's resource name matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PatternType {
    /// Exactly the name.
    Literal,
    /// Every name starting with it.
    Prefixed,
}

/// What an ACL lets (or forbids) a principal do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    All,
    Read,
    Write,
    Create,
    Delete,
    Alter,
    Describe,
    ClusterAction,
    DescribeConfigs,
    AlterConfigs,
    IdempotentWrite,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    Allow,
    Deny,
}

/// One ACL: `principal` (`User:name`) from `host` (`*`: any) may (or may not)
/// do `operation` on the resources `resource_type`/`name`/`pattern` match.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AclBinding {
    pub resource_type: ResourceType,
    pub name: String,
    pub pattern: PatternType,
    pub principal: String,
    pub host: String,
    pub operation: Operation,
    pub permission: Permission,
}

impl AclBinding {
    /// An ALLOW binding from any host.
    pub fn allow(
        principal: &str,
        resource_type: ResourceType,
        name: &str,
        pattern: PatternType,
        operation: Operation,
    ) -> Self {
        AclBinding {
            resource_type,
            name: name.to_owned(),
            pattern,
            principal: principal.to_owned(),
            host: "*".to_owned(),
            operation,
            permission: Permission::Allow,
        }
    }
}

impl fmt::Display for AclBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} {} {:?} {:?} {}:{:?} from {}",
            self.permission,
            self.principal,
            self.operation,
            self.resource_type,
            self.name,
            self.pattern,
            self.host
        )
    }
}

/// An offset a consumer group committed: where it goes on in the partition.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommittedOffset {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Which ACL bindings a describe or delete matches: every field left `None`
/// matches anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AclFilter {
    pub resource_type: Option<ResourceType>,
    pub name: Option<String>,
    pub pattern: Option<PatternType>,
    pub principal: Option<String>,
    pub operation: Option<Operation>,
}

impl AclFilter {
    /// Every binding of a principal.
    pub fn principal(principal: &str) -> Self {
        AclFilter {
            principal: Some(principal.to_owned()),
            ..AclFilter::default()
        }
    }
}

/// The SCRAM mechanisms Kafka stores credentials for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScramMechanism {
    Sha256,
    Sha512,
}

impl ScramMechanism {
    /// The SASL mechanism's name, as clients configure it.
    pub fn sasl_name(self) -> &'static str {
        match self {
            ScramMechanism::Sha256 => "SCRAM-SHA-256",
            ScramMechanism::Sha512 => "SCRAM-SHA-512",
        }
    }

    /// From a SASL mechanism's name; None for PLAIN and others.
    pub fn from_sasl_name(name: &str) -> Option<Self> {
        match name.to_ascii_uppercase().as_str() {
            "SCRAM-SHA-256" => Some(ScramMechanism::Sha256),
            "SCRAM-SHA-512" => Some(ScramMechanism::Sha512),
            _ => None,
        }
    }
}

/// Iterations of a new SCRAM credential: Kafka's minimum is 4096.
pub const SCRAM_ITERATIONS: i32 = 8192;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("creating the admin client: {0}")]
    Client(#[source] KafkaError),
    /// librdkafka refused the request before sending it.
    #[error("{operation}: {message}")]
    Invalid {
        operation: &'static str,
        message: String,
    },
    #[error("{operation}: no answer within {after:?}")]
    Timeout {
        operation: &'static str,
        after: Duration,
    },
    /// The broker (or librdkafka) answered with an error.
    #[error("{operation}: {code:?}: {message}")]
    Kafka {
        operation: &'static str,
        code: RDKafkaErrorCode,
        message: String,
    },
}

impl AdminError {
    /// The Kafka error code, when the broker answered with one.
    pub fn code(&self) -> Option<RDKafkaErrorCode> {
        match self {
            AdminError::Kafka { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Whether the group's coordinator is still loading or moving: asked again.
fn coordinator_unsettled(error: &AdminError) -> bool {
    matches!(
        error.code(),
        Some(
            RDKafkaErrorCode::CoordinatorLoadInProgress
                | RDKafkaErrorCode::CoordinatorNotAvailable
                | RDKafkaErrorCode::NotCoordinator
        )
    )
}

/// How long a reader waits before asking a loading or moving coordinator again.
const COORDINATOR_RETRY: Duration = Duration::from_millis(250);

/// Reads consumer groups' committed offsets without joining them.
///
/// librdkafka's ListConsumerGroupOffsets must not run on an admin (producer)
/// handle: when the coordinator answers that it is not (or not yet) the
/// group's coordinator, librdkafka 2.12 asks the handle's own consumer group
/// to look its coordinator up again, and an admin handle has none: the
/// process dies of a NULL dereference (confluentinc/librdkafka's
/// `rd_kafka_handle_OffsetFetch`; seen here with new groups on a fresh
/// broker). So the reader holds a consumer handle with a group of its own,
/// which it never joins (it subscribes to nothing and commits nothing); that
/// group's coordinator lookup is all it adds. One reader may serve
/// concurrent calls.
pub struct GroupOffsets {
    consumer: BaseConsumer,
}

impl GroupOffsets {
    /// Connects with librdkafka properties (servers, TLS, SASL); `own_group`
    /// names the handle's group (its principal needs Describe on it, or
    /// librdkafka reports the refused lookup once; reads go on either way).
    pub fn connect(config: &ClientConfig, own_group: &str) -> Result<Self, AdminError> {
        let consumer = config
            .clone()
            .set("group.id", own_group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(AdminError::Client)?;
        Ok(GroupOffsets { consumer })
    }

    /// The offsets `group` has committed, on every partition it has committed
    /// on, read from the group's coordinator without joining the group. A
    /// coordinator still loading or moving (just after a broker starts) is
    /// asked again until `timeout`, as a consumer's own offset fetch does.
    pub fn committed_offsets(
        &self,
        group: &str,
        timeout: Duration,
    ) -> Result<Vec<CommittedOffset>, AdminError> {
        let deadline = Instant::now() + timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        let handle = self.consumer.client().native_ptr();
        (|| ffi::committed_offsets(handle, group, left()))
            .retry(
                ConstantBuilder::new()
                    .with_delay(COORDINATOR_RETRY)
                    .without_max_times(),
            )
            .when(|error| coordinator_unsettled(error) && left() >= COORDINATOR_RETRY * 2)
            .call()
    }
}

/// An admin connection for ACLs and SCRAM credentials. It holds an rdkafka
/// `AdminClient` (which owns the librdkafka handle and its background thread,
/// and may be shared with code using rdkafka's own admin calls) and sends the
/// requests rdkafka does not wrap on its handle.
#[derive(Clone)]
pub struct KafkaAdmin {
    client: Arc<AdminClient<DefaultClientContext>>,
}

impl KafkaAdmin {
    /// Connects with librdkafka properties (servers, TLS, SASL).
    pub fn connect(config: &ClientConfig) -> Result<Self, AdminError> {
        let client = config.create().map_err(AdminError::Client)?;
        Ok(KafkaAdmin {
            client: Arc::new(client),
        })
    }

    /// Uses an existing admin client's connection.
    pub fn with_client(client: Arc<AdminClient<DefaultClientContext>>) -> Self {
        KafkaAdmin { client }
    }

    /// Creates the bindings (existing ones are left as they are: Kafka treats
    /// a repeated binding as a no-op).
    pub fn create_acls(&self, acls: &[AclBinding], timeout: Duration) -> Result<(), AdminError> {
        if acls.is_empty() {
            return Ok(());
        }
        ffi::create_acls(self.client.inner().native_ptr(), acls, timeout)
    }

    /// The bindings the filter matches.
    pub fn describe_acls(
        &self,
        filter: &AclFilter,
        timeout: Duration,
    ) -> Result<Vec<AclBinding>, AdminError> {
        ffi::describe_acls(self.client.inner().native_ptr(), filter, timeout)
    }

    /// Deletes the bindings the filters match; returns those deleted.
    pub fn delete_acls(
        &self,
        filters: &[AclFilter],
        timeout: Duration,
    ) -> Result<Vec<AclBinding>, AdminError> {
        if filters.is_empty() {
            return Ok(Vec::new());
        }
        ffi::delete_acls(self.client.inner().native_ptr(), filters, timeout)
    }

    /// Creates or replaces a user's SCRAM credential (a random salt, [`SCRAM_ITERATIONS`]).
    pub fn upsert_scram(
        &self,
        user: &str,
        mechanism: ScramMechanism,
        password: &[u8],
        timeout: Duration,
    ) -> Result<(), AdminError> {
        ffi::alter_scram(
            self.client.inner().native_ptr(),
            user,
            mechanism,
            Some(password),
            timeout,
        )
    }

    /// Deletes a user's SCRAM credential; one that does not exist is not an error.
    pub fn delete_scram(
        &self,
        user: &str,
        mechanism: ScramMechanism,
        timeout: Duration,
    ) -> Result<(), AdminError> {
        match ffi::alter_scram(
            self.client.inner().native_ptr(),
            user,
            mechanism,
            None,
            timeout,
        ) {
            Err(e) if e.code() == Some(RDKafkaErrorCode::ResourceNotFound) => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mechanisms_round_trip_by_name() {
        for m in [ScramMechanism::Sha256, ScramMechanism::Sha512] {
            assert_eq!(ScramMechanism::from_sasl_name(m.sasl_name()), Some(m));
        }
        assert_eq!(
            ScramMechanism::from_sasl_name("scram-sha-512"),
            Some(ScramMechanism::Sha512)
        );
        assert_eq!(ScramMechanism::from_sasl_name("PLAIN"), None);
    }

    #[test]
    fn bindings_convert_to_librdkafka_and_back() {
        for binding in [
            AclBinding::allow(
                "User:a",
                ResourceType::Topic,
                "orders",
                PatternType::Literal,
                Operation::Read,
            ),
            AclBinding::allow(
                "User:a",
                ResourceType::TransactionalId,
                "keystone.n.p.",
                PatternType::Prefixed,
                Operation::Write,
            ),
            AclBinding::allow(
                "User:a",
                ResourceType::Cluster,
                "kafka-cluster",
                PatternType::Literal,
                Operation::IdempotentWrite,
            ),
        ] {
            assert_eq!(ffi::round_trip(&binding).expect("valid"), binding);
        }
        // A name C cannot carry is refused before anything is sent.
        let bad = AclBinding::allow(
            "User:a",
            ResourceType::Topic,
            "or\0ders",
            PatternType::Literal,
            Operation::Read,
        );
        assert!(matches!(
            ffi::round_trip(&bad),
            Err(AdminError::Invalid { .. })
        ));
    }

    #[test]
    fn an_unreachable_broker_times_out() {
        let mut config = ClientConfig::new();
        // A port nothing listens on (the discard port, unused on test machines).
        config.set("bootstrap.servers", "127.0.0.1:9");
        let admin = KafkaAdmin::connect(&config).expect("client");
        let error = admin
            .describe_acls(&AclFilter::default(), Duration::from_millis(300))
            .expect_err("no broker");
        assert!(
            matches!(error, AdminError::Timeout { .. } | AdminError::Kafka { .. }),
            "{error}"
        );
    }
}
