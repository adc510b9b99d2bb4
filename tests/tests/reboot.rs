//! Reboot-aware activation (docs/protocol.md §7.16) on namespaced nodes with real Nix and
//! real publish: a node's own `/run` holds `booted-system` and `current-system`, and the
//! fixture's `switch-to-configuration` refuses a live switch whose switch-inhibitors changed,
//! as NixOS 26.05's does. What needs a real reboot is in `vm_reboot.rs`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use roost_tests::fleet::Settings;
use roost_tests::{Fleet, preflight, require};
use serde_json::Value;

const NODE: &str = "pi-kitchen";
const LONG: Duration = Duration::from_secs(120);

/// Publishes generation `generation` with that kernel and systemd; returns the version and
/// the system's store path.
fn publish(
    f: &Fleet,
    generation: u32,
    kernel: &'static str,
    systemd: &'static str,
) -> (u64, String) {
    f.settings(&Settings {
        generation,
        kernel: vec![(NODE, kernel)],
        systemd: vec![(NODE, systemd)],
        ..Settings::default()
    })
    .unwrap();
    let summary = f.publish(&[&format!("#{NODE}")]).unwrap();
    let n = &summary["nodes"][0];
    (
        n["version"].as_u64().unwrap(),
        n["profiles"][0]["path"].as_str().unwrap().to_owned(),
    )
}

fn point(link: &Path, target: &str) {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).unwrap();
}

/// A node whose machine booted, and runs, the system `v1` publishes: returns the fleet and
/// the node's `/run`, with `v1` deployed and confirmed.
fn booted_on_v1() -> (Fleet, PathBuf, String) {
    let mut f = Fleet::new(&[NODE]).unwrap();
    let run_dir = f.node(NODE).dir.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    f.node_mut(NODE).bind(&run_dir, "/run");
    let (v1, p1) = publish(&f, 1, "6.6", "257");
    point(&run_dir.join("booted-system"), &p1);
    point(&run_dir.join("current-system"), &p1);
    once(&f);
    let r = f.wait_report(NODE, v1, "success", LONG).unwrap();
    assert_eq!(r.get("needs_reboot"), None, "booted on v1: {r:#}");
    (f, run_dir, p1)
}

fn once(f: &Fleet) {
    let out = f
        .node(NODE)
        .run_agent(&f.agent_args(f.node(NODE), true), &[])
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn reasons(v: &Value) -> Vec<String> {
    v["reboot_reasons"]
        .as_array()
        .map(|a| a.iter().map(|r| r.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn an_inhibited_switch_is_installed_for_the_next_boot_reported_and_not_rolled_back() {
    require!(preflight());
    let (f, run_dir, p1) = booted_on_v1();
    let (v2, p2) = publish(&f, 2, "6.6", "258");
    once(&f);
    let r = f.wait_report(NODE, v2, "success", LONG).unwrap();
    assert_eq!(
        f.node(NODE).activations(),
        vec![format!("switch {p1}"), format!("boot {p2}")],
        "the live switch NixOS would refuse is never tried; boot is"
    );
    assert_eq!(
        f.node(NODE).profile_target("var/nix/profiles/system"),
        Some(p2.clone())
    );
    assert_eq!(
        std::fs::read_link(run_dir.join("current-system")).unwrap(),
        PathBuf::from(&p1),
        "v1 still runs"
    );
    assert_eq!(r["needs_reboot"], true, "{r:#}");
    let why = reasons(&r);
    assert!(
        why.iter()
            .any(|w| w.contains("is installed for the next boot")),
        "{why:?}"
    );
    assert!(
        why.contains(&"NixOS refuses a live switch: systemd: 257 -> 258".to_owned()),
        "{why:?}"
    );
    let st = f.node(NODE).status_json().unwrap();
    assert_eq!(st["needs_reboot"], true, "{st:#}");
    assert_eq!(reasons(&st), why);
    assert_eq!(st["quarantined"], serde_json::json!([]), "{st:#}");
    let text = f.node(NODE).status_text().unwrap();
    assert!(
        text.contains("is installed, active after the next boot")
            && text.contains("NixOS refuses a live switch: systemd: 257 -> 258"),
        "{text}"
    );
    // The coordinator flags it, and counts it.
    let fleet = f.coordinator.fleet().unwrap();
    let node = &fleet["nodes"][0];
    let flag = node["flags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["flag"] == "needs_reboot")
        .unwrap_or_else(|| panic!("{node:#}"));
    assert!(
        flag["reason"]
            .as_str()
            .unwrap()
            .contains("systemd: 257 -> 258"),
        "{flag:#}"
    );
    assert_eq!(fleet["flagged"]["needs_reboot"], 1, "{fleet:#}");
}

#[test]
fn a_kernel_change_switches_live_and_reports_that_the_kernel_waits_for_a_reboot() {
    require!(preflight());
    let (f, run_dir, p1) = booted_on_v1();
    let (v2, p2) = publish(&f, 2, "6.12", "257");
    once(&f);
    let r = f.wait_report(NODE, v2, "success", LONG).unwrap();
    assert_eq!(
        f.node(NODE).activations(),
        vec![format!("switch {p1}"), format!("switch {p2}")]
    );
    assert_eq!(
        std::fs::read_link(run_dir.join("current-system")).unwrap(),
        PathBuf::from(&p2),
        "the switch was live"
    );
    assert_eq!(r["needs_reboot"], true, "{r:#}");
    let why = reasons(&r);
    assert_eq!(why.len(), 1, "{why:?}");
    assert!(
        why[0].starts_with("kernel changed: ")
            && why[0].contains("linux-6.6")
            && why[0].ends_with("linux-6.12"),
        "{why:?}"
    );
}
