//! `keystone-runtime`: parses the command line and hands over to the library.

use clap::Parser;
use keystone_runtime::cli::{Cli, execute};

fn main() {
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
