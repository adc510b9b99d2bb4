//! roost-agent's integration tests, one binary: the state machine in process against a fake
//! store (`state_machine`), the command line (`cli`), and end-to-end runs of the real binary
//! against real Nix, each node with its own `/nix` in a private mount namespace (`e2e`).

mod coordinator;
mod fixtures;
mod support;

mod cli;
mod e2e;
mod state_machine;
