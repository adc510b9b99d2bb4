//! Node metrics (docs/protocol.md §7.15): a Prometheus text file for node-exporter's textfile
//! collector, rewritten atomically (temporary file + rename, so the collector never reads
//! half a file) after every poll and every deploy.

use std::fmt::Write;
use std::path::Path;

use roost_common::Timestamp;

use crate::retention::GcRecord;

/// Every deploy state a report can carry, so each has a series (0 or 1).
const STATES: [&str; 5] = ["success", "failed", "rolled_back", "deferred", "rejected"];

/// What the file says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeMetrics {
    /// When the last poll ended.
    pub last_poll: Option<Timestamp>,
    /// When the last poll that reached a coordinator ended.
    pub last_successful_poll: Option<Timestamp>,
    /// The accepted manifest's version.
    pub desired_version: Option<u64>,
    /// The version running and confirmed.
    pub current_version: Option<u64>,
    /// The last deploy outcome.
    pub state: Option<String>,
    /// Why the desired version waits (`window`, `power`, `metered`, `defer`, `realise`).
    pub deferred_reason: Option<String>,
    /// A new system is installed for the next boot.
    pub needs_reboot: bool,
    /// Rollbacks since the state folder was made.
    pub rollbacks: u64,
    /// Bytes of closures realised since the state folder was made.
    pub fetched_bytes: u64,
    /// The last garbage collection.
    pub last_gc: Option<GcRecord>,
}

fn gauge(o: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(o, "# HELP {name} {help}");
    let _ = writeln!(o, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(o, "{name}{labels} {v}");
    }
}

fn one(v: Option<f64>) -> Vec<(String, f64)> {
    v.map(|v| vec![(String::new(), v)]).unwrap_or_default()
}

fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl NodeMetrics {
    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut o = String::new();
        let secs = |t: Option<Timestamp>| t.map(|t| t.unix() as f64);
        gauge(
            &mut o,
            "roost_agent_last_poll_timestamp_seconds",
            "gauge",
            "When the last poll ended.",
            &one(secs(self.last_poll)),
        );
        gauge(
            &mut o,
            "roost_agent_last_successful_poll_timestamp_seconds",
            "gauge",
            "When the last poll that reached a coordinator ended.",
            &one(secs(self.last_successful_poll)),
        );
        gauge(
            &mut o,
            "roost_agent_desired_version",
            "gauge",
            "The accepted manifest's version.",
            &one(self.desired_version.map(|v| v as f64)),
        );
        gauge(
            &mut o,
            "roost_agent_current_version",
            "gauge",
            "The version running and confirmed.",
            &one(self.current_version.map(|v| v as f64)),
        );
        let states: Vec<(String, f64)> = STATES
            .iter()
            .map(|s| {
                let on = self.state.as_deref() == Some(*s);
                (format!("{{state=\"{s}\"}}"), if on { 1.0 } else { 0.0 })
            })
            .collect();
        gauge(
            &mut o,
            "roost_agent_state",
            "gauge",
            "1 for the last deploy outcome.",
            &states,
        );
        let deferred = match &self.deferred_reason {
            Some(r) => vec![(format!("{{reason=\"{}\"}}", label_value(r)), 1.0)],
            None => vec![(String::new(), 0.0)],
        };
        gauge(
            &mut o,
            "roost_agent_deferred",
            "gauge",
            "1 while the desired version waits, labelled with why.",
            &deferred,
        );
        gauge(
            &mut o,
            "roost_agent_needs_reboot",
            "gauge",
            "1 when a new system is installed for the next boot.",
            &one(Some(if self.needs_reboot { 1.0 } else { 0.0 })),
        );
        gauge(
            &mut o,
            "roost_agent_rollbacks_total",
            "counter",
            "Rollbacks on this node.",
            &one(Some(self.rollbacks as f64)),
        );
        gauge(
            &mut o,
            "roost_agent_fetched_bytes_total",
            "counter",
            "Bytes of closures realised (by their closure sizes).",
            &one(Some(self.fetched_bytes as f64)),
        );
        gauge(
            &mut o,
            "roost_agent_last_gc_freed_bytes",
            "gauge",
            "Bytes the last garbage collection freed.",
            &one(self.last_gc.map(|g| g.freed_bytes as f64)),
        );
        gauge(
            &mut o,
            "roost_agent_last_gc_timestamp_seconds",
            "gauge",
            "When the last garbage collection ran.",
            &one(self.last_gc.map(|g| g.at.unix() as f64)),
        );
        o
    }

    /// Writes the file atomically.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        roost_common::fs::write_atomic(path, self.render().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_help_and_type_and_the_state_is_one_hot() {
        let m = NodeMetrics {
            last_poll: Some(Timestamp::from_unix(100)),
            desired_version: Some(1_795_349_047_123),
            state: Some("deferred".into()),
            deferred_reason: Some("window".into()),
            rollbacks: 2,
            ..NodeMetrics::default()
        };
        let t = m.render();
        assert!(
            t.contains("roost_agent_last_poll_timestamp_seconds 100\n"),
            "{t}"
        );
        assert!(
            t.contains("roost_agent_desired_version 1795349047123\n"),
            "{t}"
        );
        assert!(
            t.contains("roost_agent_state{state=\"deferred\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("roost_agent_state{state=\"success\"} 0\n"),
            "{t}"
        );
        assert!(
            t.contains("roost_agent_deferred{reason=\"window\"} 1\n"),
            "{t}"
        );
        assert!(t.contains("roost_agent_rollbacks_total 2\n"), "{t}");
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(t.contains(&format!("# TYPE {name} ")), "{name} has no TYPE");
        }
    }

    #[test]
    fn the_file_is_replaced_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("textfile/roost.prom");
        NodeMetrics::default().write(&p).unwrap();
        let m = NodeMetrics {
            needs_reboot: true,
            ..NodeMetrics::default()
        };
        m.write(&p).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), m.render());
        let names: Vec<String> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec!["roost.prom".to_owned()],
            "no temporary file left"
        );
    }
}
