//! The agent's one folder (default `/var/lib/roost`). Every write is temp file + fsync +
//! rename + fsync of the folder.
//!
//! ```text
//! state.json                 floor, trusted-now, ETag, desired manifest, pending deploy,
//!                            quarantine, last deploy outcome
//! status.json                the daemon's last poll/next poll/phase, rewritten only on change
//! node.key                   the node's signing key (0600), made on first start
//! agent.sock                 the running daemon answers status queries here
//! reports/queue/NNNNNNNNNN.json   signed report envelopes not yet delivered, by seq
//! reports/last-sent          the highest seq delivered
//! reports/refused/           reports a coordinator refused for good (kept for inspection)
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use roost_common::verify::Floor;
use roost_common::wire::v1::{Manifest, Profile, ReportError, ReportState};
use roost_common::{SecretKey, Timestamp, Version};
use serde::{Deserialize, Serialize};

/// What is remembered across restarts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct State {
    /// Highest version ever accepted (and its payload digest).
    pub floor: Option<Floor>,
    /// Newest `issued_at` seen: the trusted now never goes below it.
    pub newest_issued_at: Option<Timestamp>,
    /// ETag of the accepted manifest, for conditional GETs.
    pub etag: Option<String>,
    /// The accepted manifest: what the node should run.
    pub desired: Option<Manifest>,
    /// The version last deployed and confirmed.
    pub current_version: Option<Version>,
    /// The manifest of that version: how its profiles are activated, for a later rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<Manifest>,
    /// A deploy in progress (steps 5–7); its presence at start means a crash mid-deploy.
    pub pending: Option<Pending>,
    /// Versions that failed here; not retried until a newer one arrives.
    #[serde(default)]
    pub quarantined: BTreeSet<u64>,
    /// The last deploy attempt's outcome.
    pub last_deploy: Option<DeployRecord>,
    /// Waiting, healthy generations, the last GC, counters (docs/protocol.md §7.13–§7.15).
    #[serde(flatten)]
    pub laptop: crate::laptop::LaptopRecord,
    /// A reboot the agent started (§7.16), saved before it ran the reboot command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot: Option<RebootRecord>,
}

/// A reboot the agent asked for: what it rebooted into, and the lease it holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RebootRecord {
    /// The applied version that needed it.
    pub version: Version,
    /// The system it should come back on.
    pub system: String,
    /// The boot id before the reboot.
    pub boot_id: String,
    /// The reboot lease taken for it (none on a static host).
    pub lease: Option<String>,
    /// When the reboot command ran.
    pub at: Timestamp,
    /// For the second reboot, back onto the previous generation: why the first one failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolling_back: Option<String>,
}

/// The record of the last refused manifest, in the state folder.
pub const REFUSED_FILE: &str = "refused-manifest.json";

/// A manifest the node refused (`refused-manifest.json`, which `roost-agent status` shows):
/// kept out of `state.json`, which a refused manifest never changes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RefusedManifest {
    /// When.
    pub at: Timestamp,
    /// The refusal's code (`bad_signature`, `expired`, `below_floor`, …).
    pub code: String,
    /// Why, in words.
    pub message: String,
    /// The version the envelope claims, read without trusting it (it was refused).
    pub claimed_version: Option<u64>,
}

/// A deploy in progress.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Pending {
    /// The manifest version being deployed.
    pub version: Version,
    /// Confirmation must be done by then, or the deploy is rolled back.
    pub deadline: Timestamp,
    /// When the switch began.
    pub started_at: Timestamp,
    /// Whether a coordinator answered just before the switch (magic rollback's baseline).
    #[serde(default)]
    pub coordinator_reachable_before: bool,
    /// Per profile, in order.
    pub profiles: Vec<PendingProfile>,
}

/// One profile of a pending deploy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PendingProfile {
    /// The profile's name.
    pub name: String,
    /// Its link.
    pub profile_path: PathBuf,
    /// The exact generation to return to (none: the profile did not exist).
    pub previous_generation: Option<u64>,
    /// That generation's store path.
    pub previous_path: Option<String>,
    /// How the previous generation is activated again on rollback: its profile in the
    /// manifest that deployed it, when roost did (else the new profile's settings are used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_spec: Option<Profile>,
    /// The new store path.
    pub new_path: String,
    /// What the profile link itself pointed at before (restored on rollback when it was not
    /// a generation, e.g. a hand-made link straight into the store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_link: Option<PathBuf>,
    /// The generation this deploy made, once the profile was switched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_generation: Option<u64>,
    /// Whether the profile link may have been switched: set and saved before `nix-env --set`
    /// runs (recovery then asks the profile itself whether it moved).
    pub switched: bool,
    /// Whether its activation finished successfully.
    pub activated: bool,
    /// The activation running for it, so recovery can stop one the agent left behind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<ActivationHandle>,
}

/// A running activation: its process group (with the leader's start time, so a reused pid
/// is never killed) or its transient systemd unit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ActivationHandle {
    /// Process group id (= the leader's pid).
    pub pgid: i32,
    /// The leader's start time in clock ticks since boot (`/proc/PID/stat` field 22).
    pub start_ticks: Option<u64>,
    /// The boot it ran in (a reboot ends every process group).
    #[serde(default)]
    pub boot_id: String,
    /// The transient unit, when it ran under systemd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

/// What the agent is doing, as `status` and systemd's `STATUS=` show it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Between deploys.
    #[default]
    #[serde(rename = "idle")]
    Idle,
    /// Realising closures.
    #[serde(rename = "downloading")]
    Downloading,
    /// Switching profiles and running activations.
    #[serde(rename = "activating")]
    Activating,
    /// Running health checks.
    #[serde(rename = "confirming")]
    Confirming,
    /// Going back to the previous generations.
    #[serde(rename = "rolling back")]
    RollingBack,
    /// Finishing a deploy a crash interrupted.
    #[serde(rename = "recovering")]
    Recovering,
    /// Collecting garbage to make room or after a deploy (§7.14).
    #[serde(rename = "collecting garbage")]
    CollectingGarbage,
}

impl Phase {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Downloading => "downloading",
            Phase::Activating => "activating",
            Phase::Confirming => "confirming",
            Phase::RollingBack => "rolling back",
            Phase::Recovering => "recovering",
            Phase::CollectingGarbage => "collecting garbage",
        }
    }
}

/// What `status` shows of the daemon besides `state.json`: its live view, served on
/// `agent.sock` and mirrored to `status.json` whenever it changes (an idle poll changes
/// only times, which are not written).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    /// The daemon's pid.
    pub pid: u32,
    /// What it is doing.
    pub phase: Phase,
    /// When the last poll ended (in `status.json`: the last poll that changed something, as
    /// a successful poll after a successful poll is not written).
    pub last_poll_at: Option<Timestamp>,
    /// What the last poll brought.
    pub last_poll_result: Option<String>,
    /// When the next poll is due.
    pub next_poll_at: Option<Timestamp>,
    /// Consecutive failed polls.
    pub failures: u32,
    /// Whether the coordinator holds polls open.
    pub long_poll: bool,
    /// When the poll in flight began (none: between polls). A held long-poll is in flight
    /// most of the time.
    #[serde(default)]
    pub polling_since: Option<Timestamp>,
    /// At the last poll that reached a coordinator, it had no manifest for this node.
    #[serde(default)]
    pub no_manifest: bool,
}

/// The outcome of a deploy attempt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeployRecord {
    /// The version tried.
    pub version: Option<Version>,
    /// `success`, `failed`, `rolled_back`, `deferred` or `rejected`.
    pub state: ReportState,
    /// What went wrong.
    pub error: Option<ReportError>,
    /// When.
    pub at: Timestamp,
    /// The report that told the coordinator (none: not queued yet).
    #[serde(default)]
    pub report_seq: Option<u64>,
}

/// The state folder's lock, released on drop.
#[derive(Debug)]
pub struct StateLock(#[allow(dead_code)] ::nix::fcntl::Flock<std::fs::File>);

/// The state folder.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

fn io_err(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

pub use roost_common::fs::write_atomic;

impl StateDir {
    /// The folder (created on first write).
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
        }
    }

    /// Its path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn state_file(&self) -> PathBuf {
        self.root.join("state.json")
    }

    /// The report queue folder.
    pub fn queue_dir(&self) -> PathBuf {
        self.root.join("reports/queue")
    }

    /// Where refused reports are kept.
    pub fn refused_dir(&self) -> PathBuf {
        self.root.join("reports/refused")
    }

    fn last_sent_file(&self) -> PathBuf {
        self.root.join("reports/last-sent")
    }

    fn snapshot_file(&self) -> PathBuf {
        self.root.join("status.json")
    }

    /// Reads `status.json`, if the daemon ever wrote one.
    pub fn load_snapshot(&self) -> Option<Snapshot> {
        let b = std::fs::read(self.snapshot_file()).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// The last manifest refused, if any was.
    pub fn load_refused(&self) -> Option<RefusedManifest> {
        let b = std::fs::read(self.root.join(REFUSED_FILE)).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// Records the last manifest refused, atomically.
    pub fn save_refused(&self, r: &RefusedManifest) -> std::io::Result<()> {
        let mut bytes = serde_json::to_vec_pretty(r).expect("a refusal serialises");
        bytes.push(b'\n');
        write_atomic(&self.root.join(REFUSED_FILE), &bytes)
    }

    /// Writes `status.json` atomically.
    pub fn save_snapshot(&self, s: &Snapshot) -> std::io::Result<()> {
        let mut bytes = serde_json::to_vec_pretty(s).expect("a snapshot serialises");
        bytes.push(b'\n');
        write_atomic(&self.snapshot_file(), &bytes)
    }

    /// The live daemon's socket.
    pub fn socket(&self) -> PathBuf {
        self.root.join("agent.sock")
    }

    /// Takes the folder's lock (`lock`, held until the value is dropped): one agent process
    /// at a time changes a node. Fails at once when another holds it.
    pub fn lock(&self) -> std::io::Result<StateLock> {
        std::fs::create_dir_all(&self.root).map_err(|e| io_err(&self.root, e))?;
        let path = self.root.join("lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        match ::nix::fcntl::Flock::lock(f, ::nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(StateLock(l)),
            Err((_, ::nix::errno::Errno::EWOULDBLOCK)) => Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                format!(
                    "another roost-agent is using {} (stop the daemon first, e.g. `systemctl stop roost-agent`)",
                    self.root.display()
                ),
            )),
            Err((_, e)) => Err(io_err(&path, e.into())),
        }
    }

    /// Reads `state.json` (empty state when missing).
    pub fn load(&self) -> std::io::Result<State> {
        match std::fs::read(self.state_file()) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", self.state_file().display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(io_err(&self.state_file(), e)),
        }
    }

    /// Writes `state.json` atomically.
    pub fn save(&self, s: &State) -> std::io::Result<()> {
        let mut bytes = serde_json::to_vec_pretty(s).expect("state serialises");
        bytes.push(b'\n');
        write_atomic(&self.state_file(), &bytes)
    }

    /// The node key, generated (0600) on first use.
    pub fn node_key(&self, node: &str) -> std::io::Result<SecretKey> {
        let path = self.root.join("node.key");
        match SecretKey::read_file(&path) {
            Ok(k) => Ok(k),
            Err(roost_common::KeyError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                std::fs::create_dir_all(&self.root).map_err(|e| io_err(&self.root, e))?;
                let k =
                    SecretKey::generate(node).map_err(|e| std::io::Error::other(e.to_string()))?;
                k.write_new_file(&path)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                Ok(k)
            }
            Err(e) => Err(std::io::Error::other(e.to_string())),
        }
    }

    /// Queued report files, oldest first: (seq, path).
    pub fn queued_reports(&self) -> Vec<(u64, PathBuf)> {
        let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(self.queue_dir())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let name = e.file_name().to_str()?.to_owned();
                        let seq = name.strip_suffix(".json")?.parse().ok()?;
                        Some((seq, e.path()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The next report number: above every queued and every sent report.
    pub fn next_seq(&self) -> u64 {
        let sent = std::fs::read_to_string(self.last_sent_file())
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let queued = self.queued_reports().last().map(|(s, _)| *s).unwrap_or(0);
        sent.max(queued) + 1
    }

    /// Queues a signed report envelope under its seq.
    pub fn queue_report(&self, seq: u64, envelope: &[u8]) -> std::io::Result<()> {
        write_atomic(&self.queue_dir().join(format!("{seq:010}.json")), envelope)
    }

    /// Marks `seq` delivered: remembered as the last sent, then removed from the queue.
    pub fn report_delivered(&self, seq: u64, path: &Path) -> std::io::Result<()> {
        write_atomic(&self.last_sent_file(), format!("{seq}\n").as_bytes())?;
        std::fs::remove_file(path).map_err(|e| io_err(path, e))
    }

    /// Moves a report a coordinator refused for good out of the queue.
    pub fn report_refused(&self, seq: u64, path: &Path) -> std::io::Result<()> {
        let dir = self.refused_dir();
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        write_atomic(&self.last_sent_file(), format!("{seq}\n").as_bytes())?;
        let to = dir.join(format!("{seq:010}.json"));
        std::fs::rename(path, &to).map_err(|e| io_err(&to, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_a_missing_file_is_empty() {
        let d = tempfile::tempdir().unwrap();
        let sd = StateDir::new(&d.path().join("state"));
        assert_eq!(sd.load().unwrap(), State::default());
        let mut s = State::default();
        s.quarantined.insert(7);
        s.etag = Some("\"x\"".into());
        sd.save(&s).unwrap();
        assert_eq!(sd.load().unwrap(), s);
        let leftovers: Vec<_> = std::fs::read_dir(sd.root())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temp files left behind");
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("state.json"), "{garbage").unwrap();
        let e = StateDir::new(d.path()).load().unwrap_err().to_string();
        assert!(e.contains("state.json"), "{e}");
    }

    #[test]
    fn the_node_key_is_made_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let sd = StateDir::new(d.path());
        let a = sd.node_key("pi-kitchen").unwrap();
        let b = sd.node_key("pi-kitchen").unwrap();
        assert_eq!(a.public().to_string(), b.public().to_string());
        let mode = std::fs::metadata(d.path().join("node.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn report_seqs_keep_increasing_across_delivery() {
        let d = tempfile::tempdir().unwrap();
        let sd = StateDir::new(d.path());
        assert_eq!(sd.next_seq(), 1);
        sd.queue_report(1, b"a").unwrap();
        sd.queue_report(2, b"b").unwrap();
        assert_eq!(sd.next_seq(), 3);
        for (seq, path) in sd.queued_reports() {
            sd.report_delivered(seq, &path).unwrap();
        }
        assert!(sd.queued_reports().is_empty());
        assert_eq!(sd.next_seq(), 3, "a delivered seq was handed out again");
        sd.queue_report(3, b"c").unwrap();
        let (seq, path) = sd.queued_reports().pop().unwrap();
        sd.report_refused(seq, &path).unwrap();
        assert_eq!(sd.next_seq(), 4);
        assert!(sd.refused_dir().join("0000000003.json").exists());
    }

    #[test]
    fn queued_reports_sort_by_number_not_by_name() {
        let d = tempfile::tempdir().unwrap();
        let sd = StateDir::new(d.path());
        for seq in [10_000_000_000u64, 9, 10] {
            sd.queue_report(seq, b"x").unwrap();
        }
        let seqs: Vec<u64> = sd.queued_reports().into_iter().map(|(s, _)| s).collect();
        assert_eq!(seqs, vec![9, 10, 10_000_000_000]);
    }

    #[test]
    fn only_one_process_holds_the_lock() {
        let d = tempfile::tempdir().unwrap();
        let sd = StateDir::new(d.path());
        let held = sd.lock().unwrap();
        // flock is per open file description: a second open in this process conflicts too.
        let e = sd.lock().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        assert!(e.to_string().contains("another roost-agent"), "{e}");
        drop(held);
        sd.lock().unwrap();
    }
}
