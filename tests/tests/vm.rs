//! roost on real machines (#12): Debian guests booted under QEMU with systemd as PID 1, stock
//! Nix, and the agent as a systemd service, against a real coordinator and its embedded cache.
//! Each test boots its own guest from a copy-on-write overlay of one cached image.
//!
//! Run them alone with `cargo test -p roost-tests --test vm` (README, "VM tests").

use std::time::Duration;

use roost_tests::require;
use roost_tests::vm::{self, Version, VmFleet};
use serde_json::Value;

/// Generous: a TCG guest on a busy 2-core host is slow, and waiting longer never hides a bug.
const DEPLOY: Duration = Duration::from_secs(600);

fn fleet(interval: &str) -> VmFleet {
    VmFleet::new(interval).expect("VM fleet")
}

#[test]
fn a_vm_node_converges_tells_systemd_it_is_ready_and_logs_structured_fields_to_the_journal() {
    require!(vm::preflight());
    let mut f = fleet("2s");
    let v1 = f.publish(&Version::new(1)).unwrap();
    f.machine.boot().unwrap();
    let r = f.wait_final(v1.version, DEPLOY).unwrap();
    assert_eq!(r["state"], "success", "{r}\n{}", f.diagnose());
    assert_eq!(f.system_profile().unwrap(), v1.path);

    // systemd saw READY=1 (Type=notify: "active" only after it) and the watchdog is armed.
    let show = f
        .machine
        .sh("systemctl show roost-agent -p ActiveState -p SubState -p WatchdogUSec -p Type")
        .unwrap();
    for want in [
        "ActiveState=active",
        "SubState=running",
        "Type=notify",
        "WatchdogUSec=5min",
    ] {
        assert!(show.contains(want), "{want} not in\n{show}");
    }
    // The activation ran once, in this boot, inside its transient unit.
    let events = f.events().unwrap();
    let starts: Vec<_> = events
        .iter()
        .filter(|e| e.starts_with("activate-start"))
        .collect();
    assert_eq!(starts.len(), 1, "{events:?}");

    // The agent's events carry node, version, profile and phase as journal fields.
    let journal = f
        .machine
        .sh("journalctl -b -u roost-agent -o json --no-pager")
        .unwrap();
    let entries: Vec<Value> = journal
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let version = v1.version.to_string();
    let deployed = entries.iter().find(|e| {
        e["NODE"] == vm::NODE
            && e["VERSION"] == version.as_str()
            && e["PROFILE"] == "system"
            && e.get("PHASE").is_some()
    });
    assert!(
        deployed.is_some(),
        "no journal entry with NODE, VERSION, PROFILE and PHASE among {} entries:\n{}",
        entries.len(),
        journal
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .join("\n")
    );
}
