//! VM test nodes: real Debian guests with systemd as PID 1, stock Debian Nix (no
//! `experimental-features` anywhere) and `roost-agent` as a systemd service with the unit
//! settings the NixOS module gives it, against a real coordinator on the host.
//!
//! [`image`] makes the guest's disk once per recipe; [`machine`] boots it under QEMU; a
//! [`VmFleet`] is the coordinator, the keys, a copy of the VM fixture flake
//! (`tests/fixtures/vm`) and one machine named `vm`.

pub mod image;
pub mod machine;

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use roost_common::wire::v1::http as v1;
use serde_json::Value;

pub use image::Image;
pub use machine::{Accel, Machine};

use crate::{Coordinator, Keys, TempDir, bin, repo_root, run, wait_for};

/// The node's name in the fixture flake.
pub const NODE: &str = "vm";

/// Why VM nodes cannot run here, if they cannot.
pub fn preflight() -> Result<(), String> {
    roost_preflight::root("mmdebstrap builds the guest's root file system as root")?;
    roost_preflight::tools(&[
        "mmdebstrap",
        "qemu-system-x86_64",
        "qemu-img",
        "mkfs.ext4",
        "nix",
    ])?;
    if std::env::consts::ARCH != "x86_64" {
        return Err("the VM image is an x86_64 Debian guest".into());
    }
    for b in ["roost-agent", "roost-coordinator", "roost-vm-helper"] {
        roost_preflight::exists(&bin(b), "run `cargo build --workspace` first")?;
    }
    Ok(())
}

/// One version of the fixture's system profile (`tests/fixtures/vm/settings.nix`).
#[derive(Debug, Clone)]
pub struct Version {
    /// Bump for a new store path.
    pub generation: u32,
    /// `ok`, `slow`, `fail` or `reboot`.
    pub activation: &'static str,
    /// How long a `slow` activation sleeps.
    pub activation_seconds: u32,
    /// The activation's hard limit.
    pub activation_timeout: u32,
    /// How long the health check takes.
    pub health_seconds: u32,
    /// KiB of random data in the closure (a longer realise).
    pub blob_kib: u64,
    /// The kernel version the system links (`kernel`), if any.
    pub kernel: Option<&'static str>,
    /// `roost.reboot` of the node, if set.
    pub reboot: Option<&'static str>,
}

impl Version {
    /// A plain version: activation and health check pass at once.
    pub fn new(generation: u32) -> Self {
        Self {
            generation,
            activation: "ok",
            activation_seconds: 0,
            activation_timeout: 120,
            health_seconds: 0,
            blob_kib: 0,
            kernel: None,
            reboot: None,
        }
    }
}

/// `"value"`, or `null`.
fn nix_string(v: Option<&str>) -> String {
    v.map_or_else(|| "null".to_owned(), |v| format!("{v:?}"))
}

/// What a publish made.
#[derive(Debug, Clone)]
pub struct Published {
    /// The manifest version.
    pub version: u64,
    /// The system profile's store path.
    pub path: String,
}

/// A coordinator with its embedded cache and one VM node.
#[derive(Debug)]
pub struct VmFleet {
    /// The guest.
    pub machine: Machine,
    /// The coordinator it polls.
    pub coordinator: Coordinator,
    /// The fleet's keys.
    pub keys: Keys,
    /// The fixture flake's copy.
    pub flake: PathBuf,
    // Dropped last: everything above lives in here.
    dir: TempDir,
}

impl VmFleet {
    /// Keys, a coordinator, the flake and a machine configured to poll every `interval`;
    /// not booted yet.
    pub fn new(interval: &str) -> anyhow::Result<Self> {
        let image = Image::get()?;
        let dir = tempfile::Builder::new().prefix("roost-vm-").tempdir()?;
        let keys = Keys::create(&dir.path().join("keys"))?;
        let coordinator = Coordinator::start(dir.path(), &keys)?;
        let flake = dir.path().join("flake");
        run(Command::new("cp")
            .arg("-r")
            .arg(repo_root().join("tests/fixtures/vm"))
            .arg(&flake))?;
        let machine = Machine::create(&dir.path().join("machine"), image, coordinator.port)?;
        let fleet = Self {
            machine,
            coordinator,
            keys,
            flake,
            dir,
        };
        fs::copy(
            &fleet.keys.publisher_pub,
            fleet.machine.share().join("publisher.pub"),
        )?;
        let config = serde_json::json!({
            "coordinators": [machine::COORDINATOR_IN_GUEST],
            "node": NODE,
            "trusted_keys": ["/roost/publisher.pub"],
            "interval": interval,
            "state_dir": "/var/lib/roost",
        });
        fs::write(
            fleet.machine.share().join("agent.json"),
            serde_json::to_vec_pretty(&config)?,
        )?;
        fleet.set_agent_env(&[])?;
        Ok(fleet)
    }

    /// The agent's extra environment at its next start (`/roost/agent.env`), besides
    /// `RUST_LOG`.
    pub fn set_agent_env(&self, vars: &[(&str, &str)]) -> anyhow::Result<()> {
        let mut env = String::from("RUST_LOG=info,roost_agent=debug\n");
        for (k, v) in vars {
            env.push_str(&format!("{k}={v}\n"));
        }
        fs::write(self.machine.share().join("agent.env"), env)?;
        Ok(())
    }

    /// Writes `v` into the flake and publishes it to the coordinator and its cache.
    pub fn publish(&self, v: &Version) -> anyhow::Result<Published> {
        fs::write(
            self.flake.join("settings.nix"),
            format!(
                "{{\n  system = \"x86_64-linux\";\n  generation = {};\n  activation = \"{}\";\n  activationSeconds = {};\n  activationTimeout = {};\n  healthSeconds = {};\n  blobKiB = {};\n  kernel = {};\n  reboot = {};\n}}\n",
                v.generation,
                v.activation,
                v.activation_seconds,
                v.activation_timeout,
                v.health_seconds,
                v.blob_kib,
                nix_string(v.kernel),
                nix_string(v.reboot),
            ),
        )?;
        let url = self.coordinator.url();
        let out = Command::new(bin("roost-coordinator"))
            .arg("publish")
            .arg(&self.flake)
            .arg("--key")
            .arg(&self.keys.publisher_sec)
            .args(["--to", &url])
            .args(["--cache", &v1::cache_url(&url)])
            .args([
                "--substituter",
                &v1::cache_url(machine::COORDINATOR_IN_GUEST),
            ])
            .arg("--cache-key")
            .arg(&self.keys.cache_sec)
            .arg("--json")
            .env("ROOST_UPLOAD_TOKEN", &self.keys.token)
            .output()?;
        if !out.status.success() {
            bail!(
                "publish failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let summary: Value = serde_json::from_slice(&out.stdout).context("publish --json")?;
        let node = summary["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["node"] == NODE))
            .with_context(|| format!("no node {NODE} in {summary}"))?;
        let path = node["profiles"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == "system"))
            .and_then(|p| p["path"].as_str())
            .with_context(|| format!("no system profile in {node}"))?;
        Ok(Published {
            version: node["version"].as_u64().context("version")?,
            path: path.to_owned(),
        })
    }

    /// Every report the coordinator holds from the node, oldest first.
    pub fn reports(&self) -> anyhow::Result<Vec<Value>> {
        let body = self.coordinator.read(&v1::report_history_url(
            &self.coordinator.url(),
            NODE,
            10_000,
        ))?;
        let v: Value = serde_json::from_slice(&body)?;
        let mut reports = match v {
            Value::Array(a) => a,
            v => v["reports"].as_array().cloned().unwrap_or_default(),
        };
        reports.reverse();
        Ok(reports)
    }

    /// The final reports (success, failed, rolled back) for `version`.
    pub fn final_reports(&self, version: u64) -> anyhow::Result<Vec<Value>> {
        Ok(self
            .reports()?
            .into_iter()
            .filter(|r| r["manifest_version"].as_u64() == Some(version) && is_final(r))
            .collect())
    }

    /// Waits until a final report for `version` arrives; the first one.
    pub fn wait_final(&self, version: u64, timeout: Duration) -> anyhow::Result<Value> {
        wait_for(
            &format!("a final report for version {version}"),
            timeout,
            || self.final_reports(version).ok()?.into_iter().next(),
        )
        .with_context(|| self.diagnose())
    }

    /// What the node and the coordinator say, for a failure message.
    pub fn diagnose(&self) -> String {
        let journal = self
            .machine
            .exec("journalctl -b -u roost-agent --no-pager -n 60 -o short-monotonic")
            .map(|(_, o)| o)
            .unwrap_or_else(|e| format!("(no journal: {e})"));
        let system = self
            .machine
            .exec("journalctl -b --no-pager -n 40 -o short-monotonic")
            .map(|(_, o)| o)
            .unwrap_or_else(|e| format!("(no journal: {e})"));
        format!(
            "reports: {:?}\nagent journal:\n{journal}\nthe boot's last journal lines:\n{system}\nconsole:\n{}",
            self.reports()
                .map(|r| r
                    .iter()
                    .map(|r| format!("{} seq {} {}", r["manifest_version"], r["seq"], r["state"]))
                    .collect::<Vec<_>>())
                .unwrap_or_default(),
            self.machine.console_tail(20)
        )
    }

    /// Where the guest's system profile points (its store path).
    pub fn system_profile(&self) -> anyhow::Result<String> {
        Ok(self
            .machine
            .sh("readlink -f /nix/var/nix/profiles/system")?
            .trim()
            .to_owned())
    }

    /// `roost-agent status --json` in the guest.
    pub fn status(&self) -> anyhow::Result<Value> {
        let out = self
            .machine
            .sh("/roost/bin/roost-agent status --json --state-dir /var/lib/roost 2>/dev/null")?;
        serde_json::from_str(&out).with_context(|| format!("status --json printed {out}"))
    }

    /// The fixture's event log in the guest: `EVENT BOOT_ID STORE_PATH` lines.
    pub fn events(&self) -> anyhow::Result<Vec<String>> {
        let (_, out) = self
            .machine
            .exec("cat /var/lib/roost-vm/events.log 2>/dev/null")?;
        Ok(out.lines().map(str::to_owned).collect())
    }

    /// Whether the agent starts at the guest's next boot: the unit's
    /// `ConditionPathExists=/roost/agent.json` is met only while the share holds its
    /// configuration. Held, a test can look at what a power cut left before recovery runs,
    /// then [`VmFleet::start_agent`].
    pub fn agent_starts_at_boot(&self, starts: bool) -> anyhow::Result<()> {
        let share = self.machine.share();
        let (from, to) = (share.join("agent.json.held"), share.join("agent.json"));
        let (from, to) = if starts { (from, to) } else { (to, from) };
        if from.exists() {
            fs::rename(&from, &to)?;
        }
        Ok(())
    }

    /// Starts the agent's service (its configuration back in the share first), without
    /// waiting for its start-up recovery.
    pub fn start_agent(&self) -> anyhow::Result<()> {
        self.agent_starts_at_boot(true)?;
        self.machine.sh("systemctl start --no-block roost-agent")?;
        Ok(())
    }

    /// The agent's main pid as systemd knows it (0: not running).
    pub fn agent_pid(&self) -> anyhow::Result<u32> {
        let out = self
            .machine
            .sh("systemctl show -p MainPID --value roost-agent")?;
        out.trim()
            .parse()
            .with_context(|| format!("MainPID {out:?}"))
    }

    /// Adds a drop-in `NAME.conf` to the agent's unit (`[Service]` lines) and reloads
    /// systemd; it applies from the agent's next start.
    pub fn agent_drop_in(&self, name: &str, service_lines: &str) -> anyhow::Result<()> {
        let dir = "/etc/systemd/system/roost-agent.service.d";
        self.machine.sh(&format!(
            "mkdir -p {dir}\ncat > {dir}/{name}.conf <<'EOF'\n[Service]\n{service_lines}\nEOF\nsystemctl daemon-reload"
        ))?;
        Ok(())
    }

    /// The agent's `state.json` in the guest (§8.1 of the protocol).
    pub fn state(&self) -> anyhow::Result<Value> {
        let out = self.machine.sh("cat /var/lib/roost/state.json")?;
        serde_json::from_str(&out).with_context(|| format!("state.json holds {out:?}"))
    }

    /// How many `event` lines the fixture logged for the system at `path`.
    pub fn count_events(&self, event: &str, path: &str) -> anyhow::Result<usize> {
        Ok(self
            .events()?
            .iter()
            .filter(|e| e.starts_with(&format!("{event} ")) && e.ends_with(path))
            .count())
    }

    /// Waits until the fixture logs `event` for the system at `path`.
    pub fn wait_event(&self, event: &str, path: &str, timeout: Duration) -> anyhow::Result<()> {
        wait_guest(&format!("`{event}` of {path}"), timeout, || {
            Ok(self.count_events(event, path)? > 0)
        })
        .with_context(|| self.diagnose())
    }

    /// Waits until the agent is idle with nothing pending and every report delivered.
    pub fn wait_settled(&self, timeout: Duration) -> anyhow::Result<Value> {
        let mut last = Value::Null;
        wait_guest("the agent to settle", timeout, || {
            last = self.status()?;
            Ok(last["daemon_running"] == true
                && last["phase"] == "idle"
                && last["pending"].is_null()
                && last["pending_reports"]
                    .as_array()
                    .is_some_and(|q| q.is_empty()))
        })
        .with_context(|| format!("last status: {last}\n{}", self.diagnose()))?;
        Ok(last)
    }

    /// The test's folder on the host.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// Polls `done` in the guest once a second (each call runs commands there, so more often
/// would take the guest's one CPU from what is being tested) until it says true. Errors
/// count as not yet: the guest may be busy or booting.
pub fn wait_guest(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let mut last_err = None;
    loop {
        match done() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > timeout {
            bail!(
                "timed out after {timeout:?} waiting for {what}{}",
                last_err
                    .map(|e| format!(" (last error: {e:#})"))
                    .unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Whether a report ends a deploy.
pub fn is_final(r: &Value) -> bool {
    matches!(
        r["state"].as_str(),
        Some("success" | "failed" | "rolled_back")
    )
}
