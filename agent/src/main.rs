use std::process::ExitCode;

use clap::Parser;
use roost_agent::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    roost_common::logging::init("info");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(cli::FAILED);
        }
    };
    ExitCode::from(rt.block_on(cli::dispatch(cli.cmd)))
}
