//! `roost-coordinator rollout`: where a coordinator's current rollout stands, wave by wave,
//! and an operator's `pause`, `resume`, `abort` and `promote [--wave K]`
//! (docs/protocol.md §6.9).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use roost_common::Timestamp;
use roost_common::wire::v1::http as v1;
use roost_common::wire::v1::rollout::{
    Action, PromoteRequest, RolloutDoc, RolloutState, RolloutStatus,
};

use crate::status::format_table;

/// Arguments of `rollout`.
#[derive(Debug, Args)]
#[command(after_help = "\
A coordinator releases each publish wave by wave (`roost.wave` of each node): wave k+1 once at
least minHealthy of wave k reported success for this publish and bakeTime has passed, while no
more than maxFailed of it failed (`roost.rollout` at deploy level in the flake). More failures
halt the rollout until an operator acts:

  roost-coordinator rollout status            per wave: nodes, released, healthy/failed/pending,
                                              what it waits for, and why it halted
  roost-coordinator rollout pause             release nothing further until resume
  roost-coordinator rollout resume            end a pause, or a halt (its failures accepted)
  roost-coordinator rollout promote [--wave K]  release the next wave (or up to K) now
  roost-coordinator rollout abort             release nothing further of this publish

The token: --token-file FILE (the admin token, or the upload token), else $ROOST_UPLOAD_TOKEN
as for publish. `status` needs it unless the coordinator serves with --public-read.
Exit status: 0 done (status: not halted), 1 the coordinator refused or could not be reached
(status: the rollout is halted), 2 bad usage.")]
pub struct RolloutArgs {
    /// What to do.
    #[command(subcommand)]
    pub cmd: RolloutCmd,
    /// The coordinator's URL.
    #[arg(
        long,
        global = true,
        env = "ROOST_COORDINATOR",
        default_value = "http://127.0.0.1:8080"
    )]
    pub coordinator: String,
    /// File holding the admin token or the upload token (default: $ROOST_UPLOAD_TOKEN).
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "ROOST_ADMIN_TOKEN_FILE"
    )]
    pub token_file: Option<PathBuf>,
    /// Print the rollout document as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// Extra CA certificate (PEM) to trust for an HTTPS coordinator with a private CA.
    #[arg(long, global = true, value_name = "PEM")]
    pub ca_cert: Option<PathBuf>,
}

/// The subcommands of `rollout`.
#[derive(Debug, Clone, Copy, Subcommand)]
pub enum RolloutCmd {
    /// Show the current rollout, wave by wave.
    Status,
    /// Release nothing further until `resume`.
    Pause,
    /// End a pause, or a halt (the failures so far are accepted; new ones halt again).
    Resume,
    /// Release nothing further of this publish; released nodes keep what they got.
    Abort,
    /// Release the next wave now, whatever the policy says.
    Promote {
        /// Release every wave up to and including this one.
        #[arg(long)]
        wave: Option<u32>,
    },
}

impl RolloutCmd {
    fn action(self) -> Option<(Action, Option<u32>)> {
        match self {
            RolloutCmd::Status => None,
            RolloutCmd::Pause => Some((Action::Pause, None)),
            RolloutCmd::Resume => Some((Action::Resume, None)),
            RolloutCmd::Abort => Some((Action::Abort, None)),
            RolloutCmd::Promote { wave } => Some((Action::Promote, wave)),
        }
    }
}

fn token(args: &RolloutArgs) -> anyhow::Result<Option<String>> {
    if let Some(f) = &args.token_file {
        let t =
            std::fs::read_to_string(f).with_context(|| format!("--token-file {}", f.display()))?;
        return Ok(Some(t.trim().to_owned()));
    }
    Ok(std::env::var("ROOST_UPLOAD_TOKEN")
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty()))
}

/// Runs `rollout`.
pub async fn run(args: RolloutArgs) -> u8 {
    let setup = token(&args).and_then(|t| {
        let (client, base) =
            crate::status::coordinator_client(&args.coordinator, args.ca_cert.as_deref())?;
        Ok((t, client, base))
    });
    let (token, client, base) = match setup {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return crate::exit::USAGE;
        }
    };
    let action = args.cmd.action();
    if action.is_some() && token.is_none() {
        eprintln!(
            "error: a rollout action needs the admin or upload token: --token-file FILE or $ROOST_UPLOAD_TOKEN"
        );
        return crate::exit::USAGE;
    }
    let req = match action {
        None => client.get(v1::rollout_url(&base)),
        Some((a, wave)) => {
            let r = client.post(v1::rollout_action_url(&base, a.as_str()));
            match wave {
                Some(w) => r.json(&PromoteRequest { wave: Some(w) }),
                None => r,
            }
        }
    };
    let req = match &token {
        Some(t) => req.bearer_auth(t),
        None => req,
    };
    let doc = match call(req).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e:#}");
            return crate::exit::FAILED;
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        if let Some((a, _)) = action {
            println!("{}: done", a.as_str());
        }
        print!("{}", render(&doc, Timestamp::now()));
    }
    let halted = doc
        .rollout
        .as_ref()
        .is_some_and(|r| r.state == RolloutState::Halted);
    if action.is_none() && halted {
        crate::exit::FAILED
    } else {
        crate::exit::OK
    }
}

async fn call(req: reqwest::RequestBuilder) -> anyhow::Result<RolloutDoc> {
    let resp = req.send().await.context("cannot reach the coordinator")?;
    let (status, url) = (resp.status(), resp.url().to_string());
    let body = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let message = json["message"].as_str().unwrap_or(body.trim());
        anyhow::bail!("{url} answered {status}: {message}");
    }
    serde_json::from_str(&body).with_context(|| format!("{url} answered no rollout document"))
}

/// The rollout as text: a summary, a table of waves, and why it halted.
pub fn render(doc: &RolloutDoc, now: Timestamp) -> String {
    let Some(r) = &doc.rollout else {
        return "no rollout: nothing gated has been published to this coordinator\n".to_owned();
    };
    let mut out = summary(r, now);
    let yes = |b: bool| if b { "yes" } else { "no" }.to_owned();
    let rows: Vec<[String; 7]> = r
        .waves
        .iter()
        .map(|w| {
            [
                w.wave.to_string(),
                format!("{}", w.nodes),
                yes(w.released),
                format!("{}/{}", w.healthy, w.needed),
                w.failed.to_string(),
                w.pending.to_string(),
                w.waiting_for.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push_str(&format_table(
        &[
            "WAVE",
            "NODES",
            "RELEASED",
            "HEALTHY/NEEDED",
            "FAILED",
            "PENDING",
            "WAITING FOR",
        ],
        &rows,
    ));
    if let Some(h) = &r.halt {
        out.push_str(&format!("halted at {}: {}\n", h.at, h.reason));
        for n in &h.nodes {
            out.push_str(&format!(
                "  {}  {}  {}\n",
                n.node,
                n.state,
                n.error.as_deref().unwrap_or("(no error message)")
            ));
        }
        out.push_str(
            "then: `rollout resume` to go on (these failures accepted), `rollout promote` to \
             release the next wave anyway, or `rollout abort`\n",
        );
    }
    out
}

/// The rollout in a line or a few, under `roost-coordinator status`'s table: its state, the
/// waves released, and why it halted.
pub fn brief(r: &RolloutStatus) -> String {
    let released: Vec<String> = r
        .waves
        .iter()
        .filter(|w| w.released)
        .map(|w| w.wave.to_string())
        .collect();
    let mut out = format!(
        "rollout {}: {}, wave(s) released: {} of {}",
        r.id,
        r.state.as_str(),
        if released.is_empty() {
            "none".to_owned()
        } else {
            released.join(", ")
        },
        r.waves.len()
    );
    match &r.halt {
        Some(h) => {
            out.push_str(&format!("\nhalted: {}\n", h.reason));
            for n in &h.nodes {
                out.push_str(&format!(
                    "  {}  {}  {}\n",
                    n.node,
                    n.state,
                    n.error.as_deref().unwrap_or("(no error message)")
                ));
            }
            out.push_str("see `roost-coordinator rollout status`; then resume, promote or abort\n");
        }
        None => out.push('\n'),
    }
    out
}

fn summary(r: &RolloutStatus, now: Timestamp) -> String {
    let p = &r.policy;
    format!(
        "rollout {}: {} (started {}, {} s ago)\npolicy: minHealthy {}, maxFailed {}, bakeTime {} s\n",
        r.id,
        r.state.as_str(),
        r.started_at,
        now.secs_since(r.started_at),
        p.min_healthy,
        p.max_failed,
        p.bake_time_s
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_common::wire::v1::rollout::{FailedNode, Halt, Policy, WaveStatus};

    fn wave(wave: u32, released: bool, healthy: u32, failed: u32) -> WaveStatus {
        WaveStatus {
            wave,
            nodes: 2,
            uploaded: 2,
            released,
            released_at: None,
            healthy,
            failed,
            pending: 2 - healthy - failed,
            forgiven: 0,
            needed: 2,
            threshold_met_at: None,
            waiting_for: (!released).then(|| "earlier waves".to_owned()),
        }
    }

    #[test]
    fn a_halt_is_shown_with_its_nodes_and_what_to_do() {
        let doc = RolloutDoc {
            rollout: Some(RolloutStatus {
                id: 7,
                state: RolloutState::Halted,
                started_at: Timestamp::from_unix(100),
                policy: Policy {
                    min_healthy: 1.0,
                    max_failed: 0,
                    bake_time_s: 0,
                },
                waves: vec![
                    wave(0, true, 2, 0),
                    wave(1, true, 1, 1),
                    wave(2, false, 0, 0),
                ],
                paused: false,
                halt: Some(Halt {
                    at: Timestamp::from_unix(200),
                    wave: 1,
                    reason: "1 node(s) of wave 1 failed".into(),
                    nodes: vec![FailedNode {
                        node: "pi-kitchen".into(),
                        state: "rolled_back".into(),
                        error: Some("activation exited 1".into()),
                    }],
                }),
                aborted_at: None,
            }),
        };
        let text = render(&doc, Timestamp::from_unix(300));
        assert!(text.starts_with("rollout 7: halted"), "{text}");
        assert!(
            text.contains("pi-kitchen  rolled_back  activation exited 1"),
            "{text}"
        );
        assert!(text.contains("earlier waves"), "{text}");
        assert!(text.contains("rollout resume"), "{text}");
    }

    #[test]
    fn no_rollout_says_so() {
        let text = render(&RolloutDoc { rollout: None }, Timestamp::from_unix(0));
        assert!(text.starts_with("no rollout"), "{text}");
    }
}
