//! `roost-coordinator keygen`: a key pair in Nix's binary-cache key format.

use std::path::PathBuf;

use clap::Args;
use roost_common::SecretKey;
use roost_common::keys::{KeyError, write_new};

use crate::exit;

/// Arguments of `keygen`.
#[derive(Debug, Args)]
#[command(after_help = "\
Exit status: 0 written, 1 a file could not be written (nothing is left behind), 2 bad usage: a \
name Nix cannot use, or a file that already exists.")]
pub struct KeygenArgs {
    /// The key's name, e.g. `acme-publisher-1` (what signatures and trust lists refer to):
    /// no whitespace, no `:`.
    pub name: String,
    /// Where to write the secret key (mode 0600). Must not exist.
    #[arg(long)]
    pub secret_file: PathBuf,
    /// Where to write the public key. Must not exist.
    #[arg(long)]
    pub public_file: PathBuf,
}

/// Why `keygen` wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    /// A bad name or an existing file: exit 2, nothing touched.
    #[error("{0}")]
    Usage(String),
    /// Making or writing the key failed: exit 1 (a secret written before the failure is
    /// removed).
    #[error("{0}")]
    Failed(String),
}

impl KeygenError {
    /// The exit code this error deserves.
    pub fn exit_code(&self) -> u8 {
        match self {
            KeygenError::Usage(_) => exit::USAGE,
            KeygenError::Failed(_) => exit::FAILED,
        }
    }
}

/// Writes a new key pair; refuses to overwrite either file and leaves nothing half-written.
pub fn run(args: &KeygenArgs) -> Result<(), KeygenError> {
    for f in [&args.secret_file, &args.public_file] {
        if f.exists() {
            return Err(KeygenError::Usage(format!(
                "{} already exists; refusing to overwrite a key (move it away first)",
                f.display()
            )));
        }
    }
    let key = SecretKey::generate(&args.name).map_err(|e| match e {
        KeyError::BadName(_) => {
            KeygenError::Usage(format!("{e}: choose a name like `acme-publisher-1`"))
        }
        e => KeygenError::Failed(e.to_string()),
    })?;
    key.write_new_file(&args.secret_file)
        .map_err(|e| KeygenError::Failed(e.to_string()))?;
    let public = format!("{}\n", key.public());
    if let Err(e) = write_new(&args.public_file, public.as_bytes(), 0o644) {
        let _ = std::fs::remove_file(&args.secret_file);
        return Err(KeygenError::Failed(e.to_string()));
    }
    println!("{}", key.public());
    Ok(())
}
