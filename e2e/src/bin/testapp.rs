//! `keystone-testapp`: the process kubelet's test workload (see
//! `keystone_e2e::testapp`). Binds `$POD_IP:$PORT`.

use std::net::{IpAddr, SocketAddr};

use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, env = "POD_IP", default_value = "127.0.0.1")]
    ip: IpAddr,
    #[arg(long, env = "PORT", default_value_t = 8080)]
    port: u16,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    keystone_e2e::testapp::serve(SocketAddr::new(args.ip, args.port)).await
}
