//! What a laptop or Pi remembers (docs/protocol.md §7.13–§7.15), and `roost-agent defer`:
//! the deferral is its own file, `STATE/defer-until`, so the user can set it while the
//! daemon holds the state folder's lock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use roost_common::Timestamp;
use roost_common::time::human_duration;
use serde::{Deserialize, Serialize};

use crate::retention::GcRecord;

/// The deferral file in the state folder.
pub const DEFER_FILE: &str = "defer-until";

/// Why the desired version waits, as recorded for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    /// The version that waits.
    pub version: u64,
    /// `window`, `power`, `metered` or `defer`.
    pub kind: crate::gate::WaitKind,
    /// When the wait ends by itself, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Timestamp>,
    /// For people, without the time left (`waiting for window Mon-Fri 12:00-13:00`).
    pub summary: String,
}

impl Waiting {
    /// For people, at `now`: the summary with the time left.
    pub fn message(&self, now: Timestamp) -> String {
        crate::gate::with_time_left(self.kind, &self.summary, self.until, now)
    }
}

/// The laptop part of `state.json` (its keys sit at the top level).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaptopRecord {
    /// What the desired version waits for now (none: it does not wait).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
    /// Per profile link, the generations that passed their health checks, oldest first.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub healthy_generations: BTreeMap<PathBuf, Vec<u64>>,
    /// The last garbage collection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_gc: Option<GcRecord>,
    /// Rollbacks on this node.
    #[serde(default)]
    pub rollbacks: u64,
    /// Closure bytes realised on this node (by `closure_size`).
    #[serde(default)]
    pub fetched_bytes: u64,
}

impl LaptopRecord {
    /// Remembers `generation` of `link` as healthy (once).
    pub fn healthy(&mut self, link: &Path, generation: u64) {
        let v = self.healthy_generations.entry(link.to_owned()).or_default();
        if !v.contains(&generation) {
            v.push(generation);
            v.sort_unstable();
        }
    }
}

/// The deferral in force, if any (a missing or unreadable file is none).
pub fn read_defer(state_dir: &Path) -> Option<Timestamp> {
    std::fs::read_to_string(state_dir.join(DEFER_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// What `defer` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deferral {
    /// Until then (none: the deferral was ended).
    pub until: Option<Timestamp>,
    /// Why it is shorter than asked, when it is.
    pub cut: Option<String>,
}

/// Bounds a deferral of `asked` from `now`: at most `max`, and never past `expires_at`.
pub fn bound_defer(
    now: Timestamp,
    asked: Duration,
    max: Duration,
    expires_at: Option<Timestamp>,
) -> Deferral {
    if asked.is_zero() {
        return Deferral {
            until: None,
            cut: None,
        };
    }
    let mut until = now.plus(asked);
    let mut cut = None;
    if asked > max {
        until = now.plus(max);
        cut = Some(format!(
            "cut to the configured maximum of {} (max_defer)",
            human_duration(max)
        ));
    }
    if let Some(e) = expires_at.filter(|e| *e < until) {
        until = e;
        cut = Some(format!(
            "cut to {e}, when the desired manifest expires (a deferral never outlives it)"
        ));
    }
    Deferral {
        until: Some(until),
        cut,
    }
}

/// Writes (or, for none, removes) the deferral file.
pub fn write_defer(state_dir: &Path, until: Option<Timestamp>) -> std::io::Result<()> {
    let path = state_dir.join(DEFER_FILE);
    match until {
        Some(t) => roost_common::fs::write_atomic(&path, format!("{t}\n").as_bytes()),
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// Why `defer` did nothing.
#[derive(Debug, thiserror::Error)]
pub enum DeferError {
    /// A bad duration or configuration (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The state could not be read or the file written (exit 1).
    #[error("{0}")]
    Failed(String),
}

/// `roost-agent defer DURATION`: bounds it and writes the deferral file; returns what to
/// print.
pub fn defer_command(
    state_dir: &Path,
    duration: &str,
    max_defer: Option<&str>,
) -> Result<String, DeferError> {
    let asked = roost_common::time::parse_duration(duration).map_err(DeferError::Usage)?;
    let max = match max_defer {
        Some(s) => roost_common::time::parse_duration(s)
            .map_err(|e| DeferError::Usage(format!("max_defer: {e}")))?,
        None => crate::config::Laptop::default().max_defer,
    };
    if !state_dir.is_dir() {
        return Err(DeferError::Usage(format!(
            "no agent state at {}: check --state-dir or the config's state_dir",
            state_dir.display()
        )));
    }
    let state = crate::state::StateDir::new(state_dir)
        .load()
        .map_err(|e| DeferError::Failed(e.to_string()))?;
    let now = Timestamp::from(crate::poll::process_clock().now());
    let d = bound_defer(
        now,
        asked,
        max,
        state.desired.as_ref().map(|m| m.expires_at),
    );
    write_defer(state_dir, d.until).map_err(|e| {
        DeferError::Failed(format!("{}: {e}", state_dir.join(DEFER_FILE).display()))
    })?;
    Ok(match (d.until, d.cut) {
        (None, _) => "deferral ended: a pending deploy applies at the next check".into(),
        (Some(u), cut) => {
            let mut t = format!(
                "deploys deferred until {u} (in {})",
                crate::gate::short_duration(Duration::from_secs(u.secs_since(now)))
            );
            if let Some(c) = cut {
                t.push_str(&format!("; {c}"));
            }
            t
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Duration = Duration::from_secs(3600);

    #[test]
    fn a_deferral_is_cut_to_the_maximum_and_to_the_expiry() {
        let now = Timestamp::from_unix(1_000_000);
        let d = bound_defer(now, 4 * H, 24 * H, None);
        assert_eq!(d.until, Some(now.plus(4 * H)));
        assert_eq!(d.cut, None);
        let d = bound_defer(now, 48 * H, 24 * H, None);
        assert_eq!(d.until, Some(now.plus(24 * H)));
        assert!(d.cut.unwrap().contains("max_defer"));
        let expiry = now.plus(2 * H);
        let d = bound_defer(now, 4 * H, 24 * H, Some(expiry));
        assert_eq!(d.until, Some(expiry));
        assert!(d.cut.unwrap().contains("expires"));
        assert_eq!(bound_defer(now, Duration::ZERO, 24 * H, None).until, None);
    }

    #[test]
    fn the_defer_file_round_trips_and_zero_removes_it() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read_defer(d.path()), None);
        let t: Timestamp = "2026-12-07T12:00:00Z".parse().unwrap();
        write_defer(d.path(), Some(t)).unwrap();
        assert_eq!(read_defer(d.path()), Some(t));
        write_defer(d.path(), None).unwrap();
        assert_eq!(read_defer(d.path()), None);
        write_defer(d.path(), None).unwrap();
    }

    #[test]
    fn healthy_generations_are_kept_once_and_in_order() {
        let mut r = LaptopRecord::default();
        let l = Path::new("/nix/var/nix/profiles/system");
        r.healthy(l, 3);
        r.healthy(l, 1);
        r.healthy(l, 3);
        assert_eq!(r.healthy_generations[l], vec![1, 3]);
    }
}
