//! Transactions against the real broker: committed records are visible to a
//! read_committed consumer, aborted ones never are. A consumer group's
//! committed offsets, as `keystone-kafka-admin` lists them.

use std::time::Duration;

use keystone_e2e::Testbed;
use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::{Offset, TopicPartitionList};

const TIMEOUT: Duration = Duration::from_secs(30);

async fn produce(producer: &FutureProducer, topic: &str, values: &[&str]) {
    for v in values {
        producer
            .send(
                FutureRecord::<str, str>::to(topic).payload(*v).key("k"),
                TIMEOUT,
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce {v}: {e}"));
    }
}

/// Reads until `last` arrives (or fails after the timeout).
async fn consume_until(bootstrap: &str, topic: &str, isolation: &str, last: &str) -> Vec<String> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("e2e-{topic}-{isolation}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !seen.iter().any(|v| v == last) {
        let msg = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("{isolation}: {last:?} not consumed within {TIMEOUT:?}; got {seen:?}")
            })
            .expect("consume");
        seen.push(String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned());
    }
    seen
}

#[tokio::test]
async fn aborted_transactions_stay_invisible_to_read_committed() {
    let tb = Testbed::from_env().await.expect("testbed");
    let bootstrap = tb.kafka_bootstrap_servers().expect("kafka").to_owned();
    let topic = format!("e2e-txn-{}", std::process::id());

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("admin");
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic");
    for r in created {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("transactional.id", format!("{topic}-producer"))
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    producer
        .init_transactions(TIMEOUT)
        .expect("init_transactions");

    producer.begin_transaction().expect("begin");
    produce(&producer, &topic, &["c1", "c2"]).await;
    producer.commit_transaction(TIMEOUT).expect("commit");

    producer.begin_transaction().expect("begin");
    produce(&producer, &topic, &["a1", "a2"]).await;
    producer.abort_transaction(TIMEOUT).expect("abort");

    producer.begin_transaction().expect("begin");
    produce(&producer, &topic, &["c3"]).await;
    producer.commit_transaction(TIMEOUT).expect("commit");

    let committed = consume_until(&bootstrap, &topic, "read_committed", "c3").await;
    assert_eq!(committed, ["c1", "c2", "c3"]);

    // The aborted records were written to the log: read_uncommitted sees them.
    let uncommitted = consume_until(&bootstrap, &topic, "read_uncommitted", "c3").await;
    assert_eq!(uncommitted, ["c1", "c2", "a1", "a2", "c3"]);

    let _ = admin.delete_topics(&[&topic], &AdminOptions::new()).await;
}

#[tokio::test]
async fn a_groups_committed_offsets_are_listed_without_joining_it() {
    let tb = Testbed::from_env().await.expect("testbed");
    let bootstrap = tb.kafka_bootstrap_servers().expect("kafka").to_owned();
    let topic = format!("e2e-offsets-{}", std::process::id());
    let group = format!("{topic}-group");
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &bootstrap);
    let admin: AdminClient<DefaultClientContext> = config.create().expect("admin");
    for r in admin
        .create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic")
    {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
    // Many new groups at once, as an operator meets them: coordinator changes
    // on the way must not take the process down.
    let offsets = std::sync::Arc::new(
        keystone_kafka_admin::GroupOffsets::connect(&config, &format!("{topic}-reader"))
            .expect("offsets reader"),
    );
    let strangers = (0..16).map(|i| {
        let (offsets, group) = (offsets.clone(), format!("{group}-stranger-{i}"));
        tokio::task::spawn_blocking(move || offsets.committed_offsets(&group, TIMEOUT))
    });
    for listed in futures::future::join_all(strangers).await {
        let listed = listed.expect("task").expect("a group that never was");
        assert!(listed.is_empty(), "{listed:?}");
    }

    let listed = {
        let (offsets, group) = (offsets.clone(), group.clone());
        tokio::task::spawn_blocking(move || offsets.committed_offsets(&group, TIMEOUT))
            .await
            .expect("task")
            .expect("a group that never committed")
    };
    assert!(listed.is_empty(), "nothing committed yet: {listed:?}");

    // The group commits on partitions 0 and 2 only (as a stopped pipeline's
    // stage leaves them); partition 1 has no offset.
    let committer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut commit = TopicPartitionList::new();
    commit
        .add_partition_offset(&topic, 0, Offset::Offset(0))
        .expect("partition 0");
    commit
        .add_partition_offset(&topic, 2, Offset::Offset(0))
        .expect("partition 2");
    let committed =
        tokio::task::spawn_blocking(move || committer.commit(&commit, CommitMode::Sync))
            .await
            .expect("task");
    committed.expect("commit");

    let (listing, name) = (offsets.clone(), group.clone());
    let mut listed = tokio::task::spawn_blocking(move || listing.committed_offsets(&name, TIMEOUT))
        .await
        .expect("task")
        .expect("the group's offsets");
    listed.sort();
    let expected: Vec<keystone_kafka_admin::CommittedOffset> = [0, 2]
        .into_iter()
        .map(|partition| keystone_kafka_admin::CommittedOffset {
            topic: topic.clone(),
            partition,
            offset: 0,
        })
        .collect();
    assert_eq!(listed, expected);
}
