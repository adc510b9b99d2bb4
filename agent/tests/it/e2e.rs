//! End to end with real Nix: the built `roost-agent` in a node with its own empty `/nix`,
//! closures substituted from a signed `file://` cache, the test coordinator serving
//! manifests and receiving reports. Needs root, `nix` and `unshare`: fails without them under
//! `CI=true`, skips loudly elsewhere.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use roost_common::wire::v1::Report;
use roost_common::wire::v1::http::WAIT_PARAM;
use roost_preflight::require;
use serde_json::{Value, json};

use crate::coordinator::TestCoordinator;
use crate::fixtures::{Fixtures, Node, alive, real_world};
use crate::support::{self, Publisher};

fn setup(f: &Fixtures) -> (TestCoordinator, Node) {
    let c = TestCoordinator::start();
    let node = Node::new(c.url());
    let _ = f;
    (c, node)
}

fn publish(c: &TestCoordinator, node: &Node, f: &Fixtures, version: u64, profile: Value) {
    c.publish(&node.publisher.sign(&f.manifest(version, vec![profile])));
}

fn last(c: &TestCoordinator) -> Report {
    c.reports().pop().expect("no report received")
}

/// Deploys fixture `v1` as version 1: the starting point of the rollback tests.
fn deploy_v1(c: &TestCoordinator, node: &Node, f: &Fixtures) {
    publish(c, node, f, 1, f.profile("v1", json!({})));
    let out = node.once(&[]);
    assert!(out.status.success(), "v1 did not deploy");
    assert_eq!(node.system(), Some((1, f.get("v1").path.clone())));
}

#[test]
fn happy_path_substitutes_into_an_empty_store_switches_activates_once_and_reports() {
    let f = require!(real_world());
    let (c, node) = setup(f);
    let v1 = &f.get("v1").path;
    assert!(!node.has_in_store(v1), "the node's store is not empty");
    publish(&c, &node, f, 1, f.profile("v1", json!({})));
    let out = node.once(&[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        node.has_in_store(v1),
        "the closure was not substituted into the node"
    );
    assert_eq!(node.system(), Some((1, v1.clone())));
    assert_eq!(node.activations(), vec![format!("switch {v1}")]);
    let r = last(&c);
    assert_eq!(r.state.as_str(), "success");
    assert_eq!(r.seq, 1);
    assert_eq!(r.manifest_version.map(|v| v.0), Some(1));
    assert_eq!(r.profiles[0].generation, Some(1));
    assert_eq!(r.profiles[0].current.as_deref(), Some(v1.as_str()));
    assert!(r.timings_ms.realise.is_some() && r.timings_ms.activate.is_some());
    // Nothing to do the second time: exit 0, no activation, no new generation.
    let out = node.once(&[]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(node.activations().len(), 1);
    assert_eq!(node.system(), Some((1, v1.clone())));
}

#[test]
fn a_node_with_a_stock_nix_configuration_deploys() {
    let f = require!(real_world());
    let (c, node) = setup(f);
    // The node's Nix is stock: the new CLI is off unless a call asks for it.
    let plain = node
        .program("nix", &["path-info".into(), "/nix/store".into()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&plain.stderr);
    assert!(
        !plain.status.success()
            && said.contains("experimental Nix feature 'nix-command' is disabled"),
        "the node's Nix is not stock: {said}"
    );
    publish(&c, &node, f, 1, f.profile("v1", json!({})));
    let out = node.once(&[]);
    assert_eq!(out.status.code(), Some(0));
    let v1 = &f.get("v1").path;
    assert_eq!(node.system(), Some((1, v1.clone())));
    assert_eq!(node.activations(), vec![format!("switch {v1}")]);
    assert_eq!(last(&c).state.as_str(), "success");
}

/// Deploys v1, then `bad` as version 2, and checks the exact rollback and its report.
fn assert_rolls_back(
    c: &TestCoordinator,
    node: &Node,
    f: &Fixtures,
    bad: Value,
    phase: &str,
    reason: &str,
) -> Report {
    deploy_v1(c, node, f);
    let v1 = f.get("v1").path.clone();
    let new_path = bad["path"].as_str().unwrap().to_owned();
    publish(c, node, f, 2, bad);
    let out = node.once(&[]);
    assert_eq!(out.status.code(), Some(1), "a rollback must exit 1");
    assert_eq!(
        node.system(),
        Some((1, v1.clone())),
        "not back at the exact previous generation and path"
    );
    let acts = node.activations();
    assert_eq!(acts.first(), Some(&format!("switch {v1}")));
    assert!(acts.contains(&format!("switch {new_path}")), "{acts:?}");
    assert_eq!(
        acts.last(),
        Some(&format!("switch {v1}")),
        "the previous activation did not run again: {acts:?}"
    );
    let st: Value =
        serde_json::from_slice(&std::fs::read(node.state_dir().join("state.json")).unwrap())
            .unwrap();
    assert_eq!(st["quarantined"], json!([2]));
    assert!(st["pending"].is_null());
    let r = last(c);
    assert_eq!(r.state.as_str(), "rolled_back");
    assert_eq!(r.manifest_version.map(|v| v.0), Some(2));
    let e = r.error.clone().unwrap();
    assert_eq!(e.phase, phase);
    assert!(e.message.contains(reason), "{}", e.message);
    r
}

#[test]
fn an_activation_exiting_nonzero_rolls_back_to_the_exact_previous_generation() {
    let f = require!(real_world());
    let (c, node) = setup(f);
    assert_rolls_back(
        &c,
        &node,
        f,
        f.profile("fail", json!({})),
        "activate",
        "exited with status 1",
    );
}

#[test]
fn switch_to_configuration_exit_4_counts_as_failure() {
    let f = require!(real_world());
    let (c, node) = setup(f);
    assert_rolls_back(
        &c,
        &node,
        f,
        f.profile("exit4", json!({})),
        "activate",
        "status 4 (some units failed",
    );
}

#[test]
fn a_hanging_activation_is_killed_with_its_children_and_rolled_back() {
    let f = require!(real_world());
    let (c, node) = setup(f);
    assert_rolls_back(
        &c,
        &node,
        f,
        f.profile("hang", json!({"activation_timeout_s": 2})),
        "activate",
        "timed out",
    );
    let child = node.hang_pid().expect("the hanging fixture did not start");
    assert!(
        node.wait_for(5, || !alive(child)),
        "the activation's background child {child} survived the timeout"
    );
}

#[test]
fn a_failing_command_health_check_rolls_back() {
    let f = require!(real_world());
    let (c, node) = setup(f);
    let r = assert_rolls_back(
        &c,
        &node,
        f,
        f.profile(
            "v2",
            json!({"health_checks": [{"kind": "command", "argv": ["/bin/sh", "-c", "echo unhealthy; exit 1"], "timeout_s": 5}]}),
        ),
        "confirm",
        "health check",
    );
    assert_eq!(r.health.len(), 1);
    assert!(!r.health[0].ok);
}

#[test]
fn a_failing_http_health_check_rolls_back() {
    let f = require!(real_world());
    let (c, node) = setup(f);
    c.set_health(500);
    let r = assert_rolls_back(
        &c,
        &node,
        f,
        f.profile(
            "v2",
            json!({"health_checks": [{"kind": "http", "url": format!("{}/health", c.url()), "timeout_s": 2}]}),
        ),
        "confirm",
        "500",
    );
    assert_eq!(r.health[0].name, format!("http:{}/health", c.url()));
}

#[test]
fn magic_rollback_when_the_switch_cuts_the_coordinator_off() {
    let f = require!(real_world());
    let (c, node) = setup(f);
    c.down_while_exists(node.down_marker());
    // `cut` makes the coordinator unreachable; v1's activation (re-run by the rollback)
    // restores it, so the rolled_back report arrives in the same run.
    assert_rolls_back(
        &c,
        &node,
        f,
        f.profile("cut", json!({})),
        "confirm",
        "magic rollback",
    );
}

#[test]
fn a_quarantined_version_is_not_retried_and_a_newer_version_deploys() {
    let f = require!(real_world());
    let (c, node) = setup(f);
    assert_rolls_back(
        &c,
        &node,
        f,
        f.profile("fail", json!({})),
        "activate",
        "status 1",
    );
    let acts = node.activations().len();
    let reports = c.reports().len();
    for _ in 0..2 {
        let out = node.once(&[]);
        assert_eq!(out.status.code(), Some(1));
    }
    assert_eq!(
        node.activations().len(),
        acts,
        "the quarantined version ran again"
    );
    assert_eq!(node.system().unwrap().0, 1);
    assert_eq!(c.reports().len(), reports);
    publish(&c, &node, f, 3, f.profile("v3", json!({})));
    let out = node.once(&[]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(node.system().unwrap().1, f.get("v3").path);
    assert_eq!(last(&c).state.as_str(), "success");
    let st = node.status();
    assert_eq!(st["quarantined"], json!([]));
}

#[test]
fn killed_by_a_fault_after_the_switch_the_agent_recovers_to_the_old_path() {
    let f = require!(real_world());
    let (c, node) = setup(f);
    deploy_v1(&c, &node, f);
    publish(&c, &node, f, 2, f.profile("v2", json!({})));
    let out = node.once(&[("ROOST_FAULT", "activate")]);
    assert_eq!(out.status.signal(), Some(9), "the fault did not fire");
    // Killed between switch and activation: the profile moved, the record says so.
    assert_eq!(node.system().unwrap().1, f.get("v2").path);
    let st: Value =
        serde_json::from_slice(&std::fs::read(node.state_dir().join("state.json")).unwrap())
            .unwrap();
    assert_eq!(st["pending"]["version"], 2);
    let out = node.once(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(node.system(), Some((1, f.get("v1").path.clone())));
    let st = node.status();
    assert!(st["pending"].is_null());
    let r = last(&c);
    assert_eq!(r.state.as_str(), "rolled_back");
    assert_eq!(r.error.unwrap().phase, "recover");
}

/// Where a crash test kills the agent: a fault point, or inside `nix-env --set`.
#[derive(Debug, Clone, Copy)]
enum Crash {
    At(&'static str),
    InsideNixEnv,
}

/// Deploys v1, then kills the agent deploying v2 at `crash`, then runs it again (twice at
/// most: a crash before the switch is retried) until v2 has an outcome. Checks what holds
/// at every instant: the profile is exactly the old generation or the new one, no pending
/// record is left, and `success` only where v2's activation really ran. Returns the outcome.
fn crash_and_recover(f: &Fixtures, crash: Crash) -> String {
    let (c, node) = setup(f);
    deploy_v1(&c, &node, f);
    publish(&c, &node, f, 2, f.profile("v2", json!({})));
    let (v1, v2) = (f.get("v1").path.clone(), f.get("v2").path.clone());
    let out = match crash {
        Crash::At(point) => node.once(&[("ROOST_FAULT", point)]),
        Crash::InsideNixEnv => {
            // A nix-env that kills its caller, the agent, and then does its work: nix-env
            // finishes after the agent died, as when a crash cuts the call.
            let wrap = node.dir.path().join("wrap");
            std::fs::create_dir_all(&wrap).unwrap();
            let real = roost_preflight::which("nix-env").unwrap();
            let done = node.dir.path().join("nix-env-done");
            let script = format!(
                "#!/bin/sh\nkill -9 \"$PPID\"\n{} \"$@\" </dev/null >/dev/null 2>&1\ntouch {}\n",
                real.display(),
                done.display()
            );
            let file = wrap.join("nix-env");
            std::fs::write(&file, script).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
            let path = format!("{}:{}", wrap.display(), std::env::var("PATH").unwrap());
            let out = node.once(&[("PATH", &path)]);
            assert!(
                node.wait_for(60, || done.exists()),
                "the wrapped nix-env never finished"
            );
            assert_eq!(
                node.system(),
                Some((2, v2.clone())),
                "nix-env did not switch after the agent died"
            );
            out
        }
    };
    assert_eq!(
        out.status.signal(),
        Some(9),
        "{crash:?}: the crash did not happen"
    );
    let outcome = (0..2)
        .find_map(|_| {
            node.once(&[]);
            c.reports()
                .into_iter()
                .filter(|r| r.manifest_version.map(|v| v.0) == Some(2))
                .map(|r| r.state.as_str().to_owned())
                .find(|s| s == "success" || s == "rolled_back")
        })
        .unwrap_or_else(|| panic!("{crash:?}: no outcome for version 2"));
    let (generation, path) = node.system().unwrap();
    assert!(
        node.status()["pending"].is_null(),
        "{crash:?}: a pending record was left"
    );
    let v2_ran = node.activations().contains(&format!("switch {v2}"));
    if outcome == "success" {
        assert_eq!(path, v2, "{crash:?}: success, but the profile is not at v2");
        assert!(
            v2_ran,
            "{crash:?}: reported success for a generation never activated"
        );
    } else {
        assert_eq!(
            (generation, path),
            (1, v1),
            "{crash:?}: rolled back, but not to v1"
        );
    }
    outcome
}

#[test]
fn a_crash_at_every_instant_between_two_saves_ends_old_or_activated_new() {
    let f = require!(real_world());
    // Before the switch is certain the deploy is tried again; from then on it is rolled back,
    // unless it was activated and recorded, when it is confirmed.
    for (crash, want) in [
        (Crash::At("realise"), "success"),
        (Crash::At("switch-intent"), "success"),
        (Crash::At("set-profile"), "success"),
        (Crash::InsideNixEnv, "rolled_back"),
        (Crash::At("profile-set"), "rolled_back"),
        (Crash::At("activate"), "rolled_back"),
        (Crash::At("activation-spawned"), "rolled_back"),
        (Crash::At("activated"), "rolled_back"),
        (Crash::At("confirm"), "success"),
    ] {
        assert_eq!(crash_and_recover(f, crash), want, "{crash:?}");
    }
}

#[test]
fn a_crash_inside_nix_env_is_rolled_back_not_reported_as_a_success() {
    let f = require!(real_world());
    assert_eq!(crash_and_recover(f, Crash::InsideNixEnv), "rolled_back");
}

/// A node converged on v1, with v2 (an activation that hangs for ten minutes) published.
fn at_v1_with_a_hanging_v2_published(f: &Fixtures) -> (TestCoordinator, Node) {
    let (c, node) = setup(f);
    deploy_v1(&c, &node, f);
    publish(
        &c,
        &node,
        f,
        2,
        f.profile("hang", json!({"activation_timeout_s": 600})),
    );
    (c, node)
}

#[test]
fn a_crash_before_the_activation_is_recorded_runs_nothing_and_rolls_back() {
    let f = require!(real_world());
    let (c, node) = at_v1_with_a_hanging_v2_published(f);
    // Killed with the activation spawned but its process group not yet on disk: recovery
    // could not find it, so it must never have started.
    let out = node.once(&[("ROOST_FAULT", "activation-spawned")]);
    assert_eq!(out.status.signal(), Some(9), "the fault did not fire");
    let out = node.once(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        node.hang_pid().is_none(),
        "the activation ran although the agent died before recording it"
    );
    assert_eq!(node.system(), Some((1, f.get("v1").path.clone())));
    let r = last(&c);
    assert_eq!(r.state.as_str(), "rolled_back");
    assert_eq!(r.error.unwrap().phase, "recover");
}

#[test]
fn sigkill_during_activation_ends_at_the_old_path_with_the_leftover_killed() {
    let f = require!(real_world());
    let (c, node) = at_v1_with_a_hanging_v2_published(f);
    let mut args = vec!["run".to_owned(), "--once".into()];
    args.extend(node.config_args());
    let mut agent = node.spawn(&args, &[]);
    // Both the activation running and the agent's record of it: killed before that record,
    // the agent could not know the activation it left behind.
    let recorded = || {
        let st: Value = std::fs::read(node.state_dir().join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        !st["pending"]["profiles"][0]["activation"].is_null()
    };
    assert!(
        node.wait_for(60, || node.hang_pid().is_some() && recorded()),
        "activation never started: {}",
        node.agent_log()
    );
    agent.kill().unwrap(); // SIGKILL, as a power cut or the OOM killer would
    agent.wait().unwrap();
    let child = node.hang_pid().unwrap();
    assert!(
        alive(child),
        "the activation should outlive the agent's death"
    );
    let out = node.once(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        node.wait_for(5, || !alive(child)),
        "recovery left the interrupted activation running"
    );
    let (generation, path) = node.system().unwrap();
    assert!(
        (generation, path.as_str()) == (1, f.get("v1").path.as_str())
            || (generation, path.as_str()) == (2, f.get("hang").path.as_str()),
        "neither the old nor the new path: {generation} {path}"
    );
    assert_eq!(
        generation, 1,
        "an unfinished activation must be rolled back"
    );
    assert!(node.status()["pending"].is_null());
    assert_eq!(last(&c).state.as_str(), "rolled_back");
}

#[test]
fn reports_queue_while_the_coordinator_is_down_and_arrive_in_order_later() {
    let f = require!(real_world());
    let (c, node) = setup(f);
    c.set_down(true);
    let p = &node.publisher;
    for (v, fx) in [(1, "v1"), (2, "fail"), (3, "v3")] {
        node.apply(&p.sign(&f.manifest(v, vec![f.profile(fx, json!({}))])));
    }
    let queued = support::queued_reports(&node.state_dir());
    let states: Vec<&str> = queued
        .iter()
        .map(|(_, r)| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, vec!["success", "rolled_back", "success"]);
    assert!(c.reports().is_empty());
    c.set_down(false);
    let out = node.once(&[]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "no manifest published: nothing deployed"
    );
    let got = c.reports();
    let seqs: Vec<u64> = got.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    let states: Vec<&str> = got.iter().map(|r| r.state.as_str()).collect();
    assert_eq!(states, vec!["success", "rolled_back", "success"]);
    assert!(support::queued_reports(&node.state_dir()).is_empty());
}

#[test]
fn refused_manifests_leave_the_state_folder_byte_for_byte_unchanged() {
    let f = require!(real_world());
    let (c, node) = setup(f);
    deploy_v1(&c, &node, f);
    let good = f.profile("v2", json!({}));
    let forger = Publisher::new("publisher-1");
    let m = |edit: &dyn Fn(&mut Value)| {
        let mut m = f.manifest(2, vec![good.clone()]);
        edit(&mut m);
        node.publisher.sign(&m)
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("forged", forger.sign(&f.manifest(2, vec![good.clone()]))),
        ("replayed", m(&|m| m["version"] = json!(0))),
        (
            "expired",
            m(&|m| {
                m["issued_at"] = json!("2020-01-01T00:00:00Z");
                m["expires_at"] = json!("2020-01-02T00:00:00Z");
            }),
        ),
        ("wrong node", m(&|m| m["node"] = json!("pi-garage"))),
        ("wrong system", m(&|m| m["system"] = json!("mips-linux"))),
        (
            "non-store path",
            m(&|m| m["profiles"][0]["path"] = json!("/etc/passwd")),
        ),
        (
            "traversal",
            m(&|m| m["profiles"][0]["profile_path"] = json!("/nix/var/nix/profiles/../../../etc")),
        ),
    ];
    for (what, bytes) in cases {
        let before = support::snapshot_without_reports(&node.state_dir());
        let store_before = std::fs::read_dir(node.nix_dir().join("store"))
            .unwrap()
            .count();
        let reports = c.reports().len();
        let out = node.apply(&bytes);
        assert_eq!(out.status.code(), Some(1), "{what}");
        assert_eq!(
            support::snapshot_without_reports(&node.state_dir()),
            before,
            "{what}: the state folder changed"
        );
        assert_eq!(node.system(), Some((1, f.get("v1").path.clone())), "{what}");
        assert_eq!(
            std::fs::read_dir(node.nix_dir().join("store"))
                .unwrap()
                .count(),
            store_before,
            "{what}: something was fetched"
        );
        assert_eq!(c.reports().len(), reports + 1, "{what}: not reported");
        assert_eq!(last(&c).state.as_str(), "rejected", "{what}");
    }
    // The same through a poll: refused, exit 1, reported.
    c.publish(&forger.sign(&f.manifest(3, vec![good.clone()])));
    let before = support::snapshot_without_reports(&node.state_dir());
    assert_eq!(node.once(&[]).status.code(), Some(1));
    assert_eq!(support::snapshot_without_reports(&node.state_dir()), before);
    assert_eq!(last(&c).state.as_str(), "rejected");
}

#[test]
fn not_enough_free_space_defers_without_fetching() {
    let f = require!(real_world());
    let (c, node) = setup(f);
    publish(
        &c,
        &node,
        f,
        1,
        f.profile("v1", json!({"closure_size": u64::MAX / 4})),
    );
    let out = node.once(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!node.has_in_store(&f.get("v1").path));
    let r = last(&c);
    assert_eq!(r.state.as_str(), "deferred");
    assert!(r.error.unwrap().message.contains("bytes free"));
    assert_eq!(node.status()["quarantined"], json!([]));
}

#[test]
fn fallback_builds_from_drv_path_and_substitute_only_does_not() {
    let f = require!(real_world());
    let (c, node) = setup(f);
    // `local`'s output is not in the cache; its derivation is.
    publish(&c, &node, f, 1, f.profile("local", json!({})));
    let mut args = vec!["run", "--once", "--build-policy", "substitute-only"];
    let cfg = node.config_args();
    args.extend(cfg.iter().map(String::as_str));
    let out = node.run(&args, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(last(&c).state.as_str(), "deferred");
    assert!(node.system().is_none());
    let out = node.once(&[]); // the default policy: fallback
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(node.system(), Some((1, f.get("local").path.clone())));
}

#[test]
fn status_json_has_every_field_and_once_exit_codes_follow_the_outcome() {
    let f = require!(real_world());
    let (c, node) = setup(f);
    // No manifest published yet: nothing deployed, which needs a human.
    assert_eq!(node.once(&[]).status.code(), Some(1));
    publish(&c, &node, f, 1, f.profile("v1", json!({})));
    assert_eq!(node.once(&[]).status.code(), Some(0));
    let st = node.status();
    for key in [
        "node",
        "manifest_version",
        "current_version",
        "profiles",
        "last_poll",
        "next_poll",
        "last_deploy",
        "pending_reports",
        "quarantined",
        "daemon_running",
    ] {
        assert!(st.get(key).is_some(), "status lacks `{key}`: {st}");
    }
    let p = &st["profiles"][0];
    assert_eq!(p["current"], f.get("v1").path);
    assert_eq!(p["desired"], f.get("v1").path);
    assert_eq!(p["generation"], 1);
    assert_eq!(st["manifest_version"], 1);
    assert_eq!(st["last_deploy"]["state"], "success");
    assert!(st["last_poll"]["at"].is_string());
    assert_eq!(st["pending_reports"], json!([]));
    let dir = node.state_dir().display().to_string();
    let text = String::from_utf8(node.run(&["status", "--state-dir", &dir], &[]).stdout).unwrap();
    assert!(text.contains("last poll"), "{text}");
    assert!(text.contains("current"), "{text}");
    // Unreachable coordinator: 1.
    c.set_down(true);
    assert_eq!(node.once(&[]).status.code(), Some(1));
}

#[test]
fn the_daemon_follows_new_versions_through_long_polls_and_stops_on_sigterm() {
    let f = require!(real_world());
    let (c, node) = setup(f);
    publish(&c, &node, f, 1, f.profile("v1", json!({})));
    let mut args = vec!["run".to_owned(), "--interval".into(), "2s".into()];
    args.extend(node.config_args());
    let mut agent = node.spawn(&args, &[]);
    let got = c.wait_reports(60, |r| r.iter().any(|r| r.state.as_str() == "success"));
    assert!(!got.is_empty(), "v1 not deployed: {}", node.agent_log());
    publish(&c, &node, f, 2, f.profile("v2", json!({})));
    let got = c.wait_reports(60, |r| {
        r.iter()
            .any(|r| r.manifest_version.map(|v| v.0) == Some(2) && r.state.as_str() == "success")
    });
    assert!(
        got.iter()
            .any(|r| r.manifest_version.map(|v| v.0) == Some(2)),
        "v2 not deployed: {}",
        node.agent_log()
    );
    assert_eq!(node.system(), Some((2, f.get("v2").path.clone())));
    assert!(
        c.requests()
            .iter()
            .any(|r| r.target.contains(&format!("?{WAIT_PARAM}="))),
        "the daemon never long-polled"
    );
    let st = node.status();
    assert_eq!(st["daemon_running"], true, "{st}");
    assert!(st["next_poll"].is_string(), "{st}");
    ::nix::sys::signal::kill(
        ::nix::unistd::Pid::from_raw(agent.id() as i32),
        ::nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = agent.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < end,
            "the daemon ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "{}", node.agent_log());
}

#[test]
fn sigterm_during_a_deploy_lets_it_finish_before_the_daemon_exits() {
    let f = require!(real_world());
    let (c, node) = setup(f);
    deploy_v1(&c, &node, f);
    let mut args = vec!["run".to_owned(), "--interval".into(), "2s".into()];
    args.extend(node.config_args());
    let mut agent = node.spawn(&args, &[]);
    publish(&c, &node, f, 2, f.profile("slow", json!({})));
    let slow = f.get("slow").path.clone();
    assert!(
        node.wait_for(60, || node
            .activations()
            .contains(&format!("switch {slow}"))),
        "the slow activation never started: {}",
        node.agent_log()
    );
    ::nix::sys::signal::kill(
        ::nix::unistd::Pid::from_raw(agent.id() as i32),
        ::nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = agent.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", node.agent_log());
    assert_eq!(node.activations().last().map(String::as_str), Some("done"));
    assert_eq!(node.system(), Some((2, slow)));
    assert!(node.status()["pending"].is_null());
    assert_eq!(last(&c).state.as_str(), "success");
}

#[test]
fn rollback_needs_no_publisher_key_and_an_unknown_profile_exits_2_changing_nothing() {
    let f = require!(real_world());
    let (c, node) = setup(f);
    deploy_v1(&c, &node, f);
    publish(&c, &node, f, 2, f.profile("v2", json!({})));
    assert_eq!(node.once(&[]).status.code(), Some(0));
    let dir = node.state_dir().display().to_string();
    let before = support::snapshot_without_reports(&node.state_dir());
    let out = node.run(
        &[
            "rollback",
            "sytsem",
            "--node",
            support::NODE,
            "--state-dir",
            &dir,
        ],
        &[],
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("`sytsem`") && said.contains("system"),
        "{said}"
    );
    assert_eq!(support::snapshot_without_reports(&node.state_dir()), before);
    assert_eq!(node.system(), Some((2, f.get("v2").path.clone())));
    // The real thing, with only the node and its state folder: back to generation 1.
    let out = node.run(
        &[
            "rollback",
            "system",
            "--node",
            support::NODE,
            "--state-dir",
            &dir,
        ],
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        node.system().map(|(_, p)| p),
        Some(f.get("v1").path.clone())
    );
}

/// `run --once` against a coordinator that has no manifest for the node's name.
fn once_without_a_manifest(node: &Node) -> (Option<i32>, String, String) {
    let out = node.once(&[]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_node_whose_coordinator_has_no_manifest_says_so_warns_and_run_once_exits_1() {
    let f = require!(real_world());
    let (c, node) = setup(f);
    let (code, out, err) = once_without_a_manifest(&node);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("no manifest for node `pi-kitchen`"), "{out}");
    assert!(
        err.lines()
            .any(|l| l.contains("WARN") && l.contains("has no manifest for node")),
        "{err}"
    );
    let st = node.status();
    assert_eq!(st["coordinator_has_no_manifest"], true, "{st}");
    let dir = node.state_dir().display().to_string();
    let text = node.run(&["status", "--state-dir", &dir], &[]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("the coordinator has no manifest for this node"),
        "{text}"
    );
    // Once one is published the node converges and the notice is gone.
    publish(&c, &node, f, 1, f.profile("v1", json!({})));
    assert_eq!(node.once(&[]).status.code(), Some(0));
    assert_eq!(node.status()["coordinator_has_no_manifest"], false);
}

#[test]
fn the_daemon_warns_once_while_the_coordinator_has_no_manifest() {
    let f = require!(real_world());
    let (c, node) = setup(f);
    let mut args = vec!["run".to_owned(), "--interval".into(), "1s".into()];
    args.extend(node.config_args());
    let mut agent = node.spawn(&args, &[]);
    // Several polls answered 404 (each is a GET the test coordinator counts).
    let gets = || {
        c.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.target.contains("/manifest"))
            .count()
    };
    let polled = node.wait_for(60, || gets() >= 4);
    let _ = agent.kill();
    let _ = agent.wait();
    let log = node.agent_log();
    assert!(polled, "too few polls: {log}");
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("has no manifest for node"))
        .count();
    assert_eq!(warnings, 1, "{log}");
}

#[test]
fn a_refused_manifest_is_in_status_with_why() {
    let f = require!(real_world());
    let (c, node) = setup(f);
    let stranger = Publisher::new("stranger-1");
    c.publish(&stranger.sign(&f.manifest(7, vec![f.profile("v1", json!({}))])));
    assert_eq!(node.once(&[]).status.code(), Some(1));
    let st = node.status();
    let r = &st["last_refused"];
    assert_eq!(r["code"], "bad_signature", "{st}");
    assert_eq!(r["claimed_version"], 7, "{st}");
    assert!(r["message"].as_str().unwrap().contains("signature"), "{st}");
    let dir = node.state_dir().display().to_string();
    let text = node.run(&["status", "--state-dir", &dir], &[]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("last refused")
            && text.contains("bad_signature")
            && text.contains("version 7"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("last poll") && l.contains("manifest refused (bad_signature)")),
        "the last poll does not pass for a new manifest: {text}"
    );
}
