//! The Nix side: every `.nix` file parses, and both NixOS modules evaluate to the units and
//! configuration they promise (with a nixpkgs `lib` folder from $ROOST_NIXPKGS_LIB).

use std::path::{Path, PathBuf};
use std::process::Command;

use roost_tests::{bin, repo_root};
use serde_json::Value;

fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP: {tool} is not installed (CI installs Nix)");
    }
    ok
}

fn nix_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if p.is_dir() {
            nix_files(&p, out);
        } else if name.ends_with(".nix") {
            out.push(p);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    if !have("nix-instantiate") {
        return;
    }
    let mut files = Vec::new();
    nix_files(&repo_root(), &mut files);
    assert!(
        files.len() >= 10,
        "expected the modules, flake, tests and examples: {files:?}"
    );
    for f in &files {
        let o = Command::new("nix-instantiate")
            .arg("--parse")
            .arg(f)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{} does not parse:\n{}",
            f.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[test]
fn the_nixos_modules_evaluate_to_the_promised_units() {
    let Some(lib) = std::env::var_os("ROOST_NIXPKGS_LIB") else {
        eprintln!(
            "SKIP: set ROOST_NIXPKGS_LIB to a nixpkgs `lib` folder to evaluate the NixOS modules"
        );
        return;
    };
    if !have("nix-instantiate") {
        return;
    }
    let key = roost_common::SecretKey::generate("fleet-publisher-1")
        .unwrap()
        .public()
        .to_string();
    let o = Command::new("nix-instantiate")
        .args(["--read-write-mode", "--eval", "--strict", "--json"])
        .arg(repo_root().join("tests/nix/eval-modules.nix"))
        .arg("--arg")
        .arg("libPath")
        .arg(&lib)
        .args([
            "--argstr",
            "agentKey",
            &key,
            "--argstr",
            "publisherKey",
            &key,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();

    let unit = &v["agentUnit"];
    let sc = &unit["serviceConfig"];
    assert_eq!(sc["Type"], "notify");
    assert_eq!(sc["Restart"], "always");
    assert!(sc["WatchdogSec"].is_string());
    assert_eq!(
        unit["restartIfChanged"], false,
        "a switch must not restart the agent mid-deploy"
    );
    assert_eq!(unit["stopIfChanged"], false);
    assert!(
        unit["after"]
            .as_array()
            .unwrap()
            .contains(&"network-online.target".into())
    );
    assert!(
        sc["ExecStart"]
            .as_str()
            .unwrap()
            .contains("roost-agent run --config /nix/store/")
    );
    assert!(
        unit["path"].as_array().unwrap().len() >= 2,
        "nix and systemd on the agent's PATH"
    );

    let timer = &v["timer"];
    assert_eq!(timer["timerConfig"]["Persistent"], true);
    assert!(
        v["timerUnit"]["serviceConfig"]["ExecStart"]
            .as_str()
            .unwrap()
            .contains("run --once")
    );

    // The generated configuration is what the options say, and the real agent accepts it.
    let cfg: Value = serde_json::from_str(v["agentConfig"].as_str().unwrap()).unwrap();
    assert_eq!(
        cfg["node"], "pi-kitchen",
        "node defaults to networking.hostName"
    );
    assert_eq!(cfg["build_policy"], "substitute-only");
    assert_eq!(cfg["long_poll"], false, "freeform settings pass through");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.json");
    std::fs::write(&file, v["agentConfig"].as_str().unwrap()).unwrap();
    let o = Command::new(bin("roost-agent"))
        .args(["check-config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "check-config refused the module's config: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    let c = &v["coordinatorUnit"]["serviceConfig"];
    assert_eq!(c["DynamicUser"], true);
    assert_eq!(c["StateDirectory"], "roost-coordinator");
    assert_eq!(c["ProtectSystem"], "strict");
    assert_eq!(c["LoadCredential"][0], "upload-token:/run/secrets/token");
    assert!(
        c["ExecStart"]
            .as_str()
            .unwrap()
            .contains("--upload-token-file %d/upload-token")
    );
    assert_eq!(v["firewall"][0], 8080);
    assert_eq!(v["coordinatorOk"].as_array().unwrap().len(), 0);
    assert!(
        v["tokenInStore"][0]
            .as_str()
            .unwrap()
            .contains("must not be in the Nix store")
    );
}
