//! What the agent asks of Nix, as a trait: the real driver is `roost_common::nix::Nix` (the
//! one door), and [`FakeNix`] is an in-memory store so the state machine can be tested
//! without root, a store or a cache.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::sync::Mutex;

use roost_common::StorePath;
use roost_common::nix::{Nix, NixError, NixErrorKind, PathInfo, RealiseOptions, profiles};

/// The Nix operations of a deploy (DESIGN §7 steps 4 and 6).
pub trait NixOps: Send + Sync + fmt::Debug {
    /// `nix-store --realise` from exactly the given substituters and keys, killable by
    /// `opts.timeout`.
    fn realise(&self, paths: &[StorePath], opts: &RealiseOptions) -> Result<(), NixError>;
    /// `nix path-info` of valid local paths (invalid ones are left out).
    fn path_info(&self, paths: &[StorePath]) -> Result<Vec<PathInfo>, NixError>;
    /// `nix-env -p PROFILE --set PATH`: a new generation.
    fn set_profile(&self, profile: &Path, path: &StorePath) -> Result<(), NixError>;
    /// Bytes a garbage collection would free now (the NAR sizes of the dead paths).
    fn reclaimable(&self) -> Result<u64, NixError>;
    /// Collects garbage; returns the bytes freed.
    fn collect_garbage(&self) -> Result<u64, NixError>;
    /// Invocations so far, by command.
    fn counts(&self) -> BTreeMap<String, u64>;
}

impl NixOps for Nix {
    fn realise(&self, paths: &[StorePath], opts: &RealiseOptions) -> Result<(), NixError> {
        Nix::realise(self, paths, opts).map(drop)
    }

    fn path_info(&self, paths: &[StorePath]) -> Result<Vec<PathInfo>, NixError> {
        Nix::path_info(self, paths, None, false)
    }

    fn set_profile(&self, profile: &Path, path: &StorePath) -> Result<(), NixError> {
        Nix::set_profile(self, profile, path)
    }

    fn reclaimable(&self) -> Result<u64, NixError> {
        let dead = self.dead_paths()?;
        let mut bytes = 0;
        // Bounded argument lists: a big store can have many thousands of dead paths.
        for chunk in dead.chunks(500) {
            bytes += Nix::path_info(self, chunk, None, false)?
                .iter()
                .map(|i| i.nar_size)
                .sum::<u64>();
        }
        Ok(bytes)
    }

    fn collect_garbage(&self) -> Result<u64, NixError> {
        Nix::collect_garbage(self)
    }

    fn counts(&self) -> BTreeMap<String, u64> {
        Nix::counts(self)
    }
}

#[derive(Debug, Default)]
struct FakeStore {
    /// What the binary cache holds: path → NAR hash.
    cache: BTreeMap<StorePath, String>,
    /// Paths valid in the "local store".
    valid: BTreeSet<StorePath>,
    /// Substituter lists seen by `realise`, in order.
    realised_with: Vec<RealiseOptions>,
    counts: BTreeMap<String, u64>,
    /// How many of the next `path_info` calls fail.
    path_info_failures: u32,
}

/// An in-memory Nix for tests: a cache to substitute from, a set of valid paths, and real
/// profile generations (`PROFILE-N-link` symlinks) written the way `nix-env --set` does.
#[derive(Debug, Default)]
pub struct FakeNix {
    store: Mutex<FakeStore>,
}

fn fake_error(argv: &str, message: String) -> NixError {
    NixError {
        argv: argv.split(' ').map(str::to_owned).collect(),
        status: Some(1),
        stderr_tail: message,
        kind: NixErrorKind::Failed,
    }
}

impl FakeNix {
    /// An empty store and cache.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut FakeStore) -> T) -> T {
        let mut s = self.store.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s)
    }

    /// Puts `path` with NAR hash `nar_hash` into the cache.
    pub fn add_to_cache(&self, path: &StorePath, nar_hash: &str) {
        self.with(|s| s.cache.insert(path.clone(), nar_hash.to_owned()));
    }

    /// Whether `path` is valid in the local store.
    pub fn is_valid(&self, path: &StorePath) -> bool {
        self.with(|s| s.valid.contains(path))
    }

    /// The next `n` `path_info` calls fail as a Nix that cannot be run would.
    pub fn fail_path_info(&self, n: u32) {
        self.with(|s| s.path_info_failures = n);
    }

    /// The options of every `realise` call so far.
    pub fn realise_calls(&self) -> Vec<RealiseOptions> {
        self.with(|s| s.realised_with.clone())
    }

    fn count(s: &mut FakeStore, what: &str) {
        *s.counts.entry(what.to_owned()).or_default() += 1;
    }
}

impl NixOps for FakeNix {
    fn realise(&self, paths: &[StorePath], opts: &RealiseOptions) -> Result<(), NixError> {
        self.with(|s| {
            Self::count(s, "nix-store --realise");
            s.realised_with.push(opts.clone());
            for p in paths {
                if s.valid.contains(p) {
                    continue;
                }
                if opts.substituters.is_empty() || !s.cache.contains_key(p) {
                    return Err(fake_error(
                        "nix-store --realise",
                        format!("error: path '{p}' is required, but there is no substituter that can build it"),
                    ));
                }
                s.valid.insert(p.clone());
            }
            Ok(())
        })
    }

    fn path_info(&self, paths: &[StorePath]) -> Result<Vec<PathInfo>, NixError> {
        self.with(|s| {
            Self::count(s, "nix path-info");
            if s.path_info_failures > 0 {
                s.path_info_failures -= 1;
                return Err(fake_error(
                    "nix path-info",
                    "error: cannot connect to socket at '/nix/var/nix/daemon-socket/socket'".into(),
                ));
            }
            Ok(paths
                .iter()
                .filter(|p| s.valid.contains(*p))
                .map(|p| PathInfo {
                    path: p.clone(),
                    nar_hash: s.cache.get(p).cloned().unwrap_or_default(),
                    nar_size: 1,
                    closure_size: None,
                    deriver: None,
                    references: vec![],
                    signatures: vec![],
                })
                .collect())
        })
    }

    fn set_profile(&self, profile: &Path, path: &StorePath) -> Result<(), NixError> {
        self.with(|s| Self::count(s, "nix-env"));
        if !self.is_valid(path) {
            return Err(fake_error(
                "nix-env --set",
                format!("error: path '{path}' is not valid"),
            ));
        }
        let io = |e: std::io::Error| fake_error("nix-env --set", e.to_string());
        let next = profiles::generations(profile)
            .map_err(io)?
            .last()
            .map_or(1, |g| g.number + 1);
        let name = profile
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("profile");
        let dir = profile.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io)?;
        std::os::unix::fs::symlink(path.as_path(), dir.join(format!("{name}-{next}-link")))
            .map_err(io)?;
        profiles::switch_to(profile, next).map_err(io)
    }

    fn reclaimable(&self) -> Result<u64, NixError> {
        self.with(|s| Self::count(s, "nix-store --gc --print-dead"));
        Ok(0)
    }

    fn collect_garbage(&self) -> Result<u64, NixError> {
        self.with(|s| Self::count(s, "nix-store --gc"));
        Ok(0)
    }

    fn counts(&self) -> BTreeMap<String, u64> {
        self.with(|s| s.counts.clone())
    }
}
