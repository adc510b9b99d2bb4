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

/// A slow version: its activation sleeps `seconds`.
fn slow(generation: u32, seconds: u32) -> Version {
    Version {
        activation: "slow",
        activation_seconds: seconds,
        ..Version::new(generation)
    }
}

/// After a final report for `v`: it is the only one for that version once the agent has
/// settled (nothing pending, every report delivered), and it says `state`.
fn assert_one_final(f: &VmFleet, v: &vm::Published, state: &str) -> Value {
    f.wait_settled(DEPLOY).unwrap();
    let finals = f.final_reports(v.version).unwrap();
    assert_eq!(
        finals.len(),
        1,
        "final reports for version {}: {finals:?}\n{}",
        v.version,
        f.diagnose()
    );
    assert_eq!(finals[0]["state"], state, "{}\n{}", finals[0], f.diagnose());
    finals[0].clone()
}

/// Journal lines the agent's run with main pid `pid` wrote.
fn agent_journal(f: &VmFleet, pid: u32) -> String {
    f.machine
        .sh(&format!(
            "journalctl _SYSTEMD_UNIT=roost-agent.service _PID={pid} --no-pager -o cat"
        ))
        .unwrap()
}

#[test]
fn an_activation_outlives_a_restart_and_a_kill_9_of_the_agent_and_is_confirmed_and_reported_once() {
    require!(vm::preflight());
    let mut f = fleet("2s");
    let v1 = f.publish(&Version::new(1)).unwrap();
    f.machine.boot().unwrap();
    f.wait_final(v1.version, DEPLOY).unwrap();
    // A stopping agent finishes the deploy it is in (protocol §7.2) unless systemd's stop
    // timeout (90 s by default) runs out first, and then the agent is SIGKILLed with the
    // rest of its cgroup. The test shortens that timeout with a drop-in so the restart
    // kills the agent in the middle of its 30 s activation, as a stop that times out on a
    // longer activation would.
    f.agent_drop_in("stop-soon", "TimeoutStopSec=2s").unwrap();

    for (generation, interruption) in [(2, "restart"), (3, "kill -9")] {
        let v = f.publish(&slow(generation, 30)).unwrap();
        f.wait_event("activate-start", &v.path, DEPLOY).unwrap();
        let before = f.agent_pid().unwrap();
        match interruption {
            "restart" => f.machine.sh("systemctl restart --no-block roost-agent"),
            _ => f.machine.sh(&format!("kill -9 {before}")),
        }
        .unwrap();
        let r = f.wait_final(v.version, DEPLOY).unwrap();
        let context = format!("after a {interruption} during the activation of {}", v.path);
        assert_eq!(r["state"], "success", "{context}: {r}\n{}", f.diagnose());
        assert_one_final(&f, &v, "success");
        assert_eq!(f.system_profile().unwrap(), v.path, "{context}");

        // The activation ran once, to its end, in its own unit; the health check once.
        for (event, times) in [
            ("activate-start", 1),
            ("activate-end", 1),
            ("health-start", 1),
        ] {
            assert_eq!(
                f.count_events(event, &v.path).unwrap(),
                times,
                "{context}: {event}\n{:?}",
                f.events().unwrap()
            );
        }
        // A new agent did the confirming: it found the interrupted deploy and waited for the
        // activation that outlived its predecessor.
        let after = f.agent_pid().unwrap();
        assert_ne!(after, before, "{context}: the agent was not replaced");
        let journal = agent_journal(&f, after);
        for want in [
            "found an interrupted deploy; recovering",
            "an activation that outlived the previous run of the agent",
        ] {
            assert!(
                journal.contains(want),
                "{context}: `{want}` not in the new agent's journal:\n{journal}"
            );
        }
        // systemd ran it in its transient unit, started once, ended well.
        let unit = format!("roost-activate-system-{}.service", v.version);
        let units = f
            .machine
            .sh(&format!("journalctl -b UNIT={unit} --no-pager -o cat"))
            .unwrap();
        assert_eq!(
            units.matches("Started ").count(),
            1,
            "{context}: systemd about {unit}:\n{units}"
        );
        assert!(
            !units.contains("Failed") && !units.contains("Killing"),
            "{context}: systemd about {unit}:\n{units}"
        );
    }
}

#[test]
fn a_hung_agent_is_restarted_by_the_watchdog_and_resumes_polling() {
    require!(vm::preflight());
    let mut f = fleet("2s");
    let v1 = f.publish(&Version::new(1)).unwrap();
    f.machine.boot().unwrap();
    f.wait_final(v1.version, DEPLOY).unwrap();
    // The module's WatchdogSec is 5 min; a drop-in makes it 20 s so the test does not wait
    // that long. The agent pings at half the period, as it does with 5 min.
    f.agent_drop_in("watchdog-soon", "WatchdogSec=20s").unwrap();
    f.machine.sh("systemctl restart roost-agent").unwrap();
    f.wait_settled(DEPLOY).unwrap();
    let show = f
        .machine
        .sh("systemctl show roost-agent -p WatchdogUSec")
        .unwrap();
    assert!(show.contains("WatchdogUSec=20s"), "{show}");
    // Still alive one watchdog period later: a live agent's pings keep it.
    let hung = f.agent_pid().unwrap();
    std::thread::sleep(Duration::from_secs(25));
    assert_eq!(f.agent_pid().unwrap(), hung, "restarted while it was well");

    f.machine.sh(&format!("kill -STOP {hung}")).unwrap();
    vm::wait_guest("the watchdog to replace the hung agent", DEPLOY, || {
        let pid = f.agent_pid()?;
        Ok(pid != 0 && pid != hung)
    })
    .unwrap();
    let systemd = f
        .machine
        .sh("journalctl -b UNIT=roost-agent.service --no-pager -o cat")
        .unwrap();
    assert!(
        systemd.contains("Watchdog timeout"),
        "systemd did not say it was the watchdog:\n{systemd}"
    );
    // It polls again: a new version is deployed.
    let v2 = f.publish(&Version::new(2)).unwrap();
    let r = f.wait_final(v2.version, DEPLOY).unwrap();
    assert_eq!(r["state"], "success", "{r}\n{}", f.diagnose());
    assert_eq!(f.system_profile().unwrap(), v2.path);
    assert_one_final(&f, &v2, "success");
}

#[test]
fn an_activation_that_reboots_the_machine_is_rolled_back_after_the_boot_and_reported_once() {
    require!(vm::preflight());
    let mut f = fleet("2s");
    let v1 = f.publish(&Version::new(1)).unwrap();
    f.machine.boot().unwrap();
    f.wait_final(v1.version, DEPLOY).unwrap();
    let first_boot = f.machine.boot_id().unwrap();

    let v2 = f
        .publish(&Version {
            activation: "reboot",
            ..Version::new(2)
        })
        .unwrap();
    let second_boot = f.machine.wait_rebooted(&first_boot, DEPLOY).unwrap();
    let r = f.wait_final(v2.version, DEPLOY).unwrap();
    // The shutdown stopped the activation's unit before it ended, so the agent left its
    // pending record for the next boot; there the unit is gone, the activation never
    // finished, and recovery rolls back (protocol §7.10, 4).
    assert_eq!(r["state"], "rolled_back", "{r}\n{}", f.diagnose());
    assert_eq!(r["error"]["phase"], "recover", "{r}");
    let r = assert_one_final(&f, &v2, "rolled_back");
    assert_eq!(f.system_profile().unwrap(), v1.path, "{r}");
    let status = f.status().unwrap();
    assert_eq!(status["current_version"], v1.version, "{status}");
    assert!(
        status["quarantined"]
            .as_array()
            .is_some_and(|q| q.contains(&Value::from(v2.version))),
        "{status}"
    );
    // What ran where: v2's activation started and rebooted in the first boot, never ended;
    // v1's activation ran again in the second (the rollback).
    let events = f.events().unwrap();
    let has = |event: &str, boot: &str, path: &str| {
        events
            .iter()
            .any(|e| *e == format!("{event} {boot} {path}"))
    };
    assert!(has("activate-reboot", &first_boot, &v2.path), "{events:?}");
    assert_eq!(
        f.count_events("activate-end", &v2.path).unwrap(),
        0,
        "{events:?}"
    );
    assert!(has("activate-start", &second_boot, &v1.path), "{events:?}");

    // And the node goes on deploying.
    let v3 = f.publish(&Version::new(3)).unwrap();
    let r = f.wait_final(v3.version, DEPLOY).unwrap();
    assert_eq!(r["state"], "success", "{r}\n{}", f.diagnose());
    assert_eq!(f.system_profile().unwrap(), v3.path);
    assert_one_final(&f, &v3, "success");
    assert_seq_order(&f);
}

/// The coordinator's reports come in `seq` order, and the final ones in version order.
fn assert_seq_order(f: &VmFleet) {
    let reports = f.reports().unwrap();
    let seqs: Vec<u64> = reports.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "reports out of seq order: {seqs:?}"
    );
    let versions: Vec<u64> = reports
        .iter()
        .filter(|r| vm::is_final(r))
        .filter_map(|r| r["manifest_version"].as_u64())
        .collect();
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "final reports not one per version in version order: {versions:?}"
    );
}

/// Where in a deploy a power cut is aimed.
#[derive(Debug, Clone, Copy)]
enum Moment {
    Realise,
    SetProfile,
    Activate,
    Confirm,
}

impl Moment {
    /// The version to deploy, made so the moment lasts long enough to be hit.
    fn version(self, generation: u32) -> Version {
        let v = Version {
            // A long deadline (Σ activation timeouts + confirm + 60 s): a boot under TCG
            // cannot outlast it, so the rule recovery follows is known from the record.
            activation_timeout: 300,
            ..Version::new(generation)
        };
        match self {
            Moment::Realise => Version {
                blob_kib: 8 * 1024,
                ..v
            },
            Moment::SetProfile => v,
            Moment::Activate => Version {
                activation: "slow",
                activation_seconds: 6,
                ..v
            },
            Moment::Confirm => Version {
                health_seconds: 6,
                ..v
            },
        }
    }

    /// A guest script that prints `CUT …` at a random instant of the moment (`pick` is a
    /// number in [0, 1) from the test's seeded generator).
    fn aim(self, path: &str, pick: f64) -> String {
        let (wait, window) = match self {
            // The agent's phase while it realises (status.json, rewritten on phase changes).
            Moment::Realise => (
                r#"grep -q '"phase": *"downloading"' /var/lib/roost/status.json"#.to_owned(),
                1.5,
            ),
            // The intent saved just before `nix-env --set`, no activation started yet.
            Moment::SetProfile => (
                r#"grep -q '"switched": *true' /var/lib/roost/state.json"#.to_owned(),
                0.8,
            ),
            Moment::Activate => (
                format!("grep -q '^activate-start .* {path}$' /var/lib/roost-vm/events.log"),
                5.5,
            ),
            Moment::Confirm => (
                format!("grep -q '^health-start .* {path}$' /var/lib/roost-vm/events.log"),
                5.5,
            ),
        };
        let delay = window * pick;
        format!(
            "until {wait} 2>/dev/null; do sleep 0.02; done\nsleep {delay:.3}\necho \"CUT {self:?} +{delay:.3}s\""
        )
    }
}

/// A small seeded generator (splitmix64): the seed is printed, so a failing run can be
/// repeated with ROOST_VM_SEED.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What recovery must make of what a power cut left (protocol §7.10): `success` when no
/// profile was really switched (the deploy is simply tried again) or everything was
/// activated before the deadline (confirmation runs again), else `rolled_back`.
fn expected_after_cut(f: &VmFleet, state: &Value) -> &'static str {
    let pending = &state["pending"];
    if pending.is_null() {
        return "success";
    }
    let p = &pending["profiles"][0];
    let link = f
        .machine
        .sh("readlink /nix/var/nix/profiles/system")
        .unwrap();
    let at: Option<u64> = link
        .trim()
        .strip_prefix("system-")
        .and_then(|l| l.strip_suffix("-link"))
        .and_then(|n| n.parse().ok());
    let activated = p["activated"] == true;
    let switched = at != p["previous_generation"].as_u64()
        || (p["switched"] == true && (activated || !p["activation"].is_null()));
    if !switched {
        return "success";
    }
    let before_deadline = f
        .machine
        .exec(&format!(
            "[ $(date +%s) -lt $(date -d {} +%s) ]",
            pending["deadline"].as_str().unwrap()
        ))
        .unwrap()
        .0
        == 0;
    if activated && before_deadline {
        "success"
    } else {
        "rolled_back"
    }
}

/// Ten power cuts, one guest rebooted after each: the longest test here (about a minute a
/// cut under TCG), named to sort first so libtest starts it first and the other tests run
/// beside it.
#[test]
fn a_power_cut_at_random_moments_of_deploys_leaves_the_old_or_the_new_generation_and_one_report_each()
 {
    require!(vm::preflight());
    let seed = std::env::var("ROOST_VM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("power cuts: seed {seed} (ROOST_VM_SEED={seed} repeats it)");
    let mut rng = Rng(seed);
    let mut f = fleet("2s");
    let v1 = f.publish(&Version::new(1)).unwrap();
    f.machine.boot().unwrap();
    f.wait_final(v1.version, DEPLOY).unwrap();
    let mut current = v1.path.clone();
    let mut published = vec![v1.version];

    let moments = [
        Moment::Realise,
        Moment::SetProfile,
        Moment::Activate,
        Moment::Confirm,
    ];
    for i in 0..10u32 {
        let moment = moments[i as usize % moments.len()];
        let v = f.publish(&moment.version(i + 2)).unwrap();
        published.push(v.version);
        let cut = f
            .machine
            .wait_for_line(&moment.aim(&v.path, rng.next()), "CUT", DEPLOY)
            .unwrap();
        f.machine
            .power_cut(&format!("version {} at {cut}", v.version));
        // Look at what the cut left before the agent's recovery touches it.
        f.agent_starts_at_boot(false).unwrap();
        f.machine.boot().unwrap();
        let found = f.system_profile().unwrap();
        let context = format!(
            "cut {} ({cut}) of version {} (seed {seed})",
            i + 1,
            v.version
        );
        assert!(
            found == current || found == v.path,
            "{context}: the profile is {found}, neither the old {current} nor the new {}",
            v.path
        );
        let state = f.state().unwrap();
        let expected = expected_after_cut(&f, &state);
        eprintln!(
            "{context}: profile at the {} generation, pending {}; expecting {expected}",
            if found == current { "old" } else { "new" },
            state["pending"]
        );

        f.start_agent().unwrap();
        let r = f
            .wait_final(v.version, DEPLOY)
            .unwrap_or_else(|e| panic!("{context}: {e:#}"));
        assert_eq!(r["state"], expected, "{context}: {r}\n{}", f.diagnose());
        let settled = f.wait_settled(DEPLOY).unwrap();
        if expected == "success" {
            current = v.path.clone();
        } else {
            assert_eq!(r["error"]["phase"], "recover", "{context}: {r}");
        }
        assert_eq!(f.system_profile().unwrap(), current, "{context}");
        assert!(settled["pending"].is_null(), "{context}: {settled}");
        for version in &published {
            let finals = f.final_reports(*version).unwrap();
            assert_eq!(
                finals.len(),
                1,
                "{context}: final reports of version {version}: {finals:?}"
            );
        }
        assert_seq_order(&f);
    }
}
