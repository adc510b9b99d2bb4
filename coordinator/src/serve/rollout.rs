//! The rollout state machine (docs/protocol.md §6.9): which waves of the current publish are
//! released, when the next one is, and when the rollout halts. Pure: no I/O, time passed in,
//! so every rule is unit-tested with an injected clock. The server (`gate.rs`) persists its
//! [`Saved`] form, feeds it uploads, reports and operator actions, and serves each node the
//! manifest this machine says it may see.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use roost_common::wire::v1::rollout::{
    Action, FailedNode, Halt, NodeOutcome, NodeRollout, Policy, RolloutState, RolloutStatus,
    WaveStatus,
};
use roost_common::wire::v1::{self, Fraction, ReportState, WaveSize};
use roost_common::{NodeName, Timestamp};
use serde::{Deserialize, Serialize};

/// What a node's reports say about its manifest of this rollout.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Outcome {
    /// Nothing yet (or only `deferred`).
    #[default]
    Pending,
    /// `success` for this publish's version.
    Healthy,
    /// `failed` or `rolled_back` for its version, or `rejected` after its release.
    Failed {
        /// The report's state.
        state: ReportState,
        /// The report's error message.
        error: Option<String>,
    },
}

/// What the rollout needs of a stored report.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// The report's state.
    pub state: ReportState,
    /// The version it is about.
    pub manifest_version: Option<u64>,
    /// Its error message.
    pub error: Option<&'a str>,
    /// When the coordinator received it.
    pub received_at: Timestamp,
}

/// The outcome a report means for a node whose rollout manifest is `version`, released at
/// `released_at`; `None` when it says nothing about it (an older version's report, say).
/// A refusal names the version the node had before, not the refused one, so a `rejected`
/// counts when it came after the node was served this publish.
pub fn outcome_of(o: &Observed<'_>, version: u64, released_at: Timestamp) -> Option<Outcome> {
    let this = o.manifest_version == Some(version);
    let failed = || Outcome::Failed {
        state: o.state,
        error: o.error.map(str::to_owned),
    };
    match o.state {
        ReportState::Success if this => Some(Outcome::Healthy),
        ReportState::Failed | ReportState::RolledBack if this => Some(failed()),
        ReportState::Rejected if o.received_at >= released_at => Some(failed()),
        _ => None,
    }
}

/// A wave's durable state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SavedWave {
    /// When it was released.
    #[serde(default)]
    pub released_at: Option<Timestamp>,
    /// Since when enough of it is healthy.
    #[serde(default)]
    pub met_at: Option<Timestamp>,
    /// Failures accepted by a `resume`.
    #[serde(default)]
    pub forgiven: u32,
}

/// The rollout's durable form (`STATE/rollout.json`). Which nodes belong to it and what they
/// reported is not here: that is in the stored manifests and the report database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    /// The publish's `rollout.id`.
    pub id: u64,
    /// When its first manifest arrived.
    pub started_at: Timestamp,
    /// Its policy.
    pub policy: Policy,
    /// Nodes per wave, as the publish planned.
    pub plan: Vec<WaveSize>,
    /// Every wave up to this one is released.
    pub released_through: Option<u32>,
    /// Per wave.
    pub waves: BTreeMap<u32, SavedWave>,
    /// An operator's pause.
    #[serde(default)]
    pub paused: bool,
    /// Why it halted.
    #[serde(default)]
    pub halt: Option<Halt>,
    /// When an operator aborted it.
    #[serde(default)]
    pub aborted_at: Option<Timestamp>,
}

/// An action the rollout's state refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// Aborted rollouts take no actions.
    #[error("rollout {0} was aborted; the next publish starts a new one")]
    Aborted(u64),
    /// `resume` without a pause or halt.
    #[error("rollout {0} is neither paused nor halted; nothing to resume")]
    NothingToResume(u64),
    /// `promote` with every wave out.
    #[error("every wave of rollout {0} is released already")]
    AllReleased(u64),
    /// `promote --wave K` for a K that is not a wave of it.
    #[error("rollout {id} has no wave {wave}; its waves are {known}")]
    UnknownWave {
        /// The rollout.
        id: u64,
        /// The wave asked for.
        wave: u32,
        /// Its waves.
        known: String,
    },
    /// `promote --wave K` for a K already out.
    #[error("wave {wave} of rollout {id} is released already")]
    AlreadyReleased {
        /// The rollout.
        id: u64,
        /// The wave asked for.
        wave: u32,
    },
}

impl ActionError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            ActionError::Aborted(_) => "rollout_aborted",
            ActionError::NothingToResume(_) => "nothing_to_resume",
            ActionError::AllReleased(_) | ActionError::AlreadyReleased { .. } => "already_released",
            ActionError::UnknownWave { .. } => "unknown_wave",
        }
    }
}

#[derive(Debug, Clone)]
struct Member {
    wave: u32,
    version: u64,
    outcome: Outcome,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    members: u32,
    healthy: u32,
    failed: u32,
}

impl Counts {
    fn add(&mut self, o: &Outcome, by: i64) {
        let bump = |c: &mut u32| *c = (i64::from(*c) + by).max(0) as u32;
        bump(&mut self.members);
        match o {
            Outcome::Pending => {}
            Outcome::Healthy => bump(&mut self.healthy),
            Outcome::Failed { .. } => bump(&mut self.failed),
        }
    }
}

/// The current rollout.
#[derive(Debug, Clone)]
pub struct Rollout {
    saved: Saved,
    members: HashMap<NodeName, Member>,
    counts: HashMap<u32, Counts>,
}

fn policy_of(r: &v1::Rollout) -> Policy {
    Policy {
        min_healthy: r.min_healthy.get(),
        max_failed: r.max_failed,
        bake_time_s: r.bake_time_s,
    }
}

impl Rollout {
    /// A rollout begun by the first manifest of publish `id` to arrive, at `now`: its first
    /// wave is released.
    pub fn start(id: u64, r: &v1::Rollout, now: Timestamp) -> Self {
        let mut plan = r.waves.clone();
        if plan.is_empty() {
            plan.push(WaveSize {
                wave: r.wave,
                nodes: 0,
            });
        }
        plan.sort_by_key(|w| w.wave);
        plan.dedup_by_key(|w| w.wave);
        let first = plan[0].wave;
        let mut waves = BTreeMap::new();
        waves.insert(
            first,
            SavedWave {
                released_at: Some(now),
                ..SavedWave::default()
            },
        );
        Self::restore(Saved {
            id,
            started_at: now,
            policy: policy_of(r),
            plan,
            released_through: Some(first),
            waves,
            paused: false,
            halt: None,
            aborted_at: None,
        })
    }

    /// The rollout as saved; members join again as their manifests are loaded.
    pub fn restore(saved: Saved) -> Self {
        Self {
            saved,
            members: HashMap::new(),
            counts: HashMap::new(),
        }
    }

    /// Its durable form.
    pub fn saved(&self) -> &Saved {
        &self.saved
    }

    /// Goes back to `saved` (a state that could not be saved is undone); members and what
    /// they reported stay.
    pub fn reset_saved(&mut self, saved: Saved) {
        self.saved = saved;
    }

    /// The publish it releases.
    pub fn id(&self) -> u64 {
        self.saved.id
    }

    /// Whether `wave` is released.
    pub fn wave_released(&self, wave: u32) -> bool {
        self.saved.released_through.is_some_and(|t| wave <= t)
    }

    /// When `wave` was released (the first wave's release, for a wave below it).
    fn released_at(&self, wave: u32) -> Option<Timestamp> {
        if !self.wave_released(wave) {
            return None;
        }
        self.saved
            .waves
            .range(wave..)
            .find_map(|(_, w)| w.released_at)
            .or(Some(self.saved.started_at))
    }

    /// `node`'s manifest `version` of this publish is stored, in `wave`. True when its wave
    /// is released and the rollout not aborted: serve it now.
    pub fn join(&mut self, node: &NodeName, wave: u32, version: u64) -> bool {
        self.leave(node);
        let m = Member {
            wave,
            version,
            outcome: Outcome::Pending,
        };
        self.counts.entry(wave).or_default().add(&m.outcome, 1);
        self.members.insert(node.clone(), m);
        self.may_serve_wave(wave)
    }

    /// `node`'s newest manifest is not of this publish any more.
    pub fn leave(&mut self, node: &NodeName) {
        if let Some(old) = self.members.remove(node) {
            self.counts
                .entry(old.wave)
                .or_default()
                .add(&old.outcome, -1);
        }
    }

    /// Whether a manifest of `wave` may be served now.
    pub fn may_serve_wave(&self, wave: u32) -> bool {
        self.wave_released(wave) && self.saved.aborted_at.is_none()
    }

    /// The version and wave `node` has in this rollout.
    pub fn member(&self, node: &NodeName) -> Option<(u64, u32)> {
        self.members.get(node).map(|m| (m.version, m.wave))
    }

    /// Takes in a stored report of `node`; true when its outcome changed.
    pub fn observe(&mut self, node: &NodeName, o: &Observed<'_>) -> bool {
        let Some(m) = self.members.get(node) else {
            return false;
        };
        let Some(released) = self.released_at(m.wave) else {
            return false;
        };
        match outcome_of(o, m.version, released) {
            Some(out) => self.set_outcome(node, out),
            None => false,
        }
    }

    /// Sets `node`'s outcome; true when it changed.
    fn set_outcome(&mut self, node: &NodeName, out: Outcome) -> bool {
        let Some(m) = self.members.get_mut(node) else {
            return false;
        };
        if m.outcome == out {
            return false;
        }
        let c = self.counts.entry(m.wave).or_default();
        c.add(&m.outcome, -1);
        c.add(&out, 1);
        m.outcome = out;
        true
    }

    /// Every wave, lowest first: the plan's and any a member brought.
    fn wave_numbers(&self) -> BTreeSet<u32> {
        self.saved
            .plan
            .iter()
            .map(|w| w.wave)
            .chain(
                self.counts
                    .iter()
                    .filter(|(_, c)| c.members > 0)
                    .map(|(w, _)| *w),
            )
            .collect()
    }

    /// A wave's size: what the publish planned, or more when more arrived.
    fn size(&self, wave: u32) -> u32 {
        let planned = self
            .saved
            .plan
            .iter()
            .find(|w| w.wave == wave)
            .map_or(0, |w| w.nodes);
        planned.max(self.counts(wave).members)
    }

    fn counts(&self, wave: u32) -> Counts {
        self.counts.get(&wave).copied().unwrap_or_default()
    }

    fn needed(&self, wave: u32) -> u32 {
        Fraction::new(self.saved.policy.min_healthy)
            .unwrap_or(Fraction::ONE)
            .of(self.size(wave))
    }

    fn next_after(&self, wave: Option<u32>) -> Option<u32> {
        let waves = self.wave_numbers();
        match wave {
            None => waves.first().copied(),
            Some(w) => waves.range(w + 1..).next().copied(),
        }
    }

    /// Where it stands.
    pub fn state(&self) -> RolloutState {
        if self.saved.aborted_at.is_some() {
            RolloutState::Aborted
        } else if self.saved.halt.is_some() {
            RolloutState::Halted
        } else if self.saved.paused {
            RolloutState::Paused
        } else if self.next_after(self.saved.released_through).is_none() {
            RolloutState::Complete
        } else {
            RolloutState::Running
        }
    }

    /// Applies the policy at `now`: halts on too many failures, else releases every wave
    /// whose predecessor is healthy enough for long enough. Returns the waves released; the
    /// caller persists [`Rollout::saved`] when it changed (`true`), before serving them.
    pub fn step(&mut self, now: Timestamp) -> (Vec<u32>, bool) {
        let mut released = Vec::new();
        let mut changed = false;
        if self.saved.aborted_at.is_some() {
            return (released, changed);
        }
        if self.saved.halt.is_none() {
            if let Some(halt) = self.halt_now(now) {
                self.saved.halt = Some(halt);
                changed = true;
            }
        }
        if self.saved.paused || self.saved.halt.is_some() {
            return (released, changed);
        }
        let bake = self.saved.policy.bake_time_s;
        while let Some(cur) = self.saved.released_through {
            let Some(next) = self.next_after(Some(cur)) else {
                break;
            };
            let enough = self.counts(cur).healthy >= self.needed(cur);
            let w = self.saved.waves.entry(cur).or_default();
            if !enough {
                changed |= w.met_at.take().is_some();
                break;
            }
            let met = *w.met_at.get_or_insert_with(|| {
                changed = true;
                now
            });
            if now.secs_since(met) < bake {
                break;
            }
            self.release_through(next, now);
            released.push(next);
            changed = true;
        }
        (released, changed)
    }

    /// The first released wave with more unforgiven failures than the policy allows.
    fn halt_now(&self, now: Timestamp) -> Option<Halt> {
        let max = self.saved.policy.max_failed;
        let wave = self
            .wave_numbers()
            .into_iter()
            .filter(|w| self.wave_released(*w))
            .find(|w| {
                let forgiven = self.saved.waves.get(w).map_or(0, |s| s.forgiven);
                self.counts(*w).failed.saturating_sub(forgiven) > max
            })?;
        let nodes = self.failed_nodes(wave);
        Some(Halt {
            at: now,
            wave,
            reason: format!(
                "{} node(s) of wave {wave} failed, more than maxFailed = {max}: {}",
                nodes.len(),
                nodes
                    .iter()
                    .map(|n| format!("{} ({})", n.node, n.state))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            nodes,
        })
    }

    fn failed_nodes(&self, wave: u32) -> Vec<FailedNode> {
        let mut out: Vec<FailedNode> = self
            .members
            .iter()
            .filter(|(_, m)| m.wave == wave)
            .filter_map(|(n, m)| match &m.outcome {
                Outcome::Failed { state, error } => Some(FailedNode {
                    node: n.to_string(),
                    state: state.as_str().to_owned(),
                    error: error.clone(),
                }),
                _ => None,
            })
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out
    }

    fn release_through(&mut self, wave: u32, now: Timestamp) {
        let from = self.saved.released_through;
        for w in self.wave_numbers() {
            if from.is_none_or(|f| w > f) && w <= wave {
                self.saved.waves.entry(w).or_default().released_at = Some(now);
            }
        }
        self.saved.released_through = Some(wave);
    }

    /// The nodes of `waves` whose manifests may now be served.
    pub fn members_of(&self, waves: &[u32]) -> Vec<NodeName> {
        if self.saved.aborted_at.is_some() {
            return Vec::new();
        }
        self.members
            .iter()
            .filter(|(_, m)| waves.contains(&m.wave))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Every member's place in the rollout, for the fleet views.
    pub fn node_rollouts(&self) -> impl Iterator<Item = (&NodeName, NodeRollout)> {
        self.members.iter().map(|(n, m)| {
            let outcome = match m.outcome {
                Outcome::Pending => NodeOutcome::Pending,
                Outcome::Healthy => NodeOutcome::Healthy,
                Outcome::Failed { .. } => NodeOutcome::Failed,
            };
            let place = NodeRollout {
                id: self.saved.id,
                wave: m.wave,
                version: m.version,
                released: self.wave_released(m.wave),
                outcome,
            };
            (n, place)
        })
    }

    /// When [`Rollout::step`] must run again although nothing happens: the end of the
    /// current wave's bake time.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        if self.state() != RolloutState::Running {
            return None;
        }
        let cur = self.saved.released_through?;
        let met = self.saved.waves.get(&cur)?.met_at?;
        Some(met.plus(std::time::Duration::from_secs(
            self.saved.policy.bake_time_s,
        )))
    }

    /// An operator's action at `now`; returns the waves it released (then [`Rollout::step`]
    /// has run too, and the caller persists the new state).
    pub fn act(
        &mut self,
        action: Action,
        wave: Option<u32>,
        now: Timestamp,
    ) -> Result<Vec<u32>, ActionError> {
        let id = self.saved.id;
        if self.saved.aborted_at.is_some() {
            return Err(ActionError::Aborted(id));
        }
        let mut released = Vec::new();
        match action {
            Action::Pause => self.saved.paused = true,
            Action::Abort => self.saved.aborted_at = Some(now),
            Action::Resume => {
                if !self.saved.paused && self.saved.halt.is_none() {
                    return Err(ActionError::NothingToResume(id));
                }
                self.saved.paused = false;
                if self.saved.halt.take().is_some() {
                    for w in self.wave_numbers() {
                        let failed = self.counts(w).failed;
                        self.saved.waves.entry(w).or_default().forgiven = failed;
                    }
                }
            }
            Action::Promote => {
                let through = self.saved.released_through;
                let target = match wave {
                    None => self
                        .next_after(through)
                        .ok_or(ActionError::AllReleased(id))?,
                    Some(w) if !self.wave_numbers().contains(&w) => {
                        return Err(ActionError::UnknownWave {
                            id,
                            wave: w,
                            known: self
                                .wave_numbers()
                                .iter()
                                .map(u32::to_string)
                                .collect::<Vec<_>>()
                                .join(", "),
                        });
                    }
                    Some(w) if self.wave_released(w) => {
                        return Err(ActionError::AlreadyReleased { id, wave: w });
                    }
                    Some(w) => w,
                };
                released = self
                    .wave_numbers()
                    .into_iter()
                    .filter(|w| through.is_none_or(|t| *w > t) && *w <= target)
                    .collect();
                self.release_through(target, now);
            }
        }
        released.extend(self.step(now).0);
        Ok(released)
    }

    /// The document `GET /v1/rollout` shows.
    pub fn status(&self, now: Timestamp) -> RolloutStatus {
        let state = self.state();
        let through = self.saved.released_through;
        let current = through.filter(|_| state != RolloutState::Complete);
        let waves = self
            .wave_numbers()
            .into_iter()
            .map(|w| {
                let c = self.counts(w);
                let size = self.size(w);
                let saved = self.saved.waves.get(&w).copied().unwrap_or_default();
                let needed = self.needed(w);
                let waiting_for = if Some(w) == current {
                    Some(self.waiting(w, c, needed, saved, now, state))
                } else if !self.wave_released(w) {
                    Some(format!(
                        "earlier waves (released after wave {})",
                        self.wave_numbers()
                            .range(..w)
                            .next_back()
                            .map_or_else(|| "-".to_owned(), u32::to_string)
                    ))
                } else {
                    None
                };
                WaveStatus {
                    wave: w,
                    nodes: size,
                    uploaded: c.members,
                    released: self.wave_released(w),
                    released_at: self.released_at(w).filter(|_| saved.released_at.is_some()),
                    healthy: c.healthy,
                    failed: c.failed,
                    pending: size.saturating_sub(c.healthy + c.failed),
                    forgiven: saved.forgiven,
                    needed,
                    threshold_met_at: saved.met_at,
                    waiting_for,
                }
            })
            .collect();
        RolloutStatus {
            id: self.saved.id,
            state,
            started_at: self.saved.started_at,
            policy: self.saved.policy,
            waves,
            paused: self.saved.paused,
            halt: self.saved.halt.clone(),
            aborted_at: self.saved.aborted_at,
        }
    }

    fn waiting(
        &self,
        _wave: u32,
        c: Counts,
        needed: u32,
        saved: SavedWave,
        now: Timestamp,
        state: RolloutState,
    ) -> String {
        match state {
            RolloutState::Aborted => "nothing: the rollout was aborted".to_owned(),
            RolloutState::Halted => {
                "an operator: the rollout halted (resume, promote or abort)".to_owned()
            }
            RolloutState::Paused => "an operator: the rollout is paused (resume)".to_owned(),
            _ if c.healthy < needed => format!(
                "{} more success report(s): {} of {} needed",
                needed - c.healthy,
                c.healthy,
                needed
            ),
            _ => {
                let left = saved.met_at.map_or(0, |m| {
                    self.saved
                        .policy
                        .bake_time_s
                        .saturating_sub(now.secs_since(m))
                });
                format!("the bake time: {left} s left")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u64) -> Timestamp {
        Timestamp::from_unix(1_800_000_000 + s)
    }

    fn n(s: &str) -> NodeName {
        s.parse().unwrap()
    }

    fn policy(min_healthy: f64, max_failed: u32, bake: u64, plan: &[(u32, u32)]) -> v1::Rollout {
        v1::Rollout {
            wave: 0,
            id: Some(7),
            min_healthy: Fraction::new(min_healthy).unwrap(),
            max_failed,
            bake_time_s: bake,
            waves: plan
                .iter()
                .map(|&(wave, nodes)| WaveSize { wave, nodes })
                .collect(),
        }
    }

    /// A rollout of 2 + 2 + 1 nodes in waves 0, 1, 2, every manifest at version 100.
    fn three_waves(min_healthy: f64, max_failed: u32, bake: u64) -> Rollout {
        let mut r = Rollout::start(
            7,
            &policy(min_healthy, max_failed, bake, &[(0, 2), (1, 2), (2, 1)]),
            t(0),
        );
        for (node, wave) in [("a0", 0), ("b0", 0), ("a1", 1), ("b1", 1), ("a2", 2)] {
            r.join(&n(node), wave, 100);
        }
        r
    }

    fn report(r: &mut Rollout, node: &str, state: ReportState, at: u64) -> (Vec<u32>, bool) {
        r.observe(
            &n(node),
            &Observed {
                state,
                manifest_version: Some(100),
                error: Some("it broke"),
                received_at: t(at),
            },
        );
        r.step(t(at))
    }

    #[test]
    fn only_the_first_wave_is_released_at_the_start() {
        let r = three_waves(1.0, 0, 0);
        assert!(r.wave_released(0));
        assert!(!r.wave_released(1) && !r.wave_released(2));
        assert_eq!(r.state(), RolloutState::Running);
    }

    #[test]
    fn a_node_of_a_released_wave_is_served_when_it_joins_and_others_are_not() {
        let mut r = three_waves(1.0, 0, 0);
        assert!(r.join(&n("c0"), 0, 100));
        assert!(!r.join(&n("c1"), 1, 100));
    }

    #[test]
    fn the_next_wave_waits_for_every_success_under_min_healthy_one() {
        let mut r = three_waves(1.0, 0, 0);
        assert_eq!(
            report(&mut r, "a0", ReportState::Success, 5).0,
            Vec::<u32>::new()
        );
        assert_eq!(report(&mut r, "b0", ReportState::Success, 6).0, vec![1]);
        let mut released = r.members_of(&[1]);
        released.sort();
        assert_eq!(released, [n("a1"), n("b1")]);
    }

    #[test]
    fn a_success_for_another_version_does_not_count() {
        let mut r = three_waves(1.0, 0, 0);
        report(&mut r, "a0", ReportState::Success, 5);
        r.observe(
            &n("b0"),
            &Observed {
                state: ReportState::Success,
                manifest_version: Some(99),
                error: None,
                received_at: t(6),
            },
        );
        assert!(r.step(t(6)).0.is_empty());
    }

    #[test]
    fn min_healthy_below_one_lets_an_offline_node_stay_behind() {
        let mut r = three_waves(0.5, 0, 0);
        assert_eq!(report(&mut r, "a0", ReportState::Success, 5).0, vec![1]);
    }

    #[test]
    fn the_bake_time_runs_from_when_the_threshold_was_met() {
        let mut r = three_waves(1.0, 0, 60);
        report(&mut r, "a0", ReportState::Success, 5);
        report(&mut r, "b0", ReportState::Success, 10);
        assert_eq!(r.next_deadline(), Some(t(70)));
        assert!(r.step(t(69)).0.is_empty());
        assert_eq!(r.step(t(70)).0, vec![1]);
    }

    #[test]
    fn too_many_failures_halt_and_name_the_nodes() {
        let mut r = three_waves(1.0, 0, 0);
        report(&mut r, "a0", ReportState::Success, 1);
        report(&mut r, "b0", ReportState::Success, 2);
        let (released, changed) = report(&mut r, "a1", ReportState::RolledBack, 3);
        assert!(released.is_empty() && changed);
        assert_eq!(r.state(), RolloutState::Halted);
        let halt = r.saved().halt.clone().unwrap();
        assert_eq!(halt.wave, 1);
        assert_eq!(halt.nodes.len(), 1);
        assert_eq!(halt.nodes[0].node, "a1");
        assert_eq!(halt.nodes[0].state, "rolled_back");
        assert_eq!(halt.nodes[0].error.as_deref(), Some("it broke"));
        // Even with wave 1 healthy otherwise, wave 2 stays held.
        report(&mut r, "b1", ReportState::Success, 4);
        assert!(!r.wave_released(2));
        assert!(
            r.status(t(4)).waves[1]
                .waiting_for
                .clone()
                .unwrap()
                .contains("halted")
        );
    }

    #[test]
    fn max_failed_tolerates_that_many_failures() {
        let mut r = three_waves(0.5, 1, 0);
        report(&mut r, "a0", ReportState::Failed, 1);
        assert_eq!(r.state(), RolloutState::Running);
        assert_eq!(report(&mut r, "b0", ReportState::Success, 2).0, vec![1]);
    }

    #[test]
    fn a_rejection_after_the_release_counts_as_a_failure_one_before_does_not() {
        let mut r = three_waves(1.0, 0, 0);
        let rejected = |at| Observed {
            state: ReportState::Rejected,
            manifest_version: Some(50),
            error: None,
            received_at: t(at),
        };
        // Wave 1 is not released: its rejection is about something else.
        assert!(!r.observe(&n("a1"), &rejected(3)));
        assert!(r.observe(&n("a0"), &rejected(3)));
        r.step(t(3));
        assert_eq!(r.state(), RolloutState::Halted);
    }

    #[test]
    fn pause_holds_the_next_wave_until_resume() {
        let mut r = three_waves(1.0, 0, 0);
        r.act(Action::Pause, None, t(1)).unwrap();
        report(&mut r, "a0", ReportState::Success, 2);
        report(&mut r, "b0", ReportState::Success, 3);
        assert!(!r.wave_released(1));
        assert_eq!(r.state(), RolloutState::Paused);
        assert_eq!(r.act(Action::Resume, None, t(4)).unwrap(), vec![1]);
        assert_eq!(
            r.act(Action::Resume, None, t(5)),
            Err(ActionError::NothingToResume(7))
        );
    }

    #[test]
    fn resume_after_a_halt_accepts_its_failures_but_not_new_ones() {
        let mut r = three_waves(0.5, 0, 0);
        report(&mut r, "a0", ReportState::Failed, 1);
        assert_eq!(r.state(), RolloutState::Halted);
        r.act(Action::Resume, None, t(2)).unwrap();
        assert_eq!(r.state(), RolloutState::Running);
        assert_eq!(report(&mut r, "b0", ReportState::Success, 3).0, vec![1]);
        report(&mut r, "a1", ReportState::Failed, 4);
        assert_eq!(r.state(), RolloutState::Halted);
    }

    #[test]
    fn abort_releases_nothing_further_and_serves_no_late_member() {
        let mut r = three_waves(1.0, 0, 0);
        r.act(Action::Abort, None, t(1)).unwrap();
        report(&mut r, "a0", ReportState::Success, 2);
        report(&mut r, "b0", ReportState::Success, 3);
        assert!(!r.wave_released(1));
        assert!(!r.join(&n("c0"), 0, 100));
        assert_eq!(r.state(), RolloutState::Aborted);
        assert_eq!(
            r.act(Action::Promote, None, t(4)),
            Err(ActionError::Aborted(7))
        );
    }

    #[test]
    fn promote_releases_the_next_wave_or_every_wave_up_to_one() {
        let mut r = three_waves(1.0, 0, 0);
        assert_eq!(r.act(Action::Promote, None, t(1)).unwrap(), vec![1]);
        let mut r = three_waves(1.0, 0, 0);
        assert_eq!(r.act(Action::Promote, Some(2), t(1)).unwrap(), vec![1, 2]);
        assert_eq!(r.state(), RolloutState::Complete);
        assert_eq!(
            r.act(Action::Promote, None, t(2)),
            Err(ActionError::AllReleased(7))
        );
        let mut r = three_waves(1.0, 0, 0);
        assert!(matches!(
            r.act(Action::Promote, Some(5), t(1)),
            Err(ActionError::UnknownWave { wave: 5, .. })
        ));
        assert_eq!(
            r.act(Action::Promote, Some(0), t(1)),
            Err(ActionError::AlreadyReleased { id: 7, wave: 0 })
        );
    }

    #[test]
    fn promote_of_a_halted_rollout_releases_but_stays_halted() {
        let mut r = three_waves(1.0, 0, 0);
        report(&mut r, "a0", ReportState::Failed, 1);
        assert_eq!(r.act(Action::Promote, None, t(2)).unwrap(), vec![1]);
        assert_eq!(r.state(), RolloutState::Halted);
    }

    #[test]
    fn a_wave_waits_for_planned_nodes_that_have_not_arrived() {
        let mut r = Rollout::start(7, &policy(1.0, 0, 0, &[(0, 2), (1, 1)]), t(0));
        r.join(&n("a0"), 0, 100);
        assert!(report(&mut r, "a0", ReportState::Success, 1).0.is_empty());
        assert_eq!(r.status(t(1)).waves[0].pending, 1);
        r.join(&n("b0"), 0, 100);
        assert_eq!(report(&mut r, "b0", ReportState::Success, 2).0, vec![1]);
    }

    #[test]
    fn min_healthy_zero_without_bake_time_releases_every_wave_at_once() {
        let mut r = three_waves(0.0, 0, 0);
        assert_eq!(r.step(t(0)).0, vec![1, 2]);
        assert_eq!(r.state(), RolloutState::Complete);
    }

    #[test]
    fn the_saved_state_restores_the_same_rollout() {
        let mut r = three_waves(1.0, 0, 30);
        report(&mut r, "a0", ReportState::Success, 1);
        report(&mut r, "b0", ReportState::Success, 2);
        let json = serde_json::to_string(r.saved()).unwrap();
        let mut back = Rollout::restore(serde_json::from_str(&json).unwrap());
        for (node, wave) in [("a0", 0), ("b0", 0), ("a1", 1), ("b1", 1), ("a2", 2)] {
            back.join(&n(node), wave, 100);
        }
        // What the report database says is taken in before the first step.
        for node in ["a0", "b0"] {
            back.observe(
                &n(node),
                &Observed {
                    state: ReportState::Success,
                    manifest_version: Some(100),
                    error: None,
                    received_at: t(2),
                },
            );
        }
        assert!(back.step(t(3)).0.is_empty());
        assert_eq!(back.next_deadline(), Some(t(32)));
        assert_eq!(back.step(t(32)).0, vec![1]);
    }

    #[test]
    fn the_status_says_what_each_wave_waits_for() {
        let mut r = three_waves(1.0, 0, 0);
        report(&mut r, "a0", ReportState::Success, 1);
        let s = r.status(t(1));
        assert_eq!(s.state, RolloutState::Running);
        assert_eq!(
            (s.waves[0].healthy, s.waves[0].pending, s.waves[0].needed),
            (1, 1, 2)
        );
        assert!(
            s.waves[0]
                .waiting_for
                .as_deref()
                .unwrap()
                .contains("1 more success")
        );
        assert!(!s.waves[1].released);
        assert!(s.waves[1].waiting_for.is_some());
    }
}
