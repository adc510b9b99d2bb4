//! `roost-coordinator status`: the fleet as a coordinator sees it, as a table (or `--json`),
//! with stale and failed nodes flagged.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use roost_common::time::{human_duration, parse_duration};
use serde::Serialize;
use serde_json::Value;

/// Arguments of `status`.
#[derive(Debug, Args)]
#[command(after_help = "\
Columns: NODE; DESIRED, the version of its current manifest; REPORTED, the manifest version of
its last report; STATE of that report; HEALTH of its last checks; LAST SEEN, when that report
arrived; FLAGS:
  STALE   no report within --stale (a node that never reported: once its manifest is older)
  FAILED  last state failed, rolled_back or rejected, or a health check failing
  BEHIND  reported version below the desired one (deploying, or stuck)
  TOFU    its report key was pinned on first use: put it in the flake as roost.nodeKey, or
          pin it with `roost-coordinator node-key`

Exit status: 0 when no node is stale or failed, 1 when some are or the coordinator cannot be
read, 2 for bad usage (a --coordinator that is not an http(s) URL, an unreadable --ca-cert).
BEHIND and TOFU alone do not fail.")]
pub struct StatusArgs {
    /// The coordinator's URL.
    #[arg(
        long,
        env = "ROOST_COORDINATOR",
        default_value = "http://127.0.0.1:8080"
    )]
    pub coordinator: String,
    /// Print JSON: the coordinator's fleet document with `flags` added to each node and
    /// `ok` (the exit status as a boolean) at the top.
    #[arg(long)]
    pub json: bool,
    /// Flag a node STALE when its last report is older than this (e.g. 30m, 1h, 2d).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub stale: Duration,
    /// Extra CA certificate (PEM) to trust for an HTTPS coordinator with a private CA.
    #[arg(long, value_name = "PEM")]
    pub ca_cert: Option<PathBuf>,
}

/// Node states that mean the last deploy did not land.
const BAD_STATES: &[&str] = &["failed", "rolled_back", "rejected"];

/// Why a node is flagged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Flag {
    /// No report within the stale limit.
    Stale,
    /// The last deploy failed, rolled back or was rejected, or a health check fails.
    Failed,
    /// The reported version is below the desired one.
    Behind,
    /// The report key was pinned on first use.
    Tofu,
}

impl Flag {
    fn label(self) -> &'static str {
        match self {
            Flag::Stale => "STALE",
            Flag::Failed => "FAILED",
            Flag::Behind => "BEHIND",
            Flag::Tofu => "TOFU",
        }
    }

    /// Whether this flag makes `status` exit 1.
    pub fn is_bad(self) -> bool {
        matches!(self, Flag::Stale | Flag::Failed)
    }
}

/// One node of the fleet document, judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The node.
    pub node: String,
    /// Its manifest's version.
    pub desired: Option<u64>,
    /// The manifest version of its last report.
    pub reported: Option<u64>,
    /// The state of its last report.
    pub state: Option<String>,
    /// Whether its last health checks all passed.
    pub healthy: Option<bool>,
    /// Seconds since its last report.
    pub since_report: Option<u64>,
    /// What is wrong.
    pub flags: Vec<Flag>,
}

/// Judges every node of a `/v1/fleet` document.
pub fn assess(doc: &Value, stale: Duration) -> Vec<Row> {
    let now = doc["generated_at"]
        .as_str()
        .and_then(|s| s.parse::<roost_common::Timestamp>().ok());
    let nodes = doc["nodes"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    nodes
        .iter()
        .map(|n| {
            let desired = n["desired_version"].as_u64();
            let reported = n["reported_version"].as_u64();
            let state = n["state"].as_str().map(str::to_owned);
            let healthy = n["healthy"].as_bool();
            let since_report = n["seconds_since_report"].as_u64();
            let mut flags = Vec::new();
            let stale_s = stale.as_secs();
            let is_stale = match since_report {
                Some(s) => s > stale_s,
                // Never reported: stale once the manifest has had `stale` to arrive.
                None => {
                    let issued = n["issued_at"]
                        .as_str()
                        .and_then(|s| s.parse::<roost_common::Timestamp>().ok());
                    match (now, issued) {
                        (Some(now), Some(issued)) => now.secs_since(issued) > stale_s,
                        _ => true,
                    }
                }
            };
            if is_stale {
                flags.push(Flag::Stale);
            }
            if state.as_deref().is_some_and(|s| BAD_STATES.contains(&s)) || healthy == Some(false) {
                flags.push(Flag::Failed);
            }
            if let (Some(d), Some(r)) = (desired, reported) {
                if r < d {
                    flags.push(Flag::Behind);
                }
            }
            if n["key_source"].as_str() == Some("tofu") {
                flags.push(Flag::Tofu);
            }
            Row {
                node: n["node"].as_str().unwrap_or("?").to_owned(),
                desired,
                reported,
                state,
                healthy,
                since_report,
                flags,
            }
        })
        .collect()
}

/// Runs `status`.
pub async fn run(args: StatusArgs) -> u8 {
    let (client, url) = match client(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return crate::exit::USAGE;
        }
    };
    let mut doc = match fetch(&client, &url).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: cannot read the fleet from {url}: {e:#}");
            return crate::exit::FAILED;
        }
    };
    let rows = assess(&doc, args.stale);
    let ok = rows.iter().all(|r| !r.flags.iter().any(|f| f.is_bad()));
    if args.json {
        if let Some(nodes) = doc["nodes"].as_array_mut() {
            for (n, r) in nodes.iter_mut().zip(&rows) {
                n["flags"] = serde_json::to_value(&r.flags).unwrap_or_default();
            }
        }
        doc["ok"] = Value::Bool(ok);
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else if rows.is_empty() {
        println!("no nodes yet: publish manifests with `roost-coordinator publish`");
    } else {
        print!("{}", table(&rows));
        let bad = rows
            .iter()
            .filter(|r| r.flags.iter().any(|f| f.is_bad()))
            .count();
        println!(
            "\n{} node(s), {} stale or failed (stale after {})",
            rows.len(),
            bad,
            human_duration(args.stale)
        );
    }
    if ok {
        crate::exit::OK
    } else {
        crate::exit::FAILED
    }
}

/// The HTTP client and the fleet document's URL; every error is bad usage (exit 2).
fn client(args: &StatusArgs) -> anyhow::Result<(reqwest::Client, String)> {
    let (client, base) = coordinator_client(&args.coordinator, args.ca_cert.as_deref())?;
    Ok((client, roost_common::wire::v1::http::fleet_url(&base)))
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

async fn fetch(client: &reqwest::Client, url: &str) -> anyhow::Result<Value> {
    let resp = client.get(url).send().await?;
    let status = resp.status();
    let body = resp.text().await?;
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

/// The fleet as an aligned text table.
pub fn table(rows: &[Row]) -> String {
    let headers = [
        "NODE",
        "DESIRED",
        "REPORTED",
        "STATE",
        "HEALTH",
        "LAST SEEN",
        "FLAGS",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.node.clone(),
                r.desired.map_or("-".into(), |v| v.to_string()),
                r.reported.map_or("-".into(), |v| v.to_string()),
                r.state.clone().unwrap_or_else(|| "-".into()),
                match r.healthy {
                    Some(true) => "ok".into(),
                    Some(false) => "failing".into(),
                    None => "-".into(),
                },
                r.since_report.map_or("never".into(), |s| {
                    format!("{} ago", human_duration(Duration::from_secs(s)))
                }),
                r.flags
                    .iter()
                    .map(|f| f.label())
                    .collect::<Vec<_>>()
                    .join(" "),
            ]
        })
        .collect();
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
    fn a_node_silent_longer_than_the_limit_is_stale() {
        let d = doc(json!([
            {"node": "a", "desired_version": 2, "reported_version": 2, "state": "success", "seconds_since_report": 7200},
            {"node": "b", "desired_version": 2, "reported_version": 2, "state": "success", "seconds_since_report": 60},
        ]));
        let rows = assess(&d, Duration::from_secs(3600));
        assert_eq!(rows[0].flags, vec![Flag::Stale]);
        assert!(rows[1].flags.is_empty());
    }

    #[test]
    fn a_node_that_never_reported_is_stale_only_once_its_manifest_is_old() {
        let d = doc(json!([
            {"node": "new", "desired_version": 2, "issued_at": "2026-11-22T11:59:00Z"},
            {"node": "old", "desired_version": 2, "issued_at": "2026-11-20T12:00:00Z"},
        ]));
        let rows = assess(&d, Duration::from_secs(3600));
        assert!(rows[0].flags.is_empty());
        assert_eq!(rows[1].flags, vec![Flag::Stale]);
    }

    #[test]
    fn rolled_back_and_failing_health_are_failed_and_behind_is_not_bad() {
        let d = doc(json!([
            {"node": "a", "desired_version": 3, "reported_version": 3, "state": "rolled_back", "seconds_since_report": 1},
            {"node": "b", "desired_version": 3, "reported_version": 3, "state": "success", "healthy": false, "seconds_since_report": 1},
            {"node": "c", "desired_version": 3, "reported_version": 2, "state": "downloading", "seconds_since_report": 1},
        ]));
        let rows = assess(&d, Duration::from_secs(3600));
        assert_eq!(rows[0].flags, vec![Flag::Failed]);
        assert_eq!(rows[1].flags, vec![Flag::Failed]);
        assert_eq!(rows[2].flags, vec![Flag::Behind]);
        assert!(!Flag::Behind.is_bad());
    }

    #[test]
    fn the_table_says_how_long_ago_in_words() {
        let d = doc(json!([
            {"node": "pi", "desired_version": 3, "reported_version": 3, "state": "success", "healthy": true, "seconds_since_report": 3 * 86400 + 5},
        ]));
        let t = table(&assess(&d, Duration::from_secs(3600)));
        let line = t.lines().nth(1).unwrap();
        assert!(line.starts_with("pi "), "{t}");
        assert!(line.contains("3 days ago") && line.contains("STALE"), "{t}");
    }
}
