//! The README's demo: a real local fleet converging. A coordinator with its embedded cache,
//! the offline example fleet published to it, three agents as namespaced nodes (each with its
//! own /nix, reaching the coordinator over its own veth link), then the fleet's status.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use roost_tests::fleet::tail;
use roost_tests::{Fleet, bin, preflight};

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
    let nodes = ["laptop", "pi-kitchen", "pi-garage"];
    step("Starting a coordinator (manifests, reports and an embedded Nix binary cache)");
    let mut fleet = Fleet::new(&nodes)?;
    println!(
        "    listening on {}; state in {}",
        fleet.coordinator.url(),
        fleet.coordinator.state_dir.display()
    );
    println!(
        "    publisher key {} — the server itself holds no signing key",
        fleet.keys.publisher_pub.display()
    );
    for n in &fleet.nodes {
        println!(
            "    node {:<11} own /nix at {}, reaches the coordinator at {}",
            n.name,
            n.nix_dir().display(),
            n.coordinator_url(&fleet.coordinator)
        );
    }

    step(
        "Publishing examples/offline: one evaluation, one build, closures pushed to the cache, one signed manifest per node",
    );
    let started = Instant::now();
    let summary = fleet.publish(&[])?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    let published_at = Instant::now();
    println!(
        "    published in {:.1} s",
        (published_at - started).as_secs_f64()
    );

    step(
        "Starting one roost-agent per node; each polls, verifies, substitutes, activates, checks health and reports",
    );
    fleet.start_agents()?;
    let version = fleet
        .fleet_entry(nodes[0])
        .and_then(|e| e.get("desired_version").and_then(|v| v.as_u64()))
        .context("the coordinator does not know the published version")?;
    for name in nodes {
        let r = fleet.wait_report(name, version, "success", Duration::from_secs(120));
        match r {
            Ok(_) => println!(
                "    {name:<11} converged after {:.1} s",
                published_at.elapsed().as_secs_f64()
            ),
            Err(e) => bail!(
                "{name} did not converge: {e:#}\n\nagent log:\n{}",
                tail(&fleet.node(name).log(), 25)
            ),
        }
    }

    step("roost-coordinator status");
    let out = Command::new(bin("roost-coordinator"))
        .args(["status", "--coordinator", &fleet.coordinator.url()])
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    step(&format!("roost-agent status on {}", nodes[1]));
    print!("{}", fleet.node(nodes[1]).status_text()?);

    step(
        "Cleaning up: agents stopped, namespaces and veth links removed, the fleet folder deleted",
    );
    drop(fleet);
    println!("    done.");
    Ok(())
}
