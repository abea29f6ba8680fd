//! `keystone-process-kubelet`: the testbed's node agent (see
//! `keystone_e2e::kubelet`). `e2e/testbed up` starts it.

use std::path::PathBuf;

use clap::Parser;
use keystone_e2e::kubelet::{self, ImageMap};

#[derive(Debug, Parser)]
#[command(about = "Runs Kubernetes pods as local processes (testbed only)")]
struct Args {
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    #[arg(long, default_value = "keystone-testbed")]
    node_name: String,
    /// Pod logs, volumes and pid files go here.
    #[arg(long)]
    state_dir: PathBuf,
    /// Image prefix to local binary, PREFIX=/path/to/binary; repeatable.
    #[arg(long = "image", value_name = "PREFIX=PATH")]
    images: Vec<String>,
    /// API server address given to pods (KUBERNETES_SERVICE_HOST/PORT).
    #[arg(long, default_value = "127.0.0.1")]
    api_server_host: String,
    #[arg(long, default_value_t = 6443)]
    api_server_port: u16,
    /// Cluster CA, mounted as ca.crt with service-account tokens.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Pod IPs are 127.N.x.y; give testbeds on one machine different N.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=254))]
    pod_net: u8,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let args = Args::parse();
    let mut config = kubelet::Config::new(
        args.kubeconfig,
        args.node_name,
        args.state_dir,
        ImageMap::parse(&args.images)?,
    );
    config.api_server_host = args.api_server_host;
    config.api_server_port = args.api_server_port;
    config.ca_file = args.ca_file;
    config.pod_net = args.pod_net;
    for (prefix, binary) in config.images.entries() {
        tracing::info!(%prefix, binary = %binary.display(), "image mapping");
    }
    kubelet::run(config).await
}
