//! The command line: exit codes, messages, help. No root, no Nix.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::support::{NODE, Publisher};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_roost-agent"))
        .args(args)
        .env_remove("ROOST_CONFIG")
        .env_remove("ROOST_STATE_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn write_config(dir: &Path, json: serde_json::Value) -> String {
    let p = dir.join("agent.json");
    std::fs::write(&p, json.to_string()).unwrap();
    p.display().to_string()
}

#[test]
fn check_config_prints_what_a_valid_config_resolves_to() {
    let d = tempfile::tempdir().unwrap();
    let p = Publisher::new("publisher-1");
    let cfg = write_config(
        d.path(),
        serde_json::json!({"node": NODE, "trusted_keys": [p.public_file], "interval": "30s",
                           "coordinators": ["https://roost.example"]}),
    );
    let out = agent(&["check-config", "--config", &cfg, "--build-policy", "build"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let t = text(&out);
    for want in [NODE, "publisher-1", "https://roost.example", "30s", "build"] {
        assert!(t.contains(want), "`{want}` missing:\n{t}");
    }
}

#[test]
fn a_bad_config_exits_2_and_says_what_is_wrong() {
    let d = tempfile::tempdir().unwrap();
    let p = Publisher::new("publisher-1");
    let unknown = write_config(
        d.path(),
        serde_json::json!({"node": NODE, "trusted_keys": [p.public_file], "pol_interval": "5s"}),
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["check-config", "--config", &unknown], "pol_interval"),
        (
            vec![
                "check-config",
                "--node",
                NODE,
                "--trusted-key",
                "/nonexistent/k.pub",
            ],
            "/nonexistent/k.pub",
        ),
        (
            vec!["check-config", "--node", NODE],
            "no trusted publisher key",
        ),
        (
            vec!["run", "--once", "--config", "/nonexistent/agent.json"],
            "/nonexistent/agent.json",
        ),
        (
            vec!["apply", "/nonexistent/manifest.json"],
            "/nonexistent/manifest.json",
        ),
        (vec!["run", "--build-policy", "sometimes"], "sometimes"),
    ];
    for (args, want) in cases {
        let out = agent(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains(want),
            "{args:?}: `{want}` missing:\n{}",
            text(&out)
        );
    }
}

#[test]
fn help_teaches_every_config_flag() {
    let out = agent(&["run", "--help"]);
    assert!(out.status.success());
    let t = text(&out);
    for flag in [
        "--config",
        "--coordinator",
        "--node",
        "--system",
        "--trusted-key",
        "--threshold",
        "--state-dir",
        "--interval",
        "--no-long-poll",
        "--build-policy",
        "--ca-cert",
        "--once",
        "substitute-only",
    ] {
        assert!(t.contains(flag), "`{flag}` missing from run --help:\n{t}");
    }
    let out = agent(&["--help"]);
    for cmd in ["run", "status", "apply", "rollback", "key", "check-config"] {
        assert!(text(&out).contains(cmd), "{cmd}");
    }
}

#[test]
fn key_prints_the_same_public_key_every_time() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().display().to_string();
    let a = agent(&["key", "--state-dir", &dir, "--node", NODE]);
    assert_eq!(a.status.code(), Some(0), "{}", text(&a));
    let b = agent(&["key", "--state-dir", &dir]);
    let key = String::from_utf8(a.stdout).unwrap();
    assert!(key.starts_with(&format!("{NODE}:")), "{key}");
    assert_eq!(key, String::from_utf8(b.stdout).unwrap());
    assert!(d.path().join("node.key").exists());
}

#[test]
fn status_of_a_fresh_node_says_nothing_happened_yet() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().display().to_string();
    let out = agent(&["status", "--state-dir", &dir]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("none yet"), "{}", text(&out));
    let out = agent(&["status", "--json", "--state-dir", &dir]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["daemon_running"], false);
    assert!(doc["last_deploy"].is_null());
}

#[test]
fn once_exits_1_when_no_coordinator_answers() {
    let d = tempfile::tempdir().unwrap();
    let p = Publisher::new("publisher-1");
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let key = p.public_file.display().to_string();
    let dir = d.path().display().to_string();
    let out = agent(&[
        "run",
        "--once",
        "--node",
        NODE,
        "--trusted-key",
        &key,
        "--state-dir",
        &dir,
        "--coordinator",
        &dead,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(&dead),
        "the error names the coordinator: {}",
        text(&out)
    );
}

#[test]
fn a_second_agent_on_the_same_state_folder_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = Publisher::new("publisher-1");
    let key = p.public_file.display().to_string();
    let dir = d.path().display().to_string();
    let args = [
        "--node",
        NODE,
        "--trusted-key",
        &key,
        "--state-dir",
        &dir,
        "--coordinator",
        "http://127.0.0.1:9",
    ];
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_roost-agent"))
        .arg("run")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let sock = d.path().join("agent.sock");
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while !sock.exists() && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut once = vec!["run", "--once"];
    once.extend(args);
    let out = agent(&once);
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("another roost-agent"), "{}", text(&out));
}

#[test]
fn run_without_a_coordinator_is_bad_configuration_exit_2() {
    let d = tempfile::tempdir().unwrap();
    let p = Publisher::new("publisher-1");
    let key = p.public_file.display().to_string();
    let dir = d.path().display().to_string();
    for once in [false, true] {
        let mut args = vec![
            "run",
            "--node",
            NODE,
            "--trusted-key",
            &key,
            "--state-dir",
            &dir,
        ];
        if once {
            args.push("--once");
        }
        let out = agent(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(text(&out).contains("--coordinator"), "{}", text(&out));
    }
}

#[test]
fn status_of_a_state_folder_that_does_not_exist_exits_2_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let typo = d.path().join("roots").display().to_string();
    for json in [false, true] {
        let mut args = vec!["status", "--state-dir", &typo];
        if json {
            args.push("--json");
        }
        let out = agent(&args);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(text(&out).contains(&typo), "{}", text(&out));
        assert!(
            out.stdout.is_empty(),
            "printed a status anyway: {}",
            text(&out)
        );
    }
}

#[test]
fn each_subcommand_offers_only_the_flags_it_uses() {
    let offered = |cmd: &str| {
        let out = agent(&[cmd, "--help"]);
        assert!(out.status.success(), "{cmd} --help: {}", text(&out));
        text(&out)
    };
    let flag = |help: &str, f: &str| help.lines().any(|l| l.trim_start().starts_with(f));
    let polling = ["--interval", "--no-long-poll", "--once"];
    let trust = ["--trusted-key", "--threshold", "--system", "--build-policy"];
    let apply = offered("apply");
    for f in polling {
        assert!(!flag(&apply, f), "apply offers {f}");
    }
    for f in trust {
        assert!(flag(&apply, f), "apply lacks {f}");
    }
    let rollback = offered("rollback");
    for f in polling.iter().chain(&trust) {
        assert!(!flag(&rollback, f), "rollback offers {f}");
    }
    for f in ["--node", "--state-dir", "--coordinator", "--config"] {
        assert!(flag(&rollback, f), "rollback lacks {f}");
    }
    for cmd in ["status", "key"] {
        let help = offered(cmd);
        for f in polling.iter().chain(&trust).chain(&["--coordinator"]) {
            assert!(!flag(&help, f), "{cmd} offers {f}");
        }
    }
    // Not offered means refused, as bad usage.
    let out = agent(&["apply", "m.json", "--interval", "5s"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn the_fault_injection_variable_is_mentioned_only_in_debug_builds() {
    let help = text(&agent(&["run", "--help"]));
    // The test and the binary are built with the same profile.
    assert_eq!(
        help.contains("ROOST_FAULT"),
        cfg!(debug_assertions),
        "run --help:\n{help}"
    );
    assert!(!text(&agent(&["--help"])).contains("ROOST_FAULT"));
}
