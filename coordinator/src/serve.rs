//! placeholder: `serve` is being written.

use clap::Args;

/// Arguments of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {}

/// Runs `serve`.
pub async fn run(_args: ServeArgs) -> u8 {
    eprintln!("serve: not implemented yet");
    crate::exit::FAILED
}
