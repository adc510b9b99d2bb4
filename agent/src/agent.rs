//! The agent's state machine (DESIGN §7): poll → verify → realise → record pending → switch →
//! activate → confirm → (roll back) → report, and recovery of a deploy interrupted by a crash.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_common::envelope::{Context, Envelope};
use roost_common::nix::profiles;
use roost_common::nix::{Nix, RealiseOptions};
use roost_common::verify::{self, Accepted, Identity, Rejection};
use roost_common::wire::v1::{
    self, HealthResult, Manifest, ProfileStatus, Report, ReportError, ReportState, Timings,
};
use roost_common::{SecretKey, StorePath, Timestamp, Version};
use serde::Serialize;
use tokio::time::Instant;

use crate::activate::{self, Outcome};
use crate::config::{BuildPolicy, Config};
use crate::health;
use crate::state::{DeployRecord, Pending, PendingProfile, State, StateDir};

/// How a cycle ended, for `--once` and `apply` exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The desired version is active and confirmed (or nothing to do).
    Converged,
    /// Rejected, failed, rolled back, deferred, or unreachable.
    NotConverged,
}

/// What a poll brought.
#[derive(Debug)]
pub enum Poll {
    /// 304: nothing new.
    NotModified,
    /// A manifest envelope and its ETag.
    New(Vec<u8>, Option<String>),
    /// The coordinator has no manifest for this node.
    NoManifest,
    /// No coordinator could be reached.
    Unreachable(String),
}

/// The live daemon's view, served on `agent.sock` for `roost-agent status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Live {
    /// Daemon pid.
    pub pid: u32,
    /// What the agent is doing now.
    pub phase: String,
    /// Last poll time.
    pub last_poll_at: Option<Timestamp>,
    /// Last poll result.
    pub last_poll_result: Option<String>,
    /// Next poll time.
    pub next_poll_at: Option<Timestamp>,
    /// Consecutive poll failures.
    pub failures: u32,
    /// Whether the coordinator holds polls open.
    pub long_poll: bool,
}

/// The agent.
#[derive(Debug)]
pub struct Agent {
    cfg: Config,
    dir: StateDir,
    state: State,
    nix: Nix,
    http: reqwest::Client,
    key: SecretKey,
    etag: Option<String>,
    rejected: Option<[u8; 32]>,
    security_events: Vec<String>,
    reachable_before: bool,
    /// Shared with the status socket.
    pub live: Arc<Mutex<Live>>,
    /// Deferred deploy retries so far.
    pub deferred: u32,
    long_poll_offered: bool,
}

/// A fault-injection point for the crash tests (debug builds only): with
/// `ROOST_FAULT=<phase>` the agent SIGKILLs itself when it reaches that phase, with
/// `ROOST_FAULT=<phase>:pause` it stops there for an hour so a test can kill it.
/// Phases: fetch, realise, set-profile, activate, confirm, rollback, report.
pub fn fault(phase: &str) {
    #[cfg(debug_assertions)]
    if let Ok(f) = std::env::var("ROOST_FAULT") {
        let (p, how) = f.split_once(':').unwrap_or((f.as_str(), "kill"));
        if p == phase {
            tracing::warn!(phase, "ROOST_FAULT: injected fault");
            if how == "pause" {
                std::thread::sleep(Duration::from_secs(3600));
            }
            let _ = ::nix::sys::signal::kill(
                ::nix::unistd::getpid(),
                ::nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = phase;
}

fn now() -> Timestamp {
    Timestamp::now()
}

fn ms(since: Instant) -> Option<u64> {
    Some(since.elapsed().as_millis() as u64)
}

fn err(phase: &str, message: impl Into<String>) -> ReportError {
    ReportError {
        phase: phase.into(),
        message: message.into(),
    }
}

impl Agent {
    /// Opens the state folder (creating the node key on first start).
    pub fn new(cfg: Config, nix: Nix) -> anyhow::Result<Self> {
        let dir = StateDir::new(&cfg.state_dir);
        let state = dir.load()?;
        let key = dir.node_key(cfg.node.as_str())?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(600))
            .tcp_keepalive(Duration::from_secs(60))
            .user_agent(concat!("roost-agent/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let etag = state.etag.clone();
        Ok(Self {
            cfg,
            dir,
            state,
            nix,
            http,
            key,
            etag,
            rejected: None,
            security_events: Vec::new(),
            reachable_before: false,
            live: Arc::new(Mutex::new(Live {
                pid: std::process::id(),
                phase: "starting".into(),
                ..Live::default()
            })),
            deferred: 0,
            long_poll_offered: false,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The persisted state.
    pub fn state(&self) -> &State {
        &self.state
    }

    fn set_phase(&self, phase: &str) {
        if let Ok(mut l) = self.live.lock() {
            l.phase = phase.to_owned();
        }
    }

    fn save(&self) -> anyhow::Result<()> {
        self.dir.save(&self.state)?;
        Ok(())
    }

    fn trusted_now(&self) -> Timestamp {
        now().max(self.state.newest_issued_at.unwrap_or_default())
    }

    /// Whether a desired version is waiting to be deployed (not current, not quarantined).
    pub fn has_work(&self) -> bool {
        match &self.state.desired {
            Some(m) => {
                self.state.pending.is_none()
                    && self.state.current_version != Some(m.version)
                    && !self.state.quarantined.contains(&m.version.0)
            }
            None => false,
        }
    }

    /// Whether the last poll showed the coordinator holds polls open.
    pub fn long_poll_offered(&self) -> bool {
        self.long_poll_offered
    }

    /// One conditional GET against the coordinators, in order.
    pub async fn poll(&mut self, wait: Option<u64>) -> Poll {
        fault("fetch");
        if self.cfg.coordinators.is_empty() {
            return Poll::Unreachable("no coordinator configured".into());
        }
        let mut errors = Vec::new();
        for base in self.cfg.coordinators.clone() {
            let mut url = format!("{base}/v1/nodes/{}/manifest", self.cfg.node);
            let wait = wait.filter(|_| self.cfg.long_poll && self.etag.is_some());
            if let Some(w) = wait {
                url.push_str(&format!("?wait={w}"));
            }
            let mut req = self
                .http
                .get(&url)
                .timeout(Duration::from_secs(wait.unwrap_or(0) + 10));
            if let Some(e) = &self.etag {
                req = req.header("If-None-Match", e);
            }
            match req.send().await {
                Ok(r) => {
                    self.long_poll_offered = r.headers().contains_key("roost-long-poll");
                    match r.status().as_u16() {
                        304 => return Poll::NotModified,
                        404 => return Poll::NoManifest,
                        200 => {
                            let etag = r
                                .headers()
                                .get("etag")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned);
                            match r.bytes().await {
                                Ok(b) if b.len() <= roost_common::MAX_ENVELOPE_BYTES => {
                                    return Poll::New(b.to_vec(), etag);
                                }
                                Ok(b) => errors.push(format!(
                                    "{base}: manifest of {} bytes is over the limit",
                                    b.len()
                                )),
                                Err(e) => errors.push(format!("{base}: {e}")),
                            }
                        }
                        s => errors.push(format!("{base}: HTTP {s}")),
                    }
                }
                Err(e) => errors.push(format!("{base}: {e}")),
            }
        }
        Poll::Unreachable(errors.join("; "))
    }

    /// Records a poll's outcome for `status` (memory only: an idle poll writes nothing).
    pub fn note_poll(&self, result: &str, next: Option<Timestamp>, failures: u32) {
        if let Ok(mut l) = self.live.lock() {
            l.last_poll_at = Some(now());
            l.last_poll_result = Some(result.to_owned());
            l.next_poll_at = next;
            l.failures = failures;
            l.long_poll = self.long_poll_offered;
        }
    }

    /// Verifies a manifest and, when it is new, deploys it.
    pub async fn handle_manifest(&mut self, bytes: &[u8], etag: Option<String>) -> Verdict {
        let digest = verify::digest(bytes);
        let me = Identity {
            node: &self.cfg.node,
            system: &self.cfg.system,
        };
        match verify::verify_manifest(
            bytes,
            &self.cfg.trusted,
            self.state.floor.as_ref(),
            self.trusted_now(),
            me,
        ) {
            Ok(Accepted::Unchanged(_)) => {
                self.etag = etag;
                self.deploy_if_needed().await
            }
            Ok(Accepted::New(v)) => {
                tracing::info!(version = %v.manifest.version, signed_by = ?v.signed_by, "accepted a new manifest");
                self.state.floor = Some(v.floor());
                self.state.newest_issued_at = Some(
                    self.state
                        .newest_issued_at
                        .unwrap_or_default()
                        .max(v.manifest.issued_at),
                );
                self.state.desired = Some(v.manifest);
                self.state.etag = etag.clone();
                self.etag = etag;
                self.deferred = 0;
                if let Err(e) = self.save() {
                    tracing::error!("cannot record the accepted manifest: {e:#}");
                    return Verdict::NotConverged;
                }
                self.deploy_if_needed().await
            }
            Err(r) => {
                // The same refused bytes are reported once, not at every poll.
                if self.rejected != Some(digest) {
                    self.rejected = Some(digest);
                    self.reject(&r);
                    self.flush_reports().await;
                }
                Verdict::NotConverged
            }
        }
    }

    fn reject(&mut self, r: &Rejection) {
        tracing::warn!(code = r.code(), "manifest refused: {r}");
        if r.is_security_event() {
            self.security_events.push(format!("{}: {r}", r.code()));
        }
        let version = self.state.desired.as_ref().map(|m| m.version);
        // Nothing of the node's state changes: only a report is queued.
        self.queue_report(
            ReportState::Rejected,
            version,
            Some(err("verify", r.to_string())),
            vec![],
            Timings::default(),
        );
    }

    /// Deploys the desired manifest when there is work (`Converged` when there is none).
    pub async fn deploy_if_needed(&mut self) -> Verdict {
        if let Some(m) = &self.state.desired {
            if self.state.quarantined.contains(&m.version.0) {
                tracing::debug!(version = %m.version, "desired version is quarantined; waiting for a newer one");
                return Verdict::NotConverged;
            }
        }
        if !self.has_work() {
            return Verdict::Converged;
        }
        let m = self
            .state
            .desired
            .clone()
            .expect("has_work implies desired");
        self.deploy(&m).await
    }

    fn profile_path(p: &v1::Profile) -> PathBuf {
        activate::default_profile_path(p)
    }

    fn substituters(&self, m: &Manifest) -> RealiseOptions {
        let mut subs: Vec<String> = m.substituters.iter().map(|s| s.url.clone()).collect();
        subs.extend(self.cfg.extra_substituters.iter().cloned());
        let mut keys: Vec<String> = m
            .substituters
            .iter()
            .flat_map(|s| s.public_keys.iter().cloned())
            .collect();
        keys.extend(self.cfg.extra_trusted_public_keys.iter().cloned());
        subs.dedup();
        keys.sort();
        keys.dedup();
        RealiseOptions {
            substituters: subs,
            trusted_public_keys: keys,
            timeout: Some(Duration::from_secs(3600)),
        }
    }

    async fn realise(&self, m: &Manifest) -> Result<(), String> {
        let opts = self.substituters(m);
        let outputs: Vec<StorePath> = m.profiles.iter().map(|p| p.path.clone()).collect();
        let drvs: Vec<StorePath> = m
            .profiles
            .iter()
            .filter_map(|p| p.drv_path.clone())
            .collect();
        let nix = self.nix.clone();
        let policy = self.cfg.build_policy;
        tokio::task::spawn_blocking(move || {
            let attempt = |paths: &[StorePath]| {
                nix.realise(paths, &opts)
                    .map(drop)
                    .map_err(|e| e.to_string())
            };
            match policy {
                BuildPolicy::SubstituteOnly => attempt(&outputs),
                BuildPolicy::Build if drvs.len() == outputs.len() => attempt(&drvs),
                BuildPolicy::Build | BuildPolicy::Fallback => match attempt(&outputs) {
                    Ok(()) => Ok(()),
                    Err(e) if !drvs.is_empty() && policy == BuildPolicy::Fallback => {
                        tracing::warn!("substitution failed, building from drv_path: {e}");
                        attempt(&drvs)
                            .map_err(|b| format!("{e}\nbuilding instead also failed: {b}"))
                    }
                    Err(e) => Err(e),
                },
            }
        })
        .await
        .map_err(|e| e.to_string())?
    }

    async fn check_hashes(&self, m: &Manifest) -> Result<(), String> {
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
        let infos = tokio::task::spawn_blocking(move || nix.path_info(&paths, None, false))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        for (path, hash) in want {
            let want = roost_common::nix::parse::normalise_hash(&hash).unwrap_or(hash);
            match infos.iter().find(|i| i.path == path) {
                Some(i) if i.nar_hash == want => {}
                Some(i) => {
                    return Err(format!(
                        "{path}: NAR hash {} does not match the manifest's {want}",
                        i.nar_hash
                    ));
                }
                None => return Err(format!("{path} is not valid after realisation")),
            }
        }
        Ok(())
    }

    fn free_space_ok(&self, m: &Manifest) -> Result<(), String> {
        let need: u64 = m
            .profiles
            .iter()
            .filter(|p| !p.path.as_path().exists())
            .filter_map(|p| p.closure_size)
            .sum();
        if need == 0 {
            return Ok(());
        }
        let store = if Path::new("/nix/store").exists() {
            "/nix/store"
        } else {
            "/"
        };
        match ::nix::sys::statvfs::statvfs(store) {
            Ok(s) => {
                let free = s.blocks_available() * s.fragment_size();
                if free < need {
                    return Err(format!(
                        "{store} has {free} bytes free, the closure needs up to {need}; free space (nix-collect-garbage) and it will be retried"
                    ));
                }
                Ok(())
            }
            Err(_) => Ok(()),
        }
    }

    /// Steps 4–8 for manifest `m`.
    async fn deploy(&mut self, m: &Manifest) -> Verdict {
        let version = m.version;
        let mut timings = Timings::default();
        tracing::info!(%version, "deploying");
        self.set_phase("downloading");
        fault("realise");
        let t = Instant::now();
        let realised = match self.free_space_ok(m) {
            Ok(()) => self.realise(m).await,
            Err(e) => Err(e),
        };
        timings.realise = ms(t);
        if let Err(e) = realised {
            self.deferred += 1;
            tracing::warn!(%version, "realisation failed (will retry): {e}");
            self.finish(
                version,
                ReportState::Deferred,
                Some(err("realise", e)),
                vec![],
                timings,
            );
            self.set_phase("idle");
            return Verdict::NotConverged;
        }
        if let Err(e) = self.check_hashes(m).await {
            self.state.quarantined.insert(version.0);
            self.security_events.push(format!("nar_hash_mismatch: {e}"));
            self.finish(
                version,
                ReportState::Failed,
                Some(err("verify-closure", e)),
                vec![],
                timings,
            );
            return Verdict::NotConverged;
        }
        self.deferred = 0;

        // Step 5: the pending record, before any profile changes.
        let mut pending = Pending {
            version,
            started_at: now(),
            deadline: now().plus(Duration::from_secs(
                m.profiles
                    .iter()
                    .map(|p| p.activation_timeout_s)
                    .sum::<u64>()
                    + m.profiles
                        .iter()
                        .map(|p| p.confirm_timeout_s)
                        .max()
                        .unwrap_or(30)
                    + 60,
            )),
            profiles: Vec::new(),
        };
        for p in &m.profiles {
            let link = Self::profile_path(p);
            let cur = profiles::current(&link).ok().flatten();
            pending.profiles.push(PendingProfile {
                name: p.name.to_string(),
                profile_path: link,
                previous_generation: cur.as_ref().map(|g| g.number),
                previous_path: cur.map(|g| g.target.display().to_string()),
                new_path: p.path.to_string(),
                switched: false,
                activated: false,
            });
        }
        self.state.pending = Some(pending);
        self.reachable_before = self.coordinator_reachable().await;
        if let Err(e) = self.save() {
            self.state.pending = None;
            self.finish(
                version,
                ReportState::Failed,
                Some(err("record", e.to_string())),
                vec![],
                timings,
            );
            return Verdict::NotConverged;
        }

        // Step 6: switch and activate, profile by profile.
        self.set_phase("activating");
        let t = Instant::now();
        for (i, p) in m.profiles.iter().enumerate() {
            let link = self.state.pending.as_ref().expect("pending").profiles[i]
                .profile_path
                .clone();
            let already = self.state.pending.as_ref().expect("pending").profiles[i]
                .previous_path
                .as_deref()
                == Some(p.path.as_str());
            if !already {
                fault("set-profile");
                if let Some(parent) = link.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                let (nix, l, path) = (self.nix.clone(), link.clone(), p.path.clone());
                if let Err(e) = tokio::task::spawn_blocking(move || nix.set_profile(&l, &path))
                    .await
                    .expect("join")
                {
                    timings.activate = ms(t);
                    return self
                        .fail_and_roll_back(
                            m,
                            "set-profile",
                            format!("profile `{}`: {e}", p.name),
                            vec![],
                            timings,
                        )
                        .await;
                }
                self.state.pending.as_mut().expect("pending").profiles[i].switched = true;
                let _ = self.save();
            }
            fault("activate");
            if !already {
                let outcome = activate::activate(p, &p.path, &link, &version.to_string()).await;
                if outcome != Outcome::Ok {
                    timings.activate = ms(t);
                    let what = format!("activation of profile `{}` ({})", p.name, p.path);
                    return self
                        .fail_and_roll_back(m, "activate", outcome.describe(&what), vec![], timings)
                        .await;
                }
            }
            self.state.pending.as_mut().expect("pending").profiles[i].activated = true;
            let _ = self.save();
        }
        timings.activate = ms(t);

        // Step 7: confirm.
        self.set_phase("confirming");
        fault("confirm");
        let t = Instant::now();
        let (ok, health, why) = self.confirm(m).await;
        timings.confirm = ms(t);
        if !ok {
            return self
                .fail_and_roll_back(m, "confirm", why, health, timings)
                .await;
        }
        self.state.pending = None;
        self.state.current_version = Some(version);
        self.finish(version, ReportState::Success, None, health, timings);
        self.set_phase("idle");
        tracing::info!(%version, "deployed and confirmed");
        Verdict::Converged
    }

    async fn confirm(&self, m: &Manifest) -> (bool, Vec<HealthResult>, String) {
        let confirm_s = m
            .profiles
            .iter()
            .map(|p| p.confirm_timeout_s)
            .max()
            .unwrap_or(30);
        let deadline = Instant::now() + Duration::from_secs(confirm_s.max(1));
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
            return (
                false,
                results,
                format!(
                    "health check(s) failed within {confirm_s} s: {}",
                    failing.join("; ")
                ),
            );
        }
        let magic = m.profiles.iter().any(|p| p.magic_rollback);
        if magic && self.reachable_before && !self.coordinator_reachable().await {
            return (false, results, "the coordinator was reachable before the switch and is not after it (magic rollback)".into());
        }
        (true, results, String::new())
    }

    /// Whether any coordinator answers HTTP at all.
    async fn coordinator_reachable(&self) -> bool {
        for base in &self.cfg.coordinators {
            let url = format!("{base}/v1/nodes/{}/manifest", self.cfg.node);
            let mut req = self.http.get(&url).timeout(Duration::from_secs(10));
            if let Some(e) = &self.etag {
                req = req.header("If-None-Match", e);
            }
            if req.send().await.is_ok() {
                return true;
            }
        }
        false
    }

    async fn fail_and_roll_back(
        &mut self,
        m: &Manifest,
        phase: &str,
        message: String,
        health: Vec<HealthResult>,
        timings: Timings,
    ) -> Verdict {
        tracing::error!(version = %m.version, phase, "deploy failed: {message}");
        let auto = m.profiles.iter().all(|p| p.auto_rollback);
        let (state, message) = if auto {
            match self.roll_back_pending(Some(m)).await {
                Ok(()) => (ReportState::RolledBack, message),
                Err(e) => (
                    ReportState::Failed,
                    format!("{message}; rollback failed too: {e}"),
                ),
            }
        } else {
            self.state.pending = None;
            (
                ReportState::Failed,
                format!("{message} (auto_rollback is off: the node stays on the new version)"),
            )
        };
        self.state.quarantined.insert(m.version.0);
        self.finish(m.version, state, Some(err(phase, message)), health, timings);
        self.set_phase("idle");
        Verdict::NotConverged
    }

    /// Step 8: every switched profile back at its exact previous generation, re-activated.
    async fn roll_back_pending(&mut self, m: Option<&Manifest>) -> Result<(), String> {
        fault("rollback");
        self.set_phase("rolling back");
        let Some(pending) = self.state.pending.clone() else {
            return Ok(());
        };
        let mut errors = Vec::new();
        for pp in pending.profiles.iter().rev().filter(|p| p.switched) {
            let result = match pp.previous_generation {
                Some(g) => profiles::switch_to(&pp.profile_path, g).map_err(|e| e.to_string()),
                None => match std::fs::remove_file(&pp.profile_path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e.to_string()),
                },
            };
            if let Err(e) = result {
                errors.push(format!("profile `{}`: {e}", pp.name));
                continue;
            }
            let spec = m.or(self.state.desired.as_ref()).and_then(|m| {
                m.profiles
                    .iter()
                    .find(|p| p.name.as_str() == pp.name)
                    .cloned()
            });
            if let (Some(spec), Some(prev)) = (
                spec,
                pp.previous_path
                    .as_deref()
                    .and_then(|p| p.parse::<StorePath>().ok()),
            ) {
                let outcome = activate::activate(&spec, &prev, &pp.profile_path, "rollback").await;
                if outcome != Outcome::Ok {
                    errors.push(
                        outcome.describe(&format!("re-activation of `{}` ({prev})", pp.name)),
                    );
                }
            }
            tracing::info!(profile = %pp.name, generation = ?pp.previous_generation, "rolled back");
        }
        self.state.pending = None;
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Step 9: a pending record at start means a crash mid-deploy: confirm or roll back.
    pub async fn recover(&mut self) -> Verdict {
        self.requeue_unreported();
        let Some(pending) = self.state.pending.clone() else {
            return Verdict::Converged;
        };
        tracing::warn!(version = %pending.version, "found an interrupted deploy; recovering");
        let m = self
            .state
            .desired
            .clone()
            .filter(|m| m.version == pending.version);
        let all_activated = pending.profiles.iter().all(|p| p.activated);
        let nothing_switched = pending.profiles.iter().all(|p| !p.switched);
        if nothing_switched {
            // Nothing was touched: forget the record; the deploy is simply tried again.
            self.state.pending = None;
            let _ = self.save();
            return Verdict::NotConverged;
        }
        let timings = Timings::default();
        match m {
            Some(m) if all_activated && now() < pending.deadline => {
                let (ok, health, why) = self.confirm(&m).await;
                if ok {
                    self.state.pending = None;
                    self.state.current_version = Some(m.version);
                    self.finish(m.version, ReportState::Success, None, health, timings);
                    Verdict::Converged
                } else {
                    self.fail_and_roll_back(
                        &m,
                        "confirm",
                        format!("after a restart: {why}"),
                        health,
                        timings,
                    )
                    .await
                }
            }
            Some(m) => {
                let why = if all_activated {
                    "the confirmation deadline passed while the agent was down"
                } else {
                    "the agent stopped during activation"
                };
                self.fail_and_roll_back(&m, "recover", why.to_owned(), vec![], timings)
                    .await
            }
            None => {
                let _ = self.roll_back_pending(None).await;
                self.state.quarantined.insert(pending.version.0);
                self.finish(
                    pending.version,
                    ReportState::RolledBack,
                    Some(err("recover", "interrupted deploy of an unknown manifest")),
                    vec![],
                    timings,
                );
                Verdict::NotConverged
            }
        }
    }

    /// `roost-agent rollback [PROFILE]`: back to the generation before the current one.
    pub async fn manual_rollback(&mut self, only: Option<&str>) -> Result<Vec<String>, String> {
        let m = self
            .state
            .desired
            .clone()
            .ok_or("no manifest has been applied on this node; nothing to roll back")?;
        let mut done = Vec::new();
        for p in m
            .profiles
            .iter()
            .filter(|p| only.is_none_or(|o| o == p.name.as_str()))
        {
            let link = Self::profile_path(p);
            let cur = profiles::current(&link)
                .map_err(|e| e.to_string())?
                .ok_or(format!(
                    "profile `{}` has no generation at {}",
                    p.name,
                    link.display()
                ))?;
            let prev = profiles::generations(&link)
                .map_err(|e| e.to_string())?
                .into_iter()
                .rfind(|g| g.number < cur.number)
                .ok_or(format!(
                    "profile `{}` has no generation before {}",
                    p.name, cur.number
                ))?;
            profiles::switch_to(&link, prev.number).map_err(|e| e.to_string())?;
            if let Ok(path) = prev.target.display().to_string().parse::<StorePath>() {
                let out = activate::activate(p, &path, &link, "manual-rollback").await;
                if out != Outcome::Ok {
                    return Err(out.describe(&format!("activation of `{}` ({path})", p.name)));
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
        if done.is_empty() {
            return Err(format!(
                "no profile `{}` in the current manifest",
                only.unwrap_or("")
            ));
        }
        self.state.quarantined.insert(m.version.0);
        self.state.current_version = None;
        self.finish(
            m.version,
            ReportState::RolledBack,
            Some(err(
                "manual",
                format!("rolled back by the operator: {}", done.join("; ")),
            )),
            vec![],
            Timings::default(),
        );
        self.flush_reports().await;
        Ok(done)
    }

    /// Records a deploy outcome in state and queues its report.
    fn finish(
        &mut self,
        version: Version,
        st: ReportState,
        error: Option<ReportError>,
        health: Vec<HealthResult>,
        timings: Timings,
    ) {
        self.state.last_deploy = Some(DeployRecord {
            version: Some(version),
            state: st.as_str().into(),
            error: error.clone(),
            at: now(),
            report_seq: None,
        });
        if let Err(e) = self.save() {
            tracing::error!("cannot save state: {e:#}");
        }
        let seq = self.queue_report(st, Some(version), error, health, timings);
        if let (Some(seq), Some(d)) = (seq, self.state.last_deploy.as_mut()) {
            d.report_seq = Some(seq);
            let _ = self.save();
        }
    }

    /// After a crash between recording an outcome and queueing its report: queue it now.
    fn requeue_unreported(&mut self) {
        let Some(d) = self.state.last_deploy.clone() else {
            return;
        };
        if d.report_seq.is_some() {
            return;
        }
        let st = match d.state.as_str() {
            "success" => ReportState::Success,
            "rolled_back" => ReportState::RolledBack,
            "deferred" => ReportState::Deferred,
            "rejected" => ReportState::Rejected,
            _ => ReportState::Failed,
        };
        if let Some(seq) =
            self.queue_report(st, d.version, d.error.clone(), vec![], Timings::default())
        {
            if let Some(l) = self.state.last_deploy.as_mut() {
                l.report_seq = Some(seq);
            }
            let _ = self.save();
        }
    }

    /// Where each desired profile stands now.
    pub fn positions(&self) -> Vec<ProfileStatus> {
        let Some(m) = &self.state.desired else {
            return vec![];
        };
        m.profiles
            .iter()
            .map(|p| {
                let cur = profiles::current(&Self::profile_path(p)).ok().flatten();
                ProfileStatus {
                    name: p.name.clone(),
                    current: cur.as_ref().map(|g| g.target.display().to_string()),
                    generation: cur.map(|g| g.number),
                    desired: Some(p.path.to_string()),
                }
            })
            .collect()
    }

    fn queue_report(
        &mut self,
        st: ReportState,
        version: Option<Version>,
        error: Option<ReportError>,
        health: Vec<HealthResult>,
        timings: Timings,
    ) -> Option<u64> {
        let seq = self.dir.next_seq();
        let report = Report {
            format: v1::FORMAT,
            node: self.cfg.node.clone(),
            seq,
            sent_at: now(),
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            manifest_version: version,
            state: st,
            profiles: self.positions(),
            booted_system: std::fs::read_link("/run/booted-system")
                .ok()
                .map(|p| p.display().to_string()),
            error,
            health,
            timings_ms: timings,
            security_events: std::mem::take(&mut self.security_events),
            node_key: Some(self.key.public()),
        };
        let payload = serde_json::to_vec(&report).expect("report serialises");
        let env = Envelope::seal(Context::Report, &payload, &[&self.key]).to_bytes();
        match self.dir.queue_report(seq, &env) {
            Ok(()) => Some(seq),
            Err(e) => {
                tracing::error!("cannot queue report {seq}: {e}");
                None
            }
        }
    }

    /// Sends queued reports in order; stops at the first that cannot be delivered.
    pub async fn flush_reports(&mut self) -> usize {
        let queued = self.dir.queued_reports();
        if queued.is_empty() || self.cfg.coordinators.is_empty() {
            return queued.len();
        }
        fault("report");
        let mut left = queued.len();
        'reports: for (seq, path) in queued {
            let Ok(body) = std::fs::read(&path) else {
                continue;
            };
            for base in &self.cfg.coordinators {
                let url = format!("{base}/v1/nodes/{}/reports", self.cfg.node);
                match self
                    .http
                    .post(&url)
                    .header("Content-Type", "application/json")
                    .body(body.clone())
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() || r.status().as_u16() == 409 => {
                        if r.status().as_u16() == 409 {
                            tracing::debug!(seq, "report already received");
                        }
                        if let Err(e) = self.dir.report_delivered(seq, &path) {
                            tracing::error!("{e}");
                            break 'reports;
                        }
                        left -= 1;
                        continue 'reports;
                    }
                    Ok(r) => {
                        tracing::warn!(seq, status = %r.status(), "report not accepted by {base}")
                    }
                    Err(e) => tracing::debug!(seq, "cannot reach {base}: {e}"),
                }
            }
            break;
        }
        left
    }
}
