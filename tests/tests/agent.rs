//! roost-agent on one node with its own /nix and real Nix (DESIGN §7): `run --once` exit
//! codes, every failure mode rolling back to the exact previous generation, quarantine, and
//! refused manifests leaving the state folder untouched.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use base64::Engine;
use roost_common::SecretKey;
use roost_common::envelope::{Context, Envelope};
use roost_common::wire::v1::http as v1;
use roost_tests::fleet::{Settings, tail};
use roost_tests::{Fleet, http_get, preflight, require, wait_for};
use serde_json::{Value, json};

const NODE: &str = "pi-garage";

fn once(f: &Fleet) -> Output {
    let args = f.agent_args(f.node(NODE), true);
    f.node(NODE).run_agent(&args, &[]).unwrap()
}

fn publish(f: &Fleet, s: &Settings) -> (u64, String) {
    f.settings(s).unwrap();
    let sum = f.publish(&[&format!("#{NODE}")]).unwrap();
    let n = &sum["nodes"][0];
    (
        n["version"].as_u64().unwrap(),
        n["profiles"][0]["path"].as_str().unwrap().to_owned(),
    )
}

fn at(f: &Fleet) -> Option<String> {
    f.node(NODE).profile_target("var/nix/profiles/system")
}

fn generation(f: &Fleet) -> Option<u64> {
    let link = std::fs::read_link(f.node(NODE).nix_dir().join("var/nix/profiles/system")).ok()?;
    link.to_string_lossy()
        .strip_prefix("system-")?
        .strip_suffix("-link")?
        .parse()
        .ok()
}

fn last_report(f: &Fleet) -> Value {
    f.fleet_entry(NODE)
        .and_then(|e| e.get("last_report").cloned())
        .unwrap_or(Value::Null)
}

fn converged(s: Settings) -> (Fleet, u64, String) {
    let f = Fleet::new(&[NODE]).unwrap();
    let (v, path) = publish(&f, &s);
    let o = once(&f);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    (f, v, path)
}

#[test]
fn once_substitutes_into_an_empty_store_activates_once_reports_and_then_idles() {
    require!(preflight());
    let f = Fleet::new(&[NODE]).unwrap();
    assert!(
        !f.node(NODE).nix_dir().join("store").exists(),
        "the node starts with an empty /nix"
    );
    let (v, path) = publish(&f, &Settings::default());
    let o = once(&f);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(at(&f), Some(path.clone()));
    assert_eq!(generation(&f), Some(1));
    assert!(
        f.node(NODE)
            .nix_dir()
            .join(path.trim_start_matches("/nix/"))
            .exists(),
        "the closure is in the node's own store"
    );
    assert_eq!(f.node(NODE).activations(), vec![format!("switch {path}")]);
    let r = last_report(&f);
    assert_eq!(
        (r["state"].as_str(), r["manifest_version"].as_u64()),
        (Some("success"), Some(v))
    );
    assert_eq!(r["profiles"][0]["current"], path.as_str());
    assert_eq!(r["health"][0]["ok"], true);
    // An idle poll: nothing new, no activation, no write to the state folder.
    let state = f.node(NODE).state_dir().join("state.json");
    let before = std::fs::read(&state).unwrap();
    let mtime = std::fs::metadata(&state).unwrap().modified().unwrap();
    let o = once(&f);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(f.node(NODE).activations().len(), 1);
    assert_eq!(std::fs::read(&state).unwrap(), before);
    assert_eq!(
        std::fs::metadata(&state).unwrap().modified().unwrap(),
        mtime
    );
}

/// Deploys a second version with `behaviour` and checks the exact rollback.
fn rolls_back(behaviour: &'static str, phase: &str, why: &str) -> Fleet {
    let (f, _, first) = converged(Settings::default());
    let s = Settings {
        generation: 2,
        behaviour: vec![(NODE, behaviour)],
        ..Settings::default()
    };
    let (v2, second) = publish(&f, &s);
    let o = once(&f);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a rolled-back deploy exits 1: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        at(&f),
        Some(first.clone()),
        "back at the exact previous path"
    );
    assert_eq!(
        generation(&f),
        Some(1),
        "back at the exact previous generation number"
    );
    let acts = f.node(NODE).activations();
    assert_eq!(
        acts.last(),
        Some(&format!("switch {first}")),
        "the previous system was activated again: {acts:?}"
    );
    assert!(acts.contains(&format!("switch {second}")));
    let status = f.node(NODE).status_json().unwrap();
    assert_eq!(status["quarantined"][0].as_u64(), Some(v2), "{status}");
    assert_eq!(status["last_deploy"]["state"], "rolled_back");
    assert_eq!(status["last_deploy"]["error"]["phase"], phase);
    let msg = status["last_deploy"]["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(msg.contains(why), "{msg}");
    f
}

fn report_arrives(f: &Fleet, phase: &str) {
    let r = wait_for("the rolled_back report", Duration::from_secs(30), || {
        let r = last_report(f);
        (r["state"] == "rolled_back").then_some(r)
    })
    .unwrap();
    assert_eq!(r["error"]["phase"], phase);
}

#[test]
fn activation_exit_1_rolls_back() {
    require!(preflight());
    let f = rolls_back("fail", "activate", "exited with status 1");
    report_arrives(&f, "activate");
}

#[test]
fn switch_to_configuration_exit_4_counts_as_failure() {
    require!(preflight());
    let f = rolls_back("units-failed", "activate", "status 4");
    report_arrives(&f, "activate");
}

#[test]
fn a_hanging_activation_is_killed_with_its_children_and_rolled_back() {
    require!(preflight());
    let f = rolls_back("hang", "activate", "timed out");
    let left: Vec<String> = f
        .node(NODE)
        .processes()
        .into_iter()
        .filter(|p| p.contains("sleep 1000"))
        .collect();
    assert!(
        left.is_empty(),
        "the activation's children survived: {left:?}"
    );
    report_arrives(&f, "activate");
}

#[test]
fn a_failing_command_health_check_rolls_back() {
    require!(preflight());
    let f = rolls_back(
        "unhealthy",
        "confirm",
        "command:/nix/var/nix/profiles/system/bin/health",
    );
    report_arrives(&f, "confirm");
}

#[test]
fn a_failing_http_health_check_rolls_back() {
    require!(preflight());
    // A port on the host that answers 503, reachable from the node.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for s in listener.incoming().flatten() {
            let mut s = s;
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    // The bridge address is only known once the fleet exists; the check URL names it.
    let (f, _, first) = converged(Settings::default());
    let url = format!("http://{}:{port}/healthz", f.bridge.ip);
    let s = Settings {
        generation: 2,
        http_checks: vec![(NODE, url.clone())],
        ..Settings::default()
    };
    publish(&f, &s);
    let o = once(&f);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(at(&f), Some(first));
    let status = f.node(NODE).status_json().unwrap();
    let msg = status["last_deploy"]["error"]["message"].as_str().unwrap();
    assert!(msg.contains("503") && msg.contains(&url), "{msg}");
    report_arrives(&f, "confirm");
}

#[test]
fn losing_the_coordinator_after_the_switch_rolls_back_with_magic_rollback() {
    require!(preflight());
    let f = rolls_back("isolate", "confirm", "magic rollback");
    // The report waits on disk until the node is back online.
    assert_ne!(last_report(&f)["state"], "rolled_back");
    f.node(NODE).restore_inner_links().unwrap();
    let o = once(&f);
    assert_eq!(o.status.code(), Some(1), "still on a quarantined version");
    report_arrives(&f, "confirm");
}

#[test]
fn a_quarantined_version_is_not_retried_and_a_newer_one_deploys() {
    require!(preflight());
    let f = rolls_back("fail", "activate", "exited with status 1");
    let n = f.node(NODE).activations().len();
    for _ in 0..2 {
        // Nothing to do: the only version on offer is quarantined.
        let o = once(&f);
        assert!(
            o.status.code().is_some(),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert_eq!(
        f.node(NODE).activations().len(),
        n,
        "the quarantined version was tried again"
    );
    let (_, third) = publish(
        &f,
        &Settings {
            generation: 3,
            ..Settings::default()
        },
    );
    assert_eq!(once(&f).status.code(), Some(0));
    assert_eq!(at(&f), Some(third));
    assert_eq!(
        f.node(NODE).status_json().unwrap()["quarantined"]
            .as_array()
            .map(Vec::len),
        Some(0),
        "a newer version clears the quarantine"
    );
}

/// Every file of the state folder except the report queue and the record of the last
/// refused manifest (what a refusal writes, for the coordinator and for `status`), with its
/// bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let refusal = name == roost_agent::state::REFUSED_FILE;
        if name == "reports" || refusal || e.file_type().unwrap().is_dir() {
            continue;
        }
        m.insert(name, std::fs::read(e.path()).unwrap());
    }
    m
}

#[test]
fn refused_manifests_change_nothing_but_the_report_queue() {
    require!(preflight());
    let (f, v1, path) = converged(Settings::default());
    let current = http_get(&v1::manifest_url(&f.coordinator.url(), NODE)).unwrap();
    let env: Envelope = serde_json::from_slice(&current).unwrap();
    let payload: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(&env.payload)
            .unwrap(),
    )
    .unwrap();
    let publisher = SecretKey::read_file(&f.keys.publisher_sec).unwrap();
    let stranger = SecretKey::generate(publisher.name()).unwrap();
    let newer = |edit: &dyn Fn(&mut Value)| {
        let mut p = payload.clone();
        p["version"] = json!(v1 + 1000);
        edit(&mut p);
        p
    };
    let sign = |p: &Value, k: &SecretKey| {
        Envelope::seal(Context::Manifest, &serde_json::to_vec(p).unwrap(), &[k]).to_bytes()
    };
    let hash = &path["/nix/store/".len().."/nix/store/".len() + 32];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("forged", sign(&newer(&|_| {}), &stranger), "signature"),
        (
            "replayed",
            sign(
                &{
                    let mut p = payload.clone();
                    p["version"] = json!(v1 - 1);
                    p
                },
                &publisher,
            ),
            "below version",
        ),
        (
            "expired",
            sign(
                &newer(&|p| p["expires_at"] = json!("2020-01-01T00:00:00Z")),
                &publisher,
            ),
            "expired",
        ),
        (
            "wrong node",
            sign(&newer(&|p| p["node"] = json!("pi-kitchen")), &publisher),
            "is for node `pi-kitchen`",
        ),
        (
            "wrong system",
            sign(
                &newer(&|p| p["system"] = json!("riscv64-linux")),
                &publisher,
            ),
            "is for system `riscv64-linux`",
        ),
        (
            "non-store path",
            sign(
                &newer(&|p| p["profiles"][0]["path"] = json!("/tmp/evil")),
                &publisher,
            ),
            "does not start with /nix/store/",
        ),
        (
            "traversal",
            sign(
                &newer(&|p| {
                    p["profiles"][0]["path"] = json!(format!("/nix/store/{hash}-x/../../../etc"))
                }),
                &publisher,
            ),
            "after the store object's name",
        ),
        (
            "traversal in profile_path",
            sign(
                &newer(&|p| {
                    p["profiles"][0]["profile_path"] = json!("/nix/var/nix/profiles/../../../etc/x")
                }),
                &publisher,
            ),
            "`..`",
        ),
    ];
    let before = snapshot(&f.node(NODE).state_dir());
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes, why) in cases {
        let file = dir.path().join("m.json");
        std::fs::write(&file, &bytes).unwrap();
        let args = f.apply_args(f.node(NODE), &file);
        let o = f.node(NODE).run_agent(&args, &[]).unwrap();
        assert_eq!(o.status.code(), Some(1), "{name}");
        assert_eq!(
            snapshot(&f.node(NODE).state_dir()),
            before,
            "{name}: the state folder changed"
        );
        assert_eq!(at(&f), Some(path.clone()), "{name}");
        let r = last_report(&f);
        assert_eq!(r["state"], "rejected", "{name}: {r}");
        let msg = r["error"]["message"].as_str().unwrap_or("");
        assert!(
            msg.contains(why),
            "{name}: {msg}\n{}",
            tail(&f.node(NODE).log(), 5)
        );
    }
    assert_eq!(f.node(NODE).activations().len(), 1);
}

#[test]
fn status_json_has_every_field_while_the_daemon_runs() {
    require!(preflight());
    let (mut f, v, path) = converged(Settings::default());
    let args = f.agent_args(f.node(NODE), false);
    f.node_mut(NODE).start_agent(&args, &[]).unwrap();
    let status = wait_for("the live view", Duration::from_secs(30), || {
        let s = f.node(NODE).status_json().ok()?;
        (s["daemon_running"] == true && s["last_poll"]["at"].is_string()).then_some(s)
    })
    .unwrap();
    for key in [
        "node",
        "manifest_version",
        "current_version",
        "profiles",
        "last_poll",
        "next_poll",
        "polling_since",
        "last_deploy",
        "pending",
        "pending_reports",
        "quarantined",
        "phase",
    ] {
        assert!(
            status.get(key).is_some(),
            "status --json lacks `{key}`: {status}"
        );
    }
    assert_eq!(status["manifest_version"].as_u64(), Some(v));
    let p = &status["profiles"][0];
    assert_eq!(
        (
            p["name"].as_str(),
            p["current"].as_str(),
            p["desired"].as_str(),
            p["generation"].as_u64()
        ),
        (
            Some("system"),
            Some(path.as_str()),
            Some(path.as_str()),
            Some(1)
        )
    );
    assert!(status["last_poll"]["at"].is_string() && status["last_poll"]["result"].is_string());
    assert!(status["next_poll"].is_string());
    assert_eq!(status["last_deploy"]["state"], "success");
    assert!(status["pending_reports"].as_array().unwrap().is_empty());
}

#[test]
fn bad_configuration_is_a_usage_error() {
    require!(preflight());
    let f = Fleet::new(&[NODE]).unwrap();
    let mut args = f.agent_args(f.node(NODE), true);
    let k = args.iter().position(|a| a == "--trusted-key").unwrap();
    args[k + 1] = "/nonexistent/publisher.pub".into();
    let o = f.node(NODE).run_agent(&args, &[]).unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/publisher.pub"));
    assert!(!f.node(NODE).state_dir().join("state.json").exists());
}
