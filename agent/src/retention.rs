//! Generation retention and garbage collection (docs/protocol.md §7.14). Each roost-managed
//! profile keeps its current generation, the generations of the booted and running systems,
//! a pending one, and the last `keep_generations` that passed their health checks; the other
//! `LINK-N-link` symlinks are removed (what `nix-env --delete-generations` does), so a
//! garbage collection can free their closures. The store is collected when its free space
//! falls below `gc_min_free`, or after every deploy when configured.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use roost_common::Timestamp;
use roost_common::nix::profiles::{self, Generation};
use serde::{Deserialize, Serialize};

/// The systems the machine booted and runs now, whose generations are never removed.
pub const PROTECTED_LINKS: [&str; 2] = ["/run/booted-system", "/run/current-system"];

/// What a profile must keep besides its current generation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keep {
    /// Store paths whose generations stay (the booted and running systems).
    pub targets: Vec<PathBuf>,
    /// Generations a deploy in progress needs.
    pub pending: Vec<u64>,
    /// Generations that passed their health checks, oldest first.
    pub healthy: Vec<u64>,
    /// How many of those stay.
    pub keep_generations: usize,
}

/// The last garbage collection, as `status` and the metrics show it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcRecord {
    /// When it ran.
    pub at: Timestamp,
    /// Bytes Nix said it freed.
    pub freed_bytes: u64,
    /// Generations removed before it.
    pub generations_removed: u64,
}

/// The generations of `gens` to remove.
pub fn plan(gens: &[Generation], current: Option<u64>, keep: &Keep) -> Vec<u64> {
    let existing: BTreeSet<u64> = gens.iter().map(|g| g.number).collect();
    let mut kept: BTreeSet<u64> = current.into_iter().collect();
    kept.extend(keep.pending.iter().copied());
    kept.extend(
        gens.iter()
            .filter(|g| keep.targets.contains(&g.target))
            .map(|g| g.number),
    );
    let healthy: BTreeSet<u64> = keep
        .healthy
        .iter()
        .copied()
        .filter(|g| existing.contains(g))
        .collect();
    kept.extend(healthy.iter().rev().take(keep.keep_generations));
    gens.iter()
        .map(|g| g.number)
        .filter(|n| !kept.contains(n))
        .collect()
}

/// The store paths of the systems the machine booted and runs.
pub fn protected_targets() -> Vec<PathBuf> {
    PROTECTED_LINKS
        .iter()
        .filter_map(|l| std::fs::canonicalize(l).ok())
        .collect()
}

/// Removes the generations of `link` that `keep` does not hold; returns their numbers.
pub fn prune(link: &Path, keep: &Keep) -> io::Result<Vec<u64>> {
    let gens = profiles::generations(link)?;
    let current = profiles::current(link)?.map(|g| g.number);
    let doomed = plan(&gens, current, keep);
    for g in gens.iter().filter(|g| doomed.contains(&g.number)) {
        match std::fs::remove_file(&g.link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{}: {e}", g.link.display()),
                ));
            }
        }
    }
    if !doomed.is_empty() {
        tracing::info!(profile = %link.display(), removed = ?doomed, "removed old generations");
    }
    Ok(doomed)
}

/// Free bytes for unprivileged use on the file system of the store (`/nix/store`, else
/// `/nix`, else `/`); none when it cannot be asked.
pub fn store_free_bytes() -> Option<u64> {
    let store = ["/nix/store", "/nix", "/"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("/");
    match ::nix::sys::statvfs::statvfs(store) {
        Ok(s) => Some(s.blocks_available().saturating_mul(s.fragment_size())),
        Err(e) => {
            tracing::warn!("cannot check free space on {store}: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gens(targets: &[&str]) -> Vec<Generation> {
        targets
            .iter()
            .enumerate()
            .map(|(i, t)| Generation {
                number: i as u64 + 1,
                link: PathBuf::from(format!("/p/system-{}-link", i + 1)),
                target: PathBuf::from(t),
            })
            .collect()
    }

    #[test]
    fn keeps_current_booted_pending_and_the_last_healthy_ones() {
        let g = gens(&["/a", "/b", "/c", "/d", "/e", "/f", "/g"]);
        let keep = Keep {
            targets: vec![PathBuf::from("/b")],
            pending: vec![],
            healthy: vec![1, 2, 3, 4, 5, 6],
            keep_generations: 2,
        };
        // Current 7 (not yet healthy), booted 2, healthy 5 and 6.
        assert_eq!(plan(&g, Some(7), &keep), vec![1, 3, 4]);
        let keep = Keep {
            pending: vec![3],
            ..keep
        };
        assert_eq!(plan(&g, Some(7), &keep), vec![1, 4]);
    }

    #[test]
    fn healthy_generations_that_are_gone_do_not_count() {
        let g = gens(&["/a", "/b", "/c"]);
        let keep = Keep {
            healthy: vec![1, 2, 40, 41],
            keep_generations: 2,
            ..Keep::default()
        };
        assert_eq!(plan(&g, Some(3), &keep), Vec::<u64>::new());
    }

    #[test]
    fn generations_not_known_healthy_go_once_past_the_current() {
        let g = gens(&["/a", "/b", "/c"]);
        let keep = Keep {
            keep_generations: 5,
            ..Keep::default()
        };
        assert_eq!(plan(&g, Some(3), &keep), vec![1, 2]);
    }

    #[test]
    fn prune_removes_only_the_links_of_dropped_generations() {
        let d = tempfile::tempdir().unwrap();
        let link = d.path().join("system");
        for n in 1..=4 {
            std::os::unix::fs::symlink(
                format!("/nix/store/0123456789abcdfghijklmnpqrsvwx{n:02}-s"),
                d.path().join(format!("system-{n}-link")),
            )
            .unwrap();
        }
        profiles::switch_to(&link, 4).unwrap();
        let keep = Keep {
            healthy: vec![2, 3, 4],
            keep_generations: 2,
            ..Keep::default()
        };
        assert_eq!(prune(&link, &keep).unwrap(), vec![1, 2]);
        let left: Vec<u64> = profiles::generations(&link)
            .unwrap()
            .iter()
            .map(|g| g.number)
            .collect();
        assert_eq!(left, vec![3, 4]);
        assert_eq!(profiles::current(&link).unwrap().unwrap().number, 4);
    }
}
