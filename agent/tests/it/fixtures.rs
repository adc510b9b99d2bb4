//! Real Nix fixtures, built once per test run in the host store: fake systems whose
//! `bin/switch-to-configuration` appends "GOAL PATH" to `$ROOST_FIXTURE_LOG`, in good,
//! failing, exit-4, hanging and network-cutting variants; signed with a cache key and
//! copied to a `file://` binary cache under /tmp that every node can read. Plus the node:
//! `roost-agent` in a private mount namespace with its own empty `/nix` and a stock Nix
//! configuration (the fixtures are built with the test run's).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use roost_common::StorePath;
use roost_common::nix::Nix;
use serde_json::{Value, json};

use crate::support::{NODE, Publisher};

const FIXTURES_NIX: &str = r#"
let
  mk = variant: body: derivation {
    name = "roost-agent-fixture-${variant}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    inherit body;
    args = [ "-c" ''
      mkdir -p $out/bin
      {
        echo '#!/bin/sh'
        echo 'export PATH=/usr/bin:/bin'
        echo 'self="''${0%/bin/switch-to-configuration}"'
        echo 'echo "$1 $self" >> "$ROOST_FIXTURE_LOG"'
        printf '%s\n' "$body"
      } > $out/bin/switch-to-configuration
      chmod +x $out/bin/switch-to-configuration
    '' ];
  };
  ok = ''rm -f "$ROOST_FIXTURE_LOG.down"'';
in {
  v1 = mk "v1" ok;
  v2 = mk "v2" ok;
  v3 = mk "v3" ok;
  local = mk "local" ok;
  fail = mk "fail" ''echo "activation failed on purpose" >&2; exit 1'';
  exit4 = mk "exit4" ''echo "some units failed" >&2; exit 4'';
  hang = mk "hang" ''sleep 1000 & echo $! > "$ROOST_FIXTURE_LOG.hang-pid"; wait'';
  cut = mk "cut" ''touch "$ROOST_FIXTURE_LOG.down"'';
  slow = mk "slow" ''sleep 2; echo done >> "$ROOST_FIXTURE_LOG"'';
}
"#;

/// Variants whose outputs go to the cache (`local` only has its derivation there).
const CACHED: &[&str] = &["v1", "v2", "v3", "fail", "exit4", "hang", "cut", "slow"];
const ALL: &[&str] = &[
    "v1", "v2", "v3", "local", "fail", "exit4", "hang", "cut", "slow",
];

/// One built fixture.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub path: String,
    pub drv: String,
    pub nar_hash: String,
    pub closure_size: u64,
}

/// The fixtures and the cache holding them.
#[derive(Debug)]
pub struct Fixtures {
    pub cache_url: String,
    pub cache_public_key: String,
    pub by_name: BTreeMap<&'static str, Fixture>,
}

impl Fixtures {
    pub fn get(&self, name: &str) -> &Fixture {
        &self.by_name[name]
    }

    /// A manifest profile for fixture `name` (system profile, nixos activation).
    pub fn profile(&self, name: &str, extra: Value) -> Value {
        let f = self.get(name);
        let mut p = json!({
            "name": "system",
            "path": f.path,
            "nar_hash": f.nar_hash,
            "closure_size": f.closure_size,
            "drv_path": f.drv,
            "activation": {"kind": "nixos", "goal": "switch"},
            "activation_timeout_s": 30,
            "confirm_timeout_s": 3,
        });
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        p
    }

    /// A manifest for one fixture profile, naming the cache.
    pub fn manifest(&self, version: u64, profiles: Vec<Value>) -> Value {
        let mut m = crate::support::manifest(version, profiles);
        m["substituters"] =
            json!([{"url": self.cache_url, "public_keys": [self.cache_public_key]}]);
        m
    }
}

static FIXTURES: OnceLock<Result<Fixtures, String>> = OnceLock::new();

/// The fixtures, or why this machine cannot run nodes (for `require!`).
pub fn real_world() -> Result<&'static Fixtures, String> {
    roost_preflight::root("nodes are private mount namespaces over /nix")?;
    roost_preflight::tools(&["nix", "nix-store", "unshare"])?;
    match FIXTURES.get_or_init(build) {
        Ok(f) => Ok(f),
        Err(e) => panic!("building the fixtures failed: {e}"),
    }
}

fn build() -> Result<Fixtures, String> {
    let root = std::env::temp_dir().join(format!("roost-agent-it-{}", std::process::id()));
    clean_stale_runs();
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let file = root.join("fixtures.nix");
    std::fs::write(&file, FIXTURES_NIX).map_err(|e| e.to_string())?;
    let nix = Nix::new().with_extra_args(vec!["--impure".into()]);
    let mut args = vec!["--file".to_owned(), file.display().to_string()];
    args.extend(ALL.iter().map(|s| (*s).to_owned()));
    let built = nix.build(&args, false).map_err(|e| e.to_string())?;
    let sk = root.join("cache.sk");
    let pk = root.join("cache.pk");
    let out = Command::new("nix-store")
        .args(["--generate-binary-cache-key", "roost-agent-it-cache-1"])
        .arg(&sk)
        .arg(&pk)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let mut by_name = BTreeMap::new();
    let mut to_cache: Vec<StorePath> = Vec::new();
    let mut drvs: Vec<StorePath> = Vec::new();
    for b in &built {
        let out = b.outputs["out"].clone();
        let name = ALL
            .iter()
            .find(|n| out.name() == format!("roost-agent-fixture-{n}"))
            .ok_or_else(|| format!("unexpected build output {out}"))?;
        if CACHED.contains(name) {
            to_cache.push(out.clone());
        }
        drvs.push(b.drv_path.clone());
        by_name.insert(
            *name,
            Fixture {
                path: out.to_string(),
                drv: b.drv_path.to_string(),
                nar_hash: String::new(),
                closure_size: 0,
            },
        );
    }
    nix.sign(&sk, &to_cache).map_err(|e| e.to_string())?;
    let cache = root.join("cache");
    let cache_url = format!("file://{}", cache.display());
    nix.copy_to(&cache_url, &to_cache)
        .map_err(|e| e.to_string())?;
    // The derivations too (for build policies), as themselves: `local`'s output must stay
    // out of the cache.
    nix.sign_derivations(&sk, &drvs)
        .and_then(|()| nix.copy_derivations_to(&cache_url, &drvs))
        .map_err(|e| e.to_string())?;
    let outs: Vec<StorePath> = by_name.values().map(|f| f.path.parse().unwrap()).collect();
    for info in nix
        .path_info(&outs, None, true)
        .map_err(|e| e.to_string())?
    {
        let f = by_name
            .values_mut()
            .find(|f| f.path == info.path.to_string())
            .unwrap();
        f.nar_hash = info.nar_hash;
        f.closure_size = info.closure_size.unwrap_or(info.nar_size);
    }
    Ok(Fixtures {
        cache_url,
        cache_public_key: std::fs::read_to_string(&pk)
            .map_err(|e| e.to_string())?
            .trim()
            .to_owned(),
        by_name,
    })
}

/// Removes caches of earlier test runs whose process is gone.
fn clean_stale_runs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("roost-agent-it-") {
            if pid
                .parse::<u32>()
                .is_ok_and(|p| !Path::new(&format!("/proc/{p}")).exists())
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// A node: a folder bind-mounted on `/nix` inside the agent's mount namespace, a state
/// folder, and the activation log.
#[derive(Debug)]
pub struct Node {
    pub dir: tempfile::TempDir,
    pub publisher: Publisher,
    pub coordinator: String,
}

impl Node {
    pub fn new(coordinator: String) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("roost-agent-node-")
            .tempdir()
            .unwrap();
        std::fs::create_dir_all(dir.path().join("nix")).unwrap();
        Self {
            dir,
            publisher: Publisher::new("publisher-1"),
            coordinator,
        }
    }

    pub fn nix_dir(&self) -> PathBuf {
        self.dir.path().join("nix")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("activations.log")
    }

    /// The `ROOST_FIXTURE_LOG.down` marker the `cut` fixture creates.
    pub fn down_marker(&self) -> PathBuf {
        PathBuf::from(format!("{}.down", self.log().display()))
    }

    pub fn hang_pid(&self) -> Option<i32> {
        std::fs::read_to_string(format!("{}.hang-pid", self.log().display()))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The configuration flags every command takes.
    pub fn config_args(&self) -> Vec<String> {
        vec![
            "--node".into(),
            NODE.into(),
            "--trusted-key".into(),
            self.publisher.public_file.display().to_string(),
            "--state-dir".into(),
            self.state_dir().display().to_string(),
            "--coordinator".into(),
            self.coordinator.clone(),
        ]
    }

    /// `PROGRAM ARGS` inside the node: its own `/nix`, a stock Nix configuration.
    pub fn program(&self, program: &str, args: &[String]) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount --bind "$1" /nix && shift && exec "$@""#)
            .arg("roost-node")
            .arg(self.nix_dir())
            .arg(program)
            .args(args);
        roost_preflight::stock_nix(&mut cmd);
        cmd
    }

    /// `roost-agent ARGS` inside the node.
    pub fn command(&self, args: &[String], env: &[(&str, &str)]) -> Command {
        let mut cmd = self.program(env!("CARGO_BIN_EXE_roost-agent"), args);
        cmd.env("ROOST_FIXTURE_LOG", self.log())
            .env("RUST_LOG", "info,roost_agent=debug")
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `roost-agent ARGS` to completion inside the node.
    pub fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        let out = self.command(&args, env).output().unwrap();
        eprintln!(
            "--- roost-agent {}: {}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `run --once` with the node's configuration.
    pub fn once(&self, env: &[(&str, &str)]) -> Output {
        let mut a = vec!["run".to_owned(), "--once".into()];
        a.extend(self.config_args());
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        self.run(&refs, env)
    }

    /// `apply FILE` with the node's configuration.
    pub fn apply(&self, envelope: &[u8]) -> Output {
        let file = self.dir.path().join("manifest.json");
        std::fs::write(&file, envelope).unwrap();
        let mut a = vec!["apply".to_owned(), file.display().to_string()];
        a.extend(self.config_args());
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        self.run(&refs, &[])
    }

    /// Starts `roost-agent ARGS` in the background.
    pub fn spawn(&self, args: &[String], env: &[(&str, &str)]) -> Child {
        let log = std::fs::File::create(self.dir.path().join("agent.log")).unwrap();
        self.command(args, env)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// `status --json` inside the node.
    pub fn status(&self) -> Value {
        let dir = self.state_dir().display().to_string();
        let out = self.run(&["status", "--json", "--state-dir", &dir], &[]);
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// (generation, store path) of the node's system profile, read from outside.
    pub fn system(&self) -> Option<(u64, String)> {
        let profiles = self.nix_dir().join("var/nix/profiles");
        let gen_link = std::fs::read_link(profiles.join("system")).ok()?;
        let name = gen_link.file_name()?.to_str()?.to_owned();
        let number = name
            .strip_prefix("system-")?
            .strip_suffix("-link")?
            .parse()
            .ok()?;
        let target = std::fs::read_link(profiles.join(&name)).ok()?;
        Some((number, target.display().to_string()))
    }

    /// Whether `path` is in the node's own store.
    pub fn has_in_store(&self, path: &str) -> bool {
        let rel = path.strip_prefix("/nix/").unwrap();
        self.nix_dir().join(rel).exists()
    }

    pub fn activations(&self) -> Vec<String> {
        std::fs::read_to_string(self.log())
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits up to `secs` for `f`.
    pub fn wait_for(&self, secs: u64, mut f: impl FnMut() -> bool) -> bool {
        let end = std::time::Instant::now() + Duration::from_secs(secs);
        while std::time::Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        f()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A hanging fixture the test did not clean up must not outlive the test.
        if let Some(pid) = self.hang_pid() {
            let _ = ::nix::sys::signal::kill(
                ::nix::unistd::Pid::from_raw(pid),
                ::nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

pub use roost_common::process::running as alive;
