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
    /// failure. Needs at least one coordinator (exit 2 without).
    // The fault-injection variable exists in debug builds only, so only they mention it.
    #[cfg_attr(
        debug_assertions,
        command(
            after_help = "Debug build: ROOST_FAULT=<phase>[:pause] kills (or pauses) the agent \
                              at that phase, for crash tests."
        )
    )]
    Run {
        #[command(flatten)]
        cfg: ConfigArgs,
        #[command(flatten)]
        trust: TrustArgs,
        #[command(flatten)]
        poll: PollArgs,
        /// Poll and apply once, then exit: 0 when converged or there is nothing to do,
        /// 1 when the manifest was rejected, the deploy failed, was rolled back or deferred,
        /// the coordinator has no manifest for this node, or no coordinator answered.
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
        #[command(flatten)]
        trust: TrustArgs,
    },
    /// Put a profile back at its previous generation (every profile of the manifest when
    /// none is named), re-run that generation's activation, quarantine the version so it is
    /// not re-applied, and report it. Stop the daemon first. An unknown profile exits 2.
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
    /// Postpone a pending deploy by DURATION (e.g. 4h; 0 ends a deferral), at most the
    /// configuration's `max_defer` (default 24h) and never past the manifest's expiry.
    /// Works while the daemon runs.
    Defer {
        /// How long, e.g. 30min, 4h.
        duration: String,
        #[command(flatten)]
        at: StateArgs,
    },
    /// Send one desktop notification on a session bus (what the agent runs as each user).
    #[command(hide = true)]
    NotifyUser {
        /// The bus address, e.g. unix:path=/run/user/1000/bus.
        #[arg(long)]
        address: String,
        #[arg(long)]
        summary: String,
        #[arg(long)]
        body: String,
        #[arg(long, default_value_t = 1)]
        urgency: u8,
    },
    /// Check a configuration (file and flags) and print what it resolves to; exit 2 with the
    /// reason when it is invalid.
    CheckConfig {
        #[command(flatten)]
        cfg: ConfigArgs,
        #[command(flatten)]
        trust: TrustArgs,
        #[command(flatten)]
        poll: PollArgs,
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

/// The configuration keys every configured command uses, as flags; flags override the
/// `--config` file. [`TrustArgs`] and [`PollArgs`] hold the keys only some commands use.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The agent's JSON config file; flags override its keys (coordinators, node, system,
    /// trusted_keys, threshold, state_dir, interval, build_policy, long_poll,
    /// realise_timeout, extra_substituters, extra_trusted_public_keys, ca_certs; a command
    /// uses those it needs) [default: /etc/roost/agent.json when it exists].
    #[arg(long, env = "ROOST_CONFIG")]
    config: Option<PathBuf>,
    /// Coordinator base URL (http:// or https://) to poll and send reports to; repeat for
    /// fallbacks, tried in order.
    #[arg(long = "coordinator", value_name = "URL")]
    coordinators: Vec<String>,
    /// This node's name, as in the flake's `deploy.nodes` [default: hostname].
    #[arg(long)]
    node: Option<String>,
    /// The state folder [default: /var/lib/roost].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// A CA certificate (PEM) to trust for HTTPS coordinators behind a private CA, besides
    /// the web PKI roots; repeat for several.
    #[arg(long = "ca-cert", value_name = "PEM")]
    ca_certs: Vec<PathBuf>,
}

/// What commands that verify and apply manifests (`run`, `apply`) also use.
#[derive(Debug, Args)]
pub struct TrustArgs {
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
    /// Whether the node may build: only substitute, build from drv_path when substitution
    /// fails, or always build [default: fallback].
    #[arg(long, value_enum)]
    build_policy: Option<BuildPolicy>,
}

/// What only the polling command (`run`) also uses.
#[derive(Debug, Args)]
pub struct PollArgs {
    /// Time between polls when the coordinator does not hold them open, ± 20 %, e.g. 30s,
    /// 5min [default: 5min].
    #[arg(long, value_name = "DURATION")]
    interval: Option<String>,
    /// Never hold polls open, even where the coordinator offers it.
    #[arg(long)]
    no_long_poll: bool,
}

impl ConfigArgs {
    /// Merges the file and the flags; `trust` and `poll` are the command's other flags, when
    /// it takes them.
    fn merge(self, trust: Option<TrustArgs>, poll: Option<PollArgs>) -> Result<ConfigFile, String> {
        let mut f = config_file(&self.config)?;
        if !self.coordinators.is_empty() {
            f.coordinators = self.coordinators;
        }
        f.node = self.node.or(f.node);
        f.state_dir = self.state_dir.or(f.state_dir);
        if !self.ca_certs.is_empty() {
            f.ca_certs = self.ca_certs;
        }
        if let Some(t) = trust {
            if !t.trusted_keys.is_empty() {
                f.trusted_keys = t.trusted_keys;
            }
            f.system = t.system.or(f.system);
            f.threshold = t.threshold.or(f.threshold);
            f.build_policy = t.build_policy.or(f.build_policy);
        }
        if let Some(p) = poll {
            f.interval = p.interval.or(f.interval);
            if p.no_long_poll {
                f.long_poll = Some(false);
            }
        }
        Ok(f)
    }

    /// The validated configuration of a command that verifies manifests.
    pub fn resolve(self, trust: TrustArgs, poll: Option<PollArgs>) -> Result<Config, String> {
        self.merge(Some(trust), poll)?
            .resolve()
            .map_err(|e| e.to_string())
    }

    /// The validated configuration of `rollback`, which verifies nothing: publisher keys
    /// are not needed.
    fn resolve_without_trust(self) -> Result<Config, String> {
        self.merge(None, None)?
            .resolve_without_trust()
            .map_err(|e| e.to_string())
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
fn open(cfg: Result<Config, String>) -> Result<(Agent, StateLock), u8> {
    let cfg = cfg.map_err(usage)?;
    let lock = StateDir::new(&cfg.state_dir).lock().map_err(|e| {
        eprintln!("error: {e}");
        FAILED
    })?;
    let agent = Agent::new(cfg, Arc::new(Nix::new()), crate::poll::process_clock())
        .context("cannot start the agent")
        .map_err(failed)?;
    Ok((agent, lock))
}

/// Runs a command; returns the exit code.
pub async fn dispatch(cmd: Cmd) -> u8 {
    match cmd {
        Cmd::Run {
            cfg,
            trust,
            poll,
            once,
        } => {
            let cfg = cfg.resolve(trust, Some(poll)).and_then(|c| {
                if c.coordinators.is_empty() {
                    Err("no coordinator to poll: pass --coordinator URL or set `coordinators` in the \
                         config file (`roost-agent apply FILE` works without one)"
                        .into())
                } else {
                    Ok(c)
                }
            });
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
            match daemon::run(agent, crate::poll::process_clock(), shutdown)
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
            // A mistyped --state-dir must not read as a node with nothing deployed.
            if !dir.is_dir() {
                return usage(format!(
                    "no agent state at {}: the agent has not run with this state folder (check \
                     --state-dir or the config's state_dir)",
                    dir.display()
                ));
            }
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
        Cmd::Apply { file, cfg, trust } => {
            let bytes = match std::fs::read(&file) {
                Ok(b) => b,
                Err(e) => return usage(format!("{}: {e}", file.display())),
            };
            let (mut agent, _lock) = match open(cfg.resolve(trust, None)) {
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
            let (mut agent, _lock) = match open(cfg.resolve_without_trust()) {
                Ok(a) => a,
                Err(c) => return c,
            };
            if let Some(e) = unknown_profile(&agent, profile.as_deref()) {
                return usage(e);
            }
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
        Cmd::Defer { duration, at } => {
            let file = match config_file(&at.config) {
                Ok(f) => f,
                Err(e) => return usage(e),
            };
            let (dir, _) = match at.resolve() {
                Ok(x) => x,
                Err(e) => return usage(e),
            };
            match crate::laptop::defer_command(&dir, &duration, file.max_defer.as_deref()) {
                Ok(text) => {
                    println!("{text}");
                    0
                }
                Err(crate::laptop::DeferError::Usage(e)) => usage(e),
                Err(crate::laptop::DeferError::Failed(e)) => failed(anyhow::anyhow!(e)),
            }
        }
        Cmd::NotifyUser {
            address,
            summary,
            body,
            urgency,
        } => match crate::notifications::notify_on_bus(&address, &summary, &body, urgency).await {
            Ok(_) => 0,
            Err(e) => failed(anyhow::anyhow!("{address}: {e}")),
        },
        Cmd::CheckConfig { cfg, trust, poll } => match cfg.resolve(trust, Some(poll)) {
            Ok(c) => {
                print!("{}", describe_config(&c));
                println!("configuration OK");
                0
            }
            Err(e) => usage(e),
        },
    }
}

/// Why `rollback PROFILE` names no profile of the applied manifest (bad usage), if it does
/// not. With no manifest applied there is nothing to roll back: that is the rollback's own
/// failure (exit 1), reported by it.
fn unknown_profile(agent: &Agent, profile: Option<&str>) -> Option<String> {
    let (name, m) = (profile?, agent.state().desired.as_ref()?);
    let names: Vec<&str> = m.profiles.iter().map(|p| p.name.as_str()).collect();
    (!names.contains(&name)).then(|| {
        format!(
            "no profile `{name}` in the applied manifest (version {}); it has: {}",
            m.version,
            names.join(", ")
        )
    })
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
    if r.reachable && agent.coordinator_has_no_manifest() {
        let node = &agent.config().node;
        println!(
            "the coordinator has no manifest for node `{node}`: nothing is deployed until one \
             is published for this name (is it in the flake's deploy.nodes, spelt so?)"
        );
        FAILED
    } else if r.reachable {
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
                Some(e) => println!(
                    "{} (version {ver}): {}: {}",
                    d.state.as_str(),
                    e.phase,
                    e.message
                ),
                None => println!("{} (version {ver})", d.state.as_str()),
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
    ) + &describe_laptop(&c.laptop)
}

/// The laptop and Pi settings, for `check-config`.
fn describe_laptop(l: &crate::config::Laptop) -> String {
    use roost_common::size::human_bytes;
    format!(
        "apply windows {}\npower         wait on battery {}\nmetered       downloads over {} wait\n\
         system goal   {}\nmax defer     {}\nretention     {} healthy generation(s); GC {}\n\
         metrics file  {}\nnotifications {}\n",
        if l.apply_windows.is_empty() {
            "(none of its own: the manifest's, else any time)".into()
        } else {
            l.apply_windows.to_string()
        },
        if l.power.defer_on_battery {
            "always".to_owned()
        } else {
            format!("below {} %", l.power.min_battery_percent)
        },
        human_bytes(l.metered_max_download),
        match l.system_goal {
            crate::config::SystemGoal::Switch => "switch",
            crate::config::SystemGoal::Boot => "boot (active after the next reboot)",
        },
        humantime::format_duration(l.max_defer),
        l.keep_generations,
        match (l.gc_after_deploy, l.gc_min_free) {
            (true, _) => "after every deploy".to_owned(),
            (false, Some(min)) => format!("after a deploy below {} free", human_bytes(min)),
            (false, None) => "only to make room for a download".to_owned(),
        },
        l.metrics_file
            .as_ref()
            .map_or_else(|| "(none)".into(), |p| p.display().to_string()),
        if l.notifications { "on" } else { "off" },
    )
}
