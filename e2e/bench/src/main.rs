//! `keystone-bench`: Keystone side by side with Flink and Kafka Streams on the same
//! machine, the same cores, the same memory limit and the same generated input
//! (see e2e/bench/README.md and shared/BENCHMARKS.md).

#[cfg(feature = "kafka")]
mod avro;
mod ceiling;
mod digest;
mod generate;
mod kafka;
mod measure;
mod reference;
mod report;
mod rng;
mod runner;
mod s8;
mod scenario;
mod search;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "keystone-bench",
    about = "Keystone benchmarks against Flink and Kafka Streams"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate the input once into the cache folder and print where it is.
    Gen(GenArgs),
    /// Build the peer programs (Maven) into the cache folder.
    Peers {
        /// Rebuild even when the class path exists.
        #[arg(long)]
        rebuild: bool,
    },
    /// Digest a JSON-lines output the way the runner does (for a scenario's key order).
    Digest {
        /// S1..S4
        #[arg(long)]
        scenario: String,
        files: Vec<PathBuf>,
    },
    /// Run scenarios for Keystone and the peers and write RESULTS.md / RESULTS.json.
    Run(Box<runner::RunArgs>),
    /// Load the generated events into a Kafka topic (S5-S7 input) and time it.
    Load(kafka::LoadArgs),
    /// The ceiling for Kafka-mode scenarios: a plain consume-produce loop.
    Ceiling(kafka::CeilingArgs),
    /// Record S8 in the results: the runtime's RSS from S5's runs and the operator's
    /// RSS and reconcile latency measured by e2e/bench/s8-operator.sh.
    S8(s8::S8Args),
    /// S9's ceiling: a plain bulk loader of the final documents into an index.
    SearchCeiling(search::CeilingArgs),
    /// Write RESULTS.md again from RESULTS.json (after a change to the report code).
    Report {
        /// The folder of RESULTS.json; e2e/bench by default.
        #[arg(long)]
        results_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Args, Clone)]
pub struct GenArgs {
    /// Seed of the generator; fixed so that every run reads the same bytes.
    #[arg(long, default_value_t = 20261126)]
    pub seed: u64,
    /// Events for S1, S2 and S4 (about 300 bytes each).
    #[arg(long, default_value_t = 500_000)]
    pub events: u64,
    /// CDC events for S3.
    #[arg(long, default_value_t = 500_000)]
    pub cdc: u64,
    /// Rows of the join table.
    #[arg(long, default_value_t = 100_000)]
    pub table_rows: u64,
    /// Share of duplicate events, per mille.
    #[arg(long, default_value_t = 200)]
    pub dup_per_mille: u64,
}

impl GenArgs {
    pub fn config(&self) -> generate::GenConfig {
        generate::GenConfig {
            seed: self.seed,
            events: self.events,
            cdc: self.cdc,
            table_rows: self.table_rows,
            dup_per_mille: self.dup_per_mille,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Gen(args) => {
            let data = generate::ensure(&args.config())?;
            println!("{}", serde_json::to_string_pretty(&data)?);
        }
        Command::Peers { rebuild } => {
            for peer in runner::PEERS {
                let cp = runner::build_peer(peer, rebuild)?;
                println!("{peer}: {cp}");
            }
        }
        Command::Digest { scenario, files } => {
            let s = scenario::Scenario::parse(&scenario)?;
            let d = digest::digest_files(&files, s.digest_mode())?;
            println!("{} lines, sha256 {}", d.lines, d.sha256);
        }
        Command::Run(args) => runner::run(&args)?,
        Command::Load(args) => kafka::load(&args)?,
        Command::Ceiling(args) => kafka::ceiling(&args)?,
        Command::S8(args) => s8::record(&args)?,
        Command::SearchCeiling(args) => search::ceiling(&args)?,
        Command::Report { results_dir } => {
            let dir = results_dir.unwrap_or_else(runner::bench_dir);
            report::Results::load_or_new(&dir.join("RESULTS.json"))?.write(&dir)?;
        }
    }
    Ok(())
}
