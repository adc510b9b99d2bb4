//! The repository's Nix files: every one parses, `checkDeploy` (the flake's `lib.checkDeploy`
//! and the heart of `lib.${system}.deployChecks`) accepts the offline fleet and names each
//! problem of a broken one, and the offline fleet evaluates and publishes with this machine's
//! Nix into manifests the agent's verification accepts.

use std::path::{Path, PathBuf};
use std::process::Command;

use roost_common::{Identity, NodeName, PublicKey, Timestamp, TrustedKeys, verify_manifest};
use roost_preflight::{root, tools};
use roost_tests::{bin, nixpkgs_lib, repo_root, require};
use serde_json::Value;

/// Nix's evaluator and CLI.
fn nix() -> Result<(), String> {
    tools(&["nix-instantiate", "nix"])
}

/// Every `.nix` file under `dir`, skipping build output and hidden folders.
fn nix_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if entry.file_type().unwrap().is_dir() {
            if !name.starts_with('.') && name != "target" && name != "result" {
                nix_files(&path, out);
            }
        } else if name.ends_with(".nix") {
            out.push(path);
        }
    }
}

#[test]
fn every_nix_file_in_the_repository_parses() {
    require!(nix());
    let root = repo_root();
    let mut files = Vec::new();
    nix_files(&root, &mut files);
    for expected in [
        "flake.nix",
        "nixos-module/agent.nix",
        "nixos-module/coordinator.nix",
        "examples/fleet/flake.nix",
        "examples/offline/flake.nix",
        "nix/tests/converge.nix",
    ] {
        assert!(
            files.contains(&root.join(expected)),
            "{expected} was not found among the repository's .nix files"
        );
    }
    let broken: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let out = Command::new("nix-instantiate")
                .arg("--parse")
                .arg(f)
                .output()
                .unwrap();
            (!out.status.success()).then(|| {
                format!(
                    "{}: {}",
                    f.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            })
        })
        .collect();
    assert!(
        broken.is_empty(),
        "{} of {} .nix files do not parse:\n{}",
        broken.len(),
        files.len(),
        broken.join("\n")
    );
}

/// `checkDeploy` applied to `deploy` (a Nix expression), as a list of problems.
fn check_deploy(deploy: &str) -> Vec<String> {
    let expr = format!(
        "import {} ({deploy})",
        repo_root().join("nix/check-deploy.nix").display()
    );
    let out = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json", "--expr", &expr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "checkDeploy failed to evaluate:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `problems` are exactly `expected`, each matched by its start.
fn assert_problems(problems: &[String], expected: &[&str]) {
    for e in expected {
        assert!(
            problems.iter().any(|p| p.starts_with(e)),
            "no problem starting with {e:?} in {problems:#?}"
        );
    }
    assert_eq!(problems.len(), expected.len(), "{problems:#?}");
}

#[test]
fn check_deploy_accepts_the_offline_fleet() {
    require!(nix());
    let flake = repo_root().join("examples/offline/flake.nix");
    let problems = check_deploy(&format!(
        "((import {}).outputs {{ self = {{ }}; }}).deploy",
        flake.display()
    ));
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn check_deploy_names_each_problem_with_its_node_and_profile() {
    require!(nix());
    let problems = check_deploy(
        r#"{
          nodes.pi = {
            user = "root";
            profilePath = "/nix/var/nix/profiles/shared";
            roost.nodeKey = "pi:short";
            roost.healtChecks = [ ];
            profilesOrder = [ "system" "home" ];
            profiles.system = {
              path = "/tmp/not-in-the-store";
              activationTimeout = "soon";
              roost.activation = { kind = "command"; argv = [ "/bin/sh" ]; };
              roost.healthChecks = [ { kind = "tcp"; } ];
            };
          };
          nodes.laptop.profiles.system = {
            path = "/nix/store/00000000000000000000000000000000-system";
            roost.activation = { kind = "nixos"; goal = "reboot"; };
          };
        }"#,
    );
    let expected = [
        "deploy.nodes.pi.roost.nodeKey: expected a public key",
        "deploy.nodes.pi.roost.healtChecks: unknown key",
        "deploy.nodes.pi.profilesOrder: names `home`, which is not in `profiles`",
        "deploy.nodes.pi.profiles.system.path: expected a derivation or a store path",
        "deploy.nodes.pi.profiles.system.activationTimeout: expected a whole number of seconds",
        "deploy.nodes.pi.profiles.system.roost.activation.argv: the program \"/bin/sh\" must be relative",
        "deploy.nodes.pi.profiles.system.roost.healthChecks.0.kind: expected \"command\" or \"http\"",
        "deploy.nodes.laptop.profiles.system.roost.activation.goal: expected \"switch\", \"boot\" or \"test\"",
        "deploy.nodes.pi.profilePath: read per profile only",
        "deploy.nodes.laptop.profiles.system: neither `user` nor `sshUser` is set",
    ];
    assert_problems(&problems, &expected);
}

#[test]
fn check_deploy_checks_the_rollout_policy_at_deploy_level_only() {
    require!(nix());
    let problems = check_deploy(
        r#"{
          user = "root";
          roost.rollout = { minHealthy = 1.5; maxFailed = -1; bakeTime = "10min"; maxFailures = 1; };
          nodes.pi = {
            roost.rollout = { };
            profiles.system.path = "/nix/store/00000000000000000000000000000000-system";
          };
        }"#,
    );
    let expected = [
        "deploy.roost.rollout.minHealthy: expected a number from 0 to 1",
        "deploy.roost.rollout.maxFailed: expected a whole number",
        "deploy.roost.rollout.maxFailures: unknown key",
        "deploy.nodes.pi.roost.rollout: belongs to deploy",
    ];
    assert_problems(&problems, &expected);
    let fine = check_deploy(
        r#"{
          user = "root";
          roost.rollout = { minHealthy = 0.5; maxFailed = 1; bakeTime = "10min"; };
          nodes.pi.profiles.system.path = "/nix/store/00000000000000000000000000000000-system";
        }"#,
    );
    assert!(fine.is_empty(), "{fine:#?}");
}

#[test]
fn check_deploy_checks_the_reboot_policy_and_its_windows() {
    require!(nix());
    let problems = check_deploy(
        r#"{
          user = "root";
          roost.reboot = "sometimes";
          nodes.pi = {
            roost.rebootWindow = 3;
            profiles.system.path = "/nix/store/00000000000000000000000000000000-system";
          };
        }"#,
    );
    let expected = [
        "deploy.roost.reboot: expected \"never\", \"window\" or \"auto\"",
        "deploy.nodes.pi.roost.rebootWindow: expected a window",
    ];
    assert_problems(&problems, &expected);
    let fine = check_deploy(
        r#"{
          user = "root";
          roost.reboot = "window";
          roost.rebootWindow = [ "Sat 02:00-05:00" "Sun 02:00-05:00" ];
          nodes.pi.profiles.system = {
            path = "/nix/store/00000000000000000000000000000000-system";
            roost.reboot = "auto";
          };
        }"#,
    );
    assert!(fine.is_empty(), "{fine:#?}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn the_offline_example_evaluates_and_publishes_verifiable_manifests() {
    require!(nix().and(root(
        "publishing builds into the Nix store without a daemon"
    )));
    let coordinator = bin("roost-coordinator");
    assert!(
        coordinator.exists(),
        "{} is missing: run `cargo build --workspace` before this test",
        coordinator.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let flake = tmp.path().join("fleet");
    copy_dir(&repo_root().join("examples/offline"), &flake);
    // The fixtures build for this machine's system (the demo does the same).
    let settings = flake.join("settings.nix");
    let system = format!("{}-linux", std::env::consts::ARCH);
    let text: String = std::fs::read_to_string(&settings)
        .unwrap()
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("system =") {
                format!("  system = \"{system}\";\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&settings, text).unwrap();

    let secret = tmp.path().join("publisher.sec");
    let public = tmp.path().join("publisher.pub");
    let out = Command::new(&coordinator)
        .args(["keygen", "ci-publisher", "--secret-file"])
        .arg(&secret)
        .arg("--public-file")
        .arg(&public)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dest = tmp.path().join("static");
    let out = Command::new(&coordinator)
        .arg("publish")
        .arg(&flake)
        .arg("--key")
        .arg(&secret)
        .arg("--out")
        .arg(&dest)
        .arg("--json")
        .arg("--nodes-trust-paths")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "publish of examples/offline failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "publish --json printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });

    let trusted = TrustedKeys::new([PublicKey::read_file(&public).unwrap()], 1);
    for node in ["laptop", "pi-kitchen", "pi-garage"] {
        let file = dest.join(roost_common::wire::v1::http::manifest_file(node));
        let bytes = std::fs::read(&file)
            .unwrap_or_else(|e| panic!("{}: {e}\npublish said: {summary:#}", file.display()));
        let name: NodeName = node.parse().unwrap();
        let accepted = verify_manifest(
            &bytes,
            &trusted,
            None,
            Timestamp::now(),
            Identity {
                node: &name,
                system: &system,
            },
        )
        .unwrap_or_else(|e| panic!("{node}'s manifest does not verify: {e}"));
        let roost_common::Accepted::New(verified) = accepted else {
            panic!("{node}'s manifest was not a new one: {accepted:?}");
        };
        for p in &verified.manifest.profiles {
            assert!(
                p.path.as_path().exists(),
                "{node}.{}: {} was not built",
                p.name,
                p.path
            );
        }
    }
}

#[test]
fn the_fleet_example_deploy_output_passes_check_deploy() {
    require!(nix());
    let lib = require!(nixpkgs_lib());
    let out = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json"])
        .arg(repo_root().join("nix/example-eval.nix"))
        .args(["--arg", "lib"])
        .arg(format!("import {}", lib.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "examples/fleet did not evaluate:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["problems"], serde_json::json!([]), "{v:#}");
    let nodes = v["nodes"].as_object().unwrap();
    assert_eq!(
        nodes.keys().collect::<Vec<_>>(),
        ["anna-laptop", "ben-laptop", "pi-garage", "pi-kitchen"]
    );
    for (laptop, owner) in [("anna-laptop", "anna"), ("ben-laptop", "ben")] {
        let n = &v["nodes"][laptop];
        assert_eq!(n["profilesOrder"], serde_json::json!(["system", "home"]));
        assert_eq!(n["profiles"]["home"]["user"], owner, "{n:#}");
        assert_eq!(n["profiles"]["system"]["user"], "root", "{n:#}");
    }
    for (name, system) in v["nixos"].as_object().unwrap() {
        assert_eq!(
            system["agent"], true,
            "{name} does not import the agent module"
        );
    }
    assert_eq!(v["nixos"]["pi-kitchen"]["system"], "aarch64-linux");
    assert_eq!(
        v["checks"]["x86_64-linux"],
        serde_json::json!(["deploy-activate", "deploy-schema"])
    );
}
