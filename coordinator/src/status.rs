//! placeholder: `status` is being written.

use clap::Args;

/// Arguments of `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {}

/// Runs `status`.
pub async fn run(_args: StatusArgs) -> u8 {
    eprintln!("status: not implemented yet");
    crate::exit::FAILED
}
