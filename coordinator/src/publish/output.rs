//! The summary of a publish: a table for people, `--json` for scripts.

use super::PublishReport;
use crate::status::print_table;

/// Prints the summary on stdout, and each failure's details on stderr.
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
        let evals = report.nix_invocations.get("nix eval").copied().unwrap_or(0);
        println!("\nto {} — nix eval ran {evals} time(s)", report.destination);
    }
    for n in report.nodes.iter().filter(|n| n.error.is_some()) {
        eprintln!(
            "\n{} {}: {}",
            n.node,
            n.result,
            n.error.as_deref().unwrap_or("")
        );
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
