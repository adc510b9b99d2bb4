//! Going back (protocol §7.9–§7.10): a failed deploy rolled back to the exact previous
//! generations, recovery at start of a deploy a crash interrupted, and the operator's
//! `roost-agent rollback`.

use std::collections::BTreeSet;
use std::time::Duration;

use roost_common::nix::profiles;
use roost_common::wire::v1::{self, HealthResult, Manifest, ReportState, Timings};
use roost_common::{StorePath, Timestamp};

use super::error::{DeployFailure, RollbackError, RollbackFailed, Step};
use super::{Agent, Verdict, err};
use crate::activate::{self, Outcome};
use crate::fault;
use crate::state::{Pending, PendingProfile, Phase};

/// What a successful rollback has to say besides "rolled back" (`; note; note`, or nothing).
fn with_notes(notes: &[String]) -> String {
    if notes.is_empty() {
        String::new()
    } else {
        format!("; {}", notes.join("; "))
    }
}

impl Agent {
    /// A deploy that began switching failed: roll back each switched profile whose
    /// auto_rollback is on (deploy-rs decides per profile too), quarantine the version,
    /// record and report.
    pub(super) async fn fail_and_roll_back(
        &mut self,
        m: &Manifest,
        failure: DeployFailure,
        health: Vec<HealthResult>,
        timings: Timings,
    ) -> Verdict {
        let step = failure.step();
        let message = failure.to_string();
        tracing::error!(version = %m.version, phase = step.as_str(), "deploy failed: {message}");
        // deploy-rs rolls back a failed magic-rollback confirmation whatever autoRollback says:
        // the switch cut the node off, and staying there would leave it unreachable.
        let keep: BTreeSet<String> = if failure.is_magic_rollback() {
            BTreeSet::new()
        } else {
            m.profiles
                .iter()
                .filter(|p| !p.auto_rollback)
                .map(|p| p.name.to_string())
                .collect()
        };
        let switched: Vec<String> = self
            .state
            .pending
            .iter()
            .flat_map(|p| p.profiles.iter().filter(|pp| pp.switched))
            .map(|pp| pp.name.clone())
            .collect();
        let kept: Vec<&str> = switched
            .iter()
            .filter(|n| keep.contains(*n))
            .map(String::as_str)
            .collect();
        let (state, message) = if kept.len() < switched.len() || keep.is_empty() {
            match self.roll_back_pending(Some(m), &keep).await {
                Ok(notes) if kept.is_empty() => (
                    ReportState::RolledBack,
                    format!("{message}{}", with_notes(&notes)),
                ),
                Ok(notes) => (
                    ReportState::Failed,
                    format!(
                        "{message}{}; auto_rollback is off for {}: it stays on the new version",
                        with_notes(&notes),
                        kept.join(", ")
                    ),
                ),
                Err(e) => (
                    ReportState::Failed,
                    format!("{message}; the rollback failed too: {e}"),
                ),
            }
        } else {
            self.state.pending = None;
            (
                ReportState::Failed,
                format!("{message} (auto_rollback is off: the node stays on the new version)"),
            )
        };
        self.after_failure(m, state, &message).await;
        // Never retried automatically; a newer version clears it.
        self.state.quarantined.insert(m.version.0);
        self.finish(m.version, state, Some(err(step, message)), health, timings);
        self.set_phase(Phase::Idle);
        Verdict::NotConverged
    }

    /// Step 8: every switched profile back at its exact previous generation (by number),
    /// whose activation runs again. A profile that had no generation before this deploy
    /// loses its link and the generation this deploy made: it is back to not existing.
    /// Returns notes on what could not be re-activated.
    /// Profiles named in `keep` stay as they are.
    async fn roll_back_pending(
        &mut self,
        m: Option<&Manifest>,
        keep: &BTreeSet<String>,
    ) -> Result<Vec<String>, RollbackFailed> {
        fault::point("rollback");
        self.set_phase(Phase::RollingBack);
        let Some(pending) = self.state.pending.clone() else {
            return Ok(Vec::new());
        };
        let mut errors = Vec::new();
        let mut notes = Vec::new();
        for pp in pending
            .profiles
            .iter()
            .rev()
            .filter(|p| p.switched && !keep.contains(&p.name))
        {
            let spec = pp.previous_spec.clone().or_else(|| {
                m.or(self.state.desired.as_ref()).and_then(|m| {
                    m.profiles
                        .iter()
                        .find(|p| p.name.as_str() == pp.name)
                        .cloned()
                })
            });
            if let Some(s) = &spec {
                self.progress
                    .within(Duration::from_secs(s.activation_timeout_s + 30));
            }
            let switched_back = match pp.previous_generation {
                Some(g) => profiles::switch_to(&pp.profile_path, g)
                    .and_then(|()| delete_failed_generation(pp, g))
                    .map_err(|e| e.to_string()),
                None => remove_new_profile(pp).map_err(|e| e.to_string()),
            };
            if let Err(e) = switched_back {
                errors.push(format!(
                    "profile `{}` ({}): {e}",
                    pp.name,
                    pp.profile_path.display()
                ));
                continue;
            }
            let prev = pp
                .previous_path
                .as_deref()
                .and_then(|p| p.parse::<StorePath>().ok());
            match (spec, prev) {
                (Some(spec), Some(prev)) => {
                    let outcome =
                        activate::activate(&spec, &prev, &pp.profile_path, "rollback").await;
                    if outcome != Outcome::Ok {
                        errors.push(outcome.describe(&format!(
                            "re-activation of `{}` at generation {} ({prev})",
                            pp.name,
                            pp.previous_generation.unwrap_or(0)
                        )));
                    }
                }
                (_, None) => notes.push(format!(
                    "profile `{}` had no previous generation: its link was removed",
                    pp.name
                )),
                (None, Some(_)) => notes.push(format!(
                    "profile `{}` switched back without re-activation (its manifest is unknown)",
                    pp.name
                )),
            }
            tracing::info!(profile = %pp.name, generation = ?pp.previous_generation, "rolled back");
        }
        self.state.pending = None;
        if errors.is_empty() {
            Ok(notes)
        } else {
            Err(RollbackFailed(errors))
        }
    }

    /// An activation runs in a transient unit that outlives the agent (a restart, `kill -9`):
    /// waits for those of this boot that still run, or reads how they ended, as the previous
    /// run would have. A profile whose activation ended well is recorded as activated; the
    /// first failure is returned. A unit systemd does not know (another boot, or never
    /// started) changes nothing. Also looks for the unit of a profile that was switched but
    /// whose activation was not recorded (the agent died between starting and recording it).
    async fn await_outliving_activations(
        &mut self,
        pending: &Pending,
    ) -> Result<(), DeployFailure> {
        if !activate::systemd_is_pid1() {
            return Ok(());
        }
        let boot = roost_common::process::boot_id();
        for (i, pp) in pending.profiles.iter().enumerate() {
            if pp.activated || !pp.switched {
                continue;
            }
            let unit = match &pp.activation {
                Some(h) if h.boot_id == boot => h.unit.clone(),
                Some(_) => None,
                None => Some(activate::unit_name(&pp.name, &pending.version.to_string())),
            };
            let Some(unit) = unit else { continue };
            let now = Timestamp::from(self.clock.now());
            let left = Duration::from_secs(pending.deadline.unix().saturating_sub(now.unix()))
                .max(Duration::from_secs(10));
            self.progress.within(left);
            let outcome = activate::wait_unit(&unit, left).await;
            tracing::info!(profile = %pp.name, phase = "activate", unit, ?outcome, "an activation that outlived the previous run of the agent");
            // A nixos switch that exited 100 installed the system for the next boot (§7.16).
            let installed_for_boot = self
                .state
                .desired
                .as_ref()
                .filter(|m| m.version == pending.version)
                .and_then(|m| m.profiles.iter().find(|p| p.name.as_str() == pp.name))
                .is_some_and(|p| crate::reboot::installed_for_boot(&p.activation, &outcome));
            match outcome {
                Outcome::Interrupted => {}
                o if o == Outcome::Ok || installed_for_boot => {
                    let pp = self.pending_profile_mut(i);
                    pp.activated = true;
                    pp.activation = None;
                    self.save().map_err(|source| DeployFailure::Save {
                        what: "an activation that outlived the agent",
                        source,
                    })?;
                }
                o => {
                    let what = format!(
                        "activation of profile `{}` ({}), which outlived the agent",
                        pp.name, pp.new_path
                    );
                    return Err(DeployFailure::Activation(o.describe(&what)));
                }
            }
        }
        Ok(())
    }

    /// Step 9, at start: a pending record means the agent died mid-deploy. Leftover
    /// activations are stopped, then the deploy is confirmed if it got that far in time, or
    /// rolled back; either way it is reported. Also queues an outcome recorded but never
    /// reported.
    pub async fn recover(&mut self) -> Verdict {
        self.requeue_unreported();
        let Some(pending) = self.state.pending.clone() else {
            return Verdict::Converged;
        };
        tracing::warn!(version = %pending.version, "found an interrupted deploy; recovering");
        self.set_phase(Phase::Recovering);
        let outlived = self.await_outliving_activations(&pending).await;
        let pending = self.state.pending.clone().unwrap_or(pending);
        if let Err(failure) = outlived {
            if let Some(m) = self
                .state
                .desired
                .clone()
                .filter(|m| m.version == pending.version)
            {
                return self
                    .fail_and_roll_back(&m, failure, vec![], Timings::default())
                    .await;
            }
        }
        for h in pending
            .profiles
            .iter()
            .filter_map(|p| p.activation.as_ref())
        {
            activate::stop_leftover(h).await;
        }
        self.reconcile_pending();
        let Some(pending) = self.state.pending.clone() else {
            return Verdict::NotConverged;
        };
        let m = self
            .state
            .desired
            .clone()
            .filter(|m| m.version == pending.version);
        let all_activated = pending.profiles.iter().all(|p| p.activated);
        if pending.profiles.iter().all(|p| !p.switched) {
            // Nothing was touched: forget the record; the deploy is tried again as usual.
            self.state.pending = None;
            if let Err(e) = self.save() {
                tracing::error!("cannot save state: {e}");
            }
            return Verdict::NotConverged;
        }
        let timings = Timings::default();
        let now = Timestamp::from(self.clock.now());
        match m {
            Some(m) if all_activated && now < pending.deadline => {
                let (health, confirmed) =
                    self.confirm(&m, pending.coordinator_reachable_before).await;
                match confirmed {
                    Ok(()) => {
                        self.succeed(&m, health, timings).await;
                        Verdict::Converged
                    }
                    Err(f) => {
                        let f = DeployFailure::AfterRestart(Box::new(f));
                        self.fail_and_roll_back(&m, f, health, timings).await
                    }
                }
            }
            Some(m) => {
                let why = if all_activated {
                    "the confirmation deadline passed while the agent was down"
                } else {
                    "the agent stopped during the switch or activation"
                };
                self.fail_and_roll_back(&m, DeployFailure::Interrupted(why), vec![], timings)
                    .await
            }
            None => {
                let (st, msg) = match self.roll_back_pending(None, &BTreeSet::new()).await {
                    Ok(notes) => (
                        ReportState::RolledBack,
                        format!(
                            "interrupted deploy of an unknown manifest{}",
                            with_notes(&notes)
                        ),
                    ),
                    Err(e) => (
                        ReportState::Failed,
                        format!("interrupted deploy of an unknown manifest; rollback failed: {e}"),
                    ),
                };
                self.state.quarantined.insert(pending.version.0);
                self.finish(
                    pending.version,
                    st,
                    Some(err(Step::Recover, msg)),
                    vec![],
                    timings,
                );
                Verdict::NotConverged
            }
        }
    }

    /// Makes the pending record say what each profile really is, not only what was saved
    /// before the crash: a link that moved off its previous generation was switched (a
    /// crash inside `nix-env --set`, or after it and before its result was saved); one still
    /// at it whose activation never started was not (the generation `nix-env` may have made
    /// without moving the link is removed). What cannot be read is left as recorded.
    fn reconcile_pending(&mut self) {
        let Some(pending) = self.state.pending.as_mut() else {
            return;
        };
        let mut changed = false;
        for pp in &mut pending.profiles {
            let Ok(cur) = profiles::current(&pp.profile_path) else {
                continue;
            };
            let at = cur.as_ref().map(|g| g.number);
            if at != pp.previous_generation {
                if !pp.switched || pp.new_generation != at {
                    tracing::warn!(profile = %pp.name, generation = ?at,
                        "the profile moved during the interrupted deploy; it will be rolled back");
                    changed = true;
                }
                pp.switched = true;
                pp.new_generation = at;
            } else if pp.switched && !pp.activated && pp.activation.is_none() {
                remove_stray_generations(pp);
                pp.switched = false;
                pp.new_generation = None;
                changed = true;
            }
        }
        if changed {
            if let Err(e) = self.save() {
                tracing::error!("cannot save the reconciled pending record: {e}");
            }
        }
    }

    /// `roost-agent rollback [PROFILE]`: each named profile (all of the manifest's when none)
    /// back to the generation before its current one, re-activated; the version is
    /// quarantined, recorded and reported.
    pub async fn manual_rollback(
        &mut self,
        only: Option<&str>,
    ) -> Result<Vec<String>, RollbackError> {
        if let Some(p) = &self.state.pending {
            return Err(RollbackError::Pending(p.version));
        }
        let m = self
            .state
            .desired
            .clone()
            .ok_or(RollbackError::NothingApplied)?;
        let chosen: Vec<&v1::Profile> = m
            .profiles
            .iter()
            .filter(|p| only.is_none_or(|o| o == p.name.as_str()))
            .collect();
        if chosen.is_empty() {
            let names: Vec<&str> = m.profiles.iter().map(|p| p.name.as_str()).collect();
            return Err(RollbackError::UnknownProfile {
                wanted: only.unwrap_or("").to_owned(),
                has: names.join(", "),
            });
        }
        // Check every profile first, so a bad one leaves all of them untouched.
        let mut plan = Vec::new();
        for p in chosen {
            let link = activate::default_profile_path(p);
            let io = |source| RollbackError::Io {
                profile: p.name.to_string(),
                source,
            };
            let cur = profiles::current(&link).map_err(io)?.ok_or_else(|| {
                RollbackError::NoGeneration {
                    profile: p.name.to_string(),
                    link: link.clone(),
                }
            })?;
            let prev = profiles::generations(&link)
                .map_err(io)?
                .into_iter()
                .rfind(|g| g.number < cur.number)
                .ok_or_else(|| RollbackError::NoPrevious {
                    profile: p.name.to_string(),
                    link: link.clone(),
                    current: cur.number,
                })?;
            plan.push((p, link, cur, prev));
        }
        let mut done = Vec::new();
        let mut failures = Vec::new();
        for (p, link, cur, prev) in plan {
            profiles::switch_to(&link, prev.number).map_err(|source| RollbackError::Io {
                profile: p.name.to_string(),
                source,
            })?;
            if let Ok(path) = prev.target.display().to_string().parse::<StorePath>() {
                let out = activate::activate(p, &path, &link, "manual-rollback").await;
                if out != Outcome::Ok {
                    failures.push(out.describe(&format!("activation of `{}` ({path})", p.name)));
                }
            }
            done.push(format!(
                "{}: generation {} → {} ({})",
                p.name,
                cur.number,
                prev.number,
                prev.target.display()
            ));
        }
        self.state.quarantined.insert(m.version.0);
        self.state.current_version = None;
        self.state.applied = None;
        let (st, msg) = if failures.is_empty() {
            (
                ReportState::RolledBack,
                format!("rolled back by the operator: {}", done.join("; ")),
            )
        } else {
            (
                ReportState::Failed,
                format!(
                    "rolled back by the operator ({}), but {}",
                    done.join("; "),
                    failures.join("; ")
                ),
            )
        };
        self.finish(
            m.version,
            st,
            Some(err(Step::ManualRollback, msg)),
            vec![],
            Timings::default(),
        );
        if failures.is_empty() {
            Ok(done)
        } else {
            Err(RollbackError::Activation(failures))
        }
    }
}

/// After switching back to `previous`, deletes the generation the failed deploy made, as
/// deploy-rs does, before the previous one is re-activated: a NixOS system's boot menu is
/// rebuilt then, without the failed generation that could otherwise be booted by mistake.
fn delete_failed_generation(pp: &PendingProfile, previous: u64) -> std::io::Result<()> {
    match pp.new_generation {
        Some(g) if g != previous => profiles::delete_generation(&pp.profile_path, g),
        _ => Ok(()),
    }
}

/// Generations after the previous one that point at this deploy's path while the link
/// never moved to them: `nix-env` made them and was cut off before it switched.
fn remove_stray_generations(pp: &PendingProfile) {
    let after = pp.previous_generation.unwrap_or(0);
    for g in profiles::generations(&pp.profile_path).unwrap_or_default() {
        if g.number > after && g.target.as_os_str() == pp.new_path.as_str() {
            if let Err(e) = std::fs::remove_file(&g.link) {
                tracing::warn!("cannot remove {}: {e}", g.link.display());
            }
        }
    }
}

/// Undoes a first deploy of a profile: the link goes back to what it was (usually nothing),
/// and the generation this deploy made goes too (it would otherwise keep the failed closure
/// alive as a garbage-collector root).
fn remove_new_profile(pp: &PendingProfile) -> std::io::Result<()> {
    let gone = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    };
    match &pp.previous_link {
        Some(target) => {
            let dir = pp
                .profile_path
                .parent()
                .unwrap_or(std::path::Path::new("."));
            let tmp = dir.join(".roost-restore.tmp");
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(target, &tmp)?;
            std::fs::rename(&tmp, &pp.profile_path)?;
        }
        None => gone(std::fs::remove_file(&pp.profile_path))?,
    }
    if let Some(g) = pp.new_generation {
        let name = pp
            .profile_path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if let Some(dir) = pp.profile_path.parent() {
            gone(std::fs::remove_file(dir.join(format!("{name}-{g}-link"))))?;
        }
    }
    Ok(())
}
