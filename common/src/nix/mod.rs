//! The one door to Nix: every `nix`, `nix-store` and `nix-env` call of both programs goes
//! through [`Nix::run`], which counts invocations, captures stderr for errors, and enforces
//! timeouts by killing the whole process group (on [`crate::process`], the one runner).
//!
//! Every `nix` call asks for the experimental features it needs itself
//! (`--extra-experimental-features`), so both programs work with Nix's default configuration
//! from 2.8 on: nothing in a node's `nix.conf`. `nix-store` and `nix-env` need none.
//!
//! JSON output is parsed tolerantly: Nix changes shapes between versions (2.8 prints
//! `path-info` as an array, newer Nix as an object keyed by path).

pub mod log;
pub mod parse;
pub mod profiles;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io::IsTerminal;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::names::StorePath;
use crate::process;
pub use parse::{BuildResult, FlakeMetadata, PathInfo};

/// Which Nix command to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `nix` (the new CLI).
    Nix,
    /// `nix-store`.
    NixStore,
    /// `nix-env`.
    NixEnv,
}

impl Tool {
    fn program(self) -> &'static str {
        match self {
            Tool::Nix => "nix",
            Tool::NixStore => "nix-store",
            Tool::NixEnv => "nix-env",
        }
    }
}

/// How a Nix call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NixErrorKind {
    /// The program could not be started (not installed?).
    Spawn(String),
    /// It exited non-zero or was killed by a signal.
    Failed,
    /// It ran past its timeout and was killed.
    TimedOut,
    /// Its output was not what we expected.
    Parse(String),
}

/// A failed Nix call: what ran, how it ended, and the end of what it said.
#[derive(Debug, Clone, thiserror::Error)]
pub struct NixError {
    /// The full command line.
    pub argv: Vec<String>,
    /// Exit status, if it exited.
    pub status: Option<i32>,
    /// The last lines of its stderr.
    pub stderr_tail: String,
    /// What went wrong.
    pub kind: NixErrorKind,
}

impl fmt::Display for NixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cmd = shell_words(&self.argv);
        match &self.kind {
            NixErrorKind::Spawn(e) => write!(
                f,
                "could not run `{cmd}`: {e} (is Nix installed and on PATH?)"
            )?,
            NixErrorKind::Failed => match self.status {
                Some(code) => write!(f, "`{cmd}` failed with exit status {code}")?,
                None => write!(f, "`{cmd}` was killed by a signal")?,
            },
            NixErrorKind::TimedOut => write!(f, "`{cmd}` timed out and was killed")?,
            NixErrorKind::Parse(e) => write!(f, "unexpected output from `{cmd}`: {e}")?,
        }
        if !self.stderr_tail.trim().is_empty() {
            write!(f, "\n{}", self.stderr_tail.trim_end())?;
        }
        Ok(())
    }
}

fn shell_words(argv: &[String]) -> String {
    let mut s = String::new();
    for (i, a) in argv.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        let plain = !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:=+@%,^#".contains(c));
        if plain {
            s.push_str(a);
        } else {
            s.push('\'');
            s.push_str(&a.replace('\'', "'\\''"));
            s.push('\'');
        }
    }
    // Very long argument lists (thousands of store paths) are shortened for humans.
    if s.len() > 2000 {
        let mut cut = 2000;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str(" …");
    }
    s
}

/// How many stderr lines an error keeps.
const STDERR_TAIL_LINES: usize = 25;

/// Options of a realisation on a node.
#[derive(Debug, Clone, Default)]
pub struct RealiseOptions {
    /// Substituter URLs, exactly (replaces Nix's configured list).
    pub substituters: Vec<String>,
    /// Public keys trusted for those substituters, exactly.
    pub trusted_public_keys: Vec<String>,
    /// Kill the call after this long.
    pub timeout: Option<Duration>,
    /// Build a derivation when substituting its outputs fails (Nix's `fallback`), rather
    /// than stop: for realising `drv_path`s, where building is what was asked for.
    pub fallback: bool,
}

/// The experimental feature every `nix` call needs: the new CLI itself.
const NIX_COMMAND: &str = "nix-command";

/// The Nix driver. Cheap to clone; clones share their invocation counters.
#[derive(Clone, Default)]
pub struct Nix {
    extra_args: Vec<String>,
    flakes: bool,
    env: Vec<(OsString, OsString)>,
    progress: bool,
    log: Option<LogFn>,
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
}

/// Receives Nix's structured log events as they come (see [`Nix::with_log`]).
pub type LogFn = Arc<dyn Fn(&log::Event) + Send + Sync>;

impl fmt::Debug for Nix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nix")
            .field("extra_args", &self.extra_args)
            .field("flakes", &self.flakes)
            .field("progress", &self.progress)
            .field("log", &self.log.is_some())
            .finish_non_exhaustive()
    }
}

impl Nix {
    /// A driver that runs `nix`, `nix-store` and `nix-env` from `PATH`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Arguments appended to every `nix` call (e.g. `--impure`, `--option …`).
    pub fn with_extra_args(mut self, args: Vec<String>) -> Self {
        self.extra_args = args;
        self
    }

    /// Also ask for the `flakes` feature on every `nix` call (publish evaluates flakes; the
    /// agent never does).
    pub fn with_flakes(mut self) -> Self {
        self.flakes = true;
        self
    }

    /// The `--extra-experimental-features` value of every `nix` call.
    fn features(&self) -> String {
        if self.flakes {
            format!("{NIX_COMMAND} flakes")
        } else {
            NIX_COMMAND.to_owned()
        }
    }

    /// An environment variable set for every call.
    pub fn with_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Forward Nix's stderr lines to ours as they come (for long work on a terminal).
    pub fn with_progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }

    /// Every `nix` call logs in Nix's structured form (`--log-format internal-json`) and
    /// `f` gets its events as they come (a progress display: builds, copies, bytes). Errors
    /// read as in Nix's plain format, a failed build's last log lines included.
    pub fn with_log(mut self, f: LogFn) -> Self {
        self.log = Some(f);
        self
    }

    /// Invocations so far, keyed by command (`nix eval`, `nix-store --realise`, …).
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Runs a Nix command and returns its stdout. The door every call goes through.
    pub fn run(
        &self,
        tool: Tool,
        args: &[String],
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>, NixError> {
        let mut argv = vec![tool.program().to_owned()];
        if tool == Tool::Nix {
            argv.extend(["--extra-experimental-features".to_owned(), self.features()]);
            if self.log.is_some() {
                argv.extend(["--log-format".to_owned(), "internal-json".to_owned()]);
            }
        }
        argv.extend(args.iter().cloned());
        if tool == Tool::Nix {
            argv.extend(self.extra_args.iter().cloned());
        }
        let key = match (tool, args.first()) {
            (Tool::Nix, Some(sub)) if !sub.starts_with('-') => match args.get(1) {
                // `nix store sign`, `nix flake metadata`: two words name the command.
                Some(sub2) if (sub == "store" || sub == "flake") && !sub2.starts_with('-') => {
                    format!("nix {sub} {sub2}")
                }
                _ => format!("nix {sub}"),
            },
            (Tool::NixStore, Some(op)) => format!("nix-store {op}"),
            _ => tool.program().to_owned(),
        };
        if let Ok(mut c) = self.counts.lock() {
            *c.entry(key).or_default() += 1;
        }
        tracing::debug!(cmd = %shell_words(&argv), "running nix");
        self.spawn_and_wait(argv, timeout)
    }

    fn spawn_and_wait(
        &self,
        argv: Vec<String>,
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>, NixError> {
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // Only `nix` was asked for the structured log (the legacy tools keep theirs): its
        // lines are decoded, events go to the observer, and the text they hold is kept.
        let stderr_map = self
            .log
            .clone()
            .filter(|_| argv[0] == Tool::Nix.program())
            .map(|observer| {
                let mut decoder = log::Decoder::new();
                process::LineMap(Box::new(move |raw: String| {
                    let d = decoder.line(&raw);
                    if let Some(e) = &d.event {
                        observer(e);
                    }
                    d.text
                }))
            });
        let opts = process::Options {
            timeout,
            stderr_lines: STDERR_TAIL_LINES,
            forward_stderr: self.progress,
            stderr_map,
            // Nix's helpers die with its group; a pipe still open after that is not Nix's.
            output_grace: Duration::from_secs(10),
            stdin_pipe: false,
        };
        let err = |status, tail, kind| NixError {
            argv: argv.clone(),
            status,
            stderr_tail: tail,
            kind,
        };
        let done = process::run(cmd, opts)
            .map_err(|e| err(None, String::new(), NixErrorKind::Spawn(e.to_string())))?;
        match done.status {
            None => Err(err(None, done.stderr_tail, NixErrorKind::TimedOut)),
            Some(s) if !s.success() => Err(err(s.code(), done.stderr_tail, NixErrorKind::Failed)),
            Some(_) => Ok(done.stdout),
        }
    }

    /// Runs a command and parses its stdout as JSON.
    pub fn run_json<T: DeserializeOwned>(
        &self,
        tool: Tool,
        args: &[String],
    ) -> Result<T, NixError> {
        let out = self.run(tool, args, None)?;
        serde_json::from_slice(&out).map_err(|e| NixError {
            argv: std::iter::once(tool.program().to_owned())
                .chain(args.iter().cloned())
                .collect(),
            status: Some(0),
            stderr_tail: String::from_utf8_lossy(&out[..out.len().min(500)]).into_owned(),
            kind: NixErrorKind::Parse(e.to_string()),
        })
    }

    /// `nix eval --json INSTALLABLE [--apply F]`.
    pub fn eval_json(
        &self,
        installable: &str,
        apply: Option<&str>,
    ) -> Result<serde_json::Value, NixError> {
        let mut args = strings(&["eval", "--json", installable]);
        if let Some(f) = apply {
            args.push("--apply".into());
            args.push(f.into());
        }
        self.run_json(Tool::Nix, &args)
    }

    /// `nix build --json --no-link INSTALLABLES…`; `keep_going` builds what it can.
    pub fn build(
        &self,
        installables: &[String],
        keep_going: bool,
    ) -> Result<Vec<BuildResult>, NixError> {
        let mut args = strings(&["build", "--json", "--no-link"]);
        if keep_going {
            args.push("--keep-going".into());
        }
        args.extend(installables.iter().cloned());
        let out = self.run(Tool::Nix, &args, None)?;
        parse::build_results(&out).map_err(|e| self.parse_error(Tool::Nix, &args, e))
    }

    /// `nix copy --to URL PATHS…`.
    ///
    /// Nix remembers which paths a cache holds (for 30 days by default) and skips uploading
    /// them; a cache that was emptied or replaced at the same URL would then never receive
    /// them again. The TTLs are set to 0 so the destination itself is asked.
    pub fn copy_to(&self, to: &str, paths: &[StorePath]) -> Result<(), NixError> {
        self.copy_with(to, paths, false)
    }

    /// [`Nix::copy_to`] of the closures of derivations (`.drv` files, their input
    /// derivations and sources; `--derivation`, so Nix does not take them for their
    /// outputs), for nodes that may build.
    pub fn copy_derivations_to(&self, to: &str, drvs: &[StorePath]) -> Result<(), NixError> {
        self.copy_with(to, drvs, true)
    }

    fn copy_with(&self, to: &str, paths: &[StorePath], derivation: bool) -> Result<(), NixError> {
        let mut args = strings(&["copy"]);
        if derivation {
            args.push("--derivation".into());
        }
        args.extend(strings(&[
            "--to",
            to,
            "--option",
            "narinfo-cache-positive-ttl",
            "0",
            "--option",
            "narinfo-cache-negative-ttl",
            "0",
        ]));
        args.extend(paths.iter().map(|p| p.to_string()));
        self.run(Tool::Nix, &args, None).map(drop)
    }

    /// `nix store sign --key-file K --recursive PATHS…`.
    pub fn sign(&self, key_file: &Path, paths: &[StorePath]) -> Result<(), NixError> {
        self.sign_with(key_file, paths, false)
    }

    /// [`Nix::sign`] of the closures of derivations (`--derivation`).
    pub fn sign_derivations(&self, key_file: &Path, drvs: &[StorePath]) -> Result<(), NixError> {
        self.sign_with(key_file, drvs, true)
    }

    fn sign_with(
        &self,
        key_file: &Path,
        paths: &[StorePath],
        derivation: bool,
    ) -> Result<(), NixError> {
        let mut args = strings(&["store", "sign", "--key-file"]);
        args.push(key_file.display().to_string());
        args.push("--recursive".into());
        if derivation {
            args.push("--derivation".into());
        }
        args.extend(paths.iter().map(|p| p.to_string()));
        self.run(Tool::Nix, &args, None).map(drop)
    }

    /// `nix path-info --json [--closure-size] [--store S] PATHS…`; invalid paths are left out.
    pub fn path_info(
        &self,
        paths: &[StorePath],
        store: Option<&str>,
        closure_size: bool,
    ) -> Result<Vec<PathInfo>, NixError> {
        let mut args = strings(&["path-info", "--json"]);
        if closure_size {
            args.push("--closure-size".into());
        }
        if let Some(s) = store {
            args.push("--store".into());
            args.push(s.into());
        }
        args.extend(paths.iter().map(|p| p.to_string()));
        let out = self.run(Tool::Nix, &args, None)?;
        parse::path_infos(&out).map_err(|e| self.parse_error(Tool::Nix, &args, e))
    }

    /// `nix flake metadata --json FLAKE`: the locked URL, revision and dirtiness.
    pub fn flake_metadata(&self, flake: &str) -> Result<FlakeMetadata, NixError> {
        let args = strings(&["flake", "metadata", "--json", flake]);
        let out = self.run(Tool::Nix, &args, None)?;
        parse::flake_metadata(&out).map_err(|e| self.parse_error(Tool::Nix, &args, e))
    }

    /// `nix-store --realise PATHS…` from exactly the given substituters and keys.
    ///
    /// `narinfo-cache-negative-ttl 0`: a manifest published a moment before its closure must
    /// not stall the node for an hour. Short connect and stall timeouts make a cut network fail
    /// fast instead of hanging.
    pub fn realise(
        &self,
        paths: &[StorePath],
        opts: &RealiseOptions,
    ) -> Result<Vec<StorePath>, NixError> {
        let mut args = strings(&["--realise"]);
        args.extend(paths.iter().map(|p| p.to_string()));
        for (k, v) in [
            ("substituters", opts.substituters.join(" ")),
            ("trusted-public-keys", opts.trusted_public_keys.join(" ")),
            ("require-sigs", "true".into()),
            ("narinfo-cache-negative-ttl", "0".into()),
            ("narinfo-cache-positive-ttl", "0".into()),
            ("connect-timeout", "10".into()),
            ("stalled-download-timeout", "30".into()),
            ("download-attempts", "2".into()),
        ] {
            args.extend(["--option".to_owned(), k.to_owned(), v]);
        }
        if opts.fallback {
            args.extend(strings(&["--option", "fallback", "true"]));
        }
        let out = self.run(Tool::NixStore, &args, opts.timeout)?;
        String::from_utf8_lossy(&out)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.trim().parse::<StorePath>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.parse_error(Tool::NixStore, &args, e.to_string()))
    }

    /// Whether `path` is valid in the local store (`nix-store --check-validity`).
    pub fn is_valid(&self, path: &StorePath) -> bool {
        self.run(
            Tool::NixStore,
            &["--check-validity".into(), path.to_string()],
            None,
        )
        .is_ok()
    }

    /// `nix-store --gc --print-dead`: what a garbage collection would delete now.
    pub fn dead_paths(&self) -> Result<Vec<StorePath>, NixError> {
        let args = strings(&["--gc", "--print-dead"]);
        let out = self.run(Tool::NixStore, &args, None)?;
        Ok(String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| l.trim().parse::<StorePath>().ok())
            .collect())
    }

    /// `nix-store --gc`: deletes every path no root keeps; returns the bytes Nix says it
    /// freed.
    pub fn collect_garbage(&self) -> Result<u64, NixError> {
        let args = strings(&["--gc"]);
        let out = self.run(Tool::NixStore, &args, None)?;
        parse::gc_freed_bytes(&String::from_utf8_lossy(&out))
            .ok_or_else(|| self.parse_error(Tool::NixStore, &args, "no `… freed` line".into()))
    }

    /// `nix-env -p PROFILE --set PATH`: a new generation pointing at `path`.
    pub fn set_profile(&self, profile: &Path, path: &StorePath) -> Result<(), NixError> {
        let args = vec![
            "-p".into(),
            profile.display().to_string(),
            "--set".into(),
            path.to_string(),
        ];
        self.run(Tool::NixEnv, &args, None).map(drop)
    }

    fn parse_error(&self, tool: Tool, args: &[String], e: String) -> NixError {
        NixError {
            argv: std::iter::once(tool.program().to_owned())
                .chain(args.iter().cloned())
                .collect(),
            status: Some(0),
            stderr_tail: String::new(),
            kind: NixErrorKind::Parse(e),
        }
    }
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

/// Whether our stderr is a terminal (progress bars and forwarded Nix output make sense).
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A driver whose `nix`, `nix-store` and `nix-env` print the arguments they were given.
    fn echoing(dir: &Path) -> Nix {
        for tool in ["nix", "nix-store", "nix-env"] {
            let file = dir.join(tool);
            std::fs::write(&file, "#!/bin/sh\nprintf '%s\\n' \"$@\"\n").unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Nix::new().with_env("PATH", dir)
    }

    fn argv(nix: &Nix, tool: Tool, args: &[&str]) -> Vec<String> {
        let out = nix.run(tool, &strings(args), None).unwrap();
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn every_nix_call_asks_for_the_new_cli_itself_and_publish_also_for_flakes() {
        let d = tempfile::tempdir().unwrap();
        let nix = echoing(d.path());
        assert_eq!(
            argv(&nix, Tool::Nix, &["path-info", "--json"]),
            [
                "--extra-experimental-features",
                "nix-command",
                "path-info",
                "--json"
            ]
        );
        assert_eq!(
            argv(&nix.clone().with_flakes(), Tool::Nix, &["eval", ".#deploy"]),
            [
                "--extra-experimental-features",
                "nix-command flakes",
                "eval",
                ".#deploy"
            ]
        );
        // The old commands are not experimental: nothing added.
        assert_eq!(argv(&nix, Tool::NixStore, &["--realise"]), ["--realise"]);
        assert_eq!(argv(&nix, Tool::NixEnv, &["--set"]), ["--set"]);
        // Counted under the command's own name, not the flag.
        assert_eq!(nix.counts().get("nix path-info"), Some(&1));
    }
}
