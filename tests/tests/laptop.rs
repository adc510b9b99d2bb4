//! Laptops and Raspberry Pis (docs/protocol.md §7.13–§7.15) on namespaced nodes with real
//! Nix: apply windows with an injected clock, a fake `/sys/class/power_supply` bind-mounted
//! into the node, a fake NetworkManager on a private D-Bus bus, `defer` and its bounds, the
//! `boot` goal, desktop notifications received on a session bus, and retention with garbage
//! collection on a small tmpfs `/nix`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use roost_common::Timestamp;
use roost_tests::desktop::{
    FakeNetworkManager, NotificationListener, PrivateBus, fake_power_supply,
};
use roost_tests::fleet::{Settings, tail};
use roost_tests::{Fleet, preflight, require, run};
use serde_json::{Value, json};

const NODE: &str = "pi-kitchen";
const LONG: Duration = Duration::from_secs(120);

/// Publishes generation `generation` (with `blob_kib` of data in the system); returns the
/// version and the system's store path.
fn publish(f: &Fleet, generation: u32, blob_kib: u64, extra: &[&str]) -> (u64, String) {
    publish_settings(
        f,
        &Settings {
            generation,
            blob_kib: vec![(NODE, blob_kib)],
            ..Settings::default()
        },
        extra,
    )
}

/// Publishes the fixture with `settings`; returns the version and the system's store path.
fn publish_settings(f: &Fleet, settings: &Settings, extra: &[&str]) -> (u64, String) {
    f.settings(settings).unwrap();
    let summary = f.publish_with(&[&format!("#{NODE}")], extra).unwrap();
    let n = &summary["nodes"][0];
    (
        n["version"].as_u64().unwrap(),
        n["profiles"][0]["path"].as_str().unwrap().to_owned(),
    )
}

/// Writes the node's agent config file (laptop keys only; the rest are flags).
fn config(f: &Fleet, keys: Value) -> PathBuf {
    let p = f.node(NODE).dir.join("agent.json");
    std::fs::write(&p, keys.to_string()).unwrap();
    p
}

fn agent_args(f: &Fleet, cfg: &Path, once: bool) -> Vec<String> {
    let mut a = f.agent_args(f.node(NODE), once);
    a.extend(["--config".into(), cfg.display().to_string()]);
    a
}

fn start(f: &mut Fleet, cfg: &Path, env: &[(&str, &str)]) {
    let args = agent_args(f, cfg, false);
    f.node_mut(NODE).start_agent(&args, env).unwrap();
}

fn in_store(f: &Fleet, path: &str) -> bool {
    f.node(NODE)
        .nix_dir()
        .join(path.trim_start_matches("/nix/"))
        .exists()
}

fn system(f: &Fleet) -> Option<String> {
    f.node(NODE).profile_target("var/nix/profiles/system")
}

fn wait_deferred(f: &Fleet, version: u64, phase: &str) -> Value {
    let r = f.wait_report(NODE, version, "deferred", LONG).unwrap();
    assert_eq!(r["error"]["phase"], phase, "{r:#}");
    r
}

/// `roost-agent ARGS` inside the node, to completion.
fn agent(f: &Fleet, args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    f.node(NODE).run_agent(&args, &[]).unwrap()
}

#[test]
fn outside_its_window_a_manifest_is_downloaded_ahead_and_applied_when_the_window_opens() {
    require!(preflight());
    let mut f = Fleet::new(&[NODE]).unwrap();
    let (v1, path) = publish(&f, 1, 0, &[]);
    // The node's clock starts 40 s before 12:00 UTC (today's date: the manifest is fresh).
    let now = Timestamp::now().unix();
    let noon = now - now % 86_400 + 12 * 3600;
    let start_at = Timestamp::from_unix(noon - 40).to_string();
    let cfg = config(&f, json!({ "apply_windows": ["12:00-13:00"] }));
    start(
        &mut f,
        &cfg,
        &[("ROOST_TEST_CLOCK", &start_at), ("TZ", "UTC")],
    );
    let r = wait_deferred(&f, v1, "window");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("waiting for window 12:00-13:00 (opens in "),
        "{msg}"
    );
    assert_eq!(r["deferred_until"], Timestamp::from_unix(noon).to_string());
    assert!(
        in_store(&f, &path),
        "the closure is fetched ahead of the window"
    );
    assert_eq!(system(&f), None, "nothing is switched outside the window");
    let st = f.node(NODE).status_json().unwrap();
    assert_eq!(st["waiting"]["kind"], "window", "{st:#}");
    assert!(
        st["waiting"]["message"]
            .as_str()
            .unwrap()
            .starts_with("waiting for window 12:00-13:00 (opens in "),
        "{st:#}"
    );
    let text = f.node(NODE).status_text().unwrap();
    assert!(text.contains("WAITING         version"), "{text}");
    f.wait_report(NODE, v1, "success", LONG).unwrap();
    assert_eq!(system(&f), Some(path.clone()));
    assert_eq!(
        f.node(NODE).activations(),
        vec![format!("switch {path}")],
        "activated once, when the window opened"
    );
}

#[test]
fn on_battery_below_the_charge_a_deploy_waits_without_downloading_and_mains_resumes_it() {
    require!(preflight());
    let mut f = Fleet::new(&[NODE]).unwrap();
    let power = f.node(NODE).dir.join("power_supply");
    fake_power_supply(&power, false, 20).unwrap();
    f.node_mut(NODE).bind(&power, "/sys/class/power_supply");
    let (v1, path) = publish(&f, 1, 0, &[]);
    let metrics = f.node(NODE).dir.join("textfile/roost.prom");
    let cfg = config(
        &f,
        json!({ "min_battery_percent": 30, "metrics_file": metrics }),
    );
    start(&mut f, &cfg, &[]);
    let r = wait_deferred(&f, v1, "power");
    let text = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        text.contains("roost_agent_deferred{reason=\"power\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!("roost_agent_desired_version {v1}\n")),
        "{text}"
    );
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("on battery at 20 %, below 30 %"),
        "{r:#}"
    );
    assert!(
        !in_store(&f, &path),
        "nothing is downloaded on a low battery"
    );
    fake_power_supply(&power, true, 20).unwrap();
    f.wait_report(NODE, v1, "success", LONG).unwrap();
    assert_eq!(system(&f), Some(path));
    let text = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        text.contains("roost_agent_state{state=\"success\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!("roost_agent_current_version {v1}\n")),
        "{text}"
    );
    assert!(text.contains("roost_agent_deferred 0\n"), "{text}");
    assert!(
        text.contains("roost_agent_last_successful_poll_timestamp_seconds "),
        "{text}"
    );
}

#[test]
fn on_a_metered_network_a_large_download_waits_until_networkmanager_says_otherwise() {
    require!(preflight());
    require!(roost_preflight::tools(&["dbus-daemon"]));
    let mut f = Fleet::new(&[NODE]).unwrap();
    let dir = f.node(NODE).dir.join("dbus");
    let bus = PrivateBus::start(&dir, &dir.join("system_bus_socket")).unwrap();
    let nm = FakeNetworkManager::serve(&bus.address(), 1).unwrap();
    let (v1, path) = publish(&f, 1, 64, &[]);
    let cfg = config(&f, json!({ "metered_max_download": "16KiB" }));
    start(&mut f, &cfg, &[("DBUS_SYSTEM_BUS_ADDRESS", &bus.address())]);
    let r = wait_deferred(&f, v1, "metered");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("metered connection may fetch 16.0 KiB"),
        "{r:#}"
    );
    assert!(
        !in_store(&f, &path),
        "nothing is downloaded on a metered link"
    );
    nm.set_metered(2);
    f.wait_report(NODE, v1, "success", LONG)
        .unwrap_or_else(|e| panic!("{e}\n{}", tail(&f.node(NODE).log(), 30)));
    assert_eq!(system(&f), Some(path));
}

#[test]
fn defer_is_bounded_by_the_maximum_and_the_manifests_expiry_and_zero_ends_it() {
    require!(preflight());
    let mut f = Fleet::new(&[NODE]).unwrap();
    let (v1, p1) = publish(&f, 1, 0, &[]);
    let cfg = config(&f, json!({ "max_defer": "4h" }));
    start(&mut f, &cfg, &[]);
    f.wait_report(NODE, v1, "success", LONG).unwrap();
    assert_eq!(system(&f), Some(p1));

    let state = f.node(NODE).state_dir().display().to_string();
    let cfg_s = cfg.display().to_string();
    let before = Timestamp::now();
    let out = agent(
        &f,
        &["defer", "48h", "--state-dir", &state, "--config", &cfg_s],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("cut to the configured maximum of 4 hours"),
        "{text}"
    );
    let until: Timestamp = std::fs::read_to_string(f.node(NODE).state_dir().join("defer-until"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let h4 = Duration::from_secs(4 * 3600);
    assert!(
        until >= before.plus(h4) && until <= Timestamp::now().plus(h4),
        "{until}"
    );

    // A new version, expiring in an hour, waits for the deferral.
    let (v2, p2) = publish(&f, 2, 0, &["--expires", "1h"]);
    let r = wait_deferred(&f, v2, "defer");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("deferred by the user until")
    );
    assert_eq!(r["deferred_until"], until.to_string());
    // Deferring again is cut to its expiry.
    let out = agent(
        &f,
        &["defer", "3h", "--state-dir", &state, "--config", &cfg_s],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("when the desired manifest expires"), "{text}");
    let until: Timestamp = std::fs::read_to_string(f.node(NODE).state_dir().join("defer-until"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        until <= Timestamp::now().plus(Duration::from_secs(3600)),
        "{until}"
    );
    let out = agent(&f, &["defer", "soon", "--state-dir", &state]);
    assert_eq!(out.status.code(), Some(2), "a bad duration is bad usage");
    let out = agent(&f, &["defer", "0", "--state-dir", &state]);
    assert_eq!(out.status.code(), Some(0));
    f.wait_report(NODE, v2, "success", LONG).unwrap();
    assert_eq!(system(&f), Some(p2));
}

#[test]
fn the_boot_goal_installs_for_the_next_boot_and_says_a_reboot_is_pending() {
    require!(preflight());
    let mut f = Fleet::new(&[NODE]).unwrap();
    // A /run of the node's own whose booted system is not the new one.
    let run_dir = f.node(NODE).dir.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    std::os::unix::fs::symlink(
        f.node(NODE).dir.join("state"),
        run_dir.join("booted-system"),
    )
    .unwrap();
    f.node_mut(NODE).bind(&run_dir, "/run");
    let (v1, path) = publish(&f, 1, 0, &[]);
    let cfg = config(&f, json!({ "system_goal": "boot" }));
    let out = f
        .node(NODE)
        .run_agent(&agent_args(&f, &cfg, true), &[])
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(f.node(NODE).activations(), vec![format!("boot {path}")]);
    assert_eq!(system(&f), Some(path));
    let r = f.wait_report(NODE, v1, "success", LONG).unwrap();
    assert_eq!(r["needs_reboot"], true, "{r:#}");
    assert_eq!(f.node(NODE).status_json().unwrap()["needs_reboot"], true);
    let text = f.node(NODE).status_text().unwrap();
    assert!(
        text.contains("is installed, active after the next boot"),
        "{text}"
    );
}

#[test]
fn users_are_told_on_their_session_bus_when_a_version_waits_is_applied_or_is_rolled_back() {
    require!(preflight());
    require!(roost_preflight::tools(&["dbus-daemon"]));
    let mut f = Fleet::new(&[NODE]).unwrap();
    let run_user = f.node(NODE).dir.join("run-user");
    let bus =
        PrivateBus::start(&f.node(NODE).dir.join("dbus"), &run_user.join("1000/bus")).unwrap();
    for d in [&run_user, &run_user.join("1000")] {
        run(Command::new("chmod").arg("755").arg(d)).unwrap();
    }
    f.node_mut(NODE).bind(&run_user, "/run/user");
    let listener = NotificationListener::serve(&bus.address()).unwrap();
    let cfg = config(&f, json!({}));
    let state = f.node(NODE).state_dir().display().to_string();
    let out = agent(&f, &["defer", "1h", "--state-dir", &state]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let (v1, path) = publish(&f, 1, 0, &[]);
    start(&mut f, &cfg, &[]);
    let n = listener
        .wait_for("System update waiting", LONG)
        .unwrap_or_else(|e| panic!("{e}\n{}", tail(&f.node(NODE).log(), 30)));
    assert_eq!(n.app, "roost");
    assert!(n.body.contains(&format!("Version {v1}")), "{n:?}");
    assert!(n.body.contains("deferred by the user"), "{n:?}");
    let out = agent(&f, &["defer", "0", "--state-dir", &state]);
    assert_eq!(out.status.code(), Some(0));
    let n = listener.wait_for("System updated", LONG).unwrap();
    assert!(
        n.body.contains(&format!("Version {v1} is now active")),
        "{n:?}"
    );
    assert_eq!(system(&f), Some(path.clone()));
    // A version whose activation fails is rolled back, and the user hears why.
    let (v2, _) = publish_settings(
        &f,
        &Settings {
            generation: 2,
            behaviour: vec![(NODE, "fail")],
            ..Settings::default()
        },
        &[],
    );
    let n = listener
        .wait_for("System update rolled back", LONG)
        .unwrap();
    assert!(n.body.contains(&format!("Version {v2} failed")), "{n:?}");
    assert!(n.body.contains("fails on purpose"), "{n:?}");
    f.wait_report(NODE, v2, "rolled_back", LONG).unwrap();
    assert_eq!(system(&f), Some(path));
}

/// A tmpfs mounted on the host, unmounted on drop.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn store_systems(f: &Fleet) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(f.node(NODE).nix_dir().join("store"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.split_once("-nixos-system-pi-kitchen-")
                .map(|(_, g)| g.to_owned())
        })
        .filter(|g| !g.ends_with(".drv"))
        .collect();
    v.sort();
    v
}

fn generations(f: &Fleet) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(f.node(NODE).nix_dir().join("var/nix/profiles"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix("system-")?
                .strip_suffix("-link")?
                .parse()
                .ok()
        })
        .collect();
    v.sort();
    v
}

#[test]
fn ten_deploys_keep_two_generations_and_fit_a_small_store_only_through_gc() {
    require!(preflight());
    let f = Fleet::new(&[NODE]).unwrap();
    // 8 MiB of data per system. After the first deploy the store is cut to what it uses
    // plus two and a half closures: three closures fill it, so from the fourth deploy on the
    // new closure fits only once a dead one is collected.
    let nix = f.node(NODE).nix_dir();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=200m", "tmpfs"])
        .arg(&nix))
    .unwrap();
    let _tmpfs = Tmpfs(nix.clone());
    let cfg = config(&f, json!({ "keep_generations": 2 }));
    let mut freed_before_download = 0;
    for g in 1..=10 {
        let (v, path) = publish(&f, g, 8 * 1024, &[]);
        let out = f
            .node(NODE)
            .run_agent(&agent_args(&f, &cfg, true), &[])
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "generation {g}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            tail(&f.node(NODE).log(), 30)
        );
        assert_eq!(system(&f), Some(path));
        let r = f.wait_report(NODE, v, "success", LONG).unwrap();
        if g == 1 {
            let s = nix::sys::statvfs::statvfs(&nix).unwrap();
            let used = (s.blocks() - s.blocks_free()) * s.fragment_size();
            let size = used + (8 << 20) * 5 / 2;
            run(Command::new("mount")
                .args(["-o", &format!("remount,size={}k", size / 1024)])
                .arg(&nix))
            .unwrap();
        }
        if g >= 4 {
            let freed = r["gc_freed_bytes"].as_u64().unwrap_or(0);
            assert!(
                freed >= 8 << 20,
                "generation {g} fit without collecting a dead closure first: {r:#}"
            );
            freed_before_download += freed;
        }
    }
    assert!(freed_before_download > 0);
    let st = f.node(NODE).status_json().unwrap();
    assert!(
        st["last_gc"]["freed_bytes"].as_u64().unwrap() >= 8 << 20,
        "{st:#}"
    );
    assert!(f.node(NODE).status_text().unwrap().contains("freed, "));
    assert_eq!(generations(&f), vec![9, 10], "current and one more healthy");
    let kept = store_systems(&f);
    assert!(
        kept.contains(&"g9".to_owned()) && kept.contains(&"g10".to_owned()),
        "{kept:?}"
    );
    assert!(kept.len() <= 3, "at most one dead closure waits: {kept:?}");
    // What roost kept is exactly what a collection keeps: the kept generations' closures.
    run(&mut f
        .node(NODE)
        .command(Path::new("nix-store"), &["--gc".into()]))
    .unwrap();
    assert_eq!(store_systems(&f), ["g10", "g9"]);
}

#[test]
fn with_gc_after_deploy_each_deploy_collects_what_retention_let_go() {
    require!(preflight());
    let f = Fleet::new(&[NODE]).unwrap();
    let cfg = config(
        &f,
        json!({ "keep_generations": 1, "gc_after_deploy": true }),
    );
    let mut paths = Vec::new();
    for g in 1..=3 {
        let (v, path) = publish(&f, g, 1024, &[]);
        let out = f
            .node(NODE)
            .run_agent(&agent_args(&f, &cfg, true), &[])
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "generation {g}");
        let r = f.wait_report(NODE, v, "success", LONG).unwrap();
        if g > 1 {
            assert_eq!(r["generations_removed"], 1, "{r:#}");
            assert!(
                r["gc_freed_bytes"].as_u64().unwrap() >= 1 << 20,
                "the previous system's blob was collected: {r:#}"
            );
        }
        paths.push(path);
    }
    assert_eq!(generations(&f), vec![3]);
    assert!(!in_store(&f, &paths[0]) && !in_store(&f, &paths[1]));
    assert!(in_store(&f, &paths[2]));
}
