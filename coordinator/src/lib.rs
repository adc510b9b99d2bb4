//! roost-coordinator: `publish` turns a flake into signed per-node manifests; `serve` stores
//! and serves them with an embedded binary cache and the fleet's reports; `status` shows the
//! fleet; `keygen` makes keys; `node-key` pins the key a node's reports are checked with;
//! `rollout` shows and steers the release of a publish wave by wave.
//! The binary only parses arguments and calls in here.

pub mod flags;
pub mod keygen;
pub mod node_key;
pub mod publish;
pub mod rollout;
pub mod serve;
pub mod status;

/// Exit codes shared by every command: 0 ok, 1 the operation failed, 2 bad usage or config.
pub mod exit {
    /// Everything worked.
    pub const OK: u8 = 0;
    /// The operation failed.
    pub const FAILED: u8 = 1;
    /// Bad usage or configuration.
    pub const USAGE: u8 = 2;
}
