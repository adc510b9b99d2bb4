//! `roost-coordinator status`: the fleet as a table (or `--json`), with stale and failed
//! nodes flagged.

use std::time::Duration;

use clap::Args;
use roost_common::time::{human_duration, parse_duration};
use serde_json::Value;

/// Arguments of `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The coordinator to ask.
    #[arg(
        long,
        env = "ROOST_COORDINATOR",
        default_value = "http://127.0.0.1:8080"
    )]
    pub coordinator: String,
    /// Print the coordinator's fleet document as JSON.
    #[arg(long)]
    pub json: bool,
    /// A node that has not reported for this long is flagged STALE.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub stale: Duration,
}

/// Node states that mean the last deploy did not land.
const BAD_STATES: &[&str] = &["failed", "rolled_back", "rejected"];

/// Runs `status`. Exit 0 when every node is current and healthy, 1 when any is failed,
/// stale or behind, 2 on bad usage, and 1 when the coordinator cannot be reached.
pub async fn run(args: StatusArgs) -> u8 {
    let url = format!("{}/v1/fleet", args.coordinator.trim_end_matches('/'));
    let doc: Value = match fetch(&url).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: cannot read {url}: {e}");
            return crate::exit::FAILED;
        }
    };
    let nodes = doc["nodes"].as_array().cloned().unwrap_or_default();
    let mut all_good = true;
    let rows: Vec<[String; 7]> = nodes
        .iter()
        .map(|n| {
            let desired = n["desired_version"].as_u64();
            let reported = n["reported_version"].as_u64();
            let state = n["state"].as_str().unwrap_or("-").to_owned();
            let since = n["seconds_since_report"].as_u64();
            let mut flags = Vec::new();
            if since.is_none_or(|s| s > args.stale.as_secs()) {
                flags.push("STALE");
            }
            if BAD_STATES.contains(&state.as_str()) {
                flags.push("FAILED");
            }
            if desired.is_some() && reported != desired && flags.is_empty() {
                flags.push("BEHIND");
            }
            if n["key_source"].as_str() == Some("tofu") {
                flags.push("KEY-PINNED-ON-FIRST-USE");
            }
            if flags.iter().any(|f| *f != "KEY-PINNED-ON-FIRST-USE") {
                all_good = false;
            }
            let health = match n["healthy"].as_bool() {
                Some(true) => "ok",
                Some(false) => "FAILING",
                None => "-",
            };
            [
                n["node"].as_str().unwrap_or("?").to_owned(),
                desired.map_or("-".into(), |v| v.to_string()),
                reported.map_or("-".into(), |v| v.to_string()),
                state,
                health.to_owned(),
                since.map_or("never".into(), |s| {
                    format!("{} ago", human_duration(Duration::from_secs(s)))
                }),
                flags.join(" "),
            ]
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else if rows.is_empty() {
        println!("no nodes yet: publish manifests with `roost-coordinator publish`");
    } else {
        print_table(
            &[
                "NODE",
                "DESIRED",
                "REPORTED",
                "STATE",
                "HEALTH",
                "LAST SEEN",
                "FLAGS",
            ],
            &rows,
        );
    }
    if all_good {
        crate::exit::OK
    } else {
        crate::exit::FAILED
    }
}

async fn fetch(url: &str) -> anyhow::Result<Value> {
    let resp = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()?
        .get(url)
        .send()
        .await?;
    let status = resp.status();
    let body = resp.text().await?;
    anyhow::ensure!(status.is_success(), "{status}: {body}");
    Ok(serde_json::from_str(&body)?)
}

/// Prints rows under headers with columns padded to fit.
pub fn print_table<const N: usize>(headers: &[&str; N], rows: &[[String; N]]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}
