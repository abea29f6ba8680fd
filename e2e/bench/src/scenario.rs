//! The scenarios S1-S13, their engines, inputs and targets (shared/BENCHMARKS.md).

use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::digest::{Mode, OutputDigest};
use crate::generate::Dataset;
use crate::reference;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    S1,
    S2,
    S3,
    /// S3 without contiguous sequences: every event waits its max delay.
    S3b,
    S4,
    S5,
    S6,
    S7,
    S8,
    S9,
    S10,
    S11,
    /// S5's job on Avro values (Confluent framing, a schema registry).
    S12,
    S13,
}

pub const ALL: [Scenario; 14] = [
    Scenario::S1,
    Scenario::S2,
    Scenario::S3,
    Scenario::S3b,
    Scenario::S4,
    Scenario::S5,
    Scenario::S6,
    Scenario::S7,
    Scenario::S8,
    Scenario::S9,
    Scenario::S10,
    Scenario::S11,
    Scenario::S12,
    Scenario::S13,
];

/// One engine configuration that runs a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Keystone,
    FlinkHeap,
    FlinkRocksDb,
    KafkaStreamsTtd,
    /// Kafka mode (S5, S6): Flink with its Kafka connector, heap state.
    FlinkKafka,
    /// Kafka mode (S5, S6): a KafkaStreams application against the broker.
    KafkaStreams,
    /// S9: Flink 1.19 with flink-connector-kafka and flink-connector-opensearch2.
    FlinkSearch,
    /// S9: a plain bulk loader of the final documents (the index's ceiling).
    BulkCeiling,
    /// S10: Flink 1.19 with flink-connector-kafka and the Iceberg Flink sink.
    FlinkIceberg,
    /// S10's Parquet part: Keystone with the parquet sink.
    KeystoneParquet,
    /// S10's Parquet part: pyarrow writing the same rows (the writer's ceiling).
    ParquetCeiling,
    /// S11: Debezium's PostgreSQL connector in Kafka Connect, streaming changes
    /// (Keystone's counterpart is `Keystone`: the capture streaming them).
    Debezium,
    /// S11: Keystone's capture copying a table (the initial snapshot).
    KeystoneSnapshot,
    /// S11: Debezium copying the same table.
    DebeziumSnapshot,
    /// S13: a plain rdkafka producer writing the same records (`keystone-bench
    /// load`), the ceiling of the HTTP ingest endpoint (`Keystone`).
    ProducerCeiling,
    /// S12: Keystone on S5's JSON topic and plan, in the same rounds as its Avro run.
    KeystoneJson,
    /// S12: a KafkaStreams application with a Confluent-framing Avro serde.
    KafkaStreamsAvro,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Keystone => "keystone",
            Engine::FlinkHeap => "flink-heap",
            Engine::FlinkRocksDb => "flink-rocksdb",
            Engine::KafkaStreamsTtd => "kafka-streams-ttd",
            Engine::FlinkKafka => "flink",
            Engine::KafkaStreams => "kafka-streams",
            Engine::FlinkSearch => "flink",
            Engine::BulkCeiling => "bulk-ceiling",
            Engine::FlinkIceberg => "flink",
            Engine::KeystoneParquet => "keystone-parquet",
            Engine::ParquetCeiling => "pyarrow-ceiling",
            Engine::Debezium => "debezium",
            Engine::KeystoneSnapshot => "keystone-snapshot",
            Engine::DebeziumSnapshot => "debezium-snapshot",
            Engine::ProducerCeiling => "rdkafka-producer",
            Engine::KeystoneJson => "keystone-json",
            Engine::KafkaStreamsAvro => "kafka-streams-avro",
        }
    }
}

/// A target from BENCHMARKS.md: Keystone's events/s at least `ratio` x the peer's.
pub struct Target {
    pub peer: Engine,
    pub ratio: f64,
}

impl Scenario {
    pub fn parse(text: &str) -> anyhow::Result<Scenario> {
        Ok(match text.to_ascii_uppercase().as_str() {
            "S1" => Scenario::S1,
            "S2" => Scenario::S2,
            "S3" => Scenario::S3,
            "S3B" => Scenario::S3b,
            "S4" => Scenario::S4,
            "S5" => Scenario::S5,
            "S6" => Scenario::S6,
            "S7" => Scenario::S7,
            "S8" => Scenario::S8,
            "S9" => Scenario::S9,
            "S10" => Scenario::S10,
            "S11" => Scenario::S11,
            "S12" => Scenario::S12,
            "S13" => Scenario::S13,
            other => bail!("unknown scenario {other:?} (S1..S13 or all)"),
        })
    }

    pub fn id(self) -> &'static str {
        match self {
            Scenario::S1 => "S1",
            Scenario::S2 => "S2",
            Scenario::S3 => "S3",
            Scenario::S3b => "S3b",
            Scenario::S4 => "S4",
            Scenario::S5 => "S5",
            Scenario::S6 => "S6",
            Scenario::S7 => "S7",
            Scenario::S8 => "S8",
            Scenario::S9 => "S9",
            Scenario::S10 => "S10",
            Scenario::S11 => "S11",
            Scenario::S12 => "S12",
            Scenario::S13 => "S13",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Scenario::S1 => "parse, filter, project 3 fields (engine only)",
            Scenario::S2 => "dedup by event id within 10 min, 20% duplicates (engine only)",
            Scenario::S3 => "per-key reorder by sequence, bounded disorder (engine only)",
            Scenario::S3b => {
                "S3 without contiguous sequences: every event waits for late predecessors (engine only)"
            }
            Scenario::S4 => "enrichment join with a 100k-row table (engine only)",
            Scenario::S5 => "Kafka -> parse, dedup, project -> Kafka, at-least-once",
            Scenario::S6 => "S5 with exactly-once, 1 s transactions",
            Scenario::S7 => "p99 latency at a fixed rate (S5 topology)",
            Scenario::S8 => {
                "memory: runtime RSS at S2 steady state; operator RSS with 1,000 and 10,000 Pipelines"
            }
            Scenario::S9 => "Kafka -> dedup, order, project -> OpenSearch bulk (idempotent writes)",
            Scenario::S10 => "Kafka -> project -> Iceberg (exactly once); Parquet against pyarrow",
            Scenario::S11 => {
                "PostgreSQL change capture into Kafka: changes/s from a write-heavy table, snapshot rows/s"
            }
            Scenario::S12 => {
                "S5 on Avro: Kafka (Avro, Confluent framing) -> dedup, project -> Kafka (Avro), at-least-once"
            }
            Scenario::S13 => {
                "HTTP ingest into Kafka: NDJSON batches of 100 on 64 connections, 2xx after acks=all"
            }
        }
    }

    pub fn target_text(self) -> &'static str {
        match self {
            Scenario::S1 => ">= 4x Flink, >= 3x Kafka Streams",
            Scenario::S2 => ">= 5x Flink RocksDB, >= 3x Flink heap",
            Scenario::S3 => ">= 4x Flink KeyedProcessFunction (RocksDB)",
            Scenario::S3b => {
                "reported beside S3: events/s and peak RSS while every event is held, vs the same Flink KeyedProcessFunction"
            }
            Scenario::S4 => ">= 4x Flink",
            Scenario::S5 => {
                ">= 3x Flink, >= 2x Kafka Streams; >= 0.8 of the consume-produce ceiling"
            }
            Scenario::S6 => {
                "loss vs S5 <= 15%; >= 3x Kafka Streams EOS v2; >= 0.8 of the consume-produce ceiling"
            }
            Scenario::S7 => "<= 0.2x Flink's p99",
            Scenario::S8 => {
                "runtime <= 0.25x Flink; operator <= 50 MB with 1,000 and < 150 MiB with 10,000 Pipelines, reconcile p99 < 1 s"
            }
            Scenario::S9 => ">= 2x Flink (OpenSearch connector); >= 0.8x the plain bulk ceiling",
            Scenario::S10 => {
                ">= 2x Flink (Iceberg Flink sink) at equal guarantees; Parquet rows/s against a pyarrow writer's ceiling"
            }
            Scenario::S11 => {
                ">= 2x Debezium (Kafka Connect) in changes/s; >= 2x its snapshot rows/s"
            }
            Scenario::S12 => {
                ">= 3x Kafka Streams (Avro serde); Keystone's Avro events/s >= its JSON events/s (S5's job)"
            }
            Scenario::S13 => {
                ">= 0.7x a plain rdkafka producer's records/s (acks=all, idempotent); p99 request latency reported"
            }
        }
    }

    /// Engine-only scenarios this harness measures end to end.
    pub fn is_engine_only(self) -> bool {
        matches!(
            self,
            Scenario::S1 | Scenario::S2 | Scenario::S3 | Scenario::S3b | Scenario::S4
        )
    }

    /// Kafka-mode scenarios this harness measures against the testbed's broker.
    pub fn is_kafka(self) -> bool {
        matches!(self, Scenario::S5 | Scenario::S6 | Scenario::S12)
    }

    /// S9: Kafka in, the testbed's OpenSearch out.
    pub fn is_search(self) -> bool {
        self == Scenario::S9
    }

    /// S10: Kafka in, the testbed's Iceberg catalog (and a Parquet folder) out.
    pub fn is_lake(self) -> bool {
        self == Scenario::S10
    }

    /// S11: the testbed's PostgreSQL in, Kafka out.
    pub fn is_capture(self) -> bool {
        self == Scenario::S11
    }

    /// S13: the HTTP ingest endpoint, driven by vegeta, into Kafka.
    pub fn is_http(self) -> bool {
        self == Scenario::S13
    }

    /// Why a scenario is not measured by this harness yet.
    pub fn not_measured_reason(self) -> &'static str {
        match self {
            Scenario::S5 | Scenario::S6 | Scenario::S7 => {
                "not run yet: `keystone-bench run --scenario S5,S6,S7` with the runner built with `--features kafka` and the testbed's Kafka up (`eval \"$(e2e/testbed env)\"`)"
            }
            Scenario::S8 => {
                "not recorded yet: `e2e/bench/s8-operator.sh OPERATOR_BINARY 1000 > s8-1k.json` (and 10000 > s8-10k.json) then `keystone-bench s8 --operator-json s8-1k.json --operator-json s8-10k.json` (after S5)"
            }
            Scenario::S9 => {
                "not run yet: `keystone-bench run --scenario S9` with the runner built with `--features kafka` and the testbed's Kafka and OpenSearch up (`eval \"$(e2e/testbed env)\"`)"
            }
            Scenario::S10 => {
                "not run yet: `keystone-bench run --scenario S10` with the runner built with `--features kafka` and the testbed's Kafka and lake up (`eval \"$(e2e/testbed env)\"`)"
            }
            Scenario::S11 => {
                "not run yet: `keystone-bench run --scenario S11` with the runner built with `--features kafka` and the testbed's Kafka and PostgreSQL up (`eval \"$(e2e/testbed env)\"`)"
            }
            Scenario::S12 => {
                "not run yet: `keystone-bench run --scenario S12` with the runner built with `--features kafka` and the testbed's Kafka and registry up (`eval \"$(e2e/testbed env)\"`)"
            }
            Scenario::S13 => {
                "not run yet: `keystone-bench run --scenario S13` with the runner built with `--features kafka`, the testbed's Kafka up and its vegeta (`eval \"$(e2e/testbed env)\"`)"
            }
            _ => "",
        }
    }

    pub fn engines(self) -> Vec<Engine> {
        match self {
            Scenario::S1 => vec![Engine::Keystone, Engine::FlinkHeap, Engine::KafkaStreamsTtd],
            // Not Kafka Streams: TopologyTestDriver commits (and so flushes every
            // state store) after each record, which no real deployment does; S2 has
            // no Kafka Streams target.
            Scenario::S2 => vec![Engine::Keystone, Engine::FlinkRocksDb, Engine::FlinkHeap],
            Scenario::S3 | Scenario::S3b => {
                vec![Engine::Keystone, Engine::FlinkRocksDb, Engine::FlinkHeap]
            }
            Scenario::S4 => vec![Engine::Keystone, Engine::FlinkHeap],
            Scenario::S5 | Scenario::S6 | Scenario::S7 => {
                vec![Engine::Keystone, Engine::FlinkKafka, Engine::KafkaStreams]
            }
            Scenario::S9 => vec![Engine::Keystone, Engine::FlinkSearch, Engine::BulkCeiling],
            Scenario::S10 => vec![
                Engine::Keystone,
                Engine::FlinkIceberg,
                Engine::KeystoneParquet,
                Engine::ParquetCeiling,
            ],
            // Streaming first: its runs need the round's writes, made once for both.
            Scenario::S11 => vec![
                Engine::Keystone,
                Engine::Debezium,
                Engine::KeystoneSnapshot,
                Engine::DebeziumSnapshot,
            ],
            Scenario::S12 => vec![
                Engine::Keystone,
                Engine::KeystoneJson,
                Engine::KafkaStreamsAvro,
            ],
            Scenario::S13 => vec![Engine::Keystone, Engine::ProducerCeiling],
            _ => Vec::new(),
        }
    }

    pub fn targets(self) -> Vec<Target> {
        let t = |peer, ratio| Target { peer, ratio };
        match self {
            Scenario::S1 => vec![t(Engine::FlinkHeap, 4.0), t(Engine::KafkaStreamsTtd, 3.0)],
            Scenario::S2 => vec![t(Engine::FlinkRocksDb, 5.0), t(Engine::FlinkHeap, 3.0)],
            Scenario::S3 => vec![t(Engine::FlinkRocksDb, 4.0)],
            Scenario::S4 => vec![t(Engine::FlinkHeap, 4.0)],
            Scenario::S5 => vec![t(Engine::FlinkKafka, 3.0), t(Engine::KafkaStreams, 2.0)],
            Scenario::S6 => vec![t(Engine::KafkaStreams, 3.0)],
            // The ceiling: Keystone's rate over the loader's, both as input events
            // over the time to apply the same documents.
            Scenario::S9 => vec![t(Engine::FlinkSearch, 2.0), t(Engine::BulkCeiling, 0.8)],
            Scenario::S10 => vec![t(Engine::FlinkIceberg, 2.0)],
            // The snapshot's 2x (keystone-snapshot / debezium-snapshot) is
            // paired by the S11 runner.
            Scenario::S11 => vec![t(Engine::Debezium, 2.0)],
            // No peer HTTP-to-Kafka path runs here (README.md, S13): the
            // ceiling is a plain producer of the same records on the same broker.
            // Keystone on Avro against itself on JSON (S5's job, same rounds): >= 1.
            Scenario::S12 => vec![
                t(Engine::KafkaStreamsAvro, 3.0),
                t(Engine::KeystoneJson, 1.0),
            ],
            Scenario::S13 => vec![t(Engine::ProducerCeiling, 0.7)],
            _ => Vec::new(),
        }
    }

    pub fn pipeline(self, bench_dir: &Path) -> PathBuf {
        let file = match self {
            Scenario::S1 => "s1-filter-project.yaml",
            Scenario::S2 => "s2-dedup.yaml",
            Scenario::S3 => "s3-reorder.yaml",
            Scenario::S3b => "s3b-reorder-waiting.yaml",
            Scenario::S5 => "s5-kafka-dedup-project.yaml",
            Scenario::S6 => "s6-kafka-dedup-project.yaml",
            Scenario::S9 => "s9-kafka-search.yaml",
            Scenario::S10 => "s10-kafka-iceberg.yaml",
            Scenario::S12 => "s12-kafka-avro.yaml",
            Scenario::S13 => "s13-http-ingest.yaml",
            _ => "s4-join.yaml",
        };
        bench_dir.join("pipelines").join(file)
    }

    pub fn input(self, data: &Dataset) -> PathBuf {
        match self {
            Scenario::S3 | Scenario::S3b | Scenario::S9 => data.cdc.clone(),
            _ => data.events.clone(),
        }
    }

    pub fn needs_table(self) -> bool {
        self == Scenario::S4
    }

    pub fn digest_mode(self) -> Mode {
        match self {
            Scenario::S3 | Scenario::S3b => Mode::PerKey("order_id".into()),
            _ => Mode::Multiset,
        }
    }

    /// The reference digest of the expected output.
    pub fn reference(self, data: &Dataset) -> anyhow::Result<OutputDigest> {
        match self {
            Scenario::S1 => reference::s1(&data.events),
            Scenario::S2 => reference::s2(&data.events),
            // Nothing leaves before the end of input (the max delay is longer
            // than any run): every distinct sequence, ascending, as in S3.
            Scenario::S3 | Scenario::S3b => reference::s3(&data.cdc),
            Scenario::S4 => reference::s4(&data.events, &data.table),
            Scenario::S5 | Scenario::S6 | Scenario::S12 => reference::s5(&data.events),
            other => bail!("{} has no engine-only reference", other.id()),
        }
    }
}
