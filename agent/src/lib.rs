//! roost-agent: the daemon on every node. It polls a signed manifest, verifies it through
//! `roost_common`, realises the closures from a binary cache, switches and activates under a
//! hard timeout, confirms with health checks, rolls back to the exact previous generation on
//! failure, and reports — surviving a crash at any step.
//!
//! [`Agent`] is the state machine; [`daemon`] the loop around it; [`poll`] and [`report`]
//! its HTTP sides; [`nixops`] what it asks of Nix; [`activate`] and [`health`] what it runs.

pub mod activate;
pub mod agent;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod fault;
pub mod gate;
pub mod health;
pub mod laptop;
pub mod metered;
pub mod metrics;
pub mod nixops;
pub mod notifications;
pub mod notify;
pub mod poll;
pub mod power;
pub mod reboot;
pub mod report;
pub mod retention;
pub mod state;
pub mod status;

pub use roost_common::schedule;

pub use agent::{Agent, AgentError, Verdict};
pub use config::{BuildPolicy, Config, ConfigFile};
pub use nixops::{FakeNix, NixOps};
pub use poll::{ShiftedClock, SystemClock, WallClock};
