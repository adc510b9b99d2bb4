//! roost-agent: the daemon on every node. It polls a signed manifest, verifies it through
//! `roost_common`, realises the closures from a binary cache, switches and activates under a
//! hard timeout, confirms with health checks, rolls back to the exact previous generation on
//! failure, and reports — surviving crashes at any step.

pub mod activate;
pub mod agent;
pub mod config;
pub mod daemon;
pub mod health;
pub mod state;
pub mod status;

pub use agent::{Agent, Verdict};
pub use config::{BuildPolicy, Config, ConfigFile};
