//! Rollouts with a real fleet (#15): a real `publish` of the fixture flake in three waves,
//! real agents in namespaced nodes and a real coordinator. A bad version reaches the canary
//! wave, is seen failing in wave 1, and stops there: wave 2 is never served it, and
//! `roost-coordinator rollout status` says which node failed and why.
//!
//! Cost: three nodes at a 1 s poll interval; two publishes (about 30 s in all here).

use std::time::Duration;

use roost_common::wire::v1::http as v1;
use roost_tests::fleet::Settings;
use roost_tests::{Fleet, bin, preflight, require, wait_for};
use serde_json::Value;

/// laptop in wave 0, pi-kitchen in wave 1, pi-garage in wave 2.
const NODES: [&str; 3] = ["laptop", "pi-kitchen", "pi-garage"];
const LONG: Duration = Duration::from_secs(120);

/// The fixture flake has waves 0 and 1; this test's copy moves pi-garage to wave 2.
fn three_waves(f: &Fleet) {
    let path = f.flake.join("flake.nix");
    let text = std::fs::read_to_string(&path).unwrap();
    let garage = text
        .find("pi-garage = {")
        .expect("examples/offline/flake.nix changed: no pi-garage node");
    let wave = garage
        + text[garage..]
            .find("roost.wave = 1;")
            .expect("examples/offline/flake.nix changed: pi-garage's roost.wave = 1 not found");
    let text = format!(
        "{}roost.wave = 2;{}",
        &text[..wave],
        &text[wave + "roost.wave = 1;".len()..]
    );
    f.edit("flake.nix", &text).unwrap();
}

/// The version the coordinator serves `node` (its ETag), as a node polling it sees it.
fn served(f: &Fleet, node: &str) -> Option<u64> {
    let url = v1::manifest_url(&f.coordinator.url(), node);
    let resp = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let r = reqwest::get(&url).await.unwrap();
            let etag = r
                .headers()
                .get("etag")
                .map(|e| e.to_str().unwrap().trim_matches('"').to_owned());
            (r.status().as_u16(), etag)
        })
    })
    .join()
    .unwrap();
    match resp {
        (404, _) => None,
        (200, Some(etag)) => Some(etag.parse().expect("a version ETag")),
        other => panic!("GET manifest of {node}: {other:?}"),
    }
}

fn version(summary: &Value) -> u64 {
    summary["nodes"][0]["version"].as_u64().expect("a version")
}

fn system_path(summary: &Value, node: &str) -> String {
    let n = summary["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == node)
        .unwrap();
    n["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "system")
        .unwrap()["path"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// `roost-coordinator rollout ARGS`: exit code and stdout.
fn rollout_cli(f: &Fleet, args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(bin("roost-coordinator"))
        .arg("rollout")
        .args(args)
        .args(["--coordinator", &f.coordinator.url()])
        .arg("--token-file")
        .arg(&f.keys.token_file)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn a_failure_in_wave_one_halts_the_rollout_and_wave_two_never_sees_the_version() {
    require!(preflight());
    let mut f = Fleet::new(&NODES).unwrap();
    f.interval = "1s".into();
    three_waves(&f);
    // The first publish is a rollout too: it goes out wave by wave and completes.
    let first = f.publish(&[]).unwrap();
    let v1 = version(&first);
    assert_eq!(served(&f, "pi-garage"), None, "wave 2 is held at first");
    f.start_agents().unwrap();
    for node in NODES {
        f.wait_report(node, v1, "success", LONG).unwrap();
    }
    let (code, text) = rollout_cli(&f, &["status"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(": complete"), "{text}");
    let garage_before = f
        .node("pi-garage")
        .profile_target("var/nix/profiles/system");
    assert_eq!(
        garage_before.as_deref(),
        Some(system_path(&first, "pi-garage").as_str())
    );

    // A version whose activation fails on pi-kitchen (wave 1).
    f.settings(&Settings {
        generation: 2,
        behaviour: vec![("pi-kitchen", "fail")],
        ..Settings::default()
    })
    .unwrap();
    let second = f.publish(&[]).unwrap();
    let v2 = version(&second);
    assert!(v2 > v1);
    assert_eq!(
        served(&f, "pi-kitchen"),
        Some(v1),
        "wave 1 waits for wave 0"
    );
    assert_eq!(served(&f, "pi-garage"), Some(v1));
    f.wait_report("laptop", v2, "success", LONG).unwrap();
    assert_eq!(
        f.node("laptop")
            .profile_target("var/nix/profiles/system")
            .as_deref(),
        Some(system_path(&second, "laptop").as_str()),
        "wave 0 converged"
    );
    f.wait_report("pi-kitchen", v2, "rolled_back", LONG)
        .unwrap();
    let halted = wait_for("the rollout to halt", LONG, || {
        let (code, text) = rollout_cli(&f, &["status", "--json"]);
        let doc: Value = serde_json::from_str(&text).ok()?;
        (doc["rollout"]["state"] == "halted").then_some((code, doc))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", f.coordinator.log()));
    let (code, doc) = halted;
    assert_eq!(code, Some(1), "a halted rollout's status exits 1");
    let r = &doc["rollout"];
    assert_eq!(r["id"], v2, "{doc}");
    assert_eq!(r["halt"]["wave"], 1, "{doc}");
    assert_eq!(r["halt"]["nodes"][0]["node"], "pi-kitchen", "{doc}");
    assert_eq!(r["halt"]["nodes"][0]["state"], "rolled_back", "{doc}");
    let why = r["halt"]["nodes"][0]["error"].as_str().unwrap_or_default();
    assert!(!why.is_empty(), "the halt carries the node's error: {doc}");
    assert_eq!(r["waves"][2]["released"], false, "{doc}");

    // The table says the same, for people.
    let (code, text) = rollout_cli(&f, &["status"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains(": halted"), "{text}");
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("pi-kitchen"))
        .unwrap_or_else(|| panic!("no pi-kitchen line in\n{text}"));
    assert!(line.contains("rolled_back") && line.contains(why), "{text}");

    // So does the fleet's status: exit 1, pi-garage's wave held, and the halt under the table.
    let out = std::process::Command::new(bin("roost-coordinator"))
        .args(["status", "--coordinator", &f.coordinator.url()])
        .env("ROOST_READ_TOKEN_FILE", &f.keys.token_file)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{table}");
    let garage = table
        .lines()
        .find(|l| l.starts_with("pi-garage "))
        .unwrap_or_else(|| panic!("no pi-garage line in\n{table}"));
    assert!(garage.contains("2 held"), "{table}");
    assert!(table.contains(&format!("rollout {v2}: halted")), "{table}");

    // And `status pi-garage` says why it stays where it is.
    let out = std::process::Command::new(bin("roost-coordinator"))
        .args(["status", "pi-garage", "--coordinator", &f.coordinator.url()])
        .env("ROOST_READ_TOKEN_FILE", &f.keys.token_file)
        .output()
        .unwrap();
    let detail = String::from_utf8_lossy(&out.stdout);
    assert!(
        detail.contains(&format!(
            "rollout     wave 2 of rollout {v2}: version {v2} held back until its wave is released"
        )),
        "{detail}"
    );

    // Wave 2 goes on polling and is never served the new version.
    let polls_after_halt = |n: u64| {
        for _ in 0..n {
            let before = f.fleet_entry("pi-garage").unwrap()["last_poll"].clone();
            wait_for("pi-garage to poll again", LONG, || {
                let e = f.fleet_entry("pi-garage")?;
                (e["last_poll"] != before).then_some(())
            })
            .unwrap();
        }
    };
    polls_after_halt(2);
    assert_eq!(
        served(&f, "pi-garage"),
        Some(v1),
        "wave 2 is still served v1"
    );
    assert_eq!(
        f.node("pi-garage")
            .profile_target("var/nix/profiles/system"),
        garage_before,
        "pi-garage's profile is unchanged"
    );
    let status = f.node("pi-garage").status_json().unwrap();
    assert_eq!(status["current_version"].as_u64(), Some(v1), "{status}");
    assert!(
        !f.node("pi-garage")
            .activations()
            .iter()
            .any(|a| a.contains(&system_path(&second, "pi-garage"))),
        "pi-garage never activated the new version"
    );
}
