//! `roost-agent status`: where this node stands. Deploy state comes from `state.json`; the
//! last and next poll from the running daemon over `agent.sock`, or, when no daemon runs,
//! from `status.json` (there `last_poll.at` is when the poll result last changed, since idle
//! polls write nothing).

use std::path::Path;
use std::time::Duration;

use roost_common::Timestamp;
use roost_common::nix::profiles;
use roost_common::time::human_duration;
use serde_json::{Value, json};

use crate::activate::default_profile_path;
use crate::state::{Snapshot, StateDir};

/// Asks the live daemon for its view, if it runs.
pub fn live_view(dir: &Path) -> Option<Snapshot> {
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
    let running = live.is_some();
    let snap = live.or_else(|| sd.load_snapshot());
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
    let last_poll = snap.as_ref().and_then(|s| {
        s.last_poll_result
            .as_ref()
            .map(|r| json!({"at": s.last_poll_at, "result": r}))
    });
    Ok(json!({
        "node": state.desired.as_ref().map(|m| m.node.to_string()),
        "state_dir": dir,
        "daemon_running": running,
        "phase": snap.as_ref().map(|s| s.phase).filter(|_| running),
        "manifest_version": state.desired.as_ref().map(|m| m.version),
        "current_version": state.current_version,
        "floor": state.floor.map(|f| f.version),
        "issued_at": state.desired.as_ref().map(|m| m.issued_at),
        "expires_at": state.desired.as_ref().map(|m| m.expires_at),
        "source": state.desired.as_ref().and_then(|m| m.source.clone()),
        "profiles": profiles,
        "last_poll": last_poll,
        // While a poll is in flight (a held long-poll mostly is) the next poll is that one.
        "next_poll": snap.as_ref().and_then(|s| s.polling_since.or(s.next_poll_at)).filter(|_| running),
        "polling_since": snap.as_ref().and_then(|s| s.polling_since).filter(|_| running),
        "poll_failures": snap.as_ref().map_or(0, |s| s.failures),
        "long_poll": snap.as_ref().is_some_and(|s| s.long_poll),
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

/// The status for people.
pub fn render(doc: &Value) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let s = |v: &Value| {
        v.as_str().map(str::to_owned).unwrap_or_else(|| {
            if v.is_null() {
                "-".into()
            } else {
                v.to_string()
            }
        })
    };
    let _ = writeln!(o, "node            {}", s(&doc["node"]));
    let _ = writeln!(
        o,
        "manifest        version {} (running {}), expires {}",
        s(&doc["manifest_version"]),
        s(&doc["current_version"]),
        s(&doc["expires_at"])
    );
    match doc["daemon_running"].as_bool() {
        Some(true) => {
            let _ = writeln!(o, "daemon          running, {}", s(&doc["phase"]));
        }
        _ => {
            let _ = writeln!(
                o,
                "daemon          not running (state folder {})",
                s(&doc["state_dir"])
            );
        }
    }
    if doc["last_poll"].is_null() {
        let _ = writeln!(o, "last poll       none recorded");
    } else {
        let _ = writeln!(
            o,
            "last poll       {}: {}",
            ago(&doc["last_poll"]["at"]),
            s(&doc["last_poll"]["result"])
        );
    }
    if !doc["polling_since"].is_null() {
        let held = if doc["long_poll"] == true {
            " (held open by the coordinator until a new manifest or the wait ends)"
        } else {
            ""
        };
        let _ = writeln!(
            o,
            "next poll       in flight, began {}{held}",
            ago(&doc["polling_since"])
        );
    } else if !doc["next_poll"].is_null() {
        let _ = writeln!(o, "next poll       {}", ago(&doc["next_poll"]));
    }
    let ld = &doc["last_deploy"];
    if ld.is_null() {
        let _ = writeln!(o, "last deploy     none yet");
    } else {
        let _ = writeln!(
            o,
            "last deploy     {} of version {} ({})",
            s(&ld["state"]),
            s(&ld["version"]),
            ago(&ld["at"])
        );
        if !ld["error"].is_null() {
            let _ = writeln!(
                o,
                "                {}: {}",
                s(&ld["error"]["phase"]),
                s(&ld["error"]["message"])
            );
        }
    }
    if !doc["pending"].is_null() {
        let _ = writeln!(
            o,
            "PENDING         deploy of version {} in progress or interrupted",
            s(&doc["pending"]["version"])
        );
    }
    let list = |v: &Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    let q = list(&doc["quarantined"]);
    let _ = writeln!(
        o,
        "quarantined     {}",
        if q.is_empty() { "none".into() } else { q }
    );
    let r = list(&doc["pending_reports"]);
    let _ = writeln!(
        o,
        "queued reports  {}",
        if r.is_empty() {
            "none".into()
        } else {
            format!("seq {r}")
        }
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<12} {:<5} {:<9} CURRENT / DESIRED",
        "PROFILE", "GEN", "STATE"
    );
    for p in doc["profiles"].as_array().into_iter().flatten() {
        let ok = if p["up_to_date"].as_bool() == Some(true) {
            "current"
        } else {
            "BEHIND"
        };
        let _ = writeln!(
            o,
            "{:<12} {:<5} {:<9} {}",
            s(&p["name"]),
            s(&p["generation"]),
            ok,
            s(&p["current"])
        );
        if ok != "current" {
            let _ = writeln!(o, "{:<12} {:<5} {:<9} {}", "", "", "", s(&p["desired"]));
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(polling_since: Value, next_poll: Value) -> Value {
        json!({
            "node": "pi", "daemon_running": true, "phase": "idle", "long_poll": true,
            "last_poll": null, "polling_since": polling_since, "next_poll": next_poll,
            "last_deploy": null, "pending": null, "quarantined": [], "pending_reports": [],
        })
    }

    #[test]
    fn a_poll_in_flight_is_shown_as_such_not_as_a_due_time() {
        let t = Timestamp::now().to_string();
        let out = render(&doc(json!(t), json!(t)));
        assert!(out.contains("next poll       in flight, began"), "{out}");
        assert!(out.contains("held open by the coordinator"), "{out}");
    }

    #[test]
    fn between_polls_the_due_time_is_shown() {
        let later = Timestamp::from(std::time::SystemTime::now() + Duration::from_secs(300));
        let out = render(&doc(Value::Null, json!(later.to_string())));
        assert!(
            out.contains("next poll       in 4 min") || out.contains("next poll       in 5 min"),
            "{out}"
        );
        assert!(!out.contains("in flight"), "{out}");
    }
}
