//! roost's shared core: validated names, Nix-format keys, signed envelopes, the v1 manifest
//! and report types, and the single function that decides whether a manifest is accepted.
//!
//! No tokio and no HTTP here. The `nix` feature adds the one door to the Nix commands and
//! the one process runner under it ([`process`]).

pub mod envelope;
pub mod fs;
pub mod keys;
pub mod names;
pub mod schedule;
pub mod size;
pub mod time;
pub mod verify;
pub mod wire;

#[cfg(feature = "logging")]
pub mod logging;
#[cfg(feature = "nix")]
pub mod nix;
#[cfg(feature = "nix")]
pub mod process;

pub use envelope::{Context, Envelope, EnvelopeError, MAX_ENVELOPE_BYTES};
pub use keys::{KeyError, PublicKey, SecretKey, TrustedKeys};
pub use names::{NameError, NodeName, ProfileName, ProfilePath, StorePath, Version};
pub use time::Timestamp;
pub use verify::{Accepted, Floor, Identity, Rejection, Verified, verify_manifest};
