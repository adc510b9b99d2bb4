use std::process::ExitCode;

use clap::{Parser, Subcommand};
use roost_coordinator::{exit, keygen, node_key, publish, rollout, serve, status};

/// roost's coordinator: publish signed manifests from a flake, and serve them to the fleet.
///
/// A typical setup: CI runs `roost-coordinator publish . --key publisher.sec --to URL`
/// after every push; a small always-on host runs `roost-coordinator serve`; agents poll it.
#[derive(Debug, Parser)]
#[command(name = "roost-coordinator", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Make an ed25519 key pair in Nix's format (publisher or node key).
    Keygen(keygen::KeygenArgs),
    /// Evaluate, build, cache and sign one manifest per node of a flake's `deploy` output.
    Publish(publish::PublishArgs),
    /// Serve manifests, an embedded binary cache and the fleet's reports over HTTP.
    Serve(serve::ServeArgs),
    /// Show the fleet as a coordinator sees it: versions, states, health, last seen.
    Status(status::StatusArgs),
    /// Pin, replace or clear the key a coordinator checks a node's reports with.
    NodeKey(node_key::NodeKeyArgs),
    /// Show or steer the rollout of the last publish: waves, health, halts; pause, resume,
    /// abort, promote.
    Rollout(rollout::RolloutArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    roost_common::logging::init("info");
    let code = match cli.cmd {
        Cmd::Keygen(a) => match keygen::run(&a) {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("error: {e}");
                e.exit_code()
            }
        },
        Cmd::Publish(a) => block_on(publish::run(a)),
        Cmd::Serve(a) => block_on(serve::run(a)),
        Cmd::Status(a) => block_on(status::run(a)),
        Cmd::NodeKey(a) => block_on(node_key::run(a)),
        Cmd::Rollout(a) => block_on(rollout::run(a)),
    };
    ExitCode::from(code)
}

/// Runs a command's future; commands return their exit code and print their own errors.
fn block_on(fut: impl std::future::Future<Output = u8>) -> u8 {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            exit::FAILED
        }
    }
}
