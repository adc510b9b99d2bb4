//! The fleet view with a real fleet (#16): everyday mistakes made with real `publish`, real
//! agents in namespaced nodes and a real coordinator each show in `roost-coordinator status`
//! with the flag, the reason and exit 1, and on the node in `roost-agent status`.

use std::time::Duration;

use roost_common::SecretKey;
use roost_tests::fleet::Settings;
use roost_tests::{Fleet, preflight, require, wait_for};
use serde_json::Value;

/// `roost-coordinator status ARGS` against the fleet: exit code and stdout.
fn status(f: &Fleet, args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(roost_tests::bin("roost-coordinator"))
        .args(["status", "--coordinator", &f.coordinator.url()])
        .args(args)
        .env("ROOST_READ_TOKEN_FILE", &f.keys.token_file)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The node's flags in `status --json`: (flag, code, reason).
fn flags_of(f: &Fleet, node: &str) -> Vec<(String, String, String)> {
    let (_, out) = status(f, &["--json"]);
    let doc: Value = serde_json::from_str(&out).unwrap_or_default();
    doc["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["node"] == node)
        .flat_map(|n| n["flags"].as_array().cloned().unwrap_or_default())
        .map(|f| {
            let s = |k: &str| f[k].as_str().unwrap_or_default().to_owned();
            (s("flag"), s("code"), s("reason"))
        })
        .collect()
}

#[test]
fn a_wrong_node_key_and_an_unknown_node_name_are_flagged_with_reasons_and_exit_1() {
    require!(preflight());
    // pi-attic is not in the flake: its agent polls a name without a manifest.
    let mut f = Fleet::new(&["pi-kitchen", "pi-attic"]).unwrap();
    let rotated = SecretKey::generate("pi-kitchen")
        .unwrap()
        .public()
        .to_string();
    f.settings(&Settings {
        node_keys: vec![("pi-kitchen", rotated)],
        ..Settings::default()
    })
    .unwrap();
    f.publish(&["#pi-kitchen"]).unwrap();
    f.start_agents().unwrap();
    // A hang guard: both show within a few poll intervals.
    let seen = wait_for(
        "pi-kitchen REFUSED and pi-attic UNKNOWN",
        Duration::from_secs(120),
        || {
            let kitchen = flags_of(&f, "pi-kitchen");
            let attic = flags_of(&f, "pi-attic");
            (kitchen.iter().any(|x| x.0 == "refused") && attic.iter().any(|x| x.0 == "unknown"))
                .then_some((kitchen, attic))
        },
    );
    let (kitchen, attic) = seen.unwrap_or_else(|e| panic!("{e}\n{}", f.coordinator.log()));
    let refused = kitchen.iter().find(|x| x.0 == "refused").unwrap();
    assert_eq!(refused.1, "bad_signature", "{kitchen:?}");
    assert!(
        refused.2.contains("not signed by its node key"),
        "{kitchen:?}"
    );
    let unknown = attic.iter().find(|x| x.0 == "unknown").unwrap();
    assert!(unknown.2.contains("no manifest is published"), "{attic:?}");
    let (code, table) = status(&f, &[]);
    assert_eq!(code, Some(1), "{table}");
    let line = |n: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{n} ")))
            .unwrap_or_else(|| panic!("no {n} in\n{table}"))
            .to_owned()
    };
    assert!(line("pi-kitchen").contains("REFUSED"), "{table}");
    assert!(line("pi-attic").contains("UNKNOWN"), "{table}");
    // The coordinator logged the refusal at warn with its reason.
    let log = f.coordinator.log();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("/v1/nodes/pi-kitchen/reports")
            && l.contains("bad_signature")),
        "{log}"
    );
    // And the node whose name is unknown says so itself.
    let text = f.node("pi-attic").status_text().unwrap();
    assert!(text.contains("NO MANIFEST"), "{text}");
}
