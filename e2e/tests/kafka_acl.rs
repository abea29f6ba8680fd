//! `keystone-kafka-admin` against the testbed broker's SASL_SSL listener
//! (StandardAuthorizer; the admin principal a super user): SCRAM credentials
//! and ACLs are created, enforced, described and deleted.

use std::time::Duration;

use keystone_e2e::Testbed;
use keystone_kafka_admin::{
    AclBinding, AclFilter, KafkaAdmin, Operation, PatternType, ResourceType, ScramMechanism,
};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaRespErr;

const TIMEOUT: Duration = Duration::from_secs(30);

fn var(tb: &Testbed, name: &str) -> String {
    tb.var(name)
        .unwrap_or_else(|| {
            panic!("{name} is not in the testbed env: restart the testbed with this branch's e2e/testbed")
        })
        .to_owned()
}

/// Client settings for the secured listener as `user`.
fn secure(tb: &Testbed, user: &str, password: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set(
            "bootstrap.servers",
            var(tb, "KAFKA_SECURE_BOOTSTRAP_SERVERS"),
        )
        .set("security.protocol", "sasl_ssl")
        .set("sasl.mechanism", "SCRAM-SHA-512")
        .set("sasl.username", user)
        .set("sasl.password", password)
        .set("ssl.ca.location", var(tb, "KEYSTONE_TESTBED_KAFKA_CA"));
    config
}

/// What the broker answers `user` about `topic`'s metadata: None when allowed.
fn topic_error(tb: &Testbed, user: &str, password: &str, topic: &str) -> Option<RDKafkaRespErr> {
    let consumer: BaseConsumer = secure(tb, user, password)
        .set("group.id", format!("{user}.probe"))
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), TIMEOUT)
        .expect("metadata (authentication succeeded)");
    metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .expect("the topic is answered for")
        .error()
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", std::process::id())
}

#[tokio::test]
async fn acls_and_scram_credentials_are_created_enforced_described_and_deleted() {
    let tb = Testbed::from_env().await.expect("testbed (e2e/testbed up)");
    let admin_user = var(&tb, "KEYSTONE_TESTBED_KAFKA_ADMIN_USER");
    let admin_password = var(&tb, "KEYSTONE_TESTBED_KAFKA_ADMIN_PASSWORD");
    let admin = KafkaAdmin::connect(&secure(&tb, &admin_user, &admin_password)).expect("admin");

    // Two topics, as the super user.
    let (mine, theirs) = (unique("acl-mine"), unique("acl-theirs"));
    let topics: AdminClient<DefaultClientContext> = secure(&tb, &admin_user, &admin_password)
        .create()
        .expect("admin client");
    for topic in [&mine, &theirs] {
        for result in topics
            .create_topics(
                &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await
            .expect("create topics")
        {
            match result {
                Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, e)) => panic!("creating {t}: {e}"),
            }
        }
    }

    // A principal with a credential and read access to `mine` only.
    let user = unique("acl-user");
    let principal = format!("User:{user}");
    let password = "a-long-random-password";
    admin
        .upsert_scram(&user, ScramMechanism::Sha512, password.as_bytes(), TIMEOUT)
        .expect("upsert the SCRAM credential");
    let grants = vec![
        AclBinding::allow(
            &principal,
            ResourceType::Topic,
            &mine,
            PatternType::Literal,
            Operation::Read,
        ),
        AclBinding::allow(
            &principal,
            ResourceType::Topic,
            &mine,
            PatternType::Literal,
            Operation::Describe,
        ),
        AclBinding::allow(
            &principal,
            ResourceType::Group,
            &format!("{user}."),
            PatternType::Prefixed,
            Operation::Read,
        ),
    ];
    admin.create_acls(&grants, TIMEOUT).expect("create ACLs");
    // Creating them again changes nothing.
    admin
        .create_acls(&grants, TIMEOUT)
        .expect("create ACLs again");

    // The broker's authorizer applies ACL changes from its metadata log a
    // moment after the controller committed them: describe until they show.
    let mut expected = grants.clone();
    expected.sort();
    let describe = || {
        let mut described = admin
            .describe_acls(&AclFilter::principal(&principal), TIMEOUT)
            .expect("describe");
        described.sort();
        described
    };
    let mut described = describe();
    for _ in 0..60 {
        if described == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        described = describe();
    }
    assert_eq!(described, expected);

    // Enforced: the topic it may read is described; the other is refused.
    // (The broker's ACL cache follows the metadata log; poll briefly.)
    let mut allowed = topic_error(&tb, &user, password, &mine);
    for _ in 0..20 {
        if allowed.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        allowed = topic_error(&tb, &user, password, &mine);
    }
    assert_eq!(allowed, None, "{user} may describe {mine}");
    assert_eq!(
        topic_error(&tb, &user, password, &theirs),
        Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED),
        "{user} must be denied {theirs}"
    );

    // Deleting by principal removes them all; describe shows none.
    let deleted = admin
        .delete_acls(&[AclFilter::principal(&principal)], TIMEOUT)
        .expect("delete ACLs");
    assert_eq!(deleted.len(), grants.len(), "{deleted:?}");
    let mut left = describe();
    for _ in 0..60 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        left = describe();
    }
    assert!(left.is_empty(), "{left:?}");

    // Deleting the credential: the user can no longer authenticate; deleting
    // it again is not an error.
    admin
        .delete_scram(&user, ScramMechanism::Sha512, TIMEOUT)
        .expect("delete the credential");
    admin
        .delete_scram(&user, ScramMechanism::Sha512, TIMEOUT)
        .expect("deleting a missing credential is not an error");
    let authenticates = || {
        let consumer: BaseConsumer = secure(&tb, &user, password)
            .set("group.id", format!("{user}.probe"))
            .create()
            .expect("consumer");
        consumer
            .fetch_metadata(Some(&mine), Duration::from_secs(10))
            .is_ok()
    };
    let mut still = authenticates();
    for _ in 0..20 {
        if !still {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        still = authenticates();
    }
    assert!(!still, "a deleted credential must not authenticate");
}
