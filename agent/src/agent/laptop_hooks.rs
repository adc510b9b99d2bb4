//! The agent's laptop and Pi hooks (docs/protocol.md §7.13–§7.15): the gate before a
//! download and before a switch, the system goal, room in the store before a download,
//! retention and GC after a success, notifications, and the metrics file. The deploy steps
//! call these at a few well-marked points; everything they decide is in the standalone
//! modules ([`crate::gate`], [`crate::retention`], …).

use std::path::PathBuf;
use std::time::Duration;

use jiff::tz::TimeZone;
use roost_common::Timestamp;
use roost_common::nix::profiles;
use roost_common::wire::v1::{Activation, Goal, Manifest, ReportState, Timings};

use super::error::{RealiseError, Step};
use super::{Agent, Verdict, err};
use crate::activate;
use crate::config::SystemGoal;
use crate::gate::{self, Wait};
use crate::laptop::{self, Waiting};
use crate::metrics::NodeMetrics;
use crate::notifications::{Notice, Notifier, RUN_USER};
use crate::power::PowerSupplies;
use crate::reboot::{self, Running};
use crate::report::Conditions;
use crate::retention::{self, GcRecord, Keep};
use crate::schedule::Schedule;
use crate::state::Phase;

/// What the hooks keep in memory.
#[derive(Debug)]
pub(super) struct LaptopRuntime {
    notifier: Notifier,
    power: PowerSupplies,
    tz: TimeZone,
    /// Bytes the current deploy is fetching (counted once realised).
    fetching: u64,
    /// What the next report adds.
    conditions: Conditions,
    /// When the last poll that reached a coordinator ended.
    pub(super) last_successful_poll: Option<Timestamp>,
}

impl LaptopRuntime {
    pub(super) fn new(notifications: bool) -> Self {
        Self {
            notifier: Notifier::new(RUN_USER, notifications),
            power: PowerSupplies::default(),
            tz: crate::schedule::local_zone(),
            fetching: 0,
            conditions: Conditions::default(),
            last_successful_poll: None,
        }
    }
}

/// The step a wait is reported under.
fn step(w: &Wait) -> Step {
    match w {
        Wait::Window { .. } => Step::Window,
        Wait::Power(_) => Step::Power,
        Wait::Metered { .. } => Step::Metered,
        Wait::Deferred { .. } => Step::Defer,
    }
}

fn missing_bytes(m: &Manifest) -> u64 {
    m.profiles
        .iter()
        .filter(|p| !p.path.as_path().exists())
        .filter_map(|p| p.closure_size)
        .sum()
}

impl Agent {
    /// The manifest as this node installs it: with `system_goal = "boot"`, every `nixos`
    /// switch becomes a `boot`.
    pub(super) fn with_system_goal(&self, m: &Manifest) -> Manifest {
        let mut m = m.clone();
        if self.cfg.laptop.system_goal == SystemGoal::Boot {
            for p in &mut m.profiles {
                if let Activation::Nixos {
                    goal: goal @ Goal::Switch,
                } = &mut p.activation
                {
                    *goal = Goal::Boot;
                }
            }
        }
        m
    }

    /// The windows that count: the node's own, else each profile's from the manifest.
    fn schedules(&self, m: &Manifest) -> Vec<Schedule> {
        if !self.cfg.laptop.apply_windows.is_empty() {
            return vec![self.cfg.laptop.apply_windows.clone()];
        }
        let mut v: Vec<Schedule> = Vec::new();
        for p in m.profiles.iter().filter(|p| !p.apply_windows.is_empty()) {
            let s = Schedule::new(p.apply_windows.clone());
            if !v.contains(&s) {
                v.push(s);
            }
        }
        v
    }

    fn apply_wait(&self, m: &Manifest) -> Option<Wait> {
        let deferred = laptop::read_defer(self.dir.root());
        gate::before_apply(
            self.clock.now(),
            &self.laptop.tz,
            &self.schedules(m),
            deferred,
        )
    }

    /// Before the download: power, then a metered network; and when the closures are here
    /// already, the window and deferral too (no Nix call for a deploy that waits).
    pub(super) async fn wait_before_download(&mut self, m: &Manifest) -> Option<Verdict> {
        let need = missing_bytes(m);
        self.laptop.fetching = need;
        let power = self.laptop.power.read();
        let metered =
            need > self.cfg.laptop.metered_max_download && crate::metered::is_metered().await;
        let wait = gate::before_download(
            power,
            self.cfg.laptop.power,
            metered,
            need,
            self.cfg.laptop.metered_max_download,
        );
        let all_here = m.profiles.iter().all(|p| p.path.as_path().exists());
        let wait = wait.or_else(|| all_here.then(|| self.apply_wait(m)).flatten())?;
        Some(self.hold(m, wait).await)
    }

    /// After the download: the user's deferral, then the windows.
    pub(super) async fn wait_before_apply(&mut self, m: &Manifest) -> Option<Verdict> {
        self.state.laptop.fetched_bytes += std::mem::take(&mut self.laptop.fetching);
        match self.apply_wait(m) {
            Some(w) => Some(self.hold(m, w).await),
            None => {
                if self.state.laptop.waiting.take().is_some() {
                    tracing::info!(version = %m.version, "the wait is over: applying");
                }
                None
            }
        }
    }

    /// Records and reports a wait, once per version and reason.
    async fn hold(&mut self, m: &Manifest, wait: Wait) -> Verdict {
        let now = Timestamp::from(self.clock.now());
        let message = wait.describe(now);
        let version = m.version.0;
        let same = self
            .state
            .laptop
            .waiting
            .as_ref()
            .is_some_and(|w| w.version == version && w.kind == wait.kind());
        self.set_phase(Phase::Idle);
        if same {
            tracing::debug!(%version, "{message}");
            return Verdict::NotConverged;
        }
        tracing::info!(%version, "{message}");
        self.state.laptop.waiting = Some(Waiting {
            version,
            kind: wait.kind(),
            until: wait.until(),
            summary: wait.summary(),
        });
        self.laptop.conditions.deferred_until = wait.until();
        self.finish(
            m.version,
            ReportState::Deferred,
            Some(err(step(&wait), message.clone())),
            vec![],
            Timings::default(),
        );
        self.tell(Notice::Waiting {
            version,
            reason: message,
        })
        .await;
        Verdict::NotConverged
    }

    /// What the desired version waits for, if anything.
    pub fn waiting(&self) -> Option<&Waiting> {
        self.state
            .laptop
            .waiting
            .as_ref()
            .filter(|w| self.state.desired.as_ref().map(|m| m.version.0) == Some(w.version))
    }

    /// How long until a wait ends by itself (a window opens, a deferral ends, a reboot
    /// window opens), if it does: the daemon polls again then at the latest.
    pub fn until_wake(&self) -> Option<Duration> {
        let now = Timestamp::from(self.clock.now());
        let deploy = match self.waiting() {
            Some(w) => w.until,
            None => laptop::read_defer(self.dir.root()).filter(|_| self.has_work()),
        };
        let until = deploy.into_iter().chain(self.reboot_wake).min()?;
        Some(Duration::from_secs(until.secs_since(now) + 1))
    }

    /// Room for the closures before a download: when the free space is short, old
    /// generations go first, and a garbage collection runs when what it could free makes
    /// the closures fit.
    pub(super) async fn make_room(&mut self, m: &Manifest) -> Result<(), RealiseError> {
        let need = missing_bytes(m);
        if need == 0 {
            return Ok(());
        }
        let Some(free) = retention::store_free_bytes() else {
            return Ok(());
        };
        if free >= need {
            return Ok(());
        }
        let removed = self.prune(m);
        let nix = self.nix.clone();
        let reclaimable = tokio::task::spawn_blocking(move || nix.reclaimable())
            .await
            .map_err(|e| RealiseError::Task(e.to_string()))?
            .map_err(RealiseError::Gc)?;
        if free.saturating_add(reclaimable) < need {
            return Err(RealiseError::NoSpace {
                free,
                need,
                reclaimable,
                removed,
            });
        }
        tracing::info!(
            free,
            need,
            reclaimable,
            "collecting garbage first: it makes the closures fit"
        );
        self.collect_garbage(removed).await?;
        self.set_phase(Phase::Downloading);
        let free = retention::store_free_bytes().unwrap_or(u64::MAX);
        if free < need {
            return Err(RealiseError::StillNoSpace { free, need });
        }
        Ok(())
    }

    /// Retention over every profile of `m` (and of the applied manifest); returns how many
    /// generations went.
    fn prune(&mut self, m: &Manifest) -> u64 {
        let mut links: Vec<PathBuf> = m
            .profiles
            .iter()
            .map(activate::default_profile_path)
            .collect();
        if let Some(a) = &self.state.applied {
            for p in &a.profiles {
                let l = activate::default_profile_path(p);
                if !links.contains(&l) {
                    links.push(l);
                }
            }
        }
        let targets = retention::protected_targets();
        let mut removed = 0u64;
        for link in links {
            let healthy = self
                .state
                .laptop
                .healthy_generations
                .get(&link)
                .cloned()
                .unwrap_or_default();
            let keep = Keep {
                targets: targets.clone(),
                pending: vec![],
                healthy,
                keep_generations: self.cfg.laptop.keep_generations,
            };
            match retention::prune(&link, &keep) {
                Ok(gone) => {
                    removed += gone.len() as u64;
                    if let Some(h) = self.state.laptop.healthy_generations.get_mut(&link) {
                        h.retain(|g| !gone.contains(g));
                    }
                }
                Err(e) => tracing::warn!(profile = %link.display(), "retention: {e}"),
            }
        }
        if removed > 0 {
            self.laptop.conditions.generations_removed =
                Some(self.laptop.conditions.generations_removed.unwrap_or(0) + removed);
        }
        removed
    }

    async fn collect_garbage(&mut self, removed: u64) -> Result<u64, RealiseError> {
        self.set_phase(Phase::CollectingGarbage);
        self.progress.within(Duration::from_secs(3600));
        let nix = self.nix.clone();
        let freed = tokio::task::spawn_blocking(move || nix.collect_garbage())
            .await
            .map_err(|e| RealiseError::Task(e.to_string()))?
            .map_err(RealiseError::Gc)?;
        tracing::info!(freed, "garbage collected");
        self.state.laptop.last_gc = Some(GcRecord {
            at: Timestamp::from(self.clock.now()),
            freed_bytes: freed,
            generations_removed: removed,
        });
        self.laptop.conditions.gc_freed_bytes =
            Some(self.laptop.conditions.gc_freed_bytes.unwrap_or(0) + freed);
        Ok(freed)
    }

    /// After a confirmed deploy: the generations are healthy; retention; a GC when due; tell
    /// the user.
    pub(super) async fn after_success(&mut self, m: &Manifest) {
        for p in &m.profiles {
            let link = activate::default_profile_path(p);
            let gens = profiles::generations(&link).unwrap_or_default();
            let Some(cur) = profiles::current(&link).ok().flatten() else {
                continue;
            };
            if !self.state.laptop.healthy_generations.contains_key(&link) {
                // What ran before roost's first deploy here was running: healthy too.
                if let Some(prev) = gens.iter().rfind(|g| g.number < cur.number) {
                    self.state.laptop.healthy(&link, prev.number);
                }
            }
            self.state.laptop.healthy(&link, cur.number);
        }
        let removed = self.prune(m);
        let low = self
            .cfg
            .laptop
            .gc_min_free
            .is_some_and(|min| retention::store_free_bytes().is_some_and(|free| free < min));
        if self.cfg.laptop.gc_after_deploy || low {
            if let Err(e) = self.collect_garbage(removed).await {
                tracing::warn!("{e}");
            }
        }
        let reasons = self.reboot_reasons(m);
        let reboot = !reasons.is_empty();
        self.laptop.conditions.reboot_reasons = reasons;
        let version = m.version.0;
        self.tell(if reboot {
            Notice::NeedsReboot { version }
        } else {
            Notice::Applied { version }
        })
        .await;
    }

    /// After a failed deploy.
    pub(super) async fn after_failure(&mut self, m: &Manifest, state: ReportState, why: &str) {
        if state == ReportState::RolledBack {
            self.state.laptop.rollbacks += 1;
            self.tell(Notice::RolledBack {
                version: m.version.0,
                why: why.to_owned(),
            })
            .await;
        }
    }

    /// Why the `nixos` profiles' current generations are not fully in use until the next
    /// boot (§7.16).
    pub(super) fn reboot_reasons(&self, m: &Manifest) -> Vec<String> {
        reboot::manifest_reasons(m, &Running::default())
    }

    /// What the next report adds (taken: each deploy's figures go into one report). The
    /// reboot reasons are the applied manifest's as the machine is now.
    pub(super) fn take_conditions(&mut self) -> Conditions {
        let mut c = std::mem::take(&mut self.laptop.conditions);
        if let Some(m) = &self.state.applied {
            c.reboot_reasons = self.reboot_reasons(m);
        }
        c
    }

    /// Sends a desktop notification (each user's bus has 10 s to take it).
    async fn tell(&self, notice: Notice) {
        self.laptop.notifier.send(&notice).await;
    }

    /// Notes a poll for the metrics.
    pub(super) fn note_poll_for_metrics(&mut self, reached: bool) {
        if reached {
            self.laptop.last_successful_poll = Some(Timestamp::from(self.clock.now()));
        }
        self.write_metrics();
    }

    /// Rewrites the metrics file, when one is configured.
    pub(super) fn write_metrics(&self) {
        let Some(path) = &self.cfg.laptop.metrics_file else {
            return;
        };
        let last_poll = self.live.lock().ok().and_then(|l| l.last_poll_at);
        let m = NodeMetrics {
            last_poll,
            last_successful_poll: self.laptop.last_successful_poll,
            desired_version: self.state.desired.as_ref().map(|m| m.version.0),
            current_version: self.state.current_version.map(|v| v.0),
            state: self
                .state
                .last_deploy
                .as_ref()
                .map(|d| d.state.as_str().to_owned()),
            deferred_reason: self
                .waiting()
                .map(|w| w.kind.as_str().to_owned())
                .or_else(|| {
                    self.state
                        .last_deploy
                        .as_ref()
                        .filter(|d| d.state == ReportState::Deferred)
                        .and_then(|d| d.error.as_ref().map(|e| e.phase.clone()))
                })
                .filter(|_| self.has_work()),
            needs_reboot: self
                .state
                .applied
                .as_ref()
                .is_some_and(|m| !self.reboot_reasons(m).is_empty()),
            rollbacks: self.state.laptop.rollbacks,
            fetched_bytes: self.state.laptop.fetched_bytes,
            last_gc: self.state.laptop.last_gc,
        };
        if let Err(e) = m.write(path) {
            tracing::warn!(path = %path.display(), "cannot write the metrics file: {e}");
        }
    }
}
