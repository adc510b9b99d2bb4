//! The rollout document (`GET /v1/rollout`, docs/protocol.md §6.9): where the coordinator's
//! current rollout stands, wave by wave. The coordinator writes it, `roost-coordinator
//! rollout status` reads it back, and the operator's actions answer with it.

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// `GET /v1/rollout` and the answer to every action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutDoc {
    /// The current rollout; `null` before the first gated publish.
    pub rollout: Option<RolloutStatus>,
}

/// One rollout: a publish released wave by wave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// The publish (`rollout.id` of its manifests).
    pub id: u64,
    /// Where it stands.
    pub state: RolloutState,
    /// When its first manifest arrived.
    pub started_at: Timestamp,
    /// The policy its manifests carry.
    pub policy: Policy,
    /// Every wave, lowest first.
    pub waves: Vec<WaveStatus>,
    /// Set while an operator's pause holds (also when halted or aborted meanwhile).
    pub paused: bool,
    /// Why it halted, while it is halted.
    pub halt: Option<Halt>,
    /// When an operator aborted it.
    pub aborted_at: Option<Timestamp>,
}

/// The policy of a rollout (`roost.rollout` in the flake).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Fraction of a wave that must report `success`.
    pub min_healthy: f64,
    /// Failures a wave may have before the rollout halts.
    pub max_failed: u32,
    /// Seconds `min_healthy` must hold before the next wave.
    pub bake_time_s: u64,
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Releasing waves as they become healthy.
    Running,
    /// An operator paused it: nothing further is released until `resume`.
    Paused,
    /// A wave had more failures than `max_failed`: nothing further is released until an
    /// operator resumes, promotes or aborts.
    Halted,
    /// An operator aborted it: nothing further is ever released.
    Aborted,
    /// Every wave is released.
    Complete,
}

impl RolloutState {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Halted => "halted",
            RolloutState::Aborted => "aborted",
            RolloutState::Complete => "complete",
        }
    }
}

/// One wave of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveStatus {
    /// The wave number.
    pub wave: u32,
    /// Its nodes: the publish's count, or more when more arrived.
    pub nodes: u32,
    /// How many of their manifests the coordinator holds.
    pub uploaded: u32,
    /// Whether its nodes are served their new manifest.
    pub released: bool,
    /// When it was released.
    pub released_at: Option<Timestamp>,
    /// Nodes that reported `success` for this publish.
    pub healthy: u32,
    /// Nodes that reported `failed`, `rolled_back` or `rejected` since the release.
    pub failed: u32,
    /// Nodes with neither.
    pub pending: u32,
    /// Failures an operator's `resume` accepted (they no longer count toward a halt).
    pub forgiven: u32,
    /// How many `success` reports the next wave waits for.
    pub needed: u32,
    /// Since when `needed` has held (the bake time runs from here).
    pub threshold_met_at: Option<Timestamp>,
    /// What the next step waits for, in words; `null` when nothing.
    pub waiting_for: Option<String>,
}

/// Why a rollout halted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Halt {
    /// When.
    pub at: Timestamp,
    /// The wave whose failures did it.
    pub wave: u32,
    /// In words.
    pub reason: String,
    /// The failed nodes and what they said.
    pub nodes: Vec<FailedNode>,
}

/// A node that failed in a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedNode {
    /// The node.
    pub node: String,
    /// Its report's state (`failed`, `rolled_back`, `rejected`).
    pub state: String,
    /// Its report's error message, when it had one.
    pub error: Option<String>,
}

/// An operator's action: `POST /v1/rollout/ACTION`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Release nothing further until `resume`.
    Pause,
    /// Undo a pause, and accept a halt's failures: only further failures halt again.
    Resume,
    /// Release nothing further, ever.
    Abort,
    /// Release the next wave (or every wave up to `wave`) now, whatever the policy says.
    Promote,
}

impl Action {
    /// Every action, for usage messages.
    pub const ALL: [Action; 4] = [
        Action::Pause,
        Action::Resume,
        Action::Abort,
        Action::Promote,
    ];

    /// The URL segment.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Abort => "abort",
            Action::Promote => "promote",
        }
    }
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("`{s}` is not a rollout action (pause, resume, abort, promote)"))
    }
}

/// The body of `POST /v1/rollout/promote` (optional; other actions take none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PromoteRequest {
    /// Release every wave up to this one; absent: the next wave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<u32>,
}

/// A node's place in the current rollout: `rollout` of a node in `GET /v1/fleet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRollout {
    /// The rollout (`rollout.id` of its newest manifest).
    pub id: u64,
    /// Its wave.
    pub wave: u32,
    /// The version of its manifest of this rollout.
    pub version: u64,
    /// Whether its wave is released (false: it is served the manifest it had before).
    pub released: bool,
    /// What its reports said about that version.
    pub outcome: NodeOutcome,
}

/// What a node's reports said about its manifest of the rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeOutcome {
    /// Nothing yet.
    Pending,
    /// `success` for that version.
    Healthy,
    /// `failed`, `rolled_back`, or `rejected` after its release.
    Failed,
}

impl NodeOutcome {
    /// Every outcome, for metrics.
    pub const ALL: [NodeOutcome; 3] = [
        NodeOutcome::Pending,
        NodeOutcome::Healthy,
        NodeOutcome::Failed,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeOutcome::Pending => "pending",
            NodeOutcome::Healthy => "healthy",
            NodeOutcome::Failed => "failed",
        }
    }
}

impl RolloutState {
    /// Every state, for metrics.
    pub const ALL: [RolloutState; 5] = [
        RolloutState::Running,
        RolloutState::Paused,
        RolloutState::Halted,
        RolloutState::Aborted,
        RolloutState::Complete,
    ];
}

/// `wave 2 of rollout 100: version 100 held back` — the node detail of `status NODE` and
/// of the dashboard.
impl std::fmt::Display for NodeRollout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "wave {} of rollout {}: version {} ",
            self.wave, self.id, self.version
        )?;
        match self.released {
            false => write!(f, "held back until its wave is released"),
            true => write!(f, "released, {}", self.outcome.as_str()),
        }
    }
}
