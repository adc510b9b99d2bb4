//! The command line: `run`, `status`, `apply`, `rollback`, `key`, `check-config`. Each
//! handler returns the process exit code: 0 ok, 1 the operation failed, 2 bad usage or
//! configuration.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use roost_common::nix::Nix;

use crate::agent::{Agent, Verdict};
use crate::config::{BuildPolicy, Config, ConfigFile};
use crate::poll::SystemClock;
use crate::state::{StateDir, StateLock};
use crate::{daemon, status};

/// Exit code: the operation failed.
pub const FAILED: u8 = 1;
/// Exit code: bad usage or configuration.
pub const USAGE: u8 = 2;

/// roost's node agent: pulls signed manifests, deploys them safely, reports.
///
/// A node usually runs `roost-agent run --config /etc/roost/agent.json` under systemd.
/// `roost-agent run --once` does one poll-and-apply (for timers and cron);
/// `roost-agent status` shows where the node stands.
#[derive(Debug, Parser)]
#[command(name = "roost-agent", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Poll the coordinator and apply new manifests: a daemon, or one pass with `--once`.
    ///
    /// The daemon recovers an interrupted deploy first, then tells systemd it is ready,
    /// polls (long-polls where the coordinator offers it) and applies, rolling back on
    /// failure. Set `ROOST_FAULT=<phase>[:pause]` in debug builds to inject crashes.
    Run {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Poll and apply once, then exit: 0 when converged or there is nothing to do,
        /// 1 when the manifest was rejected, the deploy failed, was rolled back or deferred,
        /// or no coordinator answered.
        #[arg(long)]
        once: bool,
    },
    /// Where this node stands: per profile current and desired path and generation, the
    /// manifest version, last and next poll, the last deploy and its error, queued reports
    /// and quarantined versions. Asks the running daemon, else reads the state folder.
    Status {
        #[command(flatten)]
        at: StateArgs,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Apply a signed manifest from a file (air-gapped nodes, USB sticks), through exactly
    /// the same verification and state machine as a polled one.
    Apply {
        /// The envelope file, as served at /v1/nodes/NODE/manifest or written by
        /// `roost-coordinator publish --out`.
        file: PathBuf,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Put a profile back at its previous generation (every profile of the manifest when
    /// none is named), re-run that generation's activation, quarantine the version so it is
    /// not re-applied, and report it. Stop the daemon first.
    Rollback {
        /// The profile's name in the manifest, e.g. `system`.
        profile: Option<String>,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Print this node's public key (made on first use) for the flake's `roost.nodeKey`.
    Key {
        #[command(flatten)]
        at: StateArgs,
        /// The key's name [default: the node name from --config, else the hostname].
        #[arg(long)]
        node: Option<String>,
    },
    /// Check a configuration (file and flags) and print what it resolves to; exit 2 with the
    /// reason when it is invalid.
    CheckConfig {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
}

/// Where the state folder is, for commands that need nothing else.
#[derive(Debug, Args)]
pub struct StateArgs {
    /// The agent's config file; only its `state_dir` (and `node`) is used here
    /// [default: /etc/roost/agent.json when it exists].
    #[arg(long, env = "ROOST_CONFIG")]
    config: Option<PathBuf>,
    /// The state folder [default: the config's, else /var/lib/roost].
    #[arg(long, env = "ROOST_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

/// The config file NixOS's `services.roost.agent` installs; used when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/roost/agent.json";

/// `--config` if given, else [`DEFAULT_CONFIG`] when it exists.
fn config_file(given: &Option<PathBuf>) -> Result<ConfigFile, String> {
    let default = PathBuf::from(DEFAULT_CONFIG);
    match given {
        Some(p) => ConfigFile::read(p).map_err(|e| e.to_string()),
        None if default.exists() => ConfigFile::read(&default).map_err(|e| e.to_string()),
        None => Ok(ConfigFile::default()),
    }
}

impl StateArgs {
    fn resolve(&self) -> Result<(PathBuf, Option<String>), String> {
        let file = config_file(&self.config)?;
        let dir = self
            .state_dir
            .clone()
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/roost"));
        Ok((dir, file.node))
    }
}

/// Every configuration key as a flag; flags override the `--config` file.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// A JSON config file with the same keys as these flags: coordinators, node, system,
    /// trusted_keys, threshold, state_dir, interval, build_policy, long_poll,
    /// realise_timeout, extra_substituters, extra_trusted_public_keys
    /// [default: /etc/roost/agent.json when it exists].
    #[arg(long, env = "ROOST_CONFIG")]
    config: Option<PathBuf>,
    /// Coordinator base URL (http:// or https://); repeat for fallbacks, tried in order.
    #[arg(long = "coordinator", value_name = "URL")]
    coordinators: Vec<String>,
    /// This node's name, as in the flake's `deploy.nodes` [default: hostname].
    #[arg(long)]
    node: Option<String>,
    /// This node's Nix system; manifests for another are refused [default: the agent's own,
    /// e.g. x86_64-linux].
    #[arg(long)]
    system: Option<String>,
    /// A publisher public key file (`name:base64`, from `nix-store
    /// --generate-binary-cache-key`); repeat for several.
    #[arg(long = "trusted-key", value_name = "PUBLIC_FILE")]
    trusted_keys: Vec<PathBuf>,
    /// How many distinct trusted keys must sign a manifest [default: 1].
    #[arg(long, value_name = "N")]
    threshold: Option<usize>,
    /// The state folder [default: /var/lib/roost].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Time between polls when the coordinator does not hold them open, ± 20 %, e.g. 30s,
    /// 5min [default: 5min].
    #[arg(long, value_name = "DURATION")]
    interval: Option<String>,
    /// Whether the node may build: only substitute, build from drv_path when substitution
    /// fails, or always build [default: fallback].
    #[arg(long, value_enum)]
    build_policy: Option<BuildPolicy>,
    /// Never hold polls open, even where the coordinator offers it.
    #[arg(long)]
    no_long_poll: bool,
    /// A CA certificate (PEM) to trust for HTTPS coordinators behind a private CA, besides
    /// the web PKI roots; repeat for several.
    #[arg(long = "ca-cert", value_name = "PEM")]
    ca_certs: Vec<PathBuf>,
}

impl ConfigArgs {
    /// Merges the file and the flags and validates them.
    pub fn resolve(self) -> Result<Config, String> {
        let mut f = config_file(&self.config)?;
        if !self.coordinators.is_empty() {
            f.coordinators = self.coordinators;
        }
        if !self.trusted_keys.is_empty() {
            f.trusted_keys = self.trusted_keys;
        }
        f.node = self.node.or(f.node);
        f.system = self.system.or(f.system);
        f.threshold = self.threshold.or(f.threshold);
        f.state_dir = self.state_dir.or(f.state_dir);
        f.interval = self.interval.or(f.interval);
        f.build_policy = self.build_policy.or(f.build_policy);
        if self.no_long_poll {
            f.long_poll = Some(false);
        }
        if !self.ca_certs.is_empty() {
            f.ca_certs = self.ca_certs;
        }
        f.resolve().map_err(|e| e.to_string())
    }
}

fn usage(e: impl std::fmt::Display) -> u8 {
    eprintln!("error: {e}");
    USAGE
}

fn failed(e: anyhow::Error) -> u8 {
    eprintln!("error: {e:#}");
    FAILED
}

/// A configured agent holding the state folder's lock.
fn open(cfg: ConfigArgs) -> Result<(Agent, StateLock), u8> {
    let cfg = cfg.resolve().map_err(usage)?;
    let lock = StateDir::new(&cfg.state_dir).lock().map_err(|e| {
        eprintln!("error: {e}");
        FAILED
    })?;
    let agent = Agent::new(cfg, Arc::new(Nix::new()), Arc::new(SystemClock))
        .context("cannot start the agent")
        .map_err(failed)?;
    Ok((agent, lock))
}

/// Runs a command; returns the exit code.
pub async fn dispatch(cmd: Cmd) -> u8 {
    match cmd {
        Cmd::Run { cfg, once } => {
            let (mut agent, _lock) = match open(cfg) {
                Ok(a) => a,
                Err(c) => return c,
            };
            if once {
                return run_once(&mut agent).await;
            }
            let shutdown = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut term) => {
                        tokio::select! {
                            _ = term.recv() => {}
                            _ = tokio::signal::ctrl_c() => {}
                        }
                    }
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            };
            match daemon::run(agent, Arc::new(SystemClock), shutdown)
                .await
                .context("the daemon stopped")
            {
                Ok(()) => 0,
                Err(e) => failed(e),
            }
        }
        Cmd::Status { at, json } => {
            let (dir, _) = match at.resolve() {
                Ok(x) => x,
                Err(e) => return usage(e),
            };
            match status::collect(&dir) {
                Ok(doc) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&doc).expect("JSON serialises")
                        );
                    } else {
                        print!("{}", status::render(&doc));
                    }
                    0
                }
                Err(e) => failed(e.context(format!("cannot read the state in {}", dir.display()))),
            }
        }
        Cmd::Apply { file, cfg } => {
            let bytes = match std::fs::read(&file) {
                Ok(b) => b,
                Err(e) => return usage(format!("{}: {e}", file.display())),
            };
            let (mut agent, _lock) = match open(cfg) {
                Ok(a) => a,
                Err(c) => return c,
            };
            agent.recover().await;
            let v = agent.handle_manifest(&bytes, None).await;
            agent.flush_reports().await;
            print_outcome(&agent, v);
            exit_code(v)
        }
        Cmd::Rollback { profile, cfg } => {
            let (mut agent, _lock) = match open(cfg) {
                Ok(a) => a,
                Err(c) => return c,
            };
            let r = agent.manual_rollback(profile.as_deref()).await;
            agent.flush_reports().await;
            match r {
                Ok(done) => {
                    for d in done {
                        println!("{d}");
                    }
                    0
                }
                Err(e) => failed(e.into()),
            }
        }
        Cmd::Key { at, node } => {
            let (dir, cfg_node) = match at.resolve() {
                Ok(x) => x,
                Err(e) => return usage(e),
            };
            let node = node
                .or(cfg_node)
                .or_else(crate::config::hostname)
                .unwrap_or_else(|| "node".into());
            match StateDir::new(&dir).node_key(&node) {
                Ok(k) => {
                    println!("{}", k.public());
                    0
                }
                Err(e) => failed(anyhow::Error::new(e).context(format!(
                    "cannot read or make the node key in {}",
                    dir.display()
                ))),
            }
        }
        Cmd::CheckConfig { cfg } => match cfg.resolve() {
            Ok(c) => {
                print!("{}", describe_config(&c));
                println!("configuration OK");
                0
            }
            Err(e) => usage(e),
        },
    }
}

/// `run --once`: recover, one poll and apply, deliver reports, exit code from the verdict.
async fn run_once(agent: &mut Agent) -> u8 {
    agent.recover().await;
    let r = daemon::cycle(agent, None).await;
    agent.note_poll(&r.poll, None, u32::from(!r.reachable));
    agent.idle();
    if !r.reachable {
        eprintln!("error: poll {}", r.poll);
    }
    let left = agent.flush_reports().await;
    if left > 0 {
        eprintln!("{left} report(s) queued for later delivery");
    }
    if r.reachable {
        print_outcome(agent, r.verdict);
        exit_code(r.verdict)
    } else {
        match agent.state().current_version {
            Some(v) => println!("unreachable: no coordinator answered; still running version {v}"),
            None => println!("unreachable: no coordinator answered"),
        }
        FAILED
    }
}

fn exit_code(v: Verdict) -> u8 {
    match v {
        Verdict::Converged => 0,
        Verdict::NotConverged => FAILED,
    }
}

fn print_outcome(agent: &Agent, v: Verdict) {
    let st = agent.state();
    let version = st.desired.as_ref().map(|m| m.version);
    match (v, &st.last_deploy) {
        (Verdict::Converged, _) => match version {
            Some(ver) => println!("converged: version {ver}"),
            None => println!("nothing to do: no manifest yet"),
        },
        (Verdict::NotConverged, Some(d)) if d.version == version || version.is_none() => {
            let ver = d.version.map(|v| v.to_string()).unwrap_or("-".into());
            match &d.error {
                Some(e) => println!("{} (version {ver}): {}: {}", d.state, e.phase, e.message),
                None => println!("{} (version {ver})", d.state),
            }
        }
        (Verdict::NotConverged, _) => {
            println!("not converged (see the log and `roost-agent status`)")
        }
    }
}

/// The resolved configuration, for `check-config`.
pub fn describe_config(c: &Config) -> String {
    let keys: Vec<String> = c.trusted.keys().map(|k| k.name().to_owned()).collect();
    format!(
        "node          {}\nsystem        {}\ncoordinators  {}\ntrusted keys  {} (threshold {})\n\
         state dir     {}\ninterval      {}\nlong-poll     {}\nbuild policy  {}\n\
         realise limit {}\n",
        c.node,
        c.system,
        if c.coordinators.is_empty() {
            "(none: `apply` only)".into()
        } else {
            c.coordinators.join(", ")
        },
        keys.join(", "),
        c.trusted.threshold(),
        c.state_dir.display(),
        humantime::format_duration(c.interval),
        if c.long_poll { "where offered" } else { "off" },
        match c.build_policy {
            BuildPolicy::SubstituteOnly => "substitute-only",
            BuildPolicy::Fallback => "fallback",
            BuildPolicy::Build => "build",
        },
        humantime::format_duration(c.realise_timeout),
    )
}
