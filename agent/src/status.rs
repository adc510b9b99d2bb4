//! `roost-agent status`: where this node stands, from the state folder and, when the daemon
//! runs, its live view (last and next poll) over `agent.sock`.

use std::path::Path;
use std::time::Duration;

use roost_common::Timestamp;
use roost_common::nix::profiles;
use roost_common::time::human_duration;
use serde_json::{Value, json};

use crate::activate::default_profile_path;
use crate::state::StateDir;

/// Asks the live daemon for its view, if it runs.
pub fn live_view(dir: &Path) -> Option<Value> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(dir.join("agent.sock")).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    serde_json::from_slice(&buf).ok()
}

/// The status document (what `--json` prints).
pub fn collect(dir: &Path) -> anyhow::Result<Value> {
    let sd = StateDir::new(dir);
    let state = sd.load()?;
    let live = live_view(dir);
    let profiles: Vec<Value> = state
        .desired
        .as_ref()
        .map(|m| {
            m.profiles
                .iter()
                .map(|p| {
                    let link = default_profile_path(p);
                    let cur = profiles::current(&link).ok().flatten();
                    json!({
                        "name": p.name,
                        "profile_path": link,
                        "current": cur.as_ref().map(|g| g.target.display().to_string()),
                        "generation": cur.as_ref().map(|g| g.number),
                        "desired": p.path,
                        "up_to_date": cur.as_ref().is_some_and(|g| g.target == p.path.as_path()),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let queued: Vec<u64> = sd.queued_reports().into_iter().map(|(s, _)| s).collect();
    Ok(json!({
        "node": state.desired.as_ref().map(|m| m.node.to_string()),
        "state_dir": dir,
        "daemon_running": live.is_some(),
        "manifest_version": state.desired.as_ref().map(|m| m.version),
        "current_version": state.current_version,
        "floor": state.floor.map(|f| f.version),
        "issued_at": state.desired.as_ref().map(|m| m.issued_at),
        "expires_at": state.desired.as_ref().map(|m| m.expires_at),
        "profiles": profiles,
        "last_poll": live.as_ref().map(|l| json!({"at": l["last_poll_at"], "result": l["last_poll_result"]})),
        "next_poll": live.as_ref().map(|l| l["next_poll_at"].clone()),
        "phase": live.as_ref().map(|l| l["phase"].clone()),
        "last_deploy": state.last_deploy,
        "pending": state.pending,
        "pending_reports": queued,
        "quarantined": state.quarantined,
    }))
}

fn ago(ts: &Value) -> String {
    match ts.as_str().and_then(|s| s.parse::<Timestamp>().ok()) {
        Some(t) => {
            let now = Timestamp::now();
            if t > now {
                format!(
                    "in {}",
                    human_duration(Duration::from_secs(t.secs_since(now)))
                )
            } else {
                format!(
                    "{} ago",
                    human_duration(Duration::from_secs(now.secs_since(t)))
                )
            }
        }
        None => "-".into(),
    }
}

/// Prints the status for people.
pub fn print(doc: &Value) {
    let s = |v: &Value| {
        v.as_str().map(str::to_owned).unwrap_or_else(|| {
            if v.is_null() {
                "-".into()
            } else {
                v.to_string()
            }
        })
    };
    println!("node            {}", s(&doc["node"]));
    println!(
        "manifest        version {} (current {}), expires {}",
        s(&doc["manifest_version"]),
        s(&doc["current_version"]),
        s(&doc["expires_at"])
    );
    match doc["daemon_running"].as_bool() {
        Some(true) => {
            println!("daemon          running, {}", s(&doc["phase"]));
            println!(
                "last poll       {} — {}",
                ago(&doc["last_poll"]["at"]),
                s(&doc["last_poll"]["result"])
            );
            println!("next poll       {}", ago(&doc["next_poll"]));
        }
        _ => println!(
            "daemon          not running (state folder {})",
            s(&doc["state_dir"])
        ),
    }
    let ld = &doc["last_deploy"];
    if ld.is_null() {
        println!("last deploy     none yet");
    } else {
        println!(
            "last deploy     {} of version {} ({})",
            s(&ld["state"]),
            s(&ld["version"]),
            ago(&ld["at"])
        );
        if !ld["error"].is_null() {
            println!(
                "                {}: {}",
                s(&ld["error"]["phase"]),
                s(&ld["error"]["message"])
            );
        }
    }
    if !doc["pending"].is_null() {
        println!(
            "PENDING         deploy of version {} in progress or interrupted",
            s(&doc["pending"]["version"])
        );
    }
    let q = doc["quarantined"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    println!(
        "quarantined     {}",
        if q.is_empty() { "none".into() } else { q }
    );
    println!(
        "pending reports {}",
        doc["pending_reports"].as_array().map_or(0, Vec::len)
    );
    println!();
    println!(
        "{:<12} {:<5} {:<9} CURRENT / DESIRED",
        "PROFILE", "GEN", "STATE"
    );
    for p in doc["profiles"].as_array().into_iter().flatten() {
        let ok = if p["up_to_date"].as_bool() == Some(true) {
            "current"
        } else {
            "BEHIND"
        };
        println!(
            "{:<12} {:<5} {:<9} {}",
            s(&p["name"]),
            s(&p["generation"]),
            ok,
            s(&p["current"])
        );
        if ok != "current" {
            println!("{:<12} {:<5} {:<9} {}", "", "", "", s(&p["desired"]));
        }
    }
}
