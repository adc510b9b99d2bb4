//! A whole fleet: keys, a coordinator, a copy of the offline fixture flake, and namespaced
//! nodes running real agents. Used by the end-to-end tests, the demo and the benchmarks.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use roost_common::wire::v1::http as v1;
use serde_json::Value;

use crate::{Bridge, Coordinator, Keys, Node, TempDir, bin, repo_root, run, wait_for};

/// The fixture flake's knobs (see `examples/offline/settings.nix`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Bump for new versions of every profile.
    pub generation: u32,
    /// Per node: `fail`, `units-failed`, `hang`, `unhealthy`.
    pub behaviour: Vec<(&'static str, &'static str)>,
    /// Per node: KiB of random data in the system closure.
    pub blob_kib: Vec<(&'static str, u64)>,
    /// Per node: a URL that must answer 2xx.
    pub http_checks: Vec<(&'static str, String)>,
    /// Per node: its `roost.nodeKey` (`NAME:BASE64`); none: trust on first use.
    pub node_keys: Vec<(&'static str, String)>,
    /// Per node: the kernel version its system links; none: no kernel.
    pub kernel: Vec<(&'static str, &'static str)>,
    /// Per node: the systemd its `switch-inhibitors` names; none: no such file.
    pub systemd: Vec<(&'static str, &'static str)>,
    /// Per node: its `roost.reboot` policy.
    pub reboot: Vec<(&'static str, &'static str)>,
    /// Per node: its `roost.rebootWindow`.
    pub reboot_window: Vec<(&'static str, &'static str)>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            generation: 1,
            behaviour: vec![],
            blob_kib: vec![],
            http_checks: vec![],
            node_keys: vec![],
            kernel: vec![],
            systemd: vec![],
            reboot: vec![],
            reboot_window: vec![],
        }
    }
}

/// A running fleet.
#[derive(Debug)]
pub struct Fleet {
    /// Nodes, in the order given.
    pub nodes: Vec<Node>,
    /// The coordinator every node polls.
    pub coordinator: Coordinator,
    /// Keys of the fleet.
    pub keys: Keys,
    /// The fixture flake (a private copy that tests may edit).
    pub flake: PathBuf,
    /// Agent poll interval.
    pub interval: String,
    /// The nodes' network.
    pub bridge: Bridge,
    // Dropped last: everything above lives in here.
    dir: TempDir,
}

impl Fleet {
    /// Keys, a coordinator, the flake copy and one namespaced node per name (agents not started).
    pub fn new(names: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("roost-fleet-").tempdir()?;
        let keys = Keys::create(&dir.path().join("keys"))?;
        let coordinator = Coordinator::start(dir.path(), &keys)?;
        let flake = dir.path().join("flake");
        copy_dir(&repo_root().join("examples/offline"), &flake)?;
        let bridge = Bridge::create()?;
        let nodes = names
            .iter()
            .map(|n| Node::create(dir.path(), n, &bridge))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let fleet = Self {
            nodes,
            coordinator,
            keys,
            flake,
            interval: "2s".into(),
            bridge,
            dir,
        };
        fleet.settings(&Settings::default())?;
        Ok(fleet)
    }

    /// Rewrites the fixture's `settings.nix` (the flake's one knob).
    pub fn settings(&self, s: &Settings) -> anyhow::Result<()> {
        let attrs = |m: &[(&str, String)]| {
            m.iter()
                .map(|(k, v)| format!("\"{k}\" = {v};"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let behaviour: Vec<(&str, String)> = s
            .behaviour
            .iter()
            .map(|(k, v)| (*k, format!("\"{v}\"")))
            .collect();
        let blobs: Vec<(&str, String)> = s
            .blob_kib
            .iter()
            .map(|(k, v)| (*k, v.to_string()))
            .collect();
        let http: Vec<(&str, String)> = s
            .http_checks
            .iter()
            .map(|(k, v)| (*k, format!("[ \"{v}\" ]")))
            .collect();
        let quoted = |m: &[(&'static str, String)]| -> Vec<(&'static str, String)> {
            m.iter().map(|(k, v)| (*k, format!("\"{v}\""))).collect()
        };
        let keys = quoted(&s.node_keys);
        let owned = |m: &[(&'static str, &'static str)]| -> Vec<(&'static str, String)> {
            m.iter().map(|(k, v)| (*k, v.to_string())).collect()
        };
        let kernel = quoted(&owned(&s.kernel));
        let systemd = quoted(&owned(&s.systemd));
        let reboot = quoted(&owned(&s.reboot));
        let reboot_window = quoted(&owned(&s.reboot_window));
        self.edit(
            "settings.nix",
            &format!(
                "{{\n  system = \"{}-linux\";\n  generation = {};\n  behaviour = {{ {} }};\n  blobKiB = {{ {} }};\n  httpChecks = {{ {} }};\n  nodeKeys = {{ {} }};\n  kernel = {{ {} }};\n  systemd = {{ {} }};\n  reboot = {{ {} }};\n  rebootWindow = {{ {} }};\n}}\n",
                std::env::consts::ARCH,
                s.generation,
                attrs(&behaviour),
                attrs(&blobs),
                attrs(&http),
                attrs(&keys),
                attrs(&kernel),
                attrs(&systemd),
                attrs(&reboot),
                attrs(&reboot_window)
            ),
        )
    }

    /// The fleet's working folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The coordinator as every node reaches it.
    pub fn node_url(&self) -> String {
        format!("http://{}:{}", self.bridge.ip, self.coordinator.port)
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The node called `name`, mutably.
    pub fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Writes `content` to `rel` inside the fixture flake (how tests make new versions).
    pub fn edit(&self, rel: &str, content: &str) -> anyhow::Result<()> {
        fs::write(self.flake.join(rel), content).with_context(|| format!("editing {rel}"))
    }

    /// `roost-coordinator publish` of `targets` (`#node`, … relative to the flake; this
    /// fleet's nodes when empty) to the coordinator and its cache; returns the `--json`
    /// summary. Only the fleet's own nodes, so that a rollout (docs/protocol.md §6.9) never
    /// waits for a node of the flake that has no agent here.
    pub fn publish(&self, targets: &[&str]) -> anyhow::Result<Value> {
        self.publish_with(targets, &[])
    }

    /// [`publish`](Self::publish) with `extra` arguments after the harness's own.
    pub fn publish_with(&self, targets: &[&str], extra: &[&str]) -> anyhow::Result<Value> {
        let own: Vec<String> = self.nodes.iter().map(|n| format!("#{}", n.name)).collect();
        let targets: Vec<&str> = match targets.is_empty() {
            true => own.iter().map(String::as_str).collect(),
            false => targets.to_vec(),
        };
        let out = self.publish_command(&targets).args(extra).output()?;
        let summary: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "publish printed no JSON ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        if !out.status.success() {
            bail!(
                "publish failed ({}): {summary}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(summary)
    }

    /// The publish command line, for tests that want to run it themselves.
    pub fn publish_command(&self, targets: &[&str]) -> Command {
        let flake = self.flake.display().to_string();
        let mut cmd = Command::new(bin("roost-coordinator"));
        cmd.arg("publish");
        if targets.is_empty() {
            cmd.arg(&flake);
        }
        for t in targets {
            cmd.arg(format!("{flake}{t}"));
        }
        cmd.args(["--key"])
            .arg(&self.keys.publisher_sec)
            .args(["--to", &self.coordinator.url()])
            .args(["--cache", &v1::cache_url(&self.coordinator.url())])
            .args(["--substituter", &v1::cache_url(&self.node_url())])
            .arg("--cache-key")
            .arg(&self.keys.cache_sec)
            .arg("--json")
            .env("ROOST_UPLOAD_TOKEN", &self.keys.token);
        cmd
    }

    /// The agent's arguments for `node` (`run`, plus `--once` when asked).
    pub fn agent_args(&self, node: &Node, once: bool) -> Vec<String> {
        let mut a = vec!["run".to_owned()];
        a.extend(self.config_args(node));
        a.extend(["--interval".into(), self.interval.clone()]);
        if once {
            a.push("--once".into());
        }
        a
    }

    /// `roost-agent apply FILE` for `node` (`apply` takes no polling flags).
    pub fn apply_args(&self, node: &Node, file: &Path) -> Vec<String> {
        let mut a = vec!["apply".to_owned(), file.display().to_string()];
        a.extend(self.config_args(node));
        a
    }

    /// What every configured command of `node`'s agent is given.
    fn config_args(&self, node: &Node) -> [String; 8] {
        [
            "--coordinator".into(),
            node.coordinator_url(&self.coordinator),
            "--node".into(),
            node.name.clone(),
            "--trusted-key".into(),
            self.keys.publisher_pub.display().to_string(),
            "--state-dir".into(),
            node.state_dir().display().to_string(),
        ]
    }

    /// Starts every node's agent daemon.
    pub fn start_agents(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            let args = self.agent_args(&self.nodes[i], false);
            self.nodes[i].start_agent(&args, &[])?;
        }
        Ok(())
    }

    /// The coordinator's view of `node` from `GET /v1/fleet`.
    pub fn fleet_entry(&self, node: &str) -> Option<Value> {
        let fleet = self.coordinator.fleet().ok()?;
        let nodes = fleet.get("nodes")?;
        match nodes {
            Value::Array(a) => a
                .iter()
                .find(|n| n.get("node").and_then(Value::as_str) == Some(node))
                .cloned(),
            Value::Object(o) => o.get(node).cloned(),
            _ => None,
        }
    }

    /// Waits until `node`'s last report says `state` for manifest `version`.
    pub fn wait_report(
        &self,
        node: &str,
        version: u64,
        state: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        wait_for(
            &format!("{node} to report {state} at version {version}"),
            timeout,
            || {
                let e = self.fleet_entry(node)?;
                let r = e.get("last_report")?;
                (r.get("manifest_version")?.as_u64()? == version
                    && r.get("state")?.as_str()? == state)
                    .then(|| r.clone())
            },
        )
        .with_context(|| {
            format!(
                "{node}: coordinator sees {:?}\nagent log tail:\n{}",
                self.fleet_entry(node),
                tail(&self.node(node).log(), 40)
            )
        })
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    run(Command::new("cp").arg("-r").arg(from).arg(to))?;
    Ok(())
}
