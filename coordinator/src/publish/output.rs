//! What a publish shows: progress on stderr (spinners on a terminal, plain lines when piped),
//! then a summary table on stdout, or the same data as JSON.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_common::nix::log::{Activity, Event};
use roost_common::nix::{LogFn, Nix};

use super::PublishReport;
use crate::status::print_table;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Spinners on stderr (a terminal).
    Terminal,
    /// Plain lines on stderr (piped, CI logs).
    Lines,
    /// Nothing (library use, tests).
    Quiet,
}

/// One step of the pipeline, shown while it runs.
pub(crate) struct Stage(Option<indicatif::ProgressBar>, Progress);

impl Stage {
    /// `nix` for this stage's calls: on a terminal, one whose structured log feeds the
    /// spinner (builds done, running and failed; paths and bytes copied; what runs now).
    pub(crate) fn nix(&self, nix: &Nix) -> Nix {
        let Some(pb) = self.0.clone() else {
            return nix.clone();
        };
        let base = pb.message();
        let tally = Mutex::new(Tally::default());
        let f: LogFn = Arc::new(move |e: &Event| {
            if let Ok(mut t) = tally.lock() {
                if t.see(e) {
                    pb.set_message(format!("{base} — {}", t.summary()));
                }
            }
        });
        nix.clone().with_log(f)
    }

    pub(crate) fn start(progress: Progress, msg: String) -> Self {
        match progress {
            Progress::Terminal => {
                let pb = indicatif::ProgressBar::new_spinner();
                // `wide_msg` is cut to the terminal's width: a long message never wraps.
                let template = "{spinner} ({elapsed}) {wide_msg}";
                if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
                    pb.set_style(style);
                }
                pb.enable_steady_tick(Duration::from_millis(120));
                pb.set_message(msg);
                Stage(Some(pb), progress)
            }
            Progress::Lines => {
                eprintln!("{msg} …");
                Stage(None, progress)
            }
            Progress::Quiet => Stage(None, progress),
        }
    }

    pub(crate) fn done(self, msg: String) {
        match (self.0, self.1) {
            // Cleared, then a plain line: the next spinner starts on a line of its own.
            (Some(pb), _) => {
                let took = pb.elapsed();
                pb.finish_and_clear();
                eprintln!("{msg} ({:.1}s)", took.as_secs_f64());
            }
            (None, Progress::Lines) => eprintln!("{msg}"),
            _ => {}
        }
    }
}

/// What Nix's structured log says so far, for one stage.
#[derive(Debug, Default)]
struct Tally {
    kinds: BTreeMap<u64, Activity>,
    /// The `Builds` activity's (done, expected, running, failed).
    builds: Option<(u64, u64, u64, u64)>,
    /// Paths copied (a `CopyPath` that stopped) and expected (the `CopyPaths` progress).
    copied: BTreeSet<u64>,
    copy_expected: u64,
    /// Bytes done per copy or download.
    bytes: BTreeMap<u64, u64>,
    /// The name of what started last.
    now: Option<String>,
}

impl Tally {
    /// Takes in one event; whether the summary changed.
    fn see(&mut self, e: &Event) -> bool {
        match e {
            Event::Start {
                id, activity, path, ..
            } => {
                self.kinds.insert(*id, *activity);
                if matches!(activity, Activity::Build | Activity::CopyPath) {
                    self.now = path.as_deref().map(store_name);
                    return true;
                }
                false
            }
            Event::Stop { id } => {
                if self.kinds.get(id) == Some(&Activity::CopyPath) {
                    self.copied.insert(*id);
                    return true;
                }
                false
            }
            Event::Progress {
                id,
                done,
                expected,
                running,
                failed,
            } => match self.kinds.get(id) {
                Some(Activity::Builds) => {
                    self.builds = Some((*done, *expected, *running, *failed));
                    true
                }
                Some(Activity::CopyPaths) => {
                    self.copy_expected = self.copy_expected.max(*expected);
                    true
                }
                Some(Activity::CopyPath | Activity::FileTransfer) => {
                    self.bytes.insert(*id, *done);
                    true
                }
                _ => false,
            },
            _ => false,
        }
    }

    /// `3/12 built, 2 running, 1 failed; 40/120 path(s), 12.3 MiB; now nixos-system-pi`.
    fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some((done, expected, running, failed)) = self.builds.filter(|b| b.1 > 0) {
            let mut s = format!("{done}/{expected} built");
            if running > 0 {
                s.push_str(&format!(", {running} running"));
            }
            if failed > 0 {
                s.push_str(&format!(", {failed} failed"));
            }
            parts.push(s);
        }
        if !self.copied.is_empty() || self.copy_expected > 0 {
            let mut s = if self.copy_expected > 0 {
                format!("{}/{} path(s)", self.copied.len(), self.copy_expected)
            } else {
                format!("{} path(s)", self.copied.len())
            };
            let bytes: u64 = self.bytes.values().sum();
            if bytes > 0 {
                s.push_str(&format!(", {}", human_bytes(bytes)));
            }
            parts.push(s);
        }
        if let Some(now) = &self.now {
            parts.push(format!("now {now}"));
        }
        parts.join("; ")
    }
}

/// `/nix/store/HASH-name.drv` → `name`.
fn store_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let name = base.split_once('-').map_or(base, |(_, n)| n);
    name.strip_suffix(".drv").unwrap_or(name).to_owned()
}

/// Prints the summary on stdout (table or JSON), and each failure's details on stderr.
pub fn print(report: &PublishReport, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
    } else {
        let rows: Vec<[String; 5]> = report
            .nodes
            .iter()
            .map(|n| {
                [
                    n.node.clone(),
                    n.profiles
                        .iter()
                        .map(|p| p.name.clone())
                        .collect::<Vec<_>>()
                        .join(","),
                    n.version.map_or("-".into(), |v| v.to_string()),
                    n.closure_size.map_or("-".into(), human_bytes),
                    n.result.to_owned(),
                ]
            })
            .collect();
        print_table(&["NODE", "PROFILES", "VERSION", "CLOSURE", "RESULT"], &rows);
        let published = report
            .nodes
            .iter()
            .filter(|n| n.result == "published")
            .count();
        println!(
            "\n{published} of {} node(s) published to {}",
            report.nodes.len(),
            report.destination
        );
    }
    let held: Vec<&str> = report
        .nodes
        .iter()
        .filter(|n| n.result == "held")
        .map(|n| n.node.as_str())
        .collect();
    if !held.is_empty() {
        eprintln!(
            "\nheld (their wave is outside --waves, their files are unchanged): {}",
            held.join(", ")
        );
    }
    for n in report.nodes.iter().filter(|n| n.result == "failed") {
        eprintln!("\n{} failed: {}", n.node, n.error.as_deref().unwrap_or(""));
    }
}

pub use roost_common::size::human_bytes;

#[cfg(test)]
mod tests {
    use super::*;

    /// The events of a real `nix … --log-format internal-json` (common/tests/fixtures).
    fn fixture_events(text: &str) -> Vec<Event> {
        let mut d = roost_common::nix::log::Decoder::new();
        text.lines().filter_map(|l| d.line(l).event).collect()
    }

    #[test]
    fn a_build_shows_counts_and_what_runs() {
        let mut t = Tally::default();
        // One derivation built, another failed.
        for e in fixture_events(include_str!(
            "../../../common/tests/fixtures/nix-2.8/log-internal-json-build-failure.txt"
        )) {
            t.see(&e);
        }
        let s = t.summary();
        assert!(s.starts_with("1/1 built, 1 failed; now roost-log-"), "{s}");
    }

    #[test]
    fn a_copy_shows_paths_and_bytes() {
        let mut t = Tally::default();
        for e in fixture_events(include_str!(
            "../../../common/tests/fixtures/nix-2.8/log-internal-json-copy.txt"
        )) {
            t.see(&e);
        }
        assert!(
            t.summary().starts_with("2 path(s); now ij-b-"),
            "{}",
            t.summary()
        );
        t.see(&Event::Start {
            id: 7,
            activity: Activity::CopyPath,
            text: String::new(),
            path: Some("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-big".into()),
        });
        t.see(&Event::Progress {
            id: 7,
            done: 3 << 20,
            expected: 8 << 20,
            running: 0,
            failed: 0,
        });
        assert_eq!(t.summary(), "2 path(s), 3.0 MiB; now big");
    }
}
