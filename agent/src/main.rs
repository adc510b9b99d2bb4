use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use roost_agent::config::{BuildPolicy, ConfigFile};
use roost_agent::{Agent, Verdict, daemon, state::StateDir, status};
use roost_common::nix::Nix;

/// roost's node agent: pull signed manifests, deploy them safely, report.
///
/// A typical node runs `roost-agent run --config /etc/roost/agent.json` under systemd.
/// `roost-agent status` shows where the node stands.
#[derive(Debug, Parser)]
#[command(name = "roost-agent", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Poll the coordinator and apply new manifests (a daemon; `--once` for timers and cron).
    Run {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Poll and apply once, then exit: 0 converged or nothing to do, 1 rejected, failed or rolled back.
        #[arg(long)]
        once: bool,
    },
    /// Where this node stands: profiles, versions, last poll and deploy, queued reports.
    Status {
        /// The state folder.
        #[arg(long, default_value = "/var/lib/roost", env = "ROOST_STATE_DIR")]
        state_dir: PathBuf,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Apply a signed manifest from a file (air-gapped nodes), through the same checks.
    Apply {
        /// The envelope file (as served at /v1/nodes/NODE/manifest).
        file: PathBuf,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Go back to the previous generation of a profile (all profiles when none is named).
    Rollback {
        /// The profile.
        profile: Option<String>,
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Print this node's public key (generated on first use), for `roost.nodeKey`.
    Key {
        /// The state folder.
        #[arg(long, default_value = "/var/lib/roost", env = "ROOST_STATE_DIR")]
        state_dir: PathBuf,
        /// Node name (default: hostname).
        #[arg(long)]
        node: Option<String>,
    },
    /// Check a configuration (file and flags) and print what it resolves to.
    CheckConfig {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
}

/// Every configuration key, as a flag; flags override the `--config` file.
#[derive(Debug, Args)]
struct ConfigArgs {
    /// A JSON config file with the same keys as these flags (coordinators, node, system,
    /// trusted_keys, threshold, state_dir, interval, build_policy, long_poll, …).
    #[arg(long, env = "ROOST_CONFIG")]
    config: Option<PathBuf>,
    /// Coordinator URL; repeat for fallbacks, tried in order.
    #[arg(long = "coordinator", value_name = "URL")]
    coordinators: Vec<String>,
    /// This node's name [default: hostname].
    #[arg(long)]
    node: Option<String>,
    /// This node's Nix system [default: the agent's own, e.g. x86_64-linux].
    #[arg(long)]
    system: Option<String>,
    /// Publisher public key file; repeat for several.
    #[arg(long = "trusted-key", value_name = "PUBLIC_FILE")]
    trusted_keys: Vec<PathBuf>,
    /// How many trusted keys must sign [default: 1].
    #[arg(long)]
    threshold: Option<usize>,
    /// The state folder [default: /var/lib/roost].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Poll interval, e.g. 30s, 5min [default: 5min].
    #[arg(long)]
    interval: Option<String>,
    /// When to build instead of substituting [default: fallback].
    #[arg(long, value_enum)]
    build_policy: Option<BuildPolicy>,
    /// Never hold polls open, even where the coordinator offers it.
    #[arg(long)]
    no_long_poll: bool,
}

impl ConfigArgs {
    fn resolve(self) -> Result<roost_agent::Config, String> {
        let mut f = match &self.config {
            Some(p) => ConfigFile::read(p).map_err(|e| e.to_string())?,
            None => ConfigFile::default(),
        };
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
        f.resolve().map_err(|e| e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    roost_common::logging::init("info");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    ExitCode::from(rt.block_on(dispatch(cli.cmd)))
}

fn usage(e: impl std::fmt::Display) -> u8 {
    eprintln!("error: {e}");
    2
}

fn new_agent(cfg: ConfigArgs) -> Result<Agent, u8> {
    let cfg = cfg.resolve().map_err(usage)?;
    Agent::new(cfg, Nix::new()).map_err(|e| {
        eprintln!("error: {e:#}");
        1
    })
}

async fn dispatch(cmd: Cmd) -> u8 {
    match cmd {
        Cmd::Run { cfg, once } => {
            let mut agent = match new_agent(cfg) {
                Ok(a) => a,
                Err(c) => return c,
            };
            if once {
                agent.recover().await;
                let (verdict, result) = daemon::cycle(&mut agent, None).await;
                if let Err(e) = &result {
                    eprintln!("error: {e}");
                }
                let left = agent.flush_reports().await;
                if left > 0 {
                    eprintln!("{left} report(s) queued for later delivery");
                }
                print_last(&agent);
                let ok = verdict == Verdict::Converged && result.is_ok();
                return if ok { 0 } else { 1 };
            }
            let shutdown = async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM");
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            };
            match daemon::run(agent, shutdown).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    1
                }
            }
        }
        Cmd::Status { state_dir, json } => match status::collect(&state_dir) {
            Ok(doc) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
                } else {
                    status::print(&doc);
                }
                0
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        },
        Cmd::Apply { file, cfg } => {
            let mut agent = match new_agent(cfg) {
                Ok(a) => a,
                Err(c) => return c,
            };
            let bytes = match std::fs::read(&file) {
                Ok(b) => b,
                Err(e) => return usage(format!("{}: {e}", file.display())),
            };
            agent.recover().await;
            let v = agent.handle_manifest(&bytes, None).await;
            agent.flush_reports().await;
            print_last(&agent);
            if v == Verdict::Converged { 0 } else { 1 }
        }
        Cmd::Rollback { profile, cfg } => {
            let mut agent = match new_agent(cfg) {
                Ok(a) => a,
                Err(c) => return c,
            };
            match agent.manual_rollback(profile.as_deref()).await {
                Ok(done) => {
                    for d in done {
                        println!("{d}");
                    }
                    0
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    1
                }
            }
        }
        Cmd::Key { state_dir, node } => {
            let node = node
                .or_else(|| {
                    std::fs::read_to_string("/proc/sys/kernel/hostname")
                        .ok()
                        .map(|s| s.trim().to_owned())
                })
                .unwrap_or_else(|| "node".into());
            match StateDir::new(&state_dir).node_key(&node) {
                Ok(k) => {
                    println!("{}", k.public());
                    0
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    1
                }
            }
        }
        Cmd::CheckConfig { cfg } => match cfg.resolve() {
            Ok(c) => {
                println!("node          {}", c.node);
                println!("system        {}", c.system);
                println!(
                    "coordinators  {}",
                    if c.coordinators.is_empty() {
                        "(none: apply only)".into()
                    } else {
                        c.coordinators.join(", ")
                    }
                );
                println!(
                    "trusted keys  {} (threshold {})",
                    c.trusted
                        .keys()
                        .map(|k| k.name().to_owned())
                        .collect::<Vec<_>>()
                        .join(", "),
                    c.trusted.threshold()
                );
                println!("state dir     {}", c.state_dir.display());
                println!("interval      {}", humantime::format_duration(c.interval));
                println!("build policy  {:?}", c.build_policy);
                println!("configuration OK");
                0
            }
            Err(e) => usage(e),
        },
    }
}

fn print_last(agent: &Agent) {
    if let Some(d) = &agent.state().last_deploy {
        match &d.error {
            Some(e) => eprintln!(
                "{} (version {:?}): {}: {}",
                d.state,
                d.version.map(|v| v.0),
                e.phase,
                e.message
            ),
            None => println!("{} (version {:?})", d.state, d.version.map(|v| v.0)),
        }
    }
}
