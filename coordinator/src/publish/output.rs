//! What a publish shows: progress on stderr (spinners on a terminal, plain lines when piped),
//! then a summary table on stdout, or the same data as JSON.

use std::time::Duration;

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
    pub(crate) fn start(progress: Progress, msg: String) -> Self {
        match progress {
            Progress::Terminal => {
                let pb = indicatif::ProgressBar::new_spinner();
                if let Ok(style) =
                    indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                {
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
    for n in report.nodes.iter().filter(|n| n.result == "failed") {
        eprintln!("\n{} failed: {}", n.node, n.error.as_deref().unwrap_or(""));
    }
}

pub use roost_common::size::human_bytes;
