//! Whether this machine can run a test, and the one rule for when it cannot: under CI
//! (`CI=true`) a missing prerequisite **fails** the test with the reason; elsewhere the test
//! is skipped with a `SKIP` line that shows without `--nocapture`.
//!
//! libtest captures a passing test's `print!`/`eprint!` output (the macros go through its
//! capture hook) but not writes to the `Stderr` handle, which reach file descriptor 2
//! directly; the skip line is written that way (proved by `tests/visible.rs`).
//!
//! ```no_run
//! use roost_preflight::{require, root, tools};
//! #[test]
//! fn needs_nix_and_root() {
//!     require!(root("it writes to the Nix store without a daemon").and(tools(&["nix"])));
//!     // … the test proper
//! }
//! ```
//! A dev-dependency only: the shipped crates carry none of this.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Whether the missing-prerequisite rule is "fail": `CI` is set to anything but empty,
/// `0` or `false` (CI services set `CI=true`; `.ci/run` exports it itself).
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// The name of the running test (libtest names each test's thread after it).
fn test_name() -> String {
    std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .unwrap_or("this test")
        .to_owned()
}

/// Applies the rule to a prerequisite that is missing for reason `why`: panics under CI,
/// else writes `SKIP <test>: <why>` to stderr, uncaptured. The caller then returns.
pub fn skip(why: &str) {
    let test = test_name();
    if under_ci() {
        panic!("{test}: a prerequisite is missing under CI=true (a skip must not pass): {why}");
    }
    // Through the handle, not `eprintln!`: libtest would capture the macro's output.
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIP {test}: {why} (CI=true makes this a failure)"
    );
}

/// Runs the rest of the test only when `$check` (a `Result<T, String>`) is `Ok`, giving its
/// value; otherwise applies [`skip`] and returns from the test.
#[macro_export]
macro_rules! require {
    ($check:expr) => {
        match $check {
            Ok(v) => v,
            Err(why) => {
                $crate::skip(&why);
                return;
            }
        }
    };
}

/// This process runs as root (effective uid 0, from /proc: no unsafe call).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Root, needed because `why`.
pub fn root(why: &str) -> Result<(), String> {
    if is_root() {
        Ok(())
    } else {
        Err(format!("needs root: {why}"))
    }
}

/// Where `tool` is: on `PATH`, or in `/usr/sbin` or `/sbin` (where `ip` lives on Debian,
/// often off a plain user's `PATH`).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Every one of `names` is installed.
pub fn tools(names: &[&str]) -> Result<(), String> {
    match names.iter().find(|t| which(t).is_none()) {
        None => Ok(()),
        Some(t) => Err(format!(
            "`{t}` is not installed (scripts/test installs what the tests need)"
        )),
    }
}

/// The folder named by environment variable `var`, which must exist; `what` says what it
/// is for, in the reason given when it is unset or missing.
pub fn env_dir(var: &str, what: &str) -> Result<PathBuf, String> {
    match std::env::var_os(var) {
        None => Err(format!("{var} is not set (point it at {what})")),
        Some(v) if v.is_empty() => Err(format!("{var} is empty (point it at {what})")),
        Some(v) => {
            let p = PathBuf::from(v);
            if p.is_dir() {
                Ok(p)
            } else {
                Err(format!(
                    "{var}={} is not a folder (point it at {what})",
                    p.display()
                ))
            }
        }
    }
}

/// `path` exists; `hint` says how to make it.
pub fn exists(path: &Path, hint: &str) -> Result<(), String> {
    if path.exists() {
        Ok(())
    } else {
        Err(format!("{} does not exist: {hint}", path.display()))
    }
}

/// The environment variables through which a test run configures Nix (scripts/lib.sh's
/// offline configuration for the publishing side, with flakes on).
const NIX_CONFIG_VARS: &[&str] = &["NIX_CONFIG", "NIX_CONF_DIR", "NIX_USER_CONF_FILES"];

/// Makes `cmd` run with a stock Nix, as on a real node: none of the test run's Nix
/// configuration, only the machine's `nix.conf` as its package installed it (Debian's sets
/// `sandbox = false` and nothing else; no experimental features).
pub fn stock_nix(cmd: &mut std::process::Command) -> &mut std::process::Command {
    for var in NIX_CONFIG_VARS {
        cmd.env_remove(var);
    }
    cmd
}
