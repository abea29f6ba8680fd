//! librdkafka settings for a stage's consumer, producer and restore reader.
//!
//! Throughput settings are chosen for small JSON events at high rates: fetches of
//! up to 1 MiB per partition, fetching again within [`FETCH_QUEUE_BACKOFF_MS`]
//! once the prefetch queue has room, producer batches of 256 KiB that linger
//! 5 ms (latency stays far below the commit interval), lz4 compression.

use rdkafka::ClientConfig;

use crate::kafka::KafkaSettings;

/// How long a consumer waits before it fetches again for a partition whose
/// prefetch queue was full (`fetch.queue.backoff.ms`). librdkafka's default, a
/// second, caps a stage at about one full queue (100,000 records) per second
/// per partition however fast it processes: S10 ran at 110k events/s with
/// the default and at 320k with 10 ms, on the same machine and input
/// (`e2e/bench/ANALYSIS.md`).
pub const FETCH_QUEUE_BACKOFF_MS: &str = "10";

/// Settings shared by every client: brokers and any user-given settings (TLS,
/// SASL, ...), which come last so that they win.
fn base(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.bootstrap_servers);
    config.set("client.id", format!("keystone-{}", settings.instance_id));
    for (key, value) in &settings.extra {
        config.set(key, value);
    }
    config
}

/// The stage's group consumer.
pub fn consumer(
    settings: &KafkaSettings,
    group: &str,
    exactly_once: bool,
    start_from_earliest: bool,
) -> ClientConfig {
    let mut config = base(settings);
    config
        .set("group.id", group)
        // Static membership: a restarted pod keeps its partitions instead of
        // triggering two rebalances (leave, then join).
        .set("group.instance.id", &settings.instance_id)
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "30000")
        // Offsets are committed with the outputs (transaction) or after they are
        // acknowledged, never on a timer.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set(
            "auto.offset.reset",
            if start_from_earliest {
                "earliest"
            } else {
                "latest"
            },
        )
        .set("fetch.max.bytes", "52428800")
        .set("max.partition.fetch.bytes", "1048576")
        .set("fetch.wait.max.ms", "50")
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
        // The input of a stage is written transactionally by the previous stage
        // (or by producers that may abort): never read aborted records.
        .set(
            "isolation.level",
            if exactly_once {
                "read_committed"
            } else {
                "read_uncommitted"
            },
        );
    for (key, value) in &settings.extra {
        config.set(key, value);
    }
    config
}

/// The transaction timeout a producer configuration ends up with.
pub fn transaction_timeout(config: &ClientConfig) -> std::time::Duration {
    config
        .get("transaction.timeout.ms")
        .and_then(|ms| ms.parse().ok())
        .map_or(
            keystone_crds::plan::MIN_TRANSACTION_TIMEOUT,
            std::time::Duration::from_millis,
        )
}

/// What makes a producer transactional.
#[derive(Clone, Copy, Debug)]
pub struct Transactions<'a> {
    pub id: &'a str,
    /// How often the producer commits: its transaction timeout follows from it.
    pub commit_interval: std::time::Duration,
}

/// The stage's producer; transactional under exactly-once.
pub fn producer(settings: &KafkaSettings, transactions: Option<Transactions<'_>>) -> ClientConfig {
    let mut config = base(settings);
    config
        // Topics are the operator's to create, with their partitions and configs;
        // a missing one must fail loudly, not appear with broker defaults.
        .set("allow.auto.create.topics", "false")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.size", "262144")
        .set("compression.type", "lz4")
        // Java clients' partitioner, so that keys land where Kafka Streams and
        // Java producers put them (co-partitioned tables).
        .set("partitioner", "murmur2_random")
        .set("queue.buffering.max.messages", "1000000")
        // The brokers' limit (1 MiB per batch by default) decides what is too
        // large: librdkafka's own (1,000,000 bytes) would refuse the dead letter
        // of a record the broker accepted as input, and the stage would stop.
        .set("message.max.bytes", "2097152");
    if let Some(transactions) = transactions {
        let timeout = keystone_crds::plan::transaction_timeout(transactions.commit_interval);
        config
            .set("transactional.id", transactions.id)
            .set("transaction.timeout.ms", timeout.as_millis().to_string());
    }
    for (key, value) in &settings.extra {
        config.set(key, value);
    }
    config
}

/// A reader of changelog and table partitions: assigned, never in a group's
/// offsets, reading only committed data.
pub fn restore_reader(settings: &KafkaSettings, group: &str) -> ClientConfig {
    let mut config = base(settings);
    config
        .set("group.id", format!("{group}.restore"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("max.partition.fetch.bytes", "4194304")
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
    for (key, value) in &settings.extra {
        config.set(key, value);
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(extra: &[(&str, &str)]) -> KafkaSettings {
        KafkaSettings {
            bootstrap_servers: "kafka:9092".into(),
            instance_id: "orders-s0-0".into(),
            extra: extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn a_transactional_producer_times_out_after_three_commit_intervals_unless_the_user_says_otherwise()
     {
        let transactions = |secs| Transactions {
            id: "orders.s0.orders-s0-0",
            commit_interval: std::time::Duration::from_secs(secs),
        };
        let defaults = settings(&[]);
        let eos = producer(&defaults, Some(transactions(1)));
        assert_eq!(eos.get("transactional.id"), Some("orders.s0.orders-s0-0"));
        assert_eq!(eos.get("transaction.timeout.ms"), Some("10000"));
        assert_eq!(
            transaction_timeout(&producer(&defaults, Some(transactions(30)))),
            std::time::Duration::from_secs(90)
        );
        let plain = producer(&defaults, None);
        assert_eq!(plain.get("transactional.id"), None);
        assert_eq!(plain.get("transaction.timeout.ms"), None);
        let chosen = settings(&[("transaction.timeout.ms", "60000")]);
        assert_eq!(
            transaction_timeout(&producer(&chosen, Some(transactions(1)))),
            std::time::Duration::from_secs(60)
        );
    }

    #[test]
    fn readers_fetch_again_soon_after_a_full_queue_unless_the_user_says_otherwise() {
        let defaults = settings(&[]);
        for config in [
            consumer(&defaults, "g", true, true),
            restore_reader(&defaults, "g"),
        ] {
            assert_eq!(
                config.get("fetch.queue.backoff.ms"),
                Some(FETCH_QUEUE_BACKOFF_MS)
            );
        }
        let chosen = settings(&[("fetch.queue.backoff.ms", "200")]);
        assert_eq!(
            consumer(&chosen, "g", false, true).get("fetch.queue.backoff.ms"),
            Some("200")
        );
    }
}
