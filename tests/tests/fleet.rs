//! The fleet end to end (DESIGN §9): a real coordinator, real agents in namespaced nodes with
//! their own /nix, real Nix, and faults injected on the network, the cache and the processes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use roost_common::wire::v1::http as v1;
use roost_tests::fleet::{Settings, tail};
use roost_tests::{Fleet, preflight, require, wait_for};
use serde_json::Value;

const NODES: [&str; 3] = ["laptop", "pi-kitchen", "pi-garage"];
const LONG: Duration = Duration::from_secs(120);

/// Version and per-node profile paths from a publish summary.
struct Published {
    version: u64,
    paths: BTreeMap<String, BTreeMap<String, String>>,
}

fn published(summary: &Value) -> Published {
    let mut paths = BTreeMap::new();
    let mut version = 0;
    for n in summary["nodes"].as_array().expect("nodes") {
        assert_eq!(n["result"], "published", "{n}");
        version = n["version"].as_u64().expect("version");
        let profiles = n["profiles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_owned(),
                    p["path"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        paths.insert(n["node"].as_str().unwrap().to_owned(), profiles);
    }
    Published { version, paths }
}

fn publish(f: &Fleet, s: &Settings) -> Published {
    f.settings(s).unwrap();
    published(&f.publish(&[]).unwrap())
}

fn system_of(p: &Published, node: &str) -> String {
    p.paths[node]["system"].clone()
}

fn at(f: &Fleet, node: &str) -> Option<String> {
    f.node(node).profile_target("var/nix/profiles/system")
}

fn history(f: &Fleet, node: &str) -> Vec<Value> {
    let body = f
        .coordinator
        .read(&v1::report_history_url(&f.coordinator.url(), node, 10_000))
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    v["reports"].as_array().cloned().unwrap_or_default()
}

fn seqs_without_gap(reports: &[Value]) -> bool {
    let mut seqs: Vec<u64> = reports.iter().filter_map(|r| r["seq"].as_u64()).collect();
    seqs.sort();
    !seqs.is_empty() && seqs[0] == 1 && seqs.windows(2).all(|w| w[1] == w[0] + 1)
}

/// Queued report files (`*.json`) anywhere under `dir`.
fn count_json(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        count_json(&p)
                    } else {
                        usize::from(p.extension().is_some_and(|x| x == "json"))
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn generation(n: u32) -> Settings {
    Settings {
        generation: n,
        ..Settings::default()
    }
}

#[test]
fn converge_every_node_reaches_the_published_paths() {
    require!(preflight());
    let mut f = Fleet::new(&NODES).unwrap();
    let p = publish(&f, &generation(1));
    f.start_agents().unwrap();
    for node in NODES {
        f.wait_report(node, p.version, "success", LONG).unwrap();
        assert_eq!(
            at(&f, node).as_deref(),
            Some(system_of(&p, node).as_str()),
            "{node}"
        );
        let status = f.node(node).status_json().unwrap();
        assert_eq!(
            status["current_version"].as_u64(),
            Some(p.version),
            "{node}: {status}"
        );
        for prof in status["profiles"].as_array().unwrap() {
            assert_eq!(prof["up_to_date"], true, "{node}: {prof}");
            assert_eq!(
                prof["current"],
                p.paths[node][prof["name"].as_str().unwrap()].as_str(),
                "{node}"
            );
        }
    }
    // The laptop's user profile landed too, in deploy-rs's place for root's other profiles.
    assert_eq!(
        f.node("laptop")
            .profile_target("var/nix/profiles/per-user/root/home")
            .as_deref(),
        Some(p.paths["laptop"]["home"].as_str())
    );
    // The coordinator's status agrees, and says so in its exit code.
    let out = std::process::Command::new(roost_tests::bin("roost-coordinator"))
        .args(["status", "--json", "--coordinator", &f.coordinator.url()])
        .env("ROOST_READ_TOKEN_FILE", &f.keys.token_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    for n in doc["nodes"].as_array().unwrap() {
        assert_eq!(n["state"], "success", "{n}");
        assert_eq!(n["reported_version"].as_u64(), Some(p.version));
        assert_eq!(n["healthy"], true);
    }
    // Each node activated its system exactly once.
    for node in NODES {
        assert_eq!(
            f.node(node).activations(),
            vec![format!("switch {}", system_of(&p, node))],
            "{node}"
        );
    }
}

#[test]
fn an_offline_node_catches_up_straight_to_the_newest_version() {
    require!(preflight());
    let mut f = Fleet::new(&["laptop", "pi-garage"]).unwrap();
    let first = publish(&f, &generation(1));
    f.start_agents().unwrap();
    f.wait_report("pi-garage", first.version, "success", LONG)
        .unwrap();
    f.node("pi-garage").set_link(false).unwrap();
    let mut last = first;
    let mut skipped = Vec::new();
    for g in 2..=4 {
        last = publish(&f, &generation(g));
        skipped.push(system_of(&last, "pi-garage"));
        f.wait_report("laptop", last.version, "success", LONG)
            .unwrap();
    }
    skipped.pop();
    f.node("pi-garage").set_link(true).unwrap();
    f.wait_report("pi-garage", last.version, "success", LONG)
        .unwrap();
    assert_eq!(at(&f, "pi-garage"), Some(system_of(&last, "pi-garage")));
    let acts = f.node("pi-garage").activations().join("\n");
    for old in &skipped {
        assert!(
            !acts.contains(old.as_str()),
            "an intermediate version was applied: {old}\n{acts}"
        );
    }
    // Generation 1 (first) and 2 (newest): nothing in between.
    let status = f.node("pi-garage").status_json().unwrap();
    assert_eq!(status["profiles"][0]["generation"], 2);
}

#[test]
fn a_network_cut_mid_download_leaves_nothing_half_activated() {
    require!(preflight());
    let mut f = Fleet::new(&["pi-kitchen"]).unwrap();
    let first = publish(&f, &generation(1));
    f.start_agents().unwrap();
    f.wait_report("pi-kitchen", first.version, "success", LONG)
        .unwrap();
    // A 6 MiB closure over a 2 Mbit/s link takes ~25 s: plenty of time to cut it mid-way.
    f.node("pi-kitchen")
        .set_download_rate(Some("2mbit"))
        .unwrap();
    let big = Settings {
        generation: 2,
        blob_kib: vec![("pi-kitchen", 6 * 1024)],
        ..Settings::default()
    };
    let second = publish(&f, &big);
    let node = f.node("pi-kitchen");
    wait_for("the download to start", LONG, || {
        node.log()
            .contains(&format!("deploying version={}", second.version))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", tail(&node.log(), 30)));
    std::thread::sleep(Duration::from_secs(3));
    node.set_link(false).unwrap();
    // While cut: still on the old system, never activated the new one.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(at(&f, "pi-kitchen"), Some(system_of(&first, "pi-kitchen")));
    node.set_download_rate(None).unwrap();
    node.set_link(true).unwrap();
    f.wait_report(
        "pi-kitchen",
        second.version,
        "success",
        Duration::from_secs(180),
    )
    .unwrap();
    assert_eq!(at(&f, "pi-kitchen"), Some(system_of(&second, "pi-kitchen")));
    let acts = f.node("pi-kitchen").activations();
    assert_eq!(
        acts.iter()
            .filter(|a| a.contains(&system_of(&second, "pi-kitchen")))
            .count(),
        1,
        "{acts:?}"
    );
}

#[test]
fn a_coordinator_outage_loses_no_report_and_keeps_systems_running() {
    require!(preflight());
    let mut f = Fleet::new(&["laptop", "pi-kitchen"]).unwrap();
    let first = publish(&f, &generation(1));
    f.start_agents().unwrap();
    for n in ["laptop", "pi-kitchen"] {
        f.wait_report(n, first.version, "success", LONG).unwrap();
    }
    // The next version is published, then the coordinator dies before nodes fetch it; the
    // nodes get it by hand (`apply`) but cannot reach the cache: they report while it is down.
    for n in ["laptop", "pi-kitchen"] {
        f.node_mut(n).stop_agent();
    }
    let second = publish(&f, &generation(2));
    f.coordinator.kill();
    for n in ["laptop", "pi-kitchen"] {
        // The newest signed manifest: pi-kitchen's (wave 1) is still held back for its wave.
        let state = &f.coordinator.state_dir;
        let file = ["staged", "manifests"]
            .iter()
            .map(|d| state.join(d).join(v1::manifest_file(n)))
            .find(|p| p.exists())
            .unwrap();
        let args = f.apply_args(f.node(n), &file);
        let out = f.node(n).run_agent(&args, &[]).unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{n}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            at(&f, n),
            Some(system_of(&first, n)),
            "{n} must keep its running system"
        );
        let queued = count_json(&f.node(n).state_dir().join("reports"));
        assert!(
            queued >= 1,
            "{n}: reports must queue on disk while the coordinator is down"
        );
    }
    f.coordinator.restart().unwrap();
    f.start_agents().unwrap();
    for n in ["laptop", "pi-kitchen"] {
        f.wait_report(n, second.version, "success", LONG).unwrap();
        let h = history(&f, n);
        assert!(
            seqs_without_gap(&h),
            "{n}: report seqs have a gap: {:?}",
            h.iter().map(|r| r["seq"].clone()).collect::<Vec<_>>()
        );
        assert!(
            h.iter().any(|r| r["state"] == "deferred"),
            "{n}: the report made during the outage arrived"
        );
    }
}

#[test]
fn a_bad_deploy_on_one_node_rolls_back_there_only_and_is_not_retried() {
    require!(preflight());
    let mut f = Fleet::new(&NODES).unwrap();
    let first = publish(&f, &generation(1));
    f.start_agents().unwrap();
    for n in NODES {
        f.wait_report(n, first.version, "success", LONG).unwrap();
    }
    let bad = Settings {
        generation: 2,
        behaviour: vec![("pi-garage", "fail")],
        ..Settings::default()
    };
    let second = publish(&f, &bad);
    for n in ["laptop", "pi-kitchen"] {
        f.wait_report(n, second.version, "success", LONG).unwrap();
    }
    let report = f
        .wait_report("pi-garage", second.version, "rolled_back", LONG)
        .unwrap();
    assert_eq!(report["error"]["phase"], "activate");
    assert!(
        report["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exited with status 1"),
        "{report}"
    );
    assert_eq!(at(&f, "pi-garage"), Some(system_of(&first, "pi-garage")));
    // The old system was activated again after the failure.
    let acts = f.node("pi-garage").activations();
    assert_eq!(
        acts,
        vec![
            format!("switch {}", system_of(&first, "pi-garage")),
            format!("switch {}", system_of(&second, "pi-garage")),
            format!("switch {}", system_of(&first, "pi-garage"))
        ]
    );
    // Several poll intervals later the bad version has not been tried again.
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(f.node("pi-garage").activations().len(), 3);
    let status = f.node("pi-garage").status_json().unwrap();
    assert_eq!(status["quarantined"][0].as_u64(), Some(second.version));
    let fleet = f.coordinator.fleet().unwrap();
    let states: BTreeMap<String, String> = fleet["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node"].as_str().unwrap().to_owned(),
                n["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(states["pi-garage"], "rolled_back");
    assert_eq!(states["laptop"], "success");
}

/// A one-node fleet (`pi-kitchen`) converged on generation 1, its agent stopped, and `next`
/// published but not fetched yet.
fn one_node_with_next(next: &Settings) -> (Fleet, Published, Published) {
    let mut f = Fleet::new(&["pi-kitchen"]).unwrap();
    let first = publish(&f, &generation(1));
    f.start_agents().unwrap();
    f.wait_report("pi-kitchen", first.version, "success", LONG)
        .unwrap();
    f.node_mut("pi-kitchen").stop_agent();
    let second = publish(&f, next);
    (f, first, second)
}

/// Kill the agent inside `phase` (debug fault hook), restart it, and check the node is at the
/// old or the new path, nothing is pending, and a report arrives.
fn crash_in(phase: &str, behaviour: Option<&'static str>) {
    let s = Settings {
        generation: 2,
        behaviour: behaviour
            .map(|b| vec![("pi-kitchen", b)])
            .unwrap_or_default(),
        ..Settings::default()
    };
    let (mut f, first, second) = one_node_with_next(&s);
    let args = f.agent_args(f.node("pi-kitchen"), false);
    f.node_mut("pi-kitchen")
        .start_agent(&args, &[("ROOST_FAULT", phase)])
        .unwrap();
    let node = f.node_mut("pi-kitchen");
    wait_for(&format!("the agent to die in {phase}"), LONG, || {
        node.agent_exited().then_some(())
    })
    .unwrap();
    assert!(
        node.log().contains("ROOST_FAULT"),
        "the fault was not reached:\n{}",
        tail(&node.log(), 30)
    );
    f.start_agents().unwrap();
    // A crash before the switch retries and succeeds; a crash during activation or
    // confirmation is resolved at restart by confirming or rolling back. Either way the
    // outcome is reported and the path matches it exactly.
    let r = wait_for(
        &format!("an outcome report after a crash in {phase}"),
        LONG,
        || {
            let r = f.fleet_entry("pi-kitchen")?.get("last_report")?.clone();
            (r["manifest_version"].as_u64() == Some(second.version)
                && (r["state"] == "success" || r["state"] == "rolled_back"))
                .then_some(r)
        },
    )
    .unwrap();
    if behaviour.is_some() {
        assert_eq!(r["state"], "rolled_back", "{phase}: {r}");
    }
    let expect = if r["state"] == "success" {
        system_of(&second, "pi-kitchen")
    } else {
        system_of(&first, "pi-kitchen")
    };
    assert_eq!(at(&f, "pi-kitchen"), Some(expect), "{phase}: report {r}");
    let status = f.node("pi-kitchen").status_json().unwrap();
    assert!(
        status["pending"].is_null(),
        "{phase}: a pending record was left: {status}"
    );
    assert!(seqs_without_gap(&history(&f, "pi-kitchen")));
}

#[test]
fn crash_in_fetch() {
    require!(preflight());
    crash_in("fetch", None);
}

#[test]
fn crash_in_realise() {
    require!(preflight());
    crash_in("realise", None);
}

#[test]
fn crash_in_set_profile() {
    require!(preflight());
    crash_in("set-profile", None);
}

#[test]
fn crash_in_activate() {
    require!(preflight());
    crash_in("activate", None);
}

#[test]
fn crash_in_confirm() {
    require!(preflight());
    crash_in("confirm", None);
}

#[test]
fn crash_in_rollback() {
    require!(preflight());
    crash_in("rollback", Some("fail"));
}

#[test]
fn crash_in_report() {
    require!(preflight());
    crash_in("report", None);
}

#[test]
fn kills_at_random_moments_of_activation_end_at_the_old_or_new_path() {
    require!(preflight());
    let mut f = Fleet::new(&["pi-kitchen"]).unwrap();
    let slow = |g| Settings {
        generation: g,
        behaviour: vec![("pi-kitchen", "slow")],
        ..Settings::default()
    };
    let mut prev = publish(&f, &slow(1));
    f.start_agents().unwrap();
    f.wait_report("pi-kitchen", prev.version, "success", LONG)
        .unwrap();
    let mut seed = u64::from(std::process::id()) | 1;
    for g in 2..=11 {
        let next = publish(&f, &slow(g));
        let node = f.node("pi-kitchen");
        wait_for("the deploy to start", LONG, || {
            node.log()
                .contains(&format!("deploying version={}", next.version))
                .then_some(())
        })
        .unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // The slow activation takes 2 s; kill somewhere in the first 2.5 s.
        std::thread::sleep(Duration::from_millis(seed % 2500));
        f.node_mut("pi-kitchen").kill_agent();
        let now = at(&f, "pi-kitchen");
        assert!(
            now == Some(system_of(&prev, "pi-kitchen"))
                || now == Some(system_of(&next, "pi-kitchen")),
            "iteration {g}: {now:?}"
        );
        f.start_agents().unwrap();
        // Either it finished and confirms, or it was rolled back at restart.
        let r = wait_for("an outcome report", LONG, || {
            let e = f.fleet_entry("pi-kitchen")?;
            let r = e.get("last_report")?.clone();
            (r["manifest_version"].as_u64() == Some(next.version)
                && (r["state"] == "success" || r["state"] == "rolled_back"))
                .then_some(r)
        })
        .unwrap();
        let now = at(&f, "pi-kitchen");
        let expect = if r["state"] == "success" {
            system_of(&next, "pi-kitchen")
        } else {
            system_of(&prev, "pi-kitchen")
        };
        assert_eq!(now, Some(expect), "iteration {g}: report {r}");
        assert!(f.node("pi-kitchen").status_json().unwrap()["pending"].is_null());
        if r["state"] == "success" {
            prev = next;
        }
    }
}

fn cache_file_for(f: &Fleet, store_path: &str, ext: &str) -> std::path::PathBuf {
    let hash = &store_path["/nix/store/".len().."/nix/store/".len() + 32];
    f.coordinator
        .state_dir
        .join("cache")
        .join(format!("{hash}.{ext}"))
}

/// Starts `node`'s agent with build policy `substitute-only`: what the cache serves is all it
/// may use. (Under the default `fallback` it builds the system from the derivation publish
/// pushed instead: tests/tests/build_on_node.rs.)
fn substitute_only(f: &mut Fleet, node: &str) {
    let mut args = f.agent_args(f.node(node), false);
    args.extend(["--build-policy".into(), "substitute-only".into()]);
    f.node_mut(node).start_agent(&args, &[]).unwrap();
}

#[test]
fn a_corrupted_nar_is_refused_and_the_system_kept() {
    require!(preflight());
    let (mut f, first, second) = one_node_with_next(&generation(2));
    let narinfo = std::fs::read_to_string(cache_file_for(
        &f,
        &system_of(&second, "pi-kitchen"),
        "narinfo",
    ))
    .unwrap();
    let url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap();
    let nar = f.coordinator.state_dir.join("cache").join(url);
    let mut bytes = std::fs::read(&nar).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&nar, bytes).unwrap();
    substitute_only(&mut f, "pi-kitchen");
    let r = f
        .wait_report("pi-kitchen", second.version, "deferred", LONG)
        .unwrap();
    assert_eq!(r["error"]["phase"], "realise");
    assert_eq!(at(&f, "pi-kitchen"), Some(system_of(&first, "pi-kitchen")));
    assert_eq!(f.node("pi-kitchen").activations().len(), 1);
}

#[test]
fn a_narinfo_signed_by_an_untrusted_key_is_refused() {
    require!(preflight());
    let (mut f, first, second) = one_node_with_next(&generation(2));
    let path = system_of(&second, "pi-kitchen");
    let file = cache_file_for(&f, &path, "narinfo");
    let narinfo = std::fs::read_to_string(&file).unwrap();
    // Re-sign with a key nobody trusts: a valid signature over Nix's fingerprint.
    let field = |k: &str| {
        narinfo
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}: ")))
            .unwrap_or("")
            .to_owned()
    };
    let refs: Vec<String> = field("References")
        .split_whitespace()
        .map(|r| format!("/nix/store/{r}"))
        .collect();
    let fingerprint = format!(
        "1;{path};{};{};{}",
        field("NarHash"),
        field("NarSize"),
        refs.join(",")
    );
    let evil = roost_common::SecretKey::generate("evil-cache-1").unwrap();
    use base64::Engine;
    let sig = base64::engine::general_purpose::STANDARD.encode(evil.sign(fingerprint.as_bytes()));
    let resigned: String = narinfo
        .lines()
        .filter(|l| !l.starts_with("Sig: "))
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        + &format!("Sig: evil-cache-1:{sig}\n");
    std::fs::write(&file, resigned).unwrap();
    substitute_only(&mut f, "pi-kitchen");
    let r = f
        .wait_report("pi-kitchen", second.version, "deferred", LONG)
        .unwrap();
    assert_eq!(r["error"]["phase"], "realise");
    assert_eq!(at(&f, "pi-kitchen"), Some(system_of(&first, "pi-kitchen")));
}

#[test]
fn a_manifest_published_before_its_closure_converges_soon_after_the_closure_arrives() {
    require!(preflight());
    let (mut f, _first, second) = one_node_with_next(&generation(2));
    // Hide the new closure: the manifest is visible, the cache does not have it yet.
    let narinfo = cache_file_for(&f, &system_of(&second, "pi-kitchen"), "narinfo");
    let hidden = f.dir().join("hidden.narinfo");
    std::fs::rename(&narinfo, &hidden).unwrap();
    substitute_only(&mut f, "pi-kitchen");
    f.wait_report("pi-kitchen", second.version, "deferred", LONG)
        .unwrap();
    std::fs::rename(&hidden, &narinfo).unwrap();
    let arrived = Instant::now();
    f.wait_report("pi-kitchen", second.version, "success", LONG)
        .unwrap();
    // Not an hour later (Nix's default negative narinfo cache): within the retry backoff.
    assert!(
        arrived.elapsed() < Duration::from_secs(60),
        "took {:?}",
        arrived.elapsed()
    );
    assert_eq!(at(&f, "pi-kitchen"), Some(system_of(&second, "pi-kitchen")));
}

#[test]
fn a_cache_replaced_at_the_same_url_receives_the_closures_again() {
    require!(preflight());
    let mut f = Fleet::new(&["pi-kitchen"]).unwrap();
    publish(&f, &generation(1));
    // The coordinator loses its state and comes back at the same URL, empty.
    f.coordinator.kill();
    std::fs::remove_dir_all(&f.coordinator.state_dir).unwrap();
    std::fs::create_dir_all(&f.coordinator.state_dir).unwrap();
    f.coordinator.restart().unwrap();
    // Nix remembers the old cache had the closure; publish must upload it regardless.
    let again = publish(&f, &generation(1));
    f.start_agents().unwrap();
    f.wait_report("pi-kitchen", again.version, "success", LONG)
        .unwrap();
    assert_eq!(at(&f, "pi-kitchen"), Some(system_of(&again, "pi-kitchen")));
}
