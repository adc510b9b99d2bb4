//! The agent's reboot-aware steps (docs/protocol.md §7.16): a `nixos` switch NixOS would
//! refuse is installed for the next boot instead; a confirmed system that needs a reboot is
//! rebooted into as its policy says, under a coordinator's lease, and checked afterwards. What is decided lives in
//! [`crate::reboot`]; this is where the deploy calls it.

use std::time::Duration;

use roost_common::nix::profiles;
use roost_common::schedule::{local_zone, zoned};
use roost_common::wire::v1::lease::LeaseAction;
use roost_common::wire::v1::{Activation, Goal, HealthResult, Manifest, ReportState, Timings};
use roost_common::{StorePath, Timestamp};

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
        self.reboot_wake = None;
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
                self.reboot_wake = Some(t);
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
            rolling_back: None,
        });
        if let Err(e) = self.save() {
            tracing::error!("cannot save the reboot record, not rebooting: {e}");
            self.state.reboot = None;
            self.give_back(lease.as_deref()).await;
            return;
        }
        tracing::warn!(version = %m.version, reasons = %reasons.join("; "), "rebooting");
        if let Err(e) = self.run_reboot_command().await {
            tracing::error!("{e}");
            self.state.reboot = None;
            if let Err(e) = self.save() {
                tracing::error!("cannot save state: {e}");
            }
            self.give_back(lease.as_deref()).await;
        }
    }

    /// Runs the configured reboot command (it returns once the shutdown is under way).
    async fn run_reboot_command(&self) -> Result<(), String> {
        let cmd = &self.cfg.laptop.reboot_command;
        match activate::run(cmd, &[], None, Duration::from_secs(60)).await {
            Outcome::Ok => Ok(()),
            out => Err(out.describe(&format!("the reboot command {cmd:?}"))),
        }
    }

    /// Makes the generation before the current one of `m`'s `nixos` profile its current
    /// one and the boot default again (its `switch-to-configuration boot`), and deletes the
    /// failed generation. Says what it did.
    async fn restore_previous_boot_default(&self, m: &Manifest) -> Result<String, String> {
        let p = m
            .profiles
            .iter()
            .find(|p| matches!(p.activation, Activation::Nixos { .. }))
            .ok_or("the manifest has no nixos profile")?;
        let link = default_profile_path(p);
        let shown = |e: std::io::Error| format!("{}: {e}", link.display());
        let cur = profiles::current(&link)
            .map_err(shown)?
            .ok_or_else(|| format!("{} has no current generation", link.display()))?;
        let prev = profiles::generations(&link)
            .map_err(shown)?
            .into_iter()
            .rfind(|g| g.number < cur.number)
            .ok_or_else(|| format!("{} has no generation before {}", link.display(), cur.number))?;
        let path: StorePath = prev
            .target
            .display()
            .to_string()
            .parse()
            .map_err(|e| format!("generation {}: {e}", prev.number))?;
        profiles::switch_to(&link, prev.number).map_err(shown)?;
        let mut boot = p.clone();
        boot.activation = Activation::Nixos { goal: Goal::Boot };
        let out = activate::activate(&boot, &path, &link, "reboot-rollback").await;
        if out != Outcome::Ok {
            return Err(out.describe(&format!("switch-to-configuration boot of {path}")));
        }
        if let Err(e) = profiles::delete_generation(&link, cur.number) {
            tracing::warn!("deleting the failed generation {}: {e}", cur.number);
        }
        Ok(format!(
            "{}: generation {} -> {} ({path}) is the boot default again",
            p.name, cur.number, prev.number
        ))
    }

    /// Reports how the reboot of record `r` ended (its error in phase `reboot`) and gives its
    /// lease back.
    async fn end_reboot(
        &mut self,
        r: &RebootRecord,
        state: ReportState,
        message: Option<String>,
        health: Vec<HealthResult>,
    ) {
        let error = message.map(|m| super::err(Step::Reboot, m));
        self.finish(r.version, state, error, health, Timings::default());
        self.give_back(r.lease.as_deref()).await;
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
    /// `needs_reboot`). Otherwise the version is quarantined, the previous generation is made
    /// the boot default again and, when the failed system is what runs, the machine reboots
    /// once more (keeping the lease); `rolled_back` is reported once it runs the previous one.
    async fn back_from_reboot(&mut self, r: RebootRecord) {
        let booted = std::fs::canonicalize(Running::default().booted)
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        self.state.reboot = None;
        if let Some(why) = r.rolling_back.clone() {
            let (st, msg) = if booted != r.system {
                (ReportState::RolledBack, why)
            } else {
                (
                    ReportState::Failed,
                    format!("{why}; but the machine booted {booted} again"),
                )
            };
            self.end_reboot(&r, st, Some(msg), vec![]).await;
            return;
        }
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
        let (health, why) = match outcome {
            Ok(health) => {
                tracing::info!(version = %r.version, "back from the reboot on the new system, healthy");
                self.end_reboot(&r, ReportState::Success, None, health)
                    .await;
                return;
            }
            Err(e) => e,
        };
        tracing::error!(version = %r.version, "{why}");
        self.state.quarantined.insert(r.version.0);
        let restored = match &m {
            Some(m) => self.restore_previous_boot_default(m).await,
            None => Err("nothing to restore".to_owned()),
        };
        let what = match restored {
            Ok(what) => what,
            Err(e) => {
                let msg = format!("{why}; the previous generation could not be restored: {e}");
                self.end_reboot(&r, ReportState::Failed, Some(msg), health)
                    .await;
                return;
            }
        };
        self.state.current_version = None;
        self.state.applied = None;
        let msg = format!("{why}; {what}");
        if booted != r.system {
            // Already on the previous system: nothing more to boot.
            self.end_reboot(&r, ReportState::RolledBack, Some(msg), health)
                .await;
            return;
        }
        self.state.reboot = Some(RebootRecord {
            boot_id: roost_common::process::boot_id(),
            at: Timestamp::from(self.clock.now()),
            rolling_back: Some(msg.clone()),
            ..r.clone()
        });
        if let Err(e) = self.save() {
            tracing::error!("cannot save the reboot record: {e}");
        }
        wall(&format!(
            "roost: rebooting now back into the previous system ({msg})"
        ))
        .await;
        if let Err(e) = self.run_reboot_command().await {
            self.state.reboot = None;
            let msg = format!("{msg}; but the reboot failed: {e}");
            self.end_reboot(&r, ReportState::Failed, Some(msg), health)
                .await;
        }
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
