//! Reboot-aware activation (docs/protocol.md §7.16) on namespaced nodes with real Nix and
//! real publish: a node's own `/run` holds `booted-system` and `current-system`, and the
//! fixture's `switch-to-configuration` refuses a live switch whose switch-inhibitors changed,
//! as NixOS 26.05's does. A reboot is simulated: the reboot command is a script that records
//! it, and the boot id comes from a file (debug builds' `ROOST_TEST_BOOT_ID_FILE`) that the
//! test changes, with `/run/booted-system`, as a real reboot would. No VM test of a real
//! reboot exists yet.

use std::path::{Path, PathBuf};
use std::time::Duration;

use roost_common::Timestamp;
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
    publish_policy(f, generation, kernel, systemd, None)
}

/// [`publish`] with a `roost.reboot` policy.
fn publish_policy(
    f: &Fleet,
    generation: u32,
    kernel: &'static str,
    systemd: &'static str,
    reboot: Option<&'static str>,
) -> (u64, String) {
    f.settings(&Settings {
        generation,
        kernel: vec![(NODE, kernel)],
        systemd: vec![(NODE, systemd)],
        reboot: reboot.map(|r| vec![(NODE, r)]).unwrap_or_default(),
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
    std::fs::write(f.node(NODE).dir.join("boot-id"), "boot-1\n").unwrap();
    point(&run_dir.join("booted-system"), &p1);
    point(&run_dir.join("current-system"), &p1);
    once(&f);
    let r = f.wait_report(NODE, v1, "success", LONG).unwrap();
    assert_eq!(r.get("needs_reboot"), None, "booted on v1: {r:#}");
    (f, run_dir, p1)
}

fn once(f: &Fleet) {
    once_with(f, &[], &[]);
}

/// One cycle of the agent with `extra` arguments and `env`.
fn once_with(f: &Fleet, extra: &[String], env: &[(&str, &str)]) {
    once_on(f, NODE, extra, env);
}

/// One cycle of `node`'s agent with `extra` arguments and `env`.
fn once_on(f: &Fleet, node: &str, extra: &[String], env: &[(&str, &str)]) {
    let mut args = f.agent_args(f.node(node), true);
    args.extend(extra.iter().cloned());
    let out = f.node(node).run_agent(&args, env).unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{node}: {}",
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

/// A reboot command that only records that it ran (in the node's `reboots`); returns the
/// agent arguments that configure it.
fn fake_reboot(f: &Fleet) -> [String; 2] {
    fake_reboot_on(f, NODE)
}

/// [`fake_reboot`] for `node`.
fn fake_reboot_on(f: &Fleet, node: &str) -> [String; 2] {
    let dir = f.node(node).dir.clone();
    let script = dir.join("fake-reboot");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho reboot >> {}\n",
            dir.join("reboots").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cfg = dir.join("agent.json");
    std::fs::write(
        &cfg,
        serde_json::json!({ "reboot_command": [script.display().to_string()] }).to_string(),
    )
    .unwrap();
    ["--config".to_owned(), cfg.display().to_string()]
}

#[test]
fn a_machine_that_comes_back_on_the_old_system_gets_it_back_as_boot_default_and_reports_rolled_back()
 {
    require!(preflight());
    let (f, run_dir, p1) = booted_on_v1();
    let dir = f.node(NODE).dir.clone();
    let extra = fake_reboot(&f);
    let boot_file = dir.join("boot-id");
    let env = [("ROOST_TEST_BOOT_ID_FILE", boot_file.to_str().unwrap())];
    let (v2, _) = publish_policy(&f, 2, "6.12", "257", Some("auto"));
    once_with(&f, &extra, &env);
    f.wait_report(NODE, v2, "success", LONG).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("reboots")).unwrap(),
        "reboot\n"
    );
    // The new kernel did not come up: the boot loader fell back to the old system.
    std::fs::write(&boot_file, "boot-2\n").unwrap();
    point(&run_dir.join("booted-system"), &p1);
    point(&run_dir.join("current-system"), &p1);
    once_with(&f, &extra, &env);
    let r = f.wait_report(NODE, v2, "rolled_back", LONG).unwrap();
    assert_eq!(r["error"]["phase"], "reboot", "{r:#}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("came back on {p1}")) && msg.contains("is the boot default again"),
        "{msg}"
    );
    assert_eq!(
        f.node(NODE).profile_target("var/nix/profiles/system"),
        Some(p1.clone())
    );
    assert_eq!(
        f.node(NODE).activations().last(),
        Some(&format!("boot {p1}")),
        "the old system is the boot default again"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("reboots")).unwrap(),
        "reboot\n",
        "already on the old system: no second reboot"
    );
    let st = f.node(NODE).status_json().unwrap();
    assert_eq!(st["quarantined"], serde_json::json!([v2]), "{st:#}");
    let doc: Value = serde_json::from_slice(
        &f.coordinator
            .read(&roost_common::wire::v1::http::reboot_leases_url(
                &f.coordinator.url(),
            ))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(doc["holders"], serde_json::json!([]), "{doc:#}");
}

#[test]
fn policy_auto_takes_a_lease_reboots_and_back_on_the_new_system_reports_success_and_gives_it_back()
{
    require!(preflight());
    let (f, run_dir, _) = booted_on_v1();
    let dir = f.node(NODE).dir.clone();
    let extra = fake_reboot(&f);
    let boot_file = dir.join("boot-id");
    let env = [("ROOST_TEST_BOOT_ID_FILE", boot_file.to_str().unwrap())];
    let (v2, p2) = publish_policy(&f, 2, "6.12", "257", Some("auto"));
    once_with(&f, &extra, &env);
    let r = f.wait_report(NODE, v2, "success", LONG).unwrap();
    assert_eq!(r["needs_reboot"], true, "{r:#}");
    let reboots = || std::fs::read_to_string(dir.join("reboots")).unwrap_or_default();
    assert_eq!(reboots(), "reboot\n", "the reboot command ran once");
    let leases = || -> Value {
        serde_json::from_slice(
            &f.coordinator
                .read(&roost_common::wire::v1::http::reboot_leases_url(
                    &f.coordinator.url(),
                ))
                .unwrap(),
        )
        .unwrap()
    };
    let doc = leases();
    assert_eq!(doc["holders"][0]["node"], NODE, "{doc:#}");
    assert_eq!(doc["holders"][0]["boot_id"], "boot-1", "{doc:#}");
    let state: Value = serde_json::from_slice(
        &std::fs::read(f.node(NODE).state_dir().join("state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["reboot"]["system"], p2, "{state:#}");
    assert_eq!(state["reboot"]["boot_id"], "boot-1", "{state:#}");
    // The same boot: nothing more happens.
    once_with(&f, &extra, &env);
    assert_eq!(reboots(), "reboot\n");
    // The machine comes back on the new system.
    std::fs::write(&boot_file, "boot-2\n").unwrap();
    point(&run_dir.join("booted-system"), &p2);
    point(&run_dir.join("current-system"), &p2);
    once_with(&f, &extra, &env);
    assert_eq!(reboots(), "reboot\n", "no second reboot");
    let doc = leases();
    assert_eq!(doc["holders"], serde_json::json!([]), "{doc:#}");
    let events: Vec<&str> = doc["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["acquired", "released"], "{doc:#}");
    let st = f.node(NODE).status_json().unwrap();
    assert_eq!(st["needs_reboot"], false, "{st:#}");
    assert_eq!(st["last_deploy"]["state"], "success", "{st:#}");
    let fleet = f.coordinator.fleet().unwrap();
    let last = &fleet["nodes"][0]["last_report"];
    assert_eq!(last["state"], "success", "{last:#}");
    assert_eq!(last.get("needs_reboot"), None, "{last:#}");
    assert!(last["seq"].as_u64().unwrap() > r["seq"].as_u64().unwrap());
}

#[test]
fn three_nodes_with_a_budget_of_one_reboot_one_at_a_time() {
    require!(preflight());
    const NODES: [&str; 3] = ["laptop", "pi-kitchen", "pi-garage"];
    let mut f = Fleet::new(&NODES).unwrap();
    for n in NODES {
        let run_dir = f.node(n).dir.join("run");
        std::fs::create_dir_all(&run_dir).unwrap();
        f.node_mut(n).bind(&run_dir, "/run");
        std::fs::write(f.node(n).dir.join("boot-id"), "boot-1\n").unwrap();
    }
    let publish_all = |generation: u32, kernel: &'static str, reboot: Option<&'static str>| {
        f.settings(&Settings {
            generation,
            kernel: NODES.iter().map(|n| (*n, kernel)).collect(),
            reboot: reboot
                .map(|r| NODES.iter().map(|n| (*n, r)).collect())
                .unwrap_or_default(),
            ..Settings::default()
        })
        .unwrap();
        let summary = f.publish(&[]).unwrap();
        NODES
            .iter()
            .map(|n| {
                let node = summary["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|x| x["node"] == *n)
                    .unwrap();
                (
                    node["version"].as_u64().unwrap(),
                    node["profiles"][0]["path"].as_str().unwrap().to_owned(),
                )
            })
            .collect::<Vec<_>>()
    };
    let v1 = publish_all(1, "6.6", None);
    for (n, (v, p)) in NODES.iter().zip(&v1) {
        let run_dir = f.node(n).dir.join("run");
        point(&run_dir.join("booted-system"), p);
        point(&run_dir.join("current-system"), p);
        once_on(&f, n, &[], &[]);
        f.wait_report(n, *v, "success", LONG).unwrap();
    }
    let v2 = publish_all(2, "6.12", Some("auto"));
    let extras: Vec<[String; 2]> = NODES.iter().map(|n| fake_reboot_on(&f, n)).collect();
    let boot_files: Vec<String> = NODES
        .iter()
        .map(|n| f.node(n).dir.join("boot-id").display().to_string())
        .collect();
    let reboots = |n: &str| {
        std::fs::read_to_string(f.node(n).dir.join("reboots"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    let mut back = [false; 3];
    for _round in 0..4 {
        for (i, n) in NODES.iter().enumerate() {
            let env = [("ROOST_TEST_BOOT_ID_FILE", boot_files[i].as_str())];
            once_on(&f, n, &extras[i], &env);
            if reboots(n) == 1 && !back[i] {
                // It rebooted: it comes back on the new system.
                let run_dir = f.node(n).dir.join("run");
                std::fs::write(&boot_files[i], "boot-2\n").unwrap();
                point(&run_dir.join("booted-system"), &v2[i].1);
                point(&run_dir.join("current-system"), &v2[i].1);
                back[i] = true;
            }
        }
    }
    for n in NODES {
        assert_eq!(reboots(n), 1, "{n} rebooted once");
    }
    let doc: Value = serde_json::from_slice(
        &f.coordinator
            .read(&roost_common::wire::v1::http::reboot_leases_url(
                &f.coordinator.url(),
            ))
            .unwrap(),
    )
    .unwrap();
    let log: Vec<String> = doc["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["node"].as_str().unwrap(),
                e["event"].as_str().unwrap()
            )
        })
        .collect();
    let mut held = 0;
    for e in &log {
        if e.ends_with(" acquired") {
            held += 1;
        } else if e.ends_with(" released") || e.ends_with(" expired") {
            held -= 1;
        }
        assert!(held <= 1, "two nodes held a lease at once: {log:#?}");
    }
    for n in NODES {
        assert_eq!(
            log.iter()
                .filter(|e| **e == format!("{n} acquired"))
                .count(),
            1,
            "{log:#?}"
        );
        assert!(log.contains(&format!("{n} released")), "{log:#?}");
        let st = f.node(n).status_json().unwrap();
        assert_eq!(st["needs_reboot"], false, "{n}: {st:#}");
    }
    assert!(
        log.iter().any(|e| e.ends_with(" refused")),
        "someone had to wait: {log:#?}"
    );
    assert_eq!(doc["holders"], serde_json::json!([]), "{doc:#}");
}

#[test]
fn policy_window_waits_while_the_window_is_closed_and_reboots_once_it_is_open() {
    require!(preflight());
    let (f, _, _) = booted_on_v1();
    let dir = f.node(NODE).dir.clone();
    let extra = fake_reboot(&f);
    let boot_file = dir.join("boot-id");
    f.settings(&Settings {
        generation: 2,
        kernel: vec![(NODE, "6.12")],
        systemd: vec![(NODE, "257")],
        reboot: vec![(NODE, "window")],
        reboot_window: vec![(NODE, "02:00-03:00")],
        ..Settings::default()
    })
    .unwrap();
    let v2 = f.publish(&[&format!("#{NODE}")]).unwrap()["nodes"][0]["version"]
        .as_u64()
        .unwrap();
    // Tomorrow, 30 s before the window opens, then 30 s after (node clock, UTC).
    let now = Timestamp::now().unix();
    let two = now - now % 86_400 + 86_400 + 2 * 3600;
    let before = Timestamp::from_unix(two - 30).to_string();
    let inside = Timestamp::from_unix(two + 30).to_string();
    let leases = || -> Value {
        serde_json::from_slice(
            &f.coordinator
                .read(&roost_common::wire::v1::http::reboot_leases_url(
                    &f.coordinator.url(),
                ))
                .unwrap(),
        )
        .unwrap()
    };
    let reboots = || std::fs::read_to_string(dir.join("reboots")).unwrap_or_default();
    let env = |clock: &str| {
        vec![
            ("ROOST_TEST_BOOT_ID_FILE", boot_file.display().to_string()),
            ("ROOST_TEST_CLOCK", clock.to_owned()),
            ("TZ", "UTC".to_owned()),
        ]
    };
    let run_at = |clock: &str| {
        let e = env(clock);
        let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
        once_with(&f, &extra, &e);
    };
    run_at(&before);
    let r = f.wait_report(NODE, v2, "success", LONG).unwrap();
    assert_eq!(r["needs_reboot"], true, "{r:#}");
    assert_eq!(reboots(), "", "the window is closed: no reboot");
    assert_eq!(leases()["log"], serde_json::json!([]), "and no lease taken");
    run_at(&before);
    assert_eq!(reboots(), "");
    run_at(&inside);
    assert_eq!(reboots(), "reboot\n", "the window is open");
    assert_eq!(leases()["holders"][0]["node"], NODE);
}
