//! The README's demo: a real local fleet converging. A coordinator with its embedded cache,
//! the offline example fleet committed to git and published to it, three agents as namespaced
//! nodes (each with its own /nix, reaching the coordinator over its own veth link), then both
//! status views.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use roost_tests::fleet::tail;
use roost_tests::{Fleet, bin, preflight, run, wait_for};
use serde_json::Value;

fn step(text: &str) {
    println!("\n\x1b[1m==> {text}\x1b[0m");
}

fn main() {
    if let Err(e) = demo() {
        eprintln!("\n\x1b[1;31mdemo failed:\x1b[0m {e:#}");
        std::process::exit(1);
    }
}

fn demo() -> anyhow::Result<()> {
    preflight().map_err(|why| anyhow::anyhow!("cannot run the demo here: {why}"))?;
    let began = Instant::now();
    let nodes = ["laptop", "pi-kitchen", "pi-garage"];
    let mut fleet = Fleet::new(&nodes)?;
    step(&format!(
        "The fleet: {} nodes, each a network and mount namespace with its own /nix",
        nodes.len()
    ));
    for n in &fleet.nodes {
        println!(
            "    {:<11} store {}  reaches the coordinator at {}",
            n.name,
            n.nix_dir().display(),
            n.coordinator_url(&fleet.coordinator)
        );
    }
    println!(
        "    coordinator {} (manifests, reports, an embedded Nix binary cache); it holds no signing key",
        fleet.coordinator.url()
    );

    step("Starting one roost-agent per node: each polls, finds nothing published yet, and waits");
    fleet.start_agents()?;
    for n in &fleet.nodes {
        wait_for(
            &format!("{}'s agent to poll", n.name),
            Duration::from_secs(60),
            || {
                let s = n.status_json().ok()?;
                (s["daemon_running"] == true && s["last_poll"]["at"].is_string()).then_some(())
            },
        )
        .with_context(|| format!("agent log:\n{}", tail(&n.log(), 25)))?;
        println!("    {:<11} polling", n.name);
    }

    // A git commit, so the manifests carry a source revision as they would from CI.
    let rev = commit(&fleet)?;
    step(&format!(
        "Publishing examples/offline at commit {}: one evaluation, one build, closures to the cache, one signed manifest per node",
        &rev[..12]
    ));
    let started = Instant::now();
    let summary = fleet.publish(&[])?;
    let published_at = Instant::now();
    let version = summary["nodes"]
        .as_array()
        .and_then(|n| n.first())
        .and_then(|n| n["version"].as_u64())
        .context("publish reported no version")?;
    for n in summary["nodes"].as_array().into_iter().flatten() {
        let profiles: Vec<String> = n["profiles"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                format!(
                    "{} {}",
                    p["name"].as_str().unwrap_or("?"),
                    short(&p["path"])
                )
            })
            .collect();
        println!(
            "    {:<11} {}",
            n["node"].as_str().unwrap_or("?"),
            profiles.join(", ")
        );
    }
    let source = fleet
        .fleet_entry(nodes[0])
        .and_then(|e| e.get("source").cloned())
        .context("the coordinator does not know the published source")?;
    println!(
        "    version {version} of revision {}, signed and uploaded in {:.1} s",
        source["rev"].as_str().unwrap_or("(none)"),
        (published_at - started).as_secs_f64()
    );

    step("The agents converge: substitute from the cache, activate, health-check, report");
    let mut waiting: Vec<&str> = nodes.to_vec();
    let deadline = Duration::from_secs(120);
    while !waiting.is_empty() {
        let fleet_doc = fleet.coordinator.fleet()?;
        waiting.retain(|name| {
            let Some(r) = fleet_doc["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|n| n["node"] == *name)
                .map(|n| &n["last_report"])
                .filter(|r| r["manifest_version"] == version && r["state"] == "success")
            else {
                return true;
            };
            let t = &r["timings_ms"];
            println!(
                "    {name:<11} converged on version {version} {:.1} s after the publish (realise {} ms, activate {} ms, confirm {} ms)",
                published_at.elapsed().as_secs_f64(),
                t["realise"],
                t["activate"],
                t["confirm"],
            );
            false
        });
        if let Some(name) = waiting.first()
            && published_at.elapsed() > deadline
        {
            bail!(
                "{name} did not converge within {deadline:?}: the coordinator sees {:?}\n\nagent log:\n{}",
                fleet.fleet_entry(name),
                tail(&fleet.node(name).log(), 25)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    step("The fleet as the coordinator sees it: roost-coordinator status");
    let out = Command::new(bin("roost-coordinator"))
        .args(["status", "--coordinator", &fleet.coordinator.url()])
        .env("ROOST_READ_TOKEN_FILE", &fleet.keys.token_file)
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    step(&format!(
        "One node as it sees itself: roost-agent status on {}",
        nodes[1]
    ));
    print!("{}", fleet.node(nodes[1]).status_text()?);

    step("Cleaning up: agents stopped, namespaces and links removed, the fleet folder deleted");
    drop(fleet);
    println!("    done in {:.1} s.", began.elapsed().as_secs_f64());
    Ok(())
}

/// Commits the fleet's flake copy; returns the revision.
fn commit(fleet: &Fleet) -> anyhow::Result<String> {
    let git = |args: &[&str]| {
        let mut c = Command::new("git");
        c.arg("-C")
            .arg(&fleet.flake)
            .args([
                "-c",
                "user.name=roost demo",
                "-c",
                "user.email=demo@roost.invalid",
            ])
            .args(args);
        run(&mut c)
    };
    git(&["init", "--quiet"])?;
    git(&["add", "--all"])?;
    git(&["commit", "--quiet", "--message", "the demo fleet"])?;
    let out = git(&["rev-parse", "HEAD"])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `/nix/store/abc…-name` → `abc1234…-name`, for a line that fits a terminal.
fn short(path: &Value) -> String {
    let p = path.as_str().unwrap_or("?");
    let base = p.strip_prefix("/nix/store/").unwrap_or(p);
    match base.split_once('-') {
        Some((hash, name)) if hash.len() > 7 => format!("{}…-{name}", &hash[..7]),
        _ => base.to_owned(),
    }
}
