//! `keystone-runtime`: parses the command line and hands over to the library.

use clap::Parser;
use keystone_runtime::cli::{Cli, execute};

// mimalloc: the runtime allocates small, short-lived buffers per event (documents,
// keys, CEL scopes); it is markedly faster at that than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // Before any client: two rustls providers are linked in (ring, and
    // aws-lc-rs through the Iceberg storage crates), and rustls picks none.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Before anything reads Avro (an Iceberg manifest included): the codec's
    // cap on what one declared length may allocate is set by its first use.
    keystone_avro::limit_allocations();
    let cli = Cli::parse();
    let code = match execute(cli) {
        Ok(code) => code,
        Err(error) => {
            let code = error.exit_code();
            eprintln!("error: {:#}", anyhow::Error::from(error));
            code
        }
    };
    std::process::exit(code);
}
