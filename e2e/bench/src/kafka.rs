//! Kafka-mode harness parts (S5-S7): loading the generated events into a topic of
//! the testbed's Kafka, and the ceiling every Kafka-mode result is bounded by.
//! Built with `--features kafka` (rdkafka compiles librdkafka, which is slow).

use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Bootstrap servers (the testbed's: `eval "$(e2e/testbed env)"` sets KAFKA_BOOTSTRAP).
    #[arg(long, env = "KAFKA_BOOTSTRAP", default_value = "127.0.0.1:19092")]
    pub brokers: String,
    /// The topic to (re)create and fill.
    #[arg(long, default_value = "bench.events")]
    pub topic: String,
    #[arg(long, default_value_t = 2)]
    pub partitions: i32,
    /// The JSON-lines file; the generated events by default.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Field whose value is the record key.
    #[arg(long, default_value = "event_id")]
    pub key_field: String,
    #[command(flatten)]
    pub data: crate::GenArgs,
}

#[derive(Debug, Args)]
pub struct CeilingArgs {
    #[arg(long, env = "KAFKA_BOOTSTRAP", default_value = "127.0.0.1:19092")]
    pub brokers: String,
    #[arg(long, default_value = "bench.events")]
    pub from: String,
    #[arg(long, default_value = "bench.ceiling.out")]
    pub to: String,
    /// Records to drain (the loaded backlog).
    #[arg(long)]
    pub records: u64,
}

#[cfg(not(feature = "kafka"))]
pub fn load(_: &LoadArgs) -> anyhow::Result<()> {
    anyhow::bail!(
        "built without Kafka support: cargo run --release -p keystone-bench --features kafka -- load"
    )
}

#[cfg(not(feature = "kafka"))]
pub fn ceiling(_: &CeilingArgs) -> anyhow::Result<()> {
    anyhow::bail!(
        "built without Kafka support: cargo run --release -p keystone-bench --features kafka -- ceiling"
    )
}

#[cfg(feature = "kafka")]
pub use with_kafka::{ceiling, load};

#[cfg(feature = "kafka")]
mod with_kafka {
    use super::*;
    pub fn load(_: &LoadArgs) -> anyhow::Result<()> {
        anyhow::bail!("not written yet")
    }
    pub fn ceiling(_: &CeilingArgs) -> anyhow::Result<()> {
        anyhow::bail!("not written yet")
    }
}
