//! Version 1 of the manifest and report payloads (docs/protocol.md §4 and §5), and in
//! [`http`] the HTTP contract that carries them.
//!
//! Optional fields default to deploy-rs's values; unknown fields are ignored so that newer
//! publishers stay readable; unknown activation or health-check kinds are refused.

use serde::{Deserialize, Serialize};

use crate::keys::PublicKey;
use crate::names::{NodeName, ProfileName, ProfilePath, StorePath, Version};
use crate::schedule::Window;
use crate::time::Timestamp;

pub mod http;
pub mod lease;
pub mod rollout;

/// The only manifest and report format this module reads and writes.
pub const FORMAT: u64 = 1;

/// One node's desired state, signed by the publisher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: u64,
    /// The node this manifest is for.
    pub node: NodeName,
    /// The Nix system the closures are built for (`x86_64-linux`, ...).
    pub system: String,
    /// Strictly increasing per node.
    pub version: Version,
    /// When the publisher signed it.
    pub issued_at: Timestamp,
    /// After this the agent refuses it.
    pub expires_at: Timestamp,
    /// Where it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// Binary caches the node may substitute from, with their keys.
    #[serde(default)]
    pub substituters: Vec<Substituter>,
    /// The key the node signs its reports with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_key: Option<PublicKey>,
    /// Profiles to apply, in order.
    pub profiles: Vec<Profile>,
    /// Rollout hints.
    #[serde(default)]
    pub rollout: Rollout,
}

/// The flake a manifest was published from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Source {
    /// The flake reference, as locked.
    pub flake: String,
    /// The revision, when the flake is in a repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    /// Whether the tree had uncommitted changes.
    #[serde(default)]
    pub dirty: bool,
}

/// A binary cache and the keys its narinfo files are signed with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Substituter {
    /// A Nix store URL.
    pub url: String,
    /// Nix public keys (`name:base64`).
    #[serde(default)]
    pub public_keys: Vec<String>,
}

/// One profile of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// The profile's name.
    pub name: ProfileName,
    /// The store path the profile should point at.
    pub path: StorePath,
    /// `sha256-…` of the path's NAR, checked after realisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nar_hash: Option<String>,
    /// Bytes of the whole closure, checked against free space before realisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closure_size: Option<u64>,
    /// The derivation, for nodes allowed to build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drv_path: Option<StorePath>,
    /// Who the profile belongs to and who runs its activation.
    #[serde(default = "default_user")]
    pub user: String,
    /// Where the profile link lives; defaults follow deploy-rs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_path: Option<ProfilePath>,
    /// How to activate it.
    #[serde(default)]
    pub activation: Activation,
    /// Hard limit for activation, in seconds.
    #[serde(default = "default_activation_timeout")]
    pub activation_timeout_s: u64,
    /// Time allowed for confirmation after activation, in seconds.
    #[serde(default = "default_confirm_timeout")]
    pub confirm_timeout_s: u64,
    /// Roll back on failure.
    #[serde(default = "default_true")]
    pub auto_rollback: bool,
    /// Roll back when the coordinator becomes unreachable after the switch.
    #[serde(default = "default_true")]
    pub magic_rollback: bool,
    /// Checks that must pass to confirm.
    #[serde(default)]
    pub health_checks: Vec<HealthCheck>,
    /// When the node may switch to it, node local time; empty: any time. A node's own
    /// `apply_windows` wins over these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apply_windows: Vec<Window>,
    /// Whether the node may reboot by itself when this profile needs it (`nixos` only).
    #[serde(default, skip_serializing_if = "RebootPolicy::is_never")]
    pub reboot: RebootPolicy,
    /// When a `window` reboot may happen, node local time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reboot_windows: Vec<Window>,
}

/// When a node reboots by itself into a system that needs it (docs/protocol.md §7.16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RebootPolicy {
    /// Never: `needs_reboot` is only reported.
    #[default]
    Never,
    /// Inside one of the profile's `reboot_windows`.
    Window,
    /// As soon as the deploy is otherwise confirmed.
    Auto,
}

impl RebootPolicy {
    /// The flake and wire word.
    pub fn as_str(self) -> &'static str {
        match self {
            RebootPolicy::Never => "never",
            RebootPolicy::Window => "window",
            RebootPolicy::Auto => "auto",
        }
    }

    /// Whether it is the default, `never`.
    pub fn is_never(&self) -> bool {
        *self == RebootPolicy::Never
    }
}

fn default_user() -> String {
    "root".to_owned()
}
fn default_activation_timeout() -> u64 {
    240
}
fn default_confirm_timeout() -> u64 {
    30
}
fn default_true() -> bool {
    true
}

/// How a profile is activated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Activation {
    /// `<path>/bin/switch-to-configuration <goal>`.
    Nixos {
        /// What switch-to-configuration does.
        #[serde(default)]
        goal: Goal,
    },
    /// `<path>/deploy-rs-activate` with `PROFILE` set.
    DeployRs,
    /// `argv`, with `argv[0]` relative to the profile's path.
    Command {
        /// Program (relative to the store path) and arguments.
        argv: Vec<String>,
    },
    /// Only the profile link changes.
    #[default]
    None,
}

/// switch-to-configuration's goal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Goal {
    /// Activate now and make it the boot default.
    #[default]
    Switch,
    /// Make it the boot default only.
    Boot,
    /// Activate now without changing the boot default.
    Test,
}

impl Goal {
    /// The word switch-to-configuration takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Goal::Switch => "switch",
            Goal::Boot => "boot",
            Goal::Test => "test",
        }
    }
}

/// A check that must pass before a deploy is confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum HealthCheck {
    /// A command that must exit 0.
    Command {
        /// Program and arguments (looked up in `PATH`).
        argv: Vec<String>,
        /// Limit in seconds.
        #[serde(default = "default_check_timeout")]
        timeout_s: u64,
    },
    /// An HTTP GET that must answer 2xx.
    Http {
        /// The URL.
        url: String,
        /// Limit in seconds.
        #[serde(default = "default_check_timeout")]
        timeout_s: u64,
    },
}

fn default_check_timeout() -> u64 {
    30
}

impl HealthCheck {
    /// A short name for reports: `command:systemctl`, `http:http://…`.
    pub fn name(&self) -> String {
        match self {
            HealthCheck::Command { argv, .. } => {
                format!("command:{}", argv.first().map(String::as_str).unwrap_or(""))
            }
            HealthCheck::Http { url, .. } => format!("http:{url}"),
        }
    }

    /// Its time limit in seconds.
    pub fn timeout_s(&self) -> u64 {
        match self {
            HealthCheck::Command { timeout_s, .. } | HealthCheck::Http { timeout_s, .. } => {
                *timeout_s
            }
        }
    }
}

/// A manifest's place in a rollout (docs/protocol.md §6.9): its wave, the publish it
/// belongs to, and that publish's policy and plan, the same in every manifest of one publish.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Rollout {
    /// Lower waves go first.
    #[serde(default)]
    pub wave: u32,
    /// The publish this manifest is part of (its base version); absent: not gated, a
    /// coordinator serves it at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// The fraction of a wave's nodes that must report `success` before the next wave.
    #[serde(default)]
    pub min_healthy: Fraction,
    /// The most nodes of a wave that may fail before the rollout halts.
    #[serde(default)]
    pub max_failed: u32,
    /// Seconds the wave must stay above `min_healthy` before the next one is released.
    #[serde(default)]
    pub bake_time_s: u64,
    /// How many nodes the publish has in each wave, lowest wave first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waves: Vec<WaveSize>,
}

/// One wave of a publish and how many nodes it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveSize {
    /// The wave.
    pub wave: u32,
    /// Nodes published in it.
    pub nodes: u32,
}

/// A number from 0 to 1 (`min_healthy`); anything else is refused when read.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
#[serde(transparent)]
pub struct Fraction(f64);

impl Fraction {
    /// The whole: 1.0.
    pub const ONE: Fraction = Fraction(1.0);

    /// `f` when it is a number from 0 to 1.
    pub fn new(f: f64) -> Option<Self> {
        (f.is_finite() && (0.0..=1.0).contains(&f)).then_some(Self(f))
    }

    /// The value.
    pub fn get(self) -> f64 {
        self.0
    }

    /// How many of `n` this fraction asks for, rounded up (0.5 of 3 is 2).
    pub fn of(self, n: u32) -> u32 {
        // A hair below the product, so 0.3 of 10 is 3 despite binary floating point.
        let want = self.0 * f64::from(n) - 1e-9;
        (want.ceil().max(0.0) as u32).min(n)
    }
}

impl Default for Fraction {
    fn default() -> Self {
        Self::ONE
    }
}

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let f = f64::deserialize(d)?;
        Fraction::new(f)
            .ok_or_else(|| serde::de::Error::custom(format!("{f} is not a fraction from 0 to 1")))
    }
}

/// What a node reports after each attempt (DESIGN §6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Always [`FORMAT`].
    pub format: u64,
    /// The reporting node.
    pub node: NodeName,
    /// Strictly increasing per node.
    pub seq: u64,
    /// When the node made the report.
    pub sent_at: Timestamp,
    /// The kernel's boot id, to tell reboots apart.
    #[serde(default)]
    pub boot_id: String,
    /// The agent's version.
    #[serde(default)]
    pub agent_version: String,
    /// The manifest version this report is about, if any.
    #[serde(default)]
    pub manifest_version: Option<Version>,
    /// Where the node stands.
    pub state: ReportState,
    /// Per-profile positions.
    #[serde(default)]
    pub profiles: Vec<ProfileStatus>,
    /// `/run/booted-system`, when there is one.
    #[serde(default)]
    pub booted_system: Option<String>,
    /// What went wrong, if anything.
    #[serde(default)]
    pub error: Option<ReportError>,
    /// Health check results of the last confirmation.
    #[serde(default)]
    pub health: Vec<HealthResult>,
    /// Phase durations in milliseconds.
    #[serde(default)]
    pub timings_ms: Timings,
    /// Refused forgeries, replays and the like, since the last report.
    #[serde(default)]
    pub security_events: Vec<String>,
    /// The node's public key, so a coordinator can pin it on first use when the manifest
    /// names no `node_key` (an addition to DESIGN §6; readers ignore it otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_key: Option<PublicKey>,
    /// The node's system is not fully in use until the next boot (docs/protocol.md §7.16).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub needs_reboot: bool,
    /// Why it needs a reboot, for people: installed for the next boot, kernel changed, …
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reboot_reasons: Vec<String>,
    /// For `deferred`: when the wait ends by itself (a window opens, a deferral ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferred_until: Option<Timestamp>,
    /// Bytes the garbage collection of this deploy freed, when one ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gc_freed_bytes: Option<u64>,
    /// Old generations removed by retention in this deploy, when any were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generations_removed: Option<u64>,
}

/// The states a report can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportState {
    /// Nothing to do.
    Idle,
    /// Realising closures.
    Downloading,
    /// Running activation.
    Activating,
    /// Running health checks.
    Confirming,
    /// The desired version is active and confirmed.
    Success,
    /// Failed and not rolled back.
    Failed,
    /// Failed and rolled back to the previous generation.
    RolledBack,
    /// Postponed (e.g. not enough disk space, or quarantined).
    Deferred,
    /// The manifest was refused.
    Rejected,
}

impl ReportState {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReportState::Idle => "idle",
            ReportState::Downloading => "downloading",
            ReportState::Activating => "activating",
            ReportState::Confirming => "confirming",
            ReportState::Success => "success",
            ReportState::Failed => "failed",
            ReportState::RolledBack => "rolled_back",
            ReportState::Deferred => "deferred",
            ReportState::Rejected => "rejected",
        }
    }
}

/// A profile's position in a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileStatus {
    /// The profile.
    pub name: ProfileName,
    /// What the profile points at now.
    pub current: Option<String>,
    /// Its generation number.
    pub generation: Option<u64>,
    /// What the manifest wants.
    pub desired: Option<String>,
}

/// What failed, in which phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportError {
    /// `verify`, `realise`, `activate`, `confirm`, `rollback`, ...
    pub phase: String,
    /// Human text.
    pub message: String,
}

/// One health check's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthResult {
    /// e.g. `command:systemctl`.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// Output or reason, shortened.
    #[serde(default)]
    pub detail: String,
}

/// Phase durations in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Timings {
    /// Manifest fetch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch: Option<u64>,
    /// Closure realisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realise: Option<u64>,
    /// Activation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activate: Option<u64>,
    /// Confirmation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_design_example_parses_with_its_defaults() {
        let json = r#"{
          "format": 1, "node": "pi-kitchen", "system": "aarch64-linux",
          "version": 1795349047123, "issued_at": "2026-11-22T12:00:00Z",
          "expires_at": "2026-12-22T12:00:00Z", "some_future_field": [1, 2],
          "profiles": [ { "name": "system",
             "path": "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-pi-kitchen",
             "activation": { "kind": "nixos", "goal": "switch" },
             "health_checks": [ { "kind": "http", "url": "http://127.0.0.1:8080/healthz", "timeout_s": 10 } ] } ] }"#;
        let m: Manifest = serde_json::from_str(json).unwrap();
        let p = &m.profiles[0];
        assert_eq!(p.user, "root");
        assert_eq!(p.activation_timeout_s, 240);
        assert_eq!(p.confirm_timeout_s, 30);
        assert!(p.auto_rollback && p.magic_rollback);
        assert_eq!(p.activation, Activation::Nixos { goal: Goal::Switch });
        assert_eq!(m.rollout.wave, 0);
        assert_eq!(m.rollout.id, None);
        assert_eq!(m.rollout.min_healthy, Fraction::ONE);
    }

    #[test]
    fn min_healthy_outside_zero_to_one_is_refused() {
        for bad in ["1.5", "-0.1"] {
            let e = serde_json::from_str::<Rollout>(&format!(r#"{{"min_healthy": {bad}}}"#))
                .unwrap_err();
            assert!(e.to_string().contains("not a fraction"), "{bad}: {e}");
        }
        let r: Rollout = serde_json::from_str(r#"{"wave": 2, "min_healthy": 0.5}"#).unwrap();
        assert_eq!((r.wave, r.min_healthy.get()), (2, 0.5));
    }

    #[test]
    fn a_fraction_of_a_wave_rounds_up() {
        let f = |x| Fraction::new(x).unwrap();
        assert_eq!(f(0.5).of(3), 2);
        assert_eq!(f(0.3).of(10), 3);
        assert_eq!(f(1.0).of(7), 7);
        assert_eq!(f(0.0).of(7), 0);
        assert_eq!(f(0.01).of(1), 1);
    }

    #[test]
    fn report_states_use_snake_case() {
        assert_eq!(
            serde_json::to_string(&ReportState::RolledBack).unwrap(),
            "\"rolled_back\""
        );
        assert_eq!(ReportState::RolledBack.as_str(), "rolled_back");
    }
}
