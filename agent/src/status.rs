//! `roost-agent status`: where this node stands, as one typed document ([`StatusDoc`]).
//! The running daemon serves it on `agent.sock` (deploy state from `state.json`, the last and
//! next poll from its live view); when no daemon runs it is made from `state.json` and
//! `status.json` (there `last_poll.at` is when the poll result last changed, since idle polls
//! write nothing).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use roost_common::nix::profiles;
use roost_common::time::human_duration;
use roost_common::wire::v1::{Manifest, Source};
use roost_common::{ProfileName, StorePath, Timestamp, Version};
use serde::{Deserialize, Serialize};

use crate::activate::default_profile_path;
use crate::gate::WaitKind;
use crate::laptop;
use crate::reboot::{self, Running};
use crate::retention::GcRecord;
use crate::state::{DeployRecord, Pending, Phase, RefusedManifest, Snapshot, StateDir};

/// Where this node stands: what `roost-agent status --json` prints, and what the daemon's
/// status socket serves (the CLI reads it back as this type).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusDoc {
    /// The node the desired manifest is for.
    pub node: Option<String>,
    /// The state folder.
    pub state_dir: PathBuf,
    /// Whether a daemon answered on the status socket.
    pub daemon_running: bool,
    /// The daemon's phase (only while it runs).
    pub phase: Option<Phase>,
    /// The desired manifest's version.
    pub manifest_version: Option<Version>,
    /// The version deployed and confirmed.
    pub current_version: Option<Version>,
    /// The highest version ever accepted.
    pub floor: Option<Version>,
    /// The desired manifest's `issued_at`.
    pub issued_at: Option<Timestamp>,
    /// The desired manifest's `expires_at`.
    pub expires_at: Option<Timestamp>,
    /// Where the desired manifest came from.
    pub source: Option<Source>,
    /// Each desired profile's position.
    pub profiles: Vec<ProfileView>,
    /// The last poll (in `status.json`: the last one that changed something).
    pub last_poll: Option<LastPoll>,
    /// When the next poll is due; while a poll is in flight, when that one began.
    pub next_poll: Option<Timestamp>,
    /// When the poll in flight began (none: between polls).
    pub polling_since: Option<Timestamp>,
    /// Consecutive failed polls.
    pub poll_failures: u32,
    /// Whether the coordinator holds polls open.
    pub long_poll: bool,
    /// The last deploy attempt's outcome.
    pub last_deploy: Option<DeployRecord>,
    /// A deploy in progress or interrupted.
    pub pending: Option<Pending>,
    /// Sequence numbers of reports not yet delivered.
    pub pending_reports: Vec<u64>,
    /// Versions that failed here.
    pub quarantined: BTreeSet<u64>,
    /// The last manifest this node refused, and why.
    #[serde(default)]
    pub last_refused: Option<RefusedManifest>,
    /// At the last poll that reached a coordinator, it had no manifest for this node.
    #[serde(default)]
    pub coordinator_has_no_manifest: bool,
    /// What the desired version waits for (a window, power, a metered network, the user's
    /// deferral), with the time left as of this document.
    #[serde(default)]
    pub waiting: Option<WaitingView>,
    /// The user's deferral (`roost-agent defer`), while it lasts.
    #[serde(default)]
    pub deferred_until: Option<Timestamp>,
    /// The applied system is not fully in use until the next boot (§7.16).
    #[serde(default)]
    pub needs_reboot: bool,
    /// Why: installed for the next boot, kernel changed, a switch inhibitor, …
    #[serde(default)]
    pub reboot_reasons: Vec<String>,
    /// The last garbage collection.
    #[serde(default)]
    pub last_gc: Option<GcRecord>,
}

/// Why the desired version waits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingView {
    /// The version that waits.
    pub version: u64,
    /// `window`, `power`, `metered` or `defer`.
    pub kind: WaitKind,
    /// When the wait ends by itself, when known.
    pub until: Option<Timestamp>,
    /// For people: `waiting for window Mon-Fri 12:00-13:00 (opens in 3h12m)`.
    pub message: String,
}

/// One desired profile: its link, where it points, and whether that is the desired path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileView {
    /// The profile.
    pub name: ProfileName,
    /// Its link.
    pub profile_path: PathBuf,
    /// The store path its current generation points at.
    pub current: Option<String>,
    /// Its current generation.
    pub generation: Option<u64>,
    /// The desired store path.
    pub desired: StorePath,
    /// Whether current is desired.
    pub up_to_date: bool,
}

/// A poll and what it brought.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastPoll {
    /// When it ended.
    pub at: Option<Timestamp>,
    /// `not modified`, `new manifest`, `failed: …`.
    pub result: String,
}

fn profile_views(desired: Option<&Manifest>) -> Vec<ProfileView> {
    let Some(m) = desired else {
        return Vec::new();
    };
    m.profiles
        .iter()
        .map(|p| {
            let link = default_profile_path(p);
            let cur = profiles::current(&link).ok().flatten();
            ProfileView {
                name: p.name.clone(),
                up_to_date: cur.as_ref().is_some_and(|g| g.target == p.path.as_path()),
                current: cur.as_ref().map(|g| g.target.display().to_string()),
                generation: cur.as_ref().map(|g| g.number),
                desired: p.path.clone(),
                profile_path: link,
            }
        })
        .collect()
}

/// The status of the state folder `dir`, with the daemon's live view when it runs (`live`),
/// else what `status.json` last recorded.
pub fn document(dir: &Path, live: Option<Snapshot>) -> anyhow::Result<StatusDoc> {
    let sd = StateDir::new(dir);
    let state = sd.load()?;
    let running = live.is_some();
    let snap = live.or_else(|| sd.load_snapshot());
    let snap = snap.as_ref();
    let desired = state.desired.as_ref();
    let now = Timestamp::now();
    let waiting = state
        .laptop
        .waiting
        .as_ref()
        .filter(|w| desired.map(|m| m.version.0) == Some(w.version))
        .filter(|_| state.current_version != desired.map(|m| m.version))
        .map(|w| WaitingView {
            version: w.version,
            kind: w.kind,
            until: w.until,
            message: w.message(now),
        });
    let reboot_reasons = state
        .applied
        .as_ref()
        .map(|m| reboot::manifest_reasons(m, &Running::default()))
        .unwrap_or_default();
    Ok(StatusDoc {
        waiting,
        deferred_until: laptop::read_defer(dir).filter(|t| *t > now),
        needs_reboot: !reboot_reasons.is_empty(),
        reboot_reasons,
        last_gc: state.laptop.last_gc,
        node: desired.map(|m| m.node.to_string()),
        state_dir: dir.to_owned(),
        daemon_running: running,
        phase: snap.map(|s| s.phase).filter(|_| running),
        manifest_version: desired.map(|m| m.version),
        current_version: state.current_version,
        floor: state.floor.map(|f| f.version),
        issued_at: desired.map(|m| m.issued_at),
        expires_at: desired.map(|m| m.expires_at),
        source: desired.and_then(|m| m.source.clone()),
        profiles: profile_views(desired),
        last_poll: snap.and_then(|s| {
            s.last_poll_result.as_ref().map(|r| LastPoll {
                at: s.last_poll_at,
                result: r.clone(),
            })
        }),
        // While a poll is in flight (a held long-poll mostly is) the next poll is that one.
        next_poll: snap
            .and_then(|s| s.polling_since.or(s.next_poll_at))
            .filter(|_| running),
        polling_since: snap.and_then(|s| s.polling_since).filter(|_| running),
        poll_failures: snap.map_or(0, |s| s.failures),
        long_poll: snap.is_some_and(|s| s.long_poll),
        last_deploy: state.last_deploy,
        pending: state.pending,
        pending_reports: sd.queued_reports().into_iter().map(|(s, _)| s).collect(),
        quarantined: state.quarantined,
        last_refused: sd.load_refused(),
        coordinator_has_no_manifest: snap.is_some_and(|s| s.no_manifest),
    })
}

/// Asks the running daemon for the status document. `Ok(None)`: no daemon runs.
pub fn from_daemon(dir: &Path) -> anyhow::Result<Option<StatusDoc>> {
    use std::io::Read;
    let path = StateDir::new(dir).socket();
    let mut s = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            anyhow::bail!(
                "{}: {e}: the status socket is only for root (mode 0600); run this as root",
                path.display()
            )
        }
        Err(_) => return Ok(None),
    };
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    Ok(serde_json::from_slice(&buf).ok())
}

/// The status document: the running daemon's, else made from the state folder.
pub fn collect(dir: &Path) -> anyhow::Result<StatusDoc> {
    match from_daemon(dir)? {
        Some(doc) => Ok(doc),
        None => document(dir, None),
    }
}

fn ago(t: Option<Timestamp>) -> String {
    match t {
        Some(t) => {
            let now = Timestamp::now();
            if t > now {
                format!(
                    "in {}",
                    human_duration(Duration::from_secs(t.secs_since(now)))
                )
            } else {
                format!(
                    "{} ago",
                    human_duration(Duration::from_secs(now.secs_since(t)))
                )
            }
        }
        None => "-".into(),
    }
}

fn or_dash<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn list(items: impl IntoIterator<Item = u64>) -> String {
    items
        .into_iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The status for people.
pub fn render(doc: &StatusDoc) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "node            {}", or_dash(doc.node.as_ref()));
    let _ = writeln!(
        o,
        "manifest        version {} (running {}), expires {}",
        or_dash(doc.manifest_version),
        or_dash(doc.current_version),
        or_dash(doc.expires_at)
    );
    if doc.daemon_running {
        let phase = doc.phase.map(Phase::as_str);
        let _ = writeln!(o, "daemon          running, {}", or_dash(phase));
    } else {
        let _ = writeln!(
            o,
            "daemon          not running (state folder {})",
            doc.state_dir.display()
        );
    }
    match &doc.last_poll {
        None => {
            let _ = writeln!(o, "last poll       none recorded");
        }
        Some(p) => {
            let _ = writeln!(o, "last poll       {}: {}", ago(p.at), p.result);
        }
    }
    if let Some(since) = doc.polling_since {
        let held = if doc.long_poll {
            " (held open by the coordinator until a new manifest or the wait ends)"
        } else {
            ""
        };
        let _ = writeln!(
            o,
            "next poll       in flight, began {}{held}",
            ago(Some(since))
        );
    } else if let Some(next) = doc.next_poll {
        let _ = writeln!(o, "next poll       {}", ago(Some(next)));
    }
    match &doc.last_deploy {
        None => {
            let _ = writeln!(o, "last deploy     none yet");
        }
        Some(d) => {
            let _ = writeln!(
                o,
                "last deploy     {} of version {} ({})",
                d.state.as_str(),
                or_dash(d.version),
                ago(Some(d.at))
            );
            if let Some(e) = &d.error {
                let _ = writeln!(o, "                {}: {}", e.phase, e.message);
            }
        }
    }
    if let Some(w) = &doc.waiting {
        let _ = writeln!(o, "WAITING         version {}: {}", w.version, w.message);
    } else if let Some(t) = doc.deferred_until {
        let _ = writeln!(
            o,
            "deferred        by the user until {t} ({})",
            ago(Some(t))
        );
    }
    if doc.needs_reboot {
        let installed = doc
            .reboot_reasons
            .iter()
            .any(|r| r.contains("installed for the next boot"));
        let what = if installed {
            "is installed, active after the next boot"
        } else {
            "runs, and needs a reboot to be fully in use"
        };
        let _ = writeln!(
            o,
            "REBOOT          version {} {what}",
            or_dash(doc.current_version)
        );
        for r in &doc.reboot_reasons {
            let _ = writeln!(o, "                {r}");
        }
    }
    match &doc.last_gc {
        Some(g) => {
            let _ = writeln!(
                o,
                "last GC         {} freed, {} old generation(s) removed ({})",
                roost_common::size::human_bytes(g.freed_bytes),
                g.generations_removed,
                ago(Some(g.at))
            );
        }
        None => {
            let _ = writeln!(o, "last GC         none yet");
        }
    }
    if doc.coordinator_has_no_manifest {
        let _ = writeln!(
            o,
            "NO MANIFEST     the coordinator has no manifest for this node: nothing is deployed \
             until one is published for its name (is it in the flake's deploy.nodes?)"
        );
    }
    if let Some(r) = &doc.last_refused {
        let version = r
            .claimed_version
            .map_or(String::new(), |v| format!(" version {v}"));
        let _ = writeln!(
            o,
            "last refused    manifest{version} ({}): {}: {}",
            ago(Some(r.at)),
            r.code,
            r.message
        );
    }
    if let Some(p) = &doc.pending {
        let _ = writeln!(
            o,
            "PENDING         deploy of version {} in progress or interrupted",
            p.version
        );
    }
    let q = list(doc.quarantined.iter().copied());
    let _ = writeln!(
        o,
        "quarantined     {}",
        if q.is_empty() { "none".into() } else { q }
    );
    let r = list(doc.pending_reports.iter().copied());
    let _ = writeln!(
        o,
        "queued reports  {}",
        if r.is_empty() {
            "none".into()
        } else {
            format!("seq {r}")
        }
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<12} {:<5} {:<9} CURRENT / DESIRED",
        "PROFILE", "GEN", "STATE"
    );
    for p in &doc.profiles {
        let ok = if p.up_to_date { "current" } else { "BEHIND" };
        let _ = writeln!(
            o,
            "{:<12} {:<5} {:<9} {}",
            p.name.as_str(),
            or_dash(p.generation),
            ok,
            or_dash(p.current.as_ref())
        );
        if !p.up_to_date {
            let _ = writeln!(o, "{:<12} {:<5} {:<9} {}", "", "", "", p.desired);
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(polling_since: Option<Timestamp>, next_poll: Option<Timestamp>) -> StatusDoc {
        StatusDoc {
            node: Some("pi".into()),
            state_dir: "/var/lib/roost".into(),
            daemon_running: true,
            phase: Some(Phase::Idle),
            manifest_version: None,
            current_version: None,
            floor: None,
            issued_at: None,
            expires_at: None,
            source: None,
            profiles: vec![],
            last_poll: None,
            next_poll,
            polling_since,
            poll_failures: 0,
            long_poll: true,
            last_deploy: None,
            pending: None,
            pending_reports: vec![],
            quarantined: BTreeSet::new(),
            waiting: None,
            deferred_until: None,
            needs_reboot: false,
            reboot_reasons: vec![],
            last_gc: None,
            last_refused: None,
            coordinator_has_no_manifest: false,
        }
    }

    #[test]
    fn a_wait_a_pending_reboot_and_the_last_gc_are_shown() {
        let mut d = doc(None, None);
        d.waiting = Some(WaitingView {
            version: 7,
            kind: WaitKind::Window,
            until: None,
            message: "waiting for window Mon-Fri 12:00-13:00 (opens in 3h12m)".into(),
        });
        d.needs_reboot = true;
        d.reboot_reasons = vec!["kernel changed: /nix/store/a (booted) -> /nix/store/b".into()];
        d.current_version = Some(Version(7));
        d.last_gc = Some(GcRecord {
            at: Timestamp::now(),
            freed_bytes: 3 << 30,
            generations_removed: 2,
        });
        let out = render(&d);
        assert!(
            out.contains(
                "WAITING         version 7: waiting for window Mon-Fri 12:00-13:00 (opens in 3h12m)"
            ),
            "{out}"
        );
        assert!(
            out.contains("version 7 runs, and needs a reboot to be fully in use"),
            "{out}"
        );
        assert!(
            out.contains("                kernel changed: /nix/store/a (booted) -> /nix/store/b"),
            "{out}"
        );
        assert!(
            out.contains("3.0 GiB freed, 2 old generation(s) removed"),
            "{out}"
        );
    }

    #[test]
    fn a_refused_manifest_and_a_missing_one_are_said_plainly() {
        let mut d = doc(None, None);
        d.coordinator_has_no_manifest = true;
        d.last_refused = Some(RefusedManifest {
            at: Timestamp::now(),
            code: "expired".into(),
            message: "manifest expired at 2026-11-01T00:00:00Z".into(),
            claimed_version: Some(12),
        });
        let out = render(&d);
        assert!(
            out.contains("NO MANIFEST     the coordinator has no manifest"),
            "{out}"
        );
        assert!(
            out.contains(
                "last refused    manifest version 12 (0 seconds ago): expired: manifest expired"
            ),
            "{out}"
        );
        assert!(!render(&doc(None, None)).contains("refused"));
    }

    #[test]
    fn a_poll_in_flight_is_shown_as_such_not_as_a_due_time() {
        let t = Timestamp::now();
        let out = render(&doc(Some(t), Some(t)));
        assert!(out.contains("next poll       in flight, began"), "{out}");
        assert!(out.contains("held open by the coordinator"), "{out}");
    }

    #[test]
    fn between_polls_the_due_time_is_shown() {
        let later = Timestamp::from(std::time::SystemTime::now() + Duration::from_secs(300));
        let out = render(&doc(None, Some(later)));
        assert!(
            out.contains("next poll       in 4 min") || out.contains("next poll       in 5 min"),
            "{out}"
        );
        assert!(!out.contains("in flight"), "{out}");
    }

    #[test]
    fn the_document_reads_back_as_itself() {
        let d = doc(None, Some(Timestamp::now()));
        let text = serde_json::to_vec(&d).unwrap();
        assert_eq!(serde_json::from_slice::<StatusDoc>(&text).unwrap(), d);
    }
}
