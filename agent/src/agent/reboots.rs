//! The agent's reboot-aware steps (docs/protocol.md §7.16): a `nixos` switch NixOS would
//! refuse is installed for the next boot instead. What is decided lives in
//! [`crate::reboot`]; this is where the deploy calls it.

use roost_common::wire::v1::{Activation, Goal, Manifest};

use super::Agent;
use crate::reboot::{self, Running};

impl Agent {
    /// The manifest as this node activates it: every `nixos` profile with goal `switch`
    /// whose switch-inhibitors differ from the running system's becomes a `boot` (NixOS
    /// would refuse the live switch; installed for the next boot it is no failure). Skipped
    /// when `NIXOS_NO_CHECK=1` is in the agent's environment, and on a machine without
    /// `/run/current-system`. Needs the new system in the store (after realisation).
    pub(super) fn with_inhibitors_checked(&self, m: &Manifest) -> Manifest {
        let mut m = m.clone();
        let no_check = std::env::var(reboot::NO_CHECK_ENV).ok();
        let Ok(current) = std::fs::canonicalize(Running::default().current) else {
            return m;
        };
        for p in &mut m.profiles {
            let Activation::Nixos { goal } = &mut p.activation else {
                continue;
            };
            if *goal != Goal::Switch || !reboot::checked(*goal, no_check.as_deref()) {
                continue;
            }
            match reboot::inhibitors(&current, p.path.as_path()) {
                Ok(found) if found.is_empty() => {}
                Ok(found) => {
                    let list: Vec<String> = found.iter().map(ToString::to_string).collect();
                    tracing::warn!(
                        profile = %p.name,
                        phase = "activate",
                        inhibitors = %list.join("; "),
                        "NixOS would refuse a live switch: installing for the next boot instead (goal boot)"
                    );
                    *goal = Goal::Boot;
                }
                Err(e) => tracing::warn!(
                    profile = %p.name,
                    "{e}: switch-to-configuration decides by itself"
                ),
            }
        }
        m
    }
}
