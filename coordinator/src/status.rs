//! `roost-coordinator status [NODE]`: the fleet as a coordinator sees it, as a table (or
//! `--json`) with every node that needs a human flagged and why; or one node in full with
//! its report history. The flags are the coordinator's (`crate::flags`): this only asks for
//! them with the limits given and prints them.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use roost_common::time::{human_duration, parse_duration};
use roost_common::wire::v1::http as v1;
use serde_json::Value;

use roost_common::wire::v1::rollout::{NodeRollout, RolloutState, RolloutStatus};

use crate::flags::{Flag, Flagged};

/// Arguments of `status`.
#[derive(Debug, Args)]
#[command(after_help = "\
Columns: NODE; WAVE, its rollout wave (`held` after it while the current rollout holds its new
manifest back); DESIRED, the source revision (short; `+` when the tree was dirty) of its
current manifest, or its version when it names none; REPORTED, the same for the version of its
last report; STATE of that report; SEEN, its last report or manifest poll; FLAGS; and REASON,
why the first flag is raised (or the last report's error), cut to the terminal's width.
Flags, with the `code` their reason carries in --json and /metrics:
  UNKNOWN   a name that polls or reports here but has no manifest (the agent's node name is not
            in the flake's deploy.nodes)
  STALE     no report and no poll within --stale
  FAILED    the last deploy failed or rolled back, or a health check fails
  REFUSED   the coordinator refuses its reports (the check that failed: bad_signature, ...), or
            the node refused its manifest (why: expired, bad_signature, ...)
  STUCK     in contact but not converged to its desired version --stuck after the manifest
            was stored (deferred, say), with the agent's error
  EXPIRED   its manifest has expired: agents refuse it; publish again
  EXPIRING  its manifest expires within --expiring
  BEHIND    reported version below the desired one (a deploy under way)
  TOFU      its report key was pinned on first use: put it in the flake as roost.nodeKey, or
            pin it with `roost-coordinator node-key`

With NODE: that node in full (manifest, paths, positions, flags with reasons, refusals) and its
report history, newest first.

Under the table: the current rollout (state, waves released, and why it halted).

Exit status: 0 when no node carries a flag other than BEHIND and TOFU and the rollout is not
halted, 1 when some do or it is (or NODE does) or the coordinator cannot be read, 2 for bad
usage (a --coordinator that is not an http(s) URL, an unreadable --ca-cert or --token-file).")]
pub struct StatusArgs {
    /// Show this node in full, with its report history.
    pub node: Option<String>,
    /// The coordinator's URL.
    #[arg(
        long,
        env = "ROOST_COORDINATOR",
        default_value = "http://127.0.0.1:8080"
    )]
    pub coordinator: String,
    /// Print JSON: the coordinator's fleet document (flags with reasons in each node) and
    /// `ok` (the exit status as a boolean); with NODE, `{node, reports, ok}`.
    #[arg(long)]
    pub json: bool,
    /// Flag a node STALE after this long without a report or a poll (e.g. 30m, 1h, 2d;
    /// default: the coordinator's, 1h unless `serve --stale-after`).
    #[arg(long, value_parser = parse_duration)]
    pub stale: Option<Duration>,
    /// Flag a node STUCK when it has not converged this long after its manifest was stored
    /// (default: the coordinator's, 30m).
    #[arg(long, value_parser = parse_duration)]
    pub stuck: Option<Duration>,
    /// Flag a node EXPIRING when its manifest expires within this (default: the
    /// coordinator's, 7d).
    #[arg(long, value_parser = parse_duration)]
    pub expiring: Option<Duration>,
    /// How many reports of NODE's history to show.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub history: u64,
    /// File holding the coordinator's read token (or its admin or upload token); not needed
    /// when it serves with --public-read.
    #[arg(long, value_name = "FILE", env = "ROOST_READ_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Extra CA certificate (PEM) to trust for an HTTPS coordinator with a private CA.
    #[arg(long, value_name = "PEM")]
    pub ca_cert: Option<PathBuf>,
}

/// One node of the fleet document, as the table shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The node.
    pub node: String,
    /// Its wave, `held` after it while the current rollout holds its new manifest back.
    pub wave: String,
    /// Its manifest: short revision, or version.
    pub desired: String,
    /// Its last report's version: short revision, or version.
    pub reported: String,
    /// The state of its last report.
    pub state: Option<String>,
    /// Seconds since its last report or poll.
    pub since_contact: Option<u64>,
    /// What is wrong, and why.
    pub flags: Vec<Flagged>,
    /// The last report's error: `phase: message`.
    pub error: Option<String>,
}

impl Row {
    /// Whether a flag needs a human.
    pub fn is_bad(&self) -> bool {
        self.flags.iter().any(|f| f.flag.is_bad())
    }

    /// The REASON cell: the first flag's reason, else the last error.
    pub fn reason(&self) -> String {
        match self.flags.first() {
            Some(f) => f.reason.clone(),
            None => self.error.clone().unwrap_or_default(),
        }
    }
}

/// A revision as the table shows it: 7 characters, `+` when dirty; `None` without one.
fn short_rev(source: &Value) -> Option<String> {
    let dirty = source["dirty"].as_bool() == Some(true);
    let rev = source["rev"]
        .as_str()
        .map(|r| r.chars().take(7).collect::<String>());
    match (rev, dirty) {
        (Some(r), true) => Some(format!("{r}+")),
        (Some(r), false) => Some(r),
        (None, true) => Some("dirty".into()),
        (None, false) => None,
    }
}

fn version_cell(source: &Value, version: &Value) -> String {
    short_rev(source)
        .or_else(|| version.as_u64().map(|v| v.to_string()))
        .unwrap_or_else(|| "-".into())
}

/// The flags of one node of the fleet document.
fn flags_of(n: &Value) -> Vec<Flagged> {
    serde_json::from_value(n["flags"].clone()).unwrap_or_default()
}

/// Reads every node of a `/v1/fleet` document.
pub fn rows(doc: &Value) -> Vec<Row> {
    let nodes = doc["nodes"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    nodes
        .iter()
        .map(|n| {
            let contact = [&n["seconds_since_report"], &n["seconds_since_poll"]]
                .iter()
                .filter_map(|v| v.as_u64())
                .min();
            let error = n["error"]["message"]
                .as_str()
                .filter(|m| !m.is_empty())
                .map(|m| match n["error"]["phase"].as_str() {
                    Some(p) if !p.is_empty() => format!("{p}: {m}"),
                    _ => m.to_owned(),
                });
            let held = n["rollout"]["released"] == false;
            Row {
                node: n["node"].as_str().unwrap_or("?").to_owned(),
                wave: match (n["wave"].as_u64(), held) {
                    (Some(w), false) => w.to_string(),
                    (Some(w), true) => format!("{w} held"),
                    (None, _) => "-".into(),
                },
                desired: version_cell(&n["source"], &n["desired_version"]),
                reported: version_cell(&n["reported_source"], &n["reported_version"]),
                state: n["state"].as_str().map(str::to_owned),
                since_contact: contact,
                flags: flags_of(n),
                error,
            }
        })
        .collect()
}

/// Runs `status`.
pub async fn run(args: StatusArgs) -> u8 {
    let (client, base, token) = match setup(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return crate::exit::USAGE;
        }
    };
    let url = fleet_query_url(&base, &args);
    let mut doc = match fetch(&client, &url, token.as_deref()).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: cannot read the fleet from {url}: {e:#}");
            return crate::exit::FAILED;
        }
    };
    let ok = match &args.node {
        Some(node) => match one_node(&args, &client, &base, token.as_deref(), &doc, node).await {
            Ok(ok) => ok,
            Err(e) => {
                eprintln!("error: {e:#}");
                return crate::exit::FAILED;
            }
        },
        None => {
            let rows = rows(&doc);
            let rollout = rollout_of(&doc);
            let halted = rollout
                .as_ref()
                .is_some_and(|r| r.state == RolloutState::Halted);
            let ok = !rows.iter().any(Row::is_bad) && !halted;
            if args.json {
                doc["ok"] = Value::Bool(ok);
                println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
            } else if rows.is_empty() {
                println!("no nodes yet: publish manifests with `roost-coordinator publish`");
            } else {
                print!("{}", table(&rows, terminal_width()));
                println!("\n{}", summary(&doc, &rows));
                if let Some(r) = &rollout {
                    print!("{}", crate::rollout::brief(r));
                }
            }
            ok
        }
    };
    if ok {
        crate::exit::OK
    } else {
        crate::exit::FAILED
    }
}

/// The current rollout of a fleet document, when there is one.
fn rollout_of(doc: &Value) -> Option<RolloutStatus> {
    serde_json::from_value(doc.get("rollout")?.clone()).ok()
}

/// `N node(s), M need attention: 2 STUCK, 1 REFUSED (stale after 1 hour, …)`.
fn summary(doc: &Value, rows: &[Row]) -> String {
    let bad = rows.iter().filter(|r| r.is_bad()).count();
    let mut counts: Vec<String> = Vec::new();
    for f in Flag::ALL {
        let n = rows
            .iter()
            .filter(|r| r.flags.iter().any(|g| g.flag == f))
            .count();
        if n > 0 {
            counts.push(format!("{n} {}", f.label()));
        }
    }
    let limit = |k: &str| {
        doc["thresholds"][k]
            .as_u64()
            .map_or("?".into(), |s| human_duration(Duration::from_secs(s)))
    };
    let mut s = format!("{} node(s), {bad} need attention", rows.len());
    if !counts.is_empty() {
        let _ = write!(s, ": {}", counts.join(", "));
    }
    let _ = write!(
        s,
        " (stale after {}, stuck after {}, expiring within {})",
        limit("stale_s"),
        limit("stuck_s"),
        limit("expiring_s")
    );
    s
}

/// One node in full, then its report history; whether it carries no bad flag.
async fn one_node(
    args: &StatusArgs,
    client: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    doc: &Value,
    node: &str,
) -> anyhow::Result<bool> {
    let nodes = doc["nodes"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let Some(n) = nodes.iter().find(|n| n["node"] == node) else {
        anyhow::bail!(
            "the coordinator knows no node `{node}`: no manifest, no report and no poll under that name"
        );
    };
    let history = if n["desired_version"].is_null() {
        Value::Array(Vec::new())
    } else {
        let url = v1::report_history_url(base, node, args.history);
        fetch(client, &url, token)
            .await
            .with_context(|| format!("cannot read {node}'s report history from {url}"))?["reports"]
            .take()
    };
    let flags = flags_of(n);
    let ok = !flags.iter().any(|f| f.flag.is_bad());
    if args.json {
        let out = serde_json::json!({"node": n, "reports": history, "ok": ok});
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        print!("{}", node_detail(n, &history));
    }
    Ok(ok)
}

/// A node of the fleet document and its history, as text.
pub fn node_detail(n: &Value, history: &Value) -> String {
    let mut out = String::new();
    let s = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    let ago = |secs: &Value| {
        secs.as_u64().map_or("never".into(), |x| {
            format!("{} ago", human_duration(Duration::from_secs(x)))
        })
    };
    let _ = writeln!(out, "node        {}", s(&n["node"]));
    let rev = |src: &Value| {
        let r = src["rev"].as_str().unwrap_or("-");
        if src["dirty"].as_bool() == Some(true) {
            format!("{r} (dirty)")
        } else {
            r.to_owned()
        }
    };
    let _ = writeln!(
        out,
        "desired     version {}, revision {}{}",
        s(&n["desired_version"]),
        rev(&n["source"]),
        n["source"]["flake"]
            .as_str()
            .map(|f| format!(", from {f}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "reported    version {}, revision {}, state {}, health {}",
        s(&n["reported_version"]),
        rev(&n["reported_source"]),
        s(&n["state"]),
        match n["healthy"].as_bool() {
            Some(true) => "ok",
            Some(false) => "failing",
            None => "-",
        }
    );
    let _ = writeln!(
        out,
        "manifest    stored {}, issued {}, expires {}",
        s(&n["stored_at"]),
        s(&n["issued_at"]),
        s(&n["expires_at"])
    );
    let _ = writeln!(
        out,
        "last report {} (seq {})",
        ago(&n["seconds_since_report"]),
        s(&n["last_seq"])
    );
    let _ = writeln!(out, "last poll   {}", ago(&n["seconds_since_poll"]));
    match serde_json::from_value::<NodeRollout>(n["rollout"].clone()) {
        Ok(p) => _ = writeln!(out, "rollout     {p}"),
        Err(_) if n["wave"].is_u64() => _ = writeln!(out, "wave        {}", n["wave"]),
        Err(_) => {}
    }
    let _ = writeln!(
        out,
        "report key  {} ({})",
        s(&n["node_key"]),
        s(&n["key_source"])
    );
    let current: Vec<&Value> = n["last_report"]["profiles"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    if let Some(desired) = n["desired"].as_array() {
        for d in desired {
            let profile = s(&d["profile"]);
            let now = current
                .iter()
                .find(|c| c["name"] == d["profile"])
                .map_or("-".into(), |c| s(&c["current"]));
            let _ = writeln!(out, "profile     {profile}");
            let _ = writeln!(out, "  desired   {}", s(&d["path"]));
            let _ = writeln!(out, "  current   {now}");
        }
    }
    if n["error"].is_object() {
        let _ = writeln!(
            out,
            "last error  {}: {}",
            s(&n["error"]["phase"]),
            s(&n["error"]["message"])
        );
    }
    if n["refusal"].is_object() {
        let r = &n["refusal"];
        let _ = writeln!(
            out,
            "refused     its reports, {} ({}{}): {}",
            s(&r["at"]),
            s(&r["code"]),
            if r["active"].as_bool() == Some(true) {
                ""
            } else {
                ", a report was accepted since"
            },
            s(&r["message"])
        );
    }
    if n["rejection"].is_object() {
        let _ = writeln!(
            out,
            "it refused  a manifest, {}: {}",
            s(&n["rejection"]["at"]),
            s(&n["rejection"]["message"])
        );
    }
    let flags = flags_of(n);
    if flags.is_empty() {
        let _ = writeln!(out, "flags       none");
    }
    for f in &flags {
        let _ = writeln!(out, "{:<11} {} ({})", f.flag.label(), f.reason, f.code);
    }
    let reports = history.as_array().map(Vec::as_slice).unwrap_or(&[]);
    let _ = writeln!(
        out,
        "\nreport history ({} shown, newest first):",
        reports.len()
    );
    let cells: Vec<[String; 5]> = reports
        .iter()
        .map(|r| {
            let error = r["error"]["message"]
                .as_str()
                .map(|m| format!("{}: {m}", s(&r["error"]["phase"])))
                .unwrap_or_default();
            [
                s(&r["sent_at"]),
                s(&r["seq"]),
                s(&r["state"]),
                s(&r["manifest_version"]),
                error,
            ]
        })
        .collect();
    out.push_str(&format_table(
        &["SENT", "SEQ", "STATE", "VERSION", "ERROR"],
        &cells,
    ));
    out
}

/// The HTTP client, the coordinator's base URL and the read token; every error is bad
/// usage (exit 2).
fn setup(args: &StatusArgs) -> anyhow::Result<(reqwest::Client, String, Option<String>)> {
    let (client, base) = coordinator_client(&args.coordinator, args.ca_cert.as_deref())?;
    let token = match &args.token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("--token-file {}", f.display()))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    Ok((client, base, token))
}

/// `/v1/fleet` with the limits given on the command line.
fn fleet_query_url(base: &str, args: &StatusArgs) -> String {
    let mut q: Vec<String> = Vec::new();
    for (name, d) in [
        ("stale", args.stale),
        ("stuck", args.stuck),
        ("expiring", args.expiring),
    ] {
        if let Some(d) = d {
            q.push(format!("{name}={}s", d.as_secs()));
        }
    }
    let url = v1::fleet_url(base);
    if q.is_empty() {
        url
    } else {
        format!("{url}?{}", q.join("&"))
    }
}

/// An HTTP client for a coordinator at `coordinator` (an http(s) URL; returned without a
/// trailing `/`), trusting `ca_cert` too when given. Every error is bad usage (exit 2).
pub(crate) fn coordinator_client(
    coordinator: &str,
    ca_cert: Option<&std::path::Path>,
) -> anyhow::Result<(reqwest::Client, String)> {
    let base = coordinator.trim_end_matches('/');
    anyhow::ensure!(
        base.starts_with("http://") || base.starts_with("https://"),
        "--coordinator {base}: expected an http:// or https:// URL"
    );
    let mut client = reqwest::Client::builder().timeout(Duration::from_secs(15));
    if let Some(ca) = ca_cert {
        let context = || format!("--ca-cert {}", ca.display());
        let pem = std::fs::read(ca).with_context(context)?;
        // reqwest parses lazily; refuse what is plainly not a PEM certificate now.
        anyhow::ensure!(
            String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----"),
            "--ca-cert {}: not a PEM certificate (no BEGIN CERTIFICATE block)",
            ca.display()
        );
        let cert = reqwest::Certificate::from_pem(&pem).with_context(context)?;
        client = client.add_root_certificate(cert);
    }
    Ok((
        client.build().context("cannot set up the HTTP client")?,
        base.to_owned(),
    ))
}

async fn fetch(client: &reqwest::Client, url: &str, token: Option<&str>) -> anyhow::Result<Value> {
    let mut req = client.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await?;
    let status = resp.status();
    let body = resp.text().await?;
    if status == reqwest::StatusCode::UNAUTHORIZED {
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or(body);
        anyhow::bail!("{status}: {message}");
    }
    anyhow::ensure!(status.is_success(), "{status}: {body}");
    serde_json::from_str(&body).context("the answer is not a fleet document")
}

/// Prints rows under headers with columns padded to fit (also used by `publish`).
pub fn print_table<const N: usize>(headers: &[&str; N], rows: &[[String; N]]) {
    print!("{}", format_table(headers, rows));
}

/// Rows under headers as text, columns padded to fit.
pub fn format_table<const N: usize>(headers: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(s.join("  ").trim_end());
        out.push('\n');
    };
    line(headers);
    for r in rows {
        line(&r.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out
}

/// The width of the terminal stdout is, or `None` when it is not one (piped: nothing is
/// cut).
fn terminal_width() -> Option<usize> {
    use std::io::IsTerminal as _;
    if !std::io::stdout().is_terminal() {
        return None;
    }
    terminal_size::terminal_size().map(|(w, _)| w.0 as usize)
}

/// `s` cut to `max` characters, with `…` when cut.
fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// The narrowest the REASON column is cut to, however narrow the terminal.
const MIN_REASON: usize = 24;

/// The fleet as an aligned text table; the REASON column is cut so each line fits `width`
/// characters (`None`: not cut).
pub fn table(rows: &[Row], width: Option<usize>) -> String {
    let headers = [
        "NODE", "WAVE", "DESIRED", "REPORTED", "STATE", "SEEN", "FLAGS", "REASON",
    ];
    let mut cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.node.clone(),
                r.wave.clone(),
                r.desired.clone(),
                r.reported.clone(),
                r.state.clone().unwrap_or_else(|| "-".into()),
                r.since_contact.map_or("never".into(), |s| {
                    format!("{} ago", human_duration(Duration::from_secs(s)))
                }),
                r.flags
                    .iter()
                    .map(|f| f.flag.label())
                    .collect::<Vec<_>>()
                    .join(" "),
                r.reason(),
            ]
        })
        .collect();
    if let Some(width) = width {
        // Every column but the last, with the two spaces after each.
        let before: usize = (0..7)
            .map(|i| {
                cells
                    .iter()
                    .map(|c| c[i].chars().count())
                    .chain([headers[i].len()])
                    .max()
                    .unwrap_or(0)
                    + 2
            })
            .sum();
        let room = width.saturating_sub(before).max(MIN_REASON);
        for c in &mut cells {
            c[7] = cut(&c[7], room);
        }
    }
    format_table(&headers, &cells)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(nodes: Value) -> Value {
        json!({"generated_at": "2026-11-22T12:00:00Z", "nodes": nodes})
    }

    #[test]
    fn revisions_are_short_and_marked_dirty_and_versions_stand_in_for_none() {
        let d = doc(json!([
            {"node": "a", "desired_version": 1795349047123u64,
             "source": {"flake": "git+file:///f", "rev": "0123456789abcdef", "dirty": false},
             "reported_version": 1795349047000u64,
             "reported_source": {"rev": "fedcba9876543210", "dirty": true}},
            {"node": "b", "desired_version": 7, "source": null, "reported_version": null},
        ]));
        let rows = rows(&d);
        assert_eq!(
            (rows[0].desired.as_str(), rows[0].reported.as_str()),
            ("0123456", "fedcba9+")
        );
        assert_eq!(
            (rows[1].desired.as_str(), rows[1].reported.as_str()),
            ("7", "-")
        );
    }

    #[test]
    fn the_reason_column_is_cut_to_the_terminal_width() {
        let long = "x".repeat(300);
        let d = doc(json!([
            {"node": "pi", "desired_version": 3, "reported_version": 2, "state": "deferred",
             "seconds_since_report": 3 * 86400 + 5,
             "flags": [{"flag": "stuck", "code": "deferred", "reason": long}]},
        ]));
        let rows = rows(&d);
        assert!(rows[0].is_bad());
        let t = table(&rows, Some(100));
        let line = t.lines().nth(1).unwrap();
        assert_eq!(line.chars().count(), 100, "{t}");
        assert!(line.ends_with('…') && line.contains("STUCK") && line.contains("3 days ago"));
        let uncut = table(&rows, None);
        assert!(uncut.contains(&long));
    }

    #[test]
    fn a_node_seen_by_a_poll_counts_as_seen_and_behind_alone_is_not_bad() {
        let d = doc(json!([
            {"node": "n", "seconds_since_report": 7200, "seconds_since_poll": 4,
             "error": {"phase": "realise", "message": "no space"},
             "flags": [{"flag": "behind", "code": "behind", "reason": "reports version 1, desired 2"}]},
        ]));
        let rows = rows(&d);
        assert_eq!(rows[0].since_contact, Some(4));
        assert!(!rows[0].is_bad());
        assert_eq!(rows[0].error.as_deref(), Some("realise: no space"));
    }
}
