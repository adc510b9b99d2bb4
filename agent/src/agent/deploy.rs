//! A deploy, step by step (protocol §7.5–§7.8): fetch the closures, check them against the
//! manifest, record the pending deploy, switch and activate each profile, confirm. Each step
//! is one function; [`Agent::deploy`] runs them in order and turns a failure into a deferral,
//! a quarantine or a rollback.

use std::time::Duration;

use roost_common::nix::{RealiseOptions, profiles};
use roost_common::wire::v1::{self, HealthResult, Manifest, ReportState, Timings};
use roost_common::{StorePath, Timestamp};
use tokio::time::Instant;

use super::error::{ClosureError, DeployFailure, RealiseError, Step};
use super::{Agent, Verdict, err, ms};
use crate::activate::{self, Outcome};
use crate::config::BuildPolicy;
use crate::fault;
use crate::health;
use crate::reboot;
use crate::state::{Pending, PendingProfile, Phase};

/// The confirm timeout of a manifest: its profiles' longest (30 s when it has none).
fn confirm_seconds(m: &Manifest) -> u64 {
    m.profiles
        .iter()
        .map(|p| p.confirm_timeout_s)
        .max()
        .unwrap_or(30)
}

impl Agent {
    /// Steps 4–8 for manifest `m`.
    pub(super) async fn deploy(&mut self, m: &Manifest) -> Verdict {
        let m = &self.with_system_goal(m);
        if let Some(v) = self.wait_before_download(m).await {
            return v;
        }
        let version = m.version;
        let mut timings = Timings {
            fetch: self.fetch_ms.take(),
            ..Timings::default()
        };
        tracing::info!(%version, phase = "realise", "deploying");
        if let Err(e) = self.fetch_closures(m, &mut timings).await {
            self.defer(m, Step::Realise, &e, timings);
            return Verdict::NotConverged;
        }
        match self.verify_closure(m).await {
            Ok(()) => {}
            // Nix could not be asked: says nothing about the closure, so it is retried.
            Err(e @ (ClosureError::Nix(_) | ClosureError::Task(_))) => {
                self.defer(m, Step::VerifyClosure, &e, timings);
                return Verdict::NotConverged;
            }
            Err(e) => {
                self.quarantine_closure(m, e, timings);
                return Verdict::NotConverged;
            }
        }
        self.deferred = 0;
        if let Some(v) = self.wait_before_apply(m).await {
            return v;
        }
        // Nix writes what it substitutes without fsync (Nix 2.8 has no `fsync-store-paths`),
        // so after a power cut the new generation, or the old one a rollback goes back to,
        // could hold files that were never written (without this, the VM power-cut test saw
        // a rollback after a cut whose old generation's activation could not be started).
        // The closure is made durable before anything points at it.
        let _ = tokio::task::spawn_blocking(sync_store).await;
        let m = &self.with_inhibitors_checked(m);
        let reachable_before = self.poller.reachable(self.state.etag.as_deref()).await;
        if let Err(e) = self.record_pending(m, reachable_before) {
            self.finish(
                version,
                ReportState::Failed,
                Some(err(
                    Step::Record,
                    format!("cannot write the pending record, nothing was changed: {e}"),
                )),
                vec![],
                timings,
            );
            self.set_phase(Phase::Idle);
            return Verdict::NotConverged;
        }
        match self.switch_and_activate(m, &mut timings).await {
            Ok(()) => {}
            Err(DeployFailure::ActivationStopped(profile)) => {
                // The record stays for recovery: at the next boot when this is a shutdown
                // (whatever runs now is being stopped too), else at once.
                if activate::system_stopping().await {
                    tracing::warn!(%profile, phase = "activate", "the activation was stopped by a shutdown; recovery at the next start decides");
                    return Verdict::NotConverged;
                }
                return self.recover().await;
            }
            Err(f) => return self.fail_and_roll_back(m, f, vec![], timings).await,
        }
        self.set_phase(Phase::Confirming);
        fault::point("confirm");
        tracing::info!(phase = "confirm", "running health checks");
        let t = Instant::now();
        let (health, confirmed) = self.confirm(m, reachable_before).await;
        timings.confirm = ms(t);
        if let Err(f) = confirmed {
            return self.fail_and_roll_back(m, f, health, timings).await;
        }
        self.succeed(m, health, timings).await;
        self.set_phase(Phase::Idle);
        tracing::info!(%version, "deployed and confirmed");
        Verdict::Converged
    }

    /// Step 4: enough free space, then every profile's path realised.
    async fn fetch_closures(
        &mut self,
        m: &Manifest,
        timings: &mut Timings,
    ) -> Result<(), RealiseError> {
        self.set_phase(Phase::Downloading);
        self.progress.within(self.cfg.realise_timeout * 2);
        fault::point("realise");
        let t = Instant::now();
        let realised = match self.make_room(m).await {
            Ok(()) => self.realise(m).await,
            Err(e) => Err(e),
        };
        timings.realise = ms(t);
        realised
    }

    /// A deploy that could not fetch its closures, or not check them, is retried later; the
    /// same failure again is not reported again.
    fn defer(&mut self, m: &Manifest, step: Step, e: &dyn std::fmt::Display, timings: Timings) {
        let version = m.version;
        self.deferred += 1;
        tracing::warn!(%version, step = step.as_str(), "deploy deferred (retried later): {e}");
        let message = e.to_string();
        let same = self.state.last_deploy.as_ref().is_some_and(|d| {
            d.version == Some(version)
                && d.state == ReportState::Deferred
                && d.error.as_ref().is_some_and(|x| x.message == message)
        });
        if !same {
            self.finish(
                version,
                ReportState::Deferred,
                Some(err(step, message)),
                vec![],
                timings,
            );
        }
        self.set_phase(Phase::Idle);
    }

    /// A closure that is not what the publisher signed: the version is never tried again.
    fn quarantine_closure(&mut self, m: &Manifest, e: ClosureError, timings: Timings) {
        self.state.quarantined.insert(m.version.0);
        self.security_events.push(format!("nar_hash_mismatch: {e}"));
        self.finish(
            m.version,
            ReportState::Failed,
            Some(err(Step::VerifyClosure, e.to_string())),
            vec![],
            timings,
        );
        self.set_phase(Phase::Idle);
    }

    fn realise_options(&self, m: &Manifest) -> RealiseOptions {
        // Trust never widens beyond the signed manifest plus the agent's own config.
        let mut subs: Vec<String> = m.substituters.iter().map(|s| s.url.clone()).collect();
        subs.extend(self.cfg.extra_substituters.iter().cloned());
        let mut keys: Vec<String> = m
            .substituters
            .iter()
            .flat_map(|s| s.public_keys.iter().cloned())
            .collect();
        keys.extend(self.cfg.extra_trusted_public_keys.iter().cloned());
        let mut seen = std::collections::HashSet::new();
        subs.retain(|s| seen.insert(s.clone()));
        keys.sort();
        keys.dedup();
        RealiseOptions {
            substituters: subs,
            trusted_public_keys: keys,
            timeout: Some(self.cfg.realise_timeout),
            fallback: false,
        }
    }

    /// Realises every profile's path as the build policy allows.
    async fn realise(&self, m: &Manifest) -> Result<(), RealiseError> {
        let opts = self.realise_options(m);
        let outputs: Vec<StorePath> = m.profiles.iter().map(|p| p.path.clone()).collect();
        let drvs: Vec<StorePath> = m
            .profiles
            .iter()
            .filter_map(|p| p.drv_path.clone())
            .collect();
        let nix = self.nix.clone();
        let policy = self.cfg.build_policy;
        // Realising a drv_path is asking to build: a substitute that fails (a NAR the cache
        // lists but cannot serve) then falls back to building instead of ending it.
        let build_opts = RealiseOptions {
            fallback: true,
            ..opts.clone()
        };
        tokio::task::spawn_blocking(move || {
            let attempt = |paths: &[StorePath]| nix.realise(paths, &opts);
            let build = |drvs: &[StorePath]| nix.realise(drvs, &build_opts);
            match policy {
                BuildPolicy::SubstituteOnly => attempt(&outputs).map_err(RealiseError::Nix),
                BuildPolicy::Build => {
                    if drvs.len() < outputs.len() {
                        return Err(RealiseError::NoDrvPath);
                    }
                    build(&drvs).map_err(RealiseError::Nix)
                }
                BuildPolicy::Fallback => match attempt(&outputs) {
                    Ok(()) => Ok(()),
                    Err(e) if !drvs.is_empty() => {
                        tracing::warn!("substitution failed, building from drv_path: {e}");
                        build(&drvs).map_err(|b| RealiseError::BuildToo {
                            substitute: Box::new(e),
                            build: Box::new(b),
                        })
                    }
                    Err(e) => Err(RealiseError::Nix(e)),
                },
            }
        })
        .await
        .map_err(|e| RealiseError::Task(e.to_string()))?
    }

    /// After realisation: every path is valid and has the NAR hash the publisher signed.
    async fn verify_closure(&self, m: &Manifest) -> Result<(), ClosureError> {
        let want: Vec<(StorePath, String)> = m
            .profiles
            .iter()
            .filter_map(|p| Some((p.path.clone(), p.nar_hash.clone()?)))
            .collect();
        if want.is_empty() {
            return Ok(());
        }
        let nix = self.nix.clone();
        let paths: Vec<StorePath> = want.iter().map(|(p, _)| p.clone()).collect();
        let infos = tokio::task::spawn_blocking(move || nix.path_info(&paths))
            .await
            .map_err(|e| ClosureError::Task(e.to_string()))?
            .map_err(ClosureError::Nix)?;
        for (path, hash) in want {
            let want = roost_common::nix::parse::normalise_hash(&hash).unwrap_or(hash);
            match infos.iter().find(|i| i.path == path) {
                Some(i) if i.nar_hash == want => {}
                Some(i) => {
                    return Err(ClosureError::Mismatch {
                        path,
                        found: i.nar_hash.clone(),
                        want,
                    });
                }
                None => return Err(ClosureError::NotValid(path)),
            }
        }
        Ok(())
    }

    /// Step 5: the pending record, on disk before any profile changes. On failure nothing
    /// was changed and no record is kept.
    fn record_pending(&mut self, m: &Manifest, reachable_before: bool) -> std::io::Result<()> {
        let now = Timestamp::from(self.clock.now());
        let activation_s: u64 = m.profiles.iter().map(|p| p.activation_timeout_s).sum();
        let pending = Pending {
            version: m.version,
            started_at: now,
            deadline: now.plus(Duration::from_secs(activation_s + confirm_seconds(m) + 60)),
            coordinator_reachable_before: reachable_before,
            profiles: m.profiles.iter().map(|p| self.before(p)).collect(),
        };
        self.state.pending = Some(pending);
        let saved = self.save();
        if saved.is_err() {
            self.state.pending = None;
        }
        saved
    }

    /// Where profile `p` stands before the switch: what a rollback returns to.
    fn before(&self, p: &v1::Profile) -> PendingProfile {
        let link = activate::default_profile_path(p);
        let cur = profiles::current(&link).ok().flatten();
        let previous_spec = cur.as_ref().and_then(|g| {
            self.state
                .applied
                .as_ref()?
                .profiles
                .iter()
                .find(|q| q.name == p.name && g.target == q.path.as_path())
                .cloned()
        });
        PendingProfile {
            previous_spec,
            name: p.name.to_string(),
            previous_link: std::fs::read_link(&link).ok(),
            profile_path: link,
            previous_generation: cur.as_ref().map(|g| g.number),
            previous_path: cur.map(|g| g.target.display().to_string()),
            new_path: p.path.to_string(),
            new_generation: None,
            switched: false,
            activated: false,
            activation: None,
        }
    }

    /// Step 6: switch and activate, profile by profile, in order. A profile already at its
    /// path is neither switched nor activated again.
    async fn switch_and_activate(
        &mut self,
        m: &Manifest,
        timings: &mut Timings,
    ) -> Result<(), DeployFailure> {
        self.set_phase(Phase::Activating);
        let t = Instant::now();
        let mut done = Ok(());
        for (i, p) in m.profiles.iter().enumerate() {
            let already = self.pending_profile(i).previous_path.as_deref() == Some(p.path.as_str());
            if !already {
                done = self.switch_profile(i, p).await;
                if done.is_ok() {
                    done = self.activate_profile(i, p, m).await;
                }
                if done.is_err() {
                    break;
                }
            }
            fault::point("activated");
            self.pending_profile_mut(i).activated = true;
            if let Err(e) = self.save() {
                // Unrecorded, a crash would roll back an activation that succeeded: stop here
                // and roll back now, while the agent still knows what happened.
                done = Err(DeployFailure::Save {
                    what: "that a profile was activated",
                    source: e,
                });
                break;
            }
        }
        timings.activate = ms(t);
        done
    }

    /// `nix-env --set`: a new generation of profile `i` at `p.path`.
    ///
    /// The intent is saved first (`switched`: the link may move from now on), so a crash
    /// while nix-env runs, or after it and before its result is saved, is recovered from
    /// what the profile then is ([`Agent::reconcile_pending`]), never taken for a profile
    /// that was already there.
    async fn switch_profile(&mut self, i: usize, p: &v1::Profile) -> Result<(), DeployFailure> {
        fault::point("switch-intent");
        self.pending_profile_mut(i).switched = true;
        if let Err(e) = self.save() {
            self.pending_profile_mut(i).switched = false;
            return Err(DeployFailure::Save {
                what: "that a profile is about to be switched",
                source: e,
            });
        }
        fault::point("set-profile");
        tracing::info!(profile = %p.name, phase = "set-profile", path = %p.path, "switching");
        let link = self.pending_profile(i).profile_path.clone();
        if let Err(e) = activate::make_profile_dir(&link, &p.user) {
            tracing::warn!(profile = %p.name, "preparing the folder of {}: {e}", link.display());
        }
        let (nix, l, path) = (self.nix.clone(), link.clone(), p.path.clone());
        let set = tokio::task::spawn_blocking(move || nix.set_profile(&l, &path))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        fault::point("profile-set");
        // Even a failed set may have made a generation: roll back whatever happened.
        let now_at = profiles::current(&link).ok().flatten();
        if let Some(g) = &now_at {
            if let Err(e) = activate::give_profile_to_user(&link, &g.link, &p.user) {
                tracing::warn!(profile = %p.name, "giving {} to {}: {e}", link.display(), p.user);
            }
        }
        {
            let pp = self.pending_profile_mut(i);
            pp.new_generation = now_at
                .filter(|g| Some(g.number) != pp.previous_generation)
                .map(|g| g.number);
        }
        let saved = self.save();
        set.map_err(|message| DeployFailure::SetProfile {
            profile: p.name.to_string(),
            link,
            message,
        })?;
        saved.map_err(|source| DeployFailure::Save {
            what: "the new generation of a profile",
            source,
        })
    }

    /// Runs profile `i`'s activation under its hard timeout, recording its process group
    /// (or unit) so recovery can stop it if the agent dies meanwhile.
    async fn activate_profile(
        &mut self,
        i: usize,
        p: &v1::Profile,
        m: &Manifest,
    ) -> Result<(), DeployFailure> {
        fault::point("activate");
        tracing::info!(profile = %p.name, phase = "activate", "activating");
        self.progress
            .within(Duration::from_secs(p.activation_timeout_s + 10));
        let link = self.pending_profile(i).profile_path.clone();
        let outcome = match activate::start_activation(p, &p.path, &link, &m.version.to_string()) {
            Ok(Some(running)) => {
                // The activation is held at its start gate until its process group is on
                // disk: a crash in between leaves nothing running that recovery misses.
                self.pending_profile_mut(i).activation = Some(running.handle().clone());
                fault::point("activation-spawned");
                if let Err(e) = self.save() {
                    drop(running); // never started: the gate closes and the group is killed
                    Outcome::SpawnFailed(format!(
                        "cannot record the activation before starting it: {e}"
                    ))
                } else {
                    running.wait().await
                }
            }
            Ok(None) => Outcome::Ok,
            Err(o) => o,
        };
        if outcome == Outcome::Interrupted {
            // Its unit and handle stay in the record: recovery reads what became of it.
            return Err(DeployFailure::ActivationStopped(p.name.to_string()));
        }
        self.pending_profile_mut(i).activation = None;
        if outcome == Outcome::Ok {
            Ok(())
        } else if reboot::installed_for_boot(&p.activation, &outcome) {
            tracing::warn!(profile = %p.name, phase = "activate", "switch-to-configuration: the new init cannot be switched to live (exit 100); installed for the next boot");
            Ok(())
        } else {
            let what = format!("activation of profile `{}` ({})", p.name, p.path);
            Err(DeployFailure::Activation(outcome.describe(&what)))
        }
    }

    /// Step 8's success: the deploy is the node's current version.
    pub(super) async fn succeed(
        &mut self,
        m: &Manifest,
        health: Vec<HealthResult>,
        timings: Timings,
    ) {
        self.state.pending = None;
        self.state.current_version = Some(m.version);
        self.state.applied = Some(m.clone());
        self.after_success(m).await;
        self.finish(m.version, ReportState::Success, None, health, timings);
    }

    fn pending_profile(&self, i: usize) -> &PendingProfile {
        &self
            .state
            .pending
            .as_ref()
            .expect("a deploy is pending")
            .profiles[i]
    }

    pub(super) fn pending_profile_mut(&mut self, i: usize) -> &mut PendingProfile {
        &mut self
            .state
            .pending
            .as_mut()
            .expect("a deploy is pending")
            .profiles[i]
    }

    /// Step 7: every health check passes within `confirm_timeout_s`, and with magic rollback
    /// a coordinator that answered before the switch answers again.
    pub(super) async fn confirm(
        &mut self,
        m: &Manifest,
        reachable_before: bool,
    ) -> (Vec<HealthResult>, Result<(), DeployFailure>) {
        let confirm_s = confirm_seconds(m).max(1);
        self.progress.within(Duration::from_secs(confirm_s + 30));
        let deadline = Instant::now() + Duration::from_secs(confirm_s);
        let checks: Vec<_> = m
            .profiles
            .iter()
            .flat_map(|p| p.health_checks.iter().cloned())
            .collect();
        let (ok, results) = health::confirm(&self.http, &checks, deadline).await;
        if !ok {
            let failing: Vec<String> = results
                .iter()
                .filter(|r| !r.ok)
                .map(|r| format!("{}: {}", r.name, r.detail))
                .collect();
            let failing = failing.join("; ");
            return (results, Err(DeployFailure::Health { confirm_s, failing }));
        }
        let magic = m.profiles.iter().any(|p| p.magic_rollback);
        if magic && reachable_before && !self.cfg.coordinators.is_empty() {
            loop {
                if self.poller.reachable(self.state.etag.as_deref()).await {
                    break;
                }
                if Instant::now() + Duration::from_secs(1) >= deadline {
                    return (results, Err(DeployFailure::Unreachable { confirm_s }));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        (results, Ok(()))
    }
}

/// Writes the store's file system out (`syncfs`), or every file system when the store cannot
/// be opened.
fn sync_store() {
    use std::os::fd::AsRawFd;
    match std::fs::File::open(roost_common::names::STORE_DIR) {
        Ok(store) => {
            if let Err(e) = ::nix::unistd::syncfs(store.as_raw_fd()) {
                tracing::warn!("syncfs of {}: {e}", roost_common::names::STORE_DIR);
            }
        }
        Err(_) => ::nix::unistd::sync(),
    }
}
