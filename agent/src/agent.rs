//! The agent's state machine (DESIGN §7 steps 2–9): verify → skip what is current or
//! quarantined → realise → record pending → switch → activate → confirm → roll back to the
//! exact previous generation → report; and recovery of a deploy a crash interrupted.
//!
//! The agent takes what it talks to as parameters ([`NixOps`], [`WallClock`]); the HTTP
//! side lives in [`Poller`] and [`Reporter`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_common::nix::{RealiseOptions, profiles};
use roost_common::verify::{self, Accepted, Identity, Rejection};
use roost_common::wire::v1::{
    self, HealthResult, Manifest, ProfileStatus, ReportError, ReportState, Timings,
};
use roost_common::{StorePath, Timestamp, Version};
use sd_notify::NotifyState;
use tokio::time::Instant;

use crate::activate::{self, Outcome};
use crate::config::{BuildPolicy, Config};
use crate::fault;
use crate::health;
use crate::nixops::NixOps;
use crate::notify::{Progress, notify};
use crate::poll::{Poll, Poller, WallClock};
use crate::report::{self, Reporter};
use crate::state::{DeployRecord, Pending, PendingProfile, Snapshot, State, StateDir};

mod laptop_hooks;

/// How an operation ended, for `--once` and `apply` exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The desired version is active and confirmed, or there is nothing to do.
    Converged,
    /// Rejected, failed, rolled back, deferred, quarantined, or the coordinator unreachable.
    NotConverged,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The state folder could not be read or written.
    #[error("state folder {dir}: {source}")]
    State {
        /// The folder.
        dir: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// Why an operator's rollback could not be done.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RollbackError(pub String);

/// The agent: the state folder in memory, and what it talks to.
#[derive(Debug)]
pub struct Agent {
    cfg: Config,
    dir: StateDir,
    state: State,
    nix: Arc<dyn NixOps>,
    clock: Arc<dyn WallClock>,
    http: reqwest::Client,
    poller: Poller,
    reporter: Reporter,
    /// Digest of the last refused envelope: the same bytes are reported once per run.
    rejected: Option<[u8; 32]>,
    security_events: Vec<String>,
    live: Arc<Mutex<Snapshot>>,
    /// What `status.json` holds, to write it only on change.
    written: Option<Snapshot>,
    progress: Progress,
    deferred: u32,
    fetch_ms: Option<u64>,
    /// ETag of the last manifest served, accepted or not (memory only): polls send it, so
    /// a refused manifest is not downloaded again and again.
    seen_etag: Option<String>,
    /// Whether the last poll brought bytes not seen before.
    fresh: bool,
    /// Windows, power, metered, retention, notifications, metrics.
    laptop: laptop_hooks::LaptopRuntime,
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
    /// Opens the state folder (making the node key on first start).
    pub fn new(
        cfg: Config,
        nix: Arc<dyn NixOps>,
        clock: Arc<dyn WallClock>,
    ) -> Result<Self, AgentError> {
        let dir = StateDir::new(&cfg.state_dir);
        let state_err = |source| AgentError::State {
            dir: cfg.state_dir.clone(),
            source,
        };
        let state = dir.load().map_err(state_err)?;
        let key = dir.node_key(cfg.node.as_str()).map_err(state_err)?;
        let mut http = reqwest::Client::builder();
        for ca in &cfg.ca_certs {
            http = http.add_root_certificate(ca.clone());
        }
        let http = http
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(600))
            .tcp_keepalive(Duration::from_secs(60))
            .user_agent(concat!("roost-agent/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let poller = Poller::new(
            http.clone(),
            cfg.coordinators.clone(),
            cfg.node.clone(),
            cfg.long_poll,
        );
        let reporter = Reporter::new(
            dir.clone(),
            key,
            cfg.node.clone(),
            http.clone(),
            cfg.coordinators.clone(),
        );
        let written = dir.load_snapshot();
        let live = Snapshot {
            pid: std::process::id(),
            phase: "idle".into(),
            // The first poll is due as soon as start-up reconciliation is done.
            next_poll_at: Some(Timestamp::from(clock.now())),
            polling_since: None,
            ..written.clone().unwrap_or_default()
        };
        Ok(Self {
            laptop: laptop_hooks::LaptopRuntime::new(cfg.laptop.notifications),
            cfg,
            dir,
            state,
            nix,
            clock,
            http,
            poller,
            reporter,
            rejected: None,
            security_events: Vec::new(),
            live: Arc::new(Mutex::new(live)),
            written,
            progress: Progress::default(),
            deferred: 0,
            fetch_ms: None,
            seen_etag: None,
            fresh: false,
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

    /// The live view the status socket serves.
    pub fn live(&self) -> Arc<Mutex<Snapshot>> {
        self.live.clone()
    }

    /// The watchdog's progress promise.
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    /// Deferred deploy attempts in a row (closure not in the cache yet, no space).
    pub fn deferred(&self) -> u32 {
        self.deferred
    }

    /// Whether the last poll showed the coordinator holds polls open.
    pub fn long_poll_offered(&self) -> bool {
        self.poller.long_poll_offered()
    }

    fn trusted_now(&self) -> Timestamp {
        Timestamp::from(self.clock.now()).max(self.state.newest_issued_at.unwrap_or_default())
    }

    fn save(&self) -> std::io::Result<()> {
        self.dir.save(&self.state)
    }

    fn update_live(&mut self, f: impl FnOnce(&mut Snapshot)) {
        let snap = match self.live.lock() {
            Ok(mut l) => {
                f(&mut l);
                l.clone()
            }
            Err(_) => return,
        };
        // status.json is rewritten only when what it says changes: not when times move, and
        // not when a successful poll follows another (an idle poll writes nothing).
        let key = |s: &Snapshot| {
            let failed = s
                .last_poll_result
                .clone()
                .filter(|r| r.starts_with("failed"));
            (
                s.phase.clone(),
                s.last_poll_result.is_some(),
                failed,
                s.long_poll,
            )
        };
        if self.written.as_ref().map(key) != Some(key(&snap)) {
            match self.dir.save_snapshot(&snap) {
                Ok(()) => self.written = Some(snap),
                Err(e) => tracing::warn!("cannot write status.json: {e}"),
            }
        }
    }

    fn set_phase(&mut self, phase: &str) {
        self.update_live(|l| l.phase = phase.to_owned());
        notify(&[NotifyState::Status(phase)]);
    }

    /// Records a poll's outcome for `status`.
    pub fn note_poll(&mut self, result: &str, next: Option<Timestamp>, failures: u32) {
        let now = Timestamp::from(self.clock.now());
        let long_poll = self.poller.long_poll_offered();
        self.update_live(|l| {
            l.last_poll_at = Some(now);
            l.last_poll_result = Some(result.to_owned());
            l.next_poll_at = next;
            l.failures = failures;
            l.long_poll = long_poll;
            l.polling_since = None;
        });
        self.note_poll_for_metrics(!result.starts_with("failed"));
    }

    /// Marks the agent idle (after start-up reconciliation).
    pub fn idle(&mut self) {
        self.set_phase("idle");
    }

    /// Whether the desired version still has to be deployed (not current, not quarantined,
    /// no deploy pending).
    pub fn has_work(&self) -> bool {
        self.state.desired.as_ref().is_some_and(|m| {
            self.state.pending.is_none()
                && self.state.current_version != Some(m.version)
                && !self.state.quarantined.contains(&m.version.0)
        })
    }

    /// Step 1: one conditional GET (a long-poll of `wait` seconds where offered).
    pub async fn poll(&mut self, wait: Option<u64>) -> Poll {
        fault::point("fetch");
        let t = Instant::now();
        let since = Timestamp::from(self.clock.now());
        self.update_live(|l| l.polling_since = Some(since));
        let etag = self.seen_etag.clone().or_else(|| self.state.etag.clone());
        let p = self.poller.poll(etag.as_deref(), wait).await;
        self.fresh = false;
        if let Poll::New(_, e) = &p {
            self.fetch_ms = ms(t);
            self.fresh = e.is_none() || *e != etag;
            self.seen_etag = e.clone();
        }
        p
    }

    /// Whether the last poll brought a manifest with an ETag not seen before.
    pub fn last_poll_fresh(&self) -> bool {
        self.fresh
    }

    /// Steps 2–8 for a manifest envelope: verify, and deploy when it is new.
    pub async fn handle_manifest(&mut self, bytes: &[u8], etag: Option<String>) -> Verdict {
        let digest = verify::digest(bytes);
        let me = Identity {
            node: &self.cfg.node,
            system: &self.cfg.system,
        };
        let verdict = verify::verify_manifest(
            bytes,
            &self.cfg.trusted,
            self.state.floor.as_ref(),
            self.trusted_now(),
            me,
        );
        match verdict {
            Ok(Accepted::Unchanged(_)) => {
                if etag.is_some() && etag != self.state.etag {
                    self.state.etag = etag;
                    if let Err(e) = self.save() {
                        tracing::warn!("cannot record the ETag: {e}");
                    }
                }
                self.deploy_if_needed().await
            }
            Ok(Accepted::New(v)) => {
                let version = v.manifest.version;
                tracing::info!(%version, signed_by = ?v.signed_by, "accepted a new manifest");
                // The floor is stored only now, after every rule passed.
                self.state.floor = Some(v.floor());
                self.state.newest_issued_at = Some(
                    self.state
                        .newest_issued_at
                        .unwrap_or_default()
                        .max(v.manifest.issued_at),
                );
                self.state.desired = Some(v.manifest);
                self.state.etag = etag;
                // Older versions can never come back (the floor): forget their quarantine.
                self.state.quarantined.retain(|q| *q >= version.0);
                self.deferred = 0;
                if let Err(e) = self.save() {
                    tracing::error!("cannot record the accepted manifest: {e}");
                    return Verdict::NotConverged;
                }
                self.deploy_if_needed().await
            }
            Err(r) => {
                if self.rejected != Some(digest) {
                    self.rejected = Some(digest);
                    self.reject(&r);
                }
                Verdict::NotConverged
            }
        }
    }

    /// A refused manifest changes nothing on the node: only a report is queued.
    fn reject(&mut self, r: &Rejection) {
        tracing::warn!(code = r.code(), "manifest refused: {r}");
        if r.is_security_event() {
            self.security_events.push(format!("{}: {r}", r.code()));
        }
        let version = self.state.desired.as_ref().map(|m| m.version);
        self.queue_report(
            ReportState::Rejected,
            version,
            Some(err(
                "verify",
                format!("manifest refused ({}): {r}", r.code()),
            )),
            vec![],
            Timings::default(),
        );
    }

    /// Step 3 then 4–8: deploys the desired manifest when there is work.
    pub async fn deploy_if_needed(&mut self) -> Verdict {
        let Some(m) = self.state.desired.clone() else {
            return Verdict::Converged;
        };
        if self.state.quarantined.contains(&m.version.0) {
            tracing::debug!(version = %m.version, "the desired version is quarantined; waiting for a newer one");
            return Verdict::NotConverged;
        }
        if !self.has_work() {
            return Verdict::Converged;
        }
        if m.expires_at <= self.trusted_now() {
            // Accepted in time but never deployed (deferred): not applied late either.
            let message = format!(
                "manifest version {} expired at {} before it could be deployed; keeping the running system",
                m.version, m.expires_at
            );
            let same = self.state.last_deploy.as_ref().is_some_and(|d| {
                d.version == Some(m.version)
                    && d.error.as_ref().is_some_and(|e| e.message == message)
            });
            if !same {
                tracing::warn!("{message}");
                self.finish(
                    m.version,
                    ReportState::Rejected,
                    Some(err("verify", message)),
                    vec![],
                    Timings::default(),
                );
            }
            return Verdict::NotConverged;
        }
        self.deploy(&m).await
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
        }
    }

    /// Step 4: realises every profile's path as the build policy allows.
    async fn realise(&self, m: &Manifest) -> Result<(), String> {
        let opts = self.realise_options(m);
        let outputs: Vec<StorePath> = m.profiles.iter().map(|p| p.path.clone()).collect();
        let drvs: Vec<StorePath> = m
            .profiles
            .iter()
            .filter_map(|p| p.drv_path.clone())
            .collect();
        let nix = self.nix.clone();
        let policy = self.cfg.build_policy;
        tokio::task::spawn_blocking(move || {
            let attempt = |paths: &[StorePath]| nix.realise(paths, &opts).map_err(|e| e.to_string());
            match policy {
                BuildPolicy::SubstituteOnly => attempt(&outputs),
                BuildPolicy::Build => {
                    if drvs.len() < outputs.len() {
                        return Err("build policy `build` needs a drv_path for every profile; the manifest lacks some".into());
                    }
                    attempt(&drvs)
                }
                BuildPolicy::Fallback => match attempt(&outputs) {
                    Ok(()) => Ok(()),
                    Err(e) if !drvs.is_empty() => {
                        tracing::warn!("substitution failed, building from drv_path: {e}");
                        attempt(&drvs).map_err(|b| {
                            format!("{e}\nbuilding from drv_path instead also failed: {b}")
                        })
                    }
                    Err(e) => Err(e),
                },
            }
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// After realisation: every path is valid and has the NAR hash the publisher signed.
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
        let infos = tokio::task::spawn_blocking(move || nix.path_info(&paths))
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

    /// Steps 4–8 for manifest `m`.
    async fn deploy(&mut self, m: &Manifest) -> Verdict {
        let m = &self.with_system_goal(m);
        if let Some(v) = self.wait_before_download(m).await {
            return v;
        }
        let version = m.version;
        let mut timings = Timings {
            fetch: self.fetch_ms.take(),
            ..Timings::default()
        };
        tracing::info!(%version, "deploying");
        self.set_phase("downloading");
        self.progress.within(self.cfg.realise_timeout * 2);
        fault::point("realise");
        let t = Instant::now();
        let realised = match self.make_room(m).await {
            Ok(()) => self.realise(m).await,
            Err(e) => Err(e),
        };
        timings.realise = ms(t);
        if let Err(e) = realised {
            self.deferred += 1;
            tracing::warn!(%version, "realisation failed (retried later): {e}");
            // Retries of the same failure are not reported again and again.
            let same = self.state.last_deploy.as_ref().is_some_and(|d| {
                d.version == Some(version)
                    && d.state == ReportState::Deferred.as_str()
                    && d.error.as_ref().is_some_and(|x| x.message == e)
            });
            if !same {
                self.finish(
                    version,
                    ReportState::Deferred,
                    Some(err("realise", e)),
                    vec![],
                    timings,
                );
            }
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
            self.set_phase("idle");
            return Verdict::NotConverged;
        }
        self.deferred = 0;
        if let Some(v) = self.wait_before_apply(m).await {
            return v;
        }

        // Step 5: the pending record, on disk before any profile changes.
        let reachable_before = self.poller.reachable(self.state.etag.as_deref()).await;
        let now = Timestamp::from(self.clock.now());
        let activation_s: u64 = m.profiles.iter().map(|p| p.activation_timeout_s).sum();
        let confirm_s = m
            .profiles
            .iter()
            .map(|p| p.confirm_timeout_s)
            .max()
            .unwrap_or(30);
        let mut pending = Pending {
            version,
            started_at: now,
            deadline: now.plus(Duration::from_secs(activation_s + confirm_s + 60)),
            coordinator_reachable_before: reachable_before,
            profiles: Vec::new(),
        };
        for p in &m.profiles {
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
            pending.profiles.push(PendingProfile {
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
            });
        }
        self.state.pending = Some(pending);
        if let Err(e) = self.save() {
            self.state.pending = None;
            self.finish(
                version,
                ReportState::Failed,
                Some(err(
                    "record",
                    format!("cannot write the pending record, nothing was changed: {e}"),
                )),
                vec![],
                timings,
            );
            self.set_phase("idle");
            return Verdict::NotConverged;
        }

        // Step 6: switch and activate, profile by profile, in order.
        self.set_phase("activating");
        let t = Instant::now();
        for (i, p) in m.profiles.iter().enumerate() {
            let pp = self.pending_profile(i).clone();
            let link = pp.profile_path.clone();
            // A profile already at this path is neither switched nor re-activated.
            let already = pp.previous_path.as_deref() == Some(p.path.as_str());
            if !already {
                fault::point("set-profile");
                if let Some(parent) = link.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                let (nix, l, path) = (self.nix.clone(), link.clone(), p.path.clone());
                let set = tokio::task::spawn_blocking(move || nix.set_profile(&l, &path))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()));
                // Even a failed set may have made a generation: roll back whatever happened.
                let now_at = profiles::current(&link).ok().flatten();
                {
                    let pp = self.pending_profile_mut(i);
                    pp.switched = true;
                    pp.new_generation = now_at
                        .filter(|g| Some(g.number) != pp.previous_generation)
                        .map(|g| g.number);
                }
                let _ = self.save();
                if let Err(e) = set {
                    timings.activate = ms(t);
                    return self
                        .fail_and_roll_back(
                            m,
                            "set-profile",
                            format!("profile `{}` ({}): {e}", p.name, link.display()),
                            vec![],
                            timings,
                        )
                        .await;
                }
                fault::point("activate");
                self.progress
                    .within(Duration::from_secs(p.activation_timeout_s + 10));
                let outcome =
                    match activate::start_activation(p, &p.path, &link, &version.to_string()) {
                        Ok(Some(running)) => {
                            self.pending_profile_mut(i).activation = Some(running.handle().clone());
                            let _ = self.save();
                            running.wait().await
                        }
                        Ok(None) => Outcome::Ok,
                        Err(o) => o,
                    };
                self.pending_profile_mut(i).activation = None;
                if outcome != Outcome::Ok {
                    timings.activate = ms(t);
                    let what = format!("activation of profile `{}` ({})", p.name, p.path);
                    return self
                        .fail_and_roll_back(m, "activate", outcome.describe(&what), vec![], timings)
                        .await;
                }
            }
            self.pending_profile_mut(i).activated = true;
            let _ = self.save();
        }
        timings.activate = ms(t);

        // Step 7: confirm.
        self.set_phase("confirming");
        fault::point("confirm");
        let t = Instant::now();
        let (ok, health, why) = self.confirm(m, reachable_before).await;
        timings.confirm = ms(t);
        if !ok {
            return self
                .fail_and_roll_back(m, "confirm", why, health, timings)
                .await;
        }
        self.state.pending = None;
        self.state.current_version = Some(version);
        self.state.applied = Some(m.clone());
        self.after_success(m).await;
        self.finish(version, ReportState::Success, None, health, timings);
        self.set_phase("idle");
        tracing::info!(%version, "deployed and confirmed");
        Verdict::Converged
    }

    fn pending_profile(&self, i: usize) -> &PendingProfile {
        &self
            .state
            .pending
            .as_ref()
            .expect("a deploy is pending")
            .profiles[i]
    }

    fn pending_profile_mut(&mut self, i: usize) -> &mut PendingProfile {
        &mut self
            .state
            .pending
            .as_mut()
            .expect("a deploy is pending")
            .profiles[i]
    }

    /// Step 7: every health check passes within `confirm_timeout_s`, and with magic rollback
    /// a coordinator that answered before the switch answers again.
    async fn confirm(
        &mut self,
        m: &Manifest,
        reachable_before: bool,
    ) -> (bool, Vec<HealthResult>, String) {
        let confirm_s = m
            .profiles
            .iter()
            .map(|p| p.confirm_timeout_s)
            .max()
            .unwrap_or(30)
            .max(1);
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
        if magic && reachable_before && !self.cfg.coordinators.is_empty() {
            loop {
                if self.poller.reachable(self.state.etag.as_deref()).await {
                    break;
                }
                if Instant::now() + Duration::from_secs(1) >= deadline {
                    return (
                        false,
                        results,
                        format!(
                            "magic rollback: the coordinator answered before the switch and not \
                             within {confirm_s} s after it"
                        ),
                    );
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        (true, results, String::new())
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
                Ok(note) => (ReportState::RolledBack, format!("{message}{note}")),
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
        self.finish(m.version, state, Some(err(phase, message)), health, timings);
        self.set_phase("idle");
        Verdict::NotConverged
    }

    /// Step 8: every switched profile back at its exact previous generation (by number),
    /// whose activation runs again. A profile that had no generation before this deploy
    /// loses its link and the generation this deploy made: it is back to not existing.
    async fn roll_back_pending(&mut self, m: Option<&Manifest>) -> Result<String, String> {
        fault::point("rollback");
        self.set_phase("rolling back");
        let Some(pending) = self.state.pending.clone() else {
            return Ok(String::new());
        };
        let mut errors = Vec::new();
        let mut notes = Vec::new();
        for pp in pending.profiles.iter().rev().filter(|p| p.switched) {
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
                Some(g) => profiles::switch_to(&pp.profile_path, g).map_err(|e| e.to_string()),
                None => remove_new_profile(pp),
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
            Ok(if notes.is_empty() {
                String::new()
            } else {
                format!("; {}", notes.join("; "))
            })
        } else {
            Err(errors.join("; "))
        }
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
        self.set_phase("recovering");
        for h in pending
            .profiles
            .iter()
            .filter_map(|p| p.activation.as_ref())
        {
            activate::stop_leftover(h).await;
        }
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
                let (ok, health, why) =
                    self.confirm(&m, pending.coordinator_reachable_before).await;
                if ok {
                    self.state.pending = None;
                    self.state.current_version = Some(m.version);
                    self.state.applied = Some(m.clone());
                    self.after_success(&m).await;
                    self.finish(m.version, ReportState::Success, None, health, timings);
                    Verdict::Converged
                } else {
                    self.fail_and_roll_back(
                        &m,
                        "confirm",
                        format!("after a restart of the agent: {why}"),
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
                    "the agent stopped during the switch or activation"
                };
                self.fail_and_roll_back(&m, "recover", why.to_owned(), vec![], timings)
                    .await
            }
            None => {
                let (st, msg) = match self.roll_back_pending(None).await {
                    Ok(n) => (
                        ReportState::RolledBack,
                        format!("interrupted deploy of an unknown manifest{n}"),
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
                    Some(err("recover", msg)),
                    vec![],
                    timings,
                );
                Verdict::NotConverged
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
            return Err(RollbackError(format!(
                "a deploy of version {} is pending; let the agent recover it first",
                p.version
            )));
        }
        let m = self.state.desired.clone().ok_or_else(|| {
            RollbackError("no manifest has been applied on this node; nothing to roll back".into())
        })?;
        let chosen: Vec<&v1::Profile> = m
            .profiles
            .iter()
            .filter(|p| only.is_none_or(|o| o == p.name.as_str()))
            .collect();
        if chosen.is_empty() {
            let names: Vec<&str> = m.profiles.iter().map(|p| p.name.as_str()).collect();
            return Err(RollbackError(format!(
                "no profile `{}` in the current manifest (it has: {})",
                only.unwrap_or(""),
                names.join(", ")
            )));
        }
        // Check every profile first, so a bad one leaves all of them untouched.
        let mut plan = Vec::new();
        for p in chosen {
            let link = activate::default_profile_path(p);
            let io = |e: std::io::Error| RollbackError(format!("profile `{}`: {e}", p.name));
            let cur = profiles::current(&link).map_err(io)?.ok_or_else(|| {
                RollbackError(format!(
                    "profile `{}` has no generation at {}",
                    p.name,
                    link.display()
                ))
            })?;
            let prev = profiles::generations(&link)
                .map_err(io)?
                .into_iter()
                .rfind(|g| g.number < cur.number)
                .ok_or_else(|| {
                    RollbackError(format!(
                        "profile `{}` ({}) has no generation before {}",
                        p.name,
                        link.display(),
                        cur.number
                    ))
                })?;
            plan.push((p, link, cur, prev));
        }
        let mut done = Vec::new();
        let mut failures = Vec::new();
        for (p, link, cur, prev) in plan {
            profiles::switch_to(&link, prev.number)
                .map_err(|e| RollbackError(format!("profile `{}`: {e}", p.name)))?;
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
            Some(err("manual-rollback", msg)),
            vec![],
            Timings::default(),
        );
        if failures.is_empty() {
            Ok(done)
        } else {
            Err(RollbackError(failures.join("; ")))
        }
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
            at: Timestamp::from(self.clock.now()),
            report_seq: None,
        });
        if let Err(e) = self.save() {
            tracing::error!("cannot save state: {e}");
        }
        let seq = self.queue_report(st, Some(version), error, health, timings);
        if let (Some(seq), Some(d)) = (seq, self.state.last_deploy.as_mut()) {
            d.report_seq = Some(seq);
            if let Err(e) = self.save() {
                tracing::error!("cannot save state: {e}");
            }
        }
        self.write_metrics();
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
            if let Err(e) = self.save() {
                tracing::error!("cannot save state: {e}");
            }
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
                let cur = profiles::current(&activate::default_profile_path(p))
                    .ok()
                    .flatten();
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
        state: ReportState,
        version: Option<Version>,
        error: Option<ReportError>,
        health: Vec<HealthResult>,
        timings: Timings,
    ) -> Option<u64> {
        let outcome = report::Outcome {
            state,
            version,
            error,
            health,
            timings,
            profiles: self.positions(),
            security_events: std::mem::take(&mut self.security_events),
            conditions: self.take_conditions(),
        };
        match self.reporter.queue(outcome) {
            Ok(seq) => Some(seq),
            Err(e) => {
                tracing::error!("cannot queue a report: {e}");
                None
            }
        }
    }

    /// Sends queued reports in order; returns how many are left.
    pub async fn flush_reports(&mut self) -> usize {
        self.progress.within(Duration::from_secs(300));
        self.reporter.flush().await
    }
}

/// Undoes a first deploy of a profile: the link goes back to what it was (usually nothing),
/// and the generation this deploy made goes too (it would otherwise keep the failed closure
/// alive as a garbage-collector root).
fn remove_new_profile(pp: &PendingProfile) -> Result<(), String> {
    let gone = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
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
            std::os::unix::fs::symlink(target, &tmp).map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, &pp.profile_path).map_err(|e| e.to_string())?;
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
