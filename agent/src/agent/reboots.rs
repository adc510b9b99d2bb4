//! The agent's reboot-aware steps (docs/protocol.md §7.16): a `nixos` switch NixOS would
//! refuse is installed for the next boot instead; a confirmed system that needs a reboot is
//! rebooted into as its policy says, under a coordinator's lease, and checked afterwards. What is decided lives in
//! [`crate::reboot`]; this is where the deploy calls it.

use std::time::Duration;

use roost_common::Timestamp;
use roost_common::schedule::{local_zone, zoned};
use roost_common::wire::v1::lease::LeaseAction;
use roost_common::wire::v1::{Activation, Goal, Manifest, ReportState, Timings};

use super::Agent;
use super::error::Step;
use crate::activate::{self, Outcome, default_profile_path};
use crate::reboot::{self, Decision, Running};
use crate::report::LeaseOutcome;
use crate::state::RebootRecord;

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

impl Agent {
    /// The reboot policy after a cycle (§7.16): a confirmed version whose system needs a
    /// reboot, with policy `window` or `auto`, takes a lease where there are leases, warns
    /// logged-in users (`wall`), saves the [`RebootRecord`] and runs the reboot command. Back
    /// from the reboot (another boot id), [`Agent::back_from_reboot`] checks the outcome.
    pub async fn reboot_if_due(&mut self) {
        let boot = roost_common::process::boot_id();
        if let Some(r) = self.state.reboot.clone() {
            if r.boot_id != boot {
                self.back_from_reboot(r).await;
            }
            return;
        }
        let Some(m) = self.state.applied.clone() else {
            return;
        };
        if self.state.pending.is_some() || self.state.current_version != Some(m.version) {
            return;
        }
        let run = Running::default();
        let Some((policy, windows)) = reboot::manifest_policy(&m, &run) else {
            return;
        };
        if policy.is_never() {
            return;
        }
        let now = zoned(self.clock.now(), &local_zone());
        let mut decision = reboot::decide(policy, &windows, &now, true);
        let mut lease = None;
        if decision == Decision::Now {
            match self.reporter.reboot_lease(LeaseAction::Acquire, None).await {
                LeaseOutcome::Answer(a) if a.granted => lease = a.lease.map(|l| l.id),
                LeaseOutcome::Answer(a) => {
                    tracing::info!(
                        holders = ?a.holders.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        max = a.max_concurrent,
                        "a reboot is due; waiting for a reboot lease"
                    );
                    return;
                }
                LeaseOutcome::NoLeases => decision = reboot::decide(policy, &windows, &now, false),
                LeaseOutcome::Unreachable => {
                    tracing::info!("a reboot is due; no coordinator answered the lease request");
                    return;
                }
            }
        }
        match decision {
            Decision::Stay => return,
            Decision::WaitUntil(t) => {
                tracing::info!(
                    policy = policy.as_str(),
                    "a reboot is due; waiting for the reboot window at {t}"
                );
                return;
            }
            Decision::Now => {}
        }
        let reasons = self.reboot_reasons(&m);
        let system = m
            .profiles
            .iter()
            .filter(|p| matches!(p.activation, Activation::Nixos { .. }))
            .find_map(|p| std::fs::canonicalize(default_profile_path(p)).ok())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        wall(&format!(
            "roost: rebooting now into version {} ({})",
            m.version,
            reasons.join("; ")
        ))
        .await;
        self.state.reboot = Some(RebootRecord {
            version: m.version,
            system,
            boot_id: boot,
            lease: lease.clone(),
            at: Timestamp::from(self.clock.now()),
        });
        if let Err(e) = self.save() {
            tracing::error!("cannot save the reboot record, not rebooting: {e}");
            self.state.reboot = None;
            self.give_back(lease.as_deref()).await;
            return;
        }
        let cmd = self.cfg.laptop.reboot_command.clone();
        tracing::warn!(version = %m.version, reasons = %reasons.join("; "), command = ?cmd, "rebooting");
        let out = activate::run(&cmd, &[], None, Duration::from_secs(60)).await;
        if out != Outcome::Ok {
            tracing::error!("{}", out.describe("the reboot command"));
            self.state.reboot = None;
            if let Err(e) = self.save() {
                tracing::error!("cannot save state: {e}");
            }
            self.give_back(lease.as_deref()).await;
        }
    }

    /// Gives a reboot lease back (logged when no coordinator takes it: it then expires).
    async fn give_back(&self, lease: Option<&str>) {
        let Some(id) = lease else { return };
        match self
            .reporter
            .reboot_lease(LeaseAction::Release, Some(id))
            .await
        {
            LeaseOutcome::Answer(a) if a.granted => {
                tracing::info!(lease = id, "reboot lease given back")
            }
            other => tracing::warn!(
                lease = id,
                ?other,
                "the reboot lease was not given back; it expires by itself"
            ),
        }
    }

    /// After the reboot `r` asked for: the machine must have booted `r.system` and pass the
    /// health checks; then the lease is given back and `success` reported (without
    /// `needs_reboot`). Otherwise the version is quarantined and reported `failed` (phase
    /// `reboot`); the previous generation is not made the boot default again (§11).
    async fn back_from_reboot(&mut self, r: RebootRecord) {
        let booted = std::fs::canonicalize(Running::default().booted)
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let m = self
            .state
            .applied
            .clone()
            .filter(|m| m.version == r.version);
        let outcome = match &m {
            _ if booted != r.system => Err((
                vec![],
                format!(
                    "the machine came back on {booted}, not on {} that it rebooted into",
                    r.system
                ),
            )),
            None => Err((
                vec![],
                "the rebooted version is no longer the applied one".into(),
            )),
            Some(m) => {
                let (health, ok) = self.confirm(m, false).await;
                match ok {
                    Ok(()) => Ok(health),
                    Err(f) => Err((health, format!("after the reboot: {f}"))),
                }
            }
        };
        self.state.reboot = None;
        match outcome {
            Ok(health) => {
                tracing::info!(version = %r.version, "back from the reboot on the new system, healthy");
                self.finish(
                    r.version,
                    ReportState::Success,
                    None,
                    health,
                    Timings::default(),
                );
            }
            Err((health, why)) => {
                tracing::error!(version = %r.version, "{why}");
                self.state.quarantined.insert(r.version.0);
                self.finish(
                    r.version,
                    ReportState::Failed,
                    Some(super::err(Step::Reboot, why)),
                    health,
                    Timings::default(),
                );
            }
        }
        self.give_back(r.lease.as_deref()).await;
    }
}

/// Tells logged-in users (`wall`); a machine without `wall` tells no one, and nothing fails.
async fn wall(message: &str) {
    let argv = vec!["wall".to_owned(), message.to_owned()];
    let out = activate::run(&argv, &[], None, Duration::from_secs(10)).await;
    if out != Outcome::Ok {
        tracing::warn!("{}", out.describe("wall"));
    }
}
