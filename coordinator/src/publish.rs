//! placeholder: `publish` is being written.

use clap::Args;

/// Arguments of `publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {}

/// Runs `publish`.
pub async fn run(_args: PublishArgs) -> u8 {
    eprintln!("publish: not implemented yet");
    crate::exit::FAILED
}
