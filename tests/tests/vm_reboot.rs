//! Reboot-aware activation on a real machine (#17): a Debian guest with systemd as PID 1
//! really reboots. The fixture's system stands in for a NixOS one: its
//! `switch-to-configuration` makes itself the system of the next boot (`switch`, `boot`), and
//! a hook installed here brings that system up as `/run/booted-system` at boot, as NixOS's
//! boot loader and stage 2 would.
//!
//! Cost: one guest, two boots (the second one the agent's own reboot).

use std::time::Duration;

use roost_common::wire::v1::http::reboot_leases_url;
use roost_tests::require;
use roost_tests::vm::{self, Version, VmFleet};
use roost_tests::wait_for;
use serde_json::Value;

const DEPLOY: Duration = Duration::from_secs(600);

/// At each boot, before the agent starts: the system `switch-to-configuration` chose for this
/// boot becomes /run/booted-system and /run/current-system.
const BOOT_HOOK: &str = r#"#!/bin/sh
next=/var/lib/roost-vm/boot-next
[ -e /run/booted-system ] || [ ! -e "$next" ] || {
  ln -sfn "$(cat "$next")" /run/booted-system
  ln -sfn "$(cat "$next")" /run/current-system
}
exit 0
"#;

fn install_boot_hook(f: &VmFleet) {
    f.machine
        .sh(&format!(
            "cat > /usr/local/sbin/roost-vm-boot-next <<'EOF'\n{BOOT_HOOK}EOF\nchmod 755 /usr/local/sbin/roost-vm-boot-next\nsync"
        ))
        .unwrap();
    f.agent_drop_in(
        "boot-next",
        "ExecStartPre=/usr/local/sbin/roost-vm-boot-next",
    )
    .unwrap();
    f.machine.sh("sync").unwrap();
}

#[test]
fn a_kernel_change_with_policy_auto_reboots_under_a_lease_and_comes_back_on_the_new_system() {
    require!(vm::preflight());
    let mut f = VmFleet::new("2s").expect("VM fleet");
    let v = |generation, kernel| Version {
        kernel: Some(kernel),
        reboot: Some("auto"),
        ..Version::new(generation)
    };
    let v1 = f.publish(&v(1, "6.1")).unwrap();
    f.agent_starts_at_boot(false).unwrap();
    f.machine.boot().unwrap();
    install_boot_hook(&f);
    f.start_agent().unwrap();
    let r1 = f.wait_final(v1.version, DEPLOY).unwrap();
    assert_eq!(r1["state"], "success", "{r1}\n{}", f.diagnose());
    assert_ne!(r1["needs_reboot"], true, "{r1}");
    let boot1 = f.machine.boot_id().unwrap();

    // A new kernel: switched live, then the machine reboots itself into it.
    let v2 = f.publish(&v(2, "6.2")).unwrap();
    let boot2 = f
        .machine
        .wait_rebooted(&boot1, DEPLOY)
        .unwrap_or_else(|e| panic!("{e}\n{}", f.diagnose()));
    assert_ne!(boot2, boot1);
    let back = wait_for("a success after the reboot", DEPLOY, || {
        f.final_reports(v2.version)
            .ok()?
            .into_iter()
            .find(|r| r["state"] == "success" && r["needs_reboot"] != true)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", f.diagnose()));

    // Before the reboot it said why it needed one; afterwards it runs the new system.
    let finals = f.final_reports(v2.version).unwrap();
    let before = &finals[0];
    assert_eq!(before["state"], "success", "{finals:#?}");
    assert_eq!(before["needs_reboot"], true, "{finals:#?}");
    let reasons = before["reboot_reasons"].to_string();
    assert!(
        reasons.contains("kernel") && reasons.contains("linux-6.2"),
        "{reasons}"
    );
    assert!(
        back["seq"].as_u64().unwrap() > before["seq"].as_u64().unwrap(),
        "{finals:#?}"
    );
    let booted = f.machine.sh("readlink /run/booted-system").unwrap();
    assert_eq!(booted.trim(), v2.path);
    assert_eq!(f.system_profile().unwrap(), v2.path);
    let st = f.status().unwrap();
    assert_eq!(st["needs_reboot"], false, "{st:#}");

    // The reboot was taken under a lease from the coordinator, given back once healthy.
    let leases: Value = serde_json::from_slice(
        &f.coordinator
            .read(&reboot_leases_url(&f.coordinator.url()))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(leases["holders"], serde_json::json!([]), "{leases:#}");
    let log: Vec<(&str, &str)> = leases["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["node"].as_str().unwrap(), e["event"].as_str().unwrap()))
        .collect();
    assert_eq!(
        log,
        [(vm::NODE, "acquired"), (vm::NODE, "released")],
        "{leases:#}"
    );
    // The previous boot ended with the agent's reboot, after `wall` told logged-in users.
    let journal = f
        .machine
        .sh("journalctl --no-pager -b -1 -u roost-agent -o cat")
        .unwrap();
    assert!(journal.contains("rebooting"), "{journal}");
    assert!(!journal.contains("wall"), "wall failed:\n{journal}");
}
