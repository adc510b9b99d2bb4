//! `roost-coordinator keygen`: a key pair in Nix's binary-cache key format.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use roost_common::SecretKey;
use roost_common::keys::write_new;

/// Arguments of `keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// The key's name, e.g. `acme-publisher-1` (what signatures and trust lists refer to).
    pub name: String,
    /// Where to write the secret key (mode 0600). Must not exist.
    #[arg(long)]
    pub secret_file: PathBuf,
    /// Where to write the public key. Must not exist.
    #[arg(long)]
    pub public_file: PathBuf,
}

/// Writes a new key pair; refuses to overwrite either file and leaves nothing half-written.
pub fn run(args: &KeygenArgs) -> anyhow::Result<()> {
    for f in [&args.secret_file, &args.public_file] {
        if f.exists() {
            bail!(
                "{} already exists; refusing to overwrite a key (move it away first)",
                f.display()
            );
        }
    }
    let key =
        SecretKey::generate(&args.name).with_context(|| format!("key name `{}`", args.name))?;
    key.write_new_file(&args.secret_file)?;
    let public = format!("{}\n", key.public());
    if let Err(e) = write_new(&args.public_file, public.as_bytes(), 0o644) {
        let _ = std::fs::remove_file(&args.secret_file);
        return Err(e.into());
    }
    println!("{}", key.public());
    Ok(())
}
