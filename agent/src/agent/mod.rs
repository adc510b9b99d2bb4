//! The agent's state machine (DESIGN §7 steps 2–9): verify → skip what is current or
//! quarantined → realise → record pending → switch → activate → confirm → roll back to the
//! exact previous generation → report; and recovery of a deploy a crash interrupted.
//!
//! The agent takes what it talks to as parameters ([`NixOps`], [`WallClock`]); the HTTP
//! side lives in [`Poller`] and [`Reporter`]. Here: the agent, its state and live view, and
//! what happens to a manifest up to the deploy; `deploy` holds the deploy's steps,
//! `rollback` rollback and recovery, `error` the typed errors.

mod deploy;
pub mod error;
mod laptop_hooks;
mod reboots;
mod rollback;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_common::nix::profiles;
use roost_common::verify::{self, Accepted, Identity, Rejection};
use roost_common::wire::v1::{HealthResult, ProfileStatus, ReportError, ReportState, Timings};
use roost_common::{Timestamp, Version};
use sd_notify::NotifyState;
use tokio::time::Instant;
use tracing::Instrument;

pub use error::{AgentError, RollbackError, Step};

use crate::activate;
use crate::config::Config;
use crate::fault;
use crate::nixops::NixOps;
use crate::notify::{Progress, notify};
use crate::poll::{Poll, Poller, WallClock};
use crate::report::{self, Reporter};
use crate::state::{DeployRecord, Phase, RefusedManifest, Snapshot, State, StateDir};

/// How an operation ended, for `--once` and `apply` exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The desired version is active and confirmed, or there is nothing to do.
    Converged,
    /// Rejected, failed, rolled back, deferred, quarantined, or the coordinator unreachable.
    NotConverged,
}

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
    /// ETag of the last manifest refused for a reason that may pass (expired by a clock
    /// that jumped ahead): never sent as If-None-Match.
    refused_later: Option<String>,
    /// Whether the last poll brought bytes not seen before.
    fresh: bool,
    /// The code of the refusal of the last manifest handled, if it was refused.
    refused_code: Option<&'static str>,
    /// Windows, power, metered, retention, notifications, metrics.
    laptop: laptop_hooks::LaptopRuntime,
    /// When the reboot window that a due reboot waits for opens (§7.16).
    reboot_wake: Option<Timestamp>,
}

/// The version a refused envelope claims, read without trusting it (for `status`).
fn claimed_version(bytes: &[u8]) -> Option<u64> {
    let payload = roost_common::Envelope::unverified_payload(bytes)?;
    let v: serde_json::Value = serde_json::from_slice(&payload).ok()?;
    v["version"].as_u64()
}

fn ms(since: Instant) -> Option<u64> {
    Some(since.elapsed().as_millis() as u64)
}

fn err(step: Step, message: impl Into<String>) -> ReportError {
    ReportError {
        phase: step.as_str().into(),
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
            phase: Phase::Idle,
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
            refused_code: None,
            security_events: Vec::new(),
            live: Arc::new(Mutex::new(live)),
            written,
            progress: Progress::default(),
            deferred: 0,
            fetch_ms: None,
            seen_etag: None,
            refused_later: None,
            fresh: false,
            reboot_wake: None,
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
                s.phase,
                s.last_poll_result.is_some(),
                failed,
                s.long_poll,
                s.no_manifest,
            )
        };
        if self.written.as_ref().map(key) != Some(key(&snap)) {
            match self.dir.save_snapshot(&snap) {
                Ok(()) => self.written = Some(snap),
                Err(e) => tracing::warn!("cannot write status.json: {e}"),
            }
        }
    }

    fn set_phase(&mut self, phase: Phase) {
        self.update_live(|l| l.phase = phase);
        notify(&[NotifyState::Status(phase.as_str())]);
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

    /// Records whether the coordinator that answered the last poll had a manifest for this
    /// node; a change is logged once (at warn when it has none: nothing will be deployed).
    pub fn note_manifest_presence(&mut self, missing: bool) {
        let was = self.live.lock().map(|l| l.no_manifest).unwrap_or(false);
        if missing == was {
            return;
        }
        if missing {
            tracing::warn!(
                node = %self.cfg.node,
                "the coordinator has no manifest for node `{}`: nothing will be deployed here \
                 until one is published for this name (is it in the flake's deploy.nodes, \
                 spelt as this node's name?)",
                self.cfg.node
            );
        } else {
            tracing::info!(node = %self.cfg.node, "the coordinator has a manifest for this node again");
        }
        self.update_live(|l| l.no_manifest = missing);
    }

    /// Whether the coordinator had no manifest for this node at the last poll that reached it.
    pub fn coordinator_has_no_manifest(&self) -> bool {
        self.live.lock().map(|l| l.no_manifest).unwrap_or(false)
    }

    /// Marks the agent idle (after start-up reconciliation).
    pub fn idle(&mut self) {
        self.set_phase(Phase::Idle);
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
            // A manifest refused for now, fetched again, is not news: no quick re-poll.
            self.fresh = (e.is_none() || *e != etag) && (e.is_none() || *e != self.refused_later);
            self.seen_etag = e.clone();
        }
        p
    }

    /// The refusal's code when the last manifest handled was refused.
    pub fn last_manifest_refused(&self) -> Option<&'static str> {
        self.refused_code
    }

    /// Whether the last poll brought a manifest with an ETag not seen before.
    pub fn last_poll_fresh(&self) -> bool {
        self.fresh
    }

    /// Steps 2–8 for a manifest envelope: verify, and deploy when it is new.
    pub async fn handle_manifest(&mut self, bytes: &[u8], etag: Option<String>) -> Verdict {
        let digest = verify::digest(bytes);
        self.refused_code = None;
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
                if r.may_pass_later() {
                    // Its ETag must not be waited on: a 304 would hide it for good once the
                    // clock is right again. Polls send the accepted manifest's ETag instead
                    // and fetch it again each interval until it passes (or a newer comes).
                    self.seen_etag = None;
                    self.refused_later = etag.clone();
                }
                self.refused_code = Some(r.code());
                if self.rejected != Some(digest) {
                    self.rejected = Some(digest);
                    self.reject(&r, bytes);
                }
                Verdict::NotConverged
            }
        }
    }

    /// A refused manifest changes nothing on the node: a report is queued, and the refusal is
    /// recorded for `status`.
    fn reject(&mut self, r: &Rejection, bytes: &[u8]) {
        tracing::warn!(code = r.code(), "manifest refused: {r}");
        let refused = RefusedManifest {
            at: Timestamp::from(self.clock.now()),
            code: r.code().to_owned(),
            message: r.to_string(),
            claimed_version: claimed_version(bytes),
        };
        if let Err(e) = self.dir.save_refused(&refused) {
            tracing::warn!("cannot record the refused manifest for `status`: {e}");
        }
        if r.is_security_event() {
            self.security_events.push(format!("{}: {r}", r.code()));
        }
        let version = self.state.desired.as_ref().map(|m| m.version);
        self.queue_report(
            ReportState::Rejected,
            version,
            Some(err(
                Step::Verify,
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
                    Some(err(Step::Verify, message)),
                    vec![],
                    Timings::default(),
                );
            }
            return Verdict::NotConverged;
        }
        let span = tracing::info_span!("deploy", version = %m.version);
        self.deploy(&m).instrument(span).await
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
            state: st,
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
        if let Some(seq) = self.queue_report(
            d.state,
            d.version,
            d.error.clone(),
            vec![],
            Timings::default(),
        ) {
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
