//! The agent's typed errors: why it could not start, why a deploy step failed (each names the
//! step a report's `error.phase` carries), and why a rollback could not be done. Their
//! `Display` is the message reports and `status` show.

use std::path::PathBuf;

use roost_common::nix::NixError;
use roost_common::size::human_bytes;
use roost_common::{StorePath, Version};

/// A step of a deploy, as reports and the deploy record name it (`error.phase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The manifest was refused, or expired before it was deployed.
    Verify,
    /// The closures could not be fetched or built (deferred).
    Realise,
    /// The realised paths are not what the publisher signed.
    VerifyClosure,
    /// The pending record could not be written.
    Record,
    /// `nix-env --set` failed.
    SetProfile,
    /// An activation failed.
    Activate,
    /// Health checks or magic rollback failed.
    Confirm,
    /// A deploy interrupted by a crash was found at start.
    Recover,
    /// The operator's `roost-agent rollback`.
    ManualRollback,
    /// Waiting for an apply window (deferred, §7.13).
    Window,
    /// Waiting for mains power or a fuller battery (deferred).
    Power,
    /// Waiting for an unmetered network (deferred).
    Metered,
    /// Postponed by the user's `roost-agent defer` (deferred).
    Defer,
    /// The machine did not come back healthy on the system it rebooted into (§7.16).
    Reboot,
}

impl Step {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Verify => "verify",
            Step::Realise => "realise",
            Step::VerifyClosure => "verify-closure",
            Step::Record => "record",
            Step::SetProfile => "set-profile",
            Step::Activate => "activate",
            Step::Confirm => "confirm",
            Step::Recover => "recover",
            Step::Reboot => "reboot",
            Step::ManualRollback => "manual-rollback",
            Step::Window => "window",
            Step::Power => "power",
            Step::Metered => "metered",
            Step::Defer => "defer",
        }
    }
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

/// Why the closures could not be made present (step 4): the deploy is deferred and retried.
#[derive(Debug, thiserror::Error)]
pub enum RealiseError {
    /// The store's file system has too little free space, even counting what a garbage
    /// collection would free (after retention, §7.14).
    #[error(
        "the store has {free} bytes free ({}) and the closures need up to {need} ({}); a \
         garbage collection could free only {reclaimable} ({}) after removing {removed} old \
         generation(s): free some space and the deploy is retried",
        human_bytes(*free), human_bytes(*need), human_bytes(*reclaimable)
    )]
    NoSpace {
        /// Bytes free.
        free: u64,
        /// Bytes the missing closures need at most.
        need: u64,
        /// Bytes a garbage collection would free.
        reclaimable: u64,
        /// Generations retention removed first.
        removed: u64,
    },
    /// A garbage collection ran and the closures still do not fit.
    #[error(
        "after a garbage collection the store has {free} bytes free ({}) and the closures \
         need up to {need} ({}): free some space and the deploy is retried",
        human_bytes(*free), human_bytes(*need)
    )]
    StillNoSpace {
        /// Bytes free after it.
        free: u64,
        /// Bytes the missing closures need at most.
        need: u64,
    },
    /// Counting what a garbage collection frees, or collecting, failed.
    #[error("garbage collection: {0}")]
    Gc(NixError),
    /// Build policy `build` and a profile without `drv_path`.
    #[error("build policy `build` needs a drv_path for every profile; the manifest lacks some")]
    NoDrvPath,
    /// Nix could not realise the paths.
    #[error("{0}")]
    Nix(NixError),
    /// Substitution failed, and building from `drv_path` too.
    #[error("{substitute}\nbuilding from drv_path instead also failed: {build}")]
    BuildToo {
        /// Why substitution failed.
        substitute: Box<NixError>,
        /// Why the build failed.
        build: Box<NixError>,
    },
    /// The blocking task running Nix died.
    #[error("the Nix task stopped: {0}")]
    Task(String),
}

/// Why the realised closures are not what the manifest signed (the version is quarantined).
#[derive(Debug, thiserror::Error)]
pub enum ClosureError {
    /// A path's NAR hash differs from the manifest's.
    #[error("{path}: NAR hash {found} does not match the manifest's {want}")]
    Mismatch {
        /// The profile path.
        path: StorePath,
        /// Its hash in the store.
        found: String,
        /// The manifest's.
        want: String,
    },
    /// A path is still not in the store.
    #[error("{0} is not valid after realisation")]
    NotValid(StorePath),
    /// `nix path-info` failed.
    #[error("{0}")]
    Nix(NixError),
    /// The blocking task running Nix died.
    #[error("the Nix task stopped: {0}")]
    Task(String),
}

/// Why a deploy that had begun switching failed: it is rolled back (auto_rollback) and
/// the version quarantined.
#[derive(Debug, thiserror::Error)]
pub enum DeployFailure {
    /// `nix-env --set` failed for a profile.
    #[error("profile `{profile}` ({}): {message}", link.display())]
    SetProfile {
        /// The profile.
        profile: String,
        /// Its link.
        link: PathBuf,
        /// What Nix said.
        message: String,
    },
    /// An activation failed, timed out or could not start (described by the activation).
    #[error("{0}")]
    Activation(String),
    /// Health checks failed within the confirm timeout.
    #[error("health check(s) failed within {confirm_s} s: {failing}")]
    Health {
        /// The confirm timeout.
        confirm_s: u64,
        /// The failing checks and why.
        failing: String,
    },
    /// Magic rollback: a coordinator answered before the switch and not after it.
    #[error(
        "magic rollback: the coordinator answered before the switch and not \
         within {confirm_s} s after it"
    )]
    Unreachable {
        /// The confirm timeout.
        confirm_s: u64,
    },
    /// The deploy's progress could not be saved: it is stopped and rolled back rather than
    /// go on with a record a crash would be recovered from wrongly.
    #[error("cannot record {what} in the state folder: {source}")]
    Save {
        /// What was to be recorded.
        what: &'static str,
        /// Why the write failed.
        source: std::io::Error,
    },
    /// Confirmation after a restart of the agent failed.
    #[error("after a restart of the agent: {0}")]
    AfterRestart(Box<DeployFailure>),
    /// The agent stopped mid-deploy and recovery cannot confirm it.
    #[error("{0}")]
    Interrupted(&'static str),
    /// An activation's unit was stopped before it ended (a shutdown, or by hand): no
    /// verdict; recovery decides.
    #[error("the activation of profile `{0}` was stopped before it ended")]
    ActivationStopped(String),
}

impl DeployFailure {
    /// Whether it is magic rollback's: the coordinator did not answer again after the switch.
    pub fn is_magic_rollback(&self) -> bool {
        match self {
            DeployFailure::Unreachable { .. } => true,
            DeployFailure::AfterRestart(f) => f.is_magic_rollback(),
            _ => false,
        }
    }

    /// The step it happened in.
    pub fn step(&self) -> Step {
        match self {
            DeployFailure::SetProfile { .. } => Step::SetProfile,
            DeployFailure::Save { .. } => Step::Record,
            DeployFailure::Activation(_) | DeployFailure::ActivationStopped(_) => Step::Activate,
            DeployFailure::Health { .. }
            | DeployFailure::Unreachable { .. }
            | DeployFailure::AfterRestart(_) => Step::Confirm,
            DeployFailure::Interrupted(_) => Step::Recover,
        }
    }
}

/// What a rollback of a pending deploy could not undo, per profile.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct RollbackFailed(pub Vec<String>);

/// Why an operator's rollback could not be done.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    /// A deploy is pending: recovery comes first.
    #[error("a deploy of version {0} is pending; let the agent recover it first")]
    Pending(Version),
    /// No manifest was ever applied.
    #[error("no manifest has been applied on this node; nothing to roll back")]
    NothingApplied,
    /// The profile named is not in the manifest.
    #[error("no profile `{wanted}` in the current manifest (it has: {has})")]
    UnknownProfile {
        /// The name given.
        wanted: String,
        /// The manifest's profiles, comma-separated.
        has: String,
    },
    /// Reading or switching the profile failed.
    #[error("profile `{profile}`: {source}")]
    Io {
        /// The profile.
        profile: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The profile has no generation.
    #[error("profile `{profile}` has no generation at {}", link.display())]
    NoGeneration {
        /// The profile.
        profile: String,
        /// Its link.
        link: PathBuf,
    },
    /// The profile has no generation before its current one.
    #[error("profile `{profile}` ({}) has no generation before {current}", link.display())]
    NoPrevious {
        /// The profile.
        profile: String,
        /// Its link.
        link: PathBuf,
        /// Its current generation.
        current: u64,
    },
    /// Switched back, but re-activation failed (descriptions of each failure).
    #[error("{}", .0.join("; "))]
    Activation(Vec<String>),
}
